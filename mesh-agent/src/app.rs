//! Wiring of `mesh-agent run`: preflight, datapath, enrolment, proxy, admin, shutdown.
//!
//! Threads: the control plane (enrolment watch, map sync, admin) runs on a current-thread
//! runtime on the main thread; the node proxy runs on its own multi-thread runtime so
//! admin scrapes never add latency to proxied connections.

use std::{
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Duration,
};

use anyhow::Context as _;
use mesh_common::cfg_flags;
use tokio::sync::watch;
use tracing::{error, info, warn, Instrument};

use crate::{
    admin::Admin,
    config::{RunArgs, RunConfig, Source, SourceConfig},
    control::{auth, server::AdsServer, translate},
    datapath::{
        self,
        writer::{MapSyncer, MapWriter, Registry},
        Datapath, LoadOptions,
    },
    enrol::{self, file::MeshFile, k8s, Snapshot},
    lifecycle::{drain, ready::Ready},
    metrics::Metrics,
    proxy::{
        inbound::{Inbound, InboundOptions, InboundPod},
        xds::client::{ClientOptions, XdsClient},
        Outbound,
    },
    sys,
};

const READY_BPF: &str = "bpf attached";
const READY_MAPS: &str = "enrolment synced";
const READY_PROXY: &str = "proxy listening";
const READY_XDS: &str = "xds stream open";
const READY_K8S: &str = "kubernetes synced";
/// Taken when a SIGTERM drain or a hand-over begins, and never released.
const READY_DRAINING: &str = "draining";

/// What a new enrolment snapshot changes in the embedded control plane's resources: only
/// the services that changed are translated again, and only resources whose content
/// changed are passed on.
fn xds_delta(translator: &mut translate::Translator, snap: &Snapshot) -> translate::Delta {
    translator.update_mesh(&snap.services, &snap.declared, &snap.security)
}

/// Warns about every `connect4` program that runs before ours for sockets of `cgroup`: a
/// socket load balancer there (Cilium's socket LB, attached before the agent started)
/// rewrites service addresses before the capture sees them, so the proxy recovers a pod
/// address and the service's routes never apply (docs/coexistence.md). Programs of
/// ancestors run after ours and are fine; programs attached below `cgroup` are not seen
/// from here.
fn warn_connect4_ahead_of_ours(cgroup: &std::path::Path) {
    use std::os::fd::AsFd;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    let ids = std::fs::File::open(cgroup)
        .and_then(|f| crate::sys::cgroup_effective_prog_ids(f.as_fd(), BPF_CGROUP_INET4_CONNECT));
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => {
            warn!(error = %e, cgroup = %cgroup.display(), "could not list the connect4 programs in force");
            return;
        }
    };
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    let name = |id: &u32| names.get(id).cloned().unwrap_or_else(|| format!("id {id}"));
    let ours = mesh_common::prog_names::CONNECT4;
    for id in ids.iter().take_while(|id| name(id) != ours) {
        warn!(
            program = %name(id),
            id,
            cgroup = %cgroup.display(),
            "a connect4 program runs before {ours}: a service address it rewrites reaches the proxy as a pod address, and the service's routing does not apply (docs/coexistence.md)"
        );
    }
}

pub fn run(args: Box<RunArgs>) -> anyhow::Result<()> {
    // Everything that can be wrong with the input is reported before touching the kernel;
    // lacking privileges first of all (it also decides whether the file can be read).
    datapath::require_root()?;
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    let cfg = RunConfig::from_args(*args)?;
    let redirect = cfg.proxy_redirect;
    let xds_token = cfg
        .xds_token_file
        .as_deref()
        .map(auth::Token::from_file)
        .transpose()?;
    if cfg.embedded_control_plane() {
        auth::check_listen(cfg.xds_listen, xds_token.as_ref())?;
    }
    // Workload identity: `identity.certs` is what the proxy's mTLS (HBONE) asks for
    // certificates (`identity::Certificates`).
    let mut identity = start_identity(&cfg)?;
    let cgroup = datapath::preflight(&cfg.pin_path, cfg.cgroup.as_deref())?;
    let config_json = serde_json::to_string_pretty(&cfg).unwrap_or_default();
    info!(config = %config_json.replace('\n', ""), "starting");

    // With --takeover, a running agent of this node hands it over (an upgrade); without,
    // the node lock is taken first, so a second agent is told so before anything else.
    let takeover = if cfg.takeover {
        crate::lifecycle::handover::request(&cfg.pin_path)?
    } else {
        None
    };
    // Readiness: a guard per start-up step, each dropped when its step is done.
    let ready = Ready::new();
    let kubernetes = cfg.source.is_kubernetes();
    let bpf_attached = ready.block(READY_BPF);
    let maps_synced = ready.block(READY_MAPS);
    let proxy_listening = ready.block(READY_PROXY);
    let xds_open = ready.block(READY_XDS);
    let k8s_synced = kubernetes.then(|| ready.block(READY_K8S));
    let mut datapath = Datapath::load(&LoadOptions {
        pin_path: &cfg.pin_path,
        cgroup: &cgroup,
        redirect,
        redirect6: cfg.proxy_redirect6,
        skmsg: cfg.skmsg,
        queue_floor: cfg.skmsg_queue_floor,
        heartbeat_timeout: cfg.proxy_heartbeat_timeout,
        lock_wait: takeover.as_ref().map(|_| Duration::from_secs(30)),
        netns_cookie: cfg.netns_cookie,
        unbounded_pairing: cfg.skmsg_unbounded_pairing,
        assume_missing: &cfg.assume_missing_feature,
        capacity: crate::datapath::Capacity {
            flows: cfg.flows_capacity,
            sockhash: cfg.sockhash_capacity,
        },
        kernel_relay: cfg.kernel_relay,
        kernel_relay_egress: cfg.kernel_relay_egress,
    })?;
    warn_connect4_ahead_of_ours(&cgroup);
    // The programs' decision log follows the log filter (`/logging`, `log-level`).
    if let Some(follow) = datapath.log_level_follower() {
        crate::admin::logging::on_change(follow);
    }
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin_listener = control
        .block_on(async { bind_shared(cfg.admin_address) })
        .with_context(|| format!("binding the admin endpoint on {}", cfg.admin_address))?;
    // The embedded CA's TLS endpoint for other nodes' agents (`--ca-listen`); this
    // agent's own requests stay in-process.
    if let Some(ca_endpoint) = identity.endpoint.take() {
        let listener = control
            .block_on(async { bind_shared(ca_endpoint.listen) })
            .with_context(|| {
                format!(
                    "binding the CA endpoint on {} (--ca-listen)",
                    ca_endpoint.listen
                )
            })?;
        control.spawn(
            async move {
                if let Err(e) =
                    crate::control::ca::tls::serve(ca_endpoint.ca, listener, ca_endpoint.names)
                        .await
                {
                    error!(error = %e, "the CA endpoint stopped");
                }
            }
            .instrument(tracing::info_span!("ca_server")),
        );
    }
    drop(bpf_attached);
    // Maps are shared with the proxy thread; the Datapath (links, pins) stays here and is
    // dropped last.
    let maps = datapath.maps.clone();
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(std::sync::RwLock::new(Registry::default()));
    let (node_addrs_stop, node_addrs) = watch_node_addrs(maps.clone())?;

    // With the Kubernetes source, the first snapshot (excludes only) is replaced once every
    // kind is listed; the API server is asked once now so a wrong address fails at start.
    let k8s_client = if let SourceConfig::Kubernetes { kubeconfig, .. } = &cfg.source {
        Some(
            control
                .block_on(k8s::client(kubeconfig.as_deref()))
                .context("connecting to the Kubernetes API server (--source kubernetes)")?,
        )
    } else {
        None
    };
    if let Some(client) = &k8s_client {
        identity.serve_kubernetes_callers(client, &cfg);
    }
    let k8s_stats = Arc::new(k8s::Stats::default());
    let local_node = enrol::LocalNode {
        node: cfg.node_name.clone(),
        trust_domain: cfg.trust_domain.clone(),
    };
    let snapshot = Snapshot::from_file_on(cfg.source.file(), &local_node);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot));
    let mut syncer = MapSyncer::new(maps.clone(), registry.clone());
    // Entries the kernel refuses are logged, counted and retried by the map writer's
    // thread, which applies every later snapshot (off the control runtime).
    apply_snapshot(&mut syncer, &metrics, &snap_rx.borrow());
    drop(maps_synced);
    let mut map_writer = MapWriter::spawn(
        MAP_SYNC_RETRY,
        snap_rx.borrow().clone(),
        syncer.needs_retry(),
        {
            let metrics = metrics.clone();
            move |snap| {
                apply_snapshot(&mut syncer, &metrics, snap);
                syncer.needs_retry()
            }
        },
    )
    .context("starting the map writer thread")?;

    // xDS: the embedded control plane (unless an external one is named) and the proxy's
    // client, both on this (control) runtime; the proxy reads the config it publishes.
    let mut translator = translate::Translator::new(&cfg.trust_domain, "");
    let (xds_tx, xds_rx) = watch::channel(Arc::new(
        crate::control::server::Snapshot::default()
            .apply(&xds_delta(&mut translator, &snap_rx.borrow())),
    ));
    // The embedded control plane: over a Unix socket for this agent's proxy, over TCP
    // (loopback, or with a token) for other clients.
    let xds_socket = cfg.xds_socket.clone();
    let ads = match &cfg.xds_address {
        Some(_) => None,
        None => {
            let tcp = control
                .block_on(async { bind_shared(cfg.xds_listen) })
                .with_context(|| {
                    format!(
                        "binding the embedded control plane on {} (--xds-listen)",
                        cfg.xds_listen
                    )
                })?;
            let unix = control
                .block_on(async { auth::bind_unix(&xds_socket) })
                .with_context(|| {
                    format!(
                        "binding the embedded control plane's Unix socket {} (--xds-socket)",
                        xds_socket.display()
                    )
                })?;
            Some((tcp, unix, AdsServer::new(xds_rx)))
        }
    };
    let (xds_url, client_token) = match &cfg.xds_address {
        Some(a) => (a.clone(), xds_token.clone()),
        None => (format!("unix:{}", xds_socket.display()), None),
    };
    let node_id = cfg.node_name.clone();
    let xds = XdsClient::new(ClientOptions {
        address: xds_url,
        token: client_token,
        node_id,
        cluster: "mesh-agent".into(),
        mode: cfg.xds_mode,
        on_demand: cfg.xds_on_demand,
        on_demand_timeout: cfg.xds_on_demand_timeout,
    });

    // The proxy's workers: a current-thread runtime per thread, each with listeners of its
    // own (`proxy::workers`). Their accept loops and every connection they serve hold a
    // watch of `drain`: SIGTERM and a hand-over start it and wait for them.
    let (drain, drain_watch) = drain::new();
    info!(workers = cfg.proxy_workers, "node proxy workers");
    let workers = crate::proxy::workers::Workers::start(cfg.proxy_workers)
        .context("starting the proxy's workers")?;
    let (takeover, inherited, inherited6) = match takeover {
        Some(t) => {
            let (t, fds, fds6) = t.split();
            (Some(t), fds, fds6)
        }
        None => (None, Vec::new(), Vec::new()),
    };
    let mut outbound = Outbound::bind(
        cfg.proxy_address.into(),
        inherited,
        workers.count(),
        maps.clone(),
        metrics.clone(),
        registry.clone(),
        xds.clone(),
    )?;
    // Native IPv6: the datapath sends IPv6 pods' connections to `--proxy-redirect6`.
    match (&cfg.ipv6_capture, cfg.proxy_redirect6) {
        (crate::config::Ipv6Capture::NoHostAddress(ips), _) => warn!(
            host_ips = %ips,
            "--proxy-redirect6 auto: no IPv6 address of this node in --host-ips \
             (MESH_HOST_IPS); native IPv6 connections are not captured (connect_not_ipv4)"
        ),
        (how, Some(addr6)) => info!(%addr6, ?how, "native IPv6 connections are captured"),
        (_, None) => {}
    }
    metrics
        .ipv6_capture
        .store(u64::from(cfg.proxy_redirect6.is_some()), Relaxed);
    if let Some(addr6) = cfg.proxy_redirect6 {
        outbound.listen6(addr6, inherited6)?;
    }
    let outbound = Arc::new(outbound);
    if cfg.skmsg_upstream || cfg.kernel_relay {
        outbound.pair_upstream_from(*redirect.ip());
        if let Some(addr6) = cfg.proxy_redirect6 {
            outbound.pair_upstream6_from(*addr6.ip());
        }
    }
    let access_log = {
        use crate::{config::AccessLogTarget as T, proxy::accesslog::Sink};
        let sink = match &cfg.access_log {
            T::Off => None,
            T::Stdout => Some(Sink::Stdout),
            T::Stderr => Some(Sink::Stderr),
            T::File(p) => Some(Sink::File(p.clone())),
        };
        // Without a sink, namespaces labelled `mesh-agent.io/access-log=true` still log.
        let log = crate::proxy::accesslog::AccessLog::start(sink, metrics.clone(), xds.mesh())
            .with_context(|| format!("opening the access log ({:?})", cfg.access_log))?;
        workers.first().spawn(
            log.clone()
                .follow()
                .instrument(tracing::info_span!("access-log-scope")),
        );
        Some(log)
    };
    if let Some(log) = &access_log {
        outbound.set_access_log(log.clone());
    }
    // `--telemetry off`: the proxy records no Istio series.
    metrics.l7.istio.set_enabled(cfg.telemetry);
    // `--l7-h1-server`: the L7 engine's downstream HTTP/1.1 codec.
    crate::proxy::http::set_default_h1_server(cfg.l7_h1_server);
    // `--l7-h2-server`: the L7 engine's downstream HTTP/2 server.
    crate::proxy::http::set_default_h2_server(cfg.l7_h2_server);
    let mut tracer = None;
    if let Some(endpoint) = &cfg.trace_otlp {
        let opts = crate::proxy::trace::TraceOptions {
            endpoint: endpoint.clone(),
            sampling: cfg.trace_sampling,
            node_name: cfg.node_name.clone(),
        };
        let t = crate::proxy::trace::Tracer::start(&opts, metrics.clone())
            .context("starting the trace exporter")?;
        outbound.set_tracer(t.clone());
        tracer = Some(t);
        info!(%endpoint, sampling = cfg.trace_sampling, "traces: spans go to the OTLP receiver");
    }
    let l7 = outbound.l7();
    // The next agent may ask for the node while this one runs (`handover`).
    let (handover_tx, mut handover_rx) = tokio::sync::mpsc::unbounded_channel();
    let _handover = crate::lifecycle::handover::serve(
        &cfg.pin_path,
        outbound.listener_fds(),
        outbound.listener6_fds(),
        handover_tx,
    )
    .context("opening the hand-over socket")?;
    let inbound_drain = drain_watch.clone();
    let hbone_drain = drain_watch.clone();
    // Zero trust: HBONE to other nodes' workloads, policy for same-node destinations, and
    // (below) the in-pod HBONE listeners and the policy on captured inbound connections.
    let mesh_tls = crate::identity::tls::MeshTls::new(identity.certs.clone());
    let hbone_client = workers.block_on(async {
        crate::proxy::hbone::HboneClient::new(mesh_tls.clone(), Default::default())
    });
    // Istio's series of workloads that left the proxy's model are dropped at each scrape.
    // This node's enrolled workloads count as live too: direct-mode flows are named from
    // the enrolment (the registry), which can be ahead of the proxy's model (the xDS push
    // after an enrolment change); without them a scrape in between dropped a new
    // workload's series with the counts in it (seen on 6.12 under qemu).
    metrics.l7.istio.set_live({
        let xds = xds.clone();
        let snaps = snap_rx.clone();
        Box::new(move || {
            let mesh = xds.mesh_now();
            (mesh.version > 0).then(|| {
                let enrolled = snaps.borrow().clone();
                mesh.workloads
                    .iter()
                    .map(|w| (w.namespace.clone(), w.name.clone()))
                    .chain(
                        enrolled
                            .workloads
                            .iter()
                            .map(|w| (w.namespace.clone(), w.name.clone())),
                    )
                    .collect()
            })
        })
    });
    // Direct-mode flows (socket to socket, no proxy) in the Istio series, from the
    // datapath's flow records: peers named as the proxy names its own clients' (the
    // registry's workload, then what the proxy's mesh model says of the address: `metrics`
    // may not read the proxy's model itself, docs/architecture.md).
    let direct = crate::metrics::istio::DirectFlows::from_registry(
        metrics.l7.istio.clone(),
        registry.clone(),
        {
            let xds = xds.clone();
            move |ip, peer: &mut crate::metrics::istio::Peer| {
                if let Some(w) = xds.mesh_now().workloads.by_ip(ip) {
                    peer.principal = w.identity.to_string();
                    w.label_peer(peer);
                }
            }
        },
    );
    datapath.start_flow_telemetry(Box::new(move |r| direct.record(r)))?;
    outbound.set_secure(crate::proxy::secure::Secure::new(
        cfg.node_name.clone(),
        xds.clone(),
        hbone_client,
        metrics.clone(),
    ));
    outbound.serve(&workers, drain_watch);
    // Inbound capture: in-pod listeners and TC, following the enrolled local workloads.
    let mut inbound = if cfg.inbound_capture {
        let i = Inbound::start(InboundOptions {
            maps: maps.clone(),
            tc: Some(datapath.tc.clone()),
            metrics: metrics.clone(),
            workers: workers.set(),
            drain: inbound_drain,
            plain: {
                let p = crate::proxy::secure::InboundPolicy::new(xds.clone(), metrics.clone());
                if let Some(log) = &access_log {
                    p.set_access_log(log.clone());
                }
                if let Some(t) = &tracer {
                    p.set_tracer(t.clone());
                }
                p
            },
            on_hbone_listener: Some(hbone_handoff(
                workers.set(),
                xds.clone(),
                mesh_tls.clone(),
                identity.certs.clone(),
                metrics.clone(),
                hbone_drain,
                access_log.clone(),
                tracer.clone(),
            )),
            pair_delivery: cfg.skmsg_upstream,
        })
        .context("starting the inbound capture thread")?;
        i.update(inbound_pods(&snap_rx.borrow()));
        Some(i)
    } else {
        drop(inbound_drain);
        drop(hbone_drain);
        None
    };
    // A first beat before the proxy is marked ready, so it is not taken as stale.
    maps.beat().context("writing the proxy heartbeat")?;
    maps.set_config(|c| c.flags |= cfg_flags::PROXY_READY)
        .context("marking the proxy ready")?;
    drop(proxy_listening);

    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        maps: maps.clone(),
        ready: ready.clone(),
        config_json,
        snapshot: snap_rx.clone(),
        xds: xds.clone(),
        l7,
        ads_stats: ads.as_ref().map(|(_, _, s)| s.stats.clone()),
        k8s: kubernetes.then(|| k8s_stats.clone()),
        certs: Some(identity.certs.clone()),
        pin_path: cfg.pin_path.clone(),
    });

    let handed_over = control.block_on(async {
        if let Some((tcp, unix, server)) = ads {
            let access = auth::Access::new(xds_token.clone(), server.stats.clone());
            info!(
                addr = %tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                socket = %xds_socket.display(),
                token = xds_token.is_some(),
                "embedded control plane serving ADS"
            );
            let svc = server.into_service(access);
            let unix_svc = svc.clone();
            tokio::spawn(
                async move {
                    let r = ads_server()
                        .add_service(svc)
                        .serve_with_incoming(ads_incoming(tcp))
                        .await;
                    if let Err(e) = r {
                        error!(error = %e, "the embedded control plane stopped (TCP)");
                    }
                }
                .instrument(tracing::info_span!("ads_server")),
            );
            tokio::spawn(
                async move {
                    let r = ads_server()
                        .add_service(unix_svc)
                        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(unix))
                        .await;
                    if let Err(e) = r {
                        error!(error = %e, "the embedded control plane stopped (Unix socket)");
                    }
                }
                .instrument(tracing::info_span!("ads_server_unix")),
            );
        }
        tokio::spawn(xds.clone().run().instrument(tracing::info_span!("xds_client")));
        tokio::spawn(
            track_identities(
                snap_rx.clone(),
                cfg.node_name.clone(),
                identity.nodes.take(),
                identity.certs.clone(),
            )
            .instrument(tracing::info_span!("identities")),
        );
        if let Some(t) = takeover {
            // The old agent stops accepting once this one can route: its xDS stream is up
            // (bounded: past it, lookups wait and then follow the fail modes).
            let xds = xds.clone();
            tokio::spawn(
                async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while !xds.connected() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    match t.ready() {
                        Ok(()) => info!("took the node over; the old agent drains"),
                        Err(e) => warn!(error = %e, "could not tell the old agent"),
                    }
                }
                .instrument(tracing::info_span!("takeover")),
            );
        }
        tokio::spawn(
            xds_readiness(xds.clone(), ready.clone(), xds_open)
                .instrument(tracing::info_span!("xds_ready")),
        );
        tokio::spawn(
            admin
                .serve(admin_listener)
                .instrument(tracing::info_span!("admin")),
        );
        match (k8s_client, &cfg.source) {
            (
                Some(client),
                SourceConfig::Kubernetes {
                    file,
                    kubepods_cgroup,
                    trust_domain,
                    ..
                },
            ) => {
                let opts = k8s::Options {
                    node_name: Some(cfg.node_name.clone()),
                    trust_domain: trust_domain.clone(),
                    excludes: file.exclude.clone(),
                    locator: k8s::PodLocator::new(
                        kubepods_cgroup.clone(),
                        &datapath::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()),
                        "/proc".into(),
                    ),
                };
                info!(roots = ?opts.locator.roots(), node = ?opts.node_name, "enrolment from the Kubernetes API");
                tokio::spawn(
                    k8s::run(client, opts, snap_tx, k8s_stats.clone(), move || {
                        drop(k8s_synced)
                    })
                    .instrument(tracing::info_span!("kubernetes")),
                );
            }
            (_, SourceConfig::File { path, .. }) => {
                tokio::spawn(
                    enrol::file::watch_file_on(
                        path.clone(),
                        cfg.reload_interval,
                        snap_tx,
                        cfg.allow_empty_config,
                        metrics.reloads.clone(),
                        local_node.clone(),
                    )
                    .instrument(tracing::info_span!("enrolment")),
                );
            }
            (None, SourceConfig::Kubernetes { .. }) => {
                unreachable!("the Kubernetes client is made for the Kubernetes source")
            }
        }
        let mut rx = snap_rx.clone();
        let map_writer = &mut map_writer;
        let mut translator = Some(translator);
        let mut last_services = Some(snap_rx.borrow().clone());
        let mut last_node = Some(snap_rx.borrow().clone());
        let sync = async {
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let snap = rx.borrow_and_update().clone();
                        // Node-local enrolment and the mesh's services are separate
                        // streams: a service change anywhere does not wake the map writer,
                        // and a pod change that no selector reads translates nothing.
                        if !last_node.as_ref().is_some_and(|l: &Arc<Snapshot>| l.same_node(&snap)) {
                            map_writer.send(snap.clone());
                            if let Some(i) = &inbound {
                                i.update(inbound_pods(&snap));
                            }
                            last_node = Some(snap.clone());
                        }
                        publish_resources(&xds_tx, &mut translator, &mut last_services, snap).await;
                    }
                    // Its apply panicked: stop (`stop` below passes the panic on).
                    _ = map_writer.exited() => break,
                }
            }
        }
        .instrument(tracing::info_span!("map_sync"));
        info!(pin_path = %datapath.pin_path().display(), "mesh-agent running");
        // Once every start-up step is done, the heap that loading and verifying the
        // programs freed, and the code only start-up ran, leave the resident set
        // (`sys::memory`: most of the idle RSS otherwise).
        tokio::spawn(
            release_start_up_memory(ready.clone())
                .instrument(tracing::info_span!("release_start_up_memory")),
        );
        // `/ready` turns 503 the moment a drain or a hand-over begins.
        tokio::select! {
            _ = sync => (false, ready.block(READY_DRAINING)),
            s = shutdown_signal() => {
                info!(signal = s, "shutting down");
                (false, ready.block(READY_DRAINING))
            }
            Some(crate::lifecycle::handover::Event::Requested) = handover_rx.recv() => {
                (true, ready.block(READY_DRAINING))
            }
        }
    });
    let (handed_over, _draining) = handed_over;
    // No map write after this (the apply in progress finishes first).
    map_writer.stop();
    // Inbound capture ends with this agent: TC detached, in-pod listeners closed (what
    // they accepted drains with the proxy). A next agent attaches its own; in between,
    // connections to pods go straight to them (docs/architecture.md, "Inbound capture").
    if let Some(i) = inbound.take() {
        i.stop();
    }
    if handed_over {
        // The map syncer and the enrolment source stopped with the loop above; the new
        // agent may take the node. This proxy keeps serving (and beating) until it is ready.
        datapath.release_for_handover();
        let outcome = control.block_on(async {
            tokio::select! {
                e = handover_rx.recv() => e,
                s = shutdown_signal() => {
                    warn!(signal = s, "signal during a hand-over; leaving the datapath to the new agent");
                    None
                }
            }
        });
        match outcome {
            Some(crate::lifecycle::handover::Event::Ready) => {
                info!("handed the node over; draining")
            }
            other => warn!(
                ?other,
                "the new agent did not become ready; leaving the datapath attached for it"
            ),
        }
        // The control side goes: its admin and ADS listeners (bound with SO_REUSEPORT next
        // to the new agent's) must not take connections nobody would answer, and its map
        // writers stopped already. What this proxy relays needs none of it.
        control.shutdown_background();
        // New connections are the new agent's; this one finishes what it relays (HTTP
        // connections are told to close, and their clients reconnect to the new agent).
        // A signal now (the old pod's termination) does not cut the drain short: the
        // kubelet's grace period bounds it, and a kill resets what is left.
        let left = workers.block_on(drain.start_and_wait(cfg.handover_drain));
        if left > 0 {
            warn!(
                connections = left,
                "hand-over drain deadline passed; resetting the remaining proxied connections"
            );
        }
        drop(node_addrs_stop);
        let _ = node_addrs.join();
        drop(maps);
        drop(datapath);
        // Stay until told to go: exiting would have the kubelet restart this container,
        // which would take the node back from the new agent.
        info!("handed over: the datapath stays with the new agent; waiting for the signal to exit");
        let s = workers.block_on(shutdown_signal());
        info!(signal = s, "exiting after the hand-over");
        workers.shutdown();
        return Ok(());
    }

    // New connections go direct from here on; established ones may finish.
    if let Err(e) = maps.set_config(|c| c.flags &= !cfg_flags::PROXY_READY) {
        warn!(error = %e, "could not clear the proxy-ready flag");
    }
    // The control runtime keeps running meanwhile: the admin endpoint answers (`/ready`
    // says "draining") and the xDS client keeps the configuration in-flight requests use.
    let left = control.block_on(drain.start_and_wait(cfg.drain));
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed; closing the remaining proxied connections"
        );
    }
    workers.shutdown();
    drop(node_addrs_stop);
    let _ = node_addrs.join();
    if cfg.embedded_control_plane() {
        let _ = std::fs::remove_file(&xds_socket);
    }
    drop(maps);
    if cfg.on_exit == crate::config::OnExit::Keep {
        // proxy_ready is clear: until the next agent, fail-open workloads go direct and
        // fail-closed ones are refused; paired sockets stay short-circuited.
        datapath.keep_on_exit();
        drop(datapath);
        info!("programs left attached and maps pinned for the next agent (--on-exit keep)");
    } else {
        drop(datapath);
        info!("programs detached, pins removed");
    }
    Ok(())
}

/// Keeps `guard` ("xds stream open") held exactly while the proxy's xDS stream is down:
/// released when it connects, taken again when it drops, released when it reconnects.
async fn xds_readiness(
    xds: Arc<XdsClient>,
    ready: Ready,
    guard: crate::lifecycle::ready::BlockReady,
) {
    let mut guard = Some(guard);
    let mut config = xds.config();
    loop {
        match (xds.connected(), guard.is_some()) {
            (true, true) => guard = None,
            (false, false) => {
                warn!("the proxy's xDS stream is down; not ready until it reconnects");
                guard = Some(ready.block(READY_XDS));
            }
            _ => {}
        }
        // A push wakes this at once; a lost stream is seen within the poll interval.
        let _ = tokio::time::timeout(XDS_READY_POLL, config.changed()).await;
    }
}

/// Waits for the first readiness, then hands back what start-up alone used: free heap,
/// and the executable's pages that loading and wiring touched (they come back from the
/// page cache when they run again).
async fn release_start_up_memory(ready: Ready) {
    ready.ready().await;
    sys::release_free_heap();
    match sys::memory::release_start_up_code() {
        Ok(bytes) => info!(
            kib = bytes / 1024,
            "start-up code pages left the resident set"
        ),
        Err(e) => warn!(error = %e, "could not release the start-up code pages"),
    }
}

/// How often the xDS stream's state is checked for readiness.
const XDS_READY_POLL: Duration = Duration::from_millis(50);

/// Binds a control listener (admin, ADS) with `SO_REUSEPORT`, so the next agent of a
/// hand-over can bind it while this one drains (the kernel spreads new connections over
/// both until this one exits; control clients retry).
fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// How often the node's own addresses are listed again for `NODE_ADDRS` (an address added
/// to the node is exempt from capture within this time).
const NODE_ADDR_REFRESH: Duration = Duration::from_secs(1);

/// Keeps `NODE_ADDRS` current on a thread of its own (a netlink dump is blocking work):
/// runs until the returned sender is dropped.
fn watch_node_addrs(
    maps: Arc<datapath::Maps>,
) -> std::io::Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("node-addrs".into())
        .spawn(move || {
            let _span = tracing::info_span!("node_addrs").entered();
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(NODE_ADDR_REFRESH)
            {
                match maps.sync_node_addrs() {
                    Ok(r) if r.added + r.removed > 0 => {
                        info!(added = r.added, removed = r.removed, now = r.current, "node addresses changed")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "listing the node's addresses failed; NODE_ADDRS kept as it was"),
                }
            }
        })?;
    Ok((tx, handle))
}

/// Serves each enrolled pod's HBONE listener (15008, inside the pod) with the pod's own
/// identity, from every proxy worker, until the pod leaves. The identity comes from the
/// workloads in force (it waits for the pod to appear there); its certificate is fetched
/// on demand first (on worker 0), then every worker accepts (`WorkerSet::serve_everywhere`)
/// with one TLS configuration and one connection cap.
#[expect(clippy::too_many_arguments, reason = "the wiring of one listener")]
fn hbone_handoff(
    workers: crate::proxy::workers::WorkerSet,
    xds: Arc<XdsClient>,
    tls: Arc<crate::identity::tls::MeshTls>,
    certs: Arc<crate::identity::certs::CertManager>,
    metrics: Arc<crate::metrics::Metrics>,
    drain: drain::DrainWatch,
    access_log: Option<crate::proxy::accesslog::AccessLog>,
    tracer: Option<crate::proxy::trace::Tracer>,
) -> crate::proxy::inbound::HboneHandoff {
    use crate::identity::Certificates;
    Arc::new(move |pod, listener| {
        let (xds, tls, certs, metrics, drain) = (
            xds.clone(),
            tls.clone(),
            certs.clone(),
            metrics.clone(),
            drain.clone(),
        );
        let access_log = access_log.clone();
        let tracer = tracer.clone();
        let workers = workers.clone();
        workers.clone().first().spawn(async move {
            let ip = std::net::IpAddr::V4(pod.ip);
            let ready = async {
                let mut mesh = xds.mesh();
                let id = loop {
                    if let Some(w) = mesh.borrow_and_update().workloads.by_ip(ip) {
                        break w.identity.clone();
                    }
                    if mesh.changed().await.is_err() {
                        return None;
                    }
                };
                let mut backoff = Duration::from_millis(200);
                let config = loop {
                    match certs.get(&id).await.map_err(|e| e.to_string()).and_then(|_| {
                        tls.server_config(&id).map_err(|e| e.to_string())
                    }) {
                        Ok(c) => break c,
                        Err(e) => {
                            warn!(pod = %pod.display_name(), identity = %id, error = %e, "no certificate for the pod's HBONE listener yet; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(10));
                        }
                    }
                };
                Some((id, config))
            };
            let (id, config) = tokio::select! {
                r = ready => match r {
                    Some(r) => r,
                    None => return,
                },
                () = pod.closed() => return,
            };
            let handler: Arc<dyn crate::proxy::hbone::ConnectHandler> =
                Arc::new(crate::proxy::secure::TunnelHandler {
                    pod: pod.clone(),
                    xds: xds.clone(),
                    metrics: metrics.clone(),
                    access_log,
                    tracer,
                });
            let opts = crate::proxy::hbone::ServerOptions::default();
            let slots = crate::proxy::hbone::connection_slots(&opts);
            // Each worker's loop ends with the drain or when the pod leaves, dropping its
            // descriptor: the socket closes with the last.
            let served = workers.serve_everywhere(listener, |worker, l| {
                let (pod, config, handler, drain, slots, metrics) = (
                    pod.clone(),
                    config.clone(),
                    handler.clone(),
                    drain.clone(),
                    slots.clone(),
                    metrics.clone(),
                );
                let span = tracing::info_span!("inbound_hbone", pod = %pod.display_name(), worker);
                async move {
                    let serve = crate::proxy::hbone::serve_shared(
                        l,
                        config,
                        handler,
                        drain,
                        opts,
                        slots,
                        move || metrics.inbound.worker_accepts[1].add(worker),
                    );
                    tokio::select! {
                        () = serve => {}
                        () = pod.closed() => {}
                    }
                }
                .instrument(span)
            });
            match served {
                Ok(_) => info!(pod = %pod.display_name(), identity = %id, workers = workers.count(), "HBONE listener serving"),
                Err(e) => warn!(pod = %pod.display_name(), error = %e, "cannot serve the pod's HBONE listener"),
            }
        });
    })
}

/// The enrolled local workloads, for the inbound manager: bypassed ones and those whose
/// network namespace is not known are mesh sources but not captured.
fn inbound_pods(snap: &Snapshot) -> Vec<InboundPod> {
    snap.workloads
        .iter()
        .filter(|w| w.enrolled)
        .map(|w| InboundPod {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            ip: w.ip,
            ip6: w.ip6,
            netns: w.netns.clone(),
            capture: !w.bypass && w.unresolved.is_none(),
        })
        .collect()
}

/// How often the map syncer applies the snapshot in force again while some of its
/// entries could not be written (a full map heals once room is made).
const MAP_SYNC_RETRY: Duration = Duration::from_secs(2);

/// Writes a snapshot to the maps (best effort per entry) and updates the enrolment gauges
/// and the map write counters.
fn apply_snapshot(syncer: &mut MapSyncer, metrics: &Metrics, snap: &Snapshot) {
    let failures = syncer.apply(snap);
    metrics.map_writes.record(&failures);
    let enrolled = snap.workloads.iter().filter(|w| w.enrolled).count() as u64;
    metrics.enrolled_workloads.store(enrolled, Relaxed);
    metrics
        .unresolved_workloads
        .store(syncer.unresolved as u64, Relaxed);
}

/// The gRPC server for ADS. One stream per client is the norm: a connection may hold a
/// few (an Envoy opens one per xDS type without ADS), not hundreds.
fn ads_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(8))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// The ADS server's connections, with `TCP_NODELAY`: small gRPC frames (an ACK, a one
/// resource update) otherwise wait for the peer's delayed ACK (40 ms seen).
fn ads_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Rebuilds the control plane's snapshot from a new enrolment snapshot, if its services
/// changed; clients are woken only when a resource changed. The translation runs on the
/// blocking pool (the first one of a big mesh takes a while), the translator moved there
/// and back.
async fn publish_resources(
    tx: &watch::Sender<Arc<crate::control::server::Snapshot>>,
    translator: &mut Option<translate::Translator>,
    last: &mut Option<Arc<Snapshot>>,
    snap: Arc<Snapshot>,
) {
    if last.as_ref().is_some_and(|l| l.same_services(&snap)) {
        return;
    }
    let mut t = translator.take().unwrap_or_default();
    let job = {
        let snap = snap.clone();
        tokio::task::spawn_blocking(move || {
            let delta = xds_delta(&mut t, &snap);
            (t, delta)
        })
    };
    let Ok((t, delta)) = job.await else {
        // The translation panicked: start again from scratch next time.
        *last = None;
        return;
    };
    *translator = Some(t);
    *last = Some(snap);
    if delta.is_empty() {
        return;
    }
    tx.send_if_modified(|cur| {
        let next = cur.apply(&delta);
        let changed = next.version != cur.version;
        if changed {
            info!(version = next.version, "control plane snapshot updated");
            *cur = Arc::new(next);
        }
        changed
    });
}

/// `mesh-agent control-plane`: the embedded control plane on its own.
pub fn control_plane(args: crate::cli::ControlPlaneArgs) -> anyhow::Result<()> {
    let file = match (args.source, &args.config) {
        (Source::File, Some(path)) => MeshFile::load(path)?,
        (Source::File, None) => {
            anyhow::bail!("--config (MESH_CONFIG) is required with --source file")
        }
        (Source::Kubernetes, Some(_)) => {
            anyhow::bail!(
                "--config is not used with --source kubernetes: services come from the API server"
            )
        }
        (Source::Kubernetes, None) => MeshFile::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let snap = Snapshot::from_file(&file);
        // Workloads' identities in the trust domain the CA signs (`--trust-domain`).
        let mut translator = translate::Translator::new(&args.trust_domain, "");
        let (xds_tx, xds_rx) = watch::channel(Arc::new(
            crate::control::server::Snapshot::default().apply(&xds_delta(&mut translator, &snap)),
        ));
        let token = args
            .xds_token_file
            .as_deref()
            .map(auth::Token::from_file)
            .transpose()?;
        auth::check_listen(args.listen, token.as_ref())?;
        let ca = control_plane_ca(&args, &snap).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding the control plane on {} (--listen)", args.listen))?;
        let server = AdsServer::new(xds_rx);
        let access = auth::Access::new(token, server.stats.clone());
        let stats = server.stats.clone();
        if let Some(addr) = args.admin_address {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the admin endpoint on {addr}"))?;
            let snapshots = xds_tx.subscribe();
            tokio::spawn(
                crate::admin::serve_http(
                    l,
                    Arc::new(move |_, path| match path {
                        "/xds_clients" => (
                            "200 OK",
                            "application/json",
                            serde_json::to_string_pretty(&stats.clients_json()).unwrap_or_default(),
                        ),
                        "/ready" => ("200 OK", "text/plain", "ready\n".into()),
                        "/version" => (
                            "200 OK",
                            "text/plain",
                            format!("{}\n", snapshots.borrow().version),
                        ),
                        _ => (
                            "404 Not Found",
                            "text/plain",
                            "try /xds_clients, /version, /ready\n".into(),
                        ),
                    }),
                )
                .instrument(tracing::info_span!("admin")),
            );
        }
        let (snap_tx, mut snap_rx) = watch::channel(Arc::new(snap));
        match (args.source, &args.config) {
            (Source::Kubernetes, _) => {
                let client = k8s::client(args.kubeconfig.as_deref())
                    .await
                    .context("connecting to the Kubernetes API server (--source kubernetes)")?;
                if let Some((ca, _, sa)) = &ca {
                    use crate::control::ca::k8s::{KubeCallerOptions, KubeCallers};
                    ca.use_kubernetes(KubeCallers::new(
                        client.clone(),
                        KubeCallerOptions {
                            audience: args.ca.ca_k8s_audience.clone(),
                            service_account: sa.clone(),
                            trust_domain: args.trust_domain.clone(),
                        },
                    ));
                }
                let opts = k8s::Options {
                    node_name: None,
                    trust_domain: args.trust_domain.clone(),
                    excludes: Vec::new(),
                    locator: k8s::PodLocator::new(None, "/sys/fs/cgroup".as_ref(), "/proc".into()),
                };
                tokio::spawn(
                    k8s::run(
                        client,
                        opts,
                        snap_tx,
                        Arc::new(k8s::Stats::default()),
                        || info!("kubernetes services listed"),
                    )
                    .instrument(tracing::info_span!("kubernetes")),
                );
            }
            (Source::File, Some(path)) => {
                tokio::spawn(
                    enrol::file::watch_file(
                        path.clone(),
                        Duration::from_millis(args.reload_interval_ms),
                        snap_tx,
                        args.allow_empty_config,
                        Arc::default(),
                    )
                    .instrument(tracing::info_span!("standalone_file")),
                );
            }
            (Source::File, None) => unreachable!("checked above"),
        }
        let ca_nodes = ca.map(|(_, nodes, _)| nodes);
        let trust_domain = args.trust_domain.clone();
        tokio::spawn(
            async move {
                let mut translator = Some(translator);
                let mut last = Some(snap_rx.borrow().clone());
                while snap_rx.changed().await.is_ok() {
                    let snap = snap_rx.borrow_and_update().clone();
                    if let Some(tx) = &ca_nodes {
                        let next = declared_identities(&snap, &trust_domain);
                        tx.send_if_modified(|cur| {
                            let changed = **cur != next;
                            if changed {
                                *cur = Arc::new(next);
                            }
                            changed
                        });
                    }
                    publish_resources(&xds_tx, &mut translator, &mut last, snap).await;
                }
            }
            .instrument(tracing::info_span!("translate")),
        );
        info!(addr = %args.listen, "control plane serving ADS");
        tokio::select! {
            r = ads_server()
                .add_service(server.into_service(access))
                .serve_with_incoming(ads_incoming(listener)) => {
                r.context("serving ADS")?;
            }
            s = shutdown_signal() => info!(signal = s, "shutting down"),
        }
        Ok(())
    })
}

/// The CA of `mesh-agent control-plane` (with `--ca-listen`), serving already: the CA,
/// the sender of what runs where, Kubernetes callers' ServiceAccount.
type ControlPlaneCa = (
    Arc<crate::control::ca::Ca>,
    watch::Sender<Arc<crate::control::ca::NodeIdentities>>,
    Option<(String, String)>,
);

async fn control_plane_ca(
    args: &crate::cli::ControlPlaneArgs,
    snap: &Snapshot,
) -> anyhow::Result<Option<ControlPlaneCa>> {
    use crate::control::ca::{Ca, CaOptions, NodeTokens, Signer};
    let mut problems = Vec::new();
    let sa = args.ca.check(&mut problems);
    let Some(listen) = args.ca.ca_listen else {
        if args.ca.ca_dir.is_some() {
            problems.push(crate::enrol::file::ConfigError::Invalid(
                "--ca-dir configures a CA this control plane serves only with --ca-listen".into(),
            ));
        }
        if !problems.is_empty() {
            let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
            anyhow::bail!("{}", all.join("; "));
        }
        return Ok(None);
    };
    if !problems.is_empty() {
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::bail!("{}", all.join("; "));
    }
    let signer = match &args.ca.ca_dir {
        Some(dir) => Signer::load_or_generate(dir, &args.trust_domain)?,
        None => Signer::generate(&args.trust_domain)?,
    };
    let tokens = args
        .ca
        .ca_node_tokens
        .as_deref()
        .map(NodeTokens::load)
        .transpose()?;
    let (tx, rx) = watch::channel(Arc::new(declared_identities(snap, &args.trust_domain)));
    let ca = Arc::new(Ca::new(
        signer,
        CaOptions::new(&args.trust_domain),
        rx,
        tokens,
    )?);
    let host = crate::enrol::LocalNode::from_host().node;
    let names = ca_endpoint_names(&args.ca.ca_server_names, &host, listen)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the CA endpoint on {listen} (--ca-listen)"))?;
    info!(dir = ?args.ca.ca_dir, remote_nodes = args.ca.ca_node_tokens.is_some(), "control plane CA");
    let served = ca.clone();
    tokio::spawn(
        async move {
            if let Err(e) = crate::control::ca::tls::serve(served, listener, names).await {
                error!(error = %e, "the CA endpoint stopped");
            }
        }
        .instrument(tracing::info_span!("ca_server")),
    );
    Ok(Some((ca, tx, sa)))
}

/// What runs on which node as the file declares it: each mesh workload's identity under
/// its `node:` (a workload without one counts as this host's).
fn declared_identities(snap: &Snapshot, trust_domain: &str) -> crate::control::ca::NodeIdentities {
    let mut ids = crate::control::ca::NodeIdentities::default();
    for m in snap
        .declared
        .iter()
        .filter(|m| m.hbone && !m.node.is_empty())
    {
        if let Ok(id) =
            crate::identity::SpiffeId::new(trust_domain, &m.namespace, &m.service_account)
        {
            ids = ids.with(&m.node, id);
        }
    }
    ids
}

/// `mesh-agent xds-watch`: print every verdict of a wildcard client as a JSON line.
pub fn xds_watch(args: crate::cli::XdsWatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = XdsClient::new(ClientOptions {
            address: args.xds_address.clone(),
            token: args
                .xds_token_file
                .as_deref()
                .map(auth::Token::from_file)
                .transpose()?,
            node_id: args.node_id.clone(),
            cluster: "xds-watch".into(),
            mode: args.mode,
            on_demand: false,
            on_demand_timeout: Duration::ZERO,
        });
        tokio::spawn(
            client
                .clone()
                .run()
                .instrument(tracing::info_span!("xds_client")),
        );
        let deadline = (args.duration_ms > 0)
            .then(|| tokio::time::Instant::now() + Duration::from_millis(args.duration_ms));
        let mut seen = 0;
        loop {
            for v in client.verdicts_after(seen) {
                seen = v.seq;
                println!("{}", serde_json::to_string(&v).unwrap_or_default());
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = shutdown_signal() => return Ok(()),
            }
        }
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Workload identity: the certificate manager, and the embedded CA unless `--ca-address`.
struct IdentityParts {
    certs: Arc<crate::identity::certs::CertManager>,
    /// The embedded CA's TLS endpoint for other nodes (`--ca-listen`), taken by the wiring.
    endpoint: Option<CaEndpoint>,
    /// What runs on which node, as the embedded CA sees it (this node's entry is kept from
    /// enrolment by `track_identities`).
    nodes: Option<watch::Sender<Arc<crate::control::ca::NodeIdentities>>>,
    /// The embedded CA itself, to add Kubernetes callers once the kube client is made.
    embedded: Option<Arc<crate::control::ca::Ca>>,
}

/// Where and as what names the embedded CA serves other nodes (TLS).
struct CaEndpoint {
    ca: Arc<crate::control::ca::Ca>,
    listen: std::net::SocketAddr,
    names: Vec<crate::control::ca::tls::ServerNameSan>,
}

/// The CA endpoint's certificate names: `--ca-server-names`, else the defaults.
fn ca_endpoint_names(
    configured: &[String],
    node: &str,
    listen: std::net::SocketAddr,
) -> anyhow::Result<Vec<crate::control::ca::tls::ServerNameSan>> {
    if configured.is_empty() {
        return Ok(crate::control::ca::tls::default_names(node, listen));
    }
    let mut bad = Vec::new();
    let names = configured
        .iter()
        .filter_map(|n| n.parse().map_err(|e: String| bad.push(e)).ok())
        .collect();
    if !bad.is_empty() {
        anyhow::bail!("--ca-server-names: {}", bad.join("; "));
    }
    Ok(names)
}

impl IdentityParts {
    /// With `--source kubernetes`, the embedded CA also takes other agents' projected
    /// ServiceAccount tokens (TokenReview through this agent's kube client).
    fn serve_kubernetes_callers(&self, client: &kube::Client, cfg: &RunConfig) {
        use crate::control::ca::k8s::{KubeCallerOptions, KubeCallers};
        let Some(ca) = &self.embedded else {
            return;
        };
        let opts = KubeCallerOptions {
            audience: cfg.ca_k8s_audience.clone(),
            service_account: cfg.ca_k8s_service_account.clone(),
            trust_domain: cfg.trust_domain.clone(),
        };
        info!(audience = %opts.audience, service_account = ?opts.service_account, "the embedded CA takes ServiceAccount tokens (TokenReview)");
        ca.use_kubernetes(KubeCallers::new(client.clone(), opts));
    }
}

fn start_identity(cfg: &RunConfig) -> anyhow::Result<IdentityParts> {
    use crate::{
        control::ca::{Ca, CaOptions, LocalCa, NodeIdentities, NodeTokens, Signer},
        identity::certs::{CertManager, CertOptions, GrpcCa},
    };
    let opts = CertOptions {
        ttl: cfg.workload_cert_ttl,
        ..CertOptions::default()
    };
    if let Some(addr) = &cfg.ca_address {
        let transport = crate::identity::certs::ca_transport(
            addr,
            cfg.ca_root_cert.as_deref(),
            cfg.ca_server_name.as_deref(),
            cfg.ca_plaintext,
        )?;
        info!(ca = %addr, transport = ?transport, "workload certificates from an external CA");
        // Read again before each request: a projected ServiceAccount token rotates.
        let client = match &cfg.ca_token_file {
            Some(path) => GrpcCa::with_token_file(addr, path, transport)?,
            None => GrpcCa::new(addr, None, transport)?,
        };
        return Ok(IdentityParts {
            certs: Arc::new(CertManager::new(Arc::new(client), opts)),
            endpoint: None,
            nodes: None,
            embedded: None,
        });
    }
    let signer = match &cfg.ca_dir {
        Some(dir) => Signer::load_or_generate(dir, &cfg.trust_domain)?,
        None => Signer::generate(&cfg.trust_domain)?,
    };
    let tokens = cfg
        .ca_node_tokens
        .as_deref()
        .map(NodeTokens::load)
        .transpose()?;
    let (tx, rx) = watch::channel(Arc::new(NodeIdentities::default()));
    let mut ca_opts = CaOptions::new(&cfg.trust_domain);
    ca_opts.default_ttl = cfg.workload_cert_ttl;
    ca_opts.max_ttl = cfg.workload_cert_ttl.max(ca_opts.max_ttl);
    let ca = Arc::new(Ca::new(signer, ca_opts, rx, tokens)?);
    info!(dir = ?cfg.ca_dir, remote_nodes = cfg.ca_node_tokens.is_some(), "embedded CA");
    let local = LocalCa {
        ca: ca.clone(),
        node: cfg.node_name.clone(),
    };
    let certs = CertManager::new(Arc::new(local), opts).with_roots(vec![ca.root().clone()]);
    let endpoint = match cfg.ca_listen {
        Some(listen) => Some(CaEndpoint {
            ca: ca.clone(),
            listen,
            names: ca_endpoint_names(&cfg.ca_server_names, &cfg.node_name, listen)?,
        }),
        None => None,
    };
    Ok(IdentityParts {
        certs: Arc::new(certs),
        endpoint,
        nodes: Some(tx),
        embedded: Some(ca),
    })
}

/// Keeps this node's identities (its enrolled workloads') in the embedded CA's view, and
/// drops the certificates of identities that left the node.
async fn track_identities(
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    node: String,
    nodes: Option<watch::Sender<Arc<crate::control::ca::NodeIdentities>>>,
    certs: Arc<crate::identity::certs::CertManager>,
) {
    loop {
        let ids: std::collections::BTreeSet<crate::identity::SpiffeId> = snaps
            .borrow_and_update()
            .workloads
            .iter()
            .filter(|w| w.enrolled)
            .filter_map(|w| w.identity.as_deref()?.parse().ok())
            .collect();
        if let Some(tx) = &nodes {
            tx.send_if_modified(|view| {
                if view.node(&node).cloned().unwrap_or_default() == ids {
                    return false;
                }
                let mut next = (**view).clone();
                next.set_node(node.clone(), ids.clone());
                *view = Arc::new(next);
                true
            });
        }
        certs.retain(&ids);
        if snaps.changed().await.is_err() {
            return;
        }
    }
}

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
    admin::{Admin, Readiness},
    bpf::{self, Datapath, LoadOptions},
    config::{MeshFile, RunArgs, Source},
    k8s,
    metrics::Metrics,
    proxy::Outbound,
    sys,
    workload::{self, MapSyncer, Registry, Snapshot},
    xds::{
        client::{ClientOptions, XdsClient},
        server::AdsServer,
        translate,
    },
};

const READY_BPF: &str = "bpf attached";
const READY_MAPS: &str = "enrolment synced";
const READY_PROXY: &str = "proxy listening";
const READY_XDS: &str = "xds stream open";
const READY_K8S: &str = "kubernetes synced";

/// The embedded control plane's resources for a snapshot (services unchanged since the
/// last call reuse their resources).
fn xds_resources(
    translator: &mut translate::Translator,
    snap: &Snapshot,
) -> Vec<(String, envoy_types::pb::google::protobuf::Any)> {
    translator.resources(&snap.services, &snap.declared)
}

pub fn run(args: Box<RunArgs>) -> anyhow::Result<()> {
    // Everything that can be wrong with the input is reported before touching the kernel;
    // lacking privileges first of all (it also decides whether the file can be read).
    bpf::require_root()?;
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
    let redirect = args.redirect_target()?;
    let file = args.source_file()?;
    let cgroup = bpf::preflight(&args.pin_path, args.cgroup.as_deref())?;
    let config_json = serde_json::to_string_pretty(&args).unwrap_or_default();
    info!(config = %config_json.replace('\n', ""), "starting");

    // The node lock is taken first, so a second agent is told so before anything else.
    let datapath = Datapath::load(&LoadOptions {
        pin_path: &args.pin_path,
        cgroup: &cgroup,
        redirect,
        skmsg: args.skmsg,
        queue_floor: args.skmsg_queue_floor,
    })?;
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin_listener = control
        .block_on(tokio::net::TcpListener::bind(args.admin_address))
        .with_context(|| format!("binding the admin endpoint on {}", args.admin_address))?;
    let kubernetes = args.source == Source::Kubernetes;
    let mut guards = vec![READY_BPF, READY_MAPS, READY_PROXY, READY_XDS];
    if kubernetes {
        guards.push(READY_K8S);
    }
    let readiness = Readiness::new(&guards);
    readiness.set(READY_BPF);
    // Maps are shared with the proxy thread; the Datapath (links, pins) stays here and is
    // dropped last.
    let maps = datapath.maps.clone();
    let metrics = Arc::new(Metrics::default());
    let registry = Arc::new(std::sync::RwLock::new(Registry::default()));

    // With the Kubernetes source, the first snapshot (excludes only) is replaced once every
    // kind is listed; the API server is asked once now so a wrong address fails at start.
    let k8s_client = if kubernetes {
        Some(
            control
                .block_on(k8s::client(args.kubeconfig.as_deref()))
                .context("connecting to the Kubernetes API server (--source kubernetes)")?,
        )
    } else {
        None
    };
    let k8s_stats = Arc::new(k8s::Stats::default());
    let snapshot = Snapshot::from_file(&file);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot));
    let mut syncer = MapSyncer::new(maps.clone(), registry.clone());
    apply_snapshot(&mut syncer, &metrics, &snap_rx.borrow())
        .context("writing the enrolment maps")?;
    readiness.set(READY_MAPS);

    // xDS: the embedded control plane (unless an external one is named) and the proxy's
    // client, both on this (control) runtime; the proxy reads the config it publishes.
    let mut translator = translate::Translator::default();
    let (xds_tx, xds_rx) = watch::channel(Arc::new(
        crate::xds::server::Snapshot::default()
            .next(xds_resources(&mut translator, &snap_rx.borrow())),
    ));
    let ads = match &args.xds_address {
        Some(_) => None,
        None => {
            let l = control
                .block_on(tokio::net::TcpListener::bind(args.xds_listen))
                .with_context(|| {
                    format!(
                        "binding the embedded control plane on {} (--xds-listen)",
                        args.xds_listen
                    )
                })?;
            Some((l, AdsServer::new(xds_rx)))
        }
    };
    let xds_url = match (&args.xds_address, &ads) {
        (Some(a), _) => a.clone(),
        (None, Some((l, _))) => format!("http://{}", l.local_addr()?),
        (None, None) => unreachable!("the embedded server is bound when no address is given"),
    };
    let node_id = args.node_name.clone().unwrap_or_else(hostname);
    let xds = XdsClient::new(ClientOptions {
        address: xds_url,
        node_id,
        cluster: "mesh-agent".into(),
        mode: args.xds_mode,
        on_demand: args.xds_on_demand,
        on_demand_timeout: Duration::from_millis(args.xds_on_demand_timeout_ms),
    });

    // The proxy runtime.
    let (stop_tx, stop_rx) = watch::channel(false);
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mesh-proxy")
        .enable_all()
        .build()?;
    let outbound = Arc::new(proxy_rt.block_on(Outbound::bind(
        args.proxy_address.into(),
        maps.clone(),
        metrics.clone(),
        registry.clone(),
        xds.clone(),
    ))?);
    if args.skmsg_upstream {
        outbound.pair_upstream_from(*redirect.ip());
    }
    let drain = outbound.drain.clone();
    proxy_rt.spawn(
        outbound
            .serve(stop_rx)
            .instrument(tracing::info_span!("outbound")),
    );
    maps.set_config(|c| c.flags |= cfg_flags::PROXY_READY)
        .context("marking the proxy ready")?;
    readiness.set(READY_PROXY);

    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        maps: maps.clone(),
        readiness: readiness.clone(),
        config_json,
        snapshot: snap_rx.clone(),
        xds: xds.clone(),
        ads_stats: ads.as_ref().map(|(_, s)| s.stats.clone()),
        k8s: kubernetes.then(|| k8s_stats.clone()),
    });

    control.block_on(async {
        if let Some((listener, server)) = ads {
            info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "embedded control plane serving ADS");
            tokio::spawn(
                async move {
                    let r = tonic::transport::Server::builder()
                        .add_service(server.into_service())
                        .serve_with_incoming(ads_incoming(listener))
                        .await;
                    if let Err(e) = r {
                        error!(error = %e, "the embedded control plane stopped");
                    }
                }
                .instrument(tracing::info_span!("ads_server")),
            );
        }
        tokio::spawn(xds.clone().run().instrument(tracing::info_span!("xds_client")));
        {
            let xds = xds.clone();
            let readiness = readiness.clone();
            tokio::spawn(
                async move {
                    let mut cfg = xds.config();
                    while !xds.connected() {
                        let _ = tokio::time::timeout(Duration::from_millis(50), cfg.changed()).await;
                    }
                    readiness.set(READY_XDS);
                }
                .instrument(tracing::info_span!("xds_ready")),
            );
        }
        tokio::spawn(
            admin
                .serve(admin_listener)
                .instrument(tracing::info_span!("admin")),
        );
        match (k8s_client, &args.config) {
            (Some(client), _) => {
                let readiness = readiness.clone();
                let opts = k8s::Options {
                    node_name: args.node_name.clone(),
                    trust_domain: args.trust_domain.clone(),
                    excludes: file.exclude.clone(),
                    locator: k8s::PodLocator::new(
                        args.kubepods_cgroup.clone(),
                        &bpf::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()),
                        "/proc".into(),
                    ),
                };
                info!(roots = ?opts.locator.roots(), node = ?opts.node_name, "enrolment from the Kubernetes API");
                tokio::spawn(
                    k8s::run(client, opts, snap_tx, k8s_stats.clone(), move || {
                        readiness.set(READY_K8S)
                    })
                    .instrument(tracing::info_span!("kubernetes")),
                );
            }
            (None, Some(path)) => {
                tokio::spawn(
                    workload::watch_file(
                        path.clone(),
                        Duration::from_millis(args.reload_interval_ms),
                        snap_tx,
                    )
                    .instrument(tracing::info_span!("enrolment")),
                );
            }
            (None, None) => unreachable!("source_file() requires --config for the file source"),
        }
        let mut rx = snap_rx.clone();
        let sync = async {
            while rx.changed().await.is_ok() {
                let snap = rx.borrow_and_update().clone();
                if let Err(e) = apply_snapshot(&mut syncer, &metrics, &snap) {
                    error!(error = %e, "writing the enrolment maps failed");
                }
                publish_resources(&xds_tx, &mut translator, &snap);
            }
        }
        .instrument(tracing::info_span!("map_sync"));
        info!(pin_path = %datapath.pin_path().display(), "mesh-agent running");
        // Loading and verifying the programs allocated a lot that is free now.
        sys::release_free_heap();
        tokio::select! {
            _ = sync => {}
            s = shutdown_signal() => info!(signal = s, "shutting down"),
        }
    });

    // New connections go direct from here on; established ones may finish.
    if let Err(e) = maps.set_config(|c| c.flags &= !cfg_flags::PROXY_READY) {
        warn!(error = %e, "could not clear the proxy-ready flag");
    }
    let _ = stop_tx.send(true);
    let left = proxy_rt.block_on(drain.wait(Duration::from_millis(args.drain_ms)));
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed; closing the remaining proxied connections"
        );
    }
    proxy_rt.shutdown_timeout(Duration::from_millis(200));
    drop(maps);
    drop(datapath);
    info!("programs detached, pins removed");
    Ok(())
}

/// Writes a snapshot to the maps and updates the enrolment gauges.
fn apply_snapshot(
    syncer: &mut MapSyncer,
    metrics: &Metrics,
    snap: &Snapshot,
) -> Result<(), aya::maps::MapError> {
    let r = syncer.apply(snap);
    let enrolled = snap.workloads.iter().filter(|w| w.enrolled).count() as u64;
    metrics.enrolled_workloads.store(enrolled, Relaxed);
    metrics
        .unresolved_workloads
        .store(syncer.unresolved as u64, Relaxed);
    r
}

/// The ADS server's connections, with `TCP_NODELAY`: small gRPC frames (an ACK, a one
/// resource update) otherwise wait for the peer's delayed ACK (40 ms seen).
fn ads_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Rebuilds the control plane's snapshot from a new standalone snapshot; clients are
/// woken only when a resource changed.
fn publish_resources(
    tx: &watch::Sender<Arc<crate::xds::server::Snapshot>>,
    translator: &mut translate::Translator,
    snap: &Snapshot,
) {
    let resources = xds_resources(translator, snap);
    tx.send_if_modified(|cur| {
        let next = cur.next(resources);
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
        let mut translator = translate::Translator::default();
        let (xds_tx, xds_rx) = watch::channel(Arc::new(
            crate::xds::server::Snapshot::default().next(xds_resources(&mut translator, &snap)),
        ));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding the control plane on {} (--listen)", args.listen))?;
        let server = AdsServer::new(xds_rx);
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
                let opts = k8s::Options {
                    node_name: None,
                    trust_domain: crate::config::DEFAULT_TRUST_DOMAIN.into(),
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
                    workload::watch_file(
                        path.clone(),
                        Duration::from_millis(args.reload_interval_ms),
                        snap_tx,
                    )
                    .instrument(tracing::info_span!("standalone_file")),
                );
            }
            (Source::File, None) => unreachable!("checked above"),
        }
        tokio::spawn(
            async move {
                while snap_rx.changed().await.is_ok() {
                    let snap = snap_rx.borrow_and_update().clone();
                    publish_resources(&xds_tx, &mut translator, &snap);
                }
            }
            .instrument(tracing::info_span!("translate")),
        );
        info!(addr = %args.listen, "control plane serving ADS");
        tokio::select! {
            r = tonic::transport::Server::builder()
                .add_service(server.into_service())
                .serve_with_incoming(ads_incoming(listener)) => {
                r.context("serving ADS")?;
            }
            s = shutdown_signal() => info!(signal = s, "shutting down"),
        }
        Ok(())
    })
}

/// `mesh-agent xds-watch`: print every verdict of a wildcard client as a JSON line.
pub fn xds_watch(args: crate::cli::XdsWatchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = XdsClient::new(ClientOptions {
            address: args.xds_address.clone(),
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "mesh-agent".into())
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

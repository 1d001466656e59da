//! `/inspect/pod/NAMESPACE/NAME` and `/inspect/service/NAMESPACE/NAME`: one object end to
//! end, joined from what the admin endpoint already sees, so an operator does not join
//! `/workloads`, `dump WORKLOADS`, `dump FLOWS`, `/certs`, `/config_dump` and `/metrics`
//! by eye (`mesh-agent inspect pod|service`, which renders it as text).
//!
//! - a pod: its enrolment and mode (the snapshot in force), its netns cookie and
//!   `WORKLOADS` entry, its identity and certificate, its live connections from `FLOWS`
//!   (with their path, from the pairing in `SOCKHASH` and `FALLBACK`), the listeners,
//!   routes and clusters they reach, the clusters it is an endpoint of, the policies that
//!   apply to it, and its metric samples;
//! - a service: its VIP and ports (the control plane's model, when this agent embeds it),
//!   its listeners, routes and clusters in force with their endpoints, the connections to
//!   it, the policies of its endpoints' workloads, and its metric samples.
//!
//! The maps are read from their pins (as the CLI does), never through the handles the
//! proxy looks flows up with: a walk of `FLOWS` (up to 131k entries) must not hold the
//! proxy's lock. Everything listed is bounded (`MAX_CONNECTIONS`, `MAX_METRICS`), with
//! counts of what was left out.

use crate::datapath::flags_text;
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, SockHash};
use mesh_common::{
    flow_flags, inbound, map_names,
    maps::{FlowInfo, SockKey, WorkloadInfo},
    wl_flags,
};
use serde_json::{json, Value};

use super::{Admin, Reply};
use crate::proxy::config::{
    policy::{MeshConfig, Scope},
    workloads::WorkloadInfo as MeshWorkload,
};

/// Connections listed per object (the rest are counted).
pub const MAX_CONNECTIONS: usize = 50;
/// Distinct destinations listed under "reaches".
pub const MAX_DESTINATIONS: usize = 20;
/// Metric samples listed per object (the rest are counted).
pub const MAX_METRICS: usize = 100;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    #[error(
        "no pod {0} on this node nor among the mesh's workloads the proxy knows (see /workloads)"
    )]
    NoPod(String),
    #[error("no service {0} in the enrolment snapshot nor in the proxy's configuration in force (see /config_dump)")]
    NoService(String),
    #[error("usage: /inspect/pod/NAMESPACE/NAME or /inspect/service/NAMESPACE/NAME")]
    Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    Service,
}

/// `pod/NS/NAME` or `service/NS/NAME` (also `svc`, `po`).
pub fn parse_path(rest: &str) -> Result<(Kind, &str, &str), InspectError> {
    let mut it = rest.trim_matches('/').split('/');
    let (Some(kind), Some(ns), Some(name), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(InspectError::Usage);
    };
    let kind = match kind {
        "pod" | "pods" | "po" => Kind::Pod,
        "service" | "services" | "svc" => Kind::Service,
        _ => return Err(InspectError::Usage),
    };
    if ns.is_empty() || name.is_empty() {
        return Err(InspectError::Usage);
    }
    Ok((kind, ns, name))
}

/// An address as the maps hold it (16 bytes, IPv4 v4-mapped) as an `IpAddr`, IPv4 plain.
fn ipa(v: mesh_common::maps::Ip) -> IpAddr {
    mesh_common::maps::ip_addr(v)
}

fn raw(ip: IpAddr) -> mesh_common::maps::Ip {
    mesh_common::maps::ip_from(ip)
}

/// The maps an inspection reads, from their pins.
#[derive(Default)]
struct MapView {
    workloads: Vec<(u64, WorkloadInfo)>,
    flows: Vec<(SockKey, FlowInfo)>,
    sockhash: HashSet<SockKey>,
    fallback: HashSet<SockKey>,
    /// Maps that could not be read, with why.
    errors: Vec<String>,
}

fn open(pin: &Path, name: &str) -> Result<Map, String> {
    let data = MapData::from_pin(pin.join(name)).map_err(|e| format!("{name}: {e}"))?;
    Map::from_map_data(data).map_err(|e| format!("{name}: {e}"))
}

fn hash_entries<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> Result<Vec<(K, V)>, String> {
    let m: BpfHashMap<MapData, K, V> =
        BpfHashMap::try_from(open(pin, name)?).map_err(|e| format!("{name}: {e}"))?;
    // Entries vanish while we walk (closes, LRU eviction): skip those.
    Ok(m.iter().filter_map(Result::ok).collect())
}

impl MapView {
    fn read(pin: &Path) -> MapView {
        let mut v = MapView::default();
        match hash_entries::<u64, WorkloadInfo>(pin, map_names::WORKLOADS) {
            Ok(w) => v.workloads = w,
            Err(e) => v.errors.push(e),
        }
        match hash_entries::<SockKey, FlowInfo>(pin, map_names::FLOWS) {
            Ok(f) => v.flows = f,
            Err(e) => v.errors.push(e),
        }
        // A sender that left the redirect path marks its flow (the per-socket truth is in
        // socket storage, which cannot be listed).
        let fell_back =
            mesh_common::flow_flags::CLIENT_FALLBACK | mesh_common::flow_flags::SERVER_FALLBACK;
        v.fallback = v
            .flows
            .iter()
            .filter(|(_, f)| f.flags & fell_back != 0)
            .map(|(k, _)| *k)
            .collect();
        let sockhash = open(pin, map_names::SOCKHASH).and_then(|m| {
            SockHash::<MapData, SockKey>::try_from(m)
                .map_err(|e| format!("{}: {e}", map_names::SOCKHASH))
        });
        match sockhash {
            Ok(m) => v.sockhash = m.keys().filter_map(Result::ok).collect(),
            Err(e) => v.errors.push(e),
        }
        v
    }
}

/// How a flow's bytes go, from its `FLOWS` flags and pairing: `direct` (pod to pod, no
/// proxy), `tunnel` (through the proxy, then HBONE to another node), `proxied+sk_msg`
/// (through the proxy, the app leg socket to socket in the kernel), `proxied` (through
/// the proxy over loopback TCP: not paired, or fallen back to TCP).
pub fn flow_path(flow_flags_v: u32, paired: bool, fallback: bool, tunnel: bool) -> &'static str {
    if flow_flags_v & flow_flags::DIRECT != 0 {
        "direct"
    } else if tunnel {
        "tunnel"
    } else if paired && !fallback {
        "proxied+sk_msg"
    } else {
        "proxied"
    }
}

/// The metric samples that name a workload (`ns/name`, or Istio's name and namespace
/// label pair) or a service (`name.ns` in a service or cluster label); at most
/// `MAX_METRICS`, and how many more there were.
pub fn metric_samples(text: &str, matches: impl Fn(&str) -> bool) -> (Vec<String>, usize) {
    let all: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
        .filter(|l| matches(l))
        .collect();
    let more = all.len().saturating_sub(MAX_METRICS);
    (
        all.into_iter()
            .take(MAX_METRICS)
            .map(str::to_owned)
            .collect(),
        more,
    )
}

fn names_workload(line: &str, ns: &str, name: &str) -> bool {
    line.contains(&format!("=\"{ns}/{name}\""))
        || ["source", "destination"].iter().any(|side| {
            line.contains(&format!("{side}_workload=\"{name}\""))
                && line.contains(&format!("{side}_workload_namespace=\"{ns}\""))
        })
}

fn names_service(line: &str, ns: &str, name: &str, vip: Option<Ipv4Addr>) -> bool {
    let host = format!("{name}.{ns}");
    // L4 series name the address dialled: the VIP.
    vip.is_some_and(|vip| line.contains(&format!("=\"{vip}:")))
        || line.contains(&format!("=\"{ns}/{name}\""))
        || line.contains(&format!("||{host}\""))
        || line.contains(&format!("||{host}."))
        || line.contains(&format!("\"{host}\""))
        || line.contains(&format!("\"{host}:"))
        || line.contains(&format!("\"{host}.svc"))
}

/// The clusters a listener (as `/config_dump` shows it) sends to.
fn listener_clusters(l: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(c) = l["tcp_proxy"]["cluster"].as_str() {
        out.insert(c.to_owned());
    }
    if let Some(c) = l["tcp_fallback"].as_str() {
        out.insert(c.to_owned());
    }
    for vh in l["http"]["route_config"]["virtual_hosts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for r in vh["routes"].as_array().into_iter().flatten() {
            for c in r["action"]["clusters"].as_array().into_iter().flatten() {
                if let Some(n) = c["name"].as_str() {
                    out.insert(n.to_owned());
                }
            }
        }
    }
    out
}

/// A listener in short: name, address, kind, route configuration, routes and clusters.
fn listener_summary(l: &Value) -> Value {
    let routes: Vec<Value> = l["http"]["route_config"]["virtual_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|vh| {
            vh["routes"].as_array().into_iter().flatten().map(move |r| {
                json!({
                    "virtual_host": vh["name"],
                    "name": r["name"],
                    "match": r["match"]["path"],
                    "clusters": r["action"]["clusters"].as_array().map(|cs| {
                        cs.iter().map(|c| json!({"name": c["name"], "weight": c["weight"]})).collect::<Vec<_>>()
                    }),
                    "direct_response": r["action"]["direct_response"],
                    "redirect": r["action"]["redirect"],
                })
            })
        })
        .collect();
    json!({
        "name": l["name"],
        "address": l["address"],
        "kind": if l.get("http").is_some() { "http" } else { "tcp" },
        "route_config": l["http"]["route_config"]["name"],
        "routes": routes,
        "clusters": listener_clusters(l),
    })
}

/// The policies that apply to `w`: mesh-wide ones, its namespace's, and the
/// selector-based ones it names (as `proxy::authz` evaluates them), with the mTLS mode in
/// force at the workload level.
fn policies_for(mesh: &MeshConfig, w: &MeshWorkload) -> Value {
    let p = &mesh.policies;
    let authz: Vec<Value> = p
        .authorizations
        .values()
        .filter(|a| match a.scope {
            Scope::Global => true,
            Scope::Namespace => a.namespace == w.namespace,
            Scope::WorkloadSelector => w.authorization_policies.iter().any(|k| **k == *a.key),
        })
        .map(|a| {
            json!({
                "name": &*a.key,
                "action": a.action,
                "scope": a.scope,
                "rules": a.rules.len(),
                "l7": a.rules.iter().any(|r| r.has_l7),
            })
        })
        .collect();
    let peer: Vec<Value> = p
        .peer_authentications
        .values()
        .filter(|a| match a.scope {
            Scope::Global => true,
            Scope::Namespace => a.namespace == w.namespace,
            Scope::WorkloadSelector => w.peer_authentications.iter().any(|k| **k == *a.key),
        })
        .map(|a| json!({"name": &*a.key, "scope": a.scope, "mode": a.mode, "port_level": a.port_level}))
        .collect();
    let mtls = crate::proxy::authz::mtls_mode(p, w, 0);
    json!({
        "authorization": authz,
        "peer_authentication": peer,
        "mtls": format!("{mtls:?}").to_uppercase(),
    })
}

/// What the datapath and the configuration say about one connection in `FLOWS`.
struct Names<'a> {
    snap: &'a crate::enrol::Snapshot,
    mesh: &'a MeshConfig,
}

impl Names<'_> {
    /// `ns/name` of the local workload, mesh workload or service VIP at `ip`.
    fn at(&self, ip: IpAddr) -> Option<String> {
        let local = |w: &&crate::enrol::Workload| {
            IpAddr::V4(w.ip) == ip || w.ip6.map(IpAddr::V6) == Some(ip)
        };
        if let Some(w) = self.snap.workloads.iter().find(local) {
            return Some(format!("{}/{}", w.namespace, w.name));
        }
        if let Some(w) = self.mesh.workloads.by_ip(ip) {
            return Some(format!("{}/{}", w.namespace, w.name));
        }
        self.snap
            .services
            .iter()
            .find(|s| IpAddr::V4(s.vip) == ip || s.vip6.map(IpAddr::V6) == Some(ip))
            .map(|s| format!("service {}/{}", s.namespace, s.name))
    }

    /// A mesh workload of another node that takes HBONE: the proxy tunnels to it.
    fn tunnelled(&self, ip: IpAddr, local_node: &str) -> bool {
        if self
            .snap
            .workloads
            .iter()
            .any(|w| IpAddr::V4(w.ip) == ip || w.ip6.map(IpAddr::V6) == Some(ip))
        {
            return false;
        }
        self.mesh
            .workloads
            .by_ip(ip)
            .is_some_and(|w| w.hbone && (local_node.is_empty() || w.node != local_node))
    }
}

/// The `FLOWS` entries that involve `pick` (by the flow key and original destination),
/// described, sorted and bounded.
fn connections(
    maps: &MapView,
    names: &Names<'_>,
    local_node: &str,
    pick: impl Fn(&SockKey, &FlowInfo) -> Option<&'static str>,
) -> Value {
    let mut rows: Vec<(String, Value)> = Vec::new();
    let mut total = 0usize;
    for (k, v) in &maps.flows {
        let Some(role) = pick(k, v) else { continue };
        total += 1;
        let (local, remote) = (k.local(), k.remote());
        let orig = v.orig_dst();
        // The `FLOWS` key is the accepting side's namespace and the client's view: the
        // client's socket is in `SOCKHASH` under its own namespace (the flow's `netns`),
        // the accepting one under the key's, with its own (reversed) view.
        let own = maps.sockhash.contains(&k.in_netns(v.netns));
        let peer = maps.sockhash.contains(&k.reversed());
        let fallback = maps.fallback.contains(k);
        let upstream = v.flags & flow_flags::UPSTREAM != 0;
        let tunnel = !upstream && names.tunnelled(orig.ip(), local_node);
        let path = flow_path(v.flags, own && peer, fallback, tunnel);
        let row = json!({
            "role": role,
            "local": local.to_string(),
            "remote": remote.to_string(),
            "original_destination": orig.to_string(),
            "source": if upstream { Some("node proxy".to_owned()) } else { names.at(local.ip()) },
            "destination": names.at(orig.ip()),
            "netns_cookie": k.netns,
            "path": path,
            "flags": flags_text(v.flags, &flow_flags::NAMES),
            "sockhash": {"own": own, "peer": peer},
            "fallback": fallback,
        });
        rows.push((format!("{role} {orig} {local}"), row));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let listed: Vec<Value> = rows
        .into_iter()
        .take(MAX_CONNECTIONS)
        .map(|(_, r)| r)
        .collect();
    json!({"total": total, "listed": listed.len(), "items": listed})
}

impl Admin {
    /// `/inspect/...`: 200 with JSON, 404 for an unknown object, 400 for a malformed path.
    pub(super) fn inspect(&self, rest: &str) -> Reply {
        let out = parse_path(rest).and_then(|(kind, ns, name)| match kind {
            Kind::Pod => self.inspect_pod(ns, name),
            Kind::Service => self.inspect_service(ns, name),
        });
        match out {
            Ok(v) => (
                "200 OK",
                "application/json",
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            ),
            Err(e @ InspectError::Usage) => ("400 Bad Request", "text/plain", format!("{e}\n")),
            Err(e) => ("404 Not Found", "text/plain", format!("{e}\n")),
        }
    }

    /// This agent's node name (empty when the configuration does not say).
    fn node_name(&self) -> String {
        serde_json::from_str::<Value>(&self.config_json)
            .ok()
            .and_then(|c| c["node_name"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn metrics_text(&self) -> String {
        self.route("/metrics").2
    }

    fn inspect_pod(&self, ns: &str, name: &str) -> Result<Value, InspectError> {
        let snap = self.snapshot.borrow().clone();
        let mesh = self.xds.mesh_now();
        let local = snap
            .workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name);
        let meshw = mesh
            .workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
            .cloned();
        if local.is_none() && meshw.is_none() {
            return Err(InspectError::NoPod(format!("{ns}/{name}")));
        }
        let ip = match (local, &meshw) {
            (Some(w), _) => Some(w.ip),
            (None, Some(m)) => m.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            }),
            (None, None) => None,
        };
        let node = self.node_name();
        let maps = MapView::read(&self.pin_path);
        let names = Names {
            snap: &snap,
            mesh: &mesh,
        };

        let enrolment = match local {
            Some(w) => {
                let mode = if w.bypass {
                    "bypass"
                } else if w.enrolled {
                    "captured"
                } else if w.direct {
                    "direct"
                } else {
                    "not enrolled"
                };
                json!({
                    "on_this_node": true,
                    "mode": mode,
                    "enrolled": w.enrolled,
                    "direct": w.direct,
                    "bypass": w.bypass,
                    "fail_mode": if w.fail_closed { "closed" } else { "open" },
                    "netns": w.netns.display().to_string(),
                    "unresolved": w.unresolved,
                })
            }
            None => json!({
                "on_this_node": false,
                "mode": "elsewhere",
                "node": meshw.as_ref().map(|m| m.node.clone()),
            }),
        };

        let mut datapath = json!({});
        if let Some(ip) = ip {
            let raw = raw(IpAddr::V4(ip));
            let entry = maps.workloads.iter().find(|(_, v)| v.ip4 == raw);
            datapath["netns_cookie"] = json!(entry.map(|(k, _)| *k));
            datapath["workloads_entry"] = json!(entry.map(|(_, v)| json!({
                "ip": ipa(v.ip4).to_string(),
                "ip6": (v.ip6 != [0; 4]).then(|| ipa(v.ip6).to_string()),
                "id": v.id,
                "flags": flags_text(v.flags, &wl_flags::NAMES),
            })));
            if let Ok(d) = self.maps.dests.lock() {
                datapath["dests_entry"] = json!(d.get(&raw, 0).ok().map(|v| json!({
                    "id": v.id,
                    "flags": flags_text(v.flags, &wl_flags::NAMES),
                    "netns_cookie": v.netns,
                })));
            }
            datapath["inbound_entry"] = json!(self
                .maps
                .inbound_entries()
                .into_iter()
                .find(|(a, _)| *a == ip)
                .map(|(_, f)| json!({"flags": flags_text(f, &inbound::NAMES)})));
        }
        if !maps.errors.is_empty() {
            datapath["errors"] = json!(maps.errors);
        }

        let spiffe = local
            .and_then(|w| w.identity.clone())
            .or_else(|| meshw.as_ref().map(|m| m.identity.to_string()));
        let cert = spiffe.as_ref().and_then(|id| {
            self.certs
                .as_ref()?
                .snapshot()
                .into_iter()
                .find(|c| &c.identity == id)
                .map(|c| {
                    json!({
                        "serial": c.serial,
                        "not_before": c.not_before,
                        "not_after": c.not_after,
                        "expires_in_s": c.expires_in_s,
                        "refresh_at": c.refresh_at,
                    })
                })
        });
        let identity = json!({
            "spiffe_id": spiffe,
            "certificate": cert,
            "mesh_workload": meshw.as_ref().map(|m| json!({
                "uid": m.uid, "node": m.node, "hbone": m.hbone,
            })),
        });

        let conns = match ip {
            Some(ip) => {
                let v4 = raw(IpAddr::V4(ip));
                let v6 = local.and_then(|w| w.ip6).map(|a| raw(IpAddr::V6(a)));
                let mine = move |a: &mesh_common::maps::Ip| *a == v4 || Some(*a) == v6;
                connections(&maps, &names, &node, |k, v| {
                    if mine(&k.local_ip) && v.flags & flow_flags::UPSTREAM == 0 {
                        Some("client")
                    } else if mine(&k.remote_ip) || mine(&v.orig_ip) {
                        Some("server")
                    } else {
                        None
                    }
                })
            }
            None => json!({"total": 0, "listed": 0, "items": []}),
        };

        // What its outbound connections reach: the listener in force at each original
        // destination (or none: relayed to the address as it is).
        let dump = self.l7.config_dump();
        let listeners: Vec<&Value> = dump["listeners"].as_array().into_iter().flatten().collect();
        // Destination -> whether its connections go direct (pod to pod, no proxy).
        let dests: BTreeMap<String, bool> = conns["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["role"] == "client")
            .filter_map(|c| {
                let d = c["original_destination"].as_str()?.to_owned();
                Some((d, c["path"] == "direct"))
            })
            .collect();
        let reaches: Vec<Value> = dests
            .iter()
            .take(MAX_DESTINATIONS)
            .map(|(d, direct)| {
                let dst = d.parse::<SocketAddr>().ok().and_then(|a| match a.ip() {
                    IpAddr::V4(v) => Some(v),
                    IpAddr::V6(_) => None,
                });
                let listener = listeners
                    .iter()
                    .find(|l| l["address"].as_str() == Some(d.as_str()))
                    .filter(|_| !direct)
                    .map(|l| listener_summary(l));
                json!({
                    "destination": d,
                    "name": dst.and_then(|i| names.at(IpAddr::V4(i))),
                    "direct": direct,
                    "listener": listener,
                })
            })
            .collect();

        // The clusters this pod is an endpoint of, and the listeners on its own address.
        let endpoint_of: Vec<Value> = match ip {
            Some(ip) => dump["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let eps: Vec<&Value> = c["endpoints"]
                        .as_array()?
                        .iter()
                        .filter(|e| {
                            e["address"]
                                .as_str()
                                .and_then(|a| a.parse::<SocketAddr>().ok())
                                .is_some_and(|a| a.ip() == IpAddr::V4(ip))
                        })
                        .collect();
                    (!eps.is_empty()).then(|| json!({"cluster": c["name"], "endpoints": eps}))
                })
                .collect(),
            None => Vec::new(),
        };
        let own_listeners: Vec<Value> = match ip {
            Some(ip) => listeners
                .iter()
                .filter(|l| {
                    l["address"]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .is_some_and(|a| a.ip() == IpAddr::V4(ip))
                })
                .map(|l| listener_summary(l))
                .collect(),
            None => Vec::new(),
        };
        let services: Vec<String> = match ip {
            Some(ip) => selecting_services(&snap, ns, name, ip),
            None => Vec::new(),
        };

        let policies = match &meshw {
            Some(w) => policies_for(&mesh, w),
            None => {
                json!({"note": "the proxy has no workload resource for this pod yet: no policy is known to apply"})
            }
        };
        let (samples, more) = metric_samples(&self.metrics_text(), |l| names_workload(l, ns, name));

        Ok(json!({
            "kind": "pod",
            "namespace": ns,
            "name": name,
            "ip": ip.map(|i| i.to_string()),
            "node": node,
            "enrolment": enrolment,
            "datapath": datapath,
            "identity": identity,
            "connections": conns,
            "reaches": reaches,
            "services": services,
            "endpoint_of": endpoint_of,
            "listeners": own_listeners,
            "policies": policies,
            "metrics": {"samples": samples, "more": more},
        }))
    }

    fn inspect_service(&self, ns: &str, name: &str) -> Result<Value, InspectError> {
        let snap = self.snapshot.borrow().clone();
        let mesh = self.xds.mesh_now();
        let spec = snap
            .services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .cloned();
        let dump = self.l7.config_dump();
        let host = format!("{name}.{ns}");
        // Envoy's (and Istio's) cluster names: `outbound|PORT|SUBSET|HOST`.
        let own_cluster = |c: &str| {
            c.split('|')
                .nth(3)
                .is_some_and(|h| h == host || h.starts_with(&format!("{host}.")))
        };
        let all_listeners: Vec<&Value> =
            dump["listeners"].as_array().into_iter().flatten().collect();
        let listeners: Vec<&Value> = all_listeners
            .iter()
            .copied()
            .filter(|l| {
                let at_vip = spec.as_ref().is_some_and(|s| {
                    l["address"]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .is_some_and(|a| {
                            a.ip() == IpAddr::V4(s.vip) || s.vip6.map(IpAddr::V6) == Some(a.ip())
                        })
                });
                at_vip || listener_clusters(l).iter().any(|c| own_cluster(c))
            })
            .collect();
        let mut wanted: BTreeSet<String> = listeners
            .iter()
            .flat_map(|l| listener_clusters(l))
            .collect();
        let clusters: Vec<Value> = dump["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|n| own_cluster(n) || wanted.contains(n))
            })
            .map(|c| {
                let mut c = c.clone();
                for e in c["endpoints"].as_array_mut().into_iter().flatten() {
                    let ip = e["address"]
                        .as_str()
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .and_then(|a| match a.ip() {
                            IpAddr::V4(v) => Some(v),
                            IpAddr::V6(_) => None,
                        });
                    let who = ip.and_then(|i| {
                        Names {
                            snap: &snap,
                            mesh: &mesh,
                        }
                        .at(IpAddr::V4(i))
                    });
                    e["workload"] = json!(who);
                }
                c
            })
            .collect();
        if spec.is_none() && listeners.is_empty() && clusters.is_empty() {
            return Err(InspectError::NoService(format!("{ns}/{name}")));
        }
        for c in &clusters {
            if let Some(n) = c["name"].as_str() {
                wanted.remove(n);
            }
        }

        // Ports declared but without a listener in force: subscribed on demand.
        let mut ports = Vec::new();
        if let Some(s) = &spec {
            for p in &s.ports {
                let addr = SocketAddr::from((s.vip, p.port)).to_string();
                let in_force = listeners
                    .iter()
                    .any(|l| l["address"].as_str() == Some(addr.as_str()));
                ports.push(json!({
                    "port": p.port,
                    "target_port": p.target_port.unwrap_or(p.port),
                    "protocol": p.protocol,
                    "listener_in_force": in_force,
                }));
            }
        }
        let declared = spec
            .as_ref()
            .map(|s| {
                let explicit = s.endpoints.iter().map(|e| (e.ip, e.port, e.health.clone()));
                declared_endpoints(&snap, &s.namespace, &s.selector, explicit)
            })
            .unwrap_or_default();

        // Connections whose original destination is the VIP.
        let node = self.node_name();
        let maps = MapView::read(&self.pin_path);
        let names = Names {
            snap: &snap,
            mesh: &mesh,
        };
        let conns = match &spec {
            Some(s) => {
                let vip = raw(IpAddr::V4(s.vip));
                let vip6 = s.vip6.map(|ip| raw(IpAddr::V6(ip)));
                connections(&maps, &names, &node, |_, v| {
                    (v.orig_ip == vip || Some(v.orig_ip) == vip6).then_some("client")
                })
            }
            None => json!({"total": 0, "listed": 0, "items": []}),
        };

        // The policies of the workloads behind it (they are judged at the destination).
        let mut policies = BTreeMap::new();
        let mut endpoint_ips: BTreeSet<IpAddr> = clusters
            .iter()
            .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| {
                e["address"]
                    .as_str()?
                    .parse::<SocketAddr>()
                    .ok()
                    .map(|a| a.ip())
            })
            .collect();
        endpoint_ips.extend(
            declared
                .iter()
                .filter_map(|e| e["ip"].as_str()?.parse::<IpAddr>().ok()),
        );
        for ip in endpoint_ips {
            if let Some(w) = mesh.workloads.by_ip(ip) {
                policies.insert(
                    format!("{}/{}", w.namespace, w.name),
                    policies_for(&mesh, w),
                );
            }
        }
        let (samples, more) = metric_samples(&self.metrics_text(), |l| {
            names_service(l, ns, name, spec.as_ref().map(|s| s.vip))
        });

        Ok(json!({
            "kind": "service",
            "namespace": ns,
            "name": name,
            "vip": spec.as_ref().map(|s| s.vip.to_string()),
            "vip6": spec.as_ref().and_then(|s| s.vip6).map(|ip| ip.to_string()),
            "ports": ports,
            "selector": spec.as_ref().map(|s| json!(s.selector)),
            "declared_endpoints": declared,
            "listeners": listeners.iter().map(|l| listener_summary(l)).collect::<Vec<_>>(),
            "clusters": clusters,
            "clusters_not_in_force": wanted,
            "connections": conns,
            "policies": policies,
            "metrics": {"samples": samples, "more": more},
        }))
    }
}

/// Services of the snapshot that have the workload at `ip` as an endpoint: by selector
/// (its labels as declared) or by an explicit endpoint address.
fn selecting_services(
    snap: &crate::enrol::Snapshot,
    ns: &str,
    name: &str,
    ip: Ipv4Addr,
) -> Vec<String> {
    let member = snap
        .declared
        .iter()
        .find(|m| m.namespace == ns && m.name == name);
    snap.services
        .iter()
        .filter(|s| {
            let by_selector = member.is_some_and(|m| {
                s.namespace == m.namespace
                    && !s.selector.is_empty()
                    && s.selector.iter().all(|(k, v)| m.labels.get(k) == Some(v))
            });
            by_selector || s.endpoints.iter().any(|e| e.ip == IpAddr::V4(ip))
        })
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

/// A service's endpoints in the control plane's model: the workloads its selector picks,
/// and explicit addresses.
/// (The service is passed as its parts: its type is the control plane's model, which the
/// admin module reads through the snapshot but does not name.)
fn declared_endpoints(
    snap: &crate::enrol::Snapshot,
    namespace: &str,
    selector: &BTreeMap<String, String>,
    explicit: impl Iterator<Item = (IpAddr, Option<u16>, Option<String>)>,
) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    if !selector.is_empty() {
        for m in snap.declared.iter().filter(|m| {
            m.namespace == namespace && selector.iter().all(|(k, v)| m.labels.get(k) == Some(v))
        }) {
            out.push(json!({"ip": m.ip.to_string(), "workload": format!("{}/{}", m.namespace, m.name), "node": m.node}));
        }
    }
    for (ip, port, health) in explicit {
        out.push(json!({"ip": ip.to_string(), "port": port, "health": health}));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Text rendering (`mesh-agent inspect`, without `-o json`).

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Rows as aligned columns, each line indented by `indent`.
fn table(out: &mut String, indent: &str, cols: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..cols.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([cols[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        let l: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        format!("{indent}{}\n", l.join("  ").trim_end())
    };
    out.push_str(&line(cols.iter().map(|c| c.to_uppercase()).collect()));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
}

fn render_connections(out: &mut String, c: &Value) {
    let _ = writeln!(
        out,
        "\nconnections ({} listed of {} in FLOWS)",
        s(&c["listed"]),
        s(&c["total"])
    );
    let rows: Vec<Vec<String>> = c["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                s(&r["role"]),
                s(&r["local"]),
                s(&r["remote"]),
                s(&r["original_destination"]),
                match r["role"].as_str() {
                    Some("client") => s(&r["destination"]),
                    _ => s(&r["source"]),
                },
                s(&r["path"]),
                s(&r["flags"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("  none\n");
    } else {
        table(
            out,
            "  ",
            &[
                "role",
                "local",
                "remote",
                "original_dst",
                "peer",
                "path",
                "flags",
            ],
            &rows,
        );
    }
}

fn render_listener(out: &mut String, indent: &str, l: &Value) {
    let _ = writeln!(
        out,
        "{indent}listener {} ({}{})",
        s(&l["name"]),
        s(&l["kind"]),
        match &l["route_config"] {
            Value::String(r) => format!(", route config {r}"),
            _ => String::new(),
        }
    );
    for r in l["routes"].as_array().into_iter().flatten() {
        let to = match &r["clusters"] {
            Value::Array(cs) => cs
                .iter()
                .map(|c| format!("{} ({})", s(&c["name"]), s(&c["weight"])))
                .collect::<Vec<_>>()
                .join(", "),
            _ if !r["direct_response"].is_null() => {
                format!("direct response {}", s(&r["direct_response"]["status"]))
            }
            _ => format!("redirect {}", s(&r["redirect"])),
        };
        let _ = writeln!(
            out,
            "{indent}  route {} {} -> {to}",
            s(&r["name"]),
            s(&r["match"])
        );
    }
    if l["kind"] == "tcp" {
        let cs: Vec<String> = l["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let _ = writeln!(out, "{indent}  -> {}", cs.join(", "));
    }
}

fn render_policies(out: &mut String, indent: &str, p: &Value) {
    if let Some(n) = p["note"].as_str() {
        let _ = writeln!(out, "{indent}{n}");
        return;
    }
    let _ = writeln!(out, "{indent}mtls (workload level)  {}", s(&p["mtls"]));
    let authz = p["authorization"].as_array().cloned().unwrap_or_default();
    if authz.is_empty() {
        let _ = writeln!(
            out,
            "{indent}no AuthorizationPolicy applies: every peer is allowed"
        );
    }
    for a in authz {
        let _ = writeln!(
            out,
            "{indent}AuthorizationPolicy {}  {}  scope {}  {} rule(s){}",
            s(&a["name"]),
            s(&a["action"]),
            s(&a["scope"]),
            s(&a["rules"]),
            if a["l7"] == true {
                ", HTTP attributes"
            } else {
                ""
            }
        );
    }
    for a in p["peer_authentication"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{indent}PeerAuthentication {}  {}  scope {}",
            s(&a["name"]),
            s(&a["mode"]),
            s(&a["scope"])
        );
    }
}

fn render_metrics(out: &mut String, m: &Value) {
    out.push_str("\nmetrics\n");
    let samples = m["samples"].as_array().cloned().unwrap_or_default();
    if samples.is_empty() {
        out.push_str("  no sample in /metrics names it\n");
    }
    for l in samples {
        let _ = writeln!(out, "  {}", s(&l));
    }
    if m["more"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(out, "  ... and {} more (see /metrics)", s(&m["more"]));
    }
}

/// The human-readable form of an `/inspect` answer.
pub fn render_text(v: &Value) -> String {
    let mut out = String::new();
    if v["kind"] == "service" {
        render_service(&mut out, v);
    } else {
        render_pod(&mut out, v);
    }
    out
}

fn render_pod(out: &mut String, v: &Value) {
    let e = &v["enrolment"];
    let _ = writeln!(
        out,
        "pod {}/{}  ip {}  node {}",
        s(&v["namespace"]),
        s(&v["name"]),
        s(&v["ip"]),
        s(&v["node"])
    );
    if e["on_this_node"] == true {
        let _ = writeln!(
            out,
            "  mode         {}, fail {} (enrolled {}, direct {}, bypass {})",
            s(&e["mode"]),
            s(&e["fail_mode"]),
            s(&e["enrolled"]),
            s(&e["direct"]),
            s(&e["bypass"])
        );
        let _ = writeln!(out, "  netns        {}", s(&e["netns"]));
        if !e["unresolved"].is_null() {
            let _ = writeln!(out, "  unresolved   {}", s(&e["unresolved"]));
        }
    } else {
        let _ = writeln!(
            out,
            "  mode         runs on node {} (not on this node)",
            s(&e["node"])
        );
    }
    let d = &v["datapath"];
    let _ = writeln!(out, "  netns cookie {}", s(&d["netns_cookie"]));
    let w = &d["workloads_entry"];
    if w.is_null() {
        let _ = writeln!(out, "  WORKLOADS    no entry (not captured)");
    } else {
        let _ = writeln!(
            out,
            "  WORKLOADS    [{}] ip {} id {} flags {}",
            s(&d["netns_cookie"]),
            s(&w["ip"]),
            s(&w["id"]),
            s(&w["flags"])
        );
    }
    if !d["dests_entry"].is_null() {
        let _ = writeln!(
            out,
            "  DESTS        id {} flags {}",
            s(&d["dests_entry"]["id"]),
            s(&d["dests_entry"]["flags"])
        );
    }
    if !d["inbound_entry"].is_null() {
        let _ = writeln!(
            out,
            "  INBOUND      flags {}",
            s(&d["inbound_entry"]["flags"])
        );
    }
    for err in d["errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  map error    {}", s(err));
    }
    let id = &v["identity"];
    let _ = writeln!(out, "  identity     {}", s(&id["spiffe_id"]));
    let c = &id["certificate"];
    if c.is_null() {
        let _ = writeln!(out, "  certificate  none held (fetched on demand, at the first mTLS connection from or to it)");
    } else {
        let _ = writeln!(
            out,
            "  certificate  serial {}, expires {} (in {} s), renewal {}",
            s(&c["serial"]),
            s(&c["not_after"]),
            s(&c["expires_in_s"]),
            s(&c["refresh_at"])
        );
    }
    if let Some(m) = id["mesh_workload"].as_object() {
        let _ = writeln!(
            out,
            "  mesh         uid {}, node {}, hbone {}",
            s(&m["uid"]),
            s(&m["node"]),
            s(&m["hbone"])
        );
    }

    render_connections(out, &v["connections"]);

    out.push_str("\nreaches\n");
    let reaches = v["reaches"].as_array().cloned().unwrap_or_default();
    if reaches.is_empty() {
        out.push_str("  nothing now (no live outbound connection)\n");
    }
    for r in reaches {
        let who = match &r["name"] {
            Value::String(n) => format!(" ({n})"),
            _ => String::new(),
        };
        if r["direct"] == true {
            let _ = writeln!(
                out,
                "  {}{who}: direct, socket to socket (the proxy is not on the path)",
                s(&r["destination"])
            );
        } else if r["listener"].is_null() {
            let _ = writeln!(
                out,
                "  {}{who}: no listener, relayed to the address",
                s(&r["destination"])
            );
        } else {
            let _ = writeln!(out, "  {}{who}:", s(&r["destination"]));
            render_listener(out, "    ", &r["listener"]);
        }
    }
    let services: Vec<String> = v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    let clusters: Vec<String> = v["endpoint_of"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| s(&c["cluster"]))
        .collect();
    if !services.is_empty() || !clusters.is_empty() {
        out.push_str("\nserves\n");
        if !services.is_empty() {
            let _ = writeln!(out, "  services     {}", services.join(", "));
        }
        if !clusters.is_empty() {
            let _ = writeln!(out, "  endpoint of  {}", clusters.join(", "));
        }
    }
    for l in v["listeners"].as_array().into_iter().flatten() {
        render_listener(out, "  ", l);
    }

    out.push_str("\npolicies\n");
    render_policies(out, "  ", &v["policies"]);
    render_metrics(out, &v["metrics"]);
}

fn render_service(out: &mut String, v: &Value) {
    let _ = writeln!(
        out,
        "service {}/{}  vip {}{}",
        s(&v["namespace"]),
        s(&v["name"]),
        s(&v["vip"]),
        v["vip6"]
            .as_str()
            .map(|ip| format!("  vip6 {ip}"))
            .unwrap_or_default()
    );
    for p in v["ports"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  port {} -> {} {}{}",
            s(&p["port"]),
            s(&p["target_port"]),
            s(&p["protocol"]),
            if p["listener_in_force"] == true {
                ""
            } else {
                "  (no listener in force yet: subscribed at the first connection)"
            }
        );
    }
    if let Some(sel) = v["selector"].as_object() {
        let sel: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        let _ = writeln!(out, "  selector {}", sel.join(","));
    }
    let declared = v["declared_endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !declared.is_empty() {
        let d: Vec<String> = declared
            .iter()
            .map(|e| match &e["workload"] {
                Value::String(w) => format!("{} ({w})", s(&e["ip"])),
                _ => s(&e["ip"]),
            })
            .collect();
        let _ = writeln!(out, "  declared endpoints {}", d.join(", "));
    }

    out.push_str("\nlisteners\n");
    let listeners = v["listeners"].as_array().cloned().unwrap_or_default();
    if listeners.is_empty() {
        out.push_str("  none in force\n");
    }
    for l in listeners {
        render_listener(out, "  ", &l);
    }

    out.push_str("\nclusters\n");
    let clusters = v["clusters"].as_array().cloned().unwrap_or_default();
    if clusters.is_empty() {
        out.push_str("  none in force\n");
    }
    for c in clusters {
        let _ = writeln!(
            out,
            "  {}  lb {}{}",
            s(&c["name"]),
            s(&c["lb"]),
            if c["endpoints_known"] == false {
                "  (endpoints not received yet)"
            } else {
                ""
            }
        );
        let rows: Vec<Vec<String>> = c["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                vec![
                    s(&e["address"]),
                    s(&e["workload"]),
                    s(&e["health"]),
                    s(&e["weight"]),
                    s(&e["ejected_until"]),
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str("    no endpoint\n");
        } else {
            table(
                out,
                "    ",
                &["endpoint", "workload", "health", "weight", "ejected_until"],
                &rows,
            );
        }
    }
    for c in v["clusters_not_in_force"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {} (named by a route, not in force yet)", s(c));
    }

    render_connections(out, &v["connections"]);

    out.push_str("\npolicies (of its endpoints' workloads)\n");
    match v["policies"].as_object() {
        Some(p) if !p.is_empty() => {
            for (w, pol) in p {
                let _ = writeln!(out, "  {w}");
                render_policies(out, "    ", pol);
            }
        }
        _ => out.push_str("  no mesh workload behind it is known to the proxy\n"),
    }
    render_metrics(out, &v["metrics"]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_a_kind_a_namespace_and_a_name() {
        assert_eq!(
            parse_path("pod/shop/web").unwrap(),
            (Kind::Pod, "shop", "web")
        );
        assert_eq!(
            parse_path("/svc/backend/reviews/").unwrap(),
            (Kind::Service, "backend", "reviews")
        );
        for bad in ["pod/shop", "pod//web", "node/a/b", "pod/a/b/c", ""] {
            assert_eq!(parse_path(bad).unwrap_err(), InspectError::Usage, "{bad}");
        }
    }

    #[test]
    fn a_flow_path_follows_its_flags_and_pairing() {
        use flow_flags::*;
        assert_eq!(
            flow_path(DIRECT | CLIENT_PAIRED | SERVER_PAIRED, true, false, false),
            "direct"
        );
        assert_eq!(flow_path(PROXIED, false, false, true), "tunnel");
        assert_eq!(
            flow_path(PROXIED | SERVER_PAIRED, true, false, false),
            "proxied+sk_msg"
        );
        assert_eq!(
            flow_path(PROXIED | SERVER_PAIRED, true, true, false),
            "proxied"
        );
        assert_eq!(flow_path(PROXIED, false, false, false), "proxied");
    }

    #[test]
    fn metric_samples_are_those_naming_the_object_and_bounded() {
        let text = "# HELP x y\n\
            mesh_tcp_connections_opened_total{source_workload=\"shop/web\",destination_workload=\"unknown\"} 2\n\
            mesh_tcp_connections_opened_total{source_workload=\"shop/webx\"} 1\n\
            istio_tcp_sent_bytes_total{source_workload=\"web\",source_workload_namespace=\"shop\"} 7\n\
            mesh_http_requests_total{destination_cluster=\"outbound|80||reviews.backend\"} 3\n\
            mesh_workloads_enrolled 4\n";
        let (s, more) = metric_samples(text, |l| names_workload(l, "shop", "web"));
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(more, 0);
        let (s, _) = metric_samples(text, |l| names_service(l, "backend", "reviews", None));
        assert_eq!(s.len(), 1, "{s:?}");
        let l4 = "mesh_tcp_connections_opened_total{destination_address=\"10.96.0.10:80\"} 1";
        let (s, _) = metric_samples(l4, |l| {
            names_service(l, "backend", "reviews", Some(Ipv4Addr::new(10, 96, 0, 10)))
        });
        assert_eq!(s.len(), 1, "{s:?}");
        let many: String = (0..MAX_METRICS + 5)
            .map(|i| format!("m{{w=\"shop/web\",i=\"{i}\"}} 1\n"))
            .collect();
        let (s, more) = metric_samples(&many, |l| names_workload(l, "shop", "web"));
        assert_eq!((s.len(), more), (MAX_METRICS, 5));
    }

    #[test]
    fn listener_summaries_collect_routes_and_clusters() {
        let l = json!({
            "name": "10.96.0.10:80", "address": "10.96.0.10:80",
            "http": {"route_config": {"name": "reviews.backend:80", "virtual_hosts": [
                {"name": "vh", "routes": [
                    {"name": "canary", "match": {"path": {"prefix": "/"}}, "action": {"clusters": [{"name": "a", "weight": 1}]}},
                    {"name": "default", "match": {"path": {"prefix": "/"}}, "action": {"clusters": [{"name": "b", "weight": 1}]}},
                ]}]}},
            "tcp_fallback": "c",
        });
        let s = listener_summary(&l);
        assert_eq!(s["kind"], "http");
        assert_eq!(s["route_config"], "reviews.backend:80");
        assert_eq!(s["clusters"], json!(["a", "b", "c"]));
        assert_eq!(s["routes"].as_array().unwrap().len(), 2);
        let t = json!({"name": "db", "address": "10.96.0.12:5432", "tcp_proxy": {"cluster": "outbound|5432||db.backend"}});
        assert_eq!(listener_summary(&t)["kind"], "tcp");
    }

    #[test]
    fn text_shows_a_pod_end_to_end() {
        let v = json!({
            "kind": "pod", "namespace": "shop", "name": "web", "ip": "10.0.0.2", "node": "n1",
            "enrolment": {"on_this_node": true, "mode": "captured", "enrolled": true, "direct": false,
                          "bypass": false, "fail_mode": "open", "netns": "/run/netns/web", "unresolved": null},
            "datapath": {"netns_cookie": 4097, "workloads_entry": {"ip": "10.0.0.2", "id": 0, "flags": "enrolled"},
                         "dests_entry": null, "inbound_entry": {"flags": "enrolled|capture"}},
            "identity": {"spiffe_id": "spiffe://cluster.local/ns/shop/sa/default", "certificate": null, "mesh_workload": null},
            "connections": {"total": 1, "listed": 1, "items": [
                {"role": "client", "local": "10.0.0.2:40000", "remote": "10.0.0.1:15001",
                 "original_destination": "10.0.0.3:7000", "source": "shop/web", "destination": "backend/db",
                 "path": "proxied+sk_msg", "flags": "proxied|client_paired|server_paired",
                 "sockhash": {"own": true, "peer": true}, "fallback": false}]},
            "reaches": [{"destination": "10.0.0.3:7000", "name": "backend/db", "listener": null}],
            "services": [], "endpoint_of": [], "listeners": [],
            "policies": {"authorization": [{"name": "shop/allow", "action": "ALLOW", "scope": "namespace", "rules": 1, "l7": false}],
                         "peer_authentication": [], "mtls": "PERMISSIVE"},
            "metrics": {"samples": ["m{source_workload=\"shop/web\"} 1"], "more": 0},
        });
        let t = render_text(&v);
        for want in [
            "pod shop/web  ip 10.0.0.2",
            "mode         captured, fail open",
            "WORKLOADS    [4097] ip 10.0.0.2 id 0 flags enrolled",
            "identity     spiffe://cluster.local/ns/shop/sa/default",
            "connections (1 listed of 1 in FLOWS)",
            "10.0.0.3:7000",
            "proxied+sk_msg",
            "10.0.0.3:7000 (backend/db): no listener, relayed to the address",
            "AuthorizationPolicy shop/allow  ALLOW  scope namespace",
            "m{source_workload=\"shop/web\"} 1",
        ] {
            assert!(t.contains(want), "{want:?} missing from:\n{t}");
        }
    }
}

//! Services and EndpointSlices as the build reads them, and the stores that hold them.
//!
//! The control plane watches every Service and EndpointSlice of the cluster. Stored as
//! k8s-openapi objects, 10k Services with 100k endpoints took about 80 MB: an `Endpoint`
//! is some 350 bytes of optional fields (topology, hints, target reference, ...) whatever
//! it holds, and a deserialised `Vec` of 10 of them has room for 16. `ServiceObj` and
//! `SliceObj` keep only what `state::convert` reads, already checked and parsed where
//! that cannot change its outcome (non-TCP ports, addresses that do not parse or that no
//! pod holds, and FQDN slices are skipped there anyway): an IPv4 endpoint is 5 bytes, an
//! IPv6 one 17 (each family in its own array, as a slice holds one family).
//! Each watch event's object is converted on arrival and dropped; `CompactStore` keeps
//! the compact objects the way kube's reflector keeps whole ones (a re-list is buffered
//! and swapped in whole at its end), and counts the objects that changed since the last
//! build, so a build can tell which Services an event touched.
//!
//! Both types deserialise from the API's JSON (`#[serde(from = ...)]` over the
//! k8s-openapi type), so tests and the `k8s_state` fuzz target build them as they did the
//! full objects.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use crate::control::model::not_a_service_ip6;

/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the build reads of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "Service")]
pub struct ServiceObj {
    pub namespace: String,
    /// `metadata.name`, else `generateName` (as `ResourceExt::name_any`).
    pub name: String,
    /// The IPv4 cluster IP of a served Service: `None` without a spec, for ExternalName,
    /// headless ("None") and IPv6-only Services.
    pub vip: Option<Ipv4Addr>,
    /// The IPv6 cluster IP of a dual-stack Service (`spec.clusterIPs`).
    pub vip6: Option<Ipv6Addr>,
    /// The TCP ports, in the object's order (numbers not yet checked: `convert` does).
    pub ports: Box<[ServicePortObj]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortObj {
    pub name: Option<String>,
    pub port: i32,
    pub app_protocol: Option<String>,
}

impl From<Service> for ServiceObj {
    fn from(s: Service) -> Self {
        let (namespace, name) = meta_key(s.metadata);
        let spec = s.spec;
        // `clusterIPs` holds one address per family of `ipFamilies`, the primary one first
        // (equal to `clusterIP`); older objects may have `clusterIP` only. Each family's
        // address is taken from there, whatever the order.
        let (mut vip, mut vip6) = (None, None);
        if let Some(spec) = spec
            .as_ref()
            .filter(|spec| spec.type_.as_deref() != Some("ExternalName"))
        {
            let ips = spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip);
            for ip in ips.filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                match ip {
                    IpAddr::V4(ip) => {
                        vip.get_or_insert(ip);
                    }
                    IpAddr::V6(ip) if not_a_service_ip6(ip).is_none() => {
                        vip6.get_or_insert(ip);
                    }
                    IpAddr::V6(_) => {}
                }
            }
        }
        let ports = spec
            .and_then(|spec| spec.ports)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .map(|p| ServicePortObj {
                name: p.name,
                port: p.port,
                app_protocol: p.app_protocol,
            })
            .collect();
        ServiceObj {
            namespace,
            name,
            vip,
            vip6,
            ports,
        }
    }
}

/// What the build reads of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "EndpointSlice")]
pub struct SliceObj {
    pub namespace: String,
    pub name: String,
    /// Its Service (the `kubernetes.io/service-name` label); `None` also for a slice of
    /// another address type than IPv4 and IPv6 (FQDN), which is never read.
    pub service: Option<String>,
    /// The TCP ports that have a number, in the object's order.
    pub ports: Box<[SlicePortObj]>,
    /// One entry per IPv4 address, in the object's order (an endpoint with two addresses
    /// is two entries with the same conditions).
    pub endpoints: Box<[EndpointObj]>,
    /// The same for an `addressType: IPv6` slice (addresses no pod can hold left out).
    pub endpoints6: Box<[EndpointObj<Ipv6Addr>]>,
}

impl SliceObj {
    /// Its endpoints, IPv4 then IPv6 (a slice holds one family).
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, Health)> + '_ {
        let v4 = self.endpoints.iter().map(|e| (IpAddr::V4(e.ip), e.health));
        v4.chain(self.endpoints6.iter().map(|e| (IpAddr::V6(e.ip), e.health)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortObj {
    pub name: Option<String>,
    pub port: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointObj<A = Ipv4Addr> {
    pub ip: A,
    pub health: Health,
}

/// An endpoint's conditions as the control plane carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// `ready` (absent counts as ready).
    Ready,
    /// Not ready but serving and terminating: finishing its requests.
    Draining,
    Unhealthy,
}

impl Health {
    /// The model's `health` string (`None`: healthy).
    pub fn as_model(self) -> Option<&'static str> {
        match self {
            Health::Ready => None,
            Health::Draining => Some("draining"),
            Health::Unhealthy => Some("unhealthy"),
        }
    }
}

impl From<EndpointSlice> for SliceObj {
    fn from(s: EndpointSlice) -> Self {
        let (ipv4, ipv6) = (s.address_type == "IPv4", s.address_type == "IPv6");
        let service = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|_| ipv4 || ipv6)
            .cloned();
        let (namespace, name) = meta_key(s.metadata);
        let ports = s
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                Some(SlicePortObj {
                    port: p.port?,
                    name: p.name,
                })
            })
            .collect();
        let (mut endpoints, mut endpoints6) = (Vec::new(), Vec::new());
        if ipv4 || ipv6 {
            for e in &s.endpoints {
                let cond = e.conditions.as_ref();
                let ready = cond.and_then(|c| c.ready).unwrap_or(true);
                let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
                let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
                let health = if ready {
                    Health::Ready
                } else if serving && terminating {
                    Health::Draining
                } else {
                    Health::Unhealthy
                };
                for a in &e.addresses {
                    match a.parse::<IpAddr>() {
                        Ok(IpAddr::V4(ip)) if ipv4 => endpoints.push(EndpointObj { ip, health }),
                        Ok(IpAddr::V6(ip)) if ipv6 && not_a_service_ip6(ip).is_none() => {
                            endpoints6.push(EndpointObj { ip, health })
                        }
                        _ => {}
                    }
                }
            }
        }
        SliceObj {
            namespace,
            name,
            service,
            ports,
            endpoints: endpoints.into_boxed_slice(),
            endpoints6: endpoints6.into_boxed_slice(),
        }
    }
}

/// (namespace, name) as `ResourceExt::namespace` and `name_any` give them.
fn meta_key(m: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        m.namespace.unwrap_or_default(),
        m.name.or(m.generate_name).unwrap_or_default(),
    )
}

/// An object's key in its store.
pub trait Keyed {
    fn key(&self) -> (&str, &str);
}

impl Keyed for ServiceObj {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Keyed for SliceObj {
    fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

fn store_key(o: &impl Keyed) -> Box<str> {
    let (ns, name) = o.key();
    // Neither a namespace nor a name holds a `/`.
    format!("{ns}/{name}").into_boxed_str()
}

/// Compact objects of one kind by namespace and name, as one watch keeps them. Cheap to
/// clone (one shared state), read by the builder, written by the watch task.
pub struct CompactStore<T> {
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T> Clone for CompactStore<T> {
    fn clone(&self) -> Self {
        CompactStore {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Default for CompactStore<T> {
    fn default() -> Self {
        CompactStore {
            inner: Arc::new(Mutex::new(Inner {
                objects: HashMap::new(),
                relist: None,
                ready: false,
                changes: 0,
                log: None,
            })),
        }
    }
}

struct Inner<T> {
    objects: HashMap<Box<str>, Arc<T>>,
    /// A re-list in progress: it replaces `objects` whole when it ends.
    relist: Option<HashMap<Box<str>, Arc<T>>>,
    /// A first list has ended.
    ready: bool,
    /// Objects added, replaced or removed since start (a re-list counts those that differ).
    changes: u64,
    /// What changed since the last `state_and_changes`, in order; `None`: unknown (never
    /// taken, a re-list, or more than `MAX_LOG` changes), the reader then walks everything.
    log: Option<Vec<Change<T>>>,
}

/// One object replaced (`Some`, `Some`), added (`None`, `Some`) or removed (`Some`, `None`).
pub type Change<T> = (Option<Arc<T>>, Option<Arc<T>>);

/// Beyond this many changes between two reads, the reader walks the store instead.
const MAX_LOG: usize = 4096;

impl<T> Inner<T> {
    fn record(&mut self, old: Option<Arc<T>>, new: Option<Arc<T>>) {
        self.changes += 1;
        if let Some(log) = &mut self.log {
            if log.len() < MAX_LOG {
                log.push((old, new));
            } else {
                self.log = None;
            }
        }
    }
}

impl<T: Keyed + PartialEq> CompactStore<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every object (in no particular order).
    pub fn state(&self) -> Vec<Arc<T>> {
        self.lock().objects.values().cloned().collect()
    }

    /// Every object, and what changed since the last call (`None`: unknown, at the first
    /// call and after a re-list), taken together: the objects are the last call's with
    /// the changes applied.
    pub fn state_and_changes(&self) -> (Vec<Arc<T>>, Option<Vec<Change<T>>>) {
        let mut g = self.lock();
        let changes = g.log.replace(Vec::new());
        (g.objects.values().cloned().collect(), changes)
    }

    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    /// Objects added, replaced or removed so far.
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// An object added or changed. An object equal to the stored one (a watch event for a
    /// field the build does not read, such as a status or an annotation) keeps the stored
    /// `Arc`, so the builder's pointer comparisons see no change; returns whether it
    /// changed.
    pub fn apply(&self, o: T) -> bool {
        let mut g = self.lock();
        let key = store_key(&o);
        match g.objects.get(&key) {
            Some(cur) if **cur == o => false,
            _ => {
                let new = Arc::new(o);
                let old = g.objects.insert(key, new.clone());
                g.record(old, Some(new));
                true
            }
        }
    }

    /// An object deleted; returns whether it was there.
    pub fn delete(&self, o: &T) -> bool {
        let mut g = self.lock();
        let Some(old) = g.objects.remove(&store_key(o)) else {
            return false;
        };
        g.record(Some(old), None);
        true
    }

    /// A (re-)list starts.
    pub fn relist_start(&self) {
        self.lock().relist = Some(HashMap::new());
    }

    /// An object of the list in progress; an object equal to the stored one keeps its `Arc`.
    pub fn relist_apply(&self, o: T) {
        let mut g = self.lock();
        let key = store_key(&o);
        let o = match g.objects.get(&key) {
            Some(cur) if **cur == o => cur.clone(),
            _ => Arc::new(o),
        };
        g.relist.get_or_insert_with(HashMap::new).insert(key, o);
    }

    /// The list ended: its objects replace the store's.
    pub fn relist_done(&self) {
        let mut g = self.lock();
        let listed = g.relist.take().unwrap_or_default();
        let same: HashSet<&str> = listed
            .iter()
            .filter(|(k, v)| g.objects.get(*k).is_some_and(|cur| Arc::ptr_eq(cur, v)))
            .map(|(k, _)| &**k)
            .collect();
        let changed = (listed.len() - same.len()) + (g.objects.len() - same.len());
        g.changes += changed as u64;
        // A reader walks everything after a re-list.
        g.log = None;
        g.objects = listed;
        g.objects.shrink_to_fit();
        g.ready = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(json: serde_json::Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn services_keep_what_the_build_reads() {
        let s: ServiceObj = obj(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"a": "b"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": "10.96.0.1", "ports": [
                {"name": "http", "port": 80, "appProtocol": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"port": 81, "protocol": "TCP"}]},
            "status": {"loadBalancer": {}},
        }));
        assert_eq!(
            s,
            ServiceObj {
                namespace: "shop".into(),
                name: "web".into(),
                vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
                vip6: None,
                ports: vec![
                    ServicePortObj {
                        name: Some("http".into()),
                        port: 80,
                        app_protocol: Some("http".into())
                    },
                    ServicePortObj {
                        name: None,
                        port: 81,
                        app_protocol: None
                    },
                ]
                .into(),
            }
        );
        for spec in [
            serde_json::json!({"type": "ExternalName", "externalName": "x.example", "clusterIP": "10.96.0.2"}),
            serde_json::json!({"clusterIP": "None"}),
            serde_json::json!({"clusterIP": "fd00::1"}),
        ] {
            let s: ServiceObj =
                obj(serde_json::json!({"metadata": {"name": "n", "namespace": "a"}, "spec": spec}));
            assert_eq!(s.vip, None, "{spec}");
        }
    }

    #[test]
    fn slices_keep_one_entry_per_ipv4_address() {
        let s: SliceObj = obj(serde_json::json!({
            "metadata": {"generateName": "web-", "namespace": "shop",
                         "labels": {SERVICE_NAME_LABEL: "web", "x": "y"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "udp", "port": 53, "protocol": "UDP"}, {"name": "none"}],
            "endpoints": [
                {"addresses": ["10.1.0.1", "10.1.0.2"], "nodeName": "n1", "zone": "z",
                 "targetRef": {"kind": "Pod", "name": "p", "uid": "u"}},
                {"addresses": ["not-an-ip"], "conditions": {"ready": false}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.1.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ],
        }));
        assert_eq!(
            (s.name.as_str(), s.service.as_deref()),
            ("web-", Some("web"))
        );
        assert_eq!(
            &*s.ports,
            &[SlicePortObj {
                name: Some("http".into()),
                port: 8080
            }]
        );
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.health))
            .collect();
        assert_eq!(
            eps,
            vec![
                ("10.1.0.1".into(), Health::Ready),
                ("10.1.0.2".into(), Health::Ready),
                ("10.1.0.3".into(), Health::Draining),
                ("10.1.0.4".into(), Health::Unhealthy),
            ]
        );
        assert_eq!(std::mem::size_of::<EndpointObj>(), 5);
        let fqdn: SliceObj = obj(serde_json::json!({
            "metadata": {"name": "wf", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["web.example"]}],
        }));
        assert_eq!((fqdn.service, fqdn.endpoints.len()), (None, 0));
    }

    /// An `addressType: IPv6` slice belongs to its Service like an IPv4 one; its
    /// addresses are kept (conditions as for IPv4), addresses no pod holds and the other
    /// family's are not.
    #[test]
    fn ipv6_slices_keep_their_ipv6_addresses() {
        let v6: SliceObj = obj(serde_json::json!({
            "metadata": {"name": "w6", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["fd00:10:1::2"]},
                {"addresses": ["fd00:10:1::3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["::1", "fe80::1", "::ffff:10.1.0.9", "10.1.0.9", "ff02::1"]},
            ],
        }));
        assert_eq!(v6.service.as_deref(), Some("web"));
        assert!(v6.endpoints.is_empty());
        let eps: Vec<_> = v6.addresses().map(|(ip, h)| (ip.to_string(), h)).collect();
        assert_eq!(
            eps,
            [
                ("fd00:10:1::2".to_owned(), Health::Ready),
                ("fd00:10:1::3".to_owned(), Health::Draining),
            ]
        );
        assert_eq!(std::mem::size_of::<EndpointObj<Ipv6Addr>>(), 17);
    }

    /// `spec.clusterIPs` of a dual-stack Service gives both addresses, in either order
    /// (`ipFamilies` says which is primary); an IPv6-only Service has no `vip`.
    #[test]
    fn dual_stack_services_keep_both_cluster_ips() {
        let svc = |spec: serde_json::Value| -> ServiceObj {
            obj(serde_json::json!({"metadata": {"name": "n", "namespace": "a"}, "spec": spec}))
        };
        let v6 = Some("fd00:96::a".parse::<Ipv6Addr>().unwrap());
        let v4 = Some(Ipv4Addr::new(10, 96, 0, 10));
        for spec in [
            serde_json::json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::a"],
                               "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}),
            serde_json::json!({"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a", "10.96.0.10"],
                               "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"}),
        ] {
            let s = svc(spec.clone());
            assert_eq!((s.vip, s.vip6), (v4, v6), "{spec}");
        }
        let s = svc(
            serde_json::json!({"clusterIP": "fd00:96::a", "clusterIPs": ["fd00:96::a"], "ipFamilies": ["IPv6"]}),
        );
        assert_eq!((s.vip, s.vip6), (None, v6));
        let s = svc(serde_json::json!({"clusterIP": "10.96.0.10"}));
        assert_eq!((s.vip, s.vip6), (v4, None));
        let s = svc(serde_json::json!({"clusterIP": "None", "clusterIPs": ["None"]}));
        assert_eq!((s.vip, s.vip6), (None, None));
        let s = svc(serde_json::json!({"clusterIPs": ["10.96.0.10", "::1"]}));
        assert_eq!((s.vip, s.vip6), (v4, None), "no service is at ::1");
    }

    fn slice(name: &str, ip: [u8; 4]) -> SliceObj {
        SliceObj {
            namespace: "b".into(),
            name: name.into(),
            service: Some("s".into()),
            ports: Box::new([]),
            endpoints: Box::new([EndpointObj {
                ip: ip.into(),
                health: Health::Ready,
            }]),
            endpoints6: Box::new([]),
        }
    }

    /// Equal objects keep their `Arc` (an event for a field the build does not read is no
    /// change to it), through a re-list too; `changes` counts what differs.
    #[test]
    fn the_store_keeps_unchanged_objects_by_pointer() {
        let st = CompactStore::default();
        assert!(!st.is_ready());
        st.relist_start();
        st.relist_apply(slice("a", [10, 0, 0, 1]));
        st.relist_apply(slice("b", [10, 0, 0, 2]));
        assert!(st.state().is_empty(), "a list shows when it ends");
        st.relist_done();
        assert!(st.is_ready());
        assert_eq!(st.changes(), 2);
        let a0 = st.state().into_iter().find(|s| s.name == "a").unwrap();
        assert!(!st.apply(slice("a", [10, 0, 0, 1])));
        assert_eq!(st.changes(), 2);
        assert!(st.apply(slice("a", [10, 0, 0, 9])));
        assert_eq!(st.changes(), 3);
        let a1 = st.state().into_iter().find(|s| s.name == "a").unwrap();
        assert!(!Arc::ptr_eq(&a0, &a1));
        // A re-list: a unchanged, b gone, c new.
        st.relist_start();
        st.relist_apply(slice("a", [10, 0, 0, 9]));
        st.relist_apply(slice("c", [10, 0, 0, 3]));
        st.relist_done();
        assert_eq!(st.changes(), 5, "b gone and c new");
        let mut names: Vec<_> = st.state().iter().map(|s| s.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
        assert!(Arc::ptr_eq(
            &a1,
            &st.state().into_iter().find(|s| s.name == "a").unwrap()
        ));
        assert!(st.delete(&slice("c", [0, 0, 0, 0])));
        assert!(!st.delete(&slice("c", [0, 0, 0, 0])));
        assert_eq!((st.state().len(), st.changes()), (1, 6));
    }

    /// The change log: unknown until first taken and after a re-list, then each change as
    /// (old, new), an unchanged object not at all; too many changes make it unknown.
    #[test]
    fn the_store_logs_changes_between_reads() {
        let st = CompactStore::default();
        st.relist_start();
        st.relist_apply(slice("a", [10, 0, 0, 1]));
        st.relist_done();
        assert!(st.state_and_changes().1.is_none());
        assert!(st.state_and_changes().1.unwrap().is_empty());
        st.apply(slice("a", [10, 0, 0, 1]));
        st.apply(slice("a", [10, 0, 0, 2]));
        st.apply(slice("b", [10, 0, 0, 3]));
        st.delete(&slice("a", [0, 0, 0, 0]));
        let (objects, log) = st.state_and_changes();
        assert_eq!(objects.len(), 1);
        let log: Vec<_> = log
            .unwrap()
            .iter()
            .map(|(o, n)| {
                let ip =
                    |s: &Option<Arc<SliceObj>>| s.as_ref().map(|s| s.endpoints[0].ip.octets()[3]);
                (ip(o), ip(n))
            })
            .collect();
        assert_eq!(log, [(Some(1), Some(2)), (None, Some(3)), (Some(2), None)]);
        for i in 0..=MAX_LOG {
            st.apply(slice("b", [10, 1, (i >> 8) as u8, i as u8]));
        }
        assert!(st.state_and_changes().1.is_none());
        st.relist_start();
        st.relist_done();
        st.state_and_changes();
        st.apply(slice("c", [10, 0, 0, 4]));
        st.relist_start();
        st.relist_done();
        assert!(st.state_and_changes().1.is_none(), "a re-list");
    }
}

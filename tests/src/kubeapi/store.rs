//! The state: objects by (resource, namespace, name), one global resourceVersion counter,
//! a bounded event history (what watches replay from and what lists at an older
//! resourceVersion are rebuilt from), and the open watches' channels. Every write happens
//! under one lock, so the counter, the history and the live events agree, as etcd's
//! revision does.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::resources::{Resource, RESOURCES};

/// An API error, rendered as a `Status` object (as the real server does).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, r: &Resource, name: &str) -> ApiError {
        let mut d = json!({"name": name, "kind": r.plural});
        if !r.group.is_empty() {
            d["group"] = json!(r.group);
        }
        self.details = Some(d);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn not_found(r: &Resource, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .with_details(r, name)
    }

    pub fn already_exists(r: &Resource, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        )
        .with_details(r, name)
    }

    pub fn conflict(r: &Resource, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                r.qualified()
            ),
        )
        .with_details(r, name)
    }

    pub fn invalid(r: &Resource, name: &str, field: &str, why: &str) -> ApiError {
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {field}: {why}", r.kind),
        )
        .with_details(r, name);
        if let Some(d) = e.details.as_mut() {
            d["kind"] = json!(r.kind);
            d["causes"] = json!([{"reason": "FieldValueRequired", "message": why, "field": field}]);
        }
        e
    }

    /// 410 Expired, for a resourceVersion or continue token older than the history.
    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// The reason the real server uses for an HTTP status code (for injected failures).
    pub fn for_code(code: u16) -> ApiError {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        ApiError::new(
            code,
            reason,
            format!("injected failure ({code} {reason}) by kube-double"),
        )
    }

    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change. `object` carries the change's resourceVersion (for DELETED too, as the real
/// server's watch cache); `prev` is the object before it (what selectors are checked
/// against to turn an update into ADDED/DELETED for a watch, and what undoes it when a list
/// is rebuilt at an older resourceVersion).
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub res: usize,
    pub ty: EventType,
    pub object: Value,
    pub prev: Option<Value>,
}

/// Which part of an object a write changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Main,
    Status,
}

type Key = (usize, String, String);

/// A registered watch: its initial events, the resourceVersion it starts at, live events.
pub type WatchStart = (Vec<Arc<Event>>, u64, mpsc::UnboundedReceiver<Arc<Event>>);

pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// The oldest resourceVersion a watch or an exact list can start from.
    floor: u64,
    watchers: Vec<mpsc::UnboundedSender<Arc<Event>>>,
    next_cluster_ip: u32,
}

fn meta(obj: &Value, field: &str) -> String {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata object")
}

/// A random UUID v4, as the real server's `metadata.uid`.
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    b.iter_mut().for_each(|x| *x = fastrand::u8(..));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Now as RFC 3339 in UTC with second precision (`2025-01-02T03:04:05Z`), as
/// `metav1.Time` is serialised.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn random_suffix() -> String {
    // The alphabet of apimachinery's utilrand.String (no vowels, no confusable digits).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        let mut s = Store {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            floor: 0,
            watchers: Vec::new(),
            next_cluster_ip: 1,
        };
        let ns = Resource::by_plural("namespaces").expect("namespaces row");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            s.create(ns, None, obj, false).expect("built-in namespace");
        }
        s
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn watchers_open(&mut self) -> usize {
        self.watchers.retain(|w| !w.is_closed());
        self.watchers.len()
    }

    /// Forgets the event history: any older resourceVersion now gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }

    fn publish(&mut self, res: usize, ty: EventType, object: Value, prev: Option<Value>) {
        let ev = Arc::new(Event {
            rv: self.rv,
            res,
            ty,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        self.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    fn key(ri: usize, ns: Option<&str>, name: &str) -> Key {
        (ri, ns.unwrap_or("").to_string(), name.to_string())
    }

    pub fn get(&self, ri: usize, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Store::key(ri, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&RESOURCES[ri], name))
    }

    fn check_type(r: &Resource, obj: &Value) -> Result<(), ApiError> {
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if av != r.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                r.api_version()
            )));
        }
        if kind != r.kind {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {}: the kind in the data ({kind}) does not match the expected kind ({})",
                r.version, r.kind, r.kind
            )));
        }
        Ok(())
    }

    fn check_namespace(r: &Resource, obj: &mut Value, ns: Option<&str>) -> Result<(), ApiError> {
        let m = meta_mut(obj);
        match (r.namespaced, ns) {
            (true, Some(ns)) => {
                let body_ns = m.get("namespace").and_then(Value::as_str).unwrap_or("");
                if !body_ns.is_empty() && body_ns != ns {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                m.insert("namespace".into(), json!(ns));
            }
            (true, None) => {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                ))
            }
            (false, _) => {
                m.remove("namespace");
            }
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        ri: usize,
        ns: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[ri];
        Store::check_type(r, &obj)?;
        Store::check_namespace(r, &mut obj, ns)?;
        if let Some(ns) = ns.filter(|_| r.namespaced) {
            let nsi = Resource::by_plural("namespaces").expect("namespaces row");
            self.get(nsi, None, ns)?;
        }
        let mut name = meta(&obj, "name");
        if name.is_empty() {
            let generate = meta(&obj, "generateName");
            if generate.is_empty() {
                return Err(ApiError::invalid(
                    r,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            }
            name = format!("{generate}{}", random_suffix());
        }
        if !meta(&obj, "resourceVersion").is_empty() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let key = Store::key(ri, ns.filter(|_| r.namespaced), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(r, &name));
        }
        let m = meta_mut(&mut obj);
        m.insert("name".into(), json!(name));
        m.insert("uid".into(), json!(uuid_v4()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.insert("generation".into(), json!(1));
        m.remove("deletionTimestamp");
        self.defaults_on_create(r, &mut obj);
        if dry_run {
            return Ok(obj);
        }
        self.rv += 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(key, obj.clone());
        self.publish(ri, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// What the real server's create strategies and admission defaults do, for the fields
    /// a consumer of these types is likely to read.
    fn defaults_on_create(&mut self, r: &Resource, obj: &mut Value) {
        match (r.group, r.plural) {
            ("", "namespaces") => {
                let name = meta(obj, "name");
                let m = meta_mut(obj);
                if !m.get("labels").is_some_and(Value::is_object) {
                    m.insert("labels".into(), json!({}));
                }
                m["labels"]["kubernetes.io/metadata.name"] = json!(name);
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
            }
            ("", "pods") => obj["status"] = json!({"phase": "Pending"}),
            ("", "services") => {
                obj["status"] = json!({"loadBalancer": {}});
                self.service_defaults(obj, None);
            }
            // A node registers with its status (the kubelet does).
            ("", "nodes") => {}
            _ if r.status => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
            }
            _ => {}
        }
    }

    /// ClusterIP allocation (from 10.96.0.0/16, never reused) and the defaulted fields of a
    /// Service spec; on update an unset clusterIP keeps the allocated one.
    fn service_defaults(&mut self, obj: &mut Value, old: Option<&Value>) {
        if !obj.get("spec").is_some_and(Value::is_object) {
            obj["spec"] = json!({});
        }
        let spec = &mut obj["spec"];
        if spec.get("type").is_none() {
            spec["type"] = json!("ClusterIP");
        }
        let external = spec["type"] == "ExternalName";
        let ip = spec.get("clusterIP").and_then(Value::as_str).unwrap_or("");
        if ip.is_empty() && !external {
            let kept = old.and_then(|o| o.pointer("/spec/clusterIP")).cloned();
            let ip = kept.unwrap_or_else(|| {
                let n = self.next_cluster_ip;
                self.next_cluster_ip += 1;
                json!(format!("10.96.{}.{}", n / 256 % 256, n % 256))
            });
            spec["clusterIP"] = ip.clone();
            spec["clusterIPs"] = json!([ip]);
        } else if !ip.is_empty() && spec.get("clusterIPs").is_none() {
            spec["clusterIPs"] = json!([ip]);
        }
        if !external {
            for (k, v) in [
                ("sessionAffinity", json!("None")),
                ("ipFamilies", json!(["IPv4"])),
                ("ipFamilyPolicy", json!("SingleStack")),
                ("internalTrafficPolicy", json!("Cluster")),
            ] {
                if spec.get(k).is_none() {
                    spec[k] = v;
                }
            }
        }
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for p in ports {
                if p.get("protocol").is_none() {
                    p["protocol"] = json!("TCP");
                }
                if p.get("targetPort").is_none() {
                    if let Some(port) = p.get("port").cloned() {
                        p["targetPort"] = port;
                    }
                }
            }
        }
    }

    /// PUT (and the end of PATCH): replaces the object, or only its status with
    /// `Sub::Status`. A stale `metadata.resourceVersion` in the body is a 409; an empty one
    /// is an unconditional update. An update that changes nothing is not an event.
    pub fn update(
        &mut self,
        ri: usize,
        ns: Option<&str>,
        name: &str,
        mut obj: Value,
        sub: Sub,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[ri];
        Store::check_type(r, &obj)?;
        Store::check_namespace(r, &mut obj, ns)?;
        let body_name = meta(&obj, "name");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = Store::key(ri, ns.filter(|_| r.namespaced), name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))?;
        let body_rv = meta(&obj, "resourceVersion");
        if !body_rv.is_empty() && body_rv != meta(&old, "resourceVersion") {
            return Err(ApiError::conflict(
                r,
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        let mut new = match sub {
            Sub::Main => {
                let mut new = obj;
                let m = meta_mut(&mut new);
                for f in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                ] {
                    match old["metadata"].get(f) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                if r.status {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(o) = new.as_object_mut() {
                                o.remove("status");
                            }
                        }
                    }
                }
                if r.group.is_empty() && r.plural == "services" {
                    self.service_defaults(&mut new, Some(&old));
                }
                if new.get("spec") != old.get("spec") {
                    let g = old.pointer("/metadata/generation").and_then(Value::as_i64);
                    meta_mut(&mut new).insert("generation".into(), json!(g.unwrap_or(0) + 1));
                }
                new
            }
            Sub::Status => {
                let mut new = old.clone();
                match obj.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                new
            }
        };
        meta_mut(&mut new).insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        if new == old || dry_run {
            return Ok(new);
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(key, new.clone());
        self.publish(ri, EventType::Modified, new.clone(), Some(old));
        Ok(new)
    }

    fn remove(&mut self, key: &Key) -> Option<Value> {
        let old = self.objects.remove(key)?;
        self.rv += 1;
        let mut gone = old.clone();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.publish(key.0, EventType::Deleted, gone.clone(), Some(old));
        Some(gone)
    }

    /// Deletes at once (no graceful deletion, no finalizers). Deleting a namespace first
    /// deletes every namespaced object in it, each with its own DELETED event.
    pub fn delete(
        &mut self,
        ri: usize,
        ns: Option<&str>,
        name: &str,
        precondition_rv: Option<&str>,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let r = &RESOURCES[ri];
        let key = Store::key(ri, ns.filter(|_| r.namespaced), name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(r, name))?;
        if let Some(want) = precondition_rv.filter(|p| !p.is_empty()) {
            let have = meta(&old, "resourceVersion");
            if want != have {
                return Err(ApiError::conflict(r, name, &format!(
                    "the ResourceVersion in the precondition ({want}) does not match the ResourceVersion in record ({have}). The object might have been modified"
                )));
            }
        }
        if dry_run {
            return Ok(old);
        }
        if r.group.is_empty() && r.plural == "namespaces" {
            let inside: Vec<Key> = self
                .objects
                .keys()
                .filter(|(res, kns, _)| RESOURCES[*res].namespaced && kns == name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        Ok(self.remove(&key).expect("checked above"))
    }

    /// The objects of one resource (in one namespace or all), in key order, as of
    /// resourceVersion `at` (rebuilt by undoing the history) or now.
    pub fn list(
        &self,
        ri: usize,
        ns: Option<&str>,
        at: Option<u64>,
    ) -> Result<Vec<Value>, ApiError> {
        let in_scope = |k: &Key| k.0 == ri && ns.is_none_or(|ns| k.1 == ns);
        let at = at.filter(|rv| *rv < self.rv);
        let Some(at) = at else {
            return Ok(self
                .objects
                .iter()
                .filter(|(k, _)| in_scope(k))
                .map(|(_, v)| v.clone())
                .collect());
        };
        if at < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {at} ({})",
                self.floor
            )));
        }
        let mut objs: BTreeMap<Key, Value> = self
            .objects
            .iter()
            .filter(|(k, _)| in_scope(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ev in self.history.iter().rev().take_while(|e| e.rv > at) {
            let ns_of = |v: &Value| meta(v, "namespace");
            let key = (ev.res, ns_of(&ev.object), meta(&ev.object, "name"));
            if !in_scope(&key) {
                continue;
            }
            match &ev.prev {
                Some(prev) => objs.insert(key, prev.clone()),
                None => objs.remove(&key),
            };
        }
        Ok(objs.into_values().collect())
    }

    /// Registers a watch. With `from = None`, the current objects as synthetic ADDED events;
    /// with `Some(rv)`, every retained event after `rv` (410 if `rv` is older than the
    /// history). Then live events arrive on the receiver, filtered by the caller.
    pub fn watch(
        &mut self,
        ri: usize,
        ns: Option<&str>,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let initial: Vec<Arc<Event>> = match from {
            None => self
                .list(ri, ns, None)?
                .into_iter()
                .map(|o| {
                    Arc::new(Event {
                        rv: meta(&o, "resourceVersion").parse().unwrap_or(0),
                        res: ri,
                        ty: EventType::Added,
                        object: o,
                        prev: None,
                    })
                })
                .collect(),
            Some(rv) if rv < self.floor => {
                return Err(ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    self.floor
                )))
            }
            Some(rv) => self
                .history
                .iter()
                .filter(|e| e.rv > rv && e.res == ri)
                .filter(|e| ns.is_none_or(|ns| meta(&e.object, "namespace") == ns))
                .cloned()
                .collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(tx);
        Ok((initial, self.rv, rx))
    }

    /// Every object of a resource (all namespaces), for the in-process API.
    pub fn all(&self, ri: usize) -> Vec<Value> {
        self.list(ri, None, None).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_and_time_formats() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn list_at_an_older_resource_version() {
        let mut s = Store::new(100);
        let pods = Resource::by_plural("pods").unwrap();
        let pod = |n: &str| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n}});
        s.create(pods, Some("default"), pod("a"), false).unwrap();
        let rv = s.resource_version();
        s.create(pods, Some("default"), pod("b"), false).unwrap();
        s.delete(pods, Some("default"), "a", None, false).unwrap();
        let names = |v: Vec<Value>| v.iter().map(|o| meta(o, "name")).collect::<Vec<_>>();
        assert_eq!(names(s.list(pods, None, Some(rv)).unwrap()), ["a"]);
        assert_eq!(names(s.list(pods, None, None).unwrap()), ["b"]);
        s.compact();
        assert_eq!(s.list(pods, None, Some(rv)).unwrap_err().code, 410);
    }
}

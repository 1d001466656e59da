//! The HTTP side: routing of Kubernetes API paths, the verbs, watch streams, and the
//! `/_double/...` admin paths (fault injection over HTTP for the standalone binary).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time::Instant,
};

use super::{
    auth, patch, protobuf,
    resources::{self, Resource, RESOURCES},
    selector::{FieldSelector, LabelSelector},
    store::{ApiError, Event, EventType, Store, Sub},
    Options, Stats,
};

type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Injected faults.
#[derive(Debug, Default)]
struct Faults {
    fail_next: usize,
    fail_code: u16,
    delay: Duration,
}

/// Everything a request handler and the in-process API share.
pub struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    log: Mutex<Vec<String>>,
    drop_watches: watch::Sender<u64>,
    options: Options,
    addr: SocketAddr,
    /// TokenReview's table (`KubeApi::set_token`).
    pub(super) tokens: auth::Tokens,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking handler must not take the whole double down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests kept in the log, oldest dropped first.
const LOG_LIMIT: usize = 10_000;

impl Shared {
    pub fn new(options: Options, addr: SocketAddr) -> Shared {
        Shared {
            store: Mutex::new(Store::new(options.history_limit)),
            faults: Mutex::default(),
            stats: Mutex::default(),
            log: Mutex::default(),
            drop_watches: watch::channel(0).0,
            options,
            addr,
            tokens: auth::Tokens::default(),
        }
    }

    pub fn drop_watches(&self) {
        self.drop_watches.send_modify(|g| *g += 1);
    }

    pub fn compact(&self) {
        lock(&self.store).compact();
    }

    pub fn fail_next(&self, n: usize, code: u16) {
        let mut f = lock(&self.faults);
        f.fail_next = n;
        f.fail_code = code;
    }

    pub fn set_delay(&self, delay: Duration) {
        lock(&self.faults).delay = delay;
    }

    pub fn stats(&self) -> Stats {
        let mut s = lock(&self.stats).clone();
        let mut store = lock(&self.store);
        s.watches_registered = store.watchers_open();
        s.resource_version = store.resource_version();
        s
    }

    pub fn requests(&self) -> Vec<String> {
        lock(&self.log).clone()
    }

    pub fn objects(&self, resource: &str) -> Vec<Value> {
        match Resource::by_plural(resource) {
            Some(ri) => lock(&self.store).all(ri),
            None => panic!("kube-double serves no resource {resource:?}"),
        }
    }

    /// See `KubeApi::set_token`.
    pub fn set_token(&self, token: &str, user: Value, audiences: &[&str]) {
        self.tokens.set(
            token,
            user,
            audiences.iter().map(|a| (*a).to_owned()).collect(),
        );
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }
}

/// Serves until `shutdown` completes. Open connections end when the runtime is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn full(code: u16, content_type: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .header("Cache-Control", "no-cache, private")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|n| match n {})
                .boxed_unsync(),
        )
        .expect("response")
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    full(
        code,
        "application/json",
        serde_json::to_vec(v).expect("json"),
    )
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

fn not_found_path() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match h.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun").is_some_and(|v| !v.is_empty())
    }
}

/// What an API path names.
enum Target {
    Collection {
        ri: usize,
        ns: Option<String>,
    },
    Object {
        ri: usize,
        ns: Option<String>,
        name: String,
        sub: Sub,
    },
}

fn route(segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found_path()),
    };
    let find = |plural: &str| Resource::find(group, version, plural);
    let object = |ri, ns: Option<String>, tail: &[&str]| match tail {
        [] => Ok(Target::Collection { ri, ns }),
        [name] => Ok(Target::Object {
            ri,
            ns,
            name: name.to_string(),
            sub: Sub::Main,
        }),
        [name, "status"] if RESOURCES[ri].status => Ok(Target::Object {
            ri,
            ns,
            name: name.to_string(),
            sub: Sub::Status,
        }),
        _ => Err(not_found_path()),
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if find(plural).is_some_and(|ri| RESOURCES[ri].namespaced) =>
        {
            object(find(plural).expect("checked"), Some(ns.to_string()), tail)
        }
        [plural, tail @ ..] => {
            let ri = find(plural).ok_or_else(not_found_path)?;
            if RESOURCES[ri].namespaced && !tail.is_empty() {
                return Err(not_found_path());
            }
            object(ri, None, tail)
        }
        [] => Err(not_found_path()),
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let query = Query::parse(req.uri().query());
    if let Some(op) = path.strip_prefix("/_double/") {
        return Ok(admin(&shared, req.method(), op, &query));
    }
    {
        let mut log = lock(&shared.log);
        if log.len() >= LOG_LIMIT {
            log.remove(0);
        }
        let q = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        log.push(format!("{} {path}{q}", req.method()));
    }
    shared.count(|s| s.requests += 1);
    let delay = lock(&shared.faults).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let injected = {
        let mut f = lock(&shared.faults);
        // Discovery is never failed: kubectl's dispatcher (the gcloud build) asks for
        // /version before every command, which would eat the failure meant for the test.
        (f.fail_next > 0 && !is_discovery(&path)).then(|| {
            f.fail_next -= 1;
            f.fail_code
        })
    };
    if let Some(code) = injected {
        shared.count(|s| s.injected_failures += 1);
        return Ok(error_response(&ApiError::for_code(code)));
    }
    if let (&Method::POST, Some(kind)) = (req.method(), auth::review_kind(&path)) {
        shared.count(|s| s.creates += 1);
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let answer = match read_body(req).await {
            Ok((_, body)) => auth::review(&shared.tokens, kind, bearer.as_deref(), &body),
            Err(e) => Err(e),
        };
        return Ok(match answer {
            Ok(v) => json_response(201, &v),
            Err(e) => error_response(&e),
        });
    }
    Ok(match api(&shared, req, &path, &query).await {
        Ok(resp) => resp,
        Err(e) => {
            if e.code == 410 {
                shared.count(|s| s.gone_sent += 1);
            }
            error_response(&e)
        }
    })
}

/// `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`, `/openapi/...`.
fn is_discovery(path: &str) -> bool {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.first() {
        Some(&"version" | &"openapi") => true,
        Some(&"api") => segs.len() <= 2,
        Some(&"apis") => segs.len() <= 3,
        _ => false,
    }
}

fn admin(shared: &Shared, method: &Method, op: &str, q: &Query) -> Response<Body> {
    let ok = || json_response(200, &json!({"ok": true}));
    match (method, op) {
        (&Method::POST, "drop-watches") => {
            shared.drop_watches();
            ok()
        }
        (&Method::POST, "compact") => {
            shared.compact();
            ok()
        }
        (&Method::POST, "fail-next") => {
            let n = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let code = q.get("code").and_then(|c| c.parse().ok()).unwrap_or(500);
            shared.fail_next(n, code);
            ok()
        }
        (&Method::POST, "delay") => {
            let ms = q.get("ms").and_then(|n| n.parse().ok()).unwrap_or(0);
            shared.set_delay(Duration::from_millis(ms));
            ok()
        }
        (&Method::GET, "stats") => json_response(200, &shared.stats().to_json()),
        (&Method::GET, "requests") => json_response(200, &json!(shared.requests())),
        (&Method::GET, op) if op.starts_with("objects/") => {
            match Resource::by_plural(&op["objects/".len()..]) {
                Some(ri) => json_response(200, &json!(lock(&shared.store).all(ri))),
                None => error_response(&not_found_path()),
            }
        }
        _ => error_response(&not_found_path()),
    }
}

async fn read_body(req: Request<Incoming>) -> Result<(String, Bytes), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let ct = ct.split(';').next().unwrap_or("").trim().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    Ok((ct, body))
}

fn parse_json(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    if content_type == "application/vnd.kubernetes.protobuf" {
        return protobuf::decode(body).map_err(|e| ApiError::new(415, "UnsupportedMediaType", e));
    }
    if content_type.ends_with("yaml") {
        return serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
    })
}

async fn api(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();
    // Discovery and OpenAPI.
    if method == Method::GET {
        let doc = match segs.as_slice() {
            ["version"] => Some(resources::version()),
            ["api"] => Some(resources::api_versions(&shared.addr.to_string())),
            ["apis"] => Some(resources::api_group_list()),
            ["api", v] => resources::api_resource_list("", v),
            ["apis", g] => resources::api_group_doc(g),
            ["apis", g, v] => resources::api_resource_list(g, v),
            ["openapi", "v3"] => Some(resources::openapi_v3_index()),
            ["openapi", "v3", "api", v] => resources::openapi_v3_doc("", v),
            ["openapi", "v3", "apis", g, v] => resources::openapi_v3_doc(g, v),
            ["openapi", ..] => return Err(not_found_path()),
            _ => None,
        };
        if let Some(doc) = doc {
            return Ok(json_response(200, &doc));
        }
        if matches!(
            segs.as_slice(),
            ["version" | "api" | "apis"] | ["api", _] | ["apis", _] | ["apis", _, _]
        ) {
            return Err(not_found_path());
        }
    }
    let target = route(&segs)?;
    let dry = q.dry_run();
    match (method, target) {
        (Method::GET, Target::Collection { ri, ns }) if q.flag("watch") => {
            Ok(start_watch(shared, ri, ns, q)?)
        }
        (Method::GET, Target::Collection { ri, ns }) => {
            shared.count(|s| s.lists += 1);
            Ok(json_response(200, &list(shared, ri, ns.as_deref(), q)?))
        }
        (Method::GET, Target::Object { ri, ns, name, .. }) => {
            shared.count(|s| s.gets += 1);
            let obj = lock(&shared.store).get(ri, ns.as_deref(), &name)?;
            Ok(json_response(200, &obj))
        }
        (Method::POST, Target::Collection { ri, ns }) => {
            shared.count(|s| s.creates += 1);
            let (ct, body) = read_body(req).await?;
            let obj = parse_json(&ct, &body)?;
            let created = lock(&shared.store).create(ri, ns.as_deref(), obj, dry)?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, Target::Object { ri, ns, name, sub }) => {
            shared.count(|s| s.updates += 1);
            let (ct, body) = read_body(req).await?;
            let obj = parse_json(&ct, &body)?;
            let updated = lock(&shared.store).update(ri, ns.as_deref(), &name, obj, sub, dry)?;
            Ok(json_response(200, &updated))
        }
        (Method::PATCH, Target::Object { ri, ns, name, sub }) => {
            shared.count(|s| s.patches += 1);
            let (ct, body) = read_body(req).await?;
            let (code, obj) = patch_object(shared, ri, ns.as_deref(), &name, sub, &ct, &body, dry)?;
            Ok(json_response(code, &obj))
        }
        (
            Method::DELETE,
            Target::Object {
                ri,
                ns,
                name,
                sub: Sub::Main,
            },
        ) => {
            shared.count(|s| s.deletes += 1);
            let (_, body) = read_body(req).await?;
            let opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let pre = opts
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str);
            let dry = dry
                || opts
                    .get("dryRun")
                    .is_some_and(|d| d.as_array().is_some_and(|a| !a.is_empty()));
            let gone = lock(&shared.store).delete(ri, ns.as_deref(), &name, pre, dry)?;
            Ok(json_response(200, &gone))
        }
        (Method::DELETE, Target::Collection { ri, ns }) => {
            shared.count(|s| s.deletes += 1);
            let (ls, fs) = selectors(q)?;
            let mut store = lock(&shared.store);
            let victims: Vec<Value> = store
                .list(ri, ns.as_deref(), None)?
                .into_iter()
                .filter(|o| ls.matches(o) && fs.matches(o))
                .collect();
            let mut items = Vec::new();
            for v in victims {
                let (vns, vname) = (meta_str(&v, "namespace"), meta_str(&v, "name"));
                let vns = (!vns.is_empty()).then_some(vns.as_str());
                items.push(store.delete(ri, vns, &vname, None, dry)?);
            }
            let r = &RESOURCES[ri];
            let rv = store.resource_version().to_string();
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                    "metadata": {"resourceVersion": rv}, "items": items,
                }),
            ))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )),
    }
}

fn meta_str(v: &Value, f: &str) -> String {
    v.pointer(&format!("/metadata/{f}"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site, the request's parts"
)]
fn patch_object(
    shared: &Shared,
    ri: usize,
    ns: Option<&str>,
    name: &str,
    sub: Sub,
    content_type: &str,
    body: &[u8],
    dry: bool,
) -> Result<(u16, Value), ApiError> {
    let mut store = lock(&shared.store);
    let current = match store.get(ri, ns, name) {
        Ok(cur) => cur,
        // Server-side apply creates what does not exist.
        Err(e)
            if e.code == 404
                && content_type == "application/apply-patch+yaml"
                && sub == Sub::Main =>
        {
            let obj = parse_json(content_type, body)?;
            return Ok((201, store.create(ri, ns, obj, dry)?));
        }
        Err(e) => return Err(e),
    };
    let p = parse_json(content_type, body)?;
    let patched = match content_type {
        "application/merge-patch+json" | "application/apply-patch+yaml" => {
            let mut t = current;
            patch::merge(&mut t, &p);
            t
        }
        "application/strategic-merge-patch+json" => {
            let mut t = current;
            patch::strategic(&mut t, &p);
            t
        }
        "application/json-patch+json" => patch::json_patch(&current, &p)
            .map_err(|e| ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}")))?,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"),
            ))
        }
    };
    Ok((200, store.update(ri, ns, name, patched, sub, dry)?))
}

fn selectors(q: &Query) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let ls = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fs = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    Ok((ls, fs))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    String::from_utf8(bytes?).ok()
}

fn list(shared: &Shared, ri: usize, ns: Option<&str>, q: &Query) -> Result<Value, ApiError> {
    let r = &RESOURCES[ri];
    let (ls, fs) = selectors(q)?;
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
    // A continue token is `hex(rv \n namespace \n name)`: the list's resourceVersion and
    // the last key returned, as the real server's (base64 JSON) token holds.
    let token = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let bad = || ApiError::bad_request("continue key is not valid: illegal base64 data");
            let text = unhex(c).ok_or_else(bad)?;
            let mut parts = text.splitn(3, '\n');
            let rv: u64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
            let (kns, kname) = (parts.next().ok_or_else(bad)?, parts.next().ok_or_else(bad)?);
            Some((rv, (kns.to_string(), kname.to_string())))
        }
        None => None,
    };
    let exact = match (q.get("resourceVersion"), q.get("resourceVersionMatch")) {
        (Some(rv), Some("Exact")) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?,
        ),
        _ => None,
    };
    let at = token.as_ref().map(|(rv, _)| *rv).or(exact);
    let store = lock(&shared.store);
    let current = store.resource_version();
    let list_rv = at.unwrap_or(current).min(current);
    let items = store.list(ri, ns, at).map_err(|e| {
        if token.is_some() {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.")
        } else {
            e
        }
    })?;
    drop(store);
    let key = |o: &Value| (meta_str(o, "namespace"), meta_str(o, "name"));
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|o| token.as_ref().is_none_or(|(_, after)| key(o) > *after))
        .filter(|o| ls.matches(o) && fs.matches(o))
        .collect();
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if limit > 0 && items.len() > limit {
        let remaining = items.len() - limit;
        items.truncate(limit);
        let (kns, kname) = key(items.last().expect("limit > 0"));
        metadata["continue"] = json!(hex(&format!("{list_rv}\n{kns}\n{kname}")));
        if ls.is_empty() && fs.is_empty() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    if !r.crd {
        for o in items.iter_mut().filter_map(Value::as_object_mut) {
            o.remove("apiVersion");
            o.remove("kind");
        }
    }
    Ok(json!({
        "kind": format!("{}List", r.kind),
        "apiVersion": r.api_version(),
        "metadata": metadata,
        "items": items,
    }))
}

/// What a watch needs besides its channels.
struct WatchSpec {
    ri: usize,
    ns: Option<String>,
    ls: LabelSelector,
    fs: FieldSelector,
    bookmarks: bool,
    initial_end: bool,
    timeout: Option<Duration>,
}

impl WatchSpec {
    /// The event this watch sees for a change, if any: an update that makes an object
    /// match is ADDED, one that makes it stop matching is DELETED (with the previous
    /// object at the new resourceVersion), as the real server's watch cache does.
    fn convert(&self, ev: &Event) -> Option<(EventType, Value)> {
        if ev.res != self.ri {
            return None;
        }
        if let Some(ns) = &self.ns {
            if meta_str(&ev.object, "namespace") != *ns {
                return None;
            }
        }
        let matches = |o: &Value| self.ls.matches(o) && self.fs.matches(o);
        let now = matches(&ev.object);
        let before = ev.prev.as_ref().is_some_and(matches);
        match ev.ty {
            EventType::Added => now.then(|| (EventType::Added, ev.object.clone())),
            EventType::Deleted => before.then(|| (EventType::Deleted, ev.object.clone())),
            EventType::Modified => match (before, now) {
                (true, true) => Some((EventType::Modified, ev.object.clone())),
                (false, true) => Some((EventType::Added, ev.object.clone())),
                (true, false) => {
                    let mut old = ev.prev.clone().expect("before implies prev");
                    old["metadata"]["resourceVersion"] = json!(ev.rv.to_string());
                    Some((EventType::Deleted, old))
                }
                (false, false) => None,
            },
        }
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let r = &RESOURCES[self.ri];
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}),
        )
    }
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("json");
    v.push(b'\n');
    Bytes::from(v)
}

fn stream_response(rx: mpsc::Receiver<Result<Frame<Bytes>, io::Error>>) -> Response<Body> {
    let mut rx = rx;
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header("Cache-Control", "no-cache, private")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response")
}

fn start_watch(
    shared: &Arc<Shared>,
    ri: usize,
    ns: Option<String>,
    q: &Query,
) -> Result<Response<Body>, ApiError> {
    let (ls, fs) = selectors(q)?;
    let initial_events = q.flag("sendInitialEvents");
    let from = match q.get("resourceVersion") {
        _ if initial_events => None,
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?,
        ),
    };
    let spec = WatchSpec {
        ri,
        ns,
        ls,
        fs,
        bookmarks: q.flag("allowWatchBookmarks"),
        initial_end: initial_events,
        timeout: q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .filter(|t| *t > 0)
            .map(Duration::from_secs),
    };
    shared.count(|s| s.watches_opened += 1);
    let registered = lock(&shared.store).watch(ri, spec.ns.as_deref(), from);
    let (initial, start_rv, live) = match registered {
        Ok(r) => r,
        Err(e) => {
            // The real server answers 200 and sends the 410 inside the stream.
            shared.count(|s| s.gone_sent += 1);
            return Ok(full(
                200,
                "application/json",
                line("ERROR", &e.status()).to_vec(),
            ));
        }
    };
    let (tx, rx) = mpsc::channel(64);
    let shared = shared.clone();
    tokio::spawn(async move {
        shared.count(|s| s.watches_active += 1);
        run_watch(&shared, spec, initial, start_rv, live, tx).await;
        shared.count(|s| s.watches_active -= 1);
    });
    Ok(stream_response(rx))
}

async fn run_watch(
    shared: &Shared,
    spec: WatchSpec,
    initial: Vec<Arc<Event>>,
    start_rv: u64,
    mut live: mpsc::UnboundedReceiver<Arc<Event>>,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
) {
    let mut dropped = shared.drop_watches.subscribe();
    dropped.mark_unchanged();
    let send = |b: Bytes| tx.send(Ok(Frame::data(b)));
    for ev in &initial {
        if let Some((ty, obj)) = spec.convert(ev) {
            if send(line(ty.as_str(), &obj)).await.is_err() {
                return;
            }
            shared.count(|s| s.watch_events_sent += 1);
        }
    }
    if spec.initial_end && spec.bookmarks {
        if send(spec.bookmark(start_rv, true)).await.is_err() {
            return;
        }
        shared.count(|s| s.bookmarks_sent += 1);
    }
    let every = shared.options.bookmark_interval;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut last_rv = start_rv;
    loop {
        tokio::select! {
            ev = live.recv() => {
                let Some(ev) = ev else { return };
                last_rv = ev.rv;
                if let Some((ty, obj)) = spec.convert(&ev) {
                    if send(line(ty.as_str(), &obj)).await.is_err() {
                        return;
                    }
                    shared.count(|s| s.watch_events_sent += 1);
                }
            }
            _ = tick.tick(), if spec.bookmarks => {
                if send(spec.bookmark(last_rv, false)).await.is_err() {
                    return;
                }
                shared.count(|s| s.bookmarks_sent += 1);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => return,
            _ = dropped.changed() => {
                // An error in the body makes hyper close the connection without the final
                // chunk: the client sees the stream break, not end.
                let _ = tx.send(Err(io::Error::other("watch dropped by kube-double"))).await;
                shared.count(|s| s.watches_dropped += 1);
                return;
            }
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |p: &str| route(&p.split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>());
        assert!(matches!(
            r("/api/v1/pods"),
            Ok(Target::Collection { ns: None, .. })
        ));
        assert!(matches!(
            r("/api/v1/namespaces"),
            Ok(Target::Collection { ns: None, .. })
        ));
        assert!(matches!(
            r("/api/v1/namespaces/a/pods"),
            Ok(Target::Collection { ns: Some(_), .. })
        ));
        assert!(matches!(
            r("/api/v1/namespaces/a"),
            Ok(Target::Object { sub: Sub::Main, .. })
        ));
        assert!(matches!(
            r("/api/v1/namespaces/a/status"),
            Ok(Target::Object {
                sub: Sub::Status,
                ..
            })
        ));
        assert!(matches!(
            r("/api/v1/namespaces/a/pods/p/status"),
            Ok(Target::Object {
                sub: Sub::Status,
                ..
            })
        ));
        assert!(matches!(
            r("/apis/gateway.networking.k8s.io/v1/namespaces/a/httproutes/h"),
            Ok(Target::Object { .. })
        ));
        assert!(r("/api/v1/pods/p").is_err());
        assert!(
            r("/api/v1/configmaps/c/status").is_err()
                || r("/api/v1/namespaces/a/configmaps/c/status").is_err()
        );
        assert!(r("/api/v1/nope").is_err());
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("labelSelector=app+in+%28a%2Cb%29&watch=1&x"));
        assert_eq!(q.get("labelSelector"), Some("app in (a,b)"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(unhex(&hex("12\nns\nname")).as_deref(), Some("12\nns\nname"));
    }
}

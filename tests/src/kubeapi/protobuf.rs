//! Just enough of the Kubernetes protobuf encoding to read what kubectl's typed clients
//! send. kubectl's generic paths (`create -f`, `apply`, `replace`, `patch`, `label`, ...)
//! send JSON, but its generator commands (`kubectl create namespace|serviceaccount|
//! configmap`) send `application/vnd.kubernetes.protobuf` and do not fall back to JSON on
//! a 415. Decoded here: the `k8s\0` + `runtime.Unknown` envelope, `ObjectMeta`, and the
//! kinds whose other fields are simple (Namespace, ServiceAccount, ConfigMap). Any other
//! kind gets 415 with a hint (e.g. `kubectl run`, `kubectl create service`: use a manifest).

use serde_json::{json, Map, Value};

struct Reader<'a>(&'a [u8]);

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn next(&mut self) -> Option<Result<(u64, Field<'a>), String>> {
        if self.0.is_empty() {
            return None;
        }
        let bad = || Err("truncated protobuf".to_string());
        let Some(tag) = self.varint() else {
            return Some(bad());
        };
        let field = match tag & 7 {
            0 => match self.varint() {
                Some(v) => Field::Varint(v),
                None => return Some(bad()),
            },
            2 => {
                let Some(len) = self.varint().and_then(|l| usize::try_from(l).ok()) else {
                    return Some(bad());
                };
                if len > self.0.len() {
                    return Some(bad());
                }
                let (b, rest) = self.0.split_at(len);
                self.0 = rest;
                Field::Bytes(b)
            }
            1 if self.0.len() >= 8 => {
                self.0 = &self.0[8..];
                Field::Varint(0)
            }
            5 if self.0.len() >= 4 => {
                self.0 = &self.0[4..];
                Field::Varint(0)
            }
            w => return Some(Err(format!("unsupported protobuf wire type {w}"))),
        };
        Some(Ok((tag >> 3, field)))
    }
}

fn fields(b: &[u8]) -> Result<Vec<(u64, Field<'_>)>, String> {
    let mut r = Reader(b);
    let mut out = Vec::new();
    while let Some(f) = r.next() {
        out.push(f?);
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "invalid UTF-8 in protobuf string".to_string())
}

/// A `map<string, string>` entry (key = 1, value = 2).
fn map_entry(b: &[u8]) -> Result<(String, String), String> {
    let (mut k, mut v) = (String::new(), String::new());
    for (n, f) in fields(b)? {
        match (n, f) {
            (1, Field::Bytes(x)) => k = string(x)?,
            (2, Field::Bytes(x)) => v = string(x)?,
            _ => {}
        }
    }
    Ok((k, v))
}

fn insert_entry(obj: &mut Map<String, Value>, key: &str, b: &[u8]) -> Result<(), String> {
    let (k, v) = map_entry(b)?;
    let m = obj.entry(key).or_insert_with(|| json!({}));
    m[k] = json!(v);
    Ok(())
}

/// The fields a client sets on create; server-set ones (uid, timestamps, ...) are ignored.
fn object_meta(b: &[u8]) -> Result<Value, String> {
    let mut m = Map::new();
    for (n, f) in fields(b)? {
        if matches!(f, Field::Bytes(x) if x.is_empty()) {
            // gogo-protobuf writes every optional string, empty or not.
            continue;
        }
        match (n, f) {
            (1, Field::Bytes(x)) => drop(m.insert("name".into(), json!(string(x)?))),
            (2, Field::Bytes(x)) => drop(m.insert("generateName".into(), json!(string(x)?))),
            (3, Field::Bytes(x)) => drop(m.insert("namespace".into(), json!(string(x)?))),
            (6, Field::Bytes(x)) => drop(m.insert("resourceVersion".into(), json!(string(x)?))),
            (11, Field::Bytes(x)) => insert_entry(&mut m, "labels", x)?,
            (12, Field::Bytes(x)) => insert_entry(&mut m, "annotations", x)?,
            (14, Field::Bytes(x)) => {
                let list = m.entry("finalizers").or_insert_with(|| json!([]));
                list.as_array_mut().expect("array").push(json!(string(x)?));
            }
            _ => {}
        }
    }
    Ok(Value::Object(m))
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let raw_unknown = body
        .strip_prefix(b"k8s\0")
        .ok_or("protobuf body without the k8s magic prefix")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(raw_unknown)? {
        match (n, f) {
            (1, Field::Bytes(tm)) => {
                for (n, f) in fields(tm)? {
                    match (n, f) {
                        (1, Field::Bytes(x)) => api_version = string(x)?,
                        (2, Field::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    for (n, f) in fields(raw)? {
        match (kind.as_str(), n, f) {
            (_, 1, Field::Bytes(x)) => drop(obj.insert("metadata".into(), object_meta(x)?)),
            ("Namespace", _, _) => {}
            ("ConfigMap", 2, Field::Bytes(x)) => insert_entry(&mut obj, "data", x)?,
            ("ConfigMap", 4, Field::Varint(v)) => drop(obj.insert("immutable".into(), json!(v != 0))),
            ("ServiceAccount", 4, Field::Varint(v)) => {
                drop(obj.insert("automountServiceAccountToken".into(), json!(v != 0)))
            }
            ("ConfigMap" | "ServiceAccount", _, _) => {
                return Err(format!("kube-double does not decode field {n} of a protobuf {kind}"))
            }
            _ => {
                return Err(format!(
                    "kube-double decodes protobuf only for Namespace, ServiceAccount and ConfigMap, not {kind}: create it from a manifest (kubectl create -f / apply -f), which kubectl sends as JSON"
                ))
            }
        }
    }
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, b: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, u8::try_from(b.len()).unwrap()];
        v.extend_from_slice(b);
        v
    }

    #[test]
    fn decodes_a_configmap() {
        let meta = [
            field(1, b"cfg"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"v")].concat()),
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &tm), field(2, &raw)].concat();
        assert_eq!(
            decode(&body).unwrap(),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cfg", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
    }
}

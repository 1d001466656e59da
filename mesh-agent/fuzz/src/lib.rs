//! Shared pieces of the fuzz targets: the xDS client's acceptance path (what a proxy does
//! with resources it receives), the configuration the HTTP target serves, and the seed
//! writer (`MESH_FUZZ_WRITE_SEEDS`, see docs/fuzzing.md).

use std::path::Path;

use envoy_types::pb::{envoy::service::discovery::v3::DiscoveryResponse, google::protobuf::Any};
use mesh_agent::{
    control::translate::Translator,
    enrol::file::MeshFile,
    proxy::xds::client::{Core, Kind},
};

/// A standalone file with every L7 feature the translator knows, and no endpoints, so a
/// forwarded request ends in a local 503 instead of a connection attempt.
pub const FEATURES_YAML: &str = r#"
exclude:
  - { cidr: 10.96.0.10/32, port: 53 }
namespaces:
  - name: shop
    labels: { mesh-agent.io/dataplane-mode: ambient }
  - name: cache
    mode: direct
workloads:
  - { name: web, namespace: shop, ip: 10.244.1.12, netns: /run/netns/web, labels: { app: web } }
  - { name: redis, namespace: cache, ip: 10.244.1.20, netns: /run/netns/redis, mode: proxied }
services:
  - name: reviews
    namespace: shop
    vip: 10.96.0.10
    ports:
      - { port: 80, target_port: 8080, protocol: http }
      - { port: 81, protocol: auto }
      - { port: 82, protocol: http2 }
      - { port: 83, protocol: grpc }
    lb: { policy: ring_hash, hash_header: x-user }
    connect_timeout_ms: 1000
    max_request_headers_kb: 4
    circuit_breaker: { max_connections: 10, max_pending_requests: 10, max_requests: 10, max_retries: 3 }
    outlier_detection: { consecutive_5xx: 5, base_ejection_ms: 30000, max_ejection_percent: 10, interval_ms: 10000 }
    rate_limit: { max_tokens: 1000, tokens_per_fill: 1000, fill_interval_ms: 1000 }
    routes:
      - name: canary
        match:
          prefix: /api
          headers:
            - { name: x-canary, exact: "1" }
            - { name: x-debug, present: true, invert: true }
          query:
            - { name: version, exact: v2 }
        backends:
          - { service: reviews-v2, weight: 90 }
          - { service: reviews, weight: 10 }
        timeout_ms: 2000
        retries:
          attempts: 3
          on: "5xx,reset,connect-failure,retriable-status-codes"
          statuses: [409]
          per_try_timeout_ms: 500
          backoff_ms: 25
        request_headers: { add: { x-env: canary }, remove: [ x-internal ] }
        response_headers: { add: { x-served-by-mesh: "1" } }
      - name: versioned
        match: { regex: '/v[0-9]+/.*', headers: [ { name: x-user, regex: '[a-z]{1,8}' } ] }
        backends: [ { service: reviews-v2 } ]
      - name: exact
        match: { path: /exact, query: [ { name: q, prefix: a }, { name: p, present: true } ] }
      - name: ratelimited
        match: { prefix: /search }
        rate_limit: { max_tokens: 2, fill_interval_ms: 1000 }
      - name: slow
        match: { prefix: /slow }
        fault: { delay_ms: 200, delay_percent: 100 }
      - name: chaos
        match: { headers: [ { name: x-chaos, exact: "1" } ] }
        fault: { abort_status: 503, abort_percent: 100 }
      - name: grpc-chaos
        match: { prefix: /pkg.Svc/ }
        fault: { abort_grpc_status: 14, abort_percent: 100 }
      - name: gone
        match: { prefix: /old }
        direct_response: { status: 410, body: "moved away" }
  - name: reviews-v2
    namespace: shop
    vip: 10.96.0.11
    ports: [ { port: 80, protocol: http } ]
"#;

/// The original destinations `FEATURES_YAML` has HTTP listeners for.
pub const FEATURES_LISTENERS: [&str; 5] = [
    "10.96.0.10:80",
    "10.96.0.10:81",
    "10.96.0.10:82",
    "10.96.0.10:83",
    "10.96.0.11:80",
];

/// What the embedded control plane serves for a file (as `app` translates it).
pub fn translate(file: &MeshFile) -> Vec<(String, Any)> {
    Translator::default().resources(&file.services, &file.members())
}

/// Feeds resources to a fresh xDS client core, one state-of-the-world response per type,
/// as the agent's own proxy receives them. Returns the core and the NACK reasons.
pub fn accept(resources: &[(String, Any)]) -> (Core, Vec<String>) {
    let mut core = Core::new(false);
    let mut nacks = Vec::new();
    for kind in Kind::ALL {
        let url = kind.type_url();
        let resp = DiscoveryResponse {
            version_info: "1".into(),
            nonce: "n1".into(),
            type_url: url.clone(),
            resources: resources
                .iter()
                .filter(|(_, a)| a.type_url == url)
                .map(|(_, a)| a.clone())
                .collect(),
            ..Default::default()
        };
        let (req, _) = core.on_sotw(resp);
        if let Some(e) = req.error_detail {
            nacks.push(e.message);
        }
    }
    (core, nacks)
}

/// Writes seed inputs for the xDS and HTTP targets under `dir/<target>/` (the files in
/// `fuzz/corpus/` came from here; the other targets' seeds are written by hand).
pub fn write_seeds(dir: &Path) -> std::io::Result<()> {
    use prost::Message as _;
    let file = MeshFile::parse(Path::new("seed.yaml"), FEATURES_YAML).expect("seed file");
    let resources = translate(&file);
    let xds = dir.join("xds_convert");
    std::fs::create_dir_all(&xds)?;
    for (i, (name, any)) in resources.iter().enumerate() {
        let kind = Kind::ALL
            .iter()
            .position(|k| k.type_url() == any.type_url)
            .expect("a known type") as u8;
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&any.value);
        let name = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        std::fs::write(xds.join(format!("seed-{i:02}-{name}")), bytes)?;
    }
    // Whole responses: every resource of a type in one SotW response (selector 4).
    for kind in Kind::ALL {
        let resp = DiscoveryResponse {
            version_info: "1".into(),
            nonce: "n1".into(),
            type_url: kind.type_url(),
            resources: resources
                .iter()
                .filter(|(_, a)| a.type_url == kind.type_url())
                .map(|(_, a)| a.clone())
                .collect(),
            ..Default::default()
        };
        let mut bytes = vec![4u8];
        resp.encode(&mut bytes).expect("a Vec grows");
        std::fs::write(xds.join(format!("seed-sotw-{kind:?}")), bytes)?;
    }
    let sf = dir.join("standalone_file");
    std::fs::create_dir_all(&sf)?;
    std::fs::write(sf.join("seed-features.yaml"), FEATURES_YAML)?;
    Ok(())
}

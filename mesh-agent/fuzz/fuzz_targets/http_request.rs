//! The L7 engine's server side (`proxy::http::L7::serve`): the input is what a client
//! sends on one captured connection (HTTP/1.x or h2c, sniffed like a real one), served
//! by the configuration the features file translates to: routing on path, headers and
//! query, direct responses, faults, rate limits, header rewrites, gRPC local replies.
//! Its services have no endpoints, so forwarding ends in a local 503 and nothing leaves
//! the process. The first byte picks the listener (`FEATURES_LISTENERS`, its low 7 bits
//! modulo their number) and, by its top bit, the HTTP/2 server: clear, the own one
//! (`--l7-h2-server own`), set, hyper's (HTTP/1.x inputs are served the same either way).
#![no_main]

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
};

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    enrol::file::MeshFile,
    proxy::{
        config::ProxyConfig,
        http::{H2Server, L7Metrics, L7},
    },
};
use mesh_agent_fuzz::{accept, translate, FEATURES_LISTENERS, FEATURES_YAML};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn config() -> &'static Arc<ProxyConfig> {
    static CONFIG: OnceLock<Arc<ProxyConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let file = MeshFile::parse(Path::new("features.yaml"), FEATURES_YAML).expect("features");
        let (core, nacks) = accept(&translate(&file));
        assert!(nacks.is_empty(), "{nacks:?}");
        let (config, warming) = core.accepted.build();
        assert!(warming.listeners.is_empty(), "{warming:?}");
        for l in FEATURES_LISTENERS {
            assert!(
                config.listener(l.parse().unwrap()).is_some(),
                "no listener {l}"
            );
        }
        Arc::new(config)
    })
}

fuzz_target!(
    init: {
        config();
    },
    |data: &[u8]| {
        let Some((&pick, input)) = data.split_first() else {
            return;
        };
        let dst: SocketAddr = FEATURES_LISTENERS[usize::from(pick & 0x7f) % FEATURES_LISTENERS.len()]
            .parse()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            // Fresh engine state (rate-limit buckets, balancers) per input, so a run is
            // reproducible from its input alone.
            let (_tx, rx) = tokio::sync::watch::channel(config().clone());
            let l7 = L7::new(rx, Arc::new(L7Metrics::default()));
            l7.set_h2_server(if pick & 0x80 == 0 {
                H2Server::Own
            } else {
                H2Server::Hyper
            });
            let (client, server) = tokio::io::duplex(64 * 1024);
            // Never drained: the trigger lives as long as the connection.
            let (_drain, watch) = mesh_agent::lifecycle::drain::new();
            let serve = tokio::spawn(l7.serve(server, dst, "fuzz/client".into(), watch));
            // Write and read at once: pipelined requests can fill the reply direction
            // before the last request is written.
            let (mut rd, mut wr) = tokio::io::split(client);
            let write = async {
                let _ = wr.write_all(input).await;
                let _ = wr.shutdown().await;
            };
            let mut out = Vec::new();
            let _ = tokio::join!(write, rd.read_to_end(&mut out));
            let _ = serve.await;
        });
    }
);

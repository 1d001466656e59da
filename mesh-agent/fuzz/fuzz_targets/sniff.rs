//! Protocol sniffing on a fresh connection (`proxy::http::detect`): HTTP/1.x, h2c prior
//! knowledge, or opaque. The first byte sets how many bytes the in-memory connection
//! carries per read (1-64), so verdicts are reached over many read boundaries.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_agent::proxy::http::{detect, Sniffed};
use tokio::io::AsyncWriteExt as _;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(usize::from(step % 64) + 1);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
        });
        let (got, verdict) = detect(&mut server, Duration::from_millis(300))
            .await
            .expect("in-memory reads do not fail");
        writer.abort();
        assert!(
            data[1..].starts_with(&got),
            "detect returned bytes not sent"
        );
        match verdict {
            Sniffed::Http2 => assert!(got.starts_with(H2_PREFACE)),
            Sniffed::Http1 => {
                let end = got
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("an HTTP/1 verdict has a request line");
                let line = &got[..end];
                assert!(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"));
            }
            Sniffed::Opaque => {}
        }
    });
});

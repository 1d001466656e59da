//! Test helpers both L7 engines' upgrade tests use (the sending side's, `proxy::http`,
//! and the receiving side's, `proxy::secure::http`): the two ends of an HTTP/1.1 upgrade
//! spliced by the proxy between them.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The endpoint's side once it sent its `101`: echoes every byte until the client's end of
/// stream, then sends `bye` and ends its own.
pub(crate) async fn echo_then_bye(s: &mut TcpStream) {
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await.unwrap();
    w.write_all(b"bye").await.unwrap();
    w.shutdown().await.unwrap();
}

/// The client's side through the splice to `echo_then_bye`, once it read the `101` and the
/// endpoint's early bytes: `bytes` of a pattern written while the echo comes back, then a
/// half-close; back must come `client_early` (sent behind the request), the pattern and
/// `bye`, whole and in order.
pub(crate) async fn echo_through_splice(s: TcpStream, client_early: &[u8], bytes: u32) {
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    drop(writer.await.unwrap());
    let mut want = client_early.to_vec();
    want.extend_from_slice(&data);
    want.extend_from_slice(b"bye");
    assert_eq!(back.len(), want.len());
    assert!(back == want, "the spliced bytes differ");
}

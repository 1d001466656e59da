//! Clients and servers of `cargo xtask bench` that the Debian tools (sockperf, iperf3) do
//! not provide. They run inside the simulated pods, print one line `key value ...` that
//! xtask/bench.sh parses, and use blocking std sockets only (no runtime to measure), but
//! `grpc` (below).
//!
//! ```text
//! benchtool reply --listen ADDR              one connection at a time: read 64 bytes, write
//!                                            them back, close first (so TIME_WAIT stays on
//!                                            the server side and client ports recycle)
//! benchtool crr --to ADDR --secs S           connect, 64-byte exchange, wait for the close;
//!                                            prints "conns N per_sec X errors E first_error M"
//! benchtool pingpong --to ADDR --count N     64-byte ping-pong on one connection;
//!                                            prints "p50_us .. p99_us .. p999_us .. tps .."
//! benchtool hold --listen ADDR               accept and keep every connection, read nothing
//! benchtool hold-client --to ADDR --conns N --secs S
//!                                            open N connections, print "open N", keep them S s
//! benchtool grpc --to ADDR --authority HOST --conns C --streams M --secs S --warm N
//!                                            gRPC unary calls over h2c (prior knowledge): C
//!                                            connections, M calls in flight on each; N calls
//!                                            of warm-up, then S seconds measured; prints
//!                                            "requests N rps X p50_us .. p99_us .. errors E
//!                                            first_error M"
//! ```
//!
//! benchtool grpc-server --listen ADDR         answers every gRPC unary call over h2c (prior
//!                                            knowledge) once its request has ended: one
//!                                            12-byte message, `grpc-status: 0` trailers
//!
//! `grpc` and `grpc-server` are the two with a runtime: h2 on a current-thread tokio runtime (one
//! thread, like `h2load -t1`), gRPC's framing by hand (a 5-byte length prefix per message,
//! `grpc-status` in the trailers), so the client costs about what h2load costs and the
//! figures compare with the HTTP/2 rows.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const MSG: usize = 64;

fn flag(args: &[String], name: &str) -> Result<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .with_context(|| format!("{name} is required"))
}

fn num(args: &[String], name: &str) -> Result<f64> {
    flag(args, name)?
        .parse()
        .with_context(|| format!("{name}: not a number"))
}

fn addr(args: &[String], name: &str) -> Result<SocketAddr> {
    flag(args, name)?
        .parse()
        .with_context(|| format!("{name}: not an IP:PORT"))
}

fn reply(args: &[String]) -> Result<()> {
    let l = TcpListener::bind(addr(args, "--listen")?)?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut buf = [0u8; MSG];
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        c.set_nodelay(true).ok();
        if c.read_exact(&mut buf).is_ok() {
            c.write_all(&buf).ok();
        }
        // Dropping closes first: the FIN comes from this side.
    }
    Ok(())
}

fn exchange(to: SocketAddr, msg: &[u8; MSG]) -> std::io::Result<()> {
    let mut c = TcpStream::connect(to)?;
    c.set_nodelay(true)?;
    c.write_all(msg)?;
    let mut buf = [0u8; MSG];
    c.read_exact(&mut buf)?;
    // Wait for the server's close, so a connection is counted once it is fully over.
    let mut rest = [0u8; 1];
    match c.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::other("unexpected bytes after the reply")),
    }
}

fn crr(args: &[String]) -> Result<()> {
    let to = addr(args, "--to")?;
    let secs = num(args, "--secs")?;
    let msg = [7u8; MSG];
    let (mut conns, mut errors) = (0u64, 0u64);
    let mut first_error = String::from("-");
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        match exchange(to, &msg) {
            Ok(()) => conns += 1,
            Err(e) => {
                if errors == 0 {
                    first_error = e.to_string().replace(' ', "_");
                }
                errors += 1;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "conns {conns} per_sec {:.1} errors {errors} first_error {first_error}",
        conns as f64 / elapsed
    );
    Ok(())
}

fn pingpong(args: &[String]) -> Result<()> {
    let count = num(args, "--count")? as usize;
    let warmup = 100;
    let mut c = TcpStream::connect(addr(args, "--to")?)?;
    c.set_nodelay(true)?;
    let msg = [7u8; MSG];
    let mut buf = [0u8; MSG];
    let mut lat = Vec::with_capacity(count);
    let mut start = Instant::now();
    for i in 0..count + warmup {
        if i == warmup {
            start = Instant::now();
        }
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut buf)?;
        if i >= warmup {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    println!(
        "p50_us {:.2} p99_us {:.2} p999_us {:.2} tps {:.1}",
        p(0.5),
        p(0.99),
        p(0.999),
        count as f64 / elapsed
    );
    Ok(())
}

fn hold(args: &[String]) -> Result<()> {
    let l = TcpListener::bind(addr(args, "--listen")?)?;
    println!("listening");
    std::io::stdout().flush()?;
    let mut kept = Vec::new();
    for c in l.incoming() {
        match c {
            Ok(c) => kept.push(c),
            // Out of fds: say so once, the client's count will show the shortfall.
            Err(e) => {
                eprintln!("hold: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

fn hold_client(args: &[String]) -> Result<()> {
    let to = addr(args, "--to")?;
    let n = num(args, "--conns")? as usize;
    let secs = num(args, "--secs")?;
    let mut kept = Vec::with_capacity(n);
    for i in 0..n {
        let c = TcpStream::connect(to).with_context(|| format!("connection {i} of {n}"))?;
        kept.push(c);
    }
    // Every connection has been accepted by whatever sits at `to` (the proxy accepts,
    // then dials the server): give that side a moment to finish its dials too.
    std::thread::sleep(Duration::from_millis(500));
    println!("open {}", kept.len());
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    Ok(())
}

/// The unary call every `grpc` request makes: `bench.Echo/Call` with a 12-byte message.
const GRPC_PATH: &str = "/bench.Echo/Call";
const GRPC_MESSAGE: &[u8] = b"\x0a\x0ahello mesh";

/// How one call ended: its latency, or why it failed.
async fn grpc_call(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    uri: &http::Uri,
    msg: &bytes::Bytes,
) -> std::result::Result<(), String> {
    let req = http::Request::post(uri.clone())
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let mut ready = client.clone().ready().await.map_err(|e| e.to_string())?;
    let (resp, mut send) = ready.send_request(req, false).map_err(|e| e.to_string())?;
    send.send_data(msg.clone(), true)
        .map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("http_status_{}", resp.status().as_u16()));
    }
    // Trailers-only: the status came with the head (an error the proxy made).
    if let Some(s) = resp.headers().get("grpc-status") {
        return Err(format!("grpc_status_{}", s.to_str().unwrap_or("?")));
    }
    let mut body = resp.into_body();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if len < 5 {
        return Err("no_grpc_message".into());
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(s) if s == "0" => Ok(()),
        Some(s) => Err(format!("grpc_status_{}", s.to_str().unwrap_or("?"))),
        None => Err("no_grpc_status".into()),
    }
}

/// One caller: `count` calls, or calls until `until`; their latencies (ns) and failures.
async fn grpc_caller(
    mut client: h2::client::SendRequest<bytes::Bytes>,
    uri: http::Uri,
    count: Option<usize>,
    until: Option<Instant>,
) -> (Vec<u64>, u64, Option<String>) {
    let mut framed = Vec::with_capacity(5 + GRPC_MESSAGE.len());
    framed.push(0);
    framed.extend_from_slice(&(GRPC_MESSAGE.len() as u32).to_be_bytes());
    framed.extend_from_slice(GRPC_MESSAGE);
    let msg = bytes::Bytes::from(framed);
    let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
    let mut n = 0;
    loop {
        if count.is_some_and(|c| n >= c) || until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        n += 1;
        let t = Instant::now();
        match grpc_call(&mut client, &uri, &msg).await {
            Ok(()) => lat.push(t.elapsed().as_nanos() as u64),
            Err(e) => {
                errors += 1;
                first.get_or_insert(e);
                // A broken connection fails every call at once: do not spin on it.
                if errors > 100 {
                    break;
                }
            }
        }
    }
    (lat, errors, first)
}

fn grpc(args: &[String]) -> Result<()> {
    let to = addr(args, "--to")?;
    let authority = flag(args, "--authority")?;
    let conns = num(args, "--conns")? as usize;
    let streams = num(args, "--streams")? as usize;
    let secs = num(args, "--secs")?;
    let warm = num(args, "--warm")? as usize;
    let uri: http::Uri = format!("http://{authority}{GRPC_PATH}")
        .parse()
        .context("--authority: not a host[:port]")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut clients = Vec::new();
        for i in 0..conns {
            let tcp = tokio::net::TcpStream::connect(to)
                .await
                .with_context(|| format!("connection {i} to {to}"))?;
            tcp.set_nodelay(true)?;
            let (client, conn) = h2::client::handshake(tcp).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    eprintln!("grpc: connection: {e}");
                }
            });
            clients.push(client);
        }
        let callers = conns * streams;
        let run = |count: Option<usize>, until: Option<Instant>| {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..callers {
                set.spawn(grpc_caller(
                    clients[i % conns].clone(),
                    uri.clone(),
                    count,
                    until,
                ));
            }
            set
        };
        let mut w = run(Some(warm.div_ceil(callers)), None);
        while w.join_next().await.is_some() {}
        let start = Instant::now();
        let mut set = run(None, Some(start + Duration::from_secs_f64(secs)));
        let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
        while let Some(r) = set.join_next().await {
            let (l, e, f) = r?;
            lat.extend(l);
            errors += e;
            first = first.or(f);
        }
        let elapsed = start.elapsed().as_secs_f64();
        lat.sort_unstable();
        let p = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
                .map_or(0.0, |&v| v as f64 / 1000.0)
        };
        println!(
            "requests {} rps {:.1} p50_us {:.1} p99_us {:.1} errors {errors} first_error {}",
            lat.len(),
            lat.len() as f64 / elapsed,
            p(0.5),
            p(0.99),
            first.unwrap_or_else(|| "-".into()).replace(' ', "_")
        );
        Ok(())
    })
}

/// Serves one h2c connection: every call read to its end, then answered.
async fn grpc_serve_conn(tcp: tokio::net::TcpStream, reply: bytes::Bytes) -> Result<()> {
    tcp.set_nodelay(true)?;
    let mut conn = h2::server::handshake(tcp).await?;
    while let Some(call) = conn.accept().await {
        let (req, mut respond) = call?;
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(chunk) = body.data().await {
                let Ok(chunk) = chunk else { return };
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let resp = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(())
                .expect("a static response head");
            let Ok(mut send) = respond.send_response(resp, false) else {
                return;
            };
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let _ = send.send_data(reply, false);
            let _ = send.send_trailers(trailers);
        });
    }
    Ok(())
}

/// A gRPC unary server for the L7 suite (nginx's static answer ends the call before the
/// request's body arrives, and nginx's own `grpc_pass` then fails the call with 502).
fn grpc_server(args: &[String]) -> Result<()> {
    let listen = addr(args, "--listen")?;
    let mut framed = Vec::with_capacity(5 + GRPC_MESSAGE.len());
    framed.push(0);
    framed.extend_from_slice(&(GRPC_MESSAGE.len() as u32).to_be_bytes());
    framed.extend_from_slice(GRPC_MESSAGE);
    let reply = bytes::Bytes::from(framed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!("listening");
        std::io::stdout().flush()?;
        loop {
            let (tcp, _) = l.accept().await?;
            let reply = reply.clone();
            tokio::spawn(async move {
                if let Err(e) = grpc_serve_conn(tcp, reply).await {
                    eprintln!("grpc-server: connection: {e}");
                }
            });
        }
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("reply") => reply(&args),
        Some("crr") => crr(&args),
        Some("pingpong") => pingpong(&args),
        Some("hold") => hold(&args),
        Some("hold-client") => hold_client(&args),
        Some("grpc") => grpc(&args),
        Some("grpc-server") => grpc_server(&args),
        _ => bail!(
            "usage: benchtool reply|crr|pingpong|hold|hold-client|grpc|grpc-server ... (see the source)"
        ),
    }
}

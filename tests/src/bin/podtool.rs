//! The small servers and clients that run inside simulated pods. Every client prints one
//! JSON line with what it measured, so tests assert on observable results.
//!
//! ```text
//! podtool echo  --listen ADDR            echo every byte back; half-close when the client does
//! podtool sink  --listen ADDR --delay-us N [--pause-ms M]  (wait M ms, then) read 16 KiB at a
//!                                        time with a pause (a slow reader),
//!                                        then answer "<bytes> <sha256>" and close
//! podtool reset --listen ADDR            read a little, then close with RST (SO_LINGER 0)
//! podtool echo-client --to ADDR --bytes N [--conns C]   send N bytes, read the echo back
//!                                        (event-loop I/O: non-blocking + poll, two threads)
//! podtool sink-client --to ADDR --bytes N  send N bytes fast with blocking 1 MiB writes,
//!                                        half-close, read the digest (event-loop read)
//! podtool reset-client --to ADDR          send, expect the reset to arrive as ECONNRESET
//! podtool ping --to ADDR --count N       64-byte ping-pong; prints latency percentiles
//! podtool peer --to ADDR                  connect; print the peer address getpeername() reports
//! ```
//! ADDR may be `[::]:port` (dual-stack listener) or `[::ffff:a.b.c.d]:port` (v6 socket to
//! a v4 peer).
#![expect(
    unsafe_code,
    reason = "poll(2), listen(2) and SO_LINGER on the pod tools' sockets"
)]

use std::{
    io::{BufRead, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> u64 {
    arg(args, name)
        .map(|v| v.parse().expect("number"))
        .unwrap_or(default)
}

fn addr(args: &[String], name: &str) -> SocketAddr {
    arg(args, name)
        .unwrap_or_else(|| panic!("{name} is required"))
        .parse()
        .expect("socket address")
}

/// Deterministic, incompressible-enough payload: xorshift bytes.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::EACCES) => "EACCES".into(),
        _ => e.to_string(),
    }
}

fn serve(args: &[String], handle: fn(TcpStream, &[String])) {
    let l = TcpListener::bind(addr(args, "--listen")).expect("bind");
    // std listens with a backlog of 128; a burst of 1,000 connects from the node proxy
    // would overflow it, and SYN retransmits (1 s, 3 s, 7 s...) can outlast the proxy's
    // connect timeout. Real servers ask for more; so do we.
    // SAFETY: listen(2) again on our own listening socket only raises the backlog.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    println!("listening");
    std::io::stdout().flush().ok();
    for c in l.incoming().flatten() {
        let a = args.to_vec();
        std::thread::spawn(move || handle(c, &a));
    }
}

fn echo(mut c: TcpStream, _: &[String]) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => {
                let _ = c.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn sink(mut c: TcpStream, args: &[String]) {
    let delay = Duration::from_micros(num(args, "--delay-us", 500));
    // A reader that does not read at all for a while.
    std::thread::sleep(Duration::from_millis(num(args, "--pause-ms", 0)));
    let mut buf = vec![0u8; 16 * 1024];
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut err = String::new();
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
                std::thread::sleep(delay);
            }
            Err(e) => {
                err = errno_name(&e);
                break;
            }
        }
    }
    let _ = c.write_all(format!("{n} {} {err}\n", hex(&h.finalize())).as_bytes());
}

fn reset(mut c: TcpStream, _: &[String]) {
    let mut buf = [0u8; 16];
    let _ = c.read(&mut buf);
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option struct of the stated size.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Waits until `fd` is ready for `events` (POLLIN/POLLOUT).
fn wait_ready(fd: i32, events: i16) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, -1) };
}

/// Event-loop style I/O (what Go, Java NIO, Node, Envoy, tokio do): non-blocking socket,
/// poll for readiness, then read. A read that returns EAGAIN right after poll reported the
/// socket readable is a spurious EAGAIN and is reported as an error.
fn read_evented(c: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    wait_ready(c.as_raw_fd(), libc::POLLIN);
    match c.read(buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        }
        r => r,
    }
}

fn write_all_evented(c: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match c.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_ready(c.as_raw_fd(), libc::POLLOUT)
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One echo exchange: a writer thread sends `data` then half-closes, this thread reads
/// everything back. Returns (bytes back, sha of bytes back, errors).
fn echo_once(
    to: SocketAddr,
    data: Arc<Vec<u8>>,
    start: Option<Arc<Barrier>>,
) -> (u64, String, Vec<String>) {
    let mut errors = Vec::new();
    let c = match TcpStream::connect(to) {
        Ok(c) => c,
        Err(e) => {
            return (
                0,
                String::new(),
                vec![format!("connect: {}", errno_name(&e))],
            )
        }
    };
    if let Some(b) = start {
        b.wait();
    }
    c.set_nonblocking(true).expect("nonblocking");
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || -> Result<(), String> {
        write_all_evented(&mut w, &data).map_err(|e| format!("write: {}", errno_name(&e)))?;
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {}", errno_name(&e)))
    });
    let mut r = c;
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_evented(&mut r, &mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) => {
                errors.push(format!("read: {}", errno_name(&e)));
                break;
            }
        }
    }
    if let Err(e) = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()))
    {
        errors.push(e);
    }
    (n, hex(&h.finalize()), errors)
}

fn echo_client(args: &[String]) {
    let to = addr(args, "--to");
    let bytes = num(args, "--bytes", 1 << 20) as usize;
    let conns = num(args, "--conns", 1) as usize;
    let data = Arc::new(payload(bytes, 0x5eed));
    let sent_sha = hex(&Sha256::digest(&*data));
    let barrier = (conns > 1).then(|| Arc::new(Barrier::new(conns)));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let d = data.clone();
            let b = barrier.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || echo_once(to, d, b))
                .expect("thread")
        })
        .collect();
    let mut ok = 0;
    let mut errors = Vec::new();
    let mut last_sha = String::new();
    let mut received = 0u64;
    for h in handles {
        let (n, sha, errs) = h.join().expect("join");
        received += n;
        if errs.is_empty() && n == bytes as u64 && sha == sent_sha {
            ok += 1;
        }
        last_sha = sha;
        errors.extend(errs);
    }
    errors.truncate(20);
    println!(
        "{}",
        serde_json::json!({"conns": conns, "intact": ok, "bytes_each": bytes, "received": received,
            "sha_sent": sent_sha, "sha_received": last_sha, "errors": errors})
    );
}

fn sink_client(args: &[String]) {
    let to = addr(args, "--to");
    let bytes = num(args, "--bytes", 1 << 20) as usize;
    let data = payload(bytes, 0xfa57);
    let sent_sha = hex(&Sha256::digest(&data));
    let mut errors = Vec::new();
    let mut c = TcpStream::connect(to).expect("connect");
    // Many blocking writes of 1 MiB: what a fast producer does.
    for chunk in data.chunks(1 << 20) {
        if let Err(e) = c.write_all(chunk) {
            errors.push(format!("write: {}", errno_name(&e)));
            break;
        }
    }
    let _ = c.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    c.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 256];
    loop {
        match read_evented(&mut c, &mut buf) {
            Ok(0) => break,
            Ok(k) => reply.extend_from_slice(&buf[..k]),
            Err(e) => {
                errors.push(format!("read: {}", errno_name(&e)));
                break;
            }
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    let mut parts = reply.split_whitespace();
    let got: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let got_sha = parts.next().unwrap_or("").to_owned();
    if let Some(e) = parts.next() {
        errors.push(format!("reader: {e}"));
    }
    println!(
        "{}",
        serde_json::json!({"sent": bytes, "received_by_reader": got, "sha_sent": sent_sha,
            "sha_reader": got_sha, "errors": errors})
    );
}

fn reset_client(args: &[String]) {
    let mut c = TcpStream::connect(addr(args, "--to")).expect("connect");
    // The reset may come before our write (a refused upstream resets at once): then the
    // write is where it shows, and a read after it would only see EOF.
    let outcome = if let Err(e) = c.write_all(b"hello") {
        errno_name(&e)
    } else {
        c.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        match read_evented(&mut c, &mut buf) {
            Ok(0) => "eof".to_owned(),
            Ok(_) => "data".to_owned(),
            Err(e) => errno_name(&e),
        }
    };
    println!("{}", serde_json::json!({"outcome": outcome}));
}

/// Connects and reports the peer address the socket sees (getpeername).
fn peer(args: &[String]) {
    let c = TcpStream::connect(addr(args, "--to")).expect("connect");
    // The far end may already have reset the connection (ENOTCONN): report, don't panic.
    let out = match c.peer_addr() {
        Ok(a) => serde_json::json!({"peer": a.to_string()}),
        Err(e) => serde_json::json!({"peer": null, "error": errno_name(&e)}),
    };
    println!("{out}");
}

fn ping(args: &[String]) {
    let count = num(args, "--count", 2000) as usize;
    let mut c = TcpStream::connect(addr(args, "--to")).expect("connect");
    c.set_nodelay(true).ok();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut lat = Vec::with_capacity(count);
    for i in 0..count + 100 {
        let t = Instant::now();
        c.write_all(&msg).expect("write");
        c.read_exact(&mut buf).expect("read");
        if i >= 100 {
            lat.push(t.elapsed().as_nanos() as u64);
        }
    }
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({"count": count, "p50_us": p(0.5), "p99_us": p(0.99), "p999_us": p(0.999)})
    );
}

/// Reads one HTTP/1.1 message head (up to the blank line) from a buffered reader.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            return Ok(None);
        }
        let l = l.trim_end().to_owned();
        if l.is_empty() {
            return Ok(Some(lines));
        }
        lines.push(l);
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head.iter().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// HTTP/1.1 keep-alive server: answers every request with its `--name` as the body,
/// `x-served-by: NAME`, and the request's `x-mesh` header back as `x-seen-mesh`.
fn http(c: TcpStream, args: &[String]) {
    let name = arg(args, "--name").unwrap_or_else(|| "server".into());
    let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
    let mut w = c;
    while let Ok(Some(head)) = read_head(&mut r) {
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let seen = header(&head, "x-mesh").unwrap_or("-");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-served-by: {name}\r\nx-seen-mesh: {seen}\r\n\r\n{name}",
            name.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// `http-client --to ADDR --requests N [--header 'k: v'] [--path P]`: N requests on one
/// keep-alive connection; prints counts by status, body and `x-seen-mesh` as JSON.
fn http_client(args: &[String]) {
    let to = addr(args, "--to");
    let n = num(args, "--requests", 1);
    let path = arg(args, "--path").unwrap_or_else(|| "/".into());
    let extra: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--header")
        .map(|w| format!("{}\r\n", w[1]))
        .collect();
    let mut status = std::collections::BTreeMap::<String, u64>::new();
    let mut bodies = std::collections::BTreeMap::<String, u64>::new();
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    let mut errors = Vec::new();
    let c = match TcpStream::connect(to) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "errors": [format!("connect: {}", errno_name(&e))] })
            );
            return;
        }
    };
    let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
    let mut w = c;
    for _ in 0..n {
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {to}\r\n{}\r\n",
            extra.concat()
        );
        if let Err(e) = w.write_all(req.as_bytes()) {
            errors.push(format!("write: {}", errno_name(&e)));
            break;
        }
        let head = match read_head(&mut r) {
            Ok(Some(h)) => h,
            Ok(None) => {
                errors.push("closed".into());
                break;
            }
            Err(e) => {
                errors.push(format!("read: {}", errno_name(&e)));
                break;
            }
        };
        let code = head[0].split(' ').nth(1).unwrap_or("?").to_owned();
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if let Err(e) = r.read_exact(&mut body) {
            errors.push(format!("body: {}", errno_name(&e)));
            break;
        }
        *status.entry(code).or_default() += 1;
        *bodies
            .entry(String::from_utf8_lossy(&body).into_owned())
            .or_default() += 1;
        *seen
            .entry(header(&head, "x-seen-mesh").unwrap_or("-").to_owned())
            .or_default() += 1;
    }
    println!(
        "{}",
        serde_json::json!({ "status": status, "bodies": bodies, "seen_mesh": seen, "errors": errors })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo") => serve(&args, echo),
        Some("sink") => serve(&args, sink),
        Some("reset") => serve(&args, reset),
        Some("http") => serve(&args, http),
        Some("http-client") => http_client(&args),
        Some("echo-client") => echo_client(&args),
        Some("sink-client") => sink_client(&args),
        Some("reset-client") => reset_client(&args),
        Some("ping") => ping(&args),
        Some("peer") => peer(&args),
        _ => {
            eprintln!(
                "usage: podtool echo|sink|reset|http|echo-client|sink-client|reset-client|http-client|ping|peer ..."
            );
            std::process::exit(2);
        }
    }
}

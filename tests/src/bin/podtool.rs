//! The small servers and clients that run inside simulated pods. Every client prints one
//! JSON line with what it measured, so tests assert on observable results.
//!
//! ```text
//! podtool echo  --listen ADDR [--strict]  echo every byte back; half-close when the client does
//!                                        (`--strict`: a blocking read returning EAGAIN is an
//!                                        error, as for a thread-per-connection server: the
//!                                        connection is dropped; `sink --strict` reports it)
//! podtool sink  --listen ADDR --delay-us N [--pause-ms M]  (wait M ms, then) read 16 KiB at a
//!                                        time with a pause (a slow reader),
//!                                        then answer "<bytes> <sha256>" and close
//! podtool reset --listen ADDR            read a little, then close with RST (SO_LINGER 0)
//! podtool echo-client --to ADDR --bytes N [--conns C] [--settle-ms M]   send N bytes (after
//!                                        M ms idle once connected), read the echo back
//!                                        (event-loop I/O: non-blocking + poll, two threads);
//!                                        a connection whose getpeername() is not ADDR fails
//! podtool sink-client --to ADDR --bytes N [--warmup-ms M]  send N bytes fast with blocking
//!                                        1 MiB writes (after 64 bytes and a pause of M ms),
//!                                        half-close, read the digest (event-loop read)
//! podtool reset-client --to ADDR [--from-port P]  send, expect the reset to arrive as
//!                                        ECONNRESET (from source port P: a 4-tuple a test
//!                                        can name in a map before connecting);
//!                                        `--keep-writing [--settle-ms M]`: (after M ms idle)
//!                                        keep sending 1 KiB every 2 ms until a write fails,
//!                                        then read once; prints both errors
//! podtool source --listen ADDR --bytes N --chunk-delay-us D  send N bytes in 16 KiB
//!                                        chunks with a pause between them, then close;
//!                                        `--burst-bytes B --burst-pause-ms P`: also pause
//!                                        P ms after every B bytes
//! podtool read-client --to ADDR           read until the end of stream; print the bytes and
//!                                        how it ended (`eof`, or the error: `ECONNRESET`);
//!                                        `--half-close`: send a FIN first; `--reset-after N`:
//!                                        once N bytes arrived, close with RST (`reset-sent`)
//! podtool raw --to ADDR --send TEXT [--half-close] [--settle-ms M]  (after M ms idle) send
//!                                        TEXT (`\r` and `\n` written as such; then a FIN with
//!                                        `--half-close`), read the answer until the server
//!                                        closes; print its first line
//! podtool dial-range --to IP --ports A-B  connect to each port once and close; prints how
//!                                        many connected and how many were refused or reset
//! podtool ping --to ADDR --count N       64-byte ping-pong; prints latency percentiles
//! podtool peer --to ADDR                  connect; print the peer address getpeername() reports
//! podtool http-conn --to ADDR --delays-ms D1,D2 [--end-wait-ms W]  one keep-alive
//!                                        connection, a GET per delay (`x-delay-ms`, which the
//!                                        `http` server honours); prints each response's status
//!                                        and `connection` header, and how the connection ended
//! podtool http-load --to ADDR --requests N [--per-conn K] [--expect a,b] [--header 'k: v']
//!                                        N GETs, K per keep-alive connection; checks every
//!                                        response (status 200, whole body, one of the expected
//!                                        bodies); stops at the first failure and classifies it
//! ```
//! podtool proto-echo --to ADDR --protocol P [--bytes N]
//!                                        an echo exchange over a stream socket of IP protocol
//!                                        P (6 TCP, 262 MPTCP); prints the peer address too
//! Any client takes `--deadline-ms N`: past it, it prints `{"errors": ["deadline: ..."]}`
//! and exits (so a connection that hangs fails a test instead of hanging it).
//! ADDR may be `[::]:port` (dual-stack listener), `[::ffff:a.b.c.d]:port` (v6 socket to
//! a v4 peer), a native IPv6 address `[fd00:201:N::H]:port` (dual-stack simulated node),
//! or a link-local one with its interface index, `[fe80::x%IFINDEX]:port`.
#![expect(
    unsafe_code,
    reason = "poll(2), listen(2), SO_LINGER and the open-files limit of the pod tools' sockets"
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
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EPERM) => "EPERM".into(),
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

fn echo(mut c: TcpStream, args: &[String]) {
    let strict = args.iter().any(|a| a == "--strict");
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
            // A blocking read of a socket in the sockmap waits once (`tcp_bpf_recvmsg`)
            // and returns EAGAIN when woken with nothing to read; under emulation that
            // happened before the first byte, and the server closed a flow it had not
            // read (6.1, TCG). The socket blocks: EAGAIN is only that, so wait again.
            // `--strict`: what a thread-per-connection server does, drop the connection.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !strict => continue,
            Err(_) => return,
        }
    }
}

fn sink(mut c: TcpStream, args: &[String]) {
    let delay = Duration::from_micros(num(args, "--delay-us", 500));
    let strict = args.iter().any(|a| a == "--strict");
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
            // As in `echo`: a blocking read of a socket in the sockmap can return EAGAIN
            // when woken with nothing to read (docs/architecture.md, "Back-pressure and
            // blocking readers"). The socket blocks: wait again. A real end (RST, FIN)
            // shows in the next read; the byte count and digest still check every byte.
            // `--strict`: reported (a blocking reader must never see it).
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !strict => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                err = "EAGAIN".into();
                break;
            }
            Err(e) => {
                err = errno_name(&e);
                break;
            }
        }
    }
    let _ = c.write_all(format!("{n} {} {err}\n", hex(&h.finalize())).as_bytes());
}

fn source(mut c: TcpStream, args: &[String]) {
    let total = num(args, "--bytes", 1 << 20) as usize;
    let delay = Duration::from_micros(num(args, "--chunk-delay-us", 0));
    let burst = num(args, "--burst-bytes", 0) as usize;
    let burst_pause = Duration::from_millis(num(args, "--burst-pause-ms", 0));
    let chunk = payload(16 * 1024, 0x50);
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        if c.write_all(&chunk[..n]).is_err() {
            return;
        }
        sent += n;
        std::thread::sleep(delay);
        if burst > 0 && sent % burst == 0 && sent < total {
            std::thread::sleep(burst_pause);
        }
    }
}

fn read_client(args: &[String]) {
    let mut c = TcpStream::connect(addr(args, "--to")).expect("connect");
    // Event-loop reads: a blocking read on a socket in the sockmap can return EAGAIN.
    c.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    // `--read-delay-us`: a slow reader, pausing after each read.
    let delay = Duration::from_micros(num(args, "--read-delay-us", 0));
    if args.iter().any(|a| a == "--half-close") {
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    let reset_after = num(args, "--reset-after", 0);
    let outcome = loop {
        match read_evented(&mut c, &mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(n) => {
                received += n as u64;
                if reset_after > 0 && received >= reset_after {
                    set_linger_zero(&c);
                    break "reset-sent".to_owned();
                }
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => break errno_name(&e),
        }
    };
    println!(
        "{}",
        serde_json::json!({"received": received, "outcome": outcome})
    );
}

fn raw(args: &[String]) {
    let text = arg(args, "--send")
        .expect("--send")
        .replace("\\r", "\r")
        .replace("\\n", "\n");
    let mut c = TcpStream::connect(addr(args, "--to")).expect("connect");
    // `--settle-ms`: a connection the node proxy has decided before the first byte.
    std::thread::sleep(Duration::from_millis(num(args, "--settle-ms", 0)));
    c.write_all(text.as_bytes()).expect("send");
    if args.iter().any(|a| a == "--half-close") {
        c.shutdown(Shutdown::Write).expect("half-close");
    }
    let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
    c.set_nonblocking(true).expect("nonblocking");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let outcome = loop {
        match read_evented(&mut c, &mut buf) {
            Ok(0) => break "eof".to_owned(),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(e) => break errno_name(&e),
        }
    };
    let text = String::from_utf8_lossy(&got);
    let status = text.lines().next().unwrap_or("").to_owned();
    println!(
        "{}",
        serde_json::json!({"status_line": status, "outcome": outcome, "bytes": got.len()})
    );
}

fn dial_range(args: &[String]) {
    let ip: std::net::IpAddr = arg(args, "--to")
        .expect("--to")
        .parse()
        .expect("IP address");
    let ports = arg(args, "--ports").expect("--ports A-B");
    let (a, b) = ports.split_once('-').expect("--ports A-B");
    let (a, b): (u16, u16) = (a.parse().expect("port"), b.parse().expect("port"));
    let (mut connected, mut failed) = (0u32, 0u32);
    for port in a..=b {
        match TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(5)) {
            Ok(mut c) => {
                // Through the proxy the connect succeeds; the refusal comes as a reset.
                let mut buf = [0u8; 1];
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => failed += 1,
                    Ok(_) => connected += 1,
                }
            }
            Err(_) => failed += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"dialled": u32::from(b - a) + 1, "connected": connected, "failed": failed})
    );
}

fn reset(mut c: TcpStream, args: &[String]) {
    let mut buf = [0u8; 16];
    let _ = c.read(&mut buf);
    // `--write-bytes`: answer that much first, then reset.
    let answer = num(args, "--write-bytes", 0) as usize;
    if answer > 0 {
        let _ = c.write_all(&payload(answer, 0x52));
        std::thread::sleep(Duration::from_millis(num(args, "--linger-ms", 0)));
    }
    set_linger_zero(&c);
}

/// `SO_LINGER` 0: the socket's close sends a reset.
fn set_linger_zero(c: &TcpStream) {
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
    settle: Duration,
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
    // `--settle-ms`: a connection the node proxy has decided before the first byte.
    std::thread::sleep(settle);
    // getpeername() must name what was dialled, captured or not (the datapath answers
    // it from the socket's state for a connection it redirected to the proxy).
    match c.peer_addr() {
        Ok(p) if p == to => {}
        Ok(p) => errors.push(format!("peer: getpeername says {p}, dialled {to}")),
        Err(e) => errors.push(format!("peer: {}", errno_name(&e))),
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
    let settle = Duration::from_millis(num(args, "--settle-ms", 0));
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let d = data.clone();
            let b = barrier.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || echo_once(to, d, b, settle))
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
    // `--warmup-ms M`: the first 64 bytes alone, then a pause of M ms (a flow the node
    // proxy has decided and fully passed on before the bulk starts).
    let warmup = num(args, "--warmup-ms", 0);
    let mut rest = &data[..];
    if warmup > 0 {
        let (first, tail) = data.split_at(64.min(data.len()));
        if let Err(e) = c.write_all(first) {
            errors.push(format!("write: {}", errno_name(&e)));
        }
        std::thread::sleep(Duration::from_millis(warmup));
        rest = tail;
    }
    // Many blocking writes of 1 MiB: what a fast producer does.
    for chunk in rest.chunks(1 << 20) {
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

/// A TCP connection to `to` from source port `from` (either family; the socket's family
/// is the destination's).
fn connect_from(to: SocketAddr, from: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let sin6 = |ip: std::net::Ipv6Addr, port: u16, scope: u32| libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: port.to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: ip.octets(),
        },
        sin6_scope_id: scope,
    };
    /// Either address struct, as bytes the calls read.
    enum Sa {
        V4(libc::sockaddr_in),
        V6(libc::sockaddr_in6),
    }
    impl Sa {
        fn ptr(&self) -> (*const libc::sockaddr, libc::socklen_t) {
            match self {
                Sa::V4(a) => (
                    (a as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                ),
                Sa::V6(a) => (
                    (a as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                ),
            }
        }
    }
    let (family, local, remote) = match to {
        SocketAddr::V4(to) => (
            libc::AF_INET,
            Sa::V4(sin(std::net::Ipv4Addr::UNSPECIFIED, from)),
            Sa::V4(sin(*to.ip(), to.port())),
        ),
        SocketAddr::V6(to) => (
            libc::AF_INET6,
            Sa::V6(sin6(std::net::Ipv6Addr::UNSPECIFIED, from, 0)),
            Sa::V6(sin6(*to.ip(), to.port(), to.scope_id())),
        ),
    };
    // SAFETY: plain socket calls on a fd this function owns (moved into the TcpStream, or
    // closed on error); the address structs outlive the calls that read them.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        let (lp, ll) = local.ptr();
        let (rp, rl) = remote.ptr();
        let ok = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::bind(fd, lp, ll) == 0
            && libc::connect(fd, rp, rl) == 0;
        if !ok {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

fn reset_client(args: &[String]) {
    let to = addr(args, "--to");
    let connected = match arg(args, "--from-port") {
        Some(p) => connect_from(to, p.parse().expect("port")),
        None => TcpStream::connect(to),
    };
    // A reset can even beat connect() back to us (the far end accepted and reset at once,
    // seen under emulation): that is the reset we wait for, not a failure of the tool.
    let mut c = match connected {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            println!("{}", serde_json::json!({"outcome": errno_name(&e)}));
            return;
        }
        other => other.expect("connect"),
    };
    if args.iter().any(|a| a == "--keep-writing") {
        // Writes after the far end's reset: the first failing write's error, how many bytes
        // were written before it, and what a read says after it.
        let chunk = [0x6bu8; 1024];
        let mut written = 0u64;
        // `--settle-ms`: a connection the node proxy has decided before the first byte.
        std::thread::sleep(Duration::from_millis(num(args, "--settle-ms", 0)));
        let write_error = loop {
            match c.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) => break errno_name(&e),
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        c.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        let read = match read_evented(&mut c, &mut buf) {
            Ok(0) => "eof".to_owned(),
            Ok(_) => "data".to_owned(),
            Err(e) => errno_name(&e),
        };
        println!(
            "{}",
            serde_json::json!({"write_error": write_error, "written": written, "read": read})
        );
        return;
    }
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

/// An IPv4 stream socket of IP protocol `proto`, connected to `to`.
fn connect_proto(to: SocketAddr, proto: i32) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = to else {
        return Err(std::io::Error::other("proto-echo takes an IPv4 address"));
    };
    // SAFETY: plain socket(2); the fd is owned by the TcpStream below or closed on error.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own; TcpStream closes it on drop.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the stated length.
    let rc = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn proto_echo(args: &[String]) {
    let to = addr(args, "--to");
    let proto = num(args, "--protocol", 6) as i32;
    let bytes = num(args, "--bytes", 64 * 1024) as usize;
    let data = payload(bytes, 0xbeef);
    let mut c = match connect_proto(to, proto) {
        Ok(c) => c,
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"errors": [format!("connect: {}", errno_name(&e))]})
            );
            return;
        }
    };
    let peer = c.peer_addr().map(|a| a.to_string()).ok();
    let mut w = c.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    let read = c.read_to_end(&mut back);
    let mut errors = Vec::new();
    if let Err(e) = read {
        errors.push(format!("read: {}", errno_name(&e)));
    }
    if let Err(e) = writer.join().expect("writer") {
        errors.push(format!("write: {}", errno_name(&e)));
    }
    let intact = back == payload(bytes, 0xbeef);
    println!(
        "{}",
        serde_json::json!({"peer": peer, "received": back.len(), "intact": intact, "errors": errors})
    );
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
/// `x-served-by: NAME`, and the request's `x-mesh` header back as `x-seen-mesh`; a request
/// with `x-delay-ms: N` is answered N ms late.
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
        if let Some(ms) = header(&head, "x-delay-ms").and_then(|v| v.parse().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
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

/// `http-conn --to ADDR --delays-ms D1,D2,.. [--end-wait-ms W]`: one keep-alive connection,
/// one GET per delay (sent with `x-delay-ms: D`, for `http` servers), each after the
/// previous answer; then waits up to W ms (default 5000) for the server to end the
/// connection. Prints each response's status and `connection` header, and how the
/// connection ended: `eof` (a clean close), `ECONNRESET`, `open` (still open after W ms).
fn http_conn(args: &[String]) {
    let to = addr(args, "--to");
    let delays: Vec<u64> = arg(args, "--delays-ms")
        .unwrap_or_else(|| "0".into())
        .split(',')
        .map(|d| d.trim().parse().expect("--delays-ms"))
        .collect();
    let end_wait = num(args, "--end-wait-ms", 5000);
    let mut responses = Vec::new();
    let mut errors = Vec::new();
    let report = |responses: &[serde_json::Value], errors: &[String], end: &str| {
        println!(
            "{}",
            serde_json::json!({ "responses": responses, "end": end, "errors": errors })
        );
    };
    let c = match TcpStream::connect(to) {
        Ok(c) => c,
        Err(e) => {
            errors.push(format!("connect: {}", errno_name(&e)));
            return report(&responses, &errors, "none");
        }
    };
    let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
    let mut w = c;
    for d in delays {
        let req = format!("GET / HTTP/1.1\r\nhost: {to}\r\nx-delay-ms: {d}\r\n\r\n");
        if let Err(e) = w.write_all(req.as_bytes()) {
            errors.push(format!("write: {}", errno_name(&e)));
            return report(&responses, &errors, "none");
        }
        let head = match read_head(&mut r) {
            Ok(Some(h)) => h,
            Ok(None) => {
                errors.push("closed before a response".into());
                return report(&responses, &errors, "eof");
            }
            Err(e) => {
                errors.push(format!("read: {}", errno_name(&e)));
                return report(&responses, &errors, &errno_name(&e));
            }
        };
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if let Err(e) = r.read_exact(&mut body) {
            errors.push(format!("body: {}", errno_name(&e)));
            return report(&responses, &errors, "none");
        }
        responses.push(serde_json::json!({
            "status": head[0].split(' ').nth(1).unwrap_or("?"),
            "connection": header(&head, "connection").unwrap_or("-").to_ascii_lowercase(),
        }));
    }
    w.set_read_timeout(Some(Duration::from_millis(end_wait.max(1))))
        .expect("SO_RCVTIMEO");
    let mut buf = [0u8; 1024];
    let end = match r.read(&mut buf) {
        Ok(0) => "eof".to_owned(),
        Ok(n) => {
            errors.push(format!("{n} unexpected bytes after the last response"));
            "data".to_owned()
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            "open".to_owned()
        }
        Err(e) => errno_name(&e),
    };
    report(&responses, &errors, &end);
}

/// How one `http-load` run ended, if not with every request answered.
enum LoadError {
    /// connect(2) failed.
    Connect(String),
    /// A reset (ECONNRESET, EPIPE) while writing a request or reading a response.
    Reset(String),
    /// A clean close before the first byte of a response on a connection that had already
    /// answered: the keep-alive race every HTTP/1.1 client retries (RFC 9112, 9.3.1).
    IdleClose,
    /// A clean close before any response on a fresh connection.
    ClosedNoResponse,
    /// A clean close inside a response (head or body short): bytes lost.
    Truncated(String),
    /// No answer within the read timeout.
    Timeout(String),
    /// A complete response that is not the one expected (status or body).
    Unexpected(String),
    Other(String),
}

impl LoadError {
    fn kind(&self) -> &'static str {
        match self {
            LoadError::Connect(_) => "connect",
            LoadError::Reset(_) => "reset",
            LoadError::IdleClose => "idle_close",
            LoadError::ClosedNoResponse => "closed_no_response",
            LoadError::Truncated(_) => "truncated",
            LoadError::Timeout(_) => "timeout",
            LoadError::Unexpected(_) => "unexpected",
            LoadError::Other(_) => "other",
        }
    }

    fn detail(&self) -> String {
        match self {
            LoadError::IdleClose | LoadError::ClosedNoResponse => String::new(),
            LoadError::Connect(d)
            | LoadError::Reset(d)
            | LoadError::Truncated(d)
            | LoadError::Timeout(d)
            | LoadError::Unexpected(d)
            | LoadError::Other(d) => d.clone(),
        }
    }

    fn from_io(what: &str, e: &std::io::Error) -> LoadError {
        let name = errno_name(e);
        match e.raw_os_error() {
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => {
                LoadError::Reset(format!("{what}: {name}"))
            }
            Some(libc::ETIMEDOUT) => LoadError::Timeout(format!("{what}: ETIMEDOUT")),
            _ => LoadError::Other(format!("{what}: {name}")),
        }
    }
}

/// A non-blocking socket read and written event-loop style, with a timeout per wait: a
/// blocking read on a socket in the sockmap can return EAGAIN when an RST wakes it (see
/// docs/architecture.md), which event-loop clients never see.
struct Evented {
    s: TcpStream,
    timeout_ms: i32,
}

impl Evented {
    fn wait(&self, events: i16) -> std::io::Result<()> {
        let mut p = libc::pollfd {
            fd: self.s.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut p, 1, self.timeout_ms) } {
            0 => Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT)),
            n if n < 0 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        }
    }
}

impl Read for Evented {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.wait(libc::POLLIN)?;
        match self.s.read(buf) {
            // Readable by poll, yet nothing to read: a spurious wake-up, reported as such.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            }
            r => r,
        }
    }
}

impl Write for Evented {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.s.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request and its response on `r`/`w`; `reused`: the connection answered before.
/// Returns (status, body, the server asked to close).
fn load_request(
    r: &mut std::io::BufReader<Evented>,
    w: &mut Evented,
    req: &[u8],
    reused: bool,
) -> Result<(String, Vec<u8>, bool), LoadError> {
    w.write_all(req)
        .map_err(|e| LoadError::from_io("write", &e))?;
    // The head, byte-exact, so a close inside it is told apart from one before it.
    let mut head = Vec::new();
    loop {
        let buf = r
            .fill_buf()
            .map_err(|e| LoadError::from_io("read head", &e))?;
        if buf.is_empty() {
            return Err(match (head.is_empty(), reused) {
                (true, true) => LoadError::IdleClose,
                (true, false) => LoadError::ClosedNoResponse,
                (false, _) => LoadError::Truncated(format!("head cut after {} bytes", head.len())),
            });
        }
        let n = buf.len();
        head.extend_from_slice(buf);
        r.consume(n);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            // Bytes past the head belong to the body: keep them.
            let rest = head.split_off(end + 4);
            let text = String::from_utf8_lossy(&head).into_owned();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let status = lines
                .first()
                .and_then(|l| l.split(' ').nth(1))
                .unwrap_or("?")
                .to_owned();
            let len: usize = header(&lines, "content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| LoadError::Unexpected(format!("no content-length: {text:?}")))?;
            let close =
                header(&lines, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let mut body = rest;
            if body.len() > len {
                return Err(LoadError::Unexpected(format!(
                    "{} bytes past a {len}-byte body",
                    body.len() - len
                )));
            }
            let mut more = vec![0u8; len - body.len()];
            if let Err(e) = r.read_exact(&mut more) {
                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    LoadError::Truncated(format!("body shorter than {len} bytes"))
                } else {
                    LoadError::from_io("read body", &e)
                });
            }
            body.extend_from_slice(&more);
            return Ok((status, body, close));
        }
    }
}

/// `http-load --to ADDR --requests N [--per-conn K] [--expect a,b] [--path P]
/// [--header 'k: v'] [--timeout-ms T]`: N GETs, at most K per keep-alive connection (a
/// `connection: close` answer starts a new one). Every response must be a 200 whose whole
/// body is one of `--expect` (any body without it). Stops at the first failure; prints the
/// counts and how it ended (`error.kind`: connect, reset, idle_close, closed_no_response,
/// truncated, timeout, unexpected, other).
fn http_load(args: &[String]) {
    let to = addr(args, "--to");
    let n = num(args, "--requests", 1);
    let per_conn = num(args, "--per-conn", 10).max(1);
    let timeout = Duration::from_millis(num(args, "--timeout-ms", 20_000));
    let path = arg(args, "--path").unwrap_or_else(|| "/".into());
    let expect: Vec<String> = arg(args, "--expect")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let extra: String = args
        .windows(2)
        .filter(|w| w[0] == "--header")
        .map(|w| format!("{}\r\n", w[1]))
        .collect();
    let req = format!("GET {path} HTTP/1.1\r\nhost: {to}\r\n{extra}\r\n").into_bytes();
    let mut bodies = std::collections::BTreeMap::<String, u64>::new();
    let mut ok = 0u64;
    let mut conns = 0u64;
    let mut error: Option<LoadError> = None;
    let mut conn: Option<(std::io::BufReader<Evented>, Evented, u64)> = None;
    let timeout_ms = timeout.as_millis() as i32;
    while ok < n {
        if conn.is_none() {
            let c = match TcpStream::connect_timeout(&to, timeout) {
                Ok(c) => c,
                Err(e) => {
                    error = Some(LoadError::Connect(errno_name(&e)));
                    break;
                }
            };
            c.set_nonblocking(true).expect("nonblocking");
            conns += 1;
            let r = Evented {
                s: c.try_clone().expect("clone"),
                timeout_ms,
            };
            conn = Some((std::io::BufReader::new(r), Evented { s: c, timeout_ms }, 0));
        }
        let (r, w, served) = conn.as_mut().expect("connected");
        match load_request(r, w, &req, *served > 0) {
            Ok((status, body, close)) => {
                let body = String::from_utf8_lossy(&body).into_owned();
                if status != "200" || (!expect.is_empty() && !expect.contains(&body)) {
                    error = Some(LoadError::Unexpected(format!(
                        "status {status}, body {body:?}"
                    )));
                    break;
                }
                ok += 1;
                *served += 1;
                *bodies.entry(body).or_default() += 1;
                if close || *served >= per_conn {
                    conn = None;
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let error = error.map(|e| serde_json::json!({"kind": e.kind(), "detail": e.detail()}));
    println!(
        "{}",
        serde_json::json!({"requests": n, "ok": ok, "connections": conns, "bodies": bodies, "error": error})
    );
}

/// Raises the open-files limit to its hard limit: a thousand connections need more than
/// the 1024 a default soft limit allows (a minimal init, a CI runner).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    raise_nofile();
    let args: Vec<String> = std::env::args().collect();
    // A client that must not hang a test: past the deadline it reports and exits.
    if let Some(ms) = arg(&args, "--deadline-ms") {
        let ms: u64 = ms.parse().expect("--deadline-ms");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            println!(
                "{}",
                serde_json::json!({"errors": [format!("deadline: no result after {ms} ms")]})
            );
            std::process::exit(0);
        });
    }
    match args.get(1).map(String::as_str) {
        Some("echo") => serve(&args, echo),
        Some("sink") => serve(&args, sink),
        Some("reset") => serve(&args, reset),
        Some("source") => serve(&args, source),
        Some("read-client") => read_client(&args),
        Some("dial-range") => dial_range(&args),
        Some("raw") => raw(&args),
        Some("http") => serve(&args, http),
        Some("http-client") => http_client(&args),
        Some("http-conn") => http_conn(&args),
        Some("http-load") => http_load(&args),
        Some("echo-client") => echo_client(&args),
        Some("sink-client") => sink_client(&args),
        Some("reset-client") => reset_client(&args),
        Some("ping") => ping(&args),
        Some("peer") => peer(&args),
        Some("proto-echo") => proto_echo(&args),
        _ => {
            eprintln!(
                "usage: podtool echo|sink|reset|http|echo-client|sink-client|reset-client|http-client|http-conn|ping|peer ..."
            );
            std::process::exit(2);
        }
    }
}

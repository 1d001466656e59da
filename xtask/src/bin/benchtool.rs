//! Clients and servers of `cargo xtask bench` that the Debian tools (sockperf, iperf3) do
//! not provide. They run inside the simulated pods, print one line `key value ...` that
//! xtask/bench.sh parses, and use blocking std sockets only (no runtime to measure).
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
//! ```

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

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("reply") => reply(&args),
        Some("crr") => crr(&args),
        Some("pingpong") => pingpong(&args),
        Some("hold") => hold(&args),
        Some("hold-client") => hold_client(&args),
        _ => bail!("usage: benchtool reply|crr|pingpong|hold|hold-client ... (see the source)"),
    }
}

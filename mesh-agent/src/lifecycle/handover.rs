//! Hand-over between two agents of one node (an upgrade: the DaemonSet starts the new pod
//! before the old one stops), so that no connection is refused, sent around the mesh or
//! cut:
//!
//! 1. The new agent (`--takeover`) finds the pin folder locked and connects to the running
//!    agent's hand-over socket (abstract Unix socket `mesh-agent-handover:<pin folder>`,
//!    root only: both agents run in the node's network namespace).
//! 2. The old agent sends the proxy's listening sockets (`SCM_RIGHTS`; the IPv4 one, then
//!    the IPv6 one of `--proxy-redirect6` or word that it has none): from now on both
//!    accept from the same sockets, so nothing waiting in their queues is lost. It stops
//!    writing the maps and releases the pin folder's lock; its proxy keeps serving and
//!    beating.
//! 3. The new agent takes the lock, adopts the pinned maps and swaps its programs into the
//!    pinned links (see `bpf`), starts its proxy on the received socket, beats, and says
//!    `READY`.
//! 4. The old agent stops accepting and lets the connections it relays finish, up to
//!    `--handover-drain-ms`, then exits leaving the datapath (now the new agent's) as is.
//!
//! If the new agent goes away before `READY`, the old one exits the same way: the datapath
//! stays attached and fail modes apply until an agent runs again.
//!
//! Versions: the new agent greets with `HANDOVER 3` (every listener: the proxy has one
//! per worker and family, `SO_REUSEPORT` groups, `proxy::listeners`; then `END`). An agent
//! of an older protocol refuses a greeting it does not know and closes the connection; the
//! new agent then asks again with `HANDOVER 2` (one IPv4 and one IPv6 listener), then
//! `HANDOVER 1` (the IPv4 listener only: it binds its own IPv6 ones beside the old agent's)
//! and adds siblings to the single sockets it got. An agent of protocol 3 answers every
//! greeting; to an older one (a rollback) it hands its first socket of each family over,
//! steers new connections of the group to it at once, and takes its other sockets out of
//! the group when the new agent is ready (their queues served meanwhile).

use std::{
    io::{self, BufRead, BufReader, Write},
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
    path::Path,
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::sys;

const HELLO_V1: &str = "HANDOVER 1\n";
const HELLO_V2: &str = "HANDOVER 2\n";
const HELLO_V3: &str = "HANDOVER 3\n";
/// Protocol 3: after the listeners.
const END: &[u8] = b"END\n";
const LISTENER: &[u8] = b"LISTENER\n";
/// Protocol 2: the IPv6 listener follows, or word that there is none.
const LISTENER6: &[u8] = b"LISTENER6\n";
const NO_LISTENER6: &[u8] = b"NO-LISTENER6\n";
const READY: &str = "READY\n";

/// How long either side waits for the other at each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over with the running agent ({step}): {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("hand-over with the running agent: {0}")]
    Protocol(String),
}

fn address(pin_path: &Path) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("mesh-agent-handover:{}", pin_path.display()))
}

/// What the old agent's hand-over thread tells the agent.
#[derive(Debug)]
pub enum Event {
    /// A new agent asked for the node and has the listening socket.
    Requested,
    /// It runs the datapath and its proxy now.
    Ready,
    /// It went away (or never finished) before it was ready.
    Failed(String),
}

/// The old agent's side: serves hand-over requests on a thread of its own (blocking I/O),
/// one at a time; `listeners` are the proxy's listening sockets (at least one) and
/// `listeners6` its IPv6 ones (`--proxy-redirect6`), duplicated for the sending.
pub fn serve(
    pin_path: &Path,
    listeners: Vec<BorrowedFd<'_>>,
    listeners6: Vec<BorrowedFd<'_>>,
    events: mpsc::UnboundedSender<Event>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let sock = UnixListener::bind_addr(&address(pin_path)?)?;
    let own = |v: Vec<BorrowedFd<'_>>| -> io::Result<Vec<OwnedFd>> {
        v.into_iter().map(|l| l.try_clone_to_owned()).collect()
    };
    let listener = own(listeners)?;
    if listener.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listener"));
    }
    let listener6 = own(listeners6)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            let _span = tracing::info_span!("handover").entered();
            let mut sock = Some(sock);
            while let Some(conn) = sock.as_ref().and_then(|s| s.accept().ok()).map(|(c, _)| c) {
                let (mut reader, version) = match greet(&conn) {
                    Ok(r) => r,
                    Err(e) => {
                        // Not a hand-over (or not from root): the socket stays open.
                        warn!(error = %e, "refused a hand-over request");
                        continue;
                    }
                };
                // One hand-over per agent: free the name for the new agent's own socket.
                sock = None;
                if let Err(e) =
                    hand_over(&conn, &mut reader, version, &listener, &listener6, &events)
                {
                    warn!(error = %e, "the hand-over failed");
                    let _ = events.send(Event::Failed(e.to_string()));
                }
            }
        })
}

/// Checks who asks and what: root (the agent), with one of the protocol's greetings;
/// returns the protocol version asked for.
fn greet(conn: &UnixStream) -> Result<(BufReader<&UnixStream>, u8), HandoverError> {
    let io = |step| move |source| HandoverError::Io { step, source };
    let cred = sys::peer_uid(conn.as_fd()).map_err(io("peer credentials"))?;
    if cred != 0 && cred != sys::effective_uid() {
        return Err(HandoverError::Protocol(format!(
            "a hand-over request from uid {cred}"
        )));
    }
    conn.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io("timeout"))?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io("hello"))?;
    let version = match line.as_str() {
        HELLO_V1 => 1,
        HELLO_V2 => 2,
        HELLO_V3 => 3,
        _ => {
            return Err(HandoverError::Protocol(format!(
                "unexpected greeting {line:?}"
            )))
        }
    };
    Ok((reader, version))
}

fn hand_over(
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    version: u8,
    listeners: &[OwnedFd],
    listeners6: &[OwnedFd],
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), HandoverError> {
    use crate::sys::{
        reuseport_leave_group as leave_group, reuseport_steer_to_first as steer_to_first,
    };
    let io = |step| move |source| HandoverError::Io { step, source };
    info!(
        version,
        listeners = listeners.len(),
        listeners6 = listeners6.len(),
        "a new agent asks for the node; handing the proxy's listeners over"
    );
    // What the new agent takes: all of them (3), or the first of each family (2), or the
    // first IPv4 one (1). The others this agent keeps serving until READY, with new
    // connections steered away from them.
    let (give, give6) = match version {
        3 => (listeners, listeners6),
        2 => (&listeners[..1], &listeners6[..listeners6.len().min(1)]),
        _ => (&listeners[..1], &listeners6[..0]),
    };
    for (group, given) in [(listeners, give), (listeners6, give6)] {
        if group.len() > given.len() && given.len() == 1 {
            if let Err(e) = steer_to_first(group[0].as_fd()) {
                warn!(error = %e, "could not steer new connections to the handed-over listener");
            }
        }
    }
    for l in give {
        sys::send_fd(conn.as_fd(), l.as_fd(), LISTENER).map_err(io("sending a listener"))?;
    }
    match (version, give6.first()) {
        (1, _) => {}
        (2, None) => (&*conn)
            .write_all(NO_LISTENER6)
            .map_err(io("saying there is no IPv6 listener"))?,
        _ => {
            for l in give6 {
                sys::send_fd(conn.as_fd(), l.as_fd(), LISTENER6)
                    .map_err(io("sending an IPv6 listener"))?;
            }
        }
    }
    if version >= 3 {
        (&*conn)
            .write_all(END)
            .map_err(io("ending the listeners"))?;
    }
    let _ = events.send(Event::Requested);
    let mut line = String::new();
    let n = reader
        .read_line(&mut line)
        .map_err(io("waiting for READY"))?;
    if n == 0 || line != READY {
        return Err(HandoverError::Protocol(format!(
            "the new agent left before it was ready ({line:?})"
        )));
    }
    info!("the new agent is ready");
    // Sockets it did not take leave their groups: the kernel sends them nothing more, and
    // this agent's accept loops on them end.
    for (group, given) in [(listeners, give), (listeners6, give6)] {
        if given.len() == 1 {
            for l in &group[1..] {
                leave_group(l.as_fd());
            }
        }
    }
    let _ = events.send(Event::Ready);
    Ok(())
}

/// The new agent's side of a hand-over in progress.
pub struct Takeover {
    conn: UnixStream,
    /// The proxy's listening sockets, received from the old agent (one from an agent of
    /// protocol 1 or 2).
    pub listeners: Vec<OwnedFd>,
    /// Its IPv6 listening sockets, if it had any and speaks protocol 2 or 3.
    pub listeners6: Vec<OwnedFd>,
}

/// Asks the agent running on `pin_path` to hand the node over. `None`: no agent answers
/// there (start as usual).
pub fn request(pin_path: &Path) -> Result<Option<Takeover>, HandoverError> {
    // An agent of an older protocol closes on a greeting it does not know: ask its way.
    for hello in [HELLO_V3, HELLO_V2, HELLO_V1] {
        match request_as(pin_path, hello)? {
            Asked::Closed => continue,
            Asked::NoAgent => return Ok(None),
            Asked::Taken(t) => return Ok(Some(t)),
        }
    }
    Err(HandoverError::Protocol(
        "the running agent closed the connection without an answer".into(),
    ))
}

enum Asked {
    NoAgent,
    /// The connection ended before any answer.
    Closed,
    Taken(Takeover),
}

fn request_as(pin_path: &Path, hello: &str) -> Result<Asked, HandoverError> {
    let io = |step| move |source| HandoverError::Io { step, source };
    let conn = match UnixStream::connect_addr(&address(pin_path).map_err(io("address"))?) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Asked::NoAgent),
        Err(e) => return Err(io("connecting")(e)),
    };
    conn.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io("timeout"))?;
    (&conn).write_all(hello.as_bytes()).map_err(io("hello"))?;
    let mut buf = [0u8; 64];
    let (n, fd) = sys::recv_fd(conn.as_fd(), &mut buf).map_err(io("receiving the listener"))?;
    let listener = match (&buf[..n], fd) {
        ([], _) => return Ok(Asked::Closed),
        (LISTENER, Some(listener)) => listener,
        (other, _) => return Err(unexpected(other)),
    };
    if hello == HELLO_V3 {
        // Every listener, each in a message of its own (the kernel never joins a message
        // that carries descriptors to the next one), then `END`.
        let (mut listeners, mut listeners6) = (vec![listener], Vec::new());
        loop {
            let (n, fd) =
                sys::recv_fd(conn.as_fd(), &mut buf).map_err(io("receiving the listeners"))?;
            match (&buf[..n], fd) {
                (LISTENER, Some(l)) => listeners.push(l),
                (LISTENER6, Some(l)) => listeners6.push(l),
                (END, None) => break,
                (other, _) => return Err(unexpected(other)),
            }
        }
        info!(
            ipv6 = !listeners6.is_empty(),
            listeners = listeners.len(),
            listeners6 = listeners6.len(),
            "the running agent handed its listeners over; taking the node"
        );
        return Ok(Asked::Taken(Takeover {
            conn,
            listeners,
            listeners6,
        }));
    }
    let listener6 = if hello == HELLO_V2 {
        // The kernel never joins a message that carries descriptors to the next one, so
        // the first read ended at `LISTENER`; this one holds exactly the IPv6 answer.
        let (n, fd) =
            sys::recv_fd(conn.as_fd(), &mut buf).map_err(io("receiving the IPv6 listener"))?;
        match (&buf[..n], fd) {
            (LISTENER6, Some(l6)) => Some(l6),
            (NO_LISTENER6, None) => None,
            (other, _) => return Err(unexpected(other)),
        }
    } else {
        None
    };
    info!(
        ipv6 = listener6.is_some(),
        "the running agent handed its listeners over; taking the node"
    );
    Ok(Asked::Taken(Takeover {
        conn,
        listeners: vec![listener],
        listeners6: listener6.into_iter().collect(),
    }))
}

fn unexpected(answer: &[u8]) -> HandoverError {
    HandoverError::Protocol(format!(
        "unexpected answer {:?}",
        String::from_utf8_lossy(answer)
    ))
}

/// `Takeover` without its listener (moved into the proxy).
pub struct Pending {
    conn: UnixStream,
}

impl Takeover {
    /// The pending hand-over, the IPv4 listeners and the IPv6 ones.
    pub fn split(self) -> (Pending, Vec<OwnedFd>, Vec<OwnedFd>) {
        (Pending { conn: self.conn }, self.listeners, self.listeners6)
    }
}

impl Pending {
    /// Tells the old agent this one runs the node now: it stops accepting and drains.
    pub fn ready(self) -> Result<(), HandoverError> {
        (&self.conn)
            .write_all(READY.as_bytes())
            .map_err(|source| HandoverError::Io {
                step: "READY",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddrV6, TcpListener};

    use super::*;

    /// A pin path no other test or agent uses (the hand-over socket is named after it).
    fn pin(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("handover-{name}-{}", std::process::id()))
    }

    fn local_port(fd: &OwnedFd) -> u16 {
        let l = TcpListener::from(fd.try_clone().unwrap());
        l.local_addr().unwrap().port()
    }

    fn ports(fds: &[OwnedFd]) -> Vec<u16> {
        fds.iter().map(local_port).collect()
    }

    fn ports_of(ls: &[TcpListener]) -> Vec<u16> {
        ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
    }

    fn fds(ls: &[TcpListener]) -> Vec<BorrowedFd<'_>> {
        ls.iter().map(|l| l.as_fd()).collect()
    }

    #[test]
    fn protocol_3_hands_every_listener_over() {
        let pin = pin("v3");
        let l4: Vec<_> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let l6: Vec<_> = (0..2)
            .map(|_| TcpListener::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0)).unwrap())
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _t = serve(&pin, fds(&l4), fds(&l6), tx).unwrap();
        let t = request(&pin).unwrap().expect("the agent answers");
        let (pending, fd4, fd6) = t.split();
        assert_eq!(ports(&fd4), ports_of(&l4));
        assert_eq!(ports(&fd6), ports_of(&l6));
        assert!(matches!(rx.blocking_recv(), Some(Event::Requested)));
        pending.ready().unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Ready)));
    }

    #[test]
    fn protocol_3_without_ipv6() {
        let pin = pin("v3-none");
        let l4 = [TcpListener::bind("127.0.0.1:0").unwrap()];
        let (tx, _rx) = mpsc::unbounded_channel();
        let _t = serve(&pin, fds(&l4), vec![], tx).unwrap();
        let (_pending, fd4, fd6) = request(&pin).unwrap().unwrap().split();
        assert_eq!(ports(&fd4), ports_of(&l4));
        assert!(fd6.is_empty());
    }

    /// An agent of protocol 2, as released before: `HANDOVER 2` and `HANDOVER 1` only,
    /// one listener of each family. The new agent asks again its way.
    #[test]
    fn a_protocol_2_agent_is_asked_its_way() {
        let pin = pin("v2-old");
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = UnixListener::bind_addr(&address(&pin).unwrap()).unwrap();
        let fd4 = l4.as_fd().try_clone_to_owned().unwrap();
        let old = std::thread::spawn(move || {
            let mut greetings = Vec::new();
            for _ in 0..2 {
                let (conn, _) = sock.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                greetings.push(line.clone());
                if line == HELLO_V2 {
                    sys::send_fd(conn.as_fd(), fd4.as_fd(), LISTENER).unwrap();
                    (&conn).write_all(NO_LISTENER6).unwrap();
                    let mut ready = String::new();
                    BufReader::new(&conn).read_line(&mut ready).unwrap();
                    greetings.push(ready);
                    break;
                }
            }
            greetings
        });
        let (pending, fd, fd6) = request(&pin).unwrap().unwrap().split();
        assert_eq!(ports(&fd), [l4.local_addr().unwrap().port()]);
        assert!(fd6.is_empty());
        pending.ready().unwrap();
        assert_eq!(old.join().unwrap(), [HELLO_V3, HELLO_V2, READY]);
    }

    /// A rollback: a new agent of protocol 2 asks an agent of protocol 3 with several
    /// listeners. It gets the first of each family; new connections go to those at once,
    /// and the others leave their groups when it is ready.
    #[test]
    fn protocol_2_gets_the_first_listeners_and_the_others_leave_the_group() {
        use crate::proxy::listeners;
        let pin = pin("v2-rollback");
        let first = listeners::bind("127.0.0.1:0".parse().unwrap(), 64).unwrap();
        let addr = first.local_addr().unwrap();
        let l4 = vec![first, listeners::bind(addr, 64).unwrap()];
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _t = serve(&pin, fds(&l4), vec![], tx).unwrap();
        let (pending, fd4, fd6) = match request_as(&pin, HELLO_V2).unwrap() {
            Asked::Taken(t) => t.split(),
            _ => panic!("no answer"),
        };
        assert_eq!(ports(&fd4), [addr.port()]);
        assert!(fd6.is_empty());
        assert!(matches!(rx.blocking_recv(), Some(Event::Requested)));
        // Steered: every new connection lands on the first socket.
        let c: Vec<_> = (0..20)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let count = |l: &TcpListener| std::iter::from_fn(|| l.accept().ok()).count();
        assert_eq!((count(&l4[0]), count(&l4[1])), (20, 0));
        pending.ready().unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Ready)));
        // The second socket is out of the group: accepting from it fails.
        assert!(l4[1].accept().is_err());
        drop(c);
    }

    /// An agent of protocol 1, as released before: it knows `HANDOVER 1` only and closes
    /// on anything else. The new agent asks again its way and takes the IPv4 listener.
    #[test]
    fn a_protocol_1_agent_is_asked_its_way() {
        let pin = pin("v1");
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = UnixListener::bind_addr(&address(&pin).unwrap()).unwrap();
        let fd4 = l4.as_fd().try_clone_to_owned().unwrap();
        let old = std::thread::spawn(move || {
            let mut greetings = Vec::new();
            for _ in 0..3 {
                let (conn, _) = sock.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&conn).read_line(&mut line).unwrap();
                greetings.push(line.clone());
                if line == HELLO_V1 {
                    sys::send_fd(conn.as_fd(), fd4.as_fd(), LISTENER).unwrap();
                    let mut ready = String::new();
                    BufReader::new(&conn).read_line(&mut ready).unwrap();
                    greetings.push(ready);
                    break;
                }
            }
            greetings
        });
        let (pending, fd, fd6) = request(&pin).unwrap().unwrap().split();
        assert_eq!(ports(&fd), [l4.local_addr().unwrap().port()]);
        assert!(fd6.is_empty());
        pending.ready().unwrap();
        assert_eq!(old.join().unwrap(), [HELLO_V3, HELLO_V2, HELLO_V1, READY]);
    }

    #[test]
    fn no_agent_means_no_takeover() {
        assert!(request(&pin("nobody")).unwrap().is_none());
    }
}

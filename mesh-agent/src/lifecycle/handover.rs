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
//! Versions: the new agent greets with `HANDOVER 2` (both listeners). An agent of protocol
//! 1 refuses that greeting and closes the connection; the new agent then asks again with
//! `HANDOVER 1` and gets the IPv4 listener only (it binds its own IPv6 one beside the old
//! agent's, `SO_REUSEPORT`). An agent of protocol 2 answers either greeting.

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
/// one at a time; `listener` is the proxy's listening socket and `listener6` its IPv6 one
/// (`--proxy-redirect6`), duplicated for the sending.
pub fn serve(
    pin_path: &Path,
    listener: BorrowedFd<'_>,
    listener6: Option<BorrowedFd<'_>>,
    events: mpsc::UnboundedSender<Event>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let sock = UnixListener::bind_addr(&address(pin_path)?)?;
    let listener = listener.try_clone_to_owned()?;
    let listener6 = listener6.map(|l| l.try_clone_to_owned()).transpose()?;
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
                let six = (version >= 2).then_some(listener6.as_ref());
                if let Err(e) = hand_over(&conn, &mut reader, &listener, six, &events) {
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
    listener: &OwnedFd,
    // `None`: protocol 1 (the IPv4 listener only); `Some(None)`: this agent has no IPv6
    // listener.
    listener6: Option<Option<&OwnedFd>>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), HandoverError> {
    let io = |step| move |source| HandoverError::Io { step, source };
    info!("a new agent asks for the node; handing the proxy's listener over");
    sys::send_fd(conn.as_fd(), listener.as_fd(), LISTENER).map_err(io("sending the listener"))?;
    match listener6 {
        None => {}
        Some(Some(l6)) => sys::send_fd(conn.as_fd(), l6.as_fd(), LISTENER6)
            .map_err(io("sending the IPv6 listener"))?,
        Some(None) => (&*conn)
            .write_all(NO_LISTENER6)
            .map_err(io("saying there is no IPv6 listener"))?,
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
    let _ = events.send(Event::Ready);
    Ok(())
}

/// The new agent's side of a hand-over in progress.
pub struct Takeover {
    conn: UnixStream,
    /// The proxy's listening socket, received from the old agent.
    pub listener: OwnedFd,
    /// Its IPv6 listening socket, if it had one and speaks protocol 2.
    pub listener6: Option<OwnedFd>,
}

/// Asks the agent running on `pin_path` to hand the node over. `None`: no agent answers
/// there (start as usual).
pub fn request(pin_path: &Path) -> Result<Option<Takeover>, HandoverError> {
    match request_as(pin_path, HELLO_V2)? {
        // An agent of protocol 1 closes on the greeting it does not know: ask its way.
        Asked::Closed => match request_as(pin_path, HELLO_V1)? {
            Asked::Closed => Err(HandoverError::Protocol(
                "the running agent closed the connection without an answer".into(),
            )),
            Asked::NoAgent => Ok(None),
            Asked::Taken(t) => Ok(Some(t)),
        },
        Asked::NoAgent => Ok(None),
        Asked::Taken(t) => Ok(Some(t)),
    }
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
        listener,
        listener6,
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
    /// The pending hand-over, the IPv4 listener and the IPv6 one if it came.
    pub fn split(self) -> (Pending, OwnedFd, Option<OwnedFd>) {
        (Pending { conn: self.conn }, self.listener, self.listener6)
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

    #[test]
    fn protocol_2_hands_both_listeners_over() {
        let pin = pin("v2");
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l6 = TcpListener::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0)).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _t = serve(&pin, l4.as_fd(), Some(l6.as_fd()), tx).unwrap();
        let t = request(&pin).unwrap().expect("the agent answers");
        let (pending, fd4, fd6) = t.split();
        assert_eq!(local_port(&fd4), l4.local_addr().unwrap().port());
        let fd6 = fd6.expect("the IPv6 listener comes along");
        assert_eq!(local_port(&fd6), l6.local_addr().unwrap().port());
        assert!(matches!(rx.blocking_recv(), Some(Event::Requested)));
        pending.ready().unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Ready)));
    }

    #[test]
    fn protocol_2_says_when_there_is_no_ipv6_listener() {
        let pin = pin("v2-none");
        let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let _t = serve(&pin, l4.as_fd(), None, tx).unwrap();
        let (_pending, fd4, fd6) = request(&pin).unwrap().unwrap().split();
        assert_eq!(local_port(&fd4), l4.local_addr().unwrap().port());
        assert!(fd6.is_none());
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
            for _ in 0..2 {
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
        assert_eq!(local_port(&fd), l4.local_addr().unwrap().port());
        assert!(fd6.is_none());
        pending.ready().unwrap();
        assert_eq!(old.join().unwrap(), [HELLO_V2, HELLO_V1, READY]);
    }

    #[test]
    fn no_agent_means_no_takeover() {
        assert!(request(&pin("nobody")).unwrap().is_none());
    }
}

//! Hand-over between two agents of one node (an upgrade: the DaemonSet starts the new pod
//! before the old one stops), so that no connection is refused, sent around the mesh or
//! cut:
//!
//! 1. The new agent (`--takeover`) finds the pin folder locked and connects to the running
//!    agent's hand-over socket (abstract Unix socket `mesh-agent-handover:<pin folder>`,
//!    root only: both agents run in the node's network namespace).
//! 2. The old agent sends the proxy's listening socket (`SCM_RIGHTS`): from now on both
//!    accept from the same socket, so nothing waiting in its queue is lost. It stops
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

const HELLO: &str = "HANDOVER 1\n";
const LISTENER: &[u8] = b"LISTENER\n";
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
/// one at a time; `listener` is the proxy's listening socket (duplicated for each sending).
pub fn serve(
    pin_path: &Path,
    listener: BorrowedFd<'_>,
    events: mpsc::UnboundedSender<Event>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let sock = UnixListener::bind_addr(&address(pin_path)?)?;
    let listener = listener.try_clone_to_owned()?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            let _span = tracing::info_span!("handover").entered();
            let mut sock = Some(sock);
            while let Some(conn) = sock.as_ref().and_then(|s| s.accept().ok()).map(|(c, _)| c) {
                let mut reader = match greet(&conn) {
                    Ok(r) => r,
                    Err(e) => {
                        // Not a hand-over (or not from root): the socket stays open.
                        warn!(error = %e, "refused a hand-over request");
                        continue;
                    }
                };
                // One hand-over per agent: free the name for the new agent's own socket.
                sock = None;
                if let Err(e) = hand_over(&conn, &mut reader, &listener, &events) {
                    warn!(error = %e, "the hand-over failed");
                    let _ = events.send(Event::Failed(e.to_string()));
                }
            }
        })
}

/// Checks who asks and what: root (the agent), with the protocol's greeting.
fn greet(conn: &UnixStream) -> Result<BufReader<&UnixStream>, HandoverError> {
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
    if line != HELLO {
        return Err(HandoverError::Protocol(format!(
            "unexpected greeting {line:?}"
        )));
    }
    Ok(reader)
}

fn hand_over(
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    listener: &OwnedFd,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), HandoverError> {
    let io = |step| move |source| HandoverError::Io { step, source };
    info!("a new agent asks for the node; handing the proxy's listener over");
    sys::send_fd(conn.as_fd(), listener.as_fd(), LISTENER).map_err(io("sending the listener"))?;
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
}

/// Asks the agent running on `pin_path` to hand the node over. `None`: no agent answers
/// there (start as usual).
pub fn request(pin_path: &Path) -> Result<Option<Takeover>, HandoverError> {
    let io = |step| move |source| HandoverError::Io { step, source };
    let conn = match UnixStream::connect_addr(&address(pin_path).map_err(io("address"))?) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(io("connecting")(e)),
    };
    conn.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io("timeout"))?;
    (&conn).write_all(HELLO.as_bytes()).map_err(io("hello"))?;
    let mut buf = [0u8; 64];
    let (n, fd) = sys::recv_fd(conn.as_fd(), &mut buf).map_err(io("receiving the listener"))?;
    match (&buf[..n], fd) {
        (LISTENER, Some(listener)) => {
            info!("the running agent handed its listener over; taking the node");
            Ok(Some(Takeover { conn, listener }))
        }
        (other, _) => Err(HandoverError::Protocol(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// `Takeover` without its listener (moved into the proxy).
pub struct Pending {
    conn: UnixStream,
}

impl Takeover {
    pub fn split(self) -> (Pending, OwnedFd) {
        (Pending { conn: self.conn }, self.listener)
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

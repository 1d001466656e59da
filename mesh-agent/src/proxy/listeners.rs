//! The outbound listeners of one address: a `SO_REUSEPORT` group with a socket per proxy
//! worker (`proxy::workers`), built from what a running agent handed over (every socket
//! of its group, hand-over protocol 3; its one socket, protocols 1 and 2) plus new
//! siblings bound beside them.
//!
//! No socket of the group is ever closed while the node runs: the hand-over passes them
//! all on, so nothing waiting in any accept queue is lost. A new agent with fewer workers
//! than the group has sockets serves several on one worker. Handing over to an agent of an
//! older protocol (a rollback), which takes one socket, steers new connections to that one
//! (`steer_to_first`) and takes the others out of the group once it is ready
//! (`leave_group`).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use tokio::net::TcpSocket;
use tracing::{info, warn};

use crate::sys;

/// A new listening socket on `addr`, in the port's `SO_REUSEPORT` group, not registered
/// with any runtime yet. `TCP_NODELAY` is set on it: every accepted socket inherits it
/// (Linux copies the listener's TCP options into the child; a unit test checks it), so no
/// connection pays a `setsockopt`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    let l = sys::listen_std(sock, backlog)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A listening socket handed over by a running agent, with `TCP_NODELAY` set as `bind`
/// sets it, and `SO_REUSEPORT` (an agent of hand-over protocol 1 or 2 bound its IPv4
/// listener without; Linux lets a listening socket take it, and builds the group when the
/// first sibling binds). Connections the kernel queued before (an upgrade's instant) keep
/// Nagle: slower small writes for those few, nothing else.
pub fn adopt(fd: OwnedFd) -> io::Result<std::net::TcpListener> {
    sys::set_reuseport(fd.as_fd())?;
    // The option is TCP's, whatever std type carries the descriptor for the call.
    let s = std::net::TcpStream::from(fd);
    s.set_nodelay(true)?;
    let l = std::net::TcpListener::from(OwnedFd::from(s));
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The group for `addr`: the `inherited` sockets first (in the order the old agent kept
/// them), then new siblings until there is one per worker. A sibling the kernel refuses
/// beside inherited sockets leaves the group as it is, with a warning: its sockets are
/// then spread over fewer workers.
pub fn group(
    addr: SocketAddr,
    inherited: Vec<OwnedFd>,
    workers: usize,
    backlog: u32,
) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(workers.max(inherited.len()));
    for fd in inherited {
        out.push(adopt(fd)?);
    }
    if let Some(first) = out.first() {
        // A rollback to an agent of an older protocol steered the group to its first
        // socket (`steer_to_first`); its siblings left the group then, so spread anew.
        let _ = sys::reuseport_detach_prog(first.as_fd());
    }
    while out.len() < workers.max(1) {
        match bind(addr, backlog) {
            Ok(l) => out.push(l),
            Err(e) if !out.is_empty() => {
                warn!(%addr, error = %e, listeners = out.len(), workers,
                    "could not add a listener beside the handed-over ones; fewer listeners than workers");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    info!(%addr, listeners = out.len(), "outbound listeners (SO_REUSEPORT group)");
    Ok(out)
}

/// Sends every new connection of `fd`'s group to the group's first socket (the one that
/// joined first: the first one this agent keeps, which a hand-over passes first).
pub fn steer_to_first(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::reuseport_steer_to_first(fd)
}

/// Takes a listening socket out of its group (`sys::reuseport_leave_group`).
pub fn leave_group(fd: BorrowedFd<'_>) {
    sys::reuseport_leave_group(fd)
}

#[cfg(test)]
mod tests {
    use std::{
        io::ErrorKind,
        net::{Ipv4Addr, TcpStream},
        os::fd::AsFd,
    };

    use super::*;

    fn accept_all(l: &std::net::TcpListener) -> usize {
        let mut n = 0;
        loop {
            match l.accept() {
                Ok(_) => n += 1,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn connect(n: usize, addr: SocketAddr) -> Vec<TcpStream> {
        let c = (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        c
    }

    /// An agent of hand-over protocol 1 or 2 bound its listener without `SO_REUSEPORT`;
    /// the new agent adds siblings to it all the same, and the kernel spreads over them.
    #[test]
    fn siblings_join_a_handed_over_listener_bound_without_reuseport() {
        let old = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = old.local_addr().unwrap();
        let fd = OwnedFd::from(old.try_clone().unwrap());
        let g = group(addr, vec![fd], 3, 128).unwrap();
        assert_eq!(g.len(), 3);
        let _c = connect(60, addr);
        let counts: Vec<usize> = g.iter().map(accept_all).collect();
        assert_eq!(counts.iter().sum::<usize>(), 60, "{counts:?}");
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    }

    /// A rollback: new connections go to the first socket only, and a sibling taken out
    /// of the group gets none.
    #[test]
    fn steering_sends_everything_to_the_first_socket_and_a_sibling_can_leave() {
        let g = group(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), vec![], 1, 128).unwrap();
        let addr = g[0].local_addr().unwrap();
        let mut g = g;
        g.push(bind(addr, 128).unwrap());
        g.push(bind(addr, 128).unwrap());
        steer_to_first(g[0].as_fd()).unwrap();
        let _c = connect(30, addr);
        let counts: Vec<usize> = g.iter().map(accept_all).collect();
        assert_eq!(counts, [30, 0, 0]);
        leave_group(g[1].as_fd());
        leave_group(g[2].as_fd());
        // Adopted again (as the next agent would): the program goes, siblings spread.
        let first = OwnedFd::from(g.remove(0));
        let g2 = group(addr, vec![first], 2, 128).unwrap();
        let _c = connect(40, addr);
        let counts: Vec<usize> = g2.iter().map(accept_all).collect();
        assert_eq!(counts.iter().sum::<usize>(), 40, "{counts:?}");
        assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    }
}

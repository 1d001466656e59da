//! The few system calls std and tokio do not wrap. This is the one module of the agent
//! allowed `unsafe`; every block says why it is sound.
#![expect(
    unsafe_code,
    reason = "the one module of the agent that makes raw system calls"
)]

pub mod alloc;
pub mod mapped;
pub mod memory;
pub mod perf;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `SO_COOKIE` (Linux 4.12+): the socket cookie `bpf_get_socket_cookie` reports.
const SO_COOKIE: libc::c_int = 57;

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The page size (`sysconf(_SC_PAGESIZE)`); 4096 if it cannot be read.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The cookie of the network namespace at `netns` (a path such as `/run/netns/NAME` or
/// `/proc/PID/ns/net`), as `bpf_get_netns_cookie` reports it for sockets created in it.
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    in_netns(netns, || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")
            .or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
        socket_netns_cookie(sock.as_fd())
    })
}

/// Runs `f` on a throw-away thread inside the network namespace at `netns`:
/// setns(CLONE_NEWNET) changes the namespace of the calling thread only.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: valid fd; affects only this short-lived thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}

/// Whether this kernel answers `SO_NETNS_COOKIE` (5.14+); asked on a socket of the
/// agent's own namespace.
pub fn netns_cookie_sockopt_works() -> bool {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .is_ok_and(|s| socket_netns_cookie(s.as_fd()).is_ok())
}

fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    get_u64_sockopt(fd, SO_NETNS_COOKIE)
}

/// The socket's cookie (`SO_COOKIE`), as the eBPF programs see it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    get_u64_sockopt(fd, SO_COOKIE)
}

fn get_u64_sockopt(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct; `release` is NUL-terminated by the kernel.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: as above, a NUL-terminated C string inside the struct.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Takes an exclusive, non-blocking `flock` on `dir`; the lock lives as long as the
/// returned fd (and dies with the process, so a crashed agent never blocks the next).
pub fn lock_dir(dir: &Path) -> io::Result<OwnedFd> {
    let f = File::open(dir)?;
    // SAFETY: valid fd owned by `f`.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f.into())
}

/// Whether `path` sits on a filesystem with magic `magic` (statfs).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

pub const BPF_FS_MAGIC: i64 = 0xcafe4a11;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

/// Mounts a bpffs at `target`.
pub fn mount_bpffs(target: &Path) -> io::Result<()> {
    let t = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    // SAFETY: all strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            t.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit: the node proxy holds two sockets
/// per proxied connection, and the usual soft limit (1024) would cap a node at ~500.
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// Gives memory freed after start-up (the eBPF object, BTF, verifier logs) back to the
/// kernel: glibc keeps freed heap otherwise, and that is most of an idle agent's RSS.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Arms `SO_LINGER {on, 0}` so that closing the socket sends RST: how the proxy passes a
/// reset on from one side to the other.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_linger(fd, 1)
}

/// Disarms `set_linger_zero`: closing sends FIN again (the default).
pub fn clear_linger(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_linger(fd, 0)
}

fn set_linger(fd: BorrowedFd<'_>, on: libc::c_int) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: on,
        l_linger: 0,
    };
    // SAFETY: the option value is a valid linger struct of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_PROG_QUERY` (union bpf_attr, query part).
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// `BPF_F_QUERY_EFFECTIVE`: the programs that run for the cgroup's sockets, inherited ones
/// included, in the kernel's run order.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// Ids of the programs attached directly to cgroup `cgroup` for `attach_type`
/// (`BPF_PROG_QUERY`, not the effective set inherited from ancestors).
pub fn cgroup_prog_ids(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    prog_query(cgroup, attach_type, 0)
}

/// Ids of the programs that run for sockets of cgroup `cgroup` at `attach_type`, in the
/// order they run: this cgroup's own, then each ancestor's, each cgroup's in its list
/// order (`BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`).
pub fn cgroup_effective_prog_ids(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    prog_query(cgroup, attach_type, BPF_F_QUERY_EFFECTIVE)
}

fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32, query_flags: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the stated size; `prog_ids` points to
    // `prog_cnt` writable u32s that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQueryAttr,
            std::mem::size_of::<ProgQueryAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// The IPv4 addresses of this network namespace's interfaces, with the index of the
/// interface each is on (`getifaddrs`, a netlink dump). Interfaces named in `skip` are left
/// out.
pub fn local_ipv4_addrs(skip: &[&str]) -> io::Result<Vec<(std::net::Ipv4Addr, u32)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET, so the sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        let name = name.to_string_lossy();
        if skip.iter().any(|s| *s == name) {
            continue;
        }
        // SAFETY: ifa_name is a valid C string (above).
        let index = unsafe { libc::if_nametoindex(ifa.ifa_name) };
        out.push((
            std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
            index,
        ));
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads in the datapath.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `BPF_OBJ_GET` (union bpf_attr, object part).
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `BPF_LINK_UPDATE` (union bpf_attr, link_update part).
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Opens a pinned BPF object (a link, here) by its bpffs path.
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the stated size; `pathname` points to a
    // NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program of a BPF link in one step (5.7+ for cgroup links): connections
/// see either the old program or the new one, never none.
pub fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the stated size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &mut attr as *mut LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `msg` with `fd` attached (`SCM_RIGHTS`) over a connected Unix stream socket.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // Room for one fd's control message, aligned as cmsghdr wants.
    let mut cbuf = [0u64; 8];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call,
    // and the control buffer is large and aligned enough for one SCM_RIGHTS message.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf.as_mut_ptr().cast();
        m.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        if libc::sendmsg(sock.as_raw_fd(), &m, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives a message and the fd attached to it, if any (`SCM_RIGHTS`).
pub fn recv_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    use std::os::fd::FromRawFd;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in `send_fd`; the kernel writes at most `msg_controllen` bytes of control
    // data, and an fd it passes is new and owned by nothing else.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf.as_mut_ptr().cast();
        m.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = libc::recvmsg(sock.as_raw_fd(), &mut m, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fd = None;
        let mut c = libc::CMSG_FIRSTHDR(&m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&m, c);
        }
        Ok((n as usize, fd))
    }
}

/// Takes the pin folder's lock, waiting up to `timeout` for its holder to release it.
pub fn lock_dir_wait(dir: &Path, timeout: std::time::Duration) -> io::Result<OwnedFd> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match lock_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// The uid of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_uid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the stated length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Enters the network namespace at `netns` on the calling thread (`setns(CLONE_NEWNET)`).
/// Only for threads that stay there (`NetnsWorker`) or end right after.
fn enter_netns(netns: &File) -> io::Result<()> {
    // SAFETY: valid fd; changes the namespace of the calling thread only.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that lives in one network namespace and runs jobs there: sockets it creates
/// (listeners, the agent's in-pod connections) belong to that namespace for good, and
/// interface indexes and netlink requests resolve there. One per capturing pod, so a new
/// connection into the pod costs a channel round trip, not a thread and a `setns`.
///
/// The thread holds the namespace alive; dropping the worker ends it.
pub struct NetnsWorker {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetnsWorker {
    pub fn spawn(netns: &Path, name: String) -> io::Result<NetnsWorker> {
        let ns = File::open(netns)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let entered = enter_netns(&ns);
            drop(ns);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("netns worker thread died")))?;
        Ok(NetnsWorker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `job` on the worker (inside the namespace) without waiting for it.
    pub fn submit(&self, job: Job) -> io::Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| io::Error::other("netns worker stopped"))
    }

    /// Runs `f` inside the namespace and waits for its result (blocking).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("netns worker dropped the job")))
    }
}

impl Drop for NetnsWorker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            // The worker may be dropped from one of its own jobs; never join oneself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The name of the interface of this network namespace that holds `ip`, if any.
pub fn ipv4_interface_name(ip: std::net::Ipv4Addr) -> io::Result<Option<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET, so the sockaddr is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        if std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()) == ip {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// `tcpi_bytes_acked` of a TCP socket (`TCP_INFO`): its payload bytes the peer
/// acknowledged (the egress relay's count of what the proxy's client socket sent).
pub fn tcp_bytes_acked(fd: std::os::fd::RawFd) -> io::Result<u64> {
    // SAFETY: a zeroed plain C struct; getsockopt fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked)
}

/// Whether a socket has an error pending or hung up (`POLLERR`, `POLLHUP` from a
/// zero-timeout `poll`, which leaves the error in place): the egress relay's check of the
/// proxy's client socket (a TCP socket reset by its peer is closed: `POLLHUP`).
pub fn failed_or_hung_up(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// Whether a socket has bytes to read now (`POLLIN` from a zero-timeout `poll`; for a
/// socket with a psock this covers the psock's queue too).
pub fn readable_now(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

/// `epoll_create1(EPOLL_CLOEXEC)`: an epoll instance of the caller's own, for a mask
/// tokio's registrations cannot express (the egress relay watches P_u for
/// `EPOLLRDHUP` without `EPOLLIN`).
pub fn epoll_create() -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: no pointers; the returned fd is checked before it is owned.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd this process owns and nothing else holds.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `epoll_ctl`: adds `fd` to `ep` (`add`) or changes its mask to `events`.
pub fn epoll_set(
    ep: BorrowedFd<'_>,
    fd: std::os::fd::RawFd,
    events: u32,
    add: bool,
) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    let op = if add {
        libc::EPOLL_CTL_ADD
    } else {
        libc::EPOLL_CTL_MOD
    };
    // SAFETY: a valid event struct; the kernel copies it.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes `ep`'s ready events without waiting (its readiness is what the caller wanted);
/// how many there were.
pub fn epoll_drain(ep: BorrowedFd<'_>) -> io::Result<usize> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: the buffer holds `evs.len()` events; zero timeout.
    let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `SIOCOUTQ` of a TCP socket: its bytes not yet acknowledged (sent or not).
pub fn tcp_outq(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one int through the valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// `listen(2)` on a socket set up (options, bind) through `tokio::net::TcpSocket`, as a
/// std listener registered with no runtime yet (`proxy::listeners`).
pub fn listen_std(sock: tokio::net::TcpSocket, backlog: u32) -> io::Result<std::net::TcpListener> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: the descriptor comes from `into_raw_fd`: open, and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(sock.into_raw_fd()) };
    // SAFETY: listen(2) on a socket this function owns.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog.min(i32::MAX as u32) as libc::c_int) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::TcpListener::from(fd))
}

/// Sets `SO_REUSEPORT` (on a listening socket too: Linux builds the port's group when
/// the first sibling binds).
pub fn set_reuseport(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the option value is an int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches to `fd`'s `SO_REUSEPORT` group a classic BPF program that picks the group's
/// first socket (index 0) for every new connection.
pub fn reuseport_steer_to_first(fd: BorrowedFd<'_>) -> io::Result<()> {
    // BPF_RET | BPF_K: return 0.
    let mut prog = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: the program outlives the call (the kernel copies it); the value is a
    // sock_fprog of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the program of `fd`'s `SO_REUSEPORT` group, if any (Linux 5.3+).
pub fn reuseport_detach_prog(fd: BorrowedFd<'_>) -> io::Result<()> {
    let v: libc::c_int = 0;
    // SAFETY: SO_DETACH_REUSEPORT_BPF reads an int of the stated size, and ignores it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a listening socket out of its group and its port, whoever else holds a
/// descriptor of it (`shutdown` acts on the socket): the kernel sends it no more
/// connections, and accepting from it fails.
pub fn reuseport_leave_group(fd: BorrowedFd<'_>) {
    let r = fd
        .try_clone_to_owned()
        .and_then(|d| std::net::TcpStream::from(d).shutdown(std::net::Shutdown::Both));
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not take a listener out of its group");
    }
}

//! The few system calls std and tokio do not wrap. This is the one module of the agent
//! allowed `unsafe`; every block says why it is sound.
#![expect(
    unsafe_code,
    reason = "the one module of the agent that makes raw system calls"
)]

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The cookie of the network namespace at `netns` (a path such as `/run/netns/NAME` or
/// `/proc/PID/ns/net`), as `bpf_get_netns_cookie` reports it for sockets created in it.
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    let ns = File::open(netns)?;
    // setns(CLONE_NEWNET) changes the namespace of the calling thread only, so do it on a
    // throw-away thread.
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: valid fd; affects only this short-lived thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")
                .or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
            socket_netns_cookie(sock.as_fd())
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns cookie thread panicked")))
    })
}

fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
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
    let l = libc::linger {
        l_onoff: 1,
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

/// Ids of the programs attached directly to cgroup `cgroup` for `attach_type`
/// (`BPF_PROG_QUERY`, not the effective set inherited from ancestors).
pub fn cgroup_prog_ids(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
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

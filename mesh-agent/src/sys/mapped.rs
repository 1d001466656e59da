//! A `u64` another party writes, read through a shared read-only mapping of a descriptor:
//! a BPF array map created `BPF_F_MMAPABLE` (its first value starts the mapping), read
//! with one load instead of a `bpf()` call.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

/// The first `u64` of a shared mapping of one page, mapped read-only for the process's
/// lifetime (the mapping holds the object in the kernel after its descriptor closes; it
/// is never unmapped: one page).
pub struct MappedU64 {
    at: NonNull<AtomicU64>,
}

// SAFETY: a read-only shared mapping that is never unmapped; the only access is an atomic
// load.
unsafe impl Send for MappedU64 {}
// SAFETY: as above.
unsafe impl Sync for MappedU64 {}

impl MappedU64 {
    /// Maps the first page of `fd` (shared, read-only). The kernel refuses a BPF array
    /// created without `BPF_F_MMAPABLE` (`EINVAL`).
    pub fn map(fd: BorrowedFd<'_>) -> io::Result<MappedU64> {
        // SAFETY: a fresh shared read-only mapping of a descriptor we borrow for the call;
        // the kernel checks the length against the object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Page-aligned, so aligned for a u64.
        NonNull::new(p.cast::<AtomicU64>())
            .map(|at| MappedU64 { at })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }

    /// The value now. The writer's 8-byte aligned store is single-copy atomic: this sees
    /// the old value or the new one, never a mix.
    pub fn get(&self) -> u64 {
        // SAFETY: mapped (readable) for the process's lifetime, aligned.
        unsafe { self.at.as_ref() }.load(Ordering::Acquire)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::fd::AsFd};

    use super::*;

    /// A file's first eight bytes, read through the mapping, follow what is written.
    #[test]
    fn reads_what_the_writer_stores() {
        let path = std::env::temp_dir().join(format!("mesh-mapped-u64-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all(&7u64.to_ne_bytes()).unwrap();
        f.set_len(4096).unwrap();
        let m = MappedU64::map(f.as_fd()).unwrap();
        assert_eq!(m.get(), 7);
        use std::os::unix::fs::FileExt;
        f.write_all_at(&42u64.to_ne_bytes(), 0).unwrap();
        assert_eq!(m.get(), 42);
        drop(f);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(m.get(), 42, "the mapping outlives the descriptor");
    }
}

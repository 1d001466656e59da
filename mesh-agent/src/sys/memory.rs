//! Hands back resident memory that only start-up used: the pages of the agent's own
//! executable that loading, verifying and wiring touched once.
//!
//! Why it matters: the binary's code is about 20 MB, and the kernel maps a 64 kB window
//! of it around every first call (fault-around), so by the time the agent is ready almost
//! all of it is resident (measured: 20 of 22 MB of the idle RSS, against 2 MB of heap
//! and stacks), although an idle agent runs a few kB of it. Dropping those mappings
//! (`MADV_DONTNEED`) leaves the page cache as it was: code that runs again is mapped
//! again from there on its first call (a minor fault, no disk read), so the resident set
//! follows what runs.

use std::{io, os::unix::fs::MetadataExt};

/// A mapping of the executable that may be dropped: read-only, and never written (no
/// copy-on-write page), so its memory equals the file's bytes.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    len: usize,
    rss_kb: u64,
}

/// The droppable mappings of the file `(major, minor, inode)` in an smaps text.
fn droppable(smaps: &str, file: (u64, u64, u64)) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read, and its resident and anonymous (copied on write) sizes.
    let mut cur: Option<(usize, usize, bool)> = None;
    let (mut rss, mut anon) = (None, None);
    let mut flush = |cur: Option<(usize, usize, bool)>, rss: Option<u64>, anon: Option<u64>| {
        if let (Some((start, end, true)), Some(rss_kb), Some(0)) = (cur, rss, anon) {
            out.push(Mapping {
                start,
                len: end - start,
                rss_kb,
            });
        }
    };
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                flush(cur.take(), rss.take(), anon.take());
                let perms = f.next().unwrap_or("");
                let _offset = f.next();
                let dev = f
                    .next()
                    .and_then(|d| d.split_once(':'))
                    .and_then(|(ma, mi)| {
                        Some((
                            u64::from_str_radix(ma, 16).ok()?,
                            u64::from_str_radix(mi, 16).ok()?,
                        ))
                    });
                let inode = f.next().and_then(|i| i.parse::<u64>().ok());
                let ours = matches!((dev, inode), (Some((ma, mi)), Some(i)) if (ma, mi, i) == file);
                // Read-only and private: never written by this process (shared or
                // writable mappings are never candidates).
                let read_only =
                    perms.len() == 4 && perms.as_bytes()[1] == b'-' && perms.ends_with('p');
                cur = Some((start, end, ours && read_only));
                continue;
            }
        }
        let mut kb = || f.next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => rss = kb(),
            "Anonymous:" => anon = kb(),
            _ => {}
        }
    }
    flush(cur, rss, anon);
    out
}

/// `dev_t` as the kernel splits it (glibc's `gnu_dev_major` / `gnu_dev_minor`).
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// Drops the resident pages of the executable's code and constants (never of its data:
/// a mapping with a copied-on-write page is left alone). Returns the bytes that were
/// resident. Call it once start-up is over; what runs later comes back on first use.
pub fn release_start_up_code() -> io::Result<u64> {
    let exe = std::fs::metadata("/proc/self/exe")?;
    let (major, minor) = major_minor(exe.dev());
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in droppable(&smaps, (major, minor, exe.ino())) {
        // SAFETY: the range is one whole mapping of the executable that is read-only and
        // private and holds no page written by this process (no anonymous page), so its
        // content is the file's: MADV_DONTNEED only unmaps the pages, and the next access
        // maps the same bytes again from the page cache. No Rust reference is invalidated
        // (the memory's content does not change). Nothing remaps it meanwhile (the loader
        // maps the executable once, at exec).
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += m.rss_kb * 1024;
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
555cd683a000-555cd6f64000 r--p 00000000 fe:00 10182779                   /bin/mesh-agent
Rss:                3240 kB
Anonymous:             0 kB
555cd6f64000-555cd8293000 r-xp 00729000 fe:00 10182779                   /bin/mesh-agent
Rss:               16780 kB
Anonymous:             0 kB
555cd8293000-555cd8347000 r--p 01a57000 fe:00 10182779                   /bin/mesh-agent
Rss:                 720 kB
Anonymous:           720 kB
555cd8347000-555cd8350000 rw-p 01b0a000 fe:00 10182779                   /bin/mesh-agent
Rss:                  36 kB
Anonymous:            36 kB
7f7a7fdce000-7f7a7ff24000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1096 kB
Anonymous:             0 kB
7f7a7f424000-7f7a7f4a5000 r--s 00001000 00:10 1038                       anon_inode:bpf-map
Rss:                 516 kB
Anonymous:             0 kB
";

    /// Code and constants of the executable only: not its relocated (copied-on-write)
    /// or writable data, not other files, not shared mappings.
    #[test]
    fn only_the_executables_unwritten_read_only_mappings_are_dropped() {
        let got = droppable(SMAPS, (0xfe, 0, 10182779));
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x555cd683a000,
                    len: 0x555cd6f64000 - 0x555cd683a000,
                    rss_kb: 3240
                },
                Mapping {
                    start: 0x555cd6f64000,
                    len: 0x555cd8293000 - 0x555cd6f64000,
                    rss_kb: 16780
                },
            ]
        );
        assert!(droppable(SMAPS, (0xfe, 1, 10182779)).is_empty());
    }

    #[test]
    fn dev_t_splits_as_the_kernel_writes_it() {
        // glibc's makedev: the low 8 bits of the minor, the low 12 of the major, then
        // the high bits of each.
        let makedev = |major: u64, minor: u64| {
            (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12
        };
        assert_eq!(major_minor(0xfe00), (0xfe, 0));
        assert_eq!(major_minor(makedev(0x1234, 0x10001)), (0x1234, 0x10001));
    }

    /// The test binary's own code leaves the resident set and keeps running.
    #[test]
    fn released_code_runs_again() {
        let released = release_start_up_code().expect("madvise");
        assert!(released > 0, "nothing of the executable was resident?");
        // The released code (this parser, among the rest) runs again after the release
        // and answers as before: its pages came back from the page cache.
        assert_eq!(droppable(SMAPS, (0xfe, 0, 10182779)).len(), 2);
        assert!(
            release_start_up_code().is_ok(),
            "a second release is harmless"
        );
    }
}

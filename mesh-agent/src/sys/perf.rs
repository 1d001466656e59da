//! Raw `perf_event_open` sampling of one thread and glibc's allocator statistics, for the
//! admin endpoint's CPU and heap profiles (`admin::profile`). The layout constants are
//! the kernel's `include/uapi/linux/perf_event.h`.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

const PERF_TYPE_SOFTWARE: u32 = 1;
/// A per-task clock: samples land only while the thread runs, one per period of its CPU
/// time, so sample counts are CPU time.
const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
const PERF_SAMPLE_IP: u64 = 1 << 0;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_CALLCHAIN: u64 = 1 << 5;
/// `perf_event_attr` flag bits.
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_EXCLUDE_KERNEL: u64 = 1 << 5;
const ATTR_EXCLUDE_HV: u64 = 1 << 6;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SAMPLE: u32 = 9;
/// Callchain entries at or above this are context markers (`PERF_CONTEXT_KERNEL`,
/// `_USER`, ...), not addresses.
pub const PERF_CONTEXT_MAX: u64 = (-4095i64) as u64;
/// `PERF_CONTEXT_KERNEL`: the frames after it are kernel addresses.
pub const PERF_CONTEXT_KERNEL: u64 = (-128i64) as u64;

/// `struct perf_event_attr`, `PERF_ATTR_SIZE_VER5` (Linux 4.8+: `sample_max_stack`).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
}
const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 112);

/// Offsets in `struct perf_event_mmap_page` (the first page of the ring).
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// One sample: the thread and its callchain, innermost first, with the kernel's context
/// markers left in (`PERF_CONTEXT_KERNEL`, `PERF_CONTEXT_USER`).
#[derive(Debug)]
pub struct Sample {
    pub tid: u32,
    pub ip: u64,
    pub chain: Vec<u64>,
}

/// A sampling event on one thread with its ring buffer mapped.
pub struct ThreadSampler {
    fd: OwnedFd,
    ring: *mut u8,
    ring_len: usize,
    data_off: usize,
    data_size: usize,
}

// SAFETY: the mapping is owned by this value alone; reading it needs `&mut self`.
unsafe impl Send for ThreadSampler {}

impl ThreadSampler {
    /// Opens a sampler on thread `tid` of this process: one sample per `period_ns` of the
    /// thread's CPU time, callchains of at most `max_stack` frames, a ring of
    /// `2^data_pages_log2` pages. `kernel`: also the kernel's frames (needs
    /// `perf_event_paranoid` <= 1 or CAP_PERFMON). Starts disabled: `enable` starts it.
    pub fn open(
        tid: i32,
        period_ns: u64,
        max_stack: u16,
        data_pages_log2: u32,
        kernel: bool,
    ) -> io::Result<ThreadSampler> {
        let mut flags = ATTR_DISABLED | ATTR_EXCLUDE_HV;
        if !kernel {
            flags |= ATTR_EXCLUDE_KERNEL;
        }
        let attr = PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_TASK_CLOCK,
            sample_period: period_ns,
            sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_CALLCHAIN,
            flags,
            sample_max_stack: max_stack,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid perf_event_attr of the size it states, alive for the
        // call; the other arguments are plain integers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                tid,
                -1i32,
                -1i32,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let page = page_size();
        let ring_len = page * (1 + (1usize << data_pages_log2));
        // SAFETY: a fresh shared mapping of the event's descriptor; the kernel checks
        // the length (1 + 2^n pages).
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = ring.cast::<u8>();
        // SAFETY: the header page is mapped; data_offset/size (Linux 4.1+) are u64 fields
        // the kernel set before mmap returned.
        let (data_off, data_size) = unsafe {
            (
                std::ptr::read_volatile(ring.add(DATA_OFFSET).cast::<u64>()) as usize,
                std::ptr::read_volatile(ring.add(DATA_SIZE).cast::<u64>()) as usize,
            )
        };
        let (data_off, data_size) = if data_size == 0 {
            (page, ring_len - page)
        } else {
            (data_off, data_size)
        };
        Ok(ThreadSampler {
            fd,
            ring,
            ring_len,
            data_off,
            data_size,
        })
    }

    pub fn enable(&self) -> io::Result<()> {
        self.ioctl(PERF_EVENT_IOC_ENABLE)
    }

    pub fn disable(&self) -> io::Result<()> {
        self.ioctl(PERF_EVENT_IOC_DISABLE)
    }

    fn ioctl(&self, req: libc::c_ulong) -> io::Result<()> {
        // SAFETY: an argument-less perf ioctl on our own descriptor.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes every record in the ring: samples go to `out`; returns the samples the
    /// kernel reported lost (the ring was full).
    pub fn drain(&mut self, out: &mut impl FnMut(Sample)) -> u64 {
        // SAFETY: data_head/data_tail are u64 fields of the mapped header page, 8-aligned;
        // the kernel writes data_head, we write data_tail (the documented protocol).
        let (head_ref, tail_ref) = unsafe {
            (
                &*self.ring.add(DATA_HEAD).cast::<AtomicU64>(),
                &*self.ring.add(DATA_TAIL).cast::<AtomicU64>(),
            )
        };
        let head = head_ref.load(Ordering::Acquire);
        let mut tail = tail_ref.load(Ordering::Relaxed);
        let mut lost = 0;
        let mut rec = Vec::new();
        while tail + 8 <= head {
            let hdr = self.copy_out(tail, 8);
            let ty = u32::from_ne_bytes(hdr[0..4].try_into().unwrap_or_default());
            let size = u16::from_ne_bytes(hdr[6..8].try_into().unwrap_or_default()) as u64;
            if size < 8 || tail + size > head {
                break;
            }
            rec.clear();
            rec.extend_from_slice(&self.copy_out(tail, size as usize));
            let u64_at = |o: usize| {
                rec.get(o..o + 8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
            };
            match ty {
                PERF_RECORD_SAMPLE => {
                    // ip, pid/tid, nr, ips[nr]
                    if let (Some(ip), Some(pt), Some(nr)) = (u64_at(8), u64_at(16), u64_at(24)) {
                        let nr = (nr as usize).min((rec.len().saturating_sub(32)) / 8);
                        let chain = (0..nr).filter_map(|i| u64_at(32 + 8 * i)).collect();
                        out(Sample {
                            tid: (pt >> 32) as u32,
                            ip,
                            chain,
                        });
                    }
                }
                PERF_RECORD_LOST => lost += u64_at(16).unwrap_or(0),
                _ => {}
            }
            tail += size;
        }
        tail_ref.store(tail, Ordering::Release);
        lost
    }

    /// `len` bytes of the data ring from position `pos`, across the wrap.
    fn copy_out(&self, pos: u64, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        let start = (pos as usize) % self.data_size;
        let first = len.min(self.data_size - start);
        // SAFETY: both ranges lie inside the mapped data area (start < data_size, and
        // first/len - first are bounded by it); the kernel does not write below data_head.
        unsafe {
            let base = self.ring.add(self.data_off);
            v.extend_from_slice(std::slice::from_raw_parts(base.add(start), first));
            v.extend_from_slice(std::slice::from_raw_parts(base, len - first));
        }
        v
    }
}

impl Drop for ThreadSampler {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once; the fd closes after.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_len);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// glibc's allocator statistics: `mallinfo2` (summed over every arena) and the number of
/// arenas (`malloc_info`'s `<heap>` elements).
#[derive(Debug, Clone, Copy, Default)]
pub struct MallocStats {
    /// Bytes taken from the system with brk/sbrk and arena mmaps (`arena`).
    pub arena: u64,
    /// Free chunks (`ordblks`) and fastbin chunks (`smblks`).
    pub free_chunks: u64,
    pub fastbin_chunks: u64,
    /// Chunks allocated with their own mmap (`hblks`) and their bytes (`hblkhd`).
    pub mmapped_chunks: u64,
    pub mmapped_bytes: u64,
    /// Bytes in use by the program (`uordblks`), free in fastbins (`fsmblks`), free in
    /// total (`fordblks`), releasable from the top of the main heap (`keepcost`).
    pub in_use: u64,
    pub fastbin_free: u64,
    pub free: u64,
    pub releasable: u64,
    pub arenas: u64,
}

pub fn malloc_stats() -> MallocStats {
    // SAFETY: mallinfo2 (glibc 2.33+) returns a struct by value; no preconditions.
    let m = unsafe { libc::mallinfo2() };
    MallocStats {
        arena: m.arena as u64,
        free_chunks: m.ordblks as u64,
        fastbin_chunks: m.smblks as u64,
        mmapped_chunks: m.hblks as u64,
        mmapped_bytes: m.hblkhd as u64,
        in_use: m.uordblks as u64,
        fastbin_free: m.fsmblks as u64,
        free: m.fordblks as u64,
        releasable: m.keepcost as u64,
        arenas: malloc_info_xml()
            .map(|x| x.matches("<heap nr=").count() as u64)
            .unwrap_or(0),
    }
}

/// `malloc_info(0, ...)`'s XML (one `<heap>` per arena), through an in-memory stream.
fn malloc_info_xml() -> io::Result<String> {
    let mut buf: *mut libc::c_char = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: open_memstream writes the buffer pointer and length through the two valid
    // out pointers when the stream is flushed or closed; we read them only after fclose,
    // then free the buffer it allocated (with glibc's free, as documented).
    unsafe {
        let f = libc::open_memstream(&mut buf, &mut len);
        if f.is_null() {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::malloc_info(0, f);
        libc::fclose(f);
        if buf.is_null() {
            return Err(io::Error::other("malloc_info wrote nothing"));
        }
        let s =
            String::from_utf8_lossy(std::slice::from_raw_parts(buf.cast::<u8>(), len)).into_owned();
        libc::free(buf.cast());
        if rc != 0 {
            return Err(io::Error::other("malloc_info failed"));
        }
        Ok(s)
    }
}

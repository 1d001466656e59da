//! Production triage without tools on the node: a CPU profile of the agent's own threads
//! (`GET /debug/profile?seconds=N`, `mesh-agent debug profile`) as folded stacks, the
//! input of flame graph tools, and the allocator's view of the heap beside the RSS
//! (`GET /debug/heap`, `mesh-agent debug heap`), which tells a leak (in use grows) from
//! fragmentation (free grows, in use does not).
//!
//! The CPU profile samples each thread's CPU clock with `perf_event_open` (one sample per
//! ~10 ms of a thread's CPU time: 99 Hz of CPU), callchains walked by the kernel through
//! frame pointers, symbolized here from the ELF symbol tables of the mapped files
//! (`object`, demangled by `rustc-demangle`) and kernel frames from `/proc/kallsyms`.

use std::{
    collections::HashMap,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, ObjectSymbolTable as _};
use serde::Serialize;

use crate::sys::perf::{self, ThreadSampler, PERF_CONTEXT_KERNEL, PERF_CONTEXT_MAX};

/// Longest profile (seconds): the request holds an admin connection and a blocking thread
/// for that long.
pub const MAX_SECONDS: u32 = 60;
/// Samples per second of a thread's CPU time; not a multiple of common timer rates, so
/// sampling does not beat with periodic work.
pub const SAMPLE_HZ: u64 = 99;
/// Deepest callchain taken (the kernel's default `perf_event_max_stack` is 127).
const MAX_STACK: u16 = 127;
/// Threads sampled at most; the agent runs a few dozen.
const MAX_THREADS: usize = 512;
/// Distinct stacks kept; past that samples count under one `[truncated]` stack. With at
/// most 128 frames of 8 bytes a stack this bounds the table to about 10 MiB.
const MAX_STACKS: usize = 10_000;
/// Ring of each thread: 2^3 data pages (32 KiB), drained every `DRAIN_EVERY`: at 99 Hz a
/// thread writes about 10 samples of at most ~1 KiB between two drains.
const RING_PAGES_LOG2: u32 = 3;
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// One profile at a time (a second request is refused, not queued).
static RUNNING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("seconds must be 1..={MAX_SECONDS}, got {0:?}")]
    Seconds(String),
    #[error("a CPU profile is already running (one at a time); retry when it ends")]
    Busy,
    #[error("perf_event_open refused ({0}): kernel.perf_event_paranoid is {1}; the agent needs CAP_PERFMON (or CAP_SYS_ADMIN), or perf_event_paranoid <= 2 for its own threads")]
    Denied(std::io::Error, String),
    #[error("perf_event_open is not available ({0}): the kernel lacks CONFIG_PERF_EVENTS or software clock events")]
    Unsupported(std::io::Error),
    #[error("perf_event_open: {0}")]
    Perf(std::io::Error),
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
}

impl ProfileError {
    /// The admin endpoint's status line for this refusal.
    pub fn status(&self) -> &'static str {
        match self {
            ProfileError::Seconds(_) => "400 Bad Request",
            ProfileError::Busy => "409 Conflict",
            ProfileError::Denied(..) => "403 Forbidden",
            ProfileError::Unsupported(_) => "501 Not Implemented",
            _ => "500 Internal Server Error",
        }
    }
}

/// `seconds=N` (and `format=folded|json`) of the request's query.
pub fn parse_query(query: &str) -> Result<(u32, bool), ProfileError> {
    let mut seconds = None;
    let mut json = false;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("seconds", v) => {
                seconds = Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|s| (1..=MAX_SECONDS).contains(s))
                        .ok_or_else(|| ProfileError::Seconds(v.into()))?,
                )
            }
            ("format", "json") => json = true,
            ("format", "folded") => json = false,
            (k, v) => return Err(ProfileError::Seconds(format!("unknown parameter {k}={v}"))),
        }
    }
    Ok((seconds.unwrap_or(10), json))
}

/// What a CPU profile found.
#[derive(Debug, Serialize)]
pub struct CpuProfile {
    pub seconds: u32,
    pub sample_hz: u64,
    /// Samples taken (each ~1/99 s of one thread's CPU time).
    pub samples: u64,
    /// Samples the kernel dropped (a ring was full), and those counted under
    /// `[truncated]` because the stack table was full.
    pub lost: u64,
    pub truncated: u64,
    /// Threads sampled (those alive when the profile started).
    pub threads: usize,
    /// Whether kernel frames are in the stacks (`perf_event_paranoid` <= 1 or CAP_PERFMON).
    pub kernel_frames: bool,
    /// Frames per sample, mean, and of those the user-space ones: about 1-3 user frames
    /// means callchains stop at the first function without a frame pointer.
    pub mean_depth: f64,
    pub mean_user_depth: f64,
    /// `thread;outermost;...;innermost count`, most samples first.
    pub folded: Vec<String>,
}

impl CpuProfile {
    pub fn folded_text(&self) -> String {
        let mut s = String::with_capacity(self.folded.iter().map(|l| l.len() + 1).sum());
        for l in &self.folded {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

struct Running;
impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Samples every thread of the agent for `seconds` and returns their folded stacks.
/// Blocks the calling thread for that long (the admin endpoint runs it on the blocking
/// pool). Threads started during the profile are not sampled.
pub fn cpu(seconds: u32) -> Result<CpuProfile, ProfileError> {
    if !(1..=MAX_SECONDS).contains(&seconds) {
        return Err(ProfileError::Seconds(seconds.to_string()));
    }
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Err(ProfileError::Busy);
    }
    let _running = Running;
    let tids = threads()?;
    let period = 1_000_000_000 / SAMPLE_HZ;
    let mut kernel = true;
    let mut samplers = Vec::new();
    let mut names = HashMap::new();
    for tid in tids.into_iter().take(MAX_THREADS) {
        let opened = match ThreadSampler::open(tid, period, MAX_STACK, RING_PAGES_LOG2, kernel) {
            Err(e) if kernel && denied(&e) => {
                // Kernel frames need more privilege than the agent's own user frames.
                kernel = false;
                ThreadSampler::open(tid, period, MAX_STACK, RING_PAGES_LOG2, false)
            }
            r => r,
        };
        match opened {
            Ok(s) => {
                names.insert(tid as u32, thread_name(tid));
                samplers.push(s);
            }
            // The thread ended since it was listed.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) if denied(&e) => {
                let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|_| "unknown".into());
                return Err(ProfileError::Denied(e, paranoid));
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return Err(ProfileError::Unsupported(e))
            }
            Err(e) => return Err(ProfileError::Perf(e)),
        }
    }
    for s in &samplers {
        s.enable().map_err(ProfileError::Perf)?;
    }
    let mut stacks = Stacks::default();
    let end = Instant::now() + Duration::from_secs(seconds.into());
    loop {
        let now = Instant::now();
        let last = now >= end;
        if last {
            for s in &samplers {
                let _ = s.disable();
            }
        }
        for s in &mut samplers {
            stacks.lost += s.drain(&mut |smp| stacks.add(smp));
        }
        if last {
            break;
        }
        std::thread::sleep(DRAIN_EVERY.min(end - now));
    }
    let threads = samplers.len();
    drop(samplers);
    Ok(stacks.fold(seconds, threads, kernel, &names))
}

fn denied(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}

fn threads() -> Result<Vec<i32>, ProfileError> {
    let dir = "/proc/self/task";
    let rd = std::fs::read_dir(dir).map_err(|e| ProfileError::Read(dir.into(), e))?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim().replace([';', ' '], "_"))
        .unwrap_or_else(|_| format!("thread-{tid}"))
}

/// Raw stacks (thread, callchain as the kernel gave it) and their counts.
#[derive(Default)]
struct Stacks {
    counts: HashMap<(u32, Vec<u64>), u64>,
    samples: u64,
    lost: u64,
    truncated: u64,
    frames: u64,
    user_frames: u64,
}

impl Stacks {
    fn add(&mut self, s: perf::Sample) {
        self.samples += 1;
        let mut chain = s.chain;
        if chain.is_empty() {
            chain.push(s.ip);
        }
        let mut kernel = false;
        for &a in &chain {
            if a >= PERF_CONTEXT_MAX {
                kernel = a == PERF_CONTEXT_KERNEL;
                continue;
            }
            self.frames += 1;
            if !kernel {
                self.user_frames += 1;
            }
        }
        let key = (s.tid, chain);
        if let Some(c) = self.counts.get_mut(&key) {
            *c += 1;
        } else if self.counts.len() < MAX_STACKS {
            self.counts.insert(key, 1);
        } else {
            self.truncated += 1;
        }
    }

    fn fold(
        self,
        seconds: u32,
        threads: usize,
        kernel_frames: bool,
        names: &HashMap<u32, String>,
    ) -> CpuProfile {
        let mut sym = Symbolizer::new();
        if !self.counts.is_empty() {
            sym.resolve(
                self.counts
                    .keys()
                    .flat_map(|(_, chain)| user_lookups(chain)),
            );
        }
        let mut folded: HashMap<String, u64> = HashMap::new();
        for ((tid, chain), n) in &self.counts {
            let mut frames = Vec::with_capacity(chain.len() + 1);
            let mut users = user_lookups(chain);
            let mut in_kernel = false;
            for &a in chain {
                if a >= PERF_CONTEXT_MAX {
                    in_kernel = a == PERF_CONTEXT_KERNEL;
                    continue;
                }
                if in_kernel {
                    frames.push(format!("{}_[k]", sym.kernel(a)));
                } else if let Some(u) = users.next() {
                    frames.push(sym.user(u));
                }
            }
            let thread = names
                .get(tid)
                .cloned()
                .unwrap_or_else(|| format!("thread-{tid}"));
            frames.push(thread);
            frames.reverse();
            *folded.entry(frames.join(";")).or_default() += n;
        }
        if self.truncated > 0 {
            folded.insert("[truncated]".into(), self.truncated);
        }
        let mut lines: Vec<(String, u64)> = folded.into_iter().collect();
        lines.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        CpuProfile {
            seconds,
            sample_hz: SAMPLE_HZ,
            samples: self.samples,
            lost: self.lost,
            truncated: self.truncated,
            threads,
            kernel_frames,
            mean_depth: self.frames as f64 / self.samples.max(1) as f64,
            mean_user_depth: self.user_frames as f64 / self.samples.max(1) as f64,
            folded: lines
                .into_iter()
                .map(|(stack, n)| format!("{stack} {n}"))
                .collect(),
        }
    }
}

/// An executable mapping of the process: addresses `start..end` come from file offset
/// `offset` of `paths[path]`.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    path: usize,
}

/// Names for the addresses of one profile: user addresses from the symbol tables of the
/// files mapped (each file opened once, only its tables read, names read only for the
/// addresses hit), kernel addresses from `/proc/kallsyms`.
struct Symbolizer {
    maps: Vec<Mapping>,
    paths: Vec<String>,
    kallsyms: Option<Vec<(u64, String)>>,
    names: HashMap<u64, String>,
}

impl Symbolizer {
    fn new() -> Symbolizer {
        let mut s = Symbolizer {
            maps: Vec::new(),
            paths: Vec::new(),
            kallsyms: None,
            names: HashMap::new(),
        };
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        for line in maps.lines() {
            // start-end perms offset dev inode path
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || !f[1].contains('x') {
                continue;
            }
            let Some((start, end)) = f[0].split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(offset)) = (
                u64::from_str_radix(start, 16),
                u64::from_str_radix(end, 16),
                u64::from_str_radix(f[2], 16),
            ) else {
                continue;
            };
            let path = f[5..].join(" ");
            let i = match s.paths.iter().position(|p| *p == path) {
                Some(i) => i,
                None => {
                    s.paths.push(path);
                    s.paths.len() - 1
                }
            };
            s.maps.push(Mapping {
                start,
                end,
                offset,
                path: i,
            });
        }
        s
    }

    /// Names every address of `addrs`, one mapped file at a time.
    fn resolve(&mut self, addrs: impl IntoIterator<Item = u64>) {
        let mut by_path: HashMap<usize, Vec<(u64, usize)>> = HashMap::new();
        for a in addrs {
            if self.names.contains_key(&a) {
                continue;
            }
            match self.maps.iter().position(|m| m.start <= a && a < m.end) {
                Some(m) => by_path.entry(self.maps[m].path).or_default().push((a, m)),
                None => {
                    self.names.insert(a, "[unknown]".into());
                }
            }
        }
        for (path, addrs) in by_path {
            let named = resolve_in(Path::new(&self.paths[path]), &self.maps, &addrs);
            self.names.extend(named);
        }
    }

    fn user(&self, addr: u64) -> String {
        self.names
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| "[unknown]".into())
    }

    fn kernel(&mut self, addr: u64) -> String {
        let ks = self.kallsyms.get_or_insert_with(kallsyms);
        let i = ks.partition_point(|(s, _)| *s <= addr);
        match i.checked_sub(1) {
            Some(i) => ks[i].1.clone(),
            None => "[kernel]".into(),
        }
    }
}

/// Names `addrs` (each with the index of its mapping) from the ELF file at `path`: its
/// function symbols (`.symtab`, else `.dynsym`); `[file name]` where none covers one.
fn resolve_in(path: &Path, maps: &[Mapping], addrs: &[(u64, usize)]) -> Vec<(u64, String)> {
    let file_name = if path.starts_with("/") {
        path.file_name()
            .map(|n| format!("[{}]", n.to_string_lossy()))
            .unwrap_or_else(|| "[unknown]".into())
    } else {
        // `[vdso]`, `[vsyscall]`: no file to read.
        path.display().to_string()
    };
    let unnamed = || addrs.iter().map(|(a, _)| (*a, file_name.clone())).collect();
    // Only what is parsed is read, through `ReadCache`: the headers, the symbol table and
    // the names asked for. The release agent with its line tables is ~200 MiB, its
    // symbol table under 2 MiB; the debug build's ~6 MiB.
    let Ok(f) = std::fs::File::open(path) else {
        return unnamed();
    };
    let cache = object::ReadCache::new(f);
    let Ok(file) = object::File::parse(&cache) else {
        return unnamed();
    };
    // The kernel maps whole pages: a mapping's offset is its segment's offset rounded
    // down to a page, and the segment's address is congruent to its offset modulo the
    // page (ELF requires it modulo p_align), so both round down alike.
    let page = !0xfffu64;
    let mut segs: Vec<(u64, u64)> = file
        .segments()
        .map(|s| (s.file_range().0 & page, s.address() & page))
        .collect();
    segs.sort_by_key(|s| std::cmp::Reverse(s.0));
    // The file address of a run-time address: through the load segment holding its
    // mapping's file offset.
    let file_addr = |a: u64, m: &Mapping| {
        let base = segs
            .iter()
            .find(|(fo, _)| *fo <= m.offset)
            .map_or(m.offset, |(fo, va)| va + (m.offset - fo));
        a - m.start + base
    };
    let symbols = if file.symbols().next().is_some() {
        file.symbols()
    } else {
        file.dynamic_symbols()
    };
    // (address, size, index), sorted; no names read yet.
    let mut syms: Vec<(u64, u64, object::SymbolIndex)> = symbols
        .filter(|s| s.kind() == object::SymbolKind::Text && s.address() != 0)
        .map(|s| (s.address(), s.size(), s.index()))
        .collect();
    syms.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
    syms.dedup_by_key(|s| s.0);
    let dynamic = file.symbols().next().is_none();
    addrs
        .iter()
        .map(|&(a, m)| {
            let fa = file_addr(a, &maps[m]);
            let i = syms.partition_point(|s| s.0 <= fa);
            let hit = i.checked_sub(1).filter(|&i| {
                let (start, size, _) = syms[i];
                // A symbol without a size ends where the next begins.
                let end = if size > 0 {
                    start + size
                } else {
                    syms.get(i + 1).map_or(start + 1, |n| n.0)
                };
                fa < end
            });
            let name = hit
                .and_then(|i| {
                    let sym = if dynamic {
                        file.dynamic_symbol_table()?.symbol_by_index(syms[i].2)
                    } else {
                        file.symbol_by_index(syms[i].2)
                    };
                    sym.ok()?.name().ok().map(demangle)
                })
                .unwrap_or_else(|| file_name.clone());
            (a, name)
        })
        .collect()
}

/// The addresses to name for a callchain's user frames, in order: every user frame
/// but the sampled IP is a return address, so the call is the instruction before it.
fn user_lookups(chain: &[u64]) -> impl Iterator<Item = u64> + '_ {
    let mut in_kernel = false;
    chain
        .iter()
        .filter(move |&&a| {
            if a >= PERF_CONTEXT_MAX {
                in_kernel = a == PERF_CONTEXT_KERNEL;
                return false;
            }
            !in_kernel
        })
        .enumerate()
        .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
}

/// A Rust symbol without its hash (`tokio::runtime::park::Inner::park`); others as they
/// are. `;` would split a folded frame: replaced.
fn demangle(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name)).replace(';', ":")
}

/// The kernel's text symbols, sorted; empty when `kptr_restrict` hides the addresses.
fn kallsyms() -> Vec<(u64, String)> {
    let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
    let mut v: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let a = u64::from_str_radix(f.next()?, 16).ok()?;
            let t = f.next()?;
            let n = f.next()?;
            (a != 0 && matches!(t, "t" | "T" | "W" | "w")).then(|| (a, n.to_owned()))
        })
        .collect();
    v.sort_by_key(|s| s.0);
    v
}

/// The allocator's view of the heap and the process's memory, in bytes.
#[derive(Debug, Serialize)]
pub struct HeapReport {
    /// Bytes the program holds (allocated and not freed): `mallinfo2().uordblks` plus
    /// chunks with their own mmap (`hblkhd`). Grows with a leak.
    pub in_use_bytes: u64,
    /// Freed but kept by the allocator in its arenas (`fordblks`): grows with
    /// fragmentation; `malloc_trim` hands some back.
    pub free_bytes: u64,
    /// Of the free bytes, at the top of the main heap (`keepcost`): returnable at once.
    pub releasable_bytes: u64,
    /// Of the free bytes, in fastbins (`fsmblks`).
    pub fastbin_free_bytes: u64,
    /// Bytes in arenas, from brk and arena mmaps (`arena`): in use + free.
    pub arena_bytes: u64,
    /// Chunks allocated with an mmap of their own (large allocations) and their bytes.
    pub mmapped_chunks: u64,
    pub mmapped_bytes: u64,
    /// Free chunks (`ordblks`, `smblks`).
    pub free_chunks: u64,
    pub fastbin_chunks: u64,
    /// Arenas (glibc creates up to 8 per CPU as threads contend).
    pub arenas: u64,
    /// `/proc/self/status`: resident set, its anonymous and file-backed parts, peak, and
    /// virtual size.
    pub rss_bytes: u64,
    pub rss_anon_bytes: u64,
    pub rss_file_bytes: u64,
    pub rss_peak_bytes: u64,
    pub virtual_bytes: u64,
    /// Fraction of the arenas that is free (`free / arena`): high with a stable in-use
    /// figure is fragmentation, not a leak.
    pub fragmentation: f64,
}

/// The heap now.
pub fn heap() -> Result<HeapReport, ProfileError> {
    let m = perf::malloc_stats();
    let path = "/proc/self/status";
    let status = std::fs::read_to_string(path).map_err(|e| ProfileError::Read(path.into(), e))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |v| v * 1024)
    };
    Ok(HeapReport {
        in_use_bytes: m.in_use + m.mmapped_bytes,
        free_bytes: m.free,
        releasable_bytes: m.releasable,
        fastbin_free_bytes: m.fastbin_free,
        arena_bytes: m.arena,
        mmapped_chunks: m.mmapped_chunks,
        mmapped_bytes: m.mmapped_bytes,
        free_chunks: m.free_chunks,
        fastbin_chunks: m.fastbin_chunks,
        arenas: m.arenas,
        rss_bytes: kb("VmRSS"),
        rss_anon_bytes: kb("RssAnon"),
        rss_file_bytes: kb("RssFile"),
        rss_peak_bytes: kb("VmHWM"),
        virtual_bytes: kb("VmSize"),
        fragmentation: if m.arena == 0 {
            0.0
        } else {
            m.free as f64 / m.arena as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_bounded() {
        assert_eq!(parse_query("seconds=2").unwrap(), (2, false));
        assert_eq!(parse_query("").unwrap(), (10, false));
        assert_eq!(parse_query("seconds=5&format=json").unwrap(), (5, true));
        for bad in ["seconds=0", "seconds=61", "seconds=x", "hz=1000"] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }

    /// A real profile of this test process: a busy thread's function shows up in the
    /// folded stacks, at SAMPLE_HZ samples per second of its CPU time, and a second
    /// profile meanwhile is refused. The profile samples CPU time, and on a loaded machine
    /// the busy thread gets only part of a CPU in the profile's wall-clock seconds: so its
    /// CPU time is measured (the kernel's schedstat), not assumed to be the wall time.
    #[test]
    fn a_busy_thread_is_sampled_and_a_second_profile_is_refused() {
        /// This thread's time on a CPU, from the kernel's scheduler (nanoseconds).
        fn cpu_ns() -> u64 {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .expect("/proc/thread-self/schedstat")
        }
        /// Spins while a profile runs (`RUNNING`); its CPU time and the wall time between
        /// the moments it saw the profile start and end.
        #[inline(never)]
        fn spin_for_the_profiler(started: std::sync::mpsc::Sender<()>) -> (Duration, Duration) {
            let _ = started.send(());
            let deadline = Instant::now() + Duration::from_secs(30);
            while !RUNNING.load(Ordering::Acquire) {
                assert!(
                    Instant::now() < deadline,
                    "the spinner never saw the profile"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let (cpu0, t0) = (cpu_ns(), Instant::now());
            let mut x = 0u64;
            while RUNNING.load(Ordering::Acquire) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            std::hint::black_box(x);
            (Duration::from_nanos(cpu_ns() - cpu0), t0.elapsed())
        }
        let (started, running) = std::sync::mpsc::channel();
        let busy = std::thread::Builder::new()
            .name("spinner".into())
            .spawn(move || spin_for_the_profiler(started))
            .unwrap();
        // The profile names threads when it starts, and a new thread bears its parent's
        // name until it runs: under load it may not have yet. Once it runs, it is named.
        running.recv().expect("the spinner started");
        let first = std::thread::spawn(|| cpu(2));
        // Wait for the first profile to hold the lock (under load its thread may start
        // late), then ask for a second one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !RUNNING.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the first profile never started");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(matches!(cpu(1), Err(ProfileError::Busy)));
        let p = first.join().unwrap().expect("profile (run as root)");
        let (spun, wall) = busy.join().unwrap();
        let spin: u64 = p
            .folded
            .iter()
            .filter(|l| l.starts_with("spinner;"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        let period = Duration::from_nanos(1_000_000_000 / SAMPLE_HZ);
        // What the spinner's share of a CPU over the profile's 2 s gives at 99 Hz of CPU
        // (about 200 samples on an idle machine).
        let share = spun.as_secs_f64() / wall.as_secs_f64();
        let expected = share * 2.0 * SAMPLE_HZ as f64;
        eprintln!(
            "spinner: {spin} samples, {spun:?} of CPU in {wall:?} (share {share:.2}), \
             expected about {expected:.0}; {} samples in all",
            p.samples
        );
        // Never more samples than CPU time spent (the sampled window lies inside the
        // measured one), and not far fewer than its share of the window gives.
        assert!(
            period * spin as u32 <= spun + period * 2,
            "spinner samples {spin} for {spun:?} of CPU: {:#?}",
            p.folded
        );
        assert!(
            spin as f64 >= expected / 2.0,
            "spinner samples {spin}, expected about {expected:.0}: {:#?}",
            p.folded
        );
        assert!(p.samples >= spin, "{p:?}");
        assert!(
            p.folded
                .iter()
                .any(|l| l.starts_with("spinner;") && l.contains("spin_for_the_profiler")),
            "{:#?}",
            p.folded
        );
        // The lock is released: the next profile runs.
        assert!(cpu(1).is_ok());
    }

    #[test]
    fn the_heap_report_sees_an_allocation() {
        let before = heap().unwrap();
        let v: Vec<u8> = vec![1; 64 << 20];
        let during = heap().unwrap();
        assert!(
            during.in_use_bytes >= before.in_use_bytes + (60 << 20),
            "{before:?} {during:?}"
        );
        assert!(during.arenas >= 1 && during.rss_bytes > 0, "{during:?}");
        drop(std::hint::black_box(v));
    }
}

//! Small process utilities: peak RSS, timing, and [`Workers`] for data-parallel passes.

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Drop the resident pages of `len` bytes at `start` of a read-only file mapping from this
/// process (widened to whole pages; they are re-read from the page cache or the file when
/// touched again). No-op off Unix.
pub fn drop_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    if len > 0 {
        // SAFETY: `memmap2::Mmap` is a read-only shared file mapping: dropping its pages loses
        // nothing.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}

/// Current resident set size of this process in bytes (Linux `VmRSS`), if known.
pub fn rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// Print current and peak RSS to stderr when `LOPPER_TRACE_RSS` is set (memory debugging).
pub fn trace_rss(stage: &str) {
    if std::env::var_os("LOPPER_TRACE_RSS").is_some() {
        eprintln!(
            "[rss] {stage}: now {:.0} MB, peak {:.0} MB",
            rss_bytes().unwrap_or(0) as f64 / 1e6,
            peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }
}

/// Make glibc return large freed buffers to the OS right away.
///
/// glibc raises its mmap threshold dynamically after large frees, so later large buffers come
/// from the heap and fragment it: the layer-by-layer driver then grows its RSS by ~20 MB per
/// block. A fixed 1 MiB threshold keeps large allocations in their own mappings. No-op elsewhere.
pub fn limit_heap_fragmentation() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before threads allocate heavily.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Single-thread rayon pools, one per thread of the current pool (`--threads`), for data
/// parallelism: each job runs whole on one worker, and the kernels inside it see a one-thread
/// pool and run sequentially. Cheaper than splitting every kernel across threads when there
/// are independent jobs (calibration chunks, evaluation windows), and the kernels give the same
/// bits either way.
pub struct Workers {
    pools: Vec<rayon::ThreadPool>,
}

impl Workers {
    /// `None` with a single thread, or when a worker thread cannot be started.
    pub fn new() -> Option<Workers> {
        let n = rayon::current_num_threads();
        if n < 2 {
            return None;
        }
        let pools = (0..n)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("lopper-worker-{i}"))
                    .build()
                    .ok()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Workers { pools })
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// Run the jobs concurrently, job `i` on worker `i` (at most [`Workers::len`] jobs);
    /// results in job order. A job's panic is re-raised here.
    pub fn run<'a, T: Send>(&self, jobs: Vec<Box<dyn FnOnce() -> T + Send + 'a>>) -> Vec<T> {
        assert!(jobs.len() <= self.pools.len(), "more jobs than workers");
        std::thread::scope(|sc| {
            let handles: Vec<_> = jobs
                .into_iter()
                .zip(&self.pools)
                .map(|(job, pool)| sc.spawn(move || pool.install(job)))
                .collect();
            handles
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }
}

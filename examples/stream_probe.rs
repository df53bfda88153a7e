use std::time::Instant;
fn main() {
    for huge in [false, true] {
        for mib in [16usize, 256, 1024] {
            let n = (mib << 20) / 4;
            let layout = std::alloc::Layout::from_size_align(n * 4, 2 << 20).unwrap();
            let p = unsafe { std::alloc::alloc(layout) } as *mut f32;
            if huge {
                unsafe { libc::madvise(p as *mut _, n * 4, libc::MADV_HUGEPAGE) };
            }
            let buf = unsafe { std::slice::from_raw_parts_mut(p, n) };
            buf.fill(1.0);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                let s = lopper::kernels::probe::sum_f32(buf);
                best = best.min(t.elapsed().as_secs_f64());
                assert_eq!(s as usize, n);
            }
            println!(
                "huge {huge} {mib:5} MiB: 1 thread {:6.1} GB/s",
                (n * 4) as f64 / best / 1e9
            );
            unsafe { std::alloc::dealloc(p as *mut u8, layout) };
        }
    }
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    println!(
        "{}",
        s.lines()
            .filter(|l| l.contains("Huge"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

//! Activation sparsity on a 50%-sparse (Wanda-like, unstructured) weight: the column-major
//! bitmask kernel (`ColBitmaskOf`) against dense f32 row-major (the baseline), the
//! row-major bitmask format (weight zeros only) and dense column-major (activation zeros only),
//! mat-vec time on SmolLM2-135M's MLP shape, 40 matrices in rotation (beyond the last-level
//! cache, as a decode step streams its weights). Prints the CPU; compare within one run.
//! `cargo run --release --example act_weight_sparse_bench`
use lopper::formats::{BitmaskOf, ColBitmaskOf, ColMajorOf, DenseOf, WeightFormat};
use std::time::Instant;

thread_local! {
    static START: Instant = Instant::now();
}

fn main() {
    let (rows, cols, n) = (1536, 576, 40);
    println!(
        "cpu {}, threads {}",
        lopper::isa::cpu_name(),
        rayon::current_num_threads()
    );
    let mut s = 1u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    // 50% unstructured: the smaller half of each row's magnitudes zeroed (Wanda's per-row
    // comparison group, on random weights).
    let w: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            let mut m: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
            for row in m.chunks_mut(cols) {
                let mut a: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                a.sort_by(|x, y| x.total_cmp(y));
                let t = a[cols / 2];
                row.iter_mut()
                    .filter(|v| v.abs() < t)
                    .for_each(|v| *v = 0.0);
            }
            m
        })
        .collect();
    let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
    // With one thread the clock is the process CPU time, which a busy machine disturbs less
    // than wall time (the shared caches and memory bus still feel other jobs).
    let cpu_clock = rayon::current_num_threads() == 1;
    println!(
        "clock: {}",
        if cpu_clock {
            "process CPU time"
        } else {
            "wall"
        }
    );
    let now = move || -> f64 {
        if cpu_clock {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
            t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
        } else {
            START.with(|s| s.elapsed().as_secs_f64())
        }
    };
    let time = |f: &dyn Fn(&mut [f32])| {
        let mut y = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..7 {
            let t = now();
            for _ in 0..10 {
                f(&mut y);
            }
            best = best.min((now() - t) / (10 * n) as f64);
        }
        best
    };
    fn all<F: WeightFormat>(v: &[F], x: &[f32], y: &mut [f32]) {
        for f in v {
            f.matvec(x, y)
        }
    }
    let build = |f: &dyn Fn(&[f32]) -> Box<dyn WeightFormat>| -> Vec<Box<dyn WeightFormat>> {
        w.iter().map(|m| f(m)).collect()
    };
    let dense = build(&|m| Box::new(DenseOf::<f32>::from_dense(m, rows, cols).unwrap()));
    let bm = build(&|m| Box::new(BitmaskOf::<half::bf16>::from_dense(m, rows, cols).unwrap()));
    let cm = build(&|m| Box::new(ColMajorOf::<half::bf16>::from_dense(m, rows, cols).unwrap()));
    let cb = build(&|m| Box::new(ColBitmaskOf::<half::bf16>::from_dense(m, rows, cols).unwrap()));
    let cb32 = build(&|m| Box::new(ColBitmaskOf::<f32>::from_dense(m, rows, cols).unwrap()));
    let boxed = |v: &[Box<dyn WeightFormat>], x: &[f32], y: &mut [f32]| {
        for f in v {
            f.matvec(x, y)
        }
    };
    let _ = all::<DenseOf<f32>>;
    let td = time(&|y| boxed(&dense, &x, y));
    let gb = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
    println!(
        "dense f32 row-major          {:7.1} us  1.00x  {:5.1} GB/s",
        td * 1e6,
        gb(dense[0].nbytes(), td)
    );
    let tb = time(&|y| boxed(&bm, &x, y));
    println!(
        "bitmask-bf16 row-major       {:7.1} us  {:.2}x  {:5.1} GB/s",
        tb * 1e6,
        td / tb,
        gb(bm[0].nbytes(), tb)
    );
    for sp in [0.0, 0.25, 0.4, 0.5] {
        let xs: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                if ((j * 2654435761) % 1000) < (sp * 1000.0) as usize {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let active = xs.iter().filter(|v| **v != 0.0).count() as f64 / cols as f64;
        let tc = time(&|y| boxed(&cm, &xs, y));
        let tcb = time(&|y| boxed(&cb, &xs, y));
        let tcb32 = time(&|y| boxed(&cb32, &xs, y));
        println!(
            "act {sp:.2}: colmajor-bf16 {:6.1} us {:.2}x | colbitmask-bf16 {:6.1} us {:.2}x {:5.1} GB/s | colbitmask-f32 {:6.1} us {:.2}x",
            tc * 1e6,
            td / tc,
            tcb * 1e6,
            td / tcb,
            gb((cb[0].nbytes() as f64 * active) as usize, tcb),
            tcb32 * 1e6,
            td / tcb32,
        );
    }
}

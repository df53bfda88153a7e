//! Column-skipping decode kernel against the row-major dense kernel of the same value type:
//! mat-vec time on SmolLM2-135M-sized matrices at several input sparsities, many matrices in a
//! rotation (larger than the last-level cache, as a decode step streams its weights).
//! `cargo run --release --example act_kernels`
use lopper::formats::{ColMajorOf, DenseOf, Elem, WeightFormat};
use std::time::Instant;

fn run<E: Elem>(name: &str) {
    let (rows, cols) = (1536, 576);
    let n = 40; // 40 matrices: 35 MB f32, beyond the LLC
    let mut s = 1u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<Vec<f32>> = (0..n)
        .map(|_| (0..rows * cols).map(|_| rnd()).collect())
        .collect();
    let dense: Vec<DenseOf<E>> = w
        .iter()
        .map(|w| DenseOf::<E>::from_dense(w, rows, cols).unwrap())
        .collect();
    let colm: Vec<ColMajorOf<E>> = w
        .iter()
        .map(|w| ColMajorOf::<E>::from_dense(w, rows, cols).unwrap())
        .collect();
    let x: Vec<f32> = (0..cols).map(|_| rnd()).collect();
    let mut y = vec![0f32; rows];
    let time = |f: &dyn Fn(&mut [f32])| {
        let mut y = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..10 {
                f(&mut y);
            }
            best = best.min(t.elapsed().as_secs_f64() / (10 * n) as f64);
        }
        best
    };
    let td = time(&|y| {
        for d in &dense {
            d.matvec(&x, y)
        }
    });
    let bytes = dense[0].nbytes() as f64;
    println!(
        "{name} dense row-major: {:.1} us ({:.1} GB/s)",
        td * 1e6,
        bytes / td / 1e9
    );
    for sp in [0.0, 0.25, 0.4, 0.5, 0.75, 0.9] {
        let mut xs = x.clone();
        let k = (sp * cols as f64) as usize;
        // zero every entry whose hash puts it in the lowest fraction
        for (j, v) in xs.iter_mut().enumerate() {
            if ((j * 2654435761) % 1000) < (sp * 1000.0) as usize {
                *v = 0.0;
            }
        }
        let _ = k;
        let tc = time(&|y| {
            for c in &colm {
                c.matvec(&xs, y)
            }
        });
        println!(
            "{name} colmajor s={sp:.2}: {:.1} us, {:.2}x dense, {:.1} GB/s effective",
            tc * 1e6,
            td / tc,
            bytes * (1.0 - sp) / tc / 1e9
        );
    }
    y[0] += 1.0;
}

fn main() {
    println!("threads {}", rayon::current_num_threads());
    run::<f32>("f32 ");
    run::<half::bf16>("bf16");
    run::<i8>("i8  ");
}

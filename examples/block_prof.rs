//! Times one transformer block of the default model at calibration and eval shapes, then
//! compares the two ways of using the threads on a calibration pass (16 chunks of 8×512
//! tokens): every kernel split across the threads, one chunk after another, against whole
//! chunks side by side on single-thread workers (`lopper::util::Workers`, what
//! `prune::runner::BlockRunner` does). Also checks that both give the same bits.
//! `cargo run --release --example block_prof`
use lopper::model::{forward, observer::NoObserver, rope::Rope};
use std::time::Instant;

fn main() {
    let p = lopper::assets::default_model().unwrap();
    let m = lopper::io::load_model(&p).unwrap();
    let d = m.config.hidden_size;
    let lw = &m.weights.layers[0];
    let input = |rows: usize| -> Vec<f32> {
        (0..rows * d)
            .map(|i| ((i % 113) as f32 - 56.0) * 0.01)
            .collect()
    };
    for (b, l) in [(16usize, 512usize), (4, 512), (1, 2048), (4, 2048)] {
        let rope = Rope::new(&m.config, l);
        let mut h = input(b * l);
        let mut s = forward::Scratch::default();
        forward::block_forward(
            &m.config,
            0,
            lw,
            &rope,
            &mut h,
            b,
            l,
            &mut s,
            &mut NoObserver,
        );
        let t = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            forward::block_forward(
                &m.config,
                0,
                lw,
                &rope,
                &mut h,
                b,
                l,
                &mut s,
                &mut NoObserver,
            );
        }
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        let toks = (b * l) as f64;
        let fl = 2.0 * 3538944.0 * toks + 4.0 * 576.0 * (b * l * (l + 1) / 2) as f64;
        println!(
            "block {b}x{l}: {:.1} ms, {:.0} tok/s/layer, {:.1} GFLOP/s",
            dt * 1e3,
            toks / dt,
            fl / dt / 1e9
        );
    }

    let Some(workers) = lopper::util::Workers::new() else {
        println!("one thread: no data-parallel comparison");
        return;
    };
    let (b, l, chunks) = (8usize, 512usize, 16usize);
    let rope = Rope::new(&m.config, l);
    let (mut split, mut side) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let mut hs: Vec<Vec<f32>> = (0..chunks).map(|_| input(b * l)).collect();
        let mut s = forward::Scratch::default();
        let t = Instant::now();
        for h in hs.iter_mut() {
            forward::block_forward(&m.config, 0, lw, &rope, h, b, l, &mut s, &mut NoObserver);
        }
        split.push(t.elapsed().as_secs_f64() * 1e3 / chunks as f64);

        let mut hp: Vec<Vec<f32>> = (0..chunks).map(|_| input(b * l)).collect();
        let mut scratch: Vec<forward::Scratch> =
            (0..workers.len()).map(|_| Default::default()).collect();
        let t = Instant::now();
        for group in hp.chunks_mut(workers.len()) {
            let jobs = group
                .iter_mut()
                .zip(scratch.iter_mut())
                .map(|(h, s)| {
                    let (cfg, rope) = (&m.config, &rope);
                    let job = move || {
                        forward::block_forward(cfg, 0, lw, rope, h, b, l, s, &mut NoObserver)
                    };
                    Box::new(job) as Box<dyn FnOnce() + Send + '_>
                })
                .collect();
            workers.run(jobs);
        }
        side.push(t.elapsed().as_secs_f64() * 1e3 / chunks as f64);
        let same = hs
            .iter()
            .flatten()
            .zip(hp.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        println!(
            "round {round}: kernels split {:.1} ms/chunk, chunks side by side {:.1} ms/chunk, identical: {same}",
            split[round], side[round]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median: kernels split {:.1} ms/chunk, chunks side by side {:.1} ms/chunk ({:.2}x)",
        median(&mut split),
        median(&mut side),
        median(&mut split) / median(&mut side)
    );
}

//! Times one transformer block of the default model at calibration and eval shapes.
//! `cargo run --release --example block_prof`
use lopper::model::{forward, observer::NoObserver, rope::Rope};
use std::time::Instant;
fn main() {
    let p = lopper::assets::default_model().unwrap();
    let m = lopper::io::load_model(&p).unwrap();
    let d = m.config.hidden_size;
    for (b, l) in [(16usize, 512usize), (4, 512), (1, 2048), (4, 2048)] {
        let rope = Rope::new(&m.config, l);
        let mut h = vec![0.01f32; b * l * d];
        for (i, v) in h.iter_mut().enumerate() {
            *v = ((i % 113) as f32 - 56.0) * 0.01;
        }
        let mut s = forward::Scratch::default();
        forward::block_forward(
            &m.config,
            0,
            &m.weights.layers[0],
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
                &m.weights.layers[0],
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
}

//! Cost of a verify step against a plain decode step on the default model: a 1-row cached
//! step, then 2/3/4-row steps with all logits and with the head screen per row, interleaved,
//! best of several. `cargo run --release --example verify_cost`.
use lopper::runtime::{forward_step, forward_step_all, KvCache};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut model = lopper::io::load_model(&lopper::assets::default_model()?)?;
    lopper::runtime::pack::attach_head_screen(&mut model)?;
    let prompt: Vec<u32> = (0..64u32).map(|i| 100 + i * 7).collect();
    let mut cache = KvCache::new(&model, 128);
    forward_step(&model, &prompt, &mut cache)?;
    let base = cache.len;
    let mut best = [f64::MAX; 5];
    for _ in 0..8 {
        #[allow(clippy::needless_range_loop)] // `rows` is also the batch size
        for rows in 1..=4usize {
            cache.truncate(base);
            let ids: Vec<u32> = (0..rows as u32).map(|i| 500 + i).collect();
            let t = Instant::now();
            if rows == 1 {
                lopper::runtime::kv::forward_step_top_k(&model, &ids, &mut cache, 1)?;
            } else {
                forward_step_all(&model, &ids, &mut cache)?;
            }
            let b = &mut best[rows];
            *b = b.min(t.elapsed().as_secs_f64());
        }
        cache.truncate(base);
        let t = Instant::now();
        forward_step(&model, &[500], &mut cache)?;
        best[0] = best[0].min(t.elapsed().as_secs_f64());
    }
    // The LM head alone for 4 rows: the screen per row (what a greedy verify step does) or the
    // full f32 product of the 4 rows at once.
    let d = model.config.hidden_size;
    let h: Vec<f32> = (0..4 * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w = &model.weights;
    let screen = w.lm_head_screen.as_ref().expect("screen");
    let (mut t_screen, mut t_full) = (f64::MAX, f64::MAX);
    let mut y = vec![0f32; w.lm_head().rows()];
    for _ in 0..8 {
        let t = Instant::now();
        for r in h.chunks(d) {
            screen.top_k(lopper::runtime::pack::exact_head(w), r, 1, &mut y);
        }
        t_screen = t_screen.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _ = lopper::model::forward::logits(w, &h, 4);
        t_full = t_full.min(t.elapsed().as_secs_f64());
    }
    println!(
        "head, 4 rows: screen per row {:.1} ms, full f32 product {:.1} ms",
        t_screen * 1e3,
        t_full * 1e3
    );
    println!("1 row, full head: {:.1} ms", best[0] * 1e3);
    for (r, b) in best.iter().enumerate().skip(1) {
        println!(
            "{r} rows{}: {:.1} ms ({:.2}x the screened 1-row step)",
            if r == 1 { " (screened)" } else { ", full head" },
            b * 1e3,
            b / best[1]
        );
    }
    Ok(())
}

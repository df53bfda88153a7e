//! Parameters removed vs wiki perplexity for low-rank factorisation (plain and SVD-LLM whitened)
//! and SliceGPT on the default model.
//!
//! `cargo run --release --example lowrank_slice_figures -- [SAMPLES LEN WINDOWS WINLEN] [STEP...]`
//! where STEP is `dense`, `svd:F[:mlp]`, `svdllm:F[:mlp]` (F = parameter fraction removed from
//! each factorised linear) or `slice:F` (hidden-dimension fraction). Calibration: SAMPLES×LEN
//! c4 tokens (seed 0); eval: the first WINDOWS windows of WINLEN wiki tokens.
use lopper::structured::lowrank::{self, LowRankSpec, RankRule};
use lopper::structured::slicegpt::{self, SliceSpec};
use lopper::LinearKind;
use std::time::Instant;

fn main() -> lopper::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (samples, len, windows, winlen) = (num(0, 16), num(1, 128), num(2, 4), num(3, 512));
    let steps: Vec<String> = args.iter().skip(4).cloned().collect();
    let path = lopper::assets::default_model()?;
    let base = lopper::io::load_model(&path)?;
    let tok = base.tokenizer()?.clone();
    let c4 = lopper::assets::c4_text()?;
    let calib = lopper::calibrate::from_text(&tok, &c4, samples, len, 0)?;
    let wiki = lopper::assets::wiki_text()?;
    let ids = lopper::tokenizer::encode(&tok, &lopper::text::load_eval_text(&wiki)?, &wiki)?;
    let p0 = base.weights.num_params();
    println!("calibration {}; eval wiki {windows}x{winlen}", calib.source);
    println!(
        "{:<16} {:>12} {:>9} {:>11} {:>7}",
        "step", "params", "removed", "perplexity", "secs"
    );
    for step in &steps {
        let mut m = lopper::io::load_model(&path)?;
        let t = Instant::now();
        let parts: Vec<&str> = step.split(':').collect();
        let frac = |i: usize| {
            parts
                .get(i)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let modules = match parts.get(2) {
            Some(&"mlp") => vec![LinearKind::Gate, LinearKind::Up, LinearKind::Down],
            Some(&"attn") => vec![LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O],
            _ => vec![],
        };
        let mut quiet = |_: &str, _: usize, _: usize| {};
        match parts[0] {
            "dense" => {}
            "svd" | "svdllm" => {
                let mut spec = LowRankSpec::new(
                    RankRule::ParamFraction(frac(1)),
                    parts[0] == "svdllm",
                    modules,
                );
                if let Some(d) = parts.get(3).and_then(|s| s.parse().ok()) {
                    spec.damping = d;
                }
                lowrank::factorize(&mut m, &calib, &spec, &mut quiet)?;
            }
            "slice" => {
                slicegpt::slice(&mut m, &calib, &SliceSpec::new(frac(1)), &mut quiet)?;
            }
            other => panic!("unknown step {other}"),
        }
        let secs = t.elapsed().as_secs_f64();
        let p = m.weights.num_params();
        let r = lopper::eval::perplexity(&m, &ids, winlen, windows, &wiki, &mut |_, _| {})?;
        println!(
            "{:<16} {:>12} {:>8.2}% {:>11.3} {:>7.1}",
            step,
            p,
            100.0 * (1.0 - p as f64 / p0 as f64),
            r.perplexity,
            secs
        );
    }
    Ok(())
}

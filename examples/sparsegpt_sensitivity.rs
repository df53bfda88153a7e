//! How much of SparseGPT's perplexity is decided by float rounding?
//!
//! lopper's Hessians agree with the official code's to about 3e-7 (relative Frobenius, block 0,
//! `tests/prune_golden.rs`), yet a few near-tie mask decisions flip and the whole-model
//! perplexity differs by about 1%. This experiment measures the spread directly: it prunes the
//! default model with SparseGPT (golden calibration ids, 128×512) several times, each time
//! multiplying every Hessian entry by `1 + ε·u` with `u` uniform in [-1, 1] (symmetric, seeded),
//! at ε = 3e-7 (the measured disagreement level), and evaluates wiki-16x2048 each time.
//! Run 0 is unperturbed.
//!
//! With `f32` as the fourth argument the inverse-Hessian factorisation runs in f32, the official
//! code's arithmetic, so the spread shows how far the official result itself could move.
//! Measured runs: `results/sparsegpt_sensitivity.jsonl` (README, "Results on the default model").
//!
//! `cargo run --release --example sparsegpt_sensitivity -- [runs] [pattern] [eps] [f32|f64]`
//! (defaults: 6, `unstructured`, 3e-7, f64); one JSON line per run on stdout.

use lopper::prune::sparsegpt::{Precision, SparseGpt};
use lopper::prune::{driver, Needs, Pattern, PrunePlan, Pruner};
use lopper::prune::{Method, SiteStats, Target};

/// SparseGPT on Hessians perturbed by a seeded relative noise of size `eps`.
struct Perturbed {
    inner: SparseGpt,
    seed: u64,
    eps: f64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pruner for Perturbed {
    fn needs(&self) -> Needs {
        self.inner.needs()
    }
    fn prune(
        &self,
        w: &mut [f32],
        rows: usize,
        cols: usize,
        stats: &SiteStats,
        target: Target,
        name: &str,
    ) -> lopper::Result<()> {
        if self.seed == 0 {
            return self.inner.prune(w, rows, cols, stats, target, name);
        }
        let xtx = stats.xtx.as_ref().expect("SparseGPT collects XᵀX");
        // Seeded by the Hessian's content, so linears sharing an input (q/k/v, gate/up) see the
        // same perturbed Hessian, as they share the real one.
        let mut state = self.seed ^ xtx[0].to_bits() ^ xtx[xtx.len() - 1].to_bits().rotate_left(17);
        let c = stats.cols;
        let mut p = xtx.clone();
        for i in 0..c {
            for j in i..c {
                let u = (splitmix(&mut state) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                p[i * c + j] *= 1.0 + self.eps * u;
            }
        }
        let perturbed = SiteStats::from_sums(
            c,
            stats.samples,
            stats.tokens,
            stats.col_sq.clone(),
            Some(p),
        );
        self.inner.prune(w, rows, cols, &perturbed, target, name)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: u64 = args.first().map_or(Ok(6), |s| s.parse())?;
    let pattern: Pattern = args.get(1).map_or("unstructured", |s| s.as_str()).parse()?;
    let eps: f64 = args.get(2).map_or(Ok(3e-7), |s| s.parse())?;
    let precision = match args.get(3).map(String::as_str) {
        None | Some("f64") => Precision::F64,
        Some("f32") => Precision::F32,
        Some(p) => anyhow::bail!("precision must be f32 or f64, got {p}"),
    };
    let golden = lopper::assets::golden_dir()
        .ok_or_else(|| anyhow::anyhow!("needs ../shared/golden (calibration ids)"))?;
    let base = lopper::io::load_model(&lopper::assets::default_model()?)?;
    let calib = lopper::calibrate::from_ids_file(
        &golden.join("calib_c4_128x512.safetensors"),
        base.config.vocab_size,
    )?;
    let wiki = lopper::assets::wiki_text()?;
    let text = lopper::text::load_eval_text(&wiki)?;
    let tok = base.tokenizer()?;
    let ids = lopper::tokenizer::encode(tok, &text, &wiki)?;
    let plan = PrunePlan::new(
        Method::Sparsegpt,
        pattern,
        pattern.implied_sparsity().unwrap_or(0.5),
    );
    for seed in 0..runs {
        let mut model = base.clone();
        let pruner = Perturbed {
            inner: SparseGpt {
                precision,
                ..SparseGpt::default()
            },
            seed,
            eps,
        };
        let out = driver::prune_model_with(&mut model, &calib, &plan, &pruner, &mut |_, _, _| {})?;
        let ppl = lopper::eval::perplexity(&model, &ids, 2048, 16, &wiki, &mut |_, _| {})?;
        println!(
            "{}",
            serde_json::json!({
                "pattern": pattern.to_string(),
                "precision": format!("{precision:?}"),
                "eps": if seed == 0 { 0.0 } else { eps },
                "seed": seed,
                "perplexity": ppl.perplexity,
                "sparsity": out.sparsity_measured,
                "prune_seconds": out.seconds_total,
            })
        );
    }
    Ok(())
}

//! Early-exit quality on the default model: perplexity and mean blocks per token for several
//! thresholds and check-block sets, on the first `W` wiki windows of `L` tokens (args: W L).
//! `cargo run --release --example early_exit_curve -- 2 1024` (docs/dynamic_depth.md).
use lopper::runtime::early_exit::{perplexity, ExitOpts};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (w, l) = (
        args.first().copied().unwrap_or(1),
        args.get(1).copied().unwrap_or(512),
    );
    let model = lopper::io::load_model(&lopper::assets::default_model()?)?;
    let text = lopper::assets::wiki_text()?;
    let ids = lopper::tokenizer::encode(
        model.tokenizer()?,
        &lopper::text::load_eval_text(&text)?,
        &text,
    )?;
    let n = model.weights.layers.len();
    for checks in [
        vec![n / 2, 2 * n / 3, 5 * n / 6],
        vec![n - 6, n - 4, n - 2],
        vec![n - 3, n - 2, n - 1],
    ] {
        for t in [1.0f32, 0.99, 0.95, 0.9, 0.8] {
            let mut eo = ExitOpts::new(&model, t)?;
            eo.checks = checks.clone();
            let (r, layers) = perplexity(&model, &eo, &ids, l, w, &text, &mut |_, _| {})?;
            println!(
                "checks {checks:?} T {t}: perplexity {:.3}, {layers:.2} of {n} blocks/token",
                r.perplexity
            );
        }
    }
    Ok(())
}

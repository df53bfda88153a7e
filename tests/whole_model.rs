//! Whole-model checks on the default model with the real protocols (slow: about 20 minutes on
//! 2 cores, so in the full tier only: `cargo test --release -- --include-ignored`). Dense wiki-16x2048 perplexity within 0.1% of transformers' value, and every
//! pruning configuration of the golden README within 1% of the official code's perplexity
//! (1.5% for SparseGPT, whose result depends on float rounding: see the test body).

mod common;
use common::*;
use lopper::prune::{self, Method, Pattern, PrunePlan};

/// (method, pattern, reference perplexity) from ../shared/golden/README.md.
const REFERENCE: &[(Method, &str, f64)] = &[
    (Method::Magnitude, "unstructured", 363.17),
    (Method::Wanda, "unstructured", 43.228),
    (Method::Sparsegpt, "unstructured", 42.049),
    (Method::Wanda, "2:4", 151.85),
    (Method::Sparsegpt, "2:4", 81.28),
];
const DENSE_REFERENCE: f64 = 19.398;

fn wiki_ids(model: &lopper::Model) -> (Vec<u32>, std::path::PathBuf) {
    let path = lopper::assets::wiki_text().unwrap();
    let text = lopper::text::load_eval_text(&path).unwrap();
    (
        lopper::tokenizer::encode(model.tokenizer().unwrap(), &text, &path).unwrap(),
        path,
    )
}

#[test]
#[ignore = "real model"]
fn dense_and_pruned_perplexities_match_references() {
    let base = default_model();
    let (ids, path) = wiki_ids(base);
    let dense = lopper::eval::perplexity(base, &ids, 2048, 16, &path, &mut |_, _| {}).unwrap();
    eprintln!(
        "dense: perplexity {:.4} (reference {DENSE_REFERENCE}), {:.0} tokens/s",
        dense.perplexity, dense.tokens_per_second
    );
    assert_eq!(dense.predictions, 16 * 2047);
    assert!(
        (dense.perplexity / DENSE_REFERENCE - 1.0).abs() < 0.001,
        "dense perplexity {} is not within 0.1% of {DENSE_REFERENCE}",
        dense.perplexity
    );

    let calib = lopper::calibrate::from_ids_file(
        &golden().join("calib_c4_128x512.safetensors"),
        base.config.vocab_size,
    )
    .unwrap();
    let mut failures = Vec::new();
    for &(method, pattern, reference) in REFERENCE {
        let pattern: Pattern = pattern.parse().unwrap();
        let plan = PrunePlan::new(method, pattern, pattern.implied_sparsity().unwrap_or(0.5));
        let mut model = lopper::Model {
            config: base.config.clone(),
            weights: base.weights.clone(),
            tokenizer: None,
            chat_template: None,
            source: base.source.clone(),
        };
        let out = prune::prune_model(&mut model, &calib, &plan, &mut |_, _, _| {}).unwrap();
        let r = lopper::eval::perplexity(&model, &ids, 2048, 16, &path, &mut |_, _| {}).unwrap();
        let rel = r.perplexity / reference - 1.0;
        eprintln!(
            "{method:?} {pattern}: perplexity {:.3} (reference {reference}, {:+.2}%), sparsity {:.5}, prune {:.1} s",
            r.perplexity,
            100.0 * rel,
            out.sparsity_measured,
            out.seconds_total
        );
        assert!(
            (out.sparsity_measured - 0.5).abs() < 2e-4,
            "{method:?} {pattern}: sparsity {}",
            out.sparsity_measured
        );
        // SparseGPT's result depends on float rounding in its Hessian factorisation: the
        // official float32 run and lopper's f64 (or f32 via faer) land up to ~1.7% apart in
        // perplexity (measured: f64 +1.15% / +0.47%, f32 +0.45% / +1.70% for 50% / 2:4), so its
        // bound is 1.5%; magnitude and Wanda have no such sensitivity and keep 1%.
        let bound = if method == Method::Sparsegpt {
            0.015
        } else {
            0.01
        };
        if rel.abs() > bound {
            failures.push(format!(
                "{method:?} {pattern}: {} vs {reference}",
                r.perplexity
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "perplexities off by more than 1%: {failures:?}"
    );
}

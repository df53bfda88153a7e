//! SliceGPT (`structured::slicegpt`):
//! * rotation only (fraction 0) computes the original function: tiny models with biases, an
//!   untied head and llama3 RoPE, and the real model (logits within float tolerance);
//! * a sliced model: shapes, RMSNorm divisor, parameter counts, KV-cache runtime, save → load
//!   with bit-exact logits;
//! * the width rule (official rounding to multiples of 8) and bad requests (model untouched);
//! * the real model: wiki perplexity grows with the slice.

mod common;
use common::*;
use lopper::calibrate::{CalibSet, SplitMix64};
use lopper::model::forward;
use lopper::structured::lowrank::{self, LowRankSpec, RankRule};
use lopper::structured::slicegpt::{self, SliceSpec};
use lopper::{Error, LinearKind, Model, Tensor};

fn tiny(name: &str) -> Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).expect("load tiny model")
}

fn tiny_calib(seed: u64) -> CalibSet {
    let mut rng = SplitMix64(seed);
    let (n, len) = (8, 32);
    CalibSet {
        ids: (0..n * len).map(|_| rng.below(320) as u32).collect(),
        n,
        len,
        source: "random ids".into(),
    }
}

fn ids(seed: u64, n: usize) -> Vec<u32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| rng.below(320) as u32).collect()
}

/// Largest |a − b| relative to the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn snapshot(m: &Model) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    m.weights
        .named_tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), t.data().to_vec()))
        .collect()
}

fn quiet() -> impl FnMut(&str, usize, usize) {
    |_, _, _| {}
}

#[test]
fn target_width_rounds_like_the_official_code() {
    let w = |f: f64| SliceSpec::new(f).target_dim(576).unwrap();
    assert_eq!(
        [w(0.0), w(0.1), w(0.2), w(0.25), w(0.3)],
        [576, 512, 456, 432, 400]
    );
    let exact = SliceSpec {
        fraction: 0.1,
        round_to: 1,
    };
    assert_eq!(exact.target_dim(576).unwrap(), 518);
    for f in [1.0, -0.01, f64::NAN, 0.999] {
        assert!(SliceSpec::new(f).target_dim(576).is_err(), "{f}");
    }
    assert!(SliceSpec {
        fraction: 0.1,
        round_to: 0
    }
    .target_dim(576)
    .is_err());
}

#[test]
fn rotation_only_keeps_the_tiny_models_function() {
    for name in ["tiny-llama-tied-bias", "tiny-llama3", "tiny-qwen2"] {
        let mut m = tiny(name);
        let x = ids(3, 64);
        let before = forward::forward_logits(&m, &x).unwrap();
        let d =
            slicegpt::slice(&mut m, &tiny_calib(1), &SliceSpec::new(0.0), &mut quiet()).unwrap();
        assert_eq!(d["hidden_after"], 64);
        assert!(m.weights.lm_head.is_some() && !m.config.tie_word_embeddings);
        assert!(m
            .weights
            .layers
            .iter()
            .all(|l| l.attn_shortcut.is_some() && l.mlp_shortcut.is_some()));
        let after = forward::forward_logits(&m, &x).unwrap();
        let r = rel_diff(&after, &before);
        assert!(r < 1e-5, "{name}: relative logit difference {r}");
    }
}

#[test]
fn sliced_tiny_model_runs_counts_and_round_trips() {
    let mut m = tiny("tiny-llama-tied-bias");
    let p0 = m.weights.num_params();
    let x = ids(5, 48);
    let dense = forward::forward_logits(&m, &x).unwrap();
    let d = slicegpt::slice(&mut m, &tiny_calib(2), &SliceSpec::new(0.25), &mut quiet()).unwrap();
    let n = 48;
    assert_eq!((m.config.hidden_size, m.config.rms_norm_dim), (n, Some(64)));
    assert_eq!(m.weights.embed.shape, [320, n]);
    assert_eq!(m.weights.lm_head().shape, [320, n]);
    for l in &m.weights.layers {
        assert_eq!(l.q.weight.shape[1], n);
        assert_eq!(
            (l.o.out_features(), l.o.bias.as_ref().unwrap().len()),
            (n, n)
        );
        assert_eq!((l.down.out_features(), l.up.in_features()), (n, n));
        assert_eq!(l.attn_shortcut.as_ref().unwrap().shape, [n, n]);
        assert_eq!(l.attn_norm.len(), n);
    }
    // Parameters: every count agrees; the untied head and the shortcuts are counted.
    let p1 = m.weights.num_params();
    assert_eq!(d["model_params_after"], p1);
    let s = lopper::inspect::summarize(&m);
    assert_eq!(s.total_params, p1);
    assert_eq!(s.shortcut_params, 3 * 2 * n * n);
    assert_eq!(s.embedding_params, 2 * 320 * n);
    // FLOPs per token: 2 per linear weight (both low-rank factors) and shortcut entry, plus
    // attention over one visible key (4·heads·head_dim per layer).
    let matrix_params: usize = m
        .weights
        .named_tensors()
        .iter()
        .filter(|(n, _)| n.contains("_proj.") && !n.ends_with(".bias") || n.contains("shortcut"))
        .map(|(_, t)| t.len())
        .sum();
    let flops = lopper::model::flops::prefill_flops(&m.weights, 8, 1, false);
    assert_eq!(flops, (2 * matrix_params + 3 * 4 * 64) as f64);
    assert!(p1 != p0);
    // Slicing a quarter of the width changes the logits, but not beyond recognition.
    let sliced = forward::forward_logits(&m, &x).unwrap();
    assert!(rel_diff(&sliced, &dense) < 0.5);
    assert!(rel_diff(&sliced, &dense) > 1e-4, "slicing changed nothing");
    // Zero-padded back to width 64 with a plain RMSNorm, it computes the same logits: the
    // sliced RMSNorm divides by the original width, and the shortcuts are where they belong.
    let padded = pad_to(&m, 64);
    assert_eq!(padded.config.norm_dim(), padded.config.hidden_size);
    let r = rel_diff(&forward::forward_logits(&padded, &x).unwrap(), &sliced);
    assert!(r < 1e-5, "padded vs sliced: {r}");
    // KV-cache runtime: shortcuts and the norm divisor on that path too.
    let mut cache = lopper::runtime::kv::KvCache::new(&m, 64);
    let mut c = lopper::runtime::kv::forward_step_all(&m, &x[..30], &mut cache).unwrap();
    c.extend(lopper::runtime::kv::forward_step_all(&m, &x[30..], &mut cache).unwrap());
    assert!(rel_diff(&c, &sliced) < 1e-5);
    // Save → load.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sliced");
    lopper::io::save::save_hf(&m, &out, Default::default(), false).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], n);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["lopper_slicegpt"]["rms_norm_dim"], 64);
    assert_eq!(
        cfg["lopper_slicegpt"]["attn_shortcuts"],
        serde_json::json!([0, 1, 2])
    );
    let back = lopper::io::load_model(&out).unwrap();
    assert_eq!(back.config.rms_norm_dim, Some(64));
    assert_eq!(back.weights.num_params(), p1);
    assert_eq!(forward::forward_logits(&back, &x).unwrap(), sliced);
    assert_eq!(back.lopper_extensions(), ["shortcuts", "rms_norm_dim"]);

    // Low rank on top of a sliced model, saved and loaded again.
    let spec = LowRankSpec::new(RankRule::ParamFraction(0.2), true, vec![LinearKind::Gate]);
    lowrank::factorize(&mut m, &tiny_calib(3), &spec, &mut quiet()).unwrap();
    let both = forward::forward_logits(&m, &x).unwrap();
    let out2 = dir.path().join("both");
    lopper::io::save::save_hf(&m, &out2, Default::default(), false).unwrap();
    let back = lopper::io::load_model(&out2).unwrap();
    assert_eq!(forward::forward_logits(&back, &x).unwrap(), both);
    assert_eq!(
        back.lopper_extensions(),
        ["low_rank", "shortcuts", "rms_norm_dim"]
    );
}

/// `t` `[r, c]` (or `[r]`) zero-padded to `[rows, cols]` (or `[rows]`).
fn pad(t: &Tensor, rows: usize, cols: usize) -> Tensor {
    let (r, c) = (t.shape[0], if t.shape.len() == 1 { 1 } else { t.cols() });
    let mut out = vec![0f32; rows * cols];
    for i in 0..r {
        out[i * cols..i * cols + c].copy_from_slice(&t.data()[i * c..(i + 1) * c]);
    }
    let shape = if t.shape.len() == 1 {
        vec![rows]
    } else {
        vec![rows, cols]
    };
    Tensor::new(shape, out)
}

/// A sliced model embedded in width `d` by zero padding, with an ordinary RMSNorm.
fn pad_to(m: &Model, d: usize) -> Model {
    let mut w = m.weights.clone();
    let vocab = w.embed.rows();
    w.embed = pad(&w.embed, vocab, d);
    w.lm_head = Some(pad(m.weights.lm_head(), vocab, d));
    w.final_norm = Tensor::new(vec![d], vec![1.0; d]);
    for l in &mut w.layers {
        l.attn_norm = Tensor::new(vec![d], vec![1.0; d]);
        l.mlp_norm = Tensor::new(vec![d], vec![1.0; d]);
        for k in [
            LinearKind::Q,
            LinearKind::K,
            LinearKind::V,
            LinearKind::Gate,
            LinearKind::Up,
        ] {
            let lin = l.linear_mut(k);
            lin.weight = pad(&lin.weight, lin.weight.rows(), d);
        }
        for k in [LinearKind::O, LinearKind::Down] {
            let lin = l.linear_mut(k);
            lin.weight = pad(&lin.weight, d, lin.weight.cols());
            lin.bias = lin.bias.as_ref().map(|b| pad(b, d, 1));
        }
        l.attn_shortcut = l.attn_shortcut.as_ref().map(|s| pad(s, d, d));
        l.mlp_shortcut = l.mlp_shortcut.as_ref().map(|s| pad(s, d, d));
    }
    let mut config = m.config.clone();
    config.hidden_size = d;
    config.rms_norm_dim = None;
    Model {
        config,
        weights: w,
        tokenizer: None,
        chat_template: None,
        source: m.source.clone(),
    }
}

#[test]
fn bad_requests_leave_the_model_untouched() {
    let mut m = tiny("tiny-llama3");
    let before = snapshot(&m);
    let calib = tiny_calib(4);
    for f in [1.0, 1.5, -0.1, f64::NAN, 0.99] {
        let e = slicegpt::slice(&mut m, &calib, &SliceSpec::new(f), &mut quiet()).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{f}: {e}");
    }
    assert!(snapshot(&m) == before);
    // A factorised model is refused (slice first).
    let spec = LowRankSpec::new(RankRule::ParamFraction(0.2), false, vec![LinearKind::Down]);
    lowrank::factorize(&mut m, &calib, &spec, &mut quiet()).unwrap();
    let factored = snapshot(&m);
    let e = slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.2), &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("low-rank"), "{e}");
    assert!(snapshot(&m) == factored);
    // Slicing twice is refused.
    let mut m = tiny("tiny-llama3");
    slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.25), &mut quiet()).unwrap();
    let sliced = snapshot(&m);
    let e = slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.25), &mut quiet()).unwrap_err();
    assert!(e.to_string().contains("already sliced"), "{e}");
    assert!(snapshot(&m) == sliced);
}

// ---------------------------------------------------------------------------------------------
// The real model
// ---------------------------------------------------------------------------------------------

fn real_calib(m: &Model) -> CalibSet {
    let c4 = lopper::assets::c4_text().unwrap();
    lopper::calibrate::from_text(m.tokenizer().unwrap(), &c4, 16, 128, 0).unwrap()
}

fn wiki_ids(m: &Model) -> Vec<u32> {
    let wiki = lopper::assets::wiki_text().unwrap();
    let text = lopper::text::load_eval_text(&wiki).unwrap();
    lopper::tokenizer::encode(m.tokenizer().unwrap(), &text, &wiki).unwrap()
}

#[test]
#[ignore = "real model"]
fn real_model_rotation_only_is_exact_and_slicing_costs_perplexity() {
    let path = lopper::assets::default_model().unwrap();
    let base = default_model();
    let calib = real_calib(base);
    let ids = wiki_ids(base);
    let wiki = lopper::assets::wiki_text().unwrap();
    let x = &ids[..128];
    let before = forward::forward_logits(base, x).unwrap();

    let mut m = lopper::io::load_model(&path).unwrap();
    slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.0), &mut quiet()).unwrap();
    let after = forward::forward_logits(&m, x).unwrap();
    let r = rel_diff(&after, &before);
    eprintln!("rotation only: relative logit difference {r:e}");
    assert!(r < 1e-4, "relative logit difference {r}");
    let top = |l: &[f32]| -> Vec<usize> {
        l.chunks(49152)
            .map(|row| {
                (0..row.len())
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(top(&after), top(&before));

    let ppl = |m: &Model| {
        lopper::eval::perplexity(m, &ids, 256, 4, &wiki, &mut |_, _| {})
            .unwrap()
            .perplexity
    };
    let dense = ppl(base);
    let mut m = lopper::io::load_model(&path).unwrap();
    slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.1), &mut quiet()).unwrap();
    let p10 = ppl(&m);
    let mut m = lopper::io::load_model(&path).unwrap();
    slicegpt::slice(&mut m, &calib, &SliceSpec::new(0.3), &mut quiet()).unwrap();
    let p30 = ppl(&m);
    eprintln!("wiki 4x256: dense {dense:.3}, sliced 10% {p10:.3}, 30% {p30:.3}");
    assert!(dense < p10 && p10 < p30 && p30.is_finite());
}

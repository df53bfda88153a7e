//! Exactness of the forward pass against transformers' outputs (../shared/golden).

mod common;
use common::*;
use lopper::model::forward::forward_logits;

#[test]
fn smollm2_matches_transformers_on_128_tokens() {
    let g = read_safetensors(&golden().join("smollm2_forward.safetensors"));
    let ids: Vec<u32> = g["input_ids"].i64.iter().map(|&v| v as u32).collect();
    let model = default_model();
    let logits = forward_logits(model, &ids).unwrap();
    let vocab = model.config.vocab_size;
    assert_eq!(logits.len(), ids.len() * vocab);

    // Per-position NLL within 1e-3.
    let nll_ref = &g["nll"].f32;
    let mut worst = 0f64;
    for t in 0..ids.len() - 1 {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let nll = lopper::kernels::logsumexp_naive(row) - row[ids[t + 1] as usize] as f64;
        worst = worst.max((nll - nll_ref[t] as f64).abs());
    }
    eprintln!("max |ΔNLL| = {worst:.2e}");
    assert!(worst <= 1e-3, "max NLL difference {worst}");

    // Top-1 agrees at every position; top-5 logits close.
    let top5 = &g["top5_ids"].i64;
    let top5l = &g["top5_logits"].f32;
    let mut worst_logit = 0f32;
    for t in 0..ids.len() {
        let row = &logits[t * vocab..(t + 1) * vocab];
        let argmax = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, v)| if *v > row[b] { i } else { b });
        assert_eq!(argmax as i64, top5[t * 5], "top-1 differs at position {t}");
        for j in 0..5 {
            worst_logit = worst_logit.max((row[top5[t * 5 + j] as usize] - top5l[t * 5 + j]).abs());
        }
    }
    eprintln!("max |Δlogit| on top-5 = {worst_logit:.2e}");
    assert!(worst_logit < 2e-3);

    // Full logits at positions 0, 63, 127.
    let at = &g["logits_at"].f32;
    for (i, &pos) in [0usize, 63, 127].iter().enumerate() {
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        let r = &at[i * vocab..(i + 1) * vocab];
        let d = row
            .iter()
            .zip(r)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("position {pos}: max |Δlogit| = {d:.2e}");
        assert!(d < 2e-3, "position {pos}: max logit difference {d}");
    }
}

/// The four tiny random models cover llama3 RoPE scaling, biases, qwen2 and mistral.
#[test]
fn tiny_models_match_transformers_logits() {
    for name in [
        "tiny-llama3",
        "tiny-llama-tied-bias",
        "tiny-qwen2",
        "tiny-mistral",
    ] {
        let dir = golden().join("tiny").join(name);
        let model = lopper::io::load_model(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let g = read_safetensors(&dir.join("golden_logits.safetensors"));
        let ids = &g["input_ids"];
        let (b, t) = (ids.shape[0], ids.shape[1]);
        let reference = &g["logits"].f32;
        let vocab = g["logits"].shape[2];
        let mut worst = 0f32;
        for s in 0..b {
            let seq: Vec<u32> = ids.i64[s * t..(s + 1) * t]
                .iter()
                .map(|&v| v as u32)
                .collect();
            let logits = forward_logits(&model, &seq).unwrap();
            let r = &reference[s * t * vocab..(s + 1) * t * vocab];
            worst = logits
                .iter()
                .zip(r)
                .fold(worst, |m, (a, b)| m.max((a - b).abs()));
        }
        eprintln!("{name}: max |Δlogit| = {worst:.2e}");
        assert!(worst <= 1e-4, "{name}: max logit difference {worst}");
    }
}

/// Batched windows give the same result as running each window alone.
#[test]
fn batched_forward_equals_single_windows() {
    let dir = golden().join("tiny").join("tiny-llama3");
    let model = lopper::io::load_model(&dir).unwrap();
    let g = read_safetensors(&dir.join("golden_logits.safetensors"));
    let ids: Vec<u32> = g["input_ids"].i64.iter().map(|&v| v as u32).collect();
    let t = g["input_ids"].shape[1];
    let obs = &mut lopper::model::observer::NoObserver;
    let both = lopper::model::forward::forward_hidden(&model, &ids, 2, t, obs).unwrap();
    let a = lopper::model::forward::forward_hidden(&model, &ids[..t], 1, t, obs).unwrap();
    let b = lopper::model::forward::forward_hidden(&model, &ids[t..], 1, t, obs).unwrap();
    let single: Vec<f32> = a.into_iter().chain(b).collect();
    let d = both
        .iter()
        .zip(&single)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "batched vs single max difference {d}");
}

/// Mistral sliding-window attention: tiny-mistral with a window of 16 (shorter than its 96-token
/// rows) against the NumPy reference of scripts/sliding_window_ref.py, which reproduces
/// transformers' golden logits without a window; the window survives save and reload.
#[test]
fn tiny_mistral_sliding_window_matches_reference() {
    let fx = window_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_mistral_windowed(&tmp.path().join("in"), fx.window);
    let g = read_safetensors(
        &golden()
            .join("tiny/tiny-mistral")
            .join("golden_logits.safetensors"),
    );
    let t = fx.ids.shape[1];
    assert_eq!(
        fx.ids.i64, g["input_ids"].i64,
        "fixture ids are the golden ids"
    );
    assert!(
        fx.window < t,
        "the window must be shorter than the sequence"
    );
    let vocab = fx.logits.shape[2];
    for row in 0..fx.ids.shape[0] {
        let seq: Vec<u32> = fx.ids.i64[row * t..(row + 1) * t]
            .iter()
            .map(|&v| v as u32)
            .collect();
        let logits = forward_logits(&model, &seq).unwrap();
        let d = window_fixture_diff(&fx, row, &logits);
        eprintln!("row {row}: max |Δlogit| vs the windowed reference = {d:.2e}");
        assert!(d <= 1e-4, "row {row}: max logit difference {d}");
        // Without the window the same positions are far off (the case tests something).
        let plain = &g["logits"].f32[row * t * vocab..(row + 1) * t * vocab];
        let off = window_fixture_diff(&fx, row, plain);
        assert!(
            off > 1e-2,
            "row {row}: the window changes the logits by only {off}"
        );
    }

    // Saved as HF, the window is written back and read again.
    let out = tmp.path().join("out");
    lopper::io::save::save_hf(&model, &out, lopper::io::save::SaveDtype::F32, false).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["sliding_window"], serde_json::json!(fx.window));
    let back = lopper::io::load_model(&out).unwrap();
    assert_eq!(back.config.sliding_window, Some(fx.window));
}

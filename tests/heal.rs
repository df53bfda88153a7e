//! Training (`lopper::train`) and `lopper heal` on the tiny golden models.

mod common;

use common::{golden, read_safetensors};
use lopper::train::{self, graph::Ctx, step, Mode, TrainModel};

fn tiny(name: &str) -> lopper::Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).expect("load tiny model")
}

fn golden_ids(name: &str) -> Vec<u32> {
    let g = read_safetensors(&golden().join("tiny").join(name).join("golden_logits.safetensors"));
    g["input_ids"].i64.iter().map(|&x| x as u32).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-12);
    let d = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    d / scale
}

/// The candle graph's logits equal lopper's plain forward on every tiny model it supports.
#[test]
fn candle_forward_matches_plain_forward() {
    for name in ["tiny-llama3", "tiny-llama-tied-bias", "tiny-qwen2", "tiny-mistral"] {
        let model = tiny(name);
        let ids = golden_ids(name);
        let tm = TrainModel::new(&model, Mode::Full, 0, &candle_core::Device::Cpu).unwrap();
        let ours = train::logits(&tm, &ids, 2, 96).unwrap();
        let mut plain = Vec::new();
        for w in ids.chunks(96) {
            plain.extend(lopper::model::forward::forward_logits(&model, w).unwrap());
        }
        let r = max_rel(&ours, &plain);
        assert!(r < 1e-4, "{name}: logits differ from the plain forward by {r:.2e} (relative to max)");
    }
}

/// Checkpointed gradients of every parameter equal transformers' (float64) on tiny-llama3.
#[test]
fn gradients_match_transformers() {
    let name = "tiny-llama3";
    let model = tiny(name);
    let ids = golden_ids(name);
    let dev = candle_core::Device::Cpu;
    let tm = TrainModel::new(&model, Mode::All, 0, &dev).unwrap();
    let ctx = Ctx::new(&model.config, 2, 96, &dev).unwrap();
    let out = step::loss_and_grads(&tm, &ids, 2, 96, &ctx, step::Objective::NextToken, None).unwrap();
    let g = read_safetensors(&golden().join("tiny").join(name).join("golden_grads.safetensors"));
    let loss = g["loss"].f32[0] as f64;
    assert!((out.loss - loss).abs() < 1e-5 * loss.abs().max(1.0), "loss {} vs {loss}", out.loss);
    let mut checked = 0;
    for (nv, gr) in tm.vars.iter().zip(&out.grads) {
        let want = &g.get(&format!("grad.{}", nv.name)).unwrap_or_else(|| panic!("no golden grad for {}", nv.name)).f32;
        let got = gr.as_ref().unwrap_or_else(|| panic!("no gradient for {}", nv.name));
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let r = max_rel(&got, want);
        assert!(r < 1e-3, "{}: gradient differs by {r:.2e} (relative to its max)", nv.name);
        checked += 1;
    }
    let golden_count = g.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, golden_count, "every golden gradient is checked");
}

//! Fidelity of Wanda and SparseGPT to the official code, on block 0 of the default model with
//! the golden calibration ids (../shared/golden/layer0_*).

mod common;
use common::*;
use lopper::model::observer::Site;
use lopper::prune::{self, driver, Method, Needs, Pattern, Scope, Target};
use lopper::LinearKind;
use std::collections::HashMap;

struct Layer0 {
    stats: HashMap<Site, prune::SiteStats>,
    dense: HashMap<String, GoldenTensor>,
}

fn layer0() -> &'static Layer0 {
    static L: std::sync::OnceLock<Layer0> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        let model = default_model();
        let calib = lopper::calibrate::from_ids_file(
            &golden().join("calib_c4_128x512.safetensors"),
            model.config.vocab_size,
        )
        .unwrap();
        assert_eq!((calib.n, calib.len), (128, 512));
        let mut h = lopper::model::forward::embed(&model.weights, &calib.ids).unwrap();
        let t = std::time::Instant::now();
        let stats = driver::layer_stats(
            model,
            0,
            &mut h,
            calib.n,
            calib.len,
            Needs {
                col_sq: true,
                hessian: true,
            },
        )
        .unwrap();
        eprintln!("block-0 statistics in {:.1} s", t.elapsed().as_secs_f64());
        Layer0 {
            stats,
            dense: read_safetensors(&golden().join("layer0_dense.safetensors")),
        }
    })
}

fn name(kind: LinearKind) -> String {
    format!("model.layers.0.{}.weight", kind.hf_name())
}

#[test]
fn layer0_weights_are_the_golden_dense_weights() {
    let l0 = layer0();
    let model = default_model();
    for kind in LinearKind::ALL {
        let ours = model.weights.layers[0].linear(kind).weight.data();
        let gold = &l0.dense[&name(kind)].f32;
        let d = ours
            .iter()
            .zip(gold)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-6, "{kind:?}: max difference {d}");
    }
}

#[test]
fn statistics_match_official_scaler_row_and_hessian() {
    let l0 = layer0();
    let aux = read_safetensors(&golden().join("layer0_wanda50_aux.safetensors"));
    for kind in LinearKind::ALL {
        let ours = l0.stats[&Site::of(kind)].scaler_row().unwrap();
        let gold = &aux[&format!("model.layers.0.{}.scaler_row", kind.hf_name())].f32;
        let rel = ours.iter().zip(gold).fold(0f64, |m, (a, b)| {
            m.max(((a - b).abs() / b.abs().max(1e-12)) as f64)
        });
        eprintln!("{kind:?} scaler_row max rel diff {rel:.2e}");
        assert!(
            rel < 1e-3,
            "{kind:?} scaler_row max relative difference {rel}"
        );
    }
    let haux = read_safetensors(&golden().join("layer0_sparsegpt50_aux.safetensors"));
    for (key, t) in &haux {
        let site = if key.contains("q_proj") || key.contains("k_proj") || key.contains("v_proj") {
            Site::AttnIn
        } else if key.contains("o_proj") {
            Site::AttnOut
        } else if key.contains("gate_proj") || key.contains("up_proj") {
            Site::MlpIn
        } else {
            Site::MlpDown
        };
        let ours = l0.stats[&site].hessian().unwrap();
        let num: f64 = ours
            .iter()
            .zip(&t.f32)
            .map(|(a, b)| (a - *b as f64).powi(2))
            .sum();
        let den: f64 = t.f32.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        eprintln!("{key} {:?}: Hessian rel Frobenius diff {rel:.2e}", t.shape);
        assert!(rel < 1e-4, "{key}: Hessian relative difference {rel}");
    }
}

fn prune_layer0(method: Method, pattern: Pattern) -> HashMap<LinearKind, Vec<f32>> {
    let l0 = layer0();
    let p = prune::pruner(method, Scope::Row);
    LinearKind::ALL
        .iter()
        .map(|&kind| {
            let g = &l0.dense[&name(kind)];
            let mut w = g.f32.clone();
            let target = Target {
                sparsity: 0.5,
                pattern,
            };
            p.prune(
                &mut w,
                g.shape[0],
                g.shape[1],
                &l0.stats[&Site::of(kind)],
                target,
                &name(kind),
            )
            .unwrap();
            (kind, w)
        })
        .collect()
}

fn mask_agreement(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .filter(|(x, y)| (**x == 0.0) == (**y == 0.0))
        .count() as f64
        / a.len() as f64
}

#[test]
fn wanda_masks_match_official() {
    let gold = read_safetensors(&golden().join("layer0_wanda50.safetensors"));
    for (kind, w) in prune_layer0(Method::Wanda, Pattern::Unstructured) {
        let g = &gold[&name(kind)].f32;
        let agree = mask_agreement(&w, g);
        eprintln!("wanda {kind:?}: mask agreement {:.5}", agree);
        assert!(agree >= 0.999, "{kind:?}: Wanda mask agreement {agree}");
        // Wanda does not update weights: kept weights equal the dense ones.
        let dense = &layer0().dense[&name(kind)].f32;
        assert!(w.iter().zip(dense).all(|(a, b)| *a == 0.0 || a == b));
    }
}

#[test]
fn sparsegpt_matches_official() {
    let gold = read_safetensors(&golden().join("layer0_sparsegpt50.safetensors"));
    let mut failures = Vec::new();
    for (kind, w) in prune_layer0(Method::Sparsegpt, Pattern::Unstructured) {
        let g = &gold[&name(kind)].f32;
        let agree = mask_agreement(&w, g);
        let num: f64 = w.iter().zip(g).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = g.iter().map(|b| (*b as f64).powi(2)).sum();
        let rel = (num / den).sqrt();
        eprintln!("sparsegpt {kind:?}: mask agreement {agree:.5}, rel Frobenius diff {rel:.2e}");
        if agree < 0.99 || rel > 0.01 {
            failures.push(format!(
                "{kind:?}: mask agreement {agree}, weight difference {rel}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "SparseGPT differs from the official code: {failures:?}"
    );
}

/// ‖WX − ŴX‖ on a real layer ranks sparsegpt < wanda < magnitude (Wanda paper Table, SparseGPT §3).
#[test]
fn reconstruction_error_ranks_methods() {
    let l0 = layer0();
    for kind in [LinearKind::Q, LinearKind::Down] {
        let g = &l0.dense[&name(kind)];
        let (rows, cols) = (g.shape[0], g.shape[1]);
        let h = l0.stats[&Site::of(kind)].hessian().unwrap();
        // ‖(W − Ŵ) X‖² = tr(ΔW · XXᵀ · ΔWᵀ) ∝ Σ_r δ_rᵀ H δ_r.
        let err = |w: &[f32]| -> f64 {
            let mut total = 0f64;
            for r in 0..rows {
                let d: Vec<f64> = (0..cols)
                    .map(|c| (g.f32[r * cols + c] - w[r * cols + c]) as f64)
                    .collect();
                for i in 0..cols {
                    if d[i] != 0.0 {
                        total += d[i] * (0..cols).map(|j| h[i * cols + j] * d[j]).sum::<f64>();
                    }
                }
            }
            total
        };
        let e: Vec<f64> = [Method::Sparsegpt, Method::Wanda, Method::Magnitude]
            .iter()
            .map(|&m| err(&prune_layer0(m, Pattern::Unstructured)[&kind]))
            .collect();
        eprintln!(
            "{kind:?}: reconstruction error sparsegpt {:.4e} wanda {:.4e} magnitude {:.4e}",
            e[0], e[1], e[2]
        );
        assert!(
            e[0] < e[1] && e[1] < e[2],
            "{kind:?}: errors not ranked: {e:?}"
        );
    }
}

//! Reconstruction after structured steps. Low rank (`lopper::recover::lowrank_fit`): the
//! reduced-rank regression on small random statistics (one stream reduces to SVD-LLM's whitened
//! truncation; the fit is a minimum among nearby factors), and the low-rank step with
//! `reconstruct` on the tiny llama3. Layer removal (`lopper::recover::depth_fit`): the block
//! after a removed span absorbs it on the tiny llama3.

mod common;

use common::{golden, random_calib};
use lopper::calibrate::SplitMix64;
use lopper::recover::{lowrank_fit, reconstruct::ReconStats, ReconOptions};
use lopper::structured::lowrank::{self, factor_matrix, LowRankSpec, RankRule};
use lopper::Model;

fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0)
        .collect()
}

/// `aᵀb` of two `[tokens, cols]` matrices, f64.
fn prod(a: &[f32], b: &[f32], tokens: usize, cols: usize) -> Vec<f64> {
    let mut m = vec![0f64; cols * cols];
    for t in 0..tokens {
        for i in 0..cols {
            for j in 0..cols {
                m[i * cols + j] += a[t * cols + i] as f64 * b[t * cols + j] as f64;
            }
        }
    }
    m
}

/// `U·V` as f64, `[out, inp]`.
fn product(u: &[f32], v: &[f32], out: usize, inp: usize) -> Vec<f64> {
    let r = u.len() / out;
    let mut m = vec![0f64; out * inp];
    for i in 0..out {
        for k in 0..r {
            for j in 0..inp {
                m[i * inp + j] += u[i * r + k] as f64 * v[k * inp + j] as f64;
            }
        }
    }
    m
}

/// `‖X_p Mᵀ − X_d W₀ᵀ‖²` straight from the token matrices.
fn output_error_naive(m: &[f64], w0: &[f32], xp: &[f32], xd: &[f32], out: usize, c: usize) -> f64 {
    let tokens = xp.len() / c;
    let mut e = 0.0;
    for t in 0..tokens {
        for i in 0..out {
            let (mut a, mut b) = (0.0, 0.0);
            for j in 0..c {
                a += m[i * c + j] * xp[t * c + j] as f64;
                b += w0[i * c + j] as f64 * xd[t * c + j] as f64;
            }
            e += (a - b) * (a - b);
        }
    }
    e
}

#[test]
fn one_stream_lowrank_refit_is_svd_llm() {
    let mut rng = SplitMix64(21);
    let (out, c, tokens) = (9, 14, 80);
    let x = rand_vec(&mut rng, tokens * c);
    let g = prod(&x, &x, tokens, c);
    let st = ReconStats::from_parts(c, g.clone(), g.clone(), g.clone());
    let w0 = rand_vec(&mut rng, out * c);
    let rule = RankRule::ParamFraction(0.5);
    // Damping pulls towards W₀, so even damped the re-fit is exactly the (damped) whitened
    // truncation. Start from the plain SVD.
    let damp = 0.01;
    let mut f = factor_matrix(&w0, out, c, None, rule, 0.0, "t")
        .unwrap()
        .unwrap();
    let fit = lowrank_fit::refit_factors(&mut f.u, &mut f.v, &w0, out, c, &st, damp, "t").unwrap();
    assert!(fit.rel_error_after < fit.rel_error_before, "{fit:?}");
    let want = factor_matrix(&w0, out, c, Some(&g), rule, damp, "t")
        .unwrap()
        .unwrap();
    let (a, b) = (
        product(&f.u, &f.v, out, c),
        product(&want.u, &want.v, out, c),
    );
    let scale = b.iter().map(|v| v.abs()).fold(0.0, f64::max);
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() <= 1e-4 * scale, "{p} vs {q}");
    }
}

#[test]
fn two_stream_lowrank_refit_beats_nearby_factors() {
    let mut rng = SplitMix64(22);
    let (out, c, tokens) = (7, 12, 60);
    let xd = rand_vec(&mut rng, tokens * c);
    let noise = rand_vec(&mut rng, tokens * c);
    let xp: Vec<f32> = xd.iter().zip(&noise).map(|(a, b)| a + 0.4 * b).collect();
    let st = ReconStats::from_parts(
        c,
        prod(&xp, &xp, tokens, c),
        prod(&xp, &xd, tokens, c),
        prod(&xd, &xd, tokens, c),
    );
    let w0 = rand_vec(&mut rng, out * c);
    let gp = prod(&xp, &xp, tokens, c);
    let start = factor_matrix(
        &w0,
        out,
        c,
        Some(&gp),
        RankRule::ParamFraction(0.4),
        0.0,
        "t",
    )
    .unwrap()
    .unwrap();
    let (mut u, mut v) = (start.u.clone(), start.v.clone());
    let fit = lowrank_fit::refit_factors(&mut u, &mut v, &w0, out, c, &st, 0.0, "t").unwrap();
    let energy = output_error_naive(&vec![0.0; out * c], &w0, &xp, &xd, out, c);
    let e_fit = output_error_naive(&product(&u, &v, out, c), &w0, &xp, &xd, out, c);
    let e_start = output_error_naive(&product(&start.u, &start.v, out, c), &w0, &xp, &xd, out, c);
    // The reported errors are the true ones, and the fit beats one-stream SVD-LLM.
    assert!(
        (fit.rel_error_after - e_fit / energy).abs() < 1e-6,
        "{fit:?} vs {}",
        e_fit / energy
    );
    assert!((fit.rel_error_before - e_start / energy).abs() < 1e-6);
    assert!(e_fit < e_start, "{e_fit} vs {e_start}");
    // No nearby factors of the same rank do better.
    for k in 0..20 {
        let eps = 1e-3 * (1 + k % 4) as f32;
        let du = rand_vec(&mut rng, u.len());
        let dv = rand_vec(&mut rng, v.len());
        let u2: Vec<f32> = u.iter().zip(&du).map(|(a, b)| a + eps * b).collect();
        let v2: Vec<f32> = v.iter().zip(&dv).map(|(a, b)| a + eps * b).collect();
        let e2 = output_error_naive(&product(&u2, &v2, out, c), &w0, &xp, &xd, out, c);
        assert!(
            e2 >= e_fit * (1.0 - 1e-9),
            "perturbation {k}: {e2} < {e_fit}"
        );
    }
}

#[test]
fn lowrank_refit_refuses_mismatched_shapes() {
    let st = ReconStats::from_parts(4, vec![0.0; 16], vec![0.0; 16], vec![0.0; 16]);
    let (mut u, mut v) = (vec![0f32; 6], vec![0f32; 10]);
    let e = lowrank_fit::refit_factors(&mut u, &mut v, &[0.0; 12], 3, 4, &st, 0.01, "l.x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("l.x"), "{e}");
}

fn tiny_model() -> Model {
    lopper::io::load_model(&golden().join("tiny").join("tiny-llama3")).expect("load tiny-llama3")
}

fn logit_mse(a: &Model, b: &Model, ids: &[u32]) -> f64 {
    let la = lopper::model::forward::forward_logits(a, ids).unwrap();
    let lb = lopper::model::forward::forward_logits(b, ids).unwrap();
    la.iter()
        .zip(&lb)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / la.len() as f64
}

#[test]
fn lowrank_reconstruction_brings_the_tiny_model_closer_to_dense() {
    let dense = tiny_model();
    let calib = random_calib(5, 8, 32, 320);
    let ids = &calib.ids[..calib.len];
    let run = |recon: bool| {
        let mut m = tiny_model();
        let mut spec = LowRankSpec::new(RankRule::ParamFraction(0.4), true, Vec::new());
        spec.reconstruct = recon.then(ReconOptions::default);
        let d = lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap();
        (m, d)
    };
    let (plain, _) = run(false);
    let (rec, details) = run(true);
    // Same ranks, same parameter count.
    assert_eq!(plain.weights.num_params(), rec.weights.num_params());
    let r = &details["reconstruction"];
    let fits = r["layers"].as_array().unwrap();
    assert_eq!(fits.len(), 7 * dense.weights.layers.len());
    for f in fits {
        let (b, a) = (
            f["rel_error_before"].as_f64().unwrap(),
            f["rel_error_after"].as_f64().unwrap(),
        );
        assert!(a.is_finite() && a <= b + 1e-12, "{f}");
    }
    assert!(r["mean_rel_error_after"].as_f64() < r["mean_rel_error_before"].as_f64());
    let (e_plain, e_rec) = (logit_mse(&dense, &plain, ids), logit_mse(&dense, &rec, ids));
    assert!(
        e_rec < e_plain,
        "reconstructed {e_rec} vs SVD-LLM {e_plain}"
    );
}

#[test]
fn the_block_after_a_removed_layer_absorbs_it_on_the_tiny_model() {
    use lopper::structured::depth::{remove_layers, DepthMetric, DepthSpec, LayerSelection};
    let dense = tiny_model();
    let n = dense.weights.layers.len();
    assert!(n >= 3, "tiny-llama3 has {n} blocks");
    let calib = random_calib(6, 8, 32, 320);
    let ids = &calib.ids[..calib.len];
    let run = |list: Vec<usize>, recon: bool| {
        let mut m = tiny_model();
        let spec = DepthSpec {
            select: LayerSelection::List(list),
            metric: DepthMetric::BlockInfluence,
            reconstruct: recon.then(ReconOptions::default),
        };
        let d = remove_layers(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap();
        (m, d)
    };
    let (plain, _) = run(vec![1], false);
    let (rec, d) = run(vec![1], true);
    let r = &d["reconstruction"];
    let fits = r["layers"].as_array().unwrap();
    // Block 1 of the cut model (block 2 before) re-fits o_proj and down_proj.
    let names: Vec<&str> = fits.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.down_proj.weight"
        ]
    );
    for f in fits {
        let (b, a) = (
            f["rel_error_before"].as_f64().unwrap(),
            f["rel_error_after"].as_f64().unwrap(),
        );
        assert!(a.is_finite() && a < b, "{f}");
    }
    assert!(rec.config.o_bias && rec.config.mlp_bias);
    assert_eq!(rec.weights.layers.len(), n - 1);
    let (e_plain, e_rec) = (logit_mse(&dense, &plain, ids), logit_mse(&dense, &rec, ids));
    assert!(
        e_rec < e_plain,
        "reconstructed {e_rec} vs plain removal {e_plain}"
    );
    // A span at the end has no block after it: nothing changes, and the report says so.
    let (plain_end, _) = run(vec![n - 1], false);
    let (rec_end, d) = run(vec![n - 1], true);
    assert_eq!(
        d["reconstruction"]["spans_at_end"],
        serde_json::json!([[n - 1, n]])
    );
    assert_eq!(logit_mse(&plain_end, &rec_end, ids), 0.0);
}

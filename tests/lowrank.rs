//! Low-rank factorisation (`structured::lowrank`):
//! * the math on random matrices: plain truncated SVD is the Eckart–Young optimum of the weight
//!   error; SVD-LLM whitening is the optimum of the *output* error on the calibration inputs,
//!   and its error is exactly the discarded σ² of `W·S`; the rank rules;
//! * model plumbing: a factorised linear computes `x (U V)ᵀ + b` in the forward pass and the
//!   KV-cache runtime, counts its parameters, is refused by unstructured pruning;
//! * bad requests leave the model untouched; save → load keeps the logits bit-exact;
//! * the real model: whitening beats plain SVD at equal parameters, in layer-0 output error and
//!   in wiki perplexity.

mod common;
use common::*;
use lopper::calibrate::{CalibSet, SplitMix64};
use lopper::model::forward;
use lopper::model::weights::LinearRepr;
use lopper::prune::{driver, Method, Pattern, PrunePlan};
use lopper::structured::lowrank::{self, factor_matrix, LowRankSpec, RankRule};
use lopper::{Error, Linear, LinearKind, Model, Tensor};
use std::path::PathBuf;

fn gauss(rng: &mut SplitMix64) -> f64 {
    // Box–Muller.
    let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((rng.next_u64() >> 11) as f64) / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| gauss(&mut rng) as f32).collect()
}

/// `XᵀX` of `tokens` correlated inputs of width `cols` with very unequal scales.
fn correlated_gram(cols: usize, tokens: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64(seed);
    let mix: Vec<f64> = (0..cols * cols).map(|_| gauss(&mut rng)).collect();
    let scale: Vec<f64> = (0..cols).map(|j| 10f64.powf(-(j as f64) / 8.0)).collect();
    let mut g = vec![0f64; cols * cols];
    for _ in 0..tokens {
        let z: Vec<f64> = (0..cols).map(|j| gauss(&mut rng) * scale[j]).collect();
        let x: Vec<f64> = (0..cols)
            .map(|i| (0..cols).map(|j| mix[i * cols + j] * z[j]).sum())
            .collect();
        for i in 0..cols {
            for j in 0..cols {
                g[i * cols + j] += x[i] * x[j];
            }
        }
    }
    g
}

fn tail_energy(sigma: &[f64], r: usize) -> f64 {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    sigma[r..].iter().map(|s| s * s).sum::<f64>() / total
}

#[test]
fn rank_rules() {
    assert_eq!(lowrank::rank_for_fraction(576, 1536, 0.25), 314);
    assert_eq!(lowrank::rank_for_fraction(576, 576, 0.0), 288);
    assert_eq!(lowrank::rank_for_fraction(10, 10, 0.99), 0);
    let s = [4.0, 2.0, 1.0, 1.0];
    // σ² = 16, 4, 1, 1 of 22.
    assert_eq!(lowrank::rank_for_energy(&s, 0.5), 1);
    assert_eq!(lowrank::rank_for_energy(&s, 0.9), 2);
    assert_eq!(lowrank::rank_for_energy(&s, 0.95), 3);
    assert_eq!(lowrank::rank_for_energy(&s, 0.96), 4);
    assert_eq!(lowrank::rank_for_energy(&s, 1.0), 4);
}

#[test]
fn plain_svd_is_the_eckart_young_optimum() {
    let (out, inp) = (40, 24);
    let w = random(out * inp, 1);
    let f = factor_matrix(&w, out, inp, None, RankRule::ParamFraction(0.3), 0.0, "w")
        .unwrap()
        .unwrap();
    assert_eq!(f.rank, 10); // ⌊0.7·960/64⌋
    assert_eq!((f.u.len(), f.v.len()), (out * 10, 10 * inp));
    let err = lowrank::relative_error(&w, &f, out, inp, None);
    let expected = tail_energy(&f.sigma, f.rank);
    assert!(
        (err - expected).abs() < 1e-6 * expected.max(1e-3),
        "{err} vs {expected}"
    );
}

#[test]
fn whitening_minimises_the_output_error() {
    let (out, inp) = (48, 32);
    let w = random(out * inp, 2);
    let g = correlated_gram(inp, 400, 3);
    let rule = RankRule::ParamFraction(0.4);
    let plain = factor_matrix(&w, out, inp, None, rule, 0.0, "w")
        .unwrap()
        .unwrap();
    let white = factor_matrix(&w, out, inp, Some(&g), rule, 0.0, "w")
        .unwrap()
        .unwrap();
    assert_eq!(plain.rank, white.rank);
    assert_eq!(white.shift, 0.0, "the Gram matrix is positive definite");
    let out_plain = lowrank::relative_error(&w, &plain, out, inp, Some(&g));
    let out_white = lowrank::relative_error(&w, &white, out, inp, Some(&g));
    // The whitened error is the discarded energy of W·S, and below the plain SVD's.
    let expected = tail_energy(&white.sigma, white.rank);
    assert!(
        (out_white - expected).abs() < 1e-4 * expected,
        "{out_white} vs {expected}"
    );
    assert!(
        out_white < 0.8 * out_plain,
        "whitened {out_white} vs plain {out_plain}"
    );
    // …while the plain SVD is better in the weights themselves.
    let w_plain = lowrank::relative_error(&w, &plain, out, inp, None);
    let w_white = lowrank::relative_error(&w, &white, out, inp, None);
    assert!(
        w_plain < w_white,
        "weights: plain {w_plain} vs whitened {w_white}"
    );
}

#[test]
fn singular_gram_gets_the_official_shift_and_energy_rule_keeps_dense() {
    let (out, inp) = (16, 12);
    let w = random(out * inp, 4);
    // Rank-deficient inputs (4 tokens < 12 columns): the Cholesky fails and SVD-LLM shifts.
    let g = correlated_gram(inp, 4, 5);
    let f = factor_matrix(
        &w,
        out,
        inp,
        Some(&g),
        RankRule::ParamFraction(0.5),
        0.0,
        "w",
    )
    .unwrap()
    .unwrap();
    assert!(f.shift > 0.0);
    assert!(f.u.iter().chain(&f.v).all(|x| x.is_finite()));
    // Full energy needs full rank 12, which would cost 12·28 > 16·12 parameters.
    let dense = factor_matrix(&w, out, inp, None, RankRule::Energy(1.0), 0.0, "w").unwrap();
    assert!(dense.is_none());
    let some = factor_matrix(&w, out, inp, None, RankRule::Energy(0.3), 0.0, "w")
        .unwrap()
        .unwrap();
    assert!(some.rank < 6 && tail_energy(&some.sigma, some.rank) <= 0.7 + 1e-12);
}

#[test]
fn factorised_linear_computes_u_v_product() {
    let (out, inp, r, rows) = (24, 40, 5, 7);
    let (u, v) = (random(out * r, 6), random(r * inp, 7));
    let bias = Tensor::new(vec![out], random(out, 8));
    let lr = Linear::low_rank(
        Tensor::new(vec![out, r], u.clone()),
        Tensor::new(vec![r, inp], v.clone()),
        Some(bias.clone()),
    );
    assert_eq!(
        (lr.out_features(), lr.in_features(), lr.rank()),
        (out, inp, Some(r))
    );
    assert_eq!(lr.weight_params(), r * (out + inp));
    let mut w = vec![0f32; out * inp];
    for i in 0..out {
        for j in 0..inp {
            w[i * inp + j] = (0..r).map(|k| u[i * r + k] * v[k * inp + j]).sum();
        }
    }
    let dense = Linear::new(Tensor::new(vec![out, inp], w), Some(bias));
    let x = random(rows * inp, 9);
    let (mut a, mut b) = (vec![1f32; rows * out], vec![1f32; rows * out]);
    forward::linear(&lr, &x, rows, &mut a, true);
    forward::linear(&dense, &x, rows, &mut b, true);
    let err = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "max diff {err}");
}

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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Every linear's values, for "untouched" checks.
fn snapshot(m: &Model) -> Vec<Vec<f32>> {
    m.weights
        .named_tensors()
        .iter()
        .map(|(_, t)| t.data().to_vec())
        .collect()
}

#[test]
fn factorised_model_runs_like_its_dense_products_and_round_trips() {
    // Biases on every linear: they must survive factorisation.
    let mut m = tiny("tiny-llama-tied-bias");
    let p0 = m.weights.num_params();
    let spec = LowRankSpec::new(RankRule::ParamFraction(0.3), true, vec![]);
    let details = lowrank::factorize(&mut m, &tiny_calib(1), &spec, &mut |_, _, _| {}).unwrap();
    assert_eq!(details["tensors"].as_array().unwrap().len(), 3 * 7);
    for l in &m.weights.layers {
        for k in LinearKind::ALL {
            let lin = l.linear(k);
            assert!(lin.is_factored() && lin.bias.is_some(), "{k:?}");
        }
    }
    let p1 = m.weights.num_params();
    assert!(p1 < p0);
    assert_eq!(details["model_params_after"], p1);
    // Parameter counts: inspect agrees with the weights.
    let s = lopper::inspect::summarize(&m);
    assert_eq!(s.total_params, p1);
    let lin: usize = m
        .weights
        .layers
        .iter()
        .flat_map(|l| LinearKind::ALL.map(|k| l.linear(k).weight_params()))
        .sum();
    assert_eq!(s.linear_params, lin);

    // The same model with each U·V multiplied out as a dense weight.
    let mut dense = m.weights.clone();
    for l in &mut dense.layers {
        for k in LinearKind::ALL {
            let lin = l.linear_mut(k);
            let LinearRepr::LowRank { u } = std::mem::replace(&mut lin.repr, LinearRepr::Dense)
            else {
                panic!("{k:?} is not low-rank")
            };
            let v = lin.weight.clone();
            let (out, r, inp) = (u.rows(), v.rows(), v.cols());
            let mut w = vec![0f32; out * inp];
            for i in 0..out {
                for j in 0..inp {
                    w[i * inp + j] = (0..r)
                        .map(|t| u.data()[i * r + t] * v.data()[t * inp + j])
                        .sum();
                }
            }
            lin.weight = Tensor::new(vec![out, inp], w);
        }
    }
    let dense = Model {
        config: m.config.clone(),
        weights: dense,
        tokenizer: None,
        chat_template: None,
        source: m.source.clone(),
    };
    let x = ids(11, 40);
    let a = forward::forward_logits(&m, &x).unwrap();
    let b = forward::forward_logits(&dense, &x).unwrap();
    assert!(
        max_diff(&a, &b) < 1e-3,
        "factorised vs multiplied out: {}",
        max_diff(&a, &b)
    );
    // The KV-cache runtime goes through the same linears.
    let mut cache = lopper::runtime::kv::KvCache::new(&m, 64);
    let mut c = lopper::runtime::kv::forward_step_all(&m, &x[..25], &mut cache).unwrap();
    c.extend(lopper::runtime::kv::forward_step_all(&m, &x[25..], &mut cache).unwrap());
    assert!(max_diff(&a, &c) < 1e-4, "KV cache: {}", max_diff(&a, &c));

    // Save → load: the same tensors, bit-exact logits.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lr");
    lopper::io::save::save_hf(&m, &out, Default::default(), false).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let ranks = cfg["lopper_low_rank"].as_object().unwrap();
    assert_eq!(ranks.len(), 21);
    assert_eq!(
        ranks["model.layers.2.mlp.down_proj"],
        m.weights.layers[2].down.rank().unwrap()
    );
    let back = lopper::io::load_model(&out).unwrap();
    assert_eq!(back.weights.num_params(), p1);
    assert!(back.weights.layers[1].up.is_factored());
    let d = forward::forward_logits(&back, &x).unwrap();
    assert_eq!(a, d, "logits after save/load");
}

#[test]
fn bad_requests_leave_the_model_untouched() {
    let mut m = tiny("tiny-llama3");
    let before = snapshot(&m);
    let calib = tiny_calib(2);
    let bad = [
        RankRule::ParamFraction(1.0),
        RankRule::ParamFraction(-0.1),
        RankRule::ParamFraction(f64::NAN),
        RankRule::ParamFraction(0.999), // rank 0
        RankRule::Energy(0.0),
        RankRule::Energy(1.5),
        RankRule::Energy(f64::NAN),
    ];
    for rule in bad {
        for whiten in [false, true] {
            let spec = LowRankSpec::new(rule, whiten, vec![]);
            let e = lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{rule:?}: {e}");
        }
    }
    let mut spec = LowRankSpec::new(RankRule::ParamFraction(0.2), true, vec![]);
    spec.damping = -1.0;
    assert!(lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).is_err());
    assert!(
        snapshot(&m) == before,
        "a refused request changed the model"
    );

    // Factorising twice, and unstructured pruning of a factorised model, are refused.
    let spec = LowRankSpec::new(RankRule::ParamFraction(0.2), false, vec![LinearKind::Up]);
    lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap();
    let after = snapshot(&m);
    let e = lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("already factorised"), "{e}");
    let plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    let e = lopper::prune::prune_model(&mut m, &calib, &plan, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("low-rank"), "{e}");
    assert!(snapshot(&m) == after);
}

// ---------------------------------------------------------------------------------------------
// The real model
// ---------------------------------------------------------------------------------------------

fn model_path() -> PathBuf {
    lopper::assets::default_model().expect("default model")
}

/// 16 c4 windows of 128 tokens.
fn real_calib(m: &Model) -> CalibSet {
    let c4 = lopper::assets::c4_text().unwrap();
    lopper::calibrate::from_text(m.tokenizer().unwrap(), &c4, 16, 128, 0).unwrap()
}

/// Wiki perplexity on the first 4 windows of 256 tokens.
fn wiki_ppl(m: &Model) -> f64 {
    let wiki = lopper::assets::wiki_text().unwrap();
    let text = lopper::text::load_eval_text(&wiki).unwrap();
    let ids = lopper::tokenizer::encode(m.tokenizer().unwrap(), &text, &wiki).unwrap();
    lopper::eval::perplexity(m, &ids, 256, 4, &wiki, &mut |_, _| {})
        .unwrap()
        .perplexity
}

#[test]
#[ignore = "real model"]
fn whitening_beats_plain_svd_on_the_real_model() {
    let base = default_model();
    let calib = real_calib(base);
    // Layer 0 output error on the same calibration inputs, every linear, 25% of its params.
    let mut h = forward::embed(&base.weights, &calib.ids).unwrap();
    let needs = lopper::prune::Needs {
        col_sq: false,
        hessian: true,
    };
    let sites = driver::layer_stats(base, 0, &mut h, calib.n, calib.len, needs).unwrap();
    let rule = RankRule::ParamFraction(0.25);
    for k in LinearKind::ALL {
        let lin = base.weights.layers[0].linear(k);
        let (out, inp) = (lin.out_features(), lin.in_features());
        let g = sites[&lopper::model::observer::Site::of(k)]
            .hessian()
            .unwrap();
        let w = lin.weight.data();
        let p = factor_matrix(w, out, inp, None, rule, 0.0, "p")
            .unwrap()
            .unwrap();
        let s = factor_matrix(w, out, inp, Some(&g), rule, 0.0, "s")
            .unwrap()
            .unwrap();
        let (ep, es) = (
            lowrank::relative_error(w, &p, out, inp, Some(&g)),
            lowrank::relative_error(w, &s, out, inp, Some(&g)),
        );
        assert!(es < ep, "{k:?}: whitened {es} vs plain {ep}");
    }

    // Perplexity at equal parameters: the MLP linears lose 25% of their parameters.
    let dense = wiki_ppl(base);
    let mlp = vec![LinearKind::Gate, LinearKind::Up, LinearKind::Down];
    let mut ppl = Vec::new();
    let mut params = Vec::new();
    for whiten in [false, true] {
        let mut m = lopper::io::load_model(&model_path()).unwrap();
        let spec = LowRankSpec::new(rule, whiten, mlp.clone());
        lowrank::factorize(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap();
        params.push(m.weights.num_params());
        ppl.push(wiki_ppl(&m));
    }
    eprintln!(
        "wiki 4x256: dense {dense:.3}, plain SVD {:.3}, SVD-LLM {:.3}",
        ppl[0], ppl[1]
    );
    assert_eq!(params[0], params[1]);
    assert!(params[0] < base.weights.num_params());
    assert!(
        ppl[1] > dense && ppl[1] < ppl[0],
        "whitened {} vs plain {}",
        ppl[1],
        ppl[0]
    );
}

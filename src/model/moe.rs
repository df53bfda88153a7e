//! Mixture-of-experts MLP (Mixtral, Qwen3-MoE), as plain functions.
//!
//! A router `R` `[experts, hidden]` gives each token the logits `x Rᵀ`; their softmax (f32) is
//! the routing distribution, the `top_k` most probable experts run on the token, and the block's
//! MLP output is `Σ p_e · down_e(silu(gate_e(x)) · up_e(x))` over the chosen experts. With
//! `norm_topk_prob` the chosen probabilities are divided by their sum first: Mixtral always
//! (transformers' `MixtralSparseMoeBlock` renormalises the top-k softmax, which is the softmax
//! over the chosen logits), Qwen3-MoE when its config says so (`Qwen3MoeSparseMoeBlock`).
//! Experts run in index order over the rows routed to them and their outputs are added in that
//! order, as transformers' loop does.
//!
//! Calibration sees each expert's inputs through [`Observer::expert_input`]: only the rows of
//! the tokens routed to it (what Wanda / SparseGPT statistics for that expert must count).

use crate::kernels;
use crate::model::config::MoeConfig;
use crate::model::observer::{Observer, Site};
use crate::model::weights::{Expert, Linear, Moe, Tensor};

/// `out[rows, n] = x · Wᵀ (+ b)` for a dense `[n, k]` weight (experts and the router are dense:
/// lopper neither factorises nor packs them).
fn dense(w: &Tensor, bias: Option<&Tensor>, x: &[f32], rows: usize, out: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    crate::formats::dense_f32_matmul(w.data(), n, k, x, rows, out, false);
    if let Some(b) = bias {
        kernels::add_bias(&mut out[..rows * n], b.data());
    }
}

fn linear(lin: &Linear, x: &[f32], rows: usize, out: &mut [f32]) {
    assert!(!lin.is_factored(), "a low-rank expert linear");
    dense(&lin.weight, lin.bias.as_ref(), x, rows, out);
}

/// One token's routing: the chosen experts and their weights, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Route one token from its router logits (see the module docs). Ties go to the lower index.
pub fn route(logits: &[f32], top_k: usize, norm_topk_prob: bool) -> Route {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    let p: Vec<f32> = e.iter().map(|&x| x / sum).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.truncate(top_k.min(p.len()));
    let mut weights: Vec<f32> = order.iter().map(|&i| p[i]).collect();
    if norm_topk_prob {
        let s: f32 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= s);
    }
    Route {
        experts: order,
        weights,
    }
}

/// Routes of `rows` normed tokens `x` `[rows, hidden]`.
pub fn routes(moe: &Moe, mc: &MoeConfig, x: &[f32], rows: usize) -> Vec<Route> {
    let n = moe.router.rows();
    let mut logits = vec![0f32; rows * n];
    dense(&moe.router, None, x, rows, &mut logits);
    logits
        .chunks(n)
        .map(|l| route(l, mc.top_k, mc.norm_topk_prob))
        .collect()
}

/// The mixture's output for normed tokens `x` `[rows, hidden]`, added into `out`
/// `[rows, hidden]`; the observer sees each expert's inputs when `want`.
#[allow(clippy::too_many_arguments)]
pub fn moe_forward(
    layer: usize,
    moe: &Moe,
    mc: &MoeConfig,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    obs: &mut dyn Observer,
    want: bool,
) {
    let d = moe.router.cols();
    let routes = routes(moe, mc, x, rows);
    for (e, ex) in moe.experts.iter().enumerate() {
        let mut picked: Vec<(usize, f32)> = Vec::new();
        for (r, rt) in routes.iter().enumerate() {
            if let Some(j) = rt.experts.iter().position(|&c| c == e) {
                picked.push((r, rt.weights[j]));
            }
        }
        let n = picked.len();
        if n == 0 {
            continue;
        }
        let mut xg = Vec::with_capacity(n * d);
        for &(r, _) in &picked {
            xg.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        if want {
            obs.expert_input(layer, e, Site::MlpIn, &xg, n, d);
        }
        let w = ex.width();
        let mut g = vec![0f32; n * w];
        let mut u = vec![0f32; n * w];
        linear(&ex.gate, &xg, n, &mut g);
        linear(&ex.up, &xg, n, &mut u);
        kernels::silu_mul(&mut g, &u);
        if want {
            obs.expert_input(layer, e, Site::MlpDown, &g, n, w);
        }
        let mut y = vec![0f32; n * d];
        linear(&ex.down, &g, n, &mut y);
        for (i, &(r, p)) in picked.iter().enumerate() {
            let o = &mut out[r * d..(r + 1) * d];
            o.iter_mut()
                .zip(&y[i * d..(i + 1) * d])
                .for_each(|(a, b)| *a += p * b);
        }
    }
}

/// One expert on `rows` tokens `x` `[rows, hidden]`: `out = down(silu(gate(x)) · up(x))`.
pub fn expert_forward(ex: &Expert, x: &[f32], rows: usize, out: &mut [f32]) {
    let w = ex.width();
    let mut g = vec![0f32; rows * w];
    let mut u = vec![0f32; rows * w];
    linear(&ex.gate, x, rows, &mut g);
    linear(&ex.up, x, rows, &mut u);
    kernels::silu_mul(&mut g, &u);
    linear(&ex.down, &g, rows, out);
}

/// Reference [`moe_forward`]: every token through its chosen experts one at a time, in f64.
pub fn moe_forward_naive(moe: &Moe, mc: &MoeConfig, x: &[f32], rows: usize) -> Vec<f32> {
    let d = moe.router.cols();
    let mut out = vec![0f32; rows * d];
    let mv = |t: &crate::Tensor, v: &[f64]| -> Vec<f64> {
        t.data()
            .chunks(t.cols())
            .map(|row| row.iter().zip(v).map(|(a, b)| *a as f64 * b).sum())
            .collect()
    };
    for r in 0..rows {
        let xr: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
        let logits: Vec<f32> = mv(&moe.router, &xr).iter().map(|&v| v as f32).collect();
        let rt = route(&logits, mc.top_k, mc.norm_topk_prob);
        let mut acc = vec![0f64; d];
        for (&e, &p) in rt.experts.iter().zip(&rt.weights) {
            let ex = &moe.experts[e];
            let g = mv(&ex.gate.weight, &xr);
            let u = mv(&ex.up.weight, &xr);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            for (o, y) in acc.iter_mut().zip(mv(&ex.down.weight, &a)) {
                *o += p as f64 * y;
            }
        }
        for (o, a) in out[r * d..(r + 1) * d].iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::observer::NoObserver;

    fn rnd(seed: &mut u32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn route_picks_top_k_and_normalises() {
        let r = route(&[0.0, 2.0, 1.0, -1.0], 2, true);
        assert_eq!(r.experts, vec![1, 2]);
        let e = 1f32.exp();
        assert!((r.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let raw = route(&[0.0, 2.0, 1.0, -1.0], 2, false);
        assert!(raw.weights.iter().sum::<f32>() < 0.99, "unnormalised top-k");
    }

    #[test]
    fn moe_forward_matches_naive() {
        let (d, w, n_e, rows) = (12, 7, 5, 9);
        let mut s = 7u32;
        let mut t = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Tensor::new(shape, rnd(&mut s, n))
        };
        let experts = (0..n_e)
            .map(|_| Expert {
                gate: Linear::new(t(vec![w, d]), None),
                up: Linear::new(t(vec![w, d]), None),
                down: Linear::new(t(vec![d, w]), None),
            })
            .collect();
        let moe = Moe {
            router: t(vec![n_e, d]),
            experts,
        };
        let x = t(vec![rows, d]).data().to_vec();
        for norm in [true, false] {
            let mc = MoeConfig {
                num_experts: n_e,
                top_k: 2,
                norm_topk_prob: norm,
                expert_intermediate: w,
            };
            let mut out = vec![0f32; rows * d];
            moe_forward(0, &moe, &mc, &x, rows, &mut out, &mut NoObserver, false);
            let want = moe_forward_naive(&moe, &mc, &x, rows);
            let worst = out
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "norm {norm}: {worst}");
            assert!(want.iter().any(|v| v.abs() > 1e-3));
        }
    }
}

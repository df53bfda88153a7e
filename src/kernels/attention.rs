//! Causal grouped-query attention (softmax(QKᵀ·scale + causal mask)·V) for one sequence.
//!
//! Layout: `q` is `[tq, n_heads·head_dim]`, `k`/`v` are `[tk, n_kv_heads·head_dim]`, row-major,
//! RoPE already applied. Query row `i` sits at absolute position `p = tk − tq + i` and sees keys
//! `0..=p`, which covers full-sequence prefill (`tq == tk`) and cached decode (`tq == 1`).
//! Query head `h` reads KV head `h / (n_heads / n_kv_heads)` (GQA).
//!
//! Sliding-window attention (Mistral's `sliding_window` `W`, [`causal_attention_windowed`])
//! narrows that to keys `p + 1 − W ..= p`: the last `W` positions including the query's own, as
//! transformers' `sliding_window_causal_mask_function` (`kv_idx > q_idx − W` and
//! `kv_idx <= q_idx`). Without a window, or with one at least `tk` long, nothing changes.
//!
//! The fast path splits work into (head, block of 64 query rows) tasks over rayon; each task
//! computes its score block with one GEMM, only up to the last key its rows can see, applies the
//! causal softmax and multiplies by V with a second GEMM, writing a disjoint tile of `out`.
//! Tasks of at most [`ROWWISE`] query rows (decode: one row per step) skip the GEMMs: their
//! scores are one dot product per key ([`dot_rows`]) and their outputs one weighted sum of value
//! rows ([`weighted_rows`]), 1.3–1.6× faster than the `gemm` crate's matrix-vector path at the
//! default model's shapes (`examples/attn_decode_bench`).

use super::{dot_rows, gemm_strided, softmax_prefix, weighted_rows, SendPtr};
use rayon::prelude::*;
use std::cell::RefCell;

/// Head counts of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

const QB: usize = 128;

/// Tasks with at most this many query rows compute row by row instead of by GEMM.
const ROWWISE: usize = 4;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn check(q: &[f32], k: &[f32], v: &[f32], out: &[f32], tq: usize, tk: usize, d: AttnDims) {
    assert!(tq <= tk, "attention: more queries than keys");
    assert!(
        d.n_kv_heads > 0 && d.n_heads.is_multiple_of(d.n_kv_heads),
        "attention: bad GQA grouping"
    );
    let qw = d.n_heads * d.head_dim;
    let kw = d.n_kv_heads * d.head_dim;
    assert!(
        q.len() >= tq * qw && out.len() >= tq * qw,
        "attention: q/out too small"
    );
    assert!(
        k.len() >= tk * kw && v.len() >= tk * kw,
        "attention: k/v too small"
    );
}

/// First key position a query at absolute position `p` sees under `window` (0 without one).
#[inline]
pub fn first_key(p: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (p + 1).saturating_sub(w))
}

/// Fast causal attention; see the module docs for layouts.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tq: usize,
    tk: usize,
    d: AttnDims,
    scale: f32,
) {
    causal_attention_windowed(q, k, v, out, tq, tk, d, scale, None);
}

/// [`causal_attention`] with an optional sliding window of `window` positions (see the module
/// docs); a window of 0 is treated as 1 (the query sees itself).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_windowed(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tq: usize,
    tk: usize,
    d: AttnDims,
    scale: f32,
    window: Option<usize>,
) {
    attention_impl(q, k, v, out, tq, tk, d, scale, window, None);
}

/// Causal attention of `pos.len()` query rows at ascending absolute positions `pos` (not
/// necessarily contiguous) against `tk` keys at positions `0..tk`: row `i` sees keys
/// `0..=pos[i]` (`pos[i] < tk`). [`causal_attention`] is the case `pos = tk − tq .. tk`.
/// Token pruning revives dropped prompt tokens this way, against a complete cache.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_at(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    pos: &[usize],
    tk: usize,
    d: AttnDims,
    scale: f32,
) {
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]) && pos.last().is_none_or(|&p| p < tk),
        "attention: query positions must ascend below tk"
    );
    attention_impl(q, k, v, out, pos.len(), tk, d, scale, None, Some(pos));
}

/// Reference for [`causal_attention_at`]: each row through [`causal_attention_naive`] with
/// the keys up to its position.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_at_naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    pos: &[usize],
    tk: usize,
    d: AttnDims,
    scale: f32,
) {
    let qw = d.n_heads * d.head_dim;
    let kw = d.n_kv_heads * d.head_dim;
    for (i, &p) in pos.iter().enumerate() {
        assert!(p < tk, "attention: query position past the keys");
        causal_attention_naive(
            &q[i * qw..(i + 1) * qw],
            &k[..(p + 1) * kw],
            &v[..(p + 1) * kw],
            &mut out[i * qw..(i + 1) * qw],
            1,
            p + 1,
            d,
            scale,
        );
    }
}

/// The fast kernel; query row `i` is at position `qpos[i]`, or `tk − tq + i` without `qpos`.
#[allow(clippy::too_many_arguments)]
fn attention_impl(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tq: usize,
    tk: usize,
    d: AttnDims,
    scale: f32,
    window: Option<usize>,
    qpos: Option<&[usize]>,
) {
    check(q, k, v, out, tq, tk, d);
    let window = window.map(|w| w.max(1));
    if tq == 0 {
        return;
    }
    let hd = d.head_dim;
    let qw = (d.n_heads * hd) as isize;
    let kw = (d.n_kv_heads * hd) as isize;
    let group = d.n_heads / d.n_kv_heads;
    let blocks = tq.div_ceil(QB);
    let past = tk - tq;
    let at = |i: usize| qpos.map_or(past + i, |p| p[i]);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..d.n_heads * blocks).into_par_iter().for_each(|task| {
        // Rebound so the closure captures the Send wrapper whole, not its raw pointer field.
        #[allow(clippy::redundant_locals)]
        let out_ptr = out_ptr;
        let (h, b) = (task / blocks, task % blocks);
        let g = h / group;
        let r0 = b * QB;
        let r1 = (r0 + QB).min(tq);
        let rows = r1 - r0;
        // Keys kstart..kend cover every row of the block: the first row's window start to the
        // last row's own position.
        let kstart = first_key(at(r0), window);
        let kend = at(r1 - 1) + 1;
        let kn = kend - kstart;
        SCORES.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < rows * kn {
                s.resize(rows * kn, 0.0);
            }
            let scores = &mut s[..rows * kn];
            if rows <= ROWWISE {
                for i in 0..rows {
                    let p = at(r0 + i);
                    let lo = first_key(p, window);
                    let n = p + 1 - lo;
                    let qo = (r0 + i) * qw as usize + h * hd;
                    let sc = &mut scores[..n];
                    let ko = lo * kw as usize + g * hd;
                    dot_rows(&q[qo..qo + hd], &k[ko..], kw as usize, scale, sc);
                    softmax_prefix(sc, n);
                    // SAFETY: `check` sized `out` for `tq` rows of `qw`; this task alone writes
                    // row r0 + i, head h.
                    let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(qo), hd) };
                    weighted_rows(sc, &v[ko..], kw as usize, o);
                }
                return;
            }
            // SAFETY: all extents are within the slices checked in `check`; `scores` is a
            // private buffer; each task writes a distinct (rows r0..r1, head h) tile of `out`.
            unsafe {
                gemm_strided(
                    rows,
                    kn,
                    hd,
                    scores.as_mut_ptr(),
                    kn as isize,
                    1,
                    false,
                    q.as_ptr().offset(r0 as isize * qw + (h * hd) as isize),
                    qw,
                    1,
                    k.as_ptr().add(kstart * kw as usize + g * hd),
                    1,
                    kw,
                    scale,
                    false,
                );
            }
            for (i, row) in scores.chunks_mut(kn).enumerate() {
                let p = at(r0 + i);
                // Keys before this row's window get weight 0, as do those after `p`.
                let off = first_key(p, window) - kstart;
                row[..off].fill(0.0);
                softmax_prefix(&mut row[off..], p + 1 - kstart - off);
            }
            unsafe {
                gemm_strided(
                    rows,
                    hd,
                    kn,
                    out_ptr.0.offset(r0 as isize * qw + (h * hd) as isize),
                    qw,
                    1,
                    false,
                    scores.as_ptr(),
                    kn as isize,
                    1,
                    v.as_ptr().add(kstart * kw as usize + g * hd),
                    kw,
                    1,
                    1.0,
                    false,
                );
            }
        });
    });
}

/// Reference causal attention with f64 accumulation and exact `exp`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tq: usize,
    tk: usize,
    d: AttnDims,
    scale: f32,
) {
    causal_attention_windowed_naive(q, k, v, out, tq, tk, d, scale, None);
}

/// Reference for [`causal_attention_windowed`]: the mask written out per key as transformers
/// does (`j <= p && j > p − W`), f64 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_windowed_naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    tq: usize,
    tk: usize,
    d: AttnDims,
    scale: f32,
    window: Option<usize>,
) {
    check(q, k, v, out, tq, tk, d);
    let w = window.map_or(i64::MAX, |w| w.max(1) as i64);
    let hd = d.head_dim;
    let qw = d.n_heads * hd;
    let kw = d.n_kv_heads * hd;
    let group = d.n_heads / d.n_kv_heads;
    for h in 0..d.n_heads {
        let g = h / group;
        for i in 0..tq {
            let p = (tk - tq + i) as i64;
            let visible: Vec<usize> = (0..tk)
                .filter(|&j| (j as i64) <= p && (j as i64) > p.saturating_sub(w))
                .collect();
            let qi = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
            let sc: Vec<f64> = visible
                .iter()
                .map(|&j| {
                    let kj = &k[j * kw + g * hd..j * kw + (g + 1) * hd];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..hd {
                let acc: f64 = visible
                    .iter()
                    .zip(&e)
                    .map(|(&j, ej)| ej * v[j * kw + g * hd + c] as f64)
                    .sum();
                out[i * qw + h * hd + c] = (acc / z) as f32;
            }
        }
    }
}

//! Decode attention (one query row against a cached context), the default model's shapes
//! (9 query heads, 3 KV heads, head size 64, 30 layers): `kernels::causal_attention`, whose
//! one-row tasks compute dot products and weighted sums directly, against the same computation
//! through two `gemm` calls per head (the path every task took before). A 256 MB buffer is read
//! between steps so that, as in a real decode, the caches hold no K/V when a step starts.
//!
//! `cargo run --release --example attn_decode_bench [context …]`

use lopper::kernels::{self, attention::AttnDims};
use std::time::Instant;

fn gemm_path(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], tk: usize, d: AttnDims, scale: f32) {
    use rayon::prelude::*;
    let hd = d.head_dim;
    let kw = d.n_kv_heads * hd;
    let group = d.n_heads / d.n_kv_heads;
    let outs: Vec<Vec<f32>> = (0..d.n_heads)
        .into_par_iter()
        .map(|h| {
            let g = h / group;
            let mut s = vec![0f32; tk];
            let mut o = vec![0f32; hd];
            // SAFETY: extents inside q, k, v, s, o as sized above.
            unsafe {
                kernels::gemm_strided(
                    1,
                    tk,
                    hd,
                    s.as_mut_ptr(),
                    tk as isize,
                    1,
                    false,
                    q.as_ptr().add(h * hd),
                    0,
                    1,
                    k.as_ptr().add(g * hd),
                    1,
                    kw as isize,
                    scale,
                    false,
                );
            }
            kernels::softmax_prefix(&mut s, tk);
            unsafe {
                kernels::gemm_strided(
                    1,
                    hd,
                    tk,
                    o.as_mut_ptr(),
                    hd as isize,
                    1,
                    false,
                    s.as_ptr(),
                    tk as isize,
                    1,
                    v.as_ptr().add(g * hd),
                    kw as isize,
                    1,
                    1.0,
                    false,
                );
            }
            o
        })
        .collect();
    for (h, o) in outs.iter().enumerate() {
        out[h * hd..(h + 1) * hd].copy_from_slice(o);
    }
}

fn main() {
    // On a pool worker, like a decode step (`runtime::kv::on_pool`).
    rayon::ThreadPoolBuilder::new()
        .build()
        .unwrap()
        .install(body);
}

fn body() {
    let ctxs: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ctxs = if ctxs.is_empty() {
        vec![100, 300, 1000]
    } else {
        ctxs
    };
    let d = AttnDims {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let (qw, kw, layers) = (9 * 64, 3 * 64, 30);
    let mut seed = 1u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 2001) as f32 / 1000.0 - 1.0
    };
    let flush: Vec<f32> = (0..64 << 20).map(|i| (i % 7) as f32).collect();
    for &tk in &ctxs {
        let q: Vec<f32> = (0..qw).map(|_| rnd()).collect();
        let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..layers)
            .map(|_| {
                (
                    (0..tk * kw).map(|_| rnd()).collect(),
                    (0..tk * kw).map(|_| rnd()).collect(),
                )
            })
            .collect();
        let (mut a, mut b) = (vec![0f32; qw], vec![0f32; qw]);
        let (mut ta, mut tb) = (vec![], vec![]);
        let mut sink = 0f32;
        for round in 0..10 {
            for which in [round % 2, 1 - round % 2] {
                sink += flush.iter().step_by(16).sum::<f32>();
                let t = Instant::now();
                for (k, v) in &kv {
                    if which == 0 {
                        kernels::causal_attention(&q, k, v, &mut a, 1, tk, d, 0.125);
                    } else {
                        gemm_path(&q, k, v, &mut b, tk, d, 0.125);
                    }
                }
                let dt = t.elapsed().as_secs_f64() * 1e3;
                if which == 0 {
                    ta.push(dt)
                } else {
                    tb.push(dt)
                }
            }
        }
        let err = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        ta.sort_by(f64::total_cmp);
        tb.sort_by(f64::total_cmp);
        println!(
            "context {tk:5}: 30 layers, median of 10: row-wise {:.3} ms, gemm {:.3} ms ({:.2}×); K/V {:.1} MB; max |diff| {err:.1e} ({sink:.0})",
            ta[5], tb[5], tb[5] / ta[5], (2 * layers * tk * kw * 4) as f64 / 1e6
        );
    }
}

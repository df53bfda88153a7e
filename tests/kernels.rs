//! Every fast kernel against its `*_naive` reference, on random and edge-case shapes.

use lopper::kernels::{self, attention::AttnDims};

/// Small deterministic PRNG (xorshift) so tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn matmul_matches_naive_on_odd_shapes() {
    let mut rng = Rng(1);
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 17, 5),
        (64, 576, 192),
        (130, 33, 257),
        (0, 4, 4),
        (4, 0, 4),
        (2, 8, 0),
    ] {
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        let mut a = rng.vec(m * n, 1.0);
        let mut b = a.clone();
        kernels::matmul_t(&x, &w, &mut a, m, k, n, false);
        kernels::matmul_t_naive(&x, &w, &mut b, m, k, n, false);
        assert!(max_rel_err(&a, &b) < 1e-5, "m={m} k={k} n={n}");
        // accumulate mode
        let mut a2 = a.clone();
        let mut b2 = a.clone();
        kernels::matmul_t(&x, &w, &mut a2, m, k, n, true);
        kernels::matmul_t_naive(&x, &w, &mut b2, m, k, n, true);
        assert!(max_rel_err(&a2, &b2) < 1e-5, "accumulate m={m} k={k} n={n}");
    }
}

/// The dense decode path (row dot products for m ≤ 4, threads over rows for large matrices,
/// GEMM above) against the naive product, storing and accumulating.
#[test]
fn dense_small_products_match_naive() {
    let mut rng = Rng(3);
    for &(m, k, n) in &[
        (1, 1, 1),
        (1, 17, 5),
        (2, 576, 192),
        (3, 33, 257),
        (4, 1536, 576),
        (1, 576, 1536),
        (1, 576, 4097),
        (5, 64, 64),
        (1, 0, 8),
        (2, 8, 0),
        (0, 8, 8),
    ] {
        let x = rng.vec(m * k, 1.0);
        let w = rng.vec(n * k, 1.0);
        for acc in [false, true] {
            let init = rng.vec(m * n, 1.0);
            let (mut a, mut b) = (init.clone(), init.clone());
            lopper::formats::dense_f32_matmul(&w, n, k, &x, m, &mut a, acc);
            kernels::matmul_t_naive(&x, &w, &mut b, m, k, n, acc);
            assert!(
                max_rel_err(&a, &b) < 1e-5,
                "m={m} k={k} n={n} accumulate={acc}: {}",
                max_rel_err(&a, &b)
            );
        }
    }
}

#[test]
fn stream_sum_matches_naive() {
    let mut rng = Rng(5);
    for n in [0usize, 1, 63, 64, 65, 1000, 4099] {
        let x = rng.vec(n, 1.0);
        let (a, b) = (
            kernels::probe::sum_f32(&x),
            kernels::probe::sum_f32_naive(&x),
        );
        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "n={n}: {a} vs {b}");
    }
    // The probe checks its own sums; it must give a positive finite rate.
    let g = kernels::probe::stream_gbps(2, 8 << 20, 2);
    assert!(g.is_finite() && g > 0.0, "{g}");
}

#[test]
fn exp_fast_is_accurate() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let e = kernels::exp_fast(x) as f64;
        let r = (x as f64).exp();
        worst = worst.max(((e - r) / r).abs());
        x += 0.0137;
    }
    assert!(worst < 4e-7, "exp_fast worst relative error {worst}");
    assert_eq!(kernels::exp_fast(0.0), 1.0);
    assert!(kernels::exp_fast(-1000.0) < 1e-37);
    assert!(kernels::exp_fast(f32::NEG_INFINITY) < 1e-37);
    let mut v = vec![0.5f32, -3.0, 10.0];
    kernels::exp_slice(&mut v);
    assert!((v[2] as f64 - 10f64.exp()).abs() / 10f64.exp() < 4e-7);
}

#[test]
fn rowwise_kernels_match_naive() {
    let mut rng = Rng(7);
    for &(rows, d) in &[(1, 1), (3, 15), (5, 576), (2, 1000)] {
        let x = rng.vec(rows * d, 3.0);
        let w = rng.vec(d, 1.0);
        let (mut a, mut b) = (vec![0f32; rows * d], vec![0f32; rows * d]);
        kernels::rmsnorm(&x, &w, 1e-5, &mut a);
        kernels::rmsnorm_naive(&x, &w, 1e-5, &mut b);
        assert!(max_rel_err(&a, &b) < 1e-5, "rmsnorm {rows}x{d}");

        let up = rng.vec(rows * d, 2.0);
        let (mut g1, mut g2) = (x.clone(), x.clone());
        kernels::silu_mul(&mut g1, &up);
        kernels::silu_mul_naive(&mut g2, &up);
        assert!(max_rel_err(&g1, &g2) < 1e-5, "silu_mul {rows}x{d}");

        for n in [1, d / 2 + 1, d] {
            let (mut s1, mut s2) = (x[..d].to_vec(), x[..d].to_vec());
            kernels::softmax_prefix(&mut s1, n);
            kernels::softmax_prefix_naive(&mut s2, n);
            assert!(max_rel_err(&s1, &s2) < 1e-5, "softmax d={d} n={n}");
            assert!(s1[n..].iter().all(|&v| v == 0.0));
        }
        let l1 = kernels::logsumexp(&x[..d]);
        let l2 = kernels::logsumexp_naive(&x[..d]);
        assert!((l1 - l2).abs() < 1e-5, "logsumexp {l1} vs {l2}");
    }
    // a row with huge spread (vocab-sized logits)
    let big: Vec<f32> = (0..49152)
        .map(|i| ((i * 7919) % 1000) as f32 * 0.03 - 10.0)
        .collect();
    assert!((kernels::logsumexp(&big) - kernels::logsumexp_naive(&big)).abs() < 1e-5);
}

#[test]
fn attention_matches_naive() {
    let mut rng = Rng(42);
    let cases = [
        (1, 1, 9, 3, 64),     // single token
        (1, 70, 9, 3, 64),    // decode with cache, beyond one query block
        (65, 65, 4, 2, 8),    // prefill crossing a block edge
        (130, 200, 8, 8, 16), // MHA, chunked prefill after a cached prefix
        (33, 33, 6, 1, 10),   // MQA, head_dim not a SIMD multiple
        (3, 50, 6, 2, 10),    // row-wise tasks (≤ 4 query rows), head_dim not a SIMD multiple
        (4, 4, 4, 4, 64),     // row-wise prefill of a whole 4-token sequence
        (1, 300, 9, 3, 64),   // decode at the default model's shapes, long cache
        (5, 40, 4, 1, 24),    // just above the row-wise limit: the GEMM path
    ];
    for &(tq, tk, h, kvh, hd) in &cases {
        let d = AttnDims {
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: hd,
        };
        let q = rng.vec(tq * h * hd, 2.0);
        let k = rng.vec(tk * kvh * hd, 2.0);
        let v = rng.vec(tk * kvh * hd, 1.0);
        let (mut a, mut b) = (vec![0f32; tq * h * hd], vec![0f32; tq * h * hd]);
        let scale = 1.0 / (hd as f32).sqrt();
        kernels::causal_attention(&q, &k, &v, &mut a, tq, tk, d, scale);
        kernels::causal_attention_naive(&q, &k, &v, &mut b, tq, tk, d, scale);
        assert!(
            max_rel_err(&a, &b) < 1e-5,
            "attention tq={tq} tk={tk} h={h} kvh={kvh} hd={hd}"
        );
    }
}

/// Sliding-window attention: fast vs naive on prefill (GEMM path, blocks crossing the window
/// start), chunked prefill after a cache, row-wise tasks and decode; a window covering every key
/// gives exactly the unwindowed bits, and a window of 1 returns each query's own value.
#[test]
fn windowed_attention_matches_naive() {
    let mut rng = Rng(4242);
    let cases = [
        // (tq, tk, heads, kv heads, head_dim, window)
        (96, 96, 8, 2, 8, 16),
        (200, 200, 4, 2, 16, 37),
        (130, 200, 8, 8, 16, 64),
        (3, 50, 6, 2, 10, 7),
        (1, 70, 9, 3, 64, 16),
        (1, 300, 9, 3, 64, 300),
        (5, 40, 4, 1, 24, 5),
        (20, 20, 2, 1, 8, 1),
    ];
    for &(tq, tk, h, kvh, hd, w) in &cases {
        let d = AttnDims {
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: hd,
        };
        let q = rng.vec(tq * h * hd, 2.0);
        let k = rng.vec(tk * kvh * hd, 2.0);
        let v = rng.vec(tk * kvh * hd, 1.0);
        let n = tq * h * hd;
        let (mut a, mut b, mut full) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let scale = 1.0 / (hd as f32).sqrt();
        kernels::causal_attention_windowed(&q, &k, &v, &mut a, tq, tk, d, scale, Some(w));
        kernels::causal_attention_windowed_naive(&q, &k, &v, &mut b, tq, tk, d, scale, Some(w));
        let what = format!("tq={tq} tk={tk} h={h} kvh={kvh} hd={hd} window={w}");
        assert!(max_rel_err(&a, &b) < 1e-5, "windowed attention {what}");
        kernels::causal_attention(&q, &k, &v, &mut full, tq, tk, d, scale);
        if w >= tk {
            let same = a.iter().zip(&full).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "a window over every key changes nothing: {what}");
        } else {
            // Rows whose window starts after key 0 see fewer keys, so their outputs move.
            assert!(
                max_rel_err(&a, &full) > 1e-3,
                "the window had no effect: {what}"
            );
        }
        if w == 1 {
            let past = tk - tq;
            for i in 0..tq {
                for hh in 0..h {
                    let g = hh / (h / kvh);
                    let o = &a[i * h * hd + hh * hd..][..hd];
                    let vv = &v[(past + i) * kvh * hd + g * hd..][..hd];
                    assert!(
                        o.iter().zip(vv).all(|(x, y)| (x - y).abs() < 1e-6),
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn decode_attention_rows_match_naive() {
    // Edge shapes: no keys, one key, head sizes below, at and above the 16-lane chunks, the
    // 64-wide register path, and key rows strided inside a wider KV row.
    let mut rng = Rng(77);
    for &(n, hd, stride) in &[
        (0, 64, 192),
        (1, 1, 1),
        (7, 15, 15),
        (9, 16, 40),
        (33, 17, 17),
        (70, 64, 192),
        (5, 80, 96),
    ] {
        let q = rng.vec(hd, 2.0);
        let k = rng.vec(n * stride + hd, 2.0);
        let (mut a, mut b) = (vec![9f32; n], vec![0f32; n]);
        kernels::dot_rows(&q, &k, stride, 0.3, &mut a);
        kernels::dot_rows_naive(&q, &k, stride, 0.3, &mut b);
        assert!(max_rel_err(&a, &b) < 1e-5, "dot_rows n={n} hd={hd}");
        let p = rng.vec(n, 1.0);
        let (mut a, mut b) = (vec![9f32; hd], vec![0f32; hd]);
        kernels::weighted_rows(&p, &k, stride, &mut a);
        kernels::weighted_rows_naive(&p, &k, stride, &mut b);
        assert!(max_rel_err(&a, &b) < 1e-5, "weighted_rows n={n} hd={hd}");
        if n == 0 {
            assert!(a.iter().all(|&x| x == 0.0), "no keys: zero output");
        }
    }
}

#[test]
fn attention_first_query_copies_first_value() {
    // Position 0 sees only key 0, so its output is exactly v[0] of its KV head.
    let d = AttnDims {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let mut rng = Rng(3);
    let q = rng.vec(5 * 16, 1.0);
    let k = rng.vec(5 * 8, 1.0);
    let v = rng.vec(5 * 8, 1.0);
    let mut out = vec![0f32; 5 * 16];
    kernels::causal_attention(&q, &k, &v, &mut out, 5, 5, d, 0.5);
    for h in 0..4 {
        let g = h / 2;
        for c in 0..4 {
            assert!((out[h * 4 + c] - v[g * 4 + c]).abs() < 1e-6);
        }
    }
}

#[test]
fn gram_matches_naive() {
    let mut rng = Rng(9);
    for &(rows, cols) in &[(1, 1), (7, 5), (300, 200), (64, 577), (0, 3)] {
        let x = rng.vec(rows * cols, 1.0);
        let (mut a, mut b) = (vec![1f32; cols * cols], vec![0f32; cols * cols]);
        kernels::gram(&x, rows, cols, &mut a);
        kernels::gram_naive(&x, rows, cols, &mut b);
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(d / scale < 1e-5, "gram {rows}x{cols}: {d}");
    }
}

#[test]
fn sub_scaled_is_bit_identical_to_naive() {
    let mut rng = Rng(9);
    for n in [0usize, 1, 15, 16, 17, 127, 1000] {
        let x = rng.vec(n + 3, 2.0);
        let y0 = rng.vec(n, 1.0);
        let (mut a, mut b) = (y0.clone(), y0.clone());
        kernels::sub_scaled(&mut a, 0.37, &x);
        kernels::sub_scaled_naive(&mut b, 0.37, &x);
        assert_eq!(a, b, "n={n}");
        assert!(n == 0 || a != y0);
    }
}

/// Data-parallel passes (`lopper::util::Workers`, one job per single-thread pool) give the same
/// results as passes whose kernels use every thread only if each kernel's bits do not depend on
/// the number of threads: checked here in a one-thread pool against a four-thread pool.
#[test]
fn kernels_give_the_same_bits_in_any_pool() {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let mut rng = Rng(21);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let in_both = |f: &(dyn Fn() -> Vec<f32> + Sync)| (one.install(f), four.install(f));

    // Large enough to be split across threads (matmul_t goes parallel above 2^22 FLOPs).
    let (m, k, n) = (600, 576, 330);
    let x = rng.vec(m * k, 1.0);
    let w = rng.vec(n * k, 1.0);
    let (a, b) = in_both(&|| {
        let mut y = vec![0f32; m * n];
        kernels::matmul_t(&x, &w, &mut y, m, k, n, false);
        y
    });
    assert_eq!(bits(&a), bits(&b), "matmul_t");

    let (rows, cols) = (700, 400);
    let g = rng.vec(rows * cols, 1.0);
    let (a, b) = in_both(&|| {
        let mut y = vec![0f32; cols * cols];
        kernels::gram(&g, rows, cols, &mut y);
        y
    });
    assert_eq!(bits(&a), bits(&b), "gram");

    let d = AttnDims {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 32,
    };
    let t = 300;
    let (qw, kw) = (6 * 32, 2 * 32);
    let (q, kk, v) = (
        rng.vec(t * qw, 1.0),
        rng.vec(t * kw, 1.0),
        rng.vec(t * kw, 1.0),
    );
    let (a, b) = in_both(&|| {
        let mut out = vec![0f32; t * qw];
        kernels::causal_attention(&q, &kk, &v, &mut out, t, t, d, 0.17);
        out
    });
    assert_eq!(bits(&a), bits(&b), "causal_attention");
    let (a, b) = in_both(&|| {
        let mut out = vec![0f32; qw];
        kernels::causal_attention(&q[..qw], &kk, &v, &mut out, 1, t, d, 0.17);
        out
    });
    assert_eq!(bits(&a), bits(&b), "causal_attention, one decode row");

    let h = rng.vec(500 * 96, 3.0);
    let nw = rng.vec(96, 1.0);
    let (a, b) = in_both(&|| {
        let mut out = vec![0f32; h.len()];
        kernels::rmsnorm(&h, &nw, 1e-5, &mut out);
        let mut gate = h.clone();
        kernels::silu_mul(&mut gate, &out);
        out.extend(gate);
        out
    });
    assert_eq!(bits(&a), bits(&b), "rmsnorm, silu_mul");
}

//! Token pruning of long prompts (runtime/token_prune.rs): `--token-keep 1` is plain prefill bit
//! for bit; the tokens kept are the ones the last token attends to most (against an f64
//! reference of the scores); after revival the KV cache is complete and decoding runs on it;
//! bad kept fractions and unsupported models are refused.

mod common;
use common::*;
use lopper::kernels::attention::AttnDims;
use lopper::model::rope::Rope;
use lopper::runtime::token_prune::{
    check_keep, check_model, continuation_nll, generate_token_pruned, last_token_scores, prefill,
    revive, select, Revival, Schedule,
};
use lopper::runtime::{forward_step, generate, GenerateOpts, KvCache, SampleOpts};

fn tiny(name: &str) -> lopper::Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).unwrap()
}

fn opts(n: usize) -> GenerateOpts {
    GenerateOpts {
        max_new: n,
        sampling: SampleOpts::greedy(),
        stop_at_eos: false,
        stop_tokens: vec![],
    }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + seed * 101 + 11) % 320)
        .collect()
}

#[test]
fn keep_one_is_plain_prefill_bit_for_bit() {
    for name in ["tiny-llama3", "tiny-qwen2", "tiny-llama-tied-bias"] {
        let m = tiny(name);
        let p = prompt(57, 1);
        let sched = Schedule::new(m.weights.layers.len(), 1.0).unwrap();
        let mut plain = KvCache::new(&m, p.len());
        let want = forward_step(&m, &p, &mut plain).unwrap();
        let mut cache = KvCache::new(&m, p.len());
        let pf = prefill(&m, &p, &mut cache, &sched).unwrap();
        assert!(pf.aux.pos.is_empty(), "{name}: F = 1 dropped tokens");
        let got = lopper::model::forward::logits(&m.weights, &pf.hidden, 1);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{name}: first-token logits");
        for l in 0..m.weights.layers.len() {
            assert_eq!(
                bits(&cache.k[l]),
                bits(&plain.k[l]),
                "{name}: K of block {l}"
            );
            assert_eq!(
                bits(&cache.v[l]),
                bits(&plain.v[l]),
                "{name}: V of block {l}"
            );
        }
        let mut a = Vec::new();
        generate(&m, &p, &opts(24), &mut |t| a.push(t)).unwrap();
        let mut b = Vec::new();
        let st = generate_token_pruned(&m, &sched, Revival::Exact, &p, &opts(24), &mut |t| {
            b.push(t)
        })
        .unwrap();
        assert_eq!(a, b, "{name}: generated tokens");
        assert_eq!(st.kept_fraction, 1.0);
    }
}

/// f64 reference of the scores: block 0's q of the last token and k of every token from the
/// embeddings, per-head softmax, mean over heads.
fn naive_scores(m: &lopper::Model, p: &[u32]) -> Vec<f64> {
    let cfg = &m.config;
    let lw = &m.weights.layers[0];
    let (d, hd, n) = (cfg.hidden_size, cfg.head_dim, p.len());
    let h = lopper::model::forward::embed(&m.weights, p).unwrap();
    let mut xn = vec![0f32; h.len()];
    lopper::kernels::rmsnorm_dim_naive(
        &h,
        lw.attn_norm.data(),
        cfg.rms_norm_eps as f32,
        cfg.norm_dim(),
        &mut xn,
    );
    let proj = |lin: &lopper::model::weights::Linear| -> Vec<f32> {
        let (o, w) = (lin.weight.rows(), lin.weight.data());
        let mut y = vec![0f32; n * o];
        for r in 0..n {
            for j in 0..o {
                let mut s: f64 = (0..d)
                    .map(|c| xn[r * d + c] as f64 * w[j * d + c] as f64)
                    .sum();
                if let Some(b) = &lin.bias {
                    s += b.data()[j] as f64;
                }
                y[r * o + j] = s as f32;
            }
        }
        y
    };
    let (mut q, mut k) = (proj(&lw.q), proj(&lw.k));
    let (nh, nkv) = (lw.n_heads(hd), lw.n_kv_heads(hd));
    let rope = Rope::new(cfg, n);
    rope.apply(&mut q, nh, n, 0);
    rope.apply(&mut k, nkv, n, 0);
    let (qw, kw) = (nh * hd, nkv * hd);
    let mut acc = vec![0f64; n];
    for head in 0..nh {
        let g = head / (nh / nkv);
        let qi = &q[(n - 1) * qw + head * hd..(n - 1) * qw + (head + 1) * hd];
        let s: Vec<f64> = (0..n)
            .map(|j| {
                let kj = &k[j * kw + g * hd..j * kw + (g + 1) * hd];
                qi.iter()
                    .zip(kj)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    / (hd as f64).sqrt()
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
        for (a, x) in acc.iter_mut().zip(&s) {
            *a += (x - mx).exp() / z / nh as f64;
        }
    }
    acc
}

#[test]
fn keeps_the_tokens_the_last_token_attends_to_most() {
    for (name, f) in [
        ("tiny-llama3", 0.6f32),
        ("tiny-qwen2", 0.75),
        ("tiny-llama-tied-bias", 0.5),
    ] {
        let m = tiny(name);
        let p = prompt(90, 2);
        let sched = Schedule::new(3, f).unwrap();
        let counts = sched.counts(p.len());
        assert_eq!(counts[0], p.len());
        assert!(
            counts[1] < p.len() && counts[2] < counts[1],
            "{name}: {counts:?}"
        );
        let mut cache = KvCache::new(&m, p.len());
        let pf = prefill(&m, &p, &mut cache, &sched).unwrap();
        assert_eq!(pf.counts, counts);
        // Tokens dropped before block 1 were chosen from block 0's attention (all tokens ran it).
        let dropped: Vec<usize> = (0..pf.aux.pos.len())
            .filter(|&i| pf.aux.from_block[i] == 1)
            .map(|i| pf.aux.pos[i])
            .collect();
        assert_eq!(dropped.len(), p.len() - counts[1]);
        assert!(
            !dropped.contains(&(p.len() - 1)),
            "{name}: the last token was dropped"
        );
        let s = naive_scores(&m, &p);
        let kept_min = (0..p.len() - 1)
            .filter(|i| !dropped.contains(i))
            .map(|i| s[i])
            .fold(f64::INFINITY, f64::min);
        let dropped_max = dropped.iter().map(|&i| s[i]).fold(0.0, f64::max);
        assert!(
            kept_min >= dropped_max - 1e-6,
            "{name}: kept a token scored {kept_min} and dropped one scored {dropped_max}"
        );
        // Tokens dropped at block 2 were among those kept at block 1; each token dropped once.
        let mut all = pf.aux.pos.clone();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), pf.aux.pos.len());
        assert_eq!(pf.aux.pos.len(), p.len() - counts[2]);
        assert!(pf.aux.from_block.windows(2).all(|w| w[0] <= w[1]));
    }
}

#[test]
fn scores_and_selection_on_a_constructed_case() {
    // 2 KV heads, 4 query heads; key 3 is aligned with every query head, key 5 with half.
    let d = AttnDims {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
    };
    let m = 8;
    let mut k = vec![0f32; m * 8];
    let q_last = vec![1f32; 16];
    for g in 0..2 {
        k[3 * 8 + g * 4..3 * 8 + g * 4 + 4].fill(2.0);
    }
    k[5 * 8..5 * 8 + 4].fill(1.5);
    let s = last_token_scores(&q_last, &k, m, d, 1.0);
    let sum: f32 = s.iter().sum();
    assert!((sum - 1.0).abs() < 1e-5, "scores sum to {sum}");
    assert!(s[3] > s[5] && s[5] > s[0], "{s:?}");
    // f64 reference per entry.
    for (j, &got) in s.iter().enumerate() {
        let mut want = 0f64;
        for h in 0..4 {
            let g = h / 2;
            let dots: Vec<f64> = (0..m)
                .map(|r| (0..4).map(|c| k[r * 8 + g * 4 + c] as f64).sum::<f64>())
                .collect();
            let mx = dots.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = dots.iter().map(|x| (x - mx).exp()).sum();
            want += (dots[j] - mx).exp() / z / 4.0;
        }
        assert!((got as f64 - want).abs() < 1e-5, "key {j}: {got} vs {want}");
    }
    assert_eq!(select(&s, 3), vec![3, 5, 7]);
    assert_eq!(select(&s, 1), vec![7]);
    // The last index is kept even when it scores lowest.
    assert_eq!(select(&[0.5, 0.4, 0.1], 2), vec![0, 2]);
}

#[test]
fn revival_completes_the_cache_and_decoding_runs_on_it() {
    let m = tiny("tiny-llama3");
    let p = prompt(80, 3);
    let sched = Schedule::new(3, 0.6).unwrap();
    let mut cache = KvCache::new(&m, p.len() + 8);
    for b in cache.k.iter_mut().chain(cache.v.iter_mut()) {
        b.fill(f32::NAN);
    }
    let pf = prefill(&m, &p, &mut cache, &sched).unwrap();
    let kw = cache.kv_width[0];
    let missing = |c: &KvCache| -> usize {
        (0..3)
            .map(|l| {
                (0..p.len())
                    .filter(|&r| c.k[l][r * kw..(r + 1) * kw].iter().any(|x| x.is_nan()))
                    .count()
            })
            .sum()
    };
    // Every token ran block 0; dropped tokens miss the rows from their drop block on.
    let expect: usize = pf.aux.from_block.iter().map(|&b| 3 - b).sum();
    assert!(expect > 0);
    assert_eq!(missing(&cache), expect);
    let before = cache.k.clone();
    revive(&m, &pf.aux, &mut cache, Revival::Propagate).unwrap();
    assert_eq!(missing(&cache), 0, "rows still empty after revival");
    assert!(cache
        .v
        .iter()
        .all(|b| b[..p.len() * kw].iter().all(|x| x.is_finite())));
    // Rows the prefill wrote are untouched; revived rows are the frozen state's K.
    for (old, now) in before.iter().zip(&cache.k) {
        for r in 0..p.len() {
            let row = |c: &[f32]| c[r * kw..(r + 1) * kw].to_vec();
            if !old[r * kw].is_nan() {
                assert_eq!(row(now), row(old));
            }
        }
    }
    let (i, l) = (0, 2);
    let (pos, hid) = (pf.aux.pos[i], &pf.aux.hidden[..m.config.hidden_size]);
    let lw = &m.weights.layers[l];
    let mut xn = vec![0f32; hid.len()];
    lopper::kernels::rmsnorm_dim_naive(
        hid,
        lw.attn_norm.data(),
        m.config.rms_norm_eps as f32,
        m.config.norm_dim(),
        &mut xn,
    );
    let mut k = vec![0f32; kw];
    lopper::model::forward::linear(&lw.k, &xn, 1, &mut k, false);
    Rope::new(&m.config, p.len()).apply(&mut k, kw / m.config.head_dim, 1, pos);
    let got = &cache.k[l][pos * kw..(pos + 1) * kw];
    for (a, b) in got.iter().zip(&k) {
        assert!((a - b).abs() < 1e-4, "revived K of token {pos}, block {l}");
    }
    // Decoding continues on the complete cache.
    let lg = forward_step(&m, &[5], &mut cache).unwrap();
    assert!(lg.iter().all(|x| x.is_finite()));
    let mut out = Vec::new();
    let st = generate_token_pruned(&m, &sched, Revival::Exact, &p, &opts(8), &mut |t| {
        out.push(t)
    })
    .unwrap();
    assert_eq!(out.len(), 8);
    assert!(
        (st.kept_fraction - 0.6).abs() < 0.05,
        "{}",
        st.kept_fraction
    );
    // The evaluation path: F = 1 scores the continuation as a plain pass does.
    let win = prompt(120, 4);
    let (nll, kept) = continuation_nll(
        &m,
        &Schedule::new(3, 1.0).unwrap(),
        Revival::Exact,
        &win,
        100,
    )
    .unwrap();
    assert_eq!((nll.len(), kept), (20, 1.0));
    let full = lopper::model::forward::forward_logits(&m, &win).unwrap();
    let v = full.len() / win.len();
    for (j, x) in nll.iter().enumerate() {
        let row = &full[(99 + j) * v..(100 + j) * v];
        let want = lopper::kernels::logsumexp(row) - row[win[100 + j] as usize] as f64;
        assert!(
            (x - want).abs() < 1e-3,
            "position {}: {x} vs {want}",
            100 + j
        );
    }
}

#[test]
fn schedule_and_refusals() {
    for f in [0.0f32, -0.1, 1.5, f32::NAN] {
        assert!(check_keep(f).is_err(), "{f} accepted");
    }
    for f in [0.3f32, 0.5, 0.7, 0.9, 1.0] {
        let s = Schedule::new(30, f).unwrap();
        let mean = s.keep.iter().sum::<f64>() / 30.0;
        assert!((mean - f as f64).abs() < 1e-6, "F {f}: mean {mean}");
        assert!(s.keep[..5].iter().all(|&k| k == 1.0));
        assert!(s.keep.windows(2).all(|w| w[1] <= w[0]));
        let c = s.counts(4096);
        assert!(c.windows(2).all(|w| w[1] <= w[0]) && c[29] >= 1);
    }
    let e = Schedule::new(30, 0.1).unwrap_err().to_string();
    assert!(e.contains("--token-keep"), "{e}");
    let dir = std::env::temp_dir().join(format!("lopper-tok-win-{}", std::process::id()));
    let w = tiny_mistral_windowed(&dir, 16);
    let e = check_model(&w).unwrap_err().to_string();
    assert!(e.contains("sliding-window"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_refuses_bad_token_keep() {
    let bin = env!("CARGO_BIN_EXE_lopper");
    let cases: [&[&str]; 5] = [
        &["run", "--prompt", "x", "--token-keep", "0"],
        &["run", "--prompt", "x", "--token-keep", "1.2"],
        &["eval", "--token-keep", "-0.5"],
        &["bench", "--token-keep", "0.5,2"],
        &[
            "run",
            "--prompt",
            "x",
            "--token-keep",
            "0.5",
            "--early-exit",
            "0.9",
        ],
    ];
    for args in cases {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains("--token-keep"), "{args:?}: {err}");
    }
    let out = std::process::Command::new(bin)
        .args(["eval", "--continuation", "100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--continuation needs --token-keep"));
    let out = std::process::Command::new(bin)
        .args(["run", "--prompt", "x", "--token-revive", "exact"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-revive needs --token-keep"));
    let out = std::process::Command::new(bin)
        .args([
            "run",
            "--prompt",
            "x",
            "--token-keep",
            "0.5",
            "--token-revive",
            "lazy",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exact or propagate"));
}

#[test]
fn attention_at_positions_matches_naive() {
    let d = AttnDims {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
    };
    let (qw, kw, tk) = (32, 16, 300);
    let val =
        |i: usize, s: u32| (((i as u32).wrapping_mul(2654435761) ^ s) % 1000) as f32 / 500.0 - 1.0;
    // Query rows at scattered ascending positions, more than one 128-row block.
    let pos: Vec<usize> = (0..tk).filter(|p| p % 3 != 1 || *p < 20).collect();
    let q: Vec<f32> = (0..pos.len() * qw).map(|i| val(i, 7)).collect();
    let k: Vec<f32> = (0..tk * kw).map(|i| val(i, 11)).collect();
    let v: Vec<f32> = (0..tk * kw).map(|i| val(i, 13)).collect();
    let (mut got, mut want) = (vec![0f32; q.len()], vec![0f32; q.len()]);
    use lopper::kernels::attention::{causal_attention_at, causal_attention_at_naive};
    causal_attention_at(&q, &k, &v, &mut got, &pos, tk, d, 0.35);
    causal_attention_at_naive(&q, &k, &v, &mut want, &pos, tk, d, 0.35);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "entry {i}: {a} vs {b}");
    }
    // Contiguous positions are plain causal attention.
    let tq = 40;
    let pos: Vec<usize> = (tk - tq..tk).collect();
    let mut plain = vec![0f32; tq * qw];
    lopper::kernels::causal_attention(&q[..tq * qw], &k, &v, &mut plain, tq, tk, d, 0.35);
    let mut at = vec![0f32; tq * qw];
    causal_attention_at(&q[..tq * qw], &k, &v, &mut at, &pos, tk, d, 0.35);
    assert_eq!(plain, at);
}

/// Exact revival runs each dropped token through its remaining blocks against every position:
/// recomputing a dropped token alone, block by block against the revived cache (the cached
/// single-row forward), reproduces the K/V revival wrote for it.
#[test]
fn exact_revival_is_each_dropped_token_run_against_the_full_cache() {
    let m = tiny("tiny-llama-tied-bias");
    let p = prompt(70, 5);
    let sched = Schedule::new(3, 0.5).unwrap();
    let mut cache = KvCache::new(&m, p.len());
    let pf = prefill(&m, &p, &mut cache, &sched).unwrap();
    revive(&m, &pf.aux, &mut cache, Revival::Exact).unwrap();
    let (cfg, d) = (&m.config, m.config.hidden_size);
    let kw = cache.kv_width[0];
    let rope = Rope::new(cfg, p.len());
    let mut s = lopper::model::forward::Scratch::default();
    let mut order: Vec<usize> = (0..pf.aux.pos.len()).collect();
    order.sort_by_key(|&i| pf.aux.pos[i]);
    let mut checked = 0;
    for i in order {
        let (pos, b) = (pf.aux.pos[i], pf.aux.from_block[i]);
        let mut h = pf.aux.hidden[i * d..(i + 1) * d].to_vec();
        for l in b..3 {
            let row = |c: &[f32]| c[pos * kw..(pos + 1) * kw].to_vec();
            let (want_k, want_v) = (row(&cache.k[l]), row(&cache.v[l]));
            let slot = lopper::model::forward::KvSlot {
                k: &mut cache.k[l],
                v: &mut cache.v[l],
                pos0: pos,
            };
            lopper::model::forward::block_forward_cached(
                cfg,
                l,
                &m.weights.layers[l],
                &rope,
                &mut h,
                1,
                1,
                &mut s,
                &mut lopper::model::observer::NoObserver,
                Some(slot),
            );
            let (got_k, got_v) = (row(&cache.k[l]), row(&cache.v[l]));
            for (a, w) in got_k.iter().zip(&want_k).chain(got_v.iter().zip(&want_v)) {
                assert!((a - w).abs() < 1e-4, "token {pos}, block {l}: {a} vs {w}");
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "{checked}");
}

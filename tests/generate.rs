//! Generation with a KV cache: greedy output equals transformers' (128 tokens), cached chunked
//! forward steps equal the full forward pass, sampling is seeded and filters as documented, and
//! `lopper run` works end to end and rejects bad flags.

mod common;
use common::*;
use lopper::model::forward::forward_logits;
use lopper::runtime::sample::{argmax, distribution};
use lopper::runtime::{
    forward_step, forward_step_all, generate, GenerateOpts, KvCache, SampleOpts, Sampler,
    StopReason,
};
use std::process::Command;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The golden prompt and transformers' 128 greedy tokens.
fn golden_greedy() -> (Vec<u32>, Vec<u32>) {
    let path = golden().join("smollm2_greedy_wiki32.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    (ids("prompt_ids"), ids("greedy_new_ids"))
}

/// Greedy generation of `n` tokens (eos cannot stop it: transformers ran with
/// min_new_tokens = 128).
fn greedy(
    model: &lopper::Model,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, lopper::runtime::GenerateStats) {
    let opts = GenerateOpts {
        max_new: n,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut got = Vec::new();
    let stats = generate(model, prompt, &opts, &mut |t| got.push(t)).unwrap();
    (got, stats)
}

#[test]
fn greedy_reproduces_transformers_128_tokens() {
    let (prompt, want) = golden_greedy();
    let (got, stats) = greedy(default_model(), &prompt, want.len());
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "first differing token at {first_bad:?}");
    assert_eq!(got, want);
    assert_eq!(stats.new_tokens, 128);
    assert_eq!(stats.decode_steps, 127);
    assert_eq!(stats.stop, StopReason::MaxNew);
    eprintln!(
        "prefill {:.1} tokens/s, decode {:.1} tokens/s",
        stats.prefill_tokens_per_s, stats.decode_tokens_per_s
    );
}

/// Greedy steps through the LM head's int8 argmax screen pick the tokens the full head picks:
/// transformers' 128 for the f32 head, the unscreened run's for a bf16 head, while computing
/// only a handful of the 49152 head rows exactly per step; seeded top-k sampling through the
/// screen draws the same tokens as through the full head.
#[test]
#[ignore = "real model"]
fn head_screen_keeps_greedy_tokens() {
    use lopper::runtime::{pack, FormatChoice, PackOpts};
    let (prompt, want) = golden_greedy();
    for choice in [FormatChoice::Dense, FormatChoice::Bf16] {
        let mut m = lopper::Model {
            config: default_model().config.clone(),
            weights: default_model().weights.clone(),
            tokenizer: None,
            chat_template: None,
            source: default_model().source.clone(),
        };
        pack::pack(&mut m, &PackOpts::new(choice)).unwrap();
        let screen = m
            .weights
            .lm_head_screen
            .clone()
            .expect("a dense head gets a screen");
        let (got, _) = greedy(&m, &prompt, want.len());
        let (calls, rows) = screen.counts();
        assert_eq!(calls as usize, want.len(), "{choice}: every step screened");
        let mean = rows as f64 / calls as f64;
        eprintln!("{choice}: {mean:.1} exact head rows per step");
        assert!(mean < 100.0, "{choice}: {mean} exact rows per step");
        // Seeded top-k sampling sees only the k largest logits: the same tokens too.
        let sampled = |m: &lopper::Model| {
            let opts = GenerateOpts {
                max_new: 48,
                stop_at_eos: false,
                sampling: SampleOpts {
                    temperature: 0.9,
                    top_k: 40,
                    top_p: 0.95,
                    seed: 11,
                },
                ..Default::default()
            };
            let mut got = Vec::new();
            generate(m, &prompt, &opts, &mut |t| got.push(t)).unwrap();
            got
        };
        let top_k = sampled(&m);
        let (calls2, rows2) = screen.counts();
        assert_eq!(calls2 - calls, 48, "{choice}: every top-k step screened");
        let mean_k = (rows2 - rows) as f64 / 48.0;
        eprintln!("{choice}: {mean_k:.1} exact head rows per top-40 step");
        assert!(
            mean_k < 2000.0,
            "{choice}: {mean_k} exact rows per top-40 step"
        );
        m.weights.lm_head_screen = None;
        let (full, _) = greedy(&m, &prompt, want.len());
        assert_eq!(got, full, "{choice}: screened vs full head");
        assert_eq!(top_k, sampled(&m), "{choice}: top-k, screened vs full head");
        if choice == FormatChoice::Dense {
            assert_eq!(got, want, "{choice}: vs transformers");
        }
    }
}

/// Feed `ids` in chunks of `chunks` sizes (the last repeated) and compare every position's
/// logits with the full forward pass.
fn chunked_vs_full(model: &lopper::Model, ids: &[u32], chunks: &[usize], tol: f32) {
    let full = forward_logits(model, ids).unwrap();
    let vocab = full.len() / ids.len();
    let mut cache = KvCache::new(model, ids.len());
    let mut pos = 0;
    let mut i = 0;
    while pos < ids.len() {
        let n = chunks[i.min(chunks.len() - 1)].min(ids.len() - pos);
        let before = cache.len;
        let all = if i % 2 == 0 {
            forward_step_all(model, &ids[pos..pos + n], &mut cache).unwrap()
        } else {
            // The last-position variant must agree with the full pass too.
            let last = forward_step(model, &ids[pos..pos + n], &mut cache).unwrap();
            let want = &full[(pos + n - 1) * vocab..(pos + n) * vocab];
            let d = max_diff(&last, want);
            assert!(d <= tol, "forward_step last logits at {}: {d}", pos + n - 1);
            pos += n;
            i += 1;
            assert_eq!(cache.len, before + n);
            continue;
        };
        assert_eq!(cache.len, before + n);
        let d = max_diff(&all, &full[pos * vocab..(pos + n) * vocab]);
        assert!(d <= tol, "chunk at {pos}+{n}: max |Δlogit| {d}");
        pos += n;
        i += 1;
    }
    assert_eq!(cache.len, ids.len());
    // A full cache refuses more tokens.
    assert!(forward_step(model, &[ids[0]], &mut cache).is_err());
}

#[test]
fn kv_cache_chunks_match_full_forward_tiny() {
    for name in [
        "tiny-llama3",
        "tiny-llama-tied-bias",
        "tiny-qwen2",
        "tiny-mistral",
    ] {
        let dir = golden().join("tiny").join(name);
        let model = lopper::io::load_model(&dir).unwrap();
        let g = read_safetensors(&dir.join("golden_logits.safetensors"));
        let t = g["input_ids"].shape[1];
        let ids: Vec<u32> = g["input_ids"].i64[..t].iter().map(|&v| v as u32).collect();
        chunked_vs_full(&model, &ids, &[7, 1], 1e-4);
        chunked_vs_full(&model, &ids, &[1], 1e-4);
        chunked_vs_full(&model, &ids, &[3, 5, 2], 1e-4);
    }
}

/// Sliding-window attention through the KV cache: token-by-token decode and chunked prefill of
/// tiny-mistral with a window of 16 match the full pass, and the decoded logits match the NumPy
/// reference (scripts/sliding_window_ref.py) directly.
#[test]
fn kv_cache_sliding_window_tiny_mistral() {
    let fx = window_fixture();
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_mistral_windowed(tmp.path(), fx.window);
    let t = fx.ids.shape[1];
    let vocab = fx.logits.shape[2];
    for row in 0..fx.ids.shape[0] {
        let ids: Vec<u32> = fx.ids.i64[row * t..(row + 1) * t]
            .iter()
            .map(|&v| v as u32)
            .collect();
        chunked_vs_full(&model, &ids, &[1], 1e-4);
        chunked_vs_full(&model, &ids, &[20, 3, 40], 1e-4);
        let mut cache = KvCache::new(&model, t);
        let mut decoded = Vec::with_capacity(t * vocab);
        for &id in &ids {
            decoded.extend(forward_step_all(&model, &[id], &mut cache).unwrap());
        }
        let d = window_fixture_diff(&fx, row, &decoded);
        assert!(d <= 1e-4, "row {row}: decode vs reference max |Δlogit| {d}");
    }
}

#[test]
fn kv_cache_chunks_match_full_forward_smollm2() {
    let g = read_safetensors(&golden().join("smollm2_forward.safetensors"));
    let ids: Vec<u32> = g["input_ids"].i64[..24].iter().map(|&v| v as u32).collect();
    chunked_vs_full(default_model(), &ids, &[7, 1], 1e-4);
}

#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() {
    let mut logits: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    logits[123] = 50.0;
    let o = SampleOpts {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        seed: 42,
    };
    let run = |o: SampleOpts| {
        let mut s = Sampler::new(o).unwrap();
        (0..200).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
    };
    let soft: Vec<f32> = logits.iter().map(|v| v / 20.0).collect();
    let run_soft = |o: SampleOpts| {
        let mut s = Sampler::new(o).unwrap();
        (0..200).map(|_| s.sample(&soft)).collect::<Vec<u32>>()
    };
    assert_eq!(run(o), run(o));
    assert_eq!(run_soft(o), run_soft(o));
    assert_ne!(
        run_soft(o),
        run_soft(SampleOpts { seed: 43, ..o }),
        "different seeds should differ"
    );
    let top1 = SampleOpts { top_k: 1, ..o };
    assert!(run_soft(top1).iter().all(|&t| t == argmax(&soft)));
    assert!(run_soft(SampleOpts::greedy()).iter().all(|&t| t == 123));
    assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);

    // On the real model, top-k = 1 with a temperature generates the greedy continuation.
    let model = default_model();
    let prompt = [504u32, 3575, 282, 4649, 314]; // any ids
    let gen = |s: SampleOpts| {
        let mut out = vec![];
        let opts = GenerateOpts {
            max_new: 6,
            sampling: s,
            stop_at_eos: false,
            ..Default::default()
        };
        generate(model, &prompt, &opts, &mut |t| out.push(t)).unwrap();
        out
    };
    assert_eq!(
        gen(SampleOpts {
            temperature: 0.7,
            top_k: 1,
            top_p: 1.0,
            seed: 9
        }),
        gen(SampleOpts::greedy())
    );
    let sampled = SampleOpts {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        seed: 5,
    };
    assert_eq!(gen(sampled), gen(sampled));
}

#[test]
fn sampling_distribution_matches_softmax_and_filters() {
    // p ∝ exp(l / T) over [ln 4, ln 2, ln 1, ln 1] at T = 1 → 0.5, 0.25, 0.125, 0.125.
    let logits = [1f32.ln(), 4f32.ln(), 1f32.ln(), 2f32.ln()];
    let o = SampleOpts {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 1,
    };
    let d = distribution(&logits, &o);
    let ids: Vec<u32> = d.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![1, 3, 0, 2]);
    for (x, want) in d.iter().zip([0.5, 0.25, 0.125, 0.125]) {
        assert!((x.1 - want).abs() < 1e-6, "{d:?}");
    }
    // Temperature 2: p ∝ sqrt(4, 2, 1, 1).
    let d2 = distribution(
        &logits,
        &SampleOpts {
            temperature: 2.0,
            ..o
        },
    );
    let z = 2.0 + 2f64.sqrt() + 2.0;
    assert!((d2[0].1 - 2.0 / z).abs() < 1e-6);
    // top-p 0.7: 0.5 + 0.25 reaches it → {1, 3}, renormalised to 2/3, 1/3; the tail is excluded.
    let dp = distribution(&logits, &SampleOpts { top_p: 0.7, ..o });
    assert_eq!(dp.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((dp[0].1 - 2.0 / 3.0).abs() < 1e-6);
    // top-p 0.5 keeps only the first; top-k 3 drops the last.
    assert_eq!(
        distribution(&logits, &SampleOpts { top_p: 0.5, ..o }).len(),
        1
    );
    assert_eq!(
        distribution(&logits, &SampleOpts { top_k: 3, ..o }).len(),
        3
    );

    // Empirical frequencies of 40 000 draws are within 1% of the distribution.
    let n = 40_000;
    let mut counts = [0usize; 4];
    let mut s = Sampler::new(o).unwrap();
    for _ in 0..n {
        counts[s.sample(&logits) as usize] += 1;
    }
    for (t, want) in [(1, 0.5), (3, 0.25), (0, 0.125), (2, 0.125)] {
        let f = counts[t] as f64 / n as f64;
        assert!(
            (f - want).abs() < 0.01,
            "token {t}: frequency {f}, expected {want}"
        );
    }
    let mut s = Sampler::new(SampleOpts { top_p: 0.7, ..o }).unwrap();
    for _ in 0..5000 {
        let t = s.sample(&logits);
        assert!(t == 1 || t == 3, "top-p sampled tail token {t}");
    }

    // Bad settings are rejected.
    for bad in [
        SampleOpts {
            temperature: -0.5,
            ..o
        },
        SampleOpts {
            temperature: f32::NAN,
            ..o
        },
        SampleOpts { top_p: 0.0, ..o },
        SampleOpts { top_p: 1.5, ..o },
    ] {
        assert!(Sampler::new(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn stop_tokens_end_generation() {
    let model = default_model();
    let prompt = [504u32, 3575, 282, 4649, 314];
    let mut free = vec![];
    let opts = GenerateOpts {
        max_new: 5,
        stop_at_eos: false,
        ..Default::default()
    };
    generate(model, &prompt, &opts, &mut |t| free.push(t)).unwrap();
    // Stopping at the third greedy token yields the first two.
    let opts = GenerateOpts {
        max_new: 5,
        stop_at_eos: false,
        stop_tokens: vec![free[2]],
        ..Default::default()
    };
    let mut got = vec![];
    let st = generate(model, &prompt, &opts, &mut |t| got.push(t)).unwrap();
    let cut = free.iter().position(|&t| t == free[2]).unwrap();
    assert_eq!(got, free[..cut].to_vec());
    assert_eq!(st.stop, StopReason::StopToken(free[2]));
    let opts = GenerateOpts {
        max_new: 0,
        ..Default::default()
    };
    let st = generate(model, &prompt, &opts, &mut |_| panic!("no tokens expected")).unwrap();
    assert_eq!(st.new_tokens, 0);
}

#[test]
fn text_stream_rebuilds_the_decoded_text() {
    let model = default_model();
    let tok = model.tokenizer().unwrap();
    let text = "Zürich — naïve café 東京 🦀 done.";
    let all = tok.encode_fast(text, false).unwrap().get_ids().to_vec();
    let (prompt, rest) = all.split_at(2);
    let mut s = lopper::runtime::TextStream::new(tok, prompt, true);
    let mut out = String::new();
    for &id in rest {
        let piece = s.push(id);
        assert!(!piece.contains('\u{FFFD}'), "cut character in {piece:?}");
        out += &piece;
    }
    let head = tok.decode(prompt, true).unwrap();
    assert_eq!(format!("{head}{out}"), tok.decode(&all, true).unwrap());
}

fn lopper(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .expect("start lopper");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_run_generates_text() {
    default_model(); // fetch once
    let (code, out, err) = lopper(&[
        "run",
        "--prompt",
        "The capital of France is",
        "--max-new",
        "8",
    ]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(out.trim().len() >= 2, "no text: {out:?}");
    assert!(err.contains("tokens/s"), "no stats: {err}");
    // Greedy text through the head screen (the default) equals the full head's.
    let (code, full, err) = lopper(&[
        "run",
        "--prompt",
        "The capital of France is",
        "--max-new",
        "8",
        "--no-head-screen",
    ]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, full);
    let (code, out, err) = lopper(&[
        "run",
        "--prompt",
        "What is 2+2?",
        "--max-new",
        "8",
        "--chat",
        "--temperature",
        "0.7",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ]);
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(!out.trim().is_empty());
}

#[test]
fn cli_run_rejects_bad_flags() {
    for (args, msg) in [
        (&["--temperature", "-1"][..], "--temperature"),
        (&["--top-p", "0"][..], "--top-p"),
        (&["--top-p", "1.5"][..], "--top-p"),
        (&["--top-p", "-0.2"][..], "--top-p"),
        (&["--max-new", "-3"][..], "--max-new"),
        (&["--top-k", "-1"][..], "--top-k"),
    ] {
        let mut a = vec!["run", "--prompt", "hi"];
        a.extend(args);
        let (code, out, err) = lopper(&a);
        assert!(
            code.is_some() && code != Some(0),
            "{args:?} exited {code:?}"
        );
        assert!(
            err.contains(msg),
            "{args:?}: error does not name {msg}: {err}"
        );
        assert!(out.is_empty(), "{args:?} printed {out:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // --chat on a model without a chat template fails clearly.
    let tiny = golden().join("tiny").join("tiny-llama3");
    let (code, _, err) = lopper(&[
        "run",
        "--prompt",
        "hi",
        "--chat",
        "--model",
        tiny.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error"), "{err}");
}

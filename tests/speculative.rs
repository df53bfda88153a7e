//! Speculative decoding (runtime/speculative.rs): greedy output identical to plain decoding on
//! tiny models (every skip set, draft lengths across verify chunks, adaptive or not, a model
//! draft) and on the golden 128-token continuation; sampling exact in distribution (the joint
//! of three tokens against the target's exact probabilities, chi-square, and the same test
//! rejecting the draft's); the acceptance rule alone; the adaptive controller falling back to
//! plain steps when the draft accepts nothing; bad drafts refused.

mod common;
use common::*;
use lopper::model::forward::forward_logits;
use lopper::runtime::sample::distribution;
use lopper::runtime::speculative::{
    accept_or_resample, generate_speculative, Draft, KController, SpecOpts,
};
use lopper::runtime::{generate, GenerateOpts, SampleOpts, Sampler};
use std::collections::HashMap;

fn tiny(name: &str) -> lopper::Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).unwrap()
}

fn opts(n: usize, sampling: SampleOpts) -> GenerateOpts {
    GenerateOpts {
        max_new: n,
        sampling,
        stop_at_eos: false,
        stop_tokens: vec![],
    }
}

fn plain(model: &lopper::Model, prompt: &[u32], o: &GenerateOpts) -> Vec<u32> {
    let mut got = Vec::new();
    generate(model, prompt, o, &mut |t| got.push(t)).unwrap();
    got
}

fn spec(
    model: &lopper::Model,
    draft: &Draft,
    prompt: &[u32],
    o: &GenerateOpts,
    s: SpecOpts,
) -> (Vec<u32>, lopper::runtime::speculative::SpecStats) {
    let mut got = Vec::new();
    let st = generate_speculative(model, draft, prompt, o, &s, &mut |t| got.push(t)).unwrap();
    (got, st)
}

fn skip_set(n: usize, skipped: &[usize]) -> Vec<bool> {
    (0..n).map(|i| skipped.contains(&i)).collect()
}

#[test]
fn greedy_identical_on_tiny_models() {
    let prompt: Vec<u32> = vec![5, 17, 250, 3, 99, 42, 7, 300];
    for name in [
        "tiny-llama3",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-llama-tied-bias",
    ] {
        let m = tiny(name);
        let n = m.weights.layers.len();
        let o = opts(48, SampleOpts::greedy());
        let want = plain(&m, &prompt, &o);
        let mut drafted = 0;
        for skipped in [vec![0], vec![1], vec![n - 1], vec![0, 2]] {
            for max_draft in [1, 3, 4, 7] {
                for adaptive in [false, true] {
                    let d = Draft::SelfSkip(skip_set(n, &skipped));
                    let s = SpecOpts {
                        max_draft,
                        adaptive,
                    };
                    let (got, st) = spec(&m, &d, &prompt, &o, s);
                    assert_eq!(
                        got, want,
                        "{name} skip {skipped:?} k {max_draft} adaptive {adaptive}"
                    );
                    assert_eq!(st.generate.new_tokens, 48);
                    assert!(st.accepted <= st.drafted);
                    drafted += st.drafted;
                }
            }
        }
        assert!(drafted > 0, "{name}: no round drafted anything");
        // The target as its own draft (another cache): every draft token is accepted.
        let (got, st) = spec(
            &m,
            &Draft::Model(&m),
            &prompt,
            &o,
            SpecOpts {
                max_draft: 5,
                adaptive: false,
            },
        );
        assert_eq!(got, want, "{name}: self as model draft");
        assert!(st.rounds > 0);
        assert_eq!(
            st.accepted, st.drafted,
            "{name}: an identical draft is always accepted"
        );
    }
    // Another model with the same vocabulary (320) as draft: different tokens proposed, the
    // target's kept.
    let (t, d) = (tiny("tiny-llama3"), tiny("tiny-qwen2"));
    let o = opts(40, SampleOpts::greedy());
    let want = plain(&t, &prompt, &o);
    let (got, st) = spec(
        &t,
        &Draft::Model(&d),
        &prompt,
        &o,
        SpecOpts {
            max_draft: 4,
            adaptive: false,
        },
    );
    assert_eq!(got, want);
    assert!(
        st.accepted < st.drafted,
        "an unrelated draft agrees everywhere?"
    );
}

/// Stop tokens and the context end as in plain generation.
#[test]
fn stops_like_plain_generation() {
    let m = tiny("tiny-llama3");
    let prompt: Vec<u32> = vec![1, 2, 3, 4];
    let all = plain(&m, &prompt, &opts(30, SampleOpts::greedy()));
    let stop = all[12];
    let mut o = opts(30, SampleOpts::greedy());
    o.stop_tokens = vec![stop];
    let want = plain(&m, &prompt, &o);
    let d = Draft::SelfSkip(skip_set(3, &[1]));
    let (got, st) = spec(
        &m,
        &d,
        &prompt,
        &o,
        SpecOpts {
            max_draft: 5,
            adaptive: false,
        },
    );
    assert_eq!(got, want);
    assert_eq!(
        st.generate.stop,
        lopper::runtime::StopReason::StopToken(stop)
    );
}

/// Count of each `(x1, x2, x3)` and the exact probability of each under `model`.
fn exact_joint(model: &lopper::Model, prompt: &[u32], s: &SampleOpts) -> HashMap<Vec<u32>, f64> {
    let mut out = HashMap::new();
    let step = |ids: &[u32]| {
        let l = forward_logits(model, ids).unwrap();
        let v = l.len() / ids.len();
        distribution(&l[l.len() - v..], s)
    };
    for (a, pa) in step(prompt) {
        let p1: Vec<u32> = prompt.iter().copied().chain([a]).collect();
        for (b, pb) in step(&p1) {
            let p2: Vec<u32> = p1.iter().copied().chain([b]).collect();
            for (c, pc) in step(&p2) {
                out.insert(vec![a, b, c], pa * pb * pc);
            }
        }
    }
    out
}

/// Pearson chi-square of `counts` (n samples) against `probs`, cells with expected count < 5
/// pooled into one; returns (statistic, degrees of freedom).
fn chi_square(
    counts: &HashMap<Vec<u32>, usize>,
    probs: &HashMap<Vec<u32>, f64>,
    n: usize,
) -> (f64, usize) {
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (k, &p) in probs {
        let e = p * n as f64;
        let o = *counts.get(k).unwrap_or(&0) as f64;
        if e < 5.0 {
            pool_o += o;
            pool_e += e;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    // Samples outside the support of `probs` land in the pool too.
    pool_o += counts
        .iter()
        .filter(|(k, _)| !probs.contains_key(*k))
        .map(|(_, &c)| c as f64)
        .sum::<f64>();
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    } else if pool_o > 0.0 {
        stat = f64::INFINITY;
    }
    (stat, cells.saturating_sub(1))
}

/// Three sampled tokens (the second and third from draft rounds) follow the target's joint
/// distribution: chi-square below the 1e-6 tail; against the draft's own joint the same samples
/// are rejected (the test can tell the two apart).
#[test]
fn sampling_matches_target_distribution() {
    let m = tiny("tiny-llama3");
    let prompt: Vec<u32> = vec![11, 200, 31, 4, 150];
    let skip = skip_set(3, &[1, 2]);
    let s = SampleOpts {
        temperature: 1.0,
        top_k: 4,
        top_p: 1.0,
        seed: 0,
    };
    let p = exact_joint(&m, &prompt, &s);
    // The draft as a model: the target with blocks 1, 2 removed.
    let mut dm = tiny("tiny-llama3");
    dm.weights.layers.truncate(1);
    dm.config.num_hidden_layers = 1;
    let q = exact_joint(&dm, &prompt, &s);
    let n = 6000;
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    let (mut drafted, mut accepted) = (0, 0);
    for seed in 0..n as u64 {
        // Four tokens: the first from the prefill, then a round of two drafts (and its
        // correction or bonus token; after an early rejection, a second round); the first
        // three are compared.
        let o = opts(4, SampleOpts { seed, ..s });
        let (got, st) = spec(
            &m,
            &Draft::SelfSkip(skip.clone()),
            &prompt,
            &o,
            SpecOpts {
                max_draft: 2,
                adaptive: false,
            },
        );
        drafted += st.drafted;
        accepted += st.accepted;
        *counts.entry(got[..3].to_vec()).or_default() += 1;
    }
    assert!(drafted >= 2 * n, "every run drafts at least two tokens");
    assert!(
        accepted > 0 && accepted < drafted,
        "acceptance {accepted}/{drafted}"
    );
    let (chi, dof) = chi_square(&counts, &p, n);
    // chi-square 1e-6 upper tail ≈ dof + 5.1·sqrt(2·dof) + 12 for these dof (Wilson–Hilferty).
    let crit = |d: usize| d as f64 + 5.1 * (2.0 * d as f64).sqrt() + 12.0;
    eprintln!(
        "target: chi2 {chi:.1} dof {dof} (critical {:.1}); acceptance {accepted}/{drafted}",
        crit(dof)
    );
    assert!(
        chi < crit(dof),
        "speculative samples differ from the target: chi2 {chi:.1}, dof {dof}"
    );
    let (chi_q, dof_q) = chi_square(&counts, &q, n);
    eprintln!("draft: chi2 {chi_q:.1} dof {dof_q}");
    assert!(
        chi_q > crit(dof_q),
        "the test cannot tell the draft's distribution from the target's"
    );
    // Drafts sampled from the same skipped blocks really follow q (a model draft with its own
    // cache gives the same exactness).
    let mut counts2: HashMap<Vec<u32>, usize> = HashMap::new();
    for seed in 0..n as u64 {
        let o = opts(
            4,
            SampleOpts {
                seed: seed + 1_000_000,
                ..s
            },
        );
        let (got, _) = spec(
            &m,
            &Draft::Model(&dm),
            &prompt,
            &o,
            SpecOpts {
                max_draft: 2,
                adaptive: false,
            },
        );
        *counts2.entry(got[..3].to_vec()).or_default() += 1;
    }
    let (chi2, dof2) = chi_square(&counts2, &p, n);
    assert!(chi2 < crit(dof2), "model draft: chi2 {chi2:.1}, dof {dof2}");
}

/// The acceptance rule on fixed p, q: x ~ q, then accept or resample, gives p.
#[test]
fn acceptance_rule_gives_target_distribution() {
    let p = vec![(0u32, 0.5), (1, 0.3), (2, 0.2)];
    let q = vec![(1u32, 0.6), (2, 0.1), (3, 0.3)];
    let mut rng = Sampler::new(SampleOpts {
        temperature: 1.0,
        seed: 7,
        ..Default::default()
    })
    .unwrap();
    let n = 200_000;
    let mut c = [0usize; 4];
    for _ in 0..n {
        let u = rng.uniform();
        let x = if u < 0.6 {
            1
        } else if u < 0.7 {
            2
        } else {
            3
        };
        let t = accept_or_resample(&p, &q, x, &mut rng).unwrap_or(x);
        c[t as usize] += 1;
    }
    for (t, pt) in [(0, 0.5), (1, 0.3), (2, 0.2), (3, 0.0)] {
        let f = c[t] as f64 / n as f64;
        let sd = (pt * (1.0 - pt) / n as f64).sqrt();
        assert!((f - pt).abs() <= 5.0 * sd + 1e-12, "token {t}: {f} vs {pt}");
    }
}

/// A draft that never agrees: after one wasted round the controller takes plain steps, with a
/// one-token probe every 16, so drafting costs a few percent of the steps.
#[test]
fn controller_falls_back_when_nothing_is_accepted() {
    let mut ctl = KController::new(3, true);
    let (mut draft_tokens, mut verify_chunks) = (0usize, 0usize);
    for _ in 0..256 {
        let k = ctl.choose();
        draft_tokens += k;
        verify_chunks += 1;
        // Draft tokens cost half a step each; a verify chunk one unit.
        ctl.record(k, 0, 0.5 * k as f64, 1.0, 1);
    }
    let cost = verify_chunks as f64 + 0.5 * draft_tokens as f64;
    assert!(
        cost <= 1.05 * 256.0,
        "cost {cost} for 256 tokens ({draft_tokens} drafted)"
    );
    assert!(draft_tokens > 0, "never probed");
    // A draft that always agrees keeps drafting the most.
    let mut ctl = KController::new(3, true);
    for _ in 0..50 {
        let k = ctl.choose();
        ctl.record(k, k, 0.2 * k as f64, 1.0, 1);
    }
    assert_eq!(ctl.choose(), 3);
}

/// The golden greedy continuation (transformers, 128 tokens) through self-speculative decoding.
#[test]
fn greedy_golden_continuation_self_draft() {
    let path = golden().join("smollm2_greedy_wiki32.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, want) = (ids("prompt_ids"), ids("greedy_new_ids"));
    let m = default_model();
    let d = Draft::SelfSkip(skip_set(30, &[12, 13, 14, 15, 17, 25]));
    let (got, st) = spec(
        m,
        &d,
        &prompt,
        &opts(want.len(), SampleOpts::greedy()),
        SpecOpts {
            max_draft: 3,
            adaptive: false,
        },
    );
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_bad, None);
    assert_eq!(got, want);
    assert!(
        st.rounds > 10 && st.accepted > 0,
        "{} rounds, {} accepted",
        st.rounds,
        st.accepted
    );
    eprintln!(
        "acceptance {:.2}, {:.2} per round",
        st.acceptance_rate, st.mean_accepted
    );
}

/// The same through the LM head's screen, drafts longer than one verify chunk, and a model
/// draft (the default model cut to 20 blocks).
#[test]
#[ignore = "real model"]
fn greedy_golden_continuation_screen_and_model_draft() {
    let path = golden().join("smollm2_greedy_wiki32.json");
    let g: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, want) = (ids("prompt_ids"), ids("greedy_new_ids"));
    let mut m = default_model_cut(30);
    lopper::runtime::pack::attach_head_screen(&mut m).unwrap();
    let d = Draft::SelfSkip(skip_set(30, &[13, 14, 17]));
    let (got, _) = spec(
        &m,
        &d,
        &prompt,
        &opts(want.len(), SampleOpts::greedy()),
        SpecOpts {
            max_draft: 6,
            adaptive: false,
        },
    );
    assert_eq!(got, want, "screened, k = 6");
    let dm = default_model_cut(20);
    let (got, st) = spec(
        &m,
        &Draft::Model(&dm),
        &prompt,
        &opts(want.len(), SampleOpts::greedy()),
        SpecOpts {
            max_draft: 3,
            adaptive: true,
        },
    );
    assert_eq!(got, want, "model draft");
    eprintln!("cut-20 draft: acceptance {:.2}", st.acceptance_rate);
}

/// A draft with another vocabulary is refused, naming both sizes.
#[test]
fn draft_with_other_vocabulary_refused() {
    let t = default_model();
    let d = tiny("tiny-llama3");
    let o = opts(4, SampleOpts::greedy());
    let err = generate_speculative(
        t,
        &Draft::Model(&d),
        &[1, 2, 3],
        &o,
        &SpecOpts::default(),
        &mut |_| {},
    )
    .map(|_| ())
    .expect_err("refused")
    .to_string();
    assert!(err.contains("320") && err.contains("49152"), "{err}");
    let err = generate_speculative(
        t,
        &Draft::SelfSkip(vec![true; 30]),
        &[1, 2, 3],
        &o,
        &SpecOpts::default(),
        &mut |_| {},
    )
    .map(|_| ())
    .expect_err("all blocks skipped is refused")
    .to_string();
    assert!(err.contains("at least one block"), "{err}");
}

fn lopper(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// CLI refusals: modifiers without the mode, bad draft lengths, a draft with another
/// vocabulary (named), early exit combined with speculative decoding.
#[test]
fn cli_refuses_bad_speculative_flags() {
    for (args, want) in [
        (
            vec!["--draft-skip", "3"],
            "--draft-skip needs --speculative",
        ),
        (vec!["--draft-fixed"], "--draft-fixed needs"),
        (
            vec!["--speculative", "--draft-max", "0"],
            "--draft-max must be in 1..=16",
        ),
        (
            vec!["--speculative", "--early-exit", "0.9"],
            "cannot be combined",
        ),
    ] {
        let mut a = vec!["run", "--prompt", "hello"];
        a.extend(args.iter());
        let (ok, err) = lopper(&a);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    let _ = default_model();
    let tiny_dir = golden().join("tiny").join("tiny-llama3");
    let (ok, err) = lopper(&[
        "run",
        "--prompt",
        "hello",
        "--max-new",
        "4",
        "--draft",
        tiny_dir.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("320") && err.contains("49152"), "{err}");
}

/// The draft search: every candidate skips the lowest-ranked blocks, its cost falls with the
/// count, its agreement is a fraction, and skipping none or all is refused.
#[test]
fn draft_search_candidates() {
    use lopper::runtime::draft_search::{best, search_skip};
    let m = tiny("tiny-llama3");
    let w1: Vec<u32> = (0..48u32).map(|i| (i * 53 + 7) % 320).collect();
    let w2: Vec<u32> = (0..48u32).map(|i| (i * 29 + 3) % 320).collect();
    let windows = [&w1[..], &w2[..]];
    let order = [2usize, 0, 1];
    let c = search_skip(&m, &windows, &order, &[1, 2], 3).unwrap();
    assert_eq!(c[0].skipped, vec![2]);
    assert_eq!(c[1].skipped, vec![0, 2]);
    assert!(c[1].cost < c[0].cost && c[0].cost < 1.0);
    for x in &c {
        assert!((0.0..=1.0).contains(&x.match_rate));
        assert!(x.gain >= 1.0 && x.best_k <= 3);
    }
    assert!(best(&c).is_some());
    assert!(search_skip(&m, &windows, &order, &[0], 3).is_err());
    assert!(search_skip(&m, &windows, &order, &[3], 3).is_err());
    assert!(search_skip(&m, &windows, &[0, 1], &[1], 3).is_err());
}

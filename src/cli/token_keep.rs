//! `--token-keep`: token pruning of long prompts in prefill (LazyLLM; [`lopper::runtime::token_prune`]).
//!
//! - `eval --token-keep F[,F…] [--continuation N]`: each window of `--seq-len` tokens is split
//!   into a prompt (all but the last `N`, default 256) prefilled with pruning and the `N`
//!   tokens after it, scored teacher-forced against the revived cache; one continuation
//!   perplexity per `F`, on the same windows, each against the first `F` listed.
//! - `bench --token-keep F[,F…] [--token-prompts L,…]`: time-to-first-token of wiki prompts of
//!   each length (default 1024, 2048, 4096, 8192, capped at the model's context) by plain
//!   prefill and with pruning at each `F`, round-robin `--reps` times (the run with the best
//!   TTFT of each kept), with the ratio against plain prefill measured in the same run and
//!   whether the first token is plain prefill's. The revival (before the second token) is not
//!   timed here; `run --token-keep` prints it, and `eval --token-keep` times whole windows.

use anyhow::{bail, Context, Result};
use lopper::runtime::token_prune::{check_keep, check_model, continuation_nll, Revival, Schedule};
use lopper::runtime::{generate, GenerateOpts, SampleOpts};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Refuse kept fractions outside (0, 1] and an empty list.
pub fn check_list(keeps: &[f32]) -> Result<()> {
    for &f in keeps {
        check_keep(f)?;
    }
    Ok(())
}

/// `--token-revive`: refused without `--token-keep` (`active`); exact by default.
pub fn revival(flag: &Option<String>, active: bool) -> Result<Revival> {
    match flag {
        Some(_) if !active => bail!("--token-revive needs --token-keep"),
        Some(s) => Ok(s.parse()?),
        None => Ok(Revival::Exact),
    }
}

/// A kept fraction as written (f32 → f64 without the binary tail: 0.7, not 0.69999…).
fn shown(f: f32) -> f64 {
    format!("{f}").parse().unwrap_or(f as f64)
}

/// `eval` with a token-pruning flag (`--token-keep`, `--token-revive`, `--continuation`).
pub fn eval_cmd(a: super::eval::EvalArgs) -> Result<()> {
    a.act.check(false)?;
    if a.continuation.is_some() && a.token_keep.is_empty() {
        bail!("--continuation needs --token-keep");
    }
    let revive = revival(&a.token_revive, !a.token_keep.is_empty())?;
    check_list(&a.token_keep)?;
    if a.early_exit.is_some() || !a.act.act_sparsity.is_empty() {
        bail!("--token-keep cannot be combined with --early-exit / --act-sparsity yet");
    }
    if a.in_memory {
        bail!("--in-memory does not apply to --token-keep (it always loads the model)");
    }
    eval(&EvalOpts {
        model: &a.model,
        text: &a.text,
        seq_len: a.seq_len,
        windows: a.windows,
        continuation: a.continuation.unwrap_or(256),
        keeps: &a.token_keep,
        revive,
        json: a.json,
    })
}

/// What `eval --token-keep` uses.
pub struct EvalOpts<'a> {
    pub model: &'a Option<PathBuf>,
    pub text: &'a Option<PathBuf>,
    pub seq_len: usize,
    pub windows: usize,
    pub continuation: usize,
    pub keeps: &'a [f32],
    pub revive: Revival,
    pub json: bool,
}

/// `eval --token-keep`: continuation perplexity per kept fraction.
pub fn eval(a: &EvalOpts) -> Result<()> {
    check_list(a.keeps)?;
    if a.continuation == 0 || a.continuation >= a.seq_len {
        bail!(
            "--continuation must be in 1..{} (below --seq-len), got {}",
            a.seq_len,
            a.continuation
        );
    }
    let model_path = super::model_path(a.model)?;
    let text_path = match a.text {
        Some(p) => p.clone(),
        None => lopper::assets::wiki_text().context("fetching wiki.utf8")?,
    };
    let model = super::load_model(&model_path, a.json)?;
    check_model(&model)?;
    let ctx = model.config.max_position_embeddings;
    if a.seq_len > ctx {
        bail!(
            "--seq-len {} exceeds the model's context of {ctx} tokens",
            a.seq_len
        );
    }
    let ids = super::eval::tokenize_text(&model, &text_path)?;
    let wins = lopper::eval::make_windows(&ids, a.seq_len, a.windows, &text_path)?;
    let prompt = a.seq_len - a.continuation;
    let n = model.weights.layers.len();
    let scheds: Vec<Schedule> = a
        .keeps
        .iter()
        .map(|&f| Schedule::new(n, f))
        .collect::<lopper::Result<_>>()?;
    let pb = super::bar(a.json, (wins.len() * scheds.len()) as u64, "windows");
    let mut rows = Vec::new();
    for (f, s) in a.keeps.iter().zip(&scheds) {
        let t0 = Instant::now();
        let (mut nll, mut count, mut kept, mut per_win) = (0f64, 0usize, 0f64, Vec::new());
        for w in &wins {
            let (v, k) = continuation_nll(&model, s, a.revive, w, prompt)?;
            let sum: f64 = v.iter().sum();
            per_win.push((sum / v.len() as f64).exp());
            nll += sum;
            count += v.len();
            kept += k;
            pb.inc(1);
        }
        rows.push(json!({
            "token_keep": shown(*f),
            "ratio_per_pruning_point": s.ratio,
            "kept_fraction": kept / wins.len() as f64,
            "perplexity": (nll / count as f64).exp(),
            "mean_nll": nll / count as f64,
            "window_perplexity": per_win,
            "predictions": count,
            "seconds": t0.elapsed().as_secs_f64(),
        }));
    }
    pb.finish_and_clear();
    let base = rows[0]["perplexity"].as_f64().unwrap_or(f64::NAN);
    for r in rows.iter_mut() {
        let p = r["perplexity"].as_f64().unwrap_or(f64::NAN);
        r["vs_first"] = json!(p / base - 1.0);
    }
    let report = json!({
        "model": model_path.display().to_string(),
        "text": text_path.display().to_string(),
        "windows": wins.len(),
        "prompt_tokens": prompt,
        "continuation_tokens": a.continuation,
        "revival": a.revive,
        "runs": rows,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model       {}", model_path.display());
    println!(
        "windows     {} x ({prompt} prompt + {} scored) tokens of {}",
        wins.len(),
        a.continuation,
        text_path.display()
    );
    println!(
        "{:>10} {:>9} {:>12} {:>9}",
        "token-keep", "kept", "perplexity", "vs first"
    );
    for r in &rows {
        println!(
            "{:>10} {:>9.3} {:>12.4} {:>+8.2}%",
            r["token_keep"].as_f64().unwrap_or(f64::NAN),
            r["kept_fraction"].as_f64().unwrap_or(f64::NAN),
            r["perplexity"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["vs_first"].as_f64().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

/// What `bench --token-keep` uses.
pub struct BenchOpts {
    pub model: Option<PathBuf>,
    pub format: Vec<String>,
    pub head_format: Option<String>,
    pub no_head_screen: bool,
    pub reps: usize,
    pub json: bool,
    pub keeps: Vec<f32>,
    pub prompts: Vec<usize>,
}

/// `bench --token-keep`: time-to-first-token per prompt length and kept fraction.
pub fn bench(a: &BenchOpts) -> Result<()> {
    check_list(&a.keeps)?;
    if a.format.len() > 1 {
        bail!("--token-keep benchmarks take at most one --format");
    }
    let path = super::model_path(&a.model)?;
    let mut model = super::load_model(&path, a.json)?;
    check_model(&model)?;
    super::pack_model(
        &mut model,
        a.format.first().map(String::as_str),
        a.head_format.as_deref(),
        a.json,
    )?;
    if !a.no_head_screen {
        lopper::runtime::pack::attach_head_screen(&mut model)
            .context("building the head screen")?;
    }
    let ctx = model.config.max_position_embeddings;
    let text = lopper::assets::wiki_text()?;
    let ids = super::eval::tokenize_text(&model, &text)?;
    let mut lens: Vec<usize> = if a.prompts.is_empty() {
        vec![1024, 2048, 4096, 8192]
    } else {
        a.prompts.clone()
    };
    if lens.contains(&0) {
        bail!("--token-prompts: prompt lengths must be positive");
    }
    for l in lens.iter_mut() {
        *l = (*l).min(ctx).min(ids.len());
    }
    lens.dedup();
    let n = model.weights.layers.len();
    let scheds: Vec<Schedule> = a
        .keeps
        .iter()
        .map(|&f| Schedule::new(n, f))
        .collect::<lopper::Result<_>>()?;
    // One token: the prefill and the first token (the revival comes only before a second).
    let opts = GenerateOpts {
        max_new: 1,
        sampling: SampleOpts::greedy(),
        stop_at_eos: false,
        stop_tokens: vec![],
    };
    // best[len][mode]: the run with the lowest TTFT; mode 0 = plain.
    let modes = 1 + scheds.len();
    let mut best = vec![vec![Run::default(); modes]; lens.len()];
    for _ in 0..a.reps.max(1) {
        for (li, &l) in lens.iter().enumerate() {
            let p = &ids[..l];
            for (mi, slot) in best[li].iter_mut().enumerate() {
                let mut toks = Vec::new();
                let r = if mi == 0 {
                    let s = generate(&model, p, &opts, &mut |t| toks.push(t))?;
                    Run::new(s.prefill_seconds, 1.0)
                } else {
                    let s = lopper::runtime::token_prune::generate_token_pruned(
                        &model,
                        &scheds[mi - 1],
                        Revival::Exact,
                        p,
                        &opts,
                        &mut |t| toks.push(t),
                    )?;
                    Run::new(s.generate.prefill_seconds, s.kept_fraction)
                };
                if !a.json {
                    eprintln!("  prompt {l}, mode {mi}: TTFT {:.3} s", r.ttft);
                }
                if r.ttft < slot.ttft {
                    *slot = Run { tokens: toks, ..r };
                }
            }
        }
    }
    let cpu = lopper::isa::cpu_name();
    let mut rows = Vec::new();
    for (li, &l) in lens.iter().enumerate() {
        let base = &best[li][0];
        for (mi, r) in best[li].iter().enumerate() {
            rows.push(json!({
                "prompt_tokens": l,
                "mode": if mi == 0 { "plain".to_string() } else { format!("token-keep {}", a.keeps[mi - 1]) },
                "token_keep": if mi == 0 { None } else { Some(shown(a.keeps[mi - 1])) },
                "kept_fraction": r.kept,
                "ttft_s": r.ttft,
                "ttft_speedup": base.ttft / r.ttft,
                "first_token_as_plain": r.tokens == base.tokens,
            }));
        }
    }
    let report = json!({
        "model": path.display().to_string(),
        "cpu": cpu,
        "threads": rayon::current_num_threads(),
        "reps": a.reps,
        "rows": rows,
    });
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "machine     {cpu}, {} threads; time to first token (prefill + first token, greedy), best of {} round-robin runs\n",
        rayon::current_num_threads(),
        a.reps.max(1)
    );
    println!(
        "{:>7} {:<16} {:>6} {:>8} {:>8} {:>6}",
        "prompt", "mode", "kept", "TTFT s", "vs plain", "same"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>7} {:<16} {:>6.3} {:>8.3} {:>7.2}x {:>6}",
            r["prompt_tokens"].as_u64().unwrap_or(0),
            r["mode"].as_str().unwrap_or("?"),
            f("kept_fraction"),
            f("ttft_s"),
            f("ttft_speedup"),
            r["first_token_as_plain"].as_bool().unwrap_or(false)
        );
    }
    Ok(())
}

/// One timed prefill and first token.
#[derive(Clone)]
struct Run {
    ttft: f64,
    kept: f64,
    tokens: Vec<u32>,
}

impl Default for Run {
    fn default() -> Run {
        Run::new(f64::INFINITY, 1.0)
    }
}

impl Run {
    fn new(ttft: f64, kept: f64) -> Run {
        Run {
            ttft,
            kept,
            tokens: Vec::new(),
        }
    }
}

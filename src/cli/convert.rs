//! `lopper convert`: write any loadable model as an HF directory or a GGUF file.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Output format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// HF directory (config.json, model.safetensors, tokenizer files).
    Hf,
    /// One GGUF file (llama.cpp).
    Gguf,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory (hf) or file (gguf); must not exist unless --force. Written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Output format (default: gguf when --out ends in .gguf, else hf).
    #[arg(long, value_enum)]
    pub to: Option<Target>,
    /// Weight dtype: f32, f16 or bf16 (hf); f32, f16, bf16 or q8_0 (gguf; norms and biases stay
    /// f32, q8_0 matrices with rows not a multiple of 32 are written as f16).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let to = a.to.unwrap_or_else(|| {
        let gguf = a
            .out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if gguf {
            Target::Gguf
        } else {
            Target::Hf
        }
    });
    // Parse the dtype before loading the model, so a typo fails at once.
    let (hf_dtype, gguf_dtype) = match to {
        Target::Hf => (
            Some(
                a.dtype
                    .parse::<lopper::io::save::SaveDtype>()
                    .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?,
            ),
            None,
        ),
        Target::Gguf => (
            None,
            Some(
                a.dtype
                    .parse::<lopper::io::gguf_write::GgufDtype>()
                    .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?,
            ),
        ),
    };
    let path = super::model_path(&a.model)?;
    let model = super::load_model(&path, false)?;
    let sp = super::spinner(false, format!("writing {}", a.out.display()));
    let ctx = || format!("converting {} to {}", path.display(), a.out.display());
    let mut extra = String::new();
    if let Some(d) = hf_dtype {
        lopper::io::save::save_hf(&model, &a.out, d, a.force).with_context(ctx)?;
    }
    if let Some(d) = gguf_dtype {
        let w = lopper::io::gguf_write::save_gguf(&model, &a.out, d, a.force).with_context(ctx)?;
        sp.finish_and_clear();
        for warning in &w.warnings {
            eprintln!("warning: {warning}");
        }
        extra = format!(
            ", GGUF arch {}, {} tensors, {} bytes",
            w.arch, w.tensors, w.bytes
        );
    }
    sp.finish_and_clear();
    println!(
        "wrote {} ({} parameters, {}{extra})",
        a.out.display(),
        model.weights.num_params(),
        a.dtype
    );
    Ok(())
}

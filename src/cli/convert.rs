//! `lopper convert`: write any loadable model as an HF directory (optionally with its linears
//! stored packed: `--format`, see `lopper::io::packed`) or a GGUF file.

use anyhow::{bail, Context, Result};
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
    /// Store the linears packed in this format (auto, bitmask, nm, bf16, ...; see `lopper run
    /// --help`), noted in config.json as `lopper_formats`; lopper loads it without
    /// re-compressing, transformers cannot. The other tensors are written as f32.
    #[arg(long)]
    pub format: Option<String>,
    /// With --format: format of the LM head (default: dense of the format's value type).
    #[arg(long)]
    pub head_format: Option<String>,
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
    let packing = a.format.is_some() || a.head_format.is_some();
    if packing && hf_dtype != Some(lopper::io::save::SaveDtype::F32) {
        bail!("--format writes an HF directory with the other tensors as f32; drop --to gguf / --dtype {}", a.dtype);
    }
    let path = super::model_path(&a.model)?;
    let mut model = super::load_model(&path, false)?;
    let packed = super::pack_model(
        &mut model,
        a.format.as_deref(),
        a.head_format.as_deref(),
        false,
    )?;
    let sp = super::spinner(false, format!("writing {}", a.out.display()));
    let ctx = || format!("converting {} to {}", path.display(), a.out.display());
    let mut extra = String::new();
    if packed.is_some() {
        lopper::io::packed::save_packed(&model, &a.out, a.force).with_context(ctx)?;
    } else if let Some(d) = hf_dtype {
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

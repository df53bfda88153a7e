//! `lopper convert`: write any loadable model as an HF directory, optionally with its linears
//! stored packed (`--format`, see `lopper::io::packed`).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory (must not exist unless --force). Written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype in model.safetensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Replace an existing output directory.
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
    let dtype: lopper::io::save::SaveDtype = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if (a.format.is_some() || a.head_format.is_some()) && dtype != lopper::io::save::SaveDtype::F32
    {
        bail!(
            "--format stores the other tensors as f32; drop --dtype {}",
            a.dtype
        );
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
    let res = if packed.is_some() {
        lopper::io::packed::save_packed(&model, &a.out, a.force)
    } else {
        lopper::io::save::save_hf(&model, &a.out, dtype, a.force)
    };
    res.with_context(|| format!("converting {} to {}", path.display(), a.out.display()))?;
    sp.finish_and_clear();
    println!(
        "wrote {} ({} parameters, {})",
        a.out.display(),
        model.weights.num_params(),
        a.dtype
    );
    Ok(())
}

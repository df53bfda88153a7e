//! `lopper convert`: write any loadable model as an HF directory.

use anyhow::{Context, Result};
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
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let dtype: lopper::io::save::SaveDtype = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let path = super::model_path(&a.model)?;
    let model = super::load_model(&path, false)?;
    let sp = super::spinner(false, format!("writing {}", a.out.display()));
    lopper::io::save::save_hf(&model, &a.out, dtype, a.force)
        .with_context(|| format!("converting {} to {}", path.display(), a.out.display()))?;
    sp.finish_and_clear();
    println!(
        "wrote {} ({} parameters, {})",
        a.out.display(),
        model.weights.num_params(),
        a.dtype
    );
    Ok(())
}

//! `lopper inspect`: architecture, tensors and parameter counts of a model.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    pub model: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let path = super::model_path(&a.model)?;
    let model = super::load_model(&path, a.json)?;
    let s = lopper::inspect::summarize(&model);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let c = &s.config;
    println!("model         {}", s.source);
    println!(
        "architecture  {} ({})",
        c.arch.model_type(),
        c.arch.hf_class()
    );
    println!(
        "shape         {} layers, hidden {}, {} heads / {} kv heads x {}, ffn {}, vocab {}",
        s.layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    println!(
        "rope          theta {} {:?}; rms eps {}; tied head {}; biases qkv {} o {} mlp {}",
        c.rope_theta,
        c.rope_scaling,
        c.rms_norm_eps,
        c.tie_word_embeddings,
        c.qkv_bias,
        c.o_bias,
        c.mlp_bias
    );
    if s.layer_shapes.iter().any(|l| *l != s.layer_shapes[0]) {
        println!(
            "layer shapes  (heads, kv heads, ffn) per layer: {:?}",
            s.layer_shapes
        );
    }
    println!(
        "parameters    {} total, {} in block linears ({:.2}% zero), {} embedding/head",
        s.total_params,
        s.linear_params,
        100.0 * s.linear_sparsity,
        s.embedding_params
    );
    if s.shortcut_params > 0 {
        println!("              {} in residual shortcuts", s.shortcut_params);
    }
    println!(
        "\n{:<52} {:>16} {:>6} {:>7} {:>11} {:>8}",
        "tensor", "shape", "dtype", "storage", "params", "sparsity"
    );
    for t in &s.tensors {
        println!(
            "{:<52} {:>16} {:>6} {:>7} {:>11} {:>7.2}%",
            t.name,
            format!("{:?}", t.shape),
            t.dtype,
            t.storage,
            t.params,
            100.0 * t.sparsity
        );
    }
    Ok(())
}

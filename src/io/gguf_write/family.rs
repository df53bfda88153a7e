//! The newer families in GGUF, with llama.cpp's architecture names and tensor names
//! (`llama-arch.cpp`): `qwen3` (`attn_q_norm`, `attn_k_norm`), `phi3` (fused `attn_qkv` and
//! `ffn_up` = gate rows then up rows, as `convert_hf_to_gguf.py` writes Phi-3), `gemma3`
//! (`attn_q_norm`, `attn_k_norm`, `post_attention_norm`, `ffn_norm` before the MLP,
//! `post_ffw_norm`; norms stored as `1+w`, which is what lopper holds). None of them permutes
//! q/k (their llama.cpp graphs use NeoX-style RoPE, HF's rotate-half).
//!
//! Refused: mixtures of experts (not written yet; save them as HF directories), non-uniform
//! layers of these families (only llama.cpp's `deci` graph takes per-layer shapes, and it is
//! the llama block), and a gemma3 whose score scale or local RoPE base differs from what
//! llama.cpp derives (`query_pre_attn_scalar` = head_dim, or hidden/heads for the 62-layer 27B;
//! local base 10000). A gemma3 layer pattern other than llama.cpp's "every 6th layer global"
//! is written as `gemma3.attention.sliding_window_pattern` (one bool per layer) for lopper, with
//! a warning that llama.cpp does not read it.

use crate::io::gguf::{gemma3_default_pattern, gemma3_query_scalar, GEMMA3_PATTERN_KEY};
use crate::io::hf::family::concat_rows;
use crate::model::config::Arch;
use crate::model::weights::{LayerExtra, LayerWeights, Tensor};
use crate::Model;
use candle_core::quantized::gguf_file::Value;

/// What a block of the newer families needs that GGUF cannot hold (see the module docs).
pub(super) fn check_layer(model: &Model, i: usize, extra: &LayerExtra) -> Result<(), String> {
    let c = &model.config;
    if extra.moe.is_some() {
        return Err(format!(
            "layer {i} is a mixture of experts, which lopper does not write as GGUF yet (save it \
             as an HF directory instead)"
        ));
    }
    let hd = c.head_dim;
    for (what, t, n) in [
        ("q_norm", &extra.q_norm, hd),
        ("k_norm", &extra.k_norm, hd),
        ("post-attention norm", &extra.post_attn_norm, c.hidden_size),
        ("post-MLP norm", &extra.post_mlp_norm, c.hidden_size),
    ] {
        if let Some(t) = t {
            if t.shape != [n] {
                return Err(format!(
                    "layer {i} {what} has shape {:?}, expected [{n}]",
                    t.shape
                ));
            }
        }
    }
    let gemma = c.arch == Arch::Gemma3;
    if !gemma && (extra.post_attn_norm.is_some() || extra.post_mlp_norm.is_some()) {
        return Err(format!("layer {i} has post-norms, which only gemma3 has"));
    }
    if (extra.q_norm.is_some() || extra.k_norm.is_some()) && !c.arch.has_qk_norm() {
        return Err(format!(
            "layer {i} has q/k norms, which {} has not",
            c.arch.model_type()
        ));
    }
    Ok(())
}

/// Model-wide checks once the layer shapes are known (`uniform`: all layers alike).
pub(super) fn check_model(model: &Model, uniform: bool) -> Result<(), String> {
    let c = &model.config;
    if matches!(c.arch, Arch::Llama | Arch::Mistral | Arch::Qwen2) {
        return Ok(());
    }
    if !uniform {
        return Err(format!(
            "layers of different shapes in a {} model (only llama.cpp's deci graph, the llama \
             block, takes per-layer shapes)",
            c.arch.model_type()
        ));
    }
    if c.arch == Arch::Gemma3 {
        let l0 = &model.weights.layers[0];
        let want = gemma3_query_scalar(
            model.weights.layers.len(),
            c.hidden_size,
            l0.n_heads(c.head_dim),
            c.head_dim,
        ) as f64;
        let got = c.family.query_pre_attn_scalar.unwrap_or(c.head_dim as f64);
        if got != want {
            return Err(format!(
                "query_pre_attn_scalar {got}, but llama.cpp's gemma3 graph derives {want}"
            ));
        }
        if c.family.rope_local_theta.unwrap_or(10000.0) != 10000.0 {
            return Err("a local RoPE base other than 10000 (llama.cpp's gemma3 fixes it)".into());
        }
    }
    Ok(())
}

/// llama.cpp's architecture name for the newer families (`None`: the llama / qwen2 rules).
pub(super) fn arch_name(model: &Model) -> Option<&'static str> {
    match model.config.arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Mixtral => None,
        a => Some(a.gguf_name()),
    }
}

/// Phi-3's fused matrices of a block: `attn_qkv` (q, k, v rows) and `ffn_up` (gate, up rows).
pub(super) fn fused(model: &Model, l: &LayerWeights) -> Option<(Tensor, Tensor)> {
    (model.config.arch == Arch::Phi3).then(|| {
        (
            concat_rows(&[&l.q.weight, &l.k.weight, &l.v.weight]),
            concat_rows(&[&l.gate.weight, &l.up.weight]),
        )
    })
}

/// The block's norm vectors beyond `attn_norm` / `ffn_norm`, with their llama.cpp names.
pub(super) fn extra_vectors(extra: &LayerExtra) -> Vec<(&'static str, &Tensor)> {
    [
        ("attn_q_norm", &extra.q_norm),
        ("attn_k_norm", &extra.k_norm),
        ("post_attention_norm", &extra.post_attn_norm),
        ("post_ffw_norm", &extra.post_mlp_norm),
    ]
    .into_iter()
    .filter_map(|(n, t)| t.as_ref().map(|t| (n, t)))
    .collect()
}

/// The family's metadata keys; warnings for what llama.cpp will not read.
pub(super) fn metadata(
    model: &Model,
    arch: &str,
    warnings: &mut Vec<String>,
) -> Vec<(String, Value)> {
    let c = &model.config;
    let mut md = Vec::new();
    if c.arch == Arch::Gemma3 {
        let n = model.weights.layers.len();
        let pattern = &c.family.sliding_layers;
        if !pattern.is_empty() && *pattern != gemma3_default_pattern(n) {
            md.push((
                GEMMA3_PATTERN_KEY.to_string(),
                Value::Array(pattern.iter().map(|&b| Value::Bool(b)).collect()),
            ));
            warnings.push(format!(
                "gemma3 layer pattern {pattern:?} written as `{GEMMA3_PATTERN_KEY}`: lopper reads \
                 it back, but llama.cpp's {arch} graph makes every 6th layer global"
            ));
        }
    }
    md
}

//! The newer families' part of an HF directory written by [`crate::io::save`]: their
//! `config.json` keys and the tensors that are not the llama block's (the layout is described in
//! [`crate::io::hf::family`]).
//!
//! - phi3: q/k/v and gate/up are fused again into `qkv_proj` / `gate_up_proj` (rows q, k, v;
//!   gate, up), as transformers' `Phi3ForCausalLM` expects; a low-rank or biased phi3 linear
//!   cannot be fused and is refused.
//! - gemma3: norms are written as `w = stored − 1` under gemma's names
//!   (`pre_feedforward_layernorm`, `post_attention_layernorm`, `post_feedforward_layernorm`).
//! - q/k norms and experts under their HF names (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2`,
//!   Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj`).
//!
//! Everything here is computed before the output is touched, so a refusal leaves no files.

use crate::io::hf::family::{self as hf_family, moe_names, PRE_FFN_NORM};
use crate::model::config::Arch;
use crate::model::names;
use crate::model::weights::{LinearKind, Tensor};
use crate::{Error, Model, Result};
use serde_json::{json, Map, Value};
use std::collections::HashSet;

/// Tensors to write for a family: `owned` are computed here (fused, shifted by −1), `borrowed`
/// are the model's own; `drop` are llama-layout names the generic writer must not write.
#[derive(Default)]
pub struct FamilyTensors<'a> {
    pub owned: Vec<(String, Tensor)>,
    pub borrowed: Vec<(String, &'a Tensor)>,
    pub drop: HashSet<String>,
}

/// Whether the generic writer leaves linear `kind` of a block to this module (phi3's fused
/// linears, a mixture's empty dense MLP).
pub fn skips(model: &Model, layer: usize, kind: LinearKind) -> bool {
    let l = &model.weights.layers[layer];
    match kind {
        LinearKind::Gate | LinearKind::Up | LinearKind::Down if l.extra.moe.is_some() => true,
        LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Gate | LinearKind::Up => {
            model.config.arch == Arch::Phi3
        }
        _ => false,
    }
}

/// The family tensors of `model` (empty for llama / mistral / qwen2).
pub fn tensors(model: &Model) -> Result<FamilyTensors<'_>> {
    let arch = model.config.arch;
    let mut out = FamilyTensors::default();
    let no = |m: String| Error::Invalid(format!("cannot save: {m}"));
    for (i, l) in model.weights.layers.iter().enumerate() {
        let name = |n: &str| names::layer_tensor(i, n);
        if arch == Arch::Phi3 {
            let fused = [
                LinearKind::Q,
                LinearKind::K,
                LinearKind::V,
                LinearKind::Gate,
                LinearKind::Up,
            ];
            if let Some(k) = fused
                .iter()
                .find(|&&k| l.linear(k).is_factored() || l.linear(k).bias.is_some())
            {
                return Err(no(format!(
                    "layer {i} {} is low-rank or biased, which phi3's fused qkv_proj / \
                     gate_up_proj cannot hold",
                    k.hf_name()
                )));
            }
            out.owned.push((
                name("self_attn.qkv_proj.weight"),
                hf_family::concat_rows(&[&l.q.weight, &l.k.weight, &l.v.weight]),
            ));
            out.owned.push((
                name("mlp.gate_up_proj.weight"),
                hf_family::concat_rows(&[&l.gate.weight, &l.up.weight]),
            ));
        }
        let x = &l.extra;
        let qk = [
            ("self_attn.q_norm.weight", &x.q_norm),
            ("self_attn.k_norm.weight", &x.k_norm),
        ];
        if arch == Arch::Gemma3 {
            let (Some(pa), Some(pm)) = (&x.post_attn_norm, &x.post_mlp_norm) else {
                return Err(no(format!("gemma3 layer {i} lacks its post-norms")));
            };
            out.drop.insert(name(names::ATTN_NORM));
            out.drop.insert(name(names::MLP_NORM));
            for (n, t) in [
                (names::ATTN_NORM, &l.attn_norm),
                (PRE_FFN_NORM, &l.mlp_norm),
                (hf_family::POST_ATTN_NORM, pa),
                (hf_family::POST_FFN_NORM, pm),
            ] {
                out.owned.push((name(n), minus_one(t)));
            }
            for (n, t) in qk.iter().filter_map(|(n, t)| t.as_ref().map(|t| (n, t))) {
                out.owned.push((name(n), minus_one(t)));
            }
        } else {
            for (n, t) in qk.iter().filter_map(|(n, t)| t.as_ref().map(|t| (n, t))) {
                out.borrowed.push((name(n), t));
            }
        }
        if let Some(m) = &x.moe {
            let first = model
                .weights
                .layers
                .iter()
                .find_map(|l| l.extra.moe.as_ref());
            let n0 = first.map_or(0, |f| f.experts.len());
            if m.experts.len() != n0 {
                return Err(no(format!(
                    "layer {i} has {} experts and another layer {n0}; HF configs hold one count",
                    m.experts.len()
                )));
            }
            let (prefix, [g, u, d]) = moe_names(arch);
            out.borrowed
                .push((name(&format!("{prefix}.gate.weight")), &m.router));
            for (e, ex) in m.experts.iter().enumerate() {
                for (n, lin) in [(g, &ex.gate), (u, &ex.up), (d, &ex.down)] {
                    if lin.is_factored() || lin.bias.is_some() {
                        return Err(no(format!(
                            "layer {i} expert {e} {n} is low-rank or biased, which {} cannot hold",
                            arch.model_type()
                        )));
                    }
                    out.borrowed.push((
                        name(&format!("{prefix}.experts.{e}.{n}.weight")),
                        &lin.weight,
                    ));
                }
            }
        }
    }
    if arch == Arch::Gemma3 {
        out.drop.insert(names::FINAL_NORM.to_string());
        out.owned.push((
            names::FINAL_NORM.to_string(),
            minus_one(&model.weights.final_norm),
        ));
    }
    Ok(out)
}

/// Gemma's stored `1+w` back to HF's `w`.
fn minus_one(t: &Tensor) -> Tensor {
    Tensor::new(
        t.shape.clone(),
        t.values().iter().map(|x| x - 1.0).collect(),
    )
}

/// The family's `config.json` keys (added after the common ones; may replace them).
pub fn config_keys(model: &Model, j: &mut Map<String, Value>, attn_bias: bool) {
    let c = &model.config;
    let f = &c.family;
    let w = &model.weights;
    match c.arch {
        Arch::Qwen3 | Arch::Qwen3Moe => {
            j.insert("attention_bias".into(), json!(attn_bias));
            j.insert("use_sliding_window".into(), json!(false));
            j.insert("sliding_window".into(), Value::Null);
        }
        Arch::Phi3 | Arch::Mixtral => {
            j.insert("sliding_window".into(), json!(c.sliding_window));
        }
        Arch::Gemma3 => {
            j.remove("hidden_act");
            j.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            j.insert("attention_bias".into(), json!(attn_bias));
            j.insert(
                "query_pre_attn_scalar".into(),
                json!(f.query_pre_attn_scalar),
            );
            j.insert("sliding_window".into(), json!(c.sliding_window));
            let types: Vec<&str> = f
                .sliding_layers
                .iter()
                .map(|&s| {
                    if s {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            j.insert("layer_types".into(), json!(types));
            j.insert("rope_local_base_freq".into(), json!(f.rope_local_theta));
            j.insert("attn_logit_softcapping".into(), Value::Null);
            j.insert("final_logit_softcapping".into(), Value::Null);
        }
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => {}
    }
    if let Some(m) = &f.moe {
        let widths: HashSet<usize> = w
            .layers
            .iter()
            .filter_map(|l| l.extra.moe.as_ref())
            .flat_map(|m| m.experts.iter().map(|e| e.width()))
            .collect();
        let width = match widths.len() {
            1 => widths.into_iter().next().unwrap_or(m.expert_intermediate),
            _ => m.expert_intermediate,
        };
        let n_experts = w
            .layers
            .iter()
            .find_map(|l| l.extra.moe.as_ref())
            .map_or(m.num_experts, |x| x.experts.len());
        j.insert("num_experts_per_tok".into(), json!(m.top_k));
        j.insert("num_local_experts".into(), json!(n_experts));
        if c.arch == Arch::Qwen3Moe {
            j.insert("num_experts".into(), json!(n_experts));
            j.insert("moe_intermediate_size".into(), json!(width));
            j.insert("norm_topk_prob".into(), json!(m.norm_topk_prob));
            j.insert("decoder_sparse_step".into(), json!(1));
            j.insert("mlp_only_layers".into(), json!([]));
            j.insert("intermediate_size".into(), json!(c.intermediate_size));
        } else {
            j.insert("intermediate_size".into(), json!(width));
        }
    }
}

//! What the newer families add to an HF directory (docs/families.md): their `config.json`
//! fields and their tensors.
//!
//! - **qwen3 / qwen3_moe / gemma3_text**: `self_attn.q_norm.weight`, `self_attn.k_norm.weight`
//!   `[head_dim]`, per-head RMSNorm before RoPE; `head_dim` need not be `hidden / heads`.
//! - **phi3**: fused `self_attn.qkv_proj.weight` `[q + 2·kv, hidden]` (rows q, k, v) and
//!   `mlp.gate_up_proj.weight` `[2·ffn, hidden]` (rows gate, up), as transformers'
//!   `Phi3Attention` / `Phi3MLP` split them; lopper splits them on load (and the writer,
//!   [`crate::io::save`], fuses them again).
//! - **gemma3_text**: `post_attention_layernorm` is the norm *after* attention,
//!   `pre_feedforward_layernorm` the norm before the MLP, `post_feedforward_layernorm` after it;
//!   every RMSNorm computes `x·(1+w)`, stored by lopper as `1+w` (llama.cpp's convention). The
//!   layer pattern is `layer_types` (`sliding_attention` / `full_attention`), or older configs'
//!   `sliding_window_pattern` (every n-th layer global, default 6); RoPE bases are
//!   `rope_parameters.{sliding_attention,full_attention}.rope_theta`, or older configs'
//!   `rope_local_base_freq` (default 10000) and `rope_theta`.
//! - **mixtral**: router `block_sparse_moe.gate.weight` `[experts, hidden]`, experts
//!   `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down); expert count
//!   `num_local_experts`, width `intermediate_size`.
//! - **qwen3_moe**: router `mlp.gate.weight`, experts `mlp.experts.{e}.{gate,up,down}_proj`;
//!   expert count `num_experts` (or `num_local_experts`), width `moe_intermediate_size`.
//!
//! An expert count that disagrees with the tensors is refused naming the first tensor that
//! disagrees (the router's shape, a missing expert, or an expert beyond the count).

use super::{Fields, LayerSpec, TensorStore};
use crate::model::config::{Arch, Config, FamilyConfig, MoeConfig};
use crate::model::names;
pub use crate::model::weights::{concat_rows, split_rows};
use crate::model::weights::{Expert, LayerExtra, Linear, Moe, Tensor, Weights};
use crate::{Error, Result};
use serde_json::{Map, Value};

/// HF name (after `model.layers.{i}.`) of gemma3's norm before the MLP.
pub const PRE_FFN_NORM: &str = "pre_feedforward_layernorm.weight";
/// HF name of gemma3's norm after the MLP.
pub const POST_FFN_NORM: &str = "post_feedforward_layernorm.weight";
/// HF name of gemma3's norm after attention (the llama block's pre-MLP norm name).
pub const POST_ATTN_NORM: &str = names::MLP_NORM;

/// The activation a family's config must name: `hidden_act` (or gemma's `hidden_activation`).
pub(super) fn check_act(f: &Fields<'_>, arch: Arch) -> Result<()> {
    let (keys, ok): (&[&str], &[&str]) = match arch {
        Arch::Gemma3 => (
            &["hidden_activation", "hidden_act"],
            &["gelu_pytorch_tanh", "gelu_tanh"],
        ),
        _ => (&["hidden_act"], &["silu", "swish"]),
    };
    for k in keys {
        if let Some(act) = f.str(k)? {
            if !ok.contains(&act) {
                return Err(Error::config(
                    f.path,
                    format!(
                        "unsupported {k} `{act}` for {} (lopper implements {})",
                        arch.model_type(),
                        ok[0]
                    ),
                ));
            }
            return Ok(());
        }
    }
    Ok(())
}

/// The [`FamilyConfig`] of a config (default for llama / mistral / qwen2).
pub(super) fn parse_family(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<FamilyConfig> {
    let mut fam = FamilyConfig::default();
    let bad = |m: String| Err(Error::config(f.path, m));
    let rope_params = f.obj.get("rope_parameters").and_then(Value::as_object);
    let partial = f.f64("partial_rotary_factor")?.or_else(|| {
        rope_params
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
    });
    if let Some(p) = partial.filter(|&p| p != 1.0) {
        return bad(format!(
            "partial_rotary_factor {p} (RoPE on part of each head) is not supported"
        ));
    }
    match arch {
        Arch::Gemma3 => {
            for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = f.f64(key)? {
                    return bad(format!("{key} {v} is not supported (gemma3 has none)"));
                }
            }
            if f.bool("use_bidirectional_attention")? == Some(true) {
                return bad("use_bidirectional_attention is not supported".into());
            }
            fam.query_pre_attn_scalar = f.f64("query_pre_attn_scalar")?;
            fam.sliding_layers = gemma_layer_types(f, layers)?;
            fam.rope_local_theta = Some(local_theta(f, rope_params)?);
        }
        Arch::Mixtral | Arch::Qwen3Moe => fam.moe = Some(parse_moe(f, arch, layers)?),
        _ => {}
    }
    Ok(fam)
}

/// Gemma 3's per-layer attention type: `layer_types`, else `sliding_window_pattern` (also
/// transformers 5's `_sliding_window_pattern`): layer `i` is global when `(i + 1) % n == 0`.
fn gemma_layer_types(f: &Fields<'_>, layers: usize) -> Result<Vec<bool>> {
    if let Some(list) = f.get("layer_types") {
        let list = list
            .as_array()
            .ok_or_else(|| f.bad("layer_types", "a list", list))?;
        return list
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(f.bad(
                    "layer_types",
                    "a list of \"sliding_attention\" / \"full_attention\"",
                    t,
                )),
            })
            .collect();
    }
    let n = match f.usize("sliding_window_pattern")? {
        Some(n) => n,
        None => f.usize("_sliding_window_pattern")?.unwrap_or(6),
    };
    if n == 0 {
        return Err(Error::config(
            f.path,
            "sliding_window_pattern must be positive",
        ));
    }
    Ok((0..layers).map(|i| (i + 1) % n != 0).collect())
}

/// The sliding layers' RoPE base: `rope_parameters.sliding_attention.rope_theta`, else
/// `rope_local_base_freq`, else 10000.
fn local_theta(f: &Fields<'_>, params: Option<&Map<String, Value>>) -> Result<f64> {
    if let Some(Value::Object(s)) = params.and_then(|p| p.get("sliding_attention")) {
        let sf = Fields {
            obj: s,
            path: f.path,
            what: "rope_parameters.sliding_attention.",
        };
        if let Some(t) = sf.str("rope_type")?.filter(|t| *t != "default") {
            return Err(Error::config(
                f.path,
                format!("sliding-layer rope_type `{t}` is not supported (default only)"),
            ));
        }
        if let Some(t) = sf.f64("rope_theta")? {
            return Ok(t);
        }
    }
    Ok(f.f64("rope_local_base_freq")?.unwrap_or(10000.0))
}

fn parse_moe(f: &Fields<'_>, arch: Arch, layers: usize) -> Result<MoeConfig> {
    let num_experts = match f.usize("num_experts")? {
        Some(n) => n,
        None => f.req_usize("num_local_experts")?,
    };
    let top_k = f.req_usize("num_experts_per_tok")?;
    let (expert_intermediate, norm_topk_prob) = match arch {
        Arch::Qwen3Moe => {
            let step = f.usize("decoder_sparse_step")?.unwrap_or(1);
            let dense = match f.get("mlp_only_layers") {
                Some(Value::Array(a)) => !a.is_empty(),
                _ => false,
            };
            if dense || step != 1 && layers > 0 {
                return Err(Error::config(
                    f.path,
                    "qwen3_moe with dense layers (mlp_only_layers, decoder_sparse_step > 1) is \
                     not supported",
                ));
            }
            if f.usize("shared_expert_intermediate_size")?.unwrap_or(0) > 0 {
                return Err(Error::config(f.path, "shared experts are not supported"));
            }
            (
                f.req_usize("moe_intermediate_size")?,
                f.bool("norm_topk_prob")?.unwrap_or(false),
            )
        }
        _ => (f.req_usize("intermediate_size")?, true),
    };
    Ok(MoeConfig {
        num_experts,
        top_k,
        norm_topk_prob,
        expert_intermediate,
    })
}

/// Module path (after `model.layers.{i}.`) of a family's mixture, and its expert linears' names
/// (gate, up, down).
pub fn moe_names(arch: Arch) -> (&'static str, [&'static str; 3]) {
    match arch {
        Arch::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
        _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
    }
}

/// Phi-3's fused projections of layer `i`, split: (q, k, v, gate, up). `None` for the others.
pub(super) fn load_fused(
    store: &TensorStore,
    config: &Config,
    spec: &LayerSpec,
    i: usize,
) -> Result<Option<[Linear; 5]>> {
    if config.arch != Arch::Phi3 {
        return Ok(None);
    }
    let (h, hd) = (config.hidden_size, config.head_dim);
    let (q, kv) = (spec.num_attention_heads * hd, spec.num_key_value_heads * hd);
    let ff = spec.intermediate_size;
    let qkv = store.get(
        &names::layer_tensor(i, "self_attn.qkv_proj.weight"),
        &[q + 2 * kv, h],
    )?;
    let gu = store.get(
        &names::layer_tensor(i, "mlp.gate_up_proj.weight"),
        &[2 * ff, h],
    )?;
    let [wq, wk, wv] = split_rows(&qkv, [q, kv, kv]);
    let [wg, wu] = split_rows(&gu, [ff, ff]);
    let l = |t| Linear::new(t, None);
    Ok(Some([l(wq), l(wk), l(wv), l(wg), l(wu)]))
}

/// Empty dense MLP linears (gate, up, down) for a block whose MLP is a mixture of experts.
pub fn empty_mlp(h: usize) -> [Linear; 3] {
    [
        Linear::new(Tensor::zeros(vec![0, h]), None),
        Linear::new(Tensor::zeros(vec![0, h]), None),
        Linear::new(Tensor::zeros(vec![h, 0]), None),
    ]
}

/// The family tensors of layer `i`: q/k norms, gemma3's post-norms, the experts.
pub(super) fn load_extra(store: &TensorStore, config: &Config, i: usize) -> Result<LayerExtra> {
    let (h, hd) = (config.hidden_size, config.head_dim);
    let mut x = LayerExtra::default();
    let t = |name: &str, shape: &[usize]| store.get(&names::layer_tensor(i, name), shape);
    if config.arch.has_qk_norm() {
        x.q_norm = Some(t("self_attn.q_norm.weight", &[hd])?);
        x.k_norm = Some(t("self_attn.k_norm.weight", &[hd])?);
    }
    if config.arch == Arch::Gemma3 {
        x.post_attn_norm = Some(t(POST_ATTN_NORM, &[h])?);
        x.post_mlp_norm = Some(t(POST_FFN_NORM, &[h])?);
    }
    if let Some(mc) = &config.family.moe {
        x.moe = Some(load_moe(store, config, mc, i)?);
    }
    Ok(x)
}

fn load_moe(store: &TensorStore, config: &Config, mc: &MoeConfig, i: usize) -> Result<Moe> {
    let h = config.hidden_size;
    let (prefix, [g, u, d]) = moe_names(config.arch);
    let router = store.get(
        &names::layer_tensor(i, &format!("{prefix}.gate.weight")),
        &[mc.num_experts, h],
    )?;
    // An expert beyond the count is a disagreement too: name the first such tensor.
    let experts_prefix = names::layer_tensor(i, &format!("{prefix}.experts."));
    let mut beyond: Vec<(usize, &String)> = store
        .owner
        .keys()
        .filter_map(|k| {
            let e = k
                .strip_prefix(&experts_prefix)?
                .split('.')
                .next()?
                .parse()
                .ok()?;
            (e >= mc.num_experts).then_some((e, k))
        })
        .collect();
    beyond.sort();
    if let Some((_, name)) = beyond.first() {
        return Err(Error::config(
            &store.root,
            format!(
                "tensor `{name}` is an expert beyond the config's {} experts per layer",
                mc.num_experts
            ),
        ));
    }
    let mut experts = Vec::with_capacity(mc.num_experts);
    for e in 0..mc.num_experts {
        let name = |n: &str| format!("{experts_prefix}{e}.{n}.weight");
        // The width comes from the gate's shape, so experts pruned to their own widths load.
        let width = store
            .shape(&name(g))
            .map_or(mc.expert_intermediate, |s| s.first().copied().unwrap_or(0));
        experts.push(Expert {
            gate: Linear::new(store.get(&name(g), &[width, h])?, None),
            up: Linear::new(store.get(&name(u), &[width, h])?, None),
            down: Linear::new(store.get(&name(d), &[h, width])?, None),
        });
    }
    Ok(Moe { router, experts })
}

/// Bring loaded weights to lopper's conventions: gemma's norms `w` become `1+w`, its embedding
/// scale is set.
pub(super) fn finish(config: &Config, w: &mut Weights) {
    if config.arch.norm_plus_one() {
        let plus_one = |t: &mut Tensor| t.data_mut().iter_mut().for_each(|x| *x += 1.0);
        plus_one(&mut w.final_norm);
        for l in &mut w.layers {
            plus_one(&mut l.attn_norm);
            plus_one(&mut l.mlp_norm);
            let x = &mut l.extra;
            for t in [
                &mut x.q_norm,
                &mut x.k_norm,
                &mut x.post_attn_norm,
                &mut x.post_mlp_norm,
            ]
            .into_iter()
            .flatten()
            {
                plus_one(t);
            }
        }
    }
    if config.arch == Arch::Gemma3 {
        w.embed_scale = Some((config.hidden_size as f64).sqrt() as f32);
    }
}

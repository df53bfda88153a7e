//! Can transformers load this model? HF's Llama/Mistral/Qwen2 classes need every layer to have
//! the same shape, query heads a multiple of KV heads, and biases in the layout their config
//! flags express (`attention_bias` for q,k,v,o together in Llama; `mlp_bias` for gate,up,down).

use crate::{LinearKind, Model};

/// `Ok` when the model can be saved as a plain HF checkpoint; otherwise why not.
pub fn hf_compatible(model: &Model) -> Result<(), String> {
    let hd = model.config.head_dim;
    let Some(first) = model.weights.layers.first() else {
        return Err("the model has no layers".into());
    };
    let shape = |l: &crate::LayerWeights| (l.n_heads(hd), l.n_kv_heads(hd), l.intermediate());
    let want = shape(first);
    for (i, l) in model.weights.layers.iter().enumerate() {
        let got = shape(l);
        if got != want {
            return Err(format!(
                "layer {i} has (heads, kv heads, ffn) = {got:?} but layer 0 has {want:?}; transformers needs uniform layers (lopper and llama.cpp GGUF load per-layer shapes)"
            ));
        }
        let (h, kv, _) = got;
        if kv == 0 || h == 0 || h % kv != 0 {
            return Err(format!(
                "layer {i}: {h} query heads are not a multiple of {kv} KV heads (grouped-query attention needs whole groups)"
            ));
        }
        let has = |k: LinearKind| l.linear(k).bias.is_some();
        let groups: [&[LinearKind]; 2] = if model.config.arch == crate::Arch::Qwen2 {
            [&[LinearKind::Q, LinearKind::K, LinearKind::V], &[]]
        } else {
            [
                &[LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O],
                &[LinearKind::Gate, LinearKind::Up, LinearKind::Down],
            ]
        };
        for g in groups {
            if !g.is_empty() && g.iter().any(|&k| has(k)) && !g.iter().all(|&k| has(k)) {
                return Err(format!(
                    "layer {i}: biases on only some of {g:?}; the HF config flag covers them together"
                ));
            }
        }
        if model.config.arch == crate::Arch::Qwen2 {
            for k in [
                LinearKind::O,
                LinearKind::Gate,
                LinearKind::Up,
                LinearKind::Down,
            ] {
                if has(k) {
                    return Err(format!("layer {i}: Qwen2 has no bias on {k:?}"));
                }
            }
        }
    }
    Ok(())
}

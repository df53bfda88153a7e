//! Whether transformers could load a (pruned) model as an ordinary HF checkpoint.
//!
//! lopper saves and loads anything its forward pass runs, describing per-layer shapes with the
//! `lopper_layers` config extension ([`crate::io::hf`]). transformers ignores that key and builds
//! every layer from the top-level `num_attention_heads`, `num_key_value_heads` and
//! `intermediate_size`, so a model is HF-loadable only when every layer has the same shapes, the
//! query heads split evenly over the KV heads, and the biases fit the architecture's flags
//! (llama: `attention_bias` for q/k/v/o together, `mlp_bias` for gate/up/down together —
//! missing members are saved as zeros; qwen2: q/k/v biases only; mistral: none).
//! [`hf_compatible`] says why not, for the CLI's `--hf-strict` check.

use crate::io::hf::LayerSpec;
use crate::model::config::Arch;
use crate::{LinearKind, Model};

/// `Ok(())` when transformers can load `model` once saved with [`crate::io::save::save_hf`];
/// otherwise every reason, one per line.
pub fn hf_compatible(model: &Model) -> std::result::Result<(), String> {
    let w = &model.weights;
    let hd = model.config.head_dim;
    let hidden = w.embed.cols();
    let mut why: Vec<String> = Vec::new();
    if w.layers.is_empty() {
        return Err("the model has no layers".into());
    }
    if hd == 0 {
        return Err("head_dim is 0".into());
    }
    for (i, l) in w.layers.iter().enumerate() {
        if l.attn_shortcut.is_some() || l.mlp_shortcut.is_some() {
            why.push(format!(
                "layer {i} has SliceGPT residual shortcuts, which transformers' llama classes lack"
            ));
        }
        for kind in LinearKind::ALL {
            if l.linear(kind).is_factored() {
                why.push(format!(
                    "layer {i}: {} is a low-rank pair, which transformers' llama classes lack",
                    kind.hf_name()
                ));
            }
        }
        if l.q.out_features() % hd != 0 || l.k.out_features() % hd != 0 {
            why.push(format!(
                "layer {i}: q/k rows {}/{} are not whole heads of {hd}",
                l.q.out_features(),
                l.k.out_features()
            ));
        }
    }
    let specs: Vec<LayerSpec> = w
        .layers
        .iter()
        .map(|l| LayerSpec::of_layer(l, hd))
        .collect();
    let first = specs[0];
    let differ: Vec<usize> = (0..specs.len()).filter(|&i| specs[i] != first).collect();
    if !differ.is_empty() {
        why.push(format!(
            "layers differ in shape (transformers builds every layer alike): layer 0 has {} heads / {} KV heads / FFN {}, but layers {:?} do not",
            first.num_attention_heads, first.num_key_value_heads, first.intermediate_size, differ
        ));
    }
    for (i, s) in specs.iter().enumerate() {
        let (h, kv) = (s.num_attention_heads, s.num_key_value_heads);
        if h == 0 || kv == 0 || h % kv != 0 {
            why.push(format!(
                "layer {i}: {h} query heads over {kv} KV heads is not a valid grouped-query layout"
            ));
        }
        if s.intermediate_size == 0 {
            why.push(format!("layer {i}: the FFN has no channels"));
        }
    }
    for (i, l) in w.layers.iter().enumerate() {
        for kind in LinearKind::ALL {
            let expect = specs[i].linear_shape(kind, hidden, hd);
            if l.linear(kind).weight.shape != expect {
                why.push(format!(
                    "layer {i}: {} has shape {:?}, HF expects {:?}",
                    kind.hf_name(),
                    l.linear(kind).weight.shape,
                    expect
                ));
            }
        }
    }
    let has = |kinds: &[LinearKind]| {
        w.layers
            .iter()
            .any(|l| kinds.iter().any(|k| l.linear(*k).bias.is_some()))
    };
    match model.config.arch {
        Arch::Llama => {}
        Arch::Mistral => {
            if has(&LinearKind::ALL) {
                why.push("mistral checkpoints have no biases, but this model has some (e.g. from bias compensation)".into());
            }
        }
        Arch::Qwen2 => {
            if has(&[LinearKind::O]) {
                why.push(
                    "qwen2 has no o_proj bias, but this model has one (head bias compensation)"
                        .into(),
                );
            }
            if has(&[LinearKind::Gate, LinearKind::Up, LinearKind::Down]) {
                why.push(
                    "qwen2 has no MLP biases, but this model has some (neuron bias compensation)"
                        .into(),
                );
            }
        }
        Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 => {
            if has(&[LinearKind::Gate, LinearKind::Up, LinearKind::Down]) {
                why.push(format!(
                    "{} has no MLP biases, but this model has some (neuron bias compensation)",
                    model.config.arch.model_type()
                ));
            }
        }
        Arch::Phi3 | Arch::Mixtral => {
            if has(&LinearKind::ALL) {
                why.push(format!(
                    "{} checkpoints have no biases, but this model has some (e.g. from bias \
                     compensation)",
                    model.config.arch.model_type()
                ));
            }
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("\n"))
    }
}

//! HF tensor names: the one place that spells `model.layers.{i}.…`.
//!
//! Loaders, writers, the runtime's packing notes and the pruning reports all name tensors the
//! way transformers' Llama modules do; every such name is built (or parsed) here, so the
//! spelling cannot drift between the files that read and write it. [`LinearKind`], the seven
//! linears of a block, lives here too because its main job is naming: this module depends on
//! nothing else in the crate.

/// Embedding table `[vocab, hidden]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm scale `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// LM head `[vocab, hidden]` (absent when tied to the embedding).
pub const LM_HEAD: &str = "lm_head.weight";
/// Prefix of every block tensor's name (`model.layers.{i}.…`).
pub const LAYERS_PREFIX: &str = "model.layers.";
/// Tensor name (after `model.layers.{i}.`) of a block's RMSNorm scale before attention.
pub const ATTN_NORM: &str = "input_layernorm.weight";
/// Tensor name (after `model.layers.{i}.`) of a block's RMSNorm scale before the MLP.
pub const MLP_NORM: &str = "post_attention_layernorm.weight";

/// The seven linear layers of a block, in HF order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// HF module path inside a block, e.g. `self_attn.q_proj`.
    pub fn hf_name(self) -> &'static str {
        match self {
            LinearKind::Q => "self_attn.q_proj",
            LinearKind::K => "self_attn.k_proj",
            LinearKind::V => "self_attn.v_proj",
            LinearKind::O => "self_attn.o_proj",
            LinearKind::Gate => "mlp.gate_proj",
            LinearKind::Up => "mlp.up_proj",
            LinearKind::Down => "mlp.down_proj",
        }
    }

    /// True for attention projections.
    pub fn is_attention(self) -> bool {
        matches!(
            self,
            LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::O
        )
    }
}

/// Tensor name suffix (after the linear's HF path) of a low-rank layer's right factor `V`
/// `[rank, in]`, the first one applied (like `torch.nn.Sequential(Linear(in, rank), Linear(rank,
/// out))`).
pub const LOW_RANK_V: &str = "low_rank.0.weight";
/// Tensor name suffix of a low-rank layer's left factor `U` `[out, rank]`.
pub const LOW_RANK_U: &str = "low_rank.1.weight";
/// Tensor name (after `model.layers.{i}.`) of a block's attention residual shortcut.
pub const ATTN_SHORTCUT: &str = "attn_shortcut.weight";
/// Tensor name (after `model.layers.{i}.`) of a block's MLP residual shortcut.
pub const MLP_SHORTCUT: &str = "mlp_shortcut.weight";

/// `model.layers.{layer}`: the module path of block `layer` (no trailing dot).
pub fn layer_prefix(layer: usize) -> String {
    format!("{LAYERS_PREFIX}{layer}")
}

/// `model.layers.{layer}.{name}`: a tensor of block `layer` (`name` e.g. [`ATTN_NORM`]).
pub fn layer_tensor(layer: usize, name: &str) -> String {
    format!("{LAYERS_PREFIX}{layer}.{name}")
}

/// `model.layers.{layer}.self_attn.q_proj` …: the module path of a block linear.
pub fn linear_module(layer: usize, kind: LinearKind) -> String {
    layer_tensor(layer, kind.hf_name())
}

/// HF name of a block linear's weight, `model.layers.{layer}.{kind.hf_name()}.weight`.
pub fn tensor_name(layer: usize, kind: LinearKind) -> String {
    format!("{}.weight", linear_module(layer, kind))
}

/// [`linear_module`] backwards: `(layer, kind)` for a module path of a block below `n_layers`.
pub fn parse_linear_module(module: &str, n_layers: usize) -> Option<(usize, LinearKind)> {
    let rest = module.strip_prefix(LAYERS_PREFIX)?;
    let (idx, name) = rest.split_once('.')?;
    let i: usize = idx.parse().ok()?;
    let kind = LinearKind::ALL.into_iter().find(|k| k.hf_name() == name)?;
    (i < n_layers).then_some((i, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for layer in [0, 7, 31] {
            for kind in LinearKind::ALL {
                let m = linear_module(layer, kind);
                assert_eq!(parse_linear_module(&m, layer + 1), Some((layer, kind)));
                assert_eq!(
                    parse_linear_module(&m, layer),
                    None,
                    "{m}: layer out of range"
                );
            }
        }
        assert_eq!(
            tensor_name(3, LinearKind::Up),
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(
            parse_linear_module("model.layers.0.input_layernorm", 2),
            None
        );
        assert_eq!(parse_linear_module("model.layers.x.mlp.up_proj", 2), None);
    }
}

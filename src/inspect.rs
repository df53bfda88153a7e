//! What a model is made of: architecture, every tensor's shape/dtype/sparsity, parameter counts.
//! Shared by `lopper inspect` and the reports of later commands.

use crate::model::weights::Storage;
use crate::Model;
use serde::Serialize;

/// One tensor's facts.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub shape: Vec<usize>,
    /// In-memory dtype (lopper computes in f32).
    pub dtype: &'static str,
    /// `mapped` (zero-copy view of the file) or `owned`.
    pub storage: &'static str,
    pub params: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

/// A whole model's facts.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub source: String,
    pub config: crate::Config,
    pub layers: usize,
    /// Per-layer (query heads, kv heads, FFN width), from the weight shapes.
    pub layer_shapes: Vec<(usize, usize, usize)>,
    pub total_params: usize,
    /// Parameters of the block linear layers (what pruning methods act on; both factors of a
    /// low-rank layer).
    pub linear_params: usize,
    pub linear_zeros: usize,
    pub linear_sparsity: f64,
    pub embedding_params: usize,
    /// Parameters of SliceGPT residual shortcuts.
    pub shortcut_params: usize,
    pub tensors: Vec<TensorSummary>,
}

/// Summarise `model` (counts zeros in every tensor: O(parameters)).
pub fn summarize(model: &Model) -> ModelSummary {
    let w = &model.weights;
    let hd = model.config.head_dim;
    let tensors: Vec<TensorSummary> = w
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let zeros = t.count_zeros();
            t.release_pages();
            TensorSummary {
                name,
                shape: t.shape.clone(),
                dtype: "f32",
                storage: match t.data {
                    Storage::Owned(_) => "owned",
                    Storage::Mapped { .. } => "mapped",
                    Storage::Lazy { .. } => "lazy",
                },
                params: t.len(),
                zeros,
                sparsity: if t.is_empty() {
                    0.0
                } else {
                    zeros as f64 / t.len() as f64
                },
            }
        })
        .collect();
    let is_linear = |n: &str| n.contains("_proj.weight") || n.contains("_proj.low_rank.");
    let linear_params: usize = tensors
        .iter()
        .filter(|t| is_linear(&t.name))
        .map(|t| t.params)
        .sum();
    let linear_zeros: usize = tensors
        .iter()
        .filter(|t| is_linear(&t.name))
        .map(|t| t.zeros)
        .sum();
    ModelSummary {
        source: model.source.display().to_string(),
        config: model.config.clone(),
        layers: w.layers.len(),
        layer_shapes: w
            .layers
            .iter()
            .map(|l| (l.n_heads(hd), l.n_kv_heads(hd), l.intermediate()))
            .collect(),
        total_params: tensors.iter().map(|t| t.params).sum(),
        linear_params,
        linear_zeros,
        linear_sparsity: if linear_params == 0 {
            0.0
        } else {
            linear_zeros as f64 / linear_params as f64
        },
        embedding_params: w.embed.len() + w.lm_head.as_ref().map_or(0, |h| h.len()),
        shortcut_params: w
            .layers
            .iter()
            .flat_map(|l| [&l.attn_shortcut, &l.mlp_shortcut])
            .flatten()
            .map(|t| t.len())
            .sum(),
        tensors,
    }
}

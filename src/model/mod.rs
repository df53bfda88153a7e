//! The model: configuration, weights and the forward pass, as plain data and plain functions.

pub mod act;
pub mod act_rules;
pub mod config;
pub mod flops;
pub mod forward;
pub mod moe;
pub mod names;
pub mod observer;
pub mod rope;
pub mod spill;
pub mod weights;

use std::path::PathBuf;

/// A loaded model: what it is, its weights, and how to tokenize text for it.
#[derive(Clone)]
pub struct Model {
    pub config: config::Config,
    pub weights: weights::Weights,
    /// The tokenizer, when the source has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Jinja chat template from the source, when present.
    pub chat_template: Option<String>,
    /// The file or directory the model was loaded from.
    pub source: PathBuf,
}

impl Model {
    /// The lopper structural extensions this model uses, which plain HF / GGUF readers do not
    /// know (empty for an ordinary model): `"low_rank"` (factorised linears), `"shortcuts"`
    /// (SliceGPT residual rotations), `"rms_norm_dim"` (RMSNorm over a width other than
    /// `hidden_size`). A writer for a format without them must refuse such a model.
    pub fn lopper_extensions(&self) -> Vec<&'static str> {
        let layers = &self.weights.layers;
        let mut out = Vec::new();
        let factored = layers.iter().any(|l| {
            weights::LinearKind::ALL
                .iter()
                .any(|&k| l.linear(k).is_factored())
        });
        if factored {
            out.push("low_rank");
        }
        if layers
            .iter()
            .any(|l| l.attn_shortcut.is_some() || l.mlp_shortcut.is_some())
        {
            out.push("shortcuts");
        }
        if self.config.norm_dim() != self.config.hidden_size {
            out.push("rms_norm_dim");
        }
        out
    }

    /// The tokenizer, or an error naming the model source.
    pub fn tokenizer(&self) -> crate::Result<&tokenizers::Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| crate::Error::Tokenizer {
                path: self.source.clone(),
                msg: "the model has no tokenizer (HF directories need tokenizer.json)".into(),
            })
    }
}

//! The model: configuration, weights and the forward pass, as plain data and plain functions.

pub mod config;
pub mod flops;
pub mod forward;
pub mod observer;
pub mod rope;
pub mod weights;

use std::path::PathBuf;

/// A loaded model: what it is, its weights, and how to tokenize text for it.
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

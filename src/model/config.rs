//! Model hyper-parameters, independent of the file format they came from.
//!
//! A [`Config`] holds the *nominal* shapes (those of an unpruned model). Structured pruning may
//! make layers differ; the forward pass therefore reads per-layer head counts and widths from the
//! weight shapes and uses the config only for what weights cannot tell (head_dim, RoPE, eps).

use serde::{Deserialize, Serialize};

/// Supported architecture families (read from HF configs in `crate::io::hf` and GGUF metadata in
/// `crate::io::gguf::meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 1/2/3, SmolLM, TinyLlama.
    Llama,
    /// Mistral: the llama block, optionally with sliding-window attention
    /// ([`Config::sliding_window`]); kept apart to write the right HF `model_type` back.
    Mistral,
    /// Qwen2: llama block with q/k/v biases.
    Qwen2,
}

impl Arch {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// The HF `architectures[0]` class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// Parse an HF `model_type` or GGUF `general.architecture` string.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    /// Names accepted by [`Arch::parse`], for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    Default,
    /// Position interpolation: positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 frequency-dependent scaling (Meta's `apply_scaling`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Hyper-parameters of a decoder-only Llama-family transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Nominal FFN width (layers may be narrower after pruning).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Nominal query heads per layer.
    pub num_attention_heads: usize,
    /// Nominal KV heads per layer (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RMSNorm divisor when it is not `hidden_size`: `x / sqrt(Σx²/rms_norm_dim + eps)`.
    /// SliceGPT sets it to the original width, so a sliced model normalises like its parent
    /// (the official `RMSN(mean_dim)` module). `None`: `hidden_size`.
    #[serde(default)]
    pub rms_norm_dim: Option<usize>,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Sliding-window attention (Mistral's `sliding_window`): a query at position `i` sees the
    /// keys `i + 1 − W ..= i`. `None`: plain causal attention over the whole sequence.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (llama `attention_bias`, always for qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (llama `attention_bias`; never for qwen2).
    pub o_bias: bool,
    /// Biases on gate/up/down (llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Config {
    /// The RMSNorm divisor: [`Config::rms_norm_dim`], else `hidden_size`.
    pub fn norm_dim(&self) -> usize {
        self.rms_norm_dim.unwrap_or(self.hidden_size)
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Check internal consistency; `what` names the source in the error.
    pub fn validate(&self, path: &std::path::Path) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::config(path, m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.head_dim == 0 {
            return bad("head counts and head_dim must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rms_norm_dim == Some(0) {
            return bad("rms_norm_dim must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive (or null for no window)".into());
        }
        // Negated so that NaN fails too.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(self.rope_theta > 0.0) || !(self.rms_norm_eps >= 0.0) {
            return bad("rope_theta must be > 0 and rms_norm_eps >= 0".into());
        }
        Ok(())
    }
}

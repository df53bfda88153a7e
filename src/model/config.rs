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
    /// Qwen3: llama block with per-head RMSNorm on q and k (`q_norm`, `k_norm`) and an explicit
    /// `head_dim` (not `hidden / heads`). See docs/families.md.
    Qwen3,
    /// Phi-3 / Phi-4 (mini): llama block stored with fused `qkv_proj` and `gate_up_proj`, split
    /// into lopper's separate linears on load and fused again on save.
    Phi3,
    /// Gemma 3 text: (1+w) RMSNorms before and after each sublayer, q/k norms, GELU-tanh MLP,
    /// √hidden embedding scale, sliding / global layers with two RoPE bases.
    Gemma3,
    /// Mixtral: the mistral block with a top-k mixture of SwiGLU experts instead of the MLP.
    Mixtral,
    /// Qwen3-MoE: the qwen3 block with a top-k mixture of experts instead of the MLP.
    Qwen3Moe,
}

impl Arch {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3_text",
            Arch::Mixtral => "mixtral",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Every family, in the order of [`Arch::SUPPORTED`].
    pub const ALL: [Arch; 8] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma3,
        Arch::Mixtral,
        Arch::Qwen3Moe,
    ];

    /// Per-head RMSNorm on q and k before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3 | Arch::Qwen3Moe)
    }

    /// A mixture of experts in place of the MLP.
    pub fn is_moe(self) -> bool {
        matches!(self, Arch::Mixtral | Arch::Qwen3Moe)
    }

    /// Gemma's RMSNorm `x·(1+w)`: lopper stores `1+w` (as llama.cpp's converter does), so the
    /// HF reader adds 1 and the HF writer subtracts it.
    pub fn norm_plus_one(self) -> bool {
        self == Arch::Gemma3
    }

    /// The MLP activation.
    pub fn act(self) -> Act {
        match self {
            Arch::Gemma3 => Act::GeluTanh,
            _ => Act::Silu,
        }
    }

    /// llama.cpp's `general.architecture` for this family (Mistral and Mixtral are `llama`
    /// there, as llama.cpp's converter writes them).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral | Arch::Mixtral => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen3Moe => "qwen3moe",
        }
    }

    /// The HF `architectures[0]` class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// Parse an HF `model_type` or GGUF `general.architecture` string.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "phi3" => Some(Arch::Phi3),
            "gemma3_text" => Some(Arch::Gemma3),
            "mixtral" => Some(Arch::Mixtral),
            "qwen3_moe" => Some(Arch::Qwen3Moe),
            _ => None,
        }
    }

    /// Names accepted by [`Arch::parse`], for error messages.
    pub const SUPPORTED: &'static str =
        "llama, mistral, qwen2, qwen3, phi3, gemma3_text, mixtral, qwen3_moe";
}

/// The MLP's activation (the gate's nonlinearity in `act(gate(x)) · up(x)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// SwiGLU: `silu(x) = x·σ(x)`.
    Silu,
    /// GeGLU with PyTorch's tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router `[experts, hidden]` scores every
/// token, the `top_k` best experts run, and their outputs are summed weighted by the softmax
/// probabilities of the chosen experts, renormalised to sum 1 when `norm_topk_prob` (Mixtral:
/// softmax over the chosen logits, the same numbers; Qwen3-MoE: its `norm_topk_prob` flag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
    /// Nominal width of one expert (Qwen3-MoE `moe_intermediate_size`, Mixtral
    /// `intermediate_size`); experts may be narrower after pruning.
    pub expert_intermediate: usize,
}

/// What the newer families add to the llama block (all absent for llama / mistral / qwen2).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FamilyConfig {
    /// Gemma 3: attention scores scaled by `query_pre_attn_scalar^-1/2` instead of
    /// `head_dim^-1/2`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Per layer: `true` for sliding-window attention over [`Config::sliding_window`] positions
    /// with RoPE base [`FamilyConfig::rope_local_theta`], `false` for global attention with
    /// [`Config::rope_theta`] and [`Config::rope_scaling`]. Empty: every layer uses
    /// `sliding_window` (when set) and the global RoPE, as before.
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding layers (Gemma 3 `rope_local_base_freq`), no scaling.
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// The mixture of experts, when the MLP is one.
    #[serde(default)]
    pub moe: Option<MoeConfig>,
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
    /// The newer families' additions (default: none).
    #[serde(default)]
    pub family: FamilyConfig,
}

impl Config {
    /// The RMSNorm divisor: [`Config::rms_norm_dim`], else `hidden_size`.
    pub fn norm_dim(&self) -> usize {
        self.rms_norm_dim.unwrap_or(self.hidden_size)
    }

    /// The attention window of block `layer` (see [`FamilyConfig::sliding_layers`]).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match self.family.sliding_layers.get(layer) {
            Some(false) => None,
            _ => self.sliding_window,
        }
    }

    /// Whether block `layer` uses the local RoPE base ([`FamilyConfig::rope_local_theta`]).
    pub fn layer_local_rope(&self, layer: usize) -> bool {
        self.family.rope_local_theta.is_some()
            && self
                .family
                .sliding_layers
                .get(layer)
                .copied()
                .unwrap_or(false)
    }

    /// The attention score scale: `query_pre_attn_scalar^-1/2` (Gemma), else `head_dim^-1/2`.
    pub fn attn_scale(&self) -> f32 {
        let s = self
            .family
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64);
        (1.0 / s.sqrt()) as f32
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
        if let Some(m) = &self.family.moe {
            if m.num_experts == 0 || m.top_k == 0 || m.top_k > m.num_experts {
                return bad(format!(
                    "a mixture of {} experts with {} per token is not valid",
                    m.num_experts, m.top_k
                ));
            }
        }
        let sl = &self.family.sliding_layers;
        if !sl.is_empty() && sl.len() != self.num_hidden_layers {
            return bad(format!(
                "{} layer types for {} layers",
                sl.len(),
                self.num_hidden_layers
            ));
        }
        Ok(())
    }
}

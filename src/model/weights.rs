//! Model weights as plain data.
//!
//! [`Tensor`] is a row-major f32 array that is either owned or a view into a memory-mapped file
//! (HF f32 safetensors are mapped, not copied, so a large model does not have to fit in RAM).
//! [`Weights`] mirrors the HF module tree; every field documents its shape.

use std::sync::Arc;

/// Backing store of a [`Tensor`].
#[derive(Clone)]
pub enum Storage {
    /// Heap-owned values.
    Owned(Vec<f32>),
    /// `len` f32 values at byte `offset` of a mapped file (offset is 4-byte aligned).
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

/// A row-major f32 tensor.
#[derive(Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.data {
            Storage::Owned(_) => "owned",
            Storage::Mapped { .. } => "mapped",
        };
        write!(f, "Tensor({:?}, {kind})", self.shape)
    }
}

impl Tensor {
    /// An owned tensor; panics if `data.len()` disagrees with `shape` (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data length does not match shape {shape:?}"
        );
        Tensor {
            shape,
            data: Storage::Owned(data),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape, vec![0.0; n])
    }

    /// A view of `len` f32 at `offset` in `map`; returns `None` when misaligned or out of range.
    pub fn mapped(shape: Vec<usize>, map: Arc<memmap2::Mmap>, offset: usize) -> Option<Tensor> {
        let len: usize = shape.iter().product();
        let end = offset.checked_add(len.checked_mul(4)?)?;
        if end > map.len() || (map.as_ptr() as usize + offset) % 4 != 0 {
            return None;
        }
        Some(Tensor {
            shape,
            data: Storage::Mapped { map, offset, len },
        })
    }

    /// The values.
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * 4])
            }
        }
    }

    /// Mutable values; a mapped tensor is copied into memory first (copy-on-write).
    pub fn data_mut(&mut self) -> &mut [f32] {
        if let Storage::Mapped { .. } = self.data {
            self.data = Storage::Owned(self.data().to_vec());
        }
        match &mut self.data {
            Storage::Owned(v) => v,
            Storage::Mapped { .. } => unreachable!(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of a 2-D tensor (first dim).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Columns of a 2-D tensor (last dim).
    pub fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }

    /// Number of exactly-zero values.
    pub fn count_zeros(&self) -> usize {
        self.data().iter().filter(|v| **v == 0.0).count()
    }
}

/// A weight matrix packed into a compressed format for the runtime (see
/// [`crate::runtime::pack`]): the same values as the dense `weight` (or their bf16 / int8
/// rounding), stored so that a product reads fewer bytes.
#[derive(Debug, Clone)]
pub struct Packed {
    pub format: Arc<dyn crate::formats::WeightFormat>,
    /// Products with up to this many rows of `x` use `format`; larger ones (prefill, where the
    /// format measured slower than dense GEMM) use the dense weight.
    pub max_rows: usize,
}

/// A linear layer `y = x Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out_features, in_features]` (HF / PyTorch layout).
    pub weight: Tensor,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// The runtime's packed copy of `weight`, when the model was packed.
    pub packed: Option<Packed>,
}

impl Linear {
    /// A dense layer.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            packed: None,
        }
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }
}

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

/// Weights of one transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `[hidden]` RMSNorm scale before attention.
    pub attn_norm: Tensor,
    /// q_proj `[n_heads·head_dim, hidden]`.
    pub q: Linear,
    /// k_proj `[n_kv_heads·head_dim, hidden]`.
    pub k: Linear,
    /// v_proj `[n_kv_heads·head_dim, hidden]`.
    pub v: Linear,
    /// o_proj `[hidden, n_heads·head_dim]`.
    pub o: Linear,
    /// `[hidden]` RMSNorm scale before the MLP.
    pub mlp_norm: Tensor,
    /// gate_proj `[intermediate, hidden]`.
    pub gate: Linear,
    /// up_proj `[intermediate, hidden]`.
    pub up: Linear,
    /// down_proj `[hidden, intermediate]`.
    pub down: Linear,
}

impl LayerWeights {
    pub fn linear(&self, kind: LinearKind) -> &Linear {
        match kind {
            LinearKind::Q => &self.q,
            LinearKind::K => &self.k,
            LinearKind::V => &self.v,
            LinearKind::O => &self.o,
            LinearKind::Gate => &self.gate,
            LinearKind::Up => &self.up,
            LinearKind::Down => &self.down,
        }
    }

    pub fn linear_mut(&mut self, kind: LinearKind) -> &mut Linear {
        match kind {
            LinearKind::Q => &mut self.q,
            LinearKind::K => &mut self.k,
            LinearKind::V => &mut self.v,
            LinearKind::O => &mut self.o,
            LinearKind::Gate => &mut self.gate,
            LinearKind::Up => &mut self.up,
            LinearKind::Down => &mut self.down,
        }
    }

    /// Query heads of this layer (from the q_proj shape).
    pub fn n_heads(&self, head_dim: usize) -> usize {
        self.q.out_features() / head_dim
    }

    /// KV heads of this layer (from the k_proj shape).
    pub fn n_kv_heads(&self, head_dim: usize) -> usize {
        self.k.out_features() / head_dim
    }

    /// FFN width of this layer.
    pub fn intermediate(&self) -> usize {
        self.gate.out_features()
    }
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab, hidden]` token embedding.
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    /// `[hidden]` final RMSNorm scale.
    pub final_norm: Tensor,
    /// `[vocab, hidden]` LM head; `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    /// The runtime's packed copy of the LM head (tied or not), when the model was packed.
    pub lm_head_packed: Option<Packed>,
}

impl Weights {
    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every tensor with its HF name, in a stable order.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.attn_norm));
            for kind in LinearKind::ALL {
                let lin = l.linear(kind);
                out.push((format!("{p}.{}.weight", kind.hf_name()), &lin.weight));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{}.bias", kind.hf_name()), b));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), &l.mlp_norm));
        }
        out.push(("model.norm.weight".to_string(), &self.final_norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// Total number of parameters (a tied head counted once).
    pub fn num_params(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.len()).sum()
    }
}

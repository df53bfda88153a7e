//! Model weights as plain data.
//!
//! [`Tensor`] is a row-major f32 array that is owned, a view into a memory-mapped file (HF f32
//! safetensors are mapped, not copied, so a large model does not have to fit in RAM), or
//! converted on first use from a source such as bf16 bytes in a mapped file ([`Storage::Lazy`],
//! for block-at-a-time work on models whose f32 weights do not fit).
//! [`Weights`] mirrors the HF module tree; every field documents its shape.

use super::names;
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

/// Where a [`Storage::Lazy`] tensor's values come from. Converting cannot fail: a source is
/// validated when it is created.
pub trait Source: Send + Sync {
    /// The values, row-major f32.
    fn values(&self) -> Vec<f32>;
    /// What it is, for debugging output.
    fn describe(&self) -> String;
}

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
    /// Converted from `source` when first read and kept in `cache` until [`Tensor::release`].
    Lazy {
        source: Arc<dyn Source>,
        cache: OnceLock<Vec<f32>>,
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
        let kind = match &self.data {
            Storage::Owned(_) => "owned".to_string(),
            Storage::Mapped { .. } => "mapped".to_string(),
            Storage::Lazy { source, .. } => format!("lazy from {}", source.describe()),
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
        if end > map.len() || !(map.as_ptr() as usize + offset).is_multiple_of(4) {
            return None;
        }
        Some(Tensor {
            shape,
            data: Storage::Mapped { map, offset, len },
        })
    }

    /// A tensor converted from `source` on first use.
    pub fn lazy(shape: Vec<usize>, source: Arc<dyn Source>) -> Tensor {
        Tensor {
            shape,
            data: Storage::Lazy {
                source,
                cache: OnceLock::new(),
            },
        }
    }

    /// The values (a lazy tensor is converted now and keeps them until [`Tensor::release`]).
    pub fn data(&self) -> &[f32] {
        match &self.data {
            Storage::Owned(v) => v,
            Storage::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * 4])
            }
            Storage::Lazy { source, cache } => cache.get_or_init(|| self.convert(source)),
        }
    }

    /// `source`'s values, checked against the shape (a source giving another count is a
    /// programming error).
    fn convert(&self, source: &Arc<dyn Source>) -> Vec<f32> {
        let v = source.values();
        assert_eq!(
            v.len(),
            self.len(),
            "{}: wrong value count",
            source.describe()
        );
        v
    }

    /// The values without keeping a conversion: a lazy tensor not converted yet is converted
    /// into the returned copy only (for one-off reads of a whole model: saving, statistics).
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &self.data {
            Storage::Lazy { source, cache } if cache.get().is_none() => {
                Cow::Owned(self.convert(source))
            }
            _ => Cow::Borrowed(self.data()),
        }
    }

    /// Mutable values; a mapped or lazy tensor is copied into memory first (copy-on-write).
    pub fn data_mut(&mut self) -> &mut [f32] {
        if !matches!(self.data, Storage::Owned(_)) {
            let kept = match &mut self.data {
                Storage::Lazy { cache, .. } => cache.take(),
                _ => None,
            };
            self.data = Storage::Owned(kept.unwrap_or_else(|| self.values().into_owned()));
        }
        match &mut self.data {
            Storage::Owned(v) => v,
            _ => unreachable!(),
        }
    }

    /// Let go of what a mapped or lazy tensor holds in memory: a lazy tensor's conversion, a
    /// mapped tensor's resident pages (see [`Tensor::release_pages`]). It stays readable. No-op
    /// for owned data. Lets a pass over a large model keep only what it works on resident.
    pub fn release(&mut self) {
        if let Storage::Lazy { cache, .. } = &mut self.data {
            cache.take();
        }
        self.release_pages();
    }

    /// Drop the resident pages of a mapped tensor from this process (the pages come back from
    /// the page cache or the file when touched). No-op for other storage.
    pub fn release_pages(&self) {
        if let Storage::Mapped { map, offset, len } = &self.data {
            crate::util::drop_pages(map, *offset, len * 4);
        }
    }

    /// Number of values held (or, for a lazy tensor, that conversion gives), without reading
    /// them; equals [`Tensor::len`] for every well-formed tensor.
    pub fn stored_len(&self) -> usize {
        match &self.data {
            Storage::Owned(v) => v.len(),
            Storage::Mapped { len, .. } => *len,
            Storage::Lazy { .. } => self.len(),
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
        self.values().iter().filter(|v| **v == 0.0).count()
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

/// How a [`Linear`] stores its matrix. The mode is this enum; the runtime's packed copy
/// ([`Linear::packed`]) is not a mode but a cache of [`Linear::weight`] (either
/// representation's first matrix), so it stays an `Option` beside it.
#[derive(Debug, Clone)]
pub enum LinearRepr {
    /// [`Linear::weight`] is the whole matrix `W`, `[out_features, in_features]`.
    Dense,
    /// `W ≈ U·V` (see [`crate::structured::lowrank`]): [`Linear::weight`] is the right factor
    /// `V`, `[rank, in_features]`, applied first; `u` is the left factor `[out_features, rank]`.
    LowRank { u: Tensor },
}

/// A linear layer `y = x Wᵀ + b`, or, when low-rank factorised, `y = x Vᵀ Uᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The matrix `x` meets first: `W` `[out_features, in_features]` (HF / PyTorch layout) for
    /// a dense layer, the right factor `V` `[rank, in_features]` for a low-rank one. Code that
    /// needs the dense matrix (unstructured pruning, statistics over weights) must check
    /// [`Linear::is_factored`].
    pub weight: Tensor,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// Dense or low-rank.
    pub repr: LinearRepr,
    /// The runtime's packed copy of `weight`, when the model was packed.
    pub packed: Option<Packed>,
}

impl Linear {
    /// A dense layer.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            repr: LinearRepr::Dense,
            packed: None,
        }
    }

    /// A low-rank layer `y = x Vᵀ Uᵀ + b` from `v` `[rank, in]` and `u` `[out, rank]`.
    pub fn low_rank(u: Tensor, v: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight: v,
            bias,
            repr: LinearRepr::LowRank { u },
            packed: None,
        }
    }

    pub fn out_features(&self) -> usize {
        match &self.repr {
            LinearRepr::LowRank { u } => u.shape[0],
            LinearRepr::Dense => self.weight.shape[0],
        }
    }
    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }

    /// True when the layer is stored as two low-rank factors.
    pub fn is_factored(&self) -> bool {
        matches!(self.repr, LinearRepr::LowRank { .. })
    }

    /// The left factor `U` `[out_features, rank]` of a low-rank layer.
    pub fn left_factor(&self) -> Option<&Tensor> {
        match &self.repr {
            LinearRepr::LowRank { u } => Some(u),
            LinearRepr::Dense => None,
        }
    }

    /// The rank of a factorised layer.
    pub fn rank(&self) -> Option<usize> {
        self.is_factored().then(|| self.weight.shape[0])
    }

    /// Weight parameters (both factors of a low-rank layer; the bias not included).
    pub fn weight_params(&self) -> usize {
        self.weight.len() + self.left_factor().map_or(0, Tensor::len)
    }
}

pub use super::names::{LinearKind, ATTN_SHORTCUT, LOW_RANK_U, LOW_RANK_V, MLP_SHORTCUT};

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
    /// SliceGPT residual rotation around attention, `[hidden, hidden]` in linear layout
    /// (`[out, in]`): the residual becomes `h·Sᵀ` before the attention output is added
    /// (SliceGPT's `attn_shortcut_Q` is `Sᵀ`). `None`: identity.
    pub attn_shortcut: Option<Tensor>,
    /// SliceGPT residual rotation around the MLP, like `attn_shortcut`. `None`: identity.
    pub mlp_shortcut: Option<Tensor>,
    /// Contextual activation-sparsity thresholds applied at this block's linear inputs
    /// ([`crate::model::act`]); `None`: dense, as an ordinary model.
    pub act: Option<std::sync::Arc<crate::model::act_rules::LayerAct>>,
    /// What the newer families add (q/k norms, post-norms, experts); empty for llama.
    pub extra: LayerExtra,
}

/// One expert of a mixture: a SwiGLU MLP `down(silu(gate(x)) · up(x))` of its own width.
#[derive(Debug, Clone)]
pub struct Expert {
    /// `[width, hidden]`.
    pub gate: Linear,
    /// `[width, hidden]`.
    pub up: Linear,
    /// `[hidden, width]`.
    pub down: Linear,
}

impl Expert {
    /// This expert's FFN width.
    pub fn width(&self) -> usize {
        self.gate.out_features()
    }

    /// gate, up, down with their HF names (`gate_proj`, `up_proj`, `down_proj`).
    pub fn linears(&self) -> [(&'static str, &Linear); 3] {
        [("gate", &self.gate), ("up", &self.up), ("down", &self.down)]
    }

    /// Mutable [`Expert::linears`].
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 3] {
        [
            ("gate", &mut self.gate),
            ("up", &mut self.up),
            ("down", &mut self.down),
        ]
    }
}

/// A mixture-of-experts MLP (see [`crate::model::config::MoeConfig`]). In a block that has one,
/// [`LayerWeights::gate`] / `up` / `down` are empty (`[0, hidden]`, `[hidden, 0]`).
#[derive(Debug, Clone)]
pub struct Moe {
    /// Router `[experts, hidden]` (HF `mlp.gate` / `block_sparse_moe.gate`).
    pub router: Tensor,
    /// The experts, in router order.
    pub experts: Vec<Expert>,
}

/// Per-block tensors of the newer families (docs/families.md); every field `None` for the
/// llama block.
#[derive(Debug, Clone, Default)]
pub struct LayerExtra {
    /// `[head_dim]` RMSNorm scale applied to each query head before RoPE (qwen3, gemma3).
    pub q_norm: Option<Tensor>,
    /// `[head_dim]` RMSNorm scale applied to each key head before RoPE.
    pub k_norm: Option<Tensor>,
    /// `[hidden]` RMSNorm on the attention output before the residual add (gemma3).
    pub post_attn_norm: Option<Tensor>,
    /// `[hidden]` RMSNorm on the MLP output before the residual add (gemma3).
    pub post_mlp_norm: Option<Tensor>,
    /// The mixture of experts replacing the MLP (mixtral, qwen3-moe).
    pub moe: Option<Moe>,
}

impl LayerExtra {
    /// Every tensor held, with its name relative to the block (`self_attn.q_norm.weight`, …;
    /// experts as `mlp.experts.{e}.{gate,up,down}_proj.weight`).
    pub fn named(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (name, t) in [
            ("self_attn.q_norm.weight", &self.q_norm),
            ("self_attn.k_norm.weight", &self.k_norm),
            ("post_attn_norm.weight", &self.post_attn_norm),
            ("post_mlp_norm.weight", &self.post_mlp_norm),
        ] {
            if let Some(t) = t {
                out.push((name.to_string(), t));
            }
        }
        if let Some(m) = &self.moe {
            out.push(("mlp.gate.weight".to_string(), &m.router));
            for (e, x) in m.experts.iter().enumerate() {
                for (n, lin) in x.linears() {
                    out.push((format!("mlp.experts.{e}.{n}_proj.weight"), &lin.weight));
                    if let LinearRepr::LowRank { u } = &lin.repr {
                        out.push((format!("mlp.experts.{e}.{n}_proj.{LOW_RANK_U}"), u));
                    }
                    if let Some(b) = &lin.bias {
                        out.push((format!("mlp.experts.{e}.{n}_proj.bias"), b));
                    }
                }
            }
        }
        out
    }

    /// Every tensor held, mutably.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out: Vec<&mut Tensor> = [
            &mut self.q_norm,
            &mut self.k_norm,
            &mut self.post_attn_norm,
            &mut self.post_mlp_norm,
        ]
        .into_iter()
        .filter_map(Option::as_mut)
        .collect();
        if let Some(m) = &mut self.moe {
            out.push(&mut m.router);
            for x in &mut m.experts {
                for (_, lin) in x.linears_mut() {
                    out.push(&mut lin.weight);
                    out.extend(lin.bias.as_mut());
                    if let LinearRepr::LowRank { u } = &mut lin.repr {
                        out.push(u);
                    }
                }
            }
        }
        out
    }
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

    /// Every tensor of the block (norms, weights, biases, low-rank factors, shortcuts).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.attn_norm, &mut self.mlp_norm];
        for lin in [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ] {
            out.push(&mut lin.weight);
            out.extend(lin.bias.as_mut());
            if let LinearRepr::LowRank { u } = &mut lin.repr {
                out.push(u);
            }
        }
        out.extend(self.attn_shortcut.as_mut());
        out.extend(self.mlp_shortcut.as_mut());
        out.extend(self.extra.tensors_mut());
        out
    }

    /// [`Tensor::release`] every tensor of the block.
    pub fn release(&mut self) {
        self.tensors_mut().into_iter().for_each(|t| t.release());
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
    /// The runtime's int8 screen for exact greedy tokens through the LM head (its packed copy
    /// when there is one), when the model was packed with one.
    pub lm_head_screen: Option<Arc<crate::formats::screen::ArgmaxScreen>>,
    /// Factor applied to embedding rows on lookup, not to a tied LM head (Gemma: √hidden
    /// rounded to f32); `None`: 1.
    pub embed_scale: Option<f32>,
}

impl Weights {
    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every tensor with its HF name, in a stable order; low-rank factors and residual shortcuts
    /// under the lopper names ([`LOW_RANK_V`], [`LOW_RANK_U`], [`ATTN_SHORTCUT`], [`MLP_SHORTCUT`]).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![(names::EMBED.to_string(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((names::layer_tensor(i, names::ATTN_NORM), &l.attn_norm));
            for kind in LinearKind::ALL {
                let lin = l.linear(kind);
                let base = names::linear_module(i, kind);
                match &lin.repr {
                    LinearRepr::Dense => out.push((format!("{base}.weight"), &lin.weight)),
                    LinearRepr::LowRank { u } => {
                        out.push((format!("{base}.{LOW_RANK_V}"), &lin.weight));
                        out.push((format!("{base}.{LOW_RANK_U}"), u));
                    }
                }
                if let Some(b) = &lin.bias {
                    out.push((format!("{base}.bias"), b));
                }
            }
            out.push((names::layer_tensor(i, names::MLP_NORM), &l.mlp_norm));
            if let Some(s) = &l.attn_shortcut {
                out.push((names::layer_tensor(i, ATTN_SHORTCUT), s));
            }
            if let Some(s) = &l.mlp_shortcut {
                out.push((names::layer_tensor(i, MLP_SHORTCUT), s));
            }
            for (n, t) in l.extra.named() {
                out.push((names::layer_tensor(i, &n), t));
            }
        }
        out.push((names::FINAL_NORM.to_string(), &self.final_norm));
        if let Some(h) = &self.lm_head {
            out.push((names::LM_HEAD.to_string(), h));
        }
        out
    }

    /// The runtime's packed copies: block linears in order, then the LM head.
    pub fn packed(&self) -> impl Iterator<Item = &Packed> {
        self.layers
            .iter()
            .flat_map(|l| LinearKind::ALL.map(|k| l.linear(k).packed.as_ref()))
            .chain([self.lm_head_packed.as_ref()])
            .flatten()
    }

    /// Total number of parameters (a tied head counted once).
    pub fn num_params(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.len()).sum()
    }
}

/// Split a `[Σ parts, cols]` matrix into row blocks.
pub fn split_rows<const N: usize>(t: &Tensor, parts: [usize; N]) -> [Tensor; N] {
    let cols = t.cols();
    let data = t.values();
    let mut start = 0;
    parts.map(|rows| {
        let block = data[start * cols..(start + rows) * cols].to_vec();
        start += rows;
        Tensor::new(vec![rows, cols], block)
    })
}

/// Stack matrices with the same column count row-wise (the inverse of [`split_rows`]).
pub fn concat_rows(parts: &[&Tensor]) -> Tensor {
    let cols = parts.first().map_or(0, |t| t.cols());
    let rows = parts.iter().map(|t| t.rows()).sum();
    let mut data = Vec::with_capacity(rows * cols);
    for t in parts {
        data.extend_from_slice(&t.values());
    }
    Tensor::new(vec![rows, cols], data)
}

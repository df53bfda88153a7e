//! The Llama-family forward pass as a candle graph, so that candle's autograd gives gradients.
//!
//! The same arithmetic as [`crate::model::forward`] (HF `LlamaDecoderLayer`): per block
//! `h += o(attn(rope(q(n₁(h))), rope(k(n₁(h))), v(n₁(h))))`, then
//! `h += down(silu(gate(n₂(h))) · up(n₂(h)))`, RMSNorm over [`Config::norm_dim`], RoPE in HF's
//! rotate-half layout from lopper's own tables ([`crate::model::rope::Rope`], so llama3 / linear
//! scaling come for free), grouped-query attention, causal masking narrowed to
//! [`Config::sliding_window`], optional biases, and Qwen3's per-head q/k RMSNorm. Shapes are read from each block's tensors, so
//! structurally pruned models with per-layer widths run as they are.
//!
//! Everything is written with candle-core's differentiable primitives only (softmax and
//! log-sum-exp subtract a detached row maximum, which leaves their gradient unchanged), on any
//! [`Device`]: nothing here is CPU-specific.

use crate::model::config::Config;
use crate::model::rope::Rope;
use candle_core::{DType, Device, Tensor, D};

/// candle's result type (errors are mapped to [`crate::Error`] at the module boundary).
pub type CResult<T> = candle_core::Result<T>;

/// A linear layer's effective tensors: `w` `[out, in]`, `b` `[out]`.
#[derive(Debug, Clone)]
pub struct Lin {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

/// The effective tensors of one block (tracked or not, as the caller built them).
#[derive(Debug, Clone)]
pub struct BlockT {
    pub attn_norm: Tensor,
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
    pub mlp_norm: Tensor,
    pub gate: Lin,
    pub up: Lin,
    pub down: Lin,
    /// Qwen3's per-head RMSNorm scales of q and k (`[head_dim]`), applied before RoPE.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

/// Per-shape constants shared by every block: RoPE tables and the attention mask.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub head_dim: usize,
    pub eps: f64,
    pub norm_dim: usize,
    /// `[seq, head_dim/2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[seq, seq]` additive mask: 0 where key `j` is visible from query `i`, −∞ elsewhere.
    pub mask: Tensor,
    pub batch: usize,
    pub seq: usize,
}

impl Ctx {
    /// Constants for `batch` windows of `seq` tokens.
    pub fn new(cfg: &Config, batch: usize, seq: usize, dev: &Device) -> CResult<Ctx> {
        let rope = Rope::new(cfg, seq);
        let half = cfg.head_dim / 2;
        let cos = Tensor::from_slice(&rope.cos, (seq, half), dev)?;
        let sin = Tensor::from_slice(&rope.sin, (seq, half), dev)?;
        let mut m = vec![f32::NEG_INFINITY; seq * seq];
        for i in 0..seq {
            let lo = cfg.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
            m[i * seq + lo..=i * seq + i].fill(0.0);
        }
        Ok(Ctx {
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            norm_dim: cfg.norm_dim(),
            cos,
            sin,
            mask: Tensor::from_vec(m, (seq, seq), dev)?,
            batch,
            seq,
        })
    }
}

/// RMSNorm of `x` `[rows, d]`: `x / sqrt(Σx²/nd + eps) · w`.
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64, nd: usize) -> CResult<Tensor> {
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / nd as f64)?;
    let r = (ms + eps)?.sqrt()?;
    x.broadcast_div(&r)?.broadcast_mul(w)
}

/// `x Wᵀ + b` for `x` `[rows, in]`.
pub fn linear(x: &Tensor, l: &Lin) -> CResult<Tensor> {
    let y = x.matmul(&l.w.t()?)?;
    match &l.b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Rotate-half RoPE of `x` `[b, heads, t, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

/// Softmax over the last dimension (the detached maximum only stabilises it).
pub fn softmax_last(x: &Tensor) -> CResult<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log Σ exp x` over the last dimension, kept as `[.., 1]`.
pub fn logsumexp_last(x: &Tensor) -> CResult<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
    s.log()? + m
}

/// `[rows, heads·hd]` → `[batch, heads, seq, hd]`.
fn heads(x: &Tensor, c: &Ctx, n: usize) -> CResult<Tensor> {
    x.reshape((c.batch, c.seq, n, c.head_dim))?
        .transpose(1, 2)?
        .contiguous()
}

/// Causal (windowed) grouped-query attention of the normed input `xn` `[rows, d]`; returns the
/// attention output before o_proj, `[rows, n_heads·hd]`.
fn attention(xn: &Tensor, p: &BlockT, c: &Ctx) -> CResult<Tensor> {
    let hd = c.head_dim;
    let nh = p.q.w.dim(0)? / hd;
    let nkv = p.k.w.dim(0)? / hd;
    let head_norm = |x: Tensor, w: &Option<Tensor>| -> CResult<Tensor> {
        match w {
            Some(w) => rmsnorm(&x, w, c.eps, hd),
            None => Ok(x),
        }
    };
    let q = head_norm(heads(&linear(xn, &p.q)?, c, nh)?, &p.q_norm)?;
    let q = rope(&q, &c.cos, &c.sin)?;
    let k = head_norm(heads(&linear(xn, &p.k)?, c, nkv)?, &p.k_norm)?;
    let mut k = rope(&k, &c.cos, &c.sin)?;
    let mut v = heads(&linear(xn, &p.v)?, c, nkv)?;
    if nh != nkv {
        let g = nh / nkv;
        let rep = |t: &Tensor| -> CResult<Tensor> {
            t.unsqueeze(2)?
                .expand((c.batch, nkv, g, c.seq, hd))?
                .reshape((c.batch, nh, c.seq, hd))
        };
        k = rep(&k)?;
        v = rep(&v)?;
    }
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&c.mask)?;
    let out = softmax_last(&scores)?.matmul(&v)?;
    out.transpose(1, 2)?.reshape((c.batch * c.seq, nh * hd))
}

/// One block: `h` `[rows, d]` → the block output `[rows, d]`.
pub fn block(h: &Tensor, p: &BlockT, c: &Ctx) -> CResult<Tensor> {
    let xn = rmsnorm(h, &p.attn_norm, c.eps, c.norm_dim)?;
    let h = (h + linear(&attention(&xn, p, c)?, &p.o)?)?;
    let xn = rmsnorm(&h, &p.mlp_norm, c.eps, c.norm_dim)?;
    let a = (linear(&xn, &p.gate)?.silu()? * linear(&xn, &p.up)?)?;
    h + linear(&a, &p.down)?
}

/// Embedding lookup of `ids` `[rows]` (u32) in `embed` `[vocab, d]`.
pub fn embed(embed: &Tensor, ids: &Tensor) -> CResult<Tensor> {
    embed.index_select(ids, 0)
}

/// Logits `[rows, vocab]` of the last hidden states `h` (final norm, then the head).
pub fn head(h: &Tensor, final_norm: &Tensor, head: &Tensor, c: &Ctx) -> CResult<Tensor> {
    rmsnorm(h, final_norm, c.eps, c.norm_dim)?.matmul(&head.t()?)
}

/// Mean next-token cross-entropy of `logits` `[rows, vocab]` against `targets` (u32, one per
/// row), each row weighted by `weights` `[rows]` (0 for rows without a target), divided by
/// `denom`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    denom: f64,
) -> CResult<Tensor> {
    let lse = logsumexp_last(logits)?.squeeze(1)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    ((lse - picked)? * weights)?.sum_all()? / denom
}

/// Distillation loss `τ² · Σ_rows KL(p ‖ softmax(z/τ)) / denom` without its constant part:
/// returns `−τ² Σ p · log_softmax(z/τ) / denom` for teacher probabilities `p` `[rows, vocab]`
/// (the gradient is the KL's; add `τ² Σ p log p / denom` for the KL's value).
pub fn kd_cross(logits: &Tensor, p: &Tensor, tau: f64, denom: f64) -> CResult<Tensor> {
    let z = (logits / tau)?;
    let logq = z.broadcast_sub(&logsumexp_last(&z)?)?;
    ((p * logq)?.sum_all()? * (-tau * tau / denom))?.to_dtype(DType::F32)
}

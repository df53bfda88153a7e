//! The forward pass of a Llama-family decoder, as plain functions over plain data.
//!
//! `h` (the residual stream) is `[batch·seq, hidden]`; each of the `batch` sequences is an
//! independent window starting at position 0. Per block (HF `LlamaDecoderLayer`):
//! `h += o(attn(rope(q(n₁(h))), rope(k(n₁(h))), v(n₁(h))))`, then
//! `h += down(silu(gate(n₂(h))) · up(n₂(h)))`, with RMSNorms `n₁`, `n₂`. Attention is causal,
//! narrowed to the last [`Config::sliding_window`] positions when the model has a window
//! (Mistral), in full-window passes and against a KV cache alike.
//! Head counts and widths are read from each layer's weight shapes, so structurally pruned
//! models with non-uniform layers run through the same code.
//!
//! Structured-compression extensions (each absent in an ordinary model):
//! - a low-rank linear ([`Linear::factor`]) is applied as two products, `(x Vᵀ) Uᵀ`;
//! - SliceGPT residual shortcuts: `h ← h·Sᵀ + o(…)` instead of `h ← h + o(…)`
//!   ([`LayerWeights::attn_shortcut`], [`LayerWeights::mlp_shortcut`]);
//! - RMSNorm divides by [`Config::norm_dim`] (the pre-slicing width) instead of the row width.
//!
//! The newer families (docs/families.md) add, each where its block has it: per-head q/k RMSNorm
//! before RoPE (qwen3, gemma3), a per-layer window and RoPE base ([`Config::layer_window`]),
//! the `query_pre_attn_scalar` score scale, RMSNorms on the attention and MLP outputs before the
//! residual add (gemma3), GELU-tanh instead of SiLU, an embedding scale, and a mixture of
//! experts in place of the MLP ([`crate::model::moe`]).
//!
//! An [`Observer`] sees every linear layer's input and each block's input/output. A block with
//! activation-sparsity thresholds ([`LayerWeights::act`]) zeroes the small entries of each
//! linear input first ([`crate::model::act`]); observers see the sparsified input.

use crate::formats;
use crate::kernels::{self, attention::AttnDims};
use crate::model::act;
use crate::model::config::{Act, Config};
use crate::model::observer::{Observer, Site};
use crate::model::rope::Rope;
use crate::model::weights::{LayerWeights, Linear, Packed, Tensor, Weights};
use crate::{Error, Model, Result};

/// Reusable activation buffers for [`block_forward`].
#[derive(Debug, Default)]
pub struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Low-rank intermediate `x Vᵀ`.
    lr: Vec<f32>,
    /// Rotated residual `h·Sᵀ` (shortcuts).
    res: Vec<f32>,
    /// A sublayer's output before its post-norm, the mixture's output, q/k before their norm.
    post: Vec<f32>,
}

fn resize(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// `out[rows, n] = x · Wᵀ` (or `out += …` when `accumulate`) for a `[n, k]` weight: through its
/// packed format when it has one and `rows ≤ max_rows`, else dense (row dot products for a few
/// rows, GEMM for more; see [`formats::dense_f32_matmul`]).
pub fn product(
    weight: &Tensor,
    packed: Option<&Packed>,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    match packed {
        Some(p) if rows <= p.max_rows => p.format.matmul_add(x, rows, out, accumulate),
        _ => {
            let (n, k) = (weight.rows(), weight.cols());
            formats::dense_f32_matmul(weight.data(), n, k, x, rows, out, accumulate)
        }
    }
}

/// `out[rows, out_features] = x · Wᵀ + b` (or `out += …` when `accumulate`).
/// A low-rank layer needs a temporary buffer; this allocates one (see [`linear_buf`]).
pub fn linear(lin: &Linear, x: &[f32], rows: usize, out: &mut [f32], accumulate: bool) {
    linear_buf(lin, x, rows, out, accumulate, &mut Vec::new());
}

/// [`linear`] with a caller-owned buffer for a low-rank layer's intermediate `x Vᵀ`
/// (`[rows, rank]`; unused for a dense layer).
pub fn linear_buf(
    lin: &Linear,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    accumulate: bool,
    buf: &mut Vec<f32>,
) {
    use crate::model::weights::LinearRepr;
    match &lin.repr {
        LinearRepr::Dense => product(&lin.weight, lin.packed.as_ref(), x, rows, out, accumulate),
        LinearRepr::LowRank { u } => {
            // `packed` (when present) is a copy of `weight`, i.e. of V.
            let r = lin.weight.rows();
            let t = resize(buf, rows * r);
            product(&lin.weight, lin.packed.as_ref(), x, rows, t, false);
            product(u, None, t, rows, out, accumulate);
        }
    }
    if let Some(b) = &lin.bias {
        let n = lin.out_features();
        kernels::add_bias(&mut out[..rows * n], b.data());
    }
}

/// `h ← h·Sᵀ` for a residual shortcut `S` `[d, d]` (linear layout); `res` is scratch.
fn rotate_residual(s: Option<&crate::Tensor>, h: &mut [f32], rows: usize, res: &mut Vec<f32>) {
    if let Some(s) = s {
        let d = s.rows();
        let t = resize(res, rows * d);
        kernels::matmul_t(h, s.data(), t, rows, d, d, false);
        h[..rows * d].copy_from_slice(t);
    }
}

/// A layer's key/value cache for [`block_forward_cached`]: `k`/`v` are `[capacity,
/// n_kv_heads·head_dim]`; rows `0..pos0` hold the earlier positions.
#[derive(Debug)]
pub struct KvSlot<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    /// Absolute position of the first row of `h`.
    pub pos0: usize,
}

impl Scratch {
    /// The rotated queries and keys of the last block run through this scratch (`[rows,
    /// n_heads·head_dim]` and `[rows, n_kv_heads·head_dim]`, possibly followed by stale rows):
    /// token pruning reads the last token's attention from them.
    pub fn qk(&self) -> (&[f32], &[f32]) {
        (&self.q, &self.k)
    }
}

/// Where a block's rows sit and where their keys/values go.
enum Rows<'a> {
    /// `batch` windows from position 0, no cache.
    Windows,
    /// One sequence continuing a KV cache ([`block_forward_cached`]).
    Cached(KvSlot<'a>),
    /// One sequence of rows at ascending positions `pos`, attending to each other only;
    /// keys/values optionally scattered to those rows of a cache ([`block_forward_at`]); with
    /// `attend_cache`, attending to the cache's rows `0..=pos` instead.
    At {
        pos: &'a [usize],
        cache: Option<(&'a mut [f32], &'a mut [f32])>,
        attend_cache: bool,
    },
}

/// Run block `layer` over `h` in place.
#[allow(clippy::too_many_arguments)]
pub fn block_forward(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    batch: usize,
    seq: usize,
    s: &mut Scratch,
    obs: &mut dyn Observer,
) {
    block_impl(cfg, layer, lw, rope, h, batch, seq, s, obs, Rows::Windows);
}

/// [`block_forward`] over one sequence of `pos.len()` rows sitting at ascending absolute
/// positions `pos` (RoPE at those positions), which attend causally to each other only (the
/// rows' order is their positions' order, so the plain causal kernel applies). With `kv`, their
/// keys/values are also written to rows `pos` of that layer's cache `(k, v)`. Token pruning
/// runs a block on the prompt tokens it kept this way ([`crate::runtime::token_prune`]).
/// With `attend_cache` (needs `kv`), the rows attend instead to every cache row up to their
/// position (their own K/V written first; the other rows must be filled): token pruning
/// revives dropped tokens this way.
/// Models with a sliding window are not supported (the window counts positions, not rows).
#[allow(clippy::too_many_arguments)]
pub fn block_forward_at(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    pos: &[usize],
    s: &mut Scratch,
    obs: &mut dyn Observer,
    kv: Option<(&mut [f32], &mut [f32])>,
    attend_cache: bool,
) {
    assert!(
        !attend_cache || kv.is_some(),
        "block_forward_at: attend_cache needs a cache"
    );
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "block_forward_at: positions must ascend"
    );
    assert!(
        cfg.layer_window(layer).is_none(),
        "block_forward_at: sliding-window layers are not supported"
    );
    let rows = Rows::At {
        pos,
        cache: kv,
        attend_cache,
    };
    block_impl(cfg, layer, lw, rope, h, 1, pos.len(), s, obs, rows);
}

/// [`block_forward`], optionally against a KV cache: with `kv`, `h` is one sequence (`batch`
/// must be 1) of `seq` tokens at positions `kv.pos0..kv.pos0 + seq`; their keys and values are
/// written to rows `pos0..pos0 + seq` of the cache and attention reads rows `0..pos0 + seq`.
#[allow(clippy::too_many_arguments)]
pub fn block_forward_cached(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    batch: usize,
    seq: usize,
    s: &mut Scratch,
    obs: &mut dyn Observer,
    kv: Option<KvSlot<'_>>,
) {
    let rows = match kv {
        Some(slot) => Rows::Cached(slot),
        None => Rows::Windows,
    };
    block_impl(cfg, layer, lw, rope, h, batch, seq, s, obs, rows);
}

#[allow(clippy::too_many_arguments)]
fn block_impl(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    batch: usize,
    seq: usize,
    s: &mut Scratch,
    obs: &mut dyn Observer,
    kv: Rows<'_>,
) {
    let d = cfg.hidden_size;
    let rows = batch * seq;
    let hd = cfg.head_dim;
    let dims = AttnDims {
        n_heads: lw.n_heads(hd),
        n_kv_heads: lw.n_kv_heads(hd),
        head_dim: hd,
    };
    let (qw, kw) = (dims.n_heads * hd, dims.n_kv_heads * hd);
    let inter = lw.intermediate();
    let eps = cfg.rms_norm_eps as f32;
    let nd = cfg.norm_dim();
    let want = obs.wants_linear_inputs(layer);
    obs.block_input(layer, h, rows, d);

    // Attention.
    let xn = resize(&mut s.xn, rows * d);
    kernels::rmsnorm_dim(h, lw.attn_norm.data(), eps, nd, xn);
    let act = lw.act.as_deref();
    act::apply(act, Site::AttnIn, xn);
    if want {
        obs.linear_input(layer, Site::AttnIn, xn, rows, d);
    }
    let q = resize(&mut s.q, rows * qw);
    linear_buf(&lw.q, xn, rows, q, false, &mut s.lr);
    let k = resize(&mut s.k, rows * kw);
    linear_buf(&lw.k, xn, rows, k, false, &mut s.lr);
    let v = resize(&mut s.v, rows * kw);
    linear_buf(&lw.v, xn, rows, v, false, &mut s.lr);
    head_norm(lw.extra.q_norm.as_ref(), q, eps, &mut s.post);
    head_norm(lw.extra.k_norm.as_ref(), k, eps, &mut s.post);
    let pos0 = match &kv {
        Rows::Cached(c) => c.pos0,
        _ => 0,
    };
    let rope = rope.for_layer(cfg, layer);
    if let Rows::At { pos, .. } = &kv {
        rope.apply_at(q, dims.n_heads, pos);
        rope.apply_at(k, dims.n_kv_heads, pos);
    } else {
        rope.apply(q, dims.n_heads, seq, pos0);
        rope.apply(k, dims.n_kv_heads, seq, pos0);
    }
    let attn = resize(&mut s.attn, rows * qw);
    let scale = cfg.attn_scale();
    let window = cfg.layer_window(layer);
    if let Rows::At {
        pos,
        cache: Some((ck, cv)),
        attend_cache: true,
    } = kv
    {
        for (r, &p) in pos.iter().enumerate() {
            ck[p * kw..(p + 1) * kw].copy_from_slice(&k[r * kw..(r + 1) * kw]);
            cv[p * kw..(p + 1) * kw].copy_from_slice(&v[r * kw..(r + 1) * kw]);
        }
        let tk = pos.last().map_or(0, |p| p + 1);
        kernels::attention::causal_attention_at(
            q,
            &ck[..tk * kw],
            &cv[..tk * kw],
            attn,
            pos,
            tk,
            dims,
            scale,
        );
    } else if let Rows::Cached(c) = kv {
        assert_eq!(batch, 1, "a KV cache holds one sequence");
        let tk = pos0 + seq;
        assert!(
            c.k.len() >= tk * kw && c.v.len() >= tk * kw,
            "KV cache too short"
        );
        c.k[pos0 * kw..tk * kw].copy_from_slice(k);
        c.v[pos0 * kw..tk * kw].copy_from_slice(v);
        kernels::causal_attention_windowed(
            q,
            &c.k[..tk * kw],
            &c.v[..tk * kw],
            attn,
            seq,
            tk,
            dims,
            scale,
            window,
        );
    } else {
        for b in 0..batch {
            let (r0, r1) = (b * seq, (b + 1) * seq);
            kernels::causal_attention_windowed(
                &q[r0 * qw..r1 * qw],
                &k[r0 * kw..r1 * kw],
                &v[r0 * kw..r1 * kw],
                &mut attn[r0 * qw..r1 * qw],
                seq,
                seq,
                dims,
                scale,
                window,
            );
        }
        if let Rows::At {
            pos,
            cache: Some((ck, cv)),
            ..
        } = kv
        {
            for (r, &p) in pos.iter().enumerate() {
                ck[p * kw..(p + 1) * kw].copy_from_slice(&k[r * kw..(r + 1) * kw]);
                cv[p * kw..(p + 1) * kw].copy_from_slice(&v[r * kw..(r + 1) * kw]);
            }
        }
    }
    act::apply(act, Site::AttnOut, attn);
    if want {
        obs.linear_input(layer, Site::AttnOut, attn, rows, qw);
    }
    rotate_residual(lw.attn_shortcut.as_ref(), h, rows, &mut s.res);
    match &lw.extra.post_attn_norm {
        None => linear_buf(&lw.o, attn, rows, h, true, &mut s.lr),
        Some(pn) => {
            let y = resize(&mut s.post, rows * d);
            linear_buf(&lw.o, attn, rows, y, false, &mut s.lr);
            add_normed(h, y, pn, eps, nd, &mut s.xn);
        }
    }
    obs.attn_residual(layer, h, rows, d);

    // MLP.
    let xn = resize(&mut s.xn, rows * d);
    kernels::rmsnorm_dim(h, lw.mlp_norm.data(), eps, nd, xn);
    act::apply(act, Site::MlpIn, xn);
    if want {
        obs.linear_input(layer, Site::MlpIn, xn, rows, d);
    }
    if let Some(moe) = &lw.extra.moe {
        let mc = cfg
            .family
            .moe
            .as_ref()
            .expect("a block with experts in a config without a mixture of experts");
        let y = resize(&mut s.post, rows * d);
        y.fill(0.0);
        crate::model::moe::moe_forward(layer, moe, mc, xn, rows, y, obs, want);
        if !obs.wants_block_output(layer) {
            return;
        }
        rotate_residual(lw.mlp_shortcut.as_ref(), h, rows, &mut s.res);
        let y = &s.post[..rows * d];
        match &lw.extra.post_mlp_norm {
            None => h[..rows * d].iter_mut().zip(y).for_each(|(a, b)| *a += b),
            Some(pn) => add_normed(h, y, pn, eps, nd, &mut s.xn),
        }
        obs.block_output(layer, h, rows, d);
        return;
    }
    let gate = resize(&mut s.gate, rows * inter);
    linear_buf(&lw.gate, xn, rows, gate, false, &mut s.lr);
    let up = resize(&mut s.up, rows * inter);
    linear_buf(&lw.up, xn, rows, up, false, &mut s.lr);
    match cfg.arch.act() {
        Act::Silu => kernels::silu_mul(gate, up),
        Act::GeluTanh => kernels::gelu_tanh_mul(gate, up),
    }
    act::apply(act, Site::MlpDown, gate);
    if want {
        obs.linear_input(layer, Site::MlpDown, gate, rows, inter);
    }
    if !obs.wants_block_output(layer) {
        return;
    }
    rotate_residual(lw.mlp_shortcut.as_ref(), h, rows, &mut s.res);
    match &lw.extra.post_mlp_norm {
        None => linear_buf(&lw.down, gate, rows, h, true, &mut s.lr),
        Some(pn) => {
            let y = resize(&mut s.post, rows * d);
            linear_buf(&lw.down, gate, rows, y, false, &mut s.lr);
            add_normed(h, y, pn, eps, nd, &mut s.xn);
        }
    }
    obs.block_output(layer, h, rows, d);
}

/// RMSNorm each `head_dim`-wide head of `x` in place with scale `w` `[head_dim]` (qwen3 /
/// gemma3 `q_norm`, `k_norm`); no-op without a scale. `tmp` is scratch.
fn head_norm(w: Option<&Tensor>, x: &mut [f32], eps: f32, tmp: &mut Vec<f32>) {
    if let Some(w) = w {
        let t = resize(tmp, x.len());
        t.copy_from_slice(x);
        kernels::rmsnorm_dim(t, w.data(), eps, w.len(), x);
    }
}

/// `h += rmsnorm(y)·w` (gemma3's post-norms); `tmp` is scratch.
fn add_normed(h: &mut [f32], y: &[f32], w: &Tensor, eps: f32, nd: usize, tmp: &mut Vec<f32>) {
    let t = resize(tmp, y.len());
    kernels::rmsnorm_dim(y, w.data(), eps, nd, t);
    h[..y.len()]
        .iter_mut()
        .zip(t.iter())
        .for_each(|(a, b)| *a += b);
}

/// Embedding lookup: `[tokens.len(), hidden]`.
pub fn embed(w: &Weights, tokens: &[u32]) -> Result<Vec<f32>> {
    let (vocab, d) = (w.embed.rows(), w.embed.cols());
    let e = w.embed.data();
    let mut h = vec![0f32; tokens.len() * d];
    for (row, &t) in h.chunks_mut(d).zip(tokens) {
        let t = t as usize;
        if t >= vocab {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary (size {vocab})"
            )));
        }
        row.copy_from_slice(&e[t * d..(t + 1) * d]);
        if let Some(f) = w.embed_scale {
            row.iter_mut().for_each(|x| *x *= f);
        }
    }
    Ok(h)
}

/// Run `batch` windows of `seq` tokens (`tokens.len() == batch·seq`) through every block and
/// the final norm; returns the normed hidden states `[batch·seq, hidden]`.
pub fn forward_hidden(
    model: &Model,
    tokens: &[u32],
    batch: usize,
    seq: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<f32>> {
    if tokens.len() != batch * seq {
        return Err(Error::Invalid(format!(
            "{} tokens do not form {batch} windows of {seq}",
            tokens.len()
        )));
    }
    let cfg = &model.config;
    let mut h = embed(&model.weights, tokens)?;
    let rope = Rope::new(cfg, seq);
    let mut scratch = Scratch::default();
    for (i, lw) in model.weights.layers.iter().enumerate() {
        block_forward(cfg, i, lw, &rope, &mut h, batch, seq, &mut scratch, obs);
    }
    Ok(final_norm(model, &h))
}

/// The final RMSNorm of hidden states `h` `[rows, hidden]` (what [`forward_hidden`] returns).
pub fn final_norm(model: &Model, h: &[f32]) -> Vec<f32> {
    let cfg = &model.config;
    let mut out = vec![0f32; h.len()];
    kernels::rmsnorm_dim(
        h,
        model.weights.final_norm.data(),
        cfg.rms_norm_eps as f32,
        cfg.norm_dim(),
        &mut out,
    );
    out
}

/// Logits `[rows, vocab]` for normed hidden states `[rows, hidden]`.
pub fn logits(w: &Weights, hidden: &[f32], rows: usize) -> Vec<f32> {
    let head = w.lm_head();
    let mut out = vec![0f32; rows * head.rows()];
    product(
        head,
        w.lm_head_packed.as_ref(),
        hidden,
        rows,
        &mut out,
        false,
    );
    out
}

/// Full logits `[tokens.len(), vocab]` of one window (for short inputs and tests).
pub fn forward_logits(model: &Model, tokens: &[u32]) -> Result<Vec<f32>> {
    let h = forward_hidden(
        model,
        tokens,
        1,
        tokens.len(),
        &mut crate::model::observer::NoObserver,
    )?;
    Ok(logits(&model.weights, &h, tokens.len()))
}

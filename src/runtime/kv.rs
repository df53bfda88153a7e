//! The KV cache and the cached forward step.
//!
//! [`KvCache`] holds, per layer, keys and values `[max_len, n_kv_heads·head_dim]` (head counts
//! read from each layer's weights, so structurally pruned models work) plus the RoPE table for
//! positions `0..max_len`. [`forward_step`] runs `tokens` at positions `len..len + tokens.len()`
//! through every block via [`block_forward_cached`], appends their keys/values and returns the
//! last position's logits; [`forward_step_all`] returns every position's logits (for tests).

use crate::model::forward::{block_forward_cached, embed, KvSlot, Scratch};
use crate::model::observer::NoObserver;
use crate::model::rope::Rope;
use crate::{kernels, Error, Model, Result};

/// Keys and values of every layer for one sequence, and how many positions are filled.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys `[max_len, kv_width]`.
    pub k: Vec<Vec<f32>>,
    /// Per layer: values `[max_len, kv_width]`.
    pub v: Vec<Vec<f32>>,
    /// Per layer: `n_kv_heads·head_dim`.
    pub kv_width: Vec<usize>,
    /// Positions filled so far.
    pub len: usize,
    /// Capacity in positions.
    pub max_len: usize,
    pub(crate) rope: Rope,
    pub(crate) scratch: Scratch,
}

impl KvCache {
    /// An empty cache for up to `max_len` positions of `model`.
    pub fn new(model: &Model, max_len: usize) -> KvCache {
        let hd = model.config.head_dim;
        let kv_width: Vec<usize> = model
            .weights
            .layers
            .iter()
            .map(|lw| lw.n_kv_heads(hd) * hd)
            .collect();
        KvCache {
            k: kv_width.iter().map(|w| vec![0f32; max_len * w]).collect(),
            v: kv_width.iter().map(|w| vec![0f32; max_len * w]).collect(),
            kv_width,
            len: 0,
            max_len,
            rope: Rope::new(&model.config, max_len),
            scratch: Scratch::default(),
        }
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.max_len - self.len
    }

    /// Forget every position (keeps the buffers).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Cut the cache back to `len` positions (e.g. to re-run from a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the K/V buffers.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 4).sum()
    }
}

/// Run `tokens` through all blocks at the cache's next positions; returns the final-normed
/// hidden states `[tokens.len(), hidden]` (all rows, or only the last when `last_only`).
/// Blocks `i` with `skip[i]` true are left out (their cache rows at these positions are not
/// written; a self-speculative draft, [`crate::runtime::speculative`]); `skip` may be empty.
pub(crate) fn step_hidden(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    skip: &[bool],
    last_only: bool,
) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(Error::Invalid(
            "forward_step needs at least one token".into(),
        ));
    }
    if cache.k.len() != model.weights.layers.len() {
        return Err(Error::Invalid(format!(
            "KV cache has {} layers but the model has {}",
            cache.k.len(),
            model.weights.layers.len()
        )));
    }
    if tokens.len() > cache.remaining() {
        return Err(Error::Invalid(format!(
            "KV cache full: {} positions used of {}, {} more requested",
            cache.len,
            cache.max_len,
            tokens.len()
        )));
    }
    let cfg = &model.config;
    let seq = tokens.len();
    let mut h = embed(&model.weights, tokens)?;
    let pos0 = cache.len;
    for (i, lw) in model.weights.layers.iter().enumerate() {
        if skip.get(i).copied().unwrap_or(false) {
            continue;
        }
        let slot = KvSlot {
            k: &mut cache.k[i],
            v: &mut cache.v[i],
            pos0,
        };
        block_forward_cached(
            cfg,
            i,
            lw,
            &cache.rope,
            &mut h,
            1,
            seq,
            &mut cache.scratch,
            &mut NoObserver,
            Some(slot),
        );
    }
    cache.len += seq;
    let d = cfg.hidden_size;
    let rows = if last_only {
        &h[(seq - 1) * d..]
    } else {
        &h[..]
    };
    let mut out = vec![0f32; rows.len()];
    kernels::rmsnorm_dim(
        rows,
        model.weights.final_norm.data(),
        cfg.rms_norm_eps as f32,
        cfg.norm_dim(),
        &mut out,
    );
    Ok(out)
}

/// Run `tokens` (a prompt chunk or one token) at positions `cache.len..cache.len + tokens.len()`,
/// append their keys/values to `cache`, and return the logits `[vocab]` of the last position.
pub fn forward_step(model: &Model, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    on_pool(|| {
        let h = step_hidden(model, tokens, cache, &[], true)?;
        Ok(crate::model::forward::logits(&model.weights, &h, 1))
    })
}

/// [`forward_step`] for greedy (`k = 1`) or top-`k` sampling: through the LM head's argmax screen
/// when the model has one ([`crate::runtime::pack::attach_head_screen`]), the last position's
/// logits on the rows that can be among the `k` largest and `−∞` elsewhere, so the `k` largest
/// (all that greedy or top-`k` sampling looks at) are exactly [`forward_step`]'s while about a
/// quarter of the head is read; with `k = 0` (no limit), without a screen or for a non-finite
/// input, all the logits.
pub fn forward_step_top_k(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    k: usize,
) -> Result<Vec<f32>> {
    on_pool(|| {
        let h = step_hidden(model, tokens, cache, &[], true)?;
        Ok(head_top_k(model, &h, k))
    })
}

/// The logits `[vocab]` of one final-normed hidden row `h`: through the LM head's screen for the
/// `k` largest (as [`forward_step_top_k`]) when there is one and `k > 0`, else all of them.
pub(crate) fn head_top_k(model: &Model, h: &[f32], k: usize) -> Vec<f32> {
    let w = &model.weights;
    if let Some(s) = w.lm_head_screen.as_ref().filter(|_| k > 0) {
        let mut y = vec![0f32; w.lm_head().rows()];
        if s.top_k(crate::runtime::pack::exact_head(w), h, k, &mut y) {
            return y;
        }
    }
    crate::model::forward::logits(w, h, 1)
}

/// Runs `f` on a rayon worker thread. A decode step makes a few hundred small parallel
/// products; started from a thread outside the pool, each would hand its work to the pool and
/// put the caller to sleep on a futex until done. From inside, the caller works too.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// [`forward_step`], returning the logits of every position `[tokens.len(), vocab]`.
pub fn forward_step_all(model: &Model, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    on_pool(|| {
        let h = step_hidden(model, tokens, cache, &[], false)?;
        Ok(crate::model::forward::logits(
            &model.weights,
            &h,
            tokens.len(),
        ))
    })
}

//! Token pruning of long prompts in prefill (lossy), after LazyLLM (Fu et al. 2024, "LazyLLM:
//! Dynamic Token Pruning for Efficient Long Context LLM Inference", arXiv 2407.14057).
//!
//! **What.** The prompt's first blocks run on every token. At each pruning point (a block where
//! the [`Schedule`]'s kept fraction drops), the prompt tokens are scored by the attention the
//! last prompt token paid them in the block just run (softmax probabilities, averaged over the
//! query heads), and only the top-scoring ones go on; the last token is always kept (its logits
//! are the first new token's). Later blocks run on the kept rows only, each at its original
//! position (RoPE at the true position; the rows attend causally to each other only, so the
//! plain causal kernel applies: [`crate::model::forward::block_forward_at`]), and write their
//! keys/values to the cache rows of those positions.
//!
//! **Schedule.** `--token-keep F` is the fraction of the prompt's (token, block) computations
//! kept, LazyLLM's "% of prompt token computed": prefill costs about `F` of a full one (less in
//! attention, which shrinks quadratically). The first `max(1, n/6)` blocks (5 of the default
//! model's 30) run every token (LazyLLM finds pruning in early blocks costs the most); after
//! them a pruning point every `max(1, n/10)` blocks (3) keeps a fixed share `ρ` of the tokens
//! still running, so stage `j` runs `ρʲ` of the prompt; `ρ` is solved (bisection) so the mean
//! over all blocks is `F`. `F = 1` keeps everything (the output is plain prefill's, bit for
//! bit); an `F` below the first blocks' share is refused.
//!
//! **Revival (aux cache).** A dropped token's hidden state at the block where it was dropped
//! (the input of the first block it skipped) is kept in the [`AuxCache`]. Decoding needs every
//! block's K/V of every prompt position; [`revive`] fills the rows the prefill left empty,
//! lazily: after the first token is out (not part of time-to-first-token), before the first
//! decode step. Two ways ([`Revival`]):
//! - `Exact` (default): each dropped token runs through its remaining blocks from its frozen
//!   state, attending to every prompt position up to its own (the kept tokens' K/V from the
//!   prefill, the other dropped tokens' written first;
//!   [`crate::kernels::attention::causal_attention_at`]); the last block needs only its K/V.
//!   The cache is then a full prefill's except that the kept tokens' later-block states never
//!   attended to the dropped tokens. Costs most of the prefill work the pruning saved.
//! - `Propagate`: the K/V of every remaining block projected from the frozen state (input
//!   RMSNorm, k/v projections, RoPE), as early exit propagates an exit state (CALM, Schuster et
//!   al. 2022; [`super::early_exit`]): about 6% of a block per block, but poor quality
//!   (docs/dynamic_depth.md).
//!
//! LazyLLM's own decode instead keeps per-block caches of different token sets and revives a
//! token only when a later step selects it; lopper's cache holds every position in every block.
//!
//! **Evaluation** ([`continuation_nll`]): a window's first `P` tokens are prefilled with pruning,
//! revived, and the following tokens are scored teacher-forced against that cache (the first of
//! them from the prefill's logits), as decoding would see them.

use super::generate::{GenerateOpts, GenerateStats};
use super::kv::{forward_step, forward_step_all, forward_step_top_k, on_pool, KvCache};
use super::sample::Sampler;
use crate::kernels::{self, attention::AttnDims};
use crate::model::forward::{block_forward_at, embed, final_norm, linear, logits};
use crate::model::observer::NoObserver;
use crate::{Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// Refuse a kept fraction outside (0, 1].
pub fn check_keep(f: f32) -> Result<()> {
    if f > 0.0 && f <= 1.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--token-keep must be in (0, 1], got {f}"
        )))
    }
}

/// Refuse models token pruning cannot run: sliding windows (the window counts positions, the
/// pruned pass rows) and SliceGPT residual rotations (a frozen state would need them).
pub fn check_model(model: &Model) -> Result<()> {
    if model.config.sliding_window.is_some() {
        return Err(Error::Invalid(
            "--token-keep: models with sliding-window attention are not supported".into(),
        ));
    }
    if model
        .weights
        .layers
        .iter()
        .any(|l| l.attn_shortcut.is_some() || l.mlp_shortcut.is_some())
    {
        return Err(Error::Invalid(
            "--token-keep: SliceGPT-sliced models (residual rotations) are not supported".into(),
        ));
    }
    if crate::model::act::installed(model).is_some() {
        return Err(Error::Invalid(
            "--token-keep cannot be combined with activation sparsity yet".into(),
        ));
    }
    Ok(())
}

/// The kept fraction of the prompt per block (non-increasing, `keep[0] = 1`).
#[derive(Debug, Clone, Serialize)]
pub struct Schedule {
    /// The `--token-keep` value: the mean of `keep`.
    pub target: f64,
    /// Per block: the fraction of the prompt tokens it runs on.
    pub keep: Vec<f64>,
    /// The share kept at each pruning point.
    pub ratio: f64,
}

impl Schedule {
    /// The default schedule for `n_blocks` blocks and mean kept fraction `f` (module docs).
    pub fn new(n_blocks: usize, f: f32) -> Result<Schedule> {
        check_keep(f)?;
        if n_blocks == 0 {
            return Err(Error::Invalid(
                "--token-keep: the model has no blocks".into(),
            ));
        }
        let full = (n_blocks / 6).max(1);
        let stride = (n_blocks / 10).max(1);
        let shape = |rho: f64| -> Vec<f64> {
            (0..n_blocks)
                .map(|l| match l.checked_sub(full) {
                    None => 1.0,
                    Some(j) => rho.powi((j / stride + 1) as i32),
                })
                .collect()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let f = f as f64;
        let floor = full as f64 / n_blocks as f64;
        if f < 1.0 && f <= floor {
            return Err(Error::Invalid(format!(
                "--token-keep {f}: the first {full} of {n_blocks} blocks run every prompt token, so the kept fraction must exceed {floor:.3}"
            )));
        }
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        if f < 1.0 {
            for _ in 0..60 {
                let mid = 0.5 * (lo + hi);
                if mean(&shape(mid)) < f {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
        }
        let keep = shape(hi);
        Ok(Schedule {
            target: f,
            keep,
            ratio: hi,
        })
    }

    /// Tokens each block runs on for a prompt of `n` tokens: at least 1 (the last token),
    /// non-increasing.
    pub fn counts(&self, n: usize) -> Vec<usize> {
        let mut prev = n;
        self.keep
            .iter()
            .map(|&k| {
                let c = ((k * n as f64).round() as usize).clamp(1, prev);
                prev = c;
                c
            })
            .collect()
    }
}

/// Dropped prompt tokens in the order they were dropped, with their hidden states there.
#[derive(Debug, Clone, Default)]
pub struct AuxCache {
    /// Per dropped token: its position.
    pub pos: Vec<usize>,
    /// Per dropped token: the first block it did not run (non-decreasing).
    pub from_block: Vec<usize>,
    /// `[pos.len(), hidden]`: each token's input to its `from_block`.
    pub hidden: Vec<f32>,
}

/// The result of a pruned prefill.
#[derive(Debug, Clone)]
pub struct Prefill {
    /// Final-normed hidden state of the last prompt token `[hidden]`.
    pub hidden: Vec<f32>,
    /// The dropped tokens ([`revive`] completes the cache from them).
    pub aux: AuxCache,
    /// Tokens each block ran on.
    pub counts: Vec<usize>,
}

impl Prefill {
    /// The fraction of (token, block) computations run.
    pub fn kept_fraction(&self, n_tokens: usize) -> f64 {
        let s: usize = self.counts.iter().sum();
        s as f64 / (n_tokens * self.counts.len()).max(1) as f64
    }
}

/// Attention probabilities the last of `m` query rows pays each of the `m` keys, averaged over
/// the query heads. `q_last` is that row `[n_heads·head_dim]` (RoPE applied), `k` is
/// `[m, n_kv_heads·head_dim]`; every key is visible to the last row.
pub fn last_token_scores(q_last: &[f32], k: &[f32], m: usize, d: AttnDims, scale: f32) -> Vec<f32> {
    let hd = d.head_dim;
    let kw = d.n_kv_heads * hd;
    let group = d.n_heads / d.n_kv_heads;
    let mut acc = vec![0f32; m];
    let mut sc = vec![0f32; m];
    for h in 0..d.n_heads {
        let g = h / group;
        kernels::dot_rows(
            &q_last[h * hd..(h + 1) * hd],
            &k[g * hd..],
            kw,
            scale,
            &mut sc,
        );
        kernels::softmax_prefix(&mut sc, m);
        for (a, s) in acc.iter_mut().zip(&sc) {
            *a += s;
        }
    }
    let inv = 1.0 / d.n_heads as f32;
    acc.iter_mut().for_each(|a| *a *= inv);
    acc
}

/// Indices (ascending) of the `keep` highest `scores`, the last index always among them (ties:
/// the earlier index first).
pub fn select(scores: &[f32], keep: usize) -> Vec<usize> {
    let m = scores.len();
    let keep = keep.clamp(1, m);
    let mut order: Vec<usize> = (0..m - 1).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut out: Vec<usize> = order.into_iter().take(keep - 1).collect();
    out.push(m - 1);
    out.sort_unstable();
    out
}

/// Prefill `prompt` into an empty `cache` with token pruning by `sched`; the cache then holds
/// `prompt.len()` positions whose K/V rows are filled where the token ran the block (call
/// [`revive`] with the returned [`AuxCache`] before decoding).
pub fn prefill(
    model: &Model,
    prompt: &[u32],
    cache: &mut KvCache,
    sched: &Schedule,
) -> Result<Prefill> {
    check_model(model)?;
    let (cfg, w) = (&model.config, &model.weights);
    let (n, d, len) = (w.layers.len(), cfg.hidden_size, prompt.len());
    if len == 0 {
        return Err(Error::Invalid("prefill needs at least one token".into()));
    }
    if cache.len != 0 || cache.k.len() != n {
        return Err(Error::Invalid(
            "token-pruned prefill needs an empty KV cache of the model's blocks".into(),
        ));
    }
    if len > cache.max_len {
        return Err(Error::Invalid(format!(
            "KV cache full: {len} prompt tokens, capacity {}",
            cache.max_len
        )));
    }
    if sched.keep.len() != n {
        return Err(Error::Invalid(format!(
            "token-pruning schedule has {} blocks, the model {n}",
            sched.keep.len()
        )));
    }
    let counts = sched.counts(len);
    let mut h = embed(w, prompt)?;
    let mut pos: Vec<usize> = (0..len).collect();
    let mut aux = AuxCache::default();
    let mut scores: Vec<f32> = Vec::new();
    let hd = cfg.head_dim;
    for (i, lw) in w.layers.iter().enumerate() {
        if counts[i] < pos.len() {
            let sel = select(&scores, counts[i]);
            let mut next = Vec::with_capacity(sel.len() * d);
            let mut it = sel.iter().peekable();
            for (r, &p) in pos.iter().enumerate() {
                let row = &h[r * d..(r + 1) * d];
                if it.peek() == Some(&&r) {
                    it.next();
                    next.extend_from_slice(row);
                } else {
                    aux.pos.push(p);
                    aux.from_block.push(i);
                    aux.hidden.extend_from_slice(row);
                }
            }
            pos = sel.iter().map(|&r| pos[r]).collect();
            h = next;
        }
        let kv = (&mut cache.k[i][..], &mut cache.v[i][..]);
        let s = &mut cache.scratch;
        block_forward_at(
            cfg,
            i,
            lw,
            &cache.rope,
            &mut h,
            &pos,
            s,
            &mut NoObserver,
            Some(kv),
            false,
        );
        let m = pos.len();
        if counts.get(i + 1).is_some_and(|&c| c < m) {
            let dims = AttnDims {
                n_heads: lw.n_heads(hd),
                n_kv_heads: lw.n_kv_heads(hd),
                head_dim: hd,
            };
            let qw = dims.n_heads * hd;
            let (q, k) = cache.scratch.qk();
            let scale = 1.0 / (hd as f32).sqrt();
            scores = last_token_scores(&q[(m - 1) * qw..m * qw], k, m, dims, scale);
        }
    }
    cache.len = len;
    let hidden = final_norm(model, &h[(pos.len() - 1) * d..]);
    Ok(Prefill {
        hidden,
        aux,
        counts,
    })
}

/// How [`revive`] fills the dropped tokens' K/V (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Revival {
    /// Run each dropped token through its remaining blocks, attending to every prompt position
    /// (about the prefill work the pruning saved, paid after the first token).
    Exact,
    /// K/V of every remaining block from the frozen hidden state (k/v projections only).
    Propagate,
}

impl std::str::FromStr for Revival {
    type Err = Error;
    fn from_str(s: &str) -> Result<Revival> {
        match s {
            "exact" => Ok(Revival::Exact),
            "propagate" => Ok(Revival::Propagate),
            _ => Err(Error::Invalid(format!(
                "--token-revive must be exact or propagate, got {s:?}"
            ))),
        }
    }
}

/// Block `i`'s K/V of rows `x` `[pos.len(), hidden]` (their inputs to block `i`) at positions
/// `pos`, written to the cache.
fn kv_from_hidden(model: &Model, i: usize, x: &[f32], pos: &[usize], cache: &mut KvCache) {
    let (cfg, lw) = (&model.config, &model.weights.layers[i]);
    let m = pos.len();
    let mut xn = vec![0f32; x.len()];
    let eps = cfg.rms_norm_eps as f32;
    kernels::rmsnorm_dim(x, lw.attn_norm.data(), eps, cfg.norm_dim(), &mut xn);
    let kw = cache.kv_width[i];
    let (mut k, mut v) = (vec![0f32; m * kw], vec![0f32; m * kw]);
    linear(&lw.k, &xn, m, &mut k, false);
    linear(&lw.v, &xn, m, &mut v, false);
    cache
        .rope
        .apply_at(&mut k, lw.n_kv_heads(cfg.head_dim), pos);
    for (r, &p) in pos.iter().enumerate() {
        cache.k[i][p * kw..(p + 1) * kw].copy_from_slice(&k[r * kw..(r + 1) * kw]);
        cache.v[i][p * kw..(p + 1) * kw].copy_from_slice(&v[r * kw..(r + 1) * kw]);
    }
}

/// Fill the cache rows the prefill left empty, for every dropped token and every block from
/// its drop block on (module docs): `Exact` runs the tokens through those blocks (the last
/// one's K/V need only its input), `Propagate` projects the frozen state.
pub fn revive(model: &Model, aux: &AuxCache, cache: &mut KvCache, how: Revival) -> Result<()> {
    let (cfg, w) = (&model.config, &model.weights);
    let (d, n) = (cfg.hidden_size, w.layers.len());
    if aux.pos.iter().any(|&p| p >= cache.len) {
        return Err(Error::Invalid(
            "aux cache names positions past the KV cache".into(),
        ));
    }
    // Revived rows in position order, with their current hidden states.
    let (mut pos, mut h): (Vec<usize>, Vec<f32>) = (Vec::new(), Vec::new());
    let mut taken = 0;
    for i in 0..n {
        // Tokens are stored in drop order, so those dropped at or before block i are a prefix.
        let m = aux.from_block.partition_point(|&b| b <= i);
        if m == 0 {
            continue;
        }
        if how == Revival::Propagate {
            kv_from_hidden(model, i, &aux.hidden[..m * d], &aux.pos[..m], cache);
            continue;
        }
        if m > taken {
            let mut rows: Vec<(usize, &[f32])> = pos
                .iter()
                .zip(h.chunks(d))
                .map(|(&p, r)| (p, r))
                .chain((taken..m).map(|j| (aux.pos[j], &aux.hidden[j * d..(j + 1) * d])))
                .collect();
            rows.sort_by_key(|r| r.0);
            let next: Vec<f32> = rows.iter().flat_map(|r| r.1.iter().copied()).collect();
            pos = rows.iter().map(|r| r.0).collect();
            h = next;
            taken = m;
        }
        if i + 1 == n {
            kv_from_hidden(model, i, &h, &pos, cache);
            continue;
        }
        let kv = (&mut cache.k[i][..], &mut cache.v[i][..]);
        let s = &mut cache.scratch;
        let lw = &w.layers[i];
        block_forward_at(
            cfg,
            i,
            lw,
            &cache.rope,
            &mut h,
            &pos,
            s,
            &mut NoObserver,
            Some(kv),
            true,
        );
    }
    Ok(())
}

/// Counts of one token-pruned generation.
#[derive(Debug, Clone, Serialize)]
pub struct PruneStats {
    pub generate: GenerateStats,
    /// Tokens each block ran on in prefill.
    pub counts: Vec<usize>,
    /// The fraction of the prompt's (token, block) computations run.
    pub kept_fraction: f64,
    /// Seconds spent reviving dropped tokens' K/V (after the first token, before decoding).
    pub revive_seconds: f64,
}

/// Generate with a token-pruned prefill, then plain decoding against the revived cache.
/// Greedy and top-k steps use the head's screen when the model has one.
pub fn generate_token_pruned(
    model: &Model,
    sched: &Schedule,
    how: Revival,
    prompt_ids: &[u32],
    opts: &GenerateOpts,
    on_token: &mut dyn FnMut(u32),
) -> Result<PruneStats> {
    let mut sampler = Sampler::new(opts.sampling)?;
    let ctx = super::generate::check_prompt(model, prompt_ids)?;
    let stops = super::generate::stop_tokens(model, opts);
    let cap = (prompt_ids.len() + opts.max_new.saturating_sub(1)).min(ctx);
    let mut cache = KvCache::new(model, cap);
    let mut gs = GenerateStats::new(prompt_ids.len());
    let s = &opts.sampling;
    let k = if s.is_greedy() { 1 } else { s.top_k };
    let screened = k > 0 && model.weights.lm_head_screen.is_some();
    let (mut counts, mut kept, mut revive_s) = (Vec::new(), 1.0, 0.0);
    if opts.max_new > 0 {
        let t = Instant::now();
        let pf = on_pool(|| prefill(model, prompt_ids, &mut cache, sched))?;
        let lg = if screened {
            super::kv::head_top_k(model, &pf.hidden, k)
        } else {
            logits(&model.weights, &pf.hidden, 1)
        };
        let mut tok = sampler.sample(&lg);
        gs.prefill_seconds = t.elapsed().as_secs_f64();
        kept = pf.kept_fraction(prompt_ids.len());
        counts = pf.counts.clone();
        let mut aux = Some(pf.aux);
        let t = Instant::now();
        loop {
            if !gs.emit(tok, &stops, opts.max_new, cache.remaining(), on_token) {
                break;
            }
            if let Some(a) = aux.take() {
                let tr = Instant::now();
                on_pool(|| revive(model, &a, &mut cache, how))?;
                revive_s = tr.elapsed().as_secs_f64();
            }
            let lg = if screened {
                forward_step_top_k(model, &[tok], &mut cache, k)?
            } else {
                forward_step(model, &[tok], &mut cache)?
            };
            tok = sampler.sample(&lg);
            gs.decode_steps += 1;
        }
        gs.decode_seconds = t.elapsed().as_secs_f64();
    }
    gs.finish_rates();
    Ok(PruneStats {
        generate: gs,
        counts,
        kept_fraction: kept,
        revive_seconds: revive_s,
    })
}

/// One window's continuation: prefill `win[..prompt_len]` with pruning, revive, and score the
/// tokens after it (teacher-forced). Returns the NLL of each of `win[prompt_len..]` and the
/// fraction of the prompt's computations run.
pub fn continuation_nll(
    model: &Model,
    sched: &Schedule,
    how: Revival,
    win: &[u32],
    prompt_len: usize,
) -> Result<(Vec<f64>, f64)> {
    if prompt_len == 0 || prompt_len >= win.len() {
        return Err(Error::Invalid(format!(
            "a continuation window needs 0 < prompt ({prompt_len}) < window ({})",
            win.len()
        )));
    }
    on_pool(|| {
        let mut cache = KvCache::new(model, win.len() - 1);
        let pf = prefill(model, &win[..prompt_len], &mut cache, sched)?;
        let mut nll = Vec::with_capacity(win.len() - prompt_len);
        let first = logits(&model.weights, &pf.hidden, 1);
        nll.push(kernels::logsumexp(&first) - first[win[prompt_len] as usize] as f64);
        revive(model, &pf.aux, &mut cache, how)?;
        let rest = &win[prompt_len..win.len() - 1];
        if !rest.is_empty() {
            let lg = forward_step_all(model, rest, &mut cache)?;
            let v = lg.len() / rest.len();
            for (r, row) in lg.chunks(v).enumerate() {
                let t = win[prompt_len + 1 + r] as usize;
                nll.push(kernels::logsumexp(row) - row[t] as f64);
            }
        }
        if nll.iter().any(|x| !x.is_finite()) {
            return Err(Error::Numeric("continuation NLL is not finite".into()));
        }
        Ok((nll, pf.kept_fraction(prompt_len)))
    })
}

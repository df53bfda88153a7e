//! Early exit (lossy): stop a token's forward pass at an intermediate block when the model is
//! already confident, and read its next token from there.
//!
//! After the blocks listed in [`ExitOpts::checks`] (by default after ½, ⅔ and ⅚ of the blocks),
//! the final RMSNorm and the LM head are applied to the hidden state; when the largest softmax
//! probability reaches the threshold `T` the token exits there (Schuster et al., "Confident
//! Adaptive Language Modeling", NeurIPS 2022, "softmax response" confidence; LayerSkip, Elhoushi
//! et al. 2024, applies the shared head to intermediate layers the same way).
//!
//! **Skipped blocks' K/V** (CALM §3.1, "propagating the exit state"): later tokens attend to
//! every block's keys and values of this one. For each block after the exit, this token's K and
//! V are computed from its frozen exit hidden state (that block's input RMSNorm, the k/v
//! projections and RoPE; no attention, no MLP) and written to the cache. That costs the k/v
//! projections only (about 6% of a block of the default model), and every later position sees
//! a complete cache.
//!
//! **Confidence cost.** A check needs the whole vocabulary's probabilities. In decode, when the
//! head has an int8 argmax screen, the check uses the screen's int8 approximation of every logit
//! (a quarter of the head's bytes); the token of an exit is then the exact argmax at that block
//! (through the screen). Without a screen, and in [`perplexity`], the exact f32 logits are used.
//!
//! **Evaluation** ([`perplexity`]) runs a window through block after block with every row: rows
//! that have exited keep their frozen hidden state (their block outputs are discarded), so the
//! K/V each later block writes for them is the propagated exit state, exactly what sequential
//! decoding writes; each row's NLL comes from the logits it exited with.

use super::generate::{GenerateOpts, GenerateStats};
use super::kv::{on_pool, KvCache};
use super::sample::{argmax, Sampler};
use crate::model::forward::{block_forward_cached, embed, linear, logits, KvSlot};
use crate::model::observer::NoObserver;
use crate::{kernels, Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// Refuse a threshold outside (0, 1].
pub fn check_threshold(t: f32) -> Result<()> {
    if t > 0.0 && t <= 1.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--early-exit must be in (0, 1], got {t}"
        )))
    }
}

/// Early-exit settings.
#[derive(Debug, Clone)]
pub struct ExitOpts {
    /// Exit when the largest probability is at least this.
    pub threshold: f32,
    /// Block counts after which confidence is checked (ascending, each `< n_layers`).
    pub checks: Vec<usize>,
}

impl ExitOpts {
    /// Threshold `t`, checks after ½, ⅔ and ⅚ of the blocks. Refuses SliceGPT models (their
    /// residual rotations would have to be applied to the frozen state).
    pub fn new(model: &Model, t: f32) -> Result<ExitOpts> {
        check_threshold(t)?;
        let n = model.weights.layers.len();
        if model
            .weights
            .layers
            .iter()
            .any(|l| l.attn_shortcut.is_some() || l.mlp_shortcut.is_some())
        {
            return Err(Error::Invalid(
                "--early-exit: SliceGPT-sliced models (residual rotations) are not supported"
                    .into(),
            ));
        }
        let mut checks: Vec<usize> = [n / 2, 2 * n / 3, 5 * n / 6]
            .into_iter()
            .filter(|&c| c >= 1 && c < n)
            .collect();
        checks.dedup();
        Ok(ExitOpts {
            threshold: t,
            checks,
        })
    }
}

/// Counts of one early-exit run.
#[derive(Debug, Clone, Serialize)]
pub struct ExitStats {
    pub generate: GenerateStats,
    /// Tokens whose next token was decided (the prefill's last position and every decode step).
    pub tokens: usize,
    /// Blocks run in full, summed over those tokens.
    pub layers_run: usize,
    /// Tokens that exited before the last block.
    pub early_exits: usize,
}

/// The largest softmax probability of `logits`.
fn max_prob(logits: &[f32]) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    1.0 / z
}

/// This token's K/V for block `i` from the hidden state `h` `[1, hidden]`, at position `pos`.
fn propagate_kv(model: &Model, i: usize, h: &[f32], cache: &mut KvCache, pos: usize) {
    let cfg = &model.config;
    let lw = &model.weights.layers[i];
    let kw = cache.kv_width[i];
    let mut xn = vec![0f32; h.len()];
    kernels::rmsnorm_dim(
        h,
        lw.attn_norm.data(),
        cfg.rms_norm_eps as f32,
        cfg.norm_dim(),
        &mut xn,
    );
    let (mut k, mut v) = (vec![0f32; kw], vec![0f32; kw]);
    linear(&lw.k, &xn, 1, &mut k, false);
    linear(&lw.v, &xn, 1, &mut v, false);
    cache
        .rope
        .apply(&mut k, lw.n_kv_heads(cfg.head_dim), 1, pos);
    cache.k[i][pos * kw..(pos + 1) * kw].copy_from_slice(&k);
    cache.v[i][pos * kw..(pos + 1) * kw].copy_from_slice(&v);
}

/// One decode step of `tok` with early exit; returns the next token's logits (screened top-1
/// when greedy with a screen) and the blocks run.
fn step(
    model: &Model,
    eo: &ExitOpts,
    tok: u32,
    cache: &mut KvCache,
    greedy: bool,
) -> Result<(Vec<f32>, usize)> {
    if cache.remaining() == 0 {
        return Err(Error::Invalid("KV cache full".into()));
    }
    let cfg = &model.config;
    let w = &model.weights;
    let n = w.layers.len();
    let pos = cache.len;
    let mut h = embed(w, &[tok])?;
    let screen = w.lm_head_screen.as_ref().filter(|_| greedy);
    let mut exited: Option<(usize, Vec<f32>)> = None;
    for i in 0..n {
        if exited.is_some() {
            propagate_kv(model, i, &h, cache, pos);
            continue;
        }
        let slot = KvSlot {
            k: &mut cache.k[i],
            v: &mut cache.v[i],
            pos0: pos,
        };
        block_forward_cached(
            cfg,
            i,
            &w.layers[i],
            &cache.rope,
            &mut h,
            1,
            1,
            &mut cache.scratch,
            &mut NoObserver,
            Some(slot),
        );
        if !eo.checks.contains(&(i + 1)) {
            continue;
        }
        let hn = crate::model::forward::final_norm(model, &h);
        let conf = match screen {
            Some(s) => {
                let mut y = vec![0f32; w.lm_head().rows()];
                s.approx_matvec(&hn, &mut y);
                max_prob(&y)
            }
            None => max_prob(&logits(w, &hn, 1)),
        };
        if conf >= eo.threshold as f64 {
            exited = Some((i + 1, hn));
        }
    }
    cache.len = pos + 1;
    match exited {
        Some((l, hn)) => Ok((super::kv::head_top_k(model, &hn, greedy as usize), l)),
        None => {
            let hn = crate::model::forward::final_norm(model, &h);
            Ok((super::kv::head_top_k(model, &hn, greedy as usize), n))
        }
    }
}

/// Generate with early exit in every decode step (the prompt is prefilled by the full model).
/// Greedy steps use the head's screen when the model has one.
pub fn generate_early_exit(
    model: &Model,
    eo: &ExitOpts,
    prompt_ids: &[u32],
    opts: &GenerateOpts,
    on_token: &mut dyn FnMut(u32),
) -> Result<ExitStats> {
    let mut sampler = Sampler::new(opts.sampling)?;
    let ctx = super::generate::check_prompt(model, prompt_ids)?;
    let greedy = opts.sampling.is_greedy();
    let stops = super::generate::stop_tokens(model, opts);
    let cap = (prompt_ids.len() + opts.max_new.saturating_sub(1)).min(ctx);
    let mut cache = KvCache::new(model, cap);
    let mut gs = GenerateStats::new(prompt_ids.len());
    let n = model.weights.layers.len();
    let (mut layers, mut exits, mut tokens) = (0usize, 0usize, 0usize);
    if opts.max_new > 0 {
        let t = Instant::now();
        let logits = if greedy {
            super::kv::forward_step_top_k(model, prompt_ids, &mut cache, 1)?
        } else {
            super::kv::forward_step(model, prompt_ids, &mut cache)?
        };
        let mut tok = if greedy {
            argmax(&logits)
        } else {
            sampler.sample(&logits)
        };
        gs.prefill_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        loop {
            if !gs.emit(tok, &stops, opts.max_new, cache.remaining(), on_token) {
                break;
            }
            let (l, ran) = on_pool(|| step(model, eo, tok, &mut cache, greedy))?;
            tokens += 1;
            layers += ran;
            exits += (ran < n) as usize;
            tok = sampler.sample(&l);
            gs.decode_steps += 1;
        }
        gs.decode_seconds = t.elapsed().as_secs_f64();
    }
    gs.finish_rates();
    Ok(ExitStats {
        generate: gs,
        tokens,
        layers_run: layers,
        early_exits: exits,
    })
}

/// Perplexity with early exit on windows of `ids` (see the module docs); returns the eval
/// result and the mean number of blocks run per scored token.
pub fn perplexity(
    model: &Model,
    eo: &ExitOpts,
    ids: &[u32],
    seq_len: usize,
    windows: usize,
    text_path: &std::path::Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(crate::eval::EvalResult, f64)> {
    let wins = crate::eval::make_windows(ids, seq_len, windows, text_path)?;
    let t0 = Instant::now();
    let (mut nll, mut count, mut layers) = (0f64, 0usize, 0usize);
    for (wi, win) in wins.iter().enumerate() {
        let (s, c, l) = on_pool(|| window_nll(model, eo, win))?;
        nll += s;
        count += c;
        layers += l;
        progress(wi + 1, wins.len());
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = wins.len() * seq_len;
    let r = crate::eval::EvalResult {
        perplexity: (nll / count as f64).exp(),
        mean_nll: nll / count as f64,
        predictions: count,
        tokens,
        windows: wins.len(),
        seq_len,
        text_tokens: ids.len(),
        seconds: secs,
        tokens_per_second: tokens as f64 / secs,
    };
    Ok((r, layers as f64 / count.max(1) as f64))
}

/// Rows of logits materialised at once in a confidence check.
const CHUNK: usize = 256;

/// Per position of one window: the block count it exited after, its NLL of the next token and
/// the argmax of the logits it exited with (positions `0..len−1`).
#[derive(Debug, Clone)]
pub struct WindowExits {
    pub exit_at: Vec<usize>,
    pub nll: Vec<f64>,
    pub argmax: Vec<u32>,
}

/// Early exit over one window `win`: positions below `full_prefix` never exit (a prompt that
/// decoding prefills with the full model); see the module docs.
pub fn window_exits(
    model: &Model,
    eo: &ExitOpts,
    win: &[u32],
    full_prefix: usize,
) -> Result<WindowExits> {
    let (cfg, w) = (&model.config, &model.weights);
    let (n, d, len) = (w.layers.len(), cfg.hidden_size, win.len());
    if len < 2 {
        return Err(Error::Invalid(
            "early-exit evaluation needs windows of at least 2 tokens".into(),
        ));
    }
    let mut cache = KvCache::new(model, len);
    let mut h = embed(w, win)?;
    let mut exit_at: Vec<Option<usize>> = vec![None; len - 1];
    // Exited rows' hidden states, frozen at their exit block.
    let mut frozen = vec![0f32; len * d];
    let (mut nll, mut best) = (vec![0f64; len - 1], vec![0u32; len - 1]);
    for i in 0..n {
        let slot = KvSlot {
            k: &mut cache.k[i],
            v: &mut cache.v[i],
            pos0: 0,
        };
        block_forward_cached(
            cfg,
            i,
            &w.layers[i],
            &cache.rope,
            &mut h,
            1,
            len,
            &mut cache.scratch,
            &mut NoObserver,
            Some(slot),
        );
        // Exited rows keep their frozen state (their K/V at the next block come from it).
        for (r, e) in exit_at.iter().enumerate() {
            if e.is_some() {
                h[r * d..(r + 1) * d].copy_from_slice(&frozen[r * d..(r + 1) * d]);
            }
        }
        let last = i + 1 == n;
        if !last && !eo.checks.contains(&(i + 1)) {
            continue;
        }
        let active: Vec<usize> = (0..len - 1)
            .filter(|&r| exit_at[r].is_none() && (last || r >= full_prefix))
            .collect();
        let hn = crate::model::forward::final_norm(model, &h);
        for chunk in active.chunks(CHUNK) {
            let mut x = Vec::with_capacity(chunk.len() * d);
            for &r in chunk {
                x.extend_from_slice(&hn[r * d..(r + 1) * d]);
            }
            let lg = logits(w, &x, chunk.len());
            let v = lg.len() / chunk.len();
            for (row, &r) in lg.chunks(v).zip(chunk) {
                if last || max_prob(row) >= eo.threshold as f64 {
                    exit_at[r] = Some(i + 1);
                    nll[r] = kernels::logsumexp(row) - row[win[r + 1] as usize] as f64;
                    best[r] = argmax(row);
                    frozen[r * d..(r + 1) * d].copy_from_slice(&h[r * d..(r + 1) * d]);
                }
            }
        }
    }
    Ok(WindowExits {
        exit_at: exit_at.into_iter().map(|e| e.unwrap_or(n)).collect(),
        nll,
        argmax: best,
    })
}

/// One window: (Σ NLL, predictions, Σ blocks run) over positions `0..len−1`.
fn window_nll(model: &Model, eo: &ExitOpts, win: &[u32]) -> Result<(f64, usize, usize)> {
    let e = window_exits(model, eo, win, 0)?;
    let total: f64 = e.nll.iter().sum();
    if !total.is_finite() {
        return Err(Error::Numeric(format!(
            "early-exit NLL is {total} on a window"
        )));
    }
    Ok((total, e.nll.len(), e.exit_at.iter().sum()))
}

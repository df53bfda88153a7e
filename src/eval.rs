//! Perplexity evaluation.
//!
//! Protocol (wiki-16x2048 by default): tokenize the whole text once, no BOS or special tokens;
//! take the first `windows` non-overlapping windows of `seq_len` tokens from the start, each run
//! on its own from position 0; perplexity = exp(Σ NLL of predicting tokens 1..L−1 of every
//! window / number of predictions). Log-softmax uses an f64 sum of f32 exponentials.
//!
//! Memory: full-vocabulary logits are produced `LOGIT_CHUNK` rows at a time and reduced to NLL
//! right away, so a 2048-token window never holds its 2048×vocab logits at once.
//! [`perplexity_by_block`] gives the same figure holding one block's weights at a time.

use crate::model::forward::{block_forward, embed, final_norm, forward_hidden, logits, Scratch};
use crate::model::observer::NoObserver;
use crate::model::rope::Rope;
use crate::util::Workers;
use crate::{kernels, Error, Model, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Rows of logits materialised at once.
pub const LOGIT_CHUNK: usize = 512;

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub perplexity: f64,
    /// Mean next-token NLL (nats).
    pub mean_nll: f64,
    /// Scored predictions: `windows · (seq_len − 1)`.
    pub predictions: usize,
    /// Tokens run through the model: `windows · seq_len`.
    pub tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    /// Tokens in the whole text.
    pub text_tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

/// Split `ids` into the first `windows` windows of `seq_len`; fewer if the text is shorter
/// (at least one is required). `path` names the text in errors.
pub fn make_windows<'a>(
    ids: &'a [u32],
    seq_len: usize,
    windows: usize,
    path: &Path,
) -> Result<Vec<&'a [u32]>> {
    if seq_len < 2 {
        return Err(Error::Invalid(format!(
            "--seq-len must be at least 2, got {seq_len}"
        )));
    }
    if windows == 0 {
        return Err(Error::Invalid("--windows must be at least 1".into()));
    }
    let available = ids.len() / seq_len;
    if available == 0 {
        return Err(Error::Text {
            path: path.to_path_buf(),
            msg: format!(
                "text is too short: {} tokens, one window needs {seq_len} (use a longer text or a smaller --seq-len)",
                ids.len()
            ),
        });
    }
    Ok(ids.chunks_exact(seq_len).take(windows).collect())
}

/// Sum of next-token NLL over one window and the number of predictions (`len − 1`).
pub fn window_nll(model: &Model, window: &[u32]) -> Result<(f64, usize)> {
    let h = forward_hidden(model, window, 1, window.len(), &mut NoObserver)?;
    hidden_nll(model, &h, window)
}

/// [`window_nll`] from the window's final-normed hidden states `h` `[len, hidden]`.
fn hidden_nll(model: &Model, h: &[f32], window: &[u32]) -> Result<(f64, usize)> {
    let l = window.len();
    let d = model.config.hidden_size;
    let mut total = 0f64;
    let mut r0 = 0;
    while r0 < l - 1 {
        let r1 = (r0 + LOGIT_CHUNK).min(l - 1);
        let rows = r1 - r0;
        let lg = logits(&model.weights, &h[r0 * d..r1 * d], rows);
        let vocab = lg.len() / rows;
        let s: f64 = lg
            .par_chunks(vocab)
            .enumerate()
            .map(|(i, row)| {
                let target = window[r0 + i + 1] as usize;
                kernels::logsumexp(row) - row[target] as f64
            })
            .sum();
        total += s;
        r0 = r1;
    }
    if !total.is_finite() {
        return Err(Error::Numeric(format!(
            "NLL is {total} on a window: the model produced NaN/Inf"
        )));
    }
    Ok((total, l - 1))
}

/// Perplexity of `model` on token ids `ids` by the protocol above; `progress(done, total)` is
/// called after each window.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    windows: usize,
    text_path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let wins = make_windows(ids, seq_len, windows, text_path)?;
    let t0 = Instant::now();
    let workers = Workers::new();
    let count = wins.len();
    let (nll, n) = sum_windows(&workers, count, &|i| window_nll(model, wins[i]), &mut |d| {
        progress(d, count)
    })?;
    Ok(result(nll, n, &wins, seq_len, ids.len(), t0))
}

/// [`perplexity`], computed block by block: every window goes through block 0, then block 1,
/// and so on, and each block's weights are released once all windows are through it
/// ([`crate::LayerWeights::release`]). A model whose weights are mapped or converted when first
/// read (what `lopper prune` loads by default) so never holds more than one block of f32
/// weights, where window by window it would end up holding all of them; the cost is every
/// window's hidden states (`windows · seq_len · hidden` f32: 75 MB for wiki-16x2048 on the
/// default model). Each window's arithmetic is [`window_nll`]'s, on the same kind of
/// single-thread worker, so the figure is bit for bit the same. `progress(done, total)` is
/// called after each block and after the final scoring.
pub fn perplexity_by_block(
    model: &mut Model,
    ids: &[u32],
    seq_len: usize,
    windows: usize,
    text_path: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let wins = make_windows(ids, seq_len, windows, text_path)?;
    let t0 = Instant::now();
    let cfg = model.config.clone();
    let mut hs = wins
        .iter()
        .map(|w| embed(&model.weights, w))
        .collect::<Result<Vec<_>>>()?;
    model.weights.embed.release();
    let rope = Rope::new(&cfg, seq_len);
    let workers = Workers::new();
    let per_round = workers.as_ref().map_or(1, |w| w.len());
    let mut scratch: Vec<Scratch> = (0..per_round).map(|_| Scratch::default()).collect();
    let n_layers = model.weights.layers.len();
    let steps = n_layers + 1;
    for i in 0..n_layers {
        let lw = &model.weights.layers[i];
        // Each worker takes a contiguous share of the windows: one join per block.
        let share = hs.len().div_ceil(per_round);
        let mut jobs: Vec<Box<dyn FnOnce() + Send + '_>> = Vec::new();
        for (group, s) in hs.chunks_mut(share).zip(scratch.iter_mut()) {
            let (cfg, rope) = (&cfg, &rope);
            jobs.push(Box::new(move || {
                for h in group {
                    block_forward(cfg, i, lw, rope, h, 1, seq_len, s, &mut NoObserver)
                }
            }));
        }
        match &workers {
            Some(w) => {
                w.run(jobs);
            }
            None => jobs.into_iter().for_each(|j| j()),
        }
        model.weights.layers[i].release();
        progress(i + 1, steps);
    }
    drop(scratch);
    // Final norm and scoring, window by window as in `window_nll`.
    let m = &*model;
    let score = |i: usize| hidden_nll(m, &final_norm(m, &hs[i]), wins[i]);
    let (nll, n) = sum_windows(&workers, wins.len(), &score, &mut |_| {})?;
    model.weights.embed.release();
    model.weights.final_norm.release();
    if let Some(head) = &mut model.weights.lm_head {
        head.release();
    }
    progress(steps, steps);
    Ok(result(nll, n, &wins, seq_len, ids.len(), t0))
}

/// `f(i)` for windows `0..count`, side by side, one per worker of `workers` (rounds of
/// consecutive windows), summed in window order; `done(i + 1)` after window `i`.
fn sum_windows(
    workers: &Option<Workers>,
    count: usize,
    f: &(dyn Fn(usize) -> Result<(f64, usize)> + Sync),
    done: &mut dyn FnMut(usize),
) -> Result<(f64, usize)> {
    let per_round = workers.as_ref().map_or(1, |w| w.len());
    let (mut nll, mut n) = (0f64, 0usize);
    for r0 in (0..count).step_by(per_round) {
        let round = r0..(r0 + per_round).min(count);
        let results = match workers {
            Some(w) => w.run(
                round
                    .clone()
                    .map(|i| {
                        Box::new(move || f(i)) as Box<dyn FnOnce() -> Result<(f64, usize)> + Send>
                    })
                    .collect(),
            ),
            None => round.clone().map(f).collect(),
        };
        for (i, res) in round.zip(results) {
            let (s, c) = res?;
            nll += s;
            n += c;
            done(i + 1);
        }
    }
    Ok((nll, n))
}

/// The [`EvalResult`] of summed NLL `nll` over `n` predictions.
fn result(
    nll: f64,
    n: usize,
    wins: &[&[u32]],
    seq_len: usize,
    text_tokens: usize,
    t0: Instant,
) -> EvalResult {
    let seconds = t0.elapsed().as_secs_f64();
    let tokens = wins.len() * seq_len;
    EvalResult {
        perplexity: (nll / n as f64).exp(),
        mean_nll: nll / n as f64,
        predictions: n,
        tokens,
        windows: wins.len(),
        seq_len,
        text_tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
    }
}

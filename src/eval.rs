//! Perplexity evaluation.
//!
//! Protocol (wiki-16x2048 by default): tokenize the whole text once, no BOS or special tokens;
//! take the first `windows` non-overlapping windows of `seq_len` tokens from the start, each run
//! on its own from position 0; perplexity = exp(Σ NLL of predicting tokens 1..L−1 of every
//! window / number of predictions). Log-softmax uses an f64 sum of f32 exponentials.
//!
//! Memory: full-vocabulary logits are produced `LOGIT_CHUNK` rows at a time and reduced to NLL
//! right away, so a 2048-token window never holds its 2048×vocab logits at once.

use crate::model::forward::{forward_hidden, logits};
use crate::model::observer::NoObserver;
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
    let l = window.len();
    let h = forward_hidden(model, window, 1, l, &mut NoObserver)?;
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
    let (mut nll, mut n) = (0f64, 0usize);
    // Windows run side by side, one per worker (data parallelism; sums stay in window order).
    let workers = crate::util::Workers::new();
    let per_round = workers.as_ref().map_or(1, |w| w.len());
    for (r, round) in wins.chunks(per_round).enumerate() {
        let results = match &workers {
            Some(w) => w.run(
                round
                    .iter()
                    .map(|&win| {
                        Box::new(move || window_nll(model, win))
                            as Box<dyn FnOnce() -> Result<(f64, usize)> + Send>
                    })
                    .collect(),
            ),
            None => round.iter().map(|win| window_nll(model, win)).collect(),
        };
        for (i, res) in results.into_iter().enumerate() {
            let (s, c) = res?;
            nll += s;
            n += c;
            progress(r * per_round + i + 1, wins.len());
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let tokens = wins.len() * seq_len;
    Ok(EvalResult {
        perplexity: (nll / n as f64).exp(),
        mean_nll: nll / n as f64,
        predictions: n,
        tokens,
        windows: wins.len(),
        seq_len,
        text_tokens: ids.len(),
        seconds,
        tokens_per_second: tokens as f64 / seconds,
    })
}

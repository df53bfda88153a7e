//! Choosing which blocks a self-speculative draft skips ([`super::speculative`]).
//!
//! Blocks are ranked by an importance score (the CLI passes ShortGPT's Block Influence from
//! `structured::depth::block_influence`, Men et al. 2024: the least influential go first, as
//! Draft & Verify's skipped layers are mostly the redundant ones). How many to skip is then a
//! small search for the best expected speed-up, in the spirit of SWIFT's (Xia et al. 2024)
//! search for acceptance per unit of cost, but over one ranked list instead of a Bayesian
//! search over all subsets: for each candidate count `n`, the draft (the `n` lowest-ranked
//! blocks skipped) runs teacher-forced over calibration windows, and its greedy token is
//! compared with the full model's at every position. That match rate estimates the per-token
//! acceptance `α`; the draft's cost relative to a full step, `c`, is its share of the weight
//! bytes a decode step reads (the LM head counted in both, as its int8 screen when it has one); the count with the best [`KController::gain`] over draft lengths wins.

use super::kv::{on_pool, step_hidden, KvCache};
use super::sample::argmax;
use super::speculative::KController;
use crate::model::names::LinearKind;
use crate::{Error, Model, Result};
use serde::Serialize;

/// One candidate skip set and how it did.
#[derive(Debug, Clone, Serialize)]
pub struct SkipCandidate {
    /// Blocks skipped, ascending.
    pub skipped: Vec<usize>,
    /// Teacher-forced greedy agreement with the full model.
    pub match_rate: f64,
    /// Draft step cost relative to a full step (weight bytes).
    pub cost: f64,
    /// Best expected tokens per unit of cost, and the draft length giving it.
    pub gain: f64,
    pub best_k: usize,
}

/// Weight bytes of each block's linears and of the LM head (packed size when packed; the int8
/// screen's size when the head has a screen, which greedy steps read instead).
pub fn block_bytes(model: &Model) -> (Vec<usize>, usize) {
    let w = &model.weights;
    let one = |t: &crate::Tensor, p: Option<&crate::model::weights::Packed>| {
        p.map_or(t.len() * 4, |p| p.format.nbytes())
    };
    let blocks = w
        .layers
        .iter()
        .map(|l| {
            LinearKind::ALL
                .iter()
                .map(|&k| {
                    let lin = l.linear(k);
                    one(&lin.weight, lin.packed.as_ref())
                })
                .sum()
        })
        .collect();
    let head = match &w.lm_head_screen {
        Some(s) => s.nbytes(),
        None => one(w.lm_head(), w.lm_head_packed.as_ref()),
    };
    (blocks, head)
}

/// Greedy tokens of every position of `ids` with blocks `skip` left out.
fn greedy_all(model: &Model, ids: &[u32], skip: &[bool]) -> Result<Vec<u32>> {
    let mut cache = KvCache::new(model, ids.len());
    let h = on_pool(|| step_hidden(model, ids, &mut cache, skip, false))?;
    let l = crate::model::forward::logits(&model.weights, &h, ids.len());
    let v = l.len() / ids.len().max(1);
    Ok(l.chunks(v).map(argmax).collect())
}

/// Evaluate skipping the first `n` blocks of `order` for each `n` in `counts` on `windows`;
/// returns every candidate (in `counts` order). `order` ranks blocks, least needed first.
pub fn search_skip(
    model: &Model,
    windows: &[&[u32]],
    order: &[usize],
    counts: &[usize],
    max_draft: usize,
) -> Result<Vec<SkipCandidate>> {
    let n_layers = model.weights.layers.len();
    if windows.is_empty() || windows.iter().any(|w| w.is_empty()) {
        return Err(Error::Invalid(
            "draft search needs non-empty calibration windows".into(),
        ));
    }
    if order.len() != n_layers || order.iter().any(|&i| i >= n_layers) {
        return Err(Error::Invalid(format!(
            "draft search: the block ranking must list each of the {n_layers} blocks"
        )));
    }
    let full: Vec<Vec<u32>> = windows
        .iter()
        .map(|w| greedy_all(model, w, &[]))
        .collect::<Result<_>>()?;
    let (bytes, head) = block_bytes(model);
    let total = (bytes.iter().sum::<usize>() + head) as f64;
    let mut out = Vec::with_capacity(counts.len());
    for &n in counts {
        if n == 0 || n >= n_layers {
            return Err(Error::Invalid(format!(
                "draft search: cannot skip {n} of {n_layers} blocks"
            )));
        }
        let mut skipped: Vec<usize> = order[..n].to_vec();
        skipped.sort_unstable();
        let mut skip = vec![false; n_layers];
        for &i in &skipped {
            skip[i] = true;
        }
        let (mut same, mut all) = (0usize, 0usize);
        for (w, f) in windows.iter().zip(&full) {
            let d = greedy_all(model, w, &skip)?;
            same += d.iter().zip(f).filter(|(a, b)| a == b).count();
            all += d.len();
        }
        let alpha = same as f64 / all as f64;
        let kept: usize = (0..n_layers).filter(|&i| !skip[i]).map(|i| bytes[i]).sum();
        let cost = (kept + head) as f64 / total;
        let (best_k, gain) = (1..=max_draft.max(1))
            .map(|k| (k, KController::gain(k, alpha, cost)))
            .fold((0, 1.0), |b, x| if x.1 > b.1 { x } else { b });
        out.push(SkipCandidate {
            skipped,
            match_rate: alpha,
            cost,
            gain,
            best_k,
        });
    }
    Ok(out)
}

/// The candidate with the highest gain (the first on ties).
pub fn best(cands: &[SkipCandidate]) -> Option<&SkipCandidate> {
    cands
        .iter()
        .fold(None, |b: Option<&SkipCandidate>, c| match b {
            Some(x) if x.gain >= c.gain => Some(x),
            _ => Some(c),
        })
}

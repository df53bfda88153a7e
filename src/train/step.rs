//! One loss-and-gradient evaluation with per-block gradient checkpointing.
//!
//! 1. The blocks run forward untracked; only each block's input is kept (`L · rows · d` floats).
//! 2. The head and loss run tracked on a copy of the last hidden states made a [`Var`], in
//!    chunks of [`HEAD_CHUNK`] rows (a full `rows × vocab` graph would dominate memory); each
//!    chunk's backward gives the parameter gradients and `∂loss/∂h_L` for those rows.
//! 3. From the last block down, block `i` is recomputed tracked from its kept input (a [`Var`])
//!    and `Σ y ⊙ g` is differentiated, `g` being the detached gradient arriving at its output
//!    (Chen et al. 2016, "Training deep nets with sublinear memory cost"): this yields the
//!    block's parameter gradients and the gradient at its input, passed down.
//! 4. When the embedding trains, `Σ embed(ids) ⊙ g₀` is differentiated last.
//!
//! Memory is therefore the weights, the kept inputs, and one block's (or one head chunk's)
//! graph. The optional hidden-state loss adds, at block `i`'s output, `λ/L · ‖y_i − t_i‖² /
//! ‖t_i‖²` against the teacher's block output `t_i` (Sun et al. 2019's patient distillation,
//! normalised per block so that deep blocks with large activations do not dominate).

use super::graph::{self, Ctx};
use super::params::{terr, TrainModel};
use crate::{Error, Model, Result};
use candle_core::{DType, Tensor, Var};

/// Rows of logits built into one graph at a time.
pub const HEAD_CHUNK: usize = 128;

/// What the head is trained towards.
#[derive(Clone, Copy)]
pub enum Objective<'a> {
    /// Mean next-token cross-entropy over tokens `1..seq` of every window (the golden
    /// gradients' loss).
    NextToken,
    /// `τ² · mean over every position of KL(p_teacher ‖ p_student)` at temperature `τ`
    /// (Hinton et al. 2015); `hidden` is the teacher's final-normed hidden states `[rows, d]`,
    /// turned into logits through `teacher`'s head a chunk at a time.
    Distill {
        teacher: &'a Model,
        hidden: &'a [f32],
        tau: f64,
    },
}

/// The teacher's block outputs (`[rows, d]` each, one per block) and the hidden loss weight.
#[derive(Clone, Copy)]
pub struct HiddenTarget<'a> {
    pub outputs: &'a [Vec<f32>],
    pub weight: f64,
}

/// Loss parts and the gradient of every [`TrainModel::vars`] entry (`None`: not reached).
#[derive(Debug)]
pub struct StepOut {
    pub loss: f64,
    pub head_loss: f64,
    pub hidden_loss: f64,
    pub grads: Vec<Option<Tensor>>,
}

fn collect(
    tm: &TrainModel,
    store: &candle_core::backprop::GradStore,
    acc: &mut [Option<Tensor>],
) -> Result<()> {
    for (nv, a) in tm.vars.iter().zip(acc.iter_mut()) {
        if let Some(g) = store.get(nv.var.as_tensor()) {
            // candle's gradients can keep an op graph (a product with a tracked tensor) that
            // holds the block's weight-sized intermediates alive; detached, they hold nothing.
            let g = g.detach();
            *a = Some(match a.take() {
                Some(prev) => (prev + g).map_err(terr)?.detach(),
                None => g,
            });
        }
    }
    Ok(())
}

/// Row-wise softmax of `z/τ` in place and `Σ p log p` (f64).
fn teacher_probs(z: &mut [f32], vocab: usize, tau: f64) -> f64 {
    let mut plogp = 0f64;
    for row in z.chunks_mut(vocab) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = row.iter().map(|&x| ((x as f64 - m) / tau).exp()).sum();
        let ls = s.ln();
        for x in row.iter_mut() {
            let lp = (*x as f64 - m) / tau - ls;
            let p = lp.exp();
            if p > 0.0 {
                plogp += p * lp;
            }
            *x = p as f32;
        }
    }
    plogp
}

/// Distillation through a frozen head without a vocabulary-sized graph: the KL's gradient with
/// respect to the student's logits is `τ (q − p) / denom` in closed form (`q`, `p` the student's
/// and teacher's softmax at temperature `τ`), computed row-parallel here; it is taken back
/// through the head with one product, and only the final norm is differentiated by candle
/// (`Σ n(x) ⊙ g`). Returns the loss value and `∂loss/∂x` for the chunk.
#[allow(clippy::too_many_arguments)]
fn head_chunk_frozen(
    tm: &TrainModel,
    x: &Var,
    r0: usize,
    ctx: &Ctx,
    teacher: &Model,
    hidden: &[f32],
    tau: f64,
    acc: &mut [Option<Tensor>],
) -> Result<(f64, Tensor)> {
    use rayon::prelude::*;
    let n = x.as_tensor().dim(0).map_err(terr)?;
    let head = tm.head(false);
    let xn = graph::rmsnorm(
        x.as_tensor(),
        &tm.final_norm.get(true),
        ctx.eps,
        ctx.norm_dim,
    )
    .map_err(terr)?;
    let zs: Vec<f32> = xn
        .detach()
        .matmul(&head.t().map_err(terr)?)
        .and_then(|z| z.flatten_all())
        .and_then(|z| z.to_vec1())
        .map_err(terr)?;
    let d = teacher.config.hidden_size;
    let zt = crate::model::forward::logits(&teacher.weights, &hidden[r0 * d..(r0 + n) * d], n);
    let vocab = zs.len() / n;
    let denom = (ctx.batch * ctx.seq) as f64;
    let mut gz = vec![0f32; n * vocab];
    let loss: f64 = gz
        .par_chunks_mut(vocab)
        .zip(zs.par_chunks(vocab).zip(zt.par_chunks(vocab)))
        .map(|(g, (s, t))| {
            let lse = |z: &[f32]| {
                let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                m / tau
                    + z.iter()
                        .map(|&v| ((v as f64 - m) / tau).exp())
                        .sum::<f64>()
                        .ln()
            };
            let (ls, lt) = (lse(s), lse(t));
            let mut kl = 0f64;
            for i in 0..vocab {
                let lq = s[i] as f64 / tau - ls;
                let lp = t[i] as f64 / tau - lt;
                let p = lp.exp();
                if p > 0.0 {
                    kl += p * (lp - lq);
                }
                g[i] = (tau * (lq.exp() - p) / denom) as f32;
            }
            kl * tau * tau / denom
        })
        .sum();
    let g = Tensor::from_vec(gz, (n, vocab), &tm.device)
        .and_then(|g| g.matmul(&head))
        .map_err(terr)?;
    let lb = (&xn * &g).and_then(|t| t.sum_all()).map_err(terr)?;
    let store = lb.backward().map_err(terr)?;
    collect(tm, &store, acc)?;
    let gx = store
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Train("no gradient reached the last hidden states".into()))?;
    Ok((loss, gx))
}

/// Loss of rows `r0..r0+n` from their last hidden states `x` (a var); returns the loss tensor
/// and the constant added to its value.
fn head_chunk_loss(
    tm: &TrainModel,
    x: &Tensor,
    ids: &[u32],
    r0: usize,
    ctx: &Ctx,
    obj: Objective<'_>,
) -> Result<(Tensor, f64)> {
    let n = x.dim(0).map_err(terr)?;
    let dev = &tm.device;
    let logits = graph::head(x, &tm.final_norm.get(true), &tm.head(true), ctx).map_err(terr)?;
    let seq = ctx.seq;
    match obj {
        Objective::NextToken => {
            let denom = (ctx.batch * (seq - 1)) as f64;
            let (mut t, mut w) = (vec![0u32; n], vec![0f32; n]);
            for i in 0..n {
                let r = r0 + i;
                if r % seq != seq - 1 {
                    t[i] = ids[r + 1];
                    w[i] = 1.0;
                }
            }
            let t = Tensor::from_vec(t, n, dev).map_err(terr)?;
            let w = Tensor::from_vec(w, n, dev).map_err(terr)?;
            Ok((
                graph::cross_entropy(&logits, &t, &w, denom).map_err(terr)?,
                0.0,
            ))
        }
        Objective::Distill {
            teacher,
            hidden,
            tau,
        } => {
            let d = teacher.config.hidden_size;
            let denom = (ctx.batch * seq) as f64;
            let mut z =
                crate::model::forward::logits(&teacher.weights, &hidden[r0 * d..(r0 + n) * d], n);
            let vocab = z.len() / n;
            let plogp = teacher_probs(&mut z, vocab, tau);
            let p = Tensor::from_vec(z, (n, vocab), dev).map_err(terr)?;
            let l = graph::kd_cross(&logits, &p, tau, denom).map_err(terr)?;
            Ok((l, tau * tau * plogp / denom))
        }
    }
}

/// Phase timing and RSS on stderr when `LOPPER_TRACE_RSS` is set.
fn trace(stage: &str, t0: std::time::Instant) {
    crate::util::trace_rss(&format!("{stage} at {:.2} s", t0.elapsed().as_secs_f64()));
}

/// Loss and gradients of `tm` on `batch` windows of `seq` tokens `ids`.
pub fn loss_and_grads(
    tm: &TrainModel,
    ids: &[u32],
    batch: usize,
    seq: usize,
    ctx: &Ctx,
    obj: Objective<'_>,
    hidden: Option<HiddenTarget<'_>>,
) -> Result<StepOut> {
    if ids.len() != batch * seq || ctx.batch != batch || ctx.seq != seq {
        return Err(Error::Invalid(format!(
            "{} tokens do not form {batch} windows of {seq}",
            ids.len()
        )));
    }
    let dev = &tm.device;
    let t0 = std::time::Instant::now();
    let rows = ids.len();
    let idt = Tensor::from_slice(ids, rows, dev).map_err(terr)?;
    // 1. Untracked forward, keeping block inputs.
    let mut h = graph::embed(&tm.embed.get(false), &idt).map_err(terr)?;
    let mut inputs = Vec::with_capacity(tm.blocks.len());
    for b in &tm.blocks {
        let p = b.effective(false).map_err(terr)?;
        let y = graph::block(&h, &p, ctx).map_err(terr)?;
        inputs.push(h);
        h = y;
    }
    trace("step: forward", t0);
    let mut acc: Vec<Option<Tensor>> = vec![None; tm.vars.len()];
    // 2. Head and loss, by row chunks.
    let mut head_loss = 0f64;
    let mut gparts = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let n = HEAD_CHUNK.min(rows - r0);
        let x = Var::from_tensor(&h.narrow(0, r0, n).map_err(terr)?).map_err(terr)?;
        let frozen_head = matches!(
            tm.head.as_ref().unwrap_or(&tm.embed),
            super::params::Param::Fixed(_)
        );
        if let (
            true,
            Objective::Distill {
                teacher,
                hidden,
                tau,
            },
        ) = (frozen_head, obj)
        {
            let (l, gx) = head_chunk_frozen(tm, &x, r0, ctx, teacher, hidden, tau, &mut acc)?;
            head_loss += l;
            gparts.push(gx);
            r0 += n;
            continue;
        }
        let (l, constant) = head_chunk_loss(tm, x.as_tensor(), ids, r0, ctx, obj)?;
        head_loss += l
            .to_dtype(DType::F64)
            .and_then(|v| v.to_scalar::<f64>())
            .map_err(terr)?
            + constant;
        let store = l.backward().map_err(terr)?;
        collect(tm, &store, &mut acc)?;
        gparts.push(
            store
                .get(x.as_tensor())
                .cloned()
                .ok_or_else(|| Error::Train("no gradient reached the last hidden states".into()))?,
        );
        r0 += n;
    }
    trace("step: head", t0);
    let mut g = Tensor::cat(&gparts, 0).map_err(terr)?;
    drop(h);
    // 3. Blocks, last to first.
    let mut hidden_loss = 0f64;
    let nl = tm.blocks.len();
    for (i, (b, x_in)) in tm.blocks.iter().zip(inputs).enumerate().rev() {
        let x = Var::from_tensor(&x_in).map_err(terr)?;
        drop(x_in);
        let p = b.effective(true).map_err(terr)?;
        let y = graph::block(x.as_tensor(), &p, ctx).map_err(terr)?;
        let mut lb = (&y * &g).and_then(|t| t.sum_all()).map_err(terr)?;
        if let Some(ht) = hidden {
            let t = Tensor::from_slice(&ht.outputs[i], y.dims(), dev).map_err(terr)?;
            let norm: f64 = ht.outputs[i]
                .iter()
                .map(|&v| (v as f64) * (v as f64))
                .sum::<f64>()
                .max(1e-30);
            let hl = ((&y - &t)
                .and_then(|d| d.sqr())
                .and_then(|d| d.sum_all())
                .map_err(terr)?
                * (ht.weight / nl as f64 / norm))
                .map_err(terr)?;
            hidden_loss += hl
                .to_dtype(DType::F64)
                .and_then(|v| v.to_scalar::<f64>())
                .map_err(terr)?;
            lb = (lb + hl).map_err(terr)?;
        }
        let store = lb.backward().map_err(terr)?;
        collect(tm, &store, &mut acc)?;
        g = store
            .get(x.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Train(format!("no gradient reached the input of block {i}")))?;
    }
    trace("step: blocks", t0);
    // 4. Embedding.
    if matches!(tm.embed, super::params::Param::Train(_)) {
        let e = graph::embed(&tm.embed.get(true), &idt).map_err(terr)?;
        let lb = (&e * &g).and_then(|t| t.sum_all()).map_err(terr)?;
        let store = lb.backward().map_err(terr)?;
        collect(tm, &store, &mut acc)?;
    }
    Ok(StepOut {
        loss: head_loss + hidden_loss,
        head_loss,
        hidden_loss,
        grads: acc,
    })
}

//! The healing loop: distil a dense teacher into a pruned student.
//!
//! Each step takes one window of training text ([`super::data::Windows::at`]), runs the teacher
//! with lopper's plain forward pass (its logits, and its block outputs when the hidden loss is
//! on), then the student's checkpointed loss and gradients ([`super::step`]), and one masked
//! AdamW update. Learning rate: linear warm-up over the first 5% of the steps, then cosine decay
//! to a tenth (the usual LoRA recipe; LLM-Pruner uses linear warm-up and decay).
//!
//! A step whose loss or gradient is NaN/Inf is skipped (no update) and counted; after
//! [`HealOpts::max_bad`] in a row the loop stops with an error naming the last checkpoint.
//! Checkpoints every [`HealOpts::checkpoint_every`] steps make `--resume` reach the same
//! weights as an uninterrupted run: the data order depends only on `(seed, step)`, and the
//! checkpoint holds the variables, AdamW's moments and step count, and the loop state.

use super::adamw::{AdamCfg, AdamW};
use super::checkpoint::{self, LoopState};
use super::data::Windows;
use super::graph::Ctx;
use super::params::{terr, Mode, TrainModel};
use super::step::{self, HiddenTarget, Objective};
use crate::model::forward::forward_hidden;
use crate::model::observer::Observer;
use crate::{Error, Model, Result};
use candle_core::{DType, Device};
use sha2::Digest;
use std::path::PathBuf;
use std::time::Instant;

/// Settings of a heal run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealOpts {
    pub mode: Mode,
    pub lr: f64,
    pub tau: f64,
    /// Weight of the per-block hidden-state loss; `None`: off.
    pub hidden_weight: Option<f64>,
    pub steps: usize,
    pub seed: u64,
    pub adam: AdamCfg,
    /// Steps between checkpoints (0: none).
    pub checkpoint_every: usize,
    #[serde(skip)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(skip)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many steps in this run: splits a run in two.
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Consecutive NaN/Inf steps tolerated.
    pub max_bad: usize,
}

/// The learning rate at `step` of `steps` (see the module docs).
pub fn lr_at(step: usize, steps: usize, lr: f64) -> f64 {
    let warm = (steps / 20).max(1);
    if step < warm {
        return lr * (step + 1) as f64 / warm as f64;
    }
    let t = (step - warm) as f64 / (steps - warm).max(1) as f64;
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Refuse a teacher whose vocabulary differs from the student's, naming the difference; with
/// `hidden`, also one whose block count or width differs.
pub fn check_pair(student: &Model, teacher: &Model, hidden: bool) -> Result<()> {
    let (s, t) = (&student.config, &teacher.config);
    let bad = |m: String| {
        Err(Error::Invalid(format!(
            "teacher {} and student {}: {m}",
            teacher.source.display(),
            student.source.display()
        )))
    };
    let (sv, tv) = (
        student.weights.lm_head().rows(),
        teacher.weights.lm_head().rows(),
    );
    if s.vocab_size != t.vocab_size || sv != tv {
        return bad(format!(
            "different vocabularies: {tv} tokens in the teacher, {sv} in the student"
        ));
    }
    if let (Some(a), Some(b)) = (&student.tokenizer, &teacher.tokenizer) {
        let (va, vb) = (a.get_vocab(true), b.get_vocab(true));
        if let Some((tok, id)) = vb.iter().find(|(k, v)| va.get(*k) != Some(v)) {
            return bad(format!(
                "different tokenizers: the teacher's token {tok:?} is id {id}, the student's is {:?}",
                va.get(tok)
            ));
        }
        if va.len() != vb.len() {
            return bad(format!(
                "different tokenizers: {} vs {} entries",
                vb.len(),
                va.len()
            ));
        }
    }
    if hidden && (s.num_hidden_layers != t.num_hidden_layers || s.hidden_size != t.hidden_size) {
        return bad(format!(
            "--hidden-loss needs the same blocks: the teacher has {} blocks of width {}, the student {} of width {}",
            t.num_hidden_layers, t.hidden_size, student.weights.layers.len(), s.hidden_size
        ));
    }
    Ok(())
}

/// A fingerprint of the student, the teacher, the data and the settings (checkpoints of another
/// run are refused by it). Weights are sampled, every 61st value of every tensor.
pub fn fingerprint(student: &Model, teacher: &Model, data: &Windows, opts: &HealOpts) -> String {
    let mut h = sha2::Sha256::new();
    for m in [student, teacher] {
        h.update(serde_json::to_vec(&m.config).unwrap_or_default());
        for (name, t) in m.weights.named_tensors() {
            h.update(name.as_bytes());
            h.update(bytemuck::cast_slice(
                &t.shape.iter().map(|&x| x as u64).collect::<Vec<_>>(),
            ));
            for x in t.values().iter().step_by(61) {
                h.update(x.to_le_bytes());
            }
        }
    }
    h.update(serde_json::to_vec(opts).unwrap_or_default());
    h.update(data.seq.to_le_bytes());
    for w in &data.windows {
        h.update(bytemuck::cast_slice(w));
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Copies every block's output.
#[derive(Default)]
struct BlockOutputs(Vec<Vec<f32>>);

impl Observer for BlockOutputs {
    fn block_output(&mut self, _layer: usize, h: &[f32], _rows: usize, _cols: usize) {
        self.0.push(h.to_vec());
    }
}

/// What a finished run gives back.
pub struct HealOutcome {
    pub tm: TrainModel,
    pub state: LoopState,
    /// False when [`HealOpts::stop_after`] ended the run early.
    pub finished: bool,
}

/// Heal `student` towards `teacher` on `data` (see the module docs). `progress(state, loss)` is
/// called after every step.
pub fn heal(
    student: &Model,
    teacher: &Model,
    data: &Windows,
    opts: &HealOpts,
    device: &Device,
    progress: &mut dyn FnMut(&LoopState, f64),
) -> Result<HealOutcome> {
    check_pair(student, teacher, opts.hidden_weight.is_some())?;
    let tm = TrainModel::new(student, opts.mode, opts.seed, device)?;
    let mut opt = AdamW::new(&tm.vars, opts.adam)?;
    let fp = fingerprint(student, teacher, data, opts);
    // The student's values now live in `tm`: let a mapped student's pages go.
    for (_, t) in student.weights.named_tensors() {
        t.release_pages();
    }
    let mut st = LoopState::default();
    if opts.resume {
        let dir = opts
            .checkpoint_dir
            .as_ref()
            .ok_or_else(|| Error::Invalid("--resume needs a checkpoint directory".into()))?;
        st = checkpoint::load(dir, &fp, &tm, &mut opt)?;
    }
    let seq = data.seq;
    let ctx = Ctx::new(&student.config, 1, seq, device).map_err(terr)?;
    let (mut bad_run, mut ran) = (0usize, 0usize);
    let mut last_ckpt: Option<PathBuf> = None;
    while st.step < opts.steps {
        let t0 = Instant::now();
        let ids = data.at(st.step);
        let mut obs = BlockOutputs::default();
        let th = forward_hidden(teacher, ids, 1, seq, &mut obs)?;
        crate::util::trace_rss(&format!("teacher at {:.2} s", t0.elapsed().as_secs_f64()));
        let obj = Objective::Distill {
            teacher,
            hidden: &th,
            tau: opts.tau,
        };
        let hidden = opts.hidden_weight.map(|weight| HiddenTarget {
            outputs: &obs.0,
            weight,
        });
        let out = step::loss_and_grads(&tm, ids, 1, seq, &ctx, obj, hidden)?;
        let finite = out.loss.is_finite() && grads_finite(&out.grads)?;
        crate::util::trace_rss(&format!("student at {:.2} s", t0.elapsed().as_secs_f64()));
        if finite {
            bad_run = 0;
            opt.step(&tm.vars, &out.grads, lr_at(st.step, opts.steps, opts.lr))?;
            st.losses.push((st.step, out.loss));
        } else {
            bad_run += 1;
            st.skipped += 1;
            if bad_run >= opts.max_bad {
                let kept = match &last_ckpt {
                    Some(p) => format!("the last good checkpoint is {}", p.display()),
                    None => "no checkpoint was written in this run".into(),
                };
                return Err(Error::Numeric(format!(
                    "{bad_run} steps in a row (up to step {}) gave a NaN/Inf loss or gradient ({} skipped in all); stopping: {kept} (try a lower --lr)",
                    st.step + 1,
                    st.skipped
                )));
            }
        }
        crate::util::trace_rss(&format!("update at {:.2} s", t0.elapsed().as_secs_f64()));
        st.step += 1;
        st.tokens += seq;
        st.seconds += t0.elapsed().as_secs_f64();
        ran += 1;
        progress(&st, out.loss);
        let stop = opts.stop_after.is_some_and(|n| ran >= n) && st.step < opts.steps;
        let due = opts.checkpoint_every > 0 && st.step.is_multiple_of(opts.checkpoint_every);
        if let Some(dir) = &opts.checkpoint_dir {
            if (due || stop) && bad_run == 0 {
                last_ckpt = Some(checkpoint::save(dir, &fp, &tm, &opt, &st)?);
            }
        }
        if stop {
            return Ok(HealOutcome {
                tm,
                state: st,
                finished: false,
            });
        }
    }
    Ok(HealOutcome {
        tm,
        state: st,
        finished: true,
    })
}

fn grads_finite(grads: &[Option<candle_core::Tensor>]) -> Result<bool> {
    for g in grads.iter().flatten() {
        let s = g
            .sqr()
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(terr)?;
        if !s.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

//! Training: a differentiable forward pass, gradient checkpointing, LoRA and masked full
//! fine-tuning, AdamW, and the distillation loop that heals a pruned model (`lopper heal`).
//!
//! Gradients come from candle-core's autograd ([`graph`] writes the Llama-family block with its
//! differentiable primitives), on any candle `Device`. [`step`] checkpoints per block, so
//! memory is the weights, the optimizer state and about one block's activations. [`params`]
//! turns a lopper [`crate::Model`] into trainable tensors and back, keeping every pruned weight
//! exactly zero; [`adamw`] updates them; [`data`] builds the deterministic training windows and
//! refuses the evaluation text; [`heal`] is the loop with checkpoints and `--resume`.
//!
//! References: LoRA (Hu et al. 2021), LLM-Pruner's LoRA recovery (Ma et al. 2023, official code
//! github.com/horseee/LLM-Pruner), knowledge distillation (Hinton et al. 2015), Sheared-LLaMA /
//! Minitron distillation after pruning, gradient checkpointing (Chen et al. 2016).

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod graph;
pub mod heal;
pub mod params;
pub mod step;

pub use params::{Mode, TrainModel};

use crate::Result;
use candle_core::Tensor;

/// Logits `[batch·seq, vocab]` of `tm` (untracked; for checks against the plain forward).
pub fn logits(tm: &TrainModel, ids: &[u32], batch: usize, seq: usize) -> Result<Vec<f32>> {
    let run = || -> candle_core::Result<Vec<f32>> {
        let cfg_ctx = &tm.ctx_config;
        let ctx = graph::Ctx::new(cfg_ctx, batch, seq, &tm.device)?;
        let idt = Tensor::from_slice(ids, ids.len(), &tm.device)?;
        let mut h = graph::embed(&tm.embed.get(false), &idt)?;
        for b in &tm.blocks {
            h = graph::block(&h, &b.effective(false)?, &ctx)?;
        }
        graph::head(&h, &tm.final_norm.get(false), &tm.head(false), &ctx)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    run().map_err(params::terr)
}

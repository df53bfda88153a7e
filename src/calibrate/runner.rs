//! Block passes over the calibration set, chunk-parallel.
//!
//! The calibration activations go through a block in chunks of whole samples (about
//! [`CHUNK_ROWS`] tokens each). With several threads the chunks run side by side, one per
//! worker ([`Workers`]: single-thread rayon pools), so the kernels inside it run
//! sequentially: data parallelism over chunks instead of splitting every GEMM, attention and
//! element-wise loop across the threads. On 2 cores a block pass over 8×512-token chunks is
//! about 1.12× faster this way (medians of 5 rounds of 16 chunks: 134 against 152 ms per chunk
//! in one run, 156 against 175 ms in another; `examples/block_prof.rs`).
//!
//! The results do not depend on the number of threads: a GEMM gives the same bits on one
//! thread as on several (the split is over output tiles, not the inner dimension; checked in
//! `tests/kernels.rs`), every other kernel works row by row, and observers see each chunk through
//! a [`ChunkObserver`] part that is merged back in chunk order.
//!
//! Every pass says what it is for with a [`Pass`]: collect statistics from the block's inputs
//! and leave the activations as they are, or replace the activations by the block's output
//! (observed or not) for the next block.

use super::stats::{Needs, SiteStats, StatsObserver};
use crate::model::forward::{block_forward, Scratch};
use crate::model::observer::{ChunkObserver, Observer, Site};
use crate::model::rope::Rope;
use crate::util::Workers;
use crate::{Config, Error, LayerWeights, Model, Result};
use std::collections::HashMap;

/// Calibration tokens pushed through a block at once (per worker).
pub const CHUNK_ROWS: usize = 4096;

/// What a pass of the calibration activations through a block is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Observe the block's linear inputs (and its attention residual): the block runs on a
    /// copy of the activations, which stay unchanged, and stops after the last linear input
    /// (down_proj's), so no block output is produced or observed.
    Statistics,
    /// Replace the activations by the block's output (the next block's input). The observer
    /// sees the whole pass, so statistics can be collected on the way (OWL's scan); NaN/Inf in
    /// the output is an error naming the block and the samples.
    Propagate,
}

/// The observer a chunk of a [`Pass`] reports to: `inner`, except that the pass decides
/// whether the block output is produced.
struct PassObserver<'a> {
    inner: &'a mut dyn Observer,
    pass: Pass,
}

impl Observer for PassObserver<'_> {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        self.inner.wants_linear_inputs(layer)
    }
    fn wants_block_output(&self, _layer: usize) -> bool {
        self.pass == Pass::Propagate
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        self.inner.linear_input(layer, site, x, rows, cols)
    }
    fn expert_input(&mut self, layer: usize, e: usize, site: Site, x: &[f32], r: usize, c: usize) {
        self.inner.expert_input(layer, e, site, x, r, c)
    }
    fn block_input(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        self.inner.block_input(layer, h, rows, cols)
    }
    fn attn_residual(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        self.inner.attn_residual(layer, h, rows, cols)
    }
    fn block_output(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        self.inner.block_output(layer, h, rows, cols)
    }
}

/// Runs blocks over calibration activations, one chunk per worker ([`Workers`], one per thread
/// of the current rayon pool); sequential with one thread.
pub struct BlockRunner {
    workers: Option<Workers>,
    /// Per-worker scratch: the block's buffers, and a copy of the chunk for statistics-only
    /// passes. Kept across passes.
    scratch: Vec<(Scratch, Vec<f32>)>,
}

impl Default for BlockRunner {
    fn default() -> Self {
        BlockRunner::new()
    }
}

impl BlockRunner {
    pub fn new() -> BlockRunner {
        let workers = Workers::new();
        let n = workers.as_ref().map_or(1, Workers::len);
        BlockRunner {
            workers,
            scratch: (0..n).map(|_| Default::default()).collect(),
        }
    }

    /// Run block `layer` (weights `lw`, under `cfg`) over `h` (`n` samples of `len` tokens)
    /// for `pass`: with [`Pass::Statistics`] `h` is unchanged, with [`Pass::Propagate`] it
    /// becomes the block's output.
    #[allow(clippy::too_many_arguments)]
    pub fn run<O: ChunkObserver>(
        &mut self,
        cfg: &Config,
        layer: usize,
        lw: &LayerWeights,
        rope: &Rope,
        h: &mut [f32],
        n: usize,
        len: usize,
        pass: Pass,
        obs: &mut O,
    ) -> Result<()> {
        let width = len * cfg.hidden_size;
        let mut chunks = chunks(h, n, len, cfg.hidden_size);
        let workers = match &self.workers {
            Some(w) if chunks.len() > 1 => w,
            _ => {
                let (scratch, tmp) = &mut self.scratch[0];
                for (s0, chunk) in chunks {
                    let b = chunk.len() / width;
                    let at = (s0, b, len);
                    run_chunk(cfg, layer, lw, rope, chunk, at, pass, obs, scratch, tmp)?;
                }
                return Ok(());
            }
        };
        for round in chunks.chunks_mut(workers.len()) {
            let mut parts: Vec<O::Part> = round.iter().map(|_| obs.part()).collect();
            let jobs = round
                .iter_mut()
                .zip(parts.iter_mut())
                .zip(self.scratch.iter_mut())
                .map(|(((s0, chunk), part), (scratch, tmp))| {
                    let (s0, chunk) = (*s0, &mut **chunk);
                    let b = chunk.len() / width;
                    let job = move || {
                        let at = (s0, b, len);
                        run_chunk(cfg, layer, lw, rope, chunk, at, pass, part, scratch, tmp)
                    };
                    Box::new(job) as Box<dyn FnOnce() -> Result<()> + Send + '_>
                })
                .collect();
            let results = workers.run(jobs);
            for (r, part) in results.into_iter().zip(parts) {
                r?;
                obs.merge(part);
            }
        }
        Ok(())
    }
}

/// `h` (`n` samples of `len` tokens, `hidden` wide) cut into chunks of whole samples of about
/// [`CHUNK_ROWS`] tokens, each with the index of its first sample.
fn chunks(h: &mut [f32], n: usize, len: usize, hidden: usize) -> Vec<(usize, &mut [f32])> {
    let width = len * hidden;
    let per = (CHUNK_ROWS / len.max(1)).max(1);
    h[..n * width]
        .chunks_mut(per * width)
        .enumerate()
        .map(|(i, c)| (i * per, c))
        .collect()
}

/// Run block `layer` over one chunk of `b` samples (the first is sample `s0`) of `len` tokens.
#[allow(clippy::too_many_arguments)]
fn run_chunk(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    chunk: &mut [f32],
    (s0, b, len): (usize, usize, usize),
    pass: Pass,
    obs: &mut dyn Observer,
    scratch: &mut Scratch,
    tmp: &mut Vec<f32>,
) -> Result<()> {
    let obs = &mut PassObserver { inner: obs, pass };
    if pass == Pass::Propagate {
        block_forward(cfg, layer, lw, rope, chunk, b, len, scratch, obs);
        if chunk.iter().any(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "NaN/Inf in the output of block {layer} ({}) on calibration samples {s0}..{}",
                crate::model::names::layer_prefix(layer),
                s0 + b
            )));
        }
    } else {
        // The block runs on a copy and stops after its last linear input.
        tmp.clear();
        tmp.extend_from_slice(chunk);
        block_forward(cfg, layer, lw, rope, tmp, b, len, scratch, obs);
    }
    Ok(())
}

/// Run block `layer` of `model` over `h` (`n` samples of `len` tokens) for `pass`, one chunk
/// of whole samples after another on this thread (for observers that are not
/// [`ChunkObserver`]s).
#[allow(clippy::too_many_arguments)]
pub fn run_block(
    model: &Model,
    layer: usize,
    rope: &Rope,
    h: &mut [f32],
    n: usize,
    len: usize,
    pass: Pass,
    obs: &mut dyn Observer,
    scratch: &mut Scratch,
) -> Result<()> {
    let lw = &model.weights.layers[layer];
    run_layer(
        &model.config,
        layer,
        lw,
        rope,
        h,
        n,
        len,
        pass,
        obs,
        scratch,
    )
}

/// [`run_block`] for block weights `lw` that need not be in a model (e.g. a transformed copy),
/// run as block `layer` under `cfg`.
#[allow(clippy::too_many_arguments)]
pub fn run_layer(
    cfg: &crate::Config,
    layer: usize,
    lw: &crate::LayerWeights,
    rope: &Rope,
    h: &mut [f32],
    n: usize,
    len: usize,
    pass: Pass,
    obs: &mut dyn Observer,
    scratch: &mut Scratch,
) -> Result<()> {
    let width = len * cfg.hidden_size;
    let mut tmp = Vec::new();
    for (s0, chunk) in chunks(h, n, len, cfg.hidden_size) {
        let b = chunk.len() / width;
        run_chunk(
            cfg,
            layer,
            lw,
            rope,
            chunk,
            (s0, b, len),
            pass,
            obs,
            scratch,
            &mut tmp,
        )?;
    }
    Ok(())
}

/// Statistics of every linear input of block `layer` for block inputs `h` (`n` samples of
/// `len` tokens), without changing `h`. Used by tests and tools that inspect one block.
pub fn layer_stats(
    model: &Model,
    layer: usize,
    h: &mut [f32],
    n: usize,
    len: usize,
    needs: Needs,
) -> Result<HashMap<Site, SiteStats>> {
    let rope = Rope::new(&model.config, len);
    let mut obs = StatsObserver::new(layer, needs, len);
    BlockRunner::new().run(
        &model.config,
        layer,
        &model.weights.layers[layer],
        &rope,
        h,
        n,
        len,
        Pass::Statistics,
        &mut obs,
    )?;
    Ok(obs.sites)
}

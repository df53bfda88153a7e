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

use crate::model::forward::{block_forward, Scratch};
use crate::model::observer::{ChunkObserver, Observer};
use crate::model::rope::Rope;
use crate::util::Workers;
use crate::{Config, Error, LayerWeights, Result};

/// Calibration tokens pushed through a block at once (per worker).
pub const CHUNK_ROWS: usize = 4096;

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

    /// Run block `layer` (weights `lw`, under `cfg`) over `h` (`n` samples of `len` tokens).
    /// With `keep == false` the block runs on copies (statistics only) and `h` is unchanged.
    /// NaN/Inf in a block's output is an error naming the block and the samples.
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
        keep: bool,
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
                    run_chunk(cfg, layer, lw, rope, chunk, at, keep, obs, scratch, tmp)?;
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
                        run_chunk(cfg, layer, lw, rope, chunk, at, keep, part, scratch, tmp)
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
pub(crate) fn chunks(
    h: &mut [f32],
    n: usize,
    len: usize,
    hidden: usize,
) -> Vec<(usize, &mut [f32])> {
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
pub(crate) fn run_chunk(
    cfg: &Config,
    layer: usize,
    lw: &LayerWeights,
    rope: &Rope,
    chunk: &mut [f32],
    (s0, b, len): (usize, usize, usize),
    keep: bool,
    obs: &mut dyn Observer,
    scratch: &mut Scratch,
    tmp: &mut Vec<f32>,
) -> Result<()> {
    if keep {
        block_forward(cfg, layer, lw, rope, chunk, b, len, scratch, obs);
        if chunk.iter().any(|v| !v.is_finite()) {
            return Err(Error::Numeric(format!(
                "NaN/Inf in the output of block {layer} ({}) on calibration samples {s0}..{}",
                crate::model::names::layer_prefix(layer),
                s0 + b
            )));
        }
    } else {
        // The block runs on a copy; with a statistics-only observer it stops early.
        tmp.clear();
        tmp.extend_from_slice(chunk);
        block_forward(cfg, layer, lw, rope, tmp, b, len, scratch, obs);
    }
    Ok(())
}

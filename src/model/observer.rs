//! Observers: how calibration statistics are collected without patching the model.
//!
//! The forward pass calls an [`Observer`] with the input of every linear layer (one call per
//! distinct input: q/k/v share one, gate/up share one) and with each block's input and output
//! hidden states. [`NoObserver`] does nothing and is what plain inference passes.
//!
//! A [`ChunkObserver`] can also watch a pass whose chunks of rows run in parallel (see
//! [`crate::calibrate::runner`]): every chunk is seen by its own part, and the parts are merged back
//! in chunk order, so the result does not depend on how many threads ran the pass.

use crate::model::weights::LinearKind;

/// Where in a block an activation is seen; each site feeds one or more linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// Normed block input, fed to q/k/v.
    AttnIn,
    /// Attention output (heads concatenated), fed to o_proj.
    AttnOut,
    /// Normed post-attention hidden, fed to gate/up.
    MlpIn,
    /// SwiGLU output, fed to down_proj.
    MlpDown,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpDown];

    /// The linear layers that read this site's activation.
    pub fn linears(self) -> &'static [LinearKind] {
        match self {
            Site::AttnIn => &[LinearKind::Q, LinearKind::K, LinearKind::V],
            Site::AttnOut => &[LinearKind::O],
            Site::MlpIn => &[LinearKind::Gate, LinearKind::Up],
            Site::MlpDown => &[LinearKind::Down],
        }
    }

    /// The site whose activation feeds `kind`.
    pub fn of(kind: LinearKind) -> Site {
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V => Site::AttnIn,
            LinearKind::O => Site::AttnOut,
            LinearKind::Gate | LinearKind::Up => Site::MlpIn,
            LinearKind::Down => Site::MlpDown,
        }
    }
}

/// Receives activations during a forward pass. All arguments are row-major `[rows, cols]`.
pub trait Observer {
    /// Whether this observer wants `linear_input` calls for `layer` (lets the pass skip work).
    fn wants_linear_inputs(&self, _layer: usize) -> bool {
        false
    }
    /// Whether the pass over block `layer` must produce the block's output. An observer that
    /// only collects linear inputs returns false, and the block stops after the last linear
    /// input it needs (down_proj's) — the residual stream is then left unfinished.
    fn wants_block_output(&self, _layer: usize) -> bool {
        true
    }
    /// Input `x` of the linear layers at `site` of block `layer`.
    fn linear_input(&mut self, _layer: usize, _site: Site, _x: &[f32], _rows: usize, _cols: usize) {
    }
    /// Input `x` of expert `expert`'s linears at `site` of block `layer` (a mixture of experts):
    /// [`Site::MlpIn`] the normed rows routed to it (gate/up), [`Site::MlpDown`] its SwiGLU
    /// output (down). Only the tokens routed to the expert are passed; called when
    /// [`Observer::wants_linear_inputs`] is.
    #[allow(clippy::too_many_arguments)]
    fn expert_input(
        &mut self,
        _layer: usize,
        _expert: usize,
        _site: Site,
        _x: &[f32],
        _rows: usize,
        _cols: usize,
    ) {
    }
    /// Hidden state entering block `layer`.
    fn block_input(&mut self, _layer: usize, _h: &[f32], _rows: usize, _cols: usize) {}
    /// Residual stream of block `layer` after the attention output is added (the input of the
    /// MLP's RMSNorm; SliceGPT's PCA needs it). The attention half always runs, so this is
    /// called even when the block stops early.
    fn attn_residual(&mut self, _layer: usize, _h: &[f32], _rows: usize, _cols: usize) {}
    /// Hidden state leaving block `layer`.
    fn block_output(&mut self, _layer: usize, _h: &[f32], _rows: usize, _cols: usize) {}
}

/// The observer that observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// An observer whose observations can be split over chunks of rows that run in parallel.
///
/// Each chunk is watched by its own [`ChunkObserver::Part`]; after the chunks of a round finish,
/// the parts are handed back to [`ChunkObserver::merge`] in chunk order. An implementation whose
/// merge performs the same arithmetic as watching the chunks one after another makes a
/// parallel pass give exactly the result of a sequential one.
pub trait ChunkObserver: Observer {
    type Part: Observer + Send;
    /// An empty part for the next chunk (it may reuse buffers returned by earlier merges).
    fn part(&mut self) -> Self::Part;
    /// Fold a finished chunk's part in; called in chunk order.
    fn merge(&mut self, part: Self::Part);
}

impl ChunkObserver for NoObserver {
    type Part = NoObserver;
    fn part(&mut self) -> NoObserver {
        NoObserver
    }
    fn merge(&mut self, _part: NoObserver) {}
}

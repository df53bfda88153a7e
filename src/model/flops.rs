//! Analytic FLOP counts, for reading throughput against the machine's rate.

use crate::model::weights::{LayerWeights, Weights};
use crate::LinearKind;

/// FLOPs of a full-sequence forward pass over one window of `seq` tokens, producing logits for
/// every position: 2·(linear params)·seq for every block linear (both factors of a low-rank one),
/// residual shortcut and the LM head, plus causal
/// attention (QKᵀ and P·V over the visible keys only: 4·head_dim·heads·Σᵢ(i+1)).
pub fn prefill_flops(w: &Weights, head_dim: usize, seq: usize, with_lm_head: bool) -> f64 {
    let mut f: f64 = w
        .layers
        .iter()
        .map(|l| block_flops(l, head_dim, seq, false))
        .sum();
    if with_lm_head {
        let h = w.lm_head();
        f += 2.0 * (h.rows() * h.cols()) as f64 * seq as f64;
    }
    f
}

/// FLOPs of one block over one window of `seq` tokens: its linears (and residual shortcuts) and
/// causal attention, as in [`prefill_flops`]. `skip_down`: without down_proj's product, the block
/// as a statistics-only calibration pass runs it (it stops at down_proj's input).
pub fn block_flops(l: &LayerWeights, head_dim: usize, seq: usize, skip_down: bool) -> f64 {
    let visible = (seq * (seq + 1) / 2) as f64;
    let mut f = 0f64;
    for kind in LinearKind::ALL {
        if !(skip_down && kind == LinearKind::Down) {
            f += 2.0 * l.linear(kind).weight_params() as f64 * seq as f64;
        }
    }
    for s in [&l.attn_shortcut, &l.mlp_shortcut].into_iter().flatten() {
        f += 2.0 * s.len() as f64 * seq as f64;
    }
    f + 4.0 * (l.n_heads(head_dim) * head_dim) as f64 * visible
}

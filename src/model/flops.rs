//! Analytic FLOP counts, for reading throughput against the machine's rate.

use crate::model::weights::Weights;

/// FLOPs of a full-sequence forward pass over one window of `seq` tokens, producing logits for
/// every position: 2·(linear params)·seq for every block linear (both factors of a low-rank one),
/// residual shortcut and the LM head, plus causal
/// attention (QKᵀ and P·V over the visible keys only: 4·head_dim·heads·Σᵢ(i+1)).
pub fn prefill_flops(w: &Weights, head_dim: usize, seq: usize, with_lm_head: bool) -> f64 {
    let mut f = 0f64;
    let visible = (seq * (seq + 1) / 2) as f64;
    for l in &w.layers {
        for kind in crate::LinearKind::ALL {
            f += 2.0 * l.linear(kind).weight_params() as f64 * seq as f64;
        }
        for s in [&l.attn_shortcut, &l.mlp_shortcut].into_iter().flatten() {
            f += 2.0 * s.len() as f64 * seq as f64;
        }
        f += 4.0 * (l.n_heads(head_dim) * head_dim) as f64 * visible;
    }
    if with_lm_head {
        let h = w.lm_head();
        f += 2.0 * (h.rows() * h.cols()) as f64 * seq as f64;
    }
    f
}

//! Contextual activation sparsity: per-site magnitude thresholds applied inside the forward
//! pass (TEAL, Liu et al. 2024, arXiv:2408.14690, github.com/FasterDecoding/TEAL; WINA, Chen et
//! al. 2025, arXiv:2505.19427, github.com/microsoft/wina).
//!
//! At each of a block's four linear-input sites ([`Site`]: the normed hidden state read by
//! q/k/v, the attention output read by o_proj, the normed hidden state read by gate/up, the
//! SwiGLU product read by down_proj) every entry whose score is below the site's threshold is
//! set to zero before the linears read it. The score is `|x_j|` (TEAL, "magnitude") or
//! `|x_j|·‖W[:, j]‖₂` (WINA), where for a site read by several linears `W` is their rows stacked
//! (q;k;v or gate;up), so one column norm per input. A zero input lets the decode kernel skip
//! the weight column it would multiply ([`crate::formats::ColMajorOf`]); in a many-row pass
//! (prefill, evaluation) the zeros go through the ordinary product, so quality is measured with
//! exactly the sparsification decode uses.
//!
//! [`ActSparsity`] is the plain, serializable description (thresholds per layer and site, the
//! score, how they were calibrated); [`install`] checks it against a model and attaches a
//! [`LayerAct`] to every block ([`LayerWeights::act`]); [`uninstall`] removes them. Counters in
//! each [`LayerAct`] record the sparsity actually reached, per site.

pub use crate::model::act_rules::{ActSparsity, LayerAct, Score, SiteCount, SiteThreshold};
use crate::model::names;
use crate::model::observer::Site;
use crate::model::weights::LayerWeights;
use crate::{Error, Model, Result};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Index of a site in [`Site::ALL`] order.
pub fn site_index(site: Site) -> usize {
    match site {
        Site::AttnIn => 0,
        Site::AttnOut => 1,
        Site::MlpIn => 2,
        Site::MlpDown => 3,
    }
}

/// The JSON key of a site.
pub fn site_key(site: Site) -> &'static str {
    ["attn_in", "attn_out", "mlp_in", "mlp_down"][site_index(site)]
}

/// The forward pass's hook: sparsify `x` at `site` when the block has thresholds.
#[inline]
pub fn apply(act: Option<&LayerAct>, site: Site, x: &mut [f32]) {
    if let Some(a) = act {
        a.apply(site_index(site), x);
    }
}

/// Input width of `site` in block `lw`, and the tensor that shows it.
pub fn site_cols(lw: &LayerWeights, layer: usize, site: Site) -> (usize, String) {
    let kind = site.linears()[0];
    (
        lw.linear(kind).in_features(),
        names::tensor_name(layer, kind),
    )
}

/// `‖W[:, j]‖₂` over the rows of every linear reading `site` (WINA's column norms).
pub fn column_norms(lw: &LayerWeights, site: Site) -> Vec<f32> {
    let mut acc: Vec<f64> = Vec::new();
    for &k in site.linears() {
        let lin = lw.linear(k);
        let dense;
        let (w, cols) = match lin.left_factor() {
            // A low-rank layer reads x through V; its effective matrix is U·V.
            Some(u) => {
                dense = low_rank_product(u, &lin.weight);
                (dense.as_slice(), lin.weight.cols())
            }
            None => (lin.weight.data(), lin.weight.cols()),
        };
        acc.resize(cols, 0.0);
        for row in w.chunks_exact(cols) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += (v as f64) * (v as f64);
            }
        }
    }
    acc.into_iter().map(|s| s.sqrt() as f32).collect()
}

/// `U·V` for `U` `[rows, rank]`, `V` `[rank, cols]` (row-major).
fn low_rank_product(u: &crate::Tensor, v: &crate::Tensor) -> Vec<f32> {
    let (rows, rank, cols) = (u.rows(), u.cols(), v.cols());
    let (u, v) = (u.data(), v.data());
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        let o = &mut out[r * cols..(r + 1) * cols];
        for k in 0..rank {
            let a = u[r * rank + k];
            for (o, &b) in o.iter_mut().zip(&v[k * cols..(k + 1) * cols]) {
                *o += a * b;
            }
        }
    }
    out
}

/// Checks `act` against `model` and attaches the thresholds to every block. A block count or
/// input width that differs is an error naming the tensor.
pub fn install(model: &mut Model, act: &ActSparsity) -> Result<()> {
    let layers = &mut model.weights.layers;
    if act.layers.len() != layers.len() {
        return Err(Error::Invalid(format!(
            "activation thresholds are for {} blocks but the model has {}",
            act.layers.len(),
            layers.len()
        )));
    }
    let mut built = Vec::with_capacity(layers.len());
    for (i, (lw, sites)) in layers.iter().zip(&act.layers).enumerate() {
        let mut out: [Option<(f32, Option<Vec<f32>>)>; 4] = Default::default();
        for site in Site::ALL {
            let Some(st) = sites[site_index(site)] else {
                continue;
            };
            let (cols, tensor) = site_cols(lw, i, site);
            if st.cols != cols {
                return Err(Error::Invalid(format!(
                    "activation thresholds for block {i} `{}` expect {} input columns, but `{tensor}` has {cols}",
                    site_key(site),
                    st.cols
                )));
            }
            if !st.threshold.is_finite() || st.threshold < 0.0 {
                return Err(Error::Invalid(format!(
                    "activation threshold for block {i} `{}` is {} (must be finite and ≥ 0)",
                    site_key(site),
                    st.threshold
                )));
            }
            let scale = (act.score == Score::Wina).then(|| column_norms(lw, site));
            out[site_index(site)] = Some((st.threshold, scale));
        }
        built.push(out);
    }
    let source = Arc::new(act.clone());
    for (lw, sites) in layers.iter_mut().zip(built) {
        lw.act = Some(Arc::new(LayerAct::new(sites, source.clone())));
    }
    Ok(())
}

/// Removes every block's thresholds (the model runs dense again).
pub fn uninstall(model: &mut Model) {
    for lw in &mut model.weights.layers {
        lw.act = None;
    }
}

/// Sparsity reached per site since the counters were last reset, averaged over blocks
/// (weighted by entries): `[attn_in, attn_out, mlp_in, mlp_down]`, `None` where unseen.
pub fn achieved(model: &Model) -> [Option<f64>; 4] {
    let mut out = [None; 4];
    for site in Site::ALL {
        let i = site_index(site);
        let (mut z, mut t) = (0u64, 0u64);
        for a in model.weights.layers.iter().filter_map(|l| l.act.as_ref()) {
            z += a.counts[i].zeros.load(Relaxed);
            t += a.counts[i].total.load(Relaxed);
        }
        out[i] = (t > 0).then(|| z as f64 / t as f64);
    }
    out
}

/// The thresholds installed in `model`, if any.
pub fn installed(model: &Model) -> Option<Arc<ActSparsity>> {
    model
        .weights
        .layers
        .iter()
        .find_map(|l| l.act.as_ref().map(|a| a.source.clone()))
}

/// Resets every block's counters.
pub fn reset_counts(model: &Model) {
    for a in model.weights.layers.iter().filter_map(|l| l.act.as_ref()) {
        a.reset_counts();
    }
}

//! Model plumbing for width pruning: cut rows / columns out of linears, keep biases in step,
//! fold FLAP's bias compensation in. No scoring here; [`super::heads`] and [`super::neurons`]
//! decide *what* goes, these functions only carry it out.
//!
//! Removing attention head `h` means removing rows `h·hd..(h+1)·hd` of q_proj and the same
//! columns of o_proj; removing KV head `g` removes those rows of k_proj and v_proj. HF's
//! `repeat_kv` (and lopper's attention kernel) map query head `h` to KV head
//! `h / (n_heads / n_kv_heads)`, so kept query heads must stay in their original order and every
//! KV group must keep the same number of query heads.
//! Removing FFN channel `c` removes row `c` of gate_proj and up_proj and column `c` of down_proj.

use crate::model::weights::{LayerWeights, Linear, Tensor};

/// Rows `rows` (in the given order) of a 2-D tensor.
pub fn take_rows(t: &Tensor, rows: &[usize]) -> Tensor {
    let cols = t.cols();
    let d = t.data();
    let mut out = Vec::with_capacity(rows.len() * cols);
    for &r in rows {
        out.extend_from_slice(&d[r * cols..(r + 1) * cols]);
    }
    Tensor::new(vec![rows.len(), cols], out)
}

/// Columns `cols` (in the given order) of a 2-D tensor.
pub fn take_cols(t: &Tensor, cols: &[usize]) -> Tensor {
    let (n, c) = (t.rows(), t.cols());
    let d = t.data();
    let mut out = Vec::with_capacity(n * cols.len());
    for r in 0..n {
        let row = &d[r * c..(r + 1) * c];
        out.extend(cols.iter().map(|&j| row[j]));
    }
    Tensor::new(vec![n, cols.len()], out)
}

/// Elements `idx` of a 1-D tensor.
pub fn take_elems(t: &Tensor, idx: &[usize]) -> Tensor {
    let d = t.data();
    Tensor::new(vec![idx.len()], idx.iter().map(|&i| d[i]).collect())
}

/// Keep output features `rows` of `lin` (weight rows and bias elements).
pub fn keep_outputs(lin: &mut Linear, rows: &[usize]) {
    lin.weight = take_rows(&lin.weight, rows);
    if let Some(b) = &lin.bias {
        lin.bias = Some(take_elems(b, rows));
    }
}

/// Keep input features `cols` of `lin` (weight columns; the bias is per output and stays).
pub fn keep_inputs(lin: &mut Linear, cols: &[usize]) {
    lin.weight = take_cols(&lin.weight, cols);
}

/// Rows of heads `heads` of width `head_dim`, in order.
pub fn head_rows(heads: &[usize], head_dim: usize) -> Vec<usize> {
    heads
        .iter()
        .flat_map(|&h| h * head_dim..(h + 1) * head_dim)
        .collect()
}

/// Keep query heads `q_heads` and KV heads `kv_heads` of `layer` (both ascending).
pub fn keep_heads(
    layer: &mut LayerWeights,
    head_dim: usize,
    q_heads: &[usize],
    kv_heads: &[usize],
) {
    let q = head_rows(q_heads, head_dim);
    let kv = head_rows(kv_heads, head_dim);
    keep_outputs(&mut layer.q, &q);
    keep_outputs(&mut layer.k, &kv);
    keep_outputs(&mut layer.v, &kv);
    keep_inputs(&mut layer.o, &q);
}

/// Keep FFN channels `channels` (ascending) of `layer`.
pub fn keep_channels(layer: &mut LayerWeights, channels: &[usize]) {
    keep_outputs(&mut layer.gate, channels);
    keep_outputs(&mut layer.up, channels);
    keep_inputs(&mut layer.down, channels);
}

/// FLAP bias compensation (An et al. 2024, §3.4, eq. 8; `compress` in `lib/prune.py`): the mean
/// contribution of removed input channels, `W[:, removed] · mean(X[:, removed])`, per output.
/// Adding it to the bias makes the pruned layer exact on average over the calibration tokens.
pub fn removed_mean_contribution(w: &Tensor, removed: &[usize], mean: &[f64]) -> Vec<f64> {
    let (n, c) = (w.rows(), w.cols());
    let d = w.data();
    (0..n)
        .map(|i| {
            let row = &d[i * c..(i + 1) * c];
            removed.iter().map(|&j| row[j] as f64 * mean[j]).sum()
        })
        .collect()
}

/// `lin.bias += delta` (creating a zero bias first when there is none).
pub fn add_to_bias(lin: &mut Linear, delta: &[f64]) {
    ensure_bias(lin);
    if let Some(b) = &mut lin.bias {
        for (v, d) in b.data_mut().iter_mut().zip(delta) {
            *v = (*v as f64 + d) as f32;
        }
    }
}

/// Give `lin` a zero bias when it has none (so one HF flag can cover a group of linears).
pub fn ensure_bias(lin: &mut Linear) {
    if lin.bias.is_none() {
        lin.bias = Some(Tensor::zeros(vec![lin.out_features()]));
    }
}

/// The complement of `removed` (ascending) in `0..n`.
pub fn complement(n: usize, removed: &[usize]) -> Vec<usize> {
    let mut gone = vec![false; n];
    for &r in removed {
        gone[r] = true;
    }
    (0..n).filter(|&i| !gone[i]).collect()
}

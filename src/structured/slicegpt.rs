//! SliceGPT: delete rows and columns of the weights by projecting the residual stream onto its
//! principal components (Ashkboos et al. 2024, "SliceGPT: Compress Large Language Models by
//! Deleting Rows and Columns", §3; the official `microsoft/TransformerCompression`
//! `layernorm_fusion.py` and `rotate.py::rotate_and_slice_sequential`).
//!
//! 1. **Fold the RMSNorm scales** into the linears that read them (§3.1, `fuse_ln_linear`):
//!    q/k/v columns × `input_layernorm`, gate/up columns × `post_attention_layernorm`, the LM
//!    head columns × the final norm (the head is untied from the embedding first); every norm
//!    becomes a plain `x / rms(x)`, which commutes with orthogonal maps (§3.2, Theorem 1).
//! 2. **Rotate and slice, layer-sequentially** on calibration data (§3.3–3.4): `Q_0` = PCA of the
//!    embedding outputs; per block, `Q_mid` = PCA of the residual after attention and `Q_out` =
//!    PCA of the block output, each computed from the calibration data run through the already
//!    rotated-and-sliced earlier blocks. PCA is the official `pca_calc`: eigenvectors of
//!    `Σ xᵀx` (uncentred, f64, + 1% of the mean diagonal, which does not change them) by
//!    decreasing eigenvalue. With `Q̂ = Q[:, :d']` (`d'` kept columns):
//!    embedding `E Q̂_0`; q/k/v `W Q̂_in`; o `Q̂_midᵀ W` (bias `Q̂_midᵀ b`); gate/up `W Q̂_mid`;
//!    down `Q̂_outᵀ W`; head `W Q̂_L`; and since consecutive blocks use different bases the
//!    residual is carried across by the shortcuts `Q̂_inᵀ Q̂_mid` (attention) and `Q̂_midᵀ Q̂_out`
//!    (MLP) — stored transposed, in linear layout ([`crate::LayerWeights::attn_shortcut`]).
//!    The rotations are computed in f64 (like the official code) and stored as f32.
//! 3. The residual width becomes `d'`: `config.hidden_size = d'`, and RMSNorm keeps dividing by
//!    the original width (`config.rms_norm_dim`, the official `RMSN(mean_dim)`), so with nothing
//!    sliced the model computes exactly the original function.
//!
//! The calibration passes are done in the original `d`-wide coordinates, which is the same
//! arithmetic: a sliced block fed `(x Q̂_in)` equals the folded original block fed the
//! projection `x Q̂_in Q̂_inᵀ`, with the attention output and its residual projected by
//! `Q̂_mid Q̂_midᵀ` (a `d × d` shortcut on a temporary copy of the block). So every pass uses the
//! ordinary block forward with an observer; the model is changed once, at the end.
//!
//! `d' = ⌊(1 − fraction)·d⌋` rounded down to a multiple of [`SliceSpec::round_to`] (official
//! `run_slicegpt.py`: `--round-interval`, default 8).
//!
//! Differences from the official code, on purpose:
//! - The LM head is sliced too (official `do_slice_head=True`; its default keeps the head and
//!   the last block's MLP output at full width). lopper keeps one residual width per model.
//! - The official `fuse_modules` also subtracts each embedding row's mean; that is a LayerNorm
//!   step and changes an RMSNorm model's function, so it is not done here.
//! - The final orientation is the PCA basis itself (official `--final-orientation pca`; its
//!   default `random` rotates within the kept subspace, which changes no output).
//! - Shortcuts and the head add parameters: `2·d'²` per block and `vocab·d'` for the untied
//!   head, so on a small tied-embedding model a small slice makes the model *larger*.
//!
//! Measured on SmolLM2-135M (calibration c4 32×256 tokens, wiki perplexity on the first 8
//! windows of 512 tokens, dense 19.69; `examples/lowrank_slice_figures.rs`): slicing 10% / 20% / 30% /
//! 50% of the width (d' = 512 / 456 / 400 / 288) gives 44.5 / 93.1 / 163.5 / 457.9 with
//! −19.3% / −5.1% / 8.8% / 35.8% of the parameters removed. Slicing the head alone to 512
//! (rotation only elsewhere) already costs 16.6 → 21.7 on 4×512 windows; keeping the original
//! coordinates instead of the PCA basis at 10% gives 71.4 instead of 43.6 (16×128 calibration).

use super::{Progress, StepDetails};
use crate::calibrate::runner::{run_layer, Pass};
use crate::calibrate::CalibSet;
use crate::kernels;
use crate::model::forward::{embed, Scratch};
use crate::model::observer::Observer;
use crate::model::rope::Rope;
use crate::model::weights::LinearRepr;
use crate::{Error, LayerWeights, Linear, LinearKind, Model, Result, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SliceSpec {
    /// Fraction of the hidden dimension removed.
    pub fraction: f64,
    /// The kept width is rounded down to a multiple of this (official default 8).
    #[serde(default = "default_round_to")]
    pub round_to: usize,
}

fn default_round_to() -> usize {
    8
}

impl SliceSpec {
    /// Remove `fraction` of the hidden dimension, rounding like the official code.
    pub fn new(fraction: f64) -> SliceSpec {
        SliceSpec {
            fraction,
            round_to: default_round_to(),
        }
    }

    /// The kept width for hidden size `d`: `⌊(1 − fraction)·d⌋` rounded down to a multiple of
    /// `round_to`; errors when the request is out of range or leaves nothing.
    pub fn target_dim(&self, d: usize) -> Result<usize> {
        let f = self.fraction;
        if !(0.0..1.0).contains(&f) {
            return Err(Error::Invalid(format!(
                "SliceGPT: the fraction to slice must be in [0, 1), got {f}"
            )));
        }
        if self.round_to == 0 {
            return Err(Error::Invalid(
                "SliceGPT: round_to must be at least 1".into(),
            ));
        }
        let n = ((1.0 - f) * d as f64) as usize;
        let n = n - n % self.round_to;
        if n == 0 {
            return Err(Error::Invalid(format!(
                "SliceGPT: slicing {f} of {d} rounded down to a multiple of {} leaves no dimension",
                self.round_to
            )));
        }
        Ok(n)
    }
}

/// Rotate and slice the embedding dimension of `model` as `spec` asks.
///
/// Refused, with the model untouched: a fraction outside [0, 1); a model that is already
/// sliced (shortcuts or `rms_norm_dim`) or has low-rank linears (slice before factorising).
/// The model is only changed after every rotation has been computed.
pub fn slice(
    model: &mut Model,
    calib: &CalibSet,
    spec: &SliceSpec,
    progress: Progress<'_>,
) -> Result<StepDetails> {
    let d = model.config.hidden_size;
    let n = spec.target_dim(d)?;
    let w = &model.weights;
    if model.config.rms_norm_dim.is_some()
        || w.layers
            .iter()
            .any(|l| l.attn_shortcut.is_some() || l.mlp_shortcut.is_some())
    {
        return Err(Error::Invalid(
            "SliceGPT: the model is already sliced (it has residual shortcuts or rms_norm_dim)"
                .into(),
        ));
    }
    if let Some((i, k)) = w.layers.iter().enumerate().find_map(|(i, l)| {
        LinearKind::ALL
            .into_iter()
            .find(|&k| l.linear(k).is_factored())
            .map(|k| (i, k))
    }) {
        return Err(Error::Invalid(format!(
            "SliceGPT: {} is low-rank factorised; slice before factorising",
            crate::model::names::tensor_name(i, k)
        )));
    }
    let params_before = w.num_params();
    let n_layers = w.layers.len();
    let (samples, len) = (calib.n, calib.len);
    let cfg = model.config.clone();
    let rope = Rope::new(&cfg, len);
    let mut scratch = Scratch::default();

    // Q_0 from the embedding outputs.
    let mut h = embed(w, &calib.ids)?;
    let (mut q_in, ev) = pca(&gram(&h, d), "the embedding output")?;
    let mut kept =
        vec![json!({"site": "embedding", "kept_eigenvalue_fraction": kept_fraction(&ev, n)})];
    project(&mut h, &q_in, n, d);
    let embed_new = mul_right(&w.embed, q_in.as_ref(), n);

    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        progress("SliceGPT rotate and slice", i, n_layers);
        let folded = folded_layer(&w.layers[i]);
        // Q_mid: PCA of the residual after attention (the block input is already projected).
        let mut obs = MidGram::new(i, d);
        run_layer(
            &cfg,
            i,
            &folded,
            &rope,
            &mut h,
            samples,
            len,
            Pass::Statistics,
            &mut obs,
            &mut scratch,
        )?;
        let what = format!("block {i}'s attention residual");
        let (q_mid, ev_mid) = pca(&obs.gram, &what)?;
        // Q_out: PCA of the block output with the mid residual projected.
        let mut temp = folded.clone();
        let p_mid = projector(&q_mid, n);
        temp.attn_shortcut = Some(p_mid.clone());
        temp.o = Linear {
            weight: mul_left_f32(&p_mid, &folded.o.weight),
            bias: folded.o.bias.as_ref().map(|b| mul_left_f32(&p_mid, b)),
            repr: LinearRepr::Dense,
            packed: None,
        };
        run_layer(
            &cfg,
            i,
            &temp,
            &rope,
            &mut h,
            samples,
            len,
            Pass::Propagate,
            &mut crate::model::observer::NoObserver,
            &mut scratch,
        )?;
        let (q_out, ev_out) = pca(&gram(&h, d), &format!("block {i}'s output"))?;
        kept.push(json!({"site": format!("block {i}"),
            "attn_residual_kept_eigenvalue_fraction": kept_fraction(&ev_mid, n),
            "output_kept_eigenvalue_fraction": kept_fraction(&ev_out, n)}));
        layers.push(sliced_layer(&folded, &q_in, &q_mid, &q_out, n));
        if i + 1 < n_layers {
            project(&mut h, &q_out, n, d);
        }
        q_in = q_out;
    }
    progress("SliceGPT rotate and slice", n_layers, n_layers);
    // The head: fold the final norm, rotate by the last block's output basis, slice.
    let head = scale_columns(w.lm_head(), w.final_norm.data());
    let head_new = mul_right(&head, q_in.as_ref(), n);

    // Commit.
    let wm = &mut model.weights;
    wm.embed = embed_new;
    wm.lm_head = Some(head_new);
    wm.final_norm = Tensor::new(vec![n], vec![1.0; n]);
    wm.layers = layers;
    model.config.hidden_size = n;
    model.config.rms_norm_dim = Some(d);
    model.config.tie_word_embeddings = false;
    let params_after = model.weights.num_params();
    Ok(json!({
        "step": "slicegpt",
        "fraction": spec.fraction,
        "round_to": spec.round_to,
        "hidden_before": d,
        "hidden_after": n,
        "calibration": calib.source,
        "head_sliced": true,
        "model_params_before": params_before,
        "model_params_after": params_after,
        "model_params_removed_fraction": 1.0 - params_after as f64 / params_before as f64,
        "pca": kept,
    }))
}

/// A copy of block `l` with its RMSNorm scales folded into q/k/v and gate/up (norms → ones).
pub fn folded_layer(l: &LayerWeights) -> LayerWeights {
    let mut f = l.clone();
    for (norm, kinds) in [
        (
            &l.attn_norm,
            [LinearKind::Q, LinearKind::K, LinearKind::V].as_slice(),
        ),
        (&l.mlp_norm, [LinearKind::Gate, LinearKind::Up].as_slice()),
    ] {
        for &k in kinds {
            f.linear_mut(k).weight = scale_columns(&l.linear(k).weight, norm.data());
        }
    }
    let d = l.attn_norm.len();
    f.attn_norm = Tensor::new(vec![d], vec![1.0; d]);
    f.mlp_norm = Tensor::new(vec![d], vec![1.0; d]);
    f
}

/// `w · diag(s)` (columns scaled), `w` `[rows, s.len()]`.
fn scale_columns(w: &Tensor, s: &[f32]) -> Tensor {
    let c = s.len();
    let data = w
        .data()
        .chunks(c)
        .flat_map(|row| row.iter().zip(s).map(|(a, b)| a * b))
        .collect();
    Tensor::new(w.shape.clone(), data)
}

/// Block `folded` in the rotated, sliced basis (see the module docs for each product).
fn sliced_layer(
    folded: &LayerWeights,
    q_in: &Mat<f64>,
    q_mid: &Mat<f64>,
    q_out: &Mat<f64>,
    n: usize,
) -> LayerWeights {
    let (qi, qm, qo) = (
        q_in.as_ref().subcols(0, n),
        q_mid.as_ref().subcols(0, n),
        q_out.as_ref().subcols(0, n),
    );
    let right = |lin: &Linear| Linear {
        weight: mul_right(&lin.weight, q_in.as_ref(), n),
        bias: lin.bias.clone(),
        repr: LinearRepr::Dense,
        packed: None,
    };
    let right_mid = |lin: &Linear| Linear {
        weight: mul_right(&lin.weight, q_mid.as_ref(), n),
        bias: lin.bias.clone(),
        repr: LinearRepr::Dense,
        packed: None,
    };
    let left = |lin: &Linear, q: MatRef<'_, f64>| Linear {
        weight: mul_left(q, &lin.weight),
        bias: lin.bias.as_ref().map(|b| mul_left(q, b)),
        repr: LinearRepr::Dense,
        packed: None,
    };
    // Shortcut in linear layout: Sᵀ = Q̂_toᵀ Q̂_from ([n, n]).
    let shortcut = |from: MatRef<'_, f64>, to: MatRef<'_, f64>| {
        let s = to.transpose() * from;
        to_tensor(s.as_ref())
    };
    LayerWeights {
        attn_norm: Tensor::new(vec![n], vec![1.0; n]),
        q: right(&folded.q),
        k: right(&folded.k),
        v: right(&folded.v),
        o: left(&folded.o, qm),
        mlp_norm: Tensor::new(vec![n], vec![1.0; n]),
        gate: right_mid(&folded.gate),
        up: right_mid(&folded.up),
        down: left(&folded.down, qo),
        attn_shortcut: Some(shortcut(qi, qm)),
        mlp_shortcut: Some(shortcut(qm, qo)),
        act: None,
        // SliceGPT is refused up front on families with extra block tensors.
        extra: Default::default(),
    }
}

/// `w · q[:, :n]` for `w` `[rows, d]`, in f64, row chunks at a time; f32 `[rows, n]`.
fn mul_right(w: &Tensor, q: MatRef<'_, f64>, n: usize) -> Tensor {
    let (rows, d) = (w.rows(), w.cols());
    let qn = q.subcols(0, n);
    let src = w.data();
    let mut out = vec![0f32; rows * n];
    const CHUNK: usize = 2048;
    for (ci, dst) in out.chunks_mut(CHUNK * n).enumerate() {
        let r0 = ci * CHUNK;
        let m = dst.len() / n;
        let x = Mat::<f64>::from_fn(m, d, |i, j| src[(r0 + i) * d + j] as f64);
        let mut y = Mat::<f64>::zeros(m, n);
        matmul(
            y.as_mut(),
            Accum::Replace,
            x.as_ref(),
            qn,
            1.0,
            Par::rayon(0),
        );
        for i in 0..m {
            for j in 0..n {
                dst[i * n + j] = y[(i, j)] as f32;
            }
        }
    }
    Tensor::new(vec![rows, n], out)
}

/// `q̂ᵀ · w` for `q̂` `[d, n]` and `w` `[d, k]` (or a `[d]` vector), in f64; f32 `[n, k]` / `[n]`.
fn mul_left(q: MatRef<'_, f64>, w: &Tensor) -> Tensor {
    let d = w.shape[0];
    let k = if w.shape.len() == 1 { 1 } else { w.cols() };
    let src = w.data();
    let x = Mat::<f64>::from_fn(d, k, |i, j| src[i * k + j] as f64);
    let y = q.transpose() * &x;
    let n = q.ncols();
    let data = (0..n * k).map(|t| y[(t / k, t % k)] as f32).collect();
    let shape = if w.shape.len() == 1 {
        vec![n]
    } else {
        vec![n, k]
    };
    Tensor::new(shape, data)
}

/// `p · w` for an f32 `p` `[d, d]` and `w` `[d, k]` (or `[d]`), f32 out of the same shape.
fn mul_left_f32(p: &Tensor, w: &Tensor) -> Tensor {
    let d = p.rows();
    let k = if w.shape.len() == 1 { 1 } else { w.cols() };
    // (p w)ᵀ = wᵀ pᵀ: rows of the result's transpose via matmul_t with p as the weight.
    let wt: Vec<f32> = (0..k * d).map(|t| w.data()[(t % d) * k + t / d]).collect();
    let mut yt = vec![0f32; k * d];
    kernels::matmul_t(&wt, p.data(), &mut yt, k, d, d, false);
    let data = (0..d * k).map(|t| yt[(t % k) * d + t / k]).collect();
    Tensor::new(w.shape.clone(), data)
}

fn to_tensor(m: MatRef<'_, f64>) -> Tensor {
    let (r, c) = (m.nrows(), m.ncols());
    Tensor::new(
        vec![r, c],
        (0..r * c).map(|t| m[(t / c, t % c)] as f32).collect(),
    )
}

/// `Q̂ Q̂ᵀ` (`Q̂ = q[:, :n]`) as an f32 `[d, d]` tensor (symmetric, so also in linear layout).
fn projector(q: &Mat<f64>, n: usize) -> Tensor {
    let qn = q.as_ref().subcols(0, n);
    let p = qn * qn.transpose();
    to_tensor(p.as_ref())
}

/// `h ← h · Q̂ Q̂ᵀ` for `h` `[rows, d]` (the projection onto the kept principal subspace).
fn project(h: &mut [f32], q: &Mat<f64>, n: usize, d: usize) {
    let p = projector(q, n);
    let rows = h.len() / d;
    let mut out = vec![0f32; h.len()];
    kernels::matmul_t(h, p.data(), &mut out, rows, d, d, false);
    h.copy_from_slice(&out);
}

/// `Σ xᵀx` over the rows of `x` (`[rows, d]`) in f64.
fn gram(x: &[f32], d: usize) -> Mat<f64> {
    let mut g = Mat::<f64>::zeros(d, d);
    add_gram(&mut g, x, d);
    g
}

fn add_gram(g: &mut Mat<f64>, x: &[f32], d: usize) {
    const CHUNK: usize = 2048;
    for c in x.chunks(CHUNK * d) {
        let m = c.len() / d;
        let xm = Mat::<f64>::from_fn(m, d, |i, j| c[i * d + j] as f64);
        matmul(
            g.as_mut(),
            Accum::Add,
            xm.transpose(),
            xm.as_ref(),
            1.0,
            Par::rayon(0),
        );
    }
}

/// Official `pca_calc`: eigenvectors of `g + 0.01·mean(diag g)·I` by decreasing eigenvalue;
/// returns them (as columns) and the eigenvalues of `g`.
fn pca(g: &Mat<f64>, what: &str) -> Result<(Mat<f64>, Vec<f64>)> {
    let d = g.nrows();
    if (0..d).any(|i| (0..d).any(|j| !g[(i, j)].is_finite())) {
        return Err(Error::Numeric(format!(
            "SliceGPT: NaN/Inf in the statistics of {what}"
        )));
    }
    let damp = 0.01 * (0..d).map(|i| g[(i, i)]).sum::<f64>() / d as f64;
    let mut h = g.clone();
    for i in 0..d {
        h[(i, i)] += damp;
    }
    let evd = h.self_adjoint_eigen(Side::Lower).map_err(|e| {
        Error::Numeric(format!(
            "SliceGPT: eigendecomposition of {what} failed: {e:?}"
        ))
    })?;
    let (u, s) = (evd.U(), evd.S().column_vector());
    // faer sorts ascending; reverse.
    let q = Mat::<f64>::from_fn(d, d, |i, j| u[(i, d - 1 - j)]);
    let ev = (0..d).map(|j| s[d - 1 - j] - damp).collect();
    Ok((q, ev))
}

/// Fraction of Σλ in the leading `n` eigenvalues.
fn kept_fraction(ev: &[f64], n: usize) -> f64 {
    let total: f64 = ev.iter().sum();
    ev[..n].iter().sum::<f64>() / total.max(f64::MIN_POSITIVE)
}

/// Accumulates the Gram matrix of one block's attention residual; stops the block early.
struct MidGram {
    layer: usize,
    gram: Mat<f64>,
    d: usize,
}

impl MidGram {
    fn new(layer: usize, d: usize) -> MidGram {
        MidGram {
            layer,
            gram: Mat::zeros(d, d),
            d,
        }
    }
}

impl Observer for MidGram {
    fn attn_residual(&mut self, layer: usize, h: &[f32], rows: usize, cols: usize) {
        if layer == self.layer && cols == self.d {
            add_gram(&mut self.gram, &h[..rows * cols], cols);
        }
    }
}

//! What is trained: a lopper [`Model`] turned into candle tensors, some of them [`Var`]s.
//!
//! Three modes:
//! - [`Mode::Lora`]: every block linear gets `A` `[r, in]` (random, Kaiming-uniform like PEFT)
//!   and `B` `[out, r]` (zero), and is used as `W + M ⊙ (B·A)·α/r`, where `M` is the linear's
//!   sparsity mask (`W ≠ 0`, kept only for linears that have zeros). Merging writes that same
//!   sum back, so a pruned weight stays exactly zero and an N:M or block pattern survives
//!   (LoRA: Hu et al. 2021; LLM-Pruner's recovery uses it the same way, without the mask).
//! - [`Mode::Full`]: masked full fine-tuning of the block linears, their biases and every
//!   RMSNorm scale. The gradient of a masked weight is multiplied by `M` before the optimizer
//!   sees it, so AdamW's moments and update are exactly zero where `M` is (see `adamw.rs`).
//! - [`Mode::All`]: every tensor, embeddings and head included, unmasked (gradient checks).
//!
//! Shapes come from each tensor, so structurally pruned models train as they are.

use super::graph::{BlockT, CResult, Lin};
use crate::model::names;
use crate::model::weights::{LayerWeights, Linear, LinearKind, Tensor as LTensor};
use crate::{Arch, Error, Model, Result};
use candle_core::{DType, Device, Tensor, Var};

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lora { rank: usize, alpha: f64 },
    Full,
    All,
}

/// A tensor that is either frozen or a trainable [`Var`].
#[derive(Debug, Clone)]
pub enum Param {
    Fixed(Tensor),
    Train(Var),
}

impl Param {
    /// The tensor, attached to the graph when `track` (frozen tensors never are).
    pub fn get(&self, track: bool) -> Tensor {
        match self {
            Param::Fixed(t) => t.clone(),
            Param::Train(v) if track => v.as_tensor().clone(),
            Param::Train(v) => v.as_tensor().detach(),
        }
    }
}

/// A LoRA adapter: `Δ = B·A·scale`.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

/// A block linear as trained.
#[derive(Debug, Clone)]
pub struct TLin {
    pub w: Param,
    pub b: Option<Param>,
    /// `[out, in]` u8, 1 where the weight may be non-zero; `None`: no zeros (dense), or, with
    /// `mask_from_base`, recomputed as `w ≠ 0` from the frozen base when needed (LoRA: saves
    /// one byte per weight of memory).
    pub mask: Option<Tensor>,
    pub mask_from_base: bool,
    pub lora: Option<Lora>,
}

impl TLin {
    /// The effective weight and bias (see the module docs).
    pub fn effective(&self, track: bool) -> CResult<Lin> {
        let mut w = self.w.get(track);
        if let Some(l) = &self.lora {
            let (a, b) = if track {
                (l.a.as_tensor().clone(), l.b.as_tensor().clone())
            } else {
                (l.a.as_tensor().detach(), l.b.as_tensor().detach())
            };
            let mut d = (b.matmul(&a)? * l.scale)?;
            if let Some(m) = &self.mask {
                d = (d * m.to_dtype(DType::F32)?)?;
            } else if self.mask_from_base {
                d = (d * w.ne(0f32)?.to_dtype(DType::F32)?)?;
            }
            w = (w + d)?;
        }
        Ok(Lin {
            w,
            b: self.b.as_ref().map(|b| b.get(track)),
        })
    }
}

/// One block as trained.
#[derive(Debug, Clone)]
pub struct TBlock {
    pub attn_norm: Param,
    pub mlp_norm: Param,
    /// Qwen3's per-head q/k norm scales (trained with the other norms).
    pub q_norm: Option<Param>,
    pub k_norm: Option<Param>,
    /// In [`LinearKind::ALL`] order.
    pub lins: Vec<TLin>,
}

impl TBlock {
    pub fn effective(&self, track: bool) -> CResult<BlockT> {
        let l = |k: LinearKind| self.lins[k as usize].effective(track);
        Ok(BlockT {
            attn_norm: self.attn_norm.get(track),
            q: l(LinearKind::Q)?,
            k: l(LinearKind::K)?,
            v: l(LinearKind::V)?,
            o: l(LinearKind::O)?,
            mlp_norm: self.mlp_norm.get(track),
            gate: l(LinearKind::Gate)?,
            up: l(LinearKind::Up)?,
            down: l(LinearKind::Down)?,
            q_norm: self.q_norm.as_ref().map(|p| p.get(track)),
            k_norm: self.k_norm.as_ref().map(|p| p.get(track)),
        })
    }
}

/// A trainable variable with its name (HF names; LoRA factors as `<module>.lora_A/B`) and the
/// mask its gradient is multiplied by.
#[derive(Debug, Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub mask: Option<Tensor>,
}

/// The model as trained.
#[derive(Debug, Clone)]
pub struct TrainModel {
    pub embed: Param,
    pub blocks: Vec<TBlock>,
    pub final_norm: Param,
    /// `None`: tied to `embed`.
    pub head: Option<Param>,
    /// Every trainable variable, in a stable order.
    pub vars: Vec<NamedVar>,
    pub mode: Mode,
    pub device: Device,
    /// The model's config (RoPE, eps, window: what [`super::graph::Ctx`] needs).
    pub ctx_config: crate::Config,
}

pub(crate) fn terr(e: candle_core::Error) -> Error {
    Error::Train(e.to_string())
}

fn to_candle(t: &LTensor, dev: &Device) -> Result<Tensor> {
    Tensor::from_slice(&t.values(), t.shape.as_slice(), dev).map_err(terr)
}

/// Refuse what the training graph does not implement, naming it.
pub fn check_supported(model: &Model) -> Result<()> {
    // The families the training graph implements; any other (a family added to `Arch` later)
    // is refused until its graph is written.
    #[allow(unreachable_patterns)]
    match model.config.arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => {}
        other => {
            return Err(Error::UnsupportedArch {
                path: model.source.clone(),
                arch: format!("{} (training)", other.model_type()),
                supported: "llama, mistral, qwen2, qwen3, phi3",
            })
        }
    }
    // Of the other families' block tensors only qwen3's q/k norms are in the graph.
    let extra = |l: &crate::LayerWeights| {
        l.extra.post_attn_norm.is_some() || l.extra.post_mlp_norm.is_some() || l.extra.moe.is_some()
    };
    if model.weights.layers.iter().any(extra) || model.weights.embed_scale.is_some() {
        return Err(Error::Invalid(format!(
            "{}: training does not implement post-sublayer norms, experts or embedding scales",
            model.source.display()
        )));
    }
    let ext = model.lopper_extensions();
    if !ext.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: training does not implement lopper's extensions {} (low-rank linears, SliceGPT shortcuts, rms_norm_dim); heal the model before factorising or slicing it",
            model.source.display(),
            ext.join(", ")
        )));
    }
    if model.weights.layers.iter().any(|l| l.act.is_some()) {
        return Err(Error::Invalid(format!(
            "{}: training does not implement activation-sparsity thresholds",
            model.source.display()
        )));
    }
    Ok(())
}

/// SplitMix64 uniform in `[-bound, bound)` for LoRA's `A`, reproducible from `seed` on any device.
fn uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    let mut rng = crate::calibrate::SplitMix64(seed);
    (0..n)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound)
        .collect()
}

impl TrainModel {
    /// Build from `model` on `dev`; LoRA's `A` is drawn from `seed`.
    pub fn new(model: &Model, mode: Mode, seed: u64, dev: &Device) -> Result<TrainModel> {
        check_supported(model)?;
        let mut vars = Vec::new();
        let mut param = |name: String, t: &LTensor, train: bool| -> Result<Param> {
            let c = to_candle(t, dev)?;
            if !train {
                return Ok(Param::Fixed(c));
            }
            let v = Var::from_tensor(&c).map_err(terr)?;
            vars.push(NamedVar {
                name,
                var: v.clone(),
                mask: None,
            });
            Ok(Param::Train(v))
        };
        let all = mode == Mode::All;
        let full = matches!(mode, Mode::Full | Mode::All);
        let w = &model.weights;
        let embed = param(names::EMBED.into(), &w.embed, all)?;
        let mut blocks = Vec::new();
        for (i, lw) in w.layers.iter().enumerate() {
            let n = |s: &str| names::layer_tensor(i, s);
            let attn_norm = param(n(names::ATTN_NORM), &lw.attn_norm, full)?;
            let mlp_norm = param(n(names::MLP_NORM), &lw.mlp_norm, full)?;
            let mut head_norm = |s: &str, t: &Option<LTensor>| -> Result<Option<Param>> {
                t.as_ref().map(|t| param(n(s), t, full)).transpose()
            };
            let q_norm = head_norm("self_attn.q_norm.weight", &lw.extra.q_norm)?;
            let k_norm = head_norm("self_attn.k_norm.weight", &lw.extra.k_norm)?;
            let mut lins = Vec::new();
            for kind in LinearKind::ALL {
                let base = names::linear_module(i, kind);
                lins.push(build_lin(&base, lw, kind, mode, seed, dev, &mut param)?);
            }
            blocks.push(TBlock {
                attn_norm,
                mlp_norm,
                q_norm,
                k_norm,
                lins,
            });
        }
        let final_norm = param(names::FINAL_NORM.into(), &w.final_norm, full)?;
        let head = match &w.lm_head {
            Some(h) => Some(param(names::LM_HEAD.into(), h, all)?),
            None => None,
        };
        // Masks of the full-mode linear weights (built in `build_lin`, attached here by name).
        for b in &blocks {
            for l in &b.lins {
                if let (Param::Train(v), Some(m)) = (&l.w, &l.mask) {
                    if let Some(nv) = vars
                        .iter_mut()
                        .find(|nv| nv.var.as_tensor().id() == v.as_tensor().id())
                    {
                        nv.mask = Some(m.clone());
                    }
                }
            }
        }
        Ok(TrainModel {
            embed,
            blocks,
            final_norm,
            head,
            vars,
            mode,
            device: dev.clone(),
            ctx_config: model.config.clone(),
        })
    }

    /// The head matrix (the embedding when tied).
    pub fn head(&self, track: bool) -> Tensor {
        self.head.as_ref().unwrap_or(&self.embed).get(track)
    }

    /// Write the trained tensors back into `model` (LoRA merged with its mask).
    pub fn write_back(&self, model: &mut Model) -> Result<()> {
        let back = |t: &Tensor| -> Result<LTensor> {
            let shape = t.dims().to_vec();
            let v = t
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(terr)?;
            Ok(LTensor::new(shape, v))
        };
        let w = &mut model.weights;
        if let Param::Train(v) = &self.embed {
            w.embed = back(v.as_tensor())?;
        }
        if let (Some(Param::Train(v)), Some(h)) = (&self.head, w.lm_head.as_mut()) {
            *h = back(v.as_tensor())?;
        }
        if let Param::Train(v) = &self.final_norm {
            w.final_norm = back(v.as_tensor())?;
        }
        for (b, lw) in self.blocks.iter().zip(w.layers.iter_mut()) {
            if let Param::Train(v) = &b.attn_norm {
                lw.attn_norm = back(v.as_tensor())?;
            }
            if let Param::Train(v) = &b.mlp_norm {
                lw.mlp_norm = back(v.as_tensor())?;
            }
            if let Some(Param::Train(v)) = &b.q_norm {
                lw.extra.q_norm = Some(back(v.as_tensor())?);
            }
            if let Some(Param::Train(v)) = &b.k_norm {
                lw.extra.k_norm = Some(back(v.as_tensor())?);
            }
            for (tl, kind) in b.lins.iter().zip(LinearKind::ALL) {
                if matches!(tl.w, Param::Fixed(_)) && tl.lora.is_none() {
                    continue;
                }
                let eff = tl.effective(false).map_err(terr)?;
                let lin = lw.linear_mut(kind);
                lin.weight = back(&eff.w)?;
                lin.packed = None;
                if let (Some(Param::Train(_)), Some(b)) = (&tl.b, eff.b.as_ref()) {
                    lin.bias = Some(back(b)?);
                }
            }
        }
        Ok(())
    }
}

/// FNV-1a of a name: each adapter's `A` gets its own stream of the seed.
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Build one block linear for `mode`; trainable tensors are registered through `param`.
fn build_lin(
    base: &str,
    lw: &LayerWeights,
    kind: LinearKind,
    mode: Mode,
    seed: u64,
    dev: &Device,
    param: &mut dyn FnMut(String, &LTensor, bool) -> Result<Param>,
) -> Result<TLin> {
    let lin: &Linear = lw.linear(kind);
    let wt = &lin.weight;
    let has_zeros = wt.count_zeros() > 0;
    let lora_mode = matches!(mode, Mode::Lora { .. });
    let mask = if has_zeros && mode != Mode::All && !lora_mode {
        let m: Vec<u8> = wt.values().iter().map(|&x| (x != 0.0) as u8).collect();
        Some(Tensor::from_vec(m, wt.shape.as_slice(), dev).map_err(terr)?)
    } else {
        None
    };
    let train_w = !matches!(mode, Mode::Lora { .. });
    let w = param(format!("{base}.weight"), wt, train_w)?;
    let b = match &lin.bias {
        Some(b) => Some(param(format!("{base}.bias"), b, train_w)?),
        None => None,
    };
    let lora = match mode {
        Mode::Lora { rank, alpha } => {
            let (out, inp) = (lin.out_features(), lin.in_features());
            // PEFT's default: kaiming_uniform_(a=√5) on A, i.e. bound 1/√in.
            let bound = 1.0 / (inp as f32).sqrt();
            let s = seed ^ (fnv1a(base.as_bytes()));
            let a = LTensor::new(vec![rank, inp], uniform(rank * inp, bound, s));
            let bz = LTensor::zeros(vec![out, rank]);
            let pa = param(format!("{base}.lora_A"), &a, true)?;
            let pb = param(format!("{base}.lora_B"), &bz, true)?;
            match (pa, pb) {
                (Param::Train(a), Param::Train(b)) => Some(Lora {
                    a,
                    b,
                    scale: alpha / rank as f64,
                }),
                _ => unreachable!("registered as trainable"),
            }
        }
        _ => None,
    };
    Ok(TLin {
        w,
        b,
        mask,
        mask_from_base: has_zeros && lora_mode,
        lora,
    })
}

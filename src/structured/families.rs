//! Which structured steps the newer families support, decided before any work
//! (docs/families.md). Llama, Mistral and Qwen2 pass unchanged.
//!
//! - `layers`: every family; gemma3's per-layer sliding / global pattern follows the kept
//!   blocks ([`super::depth`]); its depth re-fit is refused (the re-fit's block indices would
//!   not match the pattern).
//! - `heads`: every family (q/k norms are per head_dim, shared by all heads, so they stay; phi3's
//!   fused qkv_proj is re-fused from the kept rows on save). Bias compensation and the o_proj
//!   re-fit add an o_proj bias: refused for phi3 and mixtral (no attention biases in their HF
//!   classes); the re-fit is refused for gemma3 (its post-attention norm sits between o_proj
//!   and the residual the re-fit matches).
//! - `neurons`: refused for mixtures (per-expert widths are not implemented); bias compensation
//!   and the down_proj re-fit add a down_proj bias, which qwen3, phi3 and gemma3 cannot hold.
//! - `slice`: refused for every newer family (SliceGPT's rotation invariance does not hold
//!   through gemma3's post-norms, nor through a router and its experts; not implemented for
//!   qwen3 / phi3 either).
//! - `low_rank`: refused on phi3's fused q/k/v/gate/up (the HF class holds one dense matrix) and
//!   on a mixture's MLP (its experts are not factorised).
//! - `sparse`: every family (experts per routed token, [`crate::prune::experts`]).

use super::{depth::DepthSpec, heads::HeadSpec, lowrank::LowRankSpec, neurons::NeuronSpec};
use crate::model::config::Arch;
use crate::{Error, LinearKind, Model, Result};

/// A plan step as this check sees it (built by `structured::plan::Step::family_spec`).
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    Layers(&'a DepthSpec),
    Heads(&'a HeadSpec),
    Neurons(&'a NeuronSpec),
    Slice,
    LowRank(&'a LowRankSpec),
    Sparse,
}

impl Step<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Step::Layers(_) => "layers",
            Step::Heads(_) => "heads",
            Step::Neurons(_) => "neurons",
            Step::Slice => "slice",
            Step::LowRank(_) => "low_rank",
            Step::Sparse => "sparse",
        }
    }
}

/// Refuse `step` on `model` when its family does not support it (see the module docs).
pub fn check_step(step: Step<'_>, model: &Model) -> Result<()> {
    let arch = model.config.arch;
    if matches!(arch, Arch::Llama | Arch::Mistral | Arch::Qwen2) {
        return Ok(());
    }
    let name = arch.model_type();
    let no = |what: &str| {
        Err(Error::Invalid(format!(
            "{} on {name}: {what} (docs/families.md lists what each family supports)",
            step.kind()
        )))
    };
    let moe = arch.is_moe();
    let no_attn_bias = matches!(arch, Arch::Phi3 | Arch::Mixtral);
    let no_mlp_bias = matches!(
        arch,
        Arch::Qwen3 | Arch::Phi3 | Arch::Gemma3 | Arch::Qwen3Moe
    );
    match step {
        Step::Layers(s) if arch == Arch::Gemma3 && s.reconstruct.is_some() => {
            no("the depth re-fit is not implemented for gemma3's sliding / global layer pattern")
        }
        Step::Heads(s) if no_attn_bias && (s.bias_compensation || s.reconstruct.is_some()) => {
            no("bias compensation and the o_proj re-fit add an o_proj bias, which this family's HF class has no place for")
        }
        Step::Heads(s) if arch == Arch::Gemma3 && s.reconstruct.is_some() => {
            no("the o_proj re-fit does not see gemma3's post-attention norm")
        }
        Step::Neurons(_) if moe => {
            no("neuron pruning of the experts of a mixture is not implemented (prune them unstructured, or remove heads / layers)")
        }
        Step::Neurons(s) if no_mlp_bias && (s.bias_compensation || s.reconstruct.is_some()) => {
            no("bias compensation and the down_proj re-fit add a down_proj bias, which this family's HF class has no place for")
        }
        Step::Slice => no("SliceGPT is implemented for llama, mistral and qwen2 only"),
        Step::LowRank(s) => {
            let fused = [LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::Gate, LinearKind::Up];
            let mlp = [LinearKind::Gate, LinearKind::Up, LinearKind::Down];
            // No modules listed means all of them.
            let modules = match s.modules.is_empty() {
                true => LinearKind::ALL.to_vec(),
                false => s.modules.clone(),
            };
            if arch == Arch::Phi3 && modules.iter().any(|k| fused.contains(k)) {
                return no("phi3 stores q/k/v and gate/up fused; factorise only o and down (modules = [\"o\", \"down\"])");
            }
            if moe && modules.iter().any(|k| mlp.contains(k)) {
                return no("the experts of a mixture are not factorised; factorise only attention (modules = \"attn\")");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

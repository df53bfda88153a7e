//! GGUF metadata → [`Config`]: typed key access, per-layer arrays, RoPE scaling.

use super::{GgufFile, FORMAT};
use crate::model::config::{Arch, Config, FamilyConfig, RopeScaling};
use crate::model::weights::Tensor;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;

/// Typed access to the metadata, with errors naming the file and key.
struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn bad(&self, key: &str, v: &Value) -> Error {
        Error::format(
            self.path,
            FORMAT,
            format!("metadata `{key}` has unexpected value {v:?}"),
        )
    }

    fn int_of(&self, key: &str, v: &Value) -> Result<usize> {
        let n: Option<u64> = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.bad(key, v))
    }

    fn int(&self, key: &str) -> Result<Option<usize>> {
        self.map.get(key).map(|v| self.int_of(key, v)).transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            // Shortest decimal of the f32 (1e-5 stays 1e-5, not 9.99999974e-6).
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(f64::from(*x)))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => self.int_of(key, v).map(|n| Some(n as f64)),
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, v)),
        }
    }

    /// An integer that may be one value for all layers or an array with one per layer.
    fn per_layer(&self, key: &str, n_layers: usize) -> Result<Option<Vec<usize>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                if a.len() != n_layers {
                    return Err(Error::config(
                        self.path,
                        format!(
                            "metadata `{key}` has {} entries for {n_layers} layers",
                            a.len()
                        ),
                    ));
                }
                a.iter()
                    .map(|v| self.int_of(key, v))
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            Some(v) => Ok(Some(vec![self.int_of(key, v)?; n_layers])),
        }
    }

    fn required(&self, key: &str) -> Error {
        Error::config(self.path, format!("metadata `{key}` is missing"))
    }
}

/// Per-layer shapes as the metadata states them.
pub(super) struct LayerDims {
    pub heads: Vec<usize>,
    pub kv_heads: Vec<usize>,
    pub ffn: Vec<usize>,
}

/// Build the [`Config`] and per-layer dims from the metadata (and the embedding's shape).
pub(super) fn read_config(f: &GgufFile) -> Result<(Config, LayerDims)> {
    let path = f.path();
    let map = f.metadata();
    let arch_name = match map.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(Error::format(
                path,
                FORMAT,
                format!("metadata `general.architecture` is {v:?}, not a string"),
            ))
        }
        None => {
            return Err(Error::config(
                path,
                "metadata `general.architecture` is missing",
            ))
        }
    };
    // `deci` (llama.cpp's Llama-3.1-Nemotron graph) is the llama block with per-layer head counts
    // and FFN widths; lopper's GGUF writer uses it for non-uniform (structurally pruned) models.
    // Its attention-free or FFN-free layers (0 heads, 0 width) are refused below.
    let parsed = match arch_name.as_str() {
        "deci" => Some(Arch::Llama),
        "gemma3" => Some(Arch::Gemma3),
        "qwen3moe" => Some(Arch::Qwen3Moe),
        "qwen3" | "phi3" | "llama" | "mistral" | "qwen2" => Arch::parse(&arch_name),
        _ => None,
    };
    if parsed.is_some_and(Arch::is_moe) || m_expert_count(map, &arch_name) {
        return Err(Error::config(
            path,
            format!(
                "`{arch_name}` with experts: lopper reads mixtures of experts from HF \
                 directories only (convert it to one, or load the HF checkpoint)"
            ),
        ));
    }
    let arch = parsed.ok_or_else(|| Error::UnsupportedArch {
        path: path.into(),
        arch: arch_name.clone(),
        supported: Arch::SUPPORTED,
    })?;
    let m = Meta {
        map,
        path,
        arch: &arch_name,
    };
    let req = |k: &str| -> Result<usize> { m.int(&m.key(k))?.ok_or_else(|| m.required(&m.key(k))) };
    let n_layers = req("block_count")?;
    // Each block has at least nine tensors (six for phi3's fused ones); this also bounds the
    // per-layer vectors built below.
    let n_tensors = f.tensor_names().len();
    let per_block = if arch == Arch::Phi3 { 6 } else { 9 };
    if n_layers > n_tensors / per_block {
        return Err(Error::config(
            path,
            format!(
                "metadata `{}` = {n_layers} but the file has only {n_tensors} tensors",
                m.key("block_count")
            ),
        ));
    }
    let hidden = req("embedding_length")?;
    let layer = |k: &str| m.per_layer(&m.key(k), n_layers);
    let heads =
        layer("attention.head_count")?.ok_or_else(|| m.required(&m.key("attention.head_count")))?;
    let kv_heads = layer("attention.head_count_kv")?.unwrap_or_else(|| heads.clone());
    let ffn =
        layer("feed_forward_length")?.ok_or_else(|| m.required(&m.key("feed_forward_length")))?;
    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let n_heads = max(&heads);
    let head_dim = match m.int(&m.key("attention.key_length"))? {
        Some(d) => d,
        None if n_heads > 0 => hidden / n_heads,
        None => 0,
    };
    // Bound every width so that products of two (e.g. heads × head_dim) cannot overflow.
    const LIMIT: usize = 1 << 24;
    let widths = [hidden, head_dim].into_iter().chain(heads.iter().copied());
    if let Some(w) = widths
        .chain(kv_heads.iter().copied())
        .chain(ffn.iter().copied())
        .find(|&w| w > LIMIT)
    {
        return Err(Error::config(
            path,
            format!("implausible width {w} in the metadata (limit {LIMIT})"),
        ));
    }
    if let Some(vd) = m.int(&m.key("attention.value_length"))? {
        if vd != head_dim {
            return Err(Error::config(
                path,
                format!("value_length {vd} differs from key_length {head_dim}; not supported"),
            ));
        }
    }
    let rope_theta = m.float(&m.key("rope.freq_base"))?.unwrap_or(10000.0);
    let mut rope_scaling = match m.string(&m.key("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::Default,
        Some("linear") => {
            let factor = m.float(&m.key("rope.scaling.factor"))?.unwrap_or(1.0);
            RopeScaling::Linear { factor }
        }
        Some(other) => {
            return Err(Error::config(
                path,
                format!(
                "RoPE scaling type `{other}` is not supported (supported: none, linear, llama3)"
            ),
            ))
        }
    };
    if let (RopeScaling::Default, Some(f)) = (&rope_scaling, m.float(&m.key("rope.scale_linear"))?)
    {
        if f != 1.0 {
            rope_scaling = RopeScaling::Linear { factor: f };
        }
    }
    if f.has_tensor("rope_freqs.weight") {
        let orig = m
            .int(&m.key("rope.scaling.original_context_length"))?
            .unwrap_or(8192);
        rope_scaling = llama3_from_rope_freqs(&f.read_tensor("rope_freqs.weight")?, head_dim, rope_theta, orig)
            .ok_or_else(|| Error::config(path, "tensor `rope_freqs.weight` does not match Llama 3 RoPE scaling (low 1, high 4); other per-frequency factors are not supported"))?;
    }
    let vocab_size = match m.int(&m.key("vocab_size"))? {
        Some(v) => v,
        None => match map.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => f
                .tensor_info("token_embd.weight")
                .and_then(|(_, s)| s.first().copied())
                .unwrap_or(0),
        },
    };
    let token =
        |k: &str| -> Result<Option<u32>> { Ok(m.int(k)?.and_then(|v| u32::try_from(v).ok())) };
    let has = |suffix: &str| (0..n_layers).any(|i| f.has_tensor(&format!("blk.{i}.{suffix}")));
    let sliding_window = m.int(&m.key("attention.sliding_window"))?;
    // llama.cpp files Mistral models under `llama`. With a window the model is Mistral (HF
    // llama has no window, so it must be written back as mistral); a biased llama keeps its
    // arch and the window (the HF writer refuses it). qwen2's window is per layer in HF: refused.
    let biased = has("attn_q.bias") || has("attn_output.bias") || has("ffn_up.bias");
    let arch = match (arch, sliding_window) {
        (Arch::Llama, Some(_)) if !biased => Arch::Mistral,
        (Arch::Qwen2 | Arch::Qwen3, Some(w)) => {
            return Err(Error::config(
                path,
                format!(
                    "metadata `{}` = {w}: sliding-window attention is supported for \
                     llama/mistral/phi3/gemma3 only",
                    m.key("attention.sliding_window")
                ),
            ))
        }
        (a, _) => a,
    };
    let config = Config {
        arch,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: max(&ffn),
        num_hidden_layers: n_layers,
        num_attention_heads: n_heads,
        num_key_value_heads: max(&kv_heads),
        head_dim,
        rms_norm_eps: m
            .float(&m.key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rms_norm_dim: None,
        rope_theta,
        rope_scaling,
        max_position_embeddings: m.int(&m.key("context_length"))?.unwrap_or(2048),
        sliding_window,
        tie_word_embeddings: !f.has_tensor("output.weight"),
        qkv_bias: arch == Arch::Qwen2 || has("attn_q.bias"),
        o_bias: has("attn_output.bias"),
        mlp_bias: has("ffn_up.bias"),
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token("tokenizer.ggml.eos_token_id")?,
        family: Default::default(),
    };
    let mut config = config;
    if arch == Arch::Gemma3 {
        config.family = gemma3_family(&m, &config, n_layers)?;
    }
    config.validate(path)?;
    if let Some(i) = ffn.iter().position(|&f| f == 0) {
        return Err(Error::config(
            path,
            format!("layer {i} has FFN width 0 (an FFN-free layer); not supported"),
        ));
    }
    for (i, (&h, &kv)) in heads.iter().zip(&kv_heads).enumerate() {
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(Error::config(
                path,
                format!("layer {i}: {h} query heads and {kv} KV heads are not a valid grouping"),
            ));
        }
    }
    Ok((
        config,
        LayerDims {
            heads,
            kv_heads,
            ffn,
        },
    ))
}

/// Key of gemma3's per-layer sliding flags (lopper's; llama.cpp fixes the pattern at 6).
pub const GEMMA3_PATTERN_KEY: &str = "gemma3.attention.sliding_window_pattern";

/// llama.cpp's gemma3 layer pattern: layer `i` slides unless `(i + 1) % 6 == 0`.
pub fn gemma3_default_pattern(layers: usize) -> Vec<bool> {
    (0..layers).map(|i| (i + 1) % 6 != 0).collect()
}

/// The score scale llama.cpp's gemma3 graph uses: `1/√head_dim`, or `1/√(hidden/heads)` for
/// the 62-layer 27B model.
pub fn gemma3_query_scalar(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> usize {
    if layers == 62 && heads > 0 {
        hidden / heads
    } else {
        head_dim
    }
}

/// Whether the metadata declares experts (`{arch}.expert_count` > 0).
fn m_expert_count(map: &std::collections::HashMap<String, Value>, arch: &str) -> bool {
    match map.get(&format!("{arch}.expert_count")) {
        Some(v) => v.to_u64().map_or(true, |n| n > 0),
        None => false,
    }
}

/// Gemma 3's additions as llama.cpp defines them: every 6th layer global (or lopper's
/// per-layer `gemma3.attention.sliding_window_pattern`), local RoPE base 10000, score scale
/// `head_dim` (hidden/heads for the 62-layer 27B).
fn gemma3_family(m: &Meta<'_>, c: &Config, n_layers: usize) -> Result<FamilyConfig> {
    let sliding_layers = match m.map.get(GEMMA3_PATTERN_KEY) {
        None => gemma3_default_pattern(n_layers),
        Some(Value::Array(a)) if a.len() == n_layers => a
            .iter()
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(Error::config(
                    m.path,
                    format!("`{}` must hold booleans", GEMMA3_PATTERN_KEY),
                )),
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(Error::config(
                m.path,
                format!("`{}` must be one boolean per layer", GEMMA3_PATTERN_KEY),
            ))
        }
    };
    let scalar = gemma3_query_scalar(n_layers, c.hidden_size, c.num_attention_heads, c.head_dim);
    Ok(FamilyConfig {
        query_pre_attn_scalar: Some(scalar as f64),
        sliding_layers,
        rope_local_theta: Some(10000.0),
        moe: None,
    })
}

/// Recognise llama.cpp's `rope_freqs.weight` (per-frequency divisors baked by the converter for
/// Llama 3.1+) as [`RopeScaling::Llama3`] with the standard low/high factors 1 and 4.
pub(super) fn llama3_from_rope_freqs(
    t: &Tensor,
    head_dim: usize,
    theta: f64,
    orig: usize,
) -> Option<RopeScaling> {
    let got = t.data();
    if got.len() != head_dim / 2 || got.is_empty() {
        return None;
    }
    let factor = got.iter().copied().fold(f32::MIN, f32::max) as f64;
    let want = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig);
    let ok = got
        .iter()
        .zip(&want)
        .all(|(g, w)| ((*g as f64) - w).abs() <= 1e-3 * w.abs().max(1.0));
    ok.then_some(RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: orig,
    })
}

/// The per-frequency divisors llama.cpp's converter stores for Llama 3 RoPE scaling.
pub fn llama3_rope_factors(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low: f64,
    high: f64,
    orig: usize,
) -> Vec<f64> {
    let (low_wl, high_wl) = (orig as f64 / low, orig as f64 / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                factor
            } else {
                let smooth = (orig as f64 / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_factors_round_trip() {
        let want = llama3_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 8192);
        let t = Tensor::new(vec![32], want.iter().map(|&x| x as f32).collect());
        let got = llama3_from_rope_freqs(&t, 64, 500000.0, 8192);
        assert_eq!(
            got,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        let plain = Tensor::new(vec![32], (0..32).map(|i| 1.0 + i as f32).collect());
        assert_eq!(llama3_from_rope_freqs(&plain, 64, 500000.0, 8192), None);
    }
}

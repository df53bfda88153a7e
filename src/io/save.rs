//! Saving a model as an HF directory that transformers (4.x and 5.x) and lopper can load.
//!
//! [`save_hf`] writes `config.json`, `model.safetensors`, `generation_config.json` and, when the
//! model has them, `tokenizer.json` and `tokenizer_config.json` (with the chat template).
//!
//! Saving is atomic: everything is written into a temporary directory next to the output
//! (`.<name>.tmp-<pid>-<n>`), synced, and only then renamed into place. An existing output is refused
//! unless `force` is set, and even then it is replaced only once the new directory is complete.
//! The input model is never modified: an output that is (or contains) the model's source is refused.
//!
//! Tensors are streamed to disk one at a time (converted in small chunks for f16 / bf16), so
//! saving does not need a second copy of the model in memory.
//!
//! Layers that pruning made non-uniform are described by the `lopper_layers` extension (see
//! [`crate::io::hf`]); when all layers share the same (pruned) shapes, those shapes are written as
//! the ordinary config fields instead, so transformers can load the result too.
//! Low-rank linears, residual shortcuts and the RMSNorm width of a sliced model are written with
//! the `lopper_low_rank` / `lopper_slicegpt` extensions (only lopper reads those).

use crate::io::hf::{self, LayerSpec, LOPPER_LAYERS_KEY};
use crate::model::config::{Arch, Config, RopeScaling};
use crate::model::names;
use crate::model::weights::{
    LayerWeights, Linear, LinearKind, Tensor, ATTN_SHORTCUT, LOW_RANK_U, LOW_RANK_V, MLP_SHORTCUT,
};
use crate::{Error, Model, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Element type of the saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    /// 32-bit float (bit-exact; also `float32`, `fp32`).
    #[default]
    F32,
    /// IEEE half precision (also `float16`, `fp16`, `half`).
    F16,
    /// bfloat16 (also `bfloat16`).
    Bf16,
}

impl SaveDtype {
    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::F16 => "F16",
            SaveDtype::Bf16 => "BF16",
        }
    }

    /// The torch dtype name written to `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::F16 => "float16",
            SaveDtype::Bf16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::F16 | SaveDtype::Bf16 => 2,
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<SaveDtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(SaveDtype::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(SaveDtype::F16),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            _ => Err(Error::Invalid(format!(
                "unknown dtype `{s}` (use f32, f16 or bf16)"
            ))),
        }
    }
}

impl std::fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SaveDtype::F32 => "f32",
            SaveDtype::F16 => "f16",
            SaveDtype::Bf16 => "bf16",
        })
    }
}

/// Save `model` as an HF directory at `out` (see the module docs for the guarantees).
pub fn save_hf(model: &Model, out: &Path, dtype: SaveDtype, force: bool) -> Result<()> {
    save_hf_with_extras(model, out, dtype, force, &[])
}

/// [`save_hf`] plus extra files (e.g. `report.json`) written into the directory before it is
/// renamed into place, so the model and its report appear together or not at all.
pub fn save_hf_with_extras(
    model: &Model,
    out: &Path,
    dtype: SaveDtype,
    force: bool,
    extras: &[(&str, &[u8])],
) -> Result<()> {
    save_hf_custom(model, out, dtype, force, extras, &Custom::default())
}

/// Changes to the standard HF layout for lopper's own extensions (e.g. packed weights, see
/// [`crate::io::packed`]): dense tensors left out, raw tensors added, `config.json` keys added.
#[derive(Debug, Default)]
pub struct Custom {
    /// Dense tensors (HF names) not to write.
    pub skip: std::collections::HashSet<String>,
    /// Tensors written as given (little-endian bytes), after the dense ones.
    pub raw: Vec<crate::formats::RawTensor>,
    /// Keys added to `config.json` (after it is checked to load).
    pub config: Map<String, Value>,
}

/// [`save_hf_with_extras`] with [`Custom`] changes.
pub fn save_hf_custom(
    model: &Model,
    out: &Path,
    dtype: SaveDtype,
    force: bool,
    extras: &[(&str, &[u8])],
    custom: &Custom,
) -> Result<()> {
    let out_err = |msg: String| Error::Output {
        path: out.to_path_buf(),
        msg,
    };
    let name = out
        .file_name()
        .ok_or_else(|| out_err("the output must name a directory".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Plan everything that can fail on the model before touching the disk.
    let (mut config_json, written) = config_json(model, dtype, &out.join("config.json"))?;
    if let Value::Object(o) = &mut config_json {
        o.extend(custom.config.clone());
    }
    let fam = super::save_family::tensors(model)?;
    let mut entries = tensor_entries(model, &written, out)?;
    entries.retain(|e| !custom.skip.contains(&e.name) && !fam.drop.contains(&e.name));
    let fam_entry = |name: &String, t: &Tensor| Entry {
        name: name.clone(),
        shape: t.shape.clone(),
        src: None,
        raw: None,
    };
    entries.extend(fam.borrowed.iter().map(|(n, t)| Entry {
        src: Some(*t),
        ..fam_entry(n, t)
    }));
    entries.extend(fam.owned.iter().map(|(n, t)| Entry {
        src: Some(t),
        ..fam_entry(n, t)
    }));
    entries.extend(custom.raw.iter().map(|t| Entry {
        name: t.name.clone(),
        shape: t.shape.clone(),
        src: None,
        raw: Some(t),
    }));
    refuse_input(model, out)?;
    let exists = out.symlink_metadata().is_ok();
    if exists && !force {
        return Err(out_err("exists; pass --force to replace it".into()));
    }

    std::fs::create_dir_all(&parent)
        .map_err(|e| out_err(format!("creating {}: {e}", parent.display())))?;
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let tag = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = parent.join(format!(".{name}.tmp-{tag}"));
    if tmp.symlink_metadata().is_ok() {
        remove_any(&tmp).map_err(|e| out_err(format!("removing stale {}: {e}", tmp.display())))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| out_err(format!("creating {}: {e}", tmp.display())))?;
    let guard = TempGuard(Some(tmp.clone()));

    write_file(&tmp.join(hf::CONFIG_FILE), &pretty(&config_json)?)?;
    write_entries(&tmp.join(hf::WEIGHTS_FILE), &entries, dtype)?;
    let mut gen = Map::new();
    gen.insert("_from_model_config".into(), Value::Bool(true));
    if let Some(b) = written.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    if let Some(e) = written.eos_token_id {
        gen.insert("eos_token_id".into(), e.into());
    }
    write_file(
        &tmp.join("generation_config.json"),
        &pretty(&Value::Object(gen))?,
    )?;
    if let Some(tok) = &model.tokenizer {
        let p = tmp.join(hf::TOKENIZER_FILE);
        tok.save(&p, false).map_err(|e| Error::Output {
            path: p.clone(),
            msg: format!("saving tokenizer: {e}"),
        })?;
        sync_path(&p)?;
    }
    if model.tokenizer.is_some() || model.chat_template.is_some() {
        let tc = tokenizer_config(model);
        write_file(&tmp.join(hf::TOKENIZER_CONFIG_FILE), &pretty(&tc)?)?;
    }
    for (name, bytes) in extras {
        write_file(&tmp.join(name), bytes)?;
    }
    if let Some(a) = crate::model::act::installed(model) {
        if !extras.iter().any(|(n, _)| *n == super::act_file::FILE) {
            let bytes = super::act_file::to_json(model, &a)?;
            write_file(&tmp.join(super::act_file::FILE), &bytes)?;
        }
    }
    sync_path(&tmp)?;

    // Swap into place.
    if out.symlink_metadata().is_ok() {
        if !force {
            return Err(out_err("exists; pass --force to replace it".into()));
        }
        let old = parent.join(format!(".{name}.old-{tag}"));
        if old.symlink_metadata().is_ok() {
            remove_any(&old)
                .map_err(|e| out_err(format!("removing stale {}: {e}", old.display())))?;
        }
        std::fs::rename(out, &old)
            .map_err(|e| out_err(format!("moving the old output aside: {e}")))?;
        if let Err(e) = std::fs::rename(&tmp, out) {
            let _ = std::fs::rename(&old, out);
            return Err(out_err(format!(
                "renaming {} into place: {e}",
                tmp.display()
            )));
        }
        guard.disarm();
        // The new model is in place; a leftover old copy is only wasted space.
        let _ = remove_any(&old);
    } else {
        std::fs::rename(&tmp, out)
            .map_err(|e| out_err(format!("renaming {} into place: {e}", tmp.display())))?;
        guard.disarm();
    }
    let _ = sync_path(&parent);
    Ok(())
}

/// Write `tensors` as one safetensors file, streaming.
///
/// `path` is replaced atomically (written beside it, then renamed), so even a file that a loaded
/// model still maps can be replaced safely.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &Tensor)], dtype: SaveDtype) -> Result<()> {
    let entries: Vec<Entry> = tensors
        .iter()
        .map(|(n, t)| Entry {
            name: n.to_string(),
            shape: t.shape.clone(),
            src: Some(t),
            raw: None,
        })
        .collect();
    let name = path.file_name().ok_or_else(|| Error::Output {
        path: path.to_path_buf(),
        msg: "the output must name a file".into(),
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = write_entries(&tmp, &entries, dtype).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|e| Error::Output {
            path: path.to_path_buf(),
            msg: format!("renaming {} into place: {e}", tmp.display()),
        })
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// A tensor to write: its values, raw bytes, or zeros (a bias HF needs that the model lacks).
struct Entry<'a> {
    name: String,
    shape: Vec<usize>,
    src: Option<&'a Tensor>,
    /// Written as is (its own dtype), instead of `src`.
    raw: Option<&'a crate::formats::RawTensor>,
}

/// The safetensors dtype name of a raw tensor.
fn raw_dtype_name(d: crate::formats::Dtype) -> &'static str {
    use crate::formats::Dtype;
    match d {
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        Dtype::Bf16 => "BF16",
        Dtype::I8 => "I8",
        Dtype::U8 => "U8",
        Dtype::U16 => "U16",
        Dtype::U32 => "U32",
        Dtype::U64 => "U64",
    }
}

/// Removes the temp directory unless disarmed (also on panic).
struct TempGuard(Option<PathBuf>);

impl TempGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    let meta = p.symlink_metadata()?;
    if meta.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Refuse an output that is, or contains, the model's source (that would destroy the input).
fn refuse_input(model: &Model, out: &Path) -> Result<()> {
    let (Ok(src), Ok(dst)) = (model.source.canonicalize(), out.canonicalize()) else {
        return Ok(());
    };
    if src.starts_with(&dst) {
        return Err(Error::Output {
            path: out.to_path_buf(),
            msg: format!(
                "is or contains the input model {}; choose another output directory",
                src.display()
            ),
        });
    }
    Ok(())
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    let mut s = serde_json::to_vec_pretty(v)
        .map_err(|e| Error::Invalid(format!("serializing JSON: {e}")))?;
    s.push(b'\n');
    Ok(s)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| Error::Output {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut f = std::fs::File::create(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// fsync a file or directory.
fn sync_path(path: &Path) -> Result<()> {
    let err = |e: std::io::Error| Error::Output {
        path: path.to_path_buf(),
        msg: format!("sync: {e}"),
    };
    std::fs::File::open(path)
        .map_err(err)?
        .sync_all()
        .map_err(err)
}

/// The `config.json` to write, and the [`Config`] it parses back to.
///
/// Shapes come from the weights: uniform layers are written as the ordinary fields, non-uniform
/// ones as nominal fields plus `lopper_layers`. Bias flags come from the biases present.
fn config_json(model: &Model, dtype: SaveDtype, cfg_path: &Path) -> Result<(Value, Config)> {
    let c = &model.config;
    let w = &model.weights;
    let hd = c.head_dim;
    let invalid = |m: String| Err(Error::Invalid(format!("cannot save: {m}")));
    if w.layers.is_empty() {
        return invalid("the model has no layers".into());
    }
    if hd == 0 {
        return invalid("head_dim is 0".into());
    }
    for (i, l) in w.layers.iter().enumerate() {
        if l.q.out_features() % hd != 0 || l.k.out_features() % hd != 0 {
            return invalid(format!(
                "layer {i}: q/k rows {}/{} are not multiples of head_dim {hd}",
                l.q.out_features(),
                l.k.out_features()
            ));
        }
    }
    let specs: Vec<LayerSpec> = w
        .layers
        .iter()
        .map(|l| {
            let mut s = LayerSpec::of_layer(l, hd);
            if l.extra.moe.is_some() {
                // The dense MLP is empty; the experts' widths go to the family keys.
                s.intermediate_size = c.intermediate_size;
            }
            s
        })
        .collect();
    let first = specs[0];
    let uniform = specs.iter().all(|s| *s == first)
        && first.num_attention_heads > 0
        && first.num_key_value_heads > 0
        && first.intermediate_size > 0
        && first
            .num_attention_heads
            .is_multiple_of(first.num_key_value_heads);
    let top = if uniform {
        first
    } else {
        LayerSpec::nominal(c)
    };

    let any_bias = |kinds: &[LinearKind]| {
        w.layers
            .iter()
            .any(|l| kinds.iter().any(|k| l.linear(*k).bias.is_some()))
    };
    let attn_bias = any_bias(&[LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O]);
    let mlp_bias = any_bias(&[LinearKind::Gate, LinearKind::Up, LinearKind::Down]);
    match c.arch {
        Arch::Llama | Arch::Qwen2 if c.sliding_window.is_some() => {
            return invalid(format!(
                "HF {} models have no model-wide sliding window, but this model has one \
                 (a mistral model could carry it, with bias-free linears)",
                c.arch.model_type()
            ))
        }
        Arch::Llama => {}
        Arch::Mistral if attn_bias || mlp_bias => {
            return invalid("HF mistral models have no biases, but this model has some".into())
        }
        Arch::Qwen2 if any_bias(&[LinearKind::O]) || mlp_bias => return invalid(
            "HF qwen2 models have biases only on q/k/v, but this model has o_proj or MLP biases"
                .into(),
        ),
        _ => {}
    }

    let mut j = Map::new();
    j.insert("architectures".into(), json!([c.arch.hf_class()]));
    j.insert("model_type".into(), json!(c.arch.model_type()));
    j.insert("vocab_size".into(), json!(w.embed.rows()));
    j.insert("hidden_size".into(), json!(c.hidden_size));
    j.insert("intermediate_size".into(), json!(top.intermediate_size));
    j.insert("num_hidden_layers".into(), json!(w.layers.len()));
    j.insert("num_attention_heads".into(), json!(top.num_attention_heads));
    j.insert("num_key_value_heads".into(), json!(top.num_key_value_heads));
    j.insert("head_dim".into(), json!(hd));
    j.insert("hidden_act".into(), json!("silu"));
    j.insert(
        "max_position_embeddings".into(),
        json!(c.max_position_embeddings),
    );
    j.insert("rms_norm_eps".into(), json!(c.rms_norm_eps));
    j.insert("rope_theta".into(), json!(c.rope_theta));
    j.insert("rope_scaling".into(), rope_scaling_json(&c.rope_scaling));
    j.insert("tie_word_embeddings".into(), json!(w.lm_head.is_none()));
    match c.arch {
        Arch::Llama => {
            j.insert("attention_bias".into(), json!(attn_bias));
            j.insert("mlp_bias".into(), json!(mlp_bias));
        }
        Arch::Mistral => {
            j.insert("sliding_window".into(), json!(c.sliding_window));
        }
        Arch::Qwen2 => {
            j.insert("use_sliding_window".into(), json!(false));
            j.insert("sliding_window".into(), Value::Null);
        }
        _ => super::save_family::config_keys(model, &mut j, attn_bias),
    }
    j.insert("bos_token_id".into(), json!(c.bos_token_id));
    j.insert("eos_token_id".into(), json!(c.eos_token_id));
    j.insert("torch_dtype".into(), json!(dtype.torch_name()));
    j.insert("dtype".into(), json!(dtype.torch_name()));
    j.insert("use_cache".into(), json!(true));
    if !uniform {
        j.insert(
            LOPPER_LAYERS_KEY.into(),
            serde_json::to_value(&specs).map_err(|e| Error::Invalid(e.to_string()))?,
        );
    }
    for (key, value) in hf::extensions_json(model) {
        j.insert(key, value);
    }
    let json = Value::Object(j);
    // Parse it back exactly as a loader will: catches anything unloadable before writing.
    let written = hf::parse_config(&json, cfg_path)?;
    hf::parse_layer_specs(&json, &written, cfg_path)?;
    hf::parse_extensions(&json, &written, cfg_path)?;
    Ok((json, written))
}

/// Old-style `rope_scaling` (read by transformers 4.x and 5.x alike); `null` when plain.
fn rope_scaling_json(s: &RopeScaling) -> Value {
    match s {
        RopeScaling::Default => Value::Null,
        RopeScaling::Linear { factor } => {
            json!({"type": "linear", "rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "type": "llama3",
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

/// `tokenizer_config.json`: the source's own settings when it had them, with our chat template.
fn tokenizer_config(model: &Model) -> Value {
    let src = model.source.join(hf::TOKENIZER_CONFIG_FILE);
    let mut obj = match hf::read_json(&src, |p, m| Error::config(p, m)) {
        Ok(Value::Object(o)) if model.source.is_dir() => o,
        _ => {
            let mut o = Map::new();
            if model.tokenizer.is_some() {
                o.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
            }
            o
        }
    };
    match &model.chat_template {
        Some(t) => obj.insert("chat_template".into(), json!(t)),
        None => obj.remove("chat_template"),
    };
    Value::Object(obj)
}

/// The tensors to write, in HF order, checked against the config that will be written.
///
/// Biases the written config requires but the model lacks are written as zeros.
fn tensor_entries<'a>(model: &'a Model, written: &Config, out: &Path) -> Result<Vec<Entry<'a>>> {
    let w = &model.weights;
    let (h, hd, vocab) = (written.hidden_size, written.head_dim, written.vocab_size);
    let mut list = Vec::new();
    let check = |name: &str, t: &Tensor, expected: &[usize]| -> Result<()> {
        if t.shape != expected || t.stored_len() != t.len() {
            return Err(Error::Shape {
                path: out.to_path_buf(),
                tensor: name.to_string(),
                got: t.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    };
    let add = |list: &mut Vec<Entry<'a>>, name: String, t: &'a Tensor, expected: &[usize]| {
        check(&name, t, expected)?;
        list.push(Entry {
            name,
            shape: t.shape.clone(),
            src: Some(t),
            raw: None,
        });
        Ok::<(), Error>(())
    };
    add(&mut list, names::EMBED.into(), &w.embed, &[vocab, h])?;
    for (i, l) in w.layers.iter().enumerate() {
        let spec = LayerSpec::of_layer(l, hd);
        add(
            &mut list,
            names::layer_tensor(i, names::ATTN_NORM),
            &l.attn_norm,
            &[h],
        )?;
        for kind in LinearKind::ALL {
            if super::save_family::skips(model, i, kind) {
                continue;
            }
            let lin = l.linear(kind);
            let shape = spec.linear_shape(kind, h, hd);
            let base = names::linear_module(i, kind);
            if lin.is_factored() {
                for (name, t, expected) in low_rank_entries(lin, &base, shape) {
                    add(&mut list, name, t, &expected)?;
                }
            } else {
                add(&mut list, format!("{base}.weight"), &lin.weight, &shape)?;
            }
            match (&lin.bias, hf::has_bias(written, kind)) {
                (Some(b), true) => add(&mut list, format!("{base}.bias"), b, &shape[..1])?,
                (None, true) => list.push(Entry {
                    name: format!("{base}.bias"),
                    shape: vec![shape[0]],
                    src: None,
                    raw: None,
                }),
                (Some(_), false) => {
                    return Err(Error::Invalid(format!(
                        "cannot save: {base} has a bias that {} cannot store",
                        written.arch.model_type()
                    )))
                }
                (None, false) => {}
            }
        }
        add(
            &mut list,
            names::layer_tensor(i, names::MLP_NORM),
            &l.mlp_norm,
            &[h],
        )?;
        for (name, t) in shortcut_entries(l, i) {
            add(&mut list, name, t, &[h, h])?;
        }
    }
    add(&mut list, names::FINAL_NORM.into(), &w.final_norm, &[h])?;
    if let Some(head) = &w.lm_head {
        add(&mut list, names::LM_HEAD.into(), head, &[vocab, h])?;
    }
    Ok(list)
}

/// The two factors of low-rank linear `lin` (dense shape `[out, in]`) with their names and
/// expected shapes: `<base>.low_rank.0.weight` `V` `[rank, in]`, `<base>.low_rank.1.weight`
/// `U` `[out, rank]` (see [`crate::io::hf`]).
fn low_rank_entries<'a>(
    lin: &'a Linear,
    base: &str,
    [out, inp]: [usize; 2],
) -> Vec<(String, &'a Tensor, Vec<usize>)> {
    let rank = lin.rank().unwrap_or(0);
    let mut v = vec![(format!("{base}.{LOW_RANK_V}"), &lin.weight, vec![rank, inp])];
    if let Some(u) = lin.left_factor() {
        v.push((format!("{base}.{LOW_RANK_U}"), u, vec![out, rank]));
    }
    v
}

/// The residual shortcuts of layer `l` (block `i`), with their names.
fn shortcut_entries(l: &LayerWeights, i: usize) -> Vec<(String, &Tensor)> {
    [
        (ATTN_SHORTCUT, &l.attn_shortcut),
        (MLP_SHORTCUT, &l.mlp_shortcut),
    ]
    .into_iter()
    .filter_map(|(name, t)| t.as_ref().map(|t| (names::layer_tensor(i, name), t)))
    .collect()
}

/// Stream `entries` into a safetensors file at `path`.
fn write_entries(path: &Path, entries: &[Entry], dtype: SaveDtype) -> Result<()> {
    let err = |e: std::io::Error| Error::Output {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for e in entries {
        let n: usize = e.shape.iter().product();
        if let Some(t) = e.src {
            if t.stored_len() != n {
                return Err(Error::Invalid(format!(
                    "tensor `{}` has {} values for shape {:?}",
                    e.name,
                    t.stored_len(),
                    e.shape
                )));
            }
        }
        let (bytes, dname) = match e.raw {
            Some(r) => (r.data.len() as u64, raw_dtype_name(r.dtype)),
            None => ((n * dtype.size()) as u64, dtype.safetensors_name()),
        };
        let prev = header.insert(
            e.name.clone(),
            json!({"dtype": dname, "shape": e.shape, "data_offsets": [offset, offset + bytes]}),
        );
        if prev.is_some() {
            return Err(Error::Invalid(format!(
                "tensor `{}` is listed twice",
                e.name
            )));
        }
        offset += bytes;
    }
    let mut head =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Invalid(e.to_string()))?;
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(err)?;
    let mut wtr = std::io::BufWriter::with_capacity(1 << 20, file);
    wtr.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(err)?;
    wtr.write_all(&head).map_err(err)?;
    const CHUNK: usize = 1 << 16;
    let zeros = vec![0f32; CHUNK];
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK * 4);
    for e in entries {
        if let Some(r) = e.raw {
            wtr.write_all(&r.data).map_err(err)?;
            continue;
        }
        let n: usize = e.shape.iter().product();
        let data = e.src.map(Tensor::values);
        let mut done = 0;
        while done < n {
            let m = CHUNK.min(n - done);
            let vals = match &data {
                Some(d) => &d[done..done + m],
                None => &zeros[..m],
            };
            encode(vals, dtype, &mut buf);
            wtr.write_all(&buf).map_err(err)?;
            done += m;
        }
        // A mapped source need not stay resident once written (large models).
        if let Some(t) = e.src {
            t.release_pages();
        }
    }
    let file = wtr.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)
}

/// Little-endian bytes of `vals` in `dtype` (round to nearest even for f16 / bf16) into `buf`.
fn encode(vals: &[f32], dtype: SaveDtype, buf: &mut Vec<u8>) {
    buf.clear();
    match dtype {
        SaveDtype::F32 => {
            if cfg!(target_endian = "little") {
                buf.extend_from_slice(bytemuck::cast_slice(vals));
            } else {
                vals.iter()
                    .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            }
        }
        SaveDtype::F16 => {
            let mut h = vec![f16::ZERO; vals.len()];
            h.convert_from_f32_slice(vals);
            h.iter()
                .for_each(|v| buf.extend_from_slice(&v.to_bits().to_le_bytes()));
        }
        SaveDtype::Bf16 => {
            let mut h = vec![bf16::ZERO; vals.len()];
            h.convert_from_f32_slice(vals);
            h.iter()
                .for_each(|v| buf.extend_from_slice(&v.to_bits().to_le_bytes()));
        }
    }
}

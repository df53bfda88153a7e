//! HF model directories: `config.json`, safetensors weights (single or sharded), `tokenizer.json`.
//!
//! [`load_dir`] reads a Llama / Mistral / Qwen2 directory as written by transformers (4.x or 5.x)
//! or by [`crate::io::save::save_hf`]. Weights are memory-mapped: f32 tensors become zero-copy
//! [`Tensor::mapped`] views, f16 / bf16 are converted to owned f32. Every tensor shape is checked
//! against the config before it is used, and every byte range against the file, so a corrupt or
//! mismatched directory gives an error naming the file instead of a panic.
//!
//! Structured pruning makes layers differ; such models carry a lopper extension in `config.json`,
//! `"lopper_layers": [{"num_attention_heads", "num_key_value_heads", "intermediate_size"}, ...]`
//! (one entry per layer, see [`LayerSpec`]). Without it every layer has the nominal shapes.
//!
//! Structured compression adds two more extensions (see [`Extensions`]):
//! - `"lopper_low_rank": {"model.layers.3.mlp.up_proj": 216, ...}`: the rank of every low-rank
//!   linear; its weight is stored as `<linear>.low_rank.0.weight` `[rank, in]` (applied first)
//!   and `<linear>.low_rank.1.weight` `[out, rank]` instead of `<linear>.weight`; a bias stays
//!   `<linear>.bias`.
//! - `"lopper_slicegpt": {"rms_norm_dim": 576, "attn_shortcuts": [0, 1, ...], "mlp_shortcuts":
//!   [...]}`: RMSNorm divides by `rms_norm_dim` (the width before slicing) instead of
//!   `hidden_size`, and the listed layers have residual shortcuts
//!   `model.layers.{i}.attn_shortcut.weight` / `mlp_shortcut.weight`, `[hidden, hidden]` in
//!   linear layout (the residual becomes `h·Sᵀ`).
//!
//! transformers does not know these keys: it cannot run such a model (missing `*.weight`
//! tensors of low-rank linears; sliced models would run without their shortcuts). Use lopper.
//!
//! The safetensors reader ([`SafetensorsFile`], in `hf/safetensors_file.rs`) is public for other
//! tools and tests.

use crate::model::config::{Arch, Config, RopeScaling};
use crate::model::names;
use crate::model::weights::{
    LayerWeights, Linear, LinearKind, Packed, Tensor, Weights, ATTN_SHORTCUT, LOW_RANK_U,
    LOW_RANK_V, MLP_SHORTCUT,
};
use crate::{Error, Model, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub mod family;
pub mod safetensors_file;
pub use safetensors_file::SafetensorsFile;

/// `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// Single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// HF fast tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Tokenizer settings (holds `chat_template` in transformers 4).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Chat template file written by transformers 5.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// The lopper per-layer shape extension key in `config.json`.
pub const LOPPER_LAYERS_KEY: &str = "lopper_layers";

/// Per-layer shapes: what structured pruning changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerSpec {
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
}

impl LayerSpec {
    /// The nominal (unpruned) shapes of `config`.
    pub fn nominal(config: &Config) -> LayerSpec {
        LayerSpec {
            num_attention_heads: config.num_attention_heads,
            num_key_value_heads: config.num_key_value_heads,
            intermediate_size: config.intermediate_size,
        }
    }

    /// The shapes of a loaded layer (head counts from q/k rows divided by `head_dim`).
    pub fn of_layer(layer: &LayerWeights, head_dim: usize) -> LayerSpec {
        LayerSpec {
            num_attention_heads: layer.n_heads(head_dim.max(1)),
            num_key_value_heads: layer.n_kv_heads(head_dim.max(1)),
            intermediate_size: layer.intermediate(),
        }
    }

    /// Expected `[out, in]` weight shape of linear `kind` in a layer with these shapes.
    pub fn linear_shape(&self, kind: LinearKind, hidden: usize, head_dim: usize) -> [usize; 2] {
        let q = self.num_attention_heads * head_dim;
        let kv = self.num_key_value_heads * head_dim;
        let f = self.intermediate_size;
        match kind {
            LinearKind::Q => [q, hidden],
            LinearKind::K | LinearKind::V => [kv, hidden],
            LinearKind::O => [hidden, q],
            LinearKind::Gate | LinearKind::Up => [f, hidden],
            LinearKind::Down => [hidden, f],
        }
    }
}

/// Whether `config` gives linear `kind` a bias.
pub fn has_bias(config: &Config, kind: LinearKind) -> bool {
    match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => config.qkv_bias,
        LinearKind::O => config.o_bias,
        LinearKind::Gate | LinearKind::Up | LinearKind::Down => config.mlp_bias,
    }
}

/// Load an HF model directory.
pub fn load_dir(dir: &Path) -> Result<Model> {
    load_dir_with(dir, false)
}

/// [`load_dir`], with f16 / bf16 tensors converted only when first read when `lazy`
/// ([`super::load_model_with`]).
pub fn load_dir_with(dir: &Path, lazy: bool) -> Result<Model> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        return Err(Error::config(
            &cfg_path,
            format!("not found: {} is not an HF model directory", dir.display()),
        ));
    }
    let json = read_json(&cfg_path, |p, m| Error::config(p, m))?;
    let config = parse_config(&json, &cfg_path)?;
    let specs = parse_layer_specs(&json, &config, &cfg_path)?;
    let ext = parse_extensions(&json, &config, &cfg_path)?;
    let packed = super::packed_load::load_note(&json, &cfg_path)?;
    let mut store = TensorStore::open(dir)?;
    store.lazy = lazy;
    let weights = load_weights(&store, &config, &specs, &ext, &packed)?;
    let tokenizer = load_tokenizer(dir)?;
    let chat_template = load_chat_template(dir)?;
    let mut model = Model {
        config,
        weights,
        tokenizer,
        chat_template,
        source: dir.to_path_buf(),
    };
    super::act_file::load_into(&mut model, dir)?;
    Ok(model)
}

/// Read and parse a JSON file; a parse failure becomes `err(path, msg)`.
pub(crate) fn read_json(path: &Path, err: impl Fn(&Path, String) -> Error) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// Parse an HF `config.json` (transformers 4 or 5 style) into a validated [`Config`].
///
/// `path` names the file in errors. The lopper per-layer extension is read separately by
/// [`parse_layer_specs`].
pub fn parse_config(json: &Value, path: &Path) -> Result<Config> {
    let obj = json
        .as_object()
        .ok_or_else(|| Error::config(path, "the top level is not a JSON object"))?;
    let f = Fields {
        obj,
        path,
        what: "",
    };
    let arch = match f.str("model_type")? {
        Some(t) => Arch::parse(t).ok_or_else(|| Error::UnsupportedArch {
            path: path.to_path_buf(),
            arch: t.to_string(),
            supported: Arch::SUPPORTED,
        })?,
        None => arch_from_architectures(obj, path)?,
    };
    family::check_act(&f, arch)?;
    let hidden_size = f.req_usize("hidden_size")?;
    let num_attention_heads = f.req_usize("num_attention_heads")?;
    let num_key_value_heads = f
        .usize("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    let head_dim = match f.usize("head_dim")? {
        Some(d) => d,
        None => {
            if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                return Err(Error::config(
                    path,
                    format!(
                        "no head_dim and hidden_size {hidden_size} is not a multiple of \
                         num_attention_heads {num_attention_heads}"
                    ),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    let (rope_theta, rope_scaling) = parse_rope(obj, path)?;
    let (qkv_bias, o_bias, mlp_bias) = match arch {
        Arch::Llama => {
            let ab = f.bool("attention_bias")?.unwrap_or(false);
            (ab, ab, f.bool("mlp_bias")?.unwrap_or(false))
        }
        Arch::Qwen3 | Arch::Qwen3Moe | Arch::Gemma3 => {
            let ab = f.bool("attention_bias")?.unwrap_or(false);
            (ab, ab, false)
        }
        Arch::Mistral | Arch::Phi3 | Arch::Mixtral => (false, false, false),
        Arch::Qwen2 => (true, false, false),
    };
    let sliding_window = parse_sliding_window(&f, arch)?;
    let default_max_pos = match arch {
        Arch::Llama => 2048,
        Arch::Phi3 => 4096,
        Arch::Mistral | Arch::Gemma3 | Arch::Mixtral => 131072,
        Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe => 32768,
    };
    let num_hidden_layers = f.req_usize("num_hidden_layers")?;
    let config = Config {
        arch,
        vocab_size: f.req_usize("vocab_size")?,
        hidden_size,
        intermediate_size: f.req_usize("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(1e-6),
        rms_norm_dim: parse_rms_norm_dim(obj, path)?,
        rope_theta,
        rope_scaling,
        max_position_embeddings: f
            .usize("max_position_embeddings")?
            .unwrap_or(default_max_pos),
        sliding_window,
        tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias,
        bos_token_id: f.token_id("bos_token_id")?,
        eos_token_id: f.token_id("eos_token_id")?,
        family: family::parse_family(&f, arch, num_hidden_layers)?,
    };
    config.validate(path)?;
    Ok(config)
}

/// The attention window. Mistral: `sliding_window` (null: none), as transformers'
/// `MistralModel` masks with it. Llama: none (transformers' llama has no window). Qwen2:
/// transformers slides only layers `>= max_window_layers` and only with `use_sliding_window`;
/// a config where that would apply to some layer is refused rather than run without it.
fn parse_sliding_window(f: &Fields<'_>, arch: Arch) -> Result<Option<usize>> {
    match arch {
        Arch::Llama => Ok(None),
        Arch::Mistral | Arch::Phi3 | Arch::Mixtral | Arch::Gemma3 => f.usize("sliding_window"),
        Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe => {
            let on = f.bool("use_sliding_window")?.unwrap_or(false);
            let window = f.usize("sliding_window")?;
            let from = f.usize("max_window_layers")?.unwrap_or(28);
            let layers = f.req_usize("num_hidden_layers")?;
            if on && window.is_some() && from < layers {
                return Err(Error::config(
                    f.path,
                    format!(
                        "{} sliding-window attention on layers {from}..                          (use_sliding_window, max_window_layers {from}) is not supported;                          set use_sliding_window to false to run every layer with full attention",
                        arch.model_type()
                    ),
                ));
            }
            Ok(None)
        }
    }
}

/// Per-layer shapes: the `lopper_layers` extension when present, else the nominal shapes.
pub fn parse_layer_specs(json: &Value, config: &Config, path: &Path) -> Result<Vec<LayerSpec>> {
    let n = config.num_hidden_layers;
    let list = match json.get(LOPPER_LAYERS_KEY) {
        None | Some(Value::Null) => return Ok(vec![LayerSpec::nominal(config); n]),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(Error::config(
                path,
                format!("`{LOPPER_LAYERS_KEY}` must be a list"),
            ))
        }
    };
    if list.len() != n {
        return Err(Error::config(
            path,
            format!(
                "`{LOPPER_LAYERS_KEY}` has {} entries but num_hidden_layers is {n}",
                list.len()
            ),
        ));
    }
    let mut specs = Vec::with_capacity(n);
    for (i, entry) in list.iter().enumerate() {
        let what = format!("{LOPPER_LAYERS_KEY}[{i}].");
        let obj = entry
            .as_object()
            .ok_or_else(|| Error::config(path, format!("{what} is not an object")))?;
        let f = Fields {
            obj,
            path,
            what: &what,
        };
        let spec = LayerSpec {
            num_attention_heads: f.req_usize("num_attention_heads")?,
            num_key_value_heads: f.req_usize("num_key_value_heads")?,
            intermediate_size: f.req_usize("intermediate_size")?,
        };
        let (h, kv) = (spec.num_attention_heads, spec.num_key_value_heads);
        if (kv == 0 && h != 0) || (kv != 0 && h % kv != 0) {
            return Err(Error::config(
                path,
                format!("layer {i}: num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"),
            ));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn arch_from_architectures(obj: &Map<String, Value>, path: &Path) -> Result<Arch> {
    let class = obj
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .ok_or_else(|| Error::config(path, "missing required field `model_type`"))?;
    Arch::ALL
        .into_iter()
        .find(|a| a.hf_class() == class)
        .ok_or_else(|| Error::UnsupportedArch {
            path: path.to_path_buf(),
            arch: class.to_string(),
            supported: Arch::SUPPORTED,
        })
}

/// Both RoPE spellings: transformers 5 `rope_parameters`, or top-level `rope_theta` + `rope_scaling`.
fn parse_rope(obj: &Map<String, Value>, path: &Path) -> Result<(f64, RopeScaling)> {
    let top = Fields {
        obj,
        path,
        what: "",
    };
    let top_theta = top.f64("rope_theta")?;
    let (params, what) = match obj.get("rope_parameters") {
        Some(Value::Object(p)) => {
            // Per-attention-type form ({"full_attention": {...}}) used by some v5 models.
            let p = match p.get("full_attention") {
                Some(Value::Object(inner)) if !p.contains_key("rope_type") => inner,
                _ => p,
            };
            (Some(p), "rope_parameters.")
        }
        None | Some(Value::Null) => match obj.get("rope_scaling") {
            Some(Value::Object(s)) => (Some(s), "rope_scaling."),
            None | Some(Value::Null) => (None, ""),
            Some(_) => {
                return Err(Error::config(
                    path,
                    "`rope_scaling` must be an object or null",
                ))
            }
        },
        Some(_) => {
            return Err(Error::config(
                path,
                "`rope_parameters` must be an object or null",
            ))
        }
    };
    let Some(params) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::Default));
    };
    let f = Fields {
        obj: params,
        path,
        what,
    };
    let theta = f.f64("rope_theta")?.or(top_theta).unwrap_or(10000.0);
    let kind = match f.str("rope_type")? {
        Some(t) => t,
        None => f.str("type")?.unwrap_or("default"),
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: f.req_f64("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f.req_f64("factor")?,
            low_freq_factor: f.req_f64("low_freq_factor")?,
            high_freq_factor: f.req_f64("high_freq_factor")?,
            original_max_position_embeddings: f.req_usize("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::config(
                path,
                format!(
                "{what}rope_type `{other}` is not supported (supported: default, linear, llama3)"
            ),
            ))
        }
    };
    Ok((theta, scaling))
}

/// Typed field access on a JSON object, with errors naming the file and the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
    /// Prefix for field names in messages (e.g. `rope_scaling.`).
    what: &'a str,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn bad(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::config(
            self.path,
            format!("field `{}{key}` must be {want}, got {got}", self.what),
        )
    }
    fn missing(&self, key: &str) -> Error {
        Error::config(
            self.path,
            format!("missing required field `{}{key}`", self.what),
        )
    }
    fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a string", v)),
        }
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", v)),
        }
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| self.missing(key))
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number", v)),
        }
    }
    fn req_f64(&self, key: &str) -> Result<f64> {
        self.f64(key)?.ok_or_else(|| self.missing(key))
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(key, "true or false", v)),
        }
    }
    /// A token id: a number, or a list whose first element is used (HF allows several EOS ids).
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let v = match self.get(key) {
            None => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                None => return Ok(None),
                Some(first) => first,
            },
            Some(v) => v,
        };
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.bad(key, "a token id (or a list of them)", v))
    }
}

// ---------------------------------------------------------------------------------------------
// weights
// ---------------------------------------------------------------------------------------------

/// The safetensors files of a directory and which holds each tensor.
struct TensorStore {
    /// Convert f16 / bf16 tensors only when first read.
    lazy: bool,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    owner: HashMap<String, usize>,
    /// The file named in "missing tensor" errors (the weights file or the shard index).
    root: PathBuf,
}

impl TensorStore {
    fn open(dir: &Path) -> Result<TensorStore> {
        let single = dir.join(WEIGHTS_FILE);
        if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            let owner = file
                .names()
                .into_iter()
                .map(|k| (k.to_string(), 0))
                .collect();
            return Ok(TensorStore {
                lazy: false,
                files: vec![file],
                owner,
                root: single,
            });
        }
        let index = dir.join(INDEX_FILE);
        if !index.is_file() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are supported)"),
                ),
            ));
        }
        let bad = |msg: String| Error::format(&index, "safetensors index", msg);
        let json = read_json(&index, |p, m| Error::format(p, "safetensors index", m))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut shard_names = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                bad(format!(
                    "weight_map entry for `{tensor}` is not a file name"
                ))
            })?;
            let p = Path::new(file);
            let plain = p.components().count() == 1
                && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(bad(format!(
                    "shard `{file}` is not a plain file name in the directory"
                )));
            }
            shard_names.insert(file);
        }
        let shard_names: Vec<&str> = shard_names.into_iter().collect();
        let files = shard_names
            .iter()
            .map(|f| SafetensorsFile::open(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let mut owner = HashMap::with_capacity(map.len());
        for (tensor, file) in map {
            if let Some(i) = shard_names.iter().position(|s| Some(*s) == file.as_str()) {
                owner.insert(tensor.clone(), i);
            }
        }
        Ok(TensorStore {
            lazy: false,
            files,
            owner,
            root: index,
        })
    }

    /// Packed tensor `name` of format `kind` (arrays `<name>.*` in the file holding
    /// `<name>.shape`), checked to be `expected`; see [`super::packed`].
    fn get_packed(&self, name: &str, kind: &str, expected: &[usize]) -> Result<(Tensor, Packed)> {
        let shape = format!("{name}.shape");
        let file = match self.owner.get(&shape) {
            Some(&i) => &self.files[i],
            None => {
                return Err(Error::MissingTensor {
                    path: self.root.clone(),
                    tensor: shape,
                })
            }
        };
        super::packed_load::load_weight(file, name, kind, expected)
    }

    /// The shape of tensor `name`, when present.
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.owner.get(name)?;
        self.files[i].info(name).map(|(_, s)| s.to_vec())
    }

    /// Tensor `name`, checked to have shape `expected`.
    fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let missing = |path: &Path| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
        };
        let file = match self.owner.get(name) {
            Some(&i) => &self.files[i],
            None => return Err(missing(&self.root)),
        };
        let (_, shape) = file.info(name).ok_or_else(|| missing(file.path()))?;
        if shape != expected {
            return Err(Error::shape(file.path(), name, shape, expected));
        }
        if self.lazy {
            file.tensor_lazy(name)
        } else {
            file.tensor(name)
        }
    }
}

fn load_weights(
    store: &TensorStore,
    config: &Config,
    specs: &[LayerSpec],
    ext: &Extensions,
    packed: &BTreeMap<String, String>,
) -> Result<Weights> {
    let (h, hd, vocab) = (config.hidden_size, config.head_dim, config.vocab_size);
    let embed = store.get(names::EMBED, &[vocab, h])?;
    let mut layers = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let lin = |kind: LinearKind| -> Result<Linear> {
            let module = names::linear_module(i, kind);
            let shape = spec.linear_shape(kind, h, hd);
            let bias = if has_bias(config, kind) {
                Some(store.get(&format!("{module}.bias"), &shape[..1])?)
            } else {
                None
            };
            if let Some(&rank) = ext.low_rank.get(&(i, kind)) {
                return load_low_rank(store, &module, shape, rank, bias);
            }
            let name = format!("{module}.weight");
            let (weight, pk) = match packed.get(&name) {
                Some(k) => store
                    .get_packed(&name, k, &shape)
                    .map(|(t, p)| (t, Some(p)))?,
                None => (store.get(&name, &shape)?, None),
            };
            let mut lin = Linear::new(weight, bias);
            lin.packed = pk;
            Ok(lin)
        };
        let [q, k, v, gate, up] = match family::load_fused(store, config, spec, i)? {
            Some(fused) => fused,
            None if config.family.moe.is_some() => {
                let [g, u, _] = family::empty_mlp(h);
                [
                    lin(LinearKind::Q)?,
                    lin(LinearKind::K)?,
                    lin(LinearKind::V)?,
                    g,
                    u,
                ]
            }
            None => [
                lin(LinearKind::Q)?,
                lin(LinearKind::K)?,
                lin(LinearKind::V)?,
                lin(LinearKind::Gate)?,
                lin(LinearKind::Up)?,
            ],
        };
        let down = match config.family.moe {
            Some(_) => family::empty_mlp(h)[2].clone(),
            None => lin(LinearKind::Down)?,
        };
        let mlp_norm = match config.arch {
            Arch::Gemma3 => family::PRE_FFN_NORM,
            _ => names::MLP_NORM,
        };
        layers.push(LayerWeights {
            attn_norm: store.get(&names::layer_tensor(i, names::ATTN_NORM), &[h])?,
            q,
            k,
            v,
            o: lin(LinearKind::O)?,
            mlp_norm: store.get(&names::layer_tensor(i, mlp_norm), &[h])?,
            gate,
            up,
            down,
            attn_shortcut: load_shortcut(store, i, ATTN_SHORTCUT, &ext.attn_shortcuts, h)?,
            mlp_shortcut: load_shortcut(store, i, MLP_SHORTCUT, &ext.mlp_shortcuts, h)?,
            act: None,
            extra: family::load_extra(store, config, i)?,
        });
    }
    let final_norm = store.get(names::FINAL_NORM, &[h])?;
    let head = names::LM_HEAD;
    let (dense_head, lm_head_packed) = match packed.get(head) {
        Some(k) => store
            .get_packed(head, k, &[vocab, h])
            .map(|(t, p)| (Some(t), Some(p)))?,
        None => (None, None),
    };
    let lm_head = if config.tie_word_embeddings {
        None
    } else {
        match dense_head {
            Some(t) => Some(t),
            None => Some(store.get(head, &[vocab, h])?),
        }
    };
    let mut weights = Weights {
        embed,
        layers,
        final_norm,
        lm_head,
        lm_head_packed,
        lm_head_screen: None,
        embed_scale: None,
    };
    family::finish(config, &mut weights);
    Ok(weights)
}

// ---------------------------------------------------------------------------------------------
// lopper structured-compression extensions
// ---------------------------------------------------------------------------------------------

/// `config.json` key of the low-rank extension.
pub const LOPPER_LOW_RANK_KEY: &str = "lopper_low_rank";
/// `config.json` key of the SliceGPT extension.
pub const LOPPER_SLICEGPT_KEY: &str = "lopper_slicegpt";

/// The structured-compression extensions of a `config.json` (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Rank of every low-rank linear, by (layer, kind).
    pub low_rank: HashMap<(usize, LinearKind), usize>,
    /// Per layer: whether it has an attention / MLP residual shortcut.
    pub attn_shortcuts: Vec<bool>,
    pub mlp_shortcuts: Vec<bool>,
}

/// `rms_norm_dim` of the SliceGPT extension, when present (read into [`Config::rms_norm_dim`]).
fn parse_rms_norm_dim(obj: &Map<String, Value>, path: &Path) -> Result<Option<usize>> {
    match obj.get(LOPPER_SLICEGPT_KEY) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Fields {
            obj: o,
            path,
            what: "lopper_slicegpt.",
        }
        .usize("rms_norm_dim"),
        Some(_) => Err(Error::config(
            path,
            format!("`{LOPPER_SLICEGPT_KEY}` must be an object"),
        )),
    }
}

/// Read the low-rank and shortcut extensions (absent keys: none).
pub fn parse_extensions(json: &Value, config: &Config, path: &Path) -> Result<Extensions> {
    let n = config.num_hidden_layers;
    let mut ext = Extensions {
        low_rank: HashMap::new(),
        attn_shortcuts: vec![false; n],
        mlp_shortcuts: vec![false; n],
    };
    match json.get(LOPPER_LOW_RANK_KEY) {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (module, rank) in map {
                let key = names::parse_linear_module(module, n).ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "`{LOPPER_LOW_RANK_KEY}`: `{module}` is not a linear of this model \
                             (expected model.layers.<0..{n}>.<self_attn|mlp>.<name>_proj)"
                        ),
                    )
                })?;
                let r = rank.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "`{LOPPER_LOW_RANK_KEY}.{module}` must be a positive rank, got {rank}"
                        ),
                    )
                })?;
                ext.low_rank.insert(key, r as usize);
            }
        }
        Some(_) => {
            return Err(Error::config(
                path,
                format!("`{LOPPER_LOW_RANK_KEY}` must be an object"),
            ))
        }
    }
    if let Some(Value::Object(o)) = json.get(LOPPER_SLICEGPT_KEY) {
        for (key, flags) in [
            ("attn_shortcuts", &mut ext.attn_shortcuts),
            ("mlp_shortcuts", &mut ext.mlp_shortcuts),
        ] {
            let list = match o.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(a)) => a,
                Some(_) => {
                    return Err(Error::config(
                        path,
                        format!("`{LOPPER_SLICEGPT_KEY}.{key}` must be a list of layer indices"),
                    ))
                }
            };
            for v in list {
                match v.as_u64().map(|i| i as usize).filter(|&i| i < n) {
                    Some(i) => flags[i] = true,
                    None => {
                        return Err(Error::config(
                            path,
                            format!(
                                "`{LOPPER_SLICEGPT_KEY}.{key}`: {v} is not a layer index below {n}"
                            ),
                        ))
                    }
                }
            }
        }
    }
    Ok(ext)
}

/// The extension entries `config.json` needs for `model` (none for an ordinary model).
pub fn extensions_json(model: &Model) -> Vec<(String, Value)> {
    let w = &model.weights;
    let mut out = Vec::new();
    let mut ranks = Map::new();
    for (i, l) in w.layers.iter().enumerate() {
        for kind in LinearKind::ALL {
            if let Some(r) = l.linear(kind).rank() {
                ranks.insert(names::linear_module(i, kind), r.into());
            }
        }
    }
    if !ranks.is_empty() {
        out.push((LOPPER_LOW_RANK_KEY.to_string(), Value::Object(ranks)));
    }
    let layers_with = |f: fn(&LayerWeights) -> bool| -> Vec<usize> {
        (0..w.layers.len()).filter(|&i| f(&w.layers[i])).collect()
    };
    let attn = layers_with(|l| l.attn_shortcut.is_some());
    let mlp = layers_with(|l| l.mlp_shortcut.is_some());
    let c = &model.config;
    if c.rms_norm_dim.is_some() || !attn.is_empty() || !mlp.is_empty() {
        let mut o = Map::new();
        o.insert("rms_norm_dim".into(), c.norm_dim().into());
        o.insert("attn_shortcuts".into(), attn.into());
        o.insert("mlp_shortcuts".into(), mlp.into());
        out.push((LOPPER_SLICEGPT_KEY.to_string(), Value::Object(o)));
    }
    out
}

/// A low-rank linear `base` of dense shape `[out, in]`.
fn load_low_rank(
    store: &TensorStore,
    base: &str,
    [out, inp]: [usize; 2],
    rank: usize,
    bias: Option<Tensor>,
) -> Result<Linear> {
    let v = store.get(&format!("{base}.{LOW_RANK_V}"), &[rank, inp])?;
    let u = store.get(&format!("{base}.{LOW_RANK_U}"), &[out, rank])?;
    Ok(Linear::low_rank(u, v, bias))
}

/// Shortcut `name` of layer `i` `[h, h]`, when `flags[i]` says it has one.
fn load_shortcut(
    store: &TensorStore,
    i: usize,
    name: &str,
    flags: &[bool],
    h: usize,
) -> Result<Option<Tensor>> {
    if !flags.get(i).copied().unwrap_or(false) {
        return Ok(None);
    }
    store.get(&names::layer_tensor(i, name), &[h, h]).map(Some)
}

// ---------------------------------------------------------------------------------------------
// tokenizer
// ---------------------------------------------------------------------------------------------

fn load_tokenizer(dir: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| Error::Tokenizer {
            path,
            msg: format!("cannot load: {e}"),
        })
}

/// `chat_template.jinja` (transformers 5), else `chat_template` of `tokenizer_config.json`.
fn load_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join(CHAT_TEMPLATE_FILE);
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let json = read_json(&path, |p, msg| Error::Tokenizer {
        path: p.to_path_buf(),
        msg,
    })?;
    Ok(match json.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // Older form: a list of {"name", "template"}; prefer "default".
        Some(Value::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
            };
            named("default")
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)
        }
        _ => None,
    })
}

//! GGUF model files (llama.cpp's format): read a Llama-family model into f32 [`Weights`].
//!
//! Parsing uses candle's `gguf_file` reader; every tensor is dequantized on its own (in
//! parallel) straight to f32 and, for the `llama` family, its q/k rows are un-permuted from
//! llama.cpp's interleaved-RoPE order back into the Hugging Face layout (see [`unpermute_rows`]),
//! so the result is the same model `transformers` would load from this file.
//!
//! Corrupt input never panics: every failure is an [`Error`] naming the file and the problem
//! (truncation, bad magic, data past the end of the file, unknown quantization types, shapes that
//! disagree with the metadata, missing tensors, unknown architectures).

use crate::model::config::{Arch, Config, RopeScaling};
use crate::model::weights::{LayerWeights, Linear, Tensor, Weights};
use crate::{Error, Model, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const FORMAT: &str = "GGUF";

/// An opened GGUF file: its parsed header (metadata and tensor directory), tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file_size: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Parse the header of `path` (magic, metadata, tensor directory); tensor data is not read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 4];
        if file_size < 4 || reader.read_exact(&mut magic).is_err() {
            return Err(Error::format(path, FORMAT, format!("file is too short ({file_size} bytes) to be GGUF (truncated?)")));
        }
        if &magic != b"GGUF" {
            return Err(Error::format(path, FORMAT, format!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file")));
        }
        reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        // candle divides by `general.alignment` unchecked; turn any such panic into an error.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if let Some((tensor, id)) = find_unknown_dtype(path) {
                    return Err(Error::UnsupportedDtype {
                        path: path.into(),
                        tensor,
                        dtype: ggml_type_name(id),
                    });
                }
                return Err(Error::format(
                    path,
                    FORMAT,
                    format!("cannot read the header and metadata (truncated or corrupt file): {}", candle_msg(&e)),
                ));
            }
            Err(_) => {
                return Err(Error::format(path, FORMAT, "corrupt header (invalid general.alignment?)"));
            }
        };
        if content.tensor_data_offset > file_size {
            return Err(Error::format(
                path,
                FORMAT,
                format!("tensor data would start at byte {} but the file has only {file_size} bytes (truncated)", content.tensor_data_offset),
            ));
        }
        Ok(GgufFile { path: path.into(), content, file_size })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Names of all tensors in the file (unordered).
    pub fn tensor_names(&self) -> Vec<&str> {
        self.content.tensor_infos.keys().map(|s| s.as_str()).collect()
    }

    /// Whether the file has tensor `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Stored type and shape (row-major, PyTorch order: `[out, in]` for matrices) of `name`.
    pub fn tensor_info(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        let info = self.content.tensor_infos.get(name)?;
        Some((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// Read tensor `name` and dequantize it to f32, in the file's own row order.
    pub fn read_tensor(&self, name: &str) -> Result<Tensor> {
        let path = &self.path;
        let info = self.content.tensor_infos.get(name).ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            tensor: name.into(),
        })?;
        let dtype = info.ggml_dtype;
        let unsupported = || Error::UnsupportedDtype {
            path: path.clone(),
            tensor: name.into(),
            dtype: format!("{dtype:?}"),
        };
        if !is_supported(dtype) {
            return Err(unsupported());
        }
        let dims = info.shape.dims().to_vec();
        let bad = |msg: String| Error::format(path, FORMAT, format!("tensor `{name}`: {msg}"));
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {dims:?} is too large")))?;
        let block = dtype.block_size();
        if elems % block != 0 {
            return Err(bad(format!("{elems} elements is not a multiple of the {dtype:?} block size {block}")));
        }
        let bytes = (elems / block) as u64 * dtype.type_size() as u64;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        match start.and_then(|s| s.checked_add(bytes)) {
            Some(end) if end <= self.file_size => {}
            _ => {
                return Err(bad(format!(
                    "its data ({bytes} bytes at offset {}) extends past the end of the file ({} bytes): truncated or corrupt file",
                    self.content.tensor_data_offset as u128 + info.offset as u128,
                    self.file_size
                )))
            }
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let q = info
            .read(&mut reader, self.content.tensor_data_offset, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("cannot read data: {}", candle_msg(&e))))?;
        let data = q
            .dequantize(&candle_core::Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| bad(format!("cannot dequantize {dtype:?}: {}", candle_msg(&e))))?;
        if data.len() != elems {
            return Err(bad(format!("dequantized to {} values, expected {elems}", data.len())));
        }
        Ok(Tensor::new(dims, data))
    }
}

/// Types this loader dequantizes (candle's GGUF reader builds all of these).
fn is_supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(t, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K)
}

/// The message of a candle error without backtrace wrappers; EOF is reported as truncation.
fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "unexpected end of file (the file is truncated)".into()
        }
        other => other.to_string(),
    }
}

/// Name of a ggml type id, for messages.
fn ggml_type_name(id: u32) -> String {
    let name = match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    format!("ggml type id {id} ({name})")
}

/// After candle rejected a header, find the first tensor whose type id candle does not know.
/// A light re-walk of the GGUF header; any inconsistency just yields `None`.
fn find_unknown_dtype(path: &Path) -> Option<(String, u32)> {
    let mut r = BufReader::new(std::fs::File::open(path).ok()?);
    let u32_ = |r: &mut BufReader<std::fs::File>| -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut BufReader<std::fs::File>| -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let _magic = u32_(&mut r)?;
    let v1 = u32_(&mut r)? == 1;
    let len = |r: &mut BufReader<std::fs::File>| if v1 { u32_(r).map(u64::from) } else { u64_(r) };
    let n_tensors = len(&mut r)?;
    let n_kv = len(&mut r)?;
    fn scalar_size(t: u32) -> Option<i64> {
        Some(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4 | 5 | 6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }
    // Skip one value of type `t`; arrays of arrays are not used by real files.
    let skip = |r: &mut BufReader<std::fs::File>, t: u32| -> Option<()> {
        match t {
            8 => {
                let n = len(r)?;
                r.seek_relative(i64::try_from(n).ok()?).ok()
            }
            9 => {
                let et = u32_(r)?;
                let n = len(r)?;
                if et == 8 {
                    for _ in 0..n {
                        let l = len(r)?;
                        r.seek_relative(i64::try_from(l).ok()?).ok()?;
                    }
                    Some(())
                } else {
                    let n = i64::try_from(n).ok()?.checked_mul(scalar_size(et)?)?;
                    r.seek_relative(n).ok()
                }
            }
            t => r.seek_relative(scalar_size(t)?).ok(),
        }
    };
    for _ in 0..n_kv {
        let l = len(&mut r)?;
        r.seek_relative(i64::try_from(l).ok()?).ok()?;
        let t = u32_(&mut r)?;
        skip(&mut r, t)?;
    }
    for _ in 0..n_tensors {
        let l = usize::try_from(len(&mut r)?).ok()?;
        if l > 1 << 16 {
            return None;
        }
        let mut name = vec![0u8; l];
        r.read_exact(&mut name).ok()?;
        let n_dims = u32_(&mut r)?;
        if n_dims > 4 {
            return None;
        }
        for _ in 0..n_dims {
            len(&mut r)?;
        }
        let t = u32_(&mut r)?;
        let known = matches!(t, 0..=3 | 6..=15 | 30);
        if !known {
            return Some((String::from_utf8_lossy(&name).into_owned(), t));
        }
        u64_(&mut r)?;
    }
    None
}

/// Undo llama.cpp's q/k row permutation: GGUF row `h·hd + 2i + j` becomes HF row
/// `h·hd + j·hd/2 + i` (`i < hd/2`, `j ∈ {0,1}`), for each of `n_heads` heads of `head_dim` rows
/// of `cols` values (`cols = 1` for a bias).
pub fn unpermute_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    move_rows(data, n_heads, head_dim, cols, false)
}

/// llama.cpp's q/k row permutation (HF → GGUF), the inverse of [`unpermute_rows`]:
/// `w.reshape(n_heads, 2, head_dim/2, cols).swapaxes(1, 2)`.
pub fn permute_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    move_rows(data, n_heads, head_dim, cols, true)
}

fn move_rows(data: &[f32], n_heads: usize, head_dim: usize, cols: usize, to_gguf: bool) -> Vec<f32> {
    assert_eq!(data.len(), n_heads * head_dim * cols, "permute: data does not match heads×head_dim×cols");
    assert!(head_dim % 2 == 0, "permute: head_dim must be even");
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * head_dim + 2 * i + j;
                let hf = h * head_dim + j * half + i;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

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
        Error::format(self.path, FORMAT, format!("metadata `{key}` has unexpected value {v:?}"))
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
        n.and_then(|n| usize::try_from(n).ok()).ok_or_else(|| self.bad(key, v))
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
                        format!("metadata `{key}` has {} entries for {n_layers} layers", a.len()),
                    ));
                }
                a.iter().map(|v| self.int_of(key, v)).collect::<Result<Vec<_>>>().map(Some)
            }
            Some(v) => Ok(Some(vec![self.int_of(key, v)?; n_layers])),
        }
    }

    fn required(&self, key: &str) -> Error {
        Error::config(self.path, format!("metadata `{key}` is missing"))
    }
}

/// Per-layer shapes as the metadata states them.
struct LayerDims {
    heads: Vec<usize>,
    kv_heads: Vec<usize>,
    ffn: Vec<usize>,
}

/// Build the [`Config`] and per-layer dims from the metadata (and the embedding's shape).
fn read_config(f: &GgufFile) -> Result<(Config, LayerDims)> {
    let path = f.path();
    let map = f.metadata();
    let arch_name = match map.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => return Err(Error::format(path, FORMAT, format!("metadata `general.architecture` is {v:?}, not a string"))),
        None => return Err(Error::config(path, "metadata `general.architecture` is missing")),
    };
    let arch = Arch::parse(&arch_name).ok_or_else(|| Error::UnsupportedArch {
        path: path.into(),
        arch: arch_name.clone(),
        supported: Arch::SUPPORTED,
    })?;
    let m = Meta { map, path, arch: &arch_name };
    let req = |k: &str| -> Result<usize> { m.int(&m.key(k))?.ok_or_else(|| m.required(&m.key(k))) };
    let n_layers = req("block_count")?;
    let hidden = req("embedding_length")?;
    let layer = |k: &str| m.per_layer(&m.key(k), n_layers);
    let heads = layer("attention.head_count")?.ok_or_else(|| m.required(&m.key("attention.head_count")))?;
    let kv_heads = layer("attention.head_count_kv")?.unwrap_or_else(|| heads.clone());
    let ffn = layer("feed_forward_length")?.ok_or_else(|| m.required(&m.key("feed_forward_length")))?;
    let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
    let n_heads = max(&heads);
    let head_dim = match m.int(&m.key("attention.key_length"))? {
        Some(d) => d,
        None if n_heads > 0 => hidden / n_heads,
        None => 0,
    };
    if let Some(vd) = m.int(&m.key("attention.value_length"))? {
        if vd != head_dim {
            return Err(Error::config(path, format!("value_length {vd} differs from key_length {head_dim}; not supported")));
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
            return Err(Error::config(path, format!("RoPE scaling type `{other}` is not supported (supported: none, linear, llama3)")))
        }
    };
    if let (RopeScaling::Default, Some(f)) = (&rope_scaling, m.float(&m.key("rope.scale_linear"))?) {
        if f != 1.0 {
            rope_scaling = RopeScaling::Linear { factor: f };
        }
    }
    if f.has_tensor("rope_freqs.weight") {
        let orig = m.int(&m.key("rope.scaling.original_context_length"))?.unwrap_or(8192);
        rope_scaling = llama3_from_rope_freqs(&f.read_tensor("rope_freqs.weight")?, head_dim, rope_theta, orig)
            .ok_or_else(|| Error::config(path, "tensor `rope_freqs.weight` does not match Llama 3 RoPE scaling (low 1, high 4); other per-frequency factors are not supported"))?;
    }
    let vocab_size = match m.int(&m.key("vocab_size"))? {
        Some(v) => v,
        None => match map.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => f.tensor_info("token_embd.weight").map(|(_, s)| s[0]).unwrap_or(0),
        },
    };
    let token = |k: &str| -> Result<Option<u32>> {
        Ok(m.int(k)?.and_then(|v| u32::try_from(v).ok()))
    };
    let has = |suffix: &str| (0..n_layers).any(|i| f.has_tensor(&format!("blk.{i}.{suffix}")));
    let config = Config {
        arch,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: max(&ffn),
        num_hidden_layers: n_layers,
        num_attention_heads: n_heads,
        num_key_value_heads: max(&kv_heads),
        head_dim,
        rms_norm_eps: m.float(&m.key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta,
        rope_scaling,
        max_position_embeddings: m.int(&m.key("context_length"))?.unwrap_or(2048),
        tie_word_embeddings: !f.has_tensor("output.weight"),
        qkv_bias: arch == Arch::Qwen2 || has("attn_q.bias"),
        o_bias: has("attn_output.bias"),
        mlp_bias: has("ffn_up.bias"),
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token("tokenizer.ggml.eos_token_id")?,
    };
    config.validate(path)?;
    for (i, (&h, &kv)) in heads.iter().zip(&kv_heads).enumerate() {
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(Error::config(path, format!("layer {i}: {h} query heads and {kv} KV heads are not a valid grouping")));
        }
    }
    Ok((config, LayerDims { heads, kv_heads, ffn }))
}

/// Recognise llama.cpp's `rope_freqs.weight` (per-frequency divisors baked by the converter for
/// Llama 3.1+) as [`RopeScaling::Llama3`] with the standard low/high factors 1 and 4.
fn llama3_from_rope_freqs(t: &Tensor, head_dim: usize, theta: f64, orig: usize) -> Option<RopeScaling> {
    let got = t.data();
    if got.len() != head_dim / 2 || got.is_empty() {
        return None;
    }
    let factor = got.iter().copied().fold(f32::MIN, f32::max) as f64;
    let want = llama3_rope_factors(head_dim, theta, factor, 1.0, 4.0, orig);
    let ok = got.iter().zip(&want).all(|(g, w)| ((*g as f64) - w).abs() <= 1e-3 * w.abs().max(1.0));
    ok.then_some(RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: orig,
    })
}

/// The per-frequency divisors llama.cpp's converter stores for Llama 3 RoPE scaling.
pub fn llama3_rope_factors(head_dim: usize, theta: f64, factor: f64, low: f64, high: f64, orig: usize) -> Vec<f64> {
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

/// One tensor to load: name, expected shape, heads to un-permute by, whether it may be absent.
struct Job {
    name: String,
    shape: Vec<usize>,
    unpermute_heads: Option<usize>,
    optional: bool,
}

/// Load a GGUF model file: config, f32 weights in HF layout, tokenizer and chat template.
pub fn load(path: &Path) -> Result<Model> {
    let f = GgufFile::open(path)?;
    let (config, dims) = read_config(&f)?;
    let (hidden, hd) = (config.hidden_size, config.head_dim);
    let permuted = matches!(config.arch, Arch::Llama | Arch::Mistral);
    let mut jobs = Vec::new();
    let mut job = |name: String, shape: Vec<usize>, heads: Option<usize>, optional: bool| {
        let unpermute_heads = heads.filter(|_| permuted);
        jobs.push(Job { name, shape, unpermute_heads, optional });
    };
    job("token_embd.weight".into(), vec![config.vocab_size, hidden], None, false);
    for i in 0..config.num_hidden_layers {
        let (nh, nkv, ff) = (dims.heads[i], dims.kv_heads[i], dims.ffn[i]);
        let p = format!("blk.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, heads: Option<usize>| {
            job(format!("{p}.{name}.weight"), vec![out, inp], heads, false);
            job(format!("{p}.{name}.bias"), vec![out], heads, true);
        };
        lin("attn_q", nh * hd, hidden, Some(nh));
        lin("attn_k", nkv * hd, hidden, Some(nkv));
        lin("attn_v", nkv * hd, hidden, None);
        lin("attn_output", hidden, nh * hd, None);
        lin("ffn_gate", ff, hidden, None);
        lin("ffn_up", ff, hidden, None);
        lin("ffn_down", hidden, ff, None);
        job(format!("{p}.attn_norm.weight"), vec![hidden], None, false);
        job(format!("{p}.ffn_norm.weight"), vec![hidden], None, false);
    }
    job("output_norm.weight".into(), vec![hidden], None, false);
    job("output.weight".into(), vec![config.vocab_size, hidden], None, true);

    // Check presence and shapes before reading any data.
    for j in &jobs {
        match f.tensor_info(&j.name) {
            None if j.optional => {}
            None => return Err(Error::MissingTensor { path: path.into(), tensor: j.name.clone() }),
            Some((_, got)) if got != j.shape => {
                return Err(Error::Shape { path: path.into(), tensor: j.name.clone(), got, expected: j.shape.clone() })
            }
            Some(_) => {}
        }
    }
    let loaded: Vec<Option<Tensor>> = jobs
        .par_iter()
        .map(|j| {
            if !f.has_tensor(&j.name) {
                return Ok(None);
            }
            let mut t = f.read_tensor(&j.name)?;
            if let Some(heads) = j.unpermute_heads {
                let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                let data = unpermute_rows(t.data(), heads, hd, cols);
                t = Tensor::new(t.shape.clone(), data);
            }
            Ok(Some(t))
        })
        .collect::<Result<_>>()?;
    let mut by_name: HashMap<String, Tensor> = jobs
        .iter()
        .zip(loaded)
        .filter_map(|(j, t)| t.map(|t| (j.name.clone(), t)))
        .collect();
    let mut take = |name: &str| -> Result<Tensor> {
        by_name.remove(name).ok_or_else(|| Error::MissingTensor { path: path.into(), tensor: name.into() })
    };
    let embed = take("token_embd.weight")?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let mut lin = |name: &str| -> Result<Linear> {
            let weight = take(&format!("{p}.{name}.weight"))?;
            let bias = take(&format!("{p}.{name}.bias")).ok();
            Ok(Linear { weight, bias })
        };
        let (q, k, v, o) = (lin("attn_q")?, lin("attn_k")?, lin("attn_v")?, lin("attn_output")?);
        let (gate, up, down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
        let attn_norm = take(&format!("{p}.attn_norm.weight"))?;
        let mlp_norm = take(&format!("{p}.ffn_norm.weight"))?;
        layers.push(LayerWeights { attn_norm, q, k, v, o, mlp_norm, gate, up, down });
    }
    let final_norm = take("output_norm.weight")?;
    let lm_head = take("output.weight").ok();
    let chat_template = match f.metadata().get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    // TODO: build the tokenizer with `crate::tokenizer::from_gguf(f.metadata(), path)` once it
    // exists (only when `tokenizer.ggml.tokens` is present).
    let tokenizer = None;
    Ok(Model {
        config,
        weights: Weights { embed, layers, final_norm, lm_head },
        tokenizer,
        chat_template,
        source: path.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_and_matches_formula() {
        let (heads, hd, cols) = (3, 8, 5);
        let data: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
        let gguf = permute_rows(&data, heads, hd, cols);
        assert_eq!(unpermute_rows(&gguf, heads, hd, cols), data);
        assert_eq!(permute_rows(&unpermute_rows(&data, heads, hd, cols), heads, hd, cols), data);
        let half = hd / 2;
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    let hf_row = h * hd + j * half + i;
                    let gguf_row = h * hd + 2 * i + j;
                    assert_eq!(&gguf[gguf_row * cols..][..cols], &data[hf_row * cols..][..cols]);
                }
            }
        }
        // Same as numpy's w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2) for one column.
        let bias: Vec<f32> = (0..hd).map(|x| x as f32).collect();
        assert_eq!(permute_rows(&bias, 1, hd, 1), vec![0., 4., 1., 5., 2., 6., 3., 7.]);
    }

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

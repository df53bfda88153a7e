//! GGUF model files (llama.cpp's format): read a Llama-family model into f32 [`Weights`].
//!
//! Parsing uses candle's `gguf_file` reader; every tensor is dequantized on its own (in
//! parallel) straight to f32 and, for the `llama` family, its q/k rows are un-permuted from
//! llama.cpp's interleaved-RoPE order back into the Hugging Face layout (see [`unpermute_rows`]),
//! so the result is the same model `transformers` would load from this file.
//!
//! The config comes from the `{arch}.*` metadata (`meta`; per-layer arrays for head counts and
//! FFN widths are accepted, the [`Config`](crate::Config) then holds the maxima), the tokenizer
//! from `tokenizer.ggml.*` via [`crate::tokenizer::from_gguf`] (built while the tensors
//! dequantize; a file without `tokenizer.ggml.tokens` loads with no tokenizer).
//!
//! Corrupt input never panics: every failure is an [`Error`] naming the file and the problem
//! (truncation, bad magic, data past the end of the file, unknown quantization types, shapes that
//! disagree with the metadata, missing tensors, unknown architectures).

use crate::model::config::Arch;
use crate::model::weights::{
    split_rows, LayerExtra, LayerWeights, Linear, Source, Tensor, Weights,
};
use crate::{Error, Model, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod meta;
mod scan;

use meta::read_config;
pub use meta::{
    gemma3_default_pattern, gemma3_query_scalar, llama3_rope_factors, GEMMA3_PATTERN_KEY,
};
use scan::{ggml_type_name, prescan};

const FORMAT: &str = "GGUF";

/// An opened GGUF file: its parsed header (metadata and tensor directory), tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file_size: u64,
    /// The whole file, mapped: tensors are read from here (and by lazy tensors, after `self`).
    map: Arc<memmap2::Mmap>,
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
        if file_size < 4 {
            return Err(Error::format(
                path,
                FORMAT,
                format!("file is too short ({file_size} bytes) to be GGUF (truncated?)"),
            ));
        }
        reader
            .read_exact(&mut magic)
            .map_err(|e| Error::io(path, e))?;
        if &magic != b"GGUF" {
            return Err(Error::format(
                path,
                FORMAT,
                format!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file"),
            ));
        }
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let scan = prescan(path);
        if scan.alignment == Some(0) {
            return Err(Error::format(
                path,
                FORMAT,
                "metadata `general.alignment` is 0",
            ));
        }
        // Belt and braces: a candle panic on input we did not foresee becomes an error too.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if let Some((tensor, id)) = scan.unknown_dtype {
                    return Err(Error::UnsupportedDtype {
                        path: path.into(),
                        tensor,
                        dtype: ggml_type_name(id),
                    });
                }
                return Err(Error::format(
                    path,
                    FORMAT,
                    format!(
                        "cannot read the header and metadata (truncated or corrupt file): {}",
                        candle_msg(&e)
                    ),
                ));
            }
            Err(_) => {
                return Err(Error::format(
                    path,
                    FORMAT,
                    "corrupt header (the GGUF parser panicked)",
                ))
            }
        };
        if content.tensor_data_offset > file_size {
            return Err(Error::format(
                path,
                FORMAT,
                format!("tensor data would start at byte {} but the file has only {file_size} bytes (truncated)", content.tensor_data_offset),
            ));
        }
        let file = reader.into_inner();
        // SAFETY: read-only; like every mapped model file, it must not be truncated while in use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(GgufFile {
            path: path.into(),
            content,
            file_size,
            map: Arc::new(map),
        })
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
        self.content
            .tensor_infos
            .keys()
            .map(|s| s.as_str())
            .collect()
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
        let (info, dims) = self.locate(name)?;
        let data = dequantize(&self.map, info, self.content.tensor_data_offset)
            .map_err(|msg| self.bad(name, msg))?;
        Ok(Tensor::new(dims, data))
    }

    /// Tensor `name` as f32 like [`GgufFile::read_tensor`] (then rows un-permuted for
    /// `unpermute = Some((heads, head_dim))`), but dequantized only when first read
    /// ([`crate::model::weights::Storage::Lazy`], from the mapped file): loading a large
    /// quantized model this way holds none of it in memory. Everything that can be wrong with
    /// the tensor is checked here, not when it is read.
    pub fn tensor_lazy(&self, name: &str, unpermute: Option<(usize, usize)>) -> Result<Tensor> {
        let (info, dims) = self.locate(name)?;
        if let Some((heads, hd)) = unpermute {
            let rows = dims.first().copied().unwrap_or(0);
            if rows != heads * hd || hd % 2 != 0 {
                let msg = format!("{rows} rows do not form {heads} heads of {hd} (even) rows");
                return Err(self.bad(name, msg));
            }
        }
        let source = GgufSource {
            map: self.map.clone(),
            info: TensorInfo {
                ggml_dtype: info.ggml_dtype,
                shape: info.shape.clone(),
                offset: info.offset,
            },
            data_offset: self.content.tensor_data_offset,
            unpermute,
            what: format!("{:?} `{name}` in {}", info.ggml_dtype, self.path.display()),
        };
        Ok(Tensor::lazy(dims, Arc::new(source)))
    }

    fn bad(&self, name: &str, msg: String) -> Error {
        Error::format(&self.path, FORMAT, format!("tensor `{name}`: {msg}"))
    }

    /// The directory entry and shape of tensor `name`, after checking its type, its size and
    /// that its data lies inside the file.
    fn locate(&self, name: &str) -> Result<(&TensorInfo, Vec<usize>)> {
        let path = &self.path;
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.clone(),
                tensor: name.into(),
            })?;
        let dtype = info.ggml_dtype;
        if !is_supported(dtype) {
            return Err(Error::UnsupportedDtype {
                path: path.clone(),
                tensor: name.into(),
                dtype: format!("{dtype:?}"),
            });
        }
        let dims = info.shape.dims().to_vec();
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.bad(name, format!("shape {dims:?} is too large")))?;
        let block = dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(self.bad(
                name,
                format!("{elems} elements is not a multiple of the {dtype:?} block size {block}"),
            ));
        }
        // u128: a corrupt shape must not wrap around into a size that fits the file.
        let bytes = (elems / block) as u128 * dtype.type_size() as u128;
        let start = self.content.tensor_data_offset as u128 + info.offset as u128;
        if start + bytes > self.file_size as u128 {
            return Err(self.bad(name, format!(
                "its data ({bytes} bytes at offset {start}) extends past the end of the file ({} bytes): truncated or corrupt file",
                self.file_size
            )));
        }
        Ok((info, dims))
    }
}

/// Dequantize the tensor of `info` from the mapped file to f32 (file row order), then drop the
/// file's pages it read from this process.
fn dequantize(
    map: &memmap2::Mmap,
    info: &TensorInfo,
    data_offset: u64,
) -> std::result::Result<Vec<f32>, String> {
    let dtype = info.ggml_dtype;
    let mut reader = std::io::Cursor::new(&map[..]);
    let q = info
        .read(&mut reader, data_offset, &candle_core::Device::Cpu)
        .map_err(|e| format!("cannot read data: {}", candle_msg(&e)))?;
    // The bytes are copied into `q`: the file's pages need not stay resident.
    let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
    crate::util::drop_pages(map, (data_offset + info.offset) as usize, bytes);
    let data = q
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| format!("cannot dequantize {dtype:?}: {}", candle_msg(&e)))?;
    let elems = info.shape.elem_count();
    if data.len() != elems {
        return Err(format!(
            "dequantized to {} values, expected {elems}",
            data.len()
        ));
    }
    Ok(data)
}

/// [`unpermute_rows`] of whole rows of a q/k weight or bias (its columns follow from its length).
fn hf_rows(data: &[f32], (heads, hd): (usize, usize)) -> Vec<f32> {
    unpermute_rows(data, heads, hd, data.len() / (heads * hd).max(1))
}

/// A GGUF tensor dequantized (and un-permuted) when a lazy tensor is first read.
struct GgufSource {
    map: Arc<memmap2::Mmap>,
    info: TensorInfo,
    data_offset: u64,
    unpermute: Option<(usize, usize)>,
    what: String,
}

impl Source for GgufSource {
    fn values(&self) -> Vec<f32> {
        // `tensor_lazy` checked type, size and bounds; what is left cannot fail on a mapped file.
        let data = dequantize(&self.map, &self.info, self.data_offset)
            .unwrap_or_else(|e| panic!("{}: {e}", self.what));
        match self.unpermute {
            Some(heads_hd) => hf_rows(&data, heads_hd),
            None => data,
        }
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Types this loader dequantizes (candle's GGUF reader builds all of these).
fn is_supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// The message of a candle error without backtrace wrappers; EOF is reported as truncation.
fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "unexpected end of file".into()
        }
        other => other.to_string(),
    }
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

fn move_rows(
    data: &[f32],
    n_heads: usize,
    head_dim: usize,
    cols: usize,
    to_gguf: bool,
) -> Vec<f32> {
    assert_eq!(
        data.len(),
        n_heads * head_dim * cols,
        "permute: data does not match heads×head_dim×cols"
    );
    assert!(head_dim.is_multiple_of(2), "permute: head_dim must be even");
    let half = head_dim / 2;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf = h * head_dim + 2 * i + j;
                let hf = h * head_dim + j * half + i;
                let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
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
    load_with(path, false)
}

/// [`load`]; with `lazy`, each tensor is dequantized only when first read and can be released
/// again ([`GgufFile::tensor_lazy`], [`super::load_model_with`]).
pub fn load_with(path: &Path, lazy: bool) -> Result<Model> {
    let f = GgufFile::open(path)?;
    let (config, dims) = read_config(&f)?;
    let (hidden, hd) = (config.hidden_size, config.head_dim);
    let permuted = matches!(config.arch, Arch::Llama | Arch::Mistral);
    let phi3 = config.arch == Arch::Phi3;
    let mut jobs = Vec::new();
    let mut job = |name: String, shape: Vec<usize>, heads: Option<usize>, optional: bool| {
        let unpermute_heads = heads.filter(|_| permuted);
        jobs.push(Job {
            name,
            shape,
            unpermute_heads,
            optional,
        });
    };
    job(
        "token_embd.weight".into(),
        vec![config.vocab_size, hidden],
        None,
        false,
    );
    for i in 0..config.num_hidden_layers {
        let (nh, nkv, ff) = (dims.heads[i], dims.kv_heads[i], dims.ffn[i]);
        let p = format!("blk.{i}");
        let mut lin = |name: &str, out: usize, inp: usize, heads: Option<usize>| {
            job(format!("{p}.{name}.weight"), vec![out, inp], heads, false);
            job(format!("{p}.{name}.bias"), vec![out], heads, true);
        };
        // Phi-3: fused q/k/v (llama.cpp also accepts them apart) and fused gate/up.
        let fused_qkv = phi3 && f.has_tensor(&format!("{p}.attn_qkv.weight"));
        if fused_qkv {
            lin("attn_qkv", (nh + 2 * nkv) * hd, hidden, None);
        } else {
            lin("attn_q", nh * hd, hidden, Some(nh));
            lin("attn_k", nkv * hd, hidden, Some(nkv));
            lin("attn_v", nkv * hd, hidden, None);
        }
        lin("attn_output", hidden, nh * hd, None);
        if phi3 {
            lin("ffn_up", 2 * ff, hidden, None);
        } else {
            lin("ffn_gate", ff, hidden, None);
            lin("ffn_up", ff, hidden, None);
        }
        lin("ffn_down", hidden, ff, None);
        job(format!("{p}.attn_norm.weight"), vec![hidden], None, false);
        job(format!("{p}.ffn_norm.weight"), vec![hidden], None, false);
        if config.arch.has_qk_norm() {
            job(format!("{p}.attn_q_norm.weight"), vec![hd], None, false);
            job(format!("{p}.attn_k_norm.weight"), vec![hd], None, false);
        }
        if config.arch == Arch::Gemma3 {
            job(
                format!("{p}.post_attention_norm.weight"),
                vec![hidden],
                None,
                false,
            );
            job(
                format!("{p}.post_ffw_norm.weight"),
                vec![hidden],
                None,
                false,
            );
        }
    }
    job("output_norm.weight".into(), vec![hidden], None, false);
    job(
        "output.weight".into(),
        vec![config.vocab_size, hidden],
        None,
        true,
    );

    // Check presence and shapes before reading any data.
    for j in &jobs {
        match f.tensor_info(&j.name) {
            None if j.optional => {}
            None => {
                return Err(Error::MissingTensor {
                    path: path.into(),
                    tensor: j.name.clone(),
                })
            }
            Some((_, got)) if got != j.shape => {
                return Err(Error::Shape {
                    path: path.into(),
                    tensor: j.name.clone(),
                    got,
                    expected: j.shape.clone(),
                })
            }
            Some(_) => {}
        }
    }
    // The tokenizer (vocabulary and merges) is built while the tensors dequantize.
    let meta = f.metadata();
    let (tokenizer, loaded) = rayon::join(
        || -> Result<Option<tokenizers::Tokenizer>> {
            if meta.contains_key("tokenizer.ggml.tokens") {
                crate::tokenizer::from_gguf(meta, path).map(Some)
            } else {
                Ok(None)
            }
        },
        || read_jobs(&f, &jobs, hd, lazy),
    );
    let (tokenizer, loaded) = (tokenizer?, loaded?);
    let mut by_name: HashMap<String, Tensor> = jobs
        .iter()
        .zip(loaded)
        .filter_map(|(j, t)| t.map(|t| (j.name.clone(), t)))
        .collect();
    let mut take = |name: &str| -> Result<Tensor> {
        by_name.remove(name).ok_or_else(|| Error::MissingTensor {
            path: path.into(),
            tensor: name.into(),
        })
    };
    let embed = take("token_embd.weight")?;
    let fused: std::collections::HashSet<String> = jobs
        .iter()
        .filter(|j| j.name.ends_with(".attn_qkv.weight"))
        .map(|j| j.name.clone())
        .collect();
    let by_name_has = |p: &str, n: &str| fused.contains(&format!("{p}.{n}.weight"));
    let embed_scale =
        (config.arch == Arch::Gemma3).then(|| (config.hidden_size as f64).sqrt() as f32);
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("blk.{i}");
        let mut lin = |name: &str| -> Result<Linear> {
            let weight = take(&format!("{p}.{name}.weight"))?;
            let bias = take(&format!("{p}.{name}.bias")).ok();
            Ok(Linear::new(weight, bias))
        };
        let (nq, nkv, ff) = (dims.heads[i] * hd, dims.kv_heads[i] * hd, dims.ffn[i]);
        let [q, k, v] = if by_name_has(&p, "attn_qkv") {
            split_rows(&lin("attn_qkv")?.weight, [nq, nkv, nkv]).map(|t| Linear::new(t, None))
        } else {
            [lin("attn_q")?, lin("attn_k")?, lin("attn_v")?]
        };
        let o = lin("attn_output")?;
        let [gate, up] = if phi3 {
            split_rows(&lin("ffn_up")?.weight, [ff, ff]).map(|t| Linear::new(t, None))
        } else {
            [lin("ffn_gate")?, lin("ffn_up")?]
        };
        let down = lin("ffn_down")?;
        let attn_norm = take(&format!("{p}.attn_norm.weight"))?;
        let mlp_norm = take(&format!("{p}.ffn_norm.weight"))?;
        let extra = LayerExtra {
            q_norm: take(&format!("{p}.attn_q_norm.weight")).ok(),
            k_norm: take(&format!("{p}.attn_k_norm.weight")).ok(),
            post_attn_norm: take(&format!("{p}.post_attention_norm.weight")).ok(),
            post_mlp_norm: take(&format!("{p}.post_ffw_norm.weight")).ok(),
            moe: None,
        };
        layers.push(LayerWeights {
            attn_norm,
            q,
            k,
            v,
            o,
            mlp_norm,
            gate,
            up,
            down,
            attn_shortcut: None,
            mlp_shortcut: None,
            act: None,
            extra,
        });
    }
    let final_norm = take("output_norm.weight")?;
    let lm_head = take("output.weight").ok();
    let chat_template = match f.metadata().get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Model {
        config,
        weights: Weights {
            embed,
            layers,
            final_norm,
            lm_head,
            lm_head_packed: None,
            lm_head_screen: None,
            embed_scale,
        },
        tokenizer,
        chat_template,
        source: path.into(),
    })
}

/// Read, dequantize and (for q/k of the llama family) un-permute every present tensor of `jobs`
/// (with `lazy`, only check them and defer that to the first read).
fn read_jobs(f: &GgufFile, jobs: &[Job], hd: usize, lazy: bool) -> Result<Vec<Option<Tensor>>> {
    jobs.par_iter()
        .map(|j| {
            if !f.has_tensor(&j.name) {
                return Ok(None);
            }
            if lazy {
                let unpermute = j.unpermute_heads.map(|h| (h, hd));
                return f.tensor_lazy(&j.name, unpermute).map(Some);
            }
            let t = f.read_tensor(&j.name)?;
            Ok(Some(match j.unpermute_heads {
                Some(heads) => Tensor::new(t.shape.clone(), hf_rows(t.data(), (heads, hd))),
                None => t,
            }))
        })
        .collect()
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
        assert_eq!(
            permute_rows(&unpermute_rows(&data, heads, hd, cols), heads, hd, cols),
            data
        );
        let half = hd / 2;
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    let hf_row = h * hd + j * half + i;
                    let gguf_row = h * hd + 2 * i + j;
                    assert_eq!(
                        &gguf[gguf_row * cols..][..cols],
                        &data[hf_row * cols..][..cols]
                    );
                }
            }
        }
        // Same as numpy's w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2) for one column.
        let bias: Vec<f32> = (0..hd).map(|x| x as f32).collect();
        assert_eq!(
            permute_rows(&bias, 1, hd, 1),
            vec![0., 4., 1., 5., 2., 6., 3., 7.]
        );
    }
}

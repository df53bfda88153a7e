//! Writing a model as a GGUF file that llama.cpp and lopper load.
//!
//! [`save_gguf`] writes GGUF v3 directly (streamed, one tensor encoded at a time, 32-byte
//! alignment) with llama.cpp's metadata and tensor names:
//!
//! * **Architecture.** Uniform layers are written as `llama` (Mistral too, as llama.cpp's
//!   converter does; Qwen2 as `qwen2` when llama.cpp's `qwen2` graph can hold it: query width =
//!   hidden size, biases on q/k/v only). Layers that differ (structured pruning: per-layer
//!   query heads, KV heads or FFN width) are written as `deci` with `deci.attention.head_count`,
//!   `…head_count_kv` and `deci.feed_forward_length` as per-layer INT32 arrays (llama.cpp refuses UINT32 ones): llama.cpp reads those
//!   arrays for every architecture, but only its `deci` graph (Llama-3.1-Nemotron; otherwise the
//!   llama block, same tensors, same RoPE) builds each layer with its own counts — `llama` takes
//!   layer 0's counts for all layers and rejects the other layers' tensor shapes. lopper's GGUF
//!   loader reads `deci` files as llama.
//! * **RoPE layout.** For `llama` / `deci` the q/k rows (and biases) are permuted into
//!   llama.cpp's interleaved layout ([`permute_rows`]), which the loader undoes; this holds for
//!   a Qwen2 model written as `deci` too (HF's rotate-half RoPE is what the permutation maps).
//! * **Metadata.** `general.architecture`, `general.file_type`, `general.alignment`, the
//!   descriptive `general.*` keys of a GGUF source (not `size_label`), and `{arch}.context_length`,
//!   `embedding_length`, `block_count`, `feed_forward_length`, `attention.head_count`,
//!   `attention.head_count_kv`, `attention.key_length`, `attention.value_length`,
//!   `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `rope.dimension_count`,
//!   `vocab_size`; linear RoPE scaling as `rope.scaling.type`/`factor`; Llama 3 scaling as the
//!   `rope_freqs.weight` tensor (llama.cpp's converter convention) plus
//!   `rope.scaling.original_context_length`.
//! * **Tensors.** `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
//!   ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, and `output` when the head is untied;
//!   `.bias` tensors for the biases present. Matrices in the requested [`GgufDtype`]; norms,
//!   biases and `rope_freqs` in F32.
//! * **Tokenizer.** See [`vocab`]: copied from a GGUF source, else built from the tokenizer; a
//!   model without an expressible tokenizer is written without one and the returned
//!   [`GgufWritten::warnings`] say so. The chat template goes to `tokenizer.chat_template`.
//!
//! Writing is atomic: the file is written beside the output (`.<name>.tmp-<pid>-<n>`), synced and
//! renamed into place; on any failure the temporary file is removed. An existing output is
//! refused unless `force`; the model's own source file is refused even with `force`.
//!
//! What GGUF (llama.cpp's llama/deci/qwen2 graphs) cannot express is refused up front by
//! [`gguf_expressible`]: layers without heads or FFN, shapes that disagree, Llama 3 RoPE factors
//! other than low 1 / high 4. **Extension point:** it destructures [`Linear`] and
//! [`LayerWeights`] exhaustively, so a field added to either (a low-rank factor, a residual
//! shortcut matrix) stops this module compiling until that check decides — such factors have no
//! place in llama.cpp's graphs and must be refused (or multiplied out) there.

mod encode;
mod family;
mod vocab;

pub use encode::{quantize_q8_0_block, round_trip, GgufDtype, QK8_0};
pub use vocab::metadata_from_tokenizer;

use crate::io::gguf::{llama3_rope_factors, permute_rows, GgufFile};
use crate::model::config::{Arch, RopeScaling};
use crate::model::weights::{LayerWeights, Linear, LinearRepr, Tensor};
use crate::{Error, Model, Result};
use candle_core::quantized::gguf_file::Value;
use encode::TType;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Data alignment of the written file (GGUF's default; also written as `general.alignment`).
const ALIGN: usize = 32;
const GGUF_VERSION: u32 = 3;

/// What [`save_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufWritten {
    /// `general.architecture` written: `llama`, `deci` (per-layer shapes) or `qwen2`.
    pub arch: &'static str,
    /// Number of tensors.
    pub tensors: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// Things the file lacks or stores differently than asked (no tokenizer, Q8_0 matrices
    /// written as F16 because their rows are not a multiple of 32).
    pub warnings: Vec<String>,
}

/// Per-layer shape: (query heads, KV heads, FFN width).
type Dims = (usize, usize, usize);

/// Check that `model` is something GGUF / llama.cpp can express; returns each layer's
/// (heads, KV heads, FFN width). See the module docs for what is refused.
pub fn gguf_expressible(model: &Model) -> Result<()> {
    layer_dims(model).map(|_| ())
}

fn layer_dims(model: &Model) -> Result<Vec<Dims>> {
    let c = &model.config;
    let w = &model.weights;
    let no = |m: String| Error::Invalid(format!("cannot write GGUF: {m}"));
    let (h, hd) = (c.hidden_size, c.head_dim);
    if w.layers.is_empty() {
        return Err(no("the model has no layers".into()));
    }
    if hd == 0 || !hd.is_multiple_of(2) {
        return Err(no(format!("head_dim {hd} must be even and positive")));
    }
    let vocab = w.embed.rows();
    let shape = |what: &str, t: &Tensor, want: &[usize]| -> Result<()> {
        if t.shape != want {
            return Err(no(format!(
                "{what} has shape {:?}, expected {want:?}",
                t.shape
            )));
        }
        Ok(())
    };
    shape("token_embd", &w.embed, &[vocab, h])?;
    shape("output_norm", &w.final_norm, &[h])?;
    if let Some(head) = &w.lm_head {
        shape("output", head, &[vocab, h])?;
    }
    let mut dims = Vec::with_capacity(w.layers.len());
    for (i, l) in w.layers.iter().enumerate() {
        // Exhaustive on purpose (see the module docs): new fields must be decided on here.
        let LayerWeights {
            attn_norm,
            q,
            k,
            v,
            o,
            mlp_norm,
            gate,
            up,
            down,
            attn_shortcut,
            mlp_shortcut,
            act: _, // activation thresholds change no tensor; llama.cpp does not apply them
            extra,
        } = l;
        family::check_layer(model, i, extra).map_err(no)?;
        if attn_shortcut.is_some() || mlp_shortcut.is_some() {
            return Err(no(format!(
                "layer {i} has SliceGPT residual shortcut matrices, which llama.cpp has no tensor for (save it as an HF directory instead)"
            )));
        }
        let (qr, kr) = (q.weight.shape[0], k.weight.shape[0]);
        if !qr.is_multiple_of(hd) || !kr.is_multiple_of(hd) {
            return Err(no(format!(
                "layer {i}: q/k rows {qr}/{kr} are not multiples of head_dim {hd}"
            )));
        }
        let (nh, nkv, ff) = (qr / hd, kr / hd, gate.weight.shape[0]);
        if nh == 0 || nkv == 0 || ff == 0 {
            return Err(no(format!(
                "layer {i} has {nh} query heads, {nkv} KV heads and FFN width {ff}; llama.cpp needs all three positive"
            )));
        }
        if !nh.is_multiple_of(nkv) {
            return Err(no(format!(
                "layer {i}: {nh} query heads are not a multiple of {nkv} KV heads"
            )));
        }
        let p = format!("layer {i}");
        shape(&format!("{p} attn_norm"), attn_norm, &[h])?;
        shape(&format!("{p} ffn_norm"), mlp_norm, &[h])?;
        for (name, lin, out, inp) in [
            ("attn_q", q, nh * hd, h),
            ("attn_k", k, nkv * hd, h),
            ("attn_v", v, nkv * hd, h),
            ("attn_output", o, h, nh * hd),
            ("ffn_gate", gate, ff, h),
            ("ffn_up", up, ff, h),
            ("ffn_down", down, h, ff),
        ] {
            // Exhaustive on purpose (see the module docs).
            let Linear {
                weight,
                bias,
                repr,
                packed: _,
            } = lin;
            if let LinearRepr::LowRank { .. } = repr {
                return Err(no(format!(
                    "{p} {name} is a low-rank pair, which llama.cpp cannot run (save it as an HF directory instead)"
                )));
            }
            shape(&format!("{p} {name}"), weight, &[out, inp])?;
            if let Some(b) = bias {
                shape(&format!("{p} {name} bias"), b, &[out])?;
            }
            if weight.data().len() != out * inp {
                return Err(no(format!("{p} {name}: data does not match its shape")));
            }
        }
        dims.push((nh, nkv, ff));
    }
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = c.rope_scaling
    {
        if low_freq_factor != 1.0 || high_freq_factor != 4.0 {
            return Err(no(format!(
                "Llama 3 RoPE scaling with low/high frequency factors {low_freq_factor}/{high_freq_factor} (only 1/4, the llama.cpp converter's `rope_freqs` convention lopper reads back)"
            )));
        }
    }
    family::check_model(model, dims.iter().all(|d| *d == dims[0])).map_err(no)?;
    let too_big = [vocab, h, c.max_position_embeddings, w.layers.len()]
        .into_iter()
        .chain(dims.iter().flat_map(|d| [d.0, d.1, d.2]))
        .any(|x| u32::try_from(x).is_err());
    if too_big {
        return Err(no("a dimension does not fit the u32 metadata".into()));
    }
    Ok(dims)
}

/// Where a tensor's values come from.
enum Src<'a> {
    Plain(&'a Tensor),
    /// q/k weight or bias: rows permuted into llama.cpp's RoPE layout for `heads` heads.
    Permuted(&'a Tensor, usize),
    Owned(Vec<f32>),
}

/// One tensor to write.
struct Planned<'a> {
    name: String,
    /// Row-major shape (`[rows, cols]` for matrices).
    shape: Vec<usize>,
    ttype: TType,
    src: Src<'a>,
}

impl Planned<'_> {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Which llama.cpp architecture to write and whether q/k are permuted.
fn choose_arch(model: &Model, dims: &[Dims]) -> (&'static str, bool) {
    if let Some(name) = family::arch_name(model) {
        return (name, false);
    }
    let uniform = dims.iter().all(|d| *d == dims[0]);
    if !uniform {
        return ("deci", true);
    }
    let w = &model.weights;
    let qwen2_ok = model.config.arch == Arch::Qwen2
        && dims[0].0 * model.config.head_dim == model.config.hidden_size
        && w.layers.iter().all(|l| {
            l.o.bias.is_none()
                && l.gate.bias.is_none()
                && l.up.bias.is_none()
                && l.down.bias.is_none()
        });
    if qwen2_ok {
        ("qwen2", false)
    } else {
        ("llama", true)
    }
}

fn plan<'a>(
    model: &'a Model,
    dims: &[Dims],
    dtype: GgufDtype,
    permute: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<Planned<'a>>> {
    let c = &model.config;
    let w = &model.weights;
    let mut list = Vec::new();
    let mut matrix = |list: &mut Vec<Planned<'a>>,
                      name: String,
                      src: Src<'a>,
                      shape: Vec<usize>| {
        let want = dtype.tensor_type();
        let ttype = if want.fits_row(shape[1]) {
            want
        } else {
            warnings.push(format!(
                "{name}: rows of {} values are not a multiple of {QK8_0}; written as F16 instead of Q8_0",
                shape[1]
            ));
            TType::F16
        };
        list.push(Planned {
            name,
            shape,
            ttype,
            src,
        });
    };
    let vector = |list: &mut Vec<Planned<'a>>, name: String, src: Src<'a>, n: usize| {
        list.push(Planned {
            name,
            shape: vec![n],
            ttype: TType::F32,
            src,
        });
    };
    matrix(
        &mut list,
        "token_embd.weight".into(),
        Src::Plain(&w.embed),
        w.embed.shape.clone(),
    );
    if let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = c.rope_scaling
    {
        let f = llama3_rope_factors(
            c.head_dim,
            c.rope_theta,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        let n = f.len();
        vector(
            &mut list,
            "rope_freqs.weight".into(),
            Src::Owned(f.into_iter().map(|x| x as f32).collect()),
            n,
        );
    }
    for (i, (l, &(nh, nkv, _))) in w.layers.iter().zip(dims).enumerate() {
        let p = format!("blk.{i}");
        vector(
            &mut list,
            format!("{p}.attn_norm.weight"),
            Src::Plain(&l.attn_norm),
            l.attn_norm.len(),
        );
        let fused = family::fused(model, l);
        let is_fused = fused.is_some();
        if let Some((qkv, gate_up)) = fused {
            for (name, t) in [("attn_qkv", qkv), ("ffn_up", gate_up)] {
                let shape = t.shape.clone();
                let vals = match t.data {
                    crate::model::weights::Storage::Owned(v) => v,
                    _ => t.values().into_owned(),
                };
                matrix(
                    &mut list,
                    format!("{p}.{name}.weight"),
                    Src::Owned(vals),
                    shape,
                );
            }
        }
        for (name, t) in family::extra_vectors(&l.extra) {
            vector(
                &mut list,
                format!("{p}.{name}.weight"),
                Src::Plain(t),
                t.len(),
            );
        }
        for (name, lin, heads) in [
            ("attn_q", &l.q, Some(nh)),
            ("attn_k", &l.k, Some(nkv)),
            ("attn_v", &l.v, None),
            ("attn_output", &l.o, None),
            ("ffn_gate", &l.gate, None),
            ("ffn_up", &l.up, None),
            ("ffn_down", &l.down, None),
        ] {
            if is_fused && name != "attn_output" && name != "ffn_down" {
                continue;
            }
            let src = |t: &'a Tensor| match heads.filter(|_| permute) {
                Some(h) => Src::Permuted(t, h),
                None => Src::Plain(t),
            };
            matrix(
                &mut list,
                format!("{p}.{name}.weight"),
                src(&lin.weight),
                lin.weight.shape.clone(),
            );
            if let Some(b) = &lin.bias {
                vector(&mut list, format!("{p}.{name}.bias"), src(b), b.len());
            }
        }
        vector(
            &mut list,
            format!("{p}.ffn_norm.weight"),
            Src::Plain(&l.mlp_norm),
            l.mlp_norm.len(),
        );
    }
    vector(
        &mut list,
        "output_norm.weight".into(),
        Src::Plain(&w.final_norm),
        w.final_norm.len(),
    );
    if let Some(head) = &w.lm_head {
        matrix(
            &mut list,
            "output.weight".into(),
            Src::Plain(head),
            head.shape.clone(),
        );
    }
    Ok(list)
}

/// The metadata to write (tokenizer keys included).
fn metadata(
    model: &Model,
    dims: &[Dims],
    arch: &'static str,
    dtype: GgufDtype,
    warnings: &mut Vec<String>,
) -> Vec<(String, Value)> {
    let c = &model.config;
    let w = &model.weights;
    let n_vocab = w.embed.rows();
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        ("general.alignment".into(), u(ALIGN)),
    ];
    if dtype == GgufDtype::Q8_0 {
        md.push(("general.quantization_version".into(), Value::U32(2)));
    }
    md.extend(source_general(model));
    let k = |s: &str| format!("{arch}.{s}");
    // Per-layer arrays are INT32, as llama.cpp's own writer stores them: its loader
    // (`get_arr`) accepts only INT32 and FLOAT32 arrays and refuses UINT32 ones.
    let per_layer = |f: fn(&Dims) -> usize| -> Value {
        if arch == "deci" {
            Value::Array(dims.iter().map(|d| Value::I32(f(d) as i32)).collect())
        } else {
            u(f(&dims[0]))
        }
    };
    md.extend([
        (k("context_length"), u(c.max_position_embeddings)),
        (k("embedding_length"), u(c.hidden_size)),
        (k("block_count"), u(w.layers.len())),
        (k("feed_forward_length"), per_layer(|d| d.2)),
        (k("attention.head_count"), per_layer(|d| d.0)),
        (k("attention.head_count_kv"), per_layer(|d| d.1)),
        (k("attention.key_length"), u(c.head_dim)),
        (k("attention.value_length"), u(c.head_dim)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.dimension_count"), u(c.head_dim)),
        (k("vocab_size"), u(n_vocab)),
    ]);
    md.extend(family::metadata(model, arch, warnings));
    if let Some(w) = c.sliding_window {
        // lopper reads it back; llama.cpp's llama graph does not apply it (its gemma3 and phi3
        // graphs do).
        md.push((k("attention.sliding_window"), u(w)));
    }
    if let Some(w) = c
        .sliding_window
        .filter(|_| matches!(arch, "llama" | "deci" | "qwen2"))
    {
        warnings.push(format!(
            "sliding window of {w} written as `{arch}.attention.sliding_window`: lopper reads \
             it back, but llama.cpp's {arch} graph attends to the whole context, so its results \
             differ from sequences of {} tokens on",
            w + 1
        ));
    }
    match c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            md.push((k("rope.scaling.type"), Value::String("linear".into())));
            md.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
        }
        RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } => md.push((
            k("rope.scaling.original_context_length"),
            u(original_max_position_embeddings),
        )),
    }
    let (tok, warn) = vocab::tokenizer_metadata(model, n_vocab);
    md.extend(tok);
    warnings.extend(warn);
    md
}

/// Descriptive `general.*` keys of a GGUF source (name, license, …), not the format ones.
fn source_general(model: &Model) -> Vec<(String, Value)> {
    // Format keys are the writer's; `size_label` ("135M") may no longer hold after pruning.
    const SKIP: [&str; 5] = [
        "general.architecture",
        "general.file_type",
        "general.alignment",
        "general.quantization_version",
        "general.size_label",
    ];
    if !model.source.is_file() {
        return Vec::new();
    }
    let Ok(f) = GgufFile::open(&model.source) else {
        return Vec::new();
    };
    let mut kv: Vec<(String, Value)> = f
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("general.") && !SKIP.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    kv
}

/// Save `model` as a GGUF file at `out` in `dtype` (see the module docs for the guarantees).
pub fn save_gguf(model: &Model, out: &Path, dtype: GgufDtype, force: bool) -> Result<GgufWritten> {
    let out_err = |msg: String| Error::Output {
        path: out.to_path_buf(),
        msg,
    };
    let name = out
        .file_name()
        .ok_or_else(|| out_err("the output must name a file".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Everything that can fail on the model is decided before touching the disk.
    let dims = layer_dims(model)?;
    let (arch, permute) = choose_arch(model, &dims);
    let mut warnings = Vec::new();
    let tensors = plan(model, &dims, dtype, permute, &mut warnings)?;
    let md = metadata(model, &dims, arch, dtype, &mut warnings);
    if let (Ok(src), Ok(dst)) = (model.source.canonicalize(), out.canonicalize()) {
        if src == dst {
            return Err(out_err(
                "is the input model; choose another output file".into(),
            ));
        }
    }
    if let Ok(meta) = out.symlink_metadata() {
        if meta.is_dir() {
            return Err(out_err("is a directory".into()));
        }
        if !force {
            return Err(out_err("exists; pass --force to replace it".into()));
        }
    }
    std::fs::create_dir_all(&parent)
        .map_err(|e| out_err(format!("creating {}: {e}", parent.display())))?;
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let tmp = parent.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let guard = TempFile(Some(tmp.clone()));
    let bytes = write_file(&tmp, &md, &tensors)?;
    std::fs::rename(&tmp, out)
        .map_err(|e| out_err(format!("renaming {} into place: {e}", tmp.display())))?;
    guard.disarm();
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(GgufWritten {
        arch,
        tensors: tensors.len(),
        bytes,
        warnings,
    })
}

/// Removes the temporary file unless disarmed (also on panic).
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Write the whole GGUF to `path`; returns its size.
fn write_file(path: &Path, md: &[(String, Value)], tensors: &[Planned]) -> Result<u64> {
    let err = |e: std::io::Error| Error::Output {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(md.len() as u64).to_le_bytes());
    for (k, v) in md {
        put_str(&mut head, k);
        head.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml order: innermost dimension first.
        for &d in t.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ttype.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.ttype.bytes(t.len()).next_multiple_of(ALIGN);
    }
    head.resize(head.len().next_multiple_of(ALIGN), 0);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let mut w = CountingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
    };
    w.write_all(&head).map_err(err)?;
    let mut buf = Vec::new();
    for t in tensors {
        let permuted;
        let vals: &[f32] = match &t.src {
            Src::Plain(x) => x.data(),
            Src::Owned(v) => v,
            Src::Permuted(x, heads) => {
                let cols = if x.shape.len() == 2 { x.shape[1] } else { 1 };
                permuted = permute_rows(x.data(), *heads, x.shape[0] / heads, cols);
                &permuted
            }
        };
        encode::encode(vals, t.ttype, &mut buf);
        let pad = buf.len().next_multiple_of(ALIGN) - buf.len();
        buf.resize(buf.len() + pad, 0);
        w.write_all(&buf).map_err(err)?;
    }
    let bytes = w.pos;
    let file = w.inner.into_inner().map_err(|e| err(e.into_error()))?;
    file.sync_all().map_err(err)?;
    Ok(bytes)
}

struct CountingWriter<W: Write> {
    inner: W,
    pos: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// GGUF value type id (`enum gguf_type`).
fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A value's payload (the type id is written by the caller). Arrays take their element type
/// from the first element (an empty array is written as an array of strings); an array that
/// mixes types is refused.
fn put_value(b: &mut Vec<u8>, key: &str, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => b.push(u8::from(*x)),
        Value::String(s) => put_str(b, s),
        Value::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            let elem = items.first().map(type_id).unwrap_or(8);
            if items.iter().any(|it| type_id(it) != elem) {
                return Err(Error::Invalid(format!(
                    "cannot write GGUF: metadata `{key}` is an array of mixed types"
                )));
            }
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                // A nested array writes its own element type and length.
                put_value(b, key, it)?;
            }
        }
    }
    Ok(())
}

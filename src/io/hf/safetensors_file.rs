//! Reading safetensors files: memory-mapped, with every header field and byte range checked.
//!
//! [`SafetensorsFile::open`] maps a file and validates its header against the file size (length
//! prefix, JSON, dtype × shape = byte span, offsets inside the data section), so later reads
//! can never go out of bounds; a bad file gives [`Error::Format`] naming it.

use crate::model::weights::{Source, Tensor};
use crate::{Error, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor's header entry; `start..end` are absolute byte offsets into the mapped file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A memory-mapped safetensors file whose header has been checked against the file size.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    entries: HashMap<String, Entry>,
}

/// Bytes per element of a safetensors dtype, when known.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl SafetensorsFile {
    /// Map `path` and parse its header. Every data range is checked to lie inside the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bad = |msg: String| Error::format(path, "safetensors", msg);
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(bad(format!(
                "file is {len} bytes, too short for the 8-byte header length"
            )));
        }
        // SAFETY: the file is opened read-only; lopper never writes to a file it has mapped.
        // (Another process truncating it meanwhile is outside what any mmap reader can defend.)
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let map = Arc::new(map);
        let file_len = map.len();
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&map[..8]);
        let n = u64::from_le_bytes(n8);
        let avail = (file_len - 8) as u64;
        if n > avail {
            return Err(bad(format!(
                "header length {n} runs past the end of the file ({file_len} bytes): \
                 truncated or not a safetensors file"
            )));
        }
        let data_start = 8 + n as usize;
        let header: Value = serde_json::from_slice(&map[8..data_start])
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_len = file_len - data_start;
        let mut entries = HashMap::with_capacity(obj.len());
        for (name, v) in obj {
            if name == "__metadata__" {
                continue;
            }
            let field = |k: &str| {
                v.get(k)
                    .ok_or_else(|| bad(format!("tensor `{name}` has no `{k}`")))
            };
            let dtype = field("dtype")?
                .as_str()
                .ok_or_else(|| bad(format!("tensor `{name}`: dtype is not a string")))?
                .to_string();
            let shape = field("shape")?
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .collect::<Option<Vec<usize>>>()
                })
                .ok_or_else(|| bad(format!("tensor `{name}`: shape is not a list of sizes")))?;
            let offs = field("data_offsets")?
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .ok_or_else(|| bad(format!("tensor `{name}`: data_offsets is not [begin, end]")))?;
            let (b, e) = offs;
            if b > e || e > data_len as u64 {
                return Err(bad(format!(
                    "tensor `{name}`: data offsets [{b}, {e}] lie outside the {data_len}-byte data \
                     section (truncated file?)"
                )));
            }
            if let Some(size) = dtype_size(&dtype) {
                let need = shape
                    .iter()
                    .try_fold(size, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| bad(format!("tensor `{name}`: shape {shape:?} overflows")))?;
                if need as u64 != e - b {
                    return Err(bad(format!(
                        "tensor `{name}`: {dtype} {shape:?} needs {need} bytes but its data \
                         offsets span {}",
                        e - b
                    )));
                }
            }
            let entry = Entry {
                dtype,
                shape,
                start: data_start + b as usize,
                end: data_start + e as usize,
            };
            entries.insert(name.clone(), entry);
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            entries,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// True when the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The safetensors dtype (e.g. `"F32"`) and shape of `name`.
    pub fn info(&self, name: &str) -> Option<(&str, &[usize])> {
        self.entries
            .get(name)
            .map(|e| (e.dtype.as_str(), e.shape.as_slice()))
    }

    /// Raw little-endian bytes of `name` (for integer tensors and other non-float data).
    pub fn raw(&self, name: &str) -> Option<&[u8]> {
        self.entries.get(name).map(|e| &self.map[e.start..e.end])
    }

    /// `name` as f32: F32 mapped without copying when aligned, F16 / BF16 converted.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let bytes = &self.map[e.start..e.end];
        let shape = e.shape.clone();
        let data = match e.dtype.as_str() {
            "F32" => {
                if cfg!(target_endian = "little") {
                    if let Some(t) = Tensor::mapped(shape.clone(), self.map.clone(), e.start) {
                        return Ok(t);
                    }
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            "F16" => convert_half::<f16>(bytes),
            "BF16" => convert_half::<bf16>(bytes),
            other => {
                return Err(Error::UnsupportedDtype {
                    path: self.path.clone(),
                    tensor: name.to_string(),
                    dtype: format!("{other} (lopper reads F32, F16 and BF16)"),
                })
            }
        };
        // The converted copy is what is used from now on: the source bytes need not stay
        // resident.
        crate::util::drop_pages(&self.map, e.start, e.end - e.start);
        Ok(Tensor::new(shape, data))
    }

    /// `name` as f32 like [`SafetensorsFile::tensor`], except that F16 / BF16 are converted
    /// only when first read ([`crate::model::weights::Storage::Lazy`]): loading a large
    /// half-precision model this way holds none of it in memory.
    pub fn tensor_lazy(&self, name: &str) -> Result<Tensor> {
        match self.entries.get(name) {
            Some(e) if e.dtype == "F16" || e.dtype == "BF16" => {
                let source = HalfSource {
                    map: self.map.clone(),
                    start: e.start,
                    end: e.end,
                    bf16: e.dtype == "BF16",
                    what: format!("{} `{name}` in {}", e.dtype, self.path.display()),
                };
                Ok(Tensor::lazy(e.shape.clone(), Arc::new(source)))
            }
            _ => self.tensor(name),
        }
    }
}

/// F16 / BF16 bytes of a mapped file, converted when a lazy tensor is first read.
struct HalfSource {
    map: Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
    bf16: bool,
    what: String,
}

impl Source for HalfSource {
    fn values(&self) -> Vec<f32> {
        let bytes = &self.map[self.start..self.end];
        let v = if self.bf16 {
            convert_half::<bf16>(bytes)
        } else {
            convert_half::<f16>(bytes)
        };
        crate::util::drop_pages(&self.map, self.start, self.end - self.start);
        v
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Little-endian 16-bit floats to f32, in parallel for large tensors.
fn convert_half<T>(bytes: &[u8]) -> Vec<f32>
where
    T: bytemuck::Pod + Send + Sync + HalfFrom16,
    [T]: HalfFloatSliceExt,
{
    let n = bytes.len() / 2;
    let mut out = vec![0f32; n];
    const CHUNK: usize = 1 << 16;
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(2) && cfg!(target_endian = "little");
    if aligned {
        let src: &[T] = bytemuck::cast_slice(&bytes[..n * 2]);
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, s)| s.convert_to_f32_slice(o));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * 2))
            .for_each(|(o, s)| {
                for (o, c) in o.iter_mut().zip(s.chunks_exact(2)) {
                    *o = T::from_le(u16::from_le_bytes([c[0], c[1]]));
                }
            });
    }
    out
}

/// 16-bit float types built from their bits.
trait HalfFrom16 {
    fn from_le(bits: u16) -> f32;
}
impl HalfFrom16 for f16 {
    fn from_le(bits: u16) -> f32 {
        f16::from_bits(bits).to_f32()
    }
}
impl HalfFrom16 for bf16 {
    fn from_le(bits: u16) -> f32 {
        bf16::from_bits(bits).to_f32()
    }
}

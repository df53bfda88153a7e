//! Tensor encodings of the GGUF writer: F32, F16, BF16 and Q8_0, byte-compatible with ggml.
//!
//! Q8_0 follows ggml's reference `quantize_row_q8_0_ref`: blocks of 32 values, scale
//! `d = max|x| / 127` stored as f16, values `round(x / d)` (half away from zero) as i8.
//! F16 / BF16 round to nearest even (the `half` crate), as ggml and PyTorch do.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Element type of a written GGUF's matrices (1-D tensors — norms, biases — are always F32,
/// as llama.cpp's converter writes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufDtype {
    /// 32-bit float: bit-exact.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml's 8-bit blocks of 32 with an f16 scale (8.5 bits per weight). A matrix whose rows
    /// are not a multiple of 32 long is written as F16 instead (reported as a warning).
    Q8_0,
}

impl GgufDtype {
    /// llama.cpp's `general.file_type` (`llama_ftype`) for a file of mostly this type.
    pub fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    /// The tensor type for a matrix of this dtype.
    pub(super) fn tensor_type(self) -> TType {
        match self {
            GgufDtype::F32 => TType::F32,
            GgufDtype::F16 => TType::F16,
            GgufDtype::Bf16 => TType::Bf16,
            GgufDtype::Q8_0 => TType::Q8_0,
        }
    }
}

impl std::str::FromStr for GgufDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<GgufDtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(GgufDtype::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(GgufDtype::F16),
            "bf16" | "bfloat16" => Ok(GgufDtype::Bf16),
            "q8_0" | "q8" => Ok(GgufDtype::Q8_0),
            _ => Err(crate::Error::Invalid(format!(
                "unknown GGUF dtype `{s}` (use f32, f16, bf16 or q8_0)"
            ))),
        }
    }
}

impl std::fmt::Display for GgufDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::Bf16 => "bf16",
            GgufDtype::Q8_0 => "q8_0",
        })
    }
}

/// ggml tensor types the writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

/// Values per Q8_0 block.
pub const QK8_0: usize = 32;
const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

impl TType {
    /// The ggml type id (`enum ggml_type`).
    pub(super) fn id(self) -> u32 {
        match self {
            TType::F32 => 0,
            TType::F16 => 1,
            TType::Q8_0 => 8,
            TType::Bf16 => 30,
        }
    }

    /// Bytes of `n` values (`n` a multiple of the block size for Q8_0).
    pub(super) fn bytes(self, n: usize) -> usize {
        match self {
            TType::F32 => 4 * n,
            TType::F16 | TType::Bf16 => 2 * n,
            TType::Q8_0 => n / QK8_0 * Q8_0_BLOCK_BYTES,
        }
    }

    /// Whether a row of `cols` values can be stored in this type.
    pub(super) fn fits_row(self, cols: usize) -> bool {
        self != TType::Q8_0 || cols.is_multiple_of(QK8_0)
    }
}

/// Encode `vals` as little-endian `t` into `out` (cleared first), in parallel chunks.
pub(super) fn encode(vals: &[f32], t: TType, out: &mut Vec<u8>) {
    // Chunks of whole Q8_0 blocks so every chunk encodes independently.
    const CHUNK: usize = 1 << 16;
    out.clear();
    out.resize(t.bytes(vals.len()), 0);
    let out_chunk = t.bytes(CHUNK);
    vals.par_chunks(CHUNK)
        .zip(out.par_chunks_mut(out_chunk))
        .for_each(|(v, o)| encode_chunk(v, t, o));
}

fn encode_chunk(vals: &[f32], t: TType, out: &mut [u8]) {
    match t {
        TType::F32 => {
            for (v, o) in vals.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        TType::F16 => {
            let mut h = vec![f16::ZERO; vals.len()];
            h.convert_from_f32_slice(vals);
            for (v, o) in h.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        TType::Bf16 => {
            let mut h = vec![bf16::ZERO; vals.len()];
            h.convert_from_f32_slice(vals);
            for (v, o) in h.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        TType::Q8_0 => {
            for (x, o) in vals
                .chunks_exact(QK8_0)
                .zip(out.chunks_exact_mut(Q8_0_BLOCK_BYTES))
            {
                let (d, qs) = quantize_q8_0_block(x);
                o[..2].copy_from_slice(&d.to_bits().to_le_bytes());
                for (b, q) in o[2..].iter_mut().zip(qs) {
                    *b = q as u8;
                }
            }
        }
    }
}

/// One Q8_0 block as ggml's reference quantizer makes it: the f16 scale and 32 quants.
/// `x` must hold [`QK8_0`] values.
pub fn quantize_q8_0_block(x: &[f32]) -> (f16, [i8; QK8_0]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK8_0];
    for (q, v) in qs.iter_mut().zip(x) {
        // |v·id| ≤ 127 up to rounding, so the cast never saturates in practice.
        *q = (v * id).round() as i8;
    }
    (f16::from_f32(d), qs)
}

/// What a reader gets back from `vals` stored as `t` (for tests and error estimates).
pub fn round_trip(vals: &[f32], t: GgufDtype) -> Vec<f32> {
    match t {
        GgufDtype::F32 => vals.to_vec(),
        GgufDtype::F16 => vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        GgufDtype::Bf16 => vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        GgufDtype::Q8_0 => vals
            .chunks(QK8_0)
            .flat_map(|x| {
                let (d, qs) = quantize_q8_0_block(x);
                let d = d.to_f32();
                qs.into_iter()
                    .take(x.len())
                    .map(move |q| q as f32 * d)
                    .collect::<Vec<_>>()
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_layout() {
        let mut x = [0f32; QK8_0];
        x[0] = -127.0;
        x[1] = 63.5; // exactly halfway: rounds away from zero
        x[2] = 0.4; // rounds to 0
        let mut out = Vec::new();
        encode(&x, TType::Q8_0, &mut out);
        assert_eq!(out.len(), 34);
        assert_eq!(&out[..2], &[0x00, 0x3c], "d = 1.0 as f16");
        assert_eq!(out[2] as i8, -127);
        assert_eq!(out[3] as i8, 64);
        assert_eq!(out[4] as i8, 0);
        encode(&[0f32; 64], TType::Q8_0, &mut out);
        assert!(out.iter().all(|&b| b == 0), "all-zero blocks have d = 0");
    }

    #[test]
    fn half_types_round_to_nearest_even() {
        let mut out = Vec::new();
        // 1 + 2^-11 is halfway between two f16 values: ties to even (1.0).
        encode(&[1.0 + 2f32.powi(-11), -0.0], TType::F16, &mut out);
        assert_eq!(out, [0x00, 0x3c, 0x00, 0x80]);
        encode(&[1.0 + 2f32.powi(-8)], TType::Bf16, &mut out);
        assert_eq!(out, [0x80, 0x3f]);
    }
}

//! Calibration samples: `n` windows of `len` token ids, from text or from an ids file.
//!
//! From text (default `c4.utf8`): documents (non-empty lines) joined with "\n\n", tokenized once,
//! then `samples` windows at uniformly random offsets in `[0, N − len)` drawn with a seeded
//! SplitMix64 generator (as Wanda/SparseGPT draw random C4 windows; the generator differs from
//! theirs, so for bit-exact comparisons pass the reference ids with `--calib-ids`).
//! From ids: a safetensors file with an integer `input_ids` tensor `[n, len]`.

use crate::{Error, Result};
use std::path::Path;

/// Calibration windows, row-major `[n, len]`.
#[derive(Debug, Clone)]
pub struct CalibSet {
    pub ids: Vec<u32>,
    pub n: usize,
    pub len: usize,
    /// Where the samples came from (for reports).
    pub source: String,
}

impl CalibSet {
    /// Window `i`.
    pub fn window(&self, i: usize) -> &[u32] {
        &self.ids[i * self.len..(i + 1) * self.len]
    }

    /// The first `k` samples (all of them when `k >= n`), e.g. for a costlier stage that
    /// needs fewer tokens.
    pub fn first(&self, k: usize) -> CalibSet {
        let k = k.min(self.n);
        CalibSet {
            ids: self.ids[..k * self.len].to_vec(),
            n: k,
            len: self.len,
            source: if k == self.n {
                self.source.clone()
            } else {
                format!("{} (first {k} samples)", self.source)
            },
        }
    }
}

/// SplitMix64: small, seedable, good enough for choosing offsets.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), by rejection to avoid modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }
}

/// Validate the sample request.
fn check_request(samples: usize, len: usize) -> Result<()> {
    if samples == 0 || len < 2 {
        return Err(Error::Invalid(format!(
            "calibration needs at least 1 sample of at least 2 tokens (got --samples {samples} --calib-len {len})"
        )));
    }
    Ok(())
}

/// Draw `samples` windows of `len` tokens from token stream `stream` (of the text at `path`).
pub fn sample_windows(
    stream: &[u32],
    samples: usize,
    len: usize,
    seed: u64,
    path: &Path,
) -> Result<CalibSet> {
    check_request(samples, len)?;
    let needed = samples * len;
    if stream.len() <= len || stream.len() < needed {
        return Err(Error::Text {
            path: path.to_path_buf(),
            msg: format!(
                "too little calibration text: {} tokens, but {samples} samples x {len} tokens need at least {needed} (use a longer text, fewer --samples or a smaller --calib-len)",
                stream.len()
            ),
        });
    }
    let mut rng = SplitMix64(seed);
    let mut ids = Vec::with_capacity(needed);
    for _ in 0..samples {
        let start = rng.below((stream.len() - len) as u64) as usize;
        ids.extend_from_slice(&stream[start..start + len]);
    }
    Ok(CalibSet {
        ids,
        n: samples,
        len,
        source: format!("{} ({samples} x {len} tokens, seed {seed})", path.display()),
    })
}

/// Calibration windows from a text file with the model's tokenizer.
pub fn from_text(
    tok: &tokenizers::Tokenizer,
    path: &Path,
    samples: usize,
    len: usize,
    seed: u64,
) -> Result<CalibSet> {
    check_request(samples, len)?;
    let text = crate::text::load_calib_text(path)?;
    let stream = crate::tokenizer::encode(tok, &text, path)?;
    sample_windows(&stream, samples, len, seed, path)
}

/// Calibration windows from a safetensors file holding `input_ids` `[n, len]` (i64/i32/u32).
/// Ids must be below `vocab`.
pub fn from_ids_file(path: &Path, vocab: usize) -> Result<CalibSet> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::format(path, "safetensors", m);
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let view = st
        .tensor("input_ids")
        .map_err(|_| bad("no `input_ids` tensor".into()))?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[0] == 0 || shape[1] < 2 {
        return Err(bad(format!(
            "`input_ids` must be [n, len] with len >= 2, got {shape:?}"
        )));
    }
    let d = view.data();
    let ids: Vec<i64> = match view.dtype() {
        safetensors::Dtype::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        safetensors::Dtype::I32 => d
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
            .collect(),
        safetensors::Dtype::U32 => d
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
            .collect(),
        other => {
            return Err(bad(format!(
                "`input_ids` has dtype {other:?}; expected I64, I32 or U32"
            )))
        }
    };
    if let Some(v) = ids.iter().find(|&&v| v < 0 || v as usize >= vocab) {
        return Err(bad(format!(
            "`input_ids` contains id {v}, outside the model's vocabulary of {vocab}"
        )));
    }
    Ok(CalibSet {
        ids: ids.into_iter().map(|v| v as u32).collect(),
        n: shape[0],
        len: shape[1],
        source: format!("{} ({} x {} ids)", path.display(), shape[0], shape[1]),
    })
}

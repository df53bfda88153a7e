//! A light second walk of a GGUF header, to catch what candle's parser would panic on or report
//! without naming the tensor; and names of ggml type ids for messages.

use std::io::{BufReader, Read};
use std::path::Path;

/// Name of a ggml type id, for messages.
pub(super) fn ggml_type_name(id: u32) -> String {
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

/// What a light walk of the GGUF header finds before candle parses it: things candle would panic
/// on (`general.alignment` 0) or report without naming the tensor (an unknown type id).
#[derive(Default)]
pub(super) struct Prescan {
    /// `general.alignment` when it is stored as an integer.
    pub alignment: Option<u64>,
    /// First tensor whose ggml type id candle does not know, with that id.
    pub unknown_dtype: Option<(String, u32)>,
}

/// Walk the header of `path` (metadata skipped except `general.alignment`, tensor directory
/// read). Stops quietly at the first inconsistency: candle's parse reports the real error.
pub(super) fn prescan(path: &Path) -> Prescan {
    let mut out = Prescan::default();
    if let Ok(file) = std::fs::File::open(path) {
        let _ = walk_header(&mut BufReader::with_capacity(1 << 20, file), &mut out);
    }
    out
}

fn walk_header(r: &mut BufReader<std::fs::File>, out: &mut Prescan) -> Option<()> {
    type R = BufReader<std::fs::File>;
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64_<R: Read>(r: &mut R) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn scalar_size(t: u32) -> Option<u64> {
        Some(match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }
    // `seek_relative` keeps the buffer (a plain seek would refill it for every string).
    fn skip(r: &mut R, n: u64) -> Option<()> {
        r.seek_relative(i64::try_from(n).ok()?).ok()
    }
    let _magic = u32_(r)?;
    let v1 = u32_(r)? == 1;
    let len = |r: &mut R| if v1 { u32_(r).map(u64::from) } else { u64_(r) };
    let n_tensors = len(r)?;
    let n_kv = len(r)?;
    for _ in 0..n_kv {
        let key_len = len(r)?;
        let is_alignment = if key_len == 17 {
            let mut k = [0u8; 17];
            r.read_exact(&mut k).ok()?;
            &k == b"general.alignment"
        } else {
            skip(r, key_len)?;
            false
        };
        match u32_(r)? {
            8 => {
                let n = len(r)?;
                skip(r, n)?;
            }
            9 => {
                let elem = u32_(r)?;
                let n = len(r)?;
                if elem == 8 {
                    for _ in 0..n {
                        let l = len(r)?;
                        skip(r, l)?;
                    }
                } else {
                    // Arrays of arrays do not occur in model files; give up on them.
                    skip(r, n.checked_mul(scalar_size(elem)?)?)?;
                }
            }
            t => {
                let size = scalar_size(t)?;
                let mut b = [0u8; 8];
                r.read_exact(&mut b[..size as usize]).ok()?;
                // The integer types candle honours; only "is it zero" matters here.
                if is_alignment && t <= 5 {
                    out.alignment = Some(u64::from_le_bytes(b));
                }
            }
        }
    }
    for _ in 0..n_tensors {
        let l = usize::try_from(len(r)?).ok()?;
        if l > 1 << 16 {
            return None;
        }
        let mut name = vec![0u8; l];
        r.read_exact(&mut name).ok()?;
        let n_dims = u32_(r)?;
        if n_dims > 4 {
            return None;
        }
        for _ in 0..n_dims {
            len(r)?;
        }
        let t = u32_(r)?;
        if !matches!(t, 0..=3 | 6..=15 | 30) {
            out.unknown_dtype = Some((String::from_utf8_lossy(&name).into_owned(), t));
            return Some(());
        }
        u64_(r)?;
    }
    Some(())
}

//! Weights kept in a scratch file instead of in memory, so that pruning holds only the block it
//! works on.
//!
//! Pruned weights are new values: as f32 on the heap they would add up to the whole model
//! (0.54 GB for the default model, 28 GB for a 7B model, more than this machine has). The
//! layer-sequential pruning driver touches one block at a time, so the rest need not be
//! resident. [`Spill`] writes tensors to an unlinked file and replaces them by read-only
//! memory-mapped views ([`Storage::Mapped`], the same storage as an f32 safetensors file);
//! [`Tensor::release`] then drops a view's pages from the process (the kernel re-reads them
//! from the page cache or the file when they are touched again). The values, and so every
//! result, are unchanged: only where the bytes live changes. Input weights need no spilling when
//! loaded with [`crate::io::load_model_with`]: f32 safetensors are mapped, f16 / bf16 and GGUF
//! tensors are converted when first read from their own mapped file ([`Storage::Lazy`]); a model
//! loaded into memory (or built in code) has its heap tensors spilled up front
//! ([`Spill::spill_weights`]).
//!
//! The file is created in a directory the caller chooses (the output's, which has to hold the
//! model anyway) and is unlinked at once, so nothing is left behind even if the process dies.
//! It only grows: a pruned tensor is appended, and one that replaces a spilled tensor leaves that
//! one as dead bytes (about the f32 size of the pruned weights for a lazily loaded model, twice
//! the f32 model at most).

use crate::model::weights::{LayerWeights, Storage, Tensor, Weights};
use crate::{Error, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Alignment of every tensor in the file: a page, so that releasing one tensor's pages never
/// touches another's.
const ALIGN: u64 = 4096;

/// An unlinked scratch file that holds spilled tensors.
pub struct Spill {
    /// The file and its current end (where the next tensor goes).
    file: Mutex<(File, u64)>,
    /// The directory, for error messages.
    dir: PathBuf,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spill(in {})", self.dir.display())
    }
}

impl Spill {
    /// A new, already unlinked scratch file in `dir`.
    pub fn create_in(dir: &Path) -> Result<Spill> {
        let file = tempfile::tempfile_in(dir).map_err(|e| Error::Scratch {
            path: dir.to_path_buf(),
            msg: format!("cannot create it there: {e}"),
        })?;
        Ok(Spill {
            file: Mutex::new((file, 0)),
            dir: dir.to_path_buf(),
        })
    }

    /// Bytes written so far (dead ones included).
    pub fn bytes(&self) -> u64 {
        self.file.lock().map_or(0, |g| g.1)
    }

    /// Copy `t`'s values to the file and return a mapped view of them (an empty tensor is
    /// returned as it is).
    pub fn put(&self, t: &Tensor) -> Result<Tensor> {
        let bytes: &[u8] = bytemuck::cast_slice(t.data());
        if bytes.is_empty() {
            return Ok(t.clone());
        }
        let err = |e: std::io::Error| Error::Scratch {
            path: self.dir.clone(),
            msg: format!("writing: {e}"),
        };
        let mut g = self
            .file
            .lock()
            .map_err(|_| err(std::io::Error::other("poisoned lock")))?;
        let off = g.1.div_ceil(ALIGN) * ALIGN;
        g.0.seek(SeekFrom::Start(off)).map_err(err)?;
        g.0.write_all(bytes).map_err(err)?;
        g.1 = off + bytes.len() as u64;
        // SAFETY: the file is private to this process (unlinked, never handed out) and the
        // range is never written again, so the mapping's contents cannot change under it.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(off)
                .len(bytes.len())
                .map(&g.0)
        }
        .map_err(err)?;
        Tensor::mapped(t.shape.clone(), Arc::new(map), 0).ok_or_else(|| {
            err(std::io::Error::other(
                "the mapped range is misaligned or short",
            ))
        })
    }

    /// Move `t` to the file when it is held in memory (a mapped or lazy tensor stays as it is)
    /// and let go of what it holds in memory ([`Tensor::release`]).
    pub fn spill(&self, t: &mut Tensor) -> Result<()> {
        if let Storage::Owned(_) = t.data {
            *t = self.put(t)?;
        }
        t.release();
        Ok(())
    }

    /// [`Spill::spill`] every tensor of a block.
    pub fn spill_layer(&self, l: &mut LayerWeights) -> Result<()> {
        l.tensors_mut().into_iter().try_for_each(|t| self.spill(t))
    }

    /// [`Spill::spill`] every tensor of a model (packed runtime copies are not touched).
    pub fn spill_weights(&self, w: &mut Weights) -> Result<()> {
        self.spill(&mut w.embed)?;
        for l in &mut w.layers {
            self.spill_layer(l)?;
        }
        self.spill(&mut w.final_norm)?;
        if let Some(h) = &mut w.lm_head {
            self.spill(h)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_tensors_keep_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spill::create_in(dir.path()).unwrap();
        let mut a = Tensor::new(vec![3, 5], (0..15).map(|x| x as f32 * 0.5 - 2.0).collect());
        let mut b = Tensor::new(vec![7], vec![f32::MIN_POSITIVE; 7]);
        let mut e = Tensor::new(vec![0, 4], vec![]);
        let (a0, b0) = (a.data().to_vec(), b.data().to_vec());
        s.spill(&mut a).unwrap();
        s.spill(&mut b).unwrap();
        s.spill(&mut e).unwrap();
        assert!(matches!(a.data, Storage::Mapped { .. }));
        assert!(matches!(b.data, Storage::Mapped { .. }));
        assert_eq!(a.data(), &a0[..]);
        assert_eq!(b.data(), &b0[..]);
        assert!(e.is_empty());
        // Released pages come back with the same values; a mapped tensor is not copied again.
        a.release();
        assert_eq!(a.data(), &a0[..]);
        let before = s.bytes();
        s.spill(&mut a).unwrap();
        assert_eq!(s.bytes(), before);
        // Writing through data_mut makes an owned copy; spilling it again appends it.
        a.data_mut()[0] = 9.0;
        s.spill(&mut a).unwrap();
        assert!(s.bytes() > before);
        assert_eq!(a.data()[0], 9.0);
        assert_eq!(&a.data()[1..], &a0[1..]);
        // Nothing is left in the directory: the file is unlinked.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let e = Spill::create_in(Path::new("/nonexistent/lopper-spill")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/lopper-spill"), "{e}");
    }
}

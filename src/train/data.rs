//! Training text: the default mix, the refusal of the evaluation text, and a deterministic
//! window order.
//!
//! Default mix: the four English files that ship beside `wiki.utf8` in PyPI `exllamav2==0.3.2`
//! (`conversion/standard_cal_data/`): `c4.utf8` (web documents, one per line, joined as
//! calibration does), `technical.utf8`, `code.utf8` and `tiny.utf8` (TinyStories), each read
//! whole. `multilingual.utf8` is left out (not English). About 1 MB of text in all; the token
//! count depends on the tokenizer (the report states it).
//!
//! `wiki.utf8` is the evaluation text and is never trained on, in whole or in part: a text is
//! refused when its file name is `wiki.utf8`, when its SHA-256 is the wiki file's, or when it
//! shares any line of at least 120 bytes with the wiki text (checked when the wiki text is in the
//! cache).
//!
//! Each text is tokenized once and cut into non-overlapping windows of `seq` tokens (windows
//! never span two texts). Epoch `e` visits every window once in the order of a Fisher–Yates
//! shuffle drawn from `SplitMix64(seed + e)`, so the window of step `s` depends only on
//! `(seed, s)`: a resumed run sees the same data.

use crate::assets::{self, Asset};
use crate::calibrate::SplitMix64;
use crate::{Error, Result};
use sha2::Digest;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const PKG: &str = "exllamav2==0.3.2";

/// Technical writing (licenses, manuals, papers).
pub const TECHNICAL_TEXT: Asset = Asset {
    file_name: "technical.utf8",
    requirement: PKG,
    member: "exllamav2/conversion/standard_cal_data/technical.utf8",
    sha256: "9c760a3e4917fa6a9851753a5bc7f0187a28590c28587aa23eed81a36a18ccfc",
};

/// Source code in many languages.
pub const CODE_TEXT: Asset = Asset {
    file_name: "code.utf8",
    requirement: PKG,
    member: "exllamav2/conversion/standard_cal_data/code.utf8",
    sha256: "23f989c24baf6529e89343c51439a18ea831db5afcaf2635a0a16b2990fc5221",
};

/// TinyStories.
pub const TINY_TEXT: Asset = Asset {
    file_name: "tiny.utf8",
    requirement: PKG,
    member: "exllamav2/conversion/standard_cal_data/tiny.utf8",
    sha256: "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
};

/// Lines shorter than this are not used to detect wiki text (headings, blank lines).
const WIKI_LINE_MIN: usize = 120;

/// Paths of the default training mix, fetching them if needed.
pub fn default_texts() -> Result<Vec<PathBuf>> {
    let mut out = vec![assets::c4_text()?];
    for a in [TECHNICAL_TEXT, CODE_TEXT, TINY_TEXT] {
        out.push(assets::fetch(&a)?);
    }
    Ok(out)
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Read a training text, refusing the evaluation text (see the module docs). `wiki_lines`:
/// hashes of the wiki text's long lines, when known.
pub fn read_text(path: &Path, wiki_lines: Option<&HashSet<u64>>) -> Result<String> {
    let refuse = |why: String| Error::Text {
        path: path.to_path_buf(),
        msg: format!("{why}: wiki.utf8 is the evaluation text and is never trained on"),
    };
    if path
        .file_name()
        .is_some_and(|n| n == assets::WIKI_TEXT.file_name)
    {
        return Err(refuse("the file is named wiki.utf8".into()));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if sha256_hex(&bytes) == assets::WIKI_TEXT.sha256 {
        return Err(refuse("the file is wiki.utf8 (same SHA-256)".into()));
    }
    let text = crate::text::read_utf8(path)?;
    if let Some(set) = wiki_lines {
        if let Some((n, _)) = long_lines(&text).find(|(_, h)| set.contains(h)) {
            return Err(refuse(format!("line {} is a line of wiki.utf8", n + 1)));
        }
    }
    // C4's one-document-per-line layout, joined as calibration joins it.
    let text = if path
        .file_name()
        .is_some_and(|n| n == assets::C4_TEXT.file_name)
    {
        crate::text::join_documents(&text)
    } else {
        text
    };
    if text.trim().is_empty() {
        return Err(Error::Text {
            path: path.to_path_buf(),
            msg: "the training text is empty".into(),
        });
    }
    Ok(text)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `(line number, hash)` of every line of at least [`WIKI_LINE_MIN`] bytes (trimmed).
fn long_lines(text: &str) -> impl Iterator<Item = (usize, u64)> + '_ {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| l.len() >= WIKI_LINE_MIN)
        .map(|(i, l)| (i, fnv(l.as_bytes())))
}

/// Hashes of the long lines of the wiki text at `path`.
pub fn wiki_line_set(path: &Path) -> Result<HashSet<u64>> {
    let text = crate::text::read_utf8(path)?;
    Ok(long_lines(&text).map(|(_, h)| h).collect())
}

/// The training windows, in a seed-determined order per epoch.
#[derive(Debug, Clone)]
pub struct Windows {
    pub seq: usize,
    pub windows: Vec<Vec<u32>>,
    pub seed: u64,
}

impl Windows {
    /// Cut each text's ids into windows of `seq` (each text must give at least one window).
    pub fn new(texts: &[(PathBuf, Vec<u32>)], seq: usize, seed: u64) -> Result<Windows> {
        let mut windows = Vec::new();
        for (path, ids) in texts {
            if ids.len() < seq {
                return Err(Error::Text {
                    path: path.clone(),
                    msg: format!(
                        "{} tokens, shorter than one training window of --seq-len {seq}",
                        ids.len()
                    ),
                });
            }
            windows.extend(ids.chunks_exact(seq).map(|w| w.to_vec()));
        }
        Ok(Windows { seq, windows, seed })
    }

    /// Tokens available in one epoch.
    pub fn tokens(&self) -> usize {
        self.windows.len() * self.seq
    }

    /// The window step `s` trains on.
    pub fn at(&self, s: usize) -> &[u32] {
        let n = self.windows.len();
        let (epoch, i) = (s / n, s % n);
        &self.windows[shuffled(n, self.seed.wrapping_add(epoch as u64))[i]]
    }
}

/// A Fisher–Yates permutation of `0..n` from `SplitMix64(seed)`.
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_depends_only_on_seed_and_step() {
        let texts = vec![(PathBuf::from("a"), (0..100u32).collect::<Vec<_>>())];
        let w = Windows::new(&texts, 10, 7).unwrap();
        let a: Vec<u32> = (0..25).map(|s| w.at(s)[0]).collect();
        let b: Vec<u32> = (0..25).map(|s| w.at(s)[0]).collect();
        assert_eq!(a, b);
        // Each epoch is a permutation of all windows.
        let mut e0: Vec<u32> = a[..10].to_vec();
        e0.sort();
        assert_eq!(e0, (0..10).map(|i| i * 10).collect::<Vec<_>>());
        assert_ne!(a[..10], a[10..20], "epochs are reshuffled");
        let w2 = Windows::new(&texts, 10, 8).unwrap();
        assert_ne!(a, (0..25).map(|s| w2.at(s)[0]).collect::<Vec<_>>());
    }

    #[test]
    fn wiki_is_refused_by_name_and_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wiki.utf8");
        std::fs::write(&p, "x").unwrap();
        assert!(read_text(&p, None)
            .unwrap_err()
            .to_string()
            .contains("evaluation text"));
        let line = "A line of the evaluation text that is long enough to be recognised when it is copied into another file, word for word, as a training text that must never hold it.";
        let wiki = dir.path().join("w.txt");
        std::fs::write(&wiki, format!("{line}\nshort\n")).unwrap();
        let set = wiki_line_set(&wiki).unwrap();
        let other = dir.path().join("mine.txt");
        std::fs::write(&other, format!("hello\n{line}\n")).unwrap();
        let e = read_text(&other, Some(&set)).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("wiki.utf8"), "{e}");
        std::fs::write(&other, "hello\nworld\n").unwrap();
        assert!(read_text(&other, Some(&set)).is_ok());
    }
}

//! Text files for evaluation and calibration.
//!
//! Both loaders reproduce, byte for byte, the text the golden reference ids were tokenized from:
//! * [`load_eval_text`]: the whole file, with every `<doc ...>` line and every `</doc>` line
//!   removed exactly as Python's `re.sub(r'<doc[^>]*>\n?|</doc>\n?', '', text)` does (wiki dumps
//!   wrap articles in such tags; a plain file passes unchanged unless it contains them);
//! * [`load_calib_text`]: the C4 convention, one document per line: the file is split on `'\n'`,
//!   empty lines are dropped, and the documents are joined with `"\n\n"` (no trailing newline).
//!
//! Files must be UTF-8; an error names the file and the byte offset of the first bad byte.

use crate::{Error, Result};
use std::path::Path;

fn text_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Text {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Read `path` as UTF-8 text.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        text_err(
            path,
            format!("not UTF-8 text (invalid byte at offset {at})"),
        )
    })
}

/// Remove `<doc ...>` and `</doc>` tags, each with one following newline if present.
///
/// Identical to `re.sub(r'<doc[^>]*>\n?|</doc>\n?', '', text)`: an opening tag is `<doc`
/// followed by anything but `>` (newlines included) up to the first `>`; a `<doc` with no later
/// `>` is kept as is.
pub fn strip_doc_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let tail = &rest[lt..];
        let matched = if tail.starts_with("<doc") {
            tail.find('>').map(|gt| gt + 1)
        } else if tail.starts_with("</doc>") {
            Some("</doc>".len())
        } else {
            None
        };
        match matched {
            Some(mut end) => {
                if tail[end..].starts_with('\n') {
                    end += 1;
                }
                rest = &tail[end..];
            }
            None => {
                out.push('<');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Join one-document-per-line text the C4 way: split on `'\n'`, drop empty lines, join with
/// `"\n\n"`. A `'\r'` before a newline is kept, as Python's `split('\n')` keeps it.
pub fn join_documents(text: &str) -> String {
    let docs: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    docs.join("\n\n")
}

/// Load an evaluation text (e.g. `wiki.utf8`): UTF-8, `<doc>` tag lines removed, not empty.
pub fn load_eval_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let text = strip_doc_tags(&read_utf8(path)?);
    if text.trim().is_empty() {
        return Err(text_err(path, "the evaluation text is empty"));
    }
    Ok(text)
}

/// Load a calibration text (e.g. `c4.utf8`): one document per line, joined with `"\n\n"`.
pub fn load_calib_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let text = join_documents(&read_utf8(path)?);
    if text.trim().is_empty() {
        return Err(text_err(path, "the calibration text has no documents"));
    }
    Ok(text)
}

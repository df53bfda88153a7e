//! Tokenizers for the models lopper loads.
//!
//! A GGUF file carries its tokenizer as metadata (`tokenizer.ggml.*`): the vocabulary, the BPE
//! merges, a type per token and the name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`).
//! [`from_gguf`] rebuilds a Hugging Face [`tokenizers::Tokenizer`] from those keys in memory, so
//! a GGUF needs no `tokenizer.json` beside it. HF directories ship a `tokenizer.json`, read by
//! [`load_tokenizer_json`].
//!
//! Why build it here rather than use candle's or transformers' GGUF tokenizer: both ignore
//! `tokenizer.ggml.pre`. SmolLM's `smollm` pre-type splits every digit on its own before the
//! GPT-2 byte-level regex; without that split, e.g. `"\n\n1"` tokenizes differently and the ids no
//! longer match what the model was trained on (nor the golden reference ids).
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with pre-types
//! * `smollm`: `Digits(individual)` then `ByteLevel` with the GPT-2 regex, no prefix space;
//! * `gpt2`, `default` or absent: `ByteLevel` with the GPT-2 regex;
//! * `llama-bpe` / `llama3` / `llama-v3`: the Llama-3 split regex, then `ByteLevel` without regex,
//!   and BPE with `ignore_merges` (whole words found in the vocabulary are taken as is);
//! * `qwen2`: NFC, the Qwen2 split regex (single digits), then `ByteLevel` without regex.
//!
//! SentencePiece (`llama`) and other tokenizer models are refused with an error naming them.
//!
//! Control tokens (type 3) and the declared bos/eos/unk/pad ids become *special* added tokens, as
//! in HF `tokenizer.json` files: their text (e.g. `<|im_start|>`) is recognised as one token when
//! it appears in the input, and `decode(.., skip_special = true)` drops them. User-defined tokens
//! (type 4) become ordinary added tokens. No post-processor is installed and [`encode`] never adds
//! BOS/EOS: evaluation and calibration windows are plain text ids.

use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// Llama-3's pre-tokenizer split regex (HF `tokenizer.json` of Meta-Llama-3, llama.cpp `llama3`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's pre-tokenizer split regex (as Llama-3's, but digits one at a time).
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer types [`from_gguf`] accepts, for error messages.
pub const SUPPORTED_PRE: &str = "smollm, gpt2, default, llama-bpe, llama3, llama-v3, qwen2";

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Special token ids a GGUF declares (`tokenizer.ggml.*_token_id`), for generation and chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
}

fn tok_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A string value, or an error naming the key.
fn get_str<'a>(md: &'a HashMap<String, Value>, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => Err(tok_err(
            path,
            format!(
                "metadata `{key}` should be a string, found {:?}",
                v.value_type()
            ),
        )),
    }
}

/// An array of strings, or an error naming the key.
fn get_str_array(
    md: &HashMap<String, Value>,
    key: &str,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = v else {
        return Err(tok_err(
            path,
            format!(
                "metadata `{key}` should be an array of strings, found {:?}",
                v.value_type()
            ),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(tok_err(
                path,
                format!(
                    "metadata `{key}`[{i}] should be a string, found {:?}",
                    other.value_type()
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An integer value of any width.
fn as_int(v: &Value) -> Option<i64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

/// An optional token id, checked against the vocabulary size.
fn get_id(
    md: &HashMap<String, Value>,
    key: &str,
    n_vocab: usize,
    path: &Path,
) -> Result<Option<u32>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = as_int(v).ok_or_else(|| {
        tok_err(
            path,
            format!(
                "metadata `{key}` should be an integer, found {:?}",
                v.value_type()
            ),
        )
    })?;
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_vocab => Ok(Some(id)),
        _ => Err(tok_err(
            path,
            format!("metadata `{key}` = {id} is outside the vocabulary (size {n_vocab})"),
        )),
    }
}

/// The special token ids a GGUF declares (bos, eos, unk, pad), checked against its vocabulary.
pub fn special_ids(metadata: &HashMap<String, Value>, path: &Path) -> Result<SpecialIds> {
    let n_vocab = match metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => return Err(tok_err(path, "metadata `tokenizer.ggml.tokens` is missing")),
    };
    Ok(SpecialIds {
        bos: get_id(metadata, "tokenizer.ggml.bos_token_id", n_vocab, path)?,
        eos: get_id(metadata, "tokenizer.ggml.eos_token_id", n_vocab, path)?,
        unk: get_id(metadata, "tokenizer.ggml.unknown_token_id", n_vocab, path)?,
        pad: get_id(metadata, "tokenizer.ggml.padding_token_id", n_vocab, path)?,
    })
}

/// The pre-tokenization a `tokenizer.ggml.pre` value stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreKind {
    SmolLm,
    Gpt2,
    Llama3,
    Qwen2,
}

fn pre_kind(pre: Option<&str>, path: &Path) -> Result<PreKind> {
    match pre {
        None | Some("gpt2") | Some("default") => Ok(PreKind::Gpt2),
        Some("smollm") => Ok(PreKind::SmolLm),
        Some("llama-bpe") | Some("llama3") | Some("llama-v3") => Ok(PreKind::Llama3),
        Some("qwen2") => Ok(PreKind::Qwen2),
        Some(other) => Err(tok_err(
            path,
            format!("unsupported pre-tokenizer type `{other}` (tokenizer.ggml.pre); supported: {SUPPORTED_PRE}"),
        )),
    }
}

fn split_regex(regex: &str, path: &Path) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| tok_err(path, format!("cannot compile the pre-tokenizer regex: {e}")))?;
    Ok(split.into())
}

/// Build a tokenizer from GGUF metadata (`path` only names the file in errors).
///
/// See the module documentation for what is supported and how special tokens are treated.
pub fn from_gguf(metadata: &HashMap<String, Value>, path: &Path) -> Result<Tokenizer> {
    let model = get_str(metadata, "tokenizer.ggml.model", path)?.ok_or_else(|| {
        tok_err(
            path,
            "the GGUF has no tokenizer (metadata `tokenizer.ggml.model` is missing)",
        )
    })?;
    if model != "gpt2" {
        let what = match model {
            "llama" => " (SentencePiece)",
            "bert" => " (WordPiece)",
            "t5" => " (Unigram)",
            "rwkv" => " (RWKV)",
            _ => "",
        };
        return Err(tok_err(
            path,
            format!("unsupported tokenizer model `{model}`{what}; only `gpt2` (byte-level BPE) is supported"),
        ));
    }
    let kind = pre_kind(get_str(metadata, "tokenizer.ggml.pre", path)?, path)?;

    let tokens = get_str_array(metadata, "tokenizer.ggml.tokens", path)?
        .ok_or_else(|| tok_err(path, "metadata `tokenizer.ggml.tokens` is missing"))?;
    if tokens.is_empty() {
        return Err(tok_err(path, "metadata `tokenizer.ggml.tokens` is empty"));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(tok_err(
            path,
            format!("vocabulary too large ({} tokens)", tokens.len()),
        ));
    }
    let merges_raw = get_str_array(metadata, "tokenizer.ggml.merges", path)?.ok_or_else(|| {
        tok_err(
            path,
            "metadata `tokenizer.ggml.merges` is missing (needed for BPE)",
        )
    })?;
    let types: Option<Vec<i64>> = match metadata.get("tokenizer.ggml.token_type") {
        None => None,
        Some(Value::Array(a)) => {
            if a.len() != tokens.len() {
                return Err(tok_err(
                    path,
                    format!(
                        "metadata `tokenizer.ggml.token_type` has {} entries for {} tokens",
                        a.len(),
                        tokens.len()
                    ),
                ));
            }
            let t = a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    as_int(v).ok_or_else(|| {
                        tok_err(
                            path,
                            format!("metadata `tokenizer.ggml.token_type`[{i}] is not an integer"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(t)
        }
        Some(v) => {
            return Err(tok_err(
                path,
                format!(
                    "metadata `tokenizer.ggml.token_type` should be an array, found {:?}",
                    v.value_type()
                ),
            ))
        }
    };
    let specials = special_ids(metadata, path)?;

    // Vocabulary: if a string repeats, the last id wins, as in llama.cpp's `token_to_id` and
    // transformers' GGUF conversion (the other ids are then never produced by encoding).
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let merges = merges_raw
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
            _ => Err(tok_err(
                path,
                format!("metadata `tokenizer.ggml.merges`[{i}] = {m:?} is not of the form \"a b\""),
            )),
        })
        .collect::<Result<Vec<_>>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(kind == PreKind::Llama3)
        .build()
        .map_err(|e| tok_err(path, format!("cannot build the BPE model: {e}")))?;

    let mut tok = Tokenizer::new(bpe);
    let byte_level_regex = ByteLevel::new(false, true, true);
    let byte_level_plain = ByteLevel::new(false, true, false);
    match kind {
        PreKind::Gpt2 => {
            tok.with_pre_tokenizer(Some(byte_level_regex));
        }
        PreKind::SmolLm => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level_regex.into(),
            ])));
        }
        PreKind::Llama3 => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split_regex(LLAMA3_REGEX, path)?,
                byte_level_plain.into(),
            ])));
        }
        PreKind::Qwen2 => {
            tok.with_normalizer(Some(NFC))
                .map_err(|e| tok_err(path, format!("cannot set the normalizer: {e}")))?;
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split_regex(QWEN2_REGEX, path)?,
                byte_level_plain.into(),
            ])));
        }
    }
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    // Added tokens: control tokens and declared specials are special; user-defined are not.
    let mut special_set: Vec<u32> = Vec::new();
    if let Some(types) = &types {
        special_set.extend(
            types
                .iter()
                .enumerate()
                .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
                .map(|(i, _)| i as u32),
        );
    }
    special_set.extend(
        [specials.bos, specials.eos, specials.unk, specials.pad]
            .into_iter()
            .flatten(),
    );
    special_set.sort_unstable();
    special_set.dedup();
    let special_tokens: Vec<AddedToken> = special_set
        .iter()
        .map(|&id| &tokens[id as usize])
        .filter(|s| !s.is_empty())
        .map(|s| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(special_tokens)
        .map_err(|e| tok_err(path, format!("cannot add the special tokens: {e}")))?;
    if let Some(types) = &types {
        let user: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(i, &t)| {
                t == TOKEN_TYPE_USER_DEFINED && special_set.binary_search(&(*i as u32)).is_err()
            })
            .map(|(i, _)| &tokens[i])
            .filter(|s| !s.is_empty())
            .map(|s| AddedToken::from(s.clone(), false))
            .collect();
        if !user.is_empty() {
            tok.add_tokens(user)
                .map_err(|e| tok_err(path, format!("cannot add the user-defined tokens: {e}")))?;
        }
    }
    Ok(tok)
}

/// Read an HF `tokenizer.json` (errors name the file).
pub fn load_tokenizer_json(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Tokenizer::from_bytes(&bytes)
        .map_err(|e| tok_err(path, format!("cannot parse tokenizer.json: {e}")))
}

/// Encode `text` into token ids, adding no BOS/EOS (special-token text in `text` is still
/// recognised, as HF tokenizers do). `path` names the tokenizer's source in errors.
pub fn encode(tok: &Tokenizer, text: &str, path: &Path) -> Result<Vec<u32>> {
    let enc = tok
        .encode_fast(text, false)
        .map_err(|e| tok_err(path, format!("encoding failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Decode token ids into text; `skip_special` drops special tokens (BOS, `<|im_end|>`, ...).
/// Byte sequences that are not valid UTF-8 (e.g. a cut multi-byte character) become U+FFFD.
pub fn decode(tok: &Tokenizer, ids: &[u32], skip_special: bool, path: &Path) -> Result<String> {
    tok.decode(ids, skip_special)
        .map_err(|e| tok_err(path, format!("decoding failed: {e}")))
}

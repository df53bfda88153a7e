//! Tokenizer metadata (`tokenizer.ggml.*`) for a written GGUF.
//!
//! Where it comes from, in order:
//! 1. the model's source GGUF, when the model was loaded from one: every `tokenizer.ggml.*` key
//!    is copied as stored (the vocabulary must still match the embedding's rows);
//! 2. otherwise the model's tokenizer (an HF `tokenizer.json`), converted the way llama.cpp's
//!    `convert_hf_to_gguf.py` does for byte-level BPE: `tokenizer.ggml.model = "gpt2"`, tokens
//!    by id, merges `"a b"` in rank order, token types (1 normal, 3 control = special added token,
//!    4 user-defined = other added token, 5 unused = padding up to the embedding's rows), the
//!    bos/eos ids of the config, and `tokenizer.ggml.pre` recognised from the pre-tokenizer:
//!    `smollm` (digits split one by one, then GPT-2 byte-level), `gpt2`, `llama-bpe` (Llama 3
//!    regex), `qwen2` (NFC + Qwen2 regex) — the set lopper's own GGUF tokenizer reads back.
//!
//! A tokenizer that cannot be expressed (SentencePiece-style BPE with byte fallback, Unigram,
//! WordPiece, an unknown pre-tokenizer) or a model without one gives no tokenizer keys and a
//! warning: the weights are still written, but llama.cpp needs a tokenizer to run text.

use crate::io::gguf::GgufFile;
use crate::tokenizer::{LLAMA3_REGEX, QWEN2_REGEX};
use crate::Model;
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

/// llama.cpp token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Tokenizer keys for `model` (chat template included) and warnings about what was left out.
pub(super) fn tokenizer_metadata(
    model: &Model,
    n_vocab: usize,
) -> (Vec<(String, Value)>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut kvs = match from_source_gguf(model, n_vocab) {
        Ok(Some(kvs)) => kvs,
        Ok(None) | Err(_) => match &model.tokenizer {
            Some(tok) => {
                let add_bos = hf_add_bos(model);
                match metadata_from_tokenizer(
                    tok,
                    n_vocab,
                    model.config.bos_token_id,
                    model.config.eos_token_id,
                    add_bos,
                ) {
                    Ok(kvs) => kvs,
                    Err(why) => {
                        warnings.push(format!(
                            "no tokenizer written: {why}; llama.cpp cannot tokenize text with this file"
                        ));
                        Vec::new()
                    }
                }
            }
            None => {
                warnings.push(
                    "no tokenizer written: the model has none; llama.cpp cannot tokenize text with this file"
                        .into(),
                );
                Vec::new()
            }
        },
    };
    if let Some(t) = &model.chat_template {
        kvs.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    (kvs, warnings)
}

/// The `tokenizer.ggml.*` keys of the model's source GGUF, when it is one whose vocabulary
/// still has `n_vocab` tokens; `None` when the source is not a GGUF with a tokenizer.
fn from_source_gguf(model: &Model, n_vocab: usize) -> crate::Result<Option<Vec<(String, Value)>>> {
    if !model.source.is_file() {
        return Ok(None);
    }
    let f = GgufFile::open(&model.source)?;
    let md = f.metadata();
    match md.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) if a.len() == n_vocab => {}
        _ => return Ok(None),
    }
    let mut kvs: Vec<(String, Value)> = md
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.ggml."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The metadata map is unordered; a fixed order keeps the output reproducible.
    kvs.sort_by(|a, b| key_rank(&a.0).cmp(&key_rank(&b.0)).then(a.0.cmp(&b.0)));
    Ok(Some(kvs))
}

/// llama.cpp's converter order for the common keys; others after, by name.
fn key_rank(k: &str) -> usize {
    const ORDER: [&str; 5] = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ];
    ORDER.iter().position(|o| *o == k).unwrap_or(ORDER.len())
}

/// `add_bos_token` from an HF source's `tokenizer_config.json`, else false.
fn hf_add_bos(model: &Model) -> bool {
    let p = model.source.join("tokenizer_config.json");
    std::fs::read(&p)
        .ok()
        .and_then(|b| serde_json::from_slice::<Json>(&b).ok())
        .and_then(|j| j.get("add_bos_token").and_then(Json::as_bool))
        .unwrap_or(false)
}

/// `tokenizer.ggml.*` keys for a byte-level BPE `tok` whose embedding has `n_vocab` rows, or why
/// it cannot be expressed.
pub fn metadata_from_tokenizer(
    tok: &tokenizers::Tokenizer,
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
) -> Result<Vec<(String, Value)>, String> {
    let json: Json = tok
        .to_string(false)
        .map_err(|e| format!("cannot serialize the tokenizer: {e}"))
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(format!(
            "tokenizer model `{}` is not BPE",
            model["type"].as_str().unwrap_or("?")
        ));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err("SentencePiece-style BPE (byte_fallback) is not supported".into());
    }
    let pre = pre_type(&json)?;

    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![NORMAL; n_vocab];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<(), String> {
        let slot = usize::try_from(id)
            .ok()
            .filter(|&i| i < n_vocab)
            .ok_or_else(|| {
                format!("token id {id} ({text:?}) is outside the embedding's {n_vocab} rows")
            })?;
        tokens[slot] = Some(text.to_string());
        types[slot] = ty;
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or("the BPE model has no vocabulary")?;
    for (text, id) in vocab {
        put(
            id.as_u64().ok_or("non-integer vocabulary id")?,
            text,
            NORMAL,
        )?;
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(text)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err("an added token has no id or content".into());
        };
        let ty = if t["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(id, text, ty)?;
    }
    let mut padded = 0;
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                padded += 1;
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    if padded == n_vocab {
        return Err("the tokenizer has no tokens".into());
    }
    let mut merges = Vec::new();
    for m in model["merges"].as_array().into_iter().flatten() {
        let s = match m {
            Json::String(s) => s.clone(),
            Json::Array(p) => match (
                p.first().and_then(Json::as_str),
                p.get(1).and_then(Json::as_str),
            ) {
                (Some(a), Some(b)) if p.len() == 2 && !a.contains(' ') && !b.contains(' ') => {
                    format!("{a} {b}")
                }
                _ => return Err(format!("merge {m} cannot be written as \"a b\"")),
            },
            _ => return Err(format!("unexpected merge {m}")),
        };
        merges.push(Value::String(s));
    }

    let s = |v: &str| Value::String(v.into());
    let mut kvs = vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    for (key, id) in [("bos", bos), ("eos", eos)] {
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            kvs.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(id)));
        }
    }
    kvs.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    Ok(kvs)
}

/// llama.cpp's `tokenizer.ggml.pre` for the tokenizer's normalizer + pre-tokenizer.
fn pre_type(json: &Json) -> Result<&'static str, String> {
    let pre = &json["pre_tokenizer"];
    let norm = &json["normalizer"];
    let byte_level = |p: &Json, regex: bool| {
        p["type"] == "ByteLevel"
            && p["use_regex"].as_bool() == Some(regex)
            && p["add_prefix_space"].as_bool() != Some(true)
    };
    let split = |p: &Json, regex: &str| {
        p["type"] == "Split"
            && p["pattern"]["Regex"].as_str() == Some(regex)
            && p["behavior"] == "Isolated"
            && p["invert"].as_bool() != Some(true)
    };
    let seq: Vec<&Json> = if pre["type"] == "Sequence" {
        pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    } else {
        vec![pre]
    };
    let plain_norm = norm.is_null();
    let nfc = norm["type"] == "NFC";
    let kind = match seq.as_slice() {
        [b] if plain_norm && byte_level(b, true) => Some("gpt2"),
        [d, b]
            if plain_norm
                && d["type"] == "Digits"
                && d["individual_digits"].as_bool() == Some(true)
                && byte_level(b, true) =>
        {
            Some("smollm")
        }
        [s, b] if plain_norm && split(s, LLAMA3_REGEX) && byte_level(b, false) => Some("llama-bpe"),
        [s, b] if nfc && split(s, QWEN2_REGEX) && byte_level(b, false) => Some("qwen2"),
        _ => None,
    };
    kind.ok_or_else(|| {
        format!(
            "pre-tokenizer {} (normalizer {}) has no llama.cpp `tokenizer.ggml.pre` lopper knows (smollm, gpt2, llama-bpe, qwen2)",
            pre, norm
        )
    })
}

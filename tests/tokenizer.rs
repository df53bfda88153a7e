//! Tokenizer and text-loading tests: the GGUF tokenizer of the default model against the golden
//! ids (wiki and c4), plus small unit tests on hand-built metadata and strings.

use candle_core::quantized::gguf_file::{Content, Value};
use lopper::{text, tokenizer, Error};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tokenizers::Tokenizer;

struct Loaded {
    path: PathBuf,
    metadata: HashMap<String, Value>,
    tok: Tokenizer,
}

/// The default model's GGUF metadata and tokenizer, read once for all tests.
fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| {
        let path = lopper::assets::default_model().expect("fetch the default model");
        let mut f = std::fs::File::open(&path).expect("open the GGUF");
        let content = Content::read(&mut f).expect("read the GGUF header");
        let t0 = std::time::Instant::now();
        let tok = tokenizer::from_gguf(&content.metadata, &path).expect("build the tokenizer");
        eprintln!(
            "tokenizer built from GGUF metadata in {:.3} s",
            t0.elapsed().as_secs_f64()
        );
        Loaded {
            path,
            metadata: content.metadata,
            tok,
        }
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn ids_sha256(ids: &[u32]) -> String {
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.to_le_bytes());
    }
    format!("{:x}", h.finalize())
}

fn enc(s: &str) -> Vec<u32> {
    let l = loaded();
    tokenizer::encode(&l.tok, s, &l.path).expect("encode")
}

fn dec(ids: &[u32]) -> String {
    let l = loaded();
    tokenizer::decode(&l.tok, ids, false, &l.path).expect("decode")
}

/// Compare a processed text and its ids with a golden `tokenizer_*.json`.
fn check_golden(name: &str, text: &str) {
    let dir = lopper::assets::golden_dir()
        .expect("golden reference directory ../shared/golden (or $LOPPER_GOLDEN) is missing");
    let gpath = dir.join(name);
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&gpath).expect("read golden json"))
            .expect("parse golden json");
    assert_eq!(
        sha256_hex(text.as_bytes()),
        golden["processed_text_sha256"]
            .as_str()
            .expect("processed_text_sha256"),
        "{name}: processed text differs"
    );
    assert_eq!(
        text.len() as u64,
        golden["processed_text_utf8_bytes"].as_u64().expect("bytes")
    );
    assert_eq!(
        text.chars().count() as u64,
        golden["processed_text_chars"].as_u64().expect("chars")
    );

    let l = loaded();
    let t0 = std::time::Instant::now();
    let ids = tokenizer::encode(&l.tok, text, &l.path).expect("encode");
    eprintln!(
        "{name}: encoded {} bytes into {} tokens in {:.2} s",
        text.len(),
        ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let first: Vec<u32> = golden["first_2000_ids"]
        .as_array()
        .expect("first_2000_ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    assert_eq!(first.len(), 2000);
    let n = first.len().min(ids.len());
    if let Some(i) = (0..n).find(|&i| ids[i] != first[i]) {
        panic!(
            "{name}: first mismatch at id {i}: got {:?}, expected {:?} (text {:?})",
            &ids[i..(i + 5).min(ids.len())],
            &first[i..(i + 5).min(first.len())],
            dec(&ids[i.saturating_sub(5)..(i + 5).min(ids.len())])
        );
    }
    assert_eq!(
        ids.len() as u64,
        golden["token_count"].as_u64().expect("token_count"),
        "{name}: token count"
    );
    assert_eq!(
        ids_sha256(&ids),
        golden["sha256_u32le_all_ids"]
            .as_str()
            .expect("sha256_u32le_all_ids"),
        "{name}: ids differ"
    );
}

#[test]
fn golden_wiki_ids() {
    let path = lopper::assets::wiki_text().expect("fetch wiki text");
    let text = text::load_eval_text(&path).expect("load wiki text");
    check_golden("tokenizer_wiki.json", &text);
}

#[test]
fn golden_c4_ids() {
    let path = lopper::assets::c4_text().expect("fetch c4 text");
    let text = text::load_calib_text(&path).expect("load c4 text");
    check_golden("tokenizer_c4.json", &text);
}

#[test]
fn digits_are_split_one_by_one() {
    let l = loaded();
    for s in ["12345", "in 2024, 3.14159", "\n\n1999", "x99y"] {
        let ids = enc(s);
        let pieces: Vec<String> = ids.iter().map(|&i| dec(&[i])).collect();
        for p in &pieces {
            if p.chars().any(|c| c.is_ascii_digit()) {
                assert_eq!(
                    p.chars().count(),
                    1,
                    "{s:?} -> {pieces:?}: a digit token holds more than one char"
                );
            }
        }
        assert_eq!(pieces.concat(), s);
    }
    let ids = enc("12345");
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[0], l.tok.token_to_id("1").expect("token 1"));
}

#[test]
fn no_bos_or_eos_added() {
    let l = loaded();
    let sp = tokenizer::special_ids(&l.metadata, &l.path).expect("special ids");
    eprintln!("special ids: {sp:?}");
    assert!(sp.bos.is_some() && sp.eos.is_some());
    let ids = enc("Hello world");
    assert_eq!(dec(&ids), "Hello world");
    assert!(!ids.contains(&sp.bos.unwrap_or(u32::MAX)));
    assert!(!ids.contains(&sp.eos.unwrap_or(u32::MAX)));
    assert_eq!(ids.len(), 2);
    assert!(tokenizer::encode(&l.tok, "", &l.path)
        .expect("encode empty")
        .is_empty());
}

#[test]
fn decode_inverts_encode() {
    for s in [
        "Hello, world!",
        "  leading and trailing spaces  ",
        "line one\nline two\n\n\nline five\r\n\ttabbed",
        "naïve café, Größe, ĳ, Ελληνικά, русский, 日本語のテキスト, 한국어",
        "emoji 🦀🚀 and math ∑∫√ and zero-width \u{200b}joiner",
        "digits 0123456789 and ½ ² ١٢٣",
        "'s 're 've don't I'LL",
    ] {
        let ids = enc(s);
        assert!(!ids.is_empty());
        assert_eq!(dec(&ids), s, "round trip of {s:?}");
    }
}

#[test]
fn control_tokens_are_special() {
    let l = loaded();
    let Some(im_start) = l.tok.token_to_id("<|im_start|>") else {
        eprintln!("SKIPPED: the model has no <|im_start|>");
        return;
    };
    let ids = enc("<|im_start|>user\nHi");
    assert_eq!(ids[0], im_start);
    let skipped = tokenizer::decode(&l.tok, &ids, true, &l.path).expect("decode");
    assert_eq!(skipped, "user\nHi");
}

#[test]
fn tokenizer_json_round_trip() {
    let l = loaded();
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("tokenizer.json");
    l.tok.save(&p, false).expect("save tokenizer.json");
    let tok2 = tokenizer::load_tokenizer_json(&p).expect("load tokenizer.json");
    let s = "The year 1987 was\n\n42 <|im_end|> déjà vu";
    assert_eq!(tokenizer::encode(&tok2, s, &p).expect("encode"), enc(s));

    let missing = dir.path().join("nope").join("tokenizer.json");
    let err = tokenizer::load_tokenizer_json(&missing).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, b"{ not json").expect("write");
    let err = tokenizer::load_tokenizer_json(&bad).unwrap_err();
    assert!(matches!(err, Error::Tokenizer { .. }), "{err}");
    assert!(err.to_string().contains("bad.json"), "{err}");
}

// ---- hand-built metadata ----

/// GPT-2 byte-to-unicode mapping of one byte.
fn byte_char(b: u8) -> char {
    let printable =
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable {
        return char::from(b);
    }
    let mut n = 0u32;
    for x in 0u8..=255 {
        let p =
            (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
        if !p {
            if x == b {
                return char::from_u32(256 + n).expect("char");
            }
            n += 1;
        }
    }
    unreachable!()
}

/// A tiny byte-level vocabulary: 256 byte tokens, a few merges, one control token.
fn tiny_metadata(model: &str, pre: Option<&str>) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = (0u8..=255).map(|b| byte_char(b).to_string()).collect();
    let merges = ["1 2", "12 3", "4 5", "Ġ t", "h e", "Ġt he"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("xyz".into()); // in the vocabulary, but no merge builds it
    tokens.push("<|eot|>".into());
    let mut types = vec![Value::I32(1); tokens.len()];
    let eot = tokens.len() - 1;
    types[eot] = Value::I32(3);
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".into(), Value::String(model.into()));
    if let Some(p) = pre {
        md.insert("tokenizer.ggml.pre".into(), Value::String(p.into()));
    }
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(
            merges
                .iter()
                .map(|m| Value::String(m.to_string()))
                .collect(),
        ),
    );
    md.insert("tokenizer.ggml.token_type".into(), Value::Array(types));
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(eot as u32));
    md
}

fn tiny_pieces(pre: Option<&str>, s: &str) -> Vec<String> {
    let p = Path::new("tiny.gguf");
    let tok = tokenizer::from_gguf(&tiny_metadata("gpt2", pre), p).expect("build tiny tokenizer");
    let ids = tokenizer::encode(&tok, s, p).expect("encode");
    let back = tokenizer::decode(&tok, &ids, false, p).expect("decode");
    assert_eq!(back, s, "pre {pre:?}");
    ids.iter()
        .map(|&i| tok.id_to_token(i).expect("token"))
        .collect()
}

#[test]
fn tiny_pre_types() {
    // smollm: digits one by one, so no "123" even though it is a merge.
    assert_eq!(
        tiny_pieces(Some("smollm"), "12345"),
        ["1", "2", "3", "4", "5"]
    );
    // gpt2: digits grouped by the regex, merges apply.
    assert_eq!(tiny_pieces(None, "12345"), ["123", "45"]);
    assert_eq!(tiny_pieces(Some("gpt2"), " the"), ["Ġthe"]);
    // llama3: digits in groups of three ("451" | "234"), where gpt2 merges the whole number.
    assert_eq!(
        tiny_pieces(Some("llama-bpe"), "451234 the"),
        ["45", "1", "2", "3", "4", "Ġthe"]
    );
    assert_eq!(
        tiny_pieces(Some("gpt2"), "451234 the"),
        ["45", "123", "4", "Ġthe"]
    );
    // llama3 takes whole words found in the vocabulary (ignore_merges); the others merge.
    assert_eq!(tiny_pieces(Some("llama3"), "xyz"), ["xyz"]);
    assert_eq!(tiny_pieces(Some("smollm"), "xyz"), ["x", "y", "z"]);
    // qwen2: one digit at a time.
    assert_eq!(tiny_pieces(Some("qwen2"), "1234"), ["1", "2", "3", "4"]);
    // control token recognised in text
    assert_eq!(
        tiny_pieces(Some("smollm"), "12<|eot|>"),
        ["1", "2", "<|eot|>"]
    );
}

#[test]
fn unsupported_model_and_pre_are_errors() {
    let p = Path::new("some/model.gguf");
    let err = tokenizer::from_gguf(&tiny_metadata("llama", Some("default")), p).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Tokenizer { .. }));
    assert!(
        msg.contains("model.gguf") && msg.contains("`llama`") && msg.contains("unsupported"),
        "{msg}"
    );

    let err = tokenizer::from_gguf(&tiny_metadata("gpt2", Some("deepseek-coder")), p).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("deepseek-coder") && msg.contains("smollm"),
        "{msg}"
    );

    let mut md = tiny_metadata("gpt2", None);
    md.remove("tokenizer.ggml.model");
    let msg = tokenizer::from_gguf(&md, p).unwrap_err().to_string();
    assert!(msg.contains("no tokenizer"), "{msg}");

    let mut md = tiny_metadata("gpt2", None);
    md.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(vec![Value::String("nospace".into())]),
    );
    let msg = tokenizer::from_gguf(&md, p).unwrap_err().to_string();
    assert!(msg.contains("nospace"), "{msg}");

    let mut md = tiny_metadata("gpt2", None);
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1_000_000));
    let msg = tokenizer::from_gguf(&md, p).unwrap_err().to_string();
    assert!(msg.contains("bos_token_id"), "{msg}");
}

// ---- text loading ----

#[test]
fn doc_tags_are_stripped_like_python_re_sub() {
    // Expected value computed with Python:
    // re.sub(r'<doc[^>]*>\n?|</doc>\n?', '', s)
    let s = "<doc id=\"1\" title=\"A\">\nTitle\n\nBody <b>x</b> a<doc and </doc> mid\n</doc>\n<doc\nmulti>\nZ\n</doc></doc>\n<document>end<doc no close";
    assert_eq!(
        text::strip_doc_tags(s),
        "Title\n\nBody <b>x</b> a mid\nZ\nend<doc no close"
    );
    let plain = "no tags here <b>\n";
    assert_eq!(text::strip_doc_tags(plain), plain);

    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("w.txt");
    std::fs::write(
        &f,
        "<doc id=\"7\">\nHello\n</doc>\n<doc id=\"8\">\nWorld\n</doc>\n",
    )
    .expect("write");
    assert_eq!(text::load_eval_text(&f).expect("load"), "Hello\nWorld\n");
    std::fs::write(&f, "<doc id=\"7\">\n</doc>\n").expect("write");
    let err = text::load_eval_text(&f).unwrap_err();
    assert!(
        matches!(err, Error::Text { .. }) && err.to_string().contains("w.txt"),
        "{err}"
    );
}

#[test]
fn calib_documents_joined_with_blank_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("c.txt");
    std::fs::write(&f, "doc one\ndoc two\n\ndoc three\n").expect("write");
    assert_eq!(
        text::load_calib_text(&f).expect("load"),
        "doc one\n\ndoc two\n\ndoc three"
    );
    std::fs::write(&f, "\n\n").expect("write");
    assert!(matches!(text::load_calib_text(&f), Err(Error::Text { .. })));
}

#[test]
fn non_utf8_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("latin1.txt");
    std::fs::write(&f, b"caf\xe9 au lait").expect("write");
    for err in [
        text::load_eval_text(&f).unwrap_err(),
        text::load_calib_text(&f).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, Error::Text { .. }), "{msg}");
        assert!(
            msg.contains("latin1.txt") && msg.contains("UTF-8") && msg.contains("offset 3"),
            "{msg}"
        );
    }
    let err = text::load_eval_text(dir.path().join("missing.txt")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.txt"));
}

//! The newer families (qwen3, phi3, gemma3, mixtral, qwen3-moe) against transformers' logits
//! on the tiny random models of ../shared/golden/tiny, through every way in and out: HF load,
//! HF save + reload, GGUF write + load, KV-cache decoding; and the bad inputs the loaders refuse.

mod common;
use common::*;
use lopper::model::forward::forward_logits;
use lopper::Model;
use std::path::Path;

const NEW: [&str; 5] = [
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-gemma3",
    "tiny-mixtral",
    "tiny-qwen3-moe",
];

fn tiny(name: &str) -> std::path::PathBuf {
    golden().join("tiny").join(name)
}

fn load(path: &Path) -> Model {
    lopper::io::load_model(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Rows of golden ids and the logits `[rows, t, vocab]`.
struct Golden {
    rows: Vec<Vec<u32>>,
    logits: Vec<f32>,
    vocab: usize,
}

fn golden_of(name: &str) -> Golden {
    let g = read_safetensors(&tiny(name).join("golden_logits.safetensors"));
    let ids = &g["input_ids"];
    let (b, t) = (ids.shape[0], ids.shape[1]);
    Golden {
        rows: (0..b)
            .map(|s| {
                ids.i64[s * t..(s + 1) * t]
                    .iter()
                    .map(|&v| v as u32)
                    .collect()
            })
            .collect(),
        logits: g["logits"].f32.clone(),
        vocab: g["logits"].shape[2],
    }
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > row[b] { i } else { b })
}

/// max |Δ| / max |golden logit| over both rows, and whether every position's argmax agrees
/// with transformers' where its top-2 gap is clear of float rounding.
fn compare(model: &Model, g: &Golden) -> (f32, bool) {
    let (mut worst, mut scale, mut greedy_ok) = (0f32, 0f32, true);
    for (s, seq) in g.rows.iter().enumerate() {
        let logits = forward_logits(model, seq).unwrap();
        let n = seq.len() * g.vocab;
        let r = &g.logits[s * n..(s + 1) * n];
        assert_eq!(logits.len(), r.len());
        for (a, b) in logits.iter().zip(r) {
            worst = worst.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        for (mine, theirs) in logits.chunks(g.vocab).zip(r.chunks(g.vocab)) {
            let best = argmax(theirs);
            let mut sorted = theirs.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 1e-4 && argmax(mine) != best {
                greedy_ok = false;
            }
        }
    }
    (worst / scale, greedy_ok)
}

fn check(name: &str, model: &Model, what: &str) -> f32 {
    let g = golden_of(name);
    let (rel, greedy) = compare(model, &g);
    eprintln!("{name} ({what}): max |Δlogit| / max |logit| = {rel:.2e}");
    assert!(rel <= 1e-4, "{name} ({what}): relative logit error {rel}");
    assert!(
        greedy,
        "{name} ({what}): greedy token differs from transformers'"
    );
    rel
}

#[test]
fn new_families_match_transformers_from_hf() {
    for name in NEW {
        let m = load(&tiny(name));
        check(name, &m, "HF");
    }
}

/// Each family's distinguishing feature changes the logits: without it the same weights are
/// far off (the golden comparison above therefore tests that feature).
#[test]
fn family_features_are_exercised() {
    let off = |name: &str, edit: &dyn Fn(&mut Model)| {
        let mut m = load(&tiny(name));
        edit(&mut m);
        let (rel, _) = compare(&m, &golden_of(name));
        assert!(
            rel > 1e-2,
            "{name}: the feature changes logits by only {rel}"
        );
    };
    off("tiny-qwen3", &|m| {
        m.weights
            .layers
            .iter_mut()
            .for_each(|l| l.extra.q_norm = None)
    });
    off("tiny-gemma3", &|m| m.weights.embed_scale = None);
    off("tiny-gemma3", &|m| {
        m.config.family.sliding_layers = vec![false; 4]
    });
    off("tiny-gemma3", &|m| m.config.family.rope_local_theta = None);
    off("tiny-gemma3", &|m| {
        m.config.family.query_pre_attn_scalar = Some(16.0)
    });
    off("tiny-qwen3-moe", &|m| {
        if let Some(x) = &mut m.config.family.moe {
            x.norm_topk_prob = false
        }
    });
    off("tiny-mixtral", &|m| {
        if let Some(x) = &mut m.config.family.moe {
            x.top_k = 1
        }
    });
}

#[test]
fn new_families_survive_hf_save_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    for name in NEW {
        let m = load(&tiny(name));
        let out = tmp.path().join(name);
        lopper::io::save::save_hf(&m, &out, lopper::io::save::SaveDtype::F32, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // transformers' tensor names and config keys come back.
        let ours = tensor_names(&out.join("model.safetensors"));
        let theirs = tensor_names(&tiny(name).join("model.safetensors"));
        assert_eq!(
            ours, theirs,
            "{name}: saved tensor names differ from transformers'"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let orig: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny(name).join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], orig["model_type"], "{name}");
        let back = load(&out);
        check(name, &back, "HF save + reload");
    }
}

fn tensor_names(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = read_safetensors(path).into_keys().collect();
    v.sort();
    v
}

#[test]
fn qwen3_phi3_gemma3_survive_gguf_write_and_load() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, arch) in [
        ("tiny-qwen3", "qwen3"),
        ("tiny-phi3", "phi3"),
        ("tiny-gemma3", "gemma3"),
    ] {
        let m = load(&tiny(name));
        let out = tmp.path().join(format!("{name}.gguf"));
        let w = lopper::io::gguf_write::save_gguf(
            &m,
            &out,
            lopper::io::gguf_write::GgufDtype::F32,
            false,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(w.arch, arch);
        let f = lopper::io::gguf::GgufFile::open(&out).unwrap();
        if name == "tiny-phi3" {
            assert!(
                f.has_tensor("blk.0.attn_qkv.weight") && !f.has_tensor("blk.0.ffn_gate.weight")
            );
        } else {
            assert!(f.has_tensor("blk.0.attn_q_norm.weight"));
        }
        let back = load(&out);
        assert_eq!(back.config.arch, m.config.arch);
        check(name, &back, "GGUF write + load");
    }
}

/// Decoding with the KV cache (sliding and global layers, q/k norms, experts) picks the tokens
/// the full-window forward picks.
#[test]
fn kv_cache_decoding_equals_full_forward() {
    use lopper::runtime::generate::{generate, GenerateOpts};
    for name in NEW {
        let m = load(&tiny(name));
        let prompt: Vec<u32> = golden_of(name).rows[0][..20].to_vec();
        let opts = GenerateOpts {
            max_new: 16,
            stop_at_eos: false,
            ..GenerateOpts::default()
        };
        let mut got = Vec::new();
        generate(&m, &prompt, &opts, &mut |t| got.push(t)).unwrap();
        let mut seq = prompt.clone();
        for _ in 0..16 {
            let logits = forward_logits(&m, &seq).unwrap();
            let v = m.config.vocab_size;
            seq.push(argmax(&logits[(seq.len() - 1) * v..]) as u32);
        }
        assert_eq!(got, seq[prompt.len()..], "{name}: cached decoding differs");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn unknown_architecture_is_refused_naming_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&tiny("tiny-qwen3"), &dir);
    edit_config(&dir, |v| v["model_type"] = "falcon_h1".into());
    let e = lopper::io::load_model(&dir)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("falcon_h1"), "{e}");
    for known in [
        "llama",
        "qwen3",
        "phi3",
        "gemma3_text",
        "mixtral",
        "qwen3_moe",
    ] {
        assert!(e.contains(known), "{e} should name {known}");
    }
}

#[test]
fn expert_count_disagreeing_with_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, key, n, tensor) in [
        (
            "tiny-mixtral",
            "num_local_experts",
            6,
            "model.layers.0.block_sparse_moe.gate.weight",
        ),
        (
            "tiny-qwen3-moe",
            "num_local_experts",
            9,
            "model.layers.0.mlp.gate.weight",
        ),
    ] {
        let dir = tmp.path().join(name);
        copy_dir(&tiny(name), &dir);
        edit_config(&dir, |v| v[key] = n.into());
        let e = lopper::io::load_model(&dir)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(tensor), "{name}: {e} should name {tensor}");
    }
    // Qwen3-MoE checkpoints in the wild say `num_experts`; it wins over the other spelling.
    let dir = tmp.path().join("num_experts");
    copy_dir(&tiny("tiny-qwen3-moe"), &dir);
    edit_config(&dir, |v| {
        v["num_experts"] = 8.into();
        v["num_local_experts"] = 4.into();
    });
    check("tiny-qwen3-moe", &load(&dir), "num_experts spelling");
}

/// Gemma 3's older config spellings (`rope_theta` + `rope_local_base_freq`,
/// `sliding_window_pattern` instead of `layer_types`) load to the same model.
#[test]
fn gemma3_older_config_spellings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("g");
    copy_dir(&tiny("tiny-gemma3"), &dir);
    edit_config(&dir, |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.remove("layer_types");
        o.remove("_sliding_window_pattern");
        o.insert("rope_theta".into(), 1e6.into());
        o.insert("rope_local_base_freq".into(), 1e4.into());
        o.insert("sliding_window_pattern".into(), 4.into());
    });
    check(
        "tiny-gemma3",
        &load(&dir),
        "rope_theta + rope_local_base_freq",
    );
}

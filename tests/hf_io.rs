//! HF directory loading and saving: the tiny random golden models, both RoPE config spellings,
//! save → load round trips (f32 bit-exact, f16 / bf16 correctly rounded), atomic save rules,
//! per-layer (pruned) shapes, and every kind of bad input giving the right error naming the file.

use lopper::io::hf::{self, SafetensorsFile};
use lopper::io::save::{save_hf, write_safetensors, SaveDtype};
use lopper::model::weights::Storage;
use lopper::{Arch, Error, Model, RopeScaling, Tensor};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

const MODELS: [&str; 4] = [
    "tiny-llama3",
    "tiny-llama-tied-bias",
    "tiny-qwen2",
    "tiny-mistral",
];

fn tiny(name: &str) -> PathBuf {
    let golden = lopper::assets::golden_dir().expect("golden data not found (set LOPPER_GOLDEN)");
    golden.join("tiny").join(name)
}

fn load(name: &str) -> Model {
    hf::load_dir(&tiny(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A writable copy of a tiny model (config.json and model.safetensors) in a fresh temp dir.
fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::write(dir.join(f), fs::read(tiny(name).join(f)).unwrap()).unwrap();
    }
    (tmp, dir)
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn write_config(dir: &Path, v: &Value) {
    fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(v).unwrap(),
    )
    .unwrap();
}

/// One raw safetensors entry: name, dtype, shape, bytes.
type Raw = (String, String, Vec<usize>, Vec<u8>);

/// Read every entry of a safetensors file.
fn read_raw(path: &Path) -> Vec<Raw> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let (dt, shape) = f.info(n).unwrap();
            (
                n.to_string(),
                dt.to_string(),
                shape.to_vec(),
                f.raw(n).unwrap().to_vec(),
            )
        })
        .collect()
}

/// Write raw entries as a well-formed safetensors file.
fn write_raw(path: &Path, entries: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, dt, shape, bytes) in entries {
        header.insert(
            n.clone(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
        );
        off += bytes.len();
    }
    let mut head = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    for (_, _, _, b) in entries {
        out.extend_from_slice(b);
    }
    fs::write(path, out).unwrap();
}

/// Rewrite the model.safetensors of `dir` through `f`.
fn rewrite(dir: &Path, f: impl FnOnce(&mut Vec<Raw>)) {
    let p = dir.join("model.safetensors");
    let mut entries = read_raw(&p);
    f(&mut entries);
    write_raw(&p, &entries);
}

fn all_tensors(m: &Model) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    m.weights
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape.clone(), t.data().to_vec()))
        .collect()
}

/// The error of loading `dir`; panics if it loads.
fn load_err(dir: &Path) -> Error {
    match hf::load_dir(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn tiny_models_load_with_right_config() {
    for name in MODELS {
        let m = load(name);
        let c = &m.config;
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers
            ),
            (320, 64, 160, 3),
            "{name}"
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (8, 2, 8),
            "{name}"
        );
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(m.weights.layers.len(), 3);
        assert!(m.tokenizer.is_none() && m.chat_template.is_none());
        assert!(
            matches!(m.weights.embed.data, Storage::Mapped { .. }),
            "{name}: f32 weights should be memory-mapped"
        );
        assert_eq!(m.weights.lm_head.is_none(), c.tie_word_embeddings, "{name}");
        for l in &m.weights.layers {
            assert_eq!(l.q.weight.shape, vec![64, 64]);
            assert_eq!(l.k.weight.shape, vec![16, 64]);
            assert_eq!(l.down.weight.shape, vec![64, 160]);
            assert_eq!(l.q.bias.is_some(), c.qkv_bias);
            assert_eq!(l.k.bias.is_some(), c.qkv_bias);
            assert_eq!(l.v.bias.is_some(), c.qkv_bias);
            assert_eq!(l.o.bias.is_some(), c.o_bias);
            for lin in [&l.gate, &l.up, &l.down] {
                assert_eq!(lin.bias.is_some(), c.mlp_bias);
            }
        }
        // Values are the file's bytes.
        let f = SafetensorsFile::open(&tiny(name).join("model.safetensors")).unwrap();
        let raw = f.raw("model.norm.weight").unwrap();
        let want: Vec<f32> = raw
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(m.weights.final_norm.data(), &want[..]);
    }
    let c = load("tiny-llama3").config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64
        }
    );
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    assert_eq!(c.max_position_embeddings, 512);

    let c = load("tiny-llama-tied-bias").config;
    assert!(c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
    assert_eq!(
        (c.rope_theta, &c.rope_scaling),
        (10000.0, &RopeScaling::Default)
    );

    let c = load("tiny-qwen2").config;
    assert_eq!(c.arch, Arch::Qwen2);
    assert!(c.tie_word_embeddings && c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!((c.bos_token_id, c.eos_token_id), (None, None));

    let c = load("tiny-mistral").config;
    assert_eq!(c.arch, Arch::Mistral);
    assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
}

/// transformers-4 spelling: top-level `rope_theta` + `rope_scaling`.
fn to_old_style(v: &mut Value) {
    let obj = v.as_object_mut().unwrap();
    let mut rp = obj.remove("rope_parameters").unwrap();
    let rp = rp.as_object_mut().unwrap();
    let theta = rp.remove("rope_theta").unwrap();
    obj.insert("rope_theta".into(), theta);
    let scaling = if rp["rope_type"] == "default" {
        Value::Null
    } else {
        // Old configs spell the key `type`.
        let t = rp.remove("rope_type").unwrap();
        rp.insert("type".into(), t);
        Value::Object(rp.clone())
    };
    obj.insert("rope_scaling".into(), scaling);
}

#[test]
fn old_style_config_parses_the_same() {
    for name in MODELS {
        let (_tmp, dir) = copy_model(name);
        let mut v = read_config(&dir);
        to_old_style(&mut v);
        assert!(v.get("rope_parameters").is_none() && v.get("rope_theta").is_some());
        write_config(&dir, &v);
        let old = hf::load_dir(&dir).unwrap();
        assert_eq!(old.config, load(name).config, "{name}");
    }
}

#[test]
fn config_defaults_and_variants() {
    let p = Path::new("x/config.json");
    let base = json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4
    });
    let c = hf::parse_config(&base, p).unwrap();
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.rope_theta),
        (4, 8, 10000.0)
    );
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert!(!c.tie_word_embeddings && !c.qkv_bias && c.bos_token_id.is_none());

    let mut v = base.clone();
    v["head_dim"] = Value::Null;
    v["eos_token_id"] = json!([7, 9]);
    v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    v["rope_theta"] = json!(1e4);
    let c = hf::parse_config(&v, p).unwrap();
    assert_eq!((c.head_dim, c.eos_token_id), (8, Some(7)));
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });

    for (field, bad) in [
        ("hidden_size", Value::Null),
        ("num_hidden_layers", json!("three")),
        ("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0})),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
        ),
    ] {
        let mut v = base.clone();
        v[field] = bad;
        match hf::parse_config(&v, p) {
            Err(e @ Error::Config { .. }) => {
                let s = e.to_string();
                assert!(s.contains("x/config.json"), "{s}");
            }
            other => panic!(
                "{field}: expected a config error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("intermediate_size");
    let e = hf::parse_config(&v, p).unwrap_err().to_string();
    assert!(
        e.contains("intermediate_size") && e.contains("x/config.json"),
        "{e}"
    );
}

/// `sliding_window`: read for mistral (null: none; 0 refused), never for llama; a qwen2 config
/// whose window would apply to some layer is refused with the fix, one that slides no layer loads.
#[test]
fn sliding_window_config() {
    let p = Path::new("x/config.json");
    let base = json!({
        "model_type": "mistral", "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "sliding_window": 4096
    });
    assert_eq!(
        hf::parse_config(&base, p).unwrap().sliding_window,
        Some(4096)
    );
    let mut v = base.clone();
    v["sliding_window"] = Value::Null;
    assert_eq!(hf::parse_config(&v, p).unwrap().sliding_window, None);
    v["sliding_window"] = json!(0);
    let e = hf::parse_config(&v, p).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    v["sliding_window"] = json!(16);
    v["model_type"] = json!("llama");
    assert_eq!(hf::parse_config(&v, p).unwrap().sliding_window, None);

    v["model_type"] = json!("qwen2");
    v["use_sliding_window"] = json!(true);
    v["max_window_layers"] = json!(1);
    let e = hf::parse_config(&v, p).unwrap_err().to_string();
    assert!(
        e.contains("use_sliding_window") && e.contains("x/config.json"),
        "{e}"
    );
    v["max_window_layers"] = json!(2);
    assert_eq!(hf::parse_config(&v, p).unwrap().sliding_window, None);
    v["max_window_layers"] = json!(1);
    v["use_sliding_window"] = json!(false);
    assert_eq!(hf::parse_config(&v, p).unwrap().sliding_window, None);
}

fn assert_same_config_and_tensors(a: &Model, b: &Model) {
    assert_eq!(a.config, b.config);
    let (ta, tb) = (all_tensors(a), all_tensors(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, sa, da), (nb, sb, db)) in ta.iter().zip(&tb) {
        assert_eq!((na, sa), (nb, sb));
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(da) == bits(db), "{na} differs after the round trip");
    }
}

#[test]
fn save_load_round_trip_f32_is_bit_exact() {
    for name in MODELS {
        let m = load(name);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        save_hf(&m, &out, SaveDtype::F32, false).unwrap();
        let back = hf::load_dir(&out).unwrap();
        assert_same_config_and_tensors(&m, &back);
        let cfg = read_config(&out);
        assert_eq!(cfg["torch_dtype"], "float32");
        assert!(cfg.get("lopper_layers").is_none());
        assert!(cfg.get("rope_parameters").is_none() && cfg.get("rope_theta").is_some());
        // The reference parser accepts the file.
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), m.weights.named_tensors().len());
        assert!(st
            .tensors()
            .iter()
            .all(|(_, v)| v.dtype() == safetensors::Dtype::F32));
        let names = read_raw(&out.join("model.safetensors"));
        let has_head = names.iter().any(|(n, ..)| n == "lm_head.weight");
        assert_eq!(has_head, !m.config.tie_word_embeddings, "{name}");
        let gen: Value =
            serde_json::from_slice(&fs::read(out.join("generation_config.json")).unwrap()).unwrap();
        assert_eq!(
            gen.get("eos_token_id").and_then(Value::as_u64),
            m.config.eos_token_id.map(u64::from)
        );
        // Nothing else left next to the output.
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("saved")]);
    }
}

#[test]
fn save_load_round_trip_half_precision_is_correctly_rounded() {
    let m = load("tiny-llama-tied-bias");
    for dtype in [SaveDtype::F16, SaveDtype::Bf16] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(dtype.to_string());
        save_hf(&m, &out, dtype, false).unwrap();
        let back = hf::load_dir(&out).unwrap();
        assert_eq!(back.config, m.config);
        assert_eq!(read_config(&out)["torch_dtype"], dtype.torch_name());
        assert!(matches!(back.weights.embed.data, Storage::Owned(_)));
        let bytes = fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let want = if dtype == SaveDtype::F16 {
            safetensors::Dtype::F16
        } else {
            safetensors::Dtype::BF16
        };
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == want));
        for ((n, _, a), (_, _, b)) in all_tensors(&m).iter().zip(&all_tensors(&back)) {
            for (x, y) in a.iter().zip(b) {
                let want = match dtype {
                    SaveDtype::F16 => half::f16::from_f32(*x).to_f32(),
                    _ => half::bf16::from_f32(*x).to_f32(),
                };
                assert_eq!(want.to_bits(), y.to_bits(), "{n}: {x} saved as {y}");
                let rel = if dtype == SaveDtype::F16 {
                    1.0 / 2048.0
                } else {
                    1.0 / 256.0
                };
                assert!((x - y).abs() <= x.abs() * rel + 1e-7, "{n}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn save_dtype_parses() {
    assert_eq!("bf16".parse::<SaveDtype>().unwrap(), SaveDtype::Bf16);
    assert_eq!("float16".parse::<SaveDtype>().unwrap(), SaveDtype::F16);
    assert_eq!("F32".parse::<SaveDtype>().unwrap(), SaveDtype::F32);
    assert!(matches!(
        "int8".parse::<SaveDtype>(),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn save_refuses_existing_output_without_force() {
    let m = load("tiny-mistral");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = save_hf(&m, &out, SaveDtype::F32, false).unwrap_err();
    assert!(matches!(e, Error::Output { .. }), "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temp dir left behind"
    );

    save_hf(&m, &out, SaveDtype::F32, true).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert_same_config_and_tensors(&m, &hf::load_dir(&out).unwrap());
    assert_eq!(
        fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no temp dir left behind"
    );

    // An existing plain file is replaced too with force.
    let file_out = tmp.path().join("file");
    fs::write(&file_out, "x").unwrap();
    assert!(save_hf(&m, &file_out, SaveDtype::F32, false).is_err());
    save_hf(&m, &file_out, SaveDtype::F32, true).unwrap();
    assert!(file_out.join("model.safetensors").is_file());
}

#[test]
fn save_never_overwrites_its_input() {
    let (_tmp, dir) = copy_model("tiny-qwen2");
    let before = fs::read(dir.join("model.safetensors")).unwrap();
    let m = hf::load_dir(&dir).unwrap();
    let e = save_hf(&m, &dir, SaveDtype::F16, true).unwrap_err();
    assert!(matches!(e, Error::Output { .. }), "{e}");
    assert_eq!(fs::read(dir.join("model.safetensors")).unwrap(), before);
    assert_eq!(all_tensors(&m), all_tensors(&hf::load_dir(&dir).unwrap()));
}

/// Keep the first `n` rows of a 2-D tensor.
fn rows(t: &Tensor, n: usize) -> Tensor {
    Tensor::new(vec![n, t.cols()], t.data()[..n * t.cols()].to_vec())
}

/// Keep the first `n` columns of a 2-D tensor.
fn cols(t: &Tensor, n: usize) -> Tensor {
    let data = t
        .data()
        .chunks(t.cols())
        .flat_map(|r| r[..n].to_vec())
        .collect();
    Tensor::new(vec![t.rows(), n], data)
}

/// Narrow layer `i`'s FFN to `f` and its attention to `heads` / `kv` heads (head_dim 8).
fn prune_layer(m: &mut Model, i: usize, f: usize, heads: usize, kv: usize) {
    let l = &mut m.weights.layers[i];
    for lin in [&mut l.gate, &mut l.up] {
        lin.weight = rows(&lin.weight, f);
        lin.bias = lin
            .bias
            .as_ref()
            .map(|b| Tensor::new(vec![f], b.data()[..f].to_vec()));
    }
    l.down.weight = cols(&l.down.weight, f);
    l.q.weight = rows(&l.q.weight, heads * 8);
    l.q.bias =
        l.q.bias
            .as_ref()
            .map(|b| Tensor::new(vec![heads * 8], b.data()[..heads * 8].to_vec()));
    for lin in [&mut l.k, &mut l.v] {
        lin.weight = rows(&lin.weight, kv * 8);
        lin.bias = lin
            .bias
            .as_ref()
            .map(|b| Tensor::new(vec![kv * 8], b.data()[..kv * 8].to_vec()));
    }
    l.o.weight = cols(&l.o.weight, heads * 8);
}

#[test]
fn non_uniform_layers_round_trip_via_lopper_layers() {
    let mut m = load("tiny-llama-tied-bias");
    prune_layer(&mut m, 1, 96, 8, 2);
    prune_layer(&mut m, 2, 160, 4, 1);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    save_hf(&m, &out, SaveDtype::F32, false).unwrap();
    let cfg = read_config(&out);
    assert_eq!(cfg["intermediate_size"], 160);
    assert_eq!(
        cfg["lopper_layers"],
        json!([
            {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 160},
            {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 96},
            {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 160},
        ])
    );
    let back = hf::load_dir(&out).unwrap();
    assert_same_config_and_tensors(&m, &back);
    assert_eq!(back.weights.layers[2].n_heads(8), 4);

    // A shape that disagrees with its own lopper_layers entry is caught.
    let mut v = cfg.clone();
    v["lopper_layers"][1]["intermediate_size"] = json!(100);
    write_config(&out, &v);
    let e = load_err(&out);
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor.contains("layers.1.mlp")),
        "{e}"
    );

    // Uniformly pruned layers are written as plain HF fields.
    let mut m = load("tiny-mistral");
    for i in 0..3 {
        prune_layer(&mut m, i, 96, 4, 2);
    }
    let out = tmp.path().join("uniform");
    save_hf(&m, &out, SaveDtype::F32, false).unwrap();
    let cfg = read_config(&out);
    assert!(cfg.get("lopper_layers").is_none());
    assert_eq!(
        (
            cfg["intermediate_size"].as_u64(),
            cfg["num_attention_heads"].as_u64()
        ),
        (Some(96), Some(4))
    );
    let back = hf::load_dir(&out).unwrap();
    assert_eq!(all_tensors(&m), all_tensors(&back));
}

#[test]
fn sharded_weights_load() {
    let (_tmp, dir) = copy_model("tiny-llama3");
    let single = hf::load_dir(&dir).unwrap();
    let entries = read_raw(&dir.join("model.safetensors"));
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (a, b) = entries.split_at(entries.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        write_raw(&dir.join(file), part);
        for (n, ..) in part {
            map.insert(n.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {}, "weight_map": map});
    fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = hf::load_dir(&dir).unwrap();
    assert_same_config_and_tensors(&single, &sharded);

    fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.to_string().contains("model-00002-of-00002.safetensors"),
        "{e}"
    );
}

/// Assert `e` is a format error naming model.safetensors.
fn assert_format_err(e: Error, what: &str) {
    let s = e.to_string();
    assert!(matches!(e, Error::Format { .. }), "{what}: {s}");
    assert!(s.contains("model.safetensors"), "{what}: {s}");
}

#[test]
fn corrupt_safetensors_give_format_errors() {
    let (_tmp, dir) = copy_model("tiny-llama3");
    let p = dir.join("model.safetensors");
    let good = fs::read(&p).unwrap();

    fs::write(&p, &good[..good.len() / 2]).unwrap();
    assert_format_err(load_err(&dir), "truncated");

    fs::write(&p, &good[..5]).unwrap();
    assert_format_err(load_err(&dir), "shorter than the length prefix");

    fs::write(&p, b"").unwrap();
    assert_format_err(load_err(&dir), "empty");

    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    fs::write(&p, &bad).unwrap();
    assert_format_err(load_err(&dir), "header length past the end");

    let mut bad = good.clone();
    bad[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&p, &bad).unwrap();
    assert_format_err(load_err(&dir), "huge header length");

    let mut bad = good.clone();
    bad[8..16].copy_from_slice(b"#garbage");
    fs::write(&p, &bad).unwrap();
    assert_format_err(load_err(&dir), "bad JSON header");

    // Offsets past the end of the data: rewrite the header by hand.
    fs::write(&p, &good).unwrap();
    let entries = read_raw(&p);
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, dt, shape, b) in &entries {
        let end = if n == "model.norm.weight" {
            off + b.len() + 4096
        } else {
            off + b.len()
        };
        header.insert(
            n.clone(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [off, end]}),
        );
        off += b.len();
    }
    let head = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&head);
    entries.iter().for_each(|e| bytes.extend_from_slice(&e.3));
    fs::write(&p, &bytes).unwrap();
    let e = load_err(&dir);
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
    assert_format_err(e, "offsets past the end");

    // Data size that disagrees with dtype × shape.
    rewrite_from(&p, &good, |v| {
        v.iter_mut().find(|e| e.0 == "model.norm.weight").unwrap().2 = vec![65]
    });
    assert_format_err(load_err(&dir), "size mismatch");
}

/// Restore `good` bytes at `p`, then rewrite them through `f`.
fn rewrite_from(p: &Path, good: &[u8], f: impl FnOnce(&mut Vec<Raw>)) {
    fs::write(p, good).unwrap();
    rewrite(p.parent().unwrap(), f);
}

#[test]
fn shape_mismatch_names_file_and_tensor() {
    let (_tmp, dir) = copy_model("tiny-qwen2");
    rewrite(&dir, |v| {
        let e = v
            .iter_mut()
            .find(|e| e.0 == "model.layers.1.mlp.gate_proj.weight")
            .unwrap();
        e.2 = vec![64, 160]; // same bytes, transposed shape
    });
    let e = load_err(&dir);
    let s = e.to_string();
    assert!(
        matches!(&e, Error::Shape { tensor, .. } if tensor == "model.layers.1.mlp.gate_proj.weight"),
        "{s}"
    );
    assert!(s.contains("model.safetensors"), "{s}");

    // The config disagreeing with the tensors is the same error.
    let (_tmp, dir) = copy_model("tiny-qwen2");
    let mut v = read_config(&dir);
    v["intermediate_size"] = json!(128);
    write_config(&dir, &v);
    assert!(matches!(load_err(&dir), Error::Shape { .. }));
}

#[test]
fn missing_tensors_are_named() {
    for (model, tensor) in [
        ("tiny-llama3", "model.layers.1.self_attn.k_proj.weight"),
        ("tiny-llama3", "lm_head.weight"),
        ("tiny-qwen2", "model.layers.2.self_attn.v_proj.bias"),
        ("tiny-llama-tied-bias", "model.layers.0.mlp.down_proj.bias"),
        ("tiny-mistral", "model.norm.weight"),
    ] {
        let (_tmp, dir) = copy_model(model);
        rewrite(&dir, |v| v.retain(|e| e.0 != tensor));
        let e = load_err(&dir);
        let s = e.to_string();
        assert!(
            matches!(&e, Error::MissingTensor { tensor: t, .. } if t == tensor),
            "{s}"
        );
        assert!(s.contains("model.safetensors"), "{s}");
    }
}

#[test]
fn unknown_model_type_is_unsupported_arch() {
    let (_tmp, dir) = copy_model("tiny-mistral");
    let mut v = read_config(&dir);
    v["model_type"] = json!("gpt2");
    write_config(&dir, &v);
    let e = load_err(&dir);
    let s = e.to_string();
    assert!(
        matches!(&e, Error::UnsupportedArch { arch, .. } if arch == "gpt2"),
        "{s}"
    );
    assert!(s.contains("config.json"), "{s}");

    let mut v = read_config(&dir);
    v["model_type"] = json!("mistral");
    v.as_object_mut().unwrap().remove("num_attention_heads");
    write_config(&dir, &v);
    let s = load_err(&dir).to_string();
    assert!(
        s.contains("config.json") && s.contains("num_attention_heads"),
        "{s}"
    );

    fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
}

#[test]
fn unsupported_dtypes_are_named() {
    for (dtype, size) in [("F64", 8usize), ("I64", 8), ("I32", 4), ("U8", 1)] {
        let (_tmp, dir) = copy_model("tiny-llama3");
        rewrite(&dir, |v| {
            let e = v.iter_mut().find(|e| e.0 == "model.norm.weight").unwrap();
            e.1 = dtype.to_string();
            e.3 = vec![0u8; 64 * size];
        });
        let e = load_err(&dir);
        let s = e.to_string();
        assert!(
            matches!(&e, Error::UnsupportedDtype { tensor, .. } if tensor == "model.norm.weight"),
            "{dtype}: {s}"
        );
        assert!(s.contains("model.safetensors") && s.contains(dtype), "{s}");
    }
}

const TOKENIZER_JSON: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
  "decoder": null,
  "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}
}"#;

#[test]
fn tokenizer_and_chat_template_round_trip() {
    let (tmp, dir) = copy_model("tiny-llama3");
    fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON).unwrap();
    let tc = json!({"chat_template": "{{ messages }}", "add_bos_token": true});
    fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let m = hf::load_dir(&dir).unwrap();
    let ids = |m: &Model| {
        m.tokenizer()
            .unwrap()
            .encode("hello world x", false)
            .unwrap()
            .get_ids()
            .to_vec()
    };
    assert_eq!(ids(&m), vec![1, 2, 0]);
    assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));

    let out = tmp.path().join("out");
    save_hf(&m, &out, SaveDtype::Bf16, false).unwrap();
    let back = hf::load_dir(&out).unwrap();
    assert_eq!(ids(&back), vec![1, 2, 0]);
    assert_eq!(back.chat_template.as_deref(), Some("{{ messages }}"));
    let saved: Value =
        serde_json::from_slice(&fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(saved["add_bos_token"], true);

    // A transformers-5 chat_template.jinja wins over tokenizer_config.json.
    fs::write(dir.join("chat_template.jinja"), "jinja!").unwrap();
    assert_eq!(
        hf::load_dir(&dir).unwrap().chat_template.as_deref(),
        Some("jinja!")
    );

    fs::write(dir.join("tokenizer.json"), "{\"model\": 42").unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, Error::Tokenizer { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn write_safetensors_is_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.safetensors");
    let a = Tensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-8, f32::MAX]);
    let b = Tensor::new(vec![1], vec![0.25]);
    write_safetensors(&p, &[("a", &a), ("b", &b)], SaveDtype::F32).unwrap();
    let f = SafetensorsFile::open(&p).unwrap();
    assert_eq!(f.names(), vec!["a", "b"]);
    assert_eq!(f.tensor("a").unwrap().data(), a.data());
    assert_eq!(f.tensor("b").unwrap().data(), b.data());
    assert!(matches!(f.tensor("c"), Err(Error::MissingTensor { .. })));
    assert!(write_safetensors(&p, &[("a", &a), ("a", &b)], SaveDtype::F32).is_err());

    // Saving creates missing parent directories; a directory without config.json is named.
    let m = load("tiny-qwen2");
    let out = tmp.path().join("a/b/c");
    save_hf(&m, &out, SaveDtype::F32, false).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
}

#[test]
fn biases_the_arch_cannot_store() {
    let tmp = tempfile::tempdir().unwrap();
    // Llama with only o_proj biases (e.g. bias compensation after pruning): q/k/v get zero biases.
    let mut m = load("tiny-llama3");
    let ob = Tensor::new(vec![64], (0..64).map(|i| i as f32 * 0.01).collect());
    m.weights.layers[1].o.bias = Some(ob.clone());
    let out = tmp.path().join("llama");
    save_hf(&m, &out, SaveDtype::F32, false).unwrap();
    let back = hf::load_dir(&out).unwrap();
    assert!(back.config.qkv_bias && back.config.o_bias && !back.config.mlp_bias);
    assert_eq!(
        back.weights.layers[1].o.bias.as_ref().unwrap().data(),
        ob.data()
    );
    assert_eq!(
        back.weights.layers[0]
            .o
            .bias
            .as_ref()
            .unwrap()
            .count_zeros(),
        64
    );
    assert_eq!(
        back.weights.layers[2]
            .q
            .bias
            .as_ref()
            .unwrap()
            .count_zeros(),
        64
    );

    // Mistral and qwen2 cannot store an o_proj bias in HF form: refused, nothing written.
    for name in ["tiny-mistral", "tiny-qwen2"] {
        let mut m = load(name);
        m.weights.layers[0].o.bias = Some(ob.clone());
        let out = tmp.path().join(name);
        let e = save_hf(&m, &out, SaveDtype::F32, false).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(!out.exists());
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// Loading for block-at-a-time work (`load_model_with`, what `lopper prune` does) gives the same
/// tensors as a plain load and holds none of them in memory: f32 ones are mapped from the model
/// file, bf16 ones are converted only when read (and let go again by `release`).
#[test]
fn lazy_load_gives_the_same_tensors_none_in_memory() {
    let m = load("tiny-llama-tied-bias");
    let tmp = tempfile::tempdir().unwrap();
    let bf = tmp.path().join("bf16");
    save_hf(&m, &bf, SaveDtype::Bf16, false).unwrap();
    for (dir, lazy) in [(tiny("tiny-llama-tied-bias"), false), (bf, true)] {
        let plain = lopper::io::load_model(&dir).unwrap();
        let mut lazy_model = lopper::io::load_model_with(&dir, true).unwrap();
        for (n, t) in lazy_model.weights.named_tensors() {
            let ok = match &t.data {
                Storage::Mapped { .. } => !lazy,
                Storage::Lazy { cache, .. } => lazy && cache.get().is_none(),
                Storage::Owned(_) => false,
            };
            assert!(ok, "{}: {n} is {t:?}", dir.display());
            // Reading without keeping (saving, counting zeros) converts into a copy only.
            assert_eq!(t.values().len(), t.len());
        }
        assert_same_config_and_tensors(&plain, &lazy_model);
        let e = &mut lazy_model.weights.embed;
        if lazy {
            assert!(matches!(&e.data, Storage::Lazy { cache, .. } if cache.get().is_some()));
        }
        e.release();
        assert!(!matches!(&e.data, Storage::Lazy { cache, .. } if cache.get().is_some()));
    }
}

//! GGUF loading: the real default model against transformers' golden weights, dequantization of
//! every supported type on synthetic files, tiny synthetic llama/qwen2 models (q/k un-permutation,
//! biases, per-layer head counts), and corrupt input that must fail with a useful error.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use lopper::io::gguf::{self, permute_rows, GgufFile};
use lopper::{Arch, Error, LinearKind, RopeScaling};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod gguf_synth;
use gguf_synth::*;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Assert `r` failed, its message names `path` and contains every one of `needles`.
fn expect_err<T>(r: lopper::Result<T>, path: &Path, needles: &[&str]) -> Error {
    let e = match r {
        Ok(_) => panic!("{} loaded but should have failed", path.display()),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "message lacks `{n}`: {msg}");
    }
    e
}

// ------------------------------------------------------------ real model

fn golden_layer0() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let dir = lopper::assets::golden_dir()
        .expect("golden directory ../shared/golden (or $LOPPER_GOLDEN)");
    let bytes =
        std::fs::read(dir.join("layer0_dense.safetensors")).expect("read layer0_dense.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse golden");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

#[test]
fn default_model_matches_transformers() {
    let path = lopper::assets::default_model().expect("default model");
    let t0 = std::time::Instant::now();
    let header = GgufFile::open(&path).expect("open default model");
    let t1 = std::time::Instant::now();
    let model = gguf::load(&path).expect("load default model");
    eprintln!(
        "header parsed in {:.2?}; model loaded in {:.2?}",
        t1 - t0,
        t1.elapsed()
    );
    assert_eq!(
        header.tensor_info("blk.0.attn_q.weight"),
        Some((GgmlDType::Q4_1, vec![576, 576]))
    );
    let c = &model.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (64, 1536, 49152)
    );
    assert!(c.tie_word_embeddings && model.weights.lm_head.is_none());
    assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.bos_token_id.is_some() && c.eos_token_id.is_some());
    assert!(model.chat_template.is_some());
    let tok = model
        .tokenizer
        .as_ref()
        .expect("tokenizer from GGUF metadata");
    assert_eq!(tok.get_vocab_size(true), 49152);
    assert_eq!(model.weights.layers.len(), 30);
    assert_eq!(model.weights.embed.shape, vec![49152, 576]);

    let golden = golden_layer0();
    let l0 = &model.weights.layers[0];
    for kind in LinearKind::ALL {
        let name = format!("model.layers.0.{}.weight", kind.hf_name());
        let (shape, want) = golden
            .get(&name)
            .unwrap_or_else(|| panic!("golden lacks {name}"));
        let got = &l0.linear(kind).weight;
        assert_eq!(&got.shape, shape, "{name}");
        let d = max_diff(got.data(), want);
        assert!(d <= 1e-6, "{name}: max |lopper - transformers| = {d}");
    }
}

#[test]
fn truncated_real_file_fails_cleanly() {
    let path = lopper::assets::default_model().expect("default model");
    let bytes = std::fs::read(&path).expect("read model");
    let len = bytes.len();
    let dir = tempfile::tempdir().expect("tempdir");
    // Header, metadata (vocabulary strings), then tensor data near the start, middle and end.
    for (cut, what) in [
        (6, "header"),
        (20, "header"),
        (300, "metadata"),
        (400_000, "metadata"),
        (len / 3, "data"),
        (len - 7, "data"),
    ] {
        let p = dir.path().join(format!("cut_{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).expect("write");
        let e = expect_err(gguf::load(&p), &p, &["truncated"]);
        assert!(
            matches!(e, Error::Format { .. }),
            "cut at {cut} ({what}): {e:?}"
        );
        eprintln!("cut at {cut} ({what}): {e}");
    }
}

// ------------------------------------------------------- dequantization

#[test]
fn dequantizes_every_supported_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shape = [4usize, 512];
    let src = rnd(7, shape.iter().product());
    // (type, max abs error allowed vs the source values in [-1, 1): about half a quantization
    // step, a whole step for Q4_0/Q5_0 whose grid is asymmetric, more for K-quants' coarse scales)
    let cases = [
        (GgmlDType::F32, 0.0),
        (GgmlDType::F16, 5e-4),
        (GgmlDType::BF16, 4e-3),
        (GgmlDType::Q8_0, 5e-3),
        (GgmlDType::Q4_0, 0.13),
        (GgmlDType::Q4_1, 0.075),
        (GgmlDType::Q5_0, 0.065),
        (GgmlDType::Q5_1, 0.035),
        (GgmlDType::Q2K, 0.35),
        (GgmlDType::Q3K, 0.25),
        (GgmlDType::Q4K, 0.1),
        (GgmlDType::Q5K, 0.05),
        (GgmlDType::Q6K, 0.03),
    ];
    for (dtype, tol) in cases {
        let q = qt(&shape, &src, dtype);
        let reference = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let p = dir.path().join(format!("{dtype:?}.gguf"));
        write_gguf(
            &p,
            &[("general.architecture".into(), Value::String("llama".into()))],
            &[("t".into(), q)],
        );
        let f = GgufFile::open(&p).expect("open");
        assert_eq!(f.tensor_info("t"), Some((dtype, shape.to_vec())));
        let t = f.read_tensor("t").expect("read");
        assert_eq!(t.shape, shape.to_vec());
        assert_eq!(
            t.data(),
            &reference[..],
            "{dtype:?}: differs from candle's dequantization"
        );
        let err = max_diff(t.data(), &src);
        eprintln!("{dtype:?}: max abs error {err:.2e}");
        assert!(err <= tol, "{dtype:?}: max abs error {err} > {tol}");
    }
}

// ------------------------------------------------------ synthetic models

#[test]
fn tiny_llama_unpermutes_q_and_k() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, hf) = tiny_file(dir.path(), "llama.gguf", &Tiny::llama());
    let m = gguf::load(&p).expect("load");
    let c = &m.config;
    assert_eq!(
        (
            c.arch,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (Arch::Llama, 256, 4, 2)
    );
    assert_eq!(
        (
            c.head_dim,
            c.intermediate_size,
            c.vocab_size,
            c.max_position_embeddings
        ),
        (64, 512, VOCAB, 1024)
    );
    assert!(c.tie_word_embeddings && !c.qkv_bias);
    assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
    assert!(m.tokenizer.is_none() && m.chat_template.is_none());
    check_tiny(&m, &hf);
}

#[test]
fn tiny_llama_biases_untied_per_layer_heads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = Tiny {
        layer_heads: vec![(4, 2, 512), (2, 1, 256), (4, 4, 768)],
        tied: false,
        bias: true,
        ..Tiny::llama()
    };
    let (p, hf) = tiny_file(dir.path(), "pruned.gguf", &spec);
    let m = gguf::load(&p).expect("load");
    let c = &m.config;
    assert_eq!(
        (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size
        ),
        (4, 4, 768)
    );
    assert!(!c.tie_word_embeddings && c.qkv_bias && c.o_bias && c.mlp_bias);
    let l = &m.weights.layers;
    assert_eq!(
        (l[1].n_heads(64), l[1].n_kv_heads(64), l[1].intermediate()),
        (2, 1, 256)
    );
    check_tiny(&m, &hf);
}

#[test]
fn tiny_qwen2_is_not_permuted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = Tiny {
        arch: "qwen2",
        ..Tiny::llama()
    };
    let (p, hf) = tiny_file(dir.path(), "qwen2.gguf", &spec);
    let m = gguf::load(&p).expect("load");
    assert_eq!(m.config.arch, Arch::Qwen2);
    assert!(m.config.qkv_bias && !m.config.o_bias && !m.config.mlp_bias);
    check_tiny(&m, &hf);
}

#[test]
fn rope_scaling_from_metadata_and_rope_freqs() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Llama 3.1: the converter bakes the scaling into `rope_freqs.weight`.
    let mut parts = tiny_parts(&Tiny::llama());
    let factors = gguf::llama3_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 8192);
    let factors: Vec<f32> = factors.iter().map(|&x| x as f32).collect();
    parts.1.push((
        "rope_freqs.weight".into(),
        qt(&[32], &factors, GgmlDType::F32),
    ));
    for (k, v) in parts.0.iter_mut() {
        if k == "llama.rope.freq_base" {
            *v = Value::F32(500000.0);
        }
    }
    let p = write_parts(dir.path(), "llama31.gguf", &parts);
    let m = gguf::load(&p).expect("load");
    assert_eq!(
        m.config.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );

    let mut parts = tiny_parts(&Tiny::llama());
    parts.0.push((
        "llama.rope.scaling.type".into(),
        Value::String("linear".into()),
    ));
    parts
        .0
        .push(("llama.rope.scaling.factor".into(), Value::F32(4.0)));
    let p = write_parts(dir.path(), "linear.gguf", &parts);
    let m = gguf::load(&p).expect("load");
    assert_eq!(m.config.rope_scaling, RopeScaling::Linear { factor: 4.0 });

    let mut parts = tiny_parts(&Tiny::llama());
    parts.0.push((
        "llama.rope.scaling.type".into(),
        Value::String("yarn".into()),
    ));
    let p = write_parts(dir.path(), "yarn.gguf", &parts);
    expect_err(gguf::load(&p), &p, &["yarn", "not supported"]);
}

#[test]
fn permutation_matches_llama_cpp() {
    // llama.cpp: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2), here for 2 heads, hd 4, 3 cols.
    let (heads, hd, cols) = (2, 4, 3);
    let hf: Vec<f32> = (0..heads * hd * cols).map(|x| x as f32).collect();
    let gguf_rows = permute_rows(&hf, heads, hd, cols);
    let row_order: Vec<f32> = gguf_rows.chunks(cols).map(|r| r[0] / cols as f32).collect();
    assert_eq!(row_order, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(gguf::unpermute_rows(&gguf_rows, heads, hd, cols), hf);
}

#[test]
fn quantized_tiny_model_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut parts = tiny_parts(&Tiny::llama());
    for (name, t) in parts.1.iter_mut() {
        if name.ends_with(".weight") && t.shape().dims().len() == 2 {
            let data = t
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            *t = qt(t.shape().dims(), &data, GgmlDType::Q4K);
        }
    }
    let p = write_parts(dir.path(), "q4k.gguf", &parts);
    let m = gguf::load(&p).expect("load");
    let d = max_diff(
        m.weights.layers[0].q.weight.data(),
        &parts.2["blk.0.attn_q.weight"],
    );
    assert!(d < 0.12, "Q4_K q_proj error {d}");
}

// ------------------------------------------------------------- bad input

#[test]
fn rejects_bad_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (good, _) = tiny_file(d, "good.gguf", &Tiny::llama());
    let bytes = std::fs::read(&good).unwrap();
    let patched = |name: &str, f: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let mut b = bytes.clone();
        f(&mut b);
        let p = d.join(name);
        std::fs::write(&p, b).unwrap();
        p
    };

    let p = d.join("missing.gguf");
    let e = expect_err(gguf::load(&p), &p, &[]);
    assert!(matches!(e, Error::Io { .. }));

    let p = patched("empty.gguf", &|b| b.clear());
    expect_err(gguf::load(&p), &p, &["too short"]);

    let p = patched("magic.gguf", &|b| b[..4].copy_from_slice(b"GGML"));
    expect_err(gguf::load(&p), &p, &["magic", "not a GGUF file"]);

    let p = patched("text.gguf", &|b| {
        *b = b"hello, this is a text file\n".to_vec()
    });
    expect_err(gguf::load(&p), &p, &["magic"]);

    let p = patched("version.gguf", &|b| {
        b[4..8].copy_from_slice(&7u32.to_le_bytes())
    });
    expect_err(gguf::load(&p), &p, &["version"]);

    let p = patched("counts.gguf", &|b| {
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    expect_err(gguf::load(&p), &p, &["truncated or corrupt"]);

    let at = dtype_field(&bytes, "blk.0.ffn_down.weight");
    let p = patched("offset.gguf", &|b| {
        b[at + 4..at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    expect_err(
        gguf::load(&p),
        &p,
        &["blk.0.ffn_down.weight", "past the end of the file"],
    );
    let p = patched("offset_max.gguf", &|b| {
        b[at + 4..at + 12].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    expect_err(
        gguf::load(&p),
        &p,
        &["blk.0.ffn_down.weight", "past the end of the file"],
    );

    for (id, what) in [(99u32, "99"), (16, "IQ2_XXS"), (9, "Q8_1")] {
        let p = patched(&format!("dtype{id}.gguf"), &|b| {
            b[at..at + 4].copy_from_slice(&id.to_le_bytes())
        });
        let e = expect_err(
            gguf::load(&p),
            &p,
            &["blk.0.ffn_down.weight", "unsupported type", what],
        );
        assert!(matches!(e, Error::UnsupportedDtype { .. }), "{e:?}");
    }

    // Metadata-level problems, written as whole files.
    let variant = |name: &str, f: &dyn Fn(&mut Parts)| -> PathBuf {
        let mut parts = tiny_parts(&Tiny::llama());
        f(&mut parts);
        write_parts(d, name, &parts)
    };
    let p = variant("arch.gguf", &|x| x.0[0].1 = Value::String("gpt2".into()));
    let e = expect_err(gguf::load(&p), &p, &["gpt2", "unsupported architecture"]);
    assert!(matches!(e, Error::UnsupportedArch { .. }));

    let p = variant("noarch.gguf", &|x| {
        x.0.remove(0);
    });
    expect_err(gguf::load(&p), &p, &["general.architecture"]);

    let p = variant("noblocks.gguf", &|x| {
        x.0.retain(|(k, _)| k != "llama.block_count")
    });
    expect_err(gguf::load(&p), &p, &["llama.block_count", "missing"]);

    let p = variant("layers.gguf", &|x| {
        for (k, v) in x.0.iter_mut() {
            if k == "llama.block_count" {
                *v = Value::U64(1 << 40);
            }
        }
    });
    expect_err(gguf::load(&p), &p, &["llama.block_count", "1099511627776"]);

    let p = variant("wide.gguf", &|x| {
        for (k, v) in x.0.iter_mut() {
            if k == "llama.feed_forward_length" {
                *v = Value::U64(u64::MAX / 2);
            }
        }
    });
    expect_err(gguf::load(&p), &p, &["implausible width"]);

    let p = variant("strtype.gguf", &|x| {
        for (k, v) in x.0.iter_mut() {
            if k == "llama.embedding_length" {
                *v = Value::String("256".into());
            }
        }
    });
    expect_err(
        gguf::load(&p),
        &p,
        &["llama.embedding_length", "unexpected value"],
    );

    let e = expect_err(gguf::load(d), d, &[]);
    assert!(matches!(e, Error::Io { .. }), "{e:?}");

    let p = variant("narrow.gguf", &|x| {
        for (name, t) in x.1.iter_mut() {
            if name == "blk.0.attn_norm.weight" {
                *t = qt(&[128], &rnd(3, 128), GgmlDType::F32);
            }
        }
    });
    let e = expect_err(
        gguf::load(&p),
        &p,
        &["blk.0.attn_norm.weight", "[128]", "[256]"],
    );
    assert!(matches!(e, Error::Shape { .. }));

    let p = variant("nodown.gguf", &|x| {
        x.1.retain(|(k, _)| k != "blk.0.ffn_down.weight")
    });
    let e = expect_err(gguf::load(&p), &p, &["blk.0.ffn_down.weight", "missing"]);
    assert!(matches!(e, Error::MissingTensor { .. }));

    let p = variant("heads.gguf", &|x| {
        for (k, v) in x.0.iter_mut() {
            if k == "llama.attention.head_count" {
                *v = Value::Array(vec![Value::U32(4), Value::U32(4)]);
            }
        }
    });
    expect_err(
        gguf::load(&p),
        &p,
        &["llama.attention.head_count", "2 entries for 1 layers"],
    );

    let p = variant("align0.gguf", &|x| {
        x.0.push(("general.alignment".into(), Value::U32(0)))
    });
    expect_err(gguf::load(&p), &p, &["alignment"]);
}

/// Corrupt every header byte of a small model in turn: loading may fail, but must not panic.
#[test]
fn header_corruption_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = Tiny {
        hidden: 64,
        head_dim: 32,
        layer_heads: vec![(2, 1, 128)],
        ..Tiny::llama()
    };
    let (good, _) = tiny_file(dir.path(), "small.gguf", &spec);
    let bytes = std::fs::read(&good).unwrap();
    let header_end = dtype_field(&bytes, "output_norm.weight") + 12;
    let p = dir.path().join("corrupt.gguf");
    let (mut ok, mut failed) = (0, 0);
    for pos in 0..header_end {
        for val in [0x00u8, 0xff, bytes[pos] ^ 0x01] {
            let mut b = bytes.clone();
            b[pos] = val;
            std::fs::write(&p, &b).unwrap();
            match std::panic::catch_unwind(|| gguf::load(&p)) {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(e)) => {
                    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
                    failed += 1
                }
                Err(_) => panic!("panicked with byte {pos} set to {val:#04x}"),
            }
        }
    }
    eprintln!("{header_end} header bytes corrupted: {ok} loads succeeded, {failed} failed cleanly");
    assert!(failed > 0);
}

/// A GGUF model loaded lazily (`load_model_with`, what `lopper prune` does) has the same
/// tensors, un-permuted q/k rows included, each dequantized only when read and let go again by
/// `release`; a tensor whose data runs past the end of the file is refused at load time.
#[test]
fn lazy_gguf_load_is_the_same_model() {
    use lopper::model::weights::Storage;
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, _) = tiny_file(dir.path(), "llama.gguf", &Tiny::llama());
    let plain = gguf::load(&p).expect("load");
    let mut lazy = lopper::io::load_model_with(&p, true).expect("load lazily");
    let (a, b) = (plain.weights.named_tensors(), lazy.weights.named_tensors());
    assert_eq!(a.len(), b.len());
    for ((n, x), (m, y)) in a.iter().zip(&b) {
        assert_eq!((n, &x.shape), (m, &y.shape));
        assert!(
            matches!(&y.data, Storage::Lazy { cache, .. } if cache.get().is_none()),
            "{n} is {y:?}"
        );
        assert!(x.data() == &*y.values(), "{n} differs");
    }
    let q = &mut lazy.weights.layers[0].q.weight;
    assert!(q.data() == plain.weights.layers[0].q.weight.data());
    assert!(matches!(&q.data, Storage::Lazy { cache, .. } if cache.get().is_some()));
    q.release();
    assert!(matches!(&q.data, Storage::Lazy { cache, .. } if cache.get().is_none()));
    // Truncated: the last tensor's data is cut off; the lazy load refuses it by name.
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 64]).unwrap();
    let Err(e) = lopper::io::load_model_with(&cut, true) else {
        panic!("truncated file loaded")
    };
    let msg = e.to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("past the end"),
        "{msg}"
    );
}

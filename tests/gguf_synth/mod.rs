//! Synthetic GGUF files for the GGUF tests: deterministic data, candle's GGUF writer, and tiny
//! llama / qwen2 models (F32, q/k permuted the way llama.cpp's converter does) with their
//! HF-layout source tensors to compare a load against.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use lopper::io::gguf::permute_rows;
use lopper::LinearKind;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Deterministic values in [-1, 1).
pub fn rnd(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn qt(shape: &[usize], data: &[f32], dtype: GgmlDType) -> QTensor {
    let t = candle_core::Tensor::from_vec(data.to_vec(), shape, &candle_core::Device::Cpu)
        .expect("tensor");
    QTensor::quantize(&t, dtype).expect("quantize")
}

pub fn write_gguf(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) {
    let mut f = std::fs::File::create(path).expect("create");
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &m, &t).expect("write gguf");
}

/// Byte position of tensor `name`'s ggml type field in a GGUF v2/v3 file written by candle.
pub fn dtype_field(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let p = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name in file");
    let dims_at = p + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    dims_at + 4 + 8 * n_dims
}

/// Shapes of a tiny model; `layer_heads` etc. give one entry per layer.
pub struct Tiny {
    pub arch: &'static str,
    pub hidden: usize,
    pub head_dim: usize,
    pub layer_heads: Vec<(usize, usize, usize)>, // (heads, kv_heads, ffn)
    pub tied: bool,
    pub bias: bool,
}

impl Tiny {
    pub fn llama() -> Tiny {
        Tiny {
            arch: "llama",
            hidden: 256,
            head_dim: 64,
            layer_heads: vec![(4, 2, 512)],
            tied: true,
            bias: false,
        }
    }
}

pub const VOCAB: usize = 256;

/// Metadata, GGUF tensors (F32, q/k permuted for llama) and the HF-layout source tensors.
pub type Parts = (
    Vec<(String, Value)>,
    Vec<(String, QTensor)>,
    HashMap<String, Vec<f32>>,
);

pub fn tiny_parts(spec: &Tiny) -> Parts {
    let (a, h, hd) = (spec.arch, spec.hidden, spec.head_dim);
    let n = spec.layer_heads.len();
    let per_layer = spec.layer_heads.windows(2).any(|w| w[0] != w[1]);
    let arr = |f: fn(&(usize, usize, usize)) -> usize| -> Value {
        if per_layer {
            Value::Array(
                spec.layer_heads
                    .iter()
                    .map(|x| Value::U32(f(x) as u32))
                    .collect(),
            )
        } else {
            Value::U32(f(&spec.layer_heads[0]) as u32)
        }
    };
    let meta = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(n as u32)),
        (format!("{a}.embedding_length"), Value::U32(h as u32)),
        (format!("{a}.feed_forward_length"), arr(|x| x.2)),
        (format!("{a}.attention.head_count"), arr(|x| x.0)),
        (format!("{a}.attention.head_count_kv"), arr(|x| x.1)),
        (format!("{a}.attention.key_length"), Value::U32(hd as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(100000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.context_length"), Value::U32(1024)),
    ];
    let mut hf = HashMap::new();
    let mut tensors = Vec::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>, permute: Option<usize>| {
        seed += 1;
        let data = rnd(seed, shape.iter().product());
        let stored = match permute {
            Some(heads) if a == "llama" => permute_rows(
                &data,
                heads,
                hd,
                if shape.len() == 2 { shape[1] } else { 1 },
            ),
            _ => data.clone(),
        };
        tensors.push((name.clone(), qt(&shape, &stored, GgmlDType::F32)));
        hf.insert(name, data);
    };
    add("token_embd.weight".into(), vec![VOCAB, h], None);
    for (i, &(nh, nkv, ff)) in spec.layer_heads.iter().enumerate() {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), vec![h], None);
        for (name, out, inp, heads) in [
            ("attn_q", nh * hd, h, Some(nh)),
            ("attn_k", nkv * hd, h, Some(nkv)),
            ("attn_v", nkv * hd, h, None),
            ("attn_output", h, nh * hd, None),
            ("ffn_gate", ff, h, None),
            ("ffn_up", ff, h, None),
            ("ffn_down", h, ff, None),
        ] {
            add(format!("{p}.{name}.weight"), vec![out, inp], heads);
            let qkv = matches!(name, "attn_q" | "attn_k" | "attn_v");
            // qwen2: biases on q/k/v only, always; llama: on every linear when `bias`.
            let with_bias = if a == "qwen2" { qkv } else { spec.bias };
            if with_bias {
                add(format!("{p}.{name}.bias"), vec![out], heads);
            }
        }
        add(format!("{p}.ffn_norm.weight"), vec![h], None);
    }
    add("output_norm.weight".into(), vec![h], None);
    if !spec.tied {
        add("output.weight".into(), vec![VOCAB, h], None);
    }
    (meta, tensors, hf)
}

pub fn write_parts(dir: &Path, file: &str, parts: &Parts) -> PathBuf {
    let p = dir.join(file);
    write_gguf(&p, &parts.0, &parts.1);
    p
}

pub fn tiny_file(dir: &Path, file: &str, spec: &Tiny) -> (PathBuf, HashMap<String, Vec<f32>>) {
    let parts = tiny_parts(spec);
    (write_parts(dir, file, &parts), parts.2)
}

/// Check every loaded tensor equals its HF-layout source exactly.
pub fn check_tiny(model: &lopper::Model, hf: &HashMap<String, Vec<f32>>) {
    let w = &model.weights;
    assert_eq!(w.embed.data(), &hf["token_embd.weight"][..]);
    assert_eq!(w.final_norm.data(), &hf["output_norm.weight"][..]);
    match &w.lm_head {
        Some(t) => assert_eq!(t.data(), &hf["output.weight"][..]),
        None => assert!(!hf.contains_key("output.weight")),
    }
    let names = [
        (LinearKind::Q, "attn_q"),
        (LinearKind::K, "attn_k"),
        (LinearKind::V, "attn_v"),
        (LinearKind::O, "attn_output"),
        (LinearKind::Gate, "ffn_gate"),
        (LinearKind::Up, "ffn_up"),
        (LinearKind::Down, "ffn_down"),
    ];
    for (i, l) in w.layers.iter().enumerate() {
        assert_eq!(
            l.attn_norm.data(),
            &hf[&format!("blk.{i}.attn_norm.weight")][..]
        );
        assert_eq!(
            l.mlp_norm.data(),
            &hf[&format!("blk.{i}.ffn_norm.weight")][..]
        );
        for (kind, name) in names {
            let lin = l.linear(kind);
            assert_eq!(
                lin.weight.data(),
                &hf[&format!("blk.{i}.{name}.weight")][..],
                "layer {i} {name}"
            );
            match (&lin.bias, hf.get(&format!("blk.{i}.{name}.bias"))) {
                (Some(b), Some(want)) => assert_eq!(b.data(), &want[..], "layer {i} {name} bias"),
                (None, None) => {}
                (got, want) => panic!(
                    "layer {i} {name} bias: got {got:?}, expected present={}",
                    want.is_some()
                ),
            }
        }
    }
}

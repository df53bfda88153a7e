//! Packed weights on disk: `save_packed` → `load_model` gives back the same formats (no
//! re-compression) and the same logits; the directory is smaller; corrupt packed tensors and
//! bad `lopper_formats` notes are rejected with the tensor's name.

use lopper::formats::{WeightFormat, SMALL_M};
use lopper::io::packed::{save_packed, FORMATS_KEY};
use lopper::runtime::{self, forward_step, KvCache, PackOpts};
use lopper::{LinearKind, Model};
use std::path::Path;

mod common;

/// The default model cut to 3 blocks, the last two weights of every 4 zeroed (2:4, not 1:2),
/// packed with a different format per linear kind (and a bf16 head).
fn packed_model() -> Model {
    let mut model = common::default_model_cut(3);
    for l in model.weights.layers.iter_mut() {
        for kind in LinearKind::ALL {
            for g in l.linear_mut(kind).weight.data_mut().chunks_mut(4) {
                g[2] = 0.0;
                g[3] = 0.0;
            }
        }
    }
    let rep = runtime::pack(
        &mut model,
        &PackOpts {
            head: Some(runtime::FormatChoice::Bf16),
            probe_prefill: false,
            ..PackOpts::new(runtime::FormatChoice::Nm)
        },
    )
    .expect("pack");
    assert_eq!(rep.head, runtime::FormatChoice::Bf16);
    // Mix formats: re-pack some kinds differently by hand.
    use lopper::formats::{Bitmask, CsrBf16, DenseI8};
    for l in model.weights.layers.iter_mut() {
        for (kind, f) in [
            (LinearKind::Up, 0),
            (LinearKind::Down, 1),
            (LinearKind::K, 2),
        ] {
            let lin = l.linear_mut(kind);
            let (r, c) = (lin.out_features(), lin.in_features());
            let w = lin.weight.data();
            let fmt: std::sync::Arc<dyn WeightFormat> = match f {
                0 => std::sync::Arc::new(Bitmask::from_dense(w, r, c).unwrap()),
                1 => std::sync::Arc::new(CsrBf16::from_dense(w, r, c).unwrap()),
                _ => std::sync::Arc::new(DenseI8::from_dense(w, r, c).unwrap()),
            };
            lin.packed.as_mut().unwrap().format = fmt;
        }
    }
    model
}

fn decode_logits(model: &Model) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model, 8);
    [504u32, 3458, 282, 4649]
        .iter()
        .map(|&t| forward_step(model, &[t], &mut cache).expect("step"))
        .collect()
}

fn kinds(m: &Model) -> Vec<String> {
    let mut v: Vec<String> = m
        .weights
        .layers
        .iter()
        .flat_map(|l| LinearKind::ALL.map(|k| l.linear(k).packed.as_ref().map(|p| p.format.kind())))
        .map(|k| k.unwrap_or("none").to_string())
        .collect();
    v.push(
        m.weights
            .lm_head_packed
            .as_ref()
            .map_or("none", |p| p.format.kind())
            .to_string(),
    );
    v
}

/// [`packed_model`] saved packed into a temporary directory: (model, directory guard, path).
fn saved() -> (Model, tempfile::TempDir, std::path::PathBuf) {
    let model = packed_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("packed");
    save_packed(&model, &out, false).expect("save");
    (model, dir, out)
}

#[test]
fn packed_models_round_trip_without_recompression() {
    let (model, dir, out) = saved();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let note = cfg[FORMATS_KEY].as_object().expect("lopper_formats");
    assert_eq!(note.len(), 3 * 7 + 1);
    assert_eq!(note["model.layers.0.mlp.up_proj.weight"], "bitmask");
    assert_eq!(note["model.layers.2.mlp.down_proj.weight"], "csr-bf16");
    assert_eq!(note["lm_head.weight"], "dense-bf16");
    let back = lopper::io::load_model(&out).expect("load packed");
    assert_eq!(kinds(&back), kinds(&model));
    for (a, b) in back.weights.layers.iter().zip(&model.weights.layers) {
        for kind in LinearKind::ALL {
            let (pa, pb) = (
                a.linear(kind).packed.as_ref(),
                b.linear(kind).packed.as_ref(),
            );
            let (pa, pb) = (pa.unwrap(), pb.unwrap());
            assert_eq!(pa.max_rows, SMALL_M);
            assert_eq!(
                pa.format.to_tensors("w"),
                pb.format.to_tensors("w"),
                "{kind:?}: stored arrays differ after the round trip"
            );
            assert_eq!(
                a.linear(kind).weight.data(),
                &pb.format.to_dense()[..],
                "{kind:?}: the dense weight is not the decoded format"
            );
        }
    }
    // Decode runs through the same kernels on the same arrays: bit-identical logits.
    assert_eq!(decode_logits(&back), decode_logits(&model));
    // The linears are stored packed, not densely: the file is the dense f32 file minus what
    // packing saves on them, plus the packed (tied) head, up to the header.
    let dense_dir = dir.path().join("dense");
    lopper::io::save::save_hf(&model, &dense_dir, lopper::io::save::SaveDtype::F32, false)
        .expect("save dense");
    let size = |p: &Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .unwrap()
            .len() as i64
    };
    let saved: i64 = model
        .weights
        .layers
        .iter()
        .flat_map(|l| LinearKind::ALL.map(|k| l.linear(k)))
        .map(|l| (l.weight.len() * 4) as i64 - l.packed.as_ref().unwrap().format.nbytes() as i64)
        .sum();
    let head = model
        .weights
        .lm_head_packed
        .as_ref()
        .unwrap()
        .format
        .nbytes() as i64;
    let expect = size(&dense_dir) - saved + head;
    assert!(
        (size(&out) - expect).abs() < 64 << 10,
        "packed file {} bytes, expected about {expect}",
        size(&out)
    );
}

/// Byte range of tensor `name` in a safetensors file.
fn tensor_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offs = &header[name]["data_offsets"];
    let (a, b) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
    8 + n + a as usize..8 + n + b as usize
}

#[test]
fn corrupt_packed_tensors_are_rejected_by_name() {
    let (_model, _dir, out) = saved();
    let file = out.join("model.safetensors");
    let orig = std::fs::read(&file).unwrap();
    let expect_err = |what: &str, needles: &[&str]| {
        let e = match lopper::io::load_model(&out) {
            Ok(_) => panic!("{what}: a corrupt packed model loaded"),
            Err(e) => e.to_string(),
        };
        for n in needles {
            assert!(e.contains(n), "{what}: `{n}` not in: {e}");
        }
    };
    // A bitmask bit set where no value is stored (column 2 is zero in every row).
    let mut b = orig.clone();
    let r = tensor_range(&b, "model.layers.1.mlp.up_proj.weight.bitmask");
    assert_eq!(b[r.start] & 0x04, 0);
    b[r.start] |= 0x04;
    std::fs::write(&file, &b).unwrap();
    expect_err(
        "mask bit",
        &["model.layers.1.mlp.up_proj.weight.values", "popcount"],
    );
    // An N:M in-group index out of order.
    let mut b = orig.clone();
    let r = tensor_range(&b, "model.layers.2.self_attn.q_proj.weight.indices");
    b[r.start] = 0b0000_0111;
    std::fs::write(&file, &b).unwrap();
    expect_err(
        "nm index",
        &["model.layers.2.self_attn.q_proj.weight", "increasing"],
    );
    // A CSR column index ≥ cols.
    let mut b = orig.clone();
    let r = tensor_range(&b, "model.layers.0.mlp.down_proj.weight.col_idx");
    b[r.start + 1] = 0xff;
    std::fs::write(&file, &b).unwrap();
    expect_err(
        "csr column",
        &["model.layers.0.mlp.down_proj.weight.col_idx"],
    );
    // A missing array (renamed in the header, same length).
    let mut b = orig.clone();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let h2 = h.replace(
        "\"model.layers.1.self_attn.k_proj.weight.scales\"",
        "\"model.layers.1.self_attn.k_proj.weight.scalez\"",
    );
    assert_ne!(h, h2);
    b[8..8 + n].copy_from_slice(h2.as_bytes());
    std::fs::write(&file, &b).unwrap();
    expect_err(
        "missing scales",
        &["model.layers.1.self_attn.k_proj.weight.scales", "missing"],
    );
    std::fs::write(&file, &orig).unwrap();
    assert!(
        lopper::io::load_model(&out).is_ok(),
        "the restored file must load"
    );
    // Bad notes in config.json.
    let cfg_path = out.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    for (from, to, needles) in [
        (
            "\"model.layers.0.mlp.up_proj.weight\": \"bitmask\"",
            "\"model.layers.0.mlp.up_proj.weight\": \"zip\"",
            &["model.layers.0.mlp.up_proj.weight", "unknown format `zip`"][..],
        ),
        (
            "\"model.layers.0.mlp.up_proj.weight\": \"bitmask\"",
            "\"model.layers.0.mlp.up_proj.weight\": \"csr\"",
            &["model.layers.0.mlp.up_proj.weight", "missing"][..],
        ),
        (
            "\"model.layers.0.mlp.up_proj.weight\": \"bitmask\"",
            "\"model.norm.weight\": \"bitmask\"",
            &["model.norm.weight"][..],
        ),
    ] {
        assert!(cfg.contains(from), "config.json layout changed");
        std::fs::write(&cfg_path, cfg.replace(from, to)).unwrap();
        expect_err(to, needles);
    }
}

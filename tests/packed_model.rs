//! The runtime with packed weights: a real (truncated, magnitude-pruned) SmolLM2 run in every
//! format gives the logits of the dense forward pass over the same (decoded) weights, with the
//! same argmax everywhere, through prefill (tiled GEMM or dense fallback), small chunks and
//! single-token decode; forced formats that cannot represent a tensor fail naming it; packed
//! models survive a save/load round trip and corrupt packed tensors are rejected by name.

use lopper::calibrate::CalibSet;
use lopper::formats::SMALL_M;
use lopper::prune::{self, Method, Pattern, PrunePlan};
use lopper::runtime::{self, forward_step, forward_step_all, FormatChoice, KvCache, PackOpts};
use lopper::{LinearKind, Model, Tensor};
use std::sync::OnceLock;

mod common;

/// The default model cut to its first 4 blocks and magnitude-pruned with `pattern` at 50%.
fn pruned(pattern: Pattern) -> Model {
    let mut model = common::default_model_cut(4);
    let calib = CalibSet {
        ids: vec![1; 8],
        n: 1,
        len: 8,
        source: "unused by magnitude".into(),
    };
    let plan = PrunePlan::new(Method::Magnitude, pattern, 0.5);
    prune::prune_model(&mut model, &calib, &plan, &mut |_, _, _| {}).expect("prune");
    model
}

fn unstructured() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| pruned(Pattern::Unstructured))
}

fn two_four() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| pruned(Pattern::NM { n: 2, m: 4 }))
}

fn copy(m: &Model) -> Model {
    m.clone()
}

/// Logits rows of: an 8-token prefill (all rows), a 3-token chunk (all rows), two single tokens.
fn run(model: &Model) -> Vec<Vec<f32>> {
    let vocab = model.config.vocab_size;
    let mut cache = KvCache::new(model, 16);
    let mut rows = Vec::new();
    let prompt = [504u32, 3458, 282, 4649, 314, 253, 1345, 30];
    for chunk in [&prompt[..], &[28, 1085, 12][..]] {
        let l = forward_step_all(model, chunk, &mut cache).expect("step");
        rows.extend(l.chunks(vocab).map(|r| r.to_vec()));
    }
    for t in [462u32, 7] {
        rows.push(forward_step(model, &[t], &mut cache).expect("decode"));
    }
    rows
}

fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Max |Δ| over all logits; asserts the argmax of every row is equal.
fn compare(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(argmax(g), argmax(w), "{what}: argmax of row {i}");
        for (a, b) in g.iter().zip(w) {
            assert!(a.is_finite(), "{what}: row {i} has a non-finite logit");
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

/// The same model with every packed weight replaced by the dense matrix its format decodes to,
/// unpacked: the reference a packed run must reproduce up to float rounding.
fn decoded_reference(packed: &Model) -> Model {
    let mut r = copy(packed);
    for l in r.weights.layers.iter_mut() {
        for kind in LinearKind::ALL {
            let lin = l.linear_mut(kind);
            if let Some(p) = lin.packed.take() {
                lin.weight = Tensor::new(lin.weight.shape.clone(), p.format.to_dense());
            }
        }
    }
    if let Some(p) = r.weights.lm_head_packed.take() {
        let d = Tensor::new(r.weights.lm_head().shape.clone(), p.format.to_dense());
        match &mut r.weights.lm_head {
            Some(h) => *h = d,
            // Tied: keep the embedding for the lookup, give the head its own decoded copy.
            None => r.weights.lm_head = Some(d),
        }
    }
    r
}

fn opts(choice: FormatChoice) -> PackOpts {
    PackOpts {
        bandwidth_gbps: Some(10.0),
        ..PackOpts::new(choice)
    }
}

fn set_max_rows(m: &mut Model, rows: usize) {
    for l in m.weights.layers.iter_mut() {
        for kind in LinearKind::ALL {
            if let Some(p) = &mut l.linear_mut(kind).packed {
                p.max_rows = rows;
            }
        }
    }
    if let Some(p) = &mut m.weights.lm_head_packed {
        p.max_rows = rows;
    }
}

/// Every format on the model it can represent: packed logits = dense logits of the decoded
/// weights (tight), and lossless formats = the original model; both prefill paths.
#[test]
fn every_format_matches_the_dense_forward_pass() {
    let base_u = run(unstructured());
    let base_24 = run(two_four());
    for (choice, name) in FormatChoice::ALL {
        let nm = choice.layout() == runtime::pack::Layout::Nm;
        let (src, base) = if nm {
            (two_four(), &base_24)
        } else {
            (unstructured(), &base_u)
        };
        let mut m = copy(src);
        let rep = runtime::pack(&mut m, &opts(choice)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rep.tensors.len(), 4 * 7 + 1, "{name}");
        if choice != FormatChoice::Dense && !matches!(choice, FormatChoice::Auto) {
            assert!(
                m.weights.layers[0].q.packed.is_some(),
                "{name}: q_proj was not packed"
            );
        }
        let lossless = choice.value_type() == runtime::pack::ValueType::F32;
        if !lossless {
            // Lossy formats serve every product, so prefill and decode see the same values.
            assert!(
                rep.tensors
                    .iter()
                    .all(|t| t.prefill || t.kind == "dense-f32"),
                "{name}"
            );
        }
        let reference = run(&decoded_reference(&m));
        let d_pack = compare(&format!("{name} as packed"), &run(&m), &reference);
        // Packed formats for prefill too (tiled GEMM) ...
        set_max_rows(&mut m, usize::MAX);
        let d_tiled = compare(&format!("{name} tiled prefill"), &run(&m), &reference);
        assert!(
            d_pack < 5e-4 && d_tiled < 5e-4,
            "{name}: max |Δlogit| vs decoded reference {d_pack} / {d_tiled}"
        );
        if lossless {
            // ... and only for decode-sized products (prefill on the identical dense weight).
            set_max_rows(&mut m, SMALL_M);
            let d_dense = compare(&format!("{name} dense prefill"), &run(&m), &reference);
            let d = compare(&format!("{name} vs original"), &run(&m), base);
            assert!(
                d_dense < 5e-4 && d < 5e-4,
                "{name}: {d_dense} / {d} vs original"
            );
        }
        eprintln!(
            "{name:>13}: max |Δlogit| {d_pack:.2e} (as packed), {d_tiled:.2e} (tiled prefill)"
        );
    }
}

#[test]
fn lossy_formats_stay_close_to_the_original() {
    let base = run(unstructured());
    for choice in [
        FormatChoice::Bf16,
        FormatChoice::F16,
        FormatChoice::BitmaskI8,
    ] {
        let mut m = copy(unstructured());
        runtime::pack(&mut m, &opts(choice)).expect("pack");
        let got = run(&m);
        // Rounding the weights moves logits, but not far, and the top token rarely.
        let same = got
            .iter()
            .zip(&base)
            .filter(|(g, b)| argmax(g) == argmax(b))
            .count();
        let worst = got
            .iter()
            .zip(&base)
            .flat_map(|(g, b)| g.iter().zip(b).map(|(x, y)| (x - y).abs()))
            .fold(0f32, f32::max);
        assert!(
            same + 1 >= base.len(),
            "{choice}: argmax changed in {} rows",
            base.len() - same
        );
        assert!(worst < 1.0, "{choice}: max |Δlogit| {worst}");
    }
}

#[test]
fn f16_refuses_weights_outside_its_range() {
    let mut m = copy(unstructured());
    m.weights.layers[1].down.weight.data_mut()[5] = 1e5;
    for choice in [FormatChoice::F16, FormatChoice::BitmaskF16] {
        let e = runtime::pack(&mut m, &opts(choice))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("f16 range"),
            "{e}"
        );
        assert!(m.weights.layers.iter().all(|l| l.q.packed.is_none()));
    }
    // bf16 holds it.
    runtime::pack(&mut m, &opts(FormatChoice::Bf16)).expect("bf16 pack");
}

#[test]
fn forced_formats_that_cannot_represent_a_tensor_name_it() {
    let mut m = copy(unstructured());
    let e = runtime::pack(&mut m, &opts(FormatChoice::Nm))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("not N:M"),
        "{e}"
    );
    // Nothing half-packed is left behind.
    assert!(m.weights.layers.iter().all(|l| l.q.packed.is_none()));
    // A head forced to N:M (it is dense) also fails by name.
    let mut m = copy(two_four());
    let e = runtime::pack(
        &mut m,
        &PackOpts {
            head: Some(FormatChoice::Nm),
            ..opts(FormatChoice::Nm)
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn auto_packs_sparse_tensors_smaller_than_dense() {
    let mut m = copy(two_four());
    let rep = runtime::pack(&mut m, &opts(FormatChoice::Auto)).expect("pack");
    for t in &rep.tensors {
        assert!(t.bytes <= t.dense_bytes, "{}: {} > dense", t.name, t.kind);
    }
    // 50% sparse linears: every candidate but dense reads ≤ 2.2 of 4 bytes per weight.
    let body: Vec<_> = rep
        .tensors
        .iter()
        .filter(|t| t.name != "lm_head.weight")
        .collect();
    assert!(
        body.iter().all(|t| t.kind != "dense-f32"),
        "auto left a 2:4 linear dense: {:?}",
        body.iter().map(|t| &t.kind).collect::<Vec<_>>()
    );
    let reference = run(two_four());
    let d = compare("auto", &run(&m), &reference);
    assert!(d < 5e-4, "auto: {d}");
    runtime::unpack(&mut m);
    assert!(m.weights.layers.iter().all(|l| l.q.packed.is_none()));
    assert!(m.weights.lm_head_packed.is_none());
}

//! Activation sparsity: the column-skipping kernels against their naive reference (every value
//! type, odd shapes, 0 / 50 / 99 / 100% input sparsity, every kernel set this machine has, one
//! to several rows, storing and accumulating; skipped columns are never read), the format's
//! tensors round trip and corrupt ones are refused; threshold calibration reaches the requested
//! sparsity on a tiny model; thresholds at 0% change nothing; decode through the column-major
//! copies gives the all-position forward's logits with the same sparsification; thresholds
//! survive a save / load round trip and are refused for another shape, naming the tensor.

use lopper::calibrate::act as cal;
use lopper::formats::{cap_isa, ColMajorOf, Elem, Isa, WeightFormat};
use lopper::model::act::{self, Score};
use lopper::runtime::{self, forward_step, forward_step_all, KvCache};
use lopper::Model;

mod common;
use common::golden;

/// Deterministic values in [-1, 1).
fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
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

/// `x` with a fraction `sparsity` of its entries (chosen by a second stream) set to zero.
fn sparse_x(seed: u64, n: usize, sparsity: f64) -> Vec<f32> {
    let mut x = rand_vec(seed, n);
    let r = rand_vec(seed + 99, n);
    let zeros = (sparsity * n as f64).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
    for &j in &order[..zeros] {
        x[j] = 0.0;
    }
    x
}

const SHAPES: [(usize, usize); 6] = [(1, 1), (63, 17), (65, 130), (130, 257), (7, 3), (700, 600)];
const SPARSITIES: [f64; 4] = [0.0, 0.5, 0.99, 1.0];

fn check_format<E: Elem>() {
    for (si, &(rows, cols)) in SHAPES.iter().enumerate() {
        let w = rand_vec(si as u64 + 1, rows * cols);
        let f = ColMajorOf::<E>::from_dense(&w, rows, cols).unwrap();
        let absw: Vec<f32> = f.to_dense().iter().map(|v| v.abs()).collect();
        for &s in &SPARSITIES {
            for m in [1usize, 3, 7] {
                let x: Vec<f32> = (0..m)
                    .flat_map(|i| sparse_x(100 * si as u64 + i as u64, cols, s))
                    .collect();
                let mut want = vec![0f32; m * rows];
                f.matmul_naive(&x, m, &mut want);
                for cap in [None, Some(Isa::Portable)] {
                    let _g = cap_isa(cap);
                    for acc in [false, true] {
                        let mut got = vec![if acc { 0.5 } else { f32::NAN }; m * rows];
                        f.matmul_add(&x, m, &mut got, acc);
                        for i in 0..m {
                            for r in 0..rows {
                                let bound: f32 = (0..cols)
                                    .map(|j| absw[r * cols + j] * x[i * cols + j].abs())
                                    .sum();
                                let add = if acc { 0.5 } else { 0.0 };
                                let (g, e) = (got[i * rows + r], want[i * rows + r] + add);
                                assert!(
                                    (g - e).abs() <= 1e-5 * bound + 1e-6,
                                    "{} {rows}x{cols} s={s} m={m} cap={cap:?} acc={acc} [{i},{r}]: {g} vs {e}",
                                    f.kind()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn colmajor_matches_naive_every_value_type() {
    check_format::<f32>();
    check_format::<half::bf16>();
    check_format::<half::f16>();
    check_format::<i8>();
}

/// Columns whose input is zero are not read: NaN weights there leave the product finite
/// (a kernel multiplying them would give NaN).
fn check_skip<E: Elem>() {
    let (rows, cols) = (130, 257);
    let x = sparse_x(7, cols, 0.5);
    let mut w = rand_vec(3, rows * cols);
    for r in 0..rows {
        for j in 0..cols {
            if x[j] == 0.0 {
                w[r * cols + j] = f32::NAN;
            }
        }
    }
    let f = ColMajorOf::<E>::from_dense(&w, rows, cols).unwrap();
    for cap in [None, Some(Isa::Portable)] {
        let _g = cap_isa(cap);
        let mut y = vec![0f32; rows];
        f.matvec(&x, &mut y);
        assert!(y.iter().all(|v| v.is_finite()), "{} {cap:?}", f.kind());
        let mut all = vec![0f32; rows];
        f.matvec(&vec![1.0; cols], &mut all);
        assert!(
            all.iter().all(|v| v.is_nan()),
            "dense input reads every column"
        );
    }
}

#[test]
fn colmajor_skips_zero_columns() {
    check_skip::<f32>();
    check_skip::<half::bf16>();
    check_skip::<half::f16>();
}

#[test]
fn colmajor_tensors_round_trip_and_corrupt_ones_are_refused() {
    let (rows, cols) = (65, 9);
    let w = rand_vec(5, rows * cols);
    let f = ColMajorOf::<i8>::from_dense(&w, rows, cols).unwrap();
    let t = f.to_tensors("m.w");
    let back = ColMajorOf::<i8>::from_tensors("m.w", &t).unwrap();
    assert_eq!(back, f);
    let mut bad = t.clone();
    let n = bad[1].data.len() - 1;
    bad[1].data.truncate(n);
    bad[1].shape = vec![bad[1].data.len()];
    let e = ColMajorOf::<i8>::from_tensors("m.w", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.w.values"), "{e}");
    let mut bad = t;
    bad.retain(|x| x.name != "m.w.scales");
    let e = ColMajorOf::<i8>::from_tensors("m.w", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.w.scales"), "{e}");
}

#[test]
fn quantile_reads_the_histogram() {
    // 1000 scores 0.001, 0.002, ..., 1.0: the 30% quantile is about 0.3.
    let mut h = vec![0u64; 1 << 16];
    for i in 1..=1000 {
        let s = i as f32 / 1000.0;
        h[(s.to_bits() >> 15) as usize] += 1;
    }
    let (t, reached) = cal::quantile(&h, 0.3);
    assert!((t - 0.3).abs() < 0.01, "{t}");
    assert!((reached - 0.3).abs() < 1e-9, "{reached}");
    assert_eq!(cal::quantile(&h, 0.0).0, 0.0);
    assert!(cal::check_target(1.0, "--act-sparsity").is_err());
    assert!(cal::check_target(-0.1, "--act-sparsity").is_err());
    assert!(cal::check_target(0.0, "--act-sparsity").is_ok());
}

fn load_err(p: &std::path::Path) -> String {
    match lopper::io::load_model(p) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    }
}

fn tiny() -> Model {
    lopper::io::load_model(&golden().join("tiny").join("tiny-llama3")).expect("load tiny-llama3")
}

fn tiny_calibrated(score: Score) -> (Model, cal::ActHistograms) {
    let m = tiny();
    let calib = common::random_calib(3, 4, 32, m.config.vocab_size as u64);
    let h = cal::collect(&m, &calib, score).unwrap();
    (m, h)
}

#[test]
fn calibration_reaches_the_target_and_zero_changes_nothing() {
    for score in [Score::Magnitude, Score::Wina] {
        let (mut m, h) = tiny_calibrated(score);
        let ids: Vec<u32> = common::random_calib(3, 1, 32, m.config.vocab_size as u64).ids;
        let dense = lopper::model::forward::forward_logits(&m, &ids).unwrap();
        act::install(&mut m, &h.uniform(0.0)).unwrap();
        let same = lopper::model::forward::forward_logits(&m, &ids).unwrap();
        assert_eq!(dense, same, "0% thresholds change nothing");
        // On the calibration windows themselves the reached sparsity is the target.
        act::install(&mut m, &h.uniform(0.5)).unwrap();
        let calib = common::random_calib(3, 4, 32, m.config.vocab_size as u64);
        for w in 0..calib.n {
            lopper::model::forward::forward_logits(&m, calib.window(w)).unwrap();
        }
        let reached = act::achieved(&m);
        // Blocks after the first see sparsified inputs upstream, so allow some drift.
        for r in reached {
            let r = r.expect("every site seen");
            assert!((r - 0.5).abs() < 0.08, "{score:?}: reached {r}");
        }
        let sparse = lopper::model::forward::forward_logits(&m, &ids).unwrap();
        assert_ne!(dense, sparse, "50% thresholds change the logits");
    }
}

/// Decode through the column-major copies gives the all-position forward's logits with the
/// same sparsification: dense columns on the dense model, bitmask columns (nonzeros only) on a
/// weight-sparse one (half of every linear's weights zeroed).
#[test]
fn decode_through_columns_matches_the_full_forward() {
    use runtime::act::Columns;
    for layout in [Columns::Dense, Columns::Bitmask] {
        let (mut m, h) = tiny_calibrated(Score::Magnitude);
        if layout == Columns::Bitmask {
            for l in &mut m.weights.layers {
                for k in lopper::LinearKind::ALL {
                    let w = l.linear_mut(k).weight.data_mut();
                    let mut a: Vec<f32> = w.iter().map(|v| v.abs()).collect();
                    a.sort_by(|x, y| x.total_cmp(y));
                    let t = a[a.len() / 2];
                    w.iter_mut().filter(|v| v.abs() < t).for_each(|v| *v = 0.0);
                }
            }
        }
        act::install(&mut m, &h.uniform(0.4)).unwrap();
        let ids: Vec<u32> = common::random_calib(9, 1, 12, m.config.vocab_size as u64).ids;
        let vocab = m.config.vocab_size;
        let full = lopper::model::forward::forward_logits(&m, &ids).unwrap();
        let vt = runtime::choice::ValueType::F32;
        runtime::act::pack_columns(&mut m, vt, layout).unwrap();
        let mut cache = KvCache::new(&m, 16);
        // Prefill 8 positions (row-major f32), then decode 4 single tokens (column-major).
        let pre = forward_step_all(&m, &ids[..8], &mut cache).unwrap();
        let mut rows: Vec<Vec<f32>> = pre.chunks(vocab).map(|r| r.to_vec()).collect();
        for &t in &ids[8..] {
            rows.push(forward_step(&m, &[t], &mut cache).unwrap());
        }
        for (p, r) in rows.iter().enumerate() {
            let want = &full[p * vocab..(p + 1) * vocab];
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let err = r
                .iter()
                .zip(want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                err <= 1e-3 * scale.max(1.0),
                "{layout:?} position {p}: max error {err}"
            );
        }
        let kind = m.weights.layers[0].q.packed.as_ref().unwrap().format.kind();
        let want = match layout {
            Columns::Dense => "colmajor-f32",
            Columns::Bitmask => "colbitmask-f32",
        };
        assert_eq!(kind, want);
        assert!(runtime::act::decode_bytes(&m) < runtime::pack::decode_bytes(&m.weights));
    }
}

#[test]
fn thresholds_round_trip_and_are_refused_for_another_shape() {
    let (mut m, h) = tiny_calibrated(Score::Wina);
    let a = h.uniform(0.3);
    act::install(&mut m, &a).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    lopper::io::save::save_hf(&m, &out, lopper::io::save::SaveDtype::F32, false).unwrap();
    let file = out.join(lopper::io::act_file::FILE);
    assert!(file.is_file());
    let back = lopper::io::load_model(&out).unwrap();
    assert_eq!(act::installed(&back).as_deref(), Some(&a));

    // Another width at one site: refused naming the tensor.
    let text = std::fs::read_to_string(&file).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cols = v["layers"][1][3]["cols"].as_u64().unwrap();
    v["layers"][1][3]["cols"] = (cols + 1).into();
    std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load_err(&out);
    assert!(e.contains("model.layers.1.mlp.down_proj.weight"), "{e}");

    // Another block count / architecture: refused naming the file.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["num_layers"] = 99.into();
    std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load_err(&out);
    assert!(
        e.contains(lopper::io::act_file::FILE) && e.contains("blocks"),
        "{e}"
    );
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model_type"] = "qwen2".into();
    std::fs::write(&file, serde_json::to_vec(&v).unwrap()).unwrap();
    let e = load_err(&out);
    assert!(e.contains("qwen2"), "{e}");

    // Without the file the model runs dense.
    std::fs::remove_file(&file).unwrap();
    let plain = lopper::io::load_model(&out).unwrap();
    assert!(act::installed(&plain).is_none());
}

#[test]
fn greedy_allocation_meets_the_weighted_mean_per_block() {
    let (m, h) = tiny_calibrated(Score::Magnitude);
    let calib = common::random_calib(4, 2, 32, m.config.vocab_size as u64);
    let targets = [0.25, 0.5];
    let out = lopper::calibrate::act_greedy::greedy(
        &m,
        &calib,
        &h,
        &targets,
        Default::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let mut uneven = false;
    for (t, a) in targets.iter().zip(&out) {
        assert_eq!(a.allocation, "greedy");
        for (i, sites) in a.layers.iter().enumerate() {
            let lw = &m.weights.layers[i];
            let (mut num, mut den) = (0.0, 0.0);
            let mut seen = Vec::new();
            for site in lopper::model::observer::Site::ALL {
                let w: f64 = site
                    .linears()
                    .iter()
                    .map(|&k| (lw.linear(k).out_features() * lw.linear(k).in_features()) as f64)
                    .sum();
                let s = sites[act::site_index(site)].map_or(0.0, |x| x.calib_sparsity);
                seen.push(s);
                num += s * w;
                den += w;
            }
            // calib_sparsity is the histogram's share below the threshold: the target up to
            // interpolation inside one bin.
            assert!(
                (num / den - t).abs() < 0.01,
                "block {i}: mean {} for {t}",
                num / den
            );
            uneven |= seen.iter().any(|s| (s - t).abs() > 0.02);
        }
    }
    assert!(
        uneven,
        "greedy gave every site the target: no search happened"
    );
}

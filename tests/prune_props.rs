//! Properties of the pruning methods and of the layer-sequential driver:
//! * every pattern (N:M, block, vector, unstructured) on random matrices, for magnitude (both
//!   scopes), Wanda and SparseGPT: exact zero counts per group, all-or-nothing tiles, refused
//!   shapes naming the tensor;
//! * `Pattern` parsing; OWL allocation and outlier ratio;
//! * the driver on the tiny random llama3 model (every method × pattern, skips, per-kind
//!   sparsity, OWL, plan validation, NaN detection);
//! * calibration windows: too-short streams, determinism, ids files good and bad.

mod common;
use common::*;
use lopper::calibrate::{self, CalibSet, SplitMix64};
use lopper::model::flops;
use lopper::prune::owl::{self, Allocation};
use lopper::prune::{self, driver, Method, Pattern, PrunePlan, Scope, SiteStats, Target};
use lopper::{Error, LinearKind, Model};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Uniform in [0, 1).
fn unit(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32
}

/// A dense `[rows, cols]` matrix with no zero: |w| in [0.05, 1.05), random sign.
fn dense(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..rows * cols)
        .map(|_| {
            let m = 0.05 + unit(&mut rng);
            if rng.next_u64() & 1 == 0 {
                m
            } else {
                -m
            }
        })
        .collect()
}

/// Statistics of `tokens` random inputs of width `cols` with unequal column scales (so Wanda's
/// ranking differs from magnitude's); `Σ x xᵀ` is positive definite for tokens ≫ cols.
fn stats(cols: usize, seed: u64) -> SiteStats {
    let tokens = 4 * cols;
    let mut rng = SplitMix64(seed ^ 0xABCD);
    let scale: Vec<f64> = (0..cols)
        .map(|_| 0.1 + 2.0 * unit(&mut rng) as f64)
        .collect();
    let x: Vec<f64> = (0..tokens * cols)
        .map(|i| (unit(&mut rng) as f64 * 2.0 - 1.0) * scale[i % cols])
        .collect();
    let mut xtx = vec![0f64; cols * cols];
    for t in 0..tokens {
        let row = &x[t * cols..(t + 1) * cols];
        for i in 0..cols {
            let xi = row[i];
            let out = &mut xtx[i * cols..(i + 1) * cols];
            for (o, &xj) in out.iter_mut().zip(row) {
                *o += xi * xj;
            }
        }
    }
    let col_sq = (0..cols).map(|j| xtx[j * cols + j]).collect();
    SiteStats::from_sums(cols, 4, tokens, Some(col_sq), Some(xtx))
}

/// Statistics for `COLS` inputs, computed once.
fn shared_stats() -> &'static SiteStats {
    static S: std::sync::OnceLock<SiteStats> = std::sync::OnceLock::new();
    S.get_or_init(|| stats(COLS, 1))
}

/// `(n as f64 * s) as usize`, the count rule of the implementation (and of `int(n * s)`).
fn fl(n: usize, s: f64) -> usize {
    (n as f64 * s) as usize
}

/// The method/scope combinations to test.
const METHODS: [(Method, Scope); 4] = [
    (Method::Magnitude, Scope::Matrix),
    (Method::Magnitude, Scope::Row),
    (Method::Wanda, Scope::Row),
    (Method::Sparsegpt, Scope::Matrix),
];

const ROWS: usize = 32;
const COLS: usize = 256;

/// Prune a fresh random matrix; returns the pruned weights.
fn prune_random(
    method: Method,
    scope: Scope,
    pattern: Pattern,
    sparsity: f64,
    seed: u64,
) -> Vec<f32> {
    let mut w = dense(ROWS, COLS, seed);
    let st = shared_stats();
    prune::pruner(method, scope)
        .prune(
            &mut w,
            ROWS,
            COLS,
            st,
            Target { sparsity, pattern },
            "test.weight",
        )
        .unwrap_or_else(|e| panic!("{method:?}/{scope:?} {pattern}: {e}"));
    w
}

fn zeros(w: &[f32]) -> usize {
    w.iter().filter(|v| **v == 0.0).count()
}

/// Check that every group of `m` consecutive inputs of every row has exactly `m - n` zeros.
fn assert_nm(w: &[f32], rows: usize, cols: usize, n: usize, m: usize, what: &str) {
    for r in 0..rows {
        for g in 0..cols / m {
            let z = zeros(&w[r * cols + g * m..r * cols + (g + 1) * m]);
            assert_eq!(
                z,
                m - n,
                "{what}: row {r} group {g} has {z} zeros, expected {}",
                m - n
            );
        }
    }
}

/// Tile grid of a block/vector pattern: (tile rows, tile cols, r, c).
fn tiles(pattern: Pattern, rows: usize, cols: usize) -> (usize, usize, usize, usize) {
    match pattern {
        Pattern::Block { r, c } => (rows / r, cols / c, r, c),
        Pattern::Vector { v } => (rows, cols / v, 1, v),
        _ => unreachable!(),
    }
}

/// Check every tile is all zero or all nonzero; return the zero-tile mask `[tr, tc]`.
fn assert_tiles(w: &[f32], rows: usize, cols: usize, pattern: Pattern, what: &str) -> Vec<bool> {
    let (tr, tc, r, c) = tiles(pattern, rows, cols);
    let mut out = vec![false; tr * tc];
    for bi in 0..tr {
        for bj in 0..tc {
            let mut z = 0;
            for i in bi * r..(bi + 1) * r {
                z += zeros(&w[i * cols + bj * c..i * cols + (bj + 1) * c]);
            }
            assert!(
                z == 0 || z == r * c,
                "{what}: tile ({bi},{bj}) has {z} zeros of {}",
                r * c
            );
            out[bi * tc + bj] = z == r * c;
        }
    }
    out
}

/// Zero tiles each method must produce for a block/vector pattern (selection groups:
/// the whole matrix, each band/row, or each 128-column SparseGPT block).
fn expected_zero_tiles(
    method: Method,
    scope: Scope,
    pattern: Pattern,
    rows: usize,
    cols: usize,
    s: f64,
) -> usize {
    let (tr, tc, _, c) = tiles(pattern, rows, cols);
    match (method, scope) {
        (Method::Magnitude, Scope::Matrix) => fl(tr * tc, s),
        (Method::Magnitude, Scope::Row) | (Method::Wanda | Method::Ria, _) => tr * fl(tc, s),
        (Method::Sparsegpt, _) => {
            let bs = 128usize.div_ceil(c) * c;
            (0..cols)
                .step_by(bs)
                .map(|i1| fl(tr * ((bs.min(cols - i1)) / c), s))
                .sum()
        }
    }
}

fn tiny_dir(name: &str) -> PathBuf {
    golden().join("tiny").join(name)
}

fn tiny_model() -> Model {
    lopper::io::load_model(&tiny_dir("tiny-llama3")).expect("load tiny-llama3")
}

/// The tiny model saved as bf16 in `dir/bf16` (converted on first read when loaded lazily);
/// returns that path.
fn save_tiny_bf16(dir: &Path) -> PathBuf {
    let out = dir.join("bf16");
    let dtype = lopper::io::save::SaveDtype::Bf16;
    lopper::io::save::save_hf(&tiny_model(), &out, dtype, false).unwrap();
    out
}

/// 8 random calibration windows of 32 ids below 320 (the tiny vocabulary).
fn tiny_calib(seed: u64) -> CalibSet {
    let mut rng = SplitMix64(seed);
    let (n, len) = (8, 32);
    CalibSet {
        ids: (0..n * len).map(|_| rng.below(320) as u32).collect(),
        n,
        len,
        source: "random ids".into(),
    }
}

fn run_plan(model: &mut Model, plan: &PrunePlan) -> lopper::Result<prune::PruneOutcome> {
    prune::prune_model(model, &tiny_calib(7), plan, &mut |_, _, _| {})
}

/// The per-tensor report agrees with the weights, and the totals with the whole model.
fn assert_report_consistent(model: &Model, out: &prune::PruneOutcome) {
    for t in &out.tensors {
        let (layer, kind) = find_tensor(model, &t.name);
        let w = &model.weights.layers[layer].linear(kind).weight;
        assert_eq!(t.shape.to_vec(), w.shape, "{}: shape", t.name);
        assert_eq!(t.zeros, w.count_zeros(), "{}: reported zeros", t.name);
        assert!(
            (t.sparsity - t.zeros as f64 / w.len() as f64).abs() < 1e-12,
            "{}: reported sparsity",
            t.name
        );
    }
    let (mut params, mut z) = (0, 0);
    for l in &model.weights.layers {
        for k in LinearKind::ALL {
            params += l.linear(k).weight.len();
            z += l.linear(k).weight.count_zeros();
        }
    }
    assert_eq!(out.pruned_params, params);
    assert_eq!(out.zeros, z);
    assert!((out.sparsity_measured - z as f64 / params as f64).abs() < 1e-12);
}

fn find_tensor(model: &Model, name: &str) -> (usize, LinearKind) {
    for i in 0..model.weights.layers.len() {
        for k in LinearKind::ALL {
            if driver::tensor_name(i, k) == name {
                return (i, k);
            }
        }
    }
    panic!("report names unknown tensor {name}");
}

// ---------------------------------------------------------------------------------------------
// Patterns on random matrices
// ---------------------------------------------------------------------------------------------

#[test]
fn nm_patterns_keep_exactly_n_of_every_m() {
    for (method, scope) in METHODS {
        for (n, m) in [(2, 4), (4, 8), (1, 4)] {
            let pattern = Pattern::NM { n, m };
            let s = pattern.implied_sparsity().unwrap();
            let w = prune_random(method, scope, pattern, s, 11 + m as u64);
            let what = format!("{method:?}/{scope:?} {pattern}");
            assert_nm(&w, ROWS, COLS, n, m, &what);
            assert_eq!(zeros(&w), ROWS * COLS * (m - n) / m, "{what}");
        }
    }
}

#[test]
fn block_and_vector_patterns_prune_whole_tiles() {
    let patterns = [
        Pattern::Block { r: 4, c: 4 },
        Pattern::Block { r: 2, c: 8 },
        Pattern::Vector { v: 4 },
        Pattern::Vector { v: 8 },
    ];
    for (method, scope) in METHODS {
        for pattern in patterns {
            for s in [0.5, 0.3] {
                let what = format!("{method:?}/{scope:?} {pattern} at {s}");
                let w = prune_random(method, scope, pattern, s, 23);
                let zt = assert_tiles(&w, ROWS, COLS, pattern, &what);
                let got = zt.iter().filter(|&&z| z).count();
                let want = expected_zero_tiles(method, scope, pattern, ROWS, COLS, s);
                assert_eq!(got, want, "{what}: zero tiles");
                let measured = zeros(&w) as f64 / w.len() as f64;
                let (tr, tc, _, _) = tiles(pattern, ROWS, COLS);
                // Counts are floors per selection group; the smallest group here has 32 tiles.
                assert!(
                    measured <= s + 1e-12 && measured > s - 1.0 / 32.0,
                    "{what}: measured {measured}"
                );
                assert!(tr * tc > 0);
            }
        }
    }
}

#[test]
fn block_and_vector_selection_groups_are_exact() {
    // Wanda and row-scope magnitude choose within every band of r rows.
    for (method, scope) in [(Method::Wanda, Scope::Row), (Method::Magnitude, Scope::Row)] {
        for pattern in [Pattern::Block { r: 4, c: 4 }, Pattern::Vector { v: 8 }] {
            let w = prune_random(method, scope, pattern, 0.5, 5);
            let zt = assert_tiles(&w, ROWS, COLS, pattern, "band");
            let (tr, tc, _, _) = tiles(pattern, ROWS, COLS);
            for bi in 0..tr {
                let z = zt[bi * tc..(bi + 1) * tc].iter().filter(|&&z| z).count();
                assert_eq!(z, fl(tc, 0.5), "{method:?} {pattern}: band {bi}");
            }
        }
    }
}

#[test]
fn unstructured_counts() {
    for s in [0.5, 0.3, 0.7] {
        // Wanda: exactly floor(cols·s) per row, and they are the lowest scores of the row.
        let w0 = dense(ROWS, COLS, 3);
        let st = shared_stats();
        let w = prune_random(Method::Wanda, Scope::Row, Pattern::Unstructured, s, 3);
        let norm: Vec<f32> = st.scaler_row().unwrap().iter().map(|v| v.sqrt()).collect();
        for r in 0..ROWS {
            let row = &w[r * COLS..(r + 1) * COLS];
            assert_eq!(zeros(row), fl(COLS, s), "Wanda {s}: row {r}");
            let (mut max_pruned, mut min_kept) = (0f32, f32::MAX);
            for j in 0..COLS {
                let score = w0[r * COLS + j].abs() * norm[j];
                if row[j] == 0.0 {
                    max_pruned = max_pruned.max(score);
                } else {
                    assert_eq!(row[j], w0[r * COLS + j], "Wanda changed a kept weight");
                    min_kept = min_kept.min(score);
                }
            }
            assert!(
                max_pruned <= min_kept,
                "Wanda {s}: row {r} pruned a higher score than it kept"
            );
        }

        // Magnitude, whole matrix: the official `<=` threshold prunes floor(n·s) + 1 (distinct
        // random values, so no ties), the smallest |w|.
        let w = prune_random(
            Method::Magnitude,
            Scope::Matrix,
            Pattern::Unstructured,
            s,
            3,
        );
        assert_eq!(zeros(&w), fl(ROWS * COLS, s) + 1, "magnitude/matrix {s}");
        let max_pruned = w0
            .iter()
            .zip(&w)
            .filter(|(_, &p)| p == 0.0)
            .map(|(o, _)| o.abs())
            .fold(0f32, f32::max);
        let min_kept = w
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| v.abs())
            .fold(f32::MAX, f32::min);
        assert!(
            max_pruned <= min_kept,
            "magnitude/matrix {s}: pruned a larger weight than it kept"
        );
        assert!(
            w0.iter().zip(&w).all(|(o, p)| *p == 0.0 || p == o),
            "magnitude changed a kept weight"
        );

        // Magnitude, per row: exactly floor(cols·s) in every row.
        let w = prune_random(Method::Magnitude, Scope::Row, Pattern::Unstructured, s, 3);
        for r in 0..ROWS {
            assert_eq!(
                zeros(&w[r * COLS..(r + 1) * COLS]),
                fl(COLS, s),
                "magnitude/row {s}: row {r}"
            );
        }

        // SparseGPT: the official threshold semantics prune ⌊n·s⌋ (+1 and ties) per 128-column block.
        let w = prune_random(
            Method::Sparsegpt,
            Scope::Matrix,
            Pattern::Unstructured,
            s,
            3,
        );
        let z = zeros(&w);
        let upper: usize = (0..COLS)
            .step_by(128)
            .map(|i1| fl(ROWS * 128.min(COLS - i1), s) + 1)
            .sum();
        assert!(
            z >= fl(ROWS * COLS, s) && z <= upper,
            "SparseGPT {s}: {z} zeros, expected {}..={upper}",
            fl(ROWS * COLS, s)
        );
        assert!(w.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn sparsity_zero_prunes_nothing() {
    for (method, scope) in METHODS {
        let w = prune_random(method, scope, Pattern::Unstructured, 0.0, 9);
        assert_eq!(zeros(&w), 0, "{method:?}/{scope:?}");
    }
}

#[test]
fn bad_shapes_are_refused_naming_the_tensor() {
    let cases = [
        (32, 250, Pattern::NM { n: 2, m: 4 }),
        (32, 252, Pattern::NM { n: 4, m: 8 }),
        (32, 250, Pattern::Vector { v: 4 }),
        (32, 252, Pattern::Vector { v: 8 }),
        (32, 256, Pattern::Block { r: 3, c: 4 }),
        (32, 256, Pattern::Block { r: 4, c: 3 }),
        (30, 256, Pattern::Block { r: 4, c: 4 }),
    ];
    for (method, scope) in METHODS {
        for (rows, cols, pattern) in cases {
            let mut w = dense(rows, cols, 1);
            let before = w.clone();
            let st = stats(cols, 1);
            let name = "model.layers.7.mlp.odd_proj.weight";
            let e = prune::pruner(method, scope)
                .prune(
                    &mut w,
                    rows,
                    cols,
                    &st,
                    Target {
                        sparsity: 0.5,
                        pattern,
                    },
                    name,
                )
                .expect_err(&format!(
                    "{method:?} {pattern} on {rows}x{cols} must be refused"
                ));
            let msg = e.to_string();
            assert!(
                matches!(e, Error::Invalid(_)),
                "{method:?} {pattern}: {e:?}"
            );
            assert!(
                msg.contains(name),
                "{method:?} {pattern}: message does not name the tensor: {msg}"
            );
            assert!(
                msg.contains(&format!("{rows}x{cols}")),
                "message should give the shape: {msg}"
            );
            assert_eq!(
                w, before,
                "{method:?} {pattern}: a refused matrix must be left unchanged"
            );
        }
    }
}

#[test]
fn methods_without_statistics_are_refused() {
    let mut w = dense(8, 16, 1);
    let empty = SiteStats::from_sums(16, 0, 0, None, None);
    for m in [Method::Wanda, Method::Sparsegpt] {
        let e = prune::pruner(m, Scope::Row)
            .prune(
                &mut w,
                8,
                16,
                &empty,
                Target {
                    sparsity: 0.5,
                    pattern: Pattern::Unstructured,
                },
                "x.weight",
            )
            .expect_err("no statistics");
        assert!(e.to_string().contains("x.weight"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Pattern parsing
// ---------------------------------------------------------------------------------------------

#[test]
fn pattern_parsing() {
    let ok = [
        ("unstructured", Pattern::Unstructured),
        ("2:4", Pattern::NM { n: 2, m: 4 }),
        ("4:8", Pattern::NM { n: 4, m: 8 }),
        ("1:4", Pattern::NM { n: 1, m: 4 }),
        ("block:4x4", Pattern::Block { r: 4, c: 4 }),
        ("block:2x8", Pattern::Block { r: 2, c: 8 }),
        ("vector:8", Pattern::Vector { v: 8 }),
    ];
    for (s, p) in ok {
        let got: Pattern = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(got, p, "{s}");
        assert_eq!(got.to_string(), s, "display round trip");
    }
    assert_eq!(Pattern::NM { n: 2, m: 4 }.implied_sparsity(), Some(0.5));
    assert_eq!(Pattern::NM { n: 1, m: 4 }.implied_sparsity(), Some(0.75));
    assert_eq!(Pattern::Block { r: 4, c: 4 }.implied_sparsity(), None);
    for bad in [
        "4:4",
        "5:4",
        "0:0",
        "0:4",
        "block:0x4",
        "block:4x0",
        "block:4",
        "vector:0",
        "vector:x",
        "foo",
        "",
        "2:",
        ":4",
        "a:b",
    ] {
        let e = bad
            .parse::<Pattern>()
            .expect_err(&format!("`{bad}` must not parse"));
        assert!(matches!(e, Error::Invalid(_)), "{bad}: {e:?}");
        assert!(
            e.to_string().contains(&format!("`{bad}`")),
            "{bad}: message should quote the input: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// OWL
// ---------------------------------------------------------------------------------------------

#[test]
fn owl_allocation() {
    let (s, lambda) = (0.5, 0.08);
    for lods in [
        vec![1.0, 3.0, 2.0, 5.0],
        vec![0.2, 0.9, 0.5],
        vec![4.0, 1.0, 1.0, 1.0, 7.5, 2.0, 3.3],
    ] {
        let a = owl::allocate(&lods, s, lambda);
        assert_eq!(a.len(), lods.len());
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        assert!((mean - s).abs() < 1e-12, "{lods:?}: mean {mean}");
        // Official OWL (luuyin/OWL `prune_wanda_outlier`): LODs are mapped linearly onto [0, 2λ] and
        // shifted so the mean density is 1 − S. The sparsities therefore span exactly 2λ around a
        // mean of S, but are not centred on S: with n layers they lie in
        // [S − 2λ(n−1)/n, S + 2λ(n−1)/n], not always in [S − λ, S + λ].
        let n = lods.len() as f64;
        let bound = 2.0 * lambda * (n - 1.0) / n;
        for &v in &a {
            assert!(
                v >= s - bound - 1e-12 && v <= s + bound + 1e-12,
                "{lods:?}: {v} outside [S-2λ(n-1)/n, S+2λ(n-1)/n]"
            );
        }
        let hi = (0..lods.len())
            .max_by(|&i, &j| lods[i].total_cmp(&lods[j]))
            .unwrap();
        let lo = (0..lods.len())
            .min_by(|&i, &j| lods[i].total_cmp(&lods[j]))
            .unwrap();
        let min_s = a.iter().cloned().fold(f64::MAX, f64::min);
        let max_s = a.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(
            a[hi], min_s,
            "{lods:?}: the layer with the most outliers must be pruned least"
        );
        assert_eq!(
            a[lo], max_s,
            "{lods:?}: the layer with the fewest outliers must be pruned most"
        );
        // The spread is exactly 2λ and the order is the reverse of the LODs'.
        assert!((max_s - min_s - 2.0 * lambda).abs() < 1e-12);
        for i in 0..lods.len() {
            for j in 0..lods.len() {
                if lods[i] > lods[j] {
                    assert!(a[i] < a[j]);
                }
            }
        }
    }
    // One outlier-rich layer among three: [0, 0, 2λ] − mean → sparsities S + 2λ/3 (twice) and
    // S − 4λ/3, i.e. below S − λ. This is what the official code does.
    let a = owl::allocate(&[1.0, 1.0, 4.0], 0.5, 0.08);
    for (got, want) in a
        .iter()
        .zip([0.5 + 0.16 / 3.0, 0.5 + 0.16 / 3.0, 0.5 - 0.32 / 3.0])
    {
        assert!((got - want).abs() < 1e-12, "{a:?}");
    }
    assert_eq!(owl::allocate(&[2.0, 2.0, 2.0], 0.6, 0.08), vec![0.6; 3]);
    assert!(owl::allocate(&[], 0.5, 0.08).is_empty());
}

#[test]
fn owl_outlier_ratio() {
    // Mean 10.9, threshold 5 × mean = 54.5: one of ten values is above.
    let v = vec![vec![1.0f32; 9]
        .into_iter()
        .chain([100.0])
        .collect::<Vec<_>>()];
    assert!((owl::outlier_ratio(&v, 5.0) - 10.0).abs() < 1e-12);
    // Over several matrices together: mean of all 20 values = (18 + 100 + 100) / 20 = 10.9.
    let two = vec![
        vec![1.0f32; 9]
            .into_iter()
            .chain([100.0])
            .collect::<Vec<_>>(),
        vec![100.0f32].into_iter().chain(vec![1.0; 9]).collect(),
    ];
    assert!((owl::outlier_ratio(&two, 5.0) - 10.0).abs() < 1e-12);
    // Strictly above: a value equal to the threshold does not count.
    assert_eq!(owl::outlier_ratio(&[vec![1.0, 1.0, 1.0, 1.0]], 1.0), 0.0);
    assert!((owl::outlier_ratio(&[vec![1.0, 1.0, 1.0, 5.0]], 1.0) - 25.0).abs() < 1e-12);
    assert_eq!(owl::outlier_ratio(&[], 5.0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// The driver on the tiny model
// ---------------------------------------------------------------------------------------------

#[test]
fn driver_every_method_and_pattern() {
    let patterns: [(Pattern, f64); 5] = [
        (Pattern::Unstructured, 0.5),
        (Pattern::NM { n: 2, m: 4 }, 0.5),
        (Pattern::Block { r: 4, c: 4 }, 0.5),
        (Pattern::Block { r: 2, c: 8 }, 0.5),
        (Pattern::Vector { v: 4 }, 0.5),
    ];
    for method in [Method::Magnitude, Method::Wanda, Method::Sparsegpt] {
        for (pattern, s) in patterns {
            let what = format!("{method:?} {pattern}");
            let mut model = tiny_model();
            let plan = PrunePlan::new(method, pattern, s);
            let out = run_plan(&mut model, &plan).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.tensors.len(), 3 * 7, "{what}");
            assert_eq!(out.layer_sparsity, vec![s; 3], "{what}");
            assert!(out.owl_lod.is_none());
            assert_report_consistent(&model, &out);
            // SparseGPT's adaptive mask and whole-matrix magnitude use the official `<=`
            // threshold: one weight more per group (plus ties).
            if matches!(method, Method::Sparsegpt | Method::Magnitude)
                && pattern == Pattern::Unstructured
            {
                assert!(
                    out.sparsity_measured >= s && out.sparsity_measured <= s + 1e-3,
                    "{what}: measured {}",
                    out.sparsity_measured
                );
            } else {
                assert!(
                    (out.sparsity_measured - s).abs() < 1e-12,
                    "{what}: measured {}",
                    out.sparsity_measured
                );
            }
            for t in &out.tensors {
                assert_eq!(t.sparsity_target, s);
                let (layer, kind) = find_tensor(&model, &t.name);
                let w = &model.weights.layers[layer].linear(kind).weight;
                let (rows, cols) = (w.shape[0], w.shape[1]);
                assert!(
                    w.data().iter().all(|v| v.is_finite()),
                    "{what}: {} not finite",
                    t.name
                );
                match pattern {
                    Pattern::NM { n, m } => assert_nm(w.data(), rows, cols, n, m, &t.name),
                    Pattern::Block { .. } | Pattern::Vector { .. } => {
                        assert_tiles(w.data(), rows, cols, pattern, &t.name);
                    }
                    Pattern::Unstructured => {}
                }
            }
            // Embeddings, norms and the head are never touched.
            let orig = tiny_model();
            assert_eq!(
                model.weights.embed.data(),
                orig.weights.embed.data(),
                "{what}: embedding changed"
            );
            for (l, o) in model.weights.layers.iter().zip(&orig.weights.layers) {
                assert_eq!(l.attn_norm.data(), o.attn_norm.data());
                assert_eq!(l.mlp_norm.data(), o.mlp_norm.data());
            }
        }
    }
}

#[test]
fn driver_skips_layers_and_modules() {
    for method in [Method::Magnitude, Method::Wanda, Method::Sparsegpt] {
        let orig = tiny_model();
        let mut model = tiny_model();
        let mut plan = PrunePlan::new(method, Pattern::Unstructured, 0.5);
        plan.skip_layers = vec![1];
        plan.skip_modules = vec![LinearKind::Q, LinearKind::Down];
        let out = run_plan(&mut model, &plan).unwrap();
        assert_report_consistent(&model, &out);
        assert_eq!(
            out.tensors.len(),
            2 * 5,
            "{method:?}: two layers of five pruned linears"
        );
        for (i, (l, o)) in model
            .weights
            .layers
            .iter()
            .zip(&orig.weights.layers)
            .enumerate()
        {
            for k in LinearKind::ALL {
                let skipped = i == 1 || k == LinearKind::Q || k == LinearKind::Down;
                let name = driver::tensor_name(i, k);
                let (w, w0) = (l.linear(k).weight.data(), o.linear(k).weight.data());
                if skipped {
                    assert_eq!(w, w0, "{method:?}: {name} must be left dense and unchanged");
                    assert!(
                        !out.tensors.iter().any(|t| t.name == name),
                        "{name} reported as pruned"
                    );
                } else {
                    let z = w.iter().filter(|v| **v == 0.0).count() as f64 / w.len() as f64;
                    assert!((0.5..0.51).contains(&z), "{method:?}: {name} sparsity {z}");
                }
            }
        }
        assert!(out.sparsity_measured > 0.2 && out.sparsity_measured < 0.5);
    }
}

#[test]
fn driver_attention_and_mlp_sparsity() {
    let mut model = tiny_model();
    let mut plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    plan.attn_sparsity = Some(0.25);
    plan.mlp_sparsity = Some(0.625);
    let out = run_plan(&mut model, &plan).unwrap();
    assert_report_consistent(&model, &out);
    assert_eq!(out.tensors.len(), 21);
    for t in &out.tensors {
        let (_, kind) = find_tensor(&model, &t.name);
        let want = if kind.is_attention() { 0.25 } else { 0.625 };
        assert_eq!(t.sparsity_target, want, "{}", t.name);
        // Wanda: floor(cols·s) per row; these products are whole numbers.
        assert!(
            (t.sparsity - want).abs() < 1e-12,
            "{}: {}",
            t.name,
            t.sparsity
        );
    }
    // Only one of the two overridden.
    let mut model = tiny_model();
    let mut plan = PrunePlan::new(Method::Magnitude, Pattern::Unstructured, 0.5);
    plan.mlp_sparsity = Some(0.75);
    let out = run_plan(&mut model, &plan).unwrap();
    for t in &out.tensors {
        let (_, kind) = find_tensor(&model, &t.name);
        let want = if kind.is_attention() { 0.5 } else { 0.75 };
        // Whole-matrix magnitude prunes floor(n·s) + 1 (official `<=` threshold).
        let one = 1.0 / (t.shape[0] * t.shape[1]) as f64;
        assert!(
            (t.sparsity - want - one).abs() < 1e-12,
            "{}: {}",
            t.name,
            t.sparsity
        );
    }
}

#[test]
fn driver_owl_allocation() {
    for method in [Method::Wanda, Method::Magnitude] {
        for pattern in [Pattern::Unstructured, Pattern::Vector { v: 4 }] {
            let mut model = tiny_model();
            let mut plan = PrunePlan::new(method, pattern, 0.5);
            plan.allocation = Allocation::Owl {
                m: 5.0,
                lambda: 0.08,
            };
            let out =
                run_plan(&mut model, &plan).unwrap_or_else(|e| panic!("{method:?} {pattern}: {e}"));
            assert_report_consistent(&model, &out);
            let ls = &out.layer_sparsity;
            assert_eq!(ls.len(), 3);
            let mean = ls.iter().sum::<f64>() / 3.0;
            assert!((mean - 0.5).abs() < 1e-9, "layer sparsity {ls:?}");
            // Spread of at most 2λ around a mean of S (see `owl_allocation` for the exact bound).
            let bound = 2.0 * 0.08 * 2.0 / 3.0;
            assert!(
                ls.iter()
                    .all(|&v| (0.5 - bound - 1e-12..=0.5 + bound + 1e-12).contains(&v)),
                "{ls:?}"
            );
            let spread = ls.iter().cloned().fold(f64::MIN, f64::max)
                - ls.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread <= 0.16 + 1e-12, "{ls:?}");
            let lod = out.owl_lod.as_ref().expect("OWL reports the LODs");
            assert_eq!(lod.len(), 3);
            assert!(lod.iter().all(|v| (0.0..=100.0).contains(v)));
            assert_eq!(
                *ls,
                owl::allocate(lod, 0.5, 0.08),
                "allocation must follow the reported LODs"
            );
            for t in &out.tensors {
                let (layer, _) = find_tensor(&model, &t.name);
                assert!((t.sparsity_target - ls[layer]).abs() < 1e-12, "{}", t.name);
                // Floors per row (Wanda) or per matrix; cols ≥ 64.
                let one = 1.0 / (t.shape[0] * t.shape[1]) as f64;
                assert!(
                    t.sparsity <= t.sparsity_target + one + 1e-12
                        && t.sparsity > t.sparsity_target - 1.0 / 16.0,
                    "{}: {} vs {}",
                    t.name,
                    t.sparsity,
                    t.sparsity_target
                );
            }
            eprintln!("{method:?} {pattern}: LOD {lod:?} -> {ls:?}");
        }
    }
}

#[test]
fn plan_validation() {
    let model = tiny_model();
    let ok = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    ok.validate(&model).unwrap();
    PrunePlan::new(Method::Wanda, Pattern::NM { n: 2, m: 4 }, 0.5)
        .validate(&model)
        .unwrap();

    let check = |plan: PrunePlan, needle: &str| {
        let e = plan.validate(&model).expect_err(needle);
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert!(
            e.to_string().contains(needle),
            "`{e}` should mention `{needle}`"
        );
        // prune_model validates too, before touching any weight.
        let mut m = tiny_model();
        let e2 =
            prune::prune_model(&mut m, &tiny_calib(1), &plan, &mut |_, _, _| {}).expect_err(needle);
        assert_eq!(e.to_string(), e2.to_string());
        assert_eq!(m.weights.layers[0].q.weight.count_zeros(), 0);
    };
    check(
        PrunePlan::new(Method::Wanda, Pattern::Unstructured, 1.0),
        "--sparsity",
    );
    check(
        PrunePlan::new(Method::Wanda, Pattern::Unstructured, -0.1),
        "--sparsity",
    );
    check(
        PrunePlan::new(Method::Wanda, Pattern::Unstructured, f64::NAN),
        "--sparsity",
    );
    let mut p = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    p.attn_sparsity = Some(1.5);
    check(p, "--attn-sparsity");
    let mut p = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    p.mlp_sparsity = Some(-0.2);
    check(p, "--mlp-sparsity");
    check(
        PrunePlan::new(Method::Wanda, Pattern::NM { n: 2, m: 4 }, 0.6),
        "2:4",
    );
    let mut p = PrunePlan::new(Method::Sparsegpt, Pattern::NM { n: 2, m: 4 }, 0.5);
    p.attn_sparsity = Some(0.5);
    check(p, "2:4");
    let mut p = PrunePlan::new(Method::Wanda, Pattern::NM { n: 2, m: 4 }, 0.5);
    p.allocation = Allocation::Owl {
        m: 5.0,
        lambda: 0.08,
    };
    check(p, "OWL");
    let mut p = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    p.allocation = Allocation::Owl {
        m: 5.0,
        lambda: 0.6,
    };
    check(p, "lambda");
    let mut p = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    p.skip_layers = vec![0, 3];
    check(p, "layer 3");
    // block 5x5 divides nothing here; the message names the first matrix.
    check(
        PrunePlan::new(Method::Magnitude, Pattern::Block { r: 5, c: 5 }, 0.5),
        "model.layers.0.self_attn.q_proj.weight",
    );
    check(
        PrunePlan::new(Method::Magnitude, Pattern::Vector { v: 3 }, 0.5),
        "model.layers.0.self_attn.q_proj.weight",
    );
}

#[test]
fn skip_module_names_parse() {
    use LinearKind::*;
    assert_eq!(prune::parse_kinds("q,k").unwrap(), vec![Q, K]);
    assert_eq!(prune::parse_kinds("attn").unwrap(), vec![Q, K, V, O]);
    assert_eq!(
        prune::parse_kinds("mlp, down").unwrap(),
        vec![Gate, Up, Down, Down]
    );
    let e = prune::parse_kinds("q,bogus").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
}

#[test]
fn nan_weight_is_reported_by_block() {
    // Every method, a middle block and the last one (which no forward pass runs through after
    // pruning), a weight of a pruned linear.
    for method in [Method::Wanda, Method::Sparsegpt, Method::Magnitude] {
        for (layer, kind) in [(1, LinearKind::Q), (2, LinearKind::Down)] {
            let mut model = tiny_model();
            model.weights.layers[layer]
                .linear_mut(kind)
                .weight
                .data_mut()[5] = f32::NAN;
            let plan = PrunePlan::new(method, Pattern::Unstructured, 0.5);
            let e = run_plan(&mut model, &plan).expect_err(&format!(
                "{method:?}: NaN weight in block {layer} must be reported"
            ));
            let msg = e.to_string();
            assert!(matches!(e, Error::Numeric(_)), "{method:?}: {e:?}");
            assert!(
                msg.contains(&format!("block {layer}"))
                    || msg.contains(&format!("model.layers.{layer}")),
                "{method:?}: the message should name block {layer} or its tensor: {msg}"
            );
            eprintln!("{method:?} block {layer}: {msg}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calibration
// ---------------------------------------------------------------------------------------------

#[test]
fn sample_windows_too_short_names_the_file() {
    let stream: Vec<u32> = (0..100).collect();
    let path = Path::new("/some/where/calib.txt");
    for (samples, len) in [(4, 32), (1, 100), (1, 200)] {
        let e = calibrate::sample_windows(&stream, samples, len, 0, path).expect_err("too short");
        assert!(
            matches!(&e, Error::Text { path: p, .. } if p == path),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("/some/where/calib.txt") && msg.contains("too little"),
            "{msg}"
        );
    }
    // Zero samples / one-token windows are invalid requests.
    assert!(calibrate::sample_windows(&stream, 0, 16, 0, path).is_err());
    assert!(calibrate::sample_windows(&stream, 2, 1, 0, path).is_err());
    // Exactly enough is fine.
    let c = calibrate::sample_windows(&stream, 3, 32, 0, path).unwrap();
    assert_eq!((c.n, c.len, c.ids.len()), (3, 32, 96));
}

#[test]
fn sample_windows_are_seeded_windows_of_the_stream() {
    let stream: Vec<u32> = (0..10_000).map(|i| i * 3 + 1).collect();
    let path = Path::new("stream.txt");
    let a = calibrate::sample_windows(&stream, 16, 64, 42, path).unwrap();
    let b = calibrate::sample_windows(&stream, 16, 64, 42, path).unwrap();
    let c = calibrate::sample_windows(&stream, 16, 64, 43, path).unwrap();
    assert_eq!(a.ids, b.ids, "same seed, same windows");
    assert_ne!(a.ids, c.ids, "another seed, other windows");
    assert_eq!((a.n, a.len, a.ids.len()), (16, 64, 16 * 64));
    for i in 0..a.n {
        let w = a.window(i);
        let start = ((w[0] - 1) / 3) as usize;
        assert_eq!(
            w,
            &stream[start..start + 64],
            "window {i} is a contiguous slice"
        );
        assert!(start < stream.len() - 64);
    }
    assert!(a.source.contains("stream.txt"));
}

#[test]
fn ids_file_golden_and_bad() {
    let good = golden().join("calib_c4_128x512.safetensors");
    let c = calibrate::from_ids_file(&good, 49152).unwrap();
    assert_eq!((c.n, c.len, c.ids.len()), (128, 512, 128 * 512));
    assert!(c.ids.iter().all(|&v| v < 49152));
    assert!(c.source.contains("calib_c4_128x512.safetensors"));
    // The same file against a smaller vocabulary: ids out of range.
    let e = calibrate::from_ids_file(&good, 1000).expect_err("ids >= vocab");
    assert!(
        e.to_string().contains("calib_c4_128x512.safetensors")
            && e.to_string().contains("vocabulary"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str,
                 tensor: &str,
                 dtype: safetensors::Dtype,
                 shape: Vec<usize>,
                 bytes: Vec<u8>|
     -> PathBuf {
        let p = dir.path().join(name);
        let view = safetensors::tensor::TensorView::new(dtype, shape, &bytes).unwrap();
        std::fs::write(
            &p,
            safetensors::tensor::serialize([(tensor, view)], None).unwrap(),
        )
        .unwrap();
        p
    };
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let ok_ids: Vec<i64> = (0..4 * 8).map(|i| i % 300).collect();

    // Sanity: a small good file of each integer dtype.
    let p = write(
        "ok_i64.safetensors",
        "input_ids",
        safetensors::Dtype::I64,
        vec![4, 8],
        i64s(&ok_ids),
    );
    let c = calibrate::from_ids_file(&p, 320).unwrap();
    assert_eq!((c.n, c.len), (4, 8));
    assert_eq!(c.ids, ok_ids.iter().map(|&v| v as u32).collect::<Vec<_>>());
    let i32b: Vec<u8> = ok_ids
        .iter()
        .flat_map(|&x| (x as i32).to_le_bytes())
        .collect();
    let p = write(
        "ok_i32.safetensors",
        "input_ids",
        safetensors::Dtype::I32,
        vec![4, 8],
        i32b,
    );
    assert_eq!(calibrate::from_ids_file(&p, 320).unwrap().ids.len(), 32);

    let f32b: Vec<u8> = ok_ids
        .iter()
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let mut bad_ids = ok_ids.clone();
    bad_ids[17] = 320;
    let mut neg_ids = ok_ids.clone();
    neg_ids[3] = -1;
    let bads: Vec<(PathBuf, &str)> = vec![
        (
            write(
                "wrong_name.safetensors",
                "ids",
                safetensors::Dtype::I64,
                vec![4, 8],
                i64s(&ok_ids),
            ),
            "input_ids",
        ),
        (
            write(
                "wrong_dtype.safetensors",
                "input_ids",
                safetensors::Dtype::F32,
                vec![4, 8],
                f32b,
            ),
            "dtype",
        ),
        (
            write(
                "wrong_rank.safetensors",
                "input_ids",
                safetensors::Dtype::I64,
                vec![32],
                i64s(&ok_ids),
            ),
            "[n, len]",
        ),
        (
            write(
                "too_short.safetensors",
                "input_ids",
                safetensors::Dtype::I64,
                vec![32, 1],
                i64s(&ok_ids),
            ),
            "[n, len]",
        ),
        (
            write(
                "big_id.safetensors",
                "input_ids",
                safetensors::Dtype::I64,
                vec![4, 8],
                i64s(&bad_ids),
            ),
            "320",
        ),
        (
            write(
                "neg_id.safetensors",
                "input_ids",
                safetensors::Dtype::I64,
                vec![4, 8],
                i64s(&neg_ids),
            ),
            "-1",
        ),
    ];
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let missing = dir.path().join("missing.safetensors");
    for (p, needle) in bads
        .iter()
        .map(|(p, n)| (p.clone(), *n))
        .chain([(garbage, "safetensors"), (missing, "missing.safetensors")])
    {
        let e = calibrate::from_ids_file(&p, 320).expect_err(&p.display().to_string());
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()),
            "message does not name the file: {msg}"
        );
        assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    }
}

/// Calibration chunks run side by side, one per thread (`prune::runner`); the pruned weights
/// must not depend on how many threads ran them. 300 windows of 32 tokens make three chunks of
/// 128, 128 and 44 windows, so the four-thread run really runs chunks in parallel.
#[test]
fn pruning_does_not_depend_on_the_thread_count() {
    let mut rng = SplitMix64(99);
    let (n, len) = (300, 32);
    let calib = CalibSet {
        ids: (0..n * len).map(|_| rng.below(320) as u32).collect(),
        n,
        len,
        source: "random ids".into(),
    };
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    };
    // The statistics themselves, bit for bit (f64 sums folded in chunk order).
    let model = tiny_model();
    let needs = prune::Needs {
        col_sq: true,
        hessian: true,
    };
    let stats = |threads: usize| {
        let mut h = lopper::model::forward::embed(&model.weights, &calib.ids).unwrap();
        pool(threads).install(|| driver::layer_stats(&model, 1, &mut h, n, len, needs).unwrap())
    };
    let (sa, sb) = (stats(1), stats(4));
    assert_eq!(sa.len(), 4);
    for (site, a) in &sa {
        let b = &sb[site];
        assert_eq!((a.samples, a.tokens), (b.samples, b.tokens));
        let f64bits = |v: &Option<Vec<f64>>| {
            v.as_ref()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert!(
            f64bits(&a.col_sq) == f64bits(&b.col_sq),
            "{site:?}: Σx² differs"
        );
        assert!(f64bits(&a.xtx) == f64bits(&b.xtx), "{site:?}: XᵀX differs");
    }
    for (method, pattern) in [
        (Method::Wanda, Pattern::Unstructured),
        (Method::Sparsegpt, Pattern::Unstructured),
        (Method::Sparsegpt, Pattern::NM { n: 2, m: 4 }),
    ] {
        let plan = PrunePlan::new(method, pattern, 0.5);
        let run = |threads: usize| {
            let mut model = tiny_model();
            pool(threads)
                .install(|| prune::prune_model(&mut model, &calib, &plan, &mut |_, _, _| {}))
                .unwrap();
            model
        };
        let (a, b) = (run(1), run(4));
        for (i, (la, lb)) in a.weights.layers.iter().zip(&b.weights.layers).enumerate() {
            for k in LinearKind::ALL {
                let (wa, wb) = (la.linear(k).weight.data(), lb.linear(k).weight.data());
                assert!(
                    wa.iter().zip(wb).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{method:?} {pattern}: {} differs between 1 and 4 threads",
                    driver::tensor_name(i, k)
                );
            }
        }
    }
}

/// Pruning with the weights in a scratch file (`prune_model_spilled`, the CLI's default) gives
/// the same weights and report as pruning in memory, for a mapped (f32 safetensors), an owned
/// (dequantized) and a lazily converted (bf16 safetensors) source, and afterwards holds no
/// weight in memory and leaves nothing in the directory.
#[test]
fn spilled_pruning_equals_in_memory_pruning() {
    use lopper::model::spill::Spill;
    use lopper::model::weights::Storage;
    let calib = tiny_calib(5);
    let mut plans = vec![
        PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5),
        PrunePlan::new(Method::Sparsegpt, Pattern::NM { n: 2, m: 4 }, 0.5),
        PrunePlan::new(Method::Magnitude, Pattern::Unstructured, 0.6),
    ];
    let mut owl = PrunePlan::new(Method::Sparsegpt, Pattern::Unstructured, 0.6);
    owl.allocation = Allocation::Owl {
        m: 5.0,
        lambda: 0.08,
    };
    owl.skip_layers = vec![1];
    plans.push(owl);
    let bf = tempfile::tempdir().unwrap();
    let bf_dir = save_tiny_bf16(bf.path());
    for source in ["mapped", "owned", "bf16"] {
        for plan in &plans {
            let what = format!("{:?} {} {source}", plan.method, plan.pattern);
            let fresh = |lazy: bool| {
                if source == "bf16" {
                    return lopper::io::load_model_with(&bf_dir, lazy).unwrap();
                }
                let mut m = tiny_model();
                if source == "owned" {
                    for l in &mut m.weights.layers {
                        l.tensors_mut().into_iter().for_each(|t| {
                            t.data_mut();
                        });
                    }
                    m.weights.embed.data_mut();
                }
                m
            };
            let mut a = fresh(false);
            let oa = prune::prune_model(&mut a, &calib, plan, &mut |_, _, _| {}).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let spill = Spill::create_in(dir.path()).unwrap();
            let mut b = fresh(true);
            let ob = prune::prune_model_spilled(&mut b, &calib, plan, &spill, &mut |_, _, _| {})
                .unwrap();
            assert_eq!(
                (oa.zeros, oa.pruned_params),
                (ob.zeros, ob.pruned_params),
                "{what}"
            );
            assert_eq!(oa.layer_sparsity, ob.layer_sparsity, "{what}");
            assert_report_consistent(&b, &ob);
            let (ta, tb) = (a.weights.named_tensors(), b.weights.named_tensors());
            assert_eq!(ta.len(), tb.len());
            for ((name, x), (_, y)) in ta.iter().zip(&tb) {
                let in_memory = match &y.data {
                    Storage::Owned(_) => true,
                    Storage::Lazy { cache, .. } => cache.get().is_some(),
                    Storage::Mapped { .. } => false,
                };
                assert!(!in_memory, "{what}: {name} is still in memory");
                assert!(
                    x.data()
                        .iter()
                        .zip(&*y.values())
                        .all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{what}: {name} differs"
                );
            }
            assert!(spill.bytes() > 0);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }
}

/// Evaluation block by block (what `lopper prune --eval` runs) gives the window-by-window
/// perplexity bit for bit, reports each block, and leaves no weight of a lazily converted
/// (bf16) model in memory.
#[test]
fn evaluation_by_block_equals_window_by_window_and_holds_no_block() {
    use lopper::model::weights::Storage;
    let dir = tempfile::tempdir().unwrap();
    let bf_dir = save_tiny_bf16(dir.path());
    let mut rng = SplitMix64(11);
    // 5 windows: with 2 workers the last round runs one.
    let ids: Vec<u32> = (0..5 * 48 + 7).map(|_| rng.below(320) as u32).collect();
    let text = Path::new("random ids");
    let eager = lopper::io::load_model(&bf_dir).unwrap();
    let want = lopper::eval::perplexity(&eager, &ids, 48, 5, text, &mut |_, _| {}).unwrap();
    let mut lazy = lopper::io::load_model_with(&bf_dir, true).unwrap();
    let mut steps = Vec::new();
    let got = lopper::eval::perplexity_by_block(&mut lazy, &ids, 48, 5, text, &mut |d, n| {
        steps.push((d, n))
    })
    .unwrap();
    assert_eq!(
        got.perplexity.to_bits(),
        want.perplexity.to_bits(),
        "{} vs {}",
        got.perplexity,
        want.perplexity
    );
    assert_eq!(
        (got.predictions, got.windows, got.tokens),
        (want.predictions, want.windows, want.tokens)
    );
    let blocks = lazy.weights.layers.len();
    assert_eq!(
        steps,
        (1..=blocks + 1)
            .map(|d| (d, blocks + 1))
            .collect::<Vec<_>>()
    );
    let mut lazies = 0;
    for (name, t) in lazy.weights.named_tensors() {
        if let Storage::Lazy { cache, .. } = &t.data {
            lazies += 1;
            assert!(cache.get().is_none(), "{name} is still in memory");
        }
    }
    assert!(lazies > 7 * blocks, "only {lazies} lazy tensors");
    // Too few tokens for one window: the same error as window by window.
    let e = lopper::eval::perplexity_by_block(&mut lazy, &ids[..40], 48, 5, text, &mut |_, _| {});
    assert!(matches!(e, Err(Error::Text { .. })), "{e:?}");
}

/// report.json's `passes` say which calibration passes ran, over how many blocks, with the
/// analytic work of each: magnitude runs none; Wanda a statistics pass over every block (up to
/// down_proj's input) and a propagating pass over all but the last; SparseGPT adds its Grams.
#[test]
fn pass_reports_name_the_passes_and_their_work() {
    let calib = tiny_calib(7);
    for method in [Method::Magnitude, Method::Wanda, Method::Sparsegpt] {
        let mut model = tiny_model();
        let orig = tiny_model();
        let out = run_plan(
            &mut model,
            &PrunePlan::new(method, Pattern::Unstructured, 0.5),
        )
        .unwrap();
        let names: Vec<&str> = out.passes.iter().map(|p| p.name).collect();
        if method == Method::Magnitude {
            assert!(names.is_empty(), "magnitude ran {names:?}");
            continue;
        }
        assert_eq!(names, ["statistics", "propagate"], "{method:?}");
        let hd = model.config.head_dim;
        let work = |skip_down: bool, layers: usize| -> f64 {
            orig.weights.layers[..layers]
                .iter()
                .map(|l| calib.n as f64 * flops::block_flops(l, hd, calib.len, skip_down))
                .sum::<f64>()
                / 1e9
        };
        let (st, fw) = (&out.passes[0], &out.passes[1]);
        assert_eq!((st.blocks, fw.blocks), (3, 2), "{method:?}");
        let gram = st.gram_gflop;
        assert_eq!(
            gram > 0.0,
            method == Method::Sparsegpt,
            "{method:?} Gram {gram}"
        );
        if method == Method::Sparsegpt {
            // Distinct inputs of a block: attention (64), o_proj (8·8), MLP (64), down (width).
            let tokens = (calib.n * calib.len) as f64;
            let l = &orig.weights.layers[0];
            let down = l.linear(LinearKind::Down).in_features() as f64;
            let o = l.linear(LinearKind::O).in_features() as f64;
            let per_block = tokens * (2.0 * 64.0 * 65.0 + o * (o + 1.0) + down * (down + 1.0));
            assert!((gram - 3.0 * per_block / 1e9).abs() < 1e-12, "Gram {gram}");
        }
        assert!(
            (st.gflop - gram - work(true, 3)).abs() < 1e-9,
            "{method:?} statistics"
        );
        // The pruned blocks have the dense blocks' shapes, so the same analytic work.
        assert!(
            (fw.gflop - work(false, 2)).abs() < 1e-9,
            "{method:?} propagate"
        );
        assert!(work(true, 3) < work(false, 3));
        for p in &out.passes {
            assert!(p.seconds > 0.0 && (p.gflop_per_s - p.gflop / p.seconds).abs() < 1e-6);
        }
    }
}

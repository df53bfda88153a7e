//! Activation sparsity on a weight-sparse model: the column-major bitmask format
//! (`formats::ColBitmaskOf`) against its naive reference for every value type, odd shapes,
//! 0 / 50 / 90 / 100% weight sparsity (and 2:4) times 0 / 50 / 99 / 100% input sparsity, every
//! kernel set this machine has, storing and accumulating; zero-input columns are never read; it
//! stores exactly the nonzero weights; tensors round trip and corrupt ones are refused, naming
//! the tensor.

use lopper::formats::{cap_isa, ColBitmaskOf, ColMajorOf, Elem, Isa, WeightFormat};

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

/// `v` with a fraction `sparsity` of its entries (chosen by a second stream) set to zero.
fn zero_some(mut v: Vec<f32>, seed: u64, sparsity: f64) -> Vec<f32> {
    let n = v.len();
    let r = rand_vec(seed + 99, n);
    let zeros = (sparsity * n as f64).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
    for &j in &order[..zeros] {
        v[j] = 0.0;
    }
    v
}

/// 2:4 along each row: the two smallest magnitudes of every 4 consecutive inputs are zeroed.
fn two_four(mut w: Vec<f32>, cols: usize) -> Vec<f32> {
    for row in w.chunks_mut(cols) {
        for g in row.chunks_mut(4) {
            let mut o: Vec<usize> = (0..g.len()).collect();
            o.sort_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()));
            for &i in o.iter().take(g.len() / 2) {
                g[i] = 0.0;
            }
        }
    }
    w
}

const SHAPES: [(usize, usize); 6] = [(1, 1), (63, 17), (65, 130), (130, 257), (7, 3), (700, 600)];

fn weights(seed: u64, rows: usize, cols: usize) -> Vec<(String, Vec<f32>)> {
    let w = rand_vec(seed, rows * cols);
    let mut out: Vec<(String, Vec<f32>)> = [0.0, 0.5, 0.9, 1.0]
        .iter()
        .map(|&s| (format!("{s}"), zero_some(w.clone(), seed, s)))
        .collect();
    out.push(("2:4".into(), two_four(w, cols)));
    out
}

fn check_format<E: Elem>() {
    for (si, &(rows, cols)) in SHAPES.iter().enumerate() {
        for (ws, w) in weights(si as u64 + 1, rows, cols) {
            let f = ColBitmaskOf::<E>::from_dense(&w, rows, cols).unwrap();
            assert_eq!(f.stored(), w.iter().filter(|v| **v != 0.0).count());
            // The same values as the dense column-major format (same encoding, zeros dropped).
            let dense = ColMajorOf::<E>::from_dense(&w, rows, cols).unwrap();
            assert_eq!(f.to_dense(), dense.to_dense(), "{} w={ws}", f.kind());
            let absw: Vec<f32> = f.to_dense().iter().map(|v| v.abs()).collect();
            for &s in &[0.0, 0.5, 0.99, 1.0] {
                for m in [1usize, 3] {
                    let x: Vec<f32> = (0..m)
                        .flat_map(|i| {
                            let seed = 100 * si as u64 + i as u64;
                            zero_some(rand_vec(seed, cols), seed, s)
                        })
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
                                        "{} {rows}x{cols} w={ws} x={s} m={m} cap={cap:?} acc={acc} [{i},{r}]: {g} vs {e}",
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
}

#[test]
fn colbitmask_matches_naive_every_value_type() {
    check_format::<f32>();
    check_format::<half::bf16>();
    check_format::<half::f16>();
    check_format::<i8>();
}

/// Prefill-sized products (more rows than the decode path) decode tiles and match too.
#[test]
fn colbitmask_many_rows_match_naive() {
    let (rows, cols, m) = (70, 90, 40);
    let w = zero_some(rand_vec(4, rows * cols), 4, 0.5);
    let f = ColBitmaskOf::<half::bf16>::from_dense(&w, rows, cols).unwrap();
    let x = rand_vec(8, m * cols);
    let (mut got, mut want) = (vec![0f32; m * rows], vec![0f32; m * rows]);
    f.matmul(&x, m, &mut got);
    f.matmul_naive(&x, m, &mut want);
    for (g, e) in got.iter().zip(&want) {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
    }
}

/// Columns whose input is zero are not read: NaN weights there leave the product finite.
#[test]
fn colbitmask_skips_zero_columns() {
    let (rows, cols) = (130, 257);
    let x = zero_some(rand_vec(7, cols), 7, 0.5);
    let mut w = zero_some(rand_vec(3, rows * cols), 3, 0.5);
    for r in 0..rows {
        for j in 0..cols {
            if x[j] == 0.0 && w[r * cols + j] != 0.0 {
                w[r * cols + j] = f32::NAN;
            }
        }
    }
    let f = ColBitmaskOf::<half::bf16>::from_dense(&w, rows, cols).unwrap();
    for cap in [None, Some(Isa::Portable)] {
        let _g = cap_isa(cap);
        let mut y = vec![0f32; rows];
        f.matvec(&x, &mut y);
        assert!(y.iter().all(|v| v.is_finite()), "{cap:?}");
        let mut all = vec![0f32; rows];
        f.matvec(&vec![1.0; cols], &mut all);
        assert!(
            all.iter().any(|v| v.is_nan()),
            "dense input reads every column"
        );
    }
}

#[test]
fn colbitmask_tensors_round_trip_and_corrupt_ones_are_refused() {
    let (rows, cols) = (65, 9);
    let w = zero_some(rand_vec(5, rows * cols), 5, 0.5);
    let f = ColBitmaskOf::<i8>::from_dense(&w, rows, cols).unwrap();
    let t = f.to_tensors("m.w");
    assert_eq!(ColBitmaskOf::<i8>::from_tensors("m.w", &t).unwrap(), f);
    let pos = |name: &str| t.iter().position(|x| x.name == name).unwrap();
    // One value missing.
    let mut bad = t.clone();
    let v = pos("m.w.values");
    let n = bad[v].data.len() - 1;
    bad[v].data.truncate(n);
    bad[v].shape = vec![n];
    let e = ColBitmaskOf::<i8>::from_tensors("m.w", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.w.values"), "{e}");
    // A bit set on a padding row (65 rows: rows 65..72 of each column's last byte).
    let mut bad = t.clone();
    let mk = pos("m.w.masks");
    let last = bad[mk].data.len() - 1;
    bad[mk].data[last] |= 0x80;
    let e = ColBitmaskOf::<i8>::from_tensors("m.w", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.w.masks"), "{e}");
    let mut bad = t;
    bad.retain(|x| x.name != "m.w.scales");
    let e = ColBitmaskOf::<i8>::from_tensors("m.w", &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("m.w.scales"), "{e}");
}

/// At 50% weight sparsity a bf16 column costs half its values plus one bit per row.
#[test]
fn colbitmask_bytes_follow_the_nonzeros() {
    let (rows, cols) = (64, 32);
    let w = two_four(rand_vec(9, rows * cols), cols);
    let f = ColBitmaskOf::<half::bf16>::from_dense(&w, rows, cols).unwrap();
    assert_eq!(f.nbytes(), rows * cols / 2 * 2 + rows / 8 * cols);
    let active: Vec<u32> = (0..cols as u32).step_by(2).collect();
    let half_cols: usize = f.bytes_for_columns(&active);
    assert!(half_cols * 2 <= f.nbytes() + rows && half_cols * 2 >= f.nbytes() - rows);
}

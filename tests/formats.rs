//! Compressed weight formats: products vs dense, fast vs naive, edge cases, serialization and
//! corrupt-input rejection.

use lopper::formats::*;

/// `limit_isa` switches every kernel in the process: tests that compare kernels hold this
/// lock so another test cannot flip it under them (tests run on parallel threads).
static KERNEL_MODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn kernel_mode() -> std::sync::MutexGuard<'static, ()> {
    KERNEL_MODE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `body` once with every kernel set this CPU has: the best one (AVX-512, AVX2 or NEON),
/// AVX2 again on AVX-512 machines, and the portable paths.
fn each_kernel_set(mut body: impl FnMut()) {
    let _mode = kernel_mode();
    // Lifted at the end, also when a check panics.
    let _cap = cap_isa(None);
    let mut caps = vec![None];
    if isa() == Isa::Avx512 {
        caps.push(Some(Isa::Avx2));
    }
    caps.push(Some(Isa::Portable));
    for cap in caps {
        limit_isa(cap);
        body();
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        self.unif() * 2.0 - 1.0 + (self.unif() * 2.0 - 1.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn random(rng: &mut Rng, rows: usize, cols: usize, sparsity: f32) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| {
            if rng.unif() < sparsity {
                0.0
            } else {
                rng.normal() + 0.01
            }
        })
        .collect()
}

/// N:M along rows; some groups keep fewer than N.
fn nm_matrix(rng: &mut Rng, rows: usize, cols: usize, n: usize, m: usize) -> Vec<f32> {
    let mut w = random(rng, rows, cols, 0.0);
    for r in 0..rows {
        for g in 0..cols / m {
            let mut idx: Vec<usize> = (0..m).collect();
            for i in (1..m).rev() {
                idx.swap(i, rng.below(i + 1));
            }
            let keep = if rng.below(5) == 0 {
                rng.below(n + 1)
            } else {
                n
            };
            for &k in &idx[keep..] {
                w[r * cols + g * m + k] = 0.0;
            }
        }
    }
    w
}

fn block_matrix(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    br: usize,
    bc: usize,
    density: f32,
) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for b in 0..rows.div_ceil(br) {
        for c in 0..cols.div_ceil(bc) {
            if rng.unif() < density {
                for i in b * br..((b + 1) * br).min(rows) {
                    for j in c * bc..((c + 1) * bc).min(cols) {
                        w[i * cols + j] = rng.normal();
                    }
                }
            }
        }
    }
    w
}

/// y = x·wᵀ in f64 and the per-entry scale Σ|w·x| used for relative tolerances.
fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * rows];
    let mut s = vec![0f64; m * rows];
    for i in 0..m {
        for r in 0..rows {
            for k in 0..cols {
                let p = w[r * cols + k] as f64 * x[i * cols + k] as f64;
                y[i * rows + r] += p;
                s[i * rows + r] += p.abs();
            }
        }
    }
    (y, s)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64], tol: f64) {
    for (j, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (s + 1e-20),
            "{what}: entry {j}: got {g}, want {w} (scale {s}, err {err})"
        );
    }
}

fn lossless(kind: &str) -> bool {
    !(kind.ends_with("-bf16") || kind.ends_with("-f16") || kind.ends_with("-i8"))
}

/// Checks one format against the dense matrix it was built from.
fn check(f: &dyn WeightFormat, w: &[f32], rows: usize, cols: usize, rng: &mut Rng) {
    let kind = f.kind();
    assert_eq!((f.rows(), f.cols()), (rows, cols), "{kind}");
    let d = f.to_dense();
    assert_eq!(d.len(), rows * cols);
    if lossless(kind) {
        assert_eq!(
            d, w,
            "{kind}: to_dense differs from the source ({rows}×{cols})"
        );
    } else {
        // Quantized formats: within half a step of the row's scale (bf16: 2⁻⁸ relative; f16:
        // 2⁻¹¹ relative, or half its subnormal step 2⁻²⁴).
        for r in 0..rows {
            let amax = w[r * cols..(r + 1) * cols]
                .iter()
                .fold(0f32, |a, &v| a.max(v.abs()));
            for k in 0..cols {
                let (a, b) = (w[r * cols + k], d[r * cols + k]);
                let tol = if kind.ends_with("-bf16") {
                    a.abs() / 256.0
                } else if kind.ends_with("-f16") {
                    a.abs() / 2048.0 + 2f32.powi(-25)
                } else {
                    amax / 254.0 * 1.001
                };
                assert!((a - b).abs() <= tol + 1e-30, "{kind}: ({r},{k}) {a} vs {b}");
                if a == 0.0 {
                    assert_eq!(b, 0.0, "{kind}: ({r},{k}) a zero became nonzero");
                }
            }
        }
    }
    for m in [1usize, 2, 4, 5, 9] {
        let x: Vec<f32> = (0..m * cols).map(|_| rng.normal()).collect();
        let (want_src, scale) = reference(w, rows, cols, &x, m);
        let (want, _) = reference(&d, rows, cols, &x, m);
        let mut fast = vec![f32::NAN; m * rows];
        let mut naive = vec![f32::NAN; m * rows];
        f.matmul(&x, m, &mut fast);
        f.matmul_naive(&x, m, &mut naive);
        let ctx = format!("{kind} {rows}×{cols} m={m} ({} kernels)", isa().name());
        assert_close(&format!("{ctx} naive"), &naive, &want, &scale, 1e-5);
        assert_close(&format!("{ctx} fast"), &fast, &want, &scale, 1e-4);
        if lossless(kind) {
            assert_close(&format!("{ctx} vs source"), &fast, &want_src, &scale, 1e-4);
        }
        // Accumulating form: y0 + product.
        let y0: Vec<f32> = (0..m * rows).map(|_| rng.normal()).collect();
        let mut acc = y0.clone();
        f.matmul_add(&x, m, &mut acc, true);
        let want_acc: Vec<f64> = want.iter().zip(&y0).map(|(w, &a)| w + a as f64).collect();
        let scale_acc: Vec<f64> = scale
            .iter()
            .zip(&y0)
            .map(|(s, &a)| s + a.abs() as f64)
            .collect();
        assert_close(
            &format!("{ctx} accumulate"),
            &acc,
            &want_acc,
            &scale_acc,
            1e-4,
        );
        if m == 1 {
            let mut v = vec![f32::NAN; rows];
            f.matvec(&x, &mut v);
            assert_eq!(v, fast[..rows], "{ctx}: matvec vs matmul");
        }
    }
    // Serialization round trip.
    let t = f.to_tensors("layer.w");
    let back = from_tensors(kind, "layer.w", &t)
        .unwrap_or_else(|e| panic!("{kind}: round trip failed: {e}"));
    assert_eq!(back.to_dense(), d, "{kind}: round trip");
    assert_eq!(back.to_tensors("layer.w"), t, "{kind}: round trip tensors");
}

fn general_formats(w: &[f32], rows: usize, cols: usize) -> Vec<Box<dyn WeightFormat>> {
    vec![
        Box::new(Dense::from_dense(w, rows, cols).unwrap()),
        Box::new(DenseBf16::from_dense(w, rows, cols).unwrap()),
        Box::new(DenseF16::from_dense(w, rows, cols).unwrap()),
        Box::new(DenseI8::from_dense(w, rows, cols).unwrap()),
        Box::new(Bitmask::from_dense(w, rows, cols).unwrap()),
        Box::new(BitmaskI8::from_dense(w, rows, cols).unwrap()),
        Box::new(BitmaskBf16::from_dense(w, rows, cols).unwrap()),
        Box::new(BitmaskOf::<half::f16>::from_dense(w, rows, cols).unwrap()),
        Box::new(Csr::from_dense(w, rows, cols).unwrap()),
        Box::new(CsrBf16::from_dense(w, rows, cols).unwrap()),
        Box::new(CsrOf::<half::f16>::from_dense(w, rows, cols).unwrap()),
        Box::new(CsrI8::from_dense(w, rows, cols).unwrap()),
        Box::new(Bsr::from_dense(w, rows, cols, 4, 16).unwrap()),
        Box::new(Bsr::from_dense(w, rows, cols, 3, 5).unwrap()),
        Box::new(Bsr::from_dense(w, rows, cols, 1, 40).unwrap()),
    ]
}

const SHAPES: &[(usize, usize)] = &[
    (0, 0),
    (0, 7),
    (6, 0),
    (1, 1),
    (1, 16),
    (7, 13),
    (3, 64),
    (33, 100),
    (17, 129),
    (64, 64),
    (300, 577),
    (160, 1024),
];

#[test]
fn general_formats_match_dense() {
    each_kernel_set(|| {
        let mut rng = Rng(1);
        for &(rows, cols) in SHAPES {
            for sp in [0.0f32, 0.5, 0.7, 0.95, 1.0] {
                let mut w = random(&mut rng, rows, cols, sp);
                // Some empty rows.
                for r in (0..rows).step_by(5) {
                    w[r * cols..(r + 1) * cols].fill(0.0);
                }
                for f in general_formats(&w, rows, cols) {
                    check(f.as_ref(), &w, rows, cols, &mut rng);
                }
            }
        }
    });
}

#[test]
fn nm_formats_match_dense() {
    each_kernel_set(|| {
        let mut rng = Rng(2);
        // (n, m): the first four take the permute kernel, the rest the scalar path.
        for (n, m) in [
            (2, 4),
            (4, 8),
            (1, 2),
            (8, 16),
            (1, 4),
            (3, 8),
            (2, 8),
            (3, 4),
        ] {
            for (rows, cols) in [
                (0, 0),
                (1, m),
                (3, 2 * m),
                (5, 3 * m),
                (7, 8 * m),
                (19, 9 * m),
                (33, 40 * m),
                (256, 1024),
            ] {
                if cols % m != 0 {
                    continue;
                }
                let w = nm_matrix(&mut rng, rows, cols, n, m);
                let f = NM::from_dense(&w, rows, cols, n, m).unwrap();
                assert_eq!(f.pattern(), (n, m));
                check(&f, &w, rows, cols, &mut rng);
                check(
                    &NMBf16::from_dense(&w, rows, cols, n, m).unwrap(),
                    &w,
                    rows,
                    cols,
                    &mut rng,
                );
                check(
                    &NMOf::<half::f16>::from_dense(&w, rows, cols, n, m).unwrap(),
                    &w,
                    rows,
                    cols,
                    &mut rng,
                );
                check(
                    &NMI8::from_dense(&w, rows, cols, n, m).unwrap(),
                    &w,
                    rows,
                    cols,
                    &mut rng,
                );
                // The general formats agree on N:M matrices too.
                for g in general_formats(&w, rows, cols) {
                    check(g.as_ref(), &w, rows, cols, &mut rng);
                }
            }
            // All-zero matrix.
            let z = vec![0f32; 4 * 2 * m];
            check(
                &NM::from_dense(&z, 4, 2 * m, n, m).unwrap(),
                &z,
                4,
                2 * m,
                &mut rng,
            );
        }
    });
}

#[test]
fn nm_violation_names_row_and_group() {
    let mut w = vec![0f32; 3 * 8];
    w[8 + 4..8 + 7].copy_from_slice(&[1.0, 2.0, 3.0]); // row 1, group 1 has 3 nonzeros
    let e = NM::from_dense(&w, 3, 8, 2, 4).unwrap_err().to_string();
    assert!(e.contains("row 1") && e.contains("group 1"), "{e}");
    assert!(NM::from_dense(&w, 3, 8, 4, 8).is_ok());
    assert!(
        NM::from_dense(&[0.0; 6], 1, 6, 2, 4).is_err(),
        "cols not a multiple of M"
    );
    assert!(
        NM::from_dense(&[0.0; 8], 1, 8, 4, 4).is_err(),
        "N must be < M"
    );
}

#[test]
fn block_formats_match_dense() {
    each_kernel_set(|| {
        let mut rng = Rng(3);
        for (br, bc) in [(4, 16), (8, 8), (1, 16), (16, 32), (2, 3), (32, 17)] {
            for (rows, cols) in [(4, 16), (13, 50), (64, 128), (100, 257), (512, 512)] {
                for density in [0.0f32, 0.2, 0.6, 1.0] {
                    let w = block_matrix(&mut rng, rows, cols, br, bc, density);
                    let f = Bsr::from_dense(&w, rows, cols, br, bc).unwrap();
                    check(&f, &w, rows, cols, &mut rng);
                }
            }
        }
        assert!(Bsr::from_dense(&[0.0; 4], 2, 2, 33, 1).is_err());
        assert!(Bsr::from_dense(&[0.0; 4], 2, 2, 1, 0).is_err());
    });
}

#[test]
fn csr_rejects_wide_matrices() {
    let cols = 65537;
    let w = vec![0f32; cols];
    assert!(Csr::from_dense(&w, 1, cols).is_err());
    let w = vec![1f32; 65536];
    check(
        &Csr::from_dense(&w, 1, 65536).unwrap(),
        &w,
        1,
        65536,
        &mut Rng(9),
    );
}

#[test]
fn from_dense_rejects_bad_lengths() {
    assert!(Dense::from_dense(&[1.0; 5], 2, 3).is_err());
    assert!(Bitmask::from_dense(&[1.0; 7], 2, 3).is_err());
    assert!(Csr::from_dense(&[1.0; 7], 2, 3).is_err());
}

fn all_serialized(rng: &mut Rng) -> Vec<(String, Vec<RawTensor>)> {
    let (rows, cols) = (9, 70);
    let w = random(rng, rows, cols, 0.5);
    let mut v: Vec<(String, Vec<RawTensor>)> = general_formats(&w, rows, cols)
        .iter()
        .map(|f| (f.kind().to_string(), f.to_tensors("blk.0.w")))
        .collect();
    let nm = nm_matrix(rng, rows, 64, 2, 4);
    v.push((
        "nm".into(),
        NM::from_dense(&nm, rows, 64, 2, 4)
            .unwrap()
            .to_tensors("blk.0.w"),
    ));
    let nm = nm_matrix(rng, rows, 64, 4, 8);
    v.push((
        "nm".into(),
        NM::from_dense(&nm, rows, 64, 4, 8)
            .unwrap()
            .to_tensors("blk.0.w"),
    ));
    v
}

#[test]
fn corrupt_inputs_are_rejected_by_name() {
    let mut rng = Rng(4);
    let fmts = all_serialized(&mut rng);
    let nm = fmts.iter().find(|(k, _)| k == "nm").unwrap().1.clone();
    // Bitmask popcount != value count.
    let (_, bm) = fmts.iter().find(|(k, _)| k == "bitmask").unwrap();
    let mut t = bm.clone();
    let vals = t.iter_mut().find(|t| t.name == "blk.0.w.values").unwrap();
    vals.data.truncate(vals.data.len() - 4);
    vals.shape = vec![vals.data.len() / 4];
    let e = Bitmask::from_tensors("blk.0.w", &t)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.w.values") && e.contains("popcount"),
        "{e}"
    );
    // Bits past the last column.
    let mut t = bm.clone();
    let mk = t.iter_mut().find(|t| t.name == "blk.0.w.bitmask").unwrap();
    mk.data[15] |= 0x80; // row 0, word 1, bit 63 → column 127 ≥ 70
    let e = Bitmask::from_tensors("blk.0.w", &t)
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.w.bitmask"), "{e}");
    // CSR: index ≥ cols and non-increasing.
    let (_, csr) = fmts.iter().find(|(k, _)| k == "csr").unwrap();
    let mut t = csr.clone();
    let ci = t.iter_mut().find(|t| t.name == "blk.0.w.col_idx").unwrap();
    ci.data[0] = 200;
    let e = Csr::from_tensors("blk.0.w", &t).unwrap_err().to_string();
    assert!(e.contains("blk.0.w.col_idx"), "{e}");
    let mut t = csr.clone();
    let ci = t.iter_mut().find(|t| t.name == "blk.0.w.col_idx").unwrap();
    ci.data.swap(0, 2);
    ci.data.swap(1, 3);
    assert!(Csr::from_tensors("blk.0.w", &t)
        .unwrap_err()
        .to_string()
        .contains("increasing"));
    // N:M: in-group indices out of order.
    let mut t = nm.clone();
    let ix = t.iter_mut().find(|t| t.name == "blk.0.w.indices").unwrap();
    ix.data[0] = 0b0000_0111; // group 0: indices 3, 1
    let e = NM::from_tensors("blk.0.w", &t).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.w.indices") && e.contains("group 0"),
        "{e}"
    );
    // Missing tensor, wrong dtype.
    let e = NM::from_tensors("blk.0.w", &nm[1..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("blk.0.w.shape") && e.contains("missing"), "{e}");
    let mut t = nm.clone();
    t[1].dtype = Dtype::U8;
    assert!(NM::from_tensors("blk.0.w", &t)
        .unwrap_err()
        .to_string()
        .contains("dtype"));
}

#[test]
fn fuzzed_tensors_never_panic() {
    let mut rng = Rng(5);
    let fmts = all_serialized(&mut rng);
    let mut accepted = 0;
    for round in 0..6000 {
        let (kind, orig) = &fmts[round % fmts.len()];
        let mut t = orig.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(t.len());
            let tt = &mut t[i];
            match rng.below(8) {
                0..=2 if !tt.data.is_empty() => {
                    let b = rng.below(tt.data.len());
                    tt.data[b] ^= 1 << rng.below(8);
                }
                3 if !tt.data.is_empty() => {
                    let b = rng.below(tt.data.len());
                    tt.data[b] = rng.next() as u8;
                }
                4 => {
                    let n = rng.below(tt.data.len() + 1);
                    tt.data.truncate(n);
                    if rng.below(2) == 0 {
                        let es = tt.dtype.size();
                        tt.shape = vec![tt.data.len() / es];
                    }
                }
                5 => {
                    tt.data
                        .extend((0..1 + rng.below(16)).map(|_| rng.next() as u8));
                    if rng.below(2) == 0 {
                        tt.shape = vec![tt.data.len() / tt.dtype.size()];
                    }
                }
                6 if !tt.shape.is_empty() => {
                    let d = rng.below(tt.shape.len());
                    tt.shape[d] = rng.below(1 << 20);
                }
                _ => {
                    t.remove(i);
                    if t.is_empty() {
                        break;
                    }
                }
            }
        }
        match from_tensors(kind, "blk.0.w", &t) {
            // Sparse formats can validly describe a huge mostly-empty matrix (e.g. a flipped
            // `cols` in BSR); don't materialise those here.
            Ok(f) if f.rows().saturating_mul(f.cols()) > 1 << 22 => {}
            Ok(f) => {
                accepted += 1;
                let x: Vec<f32> = (0..3 * f.cols()).map(|_| rng.normal()).collect();
                let mut y = vec![0f32; 3 * f.rows()];
                f.matmul(&x, 3, &mut y);
                f.matmul_naive(&x, 3, &mut y);
                let _ = f.to_dense();
            }
            Err(e) => {
                let s = e.to_string();
                assert!(
                    s.contains("blk.0.w."),
                    "error does not name the tensor: {s}"
                );
            }
        }
    }
    assert!(accepted > 0);
}

/// The int8 argmax screen picks exactly the full product's argmax (lowest index on ties) for
/// every dense exact format and kernel set, including near-duplicate rows whose order int8
/// rounding scrambles, exact duplicates, and x = 0 (every row a candidate); its top-k gives the
/// full product's k largest values, bit for bit; it falls back on non-finite x; and on random
/// rows it computes only a few rows exactly.
#[test]
fn argmax_screen_matches_the_full_argmax() {
    use lopper::formats::screen::{argmax_naive, ArgmaxScreen, Exact};
    each_kernel_set(|| {
        let mut rng = Rng(7);
        for (rows, cols) in [(1, 1), (40, 7), (300, 64), (257, 133), (2000, 96)] {
            let mut w = random(&mut rng, rows, cols, 0.1);
            // Rows 1.. of the first block: row 0 plus noise far below int8's step, and exact
            // copies of row 0 further on (ties go to the lowest index).
            let near = rows.min(32);
            for r in 1..near {
                for j in 0..cols {
                    w[r * cols + j] = w[j] * (1.0 + 1e-4 * rng.normal());
                }
            }
            for r in (near..rows).step_by(37) {
                w.copy_within(0..cols, r * cols);
            }
            let formats: Vec<Box<dyn WeightFormat>> = vec![
                Box::new(Dense::from_dense(&w, rows, cols).unwrap()),
                Box::new(DenseBf16::from_dense(&w, rows, cols).unwrap()),
                Box::new(DenseF16::from_dense(&w, rows, cols).unwrap()),
            ];
            let exacts = std::iter::once(Exact::F32 { w: &w, rows, cols })
                .chain(formats.iter().map(|f| Exact::Format(f.as_ref())));
            for exact in exacts {
                let s = ArgmaxScreen::build(exact, "w").unwrap();
                let mut xs: Vec<Vec<f32>> = (0..20)
                    .map(|_| (0..cols).map(|_| rng.normal()).collect())
                    .collect();
                xs.push(w[..cols].to_vec()); // aligned with the near-duplicate rows
                xs.push(vec![0.0; cols]);
                for x in &xs {
                    let want = argmax_naive(exact, x);
                    assert_eq!(s.argmax(exact, x), Some(want), "{rows}×{cols} {x:?}");
                }
                let (calls, cands) = s.counts();
                assert_eq!(calls as usize, xs.len());
                // Top-k: the k largest entries (value, then index) are the full product's, bits
                // included, and every computed entry has the full product's bits.
                let mut full = vec![0f32; rows];
                let mut y = vec![0f32; rows];
                let top = |v: &[f32], k: usize| {
                    let mut i: Vec<usize> = (0..v.len()).collect();
                    i.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
                    i.truncate(k);
                    i.iter().map(|&r| (r, v[r].to_bits())).collect::<Vec<_>>()
                };
                for k in [1, 3, 50, rows + 1] {
                    for x in &xs[..4] {
                        exact.matvec(x, &mut full);
                        assert!(s.top_k(exact, x, k, &mut y));
                        assert_eq!(top(&y, k), top(&full, k), "{rows}×{cols} top {k}");
                        for (a, b) in y.iter().zip(&full) {
                            assert!(*a == f32::NEG_INFINITY || a.to_bits() == b.to_bits());
                        }
                    }
                }
                if rows >= 300 {
                    // Random x (not the zero one): far fewer exact rows than the matrix has.
                    assert!(
                        (cands as usize) < rows * xs.len() / 4 + rows,
                        "{rows}×{cols}: {cands} candidate rows in {calls} products"
                    );
                }
                let mut bad = xs[0].clone();
                bad[0] = f32::NAN;
                assert_eq!(s.argmax(exact, &bad), None);
            }
        }
    });
    // Formats that cannot compute single rows get no screen.
    let w = vec![1.0f32; 8 * 16];
    let b = Bitmask::from_dense(&w, 8, 16).unwrap();
    assert!(ArgmaxScreen::build(Exact::Format(&b), "b").is_err());
}

/// Worst-case int8 rounding: every entry of row 1 sits just above an integer (int8 rounds it
/// down, the screen underestimates the row by almost its whole bound) and every entry of row 0
/// just below one (overestimated by almost its bound). Row 1's exact value is larger by 0.87, its
/// int8 value smaller by 62 ≈ the two bounds together, so a screen that spends only one row's
/// bound loses the true argmax (and the top 2 when a clear winner, row 2, comes first).
#[test]
fn argmax_screen_survives_worst_case_rounding() {
    use lopper::formats::screen::{argmax_naive, ArgmaxScreen, Exact};
    let cols = 64;
    let mut w = vec![0f32; 3 * cols];
    // Entry 0 = 127 fixes every row's int8 scale at exactly 1.
    for r in 0..3 {
        w[r * cols] = 127.0;
    }
    for j in 1..cols {
        w[j] = if j == 1 { 9.501 } else { 10.501 }; // rounds up: −0.499 each
        w[cols + j] = 10.499; // rounds down: +0.499 each
        w[2 * cols + j] = 20.0;
    }
    let x = vec![1f32; cols];
    let _mode = kernel_mode();
    for (rows, k) in [(2, 1), (3, 2)] {
        let wr = &w[..rows * cols];
        let d = Dense::from_dense(wr, rows, cols).unwrap();
        for exact in [Exact::F32 { w: wr, rows, cols }, Exact::Format(&d)] {
            let s = ArgmaxScreen::build(exact, "w").unwrap();
            let mut full = vec![0f32; rows];
            exact.matvec(&x, &mut full);
            assert!(full[1] > full[0], "the construction: {full:?}");
            if k == 1 {
                assert_eq!(argmax_naive(exact, &x), 1);
                assert_eq!(s.argmax(exact, &x), Some(1));
            } else {
                let mut y = vec![0f32; rows];
                assert!(s.top_k(exact, &x, k, &mut y));
                assert_eq!(
                    y[1].to_bits(),
                    full[1].to_bits(),
                    "row 1 left out of the top {k}"
                );
                assert_eq!(y[2].to_bits(), full[2].to_bits());
            }
        }
    }
}

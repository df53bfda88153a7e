//! Block-sparse rows: the matrix is cut into R×C tiles (edge tiles are zero-padded) and only
//! tiles with a nonzero are stored, row of tiles by row of tiles, with their block-column index.

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::elem::Values;
use super::sparse::{self, Entries};
use super::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Largest tile height the kernels accept.
pub const MAX_BLOCK_ROWS: usize = 32;
/// Largest tile width accepted.
pub const MAX_BLOCK_COLS: usize = 4096;

/// Block-sparse-row matrix with R×C tiles.
#[derive(Clone, Debug, PartialEq)]
pub struct Bsr {
    rows: usize,
    cols: usize,
    br: usize,
    bc: usize,
    /// `rows.div_ceil(br) + 1` offsets into `bcol`.
    brp: Vec<usize>,
    bcol: Vec<u32>,
    /// `bcol.len() · br · bc` values, each tile row-major (f32, no scales).
    vals: Values<f32>,
}

impl Bsr {
    const KIND: &'static str = "bsr";
    /// Keeps every `br × bc` tile of `w` that has a nonzero (`1 ≤ br ≤ 32`, `1 ≤ bc ≤ 4096`).
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, br: usize, bc: usize) -> Result<Self> {
        check_dense("bsr", w, rows, cols)?;
        if !(1..=MAX_BLOCK_ROWS).contains(&br) || !(1..=MAX_BLOCK_COLS).contains(&bc) {
            return Err(Error::Invalid(format!(
                "bsr: tile {br}×{bc} outside 1..={MAX_BLOCK_ROWS} × 1..={MAX_BLOCK_COLS}"
            )));
        }
        let (nbr, nbc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut brp = vec![0];
        let (mut bcol, mut values) = (Vec::new(), Vec::new());
        for b in 0..nbr {
            for c in 0..nbc {
                let (r0, c0) = (b * br, c * bc);
                let (rn, cn) = (br.min(rows - r0), bc.min(cols - c0));
                let nz = (0..rn).any(|i| {
                    w[(r0 + i) * cols + c0..(r0 + i) * cols + c0 + cn]
                        .iter()
                        .any(|&v| v != 0.0)
                });
                if nz {
                    bcol.push(c as u32);
                    for i in 0..br {
                        for j in 0..bc {
                            values.push(if i < rn && j < cn {
                                w[(r0 + i) * cols + c0 + j]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
            brp.push(bcol.len());
        }
        Ok(Bsr {
            rows,
            cols,
            br,
            bc,
            brp,
            bcol,
            vals: Values {
                v: values,
                scales: Vec::new(),
            },
        })
    }
    /// Number of stored tiles.
    pub fn blocks(&self) -> usize {
        self.bcol.len()
    }
    /// Tile shape (R, C).
    pub fn block_shape(&self) -> (usize, usize) {
        (self.br, self.bc)
    }
    pub fn from_tensors(name: &str, tensors: &[RawTensor]) -> Result<Self> {
        const K: &str = "bsr";
        let s = read_shape(tensors, name, 4, K)?;
        let (rows, cols, br, bc) = (s[0], s[1], s[2], s[3]);
        if !(1..=MAX_BLOCK_ROWS).contains(&br) || !(1..=MAX_BLOCK_COLS).contains(&bc) {
            return Err(ferr(
                format!("{name}.shape"),
                K,
                format!("tile {br}×{bc} out of range"),
            ));
        }
        let (nbr, nbc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let pt = find(tensors, name, "block_row_ptr", Dtype::U64, K)?;
        expect_len(pt, Some(nbr + 1), K)?;
        let ct = find(tensors, name, "block_col", Dtype::U32, K)?;
        let nblocks = ct.data.len() / 4;
        let vt = find(tensors, name, "values", Dtype::F32, K)?;
        expect_len(vt, nblocks.checked_mul(br * bc), K)?;
        let p64 = read_u64(pt);
        if p64[0] != 0 || p64[nbr] != nblocks as u64 {
            return Err(ferr(
                pt.name.clone(),
                K,
                format!("must start at 0 and end at {nblocks} blocks"),
            ));
        }
        if let Some(b) = p64.windows(2).position(|w| w[1] < w[0]) {
            return Err(ferr(
                pt.name.clone(),
                K,
                format!("decreases at block row {b}"),
            ));
        }
        let brp: Vec<usize> = p64.into_iter().map(|p| p as usize).collect();
        let bcol = read_u32(ct);
        for b in 0..nbr {
            let c = &bcol[brp[b]..brp[b + 1]];
            if c.iter().any(|&k| k as usize >= nbc) || c.windows(2).any(|w| w[1] <= w[0]) {
                return Err(ferr(
                    ct.name.clone(),
                    K,
                    format!("block row {b}: block columns must be increasing and < {nbc}"),
                ));
            }
        }
        Ok(Bsr {
            rows,
            cols,
            br,
            bc,
            brp,
            bcol,
            vals: Values {
                v: read_f32(vt),
                scales: Vec::new(),
            },
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma,popcnt,bmi1,bmi2")]
    unsafe fn block_avx512(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (br, bc) = (self.br, self.bc);
        let tile = br * bc;
        for b in r0 / br..r1.div_ceil(br) {
            let rn = br.min(self.rows - b * br);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut acc = [_mm512_setzero_ps(); MAX_BLOCK_ROWS];
                for t in self.brp[b]..self.brp[b + 1] {
                    let c0 = self.bcol[t] as usize * bc;
                    let valid = bc.min(self.cols - c0);
                    let vp = self.vals.v.as_ptr().add(t * tile);
                    let mut q = 0;
                    while q < valid {
                        let mk: __mmask16 = if valid - q >= 16 {
                            0xffff
                        } else {
                            (1u16 << (valid - q)) - 1
                        };
                        let xv = _mm512_maskz_loadu_ps(mk, xp.add(c0 + q));
                        for (rr, a) in acc.iter_mut().enumerate().take(rn) {
                            *a = _mm512_fmadd_ps(
                                _mm512_maskz_loadu_ps(mk, vp.add(rr * bc + q)),
                                xv,
                                *a,
                            );
                        }
                        q += 16;
                    }
                }
                for (rr, a) in acc.iter().enumerate().take(rn) {
                    out.put(i, b * br + rr, _mm512_reduce_add_ps(*a));
                }
            }
        }
    }
}

impl Bsr {
    /// [`Bsr::block_avx512`] with 8 lanes: whole 8-column steps along each tile row, then one
    /// masked step for the rest of the tile width.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(&self, r0: usize, r1: usize, x: &[f32], m: usize, out: Out) {
        let (br, bc) = (self.br, self.bc);
        let tile = br * bc;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for b in r0 / br..r1.div_ceil(br) {
            let rn = br.min(self.rows - b * br);
            for i in 0..m {
                let xp = x.as_ptr().add(i * self.cols);
                let mut acc = [_mm256_setzero_ps(); MAX_BLOCK_ROWS];
                for t in self.brp[b]..self.brp[b + 1] {
                    let c0 = self.bcol[t] as usize * bc;
                    let valid = bc.min(self.cols - c0);
                    let vp = self.vals.v.as_ptr().add(t * tile);
                    let mut q = 0;
                    while q + 8 <= valid {
                        let xv = _mm256_loadu_ps(xp.add(c0 + q));
                        for (rr, a) in acc.iter_mut().enumerate().take(rn) {
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(vp.add(rr * bc + q)), xv, *a);
                        }
                        q += 8;
                    }
                    if q < valid {
                        let mk = _mm256_cmpgt_epi32(_mm256_set1_epi32((valid - q) as i32), lanes);
                        let xv = _mm256_maskload_ps(xp.add(c0 + q), mk);
                        for (rr, a) in acc.iter_mut().enumerate().take(rn) {
                            let w = _mm256_maskload_ps(vp.add(rr * bc + q), mk);
                            *a = _mm256_fmadd_ps(w, xv, *a);
                        }
                    }
                }
                for (rr, a) in acc.iter().enumerate().take(rn) {
                    out.put(i, b * br + rr, avx2::hsum(*a));
                }
            }
        }
    }
}

impl Entries for Bsr {
    type E = f32;
    fn vals(&self) -> &Values<f32> {
        &self.vals
    }
    fn each(&self, r: usize, mut f: impl FnMut(usize, usize)) {
        let (b, rr) = (r / self.br, r % self.br);
        let (br, bc) = (self.br, self.bc);
        for t in self.brp[b]..self.brp[b + 1] {
            let c0 = self.bcol[t] as usize * bc;
            let j0 = t * br * bc + rr * bc;
            for jj in 0..bc.min(self.cols - c0) {
                f(c0 + jj, j0 + jj);
            }
        }
    }
}

impl WeightFormat for Bsr {
    dims!();
    fn nbytes(&self) -> usize {
        self.vals.nbytes() + self.bcol.len() * 4 + self.brp.len() * 8
    }
    fn stored(&self) -> usize {
        self.vals.v.len()
    }
    fn decode_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        sparse::decode_rows(self, r0, r1, out, None::<fn(&mut [f32])>)
    }
    fn matmul_add(&self, x: &[f32], m: usize, y: &mut [f32], acc: bool) {
        // SAFETY (kernel): the ISA checked; block columns validated; disjoint rows (ranges
        // aligned to the tile height).
        #[cfg(target_arch = "x86_64")]
        let fast = unsafe {
            sparse::x86_kernel(self, x86_simd(), x, m, Self::block_avx2, Self::block_avx512)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let fast: Option<fn(usize, usize, Out)> = None;
        sparse::product(self, x, m, y, acc, self.br, fast)
    }
    fn matmul_naive(&self, x: &[f32], m: usize, y: &mut [f32]) {
        sparse::naive(self, x, m, y)
    }
    fn to_tensors(&self, name: &str) -> Vec<RawTensor> {
        let ptr: Vec<u64> = self.brp.iter().map(|&p| p as u64).collect();
        let mut bcol = RawTensor::bytes(
            format!("{name}.block_col"),
            Dtype::U32,
            self.bcol.iter().flat_map(|c| c.to_le_bytes()).collect(),
        );
        bcol.shape = vec![self.bcol.len()];
        vec![
            shape_tensor(name, &[self.rows, self.cols, self.br, self.bc]),
            RawTensor::u64(format!("{name}.block_row_ptr"), &ptr),
            bcol,
            RawTensor::f32(format!("{name}.values"), &self.vals.v),
        ]
    }
}

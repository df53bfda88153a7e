//! The one table of weight formats: every kind's name, storage layout, value type and loader.
//!
//! [`FORMATS`] is the list. What other code needs about formats derives from it: the kinds a
//! packed directory may name ([`kinds`], checked by the loader), rebuilding a format from its
//! arrays ([`super::from_tensors`]), and the runtime's `--format` choices
//! ([`crate::runtime::choice::FormatChoice`], whose layout and value type are looked up here).
//! A new format is one row here plus its type; `tests` below check that every row's loader
//! gives a format reporting that row's kind.

use super::{
    Bitmask, BitmaskI8, BitmaskOf, Bsr, Csr, CsrOf, Dense, DenseBf16, DenseF16, DenseI8, NMOf,
    RawTensor, WeightFormat, NM,
};
use crate::Result;
use half::{bf16, f16};
use serde::Serialize;

/// How a format stores a matrix, whatever its value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Dense,
    Bitmask,
    Csr,
    Nm,
    Bsr,
}

/// Stored value type of a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    F32,
    F16,
    Bf16,
    I8,
}

/// Rebuilds a format from its [`WeightFormat::to_tensors`] arrays (`name` is the tensor's).
pub type Loader = fn(&str, &[RawTensor]) -> Result<Box<dyn WeightFormat>>;

/// One weight format.
#[derive(Clone, Copy)]
pub struct FormatSpec {
    /// [`WeightFormat::kind`]: `<layout>` for f32 values (dense: `dense-f32`), else
    /// `<layout>-<values>`.
    pub kind: &'static str,
    pub layout: Layout,
    pub values: ValueType,
    pub load: Loader,
}

impl std::fmt::Debug for FormatSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?}, {:?})", self.kind, self.layout, self.values)
    }
}

/// A table row whose loader is `$ty::from_tensors`.
macro_rules! spec {
    ($kind:literal, $layout:ident, $values:ident, $ty:ty) => {
        FormatSpec {
            kind: $kind,
            layout: Layout::$layout,
            values: ValueType::$values,
            load: |name, tensors| Ok(Box::new(<$ty>::from_tensors(name, tensors)?)),
        }
    };
}

/// Every weight format.
pub const FORMATS: [FormatSpec; 17] = [
    spec!("dense-f32", Dense, F32, Dense),
    spec!("dense-f16", Dense, F16, DenseF16),
    spec!("dense-bf16", Dense, Bf16, DenseBf16),
    spec!("dense-i8", Dense, I8, DenseI8),
    spec!("bitmask", Bitmask, F32, Bitmask),
    spec!("bitmask-f16", Bitmask, F16, BitmaskOf<f16>),
    spec!("bitmask-bf16", Bitmask, Bf16, BitmaskOf<bf16>),
    spec!("bitmask-i8", Bitmask, I8, BitmaskI8),
    spec!("csr", Csr, F32, Csr),
    spec!("csr-f16", Csr, F16, CsrOf<f16>),
    spec!("csr-bf16", Csr, Bf16, CsrOf<bf16>),
    spec!("csr-i8", Csr, I8, CsrOf<i8>),
    spec!("nm", Nm, F32, NM),
    spec!("nm-f16", Nm, F16, NMOf<f16>),
    spec!("nm-bf16", Nm, Bf16, NMOf<bf16>),
    spec!("nm-i8", Nm, I8, NMOf<i8>),
    spec!("bsr", Bsr, F32, Bsr),
];

/// The format named `kind`.
pub fn by_kind(kind: &str) -> Option<&'static FormatSpec> {
    FORMATS.iter().find(|f| f.kind == kind)
}

/// The format with this layout and value type, if there is one (BSR is f32 only).
pub fn by_layout(layout: Layout, values: ValueType) -> Option<&'static FormatSpec> {
    FORMATS
        .iter()
        .find(|f| f.layout == layout && f.values == values)
}

/// Every kind, in table order.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    FORMATS.iter().map(|f| f.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_loads_its_own_kind() {
        // A 4×8 matrix that is 2:4 sparse and fits every format (BSR with its default tile).
        let (rows, cols) = (4, 8);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 4 < 2 {
                    0.0
                } else {
                    0.25 * (i as f32 - 9.0)
                }
            })
            .collect();
        let built: Vec<Box<dyn WeightFormat>> = vec![
            Box::new(Dense::from_dense(&w, rows, cols).unwrap()),
            Box::new(DenseF16::from_dense(&w, rows, cols).unwrap()),
            Box::new(DenseBf16::from_dense(&w, rows, cols).unwrap()),
            Box::new(DenseI8::from_dense(&w, rows, cols).unwrap()),
            Box::new(Bitmask::from_dense(&w, rows, cols).unwrap()),
            Box::new(BitmaskOf::<f16>::from_dense(&w, rows, cols).unwrap()),
            Box::new(BitmaskOf::<bf16>::from_dense(&w, rows, cols).unwrap()),
            Box::new(BitmaskI8::from_dense(&w, rows, cols).unwrap()),
            Box::new(Csr::from_dense(&w, rows, cols).unwrap()),
            Box::new(CsrOf::<f16>::from_dense(&w, rows, cols).unwrap()),
            Box::new(CsrOf::<bf16>::from_dense(&w, rows, cols).unwrap()),
            Box::new(CsrOf::<i8>::from_dense(&w, rows, cols).unwrap()),
            Box::new(NM::from_dense(&w, rows, cols, 2, 4).unwrap()),
            Box::new(NMOf::<f16>::from_dense(&w, rows, cols, 2, 4).unwrap()),
            Box::new(NMOf::<bf16>::from_dense(&w, rows, cols, 2, 4).unwrap()),
            Box::new(NMOf::<i8>::from_dense(&w, rows, cols, 2, 4).unwrap()),
            Box::new(Bsr::from_dense(&w, rows, cols, 2, 2).unwrap()),
        ];
        assert_eq!(built.len(), FORMATS.len());
        for (f, spec) in built.iter().zip(FORMATS.iter()) {
            assert_eq!(f.kind(), spec.kind, "table order");
            let back = (spec.load)("t", &f.to_tensors("t")).unwrap();
            assert_eq!(back.kind(), spec.kind);
            assert_eq!(back.to_dense(), f.to_dense(), "{}", spec.kind);
            assert_eq!(
                by_layout(spec.layout, spec.values).map(|s| s.kind),
                Some(spec.kind)
            );
            assert_eq!(by_kind(spec.kind).map(|s| s.kind), Some(spec.kind));
        }
        assert_eq!(kinds().count(), FORMATS.len());
        assert!(by_kind("dense").is_none());
        assert!(by_layout(Layout::Bsr, ValueType::I8).is_none());
    }
}

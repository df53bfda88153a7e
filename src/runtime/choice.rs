//! The format choices of the runtime: what `--format` names ([`FormatChoice`]), parsed and
//! displayed by one table ([`FormatChoice::ALL`]). Each fixed choice is a format of the format
//! registry ([`crate::formats::registry`]), which gives its kind, [`Layout`] and
//! [`ValueType`]; the `auto` choices are resolved per tensor. [`super::pack`] packs with these
//! choices and [`super::autopick`] chooses among them; this module depends on neither.

use crate::formats::registry::{self, FormatSpec};
use crate::{Error, Result};
use serde::Serialize;

pub use crate::formats::registry::ValueType;

/// `--format` names of the dense formats, which differ from their kinds (`dense` is
/// `dense-f32`); every other fixed choice's name is its kind.
const DENSE_NAMES: [(&str, &str); 4] = [
    ("dense", "dense-f32"),
    ("bf16", "dense-bf16"),
    ("f16", "dense-f16"),
    ("int8", "dense-i8"),
];

/// Which format to pack weights into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatChoice {
    /// Per tensor, the fastest estimated lossless (f32-valued) format.
    Auto,
    /// Per tensor, the fastest estimated bf16-valued format.
    AutoBf16,
    /// Per tensor, the fastest estimated IEEE-f16-valued format.
    AutoF16,
    /// Dense f32 (no packed copy: the model's own weights).
    Dense,
    Bf16,
    /// Dense IEEE f16 (values beyond ±65504 are refused).
    F16,
    Int8,
    Bitmask,
    BitmaskBf16,
    BitmaskF16,
    BitmaskI8,
    Csr,
    CsrBf16,
    CsrF16,
    CsrI8,
    /// N:M (the tensor's own pattern among 1:2, 2:4, 4:8, 8:16).
    Nm,
    NmBf16,
    NmF16,
    NmI8,
    /// Block-sparse rows with the tile shape (among 8×8, 4×16, 4×4, 1×16, 2×2, 1×4) that stores
    /// the fewest values.
    Bsr,
}

/// How a format choice stores a matrix, whatever its value type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Resolved per tensor by [`super::autopick::pick`].
    Auto,
    Dense,
    Bitmask,
    Csr,
    Nm,
    Bsr,
}

impl From<registry::Layout> for Layout {
    fn from(l: registry::Layout) -> Layout {
        match l {
            registry::Layout::Dense => Layout::Dense,
            registry::Layout::Bitmask => Layout::Bitmask,
            registry::Layout::Csr => Layout::Csr,
            registry::Layout::Nm => Layout::Nm,
            registry::Layout::Bsr => Layout::Bsr,
        }
    }
}

impl FormatChoice {
    /// Every choice with its CLI name.
    pub const ALL: [(FormatChoice, &'static str); 20] = [
        (FormatChoice::Auto, "auto"),
        (FormatChoice::AutoBf16, "auto-bf16"),
        (FormatChoice::AutoF16, "auto-f16"),
        (FormatChoice::Dense, "dense"),
        (FormatChoice::Bf16, "bf16"),
        (FormatChoice::F16, "f16"),
        (FormatChoice::Int8, "int8"),
        (FormatChoice::Bitmask, "bitmask"),
        (FormatChoice::BitmaskBf16, "bitmask-bf16"),
        (FormatChoice::BitmaskF16, "bitmask-f16"),
        (FormatChoice::BitmaskI8, "bitmask-i8"),
        (FormatChoice::Csr, "csr"),
        (FormatChoice::CsrBf16, "csr-bf16"),
        (FormatChoice::CsrF16, "csr-f16"),
        (FormatChoice::CsrI8, "csr-i8"),
        (FormatChoice::Nm, "nm"),
        (FormatChoice::NmBf16, "nm-bf16"),
        (FormatChoice::NmF16, "nm-f16"),
        (FormatChoice::NmI8, "nm-i8"),
        (FormatChoice::Bsr, "bsr"),
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("?", |(_, n)| n)
    }

    /// The registry format this choice packs into (`None` for the auto choices).
    pub fn spec(self) -> Option<&'static FormatSpec> {
        if self.is_auto() {
            return None;
        }
        let name = self.name();
        let kind = DENSE_NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, k)| k);
        registry::by_kind(kind)
    }

    /// Value type of the stored weights.
    pub fn value_type(self) -> ValueType {
        match self {
            FormatChoice::AutoBf16 => ValueType::Bf16,
            FormatChoice::AutoF16 => ValueType::F16,
            c => c.spec().map_or(ValueType::F32, |s| s.values),
        }
    }

    /// How the weights are stored.
    pub fn layout(self) -> Layout {
        self.spec().map_or(Layout::Auto, |s| s.layout.into())
    }

    /// The choice with this layout and value type, if there is one (BSR is f32 only).
    pub fn of(layout: Layout, vt: ValueType) -> Option<FormatChoice> {
        Self::ALL
            .iter()
            .map(|&(c, _)| c)
            .find(|c| c.layout() == layout && c.value_type() == vt)
    }

    /// True for `auto`, `auto-bf16` and `auto-f16` (resolved per tensor by [`super::autopick::pick`]).
    pub fn is_auto(self) -> bool {
        matches!(
            self,
            FormatChoice::Auto | FormatChoice::AutoBf16 | FormatChoice::AutoF16
        )
    }

    /// The dense choice of the same value type (what the LM head gets by default).
    pub fn dense_of_same_values(self) -> FormatChoice {
        Self::of(Layout::Dense, self.value_type()).unwrap_or(FormatChoice::Dense)
    }
}

impl std::str::FromStr for FormatChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<FormatChoice> {
        let s = s.trim().to_ascii_lowercase();
        let alias = match s.as_str() {
            "f32" => "dense",
            "i8" => "int8",
            kind => DENSE_NAMES
                .iter()
                .find(|(_, k)| *k == kind)
                .map_or(kind, |(n, _)| n),
        };
        Self::ALL
            .iter()
            .find(|(_, n)| *n == alias)
            .map(|(c, _)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                Error::Invalid(format!(
                    "unknown format `{s}` (use one of: {})",
                    names.join(", ")
                ))
            })
    }
}

impl std::fmt::Display for FormatChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_choices_are_registry_formats() {
        for (c, name) in FormatChoice::ALL {
            assert_eq!(name.parse::<FormatChoice>().unwrap(), c);
            match c.spec() {
                None => assert!(c.is_auto(), "{name} has no registry format"),
                Some(s) => {
                    assert_eq!(s.kind.parse::<FormatChoice>().unwrap(), c, "kind parses");
                    assert_eq!(FormatChoice::of(c.layout(), c.value_type()), Some(c));
                }
            }
        }
        // Every registry format is a choice.
        for s in &registry::FORMATS {
            let c: FormatChoice = s.kind.parse().unwrap();
            assert_eq!(c.spec().map(|x| x.kind), Some(s.kind));
        }
        assert_eq!(FormatChoice::AutoBf16.value_type(), ValueType::Bf16);
        assert_eq!(FormatChoice::Auto.layout(), Layout::Auto);
    }
}

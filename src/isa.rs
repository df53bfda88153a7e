//! The CPU's instruction-set extensions, detected once: the one registry every SIMD dispatch
//! in the crate asks.
//!
//! [`features`] reads the CPU once into plain [`Features`]; the predicates below name the
//! combinations the kernels are compiled for, so a dispatch says what it needs rather than
//! repeating a list of `is_x86_feature_detected!` calls:
//!
//! - [`avx512_fvl`]: AVX-512 F + VL with FMA, what the element-wise kernels (`kernels`) and the
//!   dense / CSR / N:M decoders are compiled for;
//! - [`avx512_bw`]: that plus BW (byte / word lanes: the bitmask and int8 format kernels);
//! - [`avx512_vbmi2`]: that plus VBMI2 (`vpexpand`, the bitmask expand);
//! - [`avx2_fma_f16c`]: AVX2 with FMA and F16C (every AVX2 CPU has F16C; the f16 formats'
//!   AVX2 kernels convert with it);
//! - [`bit_manipulation`]: POPCNT, BMI1 and BMI2 (the sparse formats' index arithmetic);
//! - [`avx512_bf16`], [`amx_bf16`], [`neon`]: reported (e.g. by `lopper bench`) for the kernels
//!   that may use them.
//!
//! Which kernel set the *formats* run now, capped for benchmarks, is
//! [`crate::formats::isa`]; it is built from these predicates.

use std::sync::OnceLock;

/// The instruction-set extensions of this CPU (all false on other architectures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512vbmi2: bool,
    pub avx512bf16: bool,
    /// AMX tiles with bf16 products, as CPUID reports them (using them on Linux also needs the
    /// OS's permission, which nothing here asks for).
    pub amx_bf16: bool,
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub popcnt: bool,
    pub bmi1: bool,
    pub bmi2: bool,
    pub neon: bool,
}

impl Features {
    /// The features the running CPU has.
    pub fn detect() -> Features {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            Features {
                avx512f: has!("avx512f"),
                avx512bw: has!("avx512bw"),
                avx512vl: has!("avx512vl"),
                avx512vbmi2: has!("avx512vbmi2"),
                avx512bf16: has!("avx512bf16"),
                amx_bf16: amx_bf16_cpuid(),
                avx2: has!("avx2"),
                fma: has!("fma"),
                f16c: has!("f16c"),
                popcnt: has!("popcnt"),
                bmi1: has!("bmi1"),
                bmi2: has!("bmi2"),
                neon: false,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            Features {
                neon: std::arch::is_aarch64_feature_detected!("neon"),
                ..Features::default()
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            Features::default()
        }
    }

    /// The names of the features present, e.g. `["avx2", "fma", ...]` (for reports).
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.avx512f, "avx512f"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vl, "avx512vl"),
            (self.avx512vbmi2, "avx512vbmi2"),
            (self.avx512bf16, "avx512bf16"),
            (self.amx_bf16, "amx-bf16"),
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.popcnt, "popcnt"),
            (self.bmi1, "bmi1"),
            (self.bmi2, "bmi2"),
            (self.neon, "neon"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
    }
}

/// AMX-TILE and AMX-BF16 from CPUID leaf 7 (their run-time detection macro is not stable).
#[cfg(target_arch = "x86_64")]
fn amx_bf16_cpuid() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when the CPU reports it.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 24) != 0 && edx & (1 << 22) != 0
    }
}

/// The CPU's model name (Linux /proc/cpuinfo), for the figures' provenance.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// This CPU's features, detected on first use.
#[inline]
pub fn features() -> &'static Features {
    static F: OnceLock<Features> = OnceLock::new();
    F.get_or_init(Features::detect)
}

/// AVX-512 F and VL with FMA: the AVX-512 subset the vectorised element-wise kernels use.
#[inline]
pub fn avx512_fvl() -> bool {
    let f = features();
    f.avx512f && f.avx512vl && f.fma
}

/// [`avx512_fvl`] plus AVX-512 BW.
#[inline]
pub fn avx512_bw() -> bool {
    avx512_fvl() && features().avx512bw
}

/// [`avx512_bw`] plus AVX-512 VBMI2 (`vpexpand`).
#[inline]
pub fn avx512_vbmi2() -> bool {
    avx512_bw() && features().avx512vbmi2
}

/// [`avx512_fvl`] plus AVX-512 BF16 (`vdpbf16ps`).
#[inline]
pub fn avx512_bf16() -> bool {
    avx512_fvl() && features().avx512bf16
}

/// AMX tiles with bf16 products (CPUID; see [`Features::amx_bf16`]).
#[inline]
pub fn amx_bf16() -> bool {
    features().amx_bf16
}

/// AVX2 with FMA and F16C.
#[inline]
pub fn avx2_fma_f16c() -> bool {
    let f = features();
    f.avx2 && f.fma && f.f16c
}

/// POPCNT, BMI1 and BMI2.
#[inline]
pub fn bit_manipulation() -> bool {
    let f = features();
    f.popcnt && f.bmi1 && f.bmi2
}

/// BMI2 alone (`pdep` / `pext`).
#[inline]
pub fn bmi2() -> bool {
    features().bmi2
}

/// NEON (every aarch64 CPU).
#[inline]
pub fn neon() -> bool {
    features().neon
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates_agree_with_the_detection_macros() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            assert_eq!(
                avx512_fvl(),
                has!("avx512f") && has!("avx512vl") && has!("fma")
            );
            assert_eq!(avx512_bw(), avx512_fvl() && has!("avx512bw"));
            assert_eq!(avx2_fma_f16c(), has!("avx2") && has!("fma") && has!("f16c"));
            assert_eq!(
                bit_manipulation(),
                has!("popcnt") && has!("bmi1") && has!("bmi2")
            );
        }
        let f = features();
        assert_eq!(f.names().len(), {
            let g = Features::detect();
            assert_eq!(*f, g, "detection is stable");
            g.names().len()
        });
        // The subsets nest.
        assert!(!avx512_vbmi2() || avx512_bw());
        assert!(!avx512_bw() || avx512_fvl());
    }
}

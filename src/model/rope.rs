//! Rotary position embeddings in HF's "rotate half" layout.
//!
//! For a head vector `x` of size `d`, pair `i < d/2` is `(x[i], x[i + d/2])`, rotated by
//! `pos · inv_freq[i]`. Frequencies follow transformers' `ROPE_INIT_FUNCTIONS`: default,
//! `linear` (positions divided by the factor) and `llama3` (Llama 3.1's wavelength-dependent
//! scaling). Angles are the f32 product `inv_freq · pos`, as transformers computes them, so that
//! long-context positions round the same way.

use crate::model::config::{Config, RopeScaling};
use rayon::prelude::*;

/// Precomputed cos/sin tables, `[max_pos, head_dim/2]` each.
#[derive(Debug, Clone)]
pub struct Rope {
    pub head_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub max_pos: usize,
    /// Tables of the sliding-window layers' RoPE base when the model has one
    /// ([`crate::model::config::FamilyConfig::rope_local_theta`], Gemma 3), no scaling.
    pub local: Option<Box<Rope>>,
}

/// Inverse frequencies `[head_dim/2]` for a config (transformers' definitions).
pub fn inv_freq(cfg: &Config) -> Vec<f32> {
    let d = cfg.head_dim;
    let base = cfg.rope_theta;
    let raw: Vec<f32> = (0..d / 2)
        .map(|i| (1.0 / base.powf((2 * i) as f64 / d as f64)) as f32)
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::Default => raw,
        RopeScaling::Linear { factor } => raw.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, lo, hi) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
            );
            let old = *original_max_position_embeddings as f32;
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            raw.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    // As transformers writes it (NaN-safe negations).
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                    if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    /// Tables for positions `0..max_pos`.
    pub fn new(cfg: &Config, max_pos: usize) -> Rope {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for (i, &f) in inv.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                cos[p * half + i] = angle.cos() as f32;
                sin[p * half + i] = angle.sin() as f32;
            }
        }
        let local = cfg.family.rope_local_theta.map(|theta| {
            let mut c = cfg.clone();
            c.rope_theta = theta;
            c.rope_scaling = RopeScaling::Default;
            c.family.rope_local_theta = None;
            Box::new(Rope::new(&c, max_pos))
        });
        Rope {
            head_dim: cfg.head_dim,
            cos,
            sin,
            max_pos,
            local,
        }
    }

    /// The tables block `layer` uses: the local ones on a sliding layer of a model with two
    /// RoPE bases ([`Config::layer_local_rope`]), else these.
    pub fn for_layer(&self, cfg: &Config, layer: usize) -> &Rope {
        match &self.local {
            Some(l) if cfg.layer_local_rope(layer) => l,
            _ => self,
        }
    }

    /// Rotate `x` = `[rows, n_heads·head_dim]` in place; row `r` is at position `pos0 + r % seq`
    /// (rows are `batch` sequences of `seq` tokens each).
    pub fn apply(&self, x: &mut [f32], n_heads: usize, seq: usize, pos0: usize) {
        let d = self.head_dim;
        let half = d / 2;
        let width = n_heads * d;
        assert!(pos0 + seq <= self.max_pos, "RoPE table too short");
        x.par_chunks_mut(width)
            .enumerate()
            .with_min_len(32)
            .for_each(|(r, row)| {
                let p = pos0 + r % seq;
                let c = &self.cos[p * half..(p + 1) * half];
                let s = &self.sin[p * half..(p + 1) * half];
                rotate_row(row, d, c, s);
            });
    }

    /// [`Rope::apply`] for rows at arbitrary positions: row `r` of `x` `[pos.len(),
    /// n_heads·head_dim]` is at position `pos[r]` (token pruning keeps prompt tokens at their
    /// original positions). The same arithmetic per row as [`Rope::apply`].
    pub fn apply_at(&self, x: &mut [f32], n_heads: usize, pos: &[usize]) {
        let d = self.head_dim;
        let half = d / 2;
        let width = n_heads * d;
        assert!(
            x.len() >= pos.len() * width,
            "RoPE: x shorter than its positions"
        );
        assert!(
            pos.iter().all(|&p| p < self.max_pos),
            "RoPE table too short"
        );
        x[..pos.len() * width]
            .par_chunks_mut(width)
            .zip(pos.par_iter())
            .with_min_len(32)
            .for_each(|(row, &p)| {
                let c = &self.cos[p * half..(p + 1) * half];
                let s = &self.sin[p * half..(p + 1) * half];
                rotate_row(row, d, c, s);
            });
    }
}

/// Rotate every head of one row by the angles whose cos/sin are `c`/`s`.
#[inline]
fn rotate_row(row: &mut [f32], d: usize, c: &[f32], s: &[f32]) {
    let half = d / 2;
    for head in row.chunks_mut(d) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * c[i] - x1 * s[i];
            b[i] = x1 * c[i] + x0 * s[i];
        }
    }
}

//! The plain data of activation sparsity ([`super::act`]): thresholds as stored
//! ([`ActSparsity`]) and as a block applies them ([`LayerAct`], held by
//! [`super::weights::LayerWeights::act`]). Sites are indices in `Site::ALL` order (attn_in,
//! attn_out, mlp_in, mlp_down); this module imports only the error type, so the weights can
//! hold a [`LayerAct`] without an import cycle.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// How an input entry is scored against its site's threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// `|x_j|` (TEAL).
    Magnitude,
    /// `|x_j|·‖W[:, j]‖₂` over the site's stacked linears (WINA).
    Wina,
}

impl std::str::FromStr for Score {
    type Err = Error;
    fn from_str(s: &str) -> Result<Score> {
        match s {
            "magnitude" => Ok(Score::Magnitude),
            "wina" => Ok(Score::Wina),
            _ => Err(Error::Invalid(format!(
                "activation score `{s}` is not one of magnitude, wina"
            ))),
        }
    }
}

/// One site's rule: zero the entries whose score is below `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiteThreshold {
    /// Input width the threshold was calibrated for (checked on install).
    pub cols: usize,
    pub threshold: f32,
    /// Sparsity the threshold gave on the calibration set.
    pub calib_sparsity: f64,
}

/// Thresholds for every block and site, and how they were obtained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActSparsity {
    pub score: Score,
    /// The requested mean sparsity.
    pub target: f64,
    /// `uniform` (every site the target) or `greedy` (TEAL's block-wise allocation).
    pub allocation: String,
    /// Where the calibration activations came from.
    pub calibration: String,
    /// Per block, per site in `Site::ALL` order (`None`: the site stays dense).
    pub layers: Vec<[Option<SiteThreshold>; 4]>,
}

/// Zero / total counts of one site's entries since the last [`LayerAct::reset_counts`].
#[derive(Debug, Default)]
pub struct SiteCount {
    pub zeros: AtomicU64,
    pub total: AtomicU64,
}

/// What the forward pass applies at one block's sites.
#[derive(Debug)]
pub struct LayerAct {
    /// Per site: threshold and, for WINA, the column norms the magnitudes are scaled by.
    pub sites: [Option<(f32, Option<Vec<f32>>)>; 4],
    pub counts: [SiteCount; 4],
    /// The thresholds this was installed from (shared by every block; what a writer saves).
    pub source: Arc<ActSparsity>,
}

impl LayerAct {
    /// Rules per site (threshold, WINA column norms) with zeroed counters.
    pub fn new(sites: [Option<(f32, Option<Vec<f32>>)>; 4], source: Arc<ActSparsity>) -> LayerAct {
        LayerAct {
            sites,
            counts: Default::default(),
            source,
        }
    }

    /// Zeros the entries of `x` (`[rows, cols]`) scored below site `i`'s threshold, in place, and
    /// counts the zeros (also those that were zero already).
    pub fn apply(&self, i: usize, x: &mut [f32]) {
        let Some((t, scale)) = &self.sites[i] else {
            return;
        };
        let t = *t;
        let mut zeros = 0u64;
        match scale {
            None => {
                for v in x.iter_mut() {
                    if v.abs() < t {
                        *v = 0.0;
                    }
                    zeros += (*v == 0.0) as u64;
                }
            }
            Some(s) => {
                for row in x.chunks_mut(s.len()) {
                    for (v, &c) in row.iter_mut().zip(s) {
                        if v.abs() * c < t {
                            *v = 0.0;
                        }
                        zeros += (*v == 0.0) as u64;
                    }
                }
            }
        }
        self.counts[i].zeros.fetch_add(zeros, Relaxed);
        self.counts[i].total.fetch_add(x.len() as u64, Relaxed);
    }

    /// Fraction of zero inputs seen at site `i` (`None`: nothing seen).
    pub fn achieved(&self, i: usize) -> Option<f64> {
        let c = &self.counts[i];
        let t = c.total.load(Relaxed);
        (t > 0).then(|| c.zeros.load(Relaxed) as f64 / t as f64)
    }

    pub fn reset_counts(&self) {
        for c in &self.counts {
            c.zeros.store(0, Relaxed);
            c.total.store(0, Relaxed);
        }
    }
}

//! Shared test helpers: golden file access and small readers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

/// The golden directory; tests that need it fail loudly when it is missing.
pub fn golden() -> PathBuf {
    lopper::assets::golden_dir()
        .expect("golden reference directory ../shared/golden (or $LOPPER_GOLDEN) is missing")
}

/// A tensor read from a safetensors file, as f32 or i64 values.
#[derive(Debug, Clone)]
pub struct GoldenTensor {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Read every tensor of a safetensors file (F32 and I64 only).
pub fn read_safetensors(path: &std::path::Path) -> HashMap<String, GoldenTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let mut t = GoldenTensor {
            shape: view.shape().to_vec(),
            f32: vec![],
            i64: vec![],
        };
        match view.dtype() {
            safetensors::Dtype::F32 => {
                t.f32 = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            safetensors::Dtype::I64 => {
                t.i64 = data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            }
            d => panic!("unexpected dtype {d:?} for {name}"),
        }
        out.insert(name, t);
    }
    out
}

/// The default model, loaded once per test binary.
pub fn default_model() -> &'static lopper::Model {
    static M: std::sync::OnceLock<lopper::Model> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let p = lopper::assets::default_model().expect("fetch default model");
        lopper::io::load_model(&p).expect("load default model")
    })
}

/// A copy of the default model cut to its first `layers` blocks (no tokenizer).
pub fn default_model_cut(layers: usize) -> lopper::Model {
    let m = default_model();
    let mut config = m.config.clone();
    config.num_hidden_layers = layers;
    let mut weights = m.weights.clone();
    weights.layers.truncate(layers);
    lopper::Model {
        config,
        weights,
        tokenizer: None,
        chat_template: None,
        source: m.source.clone(),
    }
}

/// `n` windows of `len` random token ids below `vocab` (seeded): calibration for tiny models.
pub fn random_calib(seed: u64, n: usize, len: usize, vocab: u64) -> lopper::calibrate::CalibSet {
    let mut rng = lopper::calibrate::SplitMix64(seed);
    lopper::calibrate::CalibSet {
        ids: (0..n * len).map(|_| rng.below(vocab) as u32).collect(),
        n,
        len,
        source: "random ids".into(),
    }
}

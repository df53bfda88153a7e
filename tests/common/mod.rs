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

/// The sliding-window fixture of `scripts/sliding_window_ref.py`: an independent NumPy
/// forward of tiny-mistral with a window shorter than its 96-token rows.
pub struct WindowFixture {
    /// The window (positions) the reference used.
    pub window: usize,
    /// First position whose logits are stored.
    pub first: usize,
    /// `input_ids` `[rows, t]` (the golden tiny-model ids).
    pub ids: GoldenTensor,
    /// `logits` `[rows, t − first, vocab]` of positions `first..t`.
    pub logits: GoldenTensor,
}

/// Read `tests/fixtures/tiny_mistral_window16.safetensors` (window and first position from its
/// metadata).
pub fn window_fixture() -> WindowFixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny_mistral_window16.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
    let info = meta.metadata().clone().expect("fixture metadata");
    let num = |k: &str| -> usize { info[k].parse().expect("a number in the fixture metadata") };
    let mut t = read_safetensors(&path);
    WindowFixture {
        window: num("sliding_window"),
        first: num("first_position"),
        ids: t.remove("input_ids").expect("input_ids"),
        logits: t.remove("logits").expect("logits"),
    }
}

/// tiny-mistral with `sliding_window` set in its config.json, copied into `dir` and loaded (so
/// the HF parser reads the window).
pub fn tiny_mistral_windowed(dir: &std::path::Path, window: usize) -> lopper::Model {
    let src = golden().join("tiny").join("tiny-mistral");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["sliding_window"] = serde_json::json!(window);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let m = lopper::io::load_model(dir).expect("load windowed tiny-mistral");
    assert_eq!(m.config.sliding_window, Some(window));
    m
}

/// Largest |a − b| between the fixture's logits and `logits` `[t, vocab]` of row `row`, over
/// the fixture's positions.
pub fn window_fixture_diff(fx: &WindowFixture, row: usize, logits: &[f32]) -> f32 {
    let (kept, vocab) = (fx.logits.shape[1], fx.logits.shape[2]);
    let want = &fx.logits.f32[row * kept * vocab..(row + 1) * kept * vocab];
    let got = &logits[fx.first * vocab..(fx.first + kept) * vocab];
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

//! Structured pruning (depth, heads, neurons) on the tiny random models and on one real layer:
//! * removing nothing leaves the model unchanged; removing blocks equals running the rest;
//! * removing heads / channels equals zeroing their o_proj / down_proj columns (and, with FLAP
//!   bias compensation, adding exactly the removed mean contribution as a bias);
//! * shapes, GQA layout, config sync, allocation counts, realised fractions;
//! * scores from the fast statistics equal a naive computation on the real model's activations;
//! * depth metrics equal a naive computation; variance survives a large mean;
//! * save → load gives identical logits (uniform: plain HF config; non-uniform: `lopper_layers`);
//! * bad requests are refused and leave the model untouched; `hf_compatible` explains itself.

mod common;
use common::*;
use lopper::calibrate::{CalibSet, SplitMix64};
use lopper::model::forward::{block_forward, embed, forward_logits, Scratch};
use lopper::model::observer::{Observer, Site};
use lopper::model::rope::Rope;
use lopper::structured::alloc;
use lopper::structured::depth::{self, DepthMetric, DepthSpec, LayerSelection};
use lopper::structured::heads::{self, GqaMode, HeadMetric, HeadSpec};
use lopper::structured::neurons::{self, NeuronMetric, NeuronSpec};
use lopper::structured::stats::{collect_width_stats, ColumnMoments};
use lopper::structured::{hf_compatible, WidthAllocation};
use lopper::{Model, Tensor};
use std::path::PathBuf;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tiny(name: &str) -> Model {
    let dir: PathBuf = golden().join("tiny").join(name);
    lopper::io::load_model(&dir).unwrap_or_else(|e| panic!("load {name}: {e}"))
}

fn copy(m: &Model) -> Model {
    m.clone()
}

/// 8 random windows of 32 ids below 320 (the tiny vocabulary).
fn tiny_calib() -> CalibSet {
    random_calib(11, 8, 32, 320)
}

fn probe_ids() -> Vec<u32> {
    let mut rng = SplitMix64(99);
    (0..40).map(|_| rng.below(320) as u32).collect()
}

fn logits(m: &Model) -> Vec<f32> {
    forward_logits(m, &probe_ids()).unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

fn nop() -> impl FnMut(&str, usize, usize) {
    |_: &str, _: usize, _: usize| {}
}

fn heads_spec(f: f64, metric: HeadMetric, gqa: GqaMode, a: WidthAllocation) -> HeadSpec {
    HeadSpec {
        fraction: f,
        metric,
        gqa,
        allocation: a,
        bias_compensation: false,
        reconstruct: None,
    }
}

fn neuron_spec(f: f64, metric: NeuronMetric, bias: bool, a: WidthAllocation) -> NeuronSpec {
    NeuronSpec {
        fraction: f,
        metric,
        bias_compensation: bias,
        allocation: a,
        reconstruct: None,
    }
}

/// Every activation of `site` in `layer` over the calibration set, `[tokens, cols]`.
struct Capture {
    layer: usize,
    sites: Vec<Site>,
    data: Vec<(Site, Vec<f32>, usize)>,
}

impl Observer for Capture {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == self.layer
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], rows: usize, cols: usize) {
        if layer == self.layer && self.sites.contains(&site) {
            match self.data.iter_mut().find(|d| d.0 == site) {
                Some(d) => d.1.extend_from_slice(&x[..rows * cols]),
                None => self.data.push((site, x[..rows * cols].to_vec(), cols)),
            }
        }
    }
}

fn capture(m: &Model, calib: &CalibSet, layer: usize, sites: &[Site]) -> Capture {
    let mut c = Capture {
        layer,
        sites: sites.to_vec(),
        data: vec![],
    };
    lopper::structured::collect::observe_all(m, calib, &mut c, &mut nop()).unwrap();
    c
}

impl Capture {
    fn get(&self, site: Site) -> (&[f32], usize) {
        let d = self.data.iter().find(|d| d.0 == site).expect("captured");
        (&d.1, d.2)
    }
}

/// Two-pass per-column mean, unbiased variance and Σx² in f64.
fn naive_moments(x: &[f32], cols: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = x.len() / cols;
    let mut mean = vec![0f64; cols];
    let mut sq = vec![0f64; cols];
    for r in x.chunks(cols) {
        for j in 0..cols {
            mean[j] += r[j] as f64;
            sq[j] += (r[j] as f64).powi(2);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0f64; cols];
    for r in x.chunks(cols) {
        for j in 0..cols {
            var[j] += (r[j] as f64 - mean[j]).powi(2);
        }
    }
    var.iter_mut().for_each(|v| *v /= (n - 1) as f64);
    (mean, var, sq)
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1e-300),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// `m` with columns `cols` of linear `which` (o or down) of `layer` set to zero.
fn zero_cols(m: &mut Model, layer: usize, down: bool, cols: &[usize]) {
    let lw = &mut m.weights.layers[layer];
    let w = if down {
        &mut lw.down.weight
    } else {
        &mut lw.o.weight
    };
    let c = w.cols();
    let d = w.data_mut();
    for r in 0..d.len() / c {
        for &j in cols {
            d[r * c + j] = 0.0;
        }
    }
}

fn usize_lists(v: &serde_json::Value) -> Vec<Vec<usize>> {
    serde_json::from_value(v.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Statistics and allocation
// ---------------------------------------------------------------------------------------------

#[test]
fn variance_survives_a_large_mean() {
    // Column 0: 1e4 + small steps (mean ≫ spread); column 1: plain values. Added in 3 chunks.
    let mut rng = SplitMix64(5);
    let rows = 3000;
    let x: Vec<f32> = (0..rows)
        .flat_map(|_| {
            let a = 1.0e4 + (rng.below(1000) as f32) * 0.01;
            let b = rng.below(1000) as f32 / 100.0 - 5.0;
            [a, b]
        })
        .collect();
    let mut m = ColumnMoments::new(2);
    for c in x.chunks(1000 * 2) {
        m.add(c, c.len() / 2);
    }
    let (mean, var, sq) = naive_moments(&x, 2);
    assert_eq!(m.n, rows as u64);
    assert_close(&m.mean(), &mean, 1e-12, "mean");
    assert_close(&m.var(), &var, 1e-9, "var");
    assert_close(&m.sum_sq(), &sq, 1e-12, "sum of squares");
}

#[test]
fn allocation_rules() {
    let mut x = vec![1.0, 2.0, 3.0, 10.0];
    alloc::standardize(&mut x);
    let mean = x.iter().sum::<f64>() / 4.0;
    let var = x.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 3.0;
    assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12);
    let sorted = vec![vec![-1.0, 0.5, 2.0], vec![-2.0, -0.5, 1.0]];
    assert_eq!(
        alloc::adaptive_counts(&sorted, &[1, 1], &[2, 2], 3, "t").unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        alloc::adaptive_counts(&sorted, &[1, 1], &[2, 2], 4, "t").unwrap(),
        vec![2, 2]
    );
    assert!(alloc::adaptive_counts(&sorted, &[1, 1], &[2, 2], 5, "t").is_err());
    // Units of 3 items: 4 requested → one unit (3 is nearer than 6); 5 → two.
    let sum = |v: Vec<usize>| v.iter().sum::<usize>();
    assert_eq!(
        sum(alloc::adaptive_counts(&sorted, &[3, 3], &[2, 2], 4, "t").unwrap()),
        1
    );
    assert_eq!(
        sum(alloc::adaptive_counts(&sorted, &[3, 3], &[2, 2], 5, "t").unwrap()),
        2
    );
    assert_eq!(
        alloc::uniform_counts(0.2, &[3, 10], &[2, 9], "t").unwrap(),
        vec![1, 2]
    );
    assert!(alloc::uniform_counts(0.9, &[3], &[2], "t").is_err());
}

// ---------------------------------------------------------------------------------------------
// Depth
// ---------------------------------------------------------------------------------------------

/// Hidden states at every block boundary for the calibration set, by plain `block_forward`.
fn boundaries(m: &Model, calib: &CalibSet) -> Vec<Vec<f32>> {
    let rope = Rope::new(&m.config, calib.len);
    let mut s = Scratch::default();
    let mut h = embed(&m.weights, &calib.ids).unwrap();
    let mut out = vec![h.clone()];
    for (i, lw) in m.weights.layers.iter().enumerate() {
        let mut obs = lopper::model::observer::NoObserver;
        block_forward(
            &m.config, i, lw, &rope, &mut h, calib.n, calib.len, &mut s, &mut obs,
        );
        out.push(h.clone());
    }
    out
}

#[test]
fn depth_removal_equals_running_the_remaining_blocks() {
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    let mut m = copy(&base);
    let d = depth::remove_layers(
        &mut m,
        &calib,
        &DepthSpec {
            select: LayerSelection::Count(0),
            metric: DepthMetric::BlockInfluence,
            reconstruct: None,
        },
        &mut nop(),
    )
    .unwrap();
    assert_eq!(d["removed_layers"], serde_json::json!([]));
    assert_eq!(
        logits(&m),
        logits(&base),
        "removing 0 blocks changed the model"
    );

    let mut m = copy(&base);
    let spec = DepthSpec {
        select: LayerSelection::List(vec![1]),
        metric: DepthMetric::Angular,
        reconstruct: None,
    };
    depth::remove_layers(&mut m, &calib, &spec, &mut nop()).unwrap();
    assert_eq!(m.weights.layers.len(), 2);
    assert_eq!(m.config.num_hidden_layers, 2);
    // By hand: blocks 0 and 2 of the original, final norm, head.
    let ids = probe_ids();
    let rope = Rope::new(&base.config, ids.len());
    let mut s = Scratch::default();
    let mut h = embed(&base.weights, &ids).unwrap();
    for (i, l) in [0usize, 2].into_iter().enumerate() {
        let mut obs = lopper::model::observer::NoObserver;
        block_forward(
            &base.config,
            i,
            &base.weights.layers[l],
            &rope,
            &mut h,
            1,
            ids.len(),
            &mut s,
            &mut obs,
        );
    }
    let mut normed = vec![0f32; h.len()];
    lopper::kernels::rmsnorm(
        &h,
        base.weights.final_norm.data(),
        base.config.rms_norm_eps as f32,
        &mut normed,
    );
    let want = lopper::model::forward::logits(&base.weights, &normed, ids.len());
    assert_eq!(logits(&m), want);
}

#[test]
fn depth_bad_requests_leave_the_model_alone() {
    let base = tiny("tiny-llama3");
    let before = logits(&base);
    let calib = tiny_calib();
    for select in [
        LayerSelection::Count(3),
        LayerSelection::Count(7),
        LayerSelection::List(vec![0, 1, 2]),
        LayerSelection::List(vec![3]),
        LayerSelection::List(vec![1, 1]),
    ] {
        let mut m = copy(&base);
        let spec = DepthSpec {
            select: select.clone(),
            metric: DepthMetric::BlockInfluence,
            reconstruct: None,
        };
        let r = depth::remove_layers(&mut m, &calib, &spec, &mut nop());
        assert!(
            matches!(r, Err(lopper::Error::Invalid(_))),
            "{select:?}: {r:?}"
        );
        assert_eq!(m.weights.layers.len(), 3);
        assert_eq!(logits(&m), before, "{select:?} changed the model");
    }
}

#[test]
fn depth_metrics_match_a_naive_computation() {
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    let x = boundaries(&base, &calib);
    let d = base.config.hidden_size;
    let l = base.weights.layers.len();
    // Block Influence over all tokens.
    let bi: Vec<f64> = (0..l)
        .map(|i| {
            let cos: f64 = x[i]
                .chunks(d)
                .zip(x[i + 1].chunks(d))
                .map(|(a, b)| depth::cosine(a, b))
                .sum();
            1.0 - cos / (calib.n * calib.len) as f64
        })
        .collect();
    let mut m = copy(&base);
    let spec = DepthSpec {
        select: LayerSelection::Count(1),
        metric: DepthMetric::BlockInfluence,
        reconstruct: None,
    };
    let det = depth::remove_layers(&mut m, &calib, &spec, &mut nop()).unwrap();
    let got: Vec<f64> = serde_json::from_value(det["scores"].clone()).unwrap();
    assert_close(&got, &bi, 1e-9, "BI");
    let argmin = alloc::ascending(&bi)[0];
    assert_eq!(det["removed_layers"], serde_json::json!([argmin]));

    for n in [1usize, 2] {
        // Last token of each window.
        fn last(b: &[f32], w: usize, len: usize, d: usize) -> &[f32] {
            &b[((w + 1) * len - 1) * d..(w + 1) * len * d]
        }
        let want_last: Vec<f64> = (0..=l - n)
            .map(|s| {
                (0..calib.n)
                    .map(|w| {
                        depth::angular(
                            last(&x[s], w, calib.len, d),
                            last(&x[s + n], w, calib.len, d),
                        )
                    })
                    .sum::<f64>()
                    / calib.n as f64
            })
            .collect();
        let want_all: Vec<f64> = (0..=l - n)
            .map(|s| {
                x[s].chunks(d)
                    .zip(x[s + n].chunks(d))
                    .map(|(a, b)| depth::angular(a, b))
                    .sum::<f64>()
                    / (calib.n * calib.len) as f64
            })
            .collect();
        for (metric, want) in [
            (DepthMetric::Angular, &want_last),
            (DepthMetric::AngularAllTokens, &want_all),
        ] {
            let mut m = copy(&base);
            let spec = DepthSpec {
                select: LayerSelection::Count(n),
                metric,
                reconstruct: None,
            };
            let det = depth::remove_layers(&mut m, &calib, &spec, &mut nop()).unwrap();
            let got: Vec<f64> = serde_json::from_value(det["scores"].clone()).unwrap();
            assert_close(&got, want, 1e-9, &format!("{metric:?} n={n}"));
            let s = alloc::ascending(want)[0];
            let run: Vec<usize> = (s..s + n).collect();
            assert_eq!(
                det["removed_layers"],
                serde_json::json!(run),
                "{metric:?} n={n}"
            );
            assert_eq!(m.weights.layers.len(), l - n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Heads
// ---------------------------------------------------------------------------------------------

#[test]
fn head_removal_shapes_gqa_and_equivalence() {
    let base = tiny("tiny-llama3"); // 8 heads, 2 KV heads, head_dim 8, 3 layers
    let calib = tiny_calib();
    let hd = base.config.head_dim;
    for (gqa, f, heads, kv) in [
        (GqaMode::KvGroups, 0.5, 4, 1),
        (GqaMode::PerGroup, 0.25, 6, 2),
    ] {
        for metric in [
            HeadMetric::Norm,
            HeadMetric::Fluctuation,
            HeadMetric::WandaSp,
        ] {
            let mut m = copy(&base);
            let spec = heads_spec(f, metric, gqa, WidthAllocation::Uniform);
            let det = heads::prune_heads(&mut m, &calib, &spec, &mut nop()).unwrap();
            let what = format!("{gqa:?} {metric:?}");
            for l in &m.weights.layers {
                assert_eq!(l.q.weight.shape, vec![heads * hd, 64], "{what}");
                assert_eq!(l.k.weight.shape, vec![kv * hd, 64], "{what}");
                assert_eq!(l.v.weight.shape, vec![kv * hd, 64], "{what}");
                assert_eq!(l.o.weight.shape, vec![64, heads * hd], "{what}");
                assert_eq!(l.n_heads(hd) % l.n_kv_heads(hd), 0, "{what}: GQA");
            }
            assert_eq!(
                (m.config.num_attention_heads, m.config.num_key_value_heads),
                (heads, kv)
            );
            assert!((det["realised_fraction"].as_f64().unwrap() - f).abs() < 1e-12);
            assert_eq!(hf_compatible(&m), Ok(()));
            let removed = usize_lists(&det["removed_query_heads"]);
            let removed_kv = usize_lists(&det["removed_kv_heads"]);
            for (l, r) in removed.iter().enumerate() {
                // Every group loses the same number of heads; KvGroups removes whole groups.
                let per_group: Vec<usize> = (0..2)
                    .map(|g| r.iter().filter(|&&h| h / 4 == g).count())
                    .collect();
                match gqa {
                    GqaMode::KvGroups => {
                        assert_eq!(removed_kv[l].len(), 1, "{what}");
                        assert_eq!(per_group[removed_kv[l][0]], 4, "{what}");
                    }
                    GqaMode::PerGroup => {
                        assert!(removed_kv[l].is_empty());
                        assert_eq!(per_group, vec![1, 1], "{what}");
                    }
                }
            }
            // Removing heads = zeroing their o_proj columns in the original.
            let mut z = copy(&base);
            for (l, r) in removed.iter().enumerate() {
                let cols: Vec<usize> = r.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
                zero_cols(&mut z, l, false, &cols);
            }
            let (a, b) = (logits(&m), logits(&z));
            assert!(a.iter().all(|v| v.is_finite()));
            let diff = max_rel_diff(&a, &b);
            assert!(diff < 1e-5, "{what}: pruned vs zeroed differ by {diff}");
        }
    }
}

#[test]
fn head_scores_follow_the_chosen_metric() {
    // Uniform KvGroups: the removed group is the one with the lowest summed score.
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    let stats = collect_width_stats(&base, &calib, &[Site::AttnOut], &mut nop()).unwrap();
    let mut m = copy(&base);
    let spec = heads_spec(
        0.5,
        HeadMetric::Fluctuation,
        GqaMode::KvGroups,
        WidthAllocation::Uniform,
    );
    let det = heads::prune_heads(&mut m, &calib, &spec, &mut nop()).unwrap();
    let removed_kv = usize_lists(&det["removed_kv_heads"]);
    assert_eq!(removed_kv.len(), 3);
    for (l, kv) in removed_kv.iter().enumerate() {
        let ch = heads::channel_scores(
            &base.weights.layers[l].o.weight,
            stats.get(l, Site::AttnOut).unwrap(),
            HeadMetric::Fluctuation,
        );
        let h = heads::head_sums(&ch, 8);
        let g: Vec<f64> = (0..2).map(|k| h[k * 4..k * 4 + 4].iter().sum()).collect();
        assert_eq!(*kv, vec![alloc::ascending(&g)[0]], "layer {l}");
    }
}

#[test]
fn adaptive_heads_are_non_uniform_and_counted() {
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    // 24 heads; 1/3 → 8 heads = 2 groups of 4 over 3 layers, at most 1 per layer.
    let mut m = copy(&base);
    let spec = heads_spec(
        1.0 / 3.0,
        HeadMetric::Fluctuation,
        GqaMode::KvGroups,
        WidthAllocation::Adaptive,
    );
    let det = heads::prune_heads(&mut m, &calib, &spec, &mut nop()).unwrap();
    let per: Vec<usize> = m.weights.layers.iter().map(|l| l.n_heads(8)).collect();
    assert_eq!(per.iter().sum::<usize>(), 16);
    assert!(per.iter().all(|&h| h == 4 || h == 8), "{per:?}");
    assert_eq!(det["heads_removed"], 8);
    // Nominal config stays; transformers cannot load this.
    assert_eq!(m.config.num_attention_heads, 8);
    let why = hf_compatible(&m).unwrap_err();
    assert!(why.contains("differ"), "{why}");
    // PerGroup adaptive: 6 of 24 heads in units of one head per group (2 heads).
    let mut m = copy(&base);
    let spec = heads_spec(
        0.25,
        HeadMetric::Norm,
        GqaMode::PerGroup,
        WidthAllocation::Adaptive,
    );
    heads::prune_heads(&mut m, &calib, &spec, &mut nop()).unwrap();
    let per: Vec<usize> = m.weights.layers.iter().map(|l| l.n_heads(8)).collect();
    assert_eq!(per.iter().sum::<usize>(), 18);
    for l in &m.weights.layers {
        assert_eq!(l.n_kv_heads(8), 2);
        assert!(l.n_heads(8) >= 2);
    }
    assert!(logits(&m).iter().all(|v| v.is_finite()));
}

#[test]
fn head_bad_requests_leave_the_model_alone() {
    let base = tiny("tiny-llama3");
    let before = logits(&base);
    let calib = tiny_calib();
    for (f, gqa, a) in [
        (1.0, GqaMode::PerGroup, WidthAllocation::Uniform),
        (1.5, GqaMode::KvGroups, WidthAllocation::Adaptive),
        (-0.1, GqaMode::PerGroup, WidthAllocation::Uniform),
        (f64::NAN, GqaMode::PerGroup, WidthAllocation::Uniform),
        (0.9, GqaMode::KvGroups, WidthAllocation::Uniform), // 1.8 → 2 of 2 groups
        (0.9, GqaMode::PerGroup, WidthAllocation::Uniform), // 3.6 → 4 of 4 per group
        (0.8, GqaMode::KvGroups, WidthAllocation::Adaptive), // more than one group per layer
    ] {
        let mut m = copy(&base);
        let r = heads::prune_heads(
            &mut m,
            &calib,
            &heads_spec(f, HeadMetric::Norm, gqa, a),
            &mut nop(),
        );
        assert!(
            matches!(r, Err(lopper::Error::Invalid(_))),
            "{f} {gqa:?} {a:?}: {r:?}"
        );
        assert_eq!(logits(&m), before, "{f} {gqa:?} {a:?} changed the model");
    }
    // Zero removes nothing.
    let mut m = copy(&base);
    let det = heads::prune_heads(
        &mut m,
        &calib,
        &heads_spec(
            0.0,
            HeadMetric::Norm,
            GqaMode::KvGroups,
            WidthAllocation::Uniform,
        ),
        &mut nop(),
    )
    .unwrap();
    assert_eq!(det["heads_removed"], 0);
    assert_eq!(logits(&m), before);
}

// ---------------------------------------------------------------------------------------------
// Neurons
// ---------------------------------------------------------------------------------------------

#[test]
fn neuron_removal_equals_zeroing_and_bias_compensation_is_exact() {
    let base = tiny("tiny-llama3"); // FFN 160
    let calib = tiny_calib();
    for metric in [
        NeuronMetric::WandaSp,
        NeuronMetric::WandaSpDown,
        NeuronMetric::Fluctuation,
    ] {
        for bias in [false, true] {
            let mut m = copy(&base);
            let det = neurons::prune_neurons(
                &mut m,
                &calib,
                &neuron_spec(0.25, metric, bias, WidthAllocation::Uniform),
                &mut nop(),
            )
            .unwrap();
            for l in &m.weights.layers {
                assert_eq!(l.gate.weight.shape, vec![120, 64]);
                assert_eq!(l.up.weight.shape, vec![120, 64]);
                assert_eq!(l.down.weight.shape, vec![64, 120]);
                assert_eq!(l.down.bias.is_some(), bias);
                assert_eq!(
                    l.gate.bias.is_some(),
                    bias,
                    "llama mlp_bias covers gate/up too"
                );
            }
            assert_eq!(m.config.intermediate_size, 120);
            assert_eq!(m.config.mlp_bias, bias);
            let removed = usize_lists(&det["removed_channels"]);
            // Reference: zero the removed down_proj columns; with compensation add the removed
            // channels' mean contribution (means from a naive capture of the dense model).
            let mut z = copy(&base);
            for (l, r) in removed.iter().enumerate() {
                assert_eq!(r.len(), 40);
                if bias {
                    let cap = capture(&base, &calib, l, &[Site::MlpDown]);
                    let (x, cols) = cap.get(Site::MlpDown);
                    let (mean, _, _) = naive_moments(x, cols);
                    let w = &base.weights.layers[l].down.weight;
                    let b: Vec<f32> = (0..w.rows())
                        .map(|i| {
                            r.iter()
                                .map(|&c| w.data()[i * cols + c] as f64 * mean[c])
                                .sum::<f64>() as f32
                        })
                        .collect();
                    z.weights.layers[l].down.bias = Some(Tensor::new(vec![b.len()], b));
                }
                zero_cols(&mut z, l, true, r);
            }
            let diff = max_rel_diff(&logits(&m), &logits(&z));
            assert!(
                diff < 1e-5,
                "{metric:?} bias={bias}: pruned vs reference differ by {diff}"
            );
        }
    }
}

#[test]
fn adaptive_neurons_and_bad_requests() {
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    let mut m = copy(&base);
    let det = neurons::prune_neurons(
        &mut m,
        &calib,
        &neuron_spec(
            0.3,
            NeuronMetric::Fluctuation,
            false,
            WidthAllocation::Adaptive,
        ),
        &mut nop(),
    )
    .unwrap();
    let widths: Vec<usize> = m.weights.layers.iter().map(|l| l.intermediate()).collect();
    assert_eq!(widths.iter().sum::<usize>(), 480 - 144, "{widths:?}");
    assert_eq!(det["channels_removed"], 144);
    assert!(logits(&m).iter().all(|v| v.is_finite()));

    let before = logits(&base);
    for (f, a) in [
        (1.0, WidthAllocation::Uniform),
        (1.0, WidthAllocation::Adaptive),
        (-0.5, WidthAllocation::Uniform),
        (f64::INFINITY, WidthAllocation::Adaptive),
        (0.999, WidthAllocation::Uniform), // rounds to all 160 channels
    ] {
        let mut m = copy(&base);
        let r = neurons::prune_neurons(
            &mut m,
            &calib,
            &neuron_spec(f, NeuronMetric::WandaSp, true, a),
            &mut nop(),
        );
        assert!(
            matches!(r, Err(lopper::Error::Invalid(_))),
            "{f} {a:?}: {r:?}"
        );
        assert_eq!(logits(&m), before, "{f} {a:?} changed the model");
        assert!(!m.config.mlp_bias);
    }
    let mut m = copy(&base);
    neurons::prune_neurons(
        &mut m,
        &calib,
        &neuron_spec(0.0, NeuronMetric::WandaSp, true, WidthAllocation::Uniform),
        &mut nop(),
    )
    .unwrap();
    assert_eq!(logits(&m), before);
    assert!(m.weights.layers.iter().all(|l| l.down.bias.is_none()));
}

// ---------------------------------------------------------------------------------------------
// Save / load and HF compatibility
// ---------------------------------------------------------------------------------------------

fn roundtrip(m: &Model) -> (Model, serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    lopper::io::save::save_hf(m, &out, lopper::io::save::SaveDtype::F32, false).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let back = lopper::io::load_model(&out).unwrap();
    // Own the data before the directory goes.
    let back = Model {
        weights: own(back.weights),
        ..back
    };
    (back, cfg)
}

fn own(mut w: lopper::Weights) -> lopper::Weights {
    w.embed.data_mut();
    w.final_norm.data_mut();
    if let Some(h) = &mut w.lm_head {
        h.data_mut();
    }
    for l in &mut w.layers {
        l.attn_norm.data_mut();
        l.mlp_norm.data_mut();
        for k in lopper::LinearKind::ALL {
            let lin = l.linear_mut(k);
            lin.weight.data_mut();
            if let Some(b) = &mut lin.bias {
                b.data_mut();
            }
        }
    }
    w
}

#[test]
fn uniform_pruning_saves_a_plain_hf_config() {
    let calib = tiny_calib();
    let mut m = tiny("tiny-llama3");
    heads::prune_heads(
        &mut m,
        &calib,
        &HeadSpec {
            bias_compensation: true,
            ..heads_spec(
                0.5,
                HeadMetric::Fluctuation,
                GqaMode::KvGroups,
                WidthAllocation::Uniform,
            )
        },
        &mut nop(),
    )
    .unwrap();
    neurons::prune_neurons(
        &mut m,
        &calib,
        &neuron_spec(
            0.25,
            NeuronMetric::Fluctuation,
            true,
            WidthAllocation::Uniform,
        ),
        &mut nop(),
    )
    .unwrap();
    depth::remove_layers(
        &mut m,
        &calib,
        &DepthSpec {
            select: LayerSelection::List(vec![2]),
            metric: DepthMetric::BlockInfluence,
            reconstruct: None,
        },
        &mut nop(),
    )
    .unwrap();
    assert_eq!(hf_compatible(&m), Ok(()));
    let (back, cfg) = roundtrip(&m);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 1);
    assert_eq!(cfg["intermediate_size"], 120);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["attention_bias"], true);
    assert_eq!(cfg["mlp_bias"], true);
    assert!(
        cfg.get("lopper_layers").is_none(),
        "uniform layers need no extension"
    );
    assert_eq!(back.config, m.config);
    assert_eq!(logits(&back), logits(&m));
}

#[test]
fn non_uniform_pruning_round_trips_through_lopper_layers() {
    let calib = tiny_calib();
    let mut m = tiny("tiny-llama3");
    heads::prune_heads(
        &mut m,
        &calib,
        &heads_spec(
            1.0 / 3.0,
            HeadMetric::Norm,
            GqaMode::KvGroups,
            WidthAllocation::Adaptive,
        ),
        &mut nop(),
    )
    .unwrap();
    neurons::prune_neurons(
        &mut m,
        &calib,
        &neuron_spec(0.3, NeuronMetric::WandaSp, false, WidthAllocation::Adaptive),
        &mut nop(),
    )
    .unwrap();
    assert!(hf_compatible(&m).is_err());
    let (back, cfg) = roundtrip(&m);
    assert!(cfg["lopper_layers"].is_array());
    for (a, b) in back.weights.layers.iter().zip(&m.weights.layers) {
        assert_eq!(a.q.weight.shape, b.q.weight.shape);
        assert_eq!(a.gate.weight.shape, b.gate.weight.shape);
    }
    assert_eq!(logits(&back), logits(&m));
}

#[test]
fn biased_architectures_keep_biases_in_step() {
    let calib = tiny_calib();
    // llama with q/k/v/o and MLP biases: bias elements go with their rows.
    let base = tiny("tiny-llama-tied-bias");
    let mut m = copy(&base);
    let det = heads::prune_heads(
        &mut m,
        &calib,
        &heads_spec(
            0.25,
            HeadMetric::Fluctuation,
            GqaMode::PerGroup,
            WidthAllocation::Uniform,
        ),
        &mut nop(),
    )
    .unwrap();
    let mut z = copy(&base);
    for (l, r) in usize_lists(&det["removed_query_heads"]).iter().enumerate() {
        let cols: Vec<usize> = r.iter().flat_map(|&h| h * 8..(h + 1) * 8).collect();
        zero_cols(&mut z, l, false, &cols);
    }
    assert!(max_rel_diff(&logits(&m), &logits(&z)) < 1e-5);
    for l in &m.weights.layers {
        assert_eq!(l.q.bias.as_ref().unwrap().shape, vec![48]);
    }
    let (back, _) = roundtrip(&m);
    assert_eq!(logits(&back), logits(&m));

    // qwen2: q/k/v biases follow KV-group removal; an o_proj bias cannot be saved for qwen2.
    let base = tiny("tiny-qwen2");
    let mut m = copy(&base);
    heads::prune_heads(
        &mut m,
        &calib,
        &heads_spec(
            0.5,
            HeadMetric::WandaSp,
            GqaMode::KvGroups,
            WidthAllocation::Uniform,
        ),
        &mut nop(),
    )
    .unwrap();
    for l in &m.weights.layers {
        assert_eq!(l.k.bias.as_ref().unwrap().shape, vec![8]);
    }
    assert_eq!(hf_compatible(&m), Ok(()));
    let (back, _) = roundtrip(&m);
    assert_eq!(logits(&back), logits(&m));
    let mut m = copy(&base);
    heads::prune_heads(
        &mut m,
        &calib,
        &HeadSpec {
            bias_compensation: true,
            ..heads_spec(
                0.5,
                HeadMetric::WandaSp,
                GqaMode::KvGroups,
                WidthAllocation::Uniform,
            )
        },
        &mut nop(),
    )
    .unwrap();
    let why = hf_compatible(&m).unwrap_err();
    assert!(why.contains("o_proj"), "{why}");
    let tmp = tempfile::tempdir().unwrap();
    assert!(lopper::io::save::save_hf(
        &m,
        &tmp.path().join("x"),
        lopper::io::save::SaveDtype::F32,
        false
    )
    .is_err());
}

// ---------------------------------------------------------------------------------------------
// Scores on the real model equal a naive computation
// ---------------------------------------------------------------------------------------------

#[test]
fn real_layer_scores_match_naive() {
    let model = default_model();
    let tok = model.tokenizer().unwrap();
    let path = lopper::assets::c4_text().unwrap();
    let calib = lopper::calibrate::from_text(tok, &path, 4, 64, 3).unwrap();
    let layer = 7;
    let sites = [Site::AttnOut, Site::MlpIn, Site::MlpDown];
    let stats = collect_width_stats(model, &calib, &sites, &mut nop()).unwrap();
    let cap = capture(model, &calib, layer, &sites);
    let lw = &model.weights.layers[layer];
    let hd = model.config.head_dim;

    // Column norms of a [rows, cols] weight, naive.
    let cols_of = |w: &Tensor| -> (Vec<f64>, Vec<f64>) {
        let (r, c) = (w.rows(), w.cols());
        let d = w.data();
        let sq = (0..c)
            .map(|j| (0..r).map(|i| (d[i * c + j] as f64).powi(2)).sum())
            .collect();
        let ab = (0..c)
            .map(|j| (0..r).map(|i| (d[i * c + j] as f64).abs()).sum())
            .collect();
        (sq, ab)
    };

    // Heads.
    let (x, cols) = cap.get(Site::AttnOut);
    assert_eq!(cols, 9 * 64);
    let (_, var, sq) = naive_moments(x, cols);
    let (wsq, wabs) = cols_of(&lw.o.weight);
    let m = stats.get(layer, Site::AttnOut).unwrap();
    assert_eq!(m.n as usize, calib.n * calib.len);
    for (metric, chan) in [
        (
            HeadMetric::Norm,
            (0..cols).map(|j| wsq[j] * sq[j]).collect::<Vec<f64>>(),
        ),
        (
            HeadMetric::WandaSp,
            (0..cols).map(|j| wabs[j] / 576.0 * sq[j].sqrt()).collect(),
        ),
        (
            HeadMetric::Fluctuation,
            (0..cols).map(|j| (var[j] * wsq[j]).powi(2)).collect(),
        ),
    ] {
        let want: Vec<f64> = chan.chunks(hd).map(|c| c.iter().sum()).collect();
        let got = heads::head_sums(&heads::channel_scores(&lw.o.weight, m, metric), hd);
        assert_close(&got, &want, 1e-9, &format!("{metric:?} head scores"));
        // Adaptive: mean of the layer-standardised channel scores.
        let mut s = chan.clone();
        alloc::standardize(&mut s);
        let want: Vec<f64> = s
            .chunks(hd)
            .map(|c| c.iter().sum::<f64>() / hd as f64)
            .collect();
        let got = heads::head_scores(
            &heads::channel_scores(&lw.o.weight, m, metric),
            hd,
            WidthAllocation::Adaptive,
        );
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-9, "{metric:?} adaptive: {a} vs {b}");
        }
    }

    // Neurons.
    let (xin, din) = cap.get(Site::MlpIn);
    let (xd, f) = cap.get(Site::MlpDown);
    assert_eq!((din, f), (576, 1536));
    let (_, _, sq_in) = naive_moments(xin, din);
    let (_, var_d, sq_d) = naive_moments(xd, f);
    let (dsq, dabs) = cols_of(&lw.down.weight);
    let absdot = |w: &Tensor, c: usize| -> f64 {
        (0..din)
            .map(|k| (w.data()[c * din + k] as f64).abs() * sq_in[k].sqrt())
            .sum()
    };
    for (metric, want) in [
        (
            NeuronMetric::Fluctuation,
            (0..f).map(|c| var_d[c] * dsq[c]).collect::<Vec<f64>>(),
        ),
        (
            NeuronMetric::WandaSpDown,
            (0..f).map(|c| dabs[c] / 576.0 * sq_d[c].sqrt()).collect(),
        ),
        (
            NeuronMetric::WandaSp,
            (0..f)
                .map(|c| {
                    absdot(&lw.gate.weight, c) + absdot(&lw.up.weight, c) + dabs[c] * sq_d[c].sqrt()
                })
                .collect(),
        ),
    ] {
        let got = neurons::channel_scores(
            lw,
            stats.get(layer, Site::MlpIn),
            stats.get(layer, Site::MlpDown).unwrap(),
            metric,
        )
        .unwrap();
        assert_close(&got, &want, 1e-9, &format!("{metric:?} channel scores"));
    }
}

#[test]
fn hf_compatible_names_what_transformers_cannot_load() {
    let calib = tiny_calib();
    let dense = tiny("tiny-llama3");
    assert_eq!(hf_compatible(&dense), Ok(()));
    // A layer whose query heads do not split over its KV heads, unlike the others.
    let mut m = copy(&dense);
    lopper::structured::surgery::keep_heads(&mut m.weights.layers[0], 8, &[0, 1, 2], &[0, 1]);
    let why = hf_compatible(&m).unwrap_err();
    assert!(
        why.contains("grouped-query") && why.contains("differ"),
        "{why}"
    );
    // Mistral has no biases at all.
    let mut m = tiny("tiny-mistral");
    assert_eq!(hf_compatible(&m), Ok(()));
    let spec = neuron_spec(
        0.25,
        NeuronMetric::Fluctuation,
        true,
        WidthAllocation::Uniform,
    );
    neurons::prune_neurons(&mut m, &calib, &spec, &mut nop()).unwrap();
    let why = hf_compatible(&m).unwrap_err();
    assert!(why.contains("mistral"), "{why}");
}

#[test]
fn adaptive_neurons_take_the_globally_lowest_standardised_scores() {
    let base = tiny("tiny-llama3");
    let calib = tiny_calib();
    let stats =
        collect_width_stats(&base, &calib, &[Site::MlpIn, Site::MlpDown], &mut nop()).unwrap();
    for metric in [NeuronMetric::Fluctuation, NeuronMetric::WandaSp] {
        // FLAP AL-MM by hand: standardise per layer, one global ranking, lowest 30% go.
        let mut all = vec![];
        for l in 0..3 {
            let lw = &base.weights.layers[l];
            let mut s = neurons::channel_scores(
                lw,
                stats.get(l, Site::MlpIn),
                stats.get(l, Site::MlpDown).unwrap(),
                metric,
            )
            .unwrap();
            alloc::standardize(&mut s);
            all.extend(s.into_iter().enumerate().map(|(c, v)| (v, l, c)));
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut want = vec![vec![]; 3];
        for &(_, l, c) in &all[..144] {
            want[l].push(c);
        }
        want.iter_mut().for_each(|w| w.sort_unstable());
        let mut m = copy(&base);
        let spec = neuron_spec(0.3, metric, false, WidthAllocation::Adaptive);
        let det = neurons::prune_neurons(&mut m, &calib, &spec, &mut nop()).unwrap();
        assert_eq!(usize_lists(&det["removed_channels"]), want, "{metric:?}");
    }
}

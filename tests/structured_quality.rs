//! Structured pruning on the real default model, small and quick (8×128 calibration tokens from
//! c4, perplexity on 2×256 wiki tokens):
//! * blocks chosen by Block Influence / angular distance beat the first blocks and random blocks;
//! * FFN channels chosen by Wanda-sp / fluctuation beat random channels;
//! * FLAP bias compensation lowers the output error on the calibration data (heads and neurons);
//! * statistics collected once serve several steps (`*_with_stats`) and give the same result as
//!   the one-shot functions; statistics of another shape are refused.
//!
//! The three quality checks prune and evaluate the whole model (a minute or more each on 2 busy
//! cores), so they are in the full tier (`#[ignore = "real model"]`); the statistics check stays
//! in the fast tier.
//!
//! Larger figures: `examples/structured_figures.rs`.

mod common;
use common::*;
use lopper::calibrate::{CalibSet, SplitMix64};
use lopper::model::forward::forward_hidden;
use lopper::model::observer::{NoObserver, Site};
use lopper::structured::depth::{self, DepthMetric, DepthSpec, LayerSelection};
use lopper::structured::heads::{self, GqaMode, HeadMetric, HeadSpec};
use lopper::structured::neurons::{self, NeuronMetric, NeuronSpec};
use lopper::structured::stats::{collect_width_stats, WidthStats};
use lopper::structured::{surgery, sync_config, WidthAllocation};
use lopper::Model;
use std::sync::OnceLock;

fn copy(m: &Model) -> Model {
    m.clone()
}

fn calib() -> &'static CalibSet {
    static C: OnceLock<CalibSet> = OnceLock::new();
    C.get_or_init(|| {
        let m = default_model();
        let path = lopper::assets::c4_text().unwrap();
        lopper::calibrate::from_text(m.tokenizer().unwrap(), &path, 8, 128, 0).unwrap()
    })
}

fn stats() -> &'static WidthStats {
    static S: OnceLock<WidthStats> = OnceLock::new();
    S.get_or_init(|| {
        let sites = [Site::AttnOut, Site::MlpIn, Site::MlpDown];
        collect_width_stats(default_model(), calib(), &sites, &mut |_, _, _| {}).unwrap()
    })
}

fn ppl(m: &Model) -> f64 {
    static IDS: OnceLock<(Vec<u32>, std::path::PathBuf)> = OnceLock::new();
    let (ids, path) = IDS.get_or_init(|| {
        let path = lopper::assets::wiki_text().unwrap();
        let text = lopper::text::load_eval_text(&path).unwrap();
        let ids =
            lopper::tokenizer::encode(default_model().tokenizer().unwrap(), &text, &path).unwrap();
        (ids, path)
    });
    lopper::eval::perplexity(m, ids, 256, 2, path, &mut |_, _| {})
        .unwrap()
        .perplexity
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

fn without_layers(list: Vec<usize>) -> Model {
    let mut m = copy(default_model());
    let spec = DepthSpec {
        select: LayerSelection::List(list),
        metric: DepthMetric::BlockInfluence,
        reconstruct: None,
    };
    depth::remove_layers(&mut m, calib(), &spec, &mut |_, _, _| {}).unwrap();
    m
}

#[test]
#[ignore = "real model"]
fn metric_chosen_blocks_beat_first_and_random_blocks() {
    let n = 4;
    let mut baselines = vec![("first".to_string(), ppl(&without_layers((0..n).collect())))];
    for seed in [1u64, 2, 3] {
        let mut r = shuffled(default_model().weights.layers.len(), seed)[..n].to_vec();
        r.sort_unstable();
        baselines.push((format!("random {r:?}"), ppl(&without_layers(r))));
    }
    let dense = ppl(default_model());
    for metric in [DepthMetric::BlockInfluence, DepthMetric::Angular] {
        let mut m = copy(default_model());
        let spec = DepthSpec {
            select: LayerSelection::Count(n),
            metric,
            reconstruct: None,
        };
        let det = depth::remove_layers(&mut m, calib(), &spec, &mut |_, _, _| {}).unwrap();
        let p = ppl(&m);
        eprintln!(
            "{metric:?} removes {}: perplexity {p:.2} (dense {dense:.2}); baselines {baselines:?}",
            det["removed_layers"]
        );
        assert_eq!(m.weights.layers.len(), 30 - n);
        for (name, b) in &baselines {
            assert!(p < *b, "{metric:?} ({p:.2}) does not beat {name} ({b:.2})");
        }
    }
}

#[test]
#[ignore = "real model"]
fn metric_chosen_neurons_beat_random_neurons() {
    let f = 0.3;
    let mut random = vec![];
    for seed in [1u64, 2] {
        let mut m = copy(default_model());
        let mut rng = SplitMix64(seed);
        for lw in &mut m.weights.layers {
            let w = lw.intermediate();
            let k = (f * w as f64).round() as usize;
            let mut keep = shuffled(w, rng.next_u64())[k..].to_vec();
            keep.sort_unstable();
            surgery::keep_channels(lw, &keep);
        }
        sync_config(&mut m);
        random.push(ppl(&m));
    }
    for (metric, bias) in [
        (NeuronMetric::WandaSp, false),
        (NeuronMetric::Fluctuation, true),
    ] {
        let mut m = copy(default_model());
        let spec = NeuronSpec {
            fraction: f,
            metric,
            bias_compensation: bias,
            allocation: WidthAllocation::Uniform,
            reconstruct: None,
        };
        neurons::prune_neurons_with_stats(&mut m, stats(), &spec).unwrap();
        assert_eq!(m.config.intermediate_size, 1536 - 461);
        let p = ppl(&m);
        eprintln!("{metric:?} bias={bias}: perplexity {p:.2}; random {random:?}");
        for r in &random {
            assert!(
                p < *r,
                "{metric:?} ({p:.2}) does not beat random channels ({r:.2})"
            );
        }
    }
}

/// Mean squared difference of the final (normed) hidden states on the calibration windows.
fn calib_error(m: &Model, dense: &[f32]) -> f64 {
    let c = calib();
    let h = forward_hidden(m, &c.ids, c.n, c.len, &mut NoObserver).unwrap();
    h.iter()
        .zip(dense)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / h.len() as f64
}

#[test]
#[ignore = "real model"]
fn bias_compensation_lowers_the_calibration_error() {
    let c = calib();
    let dense = forward_hidden(default_model(), &c.ids, c.n, c.len, &mut NoObserver).unwrap();
    for metric in [NeuronMetric::Fluctuation, NeuronMetric::WandaSp] {
        let err = |bias: bool| {
            let mut m = copy(default_model());
            let spec = NeuronSpec {
                fraction: 0.3,
                metric,
                bias_compensation: bias,
                allocation: WidthAllocation::Uniform,
                reconstruct: None,
            };
            neurons::prune_neurons_with_stats(&mut m, stats(), &spec).unwrap();
            calib_error(&m, &dense)
        };
        let (without, with) = (err(false), err(true));
        eprintln!("neurons {metric:?}: calibration MSE {without:.5} without, {with:.5} with bias compensation");
        assert!(with < without, "neurons {metric:?}: {with} >= {without}");
    }
    for (gqa, f) in [
        (GqaMode::KvGroups, 1.0 / 3.0),
        (GqaMode::PerGroup, 1.0 / 3.0),
    ] {
        let err = |bias: bool| {
            let mut m = copy(default_model());
            let spec = HeadSpec {
                fraction: f,
                metric: HeadMetric::Fluctuation,
                gqa,
                allocation: WidthAllocation::Uniform,
                bias_compensation: bias,
                reconstruct: None,
            };
            heads::prune_heads_with_stats(&mut m, stats(), &spec).unwrap();
            calib_error(&m, &dense)
        };
        let (without, with) = (err(false), err(true));
        eprintln!(
            "heads {gqa:?}: calibration MSE {without:.5} without, {with:.5} with bias compensation"
        );
        assert!(with < without, "heads {gqa:?}: {with} >= {without}");
    }
}

#[test]
fn shared_statistics_equal_one_shot_and_shapes_are_checked() {
    let spec = NeuronSpec {
        fraction: 0.2,
        metric: NeuronMetric::WandaSp,
        bias_compensation: true,
        allocation: WidthAllocation::Adaptive,
        reconstruct: None,
    };
    let mut a = copy(default_model());
    let mut b = copy(default_model());
    let da = neurons::prune_neurons(&mut a, calib(), &spec, &mut |_, _, _| {}).unwrap();
    let db = neurons::prune_neurons_with_stats(&mut b, stats(), &spec).unwrap();
    assert_eq!(da["removed_channels"], db["removed_channels"]);
    // Heads pruned after neurons with the dense model's statistics: o_proj is untouched by
    // neuron pruning, so the statistics still fit.
    let hs = HeadSpec {
        fraction: 1.0 / 3.0,
        metric: HeadMetric::Norm,
        gqa: GqaMode::KvGroups,
        allocation: WidthAllocation::Uniform,
        bias_compensation: false,
        reconstruct: None,
    };
    heads::prune_heads_with_stats(&mut b, stats(), &hs).unwrap();
    assert_eq!(b.config.num_attention_heads, 6);
    // …but now the attention statistics no longer fit the model, and neither do the MLP ones.
    let before = b.weights.num_params();
    let r = heads::prune_heads_with_stats(&mut b, stats(), &hs);
    assert!(
        matches!(r, Err(lopper::Error::Invalid(ref m)) if m.contains("statistics")),
        "{r:?}"
    );
    let r = neurons::prune_neurons_with_stats(&mut b, stats(), &spec);
    assert!(
        matches!(r, Err(lopper::Error::Invalid(ref m)) if m.contains("statistics")),
        "{r:?}"
    );
    assert_eq!(b.weights.num_params(), before);
}

//! `--target-params` search (structured::search) on the tiny golden model: the candidates meet
//! the budget, the chosen one is the best scored, it is exactly what its plan gives when run
//! alone, the input model is untouched, and impossible budgets are refused.

mod common;

use common::*;
use lopper::calibrate::CalibSet;
use lopper::model::forward::forward_logits;
use lopper::structured::depth::{DepthMetric, DepthSpec, LayerSelection};
use lopper::structured::neurons::{NeuronMetric, NeuronSpec};
use lopper::structured::plan::{run_plan, Plan, Step};
use lopper::structured::search::{self, TargetSpec};
use lopper::structured::WidthAllocation;
use lopper::Model;

fn tiny() -> Model {
    lopper::io::load_model(&golden().join("tiny").join("tiny-llama3")).unwrap()
}

fn calib() -> CalibSet {
    random_calib(5, 6, 32, 320)
}

fn logits(m: &Model) -> Vec<f32> {
    let ids: Vec<u32> = (0..24).map(|i| (i * 13 % 320) as u32).collect();
    forward_logits(m, &ids).unwrap()
}

#[test]
fn candidates_split_the_budget_and_refuse_impossible_targets() {
    let m = tiny();
    let spec = TargetSpec::new(0.5);
    let c = search::candidates(&m, &spec).unwrap();
    assert_eq!(c.len(), spec.depth_shares.len());
    // Depth grows with the share; the neuron fraction shrinks to keep the budget.
    for w in c.windows(2) {
        assert!(w[1].0.layers >= w[0].0.layers);
        assert!(w[1].0.neuron_fraction <= w[0].0.neuron_fraction + 1e-12);
    }
    assert!(c.iter().any(|(k, p)| k.layers == 1 && p.is_some()));
    // Shares giving the same block count are run once.
    let run: Vec<usize> = c
        .iter()
        .filter(|(_, p)| p.is_some())
        .map(|(k, _)| k.layers)
        .collect();
    let mut dedup = run.clone();
    dedup.dedup();
    assert_eq!(run, dedup);
    for bad in [0.0, -0.1, 0.9, 1.5, f64::NAN] {
        let e = search::candidates(&m, &TargetSpec::new(bad)).unwrap_err();
        assert!(e.to_string().contains("--target-params"), "{e}");
    }
    // 85% cannot be met by blocks (one must stay) plus < 90% of the FFN channels.
    let e = search::candidates(&m, &TargetSpec::new(0.85)).unwrap_err();
    assert!(e.to_string().contains("no mix"), "{e}");
}

#[test]
fn search_keeps_the_best_candidate_and_leaves_the_input_alone() {
    let m = tiny();
    let before = logits(&m);
    let params = m.weights.num_params();
    let cal = calib();
    let spec = TargetSpec::new(0.5);
    let out = search::search(&m, &cal, &spec, &mut |_, _, _| {}).unwrap();
    assert_eq!(logits(&m), before, "the input model changed");
    assert_eq!(m.weights.num_params(), params);

    let scored: Vec<(usize, f64)> = out
        .candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.calib_perplexity.map(|p| (i, p)))
        .collect();
    assert!(scored.len() >= 2, "{:?}", out.candidates);
    let best = scored.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(out.chosen, best.0);
    for c in out.candidates.iter().filter(|c| c.skipped.is_none()) {
        let r = c.params_removed_fraction.unwrap();
        assert!((r - 0.5).abs() < 0.02, "candidate removed {r}");
    }
    // The kept model is the chosen plan's result and scores what the report says.
    let got = search::calib_perplexity(&out.model, &cal, spec.score_windows).unwrap();
    assert_eq!(got, best.1);
    let c = &out.candidates[out.chosen];
    let mut steps = Vec::new();
    if c.layers > 0 {
        steps.push(Step::Layers(DepthSpec {
            select: LayerSelection::Count(c.layers),
            metric: DepthMetric::BlockInfluence,
            reconstruct: None,
        }));
    }
    steps.push(Step::Neurons(NeuronSpec {
        fraction: c.neuron_fraction,
        metric: NeuronMetric::Fluctuation,
        bias_compensation: true,
        allocation: WidthAllocation::Uniform,
        reconstruct: None,
    }));
    let mut again = m.clone();
    run_plan(
        &mut again,
        &cal,
        &Plan { steps },
        &mut |_, _| Ok(None),
        &mut |_, _, _| {},
    )
    .unwrap();
    assert_eq!(logits(&again), logits(&out.model));
    assert_eq!(out.records.len(), c.steps.len());
}

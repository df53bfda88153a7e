//! Pruning the newer families (tiny models of ../shared/golden/tiny): experts pruned from the
//! statistics of the tokens routed to them, unreached experts reported, and every step either
//! working on a family or refused before any work.

mod common;
use common::*;
use lopper::model::observer::{Observer, Site};
use lopper::prune::stats::SiteStats;
use lopper::prune::{Method, Needs, Pattern, PrunePlan, Pruner, Target};
use lopper::{LinearKind, Model};
use std::sync::Mutex;

fn tiny(name: &str) -> Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).unwrap()
}

/// Wanda that records how many tokens each tensor's statistics counted.
struct Recording {
    seen: Mutex<Vec<(String, usize)>>,
}

impl Pruner for Recording {
    fn needs(&self) -> Needs {
        lopper::prune::wanda::Wanda.needs()
    }
    fn prune(
        &self,
        w: &mut [f32],
        rows: usize,
        cols: usize,
        stats: &SiteStats,
        target: Target,
        name: &str,
    ) -> lopper::Result<()> {
        self.seen
            .lock()
            .unwrap()
            .push((name.to_string(), stats.tokens));
        lopper::prune::wanda::Wanda.prune(w, rows, cols, stats, target, name)
    }
}

/// The MLP inputs of block 0 (the router's input) in a plain forward pass.
struct MlpIn(Vec<f32>);
impl Observer for MlpIn {
    fn wants_linear_inputs(&self, layer: usize) -> bool {
        layer == 0
    }
    fn linear_input(&mut self, layer: usize, site: Site, x: &[f32], _: usize, _: usize) {
        if layer == 0 && site == Site::MlpIn {
            self.0 = x.to_vec();
        }
    }
}

#[test]
fn expert_statistics_count_only_routed_tokens() {
    for name in ["tiny-qwen3-moe", "tiny-mixtral"] {
        let mut m = tiny(name);
        let calib = random_calib(3, 4, 32, m.config.vocab_size as u64);
        // Routing of block 0 from an independent forward pass.
        let mut obs = MlpIn(Vec::new());
        lopper::model::forward::forward_hidden(&m, &calib.ids, calib.n, calib.len, &mut obs)
            .unwrap();
        let moe = m.weights.layers[0].extra.moe.as_ref().unwrap();
        let mc = m.config.family.moe.clone().unwrap();
        let routes = lopper::model::moe::routes(moe, &mc, &obs.0, calib.n * calib.len);
        let mut want = vec![0usize; moe.experts.len()];
        routes
            .iter()
            .flat_map(|r| &r.experts)
            .for_each(|&e| want[e] += 1);

        let rec = Recording {
            seen: Mutex::new(Vec::new()),
        };
        let plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
        let out =
            lopper::prune::driver::prune_model_with(&mut m, &calib, &plan, &rec, &mut |_, _, _| {})
                .unwrap();
        let seen = rec.seen.into_inner().unwrap();
        for (e, &n) in want.iter().enumerate() {
            for kind in [LinearKind::Gate, LinearKind::Up, LinearKind::Down] {
                let t = lopper::prune::experts::expert_tensor_name(m.config.arch, 0, e, kind);
                let got = seen.iter().find(|(s, _)| *s == t).map(|x| x.1);
                if n > 0 {
                    assert_eq!(got, Some(n), "{name}: {t}");
                }
            }
        }
        let rep = out.experts.expect("an expert report");
        assert_eq!(rep.tokens[0], want, "{name}: tokens per expert");
        for toks in &rep.tokens {
            assert_eq!(toks.iter().sum::<usize>(), calib.n * calib.len * mc.top_k);
        }
        // Every expert linear and attention linear reached is at 50%.
        for t in &out.tensors {
            assert!(
                (t.sparsity - 0.5).abs() < 1e-3,
                "{name}: {} at {}",
                t.name,
                t.sparsity
            );
        }
        let experts = out
            .tensors
            .iter()
            .filter(|t| t.name.contains("experts"))
            .count();
        assert_eq!(experts, 3 * 8 * 3, "{name}: every expert linear pruned");
        // Still a working model.
        let l = lopper::model::forward::forward_logits(&m, &calib.ids[..32]).unwrap();
        assert!(l.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn experts_no_token_reached_are_reported_and_pruned_by_magnitude() {
    let mut m = tiny("tiny-qwen3-moe");
    let dense = m.clone();
    // Two tokens reach at most four of the eight experts of a block.
    let calib = random_calib(5, 1, 2, m.config.vocab_size as u64);
    let plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    let out = lopper::prune::prune_model(&mut m, &calib, &plan, &mut |_, _, _| {}).unwrap();
    let rep = out.experts.unwrap();
    let unreached: Vec<(usize, usize)> = rep
        .tokens
        .iter()
        .enumerate()
        .flat_map(|(l, t)| {
            t.iter()
                .enumerate()
                .filter(|(_, &n)| n == 0)
                .map(move |(e, _)| (l, e))
        })
        .collect();
    assert!(unreached.len() >= 3 * 4, "{unreached:?}");
    assert_eq!(rep.unreached, unreached);
    // An unreached expert is pruned by magnitude: its smallest half is gone.
    let (l, e) = unreached[0];
    let before = &dense.weights.layers[l].extra.moe.as_ref().unwrap().experts[e]
        .up
        .weight;
    let after = &m.weights.layers[l].extra.moe.as_ref().unwrap().experts[e]
        .up
        .weight;
    let mut mags: Vec<f32> = before.data().iter().map(|v| v.abs()).collect();
    mags.sort_by(f32::total_cmp);
    let cut = mags[mags.len() / 2];
    for (a, b) in after.data().iter().zip(before.data()) {
        assert!(*a == 0.0 || b.abs() >= cut);
    }
}

#[test]
fn moe_refuses_what_is_not_implemented_before_any_work() {
    let mut m = tiny("tiny-mixtral");
    let before = m.weights.layers[0].q.weight.data().to_vec();
    let calib = random_calib(1, 1, 8, m.config.vocab_size as u64);
    let mut plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    plan.allocation = lopper::prune::owl::Allocation::Owl {
        m: 5.0,
        lambda: 0.08,
    };
    let e = lopper::prune::prune_model(&mut m, &calib, &plan, &mut |_, _, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("OWL") && e.contains("mixtral"), "{e}");
    assert_eq!(m.weights.layers[0].q.weight.data(), &before[..]);
}

/// Every structured step on every new family either runs (and the result saves as an HF
/// directory that loads back to the same logits) or is refused before any work.
#[test]
fn every_step_works_or_is_refused_up_front() {
    let steps: [(&str, &str); 10] = [
        ("layers", "kind = \"layers\"\nremove = 1"),
        ("heads", "kind = \"heads\"\nfraction = 0.25"),
        (
            "heads+bias",
            "kind = \"heads\"\nfraction = 0.25\nbias_compensation = true",
        ),
        ("neurons", "kind = \"neurons\"\nfraction = 0.25"),
        (
            "neurons+bias",
            "kind = \"neurons\"\nfraction = 0.25\nbias_compensation = true",
        ),
        ("slice", "kind = \"slice\"\nfraction = 0.25"),
        ("low_rank", "kind = \"low_rank\"\nparam_fraction = 0.3"),
        (
            "low_rank o,down",
            "kind = \"low_rank\"\nparam_fraction = 0.3\nmodules = \"o\"",
        ),
        (
            "sparse",
            "kind = \"sparse\"\nmethod = \"wanda\"\nsparsity = 0.5",
        ),
        (
            "sparse 2:4",
            "kind = \"sparse\"\nmethod = \"sparsegpt\"\npattern = \"2:4\"",
        ),
    ];
    // What each family refuses (every other step must work).
    let refused: [(&str, &[&str]); 5] = [
        ("tiny-qwen3", &["neurons+bias", "slice"]),
        (
            "tiny-phi3",
            &["heads+bias", "neurons+bias", "slice", "low_rank"],
        ),
        ("tiny-gemma3", &["neurons+bias", "slice"]),
        (
            "tiny-mixtral",
            &["heads+bias", "neurons", "neurons+bias", "slice", "low_rank"],
        ),
        (
            "tiny-qwen3-moe",
            &["neurons", "neurons+bias", "slice", "low_rank"],
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (name, no) in refused {
        for (label, toml) in steps {
            let mut m = tiny(name);
            let calib = random_calib(2, 4, 32, m.config.vocab_size as u64);
            let plan = lopper::structured::plan::parse_plan(
                &format!("[[step]]\n{toml}\n"),
                std::path::Path::new("plan.toml"),
            )
            .unwrap();
            let before = m.weights.layers[0].q.weight.data().to_vec();
            let r = lopper::structured::plan::run_plan(
                &mut m,
                &calib,
                &plan,
                &mut |_, _| Ok(None),
                &mut |_, _, _| {},
            );
            if no.contains(&label) {
                let e = r
                    .err()
                    .unwrap_or_else(|| panic!("{name} {label}: not refused"));
                assert!(
                    matches!(e, lopper::Error::Invalid(_)),
                    "{name} {label}: {e}"
                );
                assert!(e.to_string().contains(m.config.arch.model_type()), "{e}");
                assert_eq!(
                    m.weights.layers[0].q.weight.data(),
                    &before[..],
                    "{name} {label}"
                );
                continue;
            }
            r.unwrap_or_else(|e| panic!("{name} {label}: {e}"));
            let out = tmp.path().join(format!(
                "{name}-{}",
                label.replace([' ', '+', ':', ','], "_")
            ));
            lopper::io::save::save_hf(&m, &out, lopper::io::save::SaveDtype::F32, false)
                .unwrap_or_else(|e| panic!("{name} {label}: save: {e}"));
            let back =
                lopper::io::load_model(&out).unwrap_or_else(|e| panic!("{name} {label}: {e}"));
            let ids = &calib.ids[..32];
            let a = lopper::model::forward::forward_logits(&m, ids).unwrap();
            let b = lopper::model::forward::forward_logits(&back, ids).unwrap();
            let scale = a.iter().fold(0f32, |x, v| x.max(v.abs()));
            let d = a
                .iter()
                .zip(&b)
                .fold(0f32, |x, (p, q)| x.max((p - q).abs()));
            assert!(
                d <= 1e-5 * scale,
                "{name} {label}: reloaded logits differ by {d}"
            );
        }
    }
}

/// REAP expert removal: 0 removes nothing (bit-identical logits); removing experts drops the
/// lowest scores of every block, shrinks the router, and the result saves and reloads.
#[test]
fn reap_expert_removal_is_identity_at_zero_and_follows_the_scores() {
    let calib = random_calib(9, 4, 32, 320);
    let ids = &calib.ids[..32];
    let mut m = tiny("tiny-qwen3-moe");
    let dense = lopper::model::forward::forward_logits(&m, ids).unwrap();
    let rep = lopper::prune::reap::remove_experts(&mut m, &calib, 0.0).unwrap();
    assert!(rep.iter().all(|l| l.removed.is_empty()));
    assert_eq!(
        lopper::model::forward::forward_logits(&m, ids).unwrap(),
        dense
    );

    let rep = lopper::prune::reap::remove_experts(&mut m, &calib, 0.25).unwrap();
    assert_eq!(rep.len(), 3);
    for (l, r) in rep.iter().enumerate() {
        assert_eq!(r.removed.len(), 2);
        let worst_kept = (0..8)
            .filter(|e| !r.removed.contains(e))
            .map(|e| r.scores[e])
            .fold(f64::INFINITY, f64::min);
        for &e in &r.removed {
            assert!(
                r.scores[e] <= worst_kept,
                "layer {l}: removed expert {e} scores above a kept one"
            );
        }
        let moe = m.weights.layers[l].extra.moe.as_ref().unwrap();
        assert_eq!((moe.experts.len(), moe.router.rows()), (6, 6));
    }
    assert_eq!(m.config.family.moe.as_ref().unwrap().num_experts, 6);
    let tmp = tempfile::tempdir().unwrap();
    lopper::io::save::save_hf(
        &m,
        &tmp.path().join("o"),
        lopper::io::save::SaveDtype::F32,
        false,
    )
    .unwrap();
    let back = lopper::io::load_model(&tmp.path().join("o")).unwrap();
    let a = lopper::model::forward::forward_logits(&m, ids).unwrap();
    assert_eq!(
        lopper::model::forward::forward_logits(&back, ids).unwrap(),
        a
    );
    assert_ne!(a, dense);
    // Not a mixture, or too few experts left for top-k: refused.
    let mut q = tiny("tiny-qwen3");
    assert!(lopper::prune::reap::remove_experts(&mut q, &calib, 0.5).is_err());
    let mut x = tiny("tiny-mixtral");
    assert!(lopper::prune::reap::remove_experts(&mut x, &calib, 0.9).is_err());
}

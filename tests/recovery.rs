//! Recovery without training (`lopper::recover`, `lopper::prune::ria`): every solver and
//! refiner against a naive reference on small random matrices, and the whole pipeline on the
//! tiny random llama3 model with random calibration ids. Fast (well under a minute).

mod common;

use common::{golden, random_calib};
use lopper::calibrate::{CalibSet, SplitMix64};
use lopper::model::observer::Site;
use lopper::prune::{driver, Method, Pattern, PrunePlan, SiteStats};
use lopper::recover::{permute, reconstruct, swaps, ReconOptions, Recovery, Refine};
use lopper::Model;

fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2001) as f32 - 1000.0) / 500.0)
        .collect()
}

/// A random positive definite Gram matrix `XᵀX` of `rows` random rows.
fn rand_gram(rng: &mut SplitMix64, rows: usize, cols: usize) -> (Vec<f32>, Vec<f64>) {
    let x = rand_vec(rng, rows * cols);
    let mut g = vec![0f64; cols * cols];
    for t in 0..rows {
        for i in 0..cols {
            for j in 0..cols {
                g[i * cols + j] += x[t * cols + i] as f64 * x[t * cols + j] as f64;
            }
        }
    }
    (x, g)
}

fn tiny_model() -> Model {
    lopper::io::load_model(&golden().join("tiny").join("tiny-llama3")).expect("load tiny-llama3")
}

fn tiny_calib(seed: u64) -> CalibSet {
    random_calib(seed, 8, 32, 320)
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn ria_scores_match_the_naive_formula() {
    let mut rng = SplitMix64(1);
    for (rows, cols, alpha) in [(7, 12, 0.5), (16, 8, 1.0), (3, 40, 0.0)] {
        let mut w = rand_vec(&mut rng, rows * cols);
        w[3] = 0.0; // zeros are allowed
        let norm: Vec<f32> = rand_vec(&mut rng, cols).iter().map(|v| v.abs()).collect();
        let fast = lopper::prune::ria::scores_with_norm(&w, cols, &norm, alpha);
        let naive = lopper::prune::ria::scores_naive(&w, rows, cols, &norm, alpha);
        for (a, b) in fast.iter().zip(&naive) {
            assert!(close(*a as f64, *b as f64, 1e-5), "{a} vs {b}");
        }
    }
}

#[test]
fn ria_prunes_the_lowest_scores_per_row_for_every_pattern() {
    use lopper::prune::{Pruner, Scope, Target};
    let mut rng = SplitMix64(2);
    let (rows, cols) = (8, 16);
    let w0 = rand_vec(&mut rng, rows * cols);
    let col_sq: Vec<f64> = rand_vec(&mut rng, cols)
        .iter()
        .map(|v| (v * v) as f64)
        .collect();
    let stats = SiteStats::from_sums(cols, 1, 4, Some(col_sq.clone()), None);
    let norm: Vec<f32> = col_sq.iter().map(|v| v.sqrt() as f32).collect();
    let scores = lopper::prune::ria::scores_naive(&w0, rows, cols, &norm, 0.5);
    for pattern in [
        Pattern::Unstructured,
        Pattern::NM { n: 2, m: 4 },
        Pattern::Vector { v: 4 },
        Pattern::Block { r: 2, c: 4 },
    ] {
        let mut w = w0.clone();
        let ria = lopper::prune::ria::Ria { alpha: 0.5 };
        ria.prune(
            &mut w,
            rows,
            cols,
            &stats,
            Target {
                sparsity: 0.5,
                pattern,
            },
            "t",
        )
        .unwrap();
        let want = lopper::prune::mask::select(&scores, rows, cols, pattern, 0.5, Scope::Row, "t")
            .unwrap();
        for (k, (&v, &m)) in w.iter().zip(&want).enumerate() {
            assert_eq!(v == 0.0, m, "{pattern}: element {k}");
        }
    }
}

#[test]
fn permutation_keeps_at_least_the_identity_score_and_is_a_permutation() {
    let mut rng = SplitMix64(3);
    let (rows, cols) = (6, 32);
    // Important channels crowded together: the permutation must help.
    let mut s: Vec<f32> = rand_vec(&mut rng, rows * cols)
        .iter()
        .map(|v| v.abs())
        .collect();
    for r in 0..rows {
        for c in 0..4 {
            s[r * cols + c] += 10.0;
        }
    }
    let perm = permute::choose(&s, cols, 2, 4, 2000);
    let mut sorted = perm.clone();
    sorted.sort();
    assert_eq!(sorted, (0..cols).collect::<Vec<_>>());
    let id: Vec<usize> = (0..cols).collect();
    let (k_id, k_p) = (
        permute::kept_score(&s, cols, 2, 4, &id),
        permute::kept_score(&s, cols, 2, 4, &perm),
    );
    assert!(k_p > k_id + 10.0, "permuted {k_p} vs identity {k_id}");
}

#[test]
fn permuted_stats_follow_the_channels() {
    let mut rng = SplitMix64(4);
    let cols = 6;
    let (_, g) = rand_gram(&mut rng, 10, cols);
    let col_sq: Vec<f64> = (0..cols).map(|j| g[j * cols + j]).collect();
    let st = SiteStats::from_sums(cols, 1, 10, Some(col_sq), Some(g.clone()));
    let perm = vec![3, 0, 5, 1, 2, 4];
    let p = permute::permute_stats(&st, &perm);
    let h = p.hessian().unwrap();
    let h0 = st.hessian().unwrap();
    for a in 0..cols {
        assert_eq!(p.col_sq.as_ref().unwrap()[a], g[perm[a] * cols + perm[a]]);
        for b in 0..cols {
            assert_eq!(h[a * cols + b], h0[perm[a] * cols + perm[b]]);
        }
    }
}

#[test]
fn a_permuted_but_unpruned_model_gives_the_same_logits() {
    let model = tiny_model();
    let ids: Vec<u32> = tiny_calib(5).ids[..32].to_vec();
    let before = lopper::model::forward::forward_logits(&model, &ids).unwrap();
    let mut permuted = model.clone();
    let inter = permuted.weights.layers[0].down.in_features();
    let mut rng = SplitMix64(6);
    for layer in permuted.weights.layers.iter_mut() {
        let mut perm: Vec<usize> = (0..inter).collect();
        for i in (1..inter).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        permute::apply_to_mlp(layer, &perm);
    }
    assert_ne!(
        permuted.weights.layers[0].down.weight.data(),
        model.weights.layers[0].down.weight.data()
    );
    let after = lopper::model::forward::forward_logits(&permuted, &ids).unwrap();
    let scale = before.iter().map(|v| v.abs()).fold(0f32, f32::max);
    for (a, b) in before.iter().zip(&after) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

#[test]
fn swaps_pick_the_naive_best_pair_and_lower_the_error() {
    let mut rng = SplitMix64(7);
    for (group, cols) in [(None, 12), (Some(4), 16)] {
        let rows = 5;
        let (_, g) = rand_gram(&mut rng, 40, cols);
        let w0 = rand_vec(&mut rng, rows * cols);
        // A deliberately poor mask: magnitude-free, the first half of each row/group pruned.
        let mut w = w0.clone();
        for r in 0..rows {
            for j in 0..cols {
                let pruned = match group {
                    Some(m) => j % m < m / 2,
                    None => j < cols / 2,
                };
                if pruned {
                    w[r * cols + j] = 0.0;
                }
            }
        }
        // One swap per row equals the exhaustive search (6 and 2 candidates per side fit
        // within the candidate budget).
        let mut one = w.clone();
        let (b1, a1, _, n1) = swaps::refine(&mut one, &w0, rows, cols, &g, group, 1);
        assert!(n1 >= 1 && a1 < b1);
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            let w0r = &w0[r * cols..(r + 1) * cols];
            let got = &one[r * cols..(r + 1) * cols];
            match swaps::best_swap_naive(row, w0r, &g, group) {
                None => assert_eq!(got, row),
                Some((_, i, j)) => {
                    assert_eq!(got[i], w0r[i], "row {r}: restored {i}");
                    assert_eq!(got[j], 0.0, "row {r}: pruned {j}");
                }
            }
        }
        // To convergence: the reported errors are the naive ones, and fall.
        let mut full = w.clone();
        let (b, a, _, n) = swaps::refine(&mut full, &w0, rows, cols, &g, group, 1000);
        assert!(close(b, swaps::error_naive(&w, &w0, cols, &g), 1e-9));
        assert!(close(a, swaps::error_naive(&full, &w0, cols, &g), 1e-9));
        assert!(a < b && n > 0);
        // Counts per row / group unchanged.
        let unit = group.unwrap_or(cols);
        for (x, y) in w.chunks(unit).zip(full.chunks(unit)) {
            let z = |s: &[f32]| s.iter().filter(|v| **v == 0.0).count();
            assert_eq!(z(x), z(y));
        }
        // No single swap helps any more.
        for r in 0..rows {
            let best = swaps::best_swap_naive(
                &full[r * cols..(r + 1) * cols],
                &w0[r * cols..(r + 1) * cols],
                &g,
                group,
            );
            if group.is_some() {
                assert!(best.is_none(), "row {r}: {best:?}");
            }
        }
    }
}

#[test]
fn cross_product_matches_naive() {
    let mut rng = SplitMix64(8);
    for (rows, cp, cd) in [(37, 5, 9), (300, 64, 64), (1, 3, 2)] {
        let xp = rand_vec(&mut rng, rows * cp);
        let xd = rand_vec(&mut rng, rows * cd);
        let mut a = vec![0f32; cp * cd];
        let mut b = vec![0f32; cp * cd];
        reconstruct::cross_t(&xp, &xd, rows, cp, cd, &mut a);
        reconstruct::cross_t_naive(&xp, &xd, rows, cp, cd, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!(close(*x as f64, *y as f64, 1e-4), "{x} vs {y}");
        }
    }
}

/// Random reconstruction statistics: pruned inputs are noisy dense inputs.
fn rand_recon(rng: &mut SplitMix64, tokens: usize, cols: usize) -> reconstruct::ReconStats {
    let xd = rand_vec(rng, tokens * cols);
    let noise = rand_vec(rng, tokens * cols);
    let xp: Vec<f32> = xd.iter().zip(&noise).map(|(a, b)| a + 0.3 * b).collect();
    let prod = |a: &[f32], b: &[f32]| {
        let mut m = vec![0f64; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                for j in 0..cols {
                    m[i * cols + j] += a[t * cols + i] as f64 * b[t * cols + j] as f64;
                }
            }
        }
        m
    };
    reconstruct::ReconStats::from_parts(cols, prod(&xp, &xp), prod(&xp, &xd), prod(&xd, &xd))
}

#[test]
fn refit_solves_the_damped_normal_equations_on_kept_inputs() {
    let mut rng = SplitMix64(9);
    let (rows, cols) = (6, 16);
    let st = rand_recon(&mut rng, 64, cols);
    let w0 = rand_vec(&mut rng, rows * cols);
    let mut w = w0.clone();
    for (k, v) in w.iter_mut().enumerate() {
        if (k / 2) % 2 == 0 {
            *v = 0.0; // 2:4-like mask
        }
    }
    let mask: Vec<bool> = w.iter().map(|v| *v == 0.0).collect();
    let mut fit = w.clone();
    let out = reconstruct::refit(&mut fit, &w0, rows, cols, &st, 0.01, "t").unwrap();
    assert!(out.rel_error_after < out.rel_error_before, "{out:?}");
    assert_eq!(out.rows_kept, 0);
    for r in 0..rows {
        let want = reconstruct::refit_row_naive(
            &w[r * cols..(r + 1) * cols],
            &w0[r * cols..(r + 1) * cols],
            &st,
            0.01,
        );
        for j in 0..cols {
            let got = fit[r * cols + j];
            assert_eq!(got == 0.0, mask[r * cols + j], "pattern kept at {r},{j}");
            assert!(
                close(got as f64, want[j] as f64, 1e-4),
                "{r},{j}: {got} vs {}",
                want[j]
            );
        }
    }
}

#[test]
fn refit_damps_a_singular_gram_more_and_names_the_layer_on_nan() {
    let mut rng = SplitMix64(10);
    let (rows, cols) = (3, 8);
    let mut st = rand_recon(&mut rng, 64, cols);
    // A dead input (no damping asked): its weight stays where it was.
    for j in 0..cols {
        st.gp[2 * cols + j] = 0.0;
        st.gp[j * cols + 2] = 0.0;
        st.cross[2 * cols + j] = 0.0;
    }
    let w0 = rand_vec(&mut rng, rows * cols);
    let mut w = w0.clone();
    let out = reconstruct::refit(&mut w, &w0, rows, cols, &st, 0.0, "layer.x").unwrap();
    assert!(w.iter().all(|v| v.is_finite()), "{out:?}");
    for r in 0..rows {
        assert!(
            (w[r * cols + 2] - w0[r * cols + 2]).abs() < 1e-4,
            "dead input moved"
        );
    }
    // A Gram matrix that is not positive semi-definite (rounding can do that): damped more.
    st.gp[3 * cols + 3] = -1.0;
    let mut w = w0.clone();
    let out = reconstruct::refit(&mut w, &w0, rows, cols, &st, 0.0, "layer.x").unwrap();
    assert!(out.rows_damped_more > 0 && out.damping > 0.0, "{out:?}");
    assert!(w.iter().all(|v| v.is_finite()));
    st.gp[0] = f64::NAN;
    let mut w = w0.clone();
    let e = reconstruct::refit(
        &mut w,
        &w0,
        rows,
        cols,
        &st,
        0.01,
        "model.layers.7.mlp.down_proj.weight",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.layers.7.mlp.down_proj.weight"), "{e}");
}

/// Mean squared difference of the final logits of `a` and `b` on `ids`.
fn logit_mse(a: &Model, b: &Model, ids: &[u32]) -> f64 {
    let la = lopper::model::forward::forward_logits(a, ids).unwrap();
    let lb = lopper::model::forward::forward_logits(b, ids).unwrap();
    la.iter()
        .zip(&lb)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / la.len() as f64
}

fn prune_tiny(plan: &PrunePlan) -> (Model, driver::PruneOutcome) {
    let mut m = tiny_model();
    let out = driver::prune_model(&mut m, &tiny_calib(11), plan, &mut |_, _, _| {}).unwrap();
    (m, out)
}

#[test]
fn reconstruction_lowers_the_output_error_on_tiny_llama3() {
    let dense = tiny_model();
    let calib = tiny_calib(11);
    use lopper::recover::ReconTarget;
    for (pattern, target) in [
        (Pattern::Unstructured, ReconTarget::Pruned),
        (Pattern::NM { n: 2, m: 4 }, ReconTarget::Pruned),
        (Pattern::Unstructured, ReconTarget::Dense),
    ] {
        let plan = PrunePlan::new(
            Method::Wanda,
            pattern,
            pattern.implied_sparsity().unwrap_or(0.5),
        );
        let (plain, _) = prune_tiny(&plan);
        let mut rplan = plan.clone();
        rplan.recovery.reconstruct = Some(ReconOptions {
            target,
            ..Default::default()
        });
        let (rec, out) = prune_tiny(&rplan);
        let rep = out.recovery.expect("recovery report");
        assert_eq!(rep.reconstruction.len(), 3 * 7);
        for f in &rep.reconstruction {
            assert!(f.rel_error_after <= f.rel_error_before + 1e-12, "{f:?}");
        }
        // Block 0 keeps its mask exactly (later blocks see other inputs, so Wanda picks other
        // masks); every block keeps the zero count per row.
        let zeros = |s: &[f32]| s.iter().filter(|v| **v == 0.0).count();
        for (i, (l0, l1)) in plain
            .weights
            .layers
            .iter()
            .zip(&rec.weights.layers)
            .enumerate()
        {
            for k in lopper::LinearKind::ALL {
                let (a, b) = (l0.linear(k).weight.data(), l1.linear(k).weight.data());
                if i == 0 {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| (*x == 0.0) == (*y == 0.0)),
                        "{pattern} {k:?}"
                    );
                }
                let cols = l0.linear(k).in_features();
                for (x, y) in a.chunks(cols).zip(b.chunks(cols)) {
                    assert_eq!(zeros(x), zeros(y), "{pattern} block {i} {k:?}");
                }
            }
        }
        // On the calibration windows the reconstructed model is closer to the dense one.
        let ids = &calib.ids[..calib.len];
        let (e_plain, e_rec) = (logit_mse(&dense, &plain, ids), logit_mse(&dense, &rec, ids));
        assert!(
            e_rec < e_plain,
            "{pattern} {target:?}: reconstructed {e_rec} vs plain {e_plain}"
        );
    }
}

#[test]
fn swaps_and_permutation_run_in_the_driver() {
    let mut plan = PrunePlan::new(Method::Ria, Pattern::NM { n: 2, m: 4 }, 0.5);
    plan.recovery = Recovery {
        permute: true,
        refine: Some(Refine::Swaps),
        refine_iters: 20,
        ..Default::default()
    };
    let (m, out) = prune_tiny(&plan);
    let rep = out.recovery.expect("recovery report");
    assert_eq!(rep.swaps.len(), 3 * 7);
    assert!(rep
        .swaps
        .iter()
        .all(|s| s.rel_error_after <= s.rel_error_before));
    assert!(rep.swaps.iter().any(|s| s.swaps > 0));
    assert_eq!(rep.permuted.len(), 3);
    assert!(rep
        .permuted
        .iter()
        .all(|p| p.kept_score_permuted >= p.kept_score_identity));
    // Still 2:4 everywhere.
    for l in &m.weights.layers {
        for k in lopper::LinearKind::ALL {
            let lin = l.linear(k);
            for g in lin.weight.data().chunks(4) {
                assert!(g.iter().filter(|v| **v != 0.0).count() <= 2);
            }
        }
    }
    // Sites not permuted are reported.
    assert!(!rep.unpermuted.is_empty());
    let _ = Site::MlpDown;
}

#[test]
fn bad_recovery_options_are_refused() {
    let model = tiny_model();
    let mut plan = PrunePlan::new(Method::Ria, Pattern::Unstructured, 0.5);
    plan.recovery.permute = true;
    let e = plan.validate(&model).unwrap_err().to_string();
    assert!(e.contains("--permute") && e.contains("N:M"), "{e}");
    let mut plan = PrunePlan::new(Method::Wanda, Pattern::Block { r: 2, c: 2 }, 0.5);
    plan.recovery.refine = Some(Refine::Swaps);
    plan.recovery.refine_iters = 5;
    assert!(plan.validate(&model).is_err());
    let mut plan = PrunePlan::new(Method::Wanda, Pattern::Unstructured, 0.5);
    plan.recovery.reconstruct = Some(ReconOptions {
        damp: -1.0,
        rounds: 1,
        samples: 0,
        target: Default::default(),
    });
    assert!(plan.validate(&model).is_err());
}

/// Width reconstruction re-fits o_proj after heads and down_proj after neurons: the same
/// channels go, every block's fit lowers its own output error, and on the calibration window the
/// model is closer to the dense one than with no compensation or FLAP's bias compensation.
#[test]
fn width_reconstruction_beats_bias_compensation_on_tiny_llama3() {
    use lopper::structured::heads::{prune_heads, GqaMode, HeadMetric, HeadSpec};
    use lopper::structured::neurons::{prune_neurons, NeuronMetric, NeuronSpec};
    use lopper::structured::WidthAllocation;
    let dense = tiny_model();
    let calib = tiny_calib(5);
    let ids = &calib.ids[..calib.len];
    for heads in [true, false] {
        let run = |bias: bool, recon: bool| -> (Model, serde_json::Value) {
            let mut m = tiny_model();
            let d = if heads {
                let spec = HeadSpec {
                    fraction: 0.5,
                    metric: HeadMetric::Norm,
                    gqa: GqaMode::KvGroups,
                    allocation: WidthAllocation::Uniform,
                    bias_compensation: bias,
                    reconstruct: recon.then(ReconOptions::default),
                };
                prune_heads(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap()
            } else {
                let spec = NeuronSpec {
                    fraction: 0.5,
                    metric: NeuronMetric::WandaSp,
                    bias_compensation: bias,
                    allocation: WidthAllocation::Uniform,
                    reconstruct: recon.then(ReconOptions::default),
                };
                prune_neurons(&mut m, &calib, &spec, &mut |_, _, _| {}).unwrap()
            };
            (m, d)
        };
        let (plain, _) = run(false, false);
        let (comp, _) = run(true, false);
        let (rec, details) = run(false, true);
        let kind = if heads {
            lopper::LinearKind::O
        } else {
            lopper::LinearKind::Down
        };
        for (a, b) in plain.weights.layers.iter().zip(&rec.weights.layers) {
            assert_eq!(a.linear(kind).in_features(), b.linear(kind).in_features());
            assert!(
                b.linear(kind).bias.is_some(),
                "a re-fitted {kind:?} has a bias"
            );
        }
        let fits = details["reconstruction"]["layers"].as_array().unwrap();
        assert_eq!(fits.len(), dense.weights.layers.len());
        for f in fits {
            let (b, a) = (
                f["rel_error_before"].as_f64().unwrap(),
                f["rel_error_after"].as_f64().unwrap(),
            );
            assert!(a.is_finite() && a <= b + 1e-12, "{f}");
        }
        let (e_plain, e_comp, e_rec) = (
            logit_mse(&dense, &plain, ids),
            logit_mse(&dense, &comp, ids),
            logit_mse(&dense, &rec, ids),
        );
        assert!(
            e_rec < e_comp && e_rec < e_plain,
            "heads {heads}: reconstructed {e_rec}, bias compensation {e_comp}, plain {e_plain}"
        );
        assert!(rec.config.o_bias || rec.config.mlp_bias);
    }
}

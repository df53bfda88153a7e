//! Parameters removed vs perplexity for structured pruning of the default model: depth (Block
//! Influence, angular distance, first / random blocks), heads and FFN neurons (each metric vs
//! random choices of the same structure).
//!
//! `cargo run --release --example depth_width_figures -- [samples] [calib_len] [windows] [seq_len]`
//! (defaults 32 512 8 512: calibration windows from c4, perplexity on the first wiki windows).
//! `ONLY=depth`, `ONLY=heads` or `ONLY=neurons` runs one part. Prints one tab-separated line per
//! configuration as it goes: group, configuration, share of all parameters removed, perplexity.

use lopper::calibrate::SplitMix64;
use lopper::model::observer::Site;
use lopper::structured::collect::observe_all;
use lopper::structured::depth::{
    self, BlockInfluenceObserver, DepthMetric, DepthSpec, LastTokenObserver, LayerSelection,
    RunAngleObserver,
};
use lopper::structured::heads::{self, GqaMode, HeadMetric, HeadSpec};
use lopper::structured::neurons::{self, NeuronMetric, NeuronSpec};
use lopper::structured::stats::collect_width_stats;
use lopper::structured::{alloc, surgery, sync_config, WidthAllocation};
use lopper::Model;
use std::time::Instant;

fn copy(m: &Model) -> Model {
    m.clone()
}

struct Ctx {
    ids: Vec<u32>,
    path: std::path::PathBuf,
    windows: usize,
    seq: usize,
    params0: usize,
    t0: Instant,
}

impl Ctx {
    fn report(&self, group: &str, what: &str, m: &Model) {
        let r = lopper::eval::perplexity(
            m,
            &self.ids,
            self.seq,
            self.windows,
            &self.path,
            &mut |_, _| {},
        )
        .expect("perplexity");
        let p = m.weights.num_params();
        println!(
            "{group}\t{what}\t{:.2}%\t{:.3}\t[{:.0}s]",
            100.0 * (1.0 - p as f64 / self.params0 as f64),
            r.perplexity,
            self.t0.elapsed().as_secs_f64()
        );
    }
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (samples, clen, windows, seq) = (arg(0, 32), arg(1, 512), arg(2, 8), arg(3, 512));
    let model = lopper::io::load_model(&lopper::assets::default_model().unwrap()).unwrap();
    let tok = model.tokenizer().unwrap();
    let c4 = lopper::assets::c4_text().unwrap();
    let calib = lopper::calibrate::from_text(tok, &c4, samples, clen, 0).unwrap();
    let path = lopper::assets::wiki_text().unwrap();
    let text = lopper::text::load_eval_text(&path).unwrap();
    let ids = lopper::tokenizer::encode(tok, &text, &path).unwrap();
    let ctx = Ctx {
        ids,
        path,
        windows,
        seq,
        params0: model.weights.num_params(),
        t0: Instant::now(),
    };
    println!(
        "# calibration {samples}x{clen} c4, perplexity wiki {windows}x{seq}; params {}",
        ctx.params0
    );
    println!("group\tconfig\tparams_removed\tperplexity");
    ctx.report("dense", "-", &model);
    let n_layers = model.weights.layers.len();
    let nop = &mut |_: &str, _: usize, _: usize| {};
    let only = std::env::var("ONLY").unwrap_or_default();

    // ---- Depth ----
    if only.is_empty() || only == "depth" {
        let mut bi = BlockInfluenceObserver::default();
        observe_all(&model, &calib, &mut bi, nop).unwrap();
        let bi = bi.scores();
        println!(
            "# BI per block: {:?}",
            bi.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>()
        );
        let mut last = LastTokenObserver::new(calib.len, n_layers);
        observe_all(&model, &calib, &mut last, nop).unwrap();
        for n in [4usize, 8, 11] {
            let run = |d: &[f64]| {
                let s = alloc::ascending(d)[0];
                (s..s + n).collect::<Vec<usize>>()
            };
            let mut bi_list = alloc::ascending(&bi)[..n].to_vec();
            bi_list.sort_unstable();
            let ang = run(&last.distances(n, model.config.hidden_size));
            let mut all = RunAngleObserver::new(n, n_layers);
            observe_all(&model, &calib, &mut all, nop).unwrap();
            let ang_all = run(&all.distances());
            let mut lists = vec![
                ("block_influence".to_string(), bi_list),
                ("angular_last_token".to_string(), ang),
                ("angular_all_tokens".to_string(), ang_all),
                ("first_n".to_string(), (0..n).collect()),
            ];
            for seed in [1u64, 2, 3] {
                let mut r = shuffled(n_layers, seed)[..n].to_vec();
                r.sort_unstable();
                lists.push((format!("random_seed{seed}"), r));
            }
            for (name, list) in lists {
                let mut m = copy(&model);
                let spec = DepthSpec {
                    select: LayerSelection::List(list.clone()),
                    metric: DepthMetric::BlockInfluence,
                    reconstruct: None,
                };
                depth::remove_layers(&mut m, &calib, &spec, nop).unwrap();
                ctx.report("depth", &format!("n={n} {name} {list:?}"), &m);
            }
        }
    }

    // ---- Width: one statistics pass for heads and neurons (as FLAP) ----
    if !(only.is_empty() || only == "heads" || only == "neurons") {
        return;
    }
    let stats = collect_width_stats(
        &model,
        &calib,
        &[Site::AttnOut, Site::MlpIn, Site::MlpDown],
        nop,
    )
    .unwrap();
    if only.is_empty() || only == "heads" {
        let hd = model.config.head_dim;
        for (gqa, f) in [
            (GqaMode::KvGroups, 1.0 / 3.0),
            (GqaMode::PerGroup, 1.0 / 3.0),
            (GqaMode::KvGroups, 2.0 / 3.0),
            (GqaMode::PerGroup, 2.0 / 3.0),
        ] {
            let mut configs = vec![];
            for metric in [
                HeadMetric::Norm,
                HeadMetric::WandaSp,
                HeadMetric::Fluctuation,
            ] {
                configs.push((metric, WidthAllocation::Uniform, false));
            }
            configs.push((HeadMetric::Fluctuation, WidthAllocation::Uniform, true));
            configs.push((HeadMetric::Fluctuation, WidthAllocation::Adaptive, true));
            for (metric, allocation, bias) in configs {
                let mut m = copy(&model);
                let spec = HeadSpec {
                    fraction: f,
                    metric,
                    gqa,
                    allocation,
                    bias_compensation: bias,
                    reconstruct: None,
                };
                heads::prune_heads_with_stats(&mut m, &stats, &spec).unwrap();
                ctx.report(
                    "heads",
                    &format!("{gqa:?} {f:.3} {metric:?} {allocation:?} bias={bias}"),
                    &m,
                );
            }
            // Random heads of the same structure.
            for seed in [1u64, 2] {
                let mut m = copy(&model);
                let mut rng = SplitMix64(seed);
                for lw in &mut m.weights.layers {
                    let (nh, nk) = (lw.n_heads(hd), lw.n_kv_heads(hd));
                    let g = nh / nk;
                    let (q, kv): (Vec<usize>, Vec<usize>) = match gqa {
                        GqaMode::KvGroups => {
                            let k = (f * nk as f64).round() as usize;
                            let gone = shuffled(nk, rng.next_u64())[..k].to_vec();
                            let keep_kv = surgery::complement(nk, &{
                                let mut s = gone.clone();
                                s.sort_unstable();
                                s
                            });
                            let keep_q = keep_kv.iter().flat_map(|&k| k * g..(k + 1) * g).collect();
                            (keep_q, keep_kv)
                        }
                        GqaMode::PerGroup => {
                            let k = (f * g as f64).round() as usize;
                            let mut keep_q = vec![];
                            for grp in 0..nk {
                                let mut keep = shuffled(g, rng.next_u64())[k..].to_vec();
                                keep.sort_unstable();
                                keep_q.extend(keep.into_iter().map(|h| grp * g + h));
                            }
                            (keep_q, (0..nk).collect())
                        }
                    };
                    surgery::keep_heads(lw, hd, &q, &kv);
                }
                sync_config(&mut m);
                ctx.report("heads", &format!("{gqa:?} {f:.3} random_seed{seed}"), &m);
            }
        }
    }
    if only.is_empty() || only == "neurons" {
        // Fractions of FFN channels that remove about 10 / 20 / 30 % of all parameters.
        // Removing a fraction f of every layer's channels removes f·3·hidden·inter·layers.
        let ffn_params = 3 * model.config.hidden_size * model.config.intermediate_size * n_layers;
        for target in [0.10, 0.20, 0.30] {
            let f = target * ctx.params0 as f64 / ffn_params as f64;
            let mut configs = vec![];
            for metric in [
                NeuronMetric::WandaSp,
                NeuronMetric::WandaSpDown,
                NeuronMetric::Fluctuation,
            ] {
                configs.push((metric, WidthAllocation::Uniform, false));
            }
            configs.push((NeuronMetric::Fluctuation, WidthAllocation::Uniform, true));
            configs.push((NeuronMetric::Fluctuation, WidthAllocation::Adaptive, true));
            configs.push((NeuronMetric::WandaSp, WidthAllocation::Adaptive, false));
            for (metric, allocation, bias) in configs {
                let mut m = copy(&model);
                let spec = NeuronSpec {
                    fraction: f,
                    metric,
                    bias_compensation: bias,
                    allocation,
                    reconstruct: None,
                };
                neurons::prune_neurons_with_stats(&mut m, &stats, &spec).unwrap();
                ctx.report(
                    "neurons",
                    &format!("{f:.3} {metric:?} {allocation:?} bias={bias}"),
                    &m,
                );
            }
            for seed in [1u64, 2] {
                let mut m = copy(&model);
                let mut rng = SplitMix64(seed);
                for lw in &mut m.weights.layers {
                    let w = lw.intermediate();
                    let k = (f * w as f64).round() as usize;
                    let mut keep = shuffled(w, rng.next_u64())[k..].to_vec();
                    keep.sort_unstable();
                    surgery::keep_channels(lw, &keep);
                }
                sync_config(&mut m);
                ctx.report("neurons", &format!("{f:.3} random_seed{seed}"), &m);
            }
        }
    }
}

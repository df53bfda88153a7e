//! Training (`lopper::train`) and `lopper heal` on the tiny golden models.

mod common;

use common::{golden, read_safetensors};
use lopper::train::{self, graph::Ctx, step, Mode, TrainModel};

fn tiny(name: &str) -> lopper::Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).expect("load tiny model")
}

fn golden_ids(name: &str) -> Vec<u32> {
    let g = read_safetensors(
        &golden()
            .join("tiny")
            .join(name)
            .join("golden_logits.safetensors"),
    );
    g["input_ids"].i64.iter().map(|&x| x as u32).collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-12);
    let d = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    d / scale
}

/// The candle graph's logits equal lopper's plain forward on every tiny model it supports.
#[test]
fn candle_forward_matches_plain_forward() {
    for name in [
        "tiny-llama3",
        "tiny-llama-tied-bias",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-qwen3",
        "tiny-phi3",
    ] {
        let model = tiny(name);
        let ids = golden_ids(name);
        let tm = TrainModel::new(&model, Mode::Full, 0, &candle_core::Device::Cpu).unwrap();
        let ours = train::logits(&tm, &ids, 2, 96).unwrap();
        let mut plain = Vec::new();
        for w in ids.chunks(96) {
            plain.extend(lopper::model::forward::forward_logits(&model, w).unwrap());
        }
        let r = max_rel(&ours, &plain);
        assert!(
            r < 1e-4,
            "{name}: logits differ from the plain forward by {r:.2e} (relative to max)"
        );
    }
}

/// Checkpointed gradients of every parameter equal transformers' (float64) on tiny-llama3 and
/// tiny-qwen3 (q/k norms; a tied embedding, whose gradient sums both uses).
#[test]
fn gradients_match_transformers() {
    for name in ["tiny-llama3", "tiny-qwen3"] {
        gradients_match(name);
    }
}

fn gradients_match(name: &str) {
    let model = tiny(name);
    let ids = golden_ids(name);
    let dev = candle_core::Device::Cpu;
    let tm = TrainModel::new(&model, Mode::All, 0, &dev).unwrap();
    let ctx = Ctx::new(&model.config, 2, 96, &dev).unwrap();
    let out =
        step::loss_and_grads(&tm, &ids, 2, 96, &ctx, step::Objective::NextToken, None).unwrap();
    let g = read_safetensors(
        &golden()
            .join("tiny")
            .join(name)
            .join("golden_grads.safetensors"),
    );
    let loss = g["loss"].f32[0] as f64;
    assert!(
        (out.loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
        "loss {} vs {loss}",
        out.loss
    );
    let mut checked = 0;
    let mut worst = (0f64, String::new());
    for (nv, gr) in tm.vars.iter().zip(&out.grads) {
        let want = &g
            .get(&format!("grad.{}", nv.name))
            .unwrap_or_else(|| panic!("no golden grad for {}", nv.name))
            .f32;
        let got = gr
            .as_ref()
            .unwrap_or_else(|| panic!("no gradient for {}", nv.name));
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let r = max_rel(&got, want);
        assert!(
            r < 1e-3,
            "{}: gradient differs by {r:.2e} (relative to its max)",
            nv.name
        );
        if r > worst.0 {
            worst = (r, nv.name.clone());
        }
        checked += 1;
    }
    eprintln!(
        "loss {} vs {loss}; worst gradient {:.2e} ({})",
        out.loss, worst.0, worst.1
    );
    let golden_count = g.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(checked, golden_count, "every golden gradient is checked");
}

/// The closed-form distillation gradient through a frozen head (what `heal` runs) equals
/// candle's autograd through the whole head graph (used when the head trains).
#[test]
fn frozen_head_distillation_matches_the_graph() {
    // Another random model as the teacher, so that the KL is far from zero.
    let teacher = tiny("tiny-mistral");
    let mut student = tiny("tiny-llama3");
    prune_2of4(&mut student);
    let ids = &golden_ids("tiny-llama3")[..96];
    let dev = candle_core::Device::Cpu;
    let ctx = Ctx::new(&student.config, 1, 96, &dev).unwrap();
    let th = lopper::model::forward::forward_hidden(
        &teacher,
        ids,
        1,
        96,
        &mut lopper::model::observer::NoObserver,
    )
    .unwrap();
    let obj = step::Objective::Distill {
        teacher: &teacher,
        hidden: &th,
        tau: 1.0,
    };
    let fast_tm = TrainModel::new(&student, Mode::Full, 0, &dev).unwrap();
    let fast = step::loss_and_grads(&fast_tm, ids, 1, 96, &ctx, obj, None).unwrap();
    let graph_tm = TrainModel::new(&student, Mode::All, 0, &dev).unwrap();
    let graph = step::loss_and_grads(&graph_tm, ids, 1, 96, &ctx, obj, None).unwrap();
    assert!(
        fast.loss > 1e-3,
        "the student differs from the teacher: {}",
        fast.loss
    );
    assert!(
        (fast.loss - graph.loss).abs() < 1e-3 * graph.loss,
        "loss {} vs {}",
        fast.loss,
        graph.loss
    );
    for (nv, g) in fast_tm.vars.iter().zip(&fast.grads) {
        let j = graph_tm
            .vars
            .iter()
            .position(|v| v.name == nv.name)
            .unwrap();
        let a: Vec<f32> = g
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = graph.grads[j]
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let r = max_rel(&a, &b);
        assert!(r < 1e-3, "{}: {r:.2e}", nv.name);
    }
}

// ---------------------------------------------------------------------------------------------
// `lopper heal` on tiny models (byte-level tokenizer written by the test; 256 of 320 ids used).

use std::path::{Path, PathBuf};
use std::process::Command;

/// GPT-2's byte → printable-character table.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable.contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer.json without merges; `swap` exchanges the ids of two bytes.
fn write_tokenizer(dir: &Path, swap: bool) {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        let id = match (swap, i) {
            (true, 97) => 98,
            (true, 98) => 97,
            _ => i,
        };
        vocab.insert(c.to_string(), id.into());
    }
    let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": bl, "post_processor": null, "decoder": bl,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();
}

/// Save `m` as an HF directory at `dir` with the byte tokenizer.
fn save_with_tokenizer(m: &lopper::Model, dir: &Path, swap: bool) {
    lopper::io::save::save_hf(m, dir, lopper::io::save::SaveDtype::F32, true).unwrap();
    write_tokenizer(dir, swap);
}

/// 2:4 magnitude pruning of every block linear (the two smallest of each group of four).
fn prune_2of4(m: &mut lopper::Model) {
    for l in &mut m.weights.layers {
        for k in lopper::LinearKind::ALL {
            for g in l.linear_mut(k).weight.data_mut().chunks_mut(4) {
                let mut idx: Vec<usize> = (0..g.len()).collect();
                idx.sort_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()));
                for &i in &idx[..g.len() / 2] {
                    g[i] = 0.0;
                }
            }
        }
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    teacher: PathBuf,
    student: PathBuf,
    text: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let dense = tiny("tiny-llama3");
    let teacher = root.join("teacher");
    save_with_tokenizer(&dense, &teacher, false);
    let mut pruned = dense.clone();
    prune_2of4(&mut pruned);
    let student = root.join("student");
    save_with_tokenizer(&pruned, &student, false);
    let text = root.join("train.txt");
    let mut s = String::new();
    for i in 0..400 {
        s.push_str(&format!(
            "Story {i}: the cat number {} sat on mat {} and looked at bird {}.\n",
            i * 7 % 13,
            i % 5,
            i * 3 % 11
        ));
    }
    std::fs::write(&text, s).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        teacher,
        student,
        text,
    }
}

fn lopper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .expect("run lopper")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn heal(f: &Fixture, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "heal",
        "--model",
        s(&f.student),
        "--teacher",
        s(&f.teacher),
        "--out",
        s(out),
        "--text",
        s(&f.text),
        "--seq-len",
        "64",
        "--tokens",
        "1024",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    lopper(&args)
}

fn ok(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "lopper failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fails(o: &std::process::Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

fn weights_of(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    read_safetensors(&dir.join("model.safetensors"))
        .into_iter()
        .map(|(k, v)| (k, v.f32))
        .collect()
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

/// LoRA and masked full healing keep every zero, lower the distillation loss, and change the
/// weights; report.json carries the figures.
#[test]
fn heal_keeps_the_mask_and_lowers_the_loss() {
    let f = fixture();
    let before = weights_of(&f.student);
    for (name, extra) in [
        ("lora", vec!["--lora-rank", "4", "--lr", "1e-2"]),
        ("full", vec!["--full", "--lr", "2e-3"]),
    ] {
        let out = f.root.join(name);
        let evalt = f.root.join("eval.txt");
        std::fs::write(
            &evalt,
            "A dog ran to the park and the cat sat on the mat all day long.\n".repeat(20),
        )
        .unwrap();
        let ev = [
            "--hidden-loss",
            "0.5",
            "--eval",
            "--eval-text",
            s(&evalt),
            "--eval-windows",
            "2",
            "--eval-seq-len",
            "64",
        ];
        let o = heal(&f, &out, &[&extra[..], &ev].concat());
        ok(&o);
        let after = weights_of(&out);
        let mut changed = 0;
        for (k, w0) in &before {
            let w1 = &after[k];
            for (a, b) in w0.iter().zip(w1) {
                if k.contains("_proj") {
                    assert_eq!(
                        *a == 0.0,
                        *b == 0.0,
                        "{name}: {k}: the zero pattern changed"
                    );
                }
                changed += (a != b) as usize;
            }
        }
        assert!(changed > 1000, "{name}: only {changed} weights changed");
        let r = report(&out);
        assert_eq!(r["sparsity_before"], r["sparsity_after"]);
        assert!(r["sparsity_before"].as_f64().unwrap() > 0.49);
        let curve: Vec<f64> = r["loss_curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .collect();
        assert_eq!(curve.len(), 16);
        let head: f64 = curve[..4].iter().sum::<f64>() / 4.0;
        let tail: f64 = curve[12..].iter().sum::<f64>() / 4.0;
        assert!(
            tail < 0.8 * head,
            "{name}: loss {head:.4} → {tail:.4} did not fall"
        );
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
        let (pb, pa) = (
            r["eval"]["perplexity_before"].as_f64().unwrap(),
            r["eval"]["perplexity_after"].as_f64().unwrap(),
        );
        assert!(
            pb.is_finite() && pa.is_finite() && pa != pb,
            "{name}: perplexity {pb} -> {pa}"
        );
    }
}

/// A run split by --stop-after and --resume ends with the same weights as an uninterrupted run;
/// a checkpoint of other settings is refused.
#[test]
fn resume_reaches_the_same_result() {
    let f = fixture();
    let common = ["--full", "--lr", "2e-3", "--checkpoint-every", "2"];
    let whole = f.root.join("whole");
    ok(&heal(&f, &whole, &common));
    let split = f.root.join("split");
    let ck = f.root.join("ck");
    let ck_args = [&common[..], &["--checkpoint-dir", s(&ck)]].concat();
    let o = heal(&f, &split, &[&ck_args[..], &["--stop-after", "5"]].concat());
    ok(&o);
    assert!(!split.exists() && ck.join("heal-checkpoint.safetensors").is_file());
    let other = heal(
        &f,
        &split,
        &[&ck_args[..], &["--resume", "--seed", "3"]].concat(),
    );
    fails(&other, &["another model or other settings"]);
    ok(&heal(&f, &split, &[&ck_args[..], &["--resume"]].concat()));
    let (a, b) = (weights_of(&whole), weights_of(&split));
    for (k, v) in &a {
        assert!(v == &b[k], "{k} differs after resume");
    }
    assert_eq!(report(&whole)["loss_curve"], report(&split)["loss_curve"]);
}

/// Bad input: existing --out, wiki.utf8 as training text, another tokenizer, a NaN weight.
#[test]
fn heal_refuses_bad_input() {
    let f = fixture();
    let out = f.root.join("exists");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    fails(&heal(&f, &out, &[]), &["already exists", "--force"]);
    assert!(out.join("keep").is_file());

    let wiki = f.root.join("wiki.utf8");
    std::fs::copy(&f.text, &wiki).unwrap();
    let o = lopper(&[
        "heal",
        "--model",
        s(&f.student),
        "--teacher",
        s(&f.teacher),
        "--out",
        s(&f.root.join("o1")),
        "--text",
        s(&wiki),
        "--quiet",
    ]);
    fails(&o, &["wiki.utf8", "evaluation text"]);

    let other_tok = f.root.join("teacher2");
    save_with_tokenizer(&tiny("tiny-llama3"), &other_tok, true);
    let o = lopper(&[
        "heal",
        "--model",
        s(&f.student),
        "--teacher",
        s(&other_tok),
        "--out",
        s(&f.root.join("o2")),
        "--text",
        s(&f.text),
        "--quiet",
    ]);
    fails(&o, &["different tokenizers"]);

    let mut bad = lopper::io::load_model(&f.student).unwrap();
    bad.weights.layers[1].down.weight.data_mut()[3] = f32::NAN;
    let nan = f.root.join("nan");
    save_with_tokenizer(&bad, &nan, false);
    let o = lopper(&[
        "heal",
        "--model",
        s(&nan),
        "--teacher",
        s(&f.teacher),
        "--out",
        s(&f.root.join("o3")),
        "--text",
        s(&f.text),
        "--seq-len",
        "64",
        "--quiet",
    ]);
    fails(&o, &["NaN/Inf", "3 steps in a row"]);
    assert!(!f.root.join("o3").exists());
}

/// Families whose training graph is not written are refused by name, before any work.
#[test]
fn untrained_families_are_refused() {
    for (name, family) in [
        ("tiny-gemma3", "gemma3"),
        ("tiny-mixtral", "mixtral"),
        ("tiny-qwen3-moe", "qwen3"),
    ] {
        let model = tiny(name);
        let e = TrainModel::new(&model, Mode::Full, 0, &candle_core::Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{name} accepted"))
            .to_string();
        assert!(e.contains(family) && e.contains("training"), "{name}: {e}");
    }
}

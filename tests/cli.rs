//! The `lopper` binary end to end: every bad input exits non-zero with a message that names the
//! offending file or value and never panics; failed runs lose nothing (an existing output is left
//! as it was, no temporary directory is left behind) and fail fast; and the cheap success paths
//! (inspect, magnitude prune of a tiny model, convert of the default model) write what they say.

mod common;
use common::*;
use lopper::model::forward::forward_logits;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a run of the binary produced.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    seconds: f64,
}

/// Run `lopper args…`; kill it and fail the test if it runs longer than `limit`
/// (every error case here must be detected before any heavy computation).
fn lopper_limit<S: AsRef<OsStr>>(args: &[S], limit: Duration) -> Out {
    let logs = tempfile::tempdir().unwrap();
    let (so, se) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&so).unwrap())
        .stderr(fs::File::create(&se).unwrap())
        .spawn()
        .expect("start lopper");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`lopper {}` still running after {limit:?}: it does not fail fast\nstderr so far:\n{}",
                shown.join(" "),
                fs::read_to_string(&se).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Out {
        code: status.code(),
        stdout: fs::read_to_string(&so).unwrap(),
        stderr: fs::read_to_string(&se).unwrap(),
        seconds: t.elapsed().as_secs_f64(),
    };
    eprintln!(
        "$ lopper {}  [{:.1} s, exit {:?}]\n{}",
        shown.join(" "),
        out.seconds,
        out.code,
        out.stderr.trim_end()
    );
    out
}

/// Error cases: 60 s is far more than loading the default model (~1 s) takes.
fn lopper<S: AsRef<OsStr>>(args: &[S]) -> Out {
    lopper_limit(args, Duration::from_secs(60))
}

/// The run failed cleanly: non-zero exit, every needle in stderr, no panic.
fn assert_fails(out: &Out, needles: &[&str]) {
    assert!(
        out.code.is_some_and(|c| c != 0),
        "expected a failure exit status, got {:?}\nstderr: {}",
        out.code,
        out.stderr
    );
    assert!(
        !out.stderr.contains("panicked"),
        "lopper panicked:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("error"),
        "no error message:\n{}",
        out.stderr
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "stderr should mention `{n}`:\n{}",
            out.stderr
        );
    }
}

fn assert_ok(out: &Out) {
    assert_eq!(out.code, Some(0), "lopper failed:\n{}", out.stderr);
    assert!(
        !out.stderr.contains("panicked"),
        "lopper panicked:\n{}",
        out.stderr
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn default_model_path() -> PathBuf {
    lopper::assets::default_model().expect("default model")
}

fn tiny(name: &str) -> PathBuf {
    golden().join("tiny").join(name)
}

/// A writable copy of a tiny model directory.
fn copy_tiny(name: &str, into: &Path) -> PathBuf {
    let dir = into.join(name);
    fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        fs::copy(tiny(name).join(f), dir.join(f)).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Names in `dir` that look like leftovers of an interrupted atomic write.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.contains(".old"))
        .collect()
}

/// Every file under `dir` with its bytes (to check a directory was left untouched).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// eval: bad models and texts
// ---------------------------------------------------------------------------------------------

#[test]
fn eval_bad_model_files() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // A GGUF cut after 1 MB.
    let trunc = t.join("truncated.gguf");
    let mut bytes = fs::read(default_model_path()).unwrap();
    bytes.truncate(1 << 20);
    fs::write(&trunc, &bytes).unwrap();
    let out = lopper(&["eval", "--model", &s(&trunc)]);
    assert_fails(&out, &[&s(&trunc), "GGUF", "truncated"]);

    // A text file named .gguf.
    let fake = t.join("fake.gguf");
    fs::write(&fake, "this is not a model\n").unwrap();
    let out = lopper(&["eval", "--model", &s(&fake)]);
    assert_fails(&out, &[&s(&fake), "not a GGUF file"]);

    // An empty .gguf.
    let empty = t.join("empty.gguf");
    fs::write(&empty, b"").unwrap();
    let out = lopper(&["eval", "--model", &s(&empty)]);
    assert_fails(&out, &[&s(&empty), "GGUF"]);

    // A path that does not exist.
    let missing = t.join("no-such-model");
    let out = lopper(&["eval", "--model", &s(&missing)]);
    assert_fails(&out, &[&s(&missing), "No such file"]);
    assert_eq!(
        out.stderr.matches("No such file").count(),
        1,
        "the cause is printed twice:\n{}",
        out.stderr
    );

    // An HF directory whose model.safetensors is truncated.
    let hf = copy_tiny("tiny-llama3", &t.join("trunc"));
    let st = hf.join("model.safetensors");
    let full = fs::read(&st).unwrap();
    fs::write(&st, &full[..full.len() / 2]).unwrap();
    let out = lopper(&["eval", "--model", &s(&hf)]);
    assert_fails(&out, &[&s(&st), "safetensors", "truncated"]);

    // Unknown architecture.
    let neox = copy_tiny("tiny-llama3", &t.join("neox"));
    edit_config(&neox, |v| {
        v["model_type"] = "gpt_neox".into();
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let out = lopper(&["eval", "--model", &s(&neox)]);
    assert_fails(
        &out,
        &[
            &s(&neox.join("config.json")),
            "unsupported architecture",
            "gpt_neox",
        ],
    );

    // A config whose hidden_size disagrees with the tensors.
    let shape = copy_tiny("tiny-llama3", &t.join("shape"));
    edit_config(&shape, |v| v["hidden_size"] = 96.into());
    let out = lopper(&["eval", "--model", &s(&shape)]);
    assert_fails(&out, &[&s(&shape), "shape", "expected"]);

    // A broken config.json.
    let badjson = copy_tiny("tiny-llama3", &t.join("badjson"));
    fs::write(badjson.join("config.json"), "{ not json").unwrap();
    let out = lopper(&["eval", "--model", &s(&badjson)]);
    assert_fails(&out, &[&s(&badjson.join("config.json"))]);

    // A valid HF directory without tokenizer.json: eval needs a tokenizer.
    let notok = copy_tiny("tiny-llama3", &t.join("notok"));
    let text = t.join("some.txt");
    fs::write(&text, "Some text to evaluate on.\n".repeat(50)).unwrap();
    let out = lopper(&["eval", "--model", &s(&notok), "--text", &s(&text)]);
    assert_fails(&out, &[&s(&notok), "no tokenizer", "tokenizer.json"]);
}

#[test]
fn eval_bad_texts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&default_model_path());

    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, b"").unwrap();
    let out = lopper(&["eval", "--model", &model, "--text", &s(&empty)]);
    assert_fails(&out, &[&s(&empty), "empty"]);

    let short = tmp.path().join("short.txt");
    fs::write(&short, "Just a few words.\n").unwrap();
    let out = lopper(&["eval", "--model", &model, "--text", &s(&short)]);
    assert_fails(&out, &[&s(&short), "too short", "one window needs 2048"]);

    let binary = tmp.path().join("binary.txt");
    fs::write(&binary, [b'a', b'b', 0xff, 0xfe, b'c']).unwrap();
    let out = lopper(&["eval", "--model", &model, "--text", &s(&binary)]);
    assert_fails(&out, &[&s(&binary), "UTF-8", "offset 2"]);

    let missing = tmp.path().join("missing.txt");
    let out = lopper(&["eval", "--model", &model, "--text", &s(&missing)]);
    assert_fails(&out, &[&s(&missing), "No such file"]);
    assert_eq!(
        out.stderr.matches("No such file").count(),
        1,
        "the cause is printed twice:\n{}",
        out.stderr
    );

    let out = lopper(&[
        "eval",
        "--model",
        &model,
        "--text",
        &s(&short),
        "--seq-len",
        "1",
    ]);
    assert_fails(&out, &["--seq-len"]);
}

// ---------------------------------------------------------------------------------------------
// prune: bad requests fail fast and lose nothing
// ---------------------------------------------------------------------------------------------

/// Run a prune that must fail; check the message, and that nothing was written beside `--out`.
fn prune_fails(extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let mut args = vec!["prune".to_string(), "--out".into(), s(&out_dir)];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = lopper(&args);
    assert_fails(&out, needles);
    assert!(
        !out_dir.exists(),
        "a failed prune created {}",
        out_dir.display()
    );
    assert!(
        leftovers(tmp.path()).is_empty(),
        "leftovers beside --out: {:?}",
        leftovers(tmp.path())
    );
}

#[test]
fn prune_bad_values() {
    let model = s(&default_model_path());
    let m = ["--model", model.as_str()];
    let with =
        |x: &[&'static str]| -> Vec<&str> { m.iter().copied().chain(x.iter().copied()).collect() };

    prune_fails(
        &with(&["--sparsity", "1.0"]),
        &["--sparsity", "[0, 1)", "got 1"],
    );
    // Without --model: the (cached) default model.
    prune_fails(&["--sparsity", "1.0"], &["--sparsity", "[0, 1)"]);
    prune_fails(&with(&["--sparsity", "-0.1"]), &["--sparsity", "-0.1"]);
    prune_fails(&with(&["--sparsity", "abc"]), &["--sparsity", "abc"]);
    prune_fails(&with(&["--pattern", "4:4"]), &["4:4", "N:M"]);
    prune_fails(&with(&["--pattern", "5:4"]), &["5:4", "N:M"]);
    prune_fails(&with(&["--pattern", "block:5"]), &["block:5", "block:RxC"]);
    prune_fails(
        &with(&["--pattern", "2:4", "--sparsity", "0.6"]),
        &["2:4", "0.6"],
    );
    prune_fails(
        &with(&["--pattern", "2:4", "--allocation", "owl"]),
        &["OWL", "N:M"],
    );
    prune_fails(
        &with(&["--attn-sparsity", "-0.5"]),
        &["--attn-sparsity", "-0.5"],
    );
    prune_fails(&with(&["--skip-layers", "30"]), &["layer 30", "30"]);
    prune_fails(&with(&["--skip-modules", "q,bogus"]), &["bogus"]);
    prune_fails(&with(&["--dtype", "int4"]), &["--dtype", "int4"]);
    prune_fails(&with(&["--method", "obs"]), &["obs"]);
    // A block shape that does not divide 576: the message names the matrix and says it refuses.
    prune_fails(
        &with(&["--pattern", "block:5x5"]),
        &[
            "block 5x5",
            "model.layers.0.self_attn.q_proj.weight",
            "576x576",
            "refuses",
        ],
    );
    prune_fails(
        &with(&["--pattern", "vector:7"]),
        &["model.layers.0.self_attn.q_proj.weight", "vector length 7"],
    );
}

#[test]
fn prune_bad_structured_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&default_model_path());
    let m = ["--model", model.as_str()];
    fn with<'a>(m: &[&'a str], x: &[&'a str]) -> Vec<&'a str> {
        m.iter().chain(x).copied().collect()
    }
    prune_fails(&with(&m, &["--neurons", "1.0"]), &["--neurons", "[0, 1)"]);
    prune_fails(&with(&m, &["--heads", "-0.2"]), &["--heads", "-0.2"]);
    prune_fails(&with(&m, &["--slice", "1.5"]), &["--slice", "1.5"]);
    prune_fails(
        &with(&m, &["--low-rank-energy", "0"]),
        &["--low-rank-energy", "(0, 1]"],
    );
    prune_fails(&with(&m, &["--remove-layers", "0"]), &["--remove-layers"]);
    prune_fails(
        &with(&m, &["--low-rank", "0.2", "--low-rank-modules", "q,wings"]),
        &["wings"],
    );
    // Plan files: every problem names the file, the step and the key.
    let plan = |name: &str, text: &str| -> String {
        let p = tmp.path().join(name);
        fs::write(&p, text).unwrap();
        s(&p)
    };
    let unknown = plan("unknown.toml", "[[step]]\nkind = \"wings\"\n");
    prune_fails(
        &with(&m, &["--plan", &unknown]),
        &["unknown.toml", "step 1", "wings"],
    );
    let badkey = plan(
        "badkey.toml",
        "[[step]]\nkind = \"neurons\"\nfraction = 0.2\n[[step]]\nkind = \"sparse\"\nsparsity = 0.5\nsparsty = 0.5\n",
    );
    prune_fails(
        &with(&m, &["--plan", &badkey]),
        &["badkey.toml", "step 2", "sparsty"],
    );
    let badval = plan("badval.toml", "[[step]]\nkind = \"heads\"\nfraction = 2\n");
    prune_fails(
        &with(&m, &["--plan", &badval]),
        &["badval.toml", "fraction", "[0, 1)"],
    );
    let broken = plan("broken.toml", "[[step\nkind=");
    prune_fails(&with(&m, &["--plan", &broken]), &["broken.toml", "TOML"]);
    prune_fails(
        &with(&m, &["--plan", "/nonexistent/plan.toml"]),
        &["/nonexistent/plan.toml"],
    );
    prune_fails(
        &with(&m, &["--plan", &badval, "--neurons", "0.2"]),
        &[
            "--neurons cannot be combined with --plan",
            "`fraction`",
            "neurons step",
        ],
    );
    // --target-params: the budget is checked before any calibration work.
    prune_fails(
        &with(&m, &["--target-params", "0.95"]),
        &["--target-params", "(0, 0.9)"],
    );
    prune_fails(
        &with(&m, &["--target-params", "0.2", "--neurons", "0.1"]),
        &["--neurons cannot be combined with --target-params"],
    );
    prune_fails(
        &with(&m, &["--target-params", "0.2", "--sparsity", "0.5"]),
        &["--sparsity cannot be combined with --target-params"],
    );
}

/// Every flag takes effect or is refused with the fix: modifiers without their step, flags that
/// a plan file or --target-params replaces, and flags that would change nothing.
#[test]
fn prune_flags_that_would_take_no_effect_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, ids) = tiny_with_ids(tmp.path());
    let (model, ids) = (s(&model), s(&ids));
    let plan = tmp.path().join("plan.toml");
    fs::write(
        &plan,
        "[[step]]\nkind = \"heads\"\nfraction = 0.5\nmetric = \"wanda_sp\"\n",
    )
    .unwrap();
    let plan = s(&plan);
    let m = ["--model", model.as_str(), "--calib-ids", ids.as_str()];
    let with = |x: &[&str]| -> Vec<String> { m.iter().chain(x).map(|a| a.to_string()).collect() };
    for (extra, needles) in [
        (
            vec!["--whiten"],
            vec!["--whiten needs --low-rank or --low-rank-energy"],
        ),
        (
            vec!["--bias-compensation"],
            vec!["--bias-compensation needs --heads or --neurons"],
        ),
        (
            vec!["--head-metric", "fluctuation"],
            vec!["--head-metric needs --heads"],
        ),
        (
            vec!["--gqa", "per-group", "--neurons", "0.2"],
            vec!["--gqa needs --heads"],
        ),
        (
            vec!["--layer-metric", "angular"],
            vec!["--layer-metric needs --remove-layers"],
        ),
        (
            vec!["--slice-round-to", "16"],
            vec!["--slice-round-to needs --slice"],
        ),
        (
            vec!["--heads", "0.5", "--magnitude-scope", "row"],
            vec!["--magnitude-scope needs a sparse step"],
        ),
        (
            vec!["--magnitude-scope", "row"],
            vec!["--magnitude-scope applies to method magnitude only"],
        ),
        (
            vec!["--hessian-precision", "f32"],
            vec!["--hessian-precision applies to method sparsegpt only"],
        ),
        (vec!["--owl-m", "3"], vec!["--owl-m needs --allocation owl"]),
        (
            vec!["--remove-layers", "1", "--drop-layers", "1"],
            vec!["--remove-layers and --drop-layers exclude each other"],
        ),
        (
            vec!["--low-rank", "0.2", "--low-rank-energy", "0.9"],
            vec!["exactly one of --low-rank or --low-rank-energy"],
        ),
        (
            vec!["--target-params", "0.2", "--neuron-metric", "wanda-sp"],
            vec!["--neuron-metric cannot be combined with --target-params"],
        ),
        (
            vec!["--plan", &plan, "--method", "sparsegpt"],
            vec![
                "--method cannot be combined with --plan",
                "`method`",
                "sparse step",
            ],
        ),
        (
            vec!["--plan", &plan, "--allocation", "owl"],
            vec![
                "--allocation cannot be combined with --plan",
                "`allocation`",
            ],
        ),
        (
            vec!["--plan", &plan, "--skip-layers", "1"],
            vec![
                "--skip-layers cannot be combined with --plan",
                "`skip_layers`",
            ],
        ),
        (
            vec!["--plan", &plan, "--bias-compensation"],
            vec![
                "--bias-compensation cannot be combined with --plan",
                "heads / neurons step",
            ],
        ),
        (
            vec!["--eval-windows", "2"],
            vec!["--eval-windows needs --eval"],
        ),
        (
            vec!["--score-windows", "4"],
            vec!["--score-windows needs --target-params"],
        ),
        (
            vec!["--heads", "0.5", "--in-memory"],
            vec!["--in-memory applies to sparse-only runs"],
        ),
        (
            vec!["--calib-len", "16"],
            vec!["--calib-len does not apply to --calib-ids"],
        ),
        (
            vec!["--seed", "3"],
            vec!["--seed does not apply to --calib-ids"],
        ),
        (
            vec!["--samples", "99"],
            vec!["--samples 99", "holds 4 calibration windows"],
        ),
        (
            vec!["--recon-damp", "0.1"],
            vec!["--recon-damp needs --reconstruct"],
        ),
        (
            vec!["--refine-iters", "5"],
            vec!["--refine-iters needs --refine"],
        ),
        (
            vec!["--ria-alpha", "0.3"],
            vec!["--ria-alpha applies to method ria only"],
        ),
        (vec!["--permute"], vec!["--permute", "N:M pattern"]),
        (
            vec!["--slice", "0.1", "--reconstruct"],
            vec!["--reconstruct needs --remove-layers or --drop-layers or --heads or --neurons or --low-rank"],
        ),
        (
            vec!["--plan", &plan, "--refine", "swaps"],
            vec!["--refine cannot be combined with --plan", "`refine`"],
        ),
    ] {
        prune_fails(
            &with(&extra).iter().map(String::as_str).collect::<Vec<_>>(),
            &needles,
        );
    }
    // No calibration is read by magnitude pruning with uniform allocation.
    prune_fails(
        &["--model", &model, "--method", "magnitude", "--samples", "8"],
        &["--samples takes no effect"],
    );
}

/// Structured and sparse flags compose into one plan (heads, then SparseGPT with per-kind
/// sparsities), exactly as the same plan file would; `--samples` takes the first rows of
/// `--calib-ids`.
#[test]
fn prune_structured_and_sparse_flags_compose() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, ids) = tiny_with_ids(tmp.path());
    let (model, ids) = (s(&model), s(&ids));
    let run = |name: &str, extra: &[&str]| -> serde_json::Value {
        let dir = tmp.path().join(name);
        let mut args = vec![
            "prune",
            "--model",
            &model,
            "--calib-ids",
            &ids,
            "--samples",
            "2",
        ];
        let d = s(&dir);
        args.extend(["--out", d.as_str()]);
        args.extend(extra);
        assert_ok(&lopper(&args));
        read_report(&dir)
    };
    let flags = run(
        "flags",
        &[
            "--heads",
            "0.5",
            "--head-metric",
            "wanda-sp",
            "--method",
            "sparsegpt",
            "--attn-sparsity",
            "0.5",
            "--mlp-sparsity",
            "0.7",
        ],
    );
    let plan = tmp.path().join("same.toml");
    fs::write(
        &plan,
        "[[step]]\nkind = \"heads\"\nfraction = 0.5\nmetric = \"wanda_sp\"\n\
         [[step]]\nkind = \"sparse\"\nmethod = \"sparsegpt\"\nsparsity = 0.5\n\
         attn_sparsity = 0.5\nmlp_sparsity = 0.7\n",
    )
    .unwrap();
    let from_plan = run("plan", &["--plan", &s(&plan)]);
    for r in [&flags, &from_plan] {
        assert_eq!(r["calibration"]["samples"], 2, "{r}");
        let steps = r["steps"].as_array().unwrap();
        let kinds: Vec<_> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["heads", "sparse"]);
        assert_eq!(
            steps[0]["spec"]["metric"], "wanda_sp",
            "{}",
            steps[0]["spec"]
        );
        assert_eq!(steps[1]["spec"]["method"], "sparsegpt");
        assert_eq!(steps[1]["spec"]["mlp_sparsity"], 0.7);
        // Attention at 50% and the (larger) MLP at 70%: measured between the two, not 50%.
        let measured = steps[1]["details"]["sparsity_measured"].as_f64().unwrap();
        assert!(measured > 0.6 && measured < 0.7, "{}", steps[1]["details"]);
    }
    assert_eq!(flags["steps"][1]["spec"], from_plan["steps"][1]["spec"]);
    assert_eq!(flags["size_after"], from_plan["size_after"]);
}

#[test]
fn prune_bad_calibration() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&default_model_path());

    let small = tmp.path().join("small.txt");
    fs::write(
        &small,
        "A tiny calibration text.\nAnother short document.\n",
    )
    .unwrap();
    let sm = s(&small);
    prune_fails(
        &["--model", &model, "--calib", &sm],
        &[&sm, "too little calibration text", "--samples"],
    );
    prune_fails(
        &["--model", &model, "--method", "sparsegpt", "--calib", &sm],
        &[&sm, "too little calibration text"],
    );

    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "\n\n\n").unwrap();
    let em = s(&empty);
    prune_fails(&["--model", &model, "--calib", &em], &[&em, "no documents"]);

    let ids = tmp.path().join("ids.safetensors");
    fs::write(&ids, b"garbage").unwrap();
    let id = s(&ids);
    prune_fails(
        &["--model", &model, "--calib-ids", &id],
        &[&id, "safetensors"],
    );

    prune_fails(
        &["--model", &model, "--calib", &sm, "--samples", "0"],
        &["--samples 0"],
    );
}

#[test]
fn prune_existing_output_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let model = s(&default_model_path());
    let existing = tmp.path().join("existing");
    fs::create_dir(&existing).unwrap();
    fs::write(existing.join("precious.txt"), "do not lose me").unwrap();
    fs::create_dir(existing.join("sub")).unwrap();
    fs::write(existing.join("sub").join("more.bin"), [1u8, 2, 3]).unwrap();
    let before = snapshot(&existing);

    // Without --force: refused, before loading anything.
    let out = lopper(&[
        "prune",
        "--model",
        &model,
        "--method",
        "magnitude",
        "--out",
        &s(&existing),
    ]);
    assert_fails(&out, &[&s(&existing), "exists", "--force"]);
    assert_eq!(
        snapshot(&existing),
        before,
        "the existing output was modified"
    );
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );

    // With --force but a request that fails: still untouched.
    let out = lopper(&[
        "prune",
        "--model",
        &model,
        "--sparsity",
        "1.0",
        "--force",
        "--out",
        &s(&existing),
    ]);
    assert_fails(&out, &["--sparsity"]);
    assert_eq!(
        snapshot(&existing),
        before,
        "a failed --force prune modified the existing output"
    );
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );

    // A plain file in the way is refused too.
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let out = lopper(&[
        "prune",
        "--model",
        &model,
        "--method",
        "magnitude",
        "--out",
        &s(&file),
    ]);
    assert_fails(&out, &[&s(&file), "exists"]);
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");

    // convert refuses an existing output the same way.
    let out = lopper(&[
        "convert",
        "--model",
        &s(&tiny("tiny-llama3")),
        "--out",
        &s(&existing),
    ]);
    assert_fails(&out, &[&s(&existing), "exists"]);
    assert_eq!(snapshot(&existing), before);
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

// ---------------------------------------------------------------------------------------------
// Success paths
// ---------------------------------------------------------------------------------------------

#[test]
fn inspect_tiny_models_as_json() {
    for name in ["tiny-llama3", "tiny-qwen2"] {
        let out = lopper(&["inspect", &s(&tiny(name)), "--json"]);
        assert_ok(&out);
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}):\n{}", out.stdout));
        assert!(v["total_params"].as_u64().unwrap() > 0, "{name}: {v}");
        assert_eq!(v["layers"], 3);
        assert_eq!(v["config"]["hidden_size"], 64);
        assert_eq!(v["linear_sparsity"], 0.0);
    }
    // Text output too.
    let out = lopper(&["inspect", &s(&tiny("tiny-mistral"))]);
    assert_ok(&out);
    assert!(
        out.stdout.contains("mistral")
            && out.stdout.contains("model.layers.2.mlp.down_proj.weight"),
        "{}",
        out.stdout
    );
}

/// `lopper prune` of tiny-llama3 with magnitude (default sparsity) into `out`.
fn magnitude_tiny_to(out: &str) -> Out {
    lopper(&[
        "prune",
        "--model",
        &s(&tiny("tiny-llama3")),
        "--method",
        "magnitude",
        "--out",
        out,
    ])
}

#[test]
fn prune_tiny_magnitude_writes_model_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing parents are created (the README's first command writes to `runs/…`).
    let dir = tmp.path().join("runs").join("pruned");
    let out = lopper(&[
        "prune",
        "--model",
        &s(&tiny("tiny-llama3")),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--out",
        &s(&dir),
        "--json",
    ]);
    assert_ok(&out);
    for f in ["config.json", "model.safetensors", "report.json"] {
        assert!(dir.join(f).is_file(), "{f} missing from the output");
    }
    // A scratch directory nothing can be created in (procfs, even for root): the error names it
    // and hints at the way out.
    if cfg!(target_os = "linux") {
        let bad = magnitude_tiny_to("/proc/lopper-no-such-dir/pruned");
        assert_fails(&bad, &["/proc", "scratch file", "--in-memory"]);
    }
    // Only the output: no temp directory, no scratch file.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    assert_eq!(fs::read_dir(tmp.path().join("runs")).unwrap().count(), 1);
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
    let report = read_report(&dir);
    let stdout: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("--json prints the report");
    assert_eq!(report, stdout, "report.json and the printed report differ");
    let measured = report["sparsity_measured"].as_f64().unwrap();
    assert!(
        (measured - 0.5).abs() < 1e-3,
        "sparsity_measured {measured}"
    );
    assert_eq!(report["method"], "magnitude");
    assert_eq!(report["tensors"].as_array().unwrap().len(), 21);

    let orig = lopper::io::load_model(&tiny("tiny-llama3")).unwrap();
    let m = lopper::io::load_model(&dir).unwrap();
    let (mut zeros, mut params) = (0, 0);
    for (l, o) in m.weights.layers.iter().zip(&orig.weights.layers) {
        for k in lopper::LinearKind::ALL {
            let (w, w0) = (&l.linear(k).weight, &o.linear(k).weight);
            assert_eq!(w.shape, w0.shape);
            let z = w.count_zeros();
            assert!(
                (z as f64 / w.len() as f64 - 0.5).abs() < 1e-3,
                "{k:?}: sparsity {}",
                z as f64 / w.len() as f64
            );
            // Kept weights are the original ones, bit for bit.
            assert!(
                w.data()
                    .iter()
                    .zip(w0.data())
                    .all(|(a, b)| *a == 0.0 || a == b),
                "{k:?}: kept weights changed"
            );
            zeros += z;
            params += w.len();
        }
    }
    assert_eq!(report["zeros"].as_u64().unwrap() as usize, zeros);
    assert_eq!(
        report["pruned_linear_params"].as_u64().unwrap() as usize,
        params
    );
    assert_eq!(
        m.weights.embed.data(),
        orig.weights.embed.data(),
        "the embedding must be unchanged"
    );

    // Writing again needs --force, and with it succeeds.
    let again = magnitude_tiny_to(&s(&dir));
    assert_fails(&again, &["exists"]);
    let forced = lopper(&[
        "prune",
        "--model",
        &s(&tiny("tiny-llama3")),
        "--method",
        "magnitude",
        "--sparsity",
        "0.25",
        "--out",
        &s(&dir),
        "--force",
    ]);
    assert_ok(&forced);
    let report = read_report(&dir);
    assert!((report["sparsity_measured"].as_f64().unwrap() - 0.25).abs() < 1e-3);
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
#[ignore = "real model"]
fn convert_default_model_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = default_model();
    let dir32 = tmp.path().join("smollm2-f32");
    let dir16 = tmp.path().join("smollm2-f16");
    let limit = Duration::from_secs(300);
    assert_ok(&lopper_limit(
        &[
            "convert",
            "--model",
            &s(&default_model_path()),
            "--out",
            &s(&dir32),
        ],
        limit,
    ));
    assert_ok(&lopper_limit(
        &[
            "convert",
            "--model",
            &s(&default_model_path()),
            "--out",
            &s(&dir16),
            "--dtype",
            "f16",
        ],
        limit,
    ));
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );

    // The same tokenizer: identical ids on a slice of the wiki text and on awkward strings.
    let wiki_path = lopper::assets::wiki_text().unwrap();
    let wiki = lopper::text::load_eval_text(&wiki_path).unwrap();
    let mut cut = 20_000.min(wiki.len());
    while !wiki.is_char_boundary(cut) {
        cut -= 1;
    }
    let samples = [
        &wiki[..cut],
        "In 1984, 12345 cafés — naïve Ünïcode 😀\n\n  tabs\tand   spaces <|im_start|>user",
    ];
    let tok = |m: &lopper::Model, t: &str| {
        lopper::tokenizer::encode(m.tokenizer().unwrap(), t, &wiki_path).unwrap()
    };
    let ids = tok(gguf, samples[0]);
    assert!(ids.len() > 64);
    let ids = &ids[..64];
    let ref_logits = forward_logits(gguf, ids).unwrap();

    for (dir, tol) in [(&dir32, 1e-5f32), (&dir16, 0.05)] {
        let m = lopper::io::load_model(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for t in samples {
            assert_eq!(
                tok(&m, t),
                tok(gguf, t),
                "{}: tokenizer ids differ",
                dir.display()
            );
        }
        let logits = forward_logits(&m, ids).unwrap();
        let d = max_abs_diff(&logits, &ref_logits);
        eprintln!(
            "{}: max |Δlogit| on 64 wiki tokens = {d:.2e}",
            dir.display()
        );
        assert!(
            d <= tol,
            "{}: max logit difference {d} > {tol}",
            dir.display()
        );
    }
    let st16 = fs::metadata(dir16.join("model.safetensors")).unwrap().len();
    let st32 = fs::metadata(dir32.join("model.safetensors")).unwrap().len();
    assert!(
        (st16 as i64 * 2 - st32 as i64).abs() < 1 << 20,
        "f16 file {st16} bytes vs f32 {st32}"
    );
}

/// A calibration ids file `[n, len]` of pseudo-random ids below `vocab`.
fn ids_file(path: &Path, n: usize, len: usize, vocab: usize) {
    let mut rng = lopper::calibrate::SplitMix64(7);
    let ids: Vec<u8> = (0..n * len)
        .flat_map(|_| (rng.below(vocab as u64) as i64).to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n, len], &ids).unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, path).unwrap();
}

/// `dir/report.json`, parsed.
fn read_report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// The tiny llama3 model and a 4×32 calibration ids file for it (in `dir`).
fn tiny_with_ids(dir: &Path) -> (PathBuf, PathBuf) {
    let model = tiny("tiny-llama3");
    let vocab = lopper::io::load_model(&model).unwrap().config.vocab_size;
    let ids = dir.join("ids.safetensors");
    ids_file(&ids, 4, 32, vocab);
    (model, ids)
}

#[test]
fn prune_tiny_target_params_reports_the_search() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, ids) = tiny_with_ids(tmp.path());
    let dir = tmp.path().join("small");
    let out = lopper(&[
        "prune",
        "--model",
        &s(&model),
        "--target-params",
        "0.5",
        "--calib-ids",
        &s(&ids),
        "--out",
        &s(&dir),
        "--json",
    ]);
    assert_ok(&out);
    let report = read_report(&dir);
    let search = &report["search"];
    let cands = search["candidates"].as_array().unwrap();
    let chosen = search["chosen"].as_u64().unwrap() as usize;
    let best = cands
        .iter()
        .filter_map(|c| c["calib_perplexity"].as_f64())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(cands[chosen]["calib_perplexity"].as_f64(), Some(best));
    let removed = report["params_removed_fraction"].as_f64().unwrap();
    assert!((removed - 0.5).abs() < 0.02, "removed {removed}");
    // The saved model is the chosen mix.
    let m = lopper::io::load_model(&dir).unwrap();
    assert_eq!(
        m.weights.layers.len(),
        3 - cands[chosen]["layers"].as_u64().unwrap() as usize
    );
    assert_eq!(
        m.weights.num_params() as u64,
        report["size_after"]["params"].as_u64().unwrap()
    );
}

#[test]
fn prune_tiny_plan_shrinks_files_and_reports_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, ids) = tiny_with_ids(tmp.path());
    let plan = tmp.path().join("plan.toml");
    fs::write(
        &plan,
        "[[step]]\nkind = \"layers\"\nremove = [1]\n\
         [[step]]\nkind = \"neurons\"\nfraction = 0.25\nmetric = \"fluctuation\"\nbias_compensation = true\n\
         [[step]]\nkind = \"sparse\"\nmethod = \"magnitude\"\nsparsity = 0.5\n",
    )
    .unwrap();
    let dir = tmp.path().join("small");
    let out = lopper(&[
        "prune",
        "--model",
        &s(&model),
        "--plan",
        &s(&plan),
        "--calib-ids",
        &s(&ids),
        "--hf-strict",
        "--out",
        &s(&dir),
        "--json",
    ]);
    assert_ok(&out);
    let report = read_report(&dir);
    let steps = report["steps"].as_array().unwrap();
    let kinds: Vec<_> = steps.iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["layers", "neurons", "sparse"]);
    let params: Vec<u64> = steps
        .iter()
        .map(|s| s["size"]["params"].as_u64().unwrap())
        .collect();
    let before = report["size_before"]["params"].as_u64().unwrap();
    assert!(params[0] < before && params[1] < params[0], "{params:?}");
    assert_eq!(params[2], params[1], "unstructured pruning keeps shapes");
    assert!(
        steps[2]["size"]["nonzero_params"].as_u64().unwrap() < params[1],
        "{}",
        steps[2]
    );

    // The saved model is what the report says: 2 layers, FFN 120, fewer parameters.
    let m = lopper::io::load_model(&dir).unwrap();
    assert_eq!(m.weights.layers.len(), 2);
    assert!(m.weights.layers.iter().all(|l| l.intermediate() == 120));
    assert_eq!(m.weights.num_params() as u64, params[2]);
    let insp = lopper(&["inspect", &s(&dir), "--json"]);
    assert_ok(&insp);
    let v: serde_json::Value = serde_json::from_str(&insp.stdout).unwrap();
    assert_eq!(v["total_params"].as_u64().unwrap(), params[2]);

    // The file is smaller by the parameters removed (same writer, same dtype).
    let full = tmp.path().join("full");
    assert_ok(&lopper(&[
        "convert",
        "--model",
        &s(&model),
        "--out",
        &s(&full),
    ]));
    let size = |d: &Path| fs::metadata(d.join("model.safetensors")).unwrap().len() as i64;
    let saved = size(&full) - size(&dir);
    let expect = 4 * (before as i64 - params[2] as i64);
    assert!(
        (saved - expect).abs() < 8192,
        "file shrank by {saved} bytes, parameters by {expect} bytes"
    );

    // --hf-strict refuses a non-uniform result and writes nothing (adaptive allocation gives
    // these fixed calibration ids different FFN widths per layer; the computation is
    // deterministic).
    let strict = tmp.path().join("strict");
    let out = lopper(&[
        "prune",
        "--model",
        &s(&model),
        "--neurons",
        "0.3",
        "--width-allocation",
        "adaptive",
        "--calib-ids",
        &s(&ids),
        "--hf-strict",
        "--out",
        &s(&strict),
    ]);
    assert_fails(&out, &["--hf-strict", "transformers"]);
    assert!(!strict.exists());
}

/// Sampling flags with greedy decoding would change nothing: refused before the model loads.
#[test]
fn run_sampling_flags_need_a_temperature() {
    for flag in ["--top-k", "--top-p", "--seed"] {
        let out = lopper(&["run", "--prompt", "Hello", flag, "1"]);
        assert_fails(&out, &[flag, "needs --temperature > 0"]);
    }
}

//! The sparse runtime from the command line: `run --format`, `convert --format` (packed
//! directories that `run` loads as they are), `bench` decode figures, and bad format requests
//! failing with a message that names the format or the tensor.

use std::path::Path;
use std::process::Command;

/// Runs `lopper args…`; returns (success, stdout, stderr).
fn lopper(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .expect("run lopper");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = lopper(args);
    assert!(success, "lopper {args:?} failed:\n{stderr}");
    stdout
}

fn fails(args: &[&str], needles: &[&str]) {
    let (success, _, stderr) = lopper(args);
    assert!(!success, "lopper {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in:\n{stderr}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const PROMPT: &str = "The capital of France is";

/// Greedy text of `model` (or the default) with extra arguments.
fn generate(model: Option<&Path>, extra: &[&str]) -> String {
    let mut args = vec!["run", "--prompt", PROMPT, "--max-new", "12", "--ignore-eos"];
    if let Some(m) = model {
        args.extend(["--model", s(m)]);
    }
    args.extend(extra);
    ok(&args)
}

#[test]
fn bad_format_requests_fail_with_names() {
    fails(
        &["run", "--prompt", "x", "--format", "zip"],
        &["--format", "unknown format `zip`", "bitmask"],
    );
    fails(
        &["run", "--prompt", "x", "--head-format", "zip"],
        &["--head-format", "zip"],
    );
    // The default model is dense: N:M cannot represent its first linear.
    fails(
        &["run", "--prompt", "x", "--format", "nm"],
        &["model.layers.0.self_attn.q_proj.weight", "not N:M"],
    );
    fails(
        &["bench", "--format", "dense,zip", "--windows", "0"],
        &["--format", "zip"],
    );
    let dir = tempfile::tempdir().unwrap();
    fails(
        &[
            "convert",
            "--out",
            s(&dir.path().join("x")),
            "--format",
            "bitmask",
            "--dtype",
            "bf16",
        ],
        &["--dtype"],
    );
}

#[test]
#[ignore = "real model"]
fn packed_directories_run_like_the_model_they_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let pruned = dir.path().join("m24");
    ok(&[
        "prune",
        "--method",
        "magnitude",
        "--pattern",
        "2:4",
        "--sparsity",
        "0.5",
        "--out",
        s(&pruned),
    ]);
    let dense_text = generate(Some(&pruned), &[]);
    // Lossless formats give the greedy text of the dense model.
    for f in ["nm", "bitmask", "auto"] {
        assert_eq!(generate(Some(&pruned), &["--format", f]), dense_text, "{f}");
    }
    let packed = dir.path().join("m24-nm");
    ok(&[
        "convert",
        "--model",
        s(&pruned),
        "--out",
        s(&packed),
        "--format",
        "nm",
    ]);
    let cfg = std::fs::read_to_string(packed.join("config.json")).unwrap();
    assert!(cfg.contains("\"lopper_formats\"") && cfg.contains("\"nm\""));
    let size = |p: &Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        (size(&packed) as f64) < 0.75 * size(&pruned) as f64,
        "packed {} vs dense {}",
        size(&packed),
        size(&pruned)
    );
    // Loaded packed, no --format: same text.
    assert_eq!(generate(Some(&packed), &[]), dense_text);
    let inspect = ok(&["inspect", s(&packed)]);
    assert!(!inspect.is_empty());
}

#[test]
#[ignore = "real model"]
fn bench_reports_decode_figures_per_format() {
    let bench = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "--format",
            "dense,bf16",
            "--windows",
            "0",
            "--gen",
            "4",
            "--prompt-len",
            "8",
            "--reps",
            "1",
            "--json",
        ];
        args.extend(extra);
        serde_json::from_str(&ok(&args)).expect("bench --json prints JSON")
    };
    let v = bench(&["--no-head-screen"]);
    for key in [
        "stream_gbps",
        "stream_gbps_1_thread",
        "peak_fma_gflops",
        "gemm_gflops",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|g| g > 0.0),
            "{key}: {}",
            v[key]
        );
    }
    let rows = v["decode"].as_array().expect("decode rows");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["format"], "dense");
    assert_eq!(rows[0]["decode_speedup"], 1.0);
    assert_eq!(rows[0]["tokens_equal_to_baseline"], 4);
    // bf16 reads half the bytes of dense f32 (body and head).
    let (d, b) = (
        rows[0]["weight_bytes_per_token"].as_f64().unwrap(),
        rows[1]["weight_bytes_per_token"].as_f64().unwrap(),
    );
    assert!((b / d - 0.5).abs() < 1e-3, "{b} / {d}");
    assert!(rows[0]["head_screen_rows_per_step"].is_null());
    // By default greedy steps go through the head's int8 screen: the same tokens, and of the
    // 113 MB f32 head (57 MB bf16) about 29 MB (int8 copy, scales, bounds) plus a few rows are
    // read.
    let screened = bench(&[]);
    let srows = screened["decode"].as_array().expect("decode rows");
    assert_eq!(srows[1]["tokens_equal_to_baseline"], 4);
    for (r, full) in srows.iter().zip(rows) {
        let exact_rows = r["head_screen_rows_per_step"]
            .as_f64()
            .expect("screen rows");
        assert!((1.0..100.0).contains(&exact_rows), "{r}");
        let saved = full["weight_bytes_per_token"].as_f64().unwrap()
            - r["weight_bytes_per_token"].as_f64().unwrap();
        assert!(
            saved > 0.03 * d,
            "{}: saves {saved} bytes per token",
            r["format"]
        );
    }
    for r in rows {
        assert!(
            r["decode_tokens_per_s"].as_f64().is_some_and(|t| t > 0.0),
            "{r}"
        );
        assert!(
            r["prefill_tokens_per_s"].as_f64().is_some_and(|t| t > 0.0),
            "{r}"
        );
    }
}

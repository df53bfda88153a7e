//! `--act-sparsity` and its companion flags on the command line: values outside [0, 1), flags
//! that would take no effect, several values where one is allowed and sparse weight formats
//! are refused before any heavy work, naming the flag.

use std::process::Command;

fn lopper(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lopper"))
        .args(args)
        .output()
        .expect("start lopper");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused(args: &[&str], needles: &[&str]) {
    let (code, err) = lopper(args);
    assert!(
        code.is_some() && code != Some(0),
        "{args:?} exited {code:?}"
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in\n{err}");
    }
}

#[test]
fn bad_activation_sparsity_flags_are_refused() {
    refused(
        &["eval", "--act-sparsity", "1"],
        &["--act-sparsity", "[0, 1)"],
    );
    refused(
        &["eval", "--act-sparsity", "-0.1"],
        &["--act-sparsity", "[0, 1)"],
    );
    refused(
        &["run", "--prompt", "hi", "--act-sparsity", "0.3,0.4"],
        &["--act-sparsity", "one value"],
    );
    refused(
        &["run", "--prompt", "hi", "--act-score", "wina"],
        &["--act-score needs --act-sparsity"],
    );
    refused(
        &["eval", "--act-samples", "4"],
        &["--act-samples needs --act-sparsity"],
    );
    refused(
        &["eval", "--act-sparsity", "0.4", "--act-score", "l2"],
        &["--act-score", "magnitude, wina"],
    );
    refused(
        &["bench", "--format", "csr", "--act-sparsity", "0.4"],
        &["--format csr", "dense or bitmask"],
    );
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("m");
    let o = o.to_str().unwrap();
    refused(
        &["prune", "--act-sparsity", "1.5", "--out", o],
        &["--act-sparsity", "[0, 1)"],
    );
    refused(
        &[
            "prune",
            "--act-score",
            "wina",
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            o,
        ],
        &["--act-score needs --act-sparsity"],
    );
    assert!(!out.path().join("m").exists());
}

/// `prune --act-sparsity` alone stores thresholds and prunes no weight; `run` applies them.
#[test]
#[ignore = "real model"]
fn prune_stores_thresholds_that_run_applies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("act30");
    let o = out.to_str().unwrap();
    let (code, err) = lopper(&[
        "prune",
        "--act-sparsity",
        "0.3",
        "--samples",
        "2",
        "--calib-len",
        "64",
        "--out",
        o,
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.join(lopper::io::act_file::FILE).is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["act_sparsity"]["target"], 0.3);
    let m = lopper::io::load_model(&out).unwrap();
    let zeros = m.weights.layers[0]
        .q
        .weight
        .data()
        .iter()
        .filter(|v| **v == 0.0)
        .count();
    assert!(
        zeros < m.weights.layers[0].q.weight.len() / 100,
        "no static pruning"
    );
    let (code, err) = lopper(&["run", "--model", o, "--prompt", "Hello", "--max-new", "4"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("activation sparsity 0.30"), "{err}");
}

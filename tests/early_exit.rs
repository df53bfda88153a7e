//! Early exit (runtime/early_exit.rs): threshold 1 is plain decoding and plain perplexity;
//! the window evaluation makes the decisions sequential decoding makes (same exits, same
//! tokens), so its K/V propagation is decoding's; bad thresholds are refused.

mod common;
use common::*;
use lopper::runtime::early_exit::{
    check_threshold, generate_early_exit, perplexity, window_exits, ExitOpts,
};
use lopper::runtime::{generate, GenerateOpts, SampleOpts};

fn tiny(name: &str) -> lopper::Model {
    lopper::io::load_model(&golden().join("tiny").join(name)).unwrap()
}

fn opts(n: usize) -> GenerateOpts {
    GenerateOpts {
        max_new: n,
        sampling: SampleOpts::greedy(),
        stop_at_eos: false,
        stop_tokens: vec![],
    }
}

#[test]
fn threshold_one_is_plain() {
    let m = tiny("tiny-llama3");
    let prompt = [3u32, 77, 140, 9];
    let mut want = Vec::new();
    generate(&m, &prompt, &opts(30), &mut |t| want.push(t)).unwrap();
    let eo = ExitOpts::new(&m, 1.0).unwrap();
    let mut got = Vec::new();
    let st = generate_early_exit(&m, &eo, &prompt, &opts(30), &mut |t| got.push(t)).unwrap();
    assert_eq!(got, want);
    assert_eq!(st.early_exits, 0);
    assert_eq!(st.layers_run, 3 * st.tokens);
    let ids: Vec<u32> = (0..400u32).map(|i| (i * 37 + 11) % 320).collect();
    let path = std::path::Path::new("synthetic");
    let plain = lopper::eval::perplexity(&m, &ids, 100, 4, path, &mut |_, _| {}).unwrap();
    let (ee, layers) = perplexity(&m, &eo, &ids, 100, 4, path, &mut |_, _| {}).unwrap();
    let rel = (ee.perplexity - plain.perplexity).abs() / plain.perplexity;
    assert!(rel < 1e-5, "{} vs {}", ee.perplexity, plain.perplexity);
    assert_eq!(layers, 3.0);
}

/// Sequential decoding with early exit and the window evaluation of the decoded sequence agree
/// on every position's exit block and token (the default model cut to 8 blocks, whose
/// intermediate heads are confident enough to exit; tiny random models never are).
#[test]
fn window_evaluation_matches_decoding() {
    let m = default_model_cut(8);
    let prompt = [504u32, 2365, 282, 260, 1345, 30];
    let n_new = 40;
    let mut checked = 0;
    for t in [0.9f32, 0.8, 0.7, 0.6] {
        let eo = ExitOpts::new(&m, t).unwrap();
        let mut got = Vec::new();
        let st = generate_early_exit(&m, &eo, &prompt, &opts(n_new), &mut |x| got.push(x)).unwrap();
        eprintln!(
            "T {t}: {} of {} exited, {} blocks",
            st.early_exits, st.tokens, st.layers_run
        );
        if st.early_exits == 0 || st.early_exits == st.tokens {
            continue;
        }
        let win: Vec<u32> = prompt.iter().chain(&got).copied().collect();
        let e = window_exits(&m, &eo, &win, prompt.len()).unwrap();
        let p = prompt.len();
        // Position p−1 is the prefill's last (full model); p.. are decode steps.
        assert_eq!(e.exit_at[p - 1], 8);
        let layers: usize = e.exit_at[p..].iter().sum();
        assert_eq!(layers, st.layers_run, "T {t}: blocks run");
        for r in p - 1..win.len() - 1 {
            assert_eq!(e.argmax[r], win[r + 1], "T {t}: token at {r}");
        }
        checked += 1;
    }
    assert!(checked >= 2, "too few thresholds gave some early exits");
}

#[test]
fn thresholds_outside_zero_one_refused() {
    for t in [0.0f32, -0.5, 1.0001, f32::NAN] {
        let e = check_threshold(t).expect_err("refused").to_string();
        assert!(e.contains("--early-exit"), "{e}");
    }
    assert!(check_threshold(1.0).is_ok() && check_threshold(0.8).is_ok());
    for bad in ["0", "1.5", "-1"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lopper"))
            .args(["run", "--prompt", "x", "--early-exit", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--early-exit must be in (0, 1]"), "{err}");
    }
}

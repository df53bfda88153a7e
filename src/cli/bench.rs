//! `lopper bench`: prefill throughput (f32, full-sequence windows, all logits) next to the
//! machine's measured FMA peak and attained GEMM rate, all in the same run.

use anyhow::Result;
use clap::Args;
use lopper::model::observer::NoObserver;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens per prefill window.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Windows to time (after one warm-up window).
    #[arg(long, default_value_t = 3)]
    pub windows: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let path = super::model_path(&a.model)?;
    let model = super::load_model(&path, a.json)?;
    let threads = rayon::current_num_threads();
    let peak = lopper::kernels::probe::peak_fma_gflops(threads);
    let gemm = lopper::kernels::probe::gemm_gflops(
        a.seq_len,
        model.config.hidden_size,
        model.config.intermediate_size,
        3,
    );
    let text = lopper::assets::wiki_text()?;
    let ids = super::eval::tokenize_text(&model, &text)?;
    let wins = lopper::eval::make_windows(&ids, a.seq_len, a.windows + 1, &text)?;
    // Warm-up, then timed windows: forward + full-vocabulary NLL (what `eval` does).
    lopper::eval::window_nll(&model, wins[0])?;
    let mut eval_s = Vec::new();
    let mut fwd_s = Vec::new();
    for w in &wins[1..] {
        let t0 = Instant::now();
        lopper::model::forward::forward_hidden(&model, w, 1, w.len(), &mut NoObserver)?;
        fwd_s.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        lopper::eval::window_nll(&model, w)?;
        eval_s.push(t0.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (fwd, ev) = (med(&mut fwd_s), med(&mut eval_s));
    let hd = model.config.head_dim;
    let f_body = lopper::model::flops::prefill_flops(&model.weights, hd, a.seq_len, false);
    let f_all = lopper::model::flops::prefill_flops(&model.weights, hd, a.seq_len, true);
    let tok = a.seq_len as f64;
    let r = serde_json::json!({
        "model": path.display().to_string(),
        "threads": threads,
        "seq_len": a.seq_len,
        "windows_timed": fwd_s.len(),
        "peak_fma_gflops": peak,
        "gemm_gflops": gemm,
        "prefill_body_tokens_per_s": tok / fwd,
        "prefill_body_gflops": f_body / fwd / 1e9,
        "eval_tokens_per_s": tok / ev,
        "eval_gflops": f_all / ev / 1e9,
        "eval_fraction_of_peak": f_all / ev / 1e9 / peak,
        "eval_fraction_of_gemm": f_all / ev / 1e9 / gemm,
        "gflop_per_token_with_head": f_all / tok / 1e9,
        "peak_rss_bytes": lopper::util::peak_rss_bytes(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("machine     {threads} threads, FMA peak {peak:.1} GFLOP/s, GEMM ({}x{}x{}) {gemm:.1} GFLOP/s", a.seq_len, model.config.hidden_size, model.config.intermediate_size);
        println!(
            "prefill     {:.0} tokens/s ({:.1} GFLOP/s) blocks only, {} tokens/window",
            tok / fwd,
            f_body / fwd / 1e9,
            a.seq_len
        );
        println!(
            "eval        {:.0} tokens/s with all logits + NLL ({:.1} GFLOP/s = {:.0}% of FMA peak, {:.0}% of GEMM rate; {:.3} GFLOP/token)",
            tok / ev,
            f_all / ev / 1e9,
            100.0 * f_all / ev / 1e9 / peak,
            100.0 * f_all / ev / 1e9 / gemm,
            f_all / tok / 1e9
        );
        if let Some(rss) = lopper::util::peak_rss_bytes() {
            println!("peak RSS    {:.2} GB", rss as f64 / 1e9);
        }
    }
    Ok(())
}

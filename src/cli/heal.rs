//! `lopper heal`: distil a dense teacher into a pruned student (LoRA or masked full
//! fine-tuning; see `lopper::train`), keeping every pruned weight exactly zero, and write the
//! student as an HF directory with report.json.

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::train::{self, data::Windows, heal::HealOpts, Mode};
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct HealArgs {
    /// The pruned model to heal (GGUF file or HF directory).
    #[arg(long)]
    pub model: PathBuf,
    /// The dense teacher (same vocabulary and tokenizer).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Output HF directory (written atomically, with report.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// Training tokens (rounded up to whole windows).
    #[arg(long, default_value_t = 32768)]
    pub tokens: usize,
    /// Tokens per training window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// LoRA rank on every block linear (the default mode).
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / rank.
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Masked full fine-tuning of the block linears, biases and norms instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// Peak learning rate (default: 1e-3 for LoRA, 5e-5 for --full).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub kd_temp: f64,
    /// Add the per-block hidden-state loss with this weight (same block count and width).
    #[arg(long)]
    pub hidden_loss: Option<f64>,
    /// Training texts (default: exllamav2's c4, technical, code and tiny files). wiki.utf8,
    /// the evaluation text, is refused.
    #[arg(long, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Continue from the checkpoint in --checkpoint-dir (same model, teacher, texts, flags).
    #[arg(long)]
    pub resume: bool,
    /// Steps between checkpoints (0: none).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Checkpoint directory (default: `<out>.heal-ckpt`; removed after a finished run).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Stop after this many steps of this run, leaving a checkpoint (to split a long run).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Seed of the data order and of LoRA's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Measure perplexity before and after (wiki-16x2048 unless --eval-text etc. say otherwise).
    #[arg(long)]
    pub eval: bool,
    /// Evaluation text for --eval (default: wiki.utf8); never trained on.
    #[arg(long)]
    pub eval_text: Option<PathBuf>,
    /// Evaluation windows for --eval.
    #[arg(long, default_value_t = 16)]
    pub eval_windows: usize,
    /// Evaluation window length for --eval.
    #[arg(long, default_value_t = 2048)]
    pub eval_seq_len: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Fraction of exactly-zero weights over the block linears, and their count.
fn sparsity(m: &lopper::Model) -> (f64, usize) {
    let (mut z, mut n) = (0usize, 0usize);
    for l in &m.weights.layers {
        for k in lopper::LinearKind::ALL {
            let w = &l.linear(k).weight;
            z += w.count_zeros();
            n += w.len();
        }
    }
    (z as f64 / n.max(1) as f64, z)
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn perplexity(
    m: &lopper::Model,
    ids: &[u32],
    a: &HealArgs,
    text: &Path,
    quiet: bool,
) -> Result<lopper::eval::EvalResult> {
    let pb = super::bar(quiet, a.eval_windows as u64, "eval");
    let r = lopper::eval::perplexity(m, ids, a.eval_seq_len, a.eval_windows, text, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    Ok(r)
}

/// Process settings for training: candle's element-wise ops on one thread (its pool's workers
/// spin-wait, which on a few busy cores cost more than they gain; matrix products keep every
/// thread). (Raising glibc's mmap threshold for the graph's temporaries made a step ~15% faster
/// but let the heap grow by hundreds of MB per step; not done.)
fn tune_for_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

pub fn run(a: HealArgs) -> Result<()> {
    tune_for_training();
    if a.out.exists() && !a.force {
        bail!(lopper::Error::Output {
            path: a.out.clone(),
            msg: "already exists (pass --force to replace it)".into()
        });
    }
    for (flag, p) in [("--model", &a.model), ("--teacher", &a.teacher)] {
        if same_path(p, &a.out) {
            bail!(
                "--out {} is the {flag} input; choose another directory",
                a.out.display()
            );
        }
    }
    if a.seq_len < 2 || a.tokens == 0 {
        bail!("--seq-len must be at least 2 and --tokens positive");
    }
    // Negated so that NaN is refused too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    let bad = !(a.kd_temp > 0.0)
        || a.lr.is_some_and(|l| !(l > 0.0))
        || a.hidden_loss.is_some_and(|w| !(w >= 0.0));
    if bad {
        bail!("--kd-temp and --lr must be positive, --hidden-loss non-negative");
    }
    if !a.full && a.lora_rank == 0 {
        bail!("--lora-rank must be at least 1");
    }
    let mode = if a.full {
        Mode::Full
    } else {
        Mode::Lora {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
        }
    };
    let lr = a.lr.unwrap_or(if a.full { 5e-5 } else { 1e-3 });
    let mut student = super::load_model(&a.model, a.quiet)?;
    let teacher = super::load_model(&a.teacher, a.quiet)?;
    // Texts: the evaluation text is refused as training text.
    let eval_text = match &a.eval_text {
        Some(p) => Some(p.clone()),
        None if a.eval => {
            Some(lopper::assets::wiki_text().context("fetching wiki.utf8 for --eval")?)
        }
        None => {
            let cached = lopper::assets::cache_dir().join(lopper::assets::WIKI_TEXT.file_name);
            cached.is_file().then_some(cached)
        }
    };
    let wiki_lines = match &eval_text {
        Some(p) => Some(train::data::wiki_line_set(p)?),
        None => None,
    };
    let paths = if a.text.is_empty() {
        train::data::default_texts().context("fetching the default training texts")?
    } else {
        a.text.clone()
    };
    let tok = student.tokenizer()?.clone();
    let mut texts = Vec::new();
    for p in &paths {
        let t = train::data::read_text(p, wiki_lines.as_ref())?;
        texts.push((p.clone(), lopper::tokenizer::encode(&tok, &t, p)?));
    }
    let data = Windows::new(&texts, a.seq_len, a.seed)?;
    let steps = a.tokens.div_ceil(a.seq_len);
    let ckpt_dir = a.checkpoint_dir.clone().unwrap_or_else(|| {
        let mut s = a.out.clone().into_os_string();
        s.push(".heal-ckpt");
        PathBuf::from(s)
    });
    let opts = HealOpts {
        mode,
        lr,
        tau: a.kd_temp,
        hidden_weight: a.hidden_loss,
        steps,
        seed: a.seed,
        adam: Default::default(),
        checkpoint_every: a.checkpoint_every,
        checkpoint_dir: Some(ckpt_dir.clone()),
        resume: a.resume,
        stop_after: a.stop_after,
        max_bad: 3,
    };
    train::heal::check_pair(&student, &teacher, a.hidden_loss.is_some())?;
    let (sp_before, zeros_before) = sparsity(&student);
    let eval_ids = match (&eval_text, a.eval) {
        (Some(p), true) => Some(super::eval::tokenize_text(&student, p)?),
        _ => None,
    };
    // `--eval`: the same windows before and after training.
    let eval_ppl = |m: &lopper::Model| -> Result<Option<lopper::eval::EvalResult>> {
        let text = eval_text.as_deref().unwrap_or(Path::new(""));
        eval_ids
            .as_ref()
            .map(|ids| perplexity(m, ids, &a, text, a.quiet))
            .transpose()
    };
    let ppl_before = eval_ppl(&student)?;
    let pb = super::bar(a.quiet, (steps * a.seq_len) as u64, "heal");
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut started: Option<usize> = None;
    let t0 = std::time::Instant::now();
    let out = train::heal::heal(
        &student,
        &teacher,
        &data,
        &opts,
        &candle_core::Device::Cpu,
        &mut |st, loss| {
            let first = *started.get_or_insert(st.tokens - a.seq_len);
            pb.set_position(st.tokens as u64);
            let tps = (st.tokens - first) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("loss {loss:.4}  {tps:.0} tok/s"));
        },
    )?;
    pb.finish_and_clear();
    if !out.finished {
        println!(
            "stopped after step {} of {steps}; checkpoint in {} (continue with --resume)",
            out.state.step,
            ckpt_dir.display()
        );
        return Ok(());
    }
    out.tm.write_back(&mut student)?;
    drop(out.tm);
    let (sp_after, zeros_after) = sparsity(&student);
    if zeros_after != zeros_before {
        bail!("internal error: the sparsity changed from {zeros_before} to {zeros_after} zero weights; nothing written");
    }
    let ppl_after = eval_ppl(&student)?;
    let st = &out.state;
    let report = json!({
        "command": "heal",
        "model": a.model, "teacher": a.teacher,
        "mode": mode, "lr": lr, "kd_temp": a.kd_temp, "hidden_loss": a.hidden_loss,
        "seq_len": a.seq_len, "seed": a.seed, "steps": st.step,
        "texts": texts.iter().map(|(p, ids)| json!({"path": p, "tokens": ids.len()})).collect::<Vec<_>>(),
        "text_tokens_per_epoch": data.tokens(),
        "tokens": st.tokens, "seconds": st.seconds,
        "tokens_per_second": st.tokens as f64 / st.seconds.max(1e-9),
        "peak_rss_bytes": lopper::util::peak_rss_bytes(),
        "skipped_steps": st.skipped,
        "loss_curve": st.losses,
        "sparsity_before": sp_before, "sparsity_after": sp_after,
        "eval": eval_text.as_ref().filter(|_| a.eval).map(|p| json!({
            "text": p, "windows": a.eval_windows, "seq_len": a.eval_seq_len,
            "perplexity_before": ppl_before.as_ref().map(|r| r.perplexity),
            "perplexity_after": ppl_after.as_ref().map(|r| r.perplexity),
            // The same model's forward (prefill) rate, measured in this run, as the baseline
            // of the training rate.
            "prefill_tokens_per_second": ppl_before.as_ref().map(|r| r.tokens_per_second),
            "train_over_prefill": ppl_before.as_ref().map(|r| st.tokens as f64 / st.seconds.max(1e-9) / r.tokens_per_second),
        })),
    });
    let report = serde_json::to_string_pretty(&report)?;
    lopper::io::save::save_hf_with_extras(
        &student,
        &a.out,
        lopper::io::save::SaveDtype::F32,
        a.force,
        &[("report.json", report.as_bytes())],
    )?;
    let _ = std::fs::remove_dir_all(&ckpt_dir);
    println!(
        "trained       {} tokens in {:.1} s ({:.0} tokens/s), {} steps skipped",
        st.tokens,
        st.seconds,
        st.tokens as f64 / st.seconds.max(1e-9),
        st.skipped
    );
    println!("sparsity      {sp_before:.5} before, {sp_after:.5} after");
    if let (Some(b), Some(c)) = (&ppl_before, &ppl_after) {
        println!(
            "perplexity    {:.3} before, {:.3} after",
            b.perplexity, c.perplexity
        );
        println!(
            "prefill       {:.0} tokens/s (eval of the same model); training runs at {:.3} of it",
            b.tokens_per_second,
            st.tokens as f64 / st.seconds.max(1e-9) / b.tokens_per_second
        );
    }
    println!("wrote         {} (report.json inside)", a.out.display());
    Ok(())
}

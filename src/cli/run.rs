//! `lopper run`: generate text from a prompt with a KV cache, streaming tokens to stdout.

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::runtime::{generate, GenerateOpts, SampleOpts, TextStream};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// GGUF file or HF directory (default: SmolLM2-135M-Instruct, fetched).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt text (encoded without BOS; special-token text such as `<|im_start|>` is
    /// recognised).
    #[arg(long)]
    pub prompt: String,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub max_new: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Sample only from the k most likely tokens (0 = no limit) [default: 0]; needs
    /// --temperature > 0.
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1]
    /// [default: 1]; needs --temperature > 0.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// RNG seed for sampling [default: 0]; needs --temperature > 0.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wrap the prompt as one user turn of the model's chat template. Only ChatML templates
    /// (`<|im_start|>…`, e.g. SmolLM2, Qwen2) are supported — no Jinja engine; the template's
    /// default system prompt, if any, is not added.
    #[arg(long)]
    pub chat: bool,
    /// Extra stop token id (repeatable). The model's eos token always stops generation unless
    /// --ignore-eos.
    #[arg(long = "stop-id")]
    pub stop_ids: Vec<u32>,
    /// Do not stop at the model's eos token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Weight format for the runtime: auto[-bf16|-f16], dense, bf16, f16, int8,
    /// bitmask[-bf16|-f16|-i8], csr[-bf16|-f16|-i8], nm[-bf16|-f16|-i8], bsr. Default: as loaded (packed if saved packed, else
    /// dense f32).
    #[arg(long)]
    pub format: Option<String>,
    /// Format of the LM head (default: dense with the --format's value type).
    #[arg(long)]
    pub head_format: Option<String>,
    /// Compute every logit at each step instead of going through the LM head's int8 argmax screen,
    /// which greedy and top-k sampling use (the same tokens, about a quarter of the head read
    /// per step; sampling without --top-k always computes every logit).
    #[arg(long)]
    pub no_head_screen: bool,
    #[command(flatten)]
    pub spec: super::dynamic::SpecArgs,
    /// Early exit (lossy): leave a token's forward pass at an intermediate block once the
    /// largest next-token probability there reaches T, in (0, 1] (docs/dynamic_depth.md).
    #[arg(long, allow_negative_numbers = true)]
    pub early_exit: Option<f32>,
    /// Token pruning of the prompt (lossy, LazyLLM): prefill runs this fraction, in (0, 1], of
    /// the prompt's (token, block) computations, dropping the tokens the last one attends to
    /// least (docs/dynamic_depth.md).
    #[arg(long, allow_negative_numbers = true)]
    pub token_keep: Option<f32>,
    /// How the prompt tokens dropped by --token-keep get their K/V before decoding: exact (run
    /// through their remaining blocks after the first token) or propagate (projected from the
    /// state they were dropped in) [default: exact].
    #[arg(long)]
    pub token_revive: Option<String>,
    #[command(flatten)]
    pub act: super::act::ActArgs,
}

/// The ChatML wrapping of one user message.
pub fn chatml(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

pub fn run(a: RunArgs) -> Result<()> {
    a.spec.check()?;
    if let Some(t) = a.early_exit {
        lopper::runtime::early_exit::check_threshold(t)?;
        if a.spec.active() {
            bail!("--early-exit cannot be combined with --speculative / --draft (speculative decoding is lossless, early exit is not)");
        }
    }
    let revive = super::token_keep::revival(&a.token_revive, a.token_keep.is_some())?;
    if let Some(f) = a.token_keep {
        lopper::runtime::token_prune::check_keep(f)?;
        if a.spec.active() || a.early_exit.is_some() {
            bail!(
                "--token-keep cannot be combined with --speculative / --draft / --early-exit yet"
            );
        }
    }
    a.act.check(false)?;
    if a.temperature == 0.0 {
        for (flag, given) in [
            ("--top-k", a.top_k.is_some()),
            ("--top-p", a.top_p.is_some()),
            ("--seed", a.seed.is_some()),
        ] {
            if given {
                bail!("{flag} needs --temperature > 0 (temperature 0 decodes greedily)");
            }
        }
    }
    let sampling = SampleOpts {
        temperature: a.temperature,
        top_k: a.top_k.unwrap_or(0),
        top_p: a.top_p.unwrap_or(1.0),
        seed: a.seed.unwrap_or(0),
    };
    sampling.validate()?;
    if a.prompt.is_empty() {
        bail!("--prompt must not be empty");
    }
    let path = super::model_path(&a.model)?;
    let mut model = super::load_model(&path, false)?;
    let act = super::act::setup(&mut model, &a.act, false)?;
    if act.is_some() && (a.spec.active() || a.early_exit.is_some() || a.token_keep.is_some()) {
        bail!("activation sparsity (--act-sparsity, or thresholds stored with {}) cannot be combined with --speculative / --draft / --early-exit / --token-keep yet", path.display());
    }
    super::pack_model(
        &mut model,
        a.format.as_deref(),
        a.head_format.as_deref(),
        false,
    )?;
    super::act::pack_for_decode(&mut model, a.format.as_deref(), false)?;
    // Greedy and top-k sampling look only at the k largest logits: the head's screen serves them.
    if !a.no_head_screen && (sampling.is_greedy() || sampling.top_k > 0) {
        lopper::runtime::pack::attach_head_screen(&mut model)
            .context("building the LM head's argmax screen (--no-head-screen skips it)")?;
    }
    let tok = model.tokenizer()?;
    let mut stop_tokens = a.stop_ids.clone();
    let text = if a.chat {
        match &model.chat_template {
            Some(t) if t.contains("<|im_start|>") => {
                stop_tokens.extend(tok.token_to_id("<|im_end|>"));
                chatml(&a.prompt)
            }
            Some(_) => bail!(
                "--chat: the chat template of {} is not ChatML (<|im_start|>); only ChatML templates are supported — pass the formatted prompt without --chat",
                path.display()
            ),
            None => bail!("--chat: {} has no chat template; pass the formatted prompt without --chat", path.display()),
        }
    } else {
        a.prompt.clone()
    };
    let ids = lopper::tokenizer::encode(tok, &text, &path)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let opts = GenerateOpts {
        max_new: a.max_new,
        sampling,
        stop_at_eos: !a.ignore_eos,
        stop_tokens,
    };
    let mut stream = TextStream::new(tok, &ids, true);
    let mut out = std::io::stdout().lock();
    let mut ended_nl = true;
    let mut io_err: Option<std::io::Error> = None;
    let screen = !a.no_head_screen && (sampling.is_greedy() || sampling.top_k > 0);
    let draft = match a.spec.active() {
        true => Some(super::dynamic::build_draft(&model, &a.spec, screen, false)?.0),
        false => None,
    };
    let mut emit = |id| {
        let piece = stream.push(id);
        if !piece.is_empty() && io_err.is_none() {
            ended_nl = piece.ends_with('\n');
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                io_err = Some(e);
            }
        }
    };
    let mut spec_line = None;
    let stats = match &draft {
        Some(d) => {
            let s = lopper::runtime::speculative::generate_speculative(
                &model,
                &d.draft(),
                &ids,
                &opts,
                &a.spec.opts(),
                &mut emit,
            )?;
            spec_line = Some(format!(
                "speculative: {} rounds + {} plain steps; acceptance {:.2}, {:.2} accepted per round; draft {:.1} ms/drafted token, verify {:.1} ms/token",
                s.rounds, s.plain_steps, s.acceptance_rate, s.mean_accepted, s.draft_ms_per_token, s.verify_ms_per_token
            ));
            s.generate
        }
        None => match a.early_exit {
            Some(t) => {
                let eo = lopper::runtime::early_exit::ExitOpts::new(&model, t)?;
                let s = lopper::runtime::early_exit::generate_early_exit(
                    &model, &eo, &ids, &opts, &mut emit,
                )?;
                spec_line = Some(format!(
                    "early exit T={t}: {:.2} blocks per token of {}, {} of {} tokens exited early",
                    s.layers_run as f64 / s.tokens.max(1) as f64,
                    model.weights.layers.len(),
                    s.early_exits,
                    s.tokens
                ));
                s.generate
            }
            None => match a.token_keep {
                Some(f) => {
                    let n = model.weights.layers.len();
                    let sched = lopper::runtime::token_prune::Schedule::new(n, f)?;
                    let s = lopper::runtime::token_prune::generate_token_pruned(
                        &model, &sched, revive, &ids, &opts, &mut emit,
                    )?;
                    spec_line = Some(format!(
                        "token keep F={f}: prefill ran {:.3} of the prompt's token-blocks (share {:.3} per pruning point); dropped tokens revived ({revive:?}) in {:.3} s",
                        s.kept_fraction, sched.ratio, s.revive_seconds
                    ));
                    s.generate
                }
                None => generate(&model, &ids, &opts, &mut emit)?,
            },
        },
    };
    if let Some(e) = io_err {
        return Err(e).context("writing to stdout");
    }
    if !ended_nl {
        writeln!(out)?;
    }
    eprintln!(
        "prompt {} tokens, prefill {:.3} s ({:.1} tokens/s); generated {} tokens, decode {:.3} s ({:.1} tokens/s); stop: {:?}",
        stats.prompt_tokens,
        stats.prefill_seconds,
        stats.prefill_tokens_per_s,
        stats.new_tokens,
        stats.decode_seconds,
        stats.decode_tokens_per_s,
        stats.stop
    );
    if let Some(l) = spec_line {
        eprintln!("{l}");
    }
    if let Some(d) = act {
        eprintln!(
            "activation sparsity {d}; reached {}",
            super::act::reached_json(&model)
        );
    }
    Ok(())
}

//! Prefill and decode speed of a structurally pruned model against its dense original, measured
//! in the same process with the runs interleaved (dense, small, dense, small, …) so machine
//! drift hits both alike; medians of the rounds are compared.
//!
//! ```sh
//! cargo run --release -- prune --remove-layers 6 --neurons 0.2 --out /tmp/small --force
//! cargo run --release --example structured_bench -- --small /tmp/small [--base M]
//!     [--prompt-len 128] [--gen 64] [--rounds 5] [--json]
//! ```
//!
//! Prefill: one prompt of `--prompt-len` tokens through the KV-cached forward (all layers, last
//! logits). Decode: `--gen` greedy steps after it, one token at a time (weights streamed from
//! memory every step, so decode speed follows the bytes of weights read per token).

use lopper::runtime::kv::{forward_step, KvCache};
use lopper::runtime::sample::argmax;
use lopper::Model;
use std::path::PathBuf;
use std::time::Instant;

struct Args {
    base: Option<PathBuf>,
    small: PathBuf,
    prompt_len: usize,
    gen: usize,
    rounds: usize,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        base: None,
        small: PathBuf::new(),
        prompt_len: 128,
        gen: 64,
        rounds: 5,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    let mut small = None;
    while let Some(f) = it.next() {
        let mut val = || it.next().ok_or(format!("{f} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|e| format!("{f}: {e}"));
        match f.as_str() {
            "--base" => a.base = Some(PathBuf::from(val()?)),
            "--small" => small = Some(PathBuf::from(val()?)),
            "--prompt-len" => a.prompt_len = num(val()?)?,
            "--gen" => a.gen = num(val()?)?,
            "--rounds" => a.rounds = num(val()?)?.max(1),
            "--json" => a.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    a.small = small.ok_or("--small DIR (the structurally pruned model) is required")?;
    Ok(a)
}

/// Seconds for the prefill of `prompt` and for `gen` greedy decode steps.
fn time_once(model: &Model, prompt: &[u32], gen: usize) -> lopper::Result<(f64, f64)> {
    let mut cache = KvCache::new(model, prompt.len() + gen + 1);
    let t = Instant::now();
    let logits = forward_step(model, prompt, &mut cache)?;
    let prefill = t.elapsed().as_secs_f64();
    let mut next = argmax(&logits);
    let t = Instant::now();
    for _ in 0..gen {
        let logits = forward_step(model, &[next], &mut cache)?;
        next = argmax(&logits);
    }
    Ok((prefill, t.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse_args()?;
    let base_path = match &a.base {
        Some(p) => p.clone(),
        None => lopper::assets::default_model()?,
    };
    let base = lopper::io::load_model(&base_path)?;
    let small = lopper::io::load_model(&a.small)?;
    let text = lopper::assets::wiki_text()?;
    let raw = std::fs::read_to_string(&text)?;
    let cut = raw.char_indices().nth(50_000).map_or(raw.len(), |(i, _)| i);
    let ids = lopper::tokenizer::encode(base.tokenizer()?, &raw[..cut], &text)?;
    let prompt: Vec<u32> = ids.into_iter().take(a.prompt_len).collect();
    if prompt.len() < a.prompt_len {
        return Err(format!("the text gave only {} tokens", prompt.len()).into());
    }
    // Warm-up (page in weights, grow buffers), then interleaved rounds.
    time_once(&base, &prompt, 4)?;
    time_once(&small, &prompt, 4)?;
    let (mut bp, mut bd, mut sp, mut sd) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        let (p, d) = time_once(&base, &prompt, a.gen)?;
        bp.push(p);
        bd.push(d);
        let (p, d) = time_once(&small, &prompt, a.gen)?;
        sp.push(p);
        sd.push(d);
    }
    let (bp, bd, sp, sd) = (median(bp), median(bd), median(sp), median(sd));
    let (pb, ps) = (base.weights.num_params(), small.weights.num_params());
    let pl = a.prompt_len as f64;
    let g = a.gen as f64;
    let r = serde_json::json!({
        "base": base_path.display().to_string(),
        "small": a.small.display().to_string(),
        "threads": rayon::current_num_threads(),
        "params_base": pb,
        "params_small": ps,
        "params_removed_fraction": 1.0 - ps as f64 / pb as f64,
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "rounds": a.rounds,
        "prefill_tokens_per_s": { "base": pl / bp, "small": pl / sp, "speedup": bp / sp },
        "decode_tokens_per_s": { "base": g / bd, "small": g / sd, "speedup": bd / sd },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "params        base {pb}  small {ps}  ({:.1}% removed)",
            100.0 * (1.0 - ps as f64 / pb as f64)
        );
        println!(
            "prefill       base {:.0} tok/s  small {:.0} tok/s  speedup {:.2}x  ({} tokens)",
            pl / bp,
            pl / sp,
            bp / sp,
            a.prompt_len
        );
        println!(
            "decode        base {:.1} tok/s  small {:.1} tok/s  speedup {:.2}x  ({} tokens, median of {})",
            g / bd,
            g / sd,
            bd / sd,
            a.gen,
            a.rounds
        );
    }
    Ok(())
}

//! Autoregressive generation: prefill the prompt into a [`KvCache`], then decode one token at a
//! time until a stop token, `max_new` tokens, or the cache's capacity.
//!
//! Timing: prefill is the prompt's forward pass (which also yields the first new token's logits);
//! decode is every later single-token step. `decode_tokens_per_s` = decode steps / decode time.
//! [`TextStream`] turns the growing id list into printable text increments.

use super::kv::{forward_step, forward_step_top_k, KvCache};
use super::sample::{SampleOpts, Sampler};
use crate::{Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOpts {
    /// Most new tokens to produce.
    pub max_new: usize,
    pub sampling: SampleOpts,
    /// Stop when the model's `eos_token_id` (from its config) is produced.
    pub stop_at_eos: bool,
    /// Further stop token ids.
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerateOpts {
    fn default() -> Self {
        GenerateOpts {
            max_new: 128,
            sampling: SampleOpts::default(),
            stop_at_eos: true,
            stop_tokens: vec![],
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// `max_new` tokens were produced.
    MaxNew,
    /// A stop token was produced (it is not passed to `on_token`, nor counted).
    StopToken(u32),
    /// The model's context (`max_position_embeddings`) is full.
    Context,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    /// Tokens passed to `on_token` (stop tokens excluded).
    pub new_tokens: usize,
    /// Single-token forward steps after the prefill.
    pub decode_steps: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub stop: StopReason,
}

/// Generate from `prompt_ids`, calling `on_token` with each new token as it is chosen.
impl GenerateStats {
    /// Nothing generated yet, for a prompt of `prompt_tokens`.
    pub fn new(prompt_tokens: usize) -> GenerateStats {
        GenerateStats {
            prompt_tokens,
            new_tokens: 0,
            decode_steps: 0,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: 0.0,
            stop: StopReason::MaxNew,
        }
    }

    /// Fills the tokens/s figures from the counts and seconds.
    pub fn finish_rates(&mut self) {
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        self.prefill_tokens_per_s = rate(self.prompt_tokens, self.prefill_seconds);
        self.decode_tokens_per_s = rate(self.decode_steps, self.decode_seconds);
    }

    /// One chosen token: hands it to `on_token` and counts it unless it is a stop token.
    /// Returns whether decoding goes on: false at a stop token, after `max_new` tokens, or with
    /// no cache position left (`remaining`), with [`GenerateStats::stop`] set to say which.
    /// Shared by plain, early-exit and token-pruned decoding.
    pub fn emit(
        &mut self,
        tok: u32,
        stops: &[u32],
        max_new: usize,
        remaining: usize,
        on_token: &mut dyn FnMut(u32),
    ) -> bool {
        if stops.contains(&tok) {
            self.stop = StopReason::StopToken(tok);
            return false;
        }
        on_token(tok);
        self.new_tokens += 1;
        if self.new_tokens >= max_new {
            return false;
        }
        if remaining == 0 {
            self.stop = StopReason::Context;
            return false;
        }
        true
    }
}

/// The tokens that end generation: the requested ones, plus EOS when asked.
pub fn stop_tokens(model: &Model, opts: &GenerateOpts) -> Vec<u32> {
    let mut stops = opts.stop_tokens.clone();
    if opts.stop_at_eos {
        stops.extend(model.config.eos_token_id);
    }
    stops
}

/// Refuses an empty prompt or one longer than the model's context; returns the context.
pub fn check_prompt(model: &Model, prompt_ids: &[u32]) -> Result<usize> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid("generation needs a non-empty prompt".into()));
    }
    let ctx = model.config.max_position_embeddings.max(1);
    if prompt_ids.len() > ctx {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt_ids.len()
        )));
    }
    Ok(ctx)
}

pub fn generate(
    model: &Model,
    prompt_ids: &[u32],
    opts: &GenerateOpts,
    on_token: &mut dyn FnMut(u32),
) -> Result<GenerateStats> {
    let mut sampler = Sampler::new(opts.sampling)?;
    let ctx = check_prompt(model, prompt_ids)?;
    let stops = stop_tokens(model, opts);
    // The last new token is never fed back, so the cache needs prompt + max_new − 1 positions.
    let cap = (prompt_ids.len() + opts.max_new.saturating_sub(1)).min(ctx);
    let mut cache = KvCache::new(model, cap);
    let mut stats = GenerateStats::new(prompt_ids.len());
    // Greedy and top-k steps go through the LM head's argmax screen when there is one: the k
    // largest logits, all the sampler looks at, come out exactly as from the full head.
    let s = &opts.sampling;
    let k = if s.is_greedy() { 1 } else { s.top_k };
    let screened = k > 0 && model.weights.lm_head_screen.is_some();
    let mut step = |tokens: &[u32], cache: &mut KvCache| -> Result<u32> {
        let logits = if screened {
            forward_step_top_k(model, tokens, cache, k)?
        } else {
            forward_step(model, tokens, cache)?
        };
        Ok(sampler.sample(&logits))
    };
    if opts.max_new > 0 {
        let t = Instant::now();
        let mut tok = step(prompt_ids, &mut cache)?;
        stats.prefill_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        loop {
            if !stats.emit(tok, &stops, opts.max_new, cache.remaining(), on_token) {
                break;
            }
            tok = step(&[tok], &mut cache)?;
            stats.decode_steps += 1;
        }
        stats.decode_seconds = t.elapsed().as_secs_f64();
    }
    stats.finish_rates();
    Ok(stats)
}

/// Incremental detokenizer: feed ids one at a time, get back the text they add.
///
/// Each push decodes a few context ids from the prompt plus all new ids and returns the part
/// of the string not yet returned, so byte-level BPE pieces and SentencePiece leading spaces come
/// out right; a trailing U+FFFD (a multi-byte character cut in the middle) is held back until
/// the next id completes it.
pub struct TextStream<'a> {
    tok: &'a tokenizers::Tokenizer,
    ids: Vec<u32>,
    /// Bytes of the decoded string already returned (starts at the decoded context's length).
    printed: usize,
    skip_special: bool,
}

impl<'a> TextStream<'a> {
    /// A stream whose output continues after `prompt_ids` (up to 4 of its last ids are used as
    /// context); `skip_special` drops special tokens from the text.
    pub fn new(tok: &'a tokenizers::Tokenizer, prompt_ids: &[u32], skip_special: bool) -> Self {
        let ctx = prompt_ids[prompt_ids.len().saturating_sub(4)..].to_vec();
        let printed = tok.decode(&ctx, skip_special).map(|s| s.len()).unwrap_or(0);
        TextStream {
            tok,
            ids: ctx,
            printed,
            skip_special,
        }
    }

    /// Add `id`; returns the new text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let Ok(s) = self.tok.decode(&self.ids, self.skip_special) else {
            return String::new();
        };
        if s.ends_with('\u{FFFD}') {
            return String::new();
        }
        match s.get(self.printed..) {
            Some(new) => {
                self.printed = s.len();
                new.to_string()
            }
            None => String::new(),
        }
    }
}

//! The runtime: autoregressive generation with a KV cache.
//!
//! [`kv`] holds the per-layer key/value cache and [`forward_step`], which runs a chunk of new
//! tokens (a prompt or one sampled token) against it; [`sample`] turns logits into the next token
//! (greedy, temperature, top-k, top-p with a seeded RNG); [`generate`](mod@generate) drives the
//! prefill → decode loop with stop tokens, streams tokens to a callback and times both phases.
//! [`pack`](mod@pack) packs the weights into compressed formats (chosen per tensor by
//! [`autopick`] for `auto`) that the forward pass then uses, and gives the LM head an int8 argmax
//! screen ([`pack::attach_head_screen`]) through which greedy and top-k steps
//! ([`kv::forward_step_top_k`]) pick the same tokens while reading about a quarter of the head.
//! [`speculative`] drafts tokens with skipped blocks (or a pruned model) and verifies them in one
//! batched step: greedy output bit-identical, sampling exact in distribution; [`early_exit`]
//! stops a token at an intermediate block when the head is confident there (lossy);
//! [`token_prune`] drops the prompt tokens the last token attends to least during prefill
//! (LazyLLM, lossy).

pub mod act;
pub mod autopick;
pub mod choice;
pub mod draft_search;
pub mod early_exit;
pub mod generate;
pub mod kv;
pub mod pack;
pub mod sample;
pub mod speculative;
pub mod token_prune;

pub use generate::{generate, GenerateOpts, GenerateStats, StopReason, TextStream};
pub use kv::{forward_step, forward_step_all, KvCache};
pub use pack::{pack, unpack, FormatChoice, PackOpts, PackReport};
pub use sample::{SampleOpts, Sampler};

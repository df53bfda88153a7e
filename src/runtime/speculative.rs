//! Speculative decoding: a cheap draft proposes `k` tokens, the full model checks them in one
//! batched forward step, and only tokens the full model would have produced are kept.
//!
//! Two drafts ([`Draft`]):
//! - **Self-speculative** (Zhang et al., "Draft & Verify: Lossless Large Language Model
//!   Acceleration via Self-Speculative Decoding", ACL 2024; Xia et al., "SWIFT: On-the-Fly
//!   Self-Speculative Decoding", 2024): the target itself with a set of blocks skipped. It shares
//!   the target's [`KvCache`]: a draft step writes the K/V of the blocks it runs at the drafted
//!   positions and leaves the skipped blocks' rows there unwritten; the verify step then runs
//!   **every** block over `[t₀, d₁ … d_k]` at those same positions and overwrites every layer's
//!   K/V rows, so after the cache is cut back past the first rejection
//!   ([`KvCache::truncate`]) every row it holds is the full model's. No separate draft cache.
//! - **Another model** ([`Draft::Model`]; a pruned copy with the same vocabulary, e.g. a sparse
//!   or layer-removed one): it keeps its own cache, cut back the same way, and catches up on the
//!   tokens it has not seen (a correction or bonus token) at the start of its next round.
//!
//! **Greedy is bit-identical** to [`crate::runtime::generate`]: the verify step's logits for each
//! row have the same bits as a single-token step at that position, because every product with
//! at most [`SMALL_M`] rows runs one dot product per (row, output) and attention with at most
//! that many query rows runs row by row (see `formats::dense`, `kernels::attention`); the verify
//! step is therefore split into chunks of at most [`SMALL_M`] rows. The prompt is prefilled by
//! the same call as in plain generation. Draft token `dᵢ` is accepted while it equals the
//! target's argmax at its position; the first mismatch is replaced by that argmax, and when all
//! `k` are accepted the target's next argmax comes as a bonus token.
//!
//! **Sampling** uses the standard rule (Leviathan et al., "Fast Inference from Transformers via
//! Speculative Decoding", ICML 2023, Algorithm 1; Chen et al., 2023): the draft samples
//! `x ~ q`, the target accepts it with probability `min(1, p(x)/q(x))`, and on rejection draws
//! from `normalize(max(0, p − q))`; `p` and `q` are the [`distribution`]s the sampler would use
//! (temperature, top-k, top-p applied to each). The output distribution is exactly the target's;
//! the tokens are not the plain sampler's for the same seed (the random stream is used
//! differently).
//!
//! **Adaptive draft length** ([`KController`]): the acceptance rate `α` (decayed counts), the
//! time of a draft token `d` and of a verify chunk of `m` rows `v(m)` (decayed measured times;
//! a batched step costs more per row when compute-bound) give the expected speed-up of a round
//! over plain steps, `(1 − α^{k+1})/(1 − α) · v(1) / (Σ_chunks v(m) + k·d)`; the best
//! `k ≤ max_draft` is used if it beats 1, else `k = 0`, a plain single-token step. After 16 plain steps
//! in a row one `k = 1` round probes the draft again, so a draft that accepts nothing costs one
//! wasted round plus a probe every 16 tokens.

use super::generate::{GenerateOpts, GenerateStats, StopReason};
use super::kv::{head_top_k, on_pool, step_hidden, KvCache};
use super::sample::{argmax, distribution, SampleOpts, Sampler};
use crate::formats::SMALL_M;
use crate::{Error, Model, Result};
use serde::Serialize;
use std::time::Instant;

/// Where draft tokens come from.
#[derive(Clone)]
pub enum Draft<'a> {
    /// The target with blocks `i` where `skip[i]` left out, sharing the target's KV cache.
    SelfSkip(Vec<bool>),
    /// Another model with the same vocabulary (checked by [`check_draft_vocab`]).
    Model(&'a Model),
}

/// Speculative settings.
#[derive(Debug, Clone, Copy)]
pub struct SpecOpts {
    /// Most draft tokens per round (≥ 1).
    pub max_draft: usize,
    /// Choose the draft length per round from measured acceptance and cost ([`KController`]);
    /// otherwise always `max_draft`.
    pub adaptive: bool,
}

impl Default for SpecOpts {
    fn default() -> Self {
        SpecOpts {
            max_draft: 3,
            adaptive: true,
        }
    }
}

/// Counts and timings of one speculative generation.
#[derive(Debug, Clone, Serialize)]
pub struct SpecStats {
    /// As plain generation; `decode_steps` counts the tokens produced after the prefill (so
    /// `decode_tokens_per_s` compares with plain decoding's).
    pub generate: GenerateStats,
    /// Draft–verify rounds (k ≥ 1).
    pub rounds: usize,
    /// Plain single-token steps (k = 0: drafting did not pay).
    pub plain_steps: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// accepted / drafted.
    pub acceptance_rate: f64,
    /// Mean accepted draft tokens per round.
    pub mean_accepted: f64,
    /// Draft time, including `catch_up_seconds`.
    pub draft_seconds: f64,
    /// A model draft's time catching up on tokens it had not seen (after plain steps or a
    /// correction).
    pub catch_up_seconds: f64,
    pub verify_seconds: f64,
    /// Draft time per drafted token (catching up excluded).
    pub draft_ms_per_token: f64,
    /// Verify (and plain step) time per token produced in decode.
    pub verify_ms_per_token: f64,
    /// Rounds per draft length: `k_rounds[k]` (k = 0: plain steps).
    pub k_rounds: Vec<usize>,
}

/// Chooses each round's draft length from decayed acceptance counts and measured costs.
#[derive(Debug, Clone)]
pub struct KController {
    pub max_draft: usize,
    pub adaptive: bool,
    /// Decayed accepted / rejected draft-token counts.
    acc: f64,
    rej: f64,
    /// Decayed mean seconds per draft token.
    draft_t: Option<f64>,
    /// Decayed mean seconds of a verify chunk of `m` rows, `verify_t[m]` (`m ≤ SMALL_M`): a
    /// batched step costs more per extra row on a compute-bound machine.
    verify_t: [Option<f64>; SMALL_M + 1],
    plain_run: usize,
}

const DECAY: f64 = 0.9;
const PROBE_EVERY: usize = 16;
/// Prior extra cost of each row of a verify chunk beyond the first, relative to a 1-row step
/// (0.2–0.3 on the default model on Zen 3: `examples/verify_cost.rs`, bench runs), until measured.
const ROW_PRIOR: f64 = 0.25;

impl KController {
    pub fn new(max_draft: usize, adaptive: bool) -> KController {
        KController {
            max_draft: max_draft.max(1),
            adaptive,
            acc: 0.0,
            rej: 0.0,
            draft_t: None,
            verify_t: [None; SMALL_M + 1],
            plain_run: 0,
        }
    }

    /// Estimated per-token acceptance probability (Laplace-smoothed).
    pub fn alpha(&self) -> f64 {
        (self.acc + 1.0) / (self.acc + self.rej + 2.0)
    }

    /// Expected tokens per unit cost (a 1-row verify chunk = 1) with `k` drafts, acceptance
    /// `alpha`, draft-token cost `c` and verify chunks of any size costing 1.
    pub fn gain(k: usize, alpha: f64, c: f64) -> f64 {
        let chunks = (k + 1).div_ceil(SMALL_M) as f64;
        expected_tokens(k, alpha) / (chunks + k as f64 * c)
    }

    /// Seconds of a verify chunk of `m` rows: measured, or from another size by [`ROW_PRIOR`].
    fn chunk_cost(&self, m: usize) -> Option<f64> {
        if let Some(t) = self.verify_t[m] {
            return Some(t);
        }
        let scale = |m: usize| 1.0 + ROW_PRIOR * (m as f64 - 1.0);
        (1..=SMALL_M).find_map(|j| self.verify_t[j].map(|t| t / scale(j) * scale(m)))
    }

    /// Expected speed-up over plain steps of a round with `k` drafts, from the measurements.
    fn expected(&self, k: usize, draft_t: f64) -> Option<f64> {
        let plain = self.chunk_cost(1)?;
        let mut verify = 0.0;
        let mut rows = k + 1;
        while rows > 0 {
            let m = rows.min(SMALL_M);
            verify += self.chunk_cost(m)?;
            rows -= m;
        }
        Some(expected_tokens(k, self.alpha()) * plain / (verify + k as f64 * draft_t))
    }

    /// The draft length for the next round.
    pub fn choose(&mut self) -> usize {
        if !self.adaptive {
            return self.max_draft;
        }
        let Some(d) = self.draft_t else {
            return self.max_draft;
        };
        let gains: Vec<f64> = (0..=self.max_draft)
            .map(|k| {
                if k == 0 {
                    1.0
                } else {
                    self.expected(k, d).unwrap_or(0.0)
                }
            })
            .collect();
        let best = (0..gains.len()).fold(0, |b, k| if gains[k] > gains[b] { k } else { b });
        if best > 0 {
            self.plain_run = 0;
            return best;
        }
        self.plain_run += 1;
        if self.plain_run > PROBE_EVERY {
            self.plain_run = 0;
            return 1;
        }
        0
    }

    /// Record a round: `k` drafted, `n` accepted, the draft's and verify's seconds, and the
    /// verify chunks (`⌈(k+1)/SMALL_M⌉`).
    pub fn record(&mut self, k: usize, n: usize, draft_s: f64, verify_s: f64, chunks: usize) {
        let ema = |old: Option<f64>, x: f64| Some(old.map_or(x, |o| DECAY * o + (1.0 - DECAY) * x));
        if k > 0 {
            self.acc = DECAY * self.acc + n as f64;
            self.rej = DECAY * self.rej + if n < k { 1.0 } else { 0.0 };
            self.draft_t = ema(self.draft_t, draft_s / k as f64);
        }
        if chunks == 1 && k < SMALL_M {
            self.verify_t[k + 1] = ema(self.verify_t[k + 1], verify_s);
        }
    }
}

/// Expected tokens of a round with `k` drafts at per-token acceptance `alpha`:
/// `(1 − α^{k+1}) / (1 − α)`.
fn expected_tokens(k: usize, alpha: f64) -> f64 {
    if alpha >= 1.0 {
        (k + 1) as f64
    } else {
        (1.0 - alpha.powi(k as i32 + 1)) / (1.0 - alpha)
    }
}

/// Refuse a draft whose vocabulary differs from the target's, naming the difference.
pub fn check_draft_vocab(target: &Model, draft: &Model) -> Result<()> {
    let (tv, dv) = (
        target.weights.lm_head().rows(),
        draft.weights.lm_head().rows(),
    );
    if tv != dv {
        return Err(Error::Invalid(format!(
            "--draft {}: its vocabulary has {dv} tokens, the target's {tv}",
            draft.source.display()
        )));
    }
    if let (Some(a), Some(b)) = (&target.tokenizer, &draft.tokenizer) {
        let (va, vb) = (a.get_vocab(true), b.get_vocab(true));
        let mut diff: Vec<(&String, &u32)> =
            va.iter().filter(|(t, id)| vb.get(*t) != Some(id)).collect();
        diff.sort_by_key(|x| *x.1);
        if let Some((t, id)) = diff.first() {
            let there = vb
                .get(*t)
                .map_or("absent".to_string(), |i| format!("id {i}"));
            return Err(Error::Invalid(format!(
                "--draft {}: another tokenizer: token {t:?} is id {id} in the target but {there} in the draft ({} tokens differ)",
                draft.source.display(),
                diff.len()
            )));
        }
    }
    Ok(())
}

/// The target's and the draft's caches and what the sampler needs.
struct State<'a> {
    model: &'a Model,
    draft: &'a Draft<'a>,
    cache: KvCache,
    dcache: Option<KvCache>,
    /// Prompt and every token produced; the last is not yet in the target's cache.
    seq: Vec<u32>,
    opts: SampleOpts,
    sampler: Sampler,
    /// Greedy / top-k steps through the head screen: k largest logits only.
    screen_k: usize,
}

/// A sampling distribution: `(token, probability)`, most likely first.
type Dist = Vec<(u32, f64)>;

impl State<'_> {
    /// Draft `k` tokens after `seq`; returns them, when sampling their distributions `q`, and
    /// the seconds a model draft spent catching up on tokens it had not seen (not a cost of
    /// this round's drafts: it grows with the plain steps before it).
    fn draft(&mut self, k: usize) -> Result<(Vec<u32>, Vec<Dist>, f64)> {
        let mut toks = Vec::with_capacity(k);
        let mut qs = Vec::new();
        let p0 = self.cache.len;
        let mut catch_up = 0.0;
        if let (Draft::Model(m), Some(dc)) = (self.draft, self.dcache.as_mut()) {
            let behind = &self.seq[dc.len..self.seq.len() - 1];
            if !behind.is_empty() {
                let t = Instant::now();
                on_pool(|| step_hidden(m, behind, dc, &[], true))?;
                catch_up = t.elapsed().as_secs_f64();
            }
        }
        let mut feed: Vec<u32> = vec![self.seq[self.seq.len() - 1]];
        for _ in 0..k {
            let h = match (self.draft, &mut self.dcache) {
                (Draft::Model(m), Some(dc)) => on_pool(|| step_hidden(m, &feed, dc, &[], true))?,
                (Draft::SelfSkip(skip), _) => {
                    on_pool(|| step_hidden(self.model, &feed, &mut self.cache, skip, true))?
                }
                _ => unreachable!("a model draft has its cache"),
            };
            let dm = match self.draft {
                Draft::Model(m) => m,
                Draft::SelfSkip(_) => self.model,
            };
            let logits = head_top_k(dm, &h, self.screen_k);
            let t = if self.opts.is_greedy() {
                argmax(&logits)
            } else {
                let q = distribution(&logits, &self.opts);
                let t = pick(&q, self.sampler.uniform());
                qs.push(q);
                t
            };
            toks.push(t);
            feed = vec![t];
        }
        if self.dcache.is_none() {
            self.cache.truncate(p0);
        }
        Ok((toks, qs, catch_up))
    }

    /// Run the target over `[seq.last, drafts…]` in chunks of at most `SMALL_M` rows; returns
    /// the logits per row (screened for greedy / top-k) and the number of chunks.
    fn verify(&mut self, drafts: &[u32]) -> Result<(Vec<Vec<f32>>, usize)> {
        let mut rows = vec![*self.seq.last().expect("non-empty")];
        rows.extend_from_slice(drafts);
        let mut out = Vec::with_capacity(rows.len());
        let (model, d) = (self.model, self.model.config.hidden_size);
        let mut chunks = 0;
        for chunk in rows.chunks(SMALL_M) {
            chunks += 1;
            let cache = &mut self.cache;
            let h = on_pool(|| step_hidden(model, chunk, cache, &[], false))?;
            if self.screen_k > 0 && model.weights.lm_head_screen.is_some() {
                for r in h.chunks(d) {
                    out.push(head_top_k(model, r, self.screen_k));
                }
            } else {
                let l = crate::model::forward::logits(&model.weights, &h, chunk.len());
                let v = l.len() / chunk.len();
                out.extend(l.chunks(v).map(|x| x.to_vec()));
            }
        }
        Ok((out, chunks))
    }

    /// Decide which drafts the target keeps; returns the tokens produced (accepted drafts, then
    /// the correction or bonus token) and the number accepted.
    fn accept(
        &mut self,
        drafts: &[u32],
        qs: &[Vec<(u32, f64)>],
        ps: &[Vec<f32>],
    ) -> (Vec<u32>, usize) {
        let mut out = Vec::with_capacity(drafts.len() + 1);
        if self.opts.is_greedy() {
            for (i, &d) in drafts.iter().enumerate() {
                let t = argmax(&ps[i]);
                out.push(t);
                if t != d {
                    return (out, i);
                }
            }
            out.push(argmax(&ps[drafts.len()]));
            return (out, drafts.len());
        }
        for (i, &d) in drafts.iter().enumerate() {
            let p = distribution(&ps[i], &self.opts);
            match accept_or_resample(&p, &qs[i], d, &mut self.sampler) {
                None => out.push(d),
                Some(t) => {
                    out.push(t);
                    return (out, i);
                }
            }
        }
        let p = distribution(&ps[drafts.len()], &self.opts);
        out.push(pick(&p, self.sampler.uniform()));
        (out, drafts.len())
    }
}

/// The token at cumulative probability `u` of `dist`.
fn pick(dist: &[(u32, f64)], u: f64) -> u32 {
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p;
        if u < cum {
            return t;
        }
    }
    dist.last().map_or(0, |x| x.0)
}

/// The standard acceptance rule for one drafted token `x ~ q`: `None` when accepted (with
/// probability `min(1, p(x)/q(x))`), else a token drawn from `normalize(max(0, p − q))`.
pub fn accept_or_resample(
    p: &[(u32, f64)],
    q: &[(u32, f64)],
    x: u32,
    rng: &mut Sampler,
) -> Option<u32> {
    let prob = |d: &[(u32, f64)], t: u32| d.iter().find(|e| e.0 == t).map_or(0.0, |e| e.1);
    let (px, qx) = (prob(p, x), prob(q, x));
    let u = rng.uniform();
    if qx > 0.0 && u < (px / qx).min(1.0) {
        return None;
    }
    let mut resid: Vec<(u32, f64)> = p
        .iter()
        .map(|&(t, pt)| (t, (pt - prob(q, t)).max(0.0)))
        .filter(|e| e.1 > 0.0)
        .collect();
    let z: f64 = resid.iter().map(|e| e.1).sum();
    if z <= 0.0 {
        // p ≤ q everywhere means p = q: rejection had probability 0; fall back to p.
        return Some(pick(p, rng.uniform()));
    }
    for e in &mut resid {
        e.1 /= z;
    }
    Some(pick(&resid, rng.uniform()))
}

/// Refuse an empty or too long prompt, a zero draft length, a malformed skip set or a draft
/// with another vocabulary; returns the target's context length.
fn check_inputs(
    model: &Model,
    draft: &Draft<'_>,
    prompt_ids: &[u32],
    spec: &SpecOpts,
) -> Result<usize> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid("generation needs a non-empty prompt".into()));
    }
    if spec.max_draft == 0 {
        return Err(Error::Invalid("--draft-max must be at least 1".into()));
    }
    let n_layers = model.weights.layers.len();
    if let Draft::SelfSkip(skip) = draft {
        if skip.len() != n_layers || skip.iter().all(|&s| s) {
            return Err(Error::Invalid(format!(
                "a self-speculative draft needs one skip flag per block ({n_layers}) and at least one block kept"
            )));
        }
    }
    if let Draft::Model(d) = draft {
        check_draft_vocab(model, d)?;
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

/// Speculative generation from `prompt_ids` with `draft`, calling `on_token` with each new token
/// (the same contract as [`crate::runtime::generate`]; greedy gives its tokens exactly).
pub fn generate_speculative(
    model: &Model,
    draft: &Draft<'_>,
    prompt_ids: &[u32],
    opts: &GenerateOpts,
    spec: &SpecOpts,
    on_token: &mut dyn FnMut(u32),
) -> Result<SpecStats> {
    let sampler = Sampler::new(opts.sampling)?;
    let ctx = check_inputs(model, draft, prompt_ids, spec)?;
    let stops = super::generate::stop_tokens(model, opts);
    let cap = (prompt_ids.len() + opts.max_new.saturating_sub(1)).min(ctx);
    let s = &opts.sampling;
    let screen_k = if s.is_greedy() { 1 } else { s.top_k };
    let mut st = State {
        model,
        draft,
        cache: KvCache::new(model, cap),
        dcache: match draft {
            Draft::Model(d) => Some(KvCache::new(
                d,
                cap.min(d.config.max_position_embeddings.max(1)),
            )),
            Draft::SelfSkip(_) => None,
        },
        seq: prompt_ids.to_vec(),
        opts: *s,
        sampler,
        screen_k,
    };
    let mut gs = GenerateStats::new(prompt_ids.len());
    let mut ss = SpecStats {
        generate: gs.clone(),
        rounds: 0,
        plain_steps: 0,
        drafted: 0,
        accepted: 0,
        acceptance_rate: 0.0,
        mean_accepted: 0.0,
        draft_seconds: 0.0,
        catch_up_seconds: 0.0,
        verify_seconds: 0.0,
        draft_ms_per_token: 0.0,
        verify_ms_per_token: 0.0,
        k_rounds: vec![0; spec.max_draft + 1],
    };
    let mut ctl = KController::new(spec.max_draft, spec.adaptive);
    if opts.max_new > 0 {
        let t = Instant::now();
        // The prompt goes through the same call as plain generation (same cache bits).
        let logits = on_pool(|| -> Result<Vec<f32>> {
            let h = step_hidden(model, prompt_ids, &mut st.cache, &[], true)?;
            Ok(head_top_k(model, &h, screen_k))
        })?;
        if let (Draft::Model(d), Some(dc)) = (draft, st.dcache.as_mut()) {
            on_pool(|| step_hidden(d, prompt_ids, dc, &[], true))?;
        }
        let mut pending = vec![st.sampler.sample(&logits)];
        st.seq.extend_from_slice(&pending);
        gs.prefill_seconds = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut produced = 0usize;
        'outer: loop {
            for tok in pending.drain(..) {
                if stops.contains(&tok) {
                    gs.stop = StopReason::StopToken(tok);
                    break 'outer;
                }
                on_token(tok);
                gs.new_tokens += 1;
                if gs.new_tokens >= opts.max_new {
                    break 'outer;
                }
            }
            if st.cache.remaining() == 0 {
                gs.stop = StopReason::Context;
                break;
            }
            // Never draft past what is needed or what the caches hold.
            let mut room = st.cache.remaining() - 1;
            if let Some(dc) = &st.dcache {
                room = room.min(dc.remaining().saturating_sub(st.seq.len() - dc.len));
            }
            let k = ctl.choose().min(room).min(opts.max_new - gs.new_tokens - 1);
            let t0 = Instant::now();
            let (drafts, qs, catch_up) = if k > 0 {
                st.draft(k)?
            } else {
                (vec![], vec![], 0.0)
            };
            let t1 = Instant::now();
            let p0 = st.cache.len;
            let (ps, chunks) = st.verify(&drafts)?;
            let (out, n) = st.accept(&drafts, &qs, &ps);
            st.cache.truncate(p0 + 1 + n);
            if let Some(dc) = st.dcache.as_mut() {
                dc.truncate(p0 + 1 + n);
            }
            let (ds, vs) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
            ctl.record(k, n, ds - catch_up, vs, chunks);
            ss.draft_seconds += ds;
            ss.catch_up_seconds += catch_up;
            ss.verify_seconds += vs;
            ss.k_rounds[k] += 1;
            if k > 0 {
                ss.rounds += 1;
                ss.drafted += k;
                ss.accepted += n;
            } else {
                ss.plain_steps += 1;
            }
            produced += out.len();
            st.seq.extend_from_slice(&out);
            pending = out;
        }
        gs.decode_seconds = t.elapsed().as_secs_f64();
        // As plain decoding counts: one step per token after the first, plus the stop token's.
        let stopped = matches!(gs.stop, StopReason::StopToken(_)) as usize;
        gs.decode_steps = (gs.new_tokens + stopped).saturating_sub(1).min(produced);
    }
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    gs.prefill_tokens_per_s = rate(gs.prompt_tokens, gs.prefill_seconds);
    gs.decode_tokens_per_s = rate(gs.decode_steps, gs.decode_seconds);
    ss.acceptance_rate = ss.accepted as f64 / ss.drafted.max(1) as f64;
    ss.mean_accepted = ss.accepted as f64 / ss.rounds.max(1) as f64;
    ss.draft_ms_per_token =
        1e3 * (ss.draft_seconds - ss.catch_up_seconds) / ss.drafted.max(1) as f64;
    ss.verify_ms_per_token = 1e3 * ss.verify_seconds / gs.decode_steps.max(1) as f64;
    ss.generate = gs;
    Ok(ss)
}

//! The speculative-decoding flags shared by `run` and `bench`, and building the draft they ask
//! for: the target with blocks skipped (chosen by Block Influence and a short search on c4
//! calibration text, or given), or another model directory (`--draft`).

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::runtime::draft_search::{best, search_skip};
use lopper::runtime::speculative::{Draft, SpecOpts};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Debug, Default, Clone)]
pub struct SpecArgs {
    /// Self-speculative decoding: draft tokens with some blocks skipped, verify them with the
    /// full model in one batched step (greedy output identical to plain decoding; sampling
    /// exact in distribution).
    #[arg(long)]
    pub speculative: bool,
    /// Draft with this model instead (any lopper-pruned model with the target's tokenizer, e.g.
    /// a sparse or layer-removed one); implies --speculative.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Blocks the self draft skips: a count N (the N lowest Block Influence) or a comma list of
    /// block indices. Default: searched on c4 calibration text for the best expected speed-up.
    #[arg(long)]
    pub draft_skip: Option<String>,
    /// Most draft tokens per round (adaptive below it unless --draft-fixed).
    #[arg(long, default_value_t = 3)]
    pub draft_max: usize,
    /// Always draft --draft-max tokens (no adaptive draft length, no fallback to plain steps).
    #[arg(long)]
    pub draft_fixed: bool,
}

impl SpecArgs {
    /// Speculative decoding asked for.
    pub fn active(&self) -> bool {
        self.speculative || self.draft.is_some()
    }

    /// Refuse modifiers without the mode and contradictory combinations.
    pub fn check(&self) -> Result<()> {
        if !self.active() {
            if self.draft_skip.is_some() {
                bail!("--draft-skip needs --speculative");
            }
            if self.draft_fixed {
                bail!("--draft-fixed needs --speculative or --draft");
            }
            if self.draft_max != 3 {
                bail!("--draft-max needs --speculative or --draft");
            }
        }
        if self.draft.is_some() && self.draft_skip.is_some() {
            bail!(
                "--draft-skip chooses the self draft's blocks; it cannot be combined with --draft"
            );
        }
        if self.draft_max == 0 || self.draft_max > 16 {
            bail!("--draft-max must be in 1..=16, got {}", self.draft_max);
        }
        Ok(())
    }

    pub fn opts(&self) -> SpecOpts {
        SpecOpts {
            max_draft: self.draft_max,
            adaptive: !self.draft_fixed,
        }
    }
}

/// A draft that owns what it needs; [`OwnedDraft::draft`] lends the runtime's view.
pub enum OwnedDraft {
    Skip(Vec<bool>),
    Model(Box<lopper::Model>),
}

impl OwnedDraft {
    pub fn draft(&self) -> Draft<'_> {
        match self {
            OwnedDraft::Skip(s) => Draft::SelfSkip(s.clone()),
            OwnedDraft::Model(m) => Draft::Model(m),
        }
    }
}

/// Build the draft `a` asks for (`a.active()` must hold); returns it and a JSON description.
/// `screen`: give a model draft the LM head's argmax screen (greedy / top-k decoding).
pub fn build_draft(
    model: &lopper::Model,
    a: &SpecArgs,
    screen: bool,
    quiet: bool,
) -> Result<(OwnedDraft, Value)> {
    if let Some(dir) = &a.draft {
        let mut d = super::load_model(dir, quiet).context("--draft")?;
        lopper::runtime::speculative::check_draft_vocab(model, &d)?;
        if screen {
            lopper::runtime::pack::attach_head_screen(&mut d)
                .context("building the draft's LM head screen")?;
        }
        let desc = json!({
            "draft": dir.display().to_string(),
            "draft_layers": d.weights.layers.len(),
            "draft_weight_bytes": lopper::runtime::pack::decode_bytes(&d.weights),
        });
        return Ok((OwnedDraft::Model(Box::new(d)), desc));
    }
    let n = model.weights.layers.len();
    let list: Option<Vec<usize>> = match &a.draft_skip {
        Some(s) if s.contains(',') || s.trim().is_empty() => Some(parse_list(s, n)?),
        _ => None,
    };
    let count: Option<usize> = match (&a.draft_skip, &list) {
        (Some(s), None) => Some(s.trim().parse().map_err(|_| {
            anyhow::anyhow!("--draft-skip {s:?}: expected a count or a comma list of block indices")
        })?),
        _ => None,
    };
    if let Some(c) = count {
        if c == 0 || c >= n {
            bail!(
                "--draft-skip {c}: the model has {n} blocks; skip between 1 and {}",
                n - 1
            );
        }
    }
    let (skipped, desc) = match list {
        Some(l) => (
            l.clone(),
            json!({ "skipped": l, "chosen_by": "--draft-skip list" }),
        ),
        None => choose_by_influence(model, count, a.draft_max, quiet)?,
    };
    let mut skip = vec![false; n];
    for i in skipped {
        skip[i] = true;
    }
    Ok((OwnedDraft::Skip(skip), desc))
}

/// `"3,5,7"` → block indices, each `< n`, no repeats, not all.
fn parse_list(s: &str, n: usize) -> Result<Vec<usize>> {
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let i: usize = p
            .parse()
            .map_err(|_| anyhow::anyhow!("--draft-skip: {p:?} is not a block index"))?;
        if i >= n {
            bail!("--draft-skip: block {i} does not exist (the model has {n} blocks)");
        }
        if v.contains(&i) {
            bail!("--draft-skip: block {i} is listed twice");
        }
        v.push(i);
    }
    if v.is_empty() || v.len() >= n {
        bail!(
            "--draft-skip: list between 1 and {} of the {n} blocks",
            n - 1
        );
    }
    v.sort_unstable();
    Ok(v)
}

/// Rank blocks by Block Influence on c4 windows and pick how many to skip (`count`, or the
/// search of [`search_skip`] over 10–60% of the blocks).
fn choose_by_influence(
    model: &lopper::Model,
    count: Option<usize>,
    max_draft: usize,
    quiet: bool,
) -> Result<(Vec<usize>, Value)> {
    let sp = super::spinner(
        quiet,
        "choosing the draft's skipped blocks (Block Influence on c4)".into(),
    );
    let c4 = lopper::assets::c4_text().context("fetching c4.utf8")?;
    let calib = lopper::calibrate::from_text(model.tokenizer()?, &c4, 8, 128, 0)?;
    let bi = lopper::structured::depth::block_influence(model, &calib, &mut |_, _, _| {})?;
    let mut order: Vec<usize> = (0..bi.len()).collect();
    order.sort_by(|&x, &y| bi[x].total_cmp(&bi[y]).then(x.cmp(&y)));
    let n = order.len();
    let counts: Vec<usize> = match count {
        Some(c) => vec![c],
        None => {
            let (lo, hi) = ((n / 10).max(1), (n * 6 / 10).max(1).min(n - 1));
            let step = (n / 15).max(1);
            (lo..=hi).step_by(step).collect()
        }
    };
    let windows: Vec<&[u32]> = (0..4.min(calib.n)).map(|i| calib.window(i)).collect();
    let cands = search_skip(model, &windows, &order, &counts, max_draft)?;
    sp.finish_and_clear();
    let b = best(&cands).context("no draft candidate")?.clone();
    if !quiet {
        eprintln!(
            "self draft: skipping {} of {n} blocks {:?} (teacher-forced agreement {:.2}, cost {:.2} of a full step)",
            b.skipped.len(),
            b.skipped,
            b.match_rate,
            b.cost
        );
    }
    let desc = json!({
        "skipped": b.skipped,
        "chosen_by": if count.is_some() { "--draft-skip count, lowest Block Influence" } else { "Block Influence order + search over counts" },
        "block_influence": bi,
        "candidates": cands,
    });
    Ok((b.skipped, desc))
}

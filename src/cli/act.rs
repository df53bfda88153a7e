//! The activation-sparsity flags shared by `run`, `eval` and `bench` (`--act-sparsity`,
//! `--act-score`, `--act-calib`, `--act-samples`, `--act-calib-len`), and what they do:
//! calibrate thresholds on the dense model ([`lopper::calibrate::act`]), install them
//! ([`lopper::model::act::install`]) and give the block linears column-major copies for decode
//! ([`lopper::runtime::act::pack_columns`]). Without `--act-sparsity` a model keeps the
//! thresholds stored with it (`lopper_act_sparsity.json`), and a model without runs dense.

use anyhow::{bail, Context, Result};
use clap::Args;
use lopper::calibrate::act::{self as cal, ActHistograms};
use lopper::model::act::{self, Score};
use lopper::runtime::act::Columns;
use lopper::runtime::{choice::Layout, FormatChoice};
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct ActArgs {
    /// Contextual activation sparsity (TEAL): zero this fraction of every linear input of every
    /// block, by magnitude thresholds calibrated per block and site on --act-calib, and decode
    /// through column-major weights that skip the zeroed inputs' columns. In [0, 1).
    /// Default: the thresholds stored with the model (lopper_act_sparsity.json), else dense.
    /// `bench` takes a comma-separated list, each run beside the dense format.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub act_sparsity: Vec<f64>,
    /// How inputs are scored against the thresholds: magnitude (|x|, TEAL) or wina
    /// (|x|·‖W[:, j]‖₂, WINA) [default: magnitude]; needs --act-sparsity.
    #[arg(long)]
    pub act_score: Option<String>,
    /// Calibration text of the thresholds [default: c4.utf8, fetched]; needs --act-sparsity.
    #[arg(long)]
    pub act_calib: Option<PathBuf>,
    /// Calibration windows of the thresholds [default: 16]; needs --act-sparsity.
    #[arg(long)]
    pub act_samples: Option<usize>,
    /// Tokens per calibration window of the thresholds [default: 512]; needs --act-sparsity.
    #[arg(long)]
    pub act_calib_len: Option<usize>,
    /// How the sparsity is shared among a block's sites: uniform (every site the target) or
    /// greedy (TEAL's block-wise search against the block output error, on the first
    /// GREEDY_WINDOWS calibration windows cut to GREEDY_LEN tokens) [default: uniform]; needs
    /// --act-sparsity.
    #[arg(long)]
    pub act_alloc: Option<String>,
}

/// Calibration windows (the first ones) and tokens per window the greedy search runs on.
pub const GREEDY_WINDOWS: usize = 4;
pub const GREEDY_LEN: usize = 256;

/// How a target sparsity is shared among a block's sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    Uniform,
    Greedy,
}

/// Parses `--act-alloc`.
pub fn parse_alloc(s: Option<&str>) -> Result<Alloc> {
    match s {
        None | Some("uniform") => Ok(Alloc::Uniform),
        Some("greedy") => Ok(Alloc::Greedy),
        Some(o) => bail!(lopper::Error::Invalid(format!(
            "--act-alloc {o}: not one of uniform, greedy"
        ))),
    }
}

/// Thresholds for each of `targets` from histograms `h`: uniform, or by TEAL's greedy search
/// on the first windows of `calib` (cut to [`GREEDY_LEN`] tokens).
pub fn thresholds(
    model: &lopper::Model,
    h: &ActHistograms,
    calib: &lopper::calibrate::CalibSet,
    targets: &[f64],
    alloc: Alloc,
    quiet: bool,
) -> Result<Vec<act::ActSparsity>> {
    if alloc == Alloc::Uniform {
        return Ok(targets.iter().map(|&s| h.uniform(s)).collect());
    }
    let (n, len) = (calib.n.min(GREEDY_WINDOWS), calib.len.min(GREEDY_LEN));
    let ids = (0..n)
        .flat_map(|w| calib.window(w)[..len].to_vec())
        .collect();
    let sub = lopper::calibrate::CalibSet {
        ids,
        n,
        len,
        source: calib.source.clone(),
    };
    let mut sorted: Vec<f64> = targets.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted.dedup();
    let pb = super::bar(quiet, model.weights.layers.len() as u64, "greedy");
    let all = lopper::calibrate::act_greedy::greedy(
        model,
        &sub,
        h,
        &sorted,
        Default::default(),
        &mut |d, _| pb.set_position(d as u64),
    )?;
    pb.finish_and_clear();
    Ok(targets
        .iter()
        .map(|t| {
            let i = sorted.iter().position(|s| s == t).unwrap_or(0);
            all[i].clone()
        })
        .collect())
}

impl ActArgs {
    /// Refuses flags that would take no effect and values outside [0, 1); `multi`: several
    /// `--act-sparsity` values allowed (bench).
    pub fn check(&self, multi: bool) -> Result<()> {
        if self.act_sparsity.is_empty() {
            for (flag, given) in [
                ("--act-score", self.act_score.is_some()),
                ("--act-calib", self.act_calib.is_some()),
                ("--act-samples", self.act_samples.is_some()),
                ("--act-calib-len", self.act_calib_len.is_some()),
                ("--act-alloc", self.act_alloc.is_some()),
            ] {
                if given {
                    bail!(lopper::Error::Invalid(format!(
                        "{flag} needs --act-sparsity (stored thresholds are used as they are)"
                    )));
                }
            }
        }
        if !multi && self.act_sparsity.len() > 1 {
            bail!(lopper::Error::Invalid(
                "--act-sparsity takes one value here (bench compares several)".into()
            ));
        }
        for &s in &self.act_sparsity {
            cal::check_target(s, "--act-sparsity")?;
        }
        self.score()?;
        parse_alloc(self.act_alloc.as_deref())?;
        Ok(())
    }

    fn score(&self) -> Result<Score> {
        match &self.act_score {
            None => Ok(Score::Magnitude),
            Some(s) => Ok(s.parse().context("--act-score")?),
        }
    }
}

/// Thresholds for every `--act-sparsity` value, calibrated on the `--act-calib` set (empty
/// without `--act-sparsity`). Stored thresholds are removed first (calibration runs dense).
pub fn calibrate(
    model: &mut lopper::Model,
    a: &ActArgs,
    quiet: bool,
) -> Result<Vec<act::ActSparsity>> {
    let Some((h, calib)) = histograms(model, a, quiet)? else {
        return Ok(Vec::new());
    };
    let alloc = parse_alloc(a.act_alloc.as_deref())?;
    thresholds(model, &h, &calib, &a.act_sparsity, alloc, quiet)
}

/// Score histograms of `model`'s sites on the `--act-calib` set, and the set (`None` without
/// `--act-sparsity`). Stored thresholds are removed first (calibration runs dense).
pub fn histograms(
    model: &mut lopper::Model,
    a: &ActArgs,
    quiet: bool,
) -> Result<Option<(ActHistograms, lopper::calibrate::CalibSet)>> {
    if a.act_sparsity.is_empty() {
        return Ok(None);
    }
    if act::installed(model).is_some() && !quiet {
        eprintln!("note: --act-sparsity replaces the thresholds stored with the model");
    }
    act::uninstall(model);
    let path = match &a.act_calib {
        Some(p) => p.clone(),
        None => lopper::assets::c4_text().context("fetching c4.utf8")?,
    };
    let calib = lopper::calibrate::from_text(
        model.tokenizer()?,
        &path,
        a.act_samples.unwrap_or(16),
        a.act_calib_len.unwrap_or(512),
        0,
    )?;
    let pb = super::spinner(
        quiet,
        format!("calibrating activation thresholds on {}", calib.source),
    );
    let h = cal::collect(model, &calib, a.score()?)?;
    pb.finish_and_clear();
    Ok(Some((h, calib)))
}

/// `run` / `eval`: installs the `--act-sparsity` thresholds (or keeps the stored ones);
/// returns a one-line description, `None` when the model runs dense.
pub fn setup(model: &mut lopper::Model, a: &ActArgs, quiet: bool) -> Result<Option<String>> {
    a.check(false)?;
    if let Some(t) = calibrate(model, a, quiet)?.first() {
        act::install(model, t)?;
    }
    Ok(act::installed(model).map(|t| describe(&t)))
}

/// One line about installed thresholds.
pub fn describe(t: &act::ActSparsity) -> String {
    format!(
        "{:.2} {} ({:?} score, calibrated on {})",
        t.target, t.allocation, t.score, t.calibration
    )
}

/// Value type and layout of the column-major copies for `--format` (None: dense f32): a dense
/// format gives dense columns, a bitmask format columns of nonzeros with a bitmask each (the
/// weight-sparse model's zeros are then skipped as well); other sparse layouts are refused.
pub fn column_values(
    format: Option<FormatChoice>,
) -> Result<(lopper::runtime::choice::ValueType, Columns)> {
    match format {
        None => Ok((lopper::runtime::choice::ValueType::F32, Columns::Dense)),
        Some(c) if c.layout() == Layout::Dense => Ok((c.value_type(), Columns::Dense)),
        Some(c) if c.layout() == Layout::Bitmask => Ok((c.value_type(), Columns::Bitmask)),
        Some(c) => bail!(lopper::Error::Invalid(format!(
            "--format {c} with activation sparsity: the column-skipping decode kernels store dense or bitmask columns (use dense, bf16, f16, int8, or bitmask, bitmask-bf16, bitmask-f16, bitmask-int8)"
        ))),
    }
}

/// Gives the block linears column-major copies when thresholds are installed (`format` is the
/// `--format` given).
pub fn pack_for_decode(model: &mut lopper::Model, format: Option<&str>, quiet: bool) -> Result<()> {
    if act::installed(model).is_none() {
        return Ok(());
    }
    let choice = match format {
        Some(f) => Some(
            f.parse::<FormatChoice>()
                .map_err(|e| anyhow::anyhow!("--format: {e}"))?,
        ),
        None => None,
    };
    let (vt, cols) = column_values(choice)?;
    let bytes =
        lopper::runtime::act::pack_columns(model, vt, cols).context("column-major copies")?;
    if !quiet {
        eprintln!(
            "activation sparsity: block linears also stored column-major ({vt:?}, {cols:?} columns, {:.1} MB) for decode",
            bytes as f64 / 1e6
        );
    }
    Ok(())
}

/// Reached sparsity per site as JSON (`attn_in`, `attn_out`, `mlp_in`, `mlp_down`).
pub fn reached_json(model: &lopper::Model) -> serde_json::Value {
    let r = act::achieved(model);
    let mut o = serde_json::Map::new();
    for site in lopper::model::observer::Site::ALL {
        o.insert(act::site_key(site).into(), r[act::site_index(site)].into());
    }
    serde_json::Value::Object(o)
}

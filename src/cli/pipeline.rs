//! The shared stages of a `lopper prune` run: the calibration set, evaluation, and writing the
//! output atomically.

use super::prune_args::PruneArgs;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::PathBuf;

/// Check `--dtype` and that the output may be written; returns the dtype.
pub fn check_output(a: &PruneArgs) -> Result<lopper::io::save::SaveDtype> {
    let dtype: lopper::io::save::SaveDtype = a
        .dtype
        .parse()
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    if a.out.symlink_metadata().is_ok() && !a.force {
        bail!(lopper::Error::Output {
            path: a.out.clone(),
            msg: "exists; pass --force to replace it".into()
        });
    }
    Ok(dtype)
}

/// Where the weights' scratch file goes: the output's directory, or its nearest existing
/// ancestor (the output's parents are only created when it is written).
pub fn scratch_dir(out: &std::path::Path) -> PathBuf {
    out.ancestors()
        .skip(1)
        .find(|p| !p.as_os_str().is_empty() && p.is_dir())
        .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf())
}

/// Write the model and its report atomically; with `--act-sparsity`, first calibrate
/// activation thresholds on the final model (stored beside it, and in the report). Returns the
/// report as written.
pub fn write_output(
    a: &PruneArgs,
    model: &mut lopper::Model,
    dtype: lopper::io::save::SaveDtype,
    report: &str,
) -> Result<String> {
    let mut report = report.to_string();
    if let Some(s) = a.act_sparsity {
        let score: lopper::model::act::Score = match &a.act_score {
            Some(x) => x.parse()?,
            None => lopper::model::act::Score::Magnitude,
        };
        lopper::model::act::uninstall(model);
        let calib = Calibration::build(a, model, true)?;
        let sp = super::spinner(a.json, "calibrating activation thresholds".into());
        let h = lopper::calibrate::act::collect(model, &calib.set, score)?;
        sp.finish_and_clear();
        let alloc = super::act::parse_alloc(a.act_alloc.as_deref())?;
        let t = super::act::thresholds(model, &h, &calib.set, &[s], alloc, a.json)?.remove(0);
        lopper::model::act::install(model, &t)?;
        let mut v: serde_json::Value = serde_json::from_str(&report)?;
        v["act_sparsity"] = serde_json::to_value(&t)?;
        v["act_sparsity"]["file"] = lopper::io::act_file::FILE.into();
        report = serde_json::to_string_pretty(&v)?;
        if !a.json {
            eprintln!(
                "activation sparsity {s} ({score:?}) thresholds calibrated on {}: stored as {}",
                calib.set.source,
                lopper::io::act_file::FILE
            );
        }
    }
    let sp = super::spinner(a.json, format!("writing {}", a.out.display()));
    lopper::io::save::save_hf_with_extras(
        model,
        &a.out,
        dtype,
        a.force,
        &[("report.json", report.as_bytes())],
    )
    .with_context(|| format!("writing {}", a.out.display()))?;
    sp.finish_and_clear();
    Ok(report)
}

/// The calibration set of a run (empty when no step needs one).
pub struct Calibration {
    pub set: lopper::calibrate::CalibSet,
}

impl Calibration {
    pub fn build(a: &PruneArgs, model: &lopper::Model, needed: bool) -> Result<Calibration> {
        let set = if let Some(p) = &a.calib_ids {
            let mut set = lopper::calibrate::from_ids_file(p, model.config.vocab_size)?;
            if let Some(n) = a.samples {
                if n == 0 || n > set.n {
                    bail!(lopper::Error::Invalid(format!(
                        "--samples {n}: {} holds {} calibration windows",
                        p.display(),
                        set.n
                    )));
                }
                set.ids.truncate(n * set.len);
                set.n = n;
                set.source = format!("{} (first {n} rows)", set.source);
            }
            set
        } else if needed {
            let p = match &a.calib {
                Some(p) => p.clone(),
                None => lopper::assets::c4_text().context("fetching c4.utf8")?,
            };
            lopper::calibrate::from_text(
                model.tokenizer()?,
                &p,
                a.samples.unwrap_or(128),
                a.calib_len.unwrap_or(512),
                a.seed.unwrap_or(0),
            )?
        } else {
            lopper::calibrate::CalibSet {
                ids: vec![],
                n: 0,
                len: 1,
                source: "none (not needed)".into(),
            }
        };
        Ok(Calibration { set })
    }

    pub fn json(&self) -> serde_json::Value {
        json!({ "source": self.set.source, "samples": self.set.n, "len": self.set.len })
    }
}

/// `--eval`: the evaluation text, tokenized once.
pub struct Evaluator {
    text: Option<PathBuf>,
    ids: Option<Vec<u32>>,
    windows: usize,
    seq_len: usize,
    quiet: bool,
}

impl Evaluator {
    pub fn new(a: &PruneArgs, model: &lopper::Model) -> Result<Evaluator> {
        let text = match &a.eval {
            None => None,
            Some(s) if s.is_empty() => {
                Some(lopper::assets::wiki_text().context("fetching wiki.utf8")?)
            }
            Some(s) => Some(PathBuf::from(s)),
        };
        let ids = match &text {
            Some(p) => Some(super::eval::tokenize_text(model, p)?),
            None => None,
        };
        Ok(Evaluator {
            text,
            ids,
            windows: a.eval_windows.unwrap_or(16),
            seq_len: a.eval_seq_len.unwrap_or(2048),
            quiet: a.json,
        })
    }

    /// Perplexity of `model`, or `None` without `--eval`.
    pub fn eval(
        &self,
        model: &lopper::Model,
        label: &str,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        self.measure(label, |ids, p, progress| {
            lopper::eval::perplexity(model, ids, self.seq_len, self.windows, p, progress)
        })
    }

    /// [`Evaluator::eval`] block by block, releasing each block's weights after use
    /// ([`lopper::eval::perplexity_by_block`]: the same figure, one block of weights in memory).
    pub fn eval_by_block(
        &self,
        model: &mut lopper::Model,
        label: &str,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        self.measure(label, |ids, p, progress| {
            lopper::eval::perplexity_by_block(model, ids, self.seq_len, self.windows, p, progress)
        })
    }

    /// Run `f` on the text's ids with a progress bar.
    fn measure(
        &self,
        label: &str,
        f: impl FnOnce(
            &[u32],
            &std::path::Path,
            &mut dyn FnMut(usize, usize),
        ) -> lopper::Result<lopper::eval::EvalResult>,
    ) -> Result<Option<lopper::eval::EvalResult>> {
        let (Some(ids), Some(p)) = (&self.ids, &self.text) else {
            return Ok(None);
        };
        let pb = super::bar(self.quiet, 1, label);
        let r = f(ids, p, &mut |d, n| {
            pb.set_length(n as u64);
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        Ok(Some(r))
    }

    /// The protocol, for reports.
    pub fn protocol(&self) -> serde_json::Value {
        match &self.text {
            None => serde_json::Value::Null,
            Some(p) => {
                json!({ "text": p.display().to_string(), "windows": self.windows, "seq_len": self.seq_len })
            }
        }
    }
}

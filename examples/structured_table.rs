//! The README's structured-pruning table: parameters removed vs wiki-16x2048 perplexity for each
//! structural dimension alone at about 10/20/30% of the parameters, and for multidimensional
//! plans — every row a plan run by the same code as `lopper prune --plan` on one calibration set.
//!
//! `cargo run --release --example structured_table -- [--samples 64] [--calib-len 512]
//!     [--windows 16] [--seq-len 2048] [--only SUBSTRING] [--out rows.jsonl]`
//!
//! Prints one markdown row per configuration as it finishes (and, with `--out`, one JSON line
//! with the full step records).

use lopper::structured::plan::{parse_plan, run_plan, ModelSize};
use lopper::Model;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// (label, plan TOML). Fractions were chosen for ~10/20/30% of all parameters of
/// SmolLM2-135M (134.5M, of which 28.3M are the tied embedding and 106.2M the 30 blocks).
const CONFIGS: &[(&str, &str)] = &[
    ("layers 4, block influence", "kind='layers'\nremove=4"),
    ("layers 8, block influence", "kind='layers'\nremove=8"),
    ("layers 11, block influence", "kind='layers'\nremove=11"),
    ("heads 1/3 (1 of 3 KV groups), fluctuation + bias", "kind='heads'\nfraction=0.34\nmetric='fluctuation'\nbias_compensation=true"),
    ("heads 2/3 (2 of 3 KV groups), fluctuation + bias", "kind='heads'\nfraction=0.67\nmetric='fluctuation'\nbias_compensation=true"),
    ("neurons 17%, fluctuation + bias", "kind='neurons'\nfraction=0.17\nmetric='fluctuation'\nbias_compensation=true"),
    ("neurons 34%, fluctuation + bias", "kind='neurons'\nfraction=0.34\nmetric='fluctuation'\nbias_compensation=true"),
    ("neurons 51%, fluctuation + bias", "kind='neurons'\nfraction=0.51\nmetric='fluctuation'\nbias_compensation=true"),
    ("slice 30%", "kind='slice'\nfraction=0.30"),
    ("slice 40%", "kind='slice'\nfraction=0.40"),
    ("slice 50%", "kind='slice'\nfraction=0.50"),
    ("low rank 12.6% of linears, plain SVD", "kind='low_rank'\nparam_fraction=0.126"),
    ("low rank 12.6% of linears, whitened", "kind='low_rank'\nparam_fraction=0.126\nwhiten=true"),
    ("low rank 25% of linears, plain SVD", "kind='low_rank'\nparam_fraction=0.253"),
    ("low rank 25% of linears, whitened", "kind='low_rank'\nparam_fraction=0.253\nwhiten=true"),
    ("low rank 38% of linears, plain SVD", "kind='low_rank'\nparam_fraction=0.38"),
    ("low rank 38% of linears, whitened", "kind='low_rank'\nparam_fraction=0.38\nwhiten=true"),
    (
        "plan: layers 2 → neurons 25%",
        "kind='layers'\nremove=2\n[[step]]\nkind='neurons'\nfraction=0.25\nmetric='fluctuation'\nbias_compensation=true",
    ),
    (
        "plan: layers 3 → neurons 20% → wanda 50%",
        "kind='layers'\nremove=3\nmetric='angular'\n[[step]]\nkind='neurons'\nfraction=0.2\nmetric='fluctuation'\nbias_compensation=true\n[[step]]\nkind='sparse'\nmethod='wanda'\nsparsity=0.5",
    ),
];

fn copy(m: &Model) -> Model {
    m.clone()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut samples, mut calib_len, mut windows, mut seq_len) = (64usize, 512usize, 16, 2048);
    let (mut only, mut out) = (None::<String>, None::<String>);
    while let Some(f) = args.next() {
        let v = args.next().ok_or(format!("{f} needs a value"))?;
        match f.as_str() {
            "--samples" => samples = v.parse()?,
            "--calib-len" => calib_len = v.parse()?,
            "--windows" => windows = v.parse()?,
            "--seq-len" => seq_len = v.parse()?,
            "--only" => only = Some(v),
            "--out" => out = Some(v),
            _ => return Err(format!("unknown flag {f}").into()),
        }
    }
    let base = lopper::io::load_model(&lopper::assets::default_model()?)?;
    let tok = base.tokenizer()?.clone();
    let c4 = lopper::assets::c4_text()?;
    let calib = lopper::calibrate::from_text(&tok, &c4, samples, calib_len, 0)?;
    let wiki = lopper::assets::wiki_text()?;
    let ids = lopper::tokenizer::encode(&tok, &lopper::text::load_eval_text(&wiki)?, &wiki)?;
    let ppl = |m: &Model| -> lopper::Result<f64> {
        Ok(lopper::eval::perplexity(m, &ids, seq_len, windows, &wiki, &mut |_, _| {})?.perplexity)
    };
    let mut sink = match &out {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    let size0 = ModelSize::of(&base);
    println!(
        "calibration {}; perplexity wiki-{windows}x{seq_len}",
        calib.source
    );
    println!("| configuration | non-zero parameters | removed | perplexity | seconds (prune) |");
    println!("|---|---|---|---|---|");
    println!(
        "| dense | {:.1}M | 0% | {:.3} | - |",
        size0.params as f64 / 1e6,
        ppl(&base)?
    );
    for (label, body) in CONFIGS {
        if only.as_ref().is_some_and(|o| !label.contains(o.as_str())) {
            continue;
        }
        let plan = parse_plan(&format!("[[step]]\n{body}"), Path::new(label))?;
        let mut m = copy(&base);
        let t = Instant::now();
        let records = run_plan(
            &mut m,
            &calib,
            &plan,
            &mut |_, _| Ok(None),
            &mut |_, _, _| {},
        )?;
        let secs = t.elapsed().as_secs_f64();
        let p = ppl(&m)?;
        let size = ModelSize::of(&m);
        let removed = 1.0 - size.nonzero_params as f64 / size0.params as f64;
        println!(
            "| {label} | {:.1}M | {:.1}% | {p:.3} | {secs:.0} |",
            size.nonzero_params as f64 / 1e6,
            100.0 * removed
        );
        std::io::stdout().flush()?;
        if let Some(f) = sink.as_mut() {
            let line = serde_json::json!({
                "label": label, "plan": body, "perplexity": p, "seconds": secs,
                "params": size.params, "nonzero_params": size.nonzero_params,
                "removed_fraction": removed, "steps": records,
            });
            writeln!(f, "{line}")?;
        }
    }
    Ok(())
}

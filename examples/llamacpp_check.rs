//! Helpers for `scripts/llamacpp_compare.sh` (lopper vs llama.cpp on GGUFs lopper wrote).
//!
//! * `cut OUT.gguf [DTYPE]` — the default model with per-layer shapes, written as GGUF: layers
//!   0 and 7 lose one of their 3 KV heads with its 3 query heads (6 q / 2 KV), layer 3 loses
//!   one query head per group (6 q / 3 KV) and FFN channels 1000.., layer 12 keeps FFN 0..512.
//!   Fixed cuts, not a pruning method: it exists to exercise per-layer GGUF metadata.
//! * `ppl MODEL TEXT_OUT [CTX] [CHUNKS]` — write lopper's eval text (wiki.utf8 without
//!   `<doc>` lines) to TEXT_OUT for `llama-perplexity -f`, and print lopper's perplexity by
//!   llama-perplexity's protocol: the tokenized text in chunks of CTX tokens (first CHUNKS), no
//!   BOS (the file says `add_bos_token = false`), next-token NLL scored on the second half of
//!   each chunk only (positions CTX/2 .. CTX-2 predicting the next token).
//!
//! `cargo run --release --example llamacpp_check -- cut /tmp/cut.gguf f32`

use lopper::io::gguf_write::{save_gguf, GgufDtype};
use lopper::model::forward::{forward_hidden, logits};
use lopper::model::observer::NoObserver;
use lopper::{Model, Tensor};
use std::path::PathBuf;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cut") if args.len() >= 2 => cut(&args),
        Some("ppl") if args.len() >= 3 => ppl(&args),
        _ => Err("usage: llamacpp_check cut OUT.gguf [f32|f16|bf16|q8_0] | ppl MODEL TEXT_OUT [CTX] [CHUNKS]".into()),
    }
}

fn cut(args: &[String]) -> Res<()> {
    let out = PathBuf::from(&args[1]);
    let dtype: GgufDtype = args.get(2).map_or("f32", String::as_str).parse()?;
    let mut m = lopper::io::load_model(&lopper::assets::default_model()?)?;
    cut_layer(&mut m, 0, &[0, 1, 2, 3, 4, 5], &[0, 1], 1536);
    cut_layer(&mut m, 3, &[0, 1, 3, 4, 6, 7], &[0, 1, 2], 1000);
    cut_layer(&mut m, 7, &[3, 4, 5, 6, 7, 8], &[1, 2], 1536);
    cut_layer(&mut m, 12, &(0..9).collect::<Vec<_>>(), &[0, 1, 2], 512);
    let w = save_gguf(&m, &out, dtype, true)?;
    for warning in &w.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "wrote {} (arch {}, {} tensors, {} bytes)",
        out.display(),
        w.arch,
        w.tensors,
        w.bytes
    );
    Ok(())
}

/// Keep query heads `q_keep`, KV heads `kv_keep` and FFN channels `0..ff` of layer `li`.
fn cut_layer(m: &mut Model, li: usize, q_keep: &[usize], kv_keep: &[usize], ff: usize) {
    let hd = m.config.head_dim;
    let l = &mut m.weights.layers[li];
    let rows = |t: &Tensor, keep: &[usize], unit: usize| {
        let c = t.cols();
        let d: Vec<f32> = keep
            .iter()
            .flat_map(|&h| t.data()[h * unit * c..(h + 1) * unit * c].iter().copied())
            .collect();
        Tensor::new(vec![keep.len() * unit, c], d)
    };
    let cols = |t: &Tensor, keep: &[usize], unit: usize| {
        let (r, c) = (t.rows(), t.cols());
        let d: Vec<f32> = (0..r)
            .flat_map(|i| {
                keep.iter()
                    .flat_map(move |&h| i * c + h * unit..i * c + (h + 1) * unit)
            })
            .map(|j| t.data()[j])
            .collect();
        Tensor::new(vec![r, keep.len() * unit], d)
    };
    let ffk: Vec<usize> = (0..ff).collect();
    l.q.weight = rows(&l.q.weight, q_keep, hd);
    l.k.weight = rows(&l.k.weight, kv_keep, hd);
    l.v.weight = rows(&l.v.weight, kv_keep, hd);
    l.o.weight = cols(&l.o.weight, q_keep, hd);
    l.gate.weight = rows(&l.gate.weight, &ffk, 1);
    l.up.weight = rows(&l.up.weight, &ffk, 1);
    l.down.weight = cols(&l.down.weight, &ffk, 1);
}

fn ppl(args: &[String]) -> Res<()> {
    let model = lopper::io::load_model(&PathBuf::from(&args[1]))?;
    let ctx: usize = args.get(3).map_or(Ok(2048), |s| s.parse())?;
    let chunks: usize = args.get(4).map_or(Ok(16), |s| s.parse())?;
    let text_path = lopper::assets::wiki_text()?;
    let text = lopper::text::load_eval_text(&text_path)?;
    std::fs::write(&args[2], &text)?;
    let ids = lopper::tokenizer::encode(model.tokenizer()?, &text, &text_path)?;
    let first = ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    let t0 = std::time::Instant::now();
    for chunk in ids.chunks_exact(ctx).take(chunks) {
        let h = forward_hidden(&model, chunk, 1, ctx, &mut NoObserver)?;
        let d = model.config.hidden_size;
        let rows = ctx - 1 - first;
        let lg = logits(&model.weights, &h[first * d..(ctx - 1) * d], rows);
        let vocab = lg.len() / rows;
        for (i, row) in lg.chunks(vocab).enumerate() {
            nll += lopper::kernels::logsumexp(row) - row[chunk[first + i + 1] as usize] as f64;
            count += 1;
        }
    }
    println!(
        "lopper, llama-perplexity protocol: {} tokens in text, {chunks} chunks x {ctx}, {count} scored: PPL = {:.4} ({:.1} s)",
        ids.len(),
        (nll / count as f64).exp(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

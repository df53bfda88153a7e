//! Greedy decode with and without the LM head's argmax screen, alternating, on the default
//! model: decode tokens/s, candidate rows per step, and whether the tokens agree.
//! `cargo run --release --example head_screen [-- FORMAT [ROUNDS]]`
use lopper::runtime::{self, FormatChoice, GenerateOpts, PackOpts};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let format: FormatChoice = args.get(1).map_or("dense", |s| s).parse().unwrap();
    let rounds: usize = args.get(2).map_or(3, |s| s.parse().unwrap());
    let p = lopper::assets::default_model().unwrap();
    let mut m = lopper::io::load_model(&p).unwrap();
    let text = std::fs::read_to_string(lopper::assets::wiki_text().unwrap()).unwrap();
    let ids = lopper::tokenizer::encode(m.tokenizer().unwrap(), &text[..4000], &p).unwrap();
    let prompt = &ids[..32];
    runtime::pack(&mut m, &PackOpts::new(format)).unwrap();
    let screen = m.weights.lm_head_screen.clone();
    println!("format {format}: screen {:?}", screen);
    let opts = GenerateOpts {
        max_new: 128,
        stop_at_eos: false,
        ..Default::default()
    };
    for r in 0..rounds {
        for with in [r % 2 == 0, r % 2 != 0] {
            m.weights.lm_head_screen = if with { screen.clone() } else { None };
            let before = screen.as_ref().map(|s| s.counts()).unwrap_or((0, 0));
            let mut got = Vec::new();
            let st = runtime::generate(&m, prompt, &opts, &mut |t| got.push(t)).unwrap();
            let after = screen.as_ref().map(|s| s.counts()).unwrap_or((0, 0));
            let cand = (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64;
            let h: u64 = got
                .iter()
                .fold(0u64, |a, &t| a.wrapping_mul(31).wrapping_add(t as u64));
            println!(
                "round {r} screen {with:5}: decode {:6.2} tokens/s, {:7.1} candidate rows/step, {} MB/token, tokens hash {h:x}",
                st.decode_tokens_per_s,
                cand,
                runtime::pack::decode_bytes(&m.weights) as f64 / 1e6
            );
        }
    }
}

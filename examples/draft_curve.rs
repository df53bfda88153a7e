//! Teacher-forced greedy agreement of a self-speculative draft against the full model, for
//! every count of skipped blocks (lowest Block Influence first) on c4 windows: the curve behind
//! `--draft-skip`'s search (docs/dynamic_depth.md). `cargo run --release --example draft_curve`.
use lopper::runtime::draft_search::search_skip;

fn main() -> anyhow::Result<()> {
    let path = lopper::assets::default_model()?;
    let mut model = lopper::io::load_model(&path)?;
    lopper::runtime::pack::attach_head_screen(&mut model)?;
    let c4 = lopper::assets::c4_text()?;
    let calib = lopper::calibrate::from_text(model.tokenizer()?, &c4, 8, 128, 0)?;
    let bi = lopper::structured::depth::block_influence(&model, &calib, &mut |_, _, _| {})?;
    let mut order: Vec<usize> = (0..bi.len()).collect();
    order.sort_by(|&x, &y| bi[x].total_cmp(&bi[y]).then(x.cmp(&y)));
    println!("order (lowest BI first): {order:?}");
    let n = order.len();
    let counts: Vec<usize> = (1..n * 2 / 3).collect();
    let windows: Vec<&[u32]> = (0..4).map(|i| calib.window(i)).collect();
    for c in search_skip(&model, &windows, &order, &counts, 3)? {
        println!(
            "skip {:2}: agreement {:.3} cost {:.3} gain {:.3} (k={})",
            c.skipped.len(),
            c.match_rate,
            c.cost,
            c.gain,
            c.best_k
        );
    }
    Ok(())
}

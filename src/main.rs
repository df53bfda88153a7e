//! The `lopper` command line. Raw flags are turned into validated requests here; the work is
//! done by the library. Errors are printed with their cause chain and a hint, exit code 1.

mod cli;

use anyhow::Result;
use clap::Parser;

fn main() {
    lopper::util::limit_heap_fragmentation();
    let args = cli::Cli::parse();
    if let Err(e) = run(args) {
        eprintln!("error: {e}");
        let mut shown = e.to_string();
        for cause in e.chain().skip(1) {
            // Library errors already include their source in their message (e.g. `path: os error`).
            let c = cause.to_string();
            if !shown.contains(&c) {
                eprintln!("  caused by: {c}");
            }
            shown = c;
        }
        if let Some(hint) = cli::hint(&e) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}

fn run(args: cli::Cli) -> Result<()> {
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    match args.command {
        cli::Command::Prune(a) => cli::prune::run(a),
        cli::Command::Eval(a) if a.token_mode() => cli::token_keep::eval_cmd(a),
        cli::Command::Eval(a) => cli::eval::run(a),
        cli::Command::Inspect(a) => cli::inspect::run(a),
        cli::Command::Convert(a) => cli::convert::run(a),
        cli::Command::Bench(a) => cli::bench::run(a),
        cli::Command::Run(a) => cli::run::run(a),
        cli::Command::Heal(a) => cli::heal::run(a),
        cli::Command::Fetch => cli::fetch(),
    }
}

//! `scripts/chaos --questions N [--seed S]`: the chaos run at any size (see
//! `ebb_tests::chaos`). Its last line of output is the JSON summary; it
//! exits 1 when a promise broke (a question lost, a record changed after it
//! ended, a webhook missing or unsigned, memory past its bound).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ebb_tests::chaos::{Options, run};

#[derive(Debug, Parser)]
struct Args {
    /// Questions to ask.
    #[arg(long, default_value_t = 1_000)]
    questions: usize,
    /// Seed of the question mix and of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Clients asking at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Questions asked per second at most.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds between two faults.
    #[arg(long, default_value_t = 4)]
    fault_every: u64,
    /// No faults: checks the harness itself.
    #[arg(long)]
    calm: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        // Every process of the run inherits it: warnings only, or the
        // faults' fallout fills the terminal.
        // SAFETY: no other thread exists yet (the runtime starts below).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RUST_LOG", "warn");
        }
    }
    let options = Options {
        concurrency: args.concurrency,
        rate_per_second: args.rate,
        faults: !args.calm,
        fault_every: Duration::from_secs(args.fault_every),
        ..Options::new(args.questions, args.seed)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let summary = runtime.block_on(run(options));
    println!(
        "{}",
        serde_json::to_string(&summary).expect("summaries serialize")
    );
    if summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

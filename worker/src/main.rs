use std::process::ExitCode;

use clap::Parser;
use ebb_worker::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let telemetry = ebb_runtime::telemetry::init("ebb-worker")?;
    if let Some(Command::TinyModel { dir, seed, gguf }) = cli.command {
        let shape = ebb_worker::tiny::Shape::TINY;
        if gguf {
            ebb_worker::tiny::write_random_gguf(&dir, shape, seed)?;
        } else {
            ebb_worker::tiny::write_random_model(&dir, shape, seed, candle_core::DType::F32)?;
        }
        println!(
            "wrote a tiny random-weight Qwen2 model to {}",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let shutdown = CancellationToken::new();
    // A second signal exits at once: the questions in hand are redelivered.
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ebb_runtime::shutdown::first_signal("draining: finishing the questions in flight").await;
        on_signal.cancel();
    });
    match ebb_worker::run(cli.config, shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            // A start failure was already published in the last heartbeat;
            // this is the operator's copy, with its causes.
            let error = ebb_runtime::error_chain::describe(&err);
            tracing::error!(error, "ebb-worker stopped");
            // Flush the log and trace exporters before exiting.
            drop(telemetry);
            Ok(ExitCode::FAILURE)
        }
    }
}

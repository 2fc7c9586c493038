use clap::Parser;
use ebb_worker::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = ebb_nats::telemetry::init("ebb-worker")?;
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
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    ebb_worker::run(cli.config, shutdown).await?;
    Ok(())
}

/// First SIGTERM/Ctrl-C drains; the second exits at once (the question in
/// hand is then redelivered to another worker).
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    for round in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        if round == 0 {
            shutdown.cancel();
        } else {
            eprintln!("second signal: exiting without finishing the question in hand");
            std::process::exit(130);
        }
    }
}

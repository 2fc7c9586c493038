use clap::Parser;
use ebb_gateway::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = ebb_nats::telemetry::init("ebb-gateway")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {} (--listen): {err}", config.listen))?;
    ebb_gateway::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

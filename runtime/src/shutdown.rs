//! Shutdown on signals, the same in every binary.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C), after logging `what`
/// happens next; a second signal then exits the process at once (130).
pub async fn first_signal(what: &'static str) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
    tracing::info!("{what}");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("second signal: exiting at once");
        std::process::exit(130);
    });
}

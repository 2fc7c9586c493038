//! A worker's start, phase by phase (download, weights, tokenizer, warm-up),
//! as the heartbeat, the logs and the cold-start benchmark see it; and the
//! last heartbeat of a worker that cannot start.

use std::time::Duration;

use bytes::Bytes;
use ebb_nats::{Heartbeat, PhaseTime, StartPhase, WorkerState, subjects};
use tokio::sync::watch;

/// How long a heartbeat sent on its own may take to reach NATS (a failing
/// worker waits this long at most before it exits).
const FLUSH_WITHIN: Duration = Duration::from_secs(5);

/// Where a starting worker is: every finished phase goes into the heartbeat
/// (`start_phases`, and `phase` moves to the next unfinished one, which the
/// heartbeat publisher sends at once) and into an info log line.
#[derive(Debug, Clone)]
pub struct StartProgress {
    heartbeat: watch::Sender<Heartbeat>,
}

impl StartProgress {
    /// Reports into `heartbeat`, starting with the download phase.
    pub fn new(heartbeat: watch::Sender<Heartbeat>) -> StartProgress {
        heartbeat.send_modify(|beat| beat.phase = next_phase(&beat.start_phases));
        StartProgress { heartbeat }
    }

    /// Progress nobody publishes (the benchmark's in-process load).
    pub fn detached(worker_id: &str, model: &str) -> StartProgress {
        let (heartbeat, _) =
            watch::channel(Heartbeat::loading(worker_id, model, ebb_nats::now_ms()));
        StartProgress::new(heartbeat)
    }

    /// The heartbeat being reported into (e.g. for download progress).
    pub fn heartbeat(&self) -> &watch::Sender<Heartbeat> {
        &self.heartbeat
    }

    /// Records that `phase` finished after `took`. Safe from any thread:
    /// the weights and the tokenizer load at the same time.
    pub fn finished(&self, phase: StartPhase, took: Duration) {
        let ms = took.as_millis() as u64;
        tracing::info!(phase = phase.as_str(), ms, "start phase done");
        self.heartbeat.send_modify(|beat| {
            insert_in_order(&mut beat.start_phases, PhaseTime { phase, ms });
            beat.phase = next_phase(&beat.start_phases);
        });
    }

    /// The phases finished so far, in phase order.
    pub fn phases(&self) -> Vec<PhaseTime> {
        self.heartbeat.borrow().start_phases.clone()
    }
}

/// The first phase not yet finished; `None` once all are.
pub fn next_phase(finished: &[PhaseTime]) -> Option<StartPhase> {
    StartPhase::ALL
        .into_iter()
        .find(|phase| finished.iter().all(|done| done.phase != *phase))
}

/// Adds `done` keeping phase order (phases that run side by side may
/// finish out of order); a phase finished twice keeps its latest time.
pub fn insert_in_order(phases: &mut Vec<PhaseTime>, done: PhaseTime) {
    let rank = |phase: StartPhase| StartPhase::ALL.iter().position(|p| *p == phase);
    phases.retain(|p| p.phase != done.phase);
    let at = phases
        .iter()
        .position(|p| rank(p.phase) > rank(done.phase))
        .unwrap_or(phases.len());
    phases.insert(at, done);
}

/// Milliseconds `phase` took, 0 when it has not finished.
pub fn phase_ms(phases: &[PhaseTime], phase: StartPhase) -> u64 {
    phases.iter().find(|p| p.phase == phase).map_or(0, |p| p.ms)
}

/// Publishes `beat` now and waits (a few seconds at most) until NATS has it.
pub async fn publish_now(client: &async_nats::Client, beat: &Heartbeat) -> Result<(), String> {
    let mut beat = beat.clone();
    beat.sent_at_ms = ebb_nats::now_ms();
    let body = Bytes::from(serde_json::to_vec(&beat).expect("heartbeats serialize"));
    let sent = async {
        client.publish(subjects::HEARTBEAT, body).await?;
        client.flush().await?;
        Ok::<_, async_nats::Error>(())
    };
    match tokio::time::timeout(FLUSH_WITHIN, sent).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("not flushed within {FLUSH_WITHIN:?}")),
    }
}

/// The worker cannot start: marks the heartbeat `failed` with `error`, and
/// publishes it and waits until NATS has it, so the scaler learns why
/// before the process exits. The periodic publisher must be stopped first,
/// or a stale `loading` beat could follow this one.
pub async fn publish_failure(
    client: &async_nats::Client,
    heartbeat: &watch::Sender<Heartbeat>,
    error: String,
) {
    heartbeat.send_modify(|beat| {
        beat.state = WorkerState::Failed;
        beat.error = Some(error);
    });
    let beat = heartbeat.borrow().clone();
    if let Err(cause) = publish_now(client, &beat).await {
        tracing::warn!(cause, "the failed heartbeat was not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(phase: StartPhase, ms: u64) -> PhaseTime {
        PhaseTime { phase, ms }
    }

    #[test]
    fn phases_stay_in_order_when_the_tokenizer_finishes_before_the_weights() {
        let mut phases = vec![done(StartPhase::Download, 5)];
        assert_eq!(next_phase(&phases), Some(StartPhase::Weights));
        insert_in_order(&mut phases, done(StartPhase::Tokenizer, 30));
        // The weights are still loading: that is the phase to report.
        assert_eq!(next_phase(&phases), Some(StartPhase::Weights));
        insert_in_order(&mut phases, done(StartPhase::Weights, 900));
        assert_eq!(next_phase(&phases), Some(StartPhase::WarmUp));
        insert_in_order(&mut phases, done(StartPhase::WarmUp, 40));
        assert_eq!(next_phase(&phases), None);
        assert_eq!(
            phases,
            vec![
                done(StartPhase::Download, 5),
                done(StartPhase::Weights, 900),
                done(StartPhase::Tokenizer, 30),
                done(StartPhase::WarmUp, 40),
            ]
        );
        assert_eq!(phase_ms(&phases, StartPhase::Weights), 900);
    }

    #[test]
    fn a_phase_finished_twice_keeps_one_entry() {
        let mut phases = Vec::new();
        insert_in_order(&mut phases, done(StartPhase::Download, 1));
        insert_in_order(&mut phases, done(StartPhase::Download, 2));
        assert_eq!(phases, vec![done(StartPhase::Download, 2)]);
        assert_eq!(phase_ms(&phases, StartPhase::WarmUp), 0);
    }

    #[test]
    fn progress_moves_the_heartbeat_phase_and_keeps_the_times() {
        let progress = StartProgress::detached("w", "m");
        assert_eq!(
            progress.heartbeat().borrow().phase,
            Some(StartPhase::Download)
        );
        progress.finished(StartPhase::Download, Duration::from_millis(12));
        let beat = progress.heartbeat().borrow().clone();
        assert_eq!(beat.phase, Some(StartPhase::Weights));
        assert_eq!(beat.state, WorkerState::Loading);
        assert_eq!(progress.phases(), vec![done(StartPhase::Download, 12)]);
    }
}

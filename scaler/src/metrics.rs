//! The scaler's `/metrics` (OpenMetrics text): the pool and the queue as
//! the loop last saw them, the histograms of activations, restarts and cold
//! starts, and the answer timings workers report ([`crate::traffic`]).
//! Every name has the `ebb_` prefix, counters end in `_total` and times in
//! `_seconds` (README "Metrics").

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::scaler::{Shared, Status};
use ebb_control::signals::{NewColdStart, WorkerView};

/// What `/metrics` is served as: Prometheus reads the `_total` counter
/// names and `# EOF` of this format, which its classic text parser would not.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds of `ebb_scaler_activation_delay_seconds`. The process
/// backend issues a start within milliseconds, a container can take seconds,
/// and a start held back by restart backoff or a slow pool minutes: the
/// bounds span 1 ms to 10 min so each of those lands in a bucket of its own.
const ACTIVATION_DELAY_BUCKETS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The activation delay histogram; the loop observes each activation as it
/// happens, so the distribution covers every one, not a recent window.
/// Restart delays use the same bounds.
pub fn activation_delay_histogram() -> Histogram {
    Histogram::new(ACTIVATION_DELAY_BUCKETS)
}

/// Bucket bounds of the cold start histograms: a tokenizer
/// loads in milliseconds, a model download can take half an hour.
const START_PHASE_BUCKETS: [f64; 16] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    1800.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// Workers' cold starts as they report them: whole (start to ready) and
/// by phase (four phases: a bounded label set).
#[derive(Debug, Clone)]
pub struct ColdStartHistograms {
    whole: Histogram,
    phases: Family<PhaseLabels, Histogram, fn() -> Histogram>,
}

impl Default for ColdStartHistograms {
    fn default() -> Self {
        ColdStartHistograms {
            whole: Histogram::new(START_PHASE_BUCKETS),
            phases: Family::new_with_constructor(|| Histogram::new(START_PHASE_BUCKETS)),
        }
    }
}

impl ColdStartHistograms {
    pub fn observe(&self, start: &NewColdStart) {
        self.whole.observe(start.whole.as_secs_f64());
        for time in &start.phases {
            let labels = PhaseLabels {
                phase: time.phase.as_str(),
            };
            self.phases
                .get_or_create(&labels)
                .observe(time.ms as f64 / 1000.0);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Worker ids are the pool's own names, one per worker it has: bounded by
/// `max_instances`, never text from a client.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PriorityLabels {
    priority: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

fn int_gauge(value: impl Into<i64>) -> Gauge {
    let gauge = Gauge::default();
    gauge.set(value.into());
    gauge
}

fn float_gauge(value: f64) -> Gauge<f64, AtomicU64> {
    let gauge = Gauge::default();
    gauge.set(value);
    gauge
}

fn gauges<S>(samples: impl IntoIterator<Item = (S, i64)>) -> Family<S, Gauge>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<S, Gauge>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).set(value);
    }
    family
}

/// Counters whose totals are kept elsewhere (heartbeats, the status): set
/// to the current total at each scrape.
fn counters<S>(samples: impl IntoIterator<Item = (S, u64)>) -> Family<S, Counter>
where
    S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug,
{
    let family = Family::<S, Counter>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

/// The workers: wanted, by state, their slots, and each one's own readings.
fn register_workers(registry: &mut Registry, status: &Status) {
    let actual = status.actual;
    registry.register(
        "ebb_scaler_desired_workers",
        "Workers the scaler wants running",
        int_gauge(status.desired),
    );
    let states = [
        ("starting", actual.starting),
        ("idle", actual.idle),
        ("busy", actual.busy),
        ("draining", actual.draining),
        ("unhealthy", actual.unhealthy),
    ];
    registry.register(
        "ebb_scaler_workers",
        "Workers by state",
        gauges(states.map(|(state, n)| (StateLabels { state }, n.into()))),
    );
    let kinds = [("total", actual.slots), ("active", actual.active_slots)];
    registry.register(
        "ebb_scaler_slots",
        "Slots (questions answered at once) of ready workers: all, and in use",
        gauges(kinds.map(|(kind, n)| (KindLabels { kind }, n.into()))),
    );
    registry.register(
        "ebb_scaler_slots_per_worker",
        "Slots per worker the plan counts on (reported, or the config's)",
        int_gauge(status.signals.slots_per_worker),
    );
    let worker = |w: &WorkerView| WorkerLabels {
        worker: w.id.clone(),
    };
    let workers = &status.workers;
    registry.register(
        "ebb_scaler_worker_slots",
        "Slots of each worker, from its heartbeat",
        gauges(workers.iter().map(|w| (worker(w), w.slots.into()))),
    );
    registry.register(
        "ebb_scaler_worker_active_slots",
        "Questions each worker answers now, from its heartbeat",
        gauges(workers.iter().map(|w| (worker(w), w.active.into()))),
    );
    registry.register(
        "ebb_scaler_worker_prefill_tokens",
        "Prompt tokens each worker ran through its model, from its heartbeat",
        counters(workers.iter().map(|w| (worker(w), w.prefill_tokens))),
    );
    registry.register(
        "ebb_scaler_worker_prefill_tokens_saved",
        "Prompt tokens each worker's shared-prompt cache saved it running",
        counters(workers.iter().map(|w| (worker(w), w.prefill_tokens_saved))),
    );
}

/// The queue and what the scaler made of it.
fn register_queue(registry: &mut Registry, status: &Status, asleep: bool) {
    let signals = &status.signals;
    registry.register(
        "ebb_scaler_queue_lag",
        "Questions waiting or being answered",
        int_gauge(i64::try_from(signals.lag).unwrap_or(i64::MAX)),
    );
    let by_priority = status.lag_by_priority.iter().map(|depth| {
        let priority = depth.priority.as_str();
        let lag = i64::try_from(depth.lag()).unwrap_or(i64::MAX);
        (PriorityLabels { priority }, lag)
    });
    registry.register(
        "ebb_scaler_queue_lag_by_priority",
        "Questions waiting or being answered, per priority",
        gauges(by_priority),
    );
    registry.register_with_unit(
        "ebb_scaler_oldest_waiting",
        "Age of the oldest question no worker has taken",
        Unit::Seconds,
        float_gauge(signals.oldest_waiting.as_secs_f64()),
    );
    registry.register(
        "ebb_scaler_arrival_rate",
        "Questions per second (stable window)",
        float_gauge(signals.arrival_rate),
    );
    registry.register(
        "ebb_scaler_asleep",
        "1 while no worker is wanted",
        int_gauge(asleep),
    );
    let decisions = status.decisions_by_reason.iter();
    registry.register(
        "ebb_scaler_decisions",
        "Changes of the desired count, by reason",
        counters(decisions.map(|(&reason, &n)| (ReasonLabels { reason }, n))),
    );
}

/// A registry built per scrape: the values live in the loop's [`Status`],
/// so reading them then is the snapshot; only the histograms live on.
fn render(status: &Status, asleep: bool, shared: &Histograms<'_>) -> String {
    let mut registry = Registry::default();
    register_workers(&mut registry, status);
    register_queue(&mut registry, status, asleep);
    registry.register_with_unit(
        "ebb_scaler_activation_delay",
        "First question at zero workers to worker start issued (restarts after a crash not included)",
        Unit::Seconds,
        shared.activation_delay.clone(),
    );
    registry.register_with_unit(
        "ebb_scaler_restart_delay",
        "Worker lost to its replacement's start issued, the crash backoff included",
        Unit::Seconds,
        shared.restart_delay.clone(),
    );
    registry.register_with_unit(
        "ebb_worker_cold_start",
        "Worker start to ready, as workers report it",
        Unit::Seconds,
        shared.cold_starts.whole.clone(),
    );
    registry.register_with_unit(
        "ebb_scaler_worker_start_phase",
        "Time of each start phase of workers' cold starts, as they report it",
        Unit::Seconds,
        shared.cold_starts.phases.clone(),
    );
    registry.register(
        "ebb_scaler_active",
        "1 while this scaler holds the pool's lease and runs its workers",
        int_gauge(matches!(
            status.lease,
            crate::lease::LeaseView::Active { .. }
        )),
    );
    registry.register_with_unit(
        "ebb_scaler_latency_goal",
        "The latency goal of the scaler's config (target.latency_goal)",
        Unit::Seconds,
        float_gauge(shared.goals.latency_goal),
    );
    registry.register(
        "ebb_scaler_attainment_target",
        "Fraction of questions the config wants answered within the goal (target.attainment)",
        float_gauge(shared.goals.attainment),
    );
    registry.register(
        "ebb_scaler_worker_crashes_in_a_row",
        "Workers lost (crashed, failed to start, unhealthy) since one last came up",
        int_gauge(status.crashes_in_a_row),
    );
    shared.traffic.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

/// The config's goals, for alert rules that compare against them.
#[derive(Debug, Clone, Copy, Default)]
struct Goals {
    latency_goal: f64,
    attainment: f64,
}

/// The histograms that live across scrapes, and the goals.
struct Histograms<'a> {
    goals: Goals,
    activation_delay: &'a Histogram,
    restart_delay: &'a Histogram,
    cold_starts: &'a ColdStartHistograms,
    traffic: &'a crate::traffic::Traffic,
}

/// The `/metrics` text of this scaler now.
pub fn text(shared: &Shared) -> String {
    let goals = {
        let controller = shared.controller.lock().expect("controller lock");
        let target = &controller.autoscaler().policy.config.target;
        Goals {
            latency_goal: target.latency_goal.as_secs_f64(),
            attainment: target.attainment,
        }
    };
    let histograms = Histograms {
        goals,
        activation_delay: &shared.activation_delay,
        restart_delay: &shared.restart_delay,
        cold_starts: &shared.cold_starts,
        traffic: &shared.traffic,
    };
    render(
        &shared.status(),
        shared.asleep.load(Ordering::Relaxed),
        &histograms,
    )
}

#[cfg(test)]
mod tests {
    use super::{ColdStartHistograms, Goals, Histograms, activation_delay_histogram, render};
    use crate::scaler::Status;
    use ebb_control::signals::{Condition, NewColdStart, WorkerView};

    #[test]
    fn metrics_keep_their_names_and_bucket_activations() {
        let mut status = Status {
            desired: 2,
            ..Status::default()
        };
        status.actual.busy = 1;
        status.decisions_by_reason.insert("backlog", 3);
        status.workers.push(WorkerView {
            id: "ebb-worker-1".into(),
            condition: Condition::Busy,
            started_at: chrono::Utc::now(),
            ready_at_ms: None,
            jobs_done: 0,
            slots: 4,
            active: 1,
            prefill_tokens: 900,
            prefill_tokens_saved: 120,
            why_unhealthy: None,
            state: Some(ebb_nats::WorkerState::Busy),
            phase: None,
            download: None,
            download_text: None,
            start_phases: Vec::new(),
            error: None,
        });
        status.crashes_in_a_row = 2;
        let delays = activation_delay_histogram();
        delays.observe(0.002);
        delays.observe(42.0);
        let restarts = activation_delay_histogram();
        restarts.observe(14.3);
        let cold_starts = ColdStartHistograms::default();
        cold_starts.observe(&NewColdStart {
            whole: std::time::Duration::from_millis(96_200),
            phases: [
                (ebb_nats::StartPhase::Weights, 700),
                (ebb_nats::StartPhase::Download, 95_000),
            ]
            .map(|(phase, ms)| ebb_nats::PhaseTime { phase, ms })
            .to_vec(),
        });
        let traffic = crate::traffic::Traffic::default();
        let histograms = Histograms {
            goals: Goals {
                latency_goal: 10.0,
                attainment: 0.99,
            },
            activation_delay: &delays,
            restart_delay: &restarts,
            cold_starts: &cold_starts,
            traffic: &traffic,
        };
        let text = render(&status, false, &histograms);
        for line in [
            "ebb_scaler_desired_workers 2",
            r#"ebb_scaler_workers{state="busy"} 1"#,
            r#"ebb_scaler_worker_slots{worker="ebb-worker-1"} 4"#,
            r#"ebb_scaler_worker_prefill_tokens_total{worker="ebb-worker-1"} 900"#,
            r#"ebb_scaler_worker_prefill_tokens_saved_total{worker="ebb-worker-1"} 120"#,
            r#"ebb_scaler_decisions_total{reason="backlog"} 3"#,
            "ebb_scaler_asleep 0",
            "# TYPE ebb_scaler_activation_delay_seconds histogram",
            r#"ebb_scaler_activation_delay_seconds_bucket{le="0.0025"} 1"#,
            r#"ebb_scaler_activation_delay_seconds_bucket{le="30.0"} 1"#,
            r#"ebb_scaler_activation_delay_seconds_bucket{le="60.0"} 2"#,
            "ebb_scaler_activation_delay_seconds_count 2",
            "ebb_scaler_restart_delay_seconds_count 1",
            r#"ebb_scaler_restart_delay_seconds_bucket{le="10.0"} 0"#,
            r#"ebb_scaler_restart_delay_seconds_bucket{le="30.0"} 1"#,
            "# TYPE ebb_scaler_worker_start_phase_seconds histogram",
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="1.0",phase="weights"} 1"#,
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="60.0",phase="download"} 0"#,
            r#"ebb_scaler_worker_start_phase_seconds_bucket{le="120.0",phase="download"} 1"#,
            "ebb_scaler_worker_crashes_in_a_row 2",
            "ebb_scaler_active 0",
            "ebb_scaler_latency_goal_seconds 10.0",
            "ebb_scaler_attainment_target 0.99",
            r#"ebb_worker_cold_start_seconds_bucket{le="60.0"} 0"#,
            r#"ebb_worker_cold_start_seconds_bucket{le="120.0"} 1"#,
            "# TYPE ebb_worker_first_token_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

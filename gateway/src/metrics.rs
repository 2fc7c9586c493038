//! Counters for `/metrics` (OpenMetrics text). Label values are
//! `&'static str` from closed sets (known languages, fixed reasons): no
//! client text ever becomes a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// What `/metrics` is served as: Prometheus reads the `_total` counter
/// names and `# EOF` of this format, which its classic text parser would not.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QuestionLabels {
    language: &'static str,
    source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    questions: Family<QuestionLabels, Counter>,
    outcomes: Family<OutcomeLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    /// Read from the overload guard at each scrape, not kept up to date.
    waiting: Gauge,
    service_time: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let questions = Family::default();
        registry.register(
            "ebb_gateway_questions",
            "Questions admitted, by language and how the language was known",
            questions.clone(),
        );
        let outcomes = Family::default();
        registry.register(
            "ebb_gateway_answers",
            "Admitted questions by how they were answered",
            outcomes.clone(),
        );
        let rejected = Family::default();
        registry.register(
            "ebb_gateway_rejected",
            "Questions refused at the edge",
            rejected.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "ebb_gateway_queue_waiting",
            "Questions waiting for a worker (last reading)",
            waiting.clone(),
        );
        let service_time = Gauge::default();
        registry.register_with_unit(
            "ebb_gateway_service_time",
            "Mean time a worker takes per question",
            Unit::Seconds,
            service_time.clone(),
        );
        Metrics {
            registry,
            questions,
            outcomes,
            rejected,
            waiting,
            service_time,
        }
    }
}

impl Metrics {
    /// `source` is `given`, `detected` or `unknown`.
    pub fn question(&self, language: &'static str, source: &'static str) {
        self.questions
            .get_or_create(&QuestionLabels { language, source })
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// `outcome` is `cached`, `queued` or `asked_before` (a retry with the
    /// same `Idempotency-Key`).
    pub fn outcome(&self, outcome: &'static str) {
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn render(&self, waiting: u64, service_time_s: f64) -> String {
        self.waiting.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.service_time.set(service_time_s);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn renders_openmetrics_with_the_documented_names() {
        let metrics = Metrics::default();
        metrics.question("French", "given");
        metrics.question("French", "given");
        metrics.outcome("queued");
        metrics.rejected("overloaded");
        let text = metrics.render(3, 1.5);
        for line in [
            r#"ebb_gateway_questions_total{language="French",source="given"} 2"#,
            r#"ebb_gateway_answers_total{outcome="queued"} 1"#,
            r#"ebb_gateway_rejected_total{reason="overloaded"} 1"#,
            "# TYPE ebb_gateway_rejected counter",
            "ebb_gateway_queue_waiting 3",
            "ebb_gateway_service_time_seconds 1.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

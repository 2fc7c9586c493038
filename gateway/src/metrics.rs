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

/// Where the language a question is counted under comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanguageSource {
    /// The client's `language`.
    Given,
    /// A cache hit: as the worker that made the answer detected it.
    Detected,
    /// Queued without one: the worker detects it (the record and the
    /// answer carry it), so the gateway counts it as `unknown`.
    AtWorker,
    /// A cache hit whose answer was made without a language.
    Unknown,
}

impl LanguageSource {
    fn label(self) -> &'static str {
        match self {
            LanguageSource::Given => "given",
            LanguageSource::Detected => "detected",
            LanguageSource::AtWorker => "at_worker",
            LanguageSource::Unknown => "unknown",
        }
    }
}

/// How an admitted question was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// From the answer cache.
    Cached,
    /// Published to the queue.
    Queued,
    /// A retry with the same `Idempotency-Key`: the earlier question's.
    AskedBefore,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Cached, Outcome::Queued, Outcome::AskedBefore];

    fn label(self) -> OutcomeLabels {
        let outcome = match self {
            Outcome::Cached => "cached",
            Outcome::Queued => "queued",
            Outcome::AskedBefore => "asked_before",
        };
        OutcomeLabels { outcome }
    }
}

/// Where a cache lookup found its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// In this gateway's hot cache: no Redis round trip.
    Memory,
    Redis,
    Miss,
}

impl Lookup {
    const ALL: [Lookup; 3] = [Lookup::Memory, Lookup::Redis, Lookup::Miss];

    fn label(self) -> LookupLabels {
        let result = match self {
            Lookup::Memory => "memory",
            Lookup::Redis => "redis",
            Lookup::Miss => "miss",
        };
        LookupLabels { result }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LookupLabels {
    result: &'static str,
}

/// Why a question was refused at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    AuthFailures,
    RateLimited,
    Overloaded,
    TooManyWebhooksForKey,
}

impl Rejection {
    const ALL: [Rejection; 4] = [
        Rejection::AuthFailures,
        Rejection::RateLimited,
        Rejection::Overloaded,
        Rejection::TooManyWebhooksForKey,
    ];

    fn label(self) -> ReasonLabels {
        let reason = match self {
            Rejection::AuthFailures => "auth_failures",
            Rejection::RateLimited => "rate_limited",
            Rejection::Overloaded => "overloaded",
            Rejection::TooManyWebhooksForKey => "too_many_webhooks_for_key",
        };
        ReasonLabels { reason }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DependencyLabels {
    dependency: &'static str,
}

/// Whether the gateway reached its queue and its store at the scrape.
#[derive(Debug, Clone, Copy)]
pub struct Dependencies {
    pub nats: bool,
    pub redis: bool,
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
    dependency_up: Family<DependencyLabels, Gauge>,
    lookups: Family<LookupLabels, Counter>,
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
        let dependency_up = Family::default();
        registry.register(
            "ebb_gateway_dependency_up",
            "1 when the gateway reached its queue (nats) or store (redis) at this scrape",
            dependency_up.clone(),
        );
        // Every outcome and refusal from the start, at 0: a rate over a
        // series that appears only with its first event misses that event.
        for outcome in Outcome::ALL {
            let _ = outcomes.get_or_create(&outcome.label());
        }
        for reason in Rejection::ALL {
            let _ = rejected.get_or_create(&reason.label());
        }
        let lookups = Family::default();
        registry.register(
            "ebb_gateway_cache_lookups",
            "Answer cache lookups, by where the answer was found: memory (this gateway's hot cache), redis, or miss",
            lookups.clone(),
        );
        for result in Lookup::ALL {
            let _ = lookups.get_or_create(&result.label());
        }
        Metrics {
            registry,
            questions,
            outcomes,
            rejected,
            waiting,
            service_time,
            dependency_up,
            lookups,
        }
    }
}

impl Metrics {
    pub fn question(&self, language: &'static str, source: LanguageSource) {
        let source = source.label();
        self.questions
            .get_or_create(&QuestionLabels { language, source })
            .inc();
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rejected.get_or_create(&reason.label()).inc();
    }

    pub fn cache_lookup(&self, result: Lookup) {
        self.lookups.get_or_create(&result.label()).inc();
    }

    pub fn outcome(&self, outcome: Outcome) {
        self.outcomes.get_or_create(&outcome.label()).inc();
    }

    /// Questions answered from the cache since the start.
    pub fn cache_hits(&self) -> u64 {
        self.outcomes.get_or_create(&Outcome::Cached.label()).get()
    }

    pub fn render(&self, waiting: u64, service_time_s: f64, up: Dependencies) -> String {
        self.waiting.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        self.service_time.set(service_time_s);
        for (dependency, up) in [("nats", up.nats), ("redis", up.redis)] {
            self.dependency_up
                .get_or_create(&DependencyLabels { dependency })
                .set(i64::from(up));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{Dependencies, LanguageSource, Metrics, Outcome, Rejection};

    #[test]
    fn renders_openmetrics_with_the_documented_names() {
        let metrics = Metrics::default();
        metrics.question("French", LanguageSource::Given);
        metrics.question("French", LanguageSource::Given);
        metrics.outcome(Outcome::Queued);
        metrics.rejected(Rejection::Overloaded);
        metrics.outcome(Outcome::Cached);
        metrics.cache_lookup(super::Lookup::Memory);
        assert_eq!(metrics.cache_hits(), 1);
        let up = Dependencies {
            nats: true,
            redis: false,
        };
        let text = metrics.render(3, 1.5, up);
        for line in [
            r#"ebb_gateway_questions_total{language="French",source="given"} 2"#,
            r#"ebb_gateway_answers_total{outcome="queued"} 1"#,
            r#"ebb_gateway_rejected_total{reason="overloaded"} 1"#,
            r#"ebb_gateway_rejected_total{reason="too_many_webhooks_for_key"} 0"#,
            r#"ebb_gateway_answers_total{outcome="asked_before"} 0"#,
            "# TYPE ebb_gateway_rejected counter",
            "ebb_gateway_queue_waiting 3",
            "ebb_gateway_service_time_seconds 1.5",
            r#"ebb_gateway_dependency_up{dependency="nats"} 1"#,
            r#"ebb_gateway_dependency_up{dependency="redis"} 0"#,
            r#"ebb_gateway_cache_lookups_total{result="memory"} 1"#,
            r#"ebb_gateway_cache_lookups_total{result="miss"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

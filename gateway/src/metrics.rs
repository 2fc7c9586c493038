//! Counters for `/metrics` (Prometheus text). Label values come from closed
//! sets (known languages, fixed reasons): no client text ever becomes a label.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    /// (language, how it was known) -> questions admitted.
    questions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// reason -> questions refused at the edge.
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// outcome -> admitted questions (`cached` or `queued`).
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// `source` is `given`, `detected` or `unknown`.
    pub fn question(&self, language: &'static str, source: &'static str) {
        *self
            .questions
            .lock()
            .expect("metrics lock")
            .entry((language, source))
            .or_default() += 1;
    }

    pub fn rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .expect("metrics lock")
            .entry(reason)
            .or_default() += 1;
    }

    pub fn outcome(&self, outcome: &'static str) {
        *self
            .outcomes
            .lock()
            .expect("metrics lock")
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn render(&self, waiting: u64, service_time_s: f64) -> String {
        let mut out = String::new();
        out.push_str("# HELP ebb_gateway_questions_total Questions admitted, by language and how the language was known.\n# TYPE ebb_gateway_questions_total counter\n");
        for ((language, source), count) in self.questions.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "ebb_gateway_questions_total{{language=\"{language}\",source=\"{source}\"}} {count}"
            );
        }
        out.push_str("# HELP ebb_gateway_answers_total Admitted questions by how they were answered.\n# TYPE ebb_gateway_answers_total counter\n");
        for (outcome, count) in self.outcomes.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "ebb_gateway_answers_total{{outcome=\"{outcome}\"}} {count}"
            );
        }
        out.push_str("# HELP ebb_gateway_rejected_total Questions refused at the edge.\n# TYPE ebb_gateway_rejected_total counter\n");
        for (reason, count) in self.rejected.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "ebb_gateway_rejected_total{{reason=\"{reason}\"}} {count}"
            );
        }
        let _ = write!(
            out,
            "# HELP ebb_gateway_queue_waiting Questions waiting for a worker (last reading).\n# TYPE ebb_gateway_queue_waiting gauge\nebb_gateway_queue_waiting {waiting}\n# HELP ebb_gateway_service_time_seconds Mean time a worker takes per question.\n# TYPE ebb_gateway_service_time_seconds gauge\nebb_gateway_service_time_seconds {service_time_s}\n"
        );
        out
    }
}

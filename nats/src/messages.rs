//! JSON bodies on the wire. Every field a consumer in another language needs
//! is here; unknown fields are ignored so the contract can grow.

use serde::{Deserialize, Serialize};

use crate::subjects::Priority;

/// Version of the prompt the worker builds from a [`Job`]. Part of the cache
/// key: bump it whenever the prompt changes, and old cached answers retire.
pub const PROMPT_TEMPLATE_VERSION: u32 = 2;

/// A question waiting for an answer: the payload of `ebb.questions.<priority>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Question id; also the `Nats-Msg-Id`, so a retried publish is deduplicated.
    pub id: String,
    /// The student's question, validated and trimmed by the gateway: the
    /// last user message of a chat.
    pub question: String,
    /// Earlier messages of a chat conversation, oldest first (without
    /// `question`). Client `system` messages add to the tutor's instructions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ChatMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub course: Option<String>,
    /// Language the answer should be in (BCP 47 tag or name), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    pub max_tokens: u32,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default)]
    pub priority: Priority,
    /// The model (`id@revision`) the gateway computed the cache key for. A
    /// worker serving another model must not store its answer under the key.
    pub model: String,
    /// Where the answer goes in the cache; `None` for non-deterministic requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    /// When the gateway accepted the question.
    pub enqueued_at_ms: u64,
    /// Where the final answer is POSTed (see [`crate::webhook`]); checked by
    /// the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Why generation stopped, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model ended its answer.
    #[default]
    Stop,
    /// `max_tokens` (or the model's context) ran out first.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// How tokens are chosen. `temperature == 0` is greedy, the default, and the
/// only setting whose answers are cached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Where the time of an answer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timings {
    /// From acceptance by the gateway to the start of generation.
    pub queue_ms: u64,
    /// Prompt processing plus decoding.
    pub inference_ms: u64,
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

/// Events on core NATS `ebb.answers.<id>`: token chunks while generating,
/// then exactly one `done` or `failed`.
///
/// Each token's text is first appended to the question's piece list in
/// Redis ([`crate::Store::pieces`]), then published, so a client joining late
/// reads the list and follows the events from `seq = list length` without a
/// gap or a repeat. A retried question streams again from `seq` 0 under a
/// higher `attempt`: readers drop what they had of the earlier attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnswerEvent {
    Token {
        text: String,
        /// Position of this piece in the answer, from 0.
        #[serde(default)]
        seq: u64,
        /// The delivery this answer comes from (1 on the first).
        #[serde(default)]
        attempt: i64,
    },
    Done {
        answer: String,
        model: String,
        cached: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timings: Option<Timings>,
        #[serde(default)]
        finish_reason: FinishReason,
    },
    Failed {
        error: String,
    },
}

/// Exponentially weighted moving average; weight of the newest sample.
pub fn moving_average(previous: Option<f64>, sample: f64) -> f64 {
    const WEIGHT: f64 = 0.2;
    previous.map_or(sample, |mean| mean + WEIGHT * (sample - mean))
}

impl AnswerEvent {
    pub fn is_final(&self) -> bool {
        !matches!(self, AnswerEvent::Token { .. })
    }
}

/// Lifecycle of a worker as announced in its heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Loading,
    Ready,
    Busy,
    Draining,
}

/// Published on `ebb.workers.heartbeat` every 2 s by every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    pub state: WorkerState,
    pub model: String,
    pub started_at_ms: u64,
    /// When the model finished loading; `ready_at - started_at` is the cold start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at_ms: Option<u64>,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    /// Questions this worker answers at once (its batch capacity). Workers
    /// from before batching send none and have one.
    #[serde(default = "one_slot")]
    pub slots: u32,
    /// Questions in flight right now (at most `slots`).
    #[serde(default)]
    pub active: u32,
    /// Prompt tokens this worker ran through the model since it started.
    #[serde(default)]
    pub prefill_tokens: u64,
    /// Prompt tokens it did not have to run: the shared system-prompt prefix
    /// its prefix cache already held.
    #[serde(default)]
    pub prefill_tokens_saved: u64,
    /// Decode speed of the last finished job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tokens_per_second: Option<f64>,
    /// Moving average of the time one question spends in this worker (ms,
    /// start of generation to answer, batched with up to `slots - 1`
    /// others): with `slots` it is the worker's throughput,
    /// `slots / mean_job_ms` questions a millisecond when full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_job_ms: Option<f64>,
    /// Moving average of acceptance-to-answer time (queue + inference, ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_response_ms: Option<f64>,
    pub sent_at_ms: u64,
}

fn one_slot() -> u32 {
    1
}

/// Published on `ebb.scaler.status` every [`FleetStatus::INTERVAL`] by the
/// scaler: the limits of the fleet it runs, so readers (the gateway's
/// shedding estimate) follow the scaler's config instead of a copy of it.
/// One scaler per deployment: with several, the last heard wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The scaler's `resources.max_instances`: the most workers it runs.
    pub max_workers: u32,
    /// The scaler's `target.slots_per_worker`, its guess at a worker's batch
    /// size until workers report theirs in heartbeats (`slots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots_per_worker: Option<u32>,
    pub published_at_ms: u64,
}

impl FleetStatus {
    /// How often the scaler publishes, from the moment it is connected. Core
    /// NATS keeps no last value, so a reader that starts later waits at most
    /// this long to learn it.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
}

/// Kept in the `EBB_DEAD` stream on `ebb.dead.<id>` for inspection and replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub job: Job,
    pub reason: String,
    pub deliveries: i64,
    pub failed_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answer_events_are_tagged_for_other_languages() {
        let event = AnswerEvent::Token {
            text: "Hi".into(),
            seq: 0,
            attempt: 1,
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"type": "token", "text": "Hi", "seq": 0, "attempt": 1})
        );
        let failed: AnswerEvent =
            serde_json::from_value(json!({"type": "failed", "error": "boom"})).unwrap();
        assert!(failed.is_final());
        assert!(!event.is_final());
    }

    #[test]
    fn a_minimal_job_from_another_client_parses_with_defaults() {
        let job: Job = serde_json::from_value(json!({
            "id": "q1", "question": "What is 2+2?", "max_tokens": 64,
            "model": "m@main", "enqueued_at_ms": 1, "future_field": true
        }))
        .unwrap();
        assert_eq!(job.priority, Priority::Normal);
        assert!(job.sampling.is_greedy());
        assert_eq!(job.cache_key, None);
    }

    #[test]
    fn fleet_status_round_trips_and_slots_are_optional() {
        let status = FleetStatus {
            max_workers: 4,
            slots_per_worker: Some(8),
            published_at_ms: 7,
        };
        let wire = serde_json::to_value(&status).unwrap();
        assert_eq!(
            wire,
            json!({"max_workers": 4, "slots_per_worker": 8, "published_at_ms": 7})
        );
        assert_eq!(serde_json::from_value::<FleetStatus>(wire).unwrap(), status);
        let minimal: FleetStatus =
            serde_json::from_value(json!({"max_workers": 2, "published_at_ms": 1, "new": 0}))
                .unwrap();
        assert_eq!(minimal.slots_per_worker, None);
    }
}

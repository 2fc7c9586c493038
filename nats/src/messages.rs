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
    /// Language the answer should be in (BCP 47 tag or name) as the client
    /// gave it; when absent, the worker detects it from the question.
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
    /// The API key (by name) that asked: only it, or the admin token, may
    /// read the question. `None` for questions no key owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
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
    /// From acceptance by the gateway to the first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_ms: Option<u64>,
}

impl Timings {
    /// From acceptance to the answer's end.
    pub fn response_ms(&self) -> u64 {
        self.queue_ms + self.inference_ms
    }
}

/// A gateway's cache hits since its previous report, on
/// [`crate::subjects::CACHE_HITS`]: what the scaler's console plots beside
/// arrivals (a hit never reaches the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHits {
    pub hits: u64,
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
        /// Seconds the answer stays cached under the question's cache key
        /// (absent: not cached): a gateway relaying it keeps a copy in
        /// memory no longer than that.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cache_ttl_s: Option<u64>,
        /// The question's language as given, or as the worker detected it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        language: Option<String>,
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
    /// The worker cannot start (its model cannot be found, downloaded or
    /// loaded): the last heartbeat it sends, with `error` saying why, just
    /// before it exits non-zero.
    Failed,
}

/// Where a starting worker is, in the order it goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPhase {
    /// Finding the model's files, downloading those not yet in the cache.
    Download,
    /// Reading the weights into memory (or onto the GPU).
    Weights,
    /// Loading the tokenizer.
    Tokenizer,
    /// One forward pass, so the first question does not pay for lazy setup.
    WarmUp,
}

impl StartPhase {
    pub const ALL: [StartPhase; 4] = [
        StartPhase::Download,
        StartPhase::Weights,
        StartPhase::Tokenizer,
        StartPhase::WarmUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StartPhase::Download => "download",
            StartPhase::Weights => "weights",
            StartPhase::Tokenizer => "tokenizer",
            StartPhase::WarmUp => "warm_up",
        }
    }
}

/// A finished start phase and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTime {
    pub phase: StartPhase,
    pub ms: u64,
}

/// How far a model download is (all files of the model together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DownloadProgress {
    /// The file being downloaded now.
    pub file: String,
    pub bytes_done: u64,
    /// Known once the Hub has answered for every file to fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Recent rate, bytes a second.
    pub bytes_per_second: f64,
}

impl DownloadProgress {
    /// Seconds left at the recent rate, when the total is known.
    pub fn eta_seconds(&self) -> Option<f64> {
        let left = self.bytes_total?.saturating_sub(self.bytes_done);
        (self.bytes_per_second > 0.0).then(|| left as f64 / self.bytes_per_second)
    }
}

impl std::fmt::Display for DownloadProgress {
    /// `downloading 3.1 of 15.2 GB (42.0 MB/s, 4m 50s left)`; MB below a GB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scale = self
            .bytes_total
            .unwrap_or(self.bytes_done)
            .max(self.bytes_done);
        let (unit, per) = if scale >= 1_000_000_000 {
            ("GB", 1e9)
        } else {
            ("MB", 1e6)
        };
        write!(f, "downloading {:.1}", self.bytes_done as f64 / per)?;
        if let Some(total) = self.bytes_total {
            write!(f, " of {:.1}", total as f64 / per)?;
        }
        write!(f, " {unit} ({:.1} MB/s", self.bytes_per_second / 1e6)?;
        if let Some(eta) = self.eta_seconds() {
            let eta = std::time::Duration::from_secs(eta.round() as u64);
            write!(f, ", {} left", humantime::format_duration(eta))?;
        }
        write!(f, ")")
    }
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
    /// While `loading`: the start phase in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<StartPhase>,
    /// While downloading the model: how far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadProgress>,
    /// The start phases finished so far, in order, with their durations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub start_phases: Vec<PhaseTime>,
    /// With state `failed`: why the worker cannot start (the file and host
    /// of a failed download, a missing file, a bad flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sent_at_ms: u64,
}

impl Heartbeat {
    /// The first heartbeat of a worker: loading, nothing done yet.
    pub fn loading(worker_id: &str, model: &str, started_at_ms: u64) -> Heartbeat {
        Heartbeat {
            worker_id: worker_id.to_owned(),
            state: WorkerState::Loading,
            model: model.to_owned(),
            started_at_ms,
            ready_at_ms: None,
            jobs_done: 0,
            jobs_failed: 0,
            slots: 0,
            active: 0,
            prefill_tokens: 0,
            prefill_tokens_saved: 0,
            last_tokens_per_second: None,
            mean_job_ms: None,
            mean_response_ms: None,
            phase: None,
            download: None,
            start_phases: Vec::new(),
            error: None,
            sent_at_ms: started_at_ms,
        }
    }
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

/// The question id a message on the question subjects carries even when
/// it is not a readable [`Job`]: its JSON `id`, else its `Nats-Msg-Id`
/// (the gateway sets both). Only ids that are one subject token of
/// letters, digits, `-` and `_` (at most 128) count: the id names NATS
/// subjects and Redis keys.
pub fn carried_id(payload: &[u8], message_id: Option<&str>) -> Option<String> {
    let from_json = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|value| value.get("id")?.as_str().map(str::to_owned));
    [from_json, message_id.map(str::to_owned)]
        .into_iter()
        .flatten()
        .find(|id| {
            (1..=128).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Kept in the `EBB_DEAD` stream on `ebb.dead.<id>` for inspection and replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The question's id (also the subject's last token).
    #[serde(default)]
    pub id: String,
    /// The job as published; `None` when the message was not a readable job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// The message as it came (lossy UTF-8), when it was not a readable job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    pub reason: String,
    pub deliveries: i64,
    pub failed_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unreadable_message_carries_its_json_id_or_its_message_id_if_safe() {
        assert_eq!(
            carried_id(br#"{"id":"q-1","question":42}"#, Some("other")),
            Some("q-1".into())
        );
        assert_eq!(carried_id(b"not json", Some("q_2")), Some("q_2".into()));
        // Ids that would name other subjects or keys do not count.
        assert_eq!(carried_id(br#"{"id":"a.b"}"#, Some("c*")), None);
        assert_eq!(carried_id(br#"{"id":""}"#, None), None);
        assert_eq!(carried_id(b"[]", None), None);
    }

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
    fn download_progress_reads_as_a_sentence() {
        let mut progress = DownloadProgress {
            file: "model.safetensors".into(),
            bytes_done: 3_100_000_000,
            bytes_total: Some(15_200_000_000),
            bytes_per_second: 50e6,
        };
        assert_eq!(
            progress.to_string(),
            "downloading 3.1 of 15.2 GB (50.0 MB/s, 4m 2s left)"
        );
        progress.bytes_done = 2_500_000;
        progress.bytes_total = Some(25_000_000);
        progress.bytes_per_second = 0.0;
        assert_eq!(
            progress.to_string(),
            "downloading 2.5 of 25.0 MB (0.0 MB/s)"
        );
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

//! A question's status record and a cached answer: the JSON every process
//! reads from Redis (`ebb-store` writes them), the body of a webhook call,
//! and what `GET /v1/questions/<id>` returns.

use serde::{Deserialize, Serialize};

use crate::messages::{AnswerEvent, FinishReason, Job, Timings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuestionStatus {
    Queued,
    Running,
    Done,
    Failed,
}

impl QuestionStatus {
    /// The name on the wire (`queued`, `running`, `done`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            QuestionStatus::Queued => "queued",
            QuestionStatus::Running => "running",
            QuestionStatus::Done => "done",
            QuestionStatus::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, QuestionStatus::Done | QuestionStatus::Failed)
    }
}

/// What `GET /v1/questions/<id>` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuestionRecord {
    pub id: String,
    pub status: QuestionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub cached: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// The language the answer was asked in (given or detected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Deliveries so far (1 on the first attempt).
    #[serde(default)]
    pub attempts: i64,
    /// An attempt was in a batch step that crashed the model: later
    /// attempts run alone, so a crash proves (or clears) this question.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run_alone: bool,
    /// The asking API key's name (see [`Job::owner`]); kept in the store,
    /// never shown to clients or webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How long its answer stays cached under the question's cache key,
    /// from `updated_at_ms` (none: not cached); never shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl_s: Option<u64>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl QuestionRecord {
    pub fn queued(id: &str, created_at_ms: u64) -> Self {
        QuestionRecord {
            id: id.to_owned(),
            status: QuestionStatus::Queued,
            answer: None,
            error: None,
            model: None,
            cached: false,
            timings: None,
            finish_reason: None,
            language: None,
            attempts: 0,
            run_alone: false,
            owner: None,
            cache_ttl_s: None,
            created_at_ms,
            updated_at_ms: created_at_ms,
        }
    }

    /// The queued record of `job`.
    pub fn of_job(job: &Job) -> Self {
        QuestionRecord {
            language: job.language.clone(),
            owner: job.owner.clone(),
            ..QuestionRecord::queued(&job.id, job.enqueued_at_ms)
        }
    }

    /// The record as clients and webhooks see it: without who owns it and
    /// how the workers schedule it.
    pub fn for_clients(&self) -> QuestionRecord {
        QuestionRecord {
            owner: None,
            run_alone: false,
            cache_ttl_s: None,
            ..self.clone()
        }
    }

    /// The final answer event this record stands for: what a client
    /// waiting on the question must receive. `None` while it is open.
    pub fn final_event(&self) -> Option<AnswerEvent> {
        match self.status {
            QuestionStatus::Done => Some(AnswerEvent::Done {
                answer: self.answer.clone().unwrap_or_default(),
                model: self.model.clone().unwrap_or_default(),
                cached: self.cached,
                timings: self.timings,
                finish_reason: self.finish_reason.unwrap_or_default(),
                // What is left of it now.
                cache_ttl_s: self.cache_ttl_s.map(|ttl| {
                    let since = crate::now_ms().saturating_sub(self.updated_at_ms) / 1000;
                    ttl.saturating_sub(since)
                }),
                language: self.language.clone(),
            }),
            QuestionStatus::Failed => Some(AnswerEvent::Failed {
                error: self.error.clone().unwrap_or_default(),
            }),
            QuestionStatus::Queued | QuestionStatus::Running => None,
        }
    }
}

/// A cached answer, keyed by the gateway's cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub answer: String,
    pub model: String,
    #[serde(default)]
    pub finish_reason: FinishReason,
    /// The language the answer was asked in, so a hit can report it
    /// without detecting it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_are_the_serde_names() {
        for status in [
            QuestionStatus::Queued,
            QuestionStatus::Running,
            QuestionStatus::Done,
            QuestionStatus::Failed,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
}

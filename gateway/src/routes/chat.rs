//! OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ebb_nats::{FinishReason, QuestionStatus, Timings};
use futures::{Stream, StreamExt};
use serde_json::json;

use super::admission::{Admission, Answered, Hold, admit};
use super::events::sse;
use super::feed::{AnswerFeed, Cursor, Relayed};
use super::{AppState, body_bytes, require_json};
use crate::auth::Caller;
use crate::chat::{AnswerMeta, ChatRequest, chunk, usage_chunk};
use crate::error::ApiError;
use crate::idempotency::IdempotencyKey;
use crate::openapi::{ChatCompletion, ModelList, ModelObject};
use crate::question::MAX_WAIT;

/// Answer a chat (OpenAI's shape); `stream: true` answers with SSE chunks
/// ending in `data: [DONE]`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = crate::request::ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer; with `stream: true` a `text/event-stream` of `chat.completion.chunk`s", content(
            (ChatCompletion = "application/json"),
            (crate::openapi::ServerSentEvent = "text/event-stream"),
        )),
    )
)]
#[tracing::instrument(name = "chat", skip_all, fields(question_id, cached))]
pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let body = body_bytes(body)?;
    let mut request = ChatRequest::from_json(&body, state.limits)?;
    let caller = caller.as_ref().map(|Extension(caller)| caller);
    request.question.owner = caller.and_then(Caller::owner).map(str::to_owned);
    let idempotency = IdempotencyKey::from_request(&headers, caller, "chat", &body)?;
    if let Some(asked) = &request.model
        && !state.serves(asked)
    {
        return Err(ApiError::ModelNotFound {
            asked: asked.clone(),
            served: state.model.clone(),
        });
    }
    let created = ebb_nats::now_ms() / 1000;
    let queued = match admit(
        &state,
        request.question,
        Hold::Required,
        idempotency.as_ref(),
    )
    .await?
    {
        Admission::Cached { id, hit, language } => {
            tracing::Span::current().record("cached", true);
            let answered = Answered::from_cache(id, hit.answer.clone(), language);
            if !request.stream {
                return Ok(completion(&answered, created));
            }
            let chunks = Chunks::new(
                &answered.id,
                &answered.model,
                created,
                request.include_usage,
            );
            let text = answered.answer.clone().unwrap_or_default();
            let mut events = vec![chunks.role(), chunks.piece(&text)];
            events.extend(chunks.finish(&answered));
            return Ok(sse(futures::stream::iter(events), state.sse_keep_alive).into_response());
        }
        Admission::Queued(queued) => queued,
    };
    let mut waiter = queued.waiter.expect("Hold::Required subscribes");
    if request.stream {
        let chunks = Chunks::new(
            &queued.id,
            &state.model_identity,
            created,
            request.include_usage,
        );
        let feed = waiter.feed(
            state.store.clone(),
            state.model.clone(),
            queued.id,
            Cursor::default(),
        );
        return Ok(sse(chunks.of_feed(feed), state.sse_keep_alive).into_response());
    }
    let Some(event) = waiter.final_event(&state.store, &queued.id, MAX_WAIT).await else {
        let status = state
            .store
            .degradable("the status record", state.store.record(&queued.id))
            .await
            .flatten()
            .map_or(QuestionStatus::Queued, |record| record.status);
        return Err(ApiError::AnswerTimeout {
            id: queued.id,
            status: status.as_str(),
            waited: MAX_WAIT,
        });
    };
    let answered = Answered::from_event(queued.id, event, &state.model, queued.language)
        .expect("final_event returns final events");
    match answered.status {
        QuestionStatus::Done => Ok(completion(&answered, created)),
        _ => Err(ApiError::AnswerFailed(answered.error.unwrap_or_default())),
    }
}

fn completion(answered: &Answered, created: u64) -> Response {
    let text = answered.answer.as_deref().unwrap_or_default();
    Json(meta(answered, created).completion(text)).into_response()
}

fn meta(answered: &Answered, created: u64) -> AnswerMeta<'_> {
    AnswerMeta {
        question_id: &answered.id,
        model: &answered.model,
        created,
        cached: answered.cached,
        language: answered.language.as_deref(),
        timings: answered.timings,
        finish_reason: answered.finish_reason.unwrap_or_default(),
    }
}

/// Makes the `chat.completion.chunk` events of one answer.
#[derive(Debug, Clone)]
struct Chunks {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl Chunks {
    fn new(id: &str, model: &str, created: u64, include_usage: bool) -> Chunks {
        Chunks {
            id: id.to_owned(),
            model: model.to_owned(),
            created,
            include_usage,
        }
    }

    /// The role chunk, then a chunk per piece, then the end. A reset ends
    /// the stream with an error: OpenAI's chunks cannot take text back.
    /// Pieces lost on the way (an event dropped in a NATS reconnect) are
    /// sent before the end, from the final answer, so the client's text is
    /// always the recorded answer.
    fn of_feed(self, feed: AnswerFeed) -> impl Stream<Item = Event> + Send + 'static {
        let role = futures::stream::once(std::future::ready(self.role()));
        let rest = feed
            .scan((false, String::new()), move |(ended, sent), item| {
                let events = (!*ended).then(|| {
                    *ended = !matches!(item, Relayed::Piece { .. });
                    self.of_item(item, sent)
                });
                std::future::ready(events)
            })
            .flat_map(futures::stream::iter);
        role.chain(rest)
    }

    /// The events for one relayed item; `sent` is the text streamed so far.
    fn of_item(&self, item: Relayed, sent: &mut String) -> Vec<Event> {
        match item {
            Relayed::Piece { text, .. } => {
                sent.push_str(&text);
                vec![self.piece(&text)]
            }
            Relayed::Reset => self.retried(),
            Relayed::Final(answered) => {
                let answer = answered.answer.as_deref().unwrap_or_default();
                match answer.strip_prefix(sent.as_str()) {
                    _ if answered.status != QuestionStatus::Done => self.finish(&answered),
                    Some("") => self.finish(&answered),
                    Some(missing) => {
                        let mut events = vec![self.piece(missing)];
                        events.extend(self.finish(&answered));
                        events
                    }
                    // What was streamed is not this answer's beginning.
                    None => self.retried(),
                }
            }
        }
    }

    fn retried(&self) -> Vec<Event> {
        let message = format!(
            "the worker failed mid-answer and the question is being retried; see /v1/questions/{}",
            self.id
        );
        error_events(ApiError::AnswerFailed(message))
    }

    fn delta(&self, delta: serde_json::Value, finish: Option<FinishReason>) -> Event {
        data(chunk(&self.id, &self.model, self.created, delta, finish).to_string())
    }

    fn role(&self) -> Event {
        self.delta(json!({"role": "assistant", "content": ""}), None)
    }

    fn piece(&self, text: &str) -> Event {
        self.delta(json!({"content": text}), None)
    }

    fn finish(&self, answered: &Answered) -> Vec<Event> {
        if answered.status != QuestionStatus::Done {
            let error = answered.error.clone().unwrap_or_default();
            return error_events(ApiError::AnswerFailed(error));
        }
        let reason = answered.finish_reason.unwrap_or_default();
        let mut events = vec![self.delta(json!({}), Some(reason))];
        if self.include_usage {
            let timings: Option<Timings> = answered.timings;
            let usage = usage_chunk(&self.id, &self.model, self.created, timings);
            events.push(data(usage.to_string()));
        }
        events.push(data("[DONE]".to_owned()));
        events
    }
}

fn data(body: String) -> Event {
    Event::default().data(body)
}

/// OpenAI's in-stream error: an `error` object, then the end.
fn error_events(error: ApiError) -> Vec<Event> {
    vec![data(error.body().to_string()), data("[DONE]".to_owned())]
}

/// The model this deployment serves (OpenAI's list shape).
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, description = "The served model", body = ModelList))
)]
pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![model_object(&state)],
    })
}

/// One model by id (ids contain `/`, e.g. `Qwen/Qwen2.5-7B-Instruct`).
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "Model id")),
    responses((status = 200, description = "The model", body = ModelObject))
)]
pub(crate) async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelObject>, ApiError> {
    if state.serves(&model) {
        return Ok(Json(model_object(&state)));
    }
    Err(ApiError::ModelNotFound {
        asked: model,
        served: state.model.clone(),
    })
}

fn model_object(state: &AppState) -> ModelObject {
    ModelObject {
        id: state.model.clone(),
        object: "model".into(),
        created: 0,
        owned_by: "ebb".into(),
    }
}

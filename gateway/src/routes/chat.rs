//! OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use ebb_nats::{FinishReason, QuestionStatus, Timings};
use serde_json::json;
use tokio::sync::mpsc;

use super::admission::{Admission, Answered, Hold, Queued, admit};
use super::events::{Cursor, Relayed, relay, sse};
use super::{AppState, body_bytes, require_json};
use crate::chat::{AnswerMeta, ChatRequest, chunk, usage_chunk};
use crate::error::ApiError;
use crate::openapi::{ChatCompletion, ModelList, ModelObject};
use crate::question::MAX_WAIT;
use crate::queue;

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
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let request = ChatRequest::from_json(&body_bytes(body)?, state.limits)?;
    if let Some(asked) = &request.model
        && !state.serves(asked)
    {
        return Err(ApiError::ModelNotFound {
            asked: asked.clone(),
            served: state.model.clone(),
        });
    }
    let created = ebb_nats::now_ms() / 1000;
    let queued = match admit(&state, request.question, Hold::Required).await? {
        Admission::Cached { id, hit, language } => {
            tracing::Span::current().record("cached", true);
            let answered = Answered::from_cache(id, hit, language);
            if request.stream {
                let (writer, events) = ChunkWriter::new(
                    &answered.id,
                    &answered.model,
                    created,
                    request.include_usage,
                );
                tokio::spawn(async move {
                    let text = answered.answer.clone().unwrap_or_default();
                    if writer.role().await && writer.piece(text).await {
                        writer.finish(&answered).await;
                    }
                });
                return Ok(sse(events, state.sse_keep_alive).into_response());
            }
            return Ok(completion(&answered, created));
        }
        Admission::Queued(queued) => queued,
    };
    if request.stream {
        let (writer, events) = ChunkWriter::new(
            &queued.id,
            &state.model_identity,
            created,
            request.include_usage,
        );
        tokio::spawn(stream_answer(state.clone(), queued, writer));
        return Ok(sse(events, state.sse_keep_alive).into_response());
    }
    let mut answers = queued.answers.expect("Hold::Required subscribes");
    let Some(event) = queue::wait_for_answer(&mut answers, MAX_WAIT).await else {
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
        .expect("wait_for_answer returns final events");
    match answered.status {
        QuestionStatus::Done => Ok(completion(&answered, created)),
        _ => Err(ApiError::AnswerFailed(answered.error.unwrap_or_default())),
    }
}

fn completion(answered: &Answered, created: u64) -> Response {
    let text = answered.answer.as_deref().unwrap_or_default();
    Json(meta(answered, created).completion(text)).into_response()
}

/// Relays a queued question's answer into chunks until it ends or the
/// client goes; holds the question's waiting slot meanwhile.
async fn stream_answer(state: Arc<AppState>, queued: Queued, writer: ChunkWriter) {
    let _slot = queued.slot;
    let answers = queued.answers.expect("Hold::Required subscribes");
    let (relayed_tx, mut relayed) = mpsc::channel(64);
    let relaying = relay(
        &state.store,
        &state.model,
        &queued.id,
        answers,
        Cursor::default(),
        relayed_tx,
    );
    let question_id = queued.id.clone();
    // Owns the receiver: when the client goes, dropping it stops the relay.
    let writing = async move {
        if !writer.role().await {
            return;
        }
        loop {
            let item = tokio::select! {
                item = relayed.recv() => item,
                _ = writer.events.closed() => None,
            };
            let open = match item {
                None => false,
                Some(Relayed::Piece { text, .. }) => writer.piece(text).await,
                Some(Relayed::Reset) => {
                    let message = format!(
                        "the worker failed mid-answer and the question is being retried; see /v1/questions/{question_id}"
                    );
                    writer.error(ApiError::AnswerFailed(message)).await;
                    false
                }
                Some(Relayed::Final(answered)) => {
                    writer.finish(&answered).await;
                    false
                }
            };
            if !open {
                return;
            }
        }
    };
    tokio::join!(relaying, writing);
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

/// Writes `chat.completion.chunk`s; each method says whether the client is
/// still there.
struct ChunkWriter {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    events: mpsc::Sender<Event>,
}

/// Chunks buffered per stream before the writer waits for the client.
const CHUNK_BUFFER: usize = 64;

impl ChunkWriter {
    fn new(
        id: &str,
        model: &str,
        created: u64,
        include_usage: bool,
    ) -> (ChunkWriter, mpsc::Receiver<Event>) {
        let (events, receiver) = mpsc::channel(CHUNK_BUFFER);
        let writer = ChunkWriter {
            id: id.to_owned(),
            model: model.to_owned(),
            created,
            include_usage,
            events,
        };
        (writer, receiver)
    }

    async fn send(&self, data: String) -> bool {
        self.events.send(Event::default().data(data)).await.is_ok()
    }

    async fn delta(&self, delta: serde_json::Value, finish: Option<FinishReason>) -> bool {
        let body = chunk(&self.id, &self.model, self.created, delta, finish);
        self.send(body.to_string()).await
    }

    async fn role(&self) -> bool {
        self.delta(json!({"role": "assistant", "content": ""}), None)
            .await
    }

    async fn piece(&self, text: String) -> bool {
        self.delta(json!({"content": text}), None).await
    }

    async fn finish(&self, answered: &Answered) {
        if answered.status != QuestionStatus::Done {
            let error = answered.error.clone().unwrap_or_default();
            self.error(ApiError::AnswerFailed(error)).await;
            return;
        }
        let reason = answered.finish_reason.unwrap_or_default();
        if !self.delta(json!({}), Some(reason)).await {
            return;
        }
        if self.include_usage {
            let timings: Option<Timings> = answered.timings;
            let body = usage_chunk(&self.id, &self.model, self.created, timings);
            if !self.send(body.to_string()).await {
                return;
            }
        }
        self.send("[DONE]".to_owned()).await;
    }

    /// OpenAI's in-stream error: an `error` object, then the end.
    async fn error(&self, error: ApiError) {
        if self.send(error.body().to_string()).await {
            self.send("[DONE]".to_owned()).await;
        }
    }
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

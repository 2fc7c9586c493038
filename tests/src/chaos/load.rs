//! The questions of a chaos run and the clients that ask them: plain ones,
//! repeats (cache hits), ones with a callback, streamed chats, followers of
//! an earlier question's events, and poison. A client retries what the
//! faults refuse (5xx, 429, a broken connection) under the same
//! `Idempotency-Key`, as a careful client would, so a retry never asks twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ebb_nats::QuestionStatus;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Options;
use super::cast::POISON;
use super::ledger::{Asked, Ledger, Outcome};
use crate::sse::SseReader;

/// Tokens per answer: short, so thousands fit in minutes.
const MAX_TOKENS: u64 = 12;
/// How long a client keeps retrying one question through the faults.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);
/// Texts asked again and again: all but the first are cache hits.
const REPEATED: [&str; 4] = [
    "What is a prime number?",
    "Why do we have seasons?",
    "What is photosynthesis?",
    "How do magnets work?",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Repeat,
    Callback,
    Chat,
    Follower,
    Poison,
}

impl Kind {
    fn draw(rng: &mut ChaCha8Rng) -> Kind {
        match rng.random_range(0..100) {
            0..40 => Kind::Plain,
            40..55 => Kind::Repeat,
            55..70 => Kind::Callback,
            70..85 => Kind::Chat,
            85..95 => Kind::Follower,
            _ => Kind::Poison,
        }
    }
}

/// Asks `options.questions` questions with `options.concurrency` clients.
pub async fn ask_all(options: &Options, gateway_url: &str, hook_url: &str, ledger: &Arc<Ledger>) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / options.rate_per_second.max(0.01));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client");
    let clients = (0..options.concurrency).map(|_| {
        let client = Client {
            http: http.clone(),
            gateway: gateway_url.to_owned(),
            hook: hook_url.to_owned(),
            ledger: ledger.clone(),
            seed: options.seed,
        };
        let next = next.clone();
        let total = options.questions;
        async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                tokio::time::sleep_until(start + spacing * n as u32).await;
                client.ask(n).await;
            }
        }
    });
    futures::future::join_all(clients).await;
}

struct Client {
    http: reqwest::Client,
    gateway: String,
    hook: String,
    ledger: Arc<Ledger>,
    seed: u64,
}

impl Client {
    async fn ask(&self, n: usize) {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let kind = Kind::draw(&mut rng);
        let key = format!("chaos-{}-{n}", self.seed);
        let text = match kind {
            Kind::Repeat => REPEATED[rng.random_range(0..REPEATED.len())].to_owned(),
            Kind::Poison => format!("{POISON} question {n}?"),
            _ => format!("Chaos question {n} of seed {}?", self.seed),
        };
        if kind == Kind::Follower
            && let Some(id) = self.ledger.some_accepted(n)
        {
            return self.follow(&id).await;
        }
        self.ledger.asked();
        if kind == Kind::Chat {
            return self.chat(&key, &text).await;
        }
        let mut body = json!({"question": text, "max_tokens": MAX_TOKENS, "wait_seconds": 0});
        if kind == Kind::Callback {
            body["callback_url"] = json!(self.hook);
        }
        let Some((code, answer)) = self.post("/v1/questions", &key, &body).await else {
            return;
        };
        let Some(id) = answer["id"].as_str() else {
            return;
        };
        let asked = Asked {
            poison: kind == Kind::Poison,
            callback: kind == Kind::Callback,
            max_tokens: MAX_TOKENS,
            told: None,
        };
        self.ledger.accepted(id, asked);
        if code == 200
            && let Some(outcome) = outcome_of(&answer)
        {
            self.ledger.told(id, outcome);
        }
    }

    /// POSTs with retries through the faults; `None` if never accepted.
    async fn post(&self, path: &str, key: &str, body: &Value) -> Option<(u16, Value)> {
        let response = self.send(path, key, body).await?;
        let code = response.status().as_u16();
        Some((code, response.json().await.ok()?))
    }

    /// The first 2xx response to `body`, retried through refusals (5xx,
    /// 429, 408) and broken connections under the same key; `None` if
    /// refused for good (another 4xx) or for longer than the client waits.
    async fn send(&self, path: &str, key: &str, body: &Value) -> Option<reqwest::Response> {
        let deadline = Instant::now() + GIVE_UP_AFTER;
        let mut wait = Duration::from_millis(100);
        while Instant::now() < deadline {
            let response = self
                .http
                .post(format!("{}{path}", self.gateway))
                .header("idempotency-key", key)
                .json(body)
                .send()
                .await;
            if let Ok(response) = response {
                let code = response.status().as_u16();
                if (200..300).contains(&code) {
                    return Some(response);
                }
                if (400..500).contains(&code) && code != 429 && code != 408 {
                    self.ledger.refused(code);
                    return None;
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        self.ledger.refused(0);
        None
    }

    /// A streamed chat: accepted once its first chunk names the question;
    /// a stream that ends with `[DONE]` told the client the whole answer.
    async fn chat(&self, key: &str, text: &str) {
        let body = json!({
            "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_TOKENS,
            "stream": true,
        });
        let Some(response) = self.send("/v1/chat/completions", key, &body).await else {
            return;
        };
        let mut reader = SseReader::new(response);
        let mut id: Option<String> = None;
        let mut answer = String::new();
        while let Some(event) = reader.next(Duration::from_secs(60)).await {
            if event.data == "[DONE]" {
                if let Some(id) = &id {
                    let outcome = Outcome {
                        status: QuestionStatus::Done,
                        text: answer,
                    };
                    self.ledger.told(id, outcome);
                }
                return;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
                continue;
            };
            if chunk.get("error").is_some() {
                return; // retried or failed: the record tells at the end
            }
            if id.is_none()
                && let Some(qid) = chunk["id"]
                    .as_str()
                    .and_then(|c| c.strip_prefix("chatcmpl-"))
            {
                let asked = Asked {
                    max_tokens: MAX_TOKENS,
                    ..Asked::default()
                };
                self.ledger.accepted(qid, asked);
                id = Some(qid.to_owned());
            }
            if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                answer.push_str(piece);
            }
        }
    }

    /// Follows an earlier question's events to its final one.
    async fn follow(&self, id: &str) {
        let response = self
            .http
            .get(format!("{}/v1/questions/{id}/events", self.gateway))
            .send()
            .await;
        let Ok(response) = response else {
            return;
        };
        if !response.status().is_success() {
            return;
        }
        let mut reader = SseReader::new(response);
        while let Some(event) = reader.next(Duration::from_secs(60)).await {
            if matches!(event.event.as_str(), "done" | "failed") {
                if let Some(outcome) = serde_json::from_str(&event.data)
                    .ok()
                    .as_ref()
                    .and_then(outcome_of)
                {
                    self.ledger.told(id, outcome);
                }
                return;
            }
        }
    }
}

/// The ending an API answer (`Answered`) states, if it is final.
fn outcome_of(answer: &Value) -> Option<Outcome> {
    let status = match answer["status"].as_str()? {
        "done" => QuestionStatus::Done,
        "failed" => QuestionStatus::Failed,
        _ => return None,
    };
    let text = match status {
        QuestionStatus::Done => answer["answer"].as_str(),
        _ => answer["error"].as_str(),
    };
    Some(Outcome {
        status,
        text: text.unwrap_or_default().to_owned(),
    })
}

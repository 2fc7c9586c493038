//! What the clients, the webhook receiver and the tap saw, kept by the
//! harness (not in Redis, which is one of the things that fail), and the
//! checks at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_nats::{QuestionRecord, QuestionStatus, subjects};
use ebb_store::Store;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Summary;
use super::cast::{Cast, WEBHOOK_SECRET};

/// Most memory the gateway and Redis may hold at the end of a run.
const GATEWAY_RSS_LIMIT_MIB: u64 = 512;
const REDIS_MEMORY_LIMIT_MIB: u64 = 512;

/// How a question ended, as one party saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: QuestionStatus,
    /// The answer, or the error of a failed question.
    pub text: String,
}

impl Outcome {
    pub fn of_record(record: &QuestionRecord) -> Option<Outcome> {
        record.status.is_terminal().then(|| Outcome {
            status: record.status,
            text: match record.status {
                QuestionStatus::Done => record.answer.clone().unwrap_or_default(),
                _ => record.error.clone().unwrap_or_default(),
            },
        })
    }
}

/// One accepted question.
#[derive(Debug, Clone, Default)]
pub struct Asked {
    pub poison: bool,
    pub callback: bool,
    /// Its most tokens: no piece list may be longer.
    pub max_tokens: u64,
    /// The final answer a client was given (a 200, a whole stream).
    pub told: Option<Outcome>,
}

#[derive(Debug, Clone)]
struct Call {
    signed: bool,
    outcome: Option<Outcome>,
}

#[derive(Debug, Default)]
struct Seen {
    asked: u64,
    refused: BTreeMap<u16, u64>,
    accepted: BTreeMap<String, Asked>,
    /// Ids published on the question subjects.
    tapped: BTreeSet<String>,
    calls: BTreeMap<String, Vec<Call>>,
    /// The first terminal record the watcher read, per id.
    first_terminal: BTreeMap<String, Outcome>,
    violations: Vec<String>,
}

#[derive(Debug)]
pub struct Ledger {
    seen: Mutex<Seen>,
    store: Store,
    http: reqwest::Client,
}

impl Ledger {
    pub fn new(redis_url: &str) -> Ledger {
        Ledger {
            seen: Mutex::default(),
            store: Store::connect_lazy(redis_url).expect("a Redis URL"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("ledger lock")
    }

    pub fn asked(&self) {
        self.seen().asked += 1;
    }

    /// A question its client gave up on (`status` 0: refused until the
    /// client stopped retrying).
    pub fn refused(&self, status: u16) {
        *self.seen().refused.entry(status).or_default() += 1;
    }

    pub fn accepted(&self, id: &str, asked: Asked) {
        let mut seen = self.seen();
        if let Some(earlier) = seen.accepted.get(id)
            && (earlier.poison != asked.poison)
        {
            seen.violations
                .push(format!("{id}: one id for two different questions"));
        }
        seen.accepted.entry(id.to_owned()).or_insert(asked);
    }

    /// A client was told the final answer of `id`.
    pub fn told(&self, id: &str, outcome: Outcome) {
        let mut seen = self.seen();
        let Some(asked) = seen.accepted.get_mut(id) else {
            return;
        };
        match &asked.told {
            Some(earlier) if *earlier != outcome => {
                let message = format!("{id}: clients were told two different endings");
                seen.violations.push(message);
            }
            _ => asked.told = Some(outcome),
        }
    }

    /// An accepted id, for followers: the `n`-th modulo the count.
    pub fn some_accepted(&self, n: usize) -> Option<String> {
        let seen = self.seen();
        let count = seen.accepted.len();
        (count > 0).then(|| {
            seen.accepted
                .keys()
                .nth(n % count)
                .cloned()
                .expect("in range")
        })
    }

    /// Serves the webhook receiver on a loopback port; returns its URL.
    pub async fn listen_for_webhooks(self: &Arc<Self>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let ledger = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let ledger = ledger.clone();
                    async move {
                        ledger.called(&headers, &body);
                        axum::http::StatusCode::OK
                    }
                },
            ),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        url
    }

    fn called(&self, headers: &axum::http::HeaderMap, body: &[u8]) {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let signed = header("x-ebb-signature").is_some_and(|signature| valid(signature, body));
        let record: Option<QuestionRecord> = serde_json::from_slice(body).ok();
        let Some(id) = record.as_ref().map(|r| r.id.clone()) else {
            self.seen()
                .violations
                .push("a webhook call without a record".into());
            return;
        };
        let call = Call {
            signed,
            outcome: record.as_ref().and_then(Outcome::of_record),
        };
        self.seen().calls.entry(id).or_default().push(call);
    }

    /// Records the id of every job published while the tap is connected
    /// (`options`: a login that may read the question subjects).
    pub fn tap(
        self: &Arc<Self>,
        options: async_nats::ConnectOptions,
        nats_url: String,
    ) -> tokio::task::JoinHandle<()> {
        let ledger = self.clone();
        tokio::spawn(async move {
            let options = options.retry_on_initial_connect();
            let Ok(client) = options.connect(nats_url).await else {
                return;
            };
            let Ok(mut jobs) = client.subscribe(subjects::QUESTIONS_WILDCARD).await else {
                return;
            };
            while let Some(message) = jobs.next().await {
                let id = serde_json::from_slice::<serde_json::Value>(&message.payload)
                    .ok()
                    .and_then(|job| job["id"].as_str().map(str::to_owned));
                if let Some(id) = id {
                    ledger.seen().tapped.insert(id);
                }
            }
        })
    }

    /// Reads records straight from Redis while the run lasts: a record
    /// once terminal must stay exactly as it first ended.
    pub async fn watch_terminal_records(self: Arc<Self>, stop: CancellationToken) {
        let mut cursor = 0;
        while !stop.is_cancelled() {
            let batch: Vec<String> = {
                let seen = self.seen();
                let ids: Vec<&String> = seen.accepted.keys().collect();
                (0..ids.len().min(100))
                    .map(|k| ids[(cursor + k) % ids.len()].clone())
                    .collect()
            };
            cursor += batch.len();
            for id in batch {
                if let Ok(Some(record)) = self.store.record(&id).await {
                    self.observe_record(&id, &record);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => {}
            }
        }
    }

    fn observe_record(&self, id: &str, record: &QuestionRecord) {
        let mut seen = self.seen();
        let now = Outcome::of_record(record);
        match (seen.first_terminal.get(id).cloned(), now) {
            (None, Some(first)) => {
                seen.first_terminal.insert(id.to_owned(), first);
            }
            (Some(first), now) if now.as_ref() != Some(&first) => {
                let message = format!(
                    "{id}: the record moved from {:?} to {:?}",
                    first.status, record.status
                );
                seen.violations.push(message);
            }
            _ => {}
        }
    }

    /// Waits (up to `settle`) until every question has ended, its webhook
    /// calls are in and the queues are drained, then checks every promise.
    pub async fn settle_and_check(
        &self,
        cast: &tokio::sync::Mutex<Cast>,
        gateway_url: &str,
        settle: Duration,
    ) -> Summary {
        let deadline = Instant::now() + settle;
        let ids: BTreeSet<String> = {
            let seen = self.seen();
            seen.accepted.keys().chain(&seen.tapped).cloned().collect()
        };
        let finals = self.wait_for_endings(&ids, gateway_url, deadline).await;
        self.wait_for_calls(&finals, deadline).await;
        let drained = wait_for_drained(cast, deadline).await;
        let mut summary = self.check(&ids, &finals);
        if let Err(left) = drained {
            summary
                .violations
                .push(format!("queues not drained: {left}"));
        }
        self.check_memory(cast, &mut summary).await;
        summary
    }

    /// The final record of every id that ended by `deadline`, read through
    /// the gateway (as a client would).
    async fn wait_for_endings(
        &self,
        ids: &BTreeSet<String>,
        gateway_url: &str,
        deadline: Instant,
    ) -> BTreeMap<String, Outcome> {
        let mut finals = BTreeMap::new();
        loop {
            let pending: Vec<&String> = ids.iter().filter(|id| !finals.contains_key(*id)).collect();
            let read = futures::stream::iter(pending)
                .map(|id| async move { (id.clone(), self.final_record(gateway_url, id).await) })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await;
            for (id, outcome) in read {
                if let Some(outcome) = outcome {
                    finals.insert(id, outcome);
                }
            }
            if finals.len() == ids.len() || Instant::now() >= deadline {
                return finals;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn final_record(&self, gateway_url: &str, id: &str) -> Option<Outcome> {
        let response = self
            .http
            .get(format!("{gateway_url}/v1/questions/{id}"))
            .send()
            .await
            .ok()?;
        let record: QuestionRecord = response.json().await.ok()?;
        let outcome = Outcome::of_record(&record)?;
        self.observe_record(id, &record);
        Some(outcome)
    }

    /// Waits until each ended question asked with a callback got a signed
    /// call carrying its final outcome.
    async fn wait_for_calls(&self, finals: &BTreeMap<String, Outcome>, deadline: Instant) {
        loop {
            let missing = {
                let seen = self.seen();
                seen.accepted
                    .iter()
                    .filter(|(id, asked)| asked.callback && finals.contains_key(*id))
                    .filter(|(id, _)| !called_with(&seen, id, &finals[*id]))
                    .count()
            };
            if missing == 0 || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn check(&self, ids: &BTreeSet<String>, finals: &BTreeMap<String, Outcome>) -> Summary {
        let seen = self.seen();
        let mut summary = Summary {
            asked: seen.asked,
            refused: seen.refused.clone(),
            accepted: seen.accepted.len() as u64,
            violations: seen.violations.clone(),
            ..Summary::default()
        };
        let unreported = seen
            .tapped
            .iter()
            .filter(|id| !seen.accepted.contains_key(*id))
            .count();
        summary
            .duplicates
            .insert("stored_but_not_reported", unreported as u64);
        for id in ids {
            let Some(outcome) = finals.get(id) else {
                summary.lost += 1;
                summary.violations.push(format!("{id}: never ended"));
                continue;
            };
            match outcome.status {
                QuestionStatus::Done => summary.done += 1,
                _ => summary.failed += 1,
            }
            let asked = seen.accepted.get(id);
            let poison = asked.is_some_and(|a| a.poison);
            let expected = if poison {
                QuestionStatus::Failed
            } else {
                QuestionStatus::Done
            };
            if outcome.status != expected {
                summary.violations.push(format!(
                    "{id}: ended {:?} ({}), expected {expected:?}",
                    outcome.status, outcome.text
                ));
            }
            if let Some(told) = asked.and_then(|a| a.told.as_ref())
                && told != outcome
            {
                summary.violations.push(format!(
                    "{id}: a client was told {:?} {:?}, the record says {:?} {:?}",
                    told.status, told.text, outcome.status, outcome.text
                ));
            }
            if let Some(first) = seen.first_terminal.get(id)
                && first != outcome
            {
                summary
                    .violations
                    .push(format!("{id}: the record changed after it ended"));
            }
            let calls = seen.calls.get(id).map_or(&[][..], Vec::as_slice);
            if calls.iter().any(|call| !call.signed) {
                summary
                    .violations
                    .push(format!("{id}: a webhook call with a bad signature"));
            }
            if calls
                .iter()
                .any(|call| call.outcome.as_ref() != Some(outcome))
            {
                summary.violations.push(format!(
                    "{id}: a webhook call with another ending than the record's"
                ));
            }
            if asked.is_some_and(|a| a.callback) && calls.is_empty() {
                summary
                    .violations
                    .push(format!("{id}: its webhook was never called"));
            }
            *summary.duplicates.entry("webhook_calls").or_default() +=
                calls.len().saturating_sub(1) as u64;
        }
        summary.violations.truncate(50);
        summary
    }

    async fn check_memory(&self, cast: &tokio::sync::Mutex<Cast>, summary: &mut Summary) {
        let pid = cast.lock().await.gateway_pid();
        summary.gateway_rss_mib = pid.and_then(rss_mib).unwrap_or(0);
        if summary.gateway_rss_mib > GATEWAY_RSS_LIMIT_MIB {
            summary
                .violations
                .push(format!("gateway RSS {} MiB", summary.gateway_rss_mib));
        }
        let redis_url = cast.lock().await.redis_url();
        let (used, longest) = redis_memory(&redis_url).await.unwrap_or((0, 0));
        summary.redis_used_mib = used >> 20;
        summary.longest_piece_list = longest;
        if summary.redis_used_mib > REDIS_MEMORY_LIMIT_MIB {
            summary
                .violations
                .push(format!("Redis holds {} MiB", summary.redis_used_mib));
        }
        let most_tokens = self
            .seen()
            .accepted
            .values()
            .map(|a| a.max_tokens)
            .max()
            .unwrap_or(0);
        if longest > most_tokens {
            summary.violations.push(format!(
                "a piece list of {longest} pieces, more than any answer's {most_tokens} tokens"
            ));
        }
    }
}

fn called_with(seen: &Seen, id: &str, outcome: &Outcome) -> bool {
    seen.calls.get(id).is_some_and(|calls| {
        calls
            .iter()
            .any(|c| c.signed && c.outcome.as_ref() == Some(outcome))
    })
}

/// `t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` under the run's secret,
/// computed here as a receiver would, not with the gateway's own
/// `webhook::signature`, so a wrong signer cannot pass its own check.
fn valid(signature: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("any key");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
}

/// The questions stream and the webhook queue empty, every consumer done.
async fn wait_for_drained(
    cast: &tokio::sync::Mutex<Cast>,
    deadline: Instant,
) -> Result<(), String> {
    let (options, nats_url) = {
        let cast = cast.lock().await;
        (cast.nats.operator(), cast.nats_url())
    };
    let client = options.connect(nats_url).await.map_err(|e| e.to_string())?;
    let jetstream = async_nats::jetstream::new(client);
    loop {
        let mut left = Vec::new();
        for name in [subjects::QUESTIONS_STREAM, ebb_nats::webhook::STREAM] {
            match jetstream.get_stream(name).await {
                Ok(mut stream) => match stream.info().await {
                    Ok(info) if info.state.messages > 0 => {
                        left.push(format!("{name} holds {}", info.state.messages));
                    }
                    Ok(_) => {}
                    Err(err) => left.push(format!("{name}: {err}")),
                },
                Err(err) => left.push(format!("{name}: {err}")),
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            left.push(consumers_state(&jetstream).await);
            return Err(left.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The worker consumers' view, for a queue that did not drain.
async fn consumers_state(jetstream: &async_nats::jetstream::Context) -> String {
    let Ok(stream) = jetstream.get_stream(subjects::QUESTIONS_STREAM).await else {
        return "no question stream".into();
    };
    let mut states = Vec::new();
    for priority in ebb_nats::Priority::ALL {
        let name = subjects::consumer(priority);
        if let Ok(info) = stream.consumer_info(&name).await {
            states.push(format!(
                "{name}: pending {} ack pending {} ack floor {} delivered {}",
                info.num_pending,
                info.num_ack_pending,
                info.ack_floor.stream_sequence,
                info.delivered.stream_sequence
            ));
        }
    }
    let first = stream.cached_info().state.first_sequence;
    let last = stream.cached_info().state.last_sequence;
    format!("stream seq {first}..{last}; {}", states.join("; "))
}

fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// Redis's used memory (bytes) and its longest list of answer pieces.
async fn redis_memory(url: &str) -> Option<(u64, u64)> {
    let client = redis::Client::open(url).ok()?;
    let mut redis = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis)
        .await
        .ok()?;
    let used = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))?
        .trim()
        .parse()
        .ok()?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("ebb:pieces:*")
        .query_async(&mut redis)
        .await
        .ok()?;
    let mut longest = 0;
    for key in keys {
        let length: u64 = redis::cmd("LLEN")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap_or(0);
        longest = longest.max(length);
    }
    Some((used, longest))
}

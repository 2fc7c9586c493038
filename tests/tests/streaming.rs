//! Answers as they are made and where they go: SSE events with late join and
//! resume, priorities with aging, detected languages, signed webhooks.

use std::time::Duration;

use ebb_tests::{SseReader, Stack, StackOptions, TempDir};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn events(stack: &Stack, id: &str, last_event_id: Option<&str>) -> SseReader {
    let mut request = stack
        .http
        .get(format!("{}/v1/questions/{id}/events", stack.gateway_url));
    if let Some(last) = last_event_id {
        request = request.header("last-event-id", last);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    SseReader::new(response)
}

/// Token texts by seq (since the last `reset`), and the final event's body.
fn split(events: &[ebb_tests::SseEvent]) -> (Vec<(u64, String)>, Value) {
    let mut tokens = Vec::new();
    let mut last = Value::Null;
    for event in events {
        match event.event.as_str() {
            "token" => {
                let data: Value = serde_json::from_str(&event.data).unwrap();
                let seq = data["seq"].as_u64().unwrap();
                let id = format!("{}.{seq}", data["attempt"]);
                assert_eq!(event.id.as_deref(), Some(id.as_str()));
                tokens.push((seq, data["text"].as_str().unwrap().to_owned()));
            }
            "reset" => tokens.clear(),
            "done" | "failed" => last = serde_json::from_str(&event.data).unwrap(),
            _ => {}
        }
    }
    (tokens, last)
}

#[tokio::test]
async fn events_join_late_resume_after_an_id_and_replay_a_finished_answer() {
    let stack = Stack::start(StackOptions::default()).await;
    let _worker = stack.worker(&["--debug-token-delay", "40ms"]);
    let (code, body) = stack
        .ask(json!({"question": "Tell me about rivers.", "max_tokens": 40, "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["events_url"], format!("/v1/questions/{id}/events"));

    // Join once generation is under way: what exists first, then the rest.
    loop {
        let (_, record) = stack.status_of(&id).await;
        if record["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = events(&stack, &id, None).await;
    let (tokens, done) = split(&late.until("done", Duration::from_secs(60)).await);
    assert_eq!(done["status"], "done", "{done}");
    let seqs: Vec<u64> = tokens.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (0..tokens.len() as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    let text: String = tokens.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(text, done["answer"].as_str().unwrap());
    assert!(tokens.len() > 5, "a 40-token answer streams in pieces");

    // Resume after piece 2 of attempt 1: only the rest.
    let mut resumed = events(&stack, &id, Some("1.2")).await;
    let (rest, done_again) = split(&resumed.until("done", Duration::from_secs(10)).await);
    assert_eq!(rest.first().map(|(seq, _)| *seq), Some(3));
    assert_eq!(rest, tokens[3..].to_vec());
    assert_eq!(done_again["answer"], done["answer"]);

    // Unknown ids are 404 JSON, not an endless stream.
    let response = stack
        .http
        .get(format!(
            "{}/v1/questions/nope-123/events",
            stack.gateway_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[tokio::test]
async fn a_retry_mid_stream_resets_the_text_and_a_stale_resume_is_reset_too() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut first = stack.worker(&["--debug-token-delay", "50ms"]);
    let (_, body) = stack
        .ask(json!({"question": "Tell me about mountains.", "max_tokens": 40, "wait_seconds": 0}))
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let mut stream = events(&stack, &id, None).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let event = stream.next(Duration::from_secs(60)).await.expect("tokens");
        if event.event == "token" {
            seen.push(event);
        }
    }
    // The worker dies mid-answer; after the ack wait another one retries.
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    let _second = stack.worker(&["--debug-token-delay", "5ms"]);
    let rest = stream.until("done", Duration::from_secs(60)).await;
    let resets = rest.iter().filter(|event| event.event == "reset").count();
    assert_eq!(resets, 1, "{rest:?}");
    let (tokens, done) = split(&rest);
    assert_eq!(done["status"], "done", "{done}");
    let (_, record) = stack.status_of(&id).await;
    assert_eq!(record["attempts"], 2, "{record}");
    let text: String = tokens.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(
        text,
        done["answer"].as_str().unwrap(),
        "after the reset: attempt 2 whole"
    );

    // A client resuming with attempt 1's position is told to start over.
    let mut stale = events(&stack, &id, Some("1.4")).await;
    let replay = stale.until("done", Duration::from_secs(10)).await;
    assert_eq!(
        replay.first().map(|event| event.event.as_str()),
        Some("reset")
    );
    let (again, _) = split(&replay);
    assert_eq!(again, tokens);
}

#[tokio::test]
async fn a_quiet_stream_gets_keep_alive_comments() {
    let options = StackOptions::with_gateway_args(&["--insecure-dev", "--sse-keep-alive", "200ms"]);
    let stack = Stack::start(options).await;
    // No worker: the question waits, and the stream must stay alive.
    let (_, body) = stack
        .ask(json!({"question": "Anyone there?", "wait_seconds": 0}))
        .await;
    let mut stream = events(&stack, body["id"].as_str().unwrap(), None).await;
    let event = stream.next(Duration::from_secs(5)).await.expect("an event");
    assert_eq!(event.event, ":");
    assert_eq!(event.data, "keep-alive");
}

/// A stack whose gateway classifies by [`PRIORITY_CONFIG`].
async fn priority_stack(dir: &TempDir) -> Stack {
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, PRIORITY_CONFIG).unwrap();
    let config = path.to_str().unwrap();
    Stack::start(StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--config",
        config,
    ]))
    .await
}

/// When each question started generating: created + time in the queue.
async fn start_order(stack: &Stack, ids: &[(String, &str)]) -> Vec<String> {
    let mut started = Vec::new();
    for (id, label) in ids {
        let record = stack.wait_terminal(id, Duration::from_secs(60)).await;
        let start = record["created_at_ms"].as_u64().unwrap()
            + record["timings"]["queue_ms"].as_u64().unwrap();
        started.push((start, label.to_string()));
    }
    started.sort();
    started.into_iter().map(|(_, label)| label).collect()
}

const PRIORITY_CONFIG: &str = r#"
priority:
  default: normal
  rules:
    - grades: [12]
      priority: high
    - courses: [practice]
      priority: low
"#;

#[tokio::test]
async fn workers_serve_high_before_normal_before_low_and_the_scaler_counts_all() {
    let dir = TempDir::new("priority");
    let stack = priority_stack(&dir).await;
    let mut ids = Vec::new();
    for (n, (fields, label)) in [
        (json!({"course": "practice"}), "low"),
        (json!({}), "normal"),
        (json!({"grade": 12}), "high"),
        (json!({"course": "Practice"}), "low"),
        (json!({"grade": 9}), "normal"),
        (json!({"grade": 12}), "high"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body =
            json!({"question": format!("Question {n}?"), "max_tokens": 4, "wait_seconds": 0});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let (code, answer) = stack.ask(body).await;
        assert_eq!(code, 202, "{answer}");
        assert_eq!(answer["priority"], label, "{answer}");
        ids.push((answer["id"].as_str().unwrap().to_owned(), label));
    }
    let depth = ebb_nats::queue_depth(&stack.questions_stream().await)
        .await
        .unwrap();
    assert_eq!(
        depth.lag(),
        6,
        "the scaler's lag counts every priority: {depth:?}"
    );

    // One slot: order shows when questions compete for it.
    let _worker = stack.worker(&["--priority-aging", "1h", "--max-batch", "1"]);
    let order = start_order(&stack, &ids).await;
    assert_eq!(order, ["high", "high", "normal", "normal", "low", "low"]);
}

#[tokio::test]
async fn an_aged_low_question_goes_before_fresh_high_ones() {
    let dir = TempDir::new("aging");
    let stack = priority_stack(&dir).await;
    let ask = |body: Value| async { stack.ask(body).await.1["id"].as_str().unwrap().to_owned() };
    let old_low = ask(json!({"question": "Old practice?", "course": "practice", "max_tokens": 4, "wait_seconds": 0})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut ids = vec![(old_low, "low")];
    for n in 0..3 {
        let id = ask(json!({"question": format!("Urgent {n}?"), "grade": 12, "max_tokens": 4, "wait_seconds": 0})).await;
        ids.push((id, "high"));
    }
    let _worker = stack.worker(&["--priority-aging", "1s", "--max-batch", "1"]);
    let order = start_order(&stack, &ids).await;
    assert_eq!(order[0], "low", "the aged question first: {order:?}");
}

#[tokio::test]
async fn the_worker_detects_the_language_and_it_is_reported_and_counted() {
    let stack = Stack::start(StackOptions::default()).await;
    let (code, queued) = stack
        .ask(json!({"question": "لماذا يتغير شكل القمر خلال الشهر؟", "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{queued}");
    assert!(
        queued.get("language").is_none(),
        "the gateway does not detect: {queued}"
    );
    let _worker = stack.worker(&[]);
    for (question, language) in [
        ("Explain the French revolution", "English"),
        ("为什么月亮在一个月里会改变形状？", "Chinese"),
        (
            "¿Por qué la luna cambia de forma durante el mes?",
            "Spanish",
        ),
    ] {
        let (code, body) = stack
            .ask(json!({"question": question, "max_tokens": 2}))
            .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["language"], language, "{question}");
        let (_, record) = stack.status_of(body["id"].as_str().unwrap()).await;
        assert_eq!(record["language"], language);
    }
    let arabic = queued["id"].as_str().unwrap();
    let record = stack.wait_terminal(arabic, Duration::from_secs(30)).await;
    assert_eq!(
        (&record["status"], &record["language"]),
        (&json!("done"), &json!("Arabic")),
        "{record}"
    );
    let (_, given) = stack
        .ask(json!({"question": "Why is the sea salty?", "language": "French", "wait_seconds": 0}))
        .await;
    assert_eq!(given["language"], "French");
    let metrics = stack.metrics().await;
    assert!(
        metrics.contains(r#"ebb_gateway_questions_total{language="unknown",source="at_worker"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"ebb_gateway_questions_total{language="French",source="given"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains("moon") && !metrics.contains("luna"),
        "no text in metrics"
    );
}

#[tokio::test]
async fn a_cache_hit_reports_the_language_detected_when_it_was_answered() {
    let stack = Stack::start(StackOptions::default()).await;
    let _worker = stack.worker(&[]);
    let question =
        json!({"question": "¿Por qué la luna cambia de forma durante el mes?", "max_tokens": 6});
    let (code, first) = stack.ask(question.clone()).await;
    assert_eq!((code, &first["cached"]), (200, &json!(false)), "{first}");
    let (code, hit) = stack.ask(question).await;
    assert_eq!(code, 200, "{hit}");
    assert_eq!(hit["cached"], true, "{hit}");
    assert_eq!(hit["language"], "Spanish", "{hit}");
    assert_eq!(hit["answer"], first["answer"]);
}

/// One HTTP request as a webhook receiver sees it.
#[derive(Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A webhook receiver on 127.0.0.1 answering `statuses` in turn (then 200).
async fn receiver(statuses: Vec<u16>) -> (String, tokio::sync::mpsc::Receiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let (head_end, length) = loop {
                let n = socket.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
                if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    break (end + 4, length);
                }
            };
            while raw.len() < head_end + length {
                let n = socket.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|line| line.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let status = statuses.next().unwrap_or(200);
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            socket.write_all(reply.as_bytes()).await.unwrap();
            let _ = tx
                .send(Received {
                    headers,
                    body: raw[head_end..head_end + length].to_vec(),
                })
                .await;
        }
    });
    (url, rx)
}

fn hmac_hex(secret: &str, message: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn the_final_answer_is_posted_signed_and_retried_until_taken() {
    let options = StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--webhook-secret",
        "s3cret",
        "--webhook-allow",
        "127.0.0.0/8",
    ]);
    let stack = Stack::start(options).await;
    let _worker = stack.worker(&[]);
    // The receiver fails the first call: the dispatcher must retry.
    let (url, mut calls) = receiver(vec![503]).await;
    let (code, body) = stack
        .ask(json!({"question": "Call me back?", "max_tokens": 6, "callback_url": url, "wait_seconds": 30}))
        .await;
    assert_eq!(code, 200, "{body}");
    let first = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.body, second.body, "the retry carries the same record");

    let signature = second.header("x-ebb-signature").expect("signed");
    let (t, v1) = signature.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&second.body);
    assert_eq!(v1, hmac_hex("s3cret", &signed), "HMAC-SHA256 of t.body");
    let age = ebb_nats::now_ms() / 1000 - t.parse::<u64>().unwrap();
    assert!(age < 60, "fresh timestamp");

    let record: Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(record["id"], body["id"]);
    assert_eq!(record["status"], "done");
    assert_eq!(record["answer"], body["answer"]);
    assert_eq!(second.header("x-ebb-question-id"), body["id"].as_str());
    // Delivered: no third call.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), calls.recv())
            .await
            .is_err()
    );

    // The same question again is a cache hit, and still calls back.
    let (code, hit) = stack
        .ask(json!({"question": "Call me back?", "max_tokens": 6, "callback_url": url}))
        .await;
    assert_eq!((code, &hit["cached"]), (200, &json!(true)), "{hit}");
    let cached = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .unwrap()
        .unwrap();
    let record: Value = serde_json::from_slice(&cached.body).unwrap();
    assert_eq!(record["cached"], true, "{record}");
    assert_eq!(record["id"], hit["id"]);
    assert_eq!(record["answer"], body["answer"]);
}

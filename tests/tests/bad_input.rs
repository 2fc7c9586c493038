//! Every bad-input class gets its status code and a JSON error, and the
//! gateway keeps serving.

use ebb_tests::{Stack, StackOptions};
use serde_json::Value;

async fn post_raw(
    stack: &Stack,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut request = stack
        .http
        .post(format!("{}/v1/questions", stack.gateway_url))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.expect("errors are JSON"))
}

fn assert_error(result: (u16, Value), code: u16, error_type: &str, field: Option<&str>) {
    let (actual, body) = result;
    assert_eq!(actual, code, "{body}");
    assert_eq!(body["error"]["type"], error_type, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if let Some(field) = field {
        assert_eq!(body["error"]["field"], field, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let stack = Stack::start(StackOptions::default()).await;
    let json = Some("application/json");

    let huge = format!(r#"{{"question":"{}"}}"#, "a".repeat(129 * 1024));
    assert_error(
        post_raw(&stack, json, huge).await,
        413,
        "payload_too_large",
        None,
    );
    assert_error(
        post_raw(&stack, Some("text/plain"), r#"{"question":"hi"}"#).await,
        415,
        "unsupported_media_type",
        None,
    );
    assert_error(
        post_raw(&stack, None, r#"{"question":"hi"}"#).await,
        415,
        "unsupported_media_type",
        None,
    );
    assert_error(
        post_raw(&stack, json, "{not json").await,
        400,
        "invalid_json",
        None,
    );
    assert_error(
        post_raw(&stack, json, "[1]").await,
        400,
        "invalid_json",
        None,
    );

    let too_long = format!(r#"{{"question":"{}"}}"#, "b".repeat(4_001));
    let cases: [(&str, &str); 10] = [
        ("{}", "question"),
        (r#"{"question":null}"#, "question"),
        (r#"{"question":7}"#, "question"),
        (r#"{"question":" \n\t "}"#, "question"),
        (&too_long, "question"),
        (r#"{"question":"hi","grade":"seven"}"#, "grade"),
        (r#"{"question":"hi","max_tokens":0}"#, "max_tokens"),
        (r#"{"question":"hi","max_tokens":100000}"#, "max_tokens"),
        (r#"{"question":"hi","wait_seconds":500}"#, "wait_seconds"),
        (r#"{"question":"hi","language":42}"#, "language"),
    ];
    for (body, field) in cases {
        assert_error(
            post_raw(&stack, json, body.to_owned()).await,
            422,
            "invalid_request",
            Some(field),
        );
    }

    let (code, body) = stack
        .status_of("0198f1d2-0000-7000-8000-000000000000")
        .await;
    assert_error((code, body), 404, "not_found", None);
    let (code, body) = stack.status_of("..%2F..%2Fetc").await;
    assert_error((code, body), 404, "not_found", None);
    let response = stack
        .http
        .get(format!("{}/v2/nothing", stack.gateway_url))
        .send()
        .await
        .unwrap();
    assert_error(
        (response.status().as_u16(), response.json().await.unwrap()),
        404,
        "not_found",
        None,
    );
    let response = stack
        .http
        .delete(format!("{}/v1/questions", stack.gateway_url))
        .send()
        .await
        .unwrap();
    assert_error(
        (response.status().as_u16(), response.json().await.unwrap()),
        405,
        "method_not_allowed",
        None,
    );

    // Nothing bad was queued, and the gateway still serves.
    let stream = stack.questions_stream().await;
    assert_eq!(stream.get_info().await.unwrap().state.last_sequence, 0);
    let (code, accepted) = stack
        .ask(serde_json::json!({"question": "still there?", "wait_seconds": 0}))
        .await;
    assert_eq!(code, 202, "{accepted}");
}

#[tokio::test]
async fn health_reports_each_dependency() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let health = |stack: &Stack| {
        let request = stack.http.get(format!("{}/healthz", stack.gateway_url));
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (code, body) = health(&stack).await;
    assert_eq!(code, 200);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["model"], "ebb/tiny-qwen2");
    assert_eq!(
        (body["nats"].as_str(), body["redis"].as_str()),
        (Some("ok"), Some("ok"))
    );

    stack.redis.stop();
    let (code, body) = health(&stack).await;
    assert_eq!(code, 503);
    assert_eq!(
        (body["nats"].as_str(), body["redis"].as_str()),
        (Some("ok"), Some("unavailable"))
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_queue_full_and_keeps_what_it_has() {
    let stack = Stack::start(StackOptions {
        queue_max_messages: 2,
        ..StackOptions::default()
    })
    .await;
    for n in 0..2 {
        let (code, body) = stack
            .ask(serde_json::json!({"question": format!("q{n}"), "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202, "{body}");
    }
    let (code, body) = stack
        .ask(serde_json::json!({"question": "one too many", "wait_seconds": 0}))
        .await;
    assert_error((code, body), 503, "queue_full", None);
    let stream = stack.questions_stream().await;
    assert_eq!(stream.get_info().await.unwrap().state.messages, 2);
}

/// A client that trickles its body is cut off after `--body-timeout` with a
/// JSON `408 body_timeout`, instead of holding the connection (issue 14).
#[tokio::test]
async fn a_body_sent_too_slowly_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--body-timeout",
        "1s",
    ]))
    .await;
    let address = stack.gateway_url.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /v1/questions HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\ncontent-length: 64\r\nconnection: close\r\n\r\n{{\"question\":"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut response = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_string(&mut response),
    )
    .await
    .expect("the gateway answers without the rest of the body")
    .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"body_timeout\""), "{response}");
}

//! Who may ask and how much: API keys and the admin token, per-IP and
//! per-key rate limits (exact counts, `Retry-After`, `X-RateLimit-*`),
//! trusted proxies, shedding under overload, and SSRF refusals.

use std::time::Duration;

use ebb_nats::CachedAnswer;
use ebb_nats::access::Role;
use ebb_store::Store;
use ebb_tests::{Stack, StackOptions, TempDir, eventually};
use serde_json::{Value, json};

const KEY: &str = "sk-test-app";
const SLOW_KEY: &str = "sk-test-slow";
const ADMIN: &str = "admin-test-token";

fn sha256_hex(text: &str) -> String {
    ebb_gateway::auth::hex_digest(text)
}

/// A gateway with two keys (one limited to 3 a minute) and an admin token.
fn keyed_options(dir: &TempDir, extra: &[&str]) -> StackOptions {
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "api_keys:\n  - name: app\n    sha256: {}\n  - name: slow\n    sha256: {}\n    per_minute: 3\n",
            sha256_hex(KEY),
            sha256_hex(SLOW_KEY)
        ),
    )
    .unwrap();
    let mut args: Vec<String> = ["--config", config.to_str().unwrap(), "--admin-token", ADMIN]
        .map(str::to_owned)
        .to_vec();
    args.extend(extra.iter().map(|arg| arg.to_string()));
    StackOptions {
        gateway_args: args,
        ..StackOptions::default()
    }
}

async fn send(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.expect("gateway reachable");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn question(stack: &Stack, text: &str) -> reqwest::RequestBuilder {
    stack
        .http
        .post(format!("{}/v1/questions", stack.gateway_url))
        .json(&json!({"question": text, "wait_seconds": 0}))
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn api_keys_guard_the_public_routes_and_the_admin_token_the_admin_routes() {
    let dir = TempDir::new("keys");
    let stack = Stack::start(keyed_options(&dir, &[])).await;
    let models = format!("{}/v1/models", stack.gateway_url);

    let (code, headers, body) = send(stack.http.get(&models)).await;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error"]["type"], "unauthorized");
    assert_eq!(header(&headers, "www-authenticate"), "Bearer");
    let (code, _, _) = send(stack.http.get(&models).bearer_auth("sk-wrong")).await;
    assert_eq!(code, 401);
    let (code, _, body) = send(stack.http.get(&models).bearer_auth(KEY)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"][0]["id"], ebb_tests::stack::TINY_MODEL);
    let (code, _, _) = send(question(&stack, "Is this allowed?")).await;
    assert_eq!(code, 401, "questions need a key too");

    let admin = format!("{}/admin/queue", stack.gateway_url);
    let (code, _, _) = send(stack.http.get(&admin)).await;
    assert_eq!(code, 401);
    let (code, _, body) = send(stack.http.get(&admin).bearer_auth(KEY)).await;
    assert_eq!(code, 403, "an API key is not the admin token: {body}");
    let (code, _, body) = send(stack.http.get(&admin).bearer_auth(ADMIN)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["depth"]["priorities"].as_array().unwrap().len(), 3);
    // Health, metrics and the API document stay open for probes and tools.
    for open in ["/healthz", "/metrics", "/openapi.json"] {
        let response = stack
            .http
            .get(format!("{}{open}", stack.gateway_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{open}");
    }
}

#[tokio::test]
async fn without_keys_the_gateway_refuses_to_start_unless_insecure_dev() {
    use clap::Parser as _;
    let stack = Stack::start(StackOptions::default()).await;
    let mut args = vec!["ebb-gateway".to_owned()];
    args.extend(stack.shared_args(Role::Gateway));
    let config = ebb_gateway::Config::try_parse_from(args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ebb_gateway::run(config, listener, async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--insecure-dev"), "{err}");
}

#[tokio::test]
async fn the_per_ip_limit_allows_exactly_its_size_then_429_with_retry_after() {
    let options = StackOptions::with_gateway_args(&["--insecure-dev", "--rate-limit-per-ip", "5"]);
    let stack = Stack::start(options).await;
    for n in 0..5 {
        let (code, headers, body) = send(question(&stack, &format!("Question {n}?"))).await;
        assert_eq!(code, 202, "request {n}: {body}");
        assert_eq!(header(&headers, "x-ratelimit-limit"), "5");
        assert_eq!(
            header(&headers, "x-ratelimit-remaining"),
            (4 - n).to_string()
        );
    }
    let (code, headers, body) = send(question(&stack, "One too many?")).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limited");
    // 5 a minute refill one every 12 s.
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(
        (11..=12).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(header(&headers, "x-ratelimit-remaining"), "0");
    let reset: u64 = header(&headers, "x-ratelimit-reset").parse().unwrap();
    assert!((59..=60).contains(&reset), "reset {reset}");
    assert_eq!(
        stack.queued_messages().await,
        5,
        "the refused question was not queued"
    );

    // The same client behind a proxy that is not trusted: its header is ignored.
    let (code, _, _) =
        send(question(&stack, "Spoofed?").header("x-forwarded-for", "203.0.113.9")).await;
    assert_eq!(
        code, 429,
        "X-Forwarded-For from an untrusted peer must not reset the limit"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket() {
    let options = StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--rate-limit-per-ip",
        "2",
        "--trusted-proxies",
        "127.0.0.1/32,10.0.0.0/8",
    ]);
    let stack = Stack::start(options).await;
    let from = |client: &'static str, n: u32| {
        question(&stack, &format!("From {client}, number {n}?")).header(
            "x-forwarded-for",
            format!("198.51.100.77, {client}, 10.1.2.3"),
        )
    };
    for client in ["203.0.113.1", "203.0.113.2"] {
        for n in 0..2 {
            assert_eq!(send(from(client, n)).await.0, 202, "{client} #{n}");
        }
        assert_eq!(
            send(from(client, 2)).await.0,
            429,
            "{client} over its limit"
        );
    }
}

#[tokio::test]
async fn a_key_with_its_own_limit_is_held_to_it() {
    let dir = TempDir::new("key-limit");
    let stack = Stack::start(keyed_options(&dir, &["--rate-limit-per-ip", "1000"])).await;
    for n in 0..3 {
        let (code, _, body) =
            send(question(&stack, &format!("Slow {n}?")).bearer_auth(SLOW_KEY)).await;
        assert_eq!(code, 202, "{body}");
    }
    let (code, headers, body) = send(question(&stack, "Slow 3?").bearer_auth(SLOW_KEY)).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(header(&headers, "x-ratelimit-limit"), "3");
    let (code, _, _) = send(question(&stack, "Fast?").bearer_auth(KEY)).await;
    assert_eq!(code, 202, "another key is not affected");
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn overload_sheds_new_questions_keeps_serving_cache_hits_and_stays_bounded() {
    // One worker at most, 1 s a question, 5 s goal: five waiting questions fit.
    let options = StackOptions::with_gateway_args(&[
        "--insecure-dev",
        "--rate-limit-per-ip",
        "1000000",
        "--max-workers",
        "1",
        "--service-time-estimate",
        "1s",
        "--latency-goal",
        "5s",
    ]);
    let stack = Stack::start(options).await;
    // Five waiting questions fit; a sixth cannot be served in 5 s.
    let (accepted, headers) = stack.fill_until_shed(5).await;
    assert!(accepted >= 4, "only {accepted} accepted");
    let retry_after: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");

    // A cached answer is still served.
    let hot = ebb_gateway::question::NewQuestion::from_json(
        br#"{"question":"What is a cached question?"}"#,
        ebb_gateway::question::Limits {
            default_max_tokens: 512,
            max_tokens_limit: 4096,
        },
    )
    .unwrap();
    let mut hot = hot;
    hot.language = Some("English".into());
    let key = hot.cache_key("ebb/tiny-qwen2@test").unwrap();
    let store = Store::connect_lazy(&stack.redis.url()).unwrap();
    let answer = CachedAnswer {
        answer: "From the cache.".into(),
        model: "ebb/tiny-qwen2@test".into(),
        finish_reason: Default::default(),
        language: None,
    };
    store
        .put_cached_answer(&key, &answer, Duration::from_secs(600))
        .await
        .unwrap();
    let (code, _, body) = send(
        stack
            .http
            .post(format!("{}/v1/questions", stack.gateway_url))
            .json(&json!({"question": "What is a cached question?", "language": "English"})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["answer"], "From the cache.");

    // A flood of concurrent requests stays within the bound (at most the
    // place an early shed left), and memory does not grow with it.
    let before = rss_kib();
    let mut refused = 0;
    for chunk in 0..20 {
        let requests = (0..100).map(|n| send(question(&stack, &format!("Flood {chunk}-{n}?"))));
        for (code, _, _) in futures::future::join_all(requests).await {
            refused += u64::from(code == 429);
        }
    }
    let queued = stack.queued_messages().await;
    assert!(
        queued <= 5,
        "{queued} waiting questions exceed what 5 s allows"
    );
    assert_eq!(refused, 2000 - (queued - accepted));
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "memory grew {grown_mib} MiB over 2000 refusals"
    );
    let metrics = stack.metrics().await;
    let shed = format!(
        "ebb_gateway_rejected_total{{reason=\"overloaded\"}} {}",
        refused + 1
    );
    assert!(metrics.contains(&shed), "{metrics}");
}

#[tokio::test]
async fn webhook_targets_inside_the_network_are_refused() {
    let options =
        StackOptions::with_gateway_args(&["--insecure-dev", "--webhook-secret", "s3cret"]);
    let stack = Stack::start(options).await;
    for target in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.8/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/hook",
        "http://localhost:9/hook",
        "ftp://example.com/hook",
    ] {
        let (code, body) = stack
            .ask(json!({"question": "Where does this go?", "callback_url": target}))
            .await;
        assert_eq!(code, 422, "{target}: {body}");
        assert_eq!(body["error"]["param"], "callback_url", "{target}");
    }
    assert_eq!(stack.queued_messages().await, 0);
}

#[tokio::test]
async fn webhooks_are_refused_without_a_signing_secret() {
    let stack = Stack::start(StackOptions::default()).await;
    let (code, body) = stack
        .ask(json!({"question": "Call me?", "callback_url": "https://example.com/hook"}))
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--webhook-secret")
    );
}

/// Scaler overrides may go through the gateway's admin route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_scale_is_forwarded_to_the_scaler_with_its_token() {
    use clap::Parser as _;
    let stack = Stack::start(StackOptions::default()).await;
    let policy = "tick: 200ms\nresources: {min_instances: 0, max_instances: 2}\ncooldowns: {scale_down_stabilization: 10m, scale_to_zero_idle: 10m}\n";
    let scaler = ebb_tests::ScalerProcess::start(&stack, policy, &[]);
    let mut args = vec!["ebb-gateway".to_owned()];
    args.extend(stack.shared_args(Role::Gateway));
    args.extend(
        [
            "--insecure-dev",
            "--admin-token",
            ADMIN,
            "--scaler-url",
            &scaler.url,
            "--scaler-token",
            ebb_tests::ADMIN_TOKEN,
        ]
        .map(str::to_owned),
    );
    let config = ebb_gateway::Config::try_parse_from(args).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(ebb_gateway::run(config, listener, async {
        let _ = stopped.await;
    }));
    let scale = |body: &'static str, token: &'static str| {
        stack
            .http
            .post(format!("{gateway}/admin/scale"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
    };
    // The scaler may still be starting: retry while it is unreachable.
    let (send, scale) = (&send, &scale);
    let (code, _, body) = eventually(
        Duration::from_secs(30),
        "the scaler reachable",
        || async move {
            let answer = send(scale(
                r#"{"action":"set","count":1,"ttl_seconds":60}"#,
                ADMIN,
            ))
            .await;
            if answer.0 != 502 {
                Ok(answer)
            } else {
                Err(answer.2)
            }
        },
    )
    .await;
    assert_eq!(code, 200, "{body}");
    scaler
        .wait_status(Duration::from_secs(30), "the override", |status| {
            status["manual_override"].is_object()
        })
        .await;
    // The scaler's own refusals pass through unchanged.
    let (code, _, body) = send(scale(r#"{"action":"set","count":-1}"#, ADMIN)).await;
    assert_eq!(code, 422, "{body}");
    let (code, _, _) = send(scale(r#"{"action":"set","count":1}"#, "sk-not-admin")).await;
    assert_eq!(code, 401);
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}

/// Failed authentications are limited per client (an IPv6 client's /64):
/// past the budget the client gets 429 before its key is even checked, a
/// right key included; another client is not affected (issue 14).
#[tokio::test]
async fn failed_authentications_are_limited_per_client() {
    let dir = TempDir::new("auth-failures");
    let stack = Stack::start(keyed_options(
        &dir,
        &[
            "--auth-failures-per-ip",
            "3",
            "--trusted-proxies",
            "127.0.0.1/32",
        ],
    ))
    .await;
    let from = |client: &str, key: &str| {
        question(&stack, "Guessing?")
            .header("x-forwarded-for", client)
            .bearer_auth(key)
    };
    for n in 0..3 {
        let (code, _, body) = send(from("2001:db8:1:2::1", "sk-wrong")).await;
        assert_eq!(code, 401, "failure {n}: {body}");
    }
    let (code, headers, body) = send(from("2001:db8:1:2::1", "sk-wrong")).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limited");
    assert!(headers.contains_key("retry-after"));
    // Out of budget: refused before the key is looked at, even the right one,
    // and from another address of the same /64.
    let (code, _, _) = send(from("2001:db8:1:2::1", KEY)).await;
    assert_eq!(code, 429);
    let (code, _, _) = send(from("2001:db8:1:2:ffff::7", KEY)).await;
    assert_eq!(code, 429);
    // Another /64 and another IPv4 client are untouched.
    let (code, _, body) = send(from("2001:db8:1:3::1", KEY)).await;
    assert_eq!(code, 202, "{body}");
    let (code, _, body) = send(from("198.51.100.7", "sk-wrong")).await;
    assert_eq!(code, 401, "{body}");
    // The admin routes share the budget.
    let (code, _, _) = send(
        stack
            .http
            .get(format!("{}/admin/queue", stack.gateway_url))
            .header("x-forwarded-for", "2001:db8:1:2::1")
            .bearer_auth(ADMIN),
    )
    .await;
    assert_eq!(code, 429);
}

/// A question is readable (status and events) only by the API key that
/// asked it, or with the admin token; to another key it does not exist
/// (issue 14).
#[tokio::test]
async fn a_question_is_readable_only_by_the_key_that_asked_it() {
    let dir = TempDir::new("ownership");
    let stack = Stack::start(keyed_options(&dir, &[])).await;
    let (code, _, body) = send(question(&stack, "Whose question?").bearer_auth(KEY)).await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap();
    let status = format!("{}/v1/questions/{id}", stack.gateway_url);
    let events = format!("{status}/events");

    let (code, _, mine) = send(stack.http.get(&status).bearer_auth(KEY)).await;
    assert_eq!(code, 200, "{mine}");
    assert!(
        mine.get("owner").is_none(),
        "the owner is not shown: {mine}"
    );
    let (code, _, body) = send(stack.http.get(&status).bearer_auth(SLOW_KEY)).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found");
    let (code, _, _) = send(stack.http.get(&events).bearer_auth(SLOW_KEY)).await;
    assert_eq!(code, 404);
    let (code, _, body) = send(stack.http.get(&status).bearer_auth(ADMIN)).await;
    assert_eq!(code, 200, "the admin token reads any: {body}");
    assert_eq!(body["id"], mine["id"]);
}

/// One key cannot hold every waiting slot: past `--max-waiting-per-key`
/// its streams get 429, while another key's are still served.
#[tokio::test]
async fn one_key_cannot_hold_every_waiting_slot() {
    let dir = TempDir::new("waiting-per-key");
    let stack = Stack::start(keyed_options(&dir, &["--max-waiting-per-key", "2"])).await;
    let follow = |key: &'static str, asked: &Value| {
        let id = asked["id"].as_str().unwrap();
        stack
            .http
            .get(format!("{}/v1/questions/{id}/events", stack.gateway_url))
            .bearer_auth(key)
            .send()
    };
    let ask = |key: &'static str, text: &str| question(&stack, text).bearer_auth(key);
    let mut held = Vec::new();
    for n in 0..2 {
        let (code, _, body) = send(ask(KEY, &format!("Held {n}?"))).await;
        assert_eq!(code, 202, "{body}");
        let stream = follow(KEY, &body).await.unwrap();
        assert_eq!(stream.status().as_u16(), 200);
        held.push(stream);
    }
    let (_, _, body) = send(ask(KEY, "One too many?")).await;
    let refused = follow(KEY, &body).await.unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(
        error["error"]["type"], "too_many_waiting_for_key",
        "{error}"
    );

    let (_, _, body) = send(ask(SLOW_KEY, "Another key's turn?")).await;
    let other = follow(SLOW_KEY, &body).await.unwrap();
    assert_eq!(other.status().as_u16(), 200, "another key is still served");
    // A slot ends with its stream.
    drop(held.pop());
    let (_, _, body) = send(ask(KEY, "Room again?")).await;
    eventually(Duration::from_secs(10), "a slot freed", || async {
        let stream = follow(KEY, &body).await.unwrap();
        match stream.status().as_u16() {
            200 => Ok(()),
            code => Err(code),
        }
    })
    .await;
}

/// One key whose receiver is down cannot fill the webhook queue: past
/// `--max-queued-webhooks-per-key` its callback questions get 429.
#[tokio::test]
async fn one_key_cannot_fill_the_webhook_queue() {
    let dir = TempDir::new("webhooks-per-key");
    let extra = [
        "--webhook-secret",
        "s3cret",
        "--webhook-allow",
        "127.0.0.0/8",
        "--max-queued-webhooks-per-key",
        "2",
    ];
    let stack = Stack::start(keyed_options(&dir, &extra)).await;
    // Answers from the cache queue their call at once; nothing listens on
    // the callback port, so the calls stay queued, retried.
    let text = "What is a webhook?";
    let hot = ebb_gateway::question::NewQuestion::from_json(
        format!(r#"{{"question":"{text}","language":"English"}}"#).as_bytes(),
        ebb_gateway::question::Limits {
            default_max_tokens: 512,
            max_tokens_limit: 4096,
        },
    )
    .unwrap();
    let key = hot.cache_key("ebb/tiny-qwen2@test").unwrap();
    let answer = CachedAnswer {
        answer: "A call back.".into(),
        model: "ebb/tiny-qwen2@test".into(),
        finish_reason: Default::default(),
        language: None,
    };
    Store::connect_lazy(&stack.redis.url())
        .unwrap()
        .put_cached_answer(&key, &answer, Duration::from_secs(600))
        .await
        .unwrap();
    let dead_receiver = format!("http://127.0.0.1:{}/hook", ebb_tests::free_port());
    let ask = |key: &'static str| {
        stack
            .http
            .post(format!("{}/v1/questions", stack.gateway_url))
            .bearer_auth(key)
            .json(&json!({"question": text, "language": "English", "callback_url": dead_receiver}))
    };
    for _ in 0..2 {
        let (code, _, body) = send(ask(KEY)).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["answer"], "A call back.");
    }
    let (code, _, body) = send(ask(KEY)).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["type"], "too_many_webhooks_for_key", "{body}");
    let (code, _, body) = send(ask(SLOW_KEY)).await;
    assert_eq!(code, 200, "another key's calls are its own: {body}");
    let (code, _, body) = send(question(&stack, "No callback, no limit?").bearer_auth(KEY)).await;
    assert_eq!(code, 202, "{body}");
}

//! Two gateways on one NATS and one Redis count rate limits and shedding
//! places together: the configured limit holds for the deployment, not per
//! process. While Redis is away each falls back to its own count, never to
//! no limit.

use std::time::Duration;

use ebb_nats::access::Role;
use ebb_tests::stack::{Gateway, shared_args};
use ebb_tests::{NatsServer, RedisServer, StackOptions};
use serde_json::{Value, json};

async fn two_gateways(nats: &NatsServer, redis: &RedisServer, flags: &[&str]) -> [Gateway; 2] {
    let args = || {
        let mut args = shared_args(nats, redis, Role::Gateway, &StackOptions::default());
        args.push("--insecure-dev".to_owned());
        args.extend(flags.iter().map(|flag| flag.to_string()));
        args
    };
    [Gateway::start(args()).await, Gateway::start(args()).await]
}

/// Asks `count` questions in turn through each gateway; the status codes
/// per gateway and the error bodies of the refusals.
async fn ask_alternately(gateways: &[Gateway; 2], count: usize) -> ([Vec<u16>; 2], Vec<Value>) {
    let http = reqwest::Client::new();
    let mut codes = [Vec::new(), Vec::new()];
    let mut refusals = Vec::new();
    for n in 0..count {
        let response = http
            .post(format!("{}/v1/questions", gateways[n % 2].url))
            .json(&json!({"question": format!("Limit {n}?"), "wait_seconds": 0}))
            .send()
            .await
            .expect("gateway reachable");
        let code = response.status().as_u16();
        if code == 429 {
            refusals.push(response.json().await.expect("an error body"));
        }
        codes[n % 2].push(code);
    }
    (codes, refusals)
}

fn passed(codes: &[u16]) -> usize {
    codes.iter().filter(|&&code| code != 429).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_together_allow_the_per_ip_limit_once() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let gateways = two_gateways(&nats, &redis, &["--rate-limit-per-ip", "100"]).await;
    let (codes, refusals) = ask_alternately(&gateways, 200).await;
    let total = passed(&codes[0]) + passed(&codes[1]);
    // 100 at once, plus what refills while the 200 are asked (100 a minute).
    assert!(
        (100..=115).contains(&total),
        "{total} of 200 passed through two gateways with a limit of 100 a minute"
    );
    assert!(
        passed(&codes[0]) > 30 && passed(&codes[1]) > 30,
        "both served"
    );
    for refusal in &refusals {
        assert_eq!(refusal["error"]["type"], "rate_limited", "{refusal}");
    }
}

/// Scripts Redis ran so far (`EVAL` and `EVALSHA`): each rate-limit take
/// is one.
async fn scripts_run(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_eval:") || line.starts_with("cmdstat_evalsha:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn high_limits_are_taken_in_batches_and_still_hold_across_gateways() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    // 1,200 a minute: 20 tokens (a second's worth) a round trip.
    let gateways = two_gateways(&nats, &redis, &["--rate-limit-per-ip", "1200"]).await;
    // One hot question: after one Redis read each gateway answers it from
    // memory, so the scripts Redis runs are the rate-limit takes.
    let store = ebb_store::Store::connect_lazy(&redis.url()).unwrap();
    let body = json!({"question": "What is a hot question?", "max_tokens": 16, "wait_seconds": 0});
    ebb_tests::stack::prime_cache(&store, &body, "One the whole class asks.").await;
    let http = reqwest::Client::new();
    let before = scripts_run(&redis).await;
    let started = std::time::Instant::now();
    let mut codes = [Vec::new(), Vec::new()];
    for n in 0..1_400 {
        let response = http
            .post(format!("{}/v1/questions", gateways[n % 2].url))
            .json(&body)
            .send()
            .await
            .unwrap();
        codes[n % 2].push(response.status().as_u16());
    }
    let seconds = started.elapsed().as_secs_f64();
    let scripts = scripts_run(&redis).await - before;
    let total = passed(&codes[0]) + passed(&codes[1]);
    // At most the bucket and its refill (20 a second) over the run; at
    // least that less two unspent allowances.
    let most = 1_200 + (seconds * 20.0).ceil() as usize;
    assert!(
        (1_200 - 40..=most).contains(&total),
        "{total} of 1,400 passed in {seconds:.1} s with a limit of 1,200 a minute"
    );
    assert!(
        scripts < 1_400 / 10,
        "{scripts} Redis scripts for 1,400 requests: taken (or refused) one by one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_each_gateway_keeps_its_own_limit() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let gateways = two_gateways(&nats, &redis, &["--rate-limit-per-ip", "10"]).await;
    redis.stop();
    let (codes, _) = ask_alternately(&gateways, 60).await;
    // Each counts alone: 10 each (plus a refill of at most one in the run),
    // never the 30 each was asked.
    for codes in &codes {
        let passed = passed(codes);
        assert!(
            (10..=12).contains(&passed),
            "{passed} of 30 passed: {codes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_through_two_gateways_is_shed_at_one_estimate() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    // One worker at 1 s a question and a 5 s goal: 5 questions may wait.
    let flags = [
        "--rate-limit-per-ip",
        "1000000",
        "--max-workers",
        "1",
        "--service-time-estimate",
        "1s",
        "--latency-goal",
        "5s",
    ];
    let gateways = two_gateways(&nats, &redis, &flags).await;
    let http = reqwest::Client::new();
    // All at once: faster than either gateway's next depth reading.
    let asked = (0..20).map(|n| {
        let request = http
            .post(format!("{}/v1/questions", gateways[n % 2].url))
            .json(&json!({"question": format!("Burst {n}?"), "wait_seconds": 0}))
            .timeout(Duration::from_secs(20));
        async move {
            request
                .send()
                .await
                .expect("gateway reachable")
                .status()
                .as_u16()
        }
    });
    let codes = futures::future::join_all(asked).await;
    let accepted = codes.iter().filter(|&&code| code == 202).count();
    assert!(
        (1..=5).contains(&accepted),
        "{accepted} accepted where 5 fit the goal (each gateway alone would take 5): {codes:?}"
    );
    assert!(
        codes.iter().all(|&code| code == 202 || code == 429),
        "{codes:?}"
    );
}

/// Each shedding place's score in Redis (ms: by Redis's clock once kept,
/// a minute ahead while its question is being queued), and Redis's time.
async fn places(redis: &RedisServer) -> (Vec<(String, f64)>, f64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let places: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(ebb_store::limits::PLACES_KEY)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut connection)
        .await
        .unwrap();
    let (seconds, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut connection)
        .await
        .unwrap();
    (places, (seconds * 1000 + micros / 1000) as f64)
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_questions_places_are_kept_in_redis_and_refused_ones_given_back() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    // 1 s a question, 3 s goal: 3 fit, the rest of a burst is refused.
    let flags = [
        "--max-workers",
        "1",
        "--service-time-estimate",
        "1s",
        "--latency-goal",
        "3s",
    ];
    let [gateway, _other] = two_gateways(&nats, &redis, &flags).await;
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for n in 0..6 {
        let response = http
            .post(format!("{}/v1/questions", gateway.url))
            .json(&json!({"question": format!("Kept {n}?"), "wait_seconds": 0}))
            .send()
            .await
            .expect("gateway reachable");
        codes.push(response.status().as_u16());
    }
    let accepted = codes.iter().filter(|&&code| code == 202).count();
    assert!(accepted >= 1 && codes.contains(&429), "{codes:?}");
    // Kept within a flush (10 ms), well before the places expire (2 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (places, now) = places(&redis).await;
    assert_eq!(
        places.len(),
        accepted,
        "one place per accepted question, none for a refused one: {places:?} ({codes:?})"
    );
    assert!(
        places.iter().all(|(_, score)| *score <= now),
        "every accepted question's place is kept (scored by when it was queued, not a minute ahead): {places:?} at {now}"
    );
}

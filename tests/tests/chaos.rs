//! The CI-sized chaos run (issue 14): a few hundred questions of every kind
//! through every kind of fault, every one ending as promised. The long
//! version is `scripts/chaos --questions 10000` (README, Reliability).

use std::time::Duration;

use ebb_tests::chaos::{Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chaos_run_loses_nothing() {
    let options = Options {
        concurrency: 8,
        rate_per_second: 8.0,
        fault_every: Duration::from_secs(3),
        settle: Duration::from_secs(180),
        ..Options::new(400, 7)
    };
    let summary = run(options).await;
    println!("{}", serde_json::to_string(&summary).unwrap());
    assert!(summary.passed(), "{summary:#?}");
    assert!(summary.accepted >= 300, "{summary:#?}");
    assert!(
        summary.failed > 0,
        "poison questions failed as they must: {summary:#?}"
    );
    assert!(
        summary.faults.len() >= 7
            && summary
                .faults
                .contains_key("nats_outage_past_heartbeat_timeout"),
        "every kind of fault: {:?}",
        summary.faults
    );
}

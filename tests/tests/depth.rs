//! The queue-depth query the scaler will read, on a real queue.

use std::time::Duration;

use ebb_nats::{Priority, Topology};
use ebb_tests::{Stack, StackOptions};
use serde_json::json;

#[tokio::test]
async fn depth_counts_waiting_and_in_flight_questions_and_the_oldest_age() {
    let stack = Stack::start(StackOptions::default()).await;
    // Opened, not ensured: the gateway owns the topology.
    let topology = Topology::open(stack.nats_client().await, &stack.queue_config())
        .await
        .unwrap();
    let empty = ebb_nats::queue_depth(&topology.questions).await.unwrap();
    assert_eq!((empty.lag(), empty.oldest_waiting()), (0, Duration::ZERO));

    for n in 0..3 {
        let (code, _) = stack
            .ask(json!({"question": format!("depth {n}"), "wait_seconds": 0}))
            .await;
        assert_eq!(code, 202);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let depth = ebb_nats::queue_depth(&topology.questions).await.unwrap();
    assert_eq!(depth.lag(), 3);
    let normal = depth
        .priorities
        .iter()
        .find(|d| d.priority == Priority::Normal)
        .unwrap();
    assert_eq!((normal.pending, normal.ack_pending), (3, 0));
    assert!(
        depth.oldest_waiting() >= Duration::from_millis(300),
        "{depth:?}"
    );
    assert!(
        depth.oldest_waiting() < Duration::from_secs(30),
        "{depth:?}"
    );

    // Take one without acknowledging it: it moves from pending to ack-pending.
    let consumer = topology.consumer(Priority::Normal).await.unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    use futures::StreamExt;
    let _held = batch.next().await.unwrap().unwrap();
    let depth = ebb_nats::queue_depth(&topology.questions).await.unwrap();
    let normal = depth
        .priorities
        .iter()
        .find(|d| d.priority == Priority::Normal)
        .unwrap();
    assert_eq!((normal.pending, normal.ack_pending, depth.lag()), (2, 1, 3));
}

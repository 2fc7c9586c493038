//! The worker's job span is a child of the gateway's request span: the trace
//! crosses the queue in the message's `traceparent` header.

use std::time::Duration;

use clap::Parser as _;
use ebb_nats::access::Role;
use ebb_tests::{Stack, StackOptions, tiny_model_dir};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_id_crosses_the_queue() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ebb-test")));
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber in this binary");

    let stack = Stack::start(StackOptions::default()).await;
    let mut args = vec!["ebb-worker".to_owned()];
    args.extend(stack.shared_args(Role::Worker));
    args.extend([
        "--model-dir".to_owned(),
        tiny_model_dir().display().to_string(),
    ]);
    let cli = ebb_worker::config::Cli::try_parse_from(args).expect("worker flags parse");
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(ebb_worker::run(cli.config, shutdown.clone()));

    let (code, body) = stack
        .ask(json!({"question": "How do plants breathe?", "max_tokens": 8, "wait_seconds": 60}))
        .await;
    assert_eq!(code, 200, "{body}");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("worker drains")
        .expect("worker task")
        .expect("worker ran cleanly");
    provider.force_flush().expect("flush spans");

    let spans = exporter.get_finished_spans().expect("spans");
    let question = spans
        .iter()
        .find(|span| span.name == "question")
        .expect("the gateway's request span");
    let job = spans
        .iter()
        .find(|span| span.name == "job")
        .expect("the worker's job span");
    assert_eq!(
        job.span_context.trace_id(),
        question.span_context.trace_id()
    );
    assert_eq!(job.parent_span_id, question.span_context.span_id());
}

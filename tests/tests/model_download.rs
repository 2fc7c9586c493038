//! Model downloads against a local Hub ([`HubServer`], a real socket, the
//! real hf-hub client): progress in the worker's heartbeat, resumption of an
//! interrupted file, one download per cache however many workers share it,
//! and errors that name the host and the file.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_nats::access::Role;
use ebb_nats::{DownloadProgress, Heartbeat, WorkerState, subjects};
use ebb_tests::hub::HubServer;
use ebb_tests::{Stack, StackOptions, TempDir, free_port, worker_binary};
use ebb_worker::model::{HubOptions, ModelError, ModelRequest, files};
use ebb_worker::tiny::{self, Shape};
use futures::StreamExt;

const REPO: &str = "ebb/tiny-qwen2";
const WEIGHTS: &str = "model.safetensors";

/// The tiny architecture, wide enough that its weights (~25 MB in f32) span
/// several of hf-hub's 10 MB download chunks.
const WIDE: Shape = Shape {
    hidden_size: 256,
    intermediate_size: 768,
    num_hidden_layers: 8,
    ..Shape::TINY
};

/// The model's files, as the Hub would serve them.
fn model_files(dir: &TempDir) -> Vec<(String, Vec<u8>)> {
    tiny::write_random_model(dir.path(), WIDE, 7, candle_core::DType::F32).expect("write model");
    ["config.json", "tokenizer.json", WEIGHTS]
        .into_iter()
        .map(|name| {
            let bytes = std::fs::read(dir.path().join(name)).unwrap();
            (name.to_owned(), bytes)
        })
        .collect()
}

fn hub_request() -> ModelRequest<'static> {
    ModelRequest {
        repo: REPO,
        revision: "main",
        dir: None,
        gguf_file: None,
        tokenizer_repo: None,
    }
}

fn online(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        offline: false,
        cache: hf_hub::Cache::new(cache.to_path_buf()),
        endpoint: Some(endpoint.to_owned()),
        timeout: Duration::from_secs(60),
        progress: false,
    }
}

fn size_of(files: &[(String, Vec<u8>)], name: &str) -> u64 {
    files.iter().find(|(n, _)| n == name).unwrap().1.len() as u64
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_a_range_request_and_matches_byte_for_byte() {
    let model = TempDir::new("hub-model");
    let served = model_files(&model);
    let size = size_of(&served, WEIGHTS);
    assert!(size > 20_000_000, "{size} bytes: too small to cut mid-file");
    let hub = HubServer::start(REPO, "main", served.clone()).await;
    let cache = TempDir::new("hf-resume");
    let options = online(cache.path(), &hub.endpoint);

    // In the last of hf-hub's 10 MB chunks: when a chunk fails, hf-hub
    // returns the error but leaves the later chunks' tasks running, which
    // would blur what the restart asked for.
    hub.cut_once_at(WEIGHTS, size * 9 / 10);
    let err = files::resolve(&hub_request(), &options)
        .await
        .expect_err("the connection was cut");
    assert!(
        matches!(err, ModelError::Download { ref file, .. } if file == WEIGHTS),
        "{err}"
    );
    assert!(err.to_string().contains(&hub.endpoint), "{err}");
    let cut_at = hub.requests_of(WEIGHTS).len();

    let resolved = files::resolve(&hub_request(), &options)
        .await
        .expect("resumed");
    let ebb_worker::model::WeightFiles::Safetensors(shards) = &resolved.weights else {
        panic!("safetensors expected: {resolved:?}");
    };
    assert_eq!(std::fs::read(&shards[0]).unwrap(), served[2].1);

    // After the restart: the metadata probe (bytes 0-0), then ranges that
    // start where the committed part ended, never at 0 again.
    let resumed: Vec<_> = hub.requests_of(WEIGHTS)[cut_at..]
        .iter()
        .filter(|request| request.range != Some((0, Some(0))))
        .cloned()
        .collect();
    let first = resumed.first().expect("a resumed request").range.unwrap().0;
    assert!(first > 0, "started over: {resumed:?}");
    let sent: u64 = resumed.iter().map(|request| request.bytes_sent).sum();
    assert_eq!(sent, size - first, "{resumed:?}");
}

#[tokio::test]
async fn workers_sharing_a_cache_download_each_file_once_even_at_the_same_time() {
    let model = TempDir::new("hub-model");
    let served = model_files(&model);
    let size = size_of(&served, WEIGHTS);
    let hub = HubServer::start(REPO, "main", served.clone()).await;
    // Slow enough that the two overlap.
    hub.throttle(Some(20_000_000));
    let cache = TempDir::new("hf-shared");
    let options = online(cache.path(), &hub.endpoint);

    let request = hub_request();
    let (a, b) = tokio::join!(
        files::resolve(&request, &options),
        files::resolve(&request, &options),
    );
    assert_eq!(a.unwrap(), b.unwrap());
    let weights_sent: u64 = hub
        .requests_of(WEIGHTS)
        .iter()
        .map(|request| request.bytes_sent)
        .sum();
    // The file once, plus the one byte of the metadata probe.
    assert_eq!(weights_sent, size + 1, "{:?}", hub.requests_of(WEIGHTS));

    let before = hub.requests().len();
    files::resolve(&hub_request(), &options).await.unwrap();
    assert_eq!(hub.requests().len(), before, "{:?}", hub.requests());
}

#[tokio::test]
async fn progress_covers_every_file_and_grows_while_the_hub_is_slow() {
    let model = TempDir::new("hub-model");
    let served = model_files(&model);
    let total: u64 = served.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    let hub = HubServer::start(REPO, "main", served).await;
    hub.throttle(Some(10_000_000));
    let cache = TempDir::new("hf-progress");
    let seen = Arc::new(Mutex::new(Vec::<DownloadProgress>::new()));
    let sink = seen.clone();
    files::resolve_reporting(
        &hub_request(),
        &online(cache.path(), &hub.endpoint),
        Some(Arc::new(move |progress: &DownloadProgress| {
            sink.lock().unwrap().push(progress.clone())
        })),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.iter().all(|p| p.bytes_total == Some(total)),
        "{seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap().bytes_done, total);
    let weights: Vec<_> = seen
        .iter()
        .filter(|p| p.file == WEIGHTS && p.bytes_done < total)
        .collect();
    assert!(weights.len() >= 2, "{seen:?}");
    let middle = weights[weights.len() / 2];
    // Throttled to 10 MB/s: the measured rate is in that neighbourhood.
    assert!(
        (2e6..=20e6).contains(&middle.bytes_per_second),
        "{middle:?}"
    );
    assert!(middle.eta_seconds().is_some(), "{middle:?}");
}

#[tokio::test]
async fn an_unreachable_hub_is_named_in_the_error() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let cache = TempDir::new("hf-unreachable");
    let err = files::resolve(&hub_request(), &online(cache.path(), &endpoint))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&endpoint), "{text}");
    assert!(text.contains(REPO), "{text}");
    assert!(text.to_lowercase().contains("refused"), "{text}");
}

/// An `ebb-worker` downloading its model from `hub` into `hf_home`; killed
/// on drop.
struct DownloadingWorker {
    id: String,
    child: Child,
}

impl DownloadingWorker {
    fn start(stack: &Stack, hub: &HubServer, hf_home: &Path, id: &str) -> DownloadingWorker {
        let child = Command::new(worker_binary())
            .args(stack.shared_args(Role::Worker))
            .args(["--worker-id", id])
            .env("HF_HOME", hf_home)
            .env("HF_ENDPOINT", &hub.endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("EBB_MODEL_DIR")
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ebb-worker");
        DownloadingWorker {
            id: id.to_owned(),
            child,
        }
    }
}

impl Drop for DownloadingWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `id`'s heartbeats until it is ready.
async fn beats_until_ready(beats: &mut async_nats::Subscriber, id: &str) -> Vec<Heartbeat> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout_at(deadline, beats.next())
            .await
            .unwrap_or_else(|_| panic!("{id} not ready within 90 s: {seen:?}"))
            .expect("subscription open");
        let beat: Heartbeat = serde_json::from_slice(&message.payload).unwrap();
        if beat.worker_id != id {
            continue;
        }
        assert_ne!(beat.state, WorkerState::Failed, "{beat:?}");
        let ready = beat.state == WorkerState::Ready;
        seen.push(beat);
        if ready {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_worker_shows_its_download_in_heartbeats_and_the_next_one_reuses_the_cache() {
    let stack = Stack::start(StackOptions::default()).await;
    let model = TempDir::new("hub-model");
    let served = model_files(&model);
    let total: u64 = served.iter().map(|(_, bytes)| bytes.len() as u64).sum();
    let args = stack.shared_args(Role::Worker);
    let revision = args[args
        .iter()
        .position(|arg| arg == "--model-revision")
        .unwrap()
        + 1]
    .clone();
    let hub = HubServer::start(REPO, &revision, served).await;
    hub.throttle(Some(5_000_000));
    let hf_home = TempDir::new("hf-home");
    let client = stack.nats_client().await;
    let mut beats = client.subscribe(subjects::HEARTBEAT).await.unwrap();

    let first = DownloadingWorker::start(&stack, &hub, hf_home.path(), "downloader-1");
    let seen = beats_until_ready(&mut beats, &first.id).await;
    let downloads: Vec<&DownloadProgress> = seen
        .iter()
        .filter_map(|beat| beat.download.as_ref())
        .collect();
    assert!(downloads.len() >= 2, "{seen:?}");
    assert!(
        downloads.iter().all(|p| p.bytes_total == Some(total)),
        "{downloads:?}"
    );
    assert!(
        downloads
            .windows(2)
            .any(|w| w[0].bytes_done < w[1].bytes_done),
        "no growth: {downloads:?}"
    );
    assert!(
        downloads.iter().any(|p| p.bytes_per_second > 0.0),
        "{downloads:?}"
    );
    assert_eq!(seen.last().unwrap().download, None, "cleared when ready");
    let file_requests = hub.requests().len();
    assert!(file_requests >= 3);

    // A second worker on the same HF_HOME: ready without a file request.
    let second = DownloadingWorker::start(&stack, &hub, hf_home.path(), "downloader-2");
    let seen = beats_until_ready(&mut beats, &second.id).await;
    assert!(seen.iter().all(|beat| beat.download.is_none()), "{seen:?}");
    assert_eq!(hub.requests().len(), file_requests, "{:?}", hub.requests());
}

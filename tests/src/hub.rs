//! [`HubServer`]: a stand-in for the Hugging Face Hub on a loopback port.
//! It serves one repo's files in the Hub's URL layout with the headers the
//! hf-hub client needs (`x-repo-commit`, `etag`, `content-range`, `Range`
//! requests), can throttle and cut connections, and records every file
//! request, so tests see progress, resumption and cache hits from outside.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One GET of `/{repo}/resolve/{revision}/{file}`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRequest {
    pub file: String,
    /// The requested range, `(first, last)` inclusive, as the client sent it.
    pub range: Option<(u64, Option<u64>)>,
    /// Body bytes the server wrote before the response ended or was cut.
    pub bytes_sent: u64,
}

struct Served {
    name: String,
    bytes: Vec<u8>,
    etag: String,
}

struct Shared {
    repo: String,
    revision: String,
    commit: String,
    files: Vec<Served>,
    requests: Mutex<Vec<FileRequest>>,
    /// Bytes a second per response; `None`: as fast as the socket goes.
    throttle: Mutex<Option<u64>>,
    /// Once: drop the connection when a response of this file reaches this
    /// offset.
    cut: Mutex<Option<(String, u64)>>,
}

/// Served on a loopback port until dropped.
#[derive(Debug)]
pub struct HubServer {
    /// `http://127.0.0.1:PORT`, for `HF_ENDPOINT`.
    pub endpoint: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("repo", &self.repo).finish()
    }
}

impl HubServer {
    /// Serves `files` as `repo` at `revision`.
    pub async fn start(repo: &str, revision: &str, files: Vec<(String, Vec<u8>)>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            commit: format!("{:x}", Sha256::digest(repo.as_bytes()))[..40].to_owned(),
            files: files
                .into_iter()
                .map(|(name, bytes)| Served {
                    etag: format!("{:x}", Sha256::digest(&bytes)),
                    name,
                    bytes,
                })
                .collect(),
            requests: Mutex::new(Vec::new()),
            throttle: Mutex::new(None),
            cut: Mutex::new(None),
        });
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, serving.clone()));
            }
        });
        HubServer {
            endpoint,
            shared,
            task,
        }
    }

    /// Limits every response to about this many bytes a second.
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        *self.shared.throttle.lock().unwrap() = bytes_per_second;
    }

    /// Cuts the next response of `file` that reaches `offset`, once.
    pub fn cut_once_at(&self, file: &str, offset: u64) {
        *self.shared.cut.lock().unwrap() = Some((file.to_owned(), offset));
    }

    /// Every file request so far, in order of arrival.
    pub fn requests(&self) -> Vec<FileRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The requests of `file` so far.
    pub fn requests_of(&self, file: &str) -> Vec<FileRequest> {
        let mut requests = self.requests();
        requests.retain(|request| request.file == file);
        requests
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request, then the connection closes (hf-hub reconnects).
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).await.is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {}
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = parse_range(value.trim());
        }
    }
    let mut stream = reader.into_inner();
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target);
    let listing = format!("/api/models/{}/revision/{}", shared.repo, shared.revision);
    let prefix = format!("/{}/resolve/{}/", shared.repo, shared.revision);
    if path == listing {
        let siblings: Vec<_> = shared
            .files
            .iter()
            .map(|file| serde_json::json!({"rfilename": file.name, "size": file.bytes.len()}))
            .collect();
        let body =
            serde_json::json!({"id": shared.repo, "sha": shared.commit, "siblings": siblings})
                .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
    } else if let Some(name) = path.strip_prefix(&prefix)
        && let Some(file) = shared.files.iter().find(|file| file.name == name)
    {
        send_file(&mut stream, &shared, file, range).await;
    } else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
    }
    let _ = stream.shutdown().await;
}

/// `bytes=A-B` or `bytes=A-`.
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let (first, last) = value.strip_prefix("bytes=")?.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()))
}

async fn send_file(
    stream: &mut TcpStream,
    shared: &Shared,
    file: &Served,
    range: Option<(u64, Option<u64>)>,
) {
    let size = file.bytes.len() as u64;
    // hf-hub asks for one byte past the end of the last chunk; a real server
    // clamps the range, as here.
    let (first, last) = match range {
        Some((first, last)) => (first, last.unwrap_or(size - 1).min(size - 1)),
        None => (0, size - 1),
    };
    let status = if range.is_some() {
        format!("206 Partial Content\r\ncontent-range: bytes {first}-{last}/{size}")
    } else {
        "200 OK".to_owned()
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nx-repo-commit: {}\r\netag: \"{}\"\r\nx-linked-etag: \"{}\"\r\naccept-ranges: bytes\r\nconnection: close\r\n\r\n",
        last + 1 - first,
        shared.commit,
        file.etag,
        file.etag,
    );
    let index = {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(FileRequest {
            file: file.name.clone(),
            range,
            bytes_sent: 0,
        });
        requests.len() - 1
    };
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let throttle = *shared.throttle.lock().unwrap();
    let mut at = first;
    while at <= last {
        let mut end = (at + 64 * 1024).min(last + 1);
        let cut = {
            let mut cut = shared.cut.lock().unwrap();
            match cut.as_ref() {
                Some((name, offset)) if *name == file.name && (at..end).contains(offset) => {
                    end = *offset;
                    cut.take();
                    true
                }
                _ => false,
            }
        };
        if stream
            .write_all(&file.bytes[at as usize..end as usize])
            .await
            .is_err()
        {
            return;
        }
        shared.requests.lock().unwrap()[index].bytes_sent += end - at;
        if cut {
            // Dropping the socket mid-body: the client sees a short response.
            return;
        }
        if let Some(rate) = throttle {
            tokio::time::sleep(Duration::from_secs_f64((end - at) as f64 / rate as f64)).await;
        }
        at = end;
    }
}

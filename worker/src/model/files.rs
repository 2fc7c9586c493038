//! Finding a model's files: in a local directory, in the Hugging Face cache
//! (offline), or on the Hub (downloaded into that cache).
//!
//! The Hub client honours `HF_HOME` and `HF_ENDPOINT`; `HF_HUB_OFFLINE=1`
//! reads the cache only and names the first missing file. hf-hub's HTTP
//! client has no timeout of its own, so every request here is bounded.
//! Downloads report progress, resume and take turns as [`super::download`]
//! describes.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::ModelError;
use super::download::{FileLock, ReportFn, Tracker};
use ebb_runtime::error_chain::describe;

/// Where the weights are and in which format.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    /// One file, or the shards listed by `model.safetensors.index.json`.
    Safetensors(Vec<PathBuf>),
    /// A single quantized GGUF file (its config is in its metadata).
    Gguf(PathBuf),
}

/// Everything needed to load a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// `config.json`; absent for GGUF, whose metadata holds the config.
    pub config: Option<PathBuf>,
    pub tokenizer: PathBuf,
    pub weights: WeightFiles,
}

/// How to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Cache only: never touch the network.
    pub offline: bool,
    pub cache: Cache,
    /// `HF_ENDPOINT`, when set.
    pub endpoint: Option<String>,
    /// Bound on each request (listing or one file download), and on
    /// waiting for another process downloading the same file.
    pub timeout: Duration,
    /// Someone watches a terminal: log download progress every second
    /// rather than every 5 s (or 10 %).
    pub progress: bool,
}

impl HubOptions {
    /// Reads `HF_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`.
    pub fn from_env(timeout: Duration) -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|value| matches!(value.trim(), "1" | "true" | "TRUE" | "yes" | "YES"));
        HubOptions {
            offline,
            cache: Cache::from_env(),
            endpoint: std::env::var("HF_ENDPOINT").ok(),
            timeout,
            progress: std::io::stderr().is_terminal(),
        }
    }

    fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("https://huggingface.co")
    }
}

/// What to load, independent of where it comes from.
#[derive(Debug, Clone)]
pub struct ModelRequest<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
    pub dir: Option<&'a Path>,
    pub gguf_file: Option<&'a str>,
    /// Repo with `tokenizer.json` for a GGUF model on the Hub.
    pub tokenizer_repo: Option<&'a str>,
}

/// Locates (and, online, downloads) the model's files.
pub async fn resolve(
    request: &ModelRequest<'_>,
    hub: &HubOptions,
) -> Result<ModelFiles, ModelError> {
    resolve_reporting(request, hub, None).await
}

/// [`resolve`], handing download progress (all files to fetch together) to
/// `report` about once a second while a download runs.
pub async fn resolve_reporting(
    request: &ModelRequest<'_>,
    hub: &HubOptions,
    report: Option<ReportFn>,
) -> Result<ModelFiles, ModelError> {
    let log_every = if hub.progress {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let tracker = Tracker::new(report, log_every);
    let source = match request.dir {
        Some(dir) => Source::Dir(dir.to_path_buf()),
        None => Source::hub(request.repo, request.revision, hub, &tracker).await?,
    };
    if let Some(gguf) = request.gguf_file {
        return resolve_gguf(request, hub, &tracker, &source, gguf).await;
    }
    // A directory without config.json holds a GGUF model (its config is in
    // the file's metadata).
    if let Source::Dir(dir) = &source
        && !dir.join("config.json").is_file()
        && let Some(gguf) = single_gguf_in(dir)?
    {
        return Ok(ModelFiles {
            config: None,
            tokenizer: source.require("tokenizer.json").await?,
            weights: WeightFiles::Gguf(gguf),
        });
    }
    // The (small) shard index first, so the total covers every shard before
    // the big files start.
    const INDEX: &str = "model.safetensors.index.json";
    let shards = match source.find(INDEX).await? {
        Some(index) => shard_names(&index)?,
        None => vec!["model.safetensors".to_owned()],
    };
    let mut wanted = vec!["config.json".to_owned(), "tokenizer.json".to_owned()];
    wanted.extend(shards.iter().cloned());
    source.announce(&wanted);
    let config = source.require("config.json").await?;
    let tokenizer = source.require("tokenizer.json").await?;
    let mut weights = Vec::with_capacity(shards.len());
    for shard in &shards {
        weights.push(source.require(shard).await?);
    }
    Ok(ModelFiles {
        config: Some(config),
        tokenizer,
        weights: WeightFiles::Safetensors(weights),
    })
}

async fn resolve_gguf(
    request: &ModelRequest<'_>,
    hub: &HubOptions,
    tracker: &Arc<Tracker>,
    source: &Source,
    gguf: &str,
) -> Result<ModelFiles, ModelError> {
    let tokenizer_source = match request.dir {
        Some(_) => None,
        None => {
            let repo = request
                .tokenizer_repo
                .map(str::to_owned)
                .unwrap_or_else(|| base_repo_of_gguf(request.repo));
            Some(Source::hub(&repo, "main", hub, tracker).await?)
        }
    };
    let tokenizer_source = tokenizer_source.as_ref().unwrap_or(source);
    source.announce(&[gguf.to_owned()]);
    tokenizer_source.announce(&["tokenizer.json".to_owned()]);
    let weights = source.require(gguf).await?;
    let tokenizer = tokenizer_source.require("tokenizer.json").await?;
    Ok(ModelFiles {
        config: None,
        tokenizer,
        weights: WeightFiles::Gguf(weights),
    })
}

/// `Qwen/Qwen2.5-7B-Instruct-GGUF` -> `Qwen/Qwen2.5-7B-Instruct`.
fn base_repo_of_gguf(repo: &str) -> String {
    repo.strip_suffix("-GGUF")
        .or_else(|| repo.strip_suffix("-gguf"))
        .unwrap_or(repo)
        .to_owned()
}

fn single_gguf_in(dir: &Path) -> Result<Option<PathBuf>, ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "gguf"))
        .collect();
    match ggufs.len() {
        0 => Ok(None),
        1 => Ok(ggufs.into_iter().next()),
        _ => Err(ModelError::Invalid {
            path: dir.to_path_buf(),
            message: "several .gguf files; choose one with --gguf-file".into(),
        }),
    }
}

/// The shard files named in `model.safetensors.index.json`, sorted.
fn shard_names(index: &Path) -> Result<Vec<String>, ModelError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let index_file: Index = serde_json::from_str(&text).map_err(|err| ModelError::Invalid {
        path: index.to_path_buf(),
        message: err.to_string(),
    })?;
    let mut shards: Vec<String> = index_file.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

enum Source {
    Dir(PathBuf),
    Cache {
        repo: hf_hub::CacheRepo,
        name: String,
        cache_dir: PathBuf,
    },
    Hub(Box<HubSource>),
}

/// A repo revision on the Hub, with its file list and the cache it fills.
struct HubSource {
    api: ApiRepo,
    cached: hf_hub::CacheRepo,
    cache_dir: PathBuf,
    folder: String,
    name: String,
    /// Files the Hub lists, with their sizes when it gave them.
    files: HashMap<String, Option<u64>>,
    endpoint: String,
    timeout: Duration,
    tracker: Arc<Tracker>,
}

/// The Hub's file list (`?blobs=true` adds each file's size).
#[derive(serde::Deserialize)]
struct Listing {
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

impl Source {
    async fn hub(
        repo_id: &str,
        revision: &str,
        hub: &HubOptions,
        tracker: &Arc<Tracker>,
    ) -> Result<Source, ModelError> {
        let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
        let name = format!("{repo_id}@{revision}");
        if hub.offline {
            return Ok(Source::Cache {
                repo: hub.cache.repo(repo),
                name,
                cache_dir: hub.cache.path().clone(),
            });
        }
        let endpoint = hub.endpoint().to_owned();
        let failed = |file: &str, message: String| ModelError::Download {
            file: file.to_owned(),
            endpoint: endpoint.clone(),
            message,
        };
        // hf-hub's own progress bar stays off: the tracker logs progress.
        let mut builder = ApiBuilder::from_cache(hub.cache.clone()).with_progress(false);
        if let Some(endpoint) = &hub.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let api = builder
            .build()
            .map_err(|err| failed(&name, describe(&err)))?;
        let listing_of = format!("file list of {name}");
        let api = api.repo(repo.clone());
        let listing = async {
            let response = api
                .info_request()
                .query(&[("blobs", "true")])
                .send()
                .await?
                .error_for_status()?;
            response.json::<Listing>().await
        };
        let listing = tokio::time::timeout(hub.timeout, listing)
            .await
            .map_err(|_| ModelError::DownloadTimeout {
                file: listing_of.clone(),
                endpoint: endpoint.clone(),
                timeout: hub.timeout,
            })?
            .map_err(|err| failed(&listing_of, describe(&err)))?;
        Ok(Source::Hub(Box::new(HubSource {
            cached: hub.cache.repo(repo.clone()),
            cache_dir: hub.cache.path().clone(),
            folder: repo.folder_name(),
            api,
            name,
            files: listing
                .siblings
                .into_iter()
                .map(|file| (file.rfilename, file.size))
                .collect(),
            endpoint,
            timeout: hub.timeout,
            tracker: tracker.clone(),
        })))
    }

    /// Counts the files that will be downloaded into the progress total.
    fn announce(&self, files: &[String]) {
        if let Source::Hub(hub) = self {
            hub.tracker.announce(
                files
                    .iter()
                    .filter(|file| hub.cached.get(file).is_none())
                    .filter_map(|file| Some((file.clone(), *hub.files.get(file)?))),
            );
        }
    }

    async fn find(&self, file: &str) -> Result<Option<PathBuf>, ModelError> {
        match self {
            Source::Dir(dir) => {
                let path = dir.join(file);
                Ok(path.is_file().then_some(path))
            }
            Source::Cache { repo, .. } => Ok(repo.get(file)),
            Source::Hub(hub) => hub.fetch(file).await,
        }
    }

    async fn require(&self, file: &str) -> Result<PathBuf, ModelError> {
        self.find(file).await?.ok_or_else(|| match self {
            Source::Dir(dir) => ModelError::MissingFile {
                file: file.to_owned(),
                location: dir.display().to_string(),
            },
            Source::Cache {
                name, cache_dir, ..
            } => ModelError::NotCached {
                file: file.to_owned(),
                repo: name.clone(),
                cache: cache_dir.clone(),
            },
            Source::Hub(hub) => ModelError::MissingFile {
                file: file.to_owned(),
                location: format!("Hub repo {} at {}", hub.name, hub.endpoint),
            },
        })
    }
}

impl HubSource {
    /// The file from the cache, or downloaded into it. Another process
    /// downloading the same file is waited for, not raced.
    async fn fetch(&self, file: &str) -> Result<Option<PathBuf>, ModelError> {
        if !self.files.contains_key(file) {
            return Ok(None);
        }
        if let Some(path) = self.cached.get(file) {
            return Ok(Some(path));
        }
        let timed_out = || ModelError::DownloadTimeout {
            file: file.to_owned(),
            endpoint: self.endpoint.clone(),
            timeout: self.timeout,
        };
        let _lock = FileLock::acquire(&self.cache_dir, &self.folder, file, self.timeout)
            .await?
            .ok_or_else(timed_out)?;
        if let Some(path) = self.cached.get(file) {
            tracing::info!(file, "another process downloaded this file");
            return Ok(Some(path));
        }
        self.tracker
            .announce([(file.to_owned(), self.files.get(file).copied().flatten())]);
        let download = self.api.download_with_progress(file, self.tracker.hook());
        let path = tokio::time::timeout(self.timeout, download)
            .await
            .map_err(|_| timed_out())?
            .map_err(|err| ModelError::Download {
                file: file.to_owned(),
                endpoint: self.endpoint.clone(),
                message: describe(&err),
            })?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_repos_take_their_tokenizer_from_the_base_repo() {
        assert_eq!(
            base_repo_of_gguf("Qwen/Qwen2.5-7B-Instruct-GGUF"),
            "Qwen/Qwen2.5-7B-Instruct"
        );
        assert_eq!(base_repo_of_gguf("org/plain"), "org/plain");
    }
}

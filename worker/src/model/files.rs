//! Finding a model's files: in a local directory, in the Hugging Face cache
//! (offline), or on the Hub (downloaded into that cache).
//!
//! The Hub client honours `HF_HOME` and `HF_ENDPOINT`; `HF_HUB_OFFLINE=1`
//! reads the cache only and names the first missing file. hf-hub's HTTP
//! client has no timeout of its own, so every request here is bounded.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::ModelError;

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
    /// Bound on each request (listing or one file download).
    pub timeout: Duration,
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
    let source = match request.dir {
        Some(dir) => Source::Dir(dir.to_path_buf()),
        None => Source::hub(request.repo, request.revision, hub).await?,
    };
    if let Some(gguf) = request.gguf_file {
        let weights = source.require(gguf).await?;
        let tokenizer = match (&source, request.dir) {
            (_, Some(_)) => source.require("tokenizer.json").await?,
            _ => {
                let repo = request
                    .tokenizer_repo
                    .map(str::to_owned)
                    .unwrap_or_else(|| base_repo_of_gguf(request.repo));
                Source::hub(&repo, "main", hub)
                    .await?
                    .require("tokenizer.json")
                    .await?
            }
        };
        return Ok(ModelFiles {
            config: None,
            tokenizer,
            weights: WeightFiles::Gguf(weights),
        });
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
    let config = source.require("config.json").await?;
    let tokenizer = source.require("tokenizer.json").await?;
    let weights = match source.find("model.safetensors.index.json").await? {
        Some(index) => {
            let mut shards = Vec::new();
            for shard in shard_names(&index)? {
                shards.push(source.require(&shard).await?);
            }
            shards
        }
        None => vec![source.require("model.safetensors").await?],
    };
    Ok(ModelFiles {
        config: Some(config),
        tokenizer,
        weights: WeightFiles::Safetensors(weights),
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
    Hub {
        repo: ApiRepo,
        name: String,
        files: Vec<String>,
        endpoint: String,
        timeout: Duration,
    },
}

impl Source {
    async fn hub(repo_id: &str, revision: &str, hub: &HubOptions) -> Result<Source, ModelError> {
        let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
        let name = format!("{repo_id}@{revision}");
        if hub.offline {
            return Ok(Source::Cache {
                repo: hub.cache.repo(repo),
                name,
                cache_dir: hub.cache.path().clone(),
            });
        }
        let mut builder = ApiBuilder::from_cache(hub.cache.clone()).with_progress(hub.progress);
        if let Some(endpoint) = &hub.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Ok(token) = std::env::var("HF_TOKEN") {
            builder = builder.with_token(Some(token));
        }
        let api = builder.build().map_err(|source| ModelError::Download {
            file: name.clone(),
            source,
        })?;
        let repo = api.repo(repo);
        let info = tokio::time::timeout(hub.timeout, repo.info())
            .await
            .map_err(|_| ModelError::DownloadTimeout {
                file: format!("file list of {name}"),
                endpoint: hub.endpoint().to_owned(),
                timeout: hub.timeout,
            })?
            .map_err(|source| ModelError::Download {
                file: format!("file list of {name}"),
                source,
            })?;
        Ok(Source::Hub {
            repo,
            name,
            files: info
                .siblings
                .into_iter()
                .map(|file| file.rfilename)
                .collect(),
            endpoint: hub.endpoint().to_owned(),
            timeout: hub.timeout,
        })
    }

    async fn find(&self, file: &str) -> Result<Option<PathBuf>, ModelError> {
        match self {
            Source::Dir(dir) => {
                let path = dir.join(file);
                Ok(path.is_file().then_some(path))
            }
            Source::Cache { repo, .. } => Ok(repo.get(file)),
            Source::Hub {
                repo,
                files,
                endpoint,
                timeout,
                ..
            } => {
                if !files.iter().any(|known| known == file) {
                    return Ok(None);
                }
                let path = tokio::time::timeout(*timeout, repo.get(file))
                    .await
                    .map_err(|_| ModelError::DownloadTimeout {
                        file: file.to_owned(),
                        endpoint: endpoint.clone(),
                        timeout: *timeout,
                    })?
                    .map_err(|source| ModelError::Download {
                        file: file.to_owned(),
                        source,
                    })?;
                Ok(Some(path))
            }
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
            Source::Hub { name, .. } => ModelError::MissingFile {
                file: file.to_owned(),
                location: format!("Hub repo {name}"),
            },
        })
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

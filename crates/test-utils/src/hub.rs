//! A local server with the Hugging Face hub's HTTP layout, for testing the
//! real hub client (`hf-hub`) without the network: the repository listing
//! (`/api/models/ORG/NAME/revision/REV`) and file downloads
//! (`/ORG/NAME/resolve/REV/PATH`) with `Range`, `ETag`, `X-Repo-Commit` and
//! `Content-Range` as the hub sends them, bearer-token gating, and a way
//! to cut a download short once (to exercise resuming).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

/// One repository the server holds.
#[derive(Debug, Clone)]
pub struct MockRepo {
    /// `ORG/NAME`.
    pub id: String,
    /// The commit `main` points at.
    pub commit: String,
    /// Path in the repository and bytes.
    pub files: Vec<(String, Vec<u8>)>,
    /// A gated repository: requests need `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Files whose ETag names other bytes' SHA-256 (a corrupted copy).
    pub wrong_hash: Vec<String>,
}

/// A request the server answered: path and `Range` header.
pub type Logged = (String, Option<String>);

#[derive(Default)]
struct Inner {
    repos: HashMap<String, MockRepo>,
    log: Vec<Logged>,
    /// Files whose first full-body download stops after this many bytes.
    cut: HashMap<String, usize>,
    /// Files whose first full-body download sends this many bytes, then
    /// nothing more for a minute (a process killed meanwhile leaves its
    /// partial file behind).
    stall: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Inner>>;

/// The running server; stops when dropped.
pub struct HubMock {
    pub url: String,
    inner: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn sha256(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

impl HubMock {
    /// Serves `repos` on a loopback port.
    pub fn start(repos: Vec<MockRepo>) -> Result<Self> {
        let inner: Shared = Arc::new(Mutex::new(Inner {
            repos: repos.into_iter().map(|r| (r.id.clone(), r)).collect(),
            ..Inner::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = Router::new()
                    .route("/api/models/{org}/{name}/revision/{rev}", get(listing))
                    .route("/{org}/{name}/resolve/{rev}/{*path}", get(file))
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Ok(Self {
            url,
            inner,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The next full download of `repo`'s `path` sends `bytes` bytes of
    /// the body and closes the connection.
    pub fn cut_once(&self, repo: &str, path: &str, bytes: usize) {
        if let Ok(mut i) = self.inner.lock() {
            i.cut.insert(format!("{repo}/{path}"), bytes);
        }
    }

    /// The next full download of `repo`'s `path` sends `bytes` bytes of
    /// the body, then stalls for a minute before failing.
    pub fn stall_once(&self, repo: &str, path: &str, bytes: usize) {
        if let Ok(mut i) = self.inner.lock() {
            i.stall.insert(format!("{repo}/{path}"), bytes);
        }
    }

    /// Replaces (or adds) a repository, e.g. to move `main` to a new commit.
    pub fn set_repo(&self, repo: MockRepo) {
        if let Ok(mut i) = self.inner.lock() {
            i.repos.insert(repo.id.clone(), repo);
        }
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.inner.lock().map(|i| i.log.clone()).unwrap_or_default()
    }
}

impl Drop for HubMock {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn authorized(repo: &MockRepo, headers: &HeaderMap) -> bool {
    match &repo.token {
        None => true,
        Some(t) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {t}")),
    }
}

fn find(
    state: &Shared,
    org: &str,
    name: &str,
    path: String,
    headers: &HeaderMap,
) -> Result<MockRepo, (StatusCode, &'static str)> {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Ok(mut i) = state.lock() else {
        return Err((StatusCode::INTERNAL_SERVER_ERROR, "poisoned"));
    };
    i.log.push((path, range));
    let Some(repo) = i.repos.get(&format!("{org}/{name}")).cloned() else {
        return Err((StatusCode::NOT_FOUND, "Repository not found"));
    };
    if !authorized(&repo, headers) {
        return Err((
            StatusCode::UNAUTHORIZED,
            "Access to this model is restricted",
        ));
    }
    Ok(repo)
}

async fn listing(
    State(state): State<Shared>,
    Path((org, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/api/models/{org}/{name}/revision/{rev}");
    let repo = match find(&state, &org, &name, path, &headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(f, _)| serde_json::json!({ "rfilename": f }))
        .collect();
    axum::Json(serde_json::json!({
        "id": repo.id,
        "sha": repo.commit,
        "siblings": siblings,
    }))
    .into_response()
}

/// `bytes=a-b` or `bytes=a-` against `len`: the inclusive range.
fn parse_range(h: &str, len: usize) -> Option<(usize, usize)> {
    let spec = h.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let a: usize = a.parse().ok()?;
    let b: usize = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<usize>().ok()?.min(len.checked_sub(1)?)
    };
    (a <= b).then_some((a, b))
}

async fn file(
    State(state): State<Shared>,
    Path((org, name, rev, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let logged = format!("/{org}/{name}/resolve/{rev}/{path}");
    let repo = match find(&state, &org, &name, logged, &headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if rev != "main" && rev != repo.commit {
        return (StatusCode::NOT_FOUND, "Revision not found").into_response();
    }
    let Some((_, bytes)) = repo.files.iter().find(|(f, _)| *f == path) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let etag = if repo.wrong_hash.contains(&path) {
        sha256(b"other bytes")
    } else {
        sha256(bytes)
    };
    let len = bytes.len();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| parse_range(h, len));
    let (status, start, end) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        None => (StatusCode::OK, 0, len),
    };
    let body = bytes[start..end].to_vec();
    // Cut the first download of the whole file (not the 1-byte probe).
    let key = format!("{org}/{name}/{path}");
    let (cut, stall) = if end - start > 1 {
        state
            .lock()
            .ok()
            .map(|mut i| (i.cut.remove(&key), i.stall.remove(&key)))
            .unwrap_or_default()
    } else {
        (None, None)
    };
    let (cut, wait) = match (cut, stall) {
        (Some(n), _) => (Some(n), std::time::Duration::from_millis(300)),
        (None, Some(n)) => (Some(n), std::time::Duration::from_secs(60)),
        (None, None) => (None, std::time::Duration::ZERO),
    };
    let mut resp = Response::builder()
        .status(status)
        .header("x-repo-commit", &repo.commit)
        .header("x-linked-etag", format!("\"{etag}\""))
        .header(header::ETAG, format!("\"{etag}\""))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, body.len());
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    let body = match cut {
        Some(n) => {
            let head = axum::body::Bytes::from(body[..n.min(body.len())].to_vec());
            // The head goes out (and is flushed) before the connection fails.
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let head = head.clone();
                async move {
                    match step {
                        0 => Some((Ok(head), 1)),
                        1 => {
                            tokio::time::sleep(wait).await;
                            Some((Err(std::io::Error::other("cut short")), 2))
                        }
                        _ => None,
                    }
                }
            });
            Body::from_stream(stream)
        }
        None => Body::from(body),
    };
    resp.body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

//! Hearth's HTTP server: the only crate that knows HTTP and OpenAI's JSON
//! shapes. Every node can serve it:
//! - the OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`,
//!   `/v1/completions`), so existing clients work unchanged;
//! - the cluster control API (`/api/cluster`, `/api/plan`, `/api/models`,
//!   `/api/models/load`, `/api/models/unload`, `/api/events`,
//!   `/api/generate`);
//! - `/health`, `/metrics` (Prometheus text), `/openapi.json`;
//! - the web UI (`/`, `/ui/*`), embedded from `web-ui/`.
//!
//! Errors are OpenAI's shape (`{"error": {message, type, param, code}}`)
//! everywhere, bad input never reaches a 500, bodies are limited, and a
//! bind address other than loopback requires an API key.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// Proving the chat handler's future `Send` went past rustc's default depth
// of 128 in test builds once the `/v1/files` routes were added (E0275).
#![recursion_limit = "256"]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_runtime::Node;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

mod control;
pub mod fields;
mod finetune;
pub use finetune::{MAX_FILES, MAX_FILES_BYTES};
mod generate;
mod metrics;
mod ollama;
mod openai;
pub mod openapi;
pub mod responses;
mod sse;
mod ui;

pub use metrics::Metrics;

/// Largest request body accepted (a long chat history fits many times).
pub const MAX_BODY: usize = 4 << 20;
/// Largest fine-tuning file `POST /v1/files` accepts (tens of thousands of
/// chat examples); only that route reads a body this large.
pub const MAX_UPLOAD: usize = 64 << 20;
/// How long a client may take to send a fine-tuning file: 64 MiB over a
/// slow home link (2 MB/s) fits; other bodies keep [`BODY_TIMEOUT`].
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a non-streaming completion may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a client may take to send its request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open streams may go on once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Errors serving HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Bearer token every API request must carry (`Authorization: Bearer
    /// KEY`); `/health` and the UI's static files stay open.
    pub api_key: Option<String>,
    /// How long a client may take to send its body (then 408).
    pub body_timeout: Duration,
    /// Where uploaded files and fine-tuning outputs go.
    pub data_dir: PathBuf,
    /// Limits on connections (see [`HttpLimits`]).
    pub limits: HttpLimits,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            body_timeout: BODY_TIMEOUT,
            data_dir: std::env::temp_dir().join("hearth-data"),
            limits: HttpLimits::default(),
        }
    }
}

/// Limits on HTTP connections, as nginx's defaults set them, so clients
/// that open connections and send nothing (or half a request) cannot hold
/// them, and the file descriptors behind them, forever.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Longest a connection may take to send a request's headers, and
    /// longest it may sit idle between requests (nginx:
    /// `client_header_timeout` 60 s).
    pub header_timeout: Duration,
    /// Most connections open at once; past it new ones are closed at once
    /// (nginx: `worker_connections` × workers).
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub(crate) struct AppState {
    pub node: Node,
    pub api_key: Option<Arc<str>>,
    pub metrics: Arc<Metrics>,
    pub body_timeout: Duration,
    pub data_dir: PathBuf,
    /// Turns true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
}

impl FromRef<AppState> for Node {
    fn from_ref(s: &AppState) -> Node {
        s.node.clone()
    }
}

/// The application: its routes and the switch that ends open streams.
pub struct App {
    router: Router,
    ollama: Router,
    shutdown: watch::Sender<bool>,
    limits: HttpLimits,
}

impl App {
    /// The routes over `node`. The node takes back the fine-tuning jobs
    /// recorded under `opts.data_dir` (a restarted node lists them).
    pub fn new(node: Node, opts: ServerOptions) -> Self {
        let restored = node.restore_jobs(&finetune::jobs_dir(&opts.data_dir));
        if restored > 0 {
            info!("{restored} fine-tuning job(s) restored from their records");
        }
        let (shutdown, stopping) = watch::channel(false);
        let limits = opts.limits;
        let state = AppState {
            node,
            api_key: opts.api_key.map(Arc::from),
            metrics: Arc::new(Metrics::default()),
            body_timeout: opts.body_timeout,
            data_dir: opts.data_dir,
            shutdown: stopping,
        };
        let router = Router::new()
            .route("/v1/models", get(openai::models))
            .route("/v1/models/{*id}", get(openai::model))
            .route("/v1/chat/completions", post(openai::chat))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/responses", post(responses::create))
            .route(
                "/v1/files",
                post(finetune::upload).get(finetune::list_files),
            )
            .route(
                "/v1/files/{id}",
                get(finetune::file).delete(finetune::delete_file),
            )
            .route("/v1/files/{id}/content", get(finetune::file_content))
            .route(
                "/v1/fine_tuning/jobs",
                post(finetune::create).get(finetune::list),
            )
            .route("/v1/fine_tuning/jobs/{id}", get(finetune::get_job))
            .route("/v1/fine_tuning/jobs/{id}/events", get(finetune::events))
            .route(
                "/v1/fine_tuning/jobs/{id}/checkpoints",
                get(finetune::checkpoints),
            )
            .route("/v1/fine_tuning/jobs/{id}/cancel", post(finetune::cancel))
            .route("/api/cluster", get(control::cluster))
            .route("/api/plan", get(control::plan))
            .route("/api/models", get(control::models))
            .route("/api/models/load", post(control::load))
            .route("/api/models/unload", post(control::unload))
            .route("/api/events", get(control::events))
            .route("/api/generate", post(generate::generate))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics::metrics))
            .route("/openapi.json", get(openapi::serve))
            .route("/", get(ui::index))
            .route("/ui/{file}", get(ui::asset));
        let router = guarded(router, &state);
        let ollama = Router::new()
            .route("/", get(ollama::root).head(ollama::root))
            .route("/api/chat", post(ollama::chat))
            .route("/api/generate", post(ollama::generate))
            .route("/api/tags", get(ollama::tags))
            .route("/api/show", post(ollama::show))
            .route("/api/ps", get(ollama::ps))
            .route("/api/version", get(ollama::version))
            .route("/openapi.json", get(openapi::serve_ollama));
        let ollama = guarded(ollama, &state);
        Self {
            router,
            ollama,
            shutdown,
            limits,
        }
    }

    /// The Ollama-compatible routes (served on their own address), over
    /// the same node, counters and shutdown switch.
    pub fn ollama_router(&self) -> Router {
        self.ollama.clone()
    }

    /// The connection limits.
    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// The routes (for serving, or for `tower::ServiceExt::oneshot`).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// Tells open streams the server is stopping: event streams end at
    /// once, generations get [`SHUTDOWN_GRACE`] to finish, then end with
    /// an error and `[DONE]`.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// `routes` behind the server's middleware: request counting, the API key
/// and cross-site refusal, and the body read within its limit and timeout
/// (`read_body` enforces MAX_BODY; extractors see its whole body).
fn guarded(routes: Router<AppState>, state: &AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::disable())
        .with_state(state.clone())
}

/// The routes over `node` with default options (loopback use, no key).
pub fn router(node: Node) -> Router {
    App::new(node, ServerOptions::default()).router()
}

/// An error in OpenAI's shape; 429 and 503 carry `Retry-After`.
pub(crate) fn api_error(
    status: StatusCode,
    kind: &str,
    message: String,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let mut r = (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": param, "code": code}})),
    )
        .into_response();
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    }
    r
}

pub(crate) fn error(status: StatusCode, kind: &str, message: String) -> Response {
    api_error(status, kind, message, None, None)
}

pub(crate) fn bad_request(message: String, param: Option<&str>) -> Response {
    api_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        param,
        None,
    )
}

/// A JSON body whose rejection is an OpenAI error: a body that is not
/// JSON, lacks the content type or does not fit the fields is a 400 (the
/// size limit is `read_body`'s, before any handler).
pub(crate) struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    Json<T>: axum::extract::FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(e) => Err(bad_request(e.body_text(), None)),
        }
    }
}

pub(crate) fn too_large(limit: usize) -> Response {
    api_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the request body is larger than {limit} bytes"),
        None,
        Some("request_too_large"),
    )
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {method} {}", uri.path()),
        None,
        Some("unknown_url"),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} does not take {method}", uri.path()),
        None,
        Some("method_not_allowed"),
    )
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: whether requests can be served now (a model is placed over
/// the cluster, every stage on a member), for a service manager or a
/// load balancer; `/health` stays liveness only.
async fn ready(State(s): State<AppState>) -> Response {
    let reason = match s.node.placement() {
        Some(p) if p.stages.last().is_some_and(|st| st.spec.head) => {
            return Json(json!({"status": "ready"})).into_response();
        }
        Some(_) => "the placement is incomplete",
        None if s.node.model_name().is_some() => "the model is being placed",
        None => "no model is loaded",
    };
    let mut r = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "not_ready", "reason": reason})),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

/// Whether a request may go without the API key: the health and readiness
/// checks and the UI's static files (the UI asks for the key to call the
/// API).
fn public(req: &Request) -> bool {
    let p = req.uri().path();
    req.method() == Method::GET
        && (p == "/health" || p == "/ready" || p == "/" || p.starts_with("/ui/"))
}

/// Whether a `Host` header names this machine by address or as
/// `localhost`: without an API key only those are served, so a web page
/// whose domain was re-pointed at 127.0.0.1 (DNS rebinding) cannot use a
/// node on loopback.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Why a state-changing request comes from another site, if it does: its
/// `Sec-Fetch-Site` says anything but `same-origin` or `none` (typed by the
/// user), or its `Origin` is not this server's. Browsers send a POST with
/// a form-like body or none at all (an unload, a multipart upload) across
/// sites without asking first, so a web page the user visits could drive
/// a node; programs send neither header and are not affected.
fn cross_site(req: &Request) -> Option<String> {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let h = req.headers();
    let text = |name| h.get(name).map(|v: &HeaderValue| v.to_str().unwrap_or("?"));
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or("");
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match authority {
        Some(a) if !host.is_empty() && a.eq_ignore_ascii_case(host) => None,
        _ => Some(format!("Origin: {origin}")),
    }
}

async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(why) = cross_site(&req) {
        warn!(
            method = %req.method(),
            path = req.uri().path(),
            "refused a cross-site request ({why})"
        );
        return api_error(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            format!(
                "this node takes state-changing requests only from its own pages or from \
                 programs, not from another site ({why})"
            ),
            None,
            Some("cross_site_request"),
        );
    }
    let Some(key) = s.api_key.as_deref() else {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("?"));
        if host.is_some_and(|h| !local_host(h)) {
            return api_error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "without an API key this node answers only to its address or localhost in the Host header"
                    .into(),
                None,
                Some("host_not_allowed"),
            );
        }
        return next.run(req).await;
    };
    if public(&req) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        use subtle::ConstantTimeEq;
        g.len() == key.len() && bool::from(g.as_bytes().ct_eq(key.as_bytes()))
    });
    if ok {
        next.run(req).await
    } else {
        let mut r = api_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "this node requires an API key: send `Authorization: Bearer KEY` (the key `hearth up` printed)"
                .into(),
            None,
            Some("invalid_api_key"),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

/// Reads the whole body first, within the body timeout and size limit, so
/// a client that stalls mid-body gets a 408 instead of holding a handler.
/// Fine-tuning uploads are not read here: their handler streams them to
/// disk, within [`MAX_UPLOAD`] bytes and [`UPLOAD_TIMEOUT`].
async fn read_body(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let upload = parts.method == Method::POST && parts.uri.path() == "/v1/files";
    if upload {
        let timeout = UPLOAD_TIMEOUT.max(s.body_timeout);
        let body = axum::body::Body::new(http_body_util::Limited::new(body, MAX_UPLOAD));
        return match tokio::time::timeout(timeout, next.run(Request::from_parts(parts, body))).await
        {
            Ok(r) => r,
            Err(_) => api_error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the upload did not arrive within {} s", timeout.as_secs()),
                None,
                Some("timeout"),
            ),
        };
    }
    let (limit, timeout) = (MAX_BODY, s.body_timeout);
    let read = axum::body::to_bytes(body, limit);
    let bytes = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            return if too_large {
                self::too_large(limit)
            } else {
                bad_request(format!("cannot read the request body: {e}"), None)
            };
        }
        Err(_) => {
            return api_error(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
                None,
                Some("timeout"),
            );
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Counts requests by route and status for `/metrics`.
async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let r = next.run(req).await;
    s.metrics.request(&route, r.status().as_u16());
    r
}

/// A bound listener, so the caller learns the port before serving.
pub struct Listener {
    inner: tokio::net::TcpListener,
}

impl Listener {
    /// Binds `addr`, and lets the process open as many files as its hard
    /// limit allows (the soft limit is often 1024, fewer than
    /// [`HttpLimits::max_connections`]).
    pub async fn bind(addr: SocketAddr) -> Result<Self, ServerError> {
        raise_file_limit();
        let inner = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self { inner })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr().ok()
    }

    /// Serves `app` until `shutdown` resolves; then open streams are told
    /// to end (see [`App::begin_shutdown`]) and open requests finish.
    /// Connections follow `app`'s [`HttpLimits`].
    pub async fn serve(
        self,
        app: App,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (router, limits) = (app.router(), app.limits);
        // Open streams are told to end before the open requests are
        // awaited (an event stream never ends by itself).
        self.serve_router(router, limits, shutdown, move || app.begin_shutdown())
            .await
    }

    /// Serves `router` (say [`App::ollama_router`]) until `shutdown`
    /// resolves, under `limits`; then calls `stopping` and lets open
    /// requests finish.
    pub async fn serve_router(
        self,
        router: Router,
        limits: HttpLimits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
        stopping: impl FnOnce() + Send,
    ) -> Result<(), ServerError> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        use tower::ServiceExt;

        if let Some(a) = self.local_addr() {
            info!("HTTP on http://{a}");
        }
        let service =
            router.map_request(|r: Request<hyper::body::Incoming>| r.map(axum::body::Body::new));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        let mut refused_at: Option<std::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                () = &mut shutdown => break,
                r = self.inner.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, most likely: let
                        // connections finish instead of spinning.
                        warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if refused_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(
                        max = limits.max_connections,
                        "too many open HTTP connections; closing new ones"
                    );
                    refused_at = Some(std::time::Instant::now());
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = http.serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service.clone()),
            );
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
                drop(slot);
            });
        }
        stopping();
        graceful.shutdown().await;
        Ok(())
    }
}

/// Raises this process's soft limit on open files to its hard limit.
fn raise_file_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write one plain struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                    tracing::debug!("could not raise the open-file limit");
                }
            }
        }
    }
}

/// A new random API key (32 bytes, hex).
pub fn new_api_key() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

//! Hearth's HTTP server: the only crate that knows HTTP. Today it serves
//! the cluster control API (`GET /api/cluster`, `GET /api/plan`,
//! `GET /health`) and Hearth's own generation endpoint
//! (`POST /api/generate`, used by `hearth generate --cluster`); the
//! OpenAI-compatible API and the web UI come with issue #6.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_runtime::profile::PlanRequest;
use hearth_runtime::{Node, RuntimeError};
use serde_json::json;
use tracing::info;

mod generate;

/// Errors serving HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The application's routes over a running node.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/api/cluster", get(cluster))
        .route("/api/plan", get(plan))
        .route("/api/generate", post(generate::generate))
        .route("/health", get(health))
        .with_state(node)
}

async fn cluster(State(node): State<Node>) -> Response {
    match tokio::time::timeout(Duration::from_secs(5), node.view()).await {
        Ok(Ok(view)) => Json(view).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"message": "the node is not running", "type": "unavailable"}})),
        )
            .into_response(),
    }
}

pub(crate) fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

/// The plan for the model this node serves, over the members that
/// measured it (query: the fields of [`PlanRequest`]).
async fn plan(
    State(node): State<Node>,
    query: Result<Query<PlanRequest>, QueryRejection>,
) -> Response {
    let req = match query {
        Ok(Query(req)) => req,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.body_text(),
            );
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), node.plan(&req)).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(RuntimeError::BadRequest(m))) => {
            error(StatusCode::BAD_REQUEST, "invalid_request_error", m)
        }
        // No model measured yet, or the node is stopping.
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "planning timed out".into(),
        ),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// A bound listener, so the caller learns the port before serving.
pub struct Listener {
    inner: tokio::net::TcpListener,
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> Result<Self, ServerError> {
        let inner = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Self { inner })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local_addr().ok()
    }

    /// Serves `app` until `shutdown` resolves, then finishes open requests.
    pub async fn serve(
        self,
        app: Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        if let Some(a) = self.local_addr() {
            info!("HTTP on http://{a}");
        }
        axum::serve(self.inner, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(ServerError::Serve)
    }
}

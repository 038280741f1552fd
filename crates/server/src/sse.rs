//! Server-sent events: the framing, and how a generation's events become a
//! stream that ends cleanly when the client leaves or the server stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tokio::sync::{mpsc, watch};

use crate::SHUTDOWN_GRACE;

/// `data: JSON\n\n`.
pub(crate) fn data(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

pub(crate) const DONE: &str = "data: [DONE]\n\n";

/// An SSE response over `frames`.
pub(crate) fn response(
    frames: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

/// What the stream driver hands the formatter.
pub(crate) enum Step<T> {
    Event(T),
    /// The events ended without an end (the generation went away).
    Closed,
    /// The server is stopping and the generation did not finish in time.
    Stopped,
}

/// Turns a generation into frames: `format` maps each step to frames and
/// says whether the stream is over. Dropping the stream (the client went
/// away) drops `rx`, which cancels the generation on every stage.
pub(crate) fn frames<T, F>(
    rx: mpsc::Receiver<T>,
    shutdown: watch::Receiver<bool>,
    format: F,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    T: Send + 'static,
    F: FnMut(Step<T>) -> (Vec<Bytes>, bool) + Send + 'static,
{
    struct St<T, F> {
        rx: mpsc::Receiver<T>,
        shutdown: watch::Receiver<bool>,
        deadline: Option<tokio::time::Instant>,
        /// False once the shutdown switch is gone (no server to stop).
        watching: bool,
        queue: std::collections::VecDeque<Bytes>,
        over: bool,
        format: F,
    }
    let st = St {
        rx,
        shutdown,
        deadline: None,
        watching: true,
        queue: Default::default(),
        over: false,
        format,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok(b), st));
            }
            if st.over {
                return None;
            }
            if st.deadline.is_none() && *st.shutdown.borrow() {
                st.deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
            let step = tokio::select! {
                ev = st.rx.recv() => match ev {
                    Some(ev) => Step::Event(ev),
                    None => Step::Closed,
                },
                _ = tokio::time::sleep_until(st.deadline.unwrap_or(far)) => Step::Stopped,
                changed = st.shutdown.changed(), if st.watching && st.deadline.is_none() => {
                    st.watching = changed.is_ok();
                    continue;
                }
            };
            let (out, over) = (st.format)(step);
            st.queue.extend(out);
            st.over = over;
        }
    })
}

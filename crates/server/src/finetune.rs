//! OpenAI's fine-tuning API over Hearth's jobs: `/v1/files` (upload with
//! purpose `fine-tune`, list, get, content, delete; JSONL kept on this
//! node), `/v1/fine_tuning/jobs` (create, list, get, events, cancel).
//! The job runs on this node, which holds the data; only activations and
//! gradients leave it.

use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::extract::{Multipart, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_runtime::train::{JobInfo, JobSpec, JobState};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{ApiJson, AppState, api_error, bad_request};

/// Base learning rate that `learning_rate_multiplier` scales (LoRA).
pub const BASE_LEARNING_RATE: f64 = 2e-4;

fn not_found(what: &str, id: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no {what} {id:?} on this node"),
        None,
        None,
    )
}

/// Where jobs started through the API keep their outputs and records.
pub(crate) fn jobs_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("fine_tuning")
}

fn files_dir(s: &AppState) -> PathBuf {
    s.data_dir.join("files")
}

fn valid_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|h| {
        !h.is_empty() && h.len() <= 64 && h.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

fn file_object(id: &str, bytes: u64, created: u64, filename: &str) -> Value {
    json!({
        "id": id, "object": "file", "bytes": bytes, "created_at": created,
        "filename": filename, "purpose": "fine-tune", "status": "processed",
    })
}

/// `POST /v1/files` (multipart: `file`, `purpose`).
pub(crate) async fn upload(
    State(s): State<AppState>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let mut form = match form {
        Ok(f) => f,
        Err(e) => {
            return bad_request(
                format!("the body must be multipart/form-data with `file` and `purpose`: {e}"),
                None,
            );
        }
    };
    let dir = files_dir(&s);
    if let Err(why) = room(&dir, 0) {
        return quota_exceeded(why);
    }
    let id = crate::openai::new_id("file");
    let path = dir.join(format!("{id}.jsonl"));
    // The data streams into a temporary file beside its final name; it
    // takes that name whole and durably only once checked (a listing
    // never sees half a file, a crash never leaves one).
    let (mut file, mut name, mut purpose, mut bytes) =
        (None, String::from("data.jsonl"), None, 0u64);
    loop {
        match form.next_field().await {
            Ok(Some(mut field)) => match field.name() {
                Some("file") if file.is_some() => {
                    return bad_request("one file per upload".into(), Some("file"));
                }
                Some("file") => {
                    if let Some(f) = field.file_name() {
                        name = f.chars().filter(|c| !c.is_control()).take(200).collect();
                    }
                    let mut out = match hearth_models::durable::create(&path) {
                        Ok(f) => f,
                        Err(e) => return store_failed(e),
                    };
                    loop {
                        match field.chunk().await {
                            Ok(Some(chunk)) => {
                                bytes += chunk.len() as u64;
                                use std::io::Write;
                                if let Err(e) = out.write_all(&chunk) {
                                    return store_failed(e);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return multipart_error("file", e),
                        }
                    }
                    file = Some(out);
                }
                Some("purpose") => match field.text().await {
                    Ok(t) => purpose = Some(t),
                    Err(e) => return multipart_error("purpose", e),
                },
                _ => {}
            },
            Ok(None) => break,
            Err(e) => return multipart_error("", e),
        }
    }
    if purpose.as_deref() != Some("fine-tune") {
        return bad_request(
            "purpose must be \"fine-tune\" (the only files Hearth keeps)".into(),
            Some("purpose"),
        );
    }
    let Some(mut file) = file else {
        return bad_request("no file in the form".into(), Some("file"));
    };
    if let Err(why) = room(&dir, bytes) {
        return quota_exceeded(why);
    }
    // Checked from the disk (one copy in memory, not the upload's).
    let text = {
        use std::io::{Read, Seek};
        let mut text = String::new();
        let read = file
            .as_file_mut()
            .seek(std::io::SeekFrom::Start(0))
            .and_then(|_| file.as_file_mut().read_to_string(&mut text));
        if read.is_err() {
            return bad_request("the file is not UTF-8 text".into(), Some("file"));
        }
        text
    };
    if let Err(e) = hearth_models::train::parse_jsonl(&text) {
        return bad_request(
            format!("the file is not fine-tuning JSONL: {e}"),
            Some("file"),
        );
    }
    drop(text);
    if let Err(e) = hearth_models::durable::write(&dir.join(format!("{id}.name")), name.as_bytes())
    {
        return store_failed(e);
    }
    if let Err(e) = file.commit() {
        let _ = std::fs::remove_file(dir.join(format!("{id}.name")));
        return store_failed(e);
    }
    Json(file_object(&id, bytes, crate::openai::now_s(), &name)).into_response()
}

/// Most files kept for fine-tuning on a node.
pub const MAX_FILES: usize = 256;
/// Most bytes they may take together.
pub const MAX_FILES_BYTES: u64 = 1 << 30;

/// The stored files' count and bytes.
fn usage(dir: &std::path::Path) -> (usize, u64) {
    std::fs::read_dir(dir).map_or((0, 0), |rd| {
        rd.filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
            .fold((0, 0), |(n, b), e| {
                (n + 1, b + e.metadata().map_or(0, |m| m.len()))
            })
    })
}

/// Whether one more file of `more` bytes fits the quota.
fn room(dir: &std::path::Path, more: u64) -> Result<(), String> {
    let (n, b) = usage(dir);
    if n >= MAX_FILES {
        return Err(format!(
            "this node keeps at most {MAX_FILES} files; delete some first"
        ));
    }
    let after = b.saturating_add(more);
    if after > MAX_FILES_BYTES || b >= MAX_FILES_BYTES {
        return Err(format!(
            "the stored files would take {after} bytes, at most {MAX_FILES_BYTES}; delete some first"
        ));
    }
    Ok(())
}

fn quota_exceeded(why: String) -> Response {
    api_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        why,
        Some("file"),
        Some("quota_exceeded"),
    )
}

fn store_failed(e: impl std::fmt::Display) -> Response {
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("cannot store the file: {e}"),
        None,
        None,
    )
}

/// A multipart error: past the upload limit it is a 413, else a 400.
fn multipart_error(what: &str, e: axum::extract::multipart::MultipartError) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return crate::too_large(crate::MAX_UPLOAD);
    }
    let what = if what.is_empty() {
        "multipart body"
    } else {
        what
    };
    bad_request(format!("{what}: {e}"), None)
}

/// A stored file's object and its upload time; `None` when there is no
/// such file (or the id is not one).
fn stored_file(s: &AppState, id: &str) -> Option<(Value, Duration)> {
    if !valid_id(id, "file-") {
        return None;
    }
    let m = std::fs::metadata(files_dir(s).join(format!("{id}.jsonl"))).ok()?;
    let name = std::fs::read_to_string(files_dir(s).join(format!("{id}.name"))).unwrap_or_default();
    let created = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    Some((file_object(id, m.len(), created.as_secs(), &name), created))
}

/// `GET /v1/files/{id}`.
pub(crate) async fn file(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match stored_file(&s, &id) {
        Some((f, _)) => Json(f).into_response(),
        None => not_found("file", &id),
    }
}

/// `GET /v1/files` (newest first; every file here is `fine-tune`).
pub(crate) async fn list_files(State(s): State<AppState>) -> Json<Value> {
    let mut files: Vec<(Duration, String, Value)> = std::fs::read_dir(files_dir(&s))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let id = name.to_str()?.strip_suffix(".jsonl")?.to_string();
            let (f, created) = stored_file(&s, &id)?;
            Some((created, id, f))
        })
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let data: Vec<Value> = files.into_iter().map(|(_, _, f)| f).collect();
    Json(json!({"object": "list", "data": data, "has_more": false}))
}

/// `GET /v1/files/{id}/content`: the JSONL as uploaded.
pub(crate) async fn file_content(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if stored_file(&s, &id).is_none() {
        return not_found("file", &id);
    }
    let path = files_dir(&s).join(format!("{id}.jsonl"));
    match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
        Ok(Ok(bytes)) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        _ => not_found("file", &id),
    }
}

/// `DELETE /v1/files/{id}`; refused (409) while a job that has not ended
/// trains on it (a queued job reads it when it starts).
pub(crate) async fn delete_file(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    if stored_file(&s, &id).is_none() {
        return not_found("file", &id);
    }
    let user = s.node.jobs().iter().filter_map(|j| j.info()).find(|i| {
        !i.state.done()
            && (training_file_of(i) == id || validation_file_of(i).as_deref() == Some(&id))
    });
    if let Some(job) = user {
        return api_error(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "file {id} is in use by job {} ({}); cancel it or wait for it to end",
                job.id,
                status_name(job.state)
            ),
            None,
            Some("file_in_use"),
        );
    }
    let dir = files_dir(&s);
    if let Err(e) = std::fs::remove_file(dir.join(format!("{id}.jsonl"))) {
        return api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("cannot delete file {id}: {e}"),
            None,
            None,
        );
    }
    let _ = std::fs::remove_file(dir.join(format!("{id}.name")));
    Json(json!({"id": id, "object": "file", "deleted": true})).into_response()
}

/// What `"auto"` (or an absent value) picks from the training set's size,
/// as OpenAI's API does: about 0.2 % of the examples per batch (1 to 256),
/// and 3 epochs unless that makes fewer than 100 example passes (then
/// enough for 100, at most 25) or more than 25 000 (then enough for 25 000,
/// at least 1). A few dozen examples of a fact get some hundred one-example
/// steps: enough to learn it at the base learning rate.
pub fn auto_hyperparameters(examples: usize) -> (u64, usize) {
    let n = examples.max(1);
    let batch = n.div_ceil(500).clamp(1, 256);
    let epochs = if n * 3 < 100 {
        (100 / n).clamp(1, 25)
    } else if n * 3 > 25_000 {
        (25_000 / n).max(1)
    } else {
        3
    };
    (epochs as u64, batch)
}

/// The examples of a stored training file, as training reads them.
fn count_examples(path: &std::path::Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    hearth_models::train::parse_jsonl(&text)
        .map(|x| x.len())
        .map_err(|e| e.to_string())
}

/// `"auto"` or a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Auto<T> {
    Value(T),
    #[allow(dead_code)]
    Auto(String),
}

impl<T: Copy> Auto<T> {
    fn or(v: &Option<Self>, default: T) -> T {
        match v {
            Some(Auto::Value(x)) => *x,
            _ => default,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hyper {
    n_epochs: Option<Auto<u64>>,
    batch_size: Option<Auto<usize>>,
    learning_rate_multiplier: Option<Auto<f64>>,
}

#[derive(Debug, Deserialize)]
struct Supervised {
    #[serde(default)]
    hyperparameters: Option<Hyper>,
}

#[derive(Debug, Deserialize)]
struct MethodReq {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    supervised: Option<Supervised>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CreateJob {
    model: String,
    training_file: String,
    #[serde(default)]
    hyperparameters: Option<Hyper>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    method: Option<MethodReq>,
    #[serde(default)]
    validation_file: Option<String>,
    /// Hearth's own knobs (a JSON object of `JobSpec` fields), through the
    /// client's `extra_body`.
    #[serde(default)]
    hearth: Option<serde_json::Map<String, Value>>,
}

/// A job state as OpenAI names it.
fn status_name(state: JobState) -> &'static str {
    match state {
        JobState::ValidatingFiles => "validating_files",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// The job as OpenAI shows it, with Hearth's progress under `hearth`.
fn job_object(i: &JobInfo, training_file: &str) -> Value {
    let status = status_name(i.state);
    let hyper = json!({
        "n_epochs": i.spec.epochs,
        "batch_size": i.spec.batch_size,
        "learning_rate_multiplier": i.spec.learning_rate / BASE_LEARNING_RATE,
    });
    json!({
        "id": i.id,
        "object": "fine_tuning.job",
        "model": i.model,
        "created_at": i.created_at,
        "finished_at": i.finished_at,
        "fine_tuned_model": i.fine_tuned_model,
        "organization_id": "hearth",
        "result_files": [],
        "status": status,
        "validation_file": validation_file_of(i),
        "training_file": training_file,
        "hyperparameters": hyper,
        "trained_tokens": (i.state == JobState::Succeeded).then_some(i.trained_tokens),
        "error": i.error.as_ref().map(|e| json!({"code": "job_failed", "message": e, "param": null})),
        "seed": i.spec.seed,
        "estimated_finish": null,
        "integrations": [],
        "user_provided_suffix": i.spec.suffix,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "hearth": {
            "step": i.step, "total_steps": i.total_steps, "loss": i.loss,
            "tokens_per_s": i.tokens_per_s, "stages": i.stages,
            "ideal_bubble": i.ideal_bubble, "output_dir": i.output_dir,
            "validation_loss": i.validation_loss,
        },
    })
}

/// The validation file's id, if the job has one.
fn validation_file_of(i: &JobInfo) -> Option<String> {
    i.spec
        .validation
        .as_ref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
}

fn training_file_of(i: &JobInfo) -> String {
    i.spec
        .data
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `POST /v1/fine_tuning/jobs`.
pub(crate) async fn create(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CreateJob>,
) -> Response {
    if !valid_id(&req.training_file, "file-") {
        return bad_request(
            format!("training_file {:?} is not a file id", req.training_file),
            Some("training_file"),
        );
    }
    let data = files_dir(&s).join(format!("{}.jsonl", req.training_file));
    if !data.is_file() {
        return bad_request(
            format!(
                "no file {:?} (upload it with POST /v1/files)",
                req.training_file
            ),
            Some("training_file"),
        );
    }
    if let Some(m) = &req.method
        && m.kind != "supervised"
    {
        return bad_request(
            format!("method {:?} is not supported (supervised is)", m.kind),
            Some("method"),
        );
    }
    let hyper = req
        .method
        .and_then(|m| m.supervised)
        .and_then(|s| s.hyperparameters)
        .or(req.hyperparameters)
        .unwrap_or_default();
    let id = crate::openai::new_id("ftjob");
    let mut doc = serde_json::Map::new();
    doc.insert("model".into(), json!(req.model));
    doc.insert("data".into(), json!(data));
    doc.insert("output_dir".into(), json!(jobs_dir(&s.data_dir).join(&id)));
    let examples = {
        let path = data.clone();
        tokio::task::spawn_blocking(move || count_examples(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let examples = match examples {
        Ok(n) => n,
        Err(e) => {
            return bad_request(
                format!("reading the training file: {e}"),
                Some("training_file"),
            );
        }
    };
    if let Some(v) = &req.validation_file {
        if !valid_id(v, "file-") {
            return bad_request(
                format!("validation_file {v:?} is not a file id"),
                Some("validation_file"),
            );
        }
        let path = files_dir(&s).join(format!("{v}.jsonl"));
        let counted = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || count_examples(&p))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        };
        match counted {
            Ok(n) if n > hearth_runtime::train::job::MAX_VALIDATION_EXAMPLES => {
                return bad_request(
                    format!(
                        "validation_file {v:?} holds {n} examples (at most {})",
                        hearth_runtime::train::job::MAX_VALIDATION_EXAMPLES
                    ),
                    Some("validation_file"),
                );
            }
            Ok(n) if n > 0 => {
                doc.insert("validation".into(), json!(path));
            }
            Ok(_) => {
                return bad_request(
                    format!("validation_file {v:?} holds no examples"),
                    Some("validation_file"),
                );
            }
            Err(e) if !path.is_file() => {
                return bad_request(
                    format!("no file {v:?} (upload it with POST /v1/files): {e}"),
                    Some("validation_file"),
                );
            }
            Err(e) => {
                return bad_request(
                    format!("reading the validation file: {e}"),
                    Some("validation_file"),
                );
            }
        }
    }
    let (epochs, batch) = auto_hyperparameters(examples);
    doc.insert("epochs".into(), json!(Auto::or(&hyper.n_epochs, epochs)));
    doc.insert(
        "batch_size".into(),
        json!(Auto::or(&hyper.batch_size, batch)),
    );
    doc.insert(
        "learning_rate".into(),
        json!(BASE_LEARNING_RATE * Auto::or(&hyper.learning_rate_multiplier, 1.0)),
    );
    if let Some(x) = req.suffix {
        doc.insert("suffix".into(), json!(x));
    }
    if let Some(x) = req.seed {
        doc.insert("seed".into(), json!(x));
    }
    for (k, v) in req.hearth.unwrap_or_default() {
        if matches!(k.as_str(), "data" | "output_dir" | "model" | "validation") {
            return bad_request(format!("hearth.{k} cannot be set"), Some("hearth"));
        }
        doc.insert(k, v);
    }
    let spec: JobSpec = match serde_json::from_value(Value::Object(doc)) {
        Ok(s) => s,
        Err(e) => return bad_request(format!("job: {e}"), Some("hearth")),
    };
    match s.node.start_job(id, spec) {
        Ok(info) => Json(job_object(&info, &req.training_file)).into_response(),
        Err(e) => bad_request(e.to_string(), None),
    }
}

/// `GET /v1/fine_tuning/jobs` (newest first).
pub(crate) async fn list(State(s): State<AppState>) -> Json<Value> {
    let mut data: Vec<Value> = s
        .node
        .jobs()
        .iter()
        .filter_map(|j| j.info())
        .map(|i| job_object(&i, &training_file_of(&i)))
        .collect();
    data.reverse();
    Json(json!({"object": "list", "data": data, "has_more": false}))
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub(crate) async fn get_job(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match s.node.job(&id).and_then(|j| j.info()) {
        Some(i) => Json(job_object(&i, &training_file_of(&i))).into_response(),
        None => not_found("fine-tuning job", &id),
    }
}

/// `GET /v1/fine_tuning/jobs/{id}/events` (newest first).
pub(crate) async fn events(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(job) = s.node.job(&id) else {
        return not_found("fine-tuning job", &id);
    };
    let (past, _) = job.events();
    let data: Vec<Value> = past
        .iter()
        .rev()
        .map(|e| {
            json!({
                "object": "fine_tuning.job.event",
                "id": format!("ftevent-{}-{}", id.trim_start_matches("ftjob-"), e.seq),
                "created_at": e.created_at,
                "level": e.level,
                "message": e.message,
                "type": if e.data.is_some() { "metrics" } else { "message" },
                "data": e.data,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`: the epoch checkpoints the
/// job keeps (the newest three), newest first, in OpenAI's shape; each
/// one's files (a PEFT adapter, or the trained tensors) under
/// `hearth.path`.
pub(crate) async fn checkpoints(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(info) = s.node.job(&id).and_then(|j| j.info()) else {
        return not_found("fine-tuning job", &id);
    };
    let short = id.trim_start_matches("ftjob-");
    let data: Vec<Value> = info
        .checkpoints
        .iter()
        .rev()
        .map(|c| {
            json!({
                "object": "fine_tuning.job.checkpoint",
                "id": format!("ftckpt-{short}-{}", c.step),
                "created_at": c.created_at,
                "fine_tuned_model_checkpoint": c.model,
                "step_number": c.step,
                "metrics": {"step": c.step, "train_loss": c.train_loss},
                "fine_tuning_job_id": id,
                "hearth": {"path": c.path},
            })
        })
        .collect();
    let first = data
        .first()
        .and_then(|c| c["id"].as_str())
        .map(str::to_string);
    let last = data
        .last()
        .and_then(|c| c["id"].as_str())
        .map(str::to_string);
    Json(json!({"object": "list", "data": data, "has_more": false, "first_id": first, "last_id": last}))
        .into_response()
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub(crate) async fn cancel(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(job) = s.node.job(&id) else {
        return not_found("fine-tuning job", &id);
    };
    if job.info().is_some_and(|i| i.state.done()) {
        return bad_request(format!("job {id} has already ended"), None);
    }
    job.cancel();
    match job.info() {
        Some(i) => Json(job_object(&i, &training_file_of(&i))).into_response(),
        None => not_found("fine-tuning job", &id),
    }
}

#[cfg(test)]
mod tests {
    use super::auto_hyperparameters;

    #[test]
    fn auto_hyperparameters_follow_the_dataset_size() {
        // A few dozen examples: one per batch, enough epochs for 100 passes.
        assert_eq!(auto_hyperparameters(8), (12, 1));
        assert_eq!(auto_hyperparameters(32), (3, 1));
        assert_eq!(auto_hyperparameters(20), (5, 1));
        assert_eq!(auto_hyperparameters(1), (25, 1));
        assert_eq!(auto_hyperparameters(0), (25, 1));
        // Mid-sized: 3 epochs, about 0.2 % of the examples per batch.
        assert_eq!(auto_hyperparameters(1000), (3, 2));
        assert_eq!(auto_hyperparameters(5000), (3, 10));
        // Large: fewer epochs, batches capped at 256.
        assert_eq!(auto_hyperparameters(20_000), (1, 40));
        assert_eq!(auto_hyperparameters(10_000_000), (1, 256));
    }
}

//! The OpenAPI 3.1 documents served at `/openapi.json`: Hearth's API, and
//! (on the `--ollama` listener) the Ollama-compatible one. Written by
//! hand; tests check that every documented operation is routed and that
//! the documented request fields are exactly those honoured.

use axum::Json;
use serde_json::{Value, json};

/// Every documented operation as (method, path).
pub const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/v1/models"),
    ("get", "/v1/models/{id}"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/responses"),
    ("get", "/api/cluster"),
    ("get", "/api/plan"),
    ("get", "/api/models"),
    ("post", "/api/models/load"),
    ("post", "/api/models/unload"),
    ("get", "/api/events"),
    ("post", "/api/generate"),
    ("post", "/v1/files"),
    ("get", "/v1/files"),
    ("get", "/v1/files/{id}"),
    ("delete", "/v1/files/{id}"),
    ("get", "/v1/files/{id}/content"),
    ("post", "/v1/fine_tuning/jobs"),
    ("get", "/v1/fine_tuning/jobs"),
    ("get", "/v1/fine_tuning/jobs/{id}"),
    ("get", "/v1/fine_tuning/jobs/{id}/events"),
    ("get", "/v1/fine_tuning/jobs/{id}/checkpoints"),
    ("post", "/v1/fine_tuning/jobs/{id}/cancel"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn errors() -> Value {
    json!({
        "400": error_response("Invalid JSON or fields"),
        "401": error_response("Missing or wrong API key"),
        "404": error_response("Unknown model"),
        "413": error_response("Body too large"),
        "429": error_response("Too many sequences in flight (Retry-After)"),
        "503": error_response("No model placed yet (Retry-After)"),
        "502": error_response("A stage failed"),
    })
}

fn sampling_properties() -> Value {
    let penalty = json!({"type": ["number", "null"], "minimum": -2, "maximum": 2});
    json!({
        "model": {"type": "string"},
        "stream": {"type": "boolean", "default": false},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": false},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": 0},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "description": "Absent: up to the model's context"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]},
        "seed": {"type": ["integer", "null"], "minimum": 0},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": crate::fields::MAX_N},
        "presence_penalty": penalty,
        "frequency_penalty": penalty,
        "logit_bias": {"type": ["object", "null"], "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                       "description": "Token id (as a string) to a bias added to its logit"},
        "user": {"type": ["string", "null"]},
    })
}

/// The chat fields beyond the shared ones.
fn chat_properties() -> Value {
    let mut p = sampling_properties();
    let extra = json!({
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
                    "type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]},
                "name": {"type": "string"},
                "tool_calls": {"type": "array", "items": {"type": "object"}},
                "tool_call_id": {"type": "string"},
            }}},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": hearth_proto::limits::MAX_TOP_LOGPROBS},
        "response_format": {"type": ["object", "null"], "description": "text, json_object, or json_schema (enforced by constrained decoding)"},
        "tools": {"type": ["array", "null"], "maxItems": crate::fields::MAX_TOOLS, "items": {"type": "object"}},
        "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}, {"type": "null"}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "functions": {"type": ["array", "null"], "items": {"type": "object"}},
        "function_call": {"oneOf": [{"enum": ["auto", "none"]}, {"type": "object"}, {"type": "null"}]},
        "modalities": {"type": ["array", "null"], "items": {"const": "text"}},
        "store": {"type": ["boolean", "null"], "const": false},
        "service_tier": {"enum": ["auto", "default", null]},
        "safety_identifier": {"type": ["string", "null"]},
        "prompt_cache_key": {"type": ["string", "null"]},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "chat_template_kwargs": {"type": ["object", "null"], "description": "Extra variables for the chat template (e.g. enable_thinking)"},
        "documents": {"type": ["array", "null"], "items": {"type": "object"}},
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        p[k] = v.clone();
    }
    p
}

/// A query number (a workload the planner refuses is reported in the
/// 200 report, so only the type's range is a 400).
fn u32() -> Value {
    json!({"type": "integer", "minimum": 0, "maximum": u32::MAX})
}

fn op(summary: &str, ok: Value) -> Value {
    let mut responses = errors();
    responses["200"] = ok;
    json!({"summary": summary, "responses": responses})
}

fn json_ok(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"type": "object"}}}})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

/// The document; `auth`: whether this server requires its API key.
pub fn document(auth: bool) -> Value {
    let chat = chat_properties();
    let mut text = sampling_properties();
    text["prompt"] = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}, {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]});
    text["echo"] = json!({"type": ["boolean", "null"], "description": "The prompt before the text; with logprobs, its tokens scored"});
    text["max_tokens"] = json!({"type": ["integer", "null"], "minimum": 0,
        "description": "Absent: up to the model's context. 0 only with echo (not streamed): the prompt alone"});
    text["logprobs"] = json!({"type": ["integer", "null"], "minimum": 0, "maximum": hearth_proto::limits::MAX_TOP_LOGPROBS});
    text["best_of"] = json!({"type": ["integer", "null"], "minimum": 1});
    let stream_ok = json!({"description": "A completion, or with stream=true server-sent events ending in [DONE]",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}});
    let mut chat_op = op("Chat completion", stream_ok.clone());
    chat_op["requestBody"] = body(
        json!({"type": "object", "required": ["model", "messages"], "properties": chat, "additionalProperties": false}),
    );
    let mut responses_op = op(
        "A response (stateless; streamed as typed events)",
        stream_ok.clone(),
    );
    let mut rprops = serde_json::Map::new();
    for f in crate::responses::FIELDS {
        rprops.insert((*f).to_string(), json!({}));
    }
    rprops.insert("model".into(), json!({"type": "string"}));
    rprops.insert(
        "input".into(),
        json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}),
    );
    rprops.insert("instructions".into(), json!({"type": ["string", "null"]}));
    rprops.insert(
        "max_output_tokens".into(),
        json!({"type": ["integer", "null"], "minimum": 1}),
    );
    rprops.insert(
        "temperature".into(),
        json!({"type": ["number", "null"], "minimum": 0, "maximum": 2}),
    );
    rprops.insert(
        "top_p".into(),
        json!({"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1}),
    );
    rprops.insert("stream".into(), json!({"type": ["boolean", "null"]}));
    rprops.insert(
        "tools".into(),
        json!({"type": ["array", "null"], "maxItems": crate::fields::MAX_TOOLS, "items": {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"}, "name": {"type": "string"},
                "description": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"]},
                "strict": {"type": ["boolean", "null"]}}}}),
    );
    rprops.insert(
        "tool_choice".into(),
        json!({"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "null"},
            {"type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"}, "name": {"type": "string"}}}]}),
    );
    rprops.insert(
        "parallel_tool_calls".into(),
        json!({"type": ["boolean", "null"]}),
    );
    rprops.insert(
        "text".into(),
        json!({"type": ["object", "null"], "properties": {
            "format": {"type": ["object", "null"], "required": ["type"], "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "name": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": ["boolean", "null"]}}},
            "verbosity": {"enum": ["medium", null]}}, "additionalProperties": false}),
    );
    rprops.insert(
        "metadata".into(),
        json!({"type": ["object", "null"], "additionalProperties": {"type": "string"}}),
    );
    for k in [
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
    ] {
        rprops.insert(k.into(), json!({"type": ["string", "null"]}));
    }
    rprops.insert("store".into(), json!({"enum": [false, null]}));
    rprops.insert("truncation".into(), json!({"enum": ["disabled", null]}));
    responses_op["requestBody"] = body(
        json!({"type": "object", "required": ["model", "input"], "properties": rprops, "additionalProperties": false}),
    );
    let mut text_op = op("Text completion", stream_ok);
    text_op["requestBody"] = body(
        json!({"type": "object", "required": ["model", "prompt"], "properties": text, "additionalProperties": false}),
    );
    let mut load_op = op(
        "Load a model on every member (202: loading)",
        json_ok("Loading started"),
    );
    load_op["requestBody"] = body(
        json!({"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}}, "additionalProperties": false}),
    );
    load_op["responses"]["202"] = json_ok("Loading started");
    let mut generate_op = op(
        "Hearth's own generation (NDJSON when streaming)",
        json_ok("A summary"),
    );
    generate_op["requestBody"] = body(json!({"type": "object"}));
    let mut model_op = op("One model", json_ok("The model"));
    model_op["parameters"] =
        json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut plan_op = op(
        "The partitioner's plan for the served model",
        json_ok("A plan report"),
    );
    plan_op["parameters"] = json!([
        {"name": "workload", "in": "query", "schema": {"enum": ["inference", "training"]}},
        {"name": "sequences", "in": "query", "schema": u32()},
        {"name": "context", "in": "query", "schema": u32()},
        {"name": "prefill", "in": "query", "schema": u32()},
        {"name": "micro_batch_tokens", "in": "query", "schema": u32()},
        {"name": "micro_batches", "in": "query", "schema": u32()},
        {"name": "schedule", "in": "query", "schema": {"enum": ["1f1b", "gpipe"]}},
        {"name": "recompute", "in": "query", "schema": {"type": "boolean"}},
        {"name": "method", "in": "query", "schema": {"enum": ["lora", "full"]}},
        {"name": "lora_rank", "in": "query", "schema": u32()},
        {"name": "keep_data_home", "in": "query", "schema": {"type": "boolean"}}]);
    let with_id = |mut o: Value| {
        o["parameters"] =
            json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
        o
    };
    let mut upload_op = op("Upload fine-tuning data (JSONL)", json_ok("The file"));
    upload_op["requestBody"] = json!({"required": true, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["fine-tune"]}}}}}});
    upload_op["responses"]["413"] = error_response("Larger than 64 MiB");
    let mut delete_file_op = op("Delete a stored file", json_ok("Deleted"));
    delete_file_op["responses"]["409"] = error_response("A job that has not ended uses it");
    let auto = |t: &str| json!({"oneOf": [{"type": t, "minimum": 0}, {"const": "auto"}]});
    let mut create_job_op = op("Start a fine-tuning job", json_ok("The job"));
    create_job_op["requestBody"] = body(json!({
        "type": "object", "required": ["model", "training_file"],
        "properties": {
            "model": {"type": "string"}, "training_file": {"type": "string"},
            "validation_file": {"type": "string", "description": "A file of held-out examples: the trained model's loss on them is reported when the job ends"},
            "suffix": {"type": "string"}, "seed": {"type": "integer", "minimum": 0},
            "hyperparameters": {"type": "object", "properties": {
                "n_epochs": auto("integer"), "batch_size": auto("integer"),
                "learning_rate_multiplier": auto("number")}},
            "method": {"type": "object"},
            "hearth": {"type": "object", "description": "Hearth's job fields (micro_batches, seq_len, method, schedule, ...)"}}}));
    let open = |summary: &str, ok: Value| {
        let mut o = op(summary, ok);
        o["security"] = json!([]);
        o
    };
    let security = if auth {
        json!([{"bearer": []}])
    } else {
        json!([])
    };
    json!({
        "security": security,
        "openapi": "3.1.0",
        "info": {"title": "Hearth", "version": env!("CARGO_PKG_VERSION"),
                 "description": "OpenAI-compatible API and cluster control of a Hearth node."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}
        },
        "paths": {
            "/v1/models": {"get": op("Models the cluster serves", json_ok("A list"))},
            "/v1/models/{id}": {"get": model_op},
            "/v1/chat/completions": {"post": chat_op},
            "/v1/completions": {"post": text_op},
            "/v1/responses": {"post": responses_op},
            "/api/cluster": {"get": op("Members, profiles, links and placement", json_ok("The cluster view"))},
            "/api/plan": {"get": plan_op},
            "/api/models": {"get": op("Models this node can load, and the one it serves", json_ok("The catalog"))},
            "/api/models/load": {"post": load_op},
            "/api/models/unload": {"post": op("Stop serving the model on every member", json_ok("Unloaded"))},
            "/api/events": {"get": op("Cluster events (server-sent events)", json!({"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}}))},
            "/api/generate": {"post": generate_op},
            "/v1/files": {"post": upload_op, "get": op("Fine-tuning files on this node, newest first", json_ok("A list"))},
            "/v1/files/{id}": {
                "get": with_id(op("A stored file", json_ok("The file"))),
                "delete": with_id(delete_file_op),
            },
            "/v1/files/{id}/content": {"get": with_id(op("A stored file's bytes, as uploaded", json!({
                "description": "The JSONL", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})))},
            "/v1/fine_tuning/jobs": {
                "post": create_job_op,
                "get": op("Fine-tuning jobs of this node, newest first", json_ok("A list")),
            },
            "/v1/fine_tuning/jobs/{id}": {"get": with_id(op("A fine-tuning job", json_ok("The job")))},
            "/v1/fine_tuning/jobs/{id}/events": {"get": with_id(op("A job's events, newest first", json_ok("A list")))},
            "/v1/fine_tuning/jobs/{id}/checkpoints": {"get": with_id(op("A job's epoch checkpoints, newest first", json_ok("A list")))},
            "/v1/fine_tuning/jobs/{id}/cancel": {"post": with_id(op("Cancel a job", json_ok("The job")))},
            "/health": {"get": open("Liveness", json_ok("ok"))},
            "/ready": {"get": open("Readiness: 200 once a model is placed over the cluster, else 503 with the reason", json_ok("ready"))},
            "/metrics": {"get": op("Prometheus metrics", json!({"description": "Text format", "content": {"text/plain": {"schema": {"type": "string"}}}}))},
            "/openapi.json": {"get": op("This document", json_ok("OpenAPI 3.1"))},
        }
    })
}

/// The Ollama listener's operations, as (method, path).
pub const OLLAMA_OPERATIONS: &[(&str, &str)] = &[
    ("get", "/"),
    ("post", "/api/chat"),
    ("post", "/api/generate"),
    ("get", "/api/tags"),
    ("post", "/api/show"),
    ("get", "/api/ps"),
    ("get", "/api/version"),
    ("get", "/openapi.json"),
];

/// The Ollama-compatible API's document (`--ollama ADDR`): Ollama's
/// request fields and options as Hearth honours them; a field or option
/// not listed is a 400 naming it.
pub fn ollama_document(auth: bool) -> Value {
    let err = |d: &str| {
        json!({"description": d, "content": {"application/json": {"schema": {
            "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}})
    };
    let errors = json!({
        "400": err("Invalid JSON, or a field or option Hearth does not honour (named)"),
        "401": err("Missing or wrong API key"),
        "404": err("Unknown model"),
        "413": err("Body too large"),
        "429": err("Too many sequences in flight"),
        "502": err("A stage failed"),
        "503": err("No model placed yet"),
    });
    let op = |summary: &str, ok: Value| {
        let mut responses = errors.clone();
        responses["200"] = ok;
        json!({"summary": summary, "responses": responses})
    };
    // One JSON object, or (streaming, Ollama's default) one per line.
    let ndjson = |d: &str| {
        json!({"description": d, "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/x-ndjson": {"schema": {"type": "string"}}}})
    };
    let options = json!({
        "type": ["object", "null"],
        "description": "Sampling options Hearth honours, and hardware options it accepts and leaves to its own placement (num_ctx, num_thread, num_gpu, num_batch, main_gpu, use_mmap, use_mlock, numa, low_vram). Any other option is a 400 naming it.",
        "properties": {
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            "top_k": {"type": ["integer", "null"], "minimum": 0},
            "num_predict": {"type": ["integer", "null"], "description": "Positive, or -1 / -2: up to the context"},
            "stop": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 4},
            "seed": {"type": ["integer", "null"], "minimum": 0},
            "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "num_ctx": {}, "num_thread": {}, "num_gpu": {}, "num_batch": {}, "main_gpu": {},
            "use_mmap": {}, "use_mlock": {}, "numa": {}, "low_vram": {}
        },
        "additionalProperties": false,
    });
    let format = json!({"description": "\"json\", or a JSON schema the output follows (constrained decoding)",
        "oneOf": [{"enum": ["json", ""]}, {"type": "object"}, {"type": "null"}]});
    let refused = json!({"description": "Refused unless empty"});
    let message = json!({"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object", "required": ["function"], "properties": {
            "function": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "arguments": {"type": "object"}}}}}},
        "tool_name": {"type": "string"},
        "thinking": {"type": "string"},
        "images": {"type": "array", "maxItems": 0}}});
    let common = |extra: Value| {
        let mut p = json!({
            "model": {"type": "string"},
            "format": format,
            "options": options,
            "stream": {"type": ["boolean", "null"], "default": true},
            "keep_alive": {"description": "Accepted: a served model stays until another is asked for"},
            "think": {"type": ["boolean", "null"], "description": "The template's enable_thinking"},
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            p[k] = v.clone();
        }
        p
    };
    let body = |required: Value, props: Value| {
        json!({"required": true, "content": {"application/json": {"schema": {
            "type": "object", "required": required, "properties": props, "additionalProperties": false}}}})
    };
    let mut chat = op(
        "Chat (NDJSON unless stream is false)",
        ndjson("A message, or its pieces"),
    );
    chat["requestBody"] = body(
        json!(["model", "messages"]),
        common(json!({
            "messages": {"type": "array", "items": message},
            "tools": {"type": ["array", "null"], "items": {"type": "object"}},
            "images": refused,
        })),
    );
    let mut generate = op(
        "Generate from a prompt (NDJSON unless stream is false)",
        ndjson("A response, or its pieces"),
    );
    generate["requestBody"] = body(
        json!(["model"]),
        common(json!({
            "prompt": {"type": "string"},
            "system": {"type": "string"},
            "raw": {"type": ["boolean", "null"], "description": "The prompt as is, without the chat template"},
            "images": refused, "suffix": refused, "template": refused, "context": refused,
        })),
    );
    let mut show = op(
        "A served model's details, template and parameters",
        json!({"description": "The model", "content": {"application/json": {"schema": {"type": "object"}}}}),
    );
    show["requestBody"] = body(
        json!([]),
        json!({"model": {"type": "string"}, "name": {"type": "string"}, "verbose": {"enum": [false, null], "description": "Refused when true"}}),
    );
    let json_ok = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"type": "object"}}}});
    let security = if auth {
        json!([{"bearer": []}])
    } else {
        json!([])
    };
    json!({
        "openapi": "3.1.0",
        "security": security,
        "info": {"title": "Hearth (Ollama-compatible API)", "version": env!("CARGO_PKG_VERSION"),
                 "description": format!("The Ollama API {} as Hearth serves it on its --ollama listener.", crate::ollama::OLLAMA_VERSION)},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/": {"get": op("Liveness: \"Ollama is running\"", json!({"description": "Text", "content": {"text/plain": {"schema": {"type": "string"}}}}))},
            "/api/chat": {"post": chat},
            "/api/generate": {"post": generate},
            "/api/tags": {"get": op("Models the cluster can serve", json_ok("A list"))},
            "/api/show": {"post": show},
            "/api/ps": {"get": op("The model being served", json_ok("A list"))},
            "/api/version": {"get": op("The Ollama API version followed", json_ok("The version"))},
            "/openapi.json": {"get": op("This document", json_ok("OpenAPI 3.1"))},
        }
    })
}

pub(crate) async fn serve_ollama(
    axum::extract::State(s): axum::extract::State<crate::AppState>,
) -> Json<Value> {
    Json(ollama_document(s.api_key.is_some()))
}

pub(crate) async fn serve(
    axum::extract::State(s): axum::extract::State<crate::AppState>,
) -> Json<Value> {
    Json(document(s.api_key.is_some()))
}

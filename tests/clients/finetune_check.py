"""(h) A LoRA fine-tune through the official `openai` client: upload a small
JSONL teaching a fact, create the job with client.fine_tuning.jobs.create,
wait for it, then ask the fine-tuned model; the file is listed, read back,
kept while the job runs and deleted after. Prints one JSON object."""

import json
import sys
import time

import openai

base, data_path, question = sys.argv[1], sys.argv[2], sys.argv[3]
# "auto": the job's hyperparameters left to the server.
auto = len(sys.argv) > 4 and sys.argv[4] == "auto"
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=600)

model = client.models.list().data[0].id
before = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    max_tokens=24,
    temperature=0,
)
with open(data_path, "rb") as f:
    uploaded = client.files.create(file=f, purpose="fine-tune")
hyper = {} if auto else {"hyperparameters": {"n_epochs": 6, "batch_size": 8, "learning_rate_multiplier": 5}}
# With "auto": a validation file too (four of the examples, rephrased
# nowhere: the trained model's loss on them is reported).
if auto:
    with open(data_path, "rb") as f:
        held_out = b"".join(f.readlines()[:4])
    valid = client.files.create(file=("valid.jsonl", held_out), purpose="fine-tune")
    hyper["validation_file"] = valid.id
job = client.fine_tuning.jobs.create(
    model=model,
    training_file=uploaded.id,
    suffix="zorbania",
    extra_body={"hearth": {"micro_batches": 2, "seq_len": 256, "checkpoint_every": 3 if not auto else 32}},
    **hyper,
)
# The file is in use until the job ends: deleting it now is a 409.
try:
    client.files.delete(uploaded.id)
    delete_while_running = "deleted"
except openai.ConflictError:
    delete_while_running = "conflict"
start = time.time()
while True:
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    if time.time() - start > 1200:
        break
    time.sleep(2)
events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
checkpoints = [
    {"step": c.step_number, "model": c.fine_tuned_model_checkpoint,
     "train_loss": c.metrics.train_loss if c.metrics else None,
     "path": (c.model_extra or {}).get("hearth", {}).get("path")}
    for c in client.fine_tuning.jobs.checkpoints.list(job.id).data
]
listed = [j.id for j in client.fine_tuning.jobs.list().data]
files_listed = [f.id for f in client.files.list().data]
with open(data_path, "rb") as f:
    content_equal = client.files.content(uploaded.id).read() == f.read()
deleted = client.files.delete(uploaded.id).deleted
files_after = [f.id for f in client.files.list().data]
out = {
    "status": job.status,
    "error": job.error.message if job.error else None,
    "fine_tuned_model": job.fine_tuned_model,
    "listed": job.id in listed,
    "file_id": uploaded.id,
    "file_listed": uploaded.id in files_listed,
    "content_equal": content_equal,
    "delete_while_running": delete_while_running,
    "deleted": deleted and uploaded.id not in files_after,
    "events": [e.message for e in events],
    "losses": [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})],
    "full_valid_loss": [e.data["full_valid_loss"] for e in events if "full_valid_loss" in (e.data or {})],
    "validation_file": job.validation_file,
    "checkpoints": checkpoints,
    "validation_loss": (job.model_extra or {}).get("hearth", {}).get("validation_loss"),
    "stages": (job.model_extra or {}).get("hearth", {}).get("stages", []),
    "before": before.choices[0].message.content,
    "hyperparameters": job.hyperparameters.model_dump() if job.hyperparameters else None,
    "total_steps": (job.model_extra or {}).get("hearth", {}).get("total_steps"),
}
if job.status == "succeeded":
    after = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": question}],
        max_tokens=24,
        temperature=0,
    )
    out["after"] = after.choices[0].message.content
    out["after_model"] = after.model
    # The base model, asked again once the fine-tune is served: both are
    # served side by side (the fine-tune as an adapter), so it answers as
    # it did before.
    again = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=24,
        temperature=0,
    )
    out["base_again"] = again.choices[0].message.content
    out["base_again_model"] = again.model
    # Each kept checkpoint is a model too (the last one holds the final
    # weights, the first the first epoch's).
    out["checkpoint_answers"] = {}
    for c in checkpoints:
        r = client.chat.completions.create(
            model=c["model"],
            messages=[{"role": "user", "content": question}],
            max_tokens=24,
            temperature=0,
        )
        out["checkpoint_answers"][str(c["step"])] = [r.model, r.choices[0].message.content]
    out["models"] = [m.id for m in client.models.list().data]
print(json.dumps(out))

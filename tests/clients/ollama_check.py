"""Drives Hearth's Ollama-compatible API with the `ollama` Python client.

Usage: ollama_check.py HOST
Prints one JSON object with what each call returned; the Rust test
(tests/tests/clients.rs) checks it.
"""
import json
import sys

from ollama import Client, ResponseError
from pydantic import BaseModel, Field

client = Client(host=sys.argv[1], timeout=120)

models = [m.model for m in client.list().models]
model = models[0]
options = {"temperature": 0, "num_predict": 12}
messages = [{"role": "user", "content": "Name three colors."}]

whole = client.chat(model=model, messages=messages, options=options)
pieces = [p.message.content for p in client.chat(model=model, messages=messages, options=options, stream=True)]


class Color(BaseModel):
    name: str = Field(max_length=20)
    warm: bool


structured = client.chat(
    model=model,
    messages=[{"role": "user", "content": "Describe the color red."}],
    format=Color.model_json_schema(),
    options={"temperature": 0, "num_predict": 60},
)
raw = client.generate(model=model, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 6})
shown = client.show(model)
running = [m.model for m in client.ps().models]

try:
    client.chat(model=model, messages=messages, options={"repeat_penalty": 1.2})
    refused = "no error"
except ResponseError as e:
    refused = e.error

print(json.dumps({
    "models": models,
    "chat": whole.message.content,
    "chat_done_reason": whole.done_reason,
    "chat_eval_count": whole.eval_count,
    "stream": "".join(pieces),
    "structured": structured.message.content,
    "raw": raw.response,
    "template": bool(shown.template),
    "running": running,
    "refused": refused,
}))

"""Drives a Hearth node with the official `openai` client.

Usage: openai_check.py BASE_URL PROMPT MAX_TOKENS
Prints one JSON object with what each call returned; the Rust test
(tests/tests/clients.rs) compares it with `hearth generate`.
"""
import json
import sys

import openai
from openai import OpenAI

base, prompt, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = OpenAI(base_url=base + "/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)

models = [m.id for m in client.models.list()]
model = models[0]

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": prompt}],
    temperature=0,
    max_tokens=max_tokens,
)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": prompt}],
    temperature=0,
    max_completion_tokens=max_tokens,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason

completion = client.completions.create(
    model=model, prompt="The capital of France is", temperature=0, max_tokens=8
)

# An unknown model is a NotFoundError in the client, as with OpenAI.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    unknown = "no error"
except openai.NotFoundError as e:
    unknown = e.body.get("code") if isinstance(e.body, dict) else str(e.body)

print(json.dumps({
    "models": models,
    "chat_text": chat.choices[0].message.content,
    "chat_finish": chat.choices[0].finish_reason,
    "chat_usage": chat.usage.model_dump(),
    "stream_text": "".join(pieces),
    "stream_pieces": len(pieces),
    "stream_usage": usage,
    "stream_finish": finish,
    "completion_text": completion.choices[0].text,
    "unknown_model": unknown,
}))

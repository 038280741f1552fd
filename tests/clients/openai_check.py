"""Drives a Hearth node with the official `openai` client.

Usage: openai_check.py BASE_URL PROMPT MAX_TOKENS
Prints one JSON object with what each call returned; the Rust test
(tests/tests/clients.rs) compares it with `hearth generate`.
"""
import json
import sys

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

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


# Structured output as SDKs ask for it: a Pydantic model through
# `parse` (a strict json_schema), sampled, with n = 2.
class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: int = Field(ge=0, le=100)
    capital: bool


parsed = client.chat.completions.parse(
    model=model,
    messages=[{"role": "user", "content": "Describe Paris."}],
    response_format=City,
    temperature=0.7,
    seed=3,
    n=2,
    max_tokens=120,
)
parsed_out = [
    {"finish": c.finish_reason, "parsed": c.message.parsed.model_dump() if c.message.parsed else None}
    for c in parsed.choices
]

# A forced tool call, and the conversation continued with its result.
tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}]
called = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
    tools=tools,
    tool_choice="required",
    temperature=0,
    max_tokens=80,
)
msg = called.choices[0].message
calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in (msg.tool_calls or [])]
followup = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "What is the weather in Oslo?"},
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "12 degrees, rain"} if msg.tool_calls else {"role": "user", "content": "ok"},
    ],
    tools=tools,
    temperature=0,
    max_tokens=8,
)

# Log-probabilities.
lp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": prompt}],
    temperature=0,
    max_tokens=6,
    logprobs=True,
    top_logprobs=3,
)
lp_content = lp.choices[0].logprobs.content

# A field Hearth would not honour is a 400 naming it.
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
        extra_body={"repetition_penalty": 1.3},
    )
    refused = "no error"
except openai.BadRequestError as e:
    refused = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

# Structured output on 20 different prompts: a valid object each time.
class Answer(BaseModel):
    topic: str = Field(max_length=40)
    sentiment: str = Field(pattern="^(positive|negative|neutral)$")
    score: int = Field(ge=1, le=10)


topics = [
    "the weather today", "a new phone", "a broken bicycle", "winning a prize", "a long queue",
    "a good book", "a rainy holiday", "fresh bread", "a traffic jam", "a kind neighbour",
    "a lost wallet", "a sunny beach", "a noisy party", "a cold coffee", "a surprise gift",
    "a missed train", "a tasty soup", "a quiet library", "a flat tyre", "a warm fireplace",
]
parsed20 = 0
for t in topics:
    r = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": f"Rate how people feel about {t}."}],
        response_format=Answer,
        temperature=0,
        max_tokens=80,
    )
    if r.choices[0].message.parsed is not None:
        parsed20 += 1

# A streamed tool-calling round trip: the call arrives as deltas, its
# result goes back, and the answer streams.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
    tools=tools,
    tool_choice="required",
    temperature=0,
    max_tokens=80,
    stream=True,
)
call_id, call_name, call_args, stream_finish = None, None, "", None
for chunk in stream:
    for c in chunk.choices:
        for tc in (c.delta.tool_calls or []):
            call_id = tc.id or call_id
            if tc.function and tc.function.name:
                call_name = tc.function.name
            if tc.function and tc.function.arguments:
                call_args += tc.function.arguments
        if c.finish_reason:
            stream_finish = c.finish_reason
answer_stream = client.chat.completions.create(
    model=model,
    messages=[
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {"name": call_name, "arguments": call_args}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "12 degrees and raining"},
    ],
    tools=tools,
    temperature=0,
    max_tokens=24,
    stream=True,
)
answer_text = "".join(c.delta.content or "" for ch in answer_stream for c in ch.choices)

# n = 3.
three = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompt}], n=3, temperature=1.0, seed=5, max_tokens=8,
)

# The first token's log-probabilities, for the test to check against the
# model's own logits.
first_lp = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=1,
    logprobs=True, top_logprobs=5,
).choices[0].logprobs.content[0]

# A scored prompt (how evaluation harnesses ask): echo with logprobs and
# max_tokens 0 gives the prompt alone with each token's log-probability.
scored = client.completions.create(
    model=model, prompt="The capital of France is Paris", echo=True, logprobs=1, max_tokens=0,
)

# The Responses API, whole and streamed.
resp = client.responses.create(model=model, instructions="Be brief.", input=prompt, max_output_tokens=16, temperature=0)
events = []
streamed_text = []
with client.responses.stream(model=model, instructions="Be brief.", input=prompt, max_output_tokens=16, temperature=0) as s:
    for ev in s:
        events.append(ev.type)
        if ev.type == "response.output_text.delta":
            streamed_text.append(ev.delta)
    final = s.get_final_response()

print(json.dumps({
    "scored": {
        "text": scored.choices[0].text,
        "tokens": scored.choices[0].logprobs.tokens,
        "token_logprobs": scored.choices[0].logprobs.token_logprobs,
        "prompt_tokens": scored.usage.prompt_tokens,
        "completion_tokens": scored.usage.completion_tokens,
    },
    "responses_text": resp.output_text,
    "responses_status": resp.status,
    "responses_stream_text": "".join(streamed_text),
    "responses_final_text": final.output_text,
    "responses_events": [events[0], events[-1]] if events else [],
    "parsed": parsed_out,
    "parsed20": parsed20,
    "stream_call": {"name": call_name, "arguments": call_args, "finish": stream_finish, "id": call_id},
    "round_trip_answer": answer_text,
    "n3": len(three.choices),
    "n3_indices": sorted(c.index for c in three.choices),
    "first_top": [{"bytes": t.bytes, "logprob": t.logprob} for t in first_lp.top_logprobs],
    "tool_finish": called.choices[0].finish_reason,
    "tool_calls": calls,
    "followup_finish": followup.choices[0].finish_reason,
    "logprobs": [
        {"token": t.token, "logprob": t.logprob, "top": [a.token for a in t.top_logprobs]}
        for t in lp_content
    ],
    "logprob_text": lp.choices[0].message.content,
    "refused_param": refused,
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

#!/usr/bin/env python3
"""llama.cpp side of `hearth-bench vs-llamacpp`: loads the GGUF once, then for
each JSON line on stdin ({"prompt_ids": [...], "decode": N}) times a prefill
and N greedy single-token decode steps and answers one JSON line."""
import json
import sys
import time

from llama_cpp import Llama

path, threads = sys.argv[1], int(sys.argv[2])
llm = Llama(path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
            type_k=0, type_v=0, verbose=False)
print(json.dumps({"ready": True, "llama_cpp_python": __import__("llama_cpp").__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    ids = req["prompt_ids"]
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    toks = []
    t1 = time.perf_counter()
    for _ in range(req["decode"]):
        logits = llm.scores[llm.n_tokens - 1]
        tok = int(logits.argmax())
        toks.append(tok)
        llm.eval([tok])
    decode = time.perf_counter() - t1
    print(json.dumps({"prefill_s": prefill, "decode_s": decode, "tokens": toks}), flush=True)

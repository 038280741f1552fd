#!/usr/bin/env python3
"""Sorts a `perf report` of the train-profile binary into where a training
micro-batch spends its time: matrix products, element-wise work and
reductions, the loss, allocation, threads, autograd bookkeeping.

    perf report -i PERF.data --no-children --sort comm,dso,symbol --stdio -g none \\
        | bench/profile_train.py TITLE TIMING.txt > OUT.md

TIMING.txt is train-profile's own output (its last line, the median time
per micro-batch, is quoted). Categories go by symbol name; samples of
candle's barrier-pool thread (`candle-bp-*`) that are not element-wise
work are its spinning.
"""
import re
import sys

CATEGORIES = [
    ("matrix products (gemm: candle's f32 matmuls, packing included)", r"gemm_|matmul"),
    ("cross-entropy (Hearth's fused op)", r"CrossEntropySum|logsumexp|Logit"),
    (
        "Hearth's fused ops (RMSNorm, gated activation, RoPE, masked softmax, LoRA sum, embedding rows)",
        r"train::fused::",
    ),
    (
        "allocation, zeroing and page faults",
        r"memset|memmove|memcpy|malloc|_int_free|free|page|clear_page|mm_fault|do_anonymous|queued_spin_lock|"
        r"mmap|munmap|brk|alloc|folio|lru|zap_|tlb|unmap|smp_call_function",
    ),
    (
        "element-wise ops and reductions (candle), exp/tanh/...",
        r"cpu_backend|binary_map|unary_map|Map1|Map2|copy_strided|reduce|index_select|where_cond|affine|"
        r"^exp|__ieee754_exp|__expf|expf|tanh|__sin|__cos|__log|logf|powf|sqrt|to_dtype|Cmp|Rope|RmsNorm",
    ),
    ("autograd bookkeeping (graph walk, gradient store)", r"backprop|GradStore|sorted_nodes|HashMap|hash"),
    (
        "threads: spinning, waking, scheduling",
        r"__rust_begin_short_backtrace|schedule|futex|sched_yield|yield|spin_unlock|try_to_wake|"
        r"task_switch|syscall|rayon|crossbeam|Barrier|wait|park|wake",
    ),
]


def main():
    title = sys.argv[1] if len(sys.argv) > 1 else "training micro-batch"
    timing = open(sys.argv[2]).read().strip().splitlines()[-1] if len(sys.argv) > 2 else ""
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["other"] = 0.0
    tops = {name: [] for name in totals}
    line_re = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+(\S+)\s+\[[^\]]+\]\s+(.*?)\s*$")
    for line in sys.stdin:
        m = line_re.match(line)
        if not m:
            continue
        pct, comm, _dso, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        sym = re.sub(r"\s+-\s+-\s*$", "", sym).strip()
        cat = "other"
        if comm.startswith("candle-bp") and "__rust_begin_short_backtrace" in sym:
            cat = "threads: spinning, waking, scheduling"
        else:
            for name, pat in CATEGORIES:
                if re.search(pat, sym):
                    cat = name
                    break
        totals[cat] += pct
        tops[cat].append((pct, sym))
    print(f"### {title}\n")
    if timing:
        print(f"train-profile: {timing}\n")
    print("| where the samples went | share |")
    print("|---|---:|")
    for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {pct:.1f}% |")
    print("\nLargest symbols per category:\n")
    for name, pct in sorted(totals.items(), key=lambda kv: -kv[1]):
        top = sorted(tops[name], reverse=True)[:3]
        if top:
            syms = "; ".join(f"`{s[:70]}` {p:.1f}%" for p, s in top)
            print(f"- {name}: {syms}")
    print()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch side of `hearth-bench train --torch`: the same model (the GGUF's
tensors dequantized to f32 by Hearth and written as HF-named safetensors),
the same micro-batches (token ids, labels, segment ids, positions, exactly
as Hearth's data module cut them), the same method (LoRA with its rank,
alpha and targets on a frozen base, or full fine-tuning: every weight,
norms and the tied embedding included, as Hearth trains them) and the same
optimizer (AdamW over every trained tensor, global norm clipping) as
Hearth's single-node job. Written as a PyTorch user would: plain eager
modules, autograd, no activation checkpointing,
F.scaled_dot_product_attention. A step's time includes the optimizer's
update, as Hearth's does.

Usage: torch_train_step.py DIR STEPS THREADS
DIR holds model.safetensors, config.json, batch.json and train.json.
Prints one JSON line: per-step loss and wall time, tokens per step."""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

directory, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = json.load(open(f"{directory}/config.json"))
train = json.load(open(f"{directory}/train.json"))
FULL = train["method"] == "full"
batches = json.load(open(f"{directory}/batch.json"))
w = load_file(f"{directory}/model.safetensors")

H, KV, HD = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
EPS, THETA = cfg["rms_norm_eps"], cfg["rope_theta"]
PROJ = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}


def tensor(t):
    """A trained weight under full fine-tuning, else a frozen one."""
    return torch.nn.Parameter(t) if FULL and t is not None else t


class Linear(torch.nn.Module):
    """A weight, trained under full fine-tuning; else frozen, with a LoRA
    adapter when its projection is a target."""

    def __init__(self, weight, bias, adapt):
        super().__init__()
        if FULL:
            self.weight = torch.nn.Parameter(weight)
            self.bias = None if bias is None else torch.nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.a = self.b = None
        if adapt and not FULL:
            out_f, in_f = weight.shape
            r = train["rank"]
            self.a = torch.nn.Parameter(torch.randn(r, in_f) / math.sqrt(in_f))
            self.b = torch.nn.Parameter(torch.zeros(out_f, r))
            self.scale = train["alpha"] / r

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.a is not None:
            y = y + F.linear(F.linear(x, self.a), self.b) * self.scale
        return y


def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Layer(torch.nn.Module):
    def __init__(self, i):
        super().__init__()
        p = f"model.layers.{i}."
        self.proj = torch.nn.ModuleDict({
            k: Linear(w[p + v + ".weight"], w.get(p + v + ".bias"), k in train.get("targets", []))
            for k, v in PROJ.items()
        })
        self.n1 = tensor(w[p + "input_layernorm.weight"])
        self.n2 = tensor(w[p + "post_attention_layernorm.weight"])

    def forward(self, x, cos, sin, mask):
        rows, n, _ = x.shape
        h = rms(x, self.n1)
        q = self.proj["q_proj"](h).view(rows, n, H, HD).transpose(1, 2)
        k = self.proj["k_proj"](h).view(rows, n, KV, HD).transpose(1, 2)
        v = self.proj["v_proj"](h).view(rows, n, KV, HD).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj["o_proj"](a.transpose(1, 2).reshape(rows, n, H * HD))
        h = rms(x, self.n2)
        return x + self.proj["down_proj"](F.silu(self.proj["gate_proj"](h)) * self.proj["up_proj"](h))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = tensor(w["model.embed_tokens.weight"])
        # Tied: the head is the embedding's own parameter.
        head = w.get("lm_head.weight")
        self.head = self.embed if head is None else tensor(head)
        self.norm = tensor(w["model.norm.weight"])
        self.layers = torch.nn.ModuleList(Layer(i) for i in range(cfg["num_hidden_layers"]))

    def forward(self, ids, positions, mask):
        inv = 1.0 / (THETA ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
        f = positions[..., None].float() * inv
        emb = torch.cat((f, f), dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return F.linear(rms(x, self.norm), self.head)


model = Model()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=train["learning_rate"], weight_decay=train["weight_decay"],
                        betas=(0.9, 0.999), eps=1e-8)

inputs = []
for b in batches:
    rows, n = b["rows"], b["len"]
    seg = torch.tensor(b["segments"]).view(rows, n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    visible = causal & (seg[:, :, None] == seg[:, None, :])
    mask = torch.zeros(rows, 1, n, n).masked_fill(~visible[:, None], float("-inf"))
    inputs.append((torch.tensor(b["tokens"]).view(rows, n), torch.tensor(b["positions"]).view(rows, n),
                   mask, torch.tensor(b["labels"]).view(-1)))
targets = sum(int((lab != -100).sum()) for *_, lab in inputs)
tokens = sum(ids.numel() for ids, *_ in inputs)

losses, times = [], []
for _ in range(steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for ids, pos, mask, labels in inputs:
        logits = model(ids, pos, mask)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels,
                               ignore_index=-100, reduction="sum") / targets
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
    opt.step()
    times.append(time.perf_counter() - t0)
    losses.append(total)

print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "tokens": tokens, "targets": targets, "loss": losses, "step_s": times,
                  "trainable": sum(p.numel() for p in params)}), flush=True)

"""Plain-numpy GPT-2 reference on a tiny deterministic random model; writes models/goldens/gpt2_tiny.json.

The model (written independently of wgllm's Rust code; tests/model_gpt2.rs builds the same one):
vocab 96, n_positions 64, n_embd 64, n_layer 2, n_head 4 (head_dim 16), n_inner 4*64,
activation gelu_new, layer_norm_epsilon 1e-5, output head tied to wte.

Weights. Tensors are numbered t = 0, 1, ... in the order of TENSORS below (per layer in LAYER
order). Element j (row-major flat index, in the stored HF shape) of tensor t is
    u(t, j) = 2 * hash(t, j) / 2^32 - 1                      (uniform in [-1, 1))
    value   = float32(offset + scale * u(t, j))               (scale, offset per tensor kind)
with hash a 32-bit integer mix (all arithmetic mod 2^32, exact on both sides):
    x = (j * 2654435761 + t * 40503 + 12345) mod 2^32
    x ^= x >> 15;  x = x * 2246822519 mod 2^32;  x ^= x >> 13;  x = x * 3266489917 mod 2^32;  x ^= x >> 16
HF GPT-2 stores Conv1D weights as [in, out] (y = x @ W + b), so c_attn.weight is [64, 192].

Forward (float64 throughout, weights widened from their float32 values):
    h = wte[ids] + wpe[pos0 .. pos0+n]
    per layer: a = LN(h; ln_1); qkv = a @ c_attn.w + c_attn.b; q,k,v = split(qkv, 3) -> 4 heads of 16
               s = q k^T / sqrt(16), causal; h += concat(softmax(s) v) @ attn.c_proj.w + attn.c_proj.b
               a = LN(h; ln_2); h += gelu_new(a @ c_fc.w + c_fc.b) @ mlp.c_proj.w + mlp.c_proj.b
    logits = LN(h; ln_f) @ wte^T
    LN(x) = (x - mean) / sqrt(var + 1e-5) * g + b (biased var); gelu_new(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Run: python models/reference/gpt2_ref.py [--out models/goldens/gpt2_tiny.json] [--dir DIR]
(--dir also writes config.json + model.safetensors there, to check the files the Rust test writes).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

VOCAB, N_POS, D, N_LAYER, N_HEAD = 96, 64, 64, 2, 4
FFN = 4 * D
EPS = 1e-5
PROMPT = [5, 17, 42, 3, 88, 61, 23, 9, 70, 33, 50, 1]
N_NEW = 10

# (name, shape, scale, offset); per-layer names are relative to "h.{i}.".
GLOBAL_FIRST = [("wte.weight", (VOCAB, D), 0.5, 0.0), ("wpe.weight", (N_POS, D), 0.5, 0.0)]
LAYER = [
    ("ln_1.weight", (D,), 0.2, 1.0),
    ("ln_1.bias", (D,), 0.1, 0.0),
    ("attn.c_attn.weight", (D, 3 * D), 0.25, 0.0),
    ("attn.c_attn.bias", (3 * D,), 0.1, 0.0),
    ("attn.c_proj.weight", (D, D), 0.2, 0.0),
    ("attn.c_proj.bias", (D,), 0.05, 0.0),
    ("ln_2.weight", (D,), 0.2, 1.0),
    ("ln_2.bias", (D,), 0.1, 0.0),
    ("mlp.c_fc.weight", (D, FFN), 0.25, 0.0),
    ("mlp.c_fc.bias", (FFN,), 0.1, 0.0),
    ("mlp.c_proj.weight", (FFN, D), 0.4, 0.0),
    ("mlp.c_proj.bias", (D,), 0.05, 0.0),
]
GLOBAL_LAST = [("ln_f.weight", (D,), 0.2, 1.0), ("ln_f.bias", (D,), 0.1, 0.0)]

CONFIG = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": VOCAB,
    "n_positions": N_POS,
    "n_ctx": N_POS,
    "n_embd": D,
    "n_layer": N_LAYER,
    "n_head": N_HEAD,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": EPS,
}

M32 = np.uint64(0xFFFFFFFF)


def tensor_list():
    """[(name, shape, scale, offset)] in tensor-number order."""
    out = list(GLOBAL_FIRST)
    for i in range(N_LAYER):
        out += [(f"h.{i}.{n}", s, sc, off) for n, s, sc, off in LAYER]
    return out + GLOBAL_LAST


def uniform(t: int, n: int) -> np.ndarray:
    j = np.arange(n, dtype=np.uint64)
    x = (j * np.uint64(2654435761) + np.uint64(t * 40503 + 12345)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(2246822519)) & M32
    x ^= x >> np.uint64(13)
    x = (x * np.uint64(3266489917)) & M32
    x ^= x >> np.uint64(16)
    return 2.0 * (x.astype(np.float64) / 4294967296.0) - 1.0


def make_weights() -> dict[str, np.ndarray]:
    """float32 tensors in their HF shapes."""
    w = {}
    for t, (name, shape, scale, offset) in enumerate(tensor_list()):
        n = int(np.prod(shape))
        w[name] = (offset + scale * uniform(t, n)).astype(np.float32).reshape(shape)
    return w


def layer_norm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * g + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def forward(w64: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits [n, vocab] for ids at positions 0..n-1 (full causal recompute)."""
    n, hd = len(ids), D // N_HEAD
    h = w64["wte.weight"][ids] + w64["wpe.weight"][:n]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(N_LAYER):
        p = lambda s: w64[f"h.{i}.{s}"]  # noqa: E731
        a = layer_norm(h, p("ln_1.weight"), p("ln_1.bias"))
        qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
        q, k, v = (qkv[:, c * D:(c + 1) * D].reshape(n, N_HEAD, hd).transpose(1, 0, 2) for c in range(3))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        att = (s / s.sum(-1, keepdims=True)) @ v  # [heads, n, hd]
        att = att.transpose(1, 0, 2).reshape(n, D)
        h = h + att @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
        a = layer_norm(h, p("ln_2.weight"), p("ln_2.bias"))
        h = h + gelu_new(a @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
    return layer_norm(h, w64["ln_f.weight"], w64["ln_f.bias"]) @ w64["wte.weight"].T


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "goldens", "gpt2_tiny.json")))
    ap.add_argument("--dir", help="also write config.json and model.safetensors here")
    args = ap.parse_args()
    w = make_weights()
    if args.dir:
        from safetensors.numpy import save_file

        os.makedirs(args.dir, exist_ok=True)
        save_file(w, os.path.join(args.dir, "model.safetensors"))
        with open(os.path.join(args.dir, "config.json"), "w") as f:
            json.dump(CONFIG, f, indent=1)
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    logits = forward(w64, PROMPT)
    ids, greedy, margins = list(PROMPT), [], []
    for _ in range(N_NEW):
        row = forward(w64, ids)[-1]
        top = int(np.argmax(row))  # ties -> lowest id
        second = np.partition(row, -2)[-2]
        greedy.append(top)
        margins.append(sig6(row[top] - second))
        ids.append(top)
    spread = float(np.std(logits))
    golden = {
        "generator": {
            "script": "models/reference/gpt2_ref.py",
            "numpy": np.__version__,
            "weights": "u(t, j) hash formula in the script's docstring; float64 forward",
        },
        "config": CONFIG,
        # Per-tensor float64 sum of the float32 values (10 significant digits): a check that the
        # Rust test builds bit-identical weights before any logits are compared.
        "weight_sums": {k: float(f"{v.astype(np.float64).sum():.10g}") for k, v in w.items()},
        "prompt": PROMPT,
        "logits": [[sig6(v) for v in row] for row in logits],
        "logits_std": sig6(spread),
        "greedy": greedy,
        "greedy_margins": margins,
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(PROMPT)}x{VOCAB} logits (std {spread:.3f}), "
          f"greedy {greedy}, min margin {min(margins):.4f}")


if __name__ == "__main__":
    main()

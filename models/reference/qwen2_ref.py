"""Plain-numpy Qwen2 reference on a tiny deterministic random model; writes models/goldens/qwen2_tiny.json.

The model (written independently of wgllm's Rust code; tests/model_qwen2.rs builds the same one):
model_type qwen2, vocab 128, hidden 64, 2 layers, 4 attention heads over 2 key/value heads
(head_dim 16, GQA group 2), intermediate 96, rope_theta 10000, rms_norm_eps 1e-6, Q/K/V biases
(Qwen2Attention hard-codes them; no o_proj bias), untied lm_head.

Weights. Tensors are numbered t = 0, 1, ... in the order of tensor_list() below. Element j
(row-major flat index, in the stored HF shape) of tensor t is
    u(t, j) = 2 * hash(t, j) / 2^32 - 1                      (uniform in [-1, 1))
    value   = float32(offset + scale * u(t, j))               (scale, offset per tensor kind)
with hash the 32-bit integer mix of gpt2_ref.py (all arithmetic mod 2^32, exact on both sides):
    x = (j * 2654435761 + t * 40503 + 12345) mod 2^32
    x ^= x >> 15;  x = x * 2246822519 mod 2^32;  x ^= x >> 13;  x = x * 3266489917 mod 2^32;  x ^= x >> 16
nn.Linear weights are stored [out, in] (y = x @ W^T + b), as in real HF checkpoints.

Forward (float64 throughout, weights widened from their float32 values), transformers'
Qwen2ForCausalLM semantics:
    h = embed_tokens[ids]
    per layer: a = rms(h) * input_layernorm
               q = a Wq^T + bq -> [4, n, 16];  k = a Wk^T + bk, v = a Wv^T + bv -> [2, n, 16]
               q, k = q cos + rotate_half(q) sin, same for k   (positions 0..n-1)
                 inv_freq = 10000^(-arange(0, 16, 2) / 16); emb = cat(pos*inv_freq, pos*inv_freq)
                 cos, sin = cos(emb), sin(emb); rotate_half(x) = cat(-x[8:], x[:8])
               k, v = repeat_kv(k, 2), repeat_kv(v, 2)   (query head h reads key/value head h // 2)
               h += concat_heads(softmax(q k^T / sqrt(16) + causal) v) Wo^T
               a = rms(h) * post_attention_layernorm
               h += (silu(a Wg^T) * (a Wu^T)) Wd^T
    logits = (rms(h) * norm) lm_head^T
    rms(x) = x / sqrt(mean(x^2) + 1e-6); silu(x) = x / (1 + exp(-x))

The golden also records how far the logits move under plausible implementation mistakes
(`sensitivity`), so that the test's tolerance can be judged against them.

Run: python models/reference/qwen2_ref.py [--out models/goldens/qwen2_tiny.json] [--dir DIR]
(--dir also writes config.json + model.safetensors there, to check the files the Rust test writes).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

VOCAB, D, N_LAYER, N_HEAD, N_KV, FFN = 128, 64, 2, 4, 2, 96
HD = D // N_HEAD
THETA, EPS = 10000.0, 1e-6
PROMPT = [7, 100, 33, 2, 91, 64, 15, 120, 48, 77]
N_NEW = 8

# (name, shape, scale, offset); per-layer names are relative to "model.layers.{i}.".
GLOBAL_FIRST = [("model.embed_tokens.weight", (VOCAB, D), 0.5, 0.0)]
LAYER = [
    ("input_layernorm.weight", (D,), 0.2, 1.0),
    ("self_attn.q_proj.weight", (N_HEAD * HD, D), 0.25, 0.0),
    ("self_attn.q_proj.bias", (N_HEAD * HD,), 0.5, 0.0),
    ("self_attn.k_proj.weight", (N_KV * HD, D), 0.25, 0.0),
    ("self_attn.k_proj.bias", (N_KV * HD,), 0.5, 0.0),
    ("self_attn.v_proj.weight", (N_KV * HD, D), 0.25, 0.0),
    ("self_attn.v_proj.bias", (N_KV * HD,), 0.5, 0.0),
    ("self_attn.o_proj.weight", (D, N_HEAD * HD), 0.2, 0.0),
    ("post_attention_layernorm.weight", (D,), 0.2, 1.0),
    ("mlp.gate_proj.weight", (FFN, D), 0.25, 0.0),
    ("mlp.up_proj.weight", (FFN, D), 0.25, 0.0),
    ("mlp.down_proj.weight", (D, FFN), 0.2, 0.0),
]
GLOBAL_LAST = [("model.norm.weight", (D,), 0.2, 1.0), ("lm_head.weight", (VOCAB, D), 0.5, 0.0)]

CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": D,
    "intermediate_size": FFN,
    "num_hidden_layers": N_LAYER,
    "num_attention_heads": N_HEAD,
    "num_key_value_heads": N_KV,
    "hidden_act": "silu",
    "max_position_embeddings": 64,
    "rope_theta": THETA,
    "rms_norm_eps": EPS,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "torch_dtype": "float32",
}

M32 = np.uint64(0xFFFFFFFF)


def tensor_list():
    """[(name, shape, scale, offset)] in tensor-number order."""
    out = list(GLOBAL_FIRST)
    for i in range(N_LAYER):
        out += [(f"model.layers.{i}.{n}", s, sc, off) for n, s, sc, off in LAYER]
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


def rms_norm(x, g):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * g


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_interleaved(x):
    """The GPT-J pairing (2i, 2i+1), only for the sensitivity figures."""
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


def rope_tables(n: int, interleaved: bool = False):
    inv_freq = THETA ** (-np.arange(0, HD, 2, dtype=np.float64) / HD)  # [HD/2]
    freqs = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]  # [n, HD/2]
    emb = np.repeat(freqs, 2, axis=-1) if interleaved else np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)  # [n, HD], broadcast over heads


def repeat_kv(x, n_rep: int):
    """[kv_heads, n, hd] -> [kv_heads * n_rep, n, hd], each KV head repeated n_rep times in a row
    (transformers' repeat_kv: expand on a new axis after the head axis, then flatten)."""
    kvh, n, hd = x.shape
    return np.broadcast_to(x[:, None], (kvh, n_rep, n, hd)).reshape(kvh * n_rep, n, hd)


def forward(w64: dict[str, np.ndarray], ids: list[int], mistake: str | None = None) -> np.ndarray:
    """Logits [n, vocab] for ids at positions 0..n-1 (full causal recompute). `mistake` injects
    one plausible bug ("no_qkv_bias", "interleaved_rope", "kv_head_modulo", "tied_head")."""
    n = len(ids)
    h = w64["model.embed_tokens.weight"][ids]
    cos, sin = rope_tables(n, interleaved=mistake == "interleaved_rope")
    rot = rotate_interleaved if mistake == "interleaved_rope" else rotate_half
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(N_LAYER):
        p = lambda s: w64[f"model.layers.{i}.{s}"]  # noqa: E731

        def proj(x, name, heads):
            y = x @ p(f"self_attn.{name}.weight").T
            if mistake != "no_qkv_bias":
                y = y + p(f"self_attn.{name}.bias")
            return y.reshape(n, heads, HD).transpose(1, 0, 2)  # [heads, n, HD]

        a = rms_norm(h, p("input_layernorm.weight"))
        q, k, v = proj(a, "q_proj", N_HEAD), proj(a, "k_proj", N_KV), proj(a, "v_proj", N_KV)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        if mistake == "kv_head_modulo":
            # Query head h reading KV head h % n_kv instead of h // n_rep.
            k, v = np.concatenate([k] * (N_HEAD // N_KV)), np.concatenate([v] * (N_HEAD // N_KV))
        else:
            k, v = repeat_kv(k, N_HEAD // N_KV), repeat_kv(v, N_HEAD // N_KV)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(HD) + mask  # [heads, n, n]
        s = np.exp(s - s.max(-1, keepdims=True))
        att = (s / s.sum(-1, keepdims=True)) @ v  # [heads, n, HD]
        h = h + att.transpose(1, 0, 2).reshape(n, N_HEAD * HD) @ p("self_attn.o_proj.weight").T
        a = rms_norm(h, p("post_attention_layernorm.weight"))
        g = a @ p("mlp.gate_proj.weight").T
        u = a @ p("mlp.up_proj.weight").T
        h = h + (g / (1.0 + np.exp(-g)) * u) @ p("mlp.down_proj.weight").T
    head = w64["model.embed_tokens.weight" if mistake == "tied_head" else "lm_head.weight"]
    return rms_norm(h, w64["model.norm.weight"]) @ head.T


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "goldens", "qwen2_tiny.json")))
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
    mistakes = ["no_qkv_bias", "interleaved_rope", "kv_head_modulo", "tied_head"]
    sensitivity = {m: sig6(np.abs(forward(w64, PROMPT, m) - logits).max()) for m in mistakes}
    golden = {
        "generator": {
            "script": "models/reference/qwen2_ref.py",
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
        # max |logit diff| over the prompt if the forward pass made this mistake.
        "sensitivity": sensitivity,
    }
    with open(args.out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(PROMPT)}x{VOCAB} logits (std {spread:.3f}), "
          f"greedy {greedy}, min margin {min(margins):.4f}, sensitivity {sensitivity}")


if __name__ == "__main__":
    main()

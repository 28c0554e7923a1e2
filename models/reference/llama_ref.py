"""Plain-numpy reference forward pass for LLaMA-architecture GGUF models.

Independent of wgllm's Rust code: the GGUF container is read with the `gguf`
Python package (metadata + raw tensor bytes), and the quantised blocks are
dequantised by the small decoders below (Q4_0, Q4_1, Q8_0, F16, F32), which
follow the ggml block layouts.  `check_dequant()` cross-checks them against
`gguf.quants.dequantize`.

Numerics
--------
* Dequantisation is done exactly as ggml does it, in float32
  (Q4_1: x = d*q + m, Q8_0: x = d*q, with d/m float16 widened to f32).
* The dequantised f32 weights are then widened to float64 and the whole
  forward pass (matmuls, RMSNorm, RoPE, softmax, SwiGLU, output head) runs in
  float64.  So the only deviation from "exact arithmetic on the quantised
  weights" is float64 rounding; a float32 GPU implementation should agree to
  ~1e-3 relative on logits.

Model definition (llama.cpp `LLM_ARCH_LLAMA`, rope type NORM)
-------------------------------------------------------------
  h = token_embd[tokens]
  for each layer:
      x  = rmsnorm(h) * attn_norm
      q  = x @ attn_q.T ; k = x @ attn_k.T ; v = x @ attn_v.T     (no biases)
      q, k = rope_interleaved(q, k, pos)  # pairs (2i, 2i+1) of each head
      causal softmax(q k^T / sqrt(head_dim)) v, GQA: query head h uses
      KV head h // (n_head / n_head_kv)
      h  = h + attn_out @ attn_output.T
      x  = rmsnorm(h) * ffn_norm
      h  = h + (silu(x @ ffn_gate.T) * (x @ ffn_up.T)) @ ffn_down.T
  logits = (rmsnorm(h) * output_norm) @ W_out.T,
  W_out = output.weight if present else token_embd.weight (tied)
  rmsnorm(x) = x / sqrt(mean(x^2) + eps), eps = llama.attention.layer_norm_rms_epsilon

RoPE: GGUF files converted by llama.cpp's convert_hf_to_gguf.py have the rows
of attn_q / attn_k permuted (`LlamaModel.permute`) so that the HF
"rotate-half" RoPE becomes the interleaved ("normal", GPT-J style) form: for
each head and each i in [0, head_dim/2):
      theta_i = pos * freq_base ** (-2 i / n_rot)
      (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos)
n_rot = llama.rope.dimension_count (= head_dim for SmolLM2).  The
`rope_mode="neox"` option (rotate-half: pairs (i, i + n_rot/2)) exists only to
demonstrate that it is the wrong choice for GGUF weights (see README).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

try:
    import gguf
except ImportError as e:  # pragma: no cover
    raise SystemExit("pip install gguf numpy") from e


DEFAULT_MODEL = os.path.join(
    os.environ.get("WGLLM_MODEL_DIR", os.path.expanduser("~/.cache/wgllm")),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)

# ---------------------------------------------------------------------------
# Dequantisation (own implementation of the ggml block formats)
# ---------------------------------------------------------------------------
QK = 32  # block size of Q4_0 / Q4_1 / Q8_0


def _deq_q4_0(raw: np.ndarray) -> np.ndarray:
    b = raw.reshape(-1, 18)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb,1]
    qs = b[:, 2:18]
    lo = (qs & 0x0F).astype(np.float32) - 8.0
    hi = (qs >> 4).astype(np.float32) - 8.0
    return (np.concatenate([lo, hi], axis=1) * d).astype(np.float32)


def _deq_q4_1(raw: np.ndarray) -> np.ndarray:
    # block: f16 d, f16 m, 16 bytes; element j = low nibble of byte j,
    # element j+16 = high nibble of byte j; x = d*q + m
    b = raw.reshape(-1, 20)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).astype(np.float32)


def _deq_q8_0(raw: np.ndarray) -> np.ndarray:
    # block: f16 d, 32 x int8; x = d*q
    b = raw.reshape(-1, 34)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = b[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (d * q).astype(np.float32)


def dequantize_tensor(t) -> np.ndarray:
    """ReaderTensor -> float32 array of shape [ne1, ne0] (rows = output dim)."""
    ne = [int(x) for x in t.shape]  # ggml order: ne0 (contiguous) first
    shape = tuple(reversed(ne))
    ty = t.tensor_type
    T = gguf.GGMLQuantizationType
    if ty == T.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if ty == T.F16:
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    raw = np.asarray(t.data, dtype=np.uint8).reshape(-1)
    if ty == T.Q4_0:
        out = _deq_q4_0(raw)
    elif ty == T.Q4_1:
        out = _deq_q4_1(raw)
    elif ty == T.Q8_0:
        out = _deq_q8_0(raw)
    else:
        raise NotImplementedError(f"{t.name}: tensor type {ty.name}")
    return out.reshape(shape)


def check_dequant(path: str = DEFAULT_MODEL) -> int:
    """Cross-check own decoders against gguf.quants.dequantize; returns #tensors checked."""
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    n = 0
    for t in r.tensors:
        a = dequantize_tensor(t)
        b = dequantize(t.data, t.tensor_type).reshape(a.shape)
        if not np.array_equal(a, b):
            raise AssertionError(f"dequant mismatch in {t.name} ({t.tensor_type.name})")
        n += 1
    return n


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
@dataclass
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_rot: int
    rope_base: float
    eps: float
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


class LlamaRef:
    def __init__(self, path: str = DEFAULT_MODEL, rope_mode: str = "norm"):
        assert rope_mode in ("norm", "neox")
        self.path = path
        self.rope_mode = rope_mode
        r = gguf.GGUFReader(path)
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise ValueError(f"expected llama architecture, got {arch}")
        n_embd = int(_field(r, "llama.embedding_length"))
        n_head = int(_field(r, "llama.attention.head_count"))
        self.cfg = LlamaConfig(
            n_layer=int(_field(r, "llama.block_count")),
            n_embd=n_embd,
            n_ff=int(_field(r, "llama.feed_forward_length")),
            n_head=n_head,
            n_head_kv=int(_field(r, "llama.attention.head_count_kv", n_head)),
            n_rot=int(_field(r, "llama.rope.dimension_count", n_embd // n_head)),
            rope_base=float(_field(r, "llama.rope.freq_base", 10000.0)),
            eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon")),
            vocab=0,
        )
        w = {t.name: dequantize_tensor(t).astype(np.float64) for t in r.tensors}
        self.tensor_types = {t.name: t.tensor_type.name for t in r.tensors}
        self.tok_embd = w["token_embd.weight"]  # [vocab, n_embd]
        self.cfg.vocab = self.tok_embd.shape[0]
        self.out_norm = w["output_norm.weight"]
        self.tied_output = "output.weight" not in w
        self.output = self.tok_embd if self.tied_output else w["output.weight"]
        self.layers = []
        for i in range(self.cfg.n_layer):
            p = f"blk.{i}."
            self.layers.append(
                {k: w[p + k + ".weight"] for k in (
                    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            )

    # -- building blocks ----------------------------------------------------
    def _rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.eps) * w

    def _rope(self, x, pos):
        """x: [n_tok, n_heads, head_dim]; pos: [n_tok] absolute positions."""
        c = self.cfg
        n_rot = c.n_rot
        half = n_rot // 2
        inv = c.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / n_rot)
        ang = pos.astype(np.float64)[:, None] * inv[None, :]  # [n_tok, half]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        out = x.copy()
        if self.rope_mode == "norm":  # interleaved pairs (2i, 2i+1)
            a = x[..., 0:n_rot:2]
            b = x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = a * cos - b * sin
            out[..., 1:n_rot:2] = a * sin + b * cos
        else:  # neox / rotate-half: pairs (i, i+half)
            a = x[..., :half]
            b = x[..., half:n_rot]
            out[..., :half] = a * cos - b * sin
            out[..., half:n_rot] = a * sin + b * cos
        return out

    # -- forward --------------------------------------------------------------
    def hidden(self, tokens) -> np.ndarray:
        """Final normed hidden states [n_tok, n_embd] (float64)."""
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[0]
        hd = c.head_dim
        group = c.n_head // c.n_head_kv
        pos = np.arange(n)
        mask = np.triu(np.full((n, n), -np.inf), k=1)  # causal
        scale = 1.0 / math.sqrt(hd)
        h = self.tok_embd[tokens].copy()
        for L in self.layers:
            x = self._rmsnorm(h, L["attn_norm"])
            q = (x @ L["attn_q"].T).reshape(n, c.n_head, hd)
            k = (x @ L["attn_k"].T).reshape(n, c.n_head_kv, hd)
            v = (x @ L["attn_v"].T).reshape(n, c.n_head_kv, hd)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            kh = np.repeat(k, group, axis=1)  # head hq -> kv head hq // group
            vh = np.repeat(v, group, axis=1)
            s = np.einsum("qhd,khd->hqk", q, kh) * scale + mask
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", p, vh).reshape(n, c.n_embd)
            h = h + o @ L["attn_output"].T
            x = self._rmsnorm(h, L["ffn_norm"])
            g = x @ L["ffn_gate"].T
            u = x @ L["ffn_up"].T
            h = h + ((g / (1.0 + np.exp(-g))) * u) @ L["ffn_down"].T
        return self._rmsnorm(h, self.out_norm)

    def logits(self, tokens) -> np.ndarray:
        """[n_tokens, vocab] float64 logits for every position."""
        return self.hidden(tokens) @ self.output.T

    def last_logits(self, tokens) -> np.ndarray:
        return self.hidden(tokens)[-1] @ self.output.T

    def greedy(self, tokens, n_new: int, stop_ids=()):
        """Greedy decoding (argmax; ties -> lowest id, i.e. np.argmax).

        Recomputes the full prefix each step (no KV cache), so it is
        independent of any cache logic.  Returns (new_ids, margins) where
        margins[i] = top1 - top2 logit at step i (small margins flag near-ties).
        """
        toks = list(tokens)
        new, margins = [], []
        for _ in range(n_new):
            lg = self.last_logits(toks)
            nxt = int(np.argmax(lg))
            top2 = np.partition(lg, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
            new.append(nxt)
            toks.append(nxt)
            if nxt in stop_ids:
                break
        return new, margins

    def perplexity(self, tokens, n_ctx: int, bos_id=None):
        """llama.cpp `llama-perplexity` (perplexity(), default path) definition.

        * n_chunk = len(tokens) // n_ctx  (trailing remainder is discarded;
          llama.cpp refuses input shorter than 2*n_ctx).
        * chunk i covers tokens[i*n_ctx : (i+1)*n_ctx], evaluated from an
          empty KV cache (positions 0..n_ctx-1).  If bos_id is not None the
          first token of the chunk is *replaced* by BOS (llama.cpp does this
          only when the vocab's add_bos is true; for SmolLM2 it is false).
        * first = n_ctx // 2; scored positions j = first .. n_ctx-2, the logits
          at j predicting chunk token j+1: n_ctx - 1 - first tokens per chunk.
        * nll_j = -(logit[t] - max - log(sum(exp(logit - max))))
        * PPL = exp(sum of all nll / total scored count).
        Returns dict(ppl, mean_nll, chunk_mean_nll, running_ppl, n_chunk,
        scored_per_chunk, n_tokens).
        """
        tokens = list(tokens)
        n_chunk = len(tokens) // n_ctx
        first = n_ctx // 2
        tot, cnt = 0.0, 0
        chunk_nll, running = [], []
        for i in range(n_chunk):
            ch = tokens[i * n_ctx:(i + 1) * n_ctx]
            if bos_id is not None:
                ch[0] = bos_id
            lg = self.logits(ch)
            s = 0.0
            for j in range(first, n_ctx - 1):
                row = lg[j]
                mx = row.max()
                lse = mx + math.log(np.exp(row - mx).sum())
                s += lse - row[ch[j + 1]]
            m = n_ctx - 1 - first
            chunk_nll.append(s / m)
            tot += s
            cnt += m
            running.append(math.exp(tot / cnt))
        return {
            "ppl": math.exp(tot / cnt),
            "mean_nll": tot / cnt,
            "chunk_mean_nll": chunk_nll,
            "running_ppl": running,
            "n_chunk": n_chunk,
            "scored_per_chunk": n_ctx - 1 - first,
            "n_tokens": len(tokens),
        }

    def strided_perplexity(self, tokens, n_ctx: int, stride=None):
        """Every token after the first scored exactly once, with up to n_ctx tokens of context
        (Hugging Face's fixed-length / strided evaluation; wgllm's `--ppl-stride`).

        * stride None: one window, tokens[0:n] (needs n <= n_ctx): every position j < n-1
          scores token j+1.
        * else windows begin at 0, stride, 2*stride, ... (stride < n_ctx) and cover
          tokens[begin : min(begin+n_ctx, n)], each from an empty KV cache; a window scores the
          tokens past the previous window's end (the first window all of its own after its first
          token), so a scored token has between n_ctx-stride and n_ctx-1 tokens of context, except
          in the first window. The last window is the one that reaches the end.
        Returns dict(ppl, mean_nll, window_mean_nll, window_scored, n_tokens, scored).
        """
        tokens = list(tokens)
        n = len(tokens)
        if stride is None:
            assert n <= n_ctx
            stride = n_ctx
        tot, cnt, prev_end, begin = 0.0, 0, 0, 0
        win_nll, win_scored = [], []
        while True:
            end = min(begin + n_ctx, n)
            lg = self.logits(tokens[begin:end])
            s, c = 0.0, 0
            for p in range(max(prev_end, begin + 1), end):
                row = lg[p - 1 - begin]
                s += logsumexp(row) - float(row[tokens[p]])
                c += 1
            win_nll.append(s / c)
            win_scored.append(c)
            tot += s
            cnt += c
            prev_end = end
            if end == n:
                break
            begin += stride
        return {
            "ppl": math.exp(tot / cnt),
            "mean_nll": tot / cnt,
            "window_mean_nll": win_nll,
            "window_scored": win_scored,
            "n_tokens": n,
            "scored": cnt,
        }


def logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


if __name__ == "__main__":  # quick smoke test
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tokenizer_ref import smollm2_tokenizer

    tok = smollm2_tokenizer()
    m = LlamaRef()
    ids = tok.encode("The capital of France is").ids
    new, _ = m.greedy(ids, 8)
    print(ids, new, repr(tok.decode(new)))

"""Plain-numpy float64 reference forward pass for Gemma 3 GGUF models (`gemma3`).

Independent of wgllm's Rust code: the GGUF container is read with the `gguf`
Python package and every tensor is dequantised by `gguf.quants.dequantize`
(Q4_K, Q5_0, Q6_K, Q8_0, F32 in gemma-3-270m-q4_k_m.gguf), widened to float64;
the whole forward pass then runs in float64.

Model definition (llama.cpp `LLM_ARCH_GEMMA3` / transformers `Gemma3ForCausalLM`)
--------------------------------------------------------------------------------
  h = token_embd[tokens] * sqrt(n_embd)
  for each layer l:
      x = rmsnorm(h) * attn_norm
      q = x Wq^T -> [n_head, 256];  k = x Wk^T, v = x Wv^T -> [n_head_kv, 256]
      q = rmsnorm(q per head) * attn_q_norm;  k = rmsnorm(k per head) * attn_k_norm
      q, k = rope_neox(q, k, pos, base_l)     # rotate halves: pairs (i, i+128)
      a = softmax(q k^T * scale + mask_l) v   # query head h reads KV head h // (n_head/n_head_kv)
      h = h + rmsnorm(a Wo^T) * post_attention_norm
      x = rmsnorm(h) * ffn_norm
      h = h + rmsnorm((gelu_tanh(x Wg^T) * (x Wu^T)) Wd^T) * post_ffw_norm
  logits = (rmsnorm(h) * output_norm) token_embd^T          (tied head)
  rmsnorm(x) = x / sqrt(mean(x^2) + eps), eps = gemma3.attention.layer_norm_rms_epsilon

* Layer kinds: llama.cpp `set_swa_pattern(6)`: layer l is a local (sliding
  window) layer unless l % 6 == 5 (global: 5, 11, 17 of 18).  transformers'
  `layer_types` agree (every 6th layer "full_attention").
* Local layers: RoPE base 10000 (llama.cpp `rope_freq_base_train_swa`,
  transformers `rope_local_base_freq`), mask: query at position t sees key
  position p iff 0 <= t - p < sliding_window (gemma3.attention.sliding_window
  = 512; llama.cpp LLAMA_SWA_TYPE_STANDARD masks p1 - p0 >= n_swa,
  transformers' sliding_window_overlay keeps q - kv < sliding_window).
* Global layers: RoPE base gemma3.rope.freq_base (1e6), causal mask, no RoPE
  scaling (the file has no gemma3.rope.scaling.* keys).
* scale = 1/sqrt(gemma3.attention.key_length) = 1/16 (llama.cpp
  f_attention_scale for every size but 27B; transformers
  query_pre_attn_scalar**-0.5 with query_pre_attn_scalar = 256).
* Norm weights: the GGUF converter adds Gemma's +1 to every `*norm.weight`
  (HF computes x * (1 + w)), so they are used as stored.
* RoPE: llama.cpp runs gemma3 with LLAMA_ROPE_TYPE_NEOX and its converter does
  not permute Q/K rows for Gemma, so HF's rotate-half applies to the GGUF rows:
  theta_i = pos * base^(-2i/256), (x[i], x[i+128]) ->
  (x[i] cos - x[i+128] sin, x[i+128] cos + x[i] sin), positions from 0.
* No attention or final logit soft-capping in Gemma 3 (applied here only if
  the file has gemma3.attn_logit_softcapping / final_logit_softcapping).
* gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

try:
    import gguf
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover
    raise SystemExit("pip install gguf numpy") from e

MODEL_DIR = os.environ.get("WGLLM_MODEL_DIR", os.path.expanduser("~/.cache/wgllm"))
DEFAULT_MODEL = os.path.join(MODEL_DIR, "gemma-3-270m-q4_k_m.gguf")
if not os.path.exists(DEFAULT_MODEL) and os.path.exists("/work/models/gemma-3-270m-q4_k_m.gguf"):
    DEFAULT_MODEL = "/work/models/gemma-3-270m-q4_k_m.gguf"

SWA_PATTERN = 6  # llama.cpp hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3
ROPE_BASE_LOCAL = 10000.0  # llama.cpp rope_freq_base_train_swa; HF rope_local_base_freq


@dataclass
class Gemma3Config:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_base_global: float
    rope_base_local: float
    sliding_window: int
    eps: float
    vocab: int
    attn_softcap: float | None
    final_softcap: float | None

    def is_global(self, layer: int) -> bool:
        return layer % SWA_PATTERN == SWA_PATTERN - 1


def _field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.exp(x - m).sum()))


LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
                 "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")


class Gemma3Ref:
    """`logits(tokens)`, `last_logits`, `greedy`, `window_perplexity` on a gemma3 GGUF file.

    `rope_mode="norm"` (interleaved pairs) and `window=None` (no sliding
    window) exist only to show how much the goldens move under those mistakes.
    """

    def __init__(self, path: str = DEFAULT_MODEL, rope_mode: str = "neox", sliding: bool = True):
        assert rope_mode in ("neox", "norm")
        self.path = path
        self.rope_mode = rope_mode
        self.sliding = sliding
        r = gguf.GGUFReader(path)
        arch = _field(r, "general.architecture")
        if arch != "gemma3":
            raise ValueError(f"expected gemma3 architecture, got {arch}")
        a = "gemma3."
        n_embd = int(_field(r, a + "embedding_length"))
        n_head = int(_field(r, a + "attention.head_count"))
        for k in ("rope.scaling.type", "rope.scaling.factor"):
            if _field(r, a + k) is not None:
                raise NotImplementedError(f"{a + k} is set; this reference has no RoPE scaling")
        self.cfg = Gemma3Config(
            n_layer=int(_field(r, a + "block_count")),
            n_embd=n_embd,
            n_ff=int(_field(r, a + "feed_forward_length")),
            n_head=n_head,
            n_head_kv=int(_field(r, a + "attention.head_count_kv", n_head)),
            head_dim=int(_field(r, a + "attention.key_length", n_embd // n_head)),
            rope_base_global=float(_field(r, a + "rope.freq_base", 1e6)),
            rope_base_local=ROPE_BASE_LOCAL,
            sliding_window=int(_field(r, a + "attention.sliding_window")),
            eps=float(_field(r, a + "attention.layer_norm_rms_epsilon")),
            vocab=0,
            attn_softcap=_field(r, a + "attn_logit_softcapping"),
            final_softcap=_field(r, a + "final_logit_softcapping"),
        )
        assert int(_field(r, a + "attention.value_length", self.cfg.head_dim)) == self.cfg.head_dim
        self.tensor_types = {t.name: t.tensor_type.name for t in r.tensors}
        w = {}
        for t in r.tensors:
            shape = tuple(int(x) for x in reversed(list(t.shape)))  # [rows, ne0]
            w[t.name] = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float64)
        self.tok_embd = w.pop("token_embd.weight")  # [vocab, n_embd]
        self.cfg.vocab = self.tok_embd.shape[0]
        self.out_norm = w.pop("output_norm.weight")
        self.tied_output = "output.weight" not in w
        self.output = self.tok_embd if self.tied_output else w.pop("output.weight")
        self.layers = []
        for i in range(self.cfg.n_layer):
            self.layers.append({k: w.pop(f"blk.{i}.{k}.weight") for k in LAYER_TENSORS})
        assert not w, f"unused tensors: {sorted(w)}"

    # -- building blocks ----------------------------------------------------
    def _rmsnorm(self, x, wt):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.cfg.eps) * wt

    def _rope(self, x, pos, base):
        """x: [n_tok, n_heads, head_dim]; pos: [n_tok] absolute positions."""
        d = self.cfg.head_dim
        half = d // 2
        inv = base ** (-np.arange(half, dtype=np.float64) * 2.0 / d)
        ang = pos.astype(np.float64)[:, None] * inv[None, :]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        out = np.empty_like(x)
        if self.rope_mode == "neox":  # rotate halves: pairs (i, i + half)
            a, b = x[..., :half], x[..., half:]
            out[..., :half] = a * cos - b * sin
            out[..., half:] = b * cos + a * sin
        else:  # interleaved pairs (2i, 2i+1): the wrong choice for this file
            a, b = x[..., 0::2], x[..., 1::2]
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = a * sin + b * cos
        return out

    def _mask(self, qpos, kpos, is_global):
        diff = qpos[:, None] - kpos[None, :]
        ok = diff >= 0
        if not is_global and self.sliding:
            ok &= diff < self.cfg.sliding_window
        return np.where(ok, 0.0, -np.inf)

    # -- forward --------------------------------------------------------------
    def new_cache(self):
        """Per-layer (K after norm+RoPE, V) of the positions seen so far."""
        return [None] * self.cfg.n_layer

    def hidden(self, tokens, cache=None, trace=None) -> np.ndarray:
        """Final normed hidden states [n_tok, n_embd] (float64) of `tokens`.

        With a cache (from `new_cache()`), `tokens` continue the positions the
        cache holds and the cache is extended in place; without, positions start
        at 0.  The cache keeps every position (the window is applied by the
        mask), so it is independent of any ring-buffer logic.  A list passed as
        `trace` receives the residual stream h after the embedding and after each
        layer ([n_tok, n_embd] each), for locating where a port diverges.
        """
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64)
        n = tokens.shape[0]
        hd = c.head_dim
        group = c.n_head // c.n_head_kv
        past = 0 if cache is None or cache[0] is None else cache[0][0].shape[0]
        pos = np.arange(past, past + n)
        scale = 1.0 / math.sqrt(hd)
        h = self.tok_embd[tokens] * math.sqrt(c.n_embd)
        if trace is not None:
            trace.append(h.copy())
        for li, L in enumerate(self.layers):
            glob = c.is_global(li)
            base = c.rope_base_global if glob else c.rope_base_local
            x = self._rmsnorm(h, L["attn_norm"])
            q = (x @ L["attn_q"].T).reshape(n, c.n_head, hd)
            k = (x @ L["attn_k"].T).reshape(n, c.n_head_kv, hd)
            v = (x @ L["attn_v"].T).reshape(n, c.n_head_kv, hd)
            q = self._rope(self._rmsnorm(q, L["attn_q_norm"]), pos, base)
            k = self._rope(self._rmsnorm(k, L["attn_k_norm"]), pos, base)
            if cache is not None:
                if cache[li] is not None:
                    k = np.concatenate([cache[li][0], k], axis=0)
                    v = np.concatenate([cache[li][1], v], axis=0)
                cache[li] = (k, v)
            kpos = np.arange(k.shape[0])
            kh = np.repeat(k, group, axis=1)  # query head hq -> kv head hq // group
            vh = np.repeat(v, group, axis=1)
            s = np.einsum("qhd,khd->hqk", q, kh) * scale
            if c.attn_softcap:
                s = np.tanh(s / c.attn_softcap) * c.attn_softcap
            s = s + self._mask(pos, kpos, glob)[None]
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", p, vh).reshape(n, c.n_head * hd)
            h = h + self._rmsnorm(o @ L["attn_output"].T, L["post_attention_norm"])
            x = self._rmsnorm(h, L["ffn_norm"])
            f = (gelu_tanh(x @ L["ffn_gate"].T) * (x @ L["ffn_up"].T)) @ L["ffn_down"].T
            h = h + self._rmsnorm(f, L["post_ffw_norm"])
            if trace is not None:
                trace.append(h.copy())
        return self._rmsnorm(h, self.out_norm)

    def head(self, hid: np.ndarray) -> np.ndarray:
        lg = hid @ self.output.T
        if self.cfg.final_softcap:
            lg = np.tanh(lg / self.cfg.final_softcap) * self.cfg.final_softcap
        return lg

    def logits(self, tokens) -> np.ndarray:
        """[n_tokens, vocab] float64 logits for every position (8 GB at 4k tokens: mind the size)."""
        return self.head(self.hidden(tokens))

    def last_logits(self, tokens) -> np.ndarray:
        return self.head(self.hidden(tokens)[-1:])[0]

    def greedy(self, tokens, n_new: int, stop_ids=()):
        """Greedy decoding (argmax; ties -> lowest id, i.e. np.argmax), with a KV cache.

        Returns (new_ids, margins), margins[i] = top1 - top2 logit at step i.
        `check_greedy` recomputes the whole sequence without a cache.
        """
        cache = self.new_cache()
        lg = self.head(self.hidden(list(tokens), cache)[-1:])[0]
        new, margins = [], []
        for step in range(n_new):
            nxt = int(np.argmax(lg))
            top2 = np.partition(lg, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
            new.append(nxt)
            if nxt in stop_ids or step == n_new - 1:
                break
            lg = self.head(self.hidden([nxt], cache))[0]
        return new, margins

    def check_greedy(self, tokens, new) -> None:
        """One cache-free pass over prompt+new: each new token must be that position's argmax."""
        seq = list(tokens) + list(new)
        hid = self.hidden(seq[:-1])[len(tokens) - 1:]
        am = [int(np.argmax(row)) for row in self.head(hid)]
        if am != list(new):
            raise AssertionError(f"cached greedy {list(new)} != cache-free argmax {am}")

    def window_perplexity(self, tokens, block: int = 128):
        """One window over all of `tokens` from position 0: the logits at position j score
        token j+1, for every j < n-1 (every token after the first scored once).

        Returns dict(ppl, nll_mean, nll_sum, scored, nll (per scored token)).
        """
        tokens = list(tokens)
        hid = self.hidden(tokens)
        nll = []
        for b in range(0, len(tokens) - 1, block):  # the head in blocks: [n, 262144] f64 is big
            lg = self.head(hid[b:min(b + block, len(tokens) - 1)])
            for i, row in enumerate(lg):
                nll.append(logsumexp(row) - float(row[tokens[b + i + 1]]))
        s = float(np.sum(nll))
        return {"ppl": math.exp(s / len(nll)), "nll_mean": s / len(nll), "nll_sum": s,
                "scored": len(nll), "nll": nll}


if __name__ == "__main__":  # quick smoke test
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tokenizer_ref import gemma3_tokenizer

    tok = gemma3_tokenizer(DEFAULT_MODEL)
    m = Gemma3Ref()
    ids = tok.encode("The capital of France is")
    new, margins = m.greedy(ids, 8)
    print(ids, new, repr(tok.decode(new)), [round(x, 3) for x in margins])

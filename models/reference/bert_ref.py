"""Plain-numpy reference for sentence-transformers all-MiniLM-L6-v2 (BERT encoder).

Weights are read from model.safetensors with safetensors.numpy; all
arithmetic is float64 (weights are f32 on disk, widened).

  e   = word_emb[ids] + pos_emb[0..n-1] + type_emb[token_type_ids (all 0)]
  h   = LayerNorm(e)                                   (eps = config.layer_norm_eps = 1e-12)
  per layer (post-LN BERT):
      q,k,v = h W^T + b   (12 heads x 32)
      s     = q k^T / sqrt(32) + (1 - mask) * -1e30 over keys   (no causal mask)
      a     = softmax(s) v -> concat -> dense
      h     = LayerNorm(h + a)
      f     = GELU(h W_i^T + b_i)   exact: 0.5 x (1 + erf(x / sqrt(2)))
      h     = LayerNorm(h + f W_o^T + b_o)
  pooled = sum_t mask_t h_t / max(sum_t mask_t, 1e-9)             (1_Pooling: mean tokens)
  emb    = pooled / max(||pooled||_2, 1e-12)   if modules.json lists Normalize
The BERT pooler (pooler.dense) is NOT used by sentence-transformers.
LayerNorm(x) = (x - mean) / sqrt(var + eps) * gamma + beta, var = biased (mean of squares).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file

MODEL_DIR = os.path.join(
    os.environ.get("WGLLM_MODEL_DIR", os.path.expanduser("~/.cache/wgllm")), "all-MiniLM-L6-v2"
)

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


class BertRef:
    def __init__(self, model_dir: str = MODEL_DIR):
        self.dir = model_dir
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = json.load(f)
        assert self.cfg.get("hidden_act", "gelu") == "gelu"
        assert self.cfg.get("position_embedding_type", "absolute") == "absolute"
        with open(os.path.join(model_dir, "modules.json")) as f:
            mods = json.load(f)
        types = [m["type"] for m in mods]
        self.normalize = any(t.endswith(".Normalize") for t in types)
        pool_cfg = os.path.join(model_dir, "1_Pooling", "config.json")
        with open(pool_cfg) as f:
            pc = json.load(f)
        assert pc.get("pooling_mode_mean_tokens") and not pc.get("pooling_mode_cls_token") \
            and not pc.get("pooling_mode_max_tokens"), "only mean pooling implemented"
        w = load_file(os.path.join(model_dir, "model.safetensors"))
        self.w = {k: v.astype(np.float64) for k, v in w.items() if v.dtype.kind == "f"}
        self.eps = float(self.cfg["layer_norm_eps"])
        self.n_layer = int(self.cfg["num_hidden_layers"])
        self.n_head = int(self.cfg["num_attention_heads"])
        self.hidden = int(self.cfg["hidden_size"])

    def _ln(self, x, prefix):
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[prefix + ".weight"] + self.w[prefix + ".bias"]

    def _lin(self, x, prefix):
        return x @ self.w[prefix + ".weight"].T + self.w[prefix + ".bias"]

    def token_states(self, ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
        """Last-layer hidden states [n, hidden] for ONE sequence."""
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        mask = np.ones(n) if attention_mask is None else np.asarray(attention_mask, dtype=np.float64)
        tt = np.zeros(n, dtype=np.int64) if token_type_ids is None else np.asarray(token_type_ids)
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][np.arange(n)]
             + w["embeddings.token_type_embeddings.weight"][tt])
        h = self._ln(x, "embeddings.LayerNorm")
        nh = self.n_head
        hd = self.hidden // nh
        key_bias = (1.0 - mask)[None, None, :] * -1e30
        for i in range(self.n_layer):
            p = f"encoder.layer.{i}."
            q = self._lin(h, p + "attention.self.query").reshape(n, nh, hd)
            k = self._lin(h, p + "attention.self.key").reshape(n, nh, hd)
            v = self._lin(h, p + "attention.self.value").reshape(n, nh, hd)
            s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + key_bias
            s = s - s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", pr, v).reshape(n, self.hidden)
            h = self._ln(h + self._lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            f = gelu_erf(self._lin(h, p + "intermediate.dense"))
            h = self._ln(h + self._lin(f, p + "output.dense"), p + "output.LayerNorm")
        return h

    def embed(self, ids, attention_mask=None) -> np.ndarray:
        n = len(ids)
        mask = np.ones(n) if attention_mask is None else np.asarray(attention_mask, dtype=np.float64)
        h = self.token_states(ids, mask)
        pooled = (h * mask[:, None]).sum(axis=0) / max(mask.sum(), 1e-9)
        if self.normalize:
            pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return pooled


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tokenizer_ref import minilm_tokenizer

    tok = minilm_tokenizer()
    m = BertRef()
    es = [m.embed(tok.encode(s).ids) for s in ["A cat sits on the mat.", "A kitten is sitting on a rug.",
                                                "Stock markets fell sharply today."]]
    print("normalize:", m.normalize)
    print([[round(float(a @ b), 4) for b in es] for a in es])

#!/usr/bin/env python3
"""Cross-check gemma3_ref.py and goldens/gemma3_270m.json against Hugging Face transformers.

transformers reads the same GGUF file (`from_pretrained(dir, gguf_file=...)`: gguf-py
dequantisation, norm weights minus 1, its own Gemma3ForCausalLM code: HF rotate-half RoPE,
`layer_types`, sliding-window masks, q/k norms, GeGLU), run here on torch CPU in float64 with
eager attention.  Its tokenizer is transformers' own GGUF -> `tokenizers` conversion.

    pip install torch transformers accelerate sentencepiece protobuf
    python models/reference/gemma3_crosscheck.py            # ~25 min on 2 busy cores, ~6 GB RAM
    python models/reference/gemma3_crosscheck.py --exact    # HF's float32 parts in float64, no greedy

Prints: the HF config's Gemma 3 settings, tokenizer agreement on every golden prompt and text,
greedy agreement token for token, max |logit diff| on the golden's last-token logits (against
the live float64 reference and against the 6-digit golden), and the perplexities.
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import gemma3_ref  # noqa: E402
import tokenizer_ref  # noqa: E402

GOLDEN = os.path.normpath(os.path.join(HERE, "..", "goldens", "gemma3_270m.json"))
TOKENS = os.path.normpath(os.path.join(HERE, "..", "goldens", "gemma3_tokens.json"))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def patch_hf_to_float64() -> None:
    """transformers keeps four pieces of Gemma 3 in float32 whatever the model's dtype: RMSNorm
    (`x.float()`), the RoPE angles (float32 inv_freq and position * inv_freq), the embedding scale
    (a float32 tensor) and the eager attention softmax (`dtype=torch.float32`).  `--exact` recomputes
    them in float64, so that what is left between the two
    implementations is float64 rounding only."""
    from transformers.models.gemma3 import modeling_gemma3 as mg

    def norm_forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * (1.0 + self.weight.to(x.dtype))

    def rope_forward(self, x, position_ids, layer_type):
        base = self.config.rope_parameters[layer_type]["rope_theta"]
        dim = self.config.head_dim
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def emb_forward(self, input_ids):
        return torch.nn.Embedding.forward(self, input_ids) * self.scalar_embed_scale

    softmax = torch.nn.functional.softmax

    def softmax_keep_f64(x, dim=None, dtype=None, **kw):  # eager attention asks for float32
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype, **kw)

    mg.nn.functional.softmax = softmax_keep_f64
    mg.Gemma3RMSNorm.forward = norm_forward
    mg.Gemma3RotaryEmbedding.forward = rope_forward
    mg.Gemma3TextScaledWordEmbedding.forward = emb_forward


def main() -> None:
    torch.set_num_threads(2)
    exact = "--exact" in sys.argv
    if exact:
        patch_hf_to_float64()
        print("--exact: HF's float32 RMSNorm, RoPE angles, embedding scale and softmax in float64; "
              "greedy skipped")
    path = tokenizer_ref.GEMMA3_GGUF
    d, f = os.path.dirname(path), os.path.basename(path)
    g = json.load(open(GOLDEN, encoding="utf-8"))

    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    hf = hf.double().eval()
    cfg = hf.config
    print("HF config:", {k: getattr(cfg, k, None) for k in (
        "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "intermediate_size", "rms_norm_eps", "sliding_window", "query_pre_attn_scalar",
        "rope_theta", "rope_local_base_freq", "rope_parameters", "rope_scaling", "final_logit_softcapping",
        "attn_logit_softcapping", "hidden_activation", "tie_word_embeddings")})
    print("HF layer_types:", getattr(cfg, "layer_types", None))

    # -- tokenizer -------------------------------------------------------------
    try:
        htok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    except Exception as e:  # noqa: BLE001 (report and go on: the model check does not need it)
        htok = None
        print("HF tokenizer from GGUF failed:", repr(e))
    if htok is not None:
        same = 0
        for e in g["greedy"]:
            ids = htok(e["prompt"], add_special_tokens=not e["chat"])["input_ids"]
            ok = ids == e["prompt_ids"]
            same += ok
            if not ok:
                print(f"  tokenizer differs on {e['name']}: HF {ids} vs golden {e['prompt_ids']}")
        for p in g["perplexity"]:
            text = open(os.path.join(ROOT, p["text_file"]), encoding="utf-8").read()
            text = text[:-1] if text.endswith("\n") else text
            ids = htok(text)["input_ids"]
            ok = ids == p["ids"]
            same += ok
            if not ok:
                k = next((i for i, (a, b) in enumerate(zip(ids, p["ids"])) if a != b), min(len(ids), len(p["ids"])))
                print(f"  tokenizer differs on {p['name']} at {k}: HF {ids[k:k + 5]} vs golden {p['ids'][k:k + 5]}")
        print(f"tokenizer: HF's GGUF tokenizer equals the golden ids on {same} of "
              f"{len(g['greedy']) + len(g['perplexity'])} inputs")
        cases = json.load(open(TOKENS, encoding="utf-8"))["cases"]
        same = 0
        for c in cases:
            kw = {"split_special_tokens": True} if c.get("parse_special") is False else {}
            ids = htok(c["text"], add_special_tokens=c["add_bos"], **kw)["input_ids"]
            same += ids == c["ids"]
            if ids != c["ids"]:
                print(f"  tokenizer differs on {c['text']!r}: HF {htok.convert_ids_to_tokens(ids)} vs "
                      f"{c['pieces']}")
        print(f"tokenizer: HF's GGUF tokenizer equals gemma3_tokens.json on {same} of {len(cases)} cases")

    def hf_logits(ids, last_only=False):
        with torch.no_grad():
            kw = {"logits_to_keep": 1} if last_only else {}
            return hf(torch.tensor([ids]), **kw).logits[0].double().numpy()

    # -- greedy (full recompute each step, no cache) -----------------------------
    n_same = 0
    for e in ([] if exact else g["greedy"]):
        seq = list(e["prompt_ids"])
        for _ in range(e["n_new"]):
            seq.append(int(np.argmax(hf_logits(seq, last_only=True)[-1])))
        new = seq[len(e["prompt_ids"]):]
        ok = new == e["new_ids"]
        n_same += ok
        print(f"greedy {e['name']}: {'equal' if ok else 'DIFFERENT'}" + ("" if ok else f" HF {new} vs {e['new_ids']}"))
    if not exact:
        print(f"greedy: {n_same} of {len(g['greedy'])} continuations equal token for token")

    # -- logits ------------------------------------------------------------------
    ref = gemma3_ref.Gemma3Ref(path)
    for e in g["logits"]:
        h = hf_logits(e["prompt_ids"])[-1]
        r = ref.last_logits(e["prompt_ids"])
        gold_ids = [i for i, _ in e["top"] + e["sample"]]
        gold = np.array([v for _, v in e["top"] + e["sample"]])
        print(f"logits {e['name']}: max|HF-ref| over the vocab {np.abs(h - r).max():.3g} "
              f"(max|logit| {np.abs(r).max():.3f}); max|HF-golden| on its {len(gold_ids)} entries "
              f"{np.abs(h[gold_ids] - gold).max():.3g}; HF argmax {int(np.argmax(h))}, ref {int(np.argmax(r))}")

    # -- perplexity (and the long text's logits at every position) ---------------
    for p in g["perplexity"]:
        ids = p["ids"]
        h = hf_logits(ids)
        nll = [float(torch.logsumexp(torch.from_numpy(h[j]), 0)) - h[j][ids[j + 1]] for j in range(len(ids) - 1)]
        ppl = math.exp(sum(nll) / len(nll))
        hid = ref.hidden(ids)
        worst = 0.0
        for b in range(0, len(ids), 128):
            worst = max(worst, float(np.abs(ref.head(hid[b:b + 128]) - h[b:b + 128]).max()))
        print(f"perplexity {p['name']} ({len(ids)} tokens): HF {ppl:.6g} vs golden {p['ppl']} "
              f"(rel {abs(ppl / p['ppl'] - 1):.2g}); max|HF-ref| over all {len(ids)} positions x vocab {worst:.3g}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerate every golden file in models/goldens/ from the numpy references.

    python models/reference/make_goldens.py            # all goldens
    python models/reference/make_goldens.py --only tokens,logits
    python models/reference/make_goldens.py --only gemma3   # models/goldens/gemma3_270m.json

Models are read from $WGLLM_MODEL_DIR (default ~/.cache/wgllm):
    SmolLM2-135M-Instruct.Q4_1.gguf, all-MiniLM-L6-v2/, gemma-3-270m-q4_k_m.gguf
Floats are rounded to 6 significant digits.  See models/reference/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bert_ref  # noqa: E402
import llama_ref  # noqa: E402
import tokenizer_ref  # noqa: E402

GOLDENS = os.path.normpath(os.path.join(HERE, "..", "goldens"))

# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
TOKENIZER_CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — déjà vu, Ångström, Straße",
    "日本語のテキストと中文，한국어",
    "I love pizza 🍕🎉! 👍🏽",
    "12345",
    "3.14159",
    "Version 2.0 costs $1,299.99 (about 10% off) on 2024-11-28",
    "def f(x):\n    return x**2",
    "  two leading spaces,\ttab\t\tdouble tab\n\n\nthree newlines   trailing   ",
    "don't you'll we've I'M THEY'RE",
    "<|im_start|>user\nHi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "",
]
# text tokenised with special-token parsing OFF (literal "<|im_start|>" is BPE'd as text)
TOKENIZER_NO_SPECIAL_CASES = ["<|im_start|>user\nHi<|im_end|>"]

LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
FIXED_IDS = [0, 2, 260, 7042, 49151]  # <|endoftext|>, <|im_end|>, " the", " Paris", last id
TOP_K_LAST = 20
TOP_K_ALL = 5

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_NEW = 16

PPL_FILE = os.path.join(GOLDENS, "perplexity.txt")
PPL_CTX = 128

MINILM_SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "Quantum computers use qubits to solve certain problems faster.",
]
# similarity matrix published in the sentence-transformers documentation for
# the first three sentences with all-MiniLM-L6-v2 (4 decimals)
MINILM_PUBLISHED = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def r6(x) -> float:
    return float(f"{float(x):.6g}")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import gguf

    import tokenizers
    from importlib.metadata import version

    return {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "gguf": version("gguf"),
        "tokenizers": tokenizers.__version__,
        "safetensors": version("safetensors"),
    }


def _is_flat(x) -> bool:
    # a list of scalars, or a list of short lists of scalars (e.g. [id, logit] pairs)
    return isinstance(x, list) and all(
        not isinstance(e, (dict, list)) or (isinstance(e, list) and len(e) <= 2
                                           and all(not isinstance(v, (dict, list)) for v in e))
        for e in x)


def _dump(x, ind: int = 0) -> str:
    pad = " " * ind
    if isinstance(x, dict):
        if not x:
            return "{}"
        items = [f'{pad} {json.dumps(k, ensure_ascii=False)}: {_dump(v, ind + 1)}' for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, list):
        if _is_flat(x):
            return json.dumps(x, ensure_ascii=False, separators=(", ", ": "))
        return "[\n" + ",\n".join(pad + " " + _dump(v, ind + 1) for v in x) + "\n" + pad + "]"
    return json.dumps(x, ensure_ascii=False)


def write(name: str, obj: dict) -> None:
    path = os.path.join(GOLDENS, name)
    text = _dump(obj) + "\n"
    assert json.loads(text) == json.loads(json.dumps(obj))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def topk(row: np.ndarray, k: int):
    # descending logit, ties broken by ascending id
    order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
    return [[int(i), r6(row[i])] for i in order]


def gen_block(extra: dict) -> dict:
    d = {
        "script": "models/reference/make_goldens.py",
        "packages": versions(),
        "float_rounding": "6 significant digits",
    }
    d.update(extra)
    return d


# ---------------------------------------------------------------------------
# goldens
# ---------------------------------------------------------------------------
def smollm2_model_info(model: llama_ref.LlamaRef, gguf_sha: str) -> dict:
    c = model.cfg
    return {
        "file": os.path.basename(model.path),
        "sha256": gguf_sha,
        "n_layer": c.n_layer, "n_embd": c.n_embd, "n_ff": c.n_ff,
        "n_head": c.n_head, "n_head_kv": c.n_head_kv, "head_dim": c.head_dim,
        "n_rot": c.n_rot, "rope_freq_base": c.rope_base, "rms_eps": c.eps, "vocab": c.vocab,
        "tied_output": model.tied_output,
        "rope": "interleaved pairs (2i, 2i+1) (llama.cpp ROPE_TYPE_NORM)",
        "numerics": "weights dequantised in f32 exactly like ggml, widened to f64; whole forward in f64",
    }


def make_tokens(meta: dict, gguf_sha: str) -> None:
    tok = tokenizer_ref.smollm2_tokenizer(meta=meta)
    tok_ns = tokenizer_ref.smollm2_tokenizer(meta=meta, parse_special=False)
    tokens = meta["tokens"]
    cases = []
    for s in TOKENIZER_CASES:
        e = tok.encode(s, add_special_tokens=False)
        dec = tok.decode(e.ids, skip_special_tokens=False)
        assert dec == s, (s, dec)
        cases.append({"text": s, "parse_special": True, "ids": e.ids, "tokens": e.tokens})
    for s in TOKENIZER_NO_SPECIAL_CASES:
        e = tok_ns.encode(s, add_special_tokens=False)
        assert tok_ns.decode(e.ids) == s
        cases.append({"text": s, "parse_special": False, "ids": e.ids, "tokens": e.tokens})
    specials = [[i, t] for i, t in enumerate(tokens) if meta["token_type"][i] == tokenizer_ref.TOKEN_TYPE_CONTROL]
    write("smollm2_tokens.json", {
        "generator": gen_block({"model_file": os.path.basename(tokenizer_ref.SMOLLM2_GGUF), "model_sha256": gguf_sha}),
        "tokenizer": {
            "source": "GGUF metadata tokenizer.ggml.{tokens,merges,token_type}",
            "tokenizer.ggml.model": meta["model"],
            "tokenizer.ggml.pre": meta["pre"],
            "pre_tokenizer": "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]",
            "llama_cpp_regexes": ["\\p{N}", "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"],
            "decoder": "ByteLevel",
            "normalizer": None,
            "vocab_size": len(tokens),
            "n_merges": len(meta["merges"]),
            "add_bos_token": meta["add_bos_token"],
            "add_eos_token": meta["add_eos_token"],
            "add_space_prefix": meta["add_space_prefix"],
            "bos_token_id": meta["bos_token_id"], "bos_token": tokens[meta["bos_token_id"]],
            "eos_token_id": meta["eos_token_id"], "eos_token": tokens[meta["eos_token_id"]],
            "unknown_token_id": meta["unknown_token_id"],
            "padding_token_id": meta["padding_token_id"],
            "special_tokens_control": specials,
        },
        "note": "ids are WITHOUT BOS (the GGUF says add_bos_token=false). parse_special=true: CONTROL tokens "
                "written literally in the text map to their single id; parse_special=false: they are BPE'd as text. "
                "tokens[] are the byte-level token strings (GPT-2 byte->unicode map, e.g. 'Ġ' = space, 'Ċ' = newline). "
                "decode(ids) == text for every case.",
        "cases": cases,
    })


def make_logits(model, tok, info) -> None:
    prompts = []
    for pi, s in enumerate(LOGIT_PROMPTS):
        ids = tok.encode(s, add_special_tokens=False).ids
        lg = model.logits(ids)
        last = lg[-1]
        entry = {
            "prompt": s,
            "ids": ids,
            "last": {
                "top20": topk(last, TOP_K_LAST),
                "logsumexp": r6(llama_ref.logsumexp(last)),
                "fixed_ids": FIXED_IDS,
                "fixed_logits": [r6(last[i]) for i in FIXED_IDS],
                "argmax": int(np.argmax(last)),
            },
        }
        if pi == 0:
            entry["all_positions"] = [
                {"pos": p, "top5": topk(lg[p], TOP_K_ALL), "logsumexp": r6(llama_ref.logsumexp(lg[p]))}
                for p in range(len(ids))
            ]
        prompts.append(entry)
        print(f"logits: {s!r} -> argmax {entry['last']['argmax']} {tok.decode([entry['last']['argmax']])!r}")
    write("smollm2_logits.json", {
        "generator": gen_block({"model": info}),
        "note": "Logits of the SmolLM2 GGUF for the prompt ids (no BOS; all positions computed in one causal "
                "pass from position 0). top lists are [id, logit] sorted by logit desc, ties by id asc. "
                "logsumexp is over the full vocab (49152), so log-softmax = logit - logsumexp. "
                "Expected agreement for an f32 GPU implementation: ~1e-2 absolute on logits.",
        "prompts": prompts,
    })


def make_greedy(model, tok, info, eos_id: int) -> None:
    runs = []
    for s in GREEDY_PROMPTS:
        ids = tok.encode(s, add_special_tokens=False).ids
        new, margins = model.greedy(ids, GREEDY_NEW, stop_ids=(eos_id,))
        text = tok.decode(new, skip_special_tokens=False)
        runs.append({
            "prompt": s,
            "prompt_ids": ids,
            "new_ids": new,
            "new_text": text,
            "top1_minus_top2": [r6(m) for m in margins],
        })
        print(f"greedy: {s!r} -> {text!r}")
    write("smollm2_greedy.json", {
        "generator": gen_block({"model": info}),
        "note": f"Greedy (argmax, ties -> lowest id) decoding of up to {GREEDY_NEW} new tokens, no BOS, "
                f"stopping early only if EOS id {eos_id} is produced (it is then included). Each step recomputes "
                "the whole prefix (no KV cache). top1_minus_top2 is the logit margin at each step: a "
                "different token at a step whose margin is tiny (< ~0.05) is a near-tie, not necessarily a bug.",
        "runs": runs,
    })


def make_perplexity(model, tok, info) -> None:
    with open(PPL_FILE, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if text.endswith("\n"):  # llama.cpp `-f` drops one trailing newline
        text = text[:-1]
    ids = tok.encode(text, add_special_tokens=False).ids
    t0 = time.time()
    res = model.perplexity(ids, PPL_CTX, bos_id=None)
    print(f"perplexity: ctx {PPL_CTX}, {res['n_chunk']} chunks, PPL {res['ppl']:.4f} ({time.time() - t0:.0f}s)")
    write("smollm2_perplexity.json", {
        "generator": gen_block({"model": info}),
        "definition": (
            "llama.cpp llama-perplexity (perplexity(), default path). text = contents of perplexity.txt "
            "(UTF-8) with ONE trailing newline removed; ids = tokenize(text) without BOS (add_bos_token=false, so "
            "no token is replaced by BOS). n_chunk = floor(n_tokens / n_ctx); the remainder is discarded. "
            "Chunk i = ids[i*n_ctx:(i+1)*n_ctx], evaluated alone from an empty KV cache at positions 0..n_ctx-1. "
            "first = n_ctx/2; for j in [first, n_ctx-2] the logits at position j score chunk token j+1: "
            "nll = logsumexp(logits_j) - logits_j[tok_{j+1}] (n_ctx-1-first = 63 tokens per chunk). "
            "chunk_mean_nll = mean over that chunk; running_ppl[i] = exp(total nll of chunks 0..i / count); "
            "ppl = exp(mean_nll) over all scored tokens. Natural log."
        ),
        "text_file": "models/goldens/perplexity.txt",
        "text_sha256": hashlib.sha256(raw).hexdigest(),
        "n_ctx": PPL_CTX,
        "first": PPL_CTX // 2,
        "add_bos": False,
        "n_tokens": res["n_tokens"],
        "n_chunk": res["n_chunk"],
        "scored_per_chunk": res["scored_per_chunk"],
        "ids": ids,
        "chunk_mean_nll": [r6(x) for x in res["chunk_mean_nll"]],
        "running_ppl": [r6(x) for x in res["running_ppl"]],
        "mean_nll": r6(res["mean_nll"]),
        "ppl": r6(res["ppl"]),
    })


def make_perplexity_strided(model, tok, info) -> None:
    """The two definitions beside llama.cpp's chunks: one window for a text shorter than the
    context, and strided evaluation (see LlamaRef.strided_perplexity)."""
    with open(PPL_FILE, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if text.endswith("\n"):
        text = text[:-1]
    ids = tok.encode(text, add_special_tokens=False).ids
    out = {}
    for name, n_ctx, stride in [("window", 2048, None), ("strided", PPL_CTX, PPL_CTX // 2)]:
        t0 = time.time()
        res = model.strided_perplexity(ids, n_ctx, stride)
        print(f"perplexity {name}: ctx {n_ctx}, stride {stride}, PPL {res['ppl']:.4f} ({time.time() - t0:.0f}s)")
        out[name] = {
            "n_ctx": n_ctx,
            "stride": stride,
            "scored": res["scored"],
            "window_scored": res["window_scored"],
            "window_mean_nll": [r6(x) for x in res["window_mean_nll"]],
            "mean_nll": r6(res["mean_nll"]),
            "ppl": r6(res["ppl"]),
        }
    write("smollm2_perplexity_strided.json", {
        "generator": gen_block({"model": info}),
        "definition": (
            "Same text and ids as smollm2_perplexity.json. Every token after the first is scored once: "
            "windows begin at 0, stride, 2*stride, ... and cover ids[begin:min(begin+n_ctx, n)], each "
            "evaluated alone from an empty KV cache; a window scores the tokens past the previous "
            "window's end (the first window every token after its first), the logits at position p-1 "
            "scoring token p: nll = logsumexp(logits) - logits[tok_p]. 'window': the whole text in one "
            "window (n_tokens < n_ctx; stride null). 'strided': n_ctx 128, stride 64. ppl = exp(mean nll). "
            "Natural log."
        ),
        "text_file": "models/goldens/perplexity.txt",
        "text_sha256": hashlib.sha256(raw).hexdigest(),
        "n_tokens": len(ids),
        **out,
    })


def make_minilm(gsha: dict) -> None:
    tok = tokenizer_ref.minilm_tokenizer()
    m = bert_ref.BertRef()
    ents, embs = [], []
    for s in MINILM_SENTENCES:
        e = tok.encode(s)
        ids = e.ids
        h = m.token_states(ids)
        pooled = h.mean(axis=0)
        emb = m.embed(ids)
        embs.append(emb)
        ents.append({
            "text": s,
            "ids": ids,
            "tokens": e.tokens,
            "token_type_ids": e.type_ids,
            "attention_mask": e.attention_mask,
            "pooled_norm_before_normalize": r6(np.linalg.norm(pooled)),
            "embedding": [r6(x) for x in emb],
        })
    E = np.array(embs)
    cos = E @ E.T / np.outer(np.linalg.norm(E, axis=1), np.linalg.norm(E, axis=1))
    pub = np.array(MINILM_PUBLISHED)
    err = float(np.abs(cos[:3, :3] - pub).max())
    assert err < 1e-3, f"does not reproduce the published similarity matrix (max err {err})"
    print("minilm cosine:\n", np.round(cos, 4))
    write("minilm_embeddings.json", {
        "generator": gen_block({"model_dir": "all-MiniLM-L6-v2", "files_sha256": gsha,
                                "numerics": "f32 safetensors widened to f64; whole forward in f64"}),
        "definition": (
            "tokenizer.json (BertNormalizer lowercase, WordPiece) with its fixed padding to 128 disabled and "
            "truncation 256; ids = [CLS] ... [SEP], token_type_ids 0, attention_mask 1. BERT encoder "
            "(post-LN, LayerNorm eps 1e-12, exact erf GELU), no pooler; mean pooling over the attention mask; "
            "then L2 normalisation (modules.json lists sentence_transformers.models.Normalize)."
        ),
        "normalize": m.normalize,
        "sentences": ents,
        "cosine": [[r6(x) for x in row] for row in cos],
        "published_cosine_first3": MINILM_PUBLISHED,
        "published_max_abs_err": r6(err),
    })


# ---------------------------------------------------------------------------
# Gemma 3 (gemma3_ref.py, tokenizer_ref.Gemma3Tokenizer)
# ---------------------------------------------------------------------------
GEMMA3_RAW = [
    ("raw_paris", "The capital of France is"),
    ("raw_once", "Once upon a time"),
    ("raw_colors", "The three primary colors are"),
    ("raw_qa_digits", "Question: What is 12 + 7?\nAnswer:"),
]
GEMMA3_CHAT = [
    ("chat_capital", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat_haiku", [{"role": "user", "content": "Write a haiku about the sea."}]),
    ("chat_two_turns", [{"role": "user", "content": "Hi! My name is Ada."},
                        {"role": "assistant", "content": "Hello Ada, nice to meet you."},
                        {"role": "user", "content": "What is my name?"}]),
]
GEMMA3_NEW = 24
GEMMA3_LOGITS = ["raw_paris", "chat_capital"]
GEMMA3_LOGITS_LONG = "long_sliding_text"
GEMMA3_TIE = 1e-4
GEMMA3_TIGHT = 0.05
GEMMA3_PPL = [("short", "models/goldens/gemma3_ppl.txt"), ("long_sliding", "models/goldens/gemma3_ppl_long.txt")]


GEMMA3_TOKENIZER_EXTRA = [
    "a  b", "x\ty", " leading space", "trailing space ", "Hello\n\n\nworld", "<table><tr>",
    "\ufb01 ligature", "e\u0301 (e + combining acute) \u00e9",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]


def make_gemma3_tokens() -> None:
    path = tokenizer_ref.GEMMA3_GGUF
    tok = tokenizer_ref.gemma3_tokenizer(path)
    cases = []
    for text in TOKENIZER_CASES + GEMMA3_TOKENIZER_EXTRA:
        bos = not text.startswith("<bos>")
        ids = tok.encode(text, add_bos=bos)
        assert tok.decode(ids) == ("<bos>" if bos else "") + text, text
        cases.append({"text": text, "add_bos": bos, "ids": ids, "pieces": tok.pieces(ids)})
    lit = "<start_of_turn>user\nHi<end_of_turn>"
    ids = tok.encode(lit, parse_special=False)
    cases.append({"text": lit, "add_bos": True, "parse_special": False, "ids": ids, "pieces": tok.pieces(ids)})
    write("gemma3_tokens.json", {
        "model": os.path.basename(path), "sha256": sha256(path),
        "generated_by": "models/reference/tokenizer_ref.py (Gemma3Tokenizer)",
        "generator": gen_block({}),
        "metadata": {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "vocab": len(tok.tokens),
                     "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "unknown_token_id": tok.unk_id,
                     "add_bos_token": tok.add_bos, "add_space_prefix": tok.add_space_prefix,
                     "start_of_turn": tok.ids["<start_of_turn>"], "end_of_turn": tok.ids["<end_of_turn>"]},
        "definition": (
            "SentencePiece BPE with byte fallback rebuilt from the GGUF vocabulary (pieces, scores, types); "
            "before it the text is cut at CONTROL token texts (only when parse_special, the default) and at "
            "USER_DEFINED token texts (always: newline runs, space runs, tab runs, HTML tags), longest first, as "
            "llama.cpp does; spaces -> U+2581, no dummy prefix; BOS (2) prepended when add_bos. transformers' "
            "GGUF tokenizer gives the same ids on every case (gemma3_crosscheck.py)."),
        "cases": cases,
    })


def gemma3_ppl_ids(tok, rel: str) -> list:
    with open(os.path.join(HERE, "..", "..", rel), encoding="utf-8") as f:
        text = f.read()
    if text.endswith("\n"):  # like llama.cpp's -f: one trailing newline dropped
        text = text[:-1]
    ids = tok.encode(text)
    assert tok.decode(ids) == "<bos>" + text
    return ids


def make_gemma3() -> None:
    import gemma3_ref

    path = tokenizer_ref.GEMMA3_GGUF
    tok = tokenizer_ref.gemma3_tokenizer(path)
    model = gemma3_ref.Gemma3Ref(path)
    c = model.cfg
    notes = []
    greedy, prompt_ids = [], {}
    cases = [(n, False, p, None) for n, p in GEMMA3_RAW]
    cases += [(n, True, tokenizer_ref.gemma3_chat_prompt(m), m) for n, m in GEMMA3_CHAT]
    for name, chat, prompt, messages in cases:
        # the chat text carries its own "<bos>"; raw prompts get BOS from add_bos_token
        ids = tok.encode(prompt, add_bos=not chat)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1, (name, ids)
        assert tok.decode(ids) == (prompt if chat else "<bos>" + prompt), name
        new, margins = model.greedy(ids, GEMMA3_NEW)
        model.check_greedy(ids, new)
        close = [i for i, m in enumerate(margins) if m < GEMMA3_TIE]
        if close:
            notes.append(f"{name}: top1-top2 < {GEMMA3_TIE} at steps {close}; "
                         "an f32 runtime may break the tie differently")
        tight = [i for i, m in enumerate(margins) if GEMMA3_TIE <= m < GEMMA3_TIGHT]
        if tight:
            notes.append(f"{name}: tight (top1-top2 < {GEMMA3_TIGHT}, still far above f32 error) at steps "
                         f"{tight}, min {min(margins):.4f}.")
        e = {"name": name, "chat": chat}
        if chat:
            e["messages"] = messages
        e.update({"prompt": prompt, "prompt_ids": ids, "n_new": GEMMA3_NEW, "new_ids": new,
                  "new_text": tok.decode(new), "margins": [r6(m) for m in margins]})
        greedy.append(e)
        prompt_ids[name] = ids
        print(f"gemma3 {name}: {tok.decode(new)!r} (min margin {min(margins):.4f})")

    sample_ids = [int(round(x)) for x in np.linspace(0, c.vocab - 1, 64)]
    # the long perplexity text's ids as one more logits prompt: its last position (879) is past the
    # window, where the local layers' masks differ from causal attention
    prompt_ids[GEMMA3_LOGITS_LONG] = gemma3_ppl_ids(tok, GEMMA3_PPL[-1][1])
    logits = []
    for name in GEMMA3_LOGITS + [GEMMA3_LOGITS_LONG]:
        row = model.last_logits(prompt_ids[name])
        logits.append({"name": name, "prompt_ids": prompt_ids[name], "top": topk(row, 20),
                       "sample": [[i, r6(row[i])] for i in sample_ids], "max_abs": r6(np.abs(row).max()),
                       "logsumexp": r6(gemma3_ref.logsumexp(row))})

    # the residual stream at raw_paris's last position after the embedding and after every layer, to
    # locate where a port diverges (L2 norm, max |x|, first 8 components)
    tr = []
    model.hidden(prompt_ids["raw_paris"], trace=tr)
    trace = {"name": "raw_paris", "position": len(prompt_ids["raw_paris"]) - 1,
             "stages": ["embedding*sqrt(n_embd)"] + [f"after layer {i}" for i in range(c.n_layer)],
             "l2": [r6(np.linalg.norm(h[-1])) for h in tr], "max_abs": [r6(np.abs(h[-1]).max()) for h in tr],
             "first8": [[r6(x) for x in h[-1][:8]] for h in tr]}

    ppl = []
    for name, rel in GEMMA3_PPL:
        ids = gemma3_ppl_ids(tok, rel)
        r = model.window_perplexity(ids)
        ppl.append({"name": name, "text_file": rel, "ids": ids, "ctx": len(ids), "method": "window",
                    "scored": r["scored"], "nll_mean": r6(r["nll_mean"]), "ppl": r6(r["ppl"])})
        print(f"gemma3 ppl {name}: {len(ids)} tokens, PPL {r['ppl']:.4f}")
    assert ppl[-1]["ctx"] > c.sliding_window

    # How far the goldens move under the mistakes a port can make: a 1e-2 logit tolerance and a 0.5%
    # perplexity bound must separate right from wrong by a wide margin.
    sens = {}
    base_rows = {e["name"]: model.last_logits(e["prompt_ids"]) for e in logits}
    long_ids = ppl[-1]["ids"]
    for what, attr, wrong in (("rope_interleaved_instead_of_neox", "rope_mode", "norm"),
                              ("no_sliding_window", "sliding", False)):
        right = getattr(model, attr)
        setattr(model, attr, wrong)
        try:
            d = {e["name"]: r6(np.abs(model.last_logits(e["prompt_ids"]) - base_rows[e["name"]]).max())
                 for e in logits}
            p_long = model.window_perplexity(long_ids)["ppl"]
        finally:
            setattr(model, attr, right)
        sens[what] = {"max_abs_logit_diff": d, "long_sliding_ppl": r6(p_long)}
        print(f"gemma3 sensitivity {what}: {sens[what]}")

    write("gemma3_270m.json", {
        "model": os.path.basename(path), "sha256": sha256(path), "generated_by": "models/reference/gemma3_ref.py",
        "generator": gen_block({"numerics": "every tensor dequantised by gguf.quants.dequantize (f32), widened to "
                                "f64; whole forward in f64", "tokenizer": "tokenizer_ref.Gemma3Tokenizer "
                                "(sentencepiece BPE rebuilt from the GGUF vocabulary)"}),
        "config": {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_ff": c.n_ff, "n_head": c.n_head,
                   "n_head_kv": c.n_head_kv, "head_dim": c.head_dim, "vocab": c.vocab, "rms_eps": c.eps,
                   "rope_base_global": c.rope_base_global, "rope_base_local": c.rope_base_local,
                   "sliding_window": c.sliding_window,
                   "global_layers": [i for i in range(c.n_layer) if c.is_global(i)],
                   "attention_scale": 1.0 / math.sqrt(c.head_dim), "embedding_scale": math.sqrt(c.n_embd),
                   "rope": "NEOX (rotate halves: pairs (i, i+head_dim/2))", "tied_output": model.tied_output},
        "notes": " ".join(notes) if notes else (
            f"no near-ties: every greedy step's top1-top2 logit margin is >= {GEMMA3_TIE}"),
        "definitions": {
            "prompt_ids": "exactly what is fed to the model, BOS (2) included: raw prompts get BOS from "
                          "tokenizer.ggml.add_bos_token; chat prompts are Gemma's template text, which begins "
                          "with <bos>, tokenised with special tokens recognised and no BOS added",
            "greedy": "argmax at every step (ties -> lowest id), n_new tokens, no stopping on EOS or "
                      "<end_of_turn>; margins[i] = top1 - top2 logit at step i",
            "logits": "last position: top = 20 highest [id, logit] (ties -> lower id first); sample = logits of "
                      "64 ids round(linspace(0, vocab-1, 64)); max_abs = max |logit|; logsumexp over the vocab. "
                      "long_sliding_text = the ids of the long perplexity text (880): its last position is "
                      "past the sliding window",
            "perplexity": "text = the file's UTF-8 contents with one trailing newline dropped; ids = BOS + "
                          "tokens; one window from position 0 over all ids (ctx = len(ids)); the logits at j "
                          "score ids[j+1] for every j < ctx-1 (nll = logsumexp - logit, natural log); "
                          "ppl = exp(nll_mean)",
            "residual_trace": "h (the residual stream, before the final norm) at the last position of raw_paris "
                              "after the embedding scale and after each layer: L2 norm, max |h|, h[0:8]",
            "sensitivity": "the reference rerun with one deliberate mistake (interleaved RoPE pairs (2i, 2i+1) "
                           "instead of NEOX halves; full causal attention on the local layers): max |logit "
                           "diff| at the last position of each logits prompt, and the long text's perplexity",
        },
        "greedy": greedy,
        "logits": logits,
        "perplexity": ppl,
        "sensitivity": sens,
        "residual_trace": trace,
    })
    del model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="tokens,logits,greedy,perplexity,perplexity_strided,minilm,gemma3_tokens,gemma3")
    ap.add_argument("--skip-dequant-check", action="store_true")
    args = ap.parse_args()
    which = set(args.only.split(","))
    os.makedirs(GOLDENS, exist_ok=True)
    t0 = time.time()

    need_llama = which & {"logits", "greedy", "perplexity", "perplexity_strided"}
    if which & {"tokens"} or need_llama:
        gguf_sha = sha256(tokenizer_ref.SMOLLM2_GGUF)
        meta = tokenizer_ref.gguf_tokenizer_meta()
        tok = tokenizer_ref.smollm2_tokenizer(meta=meta)
    if "tokens" in which:
        make_tokens(meta, gguf_sha)
    if need_llama:
        if not args.skip_dequant_check:
            n = llama_ref.check_dequant(tokenizer_ref.SMOLLM2_GGUF)
            print(f"own dequantisers == gguf.quants.dequantize on all {n} tensors")
        model = llama_ref.LlamaRef(tokenizer_ref.SMOLLM2_GGUF)
        info = smollm2_model_info(model, gguf_sha)
        if "logits" in which:
            make_logits(model, tok, info)
        if "greedy" in which:
            make_greedy(model, tok, info, int(meta["eos_token_id"]))
        if "perplexity" in which:
            make_perplexity(model, tok, info)
        if "perplexity_strided" in which:
            make_perplexity_strided(model, tok, info)
        del model
    if "gemma3_tokens" in which:
        make_gemma3_tokens()
    if "gemma3" in which:
        make_gemma3()
    if "minilm" in which:
        d = tokenizer_ref.MINILM_DIR
        gsha = {f: sha256(os.path.join(d, f)) for f in ("model.safetensors", "tokenizer.json", "config.json")}
        make_minilm(gsha)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/corpus/<target>/) and the two small vocabularies the
tokenizer target and the regression test load (tests/data/fuzz/vocab/). Deterministic; run from
the repository root after the default models are cached (`wgllm models fetch`):

    python3 fuzz/make_seeds.py

The vocabularies are the first tokens of the cached models' own vocabularies (Gemma 3's
SentencePiece, SmolLM2's byte-level BPE with the merges among them); no weights are copied.
"""
import glob
import io
import json
import os
import struct
import sys

import numpy as np
import gguf
from safetensors.numpy import save as st_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser("~/.cache/wgllm")
VOCAB = os.path.join(ROOT, "tests/data/fuzz/vocab")
CORPUS = os.path.join(ROOT, "fuzz/corpus")
rng = np.random.default_rng(13)


def out(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        return None
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def gguf_bytes(build):
    """The bytes of a GGUF that `build(writer)` fills."""
    path = "/tmp/wgllm-fuzz-seed.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    build(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return data


def spm_vocab(n=3000):
    r = gguf.GGUFReader(os.path.join(CACHE, "gemma-3-270m-q4_k_m.gguf"))
    toks = field(r, "tokenizer.ggml.tokens")[:n]
    scores = field(r, "tokenizer.ggml.scores")[:n]
    types = field(r, "tokenizer.ggml.token_type")[:n]

    def build(w):
        w.add_string("general.name", "fuzz-spm")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)
        w.add_chat_template(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
            "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        )

    return gguf_bytes(build)


def bpe_vocab(n=2000):
    r = gguf.GGUFReader(os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    toks = field(r, "tokenizer.ggml.tokens")[:n]
    types = field(r, "tokenizer.ggml.token_type")[:n]
    have = set(toks)
    merges = [
        m
        for m in field(r, "tokenizer.ggml.merges")
        if all(p in have for p in m.split(" ")) and m.replace(" ", "") in have
    ]

    def build(w):
        w.add_string("general.name", "fuzz-bpe")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(toks)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)

    return gguf_bytes(build)


def finite_blocks(nbytes):
    # Every byte below 0x3c: every f16 scale in the blocks is finite.
    return rng.integers(0, 0x3C, size=nbytes, dtype=np.uint8)


def tiny_model(types):
    """A LLaMA GGUF of hidden 256 with the tensors in the given ggml types; each matrix has only 4
    rows (not the shapes the config implies: the seed exercises parsing and decoding, and stays
    small)."""
    hidden, ffn, vocab = 256, 256, 300
    Q = gguf.GGMLQuantizationType

    def build(w):
        w.add_string("general.name", "fuzz-tiny")
        w.add_uint32("llama.context_length", 64)
        w.add_uint32("llama.embedding_length", hidden)
        w.add_uint32("llama.block_count", 1)
        w.add_uint32("llama.feed_forward_length", ffn)
        w.add_uint32("llama.attention.head_count", 4)
        w.add_uint32("llama.attention.head_count_kv", 2)
        w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_float32("llama.rope.freq_base", 10000.0)
        w.add_uint32("llama.vocab_size", vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list([f"t{i}" for i in range(vocab - 256)] + [chr(0x100 + i) for i in range(256)])
        w.add_token_merges(["t 1"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_chat_template("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")

        def add(name, shape, ty):
            # shape in numpy order (rows, row length)
            traits = gguf.GGML_QUANT_SIZES[ty]
            row_bytes = shape[-1] // traits[0] * traits[1]
            data = finite_blocks(int(np.prod(shape[:-1])) * row_bytes).reshape(*shape[:-1], row_bytes)
            w.add_tensor(name, data, raw_dtype=ty)

        add("token_embd.weight", (4, hidden), types[0])
        add("output_norm.weight", (hidden,), Q.F32)
        for l in range(1):
            t = types[(l + 1) % len(types)]
            add(f"blk.{l}.attn_norm.weight", (hidden,), Q.F32)
            add(f"blk.{l}.attn_q.weight", (4, hidden), t)
            add(f"blk.{l}.attn_k.weight", (4, hidden), t)
            add(f"blk.{l}.attn_v.weight", (4, hidden), t)
            add(f"blk.{l}.attn_output.weight", (4, hidden), t)
            add(f"blk.{l}.ffn_norm.weight", (hidden,), Q.F32)
            add(f"blk.{l}.ffn_gate.weight", (4, hidden), t)
            add(f"blk.{l}.ffn_up.weight", (4, hidden), t)
            add(f"blk.{l}.ffn_down.weight", (4, hidden), t)

    return gguf_bytes(build)


def main():
    os.makedirs(VOCAB, exist_ok=True)
    spm, bpe = spm_vocab(), bpe_vocab()
    for name, data in [("spm.gguf", spm), ("bpe.gguf", bpe)]:
        with open(os.path.join(VOCAB, name), "wb") as f:
            f.write(data)
        out("gguf", "vocab-" + name, data)

    Q = gguf.GGMLQuantizationType
    mixes = {
        "f32-f16-bf16": [Q.F32, Q.F16, Q.BF16],
        "q4_0-q8_0-q4_1": [Q.Q4_0, Q.Q8_0, Q.Q4_1],
        "q4_k-q6_k-q5_k": [Q.Q4_K, Q.Q6_K, Q.Q5_K],
        "q2_k-q3_k-iq4_nl": [Q.Q2_K, Q.Q3_K, Q.IQ4_NL],
        "iq2_xxs-iq3_s-iq4_xs": [Q.IQ2_XXS, Q.IQ3_S, Q.IQ4_XS],
        "q5_0-q5_1-iq2_s": [Q.Q5_0, Q.Q5_1, Q.IQ2_S],
    }
    for name, types in mixes.items():
        out("gguf", f"tiny-{name}.gguf", tiny_model(types))
    out("gguf", "empty-v3.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0))

    # The structured target reads its input as a recipe; random bytes of a few sizes start it.
    for i, n in enumerate([16, 64, 256, 1024, 4096]):
        out("gguf_structured", f"random-{i}", rng.integers(0, 256, n, dtype=np.uint8).tobytes())

    # safetensors: a config.json, a 0xFF byte, then a safetensors image.
    st = st_save(
        {
            "model.embed_tokens.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "model.norm.weight": np.ones(4, dtype=np.float16),
            "lm_head.weight": rng.standard_normal((8, 4)).astype(np.float32).astype(np.float16),
            "positions": np.arange(6, dtype=np.int64),
        }
    )
    for p in sorted(glob.glob(os.path.join(ROOT, "models/presets/*.json"))):
        with open(p, "rb") as f:
            cfg = f.read()
        out("safetensors", os.path.basename(p), cfg + b"\xff" + st)
    gemma = {
        "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "tie_word_embeddings": True,
    }
    out("safetensors", "gemma3_text.json", json.dumps(gemma).encode() + b"\xff" + st)

    # tokenizer: a flag byte (bit 0: BPE, bit 1: add specials, bit 2: parse specials), then text.
    texts = set()
    for p in sorted(glob.glob(os.path.join(ROOT, "tests/data/tokenizer/*.json"))):
        with open(p) as f:
            v = json.load(f)
        for c in v.get("cases", [])[:12]:
            texts.add(c["text"])
    for i, t in enumerate(sorted(texts)[:60]):
        out("tokenizer", f"text-{i}", bytes([i % 8]) + t.encode())
    out("tokenizer", "specials", b"\x07<bos><start_of_turn>user\nhi<end_of_turn>\n<|im_start|>x<|im_end|>")

    # chat_template: a flag byte (bit 0: add_generation_prompt), the template, 0xFF, then
    # role/content pairs separated by NUL bytes.
    msgs = b"\x00".join(
        [b"system", b"You are terse.", b"user", b"Hello \xe2\x9c\x93", b"assistant", b"Hi.", b"user", b"Bye"]
    )
    files = sorted(glob.glob(os.path.join(ROOT, "tests/data/chat_templates/*.jinja")), key=os.path.getsize)
    for i, p in enumerate(files[:30]):
        with open(p, "rb") as f:
            src = f.read()
        out("chat_template", os.path.basename(p), bytes([i % 2]) + src + b"\xff" + msgs)
    hostile = [
        b"{% for i in range(10**9) %}x{% endfor %}",
        b"{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        b"{{ 'x' * 100000000 }}",
        b"{{ ([1] * 1000000000)|join(',') }}",
        b"{{ raise_exception('no') }}",
        b"{{ messages[0]['content'].__class__ }}{{ range.__globals__ }}",
        b"{% include 'other' %}",
    ]
    for i, t in enumerate(hostile):
        out("chat_template", f"hostile-{i}", b"\x01" + t + b"\xff" + msgs)


if __name__ == "__main__":
    sys.exit(main())

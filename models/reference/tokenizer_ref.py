"""Reference tokenizers built with the HF `tokenizers` package.

SmolLM2: rebuilt from the GGUF metadata only (no tokenizer.json needed):
  * model   : BPE(vocab = tokenizer.ggml.tokens (id = index),
                  merges = tokenizer.ggml.merges ("a b" -> ("a", "b"), rank = index)),
              no unk token, no dropout, no continuing-subword prefix.
  * pre-tok : Sequence[Digits(individual_digits=True),
                       ByteLevel(add_prefix_space=False, use_regex=True)]
              -- this is SmolLM2's published tokenizer.json pre-tokenizer and is
              what llama.cpp's `tokenizer.ggml.pre = "smollm"` means
              (llama.cpp regexes: "\\p{N}" then the GPT-2 regex
               "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)").
  * normalizer: none.  decoder: ByteLevel.  post-processor: none (no BOS/EOS
    added; tokenizer.ggml.add_bos_token = False in the GGUF).
  * added tokens: every token whose tokenizer.ggml.token_type is CONTROL (3)
    is registered as a *special* added token (matched verbatim in the input
    before BPE, lstrip/rstrip off, not normalised); USER_DEFINED (4) tokens
    would be registered as non-special added tokens (SmolLM2 has none).
    `smollm2_tokenizer(parse_special=False)` omits the added tokens, so a
    literal "<|im_start|>" in the text is byte-level BPE'd like any other text
    (llama.cpp's parse_special=false behaviour).

MiniLM: the model's own tokenizer.json (BERT WordPiece, lowercase), with the
file's fixed padding to 128 disabled and truncation set to
sentence-transformers' max_seq_length = 256, so encode() returns just
[CLS] ... [SEP].
"""

from __future__ import annotations

import json
import os

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

MODEL_DIR = os.environ.get("WGLLM_MODEL_DIR", os.path.expanduser("~/.cache/wgllm"))
SMOLLM2_GGUF = os.path.join(MODEL_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_DIR = os.path.join(MODEL_DIR, "all-MiniLM-L6-v2")

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def gguf_tokenizer_meta(path: str = SMOLLM2_GGUF) -> dict:
    r = gguf.GGUFReader(path)

    def get(k, d=None):
        f = r.fields.get(k)
        return d if f is None else f.contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "unknown_token_id": get("tokenizer.ggml.unknown_token_id"),
        "padding_token_id": get("tokenizer.ggml.padding_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": get("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix"),
    }


def smollm2_tokenizer(path: str = SMOLLM2_GGUF, parse_special: bool = True, meta=None) -> Tokenizer:
    meta = meta or gguf_tokenizer_meta(path)
    if meta["model"] != "gpt2":
        raise ValueError(f"expected gpt2 BPE tokenizer, got {meta['model']}")
    if meta["pre"] != "smollm":
        raise ValueError(f"pre-tokenizer {meta['pre']!r} not handled by this reference")
    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    if parse_special:
        tt = meta["token_type"]
        special = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                   for t, ty in zip(tokens, tt) if ty == TOKEN_TYPE_CONTROL]
        user = [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False)
                for t, ty in zip(tokens, tt) if ty == TOKEN_TYPE_USER_DEFINED]
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        for t in special + user:  # added tokens must keep their GGUF ids
            assert tok.token_to_id(t.content) == vocab[t.content]
    return tok


def minilm_tokenizer(model_dir: str = MINILM_DIR, max_len: int = 256) -> Tokenizer:
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


if __name__ == "__main__":
    meta = gguf_tokenizer_meta()
    print({k: v for k, v in meta.items() if k not in ("tokens", "token_type", "merges")})
    t = smollm2_tokenizer(meta=meta)
    for s in ["Hello world", "12345", "<|im_start|>user\nHi<|im_end|>"]:
        e = t.encode(s)
        print(repr(s), e.ids, e.tokens, repr(t.decode(e.ids, skip_special_tokens=False)))
    m = minilm_tokenizer()
    print(m.encode("Hello world!").ids)
    print(json.dumps(m.encode("Hello world!").tokens))

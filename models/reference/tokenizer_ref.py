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

Gemma 3: `gemma3_tokenizer(path)` rebuilds a SentencePiece model from the GGUF
vocabulary (tokenizer.ggml.model = llama: tokens, scores, token types; see
`Gemma3Tokenizer`) and splits control / user-defined tokens out of the text
first, as llama.cpp does.  Needs `sentencepiece` and `protobuf`.

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


GEMMA3_GGUF = os.path.join(MODEL_DIR, "gemma-3-270m-q4_k_m.gguf")
if not os.path.exists(GEMMA3_GGUF) and os.path.exists("/work/models/gemma-3-270m-q4_k_m.gguf"):
    GEMMA3_GGUF = "/work/models/gemma-3-270m-q4_k_m.gguf"

# GGUF token types (llama.cpp llama_token_type) have SentencePiece's numbering:
# 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_BYTE = 6


class Gemma3Tokenizer:
    """SentencePiece (BPE, byte fallback) rebuilt from a GGUF's own vocabulary.

    * The ModelProto: every GGUF token is a piece with its id (= index), score
      and type; model_type BPE, byte_fallback on, unk id =
      tokenizer.ggml.unknown_token_id (that piece is typed UNKNOWN: the Gemma
      file marks <unk> CONTROL, and SentencePiece needs exactly one UNKNOWN);
      normalizer "identity" with no character map, add_dummy_prefix =
      tokenizer.ggml.add_space_prefix (False for Gemma), no removal of extra
      whitespace, spaces escaped to U+2581.  So a fragment is split into
      characters, adjacent symbols are merged while their concatenation is a
      piece (highest score first), and characters no piece covers become
      <0xXX> byte pieces: llama.cpp's `llm_tokenizer_spm` algorithm.
    * Before that, as llama.cpp's `tokenizer_st_partition` does, the raw text
      is cut at every occurrence of a CONTROL token's text (only with
      parse_special, e.g. "<start_of_turn>", "<end_of_turn>", "<bos>") and of
      a USER_DEFINED token's text (always: "\n", "\n\n", runs of spaces and
      tabs, "<table>", ...), longest tokens first; those become their own ids.
      Gemma's user-defined space runs ("  " = id 138, ...) hold plain spaces,
      so llama.cpp (and this class) emit them for "a  b", whereas a
      SentencePiece model alone would escape the spaces first and never match
      them.  transformers' own GGUF -> `tokenizers` conversion agrees with
      this class on every case of goldens/gemma3_tokens.json, whitespace runs
      and tabs included (gemma3_crosscheck.py checks it).
    * encode() adds BOS when tokenizer.ggml.add_bos_token says so (True for
      Gemma: id 2), never EOS.
    """

    def __init__(self, path: str = GEMMA3_GGUF):
        import re

        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm_pb

        r = gguf.GGUFReader(path)

        def get(k, d=None):
            f = r.fields.get(k)
            return d if f is None else f.contents()

        if get("tokenizer.ggml.model") != "llama":
            raise ValueError(f"expected a SentencePiece (llama) vocabulary, got {get('tokenizer.ggml.model')}")
        self.tokens = get("tokenizer.ggml.tokens")
        self.types = get("tokenizer.ggml.token_type")
        scores = get("tokenizer.ggml.scores")
        self.bos_id = int(get("tokenizer.ggml.bos_token_id"))
        self.eos_id = int(get("tokenizer.ggml.eos_token_id"))
        self.unk_id = int(get("tokenizer.ggml.unknown_token_id"))
        self.add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
        self.add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        mp = spm_pb.ModelProto()
        mp.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
        mp.trainer_spec.vocab_size = len(self.tokens)
        mp.trainer_spec.byte_fallback = True
        mp.trainer_spec.unk_id = self.unk_id
        mp.trainer_spec.bos_id = self.bos_id
        mp.trainer_spec.eos_id = self.eos_id
        mp.trainer_spec.pad_id = int(get("tokenizer.ggml.padding_token_id", -1))
        mp.normalizer_spec.name = "identity"
        mp.normalizer_spec.add_dummy_prefix = self.add_space_prefix
        mp.normalizer_spec.remove_extra_whitespaces = False
        mp.normalizer_spec.escape_whitespaces = True
        for i, (t, sc, ty) in enumerate(zip(self.tokens, scores, self.types)):
            p = mp.pieces.add()
            p.piece = t
            p.score = float(sc)
            p.type = TOKEN_TYPE_UNKNOWN if i == self.unk_id else int(ty)
        self.sp = SentencePieceProcessor(model_proto=mp.SerializeToString())
        assert self.sp.get_piece_size() == len(self.tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        ctl = [t for t, ty in zip(self.tokens, self.types) if ty == TOKEN_TYPE_CONTROL]
        usr = [t for t, ty in zip(self.tokens, self.types) if ty == TOKEN_TYPE_USER_DEFINED]

        def alt(ts):  # longest first, so "\n\n" wins over "\n"
            return re.compile("|".join(re.escape(t) for t in sorted(ts, key=len, reverse=True)))

        self._split_special = alt(ctl + usr)
        self._split_user = alt(usr)

    def encode(self, text: str, add_bos=None, parse_special: bool = True) -> list:
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        rx = self._split_special if parse_special else self._split_user
        at = 0
        for m in rx.finditer(text):
            if m.start() > at:
                ids += self.sp.encode(text[at:m.start()])
            ids.append(self.ids[m.group(0)])
            at = m.end()
        if at < len(text):
            ids += self.sp.encode(text[at:])
        return ids

    def pieces(self, ids) -> list:
        return [self.tokens[i] for i in ids]

    def decode(self, ids, skip_control: bool = False) -> str:
        """Pieces concatenated, U+2581 -> space, <0xXX> runs -> their UTF-8 bytes."""
        out, buf = [], bytearray()
        for i in ids:
            t, ty = self.tokens[i], self.types[i]
            if ty == TOKEN_TYPE_BYTE:
                buf.append(int(t[3:5], 16))
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if ty == TOKEN_TYPE_CONTROL and skip_control:
                continue
            out.append(t.replace("\u2581", " "))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


def gemma3_tokenizer(path: str = GEMMA3_GGUF) -> Gemma3Tokenizer:
    return Gemma3Tokenizer(path)


def gemma3_chat_prompt(messages) -> str:
    """Gemma's chat template (llama.cpp LLM_CHAT_TEMPLATE_GEMMA / the model card) with the
    generation prompt: "<bos><start_of_turn>user\n{content}<end_of_turn>\n" per turn
    (role "assistant" is written "model"), then "<start_of_turn>model\n".  A system message
    is prepended to the first user turn's content followed by "\n\n", as Gemma's template
    does.  The "<bos>" is part of the text: encode it with add_bos=False."""
    out, sys_prefix = ["<bos>"], ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            sys_prefix = content + "\n\n"
            continue
        if role == "user" and sys_prefix:
            content, sys_prefix = sys_prefix + content, ""
        role = "model" if role == "assistant" else role
        out.append(f"<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


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
    g = gemma3_tokenizer()
    for s in ["Hello world", "The capital of France is", "  two spaces\n\nnewlines 12345 日本語 🍕",
              gemma3_chat_prompt([{"role": "user", "content": "Hi"}])]:
        e = g.encode(s, add_bos=not s.startswith("<bos>"))
        print(repr(s), e, g.pieces(e), repr(g.decode(e)))
    m = minilm_tokenizer()
    print(m.encode("Hello world!").ids)
    print(json.dumps(m.encode("Hello world!").tokens))

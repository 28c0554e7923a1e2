"""Test blocks for wgllm's CPU dequantisers, decoded by gguf-py (`gguf.quants.dequantize`).

Writes models/goldens/quant_blocks.json: for each GGML block format wgllm decodes, a few blocks
(random quants with random finite scales, and the extremes: f16 max, the smallest subnormal and
normal, zero, negative zero and negative scales, infinities and NaNs, all-zero and all-one quant
bits) and gguf-py's f32 output as bit patterns, which tests/quant_gguf_py.rs compares bit for bit
(NaN payloads included: gguf-py's output is the truth, whatever it is).

    pip install gguf numpy
    python3 models/reference/make_quant_blocks.py
"""

import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "goldens", "quant_blocks.json")

# Byte offsets of each format's f16 scale fields within a block.
SCALES = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.IQ4_NL: [0], T.IQ4_XS: [0],
}
# f16 bit patterns: max, -max, smallest subnormal, -0, smallest normal, -1.5, +inf, -inf, the
# quiet NaN, a negative NaN with a payload, a signalling NaN, zero.
EXTREMES = [0x7BFF, 0xFBFF, 0x0001, 0x8000, 0x0400, 0xBE00, 0x7C00, 0xFC00, 0x7E00, 0xFD01, 0x7C01,
            0x0000]


def f16_bytes(v: float) -> bytes:
    return np.array([v], dtype=np.float16).tobytes()


def f16_bits(bits: int) -> bytes:
    return int(bits).to_bytes(2, "little")


def blocks_for(t: T, rng: np.random.Generator) -> bytes:
    _, size = GGML_QUANT_SIZES[t]
    out = []
    # Random quants with random finite scales.
    for _ in range(3):
        b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        for off in SCALES[t]:
            b[off:off + 2] = f16_bytes(float(rng.normal(0, 0.05)))
        out.append(bytes(b))
    # Extreme scales over random quants, and the extreme quants.
    for i, v in enumerate(EXTREMES):
        b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        for k, off in enumerate(SCALES[t]):
            b[off:off + 2] = f16_bits(v if k == 0 else EXTREMES[(i + 1) % len(EXTREMES)])
        out.append(bytes(b))
    for fill in (0x00, 0xFF):
        b = bytearray([fill] * size)
        for off in SCALES[t]:
            b[off:off + 2] = f16_bytes(0.5)
        out.append(bytes(b))
    return b"".join(out)


def main() -> None:
    from importlib.metadata import version
    rng = np.random.default_rng(20261202)
    entries = []
    for t in [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K,
              T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]:
        data = blocks_for(t, rng)
        block, size = GGML_QUANT_SIZES[t]
        n = len(data) // size * block
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and friends, on purpose
            y = dequantize(np.frombuffer(data, dtype=np.uint8), t).astype(np.float32).reshape(-1)
        assert y.shape[0] == n, t.name
        entries.append({
            "format": t.name,
            "ggml_type": int(t),
            "weights": n,
            "blocks_hex": data.hex(),
            "f32_bits_hex": y.view(np.uint32).astype(">u4").tobytes().hex(),
        })
    with open(OUT, "w") as f:
        json.dump({
            "generator": {
                "script": "models/reference/make_quant_blocks.py",
                "gguf": version("gguf"),
                "numpy": np.__version__,
            },
            "definition": "blocks_hex: the GGUF bytes of whole blocks; f32_bits_hex: gguf.quants.dequantize of them, "
                          "each f32 as 8 hex digits of its bit pattern (big-endian).",
            "formats": entries,
        }, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {', '.join(e['format'] + ' ' + str(e['weights']) for e in entries)}")


if __name__ == "__main__":
    main()

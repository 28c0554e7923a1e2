"""Reference blocks for wgllm's ports of ggml's quantisers (src/quant/kquants.rs): quantises a
committed input with ggml's own C reference quantisers (`quantize_row_{q5_0,q5_1,q4_K,q5_K,q6_K}_ref`
in ggml-quants.c) and writes the blocks to models/goldens/ggml_quantize/. Never run in CI.

Usage: python3 make_ggml_quantize_ref.py GGML_DIR
where GGML_DIR is a llama.cpp `ggml/` directory (for instance
`vendor/llama.cpp/ggml` of the llama-cpp-python==0.3.36 sdist; its ggml-quants.c builds on its
own with four stubbed functions). Needs gcc and numpy.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "goldens", "ggml_quantize")

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
#include "ggml-quants.h"
void ggml_abort(const char *f, int l, const char *fmt, ...) { (void)f; (void)l; (void)fmt; abort(); }
size_t ggml_row_size(enum ggml_type t, int64_t n) { (void)t; (void)n; abort(); }
const char *ggml_type_name(enum ggml_type t) { (void)t; abort(); }
size_t ggml_type_size(enum ggml_type t) { (void)t; abort(); }
int main(int argc, char **argv) {
    static float x[1 << 16];
    static unsigned char out[1 << 18];
    FILE *f = fopen(argv[1], "rb");
    size_t n = fread(x, 4, 1 << 16, f);
    fclose(f);
    const char *names[] = {"q5_0", "q5_1", "q4_k", "q5_k", "q6_k"};
    size_t sizes[] = {22 * n / 32, 24 * n / 32, 144 * n / 256, 176 * n / 256, 210 * n / 256};
    for (int t = 0; t < 5; t++) {
        switch (t) {
        case 0: quantize_row_q5_0_ref(x, (void *)out, n); break;
        case 1: quantize_row_q5_1_ref(x, (void *)out, n); break;
        case 2: quantize_row_q4_K_ref(x, (void *)out, n); break;
        case 3: quantize_row_q5_K_ref(x, (void *)out, n); break;
        case 4: quantize_row_q6_K_ref(x, (void *)out, n); break;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.bin", argv[2], names[t]);
        FILE *o = fopen(path, "wb");
        fwrite(out, 1, sizes[t], o);
        fclose(o);
    }
    return 0;
}
"""


def blocks():
    """16 super-blocks: N(0, 1) at scales 1e-3..1e2, and the edge cases of the scale searches
    (all zero, constant, one spike, all negative, all positive and offset, outliers)."""
    rng = np.random.default_rng(11)
    out = [rng.standard_normal(256) * 10 ** rng.uniform(-3, 2) for _ in range(10)]
    out.append(np.zeros(256))
    out.append(np.full(256, 0.75))
    spike = np.zeros(256)
    spike[77] = -3.5
    out.append(spike)
    out.append(-np.abs(rng.standard_normal(256)))
    out.append(np.abs(rng.standard_normal(256)) + 2)
    outliers = rng.standard_normal(256)
    outliers[::32] *= 50
    out.append(outliers)
    return np.concatenate(out).astype(np.float32)


def main():
    ggml = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    x_path = os.path.join(OUT, "x.f32")
    blocks().tofile(x_path)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "h.c")
        with open(src, "w") as f:
            f.write(HARNESS)
        exe = os.path.join(tmp, "h")
        inc = ["-I", os.path.join(ggml, "include"), "-I", os.path.join(ggml, "src")]
        # No contraction into FMAs: the plain f32 operations, as wgllm's port does them.
        subprocess.check_call(["gcc", "-O2", "-ffp-contract=off", "-std=gnu11", *inc, src,
                               os.path.join(ggml, "src", "ggml-quants.c"), "-lm", "-o", exe])
        subprocess.check_call([exe, x_path, OUT])


if __name__ == "__main__":
    main()

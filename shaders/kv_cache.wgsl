// KV-cache store: writes m new rows of keys and values (f32 activations) into one layer's cache,
// converting to the cache's storage type. Layout and byte costs: src/kernels/attention.rs.
// Bindings: 0 = k_in, 1 = v_in (read, f32 [m, n_kv_heads, head_dim]), 2 = k_cache, 3 = v_cache
// (read_write, u32 words), 4 = params.
//
// Every cache row (one position, one kv head) is `row_words` u32 words:
//   KV_DTYPE 0 (f32):  head_dim words, the f32 bits;
//   KV_DTYPE 1 (f16):  head_dim / 2 words, element 2i in the low half of word i;
//   KV_DTYPE 2 (q8_0): ceil(nb / 2) scale words (the f16 d of block b in half b % 2 of word b / 2),
//                      then 8 words of i8 quants per block (four per word, little-endian);
//                      nb = head_dim / 32.
// One invocation writes one "unit" of a row in both K and V: one word for f32/f16; for q8_0 one
// scale word and the (up to) two blocks it describes, so no two invocations share a word.

struct Params {
    rows: u32,          // m * n_kv_heads rows to write
    head_dim: u32,
    row_words: u32,
    dst_row0: u32,      // pos0 * n_kv_heads: first cache row written
    units_per_row: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> k_in: array<f32>;
@group(0) @binding(1) var<storage, read> v_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

override KV_DTYPE: u32 = 0u;
const WG: u32 = 64u;

// Round half away from zero, as Rust's f32::round (and so src/quant) does. `floor(a + 0.5)` would
// round 0.49999997 up; the difference a - floor(a) is exact.
fn round_away(x: f32) -> f32 {
    let a = abs(x);
    var r = floor(a);
    if (a - r >= 0.5) {
        r += 1.0;
    }
    return select(r, -r, x < 0.0);
}

// Quantises block `b` of the row starting at element `src` into words `dst..dst+8` of the cache
// (K when `is_v` is false) and returns its scale d = amax / 127, as src/quant does.
fn q8_block(is_v: bool, src: u32, dst: u32) -> f32 {
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        let x = select(k_in[src + i], v_in[src + i], is_v);
        amax = max(amax, abs(x));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    for (var w = 0u; w < 8u; w++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let x = select(k_in[src + 4u * w + j], v_in[src + 4u * w + j], is_v);
            let q = i32(round_away(x * id));
            word |= (bitcast<u32>(q) & 0xffu) << (8u * j);
        }
        if (is_v) {
            v_cache[dst + w] = word;
        } else {
            k_cache[dst + w] = word;
        }
    }
    return d;
}

@compute @workgroup_size(64)
fn store(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.rows * p.units_per_row) {
        return;
    }
    let r = i / p.units_per_row;
    let u = i % p.units_per_row;
    let src = r * p.head_dim;
    let dst = (p.dst_row0 + r) * p.row_words;
    if (KV_DTYPE == 0u) {
        k_cache[dst + u] = bitcast<u32>(k_in[src + u]);
        v_cache[dst + u] = bitcast<u32>(v_in[src + u]);
    } else if (KV_DTYPE == 1u) {
        let e = src + 2u * u;
        k_cache[dst + u] = pack2x16float(vec2<f32>(k_in[e], k_in[e + 1u]));
        v_cache[dst + u] = pack2x16float(vec2<f32>(v_in[e], v_in[e + 1u]));
    } else {
        // Unit u = scale word u: blocks 2u and 2u + 1 (the second may be past the row's end).
        let nb = p.head_dim / 32u;
        let qbase = dst + p.units_per_row;
        for (var which = 0u; which < 2u; which++) {
            let is_v = which == 1u;
            var d = vec2<f32>(0.0, 0.0);
            for (var j = 0u; j < 2u; j++) {
                let b = 2u * u + j;
                if (b < nb) {
                    d[j] = q8_block(is_v, src + 32u * b, qbase + 8u * b);
                }
            }
            if (is_v) {
                v_cache[dst + u] = pack2x16float(d);
            } else {
                k_cache[dst + u] = pack2x16float(d);
            }
        }
    }
}

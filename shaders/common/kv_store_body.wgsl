// Writing K and V rows into a layer's cache, shared by kv_cache.wgsl and rope_store.wgsl. The
// front file defines `kv_in(is_v, i) -> f32`, element i of the new K (or V) rows (f32
// [m, n_kv_heads, head_dim]), and `kv_pair(is_v, i) -> vec2<f32>`, elements i and i + 1 (i
// even), and `token_pos(t)` and `token_base(t)`, token t's position and the first word of its
// sequence's cache, binds `k_cache` and `v_cache`, and has `head_dim`, `row_words`,
// `n_kv_heads`, `slots` and `units_per_row` in its params `p`.
//
// The cache is a ring of `slots` positions: token t of the new rows (position token_pos(t)) goes
// to slot token_pos(t) % slots of its cache. A global layer's ring is its whole context, where
// that is the position.
//
// Every cache row (one position, one kv head) is `row_words` u32 words:
//   KV_DTYPE 0 (f32):  head_dim words, the f32 bits;
//   KV_DTYPE 1 (f16):  head_dim / 2 words, element 2i in the low half of word i;
//   KV_DTYPE 2 (q8_0): ceil(nb / 2) scale words (the f16 d of block b in half b % 2 of word b / 2),
//                      then 8 words of i8 quants per block (four per word, little-endian);
//                      nb = head_dim / 32.
// One invocation writes one "unit" of a row in both K and V: one word for f32/f16; for q8_0 one
// scale word and the (up to) two blocks it describes, so no two invocations share a word.

override KV_DTYPE: u32 = 0u;

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
        let x = kv_in(is_v, src + i);
        amax = max(amax, abs(x));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d != 0.0);
    for (var w = 0u; w < 8u; w++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            let x = kv_in(is_v, src + 4u * w + j);
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

// Writes unit `u` of new row `r` (token * n_kv_heads + head) in K and V.
fn store_unit(r: u32, u: u32) {
    let src = r * p.head_dim;
    let t = r / p.n_kv_heads;
    let slot = token_pos(t) % p.slots;
    let dst = token_base(t) + (slot * p.n_kv_heads + r % p.n_kv_heads) * p.row_words;
    if (KV_DTYPE == 0u) {
        k_cache[dst + u] = bitcast<u32>(kv_in(false, src + u));
        v_cache[dst + u] = bitcast<u32>(kv_in(true, src + u));
    } else if (KV_DTYPE == 1u) {
        let e = src + 2u * u;
        k_cache[dst + u] = pack2x16float(kv_pair(false, e));
        v_cache[dst + u] = pack2x16float(kv_pair(true, e));
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

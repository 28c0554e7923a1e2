// What the attention kernels share (attention.wgsl, attention_sg.wgsl): params, bindings and the
// reading of K and V rows in the cache layout of shaders/kv_cache.wgsl.
// Bindings: 0 = q (read, f32 [m, n_heads, head_dim]), 1 = k_cache, 2 = v_cache (read, u32 words),
// 3 = out (read_write, f32 like q), 4 = rows (read, the row table), 5 = params.
//
// Where token t's keys are: one sequence (table == 0) has its cache at word `base` of k_cache and
// v_cache and token t at position pos0 + t; decode rows of several sequences (table == 1, a
// batched decode step) each have their own: `rows[row0 + t]` = (slot, position), every slot's
// cache in the same buffers (slot-major: slot s from word s * slots * n_kv_heads * row_words). Row t of q, out and the partials is then row0 + t, so
// a step whose slots' caches lie in several buffers dispatches once per buffer. Without a table
// the `rows` binding is bound to any buffer and never read.

struct Params {
    m: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    group: u32,       // n_heads / n_kv_heads
    row_words: u32,   // u32 words of one cache row (one position, one kv head)
    n_wg: u32,        // workgroups that do work
    scale: f32,
    causal: u32,      // 1: keys 0..=pos0+t; 0: keys 0..n_keys for every query
    n_keys: u32,      // keys every query sees when causal == 0
    splits: u32,      // attention_sg.wgsl's split entries: parts the keys are split in
    window: u32,      // causal: query position t sees keys t + 1 - window ..= t (0xffffffff: all)
    slots: u32,       // the cache is a ring: position k lives in row k % slots
    base: u32,        // table == 0: first word of the sequence's cache (its slot)
    table: u32,       // 1: each token's (slot, position) from `rows` (see above; = TABLE)
    row0: u32,        // table == 1: the dispatch's first row of q, out, rows and the partials
    keys_per_split: u32, // table == 1, split entries: a row's parts are its keys / this, 1..splits
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> k_cache: array<u32>;
@group(0) @binding(2) var<storage, read> v_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> rows: array<vec2<u32>>;
@group(0) @binding(5) var<uniform> p: Params;

// 0 = f32, 1 = f16, 2 = q8_0 (set per pipeline, so the branches below fold away).
override KV_DTYPE: u32 = 0u;

// 1: a row table (set per pipeline with the params' `table`, so a single sequence's kernels
// carry no branch on it).
override TABLE: u32 = 0u;

// Stands in for -inf: exp(NEG - finite) is 0 and NEG - NEG is 0, where -inf would give NaN.
const NEG: f32 = -3.0e38;

// Position of token (row) t of the dispatch, and the first word of its sequence's cache.
fn token_pos(t: u32) -> u32 {
    if (TABLE != 0u) {
        return rows[p.row0 + t].y;
    }
    return p.pos0 + t;
}

fn token_base(t: u32) -> u32 {
    if (TABLE != 0u) {
        return rows[p.row0 + t].x * p.slots * p.n_kv_heads * p.row_words;
    }
    return p.base;
}

// First word of key position `pos`'s row in the cache starting at word `base` (slot pos % slots
// of the ring; a global layer's ring is its whole context, where the slot is the position).
fn row_base(base: u32, pos: u32, kvh: u32) -> u32 {
    return base + ((pos % p.slots) * p.n_kv_heads + kvh) * p.row_words;
}

// Token t's keys: (lo, n_keys), keys lo .. lo + n_keys (lo: 0 but past a sliding window's start).
fn token_keys(t: u32) -> vec2<u32> {
    let pos = token_pos(t);
    let lo = first_key(pos);
    return vec2<u32>(lo, select(p.n_keys, pos + 1u - lo, p.causal != 0u));
}

// Parts a decode row's keys are split in by the split entries: with a row table each row's own
// (its keys / keys_per_split, 1 to splits: what the host's `key_splits` gives that row alone),
// else the dispatch's.
fn row_parts(n_keys: u32) -> u32 {
    if (TABLE != 0u) {
        return clamp(n_keys / p.keys_per_split, 1u, p.splits);
    }
    return p.splits;
}

// The first key query position `qpos` sees: qpos + 1 - window, or 0 (Hugging Face's and
// llama.cpp's sliding window: key k is seen when qpos - k < window). 0 when bidirectional.
fn first_key(qpos: u32) -> u32 {
    return select(0u, qpos + 1u - min(qpos + 1u, p.window), p.causal != 0u);
}

fn q8_scale(w: u32, b: u32) -> f32 {
    return unpack2x16float(w)[b & 1u];
}

fn q8_quads(w: u32) -> vec4<f32> {
    let s = vec4<i32>(bitcast<i32>(w << 24u), bitcast<i32>(w << 16u), bitcast<i32>(w << 8u), bitcast<i32>(w));
    return vec4<f32>(s >> vec4<u32>(24u));
}

// Elements 4*d4 .. 4*d4+3 of the K row starting at word `base`.
fn k_load4(base: u32, d4: u32) -> vec4<f32> {
    if (KV_DTYPE == 0u) {
        let o = base + 4u * d4;
        return bitcast<vec4<f32>>(vec4<u32>(k_cache[o], k_cache[o + 1u], k_cache[o + 2u], k_cache[o + 3u]));
    } else if (KV_DTYPE == 1u) {
        let o = base + 2u * d4;
        return vec4<f32>(unpack2x16float(k_cache[o]), unpack2x16float(k_cache[o + 1u]));
    }
    let b = d4 / 8u;
    let nsw = (p.head_dim / 32u + 1u) / 2u;
    return q8_scale(k_cache[base + b / 2u], b) * q8_quads(k_cache[base + nsw + d4]);
}

// The same for V.
fn v_load4(base: u32, d4: u32) -> vec4<f32> {
    if (KV_DTYPE == 0u) {
        let o = base + 4u * d4;
        return bitcast<vec4<f32>>(vec4<u32>(v_cache[o], v_cache[o + 1u], v_cache[o + 2u], v_cache[o + 3u]));
    } else if (KV_DTYPE == 1u) {
        let o = base + 2u * d4;
        return vec4<f32>(unpack2x16float(v_cache[o]), unpack2x16float(v_cache[o + 1u]));
    }
    let b = d4 / 8u;
    let nsw = (p.head_dim / 32u + 1u) / 2u;
    return q8_scale(v_cache[base + b / 2u], b) * q8_quads(v_cache[base + nsw + d4]);
}

// ---- split keys: the merge of the parts ----------------------------------------------------------
// The split entries (attention_sg.wgsl's attend_sg_split, attention.wgsl's attend_group_split)
// write each query row's partial state of each part in the `out` binding: per row and part one
// vec4 (m, l, 0, 0), the running maximum and sum, then head_dim / 4 vec4s of the unnormalised V
// sum, at ((row * splits) + part) * partial_len(). With a row table, a row of one part holds its
// finished output in its first part's V sum instead.

// vec4s of one query row's partial state of one split.
fn partial_len() -> u32 {
    return p.head_dim / 4u + 1u;
}

// One invocation per query row and vec4 of head_dim: merges the row's splits (partials bound as q).
@compute @workgroup_size(64)
fn attend_combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let hd4 = p.head_dim / 4u;
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.m * p.n_heads * hd4) {
        return;
    }
    let row = p.row0 * p.n_heads + i / hd4;
    let d4 = i % hd4;
    let base = row * p.splits * partial_len();
    let parts = row_parts(token_keys(i / hd4 / p.n_heads).y);
    if (TABLE != 0u && parts == 1u) {
        out[row * hd4 + d4] = q[base + 1u + d4]; // finished by the split entry
        return;
    }
    var m = NEG;
    for (var s = 0u; s < parts; s++) {
        m = max(m, q[base + s * partial_len()].x);
    }
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < parts; s++) {
        let o = base + s * partial_len();
        let w = exp(q[o].x - m);
        l += q[o].y * w;
        acc += q[o + 1u + d4] * w;
    }
    out[row * hd4 + d4] = acc / l;
}

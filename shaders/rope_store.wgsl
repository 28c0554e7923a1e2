// RoPE of the new queries and keys fused with the KV-cache store: one dispatch where rope.wgsl and
// kv_cache.wgsl took two. Queries are rotated IN PLACE (q [m, n_heads, head_dim], one invocation a
// pair, as rope.wgsl); keys are rotated as the store reads them, and go to the cache with the
// values (k_in, v_in [m, n_kv_heads, head_dim], one invocation a store unit, as kv_cache.wgsl).
// k_in itself is left as it was: attention reads keys from the cache.
//
// A store unit may need elements whose pair partner another invocation owns (q8_0 blocks, and
// rotate-half pairs that lie half a head apart), so each key element is rotated on its own from
// its pair (two loads and the angle per element read) instead of being rotated in place first,
// which would need a barrier across workgroups. The arithmetic is rope.wgsl's, so stored keys
// equal rope then store bit for bit.
// Token t has position pos0 + t and its cache at word `base`; mode 0 pairs elements (2i, 2i + 1),
// mode 1 (i, i + rot_dim / 2); elements from rot_dim on are not rotated.
// A batched decode step (table == 1) has decode rows of several sequences instead, every slot's
// cache in the same buffers: row t of the dispatch is row row0 + t of q, k_in and v_in, and
// `rows[row0 + t]` holds its (slot, position), as in common/attention_io.wgsl. Without a table the
// `rows` binding is bound to any buffer and never read.
// Bindings: 0 = q (read_write), 1 = k_in, 2 = v_in (read), 3 = k_cache, 4 = v_cache (read_write,
// u32 words), 5 = rows (read), 6 = params.

// #include "common/rope_angle.wgsl"
// #include "common/kv_store_body.wgsl"

struct Params {
    m: u32,
    n_heads: u32,       // of q
    n_kv_heads: u32,    // of k and v
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    row_words: u32,     // cache words per row
    units_per_row: u32, // store units per cache row
    slots: u32,         // the ring's length: position p goes to slot p % slots
    base: u32,          // table == 0: first word of the sequence's cache
    table: u32,         // 1: each row's (slot, position) from `rows`
    row0: u32,          // table == 1: the dispatch's first row
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    q: array<vec4<f32>, 128>, // frequencies: see common/rope_angle.wgsl
}

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_in: array<f32>;
@group(0) @binding(2) var<storage, read> v_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> rows: array<vec2<u32>>;
@group(0) @binding(6) var<uniform> p: Params;

const WG: u32 = 64u;

// 1: a row table (set per pipeline with the params' `table`, so a single sequence's kernel
// carries no branch on it).
override TABLE: u32 = 0u;

// Position of token t (of the whole q, k_in, v_in: row0 included) and its cache's first word.
fn token_pos(t: u32) -> u32 {
    if (TABLE != 0u) {
        return rows[t].y;
    }
    return p.pos0 + t;
}

fn token_base(t: u32) -> u32 {
    if (TABLE != 0u) {
        return rows[t].x * p.slots * p.n_kv_heads * p.row_words;
    }
    return p.base;
}

// Element i of the new rows: values as they are, keys rotated (the formulas of rope.wgsl).
fn kv_in(is_v: bool, i: u32) -> f32 {
    if (is_v) {
        return v_in[i];
    }
    let e = i % p.head_dim;
    if (e >= p.rot_dim) {
        return k_in[i];
    }
    let half = p.rot_dim / 2u;
    var pair = e / 2u;
    var first = e % 2u == 0u;
    var partner = i ^ 1u; // heads start at even elements (head_dim is even)
    if (p.mode == 1u) {
        first = e < half;
        pair = select(e - half, e, first);
        partner = select(i - half, i + half, first);
    }
    let t = i / p.head_dim / p.n_kv_heads;
    let cs = rotation(token_pos(t), pair);
    if (first) {
        return k_in[i] * cs.x - k_in[partner] * cs.y;
    }
    return k_in[partner] * cs.y + k_in[i] * cs.x;
}

// Elements i and i + 1 (i even): with interleaved pairs, one rotation gives both keys.
fn kv_pair(is_v: bool, i: u32) -> vec2<f32> {
    let e = i % p.head_dim;
    if (is_v || p.mode != 0u || e >= p.rot_dim) {
        return vec2<f32>(kv_in(is_v, i), kv_in(is_v, i + 1u));
    }
    let cs = rotation(token_pos(i / p.head_dim / p.n_kv_heads), e / 2u);
    let x0 = k_in[i];
    let x1 = k_in[i + 1u];
    return vec2<f32>(x0 * cs.x - x1 * cs.y, x0 * cs.y + x1 * cs.x);
}

@compute @workgroup_size(64)
fn rope_store(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    let half = p.rot_dim / 2u;
    let n_pairs = p.m * p.n_heads * half;
    if (g < n_pairs) {
        // Pairs and store units count from the dispatch's first row (row0: 0 without a table).
        let gp = g + p.row0 * p.n_heads * half;
        let r = pair_at_pos(gp, p.n_heads, token_pos(gp / half / p.n_heads));
        let x0 = q[r.a];
        let x1 = q[r.b];
        q[r.a] = x0 * r.cs.x - x1 * r.cs.y;
        q[r.b] = x0 * r.cs.y + x1 * r.cs.x;
        return;
    }
    let u = g - n_pairs;
    if (u < p.m * p.n_kv_heads * p.units_per_row) {
        store_unit(p.row0 * p.n_kv_heads + u / p.units_per_row, u % p.units_per_row);
    }
}

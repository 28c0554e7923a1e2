// Attention for CPU Vulkan devices with 8-lane subgroups (lavapipe): the same function as
// attention.wgsl (causal or bidirectional, grouped-query, online softmax), organised for llvmpipe,
// where every load from a storage buffer or workgroup memory is a loop over the SIMD lanes and a
// barrier switches between the workgroup's threads.
//
// A workgroup is one subgroup of 8 lanes and computes one token for the G query heads of one kv
// head (GQA), so each K and V row is loaded once for G queries. The lanes split head_dim: lane l
// owns 4 * HD4 consecutive dimensions (HD4 = head_dim / 32 vec4s, 1 to 4). Per key, each lane
// loads its slice of K and V, a subgroupAdd makes each query's score, and every lane updates the
// running maximum, sum and its slice of the weighted V sum. No workgroup memory, no barriers;
// per-query state lives in module-scope structs with named members (llvmpipe keeps arrays it
// cannot resolve in memory), and the loops over queries and vec4s are spelled out under
// `if (G > i)` / `if (HD4 > j)`, which pipeline creation folds away.
//
// Split keys (decode over a long context, where one token has only n_kv_heads subgroups of work):
// attend_sg_split gives each (token, kv head) `splits` subgroups, each over its share of the keys,
// and writes each query's partial state (running maximum m, sum l and unnormalised V sum) in the
// `out` binding, laid out per query row and split as one vec4 (m, l, 0, 0) and head_dim / 4
// vec4s of sums. attend_combine then merges a row's splits (each rescaled by exp(m_s - max m)) into
// the real output, binding the partials in q's slot: the same softmax, summed in another order.
// With a row table (a batched decode step, common/attention_io.wgsl) each row is split in its own
// parts (row_parts: what that row alone would get), `splits` being the most of any row; a row's
// extra workgroups return at once, and a row of one part writes its finished output (the
// arithmetic of `put`) into its partial slot, which attend_combine copies: every row's output is
// bit for bit that of the row alone.

// #include "common/attention_io.wgsl"

// Query heads per kv head (1 to 8) and vec4s of head_dim per lane (1 to 4).
override G: u32 = 1u;
override HD4: u32 = 2u;

struct V4 {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
}

// One query's slice of q (pre-scaled), running maximum and sum, and slice of the V sum.
struct Query {
    q: V4,
    acc: V4,
    m: f32,
    l: f32,
}

var<private> q0: Query;
var<private> q1: Query;
var<private> q2: Query;
var<private> q3: Query;
var<private> q4: Query;
var<private> q5: Query;
var<private> q6: Query;
var<private> q7: Query;
var<private> kr: V4;
var<private> vr: V4;

// The lane's slice of the K (or V) row at word `base`: vec4s 4-component index lane * HD4 + j.
fn k_slice(base: u32, lane: u32) -> V4 {
    var r: V4;
    let d = lane * HD4;
    r.a0 = k_load4(base, d);
    if (HD4 > 1u) { r.a1 = k_load4(base, d + 1u); }
    if (HD4 > 2u) { r.a2 = k_load4(base, d + 2u); }
    if (HD4 > 3u) { r.a3 = k_load4(base, d + 3u); }
    return r;
}

fn v_slice(base: u32, lane: u32) -> V4 {
    var r: V4;
    let d = lane * HD4;
    r.a0 = v_load4(base, d);
    if (HD4 > 1u) { r.a1 = v_load4(base, d + 1u); }
    if (HD4 > 2u) { r.a2 = v_load4(base, d + 2u); }
    if (HD4 > 3u) { r.a3 = v_load4(base, d + 3u); }
    return r;
}

fn q_slice(row: u32, lane: u32) -> V4 {
    var r: V4;
    let i = row * (p.head_dim / 4u) + lane * HD4;
    r.a0 = q[i] * p.scale;
    if (HD4 > 1u) { r.a1 = q[i + 1u] * p.scale; }
    if (HD4 > 2u) { r.a2 = q[i + 2u] * p.scale; }
    if (HD4 > 3u) { r.a3 = q[i + 3u] * p.scale; }
    return r;
}

fn dot4(a: V4, b: V4) -> f32 {
    var s = dot(a.a0, b.a0);
    if (HD4 > 1u) { s += dot(a.a1, b.a1); }
    if (HD4 > 2u) { s += dot(a.a2, b.a2); }
    if (HD4 > 3u) { s += dot(a.a3, b.a3); }
    return s;
}

fn init(row: u32, lane: u32) -> Query {
    var r: Query;
    r.q = q_slice(row, lane);
    r.m = NEG;
    return r;
}

// Folds the key in `kr`/`vr` into one query (called in uniform control flow: subgroupAdd).
fn update(s: ptr<private, Query>) {
    let score = subgroupAdd(dot4((*s).q, kr));
    let m_new = max((*s).m, score);
    let corr = exp((*s).m - m_new);
    let w = exp(score - m_new);
    (*s).l = (*s).l * corr + w;
    (*s).acc.a0 = (*s).acc.a0 * corr + w * vr.a0;
    if (HD4 > 1u) { (*s).acc.a1 = (*s).acc.a1 * corr + w * vr.a1; }
    if (HD4 > 2u) { (*s).acc.a2 = (*s).acc.a2 * corr + w * vr.a2; }
    if (HD4 > 3u) { (*s).acc.a3 = (*s).acc.a3 * corr + w * vr.a3; }
    (*s).m = m_new;
}

fn put(row: u32, lane: u32, s: Query) {
    let i = row * (p.head_dim / 4u) + lane * HD4;
    let inv = 1.0 / s.l;
    out[i] = s.acc.a0 * inv;
    if (HD4 > 1u) { out[i + 1u] = s.acc.a1 * inv; }
    if (HD4 > 2u) { out[i + 2u] = s.acc.a2 * inv; }
    if (HD4 > 3u) { out[i + 3u] = s.acc.a3 * inv; }
}

// One token's G queries over part `part` of `parts` of its keys, left in q0..q7.
fn attend(t: u32, kvh: u32, lane: u32, part: u32, parts: u32) {
    let row = (p.row0 + t) * p.n_heads + kvh * G;
    let keys = token_keys(t);
    let lo = keys.x;
    let n_keys = keys.y;
    let cache = token_base(t);
    let per = (n_keys + parts - 1u) / parts;
    let end = min(n_keys, (part + 1u) * per);
    q0 = init(row, lane);
    if (G > 1u) { q1 = init(row + 1u, lane); }
    if (G > 2u) { q2 = init(row + 2u, lane); }
    if (G > 3u) { q3 = init(row + 3u, lane); }
    if (G > 4u) { q4 = init(row + 4u, lane); }
    if (G > 5u) { q5 = init(row + 5u, lane); }
    if (G > 6u) { q6 = init(row + 6u, lane); }
    if (G > 7u) { q7 = init(row + 7u, lane); }
    for (var j = part * per; j < end; j++) {
        let base = row_base(cache, lo + j, kvh);
        kr = k_slice(base, lane);
        vr = v_slice(base, lane);
        update(&q0);
        if (G > 1u) { update(&q1); }
        if (G > 2u) { update(&q2); }
        if (G > 3u) { update(&q3); }
        if (G > 4u) { update(&q4); }
        if (G > 5u) { update(&q5); }
        if (G > 6u) { update(&q6); }
        if (G > 7u) { update(&q7); }
    }
}

@compute @workgroup_size(8)
fn attend_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return; // the whole workgroup (one subgroup): uniform
    }
    let t = wg / p.n_kv_heads;
    let kvh = wg % p.n_kv_heads;
    attend(t, kvh, lane, 0u, 1u);
    // Rows of q and out of this token's query heads kvh * G .. kvh * G + G - 1.
    let row = (p.row0 + t) * p.n_heads + kvh * G;
    put(row, lane, q0);
    if (G > 1u) { put(row + 1u, lane, q1); }
    if (G > 2u) { put(row + 2u, lane, q2); }
    if (G > 3u) { put(row + 3u, lane, q3); }
    if (G > 4u) { put(row + 4u, lane, q4); }
    if (G > 5u) { put(row + 5u, lane, q5); }
    if (G > 6u) { put(row + 6u, lane, q6); }
    if (G > 7u) { put(row + 7u, lane, q7); }
}

// Writes query row `row`'s partial state of split `part` (see the top of the file).
fn put_partial(row: u32, part: u32, lane: u32, s: Query) {
    let base = (row * p.splits + part) * partial_len();
    if (lane == 0u) {
        out[base] = vec4<f32>(s.m, s.l, 0.0, 0.0);
    }
    let i = base + 1u + lane * HD4;
    out[i] = s.acc.a0;
    if (HD4 > 1u) { out[i + 1u] = s.acc.a1; }
    if (HD4 > 2u) { out[i + 2u] = s.acc.a2; }
    if (HD4 > 3u) { out[i + 3u] = s.acc.a3; }
}

// A row table's row of one part: its finished output (put's arithmetic) in its partial slot.
fn put_done(row: u32, lane: u32, s: Query) {
    let i = row * p.splits * partial_len() + 1u + lane * HD4;
    let inv = 1.0 / s.l;
    out[i] = s.acc.a0 * inv;
    if (HD4 > 1u) { out[i + 1u] = s.acc.a1 * inv; }
    if (HD4 > 2u) { out[i + 2u] = s.acc.a2 * inv; }
    if (HD4 > 3u) { out[i + 3u] = s.acc.a3 * inv; }
}

fn put_split(row: u32, part: u32, parts: u32, lane: u32, s: Query) {
    if (TABLE != 0u && parts == 1u) {
        put_done(row, lane, s);
    } else {
        put_partial(row, part, lane, s);
    }
}

@compute @workgroup_size(8)
fn attend_sg_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return; // the whole workgroup (one subgroup): uniform
    }
    let part = wg % p.splits;
    let tk = wg / p.splits;
    let t = tk / p.n_kv_heads;
    let kvh = tk % p.n_kv_heads;
    let parts = row_parts(token_keys(t).y);
    if (part >= parts) {
        return; // a row table's row of fewer parts (the whole workgroup: uniform)
    }
    attend(t, kvh, lane, part, parts);
    let row = (p.row0 + t) * p.n_heads + kvh * G;
    put_split(row, part, parts, lane, q0);
    if (G > 1u) { put_split(row + 1u, part, parts, lane, q1); }
    if (G > 2u) { put_split(row + 2u, part, parts, lane, q2); }
    if (G > 3u) { put_split(row + 3u, part, parts, lane, q3); }
    if (G > 4u) { put_split(row + 4u, part, parts, lane, q4); }
    if (G > 5u) { put_split(row + 5u, part, parts, lane, q5); }
    if (G > 6u) { put_split(row + 6u, part, parts, lane, q6); }
    if (G > 7u) { put_split(row + 7u, part, parts, lane, q7); }
}

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

@compute @workgroup_size(8)
fn attend_sg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return; // the whole workgroup (one subgroup): uniform
    }
    let t = wg / p.n_kv_heads;
    let kvh = wg % p.n_kv_heads;
    // Rows of q and out of this token's query heads kvh * G .. kvh * G + G - 1.
    let row = t * p.n_heads + kvh * G;
    let n_keys = select(p.n_keys, p.pos0 + t + 1u, p.causal != 0u);
    q0 = init(row, lane);
    if (G > 1u) { q1 = init(row + 1u, lane); }
    if (G > 2u) { q2 = init(row + 2u, lane); }
    if (G > 3u) { q3 = init(row + 3u, lane); }
    if (G > 4u) { q4 = init(row + 4u, lane); }
    if (G > 5u) { q5 = init(row + 5u, lane); }
    if (G > 6u) { q6 = init(row + 6u, lane); }
    if (G > 7u) { q7 = init(row + 7u, lane); }
    for (var j = 0u; j < n_keys; j++) {
        let base = row_base(j, kvh);
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
    put(row, lane, q0);
    if (G > 1u) { put(row + 1u, lane, q1); }
    if (G > 2u) { put(row + 2u, lane, q2); }
    if (G > 3u) { put(row + 3u, lane, q3); }
    if (G > 4u) { put(row + 4u, lane, q4); }
    if (G > 5u) { put(row + 5u, lane, q5); }
    if (G > 6u) { put(row + 6u, lane, q6); }
    if (G > 7u) { put(row + 7u, lane, q7); }
}

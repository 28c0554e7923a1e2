// Attention of m query tokens over one layer's KV cache, with grouped-query attention. Causal
// (decoders): query token t (position pos0 + t), head h attends keys 0..=pos0+t of kv head
// h / group, or of a sliding-window layer the last `window` of them (read from a ring of `slots`
// rows: common/attention_io.wgsl's row_base). Bidirectional (encoders, causal == 0): every query attends keys 0..n_keys. Both use a
// numerically stable online softmax (flash-attention style): scores live only in workgroup memory.
// Bindings: 0 = q (read, f32 [m, n_heads, head_dim]), 1 = k_cache, 2 = v_cache (read, u32 words in
// the row layout of shaders/kv_cache.wgsl), 3 = out (read_write, f32 like q), 4 = rows (the row
// table of a batched decode step: common/attention_io.wgsl), 5 = params.
//
// Two entry points:
// - `attend_rows` (decode): one workgroup per (token, head). Each tile of WG keys is split over the
//   threads (one score each); the tile's probabilities go through workgroup memory and the
//   weighted sum of V rows is split over (vec4 of head_dim, key subset), so every thread keeps one
//   vec4 accumulator. head_dim <= 256.
// - `attend_tiled` (prefill): one workgroup per (tile of TQ tokens, head). K and V tiles of TK keys
//   are staged once in workgroup memory and used by all TQ queries. head_dim <= 128.
// - `attend_group` / `attend_group_split` (decode on GPUs): one workgroup per (token, kv head, part
//   of the keys): the G query heads of a GQA group share each K and V load (flash-decoding). Each
//   thread scores one key of a tile for all G queries; each (vec4 column, key subset) thread
//   accumulates that column of V for all G. `attend_group` writes the output (one part);
//   `attend_group_split` writes each part's partial state, which `attend_combine`
//   (common/attention_io.wgsl) merges. G <= GMAX, head_dim <= 256.

// #include "common/attention_io.wgsl"

// ---- decode: one workgroup per (token, head) ----------------------------------------------------

const WG: u32 = 64u;      // threads, and keys per tile
const HD4R: u32 = 64u;    // head_dim / 4 at most

var<workgroup> r_q: array<vec4<f32>, HD4R>;
var<workgroup> r_s: array<f32, WG>;
var<workgroup> r_part: array<f32, 8>;
var<workgroup> r_p: array<f32, WG>;
var<workgroup> r_acc: array<vec4<f32>, WG>;

@compute @workgroup_size(64)
fn attend_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return;
    }
    let t = wg / p.n_heads;
    let h = wg % p.n_heads;
    let kvh = h / p.group;
    let hd4 = p.head_dim / 4u;
    // Row of q and out (a batched step's rows start at row0), the token's position and cache.
    let qrow = p.row0 * p.n_heads + wg;
    let pos = token_pos(t);
    let cache = token_base(t);
    if (lid < hd4) {
        r_q[lid] = q[qrow * hd4 + lid] * p.scale;
    }
    // Keys lo .. lo + n_keys (lo: 0 but past a sliding window's start).
    let lo = first_key(pos);
    let n_keys = select(p.n_keys, pos + 1u - lo, p.causal != 0u);
    // V phase: thread = (vec4 column dq, key subset kg of n_kg); the rest idle there.
    let n_kg = WG / hd4;
    let dq = lid % hd4;
    let kg = lid / hd4;
    var m_run = NEG;
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    workgroupBarrier();
    for (var base = 0u; base < n_keys; base += WG) {
        let j = base + lid;
        let valid = j < n_keys;
        var s = NEG;
        if (valid) {
            let kb = row_base(cache, lo + j, kvh);
            var a = vec4<f32>(0.0);
            for (var d4 = 0u; d4 < hd4; d4++) {
                a += r_q[d4] * k_load4(kb, d4);
            }
            s = a.x + a.y + a.z + a.w;
        }
        r_s[lid] = s;
        workgroupBarrier();
        // Tile maximum in two levels: 8 partial maxima of 8, then everyone reads the 8.
        if (lid < 8u) {
            var mx = r_s[8u * lid];
            for (var i = 1u; i < 8u; i++) {
                mx = max(mx, r_s[8u * lid + i]);
            }
            r_part[lid] = mx;
        }
        workgroupBarrier();
        var mx = r_part[0];
        for (var i = 1u; i < 8u; i++) {
            mx = max(mx, r_part[i]);
        }
        let m_new = max(m_run, mx);
        let c = exp(m_run - m_new);
        m_run = m_new;
        let pj = select(0.0, exp(s - m_new), valid);
        // Every thread rescales by the same c, so the per-thread sums add up to the total.
        l = l * c + pj;
        r_p[lid] = pj;
        workgroupBarrier();
        acc *= c;
        if (kg < n_kg) {
            let nk = min(WG, n_keys - base);
            for (var i = kg; i < nk; i += n_kg) {
                acc += r_p[i] * v_load4(row_base(cache, lo + base + i, kvh), dq);
            }
        }
        // r_s and r_part are rewritten only after the next tile's first barrier, which every
        // thread reaches only after its reads above.
    }
    r_s[lid] = l;
    r_acc[lid] = acc;
    workgroupBarrier();
    if (lid < hd4) {
        var lt = 0.0;
        for (var i = 0u; i < WG; i++) {
            lt += r_s[i];
        }
        var o = vec4<f32>(0.0);
        for (var g = 0u; g < n_kg; g++) {
            o += r_acc[g * hd4 + lid];
        }
        out[qrow * hd4 + lid] = o / lt;
    }
}

// ---- prefill: one workgroup per (tile of TQ tokens, head) ---------------------------------------

const TQ: u32 = 16u;      // query tokens per workgroup
const TK: u32 = 16u;      // keys per tile
const HD4T: u32 = 32u;    // head_dim / 4 at most

var<workgroup> t_q: array<vec4<f32>, 512>;   // TQ * HD4T, pre-scaled queries
var<workgroup> t_kv: array<vec4<f32>, 512>;  // TK * HD4T, the K tile, then the V tile
var<workgroup> t_o: array<vec4<f32>, 512>;   // TQ * HD4T, unnormalised outputs
var<workgroup> t_p: array<f32, 256>;         // TQ * TK scores, then probabilities
var<workgroup> t_c: array<f32, TQ>;          // per-query rescale factor of this tile, then 1/l

@compute @workgroup_size(64)
fn attend_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return;
    }
    let q0 = (wg / p.n_heads) * TQ;
    let h = wg % p.n_heads;
    let kvh = h / p.group;
    let hd4 = p.head_dim / 4u;
    let nq = min(TQ, p.m - q0);
    for (var i = lid; i < TQ * hd4; i += WG) {
        let qi = i / hd4;
        let d4 = i % hd4;
        var v = vec4<f32>(0.0);
        if (qi < nq) {
            v = q[((q0 + qi) * p.n_heads + h) * hd4 + d4] * p.scale;
        }
        t_q[qi * HD4T + d4] = v;
        t_o[qi * HD4T + d4] = vec4<f32>(0.0);
    }
    // Softmax state of query row `lid` (threads 0..TQ-1 only).
    var m_run = NEG;
    var l = 0.0;
    // Keys lo..n_keys: from the first query's window start (0 for a global layer) to the last
    // query's position.
    let n_keys = select(p.n_keys, p.pos0 + q0 + nq, p.causal != 0u);
    let lo = first_key(p.pos0 + q0);
    // S phase: thread = (key kj, queries qb, qb+4, qb+8, qb+12).
    let kj = lid % TK;
    let qb = lid / TK;
    for (var kb = lo; kb < n_keys; kb += TK) {
        workgroupBarrier();
        for (var i = lid; i < TK * hd4; i += WG) {
            let r = i / hd4;
            let d4 = i % hd4;
            var v = vec4<f32>(0.0);
            if (kb + r < n_keys) {
                v = k_load4(row_base(p.base, kb + r, kvh), d4);
            }
            t_kv[r * HD4T + d4] = v;
        }
        workgroupBarrier();
        var s = vec4<f32>(0.0);
        for (var d4 = 0u; d4 < hd4; d4++) {
            let kv = t_kv[kj * HD4T + d4];
            s += vec4<f32>(dot(t_q[qb * HD4T + d4], kv), dot(t_q[(qb + 4u) * HD4T + d4], kv),
                           dot(t_q[(qb + 8u) * HD4T + d4], kv), dot(t_q[(qb + 12u) * HD4T + d4], kv));
        }
        for (var r = 0u; r < 4u; r++) {
            let qi = qb + 4u * r;
            // Key kb + kj exists, and (causal) is visible to query position pos0 + q0 + qi: not
            // after it, nor before its window.
            let j = kb + kj;
            let qpos = p.pos0 + q0 + qi;
            let visible = j < n_keys && (p.causal == 0u || (j <= qpos && j >= first_key(qpos)));
            t_p[qi * TK + kj] = select(NEG, s[r], visible);
        }
        workgroupBarrier();
        if (lid < TQ) {
            var mx = NEG;
            for (var j = 0u; j < TK; j++) {
                mx = max(mx, t_p[lid * TK + j]);
            }
            let m_new = max(m_run, mx);
            let c = exp(m_run - m_new);
            var sum = 0.0;
            for (var j = 0u; j < TK; j++) {
                let sj = t_p[lid * TK + j];
                let pj = select(0.0, exp(sj - m_new), sj > NEG);
                t_p[lid * TK + j] = pj;
                sum += pj;
            }
            l = l * c + sum;
            m_run = m_new;
            t_c[lid] = c;
        }
        // The K tile is no longer read: replace it by the V tile.
        for (var i = lid; i < TK * hd4; i += WG) {
            let r = i / hd4;
            let d4 = i % hd4;
            var v = vec4<f32>(0.0);
            if (kb + r < n_keys) {
                v = v_load4(row_base(p.base, kb + r, kvh), d4);
            }
            t_kv[r * HD4T + d4] = v;
        }
        workgroupBarrier();
        for (var i = lid; i < TQ * hd4; i += WG) {
            let qi = i / hd4;
            let d4 = i % hd4;
            var o = t_o[qi * HD4T + d4] * t_c[qi];
            for (var j = 0u; j < TK; j++) {
                o += t_p[qi * TK + j] * t_kv[j * HD4T + d4];
            }
            t_o[qi * HD4T + d4] = o;
        }
    }
    workgroupBarrier();
    if (lid < TQ) {
        t_c[lid] = 1.0 / l;
    }
    workgroupBarrier();
    for (var i = lid; i < nq * hd4; i += WG) {
        let qi = i / hd4;
        let d4 = i % hd4;
        out[((q0 + qi) * p.n_heads + h) * hd4 + d4] = t_o[qi * HD4T + d4] * t_c[qi];
    }
}

// ---- decode on GPUs: one workgroup per (token, kv head, part of the keys) -----------------------

const GMAX: u32 = 8u;     // query heads per kv head at most

var<workgroup> g_q: array<vec4<f32>, 512>;  // GMAX * HD4R pre-scaled queries; then GMAX * WG V sums
var<workgroup> g_s: array<f32, 512>;        // GMAX * WG scores, then probabilities; then sums
var<workgroup> g_m: array<f32, 64>;         // GMAX * 8 partial maxima of a tile

// Query heads kvh * G .. of token t over part `part` of its keys; writes the finished rows to
// `out` (split == false) or the part's partial state (split == true; see attention_io.wgsl).
fn attend_group_body(wg: u32, lid: u32, split: bool) {
    let part = wg % p.splits;
    let tk = wg / p.splits;
    let t = tk / p.n_kv_heads;
    let kvh = tk % p.n_kv_heads;
    let G = p.group;
    let hd4 = p.head_dim / 4u;
    let keys = token_keys(t);
    let lo = keys.x;
    let n_keys = keys.y;
    let parts = row_parts(n_keys);
    if (part >= parts) {
        return; // a row table's row of fewer parts (the whole workgroup: uniform)
    }
    let per = (n_keys + parts - 1u) / parts;
    let k0 = part * per;
    let k1 = min(n_keys, k0 + per);
    let cache = token_base(t);
    // The G rows of q and out are consecutive.
    let row = (p.row0 + t) * p.n_heads + kvh * G;
    for (var i = lid; i < G * hd4; i += WG) {
        g_q[i] = q[row * hd4 + i] * p.scale;
    }
    // V phase: thread = (vec4 column dq, key subset kg of n_kg); the rest idle there.
    let n_kg = WG / hd4;
    let dq = lid % hd4;
    let kg = lid / hd4;
    var m_run: array<f32, 8>;
    var l: array<f32, 8>;
    var acc: array<vec4<f32>, 8>;
    for (var g = 0u; g < GMAX; g++) {
        m_run[g] = NEG;
        l[g] = 0.0;
        acc[g] = vec4<f32>(0.0);
    }
    workgroupBarrier();
    for (var base = k0; base < k1; base += WG) {
        let j = base + lid;
        let valid = j < k1;
        // Scores of key j for the G queries: each K vec4 loaded once.
        var a: array<vec4<f32>, 8>;
        for (var g = 0u; g < GMAX; g++) {
            a[g] = vec4<f32>(0.0);
        }
        if (valid) {
            let kb = row_base(cache, lo + j, kvh);
            for (var d4 = 0u; d4 < hd4; d4++) {
                let kv = k_load4(kb, d4);
                for (var g = 0u; g < G; g++) {
                    a[g] += g_q[g * hd4 + d4] * kv;
                }
            }
        }
        for (var g = 0u; g < G; g++) {
            g_s[g * WG + lid] = select(NEG, a[g].x + a[g].y + a[g].z + a[g].w, valid);
        }
        workgroupBarrier();
        // Each query's tile maximum in two levels: 8 partial maxima of 8, then everyone reads them.
        if (lid < 8u * G) {
            let g = lid / 8u;
            let o = g * WG + 8u * (lid % 8u);
            var mx = g_s[o];
            for (var i = 1u; i < 8u; i++) {
                mx = max(mx, g_s[o + i]);
            }
            g_m[lid] = mx;
        }
        workgroupBarrier();
        for (var g = 0u; g < G; g++) {
            var mx = g_m[8u * g];
            for (var i = 1u; i < 8u; i++) {
                mx = max(mx, g_m[8u * g + i]);
            }
            let m_new = max(m_run[g], mx);
            let c = exp(m_run[g] - m_new);
            m_run[g] = m_new;
            // Every thread reads and rewrites only its own key's score here.
            let pj = select(0.0, exp(g_s[g * WG + lid] - m_new), valid);
            l[g] = l[g] * c + pj;
            g_s[g * WG + lid] = pj;
            acc[g] *= c;
        }
        workgroupBarrier();
        if (kg < n_kg) {
            let nk = min(WG, k1 - base);
            for (var i = kg; i < nk; i += n_kg) {
                let vv = v_load4(row_base(cache, lo + base + i, kvh), dq);
                for (var g = 0u; g < G; g++) {
                    acc[g] += g_s[g * WG + i] * vv;
                }
            }
        }
        workgroupBarrier();
    }
    // Sums over the threads: each query's l over all 64, its V column over the key subsets.
    for (var g = 0u; g < G; g++) {
        g_s[g * WG + lid] = l[g];
        g_q[g * WG + lid] = acc[g];
    }
    workgroupBarrier();
    for (var i = lid; i < G * hd4; i += WG) {
        let g = i / hd4;
        let d = i % hd4;
        var lt = 0.0;
        for (var k = 0u; k < WG; k++) {
            lt += g_s[g * WG + k];
        }
        var o = vec4<f32>(0.0);
        for (var k = 0u; k < n_kg; k++) {
            o += g_q[g * WG + k * hd4 + d];
        }
        if (!split) {
            out[(row + g) * hd4 + d] = o / lt;
        } else if (TABLE != 0u && parts == 1u) {
            // A row table's row of one part: finished, in its partial slot (attend_combine copies).
            out[(row + g) * p.splits * partial_len() + 1u + d] = o / lt;
        } else {
            let pb = ((row + g) * p.splits + part) * partial_len();
            if (d == 0u) {
                out[pb] = vec4<f32>(m_run[g], lt, 0.0, 0.0);
            }
            out[pb + 1u + d] = o;
        }
    }
}

@compute @workgroup_size(64)
fn attend_group(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return;
    }
    attend_group_body(wg, lid, false);
}

@compute @workgroup_size(64)
fn attend_group_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wg = wid.x + wid.y * nwg.x;
    if (wg >= p.n_wg) {
        return;
    }
    attend_group_body(wg, lid, true);
}

// Matrix-vector product for CPU Vulkan devices with 8-lane subgroups (lavapipe): y[row_start + r] =
// sum_c W[r, c] * x[c] over one shard of W, for TOK tokens at once (rows of x and y, row length
// `cols` and `ld`), one entry point per weight format (repack layout, see common/quant.wgsl).
// Bindings: 0 = weight data words, 1 = block scales (a dummy word for f32/f16), 2 = x (f32),
// 3 = y (f32, read_write), 4 = params. Needs subgroup operations and a subgroup of exactly 8 lanes
// (the host checks); `enable subgroups;` is left out because naga rejects it.
//
// A workgroup is one subgroup of 8 invocations; each invocation owns R consecutive rows and walks
// all of K, one 32-weight block at a time. x of a block is loaded once per subgroup: lane l loads
// values 4l..4l+3 and eight `subgroupBroadcast`s give every lane the whole block. Each weight word
// is read once and serves TOK tokens; each x value serves R rows.
//
// Why: llvmpipe runs a subgroup as one 8-wide SIMD vector and every load from a storage buffer as a
// loop over the lanes, so loads per weight are what the kernel costs, whether the address is uniform
// or not. Here a Q4 block of one row costs 5 loads (4 data words and 1 scale word) plus 4 * TOK / R
// for x, against 32 x loads per block per thread in matvec.wgsl. Private arrays are kept out
// (llvmpipe puts them in memory, where each access is another per-lane loop): x, weights and sums
// live in structs of vec4 whose members are named, and the loops over rows and tokens are spelled
// out under `if (R > i)`, which pipeline creation folds away. No workgroup memory, no barriers.
// Every subgroup operation is in uniform control flow: rows past the end are clamped (their sums
// never written), and only whole workgroups past the end return early.

// #include "common/quant.wgsl"

struct Params {
    rows: u32,      // rows of this shard
    cols: u32,      // weights per row, and length of a token's row of x
    row_start: u32, // where the shard's row 0 goes in a row of y
    row_words: u32, // u32 data words per row
    blocks: u32,    // 32-weight blocks per row (quantised formats)
    m: u32,         // tokens
    ld: u32,        // length of a token's row of y (all rows of W)
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> wq: array<u32>;
@group(0) @binding(1) var<storage, read> ws: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

// Rows per invocation (1..16) and tokens per invocation (1..4), chosen per matrix by the host.
override R: u32 = 8u;
override TOK: u32 = 1u;

const F32: u32 = 0u;
const F16: u32 = 1u;
const Q8_0: u32 = 2u;
const Q4_0: u32 = 3u;
const Q4_1: u32 = 4u;

// 32 values of one block: a_i holds values 4i..4i+3 (x: the values lane i loaded).
struct V8 {
    a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
    a4: vec4<f32>, a5: vec4<f32>, a6: vec4<f32>, a7: vec4<f32>,
}

// x of one block for each token, and each token's block sum (lane t of `sum`).
struct XT {
    t0: V8, t1: V8, t2: V8, t3: V8,
    sum: vec4<f32>,
}

// Per row, the sums of the TOK tokens (lane t = token t).
struct Acc {
    r0: vec4<f32>, r1: vec4<f32>, r2: vec4<f32>, r3: vec4<f32>,
    r4: vec4<f32>, r5: vec4<f32>, r6: vec4<f32>, r7: vec4<f32>,
    r8: vec4<f32>, r9: vec4<f32>, r10: vec4<f32>, r11: vec4<f32>,
    r12: vec4<f32>, r13: vec4<f32>, r14: vec4<f32>, r15: vec4<f32>,
}

fn quantised(fmt: u32) -> bool {
    return fmt >= Q8_0;
}

// Every lane's four values, spread to all lanes.
fn spread(v: vec4<f32>) -> V8 {
    return V8(
        subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u),
        subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u),
        subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u),
        subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u),
    );
}

// This lane's four x values of block `blk` for token `tok`. In the tail block of an f32/f16 row
// (`tail`), columns past the end read as zero.
fn x4(tok: u32, blk: u32, lane: u32, tail: bool) -> vec4<f32> {
    let c = 32u * blk + 4u * lane;
    let base = tok * p.cols;
    if (tail) {
        let last = p.cols - 1u;
        let cs = vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u);
        let v = vec4<f32>(x[base + min(cs.x, last)], x[base + min(cs.y, last)],
                          x[base + min(cs.z, last)], x[base + min(cs.w, last)]);
        return select(vec4<f32>(0.0), v, cs < vec4<u32>(p.cols));
    }
    let i = base + c;
    return vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]);
}

fn load_x(fmt: u32, tok0: u32, blk: u32, lane: u32, tail: bool) -> XT {
    var xt: XT;
    // Q4 formats need each token's block sum; tokens past the end repeat the last one.
    let sums = fmt == Q4_0 || fmt == Q4_1;
    var v = x4(min(tok0, p.m - 1u), blk, lane, tail);
    xt.t0 = spread(v);
    if (sums) {
        xt.sum.x = subgroupAdd(dot(v, vec4<f32>(1.0)));
    }
    if (TOK > 1u) {
        v = x4(min(tok0 + 1u, p.m - 1u), blk, lane, tail);
        xt.t1 = spread(v);
        if (sums) {
            xt.sum.y = subgroupAdd(dot(v, vec4<f32>(1.0)));
        }
    }
    if (TOK > 2u) {
        v = x4(min(tok0 + 2u, p.m - 1u), blk, lane, tail);
        xt.t2 = spread(v);
        if (sums) {
            xt.sum.z = subgroupAdd(dot(v, vec4<f32>(1.0)));
        }
    }
    if (TOK > 3u) {
        v = x4(min(tok0 + 3u, p.m - 1u), blk, lane, tail);
        xt.t3 = spread(v);
        if (sums) {
            xt.sum.w = subgroupAdd(dot(v, vec4<f32>(1.0)));
        }
    }
    return xt;
}

// Data word i of the matrix; in a tail block, clamped to the row's last word `last`.
fn word(i: u32, last: u32, tail: bool) -> u32 {
    if (tail) {
        return wq[min(i, last)];
    }
    return wq[i];
}

// f32 weights at word i..i+3.
fn f32x4(i: u32, last: u32, tail: bool) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(word(i, last, tail), word(i + 1u, last, tail),
                                        word(i + 2u, last, tail), word(i + 3u, last, tail)));
}

// f16 weights in words i, i + 1.
fn f16x4(i: u32, last: u32, tail: bool) -> vec4<f32> {
    return vec4<f32>(qh_pair(word(i, last, tail)), qh_pair(word(i + 1u, last, tail)));
}

// The 32 weights of block `blk` of `row` in the order of V8; for quantised formats, the quants.
fn weights(fmt: u32, row: u32, blk: u32, tail: bool) -> V8 {
    let start = row * p.row_words;
    let last = start + p.row_words - 1u;
    if (fmt == F32) {
        let i = start + 32u * blk;
        return V8(f32x4(i, last, tail), f32x4(i + 4u, last, tail),
                  f32x4(i + 8u, last, tail), f32x4(i + 12u, last, tail),
                  f32x4(i + 16u, last, tail), f32x4(i + 20u, last, tail),
                  f32x4(i + 24u, last, tail), f32x4(i + 28u, last, tail));
    }
    if (fmt == F16) {
        let i = start + 16u * blk;
        return V8(f16x4(i, last, tail), f16x4(i + 2u, last, tail),
                  f16x4(i + 4u, last, tail), f16x4(i + 6u, last, tail),
                  f16x4(i + 8u, last, tail), f16x4(i + 10u, last, tail),
                  f16x4(i + 12u, last, tail), f16x4(i + 14u, last, tail));
    }
    if (fmt == Q8_0) {
        let i = start + 8u * blk;
        return V8(q8_unpack(wq[i]), q8_unpack(wq[i + 1u]), q8_unpack(wq[i + 2u]),
                  q8_unpack(wq[i + 3u]), q8_unpack(wq[i + 4u]), q8_unpack(wq[i + 5u]),
                  q8_unpack(wq[i + 6u]), q8_unpack(wq[i + 7u]));
    }
    // Q4: word j holds weights 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles).
    let i = start + 4u * blk;
    let w0 = wq[i];
    let w1 = wq[i + 1u];
    let w2 = wq[i + 2u];
    let w3 = wq[i + 3u];
    return V8(q4_lo(w0), q4_lo(w1), q4_lo(w2), q4_lo(w3),
              q4_hi(w0), q4_hi(w1), q4_hi(w2), q4_hi(w3));
}

fn dot8(w: V8, v: V8) -> f32 {
    return dot(w.a0, v.a0) + dot(w.a1, v.a1) + dot(w.a2, v.a2) + dot(w.a3, v.a3)
         + dot(w.a4, v.a4) + dot(w.a5, v.a5) + dot(w.a6, v.a6) + dot(w.a7, v.a7);
}

// One row's sums over block `blk` for the TOK tokens.
fn row_block(fmt: u32, row: u32, blk: u32, xt: XT, tail: bool) -> vec4<f32> {
    let w = weights(fmt, row, blk, tail);
    var s = vec4<f32>(0.0);
    s.x = dot8(w, xt.t0);
    if (TOK > 1u) {
        s.y = dot8(w, xt.t1);
    }
    if (TOK > 2u) {
        s.z = dot8(w, xt.t2);
    }
    if (TOK > 3u) {
        s.w = dot8(w, xt.t3);
    }
    if (!quantised(fmt)) {
        return s;
    }
    let g = row * p.blocks + blk;
    if (fmt == Q8_0) {
        return qh_scale(ws[g >> 1u], g) * s;
    }
    if (fmt == Q4_0) {
        // d * sum (q - 8) x = d * (sum q x - 8 sum x): the -8 costs one term per block.
        let d = qh_scale(ws[g >> 1u], g);
        return d * (s - 8.0 * xt.sum);
    }
    // sum (d q + m) x = d * sum q x + m * sum x.
    let dm = qh_pair(ws[g]);
    return dm.x * s + dm.y * xt.sum;
}

// Row i of the invocation, clamped into the shard so that surplus rows read valid memory.
fn row_at(first: u32, i: u32) -> u32 {
    return min(first + i, p.rows - 1u);
}

fn step(acc: ptr<function, Acc>, fmt: u32, first: u32, blk: u32, xt: XT, tail: bool) {
    (*acc).r0 += row_block(fmt, row_at(first, 0u), blk, xt, tail);
    if (R > 1u) { (*acc).r1 += row_block(fmt, row_at(first, 1u), blk, xt, tail); }
    if (R > 2u) { (*acc).r2 += row_block(fmt, row_at(first, 2u), blk, xt, tail); }
    if (R > 3u) { (*acc).r3 += row_block(fmt, row_at(first, 3u), blk, xt, tail); }
    if (R > 4u) { (*acc).r4 += row_block(fmt, row_at(first, 4u), blk, xt, tail); }
    if (R > 5u) { (*acc).r5 += row_block(fmt, row_at(first, 5u), blk, xt, tail); }
    if (R > 6u) { (*acc).r6 += row_block(fmt, row_at(first, 6u), blk, xt, tail); }
    if (R > 7u) { (*acc).r7 += row_block(fmt, row_at(first, 7u), blk, xt, tail); }
    if (R > 8u) { (*acc).r8 += row_block(fmt, row_at(first, 8u), blk, xt, tail); }
    if (R > 9u) { (*acc).r9 += row_block(fmt, row_at(first, 9u), blk, xt, tail); }
    if (R > 10u) { (*acc).r10 += row_block(fmt, row_at(first, 10u), blk, xt, tail); }
    if (R > 11u) { (*acc).r11 += row_block(fmt, row_at(first, 11u), blk, xt, tail); }
    if (R > 12u) { (*acc).r12 += row_block(fmt, row_at(first, 12u), blk, xt, tail); }
    if (R > 13u) { (*acc).r13 += row_block(fmt, row_at(first, 13u), blk, xt, tail); }
    if (R > 14u) { (*acc).r14 += row_block(fmt, row_at(first, 14u), blk, xt, tail); }
    if (R > 15u) { (*acc).r15 += row_block(fmt, row_at(first, 15u), blk, xt, tail); }
}

// Writes row `first + i` for the TOK tokens from `tok0`, skipping rows and tokens past the end.
fn put(first: u32, i: u32, tok0: u32, s: vec4<f32>) {
    let row = first + i;
    if (i >= R || row >= p.rows) {
        return;
    }
    for (var t = 0u; t < TOK; t++) {
        if (tok0 + t < p.m) {
            y[(tok0 + t) * p.ld + p.row_start + row] = s[t];
        }
    }
}

fn matvec_any(fmt: u32, wid: vec3<u32>, nwg: vec3<u32>, lane: u32) {
    let g = wid.x + wid.y * nwg.x;
    let token_groups = (p.m + TOK - 1u) / TOK;
    // Consecutive workgroups take the token groups of the same rows, so their weights are still in
    // cache.
    let row0 = g / token_groups * 8u * R;
    if (row0 >= p.rows) {
        return; // the whole workgroup (one subgroup): uniform
    }
    let tok0 = g % token_groups * TOK;
    let first = row0 + lane * R;
    var acc: Acc;
    // Quantised rows are whole blocks; f32/f16 rows may end in a partial block (the tail).
    var full = p.blocks;
    if (!quantised(fmt)) {
        full = p.cols / 32u;
    }
    for (var b = 0u; b < full; b++) {
        step(&acc, fmt, first, b, load_x(fmt, tok0, b, lane, false), false);
    }
    if (!quantised(fmt) && full * 32u < p.cols) {
        step(&acc, fmt, first, full, load_x(fmt, tok0, full, lane, true), true);
    }
    put(first, 0u, tok0, acc.r0);
    put(first, 1u, tok0, acc.r1);
    put(first, 2u, tok0, acc.r2);
    put(first, 3u, tok0, acc.r3);
    put(first, 4u, tok0, acc.r4);
    put(first, 5u, tok0, acc.r5);
    put(first, 6u, tok0, acc.r6);
    put(first, 7u, tok0, acc.r7);
    put(first, 8u, tok0, acc.r8);
    put(first, 9u, tok0, acc.r9);
    put(first, 10u, tok0, acc.r10);
    put(first, 11u, tok0, acc.r11);
    put(first, 12u, tok0, acc.r12);
    put(first, 13u, tok0, acc.r13);
    put(first, 14u, tok0, acc.r14);
    put(first, 15u, tok0, acc.r15);
}

@compute @workgroup_size(8)
fn matvec_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(F32, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(F16, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q8_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q8_0, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q4_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q4_0, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q4_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q4_1, wid, nwg, lane);
}

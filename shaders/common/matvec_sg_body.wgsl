// The body of the subgroup matrix-vector product, shared by its four front files: the weights in
// storage buffers (common/matvec_sg_w_buffers.wgsl) or textures (common/matvec_sg_w_tex.wgsl), x
// in storage buffers (common/matvec_sg_x_storage.wgsl) or uniform windows
// (common/matvec_sg_x_uniform.wgsl): matvec_sg.wgsl, matvec_sg_tex.wgsl, matvec_sg_ux.wgsl and
// matvec_sg_tex_ux.wgsl.
//
// One dispatch computes `rows` rows of the bound weights from row `row0` on. Its outputs may be
// split in up to three (Q, K and V; gate and up, stacked in one texture and sharing x): rows
// before `split1` go to y (rows of length `ld`, from `row_start`), rows from `split1` to `split2`
// to y1, the rest to y2 (each with its own row length). With XFN = 1 the input is SwiGLU of two
// tensors, x = silu(x) * up (the FFN's down projection reads gate and up without a pass of its
// own). With XFN = 2 the input is RMSNorm of x with `gamma` ([cols]): the sum of squares of a
// token's x is taken in the same loop as the products, and scales the sums at the end (the norm's
// 1 / rms is one factor of the whole row, so the attention and FFN norms need no pass of their
// own). With RES = 1 each output is added to the same element of res (the residual stream:
// y = res + W x, no add pass after the projection). Bindings: 0 = weight data, 1 = block scales,
// 2 = x, 3 = y, 4 = y1, 5 = y2, 6 = up, 7 = res, 8 = gamma, 9 = params; unsplit products bind y
// in all three output slots, and a slot a dispatch does not use binds x (up, res and gamma
// where XFN != 1, RES = 0 and XFN != 2).
//
// The weight front declares bindings 0 (`wq`) and 1 (`ws`) and defines how to read them (`row` is
// a row of the binding, `p.row0` already added): common/quant.wgsl's `qword` and `qscales`,
// `qword4` (data words i..i+3, which need not be texel-aligned), `qgroup` (data words 4t..4t+3:
// texel t), and
//   fn weights(fmt: u32, row: u32, blk: u32) -> V8   the 32 weights of an f32/f16 block;
//   fn block_scales(fmt: u32, row: u32, blk: u32, kept: u32) -> Scale   the scales of a block of
//       Q8_0, Q4_0 or Q4_1 (common/quant.wgsl's qtuned formats).
// The x front declares bindings 2 (`x`) and 6 (`up`) and defines
//   fn x4(tok: u32, blk: u32, lane: u32) -> vec4<f32>   this lane's four values of block `blk` of
//       token `tok`'s input (silu(x) * up where XFN = 1; not yet normalised), zero past the end
//       of an f32/f16 row.
// Every quantised block is decoded by common/quant.wgsl: Q8_0/Q4_0/Q4_1 by its tuned form (quants
// only, the scales folded in per block: qquants_tuned, qfold), the other formats unit by unit
// (qunit_head, qdecode4). The design is described in matvec_sg.wgsl.

// #include "common/quant.wgsl"
struct Params {
    rows: u32,      // rows computed
    cols: u32,      // weights per row, and length of a token's row of x
    row_start: u32, // where computed row 0 goes in a row of y
    row0: u32,      // the binding's row of computed row 0
    split1: u32,    // computed rows from here on go to y1 (= rows: none)
    split2: u32,    // computed rows from here on go to y2 (= rows: none)
    m: u32,         // tokens
    ld: u32,        // length of a token's row of y
}

@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<storage, read_write> y2: array<f32>;
@group(0) @binding(7) var<storage, read> res: array<f32>;
@group(0) @binding(8) var<storage, read> gamma: array<f32>;
@group(0) @binding(9) var<uniform> p: Params;

// 0: the input is x; 1: the input is silu(x) * up (SwiGLU); 2: RMSNorm of x with gamma and EPS.
override XFN: u32 = 0u;
override EPS: f32 = 1e-5;
// 1: outputs are res + W x.
override RES: u32 = 0u;

// Rows per invocation (1..16) and tokens per invocation (1..8), chosen per matrix by the host.
override R: u32 = 8u;
override TOK: u32 = 1u;

// x of one block for each token, and each token's block sum (lane t of `lo` for tokens 0..3,
// lane t - 4 of `hi` for tokens 4..7).
struct XT {
    t0: V8, t1: V8, t2: V8, t3: V8,
    t4: V8, t5: V8, t6: V8, t7: V8,
    sum: T8,
}

// Eight per-token values: token t in lane t of `lo` (t < 4) or lane t - 4 of `hi`.
struct T8 {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Per row of the invocation, the sums of its TOK tokens.
struct Acc {
    r0: T8, r1: T8, r2: T8, r3: T8, r4: T8, r5: T8, r6: T8, r7: T8,
    r8: T8, r9: T8, r10: T8, r11: T8, r12: T8, r13: T8, r14: T8, r15: T8,
}

// Per row of the invocation, the word of two f16 block scales (Q8_0, Q4_0) that an even block
// loaded for the odd one after it (see the buffer front's block_scales).
struct Scales {
    r0: u32, r1: u32, r2: u32, r3: u32, r4: u32, r5: u32, r6: u32, r7: u32,
    r8: u32, r9: u32, r10: u32, r11: u32, r12: u32, r13: u32, r14: u32, r15: u32,
}

// The invocation's state, as module-scope private variables so that no function takes or returns
// these large structs by value (each inlined copy would slow down lavapipe's shader compiler).
var<private> xt: XT;
var<private> acc: Acc;
var<private> scales: Scales;
// XFN = 2: this lane's share of each token's sum of squares of x.
var<private> sumsq: T8;

fn quantised(fmt: u32) -> bool {
    return fmt >= Q8_0;
}

// 32-weight blocks per row: quantised rows are whole blocks, f32/f16 rows may end in a partial one.
fn row_blocks() -> u32 {
    return (p.cols + 31u) / 32u;
}

// u32 data words per row in the repack layout (src/quant/repack.rs).
fn row_words(fmt: u32) -> u32 {
    switch fmt {
        case F32: { return p.cols; }
        case F16: { return (p.cols + 1u) / 2u; }
        default: { return qrow_words(fmt, p.cols); }
    }
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

// XFN = 2: this lane's four values of gamma for block `blk` (the same for every token, so loaded
// once a block), clamped to the row as x4 clamps x.
fn gamma4(blk: u32, lane: u32) -> vec4<f32> {
    if (XFN != 2u) {
        return vec4<f32>(1.0);
    }
    let last = p.cols - 1u;
    let c = vec4<u32>(32u * blk + 4u * lane) + vec4<u32>(0u, 1u, 2u, 3u);
    let j = min(c, vec4<u32>(last));
    return vec4<f32>(gamma[j.x], gamma[j.y], gamma[j.z], gamma[j.w]);
}

// Adds to a token's sum of squares (a lane's share; reduced over the subgroup at the end).
// `t`: the token's place in its group of TOK.
fn add_sumsq(t: u32, s: f32) {
    if (t < 4u) {
        sumsq.lo[t] += s;
    } else {
        sumsq.hi[t - 4u] += s;
    }
}

// XFN = 2: each token's 1 / rms (1 otherwise), from the lanes' shares. Uniform control flow.
fn norm_scales() -> T8 {
    if (XFN != 2u) {
        return T8(vec4<f32>(1.0), vec4<f32>(1.0));
    }
    let n = f32(p.cols);
    let lo = inverseSqrt(subgroupAdd(sumsq.lo) / n + EPS);
    if (TOK > 4u) {
        return T8(lo, inverseSqrt(subgroupAdd(sumsq.hi) / n + EPS));
    }
    return T8(lo, vec4<f32>(1.0));
}

// One token's x of a block, spread to every lane, scaled as the format's tuned decode needs
// (common/quant.wgsl's qx_scale), and its sum (the formats that fold an offset into it).
struct XB {
    v: V8,
    sum: f32,
}

// `t`: the token's place in its group; `g`: gamma4 of the block (XFN = 2).
fn x_block(fmt: u32, tok: u32, t: u32, blk: u32, lane: u32, g: vec4<f32>) -> XB {
    var r: XB;
    // Uniform: tokens past the end of a partial token group load nothing and stay zero.
    if (tok < p.m) {
        var v = x4(tok, blk, lane);
        if (XFN == 2u) {
            add_sumsq(t, dot(v, v));
            v *= g;
        }
        if (qfolds_xsum(fmt)) {
            r.sum = subgroupAdd(dot(v, vec4<f32>(1.0)));
            r.v = spread(v * qx_scale(fmt));
        } else {
            r.v = spread(v);
        }
    }
    return r;
}

// Loads block `blk` of x for the TOK tokens from `tok0` into `xt`.
fn load_x(fmt: u32, tok0: u32, blk: u32, lane: u32) {
    let g = gamma4(blk, lane);
    var b = x_block(fmt, tok0, 0u, blk, lane, g);
    xt.t0 = b.v;
    xt.sum.lo.x = b.sum;
    if (TOK > 1u) {
        b = x_block(fmt, tok0 + 1u, 1u, blk, lane, g);
        xt.t1 = b.v;
        xt.sum.lo.y = b.sum;
    }
    if (TOK > 2u) {
        b = x_block(fmt, tok0 + 2u, 2u, blk, lane, g);
        xt.t2 = b.v;
        xt.sum.lo.z = b.sum;
    }
    if (TOK > 3u) {
        b = x_block(fmt, tok0 + 3u, 3u, blk, lane, g);
        xt.t3 = b.v;
        xt.sum.lo.w = b.sum;
    }
    if (TOK > 4u) {
        b = x_block(fmt, tok0 + 4u, 4u, blk, lane, g);
        xt.t4 = b.v;
        xt.sum.hi.x = b.sum;
    }
    if (TOK > 5u) {
        b = x_block(fmt, tok0 + 5u, 5u, blk, lane, g);
        xt.t5 = b.v;
        xt.sum.hi.y = b.sum;
    }
    if (TOK > 6u) {
        b = x_block(fmt, tok0 + 6u, 6u, blk, lane, g);
        xt.t6 = b.v;
        xt.sum.hi.z = b.sum;
    }
    if (TOK > 7u) {
        b = x_block(fmt, tok0 + 7u, 7u, blk, lane, g);
        xt.t7 = b.v;
        xt.sum.hi.w = b.sum;
    }
}

fn dot8(w: V8, v: V8) -> f32 {
    return dot(w.a0, v.a0) + dot(w.a1, v.a1) + dot(w.a2, v.a2) + dot(w.a3, v.a3)
         + dot(w.a4, v.a4) + dot(w.a5, v.a5) + dot(w.a6, v.a6) + dot(w.a7, v.a7);
}

// A tuned block's scales (qscales_of: (d, m) for Q4_1, (d, 0) for Q8_0/Q4_0), and the word they
// came from (for `kept`; see the front files' block_scales).
struct Scale {
    dm: vec2<f32>,
    word: u32,
}

// One row's sums of a block for the TOK tokens, and the scale word it used.
struct RowSums {
    s: T8,
    word: u32,
}

// The 32 weights of 32-weight unit u of `row`, dequantised by common/quant.wgsl. A K-quant
// unit's eight main words (and eight high-bit words) are consecutive, so they are read four at a
// time through the front's `qword4` (a texture: two texel fetches, not four).
fn qunit(fmt: u32, row: u32, u: u32) -> V8 {
    let h = qunit_head(fmt, row, u);
    if (qblock_len(fmt) > 32u) {
        let m0 = qword4(fmt, row, qmain_index(fmt, h, 0u));
        let m1 = qword4(fmt, row, qmain_index(fmt, h, 4u));
        var a0 = vec4<u32>(0u);
        var a1 = vec4<u32>(0u);
        if (qhas_aux(fmt)) {
            a0 = qword4(fmt, row, qaux_index(fmt, h, 0u));
            a1 = qword4(fmt, row, qaux_index(fmt, h, 4u));
        }
        return qunit_words(fmt, h, m0, m1, a0, a1);
    }
    return V8(qunit4(fmt, row, h, 0u), qunit4(fmt, row, h, 1u), qunit4(fmt, row, h, 2u),
              qunit4(fmt, row, h, 3u), qunit4(fmt, row, h, 4u), qunit4(fmt, row, h, 5u),
              qunit4(fmt, row, h, 6u), qunit4(fmt, row, h, 7u));
}

// One row's sums over block `blk` for the TOK tokens.
fn row_block(fmt: u32, row: u32, blk: u32, kept: u32) -> RowSums {
    // Tuned formats: their quants, scaled below; other quantised formats: their weights.
    var w: V8;
    if (qtuned(fmt)) {
        let w0 = qgroup(fmt, row, qtuned_group(fmt, blk, 0u));
        var w1 = vec4<u32>(0u);
        if (qblock_words(fmt) > 4u) {
            w1 = qgroup(fmt, row, qtuned_group(fmt, blk, 1u));
        }
        w = qquants_tuned(fmt, w0, w1);
    } else if (quantised(fmt)) {
        w = qunit(fmt, row, blk);
    } else {
        w = weights(fmt, row, blk);
    }
    var s: T8;
    s.lo.x = dot8(w, xt.t0);
    if (TOK > 1u) { s.lo.y = dot8(w, xt.t1); }
    if (TOK > 2u) { s.lo.z = dot8(w, xt.t2); }
    if (TOK > 3u) { s.lo.w = dot8(w, xt.t3); }
    if (TOK > 4u) { s.hi.x = dot8(w, xt.t4); }
    if (TOK > 5u) { s.hi.y = dot8(w, xt.t5); }
    if (TOK > 6u) { s.hi.z = dot8(w, xt.t6); }
    if (TOK > 7u) { s.hi.w = dot8(w, xt.t7); }
    if (!qtuned(fmt)) {
        return RowSums(s, 0u);
    }
    // The block's scales and offset, once per block and token.
    let sc = block_scales(fmt, row, blk, kept);
    return RowSums(T8(qfold(fmt, sc.dm, s.lo, xt.sum.lo), qfold(fmt, sc.dm, s.hi, xt.sum.hi)),
                   sc.word);
}

fn add(a: T8, b: T8) -> T8 {
    if (TOK > 4u) {
        return T8(a.lo + b.lo, a.hi + b.hi);
    }
    return T8(a.lo + b.lo, a.hi);
}

// The binding row of row i of the invocation, clamped to the computed rows so that surplus rows
// read valid memory.
fn row_at(first: u32, i: u32) -> u32 {
    return p.row0 + min(first + i, p.rows - 1u);
}

// Adds block `blk` of every row of the invocation to `acc`.
fn step(fmt: u32, first: u32, blk: u32) {
    var b: RowSums;
    b = row_block(fmt, row_at(first, 0u), blk, scales.r0);
    acc.r0 = add(acc.r0, b.s);
    scales.r0 = b.word;
    if (R > 1u) {
        b = row_block(fmt, row_at(first, 1u), blk, scales.r1);
        acc.r1 = add(acc.r1, b.s);
        scales.r1 = b.word;
    }
    if (R > 2u) {
        b = row_block(fmt, row_at(first, 2u), blk, scales.r2);
        acc.r2 = add(acc.r2, b.s);
        scales.r2 = b.word;
    }
    if (R > 3u) {
        b = row_block(fmt, row_at(first, 3u), blk, scales.r3);
        acc.r3 = add(acc.r3, b.s);
        scales.r3 = b.word;
    }
    if (R > 4u) {
        b = row_block(fmt, row_at(first, 4u), blk, scales.r4);
        acc.r4 = add(acc.r4, b.s);
        scales.r4 = b.word;
    }
    if (R > 5u) {
        b = row_block(fmt, row_at(first, 5u), blk, scales.r5);
        acc.r5 = add(acc.r5, b.s);
        scales.r5 = b.word;
    }
    if (R > 6u) {
        b = row_block(fmt, row_at(first, 6u), blk, scales.r6);
        acc.r6 = add(acc.r6, b.s);
        scales.r6 = b.word;
    }
    if (R > 7u) {
        b = row_block(fmt, row_at(first, 7u), blk, scales.r7);
        acc.r7 = add(acc.r7, b.s);
        scales.r7 = b.word;
    }
    if (R > 8u) {
        b = row_block(fmt, row_at(first, 8u), blk, scales.r8);
        acc.r8 = add(acc.r8, b.s);
        scales.r8 = b.word;
    }
    if (R > 9u) {
        b = row_block(fmt, row_at(first, 9u), blk, scales.r9);
        acc.r9 = add(acc.r9, b.s);
        scales.r9 = b.word;
    }
    if (R > 10u) {
        b = row_block(fmt, row_at(first, 10u), blk, scales.r10);
        acc.r10 = add(acc.r10, b.s);
        scales.r10 = b.word;
    }
    if (R > 11u) {
        b = row_block(fmt, row_at(first, 11u), blk, scales.r11);
        acc.r11 = add(acc.r11, b.s);
        scales.r11 = b.word;
    }
    if (R > 12u) {
        b = row_block(fmt, row_at(first, 12u), blk, scales.r12);
        acc.r12 = add(acc.r12, b.s);
        scales.r12 = b.word;
    }
    if (R > 13u) {
        b = row_block(fmt, row_at(first, 13u), blk, scales.r13);
        acc.r13 = add(acc.r13, b.s);
        scales.r13 = b.word;
    }
    if (R > 14u) {
        b = row_block(fmt, row_at(first, 14u), blk, scales.r14);
        acc.r14 = add(acc.r14, b.s);
        scales.r14 = b.word;
    }
    if (R > 15u) {
        b = row_block(fmt, row_at(first, 15u), blk, scales.r15);
        acc.r15 = add(acc.r15, b.s);
        scales.r15 = b.word;
    }
}

// Stores computed row `row` of token `tok` in y, y1 or y2 (per lane: a lane's rows may cross a
// split; this runs once per row, outside the loop over the blocks).
fn store(tok: u32, row: u32, v: f32) {
    if (row < p.split1) {
        let i = tok * p.ld + p.row_start + row;
        if (RES == 1u) {
            y[i] = res[i] + v;
        } else {
            y[i] = v;
        }
    } else if (row < p.split2) {
        y1[tok * (p.split2 - p.split1) + row - p.split1] = v;
    } else {
        y2[tok * (p.rows - p.split2) + row - p.split2] = v;
    }
}

// Writes row `first + i` for the TOK tokens from `tok0`, skipping rows and tokens past the end.
fn put(first: u32, i: u32, tok0: u32, s: T8) {
    let row = first + i;
    if (i >= R || row >= p.rows) {
        return;
    }
    for (var t = 0u; t < min(TOK, 4u); t++) {
        if (tok0 + t < p.m) {
            store(tok0 + t, row, s.lo[t]);
        }
    }
    for (var t = 4u; t < TOK; t++) {
        if (tok0 + t < p.m) {
            store(tok0 + t, row, s.hi[t - 4u]);
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
    let blocks = row_blocks();
    for (var b = 0u; b < blocks; b++) {
        load_x(fmt, tok0, b, lane);
        step(fmt, first, b);
    }
    let k = norm_scales();
    put(first, 0u, tok0, mul(acc.r0, k));
    put(first, 1u, tok0, mul(acc.r1, k));
    put(first, 2u, tok0, mul(acc.r2, k));
    put(first, 3u, tok0, mul(acc.r3, k));
    put(first, 4u, tok0, mul(acc.r4, k));
    put(first, 5u, tok0, mul(acc.r5, k));
    put(first, 6u, tok0, mul(acc.r6, k));
    put(first, 7u, tok0, mul(acc.r7, k));
    put(first, 8u, tok0, mul(acc.r8, k));
    put(first, 9u, tok0, mul(acc.r9, k));
    put(first, 10u, tok0, mul(acc.r10, k));
    put(first, 11u, tok0, mul(acc.r11, k));
    put(first, 12u, tok0, mul(acc.r12, k));
    put(first, 13u, tok0, mul(acc.r13, k));
    put(first, 14u, tok0, mul(acc.r14, k));
    put(first, 15u, tok0, mul(acc.r15, k));
}

fn mul(a: T8, k: T8) -> T8 {
    if (XFN != 2u) {
        return a;
    }
    return T8(a.lo * k.lo, a.hi * k.hi);
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

@compute @workgroup_size(8)
fn matvec_q5_0(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q5_0, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q5_1(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q5_1, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q4_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q4_K, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q5_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q5_K, wid, nwg, lane);
}

@compute @workgroup_size(8)
fn matvec_q6_k(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {
    matvec_any(Q6_K, wid, nwg, lane);
}

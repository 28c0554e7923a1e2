// The weight formats and their block decode, in the repack layout (src/quant/repack.rs): f32 and
// f16 rows of u32 words; quantised rows as whole blocks of data words (the GGUF block less its f16
// scales) plus a separate array of the blocks' f16 scales. This file is the one place that decodes
// a block: every matrix and embedding kernel reads its weights through `qunit_head` and `qunit4`
// (or `qdecode4` on words it loaded itself, at `qmain_index` / `qaux_index`), and only says where
// the words are. Each includer defines:
//   fn qword(fmt: u32, row: u32, i: u32) -> u32          data word i of weight row `row`;
//   fn qscales(fmt: u32, row: u32, blk: u32) -> vec2<f32> block `blk`'s f16 scales: (d, m) for the
//       formats with two (Q4_1, Q5_1; Q4_K and Q5_K: (d, dmin)), (d, 0) for the others.
// Everything is plain u32 arithmetic: no `enable f16;`.

// The formats; `fmt` is a constant at every call site, so each entry point compiles to its own
// straight-line code. (The host names entry points by format: src/quant/mod.rs.)
const F32: u32 = 0u;
const F16: u32 = 1u;
const Q8_0: u32 = 2u;
const Q4_0: u32 = 3u;
const Q4_1: u32 = 4u;
const Q5_0: u32 = 5u;
const Q5_1: u32 = 6u;
const Q4_K: u32 = 7u;
const Q5_K: u32 = 8u;
const Q6_K: u32 = 9u;

// 32 values of one 32-weight unit: a_i holds values 4i..4i+3. (A struct, not an array: llvmpipe
// keeps arrays it cannot resolve in memory.)
struct V8 {
    a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
    a4: vec4<f32>, a5: vec4<f32>, a6: vec4<f32>, a7: vec4<f32>,
}

// The two f16 halves of a word as f32 (low half first: even column, or d before m).
fn qh_pair(word: u32) -> vec2<f32> {
    return unpack2x16float(word);
}

// Half `g % 2` of a word of packed f16 scales (Q8_0, Q4_0, Q5_0 and Q6_K keep two block scales
// per word).
fn qh_scale(word: u32, g: u32) -> f32 {
    return unpack2x16float(word >> ((g & 1u) * 16u)).x;
}

// Q8_0: the four signed bytes of a data word, as f32 (byte 0 first). Shifting each byte to the
// top and arithmetically back sign-extends it exactly.
fn q8_unpack(word: u32) -> vec4<f32> {
    let up = vec4<u32>(word) << vec4<u32>(24u, 16u, 8u, 0u);
    return vec4<f32>(bitcast<vec4<i32>>(up) >> vec4<u32>(24u));
}

// Q4_0/Q4_1 data word i (0..3) of a block holds bytes 4i..4i+3: the low nibbles are weights
// 4i..4i+3 of the block, the high nibbles weights 16+4i..16+4i+3. Unsigned values 0..15. (Q5_0
// and Q5_1 words 1..4, and the K-quants' nibble bytes, are laid out the same way.)
fn q4_lo(word: u32) -> vec4<f32> {
    return vec4<f32>(q4_lo_u(word));
}
fn q4_hi(word: u32) -> vec4<f32> {
    return vec4<f32>(q4_hi_u(word));
}
fn q4_lo_u(word: u32) -> vec4<u32> {
    return (vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u);
}
fn q4_hi_u(word: u32) -> vec4<u32> {
    return (vec4<u32>(word) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u);
}

// 32-weight units per block: 8 in a K-quant super-block of 256, else 1.
fn qunits(fmt: u32) -> u32 {
    return select(1u, 8u, fmt >= Q4_K);
}

// Weights per block.
fn qblock_len(fmt: u32) -> u32 {
    return 32u * qunits(fmt);
}

// Data words per block (the block's bytes less its f16 scales, over 4).
fn qblock_words(fmt: u32) -> u32 {
    switch fmt {
        case Q8_0: { return 8u; }
        case Q4_0, Q4_1: { return 4u; }
        case Q5_0, Q5_1: { return 5u; }
        case Q4_K: { return 35u; }
        case Q5_K: { return 43u; }
        default: { return 52u; } // Q6_K
    }
}

// Data words per row of `cols` weights.
fn qrow_words(fmt: u32, cols: u32) -> u32 {
    switch fmt {
        case F32: { return cols; }
        case F16: { return (cols + 1u) / 2u; }
        default: { return cols / qblock_len(fmt) * qblock_words(fmt); }
    }
}

// Whether a block has a word of scales to itself ((d, m) or (d, dmin)), not half a shared word.
fn qscale_pair(fmt: u32) -> bool {
    return fmt == Q4_1 || fmt == Q5_1 || fmt == Q4_K || fmt == Q5_K;
}

// Block `blk`'s scales from a scales array in the repack layout, given the word that holds them
// (word g for pairs, g / 2 otherwise, g = row * blocks per row + blk): the fronts that read buffers
// use this with their own binding.
fn qscales_of(fmt: u32, word: u32, g: u32) -> vec2<f32> {
    if (qscale_pair(fmt)) {
        return qh_pair(word);
    }
    return vec2<f32>(qh_scale(word, g), 0.0);
}

// The index in the scales array of the word holding block g's scales.
fn qscale_index(fmt: u32, g: u32) -> u32 {
    return select(g >> 1u, g, qscale_pair(fmt));
}

// Byte k of a row's block, as u32: byte k % 4 of word k / 4 (little-endian, as repack stores it).
fn qbyte(fmt: u32, row: u32, base: u32, k: u32) -> u32 {
    return (qword(fmt, row, base + k / 4u) >> (8u * (k % 4u))) & 255u;
}

// What a unit's weights share: its block's first data word, its place in the block, and the
// map of its quants q, w = d * (q + o) + m (Q6_K: d for weights 0..15 and m for 16..31, both
// multiplying q - 32). The operations are the CPU dequantisers' (src/quant), in their order, so
// that a lookup reproduces them exactly where the device rounds as the CPU does.
struct QUnit {
    base: u32,
    s: u32,
    d: f32,
    m: f32,
    o: f32,
}

// ggml's get_scale_min_k4: sub-block s's 6-bit scale and min out of the 12 bytes at `base`.
fn k4_scale_min(fmt: u32, row: u32, base: u32, s: u32) -> vec2<f32> {
    if (s < 4u) {
        return vec2<f32>(f32(qbyte(fmt, row, base, s) & 63u),
                         f32(qbyte(fmt, row, base, s + 4u) & 63u));
    }
    let lo = qbyte(fmt, row, base, s + 4u);
    let sc = (lo & 15u) | ((qbyte(fmt, row, base, s - 4u) >> 6u) << 4u);
    let mn = (lo >> 4u) | ((qbyte(fmt, row, base, s) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// Unit u (32 weights, u = column / 32) of weight row `row`.
fn qunit_head(fmt: u32, row: u32, u: u32) -> QUnit {
    let blk = u / qunits(fmt);
    let s = u % qunits(fmt);
    let base = blk * qblock_words(fmt);
    let dm = qscales(fmt, row, blk);
    switch fmt {
        case Q4_0: { return QUnit(base, s, dm.x, 0.0, -8.0); }
        case Q5_0: { return QUnit(base, s, dm.x, 0.0, -16.0); }
        case Q4_K, Q5_K: {
            // (d * scale) * q - dmin * min, as ggml orders it.
            let sm = k4_scale_min(fmt, row, base, s);
            return QUnit(base, s, dm.x * sm.x, -(dm.y * sm.y), 0.0);
        }
        case Q6_K: {
            // Unit s is quarter s % 4 of half s / 4; its two 16-weight sub-blocks have the i8
            // scales 8h + 2k and 8h + 2k + 1, bytes 192.. of the block (data bytes too).
            let k = 192u + 8u * (s / 4u) + 2u * (s % 4u);
            let w = qword(fmt, row, base + k / 4u);
            let sh = 8u * (k % 4u);
            let s0 = f32(extractBits(bitcast<i32>(w), sh, 8u));
            let s1 = f32(extractBits(bitcast<i32>(w), sh + 8u, 8u));
            return QUnit(base, s, dm.x * s0, dm.x * s1, -32.0);
        }
        default: { return QUnit(base, s, dm.x, dm.y, 0.0); } // Q8_0: m = 0; Q4_1, Q5_1: d q + m
    }
}

// The data word that weights 4i..4i+3 (i < 8) of the unit take their quants (or low bits) from:
// Q8_0's word i; Q4's and Q5's nibble word i % 4; the K-quants' nibble word i of the unit's chunk.
fn qmain_index(fmt: u32, h: QUnit, i: u32) -> u32 {
    switch fmt {
        case Q8_0: { return h.base + i; }
        case Q4_0, Q4_1: { return h.base + i % 4u; }
        case Q5_0, Q5_1: { return h.base + 1u + i % 4u; }
        case Q4_K: { return h.base + 3u + 8u * (h.s / 2u) + i; }
        case Q5_K: { return h.base + 11u + 8u * (h.s / 2u) + i; }
        default: { return h.base + 16u * (h.s / 4u) + 8u * (h.s % 2u) + i; } // Q6_K: ql
    }
}

// The data word of their high bits: Q5_0/Q5_1's u32 of fifth bits, Q5_K's fifth-bit word i (bit s
// of each byte), Q6_K's qh word i of the unit's half; none for the other formats.
fn qhas_aux(fmt: u32) -> bool {
    return fmt == Q5_0 || fmt == Q5_1 || fmt == Q5_K || fmt == Q6_K;
}
fn qaux_index(fmt: u32, h: QUnit, i: u32) -> u32 {
    switch fmt {
        case Q5_K: { return h.base + 3u + i; }
        case Q6_K: { return h.base + 32u + 8u * (h.s / 4u) + i; }
        default: { return h.base; }
    }
}

// Weights 4i..4i+3 (i < 8) of the unit, dequantised from its main word w and high-bits word a
// (qmain_index, qaux_index).
fn qdecode4(fmt: u32, h: QUnit, i: u32, w: u32, a: u32) -> vec4<f32> {
    let sh = vec4<u32>(0u, 8u, 16u, 24u);
    switch fmt {
        case Q8_0: {
            return h.d * q8_unpack(w);
        }
        case Q4_0, Q4_1: {
            let q = select(q4_lo_u(w), q4_hi_u(w), i >= 4u);
            return h.d * (vec4<f32>(q) + h.o) + h.m;
        }
        case Q5_0, Q5_1: {
            // Bit j of a is the fifth bit of weight j; the nibbles as Q4_0's.
            let lo = select(q4_lo_u(w), q4_hi_u(w), i >= 4u);
            let fifth = (vec4<u32>(a) >> (vec4<u32>(4u * i) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u);
            return h.d * (vec4<f32>(lo | (fifth << vec4<u32>(4u))) + h.o) + h.m;
        }
        case Q4_K, Q5_K: {
            // Nibble bytes: byte 32c + l holds weight l of sub-block 2c (low) and of 2c + 1
            // (high). Q5_K: bit s of fifth-bit byte l is weight l's fifth bit.
            var q = (vec4<u32>(w) >> (sh + vec4<u32>(4u * (h.s % 2u)))) & vec4<u32>(15u);
            if (fmt == Q5_K) {
                q |= ((vec4<u32>(a) >> (sh + vec4<u32>(h.s))) & vec4<u32>(1u)) << vec4<u32>(4u);
            }
            return h.d * vec4<f32>(q) + h.m;
        }
        default: { // Q6_K
            // Weight l of quarter k of half hf: low 4 bits from ql byte 64hf + 32(k % 2) + l
            // (high nibble for k >= 2), top 2 bits from bits 2k of qh byte 32hf + l (bytes 128..).
            let k = h.s % 4u;
            let lo = (vec4<u32>(w) >> (sh + vec4<u32>(4u * (k / 2u)))) & vec4<u32>(15u);
            let hi = (vec4<u32>(a) >> (sh + vec4<u32>(2u * k))) & vec4<u32>(3u);
            return select(h.m, h.d, i < 4u) * (vec4<f32>(lo | (hi << vec4<u32>(4u))) + h.o);
        }
    }
}

// Weights 4i..4i+3 (i < 8) of the unit, dequantised.
fn qunit4(fmt: u32, row: u32, h: QUnit, i: u32) -> vec4<f32> {
    let w = qword(fmt, row, qmain_index(fmt, h, i));
    var a = 0u;
    if (qhas_aux(fmt)) {
        a = qword(fmt, row, qaux_index(fmt, h, i));
    }
    return qdecode4(fmt, h, i, w, a);
}

// The 32 weights of a unit from the words it reads, loaded by the caller four at a time: main
// words m0 (i = 0..3) and m1 (i = 4..7), high-bit words a0 and a1 (zero where !qhas_aux). Meant
// for the formats whose unit reads eight consecutive main words and eight consecutive high-bit
// words (the K-quants: a texture serves four words with one fetch).
fn qunit_words(fmt: u32, h: QUnit, m0: vec4<u32>, m1: vec4<u32>, a0: vec4<u32>, a1: vec4<u32>) -> V8 {
    return V8(qdecode4(fmt, h, 0u, m0.x, a0.x), qdecode4(fmt, h, 1u, m0.y, a0.y),
              qdecode4(fmt, h, 2u, m0.z, a0.z), qdecode4(fmt, h, 3u, m0.w, a0.w),
              qdecode4(fmt, h, 4u, m1.x, a1.x), qdecode4(fmt, h, 5u, m1.y, a1.y),
              qdecode4(fmt, h, 6u, m1.z, a1.z), qdecode4(fmt, h, 7u, m1.w, a1.w));
}

// The tuned decode of the subgroup matvec for Q8_0, Q4_0 and Q4_1: a block's quants are taken
// out without their scale and offset, the dot products with x are summed, and `qfold` applies the
// block's d (and m, and Q4_0's -8) once per block and token instead of once per weight.
fn qtuned(fmt: u32) -> bool {
    return fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1;
}

// The tuned formats that fold an offset into the block's sum of x (Q4_0's -8, Q4_1's m), and so
// take their nibbles in place (below): the caller sums x over the block and scales it by
// `qx_scale`.
fn qfolds_xsum(fmt: u32) -> bool {
    return fmt == Q4_0 || fmt == Q4_1;
}

// Q4 nibbles are taken out of a word in place (q4_lo_in_place), as q * 256^i for byte i, so x is
// scaled by 256^-i once per block instead of every weight being shifted down. Powers of two: the
// products are exactly those of the unscaled values.
const NIBBLE_SCALE = vec4<f32>(1.0, 1.0 / 256.0, 1.0 / 65536.0, 1.0 / 16777216.0);

// What a tuned format's x is multiplied by, lane j of each vec4 of the block (see NIBBLE_SCALE).
fn qx_scale(fmt: u32) -> vec4<f32> {
    return select(vec4<f32>(1.0), NIBBLE_SCALE, qfolds_xsum(fmt));
}

// The low nibbles of a Q4 word (weights 4j..4j+3 of data word j) in place: nibble i as q * 256^i.
// One AND and a conversion per weight, where shifting each down costs a shift more.
fn q4_lo_in_place(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(w) & vec4<u32>(0xfu, 0xf00u, 0xf0000u, 0xf000000u));
}

// The high nibbles (weights 16+4j..16+4j+3), shifted down by 4 first so that the top one stays
// below 2^31 (a signed conversion).
fn q4_hi_in_place(w: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(w >> 4u) & vec4<u32>(0xfu, 0xf00u, 0xf0000u, 0xf000000u));
}

// The data words of block `blk` of a tuned format, as groups of four (words 4t..4t+3 of the row:
// one texel): Q8_0's 8 are groups 2 blk and 2 blk + 1, Q4's 4 group blk (`half` 1 unused). Their
// blocks are whole groups, so the caller loads them without the realignment of `qword4`.
fn qtuned_group(fmt: u32, blk: u32, half: u32) -> u32 {
    return blk * (qblock_words(fmt) / 4u) + half;
}

// The quants of block `blk` of a tuned format from its data words (qtuned_group): Q8_0's signed
// bytes, Q4's nibbles in place (unsigned, times 256^i; x carries the inverse, qx_scale).
fn qquants_tuned(fmt: u32, w0: vec4<u32>, w1: vec4<u32>) -> V8 {
    if (fmt == Q8_0) {
        return V8(q8_unpack(w0.x), q8_unpack(w0.y), q8_unpack(w0.z), q8_unpack(w0.w),
                  q8_unpack(w1.x), q8_unpack(w1.y), q8_unpack(w1.z), q8_unpack(w1.w));
    }
    // Q4: word j holds weights 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles).
    return V8(q4_lo_in_place(w0.x), q4_lo_in_place(w0.y), q4_lo_in_place(w0.z),
              q4_lo_in_place(w0.w), q4_hi_in_place(w0.x), q4_hi_in_place(w0.y),
              q4_hi_in_place(w0.z), q4_hi_in_place(w0.w));
}

// A tuned block's sums of products for several tokens: from s = sum q x (the quants of
// qquants_tuned) and xsum = sum x (qfolds_xsum formats) to sum w x, with the block's scales dm
// (qscales_of). Q8_0: d s; Q4_0: d (s - 8 xsum); Q4_1: d s + m xsum.
fn qfold(fmt: u32, dm: vec2<f32>, s: vec4<f32>, xsum: vec4<f32>) -> vec4<f32> {
    switch fmt {
        case Q4_0: { return dm.x * (s - 8.0 * xsum); }
        case Q4_1: { return dm.x * s + dm.y * xsum; }
        default: { return dm.x * s; } // Q8_0
    }
}

// ---- A unit split over four lanes (the workgroup matvec, shaders/common/matvec_wg_body.wgsl) ----
// Lane j (0..3) of the four that share a 32-weight unit takes weights 4j..4j+3 and 16+4j..16+4j+3:
// the two nibbles of Q4 data word j, Q8_0's words j and j + 4, and for every format x values
// 4j.. and 16+4j.. as two vec4, so consecutive lanes read consecutive words of W and of x.

// The unit's weights of lane j: lo = weights 4j..4j+3, hi = 16+4j..16+4j+3.
struct Quarter {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

// Lane j's weights of a unit, dequantised by qdecode4 (every format but f32/f16): the same values
// as qunit4(fmt, row, h, j) and qunit4(fmt, row, h, j + 4). Where both halves come from one word
// (Q4 and Q5 nibbles, Q5's one word of fifth bits) it is loaded once.
fn qquarter(fmt: u32, row: u32, h: QUnit, j: u32) -> Quarter {
    let shared_main = fmt == Q4_0 || fmt == Q4_1 || fmt == Q5_0 || fmt == Q5_1;
    let w0 = qword(fmt, row, qmain_index(fmt, h, j));
    var w1 = w0;
    if (!shared_main) {
        w1 = qword(fmt, row, qmain_index(fmt, h, j + 4u));
    }
    var a0 = 0u;
    var a1 = 0u;
    if (qhas_aux(fmt)) {
        a0 = qword(fmt, row, qaux_index(fmt, h, j));
        a1 = a0;
        if (!shared_main) {
            a1 = qword(fmt, row, qaux_index(fmt, h, j + 4u));
        }
    }
    return Quarter(qdecode4(fmt, h, j, w0, a0), qdecode4(fmt, h, j + 4u, w1, a1));
}

// Unsigned integers below 2^23 as f32 without an int-to-float conversion: OR-ed into the mantissa
// of 2^23 and 2^23 subtracted (exact). On GPUs the conversion runs at a fraction of the FMA rate;
// an OR and a subtraction run at the full rate.
fn qsmall_to_f32(q: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(q | vec4<u32>(0x4B000000u)) - vec4<f32>(8388608.0);
}

// Lane j's quants of a tuned format's block (qtuned: Q8_0, Q4_0, Q4_1) without scale or offset,
// from its data words w0 (word j) and w1 (Q8_0's word j + 4; unused for Q4): Q8_0's signed bytes,
// Q4's nibbles 0..15 (qfold applies d, m and Q4_0's -8 once per block with the sum of x).
fn qquarter_tuned(fmt: u32, w0: u32, w1: u32) -> Quarter {
    if (fmt == Q8_0) {
        return Quarter(q8_unpack(w0), q8_unpack(w1));
    }
    return Quarter(qsmall_to_f32(q4_lo_u(w0)), qsmall_to_f32(q4_hi_u(w0)));
}

// ---- Integer dot products on 8-bit activations (the idot entry points of the workgroup matvec) ----
// x is quantised per 32-value block to signed bytes and one f32 scale (shaders/quantize_x.wgsl),
// four bytes a word as the weights' Q8_0 data words are, so a lane's product of weights and x is
// two dot4I8Packed over packed bytes, summed as integers, with the block's scales applied once.

// The formats with integer-dot entry points.
fn qidot(fmt: u32) -> bool {
    return fmt == Q8_0 || fmt == Q4_0 || fmt == Q4_1 || fmt == Q5_0 || fmt == Q5_1;
}

// The data words lane j (0..3) of a block multiplies, relative to the block's first word: its
// quants (Q8_0's word j; the nibble word j of Q4, j + 1 of Q5) and a second word (Q8_0's word
// j + 4; Q5's word of fifth bits, word 0; unused for Q4, which repeats the first).
fn qidot_words(fmt: u32, j: u32) -> vec2<u32> {
    switch fmt {
        case Q8_0: { return vec2<u32>(j, j + 4u); }
        case Q5_0, Q5_1: { return vec2<u32>(j + 1u, 0u); }
        default: { return vec2<u32>(j, j); }
    }
}

// Bits 4i..4i+3 of a Q5 block's fifth-bit word (the fifth bits of weights 4i..4i+3) moved to bit 4
// of bytes 0..3.
fn q5_fifths_packed(a: u32, i: u32) -> u32 {
    let f = a >> (4u * i);
    return ((f & 1u) << 4u) | ((f & 2u) << 11u) | ((f & 4u) << 18u) | ((f & 8u) << 25u);
}

// Lane j's quants of a block as packed signed bytes (x: weights 4j..4j+3, y: 16+4j..16+4j+3),
// from the words at qidot_words: Q8_0's bytes as they are; Q4's nibbles, and Q5's nibbles with
// their fifth bits, each in a byte of its own (0..15 and 0..31, positive as i8; qidot_fold applies
// the offset -8 or -16, or the min m).
fn qquarter_packed(fmt: u32, w0: u32, w1: u32, j: u32) -> vec2<u32> {
    if (fmt == Q8_0) {
        return vec2<u32>(w0, w1);
    }
    var q = vec2<u32>(w0 & 0x0f0f0f0fu, (w0 >> 4u) & 0x0f0f0f0fu);
    if (fmt == Q5_0 || fmt == Q5_1) {
        q |= vec2<u32>(q5_fifths_packed(w1, j), q5_fifths_packed(w1, j + 4u));
    }
    return q;
}

// A lane's share of a block's sum w x from its integer sums: s = sum q_w q_x over its 8 weights,
// sx = sum q_x over the same 8 values, dm the block's scales (qscales_of) and dx the activations'
// scale. Q8_0: d dx s; Q4_0 (Q5_0): d dx (s - 8 sx) (- 16 sx), in integers first; Q4_1 and Q5_1:
// d dx s + m dx sx (ggml's min term: the block's sum of the quantised x, here per lane).
fn qidot_fold(fmt: u32, dm: vec2<f32>, dx: f32, s: i32, sx: i32) -> f32 {
    switch fmt {
        case Q4_0: { return dm.x * dx * f32(s - 8 * sx); }
        case Q5_0: { return dm.x * dx * f32(s - 16 * sx); }
        case Q4_1, Q5_1: { return dm.x * dx * f32(s) + dm.y * dx * f32(sx); }
        default: { return dm.x * dx * f32(s); } // Q8_0
    }
}

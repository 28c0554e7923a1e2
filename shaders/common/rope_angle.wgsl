// The rotation angle and pairs of RoPE, shared by rope.wgsl and rope_store.wgsl. The front file's
// params `p` hold `head_dim`, `rot_dim`, `pos0`, `mode` and `q: array<vec4<f32>, 128>`:
// freq_i / 2pi (turns per position) as an unevaluated sum hi + lo of two f32, computed in f64 on
// the host; q[k] = (hi, lo) of pair 2k, then (hi, lo) of pair 2k + 1. Up to 256 pairs.

const TWO_PI: f32 = 6.283185307179586;

// x - round(x): exact for any f32.
fn frac(v: f32) -> f32 {
    return v - round(v);
}

// The fractional part of pos * (hi + lo) turns, within a few 1e-8 for every pos < 2^24, where a plain
// f32 angle pos * freq would be off by ~pos * freq * 2^-24 (0.01 rad at position 1e5) and then hit
// the device's large-argument sin/cos. pos and hi are each cut into two 12-bit halves, so the four
// partial products are exact and their whole turns drop out exactly; pos * lo is tiny.
fn turns(pos: u32, hi: f32, lo: f32) -> f32 {
    let p1 = f32(pos >> 12u) * 4096.0;
    let p2 = f32(pos & 0xfffu);
    let h1 = bitcast<f32>(bitcast<u32>(hi) & 0xfffff000u);
    let h2 = hi - h1;
    let f = frac(p2 * h2) + frac(f32(pos) * lo) + frac(p2 * h1) + frac(p1 * h2) + frac(p1 * h1);
    return frac(f);
}

// cos and sin of pair i's angle at `pos`; |angle| <= pi, so sin/cos never see a large argument.
fn rotation(pos: u32, i: u32) -> vec2<f32> {
    let qv = p.q[i / 2u];
    let q = select(qv.xy, qv.zw, (i % 2u) == 1u);
    let angle = turns(pos, q.x, q.y) * TWO_PI;
    return vec2<f32>(cos(angle), sin(angle));
}

// Rotated pair g of a tensor [m, heads, head_dim] (pairs numbered by token, head, then pair i <
// rot_dim / 2): its elements a and b (mode 0: 2i and 2i + 1 of the head; mode 1: i and
// i + rot_dim / 2) and the cos and sin it turns by. The rotation is
// (x[a], x[b]) <- (x[a] c - x[b] s, x[a] s + x[b] c).
struct Pair {
    a: u32,
    b: u32,
    cs: vec2<f32>,
}

fn pair_at(g: u32, heads: u32) -> Pair {
    return pair_at_pos(g, heads, p.pos0 + g / (p.rot_dim / 2u) / heads);
}

// pair_at with the token's position `pos` given (rope_store.wgsl's row table).
fn pair_at_pos(g: u32, heads: u32, pos: u32) -> Pair {
    let half = p.rot_dim / 2u;
    let i = g % half;
    let th = g / half; // token * heads + head
    let base = th * p.head_dim;
    var r = Pair(base + i, base + i + half, rotation(pos, i));
    if (p.mode == 0u) {
        r.a = base + 2u * i;
        r.b = r.a + 1u;
    }
    return r;
}

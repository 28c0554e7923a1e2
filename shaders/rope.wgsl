// Rotary position embedding, IN PLACE on x [m, n_heads, head_dim]; one invocation per rotated pair.
// Token t has position pos = pos0 + t; pair i (i < rot_dim / 2) turns by pos * freq_i radians,
// freq_i given by the host (theta^(-2i/rot_dim), or a scaled variant):
//   mode 0 (interleaved, GGUF/llama.cpp "normal"): elements (2i, 2i + 1) of each head;
//   mode 1 (half, HF rotate_half / NeoX):          elements (i, i + rot_dim / 2).
// Elements from rot_dim to head_dim (partial rotary) are left untouched.
// One dispatch may rotate two tensors of the same tokens (Q and K): pairs of x first, then those of
// x2 [m, n_heads2, head_dim]; n_heads2 = 0 rotates x alone (the host binds x in both slots).
// Bindings: 0 = x (read_write), 1 = x2 (read_write), 2 = params.

struct Params {
    m: u32,
    n_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    n_heads2: u32,
    _pad1: u32,
    // freq_i / 2pi (turns per position) as an unevaluated sum hi + lo of two f32, computed in f64
    // on the host: q[k] = (hi, lo) of pair 2k, then (hi, lo) of pair 2k + 1. Up to 256 pairs.
    q: array<vec4<f32>, 128>,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> x2: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

const WG: u32 = 256u;
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

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = p.rot_dim / 2u;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    let n1 = p.m * p.n_heads * half;
    let second = g >= n1;
    if (g >= n1 + p.m * p.n_heads2 * half) {
        return;
    }
    let k = select(g, g - n1, second);
    let heads = select(p.n_heads, p.n_heads2, second);
    let i = k % half;
    let th = k / half; // token * heads + head
    let t = th / heads;
    let base = th * p.head_dim;
    var a = base + i;
    var b = base + i + half;
    if (p.mode == 0u) {
        a = base + 2u * i;
        b = a + 1u;
    }
    let qv = p.q[i / 2u];
    let q = select(qv.xy, qv.zw, (i % 2u) == 1u);
    // |angle| <= pi: sin/cos never see a large argument.
    let angle = turns(p.pos0 + t, q.x, q.y) * TWO_PI;
    let c = cos(angle);
    let s = sin(angle);
    if (second) {
        let x0 = x2[a];
        let x1 = x2[b];
        x2[a] = x0 * c - x1 * s;
        x2[b] = x0 * s + x1 * c;
    } else {
        let x0 = x[a];
        let x1 = x[b];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

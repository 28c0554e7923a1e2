// Rotary position embedding, IN PLACE on x [m, n_heads, head_dim]; one invocation per rotated pair.
// Token t has position pos0 + t; pair i (i < rot_dim / 2) rotates by angle pos * theta^(-2i/rot_dim):
//   mode 0 (interleaved, GGUF/llama.cpp "normal"): elements (2i, 2i + 1) of each head;
//   mode 1 (half, HF rotate_half / NeoX):          elements (i, i + rot_dim / 2).
// Elements from rot_dim to head_dim (partial rotary) are left untouched.
// Bindings: 0 = x (read_write), 1 = params.

struct Params {
    m: u32,
    n_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    // log2(theta) / rot_dim split as hi + lo, where hi has only 12 significant bits so that
    // f32(2i) * hi is exact for 2i < 4096 (see freq()).
    lt_hi: f32,
    lt_lo: f32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

const WG: u32 = 256u;
const TWO_PI: f32 = 6.283185307179586;
const INV_TWO_PI: f32 = 0.15915494309189535;

// theta^(-2i/rot_dim) = 2^-(2i * log2(theta) / rot_dim). Evaluating the exponent e (up to ~20) in
// plain f32 would cost |e| * 2^-24 of relative error in the result (~1e-6); instead the exact part
// 2i * hi is split into an integer n and an exact fraction, so exp2 only sees a small argument and
// the power of two is applied exactly with ldexp. Result: a few ulps.
fn freq(i: u32) -> f32 {
    let j = f32(2u * i);
    let a = j * p.lt_hi;
    let n = floor(a);
    let f = (a - n) + j * p.lt_lo;
    return ldexp(exp2(-f), -i32(n));
}

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = p.rot_dim / 2u;
    let k = (wid.x + wid.y * nwg.x) * WG + lid;
    if (k >= p.m * p.n_heads * half) {
        return;
    }
    let i = k % half;
    let th = k / half; // token * n_heads + head
    let t = th / p.n_heads;
    let base = th * p.head_dim;
    var a = base + i;
    var b = base + i + half;
    if (p.mode == 0u) {
        a = base + 2u * i;
        b = a + 1u;
    }
    // The angle is formed in turns and its whole turns dropped exactly, so sin/cos only ever see
    // [-pi, pi]: implementations reduce large arguments with errors well above the f32 rounding of
    // the angle itself (lavapipe: ~7x at position 1e5).
    let turns = f32(p.pos0 + t) * (freq(i) * INV_TWO_PI);
    let angle = (turns - round(turns)) * TWO_PI;
    let c = cos(angle);
    let s = sin(angle);
    let x0 = x[a];
    let x1 = x[b];
    x[a] = x0 * c - x1 * s;
    x[b] = x0 * s + x1 * c;
}

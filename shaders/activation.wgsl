// Activations, one invocation per element:
//   swiglu:    out = silu(gate) * up,              silu(g) = g * sigmoid(g)
//   gelu_erf:  out = 0.5 x (1 + erf(x / sqrt 2))  (exact GELU)
//   gelu_tanh: out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   geglu_tanh: out = gelu_tanh(gate) * up
// Bindings: 0 = gate / x (read), 1 = up (read; the gelu entries do not use it, the host binds x
// there), 2 = out (read_write), 3 = params.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG: u32 = 256u;

// exp(a) to a few ulps for |a| up to ~87: Cody-Waite reduction a = k ln2 + r (ln2 split so that
// k * ln2_hi is exact for |k| < 128), exp only sees |r| <= ln2/2, and ldexp applies 2^k exactly.
// A plain exp(a), often exp2(a * log2 e), loses about |a| * 2^-24 relatively (4e-6 at a = -66).
// Arguments are clamped to [-104, 88]: exp(-104) is below the smallest denormal, and infinities
// would turn the reduction into NaN.
fn exp_acc(a0: f32) -> f32 {
    let a = clamp(a0, -104.0, 88.0);
    let k = round(a * 1.4426950408889634);
    let r = (a - k * 6.9313812256e-01) - k * 9.0580006145e-06;
    return ldexp(exp(r), i32(k));
}

// 1 / (1 + exp(-v)) without overflow: exp only ever sees -|v|. The clamp keeps infinities (and
// implementations that mishandle them) out; sigmoid(±80) is 1 or 1.8e-35, past f32 resolution.
fn sigmoid(v: f32) -> f32 {
    let e = exp_acc(-abs(clamp(v, -80.0, 80.0)));
    let r = 1.0 / (1.0 + e);
    return select(e * r, r, v >= 0.0);
}

// erfc(|x| / sqrt 2) for ax = |x| >= 0: Numerical Recipes' erfcc, a Chebyshev fit whose fractional
// (relative) error is below 1.2e-7 everywhere, so the GELU tail keeps its relative accuracy.
// WGSL has no erf. exp(-z^2) is evaluated as exp(-s^2/2) * exp((s - ax)(s + ax)/2) with s = ax cut
// to 12 significant bits (s*s exact), so the rounding of z^2 does not grow with z (it would cost
// ~z^2 * 1e-7 relative error at z = 7); the large part goes through exp_acc.
fn erfc_scaled(ax: f32) -> f32 {
    let z = ax * 0.7071067811865476;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806
        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    let s = bitcast<f32>(bitcast<u32>(ax) & 0xfffff000u);
    // (s - ax)(s + ax) is tiny except for huge ax, where the clamp keeps -inf out of exp.
    return t * exp_acc(-0.5 * s * s) * exp(max(0.5 * (s - ax) * (s + ax) + poly, -104.0));
}

@compute @workgroup_size(256)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        let g = a[i];
        out[i] = g * sigmoid(g) * b[i];
    }
}

@compute @workgroup_size(256)
fn gelu_erf(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        let v = a[i];
        // 1 + erf(v / sqrt 2) = erfc(-v / sqrt 2); erfc(-z) = 2 - erfc(z). For v < 0 this never
        // forms 1 - (something close to 1), so small negative outputs stay accurate.
        let c = erfc_scaled(abs(v));
        out[i] = 0.5 * v * select(c, 2.0 - c, v >= 0.0);
    }
}

@compute @workgroup_size(256)
fn gelu_tanh(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        let v = a[i];
        let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
        // 0.5 (1 + tanh(u)) = sigmoid(2u): no tanh overflow for large |u|, no cancellation for u < 0.
        out[i] = v * sigmoid(2.0 * u);
    }
}

// GeGLU with the tanh GELU (Gemma): out = gelu_tanh(gate) * up, gelu_tanh as in the entry above.
@compute @workgroup_size(256)
fn geglu_tanh(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        let v = a[i];
        let u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
        out[i] = v * sigmoid(2.0 * u) * b[i];
    }
}

// x quantised to 8-bit for the workgroup matvec's integer-dot entry points (matvec_idot_* in
// common/matvec_wg_body.wgsl), once per token and product input rather than once per row of
// weights: llama.cpp's Q8_1 idea. Each 32-value block of a token's row becomes 8 words of packed
// i8 (values 4i..4i+3 in word i, byte 0 first) and one f32 scale d = max |v| / 127, q =
// round(v / d) (ties to even, as src/kernels/matmul/idot.rs's reference). The output holds the
// quants of all blocks of all tokens first, then the scales. What the float matvec folds into
// its input is applied here (XFN): SwiGLU of x and x2, or RMSNorm of x with gamma x2, whose
// 1 / rms goes into the scales (the quants of x * gamma and of its normalised value are the same).
// One workgroup per token.

struct Params {
    cols: u32, // values per token (whole blocks of 32)
    m: u32,    // tokens
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> xv: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> x2v: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> xq: array<u32>;
@group(0) @binding(3) var<uniform> p: Params;

// 0: x; 1: silu(x) * x2; 2: RMSNorm of x with gamma x2 and EPS.
override XFN: u32 = 0u;
override EPS: f32 = 1e-5;
const WG: u32 = 64u;

var<workgroup> red: array<f32, 64>;

// Values 4k..4k+3 of token tok's row as the product reads them (before the norm's 1 / rms).
fn input4(tok: u32, k: u32) -> vec4<f32> {
    let i = tok * (p.cols / 4u) + k;
    var v = xv[i];
    if (XFN == 1u) {
        v = v / (1.0 + exp(-v)) * x2v[i];
    }
    if (XFN == 2u) {
        v *= x2v[k];
    }
    return v;
}

@compute @workgroup_size(64)
fn quantize_q8(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tok = wid.x + wid.y * nwg.x;
    if (tok >= p.m) {
        return; // the whole workgroup: uniform
    }
    let vecs = p.cols / 4u;
    var scale = 1.0;
    if (XFN == 2u) {
        var sq = 0.0;
        for (var k = lid; k < vecs; k += WG) {
            let v = xv[tok * vecs + k];
            sq += dot(v, v);
        }
        red[lid] = sq;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s = s >> 1u) {
            if (lid < s) {
                red[lid] += red[lid + s];
            }
            workgroupBarrier();
        }
        scale = inverseSqrt(red[0] / f32(p.cols) + EPS);
    }
    let blocks = p.cols / 32u;
    for (var b = lid; b < blocks; b += WG) {
        var v: array<vec4<f32>, 8>;
        var amax = vec4<f32>(0.0);
        for (var i = 0u; i < 8u; i++) {
            v[i] = input4(tok, 8u * b + i);
            amax = max(amax, abs(v[i]));
        }
        let d = max(max(amax.x, amax.y), max(amax.z, amax.w)) / 127.0;
        let id = select(0.0, 1.0 / d, d > 0.0);
        let g = tok * blocks + b;
        for (var i = 0u; i < 8u; i++) {
            xq[8u * g + i] = pack4xI8(vec4<i32>(round(v[i] * id)));
        }
        xq[p.m * blocks * 8u + g] = bitcast<u32>(d * scale);
    }
}

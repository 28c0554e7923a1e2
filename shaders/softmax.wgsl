// Row softmax over the last dimension, one workgroup per row:
//   out = exp(x - max(x)) / sum(exp(x - max(x)))
// Subtracting the row maximum keeps exp() in (0, 1], so large logits cannot overflow. A row whose
// sum underflows to 0 (only possible with -inf entries everywhere) comes out as zeros, not NaN.
// Bindings: 0 = x [m, n] (read), 1 = out [m, n] (read_write), 2 = params.

struct Params {
    m: u32,
    n: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

const WG: u32 = 256u;
const LOWEST: f32 = -3.4028234663852886e38;

var<workgroup> red: array<f32, 256>;

fn wg_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn wg_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.m) {
        return;
    }
    let base = row * p.n;
    var mx = LOWEST;
    for (var i = lid; i < p.n; i = i + WG) {
        mx = max(mx, x[base + i]);
    }
    mx = wg_max(lid, mx);
    // The exponentials are parked in `out` and rescaled below; each invocation only rereads what it
    // wrote itself, so no barrier is needed, and exp() runs once per element.
    var s = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        let e = exp(x[base + i] - mx);
        out[base + i] = e;
        s = s + e;
    }
    let total = wg_sum(lid, s);
    let inv = select(0.0, 1.0 / total, total > 0.0);
    for (var i = lid; i < p.n; i = i + WG) {
        out[base + i] = out[base + i] * inv;
    }
}

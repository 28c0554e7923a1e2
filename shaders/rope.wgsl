// Rotary position embedding, IN PLACE on x [m, n_heads, head_dim]; one invocation per rotated pair.
// Token t has position pos = pos0 + t; pair i (i < rot_dim / 2) turns by pos * freq_i radians,
// freq_i given by the host (theta^(-2i/rot_dim), or a scaled variant):
//   mode 0 (interleaved, GGUF/llama.cpp "normal"): elements (2i, 2i + 1) of each head;
//   mode 1 (half, HF rotate_half / NeoX):          elements (i, i + rot_dim / 2).
// Elements from rot_dim to head_dim (partial rotary) are left untouched. The LLaMA forward pass
// rotates q and k in rope_store.wgsl, with the KV-cache store; this kernel serves other callers.
// Bindings: 0 = x (read_write), 1 = params.

// #include "common/rope_angle.wgsl"

struct Params {
    m: u32,
    n_heads: u32,
    head_dim: u32,
    rot_dim: u32,
    pos0: u32,
    mode: u32,
    _pad0: u32,
    _pad1: u32,
    q: array<vec4<f32>, 128>, // frequencies: see common/rope_angle.wgsl
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let half = p.rot_dim / 2u;
    let g = (wid.x + wid.y * nwg.x) * WG + lid;
    if (g >= p.m * p.n_heads * half) {
        return;
    }
    let r = pair_at(g, p.n_heads);
    let x0 = x[r.a];
    let x1 = x[r.b];
    x[r.a] = x0 * r.cs.x - x1 * r.cs.y;
    x[r.b] = x0 * r.cs.y + x1 * r.cs.x;
}

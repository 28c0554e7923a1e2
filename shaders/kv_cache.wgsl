// KV-cache store: writes m new rows of keys and values (f32 activations) into one layer's cache,
// converting to the cache's storage type (the row layouts: common/kv_store_body.wgsl; byte costs:
// src/kernels/attention/kv_cache.rs). rope_store.wgsl does the same for keys that RoPE rotates on
// the way. Bindings: 0 = k_in, 1 = v_in (read, f32 [m, n_kv_heads, head_dim]), 2 = k_cache,
// 3 = v_cache (read_write, u32 words), 4 = params.

// #include "common/kv_store_body.wgsl"

struct Params {
    rows: u32,          // m * n_kv_heads rows to write
    head_dim: u32,
    row_words: u32,
    pos0: u32,          // position of the first new token
    units_per_row: u32,
    n_kv_heads: u32,
    slots: u32,         // the ring's length: position p goes to slot p % slots
    base: u32,          // first word of the sequence's cache (its slot of slot-major buffers)
}

@group(0) @binding(0) var<storage, read> k_in: array<f32>;
@group(0) @binding(1) var<storage, read> v_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_cache: array<u32>;
@group(0) @binding(3) var<storage, read_write> v_cache: array<u32>;
@group(0) @binding(4) var<uniform> p: Params;

const WG: u32 = 64u;

fn token_pos(t: u32) -> u32 {
    return p.pos0 + t;
}

fn token_base(t: u32) -> u32 {
    return p.base;
}

fn kv_in(is_v: bool, i: u32) -> f32 {
    return select(k_in[i], v_in[i], is_v);
}

fn kv_pair(is_v: bool, i: u32) -> vec2<f32> {
    return vec2<f32>(kv_in(is_v, i), kv_in(is_v, i + 1u));
}

@compute @workgroup_size(64)
fn store(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.rows * p.units_per_row) {
        return;
    }
    store_unit(i / p.units_per_row, i % p.units_per_row);
}

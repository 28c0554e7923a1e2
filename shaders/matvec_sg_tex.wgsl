// The subgroup matrix-vector product (matvec_sg.wgsl) over weights in textures, the layout of
// src/kernels/weights.rs: texture row r is matrix row r of the shard; data texels are rgba32uint
// (a Q4 block is one texel, a Q8_0 block two, 4 f32 or 8 f16 weights one; Q5 and K-quant blocks
// of 5, 35, 43 or 52 words run on across texels), scales one texel a block (r16uint: the f16 d of
// Q8_0/Q4_0/Q5_0/Q6_K; r32uint: the d and m or dmin of Q4_1/Q5_1/Q4_K/Q5_K).
//
// Why: on llvmpipe a textureLoad is a vectorised gather, about 2 ns a lane for 16 bytes, where a
// storage load is a loop over the lanes at about 8 ns a lane for 4 bytes (BENCHMARKS.md). x stays
// in a buffer (it is written by the kernel before, and each x load serves R rows): a storage
// buffer here, a uniform window in matvec_sg_tex_ux.wgsl.
// Bindings as in common/matvec_sg_body.wgsl, the weights as textures (the scales slot of f32/f16
// binds the data texture again). Several matrices may share a texture (stacked rows; `p.row0`).

// #include "common/matvec_sg_w_tex.wgsl"
// #include "common/matvec_sg_x_storage.wgsl"

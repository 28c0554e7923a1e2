// The subgroup matvec over weights in textures (matvec_sg_tex.wgsl) with x, and SwiGLU's up,
// read from uniform windows (common/matvec_sg_x_uniform.wgsl says why). The host picks it where x
// fits a window (src/kernels/matmul/subgroup.rs).

// #include "common/matvec_sg_w_tex.wgsl"
// #include "common/matvec_sg_x_uniform.wgsl"

// The subgroup matvec (matvec_sg.wgsl, whose comments give the design) with x, and SwiGLU's up,
// read from uniform windows (common/matvec_sg_x_uniform.wgsl says why), the weights in storage
// buffers. The host picks it where x fits a window (src/kernels/matmul/subgroup.rs).

// #include "common/matvec_sg_w_buffers.wgsl"
// #include "common/matvec_sg_x_uniform.wgsl"

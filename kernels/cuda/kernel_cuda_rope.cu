/*
 * rope: rotary embedding in place, Llama "normal" style: for each token t, head h and
 * pair j < rope_dim/2, (x[2j], x[2j+1]) is rotated by theta = pos[t] *
 * base^(-2j/rope_dim); dims >= rope_dim are kept. theta, cos and sin are computed in
 * double as the CPU backend does, and the rotation is rounded without fused multiply-adds,
 * so both backends agree to the last bit except where the double-precision libraries do.
 * One thread per (token, pair) loops over the heads, so each angle is computed once.
 * Bound: memory, n_tok * n_head * rope_dim * 8 B (+ n_tok * rope_dim/2 double sincos).
 */
#include "kernel_cuda_int.cuh"

__global__ void rope_kernel(float *x, const int32_t *pos, uint32_t n_tok, uint32_t n_head,
                            uint32_t head_dim, uint32_t rope_dim, double base)
{
    uint32_t half = rope_dim / 2;
    uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_tok * half)
        return;
    uint32_t t = idx / half, j = idx % half;
    double theta = (double)pos[t] * pow(base, -2.0 * j / (double)rope_dim);
    double sd, cd;
    sincos(theta, &sd, &cd);
    float c = (float)cd, s = (float)sd;
    float *row = x + (size_t)t * n_head * head_dim;
    for (uint32_t h = 0; h < n_head; h++) {
        float *v = row + (size_t)h * head_dim + 2 * j;
        float x0 = v[0], x1 = v[1];
        v[0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        v[1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

void cuda_op_rope(struct kernel_backend *be, float *x, const struct kernel_batch *b,
                  uint32_t n_head, uint32_t head_dim, uint32_t rope_dim, float freq_base)
{
    struct cuda_backend *cb = cuda_cb(be);
    PW_ASSERT(rope_dim <= head_dim && rope_dim % 2 == 0);
    if (rope_dim == 0 || n_head == 0)
        return;
    cuda_enter(cb);
    cuda_batch_sync(cb, b, CUDA_BATCH_POS, 0, 0);
    uint32_t items = b->n_tok * (rope_dim / 2);
    rope_kernel<<<(items + 127) / 128, 128, 0, cb->stream>>>(x, cb->batch.d_pos, b->n_tok, n_head,
                                                             head_dim, rope_dim, (double)freq_base);
    CUDA_LAUNCHED(cb, "rope_kernel");
}

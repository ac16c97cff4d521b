/*
 * copy_rows: dst[i][:] = src[rows[i]][:] (rows is host memory, uploaded first); gathers
 * the rows that need logits. dst and src must not overlap.
 * Bound: memory, 8 B per element copied.
 */
#include "kernel_cuda_int.cuh"

__global__ void copy_rows_kernel(float *dst, const float *src, const int32_t *rows,
                                 uint32_t row_len)
{
    uint32_t i = blockIdx.y;
    const float *s = src + (size_t)rows[i] * row_len;
    float *d = dst + (size_t)i * row_len;
    for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < row_len;
         k += gridDim.x * blockDim.x)
        d[k] = s[k];
}

void cuda_op_copy_rows(struct kernel_backend *be, float *dst, const float *src, const int32_t *rows,
                       uint32_t n, uint32_t row_len)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (n == 0 || row_len == 0)
        return;
    PW_ASSERT(n <= cb->max_tok);
    for (uint32_t i = 0; i < n; i++)
        PW_ASSERT(rows[i] >= 0);
    cuda_enter(cb);
    /* d_rows is reused by the next call only after this kernel (same stream); a recorded
     * step's rows were put there by step_begin. */
    if (!cuda_rows_put(cb, rows, n))
        return;
    unsigned bx = (row_len + 255) / 256;
    copy_rows_kernel<<<dim3(bx > 64 ? 64 : bx, n), 256, 0, cb->stream>>>(dst, src, cb->d_rows,
                                                                         row_len);
    CUDA_LAUNCHED(cb, "copy_rows_kernel");
}

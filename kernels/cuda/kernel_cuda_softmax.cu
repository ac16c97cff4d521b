/*
 * softmax: each row of x[n_rows][n] in place, exp(x - max) / sum, one block per row.
 * Bound: memory, 3 passes over the row (12 B per element; a vocab row stays in L2).
 */
#include "kernel_cuda_int.cuh"

#define SM_THREADS 512

/* Block-wide reduction of v (sum or max); every thread gets the result. */
__device__ float block_reduce(float v, bool is_max, float *part)
{
    v = is_max ? cuda_warp_max(v) : cuda_warp_sum(v);
    __syncthreads(); /* part may still be read from the previous reduction */
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = v;
    __syncthreads();
    float r = part[0];
    for (int i = 1; i < SM_THREADS / 32; i++)
        r = is_max ? fmaxf(r, part[i]) : r + part[i];
    return r;
}

__global__ void softmax_kernel(float *x, uint32_t n)
{
    __shared__ float part[SM_THREADS / 32];
    float *xr = x + (size_t)blockIdx.x * n;
    float mx = -INFINITY;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        mx = fmaxf(mx, xr[i]);
    mx = block_reduce(mx, true, part);
    float sum = 0.0f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(xr[i] - mx);
        xr[i] = e;
        sum += e;
    }
    sum = block_reduce(sum, false, part);
    float inv = 1.0f / sum;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        xr[i] *= inv;
}

void cuda_op_softmax(struct kernel_backend *be, float *x, uint32_t n_rows, uint32_t n)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (n_rows == 0 || n == 0)
        return;
    cuda_enter(cb);
    softmax_kernel<<<n_rows, SM_THREADS, 0, cb->stream>>>(x, n);
    CUDA_LAUNCHED(cb, "softmax_kernel");
}

/*
 * rmsnorm: y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, one block per row; y may be x
 * (each thread rewrites only the elements it read).
 * Bound: memory, n_tok * n * 8 B (+ n * 4 B of weight, cached).
 */
#include "kernel_cuda_int.cuh"

#define RMS_THREADS 256

__global__ void rmsnorm_kernel(const float *x, const float *w, float *y, uint32_t n, float eps)
{
    __shared__ float part[RMS_THREADS / 32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = y + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = cuda_warp_sum(ss);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = ss;
    __syncthreads();
    float tot = 0.0f;
    for (int i = 0; i < RMS_THREADS / 32; i++)
        tot += part[i];
    float scale = 1.0f / sqrtf(tot / (float)n + eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
}

void cuda_op_rmsnorm(struct kernel_backend *be, const float *x, const struct kernel_weight *kw,
                     float *y, uint32_t n_tok, uint32_t n, float eps)
{
    struct cuda_backend *cb = cuda_cb(be);
    PW_ASSERT(kw->info.dtype == KERNEL_DTYPE_F32 && kw->info.n_out * kw->info.n_in == n);
    if (n_tok == 0)
        return;
    cuda_enter(cb);
    const float *w = (const float *)((const struct cuda_weight *)kw)->data;
    rmsnorm_kernel<<<n_tok, RMS_THREADS, 0, cb->stream>>>(x, w, y, n, eps);
    CUDA_LAUNCHED(cb, "rmsnorm_kernel");
}

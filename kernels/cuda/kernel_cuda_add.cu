/*
 * add: y[i] += x[i]. Bound: memory, 12 B per element.
 */
#include "kernel_cuda_int.cuh"

__global__ void add_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

void cuda_op_add(struct kernel_backend *be, float *y, const float *x, size_t n)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (n == 0)
        return;
    cuda_enter(cb);
    add_kernel<<<cuda_blocks(n, 256), 256, 0, cb->stream>>>(y, x, n);
    CUDA_LAUNCHED(cb, "add_kernel");
}

/*
 * swiglu: out[i] = silu(gate[i]) * up[i] = gate / (1 + exp(-gate)) * up; out may alias
 * gate or up (element-wise). Bound: memory, 12 B per element.
 */
#include "kernel_cuda_int.cuh"

__global__ void swiglu_kernel(const float *gate, const float *up, float *out, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
    }
}

void cuda_op_swiglu(struct kernel_backend *be, const float *gate, const float *up, float *out,
                    size_t n)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (n == 0)
        return;
    cuda_enter(cb);
    swiglu_kernel<<<cuda_blocks(n, 256), 256, 0, cb->stream>>>(gate, up, out, n);
    CUDA_LAUNCHED(cb, "swiglu_kernel");
}

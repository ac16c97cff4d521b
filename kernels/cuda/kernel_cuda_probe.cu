/*
 * probe: the device's own limits, measured once by benchmarks to express results as a
 * fraction of a bound. Bandwidth: cudaMemcpyAsync device to device of 1 GiB (2 GiB moved),
 * best of 5. GEMM: cublasGemmEx BF16 x BF16 -> F32, 8192^3, best of 5 after a warm-up.
 * Not used by the serving path.
 */
#include "kernel_cuda_int.cuh"

static enum pw_err time_best(struct cuda_backend *cb, float *best_ms, int reps,
                             enum pw_err (*fn)(struct cuda_backend *, void *), void *ctx)
{
    cudaEvent_t e0 = NULL, e1 = NULL;
    enum pw_err err;
    *best_ms = 0.0f;
    if ((err = CUDA_CHECK(cb, cudaEventCreate(&e0))) ||
        (err = CUDA_CHECK(cb, cudaEventCreate(&e1))))
        goto out;
    if ((err = fn(cb, ctx))) /* warm-up */
        goto out;
    for (int i = 0; i < reps; i++) {
        float ms = 0.0f;
        if ((err = CUDA_CHECK(cb, cudaEventRecord(e0, cb->stream))) || (err = fn(cb, ctx)) ||
            (err = CUDA_CHECK(cb, cudaEventRecord(e1, cb->stream))) ||
            (err = CUDA_CHECK(cb, cudaEventSynchronize(e1))) ||
            (err = CUDA_CHECK(cb, cudaEventElapsedTime(&ms, e0, e1))))
            goto out;
        if (*best_ms == 0.0f || ms < *best_ms)
            *best_ms = ms;
    }
out:
    if (e0)
        cudaEventDestroy(e0);
    if (e1)
        cudaEventDestroy(e1);
    return err;
}

struct copy_ctx {
    void *a, *b;
    size_t bytes;
};

static enum pw_err do_copy(struct cuda_backend *cb, void *ctx)
{
    struct copy_ctx *c = (struct copy_ctx *)ctx;
    return CUDA_CHECK(cb,
                      cudaMemcpyAsync(c->b, c->a, c->bytes, cudaMemcpyDeviceToDevice, cb->stream));
}

extern "C" enum pw_err kernel_cuda_probe_bandwidth(struct kernel_backend *be, double *gbps)
{
    struct cuda_backend *cb = cuda_cb(be);
    struct copy_ctx c = {NULL, NULL, (size_t)1 << 30};
    enum pw_err err;
    float ms = 0.0f;
    *gbps = 0.0;
    cuda_enter(cb);
    if ((err = CUDA_CHECK(cb, cudaMalloc(&c.a, c.bytes))) ||
        (err = CUDA_CHECK(cb, cudaMalloc(&c.b, c.bytes))) ||
        (err = CUDA_CHECK(cb, cudaMemsetAsync(c.a, 1, c.bytes, cb->stream))) ||
        (err = time_best(cb, &ms, 5, do_copy, &c)))
        goto out;
    if (ms > 0.0f)
        *gbps = 2.0 * (double)c.bytes / ((double)ms * 1e-3) / 1e9;
out:
    if (c.a)
        CUDA_CHECK(cb, cudaFree(c.a));
    if (c.b)
        CUDA_CHECK(cb, cudaFree(c.b));
    cb->err = PW_OK; /* reported through the return value */
    return err;
}

struct gemm_ctx {
    void *a, *b, *c;
    int n;
};

static enum pw_err do_gemm(struct cuda_backend *cb, void *ctx)
{
    struct gemm_ctx *g = (struct gemm_ctx *)ctx;
    const float one = 1.0f, zero = 0.0f;
    return CUBLAS_CHECK(cb,
                        cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, g->n, g->n, g->n, &one,
                                     g->a, CUDA_R_16BF, g->n, g->b, CUDA_R_16BF, g->n, &zero, g->c,
                                     CUDA_R_32F, g->n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

extern "C" enum pw_err kernel_cuda_probe_gemm(struct kernel_backend *be, double *tflops)
{
    struct cuda_backend *cb = cuda_cb(be);
    struct gemm_ctx g = {NULL, NULL, NULL, 8192};
    size_t nn = (size_t)g.n * g.n;
    enum pw_err err;
    float ms = 0.0f;
    *tflops = 0.0;
    cuda_enter(cb);
    /* Any bit pattern is a valid operand for timing; 0x3c3c is a small normal BF16. */
    if ((err = CUDA_CHECK(cb, cudaMalloc(&g.a, nn * 2))) ||
        (err = CUDA_CHECK(cb, cudaMalloc(&g.b, nn * 2))) ||
        (err = CUDA_CHECK(cb, cudaMalloc(&g.c, nn * 4))) ||
        (err = CUDA_CHECK(cb, cudaMemsetAsync(g.a, 0x3c, nn * 2, cb->stream))) ||
        (err = CUDA_CHECK(cb, cudaMemsetAsync(g.b, 0x3c, nn * 2, cb->stream))) ||
        (err = time_best(cb, &ms, 5, do_gemm, &g)))
        goto out;
    if (ms > 0.0f)
        *tflops = 2.0 * (double)g.n * g.n * g.n / ((double)ms * 1e-3) / 1e12;
out:
    if (g.a)
        CUDA_CHECK(cb, cudaFree(g.a));
    if (g.b)
        CUDA_CHECK(cb, cudaFree(g.b));
    if (g.c)
        CUDA_CHECK(cb, cudaFree(g.c));
    cb->err = PW_OK;
    return err;
}

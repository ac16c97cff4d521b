/*
 * matmul: for each product of a group, y[n_tok][n_out] = x[n_tok][n_in] w^T, or y += it.
 *
 * Two paths, chosen per call by n_tok:
 *   n_tok <= CUDA_MV_MAX_TOK (decode): matvec_kernel reads every weight once from device
 *     memory for up to 8 token rows, dequantizing in registers (Q8_0/Q4_0/Q4_1, or F16/
 *     BF16/F32 loaded as is), with float activations and float accumulation. Each CTA
 *     stages a 512-element slice of the x rows in shared memory; 16 lanes share a row, each
 *     lane one 32-element block. Bound: memory, the weight bytes (+ x from L2, 1/16 of the
 *     weight's element count per token row).
 *   larger n_tok (prefill, batched decode): cuBLAS on tensor cores. x is converted once
 *     per call to F16 with a power-of-two scale per row (so rows of any magnitude keep 11
 *     significant bits without overflow; the scale is undone exactly after the GEMM) or to
 *     BF16 for BF16 weights. F16/BF16 weights go to cublasGemmEx in place; quantized
 *     weights are dequantized to F16 in row slabs (CUDA_SLAB_BYTES) first, each slab one
 *     GEMM. F32 weights use cublasSgemm on x directly. Bound: flops, 2 n_tok n_out n_in
 *     (plus 2 B written and read per weight element for the quantized slabs).
 *
 * Numerics differ from the CPU backend, which quantizes x to 16-bit integers for quantized
 * weights: here decode uses float x (more exact), and the GEMM path rounds x to F16 (or
 * BF16) and dequantized weights to F16: relative error per product term <= 2^-10 (2^-8 for
 * BF16). The CPU backend's bit-exact batch invariance does not hold across the two paths
 * (nor inside cuBLAS, whose kernel choice depends on n_tok); rows agree within those bounds.
 */
#include "kernel_cuda_int.cuh"

#define MV_LPR 16 /* lanes per weight row */
#define MV_WARPS 8
#define MV_ROWS (MV_WARPS * 32 / MV_LPR) /* rows per CTA */
#define MV_CHUNK (MV_LPR * KERNEL_QK)    /* x elements staged per step */
#define MV_XS (KERNEL_QK + 1)            /* padded shared-memory stride of one block */

/* Loads the 32 weights of row r's block at element kb into wv as floats. Quantized types
 * give the raw quants (q for Q4 in 0..15, signed q for Q8_0) and their d (and m). */
template <int DT>
__device__ __forceinline__ void mv_load(const struct cuda_wview &w, uint32_t r, uint32_t kb,
                                        bool vec, float wv[KERNEL_QK], float &d, float &m)
{
    d = 1.0f;
    m = 0.0f;
    if (DT == KERNEL_DTYPE_Q8_0 || DT == KERNEL_DTYPE_Q4_0 || DT == KERNEL_DTYPE_Q4_1) {
        size_t blk = (size_t)r * w.n_blocks + kb / KERNEL_QK;
        d = __half2float(w.d[blk]);
        if (DT == KERNEL_DTYPE_Q4_1)
            m = __half2float(w.m[blk]);
        if (DT == KERNEL_DTYPE_Q8_0) {
            const uint4 *p = (const uint4 *)(w.qs + blk * 32);
#pragma unroll
            for (int c = 0; c < 2; c++) {
                uint4 u = p[c];
                uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int i = 0; i < 16; i++)
                    wv[16 * c + i] = (float)(int8_t)(words[i / 4] >> (8 * (i % 4)));
            }
        } else {
            uint4 u = *(const uint4 *)(w.qs + blk * 16);
            uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 16; i++) {
                uint32_t q = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
                wv[i] = (float)(q & 0x0fu);
                wv[16 + i] = (float)(q >> 4);
            }
        }
        return;
    }
    size_t base = (size_t)r * w.n_in + kb;
    if (vec) {
        if (DT == KERNEL_DTYPE_F32) {
            const float4 *p = (const float4 *)((const float *)w.data + base);
#pragma unroll
            for (int c = 0; c < 8; c++) {
                float4 f = p[c];
                wv[4 * c] = f.x;
                wv[4 * c + 1] = f.y;
                wv[4 * c + 2] = f.z;
                wv[4 * c + 3] = f.w;
            }
        } else {
            const uint4 *p = (const uint4 *)((const uint16_t *)w.data + base);
#pragma unroll
            for (int c = 0; c < 4; c++) {
                uint4 u = p[c];
                uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    uint16_t h = (uint16_t)(words[i / 2] >> (16 * (i % 2)));
                    wv[8 * c + i] = DT == KERNEL_DTYPE_F16 ? __half2float(__ushort_as_half(h))
                                                           : __uint_as_float((uint32_t)h << 16);
                }
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < KERNEL_QK; i++) {
        float v = 0.0f;
        if (kb + i < w.n_in) {
            if (DT == KERNEL_DTYPE_F32)
                v = ((const float *)w.data)[base + i];
            else if (DT == KERNEL_DTYPE_F16)
                v = __half2float(((const __half *)w.data)[base + i]);
            else
                v = __bfloat162float(((const __nv_bfloat16 *)w.data)[base + i]);
        }
        wv[i] = v;
    }
}

template <int DT, int NT>
__global__ void __launch_bounds__(MV_WARPS * 32)
    matvec_kernel(struct cuda_wview w, const float *x, uint32_t n_tok, float *y, bool accumulate,
                  bool vec)
{
    __shared__ float xs[NT][MV_LPR * MV_XS];
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t sub = lane % MV_LPR;
    const uint32_t row = blockIdx.x * MV_ROWS + warp * (32 / MV_LPR) + lane / MV_LPR;
    const bool row_ok = row < w.n_out;
    const uint32_t n_in = w.n_in;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        acc[t] = 0.0f;

    for (uint32_t k0 = 0; k0 < n_in; k0 += MV_CHUNK) {
        for (uint32_t e = threadIdx.x; e < NT * MV_CHUNK; e += blockDim.x) {
            uint32_t t = e / MV_CHUNK, kk = e % MV_CHUNK;
            float v = 0.0f;
            if (t < n_tok && k0 + kk < n_in)
                v = x[(size_t)t * n_in + k0 + kk];
            xs[t][(kk / KERNEL_QK) * MV_XS + kk % KERNEL_QK] = v;
        }
        __syncthreads();
        uint32_t kb = k0 + sub * KERNEL_QK;
        if (row_ok && kb < n_in) {
            float wv[KERNEL_QK], d, m;
            mv_load<DT>(w, row, kb, vec, wv, d, m);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                const float *xb = &xs[t][sub * MV_XS];
                float sq = 0.0f, sx = 0.0f;
#pragma unroll
                for (int i = 0; i < KERNEL_QK; i++) {
                    sq += wv[i] * xb[i];
                    if (DT == KERNEL_DTYPE_Q4_0 || DT == KERNEL_DTYPE_Q4_1)
                        sx += xb[i];
                }
                if (DT == KERNEL_DTYPE_Q4_0)
                    acc[t] += d * (sq - 8.0f * sx);
                else if (DT == KERNEL_DTYPE_Q4_1)
                    acc[t] += d * sq + m * sx;
                else if (DT == KERNEL_DTYPE_Q8_0)
                    acc[t] += d * sq;
                else
                    acc[t] += sq;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = acc[t];
        for (int o = MV_LPR / 2; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (sub == 0 && row_ok && (uint32_t)t < n_tok) {
            float *o = &y[(size_t)t * w.n_out + row];
            *o = accumulate ? *o + v : v;
        }
    }
}

template <int DT>
static void launch_matvec_dt(struct cuda_backend *cb, const struct cuda_wview &w, const float *x,
                             uint32_t n_tok, float *y, bool accumulate)
{
    dim3 grid((w.n_out + MV_ROWS - 1) / MV_ROWS);
    bool vec = w.n_in % KERNEL_QK == 0;
    if (n_tok <= 1)
        matvec_kernel<DT, 1>
            <<<grid, MV_WARPS * 32, 0, cb->stream>>>(w, x, n_tok, y, accumulate, vec);
    else if (n_tok <= 2)
        matvec_kernel<DT, 2>
            <<<grid, MV_WARPS * 32, 0, cb->stream>>>(w, x, n_tok, y, accumulate, vec);
    else if (n_tok <= 4)
        matvec_kernel<DT, 4>
            <<<grid, MV_WARPS * 32, 0, cb->stream>>>(w, x, n_tok, y, accumulate, vec);
    else
        matvec_kernel<DT, 8>
            <<<grid, MV_WARPS * 32, 0, cb->stream>>>(w, x, n_tok, y, accumulate, vec);
    CUDA_LAUNCHED(cb, "matvec_kernel");
}

static void launch_matvec(struct cuda_backend *cb, const struct cuda_wview &w, const float *x,
                          uint32_t n_tok, float *y, bool accumulate)
{
    switch (w.dtype) {
    case KERNEL_DTYPE_F32:
        launch_matvec_dt<KERNEL_DTYPE_F32>(cb, w, x, n_tok, y, accumulate);
        break;
    case KERNEL_DTYPE_F16:
        launch_matvec_dt<KERNEL_DTYPE_F16>(cb, w, x, n_tok, y, accumulate);
        break;
    case KERNEL_DTYPE_BF16:
        launch_matvec_dt<KERNEL_DTYPE_BF16>(cb, w, x, n_tok, y, accumulate);
        break;
    case KERNEL_DTYPE_Q8_0:
        launch_matvec_dt<KERNEL_DTYPE_Q8_0>(cb, w, x, n_tok, y, accumulate);
        break;
    case KERNEL_DTYPE_Q4_0:
        launch_matvec_dt<KERNEL_DTYPE_Q4_0>(cb, w, x, n_tok, y, accumulate);
        break;
    case KERNEL_DTYPE_Q4_1:
        launch_matvec_dt<KERNEL_DTYPE_Q4_1>(cb, w, x, n_tok, y, accumulate);
        break;
    default:
        PW_ASSERT(!"matmul: unsupported weight dtype");
    }
}

/* ---- GEMM path ---- */

#define CVT_THREADS 256

/*
 * Row t of x to F16 times 2^-e_t, e_t chosen so the row's largest magnitude lands in
 * [2^14, 2^15): no overflow, small values stay normal, and scaling by a power of two is
 * exact. xscale[t] = 2^e_t. A zero or non-finite row gets scale 1.
 */
__global__ void to_f16_scaled_kernel(const float *x, uint32_t n, __half *xh, float *xscale)
{
    __shared__ float part[CVT_THREADS / 32];
    const float *xr = x + (size_t)blockIdx.x * n;
    __half *hr = xh + (size_t)blockIdx.x * n;
    float amax = 0.0f;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        amax = fmaxf(amax, fabsf(xr[i]));
    amax = cuda_warp_max(amax);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = part[0];
    for (int i = 1; i < CVT_THREADS / 32; i++)
        amax = fmaxf(amax, part[i]);
    int e = 0;
    if (amax > 0.0f && isfinite(amax)) {
        (void)frexpf(amax, &e); /* amax < 2^e */
        e -= 15;
        e = max(-120, min(120, e));
    }
    float inv = ldexpf(1.0f, -e);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x)
        hr[i] = __float2half_rn(xr[i] * inv);
    if (threadIdx.x == 0)
        xscale[blockIdx.x] = ldexpf(1.0f, e);
}

__global__ void to_bf16_kernel(const float *x, size_t n, __nv_bfloat16 *xb)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        xb[i] = __float2bfloat16_rn(x[i]);
}

/* y[t][:] *= xscale[t] (or divides, exactly: the scales are powers of two). */
__global__ void scale_rows_kernel(float *y, uint32_t n_tok, uint32_t n_out, const float *xscale,
                                  bool divide)
{
    size_t n = (size_t)n_tok * n_out;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float s = xscale[i / n_out];
        y[i] = divide ? y[i] / s : y[i] * s;
    }
}

/* Rows [r0, r0 + rows) of a quantized weight to F16, [rows][n_in]. */
__global__ void dequant_f16_kernel(struct cuda_wview w, uint32_t r0, uint32_t rows, __half *out)
{
    size_t n = (size_t)rows * w.n_in;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t r = (uint32_t)(i / w.n_in), k = (uint32_t)(i % w.n_in);
        out[i] = __float2half_rn(cuda_weight_at(w, r0 + r, k));
    }
}

enum xh_kind { XH_NONE, XH_F16, XH_BF16 };

static void gemm_product(struct cuda_backend *cb, const float *x, uint32_t n_tok,
                         const struct kernel_mm *p, enum xh_kind *have)
{
    struct cuda_wview w = cuda_weight_view(p->w);
    uint32_t n_in = w.n_in, n_out = w.n_out;
    const float one = 1.0f, zero = 0.0f;
    if (w.dtype == KERNEL_DTYPE_F32) {
        CUBLAS_CHECK(cb, cublasSgemm(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok,
                                     (int)n_in, &one, (const float *)w.data, (int)n_in, x,
                                     (int)n_in, p->accumulate ? &one : &zero, p->y, (int)n_out));
        return;
    }
    bool bf16 = w.dtype == KERNEL_DTYPE_BF16;
    enum xh_kind want = bf16 ? XH_BF16 : XH_F16;
    if (*have != want) {
        if (bf16)
            to_bf16_kernel<<<cuda_blocks((size_t)n_tok * n_in, 256), 256, 0, cb->stream>>>(
                x, (size_t)n_tok * n_in, (__nv_bfloat16 *)cb->xh);
        else
            to_f16_scaled_kernel<<<n_tok, CVT_THREADS, 0, cb->stream>>>(x, n_in, (__half *)cb->xh,
                                                                        cb->xscale);
        CUDA_LAUNCHED(cb, "to_f16_scaled_kernel/to_bf16_kernel");
        *have = want;
    }
    size_t ny = (size_t)n_tok * n_out;
    if (!bf16 && p->accumulate) {
        scale_rows_kernel<<<cuda_blocks(ny, 256), 256, 0, cb->stream>>>(p->y, n_tok, n_out,
                                                                        cb->xscale, true);
        CUDA_LAUNCHED(cb, "scale_rows_kernel");
    }
    cudaDataType_t ty = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    const float *beta = p->accumulate ? &one : &zero;
    if (w.dtype == KERNEL_DTYPE_F16 || bf16) {
        CUBLAS_CHECK(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok,
                                      (int)n_in, &one, w.data, ty, (int)n_in, cb->xh, ty, (int)n_in,
                                      beta, p->y, CUDA_R_32F, (int)n_out, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    } else {
        uint32_t slab_rows = (uint32_t)(cb->slab_bytes / sizeof(__half) / n_in);
        PW_ASSERT(slab_rows >= 1);
        for (uint32_t r0 = 0; r0 < n_out; r0 += slab_rows) {
            uint32_t rows = n_out - r0 < slab_rows ? n_out - r0 : slab_rows;
            dequant_f16_kernel<<<cuda_blocks((size_t)rows * n_in, 256), 256, 0, cb->stream>>>(
                w, r0, rows, cb->slab);
            CUDA_LAUNCHED(cb, "dequant_f16_kernel");
            CUBLAS_CHECK(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n_tok,
                                          (int)n_in, &one, cb->slab, CUDA_R_16F, (int)n_in, cb->xh,
                                          CUDA_R_16F, (int)n_in, beta, p->y + r0, CUDA_R_32F,
                                          (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
    if (!bf16) {
        scale_rows_kernel<<<cuda_blocks(ny, 256), 256, 0, cb->stream>>>(p->y, n_tok, n_out,
                                                                        cb->xscale, false);
        CUDA_LAUNCHED(cb, "scale_rows_kernel");
    }
}

void cuda_op_matmul(struct kernel_backend *be, const float *x, uint32_t n_tok,
                    const struct kernel_mm *mm, uint32_t n_mm)
{
    struct cuda_backend *cb = cuda_cb(be);
    PW_ASSERT(n_mm >= 1 && n_mm <= CUDA_MM_MAX);
    PW_ASSERT(n_tok >= 1 && n_tok <= cb->max_tok);
    uint32_t n_in = mm[0].w->info.n_in;
    PW_ASSERT(n_in <= cb->max_cols);
    for (uint32_t i = 0; i < n_mm; i++)
        PW_ASSERT(mm[i].w->info.n_in == n_in);
    cuda_enter(cb);
    if (n_tok <= CUDA_MV_MAX_TOK) {
        for (uint32_t i = 0; i < n_mm; i++)
            launch_matvec(cb, cuda_weight_view(mm[i].w), x, n_tok, mm[i].y, mm[i].accumulate);
        return;
    }
    enum xh_kind have = XH_NONE;
    for (uint32_t i = 0; i < n_mm; i++)
        gemm_product(cb, x, n_tok, &mm[i], &have);
}

/*
 * matmul: for each product of a group, y[n_tok][n_out] = x[n_tok][n_in] w^T, or y += it.
 *
 * Two paths, chosen per call by n_tok:
 *   n_tok <= CUDA_MV_MAX_TOK (decode): gemv_kernel (below) reads every weight once from
 *     device memory for up to 8 token rows, dequantizing in registers (Q8_0/Q4_0/Q4_1, or
 *     F16/BF16/F32 loaded as is), with float activations and float accumulation. Bound:
 *     memory, the weight bytes. Float rows that are not whole 8-element chunks take
 *     matvec_kernel, which stages x in shared memory and guards every element.
 *   larger n_tok (prefill, batched decode): cuBLAS on tensor cores. x is converted once
 *     per call to F16 with one power-of-two scale (no overflow; cuBLAS undoes it exactly
 *     as alpha, see to_f16_global_kernel) or to BF16 for BF16 weights. F16/BF16 weights go to
 * cublasGemmEx in place; quantized weights are dequantized to F16 in row slabs (CUDA_SLAB_BYTES)
 * first, each slab one GEMM. F32 weights use cublasSgemm on x directly. Bound: flops, 2 n_tok n_out
 * n_in (plus 2 B written and read per weight element for the quantized slabs).
 *
 * Numerics differ from the CPU backend, which quantizes x to 16-bit integers for quantized
 * weights: here decode uses float x (more exact), and the GEMM path rounds x to F16 (or
 * BF16) and dequantized weights to F16: relative error per product term <= 2^-10 (2^-8 for
 * BF16). The CPU backend's bit-exact batch invariance does not hold across the two paths
 * (nor inside cuBLAS, whose kernel choice depends on n_tok); rows agree within those bounds.
 */
#include <string.h>

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

/*
 * gemv_kernel: the decode path for whole rows of 8-element chunks (every quantized weight;
 * float weights with n_in % 8 == 0). A warp owns GV_R rows; lane c reads chunk c of each
 * (16 B of F16/BF16, 32 B of F32, 8 quants of Q8_0, 4 bytes = 8 nibbles of Q4), the x
 * elements under it come straight from global memory (L1/L2: every row of the CTA reads
 * the same x) and are reused for the warp's rows, and nothing is staged or synchronised,
 * so each warp keeps GV_R weight loads in flight. Float accumulation, one warp reduction
 * per (row, token) at the end.
 */
#define GV_WARPS 4
#define GV_U 2 /* chunks per lane per pass */

/*
 * Rows per warp: more rows reuse each x load more, fewer rows give more warps. 0 (the
 * default) picks per launch: 4 when the launch has rows for 32 warps per SM at 4 rows a
 * warp (vocabulary heads, gate/up pairs), else 2 at 16 warps per SM, else 1 (a 4096-row
 * projection at 4 rows a warp left 8 warps per SM and under half the bandwidth on an
 * H200). kernel_cuda_set_gemv_rows forces 1, 2 or 4 (benchmarks).
 */
static int gv_rows = 0;

extern "C" void kernel_cuda_set_gemv_rows(int rows)
{
    gv_rows = rows == 1 || rows == 2 || rows == 4 ? rows : 0;
}

/* Chunk c (8 elements) of row r: weights (raw quants for quantized types), d and m. For
 * Q4 types the chunk is 4 bytes of a block's 16: elements b..b+3 (low nibbles) and
 * 16+b..16+b+3 (high nibbles); every other type has 8 consecutive elements. */
template <int DT>
__device__ __forceinline__ void gv_load(const struct cuda_wview &w, uint32_t r, uint32_t c,
                                        float wv[8], float &d, float &m)
{
    d = 1.0f;
    m = 0.0f;
    if (DT == KERNEL_DTYPE_F32) {
        const float4 *p = (const float4 *)((const float *)w.data + (size_t)r * w.n_in) + 2 * c;
        float4 a = p[0], b = p[1];
        wv[0] = a.x, wv[1] = a.y, wv[2] = a.z, wv[3] = a.w;
        wv[4] = b.x, wv[5] = b.y, wv[6] = b.z, wv[7] = b.w;
    } else if (DT == KERNEL_DTYPE_F16 || DT == KERNEL_DTYPE_BF16) {
        uint4 u = ((const uint4 *)((const uint16_t *)w.data + (size_t)r * w.n_in))[c];
        uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 8; i++) {
            uint16_t h = (uint16_t)(words[i / 2] >> (16 * (i % 2)));
            wv[i] = DT == KERNEL_DTYPE_F16 ? __half2float(__ushort_as_half(h))
                                           : __uint_as_float((uint32_t)h << 16);
        }
    } else {
        size_t blk = (size_t)r * w.n_blocks + c / 4;
        uint32_t sub = c % 4;
        d = __half2float(w.d[blk]);
        if (DT == KERNEL_DTYPE_Q4_1)
            m = __half2float(w.m[blk]);
        if (DT == KERNEL_DTYPE_Q8_0) {
            uint2 u = *(const uint2 *)(w.qs + blk * 32 + sub * 8);
#pragma unroll
            for (int i = 0; i < 8; i++)
                wv[i] = (float)(int8_t)((i < 4 ? u.x : u.y) >> (8 * (i % 4)));
        } else {
            uint32_t u = *(const uint32_t *)(w.qs + blk * 16 + sub * 4);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                uint32_t q = (u >> (8 * i)) & 0xffu;
                wv[i] = (float)(q & 0x0fu);
                wv[4 + i] = (float)(q >> 4);
            }
        }
    }
}

/* The x elements of chunk c, in gv_load's order: two float4 loads. */
template <int DT> __device__ __forceinline__ void gv_x(const float *xr, uint32_t c, float xv[8])
{
    uint32_t o0, o1;
    if (DT == KERNEL_DTYPE_Q4_0 || DT == KERNEL_DTYPE_Q4_1) {
        o0 = (c / 4) * 32 + (c % 4) * 4;
        o1 = o0 + 16;
    } else {
        o0 = c * 8;
        o1 = o0 + 4;
    }
    float4 a = *(const float4 *)(xr + o0), b = *(const float4 *)(xr + o1);
    xv[0] = a.x, xv[1] = a.y, xv[2] = a.z, xv[3] = a.w;
    xv[4] = b.x, xv[5] = b.y, xv[6] = b.z, xv[7] = b.w;
}

/* Up to GV_MAXP products of one dtype in one launch (q/k/v, gate/up): each owns a range
 * of CTAs, so a launch covers them all and no CTA straddles two weights. */
#define GV_MAXP 4
struct gv_set {
    struct cuda_wview w[GV_MAXP];
    float *y[GV_MAXP];
    uint32_t cta0[GV_MAXP + 1]; /* product p: CTAs [cta0[p], cta0[p + 1]) */
    bool acc[GV_MAXP];
    uint32_t n;
};

template <int DT, int NT, int GV_R>
__global__ void __launch_bounds__(GV_WARPS * 32)
    gemv_kernel(struct gv_set set, const float *x, uint32_t n_tok)
{
    uint32_t p = 0;
    while (p + 1 < set.n && blockIdx.x >= set.cta0[p + 1])
        p++;
    const struct cuda_wview w = set.w[p];
    float *y = set.y[p];
    const bool accumulate = set.acc[p];
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t r0 = ((blockIdx.x - set.cta0[p]) * GV_WARPS + threadIdx.x / 32) * GV_R;
    const uint32_t n_chunks = w.n_in / 8;
    float acc[GV_R][NT];
#pragma unroll
    for (int r = 0; r < GV_R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++)
            acc[r][t] = 0.0f;
    if (r0 >= w.n_out)
        return;
    /* GV_U chunks per lane per pass: their loads are all issued before any math */
    for (uint32_t c0 = lane; c0 < n_chunks; c0 += 32 * GV_U) {
        float wv[GV_U][GV_R][8], d[GV_U][GV_R], m[GV_U][GV_R];
#pragma unroll
        for (int u = 0; u < GV_U; u++) {
            uint32_t c = c0 + 32 * u < n_chunks ? c0 + 32 * u : c0;
#pragma unroll
            for (int r = 0; r < GV_R; r++) {
                uint32_t row = r0 + r < w.n_out ? r0 + r : r0; /* a missing row rereads r0 */
                gv_load<DT>(w, row, c, wv[u][r], d[u][r], m[u][r]);
            }
        }
#pragma unroll
        for (int u = 0; u < GV_U; u++) {
            uint32_t c = c0 + 32 * u;
            if (c >= n_chunks)
                break;
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if ((uint32_t)t >= n_tok)
                    break;
                float xv[8];
                gv_x<DT>(x + (size_t)t * w.n_in, c, xv);
                float sx = 0.0f;
                if (DT == KERNEL_DTYPE_Q4_0 || DT == KERNEL_DTYPE_Q4_1)
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        sx += xv[i];
#pragma unroll
                for (int r = 0; r < GV_R; r++) {
                    float sq = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        sq += wv[u][r][i] * xv[i];
                    if (DT == KERNEL_DTYPE_Q4_0)
                        acc[r][t] += d[u][r] * (sq - 8.0f * sx);
                    else if (DT == KERNEL_DTYPE_Q4_1)
                        acc[r][t] += d[u][r] * sq + m[u][r] * sx;
                    else if (DT == KERNEL_DTYPE_Q8_0)
                        acc[r][t] += d[u][r] * sq;
                    else
                        acc[r][t] += sq;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GV_R; r++) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = cuda_warp_sum(acc[r][t]);
            if (lane == 0 && r0 + r < w.n_out && (uint32_t)t < n_tok) {
                float *o = &y[(size_t)t * w.n_out + r0 + r];
                *o = accumulate ? *o + v : v;
            }
        }
    }
}

template <int DT, int R>
static void launch_gemv_r(struct cuda_backend *cb, struct gv_set &set, const float *x,
                          uint32_t n_tok)
{
    const uint32_t rows_per_cta = GV_WARPS * R;
    set.cta0[0] = 0;
    for (uint32_t p = 0; p < set.n; p++)
        set.cta0[p + 1] = set.cta0[p] + (set.w[p].n_out + rows_per_cta - 1) / rows_per_cta;
    dim3 grid(set.cta0[set.n]);
    if (n_tok <= 1)
        gemv_kernel<DT, 1, R><<<grid, GV_WARPS * 32, 0, cb->stream>>>(set, x, n_tok);
    else if (n_tok <= 2)
        gemv_kernel<DT, 2, R><<<grid, GV_WARPS * 32, 0, cb->stream>>>(set, x, n_tok);
    else if (n_tok <= 4)
        gemv_kernel<DT, 4, R><<<grid, GV_WARPS * 32, 0, cb->stream>>>(set, x, n_tok);
    else
        gemv_kernel<DT, 8, R><<<grid, GV_WARPS * 32, 0, cb->stream>>>(set, x, n_tok);
    CUDA_LAUNCHED(cb, "gemv_kernel");
}

template <int DT>
static void launch_gemv_dt(struct cuda_backend *cb, struct gv_set &set, const float *x,
                           uint32_t n_tok)
{
    int rows = gv_rows;
    if (rows == 0) {
        uint32_t total = 0;
        for (uint32_t p = 0; p < set.n; p++)
            total += set.w[p].n_out;
        uint32_t warps_per_sm_at_4 = total / 4 / (uint32_t)cb->n_sm;
        rows = warps_per_sm_at_4 >= 32 ? 4 : warps_per_sm_at_4 >= 8 ? 2 : 1;
    }
    if (rows == 1)
        launch_gemv_r<DT, 1>(cb, set, x, n_tok);
    else if (rows == 2)
        launch_gemv_r<DT, 2>(cb, set, x, n_tok);
    else
        launch_gemv_r<DT, 4>(cb, set, x, n_tok);
}

static void launch_gemv(struct cuda_backend *cb, struct gv_set &set, const float *x, uint32_t n_tok)
{
    switch (set.w[0].dtype) {
    case KERNEL_DTYPE_F32:
        launch_gemv_dt<KERNEL_DTYPE_F32>(cb, set, x, n_tok);
        break;
    case KERNEL_DTYPE_F16:
        launch_gemv_dt<KERNEL_DTYPE_F16>(cb, set, x, n_tok);
        break;
    case KERNEL_DTYPE_BF16:
        launch_gemv_dt<KERNEL_DTYPE_BF16>(cb, set, x, n_tok);
        break;
    case KERNEL_DTYPE_Q8_0:
        launch_gemv_dt<KERNEL_DTYPE_Q8_0>(cb, set, x, n_tok);
        break;
    case KERNEL_DTYPE_Q4_0:
        launch_gemv_dt<KERNEL_DTYPE_Q4_0>(cb, set, x, n_tok);
        break;
    case KERNEL_DTYPE_Q4_1:
        launch_gemv_dt<KERNEL_DTYPE_Q4_1>(cb, set, x, n_tok);
        break;
    default:
        PW_ASSERT(!"matmul: unsupported weight dtype");
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

/*
 * x to F16 times 2^-e, one e for the whole call, chosen so the largest magnitude lands in
 * [2^14, 2^15): no overflow, and scaling by a power of two is exact. cuBLAS takes 2^e as
 * alpha from device memory, so nothing rescales y afterwards (a per-row scale cost two
 * passes over y per product). Rows within 2^20 of the largest keep F16's full 11 bits
 * (its normal range is 29 binades); a zero or non-finite x gets scale 1.
 * consts: [0] alpha = 2^e, [1] 0.0f, [2] 1.0f, [3] the amax's bits (atomicMax target).
 */
__global__ void amax_kernel(const float *x, size_t n, unsigned *amax_bits)
{
    float a = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        a = fmaxf(a, fabsf(x[i])); /* NaN is skipped by fmaxf, inf kept */
    a = cuda_warp_max(a);
    if (threadIdx.x % 32 == 0 && a > 0.0f)
        atomicMax(amax_bits, __float_as_uint(a)); /* non-negative floats order as uints */
}

__global__ void to_f16_global_kernel(const float *x, size_t n, __half *xh, float *consts)
{
    float amax = __uint_as_float(((const unsigned *)consts)[3]);
    int e = 0;
    if (amax > 0.0f && isfinite(amax)) {
        (void)frexpf(amax, &e); /* amax < 2^e */
        e -= 15;
        e = max(-120, min(120, e));
    }
    float inv = ldexpf(1.0f, -e);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        xh[i] = __float2half_rn(x[i] * inv);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        consts[0] = ldexpf(1.0f, e);
}

__global__ void to_bf16_kernel(const float *x, size_t n, __nv_bfloat16 *xb)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        xb[i] = __float2bfloat16_rn(x[i]);
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
    size_t nx = (size_t)n_tok * n_in;
    if (*have != want) {
        if (bf16) {
            to_bf16_kernel<<<cuda_blocks(nx, 256), 256, 0, cb->stream>>>(x, nx,
                                                                         (__nv_bfloat16 *)cb->xh);
        } else {
            CUDA_CHECK(cb, cudaMemsetAsync(cb->gemm_consts + 3, 0, sizeof(float), cb->stream));
            amax_kernel<<<cuda_blocks(nx, 256) < 1024 ? cuda_blocks(nx, 256) : 1024, 256, 0,
                          cb->stream>>>(x, nx, (unsigned *)(cb->gemm_consts + 3));
            to_f16_global_kernel<<<cuda_blocks(nx, 256), 256, 0, cb->stream>>>(
                x, nx, (__half *)cb->xh, cb->gemm_consts);
        }
        CUDA_LAUNCHED(cb, "to_f16_global_kernel/to_bf16_kernel");
        *have = want;
    }
    cudaDataType_t ty = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    /* F16: alpha (the scale) and beta from device memory; BF16: 1 and 0/1 from the host */
    const float *alpha = bf16 ? &one : cb->gemm_consts;
    const float *beta =
        bf16 ? (p->accumulate ? &one : &zero) : cb->gemm_consts + (p->accumulate ? 2 : 1);
    CUBLAS_CHECK(cb, cublasSetPointerMode(cb->blas, bf16 ? CUBLAS_POINTER_MODE_HOST
                                                         : CUBLAS_POINTER_MODE_DEVICE));
    if (w.dtype == KERNEL_DTYPE_F16 || bf16) {
        CUBLAS_CHECK(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok,
                                      (int)n_in, alpha, w.data, ty, (int)n_in, cb->xh, ty,
                                      (int)n_in, beta, p->y, CUDA_R_32F, (int)n_out,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
        uint32_t slab_rows = (uint32_t)(cb->slab_bytes / sizeof(__half) / n_in);
        PW_ASSERT(slab_rows >= 1);
        for (uint32_t r0 = 0; r0 < n_out; r0 += slab_rows) {
            uint32_t rows = n_out - r0 < slab_rows ? n_out - r0 : slab_rows;
            dequant_f16_kernel<<<cuda_blocks((size_t)rows * n_in, 256), 256, 0, cb->stream>>>(
                w, r0, rows, cb->slab);
            CUDA_LAUNCHED(cb, "dequant_f16_kernel");
            CUBLAS_CHECK(cb, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n_tok,
                                          (int)n_in, alpha, cb->slab, CUDA_R_16F, (int)n_in, cb->xh,
                                          CUDA_R_16F, (int)n_in, beta, p->y + r0, CUDA_R_32F,
                                          (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    }
    CUBLAS_CHECK(cb, cublasSetPointerMode(cb->blas, CUBLAS_POINTER_MODE_HOST));
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
        if (n_in % 8 != 0) { /* float rows that are not whole chunks */
            for (uint32_t i = 0; i < n_mm; i++)
                launch_matvec(cb, cuda_weight_view(mm[i].w), x, n_tok, mm[i].y, mm[i].accumulate);
            return;
        }
        /* consecutive products of one dtype share a launch */
        for (uint32_t i = 0; i < n_mm;) {
            struct gv_set set;
            memset(&set, 0, sizeof(set));
            set.n = 0;
            while (i < n_mm && set.n < GV_MAXP &&
                   (set.n == 0 || mm[i].w->info.dtype == (enum kernel_dtype)set.w[0].dtype)) {
                set.w[set.n] = cuda_weight_view(mm[i].w);
                set.y[set.n] = mm[i].y;
                set.acc[set.n] = mm[i].accumulate;
                set.n++;
                i++;
            }
            launch_gemv(cb, set, x, n_tok);
        }
        return;
    }
    enum xh_kind have = XH_NONE;
    for (uint32_t i = 0; i < n_mm; i++)
        gemm_product(cb, x, n_tok, &mm[i], &have);
}

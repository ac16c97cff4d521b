/*
 * attention: causal grouped-query attention over the paged F16 KV cache, flash-decoding
 * style. out[t] for query head h = softmax(scale * q[t]_h . K_g[0..pos[t]]) V_g[0..pos[t]],
 * g = h / (n_head / n_kv_head), keys of sequence seq[t] found through the block table.
 *
 * One CTA (4 warps) per (token, KV head, group of up to 4 query heads of that KV head,
 * key split). The CTA's warps take the keys of its split round-robin; for each key a warp
 * reads the K row once (half2 per lane), scores all of the group's query heads with a warp
 * reduction, and folds the V row into per-head running (max, sum, output) registers: an
 * online softmax, so each K/V row is read once per (token, KV head) and nothing of size
 * n_keys is stored. The warps' states merge in shared memory at the end. When the grid
 * would be too small to fill the GPU (decode of few sequences), the keys are split over
 * several CTAs that write partial (max, sum, output) rows, and attn_combine merges them.
 * Mixed batches need nothing special: each token has its own position and block-table row.
 *
 * Bound: memory for decode, n_tok * n_kv_head * (pos+1) * head_dim * 4 B of K/V per step
 * (once per 4 query heads).
 *
 * Prefill chunks (a run of at least ATT_GEMM_MIN consecutive rows of one sequence) take
 * the tensor cores instead: the sequence's keys are gathered from the pages into
 * contiguous F16 K and V, Q is rounded to F16, and per query tile one batched cuBLAS GEMM
 * over all heads gives the scores (F32), a kernel applies the causal mask and the softmax
 * (P in F16), and a second batched GEMM writes P V straight into out. Tiles are at most
 * ATT_GEMM_TILE_ROWS rows and keep scores and P under ATT_GEMM_TILE_BYTES. Error: Q and P rounded
 * to F16 (relative 2^-11 per term), the rest F32; the rows of other sequences in the same batch go
 * through the kernel above.
 */
#include <string.h>

#include "kernel_cuda_int.cuh"

#define ATT_WARPS 4
#define ATT_REP 4 /* query heads per CTA */
/* half2 pairs per lane: a template parameter (1, 2 or 4 for head dims up to 64, 128,
 * 256), so a 128-wide head does not pay registers (and occupancy) for 256. */
#define ATT_MIN_CHUNK 16                 /* keys per split, at least */
#define ATT_GEMM_MIN 128                 /* prefill runs of this many rows use cuBLAS */
#define ATT_GEMM_TILE_BYTES (256u << 20) /* scores + P of one query tile, at most */
#define ATT_GEMM_TILE_ROWS 256           /* query rows per tile, at most */

struct att_args {
    const float *q;
    float *out;
    const __half *kc; /* this layer */
    const __half *vc;
    const int32_t *pos;
    const int32_t *seq;
    const int32_t *table;
    uint32_t max_blocks;
    uint32_t n_head;
    uint32_t n_kv_head;
    uint32_t n_rep; /* query heads per KV head */
    uint32_t n_grp; /* CTAs per KV head: ceil(n_rep / ATT_REP) */
    uint32_t head_dim;
    uint32_t block_tokens;
    size_t block_stride;
    float scale;
    uint32_t n_split; /* key splits (at most; per token); 1: write out directly */
    float *part_o;    /* [n_split][n_tok][n_head][head_dim] */
    float *part_ml;   /* [n_split][n_tok][n_head][2] */
    uint32_t n_tok;
    const int32_t *map; /* grid row -> token row; NULL: identity */
};

template <int ATT_NP>
__global__ void __launch_bounds__(ATT_WARPS * 32) attn_kernel(struct att_args a)
{
    __shared__ float sm_o[ATT_WARPS][ATT_REP][ATT_NP * 64];
    __shared__ float sm_m[ATT_WARPS][ATT_REP];
    __shared__ float sm_l[ATT_WARPS][ATT_REP];

    const uint32_t t = a.map ? (uint32_t)a.map[blockIdx.x] : blockIdx.x;
    const uint32_t g = blockIdx.y / a.n_grp;
    const uint32_t h0 = g * a.n_rep + (blockIdx.y % a.n_grp) * ATT_REP; /* first query head */
    const uint32_t h_end = min(g * a.n_rep + a.n_rep, h0 + ATT_REP);
    const uint32_t nh = h_end - h0;
    const uint32_t split = blockIdx.z;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t hd = a.head_dim, npairs = hd / 2;

    /* Each token splits its own keys (so no launch parameter depends on positions and
     * a recorded step stays valid): at most n_split parts of at least ATT_MIN_CHUNK keys;
     * the splits past them see no key and write empty partials. */
    const uint32_t n_keys = (uint32_t)a.pos[t] + 1;
    const uint32_t parts = min(a.n_split, (n_keys + ATT_MIN_CHUNK - 1) / ATT_MIN_CHUNK);
    const uint32_t chunk = (n_keys + parts - 1) / parts;
    const uint32_t k0 = min(n_keys, split * chunk);
    const uint32_t k1 = min(n_keys, k0 + chunk);
    const int32_t *blocks = a.table + (size_t)a.seq[t] * a.max_blocks;
    const size_t head_off = (size_t)g * a.block_tokens * hd;

    float2 qr[ATT_REP][ATT_NP];
    float2 o[ATT_REP][ATT_NP];
    float m[ATT_REP], l[ATT_REP];
#pragma unroll
    for (int r = 0; r < ATT_REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_NP; i++) {
            uint32_t p = lane + 32 * i;
            float2 z = make_float2(0.0f, 0.0f);
            if ((uint32_t)r < nh && p < npairs) {
                const float *qh = a.q + ((size_t)t * a.n_head + h0 + r) * hd;
                z = make_float2(qh[2 * p], qh[2 * p + 1]);
            }
            qr[r][i] = z;
            o[r][i] = make_float2(0.0f, 0.0f);
        }
    }

    /* Software-pipelined: the next key's K and V rows are loaded before this key's math,
     * so each warp keeps two rows in flight instead of waiting on every load. */
    __half2 kn[ATT_NP], vn[ATT_NP];
    auto load_kv = [&](uint32_t j) {
        size_t off = (size_t)blocks[j / a.block_tokens] * a.block_stride + head_off +
                     (size_t)(j % a.block_tokens) * hd;
        const __half2 *kr = (const __half2 *)(a.kc + off);
        const __half2 *vr = (const __half2 *)(a.vc + off);
#pragma unroll
        for (int i = 0; i < ATT_NP; i++) {
            uint32_t p = lane + 32 * i;
            kn[i] = p < npairs ? kr[p] : __float2half2_rn(0.0f);
            vn[i] = p < npairs ? vr[p] : __float2half2_rn(0.0f);
        }
    };
    if (k0 + warp < k1)
        load_kv(k0 + warp);
    for (uint32_t j = k0 + warp; j < k1; j += ATT_WARPS) {
        float2 kf[ATT_NP], vf[ATT_NP];
#pragma unroll
        for (int i = 0; i < ATT_NP; i++) {
            kf[i] = __half22float2(kn[i]);
            vf[i] = __half22float2(vn[i]);
        }
        if (j + ATT_WARPS < k1)
            load_kv(j + ATT_WARPS);
#pragma unroll
        for (int r = 0; r < ATT_REP; r++) {
            if ((uint32_t)r >= nh)
                break;
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_NP; i++)
                s += qr[r][i].x * kf[i].x + qr[r][i].y * kf[i].y;
            s = cuda_warp_sum(s) * a.scale;
            float mn = fmaxf(m[r], s);
            float alpha = expf(m[r] - mn); /* m = -inf on the first key: alpha = 0 */
            float pr = expf(s - mn);
            l[r] = l[r] * alpha + pr;
#pragma unroll
            for (int i = 0; i < ATT_NP; i++) {
                o[r][i].x = o[r][i].x * alpha + pr * vf[i].x;
                o[r][i].y = o[r][i].y * alpha + pr * vf[i].y;
            }
            m[r] = mn;
        }
    }

    /* merge the warps */
#pragma unroll
    for (int r = 0; r < ATT_REP; r++) {
        if (lane == 0) {
            sm_m[warp][r] = m[r];
            sm_l[warp][r] = l[r];
        }
#pragma unroll
        for (int i = 0; i < ATT_NP; i++) {
            uint32_t p = lane + 32 * i;
            if (p < npairs) {
                sm_o[warp][r][2 * p] = o[r][i].x;
                sm_o[warp][r][2 * p + 1] = o[r][i].y;
            }
        }
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < nh * hd; e += blockDim.x) {
        uint32_t r = e / hd, d = e % hd;
        float mx = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++)
            mx = fmaxf(mx, sm_m[w][r]);
        float lsum = 0.0f, acc = 0.0f;
        if (mx != -INFINITY) {
            for (int w = 0; w < ATT_WARPS; w++) {
                float f = expf(sm_m[w][r] - mx); /* a warp that saw no key: exp(-inf) = 0 */
                lsum += sm_l[w][r] * f;
                acc += sm_o[w][r][d] * f;
            }
        }
        uint32_t h = h0 + r;
        if (a.n_split == 1) {
            a.out[((size_t)t * a.n_head + h) * hd + d] = lsum > 0.0f ? acc / lsum : 0.0f;
        } else {
            size_t row = ((size_t)split * a.n_tok + t) * a.n_head + h;
            a.part_o[row * hd + d] = acc;
            if (d == 0) {
                a.part_ml[2 * row] = mx;
                a.part_ml[2 * row + 1] = lsum;
            }
        }
    }
}

/* Merges the key splits of one (token, head) row: one block per row, threads over dims. */
__global__ void attn_combine_kernel(struct att_args a)
{
    uint32_t t = a.map ? (uint32_t)a.map[blockIdx.x] : blockIdx.x, h = blockIdx.y;
    uint32_t hd = a.head_dim;
    for (uint32_t d = threadIdx.x; d < hd; d += blockDim.x) {
        float mx = -INFINITY;
        for (uint32_t s = 0; s < a.n_split; s++)
            mx = fmaxf(mx, a.part_ml[2 * (((size_t)s * a.n_tok + t) * a.n_head + h)]);
        float lsum = 0.0f, acc = 0.0f;
        if (mx != -INFINITY) {
            for (uint32_t s = 0; s < a.n_split; s++) {
                size_t row = ((size_t)s * a.n_tok + t) * a.n_head + h;
                float f = expf(a.part_ml[2 * row] - mx);
                lsum += a.part_ml[2 * row + 1] * f;
                acc += a.part_o[row * hd + d] * f;
            }
        }
        a.out[((size_t)t * a.n_head + h) * hd + d] = lsum > 0.0f ? acc / lsum : 0.0f;
    }
}

/* ---- prefill through cuBLAS ---- */

/* kc/vc[g][j][:] = key/value j of KV head g of the sequence whose block-table row is
 * `blocks`, for j < n_keys: the pages made contiguous. */
__global__ void attn_gather_kernel(const __half *kc, const __half *vc, const int32_t *blocks,
                                   uint32_t n_keys, uint32_t head_dim, uint32_t block_tokens,
                                   size_t block_stride, __half *ko, __half *vo)
{
    uint32_t j = blockIdx.x, g = blockIdx.y;
    size_t src = (size_t)blocks[j / block_tokens] * block_stride +
                 ((size_t)g * block_tokens + j % block_tokens) * head_dim;
    size_t dst = ((size_t)g * n_keys + j) * head_dim;
    for (uint32_t d = threadIdx.x; d < head_dim / 2; d += blockDim.x) {
        ((__half2 *)(ko + dst))[d] = ((const __half2 *)(kc + src))[d];
        ((__half2 *)(vo + dst))[d] = ((const __half2 *)(vc + src))[d];
    }
}

/* qh[h][i][:] = F16 of q row (row0 + i), head h, for i < rows. */
__global__ void attn_q_f16_kernel(const float *q, uint32_t row0, uint32_t rows, uint32_t n_head,
                                  uint32_t head_dim, __half *qh)
{
    size_t n = (size_t)n_head * rows * head_dim;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        uint32_t d = (uint32_t)(e % head_dim);
        size_t r = e / head_dim;
        uint32_t i = (uint32_t)(r % rows), h = (uint32_t)(r / rows);
        qh[e] = __float2half_rn(q[((size_t)(row0 + i) * n_head + h) * head_dim + d]);
    }
}

/* Row (r, i) of the scores [n_rep][rows][n_keys]: causal mask (keys <= first_pos + i), then
 * softmax, into P (F16, zeros past the mask). One block per row. */
__global__ void attn_softmax_causal_kernel(const float *sc, __half *p, uint32_t rows,
                                           uint32_t n_keys, uint32_t first_pos)
{
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const uint32_t limit = min(n_keys, first_pos + (uint32_t)(row % rows) + 1);
    const float *sr = sc + row * n_keys;
    __half *pr = p + row * n_keys;
    float mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x)
        mx = fmaxf(mx, sr[j]);
    mx = cuda_warp_max(mx);
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (uint32_t w = 0; w < blockDim.x / 32; w++)
        mx = fmaxf(mx, red[w]);
    __syncthreads();
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x)
        sum += expf(sr[j] - mx);
    sum = cuda_warp_sum(sum);
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
    for (uint32_t w = 0; w < blockDim.x / 32; w++)
        sum += red[w];
    float inv = 1.0f / sum;
    for (uint32_t j = threadIdx.x; j < n_keys; j += blockDim.x)
        pr[j] = __float2half_rn(j < limit ? expf(sr[j] - mx) * inv : 0.0f);
}

/* The same for rows of at most ATT_SM_KEYS keys: the row is read once into shared
 * memory instead of three times from global memory. */
#define ATT_SM_KEYS 8192
__global__ void attn_softmax_causal_sm_kernel(const float *sc, __half *p, uint32_t rows,
                                              uint32_t n_keys, uint32_t first_pos)
{
    extern __shared__ float srow[];
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    const uint32_t limit = min(n_keys, first_pos + (uint32_t)(row % rows) + 1);
    const float *sr = sc + row * n_keys;
    __half *pr = p + row * n_keys;
    float mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x) {
        float v = sr[j];
        srow[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = cuda_warp_max(mx);
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = -INFINITY;
    for (uint32_t w = 0; w < blockDim.x / 32; w++)
        mx = fmaxf(mx, red[w]);
    __syncthreads();
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < limit; j += blockDim.x) {
        float e = expf(srow[j] - mx);
        srow[j] = e;
        sum += e;
    }
    sum = cuda_warp_sum(sum);
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.0f;
    for (uint32_t w = 0; w < blockDim.x / 32; w++)
        sum += red[w];
    float inv = 1.0f / sum;
    for (uint32_t j = threadIdx.x; j < n_keys; j += blockDim.x)
        pr[j] = __float2half_rn(j < limit ? srow[j] * inv : 0.0f);
}

static void *att_ws_get(struct cuda_backend *cb, size_t bytes)
{
    if (bytes <= cb->att_ws_bytes)
        return cb->att_ws;
    void *p = NULL;
    /* grown once per larger prompt; the old one may still be read by queued work */
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    if (cb->att_ws)
        CUDA_CHECK(cb, cudaFree(cb->att_ws));
    cb->att_ws = NULL;
    cb->att_ws_bytes = 0;
    if (CUDA_CHECK(cb, cudaMalloc(&p, bytes)))
        return NULL;
    cb->att_ws = p;
    cb->att_ws_bytes = bytes;
    return p;
}

/* The per-head matrices of one query tile for cublasGemmBatchedEx: scores = K_g Q_h^T
 * (A1, B1, C1) and out_h = P_h V_g (A2, B2, C2), g = h / n_rep. */
__global__ void attn_ptrs_kernel(const void **ptrs, const __half *kcont, const __half *vcont,
                                 const __half *qh, float *sc, const __half *pm, float *out0,
                                 uint32_t n_head, uint32_t n_rep, uint32_t n_keys, uint32_t rows,
                                 uint32_t nk, uint32_t hd)
{
    uint32_t h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= n_head)
        return;
    size_t g = h / n_rep;
    ptrs[0 * n_head + h] = kcont + g * n_keys * hd;
    ptrs[1 * n_head + h] = qh + (size_t)h * rows * hd;
    ptrs[2 * n_head + h] = sc + (size_t)h * rows * nk;
    ptrs[3 * n_head + h] = vcont + g * n_keys * hd;
    ptrs[4 * n_head + h] = pm + (size_t)h * rows * nk;
    ptrs[5 * n_head + h] = out0 + (size_t)h * hd;
}

/*
 * Rows [r0, r0 + L) of the batch: one sequence at consecutive positions from p0. Query
 * tiles of ATT_GEMM_TILE_ROWS: a tile sees only the keys up to its last row, so the
 * causal half of the scores is mostly not computed; each tile is three batched launches
 * over all heads (scores, softmax, P V).
 */
static void attn_gemm_run(struct cuda_backend *cb, const struct cuda_kv *kv, size_t lo,
                          const struct kernel_batch *b, uint32_t r0, uint32_t L, const float *q,
                          float *out, uint32_t n_head, float scale)
{
    const struct kernel_kv_desc *d = &kv->desc;
    const uint32_t hd = d->head_dim, n_kv = d->n_kv_head, n_rep = n_head / n_kv;
    const uint32_t p0 = (uint32_t)b->pos[r0], n_keys = p0 + L;
    size_t per_row = (size_t)n_head * n_keys * (sizeof(float) + sizeof(__half));
    uint32_t lt = (uint32_t)(ATT_GEMM_TILE_BYTES / per_row);
    lt = lt > ATT_GEMM_TILE_ROWS ? ATT_GEMM_TILE_ROWS : lt;
    lt = lt < 16 ? 16 : lt > L ? L : lt;
    size_t kv_bytes = (size_t)n_kv * n_keys * hd * sizeof(__half);
    size_t q_bytes = (size_t)n_head * lt * hd * sizeof(__half);
    size_t s_bytes = (size_t)n_head * lt * n_keys * sizeof(float);
    size_t p_bytes = (size_t)n_head * lt * n_keys * sizeof(__half);
    size_t ptr_bytes = 6 * (size_t)n_head * sizeof(void *);
    auto al = [](size_t x) { return (x + 255) & ~(size_t)255; };
    uint8_t *ws = (uint8_t *)att_ws_get(cb, 2 * al(kv_bytes) + al(q_bytes) + al(s_bytes) +
                                                al(p_bytes) + al(ptr_bytes));
    if (!ws)
        return;
    __half *kcont = (__half *)ws, *vcont = (__half *)(ws + al(kv_bytes));
    __half *qh = (__half *)(ws + 2 * al(kv_bytes));
    float *sc = (float *)(ws + 2 * al(kv_bytes) + al(q_bytes));
    __half *pm = (__half *)(ws + 2 * al(kv_bytes) + al(q_bytes) + al(s_bytes));
    const void **ptrs =
        (const void **)(ws + 2 * al(kv_bytes) + al(q_bytes) + al(s_bytes) + al(p_bytes));

    const int32_t *blocks = cb->batch.d_table + (size_t)b->seq[r0] * b->max_blocks;
    attn_gather_kernel<<<dim3(n_keys, n_kv), 64, 0, cb->stream>>>(kv->k + lo, kv->v + lo, blocks,
                                                                  n_keys, hd, d->block_tokens,
                                                                  kv->block_stride, kcont, vcont);
    CUDA_LAUNCHED(cb, "attn_gather_kernel");
    const float one = 1.0f, zero = 0.0f;
    for (uint32_t i0 = 0; i0 < L; i0 += lt) {
        uint32_t rows = L - i0 < lt ? L - i0 : lt;
        uint32_t nk = p0 + i0 + rows; /* keys this tile can see */
        attn_q_f16_kernel<<<cuda_blocks((size_t)n_head * rows * hd, 256), 256, 0, cb->stream>>>(
            q, r0 + i0, rows, n_head, hd, qh);
        attn_ptrs_kernel<<<(n_head + 63) / 64, 64, 0, cb->stream>>>(
            ptrs, kcont, vcont, qh, sc, pm, out + (size_t)(r0 + i0) * n_head * hd, n_head, n_rep,
            n_keys, rows, nk, hd);
        CUDA_LAUNCHED(cb, "attn_q_f16_kernel/attn_ptrs_kernel");
        /* scores[h][i][j] = scale * q_h[i] . k_g[j] */
        CUBLAS_CHECK(
            cb, cublasGemmBatchedEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nk, (int)rows, (int)hd,
                                    &scale, ptrs, CUDA_R_16F, (int)hd, ptrs + n_head, CUDA_R_16F,
                                    (int)hd, &zero, (void *const *)(ptrs + 2 * n_head), CUDA_R_32F,
                                    (int)nk, (int)n_head, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (nk <= ATT_SM_KEYS) {
            size_t smem = (size_t)nk * sizeof(float);
            if (smem > 48 * 1024 && !cb->att_sm_attr) {
                CUDA_CHECK(cb, cudaFuncSetAttribute(attn_softmax_causal_sm_kernel,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    ATT_SM_KEYS * (int)sizeof(float)));
                cb->att_sm_attr = true;
            }
            attn_softmax_causal_sm_kernel<<<n_head * rows, 256, smem, cb->stream>>>(sc, pm, rows,
                                                                                    nk, p0 + i0);
        } else {
            attn_softmax_causal_kernel<<<n_head * rows, 256, 0, cb->stream>>>(sc, pm, rows, nk,
                                                                              p0 + i0);
        }
        CUDA_LAUNCHED(cb, "attn_softmax_causal_kernel");
        /* out[r0 + i0 + i][h hd + :] = P_h[i][:] V_g */
        CUBLAS_CHECK(cb, cublasGemmBatchedEx(cb->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)hd, (int)rows,
                                             (int)nk, &one, ptrs + 3 * n_head, CUDA_R_16F, (int)hd,
                                             ptrs + 4 * n_head, CUDA_R_16F, (int)nk, &zero,
                                             (void *const *)(ptrs + 5 * n_head), CUDA_R_32F,
                                             (int)(n_head * hd), (int)n_head, CUBLAS_COMPUTE_32F,
                                             CUBLAS_GEMM_DEFAULT));
    }
}

/* The prefill runs of a batch: [start, len) pairs, ATT_GEMM_MIN rows or longer. */
static uint32_t find_runs(const struct kernel_batch *b, uint32_t *starts, uint32_t *lens,
                          uint32_t cap)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < b->n_tok;) {
        uint32_t j = i + 1;
        while (j < b->n_tok && b->seq[j] == b->seq[i] && b->pos[j] == b->pos[j - 1] + 1)
            j++;
        if (j - i >= ATT_GEMM_MIN && n < cap) {
            starts[n] = i;
            lens[n++] = j - i;
        }
        i = j;
    }
    return n;
}

void cuda_op_attention(struct kernel_backend *be, const struct kernel_kv *kkv, uint32_t layer,
                       const struct kernel_batch *b, const float *q, float *out, uint32_t n_head,
                       float scale)
{
    struct cuda_backend *cb = cuda_cb(be);
    const struct cuda_kv *kv = (const struct cuda_kv *)kkv;
    const struct kernel_kv_desc *d = &kv->desc;
    PW_ASSERT(layer < d->n_layer);
    PW_ASSERT(n_head % d->n_kv_head == 0);
    PW_ASSERT(d->head_dim <= CUDA_ATTN_MAX_HEAD_DIM &&
              (size_t)n_head * d->head_dim <= cb->max_cols);
    cuda_enter(cb);
    cuda_batch_sync(cb, b, CUDA_BATCH_POS | CUDA_BATCH_TABLE, d->block_tokens, d->n_blocks);
    if (!cb->batch.d_table)
        return; /* the mirror failed to grow: recorded in cb->err */

    struct att_args a;
    memset(&a, 0, sizeof(a));
    size_t lo = (size_t)layer * kv->layer_stride;
    a.q = q;
    a.out = out;
    a.kc = kv->k + lo;
    a.vc = kv->v + lo;
    a.pos = cb->batch.d_pos;
    a.seq = cb->batch.d_seq;
    a.table = cb->batch.d_table;
    a.max_blocks = b->max_blocks;
    a.n_head = n_head;
    a.n_kv_head = d->n_kv_head;
    a.n_rep = n_head / d->n_kv_head;
    a.n_grp = (a.n_rep + ATT_REP - 1) / ATT_REP;
    a.head_dim = d->head_dim;
    a.block_tokens = d->block_tokens;
    a.block_stride = kv->block_stride;
    a.scale = scale;
    a.n_tok = b->n_tok;
    a.part_o = cb->attn_o;
    a.part_ml = cb->attn_ml;

    /* Split the keys when the grid alone would leave SMs idle (decode of few sequences);
     * the partials must fit the reserved CUDA_ATTN_SPLIT_ROWS (split, token) rows. Only
     * the shape decides (a recorded step replays it for other positions). */
    uint32_t ctas = b->n_tok * d->n_kv_head * a.n_grp;
    uint32_t want = (uint32_t)(64 * cb->n_sm) / (ctas ? ctas : 1);
    uint32_t by_room = CUDA_ATTN_SPLIT_ROWS / b->n_tok;
    /* and no more splits than the table's capacity (a shape) could give work to, nor 64 */
    uint32_t by_cap = b->max_blocks * d->block_tokens / ATT_MIN_CHUNK;
    uint32_t n_split = want < by_room ? want : by_room;
    n_split = n_split < by_cap ? n_split : by_cap;
    n_split = n_split < 64 ? n_split : 64;
    if (n_split < 1)
        n_split = 1;
    a.n_split = n_split;

    uint32_t grid_rows = b->n_tok;
    if (!cb->recording && b->n_tok >= ATT_GEMM_MIN) {
        enum { MAX_RUNS = 64 };
        uint32_t starts[MAX_RUNS], lens[MAX_RUNS];
        uint32_t n_runs = find_runs(b, starts, lens, MAX_RUNS);
        uint32_t covered = 0;
        for (uint32_t r = 0; r < n_runs; r++) {
            attn_gemm_run(cb, kv, lo, b, starts[r], lens[r], q, out, n_head, scale);
            covered += lens[r];
        }
        if (covered == b->n_tok)
            return;
        if (n_runs) {
            /* the other rows go through the kernel by a row map */
            uint32_t m = 0, r = 0;
            for (uint32_t i = 0; i < b->n_tok; i++) {
                if (r < n_runs && i == starts[r]) {
                    i += lens[r++] - 1;
                    continue;
                }
                cb->h_map[m++] = (int32_t)i;
            }
            if (CUDA_CHECK(cb, cudaMemcpyAsync(cb->d_map, cb->h_map, m * sizeof(int32_t),
                                               cudaMemcpyHostToDevice, cb->stream)))
                return;
            a.map = cb->d_map;
            grid_rows = m;
        }
    }
    dim3 grid(grid_rows, d->n_kv_head * a.n_grp, n_split);
    if (d->head_dim <= 64)
        attn_kernel<1><<<grid, ATT_WARPS * 32, 0, cb->stream>>>(a);
    else if (d->head_dim <= 128)
        attn_kernel<2><<<grid, ATT_WARPS * 32, 0, cb->stream>>>(a);
    else
        attn_kernel<4><<<grid, ATT_WARPS * 32, 0, cb->stream>>>(a);
    CUDA_LAUNCHED(cb, "attn_kernel");
    if (n_split > 1) {
        attn_combine_kernel<<<dim3(grid_rows, n_head), 128, 0, cb->stream>>>(a);
        CUDA_LAUNCHED(cb, "attn_combine_kernel");
    }
}

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
 * (once per 4 query heads); prefill rereads each sequence's K/V once per token, so long
 * prompts are bound by L2 bandwidth and FP32 issue (4 * n_head * head_dim * n_keys FLOPs
 * per token), not by tensor cores (see docs/internals/cuda.md, "Not done").
 */
#include <string.h>

#include "kernel_cuda_int.cuh"

#define ATT_WARPS 4
#define ATT_REP 4                            /* query heads per CTA */
#define ATT_NP (CUDA_ATTN_MAX_HEAD_DIM / 64) /* half2 pairs per lane, at most */
#define ATT_MIN_CHUNK 64                     /* keys per split, at least */

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
    uint32_t n_split; /* key splits; 1: write out directly */
    uint32_t chunk;   /* keys per split */
    float *part_o;    /* [n_split][n_tok][n_head][head_dim] */
    float *part_ml;   /* [n_split][n_tok][n_head][2] */
    uint32_t n_tok;
};

__global__ void __launch_bounds__(ATT_WARPS * 32) attn_kernel(struct att_args a)
{
    __shared__ float sm_o[ATT_WARPS][ATT_REP][CUDA_ATTN_MAX_HEAD_DIM];
    __shared__ float sm_m[ATT_WARPS][ATT_REP];
    __shared__ float sm_l[ATT_WARPS][ATT_REP];

    const uint32_t t = blockIdx.x;
    const uint32_t g = blockIdx.y / a.n_grp;
    const uint32_t h0 = g * a.n_rep + (blockIdx.y % a.n_grp) * ATT_REP; /* first query head */
    const uint32_t h_end = min(g * a.n_rep + a.n_rep, h0 + ATT_REP);
    const uint32_t nh = h_end - h0;
    const uint32_t split = blockIdx.z;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t hd = a.head_dim, npairs = hd / 2;

    const uint32_t n_keys = (uint32_t)a.pos[t] + 1;
    const uint32_t k0 = split * a.chunk;
    const uint32_t k1 = min(n_keys, k0 + a.chunk);
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

    for (uint32_t j = k0 + warp; j < k1; j += ATT_WARPS) {
        size_t off = (size_t)blocks[j / a.block_tokens] * a.block_stride + head_off +
                     (size_t)(j % a.block_tokens) * hd;
        const __half2 *kr = (const __half2 *)(a.kc + off);
        const __half2 *vr = (const __half2 *)(a.vc + off);
        float2 kf[ATT_NP], vf[ATT_NP];
#pragma unroll
        for (int i = 0; i < ATT_NP; i++) {
            uint32_t p = lane + 32 * i;
            kf[i] = p < npairs ? __half22float2(kr[p]) : make_float2(0.0f, 0.0f);
            vf[i] = p < npairs ? __half22float2(vr[p]) : make_float2(0.0f, 0.0f);
        }
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
    uint32_t t = blockIdx.x, h = blockIdx.y, hd = a.head_dim;
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
     * the partials must fit the reserved CUDA_ATTN_SPLIT_ROWS (split, token) rows. */
    uint32_t max_keys = (uint32_t)cb->batch.max_pos + 1;
    uint32_t ctas = b->n_tok * d->n_kv_head * a.n_grp;
    uint32_t want = (uint32_t)(2 * cb->n_sm) / (ctas ? ctas : 1);
    uint32_t by_keys = (max_keys + ATT_MIN_CHUNK - 1) / ATT_MIN_CHUNK;
    uint32_t by_room = CUDA_ATTN_SPLIT_ROWS / b->n_tok;
    uint32_t n_split = want < by_keys ? want : by_keys;
    n_split = n_split < by_room ? n_split : by_room;
    if (n_split < 1)
        n_split = 1;
    a.n_split = n_split;
    a.chunk = (max_keys + n_split - 1) / n_split;

    dim3 grid(b->n_tok, d->n_kv_head * a.n_grp, n_split);
    attn_kernel<<<grid, ATT_WARPS * 32, 0, cb->stream>>>(a);
    CUDA_LAUNCHED(cb, "attn_kernel");
    if (n_split > 1) {
        attn_combine_kernel<<<dim3(b->n_tok, n_head), 128, 0, cb->stream>>>(a);
        CUDA_LAUNCHED(cb, "attn_combine_kernel");
    }
}

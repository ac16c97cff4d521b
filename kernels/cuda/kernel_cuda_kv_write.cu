/*
 * kv_write: stores this step's K and V rows ([n_tok][n_kv_head * head_dim] floats) into
 * one layer of the paged F16 cache at (seq[t], pos[t]) through the block table, rounding
 * to nearest even as the CPU backend does. Block layout as in kernel.h:
 * [n_blocks][n_kv_head][block_tokens][head_dim] per layer. One thread per (token, pair).
 * Bound: memory, n_tok * kv_dim * (8 B read + 4 B written).
 */
#include "kernel_cuda_int.cuh"

__global__ void kv_write_kernel(__half *kc, __half *vc, const float *k, const float *v,
                                const int32_t *pos, const int32_t *seq, const int32_t *table,
                                uint32_t max_blocks, uint32_t n_kv_head, uint32_t head_dim,
                                uint32_t block_tokens, size_t block_stride)
{
    uint32_t t = blockIdx.y;
    uint32_t pairs = n_kv_head * head_dim / 2;
    uint32_t p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs)
        return;
    uint32_t g = (2 * p) / head_dim, d = (2 * p) % head_dim;
    uint32_t ps = (uint32_t)pos[t];
    int32_t blk = table[(size_t)seq[t] * max_blocks + ps / block_tokens];
    size_t off =
        (size_t)blk * block_stride + ((size_t)g * block_tokens + ps % block_tokens) * head_dim + d;
    size_t src = (size_t)t * n_kv_head * head_dim + 2 * p;
    *(__half2 *)(kc + off) = __floats2half2_rn(k[src], k[src + 1]);
    *(__half2 *)(vc + off) = __floats2half2_rn(v[src], v[src + 1]);
}

void cuda_op_kv_write(struct kernel_backend *be, struct kernel_kv *kkv, uint32_t layer,
                      const struct kernel_batch *b, const float *k, const float *v)
{
    struct cuda_backend *cb = cuda_cb(be);
    struct cuda_kv *kv = (struct cuda_kv *)kkv;
    const struct kernel_kv_desc *d = &kv->desc;
    PW_ASSERT(layer < d->n_layer);
    cuda_enter(cb);
    cuda_batch_sync(cb, b, CUDA_BATCH_POS | CUDA_BATCH_TABLE, d->block_tokens, d->n_blocks);
    if (!cb->batch.d_table)
        return; /* the mirror failed to grow: recorded in cb->err */
    uint32_t pairs = d->n_kv_head * d->head_dim / 2;
    size_t lo = (size_t)layer * kv->layer_stride;
    kv_write_kernel<<<dim3((pairs + 127) / 128, b->n_tok), 128, 0, cb->stream>>>(
        kv->k + lo, kv->v + lo, k, v, cb->batch.d_pos, cb->batch.d_seq, cb->batch.d_table,
        b->max_blocks, d->n_kv_head, d->head_dim, d->block_tokens, kv->block_stride);
    CUDA_LAUNCHED(cb, "kv_write_kernel");
}

/*
 * embed: out[i][k] = row tokens[i] of the table, dequantized (any dtype the backend
 * registers), bit-exact with kernel_dequantize_row.
 * Bound: memory, n_tok * n_embd * (4 B written + the table's bytes per element read).
 */
#include "kernel_cuda_int.cuh"

__global__ void embed_kernel(struct cuda_wview w, const int32_t *tokens, float *out)
{
    uint32_t t = blockIdx.y;
    uint32_t r = (uint32_t)tokens[t];
    for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < w.n_in;
         k += gridDim.x * blockDim.x)
        out[(size_t)t * w.n_in + k] = cuda_weight_at(w, r, k);
}

void cuda_op_embed(struct kernel_backend *be, const struct kernel_weight *table,
                   const struct kernel_batch *b, float *out)
{
    struct cuda_backend *cb = cuda_cb(be);
    cuda_enter(cb);
    for (uint32_t i = 0; i < b->n_tok; i++)
        PW_ASSERT(b->tokens[i] >= 0 && (uint32_t)b->tokens[i] < table->info.n_out);
    cuda_batch_sync(cb, b, CUDA_BATCH_TOKENS, 0, 0);
    struct cuda_wview w = cuda_weight_view(table);
    unsigned bx = (w.n_in + 255) / 256;
    embed_kernel<<<dim3(bx > 64 ? 64 : bx, b->n_tok), 256, 0, cb->stream>>>(w, cb->batch.d_tokens,
                                                                            out);
    CUDA_LAUNCHED(cb, "embed_kernel");
}

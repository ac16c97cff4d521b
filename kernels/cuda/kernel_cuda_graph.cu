/*
 * Step recording: ops->step_begin / ops->step_end (kernels/kernel.h) on CUDA graphs.
 *
 * A decode step of a 30-layer model is about 400 launches; issued one by one from the
 * host they cost more than the GPU work of a small model. step_begin uploads the step's
 * inputs (tokens, positions, sequences, block table, logit rows) into the batch mirror's
 * fixed device buffers; the first step of a shape is recorded with stream capture while
 * the engine issues its ops, and every later step of that shape is one cudaGraphLaunch.
 * What makes a recording valid for another step of the same shape:
 *   - every kernel reads the batch from the mirror's device buffers, never from launch
 *     arguments, and no op's launch configuration depends on batch values (attention
 *     splits its keys per token on the device);
 *   - the buffers a recording points at never move while it exists: growing the block
 *     table, the dequantization slab or the scratch (reserve) drops every recording;
 *   - cuBLAS works in a fixed workspace (cublasSetWorkspace), so its GEMMs record.
 * An op that would have to upload while recording (the engine gave it another batch than
 * step_begin's, which kernel.h forbids) spoils the recording: step_end discards it,
 * returns an error, turns recording off for this backend and the engine issues the step
 * again eagerly. PW_CUDA_GRAPHS=0 turns recording off from the start.
 */
#include <stdlib.h>
#include <string.h>

#include "kernel_cuda_int.cuh"

void cuda_graphs_reset(struct cuda_backend *cb)
{
    for (uint32_t i = 0; i < cb->n_graphs; i++)
        CUDA_CHECK(cb, cudaGraphExecDestroy(cb->graphs[i].exec));
    cb->n_graphs = 0;
}

bool cuda_rows_put(struct cuda_backend *cb, const int32_t *rows, uint32_t n)
{
    PW_ASSERT(n <= cb->max_tok);
    if (cb->rows_n == n && memcmp(cb->h_rows, rows, n * sizeof(int32_t)) == 0)
        return true;
    if (cb->recording) {
        cb->batch.spoiled = true;
        return false;
    }
    memcpy(cb->h_rows, rows, n * sizeof(int32_t));
    cb->rows_n = 0;
    if (CUDA_CHECK(cb, cudaMemcpyAsync(cb->d_rows, cb->h_rows, n * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, cb->stream)))
        return false;
    cb->rows_n = n;
    return true;
}

static bool graphs_enabled(struct cuda_backend *cb)
{
    static int env = -1; /* read once per process */
    if (env < 0) {
        const char *v = getenv("PW_CUDA_GRAPHS");
        env = !(v && strcmp(v, "0") == 0);
        if (!env)
            PW_LOG_INFO("event=kernel_cuda_graphs state=off reason=PW_CUDA_GRAPHS");
    }
    return env && !cb->graphs_off;
}

static enum kernel_step step_begin(struct cuda_backend *cb, const struct cuda_kv *kv,
                                   const struct kernel_batch *b, const int32_t *logit_rows,
                                   uint32_t n_logits);

enum kernel_step cuda_step_begin(struct kernel_backend *be, const struct kernel_kv *kkv,
                                 const struct kernel_batch *b, const int32_t *logit_rows,
                                 uint32_t n_logits)
{
    struct cuda_backend *cb = cuda_cb(be);
    const struct cuda_kv *kv = (const struct cuda_kv *)kkv;
    PW_ASSERT(!cb->recording);
    enum kernel_step st = step_begin(cb, kv, b, logit_rows, n_logits);
    if (st == KERNEL_STEP_REPLAYED)
        cb->steps_replayed++;
    else if (st == KERNEL_STEP_RECORD)
        cb->steps_recorded++;
    else
        cb->steps_eager++;
    return st;
}

static enum kernel_step step_begin(struct cuda_backend *cb, const struct cuda_kv *kv,
                                   const struct kernel_batch *b, const int32_t *logit_rows,
                                   uint32_t n_logits)
{
    if (!graphs_enabled(cb) || b->n_tok > CUDA_GRAPH_MAX_TOK)
        return KERNEL_STEP_EAGER;
    cuda_enter(cb);
    cuda_batch_sync(cb, b, CUDA_BATCH_TOKENS | CUDA_BATCH_POS | CUDA_BATCH_TABLE,
                    kv->desc.block_tokens, kv->desc.n_blocks);
    if (!cb->batch.d_table || (n_logits && !cuda_rows_put(cb, logit_rows, n_logits)) || cb->err)
        return KERNEL_STEP_EAGER; /* the ops will meet (and record) the same error */
    for (uint32_t i = 0; i < cb->n_graphs; i++) {
        const struct cuda_graph *g = &cb->graphs[i];
        if (g->n_tok == b->n_tok && g->n_seq == b->n_seq && g->max_blocks == b->max_blocks &&
            g->n_logits == n_logits) {
            if (CUDA_CHECK(cb, cudaGraphLaunch(g->exec, cb->stream)))
                return KERNEL_STEP_EAGER;
            return KERNEL_STEP_REPLAYED;
        }
    }
    if (cb->n_graphs == CUDA_GRAPH_MAX)
        return KERNEL_STEP_EAGER;
    if (CUDA_CHECK(cb, cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal)))
        return KERNEL_STEP_EAGER;
    cb->recording = true;
    cb->batch.spoiled = false;
    cb->rec.n_tok = b->n_tok;
    cb->rec.n_seq = b->n_seq;
    cb->rec.max_blocks = b->max_blocks;
    cb->rec.n_logits = n_logits;
    return KERNEL_STEP_RECORD;
}

enum pw_err cuda_step_end(struct kernel_backend *be)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!cb->recording)
        return PW_OK;
    cuda_enter(cb);
    cb->recording = false;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    enum pw_err err = CUDA_CHECK(cb, cudaStreamEndCapture(cb->stream, &graph));
    if (!err && (cb->batch.spoiled || cb->err))
        err = PW_ERR_INTERNAL;
    if (!err)
        err = CUDA_CHECK(cb, cudaGraphInstantiate(&exec, graph, 0));
    if (graph)
        CUDA_CHECK(cb, cudaGraphDestroy(graph));
    if (!err && (err = CUDA_CHECK(cb, cudaGraphLaunch(exec, cb->stream)))) {
        CUDA_CHECK(cb, cudaGraphExecDestroy(exec));
        exec = NULL;
    }
    if (err) {
        /* Nothing of the step ran. Errors met while recording were about the recording:
         * the eager re-run reports its own. */
        PW_LOG_WARN("event=kernel_cuda_graphs state=off reason=recording_failed n_tok=%u "
                    "spoiled=%d",
                    cb->rec.n_tok, (int)cb->batch.spoiled);
        (void)cudaGetLastError();
        cb->err = PW_OK;
        cb->graphs_off = true;
        cb->batch.spoiled = false;
        cuda_graphs_reset(cb);
        return PW_ERR_INTERNAL;
    }
    cb->rec.exec = exec;
    cb->graphs[cb->n_graphs++] = cb->rec;
    PW_LOG_DEBUG("event=kernel_cuda_graph_recorded n_tok=%u n_seq=%u n_logits=%u graphs=%u",
                 cb->rec.n_tok, cb->rec.n_seq, cb->rec.n_logits, cb->n_graphs);
    return PW_OK;
}

/*
 * kernel_cuda: the CUDA backend's kernel_ops table and everything that is not an op:
 * lifecycle, device memory, weight upload (quantized weights split into planes, see
 * kernel_cuda_int.cuh), the paged KV cache, the per-step batch mirror and the error
 * bookkeeping. The ops live one per file in kernel_cuda_<op>.cu.
 *
 * Errors: setup calls return enum pw_err; ops return void and keep the first CUDA or
 * cuBLAS failure in cb->err, which the next ops->sync returns (and clears). Shape
 * violations are programmer errors and PW_ASSERT on the host, as on the CPU backend.
 * Runs on the engine's thread; one thread at a time per backend.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_cuda_int.cuh"

/* ---- errors ---- */

static enum pw_err cuda_err_map(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return PW_OK;
    case cudaErrorMemoryAllocation:
        return PW_ERR_NOMEM;
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorInsufficientDriver:
        return PW_ERR_UNSUPPORTED;
    default:
        return PW_ERR_INTERNAL;
    }
}

static void cuda_record(struct cuda_backend *cb, enum pw_err err)
{
    if (cb && err && !cb->err)
        cb->err = err;
}

enum pw_err cuda_check_at(struct cuda_backend *cb, cudaError_t e, const char *stmt,
                          const char *file, int line)
{
    if (e == cudaSuccess)
        return PW_OK;
    int dev = -1;
    if (cb)
        dev = cb->device;
    else
        (void)cudaGetDevice(&dev);
    PW_LOG_ERROR("event=cuda_error stmt=\"%s\" err=%s msg=\"%s\" device=%d at=%s:%d", stmt,
                 cudaGetErrorName(e), cudaGetErrorString(e), dev, file, line);
    enum pw_err err = cuda_err_map(e);
    cuda_record(cb, err);
    return err;
}

enum pw_err cublas_check_at(struct cuda_backend *cb, cublasStatus_t s, const char *stmt,
                            const char *file, int line)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return PW_OK;
    PW_LOG_ERROR("event=cublas_error stmt=\"%s\" err=%s msg=\"%s\" device=%d at=%s:%d", stmt,
                 cublasGetStatusName(s), cublasGetStatusString(s), cb ? cb->device : -1, file,
                 line);
    enum pw_err err = s == CUBLAS_STATUS_ALLOC_FAILED ? PW_ERR_NOMEM : PW_ERR_INTERNAL;
    cuda_record(cb, err);
    return err;
}

void cuda_enter(struct cuda_backend *cb)
{
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != cb->device)
        CUDA_CHECK(cb, cudaSetDevice(cb->device));
}

/* ---- memory ---- */

/* cudaMalloc is 256-byte aligned, which covers the 64 bytes kernel.h promises. */
static enum pw_err dev_alloc(struct cuda_backend *cb, size_t bytes, void **out)
{
    *out = NULL;
    if (bytes == 0)
        bytes = 64;
    return CUDA_CHECK(cb, cudaMalloc(out, bytes));
}

static void dev_free(struct cuda_backend *cb, void *p)
{
    if (p)
        CUDA_CHECK(cb, cudaFree(p));
}

static enum pw_err cuda_alloc(struct kernel_backend *be, size_t bytes, void **out)
{
    struct cuda_backend *cb = cuda_cb(be);
    cuda_enter(cb);
    return dev_alloc(cb, bytes, out);
}

static void cuda_free(struct kernel_backend *be, void *ptr)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!ptr)
        return;
    cuda_enter(cb);
    cuda_graphs_reset(cb); /* a recording may point at it */
    dev_free(cb, ptr);
}

/*
 * From pageable host memory cudaMemcpyAsync stages the bytes before it returns, so the
 * caller may reuse src at once; the copy itself is ordered after the queued ops.
 */
static void cuda_upload(struct kernel_backend *be, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!bytes)
        return;
    cuda_enter(cb);
    CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream));
}

/* Waits for the copy (and so every op before it): the caller reads dst next. */
static void cuda_download(struct kernel_backend *be, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!bytes)
        return;
    cuda_enter(cb);
    CUDA_CHECK(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream));
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
}

static enum pw_err cuda_sync(struct kernel_backend *be)
{
    struct cuda_backend *cb = cuda_cb(be);
    cuda_enter(cb);
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    enum pw_err err = cb->err;
    cb->err = PW_OK;
    return err;
}

/* ---- weights ---- */

static bool dtype_quantized(enum kernel_dtype t)
{
    return t == KERNEL_DTYPE_Q8_0 || t == KERNEL_DTYPE_Q4_0 || t == KERNEL_DTYPE_Q4_1;
}

static size_t dtype_elem_bytes(enum kernel_dtype t)
{
    return t == KERNEL_DTYPE_F32 ? 4 : 2;
}

/* The dtypes of enum kernel_dtype (kernel_quant.c is not linked into this library). */
static bool dtype_known(enum kernel_dtype t)
{
    switch (t) {
    case KERNEL_DTYPE_F32:
    case KERNEL_DTYPE_F16:
    case KERNEL_DTYPE_BF16:
    case KERNEL_DTYPE_Q8_0:
    case KERNEL_DTYPE_Q4_0:
    case KERNEL_DTYPE_Q4_1:
        return true;
    }
    return false;
}

/* GGUF block bytes and quant bytes per block of the quantized types. */
static void quant_sizes(enum kernel_dtype t, size_t *block_bytes, size_t *qbytes)
{
    *qbytes = t == KERNEL_DTYPE_Q8_0 ? 32 : 16;
    *block_bytes = t == KERNEL_DTYPE_Q8_0 ? 34 : t == KERNEL_DTYPE_Q4_0 ? 18 : 20;
}

/*
 * Splits rows [r0, r1) of GGUF blocks into the planes (host staging) and uploads them.
 * Staging is sized for CUDA_STAGE_ROWS rows.
 */
static enum pw_err upload_quant_rows(struct cuda_backend *cb, struct cuda_weight *w,
                                     const uint8_t *src, uint32_t r0, uint32_t r1, uint8_t *st_q,
                                     uint16_t *st_d, uint16_t *st_m)
{
    enum kernel_dtype t = w->base.info.dtype;
    size_t bb, qb;
    quant_sizes(t, &bb, &qb);
    size_t nb = w->n_blocks;
    size_t row_bytes = nb * bb;
    for (uint32_t r = r0; r < r1; r++) {
        const uint8_t *row = src + (size_t)r * row_bytes;
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * bb;
            size_t i = (size_t)(r - r0) * nb + b;
            memcpy(&st_d[i], blk, 2);
            if (t == KERNEL_DTYPE_Q4_1) {
                memcpy(&st_m[i], blk + 2, 2);
                memcpy(st_q + i * qb, blk + 4, qb);
            } else {
                memcpy(st_q + i * qb, blk + 2, qb);
            }
        }
    }
    size_t n = (size_t)(r1 - r0) * nb, off = (size_t)r0 * nb;
    enum pw_err err;
    if ((err = CUDA_CHECK(cb, cudaMemcpy(w->qs + off * qb, st_q, n * qb, cudaMemcpyHostToDevice))))
        return err;
    if ((err = CUDA_CHECK(cb, cudaMemcpy(w->d + off, st_d, n * 2, cudaMemcpyHostToDevice))))
        return err;
    if (t == KERNEL_DTYPE_Q4_1)
        err = CUDA_CHECK(cb, cudaMemcpy(w->m + off, st_m, n * 2, cudaMemcpyHostToDevice));
    return err;
}

static void weight_free(struct cuda_backend *cb, struct cuda_weight *w)
{
    dev_free(cb, w->data);
    dev_free(cb, w->qs);
    dev_free(cb, w->d);
    dev_free(cb, w->m);
    free(w);
}

/* Grows the dequantization slab for a quantized weight of this size (setup time only). */
static enum pw_err slab_reserve(struct cuda_backend *cb, size_t want)
{
    if (want > CUDA_SLAB_BYTES)
        want = CUDA_SLAB_BYTES;
    if (want <= cb->slab_bytes)
        return PW_OK;
    void *p;
    enum pw_err err = dev_alloc(cb, want, &p);
    if (err)
        return err;
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream)); /* the old slab may be in use */
    cuda_graphs_reset(cb);                             /* recordings point at it */
    dev_free(cb, cb->slab);
    cb->slab = (__half *)p;
    cb->slab_bytes = want;
    return PW_OK;
}

#define CUDA_STAGE_ROWS 1024u

static enum pw_err cuda_weight_create(struct kernel_backend *be, enum kernel_dtype dtype,
                                      uint32_t n_out, uint32_t n_in, const void *data,
                                      struct kernel_weight **out)
{
    struct cuda_backend *cb = cuda_cb(be);
    *out = NULL;
    if (!dtype_known(dtype))
        return PW_ERR_UNSUPPORTED;
    if (n_out == 0 || n_in == 0 || (dtype_quantized(dtype) && n_in % KERNEL_QK != 0))
        return PW_ERR_INVAL;
    size_t row_bytes;
    if (dtype_quantized(dtype)) {
        size_t bb, qb;
        quant_sizes(dtype, &bb, &qb);
        row_bytes = (size_t)(n_in / KERNEL_QK) * bb;
    } else {
        row_bytes = (size_t)n_in * dtype_elem_bytes(dtype);
    }
    if ((size_t)n_out > SIZE_MAX / row_bytes)
        return PW_ERR_TOOBIG;
    cuda_enter(cb);
    struct cuda_weight *w = (struct cuda_weight *)calloc(1, sizeof(*w));
    if (!w)
        return PW_ERR_NOMEM;
    w->base.info.dtype = dtype;
    w->base.info.n_out = n_out;
    w->base.info.n_in = n_in;
    enum pw_err err = PW_OK;
    uint8_t *st_q = NULL;
    uint16_t *st_d = NULL, *st_m = NULL;
    if (!dtype_quantized(dtype)) {
        w->bytes = (size_t)n_out * n_in * dtype_elem_bytes(dtype);
        if ((err = dev_alloc(cb, w->bytes, &w->data)))
            goto out;
        err = CUDA_CHECK(cb, cudaMemcpy(w->data, data, w->bytes, cudaMemcpyHostToDevice));
        goto out;
    }
    {
        size_t bb, qb;
        quant_sizes(dtype, &bb, &qb);
        w->n_blocks = n_in / KERNEL_QK;
        size_t nblk = (size_t)n_out * w->n_blocks;
        w->bytes = nblk * (qb + (dtype == KERNEL_DTYPE_Q4_1 ? 4 : 2));
        if ((err = dev_alloc(cb, nblk * qb, (void **)&w->qs)))
            goto out;
        if ((err = dev_alloc(cb, nblk * 2, (void **)&w->d)))
            goto out;
        if (dtype == KERNEL_DTYPE_Q4_1 && (err = dev_alloc(cb, nblk * 2, (void **)&w->m)))
            goto out;
        size_t st_blocks = (size_t)CUDA_STAGE_ROWS * w->n_blocks;
        st_q = (uint8_t *)malloc(st_blocks * qb);
        st_d = (uint16_t *)malloc(st_blocks * 2);
        st_m = (uint16_t *)malloc(st_blocks * 2);
        if (!st_q || !st_d || !st_m) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        for (uint32_t r0 = 0; r0 < n_out && !err; r0 += CUDA_STAGE_ROWS) {
            uint32_t r1 = n_out - r0 < CUDA_STAGE_ROWS ? n_out : r0 + CUDA_STAGE_ROWS;
            err = upload_quant_rows(cb, w, (const uint8_t *)data, r0, r1, st_q, st_d, st_m);
        }
        if (!err)
            err = slab_reserve(cb, (size_t)n_out * n_in * sizeof(__half));
    }
out:
    free(st_q);
    free(st_d);
    free(st_m);
    if (err) {
        weight_free(cb, w);
        return err;
    }
    *out = &w->base;
    return PW_OK;
}

static void cuda_weight_destroy(struct kernel_backend *be, struct kernel_weight *kw)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!kw)
        return;
    cuda_enter(cb);
    cuda_graphs_reset(cb);
    weight_free(cb, (struct cuda_weight *)kw);
}

struct cuda_wview cuda_weight_view(const struct kernel_weight *kw)
{
    const struct cuda_weight *w = (const struct cuda_weight *)kw;
    struct cuda_wview v;
    v.dtype = (int)w->base.info.dtype;
    v.n_out = w->base.info.n_out;
    v.n_in = w->base.info.n_in;
    v.n_blocks = w->n_blocks;
    v.data = w->data;
    v.qs = w->qs;
    v.d = w->d;
    v.m = w->m;
    return v;
}

/* ---- KV cache ---- */

static enum pw_err cuda_kv_create(struct kernel_backend *be, const struct kernel_kv_desc *d,
                                  struct kernel_kv **out)
{
    struct cuda_backend *cb = cuda_cb(be);
    *out = NULL;
    if (d->dtype != KERNEL_DTYPE_F16)
        return PW_ERR_UNSUPPORTED;
    if (!d->n_layer || !d->n_kv_head || !d->head_dim || !d->block_tokens || !d->n_blocks ||
        d->head_dim % 2 != 0)
        return PW_ERR_INVAL;
    if (d->head_dim > CUDA_ATTN_MAX_HEAD_DIM)
        return PW_ERR_UNSUPPORTED;
    cuda_enter(cb);
    struct cuda_kv *kv = (struct cuda_kv *)calloc(1, sizeof(*kv));
    if (!kv)
        return PW_ERR_NOMEM;
    kv->desc = *d;
    kv->block_stride = (size_t)d->n_kv_head * d->block_tokens * d->head_dim;
    kv->layer_stride = kv->block_stride * d->n_blocks;
    size_t total = kv->layer_stride * d->n_layer;
    enum pw_err err = PW_OK;
    if (total / d->n_layer != kv->layer_stride || total > SIZE_MAX / 4) {
        err = PW_ERR_TOOBIG;
        goto out;
    }
    if ((err = dev_alloc(cb, total * sizeof(__half), (void **)&kv->k)))
        goto out;
    if ((err = dev_alloc(cb, total * sizeof(__half), (void **)&kv->v)))
        goto out;
    if ((err = CUDA_CHECK(cb, cudaMemsetAsync(kv->k, 0, total * sizeof(__half), cb->stream))))
        goto out;
    if ((err = CUDA_CHECK(cb, cudaMemsetAsync(kv->v, 0, total * sizeof(__half), cb->stream))))
        goto out;
    err = CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
out:
    if (err) {
        dev_free(cb, kv->k);
        dev_free(cb, kv->v);
        free(kv);
        return err;
    }
    PW_LOG_INFO("event=kernel_cuda_kv device=%d layers=%u blocks=%u block_tokens=%u mib=%zu",
                cb->device, d->n_layer, d->n_blocks, d->block_tokens,
                (2 * total * sizeof(__half)) >> 20);
    *out = (struct kernel_kv *)kv;
    return PW_OK;
}

static void cuda_kv_destroy(struct kernel_backend *be, struct kernel_kv *kkv)
{
    struct cuda_backend *cb = cuda_cb(be);
    if (!kkv)
        return;
    cuda_enter(cb);
    cuda_graphs_reset(cb);
    struct cuda_kv *kv = (struct cuda_kv *)kkv;
    dev_free(cb, kv->k);
    dev_free(cb, kv->v);
    free(kv);
}

/* ---- the batch mirror ---- */

static void batch_free(struct cuda_backend *cb)
{
    struct cuda_batch *m = &cb->batch;
    dev_free(cb, m->d_tokens);
    dev_free(cb, m->d_pos);
    dev_free(cb, m->d_seq);
    dev_free(cb, m->d_table);
    free(m->h_tokens);
    free(m->h_pos);
    free(m->h_seq);
    free(m->h_table);
    free(m->h_need);
    memset(m, 0, sizeof(*m));
    free(cb->h_rows);
    cb->h_rows = NULL;
    cb->rows_n = 0;
}

static enum pw_err batch_reserve(struct cuda_backend *cb, uint32_t max_tok)
{
    struct cuda_batch *m = &cb->batch;
    batch_free(cb);
    size_t bytes = (size_t)max_tok * sizeof(int32_t);
    enum pw_err err;
    if ((err = dev_alloc(cb, bytes, (void **)&m->d_tokens)) ||
        (err = dev_alloc(cb, bytes, (void **)&m->d_pos)) ||
        (err = dev_alloc(cb, bytes, (void **)&m->d_seq)))
        return err;
    m->h_tokens = (int32_t *)malloc(bytes);
    m->h_pos = (int32_t *)malloc(bytes);
    m->h_seq = (int32_t *)malloc(bytes);
    cb->h_rows = (int32_t *)malloc(bytes);
    if (!m->h_tokens || !m->h_pos || !m->h_seq || !cb->h_rows)
        return PW_ERR_NOMEM;
    return PW_OK;
}

/*
 * Uploads n int32 from host src to device dst and keeps the host copy in cache. While a
 * step is recorded nothing may be uploaded (the recording would not hold it): the
 * recording is spoiled instead and false returned.
 */
static bool mirror_put(struct cuda_backend *cb, int32_t *dst, int32_t *cache, const int32_t *src,
                       size_t n)
{
    if (cb->recording) {
        cb->batch.spoiled = true;
        return false;
    }
    memcpy(cache, src, n * sizeof(int32_t));
    return !CUDA_CHECK(
        cb, cudaMemcpyAsync(dst, cache, n * sizeof(int32_t), cudaMemcpyHostToDevice, cb->stream));
}

void cuda_batch_sync(struct cuda_backend *cb, const struct kernel_batch *b, unsigned what,
                     uint32_t block_tokens, uint32_t n_blocks)
{
    struct cuda_batch *m = &cb->batch;
    uint32_t n = b->n_tok;
    PW_ASSERT(n >= 1 && n <= cb->max_tok);
    if (what & CUDA_BATCH_TOKENS) {
        if (m->n_tokens != n || memcmp(m->h_tokens, b->tokens, n * sizeof(int32_t)) != 0) {
            m->n_tokens = 0;
            if (mirror_put(cb, m->d_tokens, m->h_tokens, b->tokens, n))
                m->n_tokens = n;
        }
    }
    if (what & (CUDA_BATCH_POS | CUDA_BATCH_TABLE)) {
        if (m->n_posseq != n || memcmp(m->h_pos, b->pos, n * sizeof(int32_t)) != 0 ||
            memcmp(m->h_seq, b->seq, n * sizeof(int32_t)) != 0) {
            for (uint32_t i = 0; i < n; i++)
                PW_ASSERT(b->pos[i] >= 0);
            m->n_posseq = 0;
            if (mirror_put(cb, m->d_pos, m->h_pos, b->pos, n) &&
                mirror_put(cb, m->d_seq, m->h_seq, b->seq, n))
                m->n_posseq = n;
        }
    }
    if (!(what & CUDA_BATCH_TABLE))
        return;
    /* Which logical blocks each sequence of the batch reads: the kernels touch no other
     * entry, so only those are checked and compared with the cached copy. */
    PW_ASSERT(block_tokens >= 1 && b->n_seq >= 1 && b->max_blocks >= 1);
    if (m->need_cap < b->n_seq) {
        uint32_t *p = (uint32_t *)realloc(m->h_need, b->n_seq * sizeof(uint32_t));
        PW_ASSERT(p != NULL);
        m->h_need = p;
        m->need_cap = b->n_seq;
    }
    memset(m->h_need, 0, b->n_seq * sizeof(uint32_t));
    for (uint32_t i = 0; i < n; i++) {
        int32_t seq = b->seq[i];
        PW_ASSERT(seq >= 0 && (uint32_t)seq < b->n_seq);
        uint32_t lb = (uint32_t)b->pos[i] / block_tokens + 1;
        PW_ASSERT(lb <= b->max_blocks);
        if (lb > m->h_need[seq])
            m->h_need[seq] = lb;
    }
    bool same = m->n_seq == b->n_seq && m->max_blocks == b->max_blocks;
    for (uint32_t s = 0; s < b->n_seq; s++) {
        const int32_t *row = b->block_table + (size_t)s * b->max_blocks;
        for (uint32_t j = 0; j < m->h_need[s]; j++)
            PW_ASSERT(row[j] >= 0 && (uint32_t)row[j] < n_blocks);
        if (same && m->h_need[s] &&
            memcmp(m->h_table + (size_t)s * b->max_blocks, row, m->h_need[s] * 4) != 0)
            same = false;
    }
    if (same)
        return;
    if (cb->recording) {
        m->spoiled = true;
        return;
    }
    size_t entries = (size_t)b->n_seq * b->max_blocks;
    if (entries > m->table_cap) {
        cuda_graphs_reset(cb); /* recordings point at the old table */
        /* Grows once per larger table shape; the old buffer may still be read by queued
         * kernels, so wait for them before freeing it. */
        CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
        dev_free(cb, m->d_table);
        free(m->h_table);
        m->d_table = NULL;
        m->table_cap = 0;
        m->n_seq = 0;
        m->h_table = (int32_t *)malloc(entries * sizeof(int32_t));
        PW_ASSERT(m->h_table != NULL);
        if (dev_alloc(cb, entries * sizeof(int32_t), (void **)&m->d_table)) {
            free(m->h_table);
            m->h_table = NULL;
            return; /* recorded in cb->err; the op's kernels are skipped by the caller */
        }
        m->table_cap = entries;
    }
    m->n_seq = 0;
    if (mirror_put(cb, m->d_table, m->h_table, b->block_table, entries)) {
        m->n_seq = b->n_seq;
        m->max_blocks = b->max_blocks;
    }
}

/* ---- lifecycle ---- */

static const char *cuda_name(const struct kernel_backend *be)
{
    return ((const struct cuda_backend *)be)->name;
}

static uint32_t cuda_caps(const struct kernel_backend *be)
{
    (void)be;
    return KERNEL_CAP_DEVICE_MEMORY | KERNEL_CAP_REPACKS;
}

static void scratch_free(struct cuda_backend *cb)
{
    cuda_graphs_reset(cb);
    dev_free(cb, cb->xh);
    dev_free(cb, cb->gemm_consts);
    dev_free(cb, cb->d_rows);
    dev_free(cb, cb->d_map);
    dev_free(cb, cb->topk_buf);
    cb->topk_buf = NULL;
    free(cb->h_map);
    cb->d_map = NULL;
    cb->h_map = NULL;
    dev_free(cb, cb->attn_o);
    dev_free(cb, cb->attn_ml);
    cb->xh = NULL;
    cb->gemm_consts = NULL;
    cb->d_rows = NULL;
    cb->attn_o = NULL;
    cb->attn_ml = NULL;
    batch_free(cb);
    cb->max_tok = 0;
    cb->max_cols = 0;
}

static void cuda_destroy(struct kernel_backend *be)
{
    if (!be)
        return;
    struct cuda_backend *cb = cuda_cb(be);
    cuda_enter(cb);
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    if (cb->steps_replayed || cb->steps_recorded || cb->steps_eager)
        PW_LOG_INFO("event=kernel_cuda_steps replayed=%llu recorded=%llu eager=%llu graphs_off=%d",
                    (unsigned long long)cb->steps_replayed, (unsigned long long)cb->steps_recorded,
                    (unsigned long long)cb->steps_eager, (int)cb->graphs_off);
    scratch_free(cb);
    dev_free(cb, cb->slab);
    dev_free(cb, cb->att_ws);
    dev_free(cb, cb->blas_ws);
    if (cb->blas)
        CUBLAS_CHECK(cb, cublasDestroy(cb->blas));
    if (cb->stream)
        CUDA_CHECK(cb, cudaStreamDestroy(cb->stream));
    free(cb);
}

static enum pw_err cuda_reserve(struct kernel_backend *be, uint32_t max_tok, uint32_t max_cols)
{
    struct cuda_backend *cb = cuda_cb(be);
    /* max_tok also sizes grid.y of the per-row launches (at most 65535) */
    if (max_tok == 0 || max_cols == 0 || max_tok > 65535u || max_cols > (1u << 20))
        return PW_ERR_RANGE;
    cuda_enter(cb);
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
    scratch_free(cb);
    enum pw_err err;
    size_t attn_rows = CUDA_ATTN_SPLIT_ROWS;
    size_t heads = (max_cols + 1) / 2;
    if ((err = dev_alloc(cb, (size_t)max_tok * max_cols * 2, &cb->xh)) ||
        (err = dev_alloc(cb, 4 * sizeof(float), (void **)&cb->gemm_consts)) ||
        (err = dev_alloc(cb, (size_t)max_tok * sizeof(int32_t), (void **)&cb->d_rows)) ||
        (err = dev_alloc(cb, (size_t)max_tok * sizeof(int32_t), (void **)&cb->d_map)) ||
        (err = dev_alloc(cb, (size_t)max_tok * (KERNEL_TOPK_MAX * 8 + 4 + CUDA_TOPK_SCRATCH) + 16,
                         (void **)&cb->topk_buf)) ||
        (err = dev_alloc(cb, attn_rows * max_cols * sizeof(float), (void **)&cb->attn_o)) ||
        (err = dev_alloc(cb, attn_rows * heads * 2 * sizeof(float), (void **)&cb->attn_ml)) ||
        (err = batch_reserve(cb, max_tok))) {
        scratch_free(cb);
        return err;
    }
    cb->h_map = (int32_t *)malloc((size_t)max_tok * sizeof(int32_t));
    if (!cb->h_map) {
        scratch_free(cb);
        return PW_ERR_NOMEM;
    }
    const float consts[4] = {1.0f, 0.0f, 1.0f, 0.0f};
    if ((err = CUDA_CHECK(
             cb, cudaMemcpy(cb->gemm_consts, consts, sizeof consts, cudaMemcpyHostToDevice)))) {
        scratch_free(cb);
        return err;
    }
    cb->max_tok = max_tok;
    cb->max_cols = max_cols;
    return PW_OK;
}

static const struct kernel_ops cuda_ops = {
    .name = cuda_name,
    .caps = cuda_caps,
    .destroy = cuda_destroy,
    .reserve = cuda_reserve,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .sync = cuda_sync,
    .weight_create = cuda_weight_create,
    .weight_destroy = cuda_weight_destroy,
    .kv_create = cuda_kv_create,
    .kv_destroy = cuda_kv_destroy,
    .embed = cuda_op_embed,
    .rmsnorm = cuda_op_rmsnorm,
    .matmul = cuda_op_matmul,
    .rope = cuda_op_rope,
    .swiglu = cuda_op_swiglu,
    .add = cuda_op_add,
    .softmax = cuda_op_softmax,
    .copy_rows = cuda_op_copy_rows,
    .kv_write = cuda_op_kv_write,
    .attention = cuda_op_attention,
    .step_begin = cuda_step_begin,
    .step_end = cuda_step_end,
    .topk = cuda_op_topk,
    .mem_info = kernel_cuda_mem_info,
};

extern "C" int kernel_cuda_device_count(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        PW_LOG_DEBUG("event=kernel_cuda_device_count err=%s", cudaGetErrorName(e));
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" enum pw_err kernel_cuda_create(const struct kernel_cuda_opts *opts,
                                          struct kernel_backend **out)
{
    *out = NULL;
    int device = opts ? opts->device : 0;
    int n = kernel_cuda_device_count();
    if (device < 0 || device >= n) {
        PW_LOG_ERROR("event=kernel_cuda_create err=unsupported device=%d devices=%d", device, n);
        return PW_ERR_UNSUPPORTED;
    }
    struct cuda_backend *cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
    if (!cb)
        return PW_ERR_NOMEM;
    cb->base.ops = &cuda_ops;
    cb->device = device;
    enum pw_err err;
    cudaDeviceProp prop;
    if ((err = CUDA_CHECK(cb, cudaSetDevice(device))) ||
        (err = CUDA_CHECK(cb, cudaGetDeviceProperties(&prop, device))) ||
        (err = CUDA_CHECK(cb, cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking))) ||
        (err = CUBLAS_CHECK(cb, cublasCreate(&cb->blas))) ||
        (err = CUBLAS_CHECK(cb, cublasSetStream(cb->blas, cb->stream))) ||
        (err = dev_alloc(cb, CUDA_BLAS_WS, &cb->blas_ws)) ||
        (err = CUBLAS_CHECK(cb, cublasSetWorkspace(cb->blas, cb->blas_ws, CUDA_BLAS_WS)))) {
        cb->err = PW_OK;
        cuda_destroy(&cb->base);
        return err;
    }
    cb->n_sm = prop.multiProcessorCount;
    cb->cc = prop.major * 10 + prop.minor;
    snprintf(cb->name, sizeof(cb->name), "cuda-sm%d", cb->cc);
    PW_LOG_INFO("event=kernel_cuda_create device=%d gpu=\"%s\" sm=%d cc=%d.%d mem_mib=%zu", device,
                prop.name, cb->n_sm, prop.major, prop.minor, prop.totalGlobalMem >> 20);
    *out = &cb->base;
    return PW_OK;
}

extern "C" enum pw_err kernel_cuda_mem_info(struct kernel_backend *be, size_t *free_bytes,
                                            size_t *total_bytes)
{
    struct cuda_backend *cb = cuda_cb(be);
    cuda_enter(cb);
    return CUDA_CHECK(cb, cudaMemGetInfo(free_bytes, total_bytes));
}

/*
 * kernel_cpu: the CPU implementation of struct kernel_ops. It picks an ISA table at
 * create time (AVX-512 VNNI, AVX2, scalar; PW_KERNEL_ISA overrides) and the activation
 * precision of quantized matmuls (16-bit by default, 8-bit on request), repacks quantized
 * weights into the 16-row interleave (kernel_cpu_int.h), and splits matmul and attention
 * across its thread pool; the small element-wise ops run on the calling thread unless
 * they are large (prefill). All scratch is sized by reserve(), so ops never allocate.
 * Called from one engine thread at a time.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernel_cpu_int.h"

#include <cpuid.h>
#include <sys/mman.h>
#include "pw_log.h"

#define CPU_MM_MAX 8             /* products per matmul call */
#define CPU_PAR_ELEMS (1u << 15) /* element-wise ops above this size use the pool */

struct cpu_kv {
    struct kernel_kv_desc desc;
    uint16_t *k;         /* [n_layer][n_blocks][n_kv_head][block_tokens][head_dim] */
    uint16_t *v;         /* same */
    size_t block_stride; /* elements per block of one layer */
    size_t layer_stride; /* elements per layer */
    size_t bytes;        /* of each of k and v (mappings) */
};

struct cpu_backend {
    struct kernel_backend base; /* must be first */
    const struct cpu_isa *isa;
    struct cpu_pool pool;
    char name[32];
    uint32_t max_tok;  /* reserved rows per step */
    uint32_t max_cols; /* reserved row width */
    bool act_q8;       /* quantized matmuls use 8-bit activations (else 16-bit) */
    void *xq;          /* [max_tok][max_cols / 32] cpu_q16x or cpu_q8x blocks */
    /* rope cos/sin cache, valid for rope_pos[0..rope_n) with rope_base/rope_dim */
    float *rope_cs;    /* [max_tok][CPU_ROPE_MAX_DIM] cos, sin interleaved */
    int32_t *rope_pos; /* [max_tok] */
    uint32_t rope_n;
    uint32_t rope_dim;
    float rope_base;
};

static struct cpu_backend *cb(struct kernel_backend *be)
{
    return (struct cpu_backend *)be;
}

static void *alloc64(size_t bytes)
{
    size_t n = (bytes + 63) & ~(size_t)63;
    return aligned_alloc(64, n ? n : 64);
}

/* ---- weights ---- */

size_t cpu_tile_bytes(enum kernel_dtype t)
{
    switch (t) {
    case KERNEL_DTYPE_Q4_0:
        return 4 * 64 + 2 * CPU_GROUP_ROWS;
    case KERNEL_DTYPE_Q4_1:
        return 4 * 64 + 4 * CPU_GROUP_ROWS;
    case KERNEL_DTYPE_Q8_0:
        return 8 * 64 + 2 * CPU_GROUP_ROWS;
    default:
        return 0;
    }
}

/* Copies one GGUF block of row r (lane r % 16) into its tile. */
static void repack_block(enum kernel_dtype dt, const void *src, uint8_t *tile, int lane)
{
    if (dt == KERNEL_DTYPE_Q8_0) {
        const struct kernel_block_q8_0 *b = src;
        for (int j = 0; j < 8; j++)
            for (int e = 0; e < 4; e++)
                tile[64 * j + 4 * lane + e] = (uint8_t)(b->qs[4 * j + e] + 128);
        memcpy(tile + 8 * 64 + 2 * lane, &b->d, 2);
        return;
    }
    const uint8_t *qs;
    uint16_t d, m = 0;
    if (dt == KERNEL_DTYPE_Q4_0) {
        const struct kernel_block_q4_0 *b = src;
        qs = b->qs;
        d = b->d;
    } else {
        const struct kernel_block_q4_1 *b = src;
        qs = b->qs;
        d = b->d;
        m = b->m;
    }
    for (int j = 0; j < 4; j++)
        memcpy(tile + 64 * j + 4 * lane, qs + 4 * j, 4);
    memcpy(tile + 4 * 64 + 2 * lane, &d, 2);
    if (dt == KERNEL_DTYPE_Q4_1)
        memcpy(tile + 4 * 64 + 2 * CPU_GROUP_ROWS + 2 * lane, &m, 2);
}

void cpu_weight_get_row(const struct cpu_weight *w, uint32_t r, float *out)
{
    enum kernel_dtype dt = w->base.info.dtype;
    if (w->tile_bytes == 0) {
        kernel_dequantize_row(dt, (const uint8_t *)w->data + (size_t)r * w->row_bytes, out,
                              w->base.info.n_in);
        return;
    }
    uint32_t g = r / CPU_GROUP_ROWS, lane = r % CPU_GROUP_ROWS;
    const uint8_t *gw = (const uint8_t *)w->data + (size_t)g * w->n_blocks * w->tile_bytes;
    for (uint32_t b = 0; b < w->n_blocks; b++) {
        const uint8_t *tile = gw + (size_t)b * w->tile_bytes;
        float *o = out + (size_t)b * KERNEL_QK;
        uint16_t dh, mh = 0;
        if (dt == KERNEL_DTYPE_Q8_0) {
            memcpy(&dh, tile + 8 * 64 + 2 * lane, 2);
            float d = kernel_fp16_to_fp32(dh);
            for (int j = 0; j < 8; j++)
                for (int e = 0; e < 4; e++)
                    o[4 * j + e] = d * (float)((int)tile[64 * j + 4 * lane + e] - 128);
            continue;
        }
        memcpy(&dh, tile + 4 * 64 + 2 * lane, 2);
        if (dt == KERNEL_DTYPE_Q4_1)
            memcpy(&mh, tile + 4 * 64 + 2 * CPU_GROUP_ROWS + 2 * lane, 2);
        float d = kernel_fp16_to_fp32(dh), m = kernel_fp16_to_fp32(mh);
        /* the same expressions as kernel_dequantize_row, so the results are bit-equal */
        for (int j = 0; j < 4; j++) {
            for (int e = 0; e < 4; e++) {
                uint8_t q = tile[64 * j + 4 * lane + e];
                if (dt == KERNEL_DTYPE_Q4_0) {
                    o[4 * j + e] = d * (float)((q & 0x0f) - 8);
                    o[16 + 4 * j + e] = d * (float)((q >> 4) - 8);
                } else {
                    o[4 * j + e] = d * (float)(q & 0x0f) + m;
                    o[16 + 4 * j + e] = d * (float)(q >> 4) + m;
                }
            }
        }
    }
}

static enum pw_err cpu_weight_create(struct kernel_backend *be, enum kernel_dtype dtype,
                                     uint32_t n_out, uint32_t n_in, const void *data,
                                     struct kernel_weight **out)
{
    (void)be;
    *out = NULL;
    if (!kernel_dtype_supported(dtype))
        return PW_ERR_UNSUPPORTED;
    size_t row_bytes = kernel_dtype_row_bytes(dtype, n_in);
    if (n_out == 0 || n_in == 0 || row_bytes == 0)
        return PW_ERR_INVAL;
    struct cpu_weight *w = calloc(1, sizeof(*w));
    if (!w)
        return PW_ERR_NOMEM;
    w->base.info = (struct kernel_weight_info){.dtype = dtype, .n_out = n_out, .n_in = n_in};
    w->row_bytes = row_bytes;
    w->data = data;
    w->tile_bytes = cpu_tile_bytes(dtype);
    if (w->tile_bytes) {
        w->n_blocks = n_in / KERNEL_QK;
        w->n_groups = (n_out + CPU_GROUP_ROWS - 1) / CPU_GROUP_ROWS;
        size_t bytes = (size_t)w->n_groups * w->n_blocks * w->tile_bytes;
        uint8_t *p = alloc64(bytes);
        if (!p) {
            free(w);
            return PW_ERR_NOMEM;
        }
        memset(p, 0, bytes); /* padding rows: all-zero quants and scales */
        size_t bb = kernel_dtype_block_bytes(dtype);
        for (uint32_t r = 0; r < n_out; r++) {
            const uint8_t *row = (const uint8_t *)data + (size_t)r * row_bytes;
            uint8_t *gw = p + (size_t)(r / CPU_GROUP_ROWS) * w->n_blocks * w->tile_bytes;
            for (uint32_t b = 0; b < w->n_blocks; b++)
                repack_block(dtype, row + b * bb, gw + (size_t)b * w->tile_bytes,
                             (int)(r % CPU_GROUP_ROWS));
        }
        w->owned = p;
        w->data = p;
    }
    *out = &w->base;
    return PW_OK;
}

static void cpu_weight_destroy(struct kernel_backend *be, struct kernel_weight *kw)
{
    (void)be;
    if (!kw)
        return;
    struct cpu_weight *w = (struct cpu_weight *)kw;
    free(w->owned);
    free(w);
}

/* ---- backend lifecycle, memory ---- */

static const char *cpu_name(const struct kernel_backend *be)
{
    return ((const struct cpu_backend *)be)->name;
}

static uint32_t cpu_caps(const struct kernel_backend *be)
{
    const struct cpu_backend *c = (const struct cpu_backend *)be;
    return KERNEL_CAP_REPACKS | (c->isa != &cpu_isa_scalar ? KERNEL_CAP_INT8_DOT : 0) |
           (c->act_q8 ? KERNEL_CAP_ACT_Q8 : 0);
}

static void cpu_destroy(struct kernel_backend *be)
{
    if (!be)
        return;
    struct cpu_backend *c = cb(be);
    cpu_pool_deinit(&c->pool);
    free(c->xq);
    free(c->rope_cs);
    free(c->rope_pos);
    free(c);
}

static enum pw_err cpu_reserve(struct kernel_backend *be, uint32_t max_tok, uint32_t max_cols)
{
    struct cpu_backend *c = cb(be);
    if (max_tok == 0 || max_cols == 0 || max_tok > (1u << 20) || max_cols > (1u << 20))
        return PW_ERR_RANGE;
    size_t nb = (size_t)(max_cols + KERNEL_QK - 1) / KERNEL_QK;
    size_t blk = sizeof(struct cpu_q16x) > sizeof(struct cpu_q8x) ? sizeof(struct cpu_q16x)
                                                                  : sizeof(struct cpu_q8x);
    void *xq = alloc64((size_t)max_tok * nb * blk);
    float *cs = alloc64((size_t)max_tok * CPU_ROPE_MAX_DIM * sizeof(float));
    int32_t *pos = alloc64((size_t)max_tok * sizeof(int32_t));
    if (!xq || !cs || !pos) {
        free(xq);
        free(cs);
        free(pos);
        return PW_ERR_NOMEM;
    }
    free(c->xq);
    free(c->rope_cs);
    free(c->rope_pos);
    c->xq = xq;
    c->rope_cs = cs;
    c->rope_pos = pos;
    c->rope_n = 0;
    c->max_tok = max_tok;
    c->max_cols = max_cols;
    return PW_OK;
}

static enum pw_err cpu_alloc(struct kernel_backend *be, size_t bytes, void **out)
{
    (void)be;
    *out = alloc64(bytes);
    return *out ? PW_OK : PW_ERR_NOMEM;
}

static void cpu_free(struct kernel_backend *be, void *ptr)
{
    (void)be;
    free(ptr);
}

static void cpu_copy(struct kernel_backend *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes)
        memmove(dst, src, bytes);
}

static enum pw_err cpu_sync(struct kernel_backend *be)
{
    (void)be;
    return PW_OK;
}

static enum pw_err cpu_kv_create(struct kernel_backend *be, const struct kernel_kv_desc *d,
                                 struct kernel_kv **out)
{
    (void)be;
    *out = NULL;
    if (d->dtype != KERNEL_DTYPE_F16)
        return PW_ERR_UNSUPPORTED;
    if (!d->n_layer || !d->n_kv_head || !d->head_dim || !d->block_tokens || !d->n_blocks ||
        d->head_dim % 2 != 0)
        return PW_ERR_INVAL;
    struct cpu_kv *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return PW_ERR_NOMEM;
    kv->desc = *d;
    kv->block_stride = (size_t)d->n_kv_head * d->block_tokens * d->head_dim;
    kv->layer_stride = kv->block_stride * d->n_blocks;
    size_t total = kv->layer_stride * d->n_layer;
    if (total / d->n_layer != kv->layer_stride || total > SIZE_MAX / 4) {
        free(kv);
        return PW_ERR_TOOBIG;
    }
    /* Anonymous mappings: zero pages on demand, so only blocks actually written become
     * resident, and start-up does not pay for zeroing a cache sized for full contexts. */
    kv->bytes = total * sizeof(uint16_t);
    kv->k = mmap(NULL, kv->bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    kv->v = mmap(NULL, kv->bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (kv->k == MAP_FAILED || kv->v == MAP_FAILED) {
        if (kv->k != MAP_FAILED)
            munmap(kv->k, kv->bytes);
        if (kv->v != MAP_FAILED)
            munmap(kv->v, kv->bytes);
        free(kv);
        return PW_ERR_NOMEM;
    }
    *out = (struct kernel_kv *)kv;
    return PW_OK;
}

static void cpu_kv_destroy(struct kernel_backend *be, struct kernel_kv *kkv)
{
    (void)be;
    if (!kkv)
        return;
    struct cpu_kv *kv = (struct cpu_kv *)kkv;
    munmap(kv->k, kv->bytes);
    munmap(kv->v, kv->bytes);
    free(kv);
}

/* ---- ops ---- */

static void cpu_embed(struct kernel_backend *be, const struct kernel_weight *table,
                      const struct kernel_batch *b, float *out)
{
    (void)be;
    const struct cpu_weight *w = (const struct cpu_weight *)table;
    uint32_t n = w->base.info.n_in;
    for (uint32_t i = 0; i < b->n_tok; i++) {
        int32_t tok = b->tokens[i];
        PW_ASSERT(tok >= 0 && (uint32_t)tok < w->base.info.n_out);
        cpu_weight_get_row(w, (uint32_t)tok, out + (size_t)i * n);
    }
}

static void cpu_rmsnorm(struct kernel_backend *be, const float *x, const struct kernel_weight *kw,
                        float *y, uint32_t n_tok, uint32_t n, float eps)
{
    const struct cpu_weight *w = (const struct cpu_weight *)kw;
    PW_ASSERT(w->base.info.dtype == KERNEL_DTYPE_F32 &&
              w->base.info.n_out * w->base.info.n_in == n);
    for (uint32_t t = 0; t < n_tok; t++)
        cb(be)->isa->rmsnorm(x + (size_t)t * n, w->data, y + (size_t)t * n, n, eps);
}

struct mm_ctx {
    struct cpu_backend *c;
    const float *x;
    uint32_t n_tok;
    uint32_t n_in;
    const struct kernel_mm *mm;
    uint32_t n_mm;
    bool quant;                     /* some weight is quantized: quantize x first */
    size_t ldx;                     /* blocks per quantized row */
    uint32_t first[CPU_MM_MAX + 1]; /* prefix sums of units (16-row groups) per product */
    uint32_t chunk;                 /* units per work item */
    atomic_uint next;               /* next work item */
};

static void mm_units(struct mm_ctx *m, uint32_t u0, uint32_t u1)
{
    const struct cpu_isa *isa = m->c->isa;
    for (uint32_t i = 0; i < m->n_mm && u0 < u1; i++) {
        if (u0 >= m->first[i + 1])
            continue;
        uint32_t a = u0 - m->first[i];
        uint32_t e = (u1 < m->first[i + 1] ? u1 : m->first[i + 1]) - m->first[i];
        const struct cpu_weight *w = (const struct cpu_weight *)m->mm[i].w;
        size_t ldy = w->base.info.n_out;
        if (w->tile_bytes && m->c->act_q8) {
            isa->mm_q(w, m->c->xq, m->ldx, m->n_tok, a, e, m->mm[i].y, ldy, m->mm[i].accumulate);
        } else if (w->tile_bytes) {
            isa->mm_q16(w, m->c->xq, m->ldx, m->n_tok, a, e, m->mm[i].y, ldy, m->mm[i].accumulate);
        } else {
            uint32_t r0 = a * CPU_GROUP_ROWS, r1 = e * CPU_GROUP_ROWS;
            if (r1 > w->base.info.n_out)
                r1 = w->base.info.n_out;
            isa->mm_f(w, m->x, m->n_tok, r0, r1, m->mm[i].y, ldy, m->mm[i].accumulate);
        }
        u0 = m->first[i + 1];
    }
}

static void mm_worker(void *ctx, int ith, int nth)
{
    struct mm_ctx *m = ctx;
    if (m->quant) {
        uint32_t t0 = (uint32_t)((uint64_t)m->n_tok * (uint32_t)ith / (uint32_t)nth);
        uint32_t t1 = (uint32_t)((uint64_t)m->n_tok * (uint32_t)(ith + 1) / (uint32_t)nth);
        for (uint32_t t = t0; t < t1; t++) {
            const float *xt = m->x + (size_t)t * m->n_in;
            if (m->c->act_q8)
                m->c->isa->quantize_x(xt, (struct cpu_q8x *)m->c->xq + t * m->ldx, m->ldx);
            else
                m->c->isa->quantize_x16(xt, (struct cpu_q16x *)m->c->xq + t * m->ldx, m->ldx);
        }
        cpu_pool_barrier(&m->c->pool);
    }
    uint32_t total = m->first[m->n_mm];
    for (;;) {
        uint32_t u0 = atomic_fetch_add_explicit(&m->next, m->chunk, memory_order_relaxed);
        if (u0 >= total)
            break;
        uint32_t u1 = u0 + m->chunk < total ? u0 + m->chunk : total;
        mm_units(m, u0, u1);
    }
}

static void cpu_matmul(struct kernel_backend *be, const float *x, uint32_t n_tok,
                       const struct kernel_mm *mm, uint32_t n_mm)
{
    struct cpu_backend *c = cb(be);
    PW_ASSERT(n_mm >= 1 && n_mm <= CPU_MM_MAX);
    PW_ASSERT(n_tok >= 1 && n_tok <= c->max_tok);
    struct mm_ctx m = {.c = c, .x = x, .n_tok = n_tok, .mm = mm, .n_mm = n_mm};
    m.n_in = mm[0].w->info.n_in;
    PW_ASSERT(m.n_in <= c->max_cols);
    for (uint32_t i = 0; i < n_mm; i++) {
        const struct cpu_weight *w = (const struct cpu_weight *)mm[i].w;
        PW_ASSERT(w->base.info.n_in == m.n_in);
        if (w->tile_bytes)
            m.quant = true;
        m.first[i + 1] = m.first[i] + (w->base.info.n_out + CPU_GROUP_ROWS - 1) / CPU_GROUP_ROWS;
    }
    if (m.quant)
        PW_ASSERT(m.n_in % KERNEL_QK == 0);
    m.ldx = m.n_in / KERNEL_QK;
    /* About 8 work items per thread balances a busy core against the others. */
    uint32_t nth = (uint32_t)c->pool.n_threads;
    m.chunk = m.first[n_mm] / (nth * 8);
    if (m.chunk == 0)
        m.chunk = 1;
    atomic_init(&m.next, 0);
    cpu_pool_run(&c->pool, mm_worker, &m);
}

static const float *rope_table(struct cpu_backend *c, const struct kernel_batch *b,
                               uint32_t rope_dim, float base)
{
    if (c->rope_n == b->n_tok && c->rope_dim == rope_dim && c->rope_base == base &&
        memcmp(c->rope_pos, b->pos, b->n_tok * sizeof(int32_t)) == 0)
        return c->rope_cs;
    for (uint32_t t = 0; t < b->n_tok; t++) {
        float *cs = c->rope_cs + (size_t)t * CPU_ROPE_MAX_DIM;
        for (uint32_t j = 0; j < rope_dim / 2; j++) {
            double theta = (double)b->pos[t] * pow((double)base, -2.0 * j / (double)rope_dim);
            cs[2 * j] = (float)cos(theta);
            cs[2 * j + 1] = (float)sin(theta);
        }
    }
    memcpy(c->rope_pos, b->pos, b->n_tok * sizeof(int32_t));
    c->rope_n = b->n_tok;
    c->rope_dim = rope_dim;
    c->rope_base = base;
    return c->rope_cs;
}

static void cpu_rope(struct kernel_backend *be, float *x, const struct kernel_batch *b,
                     uint32_t n_head, uint32_t head_dim, uint32_t rope_dim, float freq_base)
{
    struct cpu_backend *c = cb(be);
    PW_ASSERT(rope_dim <= head_dim && rope_dim % 2 == 0 && rope_dim <= CPU_ROPE_MAX_DIM);
    PW_ASSERT(b->n_tok <= c->max_tok);
    const float *tab = rope_table(c, b, rope_dim, freq_base);
    for (uint32_t t = 0; t < b->n_tok; t++) {
        const float *cs = tab + (size_t)t * CPU_ROPE_MAX_DIM;
        for (uint32_t h = 0; h < n_head; h++) {
            float *v = x + ((size_t)t * n_head + h) * head_dim;
            for (uint32_t j = 0; j < rope_dim / 2; j++) {
                float x0 = v[2 * j], x1 = v[2 * j + 1];
                v[2 * j] = x0 * cs[2 * j] - x1 * cs[2 * j + 1];
                v[2 * j + 1] = x0 * cs[2 * j + 1] + x1 * cs[2 * j];
            }
        }
    }
}

enum ew_kind { EW_SWIGLU, EW_ADD };

struct ew_ctx {
    const struct cpu_isa *isa;
    enum ew_kind kind;
    const float *a;
    const float *b;
    float *out;
    size_t n;
};

static void ew_worker(void *ctx, int ith, int nth)
{
    struct ew_ctx *e = ctx;
    /* split on 64-element boundaries so every thread keeps full vectors */
    size_t units = (e->n + 63) / 64;
    size_t u0 = units * (size_t)ith / (size_t)nth, u1 = units * (size_t)(ith + 1) / (size_t)nth;
    size_t i0 = u0 * 64, i1 = u1 * 64 < e->n ? u1 * 64 : e->n;
    if (i0 >= i1)
        return;
    if (e->kind == EW_SWIGLU)
        e->isa->swiglu(e->a + i0, e->b + i0, e->out + i0, i1 - i0);
    else
        e->isa->add(e->out + i0, e->a + i0, i1 - i0);
}

static void run_ew(struct cpu_backend *c, struct ew_ctx *e)
{
    if (e->n >= CPU_PAR_ELEMS && c->pool.n_threads > 1)
        cpu_pool_run(&c->pool, ew_worker, e);
    else
        ew_worker(e, 0, 1);
}

static void cpu_swiglu(struct kernel_backend *be, const float *gate, const float *up, float *out,
                       size_t n)
{
    struct ew_ctx e = {
        .isa = cb(be)->isa, .kind = EW_SWIGLU, .a = gate, .b = up, .out = out, .n = n};
    run_ew(cb(be), &e);
}

static void cpu_add(struct kernel_backend *be, float *y, const float *x, size_t n)
{
    struct ew_ctx e = {.isa = cb(be)->isa, .kind = EW_ADD, .a = x, .out = y, .n = n};
    run_ew(cb(be), &e);
}

static void cpu_softmax(struct kernel_backend *be, float *x, uint32_t n_rows, uint32_t n)
{
    for (uint32_t r = 0; r < n_rows; r++)
        cb(be)->isa->softmax(x + (size_t)r * n, n);
}

static void cpu_copy_rows(struct kernel_backend *be, float *dst, const float *src,
                          const int32_t *rows, uint32_t n, uint32_t row_len)
{
    (void)be;
    for (uint32_t i = 0; i < n; i++) {
        PW_ASSERT(rows[i] >= 0);
        memmove(dst + (size_t)i * row_len, src + (size_t)rows[i] * row_len,
                row_len * sizeof(float));
    }
}

/* Element offset of (token slot) in a layer's cache, for KV head 0. */
static size_t kv_slot(const struct cpu_kv *kv, const struct kernel_batch *b, uint32_t i)
{
    const struct kernel_kv_desc *d = &kv->desc;
    int32_t pos = b->pos[i], seq = b->seq[i];
    PW_ASSERT(pos >= 0 && seq >= 0 && (uint32_t)seq < b->n_seq);
    uint32_t lb = (uint32_t)pos / d->block_tokens;
    PW_ASSERT(lb < b->max_blocks);
    int32_t blk = b->block_table[(size_t)seq * b->max_blocks + lb];
    PW_ASSERT(blk >= 0 && (uint32_t)blk < d->n_blocks);
    return (size_t)blk * kv->block_stride + (size_t)((uint32_t)pos % d->block_tokens) * d->head_dim;
}

static void cpu_kv_write(struct kernel_backend *be, struct kernel_kv *kkv, uint32_t layer,
                         const struct kernel_batch *b, const float *k, const float *v)
{
    const struct cpu_isa *isa = cb(be)->isa;
    struct cpu_kv *kv = (struct cpu_kv *)kkv;
    const struct kernel_kv_desc *d = &kv->desc;
    PW_ASSERT(layer < d->n_layer);
    size_t row = (size_t)d->n_kv_head * d->head_dim;
    size_t head_stride = (size_t)d->block_tokens * d->head_dim;
    for (uint32_t i = 0; i < b->n_tok; i++) {
        size_t off = layer * kv->layer_stride + kv_slot(kv, b, i);
        for (uint32_t g = 0; g < d->n_kv_head; g++) {
            isa->to_f16(k + i * row + (size_t)g * d->head_dim, kv->k + off + g * head_stride,
                        d->head_dim);
            isa->to_f16(v + i * row + (size_t)g * d->head_dim, kv->v + off + g * head_stride,
                        d->head_dim);
        }
    }
}

struct attn_ctx {
    const struct cpu_isa *isa;
    const struct cpu_kv *kv;
    uint32_t layer;
    const struct kernel_batch *b;
    const float *q;
    float *out;
    uint32_t n_head;
    float scale;
    atomic_uint next;
};

static void attn_worker(void *ctx, int ith, int nth)
{
    (void)ith;
    (void)nth;
    struct attn_ctx *a = ctx;
    const struct kernel_kv_desc *d = &a->kv->desc;
    uint32_t n_items = a->b->n_tok * d->n_kv_head;
    uint32_t n_rep = a->n_head / d->n_kv_head;
    for (;;) {
        uint32_t it_i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (it_i >= n_items)
            break;
        uint32_t t = it_i / d->n_kv_head, g = it_i % d->n_kv_head;
        int32_t pos = a->b->pos[t], seq = a->b->seq[t];
        PW_ASSERT(pos >= 0 && seq >= 0 && (uint32_t)seq < a->b->n_seq);
        PW_ASSERT((uint32_t)pos / d->block_tokens < a->b->max_blocks);
        size_t qoff = ((size_t)t * a->n_head + (size_t)g * n_rep) * d->head_dim;
        struct cpu_attn_item item = {
            .q = a->q + qoff,
            .out = a->out + qoff,
            .n_rep = n_rep,
            .head_dim = d->head_dim,
            .n_keys = (uint32_t)pos + 1,
            .block_tokens = d->block_tokens,
            .blocks = a->b->block_table + (size_t)seq * a->b->max_blocks,
            .k_base = a->kv->k + a->layer * a->kv->layer_stride,
            .v_base = a->kv->v + a->layer * a->kv->layer_stride,
            .block_stride = a->kv->block_stride,
            .head_off = (size_t)g * d->block_tokens * d->head_dim,
            .scale = a->scale,
        };
        for (uint32_t lb = 0; lb <= (uint32_t)pos / d->block_tokens; lb++) {
            int32_t blk = item.blocks[lb];
            PW_ASSERT(blk >= 0 && (uint32_t)blk < d->n_blocks);
        }
        a->isa->attention(&item);
    }
}

static void cpu_attention(struct kernel_backend *be, const struct kernel_kv *kkv, uint32_t layer,
                          const struct kernel_batch *b, const float *q, float *out, uint32_t n_head,
                          float scale)
{
    struct cpu_backend *c = cb(be);
    const struct cpu_kv *kv = (const struct cpu_kv *)kkv;
    PW_ASSERT(layer < kv->desc.n_layer);
    PW_ASSERT(n_head % kv->desc.n_kv_head == 0);
    struct attn_ctx a = {.isa = c->isa,
                         .kv = kv,
                         .layer = layer,
                         .b = b,
                         .q = q,
                         .out = out,
                         .n_head = n_head,
                         .scale = scale};
    atomic_init(&a.next, 0);
    if (b->n_tok * kv->desc.n_kv_head > 1)
        cpu_pool_run(&c->pool, attn_worker, &a);
    else
        attn_worker(&a, 0, 1);
}

static const struct kernel_ops cpu_ops = {
    .name = cpu_name,
    .caps = cpu_caps,
    .destroy = cpu_destroy,
    .reserve = cpu_reserve,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight_create = cpu_weight_create,
    .weight_destroy = cpu_weight_destroy,
    .kv_create = cpu_kv_create,
    .kv_destroy = cpu_kv_destroy,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .add = cpu_add,
    .softmax = cpu_softmax,
    .copy_rows = cpu_copy_rows,
    .kv_write = cpu_kv_write,
    .attention = cpu_attention,
};

/* AVX512-VNNI from CPUID leaf 7 (ECX bit 11): clang 14 has no __builtin_cpu_supports name
 * for it. The OS-support (XSAVE) check comes with __builtin_cpu_supports("avx512f"). */
static bool cpu_has_avx512_vnni(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return false;
    return (c >> 11) & 1u;
}

static bool cpu_has_avx512(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && cpu_has_avx512_vnni();
}

/* F16C from CPUID leaf 1 (ECX bit 29): clang 14 has no __builtin_cpu_supports name for it
 * either. */
static bool cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return false;
    return (c >> 29) & 1u;
}

static bool cpu_has_avx2(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
}

static enum pw_err pick_isa(const struct cpu_isa **out)
{
    const char *env = getenv("PW_KERNEL_ISA");
    __builtin_cpu_init();
    if (env && *env) {
        if (strcmp(env, "scalar") == 0) {
            *out = &cpu_isa_scalar;
        } else if (strcmp(env, "avx2") == 0) {
            if (!cpu_has_avx2())
                return PW_ERR_UNSUPPORTED;
            *out = &cpu_isa_avx2;
        } else if (strcmp(env, "avx512") == 0) {
            if (!cpu_has_avx512())
                return PW_ERR_UNSUPPORTED;
            *out = &cpu_isa_avx512;
        } else {
            return PW_ERR_CONFIG;
        }
        return PW_OK;
    }
    *out = cpu_has_avx512() ? &cpu_isa_avx512 : cpu_has_avx2() ? &cpu_isa_avx2 : &cpu_isa_scalar;
    return PW_OK;
}

static enum pw_err pick_act(enum kernel_act want, bool *q8)
{
    if (want == KERNEL_ACT_DEFAULT) {
        const char *env = getenv("PW_KERNEL_ACT");
        if (!env || !*env || strcmp(env, "q16") == 0)
            want = KERNEL_ACT_Q16;
        else if (strcmp(env, "q8") == 0)
            want = KERNEL_ACT_Q8;
        else
            return PW_ERR_CONFIG;
    }
    if (want != KERNEL_ACT_Q16 && want != KERNEL_ACT_Q8)
        return PW_ERR_INVAL;
    *q8 = want == KERNEL_ACT_Q8;
    return PW_OK;
}

enum pw_err kernel_cpu_create(int n_threads, struct kernel_backend **out)
{
    struct kernel_cpu_opts o = {.n_threads = n_threads, .act = KERNEL_ACT_DEFAULT};
    return kernel_cpu_create_opts(&o, out);
}

enum pw_err kernel_cpu_create_opts(const struct kernel_cpu_opts *opts, struct kernel_backend **out)
{
    enum pw_err err;
    *out = NULL;
    const struct cpu_isa *isa;
    err = pick_isa(&isa);
    if (err) {
        PW_LOG_ERROR("event=kernel_cpu_create err=%s isa=%s", pw_err_name(err),
                     getenv("PW_KERNEL_ISA"));
        return err;
    }
    static const struct kernel_cpu_opts defaults = {0};
    if (!opts)
        opts = &defaults;
    bool act_q8;
    err = pick_act(opts->act, &act_q8);
    if (err) {
        PW_LOG_ERROR("event=kernel_cpu_create err=%s act=%s", pw_err_name(err),
                     getenv("PW_KERNEL_ACT"));
        return err;
    }
    int n_threads = opts->n_threads;
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    if (n_threads > 256)
        n_threads = 256;
    struct cpu_backend *c = calloc(1, sizeof(*c));
    if (!c)
        return PW_ERR_NOMEM;
    c->base.ops = &cpu_ops;
    c->isa = isa;
    c->act_q8 = act_q8;
    snprintf(c->name, sizeof(c->name), "cpu-%s", isa->name);
    err = cpu_pool_init(&c->pool, n_threads);
    if (err) {
        free(c);
        return err;
    }
    PW_LOG_INFO("event=kernel_cpu_create isa=%s threads=%d act=%s", isa->name, n_threads,
                act_q8 ? "q8" : "q16");
    *out = &c->base;
    return PW_OK;
}

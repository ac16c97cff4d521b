/*
 * CUDA backend vs CPU backend: every op of struct kernel_ops on random inputs, the same
 * inputs on both backends, compared element by element. Exits 77 (skipped) when the build
 * has no CUDA backend or the machine has no device.
 *
 * Tolerances (mag = sum_k |x_k| (|w_k| + |m_block|), amax_k = largest |x| of k's block):
 *   embed, add, copy_rows: bit-exact (same dequantization expressions, plain copies).
 *   matmul n_tok <= 8 (matvec, float x): 1e-4 * sum_k |w_k| amax_k; the CPU's 16-bit
 *     activations dominate (<= amax / 65278 per element).
 *   matmul n_tok > 8 (cuBLAS): x rounded to F16 with a row scale and quantized weights
 *     dequantized to F16: 3e-3 * mag (+ the CPU term); BF16 weights (x in BF16):
 *     1e-2 * mag; F32 weights: 1e-4 * mag.
 *   rmsnorm, swiglu, softmax: 1e-5 relative (+1e-6); rope: 2e-5 absolute on |x| <= 1.
 *   attention: 5e-5 absolute (both read the same F16 cache; only float order differs),
 *     on chunked prefill + decode rows of three sequences in one shuffled batch, paged
 *     through shuffled block tables, head dims 24/64/128, GQA 3/4/6, and a long sequence
 *     (700 keys) that makes the kernel split its keys.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifndef PW_HAVE_CUDA

int main(void)
{
    fprintf(stderr, "test_cuda_ops: built without the CUDA backend: skipped\n");
    return 77;
}

#else

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <math.h>
#include <string.h>

#include "kernel.h"
#include "kernel_cuda.h"

#define MAX_TOK 1024
#define MAX_COLS 2048

static struct kernel_backend *cpu, *gpu;
static uint32_t rng_state = 12345u;

static uint32_t rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static float rnd(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rng_next() >> 8) * 0x1p-24f;
}

static void fill(float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rnd(lo, hi);
}

static void *xmalloc(size_t n)
{
    void *p = calloc(1, n ? n : 1);
    assert_non_null(p);
    return p;
}

/* A buffer on a backend, optionally filled from host memory. */
static void *dbuf(struct kernel_backend *be, size_t bytes, const void *src)
{
    void *p = NULL;
    assert_int_equal(be->ops->alloc(be, bytes, &p), PW_OK);
    if (src)
        be->ops->upload(be, p, src, bytes);
    return p;
}

static void fetch(struct kernel_backend *be, void *dst, const void *src, size_t bytes)
{
    be->ops->download(be, dst, src, bytes);
    assert_int_equal(be->ops->sync(be), PW_OK);
}

static const enum kernel_dtype all_types[] = {KERNEL_DTYPE_F32,  KERNEL_DTYPE_F16,
                                              KERNEL_DTYPE_BF16, KERNEL_DTYPE_Q8_0,
                                              KERNEL_DTYPE_Q4_0, KERNEL_DTYPE_Q4_1};
#define N_TYPES (sizeof all_types / sizeof all_types[0])

static bool quantized(enum kernel_dtype t)
{
    return t == KERNEL_DTYPE_Q8_0 || t == KERNEL_DTYPE_Q4_0 || t == KERNEL_DTYPE_Q4_1;
}

/* GGUF bytes of a random n_out x n_in weight of type t; deq gets the dequantized values
 * and mabs |m| of each element's block (Q4_1), else 0. */
static void *make_weight(enum kernel_dtype t, uint32_t n_out, uint32_t n_in, float *deq,
                         float *mabs)
{
    size_t rb = kernel_dtype_row_bytes(t, n_in);
    assert_true(rb > 0);
    uint8_t *data = xmalloc(rb * n_out);
    float *src = xmalloc(n_in * sizeof(float));
    for (uint32_t r = 0; r < n_out; r++) {
        fill(src, n_in, -1.0f, 1.0f);
        if (t == KERNEL_DTYPE_Q4_1 && r % 3 == 1) /* blocks far from zero: large m */
            for (uint32_t k = 0; k < n_in; k++)
                src[k] += 3.0f;
        uint8_t *row = data + rb * r;
        switch (t) {
        case KERNEL_DTYPE_F32:
            memcpy(row, src, n_in * sizeof(float));
            break;
        case KERNEL_DTYPE_F16:
            for (uint32_t k = 0; k < n_in; k++) {
                uint16_t h = kernel_fp32_to_fp16(src[k]);
                memcpy(row + 2 * k, &h, 2);
            }
            break;
        case KERNEL_DTYPE_BF16:
            for (uint32_t k = 0; k < n_in; k++) {
                uint16_t h = kernel_fp32_to_bf16(src[k]);
                memcpy(row + 2 * k, &h, 2);
            }
            break;
        default:
            kernel_quantize_row(t, src, row, n_in);
            break;
        }
        kernel_dequantize_row(t, row, deq + (size_t)r * n_in, n_in);
        for (uint32_t k = 0; k < n_in; k++) {
            float m = 0.0f;
            if (t == KERNEL_DTYPE_Q4_1) {
                const struct kernel_block_q4_1 *b =
                    (const struct kernel_block_q4_1 *)row + k / KERNEL_QK;
                m = fabsf(kernel_fp16_to_fp32(b->m));
            }
            mabs[(size_t)r * n_in + k] = m;
        }
    }
    free(src);
    return data;
}

struct wpair {
    struct kernel_weight *c, *g;
};

static struct wpair wcreate(enum kernel_dtype t, uint32_t n_out, uint32_t n_in, const void *data)
{
    struct wpair w;
    assert_int_equal(cpu->ops->weight_create(cpu, t, n_out, n_in, data, &w.c), PW_OK);
    assert_int_equal(gpu->ops->weight_create(gpu, t, n_out, n_in, data, &w.g), PW_OK);
    return w;
}

static void wdestroy(struct wpair w)
{
    cpu->ops->weight_destroy(cpu, w.c);
    gpu->ops->weight_destroy(gpu, w.g);
}

/* ---- embed ---- */

static void test_embed(void **state)
{
    (void)state;
    const uint32_t n_out = 50, n_in = 96, n_tok = 7;
    for (size_t ti = 0; ti < N_TYPES; ti++) {
        enum kernel_dtype t = all_types[ti];
        float *deq = xmalloc((size_t)n_out * n_in * 4), *mabs = xmalloc((size_t)n_out * n_in * 4);
        void *data = make_weight(t, n_out, n_in, deq, mabs);
        struct wpair w = wcreate(t, n_out, n_in, data);
        int32_t tokens[7] = {0, 49, 3, 3, 17, 25, 48};
        struct kernel_batch b = {.n_tok = n_tok, .tokens = tokens};
        float *oc = dbuf(cpu, n_tok * n_in * 4, NULL), *og = dbuf(gpu, n_tok * n_in * 4, NULL);
        cpu->ops->embed(cpu, w.c, &b, oc);
        gpu->ops->embed(gpu, w.g, &b, og);
        float *hg = xmalloc(n_tok * n_in * 4);
        fetch(gpu, hg, og, n_tok * n_in * 4);
        assert_memory_equal(hg, oc, n_tok * n_in * 4);
        free(hg);
        cpu->ops->free(cpu, oc);
        gpu->ops->free(gpu, og);
        wdestroy(w);
        free(data);
        free(deq);
        free(mabs);
    }
}

/* ---- matmul ---- */

static double matmul_rel(enum kernel_dtype t, uint32_t n_tok)
{
    if (n_tok <= 8 || t == KERNEL_DTYPE_F32)
        return 1e-4;
    return t == KERNEL_DTYPE_BF16 ? 1e-2 : 3e-3;
}

static void check_matmul(enum kernel_dtype t, uint32_t n_out, uint32_t n_in, uint32_t n_tok,
                         bool acc)
{
    size_t wn = (size_t)n_out * n_in;
    float *deq = xmalloc(wn * 4), *mabs = xmalloc(wn * 4);
    void *data = make_weight(t, n_out, n_in, deq, mabs);
    struct wpair w = wcreate(t, n_out, n_in, data);
    float *x = xmalloc((size_t)n_tok * n_in * 4), *y0 = xmalloc((size_t)n_tok * n_out * 4);
    fill(x, (size_t)n_tok * n_in, -2.0f, 2.0f);
    if (n_tok > 2) /* one row of large values: the F16 row scale must keep it finite */
        for (uint32_t k = 0; k < n_in; k++)
            x[(size_t)2 * n_in + k] *= 3.0e5f;
    fill(y0, (size_t)n_tok * n_out, -1.0f, 1.0f);
    size_t xb = (size_t)n_tok * n_in * 4, yb = (size_t)n_tok * n_out * 4;
    float *xc = dbuf(cpu, xb, x), *xg = dbuf(gpu, xb, x);
    float *yc = dbuf(cpu, yb, y0), *yg = dbuf(gpu, yb, y0);
    kernel_matmul1(cpu, w.c, xc, n_tok, yc, acc);
    kernel_matmul1(gpu, w.g, xg, n_tok, yg, acc);
    float *hc = xmalloc(yb), *hg = xmalloc(yb);
    fetch(cpu, hc, yc, yb);
    fetch(gpu, hg, yg, yb);
    double rel = matmul_rel(t, n_tok);
    for (uint32_t i = 0; i < n_tok; i++) {
        const float *xi = x + (size_t)i * n_in;
        for (uint32_t r = 0; r < n_out; r++) {
            double mag = 0.0, magq = 0.0;
            for (uint32_t k = 0; k < n_in; k++) {
                double amax = 0.0;
                uint32_t b0 = k / KERNEL_QK * KERNEL_QK;
                for (uint32_t j = b0; j < b0 + KERNEL_QK && j < n_in; j++)
                    amax = fmax(amax, fabs(xi[j]));
                double wa = fabs(deq[(size_t)r * n_in + k]) + mabs[(size_t)r * n_in + k];
                mag += fabs(xi[k]) * wa;
                magq += amax * wa;
            }
            double tol = rel * mag + (quantized(t) ? 1e-4 * magq : 0.0) + 1e-5;
            if (acc)
                tol += 1e-6;
            double got = hg[(size_t)i * n_out + r], want = hc[(size_t)i * n_out + r];
            if (!(fabs(got - want) <= tol)) {
                fprintf(stderr,
                        "matmul %s n_out=%u n_in=%u n_tok=%u acc=%d: y[%u][%u] cuda=%.8g "
                        "cpu=%.8g tol=%.3g\n",
                        kernel_dtype_name(t), n_out, n_in, n_tok, acc, i, r, got, want, tol);
                fail();
            }
        }
    }
    free(hc);
    free(hg);
    cpu->ops->free(cpu, xc);
    cpu->ops->free(cpu, yc);
    gpu->ops->free(gpu, xg);
    gpu->ops->free(gpu, yg);
    wdestroy(w);
    free(x);
    free(y0);
    free(data);
    free(deq);
    free(mabs);
}

static void test_matmul(void **state)
{
    (void)state;
    static const uint32_t toks[] = {1, 2, 3, 8, 9, 33};
    static const uint32_t shapes[][2] = {{17, 64}, {40, 544}, {3, 1024}, {130, 96}};
    for (size_t ti = 0; ti < N_TYPES; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++)
                check_matmul(all_types[ti], shapes[si][0], shapes[si][1], toks[k], k % 2 == 1);
    /* float weights with rows that are not whole 32-element blocks */
    for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
        check_matmul(KERNEL_DTYPE_F32, 5, 37, toks[k], false);
        check_matmul(KERNEL_DTYPE_F16, 35, 37, toks[k], true);
        check_matmul(KERNEL_DTYPE_BF16, 35, 70, toks[k], false);
    }
}

/* A group mixing dtypes, one accumulating: the GEMM path converts x once per kind. */
static void test_matmul_group(void **state)
{
    (void)state;
    const uint32_t n_in = 128, n_tok = 20;
    static const enum kernel_dtype types[] = {KERNEL_DTYPE_Q4_1, KERNEL_DTYPE_BF16,
                                              KERNEL_DTYPE_F16, KERNEL_DTYPE_Q8_0};
    static const uint32_t outs[] = {48, 16, 33, 64};
    for (uint32_t rows = 1; rows <= n_tok; rows += n_tok - 1) {
        struct wpair w[4];
        void *data[4];
        float *deq[4], *mabs[4];
        struct kernel_mm mc[4], mg[4];
        float *x = xmalloc((size_t)n_tok * n_in * 4);
        fill(x, (size_t)n_tok * n_in, -1.0f, 1.0f);
        float *xc = dbuf(cpu, (size_t)rows * n_in * 4, x),
              *xg = dbuf(gpu, (size_t)rows * n_in * 4, x);
        for (int i = 0; i < 4; i++) {
            deq[i] = xmalloc((size_t)outs[i] * n_in * 4);
            mabs[i] = xmalloc((size_t)outs[i] * n_in * 4);
            data[i] = make_weight(types[i], outs[i], n_in, deq[i], mabs[i]);
            w[i] = wcreate(types[i], outs[i], n_in, data[i]);
            float *y0 = xmalloc((size_t)rows * outs[i] * 4);
            fill(y0, (size_t)rows * outs[i], -1.0f, 1.0f);
            mc[i] = (struct kernel_mm){
                .w = w[i].c, .y = dbuf(cpu, (size_t)rows * outs[i] * 4, y0), .accumulate = i == 2};
            mg[i] = (struct kernel_mm){
                .w = w[i].g, .y = dbuf(gpu, (size_t)rows * outs[i] * 4, y0), .accumulate = i == 2};
            free(y0);
        }
        cpu->ops->matmul(cpu, xc, rows, mc, 4);
        gpu->ops->matmul(gpu, xg, rows, mg, 4);
        for (int i = 0; i < 4; i++) {
            size_t yb = (size_t)rows * outs[i] * 4;
            float *hc = xmalloc(yb), *hg = xmalloc(yb);
            fetch(cpu, hc, mc[i].y, yb);
            fetch(gpu, hg, mg[i].y, yb);
            double rel = matmul_rel(types[i], rows) + 1e-4;
            for (size_t e = 0; e < (size_t)rows * outs[i]; e++) {
                size_t t = e / outs[i], r = e % outs[i];
                double mag = 0.0;
                for (uint32_t k = 0; k < n_in; k++)
                    mag += (fabs(deq[i][r * n_in + k]) + mabs[i][r * n_in + k]);
                /* |x| <= 1, so sum |w| bounds the magnitude of every term */
                if (!(fabs((double)hg[e] - hc[e]) <= rel * mag + 1e-5)) {
                    fprintf(stderr, "group %d rows=%u y[%zu][%zu] cuda=%.8g cpu=%.8g\n", i, rows, t,
                            r, hg[e], hc[e]);
                    fail();
                }
            }
            free(hc);
            free(hg);
            cpu->ops->free(cpu, mc[i].y);
            gpu->ops->free(gpu, mg[i].y);
            wdestroy(w[i]);
            free(data[i]);
            free(deq[i]);
            free(mabs[i]);
        }
        cpu->ops->free(cpu, xc);
        gpu->ops->free(gpu, xg);
        free(x);
    }
}

/* ---- element-wise and row ops ---- */

static void compare_rel(const char *what, const float *got, const float *want, size_t n, double rel,
                        double abs_tol)
{
    for (size_t i = 0; i < n; i++) {
        double tol = rel * fabs(want[i]) + abs_tol;
        if (!(fabs((double)got[i] - want[i]) <= tol)) {
            fprintf(stderr, "%s[%zu]: cuda=%.9g cpu=%.9g\n", what, i, got[i], want[i]);
            fail();
        }
    }
}

static void test_rmsnorm(void **state)
{
    (void)state;
    const uint32_t n_tok = 5, n = 300;
    size_t bytes = (size_t)n_tok * n * 4;
    float *x = xmalloc(bytes), *wv = xmalloc(n * 4), *hc = xmalloc(bytes), *hg = xmalloc(bytes);
    fill(x, (size_t)n_tok * n, -3.0f, 3.0f);
    fill(wv, n, 0.5f, 1.5f);
    struct wpair w = wcreate(KERNEL_DTYPE_F32, 1, n, wv);
    for (int inplace = 0; inplace < 2; inplace++) {
        float *xc = dbuf(cpu, bytes, x), *xg = dbuf(gpu, bytes, x);
        float *yc = inplace ? xc : dbuf(cpu, bytes, NULL),
              *yg = inplace ? xg : dbuf(gpu, bytes, NULL);
        cpu->ops->rmsnorm(cpu, xc, w.c, yc, n_tok, n, 1e-5f);
        gpu->ops->rmsnorm(gpu, xg, w.g, yg, n_tok, n, 1e-5f);
        fetch(cpu, hc, yc, bytes);
        fetch(gpu, hg, yg, bytes);
        compare_rel("rmsnorm", hg, hc, (size_t)n_tok * n, 1e-5, 1e-6);
        if (!inplace) {
            cpu->ops->free(cpu, yc);
            gpu->ops->free(gpu, yg);
        }
        cpu->ops->free(cpu, xc);
        gpu->ops->free(gpu, xg);
    }
    wdestroy(w);
    free(x);
    free(wv);
    free(hc);
    free(hg);
}

static void test_elementwise(void **state)
{
    (void)state;
    const size_t n = 70001;
    size_t bytes = n * 4;
    float *a = xmalloc(bytes), *b = xmalloc(bytes), *hc = xmalloc(bytes), *hg = xmalloc(bytes);
    fill(a, n, -8.0f, 8.0f);
    fill(b, n, -2.0f, 2.0f);
    /* swiglu, out aliasing gate */
    float *ac = dbuf(cpu, bytes, a), *bc = dbuf(cpu, bytes, b);
    float *ag = dbuf(gpu, bytes, a), *bg = dbuf(gpu, bytes, b);
    cpu->ops->swiglu(cpu, ac, bc, ac, n);
    gpu->ops->swiglu(gpu, ag, bg, ag, n);
    fetch(cpu, hc, ac, bytes);
    fetch(gpu, hg, ag, bytes);
    compare_rel("swiglu", hg, hc, n, 1e-5, 1e-6);
    /* add: exact */
    cpu->ops->add(cpu, ac, bc, n);
    gpu->ops->add(gpu, ag, bg, n);
    cpu->ops->upload(cpu, ac, a, bytes);
    gpu->ops->upload(gpu, ag, a, bytes);
    cpu->ops->add(cpu, ac, bc, n);
    gpu->ops->add(gpu, ag, bg, n);
    fetch(cpu, hc, ac, bytes);
    fetch(gpu, hg, ag, bytes);
    assert_memory_equal(hg, hc, bytes);
    /* softmax: 7 rows of 10000 */
    cpu->ops->upload(cpu, ac, a, bytes);
    gpu->ops->upload(gpu, ag, a, bytes);
    cpu->ops->softmax(cpu, ac, 7, 10000);
    gpu->ops->softmax(gpu, ag, 7, 10000);
    fetch(cpu, hc, ac, 7 * 10000 * 4);
    fetch(gpu, hg, ag, 7 * 10000 * 4);
    compare_rel("softmax", hg, hc, 7 * 10000, 1e-5, 1e-9);
    /* copy_rows: exact */
    int32_t rows[4] = {6, 0, 3, 3};
    float *dc = dbuf(cpu, 4 * 10000 * 4, NULL), *dg = dbuf(gpu, 4 * 10000 * 4, NULL);
    cpu->ops->copy_rows(cpu, dc, bc, rows, 4, 10000);
    gpu->ops->copy_rows(gpu, dg, bg, rows, 4, 10000);
    fetch(cpu, hc, dc, 4 * 10000 * 4);
    fetch(gpu, hg, dg, 4 * 10000 * 4);
    assert_memory_equal(hg, hc, 4 * 10000 * 4);
    cpu->ops->free(cpu, dc);
    gpu->ops->free(gpu, dg);
    cpu->ops->free(cpu, ac);
    cpu->ops->free(cpu, bc);
    gpu->ops->free(gpu, ag);
    gpu->ops->free(gpu, bg);
    free(a);
    free(b);
    free(hc);
    free(hg);
}

static void test_rope(void **state)
{
    (void)state;
    const uint32_t n_tok = 6, n_head = 3, hd = 64;
    int32_t pos[6] = {0, 1, 17, 511, 4999, 8191};
    int32_t seq[6] = {0};
    struct kernel_batch b = {.n_tok = n_tok, .pos = pos, .seq = seq, .n_seq = 1};
    size_t bytes = (size_t)n_tok * n_head * hd * 4;
    float *x = xmalloc(bytes), *hc = xmalloc(bytes), *hg = xmalloc(bytes);
    static const uint32_t dims[] = {64, 32};
    static const float bases[] = {10000.0f, 500000.0f};
    for (int i = 0; i < 2; i++) {
        fill(x, bytes / 4, -1.0f, 1.0f);
        float *xc = dbuf(cpu, bytes, x), *xg = dbuf(gpu, bytes, x);
        cpu->ops->rope(cpu, xc, &b, n_head, hd, dims[i], bases[i]);
        gpu->ops->rope(gpu, xg, &b, n_head, hd, dims[i], bases[i]);
        fetch(cpu, hc, xc, bytes);
        fetch(gpu, hg, xg, bytes);
        compare_rel("rope", hg, hc, bytes / 4, 0.0, 2e-5);
        cpu->ops->free(cpu, xc);
        gpu->ops->free(gpu, xg);
    }
    free(x);
    free(hc);
    free(hg);
}

/* ---- paged KV cache and attention ---- */

struct att_cfg {
    uint32_t head_dim, block_tokens, n_head, n_kv_head;
};

struct kvpair {
    struct kernel_kv *c, *g;
};

/* Writes K/V of batch b on both backends (random rows) and compares attention of b. */
static void run_step(struct kvpair kv, const struct att_cfg *cf, const struct kernel_batch *b,
                     uint32_t layer)
{
    uint32_t n = b->n_tok, kvd = cf->n_kv_head * cf->head_dim, qd = cf->n_head * cf->head_dim;
    float *k = xmalloc((size_t)n * kvd * 4), *v = xmalloc((size_t)n * kvd * 4);
    float *q = xmalloc((size_t)n * qd * 4);
    fill(k, (size_t)n * kvd, -1.0f, 1.0f);
    fill(v, (size_t)n * kvd, -1.0f, 1.0f);
    fill(q, (size_t)n * qd, -4.0f, 4.0f);
    float *kc = dbuf(cpu, (size_t)n * kvd * 4, k), *vc = dbuf(cpu, (size_t)n * kvd * 4, v);
    float *kg = dbuf(gpu, (size_t)n * kvd * 4, k), *vg = dbuf(gpu, (size_t)n * kvd * 4, v);
    float *qc = dbuf(cpu, (size_t)n * qd * 4, q), *qg = dbuf(gpu, (size_t)n * qd * 4, q);
    float *oc = dbuf(cpu, (size_t)n * qd * 4, NULL), *og = dbuf(gpu, (size_t)n * qd * 4, NULL);
    cpu->ops->kv_write(cpu, kv.c, layer, b, kc, vc);
    gpu->ops->kv_write(gpu, kv.g, layer, b, kg, vg);
    float scale = 1.0f / sqrtf((float)cf->head_dim);
    cpu->ops->attention(cpu, kv.c, layer, b, qc, oc, cf->n_head, scale);
    gpu->ops->attention(gpu, kv.g, layer, b, qg, og, cf->n_head, scale);
    float *hc = xmalloc((size_t)n * qd * 4), *hg = xmalloc((size_t)n * qd * 4);
    fetch(cpu, hc, oc, (size_t)n * qd * 4);
    fetch(gpu, hg, og, (size_t)n * qd * 4);
    /* Rows of a prefill run of ATT_GEMM_MIN (128) or more go through cuBLAS with Q and P
     * rounded to F16: 3e-3 there (outputs are averages of values in [-1, 1]); the kernel's
     * rows: 5e-5. */
    for (uint32_t i = 0; i < n;) {
        uint32_t j = i + 1;
        while (j < n && b->seq[j] == b->seq[i] && b->pos[j] == b->pos[j - 1] + 1)
            j++;
        compare_rel(j - i >= 128 ? "attention(gemm)" : "attention", hg + (size_t)i * qd,
                    hc + (size_t)i * qd, (size_t)(j - i) * qd, 0.0, j - i >= 128 ? 3e-3 : 5e-5);
        i = j;
    }
    cpu->ops->free(cpu, kc);
    cpu->ops->free(cpu, vc);
    cpu->ops->free(cpu, qc);
    cpu->ops->free(cpu, oc);
    gpu->ops->free(gpu, kg);
    gpu->ops->free(gpu, vg);
    gpu->ops->free(gpu, qg);
    gpu->ops->free(gpu, og);
    free(k);
    free(v);
    free(q);
    free(hc);
    free(hg);
}

static void shuffle(int32_t *a, uint32_t n)
{
    for (uint32_t i = n; i > 1; i--) {
        uint32_t j = rng_next() % i;
        int32_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static void test_attention(void **state)
{
    (void)state;
    static const struct att_cfg cfgs[] = {
        {64, 16, 8, 2}, {24, 4, 6, 2}, {128, 16, 12, 2}, {32, 8, 4, 4}};
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        const struct att_cfg *cf = &cfgs[ci];
        const uint32_t n_seq = 3, max_pos = 720;
        uint32_t max_blocks = max_pos / cf->block_tokens + 1;
        uint32_t n_blocks = n_seq * max_blocks + 3;
        struct kernel_kv_desc d = {.n_layer = 2,
                                   .n_kv_head = cf->n_kv_head,
                                   .head_dim = cf->head_dim,
                                   .block_tokens = cf->block_tokens,
                                   .n_blocks = n_blocks,
                                   .dtype = KERNEL_DTYPE_F16};
        struct kvpair kv;
        assert_int_equal(cpu->ops->kv_create(cpu, &d, &kv.c), PW_OK);
        assert_int_equal(gpu->ops->kv_create(gpu, &d, &kv.g), PW_OK);
        /* shuffled physical blocks, distinct per sequence */
        int32_t *perm = xmalloc(n_blocks * 4);
        for (uint32_t i = 0; i < n_blocks; i++)
            perm[i] = (int32_t)i;
        shuffle(perm, n_blocks);
        int32_t *table = xmalloc((size_t)n_seq * max_blocks * 4);
        memcpy(table, perm, (size_t)n_seq * max_blocks * 4);
        int32_t *tok = xmalloc(MAX_TOK * 4), *pos = xmalloc(MAX_TOK * 4),
                *sq = xmalloc(MAX_TOK * 4);
        for (uint32_t layer = 0; layer < 2; layer++) {
            /* step 1: history of seq 1 (0..36) and seq 2 (0..699), in chunks, as prefill */
            uint32_t n = 0;
            for (uint32_t p = 0; p < 37; p++, n++) {
                pos[n] = (int32_t)p;
                sq[n] = 1;
            }
            for (uint32_t p = 0; p < 700; p++, n++) {
                pos[n] = (int32_t)p;
                sq[n] = 2;
            }
            struct kernel_batch b = {.n_tok = n,
                                     .tokens = tok,
                                     .pos = pos,
                                     .seq = sq,
                                     .n_seq = n_seq,
                                     .max_blocks = max_blocks,
                                     .block_table = table};
            run_step(kv, cf, &b, layer);
            /* step 2: seq 0's 20-token prompt, decode rows of seq 1 (37) and seq 2 (700),
             * shuffled together */
            n = 0;
            for (uint32_t p = 0; p < 20; p++, n++) {
                pos[n] = (int32_t)p;
                sq[n] = 0;
            }
            pos[n] = 37;
            sq[n++] = 1;
            pos[n] = 700;
            sq[n++] = 2;
            for (uint32_t i = n; i > 1; i--) {
                uint32_t j = rng_next() % i;
                int32_t tp = pos[i - 1], ts = sq[i - 1];
                pos[i - 1] = pos[j];
                sq[i - 1] = sq[j];
                pos[j] = tp;
                sq[j] = ts;
            }
            b.n_tok = n;
            run_step(kv, cf, &b, layer);
            /* step 3: one decode row alone (the split path of the long sequence) */
            pos[0] = 701;
            sq[0] = 2;
            b.n_tok = 1;
            run_step(kv, cf, &b, layer);
        }
        cpu->ops->kv_destroy(cpu, kv.c);
        gpu->ops->kv_destroy(gpu, kv.g);
        free(perm);
        free(table);
        free(tok);
        free(pos);
        free(sq);
    }
}

/* ---- topk ---- */

static uint32_t key_of(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    if (isnan(v))
        return 0x007ffffeu;
    if (v == 0.0f)
        return 0x80000000u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static const float *g_ref_row; /* qsort's context: the tests run one at a time */

static int by_key_desc(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    uint32_t ki = key_of(g_ref_row[i]), kj = key_of(g_ref_row[j]);
    if (ki != kj)
        return ki > kj ? -1 : 1;
    return i < j ? -1 : i > j;
}

static void test_topk(void **state)
{
    (void)state;
    static const uint32_t ns[] = {64, 1000, 49152};
    static const uint32_t ks[] = {1, 7, 64};
    const uint32_t rows = 6;
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        uint32_t n = ns[ni];
        float *x = xmalloc((size_t)rows * n * 4);
        for (uint32_t r = 0; r < rows; r++) {
            float *row = x + (size_t)r * n;
            for (uint32_t i = 0; i < n; i++) {
                switch (r) {
                case 0: /* distinct-ish values */
                    row[i] = rnd(-20.0f, 20.0f);
                    break;
                case 1: /* few levels: many ties, lower index first */
                    row[i] = (float)(rng_next() % 5);
                    break;
                case 2: /* all equal */
                    row[i] = 1.5f;
                    break;
                case 3: /* -inf and NaN mixed in, negative values */
                    row[i] = i % 7 == 0 ? -INFINITY : i % 11 == 0 ? NAN : rnd(-3.0f, -1.0f);
                    break;
                case 4: /* all -inf but one */
                    row[i] = i == n / 2 ? 0.25f : -INFINITY;
                    break;
                default: /* large magnitudes: the log-sum-exp must not overflow */
                    row[i] = rnd(-1000.0f, 1000.0f);
                    break;
                }
            }
        }
        float *xg = dbuf(gpu, (size_t)rows * n * 4, x);
        int32_t *order = xmalloc(n * 4);
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
            uint32_t k = ks[ki];
            if (k > n)
                continue;
            float vals[6 * KERNEL_TOPK_MAX], lse[6];
            int32_t idx[6 * KERNEL_TOPK_MAX];
            gpu->ops->topk(gpu, xg, rows, n, k, vals, idx, lse);
            assert_int_equal(gpu->ops->sync(gpu), PW_OK);
            for (uint32_t r = 0; r < rows; r++) {
                const float *row = x + (size_t)r * n;
                for (uint32_t i = 0; i < n; i++)
                    order[i] = (int32_t)i;
                g_ref_row = row;
                qsort(order, n, sizeof(int32_t), by_key_desc);
                for (uint32_t j = 0; j < k; j++) {
                    int32_t want = order[j];
                    if (idx[r * k + j] != want || key_of(vals[r * k + j]) != key_of(row[want])) {
                        fprintf(stderr,
                                "topk n=%u k=%u row %u rank %u: got %d (%g), want %d (%g)\n", n, k,
                                r, j, idx[r * k + j], vals[r * k + j], want, row[want]);
                        fail();
                    }
                }
                double mx = -INFINITY, sum = 0.0;
                for (uint32_t i = 0; i < n; i++)
                    if (!isnan(row[i]) && row[i] > mx)
                        mx = row[i];
                for (uint32_t i = 0; i < n; i++)
                    if (!isnan(row[i]) && row[i] > -INFINITY)
                        sum += exp((double)row[i] - mx);
                double want_lse = mx + log(sum);
                if (!(fabs(lse[r] - want_lse) <= 1e-5 * fmax(1.0, fabs(want_lse)))) {
                    fprintf(stderr, "topk lse n=%u row %u: got %g want %g\n", n, r, lse[r],
                            want_lse);
                    fail();
                }
            }
        }
        gpu->ops->free(gpu, xg);
        free(order);
        free(x);
    }
}

/* ---- step recording ---- */

/*
 * A small step of batch-reading ops (embed, rope, kv_write, attention, copy_rows) issued
 * through step_begin/step_end on the GPU and eagerly on the CPU, over several steps: the
 * first of a shape is recorded, the next ones of that shape must be replays, and every
 * step's output must match the CPU's even though positions, tokens, sequences and logit
 * rows change between replays.
 */
static void test_step_record(void **state)
{
    (void)state;
    const uint32_t hd = 64, nh = 2, dim = hd * nh, vocab = 100, n_seq = 4, bt = 16;
    const uint32_t max_blocks = 16, n_blocks = n_seq * max_blocks;
    float *emb = xmalloc((size_t)vocab * dim * 4);
    fill(emb, (size_t)vocab * dim, -1.0f, 1.0f);
    struct wpair w = wcreate(KERNEL_DTYPE_F32, vocab, dim, emb);
    struct kernel_kv_desc d = {.n_layer = 1,
                               .n_kv_head = nh,
                               .head_dim = hd,
                               .block_tokens = bt,
                               .n_blocks = n_blocks,
                               .dtype = KERNEL_DTYPE_F16};
    struct kvpair kv;
    assert_int_equal(cpu->ops->kv_create(cpu, &d, &kv.c), PW_OK);
    assert_int_equal(gpu->ops->kv_create(gpu, &d, &kv.g), PW_OK);
    int32_t table[4 * 16];
    for (uint32_t i = 0; i < n_seq * max_blocks; i++)
        table[i] = (int32_t)(n_blocks - 1 - i);
    size_t bytes = (size_t)MAX_TOK * dim * 4;
    float *xc = dbuf(cpu, bytes, NULL), *oc = dbuf(cpu, bytes, NULL), *rc = dbuf(cpu, bytes, NULL);
    float *xg = dbuf(gpu, bytes, NULL), *og = dbuf(gpu, bytes, NULL), *rg = dbuf(gpu, bytes, NULL);
    float *hc = xmalloc(bytes), *hg = xmalloc(bytes);
    int32_t tok[128], pos[128], sq[128], rows[128];
    uint32_t len[4] = {0, 0, 0, 0}; /* tokens in the cache per sequence */
    /* steps: rows per step; 70 rows (prefill, eager), then decode shapes 4, 4, 4, 2, 4, 2 */
    static const uint32_t steps[] = {70, 4, 4, 4, 2, 4, 2};
    static const enum kernel_step want[] = {
        KERNEL_STEP_EAGER,  KERNEL_STEP_RECORD,   KERNEL_STEP_REPLAYED, KERNEL_STEP_REPLAYED,
        KERNEL_STEP_RECORD, KERNEL_STEP_REPLAYED, KERNEL_STEP_REPLAYED};
    for (size_t si = 0; si < sizeof steps / sizeof steps[0]; si++) {
        uint32_t n = steps[si], n_rows = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t s = n == 70 ? i % n_seq : (i + (uint32_t)si) % n_seq;
            sq[i] = (int32_t)s;
            pos[i] = (int32_t)len[s]++;
            tok[i] = (int32_t)(rng_next() % vocab);
        }
        for (uint32_t i = 0; i < n; i += 2) /* every other row's output, varying by step */
            rows[n_rows++] = (int32_t)((i + si) % n);
        struct kernel_batch b = {.n_tok = n,
                                 .tokens = tok,
                                 .pos = pos,
                                 .seq = sq,
                                 .n_seq = n_seq,
                                 .max_blocks = max_blocks,
                                 .block_table = table};
        for (int be_i = 0; be_i < 2; be_i++) {
            struct kernel_backend *be = be_i ? gpu : cpu;
            struct kernel_kv *c = be_i ? kv.g : kv.c;
            float *x = be_i ? xg : xc, *o = be_i ? og : oc, *r = be_i ? rg : rc;
            const struct kernel_weight *wt = be_i ? w.g : w.c;
            enum kernel_step st = KERNEL_STEP_EAGER;
            if (be_i) {
                st = be->ops->step_begin(be, c, &b, rows, n_rows);
                assert_int_equal(st, want[si]);
            }
            if (st != KERNEL_STEP_REPLAYED) {
                be->ops->embed(be, wt, &b, x);
                be->ops->rope(be, x, &b, nh, hd, hd, 10000.0f);
                be->ops->kv_write(be, c, 0, &b, x, x);
                be->ops->attention(be, c, 0, &b, x, o, nh, 0.125f);
                be->ops->copy_rows(be, r, o, rows, n_rows, dim);
                if (st == KERNEL_STEP_RECORD)
                    assert_int_equal(be->ops->step_end(be), PW_OK);
            }
        }
        fetch(cpu, hc, rc, (size_t)n_rows * dim * 4);
        fetch(gpu, hg, rg, (size_t)n_rows * dim * 4);
        compare_rel("step_record", hg, hc, (size_t)n_rows * dim, 0.0, 5e-5);
    }
    cpu->ops->free(cpu, xc);
    cpu->ops->free(cpu, oc);
    cpu->ops->free(cpu, rc);
    gpu->ops->free(gpu, xg);
    gpu->ops->free(gpu, og);
    gpu->ops->free(gpu, rg);
    cpu->ops->kv_destroy(cpu, kv.c);
    gpu->ops->kv_destroy(gpu, kv.g);
    wdestroy(w);
    free(emb);
    free(hc);
    free(hg);
}

static void test_weight_create_rejects(void **state)
{
    (void)state;
    struct kernel_weight *w = NULL;
    uint8_t buf[64] = {0};
    assert_int_equal(gpu->ops->weight_create(gpu, (enum kernel_dtype)7, 1, 32, buf, &w),
                     PW_ERR_UNSUPPORTED);
    assert_int_equal(gpu->ops->weight_create(gpu, KERNEL_DTYPE_Q8_0, 1, 33, buf, &w), PW_ERR_INVAL);
    assert_null(w);
    assert_true(gpu->ops->caps(gpu) & KERNEL_CAP_DEVICE_MEMORY);
    assert_int_equal(gpu->ops->sync(gpu), PW_OK);
}

static int group_setup(void **state)
{
    (void)state;
    if (kernel_cpu_create(2, &cpu) != PW_OK)
        return -1;
    struct kernel_cuda_opts o = {.device = 0};
    if (kernel_cuda_create(&o, &gpu) != PW_OK)
        return -1;
    if (cpu->ops->reserve(cpu, MAX_TOK, MAX_COLS) || gpu->ops->reserve(gpu, MAX_TOK, MAX_COLS))
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (gpu)
        gpu->ops->destroy(gpu);
    if (cpu)
        cpu->ops->destroy(cpu);
    return 0;
}

int main(void)
{
    if (kernel_cuda_device_count() == 0) {
        fprintf(stderr, "test_cuda_ops: no CUDA device: skipped\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_embed),        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_group), cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_elementwise),  cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),    cmocka_unit_test(test_topk),
        cmocka_unit_test(test_step_record),  cmocka_unit_test(test_weight_create_rejects),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

#endif

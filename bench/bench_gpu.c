/*
 * bench_gpu: the CUDA backend on one GGUF model, driven through engine_model_forward (no
 * scheduler, no Redis). Two modes; each prints a few lines, then one JSON line per result.
 *
 *   bench_gpu compare MODEL [--prompt N] [--steps N] [--dump PREFIX] [--max-rel X]
 *                           [--min-top1 F]
 *     CPU and CUDA backends on the same model: a prompt of N fixed tokens, then N steps of
 *     greedy decoding teacher-forced with the CPU's choice. Per step: relative error
 *     max|cuda - cpu| / max|cpu| of the logits and top-1 agreement. Exit 1 when the worst
 *     relative error is above --max-rel (default 0.05) or the agreement below --min-top1
 *     (default 0.9). --dump writes PREFIX.tokens (the token ids, comma-separated) and
 *     PREFIX.f32 (the CUDA logits of each step, [steps + 1][n_vocab] float32) for
 *     tests/gpu/hf_compare.py.
 *
 *   bench_gpu bench MODEL [--batches 1,8,32,64] [--ctx N] [--prefill N] [--reps N]
 *                         [--full-logits]
 *     Decode tokens/s at each batch size (every sequence at position --ctx, default 512,
 *     over a zeroed cache: attention still reads ctx keys; each row's next token chosen on
 *     the device as a greedy sampler does, or with --full-logits every logit row copied
 *     to the host as a host-side sampler needs), and prefill tokens/s of one
 *     --prefill-token prompt (default 2048). Each is also printed as a fraction of its
 *     bound, measured on the device first: decode, the bytes a step must read (weights
 *     plus the batch's KV) over the copy bandwidth; prefill, its FLOPs over the cuBLAS
 *     BF16 GEMM rate.
 *
 *   bench_gpu profile MODEL [--batches 1,64] [--ctx N] [--prefill N]
 *     Where a step's time goes: the ops run eagerly through a wrapper backend that syncs
 *     around each, for decode at each batch size (the decode matrix-vector kernel with its
 *     rows per warp chosen per launch, then forced to 4 and to 1) and one prefill; per op
 *     and per matmul shape (GB/s).
 *
 * Built without the CUDA backend it prints one line and exits 77.
 */
#include <stdio.h>
#include <stdlib.h>

#ifndef PW_HAVE_CUDA
int main(void)
{
    fprintf(stderr, "bench_gpu: built without the CUDA backend\n");
    return 77;
}
#else

#include <getopt.h>
#include <math.h>
#include <string.h>

#include "engine_model.h"
#include "kernel.h"
#include "kernel_cuda.h"
#include "pw_clock.h"
#include "pw_log.h"

#define BT 16 /* KV block tokens */

struct runner {
    struct kernel_backend *be;
    struct engine_model *m;
    const struct engine_hparams *hp;
    uint32_t n_seq;
    uint32_t max_blocks;
    int32_t *table; /* [n_seq][max_blocks], sequential blocks */
    int32_t *tokens, *pos, *seq, *rows;
    float *logits;  /* [max_logits][n_vocab] */
    float *top_val; /* [max_logits]: the device's top-1 (greedy decoding) */
    int32_t *top_idx;
};

static int runner_open(struct runner *r, struct kernel_backend *be, const char *path,
                       uint32_t max_tok, uint32_t max_logits, uint32_t n_seq, uint32_t n_ctx)
{
    memset(r, 0, sizeof(*r));
    r->be = be;
    r->n_seq = n_seq;
    r->max_blocks = (n_ctx + BT - 1) / BT;
    struct engine_model_opts mo = {.max_tok = max_tok,
                                   .max_logits = max_logits,
                                   .n_ctx = n_ctx,
                                   .block_tokens = BT,
                                   .n_kv_blocks = n_seq * r->max_blocks};
    char err[256];
    enum pw_err e = engine_model_load(path, be, &mo, &r->m, err, sizeof err);
    if (e) {
        fprintf(stderr, "bench_gpu: %s: %s\n", path, err);
        return -1;
    }
    r->hp = engine_model_hparams(r->m);
    r->table = malloc((size_t)n_seq * r->max_blocks * sizeof(int32_t));
    r->tokens = malloc(max_tok * sizeof(int32_t));
    r->pos = malloc(max_tok * sizeof(int32_t));
    r->seq = malloc(max_tok * sizeof(int32_t));
    r->rows = malloc(max_tok * sizeof(int32_t));
    r->logits = malloc((size_t)max_logits * r->hp->n_vocab * sizeof(float));
    r->top_val = malloc(max_logits * sizeof(float));
    r->top_idx = malloc(max_logits * sizeof(int32_t));
    if (!r->table || !r->tokens || !r->pos || !r->seq || !r->rows || !r->logits || !r->top_val ||
        !r->top_idx) {
        fprintf(stderr, "bench_gpu: out of memory\n");
        return -1;
    }
    for (size_t i = 0; i < (size_t)n_seq * r->max_blocks; i++)
        r->table[i] = (int32_t)i;
    return 0;
}

static void runner_close(struct runner *r)
{
    engine_model_destroy(r->m);
    free(r->table);
    free(r->tokens);
    free(r->pos);
    free(r->seq);
    free(r->rows);
    free(r->logits);
    free(r->top_val);
    free(r->top_idx);
    memset(r, 0, sizeof(*r));
}

/*
 * One step over n rows already in r->tokens/pos/seq; logits of rows [n - n_logits, n):
 * whole rows into r->logits, or with top1 only each row's best token (chosen on the
 * device, as a greedy sampler would) into r->top_idx.
 */
static void runner_step_mode(struct runner *r, uint32_t n, uint32_t n_logits, bool top1)
{
    struct kernel_batch b = {.n_tok = n,
                             .tokens = r->tokens,
                             .pos = r->pos,
                             .seq = r->seq,
                             .n_seq = r->n_seq,
                             .max_blocks = r->max_blocks,
                             .block_table = r->table};
    for (uint32_t i = 0; i < n_logits; i++)
        r->rows[i] = (int32_t)(n - n_logits + i);
    if (top1)
        engine_model_forward_topk(r->m, &b, r->rows, n_logits, 1, r->top_val, r->top_idx, NULL);
    else
        engine_model_forward(r->m, &b, r->rows, n_logits, r->logits);
}

static void runner_step(struct runner *r, uint32_t n, uint32_t n_logits)
{
    runner_step_mode(r, n, n_logits, false);
}

static uint32_t argmax(const float *v, uint32_t n)
{
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

static int32_t prompt_token(uint32_t i, uint32_t n_vocab)
{
    return (int32_t)(3 + (i * 2654435761u) % (n_vocab - 3));
}

/* ---- compare ---- */

static int run_compare(const char *path, uint32_t n_prompt, uint32_t steps, const char *dump,
                       double max_rel_ok, double min_top1)
{
    struct kernel_backend *cpu = NULL, *gpu = NULL;
    struct runner rc, rg;
    int rv = 1;
    FILE *fl = NULL;
    uint32_t n_ctx = n_prompt + steps + 1;
    if (kernel_cpu_create(0, &cpu) || kernel_cuda_create(NULL, &gpu)) {
        fprintf(stderr, "bench_gpu: cannot create the backends\n");
        goto out_be;
    }
    if (runner_open(&rc, cpu, path, n_prompt, 1, 1, n_ctx) ||
        runner_open(&rg, gpu, path, n_prompt, 1, 1, n_ctx))
        goto out_be;
    uint32_t nv = rc.hp->n_vocab;
    int32_t *seqtok = malloc((n_prompt + steps + 1) * sizeof(int32_t));
    if (!seqtok)
        goto out;
    if (dump) {
        char fn[1024];
        snprintf(fn, sizeof fn, "%s.f32", dump);
        fl = fopen(fn, "wb");
        if (!fl) {
            perror(fn);
            goto out;
        }
    }
    double worst = 0.0;
    uint32_t agree = 0, topk_bad = 0;
    uint64_t t_cpu = 0, t_gpu = 0;
    for (uint32_t s = 0; s <= steps; s++) {
        uint32_t n = s == 0 ? n_prompt : 1;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t p = s == 0 ? i : n_prompt + s - 1;
            if (s == 0)
                seqtok[p] = prompt_token(i, nv);
            rc.tokens[i] = rg.tokens[i] = seqtok[p];
            rc.pos[i] = rg.pos[i] = (int32_t)p;
            rc.seq[i] = rg.seq[i] = 0;
        }
        uint64_t t0 = pw_clock_mono_ns();
        runner_step(&rc, n, 1);
        uint64_t t1 = pw_clock_mono_ns();
        runner_step(&rg, n, 1);
        uint64_t t2 = pw_clock_mono_ns();
        t_cpu += t1 - t0;
        t_gpu += t2 - t1;
        if (gpu->ops->sync(gpu)) {
            fprintf(stderr, "bench_gpu: CUDA error at step %u\n", s);
            goto out;
        }
        double mx = 0.0, md = 0.0;
        for (uint32_t v = 0; v < nv; v++) {
            mx = fmax(mx, fabs(rc.logits[v]));
            md = fmax(md, fabs((double)rg.logits[v] - rc.logits[v]));
            if (isnan(rg.logits[v]))
                md = INFINITY;
        }
        double rel = mx > 0 ? md / mx : md;
        worst = fmax(worst, rel);
        uint32_t ac = argmax(rc.logits, nv), ag = argmax(rg.logits, nv);
        agree += ac == ag;
        /* the device's top-1 must be the host's argmax of the same logits, exactly */
        if (engine_model_has_topk(rg.m)) {
            float tv;
            int32_t ti;
            gpu->ops->topk(gpu, engine_model_logits_device(rg.m), 1, nv, 1, &tv, &ti, NULL);
            if (ti != (int32_t)ag || tv != rg.logits[ag]) {
                fprintf(stderr, "bench_gpu: step %u: device top-1 %d (%g) != argmax %u (%g)\n", s,
                        ti, tv, ag, rg.logits[ag]);
                topk_bad++;
            }
        }
        seqtok[n_prompt + s] = (int32_t)ac; /* teacher forcing with the CPU's choice */
        if (fl && fwrite(rg.logits, sizeof(float), nv, fl) != nv) {
            fprintf(stderr, "bench_gpu: short write\n");
            goto out;
        }
    }
    if (dump) {
        char fn[1024];
        snprintf(fn, sizeof fn, "%s.tokens", dump);
        FILE *ft = fopen(fn, "w");
        if (!ft) {
            perror(fn);
            goto out;
        }
        /* the tokens that were fed: prompt, then the step inputs (the last choice is not) */
        for (uint32_t i = 0; i < n_prompt + steps; i++)
            fprintf(ft, "%s%d", i ? "," : "", seqtok[i]);
        fprintf(ft, "\n%u\n", n_prompt);
        fclose(ft);
    }
    double top1 = (double)agree / (steps + 1);
    bool ok = worst <= max_rel_ok && top1 >= min_top1 && topk_bad == 0;
    printf("compare: prompt=%u steps=%u max_rel=%.3g top1=%u/%u topk_bad=%u cpu_ms=%.0f "
           "cuda_ms=%.0f %s\n",
           n_prompt, steps + 1, worst, agree, steps + 1, topk_bad, (double)t_cpu / 1e6,
           (double)t_gpu / 1e6, ok ? "PASS" : "FAIL");
    printf("{\"bench\":\"gpu_compare\",\"model\":\"%s\",\"steps\":%u,\"max_rel\":%.4g,"
           "\"top1\":%.4f,\"pass\":%s}\n",
           path, steps + 1, worst, top1, ok ? "true" : "false");
    rv = ok ? 0 : 1;
out:
    if (fl)
        fclose(fl);
    free(seqtok);
    runner_close(&rc);
    runner_close(&rg);
out_be:
    if (gpu)
        gpu->ops->destroy(gpu);
    if (cpu)
        cpu->ops->destroy(cpu);
    return rv;
}

/* ---- profile: a backend that wraps the CUDA one and times every op ---- */

/*
 * Each timed op is issued after a sync and followed by one, so its wall time is its GPU
 * time plus one launch and one sync (a few microseconds: only large ops read true).
 * Matmuls are also kept per weight shape with the bytes they read, for GB/s.
 */
enum prof_op {
    P_EMBED,
    P_RMSNORM,
    P_MATMUL,
    P_ROPE,
    P_SWIGLU,
    P_ADD,
    P_SOFTMAX,
    P_COPY_ROWS,
    P_KV_WRITE,
    P_ATTENTION,
    P_TOPK,
    P_N
};
static const char *const prof_names[P_N] = {"embed",    "rmsnorm",   "matmul",  "rope",
                                            "swiglu",   "add",       "softmax", "copy_rows",
                                            "kv_write", "attention", "topk"};
#define PROF_SHAPES 16

struct prof_be {
    struct kernel_backend base; /* must be first */
    struct kernel_ops ops;
    struct kernel_backend *in;
    double ms[P_N];
    uint64_t calls[P_N];
    struct {
        uint32_t n_out, n_in, n_tok;
        double ms, bytes;
        uint64_t calls;
    } mm[PROF_SHAPES];
    int n_mm;
};

static struct prof_be *prof_of(struct kernel_backend *be)
{
    return (struct prof_be *)be;
}

static uint64_t prof_t0(struct prof_be *p)
{
    p->in->ops->sync(p->in);
    return pw_clock_mono_ns();
}

static void prof_t1(struct prof_be *p, enum prof_op op, uint64_t t0)
{
    p->in->ops->sync(p->in);
    p->ms[op] += (double)(pw_clock_mono_ns() - t0) / 1e6;
    p->calls[op]++;
}

static const char *pw_name(const struct kernel_backend *be)
{
    return ((const struct prof_be *)be)->in->ops->name(((const struct prof_be *)be)->in);
}
static uint32_t pw_caps(const struct kernel_backend *be)
{
    return ((const struct prof_be *)be)->in->ops->caps(((const struct prof_be *)be)->in);
}
static void pw_destroy(struct kernel_backend *be)
{
    (void)be; /* the inner backend is destroyed by its owner */
}
#define PIN(be) (prof_of(be)->in)
static enum pw_err pw_reserve(struct kernel_backend *be, uint32_t a, uint32_t b)
{
    return PIN(be)->ops->reserve(PIN(be), a, b);
}
static enum pw_err pw_alloc(struct kernel_backend *be, size_t n, void **out)
{
    return PIN(be)->ops->alloc(PIN(be), n, out);
}
static void pw_free(struct kernel_backend *be, void *ptr)
{
    PIN(be)->ops->free(PIN(be), ptr);
}
static void pw_upload(struct kernel_backend *be, void *d, const void *s, size_t n)
{
    PIN(be)->ops->upload(PIN(be), d, s, n);
}
static void pw_download(struct kernel_backend *be, void *d, const void *s, size_t n)
{
    PIN(be)->ops->download(PIN(be), d, s, n);
}
static enum pw_err pw_sync(struct kernel_backend *be)
{
    return PIN(be)->ops->sync(PIN(be));
}
static enum pw_err pw_weight_create(struct kernel_backend *be, enum kernel_dtype t, uint32_t o,
                                    uint32_t i, const void *d, struct kernel_weight **out)
{
    return PIN(be)->ops->weight_create(PIN(be), t, o, i, d, out);
}
static void pw_weight_destroy(struct kernel_backend *be, struct kernel_weight *w)
{
    PIN(be)->ops->weight_destroy(PIN(be), w);
}
static enum pw_err pw_kv_create(struct kernel_backend *be, const struct kernel_kv_desc *d,
                                struct kernel_kv **out)
{
    return PIN(be)->ops->kv_create(PIN(be), d, out);
}
static void pw_kv_destroy(struct kernel_backend *be, struct kernel_kv *kv)
{
    PIN(be)->ops->kv_destroy(PIN(be), kv);
}
static void pw_embed(struct kernel_backend *be, const struct kernel_weight *t,
                     const struct kernel_batch *b, float *out)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->embed(PIN(be), t, b, out);
    prof_t1(prof_of(be), P_EMBED, t0);
}
static void pw_rmsnorm(struct kernel_backend *be, const float *x, const struct kernel_weight *w,
                       float *y, uint32_t n_tok, uint32_t n, float eps)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->rmsnorm(PIN(be), x, w, y, n_tok, n, eps);
    prof_t1(prof_of(be), P_RMSNORM, t0);
}
static void pw_matmul(struct kernel_backend *be, const float *x, uint32_t n_tok,
                      const struct kernel_mm *mm, uint32_t n_mm)
{
    struct prof_be *p = prof_of(be);
    for (uint32_t i = 0; i < n_mm; i++) { /* one product at a time, for per-shape figures */
        uint64_t t0 = prof_t0(p);
        PIN(be)->ops->matmul(PIN(be), x, n_tok, &mm[i], 1);
        prof_t1(p, P_MATMUL, t0);
        double ms = (double)(pw_clock_mono_ns() - t0) / 1e6;
        const struct kernel_weight_info *wi = &mm[i].w->info;
        int k;
        for (k = 0; k < p->n_mm; k++)
            if (p->mm[k].n_out == wi->n_out && p->mm[k].n_in == wi->n_in && p->mm[k].n_tok == n_tok)
                break;
        if (k == p->n_mm && p->n_mm < PROF_SHAPES) {
            p->mm[k].n_out = wi->n_out;
            p->mm[k].n_in = wi->n_in;
            p->mm[k].n_tok = n_tok;
            p->n_mm++;
        }
        if (k < p->n_mm) {
            p->mm[k].ms += ms;
            p->mm[k].bytes += (double)kernel_dtype_row_bytes(wi->dtype, wi->n_in) * wi->n_out;
            p->mm[k].calls++;
        }
    }
}
static void pw_rope(struct kernel_backend *be, float *x, const struct kernel_batch *b, uint32_t nh,
                    uint32_t hd, uint32_t rd, float base)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->rope(PIN(be), x, b, nh, hd, rd, base);
    prof_t1(prof_of(be), P_ROPE, t0);
}
static void pw_swiglu(struct kernel_backend *be, const float *g, const float *u, float *o, size_t n)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->swiglu(PIN(be), g, u, o, n);
    prof_t1(prof_of(be), P_SWIGLU, t0);
}
static void pw_add(struct kernel_backend *be, float *y, const float *x, size_t n)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->add(PIN(be), y, x, n);
    prof_t1(prof_of(be), P_ADD, t0);
}
static void pw_softmax(struct kernel_backend *be, float *x, uint32_t r, uint32_t n)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->softmax(PIN(be), x, r, n);
    prof_t1(prof_of(be), P_SOFTMAX, t0);
}
static void pw_copy_rows(struct kernel_backend *be, float *d, const float *s, const int32_t *rows,
                         uint32_t n, uint32_t len)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->copy_rows(PIN(be), d, s, rows, n, len);
    prof_t1(prof_of(be), P_COPY_ROWS, t0);
}
static void pw_kv_write(struct kernel_backend *be, struct kernel_kv *kv, uint32_t l,
                        const struct kernel_batch *b, const float *k, const float *v)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->kv_write(PIN(be), kv, l, b, k, v);
    prof_t1(prof_of(be), P_KV_WRITE, t0);
}
static void pw_attention(struct kernel_backend *be, const struct kernel_kv *kv, uint32_t l,
                         const struct kernel_batch *b, const float *q, float *o, uint32_t nh,
                         float scale)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->attention(PIN(be), kv, l, b, q, o, nh, scale);
    prof_t1(prof_of(be), P_ATTENTION, t0);
}
static void pw_topk(struct kernel_backend *be, const float *x, uint32_t r, uint32_t n, uint32_t k,
                    float *v, int32_t *i, float *lse)
{
    uint64_t t0 = prof_t0(prof_of(be));
    PIN(be)->ops->topk(PIN(be), x, r, n, k, v, i, lse);
    prof_t1(prof_of(be), P_TOPK, t0);
}
#undef PIN

static void prof_init(struct prof_be *p, struct kernel_backend *in)
{
    memset(p, 0, sizeof(*p));
    p->in = in;
    p->ops = (struct kernel_ops){.name = pw_name,
                                 .caps = pw_caps,
                                 .destroy = pw_destroy,
                                 .reserve = pw_reserve,
                                 .alloc = pw_alloc,
                                 .free = pw_free,
                                 .upload = pw_upload,
                                 .download = pw_download,
                                 .sync = pw_sync,
                                 .weight_create = pw_weight_create,
                                 .weight_destroy = pw_weight_destroy,
                                 .kv_create = pw_kv_create,
                                 .kv_destroy = pw_kv_destroy,
                                 .embed = pw_embed,
                                 .rmsnorm = pw_rmsnorm,
                                 .matmul = pw_matmul,
                                 .rope = pw_rope,
                                 .swiglu = pw_swiglu,
                                 .add = pw_add,
                                 .softmax = pw_softmax,
                                 .copy_rows = pw_copy_rows,
                                 .kv_write = pw_kv_write,
                                 .attention = pw_attention,
                                 .topk = pw_topk};
    p->base.ops = &p->ops;
}

static void prof_reset(struct prof_be *p)
{
    memset(p->ms, 0, sizeof p->ms);
    memset(p->calls, 0, sizeof p->calls);
    memset(p->mm, 0, sizeof p->mm);
    p->n_mm = 0;
}

static void prof_print(const struct prof_be *p, const char *what, int steps)
{
    double total = 0;
    for (int i = 0; i < P_N; i++)
        total += p->ms[i];
    printf("profile %s: %.3f ms/step in ops (each op synced: small ops read high)\n", what,
           total / steps);
    for (int i = 0; i < P_N; i++)
        if (p->calls[i])
            printf("  %-10s %8.3f ms/step %5.1f%%  %6.1f calls/step\n", prof_names[i],
                   p->ms[i] / steps, 100.0 * p->ms[i] / total, (double)p->calls[i] / steps);
    for (int k = 0; k < p->n_mm; k++)
        printf("  matmul %6u x %-6u n_tok=%-5u %8.3f ms/step  %7.0f GB/s of weights\n",
               p->mm[k].n_out, p->mm[k].n_in, p->mm[k].n_tok, p->mm[k].ms / steps,
               p->mm[k].bytes / (p->mm[k].ms / 1e3) / 1e9);
}

static int run_profile(const char *path, const uint32_t *batches, int n_batches, uint32_t ctx,
                       uint32_t prefill)
{
    struct kernel_backend *gpu = NULL;
    struct prof_be prof;
    struct runner r;
    uint32_t max_b = 1;
    int rv = 1;
    for (int i = 0; i < n_batches; i++)
        max_b = batches[i] > max_b ? batches[i] : max_b;
    if (kernel_cuda_create(NULL, &gpu)) {
        fprintf(stderr, "bench_gpu: no CUDA backend\n");
        return 1;
    }
    prof_init(&prof, gpu);
    uint32_t n_ctx = ctx + 16 > prefill ? ctx + 16 : prefill;
    if (runner_open(&r, &prof.base, path, max_b > prefill ? max_b : prefill, max_b, max_b, n_ctx))
        goto out_be;
    const int steps = 5;
    static const int row_modes[] = {0, 4, 1}; /* per-launch choice, then forced */
    for (size_t mi = 0; mi < sizeof row_modes / sizeof row_modes[0]; mi++) {
        int rows = row_modes[mi];
        kernel_cuda_set_gemv_rows(rows);
        for (int bi = 0; bi < n_batches; bi++) {
            uint32_t B = batches[bi];
            if (rows != 0 && B > 8)
                continue; /* the rows-per-warp choice matters only to the gemv path */
            for (int s = 0; s < steps + 1; s++) {
                if (s == 1)
                    prof_reset(&prof);
                for (uint32_t i = 0; i < B; i++) {
                    r.tokens[i] = prompt_token(i + (uint32_t)s, r.hp->n_vocab);
                    r.pos[i] = (int32_t)(ctx + (uint32_t)s);
                    r.seq[i] = (int32_t)i;
                }
                runner_step_mode(&r, B, B, true);
            }
            char what[64];
            if (rows)
                snprintf(what, sizeof what, "decode batch=%u gemv_rows=%d", B, rows);
            else
                snprintf(what, sizeof what, "decode batch=%u gemv_rows=auto", B);
            prof_print(&prof, what, steps);
        }
    }
    kernel_cuda_set_gemv_rows(0);
    if (prefill) {
        for (int rep = 0; rep < 2; rep++) {
            if (rep == 1)
                prof_reset(&prof);
            for (uint32_t i = 0; i < prefill; i++) {
                r.tokens[i] = prompt_token(i * 7, r.hp->n_vocab);
                r.pos[i] = (int32_t)i;
                r.seq[i] = 0;
            }
            runner_step(&r, prefill, 1);
        }
        char what[64];
        snprintf(what, sizeof what, "prefill %u tokens", prefill);
        prof_print(&prof, what, 1);
    }
    rv = gpu->ops->sync(gpu) ? 1 : 0;
    runner_close(&r);
out_be:
    gpu->ops->destroy(gpu);
    return rv;
}

/* ---- bench ---- */

static double dtype_bytes(uint32_t t)
{
    return (double)kernel_dtype_row_bytes((enum kernel_dtype)t, 32) / 32.0;
}

static int run_bench(const char *path, const uint32_t *batches, int n_batches, uint32_t ctx,
                     uint32_t prefill, int reps, bool full_logits)
{
    struct kernel_backend *gpu = NULL;
    struct runner r;
    int rv = 1;
    uint32_t max_b = 1;
    for (int i = 0; i < n_batches; i++)
        max_b = batches[i] > max_b ? batches[i] : max_b;
    uint32_t n_ctx = ctx + (uint32_t)reps + 8 > prefill ? ctx + (uint32_t)reps + 8 : prefill;
    if (kernel_cuda_create(NULL, &gpu)) {
        fprintf(stderr, "bench_gpu: no CUDA backend\n");
        return 1;
    }
    double bw = 0, tf = 0;
    if (kernel_cuda_probe_bandwidth(gpu, &bw) || kernel_cuda_probe_gemm(gpu, &tf))
        goto out_be;
    printf("device: copy %.0f GB/s, cuBLAS bf16 GEMM %.0f TFLOP/s\n", bw, tf);
    printf("{\"bench\":\"gpu_device\",\"copy_gbps\":%.1f,\"gemm_tflops\":%.1f}\n", bw, tf);
    if (runner_open(&r, gpu, path, max_b > prefill ? max_b : prefill, max_b, max_b, n_ctx))
        goto out_be;
    const struct engine_hparams *hp = r.hp;
    double kvd = (double)hp->n_head_kv * hp->head_dim, qd = (double)hp->n_head * hp->head_dim;
    double layer_params =
        hp->n_embd * (qd + 2 * kvd) + qd * hp->n_embd + 3.0 * hp->n_embd * hp->n_ff;
    double head_params = (double)hp->n_embd * hp->n_vocab;
    double wbytes = (layer_params * hp->n_layer + head_params) * dtype_bytes(hp->weight_type);
    printf("model: %s layers=%u embd=%u ff=%u vocab=%u weights=%s step_weight_mib=%.0f\n", path,
           hp->n_layer, hp->n_embd, hp->n_ff, hp->n_vocab, kernel_dtype_name(hp->weight_type),
           wbytes / 1048576.0);
    for (int bi = 0; bi < n_batches; bi++) {
        uint32_t B = batches[bi];
        int warm = 2;
        uint64_t t0 = 0;
        for (int s = 0; s < warm + reps; s++) {
            if (s == warm) {
                if (gpu->ops->sync(gpu))
                    goto out;
                t0 = pw_clock_mono_ns();
            }
            for (uint32_t i = 0; i < B; i++) {
                r.tokens[i] = prompt_token(i + (uint32_t)s, hp->n_vocab);
                r.pos[i] = (int32_t)(ctx + (uint32_t)s);
                r.seq[i] = (int32_t)i;
            }
            runner_step_mode(&r, B, B, !full_logits);
        }
        if (gpu->ops->sync(gpu))
            goto out;
        double sec = (double)(pw_clock_mono_ns() - t0) / 1e9;
        double step_ms = sec * 1e3 / reps;
        double kvbytes = (double)B * (ctx + 1) * hp->n_layer * 2.0 * kvd * 2.0;
        double bound_ms = (wbytes + kvbytes) / (bw * 1e9) * 1e3;
        printf("decode batch=%u ctx=%u: %.3f ms/step, %.1f tok/s, bound %.3f ms (%.0f%%)%s\n", B,
               ctx, step_ms, B * reps / sec, bound_ms, 100.0 * bound_ms / step_ms,
               full_logits ? " [full logits to host]" : "");
        printf("{\"bench\":\"gpu_decode\",\"batch\":%u,\"ctx\":%u,\"step_ms\":%.4f,"
               "\"tok_s\":%.1f,\"bound_ms\":%.4f,\"frac\":%.3f,\"full_logits\":%s}\n",
               B, ctx, step_ms, B * reps / sec, bound_ms, bound_ms / step_ms,
               full_logits ? "true" : "false");
    }
    if (prefill) {
        uint64_t best = 0;
        for (int rep = 0; rep < 3; rep++) {
            for (uint32_t i = 0; i < prefill; i++) {
                r.tokens[i] = prompt_token(i * 7 + (uint32_t)rep, hp->n_vocab);
                r.pos[i] = (int32_t)i;
                r.seq[i] = 0;
            }
            uint64_t t0 = pw_clock_mono_ns();
            runner_step(&r, prefill, 1);
            if (gpu->ops->sync(gpu))
                goto out;
            uint64_t dt = pw_clock_mono_ns() - t0;
            if (rep > 0 && (best == 0 || dt < best)) /* rep 0 warms cuBLAS up */
                best = dt;
        }
        double sec = (double)best / 1e9;
        double n = prefill;
        double flops = 2.0 * n * layer_params * hp->n_layer + 2.0 * head_params +
                       4.0 * hp->n_layer * qd * (n * (n + 1) / 2.0);
        double frac = flops / (tf * 1e12) / sec;
        printf("prefill %u tokens: %.1f ms, %.0f tok/s, %.1f TFLOP/s (%.0f%% of GEMM rate)\n",
               prefill, sec * 1e3, n / sec, flops / sec / 1e12, 100.0 * frac);
        printf("{\"bench\":\"gpu_prefill\",\"tokens\":%u,\"ms\":%.2f,\"tok_s\":%.1f,"
               "\"tflops\":%.2f,\"frac\":%.3f}\n",
               prefill, sec * 1e3, n / sec, flops / sec / 1e12, frac);
    }
    rv = 0;
out:
    runner_close(&r);
out_be:
    gpu->ops->destroy(gpu);
    return rv;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_gpu compare MODEL [--prompt N] [--steps N] [--dump PREFIX]\n"
                    "                         [--max-rel X] [--min-top1 F]\n"
                    "       bench_gpu bench MODEL [--batches 1,8,32,64] [--ctx N] [--prefill N]\n"
                    "                         [--reps N] [--full-logits]\n"
                    "       bench_gpu profile MODEL [--batches 1,64] [--ctx N] [--prefill N]\n");
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        usage();
        return 2;
    }
    pw_log_init_from_env();
    if (kernel_cuda_device_count() == 0) {
        fprintf(stderr, "bench_gpu: no CUDA device\n");
        return 77;
    }
    const char *mode = argv[1], *path = argv[2];
    uint32_t n_prompt = 32, steps = 63, ctx = 512, prefill = 2048;
    int reps = 20;
    const char *dump = NULL;
    bool full_logits = false;
    double max_rel = 0.05, min_top1 = 0.9;
    uint32_t batches[16] = {1, 8, 32, 64};
    int n_batches = 4;
    static const struct option lo[] = {{"prompt", required_argument, 0, 'p'},
                                       {"steps", required_argument, 0, 's'},
                                       {"dump", required_argument, 0, 'd'},
                                       {"max-rel", required_argument, 0, 'r'},
                                       {"min-top1", required_argument, 0, 't'},
                                       {"batches", required_argument, 0, 'b'},
                                       {"ctx", required_argument, 0, 'c'},
                                       {"prefill", required_argument, 0, 'f'},
                                       {"reps", required_argument, 0, 'n'},
                                       {"full-logits", no_argument, 0, 'L'},
                                       {0, 0, 0, 0}};
    optind = 3;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'p':
            n_prompt = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 's':
            steps = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'd':
            dump = optarg;
            break;
        case 'r':
            max_rel = strtod(optarg, NULL);
            break;
        case 't':
            min_top1 = strtod(optarg, NULL);
            break;
        case 'b': {
            n_batches = 0;
            char *s = optarg, *end;
            while (*s && n_batches < 16) {
                unsigned long v = strtoul(s, &end, 10);
                if (end == s || v == 0 || v > 1024) {
                    usage();
                    return 2;
                }
                batches[n_batches++] = (uint32_t)v;
                s = *end == ',' ? end + 1 : end;
            }
            break;
        }
        case 'c':
            ctx = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'f':
            prefill = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'n':
            reps = atoi(optarg);
            break;
        case 'L':
            full_logits = true;
            break;
        default:
            usage();
            return 2;
        }
    }
    if (n_prompt == 0 || reps <= 0 || n_batches == 0) {
        usage();
        return 2;
    }
    if (strcmp(mode, "compare") == 0)
        return run_compare(path, n_prompt, steps, dump, max_rel, min_top1);
    if (strcmp(mode, "profile") == 0)
        return run_profile(path, batches, n_batches, ctx, prefill);
    if (strcmp(mode, "bench") == 0)
        return run_bench(path, batches, n_batches, ctx, prefill, reps, full_logits);
    usage();
    return 2;
}

#endif

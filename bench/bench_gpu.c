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
 *     Decode tokens/s at each batch size (every sequence at position --ctx, default 512,
 *     over a zeroed cache: attention still reads ctx keys), and prefill tokens/s of one
 *     --prefill-token prompt (default 2048). Each is also printed as a fraction of its
 *     bound, measured on the device first: decode, the bytes a step must read (weights
 *     plus the batch's KV) over the copy bandwidth; prefill, its FLOPs over the cuBLAS
 *     BF16 GEMM rate.
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
    float *logits; /* [max_logits][n_vocab] */
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
    if (!r->table || !r->tokens || !r->pos || !r->seq || !r->rows || !r->logits) {
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
    memset(r, 0, sizeof(*r));
}

/* One step over n rows already in r->tokens/pos/seq; logits of rows [n - n_logits, n). */
static void runner_step(struct runner *r, uint32_t n, uint32_t n_logits)
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
    engine_model_forward(r->m, &b, r->rows, n_logits, r->logits);
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
    uint32_t agree = 0;
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
    bool ok = worst <= max_rel_ok && top1 >= min_top1;
    printf("compare: steps=%u max_rel=%.3g top1=%u/%u cpu_ms=%.0f cuda_ms=%.0f %s\n", steps + 1,
           worst, agree, steps + 1, (double)t_cpu / 1e6, (double)t_gpu / 1e6, ok ? "PASS" : "FAIL");
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

/* ---- bench ---- */

static double dtype_bytes(uint32_t t)
{
    return (double)kernel_dtype_row_bytes((enum kernel_dtype)t, 32) / 32.0;
}

static int run_bench(const char *path, const uint32_t *batches, int n_batches, uint32_t ctx,
                     uint32_t prefill, int reps)
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
            runner_step(&r, B, B);
        }
        if (gpu->ops->sync(gpu))
            goto out;
        double sec = (double)(pw_clock_mono_ns() - t0) / 1e9;
        double step_ms = sec * 1e3 / reps;
        double kvbytes = (double)B * (ctx + 1) * hp->n_layer * 2.0 * kvd * 2.0;
        double bound_ms = (wbytes + kvbytes) / (bw * 1e9) * 1e3;
        printf("decode batch=%u ctx=%u: %.3f ms/step, %.1f tok/s, bound %.3f ms (%.0f%%)\n", B, ctx,
               step_ms, B * reps / sec, bound_ms, 100.0 * bound_ms / step_ms);
        printf("{\"bench\":\"gpu_decode\",\"batch\":%u,\"ctx\":%u,\"step_ms\":%.4f,"
               "\"tok_s\":%.1f,\"bound_ms\":%.4f,\"frac\":%.3f}\n",
               B, ctx, step_ms, B * reps / sec, bound_ms, bound_ms / step_ms);
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
                    "                         [--reps N]\n");
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
    double max_rel = 0.05, min_top1 = 0.9;
    uint32_t batches[16] = {1, 8, 32, 64};
    int n_batches = 4;
    static const struct option lo[] = {
        {"prompt", required_argument, 0, 'p'},   {"steps", required_argument, 0, 's'},
        {"dump", required_argument, 0, 'd'},     {"max-rel", required_argument, 0, 'r'},
        {"min-top1", required_argument, 0, 't'}, {"batches", required_argument, 0, 'b'},
        {"ctx", required_argument, 0, 'c'},      {"prefill", required_argument, 0, 'f'},
        {"reps", required_argument, 0, 'n'},     {0, 0, 0, 0}};
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
    if (strcmp(mode, "bench") == 0)
        return run_bench(path, batches, n_batches, ctx, prefill, reps);
    usage();
    return 2;
}

#endif

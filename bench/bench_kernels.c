/*
 * bench_kernels: CPU backend matmul throughput at SmolLM2-135M's shapes.
 *
 * For each weight dtype, shape (n_out x n_in) and token count it times y = x W^T and prints
 * GB/s (GGUF weight bytes / time) and GOP/s (2 n_out n_in n_tok / time). Then it adds up
 * the per-layer shapes (x30) plus the output head to estimate the matmul-only time of one
 * SmolLM2 forward step for Q4_1 layers with a Q8_0 head (the default model file), and
 * prints one JSON line {"bench":"kernels",...}.
 *
 * Usage: bench_kernels [--threads N] [--quick] [--dtype q4_1,q8_0,...]
 * PW_KERNEL_ISA=scalar|avx2|avx512 forces the SIMD level.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel.h"
#include "pw_clock.h"

struct shape {
    const char *name;
    uint32_t n_out, n_in;
    uint32_t per_layer; /* uses per transformer layer; 0 for the output head */
};

static const struct shape shapes[] = {
    {"attn_q/o", 576, 576, 2},  {"attn_k/v", 192, 576, 2}, {"ffn_gate/up", 1536, 576, 2},
    {"ffn_down", 576, 1536, 1}, {"output", 49152, 576, 0},
};
#define N_SHAPES (sizeof(shapes) / sizeof(shapes[0]))
#define N_LAYER 30

static const uint32_t toks[] = {1, 16, 128};
#define N_TOKS (sizeof(toks) / sizeof(toks[0]))

static const enum kernel_dtype dtypes[] = {KERNEL_DTYPE_Q4_1, KERNEL_DTYPE_Q8_0, KERNEL_DTYPE_Q4_0,
                                           KERNEL_DTYPE_F16,  KERNEL_DTYPE_BF16, KERNEL_DTYPE_F32};
#define N_DT (sizeof(dtypes) / sizeof(dtypes[0]))

static uint32_t rng = 1;

static float rnd(void)
{
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) * 0x1p-24f * 2.0f - 1.0f;
}

/* seconds per call, measured over at least min_s and 3 calls after one warm-up */
static double time_mm(struct kernel_backend *be, const struct kernel_weight *w, const float *x,
                      uint32_t n_tok, float *y, double min_s)
{
    kernel_matmul1(be, w, x, n_tok, y, false);
    uint64_t t0 = pw_clock_mono_ns(), t;
    int reps = 0;
    do {
        kernel_matmul1(be, w, x, n_tok, y, false);
        reps++;
        t = pw_clock_mono_ns();
    } while (reps < 3 || (double)(t - t0) * 1e-9 < min_s);
    return (double)(t - t0) * 1e-9 / reps;
}

int main(int argc, char **argv)
{
    int threads = 0;
    double min_s = 0.25;
    const char *dt_filter = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--quick") == 0) {
            min_s = 0.05;
        } else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) {
            dt_filter = argv[++i];
        } else {
            fprintf(stderr, "usage: %s [--threads N] [--quick] [--dtype q4_1,q8_0,...]\n", argv[0]);
            return 2;
        }
    }
    struct kernel_backend *be;
    enum pw_err err = kernel_cpu_create(threads, &be);
    if (err) {
        fprintf(stderr, "kernel_cpu_create: %s\n", pw_err_name(err));
        return 1;
    }
    uint32_t max_tok = toks[N_TOKS - 1], max_in = 1536;
    if (be->ops->reserve(be, max_tok, max_in) != PW_OK)
        return 1;
    float *x = malloc((size_t)max_tok * max_in * sizeof(float));
    float *y = malloc((size_t)max_tok * 49152 * sizeof(float));
    float *wf = malloc((size_t)49152 * 576 * sizeof(float));
    void *wq = malloc((size_t)49152 * 576 * sizeof(float));
    if (!x || !y || !wf || !wq)
        return 1;
    for (size_t i = 0; i < (size_t)max_tok * max_in; i++)
        x[i] = rnd();
    for (size_t i = 0; i < (size_t)49152 * 576; i++)
        wf[i] = rnd() * 0.1f;

    /* secs[dtype][shape][tok] */
    double secs[N_DT][N_SHAPES][N_TOKS] = {{{0}}};
    bool have[N_DT] = {0};
    printf("backend=%s\n", be->ops->name(be));
    printf("%-6s %-12s %6s %6s %5s %10s %9s %9s\n", "dtype", "shape", "n_out", "n_in", "n_tok",
           "us/call", "GB/s", "GOP/s");
    for (size_t d = 0; d < N_DT; d++) {
        const char *dn = kernel_dtype_name(dtypes[d]);
        if (dt_filter && !strstr(dt_filter, dn))
            continue;
        have[d] = true;
        for (size_t s = 0; s < N_SHAPES; s++) {
            const struct shape *sh = &shapes[s];
            size_t rb = kernel_dtype_row_bytes(dtypes[d], sh->n_in);
            for (uint32_t r = 0; r < sh->n_out; r++)
                kernel_quantize_row(dtypes[d], wf + (size_t)r * sh->n_in,
                                    (uint8_t *)wq + (size_t)r * rb, sh->n_in);
            struct kernel_weight *w;
            if (be->ops->weight_create(be, dtypes[d], sh->n_out, sh->n_in, wq, &w) != PW_OK)
                return 1;
            for (size_t t = 0; t < N_TOKS; t++) {
                double sec = time_mm(be, w, x, toks[t], y, min_s);
                secs[d][s][t] = sec;
                double bytes = (double)rb * sh->n_out;
                double ops = 2.0 * sh->n_out * sh->n_in * toks[t];
                printf("%-6s %-12s %6u %6u %5u %10.1f %9.2f %9.1f\n", dn, sh->name, sh->n_out,
                       sh->n_in, toks[t], sec * 1e6, bytes / sec * 1e-9, ops / sec * 1e-9);
                fflush(stdout);
            }
            be->ops->weight_destroy(be, w);
        }
    }

    /* SmolLM2 forward estimate (matmuls only): Q4_1 layers + Q8_0 output head */
    size_t iq41 = 0, iq80 = 1;
    char est[256] = "";
    if (have[iq41] && have[iq80]) {
        double step[N_TOKS];
        int n = 0;
        for (size_t t = 0; t < N_TOKS; t++) {
            double s = 0.0;
            for (size_t k = 0; k < N_SHAPES; k++)
                s += shapes[k].per_layer ? N_LAYER * shapes[k].per_layer * secs[iq41][k][t]
                                         : secs[iq80][k][t];
            step[t] = s;
        }
        printf("SmolLM2-135M Q4_1 matmul-only step: n_tok=1 %.2f ms (%.0f tok/s), n_tok=16 "
               "%.2f ms (%.0f tok/s), n_tok=128 %.2f ms (%.0f tok/s; head for every row)\n",
               step[0] * 1e3, 1.0 / step[0], step[1] * 1e3, 16.0 / step[1], step[2] * 1e3,
               128.0 / step[2]);
        n = snprintf(est, sizeof(est), ",\"smollm2_step_ms\":{\"1\":%.3f,\"16\":%.3f,\"128\":%.3f}",
                     step[0] * 1e3, step[1] * 1e3, step[2] * 1e3);
        (void)n;
    }
    printf("{\"bench\":\"kernels\",\"backend\":\"%s\",\"results\":[", be->ops->name(be));
    bool first = true;
    for (size_t d = 0; d < N_DT; d++) {
        if (!have[d])
            continue;
        for (size_t s = 0; s < N_SHAPES; s++)
            for (size_t t = 0; t < N_TOKS; t++) {
                size_t rb = kernel_dtype_row_bytes(dtypes[d], shapes[s].n_in);
                double sec = secs[d][s][t];
                printf("%s{\"dtype\":\"%s\",\"n_out\":%u,\"n_in\":%u,\"n_tok\":%u,\"us\":%.1f,"
                       "\"gbps\":%.2f,\"gops\":%.1f}",
                       first ? "" : ",", kernel_dtype_name(dtypes[d]), shapes[s].n_out,
                       shapes[s].n_in, toks[t], sec * 1e6,
                       (double)rb * shapes[s].n_out / sec * 1e-9,
                       2.0 * shapes[s].n_out * shapes[s].n_in * toks[t] / sec * 1e-9);
                first = false;
            }
    }
    printf("]%s}\n", est);
    free(wq);
    free(wf);
    free(y);
    free(x);
    be->ops->destroy(be);
    return 0;
}

/*
 * bench_engine: engine throughput on this machine with one model (default: SmolLM2-135M
 * Q4_1 from the model cache). No Redis: it drives the scheduler directly, the way the
 * worker does. Prints a table, then one JSON line:
 *   {"bench":"engine","prompt_tok_s_128":..,"prompt_tok_s_512":..,"decode_tok_s_pos0":..,
 *    "decode_tok_s_pos512":..,"agg_decode_tok_s_4":..,"agg_decode_tok_s_8":..,
 *    "agg_decode_tok_s_16":..,"load_ms":..,"peak_rss_mib":..}
 * Usage: bench_engine [--model F.gguf] [--threads N] [--reps N]
 * Prompts are random token ids (fixed seed, each prompt distinct so the prefix cache
 * never helps); generation ignores end-of-text so every run makes the same token count.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "engine.h"
#include "engine_model.h"
#include "pw_clock.h"
#include "pw_log.h"

struct bench_seq {
    bool done;
};

static void on_finish(void *ud, uint64_t id, enum engine_finish r, const char *t, size_t n,
                      const struct engine_seq_usage *u)
{
    ((struct bench_seq *)ud)->done = true;
}

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static int32_t rand_token(uint32_t n_vocab)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    /* Skip the first 256 ids: special and control tokens live there in most vocabularies. */
    return (int32_t)(256 + rng_state % (n_vocab - 256));
}

static void submit(struct engine *e, uint32_t n_prompt, uint32_t max_tokens, struct bench_seq *s)
{
    uint32_t n_vocab = engine_model_hparams(e->model)->n_vocab;
    int32_t *ids = malloc(n_prompt * sizeof *ids);
    for (uint32_t i = 0; i < n_prompt; i++)
        ids[i] = rand_token(n_vocab);
    struct engine_seq_params p = {
        .prompt = ids,
        .n_prompt = n_prompt,
        .max_tokens = max_tokens,
        .ignore_eos = true,
        .userdata = s,
    };
    engine_sampler_params_default(&p.sampling);
    p.sampling.temperature = 0;
    uint64_t id;
    char err[256];
    if (engine_sched_submit(e->sched, &p, &id, err, sizeof err)) {
        fprintf(stderr, "bench_engine: submit: %s\n", err);
        exit(1);
    }
    free(ids);
}

/* Runs until every seq is done; returns decode tokens/s over the steps with no prompt rows,
 * and through *prompt_s the time spent in steps that had prompt rows. */
static double run(struct engine *e, struct bench_seq *seqs, int n, double *prompt_s)
{
    const struct engine_sched_stats *st = engine_sched_stats(e->sched);
    double decode_s = 0, pre_s = 0;
    uint64_t decode_tokens = 0;
    for (;;) {
        bool all = true;
        for (int i = 0; i < n; i++)
            all &= seqs[i].done;
        if (all)
            break;
        uint64_t p0 = st->prompt_tokens, g0 = st->generated_tokens;
        uint64_t t0 = pw_clock_mono_ns();
        if (engine_sched_step(e->sched) == 0)
            break;
        double dt = (double)(pw_clock_mono_ns() - t0) / 1e9;
        if (st->prompt_tokens == p0) {
            decode_s += dt;
            decode_tokens += st->generated_tokens - g0;
        } else {
            pre_s += dt;
        }
    }
    if (prompt_s)
        *prompt_s = pre_s;
    return decode_s > 0 ? (double)decode_tokens / decode_s : 0;
}

static double best_prompt_rate(struct engine *e, uint32_t n_prompt, int reps)
{
    double best = 0;
    for (int r = 0; r < reps; r++) {
        struct bench_seq s = {0};
        submit(e, n_prompt, 1, &s);
        double ps;
        run(e, &s, 1, &ps);
        double rate = (double)n_prompt / ps;
        if (rate > best)
            best = rate;
    }
    return best;
}

static double best_decode_rate(struct engine *e, int streams, uint32_t n_prompt, uint32_t n_gen,
                               int reps)
{
    double best = 0;
    struct bench_seq seqs[64];
    for (int r = 0; r < reps; r++) {
        memset(seqs, 0, sizeof seqs);
        for (int i = 0; i < streams; i++)
            submit(e, n_prompt, n_gen, &seqs[i]);
        double rate = run(e, seqs, streams, NULL);
        if (rate > best)
            best = rate;
    }
    return best;
}

int main(int argc, char **argv)
{
    static char model_default[4096];
    const char *home = getenv("HOME");
    const char *dir = getenv("PARKWAY_MODEL_DIR");
    if (dir)
        snprintf(model_default, sizeof model_default, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(model_default, sizeof model_default,
                 "%s/.cache/parkway/models/SmolLM2-135M-Instruct.Q4_1.gguf", home ? home : ".");
    struct engine e;
    memset(&e, 0, sizeof e);
    e.opts.model_path = model_default;
    e.opts.max_batch = 16;
    e.opts.max_tok = 256;
    e.opts.n_ctx = 1024;
    int reps = 3;
    static const struct option longopts[] = {
        {"model", required_argument, NULL, 'm'},
        {"threads", required_argument, NULL, 't'},
        {"reps", required_argument, NULL, 'r'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        if (opt == 'm')
            e.opts.model_path = optarg;
        else if (opt == 't')
            e.opts.threads = atoi(optarg);
        else if (opt == 'r')
            reps = atoi(optarg) > 0 ? atoi(optarg) : 1;
        else
            return 2;
    }
    pw_log_set_level(PW_LOG_LEVEL_WARN);
    struct engine_sched_cb cb = {.on_finish = on_finish};
    char err[512];
    enum pw_err pe = engine_load(&e, &cb, err, sizeof err);
    if (pe) {
        fprintf(stderr, "bench_engine: %s\n", err);
        engine_unload(&e);
        return pw_err_exit_code(pe);
    }
    double load_ms = (double)e.load_ns / 1e6;

    double p128 = best_prompt_rate(&e, 128, reps);
    double p512 = best_prompt_rate(&e, 512, reps);
    double d0 = best_decode_rate(&e, 1, 1, 128, reps);
    double d512 = best_decode_rate(&e, 1, 512, 128, reps);
    double a4 = best_decode_rate(&e, 4, 128, 128, reps);
    double a8 = best_decode_rate(&e, 8, 128, 128, reps);
    double a16 = best_decode_rate(&e, 16, 128, 128, reps);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss_mib = (double)ru.ru_maxrss / 1024.0;

    printf("engine benchmark: %s, backend %s, best of %d\n", e.opts.model_path,
           e.be->ops->name(e.be), reps);
    printf("  %-44s %10.1f\n", "load to ready (ms)", load_ms);
    printf("  %-44s %10.1f\n", "prompt, 128 tokens (tok/s)", p128);
    printf("  %-44s %10.1f\n", "prompt, 512 tokens (tok/s)", p512);
    printf("  %-44s %10.1f\n", "decode, 1 stream from pos 0 (tok/s)", d0);
    printf("  %-44s %10.1f\n", "decode, 1 stream from pos 512 (tok/s)", d512);
    printf("  %-44s %10.1f\n", "decode, 4 streams, aggregate (tok/s)", a4);
    printf("  %-44s %10.1f\n", "decode, 8 streams, aggregate (tok/s)", a8);
    printf("  %-44s %10.1f\n", "decode, 16 streams, aggregate (tok/s)", a16);
    printf("  %-44s %10.1f\n", "peak RSS (MiB)", rss_mib);
    printf("{\"bench\":\"engine\",\"backend\":\"%s\",\"prompt_tok_s_128\":%.1f,"
           "\"prompt_tok_s_512\":%.1f,\"decode_tok_s_pos0\":%.1f,\"decode_tok_s_pos512\":%.1f,"
           "\"agg_decode_tok_s_4\":%.1f,\"agg_decode_tok_s_8\":%.1f,\"agg_decode_tok_s_16\":%.1f,"
           "\"load_ms\":%.1f,\"peak_rss_mib\":%.1f}\n",
           e.be->ops->name(e.be), p128, p512, d0, d512, a4, a8, a16, load_ms, rss_mib);
    engine_unload(&e);
    return 0;
}

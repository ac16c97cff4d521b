/*
 * Unit tests for engine_sched on a tiny generated model (gguf_gen, Q4_1 weights, n_ctx
 * 256): batch invariance (a request alone and among 8 others gives the same tokens, greedy
 * and sampled, with prefill chunks of 7 and 256 rows), preemption under a KV pool too small
 * for everyone (same tokens as alone), prefix reuse (cached_tokens > 0, same tokens as
 * without the cache), max_tokens and context limits (finish length), stop strings and
 * cancellation; background (batch-lane) sequences yielding to foreground ones (first-token
 * steps of foreground rows only, background preempted first).
 *
 * Each case loads its own engine (engine_load; a tiny model loads in milliseconds) so the
 * prefix cache of one run never serves another unless the case wants it to.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "engine_model.h"
#include "gguf_gen.h"
#include "kernel.h"
#include "pw_test_cand.h"

#define N_CTX 256u
#define MAX_GEN 256u
#define TEXT_CAP 8192u

static char model_path[64];

/* What one sequence produced. */
struct out {
    int32_t tok[MAX_GEN];
    uint32_t n_tok;
    char text[TEXT_CAP];
    size_t n_text;
    enum engine_finish finish;
    struct engine_seq_usage usage;
    bool done;
};

static void append_text(struct out *o, const char *t, size_t n)
{
    assert_true(o->n_text + n < TEXT_CAP);
    if (n == 0)
        return; /* t may be NULL then */
    memcpy(o->text + o->n_text, t, n);
    o->n_text += n;
    o->text[o->n_text] = '\0';
}

static void on_token(void *ud, uint64_t seq_id, const struct engine_token_event *ev)
{
    (void)seq_id;
    struct out *o = ud;
    assert_false(o->done);
    assert_true(o->n_tok < MAX_GEN);
    o->tok[o->n_tok++] = ev->token;
    append_text(o, ev->text, ev->len);
}

static void on_finish(void *ud, uint64_t seq_id, enum engine_finish reason, const char *text,
                      size_t len, const struct engine_seq_usage *usage)
{
    (void)seq_id;
    struct out *o = ud;
    assert_false(o->done);
    append_text(o, text, len);
    o->finish = reason;
    o->usage = *usage;
    o->done = true;
}

static const struct engine_sched_cb cb = {.on_token = on_token, .on_finish = on_finish};

static void eng_open(struct engine *e, uint32_t max_batch, uint32_t max_tok, uint32_t n_ctx,
                     uint32_t n_kv_blocks)
{
    memset(e, 0, sizeof *e);
    e->opts.model_path = model_path;
    e->opts.threads = 2;
    e->opts.max_batch = max_batch;
    e->opts.max_tok = max_tok;
    e->opts.n_ctx = n_ctx;
    e->opts.n_kv_blocks = n_kv_blocks;
    char err[512] = "";
    if (engine_load(e, &cb, err, sizeof err) != PW_OK)
        fail_msg("engine_load: %s", err);
}

/* A request: prompt derived from `which`, sampling and limits. */
struct req {
    uint32_t which, n_prompt, max_tokens;
    float temperature;
    uint64_t seed;
    const char *stop; /* one stop string or NULL */
    bool honour_eos;
    bool background; /* batch-lane sequence */
};

static void make_prompt(const struct req *r, int32_t *ids)
{
    for (uint32_t i = 0; i < r->n_prompt; i++)
        ids[i] = 3 + (int32_t)((r->which * 131u + i * 17u + (i * i) % 7u) % 381u);
}

static void submit(struct engine *e, const struct req *r, struct out *o)
{
    int32_t ids[N_CTX];
    assert_true(r->n_prompt <= N_CTX);
    make_prompt(r, ids);
    memset(o, 0, sizeof *o);
    struct engine_stop_str st = {.ptr = r->stop, .len = r->stop ? strlen(r->stop) : 0};
    struct engine_seq_params p = {
        .prompt = ids,
        .n_prompt = r->n_prompt,
        .max_tokens = r->max_tokens,
        .stops = r->stop ? &st : NULL,
        .n_stops = r->stop ? 1 : 0,
        .ignore_eos = !r->honour_eos,
        .background = r->background,
        .userdata = o,
    };
    engine_sampler_params_default(&p.sampling);
    p.sampling.temperature = r->temperature;
    p.sampling.seed = r->seed;
    uint64_t id;
    char err[256] = "";
    if (engine_sched_submit(e->sched, &p, &id, err, sizeof err) != PW_OK)
        fail_msg("submit: %s", err);
}

static void run_to_end(struct engine *e)
{
    for (int steps = 0; engine_sched_active(e->sched) > 0; steps++) {
        assert_true(steps < 100000);
        engine_sched_step(e->sched);
    }
}

/* Runs r alone on a fresh engine. */
static void run_alone(const struct req *r, uint32_t max_tok, struct out *o)
{
    struct engine e;
    eng_open(&e, 9, max_tok, 0, 0);
    submit(&e, r, o);
    run_to_end(&e);
    assert_true(o->done);
    engine_unload(&e);
}

static void assert_same_tokens(const struct out *a, const struct out *b, const char *what,
                               uint32_t which)
{
    if (a->n_tok != b->n_tok || memcmp(a->tok, b->tok, a->n_tok * sizeof(int32_t)) != 0) {
        uint32_t k = 0;
        while (k < a->n_tok && k < b->n_tok && a->tok[k] == b->tok[k])
            k++;
        fail_msg("%s: request %u differs at token %u (%u vs %u tokens; %d vs %d)", what, which, k,
                 a->n_tok, b->n_tok, k < a->n_tok ? a->tok[k] : -1, k < b->n_tok ? b->tok[k] : -1);
    }
    assert_int_equal(a->finish, b->finish);
    assert_int_equal(a->n_text, b->n_text);
    assert_memory_equal(a->text, b->text, a->n_text);
}

/* ---- batch invariance ------------------------------------------------------------------ */

#define N_BATCH 9

static void batch_reqs(struct req *rs, float temperature)
{
    static const uint32_t lens[N_BATCH] = {12, 5, 70, 33, 20, 1, 130, 48, 9};
    static const uint32_t gens[N_BATCH] = {30, 45, 12, 40, 32, 25, 20, 8, 50};
    for (uint32_t i = 0; i < N_BATCH; i++) {
        rs[i] = (struct req){.which = i,
                             .n_prompt = lens[i],
                             .max_tokens = gens[i],
                             .temperature = temperature,
                             .seed = 1000 + i};
    }
}

static void check_batch_invariance(float temperature)
{
    struct req rs[N_BATCH];
    batch_reqs(rs, temperature);
    static struct out alone[2][N_BATCH], together[N_BATCH];
    static const uint32_t chunk[2] = {7, 256};
    for (int c = 0; c < 2; c++) {
        for (uint32_t i = 0; i < N_BATCH; i++)
            run_alone(&rs[i], chunk[c], &alone[c][i]);
        struct engine e;
        eng_open(&e, N_BATCH, chunk[c], 0, 0);
        /* request 4 is "the" request: in the middle of 8 others, all at once */
        for (uint32_t i = 0; i < N_BATCH; i++)
            submit(&e, &rs[i], &together[i]);
        run_to_end(&e);
        engine_unload(&e);
        char what[64];
        for (uint32_t i = 0; i < N_BATCH; i++) {
            assert_true(together[i].done);
            assert_int_equal(together[i].finish, ENGINE_FINISH_LENGTH);
            assert_int_equal(together[i].n_tok, rs[i].max_tokens);
            snprintf(what, sizeof what, "T=%.1f chunk=%u alone vs batch of %d", (double)temperature,
                     chunk[c], N_BATCH);
            assert_same_tokens(&alone[c][i], &together[i], what, i);
        }
    }
    /* and the prefill chunk size changes nothing either */
    for (uint32_t i = 0; i < N_BATCH; i++)
        assert_same_tokens(&alone[0][i], &alone[1][i], "chunk 7 vs chunk 256", i);
}

static void test_batch_invariance_greedy(void **state)
{
    (void)state;
    check_batch_invariance(0.0f);
}

static void test_batch_invariance_temperature(void **state)
{
    (void)state;
    check_batch_invariance(0.9f);
}

/* A sequence joining while others decode (continuous batching) gets the same tokens. */
static void test_late_join_same_tokens(void **state)
{
    (void)state;
    struct req a = {.which = 20, .n_prompt = 40, .max_tokens = 60, .temperature = 0.9f, .seed = 5};
    struct req b = {.which = 21, .n_prompt = 90, .max_tokens = 30, .temperature = 0.9f, .seed = 6};
    struct out oa_alone, ob_alone, oa, ob;
    run_alone(&a, 16, &oa_alone);
    run_alone(&b, 16, &ob_alone);
    struct engine e;
    eng_open(&e, 4, 16, 0, 0);
    submit(&e, &a, &oa);
    for (int i = 0; i < 10; i++)
        engine_sched_step(e.sched);
    submit(&e, &b, &ob);
    run_to_end(&e);
    engine_unload(&e);
    assert_same_tokens(&oa_alone, &oa, "late join", 20);
    assert_same_tokens(&ob_alone, &ob, "late join", 21);
}

/* ---- choices from device candidates (ops->topk) --------------------------------------- */

/*
 * The CPU backend has no ops->topk; this gives it one (the ops table is swapped for a copy
 * with topk set: the CPU ops only ever cast `be` to their own state), so the scheduler's
 * candidate path runs here exactly as it does on CUDA. CPU "device" memory is host memory.
 */
static struct kernel_ops topk_ops;
static void host_topk(struct kernel_backend *be, const float *x, uint32_t n_rows, uint32_t n,
                      uint32_t k, float *vals, int32_t *idx, float *lse)
{
    (void)be;
    int32_t *order = malloc(n * sizeof(int32_t));
    assert_non_null(order);
    for (uint32_t r = 0; r < n_rows; r++) {
        const float *row = x + (size_t)r * n;
        pw_test_candidate_order(row, (int32_t)n, order);
        for (uint32_t j = 0; j < k; j++) {
            vals[r * k + j] = row[order[j]];
            idx[r * k + j] = order[j];
        }
        double mx = row[order[0]], z = 0.0;
        for (uint32_t i = 0; i < n; i++)
            z += exp((double)row[i] - mx);
        if (lse)
            lse[r] = (float)(mx + log(z));
    }
    free(order);
}

static void run_batch(const struct req *rs, uint32_t n, bool candidates, struct out *outs,
                      uint64_t *cand_steps, uint64_t *steps)
{
    struct engine e;
    eng_open(&e, N_BATCH, 64, 0, 0);
    if (candidates) {
        topk_ops = *e.be->ops;
        topk_ops.topk = host_topk;
        e.be->ops = &topk_ops;
    }
    for (uint32_t i = 0; i < n; i++)
        submit(&e, &rs[i], &outs[i]);
    run_to_end(&e);
    *cand_steps = engine_sched_stats(e.sched)->candidate_steps;
    *steps = engine_sched_stats(e.sched)->steps;
    engine_unload(&e);
}

/* Greedy choices made from the device's best candidates give the same tokens as from whole
 * logit rows; a step with one sampled choice falls back to whole rows for all of them. */
static void test_candidate_choices_match_full_rows(void **state)
{
    (void)state;
    struct req rs[N_BATCH];
    static struct out full[N_BATCH], cand[N_BATCH];
    uint64_t cs_full, cs_cand, st_full, st_cand;
    batch_reqs(rs, 0.0f);
    run_batch(rs, N_BATCH, false, full, &cs_full, &st_full);
    run_batch(rs, N_BATCH, true, cand, &cs_cand, &st_cand);
    assert_int_equal(cs_full, 0);
    assert_int_equal(cs_cand, st_cand); /* every step had only greedy choices */
    assert_true(st_cand > 0);
    for (uint32_t i = 0; i < N_BATCH; i++)
        assert_same_tokens(&full[i], &cand[i], "greedy: whole rows vs candidates", i);

    rs[2].temperature = 0.9f; /* one sampled sequence */
    run_batch(rs, N_BATCH, false, full, &cs_full, &st_full);
    run_batch(rs, N_BATCH, true, cand, &cs_cand, &st_cand);
    assert_true(cs_cand > 0 && cs_cand < st_cand); /* its steps took whole rows */
    for (uint32_t i = 0; i < N_BATCH; i++)
        assert_same_tokens(&full[i], &cand[i], "mixed: whole rows vs candidates", i);
}

/* ---- preemption ------------------------------------------------------------------------ */

static void test_preemption_completes_with_same_tokens(void **state)
{
    (void)state;
    /* 4 sequences of 40 + 60 tokens need 7 blocks of 16 each (28); the pool has 14. */
    struct req rs[4];
    struct out alone[4], together[4];
    for (uint32_t i = 0; i < 4; i++) {
        rs[i] = (struct req){.which = 30 + i,
                             .n_prompt = 40,
                             .max_tokens = 60,
                             .temperature = i % 2 ? 0.9f : 0.0f,
                             .seed = 77 + i};
        run_alone(&rs[i], 32, &alone[i]);
    }
    struct engine e;
    eng_open(&e, 4, 32, 0, 14);
    uint32_t total, free_;
    engine_sched_kv_blocks(e.sched, &total, &free_);
    assert_int_equal(total, 14);
    for (uint32_t i = 0; i < 4; i++)
        submit(&e, &rs[i], &together[i]);
    run_to_end(&e);
    const struct engine_sched_stats *st = engine_sched_stats(e.sched);
    printf("preemptions=%llu steps=%llu\n", (unsigned long long)st->preemptions,
           (unsigned long long)st->steps);
    assert_true(st->preemptions > 0);
    engine_sched_kv_blocks(e.sched, &total, &free_);
    assert_int_equal(free_, total); /* every block back */
    engine_unload(&e);
    for (uint32_t i = 0; i < 4; i++) {
        assert_true(together[i].done);
        assert_int_equal(together[i].finish, ENGINE_FINISH_LENGTH);
        assert_same_tokens(&alone[i], &together[i], "preempted vs alone", i);
    }
}

/* ---- background (batch-lane) sequences -------------------------------------------------- */

/* A foreground sequence joining running background ones gets its first token from a step of
 * its own rows (background ones sit it out), then everyone goes on; tokens are unchanged. */
static void test_foreground_first_token_skips_background(void **state)
{
    (void)state;
    struct req bg[4], fg = {.which = 90, .n_prompt = 25, .max_tokens = 10, .seed = 9};
    struct out bg_alone[4], fg_alone, bg_out[4], fg_out;
    for (uint32_t i = 0; i < 4; i++) {
        bg[i] = (struct req){.which = 80 + i,
                             .n_prompt = 20,
                             .max_tokens = 30,
                             .temperature = i % 2 ? 0.8f : 0.0f,
                             .seed = 40 + i,
                             .background = true};
        run_alone(&bg[i], 64, &bg_alone[i]);
    }
    run_alone(&fg, 64, &fg_alone);
    struct engine e;
    eng_open(&e, 5, 64, 0, 0);
    for (uint32_t i = 0; i < 4; i++)
        submit(&e, &bg[i], &bg_out[i]);
    for (int i = 0; i < 3; i++)
        engine_sched_step(e.sched);
    assert_int_equal(engine_sched_background(e.sched), 4);
    uint32_t before[4];
    for (uint32_t i = 0; i < 4; i++) {
        assert_true(bg_out[i].n_tok > 0); /* all generating */
        before[i] = bg_out[i].n_tok;
    }
    submit(&e, &fg, &fg_out);
    engine_sched_step(e.sched);
    assert_int_equal(fg_out.n_tok, 1); /* first token after one step */
    for (uint32_t i = 0; i < 4; i++)
        assert_int_equal(bg_out[i].n_tok, before[i]); /* sat the step out */
    assert_int_equal(engine_sched_stats(e.sched)->foreground_steps, 1);
    engine_sched_step(e.sched);
    assert_int_equal(fg_out.n_tok, 2);
    for (uint32_t i = 0; i < 4; i++)
        assert_int_equal(bg_out[i].n_tok, before[i] + 1); /* back in the batch */
    run_to_end(&e);
    assert_int_equal(engine_sched_stats(e.sched)->foreground_steps, 1);
    engine_unload(&e);
    for (uint32_t i = 0; i < 4; i++)
        assert_same_tokens(&bg_alone[i], &bg_out[i], "background", 80 + i);
    assert_same_tokens(&fg_alone, &fg_out, "foreground", 90);
}

/* Out of KV blocks, background sequences give theirs up before a foreground one does, even a
 * younger foreground one; every sequence still ends with its own tokens. */
static void test_foreground_preempts_background_first(void **state)
{
    (void)state;
    /* 40 + 60 tokens need 7 blocks of 16; the pool of 14 holds two such sequences. */
    struct req bg[2], fg = {.which = 102, .n_prompt = 40, .max_tokens = 60, .seed = 5};
    struct out bg_alone[2], fg_alone, bg_out[2], fg_out;
    for (uint32_t i = 0; i < 2; i++) {
        bg[i] = (struct req){
            .which = 100 + i, .n_prompt = 40, .max_tokens = 60, .seed = 50 + i, .background = true};
        run_alone(&bg[i], 32, &bg_alone[i]);
    }
    run_alone(&fg, 32, &fg_alone);
    struct engine e;
    eng_open(&e, 3, 32, 0, 14);
    for (uint32_t i = 0; i < 2; i++)
        submit(&e, &bg[i], &bg_out[i]);
    for (int i = 0; i < 6; i++)
        engine_sched_step(e.sched);
    submit(&e, &fg, &fg_out);
    int steps = 0;
    while (!fg_out.done) {
        assert_true(steps++ < 1000);
        engine_sched_step(e.sched);
    }
    /* The foreground sequence ran its 60 tokens in about as many steps, never preempted. */
    assert_true(steps <= 64);
    assert_false(bg_out[0].done && bg_out[1].done);
    assert_true(engine_sched_stats(e.sched)->preemptions > 0);
    run_to_end(&e);
    uint32_t total, free_;
    engine_sched_kv_blocks(e.sched, &total, &free_);
    assert_int_equal(free_, total);
    engine_unload(&e);
    for (uint32_t i = 0; i < 2; i++)
        assert_same_tokens(&bg_alone[i], &bg_out[i], "preempted background", 100 + i);
    assert_same_tokens(&fg_alone, &fg_out, "foreground", 102);
}

/* ---- prefix reuse ---------------------------------------------------------------------- */

static void test_prefix_reuse(void **state)
{
    (void)state;
    /* Same first 64 tokens (4 full blocks), different tails. */
    int32_t prefix[64];
    struct req base = {.which = 40, .n_prompt = 64};
    make_prompt(&base, prefix);
    struct engine e;
    eng_open(&e, 4, 64, 0, 0);
    int32_t ids[2][80];
    struct out o[3];
    const uint32_t n[2] = {74, 78};
    for (int k = 0; k < 2; k++) {
        memcpy(ids[k], prefix, sizeof prefix);
        for (uint32_t i = 64; i < n[k]; i++)
            ids[k][i] = 3 + (int32_t)((i * 7 + (uint32_t)k * 101) % 381);
    }
    for (int k = 0; k < 3; k++) {
        int which = k == 2 ? 0 : k; /* third run: the first prompt again */
        memset(&o[k], 0, sizeof o[k]);
        struct engine_seq_params p = {.prompt = ids[which],
                                      .n_prompt = n[which],
                                      .max_tokens = 20,
                                      .ignore_eos = true,
                                      .userdata = &o[k]};
        engine_sampler_params_default(&p.sampling);
        p.sampling.temperature = 0.0f;
        uint64_t id;
        assert_int_equal(engine_sched_submit(e.sched, &p, &id, NULL, 0), PW_OK);
        run_to_end(&e);
        assert_true(o[k].done);
    }
    assert_int_equal(o[0].usage.cached_tokens, 0);
    assert_int_equal(o[1].usage.cached_tokens, 64);
    assert_true(o[2].usage.cached_tokens >= 64);
    assert_true(engine_sched_stats(e.sched)->cached_tokens >= 128);
    engine_unload(&e);
    assert_same_tokens(&o[0], &o[2], "same prompt with and without the cache", 0);

    /* The second prompt on a fresh engine (nothing cached) gives the same tokens. */
    struct out fresh;
    memset(&fresh, 0, sizeof fresh);
    eng_open(&e, 4, 64, 0, 0);
    struct engine_seq_params p = {.prompt = ids[1],
                                  .n_prompt = n[1],
                                  .max_tokens = 20,
                                  .ignore_eos = true,
                                  .userdata = &fresh};
    engine_sampler_params_default(&p.sampling);
    p.sampling.temperature = 0.0f;
    uint64_t id;
    assert_int_equal(engine_sched_submit(e.sched, &p, &id, NULL, 0), PW_OK);
    run_to_end(&e);
    engine_unload(&e);
    assert_int_equal(fresh.usage.cached_tokens, 0);
    assert_same_tokens(&fresh, &o[1], "prefix from the cache vs computed", 1);
}

/* ---- limits ---------------------------------------------------------------------------- */

static void test_max_tokens_gives_length(void **state)
{
    (void)state;
    struct req r = {.which = 50, .n_prompt = 10, .max_tokens = 5, .temperature = 0.7f, .seed = 9};
    struct out o;
    run_alone(&r, 256, &o);
    assert_int_equal(o.finish, ENGINE_FINISH_LENGTH);
    assert_int_equal(o.n_tok, 5);
    assert_int_equal(o.usage.completion_tokens, 5);
    assert_int_equal(o.usage.prompt_tokens, 10);
}

static void test_context_limit_gives_length(void **state)
{
    (void)state;
    struct engine e;
    /* the model's own context (256) */
    eng_open(&e, 2, 256, 0, 0);
    struct req r = {.which = 51, .n_prompt = N_CTX - 6, .max_tokens = 0, .seed = 1};
    struct out o;
    submit(&e, &r, &o);
    run_to_end(&e);
    assert_int_equal(o.finish, ENGINE_FINISH_LENGTH);
    assert_int_equal(o.n_tok, 6);
    /* a prompt that fills the context is refused */
    int32_t ids[N_CTX];
    struct req full = {.which = 52, .n_prompt = N_CTX};
    make_prompt(&full, ids);
    struct engine_seq_params p = {.prompt = ids, .n_prompt = N_CTX, .userdata = &o};
    engine_sampler_params_default(&p.sampling);
    uint64_t id;
    char err[256] = "";
    assert_int_equal(engine_sched_submit(e.sched, &p, &id, err, sizeof err), PW_ERR_RANGE);
    assert_non_null(strstr(err, "context"));
    engine_unload(&e);

    /* a served context shorter than the model's (opts.n_ctx = 64) */
    eng_open(&e, 2, 256, 64, 0);
    assert_int_equal(engine_model_opts(e.model)->n_ctx, 64);
    struct req r64 = {.which = 53, .n_prompt = 60, .max_tokens = 100, .seed = 1};
    submit(&e, &r64, &o);
    run_to_end(&e);
    assert_int_equal(o.finish, ENGINE_FINISH_LENGTH);
    assert_int_equal(o.n_tok, 4);
    p.n_prompt = 64;
    assert_int_equal(engine_sched_submit(e.sched, &p, &id, err, sizeof err), PW_ERR_RANGE);
    engine_unload(&e);
}

/* ---- stop strings ---------------------------------------------------------------------- */

/* Picks 3 printable ASCII bytes from the middle of text; false if there are none. */
static bool pick_stop(const char *text, size_t n, char *stop)
{
    for (size_t s = n / 3; s + 3 <= n; s++) {
        bool ok = true;
        for (size_t k = 0; k < 3; k++)
            ok &= text[s + k] > ' ' && text[s + k] < 127;
        if (ok) {
            memcpy(stop, text + s, 3);
            stop[3] = '\0';
            return true;
        }
    }
    return false;
}

static void test_stop_string(void **state)
{
    (void)state;
    bool checked = false;
    for (uint64_t seed = 1; seed < 20 && !checked; seed++) {
        struct req r = {
            .which = 60, .n_prompt = 16, .max_tokens = 60, .temperature = 0.9f, .seed = seed};
        struct out full, stopped;
        run_alone(&r, 256, &full);
        char stop[4];
        if (!pick_stop(full.text, full.n_text, stop))
            continue;
        const char *at = strstr(full.text, stop);
        assert_non_null(at);
        size_t want = (size_t)(at - full.text);
        r.stop = stop;
        run_alone(&r, 256, &stopped);
        assert_int_equal(stopped.finish, ENGINE_FINISH_STOP);
        if (stopped.n_text != want || memcmp(stopped.text, full.text, want) != 0)
            fail_msg("stop '%s': got '%s', want the %zu bytes before it of '%s'", stop,
                     stopped.text, want, full.text);
        assert_null(strstr(stopped.text, stop));
        assert_true(stopped.n_tok <= full.n_tok);
        checked = true;
    }
    assert_true(checked);
}

/* ---- cancellation ---------------------------------------------------------------------- */

static void test_cancel_frees_the_slot(void **state)
{
    (void)state;
    struct engine e;
    eng_open(&e, 2, 64, 0, 0);
    struct req r = {.which = 70, .n_prompt = 20, .max_tokens = 200, .seed = 3};
    struct out o;
    submit(&e, &r, &o);
    /* the scheduler gives out ids from 1 */
    for (int i = 0; i < 5; i++)
        engine_sched_step(e.sched);
    engine_sched_cancel(e.sched, 1);
    engine_sched_step(e.sched);
    assert_true(o.done);
    assert_int_equal(o.finish, ENGINE_FINISH_CANCELLED);
    assert_int_equal(engine_sched_active(e.sched), 0);
    assert_int_equal(engine_sched_free_slots(e.sched), 2);
    uint32_t total, free_;
    engine_sched_kv_blocks(e.sched, &total, &free_);
    assert_int_equal(free_, total);
    engine_unload(&e);
}

static int setup(void **state)
{
    (void)state;
    struct gguf_gen_opts o;
    if (gguf_gen_preset("tiny", &o) != PW_OK)
        return -1;
    o.type = KERNEL_DTYPE_Q4_1;
    o.seed = 11;
    snprintf(model_path, sizeof model_path, "/tmp/pw_test_sched_XXXXXX");
    int fd = mkstemp(model_path);
    if (fd < 0)
        return -1;
    FILE *f = fdopen(fd, "wb");
    char err[256];
    if (!f || gguf_gen_write(&o, f, err, sizeof err) != PW_OK) {
        fprintf(stderr, "gguf_gen_write: %s\n", err);
        return -1;
    }
    return fclose(f) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    unlink(model_path);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_invariance_greedy),
        cmocka_unit_test(test_batch_invariance_temperature),
        cmocka_unit_test(test_late_join_same_tokens),
        cmocka_unit_test(test_candidate_choices_match_full_rows),
        cmocka_unit_test(test_preemption_completes_with_same_tokens),
        cmocka_unit_test(test_foreground_first_token_skips_background),
        cmocka_unit_test(test_foreground_preempts_background_first),
        cmocka_unit_test(test_prefix_reuse),
        cmocka_unit_test(test_max_tokens_gives_length),
        cmocka_unit_test(test_context_limit_gives_length),
        cmocka_unit_test(test_stop_string),
        cmocka_unit_test(test_cancel_frees_the_slot),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

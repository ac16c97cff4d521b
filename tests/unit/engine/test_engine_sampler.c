/*
 * Unit tests for engine_sampler: greedy and tie-break, seeded determinism and batch
 * invariance, distributions under temperature / top_k / top_p / min_p, penalties and
 * logprobs checked against values computed by hand, parameter validation, and truncation
 * on a full-size vocabulary against a brute-force sort.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine_sampler.h"
#include "pw_test_cand.h"

#define N_CTX 4096
#define BIG_VOCAB 49152

static struct engine_sampler *make(int32_t n_vocab, const struct engine_sampler_params *p)
{
    struct engine_sampler *s = NULL;
    char err[128] = "";
    enum pw_err e = engine_sampler_create(n_vocab, N_CTX, p, &s, err, sizeof(err));
    if (e)
        fprintf(stderr, "create: %s\n", err);
    assert_int_equal(e, PW_OK);
    assert_non_null(s);
    return s;
}

static int32_t draw(struct engine_sampler *s, const float *logits)
{
    struct engine_sampler_result r;
    assert_int_equal(engine_sampler_sample(s, logits, &r), PW_OK);
    return r.token;
}

/* Deterministic pseudo-random logits for the tests (not the sampler's PRNG). */
static uint64_t lcg_state;

static double lcg_uniform(void)
{
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) * 0x1.0p-53;
}

static void random_logits(float *l, int32_t n, uint64_t seed, float scale)
{
    lcg_state = seed;
    for (int32_t i = 0; i < n; i++)
        l[i] = (float)((lcg_uniform() * 2.0 - 1.0) * scale);
}

/* ---------------------------------------------------------------------------------- */

static void test_greedy_and_ties(void **state)
{
    (void)state;
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    struct engine_sampler *s = make(5, &p);
    const float l1[5] = {1.0f, 3.0f, 3.0f, 2.0f, -1.0f};
    for (int i = 0; i < 10; i++)
        assert_int_equal(draw(s, l1), 1);
    const float l2[5] = {7.0f, 7.0f, 7.0f, 7.0f, 7.0f};
    assert_int_equal(draw(s, l2), 0);
    /* -0 and +0 tie: the lower id wins. */
    const float l3[5] = {-1.0f, -0.0f, 0.0f, -2.0f, -3.0f};
    assert_int_equal(draw(s, l3), 1);
    /* NaN counts as -inf. */
    const float l4[5] = {NAN, -5.0f, NAN, -4.0f, NAN};
    assert_int_equal(draw(s, l4), 3);
    struct engine_sampler_result r;
    const float l5[5] = {NAN, NAN, -INFINITY, NAN, NAN};
    assert_int_equal(engine_sampler_sample(s, l5, &r), PW_ERR_RANGE);
    const float l6[5] = {0.0f, INFINITY, 0.0f, 0.0f, 0.0f};
    assert_int_equal(engine_sampler_sample(s, l6, &r), PW_ERR_RANGE);
    engine_sampler_destroy(s);
}

static void test_validation_messages(void **state)
{
    (void)state;
    struct engine_sampler_params p;
    char err[160];
    struct engine_sampler *s = NULL;

#define BAD(field, value, word)                                                                    \
    do {                                                                                           \
        engine_sampler_params_default(&p);                                                         \
        p.field = value;                                                                           \
        err[0] = 0;                                                                                \
        assert_int_equal(engine_sampler_params_validate(&p, err, sizeof(err)), PW_ERR_INVAL);      \
        if (!strstr(err, word))                                                                    \
            fail_msg("message \"%s\" does not name %s", err, word);                                \
        assert_int_equal(engine_sampler_create(10, 16, &p, &s, err, sizeof(err)), PW_ERR_INVAL);   \
        assert_null(s);                                                                            \
    } while (0)

    BAD(temperature, -0.1f, "temperature");
    BAD(temperature, 2.01f, "temperature");
    BAD(temperature, NAN, "temperature");
    BAD(top_k, -1, "top_k");
    BAD(top_p, 0.0f, "top_p");
    BAD(top_p, 1.5f, "top_p");
    BAD(top_p, NAN, "top_p");
    BAD(min_p, -0.5f, "min_p");
    BAD(min_p, 1.01f, "min_p");
    BAD(presence_penalty, 2.5f, "presence_penalty");
    BAD(presence_penalty, -2.5f, "presence_penalty");
    BAD(frequency_penalty, 3.0f, "frequency_penalty");
    BAD(frequency_penalty, NAN, "frequency_penalty");
    BAD(repetition_penalty, 0.0f, "repetition_penalty");
    BAD(repetition_penalty, -1.0f, "repetition_penalty");
    BAD(repetition_penalty, INFINITY, "repetition_penalty");
    BAD(repetition_last_n, -2, "repetition_last_n");
    BAD(choice, 8, "choice");
    BAD(top_logprobs, 21, "top_logprobs");
    BAD(top_logprobs, -1, "top_logprobs");
    BAD(top_logprobs, 3, "logprobs"); /* without logprobs = true */
#undef BAD

    /* Edges that are allowed. */
    engine_sampler_params_default(&p);
    p.temperature = 2.0f;
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.presence_penalty = -2.0f;
    p.frequency_penalty = 2.0f;
    p.repetition_penalty = 0.5f;
    p.repetition_last_n = -1;
    p.choice = 7;
    p.logprobs = true;
    p.top_logprobs = 20;
    assert_int_equal(engine_sampler_params_validate(&p, err, sizeof(err)), PW_OK);

    engine_sampler_params_default(&p);
    assert_int_equal(engine_sampler_create(0, 16, &p, &s, err, sizeof(err)), PW_ERR_INVAL);
    assert_non_null(strstr(err, "n_vocab"));
    assert_int_equal(engine_sampler_create(10, 0, &p, &s, err, sizeof(err)), PW_ERR_INVAL);
    assert_non_null(strstr(err, "n_ctx"));

    /* A failed reset keeps the old params. */
    s = make(10, &p);
    struct engine_sampler_params q = p;
    q.top_p = 0.0f;
    assert_int_equal(engine_sampler_reset(s, &q, err, sizeof(err)), PW_ERR_INVAL);
    assert_true(engine_sampler_params(s)->top_p == 1.0f);
    assert_int_equal(engine_sampler_accept(s, 10), PW_ERR_INVAL);
    assert_int_equal(engine_sampler_accept(s, -1), PW_ERR_INVAL);
    int32_t bad_prompt[2] = {3, 99};
    assert_int_equal(engine_sampler_accept_prompt(s, bad_prompt, 2), PW_ERR_INVAL);
    engine_sampler_destroy(s);
    engine_sampler_destroy(NULL);
}

/* Runs n steps of sampling with per-step logits derived from step and the token history. */
static void run_sequence(struct engine_sampler *s, int32_t n_vocab, int steps, int32_t *out,
                         float *row)
{
    for (int t = 0; t < steps; t++) {
        random_logits(row, n_vocab, 1000u + (uint64_t)t, 4.0f);
        out[t] = draw(s, row);
        assert_int_equal(engine_sampler_accept(s, out[t]), PW_OK);
    }
}

static void test_seed_determinism_and_batch_invariance(void **state)
{
    (void)state;
    enum { V = 1000, STEPS = 200 };
    static float row[V], other[V];
    static int32_t a[STEPS], b[STEPS], c[STEPS];
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.9f;
    p.top_p = 0.95f;
    p.top_k = 100;
    p.frequency_penalty = 0.3f;
    p.repetition_penalty = 1.1f;
    p.seed = 42;

    struct engine_sampler *s = make(V, &p);
    run_sequence(s, V, STEPS, a, row);
    engine_sampler_destroy(s);

    s = make(V, &p);
    run_sequence(s, V, STEPS, b, row);
    assert_memory_equal(a, b, sizeof(a));

    /* Reset reproduces a fresh sampler. */
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    run_sequence(s, V, STEPS, b, row);
    assert_memory_equal(a, b, sizeof(a));

    /* Interleave with other samplers (other seeds, choices, params) drawing on other rows:
     * the sequence is unchanged. */
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    struct engine_sampler *others[3];
    for (int i = 0; i < 3; i++) {
        struct engine_sampler_params q = p;
        q.seed = 42;
        q.choice = (uint32_t)i + 1;
        q.temperature = 1.5f;
        q.top_p = 1.0f;
        others[i] = make(V, &q);
    }
    for (int t = 0; t < STEPS; t++) {
        for (int i = 0; i < 3; i++) {
            for (int k = 0; k <= t % 3; k++) {
                random_logits(other, V, 77u + (uint64_t)(t * 7 + i), 3.0f);
                (void)engine_sampler_accept(others[i], draw(others[i], other));
            }
        }
        random_logits(row, V, 1000u + (uint64_t)t, 4.0f);
        c[t] = draw(s, row);
        assert_int_equal(engine_sampler_accept(s, c[t]), PW_OK);
    }
    assert_memory_equal(a, c, sizeof(a));
    for (int i = 0; i < 3; i++)
        engine_sampler_destroy(others[i]);

    /* Another choice index or seed gives another sequence. */
    struct engine_sampler_params q = p;
    q.choice = 1;
    assert_int_equal(engine_sampler_reset(s, &q, NULL, 0), PW_OK);
    run_sequence(s, V, STEPS, b, row);
    assert_memory_not_equal(a, b, sizeof(a));
    q = p;
    q.seed = 43;
    assert_int_equal(engine_sampler_reset(s, &q, NULL, 0), PW_OK);
    run_sequence(s, V, STEPS, b, row);
    assert_memory_not_equal(a, b, sizeof(a));
    engine_sampler_destroy(s);
}

/* Pearson chi-square of counts against probabilities. */
static double chi_square(const int *counts, const double *probs, int k, int n)
{
    double x2 = 0.0;
    for (int i = 0; i < k; i++) {
        double e = probs[i] * n;
        x2 += (counts[i] - e) * (counts[i] - e) / e;
    }
    return x2;
}

/* Draws n tokens and counts them. */
static void histogram(struct engine_sampler *s, const float *l, int n, int *counts, int k)
{
    memset(counts, 0, sizeof(int) * (size_t)k);
    for (int i = 0; i < n; i++) {
        int32_t t = draw(s, l);
        assert_true(t >= 0 && t < k);
        counts[t]++;
    }
}

static void test_temperature_distribution(void **state)
{
    (void)state;
    enum { N = 20000 };
    const double probs[4] = {0.1, 0.2, 0.3, 0.4};
    float l[4];
    for (int i = 0; i < 4; i++)
        l[i] = (float)log(probs[i]) + 5.0f; /* shift: softmax is shift-invariant */
    int counts[4];
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.seed = 7;
    struct engine_sampler *s = make(4, &p);
    histogram(s, l, N, counts, 4);
    /* 3 degrees of freedom: 16.27 is the 0.999 quantile. */
    assert_true(chi_square(counts, probs, 4, N) < 16.27);

    /* T = 0.5 squares the probabilities. */
    p.temperature = 0.5f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 4);
    double sq[4], z = 0;
    for (int i = 0; i < 4; i++)
        z += probs[i] * probs[i];
    for (int i = 0; i < 4; i++)
        sq[i] = probs[i] * probs[i] / z;
    assert_true(chi_square(counts, sq, 4, N) < 16.27);

    /* T = 2 takes square roots. */
    p.temperature = 2.0f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 4);
    z = 0;
    for (int i = 0; i < 4; i++)
        z += sqrt(probs[i]);
    for (int i = 0; i < 4; i++)
        sq[i] = sqrt(probs[i]) / z;
    assert_true(chi_square(counts, sq, 4, N) < 16.27);

    /* A -inf logit is never drawn. */
    float lm[4] = {0.0f, -INFINITY, 0.0f, NAN};
    p.temperature = 1.0f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, lm, 2000, counts, 4);
    assert_int_equal(counts[1], 0);
    assert_int_equal(counts[3], 0);
    assert_true(counts[0] > 900 && counts[2] > 900);
    engine_sampler_destroy(s);
}

/* top_k = 1 and a tiny top_p are greedy, ties included, over many random rows. */
static void test_truncation_degenerates_to_greedy(void **state)
{
    (void)state;
    enum { V = 2000 };
    static float l[V];
    struct engine_sampler_params pg, pk, pp, pm;
    engine_sampler_params_default(&pg);
    pg.temperature = 0.0f;
    engine_sampler_params_default(&pk);
    pk.top_k = 1;
    pk.temperature = 2.0f;
    pk.seed = 1;
    engine_sampler_params_default(&pp);
    pp.top_p = 1e-6f;
    pp.temperature = 2.0f;
    pp.seed = 2;
    engine_sampler_params_default(&pm);
    pm.min_p = 1.0f;
    pm.temperature = 2.0f;
    pm.seed = 3;
    struct engine_sampler *g = make(V, &pg), *k = make(V, &pk), *p = make(V, &pp),
                          *m = make(V, &pm);
    for (int t = 0; t < 200; t++) {
        random_logits(l, V, 5000u + (uint64_t)t, 6.0f);
        if (t % 2) {
            /* Quantize so that the max is tied between several ids. */
            for (int i = 0; i < V; i++)
                l[i] = floorf(l[i]);
        }
        int32_t want = draw(g, l);
        assert_int_equal(draw(k, l), want);
        assert_int_equal(draw(p, l), want);
        /* min_p = 1 keeps every token tied with the max: one of them. */
        int32_t got = draw(m, l);
        assert_true(got == want || l[got] == l[want]);
        if (t % 2 == 0)
            assert_int_equal(got, want);
    }
    engine_sampler_destroy(g);
    engine_sampler_destroy(k);
    engine_sampler_destroy(p);
    engine_sampler_destroy(m);
}

/* top_k, top_p and min_p keep exactly the sets computed by hand, renormalized. */
static void test_truncation_sets(void **state)
{
    (void)state;
    enum { N = 20000 };
    /* Probabilities by id, shuffled so that id order != rank order. */
    const double probs[6] = {0.05, 0.30, 0.10, 0.40, 0.15, 0.00001};
    float l[6];
    double z = 0;
    for (int i = 0; i < 6; i++)
        z += probs[i];
    for (int i = 0; i < 6; i++)
        l[i] = (float)log(probs[i] / z);
    int counts[6];
    struct engine_sampler_params p;

    /* top_k = 2: ids 3 and 1 with 0.4:0.3. */
    engine_sampler_params_default(&p);
    p.top_k = 2;
    p.seed = 11;
    struct engine_sampler *s = make(6, &p);
    histogram(s, l, N, counts, 6);
    assert_int_equal(counts[0] + counts[2] + counts[4] + counts[5], 0);
    double e2[2] = {0.4 / 0.7, 0.3 / 0.7};
    int c2[2] = {counts[3], counts[1]};
    assert_true(chi_square(c2, e2, 2, N) < 10.83);

    /* top_p = 0.75: 0.40 + 0.30 = 0.70 < 0.75, + 0.15 = 0.85 >= 0.75 -> {3, 1, 4}. */
    engine_sampler_params_default(&p);
    p.top_p = 0.75f;
    p.seed = 12;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 6);
    assert_int_equal(counts[0] + counts[2] + counts[5], 0);
    double e3[3] = {0.40 / 0.85, 0.30 / 0.85, 0.15 / 0.85};
    int c3[3] = {counts[3], counts[1], counts[4]};
    assert_true(chi_square(c3, e3, 3, N) < 13.82);

    /* top_p = 0.7 exactly reached by {3, 1} (float rounding may add one: allow {3,1,4}). */
    p.top_p = 0.69f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 6);
    assert_int_equal(counts[0] + counts[2] + counts[4] + counts[5], 0);

    /* min_p = 0.3: keep p >= 0.12 -> {1, 3, 4}. */
    engine_sampler_params_default(&p);
    p.min_p = 0.3f;
    p.seed = 13;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 6);
    assert_int_equal(counts[0] + counts[2] + counts[5], 0);
    int c4[3] = {counts[3], counts[1], counts[4]};
    assert_true(chi_square(c4, e3, 3, N) < 13.82);

    /* Chain: top_k = 3 then top_p = 0.5 over the renormalized three -> {3, 1}
     * (0.40/0.85 = 0.47 < 0.5). */
    engine_sampler_params_default(&p);
    p.top_k = 3;
    p.top_p = 0.5f;
    p.seed = 14;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    histogram(s, l, N, counts, 6);
    assert_int_equal(counts[0] + counts[2] + counts[4] + counts[5], 0);
    assert_true(counts[1] > 0 && counts[3] > 0);
    engine_sampler_destroy(s);
}

/* Checks r's logprobs against a log-softmax of the penalized logits computed here. */
static void expect_logprobs(const float *penalized, int n, const struct engine_sampler_result *r)
{
    double z = 0.0, max = -INFINITY;
    for (int i = 0; i < n; i++)
        if (penalized[i] > max)
            max = penalized[i];
    for (int i = 0; i < n; i++)
        z += exp(penalized[i] - max);
    double lse = max + log(z);
    assert_true(r->n_top == n);
    for (int i = 0; i < r->n_top; i++) {
        int32_t t = r->top[i].token;
        assert_float_equal(r->top[i].logprob, penalized[t] - lse, 1e-5);
        if (i > 0) {
            assert_true(r->top[i - 1].logprob >= r->top[i].logprob);
            if (r->top[i - 1].logprob == r->top[i].logprob)
                assert_true(r->top[i - 1].token < t);
        }
    }
    assert_float_equal(r->logprob, penalized[r->token] - lse, 1e-5);
}

static void test_logprobs_by_hand(void **state)
{
    (void)state;
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.logprobs = true;
    p.top_logprobs = 3;
    struct engine_sampler *s = make(3, &p);
    /* probs 1/6, 2/6, 3/6 */
    const float l[3] = {0.0f, (float)log(2.0), (float)log(3.0)};
    struct engine_sampler_result r;
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    assert_int_equal(r.token, 2);
    assert_float_equal(r.logprob, log(0.5), 1e-6);
    assert_int_equal(r.n_top, 3);
    assert_int_equal(r.top[0].token, 2);
    assert_int_equal(r.top[1].token, 1);
    assert_int_equal(r.top[2].token, 0);
    assert_float_equal(r.top[1].logprob, log(2.0 / 6.0), 1e-6);
    assert_float_equal(r.top[2].logprob, log(1.0 / 6.0), 1e-6);
    double sum = 0;
    for (int i = 0; i < 3; i++)
        sum += exp(r.top[i].logprob);
    assert_float_equal(sum, 1.0, 1e-6);

    /* Logprobs do not depend on temperature or truncation. */
    p.temperature = 1.7f;
    p.top_k = 1;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    assert_int_equal(r.token, 2);
    assert_float_equal(r.logprob, log(0.5), 1e-6);
    assert_float_equal(r.top[2].logprob, log(1.0 / 6.0), 1e-6);

    /* top_logprobs larger than the vocabulary; ties listed by id. */
    p.top_k = 0;
    p.top_logprobs = 20;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    const float t[3] = {1.0f, 1.0f, 1.0f};
    assert_int_equal(engine_sampler_sample(s, t, &r), PW_OK);
    assert_int_equal(r.n_top, 3);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(r.top[i].token, i);
        assert_float_equal(r.top[i].logprob, -log(3.0), 1e-6);
    }

    /* No logprobs requested: nothing reported. */
    p.logprobs = false;
    p.top_logprobs = 0;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    assert_int_equal(r.n_top, 0);
    assert_true(r.logprob == 0.0f);
    engine_sampler_destroy(s);
}

static void test_repetition_penalty(void **state)
{
    (void)state;
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.repetition_penalty = 2.0f;
    p.repetition_last_n = -1;
    p.logprobs = true;
    p.top_logprobs = 5;
    struct engine_sampler *s = make(5, &p);
    const float l[5] = {2.0f, 1.0f, -1.0f, 0.5f, 0.0f};
    const int32_t prompt[4] = {0, 2, 0, 4};
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 4), PW_OK);
    struct engine_sampler_result r;
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    /* 0: 2/2 = 1 (once, however often it occurs); 2: -1*2 = -2; 4: 0 stays 0. */
    const float want[5] = {1.0f, 1.0f, -2.0f, 0.5f, 0.0f};
    expect_logprobs(want, 5, &r);
    assert_int_equal(r.token, 0); /* tie 1.0 / 1.0: lower id */

    /* Window of 2: only the last two tokens (0, 4) count. */
    p.repetition_last_n = 2;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 4), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    const float want2[5] = {1.0f, 1.0f, -1.0f, 0.5f, 0.0f};
    expect_logprobs(want2, 5, &r);
    /* Generated tokens slide the window: accept 3 then 3 -> window (3, 3). */
    assert_int_equal(engine_sampler_accept(s, 3), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 3), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    const float want3[5] = {2.0f, 1.0f, -1.0f, 0.25f, 0.0f};
    expect_logprobs(want3, 5, &r);

    /* last_n = 0 turns it off; penalty < 1 rewards. */
    p.repetition_last_n = 0;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 4), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    expect_logprobs(l, 5, &r);
    p.repetition_last_n = 64;
    p.repetition_penalty = 0.5f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 4), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    const float want4[5] = {4.0f, 1.0f, -0.5f, 0.5f, 0.0f};
    expect_logprobs(want4, 5, &r);
    engine_sampler_destroy(s);
}

static void test_presence_frequency_penalties(void **state)
{
    (void)state;
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 0.25f;
    p.frequency_penalty = 0.5f;
    p.logprobs = true;
    p.top_logprobs = 4;
    struct engine_sampler *s = make(4, &p);
    const float l[4] = {2.0f, 1.0f, -1.0f, 0.5f};
    /* Prompt tokens do not count for presence / frequency. */
    const int32_t prompt[3] = {0, 0, 2};
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 3), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 1), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 1), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 3), PW_OK);
    struct engine_sampler_result r;
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    /* 1: 1 - 0.25 - 2*0.5 = -0.25; 3: 0.5 - 0.25 - 0.5 = -0.25. */
    const float want[4] = {2.0f, -0.25f, -1.0f, -0.25f};
    expect_logprobs(want, 4, &r);
    assert_int_equal(r.token, 0);

    /* Three more of token 0: 2 - 0.25 - 3 * 0.5. */
    for (int i = 0; i < 3; i++)
        assert_int_equal(engine_sampler_accept(s, 0), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    /* 0: 2 - 0.25 - 1.5 = 0.25 */
    const float want2[4] = {0.25f, -0.25f, -1.0f, -0.25f};
    expect_logprobs(want2, 4, &r);

    /* Negative penalties encourage repeats. */
    p.presence_penalty = -1.0f;
    p.frequency_penalty = 0.0f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 2), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    const float want3[4] = {2.0f, 1.0f, 0.0f, 0.5f};
    expect_logprobs(want3, 4, &r);

    /* All together, repetition first: token 0 in the prompt and generated once:
     * 2 / 2 = 1, then - 0.25 - 0.5 = 0.25. */
    p.presence_penalty = 0.25f;
    p.frequency_penalty = 0.5f;
    p.repetition_penalty = 2.0f;
    assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
    assert_int_equal(engine_sampler_accept_prompt(s, prompt, 1), PW_OK);
    assert_int_equal(engine_sampler_accept(s, 0), PW_OK);
    assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
    const float want4[4] = {0.25f, 1.0f, -1.0f, 0.5f};
    expect_logprobs(want4, 4, &r);
    assert_int_equal(r.token, 1);
    engine_sampler_destroy(s);
}

/* Penalties after random histories against a brute-force recount of the window. */
static void test_penalties_random_vs_bruteforce(void **state)
{
    (void)state;
    enum { V = 8, CTX = 6, OPS = 60 };
    float l[V], want[V];
    int32_t hist[OPS];
    bool generated[OPS];
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.logprobs = true;
    p.top_logprobs = V;
    p.presence_penalty = 0.3f;
    p.frequency_penalty = 0.2f;
    p.repetition_penalty = 1.5f;
    struct engine_sampler *s = NULL;
    assert_int_equal(engine_sampler_create(V, CTX, &p, &s, NULL, 0), PW_OK);
    lcg_state = 99;
    for (int round = 0; round < 40; round++) {
        const int32_t windows[] = {-1, 0, 1, 2, 3, 5, 6, 100};
        p.repetition_last_n = windows[round % 8];
        int32_t w =
            p.repetition_last_n < 0 || p.repetition_last_n > CTX ? CTX : p.repetition_last_n;
        assert_int_equal(engine_sampler_reset(s, &p, NULL, 0), PW_OK);
        for (int i = 0; i < V; i++)
            l[i] = (float)(lcg_uniform() * 6.0 - 3.0);
        int n = 0;
        for (int op = 0; op < OPS; op++) {
            int32_t t = (int32_t)(lcg_uniform() * V);
            bool gen = n > 0 && lcg_uniform() < 0.6;
            if (gen)
                assert_int_equal(engine_sampler_accept(s, t), PW_OK);
            else
                assert_int_equal(engine_sampler_accept_prompt(s, &t, 1), PW_OK);
            hist[n] = t;
            generated[n] = gen;
            n++;
            for (int i = 0; i < V; i++) {
                int in_window = 0, count = 0;
                for (int j = 0; j < n; j++) {
                    if (hist[j] != i)
                        continue;
                    if (j >= n - w)
                        in_window = 1;
                    if (generated[j])
                        count++;
                }
                float x = l[i];
                if (in_window && w > 0)
                    x = x > 0.0f ? x / 1.5f : x * 1.5f;
                x -= (count > 0 ? 0.3f : 0.0f) + 0.2f * (float)count;
                want[i] = x;
            }
            struct engine_sampler_result r;
            assert_int_equal(engine_sampler_sample(s, l, &r), PW_OK);
            expect_logprobs(want, V, &r);
        }
    }
    engine_sampler_destroy(s);
}

/* ---- full-size vocabulary: truncation against a brute-force sort ---- */

static const float *sort_keys;

static int by_rank(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (sort_keys[x] != sort_keys[y])
        return sort_keys[x] > sort_keys[y] ? -1 : 1;
    return x < y ? -1 : 1;
}

static void test_big_vocab_against_sort(void **state)
{
    (void)state;
    static float l[BIG_VOCAB];
    static int32_t rank_ids[BIG_VOCAB];
    static int32_t rank_of[BIG_VOCAB];
    struct engine_sampler_params pk, pp;
    engine_sampler_params_default(&pk);
    pk.top_k = 40;
    pk.temperature = 2.0f;
    pk.seed = 5;
    engine_sampler_params_default(&pp);
    pp.top_p = 0.9f;
    pp.temperature = 1.0f;
    pp.seed = 6;
    struct engine_sampler *sk = make(BIG_VOCAB, &pk), *sp = make(BIG_VOCAB, &pp);

    for (int row = 0; row < 6; row++) {
        random_logits(l, BIG_VOCAB, 900u + (uint64_t)row, 8.0f);
        if (row % 2) /* heavy ties, including at the top-k boundary */
            for (int i = 0; i < BIG_VOCAB; i++)
                l[i] = floorf(l[i] * 2.0f);
        /* peaky rows make a small nucleus; flat rows a large one */
        if (row >= 4)
            for (int i = 0; i < BIG_VOCAB; i++)
                l[i] *= 3.0f;
        for (int i = 0; i < BIG_VOCAB; i++)
            rank_ids[i] = i;
        sort_keys = l;
        qsort(rank_ids, BIG_VOCAB, sizeof(int32_t), by_rank);
        for (int i = 0; i < BIG_VOCAB; i++)
            rank_of[rank_ids[i]] = i;
        /* The nucleus by brute force. */
        double z = 0;
        for (int i = 0; i < BIG_VOCAB; i++)
            z += exp((double)l[i] - l[rank_ids[0]]);
        double acc = 0;
        int nucleus = BIG_VOCAB;
        for (int i = 0; i < BIG_VOCAB; i++) {
            acc += exp((double)l[rank_ids[i]] - l[rank_ids[0]]);
            if (acc >= 0.9 * z) {
                nucleus = i + 1;
                break;
            }
        }
        int seen_k[40] = {0};
        for (int d = 0; d < 200; d++) {
            int32_t t = draw(sk, l);
            assert_true(rank_of[t] < 40);
            seen_k[rank_of[t]] = 1;
            t = draw(sp, l);
            /* one token of slack for float-vs-double rounding at the boundary */
            assert_true(rank_of[t] < nucleus + 1);
        }
        /* At T = 2 nearly all 40 kept tokens show up over 200 draws on flat rows. */
        if (row < 4) {
            int seen = 0;
            for (int i = 0; i < 40; i++)
                seen += seen_k[i];
            assert_true(seen >= 30);
        }
    }
    engine_sampler_destroy(sk);
    engine_sampler_destroy(sp);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Informational timing on the default model's vocabulary; asserts only the results. */
/* ---- choices from candidates (a backend's ops->topk) ---------------------------------- */

static const float *vals_dummy(void)
{
    static const float v[5] = {1, 0, 0, 0, 0};
    return v;
}

static void test_candidates_match_whole_row(void **state)
{
    (void)state;
    enum { V = 700, K = 8 };
    struct engine_sampler_params p;
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    p.logprobs = true;
    p.top_logprobs = 5;
    struct engine_sampler *s = make(V, &p);
    assert_int_equal(engine_sampler_candidates_needed(s), 5);
    float *l = malloc(V * sizeof(float));
    int32_t *order = malloc(V * sizeof(int32_t));
    assert_non_null(l);
    assert_non_null(order);
    for (int trial = 0; trial < 200; trial++) {
        random_logits(l, V, 77 + (uint64_t)trial, 8.0f);
        for (int32_t i = 0; i < V; i++) {
            if (trial % 3 == 0)
                l[i] = roundf(l[i]); /* ties */
            if (trial % 5 == 0 && i % 97 == 3)
                l[i] = NAN;
            if (trial % 7 == 0 && l[i] == 0.0f)
                l[i] = (i % 2) ? -0.0f : 0.0f; /* signed zeros tie */
        }
        if (trial % 11 == 0) { /* the max is a -0/+0 tie: the lower id must win */
            for (int32_t i = 0; i < V; i++)
                l[i] = -1.0f;
            l[10] = -0.0f;
            l[20] = 0.0f;
        }
        pw_test_candidate_order(l, V, order);
        float vals[K], lse;
        int32_t ids[K];
        double mx = l[order[0]], z = 0.0;
        for (int32_t i = 0; i < V; i++)
            if (!isnan(l[i]))
                z += exp((double)l[i] - mx);
        lse = (float)(mx + log(z));
        for (int j = 0; j < K; j++) {
            vals[j] = l[order[j]];
            ids[j] = order[j];
        }
        struct engine_sampler_result a, b;
        assert_int_equal(engine_sampler_sample(s, l, &a), PW_OK);
        assert_int_equal(engine_sampler_sample_candidates(s, vals, ids, K, lse, &b), PW_OK);
        assert_int_equal(a.token, b.token);
        assert_true(fabsf(a.logprob - b.logprob) <= 1e-5f);
        assert_int_equal(a.n_top, b.n_top);
        for (int32_t j = 0; j < a.n_top; j++) {
            assert_int_equal(a.top[j].token, b.top[j].token);
            assert_true(fabsf(a.top[j].logprob - b.top[j].logprob) <= 1e-5f);
        }
    }
    /* too few candidates, or none usable */
    float v1[1] = {1.0f}, lse1 = 1.0f;
    int32_t i1[1] = {0};
    struct engine_sampler_result r;
    assert_int_equal(engine_sampler_sample_candidates(s, v1, i1, 1, lse1, &r), PW_ERR_INVAL);
    float vinf[5] = {INFINITY, 1, 1, 1, 1},
          vneg[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int32_t i5[5] = {0, 1, 2, 3, 4};
    assert_int_equal(engine_sampler_sample_candidates(s, vinf, i5, 5, 1.0f, &r), PW_ERR_RANGE);
    assert_int_equal(engine_sampler_sample_candidates(s, vneg, i5, 5, 1.0f, &r), PW_ERR_RANGE);
    engine_sampler_destroy(s);

    /* what needs the whole row: sampling, and every penalty */
    struct {
        float temperature, presence, frequency, repetition;
    } whole[] = {{0.7f, 0, 0, 1}, {0, 0.5f, 0, 1}, {0, 0, 0.1f, 1}, {0, 0, 0, 1.1f}};
    for (size_t i = 0; i < sizeof whole / sizeof whole[0]; i++) {
        engine_sampler_params_default(&p);
        p.temperature = whole[i].temperature;
        p.presence_penalty = whole[i].presence;
        p.frequency_penalty = whole[i].frequency;
        p.repetition_penalty = whole[i].repetition;
        s = make(V, &p);
        assert_int_equal(engine_sampler_candidates_needed(s), 0);
        assert_int_equal(engine_sampler_sample_candidates(s, vals_dummy(), i5, 5, 0.0f, &r),
                         PW_ERR_INVAL);
        engine_sampler_destroy(s);
    }
    engine_sampler_params_default(&p);
    p.temperature = 0.0f;
    s = make(V, &p);
    assert_int_equal(engine_sampler_candidates_needed(s), 1);
    engine_sampler_destroy(s);
    free(l);
    free(order);
}

static void test_big_vocab_timing(void **state)
{
    (void)state;
    static float l[BIG_VOCAB];
    random_logits(l, BIG_VOCAB, 31337, 10.0f);
    struct {
        const char *name;
        float temperature, top_p, min_p;
        int32_t top_k;
        bool logprobs;
    } cfg[] = {
        {"greedy", 0.0f, 1.0f, 0.0f, 0, false},
        {"plain", 1.0f, 1.0f, 0.0f, 0, false},
        {"top_k=40", 0.8f, 1.0f, 0.0f, 40, false},
        {"top_p=0.9", 0.8f, 0.9f, 0.0f, 0, false},
        {"top_k=50,top_p=0.95", 0.7f, 0.95f, 0.0f, 50, false},
        {"min_p=0.05", 0.8f, 1.0f, 0.05f, 0, false},
        {"greedy+top_logprobs=5", 0.0f, 1.0f, 0.0f, 0, true},
    };
    for (size_t c = 0; c < sizeof(cfg) / sizeof(cfg[0]); c++) {
        struct engine_sampler_params p;
        engine_sampler_params_default(&p);
        p.temperature = cfg[c].temperature;
        p.top_p = cfg[c].top_p;
        p.min_p = cfg[c].min_p;
        p.top_k = cfg[c].top_k;
        p.logprobs = cfg[c].logprobs;
        p.top_logprobs = cfg[c].logprobs ? 5 : 0;
        p.repetition_penalty = 1.1f;
        p.frequency_penalty = 0.1f;
        struct engine_sampler *s = make(BIG_VOCAB, &p);
        int iters = 100;
        double t0 = now_s();
        for (int i = 0; i < iters; i++) {
            int32_t t = draw(s, l);
            assert_int_equal(engine_sampler_accept(s, t), PW_OK);
        }
        double us = (now_s() - t0) / iters * 1e6;
        printf("# sampler n_vocab=%d %-24s %8.1f us/token\n", BIG_VOCAB, cfg[c].name, us);
        engine_sampler_destroy(s);
    }
    printf("# sampler memory n_vocab=%d n_ctx=%d: %zu bytes\n", BIG_VOCAB, N_CTX,
           engine_sampler_memory_bytes(BIG_VOCAB, N_CTX));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_ties),
        cmocka_unit_test(test_validation_messages),
        cmocka_unit_test(test_seed_determinism_and_batch_invariance),
        cmocka_unit_test(test_temperature_distribution),
        cmocka_unit_test(test_truncation_degenerates_to_greedy),
        cmocka_unit_test(test_truncation_sets),
        cmocka_unit_test(test_logprobs_by_hand),
        cmocka_unit_test(test_repetition_penalty),
        cmocka_unit_test(test_presence_frequency_penalties),
        cmocka_unit_test(test_penalties_random_vs_bruteforce),
        cmocka_unit_test(test_big_vocab_against_sort),
        cmocka_unit_test(test_candidates_match_whole_row),
        cmocka_unit_test(test_big_vocab_timing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

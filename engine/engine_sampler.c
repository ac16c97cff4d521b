/*
 * engine_sampler: penalties, truncation (top_k, top_p, min_p), temperature and a seeded
 * draw over one row of logits; see engine_sampler.h and docs/internals/sampler.md.
 *
 * Invariants: every buffer is sized at create; sample() and accept() never allocate.
 * Candidate order is a total order (logit descending, then id ascending), so every result
 * is a pure function of (logits, token history, params, PRNG state): no dependence on
 * batch composition, threads or memory layout.
 *
 * Cost per sampled token, n = n_vocab: one copy and one scan of the row; penalties touch
 * only the tokens in the history; top_k is a radix select (O(n), at most four passes over
 * a shrinking set, no sort of the vocabulary); top_p bins the row by distance from the
 * max logit (one pass) and then sorts only the tokens of the bin where top_p is crossed;
 * min_p is one threshold pass. Logprobs add one pass of expf.
 *
 * Used by one thread at a time (the engine worker that owns the sequence).
 */
#include "engine_sampler.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A candidate token: its (penalized) logit and id. */
struct cand {
    float logit;
    int32_t id;
};

struct engine_sampler {
    int32_t n_vocab; /* tokens in the vocabulary */
    int32_t n_ctx;   /* capacity of the repetition ring, tokens */
    struct engine_sampler_params p;
    uint64_t rng[4]; /* xoshiro256** state; never all zero */

    /* ---- scratch for one sample() call ---- */
    float *work;       /* (n_vocab) penalized logits */
    struct cand *cand; /* (n_vocab) candidate set after truncation */
    float *prob;       /* (n_vocab) unnormalized probabilities of the candidates */
    int32_t *tmp;      /* (n_vocab) token ids, radix-select scratch */

    /* ---- generated tokens of this choice (presence / frequency) ---- */
    uint32_t *gen_count; /* (n_vocab) times generated, saturating */
    int32_t *gen_list;   /* (n_vocab) distinct generated tokens, first-seen order */
    int32_t gen_n;       /* entries of gen_list */

    /* ---- repetition window: the last W tokens of prompt + generated ---- */
    bool rep_on;         /* repetition_penalty != 1 and last_n != 0 */
    int32_t rep_window;  /* W, tokens, 1..n_ctx */
    int32_t *ring;       /* (n_ctx) last W tokens, oldest at ring_head */
    int32_t ring_head;   /* index of the oldest entry */
    int32_t ring_len;    /* entries in the ring, <= rep_window */
    uint32_t *rep_count; /* (n_vocab) occurrences inside the window */
    int32_t *rep_pos;    /* (n_vocab) index in rep_list, valid while rep_count > 0 */
    int32_t *rep_list;   /* (min(n_vocab, n_ctx)) distinct tokens inside the window */
    int32_t rep_n;       /* entries of rep_list */
};

/* ---------------------------------------------------------------------------------- */
/* PRNG: xoshiro256** (Blackman & Vigna), seeded by splitmix64.                        */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t s[4])
{
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4])
{
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

/*
 * The seed is mixed once, then the choice index is added in a second splitmix64 stream, so
 * choices of one request get unrelated streams and a seed change moves every choice.
 */
static void rng_seed(uint64_t s[4], uint64_t seed, uint32_t choice)
{
    uint64_t x = seed;
    uint64_t h = splitmix64(&x);
    uint64_t y = h ^ ((uint64_t)choice * 0xD1B54A32D192ED03ull);
    for (int i = 0; i < 4; i++)
        s[i] = splitmix64(&y);
    if ((s[0] | s[1] | s[2] | s[3]) == 0)
        s[0] = 1; /* the one state xoshiro cannot leave */
}

/* ---------------------------------------------------------------------------------- */
/* Parameters                                                                          */

void engine_sampler_params_default(struct engine_sampler_params *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->repetition_penalty = 1.0f;
    p->repetition_last_n = 64;
    p->seed = 0;
    p->choice = 0;
    p->logprobs = false;
    p->top_logprobs = 0;
}

static enum pw_err fail(char *errbuf, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static enum pw_err fail(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
    }
    return PW_ERR_INVAL;
}

/* Written as !(in range) so NaN fails every check. */
enum pw_err engine_sampler_params_validate(const struct engine_sampler_params *p, char *errbuf,
                                           size_t errlen)
{
    if (!(p->temperature >= 0.0f && p->temperature <= 2.0f))
        return fail(errbuf, errlen, "temperature must be between 0 and 2, got %g",
                    (double)p->temperature);
    if (p->top_k < 0)
        return fail(errbuf, errlen, "top_k must be >= 0 (0 = off), got %d", (int)p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return fail(errbuf, errlen, "top_p must be in (0, 1], got %g", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return fail(errbuf, errlen, "min_p must be between 0 and 1, got %g", (double)p->min_p);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return fail(errbuf, errlen, "presence_penalty must be between -2 and 2, got %g",
                    (double)p->presence_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return fail(errbuf, errlen, "frequency_penalty must be between -2 and 2, got %g",
                    (double)p->frequency_penalty);
    if (!(p->repetition_penalty > 0.0f && isfinite(p->repetition_penalty)))
        return fail(errbuf, errlen, "repetition_penalty must be > 0, got %g",
                    (double)p->repetition_penalty);
    if (p->repetition_last_n < -1)
        return fail(errbuf, errlen,
                    "repetition_last_n must be -1 (all), 0 (off) or a window > 0, got %d",
                    (int)p->repetition_last_n);
    if (p->choice >= ENGINE_SAMPLER_MAX_CHOICES)
        return fail(errbuf, errlen, "choice index must be below n = %d, got %u",
                    ENGINE_SAMPLER_MAX_CHOICES, (unsigned)p->choice);
    if (p->top_logprobs < 0 || p->top_logprobs > ENGINE_SAMPLER_MAX_TOP_LOGPROBS)
        return fail(errbuf, errlen, "top_logprobs must be between 0 and %d, got %d",
                    ENGINE_SAMPLER_MAX_TOP_LOGPROBS, (int)p->top_logprobs);
    if (p->top_logprobs > 0 && !p->logprobs)
        return fail(errbuf, errlen, "top_logprobs requires logprobs to be true");
    return PW_OK;
}

/* ---------------------------------------------------------------------------------- */
/* Lifecycle and history                                                               */

static int32_t min_i32(int32_t a, int32_t b)
{
    return a < b ? a : b;
}

size_t engine_sampler_memory_bytes(int32_t n_vocab, int32_t n_ctx)
{
    size_t v = n_vocab > 0 ? (size_t)n_vocab : 0;
    size_t c = n_ctx > 0 ? (size_t)n_ctx : 0;
    size_t r = v < c ? v : c;
    return sizeof(struct engine_sampler) +
           v * (sizeof(float) * 2 + sizeof(struct cand) + sizeof(int32_t) * 3 +
                sizeof(uint32_t) * 2) +
           c * sizeof(int32_t) + r * sizeof(int32_t);
}

/* Applies params and clears the history; p must already be valid. */
static void sampler_start(struct engine_sampler *s, const struct engine_sampler_params *p)
{
    for (int32_t i = 0; i < s->gen_n; i++)
        s->gen_count[s->gen_list[i]] = 0;
    s->gen_n = 0;
    for (int32_t i = 0; i < s->rep_n; i++)
        s->rep_count[s->rep_list[i]] = 0;
    s->rep_n = 0;
    s->ring_head = 0;
    s->ring_len = 0;

    s->p = *p;
    s->rep_on = p->repetition_penalty != 1.0f && p->repetition_last_n != 0;
    if (p->repetition_last_n < 0 || p->repetition_last_n > s->n_ctx)
        s->rep_window = s->n_ctx;
    else
        s->rep_window = p->repetition_last_n > 0 ? p->repetition_last_n : 1;
    rng_seed(s->rng, p->seed, p->choice);
}

enum pw_err engine_sampler_create(int32_t n_vocab, int32_t n_ctx,
                                  const struct engine_sampler_params *params,
                                  struct engine_sampler **out, char *errbuf, size_t errlen)
{
    struct engine_sampler *s = NULL;
    enum pw_err err;

    *out = NULL;
    if (n_vocab < 1 || n_vocab > ENGINE_SAMPLER_MAX_VOCAB)
        return fail(errbuf, errlen, "n_vocab must be between 1 and %d, got %d",
                    ENGINE_SAMPLER_MAX_VOCAB, (int)n_vocab);
    if (n_ctx < 1)
        return fail(errbuf, errlen, "n_ctx must be >= 1, got %d", (int)n_ctx);
    err = engine_sampler_params_validate(params, errbuf, errlen);
    if (err)
        return err;

    err = PW_ERR_NOMEM;
    s = calloc(1, sizeof(*s));
    if (!s)
        goto out;
    s->n_vocab = n_vocab;
    s->n_ctx = n_ctx;
    size_t v = (size_t)n_vocab;
    s->work = malloc(v * sizeof(*s->work));
    s->cand = malloc(v * sizeof(*s->cand));
    s->prob = malloc(v * sizeof(*s->prob));
    s->tmp = malloc(v * sizeof(*s->tmp));
    s->gen_count = calloc(v, sizeof(*s->gen_count));
    s->gen_list = malloc(v * sizeof(*s->gen_list));
    s->ring = malloc((size_t)n_ctx * sizeof(*s->ring));
    s->rep_count = calloc(v, sizeof(*s->rep_count));
    s->rep_pos = malloc(v * sizeof(*s->rep_pos));
    s->rep_list = malloc((size_t)min_i32(n_vocab, n_ctx) * sizeof(*s->rep_list));
    if (!s->work || !s->cand || !s->prob || !s->tmp || !s->gen_count || !s->gen_list || !s->ring ||
        !s->rep_count || !s->rep_pos || !s->rep_list) {
        if (errbuf && errlen > 0)
            snprintf(errbuf, errlen, "sampler: out of memory for n_vocab=%d n_ctx=%d", (int)n_vocab,
                     (int)n_ctx);
        goto out;
    }
    sampler_start(s, params);
    *out = s;
    s = NULL;
    err = PW_OK;
out:
    engine_sampler_destroy(s);
    return err;
}

void engine_sampler_destroy(struct engine_sampler *s)
{
    if (!s)
        return;
    free(s->rep_list);
    free(s->rep_pos);
    free(s->rep_count);
    free(s->ring);
    free(s->gen_list);
    free(s->gen_count);
    free(s->tmp);
    free(s->prob);
    free(s->cand);
    free(s->work);
    free(s);
}

enum pw_err engine_sampler_reset(struct engine_sampler *s,
                                 const struct engine_sampler_params *params, char *errbuf,
                                 size_t errlen)
{
    enum pw_err err = engine_sampler_params_validate(params, errbuf, errlen);
    if (err)
        return err;
    sampler_start(s, params);
    return PW_OK;
}

const struct engine_sampler_params *engine_sampler_params(const struct engine_sampler *s)
{
    return &s->p;
}

static void rep_add(struct engine_sampler *s, int32_t t)
{
    if (s->rep_count[t]++ == 0) {
        s->rep_pos[t] = s->rep_n;
        s->rep_list[s->rep_n++] = t;
    }
}

static void rep_remove(struct engine_sampler *s, int32_t t)
{
    if (--s->rep_count[t] == 0) {
        int32_t i = s->rep_pos[t];
        int32_t last = s->rep_list[--s->rep_n];
        s->rep_list[i] = last;
        s->rep_pos[last] = i;
    }
}

/* Pushes t into the window, evicting the oldest token once the window is full. */
static void rep_push(struct engine_sampler *s, int32_t t)
{
    int32_t w = s->rep_window;
    if (s->ring_len == w) {
        int32_t old = s->ring[s->ring_head];
        s->ring[s->ring_head] = t;
        s->ring_head = (s->ring_head + 1) % w;
        rep_remove(s, old);
    } else {
        s->ring[(s->ring_head + s->ring_len) % w] = t;
        s->ring_len++;
    }
    rep_add(s, t);
}

enum pw_err engine_sampler_accept_prompt(struct engine_sampler *s, const int32_t *tokens, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= s->n_vocab)
            return PW_ERR_INVAL;
        if (s->rep_on)
            rep_push(s, tokens[i]);
    }
    return PW_OK;
}

enum pw_err engine_sampler_accept(struct engine_sampler *s, int32_t token)
{
    if (token < 0 || token >= s->n_vocab)
        return PW_ERR_INVAL;
    if (s->rep_on)
        rep_push(s, token);
    if (s->gen_count[token] == 0)
        s->gen_list[s->gen_n++] = token;
    if (s->gen_count[token] < UINT32_MAX)
        s->gen_count[token]++;
    return PW_OK;
}

/* ---------------------------------------------------------------------------------- */
/* Selection helpers                                                                   */

/* The candidate order: higher logit first, lower id first among equal logits. */
static bool cand_before(const struct cand *a, const struct cand *b)
{
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static void cand_sift_down(struct cand *c, size_t root, size_t n)
{
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && cand_before(&c[child], &c[child + 1]))
            child++;
        if (!cand_before(&c[root], &c[child]))
            return;
        struct cand t = c[root];
        c[root] = c[child];
        c[child] = t;
        root = child;
    }
}

/* Heapsort into candidate order: O(n log n) worst case, in place, no allocation. */
static void cand_sort(struct cand *c, size_t n)
{
    if (n < 2)
        return;
    for (size_t i = n / 2; i-- > 0;)
        cand_sift_down(c, i, n);
    for (size_t end = n - 1; end > 0; end--) {
        struct cand t = c[0];
        c[0] = c[end];
        c[end] = t;
        cand_sift_down(c, 0, end);
    }
}

/* Maps a float (no NaN, no -0) to a uint32 that orders the same way. */
static uint32_t float_key(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/*
 * Finds the byte value b such that fewer than need keys lie in buckets above b and at
 * least need lie in b or above; *above gets the count above b.
 */
static uint32_t radix_bucket(const uint32_t hist[256], int32_t need, int32_t *above)
{
    int32_t acc = 0;
    uint32_t b = 255;
    for (;; b--) {
        if (acc + (int32_t)hist[b] >= need || b == 0)
            break;
        acc += (int32_t)hist[b];
    }
    *above = acc;
    return b;
}

/*
 * The k best tokens of w (candidate order) into out[0..k), unordered; ties at the boundary
 * go to the lowest ids. Radix select on the float keys, most significant byte first: each
 * pass moves whole buckets above the boundary to out and keeps the boundary bucket in tmp
 * (stable, so ids stay ascending). O(n) and no sort.
 */
static void select_top_k(const float *w, int32_t n, int32_t k, struct cand *out, int32_t *tmp)
{
    uint32_t hist[256];
    int32_t n_out = 0, n_tmp = 0, need = k, above;

    memset(hist, 0, sizeof(hist));
    for (int32_t i = 0; i < n; i++)
        hist[float_key(w[i]) >> 24]++;
    uint32_t b = radix_bucket(hist, need, &above);
    for (int32_t i = 0; i < n; i++) {
        uint32_t kb = float_key(w[i]) >> 24;
        if (kb > b)
            out[n_out++] = (struct cand){w[i], i};
        else if (kb == b)
            tmp[n_tmp++] = i;
    }
    need -= above;
    for (int shift = 16; shift >= 0 && need < n_tmp; shift -= 8) {
        memset(hist, 0, sizeof(hist));
        for (int32_t j = 0; j < n_tmp; j++)
            hist[(float_key(w[tmp[j]]) >> shift) & 0xffu]++;
        b = radix_bucket(hist, need, &above);
        int32_t m = 0;
        for (int32_t j = 0; j < n_tmp; j++) {
            int32_t i = tmp[j];
            uint32_t kb = (float_key(w[i]) >> shift) & 0xffu;
            if (kb > b)
                out[n_out++] = (struct cand){w[i], i};
            else if (kb == b)
                tmp[m++] = i;
        }
        n_tmp = m;
        need -= above;
    }
    /* What is left in tmp has one key (or is exactly what is needed): lowest ids first. */
    for (int32_t j = 0; j < need; j++)
        out[n_out++] = (struct cand){w[tmp[j]], tmp[j]};
    PW_ASSERT(n_out == k);
}

#define TOP_P_BINS_PER_NAT 8
#define TOP_P_BINS (16 * TOP_P_BINS_PER_NAT + 1) /* 16 nats below the max, then the rest */

static int top_p_bin(float d)
{
    if (!(d < 16.0f))
        return TOP_P_BINS - 1;
    return (int)(d * (float)TOP_P_BINS_PER_NAT);
}

/*
 * Nucleus over the candidates (all n_vocab tokens of w when all is true, else c[0..*n)):
 * leaves in c[0..*n) the smallest best-first set whose probability reaches top_p (ties at
 * the edge go to the lower ids). One pass bins every candidate by its distance below the
 * max logit and sums the probability per bin; the bins before the one where the cumulative
 * mass crosses top_p are kept whole and unsorted, and only the crossing bin (1/8 nat wide,
 * a few hundred tokens even on a flat 49k row) is sorted to find the exact edge. The kept
 * set is not in rank order; nothing after this needs it to be.
 */
static void apply_top_p(const float *w, int32_t n_vocab, bool all, struct cand *c, int32_t *n,
                        int32_t *tmp, float max, float top_p)
{
    double mass[TOP_P_BINS];
    double z = 0.0;
    int32_t cnt = all ? n_vocab : *n;

    memset(mass, 0, sizeof(mass));
    for (int32_t i = 0; i < cnt; i++) {
        float d = max - (all ? w[i] : c[i].logit);
        double e = (double)expf(-d);
        z += e;
        mass[top_p_bin(d)] += e;
    }
    double target = (double)top_p * z;
    double sure = 0.0; /* mass of the bins before the crossing one */
    int cross = TOP_P_BINS - 1;
    for (int b = 0; b < TOP_P_BINS; b++) {
        if (sure + mass[b] >= target) {
            cross = b;
            break;
        }
        sure += mass[b];
    }
    int32_t m = 0, nx = 0;
    for (int32_t i = 0; i < cnt; i++) {
        float l = all ? w[i] : c[i].logit;
        int32_t id = all ? i : c[i].id;
        int b = top_p_bin(max - l);
        if (b < cross)
            c[m++] = (struct cand){l, id};
        else if (b == cross)
            tmp[nx++] = id;
    }
    struct cand *x = c + m;
    for (int32_t j = 0; j < nx; j++)
        x[j] = (struct cand){w[tmp[j]], tmp[j]};
    cand_sort(x, (size_t)nx);
    int32_t keep = nx;
    for (int32_t j = 0; j < nx; j++) {
        sure += (double)expf(x[j].logit - max);
        if (sure >= target) {
            keep = j + 1;
            break;
        }
    }
    *n = m + keep;
}

/* Inserts (id, l) into the best-first list top[0..*n) of capacity k. */
static void top_insert(struct engine_sampler_logprob *top, int32_t *n, int32_t k, int32_t id,
                       float l)
{
    if (*n == k && !(l > top[k - 1].logprob))
        return; /* equal values keep the lower id, which came first */
    int32_t i = *n < k ? (*n)++ : k - 1;
    while (i > 0 && top[i - 1].logprob < l) {
        top[i] = top[i - 1];
        i--;
    }
    top[i].token = id;
    top[i].logprob = l;
}

/* ---------------------------------------------------------------------------------- */
/* Sampling                                                                            */

static void apply_penalties(struct engine_sampler *s, float *w)
{
    const struct engine_sampler_params *p = &s->p;

    /* Repetition first (CTRL / llama.cpp), on the model's own sign of the logit. */
    if (s->rep_on) {
        float r = p->repetition_penalty;
        for (int32_t i = 0; i < s->rep_n; i++) {
            int32_t t = s->rep_list[i];
            w[t] = w[t] > 0.0f ? w[t] / r : w[t] * r;
        }
    }
    if (p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f) {
        for (int32_t i = 0; i < s->gen_n; i++) {
            int32_t t = s->gen_list[i];
            w[t] -= p->presence_penalty + p->frequency_penalty * (float)s->gen_count[t];
        }
    }
}

enum pw_err engine_sampler_sample(struct engine_sampler *s, const float *logits,
                                  struct engine_sampler_result *out)
{
    const struct engine_sampler_params *p = &s->p;
    const int32_t n = s->n_vocab;
    float *w = s->work;

    memset(out, 0, sizeof(*out));
    memcpy(w, logits, (size_t)n * sizeof(*w));
    apply_penalties(s, w);

    /* Normalize (NaN -> -inf, -0 -> +0: both keep float_key consistent with <) and find
     * the max; strict > keeps the lowest id among equal maxima. */
    float max = -INFINITY;
    int32_t arg = 0;
    for (int32_t i = 0; i < n; i++) {
        float x = w[i];
        if (isnan(x))
            x = -INFINITY;
        else if (x == 0.0f)
            x = 0.0f;
        w[i] = x;
        if (x > max) {
            max = x;
            arg = i;
        }
    }
    if (!isfinite(max))
        return PW_ERR_RANGE;

    int32_t token;
    if (p->temperature == 0.0f) {
        token = arg;
    } else {
        bool all = true; /* candidates are the whole row, in id order */
        int32_t nc = n;
        struct cand *c = s->cand;

        if (p->top_k > 0 && p->top_k < n) {
            select_top_k(w, n, p->top_k, c, s->tmp);
            nc = p->top_k;
            all = false;
        }
        if (p->top_p < 1.0f) {
            apply_top_p(w, n, all, c, &nc, s->tmp, max, p->top_p);
            all = false;
        }
        if (p->min_p > 0.0f) {
            float thresh = max + logf(p->min_p);
            int32_t m = 0;
            for (int32_t i = 0; i < nc; i++) {
                float l = all ? w[i] : c[i].logit;
                if (l >= thresh)
                    c[m++] = all ? (struct cand){l, i} : c[i];
            }
            nc = m;
            all = false;
        }

        /* Temperature, then one draw over the kept weights (stored, not recomputed). */
        float inv_t = 1.0f / p->temperature;
        float *e = s->prob;
        double sum = 0.0;
        for (int32_t i = 0; i < nc; i++) {
            e[i] = expf(((all ? w[i] : c[i].logit) - max) * inv_t);
            sum += (double)e[i];
        }
        double u = rng_uniform(s->rng) * sum;
        double acc = 0.0;
        token = arg;
        for (int32_t i = 0; i < nc; i++) {
            if (e[i] <= 0.0f)
                continue;
            token = all ? i : c[i].id;
            acc += (double)e[i];
            if (u < acc)
                break;
        }
    }
    out->token = token;

    if (p->logprobs) {
        double z = 0.0;
        int32_t k = min_i32(p->top_logprobs, n);
        for (int32_t i = 0; i < n; i++) {
            z += (double)expf(w[i] - max);
            if (k > 0)
                top_insert(out->top, &out->n_top, k, i, w[i]);
        }
        float lse = max + (float)log(z);
        out->logprob = w[token] - lse;
        for (int32_t i = 0; i < out->n_top; i++)
            out->top[i].logprob -= lse;
    }
    return PW_OK;
}

int32_t engine_sampler_candidates_needed(const struct engine_sampler *s)
{
    const struct engine_sampler_params *p = &s->p;
    bool rep = p->repetition_penalty != 1.0f && p->repetition_last_n != 0;
    if (p->temperature != 0.0f || rep || p->presence_penalty != 0.0f ||
        p->frequency_penalty != 0.0f)
        return 0;
    int32_t k = p->logprobs ? p->top_logprobs : 0;
    k = k < 1 ? 1 : k;
    return k < s->n_vocab ? k : s->n_vocab;
}

enum pw_err engine_sampler_sample_candidates(struct engine_sampler *s, const float *vals,
                                             const int32_t *ids, int32_t k, float lse,
                                             struct engine_sampler_result *out)
{
    const struct engine_sampler_params *p = &s->p;
    int32_t need = engine_sampler_candidates_needed(s);
    memset(out, 0, sizeof(*out));
    if (need == 0 || k < need)
        return PW_ERR_INVAL;
    /* candidate 0 is the row's max (NaN ranks below -inf, as the full path's NaN -> -inf) */
    if (!isfinite(vals[0]))
        return PW_ERR_RANGE;
    if (ids[0] < 0 || ids[0] >= s->n_vocab)
        return PW_ERR_INVAL;
    out->token = ids[0];
    if (p->logprobs) {
        out->logprob = vals[0] - lse;
        int32_t n_top = min_i32(p->top_logprobs, s->n_vocab);
        for (int32_t i = 0; i < n_top; i++) {
            float v = isnan(vals[i]) ? -INFINITY : vals[i];
            out->top[i].token = ids[i];
            out->top[i].logprob = v - lse;
        }
        out->n_top = n_top;
    }
    return PW_OK;
}

/*
 * engine_sampler: picks the next token of one sequence (one choice of a request) from one
 * row of logits, with OpenAI's parameters plus llama.cpp's extensions.
 *
 * Order of operations (llama.cpp's default sampler chain; docs/internals/sampler.md):
 *
 *   logits -> repetition penalty (prompt + generated, last_n window)
 *          -> presence / frequency penalties (generated tokens of this choice)
 *          -> [logprobs: log-softmax here, before temperature and truncation]
 *          -> temperature == 0 ? argmax (lowest id on ties)
 *          :  top_k -> top_p -> min_p -> temperature -> one draw from the PRNG
 *
 * Determinism: each sampler owns a xoshiro256** PRNG seeded (splitmix64) from the request
 * seed and the choice index, and nothing else, so a choice's tokens do not depend on what
 * else is batched, on thread count, or on the order in which samplers are used. A draw is
 * consumed only by non-greedy steps, exactly one 64-bit draw per sampled token.
 *
 * Memory: everything is allocated by engine_sampler_create() (36 bytes x n_vocab plus 4 to 8
 * bytes x n_ctx, e.g. 1.8 MB for a 49152 vocabulary and 4096 context;
 * engine_sampler_memory_bytes()); engine_sampler_sample() and
 * engine_sampler_accept() allocate nothing. A sampler may be reused for another sequence
 * with engine_sampler_reset() (clears only the entries it touched).
 *
 * Thread-safety: a sampler is used by one thread at a time; different samplers are
 * independent.
 */
#ifndef ENGINE_SAMPLER_H
#define ENGINE_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

#define ENGINE_SAMPLER_MAX_TOP_LOGPROBS 20 /* OpenAI's cap on top_logprobs */
#define ENGINE_SAMPLER_MAX_CHOICES 8       /* n: choices per request */
#define ENGINE_SAMPLER_MAX_VOCAB (1 << 22) /* sanity cap on n_vocab */

struct engine_sampler_params {
    float temperature;         /* [0, 2]; 0 = greedy (argmax, lowest id on ties) */
    int32_t top_k;             /* >= 0; 0 (or >= n_vocab) = off */
    float top_p;               /* (0, 1]; 1 = off */
    float min_p;               /* [0, 1]; 0 = off; keeps p >= min_p * p_max */
    float presence_penalty;    /* [-2, 2]; subtracted once from tokens generated so far */
    float frequency_penalty;   /* [-2, 2]; subtracted count times (generated so far) */
    float repetition_penalty;  /* > 0, finite; 1 = off; logit > 0 divided, else multiplied */
    int32_t repetition_last_n; /* window in tokens (prompt + generated); -1 = all, 0 = off */
    uint64_t seed;             /* request seed */
    uint32_t choice;           /* choice index, [0, ENGINE_SAMPLER_MAX_CHOICES) */
    bool logprobs;             /* report the chosen token's logprob */
    int32_t top_logprobs;      /* [0, 20] alternatives; needs logprobs */
};

/* One (token, logprob) pair; logprob is natural log. */
struct engine_sampler_logprob {
    int32_t token;
    float logprob;
};

struct engine_sampler_result {
    int32_t token; /* the chosen token */
    float logprob; /* its logprob (0 when params.logprobs is false) */
    int32_t n_top; /* entries of top[] filled: min(top_logprobs, n_vocab) */
    /* The top_logprobs best tokens, best first, lower id on ties. */
    struct engine_sampler_logprob top[ENGINE_SAMPLER_MAX_TOP_LOGPROBS];
};

struct engine_sampler;

/*
 * Fills p with neutral values: temperature 1, top_k 0, top_p 1, min_p 0, penalties 0,
 * repetition_penalty 1, repetition_last_n 64, seed 0, choice 0, no logprobs.
 */
void engine_sampler_params_default(struct engine_sampler_params *p);

/*
 * Checks every range above. On failure returns PW_ERR_INVAL and writes one line naming the
 * parameter into errbuf (NUL-terminated, cut to errlen; errbuf may be NULL).
 */
enum pw_err engine_sampler_params_validate(const struct engine_sampler_params *p, char *errbuf,
                                           size_t errlen);

/*
 * Creates a sampler for a vocabulary of n_vocab tokens and sequences of at most n_ctx
 * tokens (prompt + generated; only the repetition window's ring buffer depends on it).
 * params are validated and copied. Returns PW_ERR_INVAL (message in errbuf) or
 * PW_ERR_NOMEM. The caller owns *out and frees it with engine_sampler_destroy().
 */
enum pw_err engine_sampler_create(int32_t n_vocab, int32_t n_ctx,
                                  const struct engine_sampler_params *params,
                                  struct engine_sampler **out, char *errbuf, size_t errlen);

/* Frees s; NULL is a no-op. */
void engine_sampler_destroy(struct engine_sampler *s);

/*
 * Starts a new sequence with new params (validated; PW_ERR_INVAL leaves s unchanged):
 * clears token history and re-seeds the PRNG. Allocates nothing.
 */
enum pw_err engine_sampler_reset(struct engine_sampler *s,
                                 const struct engine_sampler_params *params, char *errbuf,
                                 size_t errlen);

/*
 * Records prompt tokens (they count for the repetition penalty only). PW_ERR_INVAL if a
 * token is outside [0, n_vocab); tokens before it are kept.
 */
enum pw_err engine_sampler_accept_prompt(struct engine_sampler *s, const int32_t *tokens, size_t n);

/*
 * Records a generated token (counts for all three penalties). Call it with the token
 * engine_sampler_sample() chose (or any token the engine forced). PW_ERR_INVAL if out of
 * range.
 */
enum pw_err engine_sampler_accept(struct engine_sampler *s, int32_t token);

/*
 * Chooses the next token from logits (n_vocab floats, borrowed for the call; not modified).
 * NaN logits count as -inf. Returns PW_ERR_RANGE if no logit is finite or +inf appears.
 * Does not record the token: call engine_sampler_accept().
 */
enum pw_err engine_sampler_sample(struct engine_sampler *s, const float *logits,
                                  struct engine_sampler_result *out);

/*
 * Sampling from device candidates (a backend's ops->topk), so a step need not copy whole
 * logit rows to the host. engine_sampler_candidates_needed() is the number of best logits
 * (1..ENGINE_SAMPLER_MAX_TOP_LOGPROBS) this sampler's next choice can be made from exactly,
 * or 0 when it needs the whole row. Today: greedy choices (temperature 0) with no penalty
 * in force (presence, frequency, repetition), for which the argmax is candidate 0 and the
 * logprobs are candidate - log-sum-exp.
 *
 * engine_sampler_sample_candidates() makes that choice from vals/ids[0..k) (the k best
 * logits, descending, lower id first on ties, NaN below -inf: what ops->topk returns) and
 * lse (the row's log-sum-exp); k >= engine_sampler_candidates_needed() > 0. The token is
 * the one engine_sampler_sample() picks from the whole row; logprobs agree with it to
 * float rounding (lse is summed in another order). PW_ERR_RANGE as engine_sampler_sample()
 * (no finite logit, or +inf); PW_ERR_INVAL when the sampler needs the whole row.
 */
int32_t engine_sampler_candidates_needed(const struct engine_sampler *s);
enum pw_err engine_sampler_sample_candidates(struct engine_sampler *s, const float *vals,
                                             const int32_t *ids, int32_t k, float lse,
                                             struct engine_sampler_result *out);

/* The params in force (borrowed, valid until reset or destroy). */
const struct engine_sampler_params *engine_sampler_params(const struct engine_sampler *s);

/* Bytes allocated for a sampler of this shape (for capacity planning and docs). */
size_t engine_sampler_memory_bytes(int32_t n_vocab, int32_t n_ctx);

#endif

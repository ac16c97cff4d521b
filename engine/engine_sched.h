/*
 * engine_sched: continuous batching over a paged KV cache.
 *
 * The scheduler owns up to max_batch sequence slots (one slot = one choice of one
 * request). Each engine_sched_step() builds one batch from every active slot: one decode
 * token for each sequence that is generating, plus prefill chunks of sequences that are
 * still reading their prompt, up to max_tok token rows in all, runs the model once, and
 * samples a token for each row that ends its sequence's known tokens.
 *
 *   - Prompts are split into chunks (chunked prefill), so a long prompt never stalls the
 *     decode steps of the others.
 *   - KV blocks come from engine_kv; a new prompt starts from the longest cached prefix.
 *   - When blocks run out for a decode token, the youngest other sequence is preempted: its
 *     blocks are released and its tokens (prompt and generated so far) are recomputed
 *     later. Nothing fails for lack of blocks unless one sequence alone does not fit.
 *   - Sampling is per slot with the request's own seeded PRNG, so a sequence's tokens do
 *     not depend on what else is in the batch.
 *   - Background sequences (the batch lane) yield to foreground ones: while a foreground
 *     sequence waits for its first token (pending, or reading its prompt), a step holds
 *     foreground rows only, so its first token costs a small step, not a full batch step;
 *     background sequences simply skip those steps. Out of KV blocks, a background
 *     sequence is preempted before any foreground one.
 *
 * There is no waiting queue here: submit fails with PW_ERR_AGAIN when every slot is busy,
 * and the caller keeps the work where it was (the Redis stream is the queue).
 * Not thread-safe: one thread submits, steps and cancels. Allocates at create and at
 * submit (the prompt copy); a step allocates nothing.
 */
#ifndef ENGINE_SCHED_H
#define ENGINE_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine_sampler.h"
#include "engine_stop.h"
#include "pw_err.h"

struct engine_model;
struct engine_tokenizer;

enum engine_finish {
    ENGINE_FINISH_NONE = 0,
    ENGINE_FINISH_STOP,      /* end-of-generation token or a stop string */
    ENGINE_FINISH_LENGTH,    /* max_tokens or the context length */
    ENGINE_FINISH_CANCELLED, /* engine_sched_cancel() */
};

const char *engine_finish_name(enum engine_finish f);

struct engine_seq_params {
    const int32_t *prompt; /* copied at submit */
    uint32_t n_prompt;     /* >= 1 */
    struct engine_sampler_params sampling;
    uint32_t max_tokens;                 /* 0 = until the context is full */
    const struct engine_stop_str *stops; /* copied at submit */
    uint32_t n_stops;
    bool ignore_eos; /* keep going past end-of-generation tokens (benchmarks) */
    bool background; /* batch-lane work: yields to foreground sequences (see below) */
    void *userdata;  /* handed back in callbacks; owned by the caller */
};

struct engine_token_event {
    int32_t token;                              /* the sampled token */
    const struct engine_sampler_result *sample; /* with logprobs when asked for */
    const char *text;                           /* text released now (stop strings hold */
    size_t len;                                 /* back a possible prefix); may be empty */
};

struct engine_seq_usage {
    uint32_t prompt_tokens;
    uint32_t completion_tokens;
    uint32_t cached_tokens; /* prompt tokens served from the prefix cache */
};

struct engine_sched_cb {
    /* A token was generated (not called for an end-of-generation token). */
    void (*on_token)(void *userdata, uint64_t seq_id, const struct engine_token_event *ev);
    /* The sequence ended; text[0..len) is the last text it releases. The slot is free. */
    void (*on_finish)(void *userdata, uint64_t seq_id, enum engine_finish reason, const char *text,
                      size_t len, const struct engine_seq_usage *usage);
};

struct engine_sched_opts {
    uint32_t max_batch; /* slots; the model's max_logits must be >= this */
    uint32_t max_tok;   /* token rows per step; the model's max_tok must be >= this */
};

struct engine_sched_stats {
    uint64_t steps;
    uint64_t prompt_tokens;    /* prompt (and recomputed) tokens run through the model */
    uint64_t generated_tokens; /* tokens sampled */
    uint64_t preemptions;
    uint64_t cached_tokens;    /* prompt tokens reused from the prefix cache */
    uint64_t foreground_steps; /* steps that left background sequences out */
    uint64_t candidate_steps;  /* steps whose choices came from device candidates */
};

struct engine_sched;

/* model and tok are borrowed and must outlive the scheduler; cb is copied. */
enum pw_err engine_sched_create(struct engine_model *model, const struct engine_tokenizer *tok,
                                const struct engine_sched_opts *opts,
                                const struct engine_sched_cb *cb, struct engine_sched **out);
void engine_sched_destroy(struct engine_sched *s);

/*
 * Queues a sequence. PW_ERR_AGAIN: no free slot. PW_ERR_RANGE: the prompt does not fit the
 * context (n_prompt >= n_ctx; the caller reports context_length_exceeded). PW_ERR_INVAL:
 * bad sampling parameters or stop strings (message in err). *seq_id identifies it.
 */
enum pw_err engine_sched_submit(struct engine_sched *s, const struct engine_seq_params *p,
                                uint64_t *seq_id, char *err, size_t errcap);

/* Ends a sequence at the next step with ENGINE_FINISH_CANCELLED; unknown ids are ignored. */
void engine_sched_cancel(struct engine_sched *s, uint64_t seq_id);

/* Runs one batch; returns the number of token rows computed (0 = nothing to do). */
uint32_t engine_sched_step(struct engine_sched *s);

uint32_t engine_sched_active(const struct engine_sched *s);     /* busy slots */
uint32_t engine_sched_background(const struct engine_sched *s); /* busy background slots */
uint32_t engine_sched_free_slots(const struct engine_sched *s);
const struct engine_sched_stats *engine_sched_stats(const struct engine_sched *s);
/* KV blocks in total and free (free includes cached-prefix blocks). */
void engine_sched_kv_blocks(const struct engine_sched *s, uint32_t *total, uint32_t *free_);

#endif

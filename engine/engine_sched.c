/*
 * engine_sched: continuous batching (see engine_sched.h).
 *
 * Slot states:  PENDING --admit--> RUNNING --finish--> FREE
 *                  ^                  |
 *                  +----preempt-------+   (KV released, all known tokens recomputed)
 * A RUNNING slot has n_computed tokens in the KV cache out of n_tokens known; the rows it
 * contributes to a step are tokens[n_computed .. n_computed + chunk), and when the chunk
 * reaches n_tokens the last row's logits give the next token. A generating sequence thus
 * contributes exactly one row (its last sampled token) per step.
 * Age order (`order`, from submission) decides who is admitted first and who is preempted
 * (the youngest), so a preempted sequence keeps its place.
 */
#include "engine_sched.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_kv.h"
#include "engine_model.h"
#include "engine_tokenizer.h"
#include "kernel.h"
#include "pw_log.h"

enum slot_state { SLOT_FREE = 0, SLOT_PENDING, SLOT_RUNNING };

struct slot {
    enum slot_state state;
    uint64_t id;
    uint64_t order; /* submission order; smaller = older */
    void *userdata;
    int32_t *tokens;   /* (n_ctx) prompt then generated tokens */
    uint32_t n_tokens; /* known tokens */
    uint32_t n_prompt;
    uint32_t n_computed; /* tokens whose K/V is in the cache */
    uint32_t n_cached;   /* prompt tokens reused from the prefix cache (first admit) */
    uint32_t n_gen;
    uint32_t max_tokens; /* generated tokens allowed */
    bool ignore_eos;
    bool background; /* batch lane: yields to foreground sequences */
    bool cancel;
    bool ever_admitted;
    struct engine_kv_seq kv;
    struct engine_sampler *sampler;
    struct engine_stop stop;
    struct engine_detok detok;
    /* batch bookkeeping of the current step */
    uint32_t chunk;    /* rows in this step */
    int32_t logit_row; /* row index in logits, -1 when none */
};

struct engine_sched {
    struct engine_model *model;         /* borrowed */
    const struct engine_tokenizer *tok; /* borrowed */
    struct engine_sched_cb cb;
    struct engine_sched_opts opts;
    uint32_t n_ctx, n_vocab, block_tokens, max_blocks;
    struct engine_kv_pool *pool;
    struct slot *slots; /* (max_batch) */
    uint64_t next_id, next_order;
    uint8_t *eog; /* (n_vocab) end-of-generation tokens */
    struct engine_sched_stats stats;

    /* Step buffers, sized at create (max_tok rows, max_batch sequences). */
    int32_t *b_tokens, *b_pos, *b_seq; /* (max_tok) */
    int32_t *b_table;                  /* (max_batch, max_blocks) */
    int32_t *logit_rows;               /* (max_batch) */
    struct slot **b_slots;             /* (max_batch) slots in this step, by b_seq */
    float *logits;                     /* (max_batch, n_vocab) host */
    /* Device candidates instead of whole rows (a backend with ops->topk, and every choice
     * of the step one engine_sampler_sample_candidates can make): */
    float *cand_val;       /* (max_batch, KERNEL_TOPK_MAX) */
    int32_t *cand_id;      /* (max_batch, KERNEL_TOPK_MAX) */
    float *cand_lse;       /* (max_batch) */
    struct slot **lr_slot; /* (max_batch) the slot of each logit row */
    char *text;            /* delta assembly buffer */
    size_t text_cap;
};

const char *engine_finish_name(enum engine_finish f)
{
    switch (f) {
    case ENGINE_FINISH_STOP:
        return "stop";
    case ENGINE_FINISH_LENGTH:
        return "length";
    case ENGINE_FINISH_CANCELLED:
        return "cancelled";
    default:
        return "none";
    }
}

/* Texts of control tokens that end a turn in the chat formats we render. */
static const char *const eog_texts[] = {
    "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>",
    "</s>",       "<|end|>",    "<|eom_id|>",      "<end_of_turn>",
};

static void mark_eog(struct engine_sched *s)
{
    int32_t eos = engine_tokenizer_eos(s->tok);
    if (eos >= 0 && (uint32_t)eos < s->n_vocab)
        s->eog[eos] = 1;
    for (size_t i = 0; i < sizeof eog_texts / sizeof eog_texts[0]; i++) {
        int32_t id = engine_tokenizer_special_id(s->tok, eog_texts[i], strlen(eog_texts[i]));
        if (id >= 0 && (uint32_t)id < s->n_vocab && engine_tokenizer_is_special(s->tok, id))
            s->eog[id] = 1;
    }
}

enum pw_err engine_sched_create(struct engine_model *model, const struct engine_tokenizer *tok,
                                const struct engine_sched_opts *opts,
                                const struct engine_sched_cb *cb, struct engine_sched **out)
{
    *out = NULL;
    const struct engine_model_opts *mo = engine_model_opts(model);
    const struct engine_hparams *hp = engine_model_hparams(model);
    if (opts->max_batch == 0 || opts->max_tok == 0 || opts->max_batch > mo->max_logits ||
        opts->max_tok > mo->max_tok)
        return PW_ERR_INVAL;
    struct engine_sched *s = calloc(1, sizeof *s);
    if (!s)
        return PW_ERR_NOMEM;
    s->model = model;
    s->tok = tok;
    s->cb = *cb;
    s->opts = *opts;
    s->n_ctx = mo->n_ctx;
    s->n_vocab = hp->n_vocab;
    s->block_tokens = mo->block_tokens;
    s->next_id = 1;
    enum pw_err e = engine_kv_pool_create(mo->n_kv_blocks, mo->block_tokens, mo->n_ctx, &s->pool);
    if (e)
        goto fail;
    s->max_blocks = (s->n_ctx + s->block_tokens - 1) / s->block_tokens;
    uint32_t B = opts->max_batch, T = opts->max_tok;
    s->slots = calloc(B, sizeof *s->slots);
    s->eog = calloc(s->n_vocab, 1);
    s->b_tokens = malloc(T * sizeof(int32_t));
    s->b_pos = malloc(T * sizeof(int32_t));
    s->b_seq = malloc(T * sizeof(int32_t));
    s->b_table = malloc((size_t)B * s->max_blocks * sizeof(int32_t));
    s->logit_rows = malloc(B * sizeof(int32_t));
    s->b_slots = malloc(B * sizeof *s->b_slots);
    s->logits = malloc((size_t)B * s->n_vocab * sizeof(float));
    s->cand_val = malloc((size_t)B * KERNEL_TOPK_MAX * sizeof(float));
    s->cand_id = malloc((size_t)B * KERNEL_TOPK_MAX * sizeof(int32_t));
    s->cand_lse = malloc(B * sizeof(float));
    s->lr_slot = malloc(B * sizeof *s->lr_slot);
    s->text_cap = 2 * ENGINE_DETOK_OUT_MAX + 2 * ENGINE_STOP_MAX_BYTES;
    s->text = malloc(s->text_cap);
    e = PW_ERR_NOMEM;
    if (!s->slots || !s->eog || !s->b_tokens || !s->b_pos || !s->b_seq || !s->b_table ||
        !s->logit_rows || !s->b_slots || !s->logits || !s->text || !s->cand_val || !s->cand_id ||
        !s->cand_lse || !s->lr_slot)
        goto fail;
    struct engine_sampler_params dp;
    engine_sampler_params_default(&dp);
    for (uint32_t i = 0; i < B; i++) {
        struct slot *sl = &s->slots[i];
        sl->tokens = malloc((size_t)s->n_ctx * sizeof(int32_t));
        if (!sl->tokens)
            goto fail;
        if ((e = engine_kv_seq_init(s->pool, &sl->kv)))
            goto fail;
        if ((e = engine_sampler_create((int32_t)s->n_vocab, (int32_t)s->n_ctx, &dp, &sl->sampler,
                                       NULL, 0)))
            goto fail;
    }
    mark_eog(s);
    *out = s;
    return PW_OK;
fail:
    engine_sched_destroy(s);
    return e ? e : PW_ERR_NOMEM;
}

void engine_sched_destroy(struct engine_sched *s)
{
    if (!s)
        return;
    if (s->slots) {
        for (uint32_t i = 0; i < s->opts.max_batch; i++) {
            struct slot *sl = &s->slots[i];
            if (sl->kv.blocks)
                engine_kv_seq_deinit(s->pool, &sl->kv);
            engine_sampler_destroy(sl->sampler);
            free(sl->tokens);
        }
    }
    engine_kv_pool_destroy(s->pool);
    free(s->slots);
    free(s->eog);
    free(s->b_tokens);
    free(s->b_pos);
    free(s->b_seq);
    free(s->b_table);
    free(s->logit_rows);
    free(s->b_slots);
    free(s->logits);
    free(s->cand_val);
    free(s->cand_id);
    free(s->cand_lse);
    free(s->lr_slot);
    free(s->text);
    free(s);
}

enum pw_err engine_sched_submit(struct engine_sched *s, const struct engine_seq_params *p,
                                uint64_t *seq_id, char *err, size_t errcap)
{
    if (err && errcap)
        err[0] = '\0';
    if (p->n_prompt == 0) {
        snprintf(err, errcap, "the prompt is empty");
        return PW_ERR_INVAL;
    }
    if (p->n_prompt >= s->n_ctx) {
        snprintf(err, errcap,
                 "this model's maximum context length is %u tokens, but the prompt has %u",
                 s->n_ctx, p->n_prompt);
        return PW_ERR_RANGE;
    }
    for (uint32_t i = 0; i < p->n_prompt; i++) {
        if (p->prompt[i] < 0 || (uint32_t)p->prompt[i] >= s->n_vocab) {
            snprintf(err, errcap, "prompt token %d is outside the vocabulary", p->prompt[i]);
            return PW_ERR_INVAL;
        }
    }
    struct slot *sl = NULL;
    for (uint32_t i = 0; i < s->opts.max_batch && !sl; i++)
        if (s->slots[i].state == SLOT_FREE)
            sl = &s->slots[i];
    if (!sl)
        return PW_ERR_AGAIN;

    enum pw_err e = engine_stop_init(&sl->stop, p->stops, p->n_stops, err, errcap);
    if (e)
        return e;
    if ((e = engine_sampler_reset(sl->sampler, &p->sampling, err, errcap)))
        return e;
    if ((e = engine_sampler_accept_prompt(sl->sampler, p->prompt, p->n_prompt))) {
        snprintf(err, errcap, "prompt token outside the vocabulary");
        return e;
    }
    memcpy(sl->tokens, p->prompt, p->n_prompt * sizeof(int32_t));
    sl->n_tokens = sl->n_prompt = p->n_prompt;
    sl->n_computed = sl->n_cached = sl->n_gen = 0;
    uint32_t room = s->n_ctx - p->n_prompt;
    sl->max_tokens = (p->max_tokens == 0 || p->max_tokens > room) ? room : p->max_tokens;
    sl->ignore_eos = p->ignore_eos;
    sl->background = p->background;
    sl->cancel = false;
    sl->ever_admitted = false;
    sl->userdata = p->userdata;
    engine_detok_init(&sl->detok, s->tok, 0);
    sl->id = s->next_id++;
    sl->order = s->next_order++;
    sl->state = SLOT_PENDING;
    *seq_id = sl->id;
    return PW_OK;
}

void engine_sched_cancel(struct engine_sched *s, uint64_t seq_id)
{
    for (uint32_t i = 0; i < s->opts.max_batch; i++)
        if (s->slots[i].state != SLOT_FREE && s->slots[i].id == seq_id)
            s->slots[i].cancel = true;
}

uint32_t engine_sched_active(const struct engine_sched *s)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->opts.max_batch; i++)
        n += s->slots[i].state != SLOT_FREE;
    return n;
}

uint32_t engine_sched_background(const struct engine_sched *s)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->opts.max_batch; i++)
        n += s->slots[i].state != SLOT_FREE && s->slots[i].background;
    return n;
}

uint32_t engine_sched_free_slots(const struct engine_sched *s)
{
    return s->opts.max_batch - engine_sched_active(s);
}

const struct engine_sched_stats *engine_sched_stats(const struct engine_sched *s)
{
    return &s->stats;
}

void engine_sched_kv_blocks(const struct engine_sched *s, uint32_t *total, uint32_t *free_)
{
    *total = engine_kv_pool_n_blocks(s->pool);
    *free_ = engine_kv_pool_n_free(s->pool);
}

static void finish(struct engine_sched *s, struct slot *sl, enum engine_finish reason,
                   const char *text, size_t len)
{
    struct engine_seq_usage u = {
        .prompt_tokens = sl->n_prompt,
        .completion_tokens = sl->n_gen,
        .cached_tokens = sl->n_cached,
    };
    engine_kv_seq_reset(s->pool, &sl->kv);
    sl->state = SLOT_FREE;
    uint64_t id = sl->id;
    void *ud = sl->userdata;
    sl->userdata = NULL;
    if (s->cb.on_finish)
        s->cb.on_finish(ud, id, reason, text, len, &u);
}

/* Appends what the stop matcher released to s->text at *n. */
static void take_emit(struct engine_sched *s, const struct engine_stop_emit *em, size_t *n)
{
    PW_ASSERT(*n + em->held_len + em->text_len <= s->text_cap);
    /* memcpy's pointers must be valid even for zero bytes, and empty slices may be NULL. */
    if (em->held_len)
        memcpy(s->text + *n, em->held, em->held_len);
    *n += em->held_len;
    if (em->text_len)
        memcpy(s->text + *n, em->text, em->text_len);
    *n += em->text_len;
}

/* End without a stop string: release held-back bytes (detokenizer, then stop matcher). */
static void finish_flush(struct engine_sched *s, struct slot *sl, enum engine_finish reason)
{
    char tail[8];
    size_t n_tail = 0, n = 0;
    struct engine_stop_emit em;
    if (engine_detok_flush(&sl->detok, tail, sizeof tail, &n_tail) == PW_OK && n_tail) {
        engine_stop_feed(&sl->stop, tail, n_tail, &em);
        take_emit(s, &em, &n);
        if (em.stopped) {
            finish(s, sl, ENGINE_FINISH_STOP, s->text, n);
            return;
        }
    }
    engine_stop_flush(&sl->stop, &em);
    take_emit(s, &em, &n);
    finish(s, sl, reason, s->text, n);
}

static void preempt(struct engine_sched *s, struct slot *sl)
{
    engine_kv_seq_reset(s->pool, &sl->kv);
    sl->n_computed = 0;
    sl->chunk = 0; /* a row it got earlier in this step is dropped with its blocks */
    sl->state = SLOT_PENDING;
    s->stats.preemptions++;
    PW_LOG_DEBUG("event=preempt seq=%llu tokens=%u", (unsigned long long)sl->id, sl->n_tokens);
}

/* The youngest running slot other than keep that holds KV blocks, background ones first
 * (any background slot goes before any foreground one), or NULL. */
static struct slot *youngest_running(struct engine_sched *s, const struct slot *keep)
{
    struct slot *best = NULL;
    for (uint32_t i = 0; i < s->opts.max_batch; i++) {
        struct slot *sl = &s->slots[i];
        if (sl == keep || sl->state != SLOT_RUNNING || sl->kv.n_blocks == 0)
            continue;
        if (!best || (sl->background && !best->background) ||
            (sl->background == best->background && sl->order > best->order))
            best = sl;
    }
    return best;
}

/* True when a foreground slot waits for its first token: pending (never admitted) or
 * reading its prompt for the first time. */
static bool foreground_waiting(const struct engine_sched *s)
{
    for (uint32_t i = 0; i < s->opts.max_batch; i++) {
        const struct slot *sl = &s->slots[i];
        if (sl->state != SLOT_FREE && !sl->background && !sl->cancel && sl->n_gen == 0)
            return true;
    }
    return false;
}

/* Tries to admit a pending slot: needs room for every known token (plus one to generate). */
static bool admit(struct engine_sched *s, struct slot *sl)
{
    if (sl->kv.n_blocks == 0 && sl->n_computed == 0) {
        uint32_t cached;
        engine_kv_seq_match_prefix(s->pool, &sl->kv, sl->tokens, sl->n_tokens, &cached);
        sl->n_computed = cached;
        if (!sl->ever_admitted) {
            sl->n_cached = cached;
            s->stats.cached_tokens += cached;
        }
    }
    uint32_t need =
        engine_kv_seq_blocks_needed(s->pool, &sl->kv, sl->n_tokens - sl->n_computed + 1);
    if (need > engine_kv_pool_n_free(s->pool)) {
        /* Give back what the prefix match took, so blocks are not pinned while waiting. */
        engine_kv_seq_reset(s->pool, &sl->kv);
        sl->n_computed = 0;
        return false;
    }
    sl->state = SLOT_RUNNING;
    sl->ever_admitted = true;
    return true;
}

/* Slots sorted oldest first (max_batch is small: insertion sort into b_slots order). */
static uint32_t slots_by_age(struct engine_sched *s, struct slot **out)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->opts.max_batch; i++) {
        struct slot *sl = &s->slots[i];
        if (sl->state == SLOT_FREE)
            continue;
        uint32_t j = n++;
        while (j > 0 && out[j - 1]->order > sl->order) {
            out[j] = out[j - 1];
            j--;
        }
        out[j] = sl;
    }
    return n;
}

static void add_rows(struct engine_sched *s, struct slot *sl, uint32_t seq_idx, uint32_t chunk,
                     uint32_t *n_rows, uint32_t *n_logits)
{
    for (uint32_t k = 0; k < chunk; k++) {
        uint32_t pos = sl->n_computed + k;
        s->b_tokens[*n_rows] = sl->tokens[pos];
        s->b_pos[*n_rows] = (int32_t)pos;
        s->b_seq[*n_rows] = (int32_t)seq_idx;
        (*n_rows)++;
    }
    sl->chunk = chunk;
    sl->logit_row = -1;
    if (sl->n_computed + chunk == sl->n_tokens) {
        sl->logit_row = (int32_t)*n_logits;
        s->lr_slot[*n_logits] = sl;
        s->logit_rows[(*n_logits)++] = (int32_t)(*n_rows - 1);
    }
}

/* The step's choices from device candidates: k of them per row, 0 when a choice needs its
 * whole logit row (then the step downloads whole rows). */
static uint32_t candidates_for_step(struct engine_sched *s, uint32_t n_logits)
{
    if (n_logits == 0 || !engine_model_has_topk(s->model))
        return 0;
    int32_t k = 1;
    for (uint32_t i = 0; i < n_logits; i++) {
        int32_t need = engine_sampler_candidates_needed(s->lr_slot[i]->sampler);
        if (need == 0 || need > KERNEL_TOPK_MAX)
            return 0;
        k = need > k ? need : k;
    }
    return (uint32_t)k;
}

/* Chooses sl's next token, from its logit row or (cand_k > 0) from its candidates. */
static void after_sample(struct engine_sched *s, struct slot *sl, int32_t lr, uint32_t cand_k)
{
    struct engine_sampler_result r;
    enum pw_err e;
    if (cand_k)
        e = engine_sampler_sample_candidates(sl->sampler, s->cand_val + (size_t)lr * cand_k,
                                             s->cand_id + (size_t)lr * cand_k, (int32_t)cand_k,
                                             s->cand_lse[lr], &r);
    else
        e = engine_sampler_sample(sl->sampler, s->logits + (size_t)lr * s->n_vocab, &r);
    if (e != PW_OK) {
        finish_flush(s, sl, ENGINE_FINISH_STOP);
        return;
    }
    engine_sampler_accept(sl->sampler, r.token);
    sl->tokens[sl->n_tokens++] = r.token;
    sl->n_gen++;
    s->stats.generated_tokens++;

    if (!sl->ignore_eos && s->eog[r.token]) {
        finish_flush(s, sl, ENGINE_FINISH_STOP);
        return;
    }
    char piece[ENGINE_DETOK_OUT_MAX];
    size_t n_piece = 0, n = 0;
    if (engine_detok_push(&sl->detok, r.token, piece, sizeof piece, &n_piece) != PW_OK)
        n_piece = 0;
    struct engine_stop_emit em;
    engine_stop_feed(&sl->stop, piece, n_piece, &em);
    take_emit(s, &em, &n);
    if (s->cb.on_token) {
        struct engine_token_event ev = {.token = r.token, .sample = &r, .text = s->text, .len = n};
        s->cb.on_token(sl->userdata, sl->id, &ev);
    }
    if (em.stopped)
        finish(s, sl, ENGINE_FINISH_STOP, NULL, 0);
    else if (sl->n_gen >= sl->max_tokens || sl->n_tokens >= s->n_ctx)
        finish_flush(s, sl, ENGINE_FINISH_LENGTH);
}

uint32_t engine_sched_step(struct engine_sched *s)
{
    struct slot **order = s->b_slots;
    uint32_t n_slots = slots_by_age(s, order);

    for (uint32_t i = 0; i < n_slots; i++) {
        if (order[i]->cancel)
            finish(s, order[i], ENGINE_FINISH_CANCELLED, NULL, 0);
    }
    n_slots = slots_by_age(s, order);
    if (n_slots == 0)
        return 0;

    /* A foreground sequence waiting for its first token: this step is foreground only
     * (background slots keep their state and skip it). */
    bool fg_only = foreground_waiting(s);
again:;

    /* 1. Generating sequences first: one row each; preempt the youngest when out of blocks
     * (a background one before any foreground one). */
    uint32_t budget = s->opts.max_tok;
    for (uint32_t i = 0; i < n_slots; i++)
        order[i]->chunk = 0;
    for (uint32_t i = 0; i < n_slots; i++) {
        struct slot *sl = order[i];
        if (sl->state != SLOT_RUNNING || sl->n_tokens - sl->n_computed != 1 || budget == 0 ||
            (fg_only && sl->background))
            continue;
        enum pw_err e;
        while ((e = engine_kv_seq_reserve(s->pool, &sl->kv, 1)) == PW_ERR_AGAIN) {
            struct slot *victim = youngest_running(s, sl);
            if (!victim || (victim->background == sl->background && victim->order < sl->order) ||
                (sl->background && !victim->background)) {
                victim = sl; /* everyone older (or foreground) needs the blocks more */
            }
            preempt(s, victim);
            if (victim == sl)
                break;
        }
        if (sl->state == SLOT_RUNNING && e == PW_OK) {
            sl->chunk = 1;
            budget--;
        }
    }
    /* 2. Admit waiting sequences, oldest first, while blocks last (foreground ones only in
     * a foreground step). */
    for (uint32_t i = 0; i < n_slots; i++) {
        if (fg_only && order[i]->background)
            continue;
        if (order[i]->state != SLOT_PENDING)
            continue;
        bool in = admit(s, order[i]);
        /* A foreground sequence takes blocks from background ones (which sit this step
         * out, so nothing of this step is lost). */
        while (!in && !order[i]->background) {
            struct slot *victim = youngest_running(s, order[i]);
            if (!victim || !victim->background || victim->chunk > 0)
                break;
            preempt(s, victim);
            in = admit(s, order[i]);
        }
        if (!in)
            break;
    }
    /* 3. Prefill chunks with the remaining row budget. */
    for (uint32_t i = 0; i < n_slots && budget > 0; i++) {
        struct slot *sl = order[i];
        if (sl->state != SLOT_RUNNING || sl->chunk > 0 || (fg_only && sl->background))
            continue;
        uint32_t left = sl->n_tokens - sl->n_computed;
        uint32_t chunk = left < budget ? left : budget;
        while (chunk > 0 && engine_kv_seq_reserve(s->pool, &sl->kv, chunk) != PW_OK)
            chunk /= 2;
        sl->chunk = chunk;
        budget -= chunk;
    }

    /* Build the batch from the slots that got rows. */
    uint32_t n_rows = 0, n_logits = 0, n_seq = 0;
    for (uint32_t i = 0; i < n_slots; i++) {
        struct slot *sl = order[i];
        if (sl->state != SLOT_RUNNING || sl->chunk == 0) {
            sl->logit_row = -1;
            continue;
        }
        int32_t *row = s->b_table + (size_t)n_seq * s->max_blocks;
        for (uint32_t k = 0; k < sl->kv.n_blocks; k++)
            row[k] = (int32_t)sl->kv.blocks[k];
        add_rows(s, sl, n_seq, sl->chunk, &n_rows, &n_logits);
        n_seq++;
    }
    if (n_rows == 0 && fg_only) {
        /* Nothing foreground could run (no blocks yet): an ordinary step instead. */
        fg_only = false;
        goto again;
    }
    if (n_rows == 0)
        return 0;
    if (fg_only && engine_sched_background(s) > 0)
        s->stats.foreground_steps++;
    struct kernel_batch b = {
        .n_tok = n_rows,
        .tokens = s->b_tokens,
        .pos = s->b_pos,
        .seq = s->b_seq,
        .n_seq = n_seq,
        .max_blocks = s->max_blocks,
        .block_table = s->b_table,
    };
    uint32_t cand_k = candidates_for_step(s, n_logits);
    if (cand_k) {
        engine_model_forward_topk(s->model, &b, s->logit_rows, n_logits, cand_k, s->cand_val,
                                  s->cand_id, s->cand_lse);
        s->stats.candidate_steps++;
    } else {
        engine_model_forward(s->model, &b, s->logit_rows, n_logits, s->logits);
    }
    s->stats.steps++;

    /* Commit computed K/V, then sample in age order (callbacks may free slots). */
    for (uint32_t i = 0; i < n_slots; i++) {
        struct slot *sl = order[i];
        if (sl->state != SLOT_RUNNING || sl->chunk == 0)
            continue;
        sl->n_computed += sl->chunk;
        if (sl->chunk > 1 || sl->logit_row < 0 || sl->n_gen == 0)
            s->stats.prompt_tokens += sl->chunk;
        engine_kv_seq_commit(s->pool, &sl->kv, sl->tokens, sl->n_computed);
        int32_t lr = sl->logit_row;
        sl->chunk = 0;
        if (lr >= 0)
            after_sample(s, sl, lr, cand_k);
    }
    return n_rows;
}

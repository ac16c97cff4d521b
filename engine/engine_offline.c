/*
 * engine_offline: `parkway-engine --model F --prompt TEXT`: one generation, text on
 * stdout as it is produced, and one timing line on stderr:
 *   load_ms=.. prompt_tokens=.. prompt_tok_s=.. gen_tokens=.. gen_tok_s=.. finish=..
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "engine_chat.h"
#include "engine_tokenizer.h"
#include "pw_clock.h"

struct offline_run {
    uint64_t first_token_ns; /* when the first token was sampled (end of prefill) */
    uint32_t n_gen;
    enum engine_finish finish;
    bool done;
};

static void on_token(void *ud, uint64_t seq_id, const struct engine_token_event *ev)
{
    struct offline_run *r = ud;
    if (r->n_gen++ == 0)
        r->first_token_ns = pw_clock_mono_ns();
    if (ev->len) {
        fwrite(ev->text, 1, ev->len, stdout);
        fflush(stdout);
    }
}

static void on_finish(void *ud, uint64_t seq_id, enum engine_finish reason, const char *text,
                      size_t len, const struct engine_seq_usage *usage)
{
    struct offline_run *r = ud;
    if (len)
        fwrite(text, 1, len, stdout);
    fflush(stdout);
    r->finish = reason;
    r->done = true;
}

int engine_offline_run(struct engine *e)
{
    char err[512] = "";
    struct engine_sched_cb cb = {.on_token = on_token, .on_finish = on_finish};
    int rc = 1;
    int32_t *ids = NULL;
    enum pw_err pe = engine_load(e, &cb, err, sizeof err);
    if (pe) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        /* A model file that cannot be opened is the user's input, like a corrupt one. */
        rc = pe == PW_ERR_IO ? 2 : pw_err_exit_code(pe);
        goto out;
    }
    const struct engine_opts *o = &e->opts;
    size_t cap = strlen(o->prompt) + 64, n_ids = 0;
    ids = malloc(cap * sizeof *ids);
    if (!ids)
        goto out;
    if (o->chat) {
        struct engine_chat_msg msg = {
            .role = "user", .content = o->prompt, .content_len = strlen(o->prompt)};
        pe = engine_chat_render(e->chat, e->tok, &msg, 1, true, ids, cap, &n_ids, err, sizeof err);
    } else {
        pe = engine_tokenizer_encode(e->tok, o->prompt, strlen(o->prompt), ENGINE_TOK_ADD_BOS, ids,
                                     cap, &n_ids);
        if (pe)
            snprintf(err, sizeof err, "cannot tokenize the prompt: %s", pw_err_desc(pe));
    }
    if (pe) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        rc = pw_err_exit_code(pe);
        goto out;
    }

    struct offline_run run = {0};
    struct engine_seq_params p = {
        .prompt = ids,
        .n_prompt = (uint32_t)n_ids,
        .sampling = o->sampling,
        .max_tokens = o->max_tokens,
        .ignore_eos = o->ignore_eos,
        .userdata = &run,
    };
    uint64_t id;
    pe = engine_sched_submit(e->sched, &p, &id, err, sizeof err);
    if (pe) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        rc = pw_err_exit_code(pe);
        goto out;
    }
    uint64_t t0 = pw_clock_mono_ns();
    while (!run.done && engine_sched_step(e->sched) > 0) {
    }
    uint64_t t1 = pw_clock_mono_ns();
    printf("\n");
    double prefill_s = (double)((run.n_gen ? run.first_token_ns : t1) - t0) / 1e9;
    double gen_s = run.n_gen > 1 ? (double)(t1 - run.first_token_ns) / 1e9 : 0;
    fprintf(stderr,
            "load_ms=%.1f prompt_tokens=%zu prompt_tok_s=%.1f gen_tokens=%u gen_tok_s=%.1f "
            "finish=%s\n",
            (double)e->load_ns / 1e6, n_ids, prefill_s > 0 ? (double)n_ids / prefill_s : 0,
            run.n_gen, gen_s > 0 ? (double)(run.n_gen - 1) / gen_s : 0,
            engine_finish_name(run.finish));
    rc = 0;
out:
    free(ids);
    engine_unload(e);
    return rc;
}

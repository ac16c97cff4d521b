/*
 * engine_worker: worker mode. Serves one function's requests from Redis until SIGTERM.
 *
 * Loop (one thread, blocking hiredis; the forward step dominates, Redis calls are
 * pipelined around it):
 *   1. heartbeat every second: WorkerStatus into pw:{fn}:workers, and XCLAIM of our own
 *      in-flight entries (min-idle 0, JUSTID) so their idle time stays low;
 *   2. claim entries whose idle time passed PW_WORKER_STALE_MS: their worker stopped
 *      heartbeating (XAUTOCLAIM); they run again with attempt = deliveries - 1;
 *   3. with free slots and not draining or parking: XREADGROUP on the interactive stream
 *      pw:{fn}:q; only when it has nothing, on the batch lane pw:{fn}:b, leaving one slot
 *      free for interactive work (when max_batch > 1) and within the batch-lane cap
 *      (a step budget, PW_WORKER_BATCH_STEP_MS); blocking up to PW_WORKER_BLOCK_MS on both
 *      only when idle. Batch-lane requests run as background sequences: a new interactive
 *      request gets its first token from a step without their rows (engine_sched.h). With
 *      every slot busy and batch lines among them, an interactive request is still read
 *      (at most every PW_WORKER_EVICT_CHECK_MS) and a batch line is evicted for it: back
 *      to the lane as attempt + 1 (evict_for_interactive);
 *   4. deadlines of what runs, and its cancel flags (pw:cancel:{id}: one pipelined round
 *      trip, at most every PW_WORKER_CANCEL_EVERY_MS, at once after a new request);
 *   5. one scheduler step; its callbacks queue ReplyChunks (XADD to each reply_to);
 *   6. flush the pipeline; XACK each request after its last chunk is written.
 * SIGTERM/SIGINT: stop reading, finish what runs, remove the heartbeat, exit 0.
 * A request that cannot be served (malformed, too long, past its deadline) gets an error
 * chunk when it names a reply stream, and is acknowledged; the worker goes on.
 *
 * Parked mode (the scaler's cheap idle state; docs/internals/scaler.md):
 *   SIGUSR1  park: read nothing new and claim nothing (steps 2-3 stop), finish what runs
 *            (heartbeat DRAINING meanwhile), then heartbeat PARKED and sleep in poll() on
 *            a self-pipe, waking for each heartbeat (every second, so the scaler sees it
 *            alive) or a signal. Model, tokenizer, KV cache (and its prefix cache) and
 *            scheduler stay as they are; weights stay mapped.
 *   SIGUSR2  unpark: heartbeat READY and read at once (the signal wakes the poll).
 *   --start-parked begins parked (pre-warm). The last of SIGUSR1/SIGUSR2 wins.
 * Delivery: Redis hands an entry only to a consumer inside XREADGROUP. A parked worker
 * issues none, and a blocking one (at most PW_WORKER_BLOCK_MS; hiredis retries a read
 * interrupted by a signal, so a signal cannot cut it short) is always waited out and
 * whatever it returns is served before the park completes. So no entry is ever pending
 * on a parked worker.
 */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"
#include "engine_chat.h"
#include "engine_model.h"
#include "engine_tokenizer.h"
#include "kernel.h"
#include "parkway.pb-c.h"
#include "pw_cli.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_log.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "pw_spec.h"

#define PW_WORKER_HEARTBEAT_MS 1000
#define PW_WORKER_STALE_MS 15000        /* entry idle this long: its worker is gone */
#define PW_WORKER_REPLY_MAXLEN "100000" /* reply streams are trimmed to about this */
#define PW_WORKER_MAX_CHOICES 8
/* XREADGROUP BLOCK while idle: also the longest a park waits for the read to end. */
#define PW_WORKER_BLOCK_MS "250"
/* Cancel flags are read from Redis at most this often (deadlines are checked every step). */
#define PW_WORKER_CANCEL_EVERY_MS 20
/* Budget of a step that holds only batch-lane rows, ms (PARKWAY_BATCH_STEP_MS overrides;
 * 0 = none: batch lines may hold max_batch - 1 slots). An interactive request that arrives
 * mid-step waits for the step to end, so the budget bounds that wait; on a CPU a step's
 * time grows with its rows, so the budget caps the batch lane's slots (and trades some of
 * its throughput: bench/bench_batch measures both). Where batch steps stay under the
 * budget, the cap rises to max_batch - 1. */
#define PW_WORKER_BATCH_STEP_MS 16
#define PW_WORKER_BATCH_ADJUST_MS 250 /* how often the batch-lane cap moves by one */
/* The cap holds only while interactive work is around: with no interactive request taken
 * for this long, batch lines may use max_batch - 1 slots (there is no one to keep steps
 * short for; the first interactive request brings the cap back at once). */
#define PW_WORKER_INTERACTIVE_RECENT_MS 5000
/* With every slot busy and batch lines among them: how often to look for interactive work
 * that would evict one (a non-blocking read). */
#define PW_WORKER_EVICT_CHECK_MS 20

struct worker;
struct worker_req;

struct worker_choice {
    struct worker_req *req;
    uint32_t index;
    uint64_t seq_id; /* scheduler id, 0 = not submitted yet */
    bool finished;
};

/* One InferenceRequest being served. */
struct worker_req {
    struct worker *w;
    Parkway__InferenceRequest *msg; /* owned */
    char entry_id[PW_STREAM_ID_MAX];
    const char *stream; /* borrowed from the worker: key_q or key_b, where the entry lives */
    uint32_t attempt;
    uint32_t seq;    /* next ReplyChunk seq */
    int32_t *prompt; /* owned, n_prompt tokens */
    uint32_t n_prompt;
    struct pw_sampling sp;
    uint32_t n_choices, n_finished;
    struct worker_choice choices[PW_WORKER_MAX_CHOICES];
    uint32_t completion_tokens, cached_tokens;
    int64_t picked_ms, first_token_ms;
    bool deadline_hit;
    bool evicting; /* a batch line making room for interactive work: see evict_for */
    bool done;     /* every choice finished and the done chunk queued */
    struct worker_req *next;
};

struct worker {
    struct engine *e;
    redisContext *rc;
    struct pw_spec *spec;
    char fn[PW_KEY_NAME_MAX + 1];
    char key_q[PW_KEY_MAX], key_b[PW_KEY_MAX], key_workers[PW_KEY_MAX];
    char worker_id[PW_KEY_NAME_MAX + 1];
    char host[256];             /* this machine's name, read once at start for the heartbeats */
    struct worker_req *reqs;    /* in flight, newest first */
    uint32_t n_pending_replies; /* pipelined commands whose replies are not read yet */
    bool redis_broken;
    int64_t started_ms;
    uint64_t requests_done, tokens_generated;
    uint64_t last_tokens; /* for the tokens/s of the heartbeat */
    uint64_t last_hb_ms;
    float tokens_per_s;
    uint64_t last_cancel_ms; /* mono ms of the last cancel-flag read */
    bool cancel_due;         /* a request was taken since: read flags at the next check */
    /* Batch-lane cap: slots batch lines may hold, moved so that a step of batch rows only
     * stays within batch_step_ms (0 = no budget: max_batch - 1 slots). */
    uint32_t batch_step_ms;
    uint32_t batch_cap;
    double batch_step_ema_ms; /* steps with batch rows only; 0 = none seen yet */
    uint64_t batch_adjust_ms;
    uint64_t interactive_ms; /* mono ms an interactive request was last submitted; 0 = never */
    uint64_t evict_check_ms; /* mono ms of the last look for interactive work while full */
    uint64_t lines_evicted;
};

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t park_wanted; /* 1 after SIGUSR1 (or --start-parked), 0 after SIGUSR2 */
static int wake_fd[2] = {-1, -1};         /* self-pipe: a signal wakes the parked sleep */

static void on_signal(int sig)
{
    int saved = errno;
    if (sig == SIGUSR1)
        park_wanted = 1;
    else if (sig == SIGUSR2)
        park_wanted = 0;
    else
        stop_requested = 1;
    if (wake_fd[1] >= 0) {
        ssize_t n = write(wake_fd[1], "", 1); /* full pipe: a wake-up is pending anyway */
        (void)n;
    }
    errno = saved;
}

/* Sleeps up to ms, or until a signal writes to the self-pipe; empties the pipe. */
static void wait_wake(uint64_t ms)
{
    struct pollfd pfd = {.fd = wake_fd[0], .events = POLLIN};
    if (poll(&pfd, 1, ms > PW_WORKER_HEARTBEAT_MS ? PW_WORKER_HEARTBEAT_MS : (int)ms) > 0) {
        char buf[64];
        while (read(wake_fd[0], buf, sizeof buf) > 0)
            ;
    }
}

/* ---- Redis plumbing ---------------------------------------------------------------- */

static void append_argv(struct worker *w, int argc, const char **argv, const size_t *lens)
{
    if (redisAppendCommandArgv(w->rc, argc, argv, lens) == REDIS_OK)
        w->n_pending_replies++;
    else
        w->redis_broken = true;
}

/* Reads every pipelined reply; errors are logged (a lost chunk is retried by nobody, so it
 * is worth a line). */
static void flush_pipeline(struct worker *w)
{
    while (w->n_pending_replies > 0) {
        redisReply *r = NULL;
        if (redisGetReply(w->rc, (void **)&r) != REDIS_OK) {
            PW_LOG_ERROR("event=redis_error op=pipeline err=%s", w->rc->errstr);
            w->redis_broken = true;
            w->n_pending_replies = 0;
            return;
        }
        if (r && r->type == REDIS_REPLY_ERROR)
            PW_LOG_ERROR("event=redis_error op=pipeline reply=%s", r->str);
        freeReplyObject(r);
        w->n_pending_replies--;
    }
}

static redisReply *command(struct worker *w, int argc, const char **argv, const size_t *lens)
{
    flush_pipeline(w);
    redisReply *r = redisCommandArgv(w->rc, argc, argv, lens);
    if (!r) {
        PW_LOG_ERROR("event=redis_error op=%s err=%s", argv[0], w->rc->errstr);
        w->redis_broken = true;
    }
    return r;
}

/* ---- replies ----------------------------------------------------------------------- */

static void send_chunk(struct worker_req *q, Parkway__ReplyChunk *c)
{
    struct worker *w = q->w;
    c->request_id = q->msg->id;
    c->attempt = q->attempt;
    c->seq = q->seq++;
    c->worker_id = w->worker_id;
    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    if (pw_proto_pack_reply_alloc(c, &buf, &len, &why) != PW_OK) {
        PW_LOG_ERROR("event=reply_pack_failed request=%s why=%s", q->msg->id, why ? why : "?");
        return;
    }
    const char *argv[] = {"XADD", q->msg->reply_to, "MAXLEN",         "~", PW_WORKER_REPLY_MAXLEN,
                          "*",    PW_STREAM_FIELD,  (const char *)buf};
    size_t lens[] = {4, strlen(q->msg->reply_to), 6,  1, strlen(PW_WORKER_REPLY_MAXLEN),
                     1, strlen(PW_STREAM_FIELD),  len};
    append_argv(w, 8, argv, lens);
    free(buf);
}

static void ack(struct worker *w, const char *stream, const char *entry_id)
{
    const char *argv[] = {"XACK", stream, PW_GROUP_ENGINES, entry_id};
    append_argv(w, 4, argv, NULL);
}

/* A request that ends before generating: one error chunk (if it can be addressed), then ack. */
static void reply_error(struct worker *w, const Parkway__InferenceRequest *msg, uint32_t attempt,
                        const char *stream, const char *entry_id, const char *code,
                        const char *message, uint32_t status)
{
    if (msg && msg->reply_to && msg->reply_to[0] && msg->id && msg->id[0]) {
        Parkway__Error err = PARKWAY__ERROR__INIT;
        err.code = (char *)code;
        err.message = (char *)message;
        err.http_status = status;
        Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
        c.request_id = msg->id;
        c.attempt = attempt;
        c.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_ERROR;
        c.done = true;
        c.error = &err;
        c.worker_id = w->worker_id;
        uint8_t *buf = NULL;
        size_t len = 0;
        if (pw_proto_pack_reply_alloc(&c, &buf, &len, NULL) == PW_OK) {
            const char *argv[] = {
                "XADD", msg->reply_to,   "MAXLEN",         "~", PW_WORKER_REPLY_MAXLEN,
                "*",    PW_STREAM_FIELD, (const char *)buf};
            size_t lens[] = {4, strlen(msg->reply_to),   6,  1, strlen(PW_WORKER_REPLY_MAXLEN),
                             1, strlen(PW_STREAM_FIELD), len};
            append_argv(w, 8, argv, lens);
            free(buf);
        }
    }
    PW_LOG_WARN("event=request_failed request=%s code=%s", msg && msg->id ? msg->id : "?", code);
    ack(w, stream, entry_id);
}

static void fill_logprobs(struct worker *w, const struct engine_token_event *ev,
                          Parkway__TokenLogprob *lp, Parkway__TopLogprob *tops,
                          Parkway__TopLogprob **top_ptrs, uint32_t want_top)
{
    const struct engine_tokenizer *tok = w->e->tok;
    struct engine_tok_str piece = engine_tokenizer_piece(tok, ev->token);
    lp->token = NULL; /* filled by the caller with a NUL-terminated copy */
    lp->logprob = ev->sample->logprob;
    lp->bytes.data = (uint8_t *)piece.ptr;
    lp->bytes.len = piece.len;
    uint32_t n = (uint32_t)ev->sample->n_top < want_top ? (uint32_t)ev->sample->n_top : want_top;
    for (uint32_t i = 0; i < n; i++) {
        parkway__top_logprob__init(&tops[i]);
        struct engine_tok_str p = engine_tokenizer_piece(tok, ev->sample->top[i].token);
        tops[i].logprob = ev->sample->top[i].logprob;
        tops[i].bytes.data = (uint8_t *)p.ptr;
        tops[i].bytes.len = p.len;
        top_ptrs[i] = &tops[i];
    }
    lp->n_top_logprobs = n;
    lp->top_logprobs = top_ptrs;
}

/* Token text for logprobs: the piece's bytes as a string (the router repairs bad UTF-8). */
static char *piece_string(const struct engine_tokenizer *tok, int32_t id, char *buf, size_t cap)
{
    struct engine_tok_str p = engine_tokenizer_piece(tok, id);
    size_t n = p.len < cap - 1 ? p.len : cap - 1;
    memcpy(buf, p.ptr, n);
    buf[n] = '\0';
    return buf;
}

static void on_token(void *ud, uint64_t seq_id, const struct engine_token_event *ev)
{
    struct worker_choice *ch = ud;
    struct worker_req *q = ch->req;
    struct worker *w = q->w;
    w->tokens_generated++;
    if (q->first_token_ms == 0)
        q->first_token_ms = pw_clock_wall_ms();
    if (ev->len == 0 && !q->sp.logprobs)
        return; /* text held back by a stop-string prefix: nothing to say yet */
    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    c.index = ch->index;
    char *text = malloc(ev->len + 1);
    if (!text)
        return;
    memcpy(text, ev->text, ev->len);
    text[ev->len] = '\0';
    c.text = text;
    c.n_tokens = 1;
    Parkway__TokenLogprob lp = PARKWAY__TOKEN_LOGPROB__INIT;
    Parkway__TokenLogprob *lps[1] = {&lp};
    Parkway__TopLogprob tops[ENGINE_SAMPLER_MAX_TOP_LOGPROBS];
    Parkway__TopLogprob *top_ptrs[ENGINE_SAMPLER_MAX_TOP_LOGPROBS];
    char tok_text[ENGINE_SAMPLER_MAX_TOP_LOGPROBS + 1][ENGINE_TOK_MAX_TOKEN_BYTES + 1];
    if (q->sp.logprobs) {
        fill_logprobs(w, ev, &lp, tops, top_ptrs, q->sp.top_logprobs);
        lp.token = piece_string(w->e->tok, ev->token, tok_text[0], sizeof tok_text[0]);
        for (size_t i = 0; i < lp.n_top_logprobs; i++)
            tops[i].token = piece_string(w->e->tok, ev->sample->top[i].token, tok_text[i + 1],
                                         sizeof tok_text[i + 1]);
        c.n_logprobs = 1;
        c.logprobs = lps;
    }
    if (q->seq == 0)
        c.queue_ms = (uint32_t)(q->picked_ms > q->msg->enqueued_unix_ms && q->msg->enqueued_unix_ms
                                    ? q->picked_ms - q->msg->enqueued_unix_ms
                                    : 0);
    send_chunk(q, &c);
    free(text);
}

static Parkway__FinishReason finish_reason(enum engine_finish f)
{
    switch (f) {
    case ENGINE_FINISH_STOP:
        return PARKWAY__FINISH_REASON__FINISH_REASON_STOP;
    case ENGINE_FINISH_LENGTH:
        return PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH;
    case ENGINE_FINISH_CANCELLED:
        return PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED;
    default:
        return PARKWAY__FINISH_REASON__FINISH_REASON_NONE;
    }
}

static void requeue_evicted(struct worker *w, struct worker_req *q);

static void on_finish(void *ud, uint64_t seq_id, enum engine_finish reason, const char *text,
                      size_t len, const struct engine_seq_usage *usage)
{
    struct worker_choice *ch = ud;
    struct worker_req *q = ch->req;
    ch->finished = true;
    q->n_finished++;
    if (q->evicting) { /* no answer: the line runs again from the lane */
        if (q->n_finished == q->n_choices)
            requeue_evicted(q->w, q);
        return;
    }
    q->completion_tokens += usage->completion_tokens;
    if (usage->cached_tokens > q->cached_tokens)
        q->cached_tokens = usage->cached_tokens;

    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    c.index = ch->index;
    char *t = malloc(len + 1);
    if (!t)
        return;
    if (len)
        memcpy(t, text, len); /* text is NULL when a choice ends on a stop or a cancel */
    t[len] = '\0';
    c.text = t;
    c.finish_reason = finish_reason(reason);
    Parkway__Error err = PARKWAY__ERROR__INIT;
    if (reason == ENGINE_FINISH_CANCELLED && q->deadline_hit) {
        err.code = "deadline_exceeded";
        err.message = "the request passed its deadline before it finished";
        err.http_status = 504;
        c.error = &err;
    }
    Parkway__Usage u = PARKWAY__USAGE__INIT;
    if (q->n_finished == q->n_choices) {
        /* The last choice's final chunk is also the request's done chunk. */
        c.done = true;
        u.prompt_tokens = q->n_prompt;
        u.completion_tokens = q->completion_tokens;
        u.cached_tokens = q->cached_tokens;
        c.usage = &u;
        q->done = true;
    }
    send_chunk(q, &c);
    free(t);
    if (q->done) {
        ack(q->w, q->stream, q->entry_id);
        q->w->requests_done++;
        PW_LOG_INFO("event=request_done request=%s attempt=%u prompt_tokens=%u "
                    "completion_tokens=%u cached_tokens=%u finish=%s",
                    q->msg->id, q->attempt, q->n_prompt, q->completion_tokens, q->cached_tokens,
                    engine_finish_name(reason));
    }
}

/* ---- requests ---------------------------------------------------------------------- */

static void req_free(struct worker_req *q)
{
    if (!q)
        return;
    pw_proto_free_request(q->msg);
    free(q->prompt);
    free(q);
}

/* Tokenizes msg into q->prompt. Returns an error code string for the client or NULL. */
static const char *build_prompt(struct worker *w, struct worker_req *q, char *msgbuf, size_t cap)
{
    const Parkway__InferenceRequest *m = q->msg;
    struct engine *e = w->e;
    size_t n = 0, room;
    enum pw_err pe;
    if (m->kind == PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT) {
        size_t bytes = 0;
        for (size_t i = 0; i < m->n_messages; i++)
            bytes += strlen(m->messages[i]->content ? m->messages[i]->content : "") + 16;
        room = bytes + 64 * (m->n_messages + 4) + 1024;
        struct engine_chat_msg *msgs = calloc(m->n_messages ? m->n_messages : 1, sizeof *msgs);
        q->prompt = malloc(room * sizeof(int32_t));
        if (!msgs || !q->prompt) {
            free(msgs);
            snprintf(msgbuf, cap, "out of memory");
            return "internal_error";
        }
        for (size_t i = 0; i < m->n_messages; i++) {
            msgs[i].role = m->messages[i]->role;
            msgs[i].content = m->messages[i]->content ? m->messages[i]->content : "";
            msgs[i].content_len = strlen(msgs[i].content);
        }
        pe = engine_chat_render(e->chat, e->tok, msgs, m->n_messages, true, q->prompt, room, &n,
                                msgbuf, cap);
        free(msgs);
        if (pe)
            return "invalid_request_error";
    } else if (m->n_prompt_token_ids > 0) {
        uint32_t n_vocab = engine_tokenizer_n_vocab(e->tok);
        q->prompt = malloc(m->n_prompt_token_ids * sizeof(int32_t));
        if (!q->prompt)
            return "internal_error";
        for (size_t i = 0; i < m->n_prompt_token_ids; i++) {
            if (m->prompt_token_ids[i] >= n_vocab) {
                snprintf(msgbuf, cap, "prompt token %u is outside the vocabulary",
                         m->prompt_token_ids[i]);
                return "invalid_request_error";
            }
            q->prompt[i] = (int32_t)m->prompt_token_ids[i];
        }
        n = m->n_prompt_token_ids;
    } else {
        const char *p = m->prompt ? m->prompt : "";
        room = strlen(p) + 4;
        q->prompt = malloc(room * sizeof(int32_t));
        if (!q->prompt)
            return "internal_error";
        pe = engine_tokenizer_encode(e->tok, p, strlen(p), ENGINE_TOK_ADD_BOS, q->prompt, room, &n);
        if (pe) {
            snprintf(msgbuf, cap, "cannot tokenize the prompt: %s", pw_err_desc(pe));
            return "invalid_request_error";
        }
    }
    if (n == 0) {
        snprintf(msgbuf, cap, "the prompt is empty");
        return "invalid_request_error";
    }
    uint32_t n_ctx = engine_model_opts(e->model)->n_ctx;
    if (n >= n_ctx) {
        snprintf(msgbuf, cap,
                 "This model's maximum context length is %u tokens. However, your messages "
                 "resulted in %zu tokens. Please reduce the length of the messages.",
                 n_ctx, n);
        return "context_length_exceeded";
    }
    q->n_prompt = (uint32_t)n;
    return NULL;
}

/* Submits the choices of q that are not running yet, as slots allow. */
static void submit_choices(struct worker *w, struct worker_req *q)
{
    for (uint32_t i = 0; i < q->n_choices; i++) {
        struct worker_choice *ch = &q->choices[i];
        if (ch->seq_id || ch->finished)
            continue;
        struct engine_seq_params p = {
            .prompt = q->prompt,
            .n_prompt = q->n_prompt,
            .max_tokens = q->sp.max_tokens,
            .ignore_eos = q->sp.ignore_eos,
            .background = q->stream == w->key_b,
            .userdata = ch,
        };
        if (!p.background)
            w->interactive_ms = pw_clock_mono_ms();
        engine_sampler_params_default(&p.sampling);
        p.sampling.temperature = q->sp.temperature;
        p.sampling.top_p = q->sp.top_p;
        p.sampling.top_k = (int32_t)q->sp.top_k;
        p.sampling.min_p = q->sp.min_p;
        p.sampling.presence_penalty = q->sp.presence_penalty;
        p.sampling.frequency_penalty = q->sp.frequency_penalty;
        p.sampling.repetition_penalty = q->sp.repetition_penalty;
        p.sampling.seed = q->sp.seed;
        p.sampling.choice = i;
        p.sampling.logprobs = q->sp.logprobs;
        p.sampling.top_logprobs = (int32_t)q->sp.top_logprobs;
        struct engine_stop_str stops[ENGINE_STOP_MAX_STOPS];
        const Parkway__SamplingParams *sp = q->msg->sampling;
        size_t n_stops = 0;
        for (size_t k = 0; sp && k < sp->n_stop && n_stops < ENGINE_STOP_MAX_STOPS; k++) {
            stops[n_stops].ptr = sp->stop[k];
            stops[n_stops].len = strlen(sp->stop[k]);
            n_stops++;
        }
        p.stops = stops;
        p.n_stops = (uint32_t)n_stops;
        char err[256];
        enum pw_err pe = engine_sched_submit(w->e->sched, &p, &ch->seq_id, err, sizeof err);
        if (pe == PW_ERR_AGAIN)
            return; /* no slot now; the next step frees one */
        if (pe) {
            /* Parameters the router accepted but the engine refuses: end the choice. */
            ch->finished = true;
            q->n_finished++;
            Parkway__Error e = PARKWAY__ERROR__INIT;
            e.code = "invalid_request_error";
            e.message = err;
            e.http_status = 400;
            Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
            c.index = i;
            c.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_ERROR;
            c.error = &e;
            c.done = q->n_finished == q->n_choices;
            send_chunk(q, &c);
            if (c.done) {
                q->done = true;
                ack(w, q->stream, q->entry_id);
            }
        }
    }
}

/* Takes one stream entry: decode, validate, tokenize, queue its choices. */
static void take_entry(struct worker *w, const char *stream, const struct pw_stream_entry *en,
                       uint32_t attempt_floor)
{
    const struct pw_slice *v = pw_stream_entry_get(en, PW_STREAM_FIELD);
    Parkway__InferenceRequest *msg = NULL;
    char msgbuf[512];
    if (!v || pw_proto_unpack_request(v->ptr, v->len, 0, &msg) != PW_OK) {
        PW_LOG_ERROR("event=bad_request_entry entry=%s", en->id);
        ack(w, stream, en->id); /* nothing to reply to: drop it, or it would be retried forever */
        return;
    }
    uint32_t attempt = msg->attempt > attempt_floor ? msg->attempt : attempt_floor;
    if (strcmp(msg->function, w->fn) != 0) {
        snprintf(msgbuf, sizeof msgbuf, "this engine serves %s, not %s", w->fn, msg->function);
        reply_error(w, msg, attempt, stream, en->id, "invalid_request_error", msgbuf, 400);
        pw_proto_free_request(msg);
        return;
    }
    int64_t now = pw_clock_wall_ms();
    if (msg->deadline_unix_ms && now > msg->deadline_unix_ms) {
        reply_error(w, msg, attempt, stream, en->id, "deadline_exceeded",
                    "the request waited in the queue past its deadline", 504);
        pw_proto_free_request(msg);
        return;
    }
    struct worker_req *q = calloc(1, sizeof *q);
    if (!q) {
        pw_proto_free_request(msg);
        return; /* left pending: claimed again later */
    }
    q->w = w;
    q->msg = msg;
    q->attempt = attempt;
    q->picked_ms = now;
    snprintf(q->entry_id, sizeof q->entry_id, "%s", en->id);
    q->stream = stream;
    pw_proto_sampling_resolve(msg->sampling, &q->sp);
    q->n_choices = q->sp.n ? q->sp.n : 1;
    if (q->n_choices > PW_WORKER_MAX_CHOICES)
        q->n_choices = PW_WORKER_MAX_CHOICES;
    for (uint32_t i = 0; i < q->n_choices; i++) {
        q->choices[i].req = q;
        q->choices[i].index = i;
    }
    const char *code = build_prompt(w, q, msgbuf, sizeof msgbuf);
    if (code) {
        uint32_t status = strcmp(code, "internal_error") == 0 ? 500 : 400;
        reply_error(w, msg, attempt, stream, en->id, code, msgbuf, status);
        req_free(q);
        return;
    }
    q->next = w->reqs;
    w->reqs = q;
    w->cancel_due = true;
    PW_LOG_DEBUG("event=request_taken request=%s attempt=%u prompt_tokens=%u n=%u", msg->id,
                 attempt, q->n_prompt, q->n_choices);
}

/* ---- the loop ---------------------------------------------------------------------- */

static uint32_t choices_waiting(const struct worker *w)
{
    uint32_t n = 0;
    for (const struct worker_req *q = w->reqs; q; q = q->next)
        for (uint32_t i = 0; i < q->n_choices; i++)
            n += !q->choices[i].seq_id && !q->choices[i].finished;
    return n;
}

static void heartbeat(struct worker *w, Parkway__WorkerState state)
{
    uint64_t now = pw_clock_mono_ms();
    if (w->last_hb_ms && now - w->last_hb_ms > 0) {
        double dt = (double)(now - w->last_hb_ms) / 1000.0;
        w->tokens_per_s = (float)((double)(w->tokens_generated - w->last_tokens) / dt);
    }
    w->last_hb_ms = now;
    w->last_tokens = w->tokens_generated;
    Parkway__WorkerStatus ws = PARKWAY__WORKER_STATUS__INIT;
    uint32_t total, free_;
    engine_sched_kv_blocks(w->e->sched, &total, &free_);
    ws.worker_id = w->worker_id;
    ws.function = w->fn;
    ws.state = state;
    ws.slots_total = w->e->opts.max_batch;
    ws.slots_busy = engine_sched_active(w->e->sched);
    ws.tokens_per_s = w->tokens_per_s;
    ws.kv_blocks_total = total;
    ws.kv_blocks_free = free_;
    ws.last_heartbeat_unix_ms = pw_clock_wall_ms();
    ws.started_unix_ms = w->started_ms;
    ws.pid = (uint32_t)getpid();
    ws.host = w->host;
    /* "cpu" or "cuda" (the proto's values); the exact ISA is in the engine_ready log line */
    ws.backend = strncmp(w->e->be->ops->name(w->e->be), "cuda", 4) == 0 ? "cuda" : "cpu";
    ws.model_sha256 = w->spec->model.sha256;
    ws.requests_done = w->requests_done;
    ws.tokens_generated = w->tokens_generated;
    ws.context_len = engine_model_opts(w->e->model)->n_ctx;
    uint8_t *buf = NULL;
    size_t len = 0;
    if (pw_proto_pack_worker_alloc(&ws, &buf, &len, NULL) == PW_OK) {
        const char *argv[] = {"HSET", w->key_workers, w->worker_id, (const char *)buf};
        size_t lens[] = {4, strlen(w->key_workers), strlen(w->worker_id), len};
        append_argv(w, 4, argv, lens);
        free(buf);
    }
    /* Touch our in-flight entries so nobody mistakes them for a dead worker's: one XCLAIM
     * per stream they came from. */
    const char *streams[] = {w->key_q, w->key_b};
    for (int s = 0; s < 2; s++) {
        const char *argv[6 + 64];
        int argc = 0;
        argv[argc++] = "XCLAIM";
        argv[argc++] = streams[s];
        argv[argc++] = PW_GROUP_ENGINES;
        argv[argc++] = w->worker_id;
        argv[argc++] = "0";
        int first_id = argc;
        for (struct worker_req *q = w->reqs; q && argc < 5 + 64; q = q->next)
            if (!q->done && q->stream == streams[s])
                argv[argc++] = q->entry_id;
        if (argc > first_id) {
            argv[argc++] = "JUSTID";
            append_argv(w, argc, argv, NULL);
        }
    }
}

static bool interactive_recent(const struct worker *w)
{
    return w->interactive_ms &&
           pw_clock_mono_ms() - w->interactive_ms < PW_WORKER_INTERACTIVE_RECENT_MS;
}

/* Batch-lane entries this worker may take now: the free slots minus one kept for
 * interactive work (none kept when the engine has a single slot), and no more than the
 * batch-lane cap allows beside the batch lines already running (the cap only while
 * interactive work is around). */
static uint32_t batch_room(const struct worker *w, uint32_t free_slots)
{
    uint32_t keep = w->e->opts.max_batch > 1 ? 1 : 0;
    uint32_t room = free_slots > keep ? free_slots - keep : 0;
    uint32_t bg = engine_sched_background(w->e->sched);
    uint32_t cap = interactive_recent(w) ? w->batch_cap : w->e->opts.max_batch;
    uint32_t cap_room = cap > bg ? cap - bg : 0;
    return room < cap_room ? room : cap_room;
}

/* After a step that took step_ms: keeps an average of decode steps holding batch rows only
 * (a step that also read prompt rows says little about the steady state: it is left out) and
 * moves the cap by one every PW_WORKER_BATCH_ADJUST_MS, down (to max_batch / 4 at least)
 * while such steps exceed the budget, up while they stay under 70% of it and the lane uses
 * its whole cap. */
static void batch_cap_update(struct worker *w, double step_ms, bool prefill)
{
    uint32_t max_cap = w->e->opts.max_batch > 1 ? w->e->opts.max_batch - 1 : 1;
    if (w->batch_step_ms == 0) {
        w->batch_cap = max_cap;
        return;
    }
    uint32_t bg = engine_sched_background(w->e->sched);
    if (bg == 0 || engine_sched_active(w->e->sched) != bg || prefill || !interactive_recent(w))
        return; /* only decode steps of batch rows alone, while the cap applies, tell what
                   a batch step costs */
    w->batch_step_ema_ms =
        w->batch_step_ema_ms > 0 ? 0.8 * w->batch_step_ema_ms + 0.2 * step_ms : step_ms;
    uint64_t now = pw_clock_mono_ms();
    if (now - w->batch_adjust_ms < PW_WORKER_BATCH_ADJUST_MS)
        return;
    w->batch_adjust_ms = now;
    uint32_t old = w->batch_cap;
    /* Floor: a quarter of the slots, so that CPU contention from other processes (which
     * slows every step) cannot starve the lane down to one line at a time. */
    uint32_t min_cap = w->e->opts.max_batch / 4 ? w->e->opts.max_batch / 4 : 1;
    if (w->batch_step_ema_ms > (double)w->batch_step_ms && w->batch_cap > min_cap)
        w->batch_cap--;
    else if (w->batch_step_ema_ms < 0.7 * (double)w->batch_step_ms && bg >= w->batch_cap &&
             w->batch_cap < max_cap)
        w->batch_cap++;
    if (w->batch_cap != old)
        PW_LOG_DEBUG("event=batch_cap cap=%u step_ms=%.1f", w->batch_cap, w->batch_step_ema_ms);
}

/* Entries idle past PW_WORKER_STALE_MS belong to a worker that stopped heartbeating. */
static bool worker_owns(const struct worker *w, const char *entry_id)
{
    for (const struct worker_req *q = w->reqs; q; q = q->next)
        if (strcmp(q->entry_id, entry_id) == 0)
            return true;
    return false;
}

static void claim_stale(struct worker *w, const char *stream, uint32_t room)
{
    char count[16], idle[16];
    snprintf(count, sizeof count, "%u", room);
    snprintf(idle, sizeof idle, "%u",
             w->e->opts.claim_idle_ms ? w->e->opts.claim_idle_ms : PW_WORKER_STALE_MS);
    const char *argv[] = {"XAUTOCLAIM", stream, PW_GROUP_ENGINES, w->worker_id,
                          idle,         "0-0",  "COUNT",          count};
    redisReply *r = command(w, 8, argv, NULL);
    if (!r)
        return;
    struct pw_stream_entries *es = NULL;
    if (r->type != REDIS_REPLY_ERROR && pw_stream_parse_autoclaim(r, &es) == PW_OK) {
        for (size_t i = 0; i < es->n; i++) {
            /* XAUTOCLAIM also returns entries this worker already runs, when a step took
             * longer than the idle threshold: never start those twice. */
            if (worker_owns(w, es->v[i].id))
                continue;
            /* Deliveries so far tell the attempt: first delivery is attempt 0. */
            const char *pa[] = {"XPENDING",  stream,      PW_GROUP_ENGINES,
                                es->v[i].id, es->v[i].id, "1"};
            redisReply *p = command(w, 6, pa, NULL);
            uint32_t attempt = 1;
            if (p && p->type == REDIS_REPLY_ARRAY && p->elements == 1 &&
                p->element[0]->type == REDIS_REPLY_ARRAY && p->element[0]->elements == 4 &&
                p->element[0]->element[3]->type == REDIS_REPLY_INTEGER &&
                p->element[0]->element[3]->integer > 1)
                attempt = (uint32_t)(p->element[0]->element[3]->integer - 1);
            freeReplyObject(p);
            PW_LOG_WARN("event=claimed_stale entry=%s attempt=%u", es->v[i].id, attempt);
            take_entry(w, stream, &es->v[i], attempt);
        }
    }
    pw_stream_entries_free(es);
    freeReplyObject(r);
}

/*
 * XREADGROUP of new entries: from stream with COUNT room, or (block) from both streams
 * waiting up to PW_WORKER_BLOCK_MS, COUNT 1 each (the next loop reads the rest without blocking;
 * the batch lane only when batch_room > 0). Returns the entries taken.
 */
static uint32_t read_new(struct worker *w, const char *stream, uint32_t room, bool block,
                         uint32_t batch_room_now)
{
    char count[16];
    snprintf(count, sizeof count, "%u", block ? 1u : room);
    const char *argv[13];
    int argc = 0;
    argv[argc++] = "XREADGROUP";
    argv[argc++] = "GROUP";
    argv[argc++] = PW_GROUP_ENGINES;
    argv[argc++] = w->worker_id;
    argv[argc++] = "COUNT";
    argv[argc++] = count;
    if (block) {
        argv[argc++] = "BLOCK";
        argv[argc++] = PW_WORKER_BLOCK_MS;
    }
    argv[argc++] = "STREAMS";
    if (block && batch_room_now > 0) {
        argv[argc++] = w->key_q;
        argv[argc++] = w->key_b;
        argv[argc++] = ">";
        argv[argc++] = ">";
    } else {
        argv[argc++] = block ? w->key_q : stream;
        argv[argc++] = ">";
    }
    redisReply *r = command(w, argc, argv, NULL);
    if (!r)
        return 0;
    uint32_t taken = 0;
    if (r->type == REDIS_REPLY_ERROR) {
        PW_LOG_ERROR("event=redis_error op=XREADGROUP reply=%s", r->str);
    } else if (r->type == REDIS_REPLY_ARRAY) {
        /* One [key, entries] pair per stream that had something. */
        for (size_t k = 0; k < r->elements; k++) {
            const redisReply *pair = r->element[k];
            if (pair->type != REDIS_REPLY_ARRAY || pair->elements != 2 ||
                pair->element[0]->type != REDIS_REPLY_STRING)
                continue;
            const char *from = strcmp(pair->element[0]->str, w->key_b) == 0 ? w->key_b : w->key_q;
            redisReply one = *r;
            one.elements = 1;
            one.element = &r->element[k];
            struct pw_stream_entries *es = NULL;
            if (pw_stream_parse_read(&one, &es) == PW_OK) {
                for (size_t i = 0; i < es->n; i++, taken++)
                    take_entry(w, from, &es->v[i], 0);
            }
            pw_stream_entries_free(es);
        }
    }
    freeReplyObject(r);
    return taken;
}

/* Ends every choice of q with ENGINE_FINISH_CANCELLED (at the next step when running). */
static void cancel_req(struct worker *w, struct worker_req *q)
{
    for (uint32_t i = 0; i < q->n_choices && !q->done; i++) {
        struct worker_choice *ch = &q->choices[i];
        if (ch->finished)
            continue;
        if (ch->seq_id) {
            engine_sched_cancel(w->e->sched, ch->seq_id);
        } else {
            /* never started: end it here with the same reason */
            struct engine_seq_usage u = {.prompt_tokens = q->n_prompt};
            on_finish(ch, 0, ENGINE_FINISH_CANCELLED, "", 0, &u);
        }
    }
}

/*
 * Batch-line eviction. Every slot busy with batch lines among them leaves an interactive
 * request waiting for a line to finish (the engine keeps only one slot free for
 * interactive work). Instead the worker takes the waiting request and ends a batch line
 * early: it goes back to the batch lane as attempt + 1 (XADD, then XACK of the old entry,
 * pipelined in that order) and runs again from its prompt later. The batch coordinator
 * keeps each line's highest attempt, so the chunks this attempt already sent are
 * superseded; results are recorded once per custom_id either way.
 */
static void requeue_evicted(struct worker *w, struct worker_req *q)
{
    q->done = true; /* reaped after this step either way */
    q->msg->attempt = q->attempt + 1;
    uint8_t *buf = NULL;
    size_t n = 0;
    if (pw_proto_pack_request_alloc(q->msg, &buf, &n, NULL) != PW_OK) {
        /* left pending unacknowledged: claimed again once stale, as after a crash */
        PW_LOG_WARN("event=batch_line_evict_failed request=%s", q->msg->id);
        return;
    }
    const char *argv[] = {"XADD", w->key_b, "*", PW_STREAM_FIELD, (const char *)buf};
    size_t lens[] = {4, strlen(w->key_b), 1, strlen(PW_STREAM_FIELD), n};
    append_argv(w, 5, argv, lens);
    free(buf);
    ack(w, q->stream, q->entry_id);
    w->lines_evicted++;
    PW_LOG_INFO("event=batch_line_evicted request=%s attempt=%u next_attempt=%u", q->msg->id,
                q->attempt, q->attempt + 1);
}

/* Interactive choices not started, and running choices of lines already being evicted. */
static void evict_counts(const struct worker *w, uint32_t *waiting, uint32_t *freeing)
{
    *waiting = *freeing = 0;
    for (const struct worker_req *q = w->reqs; q; q = q->next) {
        if (q->done)
            continue;
        for (uint32_t i = 0; i < q->n_choices; i++) {
            const struct worker_choice *ch = &q->choices[i];
            if (q->stream == w->key_q && !ch->seq_id && !ch->finished)
                (*waiting)++;
            if (q->evicting && ch->seq_id && !ch->finished)
                (*freeing)++;
        }
    }
}

/* Ends the newest batch line (the least work lost); false when none runs. */
static bool evict_one(struct worker *w)
{
    struct worker_req *victim = NULL;
    for (struct worker_req *q = w->reqs; q; q = q->next) {
        if (q->done || q->evicting || q->stream != w->key_b)
            continue;
        bool running = false;
        for (uint32_t i = 0; i < q->n_choices; i++)
            running |= q->choices[i].seq_id && !q->choices[i].finished;
        if (running && (!victim || q->picked_ms > victim->picked_ms))
            victim = q;
    }
    if (!victim)
        return false;
    victim->evicting = true;
    for (uint32_t i = 0; i < victim->n_choices; i++) {
        struct worker_choice *ch = &victim->choices[i];
        if (ch->finished)
            continue;
        if (ch->seq_id) {
            engine_sched_cancel(w->e->sched, ch->seq_id); /* ends at the next step */
        } else {
            struct engine_seq_usage u = {.prompt_tokens = victim->n_prompt};
            on_finish(ch, 0, ENGINE_FINISH_CANCELLED, "", 0, &u);
        }
    }
    return true;
}

/* With every slot busy and batch lines running: take a waiting interactive request (a
 * non-blocking read, at most every PW_WORKER_EVICT_CHECK_MS) and evict as many lines as
 * its choices need. */
static void evict_for_interactive(struct worker *w)
{
    struct engine_sched *sc = w->e->sched;
    if (engine_sched_free_slots(sc) > 0 || engine_sched_background(sc) == 0)
        return;
    uint32_t waiting, freeing;
    evict_counts(w, &waiting, &freeing);
    if (waiting == 0) {
        uint64_t now = pw_clock_mono_ms();
        if (now - w->evict_check_ms < PW_WORKER_EVICT_CHECK_MS)
            return;
        w->evict_check_ms = now;
        if (read_new(w, w->key_q, 1, false, 0) == 0)
            return;
        evict_counts(w, &waiting, &freeing);
    }
    while (freeing < waiting && evict_one(w))
        evict_counts(w, &waiting, &freeing);
}

/* Deadlines of what runs (every call) and cancel flags: one pipelined EXISTS per request,
 * one round trip, at most every PW_WORKER_CANCEL_EVERY_MS (at once after a new request). */
static void check_cancels(struct worker *w)
{
    uint64_t mono = pw_clock_mono_ms();
    bool query = w->cancel_due || mono - w->last_cancel_ms >= PW_WORKER_CANCEL_EVERY_MS;
    if (!query) {
        int64_t now = pw_clock_wall_ms();
        for (struct worker_req *q = w->reqs; q; q = q->next) {
            if (q->done || !q->msg->deadline_unix_ms || now <= q->msg->deadline_unix_ms)
                continue;
            q->deadline_hit = true;
            PW_LOG_INFO("event=request_cancelled request=%s reason=deadline", q->msg->id);
            cancel_req(w, q);
        }
        return;
    }
    w->cancel_due = false;
    w->last_cancel_ms = mono;
    uint32_t n = 0;
    for (struct worker_req *q = w->reqs; q; q = q->next) {
        if (q->done)
            continue;
        char key[PW_KEY_MAX];
        if (pw_key_cancel(key, sizeof key, q->msg->id) != PW_OK)
            continue;
        const char *argv[] = {"EXISTS", key};
        append_argv(w, 2, argv, NULL);
        n++;
    }
    /* Replies come back in order; earlier pipelined writes come first. */
    uint32_t skip = w->n_pending_replies - n;
    for (uint32_t i = 0; i < skip; i++) {
        redisReply *r = NULL;
        if (redisGetReply(w->rc, (void **)&r) != REDIS_OK) {
            w->redis_broken = true;
            w->n_pending_replies = 0;
            return;
        }
        if (r && r->type == REDIS_REPLY_ERROR)
            PW_LOG_ERROR("event=redis_error op=pipeline reply=%s", r->str);
        freeReplyObject(r);
        w->n_pending_replies--;
    }
    int64_t now = pw_clock_wall_ms();
    for (struct worker_req *q = w->reqs; q; q = q->next) {
        if (q->done)
            continue;
        redisReply *r = NULL;
        if (redisGetReply(w->rc, (void **)&r) != REDIS_OK) {
            w->redis_broken = true;
            w->n_pending_replies = 0;
            return;
        }
        w->n_pending_replies--;
        bool cancel = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
        freeReplyObject(r);
        bool late = q->msg->deadline_unix_ms && now > q->msg->deadline_unix_ms;
        if (!cancel && !late)
            continue;
        q->deadline_hit = late && !cancel;
        PW_LOG_INFO("event=request_cancelled request=%s reason=%s", q->msg->id,
                    cancel ? "client" : "deadline");
        cancel_req(w, q);
    }
}

static void reap(struct worker *w)
{
    struct worker_req **pp = &w->reqs;
    while (*pp) {
        struct worker_req *q = *pp;
        if (q->done) {
            *pp = q->next;
            req_free(q);
        } else {
            pp = &q->next;
        }
    }
}

/* Resolves the model file: --model, else the spec's path, else the spec's source in the
 * model cache (tools/fetch-model.sh puts it there). */
static enum pw_err resolve_model(struct worker *w, char *path, size_t cap, char *err, size_t errcap)
{
    const struct pw_spec *s = w->spec;
    if (w->e->opts.model_path) {
        snprintf(path, cap, "%s", w->e->opts.model_path);
    } else if (s->model.path) {
        snprintf(path, cap, "%s", s->model.path);
    } else {
        const char *dir = getenv("PARKWAY_MODEL_DIR");
        const char *home = getenv("HOME");
        const char *file = strrchr(s->model.source.file, '/');
        file = file ? file + 1 : s->model.source.file;
        if (dir && *dir)
            snprintf(path, cap, "%s/%s", dir, file);
        else
            snprintf(path, cap, "%s/.cache/parkway/models/%s", home ? home : ".", file);
    }
    if (access(path, R_OK) != 0) {
        snprintf(err, errcap, "model file %s: %s%s", path, strerror(errno),
                 s->model.source.kind ? " (run tools/fetch-model.sh)" : "");
        return PW_ERR_IO;
    }
    return PW_OK;
}

int engine_worker_run(struct engine *e)
{
    struct worker w;
    memset(&w, 0, sizeof w);
    w.e = e;
    char err[PATH_MAX + 512] = "";
    char model_path[PATH_MAX];
    int rc = 1;
    enum pw_err pe = pw_spec_load_file(e->opts.spec_path, &w.spec, err, sizeof err);
    if (pe) {
        fprintf(stderr, "%s\n", err);
        return pw_err_exit_code(pe);
    }
    snprintf(w.fn, sizeof w.fn, "%s", w.spec->name);
    if (gethostname(w.host, sizeof w.host - 1) != 0)
        w.host[0] = '\0';
    if (e->opts.worker_id) {
        if (!pw_key_name_ok(e->opts.worker_id)) {
            fprintf(stderr, "parkway-engine: --worker-id: use 1-128 of [A-Za-z0-9._-]\n");
            pw_spec_destroy(w.spec);
            return 2;
        }
        snprintf(w.worker_id, sizeof w.worker_id, "%s", e->opts.worker_id);
    } else {
        pw_cli_host_pid_id(w.worker_id, sizeof w.worker_id, "engine");
    }
    pw_key_queue(w.key_q, sizeof w.key_q, w.fn);
    pw_key_batch_lane(w.key_b, sizeof w.key_b, w.fn);
    pw_key_workers(w.key_workers, sizeof w.key_workers, w.fn);

    /* The spec sets the serving shape; command-line flags win. */
    if (e->opts.max_batch == 16 && w.spec->engine.max_batch)
        e->opts.max_batch = w.spec->engine.max_batch;
    if (e->opts.n_ctx == 0)
        e->opts.n_ctx = w.spec->engine.context_length;
    e->opts.gpu = e->opts.gpu || w.spec->resources.gpu != PW_SPEC_GPU_NONE;
    if (!e->opts.chat_template && w.spec->model.chat_template != PW_SPEC_TEMPLATE_AUTO)
        e->opts.chat_template = pw_spec_chat_template_name(w.spec->model.chat_template);
    if ((pe = resolve_model(&w, model_path, sizeof model_path, err, sizeof err))) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        pw_spec_destroy(w.spec);
        return 2;
    }
    e->opts.model_path = model_path;

    /* Before the load (which takes a while): a park or unpark signal sent meanwhile must be
     * recorded, not kill the process (their default action). */
    park_wanted = e->opts.start_parked;
    if (pipe2(wake_fd, O_CLOEXEC | O_NONBLOCK) != 0) {
        fprintf(stderr, "parkway-engine: pipe: %s\n", strerror(errno));
        pw_spec_destroy(w.spec);
        return 1;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    struct engine_sched_cb cb = {.on_token = on_token, .on_finish = on_finish};
    if ((pe = engine_load(e, &cb, err, sizeof err))) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        rc = pw_err_exit_code(pe);
        goto out;
    }
    if ((pe = pw_redis_sync_connect(e->opts.redis_url, 5000, &w.rc, err, sizeof err))) {
        fprintf(stderr, "parkway-engine: %s\n", err);
        rc = pw_err_exit_code(pe);
        goto out;
    }
    /* Group from id 0: requests queued before the first engine existed are served. */
    const char *lanes[] = {w.key_q, w.key_b};
    for (int i = 0; i < 2; i++) {
        const char *g[] = {"XGROUP", "CREATE", lanes[i], PW_GROUP_ENGINES, "0", "MKSTREAM"};
        redisReply *r = command(&w, 6, g, NULL);
        if (r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSYGROUP", 9) != 0)
            PW_LOG_ERROR("event=redis_error op=XGROUP reply=%s", r->str);
        freeReplyObject(r);
    }
    w.batch_step_ms = PW_WORKER_BATCH_STEP_MS;
    const char *bsm = getenv("PARKWAY_BATCH_STEP_MS");
    if (bsm && *bsm)
        w.batch_step_ms = (uint32_t)strtoul(bsm, NULL, 10);
    w.batch_cap = e->opts.max_batch > 1 ? e->opts.max_batch - 1 : 1;
    w.started_ms = pw_clock_wall_ms();
    PW_LOG_INFO("event=worker_ready function=%s worker=%s stream=%s slots=%u", w.fn, w.worker_id,
                w.key_q, e->opts.max_batch);

    uint64_t last_claim = 0;
    bool draining = false; /* SIGTERM: finish and exit */
    enum { MODE_ACTIVE, MODE_PARKING, MODE_PARKED } mode = MODE_ACTIVE;
    uint64_t parked_since = pw_clock_mono_ms();
    if (park_wanted) {
        mode = MODE_PARKED; /* --start-parked, or SIGUSR1 during the load */
        PW_LOG_INFO("event=parked requests_done=0");
    }
    /* Touch our entries well within the claim threshold, so a short --claim-idle-ms never
     * lets another worker take what this one is running. */
    uint64_t hb_every = PW_WORKER_HEARTBEAT_MS;
    if (e->opts.claim_idle_ms && e->opts.claim_idle_ms / 3 < hb_every)
        hb_every = e->opts.claim_idle_ms / 3 ? e->opts.claim_idle_ms / 3 : 1;
    while (!w.redis_broken) {
        if (stop_requested && !draining) {
            draining = true;
            PW_LOG_INFO("event=draining in_flight=%u", engine_sched_active(e->sched));
        }
        /* Mode changes heartbeat at once: the scaler waits for them. */
        if (park_wanted && mode == MODE_ACTIVE) {
            mode = MODE_PARKING;
            w.last_hb_ms = 0;
            PW_LOG_INFO("event=parking in_flight=%u", engine_sched_active(e->sched));
        } else if (!park_wanted && mode != MODE_ACTIVE) {
            if (mode == MODE_PARKED)
                PW_LOG_INFO("event=unparked parked_ms=%llu",
                            (unsigned long long)(pw_clock_mono_ms() - parked_since));
            mode = MODE_ACTIVE;
            w.last_hb_ms = 0;
        }
        uint64_t now = pw_clock_mono_ms();
        if (mode == MODE_PARKED && !draining) {
            /* No XREADGROUP is outstanding: nothing can be delivered to us. */
            if (w.last_hb_ms == 0 || now - w.last_hb_ms >= hb_every) {
                heartbeat(&w, PARKWAY__WORKER_STATE__WORKER_STATE_PARKED);
                flush_pipeline(&w);
                continue;
            }
            wait_wake(hb_every - (now - w.last_hb_ms));
            continue;
        }
        if (w.last_hb_ms == 0 || now - w.last_hb_ms >= hb_every)
            heartbeat(&w, draining || mode == MODE_PARKING
                              ? PARKWAY__WORKER_STATE__WORKER_STATE_DRAINING
                              : PARKWAY__WORKER_STATE__WORKER_STATE_READY);
        uint32_t free_slots = engine_sched_free_slots(e->sched);
        uint32_t waiting = choices_waiting(&w);
        if (!draining && mode == MODE_ACTIVE && waiting == 0 && free_slots > 0) {
            if (now - last_claim >= PW_WORKER_HEARTBEAT_MS) {
                last_claim = now;
                claim_stale(&w, w.key_q, free_slots);
                if (choices_waiting(&w) == 0 && batch_room(&w, free_slots) > 0)
                    claim_stale(&w, w.key_b, batch_room(&w, free_slots));
            }
            /* Interactive first; the batch lane only with what it leaves; block only when
             * idle and both are empty. */
            if (choices_waiting(&w) == 0) {
                uint32_t broom = batch_room(&w, free_slots);
                uint32_t got = read_new(&w, w.key_q, free_slots, false, 0);
                if (got == 0 && broom > 0)
                    got = read_new(&w, w.key_b, broom, false, 0);
                /* A park signal during the block is seen when it returns; what it
                 * returned is served before the park completes. */
                if (got == 0 && engine_sched_active(e->sched) == 0 && !park_wanted)
                    read_new(&w, w.key_q, free_slots, true, broom);
            }
        }
        if (!draining && mode == MODE_ACTIVE)
            evict_for_interactive(&w);
        for (struct worker_req *q = w.reqs; q; q = q->next)
            if (!q->done && !q->evicting)
                submit_choices(&w, q);
        check_cancels(&w);
        if (engine_sched_active(e->sched) > 0) {
            uint64_t t0 = pw_clock_mono_ns();
            uint64_t prompt0 = engine_sched_stats(e->sched)->prompt_tokens;
            engine_sched_step(e->sched);
            batch_cap_update(&w, (double)(pw_clock_mono_ns() - t0) / 1e6,
                             engine_sched_stats(e->sched)->prompt_tokens != prompt0);
        }
        flush_pipeline(&w);
        reap(&w);
        if (draining && !w.reqs)
            break;
        if (mode == MODE_PARKING && !w.reqs) {
            /* Everything answered and acknowledged (the flush above wrote the XACKs). */
            mode = MODE_PARKED;
            parked_since = pw_clock_mono_ms();
            w.last_hb_ms = 0;
            PW_LOG_INFO("event=parked requests_done=%llu", (unsigned long long)w.requests_done);
        }
    }
    if (w.redis_broken) {
        /* Unacknowledged requests stay pending in Redis and are claimed by another engine. */
        fprintf(stderr, "parkway-engine: lost Redis (%s); exiting so the scaler restarts us\n",
                w.rc ? w.rc->errstr : "?");
        rc = 1;
    } else {
        const char *hdel[] = {"HDEL", w.key_workers, w.worker_id};
        freeReplyObject(command(&w, 3, hdel, NULL));
        PW_LOG_INFO("event=worker_stopped requests_done=%llu", (unsigned long long)w.requests_done);
        rc = 0;
    }
out:
    while (w.reqs) {
        struct worker_req *q = w.reqs;
        w.reqs = q->next;
        req_free(q);
    }
    if (w.rc)
        redisFree(w.rc);
    engine_unload(e);
    pw_spec_destroy(w.spec);
    for (int i = 0; i < 2; i++) {
        if (wake_fd[i] >= 0)
            close(wake_fd[i]);
        wake_fd[i] = -1;
    }
    return rc;
}

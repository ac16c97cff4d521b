/*
 * fuzz_openai: libFuzzer target for router/router_openai.h, the router's translation of
 * client JSON into InferenceRequests and of engine ReplyChunks back into OpenAI JSON/SSE.
 * Both directions carry untrusted bytes: request bodies from clients, reply chunks from
 * Redis. The low two bits of the first byte pick the mode; the rest is the input:
 *   0  /v1/chat/completions body    -> router_openai_parse_chat
 *   1  /v1/completions body         -> router_openai_parse_completion
 *   2, 3  a reply stream: byte 1 shapes the response (kind, n, parts, logprobs, usage),
 *      then records of [len lo][len hi][len bytes of an encoded ReplyChunk]; each record
 *      decoded with pw_proto_unpack_reply (as the router does) feeds an accumulator and
 *      a stream renderer side by side.
 *
 * Checks besides "no crash": every request the parser accepts passes
 * pw_proto_check_request (the router never queues what engines refuse) and renders a
 * response for a finishing chunk; error objects, rendered bodies and every SSE event
 * are JSON that jansson accepts, one event per `data:` line, nothing after [DONE].
 *
 * The replay main() is tests/fuzz/fuzz_replay.c (ctest, label fuzz-smoke).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "pw_proto.h"
#include "router_openai.h"
#include "router_sse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUEST_ID "req1"

static enum router_openai_access check_model(void *arg, const char *model)
{
    (void)arg;
    if (strcmp(model, "secret") == 0)
        return ROUTER_OPENAI_MODEL_DENIED;
    if (strcmp(model, "nope") == 0)
        return ROUTER_OPENAI_MODEL_NOT_FOUND;
    return ROUTER_OPENAI_MODEL_OK;
}

static const struct router_openai_ctx fixed_ctx = {
    .request_id = REQUEST_ID,
    .tenant = "acme",
    .key_id = "key_1a2b3c4d",
    .reply_to = "pw:reply:r1",
    .now_unix_ms = 1700000000000LL,
    .deadline_ms = 0,
    .default_deadline_ms = 60000,
    .max_deadline_ms = 600000,
    .seed = 0x1234abcdULL,
    .model_check = check_model,
    .model_check_arg = NULL,
};

static void json_ok(const char *s, size_t len)
{
    json_error_t je;
    json_t *v = json_loadb(s, len, 0, &je);
    if (!v) {
        fprintf(stderr, "fuzz_openai: not JSON (%s): %.*s\n", je.text, (int)len, s);
        abort();
    }
    json_decref(v);
}

/* The buffer is whole SSE events: `data: JSON\n\n`, `data: [DONE]\n\n` (last) or comments. */
static void sse_ok(const struct router_sse_buf *b, bool *done_seen)
{
    size_t pos = 0;
    while (pos < b->len) {
        const char *ev = b->data + pos;
        const char *end = memmem(ev, b->len - pos, "\n\n", 2);
        if (!end || *done_seen)
            abort();
        size_t n = (size_t)(end - ev);
        if (memchr(ev, '\n', n))
            abort(); /* one line per event */
        if (n >= 6 && memcmp(ev, "data: ", 6) == 0) {
            if (n == 12 && memcmp(ev + 6, "[DONE]", 6) == 0)
                *done_seen = true;
            else
                json_ok(ev + 6, n - 6);
        } else if (n == 0 || ev[0] != ':') {
            abort();
        }
        pos += n + 2;
    }
}

static void error_ok(const struct router_openai_error *e)
{
    char *js = NULL;
    size_t jl = 0;
    if (e->status < 400 || e->status > 599 || !e->type)
        abort();
    if (router_openai_error_json(e, &js, &jl) != PW_OK)
        return; /* NOMEM */
    json_ok(js, jl);
    free(js);
}

/* Feeds chunks to an accumulator and a stream for response r; checks what comes out. */
static void feed_both(const struct router_openai_resp *r, Parkway__ReplyChunk **chunks, size_t n)
{
    struct router_openai_acc *acc = router_openai_acc_create(r);
    struct router_openai_stream *st = router_openai_stream_create(r);
    struct router_sse_buf out;
    bool acc_done = false, st_done = false, done_seen = false;
    router_sse_buf_init(&out);
    if (!acc || !st)
        goto out;
    for (size_t i = 0; i < n; i++) {
        bool fin = false;
        enum pw_err e1 = router_openai_acc_add(acc, chunks[i], &fin);
        if (e1 == PW_OK && fin)
            acc_done = true;
        if (!st_done) {
            fin = false;
            enum pw_err e2 = router_openai_stream_feed(st, chunks[i], &out, &fin);
            if (e1 != e2 && e1 != PW_ERR_NOMEM && e2 != PW_ERR_NOMEM)
                abort(); /* both judge a chunk alike */
            if (e2 == PW_OK && fin)
                st_done = true;
            if (fin != router_openai_stream_finished(st))
                abort();
        }
    }
    if (!st_done) {
        struct router_openai_error e;
        router_openai_err_deadline(&e);
        (void)router_openai_stream_fail(st, &e, &out);
        if (!router_openai_stream_finished(st))
            abort();
    }
    sse_ok(&out, &done_seen);
    char *body = NULL;
    size_t blen = 0;
    int status = 0;
    enum pw_err rc = router_openai_acc_render(acc, &body, &blen, &status);
    if (acc_done && rc == PW_OK) {
        if (status < 200 || status > 599)
            abort();
        json_ok(body, blen);
    } else if (!acc_done && rc != PW_ERR_INVAL) {
        abort(); /* rendering before the end is refused */
    }
    free(body);
    (void)router_openai_acc_dropped(acc);
    (void)router_openai_stream_dropped(st);
out:
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
    router_openai_acc_destroy(acc);
}

/* After a successful parse: the finishing chunk of every part and choice renders. */
static void answer_parsed(Parkway__InferenceRequest **reqs, size_t n_parts)
{
    for (size_t i = 0; i < n_parts; i++) {
        const char *why = NULL;
        if (pw_proto_check_request(reqs[i], &why) != PW_OK) {
            fprintf(stderr, "fuzz_openai: parsed request %zu fails the wire check: %s\n", i,
                    why ? why : "?");
            abort();
        }
    }
    struct router_openai_resp r;
    router_openai_resp_from_request(&r, reqs[0], REQUEST_ID, n_parts, 1700000000);
    if (r.n < 1 || r.n > PW_PROTO_N_MAX)
        abort();
    size_t total = (size_t)n_parts * r.n;
    Parkway__ReplyChunk *cs = calloc(total, sizeof(*cs));
    Parkway__ReplyChunk **cp = calloc(total, sizeof(*cp));
    Parkway__Usage usage = PARKWAY__USAGE__INIT;
    usage.prompt_tokens = 3;
    usage.completion_tokens = 2;
    if (!cs || !cp)
        goto out;
    for (size_t k = 0; k < n_parts; k++) {
        for (uint32_t i = 0; i < r.n; i++) {
            Parkway__ReplyChunk *c = &cs[k * r.n + i];
            parkway__reply_chunk__init(c);
            c->request_id = reqs[k]->id;
            c->seq = i;
            c->index = i;
            c->text = "Hi \xC3\xA9";
            c->finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_STOP;
            c->done = i + 1 == r.n;
            c->usage = c->done ? &usage : NULL;
            cp[k * r.n + i] = c;
        }
    }
    feed_both(&r, cp, total);
out:
    free(cp);
    free(cs);
}

static void parse_body(bool chat, const uint8_t *body, size_t len)
{
    struct router_openai_error err;
    memset(&err, 0, sizeof(err));
    enum pw_err rc;
    if (chat) {
        Parkway__InferenceRequest *req = (Parkway__InferenceRequest *)1;
        rc = router_openai_parse_chat((const char *)body, len, &fixed_ctx, &req, &err);
        if (rc == PW_OK) {
            if (!req || req->kind != PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT)
                abort();
            answer_parsed(&req, 1);
            pw_proto_free_request(req);
        } else if (req != NULL) {
            abort();
        }
    } else {
        Parkway__InferenceRequest **reqs = (Parkway__InferenceRequest **)1;
        size_t n = 99;
        rc = router_openai_parse_completion((const char *)body, len, &fixed_ctx, &reqs, &n, &err);
        if (rc == PW_OK) {
            if (!reqs || n < 1 || n > ROUTER_OPENAI_PROMPTS_MAX)
                abort();
            answer_parsed(reqs, n);
            router_openai_requests_free(reqs, n);
        } else if (reqs != NULL) {
            abort();
        }
    }
    if (rc == PW_ERR_PARSE)
        error_ok(&err);
    else if (rc != PW_OK && rc != PW_ERR_NOMEM)
        abort(); /* PW_ERR_INVAL would be a bad ctx: ours is fine */
}

#define MAX_CHUNKS 64

static void reply_stream(const uint8_t *p, size_t len)
{
    if (len < 1)
        return;
    uint8_t shape = p[0];
    struct router_openai_resp r = {
        .kind = (shape & 1) ? ROUTER_OPENAI_COMPLETION : ROUTER_OPENAI_CHAT,
        .request_id = REQUEST_ID,
        .model = "smol",
        .created = 1700000000,
        .n = 1u + ((shape >> 1) & 3u),
        .n_parts = 1u + ((shape >> 3) % 3u),
        .logprobs = (shape >> 5) & 1,
        .include_usage = (shape >> 6) & 1,
        .system_fingerprint = (shape >> 7) ? "fp_fuzz" : NULL,
    };
    Parkway__ReplyChunk *chunks[MAX_CHUNKS];
    size_t n = 0, pos = 1;
    while (n < MAX_CHUNKS && len - pos >= 2) {
        size_t l = (size_t)p[pos] | (size_t)p[pos + 1] << 8;
        pos += 2;
        if (l > len - pos)
            l = len - pos;
        Parkway__ReplyChunk *c = NULL;
        if (pw_proto_unpack_reply(p + pos, l, 0, &c) == PW_OK)
            chunks[n++] = c;
        pos += l;
    }
    feed_both(&r, chunks, n);
    for (size_t i = 0; i < n; i++)
        pw_proto_free_reply(chunks[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    /* Bodies get an exact-size copy: the parser must not read a NUL past len. */
    uint8_t *copy = malloc(size - 1 ? size - 1 : 1);
    if (!copy)
        return 0;
    memcpy(copy, data + 1, size - 1);
    switch (data[0] & 3) {
    case 0:
        parse_body(true, copy, size - 1);
        break;
    case 1:
        parse_body(false, copy, size - 1);
        break;
    default:
        reply_stream(copy, size - 1);
        break;
    }
    free(copy);
    return 0;
}

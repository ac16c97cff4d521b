/*
 * router_batch: Batches API handlers (worker threads) and the batch coordinator (its own
 * thread, blocking hiredis). See router_batch.h and docs/internals/batch.md.
 *
 * Batch state lives only in Redis and storage:
 *   pw:batch:{id}          hash: the batch object's fields, counts, next_line (lines
 *                          enqueued so far), finalize_to (the terminal status being written)
 *   pw:batch:{id}:results  hash: custom_id -> "o"|"e" + the output line (HSETNX: once)
 *   pw:batch:{id}:lock     string: router id of the coordinator driving it (PX expiry)
 *   pw:breply:{id}         stream: ReplyChunks of the batch's lines
 *   pw:batches:active      set: batches not yet terminal
 *   pw:batches:{tenant}    sorted set: the tenant's batches by creation time (ms)
 * The coordinator's memory (parsed input, per-line accumulators, stream cursor) is a cache:
 * a coordinator that takes a batch over rebuilds it from the keys above.
 */
#include "router_batch.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <jansson.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_log.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "pw_storage.h"
#include "router_files.h"

#define ENDPOINT_CHAT "/v1/chat/completions"
#define ENDPOINT_COMPLETIONS "/v1/completions"

/* ------------------------------------------------------------------------------------ */
/* Pure helpers                                                                         */
/* ------------------------------------------------------------------------------------ */

static bool endpoint_ok(const char *e)
{
    return e && (strcmp(e, ENDPOINT_CHAT) == 0 || strcmp(e, ENDPOINT_COMPLETIONS) == 0);
}

bool router_batch_parse_window(const char *s, int64_t *seconds)
{
    if (!s || !s[0])
        return false;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || v <= 0 || s[0] == '-' || s[0] == '+')
        return false;
    int64_t mul = 0;
    if (strcmp(end, "h") == 0)
        mul = 3600;
    else if (strcmp(end, "m") == 0)
        mul = 60;
    else if (strcmp(end, "s") == 0)
        mul = 1;
    if (!mul || v > ROUTER_BATCH_WINDOW_MAX_S / mul)
        return false;
    *seconds = v * mul;
    return true;
}

bool router_batch_parse_line_id(const char *request_id, const char *batch_id, size_t *index)
{
    size_t bl = strlen(batch_id);
    if (!request_id || strncmp(request_id, batch_id, bl) != 0 || request_id[bl] != '-' ||
        request_id[bl + 1] != 'L')
        return false;
    const char *p = request_id + bl + 2;
    if (*p < '0' || *p > '9')
        return false;
    char *end;
    unsigned long long v = strtoull(p, &end, 10);
    if ((*end != '\0' && *end != '.') || v >= ROUTER_BATCH_MAX_LINES)
        return false;
    *index = (size_t)v;
    return true;
}

struct err_list {
    json_t *data;
    size_t n;
};

static void add_error(struct err_list *el, uint32_t line, const char *code, const char *param,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void add_error(struct err_list *el, uint32_t line, const char *code, const char *param,
                      const char *fmt, ...)
{
    el->n++;
    if (json_array_size(el->data) >= ROUTER_BATCH_MAX_ERRORS)
        return;
    char msg[ROUTER_OPENAI_MESSAGE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = json_pack("{s:s,s:s,s:s?,s:I}", "code", code, "message", msg, "param", param,
                          "line", (json_int_t)line);
    if (e)
        json_array_append_new(el->data, e);
}

/* Pointer-sized hash set of custom_ids for the duplicate check. */
struct idset {
    char **v;
    size_t cap;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Returns 1 if added, 0 if present, -1 on out of memory. s is borrowed (kept as is). */
static int idset_add(struct idset *set, char *s)
{
    size_t i = hash_str(s) & (set->cap - 1);
    while (set->v[i]) {
        if (strcmp(set->v[i], s) == 0)
            return 0;
        i = (i + 1) & (set->cap - 1);
    }
    set->v[i] = s;
    return 1;
}

enum pw_err router_batch_line_requests(const char *line, size_t len, const char *endpoint,
                                       const struct router_openai_ctx *ctx,
                                       Parkway__InferenceRequest ***out, size_t *n_out,
                                       struct router_openai_error *err)
{
    *out = NULL;
    *n_out = 0;
    json_t *root = json_loadb(line, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *body = root ? json_object_get(root, "body") : NULL;
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    enum pw_err e;
    if (!text) {
        router_openai_err_invalid_json(err, "the line has no body");
        e = PW_ERR_PARSE;
    } else if (strcmp(endpoint, ENDPOINT_CHAT) == 0) {
        Parkway__InferenceRequest *one = NULL;
        e = router_openai_parse_chat(text, strlen(text), ctx, &one, err);
        if (e == PW_OK) {
            *out = calloc(1, sizeof **out);
            if (!*out) {
                pw_proto_free_request(one);
                router_openai_err_internal(err);
                e = PW_ERR_NOMEM;
            } else {
                (*out)[0] = one;
                *n_out = 1;
            }
        }
    } else {
        e = router_openai_parse_completion(text, strlen(text), ctx, out, n_out, err);
    }
    free(text);
    json_decref(root);
    return e;
}

/* Checks one line; on success fills ln (custom_id, function). */
static void check_line(const char *p, size_t len, uint32_t lineno, const char *endpoint,
                       router_openai_model_check_fn check, void *arg, struct idset *ids,
                       struct err_list *el, struct router_batch_line *ln, bool *ok)
{
    *ok = false;
    json_error_t jerr;
    json_t *root = json_loadb(p, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || !json_is_object(root)) {
        add_error(el, lineno, "invalid_json_line", NULL,
                  "This line is not parseable as a JSON object%s%s.", root ? "" : ": ",
                  root ? "" : jerr.text);
        json_decref(root);
        return;
    }
    json_t *cid = json_object_get(root, "custom_id");
    json_t *method = json_object_get(root, "method");
    json_t *url = json_object_get(root, "url");
    json_t *body = json_object_get(root, "body");
    char *text = NULL;
    if (!json_is_string(cid) || json_string_length(cid) == 0) {
        add_error(el, lineno, cid ? "invalid_type" : "missing_required_parameter", "custom_id",
                  "Each request needs a custom_id: a non-empty string.");
        goto out;
    }
    if (json_string_length(cid) > ROUTER_BATCH_CUSTOM_ID_MAX) {
        add_error(el, lineno, "string_above_max_length", "custom_id",
                  "The custom_id is longer than %d bytes.", ROUTER_BATCH_CUSTOM_ID_MAX);
        goto out;
    }
    if (!json_is_string(method) || strcmp(json_string_value(method), "POST") != 0) {
        add_error(el, lineno, "invalid_method", "method",
                  "The method of each request must be 'POST'.");
        goto out;
    }
    if (!json_is_string(url) || strcmp(json_string_value(url), endpoint) != 0) {
        add_error(el, lineno, "invalid_url", "url",
                  "The URL provided for this request does not match the batch endpoint '%s'.",
                  endpoint);
        goto out;
    }
    if (!json_is_object(body)) {
        add_error(el, lineno, body ? "invalid_type" : "missing_required_parameter", "body",
                  "Each request needs a body: a JSON object.");
        goto out;
    }
    json_t *stream = json_object_get(body, "stream");
    if (json_is_true(stream)) {
        add_error(el, lineno, "unsupported_value", "body.stream",
                  "Streaming is not supported in batches: 'stream' must be false or absent.");
        goto out;
    }
    text = json_dumps(body, JSON_COMPACT);
    if (!text) {
        add_error(el, lineno, "internal_error", NULL, "out of memory");
        goto out;
    }
    struct router_openai_ctx ctx = {
        .request_id = "batch-validate",
        .reply_to = "pw:breply:{validate}",
        .now_unix_ms = 1,
        .model_check = check,
        .model_check_arg = arg,
    };
    struct router_openai_error oerr;
    memset(&oerr, 0, sizeof oerr);
    Parkway__InferenceRequest **reqs = NULL;
    size_t n = 0;
    enum pw_err pe;
    if (strcmp(endpoint, ENDPOINT_CHAT) == 0) {
        Parkway__InferenceRequest *one = NULL;
        pe = router_openai_parse_chat(text, strlen(text), &ctx, &one, &oerr);
        pw_proto_free_request(one);
    } else {
        pe = router_openai_parse_completion(text, strlen(text), &ctx, &reqs, &n, &oerr);
        router_openai_requests_free(reqs, n);
    }
    if (pe) {
        char param[ROUTER_OPENAI_PARAM_MAX + 8];
        snprintf(param, sizeof param, "body.%s", oerr.param);
        add_error(el, lineno, oerr.code[0] ? oerr.code : "invalid_request",
                  oerr.param[0] ? param : "body", "%s", oerr.message);
        goto out;
    }
    ln->custom_id = strdup(json_string_value(cid));
    ln->function = strdup(json_string_value(json_object_get(body, "model")));
    if (!ln->custom_id || !ln->function) {
        free(ln->custom_id);
        free(ln->function);
        ln->custom_id = ln->function = NULL;
        add_error(el, lineno, "internal_error", NULL, "out of memory");
        goto out;
    }
    int added = idset_add(ids, ln->custom_id);
    if (added <= 0) {
        add_error(el, lineno, "duplicate_custom_id", "custom_id",
                  "The custom_id '%s' is a duplicate of another request. The custom_id must be "
                  "unique for each request in a batch.",
                  ln->custom_id);
        free(ln->custom_id);
        free(ln->function);
        ln->custom_id = ln->function = NULL;
        goto out;
    }
    *ok = true;
out:
    free(text);
    json_decref(root);
}

/* Validation state while lines stream by. */
struct vstate {
    const char *endpoint;
    router_openai_model_check_fn check;
    void *check_arg;
    struct router_batch_input *out;
    size_t lines_cap;
    struct err_list el;
    struct idset ids;
    uint32_t lineno;
    bool too_many;
};

/* Doubles the custom_id set, re-inserting the borrowed strings. */
static bool idset_grow(struct idset *set)
{
    struct idset n = {calloc(set->cap * 2, sizeof(char *)), set->cap * 2};
    if (!n.v)
        return false;
    for (size_t i = 0; i < set->cap; i++)
        if (set->v[i])
            idset_add(&n, set->v[i]);
    free(set->v);
    *set = n;
    return true;
}

/* One line (without its '\n') at byte off of the input. */
static enum pw_err v_line(struct vstate *v, const char *p, size_t l, uint64_t off)
{
    struct router_batch_input *out = v->out;
    v->lineno++;
    size_t ws = 0;
    while (ws < l && strchr(" \t\r", p[ws]) && p[ws])
        ws++;
    if (ws == l)
        return PW_OK; /* blank lines are skipped */
    if (out->n >= ROUTER_BATCH_MAX_LINES) {
        v->too_many = true;
        return PW_OK;
    }
    if (out->n == v->lines_cap) {
        size_t ncap = v->lines_cap ? v->lines_cap * 2 : 64;
        if (ncap > ROUTER_BATCH_MAX_LINES)
            ncap = ROUTER_BATCH_MAX_LINES;
        struct router_batch_line *nl = realloc(out->lines, ncap * sizeof *nl);
        if (!nl)
            return PW_ERR_NOMEM;
        out->lines = nl;
        v->lines_cap = ncap;
    }
    if ((out->n + 1) * 2 > v->ids.cap && !idset_grow(&v->ids))
        return PW_ERR_NOMEM;
    struct router_batch_line *ln = &out->lines[out->n];
    memset(ln, 0, sizeof *ln);
    bool ok;
    check_line(p, l, v->lineno, v->endpoint, v->check, v->check_arg, &v->ids, &v->el, ln, &ok);
    if (ok) {
        ln->off = (size_t)off;
        ln->len = l;
        ln->lineno = v->lineno;
        out->n++;
    }
    return PW_OK;
}

/* Feeds every line of the stream to v_line through one bounded buffer. */
static enum pw_err v_stream(struct vstate *v, router_batch_read_fn rd, void *rd_ud)
{
    size_t cap = ROUTER_BATCH_READ_CHUNK, len = 0;
    uint64_t base = 0;     /* input offset of buf[0] */
    bool skipping = false; /* discarding the rest of a line over ROUTER_BATCH_LINE_MAX */
    enum pw_err e = PW_OK;
    char *buf = malloc(cap);
    if (!buf)
        return PW_ERR_NOMEM;
    for (;;) {
        if (len == cap) {
            if (cap >= ROUTER_BATCH_LINE_MAX) {
                if (!skipping) {
                    v->lineno++;
                    add_error(&v->el, v->lineno, "line_too_long", NULL,
                              "This line is longer than %u bytes.", ROUTER_BATCH_LINE_MAX);
                    skipping = true;
                }
                base += len;
                len = 0;
            } else {
                size_t ncap = cap * 2 > ROUTER_BATCH_LINE_MAX ? ROUTER_BATCH_LINE_MAX : cap * 2;
                char *nb = realloc(buf, ncap);
                if (!nb) {
                    e = PW_ERR_NOMEM;
                    break;
                }
                buf = nb;
                cap = ncap;
            }
        }
        size_t want = cap - len, got = 0;
        if (want > ROUTER_BATCH_READ_CHUNK && !skipping)
            want = ROUTER_BATCH_READ_CHUNK;
        if ((e = rd(rd_ud, buf + len, want, &got)))
            break;
        bool eof = got == 0;
        size_t from = len, start = 0;
        len += got;
        for (;;) {
            char *nl = memchr(buf + from, '\n', len - from);
            if (!nl)
                break;
            size_t l = (size_t)(nl - (buf + start));
            if (skipping)
                skipping = false; /* the end of the long line */
            else if ((e = v_line(v, buf + start, l, base + start)))
                goto out;
            start += l + 1;
            from = start;
        }
        if (eof) {
            if (start < len && !skipping)
                e = v_line(v, buf + start, len - start, base + start);
            break;
        }
        memmove(buf, buf + start, len - start);
        base += start;
        len -= start;
    }
out:
    free(buf);
    return e;
}

enum pw_err router_batch_input_parse_stream(router_batch_read_fn rd, void *rd_ud,
                                            const char *endpoint,
                                            router_openai_model_check_fn check, void *check_arg,
                                            struct router_batch_input *out)
{
    memset(out, 0, sizeof *out);
    struct vstate v = {
        .endpoint = endpoint,
        .check = check,
        .check_arg = check_arg,
        .out = out,
        .el = {json_array(), 0},
        .ids = {calloc(64, sizeof(char *)), 64},
    };
    enum pw_err e = PW_OK;
    if (!v.el.data || !v.ids.v) {
        e = PW_ERR_NOMEM;
        goto fail;
    }
    if (!endpoint_ok(endpoint))
        add_error(&v.el, 0, "invalid_url", "endpoint", "Unsupported endpoint '%s'.",
                  endpoint ? endpoint : "");
    else if ((e = v_stream(&v, rd, rd_ud)))
        goto fail;
    if (v.too_many)
        add_error(&v.el, 0, "too_many_requests", NULL, "A batch may hold at most %d requests.",
                  ROUTER_BATCH_MAX_LINES);
    if (v.el.n == 0 && out->n == 0)
        add_error(&v.el, 0, "empty_file", NULL, "The input file has no request lines.");
    free(v.ids.v);
    v.ids.v = NULL;
    out->n_errors = v.el.n;
    if (v.el.n) {
        json_t *o = json_pack("{s:s,s:o}", "object", "list", "data", v.el.data);
        v.el.data = NULL;
        out->errors_json = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!out->errors_json) {
            e = PW_ERR_NOMEM;
            goto fail;
        }
    } else {
        json_decref(v.el.data);
    }
    return PW_OK;
fail:
    json_decref(v.el.data);
    free(v.ids.v);
    router_batch_input_deinit(out);
    return e;
}

struct mem_reader {
    const char *p;
    size_t left;
};

static enum pw_err mem_read(void *ud, void *buf, size_t cap, size_t *n_out)
{
    struct mem_reader *m = ud;
    size_t n = m->left < cap ? m->left : cap;
    memcpy(buf, m->p, n);
    m->p += n;
    m->left -= n;
    *n_out = n;
    return PW_OK;
}

enum pw_err router_batch_input_parse(const char *data, size_t len, const char *endpoint,
                                     router_openai_model_check_fn check, void *check_arg,
                                     struct router_batch_input *out)
{
    struct mem_reader m = {data, len};
    return router_batch_input_parse_stream(mem_read, &m, endpoint, check, check_arg, out);
}

void router_batch_input_deinit(struct router_batch_input *in)
{
    if (!in)
        return;
    for (size_t i = 0; in->lines && i < in->n; i++) {
        free(in->lines[i].custom_id);
        free(in->lines[i].function);
    }
    free(in->lines);
    free(in->errors_json);
    memset(in, 0, sizeof *in);
}

static json_t *int_or_null(const struct pw_stream_entry *h, const char *name)
{
    const char *v = router_api_field(h, name);
    if (!v || !v[0])
        return json_null();
    return json_integer((json_int_t)strtoll(v, NULL, 10));
}

static json_t *str_or_null(const struct pw_stream_entry *h, const char *name)
{
    const char *v = router_api_field(h, name);
    return v && v[0] ? json_string(v) : json_null();
}

static json_t *json_or_null(const struct pw_stream_entry *h, const char *name)
{
    const char *v = router_api_field(h, name);
    json_t *j = v && v[0] ? json_loads(v, 0, NULL) : NULL;
    return j ? j : json_null();
}

enum pw_err router_batch_json(const struct pw_stream_entry *h, char **out, size_t *len)
{
    json_t *o = json_object();
    if (!o)
        return PW_ERR_NOMEM;
    static const char *const strs[] = {"id", "endpoint", "input_file_id", "completion_window",
                                       "status"};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        const char *v = router_api_field(h, strs[i]);
        json_object_set_new(o, strs[i], json_string(v ? v : ""));
    }
    json_object_set_new(o, "object", json_string("batch"));
    json_object_set_new(o, "errors", json_or_null(h, "errors"));
    json_object_set_new(o, "output_file_id", str_or_null(h, "output_file_id"));
    json_object_set_new(o, "error_file_id", str_or_null(h, "error_file_id"));
    static const char *const times[] = {"created_at",    "in_progress_at", "expires_at",
                                        "finalizing_at", "completed_at",   "failed_at",
                                        "expired_at",    "cancelling_at",  "cancelled_at"};
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++)
        json_object_set_new(o, times[i], int_or_null(h, times[i]));
    json_t *t = int_or_null(h, "total"), *c = int_or_null(h, "completed"),
           *f = int_or_null(h, "failed");
    json_object_set_new(o, "request_counts",
                        json_pack("{s:I,s:I,s:I}", "total", json_integer_value(t), "completed",
                                  json_integer_value(c), "failed", json_integer_value(f)));
    json_decref(t);
    json_decref(c);
    json_decref(f);
    json_t *in = int_or_null(h, "input_tokens"), *ou = int_or_null(h, "output_tokens");
    json_int_t it = json_integer_value(in), ot = json_integer_value(ou);
    json_decref(in);
    json_decref(ou);
    json_object_set_new(o, "usage",
                        json_pack("{s:I,s:{s:I},s:I,s:{s:I},s:I}", "input_tokens", it,
                                  "input_tokens_details", "cached_tokens", (json_int_t)0,
                                  "output_tokens", ot, "output_tokens_details", "reasoning_tokens",
                                  (json_int_t)0, "total_tokens", it + ot));
    json_object_set_new(o, "metadata", json_or_null(h, "metadata"));
    *out = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    if (!*out)
        return PW_ERR_NOMEM;
    *len = strlen(*out);
    return PW_OK;
}

enum pw_err router_batch_result_line(const char *line_id, const char *custom_id, int status,
                                     const char *body, size_t body_len, char **out)
{
    json_t *b = json_loadb(body, body_len, 0, NULL);
    if (!b)
        b = json_stringn(body, body_len);
    char rid[PW_KEY_NAME_MAX + 16];
    snprintf(rid, sizeof rid, "batch_req_%s", line_id);
    json_t *o =
        json_pack("{s:s,s:s,s:{s:i,s:s,s:o},s:n}", "id", rid, "custom_id", custom_id, "response",
                  "status_code", status, "request_id", line_id, "body", b, "error");
    if (!o)
        return PW_ERR_NOMEM;
    *out = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return *out ? PW_OK : PW_ERR_NOMEM;
}

/* ------------------------------------------------------------------------------------ */
/* HTTP handlers                                                                        */
/* ------------------------------------------------------------------------------------ */

bool router_batch_api_route(const struct router_http_request *req)
{
    static const char *const prefixes[] = {"/v1/files", "/v1/batches"};
    for (size_t i = 0; i < 2; i++) {
        size_t n = strlen(prefixes[i]);
        if (req->path_len >= n && memcmp(req->path, prefixes[i], n) == 0 &&
            (req->path_len == n || req->path[n] == '/'))
            return true;
    }
    return false;
}

static void respond_batch_reply(struct router_api_op *op, const redisReply *reply, enum pw_err err)
{
    struct pw_stream_entries *h = NULL;
    if (err || !reply) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        return;
    }
    if (pw_hash_parse_all(reply, &h) != PW_OK || h->n != 1 || h->v[0].n_fields == 0 ||
        !router_api_field(&h->v[0], "tenant") ||
        strcmp(router_api_field(&h->v[0], "tenant"), op->tenant) != 0) {
        pw_stream_entries_free(h);
        router_api_respond_error(op, 404, NULL, "batch_id", "No such batch: '%s'", op->id);
        return;
    }
    char *body = NULL;
    size_t len = 0;
    if (router_batch_json(&h->v[0], &body, &len) == PW_OK)
        router_api_respond_json(op, 200, body, len);
    else
        router_api_respond_error(op, 500, NULL, NULL, "internal error");
    free(body);
    pw_stream_entries_free(h);
}

static void on_batch_reply(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                           const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    respond_batch_reply(op, reply, err);
    router_api_op_unref(op);
}

/* KEYS: batch hash, tenant zset, active set; ARGV: score, id, tenant, then field/values. */
static const char create_script[] = "redis.call('hset', KEYS[1], unpack(ARGV, 4))\n"
                                    "redis.call('zadd', KEYS[2], ARGV[1], ARGV[2])\n"
                                    "redis.call('sadd', KEYS[3], ARGV[2])\n"
                                    "return redis.call('hgetall', KEYS[1])\n";

/* op->scratch holds the create request's validated fields as a JSON object. */
static void on_input_file(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    struct pw_stream_entries *h = NULL;
    json_t *req = op->scratch ? json_loads(op->scratch, 0, NULL) : NULL;
    const char *file_id = json_string_value(json_object_get(req, "input_file_id"));
    if (!op->req)
        goto out;
    if (err || !reply) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        goto out;
    }
    if (!req || pw_hash_parse_all(reply, &h) != PW_OK || h->n != 1 || h->v[0].n_fields == 0 ||
        !router_api_field(&h->v[0], "tenant") ||
        strcmp(router_api_field(&h->v[0], "tenant"), op->tenant) != 0) {
        router_api_respond_error(op, 404, NULL, "input_file_id", "No such file: '%s'",
                                 file_id ? file_id : "");
        goto out;
    }
    const char *purpose = router_api_field(&h->v[0], "purpose");
    if (!purpose || strcmp(purpose, "batch") != 0) {
        router_api_respond_error(op, 400, "invalid_value", "input_file_id",
                                 "The input file must be uploaded with purpose 'batch'.");
        goto out;
    }
    uint8_t rnd[16];
    if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd) {
        uint64_t t = pw_clock_mono_ns();
        memcpy(rnd, &t, 8);
        memcpy(rnd + 8, &t, 8);
    }
    char hex[33];
    pw_hex_encode(rnd, sizeof rnd, hex);
    snprintf(op->id, sizeof op->id, "batch_%s", hex);
    int64_t now_ms = pw_clock_wall_ms(), now = now_ms / 1000;
    int64_t window = json_integer_value(json_object_get(req, "window_s"));
    char score[24], created[24], expires[24], allowed[4096] = "";
    snprintf(score, sizeof score, "%" PRId64, now_ms);
    snprintf(created, sizeof created, "%" PRId64, now);
    snprintf(expires, sizeof expires, "%" PRId64, now + window);
    size_t al = 0;
    for (size_t i = 0; i < op->n_allowed; i++) {
        int n = snprintf(allowed + al, sizeof allowed - al, "%s%s", i ? "," : "", op->allowed[i]);
        if (n < 0 || (size_t)n >= sizeof allowed - al) {
            router_api_respond_error(op, 500, NULL, NULL, "The key allows too many functions.");
            goto out;
        }
        al += (size_t)n;
    }
    json_t *md = json_object_get(req, "metadata");
    char *mds = md && !json_is_null(md) ? json_dumps(md, JSON_COMPACT) : NULL;
    char key[PW_KEY_MAX], zkey[PW_KEY_MAX];
    pw_key_batch(key, sizeof key, op->id);
    router_key_tenant_batches(zkey, sizeof zkey, op->tenant);
    const char *argv[] = {
        "EVAL",
        create_script,
        "3",
        key,
        zkey,
        ROUTER_KEY_BATCHES_ACTIVE,
        score,
        op->id,
        op->tenant,
        "id",
        op->id,
        "object",
        "batch",
        "tenant",
        op->tenant,
        "key_id",
        op->key_id,
        "allowed",
        allowed,
        "endpoint",
        json_string_value(json_object_get(req, "endpoint")),
        "input_file_id",
        file_id,
        "completion_window",
        json_string_value(json_object_get(req, "completion_window")),
        "status",
        "validating",
        "created_at",
        created,
        "expires_at",
        expires,
        "total",
        "0",
        "completed",
        "0",
        "failed",
        "0",
        "metadata",
        mds ? mds : "",
    };
    PW_LOG_INFO("event=batch_created batch=%s input=%s key_id=%s", op->id, file_id, op->key_id);
    router_api_command(op, on_batch_reply, (int)(sizeof argv / sizeof argv[0]), argv, NULL);
    free(mds);
out:
    json_decref(req);
    pw_stream_entries_free(h);
    router_api_op_unref(op);
}

static void batch_create(struct router_api_op *op)
{
    struct router_http_request *req = op->req;
    json_error_t jerr;
    json_t *root = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root || !json_is_object(root)) {
        router_api_respond_error(op, 400, NULL, NULL,
                                 "We could not parse the JSON body of your request. (%s)",
                                 root ? "expected an object" : jerr.text);
        json_decref(root);
        return;
    }
    json_t *fid = json_object_get(root, "input_file_id");
    json_t *ep = json_object_get(root, "endpoint");
    json_t *cw = json_object_get(root, "completion_window");
    json_t *md = json_object_get(root, "metadata");
    int64_t window = 0;
    char fkey[PW_KEY_MAX];
    if (!json_is_string(fid) || pw_key_file(fkey, sizeof fkey, json_string_value(fid))) {
        router_api_respond_error(op, 400, fid ? "invalid_value" : "missing_required_parameter",
                                 "input_file_id", "'input_file_id' must be a file id.");
    } else if (!json_is_string(ep) || !endpoint_ok(json_string_value(ep))) {
        router_api_respond_error(op, 400, ep ? "invalid_value" : "missing_required_parameter",
                                 "endpoint",
                                 "Invalid 'endpoint': supported values are '" ENDPOINT_CHAT
                                 "' and '" ENDPOINT_COMPLETIONS "'.");
    } else if (!json_is_string(cw) || !router_batch_parse_window(json_string_value(cw), &window)) {
        router_api_respond_error(op, 400, cw ? "invalid_value" : "missing_required_parameter",
                                 "completion_window",
                                 "Invalid 'completion_window': use '24h' (or a duration like "
                                 "'30m', up to 7 days).");
    } else if (md && !json_is_null(md) && (!json_is_object(md) || json_object_size(md) > 16)) {
        router_api_respond_error(op, 400, "invalid_value", "metadata",
                                 "'metadata' must be an object of at most 16 string pairs.");
    } else {
        const char *k;
        json_t *v;
        bool md_ok = true;
        json_object_foreach(md, k, v)
        {
            if (!json_is_string(v) || strlen(k) > 64 || json_string_length(v) > 512)
                md_ok = false;
        }
        if (!md_ok) {
            router_api_respond_error(op, 400, "invalid_value", "metadata",
                                     "'metadata' values must be strings (keys up to 64 bytes, "
                                     "values up to 512).");
        } else {
            json_object_set_new(root, "window_s", json_integer(window));
            op->scratch = json_dumps(root, JSON_COMPACT);
            const char *argv[] = {"HGETALL", fkey};
            if (!op->scratch)
                router_api_respond_error(op, 500, NULL, NULL, "out of memory");
            else
                router_api_command(op, on_input_file, 2, argv, NULL);
        }
    }
    json_decref(root);
}

static void on_batch_list(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    if (err || !reply || reply->type != REDIS_REPLY_ARRAY) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        router_api_op_unref(op);
        return;
    }
    size_t limit = (size_t)op->step;
    json_t *data = json_array();
    for (size_t i = 0; data && i < reply->elements && i < limit; i++) {
        struct pw_stream_entries *h = NULL;
        char *one = NULL;
        size_t len;
        if (pw_hash_parse_all(reply->element[i], &h) == PW_OK && h->n == 1 &&
            h->v[0].n_fields > 0 && router_batch_json(&h->v[0], &one, &len) == PW_OK)
            json_array_append_new(data, json_loads(one, JSON_PRESERVE_ORDER, NULL));
        free(one);
        pw_stream_entries_free(h);
    }
    size_t n = json_array_size(data);
    json_t *first = json_array_get(data, 0), *last = n ? json_array_get(data, n - 1) : NULL;
    json_t *o =
        json_pack("{s:s,s:o,s:O?,s:O?,s:b}", "object", "list", "data", data, "first_id",
                  first ? json_object_get(first, "id") : NULL, "last_id",
                  last ? json_object_get(last, "id") : NULL, "has_more", reply->elements > limit);
    char *body = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(o);
    if (body)
        router_api_respond_json(op, 200, body, strlen(body));
    else
        router_api_respond_error(op, 500, NULL, NULL, "internal error");
    free(body);
    router_api_op_unref(op);
}

/* KEYS: batch hash; ARGV: tenant, now. Returns the hash, or an empty array when absent or
 * another tenant's; only validating and in_progress batches move to cancelling. */
static const char cancel_script[] =
    "if redis.call('hget', KEYS[1], 'tenant') ~= ARGV[1] then return {} end\n"
    "local s = redis.call('hget', KEYS[1], 'status')\n"
    "if s == 'validating' or s == 'in_progress' then\n"
    "  redis.call('hset', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[2])\n"
    "end\n"
    "return redis.call('hgetall', KEYS[1])\n";

static void batches_handle(struct router_api_op *op)
{
    struct router_http_request *req = op->req;
    const char *m = req->method;
    const char *rest = req->path + strlen("/v1/batches");
    size_t rest_len = req->path_len - strlen("/v1/batches");
    if (rest_len == 0) {
        if (strcmp(m, "POST") == 0) {
            batch_create(op);
        } else if (strcmp(m, "GET") == 0) {
            char zkey[PW_KEY_MAX];
            router_key_tenant_batches(zkey, sizeof zkey, op->tenant);
            router_api_list(op, zkey, "pw:batch:{", 20, 100, on_batch_list);
        } else {
            router_api_respond_error(op, 405, "method_not_allowed", NULL,
                                     "Method %s is not allowed on /v1/batches.", m);
        }
        return;
    }
    const char *id = rest + 1;
    size_t id_len = rest_len - 1;
    bool cancel = false;
    if (id_len > 7 && memcmp(id + id_len - 7, "/cancel", 7) == 0) {
        cancel = true;
        id_len -= 7;
    }
    char key[PW_KEY_MAX];
    if (id_len == 0 || id_len >= sizeof op->id) {
        router_api_respond_error(op, 404, NULL, "batch_id", "No such batch.");
        return;
    }
    memcpy(op->id, id, id_len);
    op->id[id_len] = '\0';
    if (pw_key_batch(key, sizeof key, op->id) != PW_OK) {
        router_api_respond_error(op, 404, NULL, "batch_id", "No such batch.");
        return;
    }
    if (cancel && strcmp(m, "POST") == 0) {
        char now[24];
        snprintf(now, sizeof now, "%" PRId64, pw_clock_wall_ms() / 1000);
        const char *argv[] = {"EVAL", cancel_script, "1", key, op->tenant, now};
        PW_LOG_INFO("event=batch_cancel_requested batch=%s key_id=%s", op->id, op->key_id);
        router_api_command(op, on_batch_reply, 6, argv, NULL);
    } else if (!cancel && strcmp(m, "GET") == 0) {
        const char *argv[] = {"HGETALL", key};
        router_api_command(op, on_batch_reply, 2, argv, NULL);
    } else {
        router_api_respond_error(op, 405, "method_not_allowed", NULL,
                                 "Method %s is not allowed here.", m);
    }
}

void router_batch_api_handle(struct router_worker *w, struct router_http_request *req,
                             const struct router_key *key)
{
    if (!w->rt->storage) {
        router_http_respond_error(req, 503, "server_error", NULL,
                                  "The Files and Batches APIs need --storage-dir.");
        return;
    }
    if (req->path_len >= 9 && memcmp(req->path, "/v1/files", 9) == 0) {
        router_files_handle(w, req, key);
        return;
    }
    struct router_api_op *op = router_api_op_create(w, req, key);
    if (!op)
        return;
    batches_handle(op);
    router_api_op_unref(op);
}

/* ------------------------------------------------------------------------------------ */
/* Coordinator                                                                          */
/* ------------------------------------------------------------------------------------ */

struct coord_line {
    bool done;  /* result recorded (or, while cancelling, ended without one) */
    bool ended; /* its reply finished (recorded or dropped) */
    struct router_openai_acc *acc;
    char first_chunk[PW_STREAM_ID_MAX]; /* oldest reply entry still needed; "" = none */
};

struct coord_batch {
    char id[PW_KEY_NAME_MAX + 1];
    bool seen; /* in the active set this tick */
    bool loaded;
    /* owned: a reader open on the input file; lines are read back one at a time by their
     * offsets (never the whole file in memory), and it keeps seeing the file even if it is
     * deleted meanwhile */
    struct pw_storage_reader *input;
    struct router_batch_input in;
    struct coord_line *lines; /* owned, in.n */
    char endpoint[32];
    char cursor[PW_STREAM_ID_MAX]; /* last reply entry read */
    bool cancel_sent;
    struct coord_batch *next;
};

struct router_batch_coord {
    struct router *rt;
    pthread_t thread;
    volatile int stop;
    redisContext *rc;
    char owner[PW_KEY_NAME_MAX + 24]; /* lock value: router id + random */
    struct coord_batch *batches;
};

static redisReply *ccmd(struct router_batch_coord *c, int argc, const char **argv,
                        const size_t *lens)
{
    if (!c->rc)
        return NULL;
    redisReply *r = redisCommandArgv(c->rc, argc, argv, lens);
    if (!r) {
        PW_LOG_WARN("event=batch_redis_error op=%s err=%s", argv[0], c->rc->errstr);
        redisFree(c->rc);
        c->rc = NULL;
    } else if (r->type == REDIS_REPLY_ERROR) {
        PW_LOG_WARN("event=batch_redis_error op=%s reply=%s", argv[0], r->str);
    }
    return r;
}

static void batch_free(struct coord_batch *b)
{
    if (!b)
        return;
    for (size_t i = 0; b->lines && i < b->in.n; i++)
        router_openai_acc_destroy(b->lines[i].acc);
    free(b->lines);
    router_batch_input_deinit(&b->in);
    pw_storage_reader_close(b->input);
    free(b);
}

static void key_suffix(char *buf, size_t cap, const char *id, const char *suffix)
{
    char k[PW_KEY_MAX];
    pw_key_batch(k, sizeof k, id);
    snprintf(buf, cap, "%s%s", k, suffix);
}

static void breply_key(char *buf, size_t cap, const char *id)
{
    snprintf(buf, cap, "pw:breply:{%s}", id);
}

/* KEYS[1] lock; ARGV owner, ttl ms. 1 when held by owner now. */
static const char lock_script[] =
    "local v = redis.call('get', KEYS[1])\n"
    "if v == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end\n"
    "if v then return 0 end\n"
    "redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])\n"
    "return 1\n";

static bool take_lock(struct router_batch_coord *c, const char *id)
{
    char lock[PW_KEY_MAX + 16], ttl[16];
    key_suffix(lock, sizeof lock, id, ":lock");
    snprintf(ttl, sizeof ttl, "%d", ROUTER_BATCH_LOCK_MS);
    const char *argv[] = {"EVAL", lock_script, "1", lock, c->owner, ttl};
    redisReply *r = ccmd(c, 6, argv, NULL);
    bool ok = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    return ok;
}

/* The model check of validation: the function exists and the batch's key may use it. */
struct model_list {
    char **fns;
    size_t n;
    const char *allowed; /* comma-joined; "" = all */
};

static enum router_openai_access model_check(void *arg, const char *model)
{
    const struct model_list *ml = arg;
    bool known = false;
    for (size_t i = 0; i < ml->n && !known; i++)
        known = strcmp(ml->fns[i], model) == 0;
    if (!known)
        return ROUTER_OPENAI_MODEL_NOT_FOUND;
    if (!ml->allowed || !ml->allowed[0])
        return ROUTER_OPENAI_MODEL_OK;
    size_t ml_len = strlen(model);
    for (const char *p = ml->allowed; *p;) {
        const char *comma = strchr(p, ',');
        size_t l = comma ? (size_t)(comma - p) : strlen(p);
        if (l == ml_len && memcmp(p, model, l) == 0)
            return ROUTER_OPENAI_MODEL_OK;
        p += l + (comma ? 1 : 0);
    }
    return ROUTER_OPENAI_MODEL_DENIED;
}

/* Sets fields on the batch hash if the lock is still ours and status is one of from
 * ("a|b|"). KEYS batch, lock; ARGV owner, from, field/values. */
static const char transition_script[] =
    "if redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end\n"
    "local s = redis.call('hget', KEYS[1], 'status')\n"
    "if not s or not string.find(ARGV[2], s .. '|', 1, true) then return 0 end\n"
    "redis.call('hset', KEYS[1], unpack(ARGV, 3))\n"
    "return 1\n";

static bool transition(struct router_batch_coord *c, const char *id, const char *from, int nkv,
                       const char **kv)
{
    char key[PW_KEY_MAX], lock[PW_KEY_MAX + 16];
    pw_key_batch(key, sizeof key, id);
    key_suffix(lock, sizeof lock, id, ":lock");
    const char *argv[64];
    int argc = 0;
    argv[argc++] = "EVAL";
    argv[argc++] = transition_script;
    argv[argc++] = "2";
    argv[argc++] = key;
    argv[argc++] = lock;
    argv[argc++] = c->owner;
    argv[argc++] = from;
    for (int i = 0; i < nkv && argc < 64; i++)
        argv[argc++] = kv[i];
    redisReply *r = ccmd(c, argc, argv, NULL);
    bool ok = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    return ok;
}

static void now_str(char *buf, size_t cap)
{
    snprintf(buf, cap, "%" PRId64, pw_clock_wall_ms() / 1000);
}

static enum pw_err storage_read(void *ud, void *buf, size_t cap, size_t *n_out)
{
    return pw_storage_read(ud, buf, cap, n_out);
}

static bool load_input(struct router_batch_coord *c, struct coord_batch *b,
                       const struct pw_stream_entry *h, struct model_list *ml, char *why,
                       size_t whycap)
{
    /* A reload replaces whatever an earlier attempt left. */
    router_batch_input_deinit(&b->in);
    pw_storage_reader_close(b->input);
    b->input = NULL;
    free(b->lines);
    b->lines = NULL;
    const char *fid = router_api_field(h, "input_file_id");
    const char *ep = router_api_field(h, "endpoint");
    snprintf(b->endpoint, sizeof b->endpoint, "%s", ep ? ep : "");
    char fkey[PW_KEY_MAX];
    if (!fid || pw_key_file(fkey, sizeof fkey, fid) != PW_OK) {
        snprintf(why, whycap, "the input file is missing");
        return false;
    }
    const char *argv[] = {"HGET", fkey, "storage_id"};
    redisReply *r = ccmd(c, 3, argv, NULL);
    char sid[PW_KEY_NAME_MAX + 1] = "";
    if (r && r->type == REDIS_REPLY_STRING && r->len < sizeof sid)
        memcpy(sid, r->str, r->len + 1);
    freeReplyObject(r);
    if (!sid[0]) {
        snprintf(why, whycap, "The input file %s no longer exists.", fid);
        return false;
    }
    size_t max =
        c->rt->cfg.max_file_bytes ? c->rt->cfg.max_file_bytes : ROUTER_FILES_DEFAULT_MAX_BYTES;
    uint64_t size = 0;
    enum pw_err pe = pw_storage_reader_open(c->rt->storage, sid, &size, &b->input);
    if (!pe && size > max)
        pe = PW_ERR_TOOBIG;
    if (pe) {
        pw_storage_reader_close(b->input);
        b->input = NULL;
        snprintf(why, whycap, "Cannot read the input file %s: %s.", fid, pw_err_desc(pe));
        return false;
    }
    /* Line by line through a bounded buffer. A reload (ml NULL) skips the model check: the
     * lines passed it at validation, and a function removed since then fails its lines one
     * by one at enqueue. */
    if ((pe = router_batch_input_parse_stream(storage_read, b->input, b->endpoint,
                                              ml ? model_check : NULL, ml, &b->in))) {
        snprintf(why, whycap, "Cannot validate the input file: %s.", pw_err_desc(pe));
        return false;
    }
    why[0] = '\0';
    return true;
}

/* validating -> in_progress | failed. */
static void validate(struct router_batch_coord *c, struct coord_batch *b,
                     const struct pw_stream_entry *h)
{
    const char *argv[] = {"HKEYS", PW_KEY_FUNCTIONS};
    redisReply *r = ccmd(c, 2, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(r);
        return;
    }
    struct model_list ml = {calloc(r->elements + 1, sizeof(char *)), 0,
                            router_api_field(h, "allowed")};
    for (size_t i = 0; ml.fns && i < r->elements; i++)
        if (r->element[i]->type == REDIS_REPLY_STRING)
            ml.fns[ml.n++] = r->element[i]->str;
    char why[512], now[24], total[24];
    bool ok = ml.fns && load_input(c, b, h, &ml, why, sizeof why);
    free(ml.fns);
    freeReplyObject(r);
    now_str(now, sizeof now);
    if (ok && b->in.n_errors == 0) {
        snprintf(total, sizeof total, "%zu", b->in.n);
        const char *kv[] = {"status", "in_progress", "in_progress_at", now,
                            "total",  total,         "next_line",      "0"};
        if (transition(c, b->id, "validating|", 8, kv)) {
            b->loaded = true;
            b->lines = calloc(b->in.n, sizeof *b->lines);
            snprintf(b->cursor, sizeof b->cursor, "0");
            if (!b->lines)
                b->loaded = false;
            PW_LOG_INFO("event=batch_in_progress batch=%s lines=%zu", b->id, b->in.n);
        }
        return;
    }
    char *errors = NULL;
    if (ok) {
        errors = b->in.errors_json;
        b->in.errors_json = NULL;
    } else {
        json_t *o = json_pack("{s:s,s:[{s:s,s:s,s:n,s:n}]}", "object", "list", "data", "code",
                              "invalid_file", "message", why, "param", "line");
        errors = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
    }
    const char *kv[] = {"status", "failed", "failed_at", now, "errors", errors ? errors : ""};
    if (transition(c, b->id, "validating|", 6, kv)) {
        const char *srem[] = {"SREM", ROUTER_KEY_BATCHES_ACTIVE, b->id};
        freeReplyObject(ccmd(c, 3, srem, NULL));
        PW_LOG_INFO("event=batch_failed batch=%s errors=%zu", b->id, b->in.n_errors);
    }
    free(errors);
    router_batch_input_deinit(&b->in);
    pw_storage_reader_close(b->input);
    b->input = NULL;
}

/* Rebuilds the cache of a batch already in progress (after a restart or a takeover). */
static bool load_running(struct router_batch_coord *c, struct coord_batch *b,
                         const struct pw_stream_entry *h)
{
    char why[512];
    if (!load_input(c, b, h, NULL, why, sizeof why)) {
        PW_LOG_ERROR("event=batch_load_failed batch=%s why=%s", b->id, why);
        return false;
    }
    const char *total = router_api_field(h, "total");
    if (b->in.n_errors || !total || strtoull(total, NULL, 10) != b->in.n) {
        PW_LOG_ERROR("event=batch_load_failed batch=%s why=input_changed lines=%zu", b->id,
                     b->in.n);
        return false;
    }
    b->lines = calloc(b->in.n ? b->in.n : 1, sizeof *b->lines);
    if (!b->lines)
        return false;
    char rkey[PW_KEY_MAX + 16];
    key_suffix(rkey, sizeof rkey, b->id, ":results");
    const char *argv[] = {"HKEYS", rkey};
    redisReply *r = ccmd(c, 2, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(r);
        return false;
    }
    /* custom_id -> line through an open-addressing table of indices + 1. */
    size_t cap = 16;
    while (cap < b->in.n * 2)
        cap <<= 1;
    size_t *tab = calloc(cap, sizeof *tab);
    if (!tab) {
        freeReplyObject(r);
        return false;
    }
    for (size_t k = 0; k < b->in.n; k++) {
        size_t j = hash_str(b->in.lines[k].custom_id) & (cap - 1);
        while (tab[j])
            j = (j + 1) & (cap - 1);
        tab[j] = k + 1;
    }
    for (size_t i = 0; i < r->elements; i++) {
        if (r->element[i]->type != REDIS_REPLY_STRING)
            continue;
        for (size_t j = hash_str(r->element[i]->str) & (cap - 1); tab[j]; j = (j + 1) & (cap - 1)) {
            if (strcmp(b->in.lines[tab[j] - 1].custom_id, r->element[i]->str) == 0) {
                b->lines[tab[j] - 1].done = b->lines[tab[j] - 1].ended = true;
                break;
            }
        }
    }
    free(tab);
    freeReplyObject(r);
    snprintf(b->cursor, sizeof b->cursor, "0");
    b->loaded = true;
    PW_LOG_INFO("event=batch_taken_over batch=%s lines=%zu", b->id, b->in.n);
    return true;
}

static void line_id(char *buf, size_t cap, const char *batch, size_t i)
{
    snprintf(buf, cap, "%s-L%zu", batch, i);
}

static enum pw_err line_parts(struct coord_batch *b, size_t i, int64_t deadline_ms,
                              Parkway__InferenceRequest ***parts, size_t *n,
                              struct router_openai_error *err)
{
    char id[PW_KEY_NAME_MAX + 32], reply[PW_KEY_MAX];
    line_id(id, sizeof id, b->id, i);
    breply_key(reply, sizeof reply, b->id);
    int64_t now = pw_clock_wall_ms();
    struct router_openai_ctx ctx = {
        .request_id = id,
        .reply_to = reply,
        .now_unix_ms = now,
        .default_deadline_ms = deadline_ms > now ? deadline_ms - now : 1,
        /* Deterministic per line: a re-enqueued line samples the same tokens. */
        .seed = hash_str(id),
    };
    const struct router_batch_line *ln = &b->in.lines[i];
    /* The line's bytes again, from the input file (bounded: ROUTER_BATCH_LINE_MAX). */
    char *text = malloc(ln->len ? ln->len : 1);
    size_t got = 0;
    enum pw_err e = text ? PW_OK : PW_ERR_NOMEM;
    if (!e)
        e = b->input ? pw_storage_read_at(b->input, ln->off, text, ln->len, &got) : PW_ERR_IO;
    if (!e && got != ln->len)
        e = PW_ERR_IO; /* the object changed under us */
    if (e) {
        free(text);
        *parts = NULL;
        *n = 0;
        router_openai_err_internal(err);
        PW_LOG_WARN("event=batch_line_read_failed batch=%s line=%zu err=%s", b->id, i,
                    pw_err_name(e));
        return e == PW_ERR_NOMEM ? e : PW_ERR_IO;
    }
    e = router_batch_line_requests(text, ln->len, b->endpoint, &ctx, parts, n, err);
    free(text);
    /* The lane's messages say which batch line they are (for engines, logs, the scaler). */
    for (size_t k = 0; e == PW_OK && k < *n; k++) {
        char *bid = strdup(b->id), *cid = strdup(ln->custom_id);
        if (!bid || !cid) {
            free(bid);
            free(cid);
            router_openai_requests_free(*parts, *n);
            *parts = NULL;
            *n = 0;
            router_openai_err_internal(err);
            return PW_ERR_NOMEM;
        }
        (*parts)[k]->batch_id = bid;
        (*parts)[k]->custom_id = cid;
    }
    return e;
}

/* KEYS results, batch; ARGV custom_id, value, counter, input tokens, output tokens. */
static const char record_script[] = "if redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2]) == 1 then\n"
                                    "  redis.call('hincrby', KEYS[2], ARGV[3], 1)\n"
                                    "  redis.call('hincrby', KEYS[2], 'input_tokens', ARGV[4])\n"
                                    "  redis.call('hincrby', KEYS[2], 'output_tokens', ARGV[5])\n"
                                    "  return 1\n"
                                    "end\n"
                                    "return 0\n";

static void record(struct router_batch_coord *c, struct coord_batch *b, size_t i, int status,
                   const char *body, size_t body_len)
{
    char id[PW_KEY_NAME_MAX + 32];
    line_id(id, sizeof id, b->id, i);
    char *line = NULL;
    if (router_batch_result_line(id, b->in.lines[i].custom_id, status, body, body_len, &line))
        return;
    json_int_t in_tok = 0, out_tok = 0;
    json_t *j = status == 200 ? json_loadb(body, body_len, 0, NULL) : NULL;
    json_t *u = json_object_get(j, "usage");
    in_tok = json_integer_value(json_object_get(u, "prompt_tokens"));
    out_tok = json_integer_value(json_object_get(u, "completion_tokens"));
    json_decref(j);
    size_t ll = strlen(line);
    char *val = malloc(ll + 2);
    if (!val) {
        free(line);
        return;
    }
    val[0] = status == 200 ? 'o' : 'e';
    memcpy(val + 1, line, ll + 1);
    free(line);
    char rkey[PW_KEY_MAX + 16], key[PW_KEY_MAX], it[24], ot[24];
    key_suffix(rkey, sizeof rkey, b->id, ":results");
    pw_key_batch(key, sizeof key, b->id);
    snprintf(it, sizeof it, "%lld", (long long)in_tok);
    snprintf(ot, sizeof ot, "%lld", (long long)out_tok);
    const char *argv[] = {"EVAL", record_script,
                          "2",    rkey,
                          key,    b->in.lines[i].custom_id,
                          val,    status == 200 ? "completed" : "failed",
                          it,     ot};
    redisReply *r = ccmd(c, 10, argv, NULL);
    if (r && r->type == REDIS_REPLY_INTEGER) {
        b->lines[i].done = b->lines[i].ended = true;
        b->lines[i].first_chunk[0] = '\0';
    }
    freeReplyObject(r);
    free(val);
}

/* Reads the batch's reply stream and records every finished line. */
static void collect(struct router_batch_coord *c, struct coord_batch *b, bool cancelling,
                    int64_t deadline_ms)
{
    char reply[PW_KEY_MAX];
    breply_key(reply, sizeof reply, b->id);
    for (int round = 0; round < 8; round++) {
        const char *argv[] = {"XREAD", "COUNT", "1000", "STREAMS", reply, b->cursor};
        redisReply *r = ccmd(c, 6, argv, NULL);
        struct pw_stream_entries *es = NULL;
        if (!r || r->type == REDIS_REPLY_ERROR || pw_stream_parse_read(r, &es) != PW_OK) {
            freeReplyObject(r);
            return;
        }
        freeReplyObject(r);
        for (size_t k = 0; k < es->n; k++) {
            snprintf(b->cursor, sizeof b->cursor, "%s", es->v[k].id);
            const struct pw_slice *v = pw_stream_entry_get(&es->v[k], PW_STREAM_FIELD);
            Parkway__ReplyChunk *ch = NULL;
            size_t i;
            if (!v || pw_proto_unpack_reply(v->ptr, v->len, 0, &ch) != PW_OK)
                continue;
            if (!router_batch_parse_line_id(ch->request_id, b->id, &i) || i >= b->in.n ||
                b->lines[i].ended) {
                pw_proto_free_reply(ch);
                continue;
            }
            struct coord_line *L = &b->lines[i];
            if (!L->acc) {
                Parkway__InferenceRequest **parts = NULL;
                size_t n = 0;
                struct router_openai_error err;
                if (line_parts(b, i, deadline_ms, &parts, &n, &err) == PW_OK) {
                    struct router_openai_resp resp;
                    char id[PW_KEY_NAME_MAX + 32];
                    line_id(id, sizeof id, b->id, i);
                    router_openai_resp_from_request(&resp, parts[0], id, n,
                                                    pw_clock_wall_ms() / 1000);
                    resp.model = parts[0]->function;
                    L->acc = router_openai_acc_create(&resp);
                }
                router_openai_requests_free(parts, n);
                if (!L->acc) {
                    pw_proto_free_reply(ch);
                    continue;
                }
            }
            if (!L->first_chunk[0])
                snprintf(L->first_chunk, sizeof L->first_chunk, "%s", es->v[k].id);
            bool finished = false;
            router_openai_acc_add(L->acc, ch, &finished);
            pw_proto_free_reply(ch);
            if (!finished)
                continue;
            char *body = NULL;
            size_t len = 0;
            int status = 500;
            if (router_openai_acc_render(L->acc, &body, &len, &status) == PW_OK) {
                if (cancelling && status != 200) {
                    L->ended = true; /* cut short by the cancel: not a result */
                    L->first_chunk[0] = '\0';
                } else {
                    record(c, b, i, status, body, len);
                }
            }
            free(body);
            router_openai_acc_destroy(L->acc);
            L->acc = NULL;
        }
        size_t got = es->n;
        pw_stream_entries_free(es);
        if (got < 1000)
            break;
    }
    /* Entries older than the oldest chunk of an unfinished line are of no further use. */
    const char *minid = b->cursor;
    for (size_t i = 0; i < b->in.n; i++) {
        const char *f = b->lines[i].first_chunk;
        if (!b->lines[i].ended && f[0]) {
            unsigned long long a1 = 0, a2 = 0, b1 = 0, b2 = 0;
            sscanf(f, "%llu-%llu", &a1, &a2);
            sscanf(minid, "%llu-%llu", &b1, &b2);
            if (a1 < b1 || (a1 == b1 && a2 < b2))
                minid = f;
        }
    }
    if (strcmp(minid, "0") != 0) {
        const char *argv[] = {"XTRIM", reply, "MINID", minid};
        freeReplyObject(ccmd(c, 4, argv, NULL));
    }
}

/* KEYS batch, lock, stream...; ARGV owner, expected next, new next, payloads. */
static const char enqueue_script[] =
    "if redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end\n"
    "if redis.call('hget', KEYS[1], 'status') ~= 'in_progress' then return -3 end\n"
    "if redis.call('hget', KEYS[1], 'next_line') ~= ARGV[2] then return -2 end\n"
    "for i = 3, #KEYS do redis.call('xadd', KEYS[i], '*', 'm', ARGV[i + 1]) end\n"
    "redis.call('hset', KEYS[1], 'next_line', ARGV[3])\n"
    "return 1\n";

#define ENQUEUE_CHUNK 32

static void enqueue(struct router_batch_coord *c, struct coord_batch *b, size_t next,
                    int64_t deadline_ms)
{
    size_t in_flight = 0;
    for (size_t i = 0; i < next && i < b->in.n; i++)
        in_flight += !b->lines[i].ended;
    while (next < b->in.n && in_flight < ROUTER_BATCH_WINDOW) {
        size_t want = ROUTER_BATCH_WINDOW - in_flight;
        if (want > ENQUEUE_CHUNK)
            want = ENQUEUE_CHUNK;
        if (want > b->in.n - next)
            want = b->in.n - next;
        /* Up to ROUTER_OPENAI_PROMPTS_MAX parts per line (a prompt list fans out).
         * argv: EVAL script nkeys batch lock stream... owner expected next payload... */
        size_t cap = want * ROUTER_OPENAI_PROMPTS_MAX;
        const char **argv = calloc(8 + 2 * cap, sizeof *argv);
        size_t *lens = calloc(8 + 2 * cap, sizeof *lens);
        char(*keys)[PW_KEY_MAX] = calloc(cap, sizeof *keys);
        uint8_t **bufs = calloc(cap, sizeof *bufs);
        size_t *plen = calloc(cap, sizeof *plen);
        size_t n_payload = 0, lines_done = 0;
        bool ok = argv && lens && keys && bufs && plen;
        char fn_woken[PW_KEY_NAME_MAX + 1] = "";
        for (size_t i = next; ok && i < next + want; i++) {
            Parkway__InferenceRequest **parts = NULL;
            size_t n = 0;
            struct router_openai_error err;
            memset(&err, 0, sizeof err);
            enum pw_err pe = line_parts(b, i, deadline_ms, &parts, &n, &err);
            if (pe == PW_ERR_IO || pe == PW_ERR_NOMEM) {
                ok = false; /* the input cannot be read now: retried next tick */
                break;
            }
            if (pe == PW_OK) {
                for (size_t k = 0; k < n && ok; k++) {
                    const char *why = NULL;
                    if (pw_key_batch_lane(keys[n_payload], PW_KEY_MAX, parts[k]->function) ||
                        pw_proto_pack_request_alloc(parts[k], &bufs[n_payload], &plen[n_payload],
                                                    &why))
                        ok = false;
                    else
                        n_payload++;
                }
                snprintf(fn_woken, sizeof fn_woken, "%s", parts[0]->function);
            } else {
                /* A line that validated but cannot be built now (its function was
                 * removed): its result is the error, recorded at once. */
                char *body = NULL;
                size_t len = 0;
                if (err.status == 0)
                    router_openai_err_internal(&err);
                if (router_openai_error_json(&err, &body, &len) == PW_OK)
                    record(c, b, i, err.status, body, len);
                free(body);
            }
            router_openai_requests_free(parts, n);
            lines_done++;
        }
        if (ok) {
            char key[PW_KEY_MAX], lock[PW_KEY_MAX + 16], nkeys[16], exp[24], nxt[24];
            pw_key_batch(key, sizeof key, b->id);
            key_suffix(lock, sizeof lock, b->id, ":lock");
            snprintf(nkeys, sizeof nkeys, "%zu", 2 + n_payload);
            snprintf(exp, sizeof exp, "%zu", next);
            snprintf(nxt, sizeof nxt, "%zu", next + lines_done);
            int argc = 0;
            argv[argc++] = "EVAL";
            argv[argc++] = enqueue_script;
            argv[argc++] = nkeys;
            argv[argc++] = key;
            argv[argc++] = lock;
            for (size_t k = 0; k < n_payload; k++)
                argv[argc++] = keys[k];
            argv[argc++] = c->owner;
            argv[argc++] = exp;
            argv[argc++] = nxt;
            for (int k = 0; k < argc; k++)
                lens[k] = strlen(argv[k]);
            for (size_t k = 0; k < n_payload; k++) {
                lens[argc] = plen[k];
                argv[argc++] = (const char *)bufs[k];
            }
            redisReply *r = ccmd(c, argc, argv, lens);
            ok = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
            freeReplyObject(r);
            if (ok) {
                in_flight += lines_done;
                next += lines_done;
                if (fn_woken[0]) {
                    const char *pub[] = {"PUBLISH", PW_KEY_WAKE, fn_woken};
                    freeReplyObject(ccmd(c, 3, pub, NULL));
                }
            }
        }
        for (size_t k = 0; bufs && k < cap; k++)
            free(bufs[k]);
        free(bufs);
        free(plen);
        free(keys);
        free(lens);
        free(argv);
        if (!ok)
            break;
    }
}

/* Sets pw:cancel:{id} for every enqueued line that has not ended. */
static void send_cancels(struct router_batch_coord *c, struct coord_batch *b, size_t next,
                         int64_t ttl_s)
{
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%" PRId64, ttl_s > 60 ? ttl_s : 60);
    for (size_t i = 0; i < next && i < b->in.n; i++) {
        if (b->lines[i].ended)
            continue;
        char id[PW_KEY_NAME_MAX + 32], key[PW_KEY_MAX + 40];
        line_id(id, sizeof id, b->id, i);
        for (int k = -1; k < ROUTER_OPENAI_PROMPTS_MAX; k++) {
            char pid[PW_KEY_NAME_MAX + 40];
            if (k < 0)
                snprintf(pid, sizeof pid, "%s", id);
            else
                snprintf(pid, sizeof pid, "%s.%d", id, k);
            if (pw_key_cancel(key, sizeof key, pid) != PW_OK)
                continue;
            const char *argv[] = {"SET", key, "1", "EX", ttl};
            freeReplyObject(ccmd(c, 5, argv, NULL));
            /* Only completions fan out; chat lines have one part. */
            if (strcmp(b->endpoint, ENDPOINT_CHAT) == 0 && k >= -1)
                break;
        }
    }
}

/* KEYS batch, lock, active, results, reply; ARGV owner, id, then field/values. */
static const char final_script[] = "if redis.call('get', KEYS[2]) ~= ARGV[1] then return -1 end\n"
                                   "redis.call('hset', KEYS[1], unpack(ARGV, 3))\n"
                                   "redis.call('srem', KEYS[3], ARGV[2])\n"
                                   "redis.call('del', KEYS[4], KEYS[5], KEYS[2])\n"
                                   "return 1\n";

static const char file_meta_script[] = "redis.call('hset', KEYS[1], unpack(ARGV, 3))\n"
                                       "redis.call('zadd', KEYS[2], ARGV[1], ARGV[2])\n"
                                       "return 1\n";

static bool save_file_meta(struct router_batch_coord *c, const char *fid, const char *tenant,
                           const char *purpose, const char *fname, uint64_t bytes)
{
    char key[PW_KEY_MAX], zkey[PW_KEY_MAX], b[24], created[24], score[24];
    pw_key_file(key, sizeof key, fid);
    router_key_tenant_files(zkey, sizeof zkey, tenant);
    int64_t now = pw_clock_wall_ms();
    snprintf(b, sizeof b, "%" PRIu64, bytes);
    snprintf(created, sizeof created, "%" PRId64, now / 1000);
    snprintf(score, sizeof score, "%" PRId64, now);
    const char *argv[] = {
        "EVAL", file_meta_script, "2",     key,      zkey,   score,        fid,     "id",
        fid,    "object",         "file",  "bytes",  b,      "created_at", created, "filename",
        fname,  "purpose",        purpose, "tenant", tenant, "storage_id", fid};
    redisReply *r = ccmd(c, (int)(sizeof argv / sizeof argv[0]), argv, NULL);
    bool ok = r && r->type == REDIS_REPLY_INTEGER;
    freeReplyObject(r);
    return ok;
}

/*
 * Writes the output and error files in input order and moves the batch to final. Every step
 * is idempotent (fixed file ids, overwrite), so a coordinator that dies half-way leaves the
 * batch in finalizing and the next one redoes it.
 */
static void finalize(struct router_batch_coord *c, struct coord_batch *b,
                     const struct pw_stream_entry *h, const char *final)
{
    char now[24];
    now_str(now, sizeof now);
    const char *status = router_api_field(h, "status");
    if (!status || strcmp(status, "finalizing") != 0) {
        const char *kv[] = {"status", "finalizing", "finalizing_at", now, "finalize_to", final};
        if (!transition(c, b->id, "in_progress|cancelling|", 6, kv))
            return;
    }
    const char *tenant = router_api_field(h, "tenant");
    char rkey[PW_KEY_MAX + 16];
    key_suffix(rkey, sizeof rkey, b->id, ":results");
    const char *hex = b->id + (strncmp(b->id, "batch_", 6) == 0 ? 6 : 0);
    char out_id[PW_KEY_NAME_MAX + 1], err_id[PW_KEY_NAME_MAX + 1];
    snprintf(out_id, sizeof out_id, "file-%.100s-output", hex);
    snprintf(err_id, sizeof err_id, "file-%.100s-errors", hex);
    struct pw_storage_writer *wo = NULL, *we = NULL;
    uint64_t bytes_o = 0, bytes_e = 0, n_o = 0, n_e = 0, n_expired = 0;
    bool expired = strcmp(final, "expired") == 0;
    bool ok = pw_storage_writer_open(c->rt->storage, out_id, &wo) == PW_OK &&
              pw_storage_writer_open(c->rt->storage, err_id, &we) == PW_OK;
    for (size_t at = 0; ok && at < b->in.n; at += 256) {
        size_t n = b->in.n - at < 256 ? b->in.n - at : 256;
        const char **argv = calloc(n + 2, sizeof *argv);
        if (!argv) {
            ok = false;
            break;
        }
        argv[0] = "HMGET";
        argv[1] = rkey;
        for (size_t k = 0; k < n; k++)
            argv[2 + k] = b->in.lines[at + k].custom_id;
        redisReply *r = ccmd(c, (int)n + 2, argv, NULL);
        free(argv);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != n) {
            freeReplyObject(r);
            ok = false;
            break;
        }
        for (size_t k = 0; ok && k < n; k++) {
            const redisReply *v = r->element[k];
            if (v->type == REDIS_REPLY_STRING && v->len > 1) {
                struct pw_storage_writer *wr = v->str[0] == 'o' ? wo : we;
                ok = pw_storage_write(wr, v->str + 1, v->len - 1) == PW_OK &&
                     pw_storage_write(wr, "\n", 1) == PW_OK;
                *(v->str[0] == 'o' ? &bytes_o : &bytes_e) += v->len;
                *(v->str[0] == 'o' ? &n_o : &n_e) += 1;
            } else if (expired) {
                char id[PW_KEY_NAME_MAX + 32], rid[PW_KEY_NAME_MAX + 48];
                line_id(id, sizeof id, b->id, at + k);
                snprintf(rid, sizeof rid, "batch_req_%s", id);
                json_t *o = json_pack(
                    "{s:s,s:s,s:n,s:{s:s,s:s}}", "id", rid, "custom_id",
                    b->in.lines[at + k].custom_id, "response", "error", "code", "batch_expired",
                    "message",
                    "This request could not be executed before the completion window expired.");
                char *line = o ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
                json_decref(o);
                ok = line && pw_storage_write(we, line, strlen(line)) == PW_OK &&
                     pw_storage_write(we, "\n", 1) == PW_OK;
                bytes_e += line ? strlen(line) + 1 : 0;
                n_e++;
                n_expired++;
                free(line);
            }
        }
        freeReplyObject(r);
    }
    if (ok && n_o)
        ok = pw_storage_commit(wo) == PW_OK;
    else
        pw_storage_abort(wo);
    if (ok && n_e)
        ok = pw_storage_commit(we) == PW_OK;
    else
        pw_storage_abort(we);
    if (!ok) {
        PW_LOG_ERROR("event=batch_finalize_failed batch=%s", b->id);
        return;
    }
    if ((n_o && !save_file_meta(c, out_id, tenant ? tenant : "", "batch_output",
                                "batch_output.jsonl", bytes_o)) ||
        (n_e && !save_file_meta(c, err_id, tenant ? tenant : "", "batch_output",
                                "batch_errors.jsonl", bytes_e)))
        return;
    char key[PW_KEY_MAX], lock[PW_KEY_MAX + 16], reply[PW_KEY_MAX], at_field[32], failed[24];
    pw_key_batch(key, sizeof key, b->id);
    key_suffix(lock, sizeof lock, b->id, ":lock");
    breply_key(reply, sizeof reply, b->id);
    snprintf(at_field, sizeof at_field, "%s_at", final);
    const char *f = router_api_field(h, "failed");
    snprintf(failed, sizeof failed, "%lld", (f ? strtoll(f, NULL, 10) : 0) + (long long)n_expired);
    const char *argv[20];
    int argc = 0;
    argv[argc++] = "EVAL";
    argv[argc++] = final_script;
    argv[argc++] = "5";
    argv[argc++] = key;
    argv[argc++] = lock;
    argv[argc++] = ROUTER_KEY_BATCHES_ACTIVE;
    argv[argc++] = rkey;
    argv[argc++] = reply;
    argv[argc++] = c->owner;
    argv[argc++] = b->id;
    argv[argc++] = "status";
    argv[argc++] = final;
    argv[argc++] = at_field;
    argv[argc++] = now;
    argv[argc++] = "failed";
    argv[argc++] = failed;
    argv[argc++] = "output_file_id";
    argv[argc++] = n_o ? out_id : "";
    argv[argc++] = "error_file_id";
    argv[argc++] = n_e ? err_id : "";
    redisReply *r = ccmd(c, argc, argv, NULL);
    if (r && r->type == REDIS_REPLY_INTEGER && r->integer == 1)
        PW_LOG_INFO("event=batch_%s batch=%s output_lines=%" PRIu64 " error_lines=%" PRIu64, final,
                    b->id, n_o, n_e);
    freeReplyObject(r);
}

static int64_t field_i64(const struct pw_stream_entry *h, const char *name)
{
    const char *v = router_api_field(h, name);
    return v ? strtoll(v, NULL, 10) : 0;
}

static void step(struct router_batch_coord *c, struct coord_batch *b)
{
    char key[PW_KEY_MAX];
    pw_key_batch(key, sizeof key, b->id);
    const char *argv[] = {"HGETALL", key};
    redisReply *r = ccmd(c, 2, argv, NULL);
    struct pw_stream_entries *hs = NULL;
    if (!r || r->type != REDIS_REPLY_ARRAY || pw_hash_parse_all(r, &hs) != PW_OK) {
        freeReplyObject(r);
        return;
    }
    freeReplyObject(r);
    const struct pw_stream_entry *h = &hs->v[0];
    const char *status = router_api_field(h, "status");
    int64_t now = pw_clock_wall_ms() / 1000;
    int64_t expires = field_i64(h, "expires_at");
    if (!status) {
        const char *srem[] = {"SREM", ROUTER_KEY_BATCHES_ACTIVE, b->id};
        freeReplyObject(ccmd(c, 3, srem, NULL));
        goto out;
    }
    if (strcmp(status, "validating") == 0) {
        if (expires && now >= expires) {
            const char *kv[] = {"status", "finalizing", "finalize_to", "expired"};
            transition(c, b->id, "validating|", 4, kv);
        } else {
            validate(c, b, h);
        }
        goto out;
    }
    if (strcmp(status, "cancelling") == 0 && !router_api_field(h, "next_line")) {
        /* cancelled before it was validated: nothing ran */
        b->in.n = 0;
        b->loaded = true;
    }
    bool running = strcmp(status, "in_progress") == 0 || strcmp(status, "cancelling") == 0 ||
                   strcmp(status, "finalizing") == 0;
    if (!running) {
        const char *srem[] = {"SREM", ROUTER_KEY_BATCHES_ACTIVE, b->id};
        freeReplyObject(ccmd(c, 3, srem, NULL));
        goto out;
    }
    if (!b->loaded && !load_running(c, b, h))
        goto out;
    if (strcmp(status, "finalizing") == 0) {
        const char *to = router_api_field(h, "finalize_to");
        finalize(c, b, h, to && to[0] ? to : "completed");
        goto out;
    }
    if (expires && now >= expires) {
        PW_LOG_WARN("event=batch_expiring batch=%s", b->id);
        send_cancels(c, b, (size_t)field_i64(h, "next_line"), 3600);
        finalize(c, b, h, "expired");
        goto out;
    }
    bool cancelling = strcmp(status, "cancelling") == 0;
    collect(c, b, cancelling, expires * 1000);
    size_t next = (size_t)field_i64(h, "next_line");
    if (!cancelling) {
        enqueue(c, b, next, expires * 1000);
        size_t ended = 0;
        for (size_t i = 0; i < b->in.n; i++)
            ended += b->lines[i].done;
        if (ended == b->in.n) {
            /* counts are re-read by finalize from the hash it was given: refresh */
            pw_stream_entries_free(hs);
            hs = NULL;
            r = ccmd(c, 2, argv, NULL);
            if (r && r->type == REDIS_REPLY_ARRAY && pw_hash_parse_all(r, &hs) == PW_OK)
                finalize(c, b, &hs->v[0], "completed");
            freeReplyObject(r);
        }
        goto out;
    }
    if (!b->cancel_sent) {
        send_cancels(c, b, next, expires - now + 3600);
        b->cancel_sent = true;
    }
    size_t open = 0;
    for (size_t i = 0; i < next && i < b->in.n; i++)
        open += !b->lines[i].ended;
    if (open == 0 || now - field_i64(h, "cancelling_at") > ROUTER_BATCH_CANCEL_GRACE_S) {
        pw_stream_entries_free(hs);
        hs = NULL;
        r = ccmd(c, 2, argv, NULL);
        if (r && r->type == REDIS_REPLY_ARRAY && pw_hash_parse_all(r, &hs) == PW_OK)
            finalize(c, b, &hs->v[0], "cancelled");
        freeReplyObject(r);
    }
out:
    pw_stream_entries_free(hs);
}

static void tick(struct router_batch_coord *c)
{
    const char *argv[] = {"SMEMBERS", ROUTER_KEY_BATCHES_ACTIVE};
    redisReply *r = ccmd(c, 2, argv, NULL);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        freeReplyObject(r);
        return;
    }
    for (struct coord_batch *b = c->batches; b; b = b->next)
        b->seen = false;
    for (size_t i = 0; i < r->elements && !c->stop && c->rc; i++) {
        const char *id = r->element[i]->str;
        if (r->element[i]->type != REDIS_REPLY_STRING || !pw_key_name_ok(id))
            continue;
        struct coord_batch *b = c->batches;
        while (b && strcmp(b->id, id) != 0)
            b = b->next;
        if (!take_lock(c, id))
            continue; /* another router drives it; a cached copy is dropped below */
        if (!b) {
            b = calloc(1, sizeof *b);
            if (!b)
                continue;
            snprintf(b->id, sizeof b->id, "%s", id);
            b->next = c->batches;
            c->batches = b;
        }
        b->seen = true;
        step(c, b);
    }
    freeReplyObject(r);
    struct coord_batch **pp = &c->batches;
    while (*pp) {
        struct coord_batch *b = *pp;
        if (!b->seen) {
            *pp = b->next;
            batch_free(b);
        } else {
            pp = &b->next;
        }
    }
}

static void *coord_main(void *arg)
{
    struct router_batch_coord *c = arg;
    uint64_t backoff = 100;
    while (!c->stop) {
        if (!c->rc) {
            char err[256];
            if (pw_redis_sync_connect(c->rt->cfg.redis_url, 2000, &c->rc, err, sizeof err)) {
                c->rc = NULL;
                struct timespec ts = {(time_t)(backoff / 1000), (long)(backoff % 1000) * 1000000L};
                nanosleep(&ts, NULL);
                backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
                continue;
            }
            backoff = 100;
            /* A reconnect may have missed anything: rebuild every cache from Redis. */
            while (c->batches) {
                struct coord_batch *b = c->batches;
                c->batches = b->next;
                batch_free(b);
            }
        }
        uint64_t t0 = pw_clock_mono_ms();
        tick(c);
        uint64_t dt = pw_clock_mono_ms() - t0;
        if (dt < ROUTER_BATCH_TICK_MS) {
            uint64_t ms = ROUTER_BATCH_TICK_MS - dt;
            struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

enum pw_err router_batch_coord_start(struct router *rt, struct router_batch_coord **out, char *err,
                                     size_t errcap)
{
    struct router_batch_coord *c = calloc(1, sizeof *c);
    if (!c)
        return PW_ERR_NOMEM;
    c->rt = rt;
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd)
        rnd = (uint32_t)pw_clock_mono_ns();
    snprintf(c->owner, sizeof c->owner, "%s/%08x", rt->router_id, rnd);
    if (pthread_create(&c->thread, NULL, coord_main, c) != 0) {
        snprintf(err, errcap, "cannot start the batch coordinator thread");
        free(c);
        return PW_ERR_INTERNAL;
    }
    *out = c;
    return PW_OK;
}

void router_batch_coord_stop(struct router_batch_coord *c)
{
    if (!c)
        return;
    c->stop = 1;
    pthread_join(c->thread, NULL);
    /* Release our locks so another router takes over at once. */
    static const char unlock_script[] =
        "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end\n"
        "return 1\n";
    while (c->batches) {
        struct coord_batch *b = c->batches;
        c->batches = b->next;
        char lock[PW_KEY_MAX + 16];
        key_suffix(lock, sizeof lock, b->id, ":lock");
        const char *argv[] = {"EVAL", unlock_script, "1", lock, c->owner};
        freeReplyObject(ccmd(c, 5, argv, NULL));
        batch_free(b);
    }
    if (c->rc)
        redisFree(c->rc);
    free(c);
}

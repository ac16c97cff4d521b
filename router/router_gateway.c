/*
 * router_gateway: the router's request handling between HTTP and Redis (see router.h).
 *
 * A call (one API request) moves through:
 *   route -> authenticate (API-key cache, else HGET pw:keys) -> rate limits (INCR of the
 *   key's request counter, GET of its token counter, per minute, shared by every router
 *   through Redis) -> parse (router_openai) -> enqueue (a bounded XADD to pw:{fn}:q by a
 *   Lua script, one entry per fanned-out part; PUBLISH pw:wake when the function has no
 *   ready engine) -> replies, read by this worker's own XREAD of its reply stream
 *   pw:reply:{router}:{index} -> SSE chunks or one JSON body.
 * A queued call ends at its deadline (504) or, without any chunk, at its function's max
 * queue wait (503); streams get SSE keep-alive comments while they wait.
 * Memory: a call is freed when its reference count drops to zero: one reference for the
 * HTTP side (until the terminal call) and one per Redis command in flight, so a reply that
 * arrives after the client left finds a call marked gone instead of freed memory.
 * Every function here runs on the call's worker thread.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_log.h"
#include "pw_metrics.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "router.h"
#include "router_batch.h"
#include "router_openai.h"
#include "router_sse.h"

#define KEEPALIVE_MS 3000  /* SSE comment on a stream idle this long (cold starts, prefill) */
#define CANCEL_TTL_S "600" /* pw:cancel:{id} lives this long */
#define REVOKE_CHANNEL "pw:keys:revoked"
#define FUNCTIONS_REFRESH_MS 2000
#define DEADLINE_HEADER "x-parkway-timeout-ms" /* a request's own deadline, ms from now */
#define DEADLINE_HEADER_MAX_MS 86400000u
#define QUEUE_WAIT_DEFAULT_MS 60000 /* a spec without max_queue_wait_ms (pw_spec's default) */
#define FN_STATE_MAX_AGE_MS 2500    /* a look at pw:{fn}:workers older than this is unknown */
#define FN_ACTIVE_MS 60000          /* functions used this recently are looked at every tick */
#define BACKLOG_MAX_AGE_MS 2500     /* an older probe does not allow a plain XADD */
#define WORKER_FRESH_MS 10000       /* a READY heartbeat older than this does not count */
#define WAKE_MIN_MS 500             /* at most one PUBLISH pw:wake per function and thread */
#define QUEUE_FULL_RETRY_S 1        /* Retry-After of a queue-full 503 */
#define QUEUE_WAIT_RETRY_S 2        /* Retry-After of a max-queue-wait 503 */
#define RATE_COUNTER_TTL_S "120"    /* per-minute counters outlive their minute */
#define TIMER_HORIZON_MS 2500       /* a call's timer is armed once its time is this near */

/*
 * The bounded XADD, atomic in Redis (EVALSHA; the text again after NOSCRIPT).
 * KEYS[1] = pw:{fn}:q; ARGV = limit, group, field, payload. Engines XACK but do not delete,
 * so XLEN counts finished work too: it is only an upper bound of the backlog, and below the
 * limit the script is a plain XADD. At or over it: trim what the group has acknowledged
 * (everything older than its oldest pending entry, else than its last delivered one), then
 * count the backlog = lag (never delivered) + pending (delivered, not acknowledged), or the
 * trimmed XLEN when Redis cannot tell the lag (entries deleted with XDEL). Answers the new
 * id, or the backlog as an integer when it is full: nothing accepted is ever dropped.
 * Probe mode (ARGV[4] empty): trim and count as above, whatever XLEN is, and answer the
 * backlog without adding anything (0 for a stream that does not exist yet).
 */
static const char ENQUEUE_LUA[] =
    "local q, limit = KEYS[1], tonumber(ARGV[1])\n"
    "local probe = ARGV[4] == ''\n"
    "if probe and redis.call('EXISTS', q) == 0 then return 0 end\n"
    "if probe or (limit > 0 and redis.call('XLEN', q) >= limit) then\n"
    "  local backlog\n"
    "  for _, g in ipairs(redis.call('XINFO', 'GROUPS', q)) do\n"
    "    local f = {}\n"
    "    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end\n"
    "    if f['name'] == ARGV[2] then\n"
    "      local minid = f['last-delivered-id']\n"
    "      if f['pending'] > 0 then minid = redis.call('XPENDING', q, ARGV[2])[2] end\n"
    "      redis.call('XTRIM', q, 'MINID', minid)\n"
    "      if f['lag'] then backlog = f['lag'] + f['pending'] end\n"
    "    end\n"
    "  end\n"
    "  backlog = backlog or redis.call('XLEN', q)\n"
    "  if probe or backlog >= limit then return backlog end\n"
    "end\n"
    "return redis.call('XADD', q, '*', ARGV[3], ARGV[4])\n";

enum route {
    ROUTE_NONE = 0,
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_MODELS,
    ROUTE_MODEL,
    ROUTE_BATCH_API, /* /v1/files*, /v1/batches*: handed to router_batch */
};

struct router_call {
    struct router_worker *w;
    struct router_http_request *req; /* NULL after the terminal HTTP call */
    int refs;
    bool gone; /* client left or call finished: ignore late events */
    bool in_table;
    bool stream;
    enum route route;
    const char *route_label;
    char id[40];
    struct router_call *next; /* in the worker's bucket */
    struct router_key key;    /* copy of the caller's key (allowed list borrowed) */
    char model[ROUTER_OPENAI_MODEL_MAX + 1];
    struct router_openai_resp resp;
    struct router_openai_acc *acc;
    struct router_openai_stream *st;
    Parkway__InferenceRequest **parts;
    size_t n_parts;
    uint64_t start_ns, first_token_ns, last_token_ns;
    uint64_t deadline_ms;       /* mono */
    uint64_t queue_deadline_ms; /* mono: no chunk by then = the function's max queue wait
                                   passed; 0 = none, or a chunk came */
    uint64_t last_write_ms;     /* mono, for SSE keep-alives */
    bool queue_observed;
    bool stream_started;       /* SSE headers sent */
    struct event *deadline_ev; /* owned; fires at the first of deadline_ms and
                                  queue_deadline_ms once queued */
    size_t parts_queued;       /* parts Redis accepted (the SSE head waits for all) */
    uint64_t parts_done;       /* bit k: part k's final usage is in tokens */
    uint64_t tokens;           /* prompt + completion tokens of the finished parts (TPM) */
    int limit_waits;           /* rate-limit answers still expected */
    int limit_refused;         /* 0, or 1 = over rpm, 2 = over tpm */
};

/* ---- helpers ----------------------------------------------------------------------- */

/* A worker's generator start: random (getrandom), else clock and index. */
static uint64_t seed_rng(unsigned worker)
{
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, 0) != sizeof s)
        s = pw_clock_mono_ns() ^ ((uint64_t)worker << 56) ^ (uint64_t)pw_clock_wall_ms();
    return s;
}

/* splitmix64: request ids and sampling seeds need uniqueness, not secrecy, and a syscall
 * per request (getrandom) costs more than the rest of the id. */
static uint64_t rng_next(struct router_worker *w)
{
    uint64_t z = (w->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The call's own copy of a cached key: the cache entry may be evicted or revoked while
 * the call waits for Redis. */
static void key_copy(struct router_key *dst, const struct router_key *src)
{
    *dst = *src;
    dst->allowed = NULL;
    dst->n_allowed = 0;
    if (src->n_allowed == 0)
        return;
    dst->allowed = calloc(src->n_allowed, sizeof *dst->allowed);
    for (size_t i = 0; dst->allowed && i < src->n_allowed; i++)
        if ((dst->allowed[dst->n_allowed] = strdup(src->allowed[i])))
            dst->n_allowed++;
    /* A key limited to some functions must never widen to all on a failed copy. */
    if (dst->n_allowed != src->n_allowed)
        dst->disabled = true;
}

/* "r<worker: 2 hex><random: 16 hex>", without printf. */
static void call_make_id(char out[20], unsigned worker, uint64_t rnd)
{
    static const char hex[] = "0123456789abcdef";
    out[0] = 'r';
    out[1] = hex[(worker >> 4) & 0xf];
    out[2] = hex[worker & 0xf];
    for (int i = 0; i < 16; i++)
        out[3 + i] = hex[(rnd >> (60 - 4 * i)) & 0xf];
    out[19] = '\0';
}

static void call_unref(struct router_call *c)
{
    if (--c->refs > 0)
        return;
    if (c->deadline_ev)
        event_free(c->deadline_ev);
    for (size_t i = 0; i < c->key.n_allowed; i++)
        free(c->key.allowed[i]);
    free(c->key.allowed);
    router_openai_acc_destroy(c->acc);
    router_openai_stream_destroy(c->st);
    if (c->parts)
        router_openai_requests_free(c->parts, c->n_parts);
    free(c);
}

static unsigned bucket_of(const char *id)
{
    uint32_t h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % ROUTER_CALLS_BUCKETS;
}

static void table_add(struct router_call *c)
{
    unsigned b = bucket_of(c->id);
    c->next = c->w->calls[b];
    c->w->calls[b] = c;
    c->in_table = true;
    c->refs++;
    pw_metric_gauge_add(c->w->rt->m_inflight, NULL, 1);
}

/* Takes c out of its worker's table; returns the references to drop (1 if it was in). */
static int table_unlink(struct router_call *c)
{
    if (!c->in_table)
        return 0;
    struct router_call **pp = &c->w->calls[bucket_of(c->id)];
    while (*pp && *pp != c)
        pp = &(*pp)->next;
    if (*pp)
        *pp = c->next;
    c->in_table = false;
    pw_metric_gauge_add(c->w->rt->m_inflight, NULL, -1);
    return 1;
}

static void count_tokens(struct router_call *c);

/* The HTTP side is done: drop its reference and the table's (one free at most). */
static void call_end(struct router_call *c)
{
    count_tokens(c);
    c->req = NULL;
    c->gone = true;
    c->refs -= table_unlink(c);
    call_unref(c);
}

static struct router_call *table_find(struct router_worker *w, const char *id)
{
    for (struct router_call *c = w->calls[bucket_of(id)]; c; c = c->next)
        if (strcmp(c->id, id) == 0)
            return c;
    return NULL;
}

static bool function_known(const struct router_worker *w, const char *name);

static void count_request(struct router_call *c, int status)
{
    char s[4] = "500";
    if (status >= 100 && status <= 999) {
        s[0] = (char)('0' + status / 100);
        s[1] = (char)('0' + status / 10 % 10);
        s[2] = (char)('0' + status % 10);
    }
    /* Only registered names become label values: c->model may come straight from the URL
     * (/v1/models/{id}, before auth), and every new value is a new series. */
    const char *fn = c->model[0] && function_known(c->w, c->model) ? c->model : "";
    const char *labels[] = {c->route_label, s, fn};
    pw_metric_counter_add(c->w->rt->m_requests, labels, 1);
}

/* Ends the HTTP side with an OpenAI error object. */
static void finish_error(struct router_call *c, const struct router_openai_error *e)
{
    if (!c->req)
        return;
    count_request(c, e->status);
    if (c->st && c->stream_started) {
        /* A stream that already started: the error is the last event. */
        struct router_sse_buf buf;
        router_sse_buf_init(&buf);
        if (router_openai_stream_fail(c->st, e, &buf) == PW_OK && buf.len)
            router_http_stream_write(c->req, buf.data, buf.len);
        router_sse_buf_deinit(&buf);
        router_http_stream_end(c->req);
    } else {
        char *body = NULL;
        size_t len = 0;
        char ra[16];
        struct router_http_field hdr[2];
        size_t nh = 0;
        hdr[nh++] = (struct router_http_field){"content-type", "application/json"};
        if (e->retry_after_s > 0) {
            snprintf(ra, sizeof ra, "%d", e->retry_after_s);
            hdr[nh++] = (struct router_http_field){"retry-after", ra};
        }
        if (router_openai_error_json(e, &body, &len) == PW_OK) {
            pw_metric_counter_add(c->w->rt->m_bytes_out, NULL, (double)len);
            router_http_respond(c->req, e->status, hdr, nh, body, len);
        } else {
            router_http_respond_error(c->req, 500, "server_error", NULL, "internal error");
        }
        free(body);
    }
    call_end(c);
}

static void respond_json(struct router_call *c, int status, char *body, size_t len)
{
    struct router_http_field hdr[] = {{"content-type", "application/json"}};
    count_request(c, status);
    pw_metric_counter_add(c->w->rt->m_bytes_out, NULL, (double)len);
    router_http_respond(c->req, status, hdr, 1, body, len);
    call_end(c);
}

/* Tells engines to stop working on the call's parts (best effort). */
static void set_cancel_flags(struct router_call *c)
{
    for (size_t i = 0; i < c->n_parts; i++) {
        char key[PW_KEY_MAX];
        if (!c->parts || !c->parts[i] || pw_key_cancel(key, sizeof key, c->parts[i]->id))
            continue;
        pw_redis_command(c->w->redis, NULL, NULL, "SET", key, "1", "EX", CANCEL_TTL_S, NULL);
    }
}

static void on_client_gone(struct router_http_request *req, void *ud)
{
    struct router_call *c = ud;
    if (!c->req)
        return;
    PW_LOG_INFO("event=client_gone request=%s", c->id);
    count_request(c, 499);
    set_cancel_flags(c);
    router_http_request_release(c->req);
    call_end(c);
}

/* ---- functions snapshot ------------------------------------------------------------ */

static struct router_fn *fn_find(const struct router_worker *w, const char *name)
{
    for (size_t i = 0; i < w->n_fns; i++)
        if (strcmp(w->fns[i].name, name) == 0)
            return &w->fns[i];
    return NULL;
}

static bool function_known(const struct router_worker *w, const char *name)
{
    return fn_find(w, name) != NULL;
}

static void fns_free(struct router_fn *fns, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(fns[i].name);
    free(fns);
}

static bool key_allows(const struct router_key *k, const char *fn)
{
    if (k->n_allowed == 0)
        return true;
    for (size_t i = 0; i < k->n_allowed; i++)
        if (strcmp(k->allowed[i], fn) == 0)
            return true;
    return false;
}

/* max_queue_wait_ms of a spec as pw_spec_to_json renders it; the spec default otherwise. */
static uint64_t spec_queue_wait_ms(const char *json, size_t len)
{
    uint64_t ms = QUEUE_WAIT_DEFAULT_MS;
    json_t *j = json_loadb(json, len, 0, NULL);
    json_t *v = json_object_get(j, "max_queue_wait_ms");
    if (json_is_integer(v) && json_integer_value(v) > 0)
        ms = (uint64_t)json_integer_value(v);
    json_decref(j);
    return ms;
}

/* HGETALL pw:functions: [name, spec JSON, ...]. What the worker learnt about each function
 * (engines, last use, last wake) carries over to the new snapshot. */
static void on_functions(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                         const char *errstr, void *ud)
{
    struct router_worker *w = ud;
    if (err || !reply || reply->type != REDIS_REPLY_ARRAY)
        return;
    struct router_fn *fns = calloc(reply->elements / 2 + 1, sizeof *fns);
    if (!fns)
        return;
    size_t n = 0;
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || !pw_key_name_ok(k->str))
            continue;
        const struct router_fn *old = fn_find(w, k->str);
        fns[n] = old ? *old : (struct router_fn){.ready = -1};
        if (!(fns[n].name = strdup(k->str)))
            continue;
        fns[n].max_queue_wait_ms = v->type == REDIS_REPLY_STRING
                                       ? spec_queue_wait_ms(v->str, v->len)
                                       : QUEUE_WAIT_DEFAULT_MS;
        n++;
    }
    fns_free(w->fns, w->n_fns);
    w->fns = fns;
    w->n_fns = n;
    if (!w->functions_created)
        w->functions_created = pw_clock_wall_ms() / 1000;
}

static void refresh_functions(struct router_worker *w)
{
    pw_redis_command(w->redis, on_functions, w, "HGETALL", PW_KEY_FUNCTIONS, NULL);
}

/* ---- engines of a function: HGETALL pw:{fn}:workers, once per tick while in use ------- */

struct look_ctx {
    struct router_worker *w;
    char name[PW_KEY_NAME_MAX + 1]; /* the snapshot may be replaced meanwhile */
};

static void on_workers(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                       const char *errstr, void *ud)
{
    struct look_ctx *lc = ud;
    struct router_fn *fn = err == PW_ERR_CANCELLED ? NULL : fn_find(lc->w, lc->name);
    if (fn) {
        fn->looking = false;
        if (!err && reply && reply->type == REDIS_REPLY_ARRAY) {
            int64_t now = pw_clock_wall_ms();
            int ready = 0;
            for (size_t i = 1; i < reply->elements; i += 2) {
                const redisReply *v = reply->element[i];
                Parkway__WorkerStatus *ws = NULL;
                if (v->type != REDIS_REPLY_STRING ||
                    pw_proto_unpack_worker(v->str, v->len, 0, &ws) != PW_OK)
                    continue;
                if (ws->state == PARKWAY__WORKER_STATE__WORKER_STATE_READY &&
                    ws->last_heartbeat_unix_ms + WORKER_FRESH_MS >= now)
                    ready++;
                pw_proto_free_worker(ws);
            }
            fn->ready = ready;
            fn->looked_ms = pw_clock_mono_ms();
        }
    }
    free(lc);
}

static void look_workers(struct router_worker *w, struct router_fn *fn)
{
    char key[PW_KEY_MAX];
    if (fn->looking || pw_key_workers(key, sizeof key, fn->name) != PW_OK)
        return;
    struct look_ctx *lc = malloc(sizeof *lc);
    if (!lc)
        return;
    lc->w = w;
    snprintf(lc->name, sizeof lc->name, "%s", fn->name);
    if (pw_redis_command(w->redis, on_workers, lc, "HGETALL", key, NULL) == PW_OK)
        fn->looking = true;
    else
        free(lc);
}

/* The scaler starts or unparks an engine when told; it needs telling only when no engine is
 * ready (its own observation of the queue catches the rest), and not for every request of
 * a burst. An unknown or stale state counts as none ready, and is looked at again. */
static void maybe_wake(struct router_worker *w, struct router_fn *fn, uint64_t now)
{
    bool known = fn->ready >= 0 && now - fn->looked_ms <= FN_STATE_MAX_AGE_MS;
    if (!known)
        look_workers(w, fn);
    if ((!known || fn->ready == 0) && now - fn->woken_ms >= WAKE_MIN_MS) {
        fn->woken_ms = now;
        pw_redis_command(w->redis, NULL, NULL, "PUBLISH", PW_KEY_WAKE, fn->name, NULL);
    }
}

/* ---- API keys ---------------------------------------------------------------------- */

static void key_clear(struct router_key *k)
{
    for (size_t i = 0; i < k->n_allowed; i++)
        free(k->allowed[i]);
    free(k->allowed);
    memset(k, 0, sizeof *k);
}

static struct router_key *key_slot(struct router_worker *w, const char *hex)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++)
        v = v * 16 + (unsigned)(hex[i] <= '9' ? hex[i] - '0' : hex[i] - 'a' + 10);
    return &w->keys[v % ROUTER_KEY_CACHE];
}

static void on_key_revoked(struct pw_redis *r, const char *channel, size_t channel_len,
                           const char *payload, size_t len, void *ud)
{
    struct router_worker *w = ud;
    if (len != PW_APIKEY_HASH_HEX_LEN)
        return;
    char hex[PW_APIKEY_HASH_HEX_LEN + 1];
    memcpy(hex, payload, len);
    hex[len] = '\0';
    struct router_key *k = key_slot(w, hex);
    if (strcmp(k->hash_hex, hex) == 0)
        key_clear(k);
}

static void continue_call(struct router_call *c);

static void on_key_record(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_call *c = ud;
    struct router_worker *w = c->w;
    if (c->gone) {
        call_unref(c);
        return;
    }
    struct router_openai_error e;
    if (err || !reply || reply->type == REDIS_REPLY_ERROR) {
        router_openai_err_unavailable(&e, "the key store (Redis) is unavailable", 1);
        finish_error(c, &e);
        call_unref(c);
        return;
    }
    struct router_key *k = key_slot(w, c->key.hash_hex);
    char hex[sizeof k->hash_hex];
    memcpy(hex, c->key.hash_hex, sizeof hex);
    key_clear(k);
    memcpy(k->hash_hex, hex, sizeof hex);
    k->expires_ms = pw_clock_mono_ms() + w->rt->cfg.key_cache_ms;
    Parkway__KeyRecord *rec = NULL;
    if (reply->type != REDIS_REPLY_STRING ||
        pw_proto_unpack_key(reply->str, reply->len, 0, &rec) != PW_OK) {
        k->missing = true;
    } else {
        snprintf(k->key_id, sizeof k->key_id, "%s", rec->key_id ? rec->key_id : "");
        snprintf(k->tenant, sizeof k->tenant, "%s", rec->tenant ? rec->tenant : "");
        k->rpm = rec->rpm_limit;
        k->tpm = rec->tpm_limit;
        k->disabled =
            rec->disabled || (rec->expires_unix_ms && rec->expires_unix_ms < pw_clock_wall_ms());
        if (rec->n_allowed_functions) {
            k->allowed = calloc(rec->n_allowed_functions, sizeof *k->allowed);
            for (size_t i = 0; k->allowed && i < rec->n_allowed_functions; i++)
                if ((k->allowed[k->n_allowed] = strdup(rec->allowed_functions[i])))
                    k->n_allowed++;
        }
        pw_proto_free_key(rec);
    }
    key_copy(&c->key, k);
    continue_call(c);
    call_unref(c);
}

/* Returns true when the call may go on now; false when it waits for Redis or has ended. */
static bool authenticate(struct router_call *c)
{
    struct router_openai_error e;
    const char *auth = router_http_request_header(c->req, "authorization");
    const char *key;
    size_t key_len;
    if (!auth) {
        router_openai_err_missing_key(&e);
        finish_error(c, &e);
        return false;
    }
    if (pw_apikey_parse_bearer(auth, strlen(auth), &key, &key_len) != PW_OK) {
        router_openai_err_bad_key(&e);
        finish_error(c, &e);
        return false;
    }
    /* Every key is made by pw_apikey_generate: anything else is refused without a Redis
     * round trip, so junk credentials cannot load the key store. */
    if (!pw_apikey_format_ok(key, key_len)) {
        router_openai_err_bad_key(&e);
        finish_error(c, &e);
        return false;
    }
    uint8_t hash[PW_APIKEY_HASH_LEN];
    if (pw_apikey_hash(key, key_len, hash) != PW_OK) {
        router_openai_err_internal(&e);
        finish_error(c, &e);
        return false;
    }
    pw_hex_encode(hash, sizeof hash, c->key.hash_hex);
    struct router_key *k = key_slot(c->w, c->key.hash_hex);
    if (k->hash_hex[0] && pw_ct_equal(k->hash_hex, c->key.hash_hex, PW_APIKEY_HASH_HEX_LEN) &&
        k->expires_ms > pw_clock_mono_ms()) {
        key_copy(&c->key, k);
        return true;
    }
    c->refs++;
    if (pw_redis_command(c->w->redis, on_key_record, c, "HGET", PW_KEY_KEYS, c->key.hash_hex,
                         NULL) != PW_OK) {
        c->refs--;
        router_openai_err_unavailable(&e, "the key store (Redis) is unavailable", 1);
        finish_error(c, &e);
    }
    return false;
}

/* ---- inference calls --------------------------------------------------------------- */

static enum router_openai_access model_check(void *arg, const char *model)
{
    struct router_call *c = arg;
    if (!function_known(c->w, model))
        return ROUTER_OPENAI_MODEL_NOT_FOUND;
    if (!key_allows(&c->key, model))
        return ROUTER_OPENAI_MODEL_DENIED;
    return ROUTER_OPENAI_MODEL_OK;
}

static void on_deadline(evutil_socket_t fd, short what, void *arg);

/* Sends the SSE head once every part is queued (a full queue is still a plain 503). */
static void stream_begin(struct router_call *c)
{
    if (!c->stream || c->stream_started || !c->req)
        return;
    struct router_http_field hdr[] = {{"content-type", "text/event-stream"},
                                      {"cache-control", "no-cache"}};
    router_http_stream_begin(c->req, 200, hdr, 2);
    c->stream_started = true;
    c->last_write_ms = pw_clock_mono_ms();
}

/* Arms the call's timer for the first of its deadline and its queue deadline, once that is
 * within TIMER_HORIZON_MS: a time further off is left to the 1 s tick, which calls this
 * again as it comes near. Most calls end long before their deadline and never need a timer
 * (an allocation and two timer-heap updates fewer per call). */
static void arm_timer(struct router_call *c)
{
    uint64_t at = c->deadline_ms;
    if (c->queue_deadline_ms && (!at || c->queue_deadline_ms < at))
        at = c->queue_deadline_ms;
    uint64_t now = pw_clock_mono_ms();
    uint64_t left = at > now ? at - now : 0;
    if (!at || left > TIMER_HORIZON_MS) {
        if (c->deadline_ev)
            evtimer_del(c->deadline_ev);
        return;
    }
    if (!c->deadline_ev && !(c->deadline_ev = evtimer_new(c->w->base, on_deadline, c)))
        return; /* the 1 s tick is the backstop */
    struct timeval tv = {(time_t)(left / 1000), (suseconds_t)(left % 1000) * 1000};
    evtimer_add(c->deadline_ev, &tv);
}

/* One part's bounded XADD in flight; holds a reference on the call. */
struct enqueue_op {
    struct router_call *c;
    size_t part;
    bool eval; /* sent as EVAL with the script text */
};

static enum pw_err send_part(struct router_call *c, size_t part, bool eval,
                             struct router_openai_error *e);

static void on_enqueued(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                        const char *errstr, void *ud)
{
    struct enqueue_op *op = ud;
    struct router_call *c = op->c;
    struct router_openai_error e;
    if (c->gone)
        goto out;
    if (reply && reply->type == REDIS_REPLY_ERROR && !op->eval &&
        strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        /* Redis lost its script cache (restart, SCRIPT FLUSH): the text, once, caches it
         * again for every later EVALSHA. */
        if (send_part(c, op->part, true, &e) != PW_OK) {
            set_cancel_flags(c);
            finish_error(c, &e);
        }
        goto out;
    }
    if (!err && reply && reply->type == REDIS_REPLY_INTEGER) {
        PW_LOG_WARN("event=queue_full request=%s function=%s backlog=%lld max_queue=%u", c->id,
                    c->model, reply->integer, c->w->rt->cfg.max_queue);
        router_openai_err_unavailable(&e, "the model's request queue is full", QUEUE_FULL_RETRY_S);
        snprintf(e.code, sizeof e.code, "queue_full");
        set_cancel_flags(c); /* parts already queued must not run for nobody */
        finish_error(c, &e);
    } else if (err || !reply || reply->type != REDIS_REPLY_STRING) {
        PW_LOG_ERROR("event=enqueue_failed request=%s err=%s", c->id,
                     reply && reply->type == REDIS_REPLY_ERROR ? reply->str
                                                               : (errstr ? errstr : "?"));
        router_openai_err_unavailable(&e, "the request queue (Redis) is unavailable", 1);
        set_cancel_flags(c);
        finish_error(c, &e);
    } else if (++c->parts_queued == c->n_parts) {
        stream_begin(c);
    }
out:
    free(op);
    call_unref(c);
}

/* Room for a plain XADD: a fresh probe and this router's adds since (each worker counted
 * as adding as many as this one) keep the backlog under half the bound. So one router
 * never passes --max-queue; several can pass it by what the others add within a probe's
 * age, and the script's exact check takes over from half the bound. */
static bool backlog_has_room(const struct router_fn *fn, const struct router *rt)
{
    if (!fn->backlog_ms || pw_clock_mono_ms() - fn->backlog_ms > BACKLOG_MAX_AGE_MS)
        return false;
    uint64_t est = fn->backlog + (uint64_t)fn->adds * rt->n_workers;
    return est * 2 < rt->cfg.max_queue;
}

static void on_probe(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                     const char *errstr, void *ud)
{
    (void)r;
    (void)errstr;
    struct look_ctx *lc = ud;
    struct router_fn *fn = err == PW_ERR_CANCELLED ? NULL : fn_find(lc->w, lc->name);
    if (fn) {
        fn->probing = false;
        /* NOSCRIPT or an error: no fresh probe, so calls take the script (which reloads). */
        if (!err && reply && reply->type == REDIS_REPLY_INTEGER && reply->integer >= 0) {
            fn->backlog = (uint64_t)reply->integer;
            fn->backlog_ms = pw_clock_mono_ms();
            fn->adds = fn->adds > fn->adds_at_send ? fn->adds - fn->adds_at_send : 0;
        }
    }
    free(lc);
}

static void probe_backlog(struct router_worker *w, struct router_fn *fn)
{
    struct router *rt = w->rt;
    char qkey[PW_KEY_MAX];
    if (fn->probing || rt->cfg.max_queue == 0 || pw_key_queue(qkey, sizeof qkey, fn->name))
        return;
    struct look_ctx *lc = malloc(sizeof *lc);
    if (!lc)
        return;
    lc->w = w;
    snprintf(lc->name, sizeof lc->name, "%s", fn->name);
    const char *argv[] = {"EVALSHA",        rt->enqueue_sha, "1", qkey, rt->max_queue_arg,
                          PW_GROUP_ENGINES, PW_STREAM_FIELD, ""};
    if (pw_redis_command_argv(w->redis, 8, argv, NULL, on_probe, lc) == PW_OK) {
        fn->probing = true;
        fn->adds_at_send = fn->adds;
    } else {
        free(lc);
    }
}

static enum pw_err send_part(struct router_call *c, size_t part, bool eval,
                             struct router_openai_error *e)
{
    struct router *rt = c->w->rt;
    char qkey[PW_KEY_MAX];
    if (pw_key_queue(qkey, sizeof qkey, c->model) != PW_OK) {
        router_openai_err_model_not_found(e, c->model);
        return PW_ERR_INVAL;
    }
    uint8_t buf[64 * 1024], *heap = NULL, *data = buf;
    size_t len = 0;
    const char *why = NULL;
    if (pw_proto_pack_request(c->parts[part], buf, sizeof buf, &len, &why) != PW_OK) {
        if (pw_proto_pack_request_alloc(c->parts[part], &heap, &len, &why) != PW_OK) {
            router_openai_err_param(e, NULL, NULL, "request cannot be queued: %s",
                                    why ? why : "too large");
            return PW_ERR_TOOBIG;
        }
        data = heap;
    }
    struct enqueue_op *op = malloc(sizeof *op);
    if (!op) {
        free(heap);
        router_openai_err_internal(e);
        return PW_ERR_NOMEM;
    }
    *op = (struct enqueue_op){c, part, eval};
    enum pw_err pe;
    c->refs++;
    struct router_fn *fn = rt->cfg.max_queue ? fn_find(c->w, c->model) : NULL;
    if (rt->cfg.max_queue == 0 || (!eval && fn && backlog_has_room(fn, rt))) {
        /* Unbounded, or far below the bound: a plain XADD, without the script's cost in
         * Redis (about 3.7 us of its CPU per request; docs/internals/router.md). */
        if (fn)
            fn->adds++;
        const char *argv[] = {"XADD", qkey, "*", PW_STREAM_FIELD, (const char *)data};
        size_t lens[] = {4, strlen(qkey), 1, sizeof PW_STREAM_FIELD - 1, len};
        pe = pw_redis_command_argv(c->w->redis, 5, argv, lens, on_enqueued, op);
    } else {
        const char *script = eval ? ENQUEUE_LUA : rt->enqueue_sha;
        const char *argv[] = {eval ? "EVAL" : "EVALSHA",
                              script,
                              "1",
                              qkey,
                              rt->max_queue_arg,
                              PW_GROUP_ENGINES,
                              PW_STREAM_FIELD,
                              (const char *)data};
        size_t lens[] = {eval ? 4 : 7,
                         eval ? sizeof ENQUEUE_LUA - 1 : 40,
                         1,
                         strlen(qkey),
                         strlen(rt->max_queue_arg),
                         sizeof PW_GROUP_ENGINES - 1,
                         sizeof PW_STREAM_FIELD - 1,
                         len};
        pe = pw_redis_command_argv(c->w->redis, 8, argv, lens, on_enqueued, op);
    }
    free(heap);
    if (pe) {
        c->refs--;
        free(op);
        router_openai_err_unavailable(e, "the request queue (Redis) is unavailable", 1);
    }
    return pe;
}

static void enqueue(struct router_call *c)
{
    struct router_worker *w = c->w;
    struct router_openai_error e;
    struct router_fn *fn = fn_find(w, c->model);
    if (!fn) {
        router_openai_err_model_not_found(&e, c->model);
        finish_error(c, &e);
        return;
    }
    router_openai_resp_from_request(&c->resp, c->parts[0], c->id, c->n_parts,
                                    pw_clock_wall_ms() / 1000);
    c->resp.model = c->model;
    if (c->stream)
        c->st = router_openai_stream_create(&c->resp);
    else
        c->acc = router_openai_acc_create(&c->resp);
    if ((c->stream && !c->st) || (!c->stream && !c->acc)) {
        router_openai_err_internal(&e);
        finish_error(c, &e);
        return;
    }
    table_add(c);
    uint64_t now = pw_clock_mono_ms();
    /* A request no engine starts on within the function's max queue wait fails (cold
     * start too slow, every engine busy); the call's own deadline may come first. */
    if (fn->max_queue_wait_ms && (!c->deadline_ms || now + fn->max_queue_wait_ms < c->deadline_ms))
        c->queue_deadline_ms = now + fn->max_queue_wait_ms;
    arm_timer(c);
    for (size_t i = 0; i < c->n_parts; i++) {
        if (send_part(c, i, false, &e) != PW_OK) {
            set_cancel_flags(c); /* earlier parts may be queued */
            finish_error(c, &e);
            return;
        }
    }
    fn->used_ms = now;
    maybe_wake(w, fn, now);
    PW_LOG_INFO("event=request_queued request=%s x_request_id=%s function=%s key_id=%s parts=%zu "
                "stream=%d",
                c->id, c->req->request_id, c->model, c->key.key_id, c->n_parts, c->stream);
}

static void parse_and_enqueue(struct router_call *c)
{
    struct router_openai_error e;
    memset(&e, 0, sizeof e);
    struct router_openai_ctx ctx = {
        .request_id = c->id,
        .tenant = c->key.tenant,
        .key_id = c->key.key_id,
        .reply_to = c->w->reply_key,
        .now_unix_ms = pw_clock_wall_ms(),
        .default_deadline_ms = c->w->rt->cfg.request_timeout_ms,
        .max_deadline_ms = c->w->rt->cfg.request_timeout_ms,
        .model_check = model_check,
        .model_check_arg = c,
    };
    /* The client's own deadline, in ms from now; --request-timeout-ms caps it. */
    const char *dh = router_http_request_header(c->req, DEADLINE_HEADER);
    if (dh) {
        char *end;
        unsigned long long v = strtoull(dh, &end, 10);
        if (end == dh || *end || dh[0] == '-' || v == 0 || v > DEADLINE_HEADER_MAX_MS) {
            router_openai_err_param(&e, DEADLINE_HEADER, "invalid_value",
                                    "The header %s must be an integer number of milliseconds "
                                    "1..%llu.",
                                    DEADLINE_HEADER, (unsigned long long)DEADLINE_HEADER_MAX_MS);
            finish_error(c, &e);
            return;
        }
        ctx.deadline_ms = (int64_t)v;
        uint64_t cap = c->w->rt->cfg.request_timeout_ms;
        uint64_t d = cap && v > cap ? cap : v;
        c->deadline_ms = pw_clock_mono_ms() + d;
    }
    ctx.seed = rng_next(c->w);
    enum pw_err pe;
    if (c->route == ROUTE_CHAT) {
        Parkway__InferenceRequest *one = NULL;
        pe = router_openai_parse_chat(c->req->body, c->req->body_len, &ctx, &one, &e);
        if (pe == PW_OK) {
            c->parts = calloc(1, sizeof *c->parts);
            if (c->parts) {
                c->parts[0] = one;
                c->n_parts = 1;
            } else {
                pw_proto_free_request(one);
                pe = PW_ERR_NOMEM;
                router_openai_err_internal(&e);
            }
        }
    } else {
        pe = router_openai_parse_completion(c->req->body, c->req->body_len, &ctx, &c->parts,
                                            &c->n_parts, &e);
    }
    if (pe) {
        if (pe == PW_ERR_NOMEM || e.status == 0)
            router_openai_err_internal(&e);
        finish_error(c, &e);
        return;
    }
    snprintf(c->model, sizeof c->model, "%s", c->parts[0]->function);
    c->stream = c->parts[0]->stream;
    enqueue(c);
}

/* The counter key of a key's limit kind ("rl" requests, "tpm" tokens) for this minute. */
static void rate_key(const struct router_call *c, const char *kind, char *out, size_t cap)
{
    /* A record without a key id still gets a counter of its own, never a shared "{}". */
    char id[PW_APIKEY_ID_LEN + 8];
    if (c->key.key_id[0])
        snprintf(id, sizeof id, "%s", c->key.key_id);
    else
        snprintf(id, sizeof id, "key_%.8s", c->key.hash_hex);
    snprintf(out, cap, "pw:%s:{%s}:%" PRId64, kind, id, pw_clock_wall_ms() / 60000);
}

/* One answer of the limiter (INCR of the request counter, GET of the token counter; both
 * on one connection, so they come in order). The last one decides. */
static void rate_answer(struct router_call *c, const redisReply *reply, enum pw_err err, int kind)
{
    /* Rate limiting fails open when Redis answers oddly: the queue write will tell. */
    uint64_t limit = kind == 1 ? c->key.rpm : c->key.tpm;
    uint64_t count = 0;
    if (!err && reply && reply->type == REDIS_REPLY_INTEGER && reply->integer > 0)
        count = (uint64_t)reply->integer;
    else if (!err && reply && reply->type == REDIS_REPLY_STRING)
        count = strtoull(reply->str, NULL, 10);
    /* Requests: this one is counted, so over means more than the limit. Tokens: the minute's
     * finished calls are counted, so a new call waits once the limit is reached. */
    bool over = kind == 1 ? count > limit : count >= limit;
    if (over && !c->limit_refused)
        c->limit_refused = kind;
    if (--c->limit_waits > 0 || c->gone)
        return;
    if (c->limit_refused) {
        struct router_openai_error e;
        int retry = 60 - (int)((pw_clock_wall_ms() / 1000) % 60);
        if (c->limit_refused == 1)
            router_openai_err_rate_limited(&e, "requests", NULL, c->key.rpm, retry);
        else
            router_openai_err_rate_limited(&e, "tokens", NULL, c->key.tpm, retry);
        finish_error(c, &e);
    } else {
        parse_and_enqueue(c);
    }
}

static void on_rate_count(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_call *c = ud;
    rate_answer(c, reply, err, 1);
    call_unref(c);
}

static void on_token_count(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                           const char *errstr, void *ud)
{
    struct router_call *c = ud;
    rate_answer(c, reply, err, 2);
    call_unref(c);
}

static void limit_then_enqueue(struct router_call *c)
{
    if (c->key.rpm == 0 && c->key.tpm == 0) {
        parse_and_enqueue(c);
        return;
    }
    char rl[PW_KEY_MAX + 32], tk[PW_KEY_MAX + 32];
    rate_key(c, "rl", rl, sizeof rl);
    rate_key(c, "tpm", tk, sizeof tk);
    /* Both commands go out before either answer is read (callbacks never run inside
     * pw_redis_command), so limit_waits is final when the first answer comes. */
    bool ok = true;
    c->limit_waits = 0;
    if (c->key.rpm) {
        c->refs++;
        if (pw_redis_command(c->w->redis, on_rate_count, c, "INCR", rl, NULL) == PW_OK) {
            c->limit_waits++;
            /* After the INCR, on the same connection, so it always finds the key: an EXPIRE
             * sent first is a no-op on the minute's first request, and that counter then
             * lives forever. */
            pw_redis_command(c->w->redis, NULL, NULL, "EXPIRE", rl, RATE_COUNTER_TTL_S, NULL);
        } else {
            c->refs--;
            ok = false;
        }
    }
    if (ok && c->key.tpm) {
        c->refs++;
        if (pw_redis_command(c->w->redis, on_token_count, c, "GET", tk, NULL) == PW_OK) {
            c->limit_waits++;
        } else {
            c->refs--;
            ok = false;
        }
    }
    if (!ok) {
        /* An answer already asked for finds the call gone and decides nothing. */
        struct router_openai_error e;
        router_openai_err_unavailable(&e, "the rate limiter (Redis) is unavailable", 1);
        finish_error(c, &e);
    }
}

/* Adds a finished call's tokens to its key's minute (TPM); at most one command per call. */
static void count_tokens(struct router_call *c)
{
    if (!c->key.tpm || !c->tokens)
        return;
    char tk[PW_KEY_MAX + 32], n[24];
    rate_key(c, "tpm", tk, sizeof tk);
    snprintf(n, sizeof n, "%" PRIu64, c->tokens);
    pw_redis_command(c->w->redis, NULL, NULL, "INCRBY", tk, n, NULL);
    pw_redis_command(c->w->redis, NULL, NULL, "EXPIRE", tk, RATE_COUNTER_TTL_S, NULL);
    c->tokens = 0;
}

static void list_models(struct router_call *c)
{
    struct router_worker *w = c->w;
    struct router_openai_model *ms = calloc(w->n_fns + 1, sizeof *ms);
    size_t n = 0;
    char *body = NULL;
    size_t len = 0;
    struct router_openai_error e;
    for (size_t i = 0; ms && i < w->n_fns; i++) {
        if (!key_allows(&c->key, w->fns[i].name))
            continue;
        if (c->route == ROUTE_MODEL && strcmp(c->model, w->fns[i].name) != 0)
            continue;
        ms[n++] = (struct router_openai_model){w->fns[i].name, w->functions_created, "parkway"};
    }
    enum pw_err pe;
    if (c->route == ROUTE_MODEL) {
        if (n == 0) {
            router_openai_err_model_not_found(&e, c->model);
            free(ms);
            finish_error(c, &e);
            return;
        }
        pe = router_openai_model_json(&ms[0], &body, &len);
    } else {
        pe = router_openai_models_json(ms, n, &body, &len);
    }
    free(ms);
    if (pe) {
        router_openai_err_internal(&e);
        finish_error(c, &e);
        return;
    }
    respond_json(c, 200, body, len);
    free(body);
}

/* After authentication. */
static void continue_call(struct router_call *c)
{
    struct router_openai_error e;
    if (c->key.missing || c->key.disabled) {
        router_openai_err_bad_key(&e);
        finish_error(c, &e);
        return;
    }
    if (c->route == ROUTE_BATCH_API) {
        /* router_batch answers (and checks the method) itself; the call ends here. */
        router_http_request_set_cancel(c->req, NULL, NULL);
        router_batch_api_handle(c->w, c->req, &c->key);
        call_end(c);
        return;
    }
    if (c->route == ROUTE_MODELS || c->route == ROUTE_MODEL)
        list_models(c);
    else
        limit_then_enqueue(c);
}

/* ---- replies: each worker reads its own stream, pw:reply:{router_id}:{index} ---------- */

#define REPLY_READ_COUNT "512"
#define REPLY_BLOCK_MS "1000"
#define REPLY_STALL_MS 5000    /* an XREAD unanswered this long: its connection is dead */
#define REPLY_RETRY_MS 100     /* pause after a failed XREAD (the client reconnects itself) */
#define REPLY_TRIM_MS 100      /* XTRIM what was read at most this often ... */
#define REPLY_TRIM_ENTRIES 256 /* ... unless this many entries wait for it */

static void observe_tokens(struct router_call *c, const Parkway__ReplyChunk *ch)
{
    struct router *rt = c->w->rt;
    const char *labels[] = {c->model};
    uint64_t now = pw_clock_mono_ns();
    if (!c->queue_observed && ch->queue_ms) {
        pw_metric_histogram_observe(rt->m_queue, labels, ch->queue_ms / 1000.0);
        c->queue_observed = true;
    }
    if (ch->text && ch->text[0]) {
        if (!c->first_token_ns) {
            c->first_token_ns = now;
            pw_metric_histogram_observe(rt->m_ttft, labels, (double)(now - c->start_ns) / 1e9);
        } else {
            pw_metric_histogram_observe(rt->m_itl, labels, (double)(now - c->last_token_ns) / 1e9);
        }
        c->last_token_ns = now;
    }
}

static void finish_ok(struct router_call *c, int status)
{
    const char *labels[] = {c->model};
    pw_metric_histogram_observe(c->w->rt->m_e2e, labels,
                                (double)(pw_clock_mono_ns() - c->start_ns) / 1e9);
    count_request(c, status);
    call_end(c);
}

/* One ReplyChunk read from the worker's reply stream (data borrowed for the call). */
static void deliver_chunk(struct router_worker *w, const void *data, size_t len)
{
    Parkway__ReplyChunk *ch = NULL;
    if (pw_proto_unpack_reply(data, len, 0, &ch) != PW_OK)
        return;
    /* "<call id>" or "<call id>.<part>" */
    char base[sizeof((struct router_call *)0)->id];
    const char *dot = strchr(ch->request_id, '.');
    size_t blen = dot ? (size_t)(dot - ch->request_id) : strlen(ch->request_id);
    if (blen >= sizeof base)
        goto out; /* not one of ours */
    memcpy(base, ch->request_id, blen);
    base[blen] = '\0';
    struct router_call *c = table_find(w, base);
    if (!c || c->gone || !c->req)
        goto out; /* finished, client gone, or a leftover of an earlier process */
    if (c->queue_deadline_ms) {
        /* An engine took it: only the call's own deadline is left. */
        c->queue_deadline_ms = 0;
        arm_timer(c);
    }
    /* A part's final usage counts once toward the key's tokens per minute. */
    unsigned part = dot ? (unsigned)strtoul(dot + 1, NULL, 10) : 0;
    if (ch->done && ch->usage && part < c->n_parts && part < 64 &&
        !(c->parts_done & (1ull << part))) {
        c->parts_done |= 1ull << part;
        c->tokens += (uint64_t)ch->usage->prompt_tokens + ch->usage->completion_tokens;
    }
    stream_begin(c); /* a chunk may overtake the queue write's answer */
    observe_tokens(c, ch);
    bool finished = false;
    if (c->stream) {
        struct router_sse_buf buf;
        router_sse_buf_init(&buf);
        if (router_openai_stream_feed(c->st, ch, &buf, &finished) == PW_OK && buf.len) {
            pw_metric_counter_add(c->w->rt->m_bytes_out, NULL, (double)buf.len);
            router_http_stream_write(c->req, buf.data, buf.len);
            c->last_write_ms = pw_clock_mono_ms();
        }
        router_sse_buf_deinit(&buf);
        if (finished) {
            router_http_stream_end(c->req);
            finish_ok(c, 200);
        }
    } else {
        if (router_openai_acc_add(c->acc, ch, &finished) == PW_OK && finished) {
            char *body = NULL;
            size_t blen2 = 0;
            int status = 500;
            if (router_openai_acc_render(c->acc, &body, &blen2, &status) == PW_OK) {
                struct router_http_field hdr[] = {{"content-type", "application/json"}};
                pw_metric_counter_add(c->w->rt->m_bytes_out, NULL, (double)blen2);
                router_http_respond(c->req, status, hdr, 1, body, blen2);
                free(body);
                finish_ok(c, status);
            } else {
                struct router_openai_error e;
                router_openai_err_internal(&e);
                finish_error(c, &e);
            }
        }
    }
out:
    pw_proto_free_reply(ch);
}

static bool is_str(const redisReply *r)
{
    return r && r->type == REDIS_REPLY_STRING;
}

/* The entries of an XREAD reply for one stream, [[key, [entry, ...]]]; NULL for nil (the
 * BLOCK ran out) or any other shape. */
static const redisReply *read_entries(const redisReply *reply)
{
    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 1)
        return NULL;
    const redisReply *s = reply->element[0];
    if (!s || s->type != REDIS_REPLY_ARRAY || s->elements != 2)
        return NULL;
    const redisReply *es = s->element[1];
    return es && es->type == REDIS_REPLY_ARRAY ? es : NULL;
}

static void reply_read(struct router_worker *w);

/* XTRIM of what the reader has passed: the entries before reply_last (the last one stays,
 * which costs nothing). On the reply connection it goes out in the same write as the next
 * XREAD; from the tick, on the command connection (an XREAD may be blocking the other). */
static void reply_trim(struct router_worker *w, struct pw_redis *r, uint64_t now)
{
    w->untrimmed = 0;
    w->trimmed_ms = now;
    pw_redis_command(r, NULL, NULL, "XTRIM", w->reply_key, "MINID", w->reply_last, NULL);
}

static void on_reply_read(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_worker *w = ud;
    w->reading = false;
    if (err == PW_ERR_CANCELLED || w->rt->stopping)
        return; /* the client is being destroyed: no new command */
    if (err || !reply) {
        /* Not connected, connection lost before the answer, or an error reply: nothing was
         * consumed, so the next XREAD from the same id loses nothing. */
        if (!w->reply_failing)
            PW_LOG_WARN("event=reply_read_failed worker=%u err=%s", w->index,
                        errstr ? errstr : "?");
        w->reply_failing = true;
        struct timeval tv = {0, REPLY_RETRY_MS * 1000};
        evtimer_add(w->reply_retry, &tv);
        return;
    }
    if (w->reply_failing)
        PW_LOG_INFO("event=reply_read_resumed worker=%u", w->index);
    w->reply_failing = false;
    const redisReply *es = read_entries(reply);
    for (size_t i = 0; es && i < es->elements; i++) {
        const redisReply *e = es->element[i];
        if (!e || e->type != REDIS_REPLY_ARRAY || e->elements != 2 || !is_str(e->element[0]) ||
            e->element[0]->len >= sizeof w->reply_last)
            continue;
        memcpy(w->reply_last, e->element[0]->str, e->element[0]->len + 1);
        w->untrimmed++;
        const redisReply *f = e->element[1];
        if (!f || f->type != REDIS_REPLY_ARRAY)
            continue;
        for (size_t k = 0; k + 1 < f->elements; k += 2)
            if (is_str(f->element[k]) && is_str(f->element[k + 1]) &&
                f->element[k]->len == sizeof PW_STREAM_FIELD - 1 &&
                memcmp(f->element[k]->str, PW_STREAM_FIELD, sizeof PW_STREAM_FIELD - 1) == 0) {
                deliver_chunk(w, f->element[k + 1]->str, f->element[k + 1]->len);
                break;
            }
    }
    reply_read(w);
}

/* Sends the next XREAD, unless one is in flight. */
static void reply_read(struct router_worker *w)
{
    if (w->reading || !w->reply_redis || w->rt->stopping)
        return;
    uint64_t now = pw_clock_mono_ms();
    if (w->untrimmed &&
        (w->untrimmed >= REPLY_TRIM_ENTRIES || now - w->trimmed_ms >= REPLY_TRIM_MS))
        reply_trim(w, w->reply_redis, now);
    const char *argv[] = {"XREAD",        "COUNT",   REPLY_READ_COUNT, "BLOCK",
                          REPLY_BLOCK_MS, "STREAMS", w->reply_key,     w->reply_last};
    if (pw_redis_command_argv(w->reply_redis, 8, argv, NULL, on_reply_read, w) != PW_OK) {
        struct timeval tv = {0, REPLY_RETRY_MS * 1000};
        evtimer_add(w->reply_retry, &tv);
        return;
    }
    w->reading = true;
    w->read_sent_ms = now;
}

static void on_reply_retry(evutil_socket_t fd, short what, void *arg)
{
    reply_read(arg);
}

static enum pw_err reply_client_create(struct router_worker *w, char *err, size_t errcap)
{
    struct pw_redis_opts ro = {.name = "router-reply"};
    return pw_redis_create(w->base, w->rt->cfg.redis_url, &ro, &w->reply_redis, err, errcap);
}

/* From the tick: trims a quiet stream, and replaces a reply client whose XREAD went
 * unanswered far past its BLOCK (a dead link the kernel has not noticed yet). */
static void reply_check(struct router_worker *w, uint64_t now)
{
    if (w->untrimmed && now - w->trimmed_ms >= REPLY_TRIM_MS)
        reply_trim(w, w->redis, now);
    if (w->reply_redis) {
        if (!w->reading || now - w->read_sent_ms < REPLY_STALL_MS)
            return;
        PW_LOG_WARN("event=reply_read_stalled worker=%u ms=%" PRIu64, w->index,
                    now - w->read_sent_ms);
        pw_redis_destroy(w->reply_redis); /* its XREAD's callback gets PW_ERR_CANCELLED */
        w->reply_redis = NULL;
        w->reading = false;
    }
    char err[256];
    if (reply_client_create(w, err, sizeof err) != PW_OK) {
        PW_LOG_ERROR("event=reply_client_failed worker=%u err=%s", w->index, err);
        return; /* the next tick tries again (reply_redis NULL) */
    }
    reply_read(w);
}

/* ---- ticks: deadlines, keep-alives, snapshots --------------------------------------- */

static void call_deadline(struct router_call *c)
{
    PW_LOG_WARN("event=deadline request=%s", c->id);
    struct router_openai_error e;
    router_openai_err_deadline(&e);
    set_cancel_flags(c);
    finish_error(c, &e);
}

/* No chunk within the function's max queue wait: no engine started on the request (a cold
 * start that takes too long, or every engine busy). Nothing ran, so a retry is safe: 503
 * with Retry-After (the OpenAI SDKs retry it), not the 504 of a deadline. */
static void call_queue_wait(struct router_call *c)
{
    const struct router_fn *fn = fn_find(c->w, c->model);
    PW_LOG_WARN("event=queue_wait_exceeded request=%s function=%s max_queue_wait_ms=%" PRIu64,
                c->id, c->model, fn ? fn->max_queue_wait_ms : 0);
    struct router_openai_error e;
    router_openai_err_unavailable(&e,
                                  "no engine took the request within the model's max queue "
                                  "wait",
                                  QUEUE_WAIT_RETRY_S);
    snprintf(e.code, sizeof e.code, "queue_wait_exceeded");
    set_cancel_flags(c);
    finish_error(c, &e);
}

/* Ends the call if its queue deadline or deadline passed; true if it did. */
static bool call_check_time(struct router_call *c, uint64_t now)
{
    if (!c->req)
        return false;
    if (c->queue_deadline_ms && now >= c->queue_deadline_ms) {
        call_queue_wait(c);
        return true;
    }
    if (c->deadline_ms && now >= c->deadline_ms) {
        call_deadline(c);
        return true;
    }
    return false;
}

/* The call's own timer: a deadline is met to the millisecond, not at the next 1 s tick
 * (which stays as a backstop). The timer holds no reference: call_unref frees it. */
static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    struct router_call *c = arg;
    if (c->req && !call_check_time(c, pw_clock_mono_ms()))
        arm_timer(c); /* woke a little early */
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct router_worker *w = arg;
    uint64_t now = pw_clock_mono_ms();
    static const uint64_t refresh_every = FUNCTIONS_REFRESH_MS / 1000;
    if (refresh_every == 0 || (now / 1000) % refresh_every == 0 || w->n_fns == 0)
        refresh_functions(w);
    /* Engines of the functions in use, so a call knows whether to wake the scaler. */
    for (size_t i = 0; i < w->n_fns; i++)
        if (w->fns[i].used_ms && now - w->fns[i].used_ms < FN_ACTIVE_MS) {
            look_workers(w, &w->fns[i]);
            probe_backlog(w, &w->fns[i]);
        }
    for (unsigned b = 0; b < ROUTER_CALLS_BUCKETS; b++) {
        struct router_call *c = w->calls[b];
        while (c) {
            struct router_call *next = c->next;
            if (call_check_time(c, now) || !c->req) {
                c = next;
                continue;
            }
            if (!c->deadline_ev || !evtimer_pending(c->deadline_ev, NULL))
                arm_timer(c); /* its time may have come within the horizon */
            if (c->stream_started && now - c->last_write_ms >= KEEPALIVE_MS) {
                /* Proxies and clients time out an idle response: while the call waits for
                 * an engine (cold start, queue) or a first token, say it is alive. */
                struct router_sse_buf buf;
                router_sse_buf_init(&buf);
                if (router_sse_comment(&buf, "keep-alive") == PW_OK)
                    router_http_stream_write(c->req, buf.data, buf.len);
                router_sse_buf_deinit(&buf);
                c->last_write_ms = now;
            }
            c = next;
        }
    }
    reply_check(w, now);
}

/* ---- entry points ------------------------------------------------------------------ */

static bool path_is(const struct router_http_request *req, const char *p)
{
    return req->path_len == strlen(p) && memcmp(req->path, p, req->path_len) == 0;
}

static void handle_metrics(struct router *rt, struct router_http_request *req)
{
    const char *auth = router_http_request_header(req, "authorization");
    const char *key;
    size_t len;
    if (!rt->cfg.admin_key || !auth || pw_apikey_parse_bearer(auth, strlen(auth), &key, &len) ||
        len != strlen(rt->cfg.admin_key) || !pw_ct_equal(key, rt->cfg.admin_key, len)) {
        router_http_respond_error(req, 401, "invalid_request_error", "invalid_api_key",
                                  "/metrics needs the admin key (--admin-key) as a Bearer token");
        return;
    }
    char *text = NULL;
    size_t n = 0;
    if (pw_metrics_render(rt->metrics, &text, &n) != PW_OK) {
        router_http_respond_error(req, 500, "server_error", NULL, "cannot render metrics");
        return;
    }
    struct router_http_field hdr[] = {{"content-type", "text/plain; version=0.0.4"}};
    router_http_respond(req, 200, hdr, 1, text, n);
    free(text);
}

void router_handle(struct router_http_request *req, void *ud)
{
    struct router *rt = ud;
    struct router_worker *w = &rt->workers[req->worker];
    /* HEAD is GET without the body (the HTTP layer leaves the body out). */
    bool get = strcmp(req->method, "GET") == 0 || strcmp(req->method, "HEAD") == 0;
    bool post = strcmp(req->method, "POST") == 0;
    pw_metric_counter_add(rt->m_bytes_in, NULL, (double)req->body_len);

    if (path_is(req, "/healthz") && get) {
        static const char ok[] = "{\"status\":\"ok\"}";
        struct router_http_field hdr[] = {{"content-type", "application/json"}};
        router_http_respond(req, 200, hdr, 1, ok, sizeof ok - 1);
        return;
    }
    if (path_is(req, "/readyz") && get) {
        if (pw_redis_is_connected(w->redis)) {
            static const char ok[] = "{\"status\":\"ready\"}";
            struct router_http_field hdr[] = {{"content-type", "application/json"}};
            router_http_respond(req, 200, hdr, 1, ok, sizeof ok - 1);
        } else {
            router_http_respond_error(req, 503, "server_error", "redis_unavailable",
                                      "Redis is not reachable");
        }
        return;
    }
    if (path_is(req, "/metrics") && get) {
        handle_metrics(rt, req);
        return;
    }
    if (!get && (path_is(req, "/healthz") || path_is(req, "/readyz") || path_is(req, "/metrics"))) {
        router_http_respond_error(req, 405, "invalid_request_error", "method_not_allowed",
                                  "Only GET and HEAD are allowed here.");
        return;
    }

    struct router_call *c = calloc(1, sizeof *c);
    if (!c) {
        router_http_respond_error(req, 500, "server_error", NULL, "out of memory");
        return;
    }
    c->w = w;
    c->req = req;
    c->refs = 1;
    c->start_ns = req->start_ns;
    c->deadline_ms =
        rt->cfg.request_timeout_ms ? pw_clock_mono_ms() + rt->cfg.request_timeout_ms : 0;
    call_make_id(c->id, w->index, rng_next(w));
    router_http_request_set_cancel(req, on_client_gone, c);

    struct router_openai_error e;
    static const char models_prefix[] = "/v1/models/";
    if (path_is(req, "/v1/chat/completions")) {
        c->route = ROUTE_CHAT;
        c->route_label = "/v1/chat/completions";
    } else if (path_is(req, "/v1/completions")) {
        c->route = ROUTE_COMPLETIONS;
        c->route_label = "/v1/completions";
    } else if (path_is(req, "/v1/models")) {
        c->route = ROUTE_MODELS;
        c->route_label = "/v1/models";
    } else if (req->path_len > sizeof models_prefix - 1 && req->path_len < sizeof c->model &&
               memcmp(req->path, models_prefix, sizeof models_prefix - 1) == 0) {
        c->route = ROUTE_MODEL;
        c->route_label = "/v1/models/{id}";
        size_t n = req->path_len - (sizeof models_prefix - 1);
        memcpy(c->model, req->path + sizeof models_prefix - 1, n);
        c->model[n] = '\0';
    } else if (router_batch_api_route(req)) {
        c->route = ROUTE_BATCH_API;
        c->route_label = req->path[4] == 'f' ? "/v1/files" : "/v1/batches";
    } else {
        c->route_label = "other";
        router_openai_err_unknown_route(&e, req->method, req->path);
        finish_error(c, &e);
        return;
    }
    bool want_post = c->route == ROUTE_CHAT || c->route == ROUTE_COMPLETIONS;
    if (c->route != ROUTE_BATCH_API && ((want_post && !post) || (!want_post && !get))) {
        router_openai_err_method(&e, req->method, req->path);
        finish_error(c, &e);
        return;
    }
    if (!pw_redis_is_connected(w->redis)) {
        router_openai_err_unavailable(&e, "Redis is not reachable", 1);
        finish_error(c, &e);
        return;
    }
    if (authenticate(c))
        continue_call(c);
}

/* Frees the workers and their Redis clients; leaves rt->workers NULL. */
static void workers_free(struct router *rt)
{
    for (unsigned i = 0; rt->workers && i < rt->n_workers; i++) {
        struct router_worker *w = &rt->workers[i];
        if (w->tick)
            event_free(w->tick);
        pw_redis_destroy(w->reply_redis); /* an XREAD in flight is cancelled: no new one */
        if (w->reply_retry)
            event_free(w->reply_retry);
        pw_redis_destroy(w->redis);
        fns_free(w->fns, w->n_fns);
        w->fns = NULL;
        w->n_fns = 0;
        for (size_t k = 0; k < ROUTER_KEY_CACHE; k++)
            key_clear(&w->keys[k]);
    }
    free(rt->workers);
    rt->workers = NULL;
}

enum pw_err router_start(struct router *rt, char *err, size_t errcap)
{
    rt->started_unix_s = pw_clock_wall_ms() / 1000;
    char probe[PW_KEY_MAX];
    if (pw_key_reply_worker(probe, sizeof probe, rt->router_id, 0) != PW_OK) {
        snprintf(err, errcap, "router id %s: use 1-128 of [A-Za-z0-9._-]", rt->router_id);
        return PW_ERR_CONFIG;
    }
    /* EVALSHA names the script by its SHA-1, as Redis computes it. */
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned md_len = 0;
    if (!EVP_Digest(ENQUEUE_LUA, sizeof ENQUEUE_LUA - 1, md, &md_len, EVP_sha1(), NULL) ||
        md_len != 20) {
        snprintf(err, errcap, "cannot hash the enqueue script");
        return PW_ERR_INTERNAL;
    }
    pw_hex_encode(md, md_len, rt->enqueue_sha);
    snprintf(rt->max_queue_arg, sizeof rt->max_queue_arg, "%u", rt->cfg.max_queue);
    rt->metrics = pw_metrics_create();
    if (!rt->metrics)
        return PW_ERR_NOMEM;
    const char *rsf[] = {"route", "status", "function"}, *fn[] = {"function"};
    enum pw_err e;
    if ((e = pw_metrics_counter(rt->metrics, "parkway_router_requests_total",
                                "API requests by route, status and function", 3, rsf,
                                &rt->m_requests)) ||
        (e = pw_metrics_histogram(rt->metrics, "parkway_router_time_to_first_token_seconds",
                                  "request start to first token", 1, fn, NULL, 0, &rt->m_ttft)) ||
        (e = pw_metrics_histogram(rt->metrics, "parkway_router_inter_token_seconds",
                                  "time between streamed tokens", 1, fn, NULL, 0, &rt->m_itl)) ||
        (e = pw_metrics_histogram(rt->metrics, "parkway_router_request_seconds",
                                  "request start to last byte", 1, fn, NULL, 0, &rt->m_e2e)) ||
        (e = pw_metrics_histogram(rt->metrics, "parkway_router_queue_wait_seconds",
                                  "time a request waited in the queue for an engine", 1, fn, NULL,
                                  0, &rt->m_queue)) ||
        (e = pw_metrics_gauge(rt->metrics, "parkway_router_in_flight", "calls in flight", 0, NULL,
                              &rt->m_inflight)) ||
        (e = pw_metrics_counter(rt->metrics, "parkway_router_request_bytes_total",
                                "request body bytes", 0, NULL, &rt->m_bytes_in)) ||
        (e = pw_metrics_counter(rt->metrics, "parkway_router_response_bytes_total",
                                "response body bytes", 0, NULL, &rt->m_bytes_out))) {
        snprintf(err, errcap, "metrics: %s", pw_err_desc(e));
        return e;
    }
    rt->n_workers = router_http_server_threads(rt->http);
    if (rt->n_workers > 256) {
        snprintf(err, errcap, "at most 256 threads");
        return PW_ERR_CONFIG;
    }
    rt->workers = calloc(rt->n_workers, sizeof *rt->workers);
    if (!rt->workers)
        return PW_ERR_NOMEM;
    for (unsigned i = 0; i < rt->n_workers; i++) {
        struct router_worker *w = &rt->workers[i];
        w->rt = rt;
        w->index = i;
        w->base = router_http_server_base(rt->http, i);
        w->rng = seed_rng(i);
        /* Replies for this worker's calls come back on a stream of its own, read on its
         * own loop from the start ("0-0", not "$": an entry XADDed before the first XREAD
         * must not be skipped; a leftover of an earlier process finds no call and is
         * trimmed). */
        snprintf(w->reply_last, sizeof w->reply_last, "0-0");
        w->trimmed_ms = pw_clock_mono_ms();
        if ((e = pw_key_reply_worker(w->reply_key, sizeof w->reply_key, rt->router_id, i))) {
            snprintf(err, errcap, "router id %s: too long", rt->router_id);
            goto fail;
        }
        struct pw_redis_opts ro = {.name = "router"};
        if ((e = pw_redis_create(w->base, rt->cfg.redis_url, &ro, &w->redis, err, errcap)) ||
            (e = reply_client_create(w, err, errcap)))
            goto fail;
        pw_redis_subscribe(w->redis, REVOKE_CHANNEL, on_key_revoked, w);
        refresh_functions(w);
        w->tick = event_new(w->base, -1, EV_PERSIST, on_tick, w);
        w->reply_retry = evtimer_new(w->base, on_reply_retry, w);
        struct timeval tv = {1, 0};
        if (!w->tick || !w->reply_retry || event_add(w->tick, &tv) != 0) {
            e = PW_ERR_NOMEM;
            goto fail;
        }
        reply_read(w); /* waits in the client's queue until it has connected */
    }
    return PW_OK;
fail:
    workers_free(rt);
    return e;
}

void router_stop(struct router *rt)
{
    rt->stopping = 1;
    workers_free(rt);
    pw_metrics_destroy(rt->metrics);
    rt->metrics = NULL;
}

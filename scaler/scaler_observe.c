/*
 * scaler_observe: one observation round per function and tick, on the async Redis client.
 *
 * Round = five pipelined commands, then (when entries wait) one XRANGE:
 *   XINFO GROUPS pw:{fn}:q    group "engines": pending, lag, last-delivered-id
 *   XINFO STREAM pw:{fn}:q    last-generated-id: arrival time of the newest request
 *   XPENDING pw:{fn}:q engines  summary: pending entries per consumer (= per replica)
 *   HGETALL pw:{fn}:workers   engine heartbeats
 *   XINFO GROUPS pw:{fn}:b    batch lane lag
 * then, for each lane with entries waiting (phase 2, the two in parallel):
 *   XRANGE pw:{fn}:q (last-delivered + COUNT 100: the oldest waiting entry's age (and the
 *                             lag, when Redis cannot compute it after deletions), and the
 *                             queued prompt tokens, estimated from these entries
 *   XRANGE pw:{fn}:b (last-delivered + COUNT 100: the oldest waiting batch entry's age, the
 *                             earliest deadline among them (the batch's completion window)
 *                             and the tokens the waiting batch work needs, estimated
 * Entries are packed InferenceRequest messages in field "m" (runtime/pw_proto.h). Token
 * estimates: prompt = characters / 4 (+ token ids), output = max_tokens or
 * OBS_OUTPUT_TOKENS; over a sample of 100 entries, scaled to the lane's lag.
 * Stream ids are "<ms>-<seq>" from the Redis server's wall clock: the entry's arrival.
 * A failed reply (Redis down) abandons the round; the next tick tries again, and the
 * replicas keep their state meanwhile. Loop thread only.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pw_log.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "scaler.h"

/* Output tokens assumed for a request without max_tokens. */
#define OBS_OUTPUT_TOKENS 256
/* Entries sampled per lane for ages, deadlines and token estimates. */
#define OBS_SAMPLE "100"

static int64_t id_ms(const char *id)
{
    return id ? (int64_t)strtoll(id, NULL, 10) : 0;
}

static void round_step(struct scaler_fn *fn);

/* Field value of a flat [k, v, k, v, ...] array reply, or NULL. */
static const redisReply *flat_get(const redisReply *arr, const char *key)
{
    if (!arr || arr->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < arr->elements; i += 2) {
        const redisReply *k = arr->element[i];
        if ((k->type == REDIS_REPLY_STRING || k->type == REDIS_REPLY_STATUS) &&
            strcmp(k->str, key) == 0)
            return arr->element[i + 1];
    }
    return NULL;
}

static uint64_t int_of(const redisReply *r, bool *nil)
{
    if (nil)
        *nil = !r || r->type == REDIS_REPLY_NIL;
    if (!r)
        return 0;
    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer > 0 ? (uint64_t)r->integer : 0;
    if (r->type == REDIS_REPLY_STRING)
        return strtoull(r->str, NULL, 10);
    return 0;
}

static bool failed(struct scaler_fn *fn, enum pw_err err, const char *errstr, const char *op)
{
    if (err == PW_OK)
        return false;
    /* "no such key" before the first XADD is normal; treat as empty. */
    if (errstr && strstr(errstr, "no such key"))
        return false;
    if (!fn->obs_failed)
        PW_LOG_WARN("event=observe_failed function=%s op=%s err=%s", fn->spec->name, op,
                    errstr ? errstr : pw_err_name(err));
    fn->obs_failed = true;
    return true;
}

/* XINFO GROUPS for q (lane 0) or b (lane 1). */
static void parse_groups(struct scaler_fn *fn, const redisReply *reply, int lane, uint64_t length)
{
    (void)length;
    const redisReply *g = NULL;
    for (size_t i = 0; reply && reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++) {
        const redisReply *name = flat_get(reply->element[i], "name");
        if (name && name->type == REDIS_REPLY_STRING && strcmp(name->str, PW_GROUP_ENGINES) == 0)
            g = reply->element[i];
    }
    struct scaler_fn_obs *o = &fn->obs;
    if (!g)
        return; /* no group yet: registration creates it; nothing delivered */
    bool lag_nil = false;
    uint64_t lag = int_of(flat_get(g, "lag"), &lag_nil);
    uint64_t pending = int_of(flat_get(g, "pending"), NULL);
    const redisReply *ld = flat_get(g, "last-delivered-id");
    const char *last = ld && ld->type == REDIS_REPLY_STRING ? ld->str : "0-0";
    if (lane == 0) {
        o->q_lag = lag;
        o->q_lag_unknown = lag_nil;
        o->q_pending = pending;
        snprintf(o->q_last_delivered, sizeof o->q_last_delivered, "%s", last);
    } else {
        o->b_lag = lag;
        o->b_lag_unknown = lag_nil;
        o->b_pending = pending;
        snprintf(o->b_last_delivered, sizeof o->b_last_delivered, "%s", last);
    }
}

static void on_groups_q(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                        const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "XINFO GROUPS") && reply)
        parse_groups(fn, reply, 0, 0);
    round_step(fn);
}

static void on_groups_b(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                        const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "XINFO GROUPS") && reply)
        parse_groups(fn, reply, 1, 0);
    round_step(fn);
}

static void on_stream(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                      const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "XINFO STREAM") && reply) {
        const redisReply *last = flat_get(reply, "last-generated-id");
        if (last && last->type == REDIS_REPLY_STRING)
            fn->obs.q_last_id_ms = id_ms(last->str);
    }
    round_step(fn);
}

/* XPENDING summary: [count, min, max, [[consumer, "n"], ...]]. */
static void on_pending(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                       const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "XPENDING") && reply && reply->type == REDIS_REPLY_ARRAY &&
        reply->elements == 4 && reply->element[3]->type == REDIS_REPLY_ARRAY) {
        const redisReply *cs = reply->element[3];
        /* Same shape as a flat hash: reuse the entries type for (consumer, count). */
        size_t n = cs->elements < 4096 ? cs->elements : 4096;
        size_t bytes = sizeof(struct pw_stream_entries) + sizeof(struct pw_stream_entry) +
                       n * sizeof(struct pw_stream_field);
        for (size_t i = 0; i < n; i++) {
            const redisReply *c = cs->element[i];
            if (c->type == REDIS_REPLY_ARRAY && c->elements == 2)
                bytes += c->element[0]->len + c->element[1]->len + 2;
        }
        struct pw_stream_entries *e = calloc(1, bytes);
        if (e) {
            e->n = 1;
            e->v = (struct pw_stream_entry *)(e + 1);
            e->v[0].fields = (struct pw_stream_field *)(e->v + 1);
            char *p = (char *)(e->v[0].fields + n);
            for (size_t i = 0; i < n; i++) {
                const redisReply *c = cs->element[i];
                if (c->type != REDIS_REPLY_ARRAY || c->elements != 2 ||
                    c->element[0]->type != REDIS_REPLY_STRING ||
                    c->element[1]->type != REDIS_REPLY_STRING)
                    continue;
                struct pw_stream_field *f = &e->v[0].fields[e->v[0].n_fields++];
                memcpy(p, c->element[0]->str, c->element[0]->len + 1);
                f->name = (struct pw_slice){p, c->element[0]->len};
                p += c->element[0]->len + 1;
                memcpy(p, c->element[1]->str, c->element[1]->len + 1);
                f->value = (struct pw_slice){p, c->element[1]->len};
                p += c->element[1]->len + 1;
            }
            pw_stream_entries_free(fn->obs.consumers);
            fn->obs.consumers = e;
        }
    }
    round_step(fn);
}

static void on_workers(struct pw_redis *r, struct pw_stream_entries *entries, enum pw_err err,
                       const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "HGETALL")) {
        pw_stream_entries_free(fn->obs.workers);
        fn->obs.workers = entries;
    } else {
        pw_stream_entries_free(entries);
    }
    round_step(fn);
}

/* Estimated prompt and output tokens of one queued entry; false if it does not decode. */
static bool entry_tokens(const struct pw_stream_entry *e, uint64_t *prompt, uint64_t *output,
                         int64_t *deadline_ms)
{
    const struct pw_slice *m = pw_stream_entry_get(e, "m");
    Parkway__InferenceRequest *req = NULL;
    if (!m || pw_proto_unpack_request(m->ptr, m->len, 0, &req) != PW_OK)
        return false;
    uint64_t chars = strlen(req->prompt ? req->prompt : "");
    for (size_t i = 0; i < req->n_messages; i++)
        if (req->messages[i] && req->messages[i]->content)
            chars += strlen(req->messages[i]->content);
    *prompt = chars / 4 + req->n_prompt_token_ids + 1;
    *output =
        pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS)
            ? req->sampling->max_tokens
            : OBS_OUTPUT_TOKENS;
    *deadline_ms = req->deadline_unix_ms;
    pw_proto_free_request(req);
    return true;
}

/* Sums over the sampled entries, scaled to `lag` entries. */
static uint64_t scale_to(uint64_t sum, size_t sampled, uint64_t lag)
{
    if (sampled == 0)
        return 0;
    if (lag <= sampled)
        return sum;
    return (uint64_t)((double)sum * (double)lag / (double)sampled);
}

static void on_oldest(struct pw_redis *r, struct pw_stream_entries *entries, enum pw_err err,
                      const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    if (!failed(fn, err, errstr, "XRANGE") && entries) {
        if (entries->n > 0)
            fn->obs.q_oldest_ms = id_ms(entries->v[0].id);
        if (fn->obs.q_lag_unknown)
            fn->obs.q_lag = entries->n;
        uint64_t sum = 0, p, o;
        int64_t dl;
        size_t ok = 0;
        for (size_t i = 0; i < entries->n; i++)
            if (entry_tokens(&entries->v[i], &p, &o, &dl)) {
                sum += p;
                ok++;
            }
        fn->obs.q_prompt_tokens = scale_to(sum, ok, fn->obs.q_lag);
    }
    pw_stream_entries_free(entries);
    round_step(fn);
}

/* XRANGE key (after COUNT n, parsed as a range. */
static void on_range_reply(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                           const char *errstr, void *ud)
{
    struct pw_stream_entries *e = NULL;
    if (err == PW_OK && pw_stream_parse_range(reply, &e) != PW_OK) {
        err = PW_ERR_PROTO;
        errstr = "bad XRANGE reply";
    }
    on_oldest(r, e, err, errstr, ud);
}

/* The batch lane's waiting entries: oldest age, earliest deadline, work tokens. */
static void on_batch_oldest(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                            const char *errstr, void *ud)
{
    (void)r;
    struct scaler_fn *fn = ud;
    struct pw_stream_entries *entries = NULL;
    if (err == PW_OK && pw_stream_parse_range(reply, &entries) != PW_OK) {
        err = PW_ERR_PROTO;
        errstr = "bad XRANGE reply";
    }
    if (!failed(fn, err, errstr, "XRANGE") && entries) {
        struct scaler_fn_obs *o = &fn->obs;
        if (entries->n > 0)
            o->b_oldest_ms = id_ms(entries->v[0].id);
        if (o->b_lag_unknown)
            o->b_lag = entries->n;
        uint64_t sum = 0, p, out;
        int64_t dl, first = 0;
        size_t ok = 0;
        for (size_t i = 0; i < entries->n; i++) {
            if (!entry_tokens(&entries->v[i], &p, &out, &dl))
                continue;
            sum += p + out;
            ok++;
            if (dl > 0 && (first == 0 || dl < first))
                first = dl;
        }
        o->b_work_tokens = scale_to(sum, ok, o->b_lag);
        o->b_deadline_ms = first;
    }
    pw_stream_entries_free(entries);
    round_step(fn);
}

/* Called once per reply; the last one of phase 1 may start phase 2, the last one of all
 * hands over to the reconciler. */
static void round_step(struct scaler_fn *fn)
{
    if (--fn->obs_outstanding > 0)
        return;
    struct scaler *s = fn->s;
    if (s->stopping)
        return;
    struct scaler_fn_obs *o = &fn->obs;
    if (!fn->obs_failed && !o->phase2) {
        /* Phase 2: the waiting entries of each lane that has some. */
        o->phase2 = true;
        bool want_q = (o->q_lag > 0 || o->q_lag_unknown) && o->q_last_delivered[0];
        bool want_b = (o->b_lag > 0 || o->b_lag_unknown) && o->b_last_delivered[0];
        char start_q[PW_STREAM_ID_MAX + 1], start_b[PW_STREAM_ID_MAX + 1];
        snprintf(start_q, sizeof start_q, "(%s", o->q_last_delivered);
        snprintf(start_b, sizeof start_b, "(%s", o->b_last_delivered);
        /* Count first (plus one of ours), as in scaler_observe_fn. */
        fn->obs_outstanding = 1 + (unsigned)want_q + (unsigned)want_b;
        if (want_q && pw_redis_command(s->redis, on_range_reply, fn, "XRANGE", fn->key_q, start_q,
                                       "+", "COUNT", OBS_SAMPLE, NULL) != PW_OK)
            fn->obs_outstanding--;
        if (want_b && pw_redis_command(s->redis, on_batch_oldest, fn, "XRANGE", fn->key_b, start_b,
                                       "+", "COUNT", OBS_SAMPLE, NULL) != PW_OK)
            fn->obs_outstanding--;
        if (--fn->obs_outstanding > 0)
            return;
    }
    if (!fn->obs_failed)
        scaler_reconcile_fn(s, fn);
    if (fn->tick_again && !s->stopping) {
        fn->tick_again = false;
        scaler_observe_fn(s, fn);
    }
}

void scaler_observe_fn(struct scaler *s, struct scaler_fn *fn)
{
    if (fn->obs_outstanding > 0) {
        fn->tick_again = true;
        return;
    }
    struct pw_stream_entries *w = fn->obs.workers, *c = fn->obs.consumers;
    memset(&fn->obs, 0, sizeof fn->obs);
    pw_stream_entries_free(w);
    pw_stream_entries_free(c);
    fn->obs_failed = false;
    /* Count first: a command refused at once must not finish the round early. */
    fn->obs_outstanding = 6;
    unsigned sent = 0;
    sent +=
        pw_redis_command(s->redis, on_groups_q, fn, "XINFO", "GROUPS", fn->key_q, NULL) == PW_OK;
    sent += pw_redis_command(s->redis, on_stream, fn, "XINFO", "STREAM", fn->key_q, NULL) == PW_OK;
    sent += pw_redis_command(s->redis, on_pending, fn, "XPENDING", fn->key_q, PW_GROUP_ENGINES,
                             NULL) == PW_OK;
    sent += pw_hash_get_all(s->redis, fn->key_workers, on_workers, fn) == PW_OK;
    sent +=
        pw_redis_command(s->redis, on_groups_b, fn, "XINFO", "GROUPS", fn->key_b, NULL) == PW_OK;
    /* The sixth count is ours: released here, after every command went out. */
    fn->obs_outstanding -= 5 - sent;
    if (sent < 5)
        fn->obs_failed = true;
    round_step(fn);
}

static void on_register_reply(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                              const char *errstr, void *ud)
{
    (void)r;
    (void)reply;
    struct scaler_fn *fn = ud;
    if (err)
        PW_LOG_WARN("event=register_failed function=%s err=%s", fn->spec->name,
                    errstr ? errstr : pw_err_name(err));
}

void scaler_register_functions(struct scaler *s)
{
    for (size_t i = 0; i < s->n_fns; i++) {
        struct scaler_fn *fn = &s->fns[i];
        char *json = pw_spec_to_json(fn->spec);
        if (json) {
            pw_hash_set(s->redis, PW_KEY_FUNCTIONS, fn->spec->name,
                        (struct pw_slice){json, strlen(json)}, on_register_reply, fn);
            free(json);
        }
        /* From id 0, as the engines do: requests queued before any engine are served. */
        pw_stream_group_create(s->redis, fn->key_q, PW_GROUP_ENGINES, "0", on_register_reply, fn);
        pw_stream_group_create(s->redis, fn->key_b, PW_GROUP_ENGINES, "0", on_register_reply, fn);
    }
}

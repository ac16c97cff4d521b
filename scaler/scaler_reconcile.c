/*
 * scaler_reconcile: joins observations, provider reports and the policy's decisions.
 *
 * Per tick and function: heartbeats and per-consumer pending counts are copied onto the
 * replicas (by id), STARTING replicas whose engine says READY become READY, READY ones
 * whose heartbeat is lost become FAILED; then the policy decides and every action is
 * applied through the provider, logged, and appended to pw:events; last pw:{fn}:scale is
 * written. Provider reports (scaler_on_provider_event) move replicas between states.
 * Replica state changes always go through set_state(), which accounts the cost of the
 * state being left. Loop thread only.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_log.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "scaler.h"

/* ---- replicas ---------------------------------------------------------------------- */

static const struct scaler_offer *replica_offer(const struct scaler *s,
                                                const struct scaler_replica *r)
{
    if (r->inst)
        return &r->inst->offer;
    if (r->offer_index >= 0 && (size_t)r->offer_index < s->n_offers)
        return &s->offers[r->offer_index];
    return NULL;
}

static void account(struct scaler *s, struct scaler_fn *fn, struct scaler_replica *r, int64_t now)
{
    if (now <= r->cost_from_ms)
        return;
    uint64_t price = scaler_cost_state_price(replica_offer(s, r), r->spot, r->state);
    scaler_cost_account(&fn->cost, r->id, r->state, price, r->cost_from_ms, now);
    r->cost_from_ms = now;
}

static void set_state(struct scaler *s, struct scaler_fn *fn, struct scaler_replica *r,
                      enum scaler_replica_state st)
{
    int64_t now = pw_clock_wall_ms();
    account(s, fn, r, now);
    if (r->state != st) {
        r->state = st;
        r->since_ms = now;
    }
}

static struct scaler_replica *find_replica(struct scaler_fn *fn, const char *id)
{
    for (struct scaler_replica *r = fn->replicas; r; r = r->next)
        if (strcmp(r->id, id) == 0)
            return r;
    return NULL;
}

static struct scaler_fn *find_fn(struct scaler *s, const char *name)
{
    for (size_t i = 0; i < s->n_fns; i++)
        if (strcmp(s->fns[i].spec->name, name) == 0)
            return &s->fns[i];
    return NULL;
}

static void remove_replica(struct scaler *s, struct scaler_fn *fn, struct scaler_replica *r)
{
    for (struct scaler_replica **pp = &fn->replicas; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            break;
        }
    }
    if (r->inst)
        s->provider->ops->release(s->provider, r->inst);
    free(r);
}

void scaler_fn_free_replicas(struct scaler *s, struct scaler_fn *fn)
{
    while (fn->replicas)
        remove_replica(s, fn, fn->replicas);
}

/* ---- events ------------------------------------------------------------------------ */

static void on_event_added(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                           const char *errstr, void *ud)
{
    (void)r;
    (void)reply;
    (void)ud;
    if (err)
        PW_LOG_WARN("event=events_append_failed err=%s", errstr ? errstr : pw_err_name(err));
}

void scaler_event(struct scaler *s, struct scaler_fn *fn, const char *kind, const char *replica,
                  const char *reason)
{
    char q[512];
    PW_LOG_INFO("event=scaler_action function=%s action=%s replica=%s reason=%s", fn->spec->name,
                kind, replica && *replica ? replica : "-",
                pw_log_quote(q, sizeof q, reason ? reason : ""));
    char ts[24];
    snprintf(ts, sizeof ts, "%" PRId64, pw_clock_wall_ms());
    struct pw_stream_field f[] = {
        {{"ts_ms", 5}, {ts, strlen(ts)}},
        {{"function", 8}, {fn->spec->name, strlen(fn->spec->name)}},
        {{"action", 6}, {kind, strlen(kind)}},
        {{"replica", 7}, {replica ? replica : "", replica ? strlen(replica) : 0}},
        {{"reason", 6}, {reason ? reason : "", reason ? strlen(reason) : 0}},
    };
    pw_stream_add(s->redis, PW_KEY_EVENTS, SCALER_EVENTS_MAXLEN, f, 5, on_event_added, NULL);
}

static void hdel_heartbeat(struct scaler *s, struct scaler_fn *fn, const char *id)
{
    pw_hash_del(s->redis, fn->key_workers, id, NULL, NULL);
}

/* ---- provider reports -------------------------------------------------------------- */

void scaler_on_provider_event(struct scaler_provider *p, struct scaler_instance *inst,
                              enum scaler_provider_ev ev, enum pw_err err, void *userdata)
{
    (void)p;
    struct scaler *s = userdata;
    struct scaler_fn *fn = find_fn(s, inst->function);
    struct scaler_replica *r = fn ? find_replica(fn, inst->id) : NULL;
    if (!r || r->inst != inst) {
        PW_LOG_WARN("event=provider_report_orphan replica=%s ev=%s", inst->id,
                    scaler_provider_ev_name(ev));
        return;
    }
    char why[SCALER_REASON_MAX + 1];
    PW_LOG_INFO("event=provider_report function=%s replica=%s op=%s result=%s state=%s ms=%llu",
                fn->spec->name, r->id, scaler_provider_ev_name(ev), pw_err_name(err),
                scaler_inst_state_name(inst->state), (unsigned long long)inst->last_op_ms);
    r->action_pending = inst->busy;
    if (err != PW_OK || inst->state == SCALER_INST_FAILED) {
        snprintf(why, sizeof why, "%s_failed replica=%s detail=%.80s", scaler_provider_ev_name(ev),
                 r->id, inst->detail[0] ? inst->detail : pw_err_desc(err));
        set_state(s, fn, r, SCALER_REPLICA_FAILED);
        scaler_event(s, fn, "replica_failed", r->id, why);
        hdel_heartbeat(s, fn, r->id);
        return;
    }
    switch (ev) {
    case SCALER_PROVIDER_EV_PROVISION:
    case SCALER_PROVIDER_EV_UNPARK:
        /* Machine and process up; READY comes from the engine's heartbeat. */
        if (r->state == SCALER_REPLICA_PROVISIONING)
            set_state(s, fn, r, SCALER_REPLICA_STARTING);
        break;
    case SCALER_PROVIDER_EV_PARK:
        set_state(s, fn, r, SCALER_REPLICA_PARKED);
        snprintf(why, sizeof why, "parked replica=%s ms=%llu", r->id,
                 (unsigned long long)inst->last_op_ms);
        scaler_event(s, fn, "parked", r->id, why);
        break;
    case SCALER_PROVIDER_EV_TERMINATE:
        set_state(s, fn, r, SCALER_REPLICA_TERMINATED);
        scaler_event(s, fn, "terminated", r->id, "terminated");
        hdel_heartbeat(s, fn, r->id);
        remove_replica(s, fn, r);
        return;
    case SCALER_PROVIDER_EV_STATUS:
        if (inst->state == SCALER_INST_TERMINATED) {
            set_state(s, fn, r, SCALER_REPLICA_TERMINATED);
            remove_replica(s, fn, r);
            return;
        }
        break;
    case SCALER_PROVIDER_EV_DRAIN:
    case SCALER_PROVIDER_EV_EXIT:
        break;
    }
}

/* ---- applying decisions ------------------------------------------------------------ */

static void start_failed(struct scaler *s, struct scaler_fn *fn, struct scaler_replica *r,
                         const char *op, enum pw_err err)
{
    char why[SCALER_REASON_MAX + 1];
    snprintf(why, sizeof why, "%s_failed replica=%s detail=%.80s", op, r->id,
             r->inst && r->inst->detail[0] ? r->inst->detail
             : s->provider->errstr[0]      ? s->provider->errstr
                                           : pw_err_desc(err));
    r->action_pending = false;
    set_state(s, fn, r, SCALER_REPLICA_FAILED);
    scaler_event(s, fn, "replica_failed", r->id, why);
}

static void do_provision(struct scaler *s, struct scaler_fn *fn, const struct scaler_action *a)
{
    if (a->offer_index < 0 || (size_t)a->offer_index >= s->n_offers)
        return;
    struct scaler_replica *r = calloc(1, sizeof *r);
    if (!r)
        return;
    int64_t now = pw_clock_wall_ms();
    /* Worker ids are safe key names: [A-Za-z0-9._-]; the nonce keeps ids of an earlier
     * scaler run (whose stale heartbeats may linger) apart. */
    snprintf(r->id, sizeof r->id, "%.40s-%x-%u", fn->spec->name, s->nonce, ++fn->next_seq);
    r->state = SCALER_REPLICA_PROVISIONING;
    r->since_ms = r->start_ms = r->cost_from_ms = now;
    r->offer_index = a->offer_index;
    r->spot = a->spot;
    r->action_pending = true;
    r->next = fn->replicas;
    fn->replicas = r;
    scaler_event(s, fn, scaler_action_name(a->kind), r->id, a->reason);
    enum pw_err err = s->provider->ops->provision(s->provider, &s->offers[a->offer_index], a->spot,
                                                  fn->spec, r->id, &r->inst);
    if (err) {
        r->inst = NULL;
        start_failed(s, fn, r, "provision", err);
    }
}

static void do_action(struct scaler *s, struct scaler_fn *fn, const struct scaler_action *a)
{
    const struct scaler_provider_ops *ops = s->provider->ops;
    if (a->kind == SCALER_ACT_PROVISION) {
        do_provision(s, fn, a);
        return;
    }
    struct scaler_replica *r = find_replica(fn, a->replica_id);
    if (!r) {
        PW_LOG_WARN("event=action_unknown_replica function=%s action=%s replica=%s", fn->spec->name,
                    scaler_action_name(a->kind), a->replica_id);
        return;
    }
    scaler_event(s, fn, scaler_action_name(a->kind), r->id, a->reason);
    enum pw_err err = PW_OK;
    switch (a->kind) {
    case SCALER_ACT_UNPARK:
        if (!r->inst)
            return;
        r->start_ms = pw_clock_wall_ms();
        r->was_ready = false;
        set_state(s, fn, r, SCALER_REPLICA_STARTING);
        r->action_pending = true;
        if ((err = ops->unpark(s->provider, r->inst)))
            start_failed(s, fn, r, "unpark", err);
        break;
    case SCALER_ACT_DRAIN:
        set_state(s, fn, r, SCALER_REPLICA_DRAINING);
        if (r->inst && ops->drain) {
            r->action_pending = true;
            if ((err = ops->drain(s->provider, r->inst)))
                r->action_pending = false; /* busy: the park or terminate drains anyway */
        }
        break;
    case SCALER_ACT_PARK:
        if (!r->inst)
            return;
        r->action_pending = true;
        if ((err = ops->park(s->provider, r->inst))) {
            r->action_pending = false;
            PW_LOG_WARN("event=park_refused replica=%s err=%s", r->id, pw_err_name(err));
        }
        break;
    case SCALER_ACT_TERMINATE:
    case SCALER_ACT_REPLACE:
        if (r->inst) {
            r->action_pending = true;
            if ((err = ops->terminate(s->provider, r->inst)))
                r->action_pending = false;
        } else {
            set_state(s, fn, r, SCALER_REPLICA_TERMINATED);
            remove_replica(s, fn, r);
        }
        if (a->kind == SCALER_ACT_REPLACE) {
            struct scaler_action p = *a;
            p.kind = SCALER_ACT_PROVISION;
            do_provision(s, fn, &p);
        }
        break;
    case SCALER_ACT_PROVISION:
        break;
    }
}

/* ---- observation into replicas ----------------------------------------------------- */

static void apply_heartbeats(struct scaler *s, struct scaler_fn *fn, int64_t now)
{
    for (struct scaler_replica *r = fn->replicas; r; r = r->next) {
        r->hb_present = false;
        r->busy_slots = r->total_slots = r->in_flight = 0;
    }
    const struct pw_stream_entries *w = fn->obs.workers;
    for (size_t i = 0; w && w->n == 1 && i < w->v[0].n_fields; i++) {
        const struct pw_stream_field *f = &w->v[0].fields[i];
        struct scaler_replica *r = find_replica(fn, f->name.ptr);
        if (!r)
            continue; /* an engine this scaler did not start (run by hand): not ours */
        Parkway__WorkerStatus *ws = NULL;
        if (pw_proto_unpack_worker(f->value.ptr, f->value.len, 0, &ws) != PW_OK)
            continue;
        r->hb_present = true;
        r->hb_state = ws->state;
        r->hb_ms = ws->last_heartbeat_unix_ms;
        r->busy_slots = ws->slots_busy;
        r->total_slots = ws->slots_total;
        r->tokens_per_s = ws->tokens_per_s;
        pw_proto_free_worker(ws);
    }
    const struct pw_stream_entries *c = fn->obs.consumers;
    for (size_t i = 0; c && c->n == 1 && i < c->v[0].n_fields; i++) {
        struct scaler_replica *r = find_replica(fn, c->v[0].fields[i].name.ptr);
        if (r)
            r->in_flight = (uint32_t)strtoul(c->v[0].fields[i].value.ptr, NULL, 10);
    }
    for (struct scaler_replica *r = fn->replicas; r; r = r->next) {
        bool fresh = r->hb_present && now - r->hb_ms < SCALER_HEARTBEAT_STALE_MS;
        bool serving = fresh && r->hb_state == PARKWAY__WORKER_STATE__WORKER_STATE_READY;
        if (r->state == SCALER_REPLICA_STARTING && serving && !r->action_pending) {
            set_state(s, fn, r, SCALER_REPLICA_READY);
            r->was_ready = true;
            char why[SCALER_REASON_MAX + 1];
            snprintf(why, sizeof why, "ready replica=%s startup_ms=%" PRId64, r->id,
                     now - r->start_ms);
            scaler_event(s, fn, "ready", r->id, why);
        } else if (r->state == SCALER_REPLICA_READY && !r->action_pending &&
                   (!r->hb_present || now - r->hb_ms > SCALER_HEARTBEAT_LOST_MS)) {
            char why[SCALER_REASON_MAX + 1];
            snprintf(why, sizeof why, "heartbeat_lost replica=%s silent_ms=%" PRId64, r->id,
                     r->hb_present ? now - r->hb_ms : (int64_t)-1);
            set_state(s, fn, r, SCALER_REPLICA_FAILED);
            scaler_event(s, fn, "replica_failed", r->id, why);
        }
    }
}

/* ---- pw:{fn}:scale ----------------------------------------------------------------- */

static void write_scale(struct scaler *s, struct scaler_fn *fn,
                        const struct scaler_policy_output *out, uint64_t rate, int64_t now)
{
    uint32_t by_state[SCALER_REPLICA_STATE_COUNT] = {0};
    for (struct scaler_replica *r = fn->replicas; r; r = r->next)
        if (r->state < SCALER_REPLICA_STATE_COUNT)
            by_state[r->state]++;
    char v[16][32];
    char cost[256];
    scaler_cost_to_json(&fn->cost, cost, sizeof cost);
    snprintf(v[0], sizeof v[0], "%u", out->desired);
    snprintf(v[1], sizeof v[1], "%u", by_state[SCALER_REPLICA_PROVISIONING]);
    snprintf(v[2], sizeof v[2], "%u", by_state[SCALER_REPLICA_STARTING]);
    snprintf(v[3], sizeof v[3], "%u", by_state[SCALER_REPLICA_READY]);
    snprintf(v[4], sizeof v[4], "%u", by_state[SCALER_REPLICA_DRAINING]);
    snprintf(v[5], sizeof v[5], "%u", by_state[SCALER_REPLICA_PARKED]);
    snprintf(v[6], sizeof v[6], "%u", by_state[SCALER_REPLICA_FAILED]);
    snprintf(v[7], sizeof v[7], "%" PRId64, fn->last_request_ms);
    snprintf(v[8], sizeof v[8], "%" PRIu64, fn->obs.q_lag);
    snprintf(v[9], sizeof v[9], "%" PRIu64, fn->obs.q_pending);
    snprintf(v[10], sizeof v[10], "%" PRIu64, scaler_cost_total_microusd(&fn->cost));
    snprintf(v[11], sizeof v[11], "%" PRIu64, rate);
    snprintf(v[12], sizeof v[12], "%" PRIu64, out->keepalive_ms);
    snprintf(v[13], sizeof v[13], "%" PRId64, now);
    const char *argv[] = {
        "HSET",
        fn->key_scale,
        "desired",
        v[0],
        "provisioning",
        v[1],
        "starting",
        v[2],
        "ready",
        v[3],
        "draining",
        v[4],
        "parked",
        v[5],
        "failed",
        v[6],
        "last_request_ms",
        v[7],
        "queue_lag",
        v[8],
        "in_flight",
        v[9],
        "cost_microusd",
        v[10],
        "rate_microusd_per_hour",
        v[11],
        "keepalive_ms",
        v[12],
        "updated_ms",
        v[13],
        "cost",
        cost,
        "error",
        out->error,
        "provider",
        s->provider->ops->name,
    };
    pw_redis_command_argv(s->redis, (int)(sizeof argv / sizeof argv[0]), argv, NULL, NULL, NULL);
}

/* ---- the tick ---------------------------------------------------------------------- */

void scaler_reconcile_fn(struct scaler *s, struct scaler_fn *fn)
{
    int64_t now = pw_clock_wall_ms();
    const struct scaler_fn_obs *o = &fn->obs;
    if (o->q_last_id_ms > fn->last_request_ms)
        fn->last_request_ms = o->q_last_id_ms;
    if (fn->last_wake_ms > fn->last_request_ms)
        fn->last_request_ms = fn->last_wake_ms;
    apply_heartbeats(s, fn, now);

    size_t n = 0;
    for (struct scaler_replica *r = fn->replicas; r; r = r->next)
        n++;
    struct scaler_replica_obs *ro = n ? calloc(n, sizeof *ro) : NULL;
    if (n && !ro)
        return;
    size_t i = 0;
    for (struct scaler_replica *r = fn->replicas; r; r = r->next, i++) {
        account(s, fn, r, now);
        snprintf(ro[i].id, sizeof ro[i].id, "%s", r->id);
        ro[i].state = r->state;
        ro[i].since_ms = r->since_ms;
        ro[i].start_ms = r->start_ms;
        ro[i].ready = r->state == SCALER_REPLICA_READY ||
                      (r->hb_present && now - r->hb_ms < SCALER_HEARTBEAT_STALE_MS &&
                       r->hb_state == PARKWAY__WORKER_STATE__WORKER_STATE_READY);
        ro[i].was_ready = r->was_ready;
        ro[i].action_pending = r->action_pending;
        ro[i].busy_slots = r->busy_slots;
        ro[i].total_slots = r->total_slots;
        ro[i].in_flight = r->in_flight;
        ro[i].last_heartbeat_ms = r->hb_ms;
        ro[i].tokens_per_s = r->tokens_per_s;
        ro[i].offer_index = r->offer_index;
        ro[i].spot = r->spot;
    }
    struct scaler_policy_input in = {
        .spec = &fn->pspec,
        .now_ms = now,
        .obs =
            {
                .interactive_pending = o->q_lag,
                .interactive_oldest_ms = o->q_oldest_ms ? now - o->q_oldest_ms : 0,
                .batch_pending = o->b_lag,
                .batch_oldest_ms = o->b_oldest_ms ? now - o->b_oldest_ms : 0,
                /* Interactive only: batch work in flight is deferrable and never counts
                 * toward the interactive target (its replicas stay busy, so none is
                 * drained under it). */
                .in_flight = (uint32_t)o->q_pending,
                .queued_prompt_tokens = o->q_prompt_tokens,
                .batch_deadline_ms = o->b_deadline_ms,
                .batch_work_tokens = o->b_work_tokens,
                .last_request_ms = fn->last_request_ms,
                .replicas = ro,
                .n_replicas = n,
            },
        .offers = s->offers,
        .n_offers = s->n_offers,
        .state = fn->pstate,
    };
    if (in.obs.interactive_oldest_ms < 0)
        in.obs.interactive_oldest_ms = 0;
    if (in.obs.batch_oldest_ms < 0)
        in.obs.batch_oldest_ms = 0;
    struct scaler_policy_output *out = malloc(sizeof *out);
    if (!out) {
        free(ro);
        return;
    }
    scaler_policy_decide(&in, out);
    free(ro);
    fn->pstate = out->state;
    fn->last_desired = out->desired;
    /* Compare the kind of error (text before ':'), not its countdown, so a breaker that
     * stays open is one event, not one per tick. */
    size_t kind_len = strcspn(out->error, ":");
    if (kind_len != strcspn(fn->last_error, ":") ||
        strncmp(out->error, fn->last_error, kind_len) != 0) {
        if (out->error[0])
            scaler_event(s, fn, "error", "", out->error);
        snprintf(fn->last_error, sizeof fn->last_error, "%s", out->error);
    }
    /* A decision without action (batch deferral): logged when its kind changes, and then
     * at most every SCALER_NOTE_EVERY_MS while it lasts. */
    size_t note_kind = strcspn(out->note, " ");
    if (out->note[0] && (note_kind != strcspn(fn->last_note, " ") ||
                         strncmp(out->note, fn->last_note, note_kind) != 0 ||
                         now - fn->last_note_ms >= SCALER_NOTE_EVERY_MS)) {
        char kind[32];
        snprintf(kind, sizeof kind, "%.*s", (int)(note_kind < 31 ? note_kind : 31), out->note);
        scaler_event(s, fn, kind, "", out->note);
        fn->last_note_ms = now;
    }
    snprintf(fn->last_note, sizeof fn->last_note, "%s", out->note);
    for (size_t k = 0; k < out->n_actions; k++)
        do_action(s, fn, &out->actions[k]);

    /* Rate now, after the actions: what the function costs per hour from here on. */
    size_t m = 0;
    struct scaler_replica_obs rate_obs[64];
    for (struct scaler_replica *r = fn->replicas; r && m < 64; r = r->next, m++) {
        memset(&rate_obs[m], 0, sizeof rate_obs[m]);
        rate_obs[m].state = r->state;
        rate_obs[m].offer_index = r->offer_index;
        rate_obs[m].spot = r->spot;
    }
    uint64_t rate = scaler_cost_rate_now(rate_obs, m, s->offers, s->n_offers);
    write_scale(s, fn, out, rate, now);
    free(out);
}

/* ---- stop -------------------------------------------------------------------------- */

size_t scaler_live_instances(const struct scaler *s)
{
    size_t n = 0;
    for (size_t i = 0; i < s->n_fns; i++)
        for (const struct scaler_replica *r = s->fns[i].replicas; r; r = r->next)
            if (r->inst && r->inst->state != SCALER_INST_TERMINATED &&
                r->inst->state != SCALER_INST_FAILED)
                n++;
            else if (r->inst && r->inst->busy)
                n++;
    return n;
}

size_t scaler_terminate_all(struct scaler *s, const char *reason)
{
    for (size_t i = 0; i < s->n_fns; i++) {
        struct scaler_fn *fn = &s->fns[i];
        struct scaler_replica *r = fn->replicas;
        while (r) {
            struct scaler_replica *next = r->next;
            if (r->inst && r->inst->state != SCALER_INST_TERMINATED) {
                scaler_event(s, fn, "terminate", r->id, reason);
                r->action_pending = true;
                s->provider->ops->terminate(s->provider, r->inst);
            }
            r = next;
        }
    }
    return scaler_live_instances(s);
}

/*
 * scaler_sim: trace parsing and generation, and the discrete-event simulator that runs
 * scaler_policy_decide() against simulated replicas (see scaler_sim.h).
 *
 * The simulation is event driven: time jumps to the next arrival, completion, replica
 * ready time or policy tick, whichever comes first, so waits are exact to the millisecond
 * while the policy still runs only every tick. Single-threaded, deterministic, no globals.
 */
#include "scaler_sim.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "scaler_cost.h"

/* The simulated clock starts here so that 0 can keep meaning "never" in observations. */
#define SIM_T0_MS (3600LL * 1000)
/* The simulation stops this long after the tail even if requests are still waiting. */
#define SIM_HARD_STOP_MS (24LL * 3600 * 1000)

/* ------------------------------------------------------------------------------------ */
/* Trace CSV                                                                            */

__attribute__((format(printf, 5, 6))) static enum pw_err
trace_fail(char *errbuf, size_t errcap, const char *origin, size_t line, const char *fmt, ...)
{
    if (errbuf && errcap) {
        char msg[200];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        snprintf(errbuf, errcap, "%s:%zu: %s", origin, line, msg);
    }
    return PW_ERR_PARSE;
}

/* Whole number 0..max from [s, e). */
static bool field_uint(const char *s, const char *e, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    if (s == e || e - s > 12)
        return false;
    for (const char *p = s; p < e; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (v > max)
        return false;
    *out = v;
    return true;
}

/* Seconds "D+[.D{1,3}]" from [s, e) to ms. */
static bool field_seconds(const char *s, const char *e, int64_t *ms)
{
    const char *dot = memchr(s, '.', (size_t)(e - s));
    uint64_t whole = 0, frac = 0;
    if (!field_uint(s, dot ? dot : e, 1000000000ULL, &whole))
        return false;
    if (dot) {
        size_t nf = (size_t)(e - dot - 1);
        if (nf < 1 || nf > 3 || !field_uint(dot + 1, e, 999, &frac))
            return false;
        for (size_t i = nf; i < 3; i++)
            frac *= 10;
    }
    *ms = (int64_t)(whole * 1000 + frac);
    return true;
}

static enum pw_err trace_push(struct scaler_trace *t, size_t *cap, const struct scaler_trace_req *r)
{
    if (t->count >= SCALER_TRACE_MAX_REQUESTS)
        return PW_ERR_TOOBIG;
    if (t->count == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        struct scaler_trace_req *g = realloc(t->reqs, nc * sizeof *g);
        if (!g)
            return PW_ERR_NOMEM;
        t->reqs = g;
        *cap = nc;
    }
    t->reqs[t->count++] = *r;
    return PW_OK;
}

enum pw_err scaler_trace_parse(const char *text, size_t len, const char *origin,
                               struct scaler_trace *trace, char *errbuf, size_t errcap)
{
    struct scaler_trace t = {0};
    size_t cap = 0, lineno = 0;
    bool header = false;
    enum pw_err err = PW_OK;
    const char *p = text, *end = text + len;
    origin = origin ? origin : "<trace>";
    if (!text || !trace)
        return PW_ERR_INVAL;
    if (len > SCALER_TRACE_MAX_BYTES)
        return trace_fail(errbuf, errcap, origin, 1, "trace larger than %d bytes",
                          SCALER_TRACE_MAX_BYTES);
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        lineno++;
        if (le > p && le[-1] == '\r')
            le--;
        if (le == p || *p == '#') {
            p = next;
            continue;
        }
        if (!header) {
            static const char h3[] = "arrival_s,prompt_tokens,output_tokens";
            static const char h4[] = "arrival_s,prompt_tokens,output_tokens,function";
            size_t l = (size_t)(le - p);
            if (!((l == sizeof h3 - 1 && memcmp(p, h3, l) == 0) ||
                  (l == sizeof h4 - 1 && memcmp(p, h4, l) == 0))) {
                err = trace_fail(errbuf, errcap, origin, lineno,
                                 "header: expected \"%s[,function]\"", h3);
                goto out;
            }
            header = true;
            p = next;
            continue;
        }
        const char *f[5];
        const char *fe[5];
        size_t nf = 0;
        const char *q = p;
        while (nf < 5) {
            const char *c = memchr(q, ',', (size_t)(le - q));
            f[nf] = q;
            fe[nf] = c ? c : le;
            nf++;
            if (!c)
                break;
            q = c + 1;
        }
        if (nf < 3 || nf > 4) {
            err = trace_fail(errbuf, errcap, origin, lineno, "expected 3 or 4 fields, got %zu%s",
                             nf, nf == 5 ? "+" : "");
            goto out;
        }
        struct scaler_trace_req r;
        uint64_t pt, ot;
        if (!field_seconds(f[0], fe[0], &r.arrival_ms)) {
            err = trace_fail(errbuf, errcap, origin, lineno,
                             "arrival_s: not seconds (D or D.DDD, at most 3 decimals)");
            goto out;
        }
        if (t.count && r.arrival_ms < t.reqs[t.count - 1].arrival_ms) {
            err = trace_fail(errbuf, errcap, origin, lineno, "arrival_s: goes back in time");
            goto out;
        }
        if (!field_uint(f[1], fe[1], 1000000, &pt)) {
            err = trace_fail(errbuf, errcap, origin, lineno, "prompt_tokens: not 0..1000000");
            goto out;
        }
        if (!field_uint(f[2], fe[2], 1000000, &ot)) {
            err = trace_fail(errbuf, errcap, origin, lineno, "output_tokens: not 0..1000000");
            goto out;
        }
        r.prompt_tokens = (uint32_t)pt;
        r.output_tokens = (uint32_t)ot;
        err = trace_push(&t, &cap, &r);
        if (err) {
            trace_fail(errbuf, errcap, origin, lineno, "%s", pw_err_desc(err));
            goto out;
        }
        p = next;
    }
    if (!header) {
        err = trace_fail(errbuf, errcap, origin, 1, "empty trace (no header)");
        goto out;
    }
    scaler_trace_deinit(trace);
    *trace = t;
    return PW_OK;
out:
    free(t.reqs);
    return err;
}

enum pw_err scaler_trace_load_file(const char *path, struct scaler_trace *trace, char *errbuf,
                                   size_t errcap)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t len = 0, cap = 0;
    enum pw_err err = PW_OK;
    if (!f) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1: cannot read: %s", path, strerror(errno));
        return PW_ERR_IO;
    }
    for (;;) {
        if (len == cap) {
            if (cap >= (size_t)SCALER_TRACE_MAX_BYTES + 1) {
                err = trace_fail(errbuf, errcap, path, 1, "trace larger than %d bytes",
                                 SCALER_TRACE_MAX_BYTES);
                goto out;
            }
            size_t nc = cap ? cap * 2 : 65536;
            char *g = realloc(buf, nc);
            if (!g) {
                err = PW_ERR_NOMEM;
                goto out;
            }
            buf = g;
            cap = nc;
        }
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "%s:1: cannot read: %s", path, strerror(errno));
        err = PW_ERR_IO;
        goto out;
    }
    err = scaler_trace_parse(buf ? buf : "", len, path, trace, errbuf, errcap);
out:
    free(buf);
    fclose(f);
    return err;
}

void scaler_trace_deinit(struct scaler_trace *trace)
{
    if (!trace)
        return;
    free(trace->reqs);
    trace->reqs = NULL;
    trace->count = 0;
}

enum pw_err scaler_trace_write_csv(const struct scaler_trace *trace, FILE *f)
{
    fprintf(f, "arrival_s,prompt_tokens,output_tokens\n");
    for (size_t i = 0; i < trace->count; i++) {
        const struct scaler_trace_req *r = &trace->reqs[i];
        fprintf(f, "%lld.%03lld,%u,%u\n", (long long)(r->arrival_ms / 1000),
                (long long)(r->arrival_ms % 1000), r->prompt_tokens, r->output_tokens);
    }
    return ferror(f) ? PW_ERR_IO : PW_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Synthetic traces                                                                     */

static const char *const shape_names[] = {"diurnal", "bursty", "periodic", "sparse"};

const char *scaler_trace_shape_name(enum scaler_trace_shape s)
{
    if ((unsigned)s >= sizeof shape_names / sizeof shape_names[0])
        return "unknown";
    return shape_names[s];
}

bool scaler_trace_shape_parse(const char *name, enum scaler_trace_shape *out)
{
    for (size_t i = 0; i < sizeof shape_names / sizeof shape_names[0]; i++) {
        if (name && strcmp(name, shape_names[i]) == 0) {
            *out = (enum scaler_trace_shape)i;
            return true;
        }
    }
    return false;
}

/* splitmix64: tiny, well mixed, the same everywhere. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

static double rng_exp(uint64_t *s, double mean)
{
    return -log(1.0 - rng_unit(s)) * mean;
}

static uint32_t rng_range(uint64_t *s, uint32_t lo, uint32_t hi)
{
    return lo + (uint32_t)(rng_unit(s) * (double)(hi - lo + 1));
}

static enum pw_err gen_push(struct scaler_trace *t, size_t *cap, uint64_t *rng, double at_ms)
{
    struct scaler_trace_req r;
    r.arrival_ms = (int64_t)at_ms;
    r.prompt_tokens = rng_range(rng, 40, 600);
    r.output_tokens = rng_range(rng, 16, 256);
    return trace_push(t, cap, &r);
}

enum pw_err scaler_trace_generate(enum scaler_trace_shape shape, uint64_t seed, int64_t duration_ms,
                                  struct scaler_trace *trace)
{
    uint64_t rng = seed ^ 0x5eedULL;
    size_t cap = 0;
    enum pw_err err = PW_OK;
    struct scaler_trace t = {0};
    const double day = 24.0 * 3600 * 1000, dur = (double)duration_ms;
    if (duration_ms <= 0 || !trace || (unsigned)shape > SCALER_TRACE_SPARSE)
        return PW_ERR_INVAL;
    switch (shape) {
    case SCALER_TRACE_DIURNAL: {
        /* Non-homogeneous Poisson by thinning: peak 2/min at 14:00, ~0 at 02:00. */
        const double peak_per_ms = 2.0 / 60000.0;
        for (double at = rng_exp(&rng, 1 / peak_per_ms); at < dur && !err;
             at += rng_exp(&rng, 1 / peak_per_ms)) {
            double phase = 2.0 * M_PI * (fmod(at, day) / day - 14.0 / 24.0);
            double rel = 0.5 * (1.0 + cos(phase)); /* 1 at 14:00, 0 at 02:00 */
            rel = rel * rel;
            if (rng_unit(&rng) < rel)
                err = gen_push(&t, &cap, &rng, at);
        }
        break;
    }
    case SCALER_TRACE_BURSTY: {
        /* Bursts of 3..30 requests a few seconds apart; between bursts 5 min .. 3 h. */
        double at = rng_exp(&rng, 600000);
        while (at < dur && !err) {
            uint32_t nb = rng_range(&rng, 3, 30);
            for (uint32_t i = 0; i < nb && at < dur && !err; i++) {
                err = gen_push(&t, &cap, &rng, at);
                at += rng_exp(&rng, 4000);
            }
            double u = rng_unit(&rng);
            at += 300000.0 * pow(36.0, u); /* log-uniform 5 min .. 3 h */
        }
        break;
    }
    case SCALER_TRACE_PERIODIC: {
        /* A timer every 10 minutes, +-3 s of jitter, 1..3 requests each. */
        for (double tick = 600000; tick < dur && !err; tick += 600000) {
            double at = tick + (rng_unit(&rng) * 6000.0 - 3000.0);
            uint32_t nb = rng_range(&rng, 1, 3);
            for (uint32_t i = 0; i < nb && !err; i++) {
                err = gen_push(&t, &cap, &rng, at);
                at += 200.0 + rng_unit(&rng) * 800.0;
            }
        }
        break;
    }
    case SCALER_TRACE_SPARSE:
        for (double at = rng_exp(&rng, 1200000); at < dur && !err; at += rng_exp(&rng, 1200000))
            err = gen_push(&t, &cap, &rng, at);
        break;
    }
    if (err) {
        free(t.reqs);
        return err;
    }
    scaler_trace_deinit(trace);
    *trace = t;
    return PW_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Policies                                                                             */

void scaler_sim_default_policies(struct scaler_sim_config *cfg, const struct pw_spec *spec)
{
    struct scaler_policy_spec base;
    scaler_policy_spec_from(&base, spec);
    cfg->n_policies = 0;

    struct scaler_sim_policy *p = &cfg->policies[cfg->n_policies++];
    snprintf(p->name, sizeof p->name, "always-on");
    p->spec = base;
    p->spec.min_replicas = base.min_replicas > 1 ? base.min_replicas : 1;
    p->spec.adaptive = false;
    p->spec.park_cost_decision = false;
    p->spec.idle_action = PW_SPEC_IDLE_TERMINATE;

    static const uint32_t fixed[] = {60, 300};
    for (size_t i = 0; i < 2; i++) {
        p = &cfg->policies[cfg->n_policies++];
        snprintf(p->name, sizeof p->name, "idle-%us", fixed[i]);
        p->spec = base;
        p->spec.min_replicas = 0;
        p->spec.idle_ms = fixed[i] * 1000ULL;
        p->spec.idle_action = PW_SPEC_IDLE_TERMINATE;
        p->spec.adaptive = false;
        p->spec.park_cost_decision = false;
    }

    p = &cfg->policies[cfg->n_policies++];
    snprintf(p->name, sizeof p->name, "parkway");
    p->spec = base;
    p->spec.idle_action = PW_SPEC_IDLE_PARK;
    p->spec.adaptive = true;
    p->spec.park_cost_decision = true;
}

/* ------------------------------------------------------------------------------------ */
/* The simulator                                                                        */

struct sim_rep {
    struct scaler_replica_obs o; /* id, state, since, start, offer, spot, was_ready */
    int64_t ready_at;            /* PROVISIONING/STARTING: when it becomes READY */
    uint32_t slots;
    uint32_t busy;
    int64_t *finish; /* [slots]: end time of the request in the slot; 0 = free */
};

struct sim {
    const struct scaler_trace *trace;
    const struct scaler_sim_config *cfg;
    const struct scaler_sim_policy *pol;
    struct scaler_sim_result *res;
    struct sim_rep *reps;
    size_t n_reps, cap_reps;
    uint32_t next_id;
    struct scaler_cost_acc cost;
    int64_t *waits; /* [trace->count] ms, -1 = not dispatched */
    size_t ai;      /* next arrival */
    size_t qhead;   /* first request not yet dispatched (FIFO: [qhead, ai) wait) */
    uint64_t queued_prompt;
    int64_t last_request;
    double prefill, decode;
    enum pw_err err;
};

static uint64_t rep_price(const struct sim *s, const struct sim_rep *r)
{
    const struct scaler_offer *o = &s->cfg->offers[r->o.offer_index];
    return scaler_cost_state_price(o, r->o.spot, r->o.state);
}

static void set_state(struct sim *s, struct sim_rep *r, enum scaler_replica_state st, int64_t t)
{
    enum pw_err e =
        scaler_cost_account(&s->cost, r->o.id, r->o.state, rep_price(s, r), r->o.since_ms, t);
    if (e && !s->err)
        s->err = e;
    r->o.state = st;
    r->o.since_ms = t;
    if (st == SCALER_REPLICA_READY)
        r->o.was_ready = true;
}

static struct sim_rep *find_rep(struct sim *s, const char *id)
{
    for (size_t i = 0; i < s->n_reps; i++) {
        if (strcmp(s->reps[i].o.id, id) == 0)
            return &s->reps[i];
    }
    return NULL;
}

static void provision(struct sim *s, int32_t offer, bool spot, int64_t t)
{
    if (offer < 0 || (size_t)offer >= s->cfg->n_offers)
        return;
    if (s->n_reps == s->cap_reps) {
        size_t nc = s->cap_reps ? s->cap_reps * 2 : 8;
        struct sim_rep *g = realloc(s->reps, nc * sizeof *g);
        if (!g) {
            s->err = PW_ERR_NOMEM;
            return;
        }
        s->reps = g;
        s->cap_reps = nc;
    }
    struct sim_rep *r = &s->reps[s->n_reps];
    memset(r, 0, sizeof *r);
    r->slots = s->pol->spec.max_batch ? s->pol->spec.max_batch : 1;
    r->finish = calloc(r->slots, sizeof *r->finish);
    if (!r->finish) {
        s->err = PW_ERR_NOMEM;
        return;
    }
    s->n_reps++;
    snprintf(r->o.id, sizeof r->o.id, "r%u", ++s->next_id);
    r->o.state = SCALER_REPLICA_PROVISIONING;
    r->o.since_ms = t;
    r->o.start_ms = t;
    r->o.offer_index = offer;
    r->o.spot = spot;
    r->o.total_slots = r->slots;
    r->ready_at = t + s->cfg->offers[offer].provision_ms;
    s->res->provisions++;
}

static void apply(struct sim *s, const struct scaler_policy_output *out, int64_t t)
{
    for (size_t i = 0; i < out->n_actions; i++) {
        const struct scaler_action *a = &out->actions[i];
        struct sim_rep *r = a->replica_id[0] ? find_rep(s, a->replica_id) : NULL;
        switch (a->kind) {
        case SCALER_ACT_PROVISION:
            provision(s, a->offer_index, a->spot, t);
            break;
        case SCALER_ACT_UNPARK:
            if (r && r->o.state == SCALER_REPLICA_PARKED) {
                set_state(s, r, SCALER_REPLICA_STARTING, t);
                r->o.start_ms = t;
                r->ready_at = t + s->cfg->offers[r->o.offer_index].unpark_ms;
                s->res->unparks++;
            }
            break;
        case SCALER_ACT_DRAIN:
            if (r && r->o.state == SCALER_REPLICA_READY)
                set_state(s, r, SCALER_REPLICA_DRAINING, t);
            break;
        case SCALER_ACT_PARK:
            if (r && r->busy == 0)
                set_state(s, r, SCALER_REPLICA_PARKED, t);
            break;
        case SCALER_ACT_TERMINATE:
        case SCALER_ACT_REPLACE:
            if (r && r->busy == 0)
                set_state(s, r, SCALER_REPLICA_TERMINATED, t);
            if (a->kind == SCALER_ACT_REPLACE)
                provision(s, a->offer_index, a->spot, t);
            break;
        }
    }
    /* Drop terminated replicas (their cost is already accounted). */
    size_t w = 0;
    for (size_t i = 0; i < s->n_reps; i++) {
        if (s->reps[i].o.state == SCALER_REPLICA_TERMINATED) {
            free(s->reps[i].finish);
            continue;
        }
        s->reps[w++] = s->reps[i];
    }
    s->n_reps = w;
}

static double service_ms(const struct sim *s, const struct scaler_trace_req *r)
{
    return 1000.0 * ((double)r->prompt_tokens / s->prefill + (double)r->output_tokens / s->decode);
}

static void dispatch(struct sim *s, int64_t t)
{
    while (s->qhead < s->ai) {
        struct sim_rep *best = NULL;
        for (size_t i = 0; i < s->n_reps; i++) {
            struct sim_rep *r = &s->reps[i];
            if (r->o.state != SCALER_REPLICA_READY || r->busy >= r->slots)
                continue;
            if (!best || r->busy < best->busy)
                best = r;
        }
        if (!best)
            return;
        const struct scaler_trace_req *q = &s->trace->reqs[s->qhead];
        for (uint32_t k = 0; k < best->slots; k++) {
            if (best->finish[k] == 0) {
                int64_t d = (int64_t)ceil(service_ms(s, q));
                best->finish[k] = t + (d > 0 ? d : 1);
                break;
            }
        }
        best->busy++;
        s->waits[s->qhead] = t - (SIM_T0_MS + q->arrival_ms);
        s->queued_prompt -= q->prompt_tokens;
        s->qhead++;
    }
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static double pct_s(const int64_t *sorted, size_t n, unsigned p)
{
    if (n == 0)
        return 0;
    size_t rank = (n * p + 99) / 100;
    if (rank == 0)
        rank = 1;
    return (double)sorted[rank - 1] / 1000.0;
}

static enum pw_err run_one(const struct scaler_trace *trace, const struct scaler_sim_config *cfg,
                           const struct scaler_sim_policy *pol, struct scaler_sim_result *res)
{
    struct sim s;
    memset(&s, 0, sizeof s);
    memset(res, 0, sizeof *res);
    snprintf(res->policy, sizeof res->policy, "%s", pol->name);
    s.trace = trace;
    s.cfg = cfg;
    s.pol = pol;
    s.res = res;
    s.prefill = cfg->prefill_tokens_per_s > 0 ? cfg->prefill_tokens_per_s : 400;
    s.decode = cfg->decode_tokens_per_s > 0 ? cfg->decode_tokens_per_s : 40;
    const int64_t tick = cfg->tick_ms > 0 ? cfg->tick_ms : SCALER_TICK_MS;
    const int64_t slo = cfg->slo_wait_ms > 0 ? cfg->slo_wait_ms : 1000;
    const int64_t tail = cfg->tail_ms > 0 ? cfg->tail_ms : 15 * 60 * 1000;
    const size_t n = trace->count;
    const int64_t end = SIM_T0_MS + (n ? trace->reqs[n - 1].arrival_ms : 0) + tail;
    struct scaler_policy_state pstate;
    memset(&pstate, 0, sizeof pstate);
    struct scaler_replica_obs *obs = NULL;
    size_t obs_cap = 0;
    struct scaler_policy_output *out = malloc(sizeof *out);
    struct scaler_policy_input *in = malloc(sizeof *in);
    s.waits = malloc((n ? n : 1) * sizeof *s.waits);
    if (!out || !in || !s.waits) {
        s.err = PW_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        s.waits[i] = -1;

    int64_t t = SIM_T0_MS, next_tick = SIM_T0_MS;
    for (;;) {
        /* Done: past the horizon and nothing left to serve (or hopeless). */
        uint32_t busy = 0;
        for (size_t i = 0; i < s.n_reps; i++)
            busy += s.reps[i].busy;
        if (t >= end && s.ai == n && s.qhead == n && busy == 0)
            break;
        if (t >= end + SIM_HARD_STOP_MS || s.err)
            break;

        /* Next event. */
        int64_t te = next_tick;
        if (s.ai < n && SIM_T0_MS + trace->reqs[s.ai].arrival_ms < te)
            te = SIM_T0_MS + trace->reqs[s.ai].arrival_ms;
        for (size_t i = 0; i < s.n_reps; i++) {
            struct sim_rep *r = &s.reps[i];
            if ((r->o.state == SCALER_REPLICA_PROVISIONING ||
                 r->o.state == SCALER_REPLICA_STARTING) &&
                r->ready_at < te)
                te = r->ready_at;
            for (uint32_t k = 0; k < r->slots; k++) {
                if (r->finish[k] && r->finish[k] < te)
                    te = r->finish[k];
            }
        }
        if (te > t)
            t = te;

        /* Completions, readiness, arrivals, dispatch. */
        for (size_t i = 0; i < s.n_reps; i++) {
            struct sim_rep *r = &s.reps[i];
            for (uint32_t k = 0; k < r->slots; k++) {
                if (r->finish[k] && r->finish[k] <= t) {
                    r->finish[k] = 0;
                    r->busy--;
                    res->requests++;
                }
            }
            if ((r->o.state == SCALER_REPLICA_PROVISIONING ||
                 r->o.state == SCALER_REPLICA_STARTING) &&
                r->ready_at <= t)
                set_state(&s, r, SCALER_REPLICA_READY, t);
        }
        while (s.ai < n && SIM_T0_MS + trace->reqs[s.ai].arrival_ms <= t) {
            bool any_ready = false;
            for (size_t i = 0; i < s.n_reps; i++)
                any_ready |= s.reps[i].o.state == SCALER_REPLICA_READY;
            if (!any_ready)
                res->cold_starts++;
            s.last_request = SIM_T0_MS + trace->reqs[s.ai].arrival_ms;
            s.queued_prompt += trace->reqs[s.ai].prompt_tokens;
            s.ai++;
        }
        dispatch(&s, t);

        if (t < next_tick)
            continue;
        next_tick += tick;

        /* Policy tick: observe, decide, apply. */
        if (s.n_reps > obs_cap) {
            size_t nc = s.n_reps * 2;
            struct scaler_replica_obs *g = realloc(obs, nc * sizeof *g);
            if (!g) {
                s.err = PW_ERR_NOMEM;
                break;
            }
            obs = g;
            obs_cap = nc;
        }
        uint32_t in_flight = 0;
        for (size_t i = 0; i < s.n_reps; i++) {
            struct sim_rep *r = &s.reps[i];
            obs[i] = r->o;
            obs[i].ready = r->o.state == SCALER_REPLICA_READY;
            obs[i].busy_slots = r->busy;
            obs[i].in_flight = r->busy;
            obs[i].total_slots = r->slots;
            obs[i].last_heartbeat_ms = t;
            obs[i].tokens_per_s = s.decode;
            in_flight += r->busy;
        }
        memset(in, 0, sizeof *in);
        in->spec = &pol->spec;
        in->now_ms = t;
        in->obs.interactive_pending = s.ai - s.qhead;
        in->obs.interactive_oldest_ms =
            s.qhead < s.ai ? t - (SIM_T0_MS + trace->reqs[s.qhead].arrival_ms) : 0;
        in->obs.in_flight = in_flight;
        in->obs.queued_prompt_tokens = s.queued_prompt;
        in->obs.last_request_ms = s.last_request;
        in->obs.replicas = obs;
        in->obs.n_replicas = s.n_reps;
        in->offers = cfg->offers;
        in->n_offers = cfg->n_offers;
        in->state = pstate;
        scaler_policy_decide(in, out);
        pstate = out->state;
        if (out->error[0])
            snprintf(res->error, sizeof res->error, "%s", out->error);
        apply(&s, out, t);
        dispatch(&s, t);
    }

    /* Bill everything still alive up to the end. */
    {
        int64_t stop = t > end ? t : end;
        for (size_t i = 0; i < s.n_reps; i++)
            set_state(&s, &s.reps[i], s.reps[i].o.state, stop);
    }
    res->cost_microusd = scaler_cost_total_microusd(&s.cost);
    res->running_microusd = scaler_cost_running_microusd(&s.cost);
    res->parked_microusd = scaler_cost_parked_microusd(&s.cost);

    /* Waits: unserved requests count as waiting until the stop, and as SLO misses. */
    for (size_t i = 0; i < n; i++) {
        if (s.waits[i] < 0) {
            res->unserved++;
            s.waits[i] = t - (SIM_T0_MS + trace->reqs[i].arrival_ms);
        }
        if (s.waits[i] > slo)
            res->slo_misses++;
    }
    qsort(s.waits, n, sizeof *s.waits, cmp_i64);
    res->wait_p50_s = pct_s(s.waits, n, 50);
    res->wait_p95_s = pct_s(s.waits, n, 95);
    res->wait_p99_s = pct_s(s.waits, n, 99);
    res->wait_max_s = n ? (double)s.waits[n - 1] / 1000.0 : 0;
out:
    for (size_t i = 0; i < s.n_reps; i++)
        free(s.reps[i].finish);
    free(s.reps);
    free(s.waits);
    free(obs);
    free(out);
    free(in);
    return s.err;
}

enum pw_err scaler_sim_run(const struct scaler_trace *trace, const struct scaler_sim_config *cfg,
                           struct scaler_sim_report *report)
{
    if (!trace || !cfg || !report || cfg->n_policies == 0 ||
        cfg->n_policies > SCALER_SIM_MAX_POLICIES || !cfg->offers || cfg->n_offers == 0)
        return PW_ERR_INVAL;
    memset(report, 0, sizeof *report);
    for (size_t i = 0; i < cfg->n_policies; i++) {
        enum pw_err e = run_one(trace, cfg, &cfg->policies[i], &report->results[i]);
        if (e)
            return e;
        report->count++;
    }
    return PW_OK;
}

void scaler_sim_report_print_table(const struct scaler_sim_report *report, FILE *f)
{
    fprintf(f, "%-12s %12s %12s %11s %8s %6s %7s %9s %9s %9s %6s %8s\n", "policy", "cost_usd",
            "running_usd", "parked_usd", "cold", "prov", "unpark", "wait_p50", "wait_p95",
            "wait_p99", "slo", "requests");
    for (size_t i = 0; i < report->count; i++) {
        const struct scaler_sim_result *r = &report->results[i];
        fprintf(f, "%-12s %12.4f %12.4f %11.4f %8u %6u %7u %8.2fs %8.2fs %8.2fs %6u %8u\n",
                r->policy, (double)r->cost_microusd / 1e6, (double)r->running_microusd / 1e6,
                (double)r->parked_microusd / 1e6, r->cold_starts, r->provisions, r->unparks,
                r->wait_p50_s, r->wait_p95_s, r->wait_p99_s, r->slo_misses, r->requests);
        if (r->error[0])
            fprintf(f, "  %s: %s\n", r->policy, r->error);
    }
}

void scaler_sim_report_print_json(const struct scaler_sim_report *report, FILE *f)
{
    fprintf(f, "{\"policies\":[");
    for (size_t i = 0; i < report->count; i++) {
        const struct scaler_sim_result *r = &report->results[i];
        fprintf(f,
                "%s{\"policy\":\"%s\",\"cost\":%.6f,\"running_cost\":%.6f,\"parked_cost\":%.6f,"
                "\"cold_starts\":%u,\"provisions\":%u,\"unparks\":%u,\"wait_p50_s\":%.3f,"
                "\"wait_p95_s\":%.3f,\"wait_p99_s\":%.3f,\"wait_max_s\":%.3f,\"slo_misses\":%u,"
                "\"requests\":%u,\"unserved\":%u}",
                i ? "," : "", r->policy, (double)r->cost_microusd / 1e6,
                (double)r->running_microusd / 1e6, (double)r->parked_microusd / 1e6, r->cold_starts,
                r->provisions, r->unparks, r->wait_p50_s, r->wait_p95_s, r->wait_p99_s,
                r->wait_max_s, r->slo_misses, r->requests, r->unserved);
    }
    fprintf(f, "]}\n");
}

/*
 * scaler_policy: the pure scaling policy (see scaler_policy.h and
 * docs/internals/scaler-policy.md for the rules and the cost model).
 *
 * One call = one tick for one function. The order of the rules matters and is fixed:
 *   1. learn: record the idle gap if a new request arrived; refresh the adaptive plan;
 *   2. health: startup timeouts and failed replicas (replace / clean up), breaker;
 *   3. drained replicas are parked or terminated (spec idle_action);
 *   4. desired = f(load, batch, pre-warm), clamped to [min, max];
 *   5. scale up at once (unpark before provision), or scale down after the windows;
 *   6. parked replicas: stay parked or terminate, by cost.
 * No I/O, no clock, no globals; floating point only in the cost estimates, never in the
 * state, so a run is reproducible.
 */
#include "scaler_policy.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "scaler_offers.h"

/* ------------------------------------------------------------------------------------ */
/* Names                                                                                */

static const char *const state_names[SCALER_REPLICA_STATE_COUNT] = {
    "provisioning", "starting", "ready", "draining", "parked", "terminated", "failed",
};

const char *scaler_replica_state_name(enum scaler_replica_state s)
{
    if ((unsigned)s >= SCALER_REPLICA_STATE_COUNT)
        return "unknown";
    return state_names[s];
}

bool scaler_replica_state_parse(const char *name, enum scaler_replica_state *out)
{
    for (int i = 0; i < SCALER_REPLICA_STATE_COUNT; i++) {
        if (name && strcmp(name, state_names[i]) == 0) {
            *out = (enum scaler_replica_state)i;
            return true;
        }
    }
    return false;
}

const char *scaler_action_name(enum scaler_action_kind k)
{
    static const char *const names[] = {"provision", "unpark",    "drain",
                                        "park",      "terminate", "replace"};
    if ((unsigned)k >= sizeof names / sizeof names[0])
        return "unknown";
    return names[k];
}

void scaler_policy_spec_from(struct scaler_policy_spec *ps, const struct pw_spec *spec)
{
    memset(ps, 0, sizeof *ps);
    ps->min_replicas = spec->scaling.min_replicas;
    ps->max_replicas = spec->scaling.max_replicas;
    ps->target_concurrency = spec->scaling.target_concurrency;
    ps->idle_ms = (uint64_t)spec->scaling.idle_seconds * 1000;
    ps->idle_action = spec->scaling.idle_action;
    ps->startup_timeout_ms = (uint64_t)spec->scaling.startup_timeout_seconds * 1000;
    ps->max_batch = spec->engine.max_batch;
    ps->max_queue_wait_ms = spec->max_queue_wait_ms;
    scaler_offer_req_from_spec(&ps->req, spec);
    ps->adaptive = true;
    ps->park_cost_decision = true;
    ps->latency_penalty_microusd_per_s = spec->pricing.cold_start_microusd_per_second;
}

/* ------------------------------------------------------------------------------------ */
/* Idle-gap histogram                                                                   */

static size_t bin_of(int64_t gap_ms)
{
    if (gap_ms < 1000)
        return 0;
    double e = 1000.0;
    size_t i = 0;
    while (i + 1 < SCALER_GAP_BINS && (double)gap_ms >= e) {
        e *= 1.05;
        i++;
    }
    return i;
}

void scaler_policy_record_gap(struct scaler_policy_state *st, int64_t gap_ms)
{
    if (gap_ms < 0)
        return;
    struct scaler_gap_sample *g = &st->recent[st->gaps_seen % SCALER_GAP_RECENT];
    int64_t before = st->gap_ewma_ms ? st->gap_ewma_ms : gap_ms;
    g->gap_ms = gap_ms > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)gap_ms;
    g->ewma_ms = before > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)before;
    st->gaps_seen++;
    if (st->gaps_seen == 0) /* wrapped: keep "0 = no plan" meaning nothing recorded */
        st->gaps_seen = SCALER_GAP_RECENT;
    st->gap_ewma_ms = st->gap_ewma_ms == 0 ? gap_ms
                                           : (gap_ms * SCALER_GAP_EWMA_PERMILLE +
                                              st->gap_ewma_ms * (1000 - SCALER_GAP_EWMA_PERMILLE)) /
                                                 1000;
    st->gap_hist[bin_of(gap_ms)]++;
    st->gap_count++;
    if (st->gap_count >= 1000) {
        /* Age: halve, keeping singletons, so the histogram follows a drifting pattern. */
        uint32_t total = 0;
        for (size_t i = 0; i < SCALER_GAP_BINS; i++) {
            st->gap_hist[i] = (st->gap_hist[i] + 1) / 2;
            total += st->gap_hist[i];
        }
        st->gap_count = total;
    }
}

int64_t scaler_policy_gap_percentile(const struct scaler_policy_state *st, unsigned pct)
{
    if (st->gap_count == 0)
        return 0;
    if (pct > 100)
        pct = 100;
    uint64_t want = ((uint64_t)st->gap_count * pct + 99) / 100;
    if (want == 0)
        want = 1;
    uint64_t cum = 0;
    double e = 1000.0;
    for (size_t i = 0; i < SCALER_GAP_BINS; i++) {
        cum += st->gap_hist[i];
        if (cum >= want)
            return (int64_t)e;
        e *= 1.05;
    }
    return (int64_t)(e / 1.05);
}

/* Bin geometry, computed once per use site: upper edges and midpoints, ms. */
struct bins {
    double up[SCALER_GAP_BINS];
    double rep[SCALER_GAP_BINS];
};

static void bins_init(struct bins *b)
{
    double e = 1000.0;
    for (size_t i = 0; i < SCALER_GAP_BINS; i++) {
        b->up[i] = e;
        b->rep[i] = i == 0 ? 500.0 : (e / 1.05 + e) / 2.0;
        e *= 1.05;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Helpers                                                                              */

__attribute__((format(printf, 5, 6))) static struct scaler_action *
add_action(struct scaler_policy_output *out, enum scaler_action_kind kind, const char *replica,
           int32_t offer_index, const char *fmt, ...)
{
    if (out->n_actions >= SCALER_POLICY_MAX_ACTIONS)
        return NULL;
    struct scaler_action *a = &out->actions[out->n_actions++];
    memset(a, 0, sizeof *a);
    a->kind = kind;
    a->offer_index = offer_index;
    if (replica)
        snprintf(a->replica_id, sizeof a->replica_id, "%s", replica);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->reason, sizeof a->reason, fmt, ap);
    va_end(ap);
    return a;
}

__attribute__((format(printf, 2, 3))) static void set_error(struct scaler_policy_output *out,
                                                            const char *fmt, ...)
{
    if (out->error[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out->error, sizeof out->error, fmt, ap);
    va_end(ap);
}

static const struct scaler_offer *offer_at(const struct scaler_policy_input *in, int32_t idx)
{
    if (idx < 0 || (size_t)idx >= in->n_offers || !in->offers)
        return NULL;
    return &in->offers[idx];
}

static uint64_t running_price(const struct scaler_offer *o, bool spot)
{
    if (!o)
        return 0;
    return spot && o->spot_available ? o->spot_price_microusd_per_hour : o->price_microusd_per_hour;
}

static uint64_t penalty_per_s(const struct scaler_policy_spec *spec)
{
    return spec->latency_penalty_microusd_per_s ? spec->latency_penalty_microusd_per_s
                                                : SCALER_LATENCY_PENALTY_MICROUSD_PER_S;
}

/* Can this function park at all with this offer? */
static bool can_park(const struct scaler_policy_spec *spec, const struct scaler_offer *o)
{
    return spec->idle_action == PW_SPEC_IDLE_PARK && o != NULL;
}

/* The offer whose prices drive the cost estimates: a replica's, else the one we'd buy. */
struct ref_offer {
    const struct scaler_offer *offer;
    bool spot;
};

static struct ref_offer reference_offer(const struct scaler_policy_input *in)
{
    struct ref_offer r = {NULL, false};
    for (size_t i = 0; i < in->obs.n_replicas; i++) {
        const struct scaler_replica_obs *rp = &in->obs.replicas[i];
        const struct scaler_offer *o = offer_at(in, rp->offer_index);
        if (o && rp->state != SCALER_REPLICA_TERMINATED && rp->state != SCALER_REPLICA_FAILED) {
            r.offer = o;
            r.spot = rp->spot;
            return r;
        }
    }
    struct scaler_offer_choice ch;
    if (in->n_offers &&
        scaler_offer_select(in->offers, in->n_offers, &in->spec->req, false, &ch) == PW_OK) {
        r.offer = &in->offers[ch.index];
        r.spot = ch.spot;
    }
    return r;
}

/* ------------------------------------------------------------------------------------ */
/* The gaps the plan is made from: conditioned on the current rate                      */

const char *scaler_plan_basis_name(enum scaler_plan_basis b)
{
    static const char *const names[] = {"none", "all", "rate"};
    if ((unsigned)b >= sizeof names / sizeof names[0])
        return "unknown";
    return names[b];
}

/*
 * Fills hist with the gaps the next keep-alive/pre-warm should be planned from, and says
 * which. The current rate estimate is the gap EWMA e. Each recent gap carries the EWMA in
 * force when it began, e_i; the SCALER_GAP_NEIGHBORS gaps with the smallest |ln(e_i / e)|
 * (ties: the more recent), of those within a factor SCALER_GAP_NEAR_FACTOR of e, are the
 * gaps that followed a similar rate. If there are at least SCALER_GAP_MIN_SAMPLES, they
 * are the plan's histogram (basis RATE); if not, the history is not representative of this rate and
 * all recent gaps are used (basis ALL), as they are while no more than SCALER_GAP_NEIGHBORS gaps
 * have been recorded.
 */
static enum scaler_plan_basis plan_hist(const struct scaler_policy_state *st, uint32_t *hist)
{
    memset(hist, 0, SCALER_GAP_BINS * sizeof *hist);
    size_t n = st->gaps_seen < SCALER_GAP_RECENT ? st->gaps_seen : SCALER_GAP_RECENT;
    if (n <= SCALER_GAP_NEIGHBORS) {
        for (size_t i = 0; i < n; i++)
            hist[bin_of(st->recent[i].gap_ms)]++;
        return SCALER_PLAN_ALL;
    }
    double e = (double)(st->gap_ewma_ms > 0 ? st->gap_ewma_ms : 1);
    double dist[SCALER_GAP_RECENT];
    bool used[SCALER_GAP_RECENT];
    for (size_t j = 0; j < n; j++) {
        double ei = st->recent[j].ewma_ms ? (double)st->recent[j].ewma_ms : 1.0;
        dist[j] = fabs(log(ei / e));
        used[j] = false;
    }
    const double near_d = log((double)SCALER_GAP_NEAR_FACTOR) + 1e-9;
    size_t near = 0;
    for (size_t k = 0; k < SCALER_GAP_NEIGHBORS; k++) {
        size_t best = n;
        for (size_t age = 0; age < n; age++) { /* newest first: ties go to the newer */
            size_t j = (st->gaps_seen - 1 - age) % SCALER_GAP_RECENT;
            if (!used[j] && (best == n || dist[j] < dist[best]))
                best = j;
        }
        used[best] = true;
        if (dist[best] > near_d)
            break; /* the rest are further still */
        hist[bin_of(st->recent[best].gap_ms)]++;
        near++;
    }
    if (near >= SCALER_GAP_MIN_SAMPLES)
        return SCALER_PLAN_RATE;
    /* Not representative of the current rate: plan from all recent gaps. */
    memset(hist, 0, SCALER_GAP_BINS * sizeof *hist);
    for (size_t j = 0; j < n; j++)
        hist[bin_of(st->recent[j].gap_ms)]++;
    return SCALER_PLAN_ALL;
}

/* ------------------------------------------------------------------------------------ */
/* Adaptive plan: keep-alive and pre-warm windows from the idle-gap histogram           */

/* Sub-points per histogram bin for the pre-warm start: a bin is 5 % wide (30 s at 10 min),
 * so its gaps are taken as spread evenly over SCALER_PREWARM_SUBBINS points inside it. */
#define SCALER_PREWARM_SUBBINS 8

/*
 * The cheapest pre-warm start W (ms after the last request) for the gaps beyond the
 * keep-alive K (bins first..hi; `beyond` of them, window end `to`), or false when no
 * pre-warm beats taking the cold starts. Per gap g, with s the start time:
 *   no pre-warm:            penalty                      (cold start)
 *   g < W:                  penalty                      (came before the window)
 *   W <= g < W + s:         s * p + (W + s - g) * L      (waits for the unpark under way)
 *   W + s <= g <= to:       (g - W) * p                  (served warm)
 *   g > to:                 (to - W) * p + penalty       (window ran out)
 * Candidates: W = each sub-point's lower edge - s - one tick (the policy may notice a tick
 * late), W > K. Equal costs go to the later W (less machine time for the same outcome).
 */
static bool prewarm_start(const uint32_t *hist, const struct bins *bn, size_t first, size_t hi,
                          double keep_ms, double to, double start_ms, double price_ms,
                          double penalty, double beyond, double *from_out)
{
    const double lat_ms = (penalty - start_ms * price_ms) / (start_ms > 0 ? start_ms : 1);
    const double none = beyond * penalty;
    double best = none, best_w = -1;
    for (size_t cb = hi + 1; cb-- > first;) {
        double clo = cb ? bn->up[cb - 1] : 0, cw = (bn->up[cb] - clo) / SCALER_PREWARM_SUBBINS;
        for (int ck = SCALER_PREWARM_SUBBINS - 1; ck >= 0; ck--) {
            double w = clo + ck * cw - start_ms - SCALER_TICK_MS;
            if (w <= keep_ms)
                continue;
            double cost = 0;
            for (size_t b = first; b < SCALER_GAP_BINS; b++) {
                if (!hist[b])
                    continue;
                double lo = b ? bn->up[b - 1] : 0, bw = (bn->up[b] - lo) / SCALER_PREWARM_SUBBINS;
                double m = (double)hist[b] / SCALER_PREWARM_SUBBINS;
                for (int k = 0; k < SCALER_PREWARM_SUBBINS; k++) {
                    double g = lo + (k + 0.5) * bw;
                    if (g < w)
                        cost += m * penalty;
                    else if (g < w + start_ms)
                        cost += m * (start_ms * price_ms + (w + start_ms - g) * lat_ms);
                    else if (g <= to)
                        cost += m * (g - w) * price_ms;
                    else
                        cost += m * ((to - w) * price_ms + penalty);
                }
            }
            if (cost < best) {
                best = cost;
                best_w = w;
            }
        }
    }
    if (best_w < 0)
        return false;
    *from_out = best_w;
    return true;
}

/*
 * Expected cost per gap of keeping warm for K ms after a request, over the histogram:
 *   sum_b c_b * (min(rep_b, K) * price_ms + [rep_b > K] * penalty)
 * Keep-alive = the K (0, a bin edge, or idle_ms) that minimises it; ties go to the longer
 * K (fewer cold starts for the same money). Pre-warm: over the gaps longer than K, warm
 * again from the start prewarm_start() finds cheapest to their 99th percentile's upper
 * edge, if that costs less than the cold starts it saves.
 */
static void make_plan(struct scaler_policy_state *st, const uint32_t *hist,
                      const struct scaler_policy_spec *spec, const struct ref_offer *ref,
                      int64_t start_ms)
{
    double price_ms = (double)running_price(ref->offer, ref->spot) / 3600000.0;
    double penalty =
        (double)start_ms / 1000.0 * (double)penalty_per_s(spec) + (double)start_ms * price_ms;
    double cap = (double)spec->idle_ms;
    struct bins bn;
    bins_init(&bn);
    double suffix[SCALER_GAP_BINS + 1];
    double warm_below[SCALER_GAP_BINS + 1]; /* sum of c_b * rep_b for b < i */
    suffix[SCALER_GAP_BINS] = 0;
    for (size_t i = SCALER_GAP_BINS; i-- > 0;)
        suffix[i] = suffix[i + 1] + hist[i];
    warm_below[0] = 0;
    for (size_t i = 0; i < SCALER_GAP_BINS; i++)
        warm_below[i + 1] = warm_below[i] + hist[i] * bn.rep[i];

    /* Candidates: K = 0, the upper edge of each bin below the cap, and the cap itself.
     * For K between rep_(j-1) and rep_j the bins < j are covered, the rest are not. */
    double best_k = 0, best_cost = suffix[0] * penalty;
    size_t covered = 0;             /* bins whose rep <= k; k only grows */
    double best_beyond = suffix[0]; /* gaps the best K does not cover */
    for (size_t j = 0; j <= SCALER_GAP_BINS; j++) {
        double k = j < SCALER_GAP_BINS ? bn.up[j] : cap;
        if (k > cap)
            k = cap;
        while (covered < SCALER_GAP_BINS && bn.rep[covered] <= k)
            covered++;
        double cost = warm_below[covered] * price_ms + suffix[covered] * (k * price_ms + penalty);
        /* Equal cost: the longer K only if it covers more bins (fewer cold starts for the
         * same money); past the longest gap seen, a longer K buys nothing. */
        if (cost < best_cost || (cost <= best_cost && suffix[covered] < best_beyond)) {
            best_cost = cost;
            best_k = k;
            best_beyond = suffix[covered];
        }
        if (k >= cap)
            break;
    }
    if (price_ms <= 0)
        best_k = cap; /* a free machine: nothing to save, keep warm for idle_seconds */
    st->plan_keepalive_ms = (int64_t)best_k;
    st->plan_prewarm_from_ms = 0;
    st->plan_prewarm_to_ms = 0;

    /* Pre-warm over the gaps the keep-alive does not cover. The window ends at the upper
     * edge of their 99th-percentile bin; its start is chosen by cost (prewarm_start). */
    size_t first = 0;
    while (first < SCALER_GAP_BINS && bn.rep[first] <= best_k)
        first++;
    double beyond = suffix[first < SCALER_GAP_BINS ? first : SCALER_GAP_BINS];
    if (first >= SCALER_GAP_BINS || beyond < SCALER_GAP_MIN_SAMPLES)
        return;
    double hi_want = beyond * 0.99, cum = 0;
    size_t hi = SCALER_GAP_BINS;
    for (size_t i = first; i < SCALER_GAP_BINS; i++) {
        cum += hist[i];
        if (cum >= hi_want) {
            hi = i;
            break;
        }
    }
    if (hi >= SCALER_GAP_BINS - 1)
        return;
    double to = bn.up[hi];
    double from = 0;
    if (prewarm_start(hist, &bn, first, hi, best_k, to, (double)start_ms, price_ms, penalty, beyond,
                      &from)) {
        st->plan_prewarm_from_ms = (int64_t)from;
        st->plan_prewarm_to_ms = (int64_t)to;
    }
}

static uint64_t plan_key(const struct ref_offer *ref, int64_t start_ms,
                         const struct scaler_policy_spec *spec)
{
    uint64_t h = 1469598103934665603ULL;
    uint64_t parts[4] = {running_price(ref->offer, ref->spot), (uint64_t)start_ms, spec->idle_ms,
                         penalty_per_s(spec)};
    for (int i = 0; i < 4; i++) {
        h ^= parts[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* ------------------------------------------------------------------------------------ */
/* Breaker                                                                              */

static void record_failure(struct scaler_policy_state *st, int64_t now, const char *what)
{
    if (st->failure_window_start_ms == 0 ||
        now - st->failure_window_start_ms > SCALER_BREAKER_WINDOW_MS) {
        st->failure_window_start_ms = now;
        st->failed_starts = 0;
    }
    st->failed_starts++;
    st->last_failure_ms = now;
    snprintf(st->last_failure, sizeof st->last_failure, "%s", what);
    if (st->failed_starts >= SCALER_BREAKER_THRESHOLD && st->breaker_open_until_ms == 0) {
        int64_t backoff = SCALER_BREAKER_BASE_MS;
        for (uint32_t i = 0; i < st->breaker_trips && backoff < SCALER_BREAKER_MAX_MS; i++)
            backoff *= 2;
        if (backoff > SCALER_BREAKER_MAX_MS)
            backoff = SCALER_BREAKER_MAX_MS;
        st->breaker_trips++;
        st->breaker_open_until_ms = now + backoff;
    }
}

static bool breaker_open(const struct scaler_policy_state *st, int64_t now)
{
    return st->breaker_open_until_ms != 0 && now < st->breaker_open_until_ms;
}

/* ------------------------------------------------------------------------------------ */
/* The decision                                                                         */

/*
 * Expected time, ms, to finish the waiting batch work if a machine were started now: the
 * start (the fastest parked replica's unpark, else the provision of the offer that would be
 * bought) plus the work (batch_work_tokens, or SCALER_BATCH_LINE_TOKENS per line) at the
 * decode rate the ready replicas report (SCALER_BATCH_TOKENS_PER_S when none does).
 */
static int64_t batch_finish_ms(const struct scaler_policy_input *in,
                               const struct scaler_policy_spec *spec)
{
    const struct scaler_policy_obs *obs = &in->obs;
    int64_t start = -1;
    double tps = 0;
    for (size_t i = 0; obs->replicas && i < obs->n_replicas; i++) {
        const struct scaler_replica_obs *r = &obs->replicas[i];
        const struct scaler_offer *o = offer_at(in, r->offer_index);
        if (r->state == SCALER_REPLICA_PARKED && o && (start < 0 || o->unpark_ms < start))
            start = o->unpark_ms;
        if (r->state == SCALER_REPLICA_READY && r->tokens_per_s > tps)
            tps = r->tokens_per_s;
    }
    if (start < 0) {
        struct scaler_offer_choice ch;
        start = 0;
        if (in->n_offers &&
            scaler_offer_select(in->offers, in->n_offers, &spec->req, false, &ch) == PW_OK)
            start = in->offers[ch.index].provision_ms;
    }
    if (tps <= 0)
        tps = SCALER_BATCH_TOKENS_PER_S;
    uint64_t tokens = obs->batch_work_tokens
                          ? obs->batch_work_tokens
                          : obs->batch_pending * (uint64_t)SCALER_BATCH_LINE_TOKENS;
    return start + (int64_t)((double)tokens / tps * 1000.0);
}

static uint64_t div_ceil(uint64_t a, uint64_t b)
{
    return b ? (a + b - 1) / b : a;
}

static bool is_idle_ready(const struct scaler_replica_obs *r)
{
    return r->state == SCALER_REPLICA_READY && !r->action_pending && r->in_flight == 0 &&
           r->busy_slots == 0;
}

void scaler_policy_decide(const struct scaler_policy_input *in, struct scaler_policy_output *out)
{
    PW_ASSERT(in && in->spec && out);
    memset(out, 0, sizeof *out);
    out->state = in->state;
    struct scaler_policy_state *st = &out->state;
    const struct scaler_policy_spec *spec = in->spec;
    const struct scaler_policy_obs *obs = &in->obs;
    const int64_t now = in->now_ms;
    const size_t n = obs->replicas ? obs->n_replicas : 0;
    const uint32_t target = spec->target_concurrency ? spec->target_concurrency : 1;
    const uint32_t maxr = spec->max_replicas;
    /* Per-replica: an action was issued this tick (at most one per replica). */
    bool taken[256];
    size_t n_track = n < 256 ? n : 256;
    memset(taken, 0, sizeof taken);

    /* ---- 1. learn ---- */
    if (obs->last_request_ms > st->prev_request_ms) {
        if (st->prev_request_ms > 0 &&
            obs->last_request_ms - st->prev_request_ms >= SCALER_GAP_MIN_MS)
            scaler_policy_record_gap(st, obs->last_request_ms - st->prev_request_ms);
        st->prev_request_ms = obs->last_request_ms;
    }
    struct ref_offer ref = reference_offer(in);
    int64_t start_ms = 0;
    if (ref.offer)
        start_ms = can_park(spec, ref.offer) ? ref.offer->unpark_ms : ref.offer->provision_ms;
    bool adaptive = spec->adaptive && ref.offer && st->gap_count >= SCALER_GAP_MIN_SAMPLES;
    int64_t keepalive = (int64_t)spec->idle_ms;
    int64_t prewarm_from = 0, prewarm_to = 0;
    if (adaptive) {
        uint64_t key = plan_key(&ref, start_ms, spec);
        if (st->plan_gap_count != st->gaps_seen || st->plan_key != key) {
            uint32_t hist[SCALER_GAP_BINS];
            st->plan_basis = plan_hist(st, hist);
            make_plan(st, hist, spec, &ref, start_ms);
            st->plan_gap_count = st->gaps_seen;
            st->plan_key = key;
        }
        keepalive = st->plan_keepalive_ms;
        prewarm_from = st->plan_prewarm_from_ms;
        prewarm_to = st->plan_prewarm_to_ms;
    }
    out->keepalive_ms = (uint64_t)keepalive;
    out->plan_basis = adaptive ? (enum scaler_plan_basis)st->plan_basis : SCALER_PLAN_NONE;
    int64_t idle_for = obs->last_request_ms > 0 ? now - obs->last_request_ms : INT64_MAX / 4;

    /* Breaker: half-open once the back-off has passed (one more failure re-opens it). */
    if (st->breaker_open_until_ms != 0 && now >= st->breaker_open_until_ms) {
        st->breaker_open_until_ms = 0;
        st->failed_starts = SCALER_BREAKER_THRESHOLD - 1;
        st->failure_window_start_ms = now;
    }

    /* ---- 2. health ---- */
    uint32_t active = 0, ready = 0, parked = 0, starting = 0;
    uint64_t free_slots = 0;
    for (size_t i = 0; i < n; i++) {
        const struct scaler_replica_obs *r = &obs->replicas[i];
        if (r->state == SCALER_REPLICA_READY && r->since_ms > st->last_failure_ms &&
            st->failed_starts > 0 && !breaker_open(st, now)) {
            /* A start succeeded after the last failure: the crash loop is over. */
            st->failed_starts = 0;
            st->breaker_trips = 0;
            st->failure_window_start_ms = 0;
        }
    }
    for (size_t i = 0; i < n; i++) {
        const struct scaler_replica_obs *r = &obs->replicas[i];
        bool starting_state =
            r->state == SCALER_REPLICA_PROVISIONING || r->state == SCALER_REPLICA_STARTING;
        if (starting_state && !r->action_pending && spec->startup_timeout_ms > 0 &&
            now - r->start_ms >= (int64_t)spec->startup_timeout_ms) {
            char what[SCALER_REASON_MAX + 1];
            snprintf(what, sizeof what, "replica %s startup timeout %llus in %s", r->id,
                     (unsigned long long)(spec->startup_timeout_ms / 1000),
                     scaler_replica_state_name(r->state));
            record_failure(st, now, what);
            if (i < n_track)
                taken[i] = true;
            if (breaker_open(st, now)) {
                add_action(out, SCALER_ACT_TERMINATE, r->id, -1,
                           "startup_timeout replica=%s after_s=%lld limit_s=%llu breaker=open",
                           r->id, (long long)((now - r->start_ms) / 1000),
                           (unsigned long long)(spec->startup_timeout_ms / 1000));
                continue;
            }
            int32_t oi = r->offer_index;
            bool spot = r->spot;
            if (!offer_at(in, oi)) {
                struct scaler_offer_choice ch;
                if (scaler_offer_select(in->offers, in->n_offers, &spec->req, false, &ch) !=
                    PW_OK) {
                    add_action(out, SCALER_ACT_TERMINATE, r->id, -1,
                               "startup_timeout replica=%s after_s=%lld no_offer", r->id,
                               (long long)((now - r->start_ms) / 1000));
                    set_error(out, "%s", ch.reason);
                    continue;
                }
                oi = (int32_t)ch.index;
                spot = ch.spot;
            }
            struct scaler_action *a = add_action(
                out, SCALER_ACT_REPLACE, r->id, oi,
                "startup_timeout replica=%s after_s=%lld limit_s=%llu failed_starts=%u", r->id,
                (long long)((now - r->start_ms) / 1000),
                (unsigned long long)(spec->startup_timeout_ms / 1000), st->failed_starts);
            if (a)
                a->spot = spot;
            st->last_scale_up_ms = now;
            active++;
            starting++;
            continue;
        }
        if (r->state == SCALER_REPLICA_FAILED && !r->action_pending) {
            if (!r->was_ready) {
                char what[SCALER_REASON_MAX + 1];
                snprintf(what, sizeof what, "replica %s failed to start", r->id);
                record_failure(st, now, what);
            }
            if (i < n_track)
                taken[i] = true;
            add_action(out, SCALER_ACT_TERMINATE, r->id, -1,
                       "failed replica=%s was_ready=%d failed_starts=%u", r->id,
                       r->was_ready ? 1 : 0, st->failed_starts);
            continue;
        }
        switch (r->state) {
        case SCALER_REPLICA_PROVISIONING:
        case SCALER_REPLICA_STARTING:
            active++;
            starting++;
            break;
        case SCALER_REPLICA_READY: {
            active++;
            ready++;
            uint32_t slots = r->total_slots ? r->total_slots : spec->max_batch;
            if (slots > r->busy_slots && !r->action_pending)
                free_slots += slots - r->busy_slots;
            break;
        }
        case SCALER_REPLICA_PARKED:
            if (r->action_pending) { /* unpark (or terminate) under way */
                active++;
                starting++;
            } else {
                parked++;
            }
            break;
        default:
            break;
        }
    }
    out->ready = ready;
    out->parked = parked;
    bool blocked = breaker_open(st, now);
    if (blocked)
        set_error(out,
                  "crash-loop breaker open: %u failed starts within %ds; provisioning paused for "
                  "%llds (last: %s)",
                  SCALER_BREAKER_THRESHOLD, SCALER_BREAKER_WINDOW_MS / 1000,
                  (long long)((st->breaker_open_until_ms - now + 999) / 1000), st->last_failure);

    /* ---- 3. drained replicas ---- */
    for (size_t i = 0; i < n; i++) {
        const struct scaler_replica_obs *r = &obs->replicas[i];
        if (r->state != SCALER_REPLICA_DRAINING || r->action_pending || r->in_flight ||
            r->busy_slots)
            continue;
        if (i < n_track)
            taken[i] = true;
        if (spec->idle_action == PW_SPEC_IDLE_PARK)
            add_action(out, SCALER_ACT_PARK, r->id, -1, "drained replica=%s idle_action=park",
                       r->id);
        else
            add_action(out, SCALER_ACT_TERMINATE, r->id, -1,
                       "drained replica=%s idle_action=terminate", r->id);
    }

    /* ---- 4. desired ---- */
    uint64_t load = (uint64_t)obs->in_flight + obs->interactive_pending;
    uint64_t want = div_ceil(load, target);
    const char *why = "load";
    /* Batch: deferrable, low urgency. It only counts when interactive replicas have no free
     * slot (and none is starting), grows one replica per tick, and keeps one alive. */
    bool batch_only = obs->batch_pending > 0 && load == 0 && obs->interactive_pending == 0;
    uint64_t batch_want = 0;
    if (obs->batch_pending > 0) {
        if (free_slots == 0 && starting == 0) {
            batch_want = div_ceil(obs->batch_pending, (uint64_t)target * SCALER_BATCH_FACTOR);
            if (batch_want > (uint64_t)active + 1)
                batch_want = (uint64_t)active + 1;
        } else if (active > 0) {
            batch_want = 1;
        }
        if (st->batch_wait_since_ms == 0)
            st->batch_wait_since_ms = now;
    } else {
        st->batch_wait_since_ms = 0;
    }
    if (batch_want > want) {
        want = batch_want;
        why = "batch";
    }
    /* Pre-warm: inside the planned window after the last request, keep one replica. */
    bool in_prewarm = prewarm_to > 0 && obs->last_request_ms > 0 && idle_for >= prewarm_from &&
                      idle_for < prewarm_to;
    if (in_prewarm && want == 0) {
        want = 1;
        why = "prewarm";
    }
    uint64_t desired = want;
    if (desired < spec->min_replicas) {
        desired = spec->min_replicas;
        if (want < desired)
            why = "min_replicas";
    }
    if (desired > maxr)
        desired = maxr;
    out->desired = (uint32_t)desired;
    out->active = active;

    /* Hysteresis memory: since when has desired been below active? */
    if (desired < active) {
        if (st->below_since_ms == 0)
            st->below_since_ms = now;
    } else {
        st->below_since_ms = 0;
    }

    /* ---- 5a. scale up (at once) ---- */
    if (desired > active) {
        uint64_t need = desired - active;
        int64_t batch_waited = now - st->batch_wait_since_ms;
        if (obs->batch_oldest_ms > batch_waited)
            batch_waited = obs->batch_oldest_ms;
        /* Batch-only demand is deferrable: while batch_pick, only spot or free capacity is
         * taken (a parked spot/free replica, or a spot/free offer), else it waits. It stops
         * waiting after the deferral limit, or when the pending work would no longer finish
         * safely before the oldest deadline (batch_defer_end says which). */
        const int64_t defer_limit =
            spec->batch_defer_ms ? (int64_t)spec->batch_defer_ms : SCALER_BATCH_DEFER_MS;
        bool batch_pick = why[0] == 'b' && batch_only;
        const char *defer_end = "";
        int64_t deadline_in = obs->batch_deadline_ms > 0 ? obs->batch_deadline_ms - now : -1;
        int64_t finish_ms = 0;
        if (batch_pick) {
            finish_ms = batch_finish_ms(in, spec);
            if (batch_waited >= defer_limit) {
                batch_pick = false;
                defer_end = " batch_defer_end=waited";
            } else if (deadline_in >= 0 &&
                       deadline_in <= SCALER_BATCH_DEADLINE_FACTOR * finish_ms) {
                batch_pick = false;
                defer_end = " batch_defer_end=deadline";
            }
        }
        /* A draining replica will be parked within a tick or two of its last request ending
         * and can then be unparked: wait for it rather than buy a fresh machine. */
        uint64_t draining = 0;
        for (size_t i = 0; i < n; i++)
            draining += obs->replicas[i].state == SCALER_REPLICA_DRAINING &&
                        spec->idle_action == PW_SPEC_IDLE_PARK;
        for (uint64_t k = 0; k < need; k++) {
            if (blocked)
                break;
            /* Unpark first: cheaper and faster than a fresh machine. Shortest unpark wins. */
            size_t best = n;
            uint32_t best_ms = UINT32_MAX;
            for (size_t i = 0; i < n_track; i++) {
                const struct scaler_replica_obs *r = &obs->replicas[i];
                if (r->state != SCALER_REPLICA_PARKED || r->action_pending || taken[i])
                    continue;
                const struct scaler_offer *o = offer_at(in, r->offer_index);
                if (batch_pick && !(o && (r->spot || running_price(o, false) == 0)))
                    continue; /* deferring batch work: no on-demand machine, parked or not */
                uint32_t ms = o ? o->unpark_ms : UINT32_MAX - 1;
                if (ms < best_ms) {
                    best_ms = ms;
                    best = i;
                }
            }
            char ctx_s[128];
            snprintf(ctx_s, sizeof ctx_s, "desired=%llu active=%u in_flight=%u queue_lag=%llu",
                     (unsigned long long)desired, active, obs->in_flight,
                     (unsigned long long)obs->interactive_pending);
            const char *verb = ready == 0 && why[0] == 'l' ? "scale_from_zero"
                               : why[0] == 'b'             ? "batch_scale_up"
                               : why[0] == 'p'             ? "prewarm"
                               : why[0] == 'm'             ? "min_replicas"
                                                           : "scale_up";
            if (best < n) {
                taken[best] = true;
                struct scaler_action *a =
                    add_action(out, SCALER_ACT_UNPARK, obs->replicas[best].id, -1,
                               "%s %s target=%u from=parked batch_pending=%llu%s", verb, ctx_s,
                               target, (unsigned long long)obs->batch_pending, defer_end);
                if (a)
                    a->batch = why[0] == 'b';
                st->last_scale_up_ms = now;
                continue;
            }
            if (draining > 0) {
                draining--;
                continue;
            }
            struct scaler_offer_choice ch;
            enum pw_err e =
                scaler_offer_select(in->offers, in->n_offers, &spec->req, batch_pick, &ch);
            if (e != PW_OK) {
                if (batch_pick) {
                    set_error(out,
                              "batch work deferred (waiting for spot or free machine, %llds of "
                              "%llds): %s",
                              (long long)(batch_waited / 1000), (long long)(defer_limit / 1000),
                              ch.reason);
                    snprintf(out->note, sizeof out->note,
                             "batch_defer pending=%llu waited_s=%lld limit_s=%lld "
                             "deadline_in_s=%lld finish_est_s=%lld reason=wait_spot",
                             (unsigned long long)obs->batch_pending,
                             (long long)(batch_waited / 1000), (long long)(defer_limit / 1000),
                             (long long)(deadline_in < 0 ? -1 : deadline_in / 1000),
                             (long long)(finish_ms / 1000));
                } else {
                    set_error(out, "%s", ch.reason);
                }
                break;
            }
            struct scaler_action *a =
                add_action(out, SCALER_ACT_PROVISION, NULL, (int32_t)ch.index,
                           "%s %s target=%u %s%s", verb, ctx_s, target, ch.reason, defer_end);
            if (a) {
                a->spot = ch.spot;
                a->batch = why[0] == 'b';
            }
            st->last_scale_up_ms = now;
        }
    }

    /* ---- 5b. scale down (after the windows, idle replicas only, drain first) ---- */
    if (desired < active) {
        bool over_max = active > maxr;
        bool ok;
        if (desired == 0) {
            ok = idle_for >= keepalive && !in_prewarm;
        } else {
            int64_t window =
                keepalive > SCALER_STABILIZE_MIN_MS ? keepalive : SCALER_STABILIZE_MIN_MS;
            ok = now - st->below_since_ms >= window;
        }
        uint64_t surplus = active - desired;
        if (!ok && over_max) {
            ok = true; /* max lowered: shed the excess at once, the rest waits its window */
            surplus = active - maxr;
        }
        while (ok && surplus > 0) {
            /* The most expensive idle replica goes first; then the youngest. */
            size_t pick = n;
            uint64_t pick_price = 0;
            int64_t pick_since = 0;
            for (size_t i = 0; i < n_track; i++) {
                const struct scaler_replica_obs *r = &obs->replicas[i];
                if (!is_idle_ready(r) || taken[i])
                    continue;
                uint64_t p = running_price(offer_at(in, r->offer_index), r->spot);
                if (pick == n || p > pick_price || (p == pick_price && r->since_ms > pick_since)) {
                    pick = i;
                    pick_price = p;
                    pick_since = r->since_ms;
                }
            }
            if (pick == n)
                break; /* every replica has work in flight: never interrupt it */
            taken[pick] = true;
            add_action(out, SCALER_ACT_DRAIN, obs->replicas[pick].id, -1,
                       "scale_down desired=%llu active=%u idle_s=%lld keepalive_s=%lld "
                       "basis=%s gap_ewma_s=%lld%s",
                       (unsigned long long)desired, active,
                       (long long)(idle_for > 999999999 ? -1 : idle_for / 1000),
                       (long long)(keepalive / 1000), scaler_plan_basis_name(out->plan_basis),
                       (long long)(st->gap_ewma_ms / 1000), over_max ? " over_max=1" : "");
            st->last_scale_down_ms = now;
            surplus--;
        }
    }

    /* ---- 6. parked: stay parked or terminate? ---- */
    if (spec->park_cost_decision && spec->idle_action == PW_SPEC_IDLE_PARK) {
        /* The idle-gap history predicts when the NEXT request comes, i.e. when the first
         * parked replica is needed. Further parked replicas are needed only when several
         * are wanted at once, which the history does not predict: they use ski rental on
         * their own parked time. `kept` counts parked replicas already judged. */
        uint32_t kept = ready > 0 || starting > 0 ? 1 : 0;
        for (size_t i = 0; i < n_track; i++) {
            const struct scaler_replica_obs *r = &obs->replicas[i];
            if (r->state != SCALER_REPLICA_PARKED || r->action_pending || taken[i])
                continue;
            const struct scaler_offer *o = offer_at(in, r->offer_index);
            if (!o)
                continue;
            int64_t t = obs->last_request_ms > 0 ? now - obs->last_request_ms : now - r->since_ms;
            if (t < 0)
                t = 0;
            bool first = kept++ == 0;
            if (first && prewarm_to > 0 && t < prewarm_to)
                continue; /* a pre-warm is planned: it needs this replica */
            /* Expected rest of this idle gap. */
            double rest;
            const char *basis;
            if (!first) {
                rest = (double)(now - r->since_ms);
                basis = "spare";
            } else if (st->gap_count >= SCALER_GAP_MIN_SAMPLES) {
                double mass = 0, sum = 0;
                struct bins bn;
                bins_init(&bn);
                for (size_t b = 0; b < SCALER_GAP_BINS; b++) {
                    double rep = bn.rep[b];
                    if (rep > (double)t) {
                        mass += st->gap_hist[b];
                        sum += st->gap_hist[b] * (rep - (double)t);
                    }
                }
                rest = mass > 0 ? sum / mass : (double)t;
                basis = mass > 0 ? "histogram" : "elapsed";
            } else if (st->gap_ewma_ms > t) {
                rest = (double)(st->gap_ewma_ms - t);
                if (rest < (double)t)
                    rest = (double)t;
                basis = "ewma";
            } else {
                rest = (double)t; /* ski rental: expect as long again as already waited */
                basis = "elapsed";
            }
            double parked_cost = (double)o->parked_microusd_per_hour * rest / 3600000.0;
            double extra_ms = (double)o->provision_ms - (double)o->unpark_ms;
            if (extra_ms < 0)
                extra_ms = 0;
            double price_ms = (double)running_price(o, r->spot) / 3600000.0;
            /* A spare is wanted only while another replica already serves, so starting it
             * fresh instead of unparking makes no request wait for a cold start: only the
             * longer start is paid, not the latency penalty. */
            double cold_extra = extra_ms * price_ms;
            if (first)
                cold_extra += extra_ms / 1000.0 * (double)penalty_per_s(spec);
            if (parked_cost > cold_extra) {
                taken[i] = true;
                add_action(out, SCALER_ACT_TERMINATE, r->id, -1,
                           "park_vs_terminate=terminate replica=%s expected_idle_s=%.0f basis=%s "
                           "parked_cost_usd=%.6f cold_start_extra_usd=%.6f",
                           r->id, rest / 1000.0, basis, parked_cost / 1e6, cold_extra / 1e6);
            }
        }
    }
}

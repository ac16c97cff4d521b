/*
 * scaler_policy: the scaling policy of one function, as a pure function.
 *
 *     (spec, clock, observations, offers, previous state) -> (actions, desired, new state)
 *
 * No I/O, no clock reads, no globals: the live scaler (scaler/main.c) calls it every tick
 * for every function with what it observed in Redis, and `parkway simulate`
 * (scaler_sim.c) calls the very same function against simulated replicas. The rules and
 * constants are documented in docs/internals/scaler-policy.md.
 *
 * Contract with the caller (the reconciler):
 *  - Call it every SCALER_TICK_MS (any period works; the rules use timestamps, not ticks).
 *  - Keep out->state and pass it back as in->state next time (zero it for a new function).
 *  - Carry out every action, or mark it in progress, BEFORE the next call: a replica an
 *    action was issued for must then show its new state or `action_pending = true`; a
 *    PROVISION must show up as a replica in PROVISIONING (create the record at once, before
 *    the provider answers) or the policy will ask again.
 *  - Replicas in TERMINATED may be left in the list or dropped; both are ignored.
 */
#ifndef SCALER_POLICY_H
#define SCALER_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_spec.h"
#include "scaler_offers.h"

/* ---- constants (see docs/internals/scaler-policy.md) ---- */

/* The scaler's period, ms. */
#define SCALER_TICK_MS 250
/* Partial scale-down (n -> n-1, n > 1 or above min) waits at least this long, ms, even
 * when idle_seconds is smaller: the hysteresis floor that stops flapping. */
#define SCALER_STABILIZE_MIN_MS 30000
/* Crash-loop breaker: this many failed starts within the window open it. */
#define SCALER_BREAKER_THRESHOLD 3
#define SCALER_BREAKER_WINDOW_MS (10 * 60 * 1000)
/* First back-off; doubled each time the breaker re-opens, capped. */
#define SCALER_BREAKER_BASE_MS 30000
#define SCALER_BREAKER_MAX_MS (30 * 60 * 1000)
/* Batch-only demand waits at most this long for a spot or free machine before on-demand
 * (the spec's batch_defer_ms overrides it). */
#define SCALER_BATCH_DEFER_MS (5 * 60 * 1000)
/* ...and only while the pending batch work would still finish before the oldest batch
 * deadline with this safety factor: now + factor x (start + work) < deadline. */
#define SCALER_BATCH_DEADLINE_FACTOR 2
/* Decode rate a new replica is assumed to give batch work when none reports one, tokens/s
 * (all slots together; a heartbeat's tokens_per_s replaces it). */
#define SCALER_BATCH_TOKENS_PER_S 50
/* Tokens one waiting batch line is assumed to need when the observer could not say. */
#define SCALER_BATCH_LINE_TOKENS 512
/* Batch demand counts as this many times less urgent: desired = ceil(pending / (target*4)). */
#define SCALER_BATCH_FACTOR 4
/* Default price of one second a request waits for a cold start, micro-USD (the keep-alive
 * and park-vs-terminate trade-offs weigh machine time against this): 0.90 USD per hour of
 * waiting. With example-cloud cpu-4x16 (0.17 USD/h, unpark 8 s) an unpark is then worth
 * ~50 s of running, so a replica is kept warm only while the next gap is expected within
 * about 50 s (see docs/internals/scaler-policy.md for how this was chosen). */
#define SCALER_LATENCY_PENALTY_MICROUSD_PER_S 250
/* Idle-gap histogram: bin 0 = under 1 s, bin i >= 1 = [1 s * 1.05^(i-1), 1 s * 1.05^i) (the
 * last bin is open-ended, from ~14 days); adaptive needs this many gaps before it trusts it. */
#define SCALER_GAP_BINS 288
#define SCALER_GAP_MIN_SAMPLES 8
/* Gaps shorter than this are the same burst, not idle time, and are not recorded, ms. */
#define SCALER_GAP_MIN_MS 2000
/* EWMA weight of a new idle gap, per mille. The EWMA is the policy's estimate of the
 * function's current arrival rate (mean gap). */
#define SCALER_GAP_EWMA_PERMILLE 250
/* The most recent gaps are kept with the EWMA in force when each began, so that the plan
 * can use the gaps that followed a similar rate: the SCALER_GAP_NEIGHBORS recorded gaps
 * whose EWMA is nearest (in ratio) to the current one. If fewer than SCALER_GAP_MIN_SAMPLES
 * of them lie within a factor SCALER_GAP_NEAR_FACTOR of it, the history is not
 * representative of the current rate and the plan uses all recent gaps. */
#define SCALER_GAP_RECENT 192
#define SCALER_GAP_NEIGHBORS 32
#define SCALER_GAP_NEAR_FACTOR 2

/* Longest replica id, reason and error strings (without the NUL). */
#define SCALER_REPLICA_ID_MAX 63
#define SCALER_REASON_MAX 191
/* Most actions one decision returns (more are deferred to the next tick). */
#define SCALER_POLICY_MAX_ACTIONS 32

enum scaler_replica_state {
    SCALER_REPLICA_PROVISIONING = 0, /* the provider is creating the machine */
    SCALER_REPLICA_STARTING,         /* machine up (or unparking); engine loading the model */
    SCALER_REPLICA_READY,            /* serving */
    SCALER_REPLICA_DRAINING,         /* takes no new work; finishing what it has */
    SCALER_REPLICA_PARKED,           /* stopped, fast to resume, parked price */
    SCALER_REPLICA_TERMINATED,       /* gone, no charges */
    SCALER_REPLICA_FAILED,           /* crashed or start failed; needs cleanup */
    SCALER_REPLICA_STATE_COUNT
};

/* "provisioning", "ready", ...; "unknown" outside the enum. */
const char *scaler_replica_state_name(enum scaler_replica_state s);
/* Parses the names above; false if unknown. */
bool scaler_replica_state_parse(const char *name, enum scaler_replica_state *out);

/* What the scaler knows about one replica this tick. */
struct scaler_replica_obs {
    char id[SCALER_REPLICA_ID_MAX + 1]; /* unique within the function */
    enum scaler_replica_state state;
    int64_t since_ms;          /* when it entered `state`, ms (same clock as `now_ms`) */
    int64_t start_ms;          /* when its current start (provision or unpark) began, ms */
    bool ready;                /* the engine's heartbeat says it serves */
    bool was_ready;            /* it has been READY at least once since its last start */
    bool action_pending;       /* the reconciler is acting on it: leave it alone */
    uint32_t busy_slots;       /* sequences being decoded */
    uint32_t total_slots;      /* engine max_batch; 0 = unknown (spec max_batch used) */
    uint32_t in_flight;        /* requests claimed and not yet finished */
    int64_t last_heartbeat_ms; /* 0 = never */
    double tokens_per_s;       /* decode throughput from the heartbeat; 0 = unknown */
    int32_t offer_index;       /* into in->offers; -1 = unknown */
    bool spot;                 /* bought as spot */
};

/* What the scaler observed about the function's queues this tick. */
struct scaler_policy_obs {
    uint64_t interactive_pending;  /* entries waiting in the interactive stream (lag) */
    int64_t interactive_oldest_ms; /* age of the oldest waiting one, ms; 0 = none */
    uint64_t batch_pending;        /* entries waiting in the batch stream */
    int64_t batch_oldest_ms;       /* age of the oldest waiting batch entry, ms; 0 = none */
    uint32_t in_flight;            /* requests being served, all replicas together */
    uint64_t queued_prompt_tokens; /* prompt tokens of the waiting interactive entries */
    int64_t batch_deadline_ms;     /* earliest deadline (wall ms, same clock as now_ms) of the
                                      waiting batch entries; 0 = none or unknown */
    uint64_t batch_work_tokens;    /* tokens (prompt + output) the waiting batch entries
                                      need, estimated; 0 = unknown */
    int64_t last_request_ms;       /* arrival of the latest request, ms; 0 = never */
    const struct scaler_replica_obs *replicas; /* borrowed for the call */
    size_t n_replicas;
};

/* The spec fields the policy reads; fill with scaler_policy_spec_from(). */
struct scaler_policy_spec {
    uint32_t min_replicas;
    uint32_t max_replicas;
    uint32_t target_concurrency;
    uint64_t idle_ms; /* scaling.idle_seconds * 1000 */
    enum pw_spec_idle_action idle_action;
    uint64_t startup_timeout_ms; /* scaling.startup_timeout_seconds * 1000 */
    uint32_t max_batch;          /* engine.max_batch: slots per replica */
    uint64_t max_queue_wait_ms;
    struct scaler_offer_req req; /* resources and pricing */
    /* Adaptive keep-alive and pre-warm from the idle-gap histogram (on for the live
     * scaler; off gives the plain fixed-idle-timeout behaviour). */
    bool adaptive;
    /* After an idle park, weigh staying parked against terminating (on by default). */
    bool park_cost_decision;
    /* What one second of cold-start wait is worth, micro-USD; 0 = the default constant. */
    uint64_t latency_penalty_microusd_per_s;
    /* Longest wait of batch-only demand for a spot/free machine, ms; 0 = the default. */
    uint64_t batch_defer_ms;
};

/* Which gaps the adaptive plan was made from (see SCALER_GAP_RECENT). */
enum scaler_plan_basis {
    SCALER_PLAN_NONE = 0, /* no plan: fewer than SCALER_GAP_MIN_SAMPLES gaps, or off */
    SCALER_PLAN_ALL,      /* all recent gaps (too few, or none near the current rate) */
    SCALER_PLAN_RATE,     /* the recent gaps that followed a similar rate */
};
/* "none", "all", "rate". */
const char *scaler_plan_basis_name(enum scaler_plan_basis b);

/* One recorded gap and the rate estimate (gap EWMA) in force when it began. */
struct scaler_gap_sample {
    uint32_t gap_ms;  /* capped at UINT32_MAX */
    uint32_t ewma_ms; /* EWMA before this gap was recorded (the gap itself for the first) */
};

/* Fills ps from a spec, with adaptive and park_cost_decision on. Borrows the spec. */
void scaler_policy_spec_from(struct scaler_policy_spec *ps, const struct pw_spec *spec);

/* The policy's memory between ticks; zero-initialise for a new function. Plain data. */
struct scaler_policy_state {
    int64_t last_scale_up_ms;        /* last PROVISION/UNPARK issued; 0 = never */
    int64_t last_scale_down_ms;      /* last DRAIN/PARK/TERMINATE for capacity; 0 = never */
    int64_t below_since_ms;          /* desired < active continuously since; 0 = not below */
    int64_t batch_wait_since_ms;     /* batch-only demand unserved since; 0 = none */
    uint32_t failed_starts;          /* failed starts inside the current window */
    int64_t failure_window_start_ms; /* first failure of the window */
    int64_t last_failure_ms;         /* latest failed start; 0 = none */
    uint32_t breaker_trips;          /* times the breaker opened since the last success */
    int64_t breaker_open_until_ms;   /* provisioning blocked until; 0 = closed */
    char last_failure[SCALER_REASON_MAX + 1]; /* e.g. "replica r3 startup timeout 120s" */
    int64_t prev_request_ms;                  /* last_request_ms seen by the previous call */
    int64_t gap_ewma_ms;                      /* EWMA of idle gaps (>= 1 s) between requests, ms */
    uint32_t gap_count;                 /* gaps recorded in the histogram (halved when aging) */
    uint32_t gap_hist[SCALER_GAP_BINS]; /* idle-gap histogram, bins of x1.05 from 1 s */
    uint32_t gaps_seen;                 /* gaps recorded ever (wraps) */
    struct scaler_gap_sample recent[SCALER_GAP_RECENT]; /* ring: gaps_seen % RECENT is next */
    /* Adaptive plan, recomputed when a gap is recorded or the reference offer changes. */
    uint32_t plan_gap_count;      /* gaps_seen the plan was made with; 0 = no plan */
    uint32_t plan_basis;          /* enum scaler_plan_basis */
    uint64_t plan_key;            /* hash of the prices/delays it was made with */
    int64_t plan_keepalive_ms;    /* keep warm this long after the last request */
    int64_t plan_prewarm_from_ms; /* warm again from last request + this; 0 = no pre-warm */
    int64_t plan_prewarm_to_ms;   /* ... until last request + this */
};

/* Updates the idle-gap memory for a new request arrival gap (exposed for tests and sim). */
void scaler_policy_record_gap(struct scaler_policy_state *st, int64_t gap_ms);
/* The p-th percentile (0..100) of the recorded gaps, ms (upper edge of its bin); 0 if none. */
int64_t scaler_policy_gap_percentile(const struct scaler_policy_state *st, unsigned pct);

struct scaler_policy_input {
    const struct scaler_policy_spec *spec;
    int64_t now_ms;
    struct scaler_policy_obs obs;
    const struct scaler_offer *offers; /* borrowed; may be NULL with n_offers 0 */
    size_t n_offers;
    struct scaler_policy_state state; /* as returned last time (copied in) */
};

enum scaler_action_kind {
    SCALER_ACT_PROVISION = 0, /* start a new replica on offers[offer_index] (spot?) */
    SCALER_ACT_UNPARK,        /* resume parked replica_id */
    SCALER_ACT_DRAIN,         /* replica_id stops taking work, finishes in-flight */
    SCALER_ACT_PARK,          /* park drained replica_id */
    SCALER_ACT_TERMINATE,     /* release replica_id */
    SCALER_ACT_REPLACE,       /* terminate replica_id, provision offers[offer_index] instead */
};

/* "provision", "unpark", "drain", "park", "terminate", "replace". */
const char *scaler_action_name(enum scaler_action_kind k);

struct scaler_action {
    enum scaler_action_kind kind;
    char replica_id[SCALER_REPLICA_ID_MAX + 1]; /* target; "" for PROVISION */
    int32_t offer_index;                        /* PROVISION/REPLACE; else -1 */
    bool spot;                                  /* PROVISION/REPLACE: buy as spot */
    bool batch;                                 /* taken for batch-only demand */
    /* key=value line for pw:events and the log, e.g. "scale_up queue_lag=12 target=8" */
    char reason[SCALER_REASON_MAX + 1];
};

struct scaler_policy_output {
    uint32_t desired;                  /* replicas wanted serving (ready or starting), clamped */
    uint32_t active;                   /* replicas counted as serving or starting this tick */
    uint32_t ready;                    /* replicas READY */
    uint32_t parked;                   /* replicas PARKED */
    uint64_t keepalive_ms;             /* idle window in force (adaptive or idle_seconds) */
    enum scaler_plan_basis plan_basis; /* what the adaptive window came from; NONE = fixed */
    size_t n_actions;
    struct scaler_action actions[SCALER_POLICY_MAX_ACTIONS];
    /* "" or one line the user should see (breaker open, no offer fits) */
    char error[SCALER_REASON_MAX + 1];
    /* "" or a key=value decision that took no action this tick, for pw:events, e.g.
     * "batch_defer pending=120 waited_s=40 limit_s=300 deadline_in_s=86000 reason=wait_spot" */
    char note[SCALER_REASON_MAX + 1];
    struct scaler_policy_state state; /* store and pass back next call */
};

/*
 * Decides. Pure: reads only *in, writes only *out (zeroed first). in->spec must not be
 * NULL; obs.replicas may be NULL when n_replicas is 0. Never fails.
 */
void scaler_policy_decide(const struct scaler_policy_input *in, struct scaler_policy_output *out);

#endif

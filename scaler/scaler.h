/*
 * scaler: the parkway-scaler process. Read this first.
 *
 * One process watches every function of a spec directory and keeps each served at the
 * lowest cost. Every SCALER_TICK_MS (and at once when a router publishes the function's
 * name on pw:wake) it
 *   1. observes the function in Redis (scaler_observe.c): queue lag and oldest waiting
 *      entry, pending (in-flight) entries per consumer, engine heartbeats;
 *   2. runs the pure policy (scaler_policy.h) on those observations;
 *   3. applies the actions through the provider (scaler_reconcile.c), records each in
 *      pw:events with its reason and one log line, and writes pw:{fn}:scale.
 * Providers (scaler_provider.h) run their operations asynchronously and report back.
 *
 * Threads: one. The libevent loop runs Redis replies, timers, signals and child processes.
 * docs/internals/scaler.md describes the loop, the provider contract and park/unpark.
 */
#ifndef SCALER_H
#define SCALER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_keyspace.h"
#include "pw_spec.h"
#include "scaler_cost.h"
#include "scaler_policy.h"
#include "scaler_provider.h"

struct event;
struct event_base;
struct pw_redis;
struct scaler_children;

/* Heartbeat older than this: the engine does not count as serving, ms. */
#define SCALER_HEARTBEAT_STALE_MS 3000
/* A READY replica silent this long is failed (the engines' own stale-claim time), ms. */
#define SCALER_HEARTBEAT_LOST_MS 15000
/* pw:events is trimmed to about this many entries. */
#define SCALER_EVENTS_MAXLEN 10000
/* A standing policy note (batch_defer) is logged to pw:events again at most this often. */
#define SCALER_NOTE_EVERY_MS 30000
/* Specs and groups are registered again every this many ticks (Redis may have restarted). */
#define SCALER_REGISTER_EVERY_TICKS 40
/* Most --engine-arg options. */
#define SCALER_ENGINE_ARGS_MAX 16
/* On SIGTERM, wait at most this long for instances to terminate, ms. */
#define SCALER_STOP_TIMEOUT_MS 40000

/* ---- command line ---- */
struct scaler_opts {
    const char *redis_url;       /* --redis */
    const char *functions_dir;   /* --functions (default "functions") */
    const char *provider;        /* --provider: "local" (default) or "exec" */
    const char *provider_config; /* --provider-config: exec hooks YAML */
    const char *engine_path;     /* --engine; default ../engine/parkway-engine next to us */
    uint32_t tick_ms;            /* --tick-ms; default SCALER_TICK_MS */
    bool leave_instances;        /* --leave-instances: on SIGTERM do not terminate replicas */
    uint64_t batch_defer_ms;     /* --batch-defer-ms; 0 = SCALER_BATCH_DEFER_MS */
    const char *engine_args[SCALER_ENGINE_ARGS_MAX]; /* --engine-arg, in order (argv strings) */
    size_t n_engine_args;
};

/* ---- one replica of one function ---- */
struct scaler_replica {
    struct scaler_replica *next;
    char id[SCALER_REPLICA_ID_MAX + 1]; /* replica id = engine worker id = provider id */
    enum scaler_replica_state state;    /* the policy's view */
    int64_t since_ms;                   /* wall ms it entered state */
    int64_t start_ms;                   /* wall ms its current provision/unpark began */
    bool was_ready;                     /* ready once since the current start */
    bool action_pending;                /* a provider operation runs on it */
    int32_t offer_index;                /* into scaler.offers; -1 unknown */
    bool spot;                          /* bought as spot */
    struct scaler_instance *inst;       /* provider handle; NULL once released */
    int64_t cost_from_ms;               /* wall ms up to which its cost is accounted */
    /* from the latest observation */
    bool hb_present;      /* a heartbeat under its id exists */
    int hb_state;         /* Parkway__WorkerState of it */
    int64_t hb_ms;        /* last_heartbeat_unix_ms; 0 = none */
    uint32_t busy_slots;  /* sequences decoding */
    uint32_t total_slots; /* engine slots */
    double tokens_per_s;  /* recent decode rate */
    uint32_t in_flight;   /* entries pending on its consumer (XPENDING) */
};

/* What one observation round found for a function's streams. */
struct scaler_fn_obs {
    uint64_t q_lag;       /* interactive entries not yet delivered */
    uint64_t q_pending;   /* interactive entries delivered and not acknowledged */
    int64_t q_oldest_ms;  /* wall ms of the oldest undelivered entry; 0 = none */
    int64_t q_last_id_ms; /* wall ms of the newest entry ever added; 0 = none */
    char q_last_delivered[PW_STREAM_ID_MAX]; /* group cursor */
    bool q_lag_unknown;       /* Redis could not say (after deletions): XRANGE counts */
    uint64_t b_lag;           /* batch lane entries not yet delivered */
    bool b_lag_unknown;       /* as q_lag_unknown (Redis 7.0 forgets lag on an AOF reload) */
    uint64_t b_pending;       /* batch lane entries delivered, not acknowledged */
    int64_t b_oldest_ms;      /* wall ms of the oldest undelivered batch entry; 0 = none */
    int64_t b_deadline_ms;    /* earliest deadline_unix_ms of the sampled waiting batch
                                 entries; 0 = none */
    uint64_t b_work_tokens;   /* estimated tokens of the waiting batch entries; 0 = unknown */
    uint64_t q_prompt_tokens; /* estimated prompt tokens of the waiting interactive entries */
    bool phase2;              /* the per-lane XRANGEs of this round were sent */
    char b_last_delivered[PW_STREAM_ID_MAX];
    struct pw_stream_entries *workers;   /* HGETALL pw:{fn}:workers; owned until applied */
    struct pw_stream_entries *consumers; /* XPENDING summary as (consumer, count) pairs */
};

/* ---- one function ---- */
struct scaler_fn {
    const struct pw_spec *spec; /* borrowed from scaler.specs */
    struct scaler *s;           /* back pointer */
    char key_q[PW_KEY_MAX];     /* pw:{fn}:q */
    char key_b[PW_KEY_MAX];     /* pw:{fn}:b */
    char key_workers[PW_KEY_MAX];
    char key_scale[PW_KEY_MAX];
    struct scaler_policy_spec pspec;        /* policy view of the spec */
    struct scaler_policy_state pstate;      /* policy memory between ticks */
    struct scaler_cost_acc cost;            /* cost so far */
    struct scaler_replica *replicas;        /* owned list, newest first */
    uint32_t next_seq;                      /* replica id counter */
    int64_t last_wake_ms;                   /* wall ms of the last pw:wake for it; 0 = none */
    int64_t last_request_ms;                /* newest of wake and stream arrival; 0 = never */
    uint32_t last_desired;                  /* desired at the last tick */
    char last_error[SCALER_REASON_MAX + 1]; /* policy error last logged (log on change) */
    char last_note[SCALER_REASON_MAX + 1];  /* policy note last logged */
    int64_t last_note_ms;                   /* wall ms it was logged; 0 = never */
    /* observation round */
    unsigned obs_outstanding; /* replies still expected; 0 = idle */
    bool obs_failed;          /* a reply failed: skip this round */
    bool tick_again;          /* a wake came during a round: run another at once */
    struct scaler_fn_obs obs;
};

/* ---- the process ---- */
struct scaler {
    struct scaler_opts opts;
    char engine_path[4096];            /* resolved engine executable */
    struct event_base *base;           /* owned */
    struct pw_redis *redis;            /* owned: commands and the pw:wake subscription */
    struct scaler_children *children;  /* owned: engine and hook processes */
    struct scaler_provider *provider;  /* owned */
    const struct scaler_offer *offers; /* borrowed from the provider */
    size_t n_offers;
    struct pw_spec_set specs; /* owned */
    struct scaler_fn *fns;    /* owned array, one per spec */
    size_t n_fns;
    struct event *ev_tick;    /* periodic tick */
    struct event *ev_sigterm; /* SIGTERM / SIGINT: stop */
    struct event *ev_sigint;
    uint64_t ticks;         /* ticks so far */
    unsigned nonce;         /* makes replica ids unique across scaler restarts */
    bool stopping;          /* a stop signal arrived */
    uint64_t stop_deadline; /* monotonic ms: exit even if instances linger */
    int exit_code;          /* process exit code */
};

/* ---- scaler_observe.c ---- */

/* Starts an observation round for fn (no-op while one runs; sets tick_again). When every
 * reply is in, calls scaler_reconcile_fn(). */
void scaler_observe_fn(struct scaler *s, struct scaler_fn *fn);

/* Registers every spec in pw:functions and creates the consumer groups. */
void scaler_register_functions(struct scaler *s);

/* ---- scaler_reconcile.c ---- */

/* Joins the observation into the replicas, runs the policy and applies its actions. */
void scaler_reconcile_fn(struct scaler *s, struct scaler_fn *fn);

/* Provider reports (scaler_provider_env.on_event). userdata is the struct scaler. */
void scaler_on_provider_event(struct scaler_provider *p, struct scaler_instance *inst,
                              enum scaler_provider_ev ev, enum pw_err err, void *userdata);

/* Terminates every instance (stop path). Returns the number still alive. */
size_t scaler_terminate_all(struct scaler *s, const char *reason);

/* Instances not yet released, over all functions. */
size_t scaler_live_instances(const struct scaler *s);

/* Appends an event to pw:events and logs it: kind, replica ("" = none), reason. */
void scaler_event(struct scaler *s, struct scaler_fn *fn, const char *kind, const char *replica,
                  const char *reason);

/* Frees a function's replicas (instances are released through the provider). */
void scaler_fn_free_replicas(struct scaler *s, struct scaler_fn *fn);

#endif

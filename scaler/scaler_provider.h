/*
 * scaler_provider: the interface every machine provider implements (a table of function
 * pointers; one file per implementation: scaler_provider_local.c, scaler_provider_exec.c).
 *
 * An instance is one machine (or process) running one engine replica of one function. Its
 * id is the replica id the scaler chose, and the engine on it heartbeats under that id as
 * its worker id, so the scaler joins provider state and engine heartbeats by id.
 *
 * Operations are asynchronous. Each of provision, drain, park, unpark and terminate either
 * fails at once (returns an error, nothing changes, nothing is reported) or returns PW_OK
 * and later reports its completion exactly once through env.on_event, from the event loop,
 * never from inside the call. While one operation runs (inst->busy) the scaler starts no
 * other on that instance, except terminate, which is always accepted and supersedes it.
 * A provider also reports, unasked, an instance that died (SCALER_PROVIDER_EV_EXIT).
 *
 *     provision ──► RUNNING ──drain──► DRAINING ──park──► PARKED ──unpark──► RUNNING
 *         │            │                  │                  │
 *         └──fail──► FAILED               └──terminate──► TERMINATED ◄──terminate (any)
 *
 * "RUNNING" means the machine and engine process are up; whether the engine serves yet is
 * told by its heartbeat, not by the provider. Single-threaded: the scaler's loop thread.
 */
#ifndef SCALER_PROVIDER_H
#define SCALER_PROVIDER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_spec.h"
#include "scaler_offers.h"
#include "scaler_policy.h"

struct event_base;
struct scaler_children;
struct scaler_provider;

enum scaler_inst_state {
    SCALER_INST_PROVISIONING = 0, /* provision running */
    SCALER_INST_RUNNING,          /* machine and engine process up */
    SCALER_INST_DRAINING,         /* engine told to stop taking work */
    SCALER_INST_PARKED,           /* takes no work, resumable (disk and model kept; local:
                                     the engine process itself, idle) */
    SCALER_INST_TERMINATED,       /* released */
    SCALER_INST_FAILED,           /* an operation failed or the engine died; see detail */
};

/* "provisioning", "running", "draining", "parked", "terminated", "failed". */
const char *scaler_inst_state_name(enum scaler_inst_state s);

/* What on_event reports. */
enum scaler_provider_ev {
    SCALER_PROVIDER_EV_PROVISION = 0, /* provision finished (err says how) */
    SCALER_PROVIDER_EV_DRAIN,
    SCALER_PROVIDER_EV_PARK,
    SCALER_PROVIDER_EV_UNPARK,
    SCALER_PROVIDER_EV_TERMINATE,
    SCALER_PROVIDER_EV_STATUS, /* a status refresh finished; inst->state is current */
    SCALER_PROVIDER_EV_EXIT,   /* unasked: the instance or its engine died (state FAILED) */
};

const char *scaler_provider_ev_name(enum scaler_provider_ev ev);

#define SCALER_INST_DETAIL_MAX 255
#define SCALER_INST_ADDR_MAX 127

/*
 * The part of an instance every provider fills; providers allocate a larger struct with
 * this first. Owned by the provider; freed by ops->release once TERMINATED (or FAILED and
 * given up by the scaler).
 */
struct scaler_instance {
    char id[SCALER_REPLICA_ID_MAX + 1]; /* replica id = engine worker id */
    char function[PW_SPEC_NAME_MAX + 1];
    enum scaler_inst_state state;
    bool busy;                                  /* an operation is in progress */
    char detail[SCALER_INST_DETAIL_MAX + 1];    /* last error or status note, "" if none */
    char address[SCALER_INST_ADDR_MAX + 1];     /* "pid 1234", or what the hook returned */
    char provider_id[SCALER_INST_ADDR_MAX + 1]; /* the provider's own id ("" = same as id) */
    struct scaler_offer offer;                  /* what it runs on (copy) */
    bool spot;                                  /* bought as spot */
    uint64_t op_started_ms;                     /* monotonic start of the current operation */
    uint64_t last_op_ms;                        /* duration of the last finished operation, ms */
};

/*
 * Completion and death reports. err is PW_OK for success; otherwise inst->detail says why
 * (one line, e.g. "hook provision timed out after 10000 ms"). The callback may start new
 * operations on any instance, including this one.
 */
typedef void (*scaler_provider_event_cb)(struct scaler_provider *p, struct scaler_instance *inst,
                                         enum scaler_provider_ev ev, enum pw_err err,
                                         void *userdata);

/* What every provider is given at creation. Everything is borrowed for the provider's life. */
struct scaler_provider_env {
    struct event_base *base;
    struct scaler_children *children; /* child-process watcher on base */
    const char *redis_url;            /* the engines' --redis */
    const char *engine_path;          /* parkway-engine to run (local; passed to hooks) */
    const char *const *engine_args;   /* local: extra engine arguments, appended in order */
    size_t n_engine_args;
    scaler_provider_event_cb on_event;
    void *userdata;
};

struct scaler_provider_ops {
    const char *name; /* "local", "exec" */
    /* The offers this provider sells; borrowed until destroy. Never fails. */
    const struct scaler_offer *(*offers)(struct scaler_provider *p, size_t *n);
    /* Starts a new instance for spec (borrowed until the instance is released) under
     * replica_id on offer (copied). *out is valid at once, in PROVISIONING. */
    enum pw_err (*provision)(struct scaler_provider *p, const struct scaler_offer *offer, bool spot,
                             const struct pw_spec *spec, const char *replica_id,
                             struct scaler_instance **out);
    /* Tells the engine to take no new work and finish what it has. */
    enum pw_err (*drain)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Parks a running or draining instance (drains first if needed). */
    enum pw_err (*park)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Resumes a parked instance; reports when its engine process is up again. */
    enum pw_err (*unpark)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Releases the instance in any state; supersedes a running operation. */
    enum pw_err (*terminate)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Refreshes inst->state from the provider (exec: the status hook); NULL = not needed. */
    enum pw_err (*status)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Frees an instance that is TERMINATED or FAILED and idle (not busy). */
    void (*release)(struct scaler_provider *p, struct scaler_instance *inst);
    /* Frees the provider. Instances still alive are abandoned as they are (local engines
     * get SIGTERM through their parent-death signal when the scaler exits). */
    void (*destroy)(struct scaler_provider *p);
};

struct scaler_provider {
    const struct scaler_provider_ops *ops;
    struct scaler_provider_env env;
    char errstr[256]; /* last creation or configuration error */
};

/*
 * The local provider: engines as child processes of the scaler on this machine; one offer
 * ("local", price 0) with the machine's real cores, memory and GPU. Park = the engine's own
 * parked mode (SIGUSR1: it drains, then keeps everything loaded and reads nothing; SIGUSR2
 * resumes it), complete when its heartbeat says PARKED (see docs/internals/scaler.md).
 * It opens its own Redis client on env->base for that; a bad URL is PW_ERR_CONFIG.
 */
enum pw_err scaler_provider_local_create(const struct scaler_provider_env *env,
                                         struct scaler_provider **out, char *errbuf, size_t errcap);

/*
 * The exec provider: user hook programs named in the YAML file config_path (see
 * docs/internals/scaler.md, "exec hook protocol"). Errors in the file: PW_ERR_CONFIG with
 * one line in errbuf.
 */
enum pw_err scaler_provider_exec_create(const struct scaler_provider_env *env,
                                        const char *config_path, struct scaler_provider **out,
                                        char *errbuf, size_t errcap);

/* The local machine as an offer: cores, memory (/proc/meminfo), GPU (/dev/nvidia0). */
void scaler_provider_local_offer(struct scaler_offer *out);

#endif

/*
 * router: the parkway-router process. Read this first.
 *
 * Threads: N HTTP worker threads (router_http), each with its own event loop and its own
 * table of in-flight calls; nothing else touches a call. A call lives on the thread that
 * accepted its connection, start to end. Each worker has two async Redis clients:
 *   - router_worker.redis: commands (keys, limits, the queue write, cancel flags, ...) and
 *     the pub/sub connection (key revocations);
 *   - router_worker.reply_redis: only the blocking XREAD of the worker's own reply stream
 *     pw:reply:{router_id}:{index}, the reply_to of every request it queues. A ReplyChunk
 *     is delivered to its call on the loop that read it: no thread hop, no lock.
 * Request ids look like "r<worker:2 hex><random:16 hex>"; a completions prompt list fans out
 * into "<id>.0", "<id>.1", ...
 */
#ifndef ROUTER_H
#define ROUTER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "pw_apikey.h"
#include "pw_keyspace.h"
#include "router_http.h"

struct pw_metrics;
struct pw_metric;
struct pw_storage;
struct router_batch_coord;
struct pw_redis;
struct router_call;

/* ---- configuration (command line) ---- */
struct router_config {
    const char *redis_url;
    const char *router_id;       /* names the reply stream; default host-pid */
    const char *admin_key;       /* guards /metrics; NULL = /metrics refused */
    uint32_t request_timeout_ms; /* deadline of a call (and of its queued request) */
    uint32_t key_cache_ms;       /* how long an API-key lookup is trusted */
    uint32_t max_queue;          /* entries a pw:{fn}:q may hold unacknowledged before an
                                    XADD is refused (503); 0 = unbounded */
    const char *storage_dir;     /* Files API and batch outputs (pw_storage: dir or URL) */
    size_t max_file_bytes;       /* largest upload to /v1/files (also bounded by max_body) */
    struct router_http_config http;
};

/* One API key as the router caches it. */
struct router_key {
    char hash_hex[PW_APIKEY_HASH_HEX_LEN + 1];
    char key_id[PW_APIKEY_ID_LEN + 8];
    char tenant[128];
    char **allowed; /* owned, n_allowed function names; 0 = all */
    size_t n_allowed;
    uint32_t rpm, tpm; /* limits per minute; 0 = none */
    bool disabled;
    bool missing;        /* no such key (negative cache entry) */
    uint64_t expires_ms; /* mono ms */
};

/* One registered function as a worker thread sees it: refreshed from pw:functions (spec)
 * every 2 s and from pw:{fn}:workers (engine heartbeats) every tick while calls use it. */
struct router_fn {
    char *name;                 /* owned */
    uint64_t max_queue_wait_ms; /* spec max_queue_wait_ms: longest wait for a first chunk */
    int ready;                  /* READY engines with a fresh heartbeat at the last look;
                                   -1 = not looked at yet */
    uint64_t looked_ms;         /* mono ms of that look */
    uint64_t used_ms;           /* mono ms of the last call queued for it; 0 = none */
    uint64_t woken_ms;          /* mono ms of the last PUBLISH pw:wake for it */
    bool looking;               /* an HGETALL pw:{fn}:workers is in flight */
    /* The queue's backlog as the last probe (the enqueue script in probe mode, once per tick
     * while in use) saw it, and this worker's XADDs since: while far below --max-queue a
     * call is queued with a plain XADD instead of the script. */
    uint64_t backlog;
    uint64_t backlog_ms;   /* mono ms of that probe's answer; 0 = none */
    uint32_t adds;         /* plain XADDs since the probe was sent */
    uint32_t adds_at_send; /* adds when the probe in flight was sent */
    bool probing;          /* a probe is in flight */
};

#define ROUTER_KEY_CACHE 256 /* entries per worker thread */
#define ROUTER_CALLS_BUCKETS 1024

/* Per worker thread; touched only by that thread. */
struct router_worker {
    struct router *rt;
    unsigned index;
    struct event_base *base;                         /* borrowed from the HTTP server */
    struct pw_redis *redis;                          /* owned: commands and pub/sub on this loop */
    struct router_call *calls[ROUTER_CALLS_BUCKETS]; /* in flight, by request id hash */
    struct router_key keys[ROUTER_KEY_CACHE];        /* direct-mapped by hash */
    struct router_fn *fns;                           /* owned snapshot of pw:functions */
    size_t n_fns;
    int64_t functions_created; /* unix s when first listed */
    struct event *tick;        /* 1 s: refresh functions, keep-alives, deadlines */
    uint64_t rng;              /* splitmix64 state: request ids and sampling seeds */

    /* The reply reader: XREAD BLOCK of reply_key from reply_last, one at a time. */
    struct pw_redis *reply_redis;      /* owned: its own connection (a blocking XREAD would
                                          hold up every command behind it) */
    char reply_key[PW_KEY_MAX];        /* pw:reply:{router_id}:{index} */
    char reply_last[PW_STREAM_ID_MAX]; /* id of the last entry read ("0-0" at start) */
    bool reading;                      /* an XREAD is in flight */
    bool reply_failing;                /* the last XREAD failed (logged once) */
    uint64_t read_sent_ms;             /* mono ms the XREAD in flight was sent */
    size_t untrimmed;                  /* entries read since the last XTRIM */
    uint64_t trimmed_ms;               /* mono ms of the last XTRIM */
    struct event *reply_retry;         /* owned: next XREAD after a failed one */
};

/* The process. */
struct router {
    struct router_config cfg;
    char router_id[PW_KEY_NAME_MAX + 1];
    char enqueue_sha[41];            /* SHA-1 hex of the bounded-XADD script (EVALSHA) */
    char max_queue_arg[12];          /* cfg.max_queue in decimal, the script's limit */
    struct router_http_server *http; /* owned */
    struct router_worker *workers;   /* owned, one per HTTP thread */
    unsigned n_workers;
    volatile int stopping;
    int64_t started_unix_s;

    struct pw_metrics *metrics;    /* owned */
    struct pw_metric *m_requests;  /* counter {route, status, function} */
    struct pw_metric *m_ttft;      /* histogram {function}, seconds */
    struct pw_metric *m_itl;       /* histogram {function}, seconds between tokens */
    struct pw_metric *m_e2e;       /* histogram {function}, seconds */
    struct pw_metric *m_queue;     /* histogram {function}, seconds queued */
    struct pw_metric *m_inflight;  /* gauge {} */
    struct pw_metric *m_bytes_in;  /* counter {} request body bytes */
    struct pw_metric *m_bytes_out; /* counter {} response bytes */

    struct pw_storage *storage;       /* owned: file bytes (router_files, router_batch) */
    struct router_batch_coord *batch; /* owned: the batch coordinator thread */
};

/* Sets up workers (with their reply readers) and metrics; http must be created. */
enum pw_err router_start(struct router *rt, char *err, size_t errcap);
/* The HTTP handler (router_http_handler_fn) with ud = the router. */
void router_handle(struct router_http_request *req, void *ud);
/* Frees what router_start made; call after the HTTP server's run() returned. */
void router_stop(struct router *rt);

#endif

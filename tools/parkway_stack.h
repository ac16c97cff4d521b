/*
 * parkway_stack: the steps of `parkway up` that touch files and Redis, kept apart from the
 * process supervision in parkway_up.c so each reads on its own. Blocking calls; CLI only.
 * Every function fills err (one line) on failure.
 */
#ifndef PARKWAY_STACK_H
#define PARKWAY_STACK_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>

#include "pw_err.h"
#include "pw_spec.h"

struct parkway_stack_opts {
    char state_dir[PATH_MAX - 64]; /* absolute or relative; holds env, redis/ */
    char functions_dir[PATH_MAX];
    int router_port; /* on 127.0.0.1 */
    int redis_port;  /* own redis-server on 127.0.0.1:port; 0 = a unix socket in the state dir */
    char redis_url[PATH_MAX + 32]; /* what every process connects to; set by
                                      parkway_stack_prepare_dirs unless given (--redis) */
    bool external_redis;           /* --redis URL: use that server, start none */
};

/* Defaults: $PARKWAY_STATE_DIR or ~/.local/state/parkway, ./functions, port 8080, Redis on a
 * unix socket in the state dir. */
void parkway_stack_opts_default(struct parkway_stack_opts *o);

/* Creates state_dir and state_dir/redis (mode 0700) and fills redis_url for the stack's
 * own server (unless external_redis). */
enum pw_err parkway_stack_prepare_dirs(struct parkway_stack_opts *o, char *err, size_t errcap);

/* Writes state_dir/redis/redis.conf (deploy/redis.conf plus this stack's port and dir). */
enum pw_err parkway_stack_write_redis_conf(const struct parkway_stack_opts *o, char *path,
                                           size_t pathcap, char *err, size_t errcap);

/* Waits until the stack's Redis answers PING, at most timeout_ms. */
enum pw_err parkway_stack_wait_redis(const struct parkway_stack_opts *o, int timeout_ms, char *err,
                                     size_t errcap);

/* HSETs every spec's canonical JSON into pw:functions and drops functions no longer there. */
enum pw_err parkway_stack_register_functions(const struct parkway_stack_opts *o,
                                             const struct pw_spec_set *specs, char *err,
                                             size_t errcap);

/*
 * The stack's API key: reuses the one in state_dir/env when its hash is still in pw:keys
 * (unless force_new), else makes a new one and stores only its SHA-256 and KeyRecord.
 */
enum pw_err parkway_stack_ensure_key(const struct parkway_stack_opts *o, bool force_new, char *key,
                                     size_t keycap, char *err, size_t errcap);

/* The admin key guarding the router's /metrics: the saved one, or a new one. */
enum pw_err parkway_stack_admin_key(const struct parkway_stack_opts *o, char *key, size_t cap);

/* Writes state_dir/env (mode 0600): OPENAI_BASE_URL, OPENAI_API_KEY, PARKWAY_REDIS_URL,
 * PARKWAY_ADMIN_KEY. */
enum pw_err parkway_stack_write_env(const struct parkway_stack_opts *o, const char *key,
                                    const char *admin_key, char *err, size_t errcap);

#endif

/*
 * parkway-scaler: command line, set-up and the loop (see scaler.h).
 *
 *   parkway-scaler --redis URL [--functions DIR] [--provider local|exec]
 *                  [--provider-config FILE] [--engine PATH] [--tick-ms N]
 *                  [--batch-defer-ms N]
 *                  [--leave-instances] [--engine-arg ARG]...
 *
 * --engine-arg ARG (repeatable) appends ARG to every engine command line the local
 * provider runs, e.g. --engine-arg=--claim-idle-ms=3000 (tests: reclaim a killed engine's
 * requests sooner) or --engine-arg=--threads=2.
 *
 * SIGTERM/SIGINT: stop observing, terminate every instance this scaler started (local
 * engines drain and exit; exec instances get the terminate hook), wait for them up to
 * SCALER_STOP_TIMEOUT_MS, exit 0. --leave-instances exits at once and leaves them (local
 * engines still get SIGTERM from their parent-death signal). Exit codes: 0 ok, 2 bad
 * input or configuration, 1 other.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#include "pw_cli.h"
#include "pw_clock.h"
#include "pw_log.h"
#include "pw_redis.h"
#include "scaler.h"
#include "scaler_child.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: parkway-scaler --redis URL [options]\n"
                 "  --functions DIR        function specs (default ./functions)\n"
                 "  --provider NAME        local (default) or exec\n"
                 "  --provider-config F    exec: hooks, timeouts and offers (YAML)\n"
                 "  --engine PATH          parkway-engine to run (default: next to this program,\n"
                 "                         ../engine/parkway-engine)\n"
                 "  --tick-ms N            observation period (default 250)\n"
                 "  --batch-defer-ms N     longest wait of batch-only demand for a spot or free\n"
                 "                         machine (default 300000)\n"
                 "  --leave-instances      on SIGTERM, leave replicas running\n"
                 "  --engine-arg ARG       local: append ARG to each engine's command line\n"
                 "                         (repeatable; e.g. --engine-arg=--claim-idle-ms=3000)\n");
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct scaler *s = arg;
    if (s->stopping) {
        size_t live = scaler_live_instances(s);
        if (live == 0 || pw_clock_mono_ms() > s->stop_deadline) {
            if (live)
                PW_LOG_WARN("event=stop_timeout instances_left=%zu", live);
            event_base_loopexit(s->base, NULL);
        }
        return;
    }
    s->ticks++;
    if (s->ticks % SCALER_REGISTER_EVERY_TICKS == 0)
        scaler_register_functions(s);
    for (size_t i = 0; i < s->n_fns; i++)
        scaler_observe_fn(s, &s->fns[i]);
}

static void on_wake(struct pw_redis *r, const char *channel, size_t channel_len,
                    const char *payload, size_t payload_len, void *userdata)
{
    (void)r;
    (void)channel;
    (void)channel_len;
    struct scaler *s = userdata;
    if (s->stopping)
        return;
    for (size_t i = 0; i < s->n_fns; i++) {
        struct scaler_fn *fn = &s->fns[i];
        if (strlen(fn->spec->name) == payload_len &&
            memcmp(fn->spec->name, payload, payload_len) == 0) {
            fn->last_wake_ms = pw_clock_wall_ms();
            scaler_observe_fn(s, fn);
            return;
        }
    }
}

static void on_stop(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    struct scaler *s = arg;
    if (s->stopping) {
        PW_LOG_WARN("event=stop_forced signal=%d", (int)sig);
        event_base_loopexit(s->base, NULL);
        return;
    }
    s->stopping = true;
    s->stop_deadline = pw_clock_mono_ms() + SCALER_STOP_TIMEOUT_MS;
    PW_LOG_INFO("event=stopping signal=%d leave_instances=%d", (int)sig, s->opts.leave_instances);
    if (s->opts.leave_instances) {
        event_base_loopexit(s->base, NULL);
        return;
    }
    scaler_terminate_all(s, "scaler_stopping");
}

/* ../engine/parkway-engine relative to this executable, made canonical. */
static void default_engine(char *buf, size_t cap)
{
    if (!pw_cli_exe_rel(buf, cap, "../engine/parkway-engine")) {
        snprintf(buf, cap, "parkway-engine");
        return;
    }
    char real[PATH_MAX];
    if (realpath(buf, real))
        snprintf(buf, cap, "%s", real);
}

int main(int argc, char **argv)
{
    pw_log_init_from_env();
    struct scaler s;
    memset(&s, 0, sizeof s);
    s.opts.functions_dir = "functions";
    s.opts.provider = "local";
    s.opts.tick_ms = SCALER_TICK_MS;
    enum {
        O_REDIS = 256,
        O_FUNCTIONS,
        O_PROVIDER,
        O_PCONF,
        O_ENGINE,
        O_TICK,
        O_LEAVE,
        O_EARG,
        O_BDEFER,
        O_HELP
    };
    static const struct option longopts[] = {
        {"redis", required_argument, NULL, O_REDIS},
        {"functions", required_argument, NULL, O_FUNCTIONS},
        {"provider", required_argument, NULL, O_PROVIDER},
        {"provider-config", required_argument, NULL, O_PCONF},
        {"engine", required_argument, NULL, O_ENGINE},
        {"tick-ms", required_argument, NULL, O_TICK},
        {"leave-instances", no_argument, NULL, O_LEAVE},
        {"batch-defer-ms", required_argument, NULL, O_BDEFER},
        {"engine-arg", required_argument, NULL, O_EARG},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_REDIS:
            s.opts.redis_url = optarg;
            break;
        case O_FUNCTIONS:
            s.opts.functions_dir = optarg;
            break;
        case O_PROVIDER:
            s.opts.provider = optarg;
            break;
        case O_PCONF:
            s.opts.provider_config = optarg;
            break;
        case O_ENGINE:
            s.opts.engine_path = optarg;
            break;
        case O_TICK: {
            char *end;
            errno = 0;
            unsigned long v = strtoul(optarg, &end, 10);
            if (errno || *end || v < 10 || v > 60000) {
                fprintf(stderr, "parkway-scaler: --tick-ms: expected 10..60000\n");
                return 2;
            }
            s.opts.tick_ms = (uint32_t)v;
            break;
        }
        case O_LEAVE:
            s.opts.leave_instances = true;
            break;
        case O_BDEFER: {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(optarg, &end, 10);
            if (errno || *end || end == optarg || v < 1 || v > 7ULL * 24 * 3600 * 1000) {
                fprintf(stderr, "parkway-scaler: --batch-defer-ms: expected 1..604800000\n");
                return 2;
            }
            s.opts.batch_defer_ms = v;
            break;
        }
        case O_EARG:
            if (s.opts.n_engine_args >= SCALER_ENGINE_ARGS_MAX) {
                fprintf(stderr, "parkway-scaler: --engine-arg: at most %d\n",
                        SCALER_ENGINE_ARGS_MAX);
                return 2;
            }
            s.opts.engine_args[s.opts.n_engine_args++] = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc || !s.opts.redis_url) {
        usage(stderr);
        return 2;
    }
    if (strcmp(s.opts.provider, "local") != 0 && strcmp(s.opts.provider, "exec") != 0) {
        fprintf(stderr, "parkway-scaler: --provider: local or exec, got '%s'\n", s.opts.provider);
        return 2;
    }
    if (strcmp(s.opts.provider, "exec") == 0 && !s.opts.provider_config) {
        fprintf(stderr, "parkway-scaler: --provider exec needs --provider-config FILE\n");
        return 2;
    }
    if (s.opts.engine_path)
        snprintf(s.engine_path, sizeof s.engine_path, "%s", s.opts.engine_path);
    else
        default_engine(s.engine_path, sizeof s.engine_path);

    char err[1024] = "";
    int rc = 1;
    enum pw_err e = pw_spec_load_dir(s.opts.functions_dir, &s.specs, err, sizeof err);
    if (e) {
        fprintf(stderr, "%s\n", err);
        return pw_err_exit_code(e);
    }
    signal(SIGPIPE, SIG_IGN);
    s.base = event_base_new();
    if (!s.base)
        goto out;
    if ((e = scaler_children_create(s.base, &s.children)))
        goto out;
    if ((e = pw_redis_create(s.base, s.opts.redis_url, &(struct pw_redis_opts){.name = "scaler"},
                             &s.redis, err, sizeof err))) {
        fprintf(stderr, "parkway-scaler: %s\n", err);
        rc = pw_err_exit_code(e);
        goto out;
    }
    struct scaler_provider_env env = {
        .base = s.base,
        .children = s.children,
        .redis_url = s.opts.redis_url,
        .engine_path = s.engine_path,
        .engine_args = s.opts.engine_args,
        .n_engine_args = s.opts.n_engine_args,
        .on_event = scaler_on_provider_event,
        .userdata = &s,
    };
    if (strcmp(s.opts.provider, "local") == 0)
        e = scaler_provider_local_create(&env, &s.provider, err, sizeof err);
    else
        e = scaler_provider_exec_create(&env, s.opts.provider_config, &s.provider, err, sizeof err);
    if (e) {
        fprintf(stderr, "parkway-scaler: %s\n", err);
        rc = pw_err_exit_code(e);
        goto out;
    }
    s.offers = s.provider->ops->offers(s.provider, &s.n_offers);
    s.nonce = (unsigned)((pw_clock_wall_ms() ^ (int64_t)getpid()) & 0xffff);

    s.n_fns = s.specs.count;
    s.fns = calloc(s.n_fns ? s.n_fns : 1, sizeof *s.fns);
    if (!s.fns)
        goto out;
    for (size_t i = 0; i < s.n_fns; i++) {
        struct scaler_fn *fn = &s.fns[i];
        fn->spec = s.specs.specs[i];
        fn->s = &s;
        pw_key_queue(fn->key_q, sizeof fn->key_q, fn->spec->name);
        pw_key_batch_lane(fn->key_b, sizeof fn->key_b, fn->spec->name);
        pw_key_workers(fn->key_workers, sizeof fn->key_workers, fn->spec->name);
        pw_key_scale(fn->key_scale, sizeof fn->key_scale, fn->spec->name);
        scaler_policy_spec_from(&fn->pspec, fn->spec);
        fn->pspec.batch_defer_ms = s.opts.batch_defer_ms;
        scaler_cost_init(&fn->cost);
        PW_LOG_INFO("event=function_loaded function=%s min=%u max=%u idle_s=%u idle_action=%s",
                    fn->spec->name, fn->spec->scaling.min_replicas, fn->spec->scaling.max_replicas,
                    fn->spec->scaling.idle_seconds,
                    pw_spec_idle_action_name(fn->spec->scaling.idle_action));
    }
    scaler_register_functions(&s);
    if ((e = pw_redis_subscribe(s.redis, PW_KEY_WAKE, on_wake, &s)))
        goto out;

    s.ev_tick = event_new(s.base, -1, EV_PERSIST, on_tick, &s);
    s.ev_sigterm = evsignal_new(s.base, SIGTERM, on_stop, &s);
    s.ev_sigint = evsignal_new(s.base, SIGINT, on_stop, &s);
    if (!s.ev_tick || !s.ev_sigterm || !s.ev_sigint)
        goto out;
    struct timeval tv = {s.opts.tick_ms / 1000, (s.opts.tick_ms % 1000) * 1000};
    event_add(s.ev_tick, &tv);
    event_add(s.ev_sigterm, NULL);
    event_add(s.ev_sigint, NULL);
    const struct scaler_offer *o0 = s.n_offers ? &s.offers[0] : NULL;
    PW_LOG_INFO("event=scaler_started functions=%zu provider=%s offers=%zu engine=%s "
                "offer0=%s cpus_milli=%u mem_bytes=%llu gpus=%u",
                s.n_fns, s.provider->ops->name, s.n_offers, s.engine_path,
                o0 ? o0->instance_type : "-", o0 ? o0->cpu_millicores : 0,
                (unsigned long long)(o0 ? o0->memory_bytes : 0), o0 ? o0->gpu_count : 0);
    event_base_dispatch(s.base);
    rc = 0;

out:
    if (rc && e)
        PW_LOG_ERROR("event=scaler_failed err=%s", pw_err_name(e));
    for (size_t i = 0; s.fns && i < s.n_fns; i++) {
        scaler_fn_free_replicas(&s, &s.fns[i]);
        pw_stream_entries_free(s.fns[i].obs.workers);
        pw_stream_entries_free(s.fns[i].obs.consumers);
    }
    free(s.fns);
    if (s.provider)
        s.provider->ops->destroy(s.provider);
    if (s.ev_tick)
        event_free(s.ev_tick);
    if (s.ev_sigterm)
        event_free(s.ev_sigterm);
    if (s.ev_sigint)
        event_free(s.ev_sigint);
    pw_redis_destroy(s.redis);
    scaler_children_destroy(s.children);
    if (s.base)
        event_base_free(s.base);
    pw_spec_set_deinit(&s.specs);
    PW_LOG_INFO("event=scaler_stopped rc=%d", rc);
    return rc;
}

/*
 * parkway up: runs the whole stack on this machine in the foreground.
 *
 *   1. a redis-server of its own (AOF in <state>/redis, loopback only),
 *   2. the function specs of --functions registered in Redis (pw:functions),
 *   3. an API key for this stack: made once, its SHA-256 stored in pw:keys, the key itself
 *      kept only in <state>/env (mode 0600) so a second `parkway up` prints the same one,
 *   4. the router and scaler, when their executables are built (the scaler starts engines),
 *   5. <state>/env with OPENAI_BASE_URL and OPENAI_API_KEY, and both printed on stdout.
 *
 * Supervision: a child that exits without being asked (crash, kill, its own error) is
 * started again with the same command line, after a delay that doubles with each exit in
 * the last UP_CRASH_WINDOW_MS (UP_BACKOFF_FIRST_MS .. UP_BACKOFF_MAX_MS). More than
 * UP_CRASH_LIMIT exits of one child in that window is a crash loop: the stack is stopped
 * and up exits 1. Redis comes back with its data from the AOF; the router and scaler
 * reconnect to it on their own; engines belong to the scaler, which replaces them.
 * Ctrl-C (SIGINT) or SIGTERM stops the children in reverse order. Single-threaded; signals
 * are taken synchronously (sigtimedwait), so restarts are timers of the same loop.
 */
#include "parkway_cli.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway_stack.h"
#include "pw_clock.h"
#include "pw_err.h"
#include "pw_log.h"
#include "pw_spec.h"

#define UP_MAX_CHILDREN 8
#define UP_MAX_ARGS 16
#define UP_CRASH_LIMIT 5         /* more exits than this within the window: give up */
#define UP_CRASH_WINDOW_MS 60000 /* the crash-loop window */
#define UP_BACKOFF_FIRST_MS 250  /* delay before the first restart in a window */
#define UP_BACKOFF_MAX_MS 8000   /* cap of the doubling delay */

struct up_child {
    char name[32];
    pid_t pid;               /* running process; 0 while stopped or waiting to restart */
    char *argv[UP_MAX_ARGS]; /* owned copies, NULL-terminated: every restart reuses them */
    char log_path[PATH_MAX]; /* stdout and stderr appended here; "" = up's own */
    uint64_t exits_ms[UP_CRASH_LIMIT + 1]; /* monotonic ms of the latest exits, a ring */
    unsigned exits;                        /* exits since up started */
    unsigned recent;                       /* of those, within the last window */
    uint64_t restart_at_ms;                /* monotonic ms of the pending restart; 0 = none */
};

struct up {
    struct parkway_stack_opts opts;
    struct up_child children[UP_MAX_CHILDREN];
    int n_children;
};

static void up_usage(FILE *out)
{
    fprintf(out,
            "usage: parkway up [options]\n"
            "  --state-dir DIR    state (redis data, env, logs); default $PARKWAY_STATE_DIR or\n"
            "                     ~/.local/state/parkway\n"
            "  --functions DIR    function specs to serve (default ./functions)\n"
            "  --port N           router port on 127.0.0.1 (default 8080)\n"
            "  --redis-port N     own redis-server on 127.0.0.1:N (default: a unix socket in\n"
            "                     the state dir, no TCP port)\n"
            "  --redis URL        use this Redis instead of starting one\n"
            "  --new-key          make a new API key even if the state dir has one\n"
            "  --redis-only       start Redis and register specs and key, but no router,\n"
            "                     scaler or engines (to run those by hand, and for tests)\n");
}

/* Forks and execs c's command line; the pid goes to c->pid. */
static enum pw_err child_exec(struct up_child *c)
{
    pid_t pid = fork();
    if (pid < 0)
        return PW_ERR_IO;
    if (pid == 0) {
        /* The stack must not outlive `parkway up`, even if up is killed with SIGKILL. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (c->log_path[0]) {
            int fd = open(c->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (fd >= 0) {
                dup2(fd, STDOUT_FILENO);
                dup2(fd, STDERR_FILENO);
            }
        }
        execvp(c->argv[0], c->argv);
        fprintf(stderr, "parkway up: cannot run %s: %s\n", c->argv[0], strerror(errno));
        _exit(127);
    }
    c->pid = pid;
    return PW_OK;
}

/* Adds a supervised child (argv and log_path are copied) and starts it. */
static enum pw_err spawn(struct up *up, const char *name, char *const argv[], const char *log_path)
{
    if (up->n_children >= UP_MAX_CHILDREN)
        return PW_ERR_INTERNAL;
    struct up_child *c = &up->children[up->n_children];
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->log_path, sizeof c->log_path, "%s", log_path ? log_path : "");
    for (size_t i = 0; argv[i]; i++) {
        if (i + 1 >= UP_MAX_ARGS || !(c->argv[i] = strdup(argv[i]))) {
            for (size_t j = 0; j <= i && j < UP_MAX_ARGS; j++)
                free(c->argv[j]);
            memset(c->argv, 0, sizeof c->argv);
            return PW_ERR_NOMEM;
        }
    }
    up->n_children++;
    enum pw_err e = child_exec(c);
    if (e)
        return e;
    PW_LOG_INFO("event=child_started name=%s pid=%d", name, (int)c->pid);
    return PW_OK;
}

static void up_deinit(struct up *up)
{
    for (int i = 0; i < up->n_children; i++)
        for (size_t j = 0; j < UP_MAX_ARGS; j++)
            free(up->children[i].argv[j]);
    up->n_children = 0;
}

/*
 * Records an unasked exit of c at now and schedules its restart. Returns false when c has
 * exited more than UP_CRASH_LIMIT times within UP_CRASH_WINDOW_MS (a crash loop).
 */
static bool child_exited(struct up_child *c, uint64_t now)
{
    c->pid = 0;
    c->exits_ms[c->exits % (UP_CRASH_LIMIT + 1)] = now;
    c->exits++;
    unsigned recent = 0;
    for (unsigned i = 0; i < UP_CRASH_LIMIT + 1 && i < c->exits; i++)
        if (now - c->exits_ms[i] < UP_CRASH_WINDOW_MS)
            recent++;
    c->recent = recent;
    if (recent > UP_CRASH_LIMIT)
        return false;
    uint64_t delay = (uint64_t)UP_BACKOFF_FIRST_MS << (recent - 1);
    c->restart_at_ms = now + (delay < UP_BACKOFF_MAX_MS ? delay : UP_BACKOFF_MAX_MS);
    return true;
}

/* Says why up stops: c is in a crash loop. */
static void crash_loop(const struct up_child *c, int code)
{
    PW_LOG_ERROR("event=crash_loop name=%s exits=%u window_s=%d", c->name, c->exits,
                 UP_CRASH_WINDOW_MS / 1000);
    fprintf(stderr,
            "parkway up: %s exited %d times within %d s (last status %d); giving up and "
            "stopping the stack\n",
            c->name, UP_CRASH_LIMIT + 1, UP_CRASH_WINDOW_MS / 1000, code);
}

/* The earliest pending restart, or 0. */
static uint64_t next_restart_ms(const struct up *up)
{
    uint64_t t = 0;
    for (int i = 0; i < up->n_children; i++) {
        uint64_t r = up->children[i].restart_at_ms;
        if (r && (!t || r < t))
            t = r;
    }
    return t;
}

/* Starts every child whose restart is due. A fork that fails counts as an exit. */
static bool restart_due(struct up *up, uint64_t now)
{
    for (int i = 0; i < up->n_children; i++) {
        struct up_child *c = &up->children[i];
        if (!c->restart_at_ms || c->restart_at_ms > now)
            continue;
        c->restart_at_ms = 0;
        if (child_exec(c) != PW_OK) {
            PW_LOG_ERROR("event=child_restart_failed name=%s errno=%d", c->name, errno);
            if (!child_exited(c, now)) {
                crash_loop(c, 127);
                return false;
            }
            continue;
        }
        PW_LOG_WARN("event=child_restarted name=%s pid=%d exits=%u recent=%u", c->name, (int)c->pid,
                    c->exits, c->recent);
    }
    return true;
}

/* Stops children newest first: SIGTERM, up to 15 s to drain, then SIGKILL. */
static void stop_all(struct up *up)
{
    for (int i = up->n_children - 1; i >= 0; i--) {
        struct up_child *c = &up->children[i];
        if (c->pid <= 0)
            continue;
        kill(c->pid, SIGTERM);
        uint64_t until = pw_clock_mono_ms() + 15000;
        int status;
        for (;;) {
            pid_t r = waitpid(c->pid, &status, WNOHANG);
            if (r == c->pid || (r < 0 && errno == ECHILD))
                break;
            if (pw_clock_mono_ms() > until) {
                PW_LOG_WARN("event=child_kill name=%s pid=%d reason=stop_timeout", c->name,
                            (int)c->pid);
                kill(c->pid, SIGKILL);
                waitpid(c->pid, &status, 0);
                break;
            }
            struct timespec ts = {0, 20 * 1000000L};
            nanosleep(&ts, NULL);
        }
        PW_LOG_INFO("event=child_stopped name=%s pid=%d", c->name, (int)c->pid);
        c->pid = 0;
    }
}

static bool exe_exists(const char *path)
{
    return access(path, X_OK) == 0;
}

int parkway_cmd_up(int argc, char **argv)
{
    struct up up = {0};
    parkway_stack_opts_default(&up.opts);
    bool new_key = false, redis_only = false;

    static const struct option longopts[] = {
        {"state-dir", required_argument, NULL, 's'},
        {"functions", required_argument, NULL, 'f'},
        {"port", required_argument, NULL, 'p'},
        {"redis-port", required_argument, NULL, 'r'},
        {"redis", required_argument, NULL, 'R'},
        {"new-key", no_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {"redis-only", no_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's':
            snprintf(up.opts.state_dir, sizeof up.opts.state_dir, "%s", optarg);
            break;
        case 'f':
            snprintf(up.opts.functions_dir, sizeof up.opts.functions_dir, "%s", optarg);
            break;
        case 'p':
        case 'r': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || v < 1 || v > 65535) {
                fprintf(stderr, "parkway up: --%s: not a port: %s\n",
                        opt == 'p' ? "port" : "redis-port", optarg);
                return 2;
            }
            if (opt == 'p')
                up.opts.router_port = (int)v;
            else
                up.opts.redis_port = (int)v;
            break;
        }
        case 'k':
            new_key = true;
            break;
        case 'R':
            if (snprintf(up.opts.redis_url, sizeof up.opts.redis_url, "%s", optarg) >=
                (int)sizeof up.opts.redis_url) {
                fprintf(stderr, "parkway up: --redis: URL too long\n");
                return 2;
            }
            up.opts.external_redis = true;
            break;
        case 'o':
            redis_only = true;
            break;
        case 'h':
            up_usage(stdout);
            return 0;
        default:
            up_usage(stderr);
            return 2;
        }
    }

    char err[512] = "";
    struct pw_spec_set specs = {0};
    char key[128] = "", admin_key[128] = "";
    int rc = 1;

    /* Bad specs are the user's input: report them before anything starts. */
    enum pw_err e = pw_spec_load_dir(up.opts.functions_dir, &specs, err, sizeof err);
    if (e) {
        fprintf(stderr, "%s\n", err);
        return pw_err_exit_code(e);
    }
    if (specs.count == 0) {
        fprintf(stderr, "parkway up: no function specs in %s\n", up.opts.functions_dir);
        return 2;
    }

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGCHLD);
    sigprocmask(SIG_BLOCK, &sigs, NULL);

    e = parkway_stack_prepare_dirs(&up.opts, err, sizeof err);
    if (e)
        goto fail;

    if (!up.opts.external_redis) {
        char conf[PATH_MAX + 32], redis_log[PATH_MAX + 32];
        e = parkway_stack_write_redis_conf(&up.opts, conf, sizeof conf, err, sizeof err);
        if (e)
            goto fail;
        snprintf(redis_log, sizeof redis_log, "%s/redis/redis.log", up.opts.state_dir);
        char *redis_argv[] = {"redis-server", conf, NULL};
        if (spawn(&up, "redis", redis_argv, redis_log)) {
            snprintf(err, sizeof err, "cannot start redis-server");
            goto fail;
        }
    }
    e = parkway_stack_wait_redis(&up.opts, 10000, err, sizeof err);
    if (e)
        goto fail;

    e = parkway_stack_register_functions(&up.opts, &specs, err, sizeof err);
    if (e)
        goto fail;
    e = parkway_stack_ensure_key(&up.opts, new_key, key, sizeof key, err, sizeof err);
    if (e)
        goto fail;
    if ((e = parkway_stack_admin_key(&up.opts, admin_key, sizeof admin_key))) {
        snprintf(err, sizeof err, "cannot make an admin key");
        goto fail;
    }
    /* The router reads it from its environment, never from its command line (ps shows that). */
    setenv("PARKWAY_ADMIN_KEY", admin_key, 1);

    /* The router and scaler join the stack as their issues land; say what runs. */
    const char *exe_dir = parkway_exe_dir();
    char router_exe[PATH_MAX], scaler_exe[PATH_MAX], engine_exe[PATH_MAX];
    snprintf(router_exe, sizeof router_exe, "%s/../router/parkway-router", exe_dir);
    snprintf(scaler_exe, sizeof scaler_exe, "%s/../scaler/parkway-scaler", exe_dir);
    snprintf(engine_exe, sizeof engine_exe, "%s/../engine/parkway-engine", exe_dir);
    char *redis_url = up.opts.redis_url, port_s[16];
    snprintf(port_s, sizeof port_s, "%d", up.opts.router_port);
    bool have_router = !redis_only && exe_exists(router_exe);
    bool have_scaler = !redis_only && exe_exists(scaler_exe);
    if (have_router) {
        char files_dir[PATH_MAX];
        snprintf(files_dir, sizeof files_dir, "%s/files", up.opts.state_dir);
        char *a[] = {router_exe, "--redis", redis_url,       "--listen", "127.0.0.1",
                     "--port",   port_s,    "--storage-dir", files_dir,  NULL};
        if (spawn(&up, "router", a, NULL))
            goto fail;
    }
    bool have_engine = !redis_only && !have_scaler && exe_exists(engine_exe);
    if (have_scaler) {
        char *a[] = {scaler_exe, "--redis", redis_url, "--functions", up.opts.functions_dir, NULL};
        if (spawn(&up, "scaler", a, NULL))
            goto fail;
    } else if (have_engine) {
        /* No scaler built yet: one engine per function, always on. */
        for (size_t i = 0; i < specs.count; i++) {
            char *a[] = {engine_exe, "--spec", specs.specs[i]->origin, "--redis", redis_url, NULL};
            if (spawn(&up, specs.specs[i]->name, a, NULL))
                goto fail;
        }
    }

    e = parkway_stack_write_env(&up.opts, key, admin_key, err, sizeof err);
    if (e)
        goto fail;

    printf("parkway is up\n");
    printf("  OPENAI_BASE_URL=http://127.0.0.1:%d/v1\n", up.opts.router_port);
    printf("  OPENAI_API_KEY=%s\n", key);
    if (up.opts.external_redis)
        printf("  redis            %s (external)\n", redis_url);
    else
        printf("  redis            %s (data in %s/redis)\n", redis_url, up.opts.state_dir);
    for (size_t i = 0; i < specs.count; i++)
        printf("  function         %s\n", specs.specs[i]->name);
    printf("  router           %s\n", have_router  ? "running"
                                      : redis_only ? "not started (--redis-only)"
                                                   : "not built yet");
    if (have_engine)
        printf("  engines          one per function (no scaler built yet)\n");
    else
        printf("  scaler + engines %s\n", have_scaler  ? "running"
                                          : redis_only ? "not started (--redis-only)"
                                                       : "not built yet");
    printf("  env file         %s/env\n", up.opts.state_dir);
    printf("  supervision      a child that exits is restarted (%d exits in %d s: stop)\n",
           UP_CRASH_LIMIT + 1, UP_CRASH_WINDOW_MS / 1000);
    printf("Ctrl-C stops the stack.\n");
    fflush(stdout);

    for (;;) {
        uint64_t due = next_restart_ms(&up), now = pw_clock_mono_ms();
        int sig;
        if (due) {
            uint64_t wait = due > now ? due - now : 0;
            struct timespec ts = {(time_t)(wait / 1000), (long)(wait % 1000) * 1000000L};
            sig = sigtimedwait(&sigs, NULL, &ts);
        } else {
            sig = sigwaitinfo(&sigs, NULL);
        }
        if (sig == SIGINT || sig == SIGTERM) {
            PW_LOG_INFO("event=stopping signal=%d", sig);
            rc = 0;
            break;
        }
        now = pw_clock_mono_ms();
        bool loop = false;
        int status;
        pid_t pid;
        while (!loop && (pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < up.n_children; i++) {
                struct up_child *c = &up.children[i];
                if (c->pid != pid)
                    continue;
                int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                PW_LOG_ERROR("event=child_exited name=%s pid=%d status=%d", c->name, (int)pid,
                             code);
                if (!child_exited(c, now)) {
                    crash_loop(c, code);
                    loop = true;
                }
                break;
            }
        }
        if (loop || !restart_due(&up, now)) {
            rc = 1;
            break;
        }
    }
    stop_all(&up);
    up_deinit(&up);
    pw_spec_set_deinit(&specs);
    return rc;

fail:
    fprintf(stderr, "parkway up: %s\n", err[0] ? err : pw_err_desc(e));
    stop_all(&up);
    up_deinit(&up);
    pw_spec_set_deinit(&specs);
    return e ? pw_err_exit_code(e) : 1;
}

/*
 * bench_coldstart: time from a chat request to its first token through the whole stack
 * (`parkway up`: redis-server, router, scaler, engines started by the scaler), in three
 * situations, each the median of --runs runs:
 *
 *   from_nothing  a fresh stack, the function at zero replicas: the request makes the
 *                 scaler provision (start) an engine (model file already on disk);
 *   from_parked   the same stack after the idle window parked the replica: the request
 *                 unparks it;
 *   warm          a replica is READY and idle.
 *
 * Each run starts a fresh stack (so "nothing" really is nothing), with a copy of the spec
 * whose idle_seconds is --idle-s (default 2) so parking comes quickly. The request is
 * `{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1,"stream":true}` over a raw
 * HTTP/1.1 connection; "first token" is the first SSE data event that carries content or a
 * finish reason. SSE keep-alive comments seen while waiting are counted. For from_parked
 * the scaler's `ready` event (unpark -> engine heartbeat READY, startup_ms) and the
 * engine's load_ms are reported to show where the time goes.
 *
 *   bench_coldstart [--parkway PATH] [--spec FILE] [--runs N] [--idle-s N]
 *
 * --parkway defaults to ../tools/parkway next to this executable; --spec to
 * functions/smollm2-135m.yaml (in the current directory, else in the source tree above the
 * build directory). Prints a table, then one JSON line:
 *   {"bench":"coldstart","from_nothing_ms":..,"from_parked_ms":..,"warm_ms":..}
 * Exit 77 when the default model is not in the model cache. Single-threaded.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "pw_cli.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_redis.h"
#include "pw_spec.h"

#define BENCH_RUNS_MAX 50
#define BENCH_FN_MAX 128
#define BENCH_HTTP_TIMEOUT_MS 120000
#define BENCH_UP_TIMEOUT_MS 60000
#define BENCH_PARK_TIMEOUT_MS 60000

struct bench {
    char parkway[PATH_MAX]; /* the parkway CLI */
    char spec[PATH_MAX];    /* function spec to copy */
    char fn[BENCH_FN_MAX];  /* its name */
    unsigned runs;
    unsigned idle_s;
};

/* One running stack. */
struct stack {
    char dir[128];       /* state dir and spec copy */
    pid_t pid;           /* parkway up */
    int port;            /* router */
    char key[256];       /* OPENAI_API_KEY */
    char redis_url[128]; /* PARKWAY_REDIS_URL */
    redisContext *rc;    /* to watch pw:{fn}:scale and pw:events */
};

/* What one request saw. */
struct ttft {
    double first_ms;     /* request sent -> first token event */
    unsigned keepalives; /* SSE comments before the first token */
    bool ok;             /* 200 and a token arrived */
};

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 1024 > cap) {
            char *g = realloc(buf, cap * 2);
            if (!g) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = g;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    fclose(f);
    if (buf)
        buf[n] = '\0';
    return buf;
}

/* value of NAME= in an env file */
static bool env_get(const char *text, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, name, nl) == 0 && p[nl] == '=') {
            const char *v = p + nl + 1;
            size_t len = strcspn(v, "\n");
            snprintf(out, cap, "%.*s", (int)len, v);
            return true;
        }
    }
    return false;
}

/* Writes a copy of the spec with idle_seconds replaced into dir/functions/. */
static bool write_spec(const struct bench *b, const char *dir)
{
    char *text = read_file(b->spec);
    if (!text)
        return false;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/functions", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/functions/%s.yaml", dir, b->fn);
    FILE *f = fopen(path, "w");
    if (!f) {
        free(text);
        return false;
    }
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        const char *t = line + strspn(line, " ");
        if (strncmp(t, "idle_seconds:", 13) == 0)
            fprintf(f, "%.*sidle_seconds: %u\n", (int)(t - line), line, b->idle_s);
        else
            fprintf(f, "%.*s\n", (int)len, line);
        line = nl ? nl + 1 : NULL;
    }
    fclose(f);
    free(text);
    return true;
}

static void stack_stop(struct stack *st)
{
    if (st->rc) {
        redisFree(st->rc);
        st->rc = NULL;
    }
    if (st->pid > 0) {
        kill(st->pid, SIGTERM);
        double t0 = bench_now_ms();
        int status;
        while (waitpid(st->pid, &status, WNOHANG) != st->pid) {
            if (bench_now_ms() - t0 > 45000) {
                kill(st->pid, SIGKILL);
                waitpid(st->pid, &status, 0);
                break;
            }
            bench_sleep_ms(50);
        }
        st->pid = 0;
    }
    if (st->dir[0] && !getenv("PW_BENCH_KEEP")) {
        char cmd[256];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", st->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "bench_coldstart: could not remove %s\n", st->dir);
    }
}

/* HGET pw:{fn}:scale field as a number; -1 when absent. */
static long long scale_field(struct stack *st, const char *fn, const char *field)
{
    char key[PW_KEY_MAX];
    pw_key_scale(key, sizeof key, fn);
    redisReply *r = redisCommand(st->rc, "HGET %s %s", key, field);
    long long v = r && r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return v;
}

static bool stack_start(const struct bench *b, struct stack *st)
{
    memset(st, 0, sizeof *st);
    snprintf(st->dir, sizeof st->dir, "/tmp/pw-bench-cold-XXXXXX");
    if (!mkdtemp(st->dir) || !write_spec(b, st->dir))
        return false;
    st->port = bench_free_port();
    int redis_port = bench_free_port();
    char log[256], fdir[256], port_s[16], rport_s[16], state[256];
    snprintf(log, sizeof log, "%s/up.log", st->dir);
    snprintf(fdir, sizeof fdir, "%s/functions", st->dir);
    snprintf(state, sizeof state, "%s/state", st->dir);
    snprintf(port_s, sizeof port_s, "%d", st->port);
    snprintf(rport_s, sizeof rport_s, "%d", redis_port);
    pid_t pid = fork();
    if (pid < 0)
        return false;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execl(b->parkway, "parkway", "up", "--state-dir", state, "--functions", fdir, "--port",
              port_s, "--redis-port", rport_s, (char *)NULL);
        _exit(127);
    }
    st->pid = pid;
    double t0 = bench_now_ms();
    for (;;) {
        char *text = read_file(log);
        bool up = text && strstr(text, "Ctrl-C stops the stack.");
        free(text);
        if (up)
            break;
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid || bench_now_ms() - t0 > BENCH_UP_TIMEOUT_MS) {
            fprintf(stderr, "bench_coldstart: parkway up did not come up; see %s\n", log);
            st->pid = 0;
            return false;
        }
        bench_sleep_ms(20);
    }
    char envp[300];
    snprintf(envp, sizeof envp, "%s/env", state);
    char *env = read_file(envp);
    bool ok = env && env_get(env, "OPENAI_API_KEY", st->key, sizeof st->key) &&
              env_get(env, "PARKWAY_REDIS_URL", st->redis_url, sizeof st->redis_url);
    free(env);
    if (!ok || pw_redis_sync_connect(st->redis_url, 5000, &st->rc, NULL, 0) != PW_OK) {
        fprintf(stderr, "bench_coldstart: no key or Redis in %s\n", envp);
        return false;
    }
    /* The scaler is observing once it writes the function's scale record. */
    while (scale_field(st, b->fn, "updated_ms") <= 0) {
        if (bench_now_ms() - t0 > BENCH_UP_TIMEOUT_MS) {
            fprintf(stderr, "bench_coldstart: the scaler never reported; see %s\n", log);
            return false;
        }
        bench_sleep_ms(20);
    }
    return true;
}

/*
 * One streaming chat request "Hi", max_tokens 1. Times the first data event with content
 * or a finish reason; counts SSE comments (": ...") before it; reads to the end.
 */
static struct ttft chat_once(const struct bench *b, const struct stack *st)
{
    struct ttft t = {0};
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)st->port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        if (s >= 0)
            close(s);
        return t;
    }
    struct timeval tv = {BENCH_HTTP_TIMEOUT_MS / 1000, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char body[512], req[1536];
    int bl = snprintf(body, sizeof body,
                      "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                      "\"max_tokens\":1,\"temperature\":0,\"stream\":true}",
                      b->fn);
    int rl = snprintf(req, sizeof req,
                      "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                      st->key, bl, body);
    double t0 = bench_now_ms();
    if (write(s, req, (size_t)rl) != rl) {
        close(s);
        return t;
    }
    static char buf[1 << 16];
    size_t n = 0;
    size_t scanned = 0; /* body bytes already searched for events */
    size_t body_at = 0;
    for (;;) {
        if (n + 1 >= sizeof buf)
            break;
        ssize_t got = read(s, buf + n, sizeof buf - 1 - n);
        if (got <= 0)
            break;
        n += (size_t)got;
        buf[n] = '\0';
        if (!body_at) {
            char *e = strstr(buf, "\r\n\r\n");
            if (!e)
                continue;
            body_at = (size_t)(e - buf) + 4;
            scanned = body_at;
            if (strncmp(buf, "HTTP/1.1 200", 12) != 0) {
                fprintf(stderr, "bench_coldstart: %.*s\n", (int)strcspn(buf, "\r"), buf);
                break;
            }
        }
        /* Complete lines only. */
        char *end = strrchr(buf + scanned, '\n');
        if (!end)
            continue;
        for (char *line = buf + scanned; line < end;) {
            char *nl = strchr(line, '\n');
            *nl = '\0';
            if (!t.ok && line[0] == ':')
                t.keepalives++;
            if (!t.ok && strncmp(line, "data: {", 7) == 0 &&
                ((strstr(line, "\"content\":\"") && !strstr(line, "\"content\":\"\"")) ||
                 strstr(line, "\"finish_reason\":\""))) {
                t.first_ms = bench_now_ms() - t0;
                t.ok = true;
            }
            *nl = '\n';
            line = nl + 1;
        }
        scanned = (size_t)(end - buf) + 1;
        if (strstr(buf + body_at, "[DONE]"))
            break;
    }
    close(s);
    return t;
}

static bool wait_parked(struct stack *st, const char *fn)
{
    double t0 = bench_now_ms();
    while (bench_now_ms() - t0 < BENCH_PARK_TIMEOUT_MS) {
        if (scale_field(st, fn, "parked") == 1 && scale_field(st, fn, "ready") == 0 &&
            scale_field(st, fn, "starting") == 0 && scale_field(st, fn, "draining") == 0 &&
            scale_field(st, fn, "provisioning") == 0) {
            /* a moment for the provider's model pin to map the file */
            bench_sleep_ms(300);
            return true;
        }
        bench_sleep_ms(50);
    }
    return false;
}

/* startup_ms of the newest `ready` event of fn; -1 if none. */
static long long last_ready_startup(struct stack *st, const char *fn)
{
    long long v = -1;
    for (int tries = 0; tries < 20 && v < 0; tries++) {
        redisReply *r = redisCommand(st->rc, "XREVRANGE %s + - COUNT 50", PW_KEY_EVENTS);
        struct pw_stream_entries *es = NULL;
        if (r && pw_stream_parse_range(r, &es) == PW_OK) {
            for (size_t i = 0; i < es->n && v < 0; i++) {
                const struct pw_slice *f = pw_stream_entry_get(&es->v[i], "function");
                const struct pw_slice *a = pw_stream_entry_get(&es->v[i], "action");
                const struct pw_slice *why = pw_stream_entry_get(&es->v[i], "reason");
                if (f && strcmp(f->ptr, fn) == 0 && a && strcmp(a->ptr, "ready") == 0 && why) {
                    const char *p = strstr(why->ptr, "startup_ms=");
                    if (p)
                        v = strtoll(p + 11, NULL, 10);
                }
            }
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
        if (v < 0)
            bench_sleep_ms(50);
    }
    return v;
}

/* load_ms of the newest engine_ready line in the stack's log; -1 if none. */
static double last_load_ms(const struct stack *st)
{
    char log[256];
    snprintf(log, sizeof log, "%s/up.log", st->dir);
    char *text = read_file(log);
    double v = -1;
    for (const char *p = text; p && (p = strstr(p, "event=engine_ready")); p++) {
        const char *l = strstr(p, "load_ms=");
        const char *nl = strchr(p, '\n');
        if (l && (!nl || l < nl))
            v = strtod(l + 8, NULL);
    }
    free(text);
    return v;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench_coldstart [--parkway PATH] [--spec FILE] [--runs N] [--idle-s N]\n");
}

int main(int argc, char **argv)
{
    struct bench b = {.runs = 5, .idle_s = 2};
    (void)pw_cli_exe_rel(b.parkway, sizeof b.parkway, "../tools/parkway");
    snprintf(b.spec, sizeof b.spec, "functions/smollm2-135m.yaml");
    if (access(b.spec, R_OK) != 0)
        (void)pw_cli_exe_rel(b.spec, sizeof b.spec, "../../functions/smollm2-135m.yaml");
    static const struct option longopts[] = {
        {"parkway", required_argument, NULL, 'p'}, {"spec", required_argument, NULL, 's'},
        {"runs", required_argument, NULL, 'n'},    {"idle-s", required_argument, NULL, 'i'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            snprintf(b.parkway, sizeof b.parkway, "%s", optarg);
            break;
        case 's':
            snprintf(b.spec, sizeof b.spec, "%s", optarg);
            break;
        case 'n':
            b.runs = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'i':
            b.idle_s = (unsigned)strtoul(optarg, NULL, 10);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (b.runs < 1 || b.runs > BENCH_RUNS_MAX || b.idle_s < 1 || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct pw_spec *spec = NULL;
    char err[1024];
    if (pw_spec_load_file(b.spec, &spec, err, sizeof err) != PW_OK) {
        fprintf(stderr, "bench_coldstart: %s\n", err);
        return 2;
    }
    snprintf(b.fn, sizeof b.fn, "%s", spec->name);
    /* The model must be on disk: this measures starts, not downloads. */
    if (!spec->model.path) {
        const char *file = spec->model.source.file ? strrchr(spec->model.source.file, '/') : NULL;
        file = file ? file + 1 : (spec->model.source.file ? spec->model.source.file : "");
        const char *dir = getenv("PARKWAY_MODEL_DIR");
        const char *home = getenv("HOME");
        char mp[PATH_MAX];
        if (dir && *dir)
            snprintf(mp, sizeof mp, "%s/%s", dir, file);
        else
            snprintf(mp, sizeof mp, "%s/.cache/parkway/models/%s", home ? home : ".", file);
        if (access(mp, R_OK) != 0) {
            fprintf(stderr, "bench_coldstart: skipped: model %s not in the cache\n", mp);
            pw_spec_destroy(spec);
            return 77;
        }
    }
    pw_spec_destroy(spec);
    if (access(b.parkway, X_OK) != 0) {
        fprintf(stderr, "bench_coldstart: %s: %s (give --parkway)\n", b.parkway, strerror(errno));
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    double nothing[BENCH_RUNS_MAX], parked[BENCH_RUNS_MAX], warm[BENCH_RUNS_MAX];
    double unpark_ready[BENCH_RUNS_MAX], load[BENCH_RUNS_MAX], provision_ready[BENCH_RUNS_MAX];
    unsigned n_nothing = 0, n_parked = 0, n_warm = 0, n_split = 0, n_prov = 0;
    unsigned ka_nothing = 0, ka_parked = 0;
    int rc = 0;
    printf("%-4s %14s %14s %10s %10s %16s %12s\n", "run", "from_nothing", "from_parked", "warm",
           "keepalives", "unpark->ready", "load_ms");
    for (unsigned r = 0; r < b.runs; r++) {
        struct stack st;
        if (!stack_start(&b, &st)) {
            stack_stop(&st);
            rc = 1;
            break;
        }
        struct ttft cold = chat_once(&b, &st);
        long long prov = last_ready_startup(&st, b.fn);
        /* warm: the replica is ready and idle now */
        struct ttft w = chat_once(&b, &st);
        struct ttft p = {0};
        long long up = -1;
        double lm = -1;
        if (wait_parked(&st, b.fn)) {
            p = chat_once(&b, &st);
            bench_sleep_ms(200);
            up = last_ready_startup(&st, b.fn);
            lm = last_load_ms(&st);
        } else {
            fprintf(stderr, "bench_coldstart: run %u: the replica did not park\n", r);
        }
        if (cold.ok) {
            nothing[n_nothing++] = cold.first_ms;
            ka_nothing += cold.keepalives;
        }
        if (w.ok)
            warm[n_warm++] = w.first_ms;
        if (p.ok) {
            parked[n_parked++] = p.first_ms;
            ka_parked += p.keepalives;
        }
        if (up >= 0 && lm >= 0) {
            unpark_ready[n_split] = (double)up;
            load[n_split++] = lm;
        }
        if (prov >= 0)
            provision_ready[n_prov++] = (double)prov;
        printf("%-4u %14.1f %14.1f %10.1f %10u %16lld %12.1f\n", r + 1,
               cold.ok ? cold.first_ms : -1, p.ok ? p.first_ms : -1, w.ok ? w.first_ms : -1,
               cold.keepalives + p.keepalives, up, lm);
        fflush(stdout);
        stack_stop(&st);
        if (!cold.ok || !w.ok || !p.ok)
            rc = 1;
    }
    double mn = bench_median(nothing, n_nothing), mp = bench_median(parked, n_parked),
           mw = bench_median(warm, n_warm);
    double mur = bench_median(unpark_ready, n_split), ml = bench_median(load, n_split),
           mpr = bench_median(provision_ready, n_prov);
    printf("\nmedian of %u runs: from_nothing %.1f ms (target <= 1500), from_parked %.1f ms "
           "(target <= 300), warm %.1f ms (target <= 50)\n",
           b.runs, mn, mp, mw);
    printf("from_nothing: provision -> READY heartbeat %.0f ms (scaler's ready event)\n", mpr);
    printf("from_parked: unpark -> READY heartbeat %.0f ms, of which engine load %.1f ms; "
           "the rest of the %.0f ms is wake + first step + reply\n",
           mur, ml, mp);
    printf("SSE keep-alive comments seen while waiting: %u (from nothing), %u (from parked)\n",
           ka_nothing, ka_parked);
    printf("{\"bench\":\"coldstart\",\"runs\":%u,\"from_nothing_ms\":%.1f,\"from_parked_ms\":%.1f,"
           "\"warm_ms\":%.1f,\"provision_to_ready_ms\":%.0f,\"unpark_to_ready_ms\":%.0f,"
           "\"engine_load_ms\":%.1f}\n",
           b.runs, mn, mp, mw, mpr, mur, ml);
    return rc;
}

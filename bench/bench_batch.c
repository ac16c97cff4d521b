/*
 * bench_batch: the batch lane (docs/internals/batch.md) on the default model, against the
 * engine's own best aggregate throughput, and what a running batch does to interactive
 * latency.
 *
 * Starts a private stack on loopback: redis-server, parkway-router (with a storage dir) and
 * one parkway-engine for the function, started directly (not by the scaler, so no cold
 * start or scaling decision is in any figure). One API key (tenant "bench"). Then:
 *
 *   phase 1  engine baseline: for each concurrency C in --levels (default 1,4,8,16; 16 is
 *            the spec's max_batch), C closed-loop clients send --rounds non-streaming chat
 *            requests each, shaped like the batch lines (same prompts, --max-tokens,
 *            temperature 0, ignore_eos), through the router; generated tokens/s = completion
 *            tokens / wall time. The best level is engine_best_tok_s.
 *   phase 2  idle interactive latency: --requests streaming chat probes ("Hi",
 *            --probe-tokens, temperature 0), one at a time, --gap-ms apart: time to first
 *            token (first SSE event with content) and total, p50/p99.
 *   phase 3  a batch of --lines lines (the phase-1 shape: every line generates exactly
 *            --max-tokens tokens) uploaded through POST /v1/files, created through
 *            POST /v1/batches and polled (100 ms) to completed, alone: the batch
 *            throughput. lines/s and tokens/s are taken from the creation request to the
 *            first poll that sees `completed` (own clock; includes validation, enqueue
 *            ticks and finalizing); the "steady" rate is the completed count's rise
 *            between 10% and 90%.
 *   phase 4  the same batch again while one thread sends the phase-2 probes, paced the
 *            same way: interactive latency during a batch (and the batch's throughput
 *            when it shares the engine). A probe counts as "during the batch" when it was
 *            sent and finished while the batch was in_progress with lines left.
 *
 * Prints a table (figure, value, target, met?), then one JSON line:
 *   {"bench":"batch","lines":..,"batch_lines_s":..,"batch_tok_s":..,"engine_best_tok_s":..,
 *    "batch_vs_best":..,"ttft_idle_p50_ms":..,"ttft_idle_p99_ms":..,"ttft_batch_p50_ms":..,
 *    "ttft_batch_p99_ms":..,"ttft_ratio_p50":.., ...}
 * Targets (issue 6): batch_vs_best (the batch alone) >= 0.8; ttft_ratio_p50 <= 1.5.
 *
 *   bench_batch [--lines N] [--max-tokens N] [--requests N] [--probe-tokens N] [--gap-ms N]
 *               [--levels 1,4,8,16] [--rounds N] [--threads N] [--spec FILE]
 *               [--router PATH] [--engine PATH] [--redis-server PATH]
 *
 * --router / --engine default to ../router/parkway-router and ../engine/parkway-engine next
 * to this executable; --redis-server to redis-server on PATH; --spec to
 * functions/smollm2-135m.yaml (current directory, else the source tree above the build
 * directory). Exit 77 when the model is not in the model cache. PW_BENCH_KEEP=1 keeps the
 * state directory (logs) in /tmp.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_apikey.h"
#include "bench_util.h"
#include "pw_cli.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_spec.h"

#define BENCH_LEVELS_MAX 16
#define BENCH_CONC_MAX 64
#define BENCH_SAMPLES_MAX 100000
#define BENCH_HTTP_TIMEOUT_S 600
#define BENCH_START_TIMEOUT_MS 120000
#define BENCH_BATCH_TIMEOUT_MS (3600 * 1000)

struct bench {
    char router[PATH_MAX], engine[PATH_MAX], redis_server[PATH_MAX], spec[PATH_MAX];
    char fn[128];
    unsigned lines, max_tokens, requests, probe_tokens, gap_ms, rounds, threads;
    unsigned levels[BENCH_LEVELS_MAX], n_levels;
    /* the running stack */
    char dir[64];
    int port, redis_port;
    char key[PW_APIKEY_LEN + 1];
    pid_t redis, router_pid, engine_pid;
};

static void stop_child(pid_t *pid)
{
    if (*pid <= 0)
        return;
    kill(*pid, SIGTERM);
    for (int i = 0; i < 400; i++) {
        if (waitpid(*pid, NULL, WNOHANG) == *pid) {
            *pid = 0;
            return;
        }
        bench_sleep_ms(25);
    }
    kill(*pid, SIGKILL);
    waitpid(*pid, NULL, 0);
    *pid = 0;
}

/* ---- HTTP (plain HTTP/1.1, Connection: close) -------------------------------------------- */

static int http_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {BENCH_HTTP_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static bool send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static bool send_request(int fd, const char *method, const char *path, const char *key,
                         const char *ctype, const char *body, size_t blen)
{
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      "%s%s%sContent-Type: %s\r\nContent-Length: %zu\r\n\r\n",
                      method, path, key ? "Authorization: Bearer " : "", key ? key : "",
                      key ? "\r\n" : "", ctype ? ctype : "application/json", blen);
    return hl > 0 && (size_t)hl < sizeof head && send_all(fd, head, (size_t)hl) &&
           (!blen || send_all(fd, body, blen));
}

/* One request; the whole response read to the close. Returns the status (-1 on failure);
 * *body_out (malloc'd, NUL-terminated) is the body when asked for. */
static int http_req(int port, const char *method, const char *path, const char *key,
                    const char *ctype, const char *body, size_t blen, char **body_out)
{
    if (body_out)
        *body_out = NULL;
    int fd = http_connect(port);
    if (fd < 0)
        return -1;
    if (!send_request(fd, method, path, key, ctype, body, blen)) {
        close(fd);
        return -1;
    }
    size_t cap = 1 << 14, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 4096 > cap) {
            char *g = realloc(buf, cap * 2);
            if (!g) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = g;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (!buf)
        return -1;
    buf[n] = '\0';
    int status = -1;
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &status) != 1) {
        free(buf);
        return -1;
    }
    if (body_out) {
        size_t bl = n - (size_t)(sep + 4 - buf);
        memmove(buf, sep + 4, bl + 1);
        *body_out = buf;
    } else {
        free(buf);
    }
    return status;
}

/* ---- request shapes ------------------------------------------------------------------------ */

/* The chat body every throughput request and batch line uses (i varies the prompt). */
static int line_body(const struct bench *b, unsigned i, char *out, size_t cap)
{
    return snprintf(out, cap,
                    "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Write one "
                    "sentence about the number %u.\"}],\"max_tokens\":%u,\"temperature\":0,"
                    "\"ignore_eos\":true}",
                    b->fn, i, b->max_tokens);
}

/* completion_tokens of a chat.completion body; -1 when absent. */
static long completion_tokens(const char *body)
{
    json_t *j = body ? json_loads(body, 0, NULL) : NULL;
    json_t *u = j ? json_object_get(json_object_get(j, "usage"), "completion_tokens") : NULL;
    long v = json_is_integer(u) ? (long)json_integer_value(u) : -1;
    json_decref(j);
    return v;
}

/* What one streaming probe saw. */
struct probe {
    double sent_ms;  /* own clock when it was sent */
    double ttft_ms;  /* sent -> first event with content */
    double total_ms; /* sent -> [DONE] */
    bool ok;
};

/* One streaming probe: "Hi", probe_tokens tokens, temperature 0. */
static struct probe probe_once(const struct bench *b)
{
    struct probe p = {0};
    char body[512];
    int bl = snprintf(body, sizeof body,
                      "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
                      "\"max_tokens\":%u,\"temperature\":0,\"stream\":true}",
                      b->fn, b->probe_tokens);
    int fd = http_connect(b->port);
    if (fd < 0)
        return p;
    p.sent_ms = bench_now_ms();
    if (!send_request(fd, "POST", "/v1/chat/completions", b->key, NULL, body, (size_t)bl)) {
        close(fd);
        return p;
    }
    size_t cap = 1 << 16, n = 0, scanned = 0, body_at = 0;
    char *buf = malloc(cap);
    bool first = false, done = false;
    while (buf && n + 1 < cap) {
        ssize_t got = read(fd, buf + n, cap - 1 - n);
        if (got < 0 && errno == EINTR)
            continue;
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
                fprintf(stderr, "bench_batch: probe: %.*s\n", (int)strcspn(buf, "\r"), buf);
                break;
            }
        }
        char *end = strrchr(buf + scanned, '\n');
        if (!end)
            continue;
        for (char *line = buf + scanned; line < end;) {
            char *nl = strchr(line, '\n');
            *nl = '\0';
            if (!first && strncmp(line, "data: {", 7) == 0 &&
                ((strstr(line, "\"content\":\"") && !strstr(line, "\"content\":\"\"")) ||
                 strstr(line, "\"finish_reason\":\""))) {
                p.ttft_ms = bench_now_ms() - p.sent_ms;
                first = true;
            }
            if (strncmp(line, "data: [DONE]", 12) == 0)
                done = true;
            *nl = '\n';
            line = nl + 1;
        }
        scanned = (size_t)(end - buf) + 1;
        if (done)
            break;
    }
    p.total_ms = bench_now_ms() - p.sent_ms;
    p.ok = first && done;
    free(buf);
    close(fd);
    return p;
}

/* ---- statistics ------------------------------------------------------------------------------ */

/* Nearest-rank percentile (q in 0..1) of v[0..n); sorts v. -1 when empty. */
static double pct(double *v, size_t n, double q)
{
    if (n == 0)
        return -1;
    qsort(v, n, sizeof *v, bench_cmp_double);
    size_t k = (size_t)(q * (double)n + 0.999999);
    if (k < 1)
        k = 1;
    if (k > n)
        k = n;
    return v[k - 1];
}

struct lat {
    double ttft[BENCH_SAMPLES_MAX], total[BENCH_SAMPLES_MAX];
    size_t n, failed;
};

static void lat_add(struct lat *l, const struct probe *p)
{
    if (!p->ok) {
        l->failed++;
        return;
    }
    if (l->n < BENCH_SAMPLES_MAX) {
        l->ttft[l->n] = p->ttft_ms;
        l->total[l->n] = p->total_ms;
        l->n++;
    }
}

/* ---- the stack ------------------------------------------------------------------------------- */

static bool seed_redis(struct bench *b)
{
    struct timeval tv = {2, 0};
    redisContext *rc = NULL;
    for (int i = 0; i < 200; i++) {
        rc = redisConnectWithTimeout("127.0.0.1", b->redis_port, tv);
        if (rc && !rc->err)
            break;
        redisFree(rc);
        rc = NULL;
        bench_sleep_ms(25);
    }
    if (!rc)
        return false;
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_HEX_LEN + 1], id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_generate(b->key);
    pw_apikey_hash(b->key, strlen(b->key), hash);
    pw_hex_encode(hash, sizeof hash, hex);
    pw_apikey_id(hash, id);
    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = id;
    rec.tenant = "bench";
    uint8_t buf[512];
    size_t len;
    bool ok = pw_proto_pack_key(&rec, buf, sizeof buf, &len, NULL) == PW_OK;
    if (ok) {
        freeReplyObject(redisCommand(rc, "HSET %s %s %b", PW_KEY_KEYS, hex, buf, len));
        freeReplyObject(redisCommand(rc, "HSET %s %s {}", PW_KEY_FUNCTIONS, b->fn));
    }
    redisFree(rc);
    return ok;
}

static bool stack_start(struct bench *b)
{
    snprintf(b->dir, sizeof b->dir, "/tmp/pw-bench-batch-XXXXXX");
    if (!mkdtemp(b->dir))
        return false;
    b->redis_port = bench_free_port();
    b->port = bench_free_port();
    char rport[16], hport[16], rurl[64], log[128], storage[128], threads[16];
    snprintf(rport, sizeof rport, "%d", b->redis_port);
    snprintf(hport, sizeof hport, "%d", b->port);
    snprintf(rurl, sizeof rurl, "redis://127.0.0.1:%d", b->redis_port);
    snprintf(storage, sizeof storage, "%s/files", b->dir);
    snprintf(threads, sizeof threads, "%u", b->threads);
    snprintf(log, sizeof log, "%s/redis.log", b->dir);
    char *redis_argv[] = {b->redis_server, "--port", rport,   "--bind", "127.0.0.1", "--save", "",
                          "--appendonly",  "no",     "--dir", b->dir,   NULL};
    b->redis = bench_spawn(redis_argv, log);
    if (!seed_redis(b)) {
        fprintf(stderr, "bench_batch: redis-server did not start (see %s)\n", log);
        return false;
    }
    setenv("PARKWAY_LOG_LEVEL", "warn", 1);
    snprintf(log, sizeof log, "%s/router.log", b->dir);
    char *router_argv[] = {b->router, "--redis",     rurl,          "--port",
                           hport,     "--threads",   "1",           "--storage-dir",
                           storage,   "--router-id", "bench-batch", NULL};
    b->router_pid = bench_spawn(router_argv, log);
    snprintf(log, sizeof log, "%s/engine.log", b->dir);
    char *engine_argv[] = {
        b->engine, "--spec",      b->spec,        "--redis",
        rurl,      "--worker-id", "bench-batch1", b->threads ? "--threads" : NULL,
        threads,   NULL};
    b->engine_pid = bench_spawn(engine_argv, log);
    /* Ready when a request is answered: router up, engine loaded and reading. */
    double t0 = bench_now_ms();
    char body[512];
    int bl = line_body(b, 0, body, sizeof body);
    for (;;) {
        char *resp = NULL;
        int st = http_req(b->port, "POST", "/v1/chat/completions", b->key, NULL, body, (size_t)bl,
                          &resp);
        free(resp);
        if (st == 200)
            return true;
        if (bench_now_ms() - t0 > BENCH_START_TIMEOUT_MS ||
            waitpid(b->engine_pid, NULL, WNOHANG) == b->engine_pid) {
            fprintf(stderr, "bench_batch: the stack did not answer (see %s/*.log)\n", b->dir);
            return false;
        }
        bench_sleep_ms(200);
    }
}

static void stack_stop(struct bench *b)
{
    stop_child(&b->engine_pid);
    stop_child(&b->router_pid);
    stop_child(&b->redis);
    if (b->dir[0] && !getenv("PW_BENCH_KEEP")) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", b->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "bench_batch: could not remove %s\n", b->dir);
    } else if (b->dir[0]) {
        fprintf(stderr, "bench_batch: logs kept in %s\n", b->dir);
    }
}

/* ---- phase 1: aggregate throughput at a concurrency --------------------------------------- */

struct client {
    const struct bench *b;
    unsigned id, rounds;
    long tokens;
    unsigned errors;
};

static void *client_main(void *arg)
{
    struct client *c = arg;
    char body[512];
    for (unsigned r = 0; r < c->rounds; r++) {
        int bl = line_body(c->b, c->id * 1000 + r, body, sizeof body);
        char *resp = NULL;
        int st = http_req(c->b->port, "POST", "/v1/chat/completions", c->b->key, NULL, body,
                          (size_t)bl, &resp);
        long t = st == 200 ? completion_tokens(resp) : -1;
        free(resp);
        if (t < 0)
            c->errors++;
        else
            c->tokens += t;
    }
    return NULL;
}

/* tokens/s of conc clients doing rounds requests each; -1 on failure. */
static double run_level(const struct bench *b, unsigned conc, long *tokens_out, double *secs_out)
{
    struct client cs[BENCH_CONC_MAX];
    pthread_t th[BENCH_CONC_MAX];
    unsigned started = 0;
    double t0 = bench_now_ms();
    for (unsigned i = 0; i < conc; i++) {
        cs[i] = (struct client){.b = b, .id = i, .rounds = b->rounds};
        if (pthread_create(&th[i], NULL, client_main, &cs[i]) != 0)
            break;
        started++;
    }
    long tokens = 0;
    unsigned errors = 0;
    for (unsigned i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        tokens += cs[i].tokens;
        errors += cs[i].errors;
    }
    double secs = (bench_now_ms() - t0) / 1000.0;
    *tokens_out = tokens;
    *secs_out = secs;
    if (started < conc || errors) {
        fprintf(stderr, "bench_batch: concurrency %u: %u errors\n", conc, errors);
        return -1;
    }
    return (double)tokens / secs;
}

/* ---- phase 3: the batch ------------------------------------------------------------------- */

struct prober {
    const struct bench *b;
    atomic_int stop;
    atomic_int batch_running; /* 1 while in_progress with lines left */
    struct lat during;
    size_t outside; /* probes not wholly inside the batch's run */
};

static void *prober_main(void *arg)
{
    struct prober *pr = arg;
    while (!atomic_load(&pr->stop)) {
        bool before = atomic_load(&pr->batch_running);
        struct probe p = probe_once(pr->b);
        bool after = atomic_load(&pr->batch_running);
        if (before && after)
            lat_add(&pr->during, &p);
        else
            pr->outside++;
        bench_sleep_ms((int)pr->b->gap_ms);
    }
    return NULL;
}

static char *batch_jsonl(const struct bench *b, size_t *len)
{
    size_t cap = (size_t)b->lines * 400 + 1;
    char *s = malloc(cap), *p = s;
    if (!s)
        return NULL;
    char body[512];
    for (unsigned i = 0; i < b->lines; i++) {
        line_body(b, 100000 + i, body, sizeof body);
        p += snprintf(p, cap - (size_t)(p - s),
                      "{\"custom_id\":\"line-%u\",\"method\":\"POST\",\"url\":\"/v1/chat/"
                      "completions\",\"body\":%s}\n",
                      i, body);
    }
    *len = (size_t)(p - s);
    return s;
}

/* Uploads content as a purpose=batch file; the file id into id. */
static bool upload(const struct bench *b, const char *content, size_t clen, char *id, size_t cap)
{
    static const char bnd[] = "pwbenchbatchboundary7";
    size_t total = clen + 1024;
    char *m = malloc(total);
    if (!m)
        return false;
    int n = snprintf(m, 1024,
                     "--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                     "--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                     "filename=\"bench.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n",
                     bnd, bnd);
    memcpy(m + n, content, clen);
    size_t len = (size_t)n + clen;
    len += (size_t)snprintf(m + len, 128, "\r\n--%s--\r\n", bnd);
    char ctype[128];
    snprintf(ctype, sizeof ctype, "multipart/form-data; boundary=%s", bnd);
    char *resp = NULL;
    int st = http_req(b->port, "POST", "/v1/files", b->key, ctype, m, len, &resp);
    free(m);
    json_t *j = st == 200 && resp ? json_loads(resp, 0, NULL) : NULL;
    const char *fid = json_string_value(json_object_get(j, "id"));
    bool ok = fid != NULL;
    if (ok)
        snprintf(id, cap, "%s", fid);
    else
        fprintf(stderr, "bench_batch: upload: status %d: %s\n", st, resp ? resp : "");
    json_decref(j);
    free(resp);
    return ok;
}

struct batch_result {
    bool ok;
    double create_to_done_s; /* POST /v1/batches -> the poll that saw completed */
    double in_progress_to_done_s;
    double steady_lines_s; /* completed count 10% -> 90% */
    long completed, failed, output_tokens;
    long ts_in_progress_to_completed_s; /* the batch's own timestamps (seconds) */
};

static struct batch_result run_batch(const struct bench *b, struct prober *pr)
{
    struct batch_result res = {0};
    size_t clen = 0;
    char *content = batch_jsonl(b, &clen);
    char fid[128], bid[128], body[512], path[256];
    if (!content || !upload(b, content, clen, fid, sizeof fid)) {
        free(content);
        return res;
    }
    free(content);
    int bl = snprintf(body, sizeof body,
                      "{\"input_file_id\":\"%s\",\"endpoint\":\"/v1/chat/completions\","
                      "\"completion_window\":\"24h\"}",
                      fid);
    char *resp = NULL;
    double t_create = bench_now_ms();
    int st = http_req(b->port, "POST", "/v1/batches", b->key, NULL, body, (size_t)bl, &resp);
    json_t *j = st == 200 && resp ? json_loads(resp, 0, NULL) : NULL;
    const char *id = json_string_value(json_object_get(j, "id"));
    if (!id) {
        fprintf(stderr, "bench_batch: create: status %d: %s\n", st, resp ? resp : "");
        json_decref(j);
        free(resp);
        return res;
    }
    snprintf(bid, sizeof bid, "%s", id);
    json_decref(j);
    free(resp);
    snprintf(path, sizeof path, "/v1/batches/%s", bid);
    double t_inprog = -1, t10 = -1, t90 = -1;
    long n10 = 0, n90 = 0, n_last = 0;
    double t_last = -1;
    unsigned last_pct = 0;
    for (;;) {
        if (bench_now_ms() - t_create > BENCH_BATCH_TIMEOUT_MS) {
            fprintf(stderr, "bench_batch: the batch did not complete in time\n");
            break;
        }
        resp = NULL;
        st = http_req(b->port, "GET", path, b->key, NULL, NULL, 0, &resp);
        double t = bench_now_ms();
        j = st == 200 && resp ? json_loads(resp, 0, NULL) : NULL;
        free(resp);
        const char *status = json_string_value(json_object_get(j, "status"));
        json_t *counts = json_object_get(j, "request_counts");
        long done = (long)json_integer_value(json_object_get(counts, "completed"));
        long failed = (long)json_integer_value(json_object_get(counts, "failed"));
        long total = (long)json_integer_value(json_object_get(counts, "total"));
        if (status && strcmp(status, "in_progress") == 0) {
            if (t_inprog < 0)
                t_inprog = t;
            atomic_store(&pr->batch_running, done + failed < total || total == 0);
            if (t10 < 0 && done * 10 >= (long)b->lines) {
                t10 = t;
                n10 = done;
            }
            if (t90 < 0 && done * 10 >= (long)b->lines * 9) {
                t90 = t;
                n90 = done;
            }
            if (t10 >= 0 && done > n10 && t90 < 0) {
                t_last = t; /* fallback when no poll lands past 90% */
                n_last = done;
            }
            unsigned pc = total ? (unsigned)(done * 100 / total) : 0;
            if (pc / 10 != last_pct / 10) {
                fprintf(stderr, "bench_batch: batch %u%% (%ld/%ld, %.1f s)\n", pc, done, total,
                        (t - t_create) / 1000.0);
                last_pct = pc;
            }
        } else {
            atomic_store(&pr->batch_running, 0);
        }
        if (status && (strcmp(status, "completed") == 0 || strcmp(status, "failed") == 0 ||
                       strcmp(status, "expired") == 0 || strcmp(status, "cancelled") == 0)) {
            res.ok = strcmp(status, "completed") == 0;
            res.create_to_done_s = (t - t_create) / 1000.0;
            res.in_progress_to_done_s = t_inprog >= 0 ? (t - t_inprog) / 1000.0 : -1;
            res.completed = done;
            res.failed = failed;
            res.output_tokens = (long)json_integer_value(
                json_object_get(json_object_get(j, "usage"), "output_tokens"));
            json_t *a = json_object_get(j, "in_progress_at"),
                   *z = json_object_get(j, "completed_at");
            res.ts_in_progress_to_completed_s =
                json_is_integer(a) && json_is_integer(z)
                    ? (long)(json_integer_value(z) - json_integer_value(a))
                    : -1;
            if (t90 < 0 && t_last > t10) {
                t90 = t_last;
                n90 = n_last;
            }
            if (t10 >= 0 && t90 > t10)
                res.steady_lines_s = (double)(n90 - n10) / ((t90 - t10) / 1000.0);
            if (!res.ok)
                fprintf(stderr, "bench_batch: the batch ended %s\n", status);
            json_decref(j);
            break;
        }
        json_decref(j);
        bench_sleep_ms(100);
    }
    return res;
}

/* ---- main ------------------------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f, "usage: bench_batch [--lines N] [--max-tokens N] [--requests N] "
               "[--probe-tokens N] [--gap-ms N]\n"
               "                   [--levels 1,4,8,16] [--rounds N] [--threads N] "
               "[--spec FILE]\n"
               "                   [--router PATH] [--engine PATH] [--redis-server PATH]\n");
}

static bool parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        return false;
    *out = (unsigned)v;
    return true;
}

/* Checks the spec's model is on disk (exit 77 otherwise); fills b->fn. */
static int check_spec(struct bench *b)
{
    struct pw_spec *spec = NULL;
    char err[1024];
    if (pw_spec_load_file(b->spec, &spec, err, sizeof err) != PW_OK) {
        fprintf(stderr, "bench_batch: %s\n", err);
        return 2;
    }
    snprintf(b->fn, sizeof b->fn, "%s", spec->name);
    int rc = 0;
    if (!spec->model.path && spec->model.source.file) {
        const char *file = strrchr(spec->model.source.file, '/');
        file = file ? file + 1 : spec->model.source.file;
        const char *dir = getenv("PARKWAY_MODEL_DIR");
        const char *home = getenv("HOME");
        char mp[PATH_MAX];
        if (dir && *dir)
            snprintf(mp, sizeof mp, "%s/%s", dir, file);
        else
            snprintf(mp, sizeof mp, "%s/.cache/parkway/models/%s", home ? home : ".", file);
        if (access(mp, R_OK) != 0) {
            fprintf(stderr,
                    "bench_batch: skipped: model %s not in the cache "
                    "(tools/fetch-model.sh)\n",
                    mp);
            rc = 77;
        }
    }
    if (rc == 0 && b->n_levels == 0) {
        /* Default levels: 1, 4, 8 and the spec's max_batch. */
        unsigned mb = spec->engine.max_batch ? spec->engine.max_batch : 16;
        unsigned dl[] = {1, 4, 8, mb};
        for (size_t i = 0; i < 4; i++)
            if (dl[i] <= mb && dl[i] <= BENCH_CONC_MAX &&
                (b->n_levels == 0 || b->levels[b->n_levels - 1] < dl[i]))
                b->levels[b->n_levels++] = dl[i];
    }
    pw_spec_destroy(spec);
    return rc;
}

static const char *met(bool ok)
{
    return ok ? "yes" : "NO";
}

int main(int argc, char **argv)
{
    static struct bench b = {.lines = 400,
                             .max_tokens = 32,
                             .requests = 30,
                             .probe_tokens = 8,
                             .gap_ms = 200,
                             .rounds = 3};
    (void)pw_cli_exe_rel(b.router, sizeof b.router, "../router/parkway-router");
    (void)pw_cli_exe_rel(b.engine, sizeof b.engine, "../engine/parkway-engine");
    snprintf(b.redis_server, sizeof b.redis_server, "redis-server");
    snprintf(b.spec, sizeof b.spec, "functions/smollm2-135m.yaml");
    if (access(b.spec, R_OK) != 0)
        (void)pw_cli_exe_rel(b.spec, sizeof b.spec, "../../functions/smollm2-135m.yaml");
    enum {
        O_LINES = 256,
        O_MAXTOK,
        O_REQ,
        O_PTOK,
        O_GAP,
        O_LEVELS,
        O_ROUNDS,
        O_THREADS,
        O_SPEC,
        O_ROUTER,
        O_ENGINE,
        O_REDIS,
        O_HELP
    };
    static const struct option longopts[] = {
        {"lines", required_argument, NULL, O_LINES},
        {"max-tokens", required_argument, NULL, O_MAXTOK},
        {"requests", required_argument, NULL, O_REQ},
        {"probe-tokens", required_argument, NULL, O_PTOK},
        {"gap-ms", required_argument, NULL, O_GAP},
        {"levels", required_argument, NULL, O_LEVELS},
        {"rounds", required_argument, NULL, O_ROUNDS},
        {"threads", required_argument, NULL, O_THREADS},
        {"spec", required_argument, NULL, O_SPEC},
        {"router", required_argument, NULL, O_ROUTER},
        {"engine", required_argument, NULL, O_ENGINE},
        {"redis-server", required_argument, NULL, O_REDIS},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    int opt;
    bool bad = false;
    while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (opt) {
        case O_LINES:
            bad |= !parse_uint(optarg, 1, 50000, &b.lines);
            break;
        case O_MAXTOK:
            bad |= !parse_uint(optarg, 1, 1024, &b.max_tokens);
            break;
        case O_REQ:
            bad |= !parse_uint(optarg, 1, BENCH_SAMPLES_MAX, &b.requests);
            break;
        case O_PTOK:
            bad |= !parse_uint(optarg, 1, 1024, &b.probe_tokens);
            break;
        case O_GAP:
            bad |= !parse_uint(optarg, 0, 60000, &b.gap_ms);
            break;
        case O_ROUNDS:
            bad |= !parse_uint(optarg, 1, 1000, &b.rounds);
            break;
        case O_THREADS:
            bad |= !parse_uint(optarg, 1, 256, &b.threads);
            break;
        case O_LEVELS: {
            char list[256];
            snprintf(list, sizeof list, "%s", optarg);
            b.n_levels = 0;
            for (char *save = NULL, *t = strtok_r(list, ",", &save); t;
                 t = strtok_r(NULL, ",", &save)) {
                unsigned v;
                if (b.n_levels == BENCH_LEVELS_MAX || !parse_uint(t, 1, BENCH_CONC_MAX, &v)) {
                    bad = true;
                    break;
                }
                b.levels[b.n_levels++] = v;
            }
            bad |= b.n_levels == 0;
            break;
        }
        case O_SPEC:
            snprintf(b.spec, sizeof b.spec, "%s", optarg);
            break;
        case O_ROUTER:
            snprintf(b.router, sizeof b.router, "%s", optarg);
            break;
        case O_ENGINE:
            snprintf(b.engine, sizeof b.engine, "%s", optarg);
            break;
        case O_REDIS:
            snprintf(b.redis_server, sizeof b.redis_server, "%s", optarg);
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            bad = true;
        }
    }
    if (bad || optind != argc) {
        usage(stderr);
        return 2;
    }
    int rc = check_spec(&b);
    if (rc)
        return rc;
    if (access(b.router, X_OK) != 0 || access(b.engine, X_OK) != 0) {
        fprintf(stderr, "bench_batch: %s or %s not found (give --router / --engine)\n", b.router,
                b.engine);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    double load_start = bench_loadavg1();
    rc = 1;
    static struct lat idle;
    static struct prober pr;
    double best = -1;
    unsigned best_level = 0;
    double level_tok_s[BENCH_LEVELS_MAX];
    struct batch_result br = {0};
    if (!stack_start(&b))
        goto out;
    fprintf(stderr, "bench_batch: stack up in %s (router :%d); load average %.2f\n", b.dir, b.port,
            load_start);

    /* Phase 1. */
    printf("phase 1: engine aggregate throughput (max_tokens %u, %u rounds per client)\n",
           b.max_tokens, b.rounds);
    printf("%-12s %10s %10s %12s\n", "concurrency", "tokens", "seconds", "tokens/s");
    for (unsigned i = 0; i < b.n_levels; i++) {
        long tokens = 0;
        double secs = 0;
        level_tok_s[i] = run_level(&b, b.levels[i], &tokens, &secs);
        if (level_tok_s[i] < 0)
            goto out;
        printf("%-12u %10ld %10.2f %12.1f\n", b.levels[i], tokens, secs, level_tok_s[i]);
        fflush(stdout);
        if (level_tok_s[i] > best) {
            best = level_tok_s[i];
            best_level = b.levels[i];
        }
    }

    /* Phase 2. */
    for (unsigned i = 0; i < b.requests; i++) {
        struct probe p = probe_once(&b);
        lat_add(&idle, &p);
        bench_sleep_ms((int)b.gap_ms);
    }
    if (idle.n == 0) {
        fprintf(stderr, "bench_batch: no idle probe succeeded\n");
        goto out;
    }

    /* Phase 3: the batch alone (no prober thread runs; pr_alone only takes its flags). */
    static struct prober pr_alone;
    pr_alone.b = &b;
    struct batch_result ba = run_batch(&b, &pr_alone);
    if (!ba.ok)
        goto out;

    /* Phase 4: the batch with interactive probes. */
    pr.b = &b;
    pthread_t pth;
    bool prober_started = pthread_create(&pth, NULL, prober_main, &pr) == 0;
    br = run_batch(&b, &pr);
    atomic_store(&pr.stop, 1);
    if (prober_started)
        pthread_join(pth, NULL);
    if (!br.ok)
        goto out;

    double load_end = bench_loadavg1();
    size_t n_idle = idle.n, n_during = pr.during.n;
    double ti50 = pct(idle.ttft, n_idle, 0.5), ti99 = pct(idle.ttft, n_idle, 0.99);
    double tt50 = pct(idle.total, n_idle, 0.5), tt99 = pct(idle.total, n_idle, 0.99);
    double tb50 = pct(pr.during.ttft, n_during, 0.5), tb99 = pct(pr.during.ttft, n_during, 0.99);
    double bt50 = pct(pr.during.total, n_during, 0.5), bt99 = pct(pr.during.total, n_during, 0.99);
    long tokens = br.output_tokens > 0 ? br.output_tokens : (long)b.lines * b.max_tokens;
    double lines_s = (double)br.completed / br.create_to_done_s;
    double tok_s = (double)tokens / br.create_to_done_s;
    double steady_tok_s =
        br.steady_lines_s * (double)tokens / (double)(br.completed ? br.completed : 1);
    long tokens_alone = ba.output_tokens > 0 ? ba.output_tokens : (long)b.lines * b.max_tokens;
    double alone_lines_s = (double)ba.completed / ba.create_to_done_s;
    double alone_tok_s = (double)tokens_alone / ba.create_to_done_s;
    double vs_best = best > 0 ? alone_tok_s / best : 0;
    double probed_vs_best = best > 0 ? tok_s / best : 0;
    double ratio = ti50 > 0 && tb50 > 0 ? tb50 / ti50 : -1;

    printf("\nphase 2/3: interactive probes (\"Hi\", max_tokens %u, stream, %u ms apart)\n",
           b.probe_tokens, b.gap_ms);
    printf("%-14s %6s %10s %10s %12s %12s\n", "when", "n", "ttft_p50", "ttft_p99", "total_p50",
           "total_p99");
    printf("%-14s %6zu %10.1f %10.1f %12.1f %12.1f\n", "idle", n_idle, ti50, ti99, tt50, tt99);
    printf("%-14s %6zu %10.1f %10.1f %12.1f %12.1f\n", "during batch", n_during, tb50, tb99, bt50,
           bt99);
    printf("probe failures: idle %zu, during %zu; probes outside the batch's run: %zu\n",
           idle.failed, pr.during.failed, pr.outside);
    printf("\nphase 3: batch of %u lines alone (max_tokens %u): %ld completed, %ld failed, %ld "
           "output tokens in %.2f s\n",
           b.lines, b.max_tokens, ba.completed, ba.failed, tokens_alone, ba.create_to_done_s);
    printf("phase 4: the same batch with the probes: %ld completed, %ld failed, %ld output "
           "tokens\n",
           br.completed, br.failed, tokens);
    printf("create -> completed %.2f s (own clock), in_progress -> completed %.2f s, batch "
           "timestamps %ld s; steady (10%%..90%%) %.2f lines/s = %.1f tokens/s\n",
           br.create_to_done_s, br.in_progress_to_done_s, br.ts_in_progress_to_completed_s,
           br.steady_lines_s, steady_tok_s);

    printf("\n%-34s %12s %14s %6s\n", "figure", "value", "target", "met?");
    printf("%-34s %12.2f %14s %6s\n", "batch lines/s (alone)", alone_lines_s, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "batch tokens/s (alone)", alone_tok_s, "-", "");
    printf("%-34s %12.2f %14s %6s\n", "batch lines/s (with probes)", lines_s, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "batch tokens/s (with probes)", tok_s, "-", "");
    char bl[32];
    snprintf(bl, sizeof bl, "(C=%u)", best_level);
    printf("%-34s %12.1f %14s %6s\n", "engine best aggregate tokens/s", best, bl, "");
    printf("%-34s %12.2f %14s %6s\n", "batch (alone) / engine best", vs_best, ">= 0.80",
           met(vs_best >= 0.8));
    printf("%-34s %12.2f %14s %6s\n", "batch (with probes) / engine best", probed_vs_best, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "TTFT idle p50 ms", ti50, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "TTFT idle p99 ms", ti99, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "TTFT during batch p50 ms", tb50, "-", "");
    printf("%-34s %12.1f %14s %6s\n", "TTFT during batch p99 ms", tb99, "-", "");
    printf("%-34s %12.2f %14s %6s\n", "TTFT p50 during / idle", ratio, "<= 1.50",
           met(ratio > 0 && ratio <= 1.5));
    printf("load average (1 min): %.2f at start, %.2f at end\n", load_start, load_end);

    printf("{\"bench\":\"batch\",\"lines\":%u,\"max_tokens\":%u,\"batch_lines_s\":%.3f,"
           "\"batch_tok_s\":%.1f,\"batch_probed_lines_s\":%.3f,\"batch_probed_tok_s\":%.1f,"
           "\"batch_probed_steady_tok_s\":%.1f,\"batch_probed_vs_best\":%.3f,"
           "\"engine_best_tok_s\":%.1f,\"engine_best_concurrency\":%u,\"engine_tok_s\":{",
           b.lines, b.max_tokens, alone_lines_s, alone_tok_s, lines_s, tok_s, steady_tok_s,
           probed_vs_best, best, best_level);
    for (unsigned i = 0; i < b.n_levels; i++)
        printf("%s\"%u\":%.1f", i ? "," : "", b.levels[i], level_tok_s[i]);
    printf("},\"batch_vs_best\":%.3f,\"ttft_idle_p50_ms\":%.1f,\"ttft_idle_p99_ms\":%.1f,"
           "\"ttft_batch_p50_ms\":%.1f,\"ttft_batch_p99_ms\":%.1f,\"ttft_ratio_p50\":%.2f,"
           "\"total_idle_p50_ms\":%.1f,\"total_batch_p50_ms\":%.1f,\"probes_idle\":%zu,"
           "\"probes_batch\":%zu,\"loadavg_start\":%.2f,\"loadavg_end\":%.2f}\n",
           vs_best, ti50, ti99, tb50, tb99, ratio, tt50, bt50, n_idle, n_during, load_start,
           load_end);
    rc = 0;
out:
    stack_stop(&b);
    return rc;
}

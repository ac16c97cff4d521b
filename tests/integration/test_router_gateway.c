/*
 * Integration tests of the router gateway as a real process: a real redis-server
 * (pw_test_redis), parkway-router started as a child on a free loopback port, and this test
 * playing the engine: it reads the InferenceRequest the router queued on pw:{fn}:q with
 * XREADGROUP (group "engines") and answers with ReplyChunks XADDed to the request's
 * reply_to stream. HTTP goes over raw blocking sockets (a small client below), so the test
 * needs neither libcurl nor curl.
 *
 * Covers auth (missing, bad, unknown, disabled, revoked through pw:keys:revoked, and keys
 * made by `parkway keys` when the CLI has the command), 403/404/405/400/413/429, answers
 * assembled from chunks, SSE framing with usage, retried attempts, client disconnect and
 * deadline cancel flags, Redis loss and return (also while a call waits for its next chunk),
 * replies read per worker thread, x-request-id, /healthz, /readyz, /metrics.
 * Each router's stderr goes to a file; the teardown fails on a sanitizer report in it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_apikey.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_test_proc.h"
#include "pw_test_redis.h"

#define ROUTER_BIN PW_BINARY_DIR "/router/parkway-router"
#ifndef PARKWAY_BIN
#define PARKWAY_BIN PW_BINARY_DIR "/tools/parkway"
#endif
#define FN "fn1"
#define FN2 "fn2"
#define ADMIN_KEY "admin-secret-for-tests"

/* ---- fixture --------------------------------------------------------------------------- */

struct router_proc {
    pid_t pid;
    int port;
    char log[256]; /* its stderr */
};

static struct pw_test_redis g_redis;
static redisContext *g_rc; /* the test's own connection: seeding and playing the engine */
static struct router_proc g_router;
static char g_key[PW_APIKEY_LEN + 1]; /* a plain key: every function, no limits */
static char g_tmp[64];

static redisReply *rcmd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(g_rc, fmt, ap);
    va_end(ap);
    return r;
}

static void redis_connect(void)
{
    if (g_rc)
        redisFree(g_rc);
    struct timeval tv = {10, 0}; /* above any XREADGROUP BLOCK used here */
    g_rc = redisConnectWithTimeout("127.0.0.1", g_redis.port, tv);
    assert_non_null(g_rc);
    assert_int_equal(g_rc->err, 0);
    redisSetTimeout(g_rc, tv);
}

/* Registers the functions and the engines' consumer groups. */
static void seed_functions(void)
{
    const char *fns[] = {FN, FN2};
    for (size_t i = 0; i < 2; i++) {
        freeReplyObject(rcmd("HSET %s %s {}", PW_KEY_FUNCTIONS, fns[i]));
        char q[PW_KEY_MAX];
        assert_int_equal(pw_key_queue(q, sizeof q, fns[i]), PW_OK);
        freeReplyObject(rcmd("XGROUP CREATE %s %s 0 MKSTREAM", q, PW_GROUP_ENGINES));
    }
}

/* Stores a new key's record with both limits; key and hex as make_key. */
static void make_key_limits(char key[PW_APIKEY_LEN + 1], char *hex, const char *tenant,
                            const char *const *fns, size_t n_fns, uint32_t rpm, uint32_t tpm,
                            bool disabled);

/* Stores a new key's record; returns the key in key, its hash hex in hex (may be NULL). */
static void make_key(char key[PW_APIKEY_LEN + 1], char *hex, const char *tenant,
                     const char *const *fns, size_t n_fns, uint32_t rpm, bool disabled)
{
    make_key_limits(key, hex, tenant, fns, n_fns, rpm, 0, disabled);
}

static void make_key_limits(char key[PW_APIKEY_LEN + 1], char *hex, const char *tenant,
                            const char *const *fns, size_t n_fns, uint32_t rpm, uint32_t tpm,
                            bool disabled)
{
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char h[PW_APIKEY_HASH_HEX_LEN + 1], id[PW_APIKEY_ID_LEN + 1];
    assert_int_equal(pw_apikey_generate(key), PW_OK);
    assert_int_equal(pw_apikey_hash(key, strlen(key), hash), PW_OK);
    pw_hex_encode(hash, sizeof hash, h);
    pw_apikey_id(hash, id);
    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = id;
    rec.tenant = (char *)tenant;
    rec.name = "test";
    rec.allowed_functions = (char **)fns;
    rec.n_allowed_functions = n_fns;
    rec.rpm_limit = rpm;
    rec.tpm_limit = tpm;
    rec.disabled = disabled;
    rec.created_unix_ms = pw_clock_wall_ms();
    uint8_t buf[4096];
    size_t len;
    assert_int_equal(pw_proto_pack_key(&rec, buf, sizeof buf, &len, NULL), PW_OK);
    redisReply *r = rcmd("HSET %s %s %b", PW_KEY_KEYS, h, buf, len);
    assert_non_null(r);
    freeReplyObject(r);
    if (hex)
        memcpy(hex, h, sizeof h);
}

/* Rewrites the stored record of hex with disabled = 1 (no publish). */
static void disable_key(const char *hex)
{
    redisReply *r = rcmd("HGET %s %s", PW_KEY_KEYS, hex);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    Parkway__KeyRecord *rec = NULL;
    assert_int_equal(pw_proto_unpack_key(r->str, r->len, 0, &rec), PW_OK);
    freeReplyObject(r);
    rec->disabled = 1;
    uint8_t buf[4096];
    size_t len;
    assert_int_equal(pw_proto_pack_key(rec, buf, sizeof buf, &len, NULL), PW_OK);
    pw_proto_free_key(rec);
    freeReplyObject(rcmd("HSET %s %s %b", PW_KEY_KEYS, hex, buf, len));
}

/* ---- a small blocking HTTP/1.1 client ------------------------------------------------- */

struct hconn {
    int fd;
    char *buf; /* received, not yet consumed */
    size_t len, cap;
};

struct hresp {
    int status;
    char head[8192]; /* status line and headers, NUL-terminated */
    char *body;      /* decoded body, NUL-terminated (malloc) */
    size_t body_len;
    bool chunked;
};

static struct hconn *hc_open(int port)
{
    struct hconn *h = calloc(1, sizeof *h);
    assert_non_null(h);
    h->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(h->fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(h->fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(h->fd);
        free(h);
        return NULL;
    }
    struct timeval tv = {10, 0};
    setsockopt(h->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(h->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    h->cap = 1 << 16;
    h->buf = malloc(h->cap);
    assert_non_null(h->buf);
    return h;
}

static void hc_close(struct hconn *h)
{
    if (!h)
        return;
    close(h->fd);
    free(h->buf);
    free(h);
}

static bool hc_send(struct hconn *h, const void *data, size_t len)
{
    const char *p = data;
    while (len) {
        ssize_t n = send(h->fd, p, len, MSG_NOSIGNAL);
        if (n <= 0)
            return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Reads more; false on EOF, error or timeout. */
static bool hc_fill(struct hconn *h)
{
    if (h->cap - h->len < 4096) {
        h->cap *= 2;
        h->buf = realloc(h->buf, h->cap);
        assert_non_null(h->buf);
    }
    ssize_t n = recv(h->fd, h->buf + h->len, h->cap - h->len, 0);
    if (n <= 0)
        return false;
    h->len += (size_t)n;
    return true;
}

static void hc_consume(struct hconn *h, size_t n)
{
    memmove(h->buf, h->buf + n, h->len - n);
    h->len -= n;
}

/* First value of header name (case-insensitive) in r->head, into out; false if absent. */
static bool resp_header(const struct hresp *r, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    for (const char *line = strstr(r->head, "\r\n"); line && line[2];
         line = strstr(line + 2, "\r\n")) {
        const char *l = line + 2;
        if (strncasecmp(l, name, n) == 0 && l[n] == ':') {
            const char *v = l + n + 1;
            while (*v == ' ')
                v++;
            size_t vl = strcspn(v, "\r");
            snprintf(out, cap, "%.*s", (int)vl, v);
            return true;
        }
    }
    return false;
}

/* Reads the status line and headers into r. */
static bool hc_read_head(struct hconn *h, struct hresp *r)
{
    memset(r, 0, sizeof *r);
    char *end;
    for (;;) {
        if (h->len && (end = memmem(h->buf, h->len, "\r\n\r\n", 4)))
            break;
        if (!hc_fill(h))
            return false;
    }
    size_t n = (size_t)(end - h->buf) + 4;
    assert_true(n < sizeof r->head);
    memcpy(r->head, h->buf, n);
    r->head[n] = '\0';
    hc_consume(h, n);
    r->status = atoi(r->head + 9);
    char te[64];
    r->chunked = resp_header(r, "transfer-encoding", te, sizeof te) && strcasestr(te, "chunked");
    return true;
}

/* One chunk of a chunked body, appended to r->body; returns its size, 0 at the end, -1 on
 * a lost connection. */
static long hc_read_chunk(struct hconn *h, struct hresp *r)
{
    char *crlf;
    while (!(h->len && (crlf = memmem(h->buf, h->len, "\r\n", 2))))
        if (!hc_fill(h))
            return -1;
    size_t size = strtoul(h->buf, NULL, 16);
    size_t hdr = (size_t)(crlf - h->buf) + 2;
    while (h->len < hdr + size + 2)
        if (!hc_fill(h))
            return -1;
    r->body = realloc(r->body, r->body_len + size + 1);
    memcpy(r->body + r->body_len, h->buf + hdr, size);
    r->body_len += size;
    r->body[r->body_len] = '\0';
    hc_consume(h, hdr + size + 2);
    return (long)size;
}

static bool hc_read_body(struct hconn *h, struct hresp *r)
{
    char cl[32];
    r->body = calloc(1, 1);
    if (r->chunked) {
        long n;
        while ((n = hc_read_chunk(h, r)) > 0)
            ;
        return n == 0;
    }
    size_t want = 0;
    bool to_eof = true;
    if (resp_header(r, "content-length", cl, sizeof cl)) {
        want = strtoul(cl, NULL, 10);
        to_eof = false;
    }
    while (to_eof || h->len < want)
        if (!hc_fill(h))
            break;
    if (to_eof)
        want = h->len;
    if (h->len < want)
        return false;
    r->body = realloc(r->body, want + 1);
    memcpy(r->body, h->buf, want);
    r->body[want] = '\0';
    r->body_len = want;
    hc_consume(h, want);
    return true;
}

static bool hc_read(struct hconn *h, struct hresp *r)
{
    return hc_read_head(h, r) && hc_read_body(h, r);
}

static void resp_free(struct hresp *r)
{
    free(r->body);
    r->body = NULL;
}

/* Sends one request; extra is more header lines, each ending in \r\n (may be NULL). */
static bool hc_request(struct hconn *h, const char *method, const char *path, const char *key,
                       const char *extra, const char *body, size_t body_len)
{
    char head[4096];
    int n = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n", method, path);
    if (key)
        n += snprintf(head + n, sizeof head - (size_t)n, "Authorization: Bearer %s\r\n", key);
    if (body)
        n += snprintf(head + n, sizeof head - (size_t)n,
                      "Content-Type: application/json\r\nContent-Length: %zu\r\n", body_len);
    n += snprintf(head + n, sizeof head - (size_t)n, "%s\r\n", extra ? extra : "");
    return hc_send(h, head, (size_t)n) && (!body || hc_send(h, body, body_len));
}

/* One request on a new connection; the response goes to r. */
static void http_do(int port, const char *method, const char *path, const char *key,
                    const char *extra, const char *body, struct hresp *r)
{
    struct hconn *h = hc_open(port);
    assert_non_null(h);
    assert_true(hc_request(h, method, path, key, extra, body, body ? strlen(body) : 0));
    assert_true(hc_read(h, r));
    hc_close(h);
}

/* Checks an OpenAI error body: status, type, code (NULL = null, "*" = any string), param
 * (NULL = null). */
static void assert_error(const struct hresp *r, int status, const char *type, const char *code,
                         const char *param)
{
    if (r->status != status)
        fprintf(stderr, "unexpected %d: %s\n", r->status, r->body);
    assert_int_equal(r->status, status);
    json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
    assert_non_null(j);
    json_t *e = json_object_get(j, "error");
    assert_true(json_is_object(e));
    assert_true(json_is_string(json_object_get(e, "message")));
    assert_true(json_string_length(json_object_get(e, "message")) > 0);
    if (type)
        assert_string_equal(json_string_value(json_object_get(e, "type")), type);
    json_t *c = json_object_get(e, "code"), *p = json_object_get(e, "param");
    assert_non_null(c);
    assert_non_null(p);
    if (code && strcmp(code, "*") == 0)
        assert_true(json_is_string(c));
    else if (code)
        assert_string_equal(json_string_value(c), code);
    else
        assert_true(json_is_null(c));
    if (param)
        assert_string_equal(json_string_value(p), param);
    else
        assert_true(json_is_null(p));
    /* No key material ever comes back. */
    assert_null(strstr(r->body, "pk-"));
    json_decref(j);
}

/* ---- the router process --------------------------------------------------------------- */

static void router_start(struct router_proc *rp, const char *const *extra, size_t n_extra)
{
    rp->port = pw_test_free_port();
    snprintf(rp->log, sizeof rp->log, "%s/router-%d.log", g_tmp, rp->port);
    char port[16];
    snprintf(port, sizeof port, "%d", rp->port);
    const char *argv[32] = {ROUTER_BIN,  "--redis", g_redis.url,   "--port",  port,
                            "--threads", "2",       "--admin-key", ADMIN_KEY, "--router-id"};
    size_t n = 10;
    char rid[32];
    snprintf(rid, sizeof rid, "test-%d", rp->port);
    argv[n++] = rid;
    for (size_t i = 0; i < n_extra; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(rp->log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fd, 2);
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1);
        setenv("PARKWAY_LOG_LEVEL", "info", 1);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    rp->pid = pid;
    /* Up when /readyz answers 200 (the HTTP loop runs and Redis is connected). */
    uint64_t until = pw_clock_mono_ms() + 15000;
    for (;;) {
        struct hconn *h = hc_open(rp->port);
        if (h) {
            struct hresp r;
            bool ok = hc_request(h, "GET", "/readyz", NULL, NULL, NULL, 0) && hc_read(h, &r) &&
                      r.status == 200;
            resp_free(&r);
            hc_close(h);
            if (ok)
                break;
        }
        assert_true(pw_clock_mono_ms() < until);
        int st;
        assert_int_equal(waitpid(pid, &st, WNOHANG), 0); /* still running */
        pw_test_sleep_ms(20);
    }
    pw_test_sleep_ms(100); /* the function snapshot (HKEYS pw:functions) is asked for at start */
}

/* SIGTERM, reap, and fail on an unclean exit or a sanitizer report in its log. */
static void router_stop(struct router_proc *rp)
{
    if (rp->pid <= 0)
        return;
    kill(rp->pid, SIGTERM);
    int st = 0;
    uint64_t until = pw_clock_mono_ms() + 20000;
    while (waitpid(rp->pid, &st, WNOHANG) == 0) {
        if (pw_clock_mono_ms() > until) {
            kill(rp->pid, SIGKILL);
            waitpid(rp->pid, &st, 0);
            break;
        }
        pw_test_sleep_ms(20);
    }
    rp->pid = 0;
    FILE *f = fopen(rp->log, "r");
    bool bad = false;
    if (f) {
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            if (strstr(line, "AddressSanitizer") || strstr(line, "LeakSanitizer") ||
                strstr(line, "runtime error:") || strstr(line, "pk-")) {
                fprintf(stderr, "router log: %s", line);
                bad = true;
            }
        }
        fclose(f);
    }
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fprintf(stderr, "router exit status 0x%x (log %s)\n", st, rp->log);
    assert_false(bad);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

/* ---- playing the engine --------------------------------------------------------------- */

/* The next request queued for fn (acknowledged), or NULL after block_ms. */
static Parkway__InferenceRequest *engine_take(const char *fn, int block_ms)
{
    char q[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(q, sizeof q, fn), PW_OK);
    redisReply *r = rcmd("XREADGROUP GROUP %s test COUNT 1 BLOCK %d STREAMS %s >", PW_GROUP_ENGINES,
                         block_ms, q);
    assert_non_null(r);
    struct pw_stream_entries *es = NULL;
    Parkway__InferenceRequest *req = NULL;
    if (r->type != REDIS_REPLY_NIL) {
        assert_int_equal(pw_stream_parse_read(r, &es), PW_OK);
        if (es->n == 1) {
            const struct pw_slice *v = pw_stream_entry_get(&es->v[0], PW_STREAM_FIELD);
            assert_non_null(v);
            assert_int_equal(pw_proto_unpack_request(v->ptr, v->len, 0, &req), PW_OK);
            freeReplyObject(rcmd("XACK %s %s %s", q, PW_GROUP_ENGINES, es->v[0].id));
        }
    }
    pw_stream_entries_free(es);
    freeReplyObject(r);
    return req;
}

static void engine_drain(const char *fn)
{
    Parkway__InferenceRequest *req;
    while ((req = engine_take(fn, 1)))
        pw_proto_free_request(req);
}

struct chunk_spec {
    uint32_t attempt, seq, index;
    const char *text;
    Parkway__FinishReason finish;
    bool done;
    uint32_t prompt_tokens, completion_tokens;
};

static void engine_send(const Parkway__InferenceRequest *req, const struct chunk_spec *s)
{
    Parkway__ReplyChunk ch = PARKWAY__REPLY_CHUNK__INIT;
    Parkway__Usage u = PARKWAY__USAGE__INIT;
    ch.request_id = req->id;
    ch.attempt = s->attempt;
    ch.seq = s->seq;
    ch.index = s->index;
    ch.text = (char *)(s->text ? s->text : "");
    ch.n_tokens = s->text && s->text[0] ? 1 : 0;
    ch.finish_reason = s->finish;
    ch.done = s->done;
    ch.worker_id = "test-engine";
    ch.queue_ms = 1;
    if (s->done) {
        u.prompt_tokens = s->prompt_tokens;
        u.completion_tokens = s->completion_tokens;
        ch.usage = &u;
    }
    uint8_t buf[8192];
    size_t len;
    assert_int_equal(pw_proto_pack_reply(&ch, buf, sizeof buf, &len, NULL), PW_OK);
    redisReply *r = rcmd("XADD %s * %s %b", req->reply_to, PW_STREAM_FIELD, buf, len);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
}

/* "Hello" in two chunks, finished, with usage 7 + 2. */
static void engine_answer_hello(const Parkway__InferenceRequest *req)
{
    engine_send(req, &(struct chunk_spec){.seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.seq = 1,
                                          .text = "lo",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                          .done = true,
                                          .prompt_tokens = 7,
                                          .completion_tokens = 2});
}

static bool cancel_flag_set(const char *request_id, int wait_ms)
{
    char key[PW_KEY_MAX];
    assert_int_equal(pw_key_cancel(key, sizeof key, request_id), PW_OK);
    uint64_t until = pw_clock_mono_ms() + (uint64_t)wait_ms;
    for (;;) {
        redisReply *r = rcmd("EXISTS %s", key);
        bool set = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
        freeReplyObject(r);
        if (set)
            return true;
        if (pw_clock_mono_ms() > until)
            return false;
        pw_test_sleep_ms(20);
    }
}

static const char CHAT_BODY[] = "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\","
                                "\"content\":\"hi\"}],\"max_tokens\":5,\"temperature\":0.5}";

/* ---- setup ------------------------------------------------------------------------------ */

static int group_setup(void **state)
{
    (void)state;
    pw_test_redis_require();
    if (access(ROUTER_BIN, X_OK) != 0) {
        fprintf(stderr, "skip: %s not built\n", ROUTER_BIN);
        exit(77);
    }
    snprintf(g_tmp, sizeof g_tmp, "/tmp/pw-router-gw-XXXXXX");
    if (!mkdtemp(g_tmp))
        return -1;
    if (pw_test_redis_start(&g_redis) != PW_OK)
        return -1;
    redis_connect();
    seed_functions();
    make_key(g_key, NULL, "acme", NULL, 0, 0, false);
    router_start(&g_router, NULL, 0);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    router_stop(&g_router);
    if (g_rc)
        redisFree(g_rc);
    g_rc = NULL;
    pw_test_redis_stop(&g_redis);
    if (getenv("PW_TEST_KEEP")) { /* keep the routers' logs for a look */
        fprintf(stderr, "router logs kept in %s\n", g_tmp);
        return 0;
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_tmp);
    if (system(cmd) != 0)
        return -1;
    return 0;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_healthz_and_request_id(void **state)
{
    (void)state;
    struct hresp r;
    char id[160];
    http_do(g_router.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "ok"));
    assert_true(resp_header(&r, "x-request-id", id, sizeof id));
    assert_true(strlen(id) > 0);
    resp_free(&r);

    /* A client's id comes back as sent, on successes and errors alike. */
    http_do(g_router.port, "GET", "/healthz", NULL, "X-Request-Id: client-id-42\r\n", NULL, &r);
    assert_true(resp_header(&r, "x-request-id", id, sizeof id));
    assert_string_equal(id, "client-id-42");
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/models", NULL, "x-request-id: abc.DEF_9\r\n", NULL, &r);
    assert_int_equal(r.status, 401);
    assert_true(resp_header(&r, "x-request-id", id, sizeof id));
    assert_string_equal(id, "abc.DEF_9");
    resp_free(&r);

    http_do(g_router.port, "GET", "/readyz", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

static void test_auth_errors(void **state)
{
    (void)state;
    struct hresp r;
    http_do(g_router.port, "POST", "/v1/chat/completions", NULL, NULL, CHAT_BODY, &r);
    assert_error(&r, 401, "invalid_request_error", NULL, NULL);
    resp_free(&r);

    /* Not a bearer credential at all. */
    http_do(g_router.port, "GET", "/v1/models", NULL, "Authorization: Basic Zm9vOmJhcg==\r\n", NULL,
            &r);
    assert_error(&r, 401, "invalid_request_error", "invalid_api_key", NULL);
    resp_free(&r);

    /* Well formed, but not a key Redis knows. */
    char unknown[PW_APIKEY_LEN + 1];
    assert_int_equal(pw_apikey_generate(unknown), PW_OK);
    http_do(g_router.port, "POST", "/v1/chat/completions", unknown, NULL, CHAT_BODY, &r);
    assert_error(&r, 401, "invalid_request_error", "invalid_api_key", NULL);
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/models", "not-a-parkway-key", NULL, NULL, &r);
    assert_error(&r, 401, "invalid_request_error", "invalid_api_key", NULL);
    resp_free(&r);

    /* A disabled key is refused like a bad one. */
    char disabled[PW_APIKEY_LEN + 1];
    make_key(disabled, NULL, "acme", NULL, 0, 0, true);
    http_do(g_router.port, "POST", "/v1/chat/completions", disabled, NULL, CHAT_BODY, &r);
    assert_error(&r, 401, "invalid_request_error", "invalid_api_key", NULL);
    resp_free(&r);
}

static void test_model_access(void **state)
{
    (void)state;
    struct hresp r;
    char only2[PW_APIKEY_LEN + 1];
    const char *fns[] = {FN2};
    make_key(only2, NULL, "acme", fns, 1, 0, false);
    http_do(g_router.port, "POST", "/v1/chat/completions", only2, NULL, CHAT_BODY, &r);
    assert_error(&r, 403, "invalid_request_error", "model_not_allowed", "model");
    resp_free(&r);

    /* The models list shows only what the key may use. */
    http_do(g_router.port, "GET", "/v1/models", only2, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_null(strstr(r.body, "\"" FN "\""));
    assert_non_null(strstr(r.body, "\"" FN2 "\""));
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/models/" FN, only2, NULL, NULL, &r);
    assert_error(&r, 404, "invalid_request_error", "model_not_found", "model");
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/models/" FN, g_key, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"id\":\"" FN "\""));
    resp_free(&r);

    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL,
            "{\"model\":\"nope\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}", &r);
    assert_error(&r, 404, "invalid_request_error", "model_not_found", "model");
    resp_free(&r);
}

static void test_routes_and_methods(void **state)
{
    (void)state;
    struct hresp r;
    http_do(g_router.port, "GET", "/v1/nothing-here", g_key, NULL, NULL, &r);
    assert_error(&r, 404, "invalid_request_error", "unknown_url", NULL);
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/chat/completions", g_key, NULL, NULL, &r);
    assert_error(&r, 405, "invalid_request_error", "method_not_allowed", NULL);
    resp_free(&r);
    http_do(g_router.port, "POST", "/v1/models", g_key, NULL, "{}", &r);
    assert_error(&r, 405, "invalid_request_error", "method_not_allowed", NULL);
    resp_free(&r);
    http_do(g_router.port, "POST", "/healthz", NULL, NULL, "{}", &r);
    assert_error(&r, 405, "invalid_request_error", "method_not_allowed", NULL);
    resp_free(&r);

    /* Regression: HEAD of a GET route was a 404. Its answer has a head and no body. */
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(hc_request(h, "HEAD", "/healthz", NULL, NULL, NULL, 0));
    assert_true(hc_read_head(h, &r));
    assert_int_equal(r.status, 200);
    assert_true(hc_request(h, "GET", "/healthz", NULL, NULL, NULL, 0));
    assert_true(hc_read(h, &r)); /* the next answer starts right after the HEAD's head */
    assert_int_equal(r.status, 200);
    resp_free(&r);
    hc_close(h);
}

static void test_bad_bodies(void **state)
{
    (void)state;
    struct hresp r;
    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL, "{\"model\": ", &r);
    assert_error(&r, 400, "invalid_request_error", NULL, NULL);
    resp_free(&r);

    /* Invalid UTF-8 inside a JSON string (a lone continuation byte). */
    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL,
            "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":\"a\x80z\"}]}", &r);
    assert_int_equal(r.status, 400);
    resp_free(&r);

    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL,
            "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
            "\"temperature\":\"hot\"}",
            &r);
    assert_error(&r, 400, "invalid_request_error", "*", "temperature");
    resp_free(&r);

    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL,
            "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
            "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]}",
            &r);
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "\"param\":\"tools\""));
    resp_free(&r);

    /* Nothing was queued for any of them. */
    assert_null(engine_take(FN, 1));
}

static void test_body_too_large(void **state)
{
    (void)state;
    /* Announce more than the limit and send only a little: the answer must come without
     * the router waiting for (or reading) the rest. */
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    char head[512];
    int n = snprintf(head, sizeof head,
                     "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     "%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"a\":",
                     g_key, 64 << 20);
    assert_true(hc_send(h, head, (size_t)n));
    struct hresp r;
    uint64_t t0 = pw_clock_mono_ms();
    assert_true(hc_read(h, &r));
    assert_true(pw_clock_mono_ms() - t0 < 5000);
    assert_error(&r, 413, "invalid_request_error", "request_too_large", NULL);
    resp_free(&r);
    hc_close(h);
}

static void test_non_stream_answer(void **state)
{
    (void)state;
    engine_drain(FN);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    int64_t before = pw_clock_wall_ms();
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, "x-request-id: ns-1\r\n",
                           CHAT_BODY, strlen(CHAT_BODY)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    /* What the router put in the request. */
    assert_string_equal(req->function, FN);
    assert_string_equal(req->tenant, "acme");
    assert_int_equal(strncmp(req->key_id, "key_", 4), 0);
    assert_int_equal(strlen(req->key_id), PW_APIKEY_ID_LEN);
    assert_int_equal(strncmp(req->reply_to, "pw:reply:{", 10), 0);
    assert_true(req->id[0] == 'r' && strlen(req->id) == 19);
    assert_int_equal(req->kind, PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT);
    assert_false(req->stream);
    assert_int_equal(req->n_messages, 1);
    assert_string_equal(req->messages[0]->content, "hi");
    assert_true(req->enqueued_unix_ms >= before);
    assert_true(req->deadline_unix_ms > req->enqueued_unix_ms);
    assert_non_null(req->sampling);
    assert_true(req->sampling->seed != 0);
    assert_false(
        pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_SEED));
    assert_true(
        pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS));
    assert_int_equal(req->sampling->max_tokens, 5);
    assert_true(
        pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE));
    assert_true(req->sampling->temperature > 0.49f && req->sampling->temperature < 0.51f);
    assert_false(
        pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_P));
    /* The request's key id is the public id, never the key. */
    assert_null(strstr(req->key_id, "pk-"));

    engine_answer_hello(req);
    pw_proto_free_request(req);
    struct hresp r;
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    char v[160];
    assert_true(resp_header(&r, "x-request-id", v, sizeof v));
    assert_string_equal(v, "ns-1");
    assert_true(resp_header(&r, "content-type", v, sizeof v));
    assert_non_null(strstr(v, "application/json"));
    json_t *j = json_loadb(r.body, r.body_len, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "chat.completion");
    assert_string_equal(json_string_value(json_object_get(j, "model")), FN);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_non_null(c0);
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(c0, "message"), "content")), "Hello");
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "stop");
    json_t *u = json_object_get(j, "usage");
    assert_int_equal(json_integer_value(json_object_get(u, "prompt_tokens")), 7);
    assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 2);
    assert_int_equal(json_integer_value(json_object_get(u, "total_tokens")), 9);
    json_decref(j);
    resp_free(&r);

    /* The connection stays usable (keep-alive). */
    assert_true(hc_request(h, "GET", "/v1/models", g_key, NULL, NULL, 0));
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    resp_free(&r);
    hc_close(h);
}

/* Splits an SSE body into its data payloads; returns how many, each NUL-terminated in ev. */
static size_t sse_events(char *body, char **ev, size_t cap)
{
    size_t n = 0;
    for (char *p = body; *p && n < cap;) {
        char *end = strstr(p, "\n\n");
        assert_non_null(end); /* every event is complete */
        *end = '\0';
        if (strncmp(p, "data: ", 6) == 0)
            ev[n++] = p + 6;
        else
            assert_true(p[0] == ':'); /* a comment (keep-alive) is the only other line */
        assert_null(strchr(p, '\n'));
        p = end + 2;
    }
    return n;
}

/* Concatenated delta.content of the chat chunks, checking each chunk's shape. */
static void sse_collect(char **ev, size_t n, char *text, size_t cap, const char **finish,
                        json_t **usage_chunk)
{
    text[0] = '\0';
    *finish = NULL;
    *usage_chunk = NULL;
    static char fin[32];
    for (size_t i = 0; i < n; i++) {
        if (strcmp(ev[i], "[DONE]") == 0) {
            assert_int_equal(i, n - 1);
            continue;
        }
        json_t *j = json_loads(ev[i], 0, NULL);
        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(j, "object")),
                            "chat.completion.chunk");
        json_t *choices = json_object_get(j, "choices");
        if (json_array_size(choices) == 0) {
            *usage_chunk = j;
            continue;
        }
        json_t *c0 = json_array_get(choices, 0);
        const char *d = json_string_value(json_object_get(json_object_get(c0, "delta"), "content"));
        if (d)
            strncat(text, d, cap - strlen(text) - 1);
        const char *f = json_string_value(json_object_get(c0, "finish_reason"));
        if (f) {
            snprintf(fin, sizeof fin, "%s", f);
            *finish = fin;
        }
        json_decref(j);
    }
}

static void test_stream_framing_with_usage(void **state)
{
    (void)state;
    static const char body[] = "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":"
                               "\"hi\"}],\"stream\":true,\"stream_options\":{\"include_usage\":"
                               "true}}";
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    assert_true(req->stream);
    assert_true(req->include_usage);

    /* The head and the first delta arrive before the engine has finished. */
    struct hresp r;
    assert_true(hc_read_head(h, &r));
    assert_int_equal(r.status, 200);
    assert_true(r.chunked);
    char ct[64];
    assert_true(resp_header(&r, "content-type", ct, sizeof ct));
    assert_string_equal(ct, "text/event-stream");
    r.body = calloc(1, 1);
    engine_send(req, &(struct chunk_spec){.seq = 0, .text = "Hel"});
    while (!strstr(r.body, "Hel"))
        assert_true(hc_read_chunk(h, &r) > 0);
    engine_send(req, &(struct chunk_spec){.seq = 1,
                                          .text = "lo",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                          .done = true,
                                          .prompt_tokens = 7,
                                          .completion_tokens = 2});
    long n;
    while ((n = hc_read_chunk(h, &r)) > 0)
        ;
    assert_int_equal(n, 0);
    pw_proto_free_request(req);

    char *ev[64], text[256];
    size_t ne = sse_events(r.body, ev, 64);
    assert_true(ne >= 4);
    assert_string_equal(ev[ne - 1], "[DONE]");
    const char *finish;
    json_t *uc;
    sse_collect(ev, ne, text, sizeof text, &finish, &uc);
    assert_string_equal(text, "Hello");
    assert_non_null(finish);
    assert_string_equal(finish, "stop");
    assert_non_null(uc);
    json_t *u = json_object_get(uc, "usage");
    assert_int_equal(json_integer_value(json_object_get(u, "prompt_tokens")), 7);
    assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 2);
    assert_int_equal(json_integer_value(json_object_get(u, "total_tokens")), 9);
    json_decref(uc);
    resp_free(&r);
    hc_close(h);
}

static void test_retried_attempt_gives_one_answer(void **state)
{
    (void)state;
    static const char body[] = "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":"
                               "\"hi\"}],\"stream\":true}";
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    /* attempt 0 dies after "Hello"; attempt 1 repeats it and goes on; a duplicate and a late
     * attempt-0 chunk are mixed in. */
    engine_send(req, &(struct chunk_spec){.attempt = 0, .seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.attempt = 0, .seq = 1, .text = "lo"});
    engine_send(req, &(struct chunk_spec){.attempt = 0, .seq = 1, .text = "lo"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 1, .text = "lo"});
    engine_send(req, &(struct chunk_spec){.attempt = 0, .seq = 2, .text = "XX"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 2, .text = " world"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 2, .text = " world"});
    engine_send(req, &(struct chunk_spec){.attempt = 1,
                                          .seq = 3,
                                          .text = "!",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH,
                                          .done = true,
                                          .prompt_tokens = 3,
                                          .completion_tokens = 4});
    pw_proto_free_request(req);
    struct hresp r;
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    char *ev[64], text[256];
    size_t ne = sse_events(r.body, ev, 64);
    const char *finish;
    json_t *uc;
    sse_collect(ev, ne, text, sizeof text, &finish, &uc);
    assert_string_equal(text, "Hello world!");
    assert_string_equal(finish, "length");
    assert_null(uc); /* no include_usage: no usage chunk */
    assert_string_equal(ev[ne - 1], "[DONE]");
    resp_free(&r);

    /* The same through the non-streaming accumulator. */
    assert_true(
        hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
    req = engine_take(FN, 5000);
    assert_non_null(req);
    engine_send(req, &(struct chunk_spec){.attempt = 0, .seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.attempt = 1, .seq = 0, .text = "Hel"});
    engine_send(req, &(struct chunk_spec){.attempt = 1,
                                          .seq = 1,
                                          .text = "lo",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                          .done = true,
                                          .prompt_tokens = 7,
                                          .completion_tokens = 2});
    pw_proto_free_request(req);
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"content\":\"Hello\""));
    resp_free(&r);
    hc_close(h);
}

static void test_client_disconnect_sets_cancel(void **state)
{
    (void)state;
    static const char body[] = "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":"
                               "\"hi\"}],\"stream\":true}";
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    engine_send(req, &(struct chunk_spec){.seq = 0, .text = "Hel"});
    struct hresp r;
    assert_true(hc_read_head(h, &r));
    r.body = calloc(1, 1);
    while (!strstr(r.body, "Hel"))
        assert_true(hc_read_chunk(h, &r) > 0);
    resp_free(&r);
    assert_false(cancel_flag_set(req->id, 0));
    hc_close(h); /* the client leaves mid-stream */
    assert_true(cancel_flag_set(req->id, 3000));
    /* Late chunks for the gone call are dropped without harm. */
    engine_send(req, &(struct chunk_spec){.seq = 1,
                                          .text = "lo",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                          .done = true});
    pw_proto_free_request(req);
    pw_test_sleep_ms(100);
    http_do(g_router.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    resp_free(&r);
}

/* Sleeps past the next minute boundary when fewer than min_left seconds are left in this
 * one, so a per-minute window cannot roll over during a test. */
static void avoid_minute_edge(int min_left)
{
    int64_t s = (pw_clock_wall_ms() / 1000) % 60;
    if (60 - s < min_left)
        pw_test_sleep_ms((int)(60 - s) * 1000 + 200);
}

static void test_rate_limit_429(void **state)
{
    (void)state;
    engine_drain(FN);
    char key[PW_APIKEY_LEN + 1];
    make_key(key, NULL, "acme", NULL, 0, 3, false);
    avoid_minute_edge(15);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    struct hresp r;
    for (int i = 0; i < 3; i++) {
        assert_true(
            hc_request(h, "POST", "/v1/chat/completions", key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
        Parkway__InferenceRequest *req = engine_take(FN, 5000);
        assert_non_null(req);
        engine_answer_hello(req);
        pw_proto_free_request(req);
        assert_true(hc_read(h, &r));
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    /* The limit is shared through Redis: a new connection (maybe another thread) sees it. */
    hc_close(h);
    http_do(g_router.port, "POST", "/v1/chat/completions", key, NULL, CHAT_BODY, &r);
    assert_error(&r, 429, "requests", "rate_limit_exceeded", NULL);
    char ra[16];
    assert_true(resp_header(&r, "retry-after", ra, sizeof ra));
    int secs = atoi(ra);
    assert_true(secs >= 1 && secs <= 60);
    resp_free(&r);
    assert_null(engine_take(FN, 1));

    /* The counter lives in Redis with an expiry, so it never piles up. */
    redisReply *k = rcmd("KEYS pw:rl:*");
    assert_non_null(k);
    assert_true(k->elements >= 1);
    for (size_t i = 0; i < k->elements; i++) {
        redisReply *t = rcmd("TTL %s", k->element[i]->str);
        assert_true(t->integer > 0 && t->integer <= 120);
        freeReplyObject(t);
    }
    freeReplyObject(k);
}

static void test_revoke_by_publish_is_immediate(void **state)
{
    (void)state;
    char key[PW_APIKEY_LEN + 1], hex[PW_APIKEY_HASH_HEX_LEN + 1];
    make_key(key, hex, "acme", NULL, 0, 0, false);
    /* One connection: one worker thread, one cache. */
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    struct hresp r;
    assert_true(hc_request(h, "GET", "/v1/models", key, NULL, NULL, 0));
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    resp_free(&r);

    /* Disabled in Redis without telling anyone: the cached entry still serves. */
    disable_key(hex);
    assert_true(hc_request(h, "GET", "/v1/models", key, NULL, NULL, 0));
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    resp_free(&r);

    /* The revoke message drops the cache entry at once, well inside the cache TTL. */
    redisReply *p = rcmd("PUBLISH pw:keys:revoked %s", hex);
    assert_non_null(p);
    assert_true(p->integer >= 2); /* one subscriber per worker thread */
    freeReplyObject(p);
    int status = 0;
    for (int i = 0; i < 20 && status != 401; i++) {
        assert_true(hc_request(h, "GET", "/v1/models", key, NULL, NULL, 0));
        assert_true(hc_read(h, &r));
        status = r.status;
        resp_free(&r);
        if (status != 401)
            pw_test_sleep_ms(10); /* the message and the request race on the loop, briefly */
    }
    assert_int_equal(status, 401);
    hc_close(h);
}

/* `parkway keys` end to end, when the CLI has the command. */
static void test_cli_keys(void **state)
{
    (void)state;
    char cmd[1024], key[128] = "";
    snprintf(cmd, sizeof cmd, "%s keys --help >/dev/null 2>&1", PARKWAY_BIN);
    if (system(cmd) != 0) {
        skip(); /* the dispatcher does not have `keys` yet */
        return;
    }
    snprintf(cmd, sizeof cmd,
             "%s keys create --redis %s --tenant cli --name ci --functions " FN2
             " --rpm 100 2>/dev/null",
             PARKWAY_BIN, g_redis.url);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    assert_non_null(fgets(key, sizeof key, f));
    assert_int_equal(pclose(f), 0);
    key[strcspn(key, "\n")] = '\0';
    assert_true(pw_apikey_format_ok(key, strlen(key)));

    /* Only the hash is stored. */
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_HEX_LEN + 1], id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_hash(key, strlen(key), hash);
    pw_hex_encode(hash, sizeof hash, hex);
    pw_apikey_id(hash, id);
    redisReply *x = rcmd("HEXISTS %s %s", PW_KEY_KEYS, hex);
    assert_int_equal(x->integer, 1);
    freeReplyObject(x);
    x = rcmd("HEXISTS %s %s", PW_KEY_KEYS, key);
    assert_int_equal(x->integer, 0);
    freeReplyObject(x);

    struct hresp r;
    http_do(g_router.port, "GET", "/v1/models", key, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, FN2));
    assert_null(strstr(r.body, "\"" FN "\""));
    resp_free(&r);

    /* list shows the id and never the key. */
    snprintf(cmd, sizeof cmd, "%s keys list --redis %s", PARKWAY_BIN, g_redis.url);
    f = popen(cmd, "r");
    char out[16384] = "";
    size_t n = fread(out, 1, sizeof out - 1, f);
    out[n] = '\0';
    assert_int_equal(pclose(f), 0);
    assert_non_null(strstr(out, id));
    assert_null(strstr(out, key));
    assert_null(strstr(out, "pk-"));

    snprintf(cmd, sizeof cmd, "%s keys revoke %s --redis %s >/dev/null 2>&1", PARKWAY_BIN, id,
             g_redis.url);
    assert_int_equal(system(cmd), 0);
    int status = 0;
    for (int i = 0; i < 20 && status != 401; i++) {
        http_do(g_router.port, "GET", "/v1/models", key, NULL, NULL, &r);
        status = r.status;
        resp_free(&r);
        if (status != 401)
            pw_test_sleep_ms(10);
    }
    assert_int_equal(status, 401);
    snprintf(cmd, sizeof cmd, "%s keys revoke key_00000000 --redis %s >/dev/null 2>&1", PARKWAY_BIN,
             g_redis.url);
    int rc = system(cmd);
    assert_true(WIFEXITED(rc) && WEXITSTATUS(rc) == 2);
}

static void test_metrics_need_admin_key(void **state)
{
    (void)state;
    struct hresp r;
    http_do(g_router.port, "GET", "/v1/models/made-up-name-123", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 401);
    resp_free(&r);
    http_do(g_router.port, "GET", "/v1/models/made-up-name-456", g_key, NULL, NULL, &r);
    assert_int_equal(r.status, 404);
    resp_free(&r);
    http_do(g_router.port, "GET", "/metrics", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 401);
    resp_free(&r);
    http_do(g_router.port, "GET", "/metrics", g_key, NULL, NULL, &r);
    assert_int_equal(r.status, 401);
    resp_free(&r);
    http_do(g_router.port, "GET", "/metrics", ADMIN_KEY, NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "parkway_router_requests_total{route=\"/v1/chat/completions\","
                                   "status=\"200\",function=\"" FN "\"}"));
    assert_non_null(strstr(r.body, "parkway_router_requests_total{route=\"/v1/chat/completions\","
                                   "status=\"401\""));
    assert_non_null(strstr(r.body, "parkway_router_requests_total{route=\"/v1/chat/completions\","
                                   "status=\"429\""));
    assert_non_null(strstr(r.body, "parkway_router_time_to_first_token_seconds"));
    assert_non_null(strstr(r.body, "parkway_router_in_flight"));
    assert_null(strstr(r.body, "pk-"));
    /* Names from the URL that are no function never become label values. */
    assert_null(strstr(r.body, "made-up-name"));
    resp_free(&r);
}

static void test_deadline_gives_504_and_cancel(void **state)
{
    (void)state;
    engine_drain(FN);
    struct router_proc short_rt = {0};
    const char *extra[] = {"--request-timeout-ms", "300"};
    router_start(&short_rt, extra, 2);
    struct hconn *h = hc_open(short_rt.port);
    assert_non_null(h);
    uint64_t t0 = pw_clock_mono_ms();
    assert_true(
        hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    int64_t d = req->deadline_unix_ms - req->enqueued_unix_ms;
    assert_true(d >= 250 && d <= 350);
    /* The engine never answers. */
    struct hresp r;
    assert_true(hc_read(h, &r));
    uint64_t took = pw_clock_mono_ms() - t0;
    assert_error(&r, 504, "server_error", "deadline_exceeded", NULL);
    assert_true(took >= 250 && took < 1000);
    resp_free(&r);
    assert_true(cancel_flag_set(req->id, 2000));
    /* A chunk after the deadline finds nothing to write to. */
    engine_answer_hello(req);
    pw_proto_free_request(req);
    hc_close(h);
    router_stop(&short_rt);
}

/* Regression: the EXPIRE used to go out before the INCR, so the counter of a key's only
 * request in a minute never expired. */
static void test_rate_counter_expires_after_one_request(void **state)
{
    (void)state;
    engine_drain(FN);
    char key[PW_APIKEY_LEN + 1];
    make_key(key, NULL, "acme", NULL, 0, 1000, false);
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_hash(key, strlen(key), hash);
    pw_apikey_id(hash, id);
    avoid_minute_edge(10);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(
        hc_request(h, "POST", "/v1/chat/completions", key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    engine_answer_hello(req);
    pw_proto_free_request(req);
    struct hresp r;
    assert_true(hc_read(h, &r));
    assert_int_equal(r.status, 200);
    resp_free(&r);
    hc_close(h);
    char rl[128];
    snprintf(rl, sizeof rl, "pw:rl:{%s}:%lld", id, (long long)(pw_clock_wall_ms() / 60000));
    redisReply *t = rcmd("TTL %s", rl);
    assert_non_null(t);
    assert_true(t->integer > 0 && t->integer <= 120);
    freeReplyObject(t);
}

static void test_deadline_header(void **state)
{
    (void)state;
    engine_drain(FN);
    struct hresp r;
    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, "x-parkway-timeout-ms: soon\r\n",
            CHAT_BODY, &r);
    assert_error(&r, 400, "invalid_request_error", "invalid_value", "x-parkway-timeout-ms");
    resp_free(&r);

    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    uint64_t t0 = pw_clock_mono_ms();
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key,
                           "x-parkway-timeout-ms: 200\r\n", CHAT_BODY, strlen(CHAT_BODY)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    int64_t d = req->deadline_unix_ms - req->enqueued_unix_ms;
    assert_true(d >= 150 && d <= 250);
    assert_true(hc_read(h, &r));
    uint64_t took = pw_clock_mono_ms() - t0;
    assert_error(&r, 504, "server_error", "deadline_exceeded", NULL);
    assert_true(took >= 150 && took < 900); /* the call's own timer, not the 1 s tick */
    resp_free(&r);
    assert_true(cancel_flag_set(req->id, 2000));
    pw_proto_free_request(req);
    hc_close(h);
}

/* ---- bounded queue, cold functions, tokens per minute --------------------------------- */

/* Registers fn with a spec and its engines' group; a router sees it at its next snapshot
 * (at start, then every 2 s). */
static void register_fn(const char *fn, const char *spec_json)
{
    freeReplyObject(rcmd("HSET %s %s %s", PW_KEY_FUNCTIONS, fn, spec_json));
    char q[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(q, sizeof q, fn), PW_OK);
    freeReplyObject(rcmd("XGROUP CREATE %s %s 0 MKSTREAM", q, PW_GROUP_ENGINES));
}

/* Waits until every worker thread of the router at port knows fn. */
static void wait_fn_visible(int port, const char *fn)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/models/%s", fn);
    int ok = 0;
    for (int i = 0; i < 400 && ok < 8; i++) {
        struct hresp r;
        http_do(port, "GET", path, g_key, NULL, NULL, &r);
        ok = r.status == 200 ? ok + 1 : 0; /* new connections land on either thread */
        resp_free(&r);
        if (ok < 8)
            pw_test_sleep_ms(10);
    }
    assert_int_equal(ok, 8);
}

static const char *chat_for(const char *fn, bool stream)
{
    static char body[512];
    snprintf(body, sizeof body,
             "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
             "\"max_tokens\":5%s}",
             fn, stream ? ",\"stream\":true" : "");
    return body;
}

static long long stream_len(const char *fn)
{
    char q[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(q, sizeof q, fn), PW_OK);
    redisReply *r = rcmd("XLEN %s", q);
    assert_non_null(r);
    long long n = r->integer;
    freeReplyObject(r);
    return n;
}

/* A connection subscribed to pw:wake. */
static redisContext *wake_sub_open(void)
{
    struct timeval tv = {10, 0};
    redisContext *s = redisConnectWithTimeout("127.0.0.1", g_redis.port, tv);
    assert_non_null(s);
    assert_int_equal(s->err, 0);
    redisSetTimeout(s, tv);
    redisReply *r = redisCommand(s, "SUBSCRIBE %s", PW_KEY_WAKE);
    assert_non_null(r);
    freeReplyObject(r);
    return s;
}

/* The payload of the next pw:wake message, into out. */
static void wake_next(redisContext *s, char *out, size_t cap)
{
    redisReply *r = NULL;
    assert_int_equal(redisGetReply(s, (void **)&r), REDIS_OK);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 3);
    snprintf(out, cap, "%s", r->element[2]->str);
    freeReplyObject(r);
}

/* Publishes a marker and reads up to it; returns how many messages for fn came before. */
static int wakes_until_marker(redisContext *s, const char *fn)
{
    static int seq;
    char marker[32], got[160];
    snprintf(marker, sizeof marker, "marker-%d", ++seq);
    freeReplyObject(rcmd("PUBLISH %s %s", PW_KEY_WAKE, marker));
    int n = 0;
    for (;;) {
        wake_next(s, got, sizeof got);
        if (strcmp(got, marker) == 0)
            return n;
        n += strcmp(got, fn) == 0;
    }
}

/* An engine's heartbeat entry in pw:{fn}:workers, as engine_worker writes it. */
static void engine_heartbeat(const char *fn, const char *worker_id, Parkway__WorkerState st)
{
    Parkway__WorkerStatus ws = PARKWAY__WORKER_STATUS__INIT;
    ws.worker_id = (char *)worker_id;
    ws.function = (char *)fn;
    ws.state = st;
    ws.slots_total = 1;
    ws.last_heartbeat_unix_ms = pw_clock_wall_ms();
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(pw_proto_pack_worker_alloc(&ws, &buf, &len, NULL), PW_OK);
    char key[PW_KEY_MAX];
    assert_int_equal(pw_key_workers(key, sizeof key, fn), PW_OK);
    freeReplyObject(rcmd("HSET %s %s %b", key, worker_id, buf, len));
    free(buf);
}

static void test_queue_full_gives_503(void **state)
{
    (void)state;
    register_fn("fnq", "{}");
    struct router_proc rp = {0};
    const char *extra[] = {"--max-queue", "2"};
    router_start(&rp, extra, 2);
    wait_fn_visible(rp.port, "fnq");
    const char *body = chat_for("fnq", false);
    struct hconn *a = hc_open(rp.port), *b = hc_open(rp.port), *c = NULL;
    /* One after the other, so the queue's order is known (a, then b). */
    struct hconn *ab[] = {a, b};
    for (int k = 0; k < 2; k++) {
        assert_true(
            hc_request(ab[k], "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
        for (int i = 0; i < 500 && stream_len("fnq") < k + 1; i++)
            pw_test_sleep_ms(10);
        assert_int_equal(stream_len("fnq"), k + 1);
    }

    /* Two waiting: the third is refused, with a retry hint, and nothing is added. */
    struct hresp r;
    char ra[16];
    http_do(rp.port, "POST", "/v1/chat/completions", g_key, NULL, body, &r);
    assert_error(&r, 503, "server_error", "queue_full", NULL);
    assert_true(resp_header(&r, "retry-after", ra, sizeof ra));
    assert_true(atoi(ra) >= 1);
    resp_free(&r);
    /* A stream is refused the same way, before any SSE head. */
    http_do(rp.port, "POST", "/v1/chat/completions", g_key, NULL, chat_for("fnq", true), &r);
    assert_error(&r, 503, "server_error", "queue_full", NULL);
    resp_free(&r);
    assert_int_equal(stream_len("fnq"), 2);

    /* Nothing accepted was dropped; an acknowledged entry stops counting (it is trimmed). */
    Parkway__InferenceRequest *req = engine_take("fnq", 2000);
    assert_non_null(req);
    engine_answer_hello(req);
    pw_proto_free_request(req);
    assert_true(hc_read(a, &r));
    assert_int_equal(r.status, 200);
    resp_free(&r);
    c = hc_open(rp.port);
    body = chat_for("fnq", false);
    assert_true(hc_request(c, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    struct hconn *order[] = {b, c};
    for (int i = 0; i < 2; i++) {
        req = engine_take("fnq", 2000);
        assert_non_null(req);
        engine_answer_hello(req);
        pw_proto_free_request(req);
        assert_true(hc_read(order[i], &r));
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    hc_close(a);
    hc_close(b);
    hc_close(c);
    router_stop(&rp);
}

static void test_cold_function_waits_with_keepalives(void **state)
{
    (void)state;
    register_fn("fncold", "{\"max_queue_wait_ms\":20000}");
    wait_fn_visible(g_router.port, "fncold");
    redisContext *sub = wake_sub_open();
    const char *body = chat_for("fncold", true);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    uint64_t t0 = pw_clock_mono_ms();
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    /* No engine is ready: the scaler is told. */
    char got[160];
    wake_next(sub, got, sizeof got);
    assert_string_equal(got, "fncold");
    struct hresp r;
    assert_true(hc_read_head(h, &r));
    assert_int_equal(r.status, 200);
    r.body = calloc(1, 1);
    /* While it waits, comments keep proxies and clients from timing out. */
    while (!strstr(r.body, ": keep-alive"))
        assert_true(hc_read_chunk(h, &r) > 0);
    uint64_t waited = pw_clock_mono_ms() - t0;
    assert_true(waited >= 2500 && waited < 6000);
    assert_null(strstr(r.body, "data:"));
    /* The engine comes up late and serves the request from the queue. */
    Parkway__InferenceRequest *req = engine_take("fncold", 2000);
    assert_non_null(req);
    engine_answer_hello(req);
    pw_proto_free_request(req);
    long n;
    while ((n = hc_read_chunk(h, &r)) > 0)
        ;
    assert_int_equal(n, 0);
    char *ev[64], text[256];
    size_t ne = sse_events(r.body, ev, 64);
    const char *finish;
    json_t *uc;
    sse_collect(ev, ne, text, sizeof text, &finish, &uc);
    assert_string_equal(text, "Hello");
    assert_string_equal(ev[ne - 1], "[DONE]");
    resp_free(&r);
    hc_close(h);
    redisFree(sub);
}

static void test_wake_only_without_ready_engine(void **state)
{
    (void)state;
    register_fn("fnwarm", "{}");
    wait_fn_visible(g_router.port, "fnwarm");
    engine_heartbeat("fnwarm", "w1", PARKWAY__WORKER_STATE__WORKER_STATE_READY);
    redisContext *sub = wake_sub_open();
    /* One connection: one worker thread, one view of the engines. */
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    const char *body = chat_for("fnwarm", false);
    struct hresp r;
    for (int round = 0; round < 3; round++) {
        if (round == 2) {
            /* The engine is gone: the next look (every tick) sees none ready. */
            char key[PW_KEY_MAX];
            pw_key_workers(key, sizeof key, "fnwarm");
            freeReplyObject(rcmd("DEL %s", key));
            pw_test_sleep_ms(1500);
        } else {
            pw_test_sleep_ms(700); /* past the first look and the wake interval */
            engine_heartbeat("fnwarm", "w1", PARKWAY__WORKER_STATE__WORKER_STATE_READY);
        }
        int before = wakes_until_marker(sub, "fnwarm");
        (void)before; /* round 0 may wake: the router had not looked yet */
        assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
        Parkway__InferenceRequest *req = engine_take("fnwarm", 2000);
        assert_non_null(req);
        engine_answer_hello(req);
        pw_proto_free_request(req);
        assert_true(hc_read(h, &r));
        assert_int_equal(r.status, 200);
        resp_free(&r);
        int wakes = wakes_until_marker(sub, "fnwarm");
        if (round == 1)
            assert_int_equal(wakes, 0); /* a ready engine: no wake */
        if (round == 2)
            assert_int_equal(wakes, 1);
    }
    hc_close(h);
    redisFree(sub);
}

static void test_queue_wait_exceeded(void **state)
{
    (void)state;
    register_fn("fnwait", "{\"max_queue_wait_ms\":500}");
    wait_fn_visible(g_router.port, "fnwait");
    engine_drain("fnwait");
    struct hresp r;
    char ra[16];
    uint64_t t0 = pw_clock_mono_ms();
    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL, chat_for("fnwait", false),
            &r);
    uint64_t took = pw_clock_mono_ms() - t0;
    assert_error(&r, 503, "server_error", "queue_wait_exceeded", NULL);
    assert_true(resp_header(&r, "retry-after", ra, sizeof ra));
    assert_true(took >= 450 && took < 1500);
    resp_free(&r);
    /* It stays queued, flagged so an engine that takes it drops it. */
    Parkway__InferenceRequest *req = engine_take("fnwait", 1000);
    assert_non_null(req);
    assert_true(cancel_flag_set(req->id, 2000));
    pw_proto_free_request(req);

    /* A stream has its head already: the error is its last event, with no [DONE]. */
    const char *body = chat_for("fnwait", true);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    t0 = pw_clock_mono_ms();
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    assert_true(hc_read(h, &r));
    took = pw_clock_mono_ms() - t0;
    assert_int_equal(r.status, 200);
    assert_true(took >= 450 && took < 1500);
    assert_non_null(strstr(r.body, "data: {\"error\""));
    assert_non_null(strstr(r.body, "queue_wait_exceeded"));
    assert_null(strstr(r.body, "[DONE]"));
    resp_free(&r);
    hc_close(h);
    req = engine_take("fnwait", 1000);
    assert_non_null(req);
    assert_true(cancel_flag_set(req->id, 2000));
    pw_proto_free_request(req);
}

/* The queue write names its script by SHA-1: a Redis that lost its script cache gets the
 * text again, and the request goes through. */
static void test_script_cache_flush_is_survived(void **state)
{
    (void)state;
    engine_drain(FN);
    freeReplyObject(rcmd("SCRIPT FLUSH"));
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    struct hresp r;
    for (int i = 0; i < 2; i++) {
        assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY,
                               strlen(CHAT_BODY)));
        Parkway__InferenceRequest *req = engine_take(FN, 5000);
        assert_non_null(req);
        engine_answer_hello(req);
        pw_proto_free_request(req);
        assert_true(hc_read(h, &r));
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    hc_close(h);
}

static void test_tokens_per_minute_429(void **state)
{
    (void)state;
    engine_drain(FN);
    char key[PW_APIKEY_LEN + 1];
    make_key_limits(key, NULL, "acme", NULL, 0, 0, 10, false);
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_hash(key, strlen(key), hash);
    pw_apikey_id(hash, id);
    avoid_minute_edge(15);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    struct hresp r;
    /* 9 tokens each (7 prompt + 2 completion): the second call starts under the limit of 10
     * and ends over it. */
    for (int i = 0; i < 2; i++) {
        assert_true(
            hc_request(h, "POST", "/v1/chat/completions", key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
        Parkway__InferenceRequest *req = engine_take(FN, 5000);
        assert_non_null(req);
        engine_answer_hello(req);
        pw_proto_free_request(req);
        assert_true(hc_read(h, &r));
        assert_int_equal(r.status, 200);
        resp_free(&r);
    }
    assert_true(
        hc_request(h, "POST", "/v1/chat/completions", key, NULL, CHAT_BODY, strlen(CHAT_BODY)));
    assert_true(hc_read(h, &r));
    assert_error(&r, 429, "tokens", "rate_limit_exceeded", NULL);
    char ra[16];
    assert_true(resp_header(&r, "retry-after", ra, sizeof ra));
    assert_true(atoi(ra) >= 1 && atoi(ra) <= 60);
    resp_free(&r);
    assert_null(engine_take(FN, 1));
    hc_close(h);
    char tk[128];
    snprintf(tk, sizeof tk, "pw:tpm:{%s}:%lld", id, (long long)(pw_clock_wall_ms() / 60000));
    redisReply *t = rcmd("GET %s", tk);
    assert_non_null(t);
    assert_int_equal(t->type, REDIS_REPLY_STRING);
    assert_int_equal(atoi(t->str), 18);
    freeReplyObject(t);
    t = rcmd("TTL %s", tk);
    assert_true(t->integer > 0 && t->integer <= 120);
    freeReplyObject(t);
}

/* Regression: a start-up failure after the workers existed joined a reply thread that was
 * never started. */
static void test_bad_redis_url_exits_2(void **state)
{
    (void)state;
    char port[16], cmd[512];
    snprintf(port, sizeof port, "%d", pw_test_free_port());
    snprintf(cmd, sizeof cmd, "%s --redis bogus://nowhere --port %s --threads 2 2>/dev/null",
             ROUTER_BIN, port);
    int rc = system(cmd);
    assert_true(WIFEXITED(rc));
    assert_int_equal(WEXITSTATUS(rc), 2);
}

/* Every worker thread reads its own reply stream: many calls over many connections (spread
 * over the router's 2 threads by SO_REUSEPORT) are all answered, each with its own text, in
 * an order unrelated to the one they came in. */
static void test_replies_per_worker(void **state)
{
    (void)state;
    enum { N = 24 };
    engine_drain(FN);
    struct hconn *h[N];
    for (int i = 0; i < N; i++) {
        h[i] = hc_open(g_router.port);
        assert_non_null(h[i]);
        assert_true(hc_request(h[i], "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY,
                               strlen(CHAT_BODY)));
    }
    Parkway__InferenceRequest *req[N];
    bool worker_seen[2] = {false, false};
    char prefix[64];
    snprintf(prefix, sizeof prefix, "pw:reply:{test-%d}:", g_router.port);
    for (int i = 0; i < N; i++) {
        req[i] = engine_take(FN, 5000);
        assert_non_null(req[i]);
        /* reply_to names the worker that queued the call: the one in the call's id. */
        unsigned widx = 0;
        assert_int_equal(sscanf(req[i]->id + 1, "%2x", &widx), 1);
        assert_true(widx < 2);
        worker_seen[widx] = true;
        char want[96];
        snprintf(want, sizeof want, "%s%u", prefix, widx);
        assert_string_equal(req[i]->reply_to, want);
    }
    /* 24 connections all on one thread: 2^-23, or a broken spread. */
    assert_true(worker_seen[0] && worker_seen[1]);
    /* Answer newest first, each with its own id as the text. */
    for (int i = N - 1; i >= 0; i--)
        engine_send(req[i],
                    &(struct chunk_spec){.seq = 0,
                                         .text = req[i]->id,
                                         .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                         .done = true,
                                         .prompt_tokens = 1,
                                         .completion_tokens = 1});
    for (int i = 0; i < N; i++) {
        struct hresp r;
        assert_true(hc_read(h[i], &r));
        assert_int_equal(r.status, 200);
        json_t *j = json_loadb(r.body, r.body_len, 0, NULL);
        assert_non_null(j);
        const char *id = json_string_value(json_object_get(j, "id"));
        assert_non_null(id);
        assert_int_equal(strncmp(id, "chatcmpl-", 9), 0);
        json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
        const char *text =
            json_string_value(json_object_get(json_object_get(c0, "message"), "content"));
        assert_non_null(text);
        assert_string_equal(text, id + 9); /* its own answer, not a neighbour's */
        json_decref(j);
        resp_free(&r);
        hc_close(h[i]);
    }
    for (int i = 0; i < N; i++)
        pw_proto_free_request(req[i]);
}

/* Redis restarts (empty: no persistence) while a streaming call waits between two chunks:
 * the worker's reply reader reconnects and reads on from the last id it had, so the rest of
 * the answer arrives, a chunk sent again after the restart is dropped as a duplicate, and
 * the call ends normally. */
static void test_redis_restart_while_call_waits(void **state)
{
    (void)state;
    static const char body[] = "{\"model\":\"" FN "\",\"messages\":[{\"role\":\"user\",\"content\":"
                               "\"hi\"}],\"stream\":true}";
    engine_drain(FN);
    struct hconn *h = hc_open(g_router.port);
    assert_non_null(h);
    assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, body, strlen(body)));
    Parkway__InferenceRequest *req = engine_take(FN, 5000);
    assert_non_null(req);
    struct hresp r;
    assert_true(hc_read_head(h, &r));
    assert_int_equal(r.status, 200);
    r.body = calloc(1, 1);
    engine_send(req, &(struct chunk_spec){.seq = 0, .text = "Hel"});
    while (!strstr(r.body, "Hel"))
        assert_true(hc_read_chunk(h, &r) > 0);

    pw_test_redis_kill(&g_redis);
    redisFree(g_rc);
    g_rc = NULL;
    pw_test_sleep_ms(300); /* the router sees the connections drop */
    assert_int_equal(pw_test_redis_resume(&g_redis), PW_OK);
    redis_connect();
    seed_functions(); /* no persistence: the restarted server is empty */
    make_key(g_key, NULL, "acme", NULL, 0, 0, false);

    engine_send(req, &(struct chunk_spec){.seq = 0, .text = "Hel"}); /* a duplicate */
    engine_send(req, &(struct chunk_spec){.seq = 1,
                                          .text = "lo",
                                          .finish = PARKWAY__FINISH_REASON__FINISH_REASON_STOP,
                                          .done = true,
                                          .prompt_tokens = 7,
                                          .completion_tokens = 2});
    pw_proto_free_request(req);
    long n;
    while ((n = hc_read_chunk(h, &r)) > 0) /* the reader's backoff is at most 5 s */
        ;
    assert_int_equal(n, 0);
    char *ev[64], text[256];
    size_t ne = sse_events(r.body, ev, 64);
    const char *finish;
    json_t *uc;
    sse_collect(ev, ne, text, sizeof text, &finish, &uc);
    assert_string_equal(text, "Hello");
    assert_non_null(finish);
    assert_string_equal(finish, "stop");
    assert_string_equal(ev[ne - 1], "[DONE]");
    resp_free(&r);
    hc_close(h);
}

static void test_redis_down_then_back(void **state)
{
    (void)state;
    struct hresp r;
    pw_test_redis_kill(&g_redis);
    redisFree(g_rc);
    g_rc = NULL;
    /* Readiness follows the connection; requests get 503, never a hang. */
    int status = 0;
    for (int i = 0; i < 100 && status != 503; i++) {
        http_do(g_router.port, "GET", "/readyz", NULL, NULL, NULL, &r);
        status = r.status;
        resp_free(&r);
        if (status != 503)
            pw_test_sleep_ms(20);
    }
    assert_int_equal(status, 503);
    http_do(g_router.port, "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY, &r);
    assert_error(&r, 503, "server_error", "service_unavailable", NULL);
    resp_free(&r);
    http_do(g_router.port, "GET", "/healthz", NULL, NULL, NULL, &r);
    assert_int_equal(r.status, 200); /* alive all the same */
    resp_free(&r);

    assert_int_equal(pw_test_redis_resume(&g_redis), PW_OK);
    redis_connect();
    seed_functions(); /* no persistence: the restarted server is empty */
    make_key(g_key, NULL, "acme", NULL, 0, 0, false);
    status = 0;
    for (int i = 0; i < 500 && status != 200; i++) {
        http_do(g_router.port, "GET", "/readyz", NULL, NULL, NULL, &r);
        status = r.status;
        resp_free(&r);
        if (status != 200)
            pw_test_sleep_ms(20);
    }
    assert_int_equal(status, 200);
    /* A whole round trip again. Each worker's client and the reply reader reconnect on
     * their own backoff (up to 5 s), so a call may still meet a worker that is not back
     * yet (503) or a reply reader that is not: retry for a while. */
    status = 0;
    uint64_t until = pw_clock_mono_ms() + 15000;
    while (status != 200 && pw_clock_mono_ms() < until) {
        struct hconn *h = hc_open(g_router.port);
        assert_non_null(h);
        assert_true(hc_request(h, "POST", "/v1/chat/completions", g_key, NULL, CHAT_BODY,
                               strlen(CHAT_BODY)));
        Parkway__InferenceRequest *req = engine_take(FN, 1000);
        if (req) {
            engine_answer_hello(req);
            pw_proto_free_request(req);
        }
        assert_true(hc_read(h, &r));
        status = r.status;
        if (status != 200 && status != 503)
            fprintf(stderr, "after restart: %d %s\n", r.status, r.body);
        resp_free(&r);
        hc_close(h);
        if (status != 200)
            pw_test_sleep_ms(200);
    }
    assert_int_equal(status, 200);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_healthz_and_request_id),
        cmocka_unit_test(test_auth_errors),
        cmocka_unit_test(test_model_access),
        cmocka_unit_test(test_routes_and_methods),
        cmocka_unit_test(test_bad_bodies),
        cmocka_unit_test(test_body_too_large),
        cmocka_unit_test(test_non_stream_answer),
        cmocka_unit_test(test_stream_framing_with_usage),
        cmocka_unit_test(test_retried_attempt_gives_one_answer),
        cmocka_unit_test(test_client_disconnect_sets_cancel),
        cmocka_unit_test(test_rate_limit_429),
        cmocka_unit_test(test_revoke_by_publish_is_immediate),
        cmocka_unit_test(test_cli_keys),
        cmocka_unit_test(test_metrics_need_admin_key),
        cmocka_unit_test(test_deadline_gives_504_and_cancel),
        cmocka_unit_test(test_rate_counter_expires_after_one_request),
        cmocka_unit_test(test_deadline_header),
        cmocka_unit_test(test_queue_full_gives_503),
        cmocka_unit_test(test_cold_function_waits_with_keepalives),
        cmocka_unit_test(test_wake_only_without_ready_engine),
        cmocka_unit_test(test_queue_wait_exceeded),
        cmocka_unit_test(test_tokens_per_minute_429),
        cmocka_unit_test(test_script_cache_flush_is_survived),
        cmocka_unit_test(test_bad_redis_url_exits_2),
        cmocka_unit_test(test_replies_per_worker),
        cmocka_unit_test(test_redis_restart_while_call_waits),
        cmocka_unit_test(test_redis_down_then_back),
    };
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

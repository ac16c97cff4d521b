/*
 * Integration: the router's HTTP layer in this process (server threads on 127.0.0.1, an
 * ephemeral port), driven over raw sockets: keep-alive, pipelining, chunked and
 * 100-continue bodies, every limit and timeout, smuggling attempts, streaming from another
 * thread, client disconnect, back-pressure, request ids, graceful stop, curl, and TLS with
 * an OpenSSL client and a certificate made at test time. Spooled bodies (router_http_spool):
 * content-length and chunked, 413 before the body, 100-continue, and no spool file left when
 * the client goes away mid-body.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <dirent.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "pw_clock.h"
#include "router_http.h"

/* ---------------------------------------------------------------------------------------- */
/* Server fixture and test handler                                                          */
/* ---------------------------------------------------------------------------------------- */

struct tsrv {
    struct router_http_server *s;
    pthread_t th;
    uint16_t port;
};

static atomic_int n_cancelled;    /* cancel callbacks seen */
static atomic_int n_flood_closed; /* /flood saw PW_ERR_CLOSED */
static struct tsrv *cur_srv;      /* the server the handler posts to */

#define MAX_PRODUCERS 16
static pthread_t producers[MAX_PRODUCERS];
static int n_producers;
static pthread_mutex_t prod_mu = PTHREAD_MUTEX_INITIALIZER;

/* A chunk travelling from a producer thread to the request's worker. */
struct hop {
    struct router_http_request *req;
    int seq;   /* -1: end the stream */
    bool full; /* /async: one full response */
};

static void hop_run(void *arg)
{
    struct hop *h = arg;
    if (h->full) {
        static const struct router_http_field ct[] = {{"Content-Type", "text/plain"}};
        router_http_respond(h->req, 200, ct, 1, "async-ok", 8);
    } else if (h->seq < 0) {
        router_http_stream_end(h->req);
    } else {
        char line[64];
        int n = snprintf(line, sizeof line, "data: %d\n\n", h->seq);
        router_http_stream_write(h->req, line, (size_t)n);
    }
    free(h);
}

struct prod_arg {
    struct router_http_request *req;
    unsigned worker;
    bool full;
};

/* Plays the Redis reply reader: another thread handing chunks to the worker. */
static void *producer_main(void *arg)
{
    struct prod_arg *pa = arg;
    int steps = pa->full ? 1 : 4;
    for (int i = 0; i < steps; i++) {
        usleep(10 * 1000);
        struct hop *h = calloc(1, sizeof *h);
        h->req = pa->req;
        h->full = pa->full;
        h->seq = pa->full ? 0 : (i == steps - 1 ? -1 : i);
        if (router_http_server_post(cur_srv->s, pa->worker, hop_run, h) != PW_OK)
            free(h);
    }
    free(pa);
    return NULL;
}

static void start_producer(struct router_http_request *req, bool full)
{
    struct prod_arg *pa = calloc(1, sizeof *pa);
    pa->req = req;
    pa->worker = req->worker;
    pa->full = full;
    pthread_mutex_lock(&prod_mu);
    assert_true(n_producers < MAX_PRODUCERS);
    pthread_create(&producers[n_producers++], NULL, producer_main, pa);
    pthread_mutex_unlock(&prod_mu);
}

static void on_cancel(struct router_http_request *req, void *ud)
{
    atomic_fetch_add(&n_cancelled, 1);
    router_http_request_release(req);
}

static void slow_cb(evutil_socket_t fd, short what, void *arg)
{
    struct router_http_request *req = arg;
    router_http_respond(req, 200, NULL, 0, "slow-ok", 7);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

#define FNV0 14695981039346656037ull
#define SPOOL_LIMIT (1024u * 1024u)

/* The test's spool predicate: bodies of /spool* go to disk with a 1 MiB limit. */
static uint64_t spool_pred(const struct router_http_request *req, void *ud)
{
    assert_string_equal((const char *)ud, "spool-ud");
    assert_non_null(req->method);
    assert_non_null(router_http_request_header(req, "host"));
    return strncmp(req->path, "/spool", 6) == 0 ? SPOOL_LIMIT : 0;
}

#define FIXED_LEN (3u * 1024u * 1024u + 123u)

/* /fixed: FIXED_LEN bytes ('a' + i % 23) streamed with Content-Length, 64 KiB whenever the
 * connection has written everything (the drain callback). */
struct fixed_gen {
    size_t sent;
};

static void fixed_pump(struct router_http_request *req, void *ud)
{
    struct fixed_gen *g = ud;
    static char chunk[65536];
    while (router_http_stream_pending(req) < 128 * 1024) {
        if (g->sent == FIXED_LEN) {
            free(g);
            assert_int_equal(router_http_stream_end(req), PW_OK);
            return;
        }
        size_t n = FIXED_LEN - g->sent < sizeof chunk ? FIXED_LEN - g->sent : sizeof chunk;
        for (size_t i = 0; i < n; i++)
            chunk[i] = (char)('a' + (g->sent + i) % 23);
        assert_int_equal(router_http_stream_write(req, chunk, n), PW_OK);
        g->sent += n;
    }
}

static void fixed_gone(struct router_http_request *req, void *ud)
{
    free(ud);
    router_http_request_release(req);
}

static void handler(struct router_http_request *req, void *ud)
{
    if (!strcmp(req->path, "/fixed")) {
        struct fixed_gen *g = calloc(1, sizeof *g);
        static const struct router_http_field ct[] = {{"Content-Type", "text/plain"}};
        assert_int_equal(router_http_stream_begin_length(req, 200, ct, 1, FIXED_LEN), PW_OK);
        router_http_request_set_cancel(req, fixed_gone, g);
        router_http_stream_set_drain(req, fixed_pump, g);
        fixed_pump(req, g);
    } else if (!strcmp(req->path, "/short")) {
        assert_int_equal(router_http_stream_begin_length(req, 200, NULL, 0, 10), PW_OK);
        assert_int_equal(router_http_stream_write(req, "hello", 5), PW_OK);
        assert_int_equal(router_http_stream_write(req, "toolongtoolong", 14), PW_ERR_INVAL);
        assert_int_equal(router_http_stream_end(req), PW_ERR_INVAL); /* 5 missing: cut */
    } else if (!strncmp(req->path, "/spool", 6)) {
        /* Reads the spooled body back through its descriptor. */
        uint64_t h = FNV0, off = 0;
        char buf[8192];
        while (req->body_spooled && off < req->body_fd_len) {
            ssize_t n = pread(req->body_fd, buf, sizeof buf, (off_t)off);
            if (n <= 0)
                break;
            h = fnv(h, buf, (size_t)n);
            off += (uint64_t)n;
        }
        char *out = router_http_request_alloc(req, 256);
        int n = snprintf(out, 256, "spooled=%d len=%llu read=%llu body_len=%zu hash=%016llx",
                         req->body_spooled, (unsigned long long)req->body_fd_len,
                         (unsigned long long)off, req->body_len, (unsigned long long)h);
        router_http_respond(req, 200, NULL, 0, out, (size_t)n);
    } else if (!strcmp(req->path, "/echo")) {
        const char *xt = router_http_request_header(req, "x-test");
        char *out = router_http_request_alloc(req, req->body_len + 512);
        int n = snprintf(out, req->body_len + 512, "method=%s path=%s query=%s xtest=%s body=%s",
                         req->method, req->path, req->query, xt ? xt : "-", req->body);
        static const struct router_http_field ct[] = {{"Content-Type", "text/plain"}};
        router_http_respond(req, 200, ct, 1, out, (size_t)n);
    } else if (!strcmp(req->path, "/stream")) {
        static const struct router_http_field h[] = {{"Content-Type", "text/event-stream"},
                                                     {"Cache-Control", "no-cache"}};
        assert_int_equal(router_http_stream_begin(req, 200, h, 2), PW_OK);
        start_producer(req, false);
    } else if (!strcmp(req->path, "/async")) {
        start_producer(req, true);
    } else if (!strcmp(req->path, "/hang")) {
        router_http_request_set_cancel(req, on_cancel, NULL);
        router_http_stream_begin(req, 200, NULL, 0);
        router_http_stream_write(req, "data: first\n\n", 13);
    } else if (!strcmp(req->path, "/slow")) {
        struct timeval tv = {0, 300 * 1000};
        event_base_once(router_http_request_base(req), -1, EV_TIMEOUT, slow_cb, req, &tv);
    } else if (!strcmp(req->path, "/flood")) {
        router_http_stream_begin(req, 200, NULL, 0);
        static char big[65536];
        enum pw_err err = PW_OK;
        for (int i = 0; i < 1000 && err == PW_OK; i++)
            err = router_http_stream_write(req, big, sizeof big);
        if (err == PW_ERR_CLOSED)
            atomic_fetch_add(&n_flood_closed, 1);
        router_http_stream_end(req);
    } else if (!strcmp(req->path, "/badheader")) {
        static const struct router_http_field h[] = {{"X-Evil", "a\r\nInjected: 1"}};
        router_http_respond(req, 200, h, 1, "no", 2);
    } else {
        router_http_respond_error(req, 404, NULL, "not_found", "no such route");
    }
}

static void *run_main(void *arg)
{
    struct tsrv *t = arg;
    router_http_server_run(t->s);
    return NULL;
}

static void base_cfg(struct router_http_config *cfg)
{
    router_http_config_init(cfg);
    cfg->host = "127.0.0.1";
    cfg->port = 0;
    cfg->threads = 2;
    cfg->max_body_bytes = 64 * 1024;
    cfg->max_output_bytes = 256 * 1024;
    cfg->header_timeout_ms = 5000;
    cfg->idle_timeout_ms = 5000;
    cfg->drain_timeout_ms = 3000;
}

static void srv_start(struct tsrv *t, const struct router_http_config *cfg)
{
    memset(t, 0, sizeof *t);
    assert_int_equal(router_http_server_create(cfg, handler, NULL, &t->s), PW_OK);
    t->port = router_http_server_port(t->s);
    assert_true(t->port > 0);
    cur_srv = t;
    assert_int_equal(pthread_create(&t->th, NULL, run_main, t), 0);
}

static void srv_stop(struct tsrv *t)
{
    pthread_mutex_lock(&prod_mu);
    for (int i = 0; i < n_producers; i++)
        pthread_join(producers[i], NULL);
    n_producers = 0;
    pthread_mutex_unlock(&prod_mu);
    router_http_server_stop(t->s);
    pthread_join(t->th, NULL);
    router_http_server_destroy(t->s);
    cur_srv = NULL;
}

static char spool_dir[64];

/* A server whose /spool* bodies are spooled into a fresh directory (spool_dir). */
static void start_spool(struct tsrv *t)
{
    snprintf(spool_dir, sizeof spool_dir, "/tmp/pw-spool-test-XXXXXX");
    assert_non_null(mkdtemp(spool_dir));
    struct router_http_config cfg;
    base_cfg(&cfg);
    static char ud[] = "spool-ud";
    char dir[128];
    snprintf(dir, sizeof dir, "%s/sub/spool", spool_dir); /* created by the server */
    cfg.body_spool.fn = spool_pred;
    cfg.body_spool.ud = ud;
    cfg.body_spool.dir = dir;
    srv_start(t, &cfg);
}

/* Open descriptors of this process on files in the spool directory (the server runs here:
 * an unlinked spool file still shows in /proc/self/fd as "<dir>/#123 (deleted)"). */
static int spool_fds(void)
{
    char want[160];
    snprintf(want, sizeof want, "%s/sub/spool/", spool_dir);
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char path[300], target[512];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t l = readlink(path, target, sizeof target - 1);
        if (l <= 0)
            continue;
        target[l] = '\0';
        n += strncmp(target, want, strlen(want)) == 0;
    }
    closedir(d);
    return n;
}

/* Entries in the spool directory (spool files are unlinked: always 0). */
static int spool_entries(void)
{
    char dir[160];
    snprintf(dir, sizeof dir, "%s/sub/spool", spool_dir);
    DIR *d = opendir(dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

static void spool_cleanup(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", spool_dir);
    assert_int_equal(system(cmd), 0);
}

static void start_default(struct tsrv *t)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    srv_start(t, &cfg);
}

/* ---------------------------------------------------------------------------------------- */
/* Raw client                                                                               */
/* ---------------------------------------------------------------------------------------- */

struct client {
    int fd;
    char buf[256 * 1024];
    size_t len;
};

struct resp {
    int status;
    char head[8192];
    char body[128 * 1024];
    size_t body_len;
};

static struct client *cl_open(uint16_t port)
{
    struct client *c = calloc(1, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(c->fd >= 0);
    struct timeval tv = {5, 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return c;
}

static void cl_close(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c);
}

static void cl_send(struct client *c, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(c->fd, s, n, MSG_NOSIGNAL);
        if (w <= 0)
            return; /* the server may have closed on us: the caller checks the answer */
        s += w;
        n -= (size_t)w;
    }
}

static void cl_sends(struct client *c, const char *s)
{
    cl_send(c, s, strlen(s));
}

/* Reads more into c->buf; bytes read, 0 on EOF, -1 on error or timeout. */
static int cl_fill(struct client *c)
{
    if (c->len == sizeof c->buf)
        return -1;
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n > 0)
        c->len += (size_t)n;
    return n < 0 ? -1 : (int)n;
}

static void cl_consume(struct client *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

static const char *resp_header(const struct resp *r, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    const char *p = strstr(r->head, "\r\n");
    while (p && p[2]) {
        p += 2;
        if (!strncasecmp(p, name, nl) && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ')
                v++;
            const char *e = strstr(v, "\r\n");
            size_t l = e ? (size_t)(e - v) : strlen(v);
            if (l >= cap)
                l = cap - 1;
            memcpy(out, v, l);
            out[l] = '\0';
            return out;
        }
        p = strstr(p, "\r\n");
    }
    return NULL;
}

/* Reads one response (1xx included; head_only for HEAD). 0 on success, -1 if the
 * connection ended first. */
static int read_response_ex(struct client *c, struct resp *r, bool head_only)
{
    memset(r, 0, sizeof *r);
    char *end;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4)))
        if (cl_fill(c) <= 0)
            return -1;
    size_t hl = (size_t)(end - c->buf) + 4;
    assert_true(hl < sizeof r->head);
    memcpy(r->head, c->buf, hl);
    r->head[hl] = '\0';
    cl_consume(c, hl);
    assert_int_equal(sscanf(r->head, "HTTP/1.%*d %d", &r->status), 1);
    char v[64];
    if (head_only || r->status < 200 || r->status == 204 || r->status == 304)
        return 0;
    if (resp_header(r, "content-length", v, sizeof v)) {
        size_t n = strtoul(v, NULL, 10);
        assert_true(n < sizeof r->body);
        while (c->len < n)
            if (cl_fill(c) <= 0)
                return -1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cl_consume(c, n);
    } else if (resp_header(r, "transfer-encoding", v, sizeof v)) {
        for (;;) {
            char *le;
            while (!(le = memmem(c->buf, c->len, "\r\n", 2)))
                if (cl_fill(c) <= 0)
                    return -1;
            size_t sz = strtoul(c->buf, NULL, 16);
            size_t skip = (size_t)(le - c->buf) + 2;
            while (c->len < skip + sz + 2)
                if (cl_fill(c) <= 0)
                    return -1;
            assert_true(r->body_len + sz < sizeof r->body);
            memcpy(r->body + r->body_len, c->buf + skip, sz);
            r->body_len += sz;
            cl_consume(c, skip + sz + 2);
            if (sz == 0)
                break;
        }
    } else {
        while (cl_fill(c) > 0) {
        }
        size_t n = c->len < sizeof r->body ? c->len : sizeof r->body - 1;
        memcpy(r->body, c->buf, n);
        r->body_len = n;
        cl_consume(c, n);
    }
    r->body[r->body_len] = '\0';
    return 0;
}

static int read_response(struct client *c, struct resp *r)
{
    return read_response_ex(c, r, false);
}

/* True if the server closes the connection (EOF or reset) within the receive timeout. */
static bool cl_closed(struct client *c)
{
    char b[256];
    for (;;) {
        ssize_t n = recv(c->fd, b, sizeof b, 0);
        if (n == 0)
            return true;
        if (n < 0)
            return errno == ECONNRESET;
    }
}

static void assert_openai_error(const struct resp *r, int status, const char *code)
{
    assert_int_equal(r->status, status);
    assert_non_null(strstr(r->body, "{\"error\":{\"message\":"));
    assert_non_null(strstr(r->body, "\"param\":null"));
    char want[128];
    snprintf(want, sizeof want, "\"code\":\"%s\"", code);
    assert_non_null(strstr(r->body, want));
    char v[200];
    assert_non_null(resp_header(r, "x-request-id", v, sizeof v));
    assert_true(router_http_request_id_valid(v, strlen(v)));
    assert_non_null(resp_header(r, "content-type", v, sizeof v));
    assert_string_equal(v, "application/json");
}

static struct resp rsp; /* big: keep it off the stack */

/* ---------------------------------------------------------------------------------------- */
/* Tests                                                                                    */
/* ---------------------------------------------------------------------------------------- */

static void test_keepalive_reuse(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    for (int i = 0; i < 3; i++) {
        cl_sends(c, "GET /echo?i=1 HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\n\r\n");
        assert_int_equal(read_response(c, &rsp), 0);
        assert_int_equal(rsp.status, 200);
        assert_string_equal(rsp.body, "method=GET path=/echo query=i=1 xtest=yes body=");
        char v[64];
        assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "keep-alive");
        assert_non_null(resp_header(&rsp, "date", v, sizeof v));
    }
    cl_close(c);
    srv_stop(&t);
}

static void test_pipelined_in_order(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    /* /async answers later from another thread; the two after it must still wait. */
    cl_sends(c, "GET /async HTTP/1.1\r\nHost: x\r\n\r\n"
                "POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                "GET /echo?n=3 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(rsp.body, "async-ok");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(rsp.body, "method=POST path=/echo query=n=2 xtest=- body=abc");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(rsp.body, "method=GET path=/echo query=n=3 xtest=- body=");
    cl_close(c);
    srv_stop(&t);
}

static void test_chunked_request_body(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n");
    usleep(20 * 1000);
    cl_sends(c, "6;ext=1\r\n world\r\n0\r\nTrailer-X: 1\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    assert_string_equal(rsp.body, "method=POST path=/echo query= xtest=- body=hello world");
    cl_close(c);
    srv_stop(&t);
}

static void test_expect_100_continue(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                "Expect: 100-continue\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 100);
    cl_sends(c, "hello");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    assert_string_equal(rsp.body, "method=POST path=/echo query= xtest=- body=hello");
    cl_close(c);

    /* Too big: 413 straight away, never a 100 Continue. */
    c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                "Expect: 100-continue\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    cl_close(c);

    c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: magic\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 417, "expectation_failed");
    cl_close(c);
    srv_stop(&t);
}

static void test_413_by_content_length(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0); /* without sending any body */
    assert_openai_error(&rsp, 413, "request_too_large");
    char v[64];
    assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "close");
    assert_true(cl_closed(c));
    cl_close(c);
    srv_stop(&t);
}

static void test_413_chunked_too_long(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    static char chunk[16 * 1024 + 16];
    int hl = snprintf(chunk, sizeof chunk, "%x\r\n", 16 * 1024);
    memset(chunk + hl, 'a', 16 * 1024);
    memcpy(chunk + hl + 16 * 1024, "\r\n", 2);
    for (int i = 0; i < 6; i++) /* 96 KiB against a 64 KiB limit */
        cl_send(c, chunk, (size_t)hl + 16 * 1024 + 2);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    cl_close(c);
    srv_stop(&t);
}

static void test_header_too_large(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    static char req[24 * 1024];
    int n = snprintf(req, sizeof req, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(req + n, 'b', 20 * 1024);
    strcpy(req + n + 20 * 1024, "\r\n\r\n");
    cl_sends(c, req);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 431, "header_too_large");
    cl_close(c);

    /* Too many small headers. */
    c = cl_open(t.port);
    n = snprintf(req, sizeof req, "GET /echo HTTP/1.1\r\nHost: x\r\n");
    for (int i = 0; i < 150; i++)
        n += snprintf(req + n, sizeof req - (size_t)n, "X-H%d: v\r\n", i);
    snprintf(req + n, sizeof req - (size_t)n, "\r\n");
    cl_sends(c, req);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 431, "header_too_large");
    cl_close(c);
    srv_stop(&t);
}

static void expect_400_and_close(uint16_t port, const char *req, int status)
{
    struct client *c = cl_open(port);
    cl_sends(c, req);
    assert_int_equal(read_response(c, &rsp), 0);
    if (rsp.status != status)
        print_error("request %s got %d\n", req, rsp.status);
    assert_int_equal(rsp.status, status);
    assert_non_null(strstr(rsp.body, "\"error\""));
    char v[200];
    assert_non_null(resp_header(&rsp, "x-request-id", v, sizeof v));
    assert_true(cl_closed(c));
    cl_close(c);
}

static void test_smuggling_rejected(void **state)
{
    struct tsrv t;
    start_default(&t);
    /* CL + TE: the classic desync. The GET inside must never be answered. */
    expect_400_and_close(t.port,
                         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo HTTP/1.1\r\n"
                         "Host: x\r\n\r\n",
                         400);
    expect_400_and_close(t.port,
                         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         "Content-Length: 4\r\n\r\n0\r\n\r\n",
                         400);
    expect_400_and_close(t.port,
                         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                         "Content-Length: 5\r\n\r\nabcde",
                         400);
    expect_400_and_close(t.port,
                         "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                         "Content-Length: 3\r\n\r\nabc",
                         400);
    expect_400_and_close(t.port, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
                         400);
    /* A Transfer-Encoding other than plain chunked: refused (400 from llhttp or our 501). */
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                "0\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_true(rsp.status == 501 || rsp.status == 400);
    assert_true(cl_closed(c));
    cl_close(c);
    expect_400_and_close(t.port,
                         "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
                         rsp.status == 501 ? 501 : 400);
    /* Obsolete line folding, space before colon, bare LF in the request line. */
    expect_400_and_close(t.port, "GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400);
    expect_400_and_close(t.port, "GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
                         400);
    expect_400_and_close(t.port, "GET /echo HTTP/1.1\r\n\r\n", 400); /* no Host */
    expect_400_and_close(t.port, "GET /echo HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400);
    expect_400_and_close(t.port, "GET /echo HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", 400);
    expect_400_and_close(t.port, "garbage\r\n\r\n", 501); /* an unknown method token */
    expect_400_and_close(t.port, "BREW /echo HTTP/1.1\r\nHost: x\r\n\r\n", 501);
    expect_400_and_close(t.port, "TRACE /echo HTTP/1.1\r\nHost: x\r\n\r\n", 501);
    srv_stop(&t);
}

static void test_header_read_timeout(void **state)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.header_timeout_ms = 300;
    struct tsrv t;
    srv_start(&t, &cfg);
    struct client *c = cl_open(t.port);
    uint64_t t0 = pw_clock_mono_ms();
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n"); /* headers never end */
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 408, "request_timeout");
    uint64_t dt = pw_clock_mono_ms() - t0;
    assert_true(dt >= 250 && dt < 3000);
    assert_true(cl_closed(c));
    cl_close(c);
    srv_stop(&t);
}

static void test_idle_timeout(void **state)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.idle_timeout_ms = 300;
    struct tsrv t;
    srv_start(&t, &cfg);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    uint64_t t0 = pw_clock_mono_ms();
    char b[16];
    assert_int_equal(recv(c->fd, b, sizeof b, 0), 0); /* closed silently: no bytes */
    uint64_t dt = pw_clock_mono_ms() - t0;
    assert_true(dt >= 250 && dt < 3000);
    cl_close(c);
    srv_stop(&t);
}

static void test_max_connections(void **state)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.max_connections = 2;
    struct tsrv t;
    srv_start(&t, &cfg);
    struct client *a = cl_open(t.port), *b = cl_open(t.port);
    cl_sends(a, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(a, &rsp), 0);
    cl_sends(b, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(b, &rsp), 0);
    assert_int_equal(router_http_server_connections(t.s), 2);
    struct client *c = cl_open(t.port);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 503, "server_overloaded");
    cl_close(c);
    cl_close(a);
    for (int i = 0; i < 100 && router_http_server_connections(t.s) > 1; i++)
        usleep(10 * 1000);
    c = cl_open(t.port);
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    cl_close(c);
    cl_close(b);
    srv_stop(&t);
}

static void test_stream_from_other_thread(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    char v[64];
    assert_string_equal(resp_header(&rsp, "transfer-encoding", v, sizeof v), "chunked");
    assert_string_equal(resp_header(&rsp, "content-type", v, sizeof v), "text/event-stream");
    assert_string_equal(rsp.body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    /* The connection is still good for another request. */
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    cl_close(c);

    /* HTTP/1.0: no chunked encoding; the body ends at close. */
    c = cl_open(t.port);
    cl_sends(c, "GET /stream HTTP/1.0\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_null(resp_header(&rsp, "transfer-encoding", v, sizeof v));
    assert_string_equal(rsp.body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    cl_close(c);
    srv_stop(&t);
}

static void test_disconnect_cancels(void **state)
{
    struct tsrv t;
    start_default(&t);
    atomic_store(&n_cancelled, 0);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /hang HTTP/1.1\r\nHost: x\r\n\r\n");
    while (!memmem(c->buf, c->len, "data: first", 11))
        assert_true(cl_fill(c) > 0);
    cl_close(c);
    for (int i = 0; i < 200 && atomic_load(&n_cancelled) == 0; i++)
        usleep(10 * 1000);
    assert_int_equal(atomic_load(&n_cancelled), 1);
    srv_stop(&t);
}

static void test_slow_reader_dropped(void **state)
{
    struct tsrv t;
    start_default(&t);
    atomic_store(&n_flood_closed, 0);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /flood HTTP/1.1\r\nHost: x\r\n\r\n");
    for (int i = 0; i < 200 && atomic_load(&n_flood_closed) == 0; i++)
        usleep(10 * 1000);
    assert_int_equal(atomic_load(&n_flood_closed), 1);
    assert_true(cl_closed(c));
    cl_close(c);
    srv_stop(&t);
}

static void test_request_id(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    char v[200];
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: client-id_1.2\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(resp_header(&rsp, "x-request-id", v, sizeof v), "client-id_1.2");
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: bad id!\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_non_null(resp_header(&rsp, "x-request-id", v, sizeof v));
    assert_int_equal(strlen(v), 32);
    assert_true(router_http_request_id_valid(v, 32));
    char first[64];
    strcpy(first, v);
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_not_equal(resp_header(&rsp, "x-request-id", v, sizeof v), first);
    /* Handler errors and layer errors carry it too. */
    cl_sends(c, "GET /nope HTTP/1.1\r\nHost: x\r\nX-Request-Id: r404\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 404, "not_found");
    assert_string_equal(resp_header(&rsp, "x-request-id", v, sizeof v), "r404");
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: r413\r\n"
                "Content-Length: 99999999\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    assert_string_equal(resp_header(&rsp, "x-request-id", v, sizeof v), "r413");
    cl_close(c);
    srv_stop(&t);
}

static void test_http10_keepalive_and_head(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    char v[64];
    cl_sends(c, "GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "keep-alive");
    cl_sends(c, "HEAD /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_int_equal(read_response_ex(c, &rsp, true), 0);
    assert_non_null(resp_header(&rsp, "content-length", v, sizeof v));
    assert_int_equal(rsp.status, 200);
    /* HEAD: a Content-Length but no body, so the next response starts right away. */
    cl_sends(c, "GET /echo?last HTTP/1.0\r\n\r\n");
    char b[4096];
    size_t got = c->len;
    memcpy(b, c->buf, got);
    while (got < sizeof b - 1) {
        ssize_t n = recv(c->fd, b + got, sizeof b - 1 - got, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    b[got] = '\0';
    assert_true(!strncmp(b, "HTTP/1.1 200 OK\r\n", 17)); /* nothing left from HEAD */
    assert_non_null(strstr(b, "query=last"));
    assert_non_null(strstr(b, "Connection: close"));
    cl_close(c);
    srv_stop(&t);
}

static void test_upgrade_answered_then_closed(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                "GET /echo?second HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    char v[64];
    assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "close");
    assert_true(cl_closed(c));
    cl_close(c);
    srv_stop(&t);
}

static void test_bad_handler_header_is_500(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /badheader HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 500, "internal_error");
    assert_null(strstr(rsp.head, "Injected"));
    cl_close(c);
    srv_stop(&t);
}

static void test_graceful_stop(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *idle = cl_open(t.port);
    cl_sends(idle, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(idle, &rsp), 0);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
    usleep(50 * 1000);
    router_http_server_stop(t.s);
    /* The idle keep-alive connection is closed; the in-flight request still completes. */
    assert_true(cl_closed(idle));
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    assert_string_equal(rsp.body, "slow-ok");
    char v[64];
    assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "close");
    assert_true(cl_closed(c));
    pthread_join(t.th, NULL); /* run() returned */
    router_http_server_destroy(t.s);
    /* New connections are refused. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(t.port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_not_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    close(fd);
    cl_close(idle);
    cl_close(c);
}

static void test_curl(void **state)
{
    if (system("command -v curl >/dev/null 2>&1") != 0)
        skip();
    struct tsrv t;
    start_default(&t);
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "curl -s -i --max-time 5 -H 'x-request-id: curl-1' --data-binary hello "
             "'http://127.0.0.1:%u/echo?x=1'",
             t.port);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char out[4096];
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    pclose(p);
    assert_non_null(strstr(out, "HTTP/1.1 200 OK"));
    assert_non_null(strstr(out, "x-request-id: curl-1"));
    assert_non_null(strstr(out, "method=POST path=/echo query=x=1 xtest=- body=hello"));
    srv_stop(&t);
}

/* ---------------------------------------------------------------------------------------- */
/* TLS                                                                                      */
/* ---------------------------------------------------------------------------------------- */

static char tls_dir[64], tls_cert[128], tls_key[128];

static void make_cert(void)
{
    strcpy(tls_dir, "/tmp/pw-http-tls-XXXXXX");
    assert_non_null(mkdtemp(tls_dir));
    snprintf(tls_cert, sizeof tls_cert, "%s/cert.pem", tls_dir);
    snprintf(tls_key, sizeof tls_key, "%s/key.pem", tls_dir);
    EVP_PKEY *pkey = EVP_EC_gen("P-256");
    assert_non_null(pkey);
    X509 *x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -60);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, pkey);
    X509_NAME *name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost", -1, -1,
                               0);
    X509_set_issuer_name(x, name);
    assert_true(X509_sign(x, pkey, EVP_sha256()) > 0);
    FILE *f = fopen(tls_key, "w");
    PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    f = fopen(tls_cert, "w");
    PEM_write_X509(f, x);
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(pkey);
}

static void remove_cert(void)
{
    unlink(tls_cert);
    unlink(tls_key);
    rmdir(tls_dir);
}

static SSL *tls_connect(SSL_CTX *ctx, uint16_t port, int *fd_out)
{
    struct client *c = cl_open(port);
    int fd = c->fd;
    c->fd = -1;
    cl_close(c);
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    static const unsigned char alpn[] = {2, 'h', '2', 8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    SSL_set_alpn_protos(ssl, alpn, sizeof alpn);
    *fd_out = fd;
    if (SSL_connect(ssl) != 1) {
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    return ssl;
}

static void test_tls(void **state)
{
    make_cert();
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.tls_cert_file = tls_cert;
    cfg.tls_key_file = tls_key;
    struct tsrv t;
    srv_start(&t, &cfg);

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    assert_int_equal(SSL_CTX_load_verify_locations(ctx, tls_cert, NULL), 1);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    int fd;
    SSL *ssl = tls_connect(ctx, t.port, &fd);
    assert_non_null(ssl);
    const unsigned char *proto;
    unsigned plen;
    SSL_get0_alpn_selected(ssl, &proto, &plen);
    assert_int_equal(plen, 8);
    assert_memory_equal(proto, "http/1.1", 8);
    assert_true(SSL_version(ssl) >= TLS1_2_VERSION);
    for (int round = 0; round < 2; round++) { /* keep-alive over TLS */
        const char *req = round == 0
                              ? "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                              : "GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_true(SSL_write(ssl, req, (int)strlen(req)) > 0);
        char buf[8192];
        size_t got = 0;
        const char *want = round == 0 ? "body=abc" : "0\r\n\r\n";
        while (got < sizeof buf - 1) {
            int n = SSL_read(ssl, buf + got, (int)(sizeof buf - 1 - got));
            if (n <= 0)
                break;
            got += (size_t)n;
            buf[got] = '\0';
            if (strstr(buf, want))
                break;
        }
        buf[got] = '\0';
        assert_true(!strncmp(buf, "HTTP/1.1 200 OK\r\n", 17));
        assert_non_null(strstr(buf, want));
    }
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);

    /* A TLS 1.1 client is refused. */
    SSL_CTX *old = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_security_level(old, 0);
    SSL_CTX_set_min_proto_version(old, TLS1_VERSION);
    SSL_CTX_set_max_proto_version(old, TLS1_1_VERSION);
    assert_null(tls_connect(old, t.port, &fd));
    SSL_CTX_free(old);

    /* Plain HTTP on the TLS port does not get through. */
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(read_response(c, &rsp) != 0 || rsp.status != 200);
    cl_close(c);

    SSL_CTX_free(ctx);
    srv_stop(&t);
    remove_cert();
}

static void test_tls_bad_files(void **state)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.tls_cert_file = "/nonexistent/cert.pem";
    cfg.tls_key_file = "/nonexistent/key.pem";
    struct router_http_server *s = NULL;
    assert_int_equal(router_http_server_create(&cfg, handler, NULL, &s), PW_ERR_CONFIG);
    assert_null(s);
}

/* A body over max_body_bytes (64 KiB) is fine on a spooled route, by length and chunked;
 * other routes keep the in-memory path and its limit. */
static void test_spool_bodies(void **state)
{
    struct tsrv t;
    start_spool(&t);
    static char body[600 * 1024];
    for (size_t i = 0; i < sizeof body; i++)
        body[i] = (char)('a' + (i * 7) % 26);
    uint64_t h = fnv(FNV0, body, sizeof body);
    char want[200];
    snprintf(want, sizeof want, "spooled=1 len=%zu read=%zu body_len=0 hash=%016llx", sizeof body,
             sizeof body, (unsigned long long)h);
    struct client *c = cl_open(t.port);
    char head[256];
    snprintf(head, sizeof head, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: %zu\r\n\r\n",
             sizeof body);
    cl_sends(c, head);
    cl_send(c, body, sizeof body);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    assert_string_equal(rsp.body, want);

    /* chunked, on the same keep-alive connection, in uneven chunks */
    cl_sends(c, "POST /spool/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (size_t off = 0; off < sizeof body;) {
        size_t n = sizeof body - off < 70001 ? sizeof body - off : 70001;
        char ch[32];
        snprintf(ch, sizeof ch, "%zx\r\n", n);
        cl_sends(c, ch);
        cl_send(c, body + off, n);
        cl_sends(c, "\r\n");
        off += n;
    }
    cl_sends(c, "0\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    assert_string_equal(rsp.body, want);

    /* an empty body is not spooled; other routes keep the memory path and its limit */
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    snprintf(want, sizeof want, "spooled=0 len=0 read=0 body_len=0 hash=%016llx",
             (unsigned long long)FNV0);
    assert_string_equal(rsp.body, want);
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(rsp.body, "method=POST path=/echo query= xtest=- body=abc");
    cl_sends(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    cl_close(c);
    assert_int_equal(spool_entries(), 0);
    srv_stop(&t);
    assert_int_equal(spool_fds(), 0);
    spool_cleanup();
}

/* Over the spool limit: 413 from the headers alone (before any body is read, no 100
 * Continue), or as soon as a chunked body passes it; the connection closes either way. */
static void test_spool_limits_and_continue(void **state)
{
    struct tsrv t;
    start_spool(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\nabcdef");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    char v[64];
    assert_string_equal(resp_header(&rsp, "connection", v, sizeof v), "close");
    assert_true(cl_closed(c));
    cl_close(c);

    c = cl_open(t.port);
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                "Expect: 100-continue\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large"); /* never a 100 first */
    cl_close(c);

    c = cl_open(t.port);
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                "Expect: 100-continue\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 100);
    cl_sends(c, "hello");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_int_equal(rsp.status, 200);
    char want[128];
    snprintf(want, sizeof want, "spooled=1 len=5 read=5 body_len=0 hash=%016llx",
             (unsigned long long)fnv(FNV0, "hello", 5));
    assert_string_equal(rsp.body, want);
    cl_close(c);

    c = cl_open(t.port);
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    static char chunk[64 * 1024 + 16];
    int hl = snprintf(chunk, sizeof chunk, "%x\r\n", 64 * 1024);
    memset(chunk + hl, 'z', 64 * 1024);
    memcpy(chunk + hl + 64 * 1024, "\r\n", 2);
    for (int i = 0; i < 20; i++) /* 1.25 MiB against 1 MiB */
        cl_send(c, chunk, (size_t)hl + 64 * 1024 + 2);
    assert_int_equal(read_response(c, &rsp), 0);
    assert_openai_error(&rsp, 413, "request_too_large");
    assert_true(cl_closed(c));
    cl_close(c);
    for (int i = 0; i < 200 && spool_fds() > 0; i++)
        usleep(10 * 1000);
    assert_int_equal(spool_fds(), 0);
    assert_int_equal(spool_entries(), 0);
    srv_stop(&t);
    spool_cleanup();
}

/* A client that goes away half-way through a spooled body leaves no spool file behind. */
static void test_spool_client_gone_mid_body(void **state)
{
    struct tsrv t;
    start_spool(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "POST /spool HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n");
    static char part[300 * 1024];
    memset(part, 'q', sizeof part);
    cl_send(c, part, sizeof part);
    for (int i = 0; i < 200 && spool_fds() == 0; i++)
        usleep(10 * 1000);
    assert_int_equal(spool_fds(), 1); /* being written */
    assert_int_equal(spool_entries(), 0);
    cl_close(c);
    for (int i = 0; i < 200 && spool_fds() > 0; i++)
        usleep(10 * 1000);
    assert_int_equal(spool_fds(), 0);
    assert_int_equal(spool_entries(), 0);
    srv_stop(&t);
    spool_cleanup();
}

/* A large body of known length streamed at the client's pace: Content-Length framing, the
 * drain callback refills, nothing dropped at max_output_bytes (256 KiB here), keep-alive
 * intact afterwards; fewer bytes than announced cut the connection. */
static void test_stream_length_with_drain(void **state)
{
    struct tsrv t;
    start_default(&t);
    struct client *c = cl_open(t.port);
    cl_sends(c, "GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response_ex(c, &rsp, true), 0);
    assert_int_equal(rsp.status, 200);
    char v[64];
    assert_string_equal(resp_header(&rsp, "content-length", v, sizeof v), "3145851");
    assert_null(resp_header(&rsp, "transfer-encoding", v, sizeof v));
    size_t got = 0;
    while (got < FIXED_LEN) {
        if (c->len == 0)
            assert_true(cl_fill(c) > 0);
        size_t n = c->len < FIXED_LEN - got ? c->len : FIXED_LEN - got;
        for (size_t i = 0; i < n; i++)
            if (c->buf[i] != (char)('a' + (got + i) % 23))
                fail_msg("byte %zu differs", got + i);
        cl_consume(c, n);
        got += n;
        if (got % (512 * 1024) < n)
            usleep(20 * 1000); /* a slow reader now and then */
    }
    cl_sends(c, "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), 0);
    assert_string_equal(rsp.body, "method=GET path=/echo query= xtest=- body=");
    cl_close(c);

    c = cl_open(t.port);
    cl_sends(c, "GET /short HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_int_equal(read_response(c, &rsp), -1); /* 10 announced, 5 sent, then closed */
    cl_close(c);
    srv_stop(&t);
}

/* A spool directory that cannot be used fails at create, not at the first upload. */
static void test_spool_bad_dir(void **state)
{
    struct router_http_config cfg;
    base_cfg(&cfg);
    cfg.body_spool.fn = spool_pred;
    static char ud[] = "spool-ud";
    cfg.body_spool.ud = ud;
    cfg.body_spool.dir = "/proc/version/nope";
    struct router_http_server *s = NULL;
    assert_int_equal(router_http_server_create(&cfg, handler, NULL, &s), PW_ERR_CONFIG);
    assert_null(s);
    cfg.body_spool.dir = NULL;
    assert_int_equal(router_http_server_create(&cfg, handler, NULL, &s), PW_ERR_CONFIG);
    assert_null(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keepalive_reuse),
        cmocka_unit_test(test_pipelined_in_order),
        cmocka_unit_test(test_chunked_request_body),
        cmocka_unit_test(test_expect_100_continue),
        cmocka_unit_test(test_413_by_content_length),
        cmocka_unit_test(test_413_chunked_too_long),
        cmocka_unit_test(test_header_too_large),
        cmocka_unit_test(test_smuggling_rejected),
        cmocka_unit_test(test_header_read_timeout),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_stream_from_other_thread),
        cmocka_unit_test(test_disconnect_cancels),
        cmocka_unit_test(test_slow_reader_dropped),
        cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_http10_keepalive_and_head),
        cmocka_unit_test(test_upgrade_answered_then_closed),
        cmocka_unit_test(test_bad_handler_header_is_500),
        cmocka_unit_test(test_graceful_stop),
        cmocka_unit_test(test_curl),
        cmocka_unit_test(test_tls),
        cmocka_unit_test(test_tls_bad_files),
        cmocka_unit_test(test_spool_bodies),
        cmocka_unit_test(test_spool_limits_and_continue),
        cmocka_unit_test(test_spool_client_gone_mid_body),
        cmocka_unit_test(test_spool_bad_dir),
        cmocka_unit_test(test_stream_length_with_drain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

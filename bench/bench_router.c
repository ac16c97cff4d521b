/*
 * bench_router: the router's own overhead on loopback.
 *
 * Starts a private redis-server and parkway-router, registers one function and one API key,
 * and runs a fake engine thread that answers every queued request at once (XREADGROUP, one
 * ReplyChunk XADDed to the request's reply stream, XACK) and heartbeats READY, so what is
 * measured is HTTP + JSON + Redis queue + reply path, not inference. The load generator is
 * one epoll thread driving N keep-alive connections, each with one request in flight (closed
 * loop), and records every request's latency.
 *
 * Targets, for each connection count (default 1, 16, 64, 256):
 *   healthz  GET /healthz: HTTP only, no Redis (the floor)
 *   raw      no HTTP: XADD pw:{fn}:q -> the same fake engine (XREADGROUP, reply XADD, XACK)
 *            -> XREAD of a reply stream, N requests in flight from one sender connection and
 *            one reader, like the router's own queue write and reply thread
 *   chat     POST /v1/chat/completions, non-stream, max_tokens 1, through the fake engine
 *   stream   the same with "stream": true; the fake engine puts its clock (CLOCK_MONOTONIC,
 *            read just before it flushes the reply XADDs) in the chunk's text, and the client
 *            takes the difference when that event's bytes arrive: first_byte = reply chunk
 *            written to Redis -> first byte of its SSE event read by the client (an upper
 *            bound of "chunk in Redis to first byte out of the router")
 * Then per connection count: chat p50 minus raw p50 (what the router adds) and chat req/s
 * over raw req/s; the router's RSS before the stream runs, at the end of each (connections
 * still open) and after. Prints the tables, then one JSON line {"bench":"router",...}.
 *
 *   bench_router [--router PATH] [--seconds S] [--conns 1,16,64,256] [--threads T]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_apikey.h"
#include "bench_util.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"

#define BENCH_FN "bench"
#define BENCH_MAX_CONNS 1024
#define BENCH_RAW_ID "rawbench" /* names the raw client's reply stream */

static void stop_child(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int i = 0; i < 200; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        bench_sleep_ms(25);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* ---- the fake engine --------------------------------------------------------------------- */

struct engine {
    int redis_port;
    atomic_int stop;
    uint64_t answered;
};

static void engine_heartbeat(redisContext *rc, const char *workers_key)
{
    Parkway__WorkerStatus ws = PARKWAY__WORKER_STATUS__INIT;
    ws.worker_id = "bench-engine";
    ws.function = BENCH_FN;
    ws.state = PARKWAY__WORKER_STATE__WORKER_STATE_READY;
    ws.slots_total = 256;
    ws.last_heartbeat_unix_ms = pw_clock_wall_ms();
    uint8_t buf[512];
    size_t len;
    if (pw_proto_pack_worker(&ws, buf, sizeof buf, &len, NULL) == PW_OK)
        freeReplyObject(
            redisCommand(rc, "HSET %s %s %b", workers_key, ws.worker_id, buf, (size_t)len));
}

static void *engine_main(void *arg)
{
    struct engine *en = arg;
    struct timeval tv = {2, 0};
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", en->redis_port, tv);
    if (!rc || rc->err) {
        fprintf(stderr, "bench engine: cannot connect to redis\n");
        redisFree(rc);
        return NULL;
    }
    char q[PW_KEY_MAX], wk[PW_KEY_MAX];
    pw_key_queue(q, sizeof q, BENCH_FN);
    pw_key_workers(wk, sizeof wk, BENCH_FN);
    freeReplyObject(redisCommand(rc, "XGROUP CREATE %s %s 0 MKSTREAM", q, PW_GROUP_ENGINES));
    uint64_t last_hb = 0;
    while (!atomic_load(&en->stop)) {
        if (pw_clock_mono_ms() - last_hb >= 1000) {
            engine_heartbeat(rc, wk);
            last_hb = pw_clock_mono_ms();
        }
        redisReply *r = redisCommand(rc, "XREADGROUP GROUP %s e COUNT 256 BLOCK 100 STREAMS %s >",
                                     PW_GROUP_ENGINES, q);
        if (!r)
            break;
        struct pw_stream_entries *es = NULL;
        if (r->type == REDIS_REPLY_ARRAY && pw_stream_parse_read(r, &es) == PW_OK && es->n) {
            size_t pending = 0;
            /* One clock for the batch, read before any of it is written: a stream's
             * first-byte time then covers the whole way from here to the client. */
            char stamp[32];
            snprintf(stamp, sizeof stamp, "t=%" PRIu64 ";", pw_clock_mono_ns());
            for (size_t i = 0; i < es->n; i++) {
                const struct pw_slice *v = pw_stream_entry_get(&es->v[i], PW_STREAM_FIELD);
                Parkway__InferenceRequest *req = NULL;
                if (!v || pw_proto_unpack_request(v->ptr, v->len, 0, &req) != PW_OK)
                    continue;
                Parkway__ReplyChunk ch = PARKWAY__REPLY_CHUNK__INIT;
                Parkway__Usage u = PARKWAY__USAGE__INIT;
                u.prompt_tokens = 5;
                u.completion_tokens = 1;
                ch.request_id = req->id;
                ch.text = req->stream ? stamp : "ok";
                ch.n_tokens = 1;
                ch.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH;
                ch.done = true;
                ch.usage = &u;
                uint8_t buf[1024];
                size_t len;
                if (pw_proto_pack_reply(&ch, buf, sizeof buf, &len, NULL) == PW_OK) {
                    redisAppendCommand(rc, "XADD %s * %s %b", req->reply_to, PW_STREAM_FIELD, buf,
                                       len);
                    pending++;
                }
                redisAppendCommand(rc, "XACK %s %s %s", q, PW_GROUP_ENGINES, es->v[i].id);
                pending++;
                en->answered++;
                pw_proto_free_request(req);
            }
            for (size_t i = 0; i < pending; i++) {
                redisReply *x = NULL;
                if (redisGetReply(rc, (void **)&x) != REDIS_OK)
                    break;
                freeReplyObject(x);
            }
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
    }
    redisFree(rc);
    return NULL;
}

/* ---- results ------------------------------------------------------------------------------ */

struct result {
    const char *target;
    unsigned conns;
    double rps;
    double p50_us, p99_us;
    double fb_p50_us, fb_p99_us; /* stream: reply chunk in Redis -> its first byte read */
    uint64_t n, errors;
    long rss_end_kib; /* the router's RSS at the end of the run, connections open */
};

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Latency samples, microseconds. */
struct samples {
    uint32_t *v;
    size_t n, cap;
};

static bool samples_add(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1 << 16;
        uint32_t *v = realloc(s->v, cap * sizeof *v);
        if (!v)
            return false;
        s->v = v;
        s->cap = cap;
    }
    uint64_t us = ns / 1000;
    s->v[s->n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    return true;
}

static void samples_pct(struct samples *s, double *p50, double *p99)
{
    qsort(s->v, s->n, sizeof *s->v, cmp_u32);
    *p50 = s->n ? s->v[s->n / 2] : 0;
    *p99 = s->n ? s->v[(size_t)((double)s->n * 0.99)] : 0;
}

static long rss_kib(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kib = strtol(line + 6, NULL, 10);
    if (f)
        fclose(f);
    return kib;
}

/* ---- the load generator ------------------------------------------------------------------ */

struct lconn {
    int fd;
    uint64_t sent_ns;
    size_t got;      /* bytes of the current response received */
    size_t need;     /* head + Content-Length once the head is in; 0 before */
    size_t head_len; /* bytes of the head, once in */
    bool chunked;    /* the response ends with the zero-size chunk */
    bool stamped;    /* the stream's first event has been timed */
    char buf[16384]; /* the current response */
};

static int lconn_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool lconn_send(struct lconn *c, const char *req, size_t len)
{
    c->sent_ns = pw_clock_mono_ns();
    c->got = 0;
    c->need = 0;
    c->head_len = 0;
    c->chunked = false;
    c->stamped = false;
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(c->fd, req + off, len - off, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue; /* requests are small: the socket buffer takes them at once */
        if (n <= 0)
            return false;
        off += (size_t)n;
    }
    return true;
}

/* True when c holds a whole response; times a stream's first event on the way. */
static bool lconn_complete(struct lconn *c, uint64_t now, bool measure, struct samples *fb)
{
    if (!c->head_len) {
        char *eoh = strstr(c->buf, "\r\n\r\n");
        if (!eoh)
            return false;
        c->head_len = (size_t)(eoh + 4 - c->buf);
        char *cl = strcasestr(c->buf, "\r\ncontent-length:");
        char *te = strcasestr(c->buf, "\r\ntransfer-encoding: chunked");
        c->chunked = te && te < eoh;
        size_t body = cl && cl < eoh ? strtoul(cl + 17, NULL, 10) : 0;
        c->need = c->head_len + body;
    }
    if (!c->chunked)
        return c->got >= c->need;
    if (!c->stamped) {
        char *t = strstr(c->buf + c->head_len, "t=");
        char *end = t ? strchr(t, ';') : NULL;
        if (end) {
            uint64_t at = strtoull(t + 2, NULL, 10);
            c->stamped = true;
            if (measure && now > at)
                samples_add(fb, now - at);
        }
    }
    /* The zero-size chunk, in the body (the head may end in "0\r\n\r\n" too). */
    size_t body = c->got - c->head_len;
    const char *tail = c->buf + c->got;
    return (body == 5 && memcmp(tail - 5, "0\r\n\r\n", 5) == 0) ||
           (body > 5 && memcmp(tail - 7, "\r\n0\r\n\r\n", 7) == 0);
}

/* Runs the closed loop for `seconds` after `warmup_ms`; fills res. */
static int run_load(int port, pid_t router, const char *target, const char *req, unsigned nconns,
                    double seconds, int warmup_ms, struct result *res)
{
    struct lconn *cs = calloc(nconns, sizeof *cs);
    struct samples lat = {0}, fb = {0};
    int ep = epoll_create1(0);
    size_t req_len = strlen(req);
    uint64_t errors = 0;
    int rc = -1;
    if (!cs || ep < 0)
        goto out;
    for (unsigned i = 0; i < nconns; i++)
        cs[i].fd = -1;
    for (unsigned i = 0; i < nconns; i++) {
        cs[i].fd = lconn_open(port);
        if (cs[i].fd < 0)
            goto out;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    /* Let the connects finish before the first writes. */
    bench_sleep_ms(50);
    for (unsigned i = 0; i < nconns; i++)
        lconn_send(&cs[i], req, req_len);
    uint64_t t0 = pw_clock_mono_ns();
    uint64_t start = t0 + (uint64_t)warmup_ms * 1000000ull;
    uint64_t end = start + (uint64_t)(seconds * 1e9);
    struct epoll_event evs[256];
    for (;;) {
        uint64_t now = pw_clock_mono_ns();
        if (now >= end)
            break;
        int k = epoll_wait(ep, evs, 256, 100);
        for (int e = 0; e < k; e++) {
            struct lconn *c = &cs[evs[e].data.u32];
            ssize_t r = recv(c->fd, c->buf + c->got, sizeof c->buf - 1 - c->got, 0);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                fprintf(stderr, "bench: connection lost (%s)\n", r ? strerror(errno) : "EOF");
                goto out;
            }
            uint64_t got_ns = pw_clock_mono_ns();
            c->got += (size_t)r;
            c->buf[c->got] = '\0';
            bool measure = c->sent_ns >= start;
            if (!lconn_complete(c, got_ns, measure, &fb))
                continue;
            if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0 || strstr(c->buf, "\"error\""))
                errors++;
            if (measure && !samples_add(&lat, got_ns - c->sent_ns))
                goto out;
            if (!lconn_send(c, req, req_len))
                goto out;
        }
    }
    res->rss_end_kib = rss_kib(router);
    res->target = target;
    res->conns = nconns;
    res->n = lat.n;
    res->errors = errors;
    res->rps = lat.n / seconds;
    samples_pct(&lat, &res->p50_us, &res->p99_us);
    samples_pct(&fb, &res->fb_p50_us, &res->fb_p99_us);
    rc = 0;
out:
    for (unsigned i = 0; cs && i < nconns; i++)
        if (cs[i].fd >= 0)
            close(cs[i].fd);
    if (ep >= 0)
        close(ep);
    free(lat.v);
    free(fb.v);
    free(cs);
    /* Let the router see the closes before the next run. */
    bench_sleep_ms(100);
    return rc;
}

/* ---- the raw Redis round trip -------------------------------------------------------------- */

/* Queues slot's next request (pipelined on tx; the caller reads the replies). */
static bool raw_send(redisContext *tx, const char *q, const char *reply_key, unsigned slot,
                     uint32_t seq)
{
    char id[48];
    snprintf(id, sizeof id, "raw-%u-%u", slot, seq);
    Parkway__ChatMessage m = PARKWAY__CHAT_MESSAGE__INIT;
    Parkway__ChatMessage *ms[] = {&m};
    m.role = "user";
    m.content = "hi";
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    sp.max_tokens = 1;
    Parkway__InferenceRequest req = PARKWAY__INFERENCE_REQUEST__INIT;
    req.id = id;
    req.function = BENCH_FN;
    req.reply_to = (char *)reply_key;
    req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT;
    req.n_messages = 1;
    req.messages = ms;
    req.sampling = &sp;
    req.enqueued_unix_ms = pw_clock_wall_ms();
    uint8_t buf[1024];
    size_t len;
    if (pw_proto_pack_request(&req, buf, sizeof buf, &len, NULL) != PW_OK)
        return false;
    return redisAppendCommand(tx, "XADD %s * %s %b", q, PW_STREAM_FIELD, buf, len) == REDIS_OK;
}

static bool raw_flush(redisContext *tx, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        redisReply *x = NULL;
        if (redisGetReply(tx, (void **)&x) != REDIS_OK)
            return false;
        freeReplyObject(x);
    }
    return true;
}

/* nconns requests in flight: XADD to the function's queue, the fake engine answers, one
 * reader XREADs the reply stream and sends the slot's next request. */
static int run_raw(int redis_port, unsigned nconns, double seconds, int warmup_ms,
                   struct result *res)
{
    struct timeval tv = {5, 0};
    redisContext *tx = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    redisContext *rx = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    uint64_t *sent = calloc(nconns, sizeof *sent);
    uint32_t *seq = calloc(nconns, sizeof *seq);
    struct samples lat = {0};
    int rc = -1;
    if (!tx || tx->err || !rx || rx->err || !sent || !seq)
        goto out;
    int one = 1;
    setsockopt(tx->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(rx->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char q[PW_KEY_MAX], reply_key[PW_KEY_MAX], last[PW_STREAM_ID_MAX] = "0-0";
    pw_key_queue(q, sizeof q, BENCH_FN);
    pw_key_reply(reply_key, sizeof reply_key, BENCH_RAW_ID);
    freeReplyObject(redisCommand(rx, "DEL %s", reply_key));
    for (unsigned i = 0; i < nconns; i++) {
        sent[i] = pw_clock_mono_ns();
        if (!raw_send(tx, q, reply_key, i, seq[i]))
            goto out;
    }
    if (!raw_flush(tx, nconns))
        goto out;
    uint64_t start = pw_clock_mono_ns() + (uint64_t)warmup_ms * 1000000ull;
    uint64_t end = start + (uint64_t)(seconds * 1e9);
    while (pw_clock_mono_ns() < end) {
        redisReply *r =
            redisCommand(rx, "XREAD COUNT 512 BLOCK 100 STREAMS %s %s", reply_key, last);
        if (!r)
            goto out;
        struct pw_stream_entries *es = NULL;
        size_t queued = 0;
        if (r->type == REDIS_REPLY_ARRAY && pw_stream_parse_read(r, &es) == PW_OK) {
            uint64_t now = pw_clock_mono_ns();
            for (size_t i = 0; i < es->n; i++) {
                snprintf(last, sizeof last, "%s", es->v[i].id);
                const struct pw_slice *v = pw_stream_entry_get(&es->v[i], PW_STREAM_FIELD);
                Parkway__ReplyChunk *ch = NULL;
                if (!v || pw_proto_unpack_reply(v->ptr, v->len, 0, &ch) != PW_OK)
                    continue;
                unsigned slot = 0, s = 0;
                bool ok = sscanf(ch->request_id, "raw-%u-%u", &slot, &s) == 2 && slot < nconns &&
                          s == seq[slot];
                pw_proto_free_reply(ch);
                if (!ok)
                    continue;
                if (sent[slot] >= start && !samples_add(&lat, now - sent[slot]))
                    goto out_es;
                seq[slot]++;
                sent[slot] = pw_clock_mono_ns();
                if (!raw_send(tx, q, reply_key, slot, seq[slot]))
                    goto out_es;
                queued++;
            }
            /* The router's reply thread trims what it has read; so does this reader. */
            if (es->n && redisAppendCommand(tx, "XTRIM %s MINID %s", reply_key, last) == REDIS_OK)
                queued++;
        }
        pw_stream_entries_free(es);
        es = NULL;
        freeReplyObject(r);
        if (!raw_flush(tx, queued))
            goto out;
        continue;
    out_es:
        pw_stream_entries_free(es);
        freeReplyObject(r);
        goto out;
    }
    res->target = "raw";
    res->conns = nconns;
    res->n = lat.n;
    res->rps = lat.n / seconds;
    samples_pct(&lat, &res->p50_us, &res->p99_us);
    rc = 0;
out:
    /* Let the fake engine drain what is still in flight before the next run. */
    bench_sleep_ms(200);
    redisFree(tx);
    redisFree(rx);
    free(sent);
    free(seq);
    free(lat.v);
    return rc;
}

/* ---- set-up -------------------------------------------------------------------------------- */

static int seed(int redis_port, char key[PW_APIKEY_LEN + 1])
{
    struct timeval tv = {2, 0};
    redisContext *rc = NULL;
    for (int i = 0; i < 100; i++) {
        rc = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
        if (rc && !rc->err)
            break;
        redisFree(rc);
        rc = NULL;
        bench_sleep_ms(50);
    }
    if (!rc)
        return -1;
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_HEX_LEN + 1], id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_generate(key);
    pw_apikey_hash(key, strlen(key), hash);
    pw_hex_encode(hash, sizeof hash, hex);
    pw_apikey_id(hash, id);
    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = id;
    rec.tenant = "bench";
    uint8_t buf[512];
    size_t len;
    if (pw_proto_pack_key(&rec, buf, sizeof buf, &len, NULL) != PW_OK)
        return -1;
    freeReplyObject(redisCommand(rc, "HSET %s %s %b", PW_KEY_KEYS, hex, buf, len));
    freeReplyObject(redisCommand(rc, "HSET %s %s {}", PW_KEY_FUNCTIONS, BENCH_FN));
    redisFree(rc);
    return 0;
}

static bool router_ready(int port)
{
    static const char req[] = "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char buf[256] = "";
    bool ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
              send(fd, req, sizeof req - 1, MSG_NOSIGNAL) > 0 &&
              recv(fd, buf, sizeof buf - 1, 0) > 0 && strncmp(buf, "HTTP/1.1 200", 12) == 0;
    close(fd);
    return ok;
}

/* The run of target (0 healthz, 1 raw, 2 chat, 3 stream) at the ci-th connection count:
 * each count runs the four in order, so a count given twice is measured twice. */
static const struct result *run_of(const struct result *res, size_t nres, size_t ci, int target)
{
    size_t i = ci * 4 + (size_t)target;
    return i < nres ? &res[i] : NULL;
}

int main(int argc, char **argv)
{
    char router_bin[4096];
    ssize_t m = readlink("/proc/self/exe", router_bin, sizeof router_bin - 64);
    if (m <= 0)
        return 1;
    router_bin[m] = '\0';
    char *slash = strrchr(router_bin, '/');
    snprintf(slash, 64, "/../router/parkway-router");
    const char *router = router_bin, *conns_arg = "1,16,64,256", *threads = "2";
    double seconds = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--router") == 0)
            router = argv[i + 1];
        else if (strcmp(argv[i], "--seconds") == 0)
            seconds = atof(argv[i + 1]);
        else if (strcmp(argv[i], "--conns") == 0)
            conns_arg = argv[i + 1];
        else if (strcmp(argv[i], "--threads") == 0)
            threads = argv[i + 1];
        else {
            fprintf(stderr, "usage: bench_router [--router PATH] [--seconds S] "
                            "[--conns 1,16,64,256] [--threads T]\n");
            return 2;
        }
    }
    if (seconds <= 0 || seconds > 600) {
        fprintf(stderr, "bench_router: --seconds 0..600\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    char dir[] = "/tmp/pw-bench-router-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    int redis_port = bench_free_port(), http_port = bench_free_port();
    char rport[16], hport[16], rurl[64], rlog[128], hlog[128];
    snprintf(rport, sizeof rport, "%d", redis_port);
    snprintf(hport, sizeof hport, "%d", http_port);
    snprintf(rurl, sizeof rurl, "redis://127.0.0.1:%d", redis_port);
    snprintf(rlog, sizeof rlog, "%s/redis.log", dir);
    snprintf(hlog, sizeof hlog, "%s/router.log", dir);
    char *redis_argv[] = {"redis-server", "--port", rport,   "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no",     "--dir", dir,      NULL};
    pid_t redis = bench_spawn(redis_argv, rlog);
    char key[PW_APIKEY_LEN + 1];
    if (seed(redis_port, key) != 0) {
        fprintf(stderr, "bench_router: redis-server did not start (see %s)\n", rlog);
        stop_child(redis);
        return 1;
    }
    char *router_argv[] = {(char *)router, "--redis",       rurl,          "--port", hport,
                           "--threads",    (char *)threads, "--router-id", "bench",  NULL};
    setenv("PARKWAY_LOG_LEVEL", "warn", 1);
    pid_t rpid = bench_spawn(router_argv, hlog);
    int rc = 1;
    struct engine en = {.redis_port = redis_port};
    pthread_t eng;
    bool eng_started = false;
    double load_start = bench_loadavg1();
    for (int i = 0; i < 200 && !router_ready(http_port); i++)
        bench_sleep_ms(25);
    if (!router_ready(http_port)) {
        fprintf(stderr, "bench_router: the router did not start (%s; see %s)\n", router, hlog);
        goto out;
    }
    bench_sleep_ms(200); /* function snapshot */
    if (pthread_create(&eng, NULL, engine_main, &en) != 0)
        goto out;
    eng_started = true;

    char chat[1024], stream[1024], health[128];
    static const char body[] = "{\"model\":\"" BENCH_FN "\",\"messages\":[{\"role\":\"user\","
                               "\"content\":\"hi\"}],\"max_tokens\":1}";
    static const char sbody[] = "{\"model\":\"" BENCH_FN "\",\"messages\":[{\"role\":\"user\","
                                "\"content\":\"hi\"}],\"max_tokens\":1,\"stream\":true}";
    snprintf(chat, sizeof chat,
             "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
             key, sizeof body - 1, body);
    snprintf(stream, sizeof stream,
             "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
             key, sizeof sbody - 1, sbody);
    snprintf(health, sizeof health, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");

    struct result res[128];
    size_t nres = 0;
    unsigned conns[32];
    size_t nconns = 0;
    char list[256];
    snprintf(list, sizeof list, "%s", conns_arg);
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok && nconns < 32;
         tok = strtok_r(NULL, ",", &save)) {
        int nc = atoi(tok);
        if (nc >= 1 && nc <= BENCH_MAX_CONNS)
            conns[nconns++] = (unsigned)nc;
    }
    long rss_start = rss_kib(rpid), rss_before_streams = -1, rss_after = -1, rss_peak = 0;
    printf("%-8s %6s %10s %10s %10s %8s %12s %12s\n", "target", "conns", "req/s", "p50_us",
           "p99_us", "errors", "fb_p50_us", "fb_p99_us");
    for (size_t ci = 0; ci < nconns; ci++) {
        unsigned nc = conns[ci];
        const char *targets[] = {"healthz", "raw", "chat", "stream"};
        const char *reqs[] = {health, NULL, chat, stream};
        for (int t = 0; t < 4; t++) {
            struct result *r = &res[nres];
            memset(r, 0, sizeof *r);
            if (t == 3 && rss_before_streams < 0)
                rss_before_streams = rss_kib(rpid);
            int e = t == 1 ? run_raw(redis_port, nc, seconds, 300, r)
                           : run_load(http_port, rpid, targets[t], reqs[t], nc, seconds, 300, r);
            if (e != 0) {
                fprintf(stderr, "bench_router: %s with %u connections failed\n", targets[t], nc);
                goto out;
            }
            if (t == 3 && r->rss_end_kib > rss_peak)
                rss_peak = r->rss_end_kib;
            if (t == 3)
                printf("%-8s %6u %10.0f %10.0f %10.0f %8" PRIu64 " %12.0f %12.0f\n", r->target,
                       r->conns, r->rps, r->p50_us, r->p99_us, r->errors, r->fb_p50_us,
                       r->fb_p99_us);
            else
                printf("%-8s %6u %10.0f %10.0f %10.0f %8" PRIu64 " %12s %12s\n", r->target,
                       r->conns, r->rps, r->p50_us, r->p99_us, r->errors, "-", "-");
            fflush(stdout);
            nres++;
        }
    }
    rss_after = rss_kib(rpid);
    double load_end = bench_loadavg1();
    printf("\n%-6s %16s %14s\n", "conns", "chat-raw_p50_us", "chat/raw_rps");
    for (size_t ci = 0; ci < nconns; ci++) {
        const struct result *raw = run_of(res, nres, ci, 1), *ch = run_of(res, nres, ci, 2);
        if (raw && ch)
            printf("%-6u %16.0f %14.2f\n", conns[ci], ch->p50_us - raw->p50_us,
                   raw->rps > 0 ? ch->rps / raw->rps : 0);
    }
    /* A count given several times: the median over its rounds (each round measures raw
     * and chat back to back, so a round is a paired comparison and drift cancels). */
    double med_added[32], med_ratio[32];
    unsigned med_conns[32], med_rounds[32];
    size_t nmed = 0;
    for (size_t ci = 0; ci < nconns; ci++) {
        bool seen = false;
        for (size_t k = 0; k < nmed; k++)
            seen |= med_conns[k] == conns[ci];
        if (seen)
            continue;
        double added[32], ratio[32];
        unsigned n = 0;
        for (size_t cj = ci; cj < nconns; cj++) {
            const struct result *raw = run_of(res, nres, cj, 1), *ch = run_of(res, nres, cj, 2);
            if (conns[cj] != conns[ci] || !raw || !ch)
                continue;
            added[n] = ch->p50_us - raw->p50_us;
            ratio[n++] = raw->rps > 0 ? ch->rps / raw->rps : 0;
        }
        if (n < 2)
            continue;
        med_conns[nmed] = conns[ci];
        med_rounds[nmed] = n;
        med_added[nmed] = bench_median(added, n);
        med_ratio[nmed++] = bench_median(ratio, n);
    }
    if (nmed) {
        printf("\n%-6s %6s %24s %21s\n", "conns", "rounds", "median chat-raw_p50_us",
               "median chat/raw_rps");
        for (size_t k = 0; k < nmed; k++)
            printf("%-6u %6u %24.0f %21.2f\n", med_conns[k], med_rounds[k], med_added[k],
                   med_ratio[k]);
    }
    printf("\nrouter RSS KiB: start %ld, before streams %ld, peak at the end of a stream run "
           "%ld, after %ld\nload average (1 min): %.2f at start, %.2f at end\n",
           rss_start, rss_before_streams, rss_peak, rss_after, load_start, load_end);

    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    printf("{\"bench\":\"router\",\"router_threads\":%s,\"cpus\":%ld,\"seconds\":%.1f,"
           "\"loadavg_start\":%.2f,\"loadavg_end\":%.2f,\"rss_kib\":{\"start\":%ld,"
           "\"before_streams\":%ld,\"stream_peak\":%ld,\"after\":%ld},\"results\":[",
           threads, ncpu, seconds, load_start, load_end, rss_start, rss_before_streams, rss_peak,
           rss_after);
    for (size_t i = 0; i < nres; i++) {
        printf("%s{\"target\":\"%s\",\"conns\":%u,\"rps\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,"
               "\"errors\":%" PRIu64,
               i ? "," : "", res[i].target, res[i].conns, res[i].rps, res[i].p50_us, res[i].p99_us,
               res[i].errors);
        if (strcmp(res[i].target, "stream") == 0)
            printf(",\"first_byte_p50_us\":%.0f,\"first_byte_p99_us\":%.0f,\"rss_end_kib\":%ld",
                   res[i].fb_p50_us, res[i].fb_p99_us, res[i].rss_end_kib);
        printf("}");
    }
    printf("],\"overhead\":[");
    bool first = true;
    for (size_t ci = 0; ci < nconns; ci++) {
        const struct result *raw = run_of(res, nres, ci, 1), *ch = run_of(res, nres, ci, 2);
        if (!raw || !ch)
            continue;
        printf("%s{\"conns\":%u,\"added_p50_us\":%.0f,\"rps_ratio\":%.2f}", first ? "" : ",",
               conns[ci], ch->p50_us - raw->p50_us, raw->rps > 0 ? ch->rps / raw->rps : 0);
        first = false;
    }
    printf("]");
    if (nmed) {
        printf(",\"overhead_median\":[");
        for (size_t k = 0; k < nmed; k++)
            printf("%s{\"conns\":%u,\"rounds\":%u,\"added_p50_us\":%.0f,\"rps_ratio\":%.2f}",
                   k ? "," : "", med_conns[k], med_rounds[k], med_added[k], med_ratio[k]);
        printf("]");
    }
    printf("}\n");
    rc = 0;
out:
    atomic_store(&en.stop, 1);
    if (eng_started)
        pthread_join(eng, NULL);
    stop_child(rpid);
    stop_child(redis);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        rc = rc ? rc : 1;
    return rc;
}

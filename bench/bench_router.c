/*
 * bench_router: the router's own overhead on loopback.
 *
 * Starts a private redis-server and parkway-router, registers one function and one API key,
 * and runs a fake engine thread that answers every queued request at once (XREADGROUP, one
 * ReplyChunk XADDed to the request's reply stream, XACK), so what is measured is HTTP +
 * JSON + Redis queue + reply path, not inference. The load generator is one epoll thread
 * driving N keep-alive connections, each with one request in flight (closed loop), and
 * records every request's latency.
 *
 * Targets, for each connection count:
 *   healthz  GET /healthz: HTTP only, no Redis (the baseline)
 *   chat     POST /v1/chat/completions, non-stream, max_tokens 1, through the fake engine
 * Prints a table, then one JSON line {"bench":"router",...}.
 *
 *   bench_router [--router PATH] [--seconds S] [--conns 1,16,64] [--threads T]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
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
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"

#define BENCH_FN "bench"
#define BENCH_MAX_CONNS 1024

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    close(fd);
    return ntohs(a.sin_port);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static pid_t spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static void stop_child(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (int i = 0; i < 200; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        sleep_ms(25);
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
    char q[PW_KEY_MAX];
    pw_key_queue(q, sizeof q, BENCH_FN);
    freeReplyObject(redisCommand(rc, "XGROUP CREATE %s %s 0 MKSTREAM", q, PW_GROUP_ENGINES));
    while (!atomic_load(&en->stop)) {
        redisReply *r = redisCommand(rc, "XREADGROUP GROUP %s e COUNT 256 BLOCK 100 STREAMS %s >",
                                     PW_GROUP_ENGINES, q);
        if (!r)
            break;
        struct pw_stream_entries *es = NULL;
        if (r->type == REDIS_REPLY_ARRAY && pw_stream_parse_read(r, &es) == PW_OK && es->n) {
            size_t pending = 0;
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
                ch.text = "ok";
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

/* ---- the load generator ------------------------------------------------------------------ */

struct lconn {
    int fd;
    uint64_t sent_ns;
    size_t got;      /* bytes of the current response received */
    size_t need;     /* head + Content-Length once the head is in; 0 before */
    char buf[16384]; /* the current response */
};

struct result {
    const char *target;
    unsigned conns;
    double rps;
    double p50_us, p99_us;
    uint64_t n, errors;
};

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

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

/* Runs the closed loop for `seconds` after `warmup_ms`; fills res. */
static int run_load(int port, const char *target, const char *req, unsigned nconns, double seconds,
                    int warmup_ms, struct result *res)
{
    struct lconn *cs = calloc(nconns, sizeof *cs);
    size_t cap = 1 << 20, n = 0;
    uint32_t *lat = malloc(cap * sizeof *lat);
    int ep = epoll_create1(0);
    size_t req_len = strlen(req);
    uint64_t errors = 0;
    if (!cs || !lat || ep < 0)
        return -1;
    for (unsigned i = 0; i < nconns; i++) {
        cs[i].fd = lconn_open(port);
        if (cs[i].fd < 0)
            return -1;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    /* Let the connects finish before the first writes. */
    sleep_ms(50);
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
                return -1;
            }
            c->got += (size_t)r;
            c->buf[c->got] = '\0';
            if (!c->need) {
                char *eoh = strstr(c->buf, "\r\n\r\n");
                if (!eoh)
                    continue;
                char *cl = strcasestr(c->buf, "\r\ncontent-length:");
                size_t body = cl && cl < eoh ? strtoul(cl + 17, NULL, 10) : 0;
                c->need = (size_t)(eoh + 4 - c->buf) + body;
            }
            if (c->got < c->need)
                continue;
            uint64_t done = pw_clock_mono_ns();
            if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0)
                errors++;
            if (c->sent_ns >= start) {
                if (n == cap) {
                    cap *= 2;
                    lat = realloc(lat, cap * sizeof *lat);
                    if (!lat)
                        return -1;
                }
                uint64_t us = (done - c->sent_ns) / 1000;
                lat[n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
            }
            if (!lconn_send(c, req, req_len))
                return -1;
        }
    }
    for (unsigned i = 0; i < nconns; i++)
        close(cs[i].fd);
    close(ep);
    qsort(lat, n, sizeof *lat, cmp_u32);
    res->target = target;
    res->conns = nconns;
    res->n = n;
    res->errors = errors;
    res->rps = n / seconds;
    res->p50_us = n ? lat[n / 2] : 0;
    res->p99_us = n ? lat[(size_t)((double)n * 0.99)] : 0;
    free(lat);
    free(cs);
    /* Let the router see the closes before the next run. */
    sleep_ms(100);
    return 0;
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
        sleep_ms(50);
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

int main(int argc, char **argv)
{
    char router_bin[4096];
    ssize_t m = readlink("/proc/self/exe", router_bin, sizeof router_bin - 64);
    if (m <= 0)
        return 1;
    router_bin[m] = '\0';
    char *slash = strrchr(router_bin, '/');
    snprintf(slash, 64, "/../router/parkway-router");
    const char *router = router_bin, *conns_arg = "1,16,64", *threads = "2";
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
            fprintf(stderr, "usage: bench_router [--router PATH] [--seconds S] [--conns 1,16,64] "
                            "[--threads T]\n");
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
    int redis_port = free_port(), http_port = free_port();
    char rport[16], hport[16], rurl[64], rlog[128], hlog[128];
    snprintf(rport, sizeof rport, "%d", redis_port);
    snprintf(hport, sizeof hport, "%d", http_port);
    snprintf(rurl, sizeof rurl, "redis://127.0.0.1:%d", redis_port);
    snprintf(rlog, sizeof rlog, "%s/redis.log", dir);
    snprintf(hlog, sizeof hlog, "%s/router.log", dir);
    char *redis_argv[] = {"redis-server", "--port", rport,   "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no",     "--dir", dir,      NULL};
    pid_t redis = spawn(redis_argv, rlog);
    char key[PW_APIKEY_LEN + 1];
    if (seed(redis_port, key) != 0) {
        fprintf(stderr, "bench_router: redis-server did not start (see %s)\n", rlog);
        stop_child(redis);
        return 1;
    }
    char *router_argv[] = {(char *)router, "--redis",       rurl,          "--port", hport,
                           "--threads",    (char *)threads, "--router-id", "bench",  NULL};
    setenv("PARKWAY_LOG_LEVEL", "warn", 1);
    pid_t rpid = spawn(router_argv, hlog);
    int rc = 1;
    struct engine en = {.redis_port = redis_port};
    pthread_t eng;
    bool eng_started = false;
    for (int i = 0; i < 200 && !router_ready(http_port); i++)
        sleep_ms(25);
    if (!router_ready(http_port)) {
        fprintf(stderr, "bench_router: the router did not start (%s; see %s)\n", router, hlog);
        goto out;
    }
    sleep_ms(200); /* function snapshot */
    if (pthread_create(&eng, NULL, engine_main, &en) != 0)
        goto out;
    eng_started = true;

    char chat[1024], health[128];
    static const char body[] = "{\"model\":\"" BENCH_FN "\",\"messages\":[{\"role\":\"user\","
                               "\"content\":\"hi\"}],\"max_tokens\":1}";
    snprintf(chat, sizeof chat,
             "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
             "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
             key, sizeof body - 1, body);
    snprintf(health, sizeof health, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");

    struct result res[64];
    size_t nres = 0;
    char list[256];
    snprintf(list, sizeof list, "%s", conns_arg);
    printf("%-8s %6s %10s %10s %10s %8s\n", "target", "conns", "req/s", "p50_us", "p99_us",
           "errors");
    for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok && nres + 2 <= 64;
         tok = strtok_r(NULL, ",", &save)) {
        unsigned nc = (unsigned)atoi(tok);
        if (nc < 1 || nc > BENCH_MAX_CONNS)
            continue;
        const char *targets[] = {"healthz", "chat"};
        const char *reqs[] = {health, chat};
        for (int t = 0; t < 2; t++) {
            struct result *r = &res[nres];
            if (run_load(http_port, targets[t], reqs[t], nc, seconds, 300, r) != 0) {
                fprintf(stderr, "bench_router: %s with %u connections failed\n", targets[t], nc);
                goto out;
            }
            printf("%-8s %6u %10.0f %10.0f %10.0f %8" PRIu64 "\n", r->target, r->conns, r->rps,
                   r->p50_us, r->p99_us, r->errors);
            fflush(stdout);
            nres++;
        }
    }
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    printf("{\"bench\":\"router\",\"router_threads\":%s,\"cpus\":%ld,\"seconds\":%.1f,"
           "\"results\":[",
           threads, ncpu, seconds);
    for (size_t i = 0; i < nres; i++)
        printf("%s{\"target\":\"%s\",\"conns\":%u,\"rps\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,"
               "\"errors\":%" PRIu64 "}",
               i ? "," : "", res[i].target, res[i].conns, res[i].rps, res[i].p50_us, res[i].p99_us,
               res[i].errors);
    printf("]}\n");
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

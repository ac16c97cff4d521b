/*
 * router_http: HTTP/1.1 server layer. See router_http.h for the API and
 * docs/internals/http.md for the design (threads, states, ownership, limits, defences).
 *
 * Threading: one struct worker per thread, each with its own event_base, listening socket,
 * connections and requests. Nothing here is shared between workers except the server's
 * atomic counters, the read-only config and TLS context, and each worker's task queue
 * (mutex + eventfd), which is how other threads reach a worker.
 *
 * Invariants:
 *  - Nothing is freed synchronously from inside a call that someone else is still in: a
 *    connection is torn down only from its own "kick" event (conn_kill marks it dead and
 *    activates kick); llhttp callbacks only record state; handler calls only queue output
 *    and schedule the kick.
 *  - A request is parsed only when the previous response on that connection is finished
 *    (pipelined bytes wait in the input buffer), so responses go out strictly in order.
 *  - A request (struct router_req) is freed when neither the connection (conn_holds) nor the
 *    handler (handler_holds) holds it.
 */
#include "router_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <llhttp.h>
#include <openssl/ssl.h>

#include "pw_clock.h"
#include "pw_log.h"
#include "router_tls.h"

/* ---------------------------------------------------------------------------------------- */
/* Types                                                                                    */
/* ---------------------------------------------------------------------------------------- */

#define ARENA_ALIGN 16u
#define ARENA_BLOCK 4096u        /* bytes per ordinary arena block (the first holds the req) */
#define ARENA_CACHE 64u          /* ordinary blocks a worker keeps for reuse */
#define READ_HIGH_WATER 65536u   /* input bytes buffered while a request is in the handler */
#define LINGER_MS 1000u          /* lingering close: read and discard this long at most */
#define LINGER_MAX_BYTES 1048576 /* ... or this many bytes */
#define HEAD_SLACK 4096u         /* raw head bytes tolerated beyond max_header_bytes */
#define SPOOL_BUF 65536u         /* spooled body bytes gathered before one write(2) */

struct arena_blk {
    struct arena_blk *next;
    size_t cap;  /* usable bytes after the aligned header */
    size_t used; /* bytes handed out */
};

#define ARENA_HDR ((sizeof(struct arena_blk) + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1))

struct arena {
    struct arena_blk *cur;  /* block small allocations come from */
    struct arena_blk *list; /* every block, for freeing */
};

/* A header while parsing: offsets into req->head (the buffer moves as it grows). */
struct hdr_off {
    size_t name_off, name_len;
    size_t val_off, val_len;
};

enum resp_state {
    RESP_NONE = 0,  /* nothing sent */
    RESP_STREAMING, /* stream_begin done; chunks may follow */
    RESP_DONE,      /* the whole response is queued */
};

struct conn;

struct router_req {
    struct router_http_request pub; /* first: the handler's pointer is this */
    struct arena arena;             /* one arena; the req itself is in its first block */
    struct conn *conn;              /* NULL once the connection let go */
    struct worker *w;               /* owning worker */
    bool conn_holds;                /* the connection's reference */
    bool handler_holds;             /* the handler's reference (dispatch to terminal call) */
    bool lost;                      /* connection gone: output is discarded */
    bool headers_done;              /* on_headers_complete ran */
    bool complete;                  /* on_message_complete ran */
    bool keep_alive;                /* llhttp_should_keep_alive at headers complete */
    bool is_head;                   /* HEAD: no response body */
    bool chunked_out;               /* streaming with chunked encoding (HTTP/1.1) */
    bool fixed_out;                 /* streaming a body of announced length (out_left) */
    uint64_t out_left;              /* fixed_out: body bytes still to come */
    enum resp_state resp;
    router_http_cancel_fn cancel; /* set by the handler; called at most once */
    void *cancel_ud;
    router_http_drain_fn drain; /* set by a streaming handler: output all written */
    void *drain_ud;
    /* parse scratch, heap (realloc while parsing, stable after dispatch; freed with req) */
    char *head; /* url\0 name\0 value\0 ... */
    size_t head_len, head_cap;
    size_t url_len;
    struct hdr_off *hdrs;
    size_t n_hdrs, hdrs_cap;
    int hdr_state;        /* 0 between headers, 1 in a name, 2 in a value */
    bool val_cut;         /* the last value span stopped before the end of the input */
    size_t trailer_bytes; /* chunked trailers are counted, not kept */
    char *body;
    size_t body_len, body_cap;
    bool view_built; /* pub's method/path/headers/remote_addr are set (build_view) */
    /* spooled body (router_http_spool): bytes go to spool_fd, gathered in spool_buf */
    int spool_fd;         /* -1: the body is in memory */
    uint64_t spool_limit; /* the predicate's limit, bytes */
    uint64_t spool_len;   /* body bytes received so far */
    char *spool_buf;      /* SPOOL_BUF bytes while reading the body; freed at the end */
    size_t spool_buf_len;
};

enum conn_state {
    C_IDLE = 0, /* waiting for a request's first byte (new or keep-alive) */
    C_HEAD,     /* reading request line and headers */
    C_BODY,     /* reading the body */
    C_HANDLER,  /* request handed over; response not finished */
    C_CLOSING,  /* last response queued; close once it is written */
    C_LINGER,   /* written and shut down for writing; discarding input until EOF */
};

struct worker;

struct conn {
    struct worker *w;
    struct conn *prev, *next; /* worker's list */
    struct bufferevent *bev;
    evutil_socket_t fd;
    bool tls;
    bool dead;     /* being torn down; freed by the kick event */
    bool upgraded; /* llhttp saw an Upgrade: no more HTTP after this request */
    /* Plain TCP writes straight from the kick event (conn_flush); the bufferevent's write
     * event is enabled only while a short write left output behind. */
    bool write_armed;
    enum conn_state state;
    llhttp_t parser;
    struct event *timer; /* header / body / idle / linger deadline, by state */
    struct event *kick;  /* deferred state machine step and teardown */
    struct router_req *req;
    unsigned nreq;        /* requests finished on this connection */
    size_t head_fed;      /* raw bytes fed while in C_HEAD */
    size_t discarded;     /* bytes discarded while closing */
    const char *feed_end; /* end of the bytes in the current llhttp_execute call */
    int err_status;       /* set by llhttp callbacks to fail the request */
    const char *err_code;
    const char *err_msg;
    char remote[64];
};

struct task {
    struct task *next;
    router_http_task_fn fn;
    void *arg;
};

struct worker {
    struct router_http_server *srv;
    unsigned idx;
    struct event_base *base;
    evutil_socket_t listen_fd; /* owned by listener once it exists */
    struct evconnlistener *listener;
    struct event *accept_retry; /* re-enables accepting after EMFILE and friends */
    int efd;                    /* eventfd: tasks queued or stop requested */
    struct event *efd_ev;
    pthread_mutex_t mu; /* guards tasks and closed */
    struct task *task_head, *task_tail;
    bool closed; /* the loop has exited: post() refuses */
    struct conn *conns;
    unsigned n_conns;
    bool draining;
    struct event *drain_timer;
    pthread_t thread;
    bool thread_started;
    uint64_t rng[2]; /* xorshift128+ for request ids */
    time_t date_sec;
    char date[40]; /* "Date: ...\r\n" for date_sec */
    /* Freed ARENA_BLOCK-sized blocks kept for the next requests (this worker's thread
     * only): a request's first block no longer costs a malloc and a free. */
    struct arena_blk *blk_cache;
    unsigned n_blk_cache;
};

struct router_http_server {
    struct router_http_config cfg; /* strings below are our copies */
    char *host, *cert, *key, *spool_dir;
    router_http_handler_fn handler;
    void *handler_ud;
    SSL_CTX *ssl_ctx; /* NULL: plain TCP */
    unsigned n_workers;
    struct worker *workers;
    uint16_t port;
    atomic_uint n_conns;
    atomic_bool stopping;
    bool ran;
};

static const llhttp_settings_t parser_settings;

static void conn_parse(struct conn *c);
static void conn_kill(struct conn *c);

/* ---------------------------------------------------------------------------------------- */
/* Pure helpers                                                                             */
/* ---------------------------------------------------------------------------------------- */

const char *router_http_status_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 202:
        return "Accepted";
    case 204:
        return "No Content";
    case 301:
        return "Moved Permanently";
    case 302:
        return "Found";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 409:
        return "Conflict";
    case 411:
        return "Length Required";
    case 413:
        return "Content Too Large";
    case 414:
        return "URI Too Long";
    case 415:
        return "Unsupported Media Type";
    case 417:
        return "Expectation Failed";
    case 422:
        return "Unprocessable Content";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 499:
        return "Client Closed Request";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    case 507:
        return "Insufficient Storage";
    default:
        return "Unknown";
    }
}

bool router_http_request_id_valid(const char *s, size_t len)
{
    if (!s || len == 0 || len > ROUTER_HTTP_REQUEST_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        if (!ok)
            return false;
    }
    return true;
}

/* Appender that counts what it would have written past cap. */
struct sbuf {
    char *p;
    size_t cap, len;
};

static void sb_putc(struct sbuf *sb, char ch)
{
    if (sb->len + 1 < sb->cap)
        sb->p[sb->len] = ch;
    sb->len++;
}

static void sb_puts(struct sbuf *sb, const char *s)
{
    while (*s)
        sb_putc(sb, *s++);
}

static void sb_json_str(struct sbuf *sb, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    sb_putc(sb, '"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            sb_putc(sb, '\\');
            sb_putc(sb, (char)ch);
        } else if (ch == '\n') {
            sb_puts(sb, "\\n");
        } else if (ch == '\r') {
            sb_puts(sb, "\\r");
        } else if (ch == '\t') {
            sb_puts(sb, "\\t");
        } else if (ch < 0x20 || ch == 0x7f) {
            sb_puts(sb, "\\u00");
            sb_putc(sb, hex[ch >> 4]);
            sb_putc(sb, hex[ch & 15]);
        } else {
            sb_putc(sb, (char)ch);
        }
    }
    sb_putc(sb, '"');
}

size_t router_http_error_json(char *buf, size_t cap, const char *type, const char *code,
                              const char *message)
{
    struct sbuf sb = {buf, cap, 0};
    sb_puts(&sb, "{\"error\":{\"message\":");
    sb_json_str(&sb, message ? message : "");
    sb_puts(&sb, ",\"type\":");
    sb_json_str(&sb, type ? type : "invalid_request_error");
    sb_puts(&sb, ",\"param\":null,\"code\":");
    if (code)
        sb_json_str(&sb, code);
    else
        sb_puts(&sb, "null");
    sb_puts(&sb, "}}");
    if (cap > 0)
        buf[sb.len < cap ? sb.len : cap - 1] = '\0';
    return sb.len;
}

static bool is_tchar(unsigned char ch)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
        return true;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static bool field_valid(const struct router_http_field *f)
{
    if (!f->name || !f->value || !f->name[0])
        return false;
    for (const char *p = f->name; *p; p++)
        if (!is_tchar((unsigned char)*p))
            return false;
    for (const char *p = f->value; *p; p++)
        if (*p == '\r' || *p == '\n')
            return false;
    return true;
}

/* Framing and id headers belong to this layer. */
static bool field_reserved(const char *name)
{
    return !strcasecmp(name, "content-length") || !strcasecmp(name, "transfer-encoding") ||
           !strcasecmp(name, "connection") || !strcasecmp(name, "x-request-id") ||
           !strcasecmp(name, "date");
}

/* ---------------------------------------------------------------------------------------- */
/* Arena                                                                                    */
/* ---------------------------------------------------------------------------------------- */

static size_t align_up(size_t n)
{
    return (n + ARENA_ALIGN - 1) & ~(size_t)(ARENA_ALIGN - 1);
}

static void *arena_alloc(struct arena *a, size_t n)
{
    if (n > SIZE_MAX / 4)
        return NULL;
    n = align_up(n ? n : 1);
    struct arena_blk *b = a->cur;
    if (b && b->cap - b->used >= n) {
        void *p = (char *)b + ARENA_HDR + b->used;
        b->used += n;
        return p;
    }
    /* Large allocations get a block of their own and leave the current block current. */
    bool own = n > ARENA_BLOCK / 2;
    size_t cap = own ? n : ARENA_BLOCK - ARENA_HDR;
    b = malloc(ARENA_HDR + cap);
    if (!b)
        return NULL;
    b->cap = cap;
    b->used = n;
    b->next = a->list;
    a->list = b;
    if (!own)
        a->cur = b;
    return (char *)b + ARENA_HDR;
}

static char *arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *p = arena_alloc(a, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ---------------------------------------------------------------------------------------- */
/* Requests                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static struct router_req *req_of(struct router_http_request *pub)
{
    return (struct router_req *)pub;
}

static const struct router_req *req_of_const(const struct router_http_request *pub)
{
    return (const struct router_req *)pub;
}

static struct router_req *req_new(struct worker *w)
{
    struct arena_blk *b = w->blk_cache;
    if (b) {
        w->blk_cache = b->next;
        w->n_blk_cache--;
    } else if (!(b = malloc(ARENA_BLOCK))) {
        return NULL;
    }
    b->cap = ARENA_BLOCK - ARENA_HDR;
    b->next = NULL;
    b->used = align_up(sizeof(struct router_req));
    struct router_req *r = (struct router_req *)((char *)b + ARENA_HDR);
    memset(r, 0, sizeof *r);
    r->arena.cur = b;
    r->arena.list = b;
    r->w = w;
    r->pub.worker = w->idx;
    r->pub.query = "";
    r->pub.body = "";
    r->pub.body_fd = -1;
    r->spool_fd = -1;
    r->pub.start_ns = pw_clock_mono_ns();
    return r;
}

static void req_free(struct router_req *r)
{
    if (!r)
        return;
    free(r->head);
    free(r->hdrs);
    free(r->body);
    free(r->spool_buf);
    if (r->spool_fd >= 0)
        close(r->spool_fd); /* unlinked: the last close frees its blocks */
    /* r lives in one of these blocks: read the list head and the worker first. */
    struct worker *w = r->w;
    struct arena_blk *b = r->arena.list;
    while (b) {
        struct arena_blk *next = b->next;
        if (b->cap == ARENA_BLOCK - ARENA_HDR && w->n_blk_cache < ARENA_CACHE) {
            b->next = w->blk_cache;
            w->blk_cache = b;
            w->n_blk_cache++;
        } else {
            free(b);
        }
        b = next;
    }
}

/* Grows a heap buffer to hold need bytes, doubling, never past limit. */
static bool grow(char **buf, size_t *cap, size_t need, size_t limit)
{
    if (need <= *cap)
        return true;
    if (need > limit)
        return false;
    size_t ncap = *cap ? *cap : 1024;
    while (ncap < need)
        ncap *= 2;
    if (ncap > limit)
        ncap = limit;
    char *p = realloc(*buf, ncap);
    if (!p)
        return false;
    *buf = p;
    *cap = ncap;
    return true;
}

const char *router_http_request_header(const struct router_http_request *req, const char *name)
{
    for (size_t i = 0; i < req->n_headers; i++)
        if (!strcasecmp(req->headers[i].name, name))
            return req->headers[i].value;
    return NULL;
}

void *router_http_request_alloc(struct router_http_request *req, size_t n)
{
    return arena_alloc(&req_of(req)->arena, n);
}

void router_http_request_set_cancel(struct router_http_request *req, router_http_cancel_fn fn,
                                    void *ud)
{
    struct router_req *r = req_of(req);
    r->cancel = fn;
    r->cancel_ud = ud;
}

static bool req_alive(const struct router_req *r)
{
    return r->conn && !r->lost && !r->conn->dead;
}

bool router_http_request_closed(const struct router_http_request *req)
{
    return !req_alive(req_of_const(req));
}

struct event_base *router_http_request_base(const struct router_http_request *req)
{
    return req_of_const(req)->w->base;
}

/* ---------------------------------------------------------------------------------------- */
/* Worker helpers                                                                           */
/* ---------------------------------------------------------------------------------------- */

static uint64_t rng_next(struct worker *w)
{
    uint64_t s1 = w->rng[0];
    const uint64_t s0 = w->rng[1];
    w->rng[0] = s0;
    s1 ^= s1 << 23;
    w->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return w->rng[1] + s0;
}

/* 32 hex characters (16 random bytes) into out[33]. */
static void gen_request_id(struct worker *w, char *out)
{
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        uint64_t v = rng_next(w);
        for (int i = 0; i < 16; i++) {
            out[half * 16 + i] = hex[v & 15];
            v >>= 4;
        }
    }
    out[32] = '\0';
}

/* "Date: <IMF-fixdate>\r\n", cached per second. */
static const char *date_line(struct worker *w)
{
    time_t now = time(NULL);
    if (now != w->date_sec || !w->date[0]) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(w->date, sizeof w->date, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        w->date_sec = now;
    }
    return w->date;
}

static void arm_timer(struct conn *c, uint32_t ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(c->timer, &tv);
}

static void conn_schedule(struct conn *c)
{
    event_active(c->kick, EV_TIMEOUT, 1);
}

static size_t out_len(const struct conn *c)
{
    return evbuffer_get_length(bufferevent_get_output(c->bev));
}

static void out_str(struct evbuffer *o, const char *s)
{
    evbuffer_add(o, s, strlen(s));
}

/* ---------------------------------------------------------------------------------------- */
/* Writing responses                                                                        */
/* ---------------------------------------------------------------------------------------- */

enum framing {
    FRAME_LENGTH,  /* Content-Length: clen */
    FRAME_NONE,    /* no body allowed (1xx, 204, 304) */
    FRAME_CHUNKED, /* Transfer-Encoding: chunked */
    FRAME_CLOSE,   /* body until close (HTTP/1.0 stream) */
};

static void write_head(struct conn *c, int status, const char *request_id,
                       const struct router_http_field *h, size_t n, enum framing framing,
                       size_t clen, bool keep_alive)
{
    struct evbuffer *o = bufferevent_get_output(c->bev);
    char line[160];
    int k = snprintf(line, sizeof line, "HTTP/1.1 %d %s\r\n", status,
                     router_http_status_reason(status));
    evbuffer_add(o, line, (size_t)k);
    out_str(o, date_line(c->w));
    for (size_t i = 0; i < n; i++) {
        if (field_reserved(h[i].name))
            continue;
        out_str(o, h[i].name);
        evbuffer_add(o, ": ", 2);
        out_str(o, h[i].value);
        evbuffer_add(o, "\r\n", 2);
    }
    if (framing == FRAME_LENGTH) {
        k = snprintf(line, sizeof line, "Content-Length: %zu\r\n", clen);
        evbuffer_add(o, line, (size_t)k);
    } else if (framing == FRAME_CHUNKED) {
        out_str(o, "Transfer-Encoding: chunked\r\n");
    }
    out_str(o, keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
    out_str(o, "x-request-id: ");
    out_str(o, request_id);
    evbuffer_add(o, "\r\n\r\n", 4);
}

static bool status_has_body(int status)
{
    return status >= 200 && status != 204 && status != 304;
}

static const char *default_type(int status)
{
    return status >= 500 ? "server_error" : "invalid_request_error";
}

/* Queues a layer-generated error and moves the connection to C_CLOSING. */
static void conn_fail(struct conn *c, int status, const char *code, const char *msg)
{
    if (c->dead || c->state == C_CLOSING || c->state == C_LINGER)
        return;
    char idbuf[40];
    const char *rid = c->req ? c->req->pub.request_id : NULL;
    if (!rid) {
        gen_request_id(c->w, idbuf);
        rid = idbuf;
    }
    char json[512];
    size_t jl = router_http_error_json(json, sizeof json, default_type(status), code, msg);
    if (jl >= sizeof json)
        jl = sizeof json - 1;
    static const struct router_http_field ct = {"Content-Type", "application/json"};
    write_head(c, status, rid, &ct, 1, FRAME_LENGTH, jl, false);
    if (!(c->req && c->req->is_head))
        evbuffer_add(bufferevent_get_output(c->bev), json, jl);
    PW_LOG_DEBUG("event=http_error status=%d code=%s request_id=%s remote=%s", status, code, rid,
                 c->remote);
    c->state = C_CLOSING;
    arm_timer(c, c->w->srv->cfg.write_timeout_ms);
    conn_schedule(c);
}

/* Output and linger are done: shut the write side and discard input for a while so a
 * client still sending (a body we refused) reads our answer before any RST. */
static void conn_closing_flushed(struct conn *c)
{
    if (c->tls) {
        conn_kill(c);
        return;
    }
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    arm_timer(c, LINGER_MS);
}

/* ---------------------------------------------------------------------------------------- */
/* The handler's view of a request                                                          */
/* ---------------------------------------------------------------------------------------- */

/* Sets method, target, path, query, headers and remote_addr of the public request from the
 * parse scratch. The head buffer no longer moves once the headers are complete (trailers are
 * counted, not kept), so this can run at headers-complete time for the spool predicate as
 * well as at dispatch. False on out of memory. */
static bool build_view(struct conn *c)
{
    struct router_req *r = c->req;
    struct router_http_request *q = &r->pub;
    if (r->view_built)
        return true;
    q->method = llhttp_method_name((llhttp_method_t)llhttp_get_method(&c->parser));
    q->target = r->head;
    q->target_len = r->url_len;
    const char *qm = memchr(r->head, '?', r->url_len);
    size_t plen = qm ? (size_t)(qm - r->head) : r->url_len;
    q->path = arena_strndup(&r->arena, r->head, plen);
    q->path_len = q->path ? plen : 0;
    if (qm) {
        q->query = qm + 1;
        q->query_len = r->url_len - plen - 1;
    }
    struct router_http_header *hs = NULL;
    if (r->n_hdrs) {
        hs = arena_alloc(&r->arena, r->n_hdrs * sizeof *hs);
        if (hs) {
            for (size_t i = 0; i < r->n_hdrs; i++) {
                hs[i].name = r->head + r->hdrs[i].name_off;
                hs[i].name_len = r->hdrs[i].name_len;
                hs[i].value = r->head + r->hdrs[i].val_off;
                hs[i].value_len = r->hdrs[i].val_len;
            }
        }
    }
    q->remote_addr = arena_strndup(&r->arena, c->remote, strlen(c->remote));
    if (!q->path || (r->n_hdrs && !hs) || !q->remote_addr)
        return false;
    q->headers = hs;
    q->n_headers = r->n_hdrs;
    r->view_built = true;
    return true;
}

/* ---------------------------------------------------------------------------------------- */
/* Spooled bodies                                                                           */
/* ---------------------------------------------------------------------------------------- */

/*
 * A spool file is unlinked from birth (O_TMPFILE, or mkstemp + unlink where the filesystem
 * lacks it), so it disappears with its last descriptor on every path: request done, client
 * gone, error, even a crash of the process. Writes are plain blocking write(2)s on the event
 * loop, SPOOL_BUF bytes at a time: local disk, page cache first. That is also the
 * back-pressure: while a write runs the loop reads nothing more from any socket, and a
 * connection's input buffer is capped at READ_HIGH_WATER.
 */
static int spool_open(const char *dir)
{
    int fd = -1;
#ifdef O_TMPFILE
    fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL))
        return fd;
#endif
    char path[PATH_MAX];
    int n = snprintf(path, sizeof path, "%s/.pw-spool-XXXXXX", dir);
    if (n < 0 || (size_t)n >= sizeof path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = mkostemp(path, O_CLOEXEC);
    if (fd >= 0)
        unlink(path);
    return fd;
}

static int spool_fail(struct conn *c, int e);

static bool write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (w == 0)
                errno = EIO;
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static int spool_flush(struct conn *c)
{
    struct router_req *r = c->req;
    if (r->spool_buf_len && !write_all(r->spool_fd, r->spool_buf, r->spool_buf_len))
        return spool_fail(c, errno);
    r->spool_buf_len = 0;
    return 0;
}

static int spool_append(struct conn *c, const char *at, size_t len)
{
    struct router_req *r = c->req;
    if (len > r->spool_limit || r->spool_len > r->spool_limit - len)
        return -2; /* over the limit: the caller answers 413 */
    r->spool_len += len;
    if (r->spool_buf_len + len > SPOOL_BUF && spool_flush(c))
        return -1;
    if (len >= SPOOL_BUF) {
        if (!write_all(r->spool_fd, at, len))
            return spool_fail(c, errno);
        return 0;
    }
    memcpy(r->spool_buf + r->spool_buf_len, at, len);
    r->spool_buf_len += len;
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* llhttp callbacks: record, never free                                                     */
/* ---------------------------------------------------------------------------------------- */

static int parse_fail(struct conn *c, int status, const char *code, const char *msg)
{
    if (!c->err_status) {
        c->err_status = status;
        c->err_code = code;
        c->err_msg = msg;
    }
    return -1;
}

static int spool_fail(struct conn *c, int e)
{
    PW_LOG_WARN("event=http_spool_failed request_id=%s remote=%s error=\"%s\"",
                c->req->pub.request_id ? c->req->pub.request_id : "-", c->remote, strerror(e));
    if (e == ENOSPC || e == EDQUOT)
        return parse_fail(c, 507, "insufficient_storage", "no space to store the request body");
    return parse_fail(c, 500, "spool_failed", "cannot store the request body");
}

static int head_append(struct conn *c, const char *at, size_t len)
{
    struct router_req *r = c->req;
    size_t limit = c->w->srv->cfg.max_header_bytes;
    if (r->head_len + len + 1 > limit)
        return parse_fail(c, 431, "header_too_large", "request headers are too large");
    if (!grow(&r->head, &r->head_cap, r->head_len + len + 1, limit + 1))
        return parse_fail(c, 503, "server_overloaded", "out of memory");
    memcpy(r->head + r->head_len, at, len);
    r->head_len += len;
    return 0;
}

static int on_message_begin(llhttp_t *p)
{
    struct conn *c = p->data;
    if (c->req) /* cannot happen: we pause after each message */
        return parse_fail(c, 400, "bad_request", "unexpected message");
    c->req = req_new(c->w);
    if (!c->req)
        return parse_fail(c, 503, "server_overloaded", "out of memory");
    c->req->conn = c;
    c->req->conn_holds = true;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    return head_append(p->data, at, len);
}

static int on_url_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    c->req->url_len = c->req->head_len;
    return head_append(c, "", 1);
}

static int on_header_field(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->headers_done) { /* trailers: counted, not kept */
        r->trailer_bytes += len;
        if (r->trailer_bytes > c->w->srv->cfg.max_header_bytes)
            return parse_fail(c, 431, "header_too_large", "request trailers are too large");
        return 0;
    }
    if (r->hdr_state == 0) {
        if (r->n_hdrs >= c->w->srv->cfg.max_headers)
            return parse_fail(c, 431, "header_too_large", "too many request headers");
        if (r->n_hdrs == r->hdrs_cap) {
            size_t ncap = r->hdrs_cap ? r->hdrs_cap * 2 : 16;
            struct hdr_off *nh = realloc(r->hdrs, ncap * sizeof *nh);
            if (!nh)
                return parse_fail(c, 503, "server_overloaded", "out of memory");
            r->hdrs = nh;
            r->hdrs_cap = ncap;
        }
        r->hdrs[r->n_hdrs] = (struct hdr_off){r->head_len, 0, 0, 0};
        r->hdr_state = 1;
    }
    return head_append(c, at, len);
}

static int on_header_field_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->headers_done)
        return 0;
    struct hdr_off *h = &r->hdrs[r->n_hdrs];
    h->name_len = r->head_len - h->name_off;
    /* llhttp (built without strict mode) lets spaces into names: only tokens pass here. */
    if (h->name_len == 0)
        return parse_fail(c, 400, "bad_request", "empty header name");
    for (size_t i = 0; i < h->name_len; i++)
        if (!is_tchar((unsigned char)r->head[h->name_off + i]))
            return parse_fail(c, 400, "bad_request", "invalid header name");
    if (head_append(c, "", 1))
        return -1;
    h->val_off = r->head_len;
    r->hdr_state = 2;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->headers_done) {
        r->trailer_bytes += len;
        if (r->trailer_bytes > c->w->srv->cfg.max_header_bytes)
            return parse_fail(c, 431, "header_too_large", "request trailers are too large");
        return 0;
    }
    /* llhttp joins an obs-fold continuation line into the value as a second span, dropping
     * the CR LF. A second span after one that ended inside the input can only be that:
     * refuse it (RFC 9112 5.2 allows 400). A span cut by the end of a read is not a fold. */
    if (r->val_cut)
        return parse_fail(c, 400, "bad_request", "obsolete line folding in a header");
    r->val_cut = at + len < c->feed_end;
    return head_append(c, at, len);
}

static int on_header_value_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->headers_done)
        return 0;
    struct hdr_off *h = &r->hdrs[r->n_hdrs];
    size_t vl = r->head_len - h->val_off;
    while (vl > 0 && (r->head[h->val_off + vl - 1] == ' ' || r->head[h->val_off + vl - 1] == '\t'))
        vl--;
    /* field-value is VCHAR, obs-text, SP and HTAB only (llhttp is lenient about CTLs). */
    for (size_t i = 0; i < vl; i++) {
        unsigned char ch = (unsigned char)r->head[h->val_off + i];
        if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
            return parse_fail(c, 400, "bad_request", "control bytes in a header value");
    }
    h->val_len = vl;
    r->val_cut = false;
    r->head_len = h->val_off + vl;
    if (head_append(c, "", 1))
        return -1;
    r->n_hdrs++;
    r->hdr_state = 0;
    return 0;
}

static bool method_supported(uint8_t m)
{
    switch (m) {
    case HTTP_GET:
    case HTTP_HEAD:
    case HTTP_POST:
    case HTTP_PUT:
    case HTTP_DELETE:
    case HTTP_OPTIONS:
    case HTTP_PATCH:
        return true;
    default:
        return false;
    }
}

static int on_headers_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    const struct router_http_config *cfg = &c->w->srv->cfg;
    r->headers_done = true;
    r->pub.version_minor = llhttp_get_http_minor(p);
    r->keep_alive = llhttp_should_keep_alive(p) != 0;
    r->is_head = llhttp_get_method(p) == HTTP_HEAD;

    /* Count the framing headers ourselves, on top of llhttp's own (non-lenient) checks. */
    unsigned n_cl = 0, n_te = 0, n_host = 0, n_expect = 0;
    const char *te = NULL, *expect = NULL, *rid = NULL;
    size_t rid_len = 0;
    for (size_t i = 0; i < r->n_hdrs; i++) {
        const char *name = r->head + r->hdrs[i].name_off;
        const char *val = r->head + r->hdrs[i].val_off;
        if (!strcasecmp(name, "content-length")) {
            n_cl++;
        } else if (!strcasecmp(name, "transfer-encoding")) {
            n_te++;
            te = val;
        } else if (!strcasecmp(name, "host")) {
            n_host++;
        } else if (!strcasecmp(name, "expect")) {
            n_expect++;
            expect = val;
        } else if (!strcasecmp(name, "upgrade")) {
            c->upgraded = true; /* not supported: answer as plain HTTP, then close */
        } else if (!strcasecmp(name, "x-request-id") && !rid) {
            rid = val;
            rid_len = r->hdrs[i].val_len;
        }
    }
    char idbuf[40];
    if (rid && router_http_request_id_valid(rid, rid_len)) {
        r->pub.request_id = arena_strndup(&r->arena, rid, rid_len);
    } else {
        gen_request_id(c->w, idbuf);
        r->pub.request_id = arena_strndup(&r->arena, idbuf, 32);
    }
    if (!r->pub.request_id)
        return parse_fail(c, 503, "server_overloaded", "out of memory");

    if (!method_supported(llhttp_get_method(p)))
        return parse_fail(c, 501, "not_implemented", "method not implemented");
    if (n_cl > 1)
        return parse_fail(c, 400, "bad_request", "duplicate Content-Length");
    if (n_te > 0 && n_cl > 0)
        return parse_fail(c, 400, "bad_request", "both Content-Length and Transfer-Encoding");
    if (n_te > 1 || (n_te && r->pub.version_minor == 0))
        return parse_fail(c, 400, "bad_request", "invalid Transfer-Encoding");
    if (n_te && strcasecmp(te, "chunked") != 0)
        return parse_fail(c, 501, "not_implemented", "unsupported Transfer-Encoding");
    if (n_host > 1 || (n_host == 0 && r->pub.version_minor >= 1))
        return parse_fail(c, 400, "bad_request", "missing or duplicate Host header");
    if (n_expect > 1 || (expect && strcasecmp(expect, "100-continue") != 0))
        return parse_fail(c, 417, "expectation_failed", "unsupported Expect header");

    bool chunked = (p->flags & F_CHUNKED) != 0;
    bool has_len = (p->flags & F_CONTENT_LENGTH) != 0;
    bool has_body = chunked || (has_len && p->content_length > 0);
    const struct router_http_spool *sp = &cfg->body_spool;
    if (has_body && sp->fn) {
        /* The route decides, from the headers alone, before any body byte is read. */
        if (!build_view(c))
            return parse_fail(c, 503, "server_overloaded", "out of memory");
        uint64_t lim = sp->fn(&r->pub, sp->ud);
        if (lim > ROUTER_HTTP_SPOOL_MAX_BYTES)
            lim = ROUTER_HTTP_SPOOL_MAX_BYTES;
        if (lim > 0) {
            if (has_len && p->content_length > lim)
                return parse_fail(c, 413, "request_too_large", "request body is too large");
            r->spool_fd = spool_open(c->w->srv->spool_dir);
            if (r->spool_fd < 0)
                return spool_fail(c, errno);
            r->spool_buf = malloc(SPOOL_BUF);
            if (!r->spool_buf)
                return parse_fail(c, 503, "server_overloaded", "out of memory");
            r->spool_limit = lim;
        }
    }
    if (r->spool_fd < 0 && has_len && p->content_length > cfg->max_body_bytes)
        return parse_fail(c, 413, "request_too_large", "request body is too large");
    if (r->spool_fd < 0 && has_len && p->content_length > 0) {
        size_t need = (size_t)p->content_length + 1;
        r->body = malloc(need);
        if (!r->body)
            return parse_fail(c, 503, "server_overloaded", "out of memory");
        r->body_cap = need;
    }
    if (expect && has_body && r->pub.version_minor >= 1)
        out_str(bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n");
    if (has_body)
        c->state = C_BODY;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->spool_fd >= 0) {
        int rc = spool_append(c, at, len);
        if (rc == -2)
            return parse_fail(c, 413, "request_too_large", "request body is too large");
        return rc;
    }
    size_t max = c->w->srv->cfg.max_body_bytes;
    if (len > max || r->body_len > max - len)
        return parse_fail(c, 413, "request_too_large", "request body is too large");
    if (!grow(&r->body, &r->body_cap, r->body_len + len + 1, max + 1))
        return parse_fail(c, 503, "server_overloaded", "out of memory");
    memcpy(r->body + r->body_len, at, len);
    r->body_len += len;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct conn *c = p->data;
    struct router_req *r = c->req;
    if (r->spool_fd >= 0) {
        if (spool_flush(c))
            return -1;
        free(r->spool_buf);
        r->spool_buf = NULL;
        PW_LOG_DEBUG("event=http_body_spooled request_id=%s bytes=%llu", r->pub.request_id,
                     (unsigned long long)r->spool_len);
    }
    c->req->complete = true;
    /* Stop here: the next pipelined request is parsed only after this response. */
    return HPE_PAUSED;
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---------------------------------------------------------------------------------------- */
/* Connection state machine                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* Builds the handler's view and calls the handler. */
static void dispatch(struct conn *c)
{
    struct router_req *r = c->req;
    struct router_http_request *q = &r->pub;
    if (!build_view(c)) {
        conn_fail(c, 503, "server_overloaded", "out of memory");
        return;
    }
    if (r->spool_fd >= 0) {
        q->body_spooled = true;
        q->body_fd = r->spool_fd;
        q->body_fd_len = r->spool_len;
    } else if (r->body) {
        r->body[r->body_len] = '\0';
        q->body = r->body;
        q->body_len = r->body_len;
    }
    c->state = C_HANDLER;
    evtimer_del(c->timer);
    r->handler_holds = true;
    c->w->srv->handler(q, c->w->srv->handler_ud);
}

static void fail_from_llhttp(struct conn *c, enum llhttp_errno e)
{
    if (c->err_status) {
        conn_fail(c, c->err_status, c->err_code, c->err_msg);
        return;
    }
    switch (e) {
    case HPE_INVALID_METHOD:
        conn_fail(c, 501, "not_implemented", "method not implemented");
        break;
    default: {
        const char *why = llhttp_get_error_reason(&c->parser);
        conn_fail(c, 400, "bad_request", why ? why : "malformed request");
        break;
    }
    }
}

static void conn_parse(struct conn *c)
{
    const struct router_http_config *cfg = &c->w->srv->cfg;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    while (!c->dead && (c->state == C_IDLE || c->state == C_HEAD || c->state == C_BODY)) {
        struct evbuffer_iovec v;
        if (evbuffer_peek(in, -1, NULL, &v, 1) < 1 || v.iov_len == 0)
            break;
        if (c->state == C_IDLE) {
            c->state = C_HEAD;
            c->head_fed = 0;
            /* A new connection keeps its accept-time deadline (slow TLS and slow first
             * bytes count); a keep-alive one starts the header clock at the first byte. */
            if (c->nreq > 0)
                arm_timer(c, cfg->header_timeout_ms);
        }
        bool in_head = c->state == C_HEAD;
        const char *base = v.iov_base;
        c->feed_end = base + v.iov_len;
        enum llhttp_errno e = llhttp_execute(&c->parser, base, v.iov_len);
        size_t used = v.iov_len;
        if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
            const char *pos = llhttp_get_error_pos(&c->parser);
            used = pos && pos >= base && pos <= base + v.iov_len ? (size_t)(pos - base) : used;
            if (e == HPE_PAUSED) {
                llhttp_resume(&c->parser);
            } else {
                llhttp_resume_after_upgrade(&c->parser);
                c->upgraded = true;
            }
        } else if (e != HPE_OK) {
            evbuffer_drain(in, v.iov_len);
            fail_from_llhttp(c, e);
            return;
        }
        evbuffer_drain(in, used);
        if (in_head && c->state == C_HEAD && !(c->req && c->req->complete)) {
            c->head_fed += used;
            if (c->head_fed > cfg->max_header_bytes + HEAD_SLACK) {
                conn_fail(c, 431, "header_too_large", "request headers are too large");
                return;
            }
        }
        if (c->req && c->req->complete) {
            dispatch(c);
            return;
        }
        if (c->state == C_BODY)
            arm_timer(c, cfg->body_timeout_ms); /* a gap, not a total */
        if (c->upgraded)
            break;
    }
}

/* Marks the connection dead; the kick event frees it (never inside someone's callback). */
static void conn_kill(struct conn *c)
{
    if (c->dead)
        return;
    c->dead = true;
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    evtimer_del(c->timer);
    conn_schedule(c);
}

static void conn_free(struct conn *c)
{
    struct worker *w = c->w;
    struct router_req *r = c->req;
    c->req = NULL;
    if (c->prev)
        c->prev->next = c->next;
    else
        w->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    w->n_conns--;
    atomic_fetch_sub(&w->srv->n_conns, 1);
    bufferevent_free(c->bev);
    event_free(c->timer);
    event_free(c->kick); /* we are in its callback: libevent does not touch it afterwards */
    free(c);
    if (r) {
        r->conn = NULL;
        r->conn_holds = false;
        r->lost = true;
        if (r->handler_holds) {
            router_http_cancel_fn fn = r->cancel;
            r->cancel = NULL;
            if (fn)
                fn(&r->pub, r->cancel_ud); /* may make the terminal call and free r */
        } else {
            req_free(r);
        }
    }
    if (w->draining && w->n_conns == 0)
        event_base_loopexit(w->base, NULL);
}

static void write_cb(struct bufferevent *bev, void *arg);

/* Output was added on a plain connection: write it later on this loop turn (one write for
 * everything a callback queued) instead of enabling the bufferevent's write event, which
 * costs two epoll_ctl calls and a loop turn per response. */
static void out_added_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    (void)buf;
    struct conn *c = arg;
    if (info->n_added && !c->dead && !c->write_armed)
        conn_schedule(c);
}

static void conn_flush(struct conn *c)
{
    struct evbuffer *o = bufferevent_get_output(c->bev);
    if (c->write_armed || evbuffer_get_length(o) == 0)
        return;
    while (evbuffer_get_length(o) > 0) {
        /* The socket bufferevent freezes its output's front between its own writes. */
        evbuffer_unfreeze(o, 1);
        int n = evbuffer_write(o, c->fd);
        int saved = errno;
        evbuffer_freeze(o, 1);
        errno = saved;
        if (n > 0 || (n < 0 && errno == EINTR))
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_kill(c); /* as a failed bufferevent write would */
            return;
        }
        break;
    }
    if (evbuffer_get_length(o) > 0) {
        c->write_armed = true; /* the bufferevent writes the rest, under the write timeout */
        bufferevent_enable(c->bev, EV_WRITE);
    } else {
        write_cb(c->bev, c);
    }
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    if (c->dead) {
        conn_free(c);
        return;
    }
    if (!c->tls) {
        conn_flush(c);
        if (c->dead)
            return; /* conn_kill scheduled the teardown */
    }
    if (c->state == C_HANDLER && c->req && c->req->resp == RESP_DONE) {
        struct router_req *r = c->req;
        bool keep = r->keep_alive && !c->upgraded && !c->w->draining;
        c->req = NULL;
        r->conn = NULL;
        r->conn_holds = false;
        if (!r->handler_holds)
            req_free(r);
        c->nreq++;
        if (!keep) {
            c->state = C_CLOSING;
            arm_timer(c, c->w->srv->cfg.write_timeout_ms);
        } else {
            c->state = C_IDLE;
            arm_timer(c, c->w->srv->cfg.idle_timeout_ms);
            conn_parse(c);
        }
    }
    if (!c->dead && c->state == C_CLOSING && out_len(c) == 0)
        conn_closing_flushed(c);
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    switch (c->state) {
    case C_IDLE:
    case C_HEAD:
    case C_BODY:
        conn_parse(c);
        break;
    case C_HANDLER:
        break; /* pipelined bytes wait (up to the read high-water mark) */
    case C_CLOSING:
    case C_LINGER:
        c->discarded += evbuffer_get_length(in);
        evbuffer_drain(in, evbuffer_get_length(in));
        if (c->discarded > LINGER_MAX_BYTES)
            conn_kill(c);
        break;
    }
}

static void write_cb(struct bufferevent *bev, void *arg)
{
    struct conn *c = arg;
    if (c->write_armed && out_len(c) == 0) {
        c->write_armed = false;
        bufferevent_disable(bev, EV_WRITE);
    }
    if (!c->dead && c->state == C_CLOSING && out_len(c) == 0)
        conn_closing_flushed(c);
    struct router_req *r = c->req;
    if (!c->dead && c->state == C_HANDLER && r && r->drain && r->handler_holds &&
        r->resp == RESP_STREAMING && out_len(c) == 0)
        r->drain(&r->pub, r->drain_ud); /* may write more or make the terminal call */
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct conn *c = arg;
    if (what & BEV_EVENT_CONNECTED)
        return; /* TLS handshake done */
    if (c->tls && (what & BEV_EVENT_ERROR)) {
        unsigned long e = bufferevent_get_openssl_error(bev);
        if (e)
            PW_LOG_DEBUG("event=http_tls_error remote=%s reason=%lu", c->remote, e);
    }
    /* EOF, error or write timeout: the client is gone (a half-closed client counts too). */
    conn_kill(c);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    switch (c->state) {
    case C_HEAD:
    case C_BODY:
        conn_fail(c, 408, "request_timeout", "timed out reading the request");
        break;
    case C_IDLE:    /* keep-alive idle, or a new connection that sent nothing */
    case C_CLOSING: /* could not write the last response in time */
    case C_LINGER:
    case C_HANDLER:
        conn_kill(c);
        break;
    }
}

static void format_addr(const struct sockaddr *sa, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof ip);
        snprintf(out, cap, "%s:%u", ip, ntohs(s4->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof ip);
        snprintf(out, cap, "[%s]:%u", ip, ntohs(s6->sin6_port));
    } else {
        snprintf(out, cap, "unknown");
    }
}

/* Over max_connections: a best-effort 503 on the raw socket, then close. */
static void refuse(struct worker *w, evutil_socket_t fd)
{
    if (!w->srv->ssl_ctx) {
        char id[40], json[256], resp[768];
        gen_request_id(w, id);
        size_t jl = router_http_error_json(json, sizeof json, "server_error", "server_overloaded",
                                           "too many connections");
        int n = snprintf(resp, sizeof resp,
                         "HTTP/1.1 503 Service Unavailable\r\n%sContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\nRetry-After: 1\r\n"
                         "x-request-id: %s\r\n\r\n%s",
                         date_line(w), jl, id, json);
        if (n > 0 && (size_t)n < sizeof resp) {
            ssize_t wr = send(fd, resp, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            (void)wr;
        }
        shutdown(fd, SHUT_WR);
    }
    evutil_closesocket(fd);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                      int socklen, void *arg)
{
    struct worker *w = arg;
    struct router_http_server *srv = w->srv;
    if (w->draining) {
        evutil_closesocket(fd);
        return;
    }
    unsigned before = atomic_fetch_add(&srv->n_conns, 1);
    if (before >= srv->cfg.max_connections) {
        atomic_fetch_sub(&srv->n_conns, 1);
        refuse(w, fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    SSL *ssl = NULL;
    if (!c)
        goto fail;
    c->w = w;
    c->fd = fd;
    format_addr(sa, c->remote, sizeof c->remote);
    if (srv->ssl_ctx) {
        ssl = SSL_new(srv->ssl_ctx);
        if (!ssl)
            goto fail;
        c->bev = bufferevent_openssl_socket_new(w->base, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                                BEV_OPT_CLOSE_ON_FREE);
        if (c->bev)
            bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
        c->tls = true;
    } else {
        c->bev = bufferevent_socket_new(w->base, fd, BEV_OPT_CLOSE_ON_FREE);
    }
    if (!c->bev)
        goto fail;
    ssl = NULL; /* the bufferevent owns it now */
    c->timer = evtimer_new(w->base, timer_cb, c);
    c->kick = event_new(w->base, -1, 0, kick_cb, c);
    if (!c->timer || !c->kick) {
        if (c->timer)
            event_free(c->timer);
        if (c->kick)
            event_free(c->kick);
        bufferevent_free(c->bev); /* closes fd */
        free(c);
        atomic_fetch_sub(&srv->n_conns, 1);
        return;
    }
    llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
    c->parser.data = c;
    bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
    bufferevent_setwatermark(c->bev, EV_READ, 0, READ_HIGH_WATER);
    struct timeval wt = {srv->cfg.write_timeout_ms / 1000,
                         (srv->cfg.write_timeout_ms % 1000) * 1000};
    bufferevent_set_timeouts(c->bev, NULL, &wt);
    if (c->tls) {
        bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    } else {
        /* A new bufferevent starts with EV_WRITE enabled: off, or every response would
         * still add and drop the write event (conn_flush writes instead). */
        bufferevent_disable(c->bev, EV_WRITE);
        bufferevent_enable(c->bev, EV_READ);
        evbuffer_add_cb(bufferevent_get_output(c->bev), out_added_cb, c);
    }
    c->state = C_IDLE;
    arm_timer(c, srv->cfg.header_timeout_ms);
    c->next = w->conns;
    if (w->conns)
        w->conns->prev = c;
    w->conns = c;
    w->n_conns++;
    return;
fail:
    if (ssl)
        SSL_free(ssl);
    free(c);
    evutil_closesocket(fd);
    atomic_fetch_sub(&srv->n_conns, 1);
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    if (w->listener && !w->draining)
        evconnlistener_enable(w->listener);
}

static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct worker *w = arg;
    int e = EVUTIL_SOCKET_ERROR();
    PW_LOG_WARN("event=http_accept_error worker=%u error=%s", w->idx,
                evutil_socket_error_to_string(e));
    /* EMFILE and friends: back off instead of spinning on a readable listener. */
    evconnlistener_disable(l);
    struct timeval tv = {0, 100 * 1000};
    evtimer_add(w->accept_retry, &tv);
}

/* ---------------------------------------------------------------------------------------- */
/* Responses (handler side)                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* Drops the handler's reference; frees the request if the connection let go of it too. */
static void handler_done(struct router_req *r)
{
    PW_ASSERT(r->handler_holds);
    r->handler_holds = false;
    r->cancel = NULL;
    r->drain = NULL;
    if (!r->conn_holds)
        req_free(r);
    else
        conn_schedule(r->conn);
}

static enum pw_err respond_now(struct router_req *r, int status,
                               const struct router_http_field *headers, size_t n_headers,
                               const void *body, size_t body_len)
{
    struct conn *c = r->conn;
    if (out_len(c) > c->w->srv->cfg.max_output_bytes) {
        conn_kill(c); /* the client is not reading its pipelined answers */
        return PW_ERR_CLOSED;
    }
    bool keep = r->keep_alive && !c->upgraded && !c->w->draining;
    bool with_body = status_has_body(status);
    write_head(c, status, r->pub.request_id, headers, n_headers,
               with_body ? FRAME_LENGTH : FRAME_NONE, body_len, keep);
    if (with_body && !r->is_head && body_len)
        evbuffer_add(bufferevent_get_output(c->bev), body, body_len);
    r->keep_alive = keep;
    r->resp = RESP_DONE;
    return PW_OK;
}

static bool fields_valid(const struct router_http_field *h, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!field_valid(&h[i]))
            return false;
    return true;
}

static enum pw_err respond_error_now(struct router_req *r, int status, const char *type,
                                     const char *code, const char *message)
{
    char small[512];
    char *json = small;
    size_t need = router_http_error_json(small, sizeof small, type ? type : default_type(status),
                                         code, message);
    if (need >= sizeof small) {
        json = arena_alloc(&r->arena, need + 1);
        if (!json)
            return PW_ERR_NOMEM;
        router_http_error_json(json, need + 1, type ? type : default_type(status), code, message);
    }
    static const struct router_http_field ct = {"Content-Type", "application/json"};
    return respond_now(r, status, &ct, 1, json, need);
}

enum pw_err router_http_respond(struct router_http_request *req, int status,
                                const struct router_http_field *headers, size_t n_headers,
                                const void *body, size_t body_len)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    enum pw_err err = PW_OK;
    if (!req_alive(r)) {
        err = PW_ERR_CLOSED;
    } else if (r->resp != RESP_NONE) {
        err = PW_ERR_INVAL;
        r->keep_alive = false;
        r->resp = RESP_DONE;
        conn_kill(r->conn); /* a stream was started: cut it */
    } else if (status < 200 || status > 599 || !fields_valid(headers, n_headers)) {
        PW_LOG_ERROR("event=http_bad_response status=%d request_id=%s", status, r->pub.request_id);
        respond_error_now(r, 500, NULL, "internal_error", "internal error");
        err = PW_ERR_INVAL;
    } else {
        err = respond_now(r, status, headers, n_headers, body, body_len);
    }
    handler_done(r);
    return err;
}

enum pw_err router_http_respond_error(struct router_http_request *req, int status, const char *type,
                                      const char *code, const char *message)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    enum pw_err err = PW_OK;
    if (!req_alive(r))
        err = PW_ERR_CLOSED;
    else if (r->resp != RESP_NONE) {
        err = PW_ERR_INVAL;
        r->resp = RESP_DONE;
        conn_kill(r->conn);
    } else
        err =
            respond_error_now(r, status < 400 || status > 599 ? 500 : status, type, code, message);
    handler_done(r);
    return err;
}

enum pw_err router_http_stream_begin(struct router_http_request *req, int status,
                                     const struct router_http_field *headers, size_t n_headers)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    if (!req_alive(r))
        return PW_ERR_CLOSED;
    if (r->resp != RESP_NONE || status < 200 || status > 599 || !status_has_body(status) ||
        !fields_valid(headers, n_headers))
        return PW_ERR_INVAL;
    struct conn *c = r->conn;
    r->chunked_out = r->pub.version_minor >= 1;
    if (!r->chunked_out)
        r->keep_alive = false; /* HTTP/1.0: the body ends at close */
    bool keep = r->keep_alive && !c->upgraded && !c->w->draining;
    r->keep_alive = keep;
    write_head(c, status, r->pub.request_id, headers, n_headers,
               r->is_head ? FRAME_NONE : (r->chunked_out ? FRAME_CHUNKED : FRAME_CLOSE), 0, keep);
    r->resp = RESP_STREAMING;
    return PW_OK;
}

enum pw_err router_http_stream_begin_length(struct router_http_request *req, int status,
                                            const struct router_http_field *headers,
                                            size_t n_headers, uint64_t length)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    if (!req_alive(r))
        return PW_ERR_CLOSED;
    if (r->resp != RESP_NONE || status < 200 || status > 599 || !status_has_body(status) ||
        !fields_valid(headers, n_headers) || length > SIZE_MAX)
        return PW_ERR_INVAL;
    struct conn *c = r->conn;
    bool keep = r->keep_alive && !c->upgraded && !c->w->draining;
    r->keep_alive = keep;
    write_head(c, status, r->pub.request_id, headers, n_headers, FRAME_LENGTH, (size_t)length,
               keep);
    r->fixed_out = true;
    r->out_left = r->is_head ? 0 : length;
    r->resp = RESP_STREAMING;
    return PW_OK;
}

enum pw_err router_http_stream_write(struct router_http_request *req, const void *data, size_t len)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    if (!req_alive(r))
        return PW_ERR_CLOSED;
    if (r->resp != RESP_STREAMING)
        return PW_ERR_INVAL;
    if (len == 0 || r->is_head)
        return PW_OK;
    if (r->fixed_out && len > r->out_left)
        return PW_ERR_INVAL; /* more than announced: refused, nothing queued */
    if (r->fixed_out)
        r->out_left -= len;
    struct conn *c = r->conn;
    if (out_len(c) + len > c->w->srv->cfg.max_output_bytes) {
        PW_LOG_INFO("event=http_slow_reader request_id=%s remote=%s pending=%zu", r->pub.request_id,
                    c->remote, out_len(c));
        conn_kill(c);
        return PW_ERR_CLOSED;
    }
    struct evbuffer *o = bufferevent_get_output(c->bev);
    if (r->chunked_out) {
        char sz[24];
        int k = snprintf(sz, sizeof sz, "%zx\r\n", len);
        evbuffer_add(o, sz, (size_t)k);
        evbuffer_add(o, data, len);
        evbuffer_add(o, "\r\n", 2);
    } else {
        evbuffer_add(o, data, len);
    }
    return PW_OK;
}

void router_http_stream_set_drain(struct router_http_request *req, router_http_drain_fn fn,
                                  void *ud)
{
    struct router_req *r = req_of(req);
    r->drain = fn;
    r->drain_ud = ud;
}

size_t router_http_stream_pending(const struct router_http_request *req)
{
    const struct router_req *r = req_of_const(req);
    return req_alive(r) ? out_len(r->conn) : 0;
}

enum pw_err router_http_stream_end(struct router_http_request *req)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    enum pw_err err = PW_OK;
    if (!req_alive(r)) {
        err = PW_ERR_CLOSED;
    } else if (r->resp != RESP_STREAMING) {
        err = PW_ERR_INVAL;
        respond_error_now(r, 500, NULL, "internal_error", "internal error");
    } else if (r->fixed_out && r->out_left > 0) {
        /* Fewer bytes than announced: the client must see a cut body, not a short one. */
        PW_LOG_WARN("event=http_short_body request_id=%s missing=%llu", r->pub.request_id,
                    (unsigned long long)r->out_left);
        err = PW_ERR_INVAL;
        r->keep_alive = false;
        r->resp = RESP_DONE;
        conn_kill(r->conn);
    } else {
        if (r->chunked_out && !r->is_head)
            evbuffer_add(bufferevent_get_output(r->conn->bev), "0\r\n\r\n", 5);
        r->resp = RESP_DONE;
    }
    handler_done(r);
    return err;
}

void router_http_request_release(struct router_http_request *req)
{
    struct router_req *r = req_of(req);
    PW_ASSERT(r->handler_holds);
    if (req_alive(r)) {
        if (r->resp == RESP_NONE) {
            r->keep_alive = false;
            respond_error_now(r, 500, NULL, "internal_error", "the request was abandoned");
            r->keep_alive = false;
        } else if (r->resp == RESP_STREAMING) {
            r->resp = RESP_DONE;
            conn_kill(r->conn);
        }
    }
    handler_done(r);
}

/* ---------------------------------------------------------------------------------------- */
/* Workers, tasks and shutdown                                                              */
/* ---------------------------------------------------------------------------------------- */

static void run_tasks(struct task *t)
{
    while (t) {
        struct task *next = t->next;
        t->fn(t->arg);
        free(t);
        t = next;
    }
}

static void drain_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    PW_LOG_WARN("event=http_drain_timeout worker=%u open=%u", w->idx, w->n_conns);
    for (struct conn *c = w->conns; c; c = c->next)
        conn_kill(c);
}

static void begin_drain(struct worker *w)
{
    if (w->draining)
        return;
    w->draining = true;
    if (w->listener) {
        evconnlistener_free(w->listener); /* closes the listening socket */
        w->listener = NULL;
    }
    evtimer_del(w->accept_retry);
    for (struct conn *c = w->conns; c; c = c->next)
        if (c->state == C_IDLE)
            conn_kill(c);
    uint32_t ms = w->srv->cfg.drain_timeout_ms;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    evtimer_add(w->drain_timer, &tv);
    if (w->n_conns == 0)
        event_base_loopexit(w->base, NULL);
}

static void efd_cb(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    uint64_t v;
    ssize_t n = read(w->efd, &v, sizeof v);
    (void)n;
    pthread_mutex_lock(&w->mu);
    struct task *t = w->task_head;
    w->task_head = w->task_tail = NULL;
    pthread_mutex_unlock(&w->mu);
    run_tasks(t);
    if (atomic_load(&w->srv->stopping))
        begin_drain(w);
}

enum pw_err router_http_server_post(struct router_http_server *srv, unsigned worker,
                                    router_http_task_fn fn, void *arg)
{
    if (!srv || worker >= srv->n_workers || !fn)
        return PW_ERR_INVAL;
    struct worker *w = &srv->workers[worker];
    struct task *t = malloc(sizeof *t);
    if (!t)
        return PW_ERR_NOMEM;
    t->next = NULL;
    t->fn = fn;
    t->arg = arg;
    pthread_mutex_lock(&w->mu);
    if (w->closed) {
        pthread_mutex_unlock(&w->mu);
        free(t);
        return PW_ERR_CLOSED;
    }
    bool was_empty = w->task_head == NULL;
    if (w->task_tail)
        w->task_tail->next = t;
    else
        w->task_head = t;
    w->task_tail = t;
    pthread_mutex_unlock(&w->mu);
    /* One wake-up per batch: the reader takes the whole list after reading the eventfd. */
    if (was_empty) {
        uint64_t one = 1;
        ssize_t n = write(w->efd, &one, sizeof one);
        (void)n;
    }
    return PW_OK;
}

void router_http_server_stop(struct router_http_server *srv)
{
    if (!srv)
        return;
    atomic_store(&srv->stopping, true);
    for (unsigned i = 0; i < srv->n_workers; i++) {
        uint64_t one = 1;
        ssize_t n = write(srv->workers[i].efd, &one, sizeof one);
        (void)n;
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    event_base_dispatch(w->base);
    pthread_mutex_lock(&w->mu);
    w->closed = true;
    struct task *t = w->task_head;
    w->task_head = w->task_tail = NULL;
    pthread_mutex_unlock(&w->mu);
    run_tasks(t);
    return NULL;
}

enum pw_err router_http_server_run(struct router_http_server *srv)
{
    PW_ASSERT(srv && !srv->ran);
    srv->ran = true;
    enum pw_err err = PW_OK;
    for (unsigned i = 1; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            PW_LOG_ERROR("event=http_thread_failed worker=%u", i);
            err = PW_ERR_NOMEM;
            router_http_server_stop(srv);
            break;
        }
        w->thread_started = true;
    }
    worker_main(&srv->workers[0]);
    for (unsigned i = 1; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        if (w->thread_started) {
            pthread_join(w->thread, NULL);
            w->thread_started = false;
        }
    }
    PW_LOG_INFO("event=http_stopped port=%u", srv->port);
    return err;
}

uint16_t router_http_server_port(const struct router_http_server *srv)
{
    return srv->port;
}

unsigned router_http_server_threads(const struct router_http_server *srv)
{
    return srv->n_workers;
}

unsigned router_http_server_connections(const struct router_http_server *srv)
{
    return atomic_load(&((struct router_http_server *)srv)->n_conns);
}

struct event_base *router_http_server_base(struct router_http_server *srv, unsigned worker)
{
    return srv && worker < srv->n_workers ? srv->workers[worker].base : NULL;
}

void router_http_config_init(struct router_http_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->host = "127.0.0.1";
    cfg->port = 8080;
    cfg->backlog = 1024;
    cfg->max_header_bytes = ROUTER_HTTP_DEFAULT_MAX_HEADER_BYTES;
    cfg->max_headers = 100;
    cfg->max_body_bytes = ROUTER_HTTP_DEFAULT_MAX_BODY_BYTES;
    cfg->max_output_bytes = ROUTER_HTTP_DEFAULT_MAX_OUTPUT_BYTES;
    cfg->max_connections = 10000;
    cfg->header_timeout_ms = 10000;
    cfg->body_timeout_ms = 30000;
    cfg->idle_timeout_ms = 60000;
    cfg->write_timeout_ms = 60000;
    cfg->drain_timeout_ms = 30000;
}

static evutil_socket_t bind_one(const struct sockaddr *sa, socklen_t salen, int backlog)
{
    evutil_socket_t fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        bind(fd, sa, salen) != 0 || listen(fd, backlog) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* Creates the spool directory (0700, parents too) and checks a spool file can be made in
 * it, so a bad directory fails at start, not at the first upload. *out: our copy. */
static enum pw_err spool_dir_prepare(const char *dir, char **out)
{
    if (!dir || !dir[0]) {
        PW_LOG_ERROR("event=http_spool_config error=\"no spool directory\"");
        return PW_ERR_CONFIG;
    }
    char *d = strdup(dir);
    if (!d)
        return PW_ERR_NOMEM;
    size_t n = strlen(d);
    while (n > 1 && d[n - 1] == '/')
        d[--n] = '\0';
    for (char *p = d + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int rc = mkdir(d, 0700);
        *p = '/';
        if (rc != 0 && errno != EEXIST)
            break;
    }
    int fd = -1;
    if ((mkdir(d, 0700) == 0 || errno == EEXIST) && (fd = spool_open(d)) >= 0) {
        close(fd);
        *out = d;
        return PW_OK;
    }
    PW_LOG_ERROR("event=http_spool_config dir=%s error=\"%s\"", d, strerror(errno));
    free(d);
    return PW_ERR_CONFIG;
}

enum pw_err router_http_server_create(const struct router_http_config *cfg,
                                      router_http_handler_fn handler, void *handler_ud,
                                      struct router_http_server **out)
{
    enum pw_err err = PW_ERR_NOMEM;
    struct addrinfo *ai = NULL;
    *out = NULL;
    PW_ASSERT(cfg && handler);
    signal(SIGPIPE, SIG_IGN); /* writev on a reset socket must not kill the process */
    struct router_http_server *srv = calloc(1, sizeof *srv);
    if (!srv)
        return PW_ERR_NOMEM;
    srv->cfg = *cfg;
    srv->handler = handler;
    srv->handler_ud = handler_ud;
    srv->host = strdup(cfg->host ? cfg->host : "127.0.0.1");
    srv->cert = dup_or_null(cfg->tls_cert_file);
    srv->key = dup_or_null(cfg->tls_key_file);
    if (!srv->host || (cfg->tls_cert_file && !srv->cert) || (cfg->tls_key_file && !srv->key))
        goto out;
    srv->cfg.host = srv->host;
    srv->cfg.tls_cert_file = srv->cert;
    srv->cfg.tls_key_file = srv->key;
    if (cfg->body_spool.fn) {
        err = spool_dir_prepare(cfg->body_spool.dir, &srv->spool_dir);
        if (err)
            goto out;
        srv->cfg.body_spool.dir = srv->spool_dir;
        err = PW_ERR_NOMEM;
    }
    struct router_http_config *c = &srv->cfg;
    if (!c->max_header_bytes)
        c->max_header_bytes = ROUTER_HTTP_DEFAULT_MAX_HEADER_BYTES;
    if (!c->max_headers)
        c->max_headers = 100;
    if (!c->max_output_bytes)
        c->max_output_bytes = ROUTER_HTTP_DEFAULT_MAX_OUTPUT_BYTES;
    if (!c->max_connections)
        c->max_connections = 10000;
    if (c->backlog <= 0)
        c->backlog = 1024;
    if (!c->header_timeout_ms)
        c->header_timeout_ms = 10000;
    if (!c->body_timeout_ms)
        c->body_timeout_ms = 30000;
    if (!c->idle_timeout_ms)
        c->idle_timeout_ms = 60000;
    if (!c->write_timeout_ms)
        c->write_timeout_ms = 60000;
    if (!c->drain_timeout_ms)
        c->drain_timeout_ms = 30000;
    if (c->max_body_bytes > (size_t)1 << 40)
        c->max_body_bytes = (size_t)1 << 40;
    srv->n_workers = c->threads;
    if (srv->n_workers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        srv->n_workers = n > 0 ? (unsigned)n : 1;
    }
    if (srv->n_workers > 256)
        srv->n_workers = 256;

    if (c->tls_cert_file || c->tls_key_file) {
        char why[300];
        err = router_tls_ctx_create(c->tls_cert_file, c->tls_key_file, &srv->ssl_ctx, why,
                                    sizeof why);
        if (err) {
            PW_LOG_ERROR("event=http_tls_config error=%s detail=\"%s\"", pw_err_name(err), why);
            goto out;
        }
    }

    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_PASSIVE | AI_NUMERICSERV};
    char portstr[8];
    snprintf(portstr, sizeof portstr, "%u", (unsigned)c->port);
    if (getaddrinfo(c->host, portstr, &hints, &ai) != 0 || !ai) {
        PW_LOG_ERROR("event=http_bad_host host=%s", c->host);
        err = PW_ERR_CONFIG;
        goto out;
    }
    struct sockaddr_storage ss;
    socklen_t sslen = (socklen_t)ai->ai_addrlen;
    memcpy(&ss, ai->ai_addr, ai->ai_addrlen);

    srv->workers = calloc(srv->n_workers, sizeof *srv->workers);
    if (!srv->workers) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    for (unsigned i = 0; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        w->srv = srv;
        w->idx = i;
        w->efd = -1;
        w->listen_fd = -1;
        pthread_mutex_init(&w->mu, NULL);
    }
    for (unsigned i = 0; i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        err = PW_ERR_NOMEM;
        if (getrandom(w->rng, sizeof w->rng, 0) != (ssize_t)sizeof w->rng) {
            w->rng[0] = pw_clock_mono_ns() ^ ((uint64_t)getpid() << 32);
            w->rng[1] = (uint64_t)pw_clock_wall_ms() * 0x9e3779b97f4a7c15ull + i;
        }
        if (!w->rng[0] && !w->rng[1])
            w->rng[0] = 1;
        w->base = event_base_new();
        if (!w->base)
            goto out;
        w->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->efd < 0) {
            err = PW_ERR_IO;
            goto out;
        }
        w->efd_ev = event_new(w->base, w->efd, EV_READ | EV_PERSIST, efd_cb, w);
        w->drain_timer = evtimer_new(w->base, drain_timer_cb, w);
        w->accept_retry = evtimer_new(w->base, accept_retry_cb, w);
        if (!w->efd_ev || !w->drain_timer || !w->accept_retry || event_add(w->efd_ev, NULL))
            goto out;
        w->listen_fd = bind_one((struct sockaddr *)&ss, sslen, c->backlog);
        if (w->listen_fd < 0) {
            PW_LOG_ERROR("event=http_bind_failed host=%s port=%u error=\"%s\"", c->host,
                         (unsigned)c->port, strerror(errno));
            err = PW_ERR_IO;
            goto out;
        }
        if (i == 0) {
            /* Port 0: the first bind picks the port; every other worker binds the same. */
            struct sockaddr_storage bound;
            socklen_t bl = sizeof bound;
            getsockname(w->listen_fd, (struct sockaddr *)&bound, &bl);
            uint16_t port = bound.ss_family == AF_INET6
                                ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                                : ntohs(((struct sockaddr_in *)&bound)->sin_port);
            srv->port = port;
            if (ss.ss_family == AF_INET6)
                ((struct sockaddr_in6 *)&ss)->sin6_port = htons(port);
            else
                ((struct sockaddr_in *)&ss)->sin_port = htons(port);
        }
        w->listener =
            evconnlistener_new(w->base, accept_cb, w, LEV_OPT_CLOSE_ON_FREE, -1, w->listen_fd);
        if (!w->listener)
            goto out;
        w->listen_fd = -1; /* the listener owns it */
        evconnlistener_set_error_cb(w->listener, accept_error_cb);
    }
    PW_LOG_INFO("event=http_listen host=%s port=%u threads=%u tls=%s", c->host, (unsigned)srv->port,
                srv->n_workers, srv->ssl_ctx ? "on" : "off");
    *out = srv;
    srv = NULL;
    err = PW_OK;
out:
    if (ai)
        freeaddrinfo(ai);
    router_http_server_destroy(srv);
    return err;
}

void router_http_server_destroy(struct router_http_server *srv)
{
    if (!srv)
        return;
    for (unsigned i = 0; srv->workers && i < srv->n_workers; i++) {
        struct worker *w = &srv->workers[i];
        /* Only reached with connections if run() was never called; close them quietly. */
        while (w->conns) {
            struct conn *c = w->conns;
            c->dead = true;
            conn_free(c);
        }
        if (w->listener)
            evconnlistener_free(w->listener);
        if (w->listen_fd >= 0)
            close(w->listen_fd);
        if (w->efd_ev)
            event_free(w->efd_ev);
        if (w->drain_timer)
            event_free(w->drain_timer);
        if (w->accept_retry)
            event_free(w->accept_retry);
        pthread_mutex_lock(&w->mu);
        w->closed = true;
        struct task *t = w->task_head;
        w->task_head = w->task_tail = NULL;
        pthread_mutex_unlock(&w->mu);
        run_tasks(t);
        if (w->efd >= 0)
            close(w->efd);
        if (w->base)
            event_base_free(w->base);
        pthread_mutex_destroy(&w->mu);
        while (w->blk_cache) {
            struct arena_blk *next = w->blk_cache->next;
            free(w->blk_cache);
            w->blk_cache = next;
        }
    }
    free(srv->workers);
    SSL_CTX_free(srv->ssl_ctx);
    free(srv->host);
    free(srv->cert);
    free(srv->key);
    free(srv->spool_dir);
    free(srv);
}

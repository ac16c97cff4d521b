/*
 * pw_redis: URL parsing, the reconnecting async client and the blocking helper.
 *
 * Runs on the thread of the client's event_base. Shape of the async client:
 *
 *   struct pw_redis
 *     cmd conn  --- hiredis async context (or none while waiting to retry)
 *     sub conn  --- second context, only once pw_redis_subscribe() was called
 *     queue     --- commands accepted while cmd is CONNECTING (bounded)
 *     deferred  --- commands that failed before reaching the wire; their callbacks run from
 *                   deferred_ev so no callback ever runs inside pw_redis_command_argv()
 *
 * Each conn goes WAITING -> CONNECTING (TCP connect, AUTH, SELECT, PING pipelined at once) ->
 * READY, and back to WAITING whenever its hiredis context dies. The single place that learns
 * of a context's death is cleanup_hook(), which replaces the libevent adapter's cleanup: in
 * hiredis 0.14 __redisAsyncFree() runs it after every pending reply callback and before the
 * context is freed, on every path (connect failure, I/O error, our own free).
 *
 * Destroy-safety: user callbacks run between cb_depth++ and cb_depth--. pw_redis_destroy()
 * inside one only marks the client; the outermost callback return finishes the job. A context
 * is orphaned on destroy (ac->data = NULL), so hiredis callbacks that arrive during a deferred
 * free find no client and only release their request.
 */
#include "pw_redis.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <event2/event.h>
#include <hiredis/async.h>

#include "pw_clock.h"
#include "pw_log.h"

#if HIREDIS_MAJOR >= 1
/* hiredis 1.x runs the adapter cleanup before pending callbacks; cleanup_hook relies on the
 * 0.14 order (see the top of this file). Revisit conn_lost() before lifting this. */
#error "pw_redis.c is written against hiredis 0.14 teardown order"
#endif

/* ---------------------------------------------------------------------------------------- */
/* Small helpers                                                                            */
/* ---------------------------------------------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static void set_err(char *errbuf, size_t errcap,
                                                          const char *fmt, ...)
{
    if (!errbuf || errcap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errcap, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------------------------------- */
/* URL parsing                                                                              */
/* ---------------------------------------------------------------------------------------- */

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes s[0..len) into out (cap bytes with NUL). Refuses %00 and bad escapes. */
static enum pw_err pct_decode(const char *s, size_t len, char *out, size_t cap, const char *what,
                              char *errbuf, size_t errcap)
{
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        int ch = (unsigned char)s[i];
        if (ch == '%') {
            if (len - i < 3 || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0) {
                set_err(errbuf, errcap, "redis URL: bad percent-escape in %s", what);
                return PW_ERR_CONFIG;
            }
            ch = hexval(s[i + 1]) * 16 + hexval(s[i + 2]);
            if (ch == 0) {
                set_err(errbuf, errcap, "redis URL: %%00 is not allowed in %s", what);
                return PW_ERR_CONFIG;
            }
            i += 2;
        }
        if (o + 1 >= cap) {
            set_err(errbuf, errcap, "redis URL: %s longer than %zu bytes", what, cap - 1);
            return PW_ERR_CONFIG;
        }
        out[o++] = (char)ch;
    }
    out[o] = '\0';
    return PW_OK;
}

/* Parses a decimal in [lo, hi] from s[0..len); digits only. */
static bool parse_uint(const char *s, size_t len, long lo, long hi, long *out)
{
    if (len == 0 || len > 10)
        return false;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static enum pw_err parse_db(const char *s, size_t len, struct pw_redis_url *u, char *errbuf,
                            size_t errcap)
{
    long v;
    if (!parse_uint(s, len, 0, PW_REDIS_DB_MAX, &v)) {
        set_err(errbuf, errcap, "redis URL: database must be a number 0..%d, got \"%.*s\"",
                PW_REDIS_DB_MAX, (int)(len > 32 ? 32 : len), s);
        return PW_ERR_CONFIG;
    }
    u->db = (int)v;
    return PW_OK;
}

static enum pw_err parse_query(const char *q, struct pw_redis_url *u, char *errbuf, size_t errcap)
{
    while (*q) {
        const char *amp = strchr(q, '&');
        size_t plen = amp ? (size_t)(amp - q) : strlen(q);
        const char *eq = memchr(q, '=', plen);
        if (plen == 0) {
            q += amp ? 1 : 0;
            if (!amp)
                break;
            continue;
        }
        if (!eq) {
            set_err(errbuf, errcap, "redis URL: query parameter without '=': \"%.*s\"",
                    (int)(plen > 32 ? 32 : plen), q);
            return PW_ERR_CONFIG;
        }
        size_t klen = (size_t)(eq - q);
        const char *v = eq + 1;
        size_t vlen = plen - klen - 1;
        enum pw_err err;
        if (klen == 2 && memcmp(q, "db", 2) == 0)
            err = parse_db(v, vlen, u, errbuf, errcap);
        else if (klen == 8 && memcmp(q, "password", 8) == 0)
            err = pct_decode(v, vlen, u->password, sizeof u->password, "password", errbuf, errcap);
        else if (klen == 4 && memcmp(q, "user", 4) == 0)
            err = pct_decode(v, vlen, u->user, sizeof u->user, "user", errbuf, errcap);
        else {
            set_err(errbuf, errcap,
                    "redis URL: unknown query parameter \"%.*s\" (known: db, user, password)",
                    (int)(klen > 32 ? 32 : klen), q);
            err = PW_ERR_CONFIG;
        }
        if (err)
            return err;
        if (!amp)
            break;
        q = amp + 1;
    }
    return PW_OK;
}

static bool host_char_ok(int ch)
{
    return isalnum(ch) || ch == '.' || ch == '-' || ch == '_';
}

static bool v6_char_ok(int ch)
{
    return isxdigit(ch) || ch == ':' || ch == '.';
}

static enum pw_err parse_tcp(const char *rest, struct pw_redis_url *u, char *errbuf, size_t errcap)
{
    enum pw_err err;
    size_t alen = strcspn(rest, "/?");
    const char *auth = rest;
    const char *after = rest + alen;

    /* userinfo: everything before the last '@' of the authority */
    const char *at = NULL;
    for (const char *p = auth; p < auth + alen; p++) {
        if (*p == '@')
            at = p;
    }
    const char *hp = auth;
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        if (!colon) {
            set_err(errbuf, errcap,
                    "redis URL: credentials must be written user:password@ or :password@");
            return PW_ERR_CONFIG;
        }
        err = pct_decode(auth, (size_t)(colon - auth), u->user, sizeof u->user, "user", errbuf,
                         errcap);
        if (err)
            return err;
        err = pct_decode(colon + 1, (size_t)(at - colon - 1), u->password, sizeof u->password,
                         "password", errbuf, errcap);
        if (err)
            return err;
        hp = at + 1;
    }
    size_t hplen = (size_t)(auth + alen - hp);
    const char *port_s = NULL;
    size_t port_len = 0;
    if (hplen > 0 && hp[0] == '[') {
        const char *close = memchr(hp, ']', hplen);
        if (!close) {
            set_err(errbuf, errcap, "redis URL: missing ']' after IPv6 address");
            return PW_ERR_CONFIG;
        }
        size_t hlen = (size_t)(close - hp - 1);
        if (hlen == 0 || hlen >= sizeof u->host) {
            set_err(errbuf, errcap, "redis URL: bad IPv6 address length");
            return PW_ERR_CONFIG;
        }
        for (size_t i = 0; i < hlen; i++) {
            if (!v6_char_ok((unsigned char)hp[1 + i])) {
                set_err(errbuf, errcap, "redis URL: bad character in IPv6 address");
                return PW_ERR_CONFIG;
            }
        }
        memcpy(u->host, hp + 1, hlen);
        u->host[hlen] = '\0';
        const char *tail = close + 1;
        size_t tlen = (size_t)(hp + hplen - tail);
        if (tlen > 0) {
            if (tail[0] != ':') {
                set_err(errbuf, errcap, "redis URL: unexpected text after ']'");
                return PW_ERR_CONFIG;
            }
            port_s = tail + 1;
            port_len = tlen - 1;
        }
    } else {
        const char *colon = memchr(hp, ':', hplen);
        size_t hlen = colon ? (size_t)(colon - hp) : hplen;
        if (colon && memchr(colon + 1, ':', hplen - hlen - 1)) {
            set_err(errbuf, errcap,
                    "redis URL: an IPv6 host must be written in brackets, "
                    "e.g. redis://[::1]:6379");
            return PW_ERR_CONFIG;
        }
        if (hlen == 0) {
            set_err(errbuf, errcap, "redis URL: missing host");
            return PW_ERR_CONFIG;
        }
        if (hlen >= sizeof u->host) {
            set_err(errbuf, errcap, "redis URL: host longer than %zu bytes", sizeof u->host - 1);
            return PW_ERR_CONFIG;
        }
        for (size_t i = 0; i < hlen; i++) {
            if (!host_char_ok((unsigned char)hp[i])) {
                set_err(errbuf, errcap, "redis URL: bad character in host");
                return PW_ERR_CONFIG;
            }
        }
        memcpy(u->host, hp, hlen);
        u->host[hlen] = '\0';
        if (colon) {
            port_s = colon + 1;
            port_len = hplen - hlen - 1;
        }
    }
    if (port_s) {
        long port;
        if (!parse_uint(port_s, port_len, 1, 65535, &port)) {
            set_err(errbuf, errcap, "redis URL: port must be a number 1..65535, got \"%.*s\"",
                    (int)(port_len > 16 ? 16 : port_len), port_s);
            return PW_ERR_CONFIG;
        }
        u->port = (int)port;
    }
    /* optional /db, then optional ?query */
    if (*after == '/') {
        const char *p = after + 1;
        size_t plen = strcspn(p, "?");
        if (plen > 0) {
            err = parse_db(p, plen, u, errbuf, errcap);
            if (err)
                return err;
        }
        after = p + plen;
    }
    if (*after == '?')
        return parse_query(after + 1, u, errbuf, errcap);
    return PW_OK;
}

static enum pw_err parse_unix(const char *rest, struct pw_redis_url *u, char *errbuf, size_t errcap)
{
    if (rest[0] != '/') {
        set_err(errbuf, errcap,
                "redis URL: unix socket path must be absolute, e.g. unix:///run/redis.sock");
        return PW_ERR_CONFIG;
    }
    size_t plen = strcspn(rest, "?");
    enum pw_err err =
        pct_decode(rest, plen, u->path, sizeof u->path, "socket path", errbuf, errcap);
    if (err)
        return err;
    if (u->path[1] == '\0' || u->path[strlen(u->path) - 1] == '/') {
        set_err(errbuf, errcap, "redis URL: unix socket path names a directory");
        return PW_ERR_CONFIG;
    }
    if (rest[plen] == '?')
        return parse_query(rest + plen + 1, u, errbuf, errcap);
    return PW_OK;
}

enum pw_err pw_redis_url_parse(const char *url, struct pw_redis_url *out, char *errbuf,
                               size_t errcap)
{
    if (!url || !out) {
        set_err(errbuf, errcap, "redis URL: missing");
        return PW_ERR_INVAL;
    }
    struct pw_redis_url u;
    memset(&u, 0, sizeof u);
    u.port = PW_REDIS_DEFAULT_PORT;
    enum pw_err err;
    for (const char *p = url; *p; p++) {
        if ((unsigned char)*p <= 0x20 || *p == 0x7f) {
            set_err(errbuf, errcap, "redis URL: contains a space or control character");
            return PW_ERR_CONFIG;
        }
    }
    if (strncmp(url, "redis://", 8) == 0) {
        u.transport = PW_REDIS_TCP;
        err = parse_tcp(url + 8, &u, errbuf, errcap);
    } else if (strncmp(url, "unix://", 7) == 0) {
        u.transport = PW_REDIS_UNIX;
        err = parse_unix(url + 7, &u, errbuf, errcap);
    } else if (strncmp(url, "rediss://", 9) == 0) {
        set_err(errbuf, errcap,
                "redis URL: rediss:// (TLS) is not supported; use redis:// "
                "over a trusted network or unix://");
        err = PW_ERR_CONFIG;
    } else {
        set_err(errbuf, errcap, "redis URL: must start with redis:// or unix://");
        err = PW_ERR_CONFIG;
    }
    if (err)
        return err;
    *out = u;
    return PW_OK;
}

const char *pw_redis_url_addr(const struct pw_redis_url *u, char *buf, size_t cap)
{
    if (u->transport == PW_REDIS_UNIX)
        snprintf(buf, cap, "unix:%s", u->path);
    else if (strchr(u->host, ':'))
        snprintf(buf, cap, "[%s]:%d", u->host, u->port);
    else
        snprintf(buf, cap, "%s:%d", u->host, u->port);
    return buf;
}

/* ---------------------------------------------------------------------------------------- */
/* Reply caps inside the hiredis reader                                                     */
/* ---------------------------------------------------------------------------------------- */

static redisReplyObjectFunctions capped_fns;
static void *(*default_create_array)(const redisReadTask *, int);
static pthread_once_t caps_once = PTHREAD_ONCE_INIT;

static void *capped_create_array(const redisReadTask *task, int elements)
{
    if (elements < 0 || (size_t)elements > PW_REDIS_MAX_ARRAY) {
        /* hiredis turns NULL into a reader error and drops the connection */
        PW_LOG_WARN("event=redis_reply_too_big elements=%d max=%u", elements,
                    (unsigned)PW_REDIS_MAX_ARRAY);
        return NULL;
    }
    return default_create_array(task, elements);
}

static void caps_init(void)
{
    /* The default builders are static inside hiredis; borrow them from a fresh reader. */
    redisReader *tmp = redisReaderCreate();
    PW_ASSERT(tmp && tmp->fn);
    capped_fns = *tmp->fn;
    default_create_array = tmp->fn->createArray;
    capped_fns.createArray = capped_create_array;
    redisReaderFree(tmp);
}

void pw_redis_reader_install_caps(redisReader *reader)
{
    pthread_once(&caps_once, caps_init);
    if (reader && reader->fn && reader->fn != &capped_fns)
        reader->fn = &capped_fns;
}

/* ---------------------------------------------------------------------------------------- */
/* Async client: types                                                                      */
/* ---------------------------------------------------------------------------------------- */

#define ERRSTR_MAX 256

/* One command from acceptance to callback. Lives in exactly one list, or is owned by hiredis
 * (privdata of a written command) until req_reply_cb frees it. */
struct req {
    struct req *prev, *next;
    pw_redis_reply_cb cb;
    void *userdata;
    sds cmd;              /* serialised command until written to hiredis, then NULL */
    enum pw_err fail_err; /* for the deferred list */
    char fail_str[ERRSTR_MAX];
};

struct reqlist {
    struct req *head, *tail;
    size_t n;     /* requests */
    size_t bytes; /* serialised bytes (queue only) */
};

enum conn_state {
    CONN_WAITING = 0, /* no context; timer armed for the next attempt */
    CONN_CONNECTING,  /* context exists; handshake not finished; timer = deadline */
    CONN_READY,       /* handshake done */
};

struct conn {
    struct pw_redis *r;
    const char *kind;      /* "cmd" or "sub", for logs */
    redisAsyncContext *ac; /* NULL while WAITING */
    enum conn_state state;
    struct event *timer;   /* retry delay (WAITING) or handshake deadline (CONNECTING) */
    unsigned attempt;      /* attempts since the last READY */
    uint32_t backoff_ms;   /* base of the next retry delay */
    bool handshake_failed; /* a handshake reply was an error; disconnecting */
    enum pw_err down_err;  /* why we are tearing the context down ourselves */
    char down_reason[ERRSTR_MAX];
    enum pw_err last_err;    /* why the last attempt or connection ended */
    char errstr[ERRSTR_MAX]; /* its text */
    struct reqlist inflight; /* written, reply pending (cmd conn only) */
};

struct sub_entry {
    char *channel; /* owned */
    size_t len;
    pw_redis_message_cb cb;
    void *userdata;
};

struct pw_redis {
    struct event_base *base; /* borrowed */
    struct pw_redis_url url;
    char addr[PW_REDIS_HOST_MAX + PW_REDIS_PATH_MAX + 16]; /* for logs; no credentials */
    char name[32];
    struct pw_redis_opts opts; /* defaults resolved; name not kept (see name[]) */

    struct conn cmd;
    struct conn sub;
    bool sub_started;
    struct sub_entry *subs;
    size_t n_subs, cap_subs;

    struct reqlist queue;    /* waiting for the cmd handshake */
    struct reqlist deferred; /* failed before the wire; callbacks run from deferred_ev */
    struct event *deferred_ev;

    unsigned cb_depth;    /* user callbacks on the stack */
    bool destroy_pending; /* destroy asked inside a callback */
    bool destroying;
    uint64_t rng; /* xorshift state for jitter */
};

static void conn_start(struct conn *c);

/* ---------------------------------------------------------------------------------------- */
/* Lists                                                                                    */
/* ---------------------------------------------------------------------------------------- */

static void list_push(struct reqlist *l, struct req *q)
{
    q->next = NULL;
    q->prev = l->tail;
    if (l->tail)
        l->tail->next = q;
    else
        l->head = q;
    l->tail = q;
    l->n++;
    l->bytes += q->cmd ? sdslen(q->cmd) : 0;
}

static void list_remove(struct reqlist *l, struct req *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        l->head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        l->tail = q->prev;
    q->prev = q->next = NULL;
    l->n--;
    l->bytes -= q->cmd ? sdslen(q->cmd) : 0;
}

static void req_free(struct req *q)
{
    if (!q)
        return;
    if (q->cmd)
        sdsfree(q->cmd);
    free(q);
}

/* ---------------------------------------------------------------------------------------- */
/* Calling user code                                                                        */
/* ---------------------------------------------------------------------------------------- */

static void destroy_now(struct pw_redis *r);

/* Returns true when the client was destroyed by the callback: touch nothing of r after. */
static bool call_reply(struct pw_redis *r, struct req *q, const redisReply *reply, enum pw_err err,
                       const char *errstr)
{
    pw_redis_reply_cb cb = q->cb;
    q->cb = NULL;
    if (!cb)
        return false;
    r->cb_depth++;
    cb(r, reply, err, errstr, q->userdata);
    r->cb_depth--;
    if (r->cb_depth == 0 && r->destroy_pending && !r->destroying) {
        destroy_now(r);
        return true;
    }
    return false;
}

/* Queues q's failure; its callback runs from the loop (never inside the caller's call). */
__attribute__((format(printf, 4, 5))) static void fail_later(struct pw_redis *r, struct req *q,
                                                             enum pw_err err, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->fail_str, sizeof q->fail_str, fmt, ap);
    va_end(ap);
    q->fail_err = err;
    if (q->cmd) {
        sdsfree(q->cmd);
        q->cmd = NULL;
    }
    list_push(&r->deferred, q);
    event_active(r->deferred_ev, EV_TIMEOUT, 0);
}

static void deferred_cb(evutil_socket_t fd, short what, void *arg)
{
    struct pw_redis *r = arg;
    /* Only what is there now: a callback that retries (and fails again) waits one turn. */
    size_t n = r->deferred.n;
    while (n-- > 0 && r->deferred.head) {
        struct req *q = r->deferred.head;
        list_remove(&r->deferred, q);
        bool gone = call_reply(r, q, NULL, q->fail_err, q->fail_str);
        req_free(q);
        if (gone)
            return;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Connections                                                                              */
/* ---------------------------------------------------------------------------------------- */

static uint32_t next_delay_ms(struct conn *c)
{
    struct pw_redis *r = c->r;
    uint32_t base = c->backoff_ms;
    /* "equal jitter": half fixed, half random, so restarts of many clients spread out */
    r->rng ^= r->rng << 13;
    r->rng ^= r->rng >> 7;
    r->rng ^= r->rng << 17;
    uint32_t half = base / 2;
    uint32_t delay = half + (uint32_t)(r->rng % ((uint64_t)half + 1));
    uint64_t doubled = (uint64_t)base * 2;
    c->backoff_ms = doubled > r->opts.backoff_max_ms ? r->opts.backoff_max_ms : (uint32_t)doubled;
    return delay;
}

static void arm_timer(struct conn *c, uint32_t ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(c->timer, &tv);
}

static enum pw_err conn_fail_code(const struct conn *c)
{
    return c->last_err == PW_ERR_AUTH ? PW_ERR_AUTH : PW_ERR_REDIS;
}

/* The context of c is gone (or never came up). Runs inside hiredis teardown: only records,
 * moves queued commands to the deferred list and arms the retry timer. */
static void conn_lost(struct conn *c, enum pw_err err, const char *reason)
{
    struct pw_redis *r = c->r;
    bool was_ready = c->state == CONN_READY;
    char q[ERRSTR_MAX + 8];

    c->ac = NULL;
    c->state = CONN_WAITING;
    evtimer_del(c->timer);
    c->last_err = err;
    snprintf(c->errstr, sizeof c->errstr, "%s", reason);
    if (r->destroying)
        return;

    pw_log_quote(q, sizeof q, reason);
    if (was_ready) {
        PW_LOG_WARN("event=redis_disconnected conn=%s name=%s addr=%s err=%s", c->kind, r->name,
                    r->addr, q);
        c->attempt = 0;
        c->backoff_ms = r->opts.backoff_initial_ms;
    }
    uint32_t delay = next_delay_ms(c);
    if (!was_ready) {
        /* the first attempts and every tenth after: a long outage stays readable */
        if (c->attempt <= 3 || c->attempt % 10 == 0 || err == PW_ERR_AUTH)
            PW_LOG_WARN("event=redis_connect_failed conn=%s name=%s addr=%s attempt=%u "
                        "retry_ms=%u err=%s",
                        c->kind, r->name, r->addr, c->attempt, delay, q);
        else
            PW_LOG_DEBUG("event=redis_connect_failed conn=%s name=%s addr=%s attempt=%u "
                         "retry_ms=%u err=%s",
                         c->kind, r->name, r->addr, c->attempt, delay, q);
    }
    if (c == &r->cmd) {
        enum pw_err code = conn_fail_code(c);
        while (r->queue.head) {
            struct req *qr = r->queue.head;
            list_remove(&r->queue, qr);
            fail_later(r, qr, code, "redis not connected: %s", reason);
        }
    }
    arm_timer(c, delay);
}

/* ---- event-loop adapter ----------------------------------------------------------------
 * Replaces hiredis's libevent adapter, which costs about four epoll_ctl calls per command: its
 * read event is not persistent (removed when it fires, added back by hiredis) and every
 * command adds write interest, waits a loop turn for EPOLLOUT, then removes it. Here the read
 * event is persistent, and a command's write is attempted from a user event activated on the
 * same loop turn (all commands issued by one callback go out in one write); write interest
 * on the socket is only taken while connecting or after a short write. */
struct ev_adapter {
    redisAsyncContext *context;
    struct event *rev;  /* EV_READ | EV_PERSIST */
    struct event *wev;  /* EV_WRITE, one shot: connect completion, socket buffer full */
    struct event *kick; /* no fd: write now, later on this loop turn */
    bool reading;
    bool writing; /* inside a write attempt: "write more" means wait for EPOLLOUT */
};

static void ev_handle_write(struct ev_adapter *e)
{
    e->writing = (e->context->c.flags & REDIS_CONNECTED) != 0;
    redisAsyncHandleWrite(e->context); /* may free e (cleanup_hook) */
}

static void ev_read_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct ev_adapter *e = arg;
    redisAsyncHandleRead(e->context);
}

static void ev_write_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    ev_handle_write(arg);
}

static void ev_add_read(void *privdata)
{
    struct ev_adapter *e = privdata;
    if (!e->reading && event_add(e->rev, NULL) == 0)
        e->reading = true;
}

static void ev_del_read(void *privdata)
{
    struct ev_adapter *e = privdata;
    if (e->reading) {
        event_del(e->rev);
        e->reading = false;
    }
}

static void ev_add_write(void *privdata)
{
    struct ev_adapter *e = privdata;
    if (!(e->context->c.flags & REDIS_CONNECTED) || e->writing) {
        e->writing = false;
        if (!event_pending(e->wev, EV_WRITE, NULL))
            event_add(e->wev, NULL);
        return;
    }
    if (!event_pending(e->wev, EV_WRITE, NULL))
        event_active(e->kick, EV_WRITE, 1); /* no-op while already active */
}

static void ev_del_write(void *privdata)
{
    struct ev_adapter *e = privdata;
    e->writing = false;
    if (event_pending(e->wev, EV_WRITE, NULL))
        event_del(e->wev);
}

static void ev_cleanup(void *privdata)
{
    struct ev_adapter *e = privdata;
    event_free(e->rev);
    event_free(e->wev);
    event_free(e->kick); /* also takes it off the active queue */
    free(e);
}

static int ev_attach(redisAsyncContext *ac, struct event_base *base)
{
    if (ac->ev.data)
        return REDIS_ERR;
    struct ev_adapter *e = calloc(1, sizeof *e);
    if (!e)
        return REDIS_ERR;
    e->context = ac;
    e->rev = event_new(base, ac->c.fd, EV_READ | EV_PERSIST, ev_read_cb, e);
    e->wev = event_new(base, ac->c.fd, EV_WRITE, ev_write_cb, e);
    e->kick = event_new(base, -1, 0, ev_write_cb, e);
    if (!e->rev || !e->wev || !e->kick) {
        if (e->rev)
            event_free(e->rev);
        if (e->wev)
            event_free(e->wev);
        if (e->kick)
            event_free(e->kick);
        free(e);
        return REDIS_ERR;
    }
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    ac->ev.data = e;
    ev_add_read(e);
    event_add(e->wev, NULL); /* connect completion */
    return REDIS_OK;
}

/* Replaces ev_cleanup: the one notice that a context is being freed. */
static void cleanup_hook(void *privdata)
{
    struct ev_adapter *e = privdata;
    redisAsyncContext *ac = e->context;
    struct conn *c = ac->data;
    ev_cleanup(e);
    if (!c)
        return; /* orphaned by destroy */
    ac->data = NULL;
    char reason[ERRSTR_MAX];
    enum pw_err err = PW_ERR_REDIS;
    if (c->down_reason[0]) {
        snprintf(reason, sizeof reason, "%s", c->down_reason);
        err = c->down_err;
    } else if (ac->c.err) {
        snprintf(reason, sizeof reason, "%s: %s",
                 c->state == CONN_READY ? "connection lost" : "connect failed", ac->c.errstr);
    } else {
        snprintf(reason, sizeof reason, "connection closed");
    }
    conn_lost(c, err, reason);
}

static void flush_queue(struct pw_redis *r);
static void send_subscribe(struct conn *c, size_t first, size_t count);

static void conn_ready(struct conn *c)
{
    struct pw_redis *r = c->r;
    evtimer_del(c->timer);
    c->state = CONN_READY;
    PW_LOG_INFO("event=redis_connected conn=%s name=%s addr=%s attempt=%u", c->kind, r->name,
                r->addr, c->attempt);
    c->attempt = 0;
    c->backoff_ms = r->opts.backoff_initial_ms;
    c->last_err = PW_OK;
    c->errstr[0] = '\0';
    if (c == &r->cmd)
        flush_queue(r);
    else if (r->n_subs > 0)
        send_subscribe(c, 0, r->n_subs);
}

static const char hs_auth, hs_select, hs_ping; /* handshake step tags (privdata) */

static void handshake_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct conn *c = ac->data;
    redisReply *rep = reply;
    if (!c || !rep || c->handshake_failed)
        return; /* orphaned, dying (cleanup_hook reports), or already failing */
    if (rep->type == REDIS_REPLY_ERROR) {
        const char *msg = rep->str ? rep->str : "";
        if (privdata == &hs_auth) {
            c->down_err = PW_ERR_AUTH;
            snprintf(c->down_reason, sizeof c->down_reason, "AUTH failed: %s", msg);
        } else if (strncmp(msg, "NOAUTH", 6) == 0) {
            c->down_err = PW_ERR_AUTH;
            snprintf(c->down_reason, sizeof c->down_reason,
                     "server requires a password (none in the URL): %s", msg);
        } else if (privdata == &hs_select) {
            c->down_err = PW_ERR_REDIS;
            snprintf(c->down_reason, sizeof c->down_reason, "SELECT %d failed: %s", c->r->url.db,
                     msg);
        } else {
            c->down_err = PW_ERR_REDIS;
            snprintf(c->down_reason, sizeof c->down_reason, "handshake failed: %s", msg);
        }
        c->handshake_failed = true;
        /* clean close after the remaining handshake replies; cleanup_hook reports */
        redisAsyncDisconnect(ac);
        return;
    }
    if (privdata == &hs_ping)
        conn_ready(c);
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    if (c->state == CONN_WAITING) {
        conn_start(c);
    } else if (c->state == CONN_CONNECTING && c->ac) {
        c->down_err = PW_ERR_REDIS;
        snprintf(c->down_reason, sizeof c->down_reason, "connect timed out after %u ms",
                 (unsigned)c->r->opts.connect_timeout_ms);
        redisAsyncFree(c->ac); /* runs cleanup_hook -> conn_lost */
    }
}

static void sub_message_cb(redisAsyncContext *ac, void *reply, void *privdata);

static void conn_start(struct conn *c)
{
    struct pw_redis *r = c->r;
    const struct pw_redis_url *u = &r->url;
    char reason[ERRSTR_MAX];

    c->attempt++;
    c->handshake_failed = false;
    c->down_reason[0] = '\0';
    c->down_err = PW_OK;
    c->state = CONN_CONNECTING;

    redisAsyncContext *ac = u->transport == PW_REDIS_UNIX ? redisAsyncConnectUnix(u->path)
                                                          : redisAsyncConnect(u->host, u->port);
    if (!ac) {
        conn_lost(c, PW_ERR_NOMEM, "out of memory");
        return;
    }
    if (ac->err) {
        snprintf(reason, sizeof reason, "connect failed: %s", ac->errstr);
        redisAsyncFree(ac); /* not attached: no hooks run */
        conn_lost(c, PW_ERR_REDIS, reason);
        return;
    }
    pw_redis_reader_install_caps(ac->c.reader);
    if (ev_attach(ac, r->base) != REDIS_OK) {
        redisAsyncFree(ac);
        conn_lost(c, PW_ERR_INTERNAL, "cannot attach to the event loop");
        return;
    }
    ac->ev.cleanup = cleanup_hook;
    ac->data = c;
    c->ac = ac;

    /* Pipelined at once; hiredis writes them when the socket becomes writable. Commands of
     * users stay in r->queue until the PING reply proves the handshake done. */
    int rc = REDIS_OK;
    if (u->password[0]) {
        const char *argv[3] = {"AUTH", u->user, u->password};
        if (u->user[0])
            rc = redisAsyncCommandArgv(ac, handshake_cb, (void *)&hs_auth, 3, argv, NULL);
        else {
            argv[1] = u->password;
            rc = redisAsyncCommandArgv(ac, handshake_cb, (void *)&hs_auth, 2, argv, NULL);
        }
    }
    if (rc == REDIS_OK && u->db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", u->db);
        const char *argv[2] = {"SELECT", db};
        rc = redisAsyncCommandArgv(ac, handshake_cb, (void *)&hs_select, 2, argv, NULL);
    }
    if (rc == REDIS_OK) {
        const char *argv[1] = {"PING"};
        rc = redisAsyncCommandArgv(ac, handshake_cb, (void *)&hs_ping, 1, argv, NULL);
    }
    if (rc != REDIS_OK) {
        c->down_err = PW_ERR_NOMEM;
        snprintf(c->down_reason, sizeof c->down_reason, "cannot queue the handshake");
        redisAsyncFree(ac); /* cleanup_hook -> conn_lost */
        return;
    }
    arm_timer(c, r->opts.connect_timeout_ms);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands                                                                                 */
/* ---------------------------------------------------------------------------------------- */

static void req_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct req *q = privdata;
    struct conn *c = ac->data;
    if (!c) {
        req_free(q); /* orphaned: destroy already called its callback */
        return;
    }
    struct pw_redis *r = c->r;
    list_remove(&c->inflight, q);
    redisReply *rep = reply;
    if (!rep) {
        char why[ERRSTR_MAX];
        snprintf(why, sizeof why, "connection lost before the reply: %s",
                 ac->c.err ? ac->c.errstr : "closed");
        call_reply(r, q, NULL, PW_ERR_REDIS, why);
    } else if (rep->type == REDIS_REPLY_ERROR) {
        call_reply(r, q, rep, PW_ERR_REDIS, rep->str ? rep->str : "error");
    } else {
        call_reply(r, q, rep, PW_OK, NULL);
    }
    req_free(q);
}

static void send_req(struct pw_redis *r, struct req *q)
{
    struct conn *c = &r->cmd;
    if (redisAsyncFormattedCommand(c->ac, req_reply_cb, q, q->cmd, sdslen(q->cmd)) != REDIS_OK) {
        fail_later(r, q, PW_ERR_REDIS, "redis connection is closing");
        return;
    }
    sdsfree(q->cmd);
    q->cmd = NULL;
    list_push(&c->inflight, q);
}

static void flush_queue(struct pw_redis *r)
{
    while (r->queue.head && r->cmd.state == CONN_READY) {
        struct req *q = r->queue.head;
        list_remove(&r->queue, q);
        send_req(r, q);
    }
}

enum pw_err pw_redis_command_argv(struct pw_redis *r, int argc, const char *const *argv,
                                  const size_t *argvlen, pw_redis_reply_cb cb, void *userdata)
{
    if (!r || !argv || argc < 1 || argc > PW_REDIS_MAX_ARGC)
        return PW_ERR_INVAL;
    if (r->destroy_pending || r->destroying)
        return PW_ERR_CLOSED;
    size_t *lens = NULL;
    if (!argvlen) {
        lens = malloc(sizeof *lens * (size_t)argc);
        if (!lens)
            return PW_ERR_NOMEM;
        for (int i = 0; i < argc; i++) {
            if (!argv[i]) {
                free(lens);
                return PW_ERR_INVAL;
            }
            lens[i] = strlen(argv[i]);
        }
        argvlen = lens;
    }
    struct req *q = calloc(1, sizeof *q);
    if (!q) {
        free(lens);
        return PW_ERR_NOMEM;
    }
    /* the cast only drops the inner const hiredis 0.14 forgot to declare */
    if (redisFormatSdsCommandArgv(&q->cmd, argc, (const char **)argv, argvlen) < 0) {
        free(lens);
        free(q);
        return PW_ERR_NOMEM;
    }
    free(lens);
    q->cb = cb;
    q->userdata = userdata;

    struct conn *c = &r->cmd;
    switch (c->state) {
    case CONN_READY:
        send_req(r, q);
        break;
    case CONN_CONNECTING:
        if (r->queue.n >= r->opts.max_queued ||
            r->queue.bytes + sdslen(q->cmd) > r->opts.max_queued_bytes)
            fail_later(r, q, PW_ERR_REDIS,
                       "redis still connecting and %zu commands (%zu bytes) already wait",
                       r->queue.n, r->queue.bytes);
        else
            list_push(&r->queue, q);
        break;
    case CONN_WAITING:
        fail_later(r, q, conn_fail_code(c), "redis not connected: %s",
                   c->errstr[0] ? c->errstr : "waiting to reconnect");
        break;
    }
    return PW_OK;
}

enum pw_err pw_redis_command(struct pw_redis *r, pw_redis_reply_cb cb, void *userdata, ...)
{
    const char *argv[64];
    int argc = 0;
    va_list ap;
    va_start(ap, userdata);
    const char *s;
    while ((s = va_arg(ap, const char *)) != NULL) {
        if (argc == (int)(sizeof argv / sizeof argv[0])) {
            va_end(ap);
            return PW_ERR_INVAL;
        }
        argv[argc++] = s;
    }
    va_end(ap);
    return pw_redis_command_argv(r, argc, argv, NULL, cb, userdata);
}

/* ---------------------------------------------------------------------------------------- */
/* Pub/sub                                                                                  */
/* ---------------------------------------------------------------------------------------- */

static void sub_message_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct conn *c = ac->data;
    redisReply *rep = reply;
    if (!c || !rep)
        return;
    struct pw_redis *r = c->r;
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3)
        return;
    redisReply *kind = rep->element[0], *ch = rep->element[1], *msg = rep->element[2];
    if (kind->type != REDIS_REPLY_STRING || ch->type != REDIS_REPLY_STRING ||
        msg->type != REDIS_REPLY_STRING)
        return; /* "subscribe" confirmations carry an integer */
    if (kind->len != 7 || memcmp(kind->str, "message", 7) != 0)
        return;
    for (size_t i = 0; i < r->n_subs; i++) {
        struct sub_entry *s = &r->subs[i];
        if (s->len == ch->len && memcmp(s->channel, ch->str, ch->len) == 0) {
            r->cb_depth++;
            s->cb(r, ch->str, ch->len, msg->str, msg->len, s->userdata);
            r->cb_depth--;
            if (r->cb_depth == 0 && r->destroy_pending && !r->destroying)
                destroy_now(r);
            return;
        }
    }
}

static void send_subscribe(struct conn *c, size_t first, size_t count)
{
    struct pw_redis *r = c->r;
    const char **argv = malloc(sizeof *argv * (count + 1));
    size_t *lens = malloc(sizeof *lens * (count + 1));
    if (!argv || !lens) {
        PW_LOG_ERROR("event=redis_subscribe_failed name=%s err=nomem", r->name);
        goto out;
    }
    argv[0] = "SUBSCRIBE";
    lens[0] = 9;
    for (size_t i = 0; i < count; i++) {
        argv[1 + i] = r->subs[first + i].channel;
        lens[1 + i] = r->subs[first + i].len;
    }
    if (redisAsyncCommandArgv(c->ac, sub_message_cb, NULL, (int)(count + 1), argv, lens) !=
        REDIS_OK)
        PW_LOG_ERROR("event=redis_subscribe_failed name=%s err=not_writable", r->name);
out:
    free(argv);
    free(lens);
}

enum pw_err pw_redis_subscribe(struct pw_redis *r, const char *channel, pw_redis_message_cb cb,
                               void *userdata)
{
    if (!r || !channel || !channel[0] || !cb)
        return PW_ERR_INVAL;
    if (r->destroy_pending || r->destroying)
        return PW_ERR_CLOSED;
    size_t len = strlen(channel);
    for (size_t i = 0; i < r->n_subs; i++) {
        if (r->subs[i].len == len && memcmp(r->subs[i].channel, channel, len) == 0)
            return PW_ERR_EXISTS;
    }
    if (r->n_subs >= PW_REDIS_MAX_ARGC - 1)
        return PW_ERR_TOOBIG;
    if (r->n_subs == r->cap_subs) {
        size_t cap = r->cap_subs ? r->cap_subs * 2 : 4;
        struct sub_entry *v = realloc(r->subs, cap * sizeof *v);
        if (!v)
            return PW_ERR_NOMEM;
        r->subs = v;
        r->cap_subs = cap;
    }
    char *copy = strdup(channel);
    if (!copy)
        return PW_ERR_NOMEM;
    r->subs[r->n_subs++] = (struct sub_entry){copy, len, cb, userdata};
    if (!r->sub_started) {
        r->sub_started = true;
        conn_start(&r->sub); /* subscribes to everything once READY */
    } else if (r->sub.state == CONN_READY) {
        send_subscribe(&r->sub, r->n_subs - 1, 1);
    }
    return PW_OK;
}

bool pw_redis_subscriber_is_connected(const struct pw_redis *r)
{
    return r && r->sub.state == CONN_READY;
}

/* ---------------------------------------------------------------------------------------- */
/* Lifecycle                                                                                */
/* ---------------------------------------------------------------------------------------- */

static enum pw_err conn_init(struct pw_redis *r, struct conn *c, const char *kind)
{
    c->r = r;
    c->kind = kind;
    c->state = CONN_WAITING;
    c->backoff_ms = r->opts.backoff_initial_ms;
    c->timer = evtimer_new(r->base, conn_timer_cb, c);
    return c->timer ? PW_OK : PW_ERR_NOMEM;
}

enum pw_err pw_redis_create(struct event_base *base, const char *url,
                            const struct pw_redis_opts *opts, struct pw_redis **out, char *errbuf,
                            size_t errcap)
{
    if (!base || !url || !out) {
        set_err(errbuf, errcap, "pw_redis_create: missing argument");
        return PW_ERR_INVAL;
    }
    *out = NULL;
    struct pw_redis *r = calloc(1, sizeof *r);
    if (!r) {
        set_err(errbuf, errcap, "out of memory");
        return PW_ERR_NOMEM;
    }
    enum pw_err err = pw_redis_url_parse(url, &r->url, errbuf, errcap);
    if (err)
        goto out;
    r->base = base;
    if (opts)
        r->opts = *opts;
    if (!r->opts.connect_timeout_ms)
        r->opts.connect_timeout_ms = 2000;
    if (!r->opts.backoff_initial_ms)
        r->opts.backoff_initial_ms = 100;
    if (!r->opts.backoff_max_ms)
        r->opts.backoff_max_ms = 5000;
    if (r->opts.backoff_max_ms < r->opts.backoff_initial_ms)
        r->opts.backoff_max_ms = r->opts.backoff_initial_ms;
    if (!r->opts.max_queued)
        r->opts.max_queued = 1024;
    if (!r->opts.max_queued_bytes)
        r->opts.max_queued_bytes = (size_t)16 << 20;
    pw_log_quote(r->name, sizeof r->name, r->opts.name ? r->opts.name : "redis");
    r->opts.name = NULL;
    pw_redis_url_addr(&r->url, r->addr, sizeof r->addr);
    r->rng = pw_clock_mono_ns() ^ (uint64_t)(uintptr_t)r ^ 0x9e3779b97f4a7c15ull;
    if (!r->rng)
        r->rng = 1;

    err = PW_ERR_NOMEM;
    set_err(errbuf, errcap, "out of memory");
    r->deferred_ev = event_new(base, -1, 0, deferred_cb, r);
    if (!r->deferred_ev)
        goto out;
    if (conn_init(r, &r->cmd, "cmd") || conn_init(r, &r->sub, "sub"))
        goto out;
    if (errbuf && errcap)
        errbuf[0] = '\0';
    conn_start(&r->cmd);
    *out = r;
    return PW_OK;
out:
    if (r->cmd.timer)
        event_free(r->cmd.timer);
    if (r->sub.timer)
        event_free(r->sub.timer);
    if (r->deferred_ev)
        event_free(r->deferred_ev);
    free(r);
    return err;
}

static void cancel_list(struct pw_redis *r, struct reqlist *l)
{
    while (l->head) {
        struct req *q = l->head;
        list_remove(l, q);
        if (q->cb)
            q->cb(r, NULL, PW_ERR_CANCELLED, "redis client destroyed", q->userdata);
        req_free(q);
    }
}

static void conn_close(struct pw_redis *r, struct conn *c)
{
    redisAsyncContext *ac = c->ac;
    if (ac) {
        /* requests in flight stay owned by hiredis (req_reply_cb frees them, orphaned) */
        while (c->inflight.head) {
            struct req *q = c->inflight.head;
            list_remove(&c->inflight, q);
            if (q->cb)
                q->cb(r, NULL, PW_ERR_CANCELLED, "redis client destroyed", q->userdata);
            q->cb = NULL;
        }
        ac->data = NULL;
        c->ac = NULL;
        /* immediate, or deferred by hiredis until its current callback returns */
        redisAsyncFree(ac);
    }
    if (c->timer)
        event_free(c->timer);
    c->timer = NULL;
}

static void destroy_now(struct pw_redis *r)
{
    r->destroying = true;
    r->cb_depth++; /* callbacks below may call destroy again: a no-op */
    cancel_list(r, &r->queue);
    cancel_list(r, &r->deferred);
    conn_close(r, &r->cmd);
    conn_close(r, &r->sub);
    event_free(r->deferred_ev);
    for (size_t i = 0; i < r->n_subs; i++)
        free(r->subs[i].channel);
    free(r->subs);
    free(r);
}

void pw_redis_destroy(struct pw_redis *r)
{
    if (!r || r->destroying)
        return;
    if (r->cb_depth > 0) {
        r->destroy_pending = true;
        return;
    }
    destroy_now(r);
}

bool pw_redis_is_connected(const struct pw_redis *r)
{
    return r && r->cmd.state == CONN_READY;
}

const char *pw_redis_errstr(const struct pw_redis *r)
{
    return r ? r->cmd.errstr : "";
}

unsigned pw_redis_attempts(const struct pw_redis *r)
{
    return r ? (r->cmd.state == CONN_READY ? 0 : r->cmd.attempt) : 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Blocking helper                                                                          */
/* ---------------------------------------------------------------------------------------- */

/* Runs one handshake command; a NULL reply is an I/O error or timeout. */
static enum pw_err sync_step(redisContext *ctx, int argc, const char **argv, const char *what,
                             char *errbuf, size_t errcap)
{
    redisReply *rep = redisCommandArgv(ctx, argc, argv, NULL);
    if (!rep) {
        bool timeout = ctx->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK);
        set_err(errbuf, errcap, "redis %s: %s", what, timeout ? "timed out" : ctx->errstr);
        return timeout ? PW_ERR_TIMEOUT : PW_ERR_IO;
    }
    enum pw_err err = PW_OK;
    if (rep->type == REDIS_REPLY_ERROR) {
        const char *msg = rep->str ? rep->str : "";
        if (strcmp(what, "AUTH") == 0) {
            set_err(errbuf, errcap, "redis AUTH failed: %s", msg);
            err = PW_ERR_AUTH;
        } else if (strncmp(msg, "NOAUTH", 6) == 0) {
            set_err(errbuf, errcap, "redis server requires a password (none in the URL): %s", msg);
            err = PW_ERR_AUTH;
        } else {
            set_err(errbuf, errcap, "redis %s failed: %s", what, msg);
            err = PW_ERR_REDIS;
        }
    }
    freeReplyObject(rep);
    return err;
}

enum pw_err pw_redis_sync_connect(const char *url, int timeout_ms, redisContext **out, char *errbuf,
                                  size_t errcap)
{
    struct pw_redis_url u;
    if (!out) {
        set_err(errbuf, errcap, "pw_redis_sync_connect: missing argument");
        return PW_ERR_INVAL;
    }
    *out = NULL;
    enum pw_err err = pw_redis_url_parse(url, &u, errbuf, errcap);
    if (err)
        return err;
    if (timeout_ms <= 0)
        timeout_ms = 2000;
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    redisContext *ctx = u.transport == PW_REDIS_UNIX ? redisConnectUnixWithTimeout(u.path, tv)
                                                     : redisConnectWithTimeout(u.host, u.port, tv);
    char addr[sizeof u.host + sizeof u.path + 16];
    pw_redis_url_addr(&u, addr, sizeof addr);
    if (!ctx) {
        set_err(errbuf, errcap, "out of memory");
        return PW_ERR_NOMEM;
    }
    if (ctx->err) {
        bool timeout = strstr(ctx->errstr, "timed out") != NULL || errno == EINPROGRESS;
        set_err(errbuf, errcap, "redis connect to %s failed: %s", addr, ctx->errstr);
        err = timeout ? PW_ERR_TIMEOUT : PW_ERR_IO;
        goto out;
    }
    pw_redis_reader_install_caps(ctx->reader);
    if (redisSetTimeout(ctx, tv) != REDIS_OK) {
        set_err(errbuf, errcap, "redis connect to %s: cannot set timeout", addr);
        err = PW_ERR_IO;
        goto out;
    }
    if (u.password[0]) {
        const char *argv[3] = {"AUTH", u.user, u.password};
        if (u.user[0])
            err = sync_step(ctx, 3, argv, "AUTH", errbuf, errcap);
        else {
            argv[1] = u.password;
            err = sync_step(ctx, 2, argv, "AUTH", errbuf, errcap);
        }
        if (err)
            goto out;
    }
    if (u.db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", u.db);
        const char *argv[2] = {"SELECT", db};
        err = sync_step(ctx, 2, argv, "SELECT", errbuf, errcap);
        if (err)
            goto out;
    }
    const char *ping[1] = {"PING"};
    err = sync_step(ctx, 1, ping, "PING", errbuf, errcap);
    if (err)
        goto out;
    *out = ctx;
    return PW_OK;
out:
    redisFree(ctx);
    return err;
}

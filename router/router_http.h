/*
 * router_http: the router's HTTP/1.1 server layer (no OpenAI logic, no Redis).
 *
 * N worker threads, each with its own event_base and its own SO_REUSEPORT listening socket;
 * connections are bufferevents (plain TCP, or TLS through bufferevent_openssl), requests are
 * parsed by llhttp with every limit enforced while reading. A complete request is handed to
 * the handler on the connection's worker thread; the handler answers at once or later,
 * with a full response or a chunked stream. docs/internals/http.md has the whole design.
 *
 * Threading: everything about one request happens on its worker thread (the handler call,
 * every router_http_request_* / router_http_respond* / router_http_stream_* call, the cancel
 * callback). Other threads reach a worker with router_http_server_post(). Thread-safe calls:
 * router_http_server_post(), router_http_server_stop() (also async-signal-safe),
 * router_http_server_connections(), router_http_server_port().
 *
 * Ownership of a request (struct router_http_request):
 *  - The handler holds a reference from the handler call until it makes exactly one terminal
 *    call: router_http_respond(), router_http_respond_error(), router_http_stream_end() or
 *    router_http_request_release(). A terminal call always releases the reference, whatever
 *    it returns; afterwards the request pointer must not be used.
 *  - If the client goes away (or the connection is dropped for a slow reader, a write
 *    timeout or a forced shutdown) before the terminal call, the cancel callback set with
 *    router_http_request_set_cancel() runs once, from the event loop, never from inside a
 *    router_http_* call. From then on responses are no-ops returning PW_ERR_CLOSED, and the
 *    handler must still make its terminal call (it may do so inside the cancel callback).
 *  - All request memory (headers, body, router_http_request_alloc() memory) is freed once,
 *    when both the handler and the connection are done with it.
 */
#ifndef ROUTER_HTTP_H
#define ROUTER_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

struct event_base;
struct router_http_server;
struct router_http_request;

/* ---------------------------------------------------------------------------------------- */
/* Configuration                                                                            */
/* ---------------------------------------------------------------------------------------- */

#define ROUTER_HTTP_DEFAULT_MAX_HEADER_BYTES (16u * 1024u)
#define ROUTER_HTTP_DEFAULT_MAX_BODY_BYTES (8u * 1024u * 1024u)
#define ROUTER_HTTP_DEFAULT_MAX_OUTPUT_BYTES (4u * 1024u * 1024u)
#define ROUTER_HTTP_REQUEST_ID_MAX 128                  /* bytes, without the NUL */
#define ROUTER_HTTP_SPOOL_MAX_BYTES ((uint64_t)1 << 40) /* cap of any spooled body */

/*
 * Body spooling (large uploads). Called on the worker thread once a request's headers are
 * complete and before any of its body is read, for requests that have a body. req has
 * method, target, path, query, headers, request_id and remote_addr set (no body yet); it is
 * borrowed for the call. Returns 0 to read the body into memory as usual (max_body_bytes),
 * or a limit in bytes: the body is then written, de-chunked, to an unlinked file in the
 * spool directory as it arrives and the handler gets it as body_fd (see struct
 * router_http_request). Must not block and must not call router_http_* on req.
 */
typedef uint64_t (*router_http_spool_fn)(const struct router_http_request *req, void *ud);

struct router_http_spool {
    router_http_spool_fn fn; /* NULL: no body is ever spooled */
    void *ud;                /* borrowed; passed to fn */
    const char *dir;         /* spool directory, on disk (not tmpfs); created 0700 with its
                                parents when missing; required when fn is set */
};

struct router_http_config {
    const char *host;           /* bind address (numeric IPv4 or IPv6); default "127.0.0.1" */
    uint16_t port;              /* 0 = ephemeral (all workers share the one picked) */
    unsigned threads;           /* worker threads; 0 = online CPUs */
    int backlog;                /* listen(2) backlog per worker; default 1024 */
    const char *tls_cert_file;  /* PEM chain; TLS is on when both cert and key are set */
    const char *tls_key_file;   /* PEM private key */
    size_t max_header_bytes;    /* request line + headers; over it: 431; default 16 KiB */
    unsigned max_headers;       /* header lines; over it: 431; default 100 */
    size_t max_body_bytes;      /* request body; over it: 413; default 8 MiB */
    size_t max_output_bytes;    /* unsent response bytes per connection before it is dropped;
                                   default 4 MiB */
    unsigned max_connections;   /* open connections across all workers; over it: 503 and
                                   close; default 10000 */
    uint32_t header_timeout_ms; /* first byte (or accept) to end of headers: 408; def 10000 */
    uint32_t body_timeout_ms;   /* longest gap while reading a body: 408; default 30000 */
    uint32_t idle_timeout_ms;   /* keep-alive wait for the next request: silent close;
                                   default 60000 */
    uint32_t write_timeout_ms;  /* output pending with no progress: drop; default 60000 */
    uint32_t drain_timeout_ms;  /* graceful stop: in-flight work gets this long; def 30000 */
    struct router_http_spool body_spool; /* which bodies go to disk; zeroed: none */
};

/* Fills cfg with the defaults above. */
void router_http_config_init(struct router_http_config *cfg);

/* ---------------------------------------------------------------------------------------- */
/* Requests                                                                                 */
/* ---------------------------------------------------------------------------------------- */

/* One request header as received. Strings are NUL-terminated; value has no surrounding
 * whitespace. Duplicate headers are kept, in order. */
struct router_http_header {
    const char *name; /* case as sent */
    size_t name_len;
    const char *value;
    size_t value_len;
};

/* A response header given by the handler: NUL-terminated name and value, borrowed for the
 * call. Framing headers (Content-Length, Transfer-Encoding, Connection) and x-request-id
 * are the layer's own and are skipped if given. */
struct router_http_field {
    const char *name;
    const char *value;
};

/* A parsed request. Every pointer is borrowed from the request's arena and is valid until
 * the handler's terminal call. Strings are NUL-terminated. */
struct router_http_request {
    const char *method; /* "GET", "POST", ... (GET HEAD POST PUT DELETE OPTIONS PATCH) */
    const char *target; /* request target as sent, e.g. "/v1/models?x=1" */
    size_t target_len;
    const char *path; /* target without the query, e.g. "/v1/models" (not decoded) */
    size_t path_len;
    const char *query; /* after '?', "" when there is none */
    size_t query_len;
    int version_minor; /* HTTP/1.<minor> */
    const struct router_http_header *headers;
    size_t n_headers;
    const char *body;        /* contiguous body, NUL-terminated for convenience; "" if none or
                                spooled */
    size_t body_len;         /* bytes at body; 0 when spooled */
    bool body_spooled;       /* the body is in a spool file (router_http_spool), not in body */
    int body_fd;             /* spooled: descriptor of an unlinked file holding exactly body_fd_len
                                bytes; read it with pread(2) (offsets from 0), never write it.
                                Owned by the request: closed when it is freed. -1 when not
                                spooled. */
    uint64_t body_fd_len;    /* spooled: the body's length in bytes */
    const char *request_id;  /* x-request-id: the client's if sane, else generated */
    const char *remote_addr; /* "1.2.3.4:5678" or "[::1]:5678" */
    uint64_t start_ns;       /* pw_clock_mono_ns() at the request's first byte */
    unsigned worker;         /* the worker thread that owns it (for router_http_server_post) */
};

/* First header named name (case-insensitive), or NULL. The value is NUL-terminated. */
const char *router_http_request_header(const struct router_http_request *req, const char *name);

/* Memory that lives exactly as long as the request (aligned to 16). NULL on failure. */
void *router_http_request_alloc(struct router_http_request *req, size_t n);

/* Called once, on the worker thread, if the connection is lost before the terminal call. */
typedef void (*router_http_cancel_fn)(struct router_http_request *req, void *ud);

/* Sets (or with fn NULL clears) the cancel callback; ud is borrowed. */
void router_http_request_set_cancel(struct router_http_request *req, router_http_cancel_fn fn,
                                    void *ud);

/* True once the connection is gone: further output is discarded. */
bool router_http_request_closed(const struct router_http_request *req);

/* The event_base of the request's worker (for timers, e.g. SSE keep-alives). */
struct event_base *router_http_request_base(const struct router_http_request *req);

/* ---------------------------------------------------------------------------------------- */
/* Responses (worker thread only)                                                           */
/* ---------------------------------------------------------------------------------------- */

/*
 * Terminal: a complete response. headers: n_headers fields (may be NULL when 0); body is
 * copied. The layer adds Date, Content-Length, Connection and x-request-id. Returns PW_OK,
 * PW_ERR_CLOSED (client gone; nothing sent) or PW_ERR_INVAL (a header with CR, LF or a bad
 * name, or status outside 200..599: a 500 is sent instead).
 */
enum pw_err router_http_respond(struct router_http_request *req, int status,
                                const struct router_http_field *headers, size_t n_headers,
                                const void *body, size_t body_len);

/* Terminal: an OpenAI-shaped error, {"error":{"message","type","param":null,"code"}}.
 * type NULL means "invalid_request_error" for 4xx and "server_error" for 5xx; code may be
 * NULL (JSON null). */
enum pw_err router_http_respond_error(struct router_http_request *req, int status, const char *type,
                                      const char *code, const char *message);

/* Starts a streamed response: status and headers now, body in chunks (chunked encoding for
 * HTTP/1.1; for HTTP/1.0 the body ends when the connection closes). */
enum pw_err router_http_stream_begin(struct router_http_request *req, int status,
                                     const struct router_http_field *headers, size_t n_headers);

/* Like router_http_stream_begin for a body whose length is known up front: Content-Length
 * framing (no chunked encoding; HTTP/1.0 keeps keep-alive). The writes must add up to
 * exactly length bytes: a write past it is refused (PW_ERR_INVAL, nothing queued), and
 * stream_end with bytes missing cuts the connection (PW_ERR_INVAL). */
enum pw_err router_http_stream_begin_length(struct router_http_request *req, int status,
                                            const struct router_http_field *headers,
                                            size_t n_headers, uint64_t length);

/*
 * Queues one chunk (copied; an empty one is ignored). If the unsent output would pass
 * max_output_bytes (the client reads too slowly), the connection is dropped, this returns
 * PW_ERR_CLOSED and the cancel callback follows from the event loop.
 */
enum pw_err router_http_stream_write(struct router_http_request *req, const void *data, size_t len);

/* Unsent output bytes on the request's connection (0 when closed): for pacing. */
size_t router_http_stream_pending(const struct router_http_request *req);

/* Called from the event loop when a streaming response's connection has written all its
 * output (for a handler that produces a large body at the pace the client reads it). */
typedef void (*router_http_drain_fn)(struct router_http_request *req, void *ud);

/* Sets (or with fn NULL clears) the drain callback; ud is borrowed. It runs only between
 * stream_begin and the terminal call, never from inside a router_http_* call; the terminal
 * call clears it. */
void router_http_stream_set_drain(struct router_http_request *req, router_http_drain_fn fn,
                                  void *ud);

/* Terminal: ends the stream (the zero chunk). */
enum pw_err router_http_stream_end(struct router_http_request *req);

/* Terminal: give the request up. Nothing sent yet: a 500 is sent and the connection closes;
 * a stream in progress: the connection is closed (the client sees a cut stream). */
void router_http_request_release(struct router_http_request *req);

/* ---------------------------------------------------------------------------------------- */
/* Server                                                                                   */
/* ---------------------------------------------------------------------------------------- */

/* Called on the worker thread with a complete request; the handler now holds a reference
 * (see the top of this file). ud is the server's handler_ud. */
typedef void (*router_http_handler_fn)(struct router_http_request *req, void *ud);

/* A task run on a worker's event loop (router_http_server_post). */
typedef void (*router_http_task_fn)(void *arg);

/*
 * Creates the workers, their event_bases and bound listening sockets, and the TLS context.
 * cfg is copied (its strings too); handler_ud is borrowed. Ignores SIGPIPE process-wide.
 * Returns PW_ERR_CONFIG (bad TLS files, bad host), PW_ERR_IO (bind/listen) or PW_ERR_NOMEM.
 */
enum pw_err router_http_server_create(const struct router_http_config *cfg,
                                      router_http_handler_fn handler, void *handler_ud,
                                      struct router_http_server **out);

/* Runs the workers (worker 0 on the calling thread, the rest on new threads) until stop()
 * has drained them all. */
enum pw_err router_http_server_run(struct router_http_server *srv);

/*
 * Graceful stop, from any thread or a signal handler: stop accepting, close idle
 * keep-alive connections, let in-flight requests finish (responses carry Connection:
 * close), then run() returns. Work still running after drain_timeout_ms is cancelled.
 */
void router_http_server_stop(struct router_http_server *srv);

/* Frees everything; call after run() returned, or instead of run(). NULL is a no-op. Tasks
 * still queued run here, on the calling thread, so their arguments are released. */
void router_http_server_destroy(struct router_http_server *srv);

/*
 * Runs fn(arg) on worker's event loop, in posting order, as soon as it wakes (an eventfd).
 * Thread-safe. Returns PW_ERR_CLOSED once that worker has stopped (fn is not called: the
 * caller still owns arg), PW_ERR_INVAL for a bad index, PW_ERR_NOMEM.
 */
enum pw_err router_http_server_post(struct router_http_server *srv, unsigned worker,
                                    router_http_task_fn fn, void *arg);

uint16_t router_http_server_port(const struct router_http_server *srv); /* bound port */
unsigned router_http_server_threads(const struct router_http_server *srv);
unsigned router_http_server_connections(const struct router_http_server *srv); /* open now */

/* The event_base of a worker, for attaching other work (e.g. the Redis reply reader) before
 * or during run(); NULL for a bad index. Use it only from that worker's thread once running. */
struct event_base *router_http_server_base(struct router_http_server *srv, unsigned worker);

/* ---------------------------------------------------------------------------------------- */
/* Pure helpers (exposed for tests and the OpenAI handlers)                                 */
/* ---------------------------------------------------------------------------------------- */

/* Reason phrase for a status ("Not Found"); "Unknown" for others. */
const char *router_http_status_reason(int status);

/* True if s[0..len) is a usable client request id: [A-Za-z0-9._-]{1,128}. */
bool router_http_request_id_valid(const char *s, size_t len);

/*
 * Writes {"error":{"message":...,"type":...,"param":null,"code":...}} into buf (JSON-escaped;
 * code NULL gives null). Returns the length, or the length it would need (like snprintf)
 * if it does not fit in cap; buf is always NUL-terminated when cap > 0.
 */
size_t router_http_error_json(char *buf, size_t cap, const char *type, const char *code,
                              const char *message);

#endif

/*
 * pw_redis: Redis access for every parkway process: URL parsing, an asynchronous client on a
 * caller's libevent loop (hiredis 0.14 underneath) that reconnects by itself, and a small
 * blocking helper for command-line tools and tests.
 *
 * Threading: a struct pw_redis belongs to the thread that runs its event_base; every call and
 * every callback happens on that thread. pw_redis_url_parse() and pw_redis_sync_connect() are
 * thread-safe.
 *
 * Delivery contract of the async client (docs/internals/redis.md has the whole story):
 *  - A command accepted by pw_redis_command_argv() (it returned PW_OK) gets its callback
 *    called exactly once, always from the event loop, never from inside the call itself.
 *  - While a connection attempt is in progress (TCP connect plus AUTH/SELECT), commands wait in
 *    a bounded queue (opts.max_queued) and are written only after the handshake succeeded.
 *    While the client is disconnected and waiting to retry, commands fail fast (PW_ERR_REDIS,
 *    or PW_ERR_AUTH when the last attempt was refused for credentials). Nothing is retried
 *    silently: a command whose connection dropped before its reply fails with PW_ERR_REDIS
 *    and the caller decides (the stream design makes redelivery safe).
 *  - Reconnects use capped exponential backoff with jitter; one WARN line when a connection
 *    is lost (event=redis_disconnected) and one INFO line when it is back (event=redis_connected).
 */
#ifndef PW_REDIS_H
#define PW_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "pw_err.h"

struct event_base;

/* ---------------------------------------------------------------------------------------- */
/* URLs                                                                                     */
/* ---------------------------------------------------------------------------------------- */

#define PW_REDIS_DEFAULT_PORT 6379
#define PW_REDIS_HOST_MAX 256     /* bytes, with the NUL; IPv6 is stored without brackets */
#define PW_REDIS_PATH_MAX 108     /* bytes, with the NUL: sizeof sun_path on Linux */
#define PW_REDIS_USER_MAX 128     /* bytes, with the NUL, after percent-decoding */
#define PW_REDIS_PASSWORD_MAX 256 /* bytes, with the NUL, after percent-decoding */
#define PW_REDIS_DB_MAX 1000000   /* highest accepted database index */

enum pw_redis_transport {
    PW_REDIS_TCP = 0,
    PW_REDIS_UNIX = 1,
};

/* A parsed Redis URL. Plain value type: copy it freely, nothing to free. */
struct pw_redis_url {
    enum pw_redis_transport transport;
    char host[PW_REDIS_HOST_MAX];         /* TCP only; "::1" for redis://[::1] */
    int port;                             /* TCP only; 1..65535 */
    char path[PW_REDIS_PATH_MAX];         /* unix only; absolute */
    char user[PW_REDIS_USER_MAX];         /* ACL user; "" means the default user */
    char password[PW_REDIS_PASSWORD_MAX]; /* "" means no AUTH */
    int db;                               /* SELECT index; 0 sends no SELECT */
};

/*
 * Parses
 *     redis://[[user]:password@]host[:port][/db][?db=N&user=U&password=P]
 *     redis://[::1]:6379/2
 *     unix:///path/to/sock[?db=N&user=U&password=P]
 * User and password are percent-decoded (a decoded NUL byte is refused). Defaults: port 6379,
 * db 0. On failure returns PW_ERR_CONFIG (PW_ERR_INVAL for NULL arguments) and writes a
 * one-line reason into errbuf (may be NULL). The reason never contains the password.
 */
enum pw_err pw_redis_url_parse(const char *url, struct pw_redis_url *out, char *errbuf,
                               size_t errcap);

/* Writes "host:port", "[v6]:port" or "unix:/path" (never credentials) into buf. Returns buf. */
const char *pw_redis_url_addr(const struct pw_redis_url *u, char *buf, size_t cap);

/* ---------------------------------------------------------------------------------------- */
/* Async client                                                                             */
/* ---------------------------------------------------------------------------------------- */

struct pw_redis;

/*
 * Reply callback. Exactly one of these holds:
 *   err == PW_OK:     reply is the server's answer (never an error reply); errstr is NULL.
 *   err == PW_ERR_REDIS and reply != NULL: the server answered with an error reply; errstr is
 *                     its text (reply->str).
 *   reply == NULL:    no answer: PW_ERR_REDIS (not connected, connection lost, queue full),
 *                     PW_ERR_AUTH (not connected because the server refused our credentials)
 *                     or PW_ERR_CANCELLED (the client is being destroyed). errstr says why.
 * reply and errstr are borrowed until the callback returns. The callback may issue new
 * commands and may call pw_redis_destroy() (the release then finishes after it returns).
 */
typedef void (*pw_redis_reply_cb)(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                                  const char *errstr, void *userdata);

/*
 * Pub/sub message callback: channel and payload are borrowed until the callback returns and
 * are binary-safe (a NUL follows each for convenience).
 */
typedef void (*pw_redis_message_cb)(struct pw_redis *r, const char *channel, size_t channel_len,
                                    const char *payload, size_t payload_len, void *userdata);

struct pw_redis_opts {
    uint32_t connect_timeout_ms; /* TCP connect plus handshake; 0 = 2000 */
    uint32_t backoff_initial_ms; /* first retry delay; 0 = 100 */
    uint32_t backoff_max_ms;     /* cap of the doubling delay; 0 = 5000 */
    uint32_t max_queued;         /* commands held while a connect is in progress; 0 = 1024 */
    size_t max_queued_bytes;     /* bytes of those commands; 0 = 16 MiB */
    const char *name;            /* label in log lines (conn=NAME), borrowed; NULL = "redis" */
};

/*
 * Creates a client on base and starts connecting at once (the first attempt's result arrives
 * from the loop). url is copied; opts may be NULL (defaults) and is copied. base is borrowed
 * and must outlive the client. Fails only for a bad URL (PW_ERR_CONFIG, reason in errbuf) or
 * out of memory; an unreachable server is not an error here, the client keeps retrying.
 */
enum pw_err pw_redis_create(struct event_base *base, const char *url,
                            const struct pw_redis_opts *opts, struct pw_redis **out, char *errbuf,
                            size_t errcap);

/*
 * Closes both connections and frees the client; NULL is a no-op. Every outstanding callback
 * is called once with PW_ERR_CANCELLED before this returns (they must not issue commands).
 * Called from inside one of this client's callbacks, it marks the client closing (new commands
 * are refused with PW_ERR_CLOSED) and finishes when that callback returns.
 */
void pw_redis_destroy(struct pw_redis *r);

/* True when the command connection has finished its handshake and commands go straight out. */
bool pw_redis_is_connected(const struct pw_redis *r);

/* Last connection failure for this client ("" if none), e.g. "AUTH failed: WRONGPASS ...". */
const char *pw_redis_errstr(const struct pw_redis *r);

/* Connection attempts since the last successful handshake (0 while connected). */
unsigned pw_redis_attempts(const struct pw_redis *r);

/*
 * Sends one command. argv[i] is argvlen[i] bytes (binary-safe; argvlen NULL means every
 * argument is a NUL-terminated string). The command is serialised immediately, so argv is
 * borrowed only for the call. cb may be NULL (the reply is dropped). Returns PW_OK when the
 * command was accepted (cb will run exactly once, later); PW_ERR_INVAL (argc < 1 or over
 * PW_REDIS_MAX_ARGC), PW_ERR_NOMEM, or PW_ERR_CLOSED (client closing): cb will not run.
 */
enum pw_err pw_redis_command_argv(struct pw_redis *r, int argc, const char *const *argv,
                                  const size_t *argvlen, pw_redis_reply_cb cb, void *userdata);

/* Same, for NUL-terminated string arguments given as a NULL-terminated list. */
enum pw_err pw_redis_command(struct pw_redis *r, pw_redis_reply_cb cb, void *userdata, ...);

#define PW_REDIS_MAX_ARGC 1024 /* arguments per command */

/*
 * Subscribes to channel on a second connection owned by this client (created on first use;
 * pub/sub blocks a connection, so commands never share it). The subscription survives
 * reconnects: it is sent again after every handshake. Messages published while disconnected
 * are lost (pub/sub is at-most-once). channel is copied; userdata is borrowed until destroy.
 * Returns PW_ERR_EXISTS if channel is already subscribed, PW_ERR_INVAL, PW_ERR_NOMEM,
 * PW_ERR_CLOSED.
 */
enum pw_err pw_redis_subscribe(struct pw_redis *r, const char *channel, pw_redis_message_cb cb,
                               void *userdata);

/* True when the pub/sub connection is connected and its SUBSCRIBE has been sent. */
bool pw_redis_subscriber_is_connected(const struct pw_redis *r);

/* ---------------------------------------------------------------------------------------- */
/* Replies                                                                                  */
/* ---------------------------------------------------------------------------------------- */

/*
 * Largest RESP array accepted from a server, in elements. Enforced inside the hiredis reader
 * of every connection made here, before hiredis allocates the array: a larger header drops the
 * connection with "reply array too large" instead of allocating what a broken or hostile
 * server announces.
 */
#define PW_REDIS_MAX_ARRAY (1u << 20)

/* Installs the capped reply builder on a hiredis reader (done for every context made here). */
void pw_redis_reader_install_caps(redisReader *reader);

/* ---------------------------------------------------------------------------------------- */
/* Blocking helper                                                                          */
/* ---------------------------------------------------------------------------------------- */

/*
 * Connects with a blocking hiredis context, applies timeout_ms to connect and to every later
 * command, and runs AUTH and SELECT from the URL. On PW_OK *out is owned by the caller (free
 * with redisFree). Errors: PW_ERR_CONFIG (bad URL), PW_ERR_IO (cannot connect), PW_ERR_TIMEOUT,
 * PW_ERR_AUTH (credentials refused or missing), PW_ERR_REDIS (SELECT refused), PW_ERR_NOMEM;
 * the reason goes into errbuf (may be NULL).
 */
enum pw_err pw_redis_sync_connect(const char *url, int timeout_ms, redisContext **out, char *errbuf,
                                  size_t errcap);

#endif

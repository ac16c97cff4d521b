/*
 * pw_test_redis: a real redis-server for one test program.
 *
 * Each server gets its own mkdtemp directory (data, log, unix socket), listens on 127.0.0.1
 * only, on a free port picked by the fixture, with no RDB snapshots and no AOF unless asked.
 * The child gets PR_SET_PDEATHSIG, so a crashed test does not leave a server behind.
 * Single-threaded test helpers; not for use from several threads.
 */
#ifndef PW_TEST_REDIS_H
#define PW_TEST_REDIS_H

#include <stdbool.h>
#include <sys/types.h>

#include "pw_err.h"

struct event_base;

struct pw_test_redis {
    /* set by the caller before start (zero = default) */
    const char *password; /* --requirepass; borrowed; NULL = none */
    bool appendonly;      /* --appendonly yes (data survives restart) */
    bool unix_socket;     /* also listen on <dir>/redis.sock */

    /* filled by start */
    pid_t pid;          /* 0 when not running */
    int port;           /* kept by restart */
    char dir[80];       /* the server's own directory; removed by stop */
    char sock[96];      /* unix socket path (under sun_path's 108), when unix_socket */
    char url[256];      /* redis://[:password@]127.0.0.1:port */
    char unix_url[256]; /* unix://<sock>[?password=...], when unix_socket */
};

/* Path of redis-server (PW_REDIS_SERVER, then PATH, then /usr/bin), or NULL if absent. */
const char *pw_test_redis_server_path(void);

/* Exits the process with 77 (skipped) when no redis-server is installed. */
void pw_test_redis_require(void);

/*
 * Starts the server and waits until it answers PING (5 s). Retries on another port if the
 * chosen one was taken. Returns PW_ERR_NOTFOUND without redis-server, PW_ERR_IO otherwise.
 */
enum pw_err pw_test_redis_start(struct pw_test_redis *r);

/* SIGTERM by pid (SIGKILL after 5 s), waitpid, then removes the directory. Idempotent. */
void pw_test_redis_stop(struct pw_test_redis *r);

/* Stops the server (keeping its directory, so AOF data survives) and starts it on the same
 * port. */
enum pw_err pw_test_redis_restart(struct pw_test_redis *r);

/* Stops the server abruptly (SIGKILL) and reaps it, keeping its directory. */
void pw_test_redis_kill(struct pw_test_redis *r);

/* Starts a stopped/killed server again on the same port and directory. */
enum pw_err pw_test_redis_resume(struct pw_test_redis *r);

/*
 * Runs base until *flag becomes true or timeout_ms passes. Returns *flag. For async tests:
 * the callbacks set the flag.
 */
bool pw_test_run_until(struct event_base *base, const bool *flag, int timeout_ms);

/* Runs base for ms milliseconds (lets timers fire). */
void pw_test_run_for(struct event_base *base, int ms);

/*
 * Log capture for asserting on log lines: installs a pw_log sink that keeps every line (up to
 * 4096 lines; copies to stderr too when PW_TEST_VERBOSE is set).
 */
void pw_test_log_capture(void);
/* Lines captured so far that contain needle (all of them for ""). */
size_t pw_test_log_count(const char *needle);
/* The last captured line containing needle, or NULL. Borrowed until clear/release. */
const char *pw_test_log_find(const char *needle);
void pw_test_log_clear(void);
/* Restores the default sink and frees the captured lines. */
void pw_test_log_release(void);

#endif

/*
 * pw_test_redis: starts and stops real redis-server processes for tests. See the header for
 * the contract. The free port comes from binding 127.0.0.1:0 and closing the socket; a race
 * with another process is caught when the server exits at start, and the fixture tries again
 * with a new port.
 */
#include "pw_test_redis.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>

#include <arpa/inet.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "pw_log.h"
#include "pw_test_proc.h"

static char server_path[PATH_MAX];

const char *pw_test_redis_server_path(void)
{
    const char *env = getenv("PW_REDIS_SERVER");
    if (env && env[0] && access(env, X_OK) == 0)
        return env;
    const char *path = getenv("PATH");
    if (path) {
        const char *p = path;
        while (*p) {
            size_t n = strcspn(p, ":");
            if (n > 0 && n < sizeof server_path - 16) {
                snprintf(server_path, sizeof server_path, "%.*s/redis-server", (int)n, p);
                if (access(server_path, X_OK) == 0)
                    return server_path;
            }
            p += n;
            if (*p == ':')
                p++;
        }
    }
    if (access("/usr/bin/redis-server", X_OK) == 0)
        return "/usr/bin/redis-server";
    return NULL;
}

void pw_test_redis_require(void)
{
    if (!pw_test_redis_server_path()) {
        fprintf(stderr, "redis-server not found: skipping\n");
        exit(77);
    }
}

static pid_t spawn(struct pw_test_redis *r, const char *exe)
{
    char port[16], logfile[sizeof r->dir + 16];
    snprintf(port, sizeof port, "%d", r->port);
    snprintf(logfile, sizeof logfile, "%s/redis.log", r->dir);
    const char *argv[32];
    int n = 0;
    argv[n++] = exe;
    argv[n++] = "--port";
    argv[n++] = port;
    argv[n++] = "--bind";
    argv[n++] = "127.0.0.1";
    argv[n++] = "--dir";
    argv[n++] = r->dir;
    argv[n++] = "--save";
    argv[n++] = "";
    argv[n++] = "--appendonly";
    argv[n++] = r->appendonly ? "yes" : "no";
    argv[n++] = "--daemonize";
    argv[n++] = "no";
    argv[n++] = "--logfile";
    argv[n++] = logfile;
    if (r->password) {
        argv[n++] = "--requirepass";
        argv[n++] = r->password;
    }
    if (r->unix_socket) {
        argv[n++] = "--unixsocket";
        argv[n++] = r->sock;
        argv[n++] = "--unixsocketperm";
        argv[n++] = "700";
    }
    argv[n] = NULL;

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* child: die with the test; keep the test's terminal clean */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    int devnull = open("/dev/null", O_RDWR);
    if (devnull >= 0) {
        dup2(devnull, STDIN_FILENO);
        dup2(devnull, STDOUT_FILENO);
        dup2(devnull, STDERR_FILENO);
    }
    execv(exe, (char *const *)argv);
    _exit(127);
}

/* PING until it answers (any reply, NOAUTH included, proves the server is up). */
static bool wait_ready(struct pw_test_redis *r, int timeout_ms)
{
    for (int waited = 0; waited < timeout_ms; waited += 20) {
        int status;
        if (waitpid(r->pid, &status, WNOHANG) == r->pid) {
            r->pid = 0;
            return false;
        }
        struct timeval tv = {0, 200000};
        redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
        if (c && !c->err) {
            /* Only our own server counts: another one may have taken the port first. */
            if (r->password) {
                const char *argv[2] = {"AUTH", r->password};
                freeReplyObject(redisCommandArgv(c, 2, argv, NULL));
            }
            redisReply *rep = redisCommand(c, "INFO server");
            char want[48];
            snprintf(want, sizeof want, "process_id:%d\r", (int)r->pid);
            bool ours = rep && rep->type == REDIS_REPLY_STRING && strstr(rep->str, want);
            freeReplyObject(rep);
            redisFree(c);
            if (ours)
                return true;
        } else if (c) {
            redisFree(c);
        }
        pw_test_sleep_ms(20);
    }
    return false;
}

/* Percent-encodes everything but unreserved characters, so any password fits a URL. */
static void pct_encode(const char *s, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (; *s && o + 4 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
            ch == '-' || ch == '_' || ch == '.' || ch == '~') {
            out[o++] = (char)ch;
        } else {
            out[o++] = '%';
            out[o++] = hex[ch >> 4];
            out[o++] = hex[ch & 15];
        }
    }
    out[o] = '\0';
}

static void fill_urls(struct pw_test_redis *r)
{
    char pw[96] = "";
    if (r->password)
        pct_encode(r->password, pw, sizeof pw);
    if (r->password)
        snprintf(r->url, sizeof r->url, "redis://:%s@127.0.0.1:%d", pw, r->port);
    else
        snprintf(r->url, sizeof r->url, "redis://127.0.0.1:%d", r->port);
    r->unix_url[0] = '\0';
    if (r->unix_socket) {
        if (r->password)
            snprintf(r->unix_url, sizeof r->unix_url, "unix://%s?password=%s", r->sock, pw);
        else
            snprintf(r->unix_url, sizeof r->unix_url, "unix://%s", r->sock);
    }
}

static void reap(struct pw_test_redis *r, int sig)
{
    if (r->pid <= 0)
        return;
    kill(r->pid, sig);
    for (int waited = 0; waited < 5000; waited += 10) {
        if (waitpid(r->pid, NULL, WNOHANG) == r->pid) {
            r->pid = 0;
            return;
        }
        pw_test_sleep_ms(10);
    }
    kill(r->pid, SIGKILL);
    waitpid(r->pid, NULL, 0);
    r->pid = 0;
}

/* Starts on r->port (fixed) in r->dir. */
static bool start_fixed(struct pw_test_redis *r, const char *exe)
{
    r->pid = spawn(r, exe);
    if (r->pid < 0) {
        r->pid = 0;
        return false;
    }
    if (wait_ready(r, 5000))
        return true;
    reap(r, SIGKILL);
    return false;
}

enum pw_err pw_test_redis_start(struct pw_test_redis *r)
{
    const char *exe = pw_test_redis_server_path();
    if (!exe)
        return PW_ERR_NOTFOUND;
    /* /tmp, not TMPDIR: a long TMPDIR could push the socket path past sun_path */
    snprintf(r->dir, sizeof r->dir, "/tmp/pw-redis-XXXXXX");
    if (!mkdtemp(r->dir))
        return PW_ERR_IO;
    snprintf(r->sock, sizeof r->sock, "%s/redis.sock", r->dir);
    for (int tries = 0; tries < 8; tries++) {
        r->port = pw_test_free_port();
        if (r->port <= 0)
            continue;
        fill_urls(r);
        if (start_fixed(r, exe))
            return PW_OK;
    }
    pw_test_redis_stop(r);
    return PW_ERR_IO;
}

void pw_test_redis_stop(struct pw_test_redis *r)
{
    reap(r, SIGTERM);
    if (r->dir[0]) {
        pw_test_rmtree(r->dir);
        r->dir[0] = '\0';
    }
}

void pw_test_redis_kill(struct pw_test_redis *r)
{
    reap(r, SIGKILL);
}

enum pw_err pw_test_redis_resume(struct pw_test_redis *r)
{
    const char *exe = pw_test_redis_server_path();
    if (!exe)
        return PW_ERR_NOTFOUND;
    if (r->pid > 0)
        return PW_OK;
    /* the old listener is closed; SO_REUSEADDR in redis covers TIME_WAIT. Retry briefly. */
    for (int tries = 0; tries < 20; tries++) {
        if (start_fixed(r, exe))
            return PW_OK;
        pw_test_sleep_ms(100);
    }
    return PW_ERR_IO;
}

enum pw_err pw_test_redis_restart(struct pw_test_redis *r)
{
    reap(r, SIGTERM);
    return pw_test_redis_resume(r);
}

/* ---------------------------------------------------------------------------------------- */
/* Event loop helpers                                                                       */
/* ---------------------------------------------------------------------------------------- */

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    *(bool *)arg = true;
}

bool pw_test_run_until(struct event_base *base, const bool *flag, int timeout_ms)
{
    bool expired = false;
    struct event *t = evtimer_new(base, deadline_cb, &expired);
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    evtimer_add(t, &tv);
    while (!*flag && !expired)
        event_base_loop(base, EVLOOP_ONCE);
    event_free(t);
    return *flag;
}

void pw_test_run_for(struct event_base *base, int ms)
{
    bool never = false;
    (void)pw_test_run_until(base, &never, ms);
}

/* ---------------------------------------------------------------------------------------- */
/* Log capture                                                                              */
/* ---------------------------------------------------------------------------------------- */

#define LOG_LINES_MAX 4096

static char *log_lines[LOG_LINES_MAX];
static size_t log_n;
static bool log_echo;

static void capture_sink(void *ud, enum pw_log_level level, const char *line, size_t len)
{
    (void)ud;
    (void)level;
    if (log_echo)
        fprintf(stderr, "%s\n", line);
    if (log_n < LOG_LINES_MAX) {
        char *copy = strndup(line, len);
        if (copy)
            log_lines[log_n++] = copy;
    }
}

void pw_test_log_capture(void)
{
    log_echo = getenv("PW_TEST_VERBOSE") != NULL;
    pw_log_set_sink(capture_sink, NULL);
}

size_t pw_test_log_count(const char *needle)
{
    size_t n = 0;
    for (size_t i = 0; i < log_n; i++) {
        if (strstr(log_lines[i], needle))
            n++;
    }
    return n;
}

const char *pw_test_log_find(const char *needle)
{
    for (size_t i = log_n; i-- > 0;) {
        if (strstr(log_lines[i], needle))
            return log_lines[i];
    }
    return NULL;
}

void pw_test_log_clear(void)
{
    for (size_t i = 0; i < log_n; i++)
        free(log_lines[i]);
    log_n = 0;
}

void pw_test_log_release(void)
{
    pw_log_set_sink(NULL, NULL);
    pw_test_log_clear();
}

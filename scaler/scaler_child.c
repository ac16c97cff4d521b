/*
 * scaler_child: child processes on the scaler's event loop (see scaler_child.h).
 *
 * Each child has up to three pipes (stdin, stdout, stderr), each with a libevent event,
 * a timeout timer, and sits in a list the SIGCHLD handler walks. A child is freed only
 * after its exit callback returned, never inside a libevent callback of its own pipes
 * that could still be dispatched: everything is deleted before the free.
 */
#include "scaler_child.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>

#include "pw_clock.h"
#include "pw_log.h"

#define CHILD_ERRLINE_MAX 512 /* bytes of one stderr line kept (longer lines are cut) */

struct scaler_child {
    struct scaler_children *cs;
    struct scaler_child *next; /* in cs->list */
    char name[64];             /* log label */
    pid_t pid;                 /* also the process group id */
    int fd_in, fd_out, fd_err; /* parent ends; -1 when closed */
    struct event *ev_in, *ev_out, *ev_err, *ev_timeout;
    const char *in_data; /* stdin bytes left to write (points into in_buf) */
    size_t in_left;
    char *in_buf; /* owned copy of stdin_data */
    char *out;    /* stdout bytes, NUL-terminated; owned */
    size_t out_len, out_cap;
    bool out_truncated;
    char err_line[CHILD_ERRLINE_MAX]; /* stderr line being assembled */
    size_t err_len;
    char last_err[CHILD_ERRLINE_MAX]; /* last complete non-empty stderr line */
    bool timed_out;
    uint64_t started_ms; /* monotonic */
    scaler_child_exit_cb cb;
    void *userdata;
};

struct scaler_children {
    struct event_base *base;  /* borrowed */
    struct event *ev_sigchld; /* owned */
    struct scaler_child *list;
    size_t count;
};

static void close_fd(int *fd, struct event **ev)
{
    if (*ev) {
        event_free(*ev);
        *ev = NULL;
    }
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void child_free(struct scaler_child *c)
{
    close_fd(&c->fd_in, &c->ev_in);
    close_fd(&c->fd_out, &c->ev_out);
    close_fd(&c->fd_err, &c->ev_err);
    if (c->ev_timeout)
        event_free(c->ev_timeout);
    free(c->in_buf);
    free(c->out);
    free(c);
}

static void unlink_child(struct scaler_child *c)
{
    struct scaler_children *cs = c->cs;
    for (struct scaler_child **pp = &cs->list; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            cs->count--;
            return;
        }
    }
}

static void err_line_done(struct scaler_child *c)
{
    c->err_line[c->err_len] = '\0';
    if (c->err_len > 0) {
        char q[CHILD_ERRLINE_MAX + 64];
        PW_LOG_INFO("event=child_stderr name=%s pid=%d line=%s", c->name, (int)c->pid,
                    pw_log_quote(q, sizeof q, c->err_line));
        memcpy(c->last_err, c->err_line, c->err_len + 1);
    }
    c->err_len = 0;
}

/* Reads what fd has now. Returns false at EOF or on a hard error (the fd is then closed). */
static bool drain(struct scaler_child *c, bool is_err)
{
    int *fd = is_err ? &c->fd_err : &c->fd_out;
    struct event **ev = is_err ? &c->ev_err : &c->ev_out;
    char buf[4096];
    for (;;) {
        ssize_t n = read(*fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return true;
        if (n <= 0) {
            if (is_err && c->err_len)
                err_line_done(c);
            close_fd(fd, ev);
            return false;
        }
        if (is_err) {
            for (ssize_t i = 0; i < n; i++) {
                if (buf[i] == '\n') {
                    err_line_done(c);
                } else if (buf[i] != '\r' && c->err_len < sizeof c->err_line - 1) {
                    c->err_line[c->err_len++] = buf[i];
                }
            }
            continue;
        }
        size_t take = (size_t)n;
        if (c->out_len + take > SCALER_CHILD_STDOUT_MAX) {
            take = SCALER_CHILD_STDOUT_MAX - c->out_len;
            c->out_truncated = true;
        }
        if (c->out_len + take + 1 > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 1024;
            while (cap < c->out_len + take + 1)
                cap *= 2;
            char *p = realloc(c->out, cap);
            if (!p) {
                c->out_truncated = true;
                continue;
            }
            c->out = p;
            c->out_cap = cap;
        }
        memcpy(c->out + c->out_len, buf, take);
        c->out_len += take;
        c->out[c->out_len] = '\0';
    }
}

static void on_out(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    drain(arg, false);
}

static void on_err(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    drain(arg, true);
}

static void on_in(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct scaler_child *c = arg;
    while (c->in_left > 0) {
        ssize_t n = write(c->fd_in, c->in_data, c->in_left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0) /* EPIPE: the child does not read its stdin; fine */
            break;
        c->in_data += n;
        c->in_left -= (size_t)n;
    }
    close_fd(&c->fd_in, &c->ev_in);
}

static void on_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct scaler_child *c = arg;
    c->timed_out = true;
    PW_LOG_WARN("event=child_timeout name=%s pid=%d elapsed_ms=%llu", c->name, (int)c->pid,
                (unsigned long long)(pw_clock_mono_ms() - c->started_ms));
    kill(-c->pid, SIGKILL);
    kill(c->pid, SIGKILL);
}

static void finish(struct scaler_child *c, int status)
{
    if (c->fd_out >= 0)
        drain(c, false);
    if (c->fd_err >= 0)
        drain(c, true);
    if (c->err_len)
        err_line_done(c);
    struct scaler_child_result res = {
        .status = status,
        .exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status),
        .timed_out = c->timed_out,
        .out = c->out ? c->out : "",
        .out_len = c->out_len,
        .out_truncated = c->out_truncated,
        .last_err = c->last_err,
        .elapsed_ms = pw_clock_mono_ms() - c->started_ms,
    };
    unlink_child(c);
    c->cb(c, &res, c->userdata);
    child_free(c);
}

static void on_sigchld(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    struct scaler_children *cs = arg;
    /* Restart the walk after each finish: a callback may start or end other children. */
    bool again = true;
    while (again) {
        again = false;
        for (struct scaler_child *c = cs->list; c; c = c->next) {
            int status;
            pid_t r = waitpid(c->pid, &status, WNOHANG);
            if (r == c->pid) {
                finish(c, status);
                again = true;
                break;
            }
        }
    }
}

enum pw_err scaler_children_create(struct event_base *base, struct scaler_children **out)
{
    struct scaler_children *cs = calloc(1, sizeof *cs);
    if (!cs)
        return PW_ERR_NOMEM;
    cs->base = base;
    cs->ev_sigchld = evsignal_new(base, SIGCHLD, on_sigchld, cs);
    if (!cs->ev_sigchld || event_add(cs->ev_sigchld, NULL) != 0) {
        if (cs->ev_sigchld)
            event_free(cs->ev_sigchld);
        free(cs);
        return PW_ERR_IO;
    }
    *out = cs;
    return PW_OK;
}

void scaler_children_destroy(struct scaler_children *cs)
{
    if (!cs)
        return;
    while (cs->list) {
        struct scaler_child *c = cs->list;
        cs->list = c->next;
        /* SIGTERM, not SIGKILL: an engine still here drains and exits on its own (and
         * would get the same from its parent-death signal). Not reaped: once we exit,
         * init does that. */
        kill(-c->pid, SIGTERM);
        kill(c->pid, SIGTERM);
        child_free(c);
    }
    event_free(cs->ev_sigchld);
    free(cs);
}

size_t scaler_children_count(const struct scaler_children *cs)
{
    return cs ? cs->count : 0;
}

pid_t scaler_child_pid(const struct scaler_child *c)
{
    return c->pid;
}

void scaler_child_signal(struct scaler_child *c, int sig, bool group)
{
    if (group)
        kill(-c->pid, sig);
    kill(c->pid, sig);
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

enum pw_err scaler_child_start(struct scaler_children *cs, const struct scaler_child_opts *opts,
                               struct scaler_child **out)
{
    if (!cs || !opts || !opts->argv || !opts->argv[0] || !opts->cb)
        return PW_ERR_INVAL;
    enum pw_err err = PW_ERR_IO;
    int p_in[2] = {-1, -1}, p_out[2] = {-1, -1}, p_err[2] = {-1, -1};
    struct scaler_child *c = calloc(1, sizeof *c);
    if (!c)
        return PW_ERR_NOMEM;
    c->cs = cs;
    c->fd_in = c->fd_out = c->fd_err = -1;
    c->cb = opts->cb;
    c->userdata = opts->userdata;
    snprintf(c->name, sizeof c->name, "%s", opts->name ? opts->name : opts->argv[0]);
    if (opts->stdin_data) {
        c->in_buf = malloc(opts->stdin_len + 1);
        if (!c->in_buf) {
            err = PW_ERR_NOMEM;
            goto fail;
        }
        memcpy(c->in_buf, opts->stdin_data, opts->stdin_len);
        c->in_data = c->in_buf;
        c->in_left = opts->stdin_len;
        if (pipe2(p_in, O_CLOEXEC) != 0)
            goto fail;
    }
    if (opts->capture_stdout && pipe2(p_out, O_CLOEXEC) != 0)
        goto fail;
    if (opts->log_stderr && pipe2(p_err, O_CLOEXEC) != 0)
        goto fail;

    pid_t pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0) {
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        dup2(p_in[0] >= 0 ? p_in[0] : devnull, STDIN_FILENO);
        if (p_out[1] >= 0)
            dup2(p_out[1], STDOUT_FILENO);
        if (p_err[1] >= 0)
            dup2(p_err[1], STDERR_FILENO);
        for (char *const *e = opts->env_add; e && *e; e++)
            putenv(*e);
        execvp(opts->argv[0], opts->argv);
        fprintf(stderr, "cannot run %s: %s\n", opts->argv[0], strerror(errno));
        _exit(127);
    }
    /* Both sides set the group, so a signal sent right after fork finds it. */
    setpgid(pid, pid);
    c->pid = pid;
    c->started_ms = pw_clock_mono_ms();
    if (p_in[0] >= 0) {
        close(p_in[0]);
        c->fd_in = p_in[1];
        set_nonblock(c->fd_in);
        c->ev_in = event_new(cs->base, c->fd_in, EV_WRITE | EV_PERSIST, on_in, c);
        if (c->ev_in)
            event_add(c->ev_in, NULL);
    }
    if (p_out[1] >= 0) {
        close(p_out[1]);
        c->fd_out = p_out[0];
        set_nonblock(c->fd_out);
        c->ev_out = event_new(cs->base, c->fd_out, EV_READ | EV_PERSIST, on_out, c);
        if (c->ev_out)
            event_add(c->ev_out, NULL);
    }
    if (p_err[1] >= 0) {
        close(p_err[1]);
        c->fd_err = p_err[0];
        set_nonblock(c->fd_err);
        c->ev_err = event_new(cs->base, c->fd_err, EV_READ | EV_PERSIST, on_err, c);
        if (c->ev_err)
            event_add(c->ev_err, NULL);
    }
    if (opts->timeout_ms) {
        c->ev_timeout = evtimer_new(cs->base, on_timeout, c);
        struct timeval tv = {opts->timeout_ms / 1000, (opts->timeout_ms % 1000) * 1000};
        if (c->ev_timeout)
            evtimer_add(c->ev_timeout, &tv);
    }
    c->next = cs->list;
    cs->list = c;
    cs->count++;
    if (out)
        *out = c;
    return PW_OK;

fail:
    for (int i = 0; i < 2; i++) {
        if (p_in[i] >= 0)
            close(p_in[i]);
        if (p_out[i] >= 0)
            close(p_out[i]);
        if (p_err[i] >= 0)
            close(p_err[i]);
    }
    child_free(c);
    return err;
}

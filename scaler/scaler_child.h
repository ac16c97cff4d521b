/*
 * scaler_child: child processes watched from the scaler's libevent loop.
 *
 * Both providers run programs: the local provider runs engines (long-lived), the exec
 * provider runs hooks (short-lived, JSON in on stdin, JSON out on stdout). This module
 * starts them without blocking the loop, feeds stdin, collects stdout into a capped
 * buffer, logs stderr line by line (`event=child_stderr name=... line="..."`), enforces an
 * optional timeout (SIGKILL to the child's process group; the result says timed_out) and
 * reports the exit exactly once through a callback.
 *
 * Reaping: one SIGCHLD event on the loop; on each signal every watched child is polled with
 * waitpid(pid, WNOHANG), so children this module did not start are never reaped here.
 * When a child has exited, whatever its pipes still hold is read without blocking and the
 * exit is reported (a grandchild that inherited stdout cannot hold the report back).
 *
 * Thread: everything runs on the loop's thread. Children get their own process group and
 * PR_SET_PDEATHSIG(SIGTERM), so they do not outlive the scaler.
 */
#ifndef SCALER_CHILD_H
#define SCALER_CHILD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pw_err.h"

struct event_base;
struct scaler_children;
struct scaler_child;

/* Most stdout bytes kept per child; more is dropped and the result says truncated. */
#define SCALER_CHILD_STDOUT_MAX (256 * 1024)

struct scaler_child_result {
    int status;           /* raw waitpid status */
    int exit_code;        /* WEXITSTATUS, or 128 + signal when killed */
    bool timed_out;       /* the timeout fired and the child was killed */
    const char *out;      /* stdout bytes (NUL-terminated); borrowed for the callback */
    size_t out_len;       /* bytes in out */
    bool out_truncated;   /* stdout was longer than SCALER_CHILD_STDOUT_MAX */
    const char *last_err; /* last non-empty stderr line, "" if none; borrowed */
    uint64_t elapsed_ms;  /* start to exit, milliseconds */
};

/* Called once when the child has exited. The child is freed right after it returns. */
typedef void (*scaler_child_exit_cb)(struct scaler_child *c, const struct scaler_child_result *res,
                                     void *userdata);

struct scaler_child_opts {
    const char *name;       /* label in log lines (borrowed for the call) */
    char *const *argv;      /* argv[0] is looked up in PATH; borrowed for the call */
    char *const *env_add;   /* "K=V" strings added to the environment; NULL-terminated or NULL */
    const char *stdin_data; /* written to stdin then closed; NULL = /dev/null */
    size_t stdin_len;
    bool capture_stdout;     /* false: stdout goes to the scaler's stderr (engine logs) */
    bool log_stderr;         /* true: stderr is logged line by line; false: inherited */
    uint32_t timeout_ms;     /* 0 = none */
    scaler_child_exit_cb cb; /* required */
    void *userdata;
};

/* Creates the watcher on base (borrowed; must outlive it). Installs the SIGCHLD event. */
enum pw_err scaler_children_create(struct event_base *base, struct scaler_children **out);

/* Sends SIGTERM to every child still watched (and its group) and forgets it, without
 * callbacks; NULL is a no-op. Meant for process exit. */
void scaler_children_destroy(struct scaler_children *cs);

/* Children currently watched. */
size_t scaler_children_count(const struct scaler_children *cs);

/*
 * Starts a child. On PW_OK *out (may be NULL) is the handle, valid until its callback
 * returns. Errors: PW_ERR_IO (pipe or fork failed), PW_ERR_NOMEM, PW_ERR_INVAL.
 * An exec failure in the child shows up as exit code 127 with a stderr line.
 */
enum pw_err scaler_child_start(struct scaler_children *cs, const struct scaler_child_opts *opts,
                               struct scaler_child **out);

/* The child's pid (also its process group id). */
pid_t scaler_child_pid(const struct scaler_child *c);

/* Sends sig to the child's process group (to the child alone when group is false). */
void scaler_child_signal(struct scaler_child *c, int sig, bool group);

#endif

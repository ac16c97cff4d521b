/*
 * pw_err: the project's one error enum, and PW_ASSERT.
 *
 * Fallible functions return enum pw_err (0 = PW_OK) and hand results back through
 * out-parameters. The list below is the single source of the codes, their names and
 * their one-line descriptions, so pw_err_name() can never drift from the enum.
 * Thread-safe: everything here is constant data.
 */
#ifndef PW_ERR_H
#define PW_ERR_H

/* X(code, name, description) */
#define PW_ERR_LIST(X)                                                                             \
    X(PW_OK, "ok", "success")                                                                      \
    X(PW_ERR_NOMEM, "nomem", "out of memory")                                                      \
    X(PW_ERR_INVAL, "inval", "invalid argument")                                                   \
    X(PW_ERR_IO, "io", "input/output error")                                                       \
    X(PW_ERR_PARSE, "parse", "malformed input")                                                    \
    X(PW_ERR_RANGE, "range", "value out of range")                                                 \
    X(PW_ERR_TOOBIG, "toobig", "size over the limit")                                              \
    X(PW_ERR_NOTFOUND, "notfound", "not found")                                                    \
    X(PW_ERR_EXISTS, "exists", "already exists")                                                   \
    X(PW_ERR_UNSUPPORTED, "unsupported", "unsupported")                                            \
    X(PW_ERR_TIMEOUT, "timeout", "timed out")                                                      \
    X(PW_ERR_AGAIN, "again", "try again later")                                                    \
    X(PW_ERR_CLOSED, "closed", "connection closed")                                                \
    X(PW_ERR_REDIS, "redis", "redis error")                                                        \
    X(PW_ERR_PROTO, "proto", "protocol error")                                                     \
    X(PW_ERR_AUTH, "auth", "authentication failed")                                                \
    X(PW_ERR_DENIED, "denied", "permission denied")                                                \
    X(PW_ERR_CANCELLED, "cancelled", "cancelled")                                                  \
    X(PW_ERR_CONFIG, "config", "invalid configuration")                                            \
    X(PW_ERR_INTERNAL, "internal", "internal error")

enum pw_err {
#define PW_ERR_ENUM(code, name, desc) code,
    PW_ERR_LIST(PW_ERR_ENUM)
#undef PW_ERR_ENUM
        PW_ERR_COUNT_
};

/* Short stable name ("nomem"); "unknown" for a value outside the enum. Never NULL. */
const char *pw_err_name(enum pw_err err);

/* One-line human description ("out of memory"). Never NULL. */
const char *pw_err_desc(enum pw_err err);

/*
 * Process exit code for an error, by the project convention: 0 success, 2 bad input or
 * configuration (PARSE, INVAL, RANGE, TOOBIG, CONFIG, UNSUPPORTED), 1 anything else.
 */
int pw_err_exit_code(enum pw_err err);

/* Prints "assertion failed: expr at file:line" to stderr and aborts. */
#ifdef __cplusplus /* read by CUDA C++ too */
#define PW_NORETURN [[noreturn]]
#else
#define PW_NORETURN _Noreturn
#endif
PW_NORETURN void pw_assert_fail(const char *expr, const char *file, int line);

/* For programmer errors only; never compiled out; never for network, Redis or file input. */
#define PW_ASSERT(expr)                                                                            \
    do {                                                                                           \
        if (!(expr))                                                                               \
            pw_assert_fail(#expr, __FILE__, __LINE__);                                             \
    } while (0)

#endif

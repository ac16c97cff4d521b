/*
 * pw_log: one line per event, `key=value` fields, a settable sink.
 *
 * Every line reads
 *     ts=2026-11-27T08:01:02.345Z level=info src=pw_redis.c:88 event=connect host=127.0.0.1
 * where everything after src= is the caller's format. Callers write fields as key=value and
 * quote free text with pw_log_quote(). API keys are never logged; prompts only at DEBUG.
 *
 * Thread-safe: a line is formatted into a stack buffer and handed to the sink in one call
 * (the default sink does one write(2) to stderr, so lines from threads never interleave).
 * The level and sink are process-wide; set them at start-up, before threads exist.
 */
#ifndef PW_LOG_H
#define PW_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

enum pw_log_level {
    PW_LOG_LEVEL_DEBUG = 0,
    PW_LOG_LEVEL_INFO = 1,
    PW_LOG_LEVEL_WARN = 2,
    PW_LOG_LEVEL_ERROR = 3,
    PW_LOG_LEVEL_OFF = 4,
};

/* Receives one finished line (no trailing newline, NUL-terminated, len excludes the NUL). */
typedef void (*pw_log_sink_fn)(void *userdata, enum pw_log_level level, const char *line,
                               size_t len);

/* Longest line handed to a sink; longer lines are cut and end in "...". */
#define PW_LOG_LINE_MAX 2048

void pw_log_set_level(enum pw_log_level level);
enum pw_log_level pw_log_get_level(void);

/* "debug", "info", "warn"/"warning", "error", "off" (case-insensitive). */
bool pw_log_level_parse(const char *name, enum pw_log_level *out);
const char *pw_log_level_name(enum pw_log_level level);

/* Sets the sink; NULL restores the default (stderr). userdata is borrowed. */
void pw_log_set_sink(pw_log_sink_fn sink, void *userdata);

/* Applies PARKWAY_LOG_LEVEL from the environment if it is set and valid. */
void pw_log_init_from_env(void);

static inline bool pw_log_enabled(enum pw_log_level level)
{
    return level >= pw_log_get_level();
}

__attribute__((format(printf, 4, 5))) void pw_log_write(enum pw_log_level level, const char *file,
                                                        int line, const char *fmt, ...);
__attribute__((format(printf, 4, 0))) void pw_log_vwrite(enum pw_log_level level, const char *file,
                                                         int line, const char *fmt, va_list ap);

/*
 * Writes s into buf as a log value: bare if it has only safe characters, else in double
 * quotes with \" \\ \n \t and \xHH escapes. Cut with "..." to fit cap. Returns buf.
 */
const char *pw_log_quote(char *buf, size_t cap, const char *s);

#define PW_LOG_AT(level, ...)                                                                      \
    do {                                                                                           \
        if (pw_log_enabled(level))                                                                 \
            pw_log_write(level, __FILE__, __LINE__, __VA_ARGS__);                                  \
    } while (0)

#define PW_LOG_DEBUG(...) PW_LOG_AT(PW_LOG_LEVEL_DEBUG, __VA_ARGS__)
#define PW_LOG_INFO(...) PW_LOG_AT(PW_LOG_LEVEL_INFO, __VA_ARGS__)
#define PW_LOG_WARN(...) PW_LOG_AT(PW_LOG_LEVEL_WARN, __VA_ARGS__)
#define PW_LOG_ERROR(...) PW_LOG_AT(PW_LOG_LEVEL_ERROR, __VA_ARGS__)

#endif

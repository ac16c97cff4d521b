/* pw_log: formatting and the default stderr sink. See pw_log.h for the line shape. */
#include "pw_log.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static enum pw_log_level log_level = PW_LOG_LEVEL_INFO;
static pw_log_sink_fn log_sink;
static void *log_sink_userdata;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void pw_log_set_level(enum pw_log_level level)
{
    if (level <= PW_LOG_LEVEL_OFF)
        log_level = level;
}

enum pw_log_level pw_log_get_level(void)
{
    return log_level;
}

const char *pw_log_level_name(enum pw_log_level level)
{
    return level <= PW_LOG_LEVEL_OFF ? level_names[level] : "unknown";
}

bool pw_log_level_parse(const char *name, enum pw_log_level *out)
{
    if (!name)
        return false;
    for (int i = 0; i <= PW_LOG_LEVEL_OFF; i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (enum pw_log_level)i;
            return true;
        }
    }
    if (strcasecmp(name, "warning") == 0) {
        *out = PW_LOG_LEVEL_WARN;
        return true;
    }
    return false;
}

void pw_log_set_sink(pw_log_sink_fn sink, void *userdata)
{
    log_sink = sink;
    log_sink_userdata = userdata;
}

void pw_log_init_from_env(void)
{
    enum pw_log_level level;
    if (pw_log_level_parse(getenv("PARKWAY_LOG_LEVEL"), &level))
        pw_log_set_level(level);
}

static void stderr_sink(const char *line, size_t len)
{
    char buf[PW_LOG_LINE_MAX + 1];
    memcpy(buf, line, len);
    buf[len] = '\n';
    /* One write so concurrent lines never interleave; a short write to stderr is dropped. */
    ssize_t n = write(STDERR_FILENO, buf, len + 1);
    (void)n;
}

void pw_log_vwrite(enum pw_log_level level, const char *file, int line, const char *fmt, va_list ap)
{
    char buf[PW_LOG_LINE_MAX];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;

    int n = snprintf(buf, sizeof buf, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s src=%s:%d ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     ts.tv_nsec / 1000000L, pw_log_level_name(level), base, line);
    size_t len = (n < 0) ? 0 : (size_t)n;
    if (len < sizeof buf) {
        int m = vsnprintf(buf + len, sizeof buf - len, fmt, ap);
        if (m > 0)
            len += (size_t)m;
    }
    if (len >= sizeof buf) {
        len = sizeof buf - 1;
        memcpy(buf + len - 3, "...", 3);
    }
    buf[len] = '\0';
    /* A newline inside a field would split the event; make it visible instead. */
    for (size_t i = 0; i < len; i++) {
        if (buf[i] == '\n' || buf[i] == '\r')
            buf[i] = ' ';
    }
    if (log_sink)
        log_sink(log_sink_userdata, level, buf, len);
    else
        stderr_sink(buf, len);
}

void pw_log_write(enum pw_log_level level, const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    pw_log_vwrite(level, file, line, fmt, ap);
    va_end(ap);
}

static bool is_bare(unsigned char c)
{
    return isalnum(c) || strchr("-_./:@+,", c) != NULL;
}

const char *pw_log_quote(char *buf, size_t cap, const char *s)
{
    if (cap == 0)
        return buf;
    if (!s)
        s = "";
    bool bare = *s != '\0';
    for (const unsigned char *p = (const unsigned char *)s; *p && bare; p++)
        bare = is_bare(*p);
    size_t o = 0;
    if (bare) {
        size_t n = strlen(s);
        if (n < cap) {
            memcpy(buf, s, n + 1);
            return buf;
        }
    }
    /* Quoted form; reserve room for the closing quote, "..." and the NUL. */
    if (cap < 6) {
        buf[0] = '\0';
        return buf;
    }
    size_t limit = cap - 5;
    buf[o++] = '"';
    const unsigned char *p = (const unsigned char *)s;
    for (; *p; p++) {
        char esc[5];
        size_t elen;
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            elen = 2;
        } else if (*p == '\n') {
            memcpy(esc, "\\n", 2);
            elen = 2;
        } else if (*p == '\t') {
            memcpy(esc, "\\t", 2);
            elen = 2;
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", *p);
            elen = 4;
        } else {
            esc[0] = (char)*p;
            elen = 1;
        }
        if (o + elen > limit)
            break;
        memcpy(buf + o, esc, elen);
        o += elen;
    }
    if (*p) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

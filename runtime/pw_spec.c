/*
 * pw_spec: function-spec YAML to a validated struct pw_spec, and back out as JSON.
 *
 * Two passes. The first reads libyaml events into a small tree (struct ynode), refusing
 * anchors, aliases, tags, duplicate keys, non-scalar keys, a second document, and trees
 * too deep or too large; it is the only place that sees YAML syntax. The second walks the
 * tree against the schema (docs/internals/spec.md) and fills the struct. Both stop at the
 * first error and describe it in one line with a 1-based position and a key path.
 *
 * No globals; reentrant. Nothing here trusts the input: every count and length is capped
 * before it is used.
 */
#include "pw_spec.h"
#include "pw_yaml.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <yaml.h>

/* Longest model.path we keep (before joining with the base directory). */
#define SPEC_PATH_MAX 4096
/* Longest key path shown in a message. */
#define KEYPATH_MAX 192

/* ------------------------------------------------------------------------------------ */
/* The YAML tree                                                                        */

enum ykind { YN_SCALAR, YN_MAP, YN_SEQ };

struct ynode {
    enum ykind kind;
    struct pw_spec_mark mark; /* start of the node, 1-based */
    /* scalar */
    char *text; /* NUL-terminated copy; may hold NULs before len (rejected on use) */
    size_t len; /* bytes in text, excluding the terminator */
    bool plain; /* unquoted, not a block literal: may be a number, bool or null */
    /* mapping (key, value, key, value, ...) or sequence (items) */
    struct ynode **kids;
    size_t n;
    size_t cap;
};

struct ctx {
    const char *origin; /* for messages */
    const char *text;   /* the input, to turn a byte offset into a position */
    size_t text_len;
    char *errbuf; /* borrowed; may be NULL */
    size_t errcap;
    enum pw_err err; /* first error, PW_OK while none */
    size_t nodes;    /* nodes made so far, capped at PW_SPEC_MAX_NODES */
    yaml_parser_t parser;
    char bpath[KEYPATH_MAX]; /* key path while building, for syntax errors */
};

static void ynode_free(struct ynode *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->n; i++)
        ynode_free(n->kids[i]);
    free(n->kids);
    free(n->text);
    free(n);
}

/* Replaces control bytes with '?', so any message is exactly one printable line. */
static void one_line(char *s)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch < 0x20 || ch == 0x7f)
            *s = '?';
    }
}

static void write_err(char *errbuf, size_t errcap, const char *origin, struct pw_spec_mark m,
                      const char *path, const char *msg)
{
    if (!errbuf || errcap == 0)
        return;
    snprintf(errbuf, errcap, "%s:%u:%u: %s: %s", origin ? origin : "<spec>", (unsigned)m.line,
             (unsigned)m.col, path && path[0] ? path : "(document)", msg);
    one_line(errbuf);
}

__attribute__((format(printf, 4, 5))) static void fail(struct ctx *c, struct pw_spec_mark m,
                                                       const char *path, const char *fmt, ...)
{
    if (c->err)
        return;
    c->err = PW_ERR_CONFIG;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    write_err(c->errbuf, c->errcap, c->origin, m, path, msg);
}

static void fail_nomem(struct ctx *c, struct pw_spec_mark m)
{
    if (c->err)
        return;
    c->err = PW_ERR_NOMEM;
    write_err(c->errbuf, c->errcap, c->origin, m, "", "out of memory");
}

/* Copies at most 40 bytes of s for quoting in a message. */
static const char *clip(char buf[48], const char *s, size_t len)
{
    if (len <= 40) {
        memcpy(buf, s, len);
        buf[len] = '\0';
    } else {
        memcpy(buf, s, 37);
        memcpy(buf + 37, "...", 4);
    }
    return buf;
}

static struct pw_spec_mark to_mark(yaml_mark_t m)
{
    struct pw_spec_mark r = {(uint32_t)m.line + 1, (uint32_t)m.column + 1};
    return r;
}

/* Position of a byte offset (reader errors carry only the offset). */
static struct pw_spec_mark offset_mark(const struct ctx *c, size_t off)
{
    struct pw_spec_mark r = {1, 1};
    for (size_t i = 0; i < off && i < c->text_len; i++) {
        if (c->text[i] == '\n') {
            r.line++;
            r.col = 1;
        } else {
            r.col++;
        }
    }
    return r;
}

/* Fetches the next event; on a YAML error records it and returns false. */
static bool next_event(struct ctx *c, yaml_event_t *ev)
{
    if (yaml_parser_parse(&c->parser, ev))
        return true;
    yaml_parser_t *p = &c->parser;
    if (p->error == YAML_MEMORY_ERROR) {
        fail_nomem(c, to_mark(p->problem_mark));
        return false;
    }
    struct pw_spec_mark m = p->error == YAML_READER_ERROR ? offset_mark(c, p->problem_offset)
                                                          : to_mark(p->problem_mark);
    const char *problem = p->problem ? p->problem : "unknown error";
    if (p->context)
        fail(c, m, c->bpath, "invalid YAML: %s (%s at %u:%u)", problem, p->context,
             (unsigned)p->context_mark.line + 1, (unsigned)p->context_mark.column + 1);
    else
        fail(c, m, c->bpath, "invalid YAML: %s", problem);
    return false;
}

static struct ynode *ynode_new(struct ctx *c, enum ykind kind, yaml_mark_t mark)
{
    struct pw_spec_mark m = to_mark(mark);
    if (c->nodes >= PW_SPEC_MAX_NODES) {
        fail(c, m, c->bpath, "more than %d YAML nodes", PW_SPEC_MAX_NODES);
        return NULL;
    }
    struct ynode *n = calloc(1, sizeof *n);
    if (!n) {
        fail_nomem(c, m);
        return NULL;
    }
    c->nodes++;
    n->kind = kind;
    n->mark = m;
    return n;
}

static bool ynode_add(struct ctx *c, struct ynode *parent, struct ynode *kid)
{
    if (parent->n == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8;
        struct ynode **k = realloc(parent->kids, cap * sizeof *k);
        if (!k) {
            fail_nomem(c, kid->mark);
            return false;
        }
        parent->kids = k;
        parent->cap = cap;
    }
    parent->kids[parent->n++] = kid;
    return true;
}

/* Appends ".seg" (or "seg" at the root) to the build path; returns the old length. */
static size_t bpath_push(struct ctx *c, const char *seg, size_t seglen, bool index)
{
    size_t old = strlen(c->bpath);
    char buf[48];
    clip(buf, seg, seglen);
    snprintf(c->bpath + old, sizeof c->bpath - old, "%s%s%s",
             index ? "["
             : old ? "."
                   : "",
             buf, index ? "]" : "");
    return old;
}

static struct ynode *build(struct ctx *c, yaml_event_t *ev, int depth);

/* Reads the children of a mapping or sequence until its end event. */
static bool build_children(struct ctx *c, struct ynode *n, int depth)
{
    for (;;) {
        /* The path names the child before its event is read, so that a syntax error inside
         * a value is reported under that value's key. */
        bool is_key = n->kind == YN_MAP && n->n % 2 == 0;
        size_t old = strlen(c->bpath);
        if (n->kind == YN_SEQ) {
            char idx[24];
            int k = snprintf(idx, sizeof idx, "%zu", n->n);
            bpath_push(c, idx, (size_t)k, true);
        } else if (!is_key) {
            struct ynode *key = n->kids[n->n - 1];
            bpath_push(c, key->text, key->len, false);
        }
        yaml_event_t ev;
        if (!next_event(c, &ev))
            return false;
        if (ev.type == YAML_MAPPING_END_EVENT || ev.type == YAML_SEQUENCE_END_EVENT) {
            c->bpath[old] = '\0';
            yaml_event_delete(&ev);
            return true;
        }
        struct ynode *kid = build(c, &ev, depth + 1); /* consumes ev */
        c->bpath[old] = '\0';
        if (!kid)
            return false;
        if (!ynode_add(c, n, kid)) {
            ynode_free(kid);
            return false;
        }
        if (!is_key)
            continue;
        char path[KEYPATH_MAX];
        snprintf(path, sizeof path, "%s", c->bpath);
        if (kid->kind != YN_SCALAR) {
            fail(c, kid->mark, path, "mapping keys must be plain strings");
            return false;
        }
        bpath_push(c, kid->text, kid->len, false);
        snprintf(path, sizeof path, "%s", c->bpath);
        c->bpath[old] = '\0';
        for (size_t i = 0; i + 1 < n->n; i += 2) {
            struct ynode *prev = n->kids[i];
            if (prev->len == kid->len && memcmp(prev->text, kid->text, kid->len) == 0) {
                fail(c, kid->mark, path, "duplicate key (first at %u:%u)",
                     (unsigned)prev->mark.line, (unsigned)prev->mark.col);
                return false;
            }
        }
    }
}

/* Builds the node that starts with *ev; consumes *ev. Returns NULL after an error. */
static struct ynode *build(struct ctx *c, yaml_event_t *ev, int depth)
{
    struct ynode *n = NULL;
    struct pw_spec_mark m = to_mark(ev->start_mark);

    const char *refused = pw_yaml_refusal(ev);
    if (refused) {
        fail(c, m, c->bpath, "%s", refused);
        goto out;
    }
    if (ev->type != YAML_SCALAR_EVENT && ev->type != YAML_SEQUENCE_START_EVENT &&
        ev->type != YAML_MAPPING_START_EVENT) {
        fail(c, m, c->bpath, "unexpected YAML event");
        goto out;
    }
    if (ev->type == YAML_SCALAR_EVENT) {
        n = ynode_new(c, YN_SCALAR, ev->start_mark);
        if (!n)
            goto out;
        n->len = ev->data.scalar.length;
        n->text = malloc(n->len + 1);
        if (!n->text) {
            fail_nomem(c, m);
            goto fail;
        }
        memcpy(n->text, ev->data.scalar.value, n->len);
        n->text[n->len] = '\0';
        n->plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        goto out;
    }
    if (depth >= PW_SPEC_MAX_DEPTH) {
        fail(c, m, c->bpath, "nested deeper than %d levels", PW_SPEC_MAX_DEPTH);
        goto out;
    }
    n = ynode_new(c, ev->type == YAML_MAPPING_START_EVENT ? YN_MAP : YN_SEQ, ev->start_mark);
    if (!n)
        goto out;
    yaml_event_delete(ev);
    if (!build_children(c, n, depth))
        goto fail;
    return n;

fail:
    ynode_free(n);
    n = NULL;
out:
    yaml_event_delete(ev);
    return n;
}

/* Parses the whole stream into one tree; NULL after an error. */
static struct ynode *build_document(struct ctx *c)
{
    struct ynode *root = NULL;
    struct pw_spec_mark first = {1, 1};
    yaml_event_t ev;

    if (!next_event(c, &ev)) /* stream start */
        return NULL;
    yaml_event_delete(&ev);
    if (!next_event(c, &ev))
        return NULL;
    if (ev.type == YAML_STREAM_END_EVENT) {
        yaml_event_delete(&ev);
        fail(c, first, "", "the spec is empty");
        return NULL;
    }
    yaml_event_delete(&ev); /* document start */
    if (!next_event(c, &ev))
        return NULL;
    root = build(c, &ev, 0);
    if (!root)
        return NULL;
    if (!next_event(c, &ev)) /* document end */
        goto fail;
    yaml_event_delete(&ev);
    if (!next_event(c, &ev))
        goto fail;
    if (ev.type != YAML_STREAM_END_EVENT) {
        fail(c, to_mark(ev.start_mark), "", "only one YAML document is allowed");
        yaml_event_delete(&ev);
        goto fail;
    }
    yaml_event_delete(&ev);
    return root;

fail:
    ynode_free(root);
    return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Value parsers                                                                        */

/*
 * Parses "D+[.D+]" at *s into mantissa and count of fraction digits (trailing zeros of the
 * fraction dropped), advancing *s. At most 19 significant digits.
 */
static enum pw_err parse_decimal(const char **s, uint64_t *mant, unsigned *scale)
{
    const char *p = *s;
    uint64_t v = 0;
    unsigned digits = 0, frac = 0;
    if (*p < '0' || *p > '9')
        return PW_ERR_PARSE;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v == 0 && *p == '0')
            continue;
        if (++digits > 19)
            return PW_ERR_RANGE;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return PW_ERR_PARSE;
        const char *fs = p;
        while (*p >= '0' && *p <= '9')
            p++;
        const char *fe = p;
        while (fe > fs && fe[-1] == '0')
            fe--;
        for (const char *q = fs; q < fe; q++) {
            if (v != 0 || *q != '0')
                digits++;
            /* frac is capped too: 10^frac must fit in 64 bits (scale_exact). */
            if (digits > 19 || frac >= 19)
                return PW_ERR_RANGE;
            v = v * 10 + (uint64_t)(*q - '0');
            frac++;
        }
    }
    *s = p;
    *mant = v;
    *scale = frac;
    return PW_OK;
}

/* mant / 10^scale * mult, exactly; PARSE when not a whole number, RANGE on overflow. */
static enum pw_err scale_exact(uint64_t mant, unsigned scale, uint64_t mult, uint64_t *out)
{
    uint64_t p10 = 1;
    for (unsigned i = 0; i < scale; i++)
        p10 *= 10; /* scale <= 19, so this fits */
    uint64_t whole = mant / p10, rem = mant % p10, a, b;
    if (__builtin_mul_overflow(whole, mult, &a))
        return PW_ERR_RANGE;
    /* rem < p10 <= 1e19; rem * mult may overflow only for huge units, so check. */
    if (__builtin_mul_overflow(rem, mult, &b))
        return PW_ERR_RANGE;
    if (b % p10 != 0)
        return PW_ERR_PARSE;
    if (__builtin_add_overflow(a, b / p10, out))
        return PW_ERR_RANGE;
    return PW_OK;
}

enum pw_err pw_spec_parse_size(const char *s, uint64_t *bytes)
{
    static const struct {
        const char *unit;
        uint64_t mult;
    } units[] = {
        {"", 1},
        {"B", 1},
        {"KB", 1000ULL},
        {"MB", 1000ULL * 1000},
        {"GB", 1000ULL * 1000 * 1000},
        {"TB", 1000ULL * 1000 * 1000 * 1000},
        {"KiB", 1ULL << 10},
        {"MiB", 1ULL << 20},
        {"GiB", 1ULL << 30},
        {"TiB", 1ULL << 40},
    };
    uint64_t mant;
    unsigned scale;
    const char *p = s;
    enum pw_err err = parse_decimal(&p, &mant, &scale);
    if (err)
        return err;
    if (*p == ' ' && p[1] != '\0')
        p++;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(p, units[i].unit) == 0)
            return scale_exact(mant, scale, units[i].mult, bytes);
    }
    return PW_ERR_PARSE;
}

enum pw_err pw_spec_parse_duration_ms(const char *s, uint64_t *ms)
{
    uint64_t total = 0;
    const char *p = s;
    if (strcmp(s, "0") == 0) {
        *ms = 0;
        return PW_OK;
    }
    if (*p == '\0')
        return PW_ERR_PARSE;
    while (*p) {
        uint64_t mant, term, mult;
        unsigned scale;
        enum pw_err err = parse_decimal(&p, &mant, &scale);
        if (err)
            return err;
        if (p[0] == 'm' && p[1] == 's') {
            mult = 1;
            p += 2;
        } else if (p[0] == 's') {
            mult = 1000;
            p++;
        } else if (p[0] == 'm') {
            mult = 60 * 1000;
            p++;
        } else if (p[0] == 'h') {
            mult = 3600 * 1000;
            p++;
        } else {
            return PW_ERR_PARSE;
        }
        err = scale_exact(mant, scale, mult, &term);
        if (err)
            return err;
        if (__builtin_add_overflow(total, term, &total))
            return PW_ERR_RANGE;
    }
    *ms = total;
    return PW_OK;
}

/* ------------------------------------------------------------------------------------ */
/* Schema walk                                                                          */

static bool is_null_plain(const struct ynode *n)
{
    return n->kind == YN_SCALAR && n->plain &&
           (n->len == 0 || strcmp(n->text, "~") == 0 || strcmp(n->text, "null") == 0 ||
            strcmp(n->text, "Null") == 0 || strcmp(n->text, "NULL") == 0);
}

/* "a mapping", "a list", "null", "a quoted string", "'text'": what the user wrote. */
static const char *describe(const struct ynode *n, char buf[64])
{
    if (n->kind == YN_MAP)
        return "a mapping";
    if (n->kind == YN_SEQ)
        return "a list";
    if (is_null_plain(n))
        return "null";
    char c[48];
    clip(c, n->text, n->len);
    snprintf(buf, 64, "'%s'", c);
    return buf;
}

/* Joins parent and key into buf ("model" + "path" = "model.path"). */
static const char *join(char buf[KEYPATH_MAX], const char *parent, const char *key, size_t klen)
{
    char k[48];
    clip(k, key, klen);
    snprintf(buf, KEYPATH_MAX, "%s%s%s", parent, parent[0] ? "." : "", k);
    return buf;
}

/*
 * Checks that n is a mapping whose keys are all in keys[0..nkeys); stores each value in
 * vals[i] (NULL when absent) and the key node in knodes[i] when knodes is given.
 */
static bool take_map(struct ctx *c, const struct ynode *n, const char *path,
                     const char *const *keys, size_t nkeys, struct ynode **vals,
                     struct ynode **knodes)
{
    char d[64];
    if (n->kind != YN_MAP) {
        fail(c, n->mark, path, "must be a mapping, got %s", describe(n, d));
        return false;
    }
    for (size_t i = 0; i < nkeys; i++) {
        vals[i] = NULL;
        if (knodes)
            knodes[i] = NULL;
    }
    for (size_t j = 0; j + 1 < n->n; j += 2) {
        const struct ynode *k = n->kids[j];
        size_t i;
        for (i = 0; i < nkeys; i++) {
            if (strlen(keys[i]) == k->len && memcmp(keys[i], k->text, k->len) == 0)
                break;
        }
        if (i == nkeys) {
            char p[KEYPATH_MAX], expected[256] = "";
            size_t off = 0;
            for (size_t e = 0; e < nkeys && off < sizeof expected; e++)
                off += (size_t)snprintf(expected + off, sizeof expected - off, "%s%s",
                                        e ? ", " : "", keys[e]);
            fail(c, k->mark, join(p, path, k->text, k->len), "unknown key (expected one of: %s)",
                 expected);
            return false;
        }
        vals[i] = n->kids[j + 1];
        if (knodes)
            knodes[i] = n->kids[j];
    }
    return true;
}

/* A non-null scalar without NUL bytes; its text, or NULL after an error. */
static const char *get_text(struct ctx *c, const struct ynode *n, const char *path)
{
    char d[64];
    if (n->kind != YN_SCALAR || is_null_plain(n)) {
        fail(c, n->mark, path, "must be a string, got %s", describe(n, d));
        return NULL;
    }
    if (strlen(n->text) != n->len) {
        fail(c, n->mark, path, "must not contain NUL bytes");
        return NULL;
    }
    for (size_t i = 0; i < n->len; i++) {
        unsigned char ch = (unsigned char)n->text[i];
        if (ch < 0x20 || ch == 0x7f) {
            fail(c, n->mark, path, "must not contain control characters");
            return NULL;
        }
    }
    return n->text;
}

/* A number: a plain (unquoted) scalar. */
static const char *get_number_text(struct ctx *c, const struct ynode *n, const char *path,
                                   const char *what)
{
    char d[64];
    if (n->kind != YN_SCALAR || is_null_plain(n)) {
        fail(c, n->mark, path, "must be %s, got %s", what, describe(n, d));
        return NULL;
    }
    if (!n->plain) {
        fail(c, n->mark, path, "must be %s, not a quoted string", what);
        return NULL;
    }
    return get_text(c, n, path);
}

static bool get_uint(struct ctx *c, const struct ynode *n, const char *path, uint64_t min,
                     uint64_t max, uint32_t *out)
{
    char d[64];
    const char *t = get_number_text(c, n, path, "a whole number");
    if (!t)
        return false;
    uint64_t v = 0;
    bool ok = t[0] >= '0' && t[0] <= '9' && !(t[0] == '0' && t[1] != '\0');
    for (const char *p = t; ok && *p; p++) {
        if (*p < '0' || *p > '9' || __builtin_mul_overflow(v, 10, &v) ||
            __builtin_add_overflow(v, (uint64_t)(*p - '0'), &v))
            ok = false;
    }
    if (!ok && t[0] == '-' && t[1] >= '0' && t[1] <= '9') {
        fail(c, n->mark, path, "must be between %llu and %llu, got %s", (unsigned long long)min,
             (unsigned long long)max, describe(n, d));
        return false;
    }
    if (!ok) {
        fail(c, n->mark, path, "must be a whole number, got %s", describe(n, d));
        return false;
    }
    if (v < min || v > max) {
        fail(c, n->mark, path, "must be between %llu and %llu, got %s", (unsigned long long)min,
             (unsigned long long)max, describe(n, d));
        return false;
    }
    *out = (uint32_t)v;
    return true;
}

/* A decimal with at most `frac` fraction digits, as an integer in 1/10^frac units. */
static bool get_fixed(struct ctx *c, const struct ynode *n, const char *path, unsigned frac,
                      uint64_t min, uint64_t max, const char *range, uint64_t *out)
{
    char d[64];
    const char *t = get_number_text(c, n, path, "a number");
    if (!t)
        return false;
    const char *p = t;
    uint64_t mant = 0, v = 0, mult = 1;
    unsigned scale = 0;
    for (unsigned i = 0; i < frac; i++)
        mult *= 10;
    enum pw_err err = parse_decimal(&p, &mant, &scale);
    if (!err && *p != '\0')
        err = PW_ERR_PARSE;
    if (!err && scale > frac) {
        fail(c, n->mark, path, "has more than %u decimal places", frac);
        return false;
    }
    if (!err)
        err = scale_exact(mant, scale, mult, &v);
    if (err == PW_ERR_PARSE) {
        fail(c, n->mark, path, "must be a non-negative decimal number, got %s", describe(n, d));
        return false;
    }
    if (err || v < min || v > max) {
        fail(c, n->mark, path, "must be %s, got %s", range, describe(n, d));
        return false;
    }
    *out = v;
    return true;
}

static bool get_enum(struct ctx *c, const struct ynode *n, const char *path,
                     const char *const *names, size_t count, int *out)
{
    char d[64];
    const char *t = get_text(c, n, path);
    if (!t)
        return false;
    for (size_t i = 0; i < count; i++) {
        if (strcmp(t, names[i]) == 0) {
            *out = (int)i;
            return true;
        }
    }
    char list[192] = "";
    size_t off = 0;
    for (size_t i = 0; i < count && off < sizeof list; i++)
        off += (size_t)snprintf(list + off, sizeof list - off, "%s%s", i ? ", " : "", names[i]);
    fail(c, n->mark, path, "must be one of %s, got %s", list, describe(n, d));
    return false;
}

static bool get_size(struct ctx *c, const struct ynode *n, const char *path, uint64_t min,
                     uint64_t max, const char *range, uint64_t *out)
{
    char d[64];
    const char *t = get_text(c, n, path);
    if (!t)
        return false;
    uint64_t v;
    enum pw_err err = pw_spec_parse_size(t, &v);
    if (err == PW_ERR_PARSE) {
        fail(c, n->mark, path, "must be a size like 512MiB, 8GiB or 1.5GB, got %s", describe(n, d));
        return false;
    }
    if (err || v < min || v > max) {
        fail(c, n->mark, path, "must be %s, got %s", range, describe(n, d));
        return false;
    }
    *out = v;
    return true;
}

static bool get_duration(struct ctx *c, const struct ynode *n, const char *path, uint64_t min,
                         uint64_t max, const char *range, uint64_t *out)
{
    char d[64];
    const char *t = get_text(c, n, path);
    if (!t)
        return false;
    uint64_t v;
    enum pw_err err = pw_spec_parse_duration_ms(t, &v);
    if (err == PW_ERR_PARSE) {
        fail(c, n->mark, path,
             "must be a duration like 500ms, 30s, 2m or 1h30m (whole milliseconds), got %s",
             describe(n, d));
        return false;
    }
    if (err || v < min || v > max) {
        fail(c, n->mark, path, "must be %s, got %s", range, describe(n, d));
        return false;
    }
    *out = v;
    return true;
}

static char *dup_or_nomem(struct ctx *c, struct pw_spec_mark m, const char *s)
{
    char *r = strdup(s);
    if (!r)
        fail_nomem(c, m);
    return r;
}

static bool is_lower_alnum(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
}

static bool is_alnum(char ch)
{
    return is_lower_alnum(ch) || (ch >= 'A' && ch <= 'Z');
}

/* [a-z0-9]([a-z0-9-]*[a-z0-9])?, 1..63 bytes. */
static bool is_dns_label(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > PW_SPEC_NAME_MAX || !is_lower_alnum(s[0]) || !is_lower_alnum(s[len - 1]))
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_lower_alnum(s[i]) && s[i] != '-')
            return false;
    }
    return true;
}

/* Each char of s is alphanumeric or in extra; first and last alphanumeric; 1..max bytes. */
static bool is_token(const char *s, size_t len, const char *extra, size_t max)
{
    if (len == 0 || len > max || !is_alnum(s[0]) || !is_alnum(s[len - 1]))
        return false;
    for (size_t i = 0; i < len; i++) {
        if (!is_alnum(s[i]) && !strchr(extra, s[i]))
            return false;
    }
    return true;
}

/* pypi:PACKAGE==VERSION/FILE into src. */
static bool parse_source(struct ctx *c, const struct ynode *n, const char *path, const char *t,
                         struct pw_spec_source *src)
{
    char d[64];
    const char *colon = strchr(t, ':');
    if (!colon || colon == t || (strchr(t, '/') && strchr(t, '/') < colon)) {
        fail(c, n->mark, path, "must look like pypi:PACKAGE==VERSION/FILE, got %s", describe(n, d));
        return false;
    }
    if ((size_t)(colon - t) != 4 || memcmp(t, "pypi", 4) != 0) {
        char scheme[48];
        fail(c, n->mark, path, "unsupported source scheme '%s' (supported: pypi)",
             clip(scheme, t, (size_t)(colon - t)));
        return false;
    }
    const char *pkg = colon + 1;
    const char *eq = strstr(pkg, "==");
    const char *slash = eq ? strchr(eq + 2, '/') : NULL;
    if (!eq || !slash) {
        fail(c, n->mark, path, "must look like pypi:PACKAGE==VERSION/FILE, got %s", describe(n, d));
        return false;
    }
    const char *ver = eq + 2, *file = slash + 1;
    size_t plen = (size_t)(eq - pkg), vlen = (size_t)(slash - ver), flen = strlen(file);
    if (!is_token(pkg, plen, "._-", 128)) {
        fail(c, n->mark, path, "bad package name: use letters, digits, '.', '_' and '-'");
        return false;
    }
    if (!is_token(ver, vlen, ".+!_-", 64)) {
        fail(c, n->mark, path, "bad version: use an exact version like 0.1.2");
        return false;
    }
    /* FILE: '/'-separated segments of [A-Za-z0-9._+-], none empty, "." or "..". */
    bool ok = flen > 0 && flen <= 255;
    for (const char *seg = file; ok && *seg;) {
        const char *end = strchr(seg, '/');
        size_t sl = end ? (size_t)(end - seg) : strlen(seg);
        ok = sl > 0 && !(sl == 1 && seg[0] == '.') && !(sl == 2 && seg[0] == '.' && seg[1] == '.');
        for (size_t i = 0; ok && i < sl; i++)
            ok = is_alnum(seg[i]) || strchr("._+-", seg[i]) != NULL;
        if (end && end[1] == '\0')
            ok = false;
        seg = end ? end + 1 : seg + sl;
    }
    if (!ok) {
        fail(c, n->mark, path,
             "bad file: a relative path inside the wheel, segments of letters, digits, "
             "'.', '_', '+' and '-'");
        return false;
    }
    src->kind = PW_SPEC_SOURCE_PYPI;
    src->ref = dup_or_nomem(c, n->mark, t);
    src->package = src->ref ? strndup(pkg, plen) : NULL;
    src->version = src->package ? strndup(ver, vlen) : NULL;
    src->file = src->version ? strdup(file) : NULL;
    if (!src->file) {
        fail_nomem(c, n->mark);
        return false;
    }
    return true;
}

static const char *const chat_template_names[] = {
    [PW_SPEC_TEMPLATE_AUTO] = "auto",       [PW_SPEC_TEMPLATE_CHATML] = "chatml",
    [PW_SPEC_TEMPLATE_LLAMA2] = "llama2",   [PW_SPEC_TEMPLATE_LLAMA3] = "llama3",
    [PW_SPEC_TEMPLATE_MISTRAL] = "mistral", [PW_SPEC_TEMPLATE_ZEPHYR] = "zephyr",
};
static const char *const idle_action_names[] = {
    [PW_SPEC_IDLE_PARK] = "park",
    [PW_SPEC_IDLE_TERMINATE] = "terminate",
};
static const char *const spot_names[] = {
    [PW_SPEC_SPOT_ON_DEMAND] = "on-demand",
    [PW_SPEC_SPOT_SPOT] = "spot",
    [PW_SPEC_SPOT_AUTO] = "auto",
};
static const char *const format_names[] = {"gguf"};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static bool walk_model(struct ctx *c, const struct ynode *n, const char *base_dir,
                       struct pw_spec *s)
{
    enum { M_PATH, M_SOURCE, M_FORMAT, M_SHA, M_TEMPLATE, M_N };
    static const char *const keys[M_N] = {"path", "source", "format", "sha256", "chat_template"};
    struct ynode *v[M_N], *k[M_N];
    if (!take_map(c, n, "model", keys, M_N, v, k))
        return false;
    if (v[M_PATH] && v[M_SOURCE]) {
        struct pw_spec_mark a = k[M_PATH]->mark, b = k[M_SOURCE]->mark;
        bool path_last = a.line > b.line || (a.line == b.line && a.col > b.col);
        const struct ynode *second = path_last ? k[M_PATH] : k[M_SOURCE];
        fail(c, second->mark, second == k[M_PATH] ? "model.path" : "model.source",
             "set exactly one of model.path and model.source, not both");
        return false;
    }
    if (!v[M_PATH] && !v[M_SOURCE]) {
        fail(c, n->mark, "model", "needs path (a local GGUF file) or source (pypi:...)");
        return false;
    }
    if (v[M_PATH]) {
        const char *t = get_text(c, v[M_PATH], "model.path");
        if (!t)
            return false;
        if (t[0] == '\0' || strlen(t) > SPEC_PATH_MAX) {
            fail(c, v[M_PATH]->mark, "model.path", "must be 1 to %d bytes", SPEC_PATH_MAX);
            return false;
        }
        if (t[0] == '/' || !base_dir || !base_dir[0]) {
            s->model.path = dup_or_nomem(c, v[M_PATH]->mark, t);
        } else {
            size_t bl = strlen(base_dir);
            bool slash = base_dir[bl - 1] == '/';
            if (asprintf(&s->model.path, "%s%s%s", base_dir, slash ? "" : "/", t) < 0) {
                s->model.path = NULL;
                fail_nomem(c, v[M_PATH]->mark);
            }
        }
        if (!s->model.path)
            return false;
    }
    if (v[M_SOURCE]) {
        const char *t = get_text(c, v[M_SOURCE], "model.source");
        if (!t || !parse_source(c, v[M_SOURCE], "model.source", t, &s->model.source))
            return false;
    }
    int e = 0;
    if (v[M_FORMAT] && !get_enum(c, v[M_FORMAT], "model.format", format_names, 1, &e))
        return false;
    if (v[M_SHA]) {
        const char *t = get_text(c, v[M_SHA], "model.sha256");
        if (!t)
            return false;
        bool ok = strlen(t) == 64;
        for (size_t i = 0; ok && i < 64; i++) {
            char ch = t[i];
            ok = (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
            s->model.sha256[i] = (ch >= 'A' && ch <= 'F') ? (char)(ch - 'A' + 'a') : ch;
        }
        if (!ok) {
            s->model.sha256[0] = '\0';
            fail(c, v[M_SHA]->mark, "model.sha256", "must be 64 hexadecimal digits");
            return false;
        }
        s->model.sha256[64] = '\0';
    } else if (v[M_SOURCE]) {
        fail(c, n->mark, "model.sha256", "is required when model.source is set");
        return false;
    }
    if (v[M_TEMPLATE]) {
        if (!get_enum(c, v[M_TEMPLATE], "model.chat_template", chat_template_names,
                      NELEM(chat_template_names), &e))
            return false;
        s->model.chat_template = (enum pw_spec_chat_template)e;
    }
    return true;
}

static bool walk_resources(struct ctx *c, const struct ynode *n, struct pw_spec *s)
{
    enum { R_GPU, R_GPUMEM, R_CPU, R_MEM, R_N };
    static const char *const keys[R_N] = {"gpu", "gpu_memory", "cpu", "memory"};
    struct ynode *v[R_N];
    char d[64];
    if (!take_map(c, n, "resources", keys, R_N, v, NULL))
        return false;
    if (v[R_GPU]) {
        const char *t = get_text(c, v[R_GPU], "resources.gpu");
        if (!t)
            return false;
        static const char *const yaml_words[] = {"y",     "n",  "yes", "no",  "true",
                                                 "false", "on", "off", "null"};
        bool word = false;
        for (size_t i = 0; i < NELEM(yaml_words); i++)
            word = word || strcmp(t, yaml_words[i]) == 0;
        if (strcmp(t, "none") == 0) {
            s->resources.gpu = PW_SPEC_GPU_NONE;
        } else if (strcmp(t, "any") == 0) {
            s->resources.gpu = PW_SPEC_GPU_ANY;
        } else if (!word && t[0] >= 'a' && t[0] <= 'z' && is_dns_label(t)) {
            s->resources.gpu = PW_SPEC_GPU_MODEL;
            s->resources.gpu_model = dup_or_nomem(c, v[R_GPU]->mark, t);
            if (!s->resources.gpu_model)
                return false;
        } else {
            fail(c, v[R_GPU]->mark, "resources.gpu",
                 "must be none, any or a GPU model name like a100-80gb, got %s",
                 describe(v[R_GPU], d));
            return false;
        }
    }
    if (v[R_GPUMEM]) {
        if (!get_size(c, v[R_GPUMEM], "resources.gpu_memory", 0, 16ULL << 40, "between 0 and 16TiB",
                      &s->resources.gpu_memory_bytes))
            return false;
        if (s->resources.gpu_memory_bytes > 0 && s->resources.gpu == PW_SPEC_GPU_NONE) {
            fail(c, v[R_GPUMEM]->mark, "resources.gpu_memory",
                 "needs resources.gpu to be any or a GPU model (it is none)");
            return false;
        }
    }
    if (v[R_CPU]) {
        /* cpu: 2, 0.5 or "500m" (Kubernetes-style millicores). */
        const struct ynode *cn = v[R_CPU];
        uint64_t mc = 0;
        if (cn->kind == YN_SCALAR && cn->len > 1 && cn->text[cn->len - 1] == 'm') {
            const char *t = get_text(c, cn, "resources.cpu");
            if (!t)
                return false;
            bool ok = t[0] >= '1' && t[0] <= '9';
            for (size_t i = 0; ok && i + 1 < cn->len; i++) {
                ok = t[i] >= '0' && t[i] <= '9' && mc < 100000000;
                mc = mc * 10 + (uint64_t)(t[i] - '0');
            }
            if (!ok) {
                fail(c, cn->mark, "resources.cpu",
                     "must be cores (2, 0.5) or millicores "
                     "(500m), got %s",
                     describe(cn, d));
                return false;
            }
        } else {
            /* Quoted numbers are accepted here: cpu is a unit-bearing value like sizes. */
            struct ynode tmp = *cn;
            tmp.plain = true;
            if (!get_fixed(c, &tmp, "resources.cpu", 3, 0, UINT64_MAX,
                           "between 0.001 (1m) and 1024 cores", &mc))
                return false;
        }
        if (mc < 1 || mc > 1024000) {
            fail(c, cn->mark, "resources.cpu", "must be between 0.001 (1m) and 1024 cores, got %s",
                 describe(cn, d));
            return false;
        }
        s->resources.cpu_millicores = (uint32_t)mc;
    }
    if (v[R_MEM] && !get_size(c, v[R_MEM], "resources.memory", 16ULL << 20, 64ULL << 40,
                              "between 16MiB and 64TiB", &s->resources.memory_bytes))
        return false;
    return true;
}

static bool walk_scaling(struct ctx *c, const struct ynode *n, struct pw_spec *s)
{
    enum { S_MIN, S_MAX, S_TC, S_IDLE, S_ACTION, S_STARTUP, S_N };
    static const char *const keys[S_N] = {"min_replicas",       "max_replicas",
                                          "target_concurrency", "idle_seconds",
                                          "idle_action",        "startup_timeout_seconds"};
    struct ynode *v[S_N];
    if (!take_map(c, n, "scaling", keys, S_N, v, NULL))
        return false;
    if (v[S_MIN] &&
        !get_uint(c, v[S_MIN], "scaling.min_replicas", 0, 1000, &s->scaling.min_replicas))
        return false;
    if (v[S_MAX]) {
        if (!get_uint(c, v[S_MAX], "scaling.max_replicas", 1, 1000, &s->scaling.max_replicas))
            return false;
        if (s->scaling.max_replicas < s->scaling.min_replicas) {
            fail(c, v[S_MAX]->mark, "scaling.max_replicas", "must be >= min_replicas (%u)",
                 (unsigned)s->scaling.min_replicas);
            return false;
        }
    } else if (s->scaling.max_replicas < s->scaling.min_replicas) {
        s->scaling.max_replicas = s->scaling.min_replicas;
    }
    if (v[S_TC] && !get_uint(c, v[S_TC], "scaling.target_concurrency", 1, 4096,
                             &s->scaling.target_concurrency))
        return false;
    if (v[S_IDLE] &&
        !get_uint(c, v[S_IDLE], "scaling.idle_seconds", 0, 7 * 86400, &s->scaling.idle_seconds))
        return false;
    int e;
    if (v[S_ACTION]) {
        if (!get_enum(c, v[S_ACTION], "scaling.idle_action", idle_action_names,
                      NELEM(idle_action_names), &e))
            return false;
        s->scaling.idle_action = (enum pw_spec_idle_action)e;
    }
    if (v[S_STARTUP] && !get_uint(c, v[S_STARTUP], "scaling.startup_timeout_seconds", 1, 86400,
                                  &s->scaling.startup_timeout_seconds))
        return false;
    return true;
}

static bool walk_engine(struct ctx *c, const struct ynode *n, struct pw_spec *s)
{
    enum { E_BATCH, E_CTX, E_KV, E_N };
    static const char *const keys[E_N] = {"max_batch", "context_length", "kv_cache_fraction"};
    struct ynode *v[E_N];
    if (!take_map(c, n, "engine", keys, E_N, v, NULL))
        return false;
    if (v[E_BATCH] && !get_uint(c, v[E_BATCH], "engine.max_batch", 1, 256, &s->engine.max_batch))
        return false;
    if (v[E_CTX] &&
        !get_uint(c, v[E_CTX], "engine.context_length", 16, 1048576, &s->engine.context_length))
        return false;
    if (v[E_KV]) {
        uint64_t pm;
        if (!get_fixed(c, v[E_KV], "engine.kv_cache_fraction", 3, 10, 1000, "between 0.01 and 1",
                       &pm))
            return false;
        s->engine.kv_cache_permille = (uint32_t)pm;
    }
    return true;
}

static bool walk_pricing(struct ctx *c, const struct ynode *n, struct pw_spec *s)
{
    enum { P_MAX, P_SPOT, P_COLD, P_N };
    static const char *const keys[P_N] = {"max_price_per_hour", "spot",
                                          "cold_start_price_per_second"};
    struct ynode *v[P_N];
    if (!take_map(c, n, "pricing", keys, P_N, v, NULL))
        return false;
    if (v[P_MAX] &&
        !get_fixed(c, v[P_MAX], "pricing.max_price_per_hour", 6, 0, 1000000ULL * 1000000ULL,
                   "between 0 and 1000000 (USD per hour)", &s->pricing.max_microusd_per_hour))
        return false;
    int e;
    if (v[P_SPOT]) {
        if (!get_enum(c, v[P_SPOT], "pricing.spot", spot_names, NELEM(spot_names), &e))
            return false;
        s->pricing.spot = (enum pw_spec_spot)e;
    }
    if (v[P_COLD] && !get_fixed(c, v[P_COLD], "pricing.cold_start_price_per_second", 6, 1,
                                1000000ULL, "between 0.000001 and 1 (USD per second of wait)",
                                &s->pricing.cold_start_microusd_per_second))
        return false;
    return true;
}

static void set_defaults(struct pw_spec *s)
{
    s->model.chat_template = PW_SPEC_TEMPLATE_AUTO;
    s->resources.gpu = PW_SPEC_GPU_NONE;
    s->resources.gpu_memory_bytes = 0;
    s->resources.cpu_millicores = 1000;
    s->resources.memory_bytes = 1ULL << 30;
    s->scaling.min_replicas = 0;
    s->scaling.max_replicas = 1;
    s->scaling.target_concurrency = 8;
    s->scaling.idle_seconds = 300;
    s->scaling.idle_action = PW_SPEC_IDLE_PARK;
    s->scaling.startup_timeout_seconds = 600;
    s->engine.max_batch = 8;
    s->engine.context_length = 2048;
    s->engine.kv_cache_permille = 900;
    s->pricing.max_microusd_per_hour = 0;
    s->pricing.spot = PW_SPEC_SPOT_ON_DEMAND;
    s->max_queue_wait_ms = 60000;
}

static bool walk_spec(struct ctx *c, const struct ynode *root, const char *base_dir,
                      struct pw_spec *s)
{
    enum { T_NAME, T_MODEL, T_RES, T_SCALING, T_ENGINE, T_PRICING, T_QWAIT, T_N };
    static const char *const keys[T_N] = {"name",   "model",   "resources",     "scaling",
                                          "engine", "pricing", "max_queue_wait"};
    struct ynode *v[T_N];
    char d[64];
    if (!take_map(c, root, "", keys, T_N, v, NULL))
        return false;
    if (!v[T_NAME]) {
        fail(c, root->mark, "name", "required key is missing");
        return false;
    }
    const char *name = get_text(c, v[T_NAME], "name");
    if (!name)
        return false;
    if (!is_dns_label(name)) {
        fail(c, v[T_NAME]->mark, "name",
             "must be 1 to 63 characters of a-z, 0-9 and '-', starting and ending with a "
             "letter or digit, got %s",
             describe(v[T_NAME], d));
        return false;
    }
    s->name = dup_or_nomem(c, v[T_NAME]->mark, name);
    if (!s->name)
        return false;
    s->name_mark = v[T_NAME]->mark;
    if (!v[T_MODEL]) {
        fail(c, root->mark, "model", "required key is missing");
        return false;
    }
    if (!walk_model(c, v[T_MODEL], base_dir, s))
        return false;
    if (v[T_RES] && !walk_resources(c, v[T_RES], s))
        return false;
    if (v[T_SCALING] && !walk_scaling(c, v[T_SCALING], s))
        return false;
    if (v[T_ENGINE] && !walk_engine(c, v[T_ENGINE], s))
        return false;
    if (v[T_PRICING] && !walk_pricing(c, v[T_PRICING], s))
        return false;
    if (v[T_QWAIT] && !get_duration(c, v[T_QWAIT], "max_queue_wait", 1, 86400ULL * 1000,
                                    "between 1ms and 24h", &s->max_queue_wait_ms))
        return false;
    return true;
}

/* ------------------------------------------------------------------------------------ */
/* Public API                                                                           */

void pw_spec_destroy(struct pw_spec *spec)
{
    if (!spec)
        return;
    free(spec->name);
    free(spec->origin);
    free(spec->model.path);
    free(spec->model.source.ref);
    free(spec->model.source.package);
    free(spec->model.source.version);
    free(spec->model.source.file);
    free(spec->resources.gpu_model);
    free(spec);
}

enum pw_err pw_spec_parse(const char *text, size_t len, const char *origin_name,
                          const char *base_dir, struct pw_spec **out, char *errbuf, size_t errcap)
{
    PW_ASSERT(out && (text || len == 0));
    struct ctx c = {.origin = origin_name ? origin_name : "<spec>",
                    .text = text,
                    .text_len = len,
                    .errbuf = errbuf,
                    .errcap = errcap};
    struct pw_spec_mark first = {1, 1};
    struct ynode *root = NULL;
    struct pw_spec *s = NULL;
    bool parser_ready = false;

    *out = NULL;
    if (errbuf && errcap)
        errbuf[0] = '\0';
    if (len > PW_SPEC_MAX_BYTES) {
        fail(&c, first, "", "the spec is larger than %d bytes", PW_SPEC_MAX_BYTES);
        goto out;
    }
    if (!yaml_parser_initialize(&c.parser)) {
        fail_nomem(&c, first);
        goto out;
    }
    parser_ready = true;
    yaml_parser_set_input_string(&c.parser, (const unsigned char *)(text ? text : ""), len);
    root = build_document(&c);
    if (!root)
        goto out;

    s = calloc(1, sizeof *s);
    if (!s) {
        fail_nomem(&c, first);
        goto out;
    }
    set_defaults(s);
    s->origin = dup_or_nomem(&c, first, c.origin);
    if (!s->origin)
        goto out;
    if (!walk_spec(&c, root, base_dir, s))
        goto out;
    *out = s;
    s = NULL;

out:
    pw_spec_destroy(s);
    ynode_free(root);
    if (parser_ready)
        yaml_parser_delete(&c.parser);
    return c.err;
}

/* Reads at most PW_SPEC_MAX_BYTES + 1 bytes of a regular file into *buf (malloc'd). */
static enum pw_err read_capped(const char *path, char **buf, size_t *len, int *errno_out)
{
    enum pw_err err = PW_ERR_IO;
    char *b = NULL;
    size_t n = 0;
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    *errno_out = 0;
    if (fd < 0) {
        *errno_out = errno;
        goto out;
    }
    if (fstat(fd, &st) != 0) {
        *errno_out = errno;
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        *errno_out = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        goto out;
    }
    b = malloc(PW_SPEC_MAX_BYTES + 2);
    if (!b) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    while (n < PW_SPEC_MAX_BYTES + 1) {
        ssize_t r = read(fd, b + n, PW_SPEC_MAX_BYTES + 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            *errno_out = errno;
            goto out;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    b = NULL;
    err = PW_OK;
out:
    free(b);
    if (fd >= 0)
        close(fd);
    return err;
}

enum pw_err pw_spec_load_file(const char *path, struct pw_spec **out, char *errbuf, size_t errcap)
{
    PW_ASSERT(path && out);
    struct pw_spec_mark first = {1, 1};
    char *text = NULL, *dir = NULL, *real = NULL;
    size_t len = 0;
    int e = 0;
    char msg[128];

    *out = NULL;
    enum pw_err err = read_capped(path, &text, &len, &e);
    if (err) {
        snprintf(msg, sizeof msg, "cannot read: %s",
                 err == PW_ERR_NOMEM ? "out of memory" : strerror(e));
        write_err(errbuf, errcap, path, first, "", msg);
        goto out;
    }
    /* A relative model.path is relative to the spec file, made absolute so the spec means
     * the same thing to every process that reads it from Redis. */
    const char *slash = strrchr(path, '/');
    dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) {
        err = PW_ERR_NOMEM;
        write_err(errbuf, errcap, path, first, "", "out of memory");
        goto out;
    }
    real = realpath(dir, NULL);
    err = pw_spec_parse(text, len, path, real ? real : dir, out, errbuf, errcap);
out:
    free(real);
    free(dir);
    free(text);
    return err;
}

void pw_spec_set_deinit(struct pw_spec_set *set)
{
    if (!set)
        return;
    for (size_t i = 0; i < set->count; i++)
        pw_spec_destroy(set->specs[i]);
    free(set->specs);
    set->specs = NULL;
    set->count = 0;
}

const struct pw_spec *pw_spec_set_find(const struct pw_spec_set *set, const char *name)
{
    for (size_t i = 0; set && name && i < set->count; i++) {
        if (strcmp(set->specs[i]->name, name) == 0)
            return set->specs[i];
    }
    return NULL;
}

static bool has_spec_suffix(const char *name)
{
    size_t n = strlen(name);
    if (name[0] == '.')
        return false;
    return (n > 5 && strcmp(name + n - 5, ".yaml") == 0) ||
           (n > 4 && strcmp(name + n - 4, ".yml") == 0);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

enum pw_err pw_spec_load_dir(const char *dir, struct pw_spec_set *set, char *errbuf, size_t errcap)
{
    PW_ASSERT(dir && set);
    struct pw_spec_mark first = {1, 1};
    enum pw_err err = PW_OK;
    char **names = NULL;
    size_t n = 0;
    char msg[160];
    struct dirent *de;

    set->specs = NULL;
    set->count = 0;
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(msg, sizeof msg, "cannot read directory: %s", strerror(errno));
        write_err(errbuf, errcap, dir, first, "", msg);
        return PW_ERR_IO;
    }
    names = calloc(PW_SPEC_DIR_MAX_FILES, sizeof *names);
    if (!names) {
        err = PW_ERR_NOMEM;
        write_err(errbuf, errcap, dir, first, "", "out of memory");
        goto out;
    }
    while ((de = readdir(d)) != NULL) {
        if (!has_spec_suffix(de->d_name))
            continue;
        if (n == PW_SPEC_DIR_MAX_FILES) {
            err = PW_ERR_CONFIG;
            snprintf(msg, sizeof msg, "more than %d spec files", PW_SPEC_DIR_MAX_FILES);
            write_err(errbuf, errcap, dir, first, "", msg);
            goto out;
        }
        size_t dl = strlen(dir);
        if (asprintf(&names[n], "%s%s%s", dir, dl && dir[dl - 1] == '/' ? "" : "/", de->d_name) <
            0) {
            names[n] = NULL;
            err = PW_ERR_NOMEM;
            write_err(errbuf, errcap, dir, first, "", "out of memory");
            goto out;
        }
        n++;
    }
    qsort(names, n, sizeof *names, cmp_str);
    set->specs = calloc(n ? n : 1, sizeof *set->specs);
    if (!set->specs) {
        err = PW_ERR_NOMEM;
        write_err(errbuf, errcap, dir, first, "", "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        struct pw_spec *s = NULL;
        err = pw_spec_load_file(names[i], &s, errbuf, errcap);
        if (err)
            goto out;
        const struct pw_spec *prev = pw_spec_set_find(set, s->name);
        set->specs[set->count++] = s;
        if (prev) {
            err = PW_ERR_CONFIG;
            snprintf(msg, sizeof msg, "duplicate function name '%s' (also in %s)", s->name,
                     prev->origin);
            write_err(errbuf, errcap, s->origin, s->name_mark, "name", msg);
            goto out;
        }
    }
out:
    if (err)
        pw_spec_set_deinit(set);
    for (size_t i = 0; names && i < n; i++)
        free(names[i]);
    free(names);
    closedir(d);
    return err;
}

/* ------------------------------------------------------------------------------------ */
/* Names and JSON                                                                       */

const char *pw_spec_chat_template_name(enum pw_spec_chat_template t)
{
    return (unsigned)t < NELEM(chat_template_names) ? chat_template_names[t] : "unknown";
}

const char *pw_spec_gpu_name(enum pw_spec_gpu g)
{
    switch (g) {
    case PW_SPEC_GPU_NONE:
        return "none";
    case PW_SPEC_GPU_ANY:
        return "any";
    case PW_SPEC_GPU_MODEL:
        return "model";
    }
    return "unknown";
}

const char *pw_spec_idle_action_name(enum pw_spec_idle_action a)
{
    return (unsigned)a < NELEM(idle_action_names) ? idle_action_names[a] : "unknown";
}

const char *pw_spec_spot_name(enum pw_spec_spot s)
{
    return (unsigned)s < NELEM(spot_names) ? spot_names[s] : "unknown";
}

/* Sets key to v (stolen); records a failure instead of returning it, to keep callers flat. */
static void jset(json_t *obj, const char *key, json_t *v, bool *bad)
{
    if (!v || json_object_set_new(obj, key, v) != 0)
        *bad = true;
}

static json_t *jstr_or_null(const char *s)
{
    return s ? json_string(s) : json_null();
}

char *pw_spec_to_json(const struct pw_spec *s)
{
    PW_ASSERT(s);
    bool bad = false;
    char *text = NULL;
    json_t *root = json_object();
    json_t *model = json_object(), *res = json_object(), *sc = json_object();
    json_t *eng = json_object(), *pr = json_object(), *src = NULL;
    if (!root || !model || !res || !sc || !eng || !pr) {
        json_decref(model);
        json_decref(res);
        json_decref(sc);
        json_decref(eng);
        json_decref(pr);
        goto out;
    }
    jset(root, "model", model, &bad);
    jset(root, "resources", res, &bad);
    jset(root, "scaling", sc, &bad);
    jset(root, "engine", eng, &bad);
    jset(root, "pricing", pr, &bad);
    if (bad)
        goto out;

    jset(root, "schema", json_integer(1), &bad);
    jset(root, "name", json_string(s->name), &bad);
    jset(root, "max_queue_wait_ms", json_integer((json_int_t)s->max_queue_wait_ms), &bad);

    jset(model, "path", jstr_or_null(s->model.path), &bad);
    if (s->model.source.kind == PW_SPEC_SOURCE_PYPI) {
        src = json_object();
        if (src) {
            jset(src, "scheme", json_string("pypi"), &bad);
            jset(src, "ref", json_string(s->model.source.ref), &bad);
            jset(src, "package", json_string(s->model.source.package), &bad);
            jset(src, "version", json_string(s->model.source.version), &bad);
            jset(src, "file", json_string(s->model.source.file), &bad);
        }
        jset(model, "source", src, &bad);
    } else {
        jset(model, "source", json_null(), &bad);
    }
    jset(model, "format", json_string("gguf"), &bad);
    jset(model, "sha256", jstr_or_null(s->model.sha256[0] ? s->model.sha256 : NULL), &bad);
    jset(model, "chat_template", json_string(pw_spec_chat_template_name(s->model.chat_template)),
         &bad);

    jset(res, "gpu",
         json_string(s->resources.gpu == PW_SPEC_GPU_MODEL && s->resources.gpu_model
                         ? s->resources.gpu_model
                         : pw_spec_gpu_name(s->resources.gpu)),
         &bad);
    jset(res, "gpu_memory_bytes", json_integer((json_int_t)s->resources.gpu_memory_bytes), &bad);
    jset(res, "cpu_millicores", json_integer((json_int_t)s->resources.cpu_millicores), &bad);
    jset(res, "memory_bytes", json_integer((json_int_t)s->resources.memory_bytes), &bad);

    jset(sc, "min_replicas", json_integer(s->scaling.min_replicas), &bad);
    jset(sc, "max_replicas", json_integer(s->scaling.max_replicas), &bad);
    jset(sc, "target_concurrency", json_integer(s->scaling.target_concurrency), &bad);
    jset(sc, "idle_seconds", json_integer(s->scaling.idle_seconds), &bad);
    jset(sc, "idle_action", json_string(pw_spec_idle_action_name(s->scaling.idle_action)), &bad);
    jset(sc, "startup_timeout_seconds", json_integer(s->scaling.startup_timeout_seconds), &bad);

    jset(eng, "max_batch", json_integer(s->engine.max_batch), &bad);
    jset(eng, "context_length", json_integer(s->engine.context_length), &bad);
    jset(eng, "kv_cache_permille", json_integer(s->engine.kv_cache_permille), &bad);

    jset(pr, "max_microusd_per_hour", json_integer((json_int_t)s->pricing.max_microusd_per_hour),
         &bad);
    jset(pr, "spot", json_string(pw_spec_spot_name(s->pricing.spot)), &bad);
    jset(pr, "cold_start_microusd_per_second",
         json_integer((json_int_t)s->pricing.cold_start_microusd_per_second), &bad);

    if (!bad)
        text = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII);
out:
    json_decref(root);
    return text;
}

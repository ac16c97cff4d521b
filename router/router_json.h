/*
 * router_json: the router's strict JSON reader for request bodies.
 *
 * One call parses a whole buffer (length given, no NUL needed) into a read-only tree whose
 * nodes and decoded strings all live in a caller-owned arena: a few large blocks, no
 * malloc per node, one free for the lot. It accepts what jansson's json_loadb with
 * JSON_REJECT_DUPLICATES accepts, and builds the same tree (tests/unit/router/
 * test_router_json.c holds it to that), with one deliberate exception: jansson skips a raw
 * NUL byte right after a number or a literal ("[1\0]"), a quirk of its lexer; here any
 * raw NUL byte outside a string is an error, like any other stray byte. The rules:
 *
 *   - RFC 8259 only: the top level is an object or an array; nothing but whitespace
 *     (space, tab, CR, LF) after it; no leading zeros, no `+`, `.5`, `1.`, NaN or
 *     Infinity; strings without raw control characters (< 0x20) and with only the eight
 *     escapes of the RFC.
 *   - Strings are well-formed UTF-8 (no overlongs, no UTF-8-encoded surrogates, nothing
 *     above U+10FFFF); a \uD800-\uDBFF escape must be followed by a \uDC00-\uDFFF one; a
 *     lone surrogate escape of either half is an error, as is \u0000 (so a decoded string
 *     never holds a NUL: jansson without JSON_ALLOW_NUL refuses it too).
 *   - Duplicate keys in one object are an error (compared after decoding escapes).
 *   - Integers (no `.`, `e`, `E`) are int64_t; one that overflows is an error. Other
 *     numbers are doubles from strtod; one that overflows to infinity (1e400) is an
 *     error, one that underflows is kept (0 or subnormal), as jansson does.
 *   - Nesting is capped: more than max_depth open arrays and objects is an error.
 *
 * Objects keep their members in body order; lookup is a linear scan (request objects
 * are small). Errors carry a short text and a 1-based line and column (column counted in
 * UTF-8 characters, as jansson counts) of the byte where the problem was found.
 *
 * Thread-safety: reentrant; an arena and its tree belong to one thread.
 */
#ifndef ROUTER_JSON_H
#define ROUTER_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pw_err.h"

/* ---- arena -------------------------------------------------------------------------- */

/* Bytes of the first malloc'd block; each later block doubles, up to ROUTER_JSON_BLOCK_MAX
 * (a request bigger than that gets a block of its own size). */
#define ROUTER_JSON_BLOCK_MIN 4096
#define ROUTER_JSON_BLOCK_MAX (1024 * 1024)

struct router_json_block; /* a malloc'd block, private to router_json.c */

/*
 * Bump allocator. The caller owns the struct (usually on its stack) and may lend it a
 * first buffer (e.g. a few KiB of stack), which is used before any malloc. Everything
 * allocated from it stays valid until router_json_arena_deinit(). Allocations are 8-byte
 * aligned.
 */
struct router_json_arena {
    char *cur;                        /* next free byte of the current block */
    size_t left;                      /* bytes free at cur */
    size_t next_size;                 /* size of the next malloc'd block */
    struct router_json_block *blocks; /* malloc'd blocks, newest first */
};

/* buf (may be NULL, cap 0) is borrowed until deinit; it need not be aligned. */
void router_json_arena_init(struct router_json_arena *a, void *buf, size_t cap);
/* Frees every malloc'd block; the tree and strings built in the arena are gone. */
void router_json_arena_deinit(struct router_json_arena *a);
/* size bytes, 8-aligned, valid until deinit; NULL on out of memory. */
void *router_json_arena_alloc(struct router_json_arena *a, size_t size);

/* Length of the well-formed multi-byte UTF-8 sequence at s (n >= 1 bytes available), or 0
 * when it is not one: no overlongs, no surrogates, at most U+10FFFF (what jansson
 * accepts). An ASCII byte is not a multi-byte sequence: 0. The router's writers use it
 * too, so reading and writing agree on what valid UTF-8 is. */
size_t router_json_utf8_seq(const unsigned char *s, size_t n);

/* ---- tree --------------------------------------------------------------------------- */

enum router_json_type {
    ROUTER_JSON_NULL = 0,
    ROUTER_JSON_FALSE,
    ROUTER_JSON_TRUE,
    ROUTER_JSON_INT,    /* u.i */
    ROUTER_JSON_REAL,   /* u.d */
    ROUTER_JSON_STRING, /* u.s, n bytes */
    ROUTER_JSON_ARRAY,  /* u.items, n of them */
    ROUTER_JSON_OBJECT, /* u.members, n of them, body order, keys unique */
};

struct router_json_member;

/* One value. Every pointer in it points into the arena it was parsed into. */
struct router_json {
    enum router_json_type type;
    size_t n; /* STRING: bytes (without the NUL); ARRAY: items; OBJECT: members; else 0 */
    union {
        int64_t i;                                /* INT */
        double d;                                 /* REAL */
        const char *s;                            /* STRING: decoded UTF-8, NUL-terminated,
                                                     holds no other NUL */
        const struct router_json *items;          /* ARRAY */
        const struct router_json_member *members; /* OBJECT */
    } u;
};

struct router_json_member {
    const char *key; /* decoded UTF-8, NUL-terminated, holds no other NUL */
    size_t key_len;  /* bytes of key */
    struct router_json value;
};

/* ---- parsing ------------------------------------------------------------------------ */

/* Why a parse failed. text is a static string, e.g. "duplicate object key". */
struct router_json_error {
    const char *text;
    size_t offset; /* byte offset in the buffer of the offending byte */
    int line;      /* 1-based */
    int column;    /* 1-based, in UTF-8 characters from the start of the line */
    bool too_deep; /* the nesting passed max_depth */
};

/*
 * Parses buf[0..len) (borrowed for the call; no NUL needed) into a tree allocated from a.
 * On PW_OK *out points at the root (an object or an array) in the arena: it and every
 * string in it live until router_json_arena_deinit(a), and nothing refers back to buf.
 * PW_ERR_PARSE: not JSON by the rules above, *err says why and where. PW_ERR_NOMEM: the
 * arena or the parser's scratch stack could not grow (err->text says so). max_depth >= 1.
 * On failure the arena may hold partial allocations; deinit frees them.
 */
enum pw_err router_json_parse(const char *buf, size_t len, int max_depth,
                              struct router_json_arena *a, const struct router_json **out,
                              struct router_json_error *err);

/* ---- access (every function takes NULL and answers "absent") ------------------------ */

/* The member named key (length keylen, NUL not needed), or NULL when obj is not an object
 * or has no such member. Linear in the number of members. */
const struct router_json *router_json_getn(const struct router_json *obj, const char *key,
                                           size_t keylen);
/* Same with a NUL-terminated key (inline, so a literal key's strlen folds away). */
static inline const struct router_json *router_json_get(const struct router_json *obj,
                                                        const char *key)
{
    return router_json_getn(obj, key, strlen(key));
}

static inline bool router_json_is(const struct router_json *v, enum router_json_type t)
{
    return v != NULL && v->type == t;
}
static inline bool router_json_is_null(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_NULL);
}
static inline bool router_json_is_bool(const struct router_json *v)
{
    return v != NULL && (v->type == ROUTER_JSON_TRUE || v->type == ROUTER_JSON_FALSE);
}
static inline bool router_json_is_true(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_TRUE);
}
static inline bool router_json_is_int(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_INT);
}
static inline bool router_json_is_number(const struct router_json *v)
{
    return v != NULL && (v->type == ROUTER_JSON_INT || v->type == ROUTER_JSON_REAL);
}
static inline bool router_json_is_string(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_STRING);
}
static inline bool router_json_is_array(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_ARRAY);
}
static inline bool router_json_is_object(const struct router_json *v)
{
    return router_json_is(v, ROUTER_JSON_OBJECT);
}

/* Items of an array or members of an object; 0 for anything else. */
static inline size_t router_json_size(const struct router_json *v)
{
    return v != NULL && (v->type == ROUTER_JSON_ARRAY || v->type == ROUTER_JSON_OBJECT) ? v->n : 0;
}

/* Item i of an array, or NULL (not an array, or i out of range). */
static inline const struct router_json *router_json_at(const struct router_json *v, size_t i)
{
    return router_json_is_array(v) && i < v->n ? &v->u.items[i] : NULL;
}

/* An INT or REAL as a double (0 for anything else). */
static inline double router_json_number(const struct router_json *v)
{
    if (router_json_is_int(v))
        return (double)v->u.i;
    return router_json_is(v, ROUTER_JSON_REAL) ? v->u.d : 0.0;
}

#endif

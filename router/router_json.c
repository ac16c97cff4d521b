/*
 * router_json: strict JSON reader into an arena. See router_json.h for the grammar it
 * accepts (jansson's json_loadb with JSON_REJECT_DUPLICATES, exactly) and the ownership.
 *
 * Shape: a recursive-descent parser over [p, end). Recursion depth is bounded by
 * max_depth (checked before descending). The members of every open container sit on one
 * scratch stack (first on the parser's own stack frame, malloc'd only past that); when a
 * container closes, its members are copied into one contiguous arena array and popped, so
 * the tree has no per-node allocation and no linked lists.
 *
 * Strings take two passes: the first finds the closing quote and notes whether anything
 * but plain printable ASCII appeared; plain strings are then one memcpy, the others are
 * decoded (escapes, surrogate pairs) and checked (UTF-8) byte by byte.
 *
 * Reals: Clinger's fast path when it is exact (<= 15 significant digits, power of ten
 * within +-22), else strtod on a NUL-terminated copy of the token; both give the
 * correctly rounded double, which is what jansson (strtod) gives.
 *
 * Duplicate keys: each new key is compared with the members already read while an object
 * is small; past DUP_LINEAR_MAX members the whole object is sorted by key once it closes,
 * so a body of many keys costs O(n log n), not O(n^2). Either way a duplicate is an error.
 *
 * Reentrant; no globals but constant tables.
 */
#include "router_json.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Members of the open containers kept on the parser's frame before any malloc. */
#define STACK_INLINE 64
/* Objects up to this many members check each key as it arrives; larger ones sort. */
#define DUP_LINEAR_MAX 16
/* Number tokens up to this long are copied to the frame for strtod. */
#define NUM_INLINE 64

struct router_json_block {
    struct router_json_block *next;
    size_t cap; /* bytes after the header; keeps the data 16-aligned on 64-bit */
};

/* ------------------------------------------------------------------------------------ */
/* Arena                                                                                */

void router_json_arena_init(struct router_json_arena *a, void *buf, size_t cap)
{
    memset(a, 0, sizeof(*a));
    a->next_size = ROUTER_JSON_BLOCK_MIN;
    if (buf != NULL && cap > 0) {
        uintptr_t u = (uintptr_t)buf;
        size_t pad = (size_t)((8 - (u & 7)) & 7);
        if (cap > pad) {
            a->cur = (char *)buf + pad;
            a->left = (cap - pad) & ~(size_t)7;
        }
    }
}

void router_json_arena_deinit(struct router_json_arena *a)
{
    if (a == NULL)
        return;
    struct router_json_block *b = a->blocks;
    while (b != NULL) {
        struct router_json_block *next = b->next;
        free(b);
        b = next;
    }
    memset(a, 0, sizeof(*a));
}

static void *arena_grow(struct router_json_arena *a, size_t size)
{
    size_t cap = a->next_size;
    if (cap < size)
        cap = size; /* a big string gets a block of its own size */
    if (cap > SIZE_MAX - sizeof(struct router_json_block))
        return NULL;
    struct router_json_block *b = malloc(sizeof(*b) + cap);
    if (b == NULL)
        return NULL;
    b->next = a->blocks;
    b->cap = cap;
    a->blocks = b;
    if (a->next_size < ROUTER_JSON_BLOCK_MAX)
        a->next_size *= 2;
    a->cur = (char *)(b + 1) + size;
    a->left = cap - size;
    return b + 1;
}

void *router_json_arena_alloc(struct router_json_arena *a, size_t size)
{
    if (size > SIZE_MAX - 7)
        return NULL;
    size = (size + 7) & ~(size_t)7;
    if (size <= a->left) {
        void *p = a->cur;
        a->cur += size;
        a->left -= size;
        return p;
    }
    return arena_grow(a, size);
}

/* ------------------------------------------------------------------------------------ */
/* Parser state                                                                         */

struct parser {
    const unsigned char *p;     /* next byte to read */
    const unsigned char *end;   /* one past the last byte */
    const unsigned char *start; /* the buffer, for error positions */
    struct router_json_arena *a;
    int depth, max_depth;
    struct router_json_member *stk; /* scratch: members of the open containers */
    size_t top, cap;
    /* first failure; later ones (none, since every failure unwinds) are ignored */
    const char *etext;
    const unsigned char *epos;
    bool too_deep, nomem;
    struct router_json_member inline_stk[STACK_INLINE];
};

static bool fail(struct parser *ps, const unsigned char *at, const char *text)
{
    if (ps->etext == NULL) {
        ps->etext = text;
        ps->epos = at;
    }
    return false;
}

static bool fail_nomem(struct parser *ps)
{
    ps->nomem = true;
    return fail(ps, ps->p, "out of memory");
}

static void *palloc(struct parser *ps, size_t size)
{
    void *p = router_json_arena_alloc(ps->a, size);
    if (p == NULL)
        fail_nomem(ps);
    return p;
}

static bool push(struct parser *ps, const char *key, size_t key_len, const struct router_json *v)
{
    if (ps->top == ps->cap) {
        size_t ncap = ps->cap * 2;
        if (ncap > SIZE_MAX / sizeof(*ps->stk))
            return fail_nomem(ps);
        struct router_json_member *n;
        if (ps->stk == ps->inline_stk) {
            n = malloc(ncap * sizeof(*n));
            if (n != NULL)
                memcpy(n, ps->stk, ps->top * sizeof(*n));
        } else {
            n = realloc(ps->stk, ncap * sizeof(*n));
        }
        if (n == NULL)
            return fail_nomem(ps);
        ps->stk = n;
        ps->cap = ncap;
    }
    struct router_json_member *m = &ps->stk[ps->top++];
    m->key = key;
    m->key_len = key_len;
    m->value = *v;
    return true;
}

static inline bool is_ws(unsigned c)
{
    return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static inline void skip_ws(struct parser *ps)
{
    while (ps->p < ps->end && is_ws(*ps->p))
        ps->p++;
}

/* ------------------------------------------------------------------------------------ */
/* Strings                                                                              */

/* String bytes by class: 0 plain printable ASCII, 1 '"', 2 '\\', 3 control, 4 >= 0x80. */
static const unsigned char str_class[256] = {
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
};

size_t router_json_utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t need = (c >= 0xC2 && c < 0xE0)   ? 2
                  : (c >= 0xE0 && c < 0xF0) ? 3
                  : (c >= 0xF0 && c < 0xF5) ? 4
                                            : 0;
    if (need == 0 || need > n)
        return 0;
    uint32_t cp = c & (0x7Fu >> need);
    for (size_t k = 1; k < need; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[k] & 0x3Fu);
    }
    if ((need == 3 && cp < 0x800) || (need == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return need;
}

/* Four hex digits at s (4 bytes available) into *out; false if any is not hex. */
static bool hex4(const unsigned char *s, uint32_t *out)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return false;
    }
    *out = v;
    return true;
}

static char *utf8_put(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xC0 | (cp >> 6));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xE0 | (cp >> 12));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (char)(0xF0 | (cp >> 18));
        *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    }
    return o;
}

/* Decodes the body [r, q) of a string that has escapes or non-ASCII bytes into o (room for
 * q - r bytes: no escape decodes longer than it is written). Sets *len. */
static bool decode_string(struct parser *ps, const unsigned char *r, const unsigned char *q,
                          char *out, size_t *len)
{
    char *o = out;
    while (r < q) {
        unsigned c = *r;
        if (c < 0x80 && c != '\\') { /* phase 1 refused controls and stopped at '"' */
            *o++ = (char)c;
            r++;
            continue;
        }
        if (c >= 0x80) {
            size_t k = router_json_utf8_seq(r, (size_t)(q - r));
            if (k == 0)
                return fail(ps, r, "invalid UTF-8 in string");
            memcpy(o, r, k);
            o += k;
            r += k;
            continue;
        }
        const unsigned char *esc = r;
        c = r[1]; /* phase 1 made sure a byte follows every backslash */
        r += 2;
        switch (c) {
        case '"':
        case '\\':
        case '/':
            *o++ = (char)c;
            break;
        case 'b':
            *o++ = '\b';
            break;
        case 'f':
            *o++ = '\f';
            break;
        case 'n':
            *o++ = '\n';
            break;
        case 'r':
            *o++ = '\r';
            break;
        case 't':
            *o++ = '\t';
            break;
        case 'u': {
            uint32_t cp, lo;
            if (q - r < 4 || !hex4(r, &cp))
                return fail(ps, esc, "invalid escape");
            r += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (q - r >= 2 && r[0] == '\\' && r[1] == 'u') {
                    if (q - r < 6 || !hex4(r + 2, &lo))
                        return fail(ps, r, "invalid escape");
                    if (lo < 0xDC00 || lo > 0xDFFF)
                        return fail(ps, esc, "invalid Unicode surrogate pair");
                    r += 6;
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else {
                    return fail(ps, esc, "lone Unicode surrogate escape");
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return fail(ps, esc, "lone Unicode surrogate escape");
            } else if (cp == 0) {
                return fail(ps, esc, "\\u0000 is not allowed");
            }
            o = utf8_put(o, cp);
            break;
        }
        default:
            return fail(ps, esc, "invalid escape");
        }
    }
    *o = '\0';
    *len = (size_t)(o - out);
    return true;
}

/* ps->p at the opening quote; on success ps->p is past the closing one. */
static bool parse_string(struct parser *ps, const char **out, size_t *len)
{
    const unsigned char *s = ps->p + 1, *q = s, *end = ps->end;
    unsigned seen = 0; /* OR of the classes met: 0 means plain ASCII */
    for (;;) {
        while (q < end && str_class[*q] == 0)
            q++;
        if (q == end)
            return fail(ps, q, "premature end of input in a string");
        unsigned k = str_class[*q];
        if (k == 1)
            break;
        if (k == 3)
            return fail(ps, q, "control character in a string");
        seen |= k;
        if (k == 2) {
            if (end - q < 2)
                return fail(ps, end, "premature end of input in a string");
            q += 2; /* whatever follows is checked when decoding */
        } else {
            q++;
        }
    }
    size_t n = (size_t)(q - s);
    char *o = palloc(ps, n + 1);
    if (o == NULL)
        return false;
    if (seen == 0) {
        memcpy(o, s, n);
        o[n] = '\0';
        *len = n;
    } else if (!decode_string(ps, s, q, o, len)) {
        return false;
    }
    *out = o;
    ps->p = q + 1;
    return true;
}

/* ------------------------------------------------------------------------------------ */
/* Numbers and literals                                                                 */

static inline bool is_digit(unsigned c)
{
    return c - '0' < 10u;
}

/*
 * Clinger's fast path: a decimal of at most 15 significant digits with a power of ten in
 * [-22, 22] is m * 10^e or m / 10^-e with both operands exact doubles, so the one IEEE
 * operation rounds it correctly: the same double strtod gives, for a fraction of the
 * cost. [s, e) is a token already checked against the grammar. false = use strtod.
 */
static bool fast_real(const unsigned char *s, const unsigned char *e, double *out)
{
    static const double pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                   1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                   1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
    bool neg = *s == '-';
    s += neg;
    uint64_t m = 0;
    int nd = 0, exp10 = 0;
    for (; s < e && is_digit(*s); s++) {
        if ((m != 0 || *s != '0') && ++nd > 15)
            return false;
        m = m * 10 + (uint64_t)(*s - '0');
    }
    if (s < e && *s == '.') {
        for (s++; s < e && is_digit(*s); s++) {
            if ((m != 0 || *s != '0') && ++nd > 15)
                return false;
            m = m * 10 + (uint64_t)(*s - '0');
            exp10--;
        }
    }
    if (s < e) { /* 'e' or 'E' */
        s++;
        bool eneg = *s == '-';
        s += *s == '-' || *s == '+';
        int x = 0;
        for (; s < e; s++) {
            if (x > 1000)
                return false;
            x = x * 10 + (*s - '0');
        }
        exp10 += eneg ? -x : x;
    }
    if (exp10 < -22 || exp10 > 22)
        return false;
    double d = (double)m;
    d = exp10 < 0 ? d / pow10[-exp10] : d * pow10[exp10];
    *out = neg ? -d : d;
    return true;
}

static bool parse_number(struct parser *ps, struct router_json *v)
{
    const unsigned char *s = ps->p, *p = s, *end = ps->end;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    if (p == end || !is_digit(*p))
        return fail(ps, p, "invalid number");
    /* the magnitude limit: INT64_MAX, or its negation's (one more) */
    uint64_t lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t acc = 0;
    bool over = false;
    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p))
            return fail(ps, p, "invalid number: leading zero");
    } else {
        while (p < end && is_digit(*p)) {
            unsigned d = *p - '0';
            if (acc > (lim - d) / 10)
                over = true;
            else
                acc = acc * 10 + d;
            p++;
        }
    }
    bool real = false;
    if (p < end && *p == '.') {
        real = true;
        p++;
        if (p == end || !is_digit(*p))
            return fail(ps, p, "invalid number");
        while (p < end && is_digit(*p))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        real = true;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p == end || !is_digit(*p))
            return fail(ps, p, "invalid number");
        while (p < end && is_digit(*p))
            p++;
    }
    if (!real) {
        if (over)
            return fail(ps, s, neg ? "too big negative integer" : "too big integer");
        v->type = ROUTER_JSON_INT;
        v->n = 0;
        v->u.i = !neg ? (int64_t)acc : acc == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)acc;
        ps->p = p;
        return true;
    }
    double d;
    if (fast_real(s, p, &d)) {
        v->type = ROUTER_JSON_REAL;
        v->n = 0;
        v->u.d = d;
        ps->p = p;
        return true;
    }
    /* strtod needs a NUL after the token; the buffer has none */
    size_t n = (size_t)(p - s);
    char small[NUM_INLINE];
    char *buf = small;
    if (n >= sizeof(small)) {
        buf = palloc(ps, n + 1);
        if (buf == NULL)
            return false;
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    errno = 0;
    d = strtod(buf, NULL);
    if (errno == ERANGE && (d == HUGE_VAL || d == -HUGE_VAL))
        return fail(ps, s, "real number overflow");
    v->type = ROUTER_JSON_REAL;
    v->n = 0;
    v->u.d = d;
    ps->p = p;
    return true;
}

static bool parse_literal(struct parser *ps, const char *word, size_t n, enum router_json_type t,
                          struct router_json *v)
{
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
        return fail(ps, ps->p, "invalid token");
    ps->p += n;
    v->type = t;
    v->n = 0;
    v->u.i = 0;
    return true;
}

/* ------------------------------------------------------------------------------------ */
/* Containers                                                                           */

static bool parse_value(struct parser *ps, struct router_json *v);

/* ps->p at '[' or '{'. */
static bool enter(struct parser *ps)
{
    if (++ps->depth > ps->max_depth) {
        ps->too_deep = true;
        return fail(ps, ps->p, "nesting too deep");
    }
    ps->p++;
    skip_ws(ps);
    return true;
}

static int key_cmp(const void *x, const void *y)
{
    const struct router_json_member *a = *(const struct router_json_member *const *)x;
    const struct router_json_member *b = *(const struct router_json_member *const *)y;
    if (a->key_len != b->key_len)
        return a->key_len < b->key_len ? -1 : 1;
    return memcmp(a->key, b->key, a->key_len);
}

/* Past DUP_LINEAR_MAX members: sorts pointers to them and compares neighbours. */
static bool keys_unique(struct parser *ps, const struct router_json_member *m, size_t n,
                        const unsigned char *at)
{
    const struct router_json_member **idx = palloc(ps, n * sizeof(*idx));
    if (idx == NULL)
        return false;
    for (size_t i = 0; i < n; i++)
        idx[i] = &m[i];
    qsort(idx, n, sizeof(*idx), key_cmp);
    for (size_t i = 1; i < n; i++) {
        if (key_cmp(&idx[i - 1], &idx[i]) == 0)
            return fail(ps, at, "duplicate object key");
    }
    return true;
}

static bool parse_object(struct parser *ps, struct router_json *v)
{
    const unsigned char *open = ps->p;
    if (!enter(ps))
        return false;
    size_t base = ps->top;
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
    } else {
        for (;;) {
            if (ps->p == ps->end || *ps->p != '"')
                return fail(ps, ps->p, "string or '}' expected");
            const unsigned char *kat = ps->p;
            const char *key;
            size_t klen;
            if (!parse_string(ps, &key, &klen))
                return false;
            size_t have = ps->top - base;
            if (have < DUP_LINEAR_MAX) {
                for (size_t i = base; i < ps->top; i++) {
                    if (ps->stk[i].key_len == klen && memcmp(ps->stk[i].key, key, klen) == 0)
                        return fail(ps, kat, "duplicate object key");
                }
            }
            skip_ws(ps);
            if (ps->p == ps->end || *ps->p != ':')
                return fail(ps, ps->p, "':' expected");
            ps->p++;
            skip_ws(ps);
            struct router_json val;
            if (!parse_value(ps, &val) || !push(ps, key, klen, &val))
                return false;
            skip_ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                skip_ws(ps);
                continue;
            }
            if (ps->p < ps->end && *ps->p == '}') {
                ps->p++;
                break;
            }
            return fail(ps, ps->p, "',' or '}' expected");
        }
    }
    size_t n = ps->top - base;
    struct router_json_member *m = NULL;
    if (n > 0) {
        m = palloc(ps, n * sizeof(*m));
        if (m == NULL)
            return false;
        memcpy(m, ps->stk + base, n * sizeof(*m));
        if (n > DUP_LINEAR_MAX && !keys_unique(ps, m, n, open))
            return false;
    }
    ps->top = base;
    ps->depth--;
    v->type = ROUTER_JSON_OBJECT;
    v->n = n;
    v->u.members = m;
    return true;
}

static bool parse_array(struct parser *ps, struct router_json *v)
{
    if (!enter(ps))
        return false;
    size_t base = ps->top;
    if (ps->p < ps->end && *ps->p == ']') {
        ps->p++;
    } else {
        for (;;) {
            struct router_json val;
            if (!parse_value(ps, &val) || !push(ps, NULL, 0, &val))
                return false;
            skip_ws(ps);
            if (ps->p < ps->end && *ps->p == ',') {
                ps->p++;
                skip_ws(ps);
                continue;
            }
            if (ps->p < ps->end && *ps->p == ']') {
                ps->p++;
                break;
            }
            return fail(ps, ps->p, "',' or ']' expected");
        }
    }
    size_t n = ps->top - base;
    struct router_json *items = NULL;
    if (n > 0) {
        items = palloc(ps, n * sizeof(*items));
        if (items == NULL)
            return false;
        for (size_t i = 0; i < n; i++)
            items[i] = ps->stk[base + i].value;
    }
    ps->top = base;
    ps->depth--;
    v->type = ROUTER_JSON_ARRAY;
    v->n = n;
    v->u.items = items;
    return true;
}

/* ps->p at the first byte of a value (whitespace already skipped). */
static bool parse_value(struct parser *ps, struct router_json *v)
{
    if (ps->p == ps->end)
        return fail(ps, ps->p, "premature end of input");
    switch (*ps->p) {
    case '{':
        return parse_object(ps, v);
    case '[':
        return parse_array(ps, v);
    case '"':
        v->type = ROUTER_JSON_STRING;
        return parse_string(ps, &v->u.s, &v->n);
    case 't':
        return parse_literal(ps, "true", 4, ROUTER_JSON_TRUE, v);
    case 'f':
        return parse_literal(ps, "false", 5, ROUTER_JSON_FALSE, v);
    case 'n':
        return parse_literal(ps, "null", 4, ROUTER_JSON_NULL, v);
    default:
        if (*ps->p == '-' || is_digit(*ps->p))
            return parse_number(ps, v);
        return fail(ps, ps->p, "invalid token");
    }
}

/* ------------------------------------------------------------------------------------ */
/* Entry points                                                                         */

/* 1-based line and column (UTF-8 characters) of byte off; computed only on failure. */
static void locate(const unsigned char *s, size_t off, int *line, int *col)
{
    size_t l = 1, ls = 0, c = 1;
    for (size_t i = 0; i < off; i++) {
        if (s[i] == '\n') {
            l++;
            ls = i + 1;
        }
    }
    for (size_t i = ls; i < off; i++)
        c += (s[i] & 0xC0) != 0x80;
    *line = l > INT_MAX ? INT_MAX : (int)l;
    *col = c > INT_MAX ? INT_MAX : (int)c;
}

enum pw_err router_json_parse(const char *buf, size_t len, int max_depth,
                              struct router_json_arena *a, const struct router_json **out,
                              struct router_json_error *err)
{
    PW_ASSERT(a != NULL && out != NULL && err != NULL && max_depth >= 1);
    *out = NULL;
    memset(err, 0, sizeof(*err));
    static const unsigned char empty[1];
    struct parser ps;
    ps.start = buf != NULL ? (const unsigned char *)buf : empty;
    ps.p = ps.start;
    ps.end = ps.start + (buf != NULL ? len : 0);
    ps.a = a;
    ps.depth = 0;
    ps.max_depth = max_depth;
    ps.stk = ps.inline_stk;
    ps.top = 0;
    ps.cap = STACK_INLINE;
    ps.etext = NULL;
    ps.epos = NULL;
    ps.too_deep = false;
    ps.nomem = false;

    enum pw_err rc = PW_ERR_PARSE;
    struct router_json *root = palloc(&ps, sizeof(*root));
    if (root == NULL)
        goto out;
    skip_ws(&ps);
    if (ps.p == ps.end || (*ps.p != '{' && *ps.p != '[')) {
        fail(&ps, ps.p, "'[' or '{' expected");
        goto out;
    }
    if (!parse_value(&ps, root))
        goto out;
    skip_ws(&ps);
    if (ps.p != ps.end) {
        fail(&ps, ps.p, "end of input expected");
        goto out;
    }
    *out = root;
    rc = PW_OK;
out:
    if (rc != PW_OK) {
        if (ps.nomem)
            rc = PW_ERR_NOMEM;
        err->text = ps.etext != NULL ? ps.etext : "invalid JSON";
        err->offset = ps.epos != NULL ? (size_t)(ps.epos - ps.start) : 0;
        err->too_deep = ps.too_deep;
        locate(ps.start, err->offset, &err->line, &err->column);
    }
    if (ps.stk != ps.inline_stk)
        free(ps.stk);
    return rc;
}

const struct router_json *router_json_getn(const struct router_json *obj, const char *key,
                                           size_t keylen)
{
    if (obj == NULL || obj->type != ROUTER_JSON_OBJECT)
        return NULL;
    const struct router_json_member *m = obj->u.members;
    if (keylen == 0) {
        for (size_t i = 0; i < obj->n; i++) {
            if (m[i].key_len == 0)
                return &m[i].value;
        }
        return NULL;
    }
    /* length, then first byte, then the rest: most misses stop at the first test */
    for (size_t i = 0; i < obj->n; i++) {
        if (m[i].key_len == keylen && m[i].key[0] == key[0] &&
            memcmp(m[i].key + 1, key + 1, keylen - 1) == 0)
            return &m[i].value;
    }
    return NULL;
}

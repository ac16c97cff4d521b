/*
 * engine_gguf: GGUF v2/v3 reader over a read-only mapping (see engine_gguf.h for the layout).
 *
 * The file is untrusted. Parsing is one forward pass with a bounds-checked cursor; every
 * count is compared with the bytes left before anything is allocated from it, and every
 * size computation is overflow-checked. Nothing handed out points outside the mapping.
 * After open the object is immutable, so concurrent readers need no locks.
 */
#include "engine_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernel_quant.h"

#define GGUF_KEY_MAX 65535u         /* bytes in a key (the GGUF spec's limit) */
#define GGUF_NAME_MAX 256u          /* bytes in a tensor name */
#define GGUF_KV_MAX (1u << 20)      /* kv pairs */
#define GGUF_TENSORS_MAX (1u << 20) /* tensors */
#define GGUF_ALIGN_MAX (1u << 20)   /* general.alignment */
#define GGUF_ALIGN_DEFAULT 32u
/* Smallest encodings, used to reject counts before allocating: a kv is a key length (8),
 * a key byte, a type (4) and a one-byte value; a tensor info is a name length (8), a name
 * byte, n_dims (4), one dim (8), a type (4) and an offset (8). A string is its length. */
#define GGUF_KV_MIN_BYTES 14u
#define GGUF_TENSOR_MIN_BYTES 33u
#define GGUF_STR_MIN_BYTES 8u

struct gguf_kv {
    const char *key;    /* into the mapping, not NUL-terminated */
    size_t key_len;     /* 1..GGUF_KEY_MAX */
    uint32_t type;      /* enum engine_gguf_type */
    uint32_t elem_type; /* arrays: element type (never ARRAY) */
    uint64_t n;         /* arrays: element count; strings: byte length */
    const uint8_t *val; /* scalar bytes, string bytes, or the first array element */
    uint64_t *str_off;  /* string arrays: offset of element i's length field from val; owned */
};

struct engine_gguf {
    const uint8_t *base; /* the file's bytes */
    size_t size;         /* bytes */
    bool mapped;         /* base is our mmap (else the caller's buffer) */
    uint32_t version;
    uint64_t alignment;   /* bytes, power of two */
    uint64_t data_offset; /* file offset of the tensor data section */

    struct gguf_kv *kvs; /* (n_kv) in file order */
    size_t n_kv;
    struct gguf_kv **kv_sorted; /* (n_kv) by key bytes, for bsearch */

    struct engine_gguf_tensor *tensors; /* (n_tensors) in file order */
    size_t n_tensors;
    struct engine_gguf_tensor **tensors_named; /* (n_tensors) by name, for bsearch */
};

/* ---- errors ---------------------------------------------------------------------------- */

struct parser {
    const uint8_t *p;
    size_t size;
    size_t pos;
    char *err;
    size_t errcap;
};

__attribute__((format(printf, 3, 4))) static enum pw_err fail(struct parser *ps, enum pw_err code,
                                                              const char *fmt, ...)
{
    if (ps->err && ps->errcap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ps->err, ps->errcap, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* A name from the file made safe for a one-line message: printable ASCII, cut at 80. */
struct safe_name {
    char s[96];
};

static struct safe_name safe(const char *p, size_t len)
{
    struct safe_name out;
    size_t n = len > 80 ? 80 : len;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        out.s[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (n < len) {
        memcpy(out.s + n, "...", 4);
    } else {
        out.s[n] = '\0';
    }
    return out;
}

/* Names of every ggml type id known to the format, supported here or not. */
static const char *ggml_type_name(uint32_t t)
{
    static const char *const names[] = {
        "f32",   "f16",        "q4_0",       "q4_1",       "q4_2",     "q4_3",     "q5_0",
        "q5_1",  "q8_0",       "q8_1",       "q2_K",       "q3_K",     "q4_K",     "q5_K",
        "q6_K",  "q8_K",       "iq2_xxs",    "iq2_xs",     "iq3_xxs",  "iq1_s",    "iq4_nl",
        "iq3_s", "iq2_s",      "iq4_xs",     "i8",         "i16",      "i32",      "i64",
        "f64",   "iq1_m",      "bf16",       "q4_0_4_4",   "q4_0_4_8", "q4_0_8_8", "tq1_0",
        "tq2_0", "iq4_nl_4_4", "iq4_nl_4_8", "iq4_nl_8_8", "mxfp4",
    };
    if (t < sizeof(names) / sizeof(names[0]))
        return names[t];
    return NULL;
}

const char *engine_gguf_type_name(uint32_t type)
{
    static const char *const names[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                        "int32",  "float32", "bool",   "string", "array",
                                        "uint64", "int64",   "float64"};
    if (type < sizeof(names) / sizeof(names[0]))
        return names[type];
    return "unknown";
}

/* Bytes of one scalar of type t; 0 for string, array and unknown types. */
static size_t scalar_size(uint32_t t)
{
    switch (t) {
    case ENGINE_GGUF_UINT8:
    case ENGINE_GGUF_INT8:
    case ENGINE_GGUF_BOOL:
        return 1;
    case ENGINE_GGUF_UINT16:
    case ENGINE_GGUF_INT16:
        return 2;
    case ENGINE_GGUF_UINT32:
    case ENGINE_GGUF_INT32:
    case ENGINE_GGUF_FLOAT32:
        return 4;
    case ENGINE_GGUF_UINT64:
    case ENGINE_GGUF_INT64:
    case ENGINE_GGUF_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

/* ---- cursor ---------------------------------------------------------------------------- */

static size_t left(const struct parser *ps)
{
    return ps->size - ps->pos;
}

static bool rd_u32(struct parser *ps, uint32_t *out)
{
    if (left(ps) < 4)
        return false;
    memcpy(out, ps->p + ps->pos, 4);
    ps->pos += 4;
    return true;
}

static bool rd_u64(struct parser *ps, uint64_t *out)
{
    if (left(ps) < 8)
        return false;
    memcpy(out, ps->p + ps->pos, 8);
    ps->pos += 8;
    return true;
}

/* ---- kv pairs -------------------------------------------------------------------------- */

/* Parses the value of kv (type already read) at the cursor. */
static enum pw_err parse_value(struct parser *ps, struct gguf_kv *kv)
{
    struct safe_name nm = safe(kv->key, kv->key_len);
    size_t sz = scalar_size(kv->type);

    if (sz > 0) {
        if (left(ps) < sz)
            return fail(ps, PW_ERR_PARSE, "kv %s: value truncated", nm.s);
        kv->val = ps->p + ps->pos;
        if (kv->type == ENGINE_GGUF_BOOL && kv->val[0] > 1)
            return fail(ps, PW_ERR_PARSE, "kv %s: bool value %u is not 0 or 1", nm.s, kv->val[0]);
        ps->pos += sz;
        return PW_OK;
    }
    if (kv->type == ENGINE_GGUF_STRING) {
        if (!rd_u64(ps, &kv->n))
            return fail(ps, PW_ERR_PARSE, "kv %s: string length truncated", nm.s);
        if (kv->n > left(ps))
            return fail(ps, PW_ERR_PARSE, "kv %s: string length %llu exceeds file size", nm.s,
                        (unsigned long long)kv->n);
        kv->val = ps->p + ps->pos;
        ps->pos += (size_t)kv->n;
        return PW_OK;
    }
    if (kv->type != ENGINE_GGUF_ARRAY)
        return fail(ps, PW_ERR_PARSE, "kv %s: unknown value type %u", nm.s, kv->type);

    if (!rd_u32(ps, &kv->elem_type) || !rd_u64(ps, &kv->n))
        return fail(ps, PW_ERR_PARSE, "kv %s: array header truncated", nm.s);
    if (kv->elem_type == ENGINE_GGUF_ARRAY)
        return fail(ps, PW_ERR_UNSUPPORTED, "kv %s: nested arrays are not supported", nm.s);
    kv->val = ps->p + ps->pos;
    sz = scalar_size(kv->elem_type);
    if (sz > 0) {
        uint64_t bytes;
        if (__builtin_mul_overflow(kv->n, (uint64_t)sz, &bytes) || bytes > left(ps))
            return fail(ps, PW_ERR_PARSE, "kv %s: array length %llu exceeds file size", nm.s,
                        (unsigned long long)kv->n);
        if (kv->elem_type == ENGINE_GGUF_BOOL) {
            for (uint64_t i = 0; i < kv->n; i++) {
                if (kv->val[i] > 1)
                    return fail(ps, PW_ERR_PARSE,
                                "kv %s: element %llu: bool value %u is not 0 or 1", nm.s,
                                (unsigned long long)i, kv->val[i]);
            }
        }
        ps->pos += (size_t)bytes;
        return PW_OK;
    }
    if (kv->elem_type != ENGINE_GGUF_STRING)
        return fail(ps, PW_ERR_PARSE, "kv %s: unknown array element type %u", nm.s, kv->elem_type);

    /* String array: each element is at least its 8-byte length, which bounds the index. */
    if (kv->n > left(ps) / GGUF_STR_MIN_BYTES)
        return fail(ps, PW_ERR_PARSE, "kv %s: array length %llu exceeds file size", nm.s,
                    (unsigned long long)kv->n);
    if (kv->n > 0) {
        kv->str_off = malloc((size_t)kv->n * sizeof(*kv->str_off));
        if (!kv->str_off)
            return fail(ps, PW_ERR_NOMEM, "kv %s: out of memory for %llu strings", nm.s,
                        (unsigned long long)kv->n);
    }
    size_t start = ps->pos;
    for (uint64_t i = 0; i < kv->n; i++) {
        uint64_t len;
        kv->str_off[i] = ps->pos - start;
        if (!rd_u64(ps, &len))
            return fail(ps, PW_ERR_PARSE, "kv %s: element %llu truncated", nm.s,
                        (unsigned long long)i);
        if (len > left(ps))
            return fail(ps, PW_ERR_PARSE,
                        "kv %s: element %llu: string length %llu exceeds file size", nm.s,
                        (unsigned long long)i, (unsigned long long)len);
        ps->pos += (size_t)len;
    }
    return PW_OK;
}

static enum pw_err parse_kv(struct parser *ps, uint64_t i, struct gguf_kv *kv)
{
    uint64_t len;
    if (!rd_u64(ps, &len))
        return fail(ps, PW_ERR_PARSE, "kv #%llu: key length truncated", (unsigned long long)i);
    if (len == 0)
        return fail(ps, PW_ERR_PARSE, "kv #%llu: empty key", (unsigned long long)i);
    if (len > left(ps))
        return fail(ps, PW_ERR_PARSE, "kv #%llu: key length %llu exceeds file size",
                    (unsigned long long)i, (unsigned long long)len);
    if (len > GGUF_KEY_MAX)
        return fail(ps, PW_ERR_TOOBIG, "kv #%llu: key length %llu over %u", (unsigned long long)i,
                    (unsigned long long)len, GGUF_KEY_MAX);
    kv->key = (const char *)ps->p + ps->pos;
    kv->key_len = (size_t)len;
    ps->pos += (size_t)len;
    if (memchr(kv->key, '\0', kv->key_len))
        return fail(ps, PW_ERR_PARSE, "kv %s: key contains a NUL byte",
                    safe(kv->key, kv->key_len).s);
    if (!rd_u32(ps, &kv->type))
        return fail(ps, PW_ERR_PARSE, "kv %s: type truncated", safe(kv->key, kv->key_len).s);
    return parse_value(ps, kv);
}

static int cmp_bytes(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c != 0)
        return c;
    return alen < blen ? -1 : alen > blen;
}

static int cmp_kv_ptr(const void *a, const void *b)
{
    const struct gguf_kv *x = *(const struct gguf_kv *const *)a;
    const struct gguf_kv *y = *(const struct gguf_kv *const *)b;
    return cmp_bytes(x->key, x->key_len, y->key, y->key_len);
}

static const struct gguf_kv *find_kv(const struct engine_gguf *g, const char *key)
{
    if (!g || !key)
        return NULL;
    size_t klen = strlen(key);
    size_t lo = 0, hi = g->n_kv;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const struct gguf_kv *kv = g->kv_sorted[mid];
        int c = cmp_bytes(key, klen, kv->key, kv->key_len);
        if (c == 0)
            return kv;
        if (c < 0) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return NULL;
}

/* Integer value of type t at p, as sign and magnitude; false if t is not an integer type. */
static bool read_int(uint32_t t, const uint8_t *p, bool *neg, uint64_t *mag)
{
    int64_t s = 0;
    *neg = false;
    switch (t) {
    case ENGINE_GGUF_UINT8:
        *mag = p[0];
        return true;
    case ENGINE_GGUF_UINT16: {
        uint16_t v;
        memcpy(&v, p, 2);
        *mag = v;
        return true;
    }
    case ENGINE_GGUF_UINT32: {
        uint32_t v;
        memcpy(&v, p, 4);
        *mag = v;
        return true;
    }
    case ENGINE_GGUF_UINT64:
        memcpy(mag, p, 8);
        return true;
    case ENGINE_GGUF_INT8: {
        int8_t v;
        memcpy(&v, p, 1);
        s = v;
        break;
    }
    case ENGINE_GGUF_INT16: {
        int16_t v;
        memcpy(&v, p, 2);
        s = v;
        break;
    }
    case ENGINE_GGUF_INT32: {
        int32_t v;
        memcpy(&v, p, 4);
        s = v;
        break;
    }
    case ENGINE_GGUF_INT64:
        memcpy(&s, p, 8);
        break;
    default:
        return false;
    }
    *neg = s < 0;
    *mag = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
    return true;
}

static bool read_float(uint32_t t, const uint8_t *p, float *out)
{
    if (t == ENGINE_GGUF_FLOAT32) {
        memcpy(out, p, 4);
        return true;
    }
    if (t == ENGINE_GGUF_FLOAT64) {
        double d;
        memcpy(&d, p, 8);
        *out = (float)d;
        return true;
    }
    return false;
}

static bool int_to_i64(bool neg, uint64_t mag, int64_t *out)
{
    if (!neg) {
        if (mag > (uint64_t)INT64_MAX)
            return false;
        *out = (int64_t)mag;
        return true;
    }
    if (mag > (uint64_t)INT64_MAX + 1)
        return false;
    *out = mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
    return true;
}

/* ---- tensors --------------------------------------------------------------------------- */

static enum pw_err parse_tensor(struct parser *ps, uint64_t i, struct engine_gguf_tensor *t)
{
    uint64_t len;
    if (!rd_u64(ps, &len))
        return fail(ps, PW_ERR_PARSE, "tensor #%llu: name length truncated", (unsigned long long)i);
    if (len == 0)
        return fail(ps, PW_ERR_PARSE, "tensor #%llu: empty name", (unsigned long long)i);
    if (len > left(ps))
        return fail(ps, PW_ERR_PARSE, "tensor #%llu: name length %llu exceeds file size",
                    (unsigned long long)i, (unsigned long long)len);
    if (len > GGUF_NAME_MAX)
        return fail(ps, PW_ERR_TOOBIG, "tensor #%llu: name length %llu over %u",
                    (unsigned long long)i, (unsigned long long)len, GGUF_NAME_MAX);
    const char *raw = (const char *)ps->p + ps->pos;
    ps->pos += (size_t)len;
    if (memchr(raw, '\0', (size_t)len))
        return fail(ps, PW_ERR_PARSE, "tensor %s: name contains a NUL byte",
                    safe(raw, (size_t)len).s);
    char *name = malloc((size_t)len + 1);
    if (!name)
        return fail(ps, PW_ERR_NOMEM, "tensor #%llu: out of memory", (unsigned long long)i);
    memcpy(name, raw, (size_t)len);
    name[len] = '\0';
    t->name = name;
    struct safe_name sn = safe(raw, (size_t)len);
    const char *nm = sn.s;

    if (!rd_u32(ps, &t->n_dims))
        return fail(ps, PW_ERR_PARSE, "tensor %s: n_dims truncated", nm);
    if (t->n_dims < 1 || t->n_dims > ENGINE_GGUF_MAX_DIMS)
        return fail(ps, PW_ERR_PARSE, "tensor %s: n_dims %u not in 1..%d", nm, t->n_dims,
                    ENGINE_GGUF_MAX_DIMS);
    uint64_t n = 1;
    for (uint32_t d = 0; d < ENGINE_GGUF_MAX_DIMS; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (!rd_u64(ps, &t->ne[d]))
            return fail(ps, PW_ERR_PARSE, "tensor %s: dims truncated", nm);
        if (t->ne[d] == 0)
            return fail(ps, PW_ERR_PARSE, "tensor %s: dimension %u is 0", nm, d);
        if (__builtin_mul_overflow(n, t->ne[d], &n) || n > (uint64_t)INT64_MAX)
            return fail(ps, PW_ERR_PARSE, "tensor %s: element count overflows", nm);
    }
    t->n_elems = n;
    if (!rd_u32(ps, &t->type))
        return fail(ps, PW_ERR_PARSE, "tensor %s: type truncated", nm);
    if (!kernel_dtype_supported(t->type)) {
        const char *tn = ggml_type_name(t->type);
        if (tn)
            return fail(ps, PW_ERR_UNSUPPORTED, "tensor %s: unsupported type %s (id %u)", nm, tn,
                        t->type);
        return fail(ps, PW_ERR_UNSUPPORTED, "tensor %s: unknown type (id %u)", nm, t->type);
    }
    enum kernel_dtype dt = (enum kernel_dtype)t->type;
    size_t blk = kernel_dtype_block_elems(dt);
    if (t->ne[0] % blk != 0)
        return fail(ps, PW_ERR_PARSE,
                    "tensor %s: row length %llu is not a multiple of %s block size %zu", nm,
                    (unsigned long long)t->ne[0], kernel_dtype_name(t->type), blk);
    size_t row = kernel_dtype_row_bytes(dt, t->ne[0]);
    if (row == 0 || __builtin_mul_overflow((uint64_t)row, n / t->ne[0], &t->size))
        return fail(ps, PW_ERR_PARSE, "tensor %s: size overflows", nm);
    if (!rd_u64(ps, &t->offset))
        return fail(ps, PW_ERR_PARSE, "tensor %s: offset truncated", nm);
    return PW_OK;
}

static int cmp_tensor_name(const void *a, const void *b)
{
    const struct engine_gguf_tensor *x = *(const struct engine_gguf_tensor *const *)a;
    const struct engine_gguf_tensor *y = *(const struct engine_gguf_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int cmp_tensor_offset(const void *a, const void *b)
{
    const struct engine_gguf_tensor *x = *(const struct engine_gguf_tensor *const *)a;
    const struct engine_gguf_tensor *y = *(const struct engine_gguf_tensor *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Checks offsets, bounds, overlaps and names of all tensors; sets data pointers. */
static enum pw_err check_tensors(struct parser *ps, struct engine_gguf *g)
{
    enum pw_err err = PW_OK;
    struct engine_gguf_tensor **by_off = NULL;
    uint64_t avail = g->data_offset <= g->size ? g->size - g->data_offset : 0;

    for (size_t i = 0; i < g->n_tensors; i++) {
        struct engine_gguf_tensor *t = &g->tensors[i];
        struct safe_name sn = safe(t->name, strlen(t->name));
        const char *nm = sn.s;
        if (t->offset % g->alignment != 0)
            return fail(ps, PW_ERR_PARSE, "tensor %s: offset %llu not aligned to %llu", nm,
                        (unsigned long long)t->offset, (unsigned long long)g->alignment);
        if (t->offset > avail || t->size > avail - t->offset)
            return fail(ps, PW_ERR_PARSE, "tensor %s: data ends past end of file", nm);
        t->data = g->base + g->data_offset + t->offset;
    }
    if (g->n_tensors == 0)
        return PW_OK;

    g->tensors_named = malloc(g->n_tensors * sizeof(*g->tensors_named));
    by_off = malloc(g->n_tensors * sizeof(*by_off));
    if (!g->tensors_named || !by_off) {
        err = fail(ps, PW_ERR_NOMEM, "tensors: out of memory");
        goto out;
    }
    for (size_t i = 0; i < g->n_tensors; i++) {
        g->tensors_named[i] = &g->tensors[i];
        by_off[i] = &g->tensors[i];
    }
    qsort(g->tensors_named, g->n_tensors, sizeof(*g->tensors_named), cmp_tensor_name);
    for (size_t i = 1; i < g->n_tensors; i++) {
        if (strcmp(g->tensors_named[i - 1]->name, g->tensors_named[i]->name) == 0) {
            const char *n = g->tensors_named[i]->name;
            err = fail(ps, PW_ERR_PARSE, "tensor %s: duplicate name", safe(n, strlen(n)).s);
            goto out;
        }
    }
    qsort(by_off, g->n_tensors, sizeof(*by_off), cmp_tensor_offset);
    for (size_t i = 1; i < g->n_tensors; i++) {
        const struct engine_gguf_tensor *a = by_off[i - 1], *b = by_off[i];
        /* a->offset + a->size cannot overflow: both are within avail. */
        if (a->offset + a->size > b->offset) {
            struct safe_name na = safe(a->name, strlen(a->name));
            err = fail(ps, PW_ERR_PARSE, "tensor %s: data overlaps tensor %s",
                       safe(b->name, strlen(b->name)).s, na.s);
            goto out;
        }
    }
out:
    free(by_off);
    return err;
}

/* ---- open ------------------------------------------------------------------------------ */

static enum pw_err parse_alignment(struct parser *ps, struct engine_gguf *g)
{
    g->alignment = GGUF_ALIGN_DEFAULT;
    const struct gguf_kv *kv = find_kv(g, "general.alignment");
    if (!kv)
        return PW_OK;
    bool neg;
    uint64_t v;
    if (!read_int(kv->type, kv->val, &neg, &v))
        return fail(ps, PW_ERR_PARSE, "kv general.alignment: type %s, expected uint32",
                    engine_gguf_type_name(kv->type));
    if (neg || v == 0 || (v & (v - 1)) != 0)
        return fail(ps, PW_ERR_PARSE, "kv general.alignment: %s%llu is not a power of two",
                    neg ? "-" : "", (unsigned long long)v);
    if (v > GGUF_ALIGN_MAX)
        return fail(ps, PW_ERR_TOOBIG, "kv general.alignment: %llu over %u", (unsigned long long)v,
                    GGUF_ALIGN_MAX);
    g->alignment = v;
    return PW_OK;
}

static enum pw_err parse_all(struct parser *ps, struct engine_gguf *g)
{
    enum pw_err err;
    uint64_t n_tensors, n_kv;

    if (ps->size < 4)
        return fail(ps, PW_ERR_PARSE, "header: truncated (%zu bytes)", ps->size);
    if (memcmp(ps->p, "GGUF", 4) != 0)
        return fail(ps, PW_ERR_PARSE, "header: bad magic");
    ps->pos = 4;
    if (!rd_u32(ps, &g->version))
        return fail(ps, PW_ERR_PARSE, "header: truncated (%zu bytes)", ps->size);
    if (g->version != 2 && g->version != 3) {
        uint32_t v = g->version;
        uint32_t swapped = __builtin_bswap32(v);
        if (swapped == 2 || swapped == 3)
            return fail(ps, PW_ERR_UNSUPPORTED, "header: big-endian GGUF is not supported");
        return fail(ps, PW_ERR_UNSUPPORTED, "header: version %u is not supported (need 3)", v);
    }
    if (!rd_u64(ps, &n_tensors) || !rd_u64(ps, &n_kv))
        return fail(ps, PW_ERR_PARSE, "header: truncated (%zu bytes)", ps->size);
    if (n_kv > left(ps) / GGUF_KV_MIN_BYTES)
        return fail(ps, PW_ERR_PARSE, "header: n_kv %llu exceeds file size",
                    (unsigned long long)n_kv);
    if (n_tensors > left(ps) / GGUF_TENSOR_MIN_BYTES)
        return fail(ps, PW_ERR_PARSE, "header: n_tensors %llu exceeds file size",
                    (unsigned long long)n_tensors);
    if (n_kv > GGUF_KV_MAX)
        return fail(ps, PW_ERR_TOOBIG, "header: n_kv %llu over %u", (unsigned long long)n_kv,
                    GGUF_KV_MAX);
    if (n_tensors > GGUF_TENSORS_MAX)
        return fail(ps, PW_ERR_TOOBIG, "header: n_tensors %llu over %u",
                    (unsigned long long)n_tensors, GGUF_TENSORS_MAX);

    if (n_kv > 0) {
        g->kvs = calloc((size_t)n_kv, sizeof(*g->kvs));
        g->kv_sorted = malloc((size_t)n_kv * sizeof(*g->kv_sorted));
        if (!g->kvs || !g->kv_sorted)
            return fail(ps, PW_ERR_NOMEM, "kv: out of memory for %llu pairs",
                        (unsigned long long)n_kv);
    }
    for (uint64_t i = 0; i < n_kv; i++) {
        g->n_kv = (size_t)i + 1; /* so destroy frees a partly parsed pair */
        err = parse_kv(ps, i, &g->kvs[i]);
        if (err)
            return err;
        g->kv_sorted[i] = &g->kvs[i];
    }
    if (g->n_kv > 0)
        qsort(g->kv_sorted, g->n_kv, sizeof(*g->kv_sorted), cmp_kv_ptr);
    for (size_t i = 1; i < g->n_kv; i++) {
        if (cmp_kv_ptr(&g->kv_sorted[i - 1], &g->kv_sorted[i]) == 0)
            return fail(ps, PW_ERR_PARSE, "kv %s: duplicate key",
                        safe(g->kv_sorted[i]->key, g->kv_sorted[i]->key_len).s);
    }
    err = parse_alignment(ps, g);
    if (err)
        return err;

    if (n_tensors > left(ps) / GGUF_TENSOR_MIN_BYTES)
        return fail(ps, PW_ERR_PARSE, "header: n_tensors %llu exceeds file size",
                    (unsigned long long)n_tensors);
    if (n_tensors > 0) {
        g->tensors = calloc((size_t)n_tensors, sizeof(*g->tensors));
        if (!g->tensors)
            return fail(ps, PW_ERR_NOMEM, "tensors: out of memory for %llu",
                        (unsigned long long)n_tensors);
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        g->n_tensors = (size_t)i + 1;
        err = parse_tensor(ps, i, &g->tensors[i]);
        if (err)
            return err;
    }
    /* pos <= size < 2^63 and alignment <= 2^20, so this cannot overflow. */
    g->data_offset = ((uint64_t)ps->pos + g->alignment - 1) & ~(g->alignment - 1);
    return check_tensors(ps, g);
}

void engine_gguf_destroy(struct engine_gguf *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_kv; i++)
        free(g->kvs[i].str_off);
    free(g->kvs);
    free(g->kv_sorted);
    for (size_t i = 0; i < g->n_tensors; i++)
        free((char *)g->tensors[i].name);
    free(g->tensors);
    free(g->tensors_named);
    if (g->mapped)
        munmap((void *)g->base, g->size);
    free(g);
}

/* Parses base[0..size); on failure destroys g (and its mapping if mapped). */
static enum pw_err open_common(struct engine_gguf *g, struct engine_gguf **out, char *errbuf,
                               size_t errcap)
{
    struct parser ps = {.p = g->base, .size = g->size, .err = errbuf, .errcap = errcap};
    enum pw_err err = parse_all(&ps, g);
    if (err) {
        engine_gguf_destroy(g);
        return err;
    }
    *out = g;
    return PW_OK;
}

enum pw_err engine_gguf_open_memory(const void *data, size_t len, struct engine_gguf **out,
                                    char *errbuf, size_t errcap)
{
    PW_ASSERT(out && (data || len == 0));
    *out = NULL;
    if (errbuf && errcap)
        errbuf[0] = '\0';
    struct engine_gguf *g = calloc(1, sizeof(*g));
    if (!g) {
        if (errbuf && errcap)
            snprintf(errbuf, errcap, "out of memory");
        return PW_ERR_NOMEM;
    }
    g->base = data;
    g->size = len;
    return open_common(g, out, errbuf, errcap);
}

enum pw_err engine_gguf_open(const char *path, struct engine_gguf **out, char *errbuf,
                             size_t errcap)
{
    PW_ASSERT(path && out);
    *out = NULL;
    if (errbuf && errcap)
        errbuf[0] = '\0';
    struct parser ps = {.err = errbuf, .errcap = errcap};
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(&ps, PW_ERR_IO, "open %s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0) {
        enum pw_err e = fail(&ps, PW_ERR_IO, "stat %s: %s", path, strerror(errno));
        close(fd);
        return e;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail(&ps, PW_ERR_IO, "open %s: not a regular file", path);
    }
    if (st.st_size == 0) { /* mmap refuses empty files */
        close(fd);
        return fail(&ps, PW_ERR_PARSE, "header: truncated (0 bytes)");
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED)
        return fail(&ps, PW_ERR_IO, "mmap %s: %s", path, strerror(map_errno));
    struct engine_gguf *g = calloc(1, sizeof(*g));
    if (!g) {
        munmap(map, (size_t)st.st_size);
        return fail(&ps, PW_ERR_NOMEM, "out of memory");
    }
    g->base = map;
    g->size = (size_t)st.st_size;
    g->mapped = true;
    return open_common(g, out, errbuf, errcap);
}

/* ---- accessors ------------------------------------------------------------------------- */

uint32_t engine_gguf_version(const struct engine_gguf *g)
{
    return g->version;
}

size_t engine_gguf_file_size(const struct engine_gguf *g)
{
    return g->size;
}

uint64_t engine_gguf_alignment(const struct engine_gguf *g)
{
    return g->alignment;
}

uint64_t engine_gguf_data_offset(const struct engine_gguf *g)
{
    return g->data_offset;
}

size_t engine_gguf_n_kv(const struct engine_gguf *g)
{
    return g->n_kv;
}

bool engine_gguf_kv_at(const struct engine_gguf *g, size_t i, struct engine_gguf_str *key,
                       enum engine_gguf_type *type)
{
    if (i >= g->n_kv)
        return false;
    if (key) {
        key->ptr = g->kvs[i].key;
        key->len = g->kvs[i].key_len;
    }
    if (type)
        *type = (enum engine_gguf_type)g->kvs[i].type;
    return true;
}

bool engine_gguf_kv_type(const struct engine_gguf *g, const char *key, enum engine_gguf_type *type)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv)
        return false;
    if (type)
        *type = (enum engine_gguf_type)kv->type;
    return true;
}

bool engine_gguf_has(const struct engine_gguf *g, const char *key)
{
    return find_kv(g, key) != NULL;
}

bool engine_gguf_get_u64(const struct engine_gguf *g, const char *key, uint64_t *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t v;
    if (!kv || !read_int(kv->type, kv->val, &neg, &v) || neg)
        return false;
    *out = v;
    return true;
}

bool engine_gguf_get_u32(const struct engine_gguf *g, const char *key, uint32_t *out)
{
    uint64_t v;
    if (!engine_gguf_get_u64(g, key, &v) || v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

bool engine_gguf_get_i64(const struct engine_gguf *g, const char *key, int64_t *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t v;
    if (!kv || !read_int(kv->type, kv->val, &neg, &v))
        return false;
    return int_to_i64(neg, v, out);
}

bool engine_gguf_get_f32(const struct engine_gguf *g, const char *key, float *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    return kv && read_float(kv->type, kv->val, out);
}

bool engine_gguf_get_bool(const struct engine_gguf *g, const char *key, bool *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_BOOL)
        return false;
    *out = kv->val[0] != 0;
    return true;
}

bool engine_gguf_get_str(const struct engine_gguf *g, const char *key, struct engine_gguf_str *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_STRING)
        return false;
    out->ptr = (const char *)kv->val;
    out->len = kv->n;
    return true;
}

bool engine_gguf_get_arr(const struct engine_gguf *g, const char *key,
                         enum engine_gguf_type *elem_type, uint64_t *len)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_ARRAY)
        return false;
    if (elem_type)
        *elem_type = (enum engine_gguf_type)kv->elem_type;
    if (len)
        *len = kv->n;
    return true;
}

bool engine_gguf_arr_str(const struct engine_gguf *g, const char *key, uint64_t i,
                         struct engine_gguf_str *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_ARRAY || kv->elem_type != ENGINE_GGUF_STRING || i >= kv->n)
        return false;
    const uint8_t *p = kv->val + kv->str_off[i];
    memcpy(&out->len, p, 8);
    out->ptr = (const char *)p + 8;
    return true;
}

bool engine_gguf_arr_f32(const struct engine_gguf *g, const char *key, uint64_t i, float *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_ARRAY || i >= kv->n)
        return false;
    return read_float(kv->elem_type, kv->val + i * scalar_size(kv->elem_type), out);
}

bool engine_gguf_arr_i64(const struct engine_gguf *g, const char *key, uint64_t i, int64_t *out)
{
    const struct gguf_kv *kv = find_kv(g, key);
    bool neg;
    uint64_t v;
    if (!kv || kv->type != ENGINE_GGUF_ARRAY || i >= kv->n)
        return false;
    if (!read_int(kv->elem_type, kv->val + i * scalar_size(kv->elem_type), &neg, &v))
        return false;
    return int_to_i64(neg, v, out);
}

bool engine_gguf_arr_data(const struct engine_gguf *g, const char *key, const void **data)
{
    const struct gguf_kv *kv = find_kv(g, key);
    if (!kv || kv->type != ENGINE_GGUF_ARRAY || scalar_size(kv->elem_type) == 0)
        return false;
    *data = kv->val;
    return true;
}

size_t engine_gguf_n_tensors(const struct engine_gguf *g)
{
    return g->n_tensors;
}

const struct engine_gguf_tensor *engine_gguf_tensor_at(const struct engine_gguf *g, size_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const struct engine_gguf_tensor *engine_gguf_find_tensor(const struct engine_gguf *g,
                                                         const char *name)
{
    if (!g || !name || g->n_tensors == 0)
        return NULL;
    size_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, g->tensors_named[mid]->name);
        if (c == 0)
            return g->tensors_named[mid];
        if (c < 0) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return NULL;
}

void engine_gguf_drop_tensor_pages(const struct engine_gguf *g, const struct engine_gguf_tensor *t)
{
    if (!g->mapped || !t || t->size == 0)
        return;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0)
        return;
    uintptr_t start = (uintptr_t)t->data, end = start + t->size;
    uintptr_t a = (start + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t b = end & ~((uintptr_t)page - 1);
    if (b > a)
        madvise((void *)a, b - a, MADV_DONTNEED);
}

/*
 * gguf_writer: GGUF v3 stream writer (see gguf_writer.h). Little-endian host assumed, as
 * everywhere in parkway.
 */
#include "gguf_writer.h"

#include <stdlib.h>
#include <string.h>

#include "kernel_quant.h"

enum {
    GW_UINT32 = 4,
    GW_INT32 = 5,
    GW_FLOAT32 = 6,
    GW_BOOL = 7,
    GW_STRING = 8,
    GW_ARRAY = 9,
    GW_UINT64 = 10,
};

struct gw_tensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset; /* from the data section start */
    uint64_t size;   /* bytes */
};

struct gguf_writer {
    uint32_t alignment;
    uint8_t *kv; /* encoded kv pairs */
    size_t kv_len, kv_cap;
    uint64_t n_kv;
    struct gw_tensor *tensors;
    size_t n_tensors, cap_tensors;
    uint64_t data_size; /* bytes of the data section so far (padded) */
    size_t cur;         /* tensor being streamed */
    uint64_t cur_written;
    enum pw_err err;
    char errstr[160];
};

static void set_err(struct gguf_writer *w, enum pw_err err, const char *msg, const char *what)
{
    if (w->err)
        return;
    w->err = err;
    snprintf(w->errstr, sizeof(w->errstr), "%s%s%s", msg, what ? ": " : "", what ? what : "");
}

static void put(struct gguf_writer *w, const void *p, size_t n)
{
    if (w->err)
        return;
    if (w->kv_cap - w->kv_len < n) {
        size_t cap = w->kv_cap ? w->kv_cap : 4096;
        while (cap - w->kv_len < n)
            cap *= 2;
        uint8_t *nb = realloc(w->kv, cap);
        if (!nb) {
            set_err(w, PW_ERR_NOMEM, "out of memory", NULL);
            return;
        }
        w->kv = nb;
        w->kv_cap = cap;
    }
    memcpy(w->kv + w->kv_len, p, n);
    w->kv_len += n;
}

static void put_u32(struct gguf_writer *w, uint32_t v)
{
    put(w, &v, 4);
}

static void put_u64(struct gguf_writer *w, uint64_t v)
{
    put(w, &v, 8);
}

static void put_str(struct gguf_writer *w, const char *s)
{
    size_t n = strlen(s);
    put_u64(w, n);
    put(w, s, n);
}

static void begin_kv(struct gguf_writer *w, const char *key, uint32_t type)
{
    put_str(w, key);
    put_u32(w, type);
    w->n_kv++;
}

struct gguf_writer *gguf_writer_create(uint32_t alignment)
{
    struct gguf_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->alignment = alignment;
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        set_err(w, PW_ERR_INVAL, "alignment is not a power of two", NULL);
    gguf_writer_kv_u32(w, "general.alignment", alignment);
    return w;
}

void gguf_writer_destroy(struct gguf_writer *w)
{
    if (!w)
        return;
    for (size_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->tensors);
    free(w->kv);
    free(w);
}

void gguf_writer_kv_u32(struct gguf_writer *w, const char *key, uint32_t v)
{
    begin_kv(w, key, GW_UINT32);
    put_u32(w, v);
}

void gguf_writer_kv_i32(struct gguf_writer *w, const char *key, int32_t v)
{
    begin_kv(w, key, GW_INT32);
    put(w, &v, 4);
}

void gguf_writer_kv_u64(struct gguf_writer *w, const char *key, uint64_t v)
{
    begin_kv(w, key, GW_UINT64);
    put_u64(w, v);
}

void gguf_writer_kv_f32(struct gguf_writer *w, const char *key, float v)
{
    begin_kv(w, key, GW_FLOAT32);
    put(w, &v, 4);
}

void gguf_writer_kv_bool(struct gguf_writer *w, const char *key, bool v)
{
    uint8_t b = v ? 1 : 0;
    begin_kv(w, key, GW_BOOL);
    put(w, &b, 1);
}

void gguf_writer_kv_str(struct gguf_writer *w, const char *key, const char *v)
{
    begin_kv(w, key, GW_STRING);
    put_str(w, v);
}

void gguf_writer_kv_arr_str(struct gguf_writer *w, const char *key, const char *const *v, size_t n)
{
    begin_kv(w, key, GW_ARRAY);
    put_u32(w, GW_STRING);
    put_u64(w, n);
    for (size_t i = 0; i < n; i++)
        put_str(w, v[i]);
}

void gguf_writer_kv_arr_i32(struct gguf_writer *w, const char *key, const int32_t *v, size_t n)
{
    begin_kv(w, key, GW_ARRAY);
    put_u32(w, GW_INT32);
    put_u64(w, n);
    put(w, v, n * 4);
}

void gguf_writer_kv_arr_f32(struct gguf_writer *w, const char *key, const float *v, size_t n)
{
    begin_kv(w, key, GW_ARRAY);
    put_u32(w, GW_FLOAT32);
    put_u64(w, n);
    put(w, v, n * 4);
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

uint64_t gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t n_dims,
                                const uint64_t *ne, uint32_t type)
{
    if (w->err)
        return 0;
    if (n_dims < 1 || n_dims > 4 || !kernel_dtype_supported(type)) {
        set_err(w, PW_ERR_INVAL, "bad tensor dims or type", name);
        return 0;
    }
    uint64_t rows = 1;
    for (uint32_t d = 1; d < n_dims; d++)
        rows *= ne[d];
    size_t row = kernel_dtype_row_bytes((enum kernel_dtype)type, ne[0]);
    if (row == 0) {
        set_err(w, PW_ERR_INVAL, "row length is not a multiple of the block size", name);
        return 0;
    }
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 64;
        struct gw_tensor *nt = realloc(w->tensors, cap * sizeof(*nt));
        if (!nt) {
            set_err(w, PW_ERR_NOMEM, "out of memory", NULL);
            return 0;
        }
        w->tensors = nt;
        w->cap_tensors = cap;
    }
    struct gw_tensor *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    if (!t->name) {
        set_err(w, PW_ERR_NOMEM, "out of memory", NULL);
        return 0;
    }
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < n_dims; d++)
        t->ne[d] = ne[d];
    t->type = type;
    t->size = (uint64_t)row * rows;
    t->offset = w->data_size;
    w->data_size = align_up(t->offset + t->size, w->alignment);
    w->n_tensors++;
    return t->size;
}

static enum pw_err put_file(struct gguf_writer *w, FILE *f, const void *p, size_t n)
{
    if (n > 0 && fwrite(p, 1, n, f) != n) {
        set_err(w, PW_ERR_IO, "write failed", NULL);
        return PW_ERR_IO;
    }
    return PW_OK;
}

static enum pw_err pad(struct gguf_writer *w, FILE *f, uint64_t pos)
{
    static const uint8_t zeros[64];
    uint64_t n = align_up(pos, w->alignment) - pos;
    while (n > 0) {
        size_t k = n > sizeof(zeros) ? sizeof(zeros) : (size_t)n;
        if (put_file(w, f, zeros, k))
            return PW_ERR_IO;
        n -= k;
    }
    return PW_OK;
}

enum pw_err gguf_writer_write_header(struct gguf_writer *w, FILE *f)
{
    if (w->err)
        return w->err;
    uint32_t version = 3;
    uint64_t n_tensors = w->n_tensors;
    uint64_t pos = 0;
    if (put_file(w, f, "GGUF", 4) || put_file(w, f, &version, 4) || put_file(w, f, &n_tensors, 8) ||
        put_file(w, f, &w->n_kv, 8) || put_file(w, f, w->kv, w->kv_len))
        return PW_ERR_IO;
    pos = 24 + w->kv_len;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const struct gw_tensor *t = &w->tensors[i];
        uint64_t len = strlen(t->name);
        if (put_file(w, f, &len, 8) || put_file(w, f, t->name, len) ||
            put_file(w, f, &t->n_dims, 4) || put_file(w, f, t->ne, 8 * (size_t)t->n_dims) ||
            put_file(w, f, &t->type, 4) || put_file(w, f, &t->offset, 8))
            return PW_ERR_IO;
        pos += 8 + len + 4 + 8 * (uint64_t)t->n_dims + 4 + 8;
    }
    w->cur = 0;
    w->cur_written = 0;
    return pad(w, f, pos);
}

enum pw_err gguf_writer_write(struct gguf_writer *w, FILE *f, const void *p, size_t n)
{
    if (w->err)
        return w->err;
    if (w->cur >= w->n_tensors || n > w->tensors[w->cur].size - w->cur_written) {
        set_err(w, PW_ERR_RANGE, "more bytes than the tensor holds", NULL);
        return PW_ERR_RANGE;
    }
    w->cur_written += n;
    return put_file(w, f, p, n);
}

enum pw_err gguf_writer_end_tensor(struct gguf_writer *w, FILE *f)
{
    if (w->err)
        return w->err;
    if (w->cur >= w->n_tensors || w->cur_written != w->tensors[w->cur].size) {
        set_err(w, PW_ERR_RANGE, "tensor data is short",
                w->cur < w->n_tensors ? w->tensors[w->cur].name : NULL);
        return PW_ERR_RANGE;
    }
    enum pw_err err = pad(w, f, w->tensors[w->cur].size);
    w->cur++;
    w->cur_written = 0;
    return err;
}

const char *gguf_writer_error(const struct gguf_writer *w)
{
    return w->errstr;
}

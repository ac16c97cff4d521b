/*
 * Unit tests for engine_gguf: generated models of every type open with the right metadata
 * and tensor views; the real default model matches what the gguf Python package reports;
 * crafted corrupt files fail with the right class and message; random damage never crashes.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine_gguf.h"
#include "kernel_quant.h"

/*
 * The GGUF writer and model synthesis of tools/gguf-gen, compiled in: tests link only the
 * project libraries (tests/CMakeLists.txt). Once parkway_gguf_writer is in that list these
 * become #include "gguf_gen.h".
 */
#include "gguf_writer.h"
#include "gguf_gen.h"

/* ---- helpers --------------------------------------------------------------------------- */

/* A generated model in an exactly sized heap buffer (so ASan sees any overread). */
static uint8_t *gen_model(uint32_t type, bool tied, uint64_t seed, size_t *len)
{
    struct gguf_gen_opts o;
    char err[256] = "";
    char *buf = NULL;
    size_t n = 0;
    assert_int_equal(gguf_gen_preset("tiny", &o), PW_OK);
    o.type = type;
    o.tied = tied;
    o.seed = seed;
    FILE *f = open_memstream(&buf, &n);
    assert_non_null(f);
    enum pw_err e = gguf_gen_write(&o, f, err, sizeof(err));
    fclose(f);
    if (e)
        fail_msg("gguf_gen_write: %s", err);
    uint8_t *out = malloc(n);
    assert_non_null(out);
    memcpy(out, buf, n);
    free(buf);
    *len = n;
    return out;
}

static enum pw_err open_buf(const uint8_t *p, size_t n, struct engine_gguf **g, char *err,
                            size_t cap)
{
    return engine_gguf_open_memory(p, n, g, err, cap);
}

static bool str_eq(struct engine_gguf_str s, const char *want)
{
    return s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0;
}

/* Reads every value and every tensor byte range the API hands out (fuzz-style walk). */
static void walk(const struct engine_gguf *g)
{
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < engine_gguf_n_kv(g); i++) {
        struct engine_gguf_str key, s;
        enum engine_gguf_type type, et;
        uint64_t n, u;
        int64_t v;
        float fv;
        bool b;
        assert_true(engine_gguf_kv_at(g, i, &key, &type));
        char k[300];
        if (key.len >= sizeof(k))
            continue;
        memcpy(k, key.ptr, key.len);
        k[key.len] = '\0';
        if (strlen(k) != key.len)
            continue;
        (void)engine_gguf_get_u64(g, k, &u);
        (void)engine_gguf_get_i64(g, k, &v);
        (void)engine_gguf_get_f32(g, k, &fv);
        (void)engine_gguf_get_bool(g, k, &b);
        if (engine_gguf_get_str(g, k, &s) && s.len > 0)
            sink ^= (uint8_t)(s.ptr[0] ^ s.ptr[s.len - 1]);
        if (engine_gguf_get_arr(g, k, &et, &n) && n > 0) {
            uint64_t idx[] = {0, n / 2, n - 1};
            for (int j = 0; j < 3; j++) {
                if (engine_gguf_arr_str(g, k, idx[j], &s) && s.len > 0)
                    sink ^= (uint8_t)(s.ptr[0] ^ s.ptr[s.len - 1]);
                (void)engine_gguf_arr_i64(g, k, idx[j], &v);
                (void)engine_gguf_arr_f32(g, k, idx[j], &fv);
            }
            assert_false(engine_gguf_arr_str(g, k, n, &s));
        }
    }
    for (size_t i = 0; i < engine_gguf_n_tensors(g); i++) {
        const struct engine_gguf_tensor *t = engine_gguf_tensor_at(g, i);
        const uint8_t *d = t->data;
        sink ^= (uint8_t)(d[0] ^ d[t->size - 1]);
        assert_ptr_equal(engine_gguf_find_tensor(g, t->name), t);
    }
    (void)sink;
}

/* ---- generated models ------------------------------------------------------------------ */

static void check_tiny(const struct engine_gguf *g, uint32_t type, bool tied)
{
    uint32_t u;
    float f;
    bool b;
    uint64_t n;
    int64_t iv;
    enum engine_gguf_type et;
    struct engine_gguf_str s;

    assert_int_equal(engine_gguf_version(g), 3);
    assert_int_equal(engine_gguf_alignment(g), 32);
    assert_true(engine_gguf_get_str(g, "general.architecture", &s));
    assert_true(str_eq(s, "llama"));
    assert_true(engine_gguf_get_u32(g, "llama.block_count", &u));
    assert_int_equal(u, 2);
    assert_true(engine_gguf_get_u32(g, "llama.embedding_length", &u));
    assert_int_equal(u, 64);
    assert_true(engine_gguf_get_u32(g, "llama.feed_forward_length", &u));
    assert_int_equal(u, 128);
    assert_true(engine_gguf_get_u32(g, "llama.attention.head_count", &u));
    assert_int_equal(u, 4);
    assert_true(engine_gguf_get_u32(g, "llama.attention.head_count_kv", &u));
    assert_int_equal(u, 2);
    assert_true(engine_gguf_get_u32(g, "llama.rope.dimension_count", &u));
    assert_int_equal(u, 16);
    assert_true(engine_gguf_get_f32(g, "llama.rope.freq_base", &f));
    assert_true(f == 10000.0f);
    assert_true(engine_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f));
    assert_true(f == 1e-5f);
    assert_false(engine_gguf_get_u32(g, "llama.rope.freq_base", &u)); /* type mismatch */
    assert_false(engine_gguf_get_f32(g, "no.such.key", &f));
    assert_true(engine_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b));
    assert_false(b);
    assert_true(engine_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &u));
    assert_int_equal(u, 2);
    uint64_t seed;
    assert_true(engine_gguf_get_u64(g, "parkway.gen.seed", &seed));

    assert_true(engine_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n));
    assert_int_equal(et, ENGINE_GGUF_STRING);
    assert_int_equal(n, 384);
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 1, &s));
    assert_true(str_eq(s, "<|im_start|>"));
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 3 + 'a', &s));
    assert_true(str_eq(s, "a"));
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 3 + ' ', &s));
    assert_true(str_eq(s, "\xc4\xa0")); /* GPT-2 byte-to-unicode: ' ' is U+0120 */
    assert_true(engine_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n));
    assert_int_equal(n, 384 - 259);
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.merges", 0, &s));
    assert_true(memchr(s.ptr, ' ', s.len) != NULL);
    assert_true(engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", 0, &iv));
    assert_int_equal(iv, 3);
    assert_true(engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", 383, &iv));
    assert_int_equal(iv, 1);
    assert_false(engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", 384, &iv));
    const void *raw;
    assert_true(engine_gguf_arr_data(g, "tokenizer.ggml.token_type", &raw));
    assert_false(engine_gguf_arr_data(g, "tokenizer.ggml.tokens", &raw));
    assert_true(engine_gguf_get_str(g, "tokenizer.chat_template", &s));
    assert_true(s.len > 20);

    assert_int_equal(engine_gguf_n_tensors(g), tied ? 20 : 21);
    const struct engine_gguf_tensor *t = engine_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 384);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->type, type);
    assert_int_equal(t->n_elems, 64 * 384);
    assert_int_equal(t->size, kernel_dtype_row_bytes((enum kernel_dtype)type, 64) * 384);
    assert_int_equal(t->offset % 32, 0);
    assert_null(engine_gguf_find_tensor(g, "token_embd"));
    assert_true((engine_gguf_find_tensor(g, "output.weight") == NULL) == tied);

    t = engine_gguf_find_tensor(g, "blk.1.attn_k.weight");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 32); /* kv_dim = 64 / 4 * 2 */
    t = engine_gguf_find_tensor(g, "blk.0.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 128);
    assert_int_equal(t->ne[1], 64);

    /* Norms are ones in f32; weights look like N(0, 0.02) after dequantization. */
    t = engine_gguf_find_tensor(g, "blk.1.ffn_norm.weight");
    assert_non_null(t);
    assert_int_equal(t->type, KERNEL_DTYPE_F32);
    float one;
    memcpy(&one, t->data, 4);
    assert_true(one == 1.0f);
    t = engine_gguf_find_tensor(g, "blk.0.ffn_up.weight");
    float row[64];
    double sum = 0, sq = 0;
    size_t rb = kernel_dtype_row_bytes((enum kernel_dtype)type, 64);
    for (uint64_t r = 0; r < t->ne[1]; r++) {
        kernel_dequantize_row((enum kernel_dtype)type, (const uint8_t *)t->data + r * rb, row, 64);
        for (int i = 0; i < 64; i++) {
            sum += row[i];
            sq += (double)row[i] * row[i];
        }
    }
    double cnt = (double)t->n_elems, mean = sum / cnt, sd = sqrt(sq / cnt - mean * mean);
    assert_true(fabs(mean) < 0.003);
    assert_true(sd > 0.015 && sd < 0.025);
    walk(g);
}

static void test_generated_each_type(void **state)
{
    (void)state;
    static const uint32_t types[] = {KERNEL_DTYPE_F32,  KERNEL_DTYPE_F16,  KERNEL_DTYPE_BF16,
                                     KERNEL_DTYPE_Q8_0, KERNEL_DTYPE_Q4_0, KERNEL_DTYPE_Q4_1};
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        for (int tied = 0; tied < 2; tied++) {
            size_t n;
            uint8_t *buf = gen_model(types[i], tied, 42, &n);
            struct engine_gguf *g = NULL;
            char err[256];
            enum pw_err e = open_buf(buf, n, &g, err, sizeof(err));
            if (e)
                fail_msg("type %u: %s", types[i], err);
            check_tiny(g, types[i], tied);
            engine_gguf_destroy(g);
            free(buf);
        }
    }
}

static void test_generated_file_mmap(void **state)
{
    (void)state;
    size_t n;
    uint8_t *buf = gen_model(KERNEL_DTYPE_Q4_1, false, 1, &n);
    char path[] = "/tmp/pw_test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, buf, n), (ssize_t)n);
    close(fd);

    struct engine_gguf *g = NULL;
    char err[256];
    assert_int_equal(engine_gguf_open(path, &g, err, sizeof(err)), PW_OK);
    assert_int_equal(engine_gguf_file_size(g), n);
    check_tiny(g, KERNEL_DTYPE_Q4_1, false);
    /* The mapping holds the same bytes as the buffer. */
    const struct engine_gguf_tensor *t = engine_gguf_find_tensor(g, "output.weight");
    assert_memory_equal(t->data, buf + engine_gguf_data_offset(g) + t->offset, t->size);
    engine_gguf_destroy(g);
    unlink(path);

    assert_int_equal(engine_gguf_open(path, &g, err, sizeof(err)), PW_ERR_IO);
    assert_null(g);
    assert_non_null(strstr(err, "No such file"));
    assert_int_equal(engine_gguf_open("/tmp", &g, err, sizeof(err)), PW_ERR_IO);
    free(buf);
    engine_gguf_destroy(NULL);
}

static void test_generated_deterministic(void **state)
{
    (void)state;
    size_t n1, n2, n3;
    uint8_t *a = gen_model(KERNEL_DTYPE_Q8_0, false, 5, &n1);
    uint8_t *b = gen_model(KERNEL_DTYPE_Q8_0, false, 5, &n2);
    uint8_t *c = gen_model(KERNEL_DTYPE_Q8_0, false, 6, &n3);
    assert_int_equal(n1, n2);
    assert_memory_equal(a, b, n1);
    assert_int_equal(n1, n3);
    assert_true(memcmp(a, c, n1) != 0);
    free(a);
    free(b);
    free(c);
}

/* ---- the real default model ------------------------------------------------------------ */

static void test_real_model(void **state)
{
    (void)state;
    const char *dir = getenv("PW_MODEL_DIR");
    char path[1024];
    if (dir && *dir)
        snprintf(path, sizeof(path), "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(path, sizeof(path), "%s/.cache/parkway/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                 getenv("HOME") ? getenv("HOME") : "");
    if (access(path, R_OK) != 0)
        skip();

    struct engine_gguf *g = NULL;
    char err[256];
    if (engine_gguf_open(path, &g, err, sizeof(err)))
        fail_msg("%s: %s", path, err);
    uint32_t u;
    float f;
    bool b;
    uint64_t n;
    int64_t iv;
    struct engine_gguf_str s;
    enum engine_gguf_type et;

    /* Expected values are what the gguf Python package (GGUFReader) reports. */
    assert_int_equal(engine_gguf_version(g), 3);
    assert_int_equal(engine_gguf_n_kv(g), 33);
    assert_int_equal(engine_gguf_n_tensors(g), 272);
    assert_int_equal(engine_gguf_alignment(g), 32);
    assert_int_equal(engine_gguf_data_offset(g), 1785664);
    assert_true(engine_gguf_get_str(g, "general.architecture", &s) && str_eq(s, "llama"));
    assert_true(engine_gguf_get_str(g, "tokenizer.ggml.pre", &s) && str_eq(s, "smollm"));
    assert_true(engine_gguf_get_u32(g, "llama.block_count", &u) && u == 30);
    assert_true(engine_gguf_get_u32(g, "llama.context_length", &u) && u == 8192);
    assert_true(engine_gguf_get_u32(g, "llama.embedding_length", &u) && u == 576);
    assert_true(engine_gguf_get_u32(g, "llama.feed_forward_length", &u) && u == 1536);
    assert_true(engine_gguf_get_u32(g, "llama.attention.head_count", &u) && u == 9);
    assert_true(engine_gguf_get_u32(g, "llama.attention.head_count_kv", &u) && u == 3);
    assert_true(engine_gguf_get_u32(g, "llama.vocab_size", &u) && u == 49152);
    assert_true(engine_gguf_get_u32(g, "llama.rope.dimension_count", &u) && u == 64);
    assert_true(engine_gguf_get_f32(g, "llama.rope.freq_base", &f) && f == 100000.0f);
    assert_true(engine_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f) && f == 1e-5f);
    assert_true(engine_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b) && !b);
    assert_true(engine_gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &u) && u == 1);
    assert_true(engine_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &u) && u == 2);
    assert_true(engine_gguf_get_str(g, "tokenizer.chat_template", &s) && s.len == 368);
    assert_true(engine_gguf_get_arr(g, "general.languages", &et, &n) && n == 1);
    assert_true(engine_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n));
    assert_int_equal(et, ENGINE_GGUF_STRING);
    assert_int_equal(n, 49152);
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 0, &s) &&
                str_eq(s, "<|endoftext|>"));
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 100, &s) && str_eq(s, "t"));
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.tokens", 49151, &s) && str_eq(s, "ectable"));
    assert_true(engine_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n) && n == 48900);
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.merges", 0, &s) && str_eq(s, "\xc4\xa0 t"));
    assert_true(engine_gguf_arr_str(g, "tokenizer.ggml.merges", 48899, &s) &&
                str_eq(s, "ect able"));
    assert_true(engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", 17, &iv) && iv == 1);
    assert_true(engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", 1, &iv) && iv == 3);

    const struct engine_gguf_tensor *t = engine_gguf_find_tensor(g, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, KERNEL_DTYPE_Q8_0);
    assert_int_equal(t->ne[0], 576);
    assert_int_equal(t->ne[1], 49152);
    assert_int_equal(t->size, 30081024);
    assert_int_equal(engine_gguf_data_offset(g) + t->offset, 1785664);
    t = engine_gguf_find_tensor(g, "blk.0.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->type, KERNEL_DTYPE_Q4_1);
    assert_int_equal(t->ne[0], 1536);
    assert_int_equal(t->ne[1], 576);
    assert_int_equal(t->size, 552960);
    assert_int_equal(engine_gguf_data_offset(g) + t->offset, 31868992);
    t = engine_gguf_find_tensor(g, "output_norm.weight");
    assert_non_null(t);
    assert_int_equal(engine_gguf_data_offset(g) + t->offset, 98360128);
    float w0;
    memcpy(&w0, t->data, 4);
    assert_true(w0 == 1.7578125f);
    assert_null(engine_gguf_find_tensor(g, "output.weight")); /* tied embeddings */
    engine_gguf_destroy(g);
}

/* ---- crafted files --------------------------------------------------------------------- */

/*
 * A small valid file, then one defect at a time. Layout: 3 kv pairs (general.alignment,
 * a.str, a.arr of strings) and 2 tensors: t0 f32 [32, 2] at 0 (256 bytes), t1 q4_0 [64]
 * at 256 (36 bytes).
 */
struct spec {
    char magic[5];
    uint32_t version;
    uint64_t n_tensors, n_kv; /* UINT64_MAX: the real counts */
    uint32_t align_type;      /* type of general.alignment */
    uint64_t align;
    const char *key2;  /* key of the string kv */
    uint64_t str_len;  /* UINT64_MAX: real */
    uint32_t arr_elem; /* element type of a.arr */
    uint64_t arr_len;  /* UINT64_MAX: real */
    struct {
        const char *name;
        uint32_t n_dims;
        uint64_t ne[5];
        uint32_t type;
        uint64_t offset;
    } t[2];
    int64_t data_trim; /* bytes cut off the end */
};

static struct spec spec_valid(void)
{
    struct spec s = {
        .magic = "GGUF",
        .version = 3,
        .n_tensors = UINT64_MAX,
        .n_kv = UINT64_MAX,
        .align_type = ENGINE_GGUF_UINT32,
        .align = 32,
        .key2 = "a.str",
        .str_len = UINT64_MAX,
        .arr_elem = ENGINE_GGUF_STRING,
        .arr_len = UINT64_MAX,
        .t = {{"t0", 2, {32, 2}, KERNEL_DTYPE_F32, 0}, {"t1", 1, {64}, KERNEL_DTYPE_Q4_0, 256}},
    };
    return s;
}

struct buf {
    uint8_t *p;
    size_t len, cap;
};

static void bput(struct buf *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void bu32(struct buf *b, uint32_t v)
{
    bput(b, &v, 4);
}

static void bu64(struct buf *b, uint64_t v)
{
    bput(b, &v, 8);
}

static void bstr(struct buf *b, const char *s)
{
    bu64(b, strlen(s));
    bput(b, s, strlen(s));
}

/* Builds the file into an exactly sized heap buffer. */
static uint8_t *build(const struct spec *s, size_t *len)
{
    struct buf b = {0};
    bput(&b, s->magic, 4);
    bu32(&b, s->version);
    bu64(&b, s->n_tensors != UINT64_MAX ? s->n_tensors : 2);
    bu64(&b, s->n_kv != UINT64_MAX ? s->n_kv : 3);
    bstr(&b, "general.alignment");
    bu32(&b, s->align_type);
    if (s->align_type == ENGINE_GGUF_UINT64 || s->align_type == ENGINE_GGUF_INT64)
        bu64(&b, s->align);
    else
        bu32(&b, (uint32_t)s->align);
    bstr(&b, s->key2);
    bu32(&b, ENGINE_GGUF_STRING);
    bu64(&b, s->str_len != UINT64_MAX ? s->str_len : 5);
    bput(&b, "hello", 5);
    bstr(&b, "a.arr");
    bu32(&b, ENGINE_GGUF_ARRAY);
    bu32(&b, s->arr_elem);
    bu64(&b, s->arr_len != UINT64_MAX ? s->arr_len : 2);
    bstr(&b, "x");
    bstr(&b, "yz");
    for (int i = 0; i < 2; i++) {
        bstr(&b, s->t[i].name);
        bu32(&b, s->t[i].n_dims);
        for (uint32_t d = 0; d < s->t[i].n_dims; d++)
            bu64(&b, s->t[i].ne[d]);
        bu32(&b, s->t[i].type);
        bu64(&b, s->t[i].offset);
    }
    static const uint8_t zeros[64];
    while (b.len % 32 != 0)
        bput(&b, zeros, 1);
    for (int i = 0; i < 292; i++) {
        uint8_t v = (uint8_t)(i * 7);
        bput(&b, &v, 1);
    }
    size_t n = b.len - (size_t)s->data_trim;
    uint8_t *out = malloc(n ? n : 1);
    assert_non_null(out);
    memcpy(out, b.p, n);
    free(b.p);
    *len = n;
    return out;
}

/* Opens the file of spec s and checks the result class and message substring. */
static void expect(const struct spec *s, enum pw_err want, const char *msg)
{
    size_t n;
    uint8_t *p = build(s, &n);
    struct engine_gguf *g = (struct engine_gguf *)&n; /* must be reset to NULL */
    char err[256];
    memset(err, 'x', sizeof(err));
    enum pw_err e = open_buf(p, n, &g, err, sizeof(err));
    if (e != want || (msg && !strstr(err, msg)))
        fail_msg("want %s '%s', got %s '%s'", pw_err_name(want), msg ? msg : "", pw_err_name(e),
                 e ? err : "");
    if (e) {
        assert_null(g);
        assert_null(strchr(err, '\n'));
        assert_true(strlen(err) > 0 && strlen(err) < sizeof(err));
    } else {
        walk(g);
    }
    engine_gguf_destroy(e ? NULL : g);
    free(p);
}

static void test_crafted_valid(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    expect(&s, PW_OK, NULL);
    size_t n;
    uint8_t *p = build(&s, &n);
    struct engine_gguf *g;
    char err[128];
    assert_int_equal(open_buf(p, n, &g, err, sizeof(err)), PW_OK);
    struct engine_gguf_str str;
    assert_true(engine_gguf_arr_str(g, "a.arr", 1, &str) && str_eq(str, "yz"));
    assert_true(engine_gguf_get_str(g, "a.str", &str) && str_eq(str, "hello"));
    const struct engine_gguf_tensor *t = engine_gguf_find_tensor(g, "t1");
    assert_int_equal(t->size, 36);
    assert_ptr_equal(t->data, p + engine_gguf_data_offset(g) + 256);
    assert_int_equal(engine_gguf_data_offset(g) + 292, n);
    engine_gguf_destroy(g);
    /* Version 2 has the same layout and is accepted. */
    s.version = 2;
    expect(&s, PW_OK, NULL);
    free(p);
}

static void test_crafted_header(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    memcpy(s.magic, "GGUG", 4);
    expect(&s, PW_ERR_PARSE, "header: bad magic");
    s = spec_valid();
    s.version = 1;
    expect(&s, PW_ERR_UNSUPPORTED, "header: version 1 is not supported");
    s.version = 0x03000000;
    expect(&s, PW_ERR_UNSUPPORTED, "big-endian");
    s = spec_valid();
    s.n_tensors = 1ull << 60;
    expect(&s, PW_ERR_PARSE, "header: n_tensors 1152921504606846976 exceeds file size");
    s = spec_valid();
    s.n_kv = UINT64_MAX - 1;
    expect(&s, PW_ERR_PARSE, "header: n_kv 18446744073709551614 exceeds file size");
}

static void test_crafted_kv(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    s.str_len = 1ull << 40;
    expect(&s, PW_ERR_PARSE, "kv a.str: string length 1099511627776 exceeds file size");
    s = spec_valid();
    s.arr_len = 4294967296ull;
    expect(&s, PW_ERR_PARSE, "kv a.arr: array length 4294967296 exceeds file size");
    s = spec_valid();
    s.arr_elem = ENGINE_GGUF_UINT64;
    s.arr_len = 1ull << 61; /* times 8 overflows */
    expect(&s, PW_ERR_PARSE, "kv a.arr: array length 2305843009213693952 exceeds file size");
    s = spec_valid();
    s.arr_elem = ENGINE_GGUF_ARRAY;
    expect(&s, PW_ERR_UNSUPPORTED, "kv a.arr: nested arrays");
    s = spec_valid();
    s.arr_elem = 13;
    expect(&s, PW_ERR_PARSE, "kv a.arr: unknown array element type 13");
    s = spec_valid();
    s.key2 = "general.alignment";
    expect(&s, PW_ERR_PARSE, "kv general.alignment: duplicate key");
    s = spec_valid();
    s.align = 48;
    expect(&s, PW_ERR_PARSE, "kv general.alignment: 48 is not a power of two");
    s.align = 0;
    expect(&s, PW_ERR_PARSE, "kv general.alignment: 0 is not a power of two");
    s.align = 1u << 24;
    expect(&s, PW_ERR_TOOBIG, "kv general.alignment: 16777216 over");
    s.align_type = ENGINE_GGUF_FLOAT32;
    expect(&s, PW_ERR_PARSE, "kv general.alignment: type float32");
    s = spec_valid();
    s.align_type = ENGINE_GGUF_UINT64; /* any integer type that fits is fine */
    expect(&s, PW_OK, NULL);
    s = spec_valid();
    s.key2 = "";
    expect(&s, PW_ERR_PARSE, "kv #1: empty key");
    char longkey[70000];
    memset(longkey, 'k', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = '\0';
    s.key2 = longkey;
    expect(&s, PW_ERR_TOOBIG, "kv #1: key length 69999 over 65535");
}

static void test_crafted_tensors(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    s.t[0].n_dims = 5;
    s.t[0].ne[2] = s.t[0].ne[3] = s.t[0].ne[4] = 1;
    expect(&s, PW_ERR_PARSE, "tensor t0: n_dims 5 not in 1..4");
    s = spec_valid();
    s.t[0].n_dims = 0;
    expect(&s, PW_ERR_PARSE, "tensor t0: n_dims 0");
    s = spec_valid();
    s.t[0].ne[1] = 0;
    expect(&s, PW_ERR_PARSE, "tensor t0: dimension 1 is 0");
    s = spec_valid();
    s.t[0].n_dims = 4;
    s.t[0].ne[1] = 1ull << 32;
    s.t[0].ne[2] = 1ull << 32;
    s.t[0].ne[3] = 2;
    expect(&s, PW_ERR_PARSE, "tensor t0: element count overflows");
    s = spec_valid();
    s.t[0].ne[0] = 1ull << 62; /* count fits int64, bytes do not */
    s.t[0].ne[1] = 1;
    expect(&s, PW_ERR_PARSE, "tensor t0: size overflows");
    s = spec_valid();
    s.t[1].type = 13;
    expect(&s, PW_ERR_UNSUPPORTED, "tensor t1: unsupported type q5_K (id 13)");
    s.t[1].type = 1000;
    expect(&s, PW_ERR_UNSUPPORTED, "tensor t1: unknown type (id 1000)");
    s = spec_valid();
    s.t[1].ne[0] = 48;
    expect(&s, PW_ERR_PARSE, "tensor t1: row length 48 is not a multiple of q4_0 block size 32");
    s = spec_valid();
    s.t[1].offset = 260;
    expect(&s, PW_ERR_PARSE, "tensor t1: offset 260 not aligned to 32");
    s = spec_valid();
    s.t[1].offset = 224;
    expect(&s, PW_ERR_PARSE, "tensor t1: data overlaps tensor t0");
    s = spec_valid();
    s.t[1].offset = 0;
    expect(&s, PW_ERR_PARSE, "overlaps");
    s = spec_valid();
    s.data_trim = 1;
    expect(&s, PW_ERR_PARSE, "tensor t1: data ends past end of file");
    s = spec_valid();
    s.t[1].offset = UINT64_MAX - 31; /* offset + size wraps */
    expect(&s, PW_ERR_PARSE, "tensor t1: data ends past end of file");
    s = spec_valid();
    s.t[1].name = "t0";
    expect(&s, PW_ERR_PARSE, "tensor t0: duplicate name");
    s = spec_valid();
    s.t[1].name = "";
    expect(&s, PW_ERR_PARSE, "tensor #1: empty name");
    char longname[300];
    memset(longname, 'n', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    s.t[1].name = longname;
    expect(&s, PW_ERR_TOOBIG, "tensor #1: name length 299 over 256");
    s = spec_valid();
    s.t[0].name = "bad\x01name";
    s.t[0].type = 13;
    expect(&s, PW_ERR_UNSUPPORTED, "tensor bad?name: unsupported"); /* sanitised */
}

static void test_crafted_truncated_everywhere(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    size_t n;
    uint8_t *full = build(&s, &n);
    for (size_t cut = 0; cut < n; cut++) {
        uint8_t *p = malloc(cut ? cut : 1);
        assert_non_null(p);
        memcpy(p, full, cut);
        struct engine_gguf *g = NULL;
        char err[256];
        enum pw_err e = open_buf(p, cut, &g, err, sizeof(err));
        if (e == PW_OK)
            fail_msg("cut at %zu opened", cut);
        assert_null(g);
        if (cut < 24)
            assert_non_null(strstr(err, "header: "));
        free(p);
    }
    free(full);
}

/* ---- random damage --------------------------------------------------------------------- */

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void damage_loop(const uint8_t *orig, size_t n, size_t span, int iters, uint64_t seed)
{
    uint64_t rs = seed;
    int opened = 0;
    for (int it = 0; it < iters; it++) {
        uint8_t *p = malloc(n);
        assert_non_null(p);
        memcpy(p, orig, n);
        int flips = 1 + (int)(rng_next(&rs) % 4);
        for (int k = 0; k < flips; k++) {
            size_t at = (size_t)(rng_next(&rs) % span);
            uint64_t r = rng_next(&rs);
            /* Mostly single-bit flips; sometimes a byte set to 0x00/0xff/random. */
            switch (r % 4) {
            case 0:
                p[at] = 0xff;
                break;
            case 1:
                p[at] = (uint8_t)(r >> 8);
                break;
            default:
                p[at] ^= (uint8_t)(1u << ((r >> 8) % 8));
            }
        }
        size_t len = (rng_next(&rs) % 8 == 0) ? (size_t)(rng_next(&rs) % n) : n;
        struct engine_gguf *g = NULL;
        char err[256];
        if (open_buf(p, len, &g, err, sizeof(err)) == PW_OK) {
            walk(g);
            engine_gguf_destroy(g);
            opened++;
        } else {
            assert_null(g);
            assert_true(strlen(err) > 0);
        }
        free(p);
    }
    print_message("damage: %d/%d still opened\n", opened, iters);
}

static void test_random_damage(void **state)
{
    (void)state;
    struct spec s = spec_valid();
    size_t n;
    uint8_t *p = build(&s, &n);
    damage_loop(p, n, n, 20000, 0x9e3779b97f4a7c15ull);
    free(p);
    /* A generated model: damage its header and metadata (the part that is parsed). */
    p = gen_model(KERNEL_DTYPE_Q4_0, false, 3, &n);
    struct engine_gguf *g;
    char err[128];
    assert_int_equal(open_buf(p, n, &g, err, sizeof(err)), PW_OK);
    size_t span = (size_t)engine_gguf_data_offset(g);
    engine_gguf_destroy(g);
    damage_loop(p, n, span, 1500, 12345);
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generated_each_type),
        cmocka_unit_test(test_generated_file_mmap),
        cmocka_unit_test(test_generated_deterministic),
        cmocka_unit_test(test_real_model),
        cmocka_unit_test(test_crafted_valid),
        cmocka_unit_test(test_crafted_header),
        cmocka_unit_test(test_crafted_kv),
        cmocka_unit_test(test_crafted_tensors),
        cmocka_unit_test(test_crafted_truncated_everywhere),
        cmocka_unit_test(test_random_damage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

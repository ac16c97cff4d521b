/*
 * Unit tests for engine_model: loader errors on crafted GGUF files (missing tensor, wrong
 * shape, unsupported architecture, norm weight not f32, missing metadata) give one clear
 * line; every supported weight type loads and gives finite logits; tied and untied output
 * heads are told apart and a tied head equals an untied copy of the embedding.
 *
 * Crafted files are written here with gguf_writer (weights seeded from the tensor's name,
 * so two files can share a tensor's bytes); whole models come from gguf_gen.
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

#include "engine_model.h"
#include "gguf_gen.h"
#include "gguf_writer.h"
#include "kernel.h"
#include "kernel_quant.h"

#define C_EMBD 64u
#define C_FF 128u
#define C_HEAD 4u
#define C_HEAD_KV 2u
#define C_VOCAB 300u
#define C_CTX 128u
#define C_LAYER 2u

/* What to get wrong in a crafted file. */
struct craft {
    const char *arch;      /* general.architecture; NULL = llama */
    uint32_t type;         /* matrices */
    const char *skip;      /* tensor left out */
    const char *bad_shape; /* tensor written with half its rows */
    const char *f16_norm;  /* norm tensor written as f16 */
    const char *skip_kv;   /* metadata key left out */
    int output;            /* 0 tied, 1 own output.weight, 2 output.weight = copy of token_embd */
};

static uint64_t name_seed(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static float rnd(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((float)(z >> 40) / (float)(1ull << 24) - 0.5f) * 0.2f; /* [-0.1, 0.1) */
}

struct ctensor {
    char name[64];
    uint64_t ne[2];
    uint32_t n_dims, type;
    bool norm;
    char seed_name[64];
};

static void kv_u32(struct gguf_writer *w, const struct craft *c, const char *k, uint32_t v)
{
    if (!c->skip_kv || strcmp(c->skip_kv, k) != 0)
        gguf_writer_kv_u32(w, k, v);
}

/* Writes the crafted model to a new temporary file; returns its path (caller frees/unlinks). */
static char *craft_write(const struct craft *c)
{
    char *path = strdup("/tmp/pw_test_model_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "wb");
    assert_non_null(f);
    struct gguf_writer *w = gguf_writer_create(32);
    assert_non_null(w);
    gguf_writer_kv_str(w, "general.architecture", c->arch ? c->arch : "llama");
    kv_u32(w, c, "llama.context_length", C_CTX);
    kv_u32(w, c, "llama.embedding_length", C_EMBD);
    kv_u32(w, c, "llama.block_count", C_LAYER);
    kv_u32(w, c, "llama.feed_forward_length", C_FF);
    kv_u32(w, c, "llama.attention.head_count", C_HEAD);
    kv_u32(w, c, "llama.attention.head_count_kv", C_HEAD_KV);
    gguf_writer_kv_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_writer_kv_f32(w, "llama.rope.freq_base", 10000.0f);

    struct ctensor ts[3 + 9 * C_LAYER];
    size_t n = 0;
    uint64_t kvd = C_EMBD / C_HEAD * C_HEAD_KV;
#define ADD(nm, e0, e1)                                                                            \
    do {                                                                                           \
        struct ctensor *t = &ts[n++];                                                              \
        snprintf(t->name, sizeof t->name, "%s", nm);                                               \
        snprintf(t->seed_name, sizeof t->seed_name, "%s", nm);                                     \
        t->ne[0] = (e0);                                                                           \
        t->ne[1] = (e1);                                                                           \
        t->n_dims = (e1) ? 2 : 1;                                                                  \
        t->norm = (e1) == 0;                                                                       \
        t->type = t->norm ? KERNEL_DTYPE_F32 : c->type;                                            \
    } while (0)
    ADD("token_embd.weight", C_EMBD, C_VOCAB);
    char nm[64];
    for (uint32_t l = 0; l < C_LAYER; l++) {
        static const char *const parts[] = {"attn_norm", "attn_q",      "attn_k",
                                            "attn_v",    "attn_output", "ffn_norm",
                                            "ffn_gate",  "ffn_up",      "ffn_down"};
        const uint64_t e0[] = {C_EMBD, C_EMBD, C_EMBD, C_EMBD, C_EMBD,
                               C_EMBD, C_EMBD, C_EMBD, C_FF};
        const uint64_t e1[] = {0, C_EMBD, kvd, kvd, C_EMBD, 0, C_FF, C_FF, C_EMBD};
        for (size_t p = 0; p < 9; p++) {
            snprintf(nm, sizeof nm, "blk.%u.%s.weight", l, parts[p]);
            ADD(nm, e0[p], e1[p]);
        }
    }
    ADD("output_norm.weight", C_EMBD, 0);
    if (c->output) {
        ADD("output.weight", C_EMBD, C_VOCAB);
        if (c->output == 2)
            snprintf(ts[n - 1].seed_name, sizeof ts[n - 1].seed_name, "token_embd.weight");
    }
#undef ADD
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (c->skip && strcmp(c->skip, ts[i].name) == 0)
            continue;
        if (c->bad_shape && strcmp(c->bad_shape, ts[i].name) == 0)
            ts[i].ne[1] /= 2;
        if (c->f16_norm && strcmp(c->f16_norm, ts[i].name) == 0)
            ts[i].type = KERNEL_DTYPE_F16;
        ts[kept++] = ts[i];
    }
    n = kept;
    for (size_t i = 0; i < n; i++)
        assert_true(gguf_writer_add_tensor(w, ts[i].name, ts[i].n_dims, ts[i].ne, ts[i].type) > 0);
    assert_int_equal(gguf_writer_write_header(w, f), PW_OK);
    float *row = malloc(C_FF * sizeof(float));
    void *q = malloc(C_FF * sizeof(float) * 2);
    for (size_t i = 0; i < n; i++) {
        uint64_t s = name_seed(ts[i].seed_name);
        uint64_t rows = ts[i].n_dims > 1 ? ts[i].ne[1] : 1;
        size_t ne0 = (size_t)ts[i].ne[0];
        for (uint64_t r = 0; r < rows; r++) {
            for (size_t k = 0; k < ne0; k++)
                row[k] = ts[i].norm ? 1.0f : rnd(&s);
            kernel_quantize_row((enum kernel_dtype)ts[i].type, row, q, ne0);
            assert_int_equal(gguf_writer_write(w, f, q, kernel_dtype_row_bytes(ts[i].type, ne0)),
                             PW_OK);
        }
        assert_int_equal(gguf_writer_end_tensor(w, f), PW_OK);
    }
    free(row);
    free(q);
    gguf_writer_destroy(w);
    assert_int_equal(fclose(f), 0);
    return path;
}

static char *gen_write(uint32_t type, bool tied)
{
    struct gguf_gen_opts o;
    assert_int_equal(gguf_gen_preset("tiny", &o), PW_OK);
    o.type = type;
    o.tied = tied;
    o.seed = 7;
    char *path = strdup("/tmp/pw_test_gen_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "wb");
    char err[256] = "";
    assert_int_equal(gguf_gen_write(&o, f, err, sizeof err), PW_OK);
    assert_int_equal(fclose(f), 0);
    return path;
}

struct fixture {
    struct kernel_backend *be;
};

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof *fx);
    if (!fx || kernel_cpu_create(2, &fx->be) != PW_OK)
        return -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    fx->be->ops->destroy(fx->be);
    free(fx);
    return 0;
}

static const struct engine_model_opts small_opts = {
    .max_tok = 16, .max_logits = 4, .n_ctx = 64, .block_tokens = 16, .n_kv_blocks = 8};

/* Loads path expecting failure: returns the rc; err must be one non-empty line. */
static enum pw_err load_fails(struct fixture *fx, const char *path, char *err, size_t cap)
{
    struct engine_model *m = (struct engine_model *)0x1;
    err[0] = '\0';
    enum pw_err rc = engine_model_load(path, fx->be, &small_opts, &m, err, cap);
    assert_int_not_equal(rc, PW_OK);
    assert_null(m);
    assert_true(strlen(err) > 0);
    assert_null(strchr(err, '\n'));
    return rc;
}

static void check_crafted_error(void **state, const struct craft *c, enum pw_err want_rc,
                                const char *want_msg)
{
    struct fixture *fx = *state;
    char *path = craft_write(c);
    char err[512];
    enum pw_err rc = load_fails(fx, path, err, sizeof err);
    if (!strstr(err, want_msg))
        fail_msg("error '%s' does not contain '%s'", err, want_msg);
    assert_int_equal(rc, want_rc);
    unlink(path);
    free(path);
}

static void test_crafted_good_file_loads(void **state)
{
    struct fixture *fx = *state;
    struct craft c = {.type = KERNEL_DTYPE_F32};
    char *path = craft_write(&c);
    char err[512] = "";
    struct engine_model *m = NULL;
    enum pw_err rc = engine_model_load(path, fx->be, &small_opts, &m, err, sizeof err);
    if (rc)
        fail_msg("load: %s", err);
    const struct engine_hparams *hp = engine_model_hparams(m);
    assert_int_equal(hp->n_vocab, C_VOCAB);
    assert_int_equal(hp->n_layer, C_LAYER);
    assert_int_equal(hp->n_head_kv, C_HEAD_KV);
    assert_int_equal(hp->head_dim, C_EMBD / C_HEAD);
    assert_true(hp->tied_output);
    engine_model_destroy(m);
    unlink(path);
    free(path);
}

static void test_missing_tensor(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_Q8_0, .skip = "blk.1.ffn_up.weight"};
    check_crafted_error(state, &c, PW_ERR_PARSE, "missing tensor blk.1.ffn_up.weight");
}

static void test_missing_embedding(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_F32, .skip = "token_embd.weight"};
    check_crafted_error(state, &c, PW_ERR_PARSE, "token_embd.weight");
}

static void test_wrong_shape(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_F32, .bad_shape = "blk.0.attn_k.weight"};
    check_crafted_error(state, &c, PW_ERR_PARSE,
                        "tensor blk.0.attn_k.weight: shape [64, 16] where [64, 32] was expected");
}

static void test_unsupported_architecture(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_F32, .arch = "qwen2"};
    check_crafted_error(state, &c, PW_ERR_UNSUPPORTED, "unsupported architecture qwen2");
}

static void test_norm_not_f32(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_F16, .f16_norm = "blk.0.attn_norm.weight"};
    check_crafted_error(state, &c, PW_ERR_UNSUPPORTED,
                        "tensor blk.0.attn_norm.weight: norm weights must be f32, not f16");
}

static void test_missing_metadata(void **state)
{
    struct craft c = {.type = KERNEL_DTYPE_F32, .skip_kv = "llama.block_count"};
    check_crafted_error(state, &c, PW_ERR_PARSE, "llama.block_count");
}

static void test_missing_file(void **state)
{
    struct fixture *fx = *state;
    char err[512];
    load_fails(fx, "/nonexistent/dir/model.gguf", err, sizeof err);
    assert_non_null(strstr(err, "/nonexistent/dir/model.gguf"));
}

/* Runs tokens 0..n-1 of a fixed sequence and returns the last row's logits (malloc'd). */
static float *forward_logits(struct engine_model *m, uint32_t n)
{
    const struct engine_hparams *hp = engine_model_hparams(m);
    int32_t tok[16], pos[16], seq[16], table[4] = {0, 1, 2, 3};
    assert_true(n <= 16);
    for (uint32_t i = 0; i < n; i++) {
        tok[i] = (int32_t)((i * 37 + 5) % hp->n_vocab);
        pos[i] = (int32_t)i;
        seq[i] = 0;
    }
    struct kernel_batch b = {.n_tok = n,
                             .tokens = tok,
                             .pos = pos,
                             .seq = seq,
                             .n_seq = 1,
                             .max_blocks = 4,
                             .block_table = table};
    float *logits = malloc(hp->n_vocab * sizeof(float));
    int32_t row = (int32_t)n - 1;
    engine_model_forward(m, &b, &row, 1, logits);
    return logits;
}

static void check_finite_and_spread(const float *l, uint32_t n)
{
    float lo = INFINITY, hi = -INFINITY;
    for (uint32_t i = 0; i < n; i++) {
        if (!isfinite(l[i]))
            fail_msg("logit %u is %g", i, (double)l[i]);
        lo = l[i] < lo ? l[i] : lo;
        hi = l[i] > hi ? l[i] : hi;
    }
    assert_true(hi > lo); /* not a constant vector */
}

static void test_every_weight_type_loads_with_finite_logits(void **state)
{
    struct fixture *fx = *state;
    static const uint32_t types[] = {KERNEL_DTYPE_F32,  KERNEL_DTYPE_F16,  KERNEL_DTYPE_BF16,
                                     KERNEL_DTYPE_Q8_0, KERNEL_DTYPE_Q4_0, KERNEL_DTYPE_Q4_1};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        for (int tied = 0; tied < 2; tied++) {
            char *path = gen_write(types[i], tied);
            char err[512] = "";
            struct engine_model *m = NULL;
            enum pw_err rc = engine_model_load(path, fx->be, &small_opts, &m, err, sizeof err);
            if (rc)
                fail_msg("%s tied=%d: %s", kernel_dtype_name(types[i]), tied, err);
            const struct engine_hparams *hp = engine_model_hparams(m);
            assert_int_equal(hp->weight_type, types[i]);
            assert_int_equal(hp->tied_output, (bool)tied);
            float *l = forward_logits(m, 9);
            check_finite_and_spread(l, hp->n_vocab);
            free(l);
            engine_model_destroy(m);
            unlink(path);
            free(path);
        }
    }
}

/* A tied head and an untied head holding a copy of the embedding give the same logits; an
 * untied head with its own weights gives different ones. */
static void test_tied_equals_untied_copy(void **state)
{
    struct fixture *fx = *state;
    static const uint32_t types[] = {KERNEL_DTYPE_F32, KERNEL_DTYPE_Q8_0, KERNEL_DTYPE_Q4_1};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        float *logits[3];
        for (int out = 0; out < 3; out++) {
            struct craft c = {.type = types[t], .output = out};
            char *path = craft_write(&c);
            char err[512] = "";
            struct engine_model *m = NULL;
            if (engine_model_load(path, fx->be, &small_opts, &m, err, sizeof err))
                fail_msg("%s: %s", kernel_dtype_name(types[t]), err);
            assert_int_equal(engine_model_hparams(m)->tied_output, out == 0);
            logits[out] = forward_logits(m, 7);
            check_finite_and_spread(logits[out], C_VOCAB);
            engine_model_destroy(m);
            unlink(path);
            free(path);
        }
        float d_copy = 0, d_own = 0;
        for (uint32_t i = 0; i < C_VOCAB; i++) {
            d_copy = fmaxf(d_copy, fabsf(logits[0][i] - logits[2][i]));
            d_own = fmaxf(d_own, fabsf(logits[0][i] - logits[1][i]));
        }
        if (d_copy > 1e-5f)
            fail_msg("%s: tied vs untied copy differ by %g", kernel_dtype_name(types[t]),
                     (double)d_copy);
        assert_true(d_own > 1e-3f);
        for (int out = 0; out < 3; out++)
            free(logits[out]);
    }
}

/* ---- KV cache sized from the device's free memory ---- */

static void test_kv_blocks_for_memory(void **state)
{
    (void)state;
    assert_int_equal(engine_kv_blocks_for_memory(1000, 0.9, 100, 1000), 9);
    assert_int_equal(engine_kv_blocks_for_memory(1000, 1.0, 100, 1000), 10);
    assert_int_equal(engine_kv_blocks_for_memory(99, 1.0, 100, 1000), 0);
    assert_int_equal(engine_kv_blocks_for_memory((size_t)1 << 40, 0.9, 1, 1u << 24), 1u << 24);
    assert_int_equal(engine_kv_blocks_for_memory(1000, 0.0, 100, 1000), 0);
    assert_int_equal(engine_kv_blocks_for_memory(1000, 1.5, 100, 1000), 0);
    assert_int_equal(engine_kv_blocks_for_memory(1000, 0.5, 0, 1000), 0);
}

/*
 * A backend that reports device memory (the CPU backend with a mem_info swapped into a
 * copy of its ops table: its ops only ever cast `be` to their own state).
 */
static size_t fake_free;
static int fake_calls;

static enum pw_err fake_mem_info(struct kernel_backend *be, size_t *free_b, size_t *total_b)
{
    (void)be;
    fake_calls++;
    *free_b = fake_free;
    *total_b = fake_free * 2;
    return PW_OK;
}

static void test_kv_sized_from_free_memory(void **state)
{
    struct fixture *fx = *state;
    static struct kernel_ops ops;
    const struct kernel_ops *orig = fx->be->ops;
    ops = *orig;
    ops.mem_info = fake_mem_info;
    fx->be->ops = &ops;
    char *path = gen_write(KERNEL_DTYPE_F16, false);
    struct engine_model *m = NULL;
    char err[256] = "";
    struct engine_model_opts o = small_opts;
    o.n_kv_blocks = 0;
    o.kv_mem_fraction = 0.5f;
    /* the block size comes from the generated model's shape */
    fake_free = (size_t)64 << 20;
    fake_calls = 0;
    assert_int_equal(engine_model_load(path, fx->be, &o, &m, err, sizeof err), PW_OK);
    const struct engine_hparams *hp = engine_model_hparams(m);
    size_t block = (size_t)2 * hp->n_layer * 16 * hp->n_head_kv * hp->head_dim * 2;
    assert_int_equal(fake_calls, 1);
    assert_int_equal(engine_model_opts(m)->n_kv_blocks,
                     engine_kv_blocks_for_memory(fake_free, 0.5, block, 1u << 24));
    assert_true(engine_model_opts(m)->n_kv_blocks > 100);
    assert_int_equal(engine_model_kv_bytes(m), (size_t)engine_model_opts(m)->n_kv_blocks * block);
    engine_model_destroy(m);

    /* an explicit block count is kept, and memory is not asked */
    o.n_kv_blocks = 8;
    fake_calls = 0;
    assert_int_equal(engine_model_load(path, fx->be, &o, &m, err, sizeof err), PW_OK);
    assert_int_equal(engine_model_opts(m)->n_kv_blocks, 8);
    assert_int_equal(fake_calls, 0);
    engine_model_destroy(m);

    /* too little memory for one context: a clear error, not a tiny cache */
    o.n_kv_blocks = 0;
    fake_free = block * 3; /* 64-token context needs 4 blocks */
    m = (struct engine_model *)0x1;
    assert_int_equal(engine_model_load(path, fx->be, &o, &m, err, sizeof err), PW_ERR_NOMEM);
    assert_null(m);
    assert_non_null(strstr(err, "one 64-token context needs 4"));
    fx->be->ops = orig;
    unlink(path);
    free(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crafted_good_file_loads),
        cmocka_unit_test(test_missing_tensor),
        cmocka_unit_test(test_missing_embedding),
        cmocka_unit_test(test_wrong_shape),
        cmocka_unit_test(test_unsupported_architecture),
        cmocka_unit_test(test_norm_not_f32),
        cmocka_unit_test(test_missing_metadata),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_every_weight_type_loads_with_finite_logits),
        cmocka_unit_test(test_tied_equals_untied_copy),
        cmocka_unit_test(test_kv_blocks_for_memory),
        cmocka_unit_test(test_kv_sized_from_free_memory),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/*
 * Unit tests for engine_tokenizer and engine_unicode.
 *
 * Synthetic vocabularies pin the algorithms (merge order, byte fallback, special-token
 * policy, caps, streaming detokenization) and run everywhere. The exactness test runs
 * tests/tokenizer/reference.py (Hugging Face `tokenizers` over the same GGUF vocabulary)
 * and compares every string of its corpus id for id; it is skipped when the default model
 * or the project's .venv is absent.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "engine_gguf.h"
#include "engine_tokenizer.h"
#include "engine_unicode.h"

/* ------------------------------------------------------------------------------------- */
/* engine_unicode                                                                          */

static void test_unicode_classes(void **state)
{
    (void)state;
    assert_int_equal(engine_unicode_class('a'), ENGINE_UCLASS_LETTER);
    assert_int_equal(engine_unicode_class('7'), ENGINE_UCLASS_NUMBER);
    assert_int_equal(engine_unicode_class(' '), ENGINE_UCLASS_SPACE);
    assert_int_equal(engine_unicode_class('!'), 0);
    assert_int_equal(engine_unicode_class(0x4E2D), ENGINE_UCLASS_LETTER); /* 中 */
    assert_int_equal(engine_unicode_class(0x0663), ENGINE_UCLASS_NUMBER); /* Arabic 3 */
    assert_int_equal(engine_unicode_class(0x00BD), ENGINE_UCLASS_NUMBER); /* ½ */
    assert_int_equal(engine_unicode_class(0x3000), ENGINE_UCLASS_SPACE);
    assert_int_equal(engine_unicode_class(0x0085), ENGINE_UCLASS_SPACE);
    assert_int_equal(engine_unicode_class(0x001C), 0); /* not White_Space */
    assert_int_equal(engine_unicode_class(0x0301), 0); /* combining mark */
    assert_int_equal(engine_unicode_class(0x1F600), 0);
    assert_int_equal(engine_unicode_class(0x110000), 0);
    assert_int_equal(engine_unicode_class(ENGINE_UTF8_INVALID), 0);
}

static void test_utf8_maximal_subparts(void **state)
{
    (void)state;
    uint32_t cp;
    bool tr;
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xE2\x82\xAC", 3, &cp, &tr), 3);
    assert_int_equal(cp, 0x20AC);
    /* Truncated at the end: held back by streaming decoders. */
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xE2\x82", 2, &cp, &tr), 2);
    assert_int_equal(cp, ENGINE_UTF8_INVALID);
    assert_true(tr);
    /* Broken by a bad byte: the two-byte prefix is one subpart. */
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xE2\x82x", 3, &cp, &tr), 2);
    assert_false(tr);
    /* Overlong, surrogate, past U+10FFFF: one byte each. */
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xC0\xAF", 2, &cp, &tr), 1);
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xED\xA0\x80", 3, &cp, &tr), 1);
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xF4\x90\x80\x80", 4, &cp, &tr), 1);
    assert_int_equal(engine_utf8_next((const uint8_t *)"\xFF", 1, &cp, &tr), 1);
    assert_int_equal(cp, ENGINE_UTF8_INVALID);
    uint8_t b[4];
    assert_int_equal(engine_utf8_encode(0x1F600, b), 4);
    assert_int_equal(engine_utf8_next(b, 4, &cp, NULL), 4);
    assert_int_equal(cp, 0x1F600);
    assert_int_equal(engine_utf8_encode(0xD800, b), 0);
    assert_true(engine_utf8_valid((const uint8_t *)"h\xC3\xA9", 3));
    assert_false(engine_utf8_valid((const uint8_t *)"h\xC3", 2));
}

/* ------------------------------------------------------------------------------------- */
/* A tiny byte-level BPE vocabulary: 256 byte tokens in the GPT-2 alphabet, a few merges,  */
/* and two control tokens.                                                                 */

struct tiny {
    char text[400][16];
    struct engine_tok_str toks[400];
    int32_t types[400];
    struct engine_tok_str merges[16];
    uint32_t n;
};

static uint32_t tiny_add(struct tiny *t, const char *s, int type)
{
    snprintf(t->text[t->n], sizeof t->text[t->n], "%s", s);
    t->toks[t->n] = (struct engine_tok_str){t->text[t->n], strlen(s)};
    t->types[t->n] = type;
    return t->n++;
}

static struct engine_tokenizer *tiny_bpe(struct tiny *t, const char *pre)
{
    memset(t, 0, sizeof *t);
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        uint32_t cp = self ? (uint32_t)b : 256u + (uint32_t)n++;
        uint8_t u[5] = {0};
        engine_utf8_encode(cp, u);
        tiny_add(t, (const char *)u, ENGINE_TOK_TYPE_NORMAL);
    }
    tiny_add(t, "<|end|>", ENGINE_TOK_TYPE_CONTROL);  /* 256 */
    tiny_add(t, "he", ENGINE_TOK_TYPE_NORMAL);        /* 257 */
    tiny_add(t, "ll", ENGINE_TOK_TYPE_NORMAL);        /* 258 */
    tiny_add(t, "hell", ENGINE_TOK_TYPE_NORMAL);      /* 259 */
    tiny_add(t, "\xC4\xA0h", ENGINE_TOK_TYPE_NORMAL); /* 260 "Ġh" */
    tiny_add(t, "aa", ENGINE_TOK_TYPE_NORMAL);        /* 261 */
    tiny_add(t, "<u>", ENGINE_TOK_TYPE_USER_DEFINED); /* 262 */
    const char *m[] = {"l l", "h e", "he ll", "\xC4\xA0 h", "a a"};
    for (int i = 0; i < 5; i++)
        t->merges[i] = (struct engine_tok_str){m[i], strlen(m[i])};
    struct engine_tokenizer_config cfg = {
        .model = ENGINE_TOK_MODEL_BPE,
        .pre = pre,
        .n_vocab = t->n,
        .tokens = t->toks,
        .types = t->types,
        .n_merges = 5,
        .merges = t->merges,
        .bos_id = 256,
        .eos_id = 256,
        .unk_id = -1,
    };
    struct engine_tokenizer *tok = NULL;
    char err[128];
    assert_int_equal(engine_tokenizer_create(&cfg, &tok, err, sizeof err), PW_OK);
    return tok;
}

static size_t enc(const struct engine_tokenizer *tok, const char *s, size_t len, unsigned flags,
                  int32_t *ids, size_t cap)
{
    size_t n = 0;
    assert_int_equal(engine_tokenizer_encode(tok, s, len, flags, ids, cap, &n), PW_OK);
    return n;
}

static void test_bpe_merges_by_rank(void **state)
{
    (void)state;
    struct tiny t;
    struct engine_tokenizer *tok = tiny_bpe(&t, "gpt2");
    int32_t ids[64];
    size_t n = enc(tok, "hello", 5, 0, ids, 64);
    /* l+l (rank 0), h+e (1), he+ll (2), then o alone. */
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 259);
    assert_int_equal(ids[1], 'o');
    /* " h" merges through Ġh; "aaa" merges the leftmost pair first. */
    n = enc(tok, " h", 2, 0, ids, 64);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], 260);
    n = enc(tok, "aaa", 3, 0, ids, 64);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 261);
    assert_int_equal(ids[1], 'a');
    engine_tokenizer_destroy(tok);
}

static void test_special_tokens_only_on_request(void **state)
{
    (void)state;
    struct tiny t;
    struct engine_tokenizer *tok = tiny_bpe(&t, "gpt2");
    int32_t ids[64];
    const char *s = "x<|end|>y";
    size_t n = enc(tok, s, strlen(s), 0, ids, 64);
    for (size_t i = 0; i < n; i++)
        assert_int_not_equal(ids[i], 256);
    n = enc(tok, s, strlen(s), ENGINE_TOK_PARSE_SPECIAL, ids, 64);
    assert_int_equal(n, 3);
    assert_int_equal(ids[1], 256);
    assert_int_equal(engine_tokenizer_special_id(tok, "<|end|>", 7), 256);
    assert_int_equal(engine_tokenizer_special_id(tok, "<|end", 5), -1);
    assert_int_equal(engine_tokenizer_special_id(tok, "he", 2), -1);
    /* User-defined tokens are text and always match. */
    n = enc(tok, "a<u>b", 5, 0, ids, 64);
    assert_int_equal(n, 3);
    assert_int_equal(ids[1], 262);
    /* The detokenizer hides control tokens unless asked. */
    int32_t in[3] = {'a', 256, 'b'};
    char out[64];
    size_t m;
    assert_int_equal(engine_tokenizer_decode(tok, in, 3, 0, out, sizeof out, &m), PW_OK);
    assert_int_equal(m, 2);
    assert_int_equal(
        engine_tokenizer_decode(tok, in, 3, ENGINE_TOK_DECODE_SPECIAL, out, sizeof out, &m), PW_OK);
    assert_int_equal(m, 9);
    assert_memory_equal(out, "a<|end|>b", 9);
    int32_t badid = 9999;
    assert_int_equal(engine_tokenizer_decode(tok, &badid, 1, 0, out, sizeof out, &m), PW_ERR_RANGE);
    engine_tokenizer_destroy(tok);
}

static void test_invalid_utf8_round_trips(void **state)
{
    (void)state;
    struct tiny t;
    const char *pres[] = {"gpt2", "smollm", "llama3", "qwen2"};
    for (int p = 0; p < 4; p++) {
        struct engine_tokenizer *tok = tiny_bpe(&t, pres[p]);
        /* Every byte value, plus a truncated character at the very end. */
        char in[300];
        for (int i = 0; i < 256; i++)
            in[i] = (char)(255 - i);
        memcpy(in + 256, " \xE2\x82\xAC \xF0\x9F", 7);
        int32_t ids[400];
        size_t n = enc(tok, in, 263, 0, ids, 400);
        char out[400];
        size_t m;
        assert_int_equal(engine_tokenizer_decode(tok, ids, n, 0, out, sizeof out, &m), PW_OK);
        assert_int_equal(m, 263);
        assert_memory_equal(out, in, 263);
        engine_tokenizer_destroy(tok);
    }
}

static void test_caps(void **state)
{
    (void)state;
    struct tiny t;
    struct engine_tokenizer *tok = tiny_bpe(&t, "gpt2");
    int32_t ids[4];
    size_t n;
    assert_int_equal(engine_tokenizer_encode(tok, "a b c d e", 9, 0, ids, 4, &n), PW_ERR_TOOBIG);
    assert_int_equal(engine_tokenizer_encode(tok, "x", ENGINE_TOK_MAX_INPUT + 1, 0, ids, 4, &n),
                     PW_ERR_TOOBIG);
    char out[3];
    int32_t in[2] = {259, 259};
    assert_int_equal(engine_tokenizer_decode(tok, in, 2, 0, out, sizeof out, &n), PW_ERR_TOOBIG);
    assert_int_equal(n, 8);
    engine_tokenizer_destroy(tok);

    /* A vocabulary over the caps is refused before anything is allocated for it. */
    struct engine_tok_str one = {"a", 1};
    struct engine_tokenizer_config cfg = {
        .model = ENGINE_TOK_MODEL_BPE, .n_vocab = ENGINE_TOK_MAX_VOCAB + 1, .tokens = &one};
    char err[128];
    assert_int_equal(engine_tokenizer_create(&cfg, &tok, err, sizeof err), PW_ERR_TOOBIG);
    cfg.n_vocab = 1;
    cfg.pre = "no-such-pre";
    assert_int_equal(engine_tokenizer_create(&cfg, &tok, err, sizeof err), PW_ERR_UNSUPPORTED);
    cfg.pre = NULL;
    struct engine_tok_str two = {"ab", 2};
    cfg.tokens = &two;
    assert_int_equal(engine_tokenizer_create(&cfg, &tok, err, sizeof err), PW_ERR_PARSE);
    assert_non_null(strstr(err, "single-byte"));
}

/* A long single word must merge in O(n log n): 1 MiB of one letter, well under a second. */
static void test_long_word_is_not_quadratic(void **state)
{
    (void)state;
    struct tiny t;
    struct engine_tokenizer *tok = tiny_bpe(&t, "gpt2");
    size_t len = (size_t)1 << 20;
    char *s = malloc(len);
    int32_t *ids = malloc((len + 2) * sizeof *ids);
    assert_non_null(s);
    assert_non_null(ids);
    memset(s, 'a', len);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t n = enc(tok, s, len, 0, ids, len + 2);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    assert_int_equal(n, len / 2);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    assert_true(secs < 10.0);
    free(s);
    free(ids);
    engine_tokenizer_destroy(tok);
}

/* Random bytes through every pre-tokenizer: no crash (ASan), exact round trip. */
static void test_random_bytes_round_trip(void **state)
{
    (void)state;
    struct tiny t;
    const char *pres[] = {"gpt2", "smollm", "llama3", "qwen2"};
    static const char alphabet[] = " \t\n\r'sSlLdD09aZ!\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"
                                   "\xE3\x80\x80\xC2\xA0\xCC\x81\x80\xFF";
    uint64_t x = 88172645463325252ULL;
    for (int p = 0; p < 4; p++) {
        struct engine_tokenizer *tok = tiny_bpe(&t, pres[p]);
        for (int iter = 0; iter < 3000; iter++) {
            char in[64];
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            size_t len = (size_t)(x % sizeof in);
            for (size_t i = 0; i < len; i++) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                /* half from a tricky alphabet, half any byte */
                in[i] = (x & 1) ? alphabet[(x >> 8) % (sizeof alphabet - 1)] : (char)(x >> 16);
            }
            int32_t ids[80];
            size_t n = enc(tok, in, len, 0, ids, 80);
            char out[80];
            size_t m;
            assert_int_equal(engine_tokenizer_decode(tok, ids, n, 0, out, sizeof out, &m), PW_OK);
            assert_int_equal(m, len);
            assert_memory_equal(out, in, len);
        }
        engine_tokenizer_destroy(tok);
    }
}

static void test_detok_never_splits_characters(void **state)
{
    (void)state;
    struct tiny t;
    struct engine_tokenizer *tok = tiny_bpe(&t, "gpt2");
    /* "é€😀" then a stray continuation byte and truncated sequences, one byte per token
     * (in the tiny vocabulary the token of byte b is id b). */
    const uint8_t bytes[] = {0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98,
                             0x80, 0x80, 'x',  0xE2, 0x82, 'y',  0xF0, 0x9F};
    const char expect[] = "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\xEF\xBF\xBDx\xEF\xBF\xBDy"
                          "\xEF\xBF\xBD";
    struct engine_detok d;
    engine_detok_init(&d, tok, 0);
    char all[128], out[ENGINE_DETOK_OUT_MAX];
    size_t n_all = 0, n;
    for (size_t i = 0; i < sizeof bytes; i++) {
        assert_int_equal(engine_detok_push(&d, bytes[i], out, sizeof out, &n), PW_OK);
        /* Every delta is whole characters. */
        assert_true(engine_utf8_valid((const uint8_t *)out, n));
        memcpy(all + n_all, out, n);
        n_all += n;
    }
    assert_int_equal(engine_detok_flush(&d, out, sizeof out, &n), PW_OK);
    memcpy(all + n_all, out, n);
    n_all += n;
    assert_int_equal(n_all, sizeof expect - 1);
    assert_memory_equal(all, expect, n_all);
    assert_int_equal(engine_detok_push(&d, -1, out, sizeof out, &n), PW_ERR_RANGE);
    assert_int_equal(engine_detok_push(&d, 259, out, 2, &n), PW_ERR_TOOBIG);
    engine_tokenizer_destroy(tok);
}

/* SentencePiece: ▁ for spaces, space prefix, merges by score, <0xXX> fallback. */
static void test_spm(void **state)
{
    (void)state;
    static const char *texts[] = {"<unk>",
                                  "<s>",
                                  "</s>",
                                  "<0x41>",
                                  "<0xE4>",
                                  "<0xB8>",
                                  "<0xAD>",
                                  "\xE2\x96\x81",
                                  "h",
                                  "e",
                                  "l",
                                  "o",
                                  "\xE2\x96\x81h",
                                  "ll",
                                  "\xE2\x96\x81he",
                                  "llo",
                                  "\xE2\x96\x81hello",
                                  "x"};
    static const int32_t types[] = {2, 3, 3, 6, 6, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    static const float scores[] = {0, 0, 0, 0, 0, 0, 0, -1, -2, -2, -2, -2, -3, -1, -4, -5, -6, -2};
    struct engine_tok_str toks[18];
    for (int i = 0; i < 18; i++)
        toks[i] = (struct engine_tok_str){texts[i], strlen(texts[i])};
    struct engine_tokenizer_config cfg = {.model = ENGINE_TOK_MODEL_SPM,
                                          .n_vocab = 18,
                                          .tokens = toks,
                                          .types = types,
                                          .scores = scores,
                                          .bos_id = 1,
                                          .eos_id = 2,
                                          .unk_id = 0,
                                          .add_bos = true,
                                          .add_space_prefix = true};
    struct engine_tokenizer *tok;
    char err[128];
    assert_int_equal(engine_tokenizer_create(&cfg, &tok, err, sizeof err), PW_OK);
    int32_t ids[32];
    /* "hello" -> ▁hello (the space prefix), BOS first. */
    size_t n = enc(tok, "hello", 5, ENGINE_TOK_ADD_BOS, ids, 32);
    assert_int_equal(n, 2);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 16);
    /* "A中" -> ▁, <0x41>... no: A is not in the vocabulary, so bytes; 中 is E4 B8 AD. */
    n = enc(tok, "A\xE4\xB8\xAD", 4, 0, ids, 32);
    assert_int_equal(n, 5);
    assert_int_equal(ids[0], 7);
    assert_int_equal(ids[1], 3);
    assert_int_equal(ids[2], 4);
    assert_int_equal(ids[3], 5);
    assert_int_equal(ids[4], 6);
    /* "Z" has neither a token nor a byte token: unknown. */
    n = enc(tok, "Z", 1, 0, ids, 32);
    assert_int_equal(n, 2);
    assert_int_equal(ids[1], 0);
    /* Decode drops the prefix space and turns bytes back into text. */
    int32_t in[] = {1, 16, 7, 3, 4, 5, 6};
    char out[64];
    size_t m;
    assert_int_equal(engine_tokenizer_decode(tok, in, 7, 0, out, sizeof out, &m), PW_OK);
    assert_int_equal(m, 10);
    assert_memory_equal(out, "hello A\xE4\xB8\xAD", 10);
    struct engine_detok d;
    engine_detok_init(&d, tok, 0);
    char all[64];
    size_t n_all = 0;
    for (int i = 0; i < 7; i++) {
        char o[ENGINE_DETOK_OUT_MAX];
        assert_int_equal(engine_detok_push(&d, in[i], o, sizeof o, &m), PW_OK);
        memcpy(all + n_all, o, m);
        n_all += m;
    }
    assert_int_equal(n_all, 10);
    assert_memory_equal(all, out, 10);
    /* Fragments: the prefix space goes after each special token. */
    struct engine_tok_frag fr[] = {{-1, "hello", 5}, {2, NULL, 0}, {-1, "x", 1}};
    assert_int_equal(engine_tokenizer_encode_frags(tok, fr, 3, 0, ids, 32, &n), PW_OK);
    assert_int_equal(n, 4);
    assert_int_equal(ids[0], 16);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 7);
    assert_int_equal(ids[3], 17);
    engine_tokenizer_destroy(tok);
}

/* ------------------------------------------------------------------------------------- */
/* Exactness against Hugging Face on the default model.                                    */

static bool default_model(char *path, size_t cap)
{
    const char *dir = getenv("PW_MODEL_DIR");
    char buf[512];
    if (!dir || !*dir) {
        const char *home = getenv("HOME");
        snprintf(buf, sizeof buf, "%s/.cache/parkway/models", home ? home : "/root");
        dir = buf;
    }
    snprintf(path, cap, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    struct stat st;
    return stat(path, &st) == 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Decodes hex in place; returns the byte count. */
static size_t unhex(char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i + 1 < len; i += 2)
        s[n++] = (char)(hexval(s[i]) * 16 + hexval(s[i + 1]));
    return n;
}

static struct engine_tokenizer *load_model(struct engine_gguf *g, const char *pre)
{
    struct engine_tokenizer *tok = NULL;
    char err[256];
    enum pw_err e = engine_tokenizer_from_gguf(g, pre, &tok, err, sizeof err);
    if (e)
        fprintf(stderr, "from_gguf(%s): %s: %s\n", pre ? pre : "-", pw_err_name(e), err);
    assert_int_equal(e, PW_OK);
    return tok;
}

static void test_exact_against_hf(void **state)
{
    (void)state;
    char model[600], py[600], cmd[2048], out_path[600], err[256];
    snprintf(py, sizeof py, "%s/.venv/bin/python", PW_SOURCE_DIR);
    struct stat st;
    if (!default_model(model, sizeof model) || stat(py, &st) != 0) {
        fprintf(stderr, "skipping: model or %s absent\n", py);
        skip();
    }
    snprintf(out_path, sizeof out_path, "%s/tokenizer_reference.tsv", PW_BINARY_DIR);
    snprintf(cmd, sizeof cmd,
             "PYTHONDONTWRITEBYTECODE=1 '%s' "
             "'%s/tests/tokenizer/reference.py' '%s' '%s'",
             py, PW_SOURCE_DIR, model, out_path);
    if (system(cmd) != 0) {
        fprintf(stderr, "skipping: reference.py failed (is the venv complete?)\n");
        skip();
    }
    struct engine_gguf *g = NULL;
    assert_int_equal(engine_gguf_open(model, &g, err, sizeof err), PW_OK);
    const char *pres[4] = {"smollm", "gpt2", "llama3", "qwen2"};
    struct engine_tokenizer *toks[4];
    toks[0] = load_model(g, NULL);
    assert_int_equal(engine_tokenizer_pre(toks[0]), ENGINE_TOK_PRE_SMOLLM);
    for (int i = 1; i < 4; i++)
        toks[i] = load_model(g, pres[i]);
    engine_gguf_destroy(g);

    FILE *f = fopen(out_path, "r");
    assert_non_null(f);
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    size_t n_lines = 0, n_ids_checked = 0, n_fail = 0, cap = 0;
    int32_t *ids = NULL, *want = NULL;
    char *dec = NULL;
    while ((len = getline(&line, &line_cap, f)) > 0) {
        if (line[len - 1] == '\n')
            line[--len] = '\0';
        char *fields[6];
        char *p = line;
        for (int i = 0; i < 6; i++) {
            fields[i] = p;
            p = strchr(p, '\t');
            if (i < 5) {
                assert_non_null(p);
                *p++ = '\0';
            }
        }
        int which = -1;
        for (int i = 0; i < 4; i++)
            if (strcmp(fields[0], pres[i]) == 0)
                which = i;
        assert_true(which >= 0);
        const struct engine_tokenizer *tok = toks[which];
        unsigned flags = (unsigned)atoi(fields[1]);
        size_t in_len = unhex(fields[2], strlen(fields[2]));
        size_t exp_len = unhex(fields[4], strlen(fields[4]));
        bool check_raw = strcmp(fields[5], "-") != 0;
        size_t raw_len = check_raw ? unhex(fields[5], strlen(fields[5])) : 0;
        if (in_len + 2 > cap) {
            cap = (in_len + 2) * 2;
            ids = realloc(ids, cap * sizeof *ids);
            want = realloc(want, cap * sizeof *want);
            dec = realloc(dec, cap * 4 + ENGINE_DETOK_OUT_MAX);
            assert_non_null(ids);
            assert_non_null(want);
            assert_non_null(dec);
        }
        size_t n = 0;
        assert_int_equal(
            engine_tokenizer_encode(tok, fields[2], in_len, flags, ids, in_len + 2, &n), PW_OK);
        n_lines++;
        bool ok = true;
        if (strcmp(fields[3], "-") != 0) {
            size_t nw = 0;
            for (char *q = fields[3]; *q;) {
                want[nw++] = (int32_t)strtol(q, &q, 10);
                while (*q == ' ')
                    q++;
            }
            n_ids_checked++;
            if (nw != n || memcmp(ids, want, n * sizeof *ids) != 0) {
                ok = false;
                if (n_fail < 8) {
                    fprintf(stderr,
                            "MISMATCH pre=%s input=\"%.*s\" (len %zu)\n  ours:", pres[which],
                            (int)(in_len < 80 ? in_len : 80), fields[2], in_len);
                    for (size_t i = 0; i < n && i < 30; i++)
                        fprintf(stderr, " %d", ids[i]);
                    fprintf(stderr, "\n  hf:  ");
                    for (size_t i = 0; i < nw && i < 30; i++)
                        fprintf(stderr, " %d", want[i]);
                    fprintf(stderr, "\n");
                }
            }
        }
        /* Raw decode restores the exact bytes. */
        size_t m = 0;
        if (check_raw) {
            assert_int_equal(engine_tokenizer_decode(tok, ids, n, 0, dec, cap * 4, &m), PW_OK);
            if (m != raw_len || memcmp(dec, fields[5], m) != 0) {
                ok = false;
                if (n_fail < 8)
                    fprintf(stderr, "ROUND TRIP pre=%s len=%zu got=%zu want=%zu\n", pres[which],
                            in_len, m, raw_len);
            }
        }
        /* The streaming detokenizer gives Hugging Face's (lossy) decode. */
        struct engine_detok d;
        engine_detok_init(&d, tok, 0);
        size_t o = 0, k;
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(engine_detok_push(&d, ids[i], dec + o, ENGINE_DETOK_OUT_MAX, &k),
                             PW_OK);
            assert_true(engine_utf8_valid((const uint8_t *)dec + o, k));
            o += k;
        }
        assert_int_equal(engine_detok_flush(&d, dec + o, ENGINE_DETOK_OUT_MAX, &k), PW_OK);
        o += k;
        if (o != exp_len || memcmp(dec, fields[4], o) != 0) {
            ok = false;
            if (n_fail < 8)
                fprintf(stderr, "DETOK pre=%s len=%zu got=%zu want=%zu\n", pres[which], in_len, o,
                        exp_len);
        }
        if (!ok)
            n_fail++;
    }
    fprintf(stderr, "tokenizer reference: %zu strings, %zu id lists compared, %zu failures\n",
            n_lines, n_ids_checked, n_fail);
    assert_true(n_lines >= 2000 * 4);
    assert_int_equal(n_fail, 0);
    free(line);
    free(ids);
    free(want);
    free(dec);
    fclose(f);
    for (int i = 0; i < 4; i++)
        engine_tokenizer_destroy(toks[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unicode_classes),
        cmocka_unit_test(test_utf8_maximal_subparts),
        cmocka_unit_test(test_bpe_merges_by_rank),
        cmocka_unit_test(test_special_tokens_only_on_request),
        cmocka_unit_test(test_invalid_utf8_round_trips),
        cmocka_unit_test(test_random_bytes_round_trip),
        cmocka_unit_test(test_caps),
        cmocka_unit_test(test_long_word_is_not_quadratic),
        cmocka_unit_test(test_detok_never_splits_characters),
        cmocka_unit_test(test_spm),
        cmocka_unit_test(test_exact_against_hf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

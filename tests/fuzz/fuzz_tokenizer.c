/*
 * fuzz_tokenizer: libFuzzer target for engine/engine_tokenizer.h. Prompts are untrusted
 * text, and the vocabulary comes from an untrusted model file, so both are fuzzed.
 *
 * The first byte b picks the case: b % 8 selects a tokenizer, the other bits flags.
 *   0..3  byte-level BPE over a generated vocabulary (all 256 bytes, merges building
 *         common words, digits, accented and CJK characters, two control tokens and one
 *         user-defined token), pre-tokenizer gpt2 / smollm / llama3 / qwen2;
 *   4     SentencePiece with all 256 <0xXX> byte tokens and space prefix;
 *   5     SentencePiece with few byte tokens (the <unk> path), no space prefix;
 *   6, 7  a vocabulary taken from the input itself (BPE and SPM), then fixed sample texts.
 * Bits 3..6 of b: ENGINE_TOK_PARSE_SPECIAL, ENGINE_TOK_ADD_BOS, ENGINE_TOK_DECODE_SPECIAL,
 * and fragments mode (text split at 0x01 bytes, a control token between fragments).
 *
 * Checks (tokenizers 0..5): encode into len + 2 ids always fits; every id is in range;
 * plain encode never yields a control token; one id less is PW_ERR_TOOBIG; decode of
 * encode is the input byte for byte (when the vocabulary covers every byte and the flags
 * allow it); a decode into a small buffer reports the full length; the streaming
 * detokenizer emits only whole UTF-8 characters and, concatenated, exactly the lossy
 * UTF-8 form (U+FFFD per maximal invalid subpart) of the whole decode.
 *
 * The replay main() is tests/fuzz/fuzz_replay.c (ctest, label fuzz-smoke).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_tokenizer.h"
#include "engine_unicode.h"
#include "pw_log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- building vocabularies ---------------------------------------------------------- */

#define VOCAB_MAX 1024
#define TEXT_MAX 32

struct vocab {
    char text[VOCAB_MAX][TEXT_MAX];
    struct engine_tok_str toks[VOCAB_MAX];
    int32_t types[VOCAB_MAX];
    float scores[VOCAB_MAX];
    char mtext[VOCAB_MAX][2 * TEXT_MAX + 1];
    struct engine_tok_str merges[VOCAB_MAX];
    uint32_t n, n_merges;
};

static int32_t find(const struct vocab *v, const char *s, size_t len)
{
    for (uint32_t i = 0; i < v->n; i++)
        if (v->toks[i].len == len && memcmp(v->toks[i].ptr, s, len) == 0)
            return (int32_t)i;
    return -1;
}

static int32_t add(struct vocab *v, const char *s, size_t len, int type, float score)
{
    int32_t have = find(v, s, len);
    if (have >= 0)
        return have;
    if (v->n == VOCAB_MAX || len >= TEXT_MAX)
        return -1;
    memcpy(v->text[v->n], s, len);
    v->toks[v->n] = (struct engine_tok_str){v->text[v->n], len};
    v->types[v->n] = type;
    v->scores[v->n] = score;
    return (int32_t)v->n++;
}

/* GPT-2's byte-to-unicode alphabet: printable bytes stand for themselves, the rest are
 * shifted to U+0100 and up, in byte order. */
static size_t gpt2_char(uint8_t b, char out[4])
{
    static uint32_t map[256];
    static bool ready;
    if (!ready) {
        uint32_t next = 256;
        for (int i = 0; i < 256; i++) {
            bool self = (i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174;
            map[i] = self ? (uint32_t)i : next++;
        }
        ready = true;
    }
    return engine_utf8_encode(map[b], (uint8_t *)out);
}

/* Adds the tokens and merges that build word (raw bytes) left to right. */
static void bpe_word(struct vocab *v, const char *word)
{
    char acc[TEXT_MAX];
    size_t alen = gpt2_char((uint8_t)word[0], acc);
    for (size_t i = 1; word[i]; i++) {
        char c[4];
        size_t cl = gpt2_char((uint8_t)word[i], c);
        if (alen + cl >= TEXT_MAX || v->n_merges == VOCAB_MAX)
            return;
        char *m = v->mtext[v->n_merges];
        memcpy(m, acc, alen);
        m[alen] = ' ';
        memcpy(m + alen + 1, c, cl);
        memcpy(acc + alen, c, cl);
        alen += cl;
        if (find(v, acc, alen) < 0) {
            v->merges[v->n_merges] = (struct engine_tok_str){m, alen + 1 + cl};
            v->n_merges++;
            add(v, acc, alen, ENGINE_TOK_TYPE_NORMAL, 0);
        }
    }
}

static const char *const words[] = {
    "the",
    " the",
    " and",
    "ing",
    " hello",
    "hello",
    " world",
    "world",
    "\n\n",
    "  ",
    "   ",
    "12",
    "123",
    "00",
    " 2024",
    "'s",
    "'t",
    "'re",
    "'ll",
    " a",
    "\xC3\xA9",
    " caf\xC3\xA9",
    "\xE4\xB8\xAD\xE6\x96\x87",
    "\xF0\x9F\x98\x80",
    "ab",
    "aaaa",
    " {",
    "\":",
    "\t",
    "<|",
    "|>",
    ".\n",
};

static struct engine_tokenizer *make_bpe(struct vocab *v, const char *pre)
{
    memset(v, 0, sizeof(*v));
    for (int b = 0; b < 256; b++) {
        char c[4];
        add(v, c, gpt2_char((uint8_t)b, c), ENGINE_TOK_TYPE_NORMAL, 0);
    }
    for (size_t i = 0; i < sizeof(words) / sizeof(words[0]); i++)
        bpe_word(v, words[i]);
    add(v, "<|end|>", 7, ENGINE_TOK_TYPE_CONTROL, 0);
    add(v, "<|im_start|>", 12, ENGINE_TOK_TYPE_CONTROL, 0);
    add(v, "<u>", 3, ENGINE_TOK_TYPE_USER_DEFINED, 0);
    struct engine_tokenizer_config cfg = {
        .model = ENGINE_TOK_MODEL_BPE,
        .pre = pre,
        .n_vocab = v->n,
        .tokens = v->toks,
        .types = v->types,
        .n_merges = v->n_merges,
        .merges = v->merges,
        .bos_id = find(v, "<|im_start|>", 12),
        .eos_id = find(v, "<|end|>", 7),
        .unk_id = -1,
        .add_bos = true,
    };
    struct engine_tokenizer *tok = NULL;
    char err[128];
    if (engine_tokenizer_create(&cfg, &tok, err, sizeof(err)) != PW_OK) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err);
        abort();
    }
    return tok;
}

#define SP "\xE2\x96\x81" /* U+2581, SentencePiece's space */

static struct engine_tokenizer *make_spm(struct vocab *v, bool all_bytes)
{
    static const char *const pieces[] = {
        SP,
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "a",
        "t",
        "1",
        "2",
        SP "h",
        "ll",
        SP "he",
        "llo",
        SP "hello",
        SP "world",
        "wor",
        "ld",
        SP "the",
        "th",
        "\xE4\xB8\xAD",
        SP SP,
        "\xC3\xA9",
    };
    memset(v, 0, sizeof(*v));
    add(v, "<unk>", 5, ENGINE_TOK_TYPE_UNKNOWN, 0);
    add(v, "<s>", 3, ENGINE_TOK_TYPE_CONTROL, 0);
    add(v, "</s>", 4, ENGINE_TOK_TYPE_CONTROL, 0);
    for (int b = 0; b < 256; b++) {
        if (!all_bytes && b != 'A' && b != 0xE4 && b != 0xB8 && b != 0xAD && b != ' ')
            continue;
        char s[8];
        snprintf(s, sizeof(s), "<0x%02X>", b);
        add(v, s, 6, ENGINE_TOK_TYPE_BYTE, 0);
    }
    for (size_t i = 0; i < sizeof(pieces) / sizeof(pieces[0]); i++)
        add(v, pieces[i], strlen(pieces[i]), ENGINE_TOK_TYPE_NORMAL,
            -(float)(i % 7) - (float)strlen(pieces[i]) * 0.1f);
    add(v, "<u>", 3, ENGINE_TOK_TYPE_USER_DEFINED, 0);
    struct engine_tokenizer_config cfg = {
        .model = ENGINE_TOK_MODEL_SPM,
        .n_vocab = v->n,
        .tokens = v->toks,
        .types = v->types,
        .scores = v->scores,
        .bos_id = 1,
        .eos_id = 2,
        .unk_id = 0,
        .add_bos = true,
        .add_space_prefix = all_bytes,
    };
    struct engine_tokenizer *tok = NULL;
    char err[128];
    if (engine_tokenizer_create(&cfg, &tok, err, sizeof(err)) != PW_OK) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err);
        abort();
    }
    return tok;
}

/* ---- checks ------------------------------------------------------------------------- */

/* Lossy UTF-8: each maximal invalid subpart becomes U+FFFD. out needs 3 * len bytes. */
static size_t lossy(const char *in, size_t len, char *out)
{
    size_t o = 0, i = 0;
    while (i < len) {
        uint32_t cp;
        size_t k = engine_utf8_next((const uint8_t *)in + i, len - i, &cp, NULL);
        if (cp == ENGINE_UTF8_INVALID) {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
        } else {
            memcpy(out + o, in + i, k);
            o += k;
        }
        i += k;
    }
    return o;
}

/* Decodes ids whole and token by token; the stream must be the lossy form of the whole. */
static void check_decode(const struct engine_tokenizer *tok, const int32_t *ids, size_t n,
                         unsigned dflags, const char *expect, size_t expect_len)
{
    size_t need = 0;
    char small[4];
    enum pw_err rc = engine_tokenizer_decode(tok, ids, n, dflags, small, sizeof(small), &need);
    if (rc != PW_OK && rc != PW_ERR_TOOBIG)
        abort();
    if ((rc == PW_ERR_TOOBIG) != (need > sizeof(small)))
        abort();
    char *whole = malloc(need ? need : 1);
    char *lw = malloc(3 * need + 1);
    char *streamed = malloc(3 * need + 16);
    if (!whole || !lw || !streamed)
        abort();
    size_t got = 0;
    if (engine_tokenizer_decode(tok, ids, n, dflags, whole, need, &got) != PW_OK || got != need)
        abort();
    if (expect && (got != expect_len || memcmp(whole, expect, got) != 0)) {
        fprintf(stderr, "fuzz_tokenizer: decode(encode(s)) != s (%zu vs %zu bytes)\n", got,
                expect_len);
        abort();
    }
    size_t nl = lossy(whole, got, lw);

    struct engine_detok d;
    engine_detok_init(&d, tok, dflags);
    size_t ns = 0;
    static char delta[ENGINE_DETOK_OUT_MAX];
    for (size_t i = 0; i <= n; i++) {
        size_t k = 0;
        rc = i < n ? engine_detok_push(&d, ids[i], delta, sizeof(delta), &k)
                   : engine_detok_flush(&d, delta, sizeof(delta), &k);
        if (rc != PW_OK || !engine_utf8_valid((const uint8_t *)delta, k))
            abort();
        if (ns + k > 3 * need + 16)
            abort();
        memcpy(streamed + ns, delta, k);
        ns += k;
    }
    if (ns != nl || memcmp(streamed, lw, nl) != 0) {
        fprintf(stderr, "fuzz_tokenizer: streamed %zu bytes, lossy whole %zu\n", ns, nl);
        abort();
    }
    free(streamed);
    free(lw);
    free(whole);
}

static void check_ids(const struct engine_tokenizer *tok, const int32_t *ids, size_t n,
                      unsigned flags)
{
    uint32_t nv = engine_tokenizer_n_vocab(tok);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= nv)
            abort();
        bool bos = i == 0 && (flags & ENGINE_TOK_ADD_BOS) && ids[i] == engine_tokenizer_bos(tok);
        /* Control tokens come only from PARSE_SPECIAL (or the BOS asked for); <unk> is
         * the SentencePiece fallback and may appear anywhere. */
        if (!(flags & ENGINE_TOK_PARSE_SPECIAL) && !bos &&
            engine_tokenizer_type(tok, ids[i]) == ENGINE_TOK_TYPE_CONTROL)
            abort();
    }
}

static void run_text(const struct engine_tokenizer *tok, const char *text, size_t len,
                     unsigned flags, unsigned dflags, bool exact_bytes)
{
    size_t cap = len + 2, n = 0;
    int32_t *ids = malloc(cap * sizeof(*ids));
    if (!ids)
        abort();
    enum pw_err rc = engine_tokenizer_encode(tok, text, len, flags, ids, cap, &n);
    if (rc != PW_OK || n > cap) {
        fprintf(stderr, "fuzz_tokenizer: encode of %zu bytes: %s, %zu ids\n", len, pw_err_name(rc),
                n);
        abort();
    }
    check_ids(tok, ids, n, flags);
    if (n > 0) {
        size_t n2 = 0;
        if (engine_tokenizer_encode(tok, text, len, flags, ids, n - 1, &n2) != PW_ERR_TOOBIG)
            abort();
        if (engine_tokenizer_encode(tok, text, len, flags, ids, cap, &n2) != PW_OK || n2 != n)
            abort();
    }
    /* decode(encode(s)) == s: control tokens only round-trip when decoded with their text,
     * and SentencePiece's prefix space only when no special token precedes the text. */
    bool round = exact_bytes;
    if (flags & ENGINE_TOK_PARSE_SPECIAL) {
        round = round && (dflags & ENGINE_TOK_DECODE_SPECIAL) && !(flags & ENGINE_TOK_ADD_BOS) &&
                engine_tokenizer_model(tok) == ENGINE_TOK_MODEL_BPE;
    } else if (dflags & ENGINE_TOK_DECODE_SPECIAL) {
        round = round && !(flags & ENGINE_TOK_ADD_BOS);
    }
    /* SentencePiece puts a prefix space on the text after any token fragment (user-defined
     * ones too, as llama.cpp does), which decode keeps: no exact round trip then. */
    if (engine_tokenizer_model(tok) == ENGINE_TOK_MODEL_SPM) {
        /* A literal U+2581 in the text is a space to SentencePiece, in every tokenizer. */
        if (memmem(text, len, "\xE2\x96\x81", 3))
            round = false;
        for (size_t i = 0; i < n; i++) {
            int t = engine_tokenizer_type(tok, ids[i]);
            if (t == ENGINE_TOK_TYPE_USER_DEFINED || t == ENGINE_TOK_TYPE_CONTROL)
                round = false;
        }
    }
    check_decode(tok, ids, n, dflags, round ? text : NULL, len);
    free(ids);
}

/* Fragments: text split at 0x01, a control token between pieces. */
static void run_frags(const struct engine_tokenizer *tok, const char *text, size_t len,
                      unsigned flags, unsigned dflags, int32_t sep_id)
{
    struct engine_tok_frag frags[64];
    size_t nf = 0, start = 0;
    for (size_t i = 0; i <= len && nf + 2 <= 64; i++) {
        if (i == len || text[i] == '\x01') {
            frags[nf++] = (struct engine_tok_frag){-1, text + start, i - start};
            if (i < len)
                frags[nf++] = (struct engine_tok_frag){sep_id, NULL, 0};
            start = i + 1;
        }
    }
    size_t cap = len + 2 + nf, n = 0;
    int32_t *ids = malloc(cap * sizeof(*ids));
    if (!ids)
        abort();
    if (engine_tokenizer_encode_frags(tok, frags, nf, flags, ids, cap, &n) != PW_OK)
        abort();
    uint32_t nv = engine_tokenizer_n_vocab(tok);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= nv)
            abort();
    check_decode(tok, ids, n, dflags, NULL, 0);
    free(ids);
}

/* ---- a vocabulary from the input ---------------------------------------------------- */

/*
 * Lines split at '\n'. A line starting with 0xFE is a merge rule (the rest of the line);
 * any other line is a token whose first byte % 7 is its type (0 = normal) and whose
 * score is minus its position. BPE gets the 256 byte tokens first so most inputs build.
 */
static void run_vocab(bool spm, const uint8_t *p, size_t len, unsigned flags, unsigned dflags)
{
    static struct vocab v;
    memset(&v, 0, sizeof(v));
    if (!spm) {
        for (int b = 0; b < 256; b++) {
            char c[4];
            add(&v, c, gpt2_char((uint8_t)b, c), ENGINE_TOK_TYPE_NORMAL, 0);
        }
    }
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && p[i] != '\n')
            continue;
        const char *line = (const char *)p + start;
        size_t ll = i - start;
        start = i + 1;
        if (ll == 0)
            continue;
        if ((uint8_t)line[0] == 0xFE) {
            if (ll - 1 <= 2 * TEXT_MAX && v.n_merges < VOCAB_MAX) {
                memcpy(v.mtext[v.n_merges], line + 1, ll - 1);
                v.merges[v.n_merges] = (struct engine_tok_str){v.mtext[v.n_merges], ll - 1};
                v.n_merges++;
            }
        } else if (v.n < VOCAB_MAX && ll - 1 < TEXT_MAX) {
            /* Duplicates are kept on purpose: the tokenizer must cope with them. */
            int type = (uint8_t)line[0] % 7;
            memcpy(v.text[v.n], line + 1, ll - 1);
            v.toks[v.n] = (struct engine_tok_str){v.text[v.n], ll - 1};
            v.types[v.n] = type ? type : ENGINE_TOK_TYPE_NORMAL;
            v.scores[v.n] = -(float)v.n;
            v.n++;
        }
    }
    if (v.n == 0)
        return;
    struct engine_tokenizer_config cfg = {
        .model = spm ? ENGINE_TOK_MODEL_SPM : ENGINE_TOK_MODEL_BPE,
        .pre = spm ? NULL : "llama3",
        .n_vocab = v.n,
        .tokens = v.toks,
        .types = v.types,
        .scores = v.scores,
        .n_merges = v.n_merges,
        .merges = v.merges,
        .bos_id = v.n > 1 ? 1 : -1,
        .eos_id = v.n > 2 ? 2 : -1,
        .unk_id = 0,
        .add_bos = true,
        .add_space_prefix = spm,
    };
    struct engine_tokenizer *tok = NULL;
    char err[128];
    err[0] = '\0';
    if (engine_tokenizer_create(&cfg, &tok, err, sizeof(err)) != PW_OK) {
        if (tok != NULL)
            abort();
        return;
    }
    static const char *const samples[] = {
        "hello world",
        " the  12345 caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87!",
        "<|end|><s>x<u>",
        "\xFF\xC3 \xF0\x9F\x98",
        "",
    };
    for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
        const char *s = samples[i];
        size_t sl = strlen(s), n = 0;
        int32_t ids[64];
        if (engine_tokenizer_encode(tok, s, sl, flags, ids, 64, &n) != PW_OK)
            abort();
        check_ids(tok, ids, n, flags | ENGINE_TOK_PARSE_SPECIAL);
        check_decode(tok, ids, n, dflags, NULL, 0);
    }
    /* Some ids as the sampler could emit them, each id in range. */
    int32_t all[64];
    size_t na = 0;
    for (uint32_t i = 0; i < v.n && na < 64; i += 1 + v.n / 64)
        all[na++] = (int32_t)i;
    check_decode(tok, all, na, dflags, NULL, 0);
    (void)engine_tokenizer_special_id(tok, "<s>", 3);
    engine_tokenizer_destroy(tok);
}

/* ---- entry -------------------------------------------------------------------------- */

static struct engine_tokenizer *toks[6];

static void init_once(void)
{
    static struct vocab v; /* scratch: create copies what it keeps */
    static const char *const pres[4] = {"gpt2", "smollm", "llama3", "qwen2"};
    if (toks[0])
        return;
    /* A fuzzed vocabulary logs on every input (skipped merges, missing bytes). */
    pw_log_set_level(PW_LOG_LEVEL_OFF);
    for (int i = 0; i < 4; i++)
        toks[i] = make_bpe(&v, pres[i]);
    toks[4] = make_spm(&v, true);
    toks[5] = make_spm(&v, false);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    init_once();
    uint8_t b = data[0];
    unsigned which = b % 8;
    unsigned flags =
        ((b >> 3) & 1 ? ENGINE_TOK_PARSE_SPECIAL : 0) | ((b >> 4) & 1 ? ENGINE_TOK_ADD_BOS : 0);
    unsigned dflags = (b >> 5) & 1 ? ENGINE_TOK_DECODE_SPECIAL : 0;
    bool frag_mode = (b >> 6) & 1;
    /* Exact-size copy so a read past the text hits the redzone. */
    size_t len = size - 1;
    char *text = malloc(len ? len : 1);
    if (!text)
        return 0;
    memcpy(text, data + 1, len);
    if (which >= 6) {
        run_vocab(which == 7, (const uint8_t *)text, len, flags, dflags);
    } else if (frag_mode) {
        run_frags(toks[which], text, len, flags, dflags, engine_tokenizer_eos(toks[which]));
    } else {
        /* Tokenizer 5 lacks most byte tokens: no exact round trip there. */
        run_text(toks[which], text, len, flags, dflags, which != 5);
    }
    free(text);
    return 0;
}

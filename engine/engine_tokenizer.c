/*
 * engine_tokenizer: byte-level BPE and SentencePiece BPE over a GGUF vocabulary.
 *
 * Load builds, once:
 *   - for every token two byte strings in one arena each: its "key" (what encoding
 *     matches: the raw bytes for byte-level BPE, the U+2581 text for SentencePiece) and its
 *     "piece" (what decoding emits);
 *   - an open-addressing hash key -> id (linear probing, stored 32-bit hashes so a probe
 *     compares bytes only on a hash hit);
 *   - for byte-level BPE an open-addressing hash (left id, right id) -> (rank, result id);
 *   - the table byte -> id of the single-byte tokens (BPE) or <0xXX> tokens (SPM);
 *   - the special texts (control, unknown, user-defined) bucketed by first byte.
 * After load the object is read-only; encode allocates its own scratch per call.
 *
 * Pre-tokenizers are the Hugging Face regexes written out by hand over code-point classes
 * (engine_unicode), with the regex engine's first-alternative-wins and backtracking
 * behaviour reproduced; each function's comment gives the regex it implements.
 */
#include "engine_tokenizer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_gguf.h"
#include "engine_unicode.h"
#include "pw_log.h"

struct span {
    uint32_t off; /* into the arena */
    uint32_t len; /* bytes */
};

struct merge_slot {
    uint64_t pair;   /* (left id << 32) | right id */
    uint32_t rank;   /* UINT32_MAX = empty slot */
    uint32_t result; /* id of the merged token */
};

struct engine_tokenizer {
    enum engine_tok_model model;
    enum engine_tok_pre pre;
    uint32_t n_vocab;
    int32_t bos_id, eos_id, unk_id; /* -1 = none */
    bool add_bos;
    bool add_space_prefix;
    bool ignore_merges; /* llama3: a piece that is a whole token is taken as is */

    uint8_t *types; /* (n_vocab) enum engine_tok_type */
    float *scores;  /* (n_vocab) SPM merge priority */
    struct span *keys;
    char *key_arena;
    struct span *pieces;
    char *piece_arena;

    uint32_t *slot_id;   /* (tok_mask + 1) id + 1, 0 = empty */
    uint32_t *slot_hash; /* (tok_mask + 1) hash of the key in the slot */
    size_t tok_mask;

    struct merge_slot *merges; /* (merge_mask + 1); NULL for SPM */
    size_t merge_mask;
    uint32_t n_merges; /* rules accepted */

    int32_t byte_id[256]; /* single-byte token (BPE) or <0xXX> token (SPM); -1 = none */

    /* Special texts for matching inside input, by first byte, longest first. */
    uint32_t *sp_ids;       /* ids of control/unknown/user-defined tokens */
    uint32_t sp_start[257]; /* bucket b is sp_ids[sp_start[b] .. sp_start[b+1]) */
    bool has_user_defined;  /* user-defined texts are matched even without the flag */
};

static void errf(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void errf(char *buf, size_t cap, const char *fmt, ...)
{
    if (!buf || cap == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
}

/* FNV-1a, folded; keys are short token texts. */
static uint32_t hash_bytes(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 16777619u;
    }
    return h ^ (h >> 15);
}

static uint64_t hash_pair(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n)
        p <<= 1;
    return p;
}

/* -------------------------------------------------------------------------------------- */
/* Lookups                                                                                 */

static int32_t lookup_key(const struct engine_tokenizer *tok, const void *key, size_t len)
{
    uint32_t h = hash_bytes(key, len);
    for (size_t i = h & tok->tok_mask;; i = (i + 1) & tok->tok_mask) {
        uint32_t v = tok->slot_id[i];
        if (v == 0)
            return -1;
        if (tok->slot_hash[i] != h)
            continue;
        const struct span *k = &tok->keys[v - 1];
        if (k->len == len && memcmp(tok->key_arena + k->off, key, len) == 0)
            return (int32_t)(v - 1);
    }
}

/* Inserts id under its key unless the key is taken (the first id wins). */
static void insert_key(struct engine_tokenizer *tok, uint32_t id)
{
    const struct span *k = &tok->keys[id];
    const char *key = tok->key_arena + k->off;
    if (lookup_key(tok, key, k->len) >= 0)
        return;
    uint32_t h = hash_bytes(key, k->len);
    size_t i = h & tok->tok_mask;
    while (tok->slot_id[i] != 0)
        i = (i + 1) & tok->tok_mask;
    tok->slot_id[i] = id + 1;
    tok->slot_hash[i] = h;
}

static const struct merge_slot *lookup_merge(const struct engine_tokenizer *tok, int32_t a,
                                             int32_t b)
{
    uint64_t pair = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t i = hash_pair(pair) & tok->merge_mask;; i = (i + 1) & tok->merge_mask) {
        const struct merge_slot *s = &tok->merges[i];
        if (s->rank == UINT32_MAX)
            return NULL;
        if (s->pair == pair)
            return s;
    }
}

/* -------------------------------------------------------------------------------------- */
/* Load                                                                                    */

/* GPT-2's byte <-> code point alphabet: printable Latin-1 maps to itself, the other 68
 * bytes to U+0100.. in byte order. unicode_to_byte[cp] = byte, or -1. */
static void gpt2_alphabet(int16_t unicode_to_byte[324])
{
    for (int i = 0; i < 324; i++)
        unicode_to_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        if (self)
            unicode_to_byte[b] = (int16_t)b;
        else
            unicode_to_byte[256 + n++] = (int16_t)b;
    }
}

/* Decodes a token in the GPT-2 alphabet to raw bytes into out (cap >= len); false if the
 * text has a character outside the alphabet. */
static bool gpt2_unmap(const int16_t u2b[324], const char *text, size_t len, char *out,
                       size_t *n_out)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0, n = 0;
    while (i < len) {
        uint32_t cp;
        i += engine_utf8_next(s + i, len - i, &cp, NULL);
        if (cp >= 324 || u2b[cp] < 0)
            return false;
        out[n++] = (char)u2b[cp];
    }
    *n_out = n;
    return true;
}

static bool parse_byte_token(const char *t, size_t len, uint8_t *b)
{
    /* "<0xAB>" */
    if (len != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>')
        return false;
    unsigned v = 0;
    for (int i = 3; i < 5; i++) {
        char c = t[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else
            return false;
        v = v * 16 + d;
    }
    *b = (uint8_t)v;
    return true;
}

static bool is_special_type(int t)
{
    return t == ENGINE_TOK_TYPE_CONTROL || t == ENGINE_TOK_TYPE_UNKNOWN;
}

static const struct {
    const char *name;
    enum engine_tok_pre pre;
} pre_names[] = {
    {"default", ENGINE_TOK_PRE_GPT2},           {"gpt2", ENGINE_TOK_PRE_GPT2},
    {"smollm", ENGINE_TOK_PRE_SMOLLM},          {"starcoder", ENGINE_TOK_PRE_SMOLLM},
    {"refact", ENGINE_TOK_PRE_SMOLLM},          {"codeshell", ENGINE_TOK_PRE_SMOLLM},
    {"llama3", ENGINE_TOK_PRE_LLAMA3},          {"llama-bpe", ENGINE_TOK_PRE_LLAMA3},
    {"llama-v3", ENGINE_TOK_PRE_LLAMA3},        {"qwen2", ENGINE_TOK_PRE_QWEN2},
    {"deepseek-r1-qwen", ENGINE_TOK_PRE_QWEN2}, {"none", ENGINE_TOK_PRE_NONE},
};

bool engine_tokenizer_pre_parse(const char *name, enum engine_tok_pre *out)
{
    for (size_t i = 0; i < sizeof pre_names / sizeof pre_names[0]; i++) {
        if (strcmp(pre_names[i].name, name) == 0) {
            *out = pre_names[i].pre;
            return true;
        }
    }
    return false;
}

const char *engine_tokenizer_pre_name(enum engine_tok_pre pre)
{
    switch (pre) {
    case ENGINE_TOK_PRE_GPT2:
        return "gpt2";
    case ENGINE_TOK_PRE_SMOLLM:
        return "smollm";
    case ENGINE_TOK_PRE_LLAMA3:
        return "llama3";
    case ENGINE_TOK_PRE_QWEN2:
        return "qwen2";
    case ENGINE_TOK_PRE_NONE:
        return "none";
    }
    return "unknown";
}

void engine_tokenizer_destroy(struct engine_tokenizer *tok)
{
    if (!tok)
        return;
    free(tok->types);
    free(tok->scores);
    free(tok->keys);
    free(tok->key_arena);
    free(tok->pieces);
    free(tok->piece_arena);
    free(tok->slot_id);
    free(tok->slot_hash);
    free(tok->merges);
    free(tok->sp_ids);
    free(tok);
}

static int sp_cmp_len_desc(const void *a, const void *b, void *ctx);

/* qsort with context is not C11; the special list is short, so insertion sort it. */
static void sort_specials(const struct engine_tokenizer *tok, uint32_t *ids, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint32_t v = ids[i];
        size_t j = i;
        while (j > 0 && sp_cmp_len_desc(&ids[j - 1], &v, (void *)tok) > 0) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = v;
    }
}

/* Orders by first byte, then longest text first (so the first match is the longest). */
static int sp_cmp_len_desc(const void *a, const void *b, void *ctx)
{
    const struct engine_tokenizer *tok = ctx;
    const struct span *x = &tok->pieces[*(const uint32_t *)a];
    const struct span *y = &tok->pieces[*(const uint32_t *)b];
    uint8_t fx = (uint8_t)tok->piece_arena[x->off], fy = (uint8_t)tok->piece_arena[y->off];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return 0;
}

static enum pw_err build_merges(struct engine_tokenizer *tok,
                                const struct engine_tokenizer_config *cfg, const int16_t u2b[324],
                                char *errbuf, size_t errcap)
{
    size_t cap = pow2_at_least((size_t)cfg->n_merges * 2 + 1);
    tok->merges = malloc(cap * sizeof *tok->merges);
    if (!tok->merges)
        return PW_ERR_NOMEM;
    tok->merge_mask = cap - 1;
    for (size_t i = 0; i < cap; i++)
        tok->merges[i].rank = UINT32_MAX;

    char buf[2 * ENGINE_TOK_MAX_TOKEN_BYTES];
    uint32_t skipped = 0;
    for (uint32_t r = 0; r < cfg->n_merges; r++) {
        const struct engine_tok_str *m = &cfg->merges[r];
        const char *sp = m->len ? memchr(m->ptr, ' ', m->len) : NULL;
        if (!sp || m->len > sizeof buf) {
            errf(errbuf, errcap, "merge %u: not \"left right\"", r);
            return PW_ERR_PARSE;
        }
        size_t la = (size_t)(sp - m->ptr), lb = m->len - la - 1;
        size_t na, nb;
        if (!gpt2_unmap(u2b, m->ptr, la, buf, &na) || !gpt2_unmap(u2b, sp + 1, lb, buf + na, &nb)) {
            skipped++;
            continue;
        }
        int32_t a = lookup_key(tok, buf, na), b = lookup_key(tok, buf + na, nb);
        int32_t c = lookup_key(tok, buf, na + nb);
        if (a < 0 || b < 0 || c < 0) {
            skipped++;
            continue;
        }
        uint64_t pair = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        size_t i = hash_pair(pair) & tok->merge_mask;
        bool dup = false;
        while (tok->merges[i].rank != UINT32_MAX) {
            if (tok->merges[i].pair == pair) {
                dup = true; /* the earlier (better) rank stays */
                break;
            }
            i = (i + 1) & tok->merge_mask;
        }
        if (dup)
            continue;
        tok->merges[i] = (struct merge_slot){.pair = pair, .rank = r, .result = (uint32_t)c};
        tok->n_merges++;
    }
    if (skipped)
        PW_LOG_WARN("event=tokenizer_merges_skipped count=%u reason=token_not_in_vocab", skipped);
    return PW_OK;
}

enum pw_err engine_tokenizer_create(const struct engine_tokenizer_config *cfg,
                                    struct engine_tokenizer **out, char *errbuf, size_t errcap)
{
    enum pw_err err = PW_OK;
    struct engine_tokenizer *tok = NULL;
    *out = NULL;
    if (errbuf && errcap)
        errbuf[0] = '\0';

    if (cfg->n_vocab == 0 || !cfg->tokens) {
        errf(errbuf, errcap, "tokenizer: empty vocabulary");
        return PW_ERR_PARSE;
    }
    if (cfg->n_vocab > ENGINE_TOK_MAX_VOCAB) {
        errf(errbuf, errcap, "tokenizer: %u tokens, over the cap of %u", cfg->n_vocab,
             ENGINE_TOK_MAX_VOCAB);
        return PW_ERR_TOOBIG;
    }
    if (cfg->n_merges > ENGINE_TOK_MAX_MERGES) {
        errf(errbuf, errcap, "tokenizer: %u merges, over the cap of %u", cfg->n_merges,
             ENGINE_TOK_MAX_MERGES);
        return PW_ERR_TOOBIG;
    }
    if (cfg->model != ENGINE_TOK_MODEL_BPE && cfg->model != ENGINE_TOK_MODEL_SPM) {
        errf(errbuf, errcap, "tokenizer: unknown model %d", (int)cfg->model);
        return PW_ERR_UNSUPPORTED;
    }

    tok = calloc(1, sizeof *tok);
    if (!tok)
        return PW_ERR_NOMEM;
    tok->model = cfg->model;
    tok->n_vocab = cfg->n_vocab;
    tok->add_bos = cfg->add_bos;
    tok->add_space_prefix = cfg->model == ENGINE_TOK_MODEL_SPM && cfg->add_space_prefix;
    if (cfg->model == ENGINE_TOK_MODEL_SPM) {
        tok->pre = ENGINE_TOK_PRE_NONE;
    } else {
        const char *pre = cfg->pre ? cfg->pre : "default";
        if (!engine_tokenizer_pre_parse(pre, &tok->pre) || tok->pre == ENGINE_TOK_PRE_NONE) {
            errf(errbuf, errcap, "tokenizer: unsupported pre-tokenizer \"%.64s\"", pre);
            err = PW_ERR_UNSUPPORTED;
            goto out;
        }
        tok->ignore_merges = tok->pre == ENGINE_TOK_PRE_LLAMA3;
    }
    uint32_t n = cfg->n_vocab;
    int32_t ids[3] = {cfg->bos_id, cfg->eos_id, cfg->unk_id};
    for (int i = 0; i < 3; i++) {
        if (ids[i] < -1 || ids[i] >= (int32_t)n) {
            errf(errbuf, errcap, "tokenizer: special token id %d out of range", ids[i]);
            err = PW_ERR_PARSE;
            goto out;
        }
    }
    tok->bos_id = cfg->bos_id;
    tok->eos_id = cfg->eos_id;
    tok->unk_id = cfg->unk_id;

    tok->types = malloc(n);
    tok->scores = malloc((size_t)n * sizeof *tok->scores);
    tok->keys = malloc((size_t)n * sizeof *tok->keys);
    tok->pieces = malloc((size_t)n * sizeof *tok->pieces);
    size_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (cfg->tokens[i].len > ENGINE_TOK_MAX_TOKEN_BYTES) {
            errf(errbuf, errcap, "tokenizer: token %u is %zu bytes, over the cap of %u", i,
                 cfg->tokens[i].len, ENGINE_TOK_MAX_TOKEN_BYTES);
            err = PW_ERR_TOOBIG;
            goto out;
        }
        total += cfg->tokens[i].len;
    }
    /* Keys and pieces never grow a token's text (unmapping shrinks, ▁ -> ' ' shrinks). */
    tok->key_arena = malloc(total ? total : 1);
    tok->piece_arena = malloc(total ? total : 1);
    size_t slots = pow2_at_least((size_t)n * 2);
    tok->slot_id = calloc(slots, sizeof *tok->slot_id);
    tok->slot_hash = malloc(slots * sizeof *tok->slot_hash);
    if (!tok->types || !tok->scores || !tok->keys || !tok->pieces || !tok->key_arena ||
        !tok->piece_arena || !tok->slot_id || !tok->slot_hash) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    tok->tok_mask = slots - 1;
    for (int b = 0; b < 256; b++)
        tok->byte_id[b] = -1;

    int16_t u2b[324];
    gpt2_alphabet(u2b);
    size_t koff = 0, poff = 0;
    size_t n_sp = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct engine_tok_str *t = &cfg->tokens[i];
        int type = cfg->types ? cfg->types[i] : ENGINE_TOK_TYPE_NORMAL;
        if (type < ENGINE_TOK_TYPE_NORMAL || type > ENGINE_TOK_TYPE_BYTE)
            type = ENGINE_TOK_TYPE_NORMAL;
        tok->types[i] = (uint8_t)type;
        tok->scores[i] = cfg->scores ? cfg->scores[i] : 0.0f;
        char *key = tok->key_arena + koff, *piece = tok->piece_arena + poff;
        size_t klen = 0, plen = 0;
        uint8_t byte;
        if (cfg->model == ENGINE_TOK_MODEL_BPE) {
            if (type == ENGINE_TOK_TYPE_NORMAL && gpt2_unmap(u2b, t->ptr, t->len, key, &klen)) {
                memcpy(piece, key, klen);
                plen = klen;
            } else {
                if (!gpt2_unmap(u2b, t->ptr, t->len, key, &klen)) {
                    memcpy(key, t->ptr, t->len);
                    klen = t->len;
                }
                memcpy(piece, t->ptr, t->len);
                plen = t->len;
            }
        } else {
            if (t->len)
                memcpy(key, t->ptr, t->len);
            klen = t->len;
            if (type == ENGINE_TOK_TYPE_BYTE && parse_byte_token(t->ptr, t->len, &byte)) {
                piece[0] = (char)byte;
                plen = 1;
                if (tok->byte_id[byte] < 0)
                    tok->byte_id[byte] = (int32_t)i;
            } else if (is_special_type(type)) {
                memcpy(piece, t->ptr, t->len);
                plen = t->len;
            } else {
                for (size_t j = 0; j < t->len; j++) {
                    if (j + 2 < t->len && (uint8_t)t->ptr[j] == 0xE2 &&
                        (uint8_t)t->ptr[j + 1] == 0x96 && (uint8_t)t->ptr[j + 2] == 0x81) {
                        piece[plen++] = ' ';
                        j += 2;
                    } else {
                        piece[plen++] = t->ptr[j];
                    }
                }
            }
        }
        tok->keys[i] = (struct span){(uint32_t)koff, (uint32_t)klen};
        tok->pieces[i] = (struct span){(uint32_t)poff, (uint32_t)plen};
        koff += klen;
        poff += plen;
        if ((is_special_type(type) || type == ENGINE_TOK_TYPE_USER_DEFINED) && plen > 0)
            n_sp++;
        if (type == ENGINE_TOK_TYPE_USER_DEFINED)
            tok->has_user_defined = true;
    }
    /* Normal tokens own their keys; the others only take keys nobody has. */
    for (uint32_t i = 0; i < n; i++)
        if (tok->types[i] == ENGINE_TOK_TYPE_NORMAL)
            insert_key(tok, i);
    for (uint32_t i = 0; i < n; i++)
        if (tok->types[i] != ENGINE_TOK_TYPE_NORMAL)
            insert_key(tok, i);

    tok->sp_ids = malloc((n_sp ? n_sp : 1) * sizeof *tok->sp_ids);
    if (!tok->sp_ids) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    size_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        int type = tok->types[i];
        if ((is_special_type(type) || type == ENGINE_TOK_TYPE_USER_DEFINED) &&
            tok->pieces[i].len > 0)
            tok->sp_ids[k++] = i;
    }
    sort_specials(tok, tok->sp_ids, n_sp);
    memset(tok->sp_start, 0, sizeof tok->sp_start);
    for (size_t i = 0; i < n_sp; i++)
        tok->sp_start[(uint8_t)tok->piece_arena[tok->pieces[tok->sp_ids[i]].off] + 1]++;
    for (int b = 0; b < 256; b++)
        tok->sp_start[b + 1] += tok->sp_start[b];

    if (cfg->model == ENGINE_TOK_MODEL_BPE) {
        /* A byte without a token is dropped from the input, as Hugging Face's BPE (no
         * unk_token) and llama.cpp do; SmolLM2 lacks 21 (0x04, 0xC0, 0xFF, ...). */
        int missing = 0;
        for (int b = 0; b < 256; b++) {
            char c = (char)b;
            tok->byte_id[b] = lookup_key(tok, &c, 1);
            missing += tok->byte_id[b] < 0;
        }
        if (missing == 256) {
            errf(errbuf, errcap, "tokenizer: no single-byte tokens");
            err = PW_ERR_PARSE;
            goto out;
        }
        if (missing)
            PW_LOG_INFO("event=tokenizer_bytes_without_token count=%d effect=dropped", missing);
        if (cfg->n_merges && !cfg->merges) {
            err = PW_ERR_INVAL;
            goto out;
        }
        err = build_merges(tok, cfg, u2b, errbuf, errcap);
        if (err)
            goto out;
    }
    PW_LOG_INFO("event=tokenizer_load model=%s pre=%s n_vocab=%u n_merges=%u bos=%d eos=%d",
                tok->model == ENGINE_TOK_MODEL_BPE ? "gpt2" : "llama",
                engine_tokenizer_pre_name(tok->pre), tok->n_vocab, tok->n_merges, tok->bos_id,
                tok->eos_id);
    *out = tok;
    tok = NULL;
out:
    if (err == PW_ERR_NOMEM)
        errf(errbuf, errcap, "tokenizer: out of memory");
    engine_tokenizer_destroy(tok);
    return err;
}

/* -------------------------------------------------------------------------------------- */
/* GGUF                                                                                    */

static enum pw_err gguf_str_key(const struct engine_gguf *g, const char *key, char *buf, size_t cap,
                                bool *found)
{
    struct engine_gguf_str s;
    *found = false;
    if (!engine_gguf_get_str(g, key, &s))
        return PW_OK;
    if (s.len >= cap)
        return PW_ERR_PARSE;
    memcpy(buf, s.ptr, s.len);
    buf[s.len] = '\0';
    *found = true;
    return PW_OK;
}

static int32_t gguf_id(const struct engine_gguf *g, const char *key)
{
    uint32_t v;
    if (!engine_gguf_get_u32(g, key, &v) || v > INT32_MAX)
        return -1;
    return (int32_t)v;
}

enum pw_err engine_tokenizer_from_gguf(const struct engine_gguf *g, const char *pre_override,
                                       struct engine_tokenizer **out, char *errbuf, size_t errcap)
{
    enum pw_err err = PW_OK;
    struct engine_tok_str *tokens = NULL, *merges = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    struct engine_tokenizer_config cfg = {0};
    char model[32], pre[64];
    bool found;
    enum engine_gguf_type et;
    uint64_t n = 0, nm = 0, nt = 0;
    *out = NULL;

    if (gguf_str_key(g, "tokenizer.ggml.model", model, sizeof model, &found) || !found) {
        errf(errbuf, errcap, "tokenizer.ggml.model missing or too long");
        return PW_ERR_PARSE;
    }
    if (strcmp(model, "gpt2") == 0) {
        cfg.model = ENGINE_TOK_MODEL_BPE;
    } else if (strcmp(model, "llama") == 0) {
        cfg.model = ENGINE_TOK_MODEL_SPM;
    } else {
        errf(errbuf, errcap, "tokenizer.ggml.model \"%s\" is not supported", model);
        return PW_ERR_UNSUPPORTED;
    }
    if (pre_override) {
        cfg.pre = pre_override;
    } else {
        if (gguf_str_key(g, "tokenizer.ggml.pre", pre, sizeof pre, &found)) {
            errf(errbuf, errcap, "tokenizer.ggml.pre too long");
            return PW_ERR_PARSE;
        }
        cfg.pre = found ? pre : NULL;
    }
    if (!engine_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) || et != ENGINE_GGUF_STRING ||
        n == 0) {
        errf(errbuf, errcap, "tokenizer.ggml.tokens missing or not an array of strings");
        return PW_ERR_PARSE;
    }
    if (n > ENGINE_TOK_MAX_VOCAB) {
        errf(errbuf, errcap, "tokenizer.ggml.tokens: %llu tokens, over the cap of %u",
             (unsigned long long)n, ENGINE_TOK_MAX_VOCAB);
        return PW_ERR_TOOBIG;
    }
    tokens = malloc((size_t)n * sizeof *tokens);
    if (!tokens) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    for (uint64_t i = 0; i < n; i++) {
        struct engine_gguf_str s;
        if (!engine_gguf_arr_str(g, "tokenizer.ggml.tokens", i, &s)) {
            err = PW_ERR_PARSE;
            goto out;
        }
        tokens[i] = (struct engine_tok_str){s.ptr, (size_t)s.len};
    }
    if (engine_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &nt)) {
        if (nt != n) {
            errf(errbuf, errcap, "tokenizer.ggml.token_type: %llu entries for %llu tokens",
                 (unsigned long long)nt, (unsigned long long)n);
            err = PW_ERR_PARSE;
            goto out;
        }
        types = malloc((size_t)n * sizeof *types);
        if (!types) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        for (uint64_t i = 0; i < n; i++) {
            int64_t v;
            if (!engine_gguf_arr_i64(g, "tokenizer.ggml.token_type", i, &v)) {
                errf(errbuf, errcap, "tokenizer.ggml.token_type: not integers");
                err = PW_ERR_PARSE;
                goto out;
            }
            types[i] = (v >= 1 && v <= 6) ? (int32_t)v : ENGINE_TOK_TYPE_NORMAL;
        }
    }
    if (engine_gguf_get_arr(g, "tokenizer.ggml.scores", &et, &nt)) {
        if (nt != n) {
            errf(errbuf, errcap, "tokenizer.ggml.scores: %llu entries for %llu tokens",
                 (unsigned long long)nt, (unsigned long long)n);
            err = PW_ERR_PARSE;
            goto out;
        }
        scores = malloc((size_t)n * sizeof *scores);
        if (!scores) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        for (uint64_t i = 0; i < n; i++) {
            if (!engine_gguf_arr_f32(g, "tokenizer.ggml.scores", i, &scores[i])) {
                errf(errbuf, errcap, "tokenizer.ggml.scores: not floats");
                err = PW_ERR_PARSE;
                goto out;
            }
        }
    }
    if (engine_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &nm)) {
        if (et != ENGINE_GGUF_STRING) {
            errf(errbuf, errcap, "tokenizer.ggml.merges: not strings");
            err = PW_ERR_PARSE;
            goto out;
        }
        if (nm > ENGINE_TOK_MAX_MERGES) {
            errf(errbuf, errcap, "tokenizer.ggml.merges: %llu, over the cap of %u",
                 (unsigned long long)nm, ENGINE_TOK_MAX_MERGES);
            err = PW_ERR_TOOBIG;
            goto out;
        }
        merges = malloc((size_t)(nm ? nm : 1) * sizeof *merges);
        if (!merges) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        for (uint64_t i = 0; i < nm; i++) {
            struct engine_gguf_str s;
            if (!engine_gguf_arr_str(g, "tokenizer.ggml.merges", i, &s)) {
                err = PW_ERR_PARSE;
                goto out;
            }
            merges[i] = (struct engine_tok_str){s.ptr, (size_t)s.len};
        }
    } else if (cfg.model == ENGINE_TOK_MODEL_BPE) {
        errf(errbuf, errcap, "tokenizer.ggml.merges missing for a gpt2 tokenizer");
        err = PW_ERR_PARSE;
        goto out;
    }
    cfg.n_vocab = (uint32_t)n;
    cfg.tokens = tokens;
    cfg.types = types;
    cfg.scores = scores;
    cfg.n_merges = (uint32_t)nm;
    cfg.merges = merges;
    cfg.bos_id = gguf_id(g, "tokenizer.ggml.bos_token_id");
    cfg.eos_id = gguf_id(g, "tokenizer.ggml.eos_token_id");
    cfg.unk_id = gguf_id(g, "tokenizer.ggml.unknown_token_id");
    if (cfg.bos_id >= (int32_t)n)
        cfg.bos_id = -1;
    if (cfg.eos_id >= (int32_t)n)
        cfg.eos_id = -1;
    if (cfg.unk_id >= (int32_t)n)
        cfg.unk_id = -1;
    bool flag;
    cfg.add_bos = engine_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &flag)
                      ? flag
                      : cfg.model == ENGINE_TOK_MODEL_SPM;
    cfg.add_space_prefix = engine_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &flag)
                               ? flag
                               : cfg.model == ENGINE_TOK_MODEL_SPM;
    err = engine_tokenizer_create(&cfg, out, errbuf, errcap);
out:
    if (err == PW_ERR_NOMEM)
        errf(errbuf, errcap, "tokenizer: out of memory");
    else if (err == PW_ERR_PARSE && errbuf && errcap && errbuf[0] == '\0')
        errf(errbuf, errcap, "tokenizer: malformed tokenizer.ggml.* arrays");
    free(tokens);
    free(types);
    free(scores);
    free(merges);
    return err;
}

/* -------------------------------------------------------------------------------------- */
/* Accessors                                                                               */

uint32_t engine_tokenizer_n_vocab(const struct engine_tokenizer *tok)
{
    return tok->n_vocab;
}

enum engine_tok_model engine_tokenizer_model(const struct engine_tokenizer *tok)
{
    return tok->model;
}

enum engine_tok_pre engine_tokenizer_pre(const struct engine_tokenizer *tok)
{
    return tok->pre;
}

int32_t engine_tokenizer_bos(const struct engine_tokenizer *tok)
{
    return tok->bos_id;
}

int32_t engine_tokenizer_eos(const struct engine_tokenizer *tok)
{
    return tok->eos_id;
}

int engine_tokenizer_type(const struct engine_tokenizer *tok, int32_t id)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab)
        return 0;
    return tok->types[id];
}

bool engine_tokenizer_is_special(const struct engine_tokenizer *tok, int32_t id)
{
    return is_special_type(engine_tokenizer_type(tok, id));
}

int32_t engine_tokenizer_special_id(const struct engine_tokenizer *tok, const char *text,
                                    size_t len)
{
    if (len == 0)
        return -1;
    uint8_t b = (uint8_t)text[0];
    for (uint32_t i = tok->sp_start[b]; i < tok->sp_start[b + 1]; i++) {
        uint32_t id = tok->sp_ids[i];
        const struct span *p = &tok->pieces[id];
        if (p->len == len && memcmp(tok->piece_arena + p->off, text, len) == 0)
            return (int32_t)id;
    }
    return -1;
}

struct engine_tok_str engine_tokenizer_piece(const struct engine_tokenizer *tok, int32_t id)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab)
        return (struct engine_tok_str){"", 0};
    const struct span *p = &tok->pieces[id];
    return (struct engine_tok_str){tok->piece_arena + p->off, p->len};
}

/* -------------------------------------------------------------------------------------- */
/* Pre-tokenizers. Each match_* returns the end (byte offset) of the piece that starts at */
/* p, never past e (the end of the current segment, which the regex sees as end of text). */

/* One character at p: its class (0 = "other", also for invalid bytes) and where it ends. */
static size_t next_char(const uint8_t *s, size_t e, size_t p, uint32_t *cp, unsigned *cls)
{
    size_t n = engine_utf8_next(s + p, e - p, cp, NULL);
    *cls = *cp == ENGINE_UTF8_INVALID ? 0 : engine_unicode_class(*cp);
    return p + n;
}

/* Skips characters whose class is want (want 0 = "other": no class bit at all). */
static size_t run_class(const uint8_t *s, size_t p, size_t e, unsigned want)
{
    while (p < e) {
        uint32_t cp;
        unsigned c;
        size_t q = next_char(s, e, p, &cp, &c);
        if (want ? !(c & want) : c != 0)
            break;
        p = q;
    }
    return p;
}

/* `\s+(?!\S)|\s+` at a whitespace character p: the run, less its last character when a
 * non-space follows and the run has two or more (that one joins the next piece). */
static size_t match_space_tail(const uint8_t *s, size_t p, size_t e)
{
    size_t k = p, last = p, count = 0;
    while (k < e) {
        uint32_t cp;
        unsigned c;
        size_t q = next_char(s, e, k, &cp, &c);
        if (!(c & ENGINE_UCLASS_SPACE))
            break;
        last = k;
        k = q;
        count++;
    }
    if (k == e)
        return e;
    return count >= 2 ? last : k;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
static size_t match_gpt2(const uint8_t *s, size_t p, size_t e)
{
    uint32_t cp;
    unsigned c;
    size_t q = next_char(s, e, p, &cp, &c);
    if (cp == '\'' && q < e) {
        uint8_t a = s[q];
        if (a == 's' || a == 't' || a == 'm' || a == 'd')
            return q + 1;
        if (q + 1 < e) {
            uint8_t b = s[q + 1];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                return q + 2;
        }
    }
    unsigned cj = c;
    size_t qj = q;
    if (cp == ' ' && q < e) {
        uint32_t cp2;
        qj = next_char(s, e, q, &cp2, &cj);
    }
    if (cj & ENGINE_UCLASS_LETTER)
        return run_class(s, qj, e, ENGINE_UCLASS_LETTER);
    if (cj & ENGINE_UCLASS_NUMBER)
        return run_class(s, qj, e, ENGINE_UCLASS_NUMBER);
    if (cj == 0)
        return run_class(s, qj, e, 0);
    return match_space_tail(s, p, e);
}

/*
 * Llama 3 (digits = 3) and Qwen2 (digits = 1):
 * (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
 * \s*[\r\n]+|\s+(?!\S)|\s+
 * The case-blind contractions fold ASCII only.
 */
static size_t match_llama3(const uint8_t *s, size_t p, size_t e, int digits)
{
    uint32_t cp;
    unsigned c;
    size_t q = next_char(s, e, p, &cp, &c);
    if (cp == '\'' && q < e) {
        uint8_t a = (uint8_t)(s[q] | 0x20);
        if (a == 's' || a == 't' || a == 'm' || a == 'd')
            return q + 1;
        if (q + 1 < e) {
            uint8_t b = (uint8_t)(s[q + 1] | 0x20);
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                return q + 2;
        }
    }
    if (c & ENGINE_UCLASS_LETTER)
        return run_class(s, q, e, ENGINE_UCLASS_LETTER);
    if (cp != '\r' && cp != '\n' && !(c & ENGINE_UCLASS_NUMBER) && q < e) {
        uint32_t cp2;
        unsigned c2;
        size_t q2 = next_char(s, e, q, &cp2, &c2);
        if (c2 & ENGINE_UCLASS_LETTER)
            return run_class(s, q2, e, ENGINE_UCLASS_LETTER);
    }
    if (c & ENGINE_UCLASS_NUMBER) {
        size_t end = q;
        for (int i = 1; i < digits && end < e; i++) {
            uint32_t cp2;
            unsigned c2;
            size_t q2 = next_char(s, e, end, &cp2, &c2);
            if (!(c2 & ENGINE_UCLASS_NUMBER))
                break;
            end = q2;
        }
        return end;
    }
    unsigned cj = c;
    size_t qj = q;
    if (cp == ' ' && q < e) {
        uint32_t cp2;
        qj = next_char(s, e, q, &cp2, &cj);
    }
    if (cj == 0) {
        size_t end = run_class(s, qj, e, 0);
        while (end < e && (s[end] == '\r' || s[end] == '\n'))
            end++;
        return end;
    }
    /* c is whitespace here. \s*[\r\n]+ ends after the run's last CR/LF, if it has one. */
    size_t k = p, after_nl = 0;
    while (k < e) {
        uint32_t cp2;
        unsigned c2;
        size_t q2 = next_char(s, e, k, &cp2, &c2);
        if (!(c2 & ENGINE_UCLASS_SPACE))
            break;
        if (cp2 == '\r' || cp2 == '\n')
            after_nl = q2;
        k = q2;
    }
    if (after_nl)
        return after_nl;
    return match_space_tail(s, p, e);
}

/* Calls word(ctx, start, end) for each pre-token of s[0..len). */
struct pre_iter {
    const struct engine_tokenizer *tok;
    const uint8_t *s;
    size_t len;
    size_t p;       /* next piece starts here */
    size_t seg_end; /* smollm: end of the current run of non-digits */
};

static bool pre_next(struct pre_iter *it, size_t *start, size_t *end)
{
    if (it->p >= it->len)
        return false;
    const uint8_t *s = it->s;
    size_t p = it->p, e = it->len;
    size_t r;
    switch (it->tok->pre) {
    case ENGINE_TOK_PRE_SMOLLM:
        /* Digits(individual_digits) first: every \p{N} is its own piece and the runs
         * between them are pre-tokenized on their own (their ends are ends of text). */
        if (p >= it->seg_end) {
            uint32_t cp;
            unsigned c;
            size_t q = next_char(s, e, p, &cp, &c);
            if (c & ENGINE_UCLASS_NUMBER) {
                r = q;
                break;
            }
            size_t k = q;
            while (k < e) {
                size_t q2 = next_char(s, e, k, &cp, &c);
                if (c & ENGINE_UCLASS_NUMBER)
                    break;
                k = q2;
            }
            it->seg_end = k;
        }
        r = match_gpt2(s, p, it->seg_end);
        break;
    case ENGINE_TOK_PRE_LLAMA3:
        r = match_llama3(s, p, e, 3);
        break;
    case ENGINE_TOK_PRE_QWEN2:
        r = match_llama3(s, p, e, 1);
        break;
    case ENGINE_TOK_PRE_NONE:
        r = e;
        break;
    case ENGINE_TOK_PRE_GPT2:
    default:
        r = match_gpt2(s, p, e);
        break;
    }
    PW_ASSERT(r > p && r <= e);
    *start = p;
    *end = r;
    it->p = r;
    return true;
}

/* -------------------------------------------------------------------------------------- */
/* Merging                                                                                 */

struct sym {
    uint32_t start; /* byte offset in the piece */
    uint32_t len;   /* 0 = merged away */
    int32_t prev, next;
    int32_t id; /* BPE: current token; SPM: resolved at the end */
};

struct cand {
    double key;    /* BPE: rank; SPM: -score. Smaller pops first. */
    uint32_t left; /* symbol index; ties pop the leftmost first */
    uint32_t right;
    uint32_t size; /* bytes of left + right when pushed; a mismatch means stale */
    int32_t id;    /* the merged token */
};

struct scratch {
    struct sym *syms;
    struct cand *heap;
    size_t n_heap;
    size_t cap; /* symbols and heap entries allocated */
    char *buf;  /* SPM: the text with ▁ */
    size_t buf_cap;
    int32_t *ids;
    size_t n_ids, cap_ids;
};

static bool cand_less(const struct cand *a, const struct cand *b)
{
    if (a->key != b->key)
        return a->key < b->key;
    return a->left < b->left;
}

static void heap_push(struct scratch *sc, struct cand c)
{
    size_t i = sc->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_less(&c, &sc->heap[parent]))
            break;
        sc->heap[i] = sc->heap[parent];
        i = parent;
    }
    sc->heap[i] = c;
}

static struct cand heap_pop(struct scratch *sc)
{
    struct cand top = sc->heap[0];
    struct cand last = sc->heap[--sc->n_heap];
    size_t i = 0, n = sc->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, best = i;
        if (l >= n)
            break;
        best = l;
        if (l + 1 < n && cand_less(&sc->heap[l + 1], &sc->heap[l]))
            best = l + 1;
        if (!cand_less(&sc->heap[best], &last))
            break;
        sc->heap[i] = sc->heap[best];
        i = best;
    }
    if (n)
        sc->heap[i] = last;
    return top;
}

/* Room for n symbols; the heap never holds more than 2n candidates at once. */
static enum pw_err scratch_reserve(struct scratch *sc, size_t n)
{
    if (n <= sc->cap)
        return PW_OK;
    size_t cap = sc->cap ? sc->cap : 64;
    while (cap < n)
        cap *= 2;
    struct sym *syms = realloc(sc->syms, cap * sizeof *syms);
    if (!syms)
        return PW_ERR_NOMEM;
    sc->syms = syms;
    struct cand *heap = realloc(sc->heap, 2 * cap * sizeof *heap);
    if (!heap)
        return PW_ERR_NOMEM;
    sc->heap = heap;
    sc->cap = cap;
    return PW_OK;
}

static enum pw_err emit(struct scratch *sc, int32_t id)
{
    if (sc->n_ids >= sc->cap_ids)
        return PW_ERR_TOOBIG;
    sc->ids[sc->n_ids++] = id;
    return PW_OK;
}

static void bpe_push_pair(const struct engine_tokenizer *tok, struct scratch *sc, int32_t l)
{
    if (l < 0)
        return;
    int32_t r = sc->syms[l].next;
    if (r < 0)
        return;
    const struct merge_slot *m = lookup_merge(tok, sc->syms[l].id, sc->syms[r].id);
    if (!m)
        return;
    heap_push(sc, (struct cand){.key = m->rank,
                                .left = (uint32_t)l,
                                .right = (uint32_t)r,
                                .size = sc->syms[l].len + sc->syms[r].len,
                                .id = (int32_t)m->result});
}

static void merge_syms(struct scratch *sc, const struct cand *c)
{
    struct sym *l = &sc->syms[c->left], *r = &sc->syms[c->right];
    l->len += r->len;
    l->id = c->id;
    l->next = r->next;
    if (r->next >= 0)
        sc->syms[r->next].prev = (int32_t)c->left;
    r->len = 0;
}

static bool cand_stale(const struct scratch *sc, const struct cand *c)
{
    const struct sym *l = &sc->syms[c->left], *r = &sc->syms[c->right];
    return l->len == 0 || r->len == 0 || l->next != (int32_t)c->right || l->len + r->len != c->size;
}

/* Byte-level BPE of one pre-token. */
static enum pw_err bpe_word(const struct engine_tokenizer *tok, struct scratch *sc,
                            const uint8_t *w, size_t n)
{
    enum pw_err err;
    if (tok->ignore_merges) {
        int32_t id = lookup_key(tok, w, n);
        if (id >= 0 && tok->types[id] == ENGINE_TOK_TYPE_NORMAL)
            return emit(sc, id);
    }
    err = scratch_reserve(sc, n);
    if (err)
        return err;
    size_t ns = 0;
    for (size_t i = 0; i < n; i++) {
        if (tok->byte_id[w[i]] < 0)
            continue; /* no token: dropped */
        sc->syms[ns] = (struct sym){.start = (uint32_t)i,
                                    .len = 1,
                                    .prev = (int32_t)ns - 1,
                                    .next = (int32_t)ns + 1,
                                    .id = tok->byte_id[w[i]]};
        ns++;
    }
    if (ns == 0)
        return PW_OK;
    sc->syms[ns - 1].next = -1;
    sc->n_heap = 0;
    for (size_t i = 0; i + 1 < ns; i++)
        bpe_push_pair(tok, sc, (int32_t)i);
    while (sc->n_heap) {
        struct cand c = heap_pop(sc);
        if (cand_stale(sc, &c))
            continue;
        merge_syms(sc, &c);
        bpe_push_pair(tok, sc, sc->syms[c.left].prev);
        bpe_push_pair(tok, sc, (int32_t)c.left);
    }
    for (int32_t i = 0; i >= 0; i = sc->syms[i].next) {
        err = emit(sc, sc->syms[i].id);
        if (err)
            return err;
    }
    return PW_OK;
}

static void spm_push_pair(const struct engine_tokenizer *tok, struct scratch *sc, const uint8_t *w,
                          int32_t l)
{
    if (l < 0)
        return;
    int32_t r = sc->syms[l].next;
    if (r < 0)
        return;
    const struct sym *a = &sc->syms[l], *b = &sc->syms[r];
    int32_t id = lookup_key(tok, w + a->start, a->len + b->len);
    if (id < 0)
        return;
    int t = tok->types[id];
    if (t != ENGINE_TOK_TYPE_NORMAL && t != ENGINE_TOK_TYPE_USER_DEFINED)
        return;
    heap_push(sc, (struct cand){.key = -(double)tok->scores[id],
                                .left = (uint32_t)l,
                                .right = (uint32_t)r,
                                .size = a->len + b->len,
                                .id = id});
}

/* SentencePiece BPE of one text fragment (spaces already ▁). */
static enum pw_err spm_text(const struct engine_tokenizer *tok, struct scratch *sc,
                            const uint8_t *w, size_t n)
{
    enum pw_err err = scratch_reserve(sc, n);
    if (err)
        return err;
    size_t ns = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t k = engine_utf8_next(w + i, n - i, &cp, NULL);
        sc->syms[ns] = (struct sym){.start = (uint32_t)i,
                                    .len = (uint32_t)k,
                                    .prev = (int32_t)ns - 1,
                                    .next = (int32_t)ns + 1,
                                    .id = -1};
        ns++;
        i += k;
    }
    if (ns == 0)
        return PW_OK;
    sc->syms[ns - 1].next = -1;
    sc->n_heap = 0;
    for (size_t i = 0; i + 1 < ns; i++)
        spm_push_pair(tok, sc, w, (int32_t)i);
    while (sc->n_heap) {
        struct cand c = heap_pop(sc);
        if (cand_stale(sc, &c))
            continue;
        merge_syms(sc, &c);
        spm_push_pair(tok, sc, w, sc->syms[c.left].prev);
        spm_push_pair(tok, sc, w, (int32_t)c.left);
    }
    for (int32_t i = 0; i >= 0; i = sc->syms[i].next) {
        const struct sym *y = &sc->syms[i];
        int32_t id = y->id >= 0 ? y->id : lookup_key(tok, w + y->start, y->len);
        if (id >= 0) {
            err = emit(sc, id);
        } else {
            /* Byte fallback: each byte as <0xXX>, else the unknown token. */
            for (uint32_t j = 0; j < y->len && !err; j++) {
                int32_t b = tok->byte_id[w[y->start + j]];
                if (b >= 0)
                    err = emit(sc, b);
                else if (tok->unk_id >= 0)
                    err = emit(sc, tok->unk_id);
            }
        }
        if (err)
            return err;
    }
    return PW_OK;
}

static enum pw_err encode_text(const struct engine_tokenizer *tok, struct scratch *sc,
                               const char *text, size_t len, bool after_special)
{
    enum pw_err err = PW_OK;
    if (tok->model == ENGINE_TOK_MODEL_SPM) {
        if (len == 0)
            return PW_OK;
        size_t need = len * 3 + 3;
        if (need > sc->buf_cap) {
            char *b = realloc(sc->buf, need);
            if (!b)
                return PW_ERR_NOMEM;
            sc->buf = b;
            sc->buf_cap = need;
        }
        size_t n = 0;
        if (tok->add_space_prefix && after_special) {
            memcpy(sc->buf, "\xE2\x96\x81", 3);
            n = 3;
        }
        for (size_t i = 0; i < len; i++) {
            if (text[i] == ' ') {
                memcpy(sc->buf + n, "\xE2\x96\x81", 3);
                n += 3;
            } else {
                sc->buf[n++] = text[i];
            }
        }
        return spm_text(tok, sc, (const uint8_t *)sc->buf, n);
    }
    struct pre_iter it = {.tok = tok, .s = (const uint8_t *)text, .len = len};
    size_t a, b;
    while (!err && pre_next(&it, &a, &b))
        err = bpe_word(tok, sc, (const uint8_t *)text + a, b - a);
    return err;
}

/* Length of the special text matched at text[p..len), 0 if none; *id gets its id. */
static size_t match_special(const struct engine_tokenizer *tok, const char *text, size_t p,
                            size_t len, bool parse_control, int32_t *id)
{
    uint8_t b = (uint8_t)text[p];
    for (uint32_t i = tok->sp_start[b]; i < tok->sp_start[b + 1]; i++) {
        uint32_t sid = tok->sp_ids[i];
        if (!parse_control && tok->types[sid] != ENGINE_TOK_TYPE_USER_DEFINED)
            continue;
        const struct span *sp = &tok->pieces[sid];
        if (sp->len <= len - p && memcmp(tok->piece_arena + sp->off, text + p, sp->len) == 0) {
            *id = (int32_t)sid;
            return sp->len;
        }
    }
    return 0;
}

static enum pw_err encode_frags(const struct engine_tokenizer *tok, struct scratch *sc,
                                const struct engine_tok_frag *frags, size_t n_frags, unsigned flags,
                                bool *after_special)
{
    enum pw_err err = PW_OK;
    bool parse_control = flags & ENGINE_TOK_PARSE_SPECIAL;
    for (size_t f = 0; f < n_frags && !err; f++) {
        const struct engine_tok_frag *fr = &frags[f];
        if (fr->id >= 0) {
            if ((uint32_t)fr->id >= tok->n_vocab)
                return PW_ERR_RANGE;
            err = emit(sc, fr->id);
            *after_special = true;
            continue;
        }
        if (fr->len > ENGINE_TOK_MAX_INPUT)
            return PW_ERR_TOOBIG;
        if (fr->len == 0)
            continue;
        if (!parse_control && !tok->has_user_defined) {
            err = encode_text(tok, sc, fr->text, fr->len, *after_special);
            *after_special = false;
            continue;
        }
        size_t start = 0;
        for (size_t p = 0; p < fr->len && !err;) {
            int32_t id;
            size_t m = match_special(tok, fr->text, p, fr->len, parse_control, &id);
            if (!m) {
                p++;
                continue;
            }
            if (p > start) {
                err = encode_text(tok, sc, fr->text + start, p - start, *after_special);
                if (err)
                    break;
            }
            err = emit(sc, id);
            *after_special = true;
            p += m;
            start = p;
        }
        if (!err && start < fr->len) {
            err = encode_text(tok, sc, fr->text + start, fr->len - start, *after_special);
            *after_special = false;
        }
    }
    return err;
}

enum pw_err engine_tokenizer_encode_frags(const struct engine_tokenizer *tok,
                                          const struct engine_tok_frag *frags, size_t n_frags,
                                          unsigned flags, int32_t *ids, size_t cap, size_t *n_out)
{
    struct scratch sc = {.ids = ids, .cap_ids = cap};
    enum pw_err err = PW_OK;
    bool after_special = true; /* SPM: the first text gets the space prefix */
    size_t total = 0;
    *n_out = 0;
    for (size_t f = 0; f < n_frags; f++) {
        if (frags[f].id < 0)
            total += frags[f].len;
        if (total > ENGINE_TOK_MAX_INPUT)
            return PW_ERR_TOOBIG;
    }
    if ((flags & ENGINE_TOK_ADD_BOS) && tok->add_bos && tok->bos_id >= 0) {
        err = emit(&sc, tok->bos_id);
        if (err)
            goto out;
    }
    err = encode_frags(tok, &sc, frags, n_frags, flags, &after_special);
    if (!err)
        *n_out = sc.n_ids;
out:
    free(sc.syms);
    free(sc.heap);
    free(sc.buf);
    return err;
}

enum pw_err engine_tokenizer_encode(const struct engine_tokenizer *tok, const char *text,
                                    size_t len, unsigned flags, int32_t *ids, size_t cap,
                                    size_t *n_out)
{
    if (len > ENGINE_TOK_MAX_INPUT) {
        *n_out = 0;
        return PW_ERR_TOOBIG;
    }
    struct engine_tok_frag f = {.id = -1, .text = text, .len = len};
    return engine_tokenizer_encode_frags(tok, &f, 1, flags, ids, cap, n_out);
}

/* -------------------------------------------------------------------------------------- */
/* Decoding                                                                                */

/* The bytes id contributes given the flags and whether anything came before it. */
static bool piece_for(const struct engine_tokenizer *tok, int32_t id, unsigned flags, bool started,
                      const char **p, size_t *n)
{
    if (id < 0 || (uint32_t)id >= tok->n_vocab)
        return false;
    const struct span *s = &tok->pieces[id];
    *p = tok->piece_arena + s->off;
    *n = s->len;
    if (is_special_type(tok->types[id]) && !(flags & ENGINE_TOK_DECODE_SPECIAL))
        *n = 0;
    if (!started && tok->add_space_prefix && *n > 0 && (*p)[0] == ' ') {
        (*p)++;
        (*n)--;
    }
    return true;
}

enum pw_err engine_tokenizer_decode(const struct engine_tokenizer *tok, const int32_t *ids,
                                    size_t n, unsigned flags, char *out, size_t cap, size_t *n_out)
{
    size_t total = 0;
    bool started = false;
    enum pw_err err = PW_OK;
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t len;
        if (!piece_for(tok, ids[i], flags, started, &p, &len)) {
            err = PW_ERR_RANGE;
            break;
        }
        if (len == 0)
            continue;
        started = true;
        if (total < cap)
            memcpy(out + total, p, len <= cap - total ? len : cap - total);
        total += len;
    }
    *n_out = total;
    if (!err && total > cap)
        err = PW_ERR_TOOBIG;
    return err;
}

void engine_detok_init(struct engine_detok *d, const struct engine_tokenizer *tok, unsigned flags)
{
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->flags = flags;
}

static const char replacement[3] = {'\xEF', '\xBF', '\xBD'};

enum pw_err engine_detok_push(struct engine_detok *d, int32_t id, char *out, size_t cap,
                              size_t *n_out)
{
    const char *p;
    size_t len;
    *n_out = 0;
    if (!piece_for(d->tok, id, d->flags, d->started, &p, &len))
        return PW_ERR_RANGE;
    if (len == 0)
        return PW_OK;
    uint8_t buf[ENGINE_TOK_MAX_TOKEN_BYTES + 4];
    size_t total = d->n_pend + len;
    if (cap < 3 * total)
        return PW_ERR_TOOBIG;
    d->started = true;
    memcpy(buf, d->pend, d->n_pend);
    memcpy(buf + d->n_pend, p, len);
    d->n_pend = 0;
    size_t o = 0;
    for (size_t i = 0; i < total;) {
        uint32_t cp;
        bool truncated;
        size_t k = engine_utf8_next(buf + i, total - i, &cp, &truncated);
        if (cp != ENGINE_UTF8_INVALID) {
            memcpy(out + o, buf + i, k);
            o += k;
        } else if (truncated) {
            memcpy(d->pend, buf + i, k); /* k <= 3: a truncated sequence lacks a byte */
            d->n_pend = k;
        } else {
            memcpy(out + o, replacement, 3);
            o += 3;
        }
        i += k;
    }
    *n_out = o;
    return PW_OK;
}

enum pw_err engine_detok_flush(struct engine_detok *d, char *out, size_t cap, size_t *n_out)
{
    *n_out = 0;
    if (d->n_pend == 0)
        return PW_OK;
    if (cap < 3)
        return PW_ERR_TOOBIG;
    memcpy(out, replacement, 3);
    *n_out = 3;
    d->n_pend = 0;
    return PW_OK;
}

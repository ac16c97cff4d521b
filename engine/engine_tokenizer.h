/*
 * engine_tokenizer: text <-> token ids from a model file's own vocabulary.
 *
 * Two models, as named by tokenizer.ggml.model:
 *   "gpt2"  byte-level BPE: the text is split by a pre-tokenizer (tokenizer.ggml.pre picks
 *           the rules: gpt2, smollm, llama3, qwen2), each piece's bytes start as one symbol
 *           per byte and are merged by merge rank (lowest first, leftmost on ties).
 *   "llama" SentencePiece BPE: spaces become U+2581, a U+2581 is prepended when
 *           add_space_prefix, symbols are characters merged by token score (highest first,
 *           leftmost on ties), pieces left outside the vocabulary fall back to <0xXX> tokens.
 * Both merge with a binary heap: O(n log n) per piece, never quadratic.
 *
 * Special-token policy: control tokens (<|im_end|>, <s>, ...) are produced only by
 * engine_tokenizer_special_id() / fragments, or by engine_tokenizer_encode() with
 * ENGINE_TOK_PARSE_SPECIAL. Plain encode never turns user text into a control token.
 * User-defined tokens (type 4) are ordinary text and are always matched, as in llama.cpp
 * and Hugging Face.
 *
 * Any bytes are accepted: invalid UTF-8 is split into maximal invalid subparts, each a
 * character of class "other", and byte-level BPE keeps its exact bytes, so
 * engine_tokenizer_decode(encode(s)) == s for every byte string s.
 *
 * A tokenizer is immutable after create: encode and decode may run on many threads at once.
 * See docs/internals/tokenizer.md.
 */
#ifndef ENGINE_TOKENIZER_H
#define ENGINE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

struct engine_gguf;

/* Caps on untrusted sizes (the model file and the request are both untrusted). */
#define ENGINE_TOK_MAX_VOCAB (1u << 21)         /* tokens in a vocabulary */
#define ENGINE_TOK_MAX_MERGES (1u << 22)        /* merge rules */
#define ENGINE_TOK_MAX_TOKEN_BYTES 1024u        /* bytes of one token's text */
#define ENGINE_TOK_MAX_INPUT ((size_t)64 << 20) /* bytes of text per encode call */

enum engine_tok_model {
    ENGINE_TOK_MODEL_BPE = 0, /* "gpt2": byte-level BPE */
    ENGINE_TOK_MODEL_SPM = 1, /* "llama": SentencePiece BPE with byte fallback */
};

enum engine_tok_pre {
    ENGINE_TOK_PRE_GPT2 = 0,   /* "gpt2", "default" */
    ENGINE_TOK_PRE_SMOLLM = 1, /* digits split one by one, then gpt2 ("smollm", "starcoder") */
    ENGINE_TOK_PRE_LLAMA3 = 2, /* "llama3", "llama-bpe": \p{N}{1,3}, case-blind contractions */
    ENGINE_TOK_PRE_QWEN2 = 3,  /* "qwen2": llama3 with single digits */
    ENGINE_TOK_PRE_NONE = 4,   /* SentencePiece: no pre-tokenizer */
};

/* tokenizer.ggml.token_type values. */
enum engine_tok_type {
    ENGINE_TOK_TYPE_NORMAL = 1,
    ENGINE_TOK_TYPE_UNKNOWN = 2,
    ENGINE_TOK_TYPE_CONTROL = 3,
    ENGINE_TOK_TYPE_USER_DEFINED = 4,
    ENGINE_TOK_TYPE_UNUSED = 5,
    ENGINE_TOK_TYPE_BYTE = 6,
};

/* Borrowed bytes (not NUL-terminated). */
struct engine_tok_str {
    const char *ptr;
    size_t len;
};

/*
 * Everything a tokenizer is built from, as plain arrays (all borrowed for the duration of
 * engine_tokenizer_create(), which copies what it keeps). Token texts are as stored in
 * GGUF: byte-level BPE tokens in the GPT-2 byte-to-unicode alphabet ("Ġthe"), SentencePiece
 * tokens with U+2581 for spaces.
 */
struct engine_tokenizer_config {
    enum engine_tok_model model;
    const char *pre;                     /* tokenizer.ggml.pre; NULL = "default" (BPE only) */
    uint32_t n_vocab;                    /* 1..ENGINE_TOK_MAX_VOCAB */
    const struct engine_tok_str *tokens; /* n_vocab texts */
    const int32_t *types;                /* n_vocab enum engine_tok_type, NULL = all normal */
    const float *scores;                 /* n_vocab SentencePiece scores, NULL = all 0 */
    uint32_t n_merges;                   /* BPE merge rules, best (rank 0) first */
    const struct engine_tok_str *merges; /* "left right" in the token alphabet */
    int32_t bos_id;                      /* -1 = none */
    int32_t eos_id;                      /* -1 = none */
    int32_t unk_id;                      /* -1 = none */
    bool add_bos;                        /* tokenizer.ggml.add_bos_token */
    bool add_space_prefix;               /* tokenizer.ggml.add_space_prefix (SPM) */
};

struct engine_tokenizer;

/*
 * Builds a tokenizer. Fails with PW_ERR_PARSE (malformed vocabulary), PW_ERR_UNSUPPORTED
 * (unknown pre-tokenizer name), PW_ERR_TOOBIG (over a cap), PW_ERR_NOMEM; errbuf (may be
 * NULL) gets one line. *out is owned by the caller: engine_tokenizer_destroy().
 */
enum pw_err engine_tokenizer_create(const struct engine_tokenizer_config *cfg,
                                    struct engine_tokenizer **out, char *errbuf, size_t errcap);

/*
 * Builds a tokenizer from a GGUF file's tokenizer.ggml.* keys. pre_override (may be NULL)
 * replaces tokenizer.ggml.pre. Nothing of g is kept: g may be destroyed afterwards.
 */
enum pw_err engine_tokenizer_from_gguf(const struct engine_gguf *g, const char *pre_override,
                                       struct engine_tokenizer **out, char *errbuf, size_t errcap);

void engine_tokenizer_destroy(struct engine_tokenizer *tok);

/* Maps a tokenizer.ggml.pre name to its rules; false if unknown. */
bool engine_tokenizer_pre_parse(const char *name, enum engine_tok_pre *out);
const char *engine_tokenizer_pre_name(enum engine_tok_pre pre);

uint32_t engine_tokenizer_n_vocab(const struct engine_tokenizer *tok);
enum engine_tok_model engine_tokenizer_model(const struct engine_tokenizer *tok);
enum engine_tok_pre engine_tokenizer_pre(const struct engine_tokenizer *tok);
int32_t engine_tokenizer_bos(const struct engine_tokenizer *tok); /* -1 = none */
int32_t engine_tokenizer_eos(const struct engine_tokenizer *tok); /* -1 = none */
/* enum engine_tok_type of id; 0 if id is out of range. */
int engine_tokenizer_type(const struct engine_tokenizer *tok, int32_t id);
/* True for control and unknown tokens (what a detokenizer hides by default). */
bool engine_tokenizer_is_special(const struct engine_tokenizer *tok, int32_t id);

/*
 * Id of the control or user-defined token whose text is exactly text[0..len) (e.g.
 * "<|im_end|>"); -1 if there is none. This is how chat templates get their markers.
 */
int32_t engine_tokenizer_special_id(const struct engine_tokenizer *tok, const char *text,
                                    size_t len);

/* Encode flags. */
#define ENGINE_TOK_ADD_BOS 1u       /* prepend BOS when the model file asks for it */
#define ENGINE_TOK_PARSE_SPECIAL 2u /* control tokens' texts in the input become them */

/*
 * Encodes text[0..len) into ids[0..cap). *n_out gets the count. A result never has more
 * than len + 2 tokens, so cap = len + 2 always suffices. Returns PW_ERR_TOOBIG when len is
 * over ENGINE_TOK_MAX_INPUT or the result would pass cap (ids then holds garbage),
 * PW_ERR_NOMEM.
 */
enum pw_err engine_tokenizer_encode(const struct engine_tokenizer *tok, const char *text,
                                    size_t len, unsigned flags, int32_t *ids, size_t cap,
                                    size_t *n_out);

/*
 * A piece of pre-rendered input: a special token (id >= 0; text ignored) or plain text
 * (id < 0). Adjacent text fragments are NOT joined: a caller that wants the text between
 * two special tokens tokenized as one string (what Hugging Face does with a rendered
 * template) passes it as one fragment. For SentencePiece, the space prefix goes on the
 * first text fragment and on every text fragment that follows a special token.
 */
struct engine_tok_frag {
    int32_t id;
    const char *text;
    size_t len;
};

enum pw_err engine_tokenizer_encode_frags(const struct engine_tokenizer *tok,
                                          const struct engine_tok_frag *frags, size_t n_frags,
                                          unsigned flags, int32_t *ids, size_t cap, size_t *n_out);

/* Decode flags. */
#define ENGINE_TOK_DECODE_SPECIAL 1u /* emit control/unknown tokens' text (else nothing) */

/*
 * The bytes token id stands for (borrowed from tok; may be invalid UTF-8 on its own: one
 * token can hold part of a character). Control tokens give their text. Empty for ids out
 * of range.
 */
struct engine_tok_str engine_tokenizer_piece(const struct engine_tokenizer *tok, int32_t id);

/*
 * Decodes ids to raw bytes (no UTF-8 repair: decode(encode(s)) == s byte for byte) into
 * out[0..cap). *n_out gets the length the whole result needs; PW_ERR_TOOBIG if over cap
 * (out then holds a cut prefix). Unknown ids are PW_ERR_RANGE. SentencePiece drops the one
 * space the prefix added.
 */
enum pw_err engine_tokenizer_decode(const struct engine_tokenizer *tok, const int32_t *ids,
                                    size_t n, unsigned flags, char *out, size_t cap, size_t *n_out);

/*
 * Streaming detokenizer: turns one token at a time into text deltas that are always valid
 * UTF-8 and never end inside a character. Bytes that may still become a character are
 * held back (at most 3); bytes that cannot are replaced by U+FFFD per maximal invalid
 * subpart, exactly as Hugging Face's decode (from_utf8_lossy) does for the whole sequence.
 * Caller-owned, no heap; one per stream; not thread-safe.
 */
struct engine_detok {
    const struct engine_tokenizer *tok; /* borrowed */
    unsigned flags;                     /* ENGINE_TOK_DECODE_* */
    uint8_t pend[4];                    /* held-back start of a character */
    size_t n_pend;                      /* bytes in pend, 0..3 */
    bool started;                       /* a piece was emitted (SPM strips one space first) */
};

/* Longest delta one push or flush can produce. */
#define ENGINE_DETOK_OUT_MAX (3 * (ENGINE_TOK_MAX_TOKEN_BYTES + 4))

void engine_detok_init(struct engine_detok *d, const struct engine_tokenizer *tok, unsigned flags);

/*
 * Appends the text that token id completes to out[0..cap) (cap >= ENGINE_DETOK_OUT_MAX
 * always suffices); *n_out gets its length (may be 0). PW_ERR_RANGE for an unknown id,
 * PW_ERR_TOOBIG if cap is too small (nothing consumed).
 */
enum pw_err engine_detok_push(struct engine_detok *d, int32_t id, char *out, size_t cap,
                              size_t *n_out);

/* Ends the stream: held-back bytes become U+FFFD (at most 3 bytes of output). */
enum pw_err engine_detok_flush(struct engine_detok *d, char *out, size_t cap, size_t *n_out);

#endif

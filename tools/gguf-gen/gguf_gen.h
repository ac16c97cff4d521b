/*
 * gguf_gen: synthesises a Llama-architecture GGUF v3 model with deterministic random
 * weights and a small, usable byte-level BPE tokenizer (gpt2 model, ChatML specials and
 * chat template). Used by parkway-gguf-gen and by tests that need a model file.
 *
 * Tensors are streamed row by row: memory use is one row plus the tokenizer, whatever the
 * shape. The same options and seed always give the same bytes.
 */
#ifndef GGUF_GEN_H
#define GGUF_GEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "pw_err.h"

struct gguf_gen_opts {
    const char *shape;  /* preset name, written into general.name */
    uint32_t n_layer;   /* transformer blocks */
    uint32_t n_embd;    /* model width */
    uint32_t n_ff;      /* feed-forward width */
    uint32_t n_head;    /* query heads */
    uint32_t n_head_kv; /* key/value heads (divides n_head) */
    uint32_t n_vocab;   /* tokens, >= 259 (3 specials + 256 bytes) */
    uint32_t n_ctx;     /* llama.context_length */
    float rope_base;    /* llama.rope.freq_base */
    float rms_eps;      /* llama.attention.layer_norm_rms_epsilon */
    uint32_t type;      /* enum kernel_dtype of the weight matrices (norms are f32) */
    uint64_t seed;      /* PRNG seed */
    bool tied;          /* no output.weight: the output reuses token_embd.weight */
};

/* Ids of the special tokens every generated vocabulary starts with. */
#define GGUF_GEN_TOKEN_EOT 0        /* <|endoftext|> (unknown) */
#define GGUF_GEN_TOKEN_IM_START 1   /* <|im_start|> (bos) */
#define GGUF_GEN_TOKEN_IM_END 2     /* <|im_end|> (eos, padding) */
#define GGUF_GEN_FIRST_BYTE_TOKEN 3 /* byte b is token 3 + b */

/* Fills o with the preset (smollm2-135m, llama-3.2-1b, llama-3-8b, tiny; "custom" is
 * tiny's numbers); type f32, seed 0, untied. PW_ERR_NOTFOUND for an unknown name. */
enum pw_err gguf_gen_preset(const char *shape, struct gguf_gen_opts *o);

/* Checks the shape: divisibility, block multiples for the type, limits. */
enum pw_err gguf_gen_check(const struct gguf_gen_opts *o, char *err, size_t errcap);

/* Writes the model to f (positioned at 0). err gets one line on failure. */
enum pw_err gguf_gen_write(const struct gguf_gen_opts *o, FILE *f, char *err, size_t errcap);

/* Parses "f32", "q4_1", ...; false if unknown. */
bool gguf_gen_parse_type(const char *name, uint32_t *type);

#endif

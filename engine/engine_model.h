/*
 * engine_model: a Llama-family model loaded from GGUF onto a compute backend, and its
 * forward step over a batch of token rows (prefill chunks and decode tokens mixed).
 *
 * Load reads the llama.* hyperparameters, checks every tensor's presence, type and shape,
 * registers the weights with the backend (views into the mapped file, or the backend's
 * repacked copy), and allocates every activation buffer and the paged KV cache once.
 * engine_model_forward() then allocates nothing.
 *
 * The KV cache is indexed by block ids from engine_kv (engine_kv.h); the model does not
 * know which sequence owns which block. Not thread-safe: one caller thread (the
 * scheduler's) uses a model at a time.
 */
#ifndef ENGINE_MODEL_H
#define ENGINE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernel.h"
#include "pw_err.h"

struct engine_gguf;

struct engine_hparams {
    uint32_t n_vocab;
    uint32_t n_ctx_train; /* llama.context_length */
    uint32_t n_embd;
    uint32_t n_layer;
    uint32_t n_ff;
    uint32_t n_head;
    uint32_t n_head_kv;
    uint32_t head_dim;    /* n_embd / n_head */
    uint32_t rope_dim;    /* llama.rope.dimension_count, default head_dim */
    float rope_base;      /* llama.rope.freq_base, default 10000 */
    float rms_eps;        /* llama.attention.layer_norm_rms_epsilon */
    bool tied_output;     /* no output.weight: logits use token_embd.weight */
    uint32_t weight_type; /* enum kernel_dtype of the attention/FFN weights (first layer) */
};

struct engine_model_opts {
    uint32_t max_tok;      /* most token rows in one forward step (chunked prefill size) */
    uint32_t max_logits;   /* most rows that need logits in one step (>= max batch) */
    uint32_t n_ctx;        /* longest sequence served (<= n_ctx_train; 0 = n_ctx_train) */
    uint32_t block_tokens; /* KV block size in tokens (default 16) */
    uint32_t n_kv_blocks;  /* KV blocks; 0 = sized by the backend's memory (below), or
                              where it has no ops->mem_info, enough for max_logits
                              sequences of n_ctx */
    float kv_mem_fraction; /* with n_kv_blocks 0 on a device backend: fill this fraction of
                              the memory free after weights and buffers; 0 = 0.90 */
};

struct engine_model;

/*
 * Loads path onto be (borrowed; must outlive the model). On failure returns PW_ERR_PARSE /
 * PW_ERR_UNSUPPORTED / PW_ERR_IO / PW_ERR_NOMEM with one line in err.
 */
enum pw_err engine_model_load(const char *path, struct kernel_backend *be,
                              const struct engine_model_opts *opts, struct engine_model **out,
                              char *err, size_t errcap);
void engine_model_destroy(struct engine_model *m);

const struct engine_hparams *engine_model_hparams(const struct engine_model *m);
/* The model's GGUF file (for the tokenizer and chat template); borrowed from the model. */
const struct engine_gguf *engine_model_gguf(const struct engine_model *m);
/*
 * KV blocks that fit `fraction` of `free_bytes` at `block_bytes` each (K and V of all
 * layers), at most `cap`; 0 when not even one fits. Pure; engine_model_load uses it.
 */
uint32_t engine_kv_blocks_for_memory(size_t free_bytes, double fraction, size_t block_bytes,
                                     uint32_t cap);

/* The effective options after defaults (n_ctx, n_kv_blocks, ...). */
const struct engine_model_opts *engine_model_opts(const struct engine_model *m);
/* Bytes of the KV cache and of the activation buffers. */
size_t engine_model_kv_bytes(const struct engine_model *m);

/*
 * Runs one step over b (b->n_tok <= max_tok; block_table covers every position) and
 * writes the logits of the rows logit_rows[0..n_logits) into logits (host memory,
 * [n_logits][n_vocab]). The K/V of b's tokens is stored in the cache as a side effect.
 */
void engine_model_forward(struct engine_model *m, const struct kernel_batch *b,
                          const int32_t *logit_rows, uint32_t n_logits, float *logits);

/* The last step's logits ([n_logits][n_vocab] floats, backend memory); for tests. */
const float *engine_model_logits_device(const struct engine_model *m);

/* Whether the backend can pick candidates on the device (engine_model_forward_topk). */
bool engine_model_has_topk(const struct engine_model *m);

/*
 * engine_model_forward, but instead of whole logit rows only the k (1..KERNEL_TOPK_MAX)
 * largest logits of each row cross to the host: vals/idx [n_logits][k] (descending,
 * lower id first on ties) and lse[n_logits] (the row's log-sum-exp; may be NULL). Needs
 * engine_model_has_topk(); n_logits >= 1.
 */
void engine_model_forward_topk(struct engine_model *m, const struct kernel_batch *b,
                               const int32_t *logit_rows, uint32_t n_logits, uint32_t k,
                               float *vals, int32_t *idx, float *lse);

#endif

/*
 * kernel: the compute backend interface the engine's model code calls.
 *
 * A backend is a table of function pointers (struct kernel_ops) plus private state;
 * kernels/cpu implements it today, kernels/cuda will implement the same table. The engine
 * never looks inside a backend: it registers weights once at load, allocates its
 * activation buffers and KV cache once at load, and then runs a forward step as a
 * sequence of op calls on those buffers. The forward pass allocates nothing.
 *
 * Memory model
 *   - "Device pointers" (float *x, ...) come from ops->alloc and live in the backend's
 *     memory (host memory on the CPU backend, GPU memory on CUDA). Host code reads and
 *     writes them only through ops->upload / ops->download.
 *   - Weights are registered with ops->weight_create from host bytes in GGUF layout
 *     (usually a view into the mmapped model file). The backend may repack them into its
 *     preferred layout (the CPU backend interleaves 16 rows for int8 SIMD dot products);
 *     a backend that repacks owns its copy, one that does not borrows the bytes, so the
 *     caller keeps the mapping alive until ops->weight_destroy.
 *   - struct kernel_batch and the other host arrays passed to ops are borrowed for the
 *     duration of the call only.
 *
 * Ordering and errors
 *   - Ops are issued from one thread at a time per backend (the engine's worker thread);
 *     a backend is not thread-safe. Ops run in issue order. On the CPU backend every op
 *     has finished when it returns (it uses its own thread pool internally); a device
 *     backend may queue them, so results are visible to the host only after ops->sync or
 *     ops->download.
 *   - Setup calls (create, alloc, weight_create, kv_create, reserve) return enum pw_err.
 *     Ops return void: their shapes are the caller's contract, and a violation is a
 *     programmer error caught by PW_ASSERT. Device-side failures are reported by the
 *     next ops->sync.
 *
 * Shapes: every activation is row-major, one row per token: x[n_tok][n] floats.
 */
#ifndef KERNEL_H
#define KERNEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernel_quant.h"
#include "pw_err.h"

struct kernel_backend;
struct kernel_weight;
struct kernel_kv;

/* Capability bits reported by ops->caps. */
enum kernel_cap {
    KERNEL_CAP_DEVICE_MEMORY = 1u << 0, /* device pointers are not host-addressable */
    KERNEL_CAP_REPACKS = 1u << 1,       /* weight_create copies/repacks quantized weights */
    KERNEL_CAP_INT8_DOT = 1u << 2,      /* quantized matmul uses integer dot products */
    KERNEL_CAP_ACT_Q8 = 1u << 3,        /* quantized matmul rounds activations to 8 bits */
};

/*
 * Precision of the activations in quantized matmuls. Each row of x is quantized per
 * 32-element block to integers with a per-block scale, then multiplied against the
 * quantized weights with exact integer dot products:
 *   Q16: 16 bits, d = amax / 32639 (|q| <= 127 * 256 + 127: the CPU backend keeps q as
 *        two signed bytes). Error per element <= amax / 65278; the default.
 *   Q8:  8 bits, d = amax / 127. About 1.2-1.6x faster, but a block holding an outlier
 *        (real models have activations thousands of times their block's median) loses
 *        the rest of the block, which changes greedy answers on SmolLM2.
 */
enum kernel_act {
    KERNEL_ACT_DEFAULT = 0, /* PW_KERNEL_ACT=q8|q16 from the environment, else Q16 */
    KERNEL_ACT_Q16,
    KERNEL_ACT_Q8,
};

/*
 * One forward step's token rows. Token i belongs to sequence seq[i], sits at position
 * pos[i] of that sequence, and attends (causally) to that sequence's positions 0..pos[i].
 * Prefill chunks and decode tokens of different sequences mix freely in one batch, in any
 * order; the K/V of every position a token attends to must be in the cache before
 * ops->attention runs (ops->kv_write writes this step's tokens first).
 */
struct kernel_batch {
    uint32_t n_tok;             /* rows in this step */
    const int32_t *tokens;      /* [n_tok] token ids (used by ops->embed) */
    const int32_t *pos;         /* [n_tok] position of each token in its sequence, >= 0 */
    const int32_t *seq;         /* [n_tok] sequence slot, 0 .. n_seq-1 */
    uint32_t n_seq;             /* rows of block_table */
    uint32_t max_blocks;        /* row stride of block_table, in entries */
    const int32_t *block_table; /* [n_seq][max_blocks] physical KV block of each logical
                                   block; logical block = pos / kv block_tokens */
};

/*
 * Paged KV cache shape. K and V of every layer live in n_blocks physical blocks of
 * block_tokens tokens each; a block id indexes the same block in every layer. Layout of
 * one block of one layer (K and V alike), F16:
 *
 *   +-- kv head 0 --------------------+-- kv head 1 ----------- ... -+
 *   | tok 0: head_dim | tok 1: ... |..| tok 0: head_dim | ...        |
 *   +---------------------------------+------------------------ ... -+
 *
 * so the keys of one head inside a block are contiguous (block_tokens x head_dim).
 */
struct kernel_kv_desc {
    uint32_t n_layer;
    uint32_t n_kv_head;
    uint32_t head_dim;       /* multiple of 2 */
    uint32_t block_tokens;   /* tokens per block, e.g. 16 */
    uint32_t n_blocks;       /* physical blocks */
    enum kernel_dtype dtype; /* KERNEL_DTYPE_F16 (the only one supported today) */
};

/* One product of a matmul group: y[n_tok][w->n_out] (+)= x[n_tok][n_in] * w^T. */
struct kernel_mm {
    const struct kernel_weight *w;
    float *y;        /* device pointer, row stride w's n_out */
    bool accumulate; /* true: y += x w^T (fuses a residual add); false: y = x w^T */
};

/* What ops->step_begin decided (see struct kernel_ops). */
enum kernel_step {
    KERNEL_STEP_EAGER = 0,
    KERNEL_STEP_RECORD,
    KERNEL_STEP_REPLAYED,
};

#define KERNEL_TOPK_MAX 64 /* most candidates ops->topk returns per row */

struct kernel_ops {
    /* Short backend name, e.g. "cpu-avx512". */
    const char *(*name)(const struct kernel_backend *be);
    /* enum kernel_cap bits. */
    uint32_t (*caps)(const struct kernel_backend *be);
    /* Frees the backend; every weight, buffer and KV cache must be destroyed first. */
    void (*destroy)(struct kernel_backend *be);

    /*
     * Sizes internal scratch for steps of up to max_tok rows and rows of up to max_cols
     * elements (the largest matmul input width, attention's q width included). Call once
     * at load, before any op; ops with larger shapes are programmer errors.
     */
    enum pw_err (*reserve)(struct kernel_backend *be, uint32_t max_tok, uint32_t max_cols);

    /* Device memory: 64-byte aligned, uninitialised. free(NULL) is a no-op. */
    enum pw_err (*alloc)(struct kernel_backend *be, size_t bytes, void **out);
    void (*free)(struct kernel_backend *be, void *ptr);
    void (*upload)(struct kernel_backend *be, void *dst, const void *src, size_t bytes);
    void (*download)(struct kernel_backend *be, void *dst, const void *src, size_t bytes);
    /* Waits for queued ops; returns the first error since the last sync. */
    enum pw_err (*sync)(struct kernel_backend *be);

    /*
     * Registers a weight of n_out rows of n_in elements, GGUF layout (row r at
     * data + r * kernel_dtype_row_bytes(dtype, n_in)). n_in must be a multiple of the
     * block size. Vectors (norm weights) are n_out = 1. `data` is borrowed until
     * weight_destroy unless the backend reports KERNEL_CAP_REPACKS and copies it (it may
     * still borrow F32/F16/BF16 data). Fails with UNSUPPORTED for other dtypes.
     */
    enum pw_err (*weight_create)(struct kernel_backend *be, enum kernel_dtype dtype, uint32_t n_out,
                                 uint32_t n_in, const void *data, struct kernel_weight **out);
    void (*weight_destroy)(struct kernel_backend *be, struct kernel_weight *w);

    /* Allocates (and zeroes) a paged KV cache. */
    enum pw_err (*kv_create)(struct kernel_backend *be, const struct kernel_kv_desc *desc,
                             struct kernel_kv **out);
    void (*kv_destroy)(struct kernel_backend *be, struct kernel_kv *kv);

    /* ---- ops (see the file comment for ordering and errors) ---- */

    /* out[i][:] = row tokens[i] of table (any supported dtype), dequantized. */
    void (*embed)(struct kernel_backend *be, const struct kernel_weight *table,
                  const struct kernel_batch *b, float *out);
    /* y[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w; w is an F32 1 x n weight; y may be x. */
    void (*rmsnorm)(struct kernel_backend *be, const float *x, const struct kernel_weight *w,
                    float *y, uint32_t n_tok, uint32_t n, float eps);
    /*
     * For each of n_mm products (all with the same n_in): y = x w^T or y += x w^T.
     * Quantized weights: x is quantized per 32-element block to 16 bits (scale
     * amax/32639) or, with KERNEL_ACT_Q8, to 8 bits (scale amax/127), and the dot products
     * are integer; float weights: float dot products. y must not overlap x.
     * Batch invariance: row t of y depends only on row t of x and the weights, bit for
     * bit: not on n_tok, on t, on the other rows, or on the thread count.
     */
    void (*matmul)(struct kernel_backend *be, const float *x, uint32_t n_tok,
                   const struct kernel_mm *mm, uint32_t n_mm);
    /*
     * Rotary embedding in place, Llama "normal" style (adjacent pairs x[2j], x[2j+1]
     * rotated by pos * freq_base^(-2j/rope_dim), j < rope_dim/2; dims >= rope_dim kept).
     * x is [n_tok][n_head * head_dim]; positions from b->pos.
     */
    void (*rope)(struct kernel_backend *be, float *x, const struct kernel_batch *b, uint32_t n_head,
                 uint32_t head_dim, uint32_t rope_dim, float freq_base);
    /* out = silu(gate) * up, n floats; out may alias gate or up. */
    void (*swiglu)(struct kernel_backend *be, const float *gate, const float *up, float *out,
                   size_t n);
    /* y += x, n floats. */
    void (*add)(struct kernel_backend *be, float *y, const float *x, size_t n);
    /* Row-wise softmax in place: x is [n_rows][n]. */
    void (*softmax)(struct kernel_backend *be, float *x, uint32_t n_rows, uint32_t n);
    /* dst[i][:] = src[rows[i]][:] for i < n (rows is host memory); gathers logits rows. */
    void (*copy_rows)(struct kernel_backend *be, float *dst, const float *src, const int32_t *rows,
                      uint32_t n, uint32_t row_len);
    /*
     * Stores this step's K and V ([n_tok][n_kv_head * head_dim] each) into layer's cache
     * at (seq[i], pos[i]) through the block table.
     */
    void (*kv_write)(struct kernel_backend *be, struct kernel_kv *kv, uint32_t layer,
                     const struct kernel_batch *b, const float *k, const float *v);
    /*
     * Causal grouped-query attention over the paged cache: out[i] for query head h =
     * softmax(scale * q[i]_h . K_g[0..pos[i]]) V_g[0..pos[i]] with g = h / (n_head /
     * n_kv_head). q and out are [n_tok][n_head * head_dim]; they must not overlap.
     */
    void (*attention)(struct kernel_backend *be, const struct kernel_kv *kv, uint32_t layer,
                      const struct kernel_batch *b, const float *q, float *out, uint32_t n_head,
                      float scale);

    /*
     * Optional (NULL on backends without them): whole-step recording, so a decode step
     * costs one launch instead of one per op. The caller brackets a forward step's ops:
     *
     *   r = step_begin(be, kv, b, logit_rows, n_logits);
     *   if (r != KERNEL_STEP_REPLAYED) {
     *       ...issue the step's ops...
     *       if (r == KERNEL_STEP_RECORD && step_end(be) != PW_OK)
     *           ...issue them again (the recording failed, nothing ran)...
     *   }
     *   ...download the results...
     *
     * step_begin takes the batch and the logit rows (host arrays, borrowed for the call)
     * and makes them the step's inputs. REPLAYED: a recording of an earlier step of the
     * same shape (n_tok, n_seq, max_blocks, n_logits) ran with them; the caller issues no
     * ops. RECORD: the caller issues the ops, which are recorded, and step_end runs the
     * recording. EAGER: the caller issues the ops, which run as usual (a shape the backend
     * does not record). Every op of a recorded step must read the batch only through the
     * arguments step_begin saw: the same b and logit_rows. A replay repeats the recorded
     * ops on the recorded buffers: a caller issues the same ops on the same buffers for
     * every step of one shape. Freeing or destroying anything, or reserve, drops the
     * recordings.
     */
    enum kernel_step (*step_begin)(struct kernel_backend *be, const struct kernel_kv *kv,
                                   const struct kernel_batch *b, const int32_t *logit_rows,
                                   uint32_t n_logits);
    enum pw_err (*step_end)(struct kernel_backend *be);

    /*
     * Optional: for each of n_rows rows of x ([n_rows][n] floats, device memory), the k
     * largest values in descending order and their column indices (ties: the lower index
     * first), k <= KERNEL_TOPK_MAX and k <= n, into host arrays vals[n_rows][k] and
     * idx[n_rows][k]; lse[r] (host, may be NULL) = log(sum_j exp(x[r][j])). Waits for the
     * results, like download. Samplers use it so only the candidates cross to the host.
     */
    void (*topk)(struct kernel_backend *be, const float *x, uint32_t n_rows, uint32_t n, uint32_t k,
                 float *vals, int32_t *idx, float *lse);

    /*
     * Optional: free and total bytes of the backend's device memory now, so the engine can
     * size the KV cache from what the weights left (backends whose memory is the host's
     * leave it NULL).
     */
    enum pw_err (*mem_info)(struct kernel_backend *be, size_t *free_bytes, size_t *total_bytes);
};

/* Every backend starts with this header; the engine calls be->ops->x(be, ...). */
struct kernel_backend {
    const struct kernel_ops *ops;
};

/* Read-only view of a registered weight's shape. */
struct kernel_weight_info {
    enum kernel_dtype dtype;
    uint32_t n_out;
    uint32_t n_in;
};

/* Every weight handle starts with its info, so the engine can read shapes directly. */
struct kernel_weight {
    struct kernel_weight_info info;
};

/* Options of the CPU backend; zero-initialised means defaults. */
struct kernel_cpu_opts {
    int n_threads;       /* compute threads; 0: one per online CPU */
    enum kernel_act act; /* activation precision of quantized matmuls */
};

/*
 * Creates the CPU backend. The SIMD level is the best the CPU supports, or
 * PW_KERNEL_ISA=scalar|avx2|avx512 from the environment (a level the CPU lacks fails with
 * UNSUPPORTED). opts->act KERNEL_ACT_DEFAULT reads PW_KERNEL_ACT=q8|q16 (other values fail
 * with CONFIG), else uses Q16; an act outside the enum fails with INVAL. opts NULL means
 * all defaults. Destroy with be->ops->destroy(be).
 */
enum pw_err kernel_cpu_create_opts(const struct kernel_cpu_opts *opts, struct kernel_backend **out);

/* kernel_cpu_create_opts with n_threads and the default activation precision. */
enum pw_err kernel_cpu_create(int n_threads, struct kernel_backend **out);

/* Convenience for a single product: y (+)= x w^T. */
static inline void kernel_matmul1(struct kernel_backend *be, const struct kernel_weight *w,
                                  const float *x, uint32_t n_tok, float *y, bool accumulate)
{
    struct kernel_mm mm = {.w = w, .y = y, .accumulate = accumulate};
    be->ops->matmul(be, x, n_tok, &mm, 1);
}

#endif

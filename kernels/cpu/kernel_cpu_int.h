/*
 * kernel_cpu_int.h: private to kernels/cpu. The CPU backend's state, its repacked weight
 * layout, the per-ISA kernel table (scalar, AVX2, AVX-512 VNNI, each in its own file
 * compiled with its own -m flags) and the thread pool.
 *
 * Repacked quantized weights ("16-row interleave"): rows are taken 16 at a time (a row
 * group; the last group is padded with zero rows). For each group and each 32-weight
 * block, one tile holds the 16 rows' quants so that 32-bit lane r of a 64-byte chunk is
 * row r, which lets one vpdpbusd with a broadcast activation dword produce 16 row sums:
 *
 *   Q4_0 / Q4_1 tile (288 / 320 bytes):
 *     chunk j = 0..3 (64 B): lane r = row r's qs[4j..4j+3] (low nibbles: weights 4j..4j+3,
 *                           high nibbles: weights 16+4j..16+4j+3, as in GGUF)
 *     d[16] f16, then (Q4_1 only) m[16] f16
 *   Q8_0 tile (544 bytes):
 *     chunk j = 0..7 (64 B): lane r = row r's qs[4j..4j+3] + 128 (stored unsigned)
 *     d[16] f16
 *
 * Tiles of a group are consecutive along the row, groups follow each other, so a group's
 * whole row band streams sequentially. Same bytes as the GGUF rows (plus padding rows).
 *
 * Activations for integer dot products are quantized per 32 floats, either to 16 bits
 * (struct cpu_q16x, d = amax/32639: the default, precise path) or to 8 bits (struct
 * cpu_q8x, d = amax/127: faster, but an outlier in a block wipes out the rest of it),
 * q = round(x/d), with the block sums the weight formats need:
 *   Q4_1: y += d_w d_x S + m_w (d_x sum);    Q4_0: y += d_w d_x (S - 8 sum);
 *   Q8_0 (stored +128): y += d_w d_x (S - 128 sum), where S = sum of stored q_w * q.
 *
 * 16-bit path: q is stored as two signed bytes, q = 256 qh + ql with ql in [-128, 127]
 * (hence |q| <= 127 * 256 + 127 = 32639, not 32767), and S = 256 S(qh) + S(ql), each
 * half an ordinary u8 x s8 dot product (vpdpbusd / vpmaddubsw) on the unchanged weight
 * tiles. This costs two int8 dot products per weight quad where vpdpwssd would also need
 * the nibbles widened to 16 bits first; measured faster at n_tok = 1 and equal when
 * batched (docs/internals/kernels.md). Every partial sum fits int32: |S| < 2^28. (The
 * AVX2 Q8_0 kernel widens to int16 and uses vpmaddwd instead; see its comment.)
 */
#ifndef KERNEL_CPU_INT_H
#define KERNEL_CPU_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <pthread.h>

#include "kernel.h"

#define CPU_GROUP_ROWS 16 /* rows per interleaved group */

/* One 32-element block of a quantized activation row. 48 bytes, 16-byte aligned. */
struct cpu_q8x {
    float d;      /* scale */
    float s;      /* d * sum(qs) */
    int32_t n8;   /* -8 * sum(qs): initial accumulator for Q4_0 */
    int32_t n128; /* -128 * sum(qs): initial accumulator for Q8_0 stored +128 */
    int8_t qs[KERNEL_QK];
};

/* One 32-element block of a 16-bit activation row: q[k] = 256 qh[k] + ql[k]. 80 bytes. */
struct cpu_q16x {
    float d;      /* scale: amax / 32639 */
    float s;      /* d * sum(q) */
    int32_t n8;   /* -8 * sum(q): added to S(ql) for Q4_0 */
    int32_t n128; /* -128 * sum(q): added to S(ql) for Q8_0 stored +128 */
    int8_t qh[KERNEL_QK];
    int8_t ql[KERNEL_QK];
};

#define CPU_Q16_LEVELS 32639.0f /* largest |q| that splits into two signed bytes */

struct cpu_weight {
    struct kernel_weight base; /* must be first */
    const void *data;          /* GGUF rows (float types: borrowed) or the repacked copy */
    void *owned;               /* repacked copy we free, or NULL */
    size_t row_bytes;          /* GGUF bytes per row */
    uint32_t n_groups;         /* row groups of 16 (quantized) */
    uint32_t n_blocks;         /* 32-element blocks per row (quantized) */
    size_t tile_bytes;         /* bytes of one (group, block) tile */
};

/* Tile size for a quantized dtype, 0 for float types. */
size_t cpu_tile_bytes(enum kernel_dtype t);

/* Dequantizes row r of a repacked weight into out[n_in] (embedding lookups). */
void cpu_weight_get_row(const struct cpu_weight *w, uint32_t r, float *out);

/* One head-group work item of attention: all query heads sharing one KV head, one token. */
struct cpu_attn_item {
    const float *q; /* [n_rep][head_dim] query heads of this group */
    float *out;     /* [n_rep][head_dim] */
    uint32_t n_rep; /* query heads per KV head */
    uint32_t head_dim;
    uint32_t n_keys; /* keys 0..n_keys-1 are visible */
    uint32_t block_tokens;
    const int32_t *blocks;  /* this sequence's block table row */
    const uint16_t *k_base; /* layer's K blocks; head offset applied by the kernel */
    const uint16_t *v_base;
    size_t block_stride; /* elements between physical blocks */
    size_t head_off;     /* elements from a block start to this KV head */
    float scale;
};

#define CPU_ROPE_MAX_DIM 256 /* largest rope_dim the cos/sin cache holds */

/* The SIMD-specific kernels. Every function is pure on its arguments. */
struct cpu_isa {
    const char *name;
    /* x[nb*32] -> nb activation blocks */
    void (*quantize_x)(const float *x, struct cpu_q8x *out, size_t nb);
    /*
     * Row groups [g0, g1) of a repacked weight times n_tok activation rows (row stride
     * ldx blocks): y[t*ldy + row] = or += result, only rows < n_out written.
     */
    void (*mm_q)(const struct cpu_weight *w, const struct cpu_q8x *x, size_t ldx, uint32_t n_tok,
                 uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc);
    /* The same for 16-bit activations. */
    void (*quantize_x16)(const float *x, struct cpu_q16x *out, size_t nb);
    void (*mm_q16)(const struct cpu_weight *w, const struct cpu_q16x *x, size_t ldx, uint32_t n_tok,
                   uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc);
    /* Float weights, rows [r0, r1) times n_tok float rows x (stride n_in). */
    void (*mm_f)(const struct cpu_weight *w, const float *x, uint32_t n_tok, uint32_t r0,
                 uint32_t r1, float *y, size_t ldy, bool acc);
    void (*rmsnorm)(const float *x, const float *w, float *y, size_t n, float eps);
    void (*swiglu)(const float *gate, const float *up, float *out, size_t n);
    void (*add)(float *y, const float *x, size_t n);
    void (*softmax)(float *x, size_t n);
    /* n floats to IEEE half, round to nearest even (KV cache writes) */
    void (*to_f16)(const float *x, uint16_t *out, size_t n);
    void (*attention)(const struct cpu_attn_item *it);
};

extern const struct cpu_isa cpu_isa_scalar;
extern const struct cpu_isa cpu_isa_avx2;
extern const struct cpu_isa cpu_isa_avx512;

/* ---- thread pool (kernel_cpu_pool.c) ---- */

/* Work function run by every thread: ith in 0..nth-1 (0 is the calling thread). */
typedef void (*cpu_pool_fn)(void *ctx, int ith, int nth);

struct cpu_pool {
    int n_threads;      /* including the caller */
    pthread_t *threads; /* [n_threads - 1] workers */
    cpu_pool_fn fn;     /* current job */
    void *ctx;
    atomic_uint gen;     /* job generation; futex word the workers sleep on */
    atomic_int pending;  /* workers still running the current job */
    atomic_int sleepers; /* workers blocked in futex_wait */
    atomic_int stop;
    atomic_int bar_count; /* barrier arrivals */
    atomic_uint bar_gen;  /* barrier generation */
};

enum pw_err cpu_pool_init(struct cpu_pool *p, int n_threads);
void cpu_pool_deinit(struct cpu_pool *p);
/* Runs fn on every thread and returns when all are done. Not reentrant. */
void cpu_pool_run(struct cpu_pool *p, cpu_pool_fn fn, void *ctx);
/* Barrier among the threads of the running job. */
void cpu_pool_barrier(struct cpu_pool *p);

#endif

/*
 * kernel_cuda_int.cuh: private to kernels/cuda. The CUDA backend's state, its device
 * weight layout, the error-check macro, the per-step batch mirror and the op entry points
 * (one op per .cu file). Included only by the kernels/cuda .cu files (CUDA C++).
 *
 * Device weight layout (weight_create uploads once; the host bytes are not kept):
 *   F32 / F16 / BF16: the GGUF rows unchanged, [n_out][n_in] (cuBLAS reads them in place).
 *   Q8_0 / Q4_0 / Q4_1: split into planes so every load is aligned and coalesced:
 *
 *     qs  [n_out][n_blocks][32 B (Q8_0) | 16 B (Q4)]   the GGUF quants, same nibble order
 *     d   [n_out][n_blocks] f16                         block scales
 *     m   [n_out][n_blocks] f16                         block minimums (Q4_1 only)
 *
 *   so row r's block b holds qs + (r * n_blocks + b) * qbytes and d[r * n_blocks + b]; the
 *   weights are the same bytes as the GGUF tensor, reordered.
 *
 * Threading: one host thread at a time per backend (kernel.h); every op is queued on
 * cb->stream in issue order, which is also what orders the scratch buffers between ops.
 */
#ifndef KERNEL_CUDA_INT_CUH
#define KERNEL_CUDA_INT_CUH

#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

/* The C headers spell C11-only keywords through macros that also work in C++. */
extern "C" {
#include "kernel.h"
#include "pw_err.h"
#include "pw_log.h"
}

#include "kernel_cuda.h"

#define CUDA_MV_MAX_TOK 8           /* matmuls of up to this many rows use the matvec kernel */
#define CUDA_SLAB_BYTES (64u << 20) /* dequantize-to-F16 scratch for quantized GEMMs */
#define CUDA_ATTN_SPLIT_ROWS 1024   /* (split, token) pairs of attention partials reserved */
#define CUDA_ATTN_MAX_HEAD_DIM 256
#define CUDA_MM_MAX 8 /* products per matmul call (as the CPU backend) */

/* One registered weight. Float types keep `data`; quantized types the three planes. */
struct cuda_weight {
    struct kernel_weight base; /* must be first */
    void *data;                /* F32/F16/BF16 rows, [n_out][n_in] */
    uint8_t *qs;               /* quantized: [n_out][n_blocks][qbytes] */
    __half *d;                 /* quantized: [n_out][n_blocks] */
    __half *m;                 /* Q4_1: [n_out][n_blocks]; else NULL */
    uint32_t n_blocks;         /* 32-element blocks per row (quantized) */
    size_t bytes;              /* device bytes of all planes */
};

/* The same weight as a by-value kernel argument. */
struct cuda_wview {
    int dtype; /* enum kernel_dtype */
    uint32_t n_out;
    uint32_t n_in;
    uint32_t n_blocks;
    const void *data;
    const uint8_t *qs;
    const __half *d;
    const __half *m;
};

struct cuda_kv {
    struct kernel_kv_desc desc;
    __half *k;           /* [n_layer][n_blocks][n_kv_head][block_tokens][head_dim] */
    __half *v;           /* same */
    size_t block_stride; /* elements per block of one layer */
    size_t layer_stride; /* elements per layer */
};

/*
 * Device copy of the host arrays of the current struct kernel_batch. Ops get the batch as
 * host pointers; the mirror uploads only what changed since the last op (normally once per
 * step), compares the cached host copy first, and checks the block table on the host (the
 * PW_ASSERTs the CPU backend does per token).
 */
struct cuda_batch {
    int32_t *d_tokens; /* [max_tok] */
    int32_t *d_pos;    /* [max_tok] */
    int32_t *d_seq;    /* [max_tok] */
    int32_t *d_table;  /* [table_cap] */
    size_t table_cap;  /* entries of d_table */
    int32_t *h_tokens; /* host copies of what the device holds */
    int32_t *h_pos;
    int32_t *h_seq;
    int32_t *h_table; /* [table_cap] */
    uint32_t *h_need; /* [need_cap] logical blocks each sequence uses (scratch) */
    size_t need_cap;
    uint32_t n_tokens; /* rows valid in h_tokens (0: none) */
    uint32_t n_posseq; /* rows valid in h_pos/h_seq */
    uint32_t n_seq;    /* shape of h_table (0: none) */
    uint32_t max_blocks;
    bool spoiled; /* an upload was needed while recording (kernel_cuda_graph.cu) */
};

/* One recorded decode step (ops->step_begin): a CUDA graph and the shape it was made for. */
struct cuda_graph {
    uint32_t n_tok, n_seq, max_blocks, n_logits;
    cudaGraphExec_t exec;
};

#define CUDA_TOPK_SCRATCH (64 * 16) /* bytes per row of top-1 segment partials (topk.cu) */
#define CUDA_GRAPH_MAX 64           /* recorded shapes kept per backend */
#define CUDA_GRAPH_MAX_TOK 64       /* steps of more rows run eagerly (prefill, big batches) */
#define CUDA_BLAS_WS (32u << 20)    /* cuBLAS workspace: fixed, so GEMMs can be recorded */

struct cuda_backend {
    struct kernel_backend base; /* must be first */
    int device;                 /* CUDA ordinal */
    int n_sm;                   /* streaming multiprocessors */
    int cc;                     /* compute capability, 10 * major + minor */
    char name[48];
    cudaStream_t stream;
    cublasHandle_t blas;
    enum pw_err err; /* first failure since the last sync */

    uint32_t max_tok;   /* reserved rows per step */
    uint32_t max_cols;  /* reserved row width */
    void *xh;           /* [max_tok][max_cols] F16/BF16 copy of a GEMM input */
    float *gemm_consts; /* [4]: the GEMM path's alpha, 0, 1 and amax (matmul.cu) */
    int32_t *d_rows;    /* [max_tok] copy_rows indices */
    int32_t *d_map;     /* [max_tok] attention's row map (rows not in a prefill run) */
    int32_t *h_map;     /* [max_tok] its host side */
    float *topk_buf;    /* ops->topk results: [max_tok][TOPK_MAX] values, indices, [max_tok] lse */
    float *attn_o;      /* [CUDA_ATTN_SPLIT_ROWS][max_cols] split-attention partials */
    float *attn_ml;     /* [CUDA_ATTN_SPLIT_ROWS][max_cols / 2][2] their (max, sum) */
    __half *slab;       /* dequantized weight rows for quantized GEMMs */
    size_t slab_bytes;
    struct cuda_batch batch;
    void *blas_ws; /* CUDA_BLAS_WS bytes, owned */

    /* prefill attention through cuBLAS (kernel_cuda_attention.cu), grown on demand */
    void *att_ws;
    size_t att_ws_bytes;
    bool att_sm_attr; /* the one-pass softmax may use more than 48 KiB of shared memory */

    /* step recording (kernel_cuda_graph.cu) */
    struct cuda_graph graphs[CUDA_GRAPH_MAX];
    uint32_t n_graphs;
    bool recording;        /* between a step_begin that returned RECORD and its step_end */
    struct cuda_graph rec; /* the shape being recorded */
    bool graphs_off;       /* PW_CUDA_GRAPHS=0, or a recording failed */
    uint32_t rows_n;       /* logit rows the mirror holds in d_rows (valid while recording) */
    int32_t *h_rows;       /* [max_tok] host copy of d_rows */
    uint64_t steps_replayed, steps_recorded, steps_eager; /* logged at destroy */
};

static inline struct cuda_backend *cuda_cb(struct kernel_backend *be)
{
    return (struct cuda_backend *)be;
}

/*
 * Every CUDA runtime call goes through CUDA_CHECK: on failure it logs the statement, the
 * device and file:line, keeps the first error in cb->err for the next ops->sync (cb may
 * be NULL before the backend exists) and returns the pw_err. CUDA_LAUNCHED checks a kernel
 * launch; CUBLAS_CHECK does the same for cuBLAS status codes.
 */
enum pw_err cuda_check_at(struct cuda_backend *cb, cudaError_t e, const char *stmt,
                          const char *file, int line);
enum pw_err cublas_check_at(struct cuda_backend *cb, cublasStatus_t s, const char *stmt,
                            const char *file, int line);
#define CUDA_CHECK(cb, stmt) cuda_check_at((cb), (stmt), #stmt, __FILE__, __LINE__)
#define CUBLAS_CHECK(cb, stmt) cublas_check_at((cb), (stmt), #stmt, __FILE__, __LINE__)
#define CUDA_LAUNCHED(cb, what) cuda_check_at((cb), cudaGetLastError(), what, __FILE__, __LINE__)

/* Makes the backend's device current on the calling thread (cheap when it already is). */
void cuda_enter(struct cuda_backend *cb);

/* Blocks for a 1-D launch over n items, capped so the grid stays small (grid-stride). */
static inline unsigned cuda_blocks(size_t n, unsigned threads)
{
    size_t b = (n + threads - 1) / threads;
    if (b > 65535u * 16u)
        b = 65535u * 16u;
    return b ? (unsigned)b : 1u;
}

/* ---- the batch mirror (kernel_cuda.cu) ---- */
enum {
    CUDA_BATCH_TOKENS = 1u << 0,
    CUDA_BATCH_POS = 1u << 1,   /* pos and seq */
    CUDA_BATCH_TABLE = 1u << 2, /* block table (checked against block_tokens, n_blocks) */
};
/* Brings the mirror up to date for the parts in `what`; asserts the batch's invariants. */
void cuda_batch_sync(struct cuda_backend *cb, const struct kernel_batch *b, unsigned what,
                     uint32_t block_tokens, uint32_t n_blocks);

struct cuda_wview cuda_weight_view(const struct kernel_weight *kw);

/* ---- step recording (kernel_cuda_graph.cu) ---- */
enum kernel_step cuda_step_begin(struct kernel_backend *be, const struct kernel_kv *kv,
                                 const struct kernel_batch *b, const int32_t *logit_rows,
                                 uint32_t n_logits);
enum pw_err cuda_step_end(struct kernel_backend *be);
/* Drops every recording: call before freeing or moving anything a recording points at. */
void cuda_graphs_reset(struct cuda_backend *cb);
/* Puts logit rows into d_rows (uploading only when they changed); false on a CUDA error or
 * when a recording would need an upload it cannot hold. */
bool cuda_rows_put(struct cuda_backend *cb, const int32_t *rows, uint32_t n);

/* Element k of row r of a weight, dequantized exactly as kernel_dequantize_row does. */
__device__ __forceinline__ float cuda_weight_at(const struct cuda_wview &w, uint32_t r, uint32_t k)
{
    switch (w.dtype) {
    case KERNEL_DTYPE_F32:
        return ((const float *)w.data)[(size_t)r * w.n_in + k];
    case KERNEL_DTYPE_F16:
        return __half2float(((const __half *)w.data)[(size_t)r * w.n_in + k]);
    case KERNEL_DTYPE_BF16:
        return __bfloat162float(((const __nv_bfloat16 *)w.data)[(size_t)r * w.n_in + k]);
    default:
        break;
    }
    size_t blk = (size_t)r * w.n_blocks + k / KERNEL_QK;
    uint32_t j = k % KERNEL_QK;
    float d = __half2float(w.d[blk]);
    if (w.dtype == KERNEL_DTYPE_Q8_0)
        return __fmul_rn(d, (float)(int8_t)w.qs[blk * 32 + j]);
    uint8_t q = w.qs[blk * 16 + (j & 15)];
    int v = j < 16 ? (q & 0x0f) : (q >> 4);
    if (w.dtype == KERNEL_DTYPE_Q4_0)
        return __fmul_rn(d, (float)(v - 8));
    /* Q4_1: no fused multiply-add, to match the C reference bit for bit */
    return __fadd_rn(__fmul_rn(d, (float)v), __half2float(w.m[blk]));
}

/* Warp-wide sum; every lane gets the result. */
__device__ __forceinline__ float cuda_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float cuda_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---- ops, one per file (kernel_cuda_<op>.cu); signatures as in struct kernel_ops ---- */
void cuda_op_embed(struct kernel_backend *be, const struct kernel_weight *table,
                   const struct kernel_batch *b, float *out);
void cuda_op_rmsnorm(struct kernel_backend *be, const float *x, const struct kernel_weight *w,
                     float *y, uint32_t n_tok, uint32_t n, float eps);
void cuda_op_matmul(struct kernel_backend *be, const float *x, uint32_t n_tok,
                    const struct kernel_mm *mm, uint32_t n_mm);
void cuda_op_rope(struct kernel_backend *be, float *x, const struct kernel_batch *b,
                  uint32_t n_head, uint32_t head_dim, uint32_t rope_dim, float freq_base);
void cuda_op_swiglu(struct kernel_backend *be, const float *gate, const float *up, float *out,
                    size_t n);
void cuda_op_add(struct kernel_backend *be, float *y, const float *x, size_t n);
void cuda_op_softmax(struct kernel_backend *be, float *x, uint32_t n_rows, uint32_t n);
void cuda_op_copy_rows(struct kernel_backend *be, float *dst, const float *src, const int32_t *rows,
                       uint32_t n, uint32_t row_len);
void cuda_op_kv_write(struct kernel_backend *be, struct kernel_kv *kv, uint32_t layer,
                      const struct kernel_batch *b, const float *k, const float *v);
void cuda_op_topk(struct kernel_backend *be, const float *x, uint32_t n_rows, uint32_t n,
                  uint32_t k, float *vals, int32_t *idx, float *lse);
void cuda_op_attention(struct kernel_backend *be, const struct kernel_kv *kv, uint32_t layer,
                       const struct kernel_batch *b, const float *q, float *out, uint32_t n_head,
                       float scale);

#endif

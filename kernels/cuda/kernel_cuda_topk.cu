/*
 * topk: the k largest values of each row (descending, lower index first on ties), their
 * indices and the row's log-sum-exp, so a sampler receives k candidates instead of a whole
 * vocabulary row (a 128256-entry row is 513 KB; 64 rows of it took longer to copy than
 * the decode step that made them).
 *
 * One block per row. Values map to order-preserving 32-bit keys (NaN just below -inf, -0
 * as +0). A radix select finds the k-th largest key T in four 8-bit passes over the row
 * (shared-memory histograms of the digit under the prefix found so far); the first pass
 * also folds the
 * row into a running (max, sum of exp) for the log-sum-exp. A last pass collects every
 * element above T and, in index order, as many equal to T as are still needed; the k
 * candidates are then ranked by (key, index). Bound: memory, five reads of the row. For
 * k = 1 (greedy decoding) a single pass keeps each thread's best (key, index) instead.
 */
#include "kernel_cuda_int.cuh"

#define TOPK_THREADS 512

__device__ __forceinline__ uint32_t topk_key(float v)
{
    uint32_t u = __float_as_uint(v);
    if (isnan(v))
        return 0x007ffffeu; /* just below -inf's key (0x007fffff) */
    if (v == 0.0f)
        return 0x80000000u; /* -0 ranks as +0: ties between them go to the lower index */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(TOPK_THREADS)
    topk_kernel(const float *x, uint32_t n, uint32_t k, float *vals, int32_t *idx, float *lse)
{
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ float s_m[TOPK_THREADS / 32], s_s[TOPK_THREADS / 32];
    __shared__ uint32_t c_key[KERNEL_TOPK_MAX];
    __shared__ int32_t c_idx[KERNEL_TOPK_MAX];
    __shared__ uint32_t s_ngt, s_base;
    __shared__ uint32_t s_warp_eq[TOPK_THREADS / 32];

    const float *row = x + (size_t)blockIdx.x * n;
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    if (tid == 0) {
        s_prefix = 0;
        s_need = k;
    }
    uint32_t mask = 0;
    float m = -INFINITY, sum = 0.0f;
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        for (uint32_t i = tid; i < 256; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix;
        for (uint32_t i = tid; i < n; i += blockDim.x) {
            float v = row[i];
            if (pass == 0 && v > -INFINITY) { /* NaN and -inf add nothing */
                if (v > m) {
                    sum = sum * expf(m - v) + 1.0f;
                    m = v;
                } else {
                    sum += expf(v - m);
                }
            }
            uint32_t key = topk_key(v);
            /* logits crowd into a few top-byte bins: one atomic per distinct digit per
             * warp (lanes with the same digit elect a leader), not one per element */
            bool hit = (key & mask) == prefix;
            uint32_t digit = hit ? (key >> shift) & 0xffu : 0x100u;
            uint32_t active = __activemask();
            uint32_t same = __match_any_sync(active, digit);
            if (hit && (__ffs(same) - 1) == (int)lane)
                atomicAdd(&hist[digit], (uint32_t)__popc(same));
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t need = s_need, d = 255;
            for (;; d--) {
                if (hist[d] >= need || d == 0)
                    break;
                need -= hist[d];
            }
            s_need = need;
            s_prefix = prefix | (d << shift);
        }
        mask |= 0xffu << shift;
        __syncthreads();
    }
    /* log-sum-exp: merge the threads' (max, sum) */
    {
        float wm = cuda_warp_max(m);
        float ws = sum * (m > -INFINITY ? expf(m - wm) : 0.0f);
        ws = cuda_warp_sum(ws);
        if (lane == 0) {
            s_m[warp] = wm;
            s_s[warp] = ws;
        }
        __syncthreads();
        if (tid == 0) {
            float bm = -INFINITY, bs = 0.0f;
            for (uint32_t w = 0; w < blockDim.x / 32; w++)
                bm = fmaxf(bm, s_m[w]);
            for (uint32_t w = 0; w < blockDim.x / 32; w++)
                if (s_m[w] > -INFINITY)
                    bs += s_s[w] * expf(s_m[w] - bm);
            if (lse)
                lse[blockIdx.x] = bm > -INFINITY ? bm + logf(bs) : -INFINITY;
            s_ngt = 0;
            s_base = 0;
        }
        __syncthreads();
    }
    const uint32_t T = s_prefix, need_eq = s_need, n_gt = k - need_eq;
    /* collect: everything above T (any order), then the first need_eq equal to T */
    for (uint32_t c0 = 0; c0 < n; c0 += blockDim.x) {
        uint32_t i = c0 + tid;
        uint32_t key = i < n ? topk_key(row[i]) : 0;
        bool gt = i < n && key > T, eq = i < n && key == T;
        if (gt) {
            uint32_t slot = atomicAdd(&s_ngt, 1u);
            c_key[slot] = key;
            c_idx[slot] = (int32_t)i;
        }
        /* rank of this equal element in index order: ballots within the warp, then the
         * warps before it, then the chunks before this one (s_base) */
        uint32_t bal = __ballot_sync(0xffffffffu, eq);
        if (lane == 0)
            s_warp_eq[warp] = __popc(bal);
        __syncthreads();
        uint32_t before = s_base + __popc(bal & ((1u << lane) - 1u));
        for (uint32_t w = 0; w < warp; w++)
            before += s_warp_eq[w];
        if (eq && before < need_eq) {
            c_key[n_gt + before] = key;
            c_idx[n_gt + before] = (int32_t)i;
        }
        __syncthreads();
        if (tid == 0)
            for (uint32_t w = 0; w < blockDim.x / 32; w++)
                s_base += s_warp_eq[w];
        __syncthreads();
        if (s_base >= need_eq && s_ngt == n_gt) /* uniform: read after a barrier */
            break;
    }
    __syncthreads();
    if (tid < k) {
        uint32_t key = c_key[tid];
        int32_t id = c_idx[tid];
        uint32_t rank = 0;
        for (uint32_t j = 0; j < k; j++)
            rank += c_key[j] > key || (c_key[j] == key && c_idx[j] < id);
        vals[(size_t)blockIdx.x * k + rank] = row[id];
        idx[(size_t)blockIdx.x * k + rank] = id;
    }
}

/*
 * k = 1 (greedy decoding): the row is cut into TOP1_SEG-element segments, one block each
 * (a whole vocabulary row is too much for one SM to read quickly), each writing its best
 * (key << 32 | ~index) and its (max, sum of exp); top1_merge_kernel folds them per row.
 */
#define TOP1_SEG 4096
#define TOP1_MAX_SEGS 64 /* rows of up to 256 Ki entries; longer rows use topk_kernel */

__global__ void __launch_bounds__(TOPK_THREADS)
    top1_kernel(const float *x, uint32_t n, uint64_t *p_best, float2 *p_ms)
{
    __shared__ uint64_t s_best[TOPK_THREADS / 32];
    __shared__ float s_m[TOPK_THREADS / 32], s_s[TOPK_THREADS / 32];
    const uint32_t seg = blockIdx.x, n_seg = gridDim.x;
    const float *row = x + (size_t)blockIdx.y * n;
    const uint32_t tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const uint32_t i0 = seg * TOP1_SEG, i1 = min(n, i0 + TOP1_SEG);
    uint64_t best = 0; /* key << 32 | ~index: larger key, then lower index, wins */
    float m = -INFINITY, sum = 0.0f;
    for (uint32_t i = i0 + tid; i < i1; i += blockDim.x) {
        float v = row[i];
        uint64_t c = ((uint64_t)topk_key(v) << 32) | (uint32_t)~i;
        best = c > best ? c : best;
        if (v > -INFINITY) {
            if (v > m) {
                sum = sum * expf(m - v) + 1.0f;
                m = v;
            } else {
                sum += expf(v - m);
            }
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t c = __shfl_xor_sync(0xffffffffu, best, o);
        best = c > best ? c : best;
    }
    float wm = cuda_warp_max(m);
    float ws = cuda_warp_sum(sum * (m > -INFINITY ? expf(m - wm) : 0.0f));
    if (lane == 0) {
        s_best[warp] = best;
        s_m[warp] = wm;
        s_s[warp] = ws;
    }
    __syncthreads();
    if (tid == 0) {
        float bm = -INFINITY, bs = 0.0f;
        for (uint32_t w = 0; w < blockDim.x / 32; w++) {
            best = s_best[w] > best ? s_best[w] : best;
            bm = fmaxf(bm, s_m[w]);
        }
        for (uint32_t w = 0; w < blockDim.x / 32; w++)
            if (s_m[w] > -INFINITY)
                bs += s_s[w] * expf(s_m[w] - bm);
        p_best[(size_t)blockIdx.y * n_seg + seg] = best;
        p_ms[(size_t)blockIdx.y * n_seg + seg] = make_float2(bm, bs);
    }
}

/* One warp per row: the best of the row's segments and their merged log-sum-exp. */
__global__ void top1_merge_kernel(const float *x, uint32_t n, uint32_t n_seg,
                                  const uint64_t *p_best, const float2 *p_ms, float *vals,
                                  int32_t *idx, float *lse)
{
    const uint32_t r = blockIdx.x, lane = threadIdx.x;
    uint64_t best = 0;
    float m = -INFINITY;
    for (uint32_t s = lane; s < n_seg; s += 32) {
        uint64_t c = p_best[(size_t)r * n_seg + s];
        best = c > best ? c : best;
        m = fmaxf(m, p_ms[(size_t)r * n_seg + s].x);
    }
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t c = __shfl_xor_sync(0xffffffffu, best, o);
        best = c > best ? c : best;
    }
    m = cuda_warp_max(m);
    float sum = 0.0f;
    for (uint32_t s = lane; s < n_seg; s += 32) {
        float2 ms = p_ms[(size_t)r * n_seg + s];
        if (ms.x > -INFINITY)
            sum += ms.y * expf(ms.x - m);
    }
    sum = cuda_warp_sum(sum);
    if (lane == 0) {
        uint32_t id = ~(uint32_t)best;
        idx[r] = (int32_t)id;
        vals[r] = x[(size_t)r * n + id];
        lse[r] = m > -INFINITY ? m + logf(sum) : -INFINITY;
    }
}

void cuda_op_topk(struct kernel_backend *be, const float *x, uint32_t n_rows, uint32_t n,
                  uint32_t k, float *vals, int32_t *idx, float *lse)
{
    struct cuda_backend *cb = cuda_cb(be);
    PW_ASSERT(k >= 1 && k <= KERNEL_TOPK_MAX && k <= n && n_rows >= 1 && n_rows <= cb->max_tok);
    PW_ASSERT(!cb->recording);
    cuda_enter(cb);
    float *dv = cb->topk_buf;
    int32_t *di = (int32_t *)(dv + (size_t)cb->max_tok * KERNEL_TOPK_MAX);
    float *dl = (float *)(di + (size_t)cb->max_tok * KERNEL_TOPK_MAX);
    uint32_t n_seg = (n + TOP1_SEG - 1) / TOP1_SEG;
    if (k == 1 && n_seg <= TOP1_MAX_SEGS) {
        /* the segment partials live past the results in topk_buf */
        uint64_t *pb = (uint64_t *)(dl + cb->max_tok + 1);
        pb = (uint64_t *)(((uintptr_t)pb + 7) & ~(uintptr_t)7);
        float2 *pm = (float2 *)(pb + (size_t)cb->max_tok * TOP1_MAX_SEGS);
        top1_kernel<<<dim3(n_seg, n_rows), TOPK_THREADS, 0, cb->stream>>>(x, n, pb, pm);
        top1_merge_kernel<<<n_rows, 32, 0, cb->stream>>>(x, n, n_seg, pb, pm, dv, di, dl);
    } else
        topk_kernel<<<n_rows, TOPK_THREADS, 0, cb->stream>>>(x, n, k, dv, di, dl);
    if (CUDA_LAUNCHED(cb, "topk_kernel"))
        return;
    size_t nk = (size_t)n_rows * k;
    CUDA_CHECK(cb,
               cudaMemcpyAsync(vals, dv, nk * sizeof(float), cudaMemcpyDeviceToHost, cb->stream));
    CUDA_CHECK(cb,
               cudaMemcpyAsync(idx, di, nk * sizeof(int32_t), cudaMemcpyDeviceToHost, cb->stream));
    if (lse)
        CUDA_CHECK(cb, cudaMemcpyAsync(lse, dl, n_rows * sizeof(float), cudaMemcpyDeviceToHost,
                                       cb->stream));
    CUDA_CHECK(cb, cudaStreamSynchronize(cb->stream));
}

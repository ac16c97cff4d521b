/*
 * kernel_cpu_avx512: the CPU kernels for AVX-512 F/BW/VL + VNNI (compiled with those -m
 * flags only; selected at run time). The quantized matmul reads the 16-row interleave:
 * one 64-byte chunk holds 4 quants of each of 16 rows, so vpdpbusd against a broadcast
 * activation dword yields 16 row sums with no horizontal reduction. Up to MK_T tokens
 * share each weight load (prefill and multi-stream decode reuse it from registers).
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernel_cpu_int.h"

#define MK_T 8 /* tokens per microkernel call */

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE int32_t ld32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* exp(x) for x <= 88.7; relative error about 2e-7. */
static ALWAYS_INLINE __m512 exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static __mmask16 tail_mask(size_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

static void quantize_x(const float *x, struct cpu_q8x *out, size_t nb)
{
    for (size_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * KERNEL_QK);
        __m512 v1 = _mm512_loadu_ps(x + b * KERNEL_QK + 16);
        __m512 a = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
        float amax = _mm512_reduce_max_ps(a);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        /* cvtps rounds to nearest even, as the scalar nearbyintf does */
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
        _mm_storeu_si128((__m128i *)out[b].qs, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(out[b].qs + 16), _mm512_cvtepi32_epi8(q1));
        int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

/* 16 rows x T tokens over all blocks of one group, Q4_0 (q41 false) or Q4_1. */
static ALWAYS_INLINE void mk_q4(const uint8_t *gw, size_t nb, size_t tile, const struct cpu_q8x *x,
                                size_t ldx, int T, bool q41, __m512 *acc)
{
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m512i ai[MK_T];
        for (int t = 0; t < T; t++)
            ai[t] = q41 ? _mm512_setzero_si512() : _mm512_set1_epi32(x[t * ldx + b].n8);
        for (int j = 0; j < 4; j++) {
            __m512i raw = _mm512_loadu_si512(tp + 64 * j);
            __m512i lo = _mm512_and_si512(raw, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            for (int t = 0; t < T; t++) {
                const int8_t *qs = x[t * ldx + b].qs;
                ai[t] = _mm512_dpbusd_epi32(ai[t], lo, _mm512_set1_epi32(ld32(qs + 4 * j)));
                ai[t] = _mm512_dpbusd_epi32(ai[t], hi, _mm512_set1_epi32(ld32(qs + 16 + 4 * j)));
            }
        }
        __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tp + 256)));
        if (q41) {
            __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tp + 288)));
            for (int t = 0; t < T; t++) {
                const struct cpu_q8x *xb = &x[t * ldx + b];
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[t]),
                                         _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[t]);
                acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb->s), acc[t]);
            }
        } else {
            for (int t = 0; t < T; t++) {
                const struct cpu_q8x *xb = &x[t * ldx + b];
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[t]),
                                         _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[t]);
            }
        }
    }
}

/* Q8_0 stored +128: S - 128 sum through the n128 initial accumulator. */
static ALWAYS_INLINE void mk_q8(const uint8_t *gw, size_t nb, size_t tile, const struct cpu_q8x *x,
                                size_t ldx, int T, __m512 *acc)
{
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m512i ai[MK_T];
        for (int t = 0; t < T; t++)
            ai[t] = _mm512_set1_epi32(x[t * ldx + b].n128);
        for (int j = 0; j < 8; j++) {
            __m512i w = _mm512_loadu_si512(tp + 64 * j);
            for (int t = 0; t < T; t++)
                ai[t] = _mm512_dpbusd_epi32(ai[t], w,
                                            _mm512_set1_epi32(ld32(x[t * ldx + b].qs + 4 * j)));
        }
        __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tp + 512)));
        for (int t = 0; t < T; t++) {
            const struct cpu_q8x *xb = &x[t * ldx + b];
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[t]),
                                     _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[t]);
        }
    }
}

static ALWAYS_INLINE void store_rows(const __m512 *acc, int T, float *y, size_t ldy, uint32_t row0,
                                     uint32_t n_out, bool accum)
{
    __mmask16 m = tail_mask(n_out - row0);
    for (int t = 0; t < T; t++) {
        float *o = y + (size_t)t * ldy + row0;
        __m512 v = acc[t];
        if (accum)
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, o));
        _mm512_mask_storeu_ps(o, m, v);
    }
}

static ALWAYS_INLINE void mm_q_tile(const struct cpu_weight *w, const uint8_t *gw,
                                    const struct cpu_q8x *x, size_t ldx, int T, float *y,
                                    size_t ldy, uint32_t row0, bool accum)
{
    __m512 acc[MK_T];
    switch (w->base.info.dtype) {
    case KERNEL_DTYPE_Q4_0:
        mk_q4(gw, w->n_blocks, w->tile_bytes, x, ldx, T, false, acc);
        break;
    case KERNEL_DTYPE_Q4_1:
        mk_q4(gw, w->n_blocks, w->tile_bytes, x, ldx, T, true, acc);
        break;
    default:
        mk_q8(gw, w->n_blocks, w->tile_bytes, x, ldx, T, acc);
        break;
    }
    store_rows(acc, T, y, ldy, row0, w->base.info.n_out, accum);
}

static void mm_q(const struct cpu_weight *w, const struct cpu_q8x *x, size_t ldx, uint32_t n_tok,
                 uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc)
{
    size_t gbytes = (size_t)w->n_blocks * w->tile_bytes;
    for (uint32_t g = g0; g < g1; g++) {
        const uint8_t *gw = (const uint8_t *)w->data + g * gbytes;
        uint32_t row0 = g * CPU_GROUP_ROWS;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += MK_T) {
            uint32_t T = n_tok - t0 < MK_T ? n_tok - t0 : MK_T;
            const struct cpu_q8x *xt = x + t0 * ldx;
            float *yt = y + t0 * ldy;
            switch (T) {
#define MM_CASE(n)                                                                                 \
    case n:                                                                                        \
        mm_q_tile(w, gw, xt, ldx, n, yt, ldy, row0, acc);                                          \
        break;
                MM_CASE(1)
                MM_CASE(2)
                MM_CASE(3)
                MM_CASE(4)
                MM_CASE(5)
                MM_CASE(6)
                MM_CASE(7)
                MM_CASE(8)
#undef MM_CASE
            }
        }
    }
}

/* ---- 16-bit activations: two vpdpbusd per weight quad (kernel_cpu_int.h) ---- */

static void quantize_x16(const float *x, struct cpu_q16x *out, size_t nb)
{
    for (size_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * KERNEL_QK);
        __m512 v1 = _mm512_loadu_ps(x + b * KERNEL_QK + 16);
        __m512 a = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
        float amax = _mm512_reduce_max_ps(a);
        float d = amax / CPU_Q16_LEVELS;
        float id = amax != 0.0f ? CPU_Q16_LEVELS / amax : 0.0f;
        __m512 vid = _mm512_set1_ps(id);
        __m512i q[2];
        q[0] = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)); /* nearest even */
        q[1] = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
        int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
        for (int i = 0; i < 2; i++) {
            /* ql = sign-extended low byte, qh = (q - ql) / 256 exactly */
            __m512i lo = _mm512_srai_epi32(_mm512_slli_epi32(q[i], 24), 24);
            __m512i hi = _mm512_srai_epi32(_mm512_sub_epi32(q[i], lo), 8);
            _mm_storeu_si128((__m128i *)(out[b].ql + 16 * i), _mm512_cvtepi32_epi8(lo));
            _mm_storeu_si128((__m128i *)(out[b].qh + 16 * i), _mm512_cvtepi32_epi8(hi));
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

/* S = 256 S(qh) + S(ql) (+ the Q4_0 / Q8_0 offset already in al), then the float update
 * shared with the 8-bit path. */
static ALWAYS_INLINE void finish16(const uint8_t *dptr, const uint8_t *mptr,
                                   const struct cpu_q16x *x, size_t ldx, size_t b, int T,
                                   const __m512i *ah, const __m512i *al, __m512 *acc)
{
    __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dptr));
    for (int t = 0; t < T; t++) {
        __m512i s = _mm512_add_epi32(_mm512_slli_epi32(ah[t], 8), al[t]);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                                 _mm512_mul_ps(dw, _mm512_set1_ps(x[t * ldx + b].d)), acc[t]);
    }
    if (mptr) {
        __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)mptr));
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[t * ldx + b].s), acc[t]);
    }
}

/* 16 rows x T tokens, Q4_0 / Q4_1, 16-bit activations. */
static ALWAYS_INLINE void mk_q4_16(const uint8_t *gw, size_t nb, size_t tile,
                                   const struct cpu_q16x *x, size_t ldx, int T, bool q41,
                                   __m512 *acc)
{
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m512i ah[MK_T], al[MK_T];
        for (int t = 0; t < T; t++) {
            ah[t] = _mm512_setzero_si512();
            al[t] = q41 ? _mm512_setzero_si512() : _mm512_set1_epi32(x[t * ldx + b].n8);
        }
        for (int j = 0; j < 4; j++) {
            __m512i raw = _mm512_loadu_si512(tp + 64 * j);
            __m512i lo = _mm512_and_si512(raw, m4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            for (int t = 0; t < T; t++) {
                const struct cpu_q16x *xb = &x[t * ldx + b];
                ah[t] = _mm512_dpbusd_epi32(ah[t], lo, _mm512_set1_epi32(ld32(xb->qh + 4 * j)));
                al[t] = _mm512_dpbusd_epi32(al[t], lo, _mm512_set1_epi32(ld32(xb->ql + 4 * j)));
                ah[t] =
                    _mm512_dpbusd_epi32(ah[t], hi, _mm512_set1_epi32(ld32(xb->qh + 16 + 4 * j)));
                al[t] =
                    _mm512_dpbusd_epi32(al[t], hi, _mm512_set1_epi32(ld32(xb->ql + 16 + 4 * j)));
            }
        }
        finish16(tp + 256, q41 ? tp + 288 : NULL, x, ldx, b, T, ah, al, acc);
    }
}

/* Q8_0 stored +128, 16-bit activations; n128 is the start value of the low half. */
static ALWAYS_INLINE void mk_q8_16(const uint8_t *gw, size_t nb, size_t tile,
                                   const struct cpu_q16x *x, size_t ldx, int T, __m512 *acc)
{
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m512i ah[MK_T], al[MK_T];
        for (int t = 0; t < T; t++) {
            ah[t] = _mm512_setzero_si512();
            al[t] = _mm512_set1_epi32(x[t * ldx + b].n128);
        }
        for (int j = 0; j < 8; j++) {
            __m512i w = _mm512_loadu_si512(tp + 64 * j);
            for (int t = 0; t < T; t++) {
                const struct cpu_q16x *xb = &x[t * ldx + b];
                ah[t] = _mm512_dpbusd_epi32(ah[t], w, _mm512_set1_epi32(ld32(xb->qh + 4 * j)));
                al[t] = _mm512_dpbusd_epi32(al[t], w, _mm512_set1_epi32(ld32(xb->ql + 4 * j)));
            }
        }
        finish16(tp + 512, NULL, x, ldx, b, T, ah, al, acc);
    }
}

static ALWAYS_INLINE void mm_q16_tile(const struct cpu_weight *w, const uint8_t *gw,
                                      const struct cpu_q16x *x, size_t ldx, int T, float *y,
                                      size_t ldy, uint32_t row0, bool accum)
{
    __m512 acc[MK_T];
    switch (w->base.info.dtype) {
    case KERNEL_DTYPE_Q4_0:
        mk_q4_16(gw, w->n_blocks, w->tile_bytes, x, ldx, T, false, acc);
        break;
    case KERNEL_DTYPE_Q4_1:
        mk_q4_16(gw, w->n_blocks, w->tile_bytes, x, ldx, T, true, acc);
        break;
    default:
        mk_q8_16(gw, w->n_blocks, w->tile_bytes, x, ldx, T, acc);
        break;
    }
    store_rows(acc, T, y, ldy, row0, w->base.info.n_out, accum);
}

static void mm_q16(const struct cpu_weight *w, const struct cpu_q16x *x, size_t ldx, uint32_t n_tok,
                   uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc)
{
    size_t gbytes = (size_t)w->n_blocks * w->tile_bytes;
    for (uint32_t g = g0; g < g1; g++) {
        const uint8_t *gw = (const uint8_t *)w->data + g * gbytes;
        uint32_t row0 = g * CPU_GROUP_ROWS;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += MK_T) {
            uint32_t T = n_tok - t0 < MK_T ? n_tok - t0 : MK_T;
            const struct cpu_q16x *xt = x + t0 * ldx;
            float *yt = y + t0 * ldy;
            switch (T) {
#define MM_CASE(n)                                                                                 \
    case n:                                                                                        \
        mm_q16_tile(w, gw, xt, ldx, n, yt, ldy, row0, acc);                                        \
        break;
                MM_CASE(1)
                MM_CASE(2)
                MM_CASE(3)
                MM_CASE(4)
                MM_CASE(5)
                MM_CASE(6)
                MM_CASE(7)
                MM_CASE(8)
#undef MM_CASE
            }
        }
    }
}

static ALWAYS_INLINE __m512 load_w(enum kernel_dtype dt, const void *row, size_t k, __mmask16 m)
{
    switch (dt) {
    case KERNEL_DTYPE_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k));
    case KERNEL_DTYPE_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + k)), 16));
    default:
        return _mm512_maskz_loadu_ps(m, (const float *)row + k);
    }
}

#define MF_T 4

static ALWAYS_INLINE void mf_row(enum kernel_dtype dt, const void *row, const float *x, size_t n_in,
                                 int T, float *out)
{
    __m512 acc[MF_T];
    for (int t = 0; t < T; t++)
        acc[t] = _mm512_setzero_ps();
    for (size_t k = 0; k < n_in; k += 16) {
        __mmask16 m = tail_mask(n_in - k);
        __m512 wv = load_w(dt, row, k, m);
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * n_in + k), acc[t]);
    }
    for (int t = 0; t < T; t++)
        out[t] = _mm512_reduce_add_ps(acc[t]);
}

static void mm_f(const struct cpu_weight *w, const float *x, uint32_t n_tok, uint32_t r0,
                 uint32_t r1, float *y, size_t ldy, bool acc)
{
    size_t n_in = w->base.info.n_in;
    enum kernel_dtype dt = w->base.info.dtype;
    for (uint32_t r = r0; r < r1; r++) {
        const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += MF_T) {
            uint32_t T = n_tok - t0 < MF_T ? n_tok - t0 : MF_T;
            float s[MF_T];
            const float *xt = x + t0 * n_in;
            switch (T) {
            case 1:
                mf_row(dt, row, xt, n_in, 1, s);
                break;
            case 2:
                mf_row(dt, row, xt, n_in, 2, s);
                break;
            case 3:
                mf_row(dt, row, xt, n_in, 3, s);
                break;
            default:
                mf_row(dt, row, xt, n_in, 4, s);
                break;
            }
            for (uint32_t t = 0; t < T; t++) {
                float *o = &y[(t0 + t) * ldy + r];
                *o = acc ? *o + s[t] : s[t];
            }
        }
    }
}

static void rmsnorm(const float *x, const float *w, float *y, size_t n, float eps)
{
    __m512 ss = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps);
    __m512 vs = _mm512_set1_ps(scale);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
    }
}

static void swiglu(const float *gate, const float *up, float *out, size_t n)
{
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, up + i)));
    }
}

static void add(float *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(
            y + i, m,
            _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

static void softmax(float *x, size_t n)
{
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (size_t i = 0; i < n; i += 16)
        mx = _mm512_max_ps(
            mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail_mask(n - i), x + i));
    __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm));
        e = _mm512_maskz_mov_ps(m, e);
        sum = _mm512_add_ps(sum, e);
        _mm512_mask_storeu_ps(x + i, m, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
    }
}

static void to_f16(const float *x, uint16_t *out, size_t n)
{
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_mask_storeu_epi16(out + i, m, h);
    }
}

#define ATT_MAX_REP 8
#define ATT_MAX_HD 256

/*
 * Online softmax one KV block (up to 16 keys) at a time: the n_rep query heads that share
 * this KV head are scored together so each K and V row is converted from F16 once.
 */
static void attention(const struct cpu_attn_item *it)
{
    uint32_t hd = it->head_dim, nr = it->n_rep, bt = it->block_tokens;
    if (hd % 16 != 0 || hd > ATT_MAX_HD || nr > ATT_MAX_REP || bt > 16) {
        cpu_isa_scalar.attention(it);
        return;
    }
    uint32_t nv = hd / 16;
    __m512 o[ATT_MAX_REP * ATT_MAX_HD / 16];
    float m[ATT_MAX_REP], l[ATT_MAX_REP];
    for (uint32_t h = 0; h < nr; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (uint32_t v = 0; v < nv; v++)
            o[h * nv + v] = _mm512_setzero_ps();
    }
    for (uint32_t t0 = 0; t0 < it->n_keys; t0 += bt) {
        uint32_t nk = it->n_keys - t0 < bt ? it->n_keys - t0 : bt;
        size_t off = (size_t)it->blocks[t0 / bt] * it->block_stride + it->head_off;
        const uint16_t *kb = it->k_base + off, *vb = it->v_base + off;
        float s[ATT_MAX_REP][16];
        for (uint32_t k = 0; k < nk; k++) {
            __m512 acc[ATT_MAX_REP];
            for (uint32_t h = 0; h < nr; h++)
                acc[h] = _mm512_setzero_ps();
            for (uint32_t v = 0; v < nv; v++) {
                __m512 kv = _mm512_cvtph_ps(
                    _mm256_loadu_si256((const __m256i *)(kb + (size_t)k * hd + v * 16)));
                for (uint32_t h = 0; h < nr; h++)
                    acc[h] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(it->q + h * hd + v * 16), acc[h]);
            }
            for (uint32_t h = 0; h < nr; h++)
                s[h][k] = _mm512_reduce_add_ps(acc[h]) * it->scale;
        }
        __mmask16 km = tail_mask(nk);
        for (uint32_t h = 0; h < nr; h++) {
            __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), km, s[h]);
            float mn = fmaxf(m[h], _mm512_reduce_max_ps(sv));
            float alpha = expf(m[h] - mn);
            __m512 p = _mm512_maskz_mov_ps(km, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mn))));
            l[h] = l[h] * alpha + _mm512_reduce_add_ps(p);
            m[h] = mn;
            _mm512_storeu_ps(s[h], p);
            __m512 va = _mm512_set1_ps(alpha);
            for (uint32_t v = 0; v < nv; v++)
                o[h * nv + v] = _mm512_mul_ps(o[h * nv + v], va);
        }
        for (uint32_t k = 0; k < nk; k++) {
            for (uint32_t v = 0; v < nv; v++) {
                __m512 vv = _mm512_cvtph_ps(
                    _mm256_loadu_si256((const __m256i *)(vb + (size_t)k * hd + v * 16)));
                for (uint32_t h = 0; h < nr; h++)
                    o[h * nv + v] = _mm512_fmadd_ps(_mm512_set1_ps(s[h][k]), vv, o[h * nv + v]);
            }
        }
    }
    for (uint32_t h = 0; h < nr; h++) {
        __m512 inv = _mm512_set1_ps(l[h] > 0.0f ? 1.0f / l[h] : 0.0f);
        for (uint32_t v = 0; v < nv; v++)
            _mm512_storeu_ps(it->out + h * hd + v * 16, _mm512_mul_ps(o[h * nv + v], inv));
    }
}

const struct cpu_isa cpu_isa_avx512 = {
    .name = "avx512",
    .quantize_x = quantize_x,
    .mm_q = mm_q,
    .quantize_x16 = quantize_x16,
    .mm_q16 = mm_q16,
    .mm_f = mm_f,
    .rmsnorm = rmsnorm,
    .swiglu = swiglu,
    .add = add,
    .softmax = softmax,
    .to_f16 = to_f16,
    .attention = attention,
};

/*
 * kernel_cpu_avx2: the CPU kernels for AVX2 + FMA + F16C machines without AVX-512
 * (compiled with those -m flags only; selected at run time). Same 16-row interleave as the
 * AVX-512 file, read as two 8-row halves; int8 products use vpmaddubsw/vpmaddwd (no
 * VNNI). Q4 products stay within int16 for a whole block (8 products of at most
 * 2*15*127); Q8 products use the sign trick so vpmaddubsw never saturates.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "kernel_cpu_int.h"

#define MK_T 4 /* tokens per microkernel call (16 ymm registers) */

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE int32_t ld32(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static ALWAYS_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE float hmax8(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE int hsum8i(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* exp(x); inputs are clamped to [-87.3, 88.3]. Relative error about 2e-7. */
static ALWAYS_INLINE __m256 exp256(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static void quantize_x(const float *x, struct cpu_q8x *out, size_t nb)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * KERNEL_QK;
        __m256 v[4];
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
        }
        float amax = hmax8(a);
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int i = 0; i < 4; i++)
            q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid)); /* nearest even */
        int sum =
            hsum8i(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
        /* pack 32 int32 -> 32 int8 (values fit), then undo the lane interleave */
        __m256i p16a = _mm256_packs_epi32(q[0], q[1]);
        __m256i p16b = _mm256_packs_epi32(q[2], q[3]);
        __m256i p8 = _mm256_packs_epi16(p16a, p16b);
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)out[b].qs, p8);
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

/* 8 rows (half h of a group) x T tokens over all blocks. */
static ALWAYS_INLINE void mk(enum kernel_dtype dt, const uint8_t *gw, size_t nb, size_t tile, int h,
                             const struct cpu_q8x *x, size_t ldx, int T, __m256 *acc)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int t = 0; t < T; t++)
        acc[t] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m256i ai[MK_T];
        if (dt == KERNEL_DTYPE_Q8_0) {
            for (int t = 0; t < T; t++)
                ai[t] = _mm256_setzero_si256();
            for (int j = 0; j < 8; j++) {
                __m256i w = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(tp + 64 * j + 32 * h)), flip);
                __m256i aw = _mm256_abs_epi8(w);
                for (int t = 0; t < T; t++) {
                    __m256i xv = _mm256_set1_epi32(ld32(x[t * ldx + b].qs + 4 * j));
                    __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                    ai[t] = _mm256_add_epi32(ai[t], _mm256_madd_epi16(p, ones));
                }
            }
        } else {
            __m256i p16[MK_T];
            for (int t = 0; t < T; t++)
                p16[t] = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(tp + 64 * j + 32 * h));
                __m256i lo = _mm256_and_si256(raw, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                for (int t = 0; t < T; t++) {
                    const int8_t *qs = x[t * ldx + b].qs;
                    p16[t] = _mm256_add_epi16(
                        p16[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(qs + 4 * j))));
                    p16[t] = _mm256_add_epi16(
                        p16[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(qs + 16 + 4 * j))));
                }
            }
            for (int t = 0; t < T; t++) {
                ai[t] = _mm256_madd_epi16(p16[t], ones);
                if (dt == KERNEL_DTYPE_Q4_0)
                    ai[t] = _mm256_add_epi32(ai[t], _mm256_set1_epi32(x[t * ldx + b].n8));
            }
        }
        size_t dofs = dt == KERNEL_DTYPE_Q8_0 ? 512 : 256;
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tp + dofs + 16 * h)));
        for (int t = 0; t < T; t++) {
            const struct cpu_q8x *xb = &x[t * ldx + b];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[t]),
                                     _mm256_mul_ps(dw, _mm256_set1_ps(xb->d)), acc[t]);
        }
        if (dt == KERNEL_DTYPE_Q4_1) {
            __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tp + 288 + 16 * h)));
            for (int t = 0; t < T; t++)
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t * ldx + b].s), acc[t]);
        }
    }
}

static ALWAYS_INLINE void store8(const __m256 *acc, int T, float *y, size_t ldy, uint32_t row0,
                                 uint32_t n_out, bool accum)
{
    if (row0 >= n_out)
        return;
    uint32_t valid = n_out - row0;
    for (int t = 0; t < T; t++) {
        float *o = y + (size_t)t * ldy + row0;
        if (valid >= 8) {
            __m256 v = acc[t];
            if (accum)
                v = _mm256_add_ps(v, _mm256_loadu_ps(o));
            _mm256_storeu_ps(o, v);
        } else {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[t]);
            for (uint32_t r = 0; r < valid; r++)
                o[r] = accum ? o[r] + tmp[r] : tmp[r];
        }
    }
}

static ALWAYS_INLINE void mm_tile(const struct cpu_weight *w, const uint8_t *gw,
                                  const struct cpu_q8x *x, size_t ldx, int T, float *y, size_t ldy,
                                  uint32_t row0, bool accum)
{
    for (int h = 0; h < 2; h++) {
        __m256 acc[MK_T];
        switch (w->base.info.dtype) {
        case KERNEL_DTYPE_Q4_0:
            mk(KERNEL_DTYPE_Q4_0, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        case KERNEL_DTYPE_Q4_1:
            mk(KERNEL_DTYPE_Q4_1, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        default:
            mk(KERNEL_DTYPE_Q8_0, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        }
        store8(acc, T, y, ldy, row0 + 8 * (uint32_t)h, w->base.info.n_out, accum);
    }
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
            case 1:
                mm_tile(w, gw, xt, ldx, 1, yt, ldy, row0, acc);
                break;
            case 2:
                mm_tile(w, gw, xt, ldx, 2, yt, ldy, row0, acc);
                break;
            case 3:
                mm_tile(w, gw, xt, ldx, 3, yt, ldy, row0, acc);
                break;
            default:
                mm_tile(w, gw, xt, ldx, 4, yt, ldy, row0, acc);
                break;
            }
        }
    }
}

/* ---- 16-bit activations (kernel_cpu_int.h: q = 256 qh + ql) ---- */

static void quantize_x16(const float *x, struct cpu_q16x *out, size_t nb)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * KERNEL_QK;
        __m256 v[4];
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
        }
        float amax = hmax8(a);
        float d = amax / CPU_Q16_LEVELS;
        float id = amax != 0.0f ? CPU_Q16_LEVELS / amax : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i lo[4], hi[4];
        __m256i vs = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid)); /* nearest even */
            vs = _mm256_add_epi32(vs, q);
            lo[i] = _mm256_srai_epi32(_mm256_slli_epi32(q, 24), 24);
            hi[i] = _mm256_srai_epi32(_mm256_sub_epi32(q, lo[i]), 8);
        }
        /* pack 32 int32 -> 32 int8 (values fit), then undo the lane interleave */
        const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i pl =
            _mm256_packs_epi16(_mm256_packs_epi32(lo[0], lo[1]), _mm256_packs_epi32(lo[2], lo[3]));
        __m256i ph =
            _mm256_packs_epi16(_mm256_packs_epi32(hi[0], hi[1]), _mm256_packs_epi32(hi[2], hi[3]));
        _mm256_storeu_si256((__m256i *)out[b].ql, _mm256_permutevar8x32_epi32(pl, fix));
        _mm256_storeu_si256((__m256i *)out[b].qh, _mm256_permutevar8x32_epi32(ph, fix));
        int sum = hsum8i(vs);
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

/*
 * One block's q as int16, each group of 4 reordered (k, k+2, k+1, k+3) so that a dword
 * broadcast pairs with the even / odd weight bytes of a tile lane widened to words.
 */
static ALWAYS_INLINE void q16_words(const struct cpu_q16x *xb, int16_t *out)
{
    const __m256i shuf = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 0,
                                          1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    for (int i = 0; i < 2; i++) {
        __m256i l = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xb->ql + 16 * i)));
        __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xb->qh + 16 * i)));
        __m256i q = _mm256_add_epi16(_mm256_slli_epi16(h, 8), l);
        _mm256_storeu_si256((__m256i *)(out + 16 * i), _mm256_shuffle_epi8(q, shuf));
    }
}

static ALWAYS_INLINE __m256i bcast16(const int16_t *p)
{
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return _mm256_set1_epi32(v);
}

/*
 * 8 rows (half h of a group) x T tokens over all blocks, 16-bit activations. Q4: two
 * vpmaddubsw planes (qh, ql), each within int16 for a block as on the 8-bit path. Q8_0:
 * vpmaddubsw cannot take ql = -128 against a weight of -128 without wrapping, so the
 * weights are widened to signed words and multiplied with vpmaddwd against q itself.
 */
static ALWAYS_INLINE void mk16(enum kernel_dtype dt, const uint8_t *gw, size_t nb, size_t tile,
                               int h, const struct cpu_q16x *x, size_t ldx, int T, __m256 *acc)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int t = 0; t < T; t++)
        acc[t] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *tp = gw + b * tile;
        __m256i ai[MK_T];
        if (dt == KERNEL_DTYPE_Q8_0) {
            int16_t qw[MK_T][KERNEL_QK];
            for (int t = 0; t < T; t++) {
                q16_words(&x[t * ldx + b], qw[t]);
                ai[t] = _mm256_setzero_si256();
            }
            for (int j = 0; j < 8; j++) {
                __m256i ws = _mm256_xor_si256(
                    _mm256_loadu_si256((const __m256i *)(tp + 64 * j + 32 * h)), flip);
                __m256i w0 = _mm256_srai_epi16(_mm256_slli_epi16(ws, 8), 8); /* b0 b2 */
                __m256i w1 = _mm256_srai_epi16(ws, 8);                       /* b1 b3 */
                for (int t = 0; t < T; t++) {
                    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, bcast16(qw[t] + 4 * j)),
                                                 _mm256_madd_epi16(w1, bcast16(qw[t] + 4 * j + 2)));
                    ai[t] = _mm256_add_epi32(ai[t], p);
                }
            }
        } else {
            __m256i ph[MK_T], pl[MK_T];
            for (int t = 0; t < T; t++) {
                ph[t] = _mm256_setzero_si256();
                pl[t] = _mm256_setzero_si256();
            }
            for (int j = 0; j < 4; j++) {
                __m256i raw = _mm256_loadu_si256((const __m256i *)(tp + 64 * j + 32 * h));
                __m256i lo = _mm256_and_si256(raw, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                for (int t = 0; t < T; t++) {
                    const struct cpu_q16x *xb = &x[t * ldx + b];
                    ph[t] = _mm256_add_epi16(
                        ph[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(xb->qh + 4 * j))));
                    ph[t] = _mm256_add_epi16(
                        ph[t],
                        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(xb->qh + 16 + 4 * j))));
                    pl[t] = _mm256_add_epi16(
                        pl[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld32(xb->ql + 4 * j))));
                    pl[t] = _mm256_add_epi16(
                        pl[t],
                        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld32(xb->ql + 16 + 4 * j))));
                }
            }
            for (int t = 0; t < T; t++) {
                ai[t] = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(ph[t], ones), 8),
                                         _mm256_madd_epi16(pl[t], ones));
                if (dt == KERNEL_DTYPE_Q4_0)
                    ai[t] = _mm256_add_epi32(ai[t], _mm256_set1_epi32(x[t * ldx + b].n8));
            }
        }
        size_t dofs = dt == KERNEL_DTYPE_Q8_0 ? 512 : 256;
        __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tp + dofs + 16 * h)));
        for (int t = 0; t < T; t++) {
            const struct cpu_q16x *xb = &x[t * ldx + b];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[t]),
                                     _mm256_mul_ps(dw, _mm256_set1_ps(xb->d)), acc[t]);
        }
        if (dt == KERNEL_DTYPE_Q4_1) {
            __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tp + 288 + 16 * h)));
            for (int t = 0; t < T; t++)
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x[t * ldx + b].s), acc[t]);
        }
    }
}

static ALWAYS_INLINE void mm16_tile(const struct cpu_weight *w, const uint8_t *gw,
                                    const struct cpu_q16x *x, size_t ldx, int T, float *y,
                                    size_t ldy, uint32_t row0, bool accum)
{
    for (int h = 0; h < 2; h++) {
        __m256 acc[MK_T];
        switch (w->base.info.dtype) {
        case KERNEL_DTYPE_Q4_0:
            mk16(KERNEL_DTYPE_Q4_0, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        case KERNEL_DTYPE_Q4_1:
            mk16(KERNEL_DTYPE_Q4_1, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        default:
            mk16(KERNEL_DTYPE_Q8_0, gw, w->n_blocks, w->tile_bytes, h, x, ldx, T, acc);
            break;
        }
        store8(acc, T, y, ldy, row0 + 8 * (uint32_t)h, w->base.info.n_out, accum);
    }
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
            case 1:
                mm16_tile(w, gw, xt, ldx, 1, yt, ldy, row0, acc);
                break;
            case 2:
                mm16_tile(w, gw, xt, ldx, 2, yt, ldy, row0, acc);
                break;
            case 3:
                mm16_tile(w, gw, xt, ldx, 3, yt, ldy, row0, acc);
                break;
            default:
                mm16_tile(w, gw, xt, ldx, 4, yt, ldy, row0, acc);
                break;
            }
        }
    }
}

static ALWAYS_INLINE __m256 load_w8(enum kernel_dtype dt, const void *row, size_t k)
{
    switch (dt) {
    case KERNEL_DTYPE_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
    case KERNEL_DTYPE_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k))),
            16));
    default:
        return _mm256_loadu_ps((const float *)row + k);
    }
}

static float load_w1(enum kernel_dtype dt, const void *row, size_t k)
{
    switch (dt) {
    case KERNEL_DTYPE_F16:
        return kernel_fp16_to_fp32(((const uint16_t *)row)[k]);
    case KERNEL_DTYPE_BF16:
        return kernel_bf16_to_fp32(((const uint16_t *)row)[k]);
    default:
        return ((const float *)row)[k];
    }
}

static void mm_f(const struct cpu_weight *w, const float *x, uint32_t n_tok, uint32_t r0,
                 uint32_t r1, float *y, size_t ldy, bool acc)
{
    size_t n_in = w->base.info.n_in, n8 = n_in & ~(size_t)7;
    enum kernel_dtype dt = w->base.info.dtype;
    for (uint32_t r = r0; r < r1; r++) {
        const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        for (uint32_t t0 = 0; t0 < n_tok; t0 += MK_T) {
            uint32_t T = n_tok - t0 < MK_T ? n_tok - t0 : MK_T;
            __m256 a[MK_T];
            for (uint32_t t = 0; t < T; t++)
                a[t] = _mm256_setzero_ps();
            for (size_t k = 0; k < n8; k += 8) {
                __m256 wv = load_w8(dt, row, k);
                for (uint32_t t = 0; t < T; t++)
                    a[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (t0 + t) * n_in + k), a[t]);
            }
            for (uint32_t t = 0; t < T; t++) {
                float s = hsum8(a[t]);
                for (size_t k = n8; k < n_in; k++)
                    s += load_w1(dt, row, k) * x[(t0 + t) * n_in + k];
                float *o = &y[(t0 + t) * ldy + r];
                *o = acc ? *o + s : s;
            }
        }
    }
}

static void rmsnorm(const float *x, const float *w, float *y, size_t n, float eps)
{
    size_t n8 = n & ~(size_t)7;
    __m256 ss = _mm256_setzero_ps();
    for (size_t i = 0; i < n8; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        ss = _mm256_fmadd_ps(v, v, ss);
    }
    float s = hsum8(ss);
    for (size_t i = n8; i < n; i++)
        s += x[i] * x[i];
    float scale = 1.0f / sqrtf(s / (float)n + eps);
    __m256 vs = _mm256_set1_ps(scale);
    for (size_t i = 0; i < n8; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs),
                                              _mm256_loadu_ps(w + i)));
    for (size_t i = n8; i < n; i++)
        y[i] = x[i] * scale * w[i];
}

static void swiglu(const float *gate, const float *up, float *out, size_t n)
{
    size_t n8 = n & ~(size_t)7;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (size_t i = 0; i < n8; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    if (n8 < n) {
        /* masked, not scalar: an element's result must not depend on where the array ends
         * (the engine passes all rows at once; batch invariance) */
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - n8)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 g = _mm256_maskload_ps(gate + n8, m);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_maskstore_ps(out + n8, m, _mm256_mul_ps(s, _mm256_maskload_ps(up + n8, m)));
    }
}

static void add(float *y, const float *x, size_t n)
{
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (size_t i = n8; i < n; i++)
        y[i] += x[i];
}

static void softmax(float *x, size_t n)
{
    size_t n8 = n & ~(size_t)7;
    float mx = -INFINITY;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (size_t i = 0; i < n8; i += 8)
        vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    if (n8)
        mx = hmax8(vm);
    for (size_t i = n8; i < n; i++)
        mx = fmaxf(mx, x[i]);
    vm = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    for (size_t i = 0; i < n8; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        vs = _mm256_add_ps(vs, e);
        _mm256_storeu_ps(x + i, e);
    }
    float sum = hsum8(vs);
    for (size_t i = n8; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (size_t i = 0; i < n8; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (size_t i = n8; i < n; i++)
        x[i] *= 1.0f / sum;
}

static void to_f16(const float *x, uint16_t *out, size_t n)
{
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (size_t i = n8; i < n; i++)
        out[i] = kernel_fp32_to_fp16(x[i]);
}

#define ATT_MAX_REP 8
#define ATT_MAX_HD 256

/* As the AVX-512 version: one KV block at a time, query heads of a group together. */
static void attention(const struct cpu_attn_item *it)
{
    uint32_t hd = it->head_dim, nr = it->n_rep, bt = it->block_tokens;
    if (hd % 8 != 0 || hd > ATT_MAX_HD || nr > ATT_MAX_REP || bt > 64) {
        cpu_isa_scalar.attention(it);
        return;
    }
    uint32_t nv = hd / 8;
    float o[ATT_MAX_REP * ATT_MAX_HD];
    float m[ATT_MAX_REP], l[ATT_MAX_REP];
    for (uint32_t h = 0; h < nr; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(o, 0, (size_t)nr * hd * sizeof(float));
    for (uint32_t t0 = 0; t0 < it->n_keys; t0 += bt) {
        uint32_t nk = it->n_keys - t0 < bt ? it->n_keys - t0 : bt;
        size_t off = (size_t)it->blocks[t0 / bt] * it->block_stride + it->head_off;
        const uint16_t *kb = it->k_base + off, *vb = it->v_base + off;
        float s[ATT_MAX_REP][64];
        for (uint32_t k = 0; k < nk; k++) {
            __m256 acc[ATT_MAX_REP];
            for (uint32_t h = 0; h < nr; h++)
                acc[h] = _mm256_setzero_ps();
            for (uint32_t v = 0; v < nv; v++) {
                __m256 kv = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(kb + (size_t)k * hd + v * 8)));
                for (uint32_t h = 0; h < nr; h++)
                    acc[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(it->q + h * hd + v * 8), acc[h]);
            }
            for (uint32_t h = 0; h < nr; h++)
                s[h][k] = hsum8(acc[h]) * it->scale;
        }
        for (uint32_t h = 0; h < nr; h++) {
            float mn = m[h];
            for (uint32_t k = 0; k < nk; k++)
                mn = fmaxf(mn, s[h][k]);
            float alpha = expf(m[h] - mn), sum = 0.0f;
            for (uint32_t k = 0; k < nk; k++) {
                s[h][k] = expf(s[h][k] - mn);
                sum += s[h][k];
            }
            l[h] = l[h] * alpha + sum;
            m[h] = mn;
            __m256 va = _mm256_set1_ps(alpha);
            for (uint32_t v = 0; v < nv; v++)
                _mm256_storeu_ps(o + h * hd + v * 8,
                                 _mm256_mul_ps(_mm256_loadu_ps(o + h * hd + v * 8), va));
        }
        for (uint32_t k = 0; k < nk; k++) {
            for (uint32_t v = 0; v < nv; v++) {
                __m256 vv = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(vb + (size_t)k * hd + v * 8)));
                for (uint32_t h = 0; h < nr; h++) {
                    float *op = o + h * hd + v * 8;
                    _mm256_storeu_ps(
                        op, _mm256_fmadd_ps(_mm256_set1_ps(s[h][k]), vv, _mm256_loadu_ps(op)));
                }
            }
        }
    }
    for (uint32_t h = 0; h < nr; h++) {
        float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (uint32_t i = 0; i < hd; i++)
            it->out[h * hd + i] = o[h * hd + i] * inv;
    }
}

const struct cpu_isa cpu_isa_avx2 = {
    .name = "avx2",
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

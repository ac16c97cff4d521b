/*
 * kernel_cpu_scalar: the portable C versions of the CPU kernels. They read the same
 * repacked weights as the SIMD files and are what every SIMD variant is tested against
 * (beside the dequantize-and-multiply reference in the tests). Compiled without -m flags.
 */
#include <math.h>
#include <string.h>

#include "kernel_cpu_int.h"

static void quantize_x(const float *x, struct cpu_q8x *out, size_t nb)
{
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * KERNEL_QK;
        float amax = 0.0f;
        for (int j = 0; j < KERNEL_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < KERNEL_QK; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            out[b].qs[j] = (int8_t)q;
            sum += q;
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

static void mm_q(const struct cpu_weight *w, const struct cpu_q8x *x, size_t ldx, uint32_t n_tok,
                 uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc)
{
    enum kernel_dtype dt = w->base.info.dtype;
    const uint8_t *base = w->data;
    for (uint32_t g = g0; g < g1; g++) {
        const uint8_t *gw = base + (size_t)g * w->n_blocks * w->tile_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            float sums[CPU_GROUP_ROWS] = {0};
            for (uint32_t b = 0; b < w->n_blocks; b++) {
                const uint8_t *tile = gw + (size_t)b * w->tile_bytes;
                const struct cpu_q8x *xb = &x[t * ldx + b];
                int nchunk = dt == KERNEL_DTYPE_Q8_0 ? 8 : 4;
                const uint16_t *dw = (const uint16_t *)(tile + 64 * nchunk);
                for (int r = 0; r < CPU_GROUP_ROWS; r++) {
                    int32_t s = dt == KERNEL_DTYPE_Q4_0   ? xb->n8
                                : dt == KERNEL_DTYPE_Q8_0 ? xb->n128
                                                          : 0;
                    for (int j = 0; j < nchunk; j++) {
                        const uint8_t *q = tile + 64 * j + 4 * r;
                        for (int e = 0; e < 4; e++) {
                            if (dt == KERNEL_DTYPE_Q8_0) {
                                s += (int32_t)q[e] * xb->qs[4 * j + e];
                            } else {
                                s += (int32_t)(q[e] & 0x0f) * xb->qs[4 * j + e];
                                s += (int32_t)(q[e] >> 4) * xb->qs[16 + 4 * j + e];
                            }
                        }
                    }
                    float d = kernel_fp16_to_fp32(dw[r]);
                    sums[r] += d * (xb->d * (float)s);
                    if (dt == KERNEL_DTYPE_Q4_1)
                        sums[r] += kernel_fp16_to_fp32(dw[CPU_GROUP_ROWS + r]) * xb->s;
                }
            }
            for (uint32_t r = 0; r < CPU_GROUP_ROWS; r++) {
                uint32_t row = g * CPU_GROUP_ROWS + r;
                if (row >= w->base.info.n_out)
                    break;
                float *o = &y[t * ldy + row];
                *o = acc ? *o + sums[r] : sums[r];
            }
        }
    }
}

static void quantize_x16(const float *x, struct cpu_q16x *out, size_t nb)
{
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * KERNEL_QK;
        float amax = 0.0f;
        for (int j = 0; j < KERNEL_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / CPU_Q16_LEVELS;
        float id = amax != 0.0f ? CPU_Q16_LEVELS / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < KERNEL_QK; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            int lo = ((q + 128) & 255) - 128;
            out[b].ql[j] = (int8_t)lo;
            out[b].qh[j] = (int8_t)((q - lo) / 256);
            sum += q;
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
        out[b].n8 = -8 * sum;
        out[b].n128 = -128 * sum;
    }
}

/* Weight k of lane r in a tile, as the unsigned value the integer dot product uses. */
static int32_t tile_q(enum kernel_dtype dt, const uint8_t *tile, int r, int k)
{
    if (dt == KERNEL_DTYPE_Q8_0)
        return tile[64 * (k / 4) + 4 * r + k % 4];
    uint8_t q = tile[64 * ((k % 16) / 4) + 4 * r + k % 4];
    return k < 16 ? (q & 0x0f) : (q >> 4);
}

static void mm_q16(const struct cpu_weight *w, const struct cpu_q16x *x, size_t ldx, uint32_t n_tok,
                   uint32_t g0, uint32_t g1, float *y, size_t ldy, bool acc)
{
    enum kernel_dtype dt = w->base.info.dtype;
    const uint8_t *base = w->data;
    int nchunk = dt == KERNEL_DTYPE_Q8_0 ? 8 : 4;
    for (uint32_t g = g0; g < g1; g++) {
        const uint8_t *gw = base + (size_t)g * w->n_blocks * w->tile_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            float sums[CPU_GROUP_ROWS] = {0};
            for (uint32_t b = 0; b < w->n_blocks; b++) {
                const uint8_t *tile = gw + (size_t)b * w->tile_bytes;
                const struct cpu_q16x *xb = &x[t * ldx + b];
                const uint16_t *dw = (const uint16_t *)(tile + 64 * nchunk);
                for (int r = 0; r < CPU_GROUP_ROWS; r++) {
                    int32_t s = dt == KERNEL_DTYPE_Q4_0   ? xb->n8
                                : dt == KERNEL_DTYPE_Q8_0 ? xb->n128
                                                          : 0;
                    for (int k = 0; k < KERNEL_QK; k++)
                        s += tile_q(dt, tile, r, k) * (256 * xb->qh[k] + xb->ql[k]);
                    float d = kernel_fp16_to_fp32(dw[r]);
                    sums[r] += d * (xb->d * (float)s);
                    if (dt == KERNEL_DTYPE_Q4_1)
                        sums[r] += kernel_fp16_to_fp32(dw[CPU_GROUP_ROWS + r]) * xb->s;
                }
            }
            for (uint32_t r = 0; r < CPU_GROUP_ROWS; r++) {
                uint32_t row = g * CPU_GROUP_ROWS + r;
                if (row >= w->base.info.n_out)
                    break;
                float *o = &y[t * ldy + row];
                *o = acc ? *o + sums[r] : sums[r];
            }
        }
    }
}

static float load_f(enum kernel_dtype dt, const void *row, size_t k)
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
    uint32_t n_in = w->base.info.n_in;
    enum kernel_dtype dt = w->base.info.dtype;
    for (uint32_t r = r0; r < r1; r++) {
        const void *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
        for (uint32_t t = 0; t < n_tok; t++) {
            const float *xt = x + (size_t)t * n_in;
            float s = 0.0f;
            for (uint32_t k = 0; k < n_in; k++)
                s += load_f(dt, row, k) * xt[k];
            float *o = &y[t * ldy + r];
            *o = acc ? *o + s : s;
        }
    }
}

static void rmsnorm(const float *x, const float *w, float *y, size_t n, float eps)
{
    float ss = 0.0f;
    for (size_t i = 0; i < n; i++)
        ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (size_t i = 0; i < n; i++)
        y[i] = x[i] * scale * w[i];
}

static void swiglu(const float *gate, const float *up, float *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

static void add(float *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
}

static void softmax(float *x, size_t n)
{
    float mx = -INFINITY;
    for (size_t i = 0; i < n; i++)
        mx = fmaxf(mx, x[i]);
    float sum = 0.0f;
    for (size_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = 1.0f / sum;
    for (size_t i = 0; i < n; i++)
        x[i] *= inv;
}

static void to_f16(const float *x, uint16_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = kernel_fp32_to_fp16(x[i]);
}

/* Online softmax over the visible keys, one key at a time. */
static void attention(const struct cpu_attn_item *it)
{
    uint32_t hd = it->head_dim;
    for (uint32_t h = 0; h < it->n_rep; h++) {
        const float *q = it->q + (size_t)h * hd;
        float *o = it->out + (size_t)h * hd;
        float m = -INFINITY, l = 0.0f;
        memset(o, 0, hd * sizeof(float));
        for (uint32_t t = 0; t < it->n_keys; t++) {
            size_t blk = (size_t)it->blocks[t / it->block_tokens];
            size_t off =
                blk * it->block_stride + it->head_off + (size_t)(t % it->block_tokens) * hd;
            const uint16_t *k = it->k_base + off;
            const uint16_t *v = it->v_base + off;
            float s = 0.0f;
            for (uint32_t i = 0; i < hd; i++)
                s += q[i] * kernel_fp16_to_fp32(k[i]);
            s *= it->scale;
            float mn = fmaxf(m, s);
            float alpha = expf(m - mn);
            float p = expf(s - mn);
            l = l * alpha + p;
            for (uint32_t i = 0; i < hd; i++)
                o[i] = o[i] * alpha + p * kernel_fp16_to_fp32(v[i]);
            m = mn;
        }
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (uint32_t i = 0; i < hd; i++)
            o[i] *= inv;
    }
}

const struct cpu_isa cpu_isa_scalar = {
    .name = "scalar",
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

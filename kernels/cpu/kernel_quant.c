/*
 * kernel_quant: scalar reference conversions for the tensor types in kernel_quant.h.
 *
 * These functions define what every SIMD and CUDA kernel must compute; they favour
 * clarity over speed and are used at load time (repacking, tests), never per token in
 * a hot loop. Pure functions on caller memory: thread-safe.
 */
#include "kernel_quant.h"

#include <math.h>
#include <string.h>

#include "pw_err.h"

const char *kernel_dtype_name(uint32_t ggml_type)
{
    switch (ggml_type) {
    case KERNEL_DTYPE_F32:
        return "f32";
    case KERNEL_DTYPE_F16:
        return "f16";
    case KERNEL_DTYPE_Q4_0:
        return "q4_0";
    case KERNEL_DTYPE_Q4_1:
        return "q4_1";
    case KERNEL_DTYPE_Q8_0:
        return "q8_0";
    case KERNEL_DTYPE_BF16:
        return "bf16";
    default:
        return NULL;
    }
}

int kernel_dtype_supported(uint32_t ggml_type)
{
    return kernel_dtype_name(ggml_type) != NULL;
}

size_t kernel_dtype_block_elems(enum kernel_dtype t)
{
    switch (t) {
    case KERNEL_DTYPE_Q4_0:
    case KERNEL_DTYPE_Q4_1:
    case KERNEL_DTYPE_Q8_0:
        return KERNEL_QK;
    case KERNEL_DTYPE_F32:
    case KERNEL_DTYPE_F16:
    case KERNEL_DTYPE_BF16:
        return 1;
    }
    return 0;
}

size_t kernel_dtype_block_bytes(enum kernel_dtype t)
{
    switch (t) {
    case KERNEL_DTYPE_F32:
        return 4;
    case KERNEL_DTYPE_F16:
    case KERNEL_DTYPE_BF16:
        return 2;
    case KERNEL_DTYPE_Q4_0:
        return sizeof(struct kernel_block_q4_0);
    case KERNEL_DTYPE_Q4_1:
        return sizeof(struct kernel_block_q4_1);
    case KERNEL_DTYPE_Q8_0:
        return sizeof(struct kernel_block_q8_0);
    }
    return 0;
}

size_t kernel_dtype_row_bytes(enum kernel_dtype t, uint64_t n)
{
    size_t be = kernel_dtype_block_elems(t);
    size_t bb = kernel_dtype_block_bytes(t);
    if (be == 0 || n % be != 0)
        return 0;
    uint64_t blocks = n / be;
    if (blocks > SIZE_MAX / bb)
        return 0;
    return (size_t)(blocks * bb);
}

float kernel_fp16_to_fp32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        /* Zero or subnormal: mant * 2^-24 is exact in float. */
        float v = (float)mant * 0x1p-24f;
        memcpy(&bits, &v, sizeof(bits));
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

uint16_t kernel_fp32_to_fp16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) /* NaN: keep the top payload bits, force quiet */
        return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) /* >= 65520 rounds to infinity (ties to even) */
        return (uint16_t)(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        /* Below the smallest normal half (2^-14): the result is m * 2^(e-126) rounded. */
        uint32_t e = ax >> 23;
        if (e < 102)
            return sign;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t h = (ax - 0x38000000u) >> 13;
    uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* a carry into the exponent is the correct rounding */
    return (uint16_t)(sign | h);
}

float kernel_bf16_to_fp32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

uint16_t kernel_fp32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static void dequant_q8_0(const struct kernel_block_q8_0 *b, float *dst, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        float d = kernel_fp16_to_fp32(b[i].d);
        for (int j = 0; j < KERNEL_QK; j++)
            dst[i * KERNEL_QK + j] = d * (float)b[i].qs[j];
    }
}

static void dequant_q4_0(const struct kernel_block_q4_0 *b, float *dst, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        float d = kernel_fp16_to_fp32(b[i].d);
        float *o = dst + i * KERNEL_QK;
        for (int j = 0; j < KERNEL_QK / 2; j++) {
            o[j] = d * (float)((b[i].qs[j] & 0x0f) - 8);
            o[j + KERNEL_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void dequant_q4_1(const struct kernel_block_q4_1 *b, float *dst, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        float d = kernel_fp16_to_fp32(b[i].d);
        float m = kernel_fp16_to_fp32(b[i].m);
        float *o = dst + i * KERNEL_QK;
        for (int j = 0; j < KERNEL_QK / 2; j++) {
            o[j] = d * (float)(b[i].qs[j] & 0x0f) + m;
            o[j + KERNEL_QK / 2] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}

void kernel_dequantize_row(enum kernel_dtype t, const void *src, float *dst, size_t n)
{
    PW_ASSERT(n % kernel_dtype_block_elems(t) == 0);
    switch (t) {
    case KERNEL_DTYPE_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case KERNEL_DTYPE_F16: {
        const uint16_t *h = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = kernel_fp16_to_fp32(h[i]);
        break;
    }
    case KERNEL_DTYPE_BF16: {
        const uint16_t *h = src;
        for (size_t i = 0; i < n; i++)
            dst[i] = kernel_bf16_to_fp32(h[i]);
        break;
    }
    case KERNEL_DTYPE_Q8_0:
        dequant_q8_0(src, dst, n / KERNEL_QK);
        break;
    case KERNEL_DTYPE_Q4_0:
        dequant_q4_0(src, dst, n / KERNEL_QK);
        break;
    case KERNEL_DTYPE_Q4_1:
        dequant_q4_1(src, dst, n / KERNEL_QK);
        break;
    }
}

static void quant_q8_0(const float *x, struct kernel_block_q8_0 *b, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        const float *xb = x + i * KERNEL_QK;
        float amax = 0.0f;
        for (int j = 0; j < KERNEL_QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kernel_fp32_to_fp16(d);
        for (int j = 0; j < KERNEL_QK; j++)
            b[i].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

static void quant_q4_0(const float *x, struct kernel_block_q4_0 *b, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        const float *xb = x + i * KERNEL_QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < KERNEL_QK; j++) {
            if (fabsf(xb[j]) > amax) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        /* The signed extreme maps to -8 so the full [-8, 7] range is used. */
        float d = max / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kernel_fp32_to_fp16(d);
        for (int j = 0; j < KERNEL_QK / 2; j++) {
            int q0 = (int)(xb[j] * id + 8.5f);
            int q1 = (int)(xb[j + KERNEL_QK / 2] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quant_q4_1(const float *x, struct kernel_block_q4_1 *b, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        const float *xb = x + i * KERNEL_QK;
        float min = xb[0], max = xb[0];
        for (int j = 1; j < KERNEL_QK; j++) {
            min = fminf(min, xb[j]);
            max = fmaxf(max, xb[j]);
        }
        float d = (max - min) / 15.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = kernel_fp32_to_fp16(d);
        b[i].m = kernel_fp32_to_fp16(min);
        for (int j = 0; j < KERNEL_QK / 2; j++) {
            int q0 = (int)((xb[j] - min) * id + 0.5f);
            int q1 = (int)((xb[j + KERNEL_QK / 2] - min) * id + 0.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

void kernel_quantize_row(enum kernel_dtype t, const float *src, void *dst, size_t n)
{
    PW_ASSERT(n % kernel_dtype_block_elems(t) == 0);
    switch (t) {
    case KERNEL_DTYPE_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case KERNEL_DTYPE_F16: {
        uint16_t *h = dst;
        for (size_t i = 0; i < n; i++)
            h[i] = kernel_fp32_to_fp16(src[i]);
        break;
    }
    case KERNEL_DTYPE_BF16: {
        uint16_t *h = dst;
        for (size_t i = 0; i < n; i++)
            h[i] = kernel_fp32_to_bf16(src[i]);
        break;
    }
    case KERNEL_DTYPE_Q8_0:
        quant_q8_0(src, dst, n / KERNEL_QK);
        break;
    case KERNEL_DTYPE_Q4_0:
        quant_q4_0(src, dst, n / KERNEL_QK);
        break;
    case KERNEL_DTYPE_Q4_1:
        quant_q4_1(src, dst, n / KERNEL_QK);
        break;
    }
}

/*
 * Unit tests for kernel_quant: half/bfloat16 conversions (exhaustive round trips, and
 * against the CPU's F16C instructions when present), dtype tables, and the reference
 * quantizers (hand-checked blocks, round-trip error bounds).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_quant.h"

static uint32_t rng_state = 12345u;

static uint32_t rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static float rng_uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rng_next() >> 8) * 0x1p-24f;
}

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static void test_dtype_tables(void **state)
{
    (void)state;
    assert_string_equal(kernel_dtype_name(KERNEL_DTYPE_Q4_1), "q4_1");
    assert_string_equal(kernel_dtype_name(KERNEL_DTYPE_BF16), "bf16");
    assert_null(kernel_dtype_name(6));
    assert_true(kernel_dtype_supported(KERNEL_DTYPE_Q8_0));
    assert_false(kernel_dtype_supported(12));
    assert_int_equal(kernel_dtype_block_elems(KERNEL_DTYPE_Q4_0), 32);
    assert_int_equal(kernel_dtype_block_elems(KERNEL_DTYPE_F16), 1);
    assert_int_equal(kernel_dtype_block_bytes(KERNEL_DTYPE_Q8_0), 34);
    assert_int_equal(kernel_dtype_row_bytes(KERNEL_DTYPE_Q4_1, 576), 18 * 20);
    assert_int_equal(kernel_dtype_row_bytes(KERNEL_DTYPE_F32, 3), 12);
    assert_int_equal(kernel_dtype_row_bytes(KERNEL_DTYPE_Q4_0, 33), 0);
    assert_int_equal(kernel_dtype_row_bytes(KERNEL_DTYPE_F32, UINT64_MAX / 2), 0);
}

static void test_fp16_known_values(void **state)
{
    (void)state;
    assert_int_equal(kernel_fp32_to_fp16(0.0f), 0x0000);
    assert_int_equal(kernel_fp32_to_fp16(-0.0f), 0x8000);
    assert_int_equal(kernel_fp32_to_fp16(1.0f), 0x3c00);
    assert_int_equal(kernel_fp32_to_fp16(-2.0f), 0xc000);
    assert_int_equal(kernel_fp32_to_fp16(65504.0f), 0x7bff);
    assert_int_equal(kernel_fp32_to_fp16(65519.0f), 0x7bff);
    assert_int_equal(kernel_fp32_to_fp16(65520.0f), 0x7c00);
    assert_int_equal(kernel_fp32_to_fp16(INFINITY), 0x7c00);
    assert_int_equal(kernel_fp32_to_fp16(0x1p-24f), 0x0001);
    assert_int_equal(kernel_fp32_to_fp16(0x1p-25f), 0x0000);   /* tie to even */
    assert_int_equal(kernel_fp32_to_fp16(0x1.8p-24f), 0x0002); /* tie to even */
    assert_int_equal(kernel_fp32_to_fp16(0x1p-14f), 0x0400);
    assert_int_equal(kernel_fp32_to_fp16(1.0f + 0x1p-11f), 0x3c00);   /* tie to even */
    assert_int_equal(kernel_fp32_to_fp16(1.0f + 0x1.8p-10f), 0x3c02); /* tie up */
    assert_true((kernel_fp32_to_fp16(NAN) & 0x7c00) == 0x7c00);
    assert_true((kernel_fp32_to_fp16(NAN) & 0x03ff) != 0);
    assert_true(kernel_fp16_to_fp32(0x3c00) == 1.0f);
    assert_true(kernel_fp16_to_fp32(0x0001) == 0x1p-24f);
    assert_true(isinf(kernel_fp16_to_fp32(0xfc00)) && kernel_fp16_to_fp32(0xfc00) < 0);
    assert_true(isnan(kernel_fp16_to_fp32(0x7e00)));
}

static void test_fp16_roundtrip_exhaustive(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kernel_fp16_to_fp32((uint16_t)h);
        uint16_t back = kernel_fp32_to_fp16(f);
        if (isnan(f))
            assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
        else
            assert_int_equal(back, h);
    }
}

__attribute__((target("f16c"))) static uint16_t hw_f32_to_f16(float f)
{
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("f16c"))) static float hw_f16_to_f32(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* CPUID leaf 1 ECX bit 29, as clang 14 has no __builtin_cpu_supports("f16c"); F16C is
 * VEX-encoded, so it also needs the OS to save AVX state, which the "avx" check covers. */
static bool cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return false;
    return ((c >> 29) & 1u) && __builtin_cpu_supports("avx");
}

static void test_fp16_matches_f16c(void **state)
{
    (void)state;
    if (!cpu_has_f16c())
        skip();
    for (uint32_t h = 0; h < 65536; h++) {
        float a = kernel_fp16_to_fp32((uint16_t)h);
        float b = hw_f16_to_f32((uint16_t)h);
        if (!isnan(b))
            assert_int_equal(f2u(a), f2u(b));
    }
    for (int i = 0; i < 2000000; i++) {
        float f = u2f(rng_next());
        if (isnan(f))
            continue;
        assert_int_equal(kernel_fp32_to_fp16(f), hw_f32_to_f16(f));
    }
}

static void test_bf16(void **state)
{
    (void)state;
    assert_int_equal(kernel_fp32_to_bf16(1.0f), 0x3f80);
    assert_true(kernel_bf16_to_fp32(0x3f80) == 1.0f);
    assert_int_equal(kernel_fp32_to_bf16(u2f(0x3f808000u)), 0x3f80); /* tie to even */
    assert_int_equal(kernel_fp32_to_bf16(u2f(0x3f818000u)), 0x3f82); /* tie up */
    assert_int_equal(kernel_fp32_to_bf16(u2f(0x3f808001u)), 0x3f81);
    assert_true(isnan(kernel_bf16_to_fp32(kernel_fp32_to_bf16(NAN))));
    assert_int_equal(kernel_fp32_to_bf16(u2f(0x7f7fffffu)), 0x7f80); /* max float -> inf */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kernel_bf16_to_fp32((uint16_t)h);
        if (!isnan(f))
            assert_int_equal(kernel_fp32_to_bf16(f), h);
    }
}

static void test_q8_0_block(void **state)
{
    (void)state;
    float x[32];
    for (int i = 0; i < 32; i++)
        x[i] = (float)(i - 16) / 4.0f; /* -4 .. 3.75 */
    struct kernel_block_q8_0 b;
    kernel_quantize_row(KERNEL_DTYPE_Q8_0, x, &b, 32);
    assert_true(fabsf(kernel_fp16_to_fp32(b.d) - 4.0f / 127.0f) < 1e-4f);
    assert_int_equal(b.qs[0], -127);
    assert_int_equal(b.qs[16], 0);
    float y[32];
    kernel_dequantize_row(KERNEL_DTYPE_Q8_0, &b, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(fabsf(y[i] - x[i]) <= 4.0f / 127.0f * 0.51f + 1e-3f);
}

static void test_q4_0_block(void **state)
{
    (void)state;
    float x[32];
    for (int i = 0; i < 32; i++)
        x[i] = (float)(i - 8); /* -8 .. 23: signed max is 23 */
    struct kernel_block_q4_0 b;
    kernel_quantize_row(KERNEL_DTYPE_Q4_0, x, &b, 32);
    float d = kernel_fp16_to_fp32(b.d);
    assert_true(fabsf(d - 23.0f / -8.0f) < 1e-2f);
    assert_int_equal(b.qs[15] >> 4, 0); /* x[31] = 23 -> q = 0 -> -8 * d = 23 */
    float y[32];
    kernel_dequantize_row(KERNEL_DTYPE_Q4_0, &b, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(fabsf(y[i] - x[i]) <= fabsf(d) * 0.5f + 0.05f);
}

static void test_q4_1_block(void **state)
{
    (void)state;
    float x[32];
    for (int i = 0; i < 32; i++)
        x[i] = 1.0f + (float)(i % 16); /* 1 .. 16 */
    struct kernel_block_q4_1 b;
    kernel_quantize_row(KERNEL_DTYPE_Q4_1, x, &b, 32);
    assert_true(kernel_fp16_to_fp32(b.d) == 1.0f);
    assert_true(kernel_fp16_to_fp32(b.m) == 1.0f);
    for (int j = 0; j < 16; j++)
        assert_int_equal(b.qs[j], (uint8_t)(j | (j << 4)));
    float y[32];
    kernel_dequantize_row(KERNEL_DTYPE_Q4_1, &b, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(y[i] == x[i]);
}

static void test_roundtrip_random(void **state)
{
    (void)state;
    enum { N = 32 * 64 };
    static const enum kernel_dtype types[] = {KERNEL_DTYPE_F32,  KERNEL_DTYPE_F16,
                                              KERNEL_DTYPE_BF16, KERNEL_DTYPE_Q8_0,
                                              KERNEL_DTYPE_Q4_0, KERNEL_DTYPE_Q4_1};
    float *x = malloc(N * sizeof(float));
    float *y = malloc(N * sizeof(float));
    unsigned char *q = malloc(N * sizeof(float));
    assert_non_null(x);
    assert_non_null(y);
    assert_non_null(q);
    for (int i = 0; i < N; i++)
        x[i] = rng_uniform(-2.0f, 2.0f);
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        kernel_quantize_row(types[t], x, q, N);
        kernel_dequantize_row(types[t], q, y, N);
        /* Per-element bound: half a quantization step of each block's range. */
        for (int b = 0; b < N / 32; b++) {
            float amax = 0.0f, mn = x[b * 32], mx = x[b * 32];
            for (int j = 0; j < 32; j++) {
                amax = fmaxf(amax, fabsf(x[b * 32 + j]));
                mn = fminf(mn, x[b * 32 + j]);
                mx = fmaxf(mx, x[b * 32 + j]);
            }
            float tol;
            switch (types[t]) {
            case KERNEL_DTYPE_F32:
                tol = 0.0f;
                break;
            case KERNEL_DTYPE_F16:
                tol = amax * 0x1p-11f;
                break;
            case KERNEL_DTYPE_BF16:
                tol = amax * 0x1p-8f;
                break;
            case KERNEL_DTYPE_Q8_0:
                tol = amax / 127.0f * 0.5f + amax * 0x1p-9f;
                break;
            case KERNEL_DTYPE_Q4_0:
                tol = amax / 8.0f * 1.0f + amax * 0x1p-9f; /* clamp at +7 costs a step */
                break;
            default:
                tol = (mx - mn) / 15.0f * 0.5f + amax * 0x1p-9f;
                break;
            }
            for (int j = 0; j < 32; j++)
                assert_true(fabsf(y[b * 32 + j] - x[b * 32 + j]) <= tol + 1e-6f);
        }
    }
    free(q);
    free(y);
    free(x);
}

static void test_zero_block(void **state)
{
    (void)state;
    float x[32] = {0};
    struct kernel_block_q8_0 b8;
    struct kernel_block_q4_0 b40;
    struct kernel_block_q4_1 b41;
    float y[32];
    kernel_quantize_row(KERNEL_DTYPE_Q8_0, x, &b8, 32);
    kernel_dequantize_row(KERNEL_DTYPE_Q8_0, &b8, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(y[i] == 0.0f);
    kernel_quantize_row(KERNEL_DTYPE_Q4_0, x, &b40, 32);
    kernel_dequantize_row(KERNEL_DTYPE_Q4_0, &b40, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(y[i] == 0.0f);
    kernel_quantize_row(KERNEL_DTYPE_Q4_1, x, &b41, 32);
    kernel_dequantize_row(KERNEL_DTYPE_Q4_1, &b41, y, 32);
    for (int i = 0; i < 32; i++)
        assert_true(y[i] == 0.0f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_tables),
        cmocka_unit_test(test_fp16_known_values),
        cmocka_unit_test(test_fp16_roundtrip_exhaustive),
        cmocka_unit_test(test_fp16_matches_f16c),
        cmocka_unit_test(test_bf16),
        cmocka_unit_test(test_q8_0_block),
        cmocka_unit_test(test_q4_0_block),
        cmocka_unit_test(test_q4_1_block),
        cmocka_unit_test(test_roundtrip_random),
        cmocka_unit_test(test_zero_block),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * kernel_quant: tensor element types and the GGML block layouts the engine reads from
 * GGUF files, with scalar reference conversions. These are the ground truth every SIMD or
 * CUDA kernel is tested against. Pure functions, thread-safe.
 *
 * Block layouts (32 weights per block, little-endian, packed as in GGUF files):
 *
 *   Q8_0 (34 bytes)  +--------+---------------------------+
 *                    | d: f16 | qs: int8[32]              |   w = d * qs[i]
 *                    +--------+---------------------------+
 *   Q4_0 (18 bytes)  +--------+---------------------------+
 *                    | d: f16 | qs: uint8[16] (2 per byte)|   w = d * (q - 8)
 *                    +--------+---------------------------+
 *   Q4_1 (20 bytes)  +--------+--------+------------------+
 *                    | d: f16 | m: f16 | qs: uint8[16]    |   w = d * q + m
 *                    +--------+--------+------------------+
 *   In Q4 blocks, weight j (0..15) is the low nibble of qs[j], weight j+16 the high nibble.
 */
#ifndef KERNEL_QUANT_H
#define KERNEL_QUANT_H

#include <stddef.h>
#include <stdint.h>

#define KERNEL_QK 32 /* weights per quantized block */

/* GGML type ids as stored in GGUF tensor infos; only these are supported. */
enum kernel_dtype {
    KERNEL_DTYPE_F32 = 0,
    KERNEL_DTYPE_F16 = 1,
    KERNEL_DTYPE_Q4_0 = 2,
    KERNEL_DTYPE_Q4_1 = 3,
    KERNEL_DTYPE_Q8_0 = 8,
    KERNEL_DTYPE_BF16 = 30,
};

struct kernel_block_q8_0 {
    uint16_t d; /* f16 scale */
    int8_t qs[KERNEL_QK];
};

struct kernel_block_q4_0 {
    uint16_t d; /* f16 scale */
    uint8_t qs[KERNEL_QK / 2];
};

struct kernel_block_q4_1 {
    uint16_t d; /* f16 scale */
    uint16_t m; /* f16 minimum */
    uint8_t qs[KERNEL_QK / 2];
};

/* The header is also read by CUDA C++ (kernels/cuda). */
#ifdef __cplusplus
#define KERNEL_STATIC_ASSERT static_assert
#else
#define KERNEL_STATIC_ASSERT _Static_assert
#endif
KERNEL_STATIC_ASSERT(sizeof(struct kernel_block_q8_0) == 34, "Q8_0 block is 34 bytes");
KERNEL_STATIC_ASSERT(sizeof(struct kernel_block_q4_0) == 18, "Q4_0 block is 18 bytes");
KERNEL_STATIC_ASSERT(sizeof(struct kernel_block_q4_1) == 20, "Q4_1 block is 20 bytes");

/* Name ("q4_1") or NULL if the id is not one of the supported types. */
const char *kernel_dtype_name(uint32_t ggml_type);

/* 1 if ggml_type is one of enum kernel_dtype. */
int kernel_dtype_supported(uint32_t ggml_type);

/* Elements per block (1 for float types, 32 for quantized) and bytes per block. */
size_t kernel_dtype_block_elems(enum kernel_dtype t);
size_t kernel_dtype_block_bytes(enum kernel_dtype t);

/*
 * Bytes of a row of n elements; 0 if n is not a multiple of the block size or the size
 * overflows. Callers validating untrusted shapes must check for 0.
 */
size_t kernel_dtype_row_bytes(enum kernel_dtype t, uint64_t n);

/* IEEE half and bfloat16 conversions (round to nearest even; NaN preserved). */
float kernel_fp16_to_fp32(uint16_t h);
uint16_t kernel_fp32_to_fp16(float f);
float kernel_bf16_to_fp32(uint16_t h);
uint16_t kernel_fp32_to_bf16(float f);

/* Reference dequantization of n elements (n a multiple of the block size) of type t. */
void kernel_dequantize_row(enum kernel_dtype t, const void *src, float *dst, size_t n);

/*
 * Reference quantization of n floats into type t, the way llama.cpp's reference
 * quantizers round (Q8_0: d = amax/127; Q4_0: d = max/-8 by signed max; Q4_1: d =
 * (max-min)/15, m = min). dst holds kernel_dtype_row_bytes(t, n) bytes.
 */
void kernel_quantize_row(enum kernel_dtype t, const float *src, void *dst, size_t n);

#endif

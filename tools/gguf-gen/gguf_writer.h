/*
 * gguf_writer: writes GGUF v3 files as a stream, so tensors far larger than memory can be
 * written row by row. Metadata and tensor infos are collected in memory first (they are
 * small), then gguf_writer_write_header() emits header, kv pairs, tensor infos and padding,
 * and the caller streams each tensor's bytes in the order the tensors were added, closing
 * each with gguf_writer_end_tensor() (which checks the byte count and pads).
 *
 * Errors are sticky: the kv and add_tensor calls record the first failure (out of memory,
 * bad shape) and write_header reports it. Single-threaded; one writer per file.
 */
#ifndef GGUF_WRITER_H
#define GGUF_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "pw_err.h"

struct gguf_writer;

/* alignment: general.alignment (power of two), written as a kv. NULL on out of memory. */
struct gguf_writer *gguf_writer_create(uint32_t alignment);
void gguf_writer_destroy(struct gguf_writer *w);

void gguf_writer_kv_u32(struct gguf_writer *w, const char *key, uint32_t v);
void gguf_writer_kv_i32(struct gguf_writer *w, const char *key, int32_t v);
void gguf_writer_kv_u64(struct gguf_writer *w, const char *key, uint64_t v);
void gguf_writer_kv_f32(struct gguf_writer *w, const char *key, float v);
void gguf_writer_kv_bool(struct gguf_writer *w, const char *key, bool v);
void gguf_writer_kv_str(struct gguf_writer *w, const char *key, const char *v);
/* Arrays; the values are copied. */
void gguf_writer_kv_arr_str(struct gguf_writer *w, const char *key, const char *const *v, size_t n);
void gguf_writer_kv_arr_i32(struct gguf_writer *w, const char *key, const int32_t *v, size_t n);
void gguf_writer_kv_arr_f32(struct gguf_writer *w, const char *key, const float *v, size_t n);

/* Declares a tensor (ggml type id, ne[0] fastest). Returns its data size in bytes, 0 on
 * error (bad type or shape; sticky). */
uint64_t gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t n_dims,
                                const uint64_t *ne, uint32_t type);

/* Writes everything up to the first tensor's data. */
enum pw_err gguf_writer_write_header(struct gguf_writer *w, FILE *f);
/* Appends bytes of the current tensor; PW_ERR_RANGE if more than its size. */
enum pw_err gguf_writer_write(struct gguf_writer *w, FILE *f, const void *p, size_t n);
/* Closes the current tensor: PW_ERR_RANGE unless exactly its size was written; pads. */
enum pw_err gguf_writer_end_tensor(struct gguf_writer *w, FILE *f);

/* The first error recorded, and its message ("" if none). */
const char *gguf_writer_error(const struct gguf_writer *w);

#endif

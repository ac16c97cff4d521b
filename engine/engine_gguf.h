/*
 * engine_gguf: a read-only, validating view of a GGUF v3 file (the model file is
 * untrusted input).
 *
 * The file is mapped read-only. engine_gguf_open() checks, before anything is used,
 * every count, string length, array length, tensor dimension, type, offset and alignment
 * against the file size, overflow-safe, and fails with one error line naming the defect
 * (e.g. "tensor blk.3.ffn_up.weight: data ends past end of file"). After a successful open
 * every pointer handed out is valid until engine_gguf_destroy().
 *
 * File layout (little-endian):
 *
 *   +-------+---------+-----------+------------+--------------------+-----+---------+
 *   | GGUF  | version | n_tensors | n_kv (u64) | kv pairs ...       | tensor infos |
 *   | magic | u32 = 3 | u64       |            | key str, type, val |  ...         |
 *   +-------+---------+-----------+------------+--------------------+--------------+
 *   | padding to general.alignment (default 32) | tensor data (offsets relative here) |
 *   +-------------------------------------------+--------------------------------------+
 *   str = u64 length + bytes (no NUL); tensor info = name str, u32 n_dims, u64 ne[n_dims],
 *   u32 ggml type, u64 offset.
 *
 * Versions 2 and 3 are accepted (same layout; v3 only added big-endian files, which are
 * rejected); version 1 (32-bit counts) is not. Nested arrays are rejected.
 *
 * Caps (over them: PW_ERR_TOOBIG): key 65535 bytes, tensor name 256 bytes, 1M kv pairs,
 * 1M tensors, general.alignment 1 MiB. Every other size is bounded by the file size.
 *
 * Error classes: PW_ERR_PARSE (malformed: truncated, out of bounds, misaligned, overlapping,
 * duplicate), PW_ERR_UNSUPPORTED (well-formed but not handled here: version, tensor type,
 * nested array), PW_ERR_TOOBIG (over a cap above), PW_ERR_IO (open/stat/mmap), PW_ERR_NOMEM.
 *
 * The mapping is only as stable as the file: a file truncated by someone else after open
 * raises SIGBUS on access; model files are never modified in place.
 *
 * Not thread-safe to destroy while in use; concurrent reads are fine.
 */
#ifndef ENGINE_GGUF_H
#define ENGINE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"

enum engine_gguf_type {
    ENGINE_GGUF_UINT8 = 0,
    ENGINE_GGUF_INT8 = 1,
    ENGINE_GGUF_UINT16 = 2,
    ENGINE_GGUF_INT16 = 3,
    ENGINE_GGUF_UINT32 = 4,
    ENGINE_GGUF_INT32 = 5,
    ENGINE_GGUF_FLOAT32 = 6,
    ENGINE_GGUF_BOOL = 7,
    ENGINE_GGUF_STRING = 8,
    ENGINE_GGUF_ARRAY = 9,
    ENGINE_GGUF_UINT64 = 10,
    ENGINE_GGUF_INT64 = 11,
    ENGINE_GGUF_FLOAT64 = 12,
};

/* Borrowed bytes inside the mapping (not NUL-terminated). */
struct engine_gguf_str {
    const char *ptr;
    uint64_t len;
};

#define ENGINE_GGUF_MAX_DIMS 4

struct engine_gguf_tensor {
    const char *name;                  /* NUL-terminated copy, owned by the engine_gguf */
    uint32_t n_dims;                   /* 1..4 */
    uint64_t ne[ENGINE_GGUF_MAX_DIMS]; /* elements per dim, ne[0] fastest; unused dims = 1 */
    uint32_t type;                     /* enum kernel_dtype (checked supported) */
    uint64_t n_elems;                  /* product of ne */
    uint64_t size;                     /* bytes of data */
    uint64_t offset;                   /* from the start of the data section, aligned */
    const void *data; /* into the mapping; aligned to general.alignment relative to the
                         start of the file (so in memory too for a page-aligned mapping) */
};

struct engine_gguf;

/*
 * Maps and validates path. On failure returns PW_ERR_PARSE / PW_ERR_UNSUPPORTED /
 * PW_ERR_IO / PW_ERR_TOOBIG with a one-line message in errbuf (always NUL-terminated).
 * *out is owned by the caller; free with engine_gguf_destroy().
 */
enum pw_err engine_gguf_open(const char *path, struct engine_gguf **out, char *errbuf,
                             size_t errcap);

/* Same checks over a caller-owned buffer that must outlive the result (fuzzing, tests). */
enum pw_err engine_gguf_open_memory(const void *data, size_t len, struct engine_gguf **out,
                                    char *errbuf, size_t errcap);

void engine_gguf_destroy(struct engine_gguf *g);

uint32_t engine_gguf_version(const struct engine_gguf *g);
size_t engine_gguf_file_size(const struct engine_gguf *g);
uint64_t engine_gguf_alignment(const struct engine_gguf *g);
/* File offset of the tensor data section (tensor offsets are relative to it). */
uint64_t engine_gguf_data_offset(const struct engine_gguf *g);

/* "uint32", "string", ...; "unknown" outside the enum. */
const char *engine_gguf_type_name(uint32_t type);

/* Metadata in file order: key (borrowed) and value type of pair i < engine_gguf_n_kv(). */
size_t engine_gguf_n_kv(const struct engine_gguf *g);
bool engine_gguf_kv_at(const struct engine_gguf *g, size_t i, struct engine_gguf_str *key,
                       enum engine_gguf_type *type);
/* Value type of key; false if missing. */
bool engine_gguf_kv_type(const struct engine_gguf *g, const char *key, enum engine_gguf_type *type);

/* Metadata lookup (O(log n) over keys sorted at open). Typed getters convert between integer widths
 * when the value fits; they return false when the key is missing or the type does not match.
 * get_f32 and arr_f32 take float32 and float64 values; get_i64/get_u64/get_u32 and arr_i64 take any
 * integer type whose value fits. */
bool engine_gguf_has(const struct engine_gguf *g, const char *key);
bool engine_gguf_get_u64(const struct engine_gguf *g, const char *key, uint64_t *out);
bool engine_gguf_get_u32(const struct engine_gguf *g, const char *key, uint32_t *out);
bool engine_gguf_get_i64(const struct engine_gguf *g, const char *key, int64_t *out);
bool engine_gguf_get_f32(const struct engine_gguf *g, const char *key, float *out);
bool engine_gguf_get_bool(const struct engine_gguf *g, const char *key, bool *out);
bool engine_gguf_get_str(const struct engine_gguf *g, const char *key, struct engine_gguf_str *out);

/*
 * Arrays: element type and length of the array at key; false if missing or not an array.
 * Numeric elements are read with engine_gguf_arr_*; string elements with O(1) random
 * access (offsets are indexed at open).
 */
bool engine_gguf_get_arr(const struct engine_gguf *g, const char *key,
                         enum engine_gguf_type *elem_type, uint64_t *len);
bool engine_gguf_arr_str(const struct engine_gguf *g, const char *key, uint64_t i,
                         struct engine_gguf_str *out);
bool engine_gguf_arr_f32(const struct engine_gguf *g, const char *key, uint64_t i, float *out);
bool engine_gguf_arr_i64(const struct engine_gguf *g, const char *key, uint64_t i, int64_t *out);
/* Packed little-endian elements of a numeric array (any alignment: read with memcpy);
 * false for missing keys, non-arrays and string arrays. */
bool engine_gguf_arr_data(const struct engine_gguf *g, const char *key, const void **data);

/*
 * Tells the kernel the mapped bytes of t are not needed any more (the backend copied them):
 * their pages leave the process's resident set. Reading them again is still correct (they
 * are re-read from the file). Only whole pages inside the tensor are affected. A no-op for
 * engine_gguf_open_memory() files.
 */
void engine_gguf_drop_tensor_pages(const struct engine_gguf *g, const struct engine_gguf_tensor *t);

size_t engine_gguf_n_tensors(const struct engine_gguf *g);
const struct engine_gguf_tensor *engine_gguf_tensor_at(const struct engine_gguf *g, size_t i);
/* NULL if absent. O(log n). */
const struct engine_gguf_tensor *engine_gguf_find_tensor(const struct engine_gguf *g,
                                                         const char *name);

#endif

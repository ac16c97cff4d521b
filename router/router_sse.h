/*
 * router_sse: a growable byte buffer and the Server-Sent Events framing the router writes.
 *
 * The OpenAI streaming format is plain SSE with one `data:` line per event:
 *     data: {json}\n\n        one chunk object
 *     data: [DONE]\n\n        end of a successful stream
 *     : keep-alive\n\n        comment, ignored by clients (cold-start waits)
 * The JSON producers here never emit a raw newline (jansson escapes control characters in
 * strings and JSON_COMPACT adds none), so one event is always one `data:` line.
 *
 * Pure functions over caller-owned memory; no locking, any thread.
 */
#ifndef ROUTER_SSE_H
#define ROUTER_SSE_H

#include <stddef.h>

#include "pw_err.h"

/* Growable byte buffer. Zero-initialise it (or router_sse_buf_init), free with _deinit. */
struct router_sse_buf {
    char *data; /* malloc'd; NUL-terminated when len > 0 (the NUL is not counted) */
    size_t len; /* bytes written */
    size_t cap; /* bytes allocated */
};

void router_sse_buf_init(struct router_sse_buf *b);
void router_sse_buf_deinit(struct router_sse_buf *b);

/* Drops the contents, keeps the allocation (for reuse after the bytes were sent). */
void router_sse_buf_reset(struct router_sse_buf *b);

/* Appends len bytes. PW_ERR_NOMEM leaves the buffer as it was. */
enum pw_err router_sse_buf_append(struct router_sse_buf *b, const void *data, size_t len);

/* Appends one `data: <json>\n\n` event; json (len bytes) must contain no newline. */
enum pw_err router_sse_data(struct router_sse_buf *b, const char *json, size_t len);

/* Appends `data: [DONE]\n\n`. */
enum pw_err router_sse_done(struct router_sse_buf *b);

/* Appends `: <text>\n\n` (a comment; text must contain no newline). */
enum pw_err router_sse_comment(struct router_sse_buf *b, const char *text);

#endif

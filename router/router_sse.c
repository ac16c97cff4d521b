/*
 * router_sse: SSE framing into a growable buffer. See router_sse.h.
 */
#include "router_sse.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void router_sse_buf_init(struct router_sse_buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void router_sse_buf_deinit(struct router_sse_buf *b)
{
    free(b->data);
    router_sse_buf_init(b);
}

void router_sse_buf_reset(struct router_sse_buf *b)
{
    b->len = 0;
    if (b->data != NULL)
        b->data[0] = '\0';
}

enum pw_err router_sse_buf_append(struct router_sse_buf *b, const void *data, size_t len)
{
    if (len == 0)
        return PW_OK;
    if (len > SIZE_MAX / 2 - b->len - 1)
        return PW_ERR_NOMEM;
    size_t need = b->len + len + 1;
    if (need > b->cap) {
        size_t cap = b->cap < 256 ? 256 : b->cap;
        while (cap < need)
            cap *= 2;
        char *p = realloc(b->data, cap);
        if (p == NULL)
            return PW_ERR_NOMEM;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
    return PW_OK;
}

enum pw_err router_sse_data(struct router_sse_buf *b, const char *json, size_t len)
{
    size_t mark = b->len;
    enum pw_err err = router_sse_buf_append(b, "data: ", 6);
    if (err == PW_OK)
        err = router_sse_buf_append(b, json, len);
    if (err == PW_OK)
        err = router_sse_buf_append(b, "\n\n", 2);
    if (err != PW_OK && b->data != NULL) {
        /* never leave half an event behind */
        b->len = mark;
        b->data[mark] = '\0';
    }
    return err;
}

enum pw_err router_sse_done(struct router_sse_buf *b)
{
    return router_sse_buf_append(b, "data: [DONE]\n\n", 14);
}

enum pw_err router_sse_comment(struct router_sse_buf *b, const char *text)
{
    size_t mark = b->len;
    enum pw_err err = router_sse_buf_append(b, ": ", 2);
    if (err == PW_OK)
        err = router_sse_buf_append(b, text, strlen(text));
    if (err == PW_OK)
        err = router_sse_buf_append(b, "\n\n", 2);
    if (err != PW_OK && b->data != NULL) {
        b->len = mark;
        b->data[mark] = '\0';
    }
    return err;
}

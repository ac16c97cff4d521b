/*
 * fuzz_proto: libFuzzer target for the wire decoders of runtime/pw_proto.h, which read
 * whatever Redis hands back. The first byte picks the message (InferenceRequest,
 * ReplyChunk, WorkerStatus, KeyRecord); the rest is the encoded message.
 *
 * Beyond "no crash" it checks the header's promises:
 *   - whatever decodes re-encodes (same checks both ways), and that encoding decodes again
 *     and re-encodes to the same bytes;
 *   - a buffer the pre-scan passes is decoded by protobuf-c, under a counting allocator,
 *     in no more peak memory than the pre-scan's estimate, and so under the budget of
 *     8 x len + 1 MiB that pw_proto enforces.
 *
 * The replay main() is tests/fuzz/fuzz_replay.c (ctest, label fuzz-smoke).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pw_proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* ---- counting allocator ------------------------------------------------------------- */

struct count_alloc {
    size_t in_use; /* bytes requested and not yet freed */
    size_t peak;   /* most of in_use at once */
};

/* Each block carries its size in a 16-byte header, so free can account for it. */
static void *count_malloc(void *ud, size_t n)
{
    struct count_alloc *c = ud;
    uint8_t *p = malloc(n + 16);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof(n));
    c->in_use += n;
    if (c->in_use > c->peak)
        c->peak = c->in_use;
    return p + 16;
}

static void count_free(void *ud, void *ptr)
{
    struct count_alloc *c = ud;
    if (!ptr)
        return;
    uint8_t *p = (uint8_t *)ptr - 16;
    size_t n;
    memcpy(&n, p, sizeof(n));
    c->in_use -= n;
    free(p);
}

/* ---- per-message table -------------------------------------------------------------- */

typedef enum pw_err (*unpack_fn)(const void *buf, size_t len, size_t max_len, void **out);
typedef enum pw_err (*pack_fn)(const void *m, uint8_t **out, size_t *len_out, const char **why);
typedef void (*free_fn)(void *m);

struct kind {
    const ProtobufCMessageDescriptor *desc;
    unpack_fn unpack;
    pack_fn pack;
    free_fn release;
};

/* Adapters from the typed API to void pointers (no casts of function pointer types). */
#define ADAPT(name, type)                                                                          \
    static enum pw_err unpack_##name(const void *buf, size_t len, size_t max_len, void **out)      \
    {                                                                                              \
        type *m = NULL;                                                                            \
        enum pw_err err = pw_proto_unpack_##name(buf, len, max_len, &m);                           \
        *out = m;                                                                                  \
        return err;                                                                                \
    }                                                                                              \
    static enum pw_err pack_##name(const void *m, uint8_t **out, size_t *len_out,                  \
                                   const char **why)                                               \
    {                                                                                              \
        return pw_proto_pack_##name##_alloc(m, out, len_out, why);                                 \
    }                                                                                              \
    static void free_##name(void *m)                                                               \
    {                                                                                              \
        pw_proto_free_##name(m);                                                                   \
    }

ADAPT(request, Parkway__InferenceRequest)
ADAPT(reply, Parkway__ReplyChunk)
ADAPT(worker, Parkway__WorkerStatus)
ADAPT(key, Parkway__KeyRecord)

static const struct kind kinds[4] = {
    {&parkway__inference_request__descriptor, unpack_request, pack_request, free_request},
    {&parkway__reply_chunk__descriptor, unpack_reply, pack_reply, free_reply},
    {&parkway__worker_status__descriptor, unpack_worker, pack_worker, free_worker},
    {&parkway__key_record__descriptor, unpack_key, pack_key, free_key},
};

static void touch_request(const Parkway__InferenceRequest *r)
{
    struct pw_sampling s;
    pw_proto_sampling_resolve(r->sampling, &s);
    if (s.n < 1 || s.n > PW_PROTO_N_MAX || s.top_logprobs > PW_PROTO_TOP_LOGPROBS_MAX)
        abort(); /* the checks passed, so the resolved values are in range */
}

/* The pre-scan's estimate must bound what protobuf-c really allocates. */
static void check_budget(const struct kind *k, const uint8_t *buf, size_t len)
{
    size_t est = 0;
    if (pw_proto_prescan(k->desc, buf, len, &est) != PW_OK)
        return;
    if (est > (size_t)len * 8 + (1u << 20))
        return; /* refused before protobuf-c runs */
    struct count_alloc c = {0, 0};
    ProtobufCAllocator a = {count_malloc, count_free, &c};
    ProtobufCMessage *m = protobuf_c_message_unpack(k->desc, &a, len, buf);
    if (m)
        protobuf_c_message_free_unpacked(m, &a);
    if (c.in_use != 0)
        abort(); /* protobuf-c leaked */
    if (c.peak > est) {
        fprintf(stderr, "fuzz_proto: %s: len %zu: peak %zu > estimate %zu\n", k->desc->name, len,
                c.peak, est);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const struct kind *k = &kinds[data[0] & 3];
    const uint8_t *buf = data + 1;
    size_t len = size - 1;
    void *m = NULL;

    check_budget(k, buf, len);
    enum pw_err err = k->unpack(buf, len, 0, &m);
    if (err != PW_OK) {
        if (m != NULL)
            abort(); /* errors leave *out NULL */
        return 0;
    }
    if (m == NULL)
        abort();
    if (k == &kinds[0])
        touch_request(m);

    /* Round trip: decoded -> encoded -> decoded -> the same encoding. */
    uint8_t *e1 = NULL, *e2 = NULL;
    size_t l1 = 0, l2 = 0;
    void *m2 = NULL;
    const char *why = NULL;
    if (k->pack(m, &e1, &l1, &why) != PW_OK) {
        fprintf(stderr, "fuzz_proto: %s decoded but does not encode: %s\n", k->desc->name,
                why ? why : "?");
        abort();
    }
    if (k->unpack(e1, l1, 0, &m2) != PW_OK)
        abort();
    if (k->pack(m2, &e2, &l2, &why) != PW_OK)
        abort();
    if (l1 != l2 || memcmp(e1, e2, l1) != 0)
        abort();
    free(e1);
    free(e2);
    k->release(m2);
    k->release(m);
    return 0;
}

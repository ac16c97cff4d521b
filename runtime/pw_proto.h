/*
 * pw_proto: the only way parkway decodes and encodes its wire messages (parkway.proto).
 *
 * Decoding is for input from Redis, so it never trusts the bytes:
 *   1. a buffer over the caller's cap is refused before protobuf-c sees it (PW_ERR_TOOBIG);
 *   2. a pre-scan of the wire format checks it is well formed and estimates what protobuf-c
 *      would allocate for it; over 8 x len + 1 MiB it is refused (PW_ERR_TOOBIG), so a
 *      small buffer of many empty sub-messages cannot blow up into a huge allocation;
 *   3. protobuf-c decodes it (PW_ERR_PARSE if it refuses);
 *   4. the per-field caps and ranges below are checked (PW_ERR_TOOBIG for a count or a
 *      length over its cap, PW_ERR_RANGE for a value outside its range, PW_ERR_PARSE for a
 *      missing required field or an unknown enum value).
 * Encoding runs the same check first, so the router can never write what engines refuse.
 * docs/internals/proto.md lists the messages, caps and presence semantics.
 *
 * Thread-safe: no shared state. Decoded messages are owned by the caller and freed with
 * the matching pw_proto_free_*() (NULL is a no-op).
 */
#ifndef PW_PROTO_H
#define PW_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "parkway.pb-c.h"
#include "pw_err.h"

/* ---- caps (see docs/internals/proto.md) -------------------------------------------- */

/* Default buffer caps, used when the max_len argument is 0. */
#define PW_PROTO_REQUEST_MAX_BYTES (9u << 20) /* 8 MiB body + room for the envelope */
#define PW_PROTO_REPLY_MAX_BYTES (1u << 20)
#define PW_PROTO_WORKER_MAX_BYTES (64u << 10)
#define PW_PROTO_KEY_MAX_BYTES (64u << 10)

#define PW_PROTO_ID_MAX 256               /* bytes: ids, names, tenant, function, reply_to */
#define PW_PROTO_CUSTOM_ID_MAX 512        /* bytes: batch custom_id */
#define PW_PROTO_ROLE_MAX 32              /* bytes: ChatMessage.role */
#define PW_PROTO_MESSAGES_MAX 4096        /* ChatMessage entries per request */
#define PW_PROTO_PROMPT_TOKENS_MAX 131072 /* prompt_token_ids entries */
#define PW_PROTO_STOP_MAX 4               /* stop strings */
#define PW_PROTO_STOP_LEN_MAX 256         /* bytes per stop string (at least 1) */
#define PW_PROTO_N_MAX 8                  /* choices per request */
#define PW_PROTO_TOP_LOGPROBS_MAX 20      /* alternatives per token */
#define PW_PROTO_MAX_TOKENS_MAX 1048576   /* max_tokens upper bound */
#define PW_PROTO_LOGPROBS_MAX 4096        /* TokenLogprob entries per chunk */
#define PW_PROTO_TOKEN_LEN_MAX 1024       /* bytes of one token's text or bytes */
#define PW_PROTO_ERRMSG_MAX 4096          /* bytes: Error.message */
#define PW_PROTO_ALLOWED_FNS_MAX 256      /* KeyRecord.allowed_functions entries */

/* ---- sampling presence -------------------------------------------------------------- */

/*
 * SamplingParams with the presence bits applied: every field holds the value the engine
 * must use. Defaults are OpenAI's: temperature 1, top_p 1, n 1, penalties off.
 */
struct pw_sampling {
    uint32_t max_tokens;      /* 0 = up to the context length */
    float temperature;        /* 0 = greedy */
    float top_p;              /* 1 = off */
    uint32_t top_k;           /* 0 = off */
    float min_p;              /* 0 = off */
    float presence_penalty;   /* 0 = off */
    float frequency_penalty;  /* 0 = off */
    float repetition_penalty; /* 1 = off */
    uint64_t seed;            /* as the router filled it */
    bool seed_from_client;    /* the client chose the seed */
    uint32_t n;               /* 1..PW_PROTO_N_MAX */
    bool logprobs;
    uint32_t top_logprobs; /* 0..PW_PROTO_TOP_LOGPROBS_MAX */
    bool ignore_eos;
};

/* True when the presence bit for field (a PARKWAY__SAMPLING_FIELD__* value) is on. */
static inline bool pw_proto_sampling_has(const Parkway__SamplingParams *sp,
                                         Parkway__SamplingField field)
{
    return sp != NULL && (sp->present & (uint32_t)field) != 0;
}

/* Turns the presence bit for field on. */
static inline void pw_proto_sampling_mark(Parkway__SamplingParams *sp, Parkway__SamplingField field)
{
    sp->present |= (uint32_t)field;
}

/*
 * Fills out from sp (NULL = all defaults), applying defaults for fields whose presence bit
 * is off. Does not check ranges: run pw_proto_check_request first. The stop strings stay
 * in sp (borrowed).
 */
void pw_proto_sampling_resolve(const Parkway__SamplingParams *sp, struct pw_sampling *out);

/* ---- checks ------------------------------------------------------------------------- */

/*
 * Check a message against the caps and ranges. Returns PW_OK, PW_ERR_TOOBIG, PW_ERR_RANGE
 * or PW_ERR_PARSE; on error *why (if why is not NULL) is set to a static string naming the
 * field, e.g. "sampling.stop: more than 4 entries", fit for a 400 reply.
 */
enum pw_err pw_proto_check_request(const Parkway__InferenceRequest *req, const char **why);
enum pw_err pw_proto_check_reply(const Parkway__ReplyChunk *chunk, const char **why);
enum pw_err pw_proto_check_worker(const Parkway__WorkerStatus *ws, const char **why);
enum pw_err pw_proto_check_key(const Parkway__KeyRecord *key, const char **why);

/* ---- decoding ----------------------------------------------------------------------- */

/*
 * Decode len bytes at buf (borrowed for the call). max_len caps len; 0 = the message's
 * default cap (PW_PROTO_*_MAX_BYTES). On PW_OK *out is a new message the caller frees with
 * the matching pw_proto_free_*(); on error *out is NULL. Errors: PW_ERR_INVAL (NULL out,
 * or NULL buf with len > 0), PW_ERR_TOOBIG, PW_ERR_PARSE, PW_ERR_RANGE, PW_ERR_NOMEM.
 * An empty buffer decodes to an all-default message, which the checks then judge.
 */
enum pw_err pw_proto_unpack_request(const void *buf, size_t len, size_t max_len,
                                    Parkway__InferenceRequest **out);
enum pw_err pw_proto_unpack_reply(const void *buf, size_t len, size_t max_len,
                                  Parkway__ReplyChunk **out);
enum pw_err pw_proto_unpack_worker(const void *buf, size_t len, size_t max_len,
                                   Parkway__WorkerStatus **out);
enum pw_err pw_proto_unpack_key(const void *buf, size_t len, size_t max_len,
                                Parkway__KeyRecord **out);

void pw_proto_free_request(Parkway__InferenceRequest *req);
void pw_proto_free_reply(Parkway__ReplyChunk *chunk);
void pw_proto_free_worker(Parkway__WorkerStatus *ws);
void pw_proto_free_key(Parkway__KeyRecord *key);

/* ---- encoding ----------------------------------------------------------------------- */

/*
 * Encode a message after checking it (pw_proto_check_*; *why as there, may be NULL).
 * Into a caller buffer: buf of cap bytes; *len_out gets the encoded length; PW_ERR_TOOBIG
 * if it does not fit (nothing useful is left in buf then).
 */
enum pw_err pw_proto_pack_request(const Parkway__InferenceRequest *req, void *buf, size_t cap,
                                  size_t *len_out, const char **why);
enum pw_err pw_proto_pack_reply(const Parkway__ReplyChunk *chunk, void *buf, size_t cap,
                                size_t *len_out, const char **why);
enum pw_err pw_proto_pack_worker(const Parkway__WorkerStatus *ws, void *buf, size_t cap,
                                 size_t *len_out, const char **why);
enum pw_err pw_proto_pack_key(const Parkway__KeyRecord *key, void *buf, size_t cap, size_t *len_out,
                              const char **why);

/*
 * Encode into a new malloc'd buffer (*out, *len_out; the caller frees it with free()).
 * An empty message encodes to zero bytes; *out is still a valid (1-byte) allocation.
 */
enum pw_err pw_proto_pack_request_alloc(const Parkway__InferenceRequest *req, uint8_t **out,
                                        size_t *len_out, const char **why);
enum pw_err pw_proto_pack_reply_alloc(const Parkway__ReplyChunk *chunk, uint8_t **out,
                                      size_t *len_out, const char **why);
enum pw_err pw_proto_pack_worker_alloc(const Parkway__WorkerStatus *ws, uint8_t **out,
                                       size_t *len_out, const char **why);
enum pw_err pw_proto_pack_key_alloc(const Parkway__KeyRecord *key, uint8_t **out, size_t *len_out,
                                    const char **why);

/*
 * The pre-scan on its own: walks the wire format of a message of type desc and returns
 * PW_OK with *alloc_bytes an upper estimate of what protobuf-c allocates to decode it, or
 * PW_ERR_PARSE if the bytes are not well formed (bad varint, length past the end, group
 * wire types, field number 0, nesting deeper than 32). Exposed for tests and fuzzing.
 */
enum pw_err pw_proto_prescan(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len,
                             size_t *alloc_bytes);

#endif

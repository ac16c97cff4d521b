/*
 * pw_proto: capped decoding and checked encoding of the parkway wire messages.
 *
 * protobuf-c sizes its allocations from the input: a repeated field is counted first and
 * then allocated as count x element size, and every field occurrence takes a temporary
 * scan record. A hostile buffer of empty sub-messages therefore costs about 30 times its
 * size. The pre-scan here walks the wire format without allocating, bounds that cost, and
 * refuses the buffer before protobuf-c runs. The field checks after decoding are the
 * semantic caps (how many stop strings, how long an id). No shared state; thread-safe.
 */
#include "pw_proto.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Wire types (protobuf encoding spec). */
enum {
    WT_VARINT = 0,
    WT_FIXED64 = 1,
    WT_LEN = 2,
    WT_FIXED32 = 5,
};

#define PRESCAN_MAX_DEPTH 32
/* protobuf-c keeps a 32-byte record per field occurrence in slabs that double: <= 64. */
#define PRESCAN_SCAN_RECORD 64
/* Allocation budget for a buffer of len bytes. */
#define ALLOC_BUDGET(len) ((len)*8 + (1u << 20))

/* ---- pre-scan ----------------------------------------------------------------------- */

static bool read_varint(const uint8_t *p, size_t len, size_t *pos, uint64_t *v)
{
    uint64_t r = 0;
    for (unsigned i = 0; i < 10; i++) {
        if (*pos >= len)
            return false;
        uint8_t b = p[(*pos)++];
        r |= (uint64_t)(b & 0x7f) << (7 * i);
        if ((b & 0x80) == 0) {
            *v = r;
            return true;
        }
    }
    return false; /* more than 10 bytes */
}

/* Bytes protobuf-c uses for one element of a repeated field of this type. */
static size_t elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE:
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE:
        return 8;
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    default:
        return 4; /* 32-bit ints, float, bool (protobuf_c_boolean is int), enum */
    }
}

/*
 * Walks one message. *retained grows by what stays allocated after decoding; *peak_tmp is
 * set to the most temporary scan memory alive at once inside this message (its own records
 * plus the deepest child's, since children are decoded one at a time).
 */
static enum pw_err prescan_msg(const ProtobufCMessageDescriptor *desc, const uint8_t *p, size_t len,
                               unsigned depth, size_t *retained, size_t *peak_tmp)
{
    size_t pos = 0, occurrences = 0, child_peak = 0;

    if (depth > PRESCAN_MAX_DEPTH)
        return PW_ERR_PARSE;
    *retained += desc->sizeof_message;
    while (pos < len) {
        uint64_t tag, v;
        if (!read_varint(p, len, &pos, &tag))
            return PW_ERR_PARSE;
        uint64_t num = tag >> 3;
        unsigned wt = (unsigned)(tag & 7);
        if (num == 0 || num > 0x1fffffff)
            return PW_ERR_PARSE;
        occurrences++;

        size_t payload_len = 0;
        const uint8_t *payload = p + pos;
        switch (wt) {
        case WT_VARINT: {
            size_t start = pos;
            if (!read_varint(p, len, &pos, &v))
                return PW_ERR_PARSE;
            payload_len = pos - start;
            break;
        }
        case WT_FIXED64:
            if (len - pos < 8)
                return PW_ERR_PARSE;
            payload_len = 8;
            pos += 8;
            break;
        case WT_FIXED32:
            if (len - pos < 4)
                return PW_ERR_PARSE;
            payload_len = 4;
            pos += 4;
            break;
        case WT_LEN:
            if (!read_varint(p, len, &pos, &v) || v > len - pos)
                return PW_ERR_PARSE;
            payload = p + pos;
            payload_len = (size_t)v;
            pos += (size_t)v;
            break;
        default:
            return PW_ERR_PARSE; /* groups (3, 4) and 6, 7 */
        }

        const ProtobufCFieldDescriptor *fd =
            protobuf_c_message_descriptor_get_field(desc, (unsigned)num);
        if (fd == NULL) {
            /* Kept by protobuf-c as an unknown field: a record plus a copy of the bytes. */
            *retained += sizeof(ProtobufCMessageUnknownField) + payload_len + 16;
            continue;
        }
        bool repeated = fd->label == PROTOBUF_C_LABEL_REPEATED;
        size_t es = elem_size(fd->type);
        if (wt != WT_LEN) {
            if (repeated)
                *retained += es;
            continue;
        }
        switch (fd->type) {
        case PROTOBUF_C_TYPE_MESSAGE: {
            size_t sub_peak = 0;
            enum pw_err err =
                prescan_msg(fd->descriptor, payload, payload_len, depth + 1, retained, &sub_peak);
            if (err)
                return err;
            if (sub_peak > child_peak)
                child_peak = sub_peak;
            if (repeated)
                *retained += es;
            break;
        }
        case PROTOBUF_C_TYPE_STRING:
        case PROTOBUF_C_TYPE_BYTES:
            *retained += payload_len + 1 + (repeated ? es : 0);
            break;
        default: {
            /* Packed scalars: count the elements the way protobuf-c will. */
            size_t count;
            if (fd->type == PROTOBUF_C_TYPE_FIXED32 || fd->type == PROTOBUF_C_TYPE_SFIXED32 ||
                fd->type == PROTOBUF_C_TYPE_FLOAT) {
                count = payload_len / 4;
            } else if (fd->type == PROTOBUF_C_TYPE_FIXED64 ||
                       fd->type == PROTOBUF_C_TYPE_SFIXED64 || fd->type == PROTOBUF_C_TYPE_DOUBLE) {
                count = payload_len / 8;
            } else {
                count = 0;
                for (size_t i = 0; i < payload_len; i++)
                    count += (payload[i] & 0x80) == 0;
            }
            *retained += count * es;
            break;
        }
        }
    }
    *peak_tmp = occurrences * PRESCAN_SCAN_RECORD + child_peak;
    return PW_OK;
}

enum pw_err pw_proto_prescan(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len,
                             size_t *alloc_bytes)
{
    size_t retained = 0, peak = 0;
    PW_ASSERT(desc != NULL && alloc_bytes != NULL);
    if (buf == NULL && len > 0)
        return PW_ERR_INVAL;
    enum pw_err err = prescan_msg(desc, buf, len, 0, &retained, &peak);
    *alloc_bytes = err ? 0 : retained + peak;
    return err;
}

/* ---- field checks ------------------------------------------------------------------- */

/* protobuf-c strings may be NULL in a hand-built message; they mean "". */
static size_t slen(const char *s, size_t max)
{
    return s == NULL ? 0 : strnlen(s, max + 1);
}

/* TOOBIG if s is longer than max, PARSE if it is required (min 1) and empty. */
static enum pw_err check_str(const char *s, size_t min, size_t max, const char *name_long,
                             const char *name_missing, const char **why)
{
    size_t l = slen(s, max);
    if (l > max) {
        *why = name_long;
        return PW_ERR_TOOBIG;
    }
    if (l < min) {
        *why = name_missing;
        return PW_ERR_PARSE;
    }
    return PW_OK;
}

#define CHECK_STR(s, min, max, name)                                                               \
    do {                                                                                           \
        enum pw_err e_ = check_str((s), (min), (max), name ": too long", name ": missing", why);   \
        if (e_ != PW_OK)                                                                           \
            return e_;                                                                             \
    } while (0)

#define CHECK_RANGE(cond, name)                                                                    \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            *why = name ": out of range";                                                          \
            return PW_ERR_RANGE;                                                                   \
        }                                                                                          \
    } while (0)

static bool in_range(float v, float lo, float hi)
{
    return isfinite(v) && v >= lo && v <= hi;
}

static enum pw_err check_sampling(const Parkway__SamplingParams *sp, const char **why)
{
    if (sp->n_stop > PW_PROTO_STOP_MAX) {
        *why = "sampling.stop: more than 4 entries";
        return PW_ERR_TOOBIG;
    }
    if (sp->n_stop > 0 && sp->stop == NULL) {
        *why = "sampling.stop: missing";
        return PW_ERR_INVAL;
    }
    for (size_t i = 0; i < sp->n_stop; i++) {
        size_t l = slen(sp->stop[i], PW_PROTO_STOP_LEN_MAX);
        if (l > PW_PROTO_STOP_LEN_MAX) {
            *why = "sampling.stop: entry longer than 256 bytes";
            return PW_ERR_TOOBIG;
        }
        if (l == 0) {
            *why = "sampling.stop: empty entry";
            return PW_ERR_RANGE;
        }
    }
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS))
        CHECK_RANGE(sp->max_tokens <= PW_PROTO_MAX_TOKENS_MAX, "sampling.max_tokens");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE))
        CHECK_RANGE(in_range(sp->temperature, 0.0f, 2.0f), "sampling.temperature");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_P))
        CHECK_RANGE(in_range(sp->top_p, 0.0f, 1.0f) && sp->top_p > 0.0f, "sampling.top_p");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MIN_P))
        CHECK_RANGE(in_range(sp->min_p, 0.0f, 1.0f), "sampling.min_p");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_PRESENCE_PENALTY))
        CHECK_RANGE(in_range(sp->presence_penalty, -2.0f, 2.0f), "sampling.presence_penalty");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_FREQUENCY_PENALTY))
        CHECK_RANGE(in_range(sp->frequency_penalty, -2.0f, 2.0f), "sampling.frequency_penalty");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_REPETITION_PENALTY))
        CHECK_RANGE(in_range(sp->repetition_penalty, 0.0f, 10.0f) && sp->repetition_penalty > 0.0f,
                    "sampling.repetition_penalty");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N))
        CHECK_RANGE(sp->n >= 1 && sp->n <= PW_PROTO_N_MAX, "sampling.n");
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_LOGPROBS)) {
        CHECK_RANGE(sp->top_logprobs <= PW_PROTO_TOP_LOGPROBS_MAX, "sampling.top_logprobs");
        if (sp->top_logprobs > 0 && !sp->logprobs) {
            *why = "sampling.top_logprobs: needs logprobs";
            return PW_ERR_RANGE;
        }
    }
    return PW_OK;
}

static enum pw_err check_request(const Parkway__InferenceRequest *req, const char **why)
{
    CHECK_STR(req->id, 1, PW_PROTO_ID_MAX, "id");
    CHECK_STR(req->function, 1, PW_PROTO_ID_MAX, "function");
    CHECK_STR(req->tenant, 0, PW_PROTO_ID_MAX, "tenant");
    CHECK_STR(req->key_id, 0, PW_PROTO_ID_MAX, "key_id");
    CHECK_STR(req->reply_to, 1, PW_PROTO_ID_MAX, "reply_to");
    CHECK_STR(req->batch_id, 0, PW_PROTO_ID_MAX, "batch_id");
    CHECK_STR(req->custom_id, 0, PW_PROTO_CUSTOM_ID_MAX, "custom_id");

    if (req->n_messages > PW_PROTO_MESSAGES_MAX) {
        *why = "messages: more than 4096 entries";
        return PW_ERR_TOOBIG;
    }
    if (req->n_prompt_token_ids > PW_PROTO_PROMPT_TOKENS_MAX) {
        *why = "prompt_token_ids: more than 131072 entries";
        return PW_ERR_TOOBIG;
    }
    if ((req->n_messages > 0 && req->messages == NULL) ||
        (req->n_prompt_token_ids > 0 && req->prompt_token_ids == NULL)) {
        *why = "repeated field: missing array";
        return PW_ERR_INVAL;
    }
    for (size_t i = 0; i < req->n_messages; i++) {
        const Parkway__ChatMessage *m = req->messages[i];
        if (m == NULL) {
            *why = "messages: missing entry";
            return PW_ERR_INVAL;
        }
        CHECK_STR(m->role, 1, PW_PROTO_ROLE_MAX, "messages.role");
        CHECK_STR(m->name, 0, PW_PROTO_ID_MAX, "messages.name");
    }

    bool has_prompt = slen(req->prompt, 1) > 0 || req->n_prompt_token_ids > 0;
    switch (req->kind) {
    case PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT:
        if (req->n_messages == 0) {
            *why = "messages: missing";
            return PW_ERR_PARSE;
        }
        if (has_prompt) {
            *why = "prompt: not allowed in a chat request";
            return PW_ERR_PARSE;
        }
        break;
    case PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION:
        if (req->n_messages > 0) {
            *why = "messages: not allowed in a completion request";
            return PW_ERR_PARSE;
        }
        if (slen(req->prompt, 1) > 0 && req->n_prompt_token_ids > 0) {
            *why = "prompt: both text and token ids";
            return PW_ERR_PARSE;
        }
        break;
    default:
        *why = "kind: unknown";
        return PW_ERR_PARSE;
    }
    CHECK_RANGE(req->deadline_unix_ms >= 0, "deadline_unix_ms");
    CHECK_RANGE(req->enqueued_unix_ms >= 0, "enqueued_unix_ms");
    if (req->sampling != NULL)
        return check_sampling(req->sampling, why);
    return PW_OK;
}

static enum pw_err check_token(const char *token, const ProtobufCBinaryData *bytes, float logprob,
                               const char **why)
{
    CHECK_STR(token, 0, PW_PROTO_TOKEN_LEN_MAX, "logprobs.token");
    if (bytes->len > PW_PROTO_TOKEN_LEN_MAX) {
        *why = "logprobs.bytes: too long";
        return PW_ERR_TOOBIG;
    }
    if (bytes->len > 0 && bytes->data == NULL) {
        *why = "logprobs.bytes: missing data";
        return PW_ERR_INVAL;
    }
    /* -inf is a legitimate logprob (a masked token); NaN and +inf are not. */
    CHECK_RANGE(!isnan(logprob) && logprob <= 0.0f, "logprobs.logprob");
    return PW_OK;
}

static enum pw_err check_reply(const Parkway__ReplyChunk *c, const char **why)
{
    enum pw_err err;

    CHECK_STR(c->request_id, 1, PW_PROTO_ID_MAX, "request_id");
    CHECK_STR(c->worker_id, 0, PW_PROTO_ID_MAX, "worker_id");
    CHECK_RANGE(c->index < PW_PROTO_N_MAX, "index");
    if ((unsigned)c->finish_reason > PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED) {
        *why = "finish_reason: unknown";
        return PW_ERR_PARSE;
    }
    if (c->n_logprobs > PW_PROTO_LOGPROBS_MAX) {
        *why = "logprobs: too many entries";
        return PW_ERR_TOOBIG;
    }
    if (c->n_logprobs > 0 && c->logprobs == NULL) {
        *why = "logprobs: missing array";
        return PW_ERR_INVAL;
    }
    for (size_t i = 0; i < c->n_logprobs; i++) {
        const Parkway__TokenLogprob *t = c->logprobs[i];
        if (t == NULL) {
            *why = "logprobs: missing entry";
            return PW_ERR_INVAL;
        }
        if ((err = check_token(t->token, &t->bytes, t->logprob, why)) != PW_OK)
            return err;
        if (t->n_top_logprobs > PW_PROTO_TOP_LOGPROBS_MAX) {
            *why = "logprobs.top_logprobs: more than 20 entries";
            return PW_ERR_TOOBIG;
        }
        if (t->n_top_logprobs > 0 && t->top_logprobs == NULL) {
            *why = "logprobs.top_logprobs: missing array";
            return PW_ERR_INVAL;
        }
        for (size_t j = 0; j < t->n_top_logprobs; j++) {
            const Parkway__TopLogprob *tt = t->top_logprobs[j];
            if (tt == NULL) {
                *why = "logprobs.top_logprobs: missing entry";
                return PW_ERR_INVAL;
            }
            if ((err = check_token(tt->token, &tt->bytes, tt->logprob, why)) != PW_OK)
                return err;
        }
    }
    if (c->error != NULL) {
        CHECK_STR(c->error->code, 0, PW_PROTO_ID_MAX, "error.code");
        CHECK_STR(c->error->message, 0, PW_PROTO_ERRMSG_MAX, "error.message");
        CHECK_RANGE(c->error->http_status == 0 ||
                        (c->error->http_status >= 100 && c->error->http_status <= 599),
                    "error.http_status");
    }
    return PW_OK;
}

static enum pw_err check_worker(const Parkway__WorkerStatus *w, const char **why)
{
    CHECK_STR(w->worker_id, 1, PW_PROTO_ID_MAX, "worker_id");
    CHECK_STR(w->function, 0, PW_PROTO_ID_MAX, "function");
    CHECK_STR(w->host, 0, PW_PROTO_ID_MAX, "host");
    CHECK_STR(w->backend, 0, PW_PROTO_ID_MAX, "backend");
    CHECK_STR(w->model_sha256, 0, PW_PROTO_ID_MAX, "model_sha256");
    CHECK_STR(w->instance_id, 0, PW_PROTO_ID_MAX, "instance_id");
    if (w->state == PARKWAY__WORKER_STATE__WORKER_STATE_UNSPECIFIED ||
        (unsigned)w->state > PARKWAY__WORKER_STATE__WORKER_STATE_STOPPED) {
        *why = "state: unknown";
        return PW_ERR_PARSE;
    }
    CHECK_RANGE(isfinite(w->tokens_per_s) && w->tokens_per_s >= 0.0f, "tokens_per_s");
    return PW_OK;
}

static enum pw_err check_key(const Parkway__KeyRecord *k, const char **why)
{
    CHECK_STR(k->key_id, 1, PW_PROTO_ID_MAX, "key_id");
    CHECK_STR(k->tenant, 1, PW_PROTO_ID_MAX, "tenant");
    CHECK_STR(k->name, 0, PW_PROTO_ID_MAX, "name");
    if (k->n_allowed_functions > PW_PROTO_ALLOWED_FNS_MAX) {
        *why = "allowed_functions: more than 256 entries";
        return PW_ERR_TOOBIG;
    }
    if (k->n_allowed_functions > 0 && k->allowed_functions == NULL) {
        *why = "allowed_functions: missing array";
        return PW_ERR_INVAL;
    }
    for (size_t i = 0; i < k->n_allowed_functions; i++)
        CHECK_STR(k->allowed_functions[i], 1, PW_PROTO_ID_MAX, "allowed_functions");
    return PW_OK;
}

/* The public checks tolerate why == NULL and a NULL message. */
#define PUBLIC_CHECK(fn, type, impl)                                                               \
    enum pw_err fn(const type *m, const char **why)                                                \
    {                                                                                              \
        const char *dummy = NULL;                                                                  \
        if (why == NULL)                                                                           \
            why = &dummy;                                                                          \
        *why = NULL;                                                                               \
        if (m == NULL) {                                                                           \
            *why = "message: missing";                                                             \
            return PW_ERR_INVAL;                                                                   \
        }                                                                                          \
        return impl(m, why);                                                                       \
    }

PUBLIC_CHECK(pw_proto_check_request, Parkway__InferenceRequest, check_request)
PUBLIC_CHECK(pw_proto_check_reply, Parkway__ReplyChunk, check_reply)
PUBLIC_CHECK(pw_proto_check_worker, Parkway__WorkerStatus, check_worker)
PUBLIC_CHECK(pw_proto_check_key, Parkway__KeyRecord, check_key)

/* ---- sampling ----------------------------------------------------------------------- */

void pw_proto_sampling_resolve(const Parkway__SamplingParams *sp, struct pw_sampling *out)
{
    *out = (struct pw_sampling){
        .max_tokens = 0,
        .temperature = 1.0f,
        .top_p = 1.0f,
        .top_k = 0,
        .min_p = 0.0f,
        .presence_penalty = 0.0f,
        .frequency_penalty = 0.0f,
        .repetition_penalty = 1.0f,
        .n = 1,
    };
    if (sp == NULL)
        return;
#define TAKE(bit, field)                                                                           \
    if (pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_##bit))                  \
    out->field = sp->field
    TAKE(MAX_TOKENS, max_tokens);
    TAKE(TEMPERATURE, temperature);
    TAKE(TOP_P, top_p);
    TAKE(TOP_K, top_k);
    TAKE(MIN_P, min_p);
    TAKE(PRESENCE_PENALTY, presence_penalty);
    TAKE(FREQUENCY_PENALTY, frequency_penalty);
    TAKE(REPETITION_PENALTY, repetition_penalty);
    TAKE(N, n);
    TAKE(TOP_LOGPROBS, top_logprobs);
#undef TAKE
    out->seed = sp->seed;
    out->seed_from_client = pw_proto_sampling_has(sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_SEED);
    out->logprobs = sp->logprobs != 0;
    out->ignore_eos = sp->ignore_eos != 0;
}

/* ---- decode / encode ---------------------------------------------------------------- */

typedef enum pw_err (*check_fn)(const ProtobufCMessage *m, const char **why);

static enum pw_err unpack_checked(const ProtobufCMessageDescriptor *desc, check_fn check,
                                  const void *buf, size_t len, size_t max_len, size_t default_max,
                                  ProtobufCMessage **out)
{
    static const uint8_t empty[1];
    enum pw_err err;
    size_t budget;
    ProtobufCMessage *m = NULL;

    if (out == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    if (buf == NULL && len > 0)
        return PW_ERR_INVAL;
    if (buf == NULL)
        buf = empty;
    if (max_len == 0)
        max_len = default_max;
    if (len > max_len)
        return PW_ERR_TOOBIG;
    if ((err = pw_proto_prescan(desc, buf, len, &budget)) != PW_OK)
        return err;
    if (budget > ALLOC_BUDGET(len))
        return PW_ERR_TOOBIG;
    /* protobuf-c returns NULL for malformed input and for OOM alike. */
    m = protobuf_c_message_unpack(desc, NULL, len, buf);
    if (m == NULL)
        return PW_ERR_PARSE;
    const char *why = NULL;
    if ((err = check(m, &why)) != PW_OK) {
        protobuf_c_message_free_unpacked(m, NULL);
        return err;
    }
    *out = m;
    return PW_OK;
}

static enum pw_err pack_checked(const ProtobufCMessage *m, check_fn check, void *buf, size_t cap,
                                size_t *len_out, const char **why)
{
    const char *dummy = NULL;
    enum pw_err err;

    if (why == NULL)
        why = &dummy;
    *why = NULL;
    if (m == NULL || len_out == NULL || (buf == NULL && cap > 0))
        return PW_ERR_INVAL;
    *len_out = 0;
    if ((err = check(m, why)) != PW_OK)
        return err;
    size_t need = protobuf_c_message_get_packed_size(m);
    if (need > cap) {
        *why = "buffer too small";
        return PW_ERR_TOOBIG;
    }
    if (need > 0)
        need = protobuf_c_message_pack(m, buf);
    *len_out = need;
    return PW_OK;
}

static enum pw_err pack_alloc_checked(const ProtobufCMessage *m, check_fn check, uint8_t **out,
                                      size_t *len_out, const char **why)
{
    const char *dummy = NULL;
    enum pw_err err;
    uint8_t *buf = NULL;

    if (why == NULL)
        why = &dummy;
    *why = NULL;
    if (out == NULL || len_out == NULL || m == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    *len_out = 0;
    if ((err = check(m, why)) != PW_OK)
        goto out;
    size_t need = protobuf_c_message_get_packed_size(m);
    buf = malloc(need > 0 ? need : 1);
    if (buf == NULL) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    if (need > 0)
        need = protobuf_c_message_pack(m, buf);
    *out = buf;
    *len_out = need;
    buf = NULL;
out:
    free(buf);
    return err;
}

/* Typed adapters: check_fn takes the base message. */
#define ADAPT(name, type, impl)                                                                    \
    static enum pw_err name(const ProtobufCMessage *m, const char **why)                           \
    {                                                                                              \
        return impl((const type *)m, why);                                                         \
    }
ADAPT(adapt_request, Parkway__InferenceRequest, check_request)
ADAPT(adapt_reply, Parkway__ReplyChunk, check_reply)
ADAPT(adapt_worker, Parkway__WorkerStatus, check_worker)
ADAPT(adapt_key, Parkway__KeyRecord, check_key)

#define DEFINE_CODEC(suffix, type, desc, adapt, default_max)                                       \
    enum pw_err pw_proto_unpack_##suffix(const void *buf, size_t len, size_t max_len, type **out)  \
    {                                                                                              \
        ProtobufCMessage *m = NULL;                                                                \
        if (out == NULL)                                                                           \
            return PW_ERR_INVAL;                                                                   \
        enum pw_err err = unpack_checked(&desc, adapt, buf, len, max_len, default_max, &m);        \
        *out = (type *)m;                                                                          \
        return err;                                                                                \
    }                                                                                              \
    void pw_proto_free_##suffix(type *m)                                                           \
    {                                                                                              \
        if (m != NULL)                                                                             \
            protobuf_c_message_free_unpacked(&m->base, NULL);                                      \
    }                                                                                              \
    enum pw_err pw_proto_pack_##suffix(const type *m, void *buf, size_t cap, size_t *len_out,      \
                                       const char **why)                                           \
    {                                                                                              \
        return pack_checked(m ? &m->base : NULL, adapt, buf, cap, len_out, why);                   \
    }                                                                                              \
    enum pw_err pw_proto_pack_##suffix##_alloc(const type *m, uint8_t **out, size_t *len_out,      \
                                               const char **why)                                   \
    {                                                                                              \
        return pack_alloc_checked(m ? &m->base : NULL, adapt, out, len_out, why);                  \
    }

DEFINE_CODEC(request, Parkway__InferenceRequest, parkway__inference_request__descriptor,
             adapt_request, PW_PROTO_REQUEST_MAX_BYTES)
DEFINE_CODEC(reply, Parkway__ReplyChunk, parkway__reply_chunk__descriptor, adapt_reply,
             PW_PROTO_REPLY_MAX_BYTES)
DEFINE_CODEC(worker, Parkway__WorkerStatus, parkway__worker_status__descriptor, adapt_worker,
             PW_PROTO_WORKER_MAX_BYTES)
DEFINE_CODEC(key, Parkway__KeyRecord, parkway__key_record__descriptor, adapt_key,
             PW_PROTO_KEY_MAX_BYTES)

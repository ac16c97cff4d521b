/*
 * router_openai: the OpenAI API translation layer of the router, as pure functions.
 *
 *   request body (JSON) --router_openai_parse_*-->  InferenceRequest protobuf(s)
 *   ReplyChunk stream   --router_openai_acc_*-->    one chat.completion / text_completion
 *   ReplyChunk stream   --router_openai_stream_*--> SSE events (chunk objects, [DONE])
 *   errors              --router_openai_err_*-->    {"error": {message, type, param, code}}
 *   function list       --router_openai_models_*--> {"object": "list", "data": [...]}
 *
 * No sockets, no Redis, no globals: the HTTP layer calls these and moves the bytes. Every
 * decision (which request fields are supported, ignored or refused; error wording; how a
 * retried attempt is deduplicated) is documented in docs/internals/openai.md.
 *
 * Thread-safety: everything is reentrant; an acc or stream object belongs to one request
 * and is used by one thread (the event loop that owns the connection).
 */
#ifndef ROUTER_OPENAI_H
#define ROUTER_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_proto.h"
#include "router_sse.h"

/* ---- limits ------------------------------------------------------------------------- */

#define ROUTER_OPENAI_MODEL_MAX 256                    /* bytes of `model` (= function name) */
#define ROUTER_OPENAI_REQUEST_ID_MAX 200               /* bytes of ctx.request_id (room for ".k") */
#define ROUTER_OPENAI_PROMPTS_MAX 32                   /* prompts in one /v1/completions list */
#define ROUTER_OPENAI_JSON_DEPTH_MAX 64                /* nesting of the request body */
#define ROUTER_OPENAI_PARAM_MAX 96                     /* bytes of error.param */
#define ROUTER_OPENAI_MESSAGE_MAX 512                  /* bytes of error.message */
#define ROUTER_OPENAI_CODE_MAX 64                      /* bytes of error.code */
#define ROUTER_OPENAI_COMPLETION_DEFAULT_MAX_TOKENS 16 /* OpenAI's legacy default */

enum router_openai_kind {
    ROUTER_OPENAI_CHAT = 1,       /* /v1/chat/completions */
    ROUTER_OPENAI_COMPLETION = 2, /* /v1/completions */
};

/* ---- errors ------------------------------------------------------------------------- */

/* One OpenAI error object plus the HTTP status it goes out with. */
struct router_openai_error {
    int status;                          /* HTTP status, e.g. 400 */
    const char *type;                    /* static: "invalid_request_error", ... */
    char param[ROUTER_OPENAI_PARAM_MAX]; /* "" renders as null */
    char code[ROUTER_OPENAI_CODE_MAX];   /* "" renders as null */
    char message[ROUTER_OPENAI_MESSAGE_MAX];
    int retry_after_s; /* > 0: send `Retry-After` (429, 503) */
};

/*
 * Renders {"error": {"message", "type", "param", "code"}}. On PW_OK *out is a malloc'd
 * NUL-terminated string (free()), *len_out (may be NULL) its length.
 */
enum pw_err router_openai_error_json(const struct router_openai_error *err, char **out,
                                     size_t *len_out);

/* Constructors for every error the router sends; each fills *err completely. */
void router_openai_err_invalid_json(struct router_openai_error *err, const char *detail);
/* 400 naming a parameter; code may be NULL; message is printf-formatted. */
__attribute__((format(printf, 4, 5))) void router_openai_err_param(struct router_openai_error *err,
                                                                   const char *param,
                                                                   const char *code,
                                                                   const char *fmt, ...);
void router_openai_err_missing_key(struct router_openai_error *err);
void router_openai_err_bad_key(struct router_openai_error *err);
void router_openai_err_model_denied(struct router_openai_error *err, const char *model);
void router_openai_err_model_not_found(struct router_openai_error *err, const char *model);
void router_openai_err_unknown_route(struct router_openai_error *err, const char *method,
                                     const char *path);
void router_openai_err_method(struct router_openai_error *err, const char *method,
                              const char *path);
void router_openai_err_header_timeout(struct router_openai_error *err);
void router_openai_err_too_large(struct router_openai_error *err, size_t limit_bytes);
/* kind: "requests" or "tokens" (the OpenAI error type); limit per minute. */
void router_openai_err_rate_limited(struct router_openai_error *err, const char *kind,
                                    const char *model, uint32_t limit, int retry_after_s);
void router_openai_err_internal(struct router_openai_error *err);
/* why: a short reason for the client, e.g. "the queue is full" (NULL = generic). */
void router_openai_err_unavailable(struct router_openai_error *err, const char *why,
                                   int retry_after_s);
void router_openai_err_deadline(struct router_openai_error *err);
/* An engine's ReplyChunk.error (NULL = unknown failure) with the chunk's finish reason. */
void router_openai_err_from_reply(struct router_openai_error *err, const Parkway__Error *e,
                                  Parkway__FinishReason reason);

/* ---- request parsing ---------------------------------------------------------------- */

enum router_openai_access {
    ROUTER_OPENAI_MODEL_OK = 0,
    ROUTER_OPENAI_MODEL_NOT_FOUND = 1, /* -> 404 model_not_found */
    ROUTER_OPENAI_MODEL_DENIED = 2,    /* -> 403 */
};

/* Does function `model` exist, and may this key use it? */
typedef enum router_openai_access (*router_openai_model_check_fn)(void *arg, const char *model);

/* What the router knows about a request besides its body. All pointers borrowed. */
struct router_openai_ctx {
    const char *request_id;      /* 1..ROUTER_OPENAI_REQUEST_ID_MAX bytes, no '.' */
    const char *tenant;          /* from the KeyRecord; NULL = "" */
    const char *key_id;          /* public key id, for logs; NULL = "" */
    const char *reply_to;        /* this router's reply stream, "pw:reply:{router}" */
    int64_t now_unix_ms;         /* enqueue time and deadline base */
    int64_t deadline_ms;         /* the client's own deadline (header), ms from now; 0 = default */
    int64_t default_deadline_ms; /* used when deadline_ms is 0; 0 = no deadline */
    int64_t max_deadline_ms;     /* caps either; 0 = no cap */
    uint64_t seed;               /* sampling seed when the client gives none */
    router_openai_model_check_fn model_check; /* NULL = every model allowed */
    void *model_check_arg;
};

/*
 * Parses a /v1/chat/completions body (len bytes, borrowed for the call) into one
 * InferenceRequest. On PW_OK *out is a new message, freed with pw_proto_free_request().
 * On any other return *out is NULL and *err says what to answer: PW_ERR_PARSE for a client
 * error (400, or 403/404 from the model check), PW_ERR_NOMEM (500), PW_ERR_INVAL for a bad
 * ctx (500, a router bug).
 */
enum pw_err router_openai_parse_chat(const char *body, size_t len,
                                     const struct router_openai_ctx *ctx,
                                     Parkway__InferenceRequest **out,
                                     struct router_openai_error *err);

/*
 * Parses a /v1/completions body. A prompt list is fanned out: *n_out requests (1 ..
 * ROUTER_OPENAI_PROMPTS_MAX), request k having id "<request_id>.<k>" (just "<request_id>"
 * when there is one prompt); the response merges them, choice index = k * n + i. On PW_OK
 * *out is a malloc'd array freed with router_openai_requests_free(). Errors as above.
 */
enum pw_err router_openai_parse_completion(const char *body, size_t len,
                                           const struct router_openai_ctx *ctx,
                                           Parkway__InferenceRequest ***out, size_t *n_out,
                                           struct router_openai_error *err);

/* Frees an array from router_openai_parse_completion (NULL is a no-op). */
void router_openai_requests_free(Parkway__InferenceRequest **reqs, size_t n);

/* ---- responses ---------------------------------------------------------------------- */

/* What a response needs to know about its request. Strings are copied at create. */
struct router_openai_resp {
    enum router_openai_kind kind;
    const char *request_id;         /* ctx.request_id (the base id, without ".k") */
    const char *model;              /* as the client named it */
    int64_t created;                /* unix seconds */
    uint32_t n;                     /* choices per request, 1..PW_PROTO_N_MAX */
    uint32_t n_parts;               /* requests fanned out, 1..ROUTER_OPENAI_PROMPTS_MAX */
    bool logprobs;                  /* the client asked for logprobs */
    bool include_usage;             /* stream_options.include_usage (streams only) */
    const char *system_fingerprint; /* NULL renders as null */
};

/* Fills r from the first parsed request (kind, id, model, n, logprobs, include_usage). */
void router_openai_resp_from_request(struct router_openai_resp *r,
                                     const Parkway__InferenceRequest *req, const char *request_id,
                                     size_t n_parts, int64_t created);

/*
 * Non-streaming accumulator. Feed it every ReplyChunk of the request (any order of
 * arrival within an attempt is by seq; duplicates and stale attempts are dropped); when
 * *finished turns true, render the answer. NULL from create = out of memory.
 */
struct router_openai_acc;
struct router_openai_acc *router_openai_acc_create(const struct router_openai_resp *r);
void router_openai_acc_destroy(struct router_openai_acc *acc);

/*
 * Takes one chunk (borrowed for the call). PW_OK whether it was used or dropped as a
 * duplicate; *finished (may be NULL) is true once every request of the response is done
 * or failed. PW_ERR_INVAL: the chunk is not for this response (wrong id, index >= n);
 * PW_ERR_NOMEM.
 */
enum pw_err router_openai_acc_add(struct router_openai_acc *acc, const Parkway__ReplyChunk *c,
                                  bool *finished);

/*
 * Renders the response body: the chat.completion / text_completion object with *status
 * 200, or the error object with its status when the engine reported a failure. *body is
 * malloc'd (free()), *len its length. PW_ERR_INVAL if not finished yet.
 */
enum pw_err router_openai_acc_render(struct router_openai_acc *acc, char **body, size_t *len,
                                     int *status);
/* Process-wide: true (the default) writes answers and stream events without logprobs
 * directly; false always builds jansson trees (the reference, for tests). Not thread-safe:
 * set it before serving. */
void router_openai_set_direct(bool on);
/* The same answer rendered through jansson trees (what acc_render does with logprobs): the
 * reference the unit tests hold the direct writer to. PW_ERR_INVAL unless finished and not
 * failed. *body malloc'd. */
enum pw_err router_openai_acc_render_reference(struct router_openai_acc *acc, char **body,
                                               size_t *len);

/* Chunks dropped so far as duplicates or stale attempts (for metrics and tests). */
uint64_t router_openai_acc_dropped(const struct router_openai_acc *acc);

/*
 * Streaming renderer: each ReplyChunk becomes zero or more SSE events appended to out;
 * after the last one, the usage chunk (when asked for) and `data: [DONE]`. A retried
 * attempt repeats the same tokens; only text past what was already sent goes out.
 */
struct router_openai_stream;
struct router_openai_stream *router_openai_stream_create(const struct router_openai_resp *r);
void router_openai_stream_destroy(struct router_openai_stream *s);

/*
 * Appends the events for chunk c to out. *finished (may be NULL) becomes true when the
 * stream has ended ([DONE] or an error event written); the caller then ends the response.
 * Errors as router_openai_acc_add.
 */
enum pw_err router_openai_stream_feed(struct router_openai_stream *s, const Parkway__ReplyChunk *c,
                                      struct router_sse_buf *out, bool *finished);

/*
 * Ends the stream with an error event (deadline passed, Redis lost, ...): appends
 * `data: {"error": {...}}` and nothing after it. No-op once the stream has ended.
 */
enum pw_err router_openai_stream_fail(struct router_openai_stream *s,
                                      const struct router_openai_error *err,
                                      struct router_sse_buf *out);

bool router_openai_stream_finished(const struct router_openai_stream *s);
uint64_t router_openai_stream_dropped(const struct router_openai_stream *s);

/* ---- models ------------------------------------------------------------------------- */

struct router_openai_model {
    const char *id;       /* function name */
    int64_t created;      /* unix seconds */
    const char *owned_by; /* e.g. the tenant or "parkway" */
};

/* {"object":"list","data":[model...]}; *out malloc'd (free()), *len_out may be NULL. */
enum pw_err router_openai_models_json(const struct router_openai_model *models, size_t n,
                                      char **out, size_t *len_out);

/* One {"id","object":"model","created","owned_by"}. */
enum pw_err router_openai_model_json(const struct router_openai_model *model, char **out,
                                     size_t *len_out);

#endif

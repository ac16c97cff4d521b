/*
 * router_batch: the OpenAI Batches API (/v1/batches*) and the batch coordinator.
 *
 *   POST /v1/batches              {input_file_id, endpoint, completion_window, metadata}
 *   GET  /v1/batches              the tenant's batches, newest first (after, limit)
 *   GET  /v1/batches/{id}         one batch object, request_counts live
 *   POST /v1/batches/{id}/cancel  validating/in_progress -> cancelling
 *
 * The coordinator is one thread per router with its own blocking Redis connection. Every
 * router runs one; a lock key per batch (pw:batch:{id}:lock, SET NX PX, renewed each tick)
 * lets exactly one of them drive a batch at a time. For each batch it holds it: validates
 * the input file (status validating -> in_progress or failed), enqueues lines on the
 * function's batch lane pw:{fn}:b (a window at a time, next_line advanced atomically with
 * the XADDs), reads the replies from pw:breply:{id}, records each line's result once with
 * HSETNX into pw:batch:{id}:results (keyed by custom_id, counts bumped in the same script),
 * and when every line is done writes the output and error files in input order.
 * docs/internals/batch.md has the state machine and the durability argument.
 */
#ifndef ROUTER_BATCH_H
#define ROUTER_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_keyspace.h"
#include "router.h"
#include "router_openai.h"

/* ---- limits and tuning -------------------------------------------------------------- */

#define ROUTER_BATCH_MAX_LINES 50000     /* requests per batch (OpenAI's limit) */
#define ROUTER_BATCH_MAX_ERRORS 1000     /* per-line errors reported in `errors` */
#define ROUTER_BATCH_CUSTOM_ID_MAX 512   /* bytes of a custom_id */
#define ROUTER_BATCH_WINDOW 256          /* lines enqueued and not finished, per batch */
#define ROUTER_BATCH_LOCK_MS 30000       /* coordinator lock lifetime, renewed each tick */
#define ROUTER_BATCH_TICK_MS 200         /* coordinator period */
#define ROUTER_BATCH_CANCEL_GRACE_S 60   /* cancelling waits this long for running lines */
#define ROUTER_BATCH_WINDOW_MAX_S 604800 /* longest completion_window accepted (7 days) */
/* Bytes of one input line: an interactive request body's default limit. */
#define ROUTER_BATCH_LINE_MAX (8u * 1024u * 1024u)
#define ROUTER_BATCH_READ_CHUNK 65536u /* bytes read from storage at a time when validating */

/* ---- routing ------------------------------------------------------------------------- */

/* True for /v1/files, /v1/files/..., /v1/batches and /v1/batches/... */
bool router_batch_api_route(const struct router_http_request *req);

/* Handles a Files or Batches API request after authentication (key valid, not disabled);
 * makes the terminal call. key is borrowed for the call. */
void router_batch_api_handle(struct router_worker *w, struct router_http_request *req,
                             const struct router_key *key);

/* ---- input validation (pure) --------------------------------------------------------- */

/* One request line of a batch input file. */
struct router_batch_line {
    size_t off, len; /* the line's bytes in the input (byte offset from its start) */
    uint32_t lineno; /* 1-based line number in the file */
    char *custom_id; /* owned, NUL-terminated */
    char *function;  /* owned: the body's model */
};

struct router_batch_input {
    struct router_batch_line *lines; /* owned, n of them, in file order */
    size_t n;
    size_t n_errors;
    char *errors_json; /* owned: {"object":"list","data":[{code,message,param,line}...]} or NULL */
};

/*
 * Checks every line of an input file (blank lines are skipped): a JSON object; custom_id a
 * unique non-empty string; method "POST"; url equal to endpoint; body an object valid for
 * that endpoint (router_openai_parse_*, with check as the model check; stream refused).
 * On PW_OK *out holds the lines when n_errors == 0, else errors_json lists the problems
 * (at most ROUTER_BATCH_MAX_ERRORS) with 1-based line numbers. PW_ERR_NOMEM otherwise.
 * Free with router_batch_input_deinit().
 */
enum pw_err router_batch_input_parse(const char *data, size_t len, const char *endpoint,
                                     router_openai_model_check_fn check, void *check_arg,
                                     struct router_batch_input *out);

/* Reads up to cap bytes of an input into buf; *n_out == 0 at its end. */
typedef enum pw_err (*router_batch_read_fn)(void *ud, void *buf, size_t cap, size_t *n_out);

/*
 * router_batch_input_parse over a stream (e.g. a pw_storage reader): the input is read in
 * ROUTER_BATCH_READ_CHUNK pieces into one line buffer that grows only to the longest line,
 * never past ROUTER_BATCH_LINE_MAX (a longer line is a per-line error, line_too_long), so
 * memory is bounded by the longest line plus the per-line records (custom_id, model), not by
 * the file. Each line keeps its byte offset and length, so a caller reads one line back
 * later (pw_storage_read_at). An error of rd is returned as is (out is then empty).
 */
enum pw_err router_batch_input_parse_stream(router_batch_read_fn rd, void *rd_ud,
                                            const char *endpoint,
                                            router_openai_model_check_fn check, void *check_arg,
                                            struct router_batch_input *out);
void router_batch_input_deinit(struct router_batch_input *in);

/*
 * Builds the InferenceRequest(s) of one validated line (its bytes): the body parsed for
 * endpoint with ctx (request id, reply stream, deadline, seed). Same returns as
 * router_openai_parse_completion; *out freed with router_openai_requests_free().
 */
enum pw_err router_batch_line_requests(const char *line, size_t len, const char *endpoint,
                                       const struct router_openai_ctx *ctx,
                                       Parkway__InferenceRequest ***out, size_t *n_out,
                                       struct router_openai_error *err);

/* ---- JSON (pure) ----------------------------------------------------------------------- */

/* The OpenAI batch object from a pw:batch:{id} hash; *out malloc'd (free()). */
enum pw_err router_batch_json(const struct pw_stream_entry *h, char **out, size_t *len);

/*
 * One output/error file line: {"id","custom_id","response":{"status_code","request_id",
 * "body"},"error":null}. body is the JSON response body (len bytes). *out malloc'd.
 */
enum pw_err router_batch_result_line(const char *line_id, const char *custom_id, int status,
                                     const char *body, size_t body_len, char **out);

/* Parses "<batch id>-L<index>[.<part>]" into index; false when the id is not of batch_id. */
bool router_batch_parse_line_id(const char *request_id, const char *batch_id, size_t *index);

/* Parses a completion window ("24h", extension: "<N>s", "<N>m", "<N>h" up to 7 days). */
bool router_batch_parse_window(const char *s, int64_t *seconds);

/* ---- coordinator ----------------------------------------------------------------------- */

struct router_batch_coord;

/* Starts the coordinator thread of rt (rt->storage and cfg.redis_url must be set). */
enum pw_err router_batch_coord_start(struct router *rt, struct router_batch_coord **out, char *err,
                                     size_t errcap);

/* Stops and joins the thread, frees everything. NULL is a no-op. */
void router_batch_coord_stop(struct router_batch_coord *c);

#endif

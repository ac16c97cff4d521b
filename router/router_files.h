/*
 * router_files: the OpenAI Files API (/v1/files*) and what the Files and Batches handlers
 * share: the per-call state of an API operation, tenant key names, JSON responses.
 *
 *   POST   /v1/files               multipart/form-data: purpose, file -> storage + pw:file:{id}
 *   GET    /v1/files               the tenant's files, newest first (after, limit, purpose)
 *   GET    /v1/files/{id}          one file object
 *   GET    /v1/files/{id}/content  the bytes
 *   DELETE /v1/files/{id}          removes metadata and bytes
 *
 * Files belong to the tenant of the key that uploaded them; any other tenant gets 404.
 * Metadata is a Redis hash pw:file:{id} (id, object, bytes, created_at, filename, purpose,
 * tenant); pw:files:{tenant} is a sorted set (score: creation time in ms) for listing.
 * Bytes go to the router's pw_storage. Runs on the request's worker thread; storage calls
 * block briefly (local disk). docs/internals/batch.md has the design.
 *
 * Uploads: the HTTP layer spools a POST /v1/files body to an unlinked disk file as it
 * arrives (router_files_spool_limit is the router_http_spool predicate), so no upload is ever
 * held in memory; the multipart body is then scanned by offsets (router_multipart_scan) and
 * the file part copied into storage in ROUTER_FILES_COPY_CHUNK pieces.
 */
#ifndef ROUTER_FILES_H
#define ROUTER_FILES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "pw_keyspace.h"
#include "router.h"

/* ---- limits ---------------------------------------------------------------------------- */

#define ROUTER_FILES_DEFAULT_MAX_BYTES (200u * 1024u * 1024u) /* OpenAI's batch file limit */
#define ROUTER_FILES_LIST_MAX 10000                           /* objects per list page */
#define ROUTER_FILES_FILENAME_MAX 255                         /* bytes of a file name */
#define ROUTER_FILES_MULTIPART_PARTS 16                       /* parts accepted in an upload */
/* Body bytes allowed beyond max_file_bytes in an upload: the other parts and the framing. */
#define ROUTER_FILES_MULTIPART_SLACK (1u << 20)
#define ROUTER_FILES_COPY_CHUNK (256u * 1024u) /* bytes per read/write when storing a part */

/* ---- keys ------------------------------------------------------------------------------ */

#define ROUTER_KEY_BATCHES_ACTIVE "pw:batches:active" /* set: ids the coordinator drives */

/*
 * The tenant as a key part: the tenant itself when it is a safe name, else "h" + the hex
 * SHA-256 of it (so any tenant string maps to exactly one safe key part). cap >= 72.
 */
void router_files_tenant_tag(const char *tenant, char *buf, size_t cap);

/* pw:files:{tag} / pw:batches:{tag}: a tenant's sorted sets of ids. */
enum pw_err router_key_tenant_files(char *buf, size_t cap, const char *tenant);
enum pw_err router_key_tenant_batches(char *buf, size_t cap, const char *tenant);

/* ---- one API operation (shared by files and batches) ---------------------------------- */

/*
 * One Files/Batches API call on its worker thread. References: one for the HTTP side until
 * the terminal HTTP call, one per Redis command in flight; freed at zero. req is NULL once
 * answered or once the client has gone (every later answer is skipped).
 */
struct router_api_op {
    struct router_worker *w;
    struct router_http_request *req; /* NULL after the terminal call */
    int refs;
    char tenant[128];
    char key_id[PW_APIKEY_ID_LEN + 8];
    char **allowed; /* owned copy of the key's functions; n_allowed 0 = all */
    size_t n_allowed;
    char id[PW_KEY_NAME_MAX + 1]; /* file or batch id named in the path */
    char *scratch;                /* owned: per-operation data (e.g. the new batch's fields) */
    size_t scratch_len;
    int step;
};

/* Makes an op for req on w with a copy of key; sets the request's cancel callback. Two
 * references: the HTTP side's (dropped by the terminal answer or when the client leaves)
 * and the caller's (drop it with router_api_op_unref when done). NULL on out of memory
 * (then req has been answered with a 500). */
struct router_api_op *router_api_op_create(struct router_worker *w, struct router_http_request *req,
                                           const struct router_key *key);
void router_api_op_unref(struct router_api_op *op);

/* Terminal answers; no-ops once req is NULL. json is copied. */
void router_api_respond_json(struct router_api_op *op, int status, const char *json, size_t len);
/* {"error":{...}}: type NULL = by status; code and param may be NULL. */
void router_api_respond_error(struct router_api_op *op, int status, const char *code,
                              const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Sends a Redis command for op (one reference held until cb runs). On failure answers 503
 * and returns false. */
bool router_api_command(struct router_api_op *op, pw_redis_reply_cb cb, int argc, const char **argv,
                        const size_t *lens);

/* The value of field name in a parsed hash (pw_hash_parse_all), or NULL. */
const char *router_api_field(const struct pw_stream_entry *h, const char *name);

/* Value of query parameter name (not decoded) copied into buf; false when absent. */
bool router_api_query(const struct router_http_request *req, const char *name, char *buf,
                      size_t cap);

/* Lua script listing a tenant's objects newest first: KEYS[1] the tenant's sorted set;
 * ARGV: after id ("" = from the newest), limit + 1, metadata key prefix ("pw:file:{").
 * Returns an array of flat HGETALL arrays. */
extern const char router_api_list_script[];

/* Runs the list script for op with ?after= and ?limit= (default_limit when absent; over
 * max_limit is a 400); cb gets the script's reply; op->step holds the limit. */
void router_api_list(struct router_api_op *op, const char *zkey, const char *prefix,
                     size_t default_limit, size_t max_limit, pw_redis_reply_cb cb);

/* ---- multipart/form-data --------------------------------------------------------------- */

/* A part of a multipart body; slices borrow the body. */
struct router_multipart_part {
    const char *name; /* form field name; not NUL-terminated */
    size_t name_len;
    const char *filename; /* NULL when the part has none */
    size_t filename_len;
    const char *data;
    size_t len;
};

/*
 * Splits body (len bytes) by the boundary named in content_type ("multipart/form-data;
 * boundary=..."). Writes up to cap parts. PW_ERR_PARSE for a malformed body or header,
 * PW_ERR_TOOBIG for more than cap parts.
 */
enum pw_err router_multipart_parse(const char *content_type, const char *body, size_t len,
                                   struct router_multipart_part *parts, size_t cap, size_t *n_out);

/* Where a body lives: in memory (fd < 0: mem, len bytes) or in a file read with pread(2)
 * (fd >= 0: bytes 0..len). Both borrowed. */
struct router_body_src {
    const char *mem;
    int fd;
    uint64_t len;
};

/* A part of a multipart body as offsets into the body (works for spooled bodies). */
struct router_multipart_span {
    uint64_t name_off, name_len;         /* form field name */
    bool has_filename;                   /* a filename parameter was given */
    uint64_t filename_off, filename_len; /* when has_filename */
    uint64_t off, len;                   /* the part's data */
};

/*
 * router_multipart_parse for a body in memory or in a file: reads a file body through one
 * 64 KiB window (part headers must fit in 8 KiB), so memory stays bounded whatever the
 * body's size. Same returns, plus PW_ERR_IO (read error) and PW_ERR_NOMEM.
 */
enum pw_err router_multipart_scan(const char *content_type, const struct router_body_src *src,
                                  struct router_multipart_span *parts, size_t cap, size_t *n_out);

/*
 * The router_http_spool predicate of the router (ud: struct router *): POST /v1/files with a
 * multipart/form-data body and an Authorization header is spooled to disk with a limit of
 * max_file_bytes + ROUTER_FILES_MULTIPART_SLACK; anything else returns 0 (memory, and the
 * usual max_body_bytes, so an unauthenticated client cannot make the router write 200 MB).
 */
uint64_t router_files_spool_limit(const struct router_http_request *req, void *ud);

/* ---- JSON ------------------------------------------------------------------------------- */

/* The OpenAI file object from a pw:file:{id} hash; *out malloc'd (free()). */
enum pw_err router_files_json(const struct pw_stream_entry *h, char **out, size_t *len);

/* ---- handler ---------------------------------------------------------------------------- */

/* Handles any /v1/files* request after authentication; makes the terminal call. */
void router_files_handle(struct router_worker *w, struct router_http_request *req,
                         const struct router_key *key);

#endif

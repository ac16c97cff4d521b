/*
 * router_files: the Files API and the shared API-operation plumbing (router_files.h).
 *
 * Every handler runs on the request's worker thread: it checks the request, issues one
 * or two Redis commands on the worker's async client (Lua scripts keep each step one
 * round trip and atomic), and answers from the reply callback. An op outlives its request
 * when the client leaves early: the callbacks see op->req == NULL and only drop their
 * reference.
 */
#include "router_files.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <jansson.h>

#include "pw_apikey.h"
#include "pw_clock.h"
#include "pw_log.h"
#include "pw_storage.h"

/* ---- keys ------------------------------------------------------------------------------ */

void router_files_tenant_tag(const char *tenant, char *buf, size_t cap)
{
    if (!tenant)
        tenant = "";
    if (pw_key_name_ok(tenant) && strlen(tenant) < cap && tenant[0] != 'h') {
        snprintf(buf, cap, "%s", tenant);
        return;
    }
    /* "h" + hex: tenants starting with 'h' are hashed too, so no tenant can name another's
     * hashed tag. */
    uint8_t hash[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_LEN * 2 + 1];
    pw_apikey_hash(tenant, strlen(tenant), hash);
    pw_hex_encode(hash, sizeof hash, hex);
    snprintf(buf, cap, "h%s", hex);
}

static enum pw_err tenant_key(char *buf, size_t cap, const char *prefix, const char *tenant)
{
    char tag[80];
    router_files_tenant_tag(tenant, tag, sizeof tag);
    int n = snprintf(buf, cap, "%s{%s}", prefix, tag);
    return n < 0 || (size_t)n >= cap ? PW_ERR_TOOBIG : PW_OK;
}

enum pw_err router_key_tenant_files(char *buf, size_t cap, const char *tenant)
{
    return tenant_key(buf, cap, "pw:files:", tenant);
}

enum pw_err router_key_tenant_batches(char *buf, size_t cap, const char *tenant)
{
    return tenant_key(buf, cap, "pw:batches:", tenant);
}

/* ---- ops ------------------------------------------------------------------------------- */

static void op_client_gone(struct router_http_request *req, void *ud)
{
    struct router_api_op *op = ud;
    if (!op->req)
        return;
    router_http_request_release(op->req);
    op->req = NULL;
    router_api_op_unref(op);
}

struct router_api_op *router_api_op_create(struct router_worker *w, struct router_http_request *req,
                                           const struct router_key *key)
{
    struct router_api_op *op = calloc(1, sizeof *op);
    if (!op)
        goto oom;
    op->w = w;
    op->req = req;
    op->refs = 2; /* the HTTP side and the caller's */
    snprintf(op->tenant, sizeof op->tenant, "%s", key->tenant);
    snprintf(op->key_id, sizeof op->key_id, "%s", key->key_id);
    if (key->n_allowed) {
        op->allowed = calloc(key->n_allowed, sizeof *op->allowed);
        if (!op->allowed)
            goto oom;
        for (size_t i = 0; i < key->n_allowed; i++) {
            if (!(op->allowed[i] = strdup(key->allowed[i])))
                goto oom;
            op->n_allowed++;
        }
    }
    router_http_request_set_cancel(req, op_client_gone, op);
    return op;
oom:
    if (op) {
        for (size_t i = 0; i < op->n_allowed; i++)
            free(op->allowed[i]);
        free(op->allowed);
        free(op);
    }
    router_http_respond_error(req, 500, "server_error", NULL, "out of memory");
    return NULL;
}

void router_api_op_unref(struct router_api_op *op)
{
    if (!op || --op->refs > 0)
        return;
    for (size_t i = 0; i < op->n_allowed; i++)
        free(op->allowed[i]);
    free(op->allowed);
    free(op->scratch);
    free(op);
}

/* The HTTP side is done with op. */
static void op_end(struct router_api_op *op)
{
    op->req = NULL;
    router_api_op_unref(op);
}

void router_api_respond_json(struct router_api_op *op, int status, const char *json, size_t len)
{
    if (!op->req)
        return;
    struct router_http_field hdr[] = {{"content-type", "application/json"}};
    router_http_request_set_cancel(op->req, NULL, NULL);
    router_http_respond(op->req, status, hdr, 1, json, len);
    op_end(op);
}

void router_api_respond_error(struct router_api_op *op, int status, const char *code,
                              const char *param, const char *fmt, ...)
{
    if (!op->req)
        return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = json_pack("{s:{s:s,s:s,s:s?,s:s?}}", "error", "message", msg, "type",
                          status >= 500 ? "server_error" : "invalid_request_error", "param", param,
                          "code", code);
    char *body = e ? json_dumps(e, JSON_COMPACT) : NULL;
    json_decref(e);
    if (!body) {
        router_http_request_set_cancel(op->req, NULL, NULL);
        router_http_respond_error(op->req, 500, "server_error", NULL, "out of memory");
        op_end(op);
        return;
    }
    router_api_respond_json(op, status, body, strlen(body));
    free(body);
}

bool router_api_command(struct router_api_op *op, pw_redis_reply_cb cb, int argc, const char **argv,
                        const size_t *lens)
{
    op->refs++;
    if (pw_redis_command_argv(op->w->redis, argc, argv, lens, cb, op) != PW_OK) {
        op->refs--;
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        return false;
    }
    return true;
}

const char *router_api_field(const struct pw_stream_entry *h, const char *name)
{
    const struct pw_slice *v = h ? pw_stream_entry_get(h, name) : NULL;
    return v ? v->ptr : NULL;
}

bool router_api_query(const struct router_http_request *req, const char *name, char *buf,
                      size_t cap)
{
    size_t nl = strlen(name);
    const char *p = req->query, *end = req->query + req->query_len;
    while (p < end) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if ((size_t)(stop - p) > nl && memcmp(p, name, nl) == 0 && p[nl] == '=') {
            size_t vl = (size_t)(stop - p) - nl - 1;
            if (vl >= cap)
                vl = cap - 1;
            memcpy(buf, p + nl + 1, vl);
            buf[vl] = '\0';
            return true;
        }
        p = stop + 1;
    }
    return false;
}

const char router_api_list_script[] =
    "local start = 0\n"
    "if ARGV[1] ~= '' then\n"
    "  local r = redis.call('zrevrank', KEYS[1], ARGV[1])\n"
    "  if not r then return {} end\n"
    "  start = r + 1\n"
    "end\n"
    "local ids = redis.call('zrevrange', KEYS[1], start, start + tonumber(ARGV[2]) - 1)\n"
    "local out = {}\n"
    "for _, id in ipairs(ids) do\n"
    "  out[#out + 1] = redis.call('hgetall', ARGV[3] .. id .. '}')\n"
    "end\n"
    "return out\n";

/* ---- multipart -------------------------------------------------------------------------- */

/* Value of parameter name in a header value like `form-data; name="x"; filename="y"`. */
static bool header_param(const char *v, size_t vl, const char *name, const char **out,
                         size_t *out_len)
{
    size_t nl = strlen(name);
    const char *p = v, *end = v + vl;
    while (p < end) {
        const char *semi = memchr(p, ';', (size_t)(end - p));
        if (!semi)
            return false;
        p = semi + 1;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if ((size_t)(end - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == '=') {
            p += nl + 1;
            if (p < end && *p == '"') {
                const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
                if (!q)
                    return false;
                *out = p + 1;
                *out_len = (size_t)(q - p - 1);
            } else {
                const char *q = p;
                while (q < end && *q != ';' && *q != ' ')
                    q++;
                *out = p;
                *out_len = (size_t)(q - p);
            }
            return true;
        }
    }
    return false;
}

#define SCAN_WIN 65536u     /* bytes of a file body looked at at once */
#define PART_HEAD_MAX 8192u /* a part's delimiter line and headers must fit in this */

/* Reads up to n bytes at off of a body; *got fewer only at its end. */
static enum pw_err src_read(const struct router_body_src *src, uint64_t off, char *buf, size_t n,
                            size_t *got)
{
    *got = 0;
    if (off >= src->len)
        return PW_OK;
    if (n > src->len - off)
        n = (size_t)(src->len - off);
    if (src->fd < 0) {
        memcpy(buf, src->mem + off, n);
        *got = n;
        return PW_OK;
    }
    size_t have = 0;
    while (have < n) {
        ssize_t r = pread(src->fd, buf + have, n - have, (off_t)(off + have));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return PW_ERR_IO;
        if (r == 0)
            break;
        have += (size_t)r;
    }
    *got = have;
    return PW_OK;
}

struct scan {
    const struct router_body_src *src;
    char *buf; /* SCAN_WIN bytes for a file body; NULL for memory */
};

/* Bytes [off, off + n) of the body (n <= SCAN_WIN), clipped at its end: a pointer into the
 * body in memory, or into sc->buf (valid until the next call). NULL on a read error. */
static const char *scan_view(struct scan *sc, uint64_t off, size_t n, size_t *got)
{
    const struct router_body_src *src = sc->src;
    *got = 0;
    if (off >= src->len)
        return "";
    if (src->fd < 0) {
        *got = n < src->len - off ? n : (size_t)(src->len - off);
        return src->mem + off;
    }
    return src_read(src, off, sc->buf, n, got) == PW_OK ? sc->buf : NULL;
}

/* First needle at or after from. 1 found (*at), 0 absent, -1 read error. nl < SCAN_WIN / 2. */
static int scan_find(struct scan *sc, uint64_t from, const char *needle, size_t nl, uint64_t *at)
{
    const struct router_body_src *src = sc->src;
    if (src->fd < 0) {
        if (from >= src->len)
            return 0;
        const char *f = memmem(src->mem + from, (size_t)(src->len - from), needle, nl);
        if (!f)
            return 0;
        *at = (uint64_t)(f - src->mem);
        return 1;
    }
    while (from < src->len) {
        size_t got;
        const char *v = scan_view(sc, from, SCAN_WIN, &got);
        if (!v)
            return -1;
        const char *f = memmem(v, got, needle, nl);
        if (f) {
            *at = from + (uint64_t)(f - v);
            return 1;
        }
        if (from + got >= src->len || got < nl)
            return 0;
        from += got - (nl - 1); /* a needle cut by the window's end is found next time */
    }
    return 0;
}

enum pw_err router_multipart_scan(const char *content_type, const struct router_body_src *src,
                                  struct router_multipart_span *parts, size_t cap, size_t *n_out)
{
    *n_out = 0;
    if (!content_type || strncasecmp(content_type, "multipart/form-data", 19) != 0)
        return PW_ERR_PARSE;
    const char *b;
    size_t bl;
    if (!header_param(content_type, strlen(content_type), "boundary", &b, &bl) || bl == 0 ||
        bl > 70)
        return PW_ERR_PARSE;
    char delim[80];
    delim[0] = '\r';
    delim[1] = '\n';
    delim[2] = delim[3] = '-';
    memcpy(delim + 4, b, bl);
    size_t dl = bl + 4;
    struct scan sc = {src, NULL};
    if (src->fd >= 0 && !(sc.buf = malloc(SCAN_WIN)))
        return PW_ERR_NOMEM;
    enum pw_err e = PW_ERR_PARSE;
    size_t n = 0, got = 0;
    uint64_t p = 0, at = 0;
    /* The first delimiter may start the body (no preceding CRLF). */
    const char *v = scan_view(&sc, 0, dl - 2, &got);
    if (!v) {
        e = PW_ERR_IO;
        goto out;
    }
    if (got == dl - 2 && memcmp(v, delim + 2, dl - 2) == 0) {
        p = dl - 2;
    } else {
        int f = scan_find(&sc, 0, delim, dl, &at);
        if (f <= 0) {
            e = f < 0 ? PW_ERR_IO : PW_ERR_PARSE;
            goto out;
        }
        p = at + dl;
    }
    for (;;) {
        v = scan_view(&sc, p, PART_HEAD_MAX, &got);
        if (!v) {
            e = PW_ERR_IO;
            goto out;
        }
        const char *q = v, *end = v + got;
        if (end - q >= 2 && q[0] == '-' && q[1] == '-')
            break; /* close delimiter */
        while (q < end && (*q == ' ' || *q == '\t'))
            q++;
        if (end - q < 2 || q[0] != '\r' || q[1] != '\n')
            goto out;
        q += 2;
        const char *hend = memmem(q, (size_t)(end - q), "\r\n\r\n", 4);
        if (!hend)
            goto out;
        struct router_multipart_span part = {0};
        bool have_disp = false;
        for (const char *h = q; h < hend + 2;) {
            const char *eol = memmem(h, (size_t)(hend + 2 - h), "\r\n", 2);
            if (!eol)
                break;
            size_t hl = (size_t)(eol - h);
            if (hl > 20 && strncasecmp(h, "content-disposition:", 20) == 0) {
                const char *pv;
                size_t pl;
                have_disp = true;
                if (!header_param(h + 20, hl - 20, "name", &pv, &pl))
                    goto out;
                part.name_off = p + (uint64_t)(pv - v);
                part.name_len = pl;
                if (header_param(h + 20, hl - 20, "filename", &pv, &pl)) {
                    part.has_filename = true;
                    part.filename_off = p + (uint64_t)(pv - v);
                    part.filename_len = pl;
                }
            }
            h = eol + 2;
        }
        if (!have_disp)
            goto out;
        uint64_t data = p + (uint64_t)(hend + 4 - v);
        int f = scan_find(&sc, data, delim, dl, &at);
        if (f <= 0) {
            e = f < 0 ? PW_ERR_IO : PW_ERR_PARSE;
            goto out;
        }
        part.off = data;
        part.len = at - data;
        if (n == cap) {
            e = PW_ERR_TOOBIG;
            goto out;
        }
        parts[n++] = part;
        p = at + dl;
    }
    *n_out = n;
    e = PW_OK;
out:
    free(sc.buf);
    return e;
}

enum pw_err router_multipart_parse(const char *content_type, const char *body, size_t len,
                                   struct router_multipart_part *parts, size_t cap, size_t *n_out)
{
    *n_out = 0;
    struct router_multipart_span *spans = calloc(cap ? cap : 1, sizeof *spans);
    if (!spans)
        return PW_ERR_NOMEM;
    struct router_body_src src = {body, -1, len};
    size_t n = 0;
    enum pw_err e = router_multipart_scan(content_type, &src, spans, cap, &n);
    for (size_t i = 0; e == PW_OK && i < n; i++) {
        parts[i].name = body + spans[i].name_off;
        parts[i].name_len = (size_t)spans[i].name_len;
        parts[i].filename = spans[i].has_filename ? body + spans[i].filename_off : NULL;
        parts[i].filename_len = spans[i].has_filename ? (size_t)spans[i].filename_len : 0;
        parts[i].data = body + spans[i].off;
        parts[i].len = (size_t)spans[i].len;
    }
    if (e == PW_OK)
        *n_out = n;
    free(spans);
    return e;
}

uint64_t router_files_spool_limit(const struct router_http_request *req, void *ud)
{
    const struct router *rt = ud;
    if (strcmp(req->method, "POST") != 0 || req->path_len != 9 ||
        memcmp(req->path, "/v1/files", 9) != 0)
        return 0;
    const char *ct = router_http_request_header(req, "content-type");
    const char *auth = router_http_request_header(req, "authorization");
    if (!ct || strncasecmp(ct, "multipart/form-data", 19) != 0 || !auth || !auth[0])
        return 0;
    size_t max = rt->cfg.max_file_bytes ? rt->cfg.max_file_bytes : ROUTER_FILES_DEFAULT_MAX_BYTES;
    return (uint64_t)max + ROUTER_FILES_MULTIPART_SLACK;
}

/* ---- JSON ------------------------------------------------------------------------------- */

static json_int_t field_int(const struct pw_stream_entry *h, const char *name)
{
    const char *v = router_api_field(h, name);
    return v ? (json_int_t)strtoll(v, NULL, 10) : 0;
}

enum pw_err router_files_json(const struct pw_stream_entry *h, char **out, size_t *len)
{
    const char *id = router_api_field(h, "id");
    const char *fname = router_api_field(h, "filename");
    const char *purpose = router_api_field(h, "purpose");
    json_t *o = json_pack("{s:s,s:s,s:I,s:I,s:s,s:s,s:s,s:n}", "id", id ? id : "", "object", "file",
                          "bytes", field_int(h, "bytes"), "created_at", field_int(h, "created_at"),
                          "filename", fname ? fname : "", "purpose", purpose ? purpose : "",
                          "status", "processed", "status_details");
    if (!o)
        return PW_ERR_NOMEM;
    *out = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!*out)
        return PW_ERR_NOMEM;
    *len = strlen(*out);
    return PW_OK;
}

/* ---- handlers --------------------------------------------------------------------------- */

/* Parses the reply of HGETALL into one entry; NULL when the object is missing or belongs to
 * another tenant (answered 404 here). Caller frees with pw_stream_entries_free. */
static struct pw_stream_entries *owned_object(struct router_api_op *op, const redisReply *reply,
                                              enum pw_err err, const char *what)
{
    struct pw_stream_entries *h = NULL;
    if (err || !reply) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        return NULL;
    }
    if (pw_hash_parse_all(reply, &h) != PW_OK || h->n != 1 || h->v[0].n_fields == 0 ||
        !router_api_field(&h->v[0], "tenant") ||
        strcmp(router_api_field(&h->v[0], "tenant"), op->tenant) != 0) {
        pw_stream_entries_free(h);
        router_api_respond_error(op, 404, NULL, "id", "No such %s: '%s'", what, op->id);
        return NULL;
    }
    return h;
}

static void on_file_saved(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    if (err) {
        PW_LOG_ERROR("event=file_meta_failed file=%s err=%s", op->id, errstr ? errstr : "?");
        pw_storage_delete(op->w->rt->storage, op->id);
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
    } else if (op->req) {
        struct pw_stream_entries *h = NULL;
        char *body = NULL;
        size_t len = 0;
        if (pw_hash_parse_all(reply, &h) == PW_OK && h->n == 1 &&
            router_files_json(&h->v[0], &body, &len) == PW_OK)
            router_api_respond_json(op, 200, body, len);
        else
            router_api_respond_error(op, 500, NULL, NULL, "internal error");
        free(body);
        pw_stream_entries_free(h);
    }
    router_api_op_unref(op);
}

static const char save_script[] = "redis.call('hset', KEYS[1], unpack(ARGV, 3))\n"
                                  "redis.call('zadd', KEYS[2], ARGV[1], ARGV[2])\n"
                                  "return redis.call('hgetall', KEYS[1])\n";

static bool ascii_printable(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f || s[i] == '/' || s[i] == '\\')
            return false;
    return true;
}

/* The bytes of a span into buf (cap > len); false when longer than cap - 1 or unreadable. */
static bool span_str(const struct router_body_src *src, uint64_t off, uint64_t len, char *buf,
                     size_t cap)
{
    size_t got = 0;
    if (len >= cap || src_read(src, off, buf, (size_t)len, &got) != PW_OK || got != len)
        return false;
    buf[got] = '\0';
    return true;
}

/* What the upload of a batch file checks while copying (every line is validated when a
 * batch is created): some non-blank content, starting with '{', and no NUL byte. */
struct jsonl_check {
    bool seen; /* a non-blank byte was seen */
    bool bad;  /* first non-blank byte is not '{', or a NUL */
};

static void jsonl_check_feed(struct jsonl_check *jc, const char *p, size_t n)
{
    if (memchr(p, '\0', n))
        jc->bad = true;
    for (size_t i = 0; i < n && !jc->seen; i++) {
        if (p[i] && strchr(" \t\r\n", p[i]))
            continue;
        jc->seen = true;
        jc->bad |= p[i] != '{';
    }
}

/*
 * Copies the file part into storage under op->id in ROUTER_FILES_COPY_CHUNK pieces (never
 * the whole part in memory); for purpose batch checks it on the way. Answers errors itself
 * and returns false; true when committed.
 */
static bool store_part(struct router_api_op *op, const struct router_body_src *src,
                       const struct router_multipart_span *file, bool batch)
{
    struct pw_storage_writer *wr = NULL;
    struct jsonl_check jc = {0};
    char *buf = NULL;
    enum pw_err pe = pw_storage_writer_open(op->w->rt->storage, op->id, &wr);
    if (!pe && src->fd >= 0 && !(buf = malloc(ROUTER_FILES_COPY_CHUNK)))
        pe = PW_ERR_NOMEM;
    for (uint64_t at = 0; !pe && at < file->len;) {
        size_t want = file->len - at < ROUTER_FILES_COPY_CHUNK ? (size_t)(file->len - at)
                                                               : ROUTER_FILES_COPY_CHUNK;
        const char *p = src->mem + file->off + at;
        size_t got = want;
        if (src->fd >= 0) {
            pe = src_read(src, file->off + at, buf, want, &got);
            p = buf;
            if (!pe && got != want)
                pe = PW_ERR_IO; /* the spool file is shorter than it said */
        }
        if (!pe && batch)
            jsonl_check_feed(&jc, p, got);
        if (!pe)
            pe = pw_storage_write(wr, p, got);
        at += got;
    }
    free(buf);
    if (pe) {
        pw_storage_abort(wr);
        PW_LOG_ERROR("event=file_store_failed file=%s err=%s", op->id, pw_err_name(pe));
        router_api_respond_error(op, 500, NULL, NULL, "Cannot store the file: %s.",
                                 pw_err_desc(pe));
        return false;
    }
    if (batch && !jc.seen) {
        pw_storage_abort(wr);
        router_api_respond_error(op, 400, "empty_file", "file",
                                 "The file is empty: a batch input file needs at least one "
                                 "request line.");
        return false;
    }
    if (batch && jc.bad) {
        pw_storage_abort(wr);
        router_api_respond_error(op, 400, "invalid_file_format", "file",
                                 "The file is not JSONL: every line of a batch input file "
                                 "must be one JSON object.");
        return false;
    }
    if ((pe = pw_storage_commit(wr))) {
        PW_LOG_ERROR("event=file_store_failed file=%s err=%s", op->id, pw_err_name(pe));
        router_api_respond_error(op, 500, NULL, NULL, "Cannot store the file: %s.",
                                 pw_err_desc(pe));
        return false;
    }
    return true;
}

static void file_upload(struct router_api_op *op)
{
    struct router_http_request *req = op->req;
    struct router *rt = op->w->rt;
    /* A spooled body (the usual case, router_files_spool_limit) is read from its file. */
    struct router_body_src src = {req->body, -1, req->body_len};
    if (req->body_spooled) {
        src.mem = NULL;
        src.fd = req->body_fd;
        src.len = req->body_fd_len;
    }
    struct router_multipart_span parts[ROUTER_FILES_MULTIPART_PARTS];
    size_t n = 0;
    enum pw_err pe = router_multipart_scan(router_http_request_header(req, "content-type"), &src,
                                           parts, ROUTER_FILES_MULTIPART_PARTS, &n);
    if (pe == PW_ERR_IO || pe == PW_ERR_NOMEM) {
        router_api_respond_error(op, 500, NULL, NULL, "Cannot read the upload: %s.",
                                 pw_err_desc(pe));
        return;
    }
    if (pe) {
        router_api_respond_error(op, 400, "invalid_request", NULL,
                                 "Expected a multipart/form-data body with fields 'purpose' and "
                                 "'file'.");
        return;
    }
    const struct router_multipart_span *file = NULL, *purpose = NULL;
    for (size_t i = 0; i < n; i++) {
        char name[8];
        if (!span_str(&src, parts[i].name_off, parts[i].name_len, name, sizeof name))
            continue;
        if (strcmp(name, "file") == 0)
            file = &parts[i];
        else if (strcmp(name, "purpose") == 0)
            purpose = &parts[i];
    }
    if (!purpose) {
        router_api_respond_error(op, 400, "missing_required_parameter", "purpose",
                                 "Missing required parameter: 'purpose'.");
        return;
    }
    if (!file) {
        router_api_respond_error(op, 400, "missing_required_parameter", "file",
                                 "Missing required parameter: 'file'.");
        return;
    }
    static const char *const purposes[] = {"batch",  "fine-tune", "assistants",
                                           "vision", "user_data", "evals"};
    const char *pv = NULL;
    char pbuf[16];
    if (span_str(&src, purpose->off, purpose->len, pbuf, sizeof pbuf))
        for (size_t i = 0; i < sizeof purposes / sizeof purposes[0]; i++)
            if (strcmp(pbuf, purposes[i]) == 0)
                pv = purposes[i];
    if (!pv) {
        router_api_respond_error(op, 400, "invalid_value", "purpose",
                                 "Invalid value for 'purpose': supported values are 'batch', "
                                 "'fine-tune', 'assistants', 'vision', 'user_data', 'evals'.");
        return;
    }
    size_t max = rt->cfg.max_file_bytes ? rt->cfg.max_file_bytes : ROUTER_FILES_DEFAULT_MAX_BYTES;
    if (file->len > max) {
        router_api_respond_error(op, 413, "file_too_large", "file",
                                 "File is too large: %llu bytes; the limit is %zu bytes.",
                                 (unsigned long long)file->len, max);
        return;
    }
    char fname[ROUTER_FILES_FILENAME_MAX + 1] = "upload";
    char fbuf[ROUTER_FILES_FILENAME_MAX + 1];
    if (file->has_filename && file->filename_len > 0 &&
        span_str(&src, file->filename_off, file->filename_len, fbuf, sizeof fbuf) &&
        ascii_printable(fbuf, (size_t)file->filename_len))
        memcpy(fname, fbuf, (size_t)file->filename_len + 1);
    uint8_t rnd[12];
    if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd) {
        uint64_t t = pw_clock_mono_ns();
        memcpy(rnd, &t, 8);
        memcpy(rnd + 8, &op, 4);
    }
    char hex[sizeof rnd * 2 + 1];
    pw_hex_encode(rnd, sizeof rnd, hex);
    snprintf(op->id, sizeof op->id, "file-%s", hex);
    if (!store_part(op, &src, file, strcmp(pv, "batch") == 0))
        return;
    char key[PW_KEY_MAX], zkey[PW_KEY_MAX], bytes[24], created[24], score[24];
    pw_key_file(key, sizeof key, op->id);
    router_key_tenant_files(zkey, sizeof zkey, op->tenant);
    int64_t now_ms = pw_clock_wall_ms();
    snprintf(bytes, sizeof bytes, "%llu", (unsigned long long)file->len);
    snprintf(created, sizeof created, "%" PRId64, now_ms / 1000);
    snprintf(score, sizeof score, "%" PRId64, now_ms);
    const char *argv[] = {"EVAL", save_script,  "2",        key,          zkey,   score,
                          op->id, "id",         op->id,     "object",     "file", "bytes",
                          bytes,  "created_at", created,    "filename",   fname,  "purpose",
                          pv,     "tenant",     op->tenant, "storage_id", op->id};
    PW_LOG_INFO("event=file_uploaded file=%s bytes=%llu purpose=%s spooled=%d key_id=%s", op->id,
                (unsigned long long)file->len, pv, req->body_spooled, op->key_id);
    router_api_command(op, on_file_saved, (int)(sizeof argv / sizeof argv[0]), argv, NULL);
}

static void on_file_list(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                         const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    if (err || !reply || reply->type != REDIS_REPLY_ARRAY) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
        router_api_op_unref(op);
        return;
    }
    size_t limit = (size_t)op->step;
    const char *purpose = op->scratch && op->scratch[0] ? op->scratch : NULL;
    json_t *data = json_array();
    size_t n = 0;
    for (size_t i = 0; data && i < reply->elements && n < limit; i++) {
        struct pw_stream_entries *h = NULL;
        char *one = NULL;
        size_t len;
        if (pw_hash_parse_all(reply->element[i], &h) == PW_OK && h->n == 1 &&
            h->v[0].n_fields > 0 &&
            (!purpose || (router_api_field(&h->v[0], "purpose") &&
                          strcmp(router_api_field(&h->v[0], "purpose"), purpose) == 0)) &&
            router_files_json(&h->v[0], &one, &len) == PW_OK) {
            json_array_append_new(data, json_loads(one, 0, NULL));
            n++;
        }
        free(one);
        pw_stream_entries_free(h);
    }
    json_t *first = json_array_get(data, 0), *last = json_array_get(data, n ? n - 1 : 0);
    json_t *o =
        json_pack("{s:s,s:o,s:O?,s:O?,s:b}", "object", "list", "data", data, "first_id",
                  first ? json_object_get(first, "id") : NULL, "last_id",
                  last ? json_object_get(last, "id") : NULL, "has_more", reply->elements > limit);
    char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (body)
        router_api_respond_json(op, 200, body, strlen(body));
    else
        router_api_respond_error(op, 500, NULL, NULL, "internal error");
    free(body);
    router_api_op_unref(op);
}

/* Lists with the shared script; used by files and (with its own callback) batches. */
static void list_objects(struct router_api_op *op, const char *zkey, const char *prefix,
                         size_t default_limit, size_t max_limit, pw_redis_reply_cb cb)
{
    char after[PW_KEY_NAME_MAX + 1] = "", lim[24];
    size_t limit = default_limit;
    if (router_api_query(op->req, "limit", lim, sizeof lim)) {
        char *end;
        long v = strtol(lim, &end, 10);
        if (*end || v < 1 || (size_t)v > max_limit) {
            router_api_respond_error(op, 400, "invalid_value", "limit",
                                     "Invalid 'limit': expected an integer 1..%zu.", max_limit);
            return;
        }
        limit = (size_t)v;
    }
    router_api_query(op->req, "after", after, sizeof after);
    op->step = (int)limit;
    char plus1[24];
    snprintf(plus1, sizeof plus1, "%zu", limit + 1);
    const char *argv[] = {"EVAL", router_api_list_script, "1", zkey, after, plus1, prefix};
    router_api_command(op, cb, 7, argv, NULL);
}

void router_api_list(struct router_api_op *op, const char *zkey, const char *prefix,
                     size_t default_limit, size_t max_limit, pw_redis_reply_cb cb)
{
    list_objects(op, zkey, prefix, default_limit, max_limit, cb);
}

enum file_step {
    STEP_GET = 1,
    STEP_CONTENT,
    STEP_DELETE,
};

static void on_file_deleted(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                            const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    if (err) {
        router_api_respond_error(op, 503, "redis_unavailable", NULL,
                                 "The metadata store (Redis) is unavailable.");
    } else {
        /* Metadata first, bytes second: a crash between leaves an orphan object, never a
         * listed file without bytes. */
        pw_storage_delete(op->w->rt->storage, op->scratch ? op->scratch : op->id);
        json_t *o = json_pack("{s:s,s:s,s:b}", "id", op->id, "object", "file", "deleted", 1);
        char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (body)
            router_api_respond_json(op, 200, body, strlen(body));
        else
            router_api_respond_error(op, 500, NULL, NULL, "internal error");
        free(body);
        PW_LOG_INFO("event=file_deleted file=%s key_id=%s", op->id, op->key_id);
    }
    router_api_op_unref(op);
}

/* ---- download: streamed from storage at the pace the client reads ----------------------- */

#define DL_CHUNK 65536u       /* bytes read from storage and queued at a time */
#define DL_HIGH (256u * 1024) /* queue more only while less than this is unsent */

/* A download in progress; holds the op's HTTP-side reference until the terminal call. */
struct file_dl {
    struct router_api_op *op;
    struct pw_storage_reader *rd;
    char *buf;     /* DL_CHUNK bytes */
    uint64_t left; /* bytes still to send (the announced Content-Length) */
};

static void dl_free(struct file_dl *d)
{
    pw_storage_reader_close(d->rd);
    free(d->buf);
    free(d);
}

/* Terminal: the stream's end (ok) or a cut stream (a read error half-way). */
static void dl_finish(struct file_dl *d, bool ok)
{
    struct router_http_request *req = d->op->req;
    router_http_request_set_cancel(req, NULL, NULL);
    router_http_stream_set_drain(req, NULL, NULL);
    if (ok)
        router_http_stream_end(req);
    else
        router_http_request_release(req);
    op_end(d->op);
    dl_free(d);
}

static void dl_gone(struct router_http_request *req, void *ud)
{
    struct file_dl *d = ud;
    router_http_stream_set_drain(req, NULL, NULL);
    router_http_request_release(req);
    op_end(d->op);
    dl_free(d);
}

/* Queues chunks while the connection keeps up; runs again from the drain callback. */
static void dl_pump(struct router_http_request *req, void *ud)
{
    struct file_dl *d = ud;
    while (router_http_stream_pending(req) < DL_HIGH) {
        if (d->left == 0) {
            dl_finish(d, true);
            return;
        }
        size_t n = 0;
        size_t want = d->left < DL_CHUNK ? (size_t)d->left : DL_CHUNK;
        enum pw_err pe = pw_storage_read(d->rd, d->buf, want, &n);
        if (!pe && n == 0)
            pe = PW_ERR_IO; /* shorter than it was at open */
        if (pe) {
            PW_LOG_ERROR("event=file_read_failed file=%s err=%s", d->op->id, pw_err_name(pe));
            dl_finish(d, false); /* a cut body: Content-Length was promised */
            return;
        }
        d->left -= n;
        pe = router_http_stream_write(req, d->buf, n);
        if (pe == PW_ERR_CLOSED)
            return; /* dropped: dl_gone follows from the event loop */
        if (pe) {
            dl_finish(d, false);
            return;
        }
    }
}

static void file_download(struct router_api_op *op, const char *sid, bool jsonl)
{
    struct file_dl *d = calloc(1, sizeof *d);
    enum pw_err pe = d && (d->buf = malloc(DL_CHUNK)) ? PW_OK : PW_ERR_NOMEM;
    uint64_t size = 0;
    if (!pe)
        pe = pw_storage_reader_open(op->w->rt->storage, sid, &size, &d->rd);
    if (pe) {
        if (d)
            dl_free(d);
        if (pe == PW_ERR_NOTFOUND)
            router_api_respond_error(op, 404, NULL, "id", "The content of file '%s' is gone.",
                                     op->id);
        else
            router_api_respond_error(op, 500, NULL, NULL, "Cannot read the file: %s.",
                                     pw_err_desc(pe));
        return;
    }
    d->op = op;
    d->left = strcmp(op->req->method, "HEAD") == 0 ? 0 : size;
    struct router_http_field hdr[] = {
        {"content-type", jsonl ? "application/jsonl" : "application/octet-stream"}};
    /* The length is the opened object's: the reader keeps seeing it even if replaced. */
    if (router_http_stream_begin_length(op->req, 200, hdr, 1, size) != PW_OK) {
        dl_finish(d, false);
        return;
    }
    router_http_request_set_cancel(op->req, dl_gone, d);
    router_http_stream_set_drain(op->req, dl_pump, d);
    dl_pump(op->req, d);
}

static void on_file_meta(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                         const char *errstr, void *ud)
{
    struct router_api_op *op = ud;
    struct pw_stream_entries *h = op->req ? owned_object(op, reply, err, "file") : NULL;
    if (!h) {
        router_api_op_unref(op);
        return;
    }
    const struct pw_stream_entry *e = &h->v[0];
    const char *sid = router_api_field(e, "storage_id");
    if (!sid)
        sid = op->id;
    if (op->step == STEP_GET) {
        char *body = NULL;
        size_t len = 0;
        if (router_files_json(e, &body, &len) == PW_OK)
            router_api_respond_json(op, 200, body, len);
        else
            router_api_respond_error(op, 500, NULL, NULL, "internal error");
        free(body);
    } else if (op->step == STEP_CONTENT) {
        const char *purpose = router_api_field(e, "purpose");
        file_download(op, sid,
                      purpose &&
                          (strcmp(purpose, "batch") == 0 || strncmp(purpose, "batch_", 6) == 0));
    } else {
        free(op->scratch);
        op->scratch = strdup(sid);
        char key[PW_KEY_MAX], zkey[PW_KEY_MAX];
        pw_key_file(key, sizeof key, op->id);
        router_key_tenant_files(zkey, sizeof zkey, op->tenant);
        static const char del_script[] = "redis.call('del', KEYS[1])\n"
                                         "redis.call('zrem', KEYS[2], ARGV[1])\n"
                                         "return 1\n";
        const char *argv[] = {"EVAL", del_script, "2", key, zkey, op->id};
        router_api_command(op, on_file_deleted, 6, argv, NULL);
    }
    pw_stream_entries_free(h);
    router_api_op_unref(op);
}

void router_files_handle(struct router_worker *w, struct router_http_request *req,
                         const struct router_key *key)
{
    struct router_api_op *op = router_api_op_create(w, req, key);
    if (!op)
        return;
    const char *m = req->method;
    const char *rest = req->path + strlen("/v1/files");
    size_t rest_len = req->path_len - strlen("/v1/files");
    if (rest_len == 0) {
        if (strcmp(m, "POST") == 0) {
            file_upload(op);
        } else if (strcmp(m, "GET") == 0) {
            char purpose[32] = "";
            router_api_query(req, "purpose", purpose, sizeof purpose);
            op->scratch = strdup(purpose);
            char zkey[PW_KEY_MAX];
            router_key_tenant_files(zkey, sizeof zkey, op->tenant);
            list_objects(op, zkey, "pw:file:{", ROUTER_FILES_LIST_MAX, ROUTER_FILES_LIST_MAX,
                         on_file_list);
        } else {
            router_api_respond_error(op, 405, "method_not_allowed", NULL,
                                     "Method %s is not allowed on /v1/files.", m);
        }
        router_api_op_unref(op);
        return;
    }
    /* "/{id}" or "/{id}/content" */
    const char *id = rest + 1;
    size_t id_len = rest_len - 1;
    bool content = false;
    if (id_len > 8 && memcmp(id + id_len - 8, "/content", 8) == 0) {
        content = true;
        id_len -= 8;
    }
    if (rest[0] != '/' || id_len == 0 || id_len >= sizeof op->id) {
        router_api_respond_error(op, 404, NULL, "id", "No such file.");
        router_api_op_unref(op);
        return;
    }
    memcpy(op->id, id, id_len);
    op->id[id_len] = '\0';
    char keybuf[PW_KEY_MAX];
    if (!pw_key_name_ok(op->id) || pw_key_file(keybuf, sizeof keybuf, op->id) != PW_OK) {
        router_api_respond_error(op, 404, NULL, "id", "No such file: '%.*s'", (int)id_len, id);
        router_api_op_unref(op);
        return;
    }
    if (content && strcmp(m, "GET") == 0)
        op->step = STEP_CONTENT;
    else if (!content && strcmp(m, "GET") == 0)
        op->step = STEP_GET;
    else if (!content && strcmp(m, "DELETE") == 0)
        op->step = STEP_DELETE;
    if (!op->step) {
        router_api_respond_error(op, 405, "method_not_allowed", NULL,
                                 "Method %s is not allowed here.", m);
        router_api_op_unref(op);
        return;
    }
    const char *argv[] = {"HGETALL", keybuf};
    router_api_command(op, on_file_meta, 2, argv, NULL);
    router_api_op_unref(op);
}

/*
 * router_openai: OpenAI JSON <-> parkway protobuf. See router_openai.h for the API and
 * docs/internals/openai.md for every decision (field table, error wording, dedup).
 *
 * Parsing: router_json decodes the body into a tree in a per-call arena (duplicate keys,
 * invalid UTF-8 and nesting past ROUTER_OPENAI_JSON_DEPTH_MAX refused, as jansson with
 * JSON_REJECT_DUPLICATES did), then the body is walked field by field; the first problem
 * found fills the error and stops. Nothing from the body is trusted: every count and length is
 * checked before it is used, and the finished message goes through pw_proto_check_request.
 *
 * Responses: the acc (non-streaming) and the stream share one state, struct oai_resp,
 * which tracks per request (part) the current attempt and last seq, and per choice the
 * bytes and tokens already taken. A newer attempt regenerates the same tokens (seeded
 * sampling): the acc restarts that part from scratch (nothing was sent yet); the stream
 * skips the prefix already sent, checking that it matches, and sends only the rest.
 *
 * No globals; reentrant.
 */
#include "router_openai.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "router_json.h"

/* Logprobs JSON cannot hold -inf; OpenAI reports masked tokens as -9999.0. */
#define OAI_LOGPROB_FLOOR -9999.0
/* jansson dump flags: compact, and 8 significant digits so floats print as written. */
#define OAI_DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(8))
/* Longest value quoted back in an error message. */
#define OAI_QUOTE_MAX 64
/* Stack bytes lent to the request parser's arena: a typical body (a few KiB) parses with
 * no malloc for its tree; bigger ones add heap blocks. */
#define OAI_ARENA_STACK 8192

/* ------------------------------------------------------------------------------------ */
/* Small helpers                                                                        */

/* Bytes of a valid-prefix copy: cuts s at max bytes, backing off to a UTF-8 boundary. */
static size_t utf8_cut(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    size_t n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

static void copy_cut(char *dst, size_t cap, const char *src)
{
    if (src == NULL)
        src = "";
    size_t n = utf8_cut(src, strlen(src), cap - 1);
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* Drops a trailing incomplete UTF-8 sequence (left by a snprintf truncation). */
static void utf8_trim_tail(char *s)
{
    size_t len = strlen(s);
    size_t i = len;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)s[i - 1];
    size_t need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    if (len - (i - 1) < need)
        s[i - 1] = '\0';
}

/* Length of the well-formed UTF-8 sequence at s (ASCII: 1), or 0 (router_json's rule). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    return s[0] < 0x80 ? 1 : router_json_utf8_seq(s, n);
}

static bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq(u + i, n - i);
        if (k == 0)
            return false;
        i += k;
    }
    return true;
}

/* A JSON string from bytes that should be UTF-8; each byte that does not start a
 * well-formed sequence (and NUL, then) becomes U+FFFD. */
static json_t *jstr_lossy(const char *s, size_t len)
{
    json_t *v = json_stringn(s, len);
    if (v != NULL || len > SIZE_MAX / 3)
        return v;
    char *buf = malloc(len * 3 + 1);
    if (buf == NULL)
        return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        size_t k = u[i] != 0 ? utf8_seq(u + i, len - i) : 0;
        if (k > 0) {
            memcpy(buf + o, s + i, k);
            o += k;
            i += k;
        } else {
            memcpy(buf + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    v = json_stringn(buf, o);
    free(buf);
    return v;
}

static json_t *jstr(const char *s)
{
    if (s == NULL)
        s = "";
    return jstr_lossy(s, strlen(s));
}

static json_t *jstr_or_null(const char *s)
{
    return (s == NULL || s[0] == '\0') ? json_null() : jstr(s);
}

/*
 * Sets key to v, taking v; false if v is NULL or jansson failed (out of memory). Like
 * json_object_set_new, which it wraps, it takes v even on failure and even when obj is
 * NULL, so `ok = jset(o, k, v) && ok` never leaks v.
 */
static bool jset(json_t *obj, const char *key, json_t *v)
{
    return v != NULL && json_object_set_new(obj, key, v) == 0;
}

static bool jappend(json_t *arr, json_t *v)
{
    return v != NULL && json_array_append_new(arr, v) == 0;
}

static char *sdup(const char *s)
{
    if (s == NULL)
        s = "";
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p != NULL)
        memcpy(p, s, n + 1);
    return p;
}

/* Number of UTF-8 code points (lead bytes) in s. */
static size_t utf8_chars(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        n += ((unsigned char)s[i] & 0xC0) != 0x80;
    return n;
}

/* ------------------------------------------------------------------------------------ */
/* Errors                                                                               */

__attribute__((format(printf, 6, 0))) static void err_vset(struct router_openai_error *err,
                                                           int status, const char *type,
                                                           const char *param, const char *code,
                                                           const char *fmt, va_list ap)
{
    memset(err, 0, sizeof(*err));
    err->status = status;
    err->type = type;
    copy_cut(err->param, sizeof(err->param), param);
    copy_cut(err->code, sizeof(err->code), code);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    utf8_trim_tail(err->message);
}

__attribute__((format(printf, 6, 7))) static void err_set(struct router_openai_error *err,
                                                          int status, const char *type,
                                                          const char *param, const char *code,
                                                          const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_vset(err, status, type, param, code, fmt, ap);
    va_end(ap);
}

void router_openai_err_param(struct router_openai_error *err, const char *param, const char *code,
                             const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    err_vset(err, 400, "invalid_request_error", param, code, fmt, ap);
    va_end(ap);
}

void router_openai_err_invalid_json(struct router_openai_error *err, const char *detail)
{
    err_set(err, 400, "invalid_request_error", NULL, NULL,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The API expects a JSON payload, but "
            "what was sent was not valid JSON: %s.)",
            detail != NULL && detail[0] != '\0' ? detail : "empty body");
}

void router_openai_err_missing_key(struct router_openai_error *err)
{
    err_set(err, 401, "invalid_request_error", NULL, NULL,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).");
}

void router_openai_err_bad_key(struct router_openai_error *err)
{
    /* The key is never echoed back, not even masked: it would end up in client logs. */
    err_set(err, 401, "invalid_request_error", NULL, "invalid_api_key",
            "Incorrect API key provided. Check the key, or create one with `parkway keys "
            "create`.");
}

void router_openai_err_model_denied(struct router_openai_error *err, const char *model)
{
    char q[OAI_QUOTE_MAX + 1];
    copy_cut(q, sizeof(q), model);
    err_set(err, 403, "invalid_request_error", "model", "model_not_allowed",
            "This API key is not allowed to use the model `%s`.", q);
}

void router_openai_err_model_not_found(struct router_openai_error *err, const char *model)
{
    char q[OAI_QUOTE_MAX + 1];
    copy_cut(q, sizeof(q), model);
    err_set(err, 404, "invalid_request_error", "model", "model_not_found",
            "The model `%s` does not exist or you do not have access to it.", q);
}

void router_openai_err_unknown_route(struct router_openai_error *err, const char *method,
                                     const char *path)
{
    char m[17], p[OAI_QUOTE_MAX + 1];
    copy_cut(m, sizeof(m), method);
    copy_cut(p, sizeof(p), path);
    err_set(err, 404, "invalid_request_error", NULL, "unknown_url", "Invalid URL (%s %s)", m, p);
}

void router_openai_err_method(struct router_openai_error *err, const char *method, const char *path)
{
    char m[17], p[OAI_QUOTE_MAX + 1];
    copy_cut(m, sizeof(m), method);
    copy_cut(p, sizeof(p), path);
    err_set(err, 405, "invalid_request_error", NULL, "method_not_allowed",
            "Invalid method for URL (%s %s)", m, p);
}

void router_openai_err_header_timeout(struct router_openai_error *err)
{
    err_set(err, 408, "invalid_request_error", NULL, "request_timeout",
            "The request was not received in time.");
}

void router_openai_err_too_large(struct router_openai_error *err, size_t limit_bytes)
{
    err_set(err, 413, "invalid_request_error", NULL, "request_too_large",
            "The request body is too large: the limit is %zu bytes.", limit_bytes);
}

void router_openai_err_rate_limited(struct router_openai_error *err, const char *kind,
                                    const char *model, uint32_t limit, int retry_after_s)
{
    bool tokens = kind != NULL && strcmp(kind, "tokens") == 0;
    char q[OAI_QUOTE_MAX + 1];
    copy_cut(q, sizeof(q), model);
    err_set(err, 429, tokens ? "tokens" : "requests", NULL, "rate_limit_exceeded",
            "Rate limit reached for %s on %s per min (%s): Limit %" PRIu32
            ". Please try again in %ds.",
            q[0] != '\0' ? q : "this API key", tokens ? "tokens" : "requests",
            tokens ? "TPM" : "RPM", limit, retry_after_s > 0 ? retry_after_s : 1);
    err->retry_after_s = retry_after_s > 0 ? retry_after_s : 1;
}

void router_openai_err_internal(struct router_openai_error *err)
{
    err_set(err, 500, "server_error", NULL, NULL,
            "The server had an error while processing your request. Sorry about that!");
}

void router_openai_err_unavailable(struct router_openai_error *err, const char *why,
                                   int retry_after_s)
{
    char q[128];
    copy_cut(q, sizeof(q), why != NULL ? why : "the server is overloaded or not ready yet");
    err_set(err, 503, "server_error", NULL, "service_unavailable",
            "The service is temporarily unavailable (%s). Please try again later.", q);
    err->retry_after_s = retry_after_s > 0 ? retry_after_s : 0;
}

void router_openai_err_deadline(struct router_openai_error *err)
{
    err_set(err, 504, "server_error", NULL, "deadline_exceeded",
            "Request timed out: the deadline passed before the answer was complete.");
}

void router_openai_err_from_reply(struct router_openai_error *err, const Parkway__Error *e,
                                  Parkway__FinishReason reason)
{
    bool cancelled = reason == PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED;
    const char *code = e != NULL && e->code != NULL && e->code[0] != '\0' ? e->code : NULL;
    const char *msg = e != NULL && e->message != NULL && e->message[0] != '\0' ? e->message : NULL;
    int status = e != NULL ? (int)e->http_status : 0;
    if (status == 0)
        status = cancelled ? 504 : 500;
    if (status < 400 || status > 599)
        status = 500;
    if (code == NULL && cancelled)
        code = "deadline_exceeded";
    const char *type = status >= 500 ? "server_error" : "invalid_request_error";
    if (status == 429)
        type = "requests";
    if (msg == NULL)
        msg = cancelled ? "The request was cancelled before the answer was complete."
                        : "The engine failed while generating the answer.";
    err_set(err, status, type, NULL, code, "%s", msg);
}

/* The error object as jansson (NULL on out of memory). */
static json_t *error_obj(const struct router_openai_error *err)
{
    json_t *root = json_object();
    json_t *e = json_object();
    if (root == NULL || e == NULL || !jset(e, "message", jstr(err->message)) ||
        !jset(e, "type", jstr(err->type != NULL ? err->type : "server_error")) ||
        !jset(e, "param", jstr_or_null(err->param)) || !jset(e, "code", jstr_or_null(err->code))) {
        json_decref(root);
        json_decref(e);
        return NULL;
    }
    if (json_object_set_new(root, "error", e) != 0) {
        json_decref(root);
        return NULL;
    }
    return root;
}

/* Dumps v (taking it) into a malloc'd string. */
static enum pw_err dump_take(json_t *v, char **out, size_t *len_out)
{
    if (v == NULL)
        return PW_ERR_NOMEM;
    char *s = json_dumps(v, OAI_DUMP_FLAGS);
    json_decref(v);
    if (s == NULL)
        return PW_ERR_NOMEM;
    *out = s;
    if (len_out != NULL)
        *len_out = strlen(s);
    return PW_OK;
}

enum pw_err router_openai_error_json(const struct router_openai_error *err, char **out,
                                     size_t *len_out)
{
    if (err == NULL || out == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    return dump_take(error_obj(err), out, len_out);
}

/* ------------------------------------------------------------------------------------ */
/* Request parsing: typed getters                                                       */

static const char *jtype_desc(const struct router_json *v)
{
    switch (v->type) {
    case ROUTER_JSON_OBJECT:
        return "an object";
    case ROUTER_JSON_ARRAY:
        return "an array";
    case ROUTER_JSON_STRING:
        return "a string";
    case ROUTER_JSON_INT:
        return "an integer";
    case ROUTER_JSON_REAL:
        return "a decimal";
    case ROUTER_JSON_TRUE:
    case ROUTER_JSON_FALSE:
        return "a boolean";
    case ROUTER_JSON_NULL:
        break;
    }
    return "null";
}

/* A string value's bytes (NUL-terminated) and length; NULL and 0 for anything else. */
static const char *jv_str(const struct router_json *v)
{
    return router_json_is_string(v) ? v->u.s : NULL;
}

static size_t jv_len(const struct router_json *v)
{
    return router_json_is_string(v) ? v->n : 0;
}

static int64_t jv_int(const struct router_json *v)
{
    return router_json_is_int(v) ? v->u.i : 0;
}

/* Formats a parameter path such as "messages[3].content" into buf (ROUTER_OPENAI_PARAM_MAX
 * bytes) and returns buf. Called only once an error is certain: the happy path formats
 * nothing (it was a fifth of the parse time). */
__attribute__((format(printf, 2, 3))) static const char *pname(char *buf, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, ROUTER_OPENAI_PARAM_MAX, fmt, ap);
    va_end(ap);
    return buf;
}

/* The member, or NULL when it is absent or null (OpenAI treats null as "not given"). */
static const struct router_json *opt(const struct router_json *obj, const char *key)
{
    const struct router_json *v = router_json_get(obj, key);
    return router_json_is_null(v) ? NULL : v;
}

static bool type_error(struct router_openai_error *err, const char *param, const char *expected,
                       const struct router_json *got)
{
    router_openai_err_param(err, param, "invalid_type",
                            "Invalid type for '%s': expected %s, but got %s instead.", param,
                            expected, jtype_desc(got));
    return false;
}

/* A number in [lo, hi]; *have false when absent. */
static bool get_number(struct router_openai_error *err, const struct router_json *obj,
                       const char *key, double lo, double hi, bool *have, double *out)
{
    const struct router_json *v = opt(obj, key);
    *have = false;
    if (v == NULL)
        return true;
    if (!router_json_is_number(v))
        return type_error(err, key, "a number", v);
    double d = router_json_number(v);
    if (d < lo) {
        router_openai_err_param(err, key, "decimal_below_min_value",
                                "Invalid '%s': decimal below minimum value. Expected a value "
                                ">= %g, but got %g instead.",
                                key, lo, d);
        return false;
    }
    if (d > hi) {
        router_openai_err_param(err, key, "decimal_above_max_value",
                                "Invalid '%s': decimal above maximum value. Expected a value "
                                "<= %g, but got %g instead.",
                                key, hi, d);
        return false;
    }
    *have = true;
    *out = d;
    return true;
}

static bool check_int_range(struct router_openai_error *err, const char *param, int64_t i,
                            int64_t lo, int64_t hi)
{
    if (i < lo) {
        router_openai_err_param(err, param, "integer_below_min_value",
                                "Invalid '%s': integer below minimum value. Expected a value "
                                ">= %" PRId64 ", but got %" PRId64 " instead.",
                                param, lo, i);
        return false;
    }
    if (i > hi) {
        router_openai_err_param(err, param, "integer_above_max_value",
                                "Invalid '%s': integer above maximum value. Expected a value "
                                "<= %" PRId64 ", but got %" PRId64 " instead.",
                                param, hi, i);
        return false;
    }
    return true;
}

static bool get_int(struct router_openai_error *err, const struct router_json *obj, const char *key,
                    int64_t lo, int64_t hi, bool *have, int64_t *out)
{
    const struct router_json *v = opt(obj, key);
    *have = false;
    if (v == NULL)
        return true;
    if (!router_json_is_int(v))
        return type_error(err, key, "an integer", v);
    int64_t i = jv_int(v);
    if (!check_int_range(err, key, i, lo, hi))
        return false;
    *have = true;
    *out = i;
    return true;
}

static bool get_bool(struct router_openai_error *err, const struct router_json *obj,
                     const char *key, bool *out)
{
    const struct router_json *v = opt(obj, key);
    if (v == NULL)
        return true;
    if (!router_json_is_bool(v))
        return type_error(err, key, "a boolean", v);
    *out = router_json_is_true(v);
    return true;
}

/* A string member; *out NULL when absent. */
static bool get_string(struct router_openai_error *err, const struct router_json *obj,
                       const char *key, const char **out)
{
    const struct router_json *v = opt(obj, key);
    *out = NULL;
    if (v == NULL)
        return true;
    if (!router_json_is_string(v))
        return type_error(err, key, "a string", v);
    *out = jv_str(v);
    return true;
}

static bool string_too_long(struct router_openai_error *err, const char *param, size_t max,
                            size_t got)
{
    router_openai_err_param(err, param, "string_above_max_length",
                            "Invalid '%s': string too long. Expected a string with maximum "
                            "length %zu, but got a string with length %zu instead.",
                            param, max, got);
    return false;
}

static bool array_too_long(struct router_openai_error *err, const char *param, size_t max,
                           size_t got)
{
    router_openai_err_param(err, param, "array_above_max_length",
                            "Invalid '%s': array too long. Expected an array with maximum "
                            "length %zu, but got an array with length %zu instead.",
                            param, max, got);
    return false;
}

static bool empty_array(struct router_openai_error *err, const char *param)
{
    router_openai_err_param(err, param, "empty_array",
                            "Invalid '%s': empty array. Expected an array with minimum length "
                            "1, but got an empty array instead.",
                            param);
    return false;
}

static bool missing(struct router_openai_error *err, const char *param)
{
    router_openai_err_param(err, param, "missing_required_parameter",
                            "Missing required parameter: '%s'.", param);
    return false;
}

static bool unsupported(struct router_openai_error *err, const char *param)
{
    router_openai_err_param(err, param, "unsupported_parameter",
                            "Unsupported parameter: '%s' is not supported by this server.", param);
    return false;
}

/* Fields refused whenever they are present and not null. */
static bool reject_present(struct router_openai_error *err, const struct router_json *obj,
                           const char *const *keys)
{
    for (size_t i = 0; keys[i] != NULL; i++) {
        if (opt(obj, keys[i]) != NULL)
            return unsupported(err, keys[i]);
    }
    return true;
}

/* ------------------------------------------------------------------------------------ */
/* Request parsing: the body                                                            */

/* Longest nesting of [ and { outside strings; stops counting past max. */
static bool depth_ok(const char *p, size_t len, int max)
{
    int depth = 0;
    bool in_str = false;
    for (size_t i = 0; i < len; i++) {
        char c = p[i];
        if (in_str) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = false;
        } else if (c == '"') {
            in_str = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max)
                return false;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return true;
}

/*
 * Parses the body into a tree in arena a (the caller's, deinit'd by the caller). NULL with
 * *err and *rc set when it is not a JSON object: PW_ERR_PARSE (400) or PW_ERR_NOMEM (500).
 */
static const struct router_json *load_body(const char *body, size_t len,
                                           struct router_json_arena *a,
                                           struct router_openai_error *err, enum pw_err *rc)
{
    *rc = PW_ERR_PARSE;
    if (body == NULL || len == 0) {
        router_openai_err_invalid_json(err, "the body is empty");
        return NULL;
    }
    const struct router_json *root = NULL;
    struct router_json_error je;
    enum pw_err e = router_json_parse(body, len, ROUTER_OPENAI_JSON_DEPTH_MAX, a, &root, &je);
    if (e != PW_OK) {
        /* Nesting wins over any other fault, wherever in the body it is: a syntax error
         * before the deep part must not change the answer (the nesting check used to be
         * a pre-scan of the whole body, and a valid prefix nests the same either way). */
        if (je.too_deep || !depth_ok(body, len, ROUTER_OPENAI_JSON_DEPTH_MAX)) {
            char detail[96];
            snprintf(detail, sizeof(detail), "nesting deeper than %d levels",
                     ROUTER_OPENAI_JSON_DEPTH_MAX);
            router_openai_err_invalid_json(err, detail);
        } else if (e == PW_ERR_NOMEM) {
            *rc = PW_ERR_NOMEM;
            router_openai_err_internal(err);
        } else {
            char detail[160];
            snprintf(detail, sizeof(detail), "%s at line %d column %d", je.text, je.line,
                     je.column);
            router_openai_err_invalid_json(err, detail);
        }
        return NULL;
    }
    if (!router_json_is_object(root)) {
        router_openai_err_param(err, NULL, "invalid_type",
                                "Invalid type for the request body: expected an object, but "
                                "got %s instead.",
                                jtype_desc(root));
        return NULL;
    }
    return root;
}

/* Everything parsed from a body, borrowed from the body's router_json tree (its arena lives
 * for the parse call), before protobufs exist. Protobuf strings are malloc'd copies. */
struct parsed {
    enum router_openai_kind kind;
    const char *model;
    Parkway__SamplingParams sp; /* stop points into stops[] */
    char *stops[PW_PROTO_STOP_MAX];
    bool stream, include_usage, echo;
    const struct router_json *messages; /* CHAT: validated array */
    const struct router_json
        *prompts; /* COMPLETION: array of prompts (string or int array), or NULL */
    const struct router_json *prompt1; /* COMPLETION: the single prompt when not a list */
};

static bool parse_stop(struct router_openai_error *err, const struct router_json *root,
                       struct parsed *p)
{
    const struct router_json *v = opt(root, "stop");
    p->sp.stop = p->stops;
    p->sp.n_stop = 0;
    if (v == NULL)
        return true;
    if (router_json_is_string(v)) {
        size_t n = jv_len(v);
        if (n > PW_PROTO_STOP_LEN_MAX)
            return string_too_long(err, "stop", PW_PROTO_STOP_LEN_MAX, n);
        if (n > 0)
            p->stops[p->sp.n_stop++] = (char *)jv_str(v);
        return true;
    }
    if (!router_json_is_array(v))
        return type_error(err, "stop", "a string or an array of strings", v);
    if (router_json_size(v) > PW_PROTO_STOP_MAX)
        return array_too_long(err, "stop", PW_PROTO_STOP_MAX, router_json_size(v));
    for (size_t i = 0; i < router_json_size(v); i++) {
        const struct router_json *s = router_json_at(v, i);
        char param[ROUTER_OPENAI_PARAM_MAX];
        if (!router_json_is_string(s))
            return type_error(err, pname(param, "stop[%zu]", i), "a string", s);
        size_t n = jv_len(s);
        if (n > PW_PROTO_STOP_LEN_MAX)
            return string_too_long(err, pname(param, "stop[%zu]", i), PW_PROTO_STOP_LEN_MAX, n);
        if (n > 0) /* an empty stop string could never end anything: dropped */
            p->stops[p->sp.n_stop++] = (char *)jv_str(s);
    }
    return true;
}

#define MARK(p, f) pw_proto_sampling_mark(&(p)->sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_##f)

/* Fields shared by both endpoints. */
static bool parse_common(struct router_openai_error *err, const struct router_json *root,
                         const struct router_openai_ctx *ctx, struct parsed *p)
{
    bool have;
    double d;
    int64_t i;

    const struct router_json *model = router_json_get(root, "model");
    if (model == NULL || router_json_is_null(model))
        return missing(err, "model");
    if (!router_json_is_string(model))
        return type_error(err, "model", "a string", model);
    size_t mlen = jv_len(model);
    if (mlen == 0) {
        router_openai_err_param(err, "model", "invalid_value",
                                "Invalid 'model': empty string. Expected a model name.");
        return false;
    }
    if (mlen > ROUTER_OPENAI_MODEL_MAX)
        return string_too_long(err, "model", ROUTER_OPENAI_MODEL_MAX, mlen);
    if (strlen(jv_str(model)) != mlen) { /* router_json refuses \u0000 already */
        router_openai_err_param(err, "model", "invalid_value",
                                "Invalid 'model': contains a NUL character.");
        return false;
    }
    p->model = jv_str(model);

    if (!get_number(err, root, "temperature", 0, 2, &have, &d))
        return false;
    if (have) {
        p->sp.temperature = (float)d;
        MARK(p, TEMPERATURE);
    }
    if (!get_number(err, root, "top_p", 0, 1, &have, &d))
        return false;
    if (have) {
        /* OpenAI takes top_p 0; the engine wants (0, 1]: a tiny p keeps the top token. */
        p->sp.top_p = d > 0 ? (float)d : 1e-6f;
        MARK(p, TOP_P);
    }
    if (!get_int(err, root, "n", 1, PW_PROTO_N_MAX, &have, &i))
        return false;
    if (have) {
        p->sp.n = (uint32_t)i;
        MARK(p, N);
    }
    if (!parse_stop(err, root, p))
        return false;
    if (!get_int(err, root, "seed", INT64_MIN, INT64_MAX, &have, &i))
        return false;
    if (have) {
        p->sp.seed = (uint64_t)i;
        MARK(p, SEED);
    } else {
        p->sp.seed = ctx->seed;
    }
    if (!get_number(err, root, "presence_penalty", -2, 2, &have, &d))
        return false;
    if (have) {
        p->sp.presence_penalty = (float)d;
        MARK(p, PRESENCE_PENALTY);
    }
    if (!get_number(err, root, "frequency_penalty", -2, 2, &have, &d))
        return false;
    if (have) {
        p->sp.frequency_penalty = (float)d;
        MARK(p, FREQUENCY_PENALTY);
    }

    /* extensions (vLLM's names) */
    if (!get_int(err, root, "top_k", 0, INT32_MAX, &have, &i))
        return false;
    if (have) {
        p->sp.top_k = (uint32_t)i;
        MARK(p, TOP_K);
    }
    if (!get_number(err, root, "min_p", 0, 1, &have, &d))
        return false;
    if (have) {
        p->sp.min_p = (float)d;
        MARK(p, MIN_P);
    }
    if (!get_number(err, root, "repetition_penalty", 0, 10, &have, &d))
        return false;
    if (have) {
        if (d <= 0) {
            router_openai_err_param(err, "repetition_penalty", "decimal_below_min_value",
                                    "Invalid 'repetition_penalty': decimal below minimum "
                                    "value. Expected a value > 0, but got %g instead.",
                                    d);
            return false;
        }
        p->sp.repetition_penalty = (float)d;
        MARK(p, REPETITION_PENALTY);
    }
    bool ignore_eos = false;
    if (!get_bool(err, root, "ignore_eos", &ignore_eos))
        return false;
    p->sp.ignore_eos = ignore_eos;

    if (!get_bool(err, root, "stream", &p->stream))
        return false;
    const struct router_json *so = opt(root, "stream_options");
    if (so != NULL) {
        if (!router_json_is_object(so))
            return type_error(err, "stream_options", "an object", so);
        if (!p->stream) {
            router_openai_err_param(err, "stream_options", "invalid_value",
                                    "The 'stream_options' parameter is only allowed when "
                                    "'stream' is enabled.");
            return false;
        }
        const struct router_json *iu = opt(so, "include_usage");
        if (iu != NULL && !router_json_is_bool(iu))
            return type_error(err, "stream_options.include_usage", "a boolean", iu);
        p->include_usage = router_json_is_true(iu);
    }

    /* accepted and ignored, but typed like OpenAI types them */
    const char *user;
    if (!get_string(err, root, "user", &user))
        return false;
    const struct router_json *lb = opt(root, "logit_bias");
    if (lb != NULL) {
        if (!router_json_is_object(lb))
            return type_error(err, "logit_bias", "an object", lb);
        if (router_json_size(lb) > 0)
            return unsupported(err, "logit_bias");
    }
    return true;
}

/* One chat message's content: a string, or an array of text parts joined by "\n". */
static bool parse_content(struct router_openai_error *err, const struct router_json *msg, size_t mi,
                          bool assistant)
{
    char param[ROUTER_OPENAI_PARAM_MAX];
    const struct router_json *c = router_json_get(msg, "content");
    if (c == NULL || router_json_is_null(c)) {
        if (assistant) /* an assistant turn may carry no text */
            return true;
        return missing(err, pname(param, "messages[%zu].content", mi));
    }
    if (router_json_is_string(c))
        return true;
    if (!router_json_is_array(c))
        return type_error(err, pname(param, "messages[%zu].content", mi),
                          "a string or an array of content parts", c);
    if (router_json_size(c) == 0)
        return empty_array(err, pname(param, "messages[%zu].content", mi));
    for (size_t j = 0; j < router_json_size(c); j++) {
        const struct router_json *part = router_json_at(c, j);
        if (!router_json_is_object(part))
            return type_error(err, pname(param, "messages[%zu].content[%zu]", mi, j), "an object",
                              part);
        const struct router_json *type = router_json_get(part, "type");
        if (type == NULL || router_json_is_null(type))
            return missing(err, pname(param, "messages[%zu].content[%zu].type", mi, j));
        if (!router_json_is_string(type))
            return type_error(err, pname(param, "messages[%zu].content[%zu].type", mi, j),
                              "a string", type);
        if (strcmp(jv_str(type), "text") != 0) {
            char q[OAI_QUOTE_MAX + 1];
            copy_cut(q, sizeof(q), jv_str(type));
            router_openai_err_param(err, pname(param, "messages[%zu].content[%zu].type", mi, j),
                                    "unsupported_value",
                                    "Unsupported content part type: '%s'. Only 'text' parts "
                                    "are supported; this server does not take images, audio "
                                    "or files.",
                                    q);
            return false;
        }
        const struct router_json *text = router_json_get(part, "text");
        if (text == NULL || router_json_is_null(text))
            return missing(err, pname(param, "messages[%zu].content[%zu].text", mi, j));
        if (!router_json_is_string(text))
            return type_error(err, pname(param, "messages[%zu].content[%zu].text", mi, j),
                              "a string", text);
    }
    return true;
}

/* Maps the role to what the engine gets; NULL with *err set if refused. */
static const char *parse_role(struct router_openai_error *err, const struct router_json *msg,
                              size_t mi)
{
    char param[ROUTER_OPENAI_PARAM_MAX];
    const struct router_json *r = router_json_get(msg, "role");
    if (r == NULL || router_json_is_null(r)) {
        missing(err, pname(param, "messages[%zu].role", mi));
        return NULL;
    }
    if (!router_json_is_string(r)) {
        type_error(err, pname(param, "messages[%zu].role", mi), "a string", r);
        return NULL;
    }
    const char *role = jv_str(r);
    if (strcmp(role, "system") == 0 || strcmp(role, "developer") == 0)
        return "system"; /* developer is the newer name of system; templates know system */
    if (strcmp(role, "user") == 0 || strcmp(role, "assistant") == 0)
        return role;
    pname(param, "messages[%zu].role", mi);
    char q[OAI_QUOTE_MAX + 1];
    copy_cut(q, sizeof(q), role);
    if (strcmp(role, "tool") == 0 || strcmp(role, "function") == 0) {
        router_openai_err_param(err, param, "unsupported_value",
                                "Unsupported value: '%s' messages are not supported, since "
                                "this server does not support tools or function calling.",
                                q);
        return NULL;
    }
    router_openai_err_param(err, param, "invalid_value",
                            "Invalid value: '%s'. Supported values are: 'system', "
                            "'developer', 'user', and 'assistant'.",
                            q);
    return NULL;
}

static bool parse_messages(struct router_openai_error *err, const struct router_json *root,
                           struct parsed *p)
{
    const struct router_json *msgs = router_json_get(root, "messages");
    if (msgs == NULL || router_json_is_null(msgs))
        return missing(err, "messages");
    if (!router_json_is_array(msgs))
        return type_error(err, "messages", "an array", msgs);
    size_t n = router_json_size(msgs);
    if (n == 0)
        return empty_array(err, "messages");
    if (n > PW_PROTO_MESSAGES_MAX)
        return array_too_long(err, "messages", PW_PROTO_MESSAGES_MAX, n);
    for (size_t i = 0; i < n; i++) {
        const struct router_json *m = router_json_at(msgs, i);
        char param[ROUTER_OPENAI_PARAM_MAX];
        if (!router_json_is_object(m))
            return type_error(err, pname(param, "messages[%zu]", i), "an object", m);
        const char *role = parse_role(err, m, i);
        if (role == NULL)
            return false;
        if (!parse_content(err, m, i, strcmp(role, "assistant") == 0))
            return false;
        const struct router_json *name = opt(m, "name");
        if (name != NULL && !router_json_is_string(name))
            return type_error(err, pname(param, "messages[%zu].name", i), "a string", name);
        if (name != NULL && jv_len(name) > PW_PROTO_ID_MAX)
            return string_too_long(err, pname(param, "messages[%zu].name", i), PW_PROTO_ID_MAX,
                                   jv_len(name));
        static const char *const refused[] = {"tool_calls", "function_call", "audio", NULL};
        for (size_t k = 0; refused[k] != NULL; k++) {
            if (opt(m, refused[k]) != NULL) {
                return unsupported(err, pname(param, "messages[%zu].%s", i, refused[k]));
            }
        }
    }
    p->messages = msgs;
    return true;
}

static bool parse_chat_fields(struct router_openai_error *err, const struct router_json *root,
                              struct parsed *p)
{
    static const char *const refused[] = {"tools",
                                          "tool_choice",
                                          "functions",
                                          "function_call",
                                          "audio",
                                          "prediction",
                                          "parallel_tool_calls",
                                          "reasoning_effort",
                                          "verbosity",
                                          "web_search_options",
                                          NULL};
    if (!reject_present(err, root, refused))
        return false;
    const struct router_json *rf = opt(root, "response_format");
    if (rf != NULL) {
        if (!router_json_is_object(rf))
            return type_error(err, "response_format", "an object", rf);
        const struct router_json *t = router_json_get(rf, "type");
        if (t == NULL || router_json_is_null(t))
            return missing(err, "response_format.type");
        if (!router_json_is_string(t))
            return type_error(err, "response_format.type", "a string", t);
        if (strcmp(jv_str(t), "text") != 0) {
            char q[OAI_QUOTE_MAX + 1];
            copy_cut(q, sizeof(q), jv_str(t));
            router_openai_err_param(err, "response_format.type", "unsupported_value",
                                    "Unsupported value: 'response_format.type' does not "
                                    "support '%s' on this server. Supported values are: "
                                    "'text'.",
                                    q);
            return false;
        }
    }
    const struct router_json *mod = opt(root, "modalities");
    if (mod != NULL) {
        if (!router_json_is_array(mod))
            return type_error(err, "modalities", "an array", mod);
        for (size_t i = 0; i < router_json_size(mod); i++) {
            const struct router_json *m = router_json_at(mod, i);
            char param[ROUTER_OPENAI_PARAM_MAX];
            if (!router_json_is_string(m))
                return type_error(err, pname(param, "modalities[%zu]", i), "a string", m);
            if (strcmp(jv_str(m), "text") != 0) {
                router_openai_err_param(err, pname(param, "modalities[%zu]", i),
                                        "unsupported_value",
                                        "Unsupported value: only the 'text' modality is "
                                        "supported by this server.");
                return false;
            }
        }
    }
    bool store = false;
    if (!get_bool(err, root, "store", &store))
        return false;
    const struct router_json *meta = opt(root, "metadata");
    if (meta != NULL && !router_json_is_object(meta))
        return type_error(err, "metadata", "an object", meta);

    bool have_mt, have_mct;
    int64_t mt = 0, mct = 0;
    if (!get_int(err, root, "max_tokens", 1, PW_PROTO_MAX_TOKENS_MAX, &have_mt, &mt))
        return false;
    if (!get_int(err, root, "max_completion_tokens", 1, PW_PROTO_MAX_TOKENS_MAX, &have_mct, &mct))
        return false;
    if (have_mt && have_mct && mt != mct) {
        router_openai_err_param(err, "max_tokens", "invalid_value",
                                "'max_tokens' and 'max_completion_tokens' were both given, "
                                "with different values. 'max_tokens' is the deprecated name "
                                "of 'max_completion_tokens': give only one.");
        return false;
    }
    if (have_mt || have_mct) {
        p->sp.max_tokens = (uint32_t)(have_mct ? mct : mt);
        MARK(p, MAX_TOKENS);
    }

    bool logprobs = false;
    if (!get_bool(err, root, "logprobs", &logprobs))
        return false;
    p->sp.logprobs = logprobs;
    bool have;
    int64_t tl;
    if (!get_int(err, root, "top_logprobs", 0, PW_PROTO_TOP_LOGPROBS_MAX, &have, &tl))
        return false;
    if (have) {
        if (!logprobs) {
            router_openai_err_param(err, "top_logprobs", "invalid_value",
                                    "Invalid value for 'top_logprobs': 'logprobs' must be set "
                                    "to true when 'top_logprobs' is given.");
            return false;
        }
        p->sp.top_logprobs = (uint32_t)tl;
        MARK(p, TOP_LOGPROBS);
    }
    return parse_messages(err, root, p);
}

/* One prompt of /v1/completions: a string or a non-empty array of token ids. */
static bool check_prompt(struct router_openai_error *err, const struct router_json *v,
                         const char *param, bool allow_string)
{
    if (router_json_is_string(v) && allow_string)
        return true;
    if (!router_json_is_array(v))
        return type_error(err, param, allow_string ? "a string or an array" : "an array", v);
    size_t n = router_json_size(v);
    if (n == 0)
        return empty_array(err, param);
    if (n > PW_PROTO_PROMPT_TOKENS_MAX)
        return array_too_long(err, param, PW_PROTO_PROMPT_TOKENS_MAX, n);
    for (size_t i = 0; i < n; i++) {
        const struct router_json *t = router_json_at(v, i);
        if (router_json_is_int(t) && t->u.i >= 0 && t->u.i <= INT32_MAX)
            continue; /* the common case: no parameter name to format */
        char p2[ROUTER_OPENAI_PARAM_MAX + 24];
        snprintf(p2, sizeof(p2), "%s[%zu]", param, i);
        if (!router_json_is_int(t))
            return type_error(err, p2, "an integer", t);
        if (!check_int_range(err, p2, jv_int(t), 0, INT32_MAX))
            return false;
    }
    return true;
}

static bool parse_completion_fields(struct router_openai_error *err, const struct router_json *root,
                                    struct parsed *p)
{
    const char *suffix;
    if (!get_string(err, root, "suffix", &suffix))
        return false;
    if (suffix != NULL && suffix[0] != '\0')
        return unsupported(err, "suffix");

    bool have;
    int64_t i;
    if (!get_int(err, root, "max_tokens", 1, PW_PROTO_MAX_TOKENS_MAX, &have, &i))
        return false;
    p->sp.max_tokens = have ? (uint32_t)i : ROUTER_OPENAI_COMPLETION_DEFAULT_MAX_TOKENS;
    MARK(p, MAX_TOKENS);

    uint32_t n =
        pw_proto_sampling_has(&p->sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N) ? p->sp.n : 1;
    if (!get_int(err, root, "best_of", 1, INT32_MAX, &have, &i))
        return false;
    if (have && (uint32_t)i != n) {
        router_openai_err_param(err, "best_of", "unsupported_value",
                                "Unsupported value: 'best_of' must equal 'n' (%" PRIu32
                                ") on this server; it does not rank extra candidates.",
                                n);
        return false;
    }
    if (!get_bool(err, root, "echo", &p->echo))
        return false;
    if (!get_int(err, root, "logprobs", 0, 5, &have, &i))
        return false;
    if (have) {
        p->sp.logprobs = true;
        p->sp.top_logprobs = (uint32_t)i;
        MARK(p, TOP_LOGPROBS);
    }

    const struct router_json *pr = router_json_get(root, "prompt");
    if (pr == NULL || router_json_is_null(pr))
        return missing(err, "prompt");
    if (router_json_is_string(pr)) {
        p->prompt1 = pr;
        return true;
    }
    if (!router_json_is_array(pr))
        return type_error(err, "prompt", "a string or an array", pr);
    size_t np = router_json_size(pr);
    if (np == 0)
        return empty_array(err, "prompt");
    const struct router_json *first = router_json_at(pr, 0);
    if (router_json_is_int(first)) { /* one prompt of token ids */
        if (!check_prompt(err, pr, "prompt", false))
            return false;
        p->prompt1 = pr;
        return true;
    }
    if (np > ROUTER_OPENAI_PROMPTS_MAX)
        return array_too_long(err, "prompt", ROUTER_OPENAI_PROMPTS_MAX, np);
    bool strings = router_json_is_string(first);
    for (size_t k = 0; k < np; k++) {
        const struct router_json *e = router_json_at(pr, k);
        char param[ROUTER_OPENAI_PARAM_MAX];
        if (strings && !router_json_is_string(e))
            return type_error(err, pname(param, "prompt[%zu]", k), "a string", e);
        if (!strings && !check_prompt(err, e, pname(param, "prompt[%zu]", k), false))
            return false;
    }
    p->prompts = pr;
    return true;
}

/* ------------------------------------------------------------------------------------ */
/* Request parsing: building the protobufs                                              */

static bool ctx_ok(const struct router_openai_ctx *ctx)
{
    if (ctx == NULL || ctx->request_id == NULL || ctx->reply_to == NULL || ctx->reply_to[0] == '\0')
        return false;
    size_t n = strlen(ctx->request_id);
    return n > 0 && n <= ROUTER_OPENAI_REQUEST_ID_MAX && strchr(ctx->request_id, '.') == NULL;
}

static int64_t deadline_of(const struct router_openai_ctx *ctx)
{
    int64_t d = ctx->deadline_ms > 0 ? ctx->deadline_ms : ctx->default_deadline_ms;
    if (ctx->max_deadline_ms > 0 && (d <= 0 || d > ctx->max_deadline_ms))
        d = ctx->max_deadline_ms;
    return d > 0 ? ctx->now_unix_ms + d : 0;
}

/* A new request with everything but the prompt or messages; NULL on out of memory. */
static Parkway__InferenceRequest *req_new(const struct parsed *p,
                                          const struct router_openai_ctx *ctx, const char *id)
{
    Parkway__InferenceRequest *r = malloc(sizeof(*r));
    if (r == NULL)
        return NULL;
    parkway__inference_request__init(r);
    Parkway__SamplingParams *sp = malloc(sizeof(*sp));
    if (sp == NULL) {
        free(r);
        return NULL;
    }
    *sp = p->sp;
    sp->stop = NULL;
    sp->n_stop = 0;
    r->sampling = sp; /* owned from here: pw_proto_free_request cleans up on failure */
    if (p->sp.n_stop > 0) {
        sp->stop = calloc(p->sp.n_stop, sizeof(char *));
        if (sp->stop == NULL)
            goto fail;
        for (size_t i = 0; i < p->sp.n_stop; i++) {
            sp->stop[i] = sdup(p->sp.stop[i]);
            if (sp->stop[i] == NULL)
                goto fail;
            sp->n_stop = i + 1;
        }
    }
    r->kind = p->kind == ROUTER_OPENAI_CHAT ? PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT
                                            : PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    r->stream = p->stream;
    r->include_usage = p->include_usage;
    r->echo = p->echo;
    r->deadline_unix_ms = deadline_of(ctx);
    r->enqueued_unix_ms = ctx->now_unix_ms;
    /* string fields are set one by one, so a failure leaves the rest at their defaults */
    char *s;
    if ((s = sdup(id)) == NULL)
        goto fail;
    r->id = s;
    if ((s = sdup(p->model)) == NULL)
        goto fail;
    r->function = s;
    if ((s = sdup(ctx->tenant)) == NULL)
        goto fail;
    r->tenant = s;
    if ((s = sdup(ctx->key_id)) == NULL)
        goto fail;
    r->key_id = s;
    if ((s = sdup(ctx->reply_to)) == NULL)
        goto fail;
    r->reply_to = s;
    return r;
fail:
    pw_proto_free_request(r);
    return NULL;
}

/* Flattens a validated content value into a new string ("" for null). */
static char *content_text(const struct router_json *c)
{
    if (c == NULL || router_json_is_null(c))
        return sdup("");
    if (router_json_is_string(c)) {
        size_t n = jv_len(c);
        char *s = malloc(n + 1);
        if (s != NULL)
            memcpy(s, jv_str(c), n + 1);
        return s;
    }
    size_t total = 0;
    for (size_t j = 0; j < router_json_size(c); j++)
        total += jv_len(router_json_get(router_json_at(c, j), "text")) + 1;
    char *s = malloc(total + 1);
    if (s == NULL)
        return NULL;
    size_t o = 0;
    for (size_t j = 0; j < router_json_size(c); j++) {
        const struct router_json *t = router_json_get(router_json_at(c, j), "text");
        if (j > 0)
            s[o++] = '\n';
        memcpy(s + o, jv_str(t), jv_len(t));
        o += jv_len(t);
    }
    s[o] = '\0';
    return s;
}

static bool add_messages(Parkway__InferenceRequest *r, const struct router_json *msgs)
{
    size_t n = router_json_size(msgs);
    r->messages = calloc(n, sizeof(*r->messages));
    if (r->messages == NULL)
        return false;
    for (size_t i = 0; i < n; i++) {
        const struct router_json *m = router_json_at(msgs, i);
        Parkway__ChatMessage *cm = malloc(sizeof(*cm));
        if (cm == NULL)
            return false;
        parkway__chat_message__init(cm);
        r->messages[i] = cm;
        r->n_messages = i + 1;
        const char *role = jv_str(router_json_get(m, "role"));
        if (strcmp(role, "developer") == 0)
            role = "system";
        char *s;
        if ((s = sdup(role)) == NULL)
            return false;
        cm->role = s;
        if ((s = content_text(router_json_get(m, "content"))) == NULL)
            return false;
        cm->content = s;
        const struct router_json *name = opt(m, "name");
        if (name != NULL) {
            if ((s = sdup(jv_str(name))) == NULL)
                return false;
            cm->name = s;
        }
    }
    return true;
}

static bool set_prompt(Parkway__InferenceRequest *r, const struct router_json *pr)
{
    if (router_json_is_string(pr)) {
        size_t n = jv_len(pr);
        char *s = malloc(n + 1);
        if (s == NULL)
            return false;
        memcpy(s, jv_str(pr), n + 1);
        r->prompt = s;
        return true;
    }
    size_t n = router_json_size(pr);
    r->prompt_token_ids = malloc(n * sizeof(uint32_t));
    if (r->prompt_token_ids == NULL)
        return false;
    for (size_t i = 0; i < n; i++)
        r->prompt_token_ids[i] = (uint32_t)jv_int(router_json_at(pr, i));
    r->n_prompt_token_ids = n;
    return true;
}

/* Runs the model check and pw_proto's own checks; false with *err set. */
static bool final_checks(const struct router_openai_ctx *ctx, const struct parsed *p,
                         Parkway__InferenceRequest *const *reqs, size_t n,
                         struct router_openai_error *err)
{
    for (size_t k = 0; k < n; k++) {
        const char *why = NULL;
        if (pw_proto_check_request(reqs[k], &why) != PW_OK) {
            router_openai_err_param(err, NULL, "invalid_value", "Invalid request: %s.",
                                    why != NULL ? why : "refused by the wire format checks");
            return false;
        }
    }
    if (ctx->model_check != NULL) {
        switch (ctx->model_check(ctx->model_check_arg, p->model)) {
        case ROUTER_OPENAI_MODEL_OK:
            break;
        case ROUTER_OPENAI_MODEL_DENIED:
            router_openai_err_model_denied(err, p->model);
            return false;
        case ROUTER_OPENAI_MODEL_NOT_FOUND:
        default:
            router_openai_err_model_not_found(err, p->model);
            return false;
        }
    }
    return true;
}

static void parsed_init(struct parsed *p, enum router_openai_kind kind)
{
    memset(p, 0, sizeof(*p));
    p->kind = kind;
    parkway__sampling_params__init(&p->sp);
}

enum pw_err router_openai_parse_chat(const char *body, size_t len,
                                     const struct router_openai_ctx *ctx,
                                     Parkway__InferenceRequest **out,
                                     struct router_openai_error *err)
{
    PW_ASSERT(out != NULL && err != NULL);
    *out = NULL;
    memset(err, 0, sizeof(*err));
    if (!ctx_ok(ctx)) {
        router_openai_err_internal(err);
        return PW_ERR_INVAL;
    }
    enum pw_err rc = PW_ERR_PARSE;
    Parkway__InferenceRequest *r = NULL;
    struct parsed p;
    parsed_init(&p, ROUTER_OPENAI_CHAT);
    char abuf[OAI_ARENA_STACK];
    struct router_json_arena arena;
    router_json_arena_init(&arena, abuf, sizeof(abuf));
    const struct router_json *root = load_body(body, len, &arena, err, &rc);
    if (root == NULL)
        goto out;
    if (!parse_common(err, root, ctx, &p) || !parse_chat_fields(err, root, &p))
        goto out;
    r = req_new(&p, ctx, ctx->request_id);
    if (r == NULL || !add_messages(r, p.messages)) {
        rc = PW_ERR_NOMEM;
        router_openai_err_internal(err);
        goto out;
    }
    if (!final_checks(ctx, &p, &r, 1, err))
        goto out;
    *out = r;
    r = NULL;
    rc = PW_OK;
out:
    pw_proto_free_request(r);
    router_json_arena_deinit(&arena);
    return rc;
}

void router_openai_requests_free(Parkway__InferenceRequest **reqs, size_t n)
{
    if (reqs == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        pw_proto_free_request(reqs[i]);
    free(reqs);
}

enum pw_err router_openai_parse_completion(const char *body, size_t len,
                                           const struct router_openai_ctx *ctx,
                                           Parkway__InferenceRequest ***out, size_t *n_out,
                                           struct router_openai_error *err)
{
    PW_ASSERT(out != NULL && n_out != NULL && err != NULL);
    *out = NULL;
    *n_out = 0;
    memset(err, 0, sizeof(*err));
    if (!ctx_ok(ctx)) {
        router_openai_err_internal(err);
        return PW_ERR_INVAL;
    }
    enum pw_err rc = PW_ERR_PARSE;
    Parkway__InferenceRequest **reqs = NULL;
    size_t n = 0;
    struct parsed p;
    parsed_init(&p, ROUTER_OPENAI_COMPLETION);
    char abuf[OAI_ARENA_STACK];
    struct router_json_arena arena;
    router_json_arena_init(&arena, abuf, sizeof(abuf));
    const struct router_json *root = load_body(body, len, &arena, err, &rc);
    if (root == NULL)
        goto out;
    if (!parse_common(err, root, ctx, &p) || !parse_completion_fields(err, root, &p))
        goto out;
    size_t np = p.prompts != NULL ? router_json_size(p.prompts) : 1;
    reqs = calloc(np, sizeof(*reqs));
    if (reqs == NULL)
        goto nomem;
    for (size_t k = 0; k < np; k++) {
        char id[ROUTER_OPENAI_REQUEST_ID_MAX + 16];
        if (np == 1)
            snprintf(id, sizeof(id), "%s", ctx->request_id);
        else
            snprintf(id, sizeof(id), "%s.%zu", ctx->request_id, k);
        reqs[k] = req_new(&p, ctx, id);
        if (reqs[k] == NULL)
            goto nomem;
        n = k + 1;
        if (!set_prompt(reqs[k], p.prompts != NULL ? router_json_at(p.prompts, k) : p.prompt1))
            goto nomem;
    }
    if (!final_checks(ctx, &p, reqs, n, err))
        goto out;
    *out = reqs;
    *n_out = n;
    reqs = NULL;
    rc = PW_OK;
    goto out;
nomem:
    rc = PW_ERR_NOMEM;
    router_openai_err_internal(err);
out:
    router_openai_requests_free(reqs, n);
    router_json_arena_deinit(&arena);
    return rc;
}

/* ------------------------------------------------------------------------------------ */
/* Responses: shared state                                                              */

void router_openai_resp_from_request(struct router_openai_resp *r,
                                     const Parkway__InferenceRequest *req, const char *request_id,
                                     size_t n_parts, int64_t created)
{
    memset(r, 0, sizeof(*r));
    r->kind = req->kind == PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION ? ROUTER_OPENAI_COMPLETION
                                                                          : ROUTER_OPENAI_CHAT;
    r->request_id = request_id;
    r->model = req->function;
    r->created = created;
    r->n = pw_proto_sampling_has(req->sampling, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N)
               ? req->sampling->n
               : 1;
    r->n_parts = (uint32_t)n_parts;
    r->logprobs = req->sampling != NULL && req->sampling->logprobs;
    r->include_usage = req->include_usage;
}

struct oai_part {
    uint32_t attempt; /* highest attempt seen */
    int64_t last_seq; /* of that attempt; -1 = none yet */
    bool done;
};

struct oai_choice {
    struct router_sse_buf text; /* taken (acc) or sent (stream) so far */
    size_t n_tokens;            /* logprob entries taken or sent */
    size_t regen_bytes;         /* text bytes the current attempt has produced */
    size_t regen_tokens;        /* logprob entries the current attempt has produced */
    size_t lp_chars;            /* code points covered by taken tokens (text_offset) */
    json_t *lp;                 /* acc: chat array of entries, or completion object */
    Parkway__FinishReason finish;
    bool started; /* stream, chat: the role delta went out */
};

struct oai_resp {
    enum router_openai_kind kind;
    bool streaming;
    char *id; /* "chatcmpl-<base>" or "cmpl-<base>" */
    char *base_id;
    char *model;
    char *fingerprint; /* NULL = null */
    int64_t created;
    uint32_t n, n_parts;
    bool logprobs, include_usage;
    struct oai_part *parts;     /* n_parts */
    struct oai_choice *choices; /* n_parts * n */
    uint64_t prompt_tokens, completion_tokens, cached_tokens;
    bool finished, failed;
    struct router_openai_error error; /* when failed */
    uint64_t dropped;
    bool direct; /* the direct writer may print id, model and fingerprint (set at init) */
};

struct router_openai_acc {
    struct oai_resp r;
};

struct router_openai_stream {
    struct oai_resp r;
};

static void resp_deinit(struct oai_resp *r)
{
    if (r->choices != NULL) {
        for (size_t i = 0; i < (size_t)r->n * r->n_parts; i++) {
            router_sse_buf_deinit(&r->choices[i].text);
            json_decref(r->choices[i].lp);
        }
    }
    free(r->choices);
    free(r->parts);
    free(r->id);
    free(r->base_id);
    free(r->model);
    free(r->fingerprint);
}

/* router_openai_set_direct(): the direct JSON writer below, or always the jansson trees. */
static bool g_direct = true;

void router_openai_set_direct(bool on)
{
    g_direct = on;
}

static bool resp_init(struct oai_resp *r, const struct router_openai_resp *in, bool streaming)
{
    memset(r, 0, sizeof(*r));
    if (in == NULL || in->request_id == NULL || in->n == 0 || in->n > PW_PROTO_N_MAX ||
        in->n_parts == 0 || in->n_parts > ROUTER_OPENAI_PROMPTS_MAX)
        return false;
    r->kind = in->kind == ROUTER_OPENAI_COMPLETION ? ROUTER_OPENAI_COMPLETION : ROUTER_OPENAI_CHAT;
    r->streaming = streaming;
    r->created = in->created;
    r->n = in->n;
    r->n_parts = in->n_parts;
    r->logprobs = in->logprobs;
    r->include_usage = in->include_usage;
    const char *prefix = r->kind == ROUTER_OPENAI_CHAT ? "chatcmpl-" : "cmpl-";
    size_t idlen = strlen(prefix) + strlen(in->request_id) + 1;
    r->id = malloc(idlen);
    r->base_id = sdup(in->request_id);
    r->model = sdup(in->model);
    if (in->system_fingerprint != NULL)
        r->fingerprint = sdup(in->system_fingerprint);
    r->parts = calloc(r->n_parts, sizeof(*r->parts));
    r->choices = calloc((size_t)r->n * r->n_parts, sizeof(*r->choices));
    if (r->id == NULL || r->base_id == NULL || r->model == NULL || r->parts == NULL ||
        r->choices == NULL || (in->system_fingerprint != NULL && r->fingerprint == NULL))
        return false;
    snprintf(r->id, idlen, "%s%s", prefix, in->request_id);
    for (uint32_t k = 0; k < r->n_parts; k++)
        r->parts[k].last_seq = -1;
    /* The jansson trees refuse strings that are not UTF-8; the direct writer then stands
     * aside for them. */
    r->direct = g_direct && utf8_valid(r->id, strlen(r->id)) &&
                utf8_valid(r->model, strlen(r->model)) &&
                (r->fingerprint == NULL || utf8_valid(r->fingerprint, strlen(r->fingerprint)));
    return true;
}

/* Which part a chunk's request id names: "<base>" alone, or "<base>.<k>"; -1 if neither. */
static int part_of(const struct oai_resp *r, const char *id)
{
    if (id == NULL)
        return -1;
    size_t bl = strlen(r->base_id);
    if (strncmp(id, r->base_id, bl) != 0)
        return -1;
    if (r->n_parts == 1)
        return id[bl] == '\0' ? 0 : -1;
    if (id[bl] != '.')
        return -1;
    const char *d = id + bl + 1;
    size_t nd = strlen(d);
    if (nd == 0 || nd > 3 || (nd > 1 && d[0] == '0'))
        return -1;
    int k = 0;
    for (size_t i = 0; i < nd; i++) {
        if (d[i] < '0' || d[i] > '9')
            return -1;
        k = k * 10 + (d[i] - '0');
    }
    return k < (int)r->n_parts ? k : -1;
}

static const char *finish_name(Parkway__FinishReason f)
{
    return f == PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH ? "length" : "stop";
}

static json_t *jlogprob(float v)
{
    double d = v;
    if (!isfinite(d) || d < OAI_LOGPROB_FLOOR)
        d = OAI_LOGPROB_FLOOR;
    return json_real(d);
}

static json_t *jbytes(const ProtobufCBinaryData *b)
{
    json_t *a = json_array();
    for (size_t i = 0; a != NULL && i < b->len; i++) {
        if (!jappend(a, json_integer(b->data[i]))) {
            json_decref(a);
            return NULL;
        }
    }
    return a;
}

/* {"token","logprob","bytes"} plus, for the chosen token, "top_logprobs". */
static json_t *chat_lp_entry(const Parkway__TokenLogprob *t)
{
    json_t *e = json_object();
    json_t *tops = json_array();
    if (e == NULL || tops == NULL || !jset(e, "token", jstr(t->token)) ||
        !jset(e, "logprob", jlogprob(t->logprob)) || !jset(e, "bytes", jbytes(&t->bytes)))
        goto fail;
    for (size_t i = 0; i < t->n_top_logprobs; i++) {
        const Parkway__TopLogprob *a = t->top_logprobs[i];
        json_t *o = json_object();
        if (o == NULL || !jset(o, "token", jstr(a->token)) ||
            !jset(o, "logprob", jlogprob(a->logprob)) || !jset(o, "bytes", jbytes(&a->bytes))) {
            json_decref(o);
            goto fail;
        }
        if (!jappend(tops, o)) /* takes o */
            goto fail;
    }
    if (!jset(e, "top_logprobs", tops)) { /* takes tops */
        json_decref(e);
        return NULL;
    }
    return e;
fail:
    json_decref(tops);
    json_decref(e);
    return NULL;
}

/* The legacy completions shape: four parallel arrays. */
static json_t *cmpl_lp_new(void)
{
    json_t *o = json_object();
    if (o == NULL || !jset(o, "tokens", json_array()) || !jset(o, "token_logprobs", json_array()) ||
        !jset(o, "top_logprobs", json_array()) || !jset(o, "text_offset", json_array())) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* Appends one token; *chars is the text offset (code points) where it starts. */
static bool cmpl_lp_add(json_t *o, const Parkway__TokenLogprob *t, size_t *chars)
{
    json_t *top = json_object();
    if (top == NULL)
        return false;
    for (size_t i = 0; i < t->n_top_logprobs; i++) {
        const Parkway__TopLogprob *a = t->top_logprobs[i];
        json_t *key = jstr(a->token); /* a valid UTF-8 key, whatever the token bytes */
        bool ok = key != NULL && jset(top, json_string_value(key), jlogprob(a->logprob));
        json_decref(key);
        if (!ok) {
            json_decref(top);
            return false;
        }
    }
    const char *tok = t->token != NULL ? t->token : "";
    bool ok = jappend(json_object_get(o, "top_logprobs"), top); /* takes top */
    ok = ok && jappend(json_object_get(o, "tokens"), jstr(tok)) &&
         jappend(json_object_get(o, "token_logprobs"), jlogprob(t->logprob)) &&
         jappend(json_object_get(o, "text_offset"), json_integer((json_int_t)*chars));
    if (!ok)
        return false;
    *chars += utf8_chars(tok, strlen(tok));
    return true;
}

static json_t *usage_obj(const struct oai_resp *r)
{
    json_t *u = json_object();
    json_t *d = json_object();
    if (u == NULL || d == NULL ||
        !jset(u, "prompt_tokens", json_integer((json_int_t)r->prompt_tokens)) ||
        !jset(u, "completion_tokens", json_integer((json_int_t)r->completion_tokens)) ||
        !jset(u, "total_tokens",
              json_integer((json_int_t)(r->prompt_tokens + r->completion_tokens))) ||
        !jset(d, "cached_tokens", json_integer((json_int_t)r->cached_tokens))) {
        json_decref(u);
        json_decref(d);
        return NULL;
    }
    if (json_object_set_new(u, "prompt_tokens_details", d) != 0) {
        json_decref(u);
        return NULL;
    }
    return u;
}

/* The fields every response object starts with, in OpenAI's order. */
static json_t *resp_head(const struct oai_resp *r, const char *object)
{
    json_t *o = json_object();
    if (o == NULL || !jset(o, "id", jstr(r->id)) || !jset(o, "object", jstr(object)) ||
        !jset(o, "created", json_integer((json_int_t)r->created)) ||
        !jset(o, "model", jstr(r->model)) ||
        !jset(o, "system_fingerprint",
              r->fingerprint != NULL ? jstr(r->fingerprint) : json_null())) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ---- hand-written JSON for the common answers ----------------------------------------
 * jansson builds a tree of allocated nodes and then prints it: about a sixth of the
 * router's CPU per request went there. Without logprobs a non-stream answer and a stream
 * event have a fixed shape, so they are written directly, byte for byte as
 * json_dumps(OAI_DUMP_FLAGS) prints the trees built below (same key order, jansson's
 * escapes, and jstr_lossy's repair of bad UTF-8); tests/unit/router/test_router_openai.c
 * holds both to each other (router_openai_set_direct(false) selects the trees). */

struct jw {
    char *p;
    size_t len, cap;
    bool oom;
};

static void jw_raw(struct jw *w, const char *s, size_t n)
{
    if (w->oom)
        return;
    if (w->len + n + 1 > w->cap) {
        size_t cap = w->cap ? w->cap : 512;
        while (cap < w->len + n + 1)
            cap *= 2;
        char *q = realloc(w->p, cap);
        if (!q) {
            w->oom = true;
            return;
        }
        w->p = q;
        w->cap = cap;
    }
    memcpy(w->p + w->len, s, n);
    w->len += n;
    w->p[w->len] = '\0';
}

#define JW_LIT(w, lit) jw_raw((w), (lit), sizeof(lit) - 1)

static void jw_uint(struct jw *w, uint64_t v)
{
    char d[24];
    size_t i = sizeof d;
    do {
        d[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    jw_raw(w, d + i, sizeof d - i);
}

/* A JSON string as jansson prints it. Text that is not valid UTF-8 is repaired as
 * jstr_lossy does (each bad byte, and then also NUL, becomes U+FFFD). */
static void jw_str(struct jw *w, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    bool lossy = !utf8_valid(s, n);
    JW_LIT(w, "\"");
    size_t run = 0; /* start of bytes copied as they are */
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        size_t k = c < 0x80 ? 1 : utf8_seq(u + i, n - i);
        const char *esc = NULL;
        char ubuf[8];
        if (k == 0 || (lossy && c == 0)) {
            esc = "\xEF\xBF\xBD";
            k = 1;
        } else if (c == '"') {
            esc = "\\\"";
        } else if (c == '\\') {
            esc = "\\\\";
        } else if (c < 0x20) {
            switch (c) {
            case '\b':
                esc = "\\b";
                break;
            case '\f':
                esc = "\\f";
                break;
            case '\n':
                esc = "\\n";
                break;
            case '\r':
                esc = "\\r";
                break;
            case '\t':
                esc = "\\t";
                break;
            default:
                snprintf(ubuf, sizeof ubuf, "\\u%04X", c);
                esc = ubuf;
            }
        }
        if (esc) {
            jw_raw(w, s + run, i - run);
            jw_raw(w, esc, strlen(esc));
            run = i + k;
        }
        i += k;
    }
    jw_raw(w, s + run, n - run);
    JW_LIT(w, "\"");
}

/* The head every answer and event starts with, without its closing brace. */
static void jw_head(struct jw *w, const struct oai_resp *r, const char *object)
{
    JW_LIT(w, "{\"id\":");
    jw_str(w, r->id, strlen(r->id));
    JW_LIT(w, ",\"object\":");
    jw_str(w, object, strlen(object));
    JW_LIT(w, ",\"created\":");
    if (r->created < 0) {
        JW_LIT(w, "-");
        jw_uint(w, (uint64_t)0 - (uint64_t)r->created);
    } else {
        jw_uint(w, (uint64_t)r->created);
    }
    JW_LIT(w, ",\"model\":");
    jw_str(w, r->model, strlen(r->model));
    JW_LIT(w, ",\"system_fingerprint\":");
    if (r->fingerprint)
        jw_str(w, r->fingerprint, strlen(r->fingerprint));
    else
        JW_LIT(w, "null");
}

enum ev_body { EV_ROLE, EV_TEXT, EV_FINISH };

/* One stream event without logprobs, as emit_choice(stream_choice(...)) prints it. */
static enum pw_err emit_direct(const struct oai_resp *r, struct router_sse_buf *out, size_t g,
                               enum ev_body body, const char *text, size_t len, const char *finish)
{
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    struct jw w = {0};
    JW_LIT(&w, "data: ");
    jw_head(&w, r, chat ? "chat.completion.chunk" : "text_completion");
    JW_LIT(&w, ",\"choices\":[{");
    if (chat) {
        JW_LIT(&w, "\"index\":");
        jw_uint(&w, g);
        if (body == EV_ROLE)
            JW_LIT(&w, ",\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}");
        else if (body == EV_FINISH)
            JW_LIT(&w, ",\"delta\":{}");
        else {
            JW_LIT(&w, ",\"delta\":{\"content\":");
            jw_str(&w, text, len);
            JW_LIT(&w, "}");
        }
    } else {
        JW_LIT(&w, "\"text\":");
        jw_str(&w, body == EV_TEXT ? text : "", body == EV_TEXT ? len : 0);
        JW_LIT(&w, ",\"index\":");
        jw_uint(&w, g);
    }
    JW_LIT(&w, ",\"logprobs\":null,\"finish_reason\":");
    if (finish)
        jw_str(&w, finish, strlen(finish));
    else
        JW_LIT(&w, "null");
    JW_LIT(&w, "}]");
    if (r->include_usage)
        JW_LIT(&w, ",\"usage\":null");
    JW_LIT(&w, "}\n\n");
    enum pw_err e = w.oom ? PW_ERR_NOMEM : router_sse_buf_append(out, w.p, w.len);
    free(w.p);
    return e;
}

static int dump_cb(const char *buf, size_t size, void *data)
{
    return router_sse_buf_append(data, buf, size) == PW_OK ? 0 : -1;
}

/* Writes one `data: <json>\n\n` event, taking ev; nothing is left behind on failure. */
static enum pw_err emit(struct router_sse_buf *out, json_t *ev)
{
    if (ev == NULL)
        return PW_ERR_NOMEM;
    size_t mark = out->len;
    enum pw_err e = router_sse_buf_append(out, "data: ", 6);
    if (e == PW_OK && json_dump_callback(ev, dump_cb, out, OAI_DUMP_FLAGS) != 0)
        e = PW_ERR_NOMEM;
    if (e == PW_OK)
        e = router_sse_buf_append(out, "\n\n", 2);
    json_decref(ev);
    if (e != PW_OK && out->data != NULL) {
        out->len = mark;
        out->data[mark] = '\0';
    }
    return e;
}

/* A chunk object with one choice (taken; NULL choice = out of memory). */
static enum pw_err emit_choice(const struct oai_resp *r, struct router_sse_buf *out, json_t *choice)
{
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    json_t *arr = json_array();
    bool ok = jappend(arr, choice); /* takes choice, even when arr is NULL */
    json_t *ev = resp_head(r, chat ? "chat.completion.chunk" : "text_completion");
    ok = jset(ev, "choices", arr) && ok; /* takes arr */
    if (!ok || (r->include_usage && !jset(ev, "usage", json_null()))) {
        json_decref(ev);
        return PW_ERR_NOMEM;
    }
    return emit(out, ev);
}

/* One stream choice; delta_or_text is taken. */
static json_t *stream_choice(const struct oai_resp *r, size_t g, json_t *delta_or_text, json_t *lp,
                             const char *finish)
{
    json_t *c = json_object();
    bool ok = c != NULL;
    /* every jset runs, so delta_or_text and lp are always taken */
    if (r->kind == ROUTER_OPENAI_CHAT) {
        ok = jset(c, "index", json_integer((json_int_t)g)) && ok;
        ok = jset(c, "delta", delta_or_text) && ok;
    } else {
        ok = jset(c, "text", delta_or_text) && ok;
        ok = jset(c, "index", json_integer((json_int_t)g)) && ok;
    }
    ok = jset(c, "logprobs", lp != NULL ? lp : json_null()) && ok;
    ok = jset(c, "finish_reason", finish != NULL ? jstr(finish) : json_null()) && ok;
    if (!ok) {
        json_decref(c);
        return NULL;
    }
    return c;
}

static enum pw_err ev_role(struct oai_resp *r, struct router_sse_buf *out, size_t g)
{
    if (r->direct) {
        r->choices[g].started = true;
        return emit_direct(r, out, g, EV_ROLE, NULL, 0, NULL);
    }
    json_t *d = json_object();
    if (d == NULL || !jset(d, "role", jstr("assistant")) || !jset(d, "content", jstr("")) ||
        !jset(d, "refusal", json_null())) {
        json_decref(d);
        return PW_ERR_NOMEM;
    }
    r->choices[g].started = true;
    return emit_choice(r, out, stream_choice(r, g, d, NULL, NULL));
}

static enum pw_err ev_finish(struct oai_resp *r, struct router_sse_buf *out, size_t g)
{
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    if (chat && !r->choices[g].started) {
        enum pw_err e = ev_role(r, out, g);
        if (e != PW_OK)
            return e;
    }
    if (r->direct)
        return emit_direct(r, out, g, EV_FINISH, NULL, 0, finish_name(r->choices[g].finish));
    json_t *d = chat ? json_object() : jstr("");
    if (d == NULL)
        return PW_ERR_NOMEM;
    return emit_choice(r, out, stream_choice(r, g, d, NULL, finish_name(r->choices[g].finish)));
}

/* The new part of one chunk: text (borrowed) and logprob entries. */
static enum pw_err ev_content(struct oai_resp *r, struct router_sse_buf *out, size_t g,
                              const char *text, size_t len, Parkway__TokenLogprob *const *lps,
                              size_t nlp)
{
    struct oai_choice *ch = &r->choices[g];
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    if (chat && !ch->started) {
        enum pw_err e = ev_role(r, out, g);
        if (e != PW_OK)
            return e;
    }
    if (!r->logprobs && r->direct)
        return emit_direct(r, out, g, EV_TEXT, len > 0 ? text : "", len, NULL);
    json_t *lp = NULL;
    if (r->logprobs) {
        if (chat) {
            json_t *arr = json_array();
            lp = json_object();
            if (lp == NULL || arr == NULL || json_object_set_new(lp, "content", arr) != 0 ||
                !jset(lp, "refusal", json_null())) {
                if (lp == NULL)
                    json_decref(arr);
                json_decref(lp);
                return PW_ERR_NOMEM;
            }
            for (size_t i = 0; i < nlp; i++) {
                if (!jappend(arr, chat_lp_entry(lps[i]))) {
                    json_decref(lp);
                    return PW_ERR_NOMEM;
                }
            }
        } else {
            lp = cmpl_lp_new();
            for (size_t i = 0; lp != NULL && i < nlp; i++) {
                if (!cmpl_lp_add(lp, lps[i], &ch->lp_chars)) {
                    json_decref(lp);
                    lp = NULL;
                }
            }
            if (lp == NULL)
                return PW_ERR_NOMEM;
        }
    }
    json_t *t = jstr_lossy(len > 0 ? text : "", len);
    json_t *body = t;
    if (chat && t != NULL) {
        body = json_object();
        if (body == NULL || json_object_set_new(body, "content", t) != 0) {
            if (body == NULL)
                json_decref(t);
            json_decref(body);
            body = NULL;
        }
    }
    if (body == NULL) {
        json_decref(lp);
        return PW_ERR_NOMEM;
    }
    return emit_choice(r, out, stream_choice(r, g, body, lp, NULL));
}

/* Fails the whole response: records the error; a stream gets it as its last event. */
static enum pw_err resp_fail(struct oai_resp *r, const struct router_openai_error *err,
                             struct router_sse_buf *out)
{
    r->error = *err;
    r->failed = true;
    r->finished = true;
    if (r->streaming)
        return emit(out, error_obj(err));
    return PW_OK;
}

/* A newer attempt of part k: the acc forgets the part; the stream rewinds its counters. */
static void new_attempt(struct oai_resp *r, uint32_t k, uint32_t attempt)
{
    r->parts[k].attempt = attempt;
    r->parts[k].last_seq = -1;
    for (uint32_t i = 0; i < r->n; i++) {
        struct oai_choice *ch = &r->choices[(size_t)k * r->n + i];
        ch->regen_bytes = 0;
        ch->regen_tokens = 0;
        if (!r->streaming) {
            router_sse_buf_reset(&ch->text);
            ch->n_tokens = 0;
            ch->lp_chars = 0;
            json_decref(ch->lp);
            ch->lp = NULL;
            ch->finish = PARKWAY__FINISH_REASON__FINISH_REASON_NONE;
        }
    }
}

/* Takes the part of chunk c's text and logprobs that choice g has not taken yet. */
static enum pw_err take_delta(struct oai_resp *r, size_t g, const Parkway__ReplyChunk *c,
                              struct router_sse_buf *out)
{
    struct oai_choice *ch = &r->choices[g];
    const char *text = c->text != NULL ? c->text : "";
    size_t len = strlen(text);
    size_t skip = 0;
    if (ch->regen_bytes < ch->text.len) {
        size_t ov = ch->text.len - ch->regen_bytes;
        if (ov > len)
            ov = len;
        if (memcmp(text, ch->text.data + ch->regen_bytes, ov) != 0) {
            struct router_openai_error err;
            err_set(&err, 500, "server_error", NULL, "retry_diverged",
                    "The engine generating this answer failed and its retry produced "
                    "different text, so the answer cannot be continued. Please retry the "
                    "request.");
            return resp_fail(r, &err, out);
        }
        skip = ov;
    }
    ch->regen_bytes += len;
    size_t nl = c->n_logprobs;
    size_t lskip = 0;
    if (ch->regen_tokens < ch->n_tokens) {
        lskip = ch->n_tokens - ch->regen_tokens;
        if (lskip > nl)
            lskip = nl;
    }
    ch->regen_tokens += nl;
    size_t nlp = r->logprobs ? nl - lskip : 0;
    Parkway__TokenLogprob *const *lps = nl > 0 ? c->logprobs + lskip : NULL;
    enum pw_err e = router_sse_buf_append(&ch->text, text + skip, len - skip);
    if (e != PW_OK)
        return e;
    ch->n_tokens += nl - lskip;
    if (r->streaming) {
        if (len - skip > 0 || nlp > 0)
            return ev_content(r, out, g, text + skip, len - skip, lps, nlp);
        return PW_OK;
    }
    for (size_t i = 0; i < nlp; i++) {
        bool chat = r->kind == ROUTER_OPENAI_CHAT;
        if (ch->lp == NULL)
            ch->lp = chat ? json_array() : cmpl_lp_new();
        if (ch->lp == NULL)
            return PW_ERR_NOMEM;
        bool ok = chat ? jappend(ch->lp, chat_lp_entry(lps[i]))
                       : cmpl_lp_add(ch->lp, lps[i], &ch->lp_chars);
        if (!ok)
            return PW_ERR_NOMEM;
    }
    return PW_OK;
}

static enum pw_err finish_choice(struct oai_resp *r, size_t g, Parkway__FinishReason fr,
                                 struct router_sse_buf *out)
{
    r->choices[g].finish = fr == PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH
                               ? PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH
                               : PARKWAY__FINISH_REASON__FINISH_REASON_STOP;
    return r->streaming ? ev_finish(r, out, g) : PW_OK;
}

static enum pw_err resp_feed(struct oai_resp *r, const Parkway__ReplyChunk *c,
                             struct router_sse_buf *out, bool *finished)
{
    enum pw_err e = PW_OK;
    if (c == NULL || (r->streaming && out == NULL))
        return PW_ERR_INVAL;
    if (r->finished) {
        r->dropped++;
        goto out;
    }
    int k = part_of(r, c->request_id);
    if (k < 0 || c->index >= r->n)
        return PW_ERR_INVAL;
    struct oai_part *p = &r->parts[k];
    if (p->done || c->attempt < p->attempt) {
        r->dropped++;
        goto out;
    }
    if (c->attempt > p->attempt)
        new_attempt(r, (uint32_t)k, c->attempt);
    if ((int64_t)c->seq <= p->last_seq) {
        r->dropped++;
        goto out;
    }
    p->last_seq = c->seq;

    size_t g = (size_t)k * r->n + c->index;
    if (r->choices[g].finish == PARKWAY__FINISH_REASON__FINISH_REASON_NONE) {
        e = take_delta(r, g, c, out);
        if (e != PW_OK || r->finished)
            goto out;
    }
    Parkway__FinishReason fr = c->finish_reason;
    if (fr == PARKWAY__FINISH_REASON__FINISH_REASON_ERROR ||
        fr == PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED) {
        struct router_openai_error err;
        router_openai_err_from_reply(&err, c->error, fr);
        e = resp_fail(r, &err, out);
        goto out;
    }
    if (fr != PARKWAY__FINISH_REASON__FINISH_REASON_NONE &&
        r->choices[g].finish == PARKWAY__FINISH_REASON__FINISH_REASON_NONE) {
        e = finish_choice(r, g, fr, out);
        if (e != PW_OK)
            goto out;
    }
    if (!c->done)
        goto out;
    p->done = true;
    if (c->usage != NULL) {
        r->prompt_tokens += c->usage->prompt_tokens;
        r->completion_tokens += c->usage->completion_tokens;
        r->cached_tokens += c->usage->cached_tokens;
    }
    /* a choice the engine never closed is closed here, so every choice has a reason */
    for (uint32_t i = 0; i < r->n; i++) {
        size_t gi = (size_t)k * r->n + i;
        if (r->choices[gi].finish == PARKWAY__FINISH_REASON__FINISH_REASON_NONE) {
            e = finish_choice(r, gi, PARKWAY__FINISH_REASON__FINISH_REASON_STOP, out);
            if (e != PW_OK)
                goto out;
        }
    }
    for (uint32_t j = 0; j < r->n_parts; j++) {
        if (!r->parts[j].done)
            goto out;
    }
    r->finished = true;
    if (r->streaming) {
        if (r->include_usage) {
            bool chat = r->kind == ROUTER_OPENAI_CHAT;
            json_t *ev = resp_head(r, chat ? "chat.completion.chunk" : "text_completion");
            if (ev == NULL || !jset(ev, "choices", json_array()) ||
                !jset(ev, "usage", usage_obj(r))) {
                json_decref(ev);
                e = PW_ERR_NOMEM;
                goto out;
            }
            e = emit(out, ev);
            if (e != PW_OK)
                goto out;
        }
        e = router_sse_done(out);
    }
out:
    if (finished != NULL)
        *finished = r->finished;
    return e;
}

/* ------------------------------------------------------------------------------------ */
/* Responses: accumulator                                                               */

struct router_openai_acc *router_openai_acc_create(const struct router_openai_resp *r)
{
    struct router_openai_acc *acc = malloc(sizeof(*acc));
    if (acc == NULL)
        return NULL;
    if (!resp_init(&acc->r, r, false)) {
        resp_deinit(&acc->r);
        free(acc);
        return NULL;
    }
    return acc;
}

void router_openai_acc_destroy(struct router_openai_acc *acc)
{
    if (acc == NULL)
        return;
    resp_deinit(&acc->r);
    free(acc);
}

enum pw_err router_openai_acc_add(struct router_openai_acc *acc, const Parkway__ReplyChunk *c,
                                  bool *finished)
{
    return resp_feed(&acc->r, c, NULL, finished);
}

uint64_t router_openai_acc_dropped(const struct router_openai_acc *acc)
{
    return acc->r.dropped;
}

static json_t *acc_choice(const struct oai_resp *r, size_t g)
{
    const struct oai_choice *ch = &r->choices[g];
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    json_t *text = jstr_lossy(ch->text.len > 0 ? ch->text.data : "", ch->text.len);
    json_t *lp = json_null();
    bool ok = true;
    if (r->logprobs) {
        json_t *inner =
            ch->lp != NULL ? json_incref(ch->lp) : (chat ? json_array() : cmpl_lp_new());
        if (chat) {
            lp = json_object();
            ok = jset(lp, "content", inner) && ok; /* takes inner */
            ok = jset(lp, "refusal", json_null()) && ok;
        } else {
            lp = inner;
        }
    }
    /* every jset below runs, so text and lp are always taken */
    json_t *c = json_object();
    ok = c != NULL && ok;
    if (chat) {
        json_t *m = json_object();
        ok = jset(m, "role", jstr("assistant")) && ok;
        ok = jset(m, "content", text) && ok;
        ok = jset(m, "refusal", json_null()) && ok;
        ok = jset(c, "index", json_integer((json_int_t)g)) && ok;
        ok = jset(c, "message", m) && ok;
    } else {
        ok = jset(c, "text", text) && ok;
        ok = jset(c, "index", json_integer((json_int_t)g)) && ok;
    }
    ok = jset(c, "logprobs", lp) && ok;
    ok = jset(c, "finish_reason", jstr(finish_name(ch->finish))) && ok;
    if (!ok) {
        json_decref(c);
        return NULL;
    }
    return c;
}

/* The non-stream answer without logprobs; false when it must go through jansson. */
static bool acc_render_direct(const struct oai_resp *r, struct jw *w)
{
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    if (r->logprobs || !r->direct)
        return false;
    jw_head(w, r, chat ? "chat.completion" : "text_completion");
    JW_LIT(w, ",\"choices\":[");
    for (size_t g = 0; g < (size_t)r->n * r->n_parts; g++) {
        const struct oai_choice *ch = &r->choices[g];
        const char *text = ch->text.len > 0 ? ch->text.data : "";
        if (g)
            JW_LIT(w, ",");
        if (chat) {
            JW_LIT(w, "{\"index\":");
            jw_uint(w, g);
            JW_LIT(w, ",\"message\":{\"role\":\"assistant\",\"content\":");
            jw_str(w, text, ch->text.len);
            JW_LIT(w, ",\"refusal\":null}");
        } else {
            JW_LIT(w, "{\"text\":");
            jw_str(w, text, ch->text.len);
            JW_LIT(w, ",\"index\":");
            jw_uint(w, g);
        }
        JW_LIT(w, ",\"logprobs\":null,\"finish_reason\":");
        const char *fin = finish_name(ch->finish);
        jw_str(w, fin, strlen(fin));
        JW_LIT(w, "}");
    }
    JW_LIT(w, "],\"usage\":{\"prompt_tokens\":");
    jw_uint(w, r->prompt_tokens);
    JW_LIT(w, ",\"completion_tokens\":");
    jw_uint(w, r->completion_tokens);
    JW_LIT(w, ",\"total_tokens\":");
    jw_uint(w, r->prompt_tokens + r->completion_tokens);
    JW_LIT(w, ",\"prompt_tokens_details\":{\"cached_tokens\":");
    jw_uint(w, r->cached_tokens);
    JW_LIT(w, "}}}");
    return true;
}

/* The jansson rendering of a finished answer (every shape; the reference for the above). */
static enum pw_err acc_render_tree(const struct oai_resp *r, char **body, size_t *len)
{
    bool chat = r->kind == ROUTER_OPENAI_CHAT;
    json_t *root = resp_head(r, chat ? "chat.completion" : "text_completion");
    json_t *choices = json_array();
    if (!jset(root, "choices", choices)) { /* takes choices */
        json_decref(root);
        return PW_ERR_NOMEM;
    }
    for (size_t g = 0; g < (size_t)r->n * r->n_parts; g++) {
        if (!jappend(choices, acc_choice(r, g))) {
            json_decref(root);
            return PW_ERR_NOMEM;
        }
    }
    if (!jset(root, "usage", usage_obj(r))) {
        json_decref(root);
        return PW_ERR_NOMEM;
    }
    return dump_take(root, body, len);
}

enum pw_err router_openai_acc_render_reference(struct router_openai_acc *acc, char **body,
                                               size_t *len)
{
    *body = NULL;
    if (!acc->r.finished || acc->r.failed)
        return PW_ERR_INVAL;
    return acc_render_tree(&acc->r, body, len);
}

enum pw_err router_openai_acc_render(struct router_openai_acc *acc, char **body, size_t *len,
                                     int *status)
{
    const struct oai_resp *r = &acc->r;
    *body = NULL;
    if (!r->finished)
        return PW_ERR_INVAL;
    if (r->failed) {
        *status = r->error.status;
        return router_openai_error_json(&r->error, body, len);
    }
    *status = 200;
    struct jw w = {0};
    if (acc_render_direct(r, &w)) {
        if (w.oom) {
            free(w.p);
            return PW_ERR_NOMEM;
        }
        *body = w.p;
        if (len != NULL)
            *len = w.len;
        return PW_OK;
    }
    free(w.p);
    return acc_render_tree(r, body, len);
}

/* ------------------------------------------------------------------------------------ */
/* Responses: stream                                                                    */

struct router_openai_stream *router_openai_stream_create(const struct router_openai_resp *r)
{
    struct router_openai_stream *s = malloc(sizeof(*s));
    if (s == NULL)
        return NULL;
    if (!resp_init(&s->r, r, true)) {
        resp_deinit(&s->r);
        free(s);
        return NULL;
    }
    return s;
}

void router_openai_stream_destroy(struct router_openai_stream *s)
{
    if (s == NULL)
        return;
    resp_deinit(&s->r);
    free(s);
}

enum pw_err router_openai_stream_feed(struct router_openai_stream *s, const Parkway__ReplyChunk *c,
                                      struct router_sse_buf *out, bool *finished)
{
    return resp_feed(&s->r, c, out, finished);
}

enum pw_err router_openai_stream_fail(struct router_openai_stream *s,
                                      const struct router_openai_error *err,
                                      struct router_sse_buf *out)
{
    if (s->r.finished)
        return PW_OK;
    return resp_fail(&s->r, err, out);
}

bool router_openai_stream_finished(const struct router_openai_stream *s)
{
    return s->r.finished;
}

uint64_t router_openai_stream_dropped(const struct router_openai_stream *s)
{
    return s->r.dropped;
}

/* ------------------------------------------------------------------------------------ */
/* Models                                                                               */

static json_t *model_obj(const struct router_openai_model *m)
{
    json_t *o = json_object();
    if (o == NULL || !jset(o, "id", jstr(m->id)) || !jset(o, "object", jstr("model")) ||
        !jset(o, "created", json_integer((json_int_t)m->created)) ||
        !jset(o, "owned_by", jstr(m->owned_by != NULL ? m->owned_by : "parkway"))) {
        json_decref(o);
        return NULL;
    }
    return o;
}

enum pw_err router_openai_models_json(const struct router_openai_model *models, size_t n,
                                      char **out, size_t *len_out)
{
    if (out == NULL || (models == NULL && n > 0))
        return PW_ERR_INVAL;
    *out = NULL;
    json_t *root = json_object();
    json_t *data = json_array();
    bool ok = jset(root, "object", jstr("list"));
    ok = jset(root, "data", data) && ok; /* takes data */
    if (!ok) {
        json_decref(root);
        return PW_ERR_NOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        if (!jappend(data, model_obj(&models[i]))) {
            json_decref(root);
            return PW_ERR_NOMEM;
        }
    }
    return dump_take(root, out, len_out);
}

enum pw_err router_openai_model_json(const struct router_openai_model *model, char **out,
                                     size_t *len_out)
{
    if (model == NULL || out == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    return dump_take(model_obj(model), out, len_out);
}

/*
 * parkway batch: the Batches API from the command line.
 *
 *   parkway batch submit FILE.jsonl [--endpoint E] [--window 24h] [--wait] [-o OUT]
 *   parkway batch status ID | list [--limit N] | cancel ID | results ID [-o OUT] [--errors]
 *
 * Talks to the router over HTTP/1.1 with OPENAI_BASE_URL and OPENAI_API_KEY from the
 * environment (or --base-url, --api-key). The client is a minimal blocking one over a
 * plain TCP socket: http:// only (TLS is not supported by the CLI client yet), one request
 * per connection, Content-Length bodies. Single-threaded.
 */
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "parkway_cli.h"
#include "pw_clock.h"

#define BATCH_RESPONSE_MAX (512u * 1024u * 1024u) /* largest response body accepted */

struct client {
    char host[300];
    char port[8];
    char prefix[256]; /* path prefix, e.g. "/v1" */
    const char *key;
};

struct http_resp {
    int status;
    char *body; /* malloc'd, NUL-terminated */
    size_t len;
};

static int client_init(struct client *c, const char *base, const char *key)
{
    if (!base || !*base) {
        fprintf(stderr, "parkway batch: set OPENAI_BASE_URL or --base-url\n");
        return -1;
    }
    if (!key || !*key) {
        fprintf(stderr, "parkway batch: set OPENAI_API_KEY or --api-key\n");
        return -1;
    }
    if (strncmp(base, "https://", 8) == 0) {
        fprintf(stderr, "parkway batch: https is not supported by the CLI client yet; use "
                        "the router's plain http address\n");
        return -1;
    }
    if (strncmp(base, "http://", 7) != 0) {
        fprintf(stderr, "parkway batch: base URL must start with http://\n");
        return -1;
    }
    const char *h = base + 7, *slash = strchr(h, '/');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    char hostport[256];
    if (hl == 0 || hl >= sizeof hostport) {
        fprintf(stderr, "parkway batch: bad base URL %s\n", base);
        return -1;
    }
    memcpy(hostport, h, hl);
    hostport[hl] = '\0';
    char *colon = strrchr(hostport, ':');
    snprintf(c->port, sizeof c->port, "%s", colon ? colon + 1 : "80");
    if (colon)
        *colon = '\0';
    snprintf(c->host, sizeof c->host, "%s", hostport);
    snprintf(c->prefix, sizeof c->prefix, "%s", slash ? slash : "");
    size_t pl = strlen(c->prefix);
    while (pl > 0 && c->prefix[pl - 1] == '/')
        c->prefix[--pl] = '\0';
    c->key = key;
    return 0;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One request; path is relative to the base URL's prefix. Returns 0 with *out filled. */
static int http_call(const struct client *c, const char *method, const char *path,
                     const char *ctype, const char *body, size_t blen, struct http_resp *out)
{
    memset(out, 0, sizeof *out);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL;
    int rc = getaddrinfo(c->host, c->port, &hints, &ai);
    if (rc != 0) {
        fprintf(stderr, "parkway batch: %s: %s\n", c->host, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        fprintf(stderr, "parkway batch: cannot connect to %s:%s: %s\n", c->host, c->port,
                strerror(errno));
        return -1;
    }
    char head[2048];
    int hl = snprintf(head, sizeof head,
                      "%s %s%s HTTP/1.1\r\nHost: %s:%s\r\nAuthorization: Bearer %s\r\n"
                      "Connection: close\r\nUser-Agent: parkway-batch\r\n"
                      "Content-Type: %s\r\nContent-Length: %zu\r\n\r\n",
                      method, c->prefix, path, c->host, c->port, c->key,
                      ctype ? ctype : "application/json", blen);
    if (hl < 0 || (size_t)hl >= sizeof head || write_all(fd, head, (size_t)hl) ||
        (blen && write_all(fd, body, blen))) {
        fprintf(stderr, "parkway batch: cannot send the request: %s\n", strerror(errno));
        close(fd);
        return -1;
    }
    size_t cap = 64 * 1024, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (cap - n < 4096) {
            if (cap >= BATCH_RESPONSE_MAX) {
                free(buf);
                buf = NULL;
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    if (!buf) {
        fprintf(stderr, "parkway batch: response too large\n");
        return -1;
    }
    buf[n] = '\0';
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &out->status) != 1) {
        fprintf(stderr, "parkway batch: malformed HTTP response\n");
        free(buf);
        return -1;
    }
    /* The router sends Content-Length; a chunked body (not expected here) is refused. */
    *sep = '\0';
    if (strcasestr(buf, "\r\ntransfer-encoding: chunked")) {
        fprintf(stderr, "parkway batch: chunked responses are not supported\n");
        free(buf);
        return -1;
    }
    out->len = n - (size_t)(sep + 4 - buf);
    out->body = malloc(out->len + 1);
    if (!out->body) {
        free(buf);
        return -1;
    }
    memcpy(out->body, sep + 4, out->len);
    out->body[out->len] = '\0';
    free(buf);
    return 0;
}

/* Prints the API error of a non-2xx response; returns the exit code (2 for 4xx). */
static int api_error(const char *what, const struct http_resp *r)
{
    json_t *j = json_loads(r->body ? r->body : "", 0, NULL);
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    fprintf(stderr, "parkway batch: %s: HTTP %d: %s\n", what, r->status,
            msg ? msg : (r->body ? r->body : ""));
    json_decref(j);
    return r->status >= 400 && r->status < 500 ? 2 : 1;
}

/* GET/POST returning a JSON object; NULL (after printing why) on failure. */
static json_t *api_json(const struct client *c, const char *method, const char *path,
                        const char *body, int *rc)
{
    struct http_resp r;
    *rc = 1;
    if (http_call(c, method, path, NULL, body, body ? strlen(body) : 0, &r))
        return NULL;
    if (r.status != 200) {
        *rc = api_error(path, &r);
        free(r.body);
        return NULL;
    }
    json_t *j = json_loads(r.body, 0, NULL);
    free(r.body);
    if (!j)
        fprintf(stderr, "parkway batch: %s: the response is not JSON\n", path);
    *rc = j ? 0 : 1;
    return j;
}

static void print_json(json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (s)
        printf("%s\n", s);
    free(s);
}

static int read_file(const char *path, char **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "parkway batch: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 64 * 1024, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            break;
        if (n == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0)
            break;
    }
    fclose(f);
    if (!buf)
        return -1;
    *out = buf;
    *len = n;
    return 0;
}

static int upload(const struct client *c, const char *path, char *id, size_t cap)
{
    char *data = NULL;
    size_t len = 0;
    if (read_file(path, &data, &len))
        return 2;
    uint8_t rnd[8] = {0};
    if (getrandom(rnd, sizeof rnd, 0) != sizeof rnd)
        memset(rnd, 7, sizeof rnd);
    char bnd[40];
    snprintf(bnd, sizeof bnd, "pwbatch%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
             rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                      "--%s\r\nContent-Disposition: form-data; name=\"file\"; filename=\"%.200s\""
                      "\r\nContent-Type: application/jsonl\r\n\r\n",
                      bnd, bnd, base);
    char tail[64];
    int tl = snprintf(tail, sizeof tail, "\r\n--%s--\r\n", bnd);
    size_t total = (size_t)hl + len + (size_t)tl;
    char *body = malloc(total);
    if (!body) {
        free(data);
        return 1;
    }
    memcpy(body, head, (size_t)hl);
    memcpy(body + hl, data, len);
    memcpy(body + hl + len, tail, (size_t)tl);
    free(data);
    char ctype[96];
    snprintf(ctype, sizeof ctype, "multipart/form-data; boundary=%s", bnd);
    struct http_resp r;
    int rc = http_call(c, "POST", "/files", ctype, body, total, &r);
    free(body);
    if (rc)
        return 1;
    if (r.status != 200) {
        rc = api_error("upload", &r);
        free(r.body);
        return rc;
    }
    json_t *j = json_loads(r.body, 0, NULL);
    free(r.body);
    const char *fid = json_string_value(json_object_get(j, "id"));
    if (!fid) {
        json_decref(j);
        return 1;
    }
    snprintf(id, cap, "%s", fid);
    json_decref(j);
    return 0;
}

static int download(const struct client *c, const char *file_id, const char *out_path)
{
    char path[300];
    snprintf(path, sizeof path, "/files/%s/content", file_id);
    struct http_resp r;
    if (http_call(c, "GET", path, NULL, NULL, 0, &r))
        return 1;
    int rc = 0;
    if (r.status != 200) {
        rc = api_error(path, &r);
    } else if (out_path) {
        FILE *f = fopen(out_path, "wb");
        if (!f || fwrite(r.body, 1, r.len, f) != r.len) {
            fprintf(stderr, "parkway batch: %s: %s\n", out_path, strerror(errno));
            rc = 1;
        }
        if (f && fclose(f) != 0)
            rc = 1;
    } else {
        fwrite(r.body, 1, r.len, stdout);
    }
    free(r.body);
    return rc;
}

static json_int_t count(json_t *b, const char *name)
{
    return json_integer_value(json_object_get(json_object_get(b, "request_counts"), name));
}

static bool terminal(const char *st)
{
    return st && (strcmp(st, "completed") == 0 || strcmp(st, "failed") == 0 ||
                  strcmp(st, "expired") == 0 || strcmp(st, "cancelled") == 0);
}

/* Polls until the batch ends, drawing one progress line on stderr. Returns the batch. */
static json_t *wait_batch(const struct client *c, const char *id, int *rc)
{
    char path[300];
    snprintf(path, sizeof path, "/batches/%s", id);
    uint64_t t0 = pw_clock_mono_ms();
    json_int_t tok0 = -1;
    bool tty = isatty(2);
    for (;;) {
        json_t *b = api_json(c, "GET", path, NULL, rc);
        if (!b)
            return NULL;
        const char *st = json_string_value(json_object_get(b, "status"));
        json_int_t total = count(b, "total"), done = count(b, "completed"),
                   failed = count(b, "failed");
        json_int_t tok =
            json_integer_value(json_object_get(json_object_get(b, "usage"), "output_tokens"));
        if (tok0 < 0)
            tok0 = tok;
        double el = (double)(pw_clock_mono_ms() - t0) / 1000.0;
        double tps = el > 0.5 ? (double)(tok - tok0) / el : 0.0;
        json_int_t finished = done + failed;
        char eta[32] = "-";
        if (finished > 0 && total > finished && el > 0.5)
            snprintf(eta, sizeof eta, "%.0fs", el / (double)finished * (double)(total - finished));
        int width = 30, fill = total > 0 ? (int)(width * finished / total) : 0;
        char bar[64];
        for (int i = 0; i < width; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[width] = '\0';
        fprintf(stderr, "%s[%s] %lld/%lld done, %lld failed, %.1f tok/s, ETA %s  (%s)%s",
                tty ? "\r" : "", bar, (long long)finished, (long long)total, (long long)failed, tps,
                eta, st ? st : "?", tty ? "\033[K" : "\n");
        if (terminal(st)) {
            if (tty)
                fprintf(stderr, "\n");
            *rc = 0;
            return b;
        }
        json_decref(b);
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: parkway batch submit FILE.jsonl [--endpoint /v1/chat/completions]\n"
            "                            [--window 24h] [--wait] [-o OUT]\n"
            "       parkway batch status ID\n"
            "       parkway batch list [--limit N]\n"
            "       parkway batch cancel ID\n"
            "       parkway batch results ID [--errors] [-o OUT]\n"
            "options: --base-url URL (default $OPENAI_BASE_URL), --api-key KEY (default\n"
            "         $OPENAI_API_KEY). http:// only: the CLI client does not speak TLS yet.\n");
}

int parkway_cmd_batch(int argc, char **argv)
{
    const char *base = getenv("OPENAI_BASE_URL"), *key = getenv("OPENAI_API_KEY");
    const char *endpoint = "/v1/chat/completions", *window = "24h", *out_path = NULL;
    const char *limit = "20";
    bool wait = false, errors = false;
    enum { O_BASE = 256, O_KEY, O_ENDPOINT, O_WINDOW, O_WAIT, O_LIMIT, O_ERRORS, O_HELP };
    static const struct option longopts[] = {
        {"base-url", required_argument, NULL, O_BASE},
        {"api-key", required_argument, NULL, O_KEY},
        {"endpoint", required_argument, NULL, O_ENDPOINT},
        {"window", required_argument, NULL, O_WINDOW},
        {"wait", no_argument, NULL, O_WAIT},
        {"limit", required_argument, NULL, O_LIMIT},
        {"errors", no_argument, NULL, O_ERRORS},
        {"output", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *sub = argv[1];
    optind = 2;
    int opt;
    while ((opt = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
        switch (opt) {
        case O_BASE:
            base = optarg;
            break;
        case O_KEY:
            key = optarg;
            break;
        case O_ENDPOINT:
            endpoint = optarg;
            break;
        case O_WINDOW:
            window = optarg;
            break;
        case O_WAIT:
            wait = true;
            break;
        case O_LIMIT:
            limit = optarg;
            break;
        case O_ERRORS:
            errors = true;
            break;
        case 'o':
            out_path = optarg;
            break;
        case O_HELP:
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "help") == 0) {
        usage(stdout);
        return 0;
    }
    const char *arg = optind < argc ? argv[optind] : NULL;
    bool needs_arg = strcmp(sub, "list") != 0;
    if ((needs_arg && !arg) || (!needs_arg && arg) || (arg && optind + 1 < argc)) {
        usage(stderr);
        return 2;
    }
    struct client c;
    if (client_init(&c, base, key))
        return 2;
    int rc = 0;
    char path[400];
    if (strcmp(sub, "submit") == 0) {
        char fid[200];
        if ((rc = upload(&c, arg, fid, sizeof fid)))
            return rc;
        json_t *req = json_pack("{s:s,s:s,s:s}", "input_file_id", fid, "endpoint", endpoint,
                                "completion_window", window);
        char *body = req ? json_dumps(req, JSON_COMPACT) : NULL;
        json_decref(req);
        json_t *b = body ? api_json(&c, "POST", "/batches", body, &rc) : NULL;
        free(body);
        if (!b)
            return rc ? rc : 1;
        const char *id = json_string_value(json_object_get(b, "id"));
        char bid[200];
        snprintf(bid, sizeof bid, "%s", id ? id : "");
        json_decref(b);
        if (!wait) {
            printf("%s\n", bid);
            return 0;
        }
        fprintf(stderr, "batch %s\n", bid);
        b = wait_batch(&c, bid, &rc);
        if (!b)
            return rc ? rc : 1;
        const char *st = json_string_value(json_object_get(b, "status"));
        const char *ofid = json_string_value(json_object_get(b, "output_file_id"));
        if (ofid)
            rc = download(&c, ofid, out_path);
        if (st && strcmp(st, "completed") != 0) {
            fprintf(stderr, "parkway batch: batch %s ended %s\n", bid, st);
            json_t *errs = json_object_get(b, "errors");
            if (json_is_object(errs))
                print_json(errs);
            rc = rc ? rc : 1;
        }
        json_decref(b);
        return rc;
    }
    if (strcmp(sub, "status") == 0 || strcmp(sub, "cancel") == 0) {
        bool cancel = sub[0] == 'c';
        snprintf(path, sizeof path, "/batches/%s%s", arg, cancel ? "/cancel" : "");
        json_t *b = api_json(&c, cancel ? "POST" : "GET", path, NULL, &rc);
        if (!b)
            return rc;
        print_json(b);
        json_decref(b);
        return 0;
    }
    if (strcmp(sub, "list") == 0) {
        snprintf(path, sizeof path, "/batches?limit=%s", limit);
        json_t *l = api_json(&c, "GET", path, NULL, &rc);
        if (!l)
            return rc;
        size_t i;
        json_t *b;
        printf("%-40s %-12s %9s %9s %9s %s\n", "ID", "STATUS", "TOTAL", "DONE", "FAILED",
               "CREATED");
        json_array_foreach(json_object_get(l, "data"), i, b)
        {
            time_t t = (time_t)json_integer_value(json_object_get(b, "created_at"));
            char when[32];
            struct tm tm;
            strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", localtime_r(&t, &tm));
            printf("%-40s %-12s %9lld %9lld %9lld %s\n",
                   json_string_value(json_object_get(b, "id")),
                   json_string_value(json_object_get(b, "status")), (long long)count(b, "total"),
                   (long long)count(b, "completed"), (long long)count(b, "failed"), when);
        }
        json_decref(l);
        return 0;
    }
    if (strcmp(sub, "results") == 0) {
        snprintf(path, sizeof path, "/batches/%s", arg);
        json_t *b = api_json(&c, "GET", path, NULL, &rc);
        if (!b)
            return rc;
        const char *fid =
            json_string_value(json_object_get(b, errors ? "error_file_id" : "output_file_id"));
        if (!fid) {
            fprintf(stderr, "parkway batch: batch %s has no %s file (status %s)\n", arg,
                    errors ? "error" : "output", json_string_value(json_object_get(b, "status")));
            json_decref(b);
            return 1;
        }
        char f[200];
        snprintf(f, sizeof f, "%s", fid);
        json_decref(b);
        return download(&c, f, out_path);
    }
    fprintf(stderr, "parkway batch: unknown subcommand '%s'\n", sub);
    usage(stderr);
    return 2;
}

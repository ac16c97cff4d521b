/*
 * Integration tests of the Files and Batches APIs: a real redis-server (pw_test_redis),
 * parkway-router and parkway-engine as child processes on a tiny generated model
 * (parkway-gguf-gen --shape tiny), and plain HTTP/1.1 from this test.
 *
 * Covers: upload, create, poll to completed, output in input order with every custom_id
 * once; per-line validation errors; upload refusals; cancel keeping finished lines; another
 * tenant getting 404; SIGKILL of the engine and of the router mid-batch with no line lost
 * or duplicated; a ~50 MB upload that the router spools and streams (its peak RSS grows far
 * less than the file, the stored bytes are identical, validation streams too) and oversized
 * uploads refused with 413. Exit 77 (skipped) without redis-server or the built binaries.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_apikey.h"
#include "pw_proto.h"
#include "pw_test_proc.h"
#include "pw_test_redis.h"

#define ROUTER_BIN PW_BINARY_DIR "/router/parkway-router"
#define ENGINE_BIN PW_BINARY_DIR "/engine/parkway-engine"
#define GGUF_GEN PW_BINARY_DIR "/tools/gguf-gen/parkway-gguf-gen"
#define MAX_FILE_BYTES 52000000 /* the router's --max-file-bytes here */

/* Under AddressSanitizer freed blocks sit in a quarantine (256 MB by default) that counts in
 * RSS, so every read buffer libevent frees while a 50 MB body streams by stays resident: the
 * RSS bound is checked in normal builds only. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_CHECKED 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RSS_CHECKED 0
#endif
#endif
#ifndef RSS_CHECKED
#define RSS_CHECKED 1
#endif
#define RSS_GROWTH_MAX_KB (16 * 1024) /* the file is ~50 MB */

static void check_rss_growth(const char *what, long before_kb, long hwm_kb)
{
    fprintf(stderr, "%s: router VmRSS before %ld kB, VmHWM after %ld kB%s\n", what, before_kb,
            hwm_kb, RSS_CHECKED ? "" : " (not checked under ASan)");
    if (RSS_CHECKED && hwm_kb - before_kb >= RSS_GROWTH_MAX_KB)
        fail_msg("%s: the router's peak RSS grew by %ld kB", what, hwm_kb - before_kb);
}

static struct pw_test_redis g_redis;
static char g_dir[64];
static int g_port;
static pid_t g_router = -1, g_engine = -1;
static char g_key_a[PW_APIKEY_LEN + 1], g_key_b[PW_APIKEY_LEN + 1];

/* ---- processes ------------------------------------------------------------------------ */

static void stop_pid(pid_t *pid, int sig)
{
    if (*pid > 0) {
        kill(*pid, sig);
        waitpid(*pid, NULL, 0);
        *pid = -1;
    }
}

static void start_router(void)
{
    char port[16], url[300], storage[128], log[128];
    snprintf(port, sizeof port, "%d", g_port);
    snprintf(url, sizeof url, "%s", g_redis.url);
    snprintf(storage, sizeof storage, "%s/files", g_dir);
    snprintf(log, sizeof log, "%s/router.log", g_dir);
    char maxf[24];
    snprintf(maxf, sizeof maxf, "%d", MAX_FILE_BYTES);
    char *argv[] = {ROUTER_BIN, "--redis",       url,     "--port",           port, "--threads",
                    "1",        "--storage-dir", storage, "--max-file-bytes", maxf, NULL};
    g_router = pw_test_spawn(argv, log, SIGKILL);
}

static void start_engine(const char *id)
{
    char url[300], spec[128], log[128];
    snprintf(url, sizeof url, "%s", g_redis.url);
    snprintf(spec, sizeof spec, "%s/spec.yaml", g_dir);
    snprintf(log, sizeof log, "%s/engine.log", g_dir);
    char *argv[] = {ENGINE_BIN, "--spec",      spec,       "--redis",         url,    "--threads",
                    "1",        "--worker-id", (char *)id, "--claim-idle-ms", "1500", NULL};
    g_engine = pw_test_spawn(argv, log, SIGKILL);
}

/* ---- HTTP ----------------------------------------------------------------------------- */

struct resp {
    int status;
    char *body; /* malloc'd, NUL-terminated */
    size_t len;
};

static int http(const char *method, const char *path, const char *key, const char *ctype,
                const char *body, size_t blen, struct resp *out)
{
    memset(out, 0, sizeof *out);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)g_port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s%s%s"
                      "Content-Type: %s\r\nContent-Length: %zu\r\n\r\n",
                      method, path, key ? "Authorization: Bearer " : "", key ? key : "",
                      key ? "\r\n" : "", ctype ? ctype : "application/json", blen);
    if (write(fd, head, (size_t)hl) != hl || (blen && write(fd, body, blen) != (ssize_t)blen)) {
        close(fd);
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 4096 > cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + n, cap - n - 1);
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    char *sep = strstr(buf, "\r\n\r\n");
    if (!sep || sscanf(buf, "HTTP/1.%*d %d", &out->status) != 1) {
        free(buf);
        return -1;
    }
    out->len = n - (size_t)(sep + 4 - buf);
    out->body = malloc(out->len + 1);
    memcpy(out->body, sep + 4, out->len + 1);
    free(buf);
    return 0;
}

static json_t *http_json(const char *method, const char *path, const char *key, const char *body,
                         int want_status)
{
    struct resp r;
    assert_int_equal(http(method, path, key, NULL, body, body ? strlen(body) : 0, &r), 0);
    if (r.status != want_status)
        fail_msg("%s %s: status %d, want %d: %s", method, path, r.status, want_status, r.body);
    json_t *j = json_loads(r.body, 0, NULL);
    free(r.body);
    assert_non_null(j);
    return j;
}

/* Uploads content as a batch file; returns the response status, file id into id. */
static int upload(const char *key, const char *content, char *id, size_t cap, char *body_out,
                  size_t body_cap)
{
    const char *bnd = "pwtestboundary42";
    size_t cl = strlen(content);
    char *b = malloc(cl + 1024);
    int n = snprintf(b, 1024,
                     "--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                     "--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                     "filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n",
                     bnd, bnd);
    memcpy(b + n, content, cl);
    n += (int)cl;
    n += snprintf(b + n, 128, "\r\n--%s--\r\n", bnd);
    char ctype[128];
    snprintf(ctype, sizeof ctype, "multipart/form-data; boundary=%s", bnd);
    struct resp r;
    assert_int_equal(http("POST", "/v1/files", key, ctype, b, (size_t)n, &r), 0);
    free(b);
    if (body_out)
        snprintf(body_out, body_cap, "%s", r.body);
    if (r.status == 200) {
        json_t *j = json_loads(r.body, 0, NULL);
        snprintf(id, cap, "%s", json_string_value(json_object_get(j, "id")));
        json_decref(j);
    }
    free(r.body);
    return r.status;
}

/* The multipart body of a batch upload of content (clen bytes); *len_out its size. */
static char *multipart(const char *content, size_t clen, size_t *len_out)
{
    const char *bnd = "pwtestboundary42";
    char *b = malloc(clen + 1024);
    int n = snprintf(b, 1024,
                     "--%s\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                     "--%s\r\nContent-Disposition: form-data; name=\"file\"; "
                     "filename=\"big.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n",
                     bnd, bnd);
    memcpy(b + n, content, clen);
    size_t len = (size_t)n + clen;
    len += (size_t)snprintf(b + len, 128, "\r\n--%s--\r\n", bnd);
    *len_out = len;
    return b;
}

/* A field of /proc/<pid>/status in kB (VmRSS, VmHWM). */
static long proc_kb(pid_t pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    long v = -1;
    size_t fl = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, fl) == 0 && line[fl] == ':')
            v = strtol(line + fl + 1, NULL, 10);
    fclose(f);
    assert_true(v >= 0);
    return v;
}

static char *chat_lines(int n, int max_tokens, const char *prefix)
{
    size_t cap = (size_t)n * 300 + 1;
    char *s = malloc(cap), *p = s;
    for (int i = 0; i < n; i++)
        p += sprintf(p,
                     "{\"custom_id\":\"%s%d\",\"method\":\"POST\",\"url\":\"/v1/chat/"
                     "completions\",\"body\":{\"model\":\"tiny\",\"messages\":[{\"role\":"
                     "\"user\",\"content\":\"line %d\"}],\"max_tokens\":%d,\"ignore_eos\":"
                     "true}}\n",
                     prefix, i, i, max_tokens);
    return s;
}

static void create_batch(const char *key, const char *file_id, char *bid, size_t cap)
{
    char body[512];
    snprintf(body, sizeof body,
             "{\"input_file_id\":\"%s\",\"endpoint\":\"/v1/chat/completions\","
             "\"completion_window\":\"24h\",\"metadata\":{\"t\":\"1\"}}",
             file_id);
    json_t *j = http_json("POST", "/v1/batches", key, body, 200);
    assert_string_equal(json_string_value(json_object_get(j, "status")), "validating");
    assert_string_equal(json_string_value(json_object_get(j, "object")), "batch");
    snprintf(bid, cap, "%s", json_string_value(json_object_get(j, "id")));
    json_decref(j);
}

/* Polls until status is one of want ("a|b"), or until pred (completed >= min_done) holds
 * when min_done > 0. Returns the batch object. */
static json_t *poll_batch(const char *bid, const char *want, long min_done, int timeout_s)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/batches/%s", bid);
    time_t end = time(NULL) + timeout_s;
    for (;;) {
        struct resp r;
        if (http("GET", path, g_key_a, NULL, NULL, 0, &r) == 0 && r.status == 200) {
            json_t *j = json_loads(r.body, 0, NULL);
            free(r.body);
            const char *st = json_string_value(json_object_get(j, "status"));
            json_int_t done = json_integer_value(
                json_object_get(json_object_get(j, "request_counts"), "completed"));
            char key[64];
            snprintf(key, sizeof key, "%s|", st ? st : "");
            if ((want && strstr(want, key)) || (min_done > 0 && done >= min_done))
                return j;
            json_decref(j);
        } else {
            free(r.body);
        }
        if (time(NULL) > end)
            fail_msg("batch %s did not reach %s in %d s", bid, want ? want : "progress", timeout_s);
        usleep(100000);
    }
}

/* Downloads a file's content; checks each line's custom_id is prefix<k> with k strictly
 * increasing (input order, each once). Returns the line count. */
static int check_output(const char *file_id, const char *prefix, int status_code)
{
    char path[256];
    snprintf(path, sizeof path, "/v1/files/%s/content", file_id);
    struct resp r;
    assert_int_equal(http("GET", path, g_key_a, NULL, NULL, 0, &r), 0);
    assert_int_equal(r.status, 200);
    int n = 0, last = -1;
    char *save = NULL;
    for (char *line = strtok_r(r.body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        json_t *j = json_loads(line, 0, NULL);
        assert_non_null(j);
        const char *cid = json_string_value(json_object_get(j, "custom_id"));
        assert_non_null(cid);
        assert_true(strncmp(cid, prefix, strlen(prefix)) == 0);
        int k = atoi(cid + strlen(prefix));
        assert_true(k > last);
        last = k;
        if (status_code) {
            json_t *resp = json_object_get(j, "response");
            assert_int_equal(json_integer_value(json_object_get(resp, "status_code")), status_code);
            assert_string_equal(
                json_string_value(json_object_get(json_object_get(resp, "body"), "object")),
                "chat.completion");
        }
        json_decref(j);
        n++;
    }
    free(r.body);
    return n;
}

static json_int_t count_done(json_t *b)
{
    return json_integer_value(json_object_get(json_object_get(b, "request_counts"), "completed"));
}

/* ---- fixture -------------------------------------------------------------------------- */

static void add_key(redisContext *c, const char *tenant, char *key)
{
    pw_apikey_generate(key);
    uint8_t h[PW_APIKEY_HASH_LEN];
    char hex[PW_APIKEY_HASH_HEX_LEN + 1], id[PW_APIKEY_ID_LEN + 1];
    pw_apikey_hash(key, strlen(key), h);
    pw_hex_encode(h, sizeof h, hex);
    pw_apikey_id(h, id);
    Parkway__KeyRecord rec = PARKWAY__KEY_RECORD__INIT;
    rec.key_id = id;
    rec.tenant = (char *)tenant;
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(pw_proto_pack_key_alloc(&rec, &buf, &len, NULL), PW_OK);
    freeReplyObject(redisCommand(c, "HSET pw:keys %s %b", hex, buf, len));
    free(buf);
}

static int setup(void **state)
{
    (void)state;
    if (!pw_test_redis_server_path() || access(ROUTER_BIN, X_OK) || access(ENGINE_BIN, X_OK) ||
        access(GGUF_GEN, X_OK)) {
        fprintf(stderr, "skip: needs redis-server and the built router, engine, gguf-gen\n");
        exit(77);
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/pw-batch-test-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    char cmd[512];
    /* The tiny shape decodes 200 tokens in ~10 ms: too fast to stop a batch half-way. Eight
     * wider layers (~1000 tokens/s on one thread) leave time to kill things mid-batch. */
    snprintf(cmd, sizeof cmd, "%s/tiny.gguf", g_dir);
    pw_test_gguf_gen_at(GGUF_GEN, cmd,
                        "--shape custom --n-layer 8 --n-embd 256 --n-ff 1024 --n-head 4 "
                        "--n-head-kv 2 --type q8_0");
    snprintf(cmd, sizeof cmd, "%s/spec.yaml", g_dir);
    FILE *f = fopen(cmd, "w");
    fprintf(f,
            "name: tiny\nmodel:\n  path: %s/tiny.gguf\n  chat_template: chatml\n"
            "engine:\n  max_batch: 4\n  context_length: 256\n",
            g_dir);
    fclose(f);
    if (pw_test_redis_start(&g_redis) != PW_OK)
        return -1;
    redisContext *c = redisConnect("127.0.0.1", g_redis.port);
    freeReplyObject(redisCommand(c, "HSET pw:functions tiny {}"));
    add_key(c, "tenant-a", g_key_a);
    add_key(c, "tenant-b", g_key_b);
    redisFree(c);
    g_port = pw_test_free_port();
    start_router();
    start_engine("e1");
    for (int i = 0; i < 100; i++) {
        struct resp r;
        if (http("GET", "/healthz", NULL, NULL, NULL, 0, &r) == 0) {
            free(r.body);
            return 0;
        }
        usleep(100000);
    }
    return -1;
}

static int teardown(void **state)
{
    (void)state;
    stop_pid(&g_engine, SIGTERM);
    stop_pid(&g_router, SIGTERM);
    pw_test_redis_stop(&g_redis);
    pw_test_rmtree_unless_keep(g_dir);
    return 0;
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_batch_completes_in_order(void **state)
{
    (void)state;
    char fid[128], bid[128];
    char *lines = chat_lines(12, 4, "ok-");
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_t *b = poll_batch(bid, "completed|failed|", 0, 120);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "completed");
    json_t *rc = json_object_get(b, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "total")), 12);
    assert_int_equal(json_integer_value(json_object_get(rc, "completed")), 12);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 0);
    assert_true(json_is_integer(json_object_get(b, "completed_at")));
    assert_true(json_is_integer(json_object_get(b, "in_progress_at")));
    assert_true(json_is_null(json_object_get(b, "error_file_id")));
    assert_string_equal(json_string_value(json_object_get(json_object_get(b, "metadata"), "t")),
                        "1");
    assert_int_equal(
        check_output(json_string_value(json_object_get(b, "output_file_id")), "ok-", 200), 12);
    json_decref(b);

    /* listed newest first, and the file too */
    json_t *l = http_json("GET", "/v1/batches?limit=1", g_key_a, NULL, 200);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(json_object_get(l, "data"), 0), "id")),
        bid);
    json_decref(l);
    char path[256];
    snprintf(path, sizeof path, "/v1/files/%s", fid);
    json_t *fo = http_json("GET", path, g_key_a, NULL, 200);
    assert_string_equal(json_string_value(json_object_get(fo, "purpose")), "batch");
    json_decref(fo);
}

static void test_bad_lines_fail_with_per_line_errors(void **state)
{
    (void)state;
    const char *in =
        "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":"
        "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n"
        "{not json\n"
        "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":"
        "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n"
        "{\"custom_id\":\"c\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":"
        "{\"model\":\"nope\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}}\n"
        "{\"custom_id\":\"d\",\"method\":\"POST\",\"url\":\"/v1/completions\",\"body\":"
        "{\"model\":\"tiny\",\"prompt\":\"x\"}}\n"
        "{\"custom_id\":\"e\",\"method\":\"GET\",\"url\":\"/v1/chat/completions\",\"body\":{}}\n"
        "{\"custom_id\":\"f\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":"
        "{\"model\":\"tiny\",\"messages\":[]}}\n";
    char fid[128], bid[128];
    assert_int_equal(upload(g_key_a, in, fid, sizeof fid, NULL, 0), 200);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_t *b = poll_batch(bid, "failed|completed|in_progress|", 0, 30);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "failed");
    assert_true(json_is_integer(json_object_get(b, "failed_at")));
    json_t *data = json_object_get(json_object_get(b, "errors"), "data");
    assert_int_equal(json_array_size(data), 6);
    static const char *const codes[] = {"invalid_json_line", "duplicate_custom_id",
                                        "model_not_found",   "invalid_url",
                                        "invalid_method",    "empty_array"};
    for (size_t i = 0; i < 6; i++) {
        json_t *e = json_array_get(data, i);
        assert_string_equal(json_string_value(json_object_get(e, "code")), codes[i]);
        assert_int_equal(json_integer_value(json_object_get(e, "line")), (json_int_t)i + 2);
    }
    json_decref(b);
}

static void test_upload_refusals(void **state)
{
    (void)state;
    char fid[128], body[2048];
    assert_int_equal(upload(g_key_a, "\n  \n", fid, sizeof fid, body, sizeof body), 400);
    assert_non_null(strstr(body, "empty_file"));
    assert_int_equal(upload(g_key_a, "a,b,c\n1,2,3\n", fid, sizeof fid, body, sizeof body), 400);
    assert_non_null(strstr(body, "invalid_file_format"));
    /* not multipart at all */
    struct resp r;
    assert_int_equal(http("POST", "/v1/files", g_key_a, NULL, "{}", 2, &r), 0);
    assert_int_equal(r.status, 400);
    free(r.body);
    /* a batch on a file that does not exist */
    json_t *j = http_json("POST", "/v1/batches", g_key_a,
                          "{\"input_file_id\":\"file-nope\",\"endpoint\":\"/v1/chat/"
                          "completions\",\"completion_window\":\"24h\"}",
                          404);
    json_decref(j);
    j = http_json("POST", "/v1/batches", g_key_a,
                  "{\"input_file_id\":\"file-x\",\"endpoint\":\"/v1/embeddings\","
                  "\"completion_window\":\"24h\"}",
                  400);
    json_decref(j);
    /* no key at all */
    assert_int_equal(http("GET", "/v1/files", NULL, NULL, NULL, 0, &r), 0);
    assert_int_equal(r.status, 401);
    free(r.body);
}

/* A ~50 MB batch file: the router spools the body to disk and copies the file part to
 * storage in bounded pieces, so its peak RSS grows far less than the file; the stored bytes
 * are the sent bytes; creating a batch on it validates line by line (bounded too). */
static void test_big_upload_streams(void **state)
{
    (void)state;
    const int n_lines = 49000;
    char pad[901];
    memset(pad, 'x', 900);
    pad[900] = '\0';
    size_t cap = (size_t)n_lines * 1100, clen = 0;
    char *content = malloc(cap);
    for (int i = 0; i < n_lines; i++)
        clen +=
            (size_t)snprintf(content + clen, cap - clen,
                             "{\"custom_id\":\"big-%d\",\"method\":\"POST\",\"url\":\"/v1/chat/"
                             "completions\",\"body\":{\"model\":\"nope\",\"messages\":[{\"role\":"
                             "\"user\",\"content\":\"%s\"}],\"max_tokens\":4}}\n",
                             i, pad);
    assert_true(clen > 48u * 1000 * 1000 && clen < (size_t)MAX_FILE_BYTES);
    size_t blen = 0;
    char *body = multipart(content, clen, &blen);
    char ctype[128];
    snprintf(ctype, sizeof ctype, "multipart/form-data; boundary=pwtestboundary42");

    long rss0 = proc_kb(g_router, "VmRSS");
    struct resp r;
    assert_int_equal(http("POST", "/v1/files", g_key_a, ctype, body, blen, &r), 0);
    if (r.status != 200)
        fail_msg("upload: %d %s", r.status, r.body);
    long hwm = proc_kb(g_router, "VmHWM");
    json_t *j = json_loads(r.body, 0, NULL);
    free(r.body);
    char fid[128];
    snprintf(fid, sizeof fid, "%s", json_string_value(json_object_get(j, "id")));
    assert_int_equal(json_integer_value(json_object_get(j, "bytes")), (json_int_t)clen);
    json_decref(j);
    fprintf(stderr, "uploaded %zu bytes\n", clen);
    check_rss_growth("upload", rss0, hwm);

    /* the stored object is byte for byte what was sent */
    char path[256];
    snprintf(path, sizeof path, "%s/files/%s", g_dir, fid);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *stored = malloc(clen + 1);
    size_t got = fread(stored, 1, clen + 1, f);
    fclose(f);
    assert_int_equal(got, clen);
    assert_memory_equal(stored, content, clen);
    free(stored);

    /* and the download streams it back (Content-Length, paced by the client) */
    rss0 = proc_kb(g_router, "VmRSS");
    snprintf(path, sizeof path, "/v1/files/%s/content", fid);
    assert_int_equal(http("GET", path, g_key_a, NULL, NULL, 0, &r), 0);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.len, clen);
    assert_memory_equal(r.body, content, clen);
    free(r.body);
    hwm = proc_kb(g_router, "VmHWM");
    check_rss_growth("download", rss0, hwm);

    /* a batch on it: every line is validated, streaming (every line names an unknown model) */
    rss0 = proc_kb(g_router, "VmRSS");
    char bid[128];
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_t *b = poll_batch(bid, "failed|completed|in_progress|", 0, 120);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "failed");
    json_t *data = json_object_get(json_object_get(b, "errors"), "data");
    assert_int_equal(json_array_size(data), 1000); /* ROUTER_BATCH_MAX_ERRORS */
    json_t *e0 = json_array_get(data, 0);
    assert_string_equal(json_string_value(json_object_get(e0, "code")), "model_not_found");
    assert_int_equal(json_integer_value(json_object_get(e0, "line")), 1);
    json_decref(b);
    hwm = proc_kb(g_router, "VmHWM");
    check_rss_growth("validation", rss0, hwm);

    /* over the limit by the file part (the body itself within the spool limit): 413 */
    char *over = realloc(content, (size_t)MAX_FILE_BYTES + 1);
    memset(over + clen, ' ', (size_t)MAX_FILE_BYTES + 1 - clen);
    free(body);
    body = multipart(over, (size_t)MAX_FILE_BYTES + 1, &blen);
    assert_int_equal(http("POST", "/v1/files", g_key_a, ctype, body, blen, &r), 0);
    assert_int_equal(r.status, 413);
    j = json_loads(r.body, 0, NULL);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "file_too_large");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "type")),
                        "invalid_request_error");
    json_decref(j);
    free(r.body);
    free(over);
    free(body);

    /* over the limit by Content-Length: 413 from the headers, before the body is read */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)g_port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                      "Content-Type: %s\r\nContent-Length: 300000000\r\n\r\n--pwtest",
                      g_key_a, ctype);
    assert_int_equal(write(fd, head, (size_t)hl), hl);
    char buf[4096];
    size_t n = 0;
    for (ssize_t k; n < sizeof buf - 1 && (k = read(fd, buf + n, sizeof buf - 1 - n)) > 0;)
        n += (size_t)k;
    buf[n] = '\0';
    close(fd);
    assert_true(strncmp(buf, "HTTP/1.1 413 ", 13) == 0);
    assert_non_null(strstr(buf, "\"code\":\"request_too_large\""));
    assert_non_null(strstr(buf, "{\"error\":{\"message\":"));
}

static void test_other_tenant_gets_404(void **state)
{
    (void)state;
    char fid[128], bid[128], path[256];
    char *lines = chat_lines(2, 2, "t-");
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    snprintf(path, sizeof path, "/v1/batches/%s", bid);
    json_decref(http_json("GET", path, g_key_b, NULL, 404));
    snprintf(path, sizeof path, "/v1/batches/%s/cancel", bid);
    json_decref(http_json("POST", path, g_key_b, NULL, 404));
    snprintf(path, sizeof path, "/v1/files/%s", fid);
    json_decref(http_json("GET", path, g_key_b, NULL, 404));
    json_decref(http_json("DELETE", path, g_key_b, NULL, 404));
    snprintf(path, sizeof path, "/v1/files/%s/content", fid);
    json_decref(http_json("GET", path, g_key_b, NULL, 404));
    char body[512];
    snprintf(body, sizeof body,
             "{\"input_file_id\":\"%s\",\"endpoint\":\"/v1/chat/completions\","
             "\"completion_window\":\"24h\"}",
             fid);
    json_decref(http_json("POST", "/v1/batches", g_key_b, body, 404));
    json_t *l = http_json("GET", "/v1/batches", g_key_b, NULL, 200);
    assert_int_equal(json_array_size(json_object_get(l, "data")), 0);
    json_decref(l);
    l = http_json("GET", "/v1/files", g_key_b, NULL, 200);
    assert_int_equal(json_array_size(json_object_get(l, "data")), 0);
    json_decref(l);
    json_decref(poll_batch(bid, "completed|", 0, 60));
    /* the owner deletes the input file */
    snprintf(path, sizeof path, "/v1/files/%s", fid);
    json_t *d = http_json("DELETE", path, g_key_a, NULL, 200);
    assert_true(json_is_true(json_object_get(d, "deleted")));
    json_decref(d);
    json_decref(http_json("GET", path, g_key_a, NULL, 404));
}

static void test_cancel_keeps_finished_lines(void **state)
{
    (void)state;
    char fid[128], bid[128], path[256];
    char *lines = chat_lines(60, 100, "c-");
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_decref(poll_batch(bid, NULL, 2, 120));
    snprintf(path, sizeof path, "/v1/batches/%s/cancel", bid);
    json_t *c = http_json("POST", path, g_key_a, NULL, 200);
    const char *st = json_string_value(json_object_get(c, "status"));
    assert_true(strcmp(st, "cancelling") == 0 || strcmp(st, "completed") == 0);
    json_decref(c);
    json_t *b = poll_batch(bid, "cancelled|completed|", 0, 120);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "cancelled");
    assert_true(json_is_integer(json_object_get(b, "cancelling_at")));
    assert_true(json_is_integer(json_object_get(b, "cancelled_at")));
    json_int_t done =
        json_integer_value(json_object_get(json_object_get(b, "request_counts"), "completed"));
    assert_true(done >= 2 && done < 60);
    assert_int_equal(
        check_output(json_string_value(json_object_get(b, "output_file_id")), "c-", 200), done);
    json_decref(b);
}

/* An interactive request during a running batch is served before the queued batch lines:
 * the engine keeps a slot for the interactive stream and reads it first. */
static void test_interactive_ahead_of_batch(void **state)
{
    (void)state;
    char fid[128], bid[128];
    char *lines = chat_lines(40, 200, "i-");
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_decref(poll_batch(bid, NULL, 1, 120));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    json_t *r = http_json("POST", "/v1/chat/completions", g_key_a,
                          "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":"
                          "\"now\"}],\"max_tokens\":8}",
                          200);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    json_decref(r);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    json_t *b = poll_batch(bid, "in_progress|completed|", 0, 10);
    json_int_t done = count_done(b);
    const char *st = json_string_value(json_object_get(b, "status"));
    if (strcmp(st, "in_progress") != 0 || ms > 2000)
        fail_msg("interactive took %.0f ms; batch %s with %lld of 40 done", ms, st,
                 (long long)done);
    json_decref(b);
    json_decref(poll_batch(bid, "completed|", 0, 120));
}

/* One interactive chat completion, for a thread (no cmocka asserts off the main thread). */
struct ireq {
    int status;
    double ms;
};

static void *ireq_main(void *arg)
{
    struct ireq *r = arg;
    static const char body[] = "{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\","
                               "\"content\":\"now\"}],\"max_tokens\":8}";
    struct timespec t0, t1;
    struct resp rs;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    r->status = -1;
    if (http("POST", "/v1/chat/completions", g_key_a, NULL, body, sizeof body - 1, &rs) == 0) {
        r->status = rs.status;
        free(rs.body);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    r->ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    return NULL;
}

/* Counts lines of the engine's log holding needle. */
static int engine_log_count(const char *needle)
{
    char path[256], line[4096];
    snprintf(path, sizeof path, "%s/engine.log", g_dir);
    FILE *f = fopen(path, "r");
    int n = 0;
    while (f && fgets(line, sizeof line, f))
        n += strstr(line, needle) != NULL;
    if (f)
        fclose(f);
    return n;
}

/* Three interactive requests at once while batch lines hold every other slot: the engine
 * keeps one slot for interactive work, so the other two evict batch lines, which go back
 * to the lane as attempt + 1; the batch still yields every line exactly once. */
static void test_interactive_evicts_batch_lines(void **state)
{
    (void)state;
    /* An engine whose batch lane always holds max_batch - 1 slots (no step-time cap, which
     * on a slow machine, under ASan say, would leave free slots and nothing to evict). */
    stop_pid(&g_engine, SIGTERM);
    setenv("PARKWAY_BATCH_STEP_MS", "0", 1);
    start_engine("ev");
    unsetenv("PARKWAY_BATCH_STEP_MS");
    enum { LINES = 80, N = 3, ROUNDS = 100 };
    char fid[128], bid[128];
    char *lines = chat_lines(LINES, 200, "ev-");
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_decref(poll_batch(bid, NULL, 1, 120));
    /* Rounds of N requests at once until one finds every slot taken (a round can also
     * land while the lane is between lines, with slots free: nothing to evict then). */
    int round = 0, evicted = 0;
    for (; round < ROUNDS && evicted == 0; round++) {
        pthread_t th[N];
        struct ireq r[N];
        for (int i = 0; i < N; i++)
            assert_int_equal(pthread_create(&th[i], NULL, ireq_main, &r[i]), 0);
        for (int i = 0; i < N; i++)
            pthread_join(th[i], NULL);
        for (int i = 0; i < N; i++)
            if (r[i].status != 200)
                fail_msg("round %d, interactive request %d: status %d after %.0f ms", round, i,
                         r[i].status, r[i].ms);
        evicted = engine_log_count("event=batch_line_evicted");
        usleep(10000);
    }
    json_t *b = poll_batch(bid, "completed|failed|expired|cancelled|", 0, 200);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "completed");
    json_t *rc = json_object_get(b, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "completed")), LINES);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 0);
    assert_int_equal(
        check_output(json_string_value(json_object_get(b, "output_file_id")), "ev-", 200), LINES);
    json_decref(b);
    if (evicted < 1)
        fail_msg("no batch line was evicted in %d rounds of %d interactive requests", round, N);
    stop_pid(&g_engine, SIGTERM);
    start_engine("e1");
}

/* Kills a process mid-batch and checks that exactly every line comes out once. */
static void restart_mid_batch(bool engine, bool router)
{
    char fid[128], bid[128];
    const char *prefix = engine && router ? "rb-" : engine ? "re-" : "rr-";
    char *lines = chat_lines(40, 100, prefix);
    assert_int_equal(upload(g_key_a, lines, fid, sizeof fid, NULL, 0), 200);
    free(lines);
    create_batch(g_key_a, fid, bid, sizeof bid);
    json_t *mid = poll_batch(bid, NULL, 3, 120);
    json_int_t done_at_kill =
        json_integer_value(json_object_get(json_object_get(mid, "request_counts"), "completed"));
    json_decref(mid);
    assert_true(done_at_kill < 40); /* the kill really is mid-batch */
    if (engine)
        stop_pid(&g_engine, SIGKILL);
    if (router)
        stop_pid(&g_router, SIGKILL);
    usleep(300000);
    if (router) {
        start_router();
        for (int i = 0; i < 100; i++) {
            struct resp r;
            if (http("GET", "/healthz", NULL, NULL, NULL, 0, &r) == 0) {
                free(r.body);
                break;
            }
            usleep(100000);
        }
    }
    if (engine)
        start_engine(router ? "e3" : "e2");
    /* A killed router's lock expires after ROUTER_BATCH_LOCK_MS (30 s) */
    json_t *b = poll_batch(bid, "completed|failed|expired|cancelled|", 0, 200);
    assert_string_equal(json_string_value(json_object_get(b, "status")), "completed");
    json_t *rc = json_object_get(b, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "completed")), 40);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 0);
    assert_int_equal(
        check_output(json_string_value(json_object_get(b, "output_file_id")), prefix, 200), 40);
    json_decref(b);
}

static void test_engine_killed_mid_batch_loses_nothing(void **state)
{
    (void)state;
    restart_mid_batch(true, false);
}

static void test_router_killed_mid_batch_loses_nothing(void **state)
{
    (void)state;
    restart_mid_batch(false, true);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_completes_in_order),
        cmocka_unit_test(test_bad_lines_fail_with_per_line_errors),
        cmocka_unit_test(test_upload_refusals),
        cmocka_unit_test(test_big_upload_streams),
        cmocka_unit_test(test_other_tenant_gets_404),
        cmocka_unit_test(test_cancel_keeps_finished_lines),
        cmocka_unit_test(test_interactive_ahead_of_batch),
        cmocka_unit_test(test_interactive_evicts_batch_lines),
        cmocka_unit_test(test_engine_killed_mid_batch_loses_nothing),
        cmocka_unit_test(test_router_killed_mid_batch_loses_nothing),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

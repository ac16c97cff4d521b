/*
 * Unit tests of the streaming parts of uploads and batch validation: router_multipart_scan
 * over a file body (delimiters and part headers cut by the read window, the same answers as
 * the in-memory parser), the router's spool predicate, router_batch_input_parse_stream
 * (lines cut by reads, offsets usable with pw_storage_read_at, a line over
 * ROUTER_BATCH_LINE_MAX reported and skipped) and pw_storage_read_at.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pw_storage.h"
#include "router.h"
#include "router_batch.h"
#include "router_files.h"

/* A file holding len bytes of data, unlinked; returns its descriptor. */
static int temp_fd(const void *data, size_t len)
{
    char path[] = "/tmp/pw-files-test-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        assert_true(n > 0);
        p += n;
        len -= (size_t)n;
    }
    return fd;
}

/* purpose=batch, then a file part of flen bytes ('f' + i % 7), with padding before the
 * first delimiter of pre bytes (a preamble). */
static char *make_body(size_t pre, size_t flen, size_t *len_out)
{
    size_t cap = pre + flen + 1024;
    char *b = malloc(cap);
    memset(b, 'p', pre);
    size_t n = pre;
    n += (size_t)snprintf(b + n, cap - n,
                          "%s--BoUnD\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                          "batch\r\n--BoUnD\r\nContent-Disposition: form-data; name=\"file\"; "
                          "filename=\"in.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n",
                          pre ? "\r\n" : "");
    for (size_t i = 0; i < flen; i++)
        b[n + i] = (char)('f' + i % 7);
    n += flen;
    n += (size_t)snprintf(b + n, cap - n, "\r\n--BoUnD--\r\n");
    *len_out = n;
    return b;
}

static void check_spans(const char *body, const struct router_multipart_span *s, size_t n,
                        size_t flen)
{
    assert_int_equal(n, 2);
    assert_int_equal(s[0].name_len, 7);
    assert_memory_equal(body + s[0].name_off, "purpose", 7);
    assert_false(s[0].has_filename);
    assert_int_equal(s[0].len, 5);
    assert_memory_equal(body + s[0].off, "batch", 5);
    assert_memory_equal(body + s[1].name_off, "file", 4);
    assert_true(s[1].has_filename);
    assert_int_equal(s[1].filename_len, 8);
    assert_memory_equal(body + s[1].filename_off, "in.jsonl", 8);
    assert_int_equal(s[1].len, flen);
    for (size_t i = 0; i < flen; i++)
        if (body[s[1].off + i] != (char)('f' + i % 7))
            fail_msg("file byte %zu differs", i);
}

static void test_multipart_scan_file_matches_memory(void **state)
{
    (void)state;
    const char *ct = "multipart/form-data; boundary=BoUnD";
    /* File sizes that put the closing delimiter across the 64 KiB read window, and a
     * preamble that puts the first part's headers across it. */
    static const size_t sizes[] = {0,           1,     65536 - 200,    65536 - 160,
                                   65536 - 150, 65536, 3 * 65536 + 17, 1000000};
    static const size_t pres[] = {0, 65536 - 40, 65536 - 3};
    for (size_t pi = 0; pi < sizeof pres / sizeof pres[0]; pi++) {
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            size_t len;
            char *body = make_body(pres[pi], sizes[si], &len);
            struct router_multipart_span s[4];
            size_t n = 0;
            struct router_body_src mem = {body, -1, len};
            assert_int_equal(router_multipart_scan(ct, &mem, s, 4, &n), PW_OK);
            check_spans(body, s, n, sizes[si]);
            int fd = temp_fd(body, len);
            struct router_body_src file = {NULL, fd, len};
            memset(s, 0, sizeof s);
            assert_int_equal(router_multipart_scan(ct, &file, s, 4, &n), PW_OK);
            check_spans(body, s, n, sizes[si]);
            /* cut short: no closing delimiter */
            file.len = len - 20;
            assert_int_equal(router_multipart_scan(ct, &file, s, 4, &n), PW_ERR_PARSE);
            /* too many parts for cap */
            file.len = len;
            assert_int_equal(router_multipart_scan(ct, &file, s, 1, &n), PW_ERR_TOOBIG);
            close(fd);
            free(body);
        }
    }
    /* part headers over 8 KiB */
    size_t cap = 20000;
    char *big = malloc(cap);
    int k = snprintf(big, cap, "--BoUnD\r\nContent-Disposition: form-data; name=\"x\"\r\nX-Pad: ");
    memset(big + k, 'a', 9000);
    k += 9000;
    k += snprintf(big + k, cap - (size_t)k, "\r\n\r\nv\r\n--BoUnD--\r\n");
    struct router_body_src mem = {big, -1, (uint64_t)k};
    struct router_multipart_span s[2];
    size_t n;
    assert_int_equal(router_multipart_scan(ct, &mem, s, 2, &n), PW_ERR_PARSE);
    free(big);
    /* bad content types */
    assert_int_equal(router_multipart_scan("application/json", &mem, s, 2, &n), PW_ERR_PARSE);
    assert_int_equal(router_multipart_scan(NULL, &mem, s, 2, &n), PW_ERR_PARSE);
}

/* The predicate is a pure function of the request's headers. */
static void test_spool_predicate(void **state)
{
    (void)state;
    struct router rt;
    memset(&rt, 0, sizeof rt);
    struct router_http_header h[] = {
        {"Content-Type", 12, "multipart/form-data; boundary=x", 31},
        {"Authorization", 13, "Bearer pk-x", 11},
    };
    struct router_http_request req;
    memset(&req, 0, sizeof req);
    req.method = "POST";
    req.path = "/v1/files";
    req.path_len = 9;
    req.headers = h;
    req.n_headers = 2;
    assert_int_equal(router_files_spool_limit(&req, &rt),
                     (uint64_t)ROUTER_FILES_DEFAULT_MAX_BYTES + ROUTER_FILES_MULTIPART_SLACK);
    rt.cfg.max_file_bytes = 1000;
    assert_int_equal(router_files_spool_limit(&req, &rt), 1000 + ROUTER_FILES_MULTIPART_SLACK);
    req.n_headers = 1; /* no Authorization: memory path, the small limit */
    assert_int_equal(router_files_spool_limit(&req, &rt), 0);
    req.n_headers = 2;
    req.method = "GET";
    assert_int_equal(router_files_spool_limit(&req, &rt), 0);
    req.method = "POST";
    req.path = "/v1/batches";
    req.path_len = 11;
    assert_int_equal(router_files_spool_limit(&req, &rt), 0);
    req.path = "/v1/files";
    req.path_len = 9;
    h[0].value = "application/json";
    assert_int_equal(router_files_spool_limit(&req, &rt), 0);
}

static enum router_openai_access only_tiny(void *arg, const char *model)
{
    (void)arg;
    return strcmp(model, "tiny") == 0 ? ROUTER_OPENAI_MODEL_OK : ROUTER_OPENAI_MODEL_NOT_FOUND;
}

/* Hands out at most `step` bytes per read, to cut lines everywhere. */
struct drip {
    const char *p;
    size_t left, step;
};

static enum pw_err drip_read(void *ud, void *buf, size_t cap, size_t *n_out)
{
    struct drip *d = ud;
    size_t n = d->left < cap ? d->left : cap;
    if (n > d->step)
        n = d->step;
    memcpy(buf, d->p, n);
    d->p += n;
    d->left -= n;
    *n_out = n;
    return PW_OK;
}

static enum pw_err fail_read(void *ud, void *buf, size_t cap, size_t *n_out)
{
    (void)ud;
    (void)buf;
    (void)cap;
    *n_out = 0;
    return PW_ERR_IO;
}

static enum pw_err storage_read(void *ud, void *buf, size_t cap, size_t *n_out)
{
    return pw_storage_read(ud, buf, cap, n_out);
}

static char *lines_text(int n, size_t *len_out)
{
    size_t cap = (size_t)n * 200 + 16, len = 0;
    char *s = malloc(cap);
    len += (size_t)snprintf(s, cap, "\n  \n");
    for (int i = 0; i < n; i++)
        len +=
            (size_t)snprintf(s + len, cap - len,
                             "{\"custom_id\":\"c%d\",\"method\":\"POST\",\"url\":\"/v1/chat/"
                             "completions\",\"body\":{\"model\":\"tiny\",\"messages\":[{\"role\":"
                             "\"user\",\"content\":\"m%d\"}]}}%s",
                             i, i, i == n - 1 ? "" : (i % 3 ? "\n" : "\r\n"));
    *len_out = len;
    return s;
}

static void test_input_stream_lines_and_offsets(void **state)
{
    (void)state;
    size_t len;
    char *text = lines_text(300, &len);
    static const size_t steps[] = {1, 7, 100, 65536};
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        struct drip d = {text, len, steps[k]};
        struct router_batch_input in;
        assert_int_equal(router_batch_input_parse_stream(drip_read, &d, "/v1/chat/completions",
                                                         only_tiny, NULL, &in),
                         PW_OK);
        assert_int_equal(in.n_errors, 0);
        assert_int_equal(in.n, 300);
        for (size_t i = 0; i < in.n; i++) {
            char want[32];
            snprintf(want, sizeof want, "c%zu", i);
            assert_string_equal(in.lines[i].custom_id, want);
            assert_int_equal(in.lines[i].lineno, i + 3); /* two blank lines first */
            assert_int_equal(text[in.lines[i].off], '{');
            char last = text[in.lines[i].off + in.lines[i].len - 1];
            assert_true(last == '}' || last == '\r');
        }
        router_batch_input_deinit(&in);
    }
    /* the same through storage, and each line read back by its offset */
    char dir[] = "/tmp/pw-files-store-XXXXXX";
    assert_non_null(mkdtemp(dir));
    struct pw_storage *st = NULL;
    char err[256];
    assert_int_equal(pw_storage_open(dir, &st, err, sizeof err), PW_OK);
    assert_int_equal(pw_storage_put(st, "in-1", text, len), PW_OK);
    struct pw_storage_reader *rd = NULL;
    uint64_t size = 0;
    assert_int_equal(pw_storage_reader_open(st, "in-1", &size, &rd), PW_OK);
    assert_int_equal(size, len);
    struct router_batch_input in;
    assert_int_equal(router_batch_input_parse_stream(storage_read, rd, "/v1/chat/completions",
                                                     only_tiny, NULL, &in),
                     PW_OK);
    assert_int_equal(in.n, 300);
    assert_int_equal(pw_storage_delete(st, "in-1"), PW_OK); /* the open reader still sees it */
    char buf[256];
    for (size_t i = 0; i < in.n; i += 37) {
        size_t got = 0;
        assert_true(in.lines[i].len < sizeof buf);
        assert_int_equal(pw_storage_read_at(rd, in.lines[i].off, buf, in.lines[i].len, &got),
                         PW_OK);
        assert_int_equal(got, in.lines[i].len);
        assert_memory_equal(buf, text + in.lines[i].off, got);
    }
    size_t got = 1;
    assert_int_equal(pw_storage_read_at(rd, len + 10, buf, 10, &got), PW_OK);
    assert_int_equal(got, 0);
    assert_int_equal(pw_storage_read_at(rd, len - 3, buf, 10, &got), PW_OK);
    assert_int_equal(got, 3);
    router_batch_input_deinit(&in);
    pw_storage_reader_close(rd);
    pw_storage_destroy(st);
    rmdir(dir);
    free(text);

    /* a read error is returned, nothing kept */
    assert_int_equal(router_batch_input_parse_stream(fail_read, NULL, "/v1/chat/completions",
                                                     only_tiny, NULL, &in),
                     PW_ERR_IO);
    assert_int_equal(in.n, 0);
    assert_null(in.lines);
}

/* A line longer than ROUTER_BATCH_LINE_MAX is one per-line error; the lines around it are
 * still read (and counted) right. */
static void test_input_stream_line_too_long(void **state)
{
    (void)state;
    const char *good = "{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\","
                       "\"body\":{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\","
                       "\"content\":\"x\"}]}}\n";
    size_t gl = strlen(good), long_len = ROUTER_BATCH_LINE_MAX + 12345;
    size_t len = gl + long_len + 1 + gl;
    char *text = malloc(len);
    memcpy(text, good, gl);
    memset(text + gl, 'z', long_len);
    text[gl + long_len] = '\n';
    memcpy(text + gl + long_len + 1, good, gl);
    text[gl + long_len + 1 + 14] = 'b'; /* second custom_id "b" */
    struct drip d = {text, len, 1 << 20};
    struct router_batch_input in;
    assert_int_equal(router_batch_input_parse_stream(drip_read, &d, "/v1/chat/completions",
                                                     only_tiny, NULL, &in),
                     PW_OK);
    assert_int_equal(in.n_errors, 1);
    json_t *j = json_loads(in.errors_json, 0, NULL);
    json_t *e = json_array_get(json_object_get(j, "data"), 0);
    assert_string_equal(json_string_value(json_object_get(e, "code")), "line_too_long");
    assert_int_equal(json_integer_value(json_object_get(e, "line")), 2);
    json_decref(j);
    assert_int_equal(in.n, 2);
    assert_string_equal(in.lines[1].custom_id, "b");
    assert_int_equal(in.lines[1].lineno, 3);
    assert_int_equal(in.lines[1].off, gl + long_len + 1);
    router_batch_input_deinit(&in);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_multipart_scan_file_matches_memory),
        cmocka_unit_test(test_spool_predicate),
        cmocka_unit_test(test_input_stream_lines_and_offsets),
        cmocka_unit_test(test_input_stream_line_too_long),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

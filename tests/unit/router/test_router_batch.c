/*
 * Unit tests of the pure parts of the Files and Batches APIs: multipart parsing, batch
 * input validation (per-line errors), completion windows, line ids, the batch object and
 * output lines, and the local pw_storage implementation.
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
#include "router_batch.h"
#include "router_files.h"

static enum router_openai_access only_tiny(void *arg, const char *model)
{
    (void)arg;
    if (strcmp(model, "tiny") == 0)
        return ROUTER_OPENAI_MODEL_OK;
    if (strcmp(model, "secret") == 0)
        return ROUTER_OPENAI_MODEL_DENIED;
    return ROUTER_OPENAI_MODEL_NOT_FOUND;
}

#define LINE(cid, url, model)                                                                      \
    "{\"custom_id\":\"" cid "\",\"method\":\"POST\",\"url\":\"" url                                \
    "\",\"body\":{\"model\":\"" model "\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}}"

static void test_multipart_parse(void **state)
{
    (void)state;
    const char body[] = "--XyZ\r\n"
                        "Content-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                        "batch\r\n"
                        "--XyZ\r\n"
                        "Content-Disposition: form-data; name=\"file\"; filename=\"a b.jsonl\"\r\n"
                        "Content-Type: application/jsonl\r\n\r\n"
                        "{\"x\":1}\n--not-a-boundary\n\r\n"
                        "--XyZ--\r\n";
    struct router_multipart_part parts[4];
    size_t n = 0;
    assert_int_equal(router_multipart_parse("multipart/form-data; boundary=XyZ", body,
                                            sizeof body - 1, parts, 4, &n),
                     PW_OK);
    assert_int_equal(n, 2);
    assert_int_equal(parts[0].name_len, 7);
    assert_memory_equal(parts[0].data, "batch", 5);
    assert_int_equal(parts[0].len, 5);
    assert_null(parts[0].filename);
    assert_int_equal(parts[1].filename_len, 9);
    assert_memory_equal(parts[1].filename, "a b.jsonl", 9);
    assert_int_equal(parts[1].len, strlen("{\"x\":1}\n--not-a-boundary\n"));
    /* quoted boundary, too many parts, bad content types, truncated bodies */
    assert_int_equal(router_multipart_parse("multipart/form-data; boundary=\"XyZ\"", body,
                                            sizeof body - 1, parts, 4, &n),
                     PW_OK);
    assert_int_equal(router_multipart_parse("multipart/form-data; boundary=XyZ", body,
                                            sizeof body - 1, parts, 1, &n),
                     PW_ERR_TOOBIG);
    assert_int_equal(
        router_multipart_parse("application/json", body, sizeof body - 1, parts, 4, &n),
        PW_ERR_PARSE);
    assert_int_equal(router_multipart_parse(NULL, body, sizeof body - 1, parts, 4, &n),
                     PW_ERR_PARSE);
    for (size_t cut = 0; cut < sizeof body - 10; cut++)
        assert_int_not_equal(
            router_multipart_parse("multipart/form-data; boundary=XyZ", body, cut, parts, 4, &n),
            PW_OK);
}

static void test_input_valid(void **state)
{
    (void)state;
    const char in[] = LINE("a", "/v1/chat/completions",
                           "tiny") "\n\n   \n" LINE("b", "/v1/chat/completions", "tiny") "\n";
    struct router_batch_input bi;
    assert_int_equal(
        router_batch_input_parse(in, sizeof in - 1, "/v1/chat/completions", only_tiny, NULL, &bi),
        PW_OK);
    assert_int_equal(bi.n_errors, 0);
    assert_null(bi.errors_json);
    assert_int_equal(bi.n, 2);
    assert_string_equal(bi.lines[0].custom_id, "a");
    assert_string_equal(bi.lines[1].custom_id, "b");
    assert_string_equal(bi.lines[1].function, "tiny");
    assert_int_equal(bi.lines[0].lineno, 1);
    assert_int_equal(bi.lines[1].lineno, 4);
    assert_memory_equal(in + bi.lines[1].off, "{\"custom_id\":\"b\"", 16);

    /* a line builds its request with the batch's reply stream and ids */
    struct router_openai_ctx ctx = {.request_id = "batch_x-L1",
                                    .reply_to = "pw:breply:{batch_x}",
                                    .now_unix_ms = 1000,
                                    .default_deadline_ms = 5000,
                                    .seed = 7};
    Parkway__InferenceRequest **reqs = NULL;
    size_t n = 0;
    struct router_openai_error err;
    assert_int_equal(router_batch_line_requests(in + bi.lines[1].off, bi.lines[1].len,
                                                "/v1/chat/completions", &ctx, &reqs, &n, &err),
                     PW_OK);
    assert_int_equal(n, 1);
    assert_string_equal(reqs[0]->id, "batch_x-L1");
    assert_string_equal(reqs[0]->reply_to, "pw:breply:{batch_x}");
    assert_int_equal(reqs[0]->deadline_unix_ms, 6000);
    router_openai_requests_free(reqs, n);
    router_batch_input_deinit(&bi);
}

static void expect_error(const char *in, const char *endpoint, const char *code, int line)
{
    struct router_batch_input bi;
    assert_int_equal(router_batch_input_parse(in, strlen(in), endpoint, only_tiny, NULL, &bi),
                     PW_OK);
    assert_int_equal(bi.n_errors, 1);
    json_t *j = json_loads(bi.errors_json, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "list");
    json_t *e = json_array_get(json_object_get(j, "data"), 0);
    if (strcmp(json_string_value(json_object_get(e, "code")), code) != 0)
        fail_msg("want %s, got %s", code, bi.errors_json);
    assert_int_equal(json_integer_value(json_object_get(e, "line")), line);
    assert_non_null(json_string_value(json_object_get(e, "message")));
    json_decref(j);
    router_batch_input_deinit(&bi);
}

static void test_input_errors_per_line(void **state)
{
    (void)state;
    const char *chat = "/v1/chat/completions";
    expect_error("{oops\n", chat, "invalid_json_line", 1);
    expect_error("[1,2]\n", chat, "invalid_json_line", 1);
    expect_error(
        LINE("a", "/v1/chat/completions", "tiny") "\n" LINE("a", "/v1/chat/completions", "tiny"),
        chat, "duplicate_custom_id", 2);
    expect_error(LINE("a", "/v1/completions", "tiny"), chat, "invalid_url", 1);
    expect_error(LINE("a", "/v1/chat/completions", "nope"), chat, "model_not_found", 1);
    expect_error(LINE("a", "/v1/chat/completions", "secret"), chat, "model_not_allowed", 1);
    expect_error("{\"custom_id\":\"a\",\"method\":\"GET\",\"url\":\"/v1/chat/completions\","
                 "\"body\":{}}",
                 chat, "invalid_method", 1);
    expect_error("{\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{}}", chat,
                 "missing_required_parameter", 1);
    expect_error("{\"custom_id\":\"a\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\","
                 "\"body\":{\"model\":\"tiny\",\"messages\":[{\"role\":\"user\",\"content\":"
                 "\"x\"}],\"stream\":true}}",
                 chat, "unsupported_value", 1);
    expect_error("", chat, "empty_file", 0);
    expect_error("\n\n", chat, "empty_file", 0);
    expect_error(LINE("a", "/v1/embeddings", "tiny"), "/v1/embeddings", "invalid_url", 0);
    /* a completions batch */
    struct router_batch_input bi;
    const char *c = "{\"custom_id\":\"p\",\"method\":\"POST\",\"url\":\"/v1/completions\","
                    "\"body\":{\"model\":\"tiny\",\"prompt\":[\"a\",\"b\"]}}";
    assert_int_equal(
        router_batch_input_parse(c, strlen(c), "/v1/completions", only_tiny, NULL, &bi), PW_OK);
    assert_int_equal(bi.n_errors, 0);
    assert_int_equal(bi.n, 1);
    router_batch_input_deinit(&bi);
}

static void test_windows_and_ids(void **state)
{
    (void)state;
    int64_t s = 0;
    assert_true(router_batch_parse_window("24h", &s));
    assert_int_equal(s, 86400);
    assert_true(router_batch_parse_window("30m", &s));
    assert_int_equal(s, 1800);
    assert_true(router_batch_parse_window("5s", &s));
    assert_int_equal(s, 5);
    assert_false(router_batch_parse_window("0h", &s));
    assert_false(router_batch_parse_window("-1h", &s));
    assert_false(router_batch_parse_window("24", &s));
    assert_false(router_batch_parse_window("169h", &s));
    assert_false(router_batch_parse_window("1d", &s));
    assert_false(router_batch_parse_window(NULL, &s));
    size_t i = 0;
    assert_true(router_batch_parse_line_id("batch_ab-L12", "batch_ab", &i));
    assert_int_equal(i, 12);
    assert_true(router_batch_parse_line_id("batch_ab-L3.1", "batch_ab", &i));
    assert_int_equal(i, 3);
    assert_false(router_batch_parse_line_id("batch_abc-L3", "batch_ab", &i));
    assert_false(router_batch_parse_line_id("batch_ab-L", "batch_ab", &i));
    assert_false(router_batch_parse_line_id("batch_ab-L3x", "batch_ab", &i));
    assert_false(router_batch_parse_line_id("batch_ab-L99999999", "batch_ab", &i));
    assert_false(router_batch_parse_line_id("r0012", "batch_ab", &i));
    char tag[80];
    router_files_tenant_tag("acme", tag, sizeof tag);
    assert_string_equal(tag, "acme");
    router_files_tenant_tag("a b}", tag, sizeof tag);
    assert_int_equal(strlen(tag), 65);
    assert_int_equal(tag[0], 'h');
    char tag2[80];
    router_files_tenant_tag("hacme", tag2, sizeof tag2);
    assert_int_equal(strlen(tag2), 65); /* an 'h' tenant never looks like another's hash */
}

/* A hash as pw_hash_parse_all gives it. */
static struct pw_stream_entry make_hash(struct pw_stream_field *f, size_t n, const char **kv)
{
    for (size_t i = 0; i < n; i++) {
        f[i].name = (struct pw_slice){kv[2 * i], strlen(kv[2 * i])};
        f[i].value = (struct pw_slice){kv[2 * i + 1], strlen(kv[2 * i + 1])};
    }
    struct pw_stream_entry e = {.n_fields = n, .fields = f};
    return e;
}

static void test_batch_json(void **state)
{
    (void)state;
    const char *kv[] = {"id",
                        "batch_1",
                        "endpoint",
                        "/v1/chat/completions",
                        "status",
                        "in_progress",
                        "created_at",
                        "100",
                        "total",
                        "5",
                        "completed",
                        "2",
                        "failed",
                        "1",
                        "metadata",
                        "{\"k\":\"v\"}",
                        "tenant",
                        "t",
                        "input_file_id",
                        "file-1",
                        "completion_window",
                        "24h",
                        "output_tokens",
                        "9"};
    struct pw_stream_field f[12];
    struct pw_stream_entry h = make_hash(f, 12, kv);
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(router_batch_json(&h, &out, &len), PW_OK);
    json_t *j = json_loads(out, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "batch");
    assert_int_equal(json_integer_value(json_object_get(j, "created_at")), 100);
    assert_true(json_is_null(json_object_get(j, "completed_at")));
    assert_true(json_is_null(json_object_get(j, "output_file_id")));
    assert_true(json_is_null(json_object_get(j, "errors")));
    assert_null(json_object_get(j, "tenant")); /* never shown */
    json_t *rc = json_object_get(j, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "total")), 5);
    assert_int_equal(json_integer_value(json_object_get(rc, "completed")), 2);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 1);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "metadata"), "k")),
                        "v");
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(j, "usage"), "output_tokens")), 9);
    json_decref(j);
    free(out);

    assert_int_equal(router_batch_result_line("b-L0", "c1", 200, "{\"x\":1}", 7, &out), PW_OK);
    assert_string_equal(out, "{\"id\":\"batch_req_b-L0\",\"custom_id\":\"c1\",\"response\":{"
                             "\"status_code\":200,\"request_id\":\"b-L0\",\"body\":{\"x\":1}},"
                             "\"error\":null}");
    free(out);

    const char *fkv[] = {"id", "file-1",   "bytes",   "12",      "created_at",
                         "5",  "filename", "a.jsonl", "purpose", "batch"};
    struct pw_stream_field ff[5];
    struct pw_stream_entry fh = make_hash(ff, 5, fkv);
    assert_int_equal(router_files_json(&fh, &out, &len), PW_OK);
    assert_string_equal(out, "{\"id\":\"file-1\",\"object\":\"file\",\"bytes\":12,\"created_at\":"
                             "5,\"filename\":\"a.jsonl\",\"purpose\":\"batch\",\"status\":"
                             "\"processed\",\"status_details\":null}");
    free(out);
}

static void test_storage_local(void **state)
{
    (void)state;
    char dir[] = "/tmp/pw-storage-test-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char root[128], err[256];
    snprintf(root, sizeof root, "%s/a/b", dir);
    struct pw_storage *s = NULL;
    assert_int_equal(pw_storage_open(root, &s, err, sizeof err), PW_OK);
    assert_int_equal(pw_storage_put(s, "file-1", "hello", 5), PW_OK);
    char *data = NULL;
    size_t len = 0;
    assert_int_equal(pw_storage_get(s, "file-1", 100, &data, &len), PW_OK);
    assert_int_equal(len, 5);
    assert_string_equal(data, "hello");
    free(data);
    assert_int_equal(pw_storage_get(s, "file-1", 4, &data, &len), PW_ERR_TOOBIG);
    assert_int_equal(pw_storage_get(s, "file-2", 100, &data, &len), PW_ERR_NOTFOUND);
    /* ids that could escape the root are refused */
    assert_int_equal(pw_storage_put(s, "..", "x", 1), PW_ERR_INVAL);
    assert_int_equal(pw_storage_put(s, "a/b", "x", 1), PW_ERR_INVAL);
    assert_int_equal(pw_storage_put(s, ".tmp-x", "x", 1), PW_ERR_INVAL);
    /* streaming write, abort leaves nothing, commit replaces */
    struct pw_storage_writer *w = NULL;
    assert_int_equal(pw_storage_writer_open(s, "file-1", &w), PW_OK);
    assert_int_equal(pw_storage_write(w, "zzz", 3), PW_OK);
    pw_storage_abort(w);
    assert_int_equal(pw_storage_writer_open(s, "file-1", &w), PW_OK);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(pw_storage_write(w, "0123456789", 10), PW_OK);
    /* before commit readers still see the old object */
    assert_int_equal(pw_storage_get(s, "file-1", 100, &data, &len), PW_OK);
    assert_int_equal(len, 5);
    free(data);
    assert_int_equal(pw_storage_commit(w), PW_OK);
    struct pw_storage_reader *r = NULL;
    uint64_t size = 0;
    assert_int_equal(pw_storage_reader_open(s, "file-1", &size, &r), PW_OK);
    assert_int_equal(size, 10000);
    char buf[333];
    size_t total = 0, n;
    do {
        assert_int_equal(pw_storage_read(r, buf, sizeof buf, &n), PW_OK);
        total += n;
    } while (n > 0);
    assert_int_equal(total, 10000);
    pw_storage_reader_close(r);
    assert_int_equal(pw_storage_delete(s, "file-1"), PW_OK);
    assert_int_equal(pw_storage_delete(s, "file-1"), PW_ERR_NOTFOUND);
    pw_storage_destroy(s);
    assert_int_equal(pw_storage_open("s3://bucket", &s, err, sizeof err), PW_ERR_CONFIG);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_multipart_parse),
        cmocka_unit_test(test_input_valid),
        cmocka_unit_test(test_input_errors_per_line),
        cmocka_unit_test(test_windows_and_ids),
        cmocka_unit_test(test_batch_json),
        cmocka_unit_test(test_storage_local),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

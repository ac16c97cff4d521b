/*
 * Unit: the pure helpers of the HTTP layer: the OpenAI error body (escaping, null code,
 * truncation like snprintf), request-id validation, and reason phrases.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "router_http.h"

static void test_error_json_shape(void **state)
{
    char buf[256];
    size_t n = router_http_error_json(buf, sizeof buf, "invalid_request_error", "bad_request",
                                      "bad \"thing\"\n\\ \x01");
    assert_int_equal(n, strlen(buf));
    assert_string_equal(buf, "{\"error\":{\"message\":\"bad \\\"thing\\\"\\n\\\\ \\u0001\","
                             "\"type\":\"invalid_request_error\",\"param\":null,"
                             "\"code\":\"bad_request\"}}");
}

static void test_error_json_null_code_and_defaults(void **state)
{
    char buf[256];
    router_http_error_json(buf, sizeof buf, NULL, NULL, NULL);
    assert_string_equal(buf, "{\"error\":{\"message\":\"\",\"type\":\"invalid_request_error\","
                             "\"param\":null,\"code\":null}}");
}

static void test_error_json_truncates_like_snprintf(void **state)
{
    char full[256], small[16];
    size_t need = router_http_error_json(full, sizeof full, "server_error", "x", "message");
    size_t got = router_http_error_json(small, sizeof small, "server_error", "x", "message");
    assert_int_equal(need, got);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_memory_equal(small, full, sizeof small - 1);
    assert_int_equal(router_http_error_json(NULL, 0, "server_error", "x", "message"), need);
}

static void test_request_id_valid(void **state)
{
    assert_true(router_http_request_id_valid("abc-DEF_012.x", 13));
    assert_true(router_http_request_id_valid("a", 1));
    assert_false(router_http_request_id_valid("", 0));
    assert_false(router_http_request_id_valid(NULL, 3));
    assert_false(router_http_request_id_valid("bad id", 6));
    assert_false(router_http_request_id_valid("a\r\nb", 4));
    assert_false(router_http_request_id_valid("caf\xc3\xa9", 5));
    char longid[130];
    memset(longid, 'a', sizeof longid);
    assert_true(router_http_request_id_valid(longid, 128));
    assert_false(router_http_request_id_valid(longid, 129));
}

static void test_status_reason(void **state)
{
    assert_string_equal(router_http_status_reason(200), "OK");
    assert_string_equal(router_http_status_reason(413), "Content Too Large");
    assert_string_equal(router_http_status_reason(431), "Request Header Fields Too Large");
    assert_string_equal(router_http_status_reason(799), "Unknown");
}

static void test_config_defaults(void **state)
{
    struct router_http_config cfg;
    router_http_config_init(&cfg);
    assert_int_equal(cfg.max_header_bytes, 16 * 1024);
    assert_int_equal(cfg.max_body_bytes, 8 * 1024 * 1024);
    assert_int_equal(cfg.threads, 0);
    assert_non_null(cfg.host);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_json_shape),
        cmocka_unit_test(test_error_json_null_code_and_defaults),
        cmocka_unit_test(test_error_json_truncates_like_snprintf),
        cmocka_unit_test(test_request_id_valid),
        cmocka_unit_test(test_status_reason),
        cmocka_unit_test(test_config_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

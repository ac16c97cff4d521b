/* Unit tests for pw_redis_url_parse and pw_redis_url_addr: accepted forms, defaults, errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "pw_redis.h"

static void test_plain_host_defaults(void **state)
{
    struct pw_redis_url u;
    char err[128] = "";
    assert_int_equal(pw_redis_url_parse("redis://localhost", &u, err, sizeof err), PW_OK);
    assert_int_equal(u.transport, PW_REDIS_TCP);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.port, 6379);
    assert_int_equal(u.db, 0);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "");
}

static void test_full_form(void **state)
{
    struct pw_redis_url u;
    assert_int_equal(
        pw_redis_url_parse("redis://alice:s3cret@redis.example.com:6380/4", &u, NULL, 0), PW_OK);
    assert_string_equal(u.host, "redis.example.com");
    assert_int_equal(u.port, 6380);
    assert_int_equal(u.db, 4);
    assert_string_equal(u.user, "alice");
    assert_string_equal(u.password, "s3cret");
}

static void test_password_only_and_percent_decoding(void **state)
{
    struct pw_redis_url u;
    assert_int_equal(pw_redis_url_parse("redis://:p%40ss%3Aw%2Fd%25@10.0.0.1", &u, NULL, 0), PW_OK);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "p@ss:w/d%");
    assert_string_equal(u.host, "10.0.0.1");
    assert_int_equal(u.port, 6379);
    /* a raw '@' in the password: the last '@' ends the credentials */
    assert_int_equal(pw_redis_url_parse("redis://:a@b@host:1", &u, NULL, 0), PW_OK);
    assert_string_equal(u.password, "a@b");
    assert_string_equal(u.host, "host");
    assert_int_equal(u.port, 1);
}

static void test_ipv6(void **state)
{
    struct pw_redis_url u;
    char buf[128];
    assert_int_equal(pw_redis_url_parse("redis://[::1]:6379", &u, NULL, 0), PW_OK);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 6379);
    assert_string_equal(pw_redis_url_addr(&u, buf, sizeof buf), "[::1]:6379");
    assert_int_equal(pw_redis_url_parse("redis://[fe80::1:2]/3", &u, NULL, 0), PW_OK);
    assert_string_equal(u.host, "fe80::1:2");
    assert_int_equal(u.port, 6379);
    assert_int_equal(u.db, 3);
}

static void test_unix(void **state)
{
    struct pw_redis_url u;
    char buf[256];
    assert_int_equal(pw_redis_url_parse("unix:///run/redis/redis.sock", &u, NULL, 0), PW_OK);
    assert_int_equal(u.transport, PW_REDIS_UNIX);
    assert_string_equal(u.path, "/run/redis/redis.sock");
    assert_int_equal(u.db, 0);
    assert_string_equal(pw_redis_url_addr(&u, buf, sizeof buf), "unix:/run/redis/redis.sock");
    assert_int_equal(
        pw_redis_url_parse("unix:///tmp/r.sock?db=2&password=a%26b&user=bob", &u, NULL, 0), PW_OK);
    assert_string_equal(u.path, "/tmp/r.sock");
    assert_int_equal(u.db, 2);
    assert_string_equal(u.password, "a&b");
    assert_string_equal(u.user, "bob");
}

static void test_query_on_tcp(void **state)
{
    struct pw_redis_url u;
    assert_int_equal(pw_redis_url_parse("redis://h/1?password=x", &u, NULL, 0), PW_OK);
    assert_int_equal(u.db, 1);
    assert_string_equal(u.password, "x");
    assert_int_equal(pw_redis_url_parse("redis://h:7000/", &u, NULL, 0), PW_OK);
    assert_int_equal(u.port, 7000);
    assert_int_equal(u.db, 0);
}

/* Each bad URL gives PW_ERR_CONFIG and a reason containing the expected words. */
static void expect_bad(const char *url, const char *words)
{
    struct pw_redis_url u;
    char err[256] = "";
    enum pw_err rc = pw_redis_url_parse(url, &u, err, sizeof err);
    if (rc != PW_ERR_CONFIG || !strstr(err, words))
        fail_msg("url %s: rc=%d err=\"%s\", wanted \"%s\"", url, rc, err, words);
}

static void test_errors(void **state)
{
    expect_bad("http://host", "must start with");
    expect_bad("rediss://host", "TLS");
    expect_bad("redis://", "missing host");
    expect_bad("redis://host:0", "port");
    expect_bad("redis://host:65536", "port");
    expect_bad("redis://host:12ab", "port");
    expect_bad("redis://host/abc", "database");
    expect_bad("redis://host/-1", "database");
    expect_bad("redis://host/99999999", "database");
    expect_bad("redis://::1:6379", "brackets");
    expect_bad("redis://[::1", "']'");
    expect_bad("redis://[::1]x", "after ']'");
    expect_bad("redis://[zz]:1", "IPv6");
    expect_bad("redis://user@host", "user:password");
    expect_bad("redis://:pa%zzss@host", "percent-escape");
    expect_bad("redis://:pa%2@host", "percent-escape");
    expect_bad("redis://:a%00b@host", "%00");
    expect_bad("redis://ho$t", "bad character");
    expect_bad("redis://host?foo=1", "unknown query");
    expect_bad("redis://host?db", "without '='");
    expect_bad("redis://ho st", "space");
    expect_bad("unix://relative/sock", "absolute");
    expect_bad("unix:///", "directory");
    expect_bad("unix:///tmp/dir/", "directory");
    char longpath[300] = "unix:///";
    memset(longpath + 8, 'a', 200);
    longpath[208] = '\0';
    expect_bad(longpath, "longer than");
}

static void test_error_never_echoes_password(void **state)
{
    struct pw_redis_url u;
    char err[256] = "";
    assert_int_equal(pw_redis_url_parse("redis://:hunter2@host:99999", &u, err, sizeof err),
                     PW_ERR_CONFIG);
    assert_null(strstr(err, "hunter2"));
}

static void test_null_args(void **state)
{
    struct pw_redis_url u;
    assert_int_equal(pw_redis_url_parse(NULL, &u, NULL, 0), PW_ERR_INVAL);
    assert_int_equal(pw_redis_url_parse("redis://h", NULL, NULL, 0), PW_ERR_INVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_host_defaults),
        cmocka_unit_test(test_full_form),
        cmocka_unit_test(test_password_only_and_percent_decoding),
        cmocka_unit_test(test_ipv6),
        cmocka_unit_test(test_unix),
        cmocka_unit_test(test_query_on_tcp),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_error_never_echoes_password),
        cmocka_unit_test(test_null_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

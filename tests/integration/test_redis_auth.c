/*
 * Integration: credentials, database selection and unix sockets, on a server started with
 * --requirepass and a unix socket. A wrong or missing password must give PW_ERR_AUTH with a
 * clear reason, from both the async client and the blocking helper.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "pw_redis.h"
#include "pw_test_redis.h"

/* needs percent-encoding in a URL: exercises the decoder end to end */
static struct pw_test_redis server = {.password = "s3cr@t:pw/%", .unix_socket = true};

struct got {
    bool done;
    enum pw_err err;
    char str[128];
    char errstr[256];
};

static void got_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err, const char *errstr,
                   void *ud)
{
    struct got *g = ud;
    g->done = true;
    g->err = err;
    if (reply && reply->str)
        snprintf(g->str, sizeof g->str, "%.*s", (int)reply->len, reply->str);
    snprintf(g->errstr, sizeof g->errstr, "%s", errstr ? errstr : "");
}

/* Creates a client for url, sends one command, returns what its callback saw. */
static struct got one_command(const char *url, const char *cmd, const char *arg)
{
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    struct pw_redis_opts opts = {.backoff_initial_ms = 1000};
    assert_int_equal(pw_redis_create(base, url, &opts, &r, NULL, 0), PW_OK);
    struct got g = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &g, cmd, arg, NULL), PW_OK);
    assert_true(pw_test_run_until(base, &g.done, 5000));
    pw_redis_destroy(r);
    event_base_free(base);
    return g;
}

static void test_password_ok(void **state)
{
    struct got g = one_command(server.url, "PING", NULL);
    assert_int_equal(g.err, PW_OK);
    assert_string_equal(g.str, "PONG");
}

static void test_wrong_password(void **state)
{
    char url[256];
    snprintf(url, sizeof url, "redis://:wrong@127.0.0.1:%d", server.port);
    pw_test_log_clear();
    struct got g = one_command(url, "PING", NULL);
    assert_int_equal(g.err, PW_ERR_AUTH);
    assert_non_null(strstr(g.errstr, "AUTH failed"));
    assert_non_null(strstr(g.errstr, "WRONGPASS"));
    const char *line = pw_test_log_find("event=redis_connect_failed");
    assert_non_null(line);
    assert_non_null(strstr(line, "AUTH failed"));
    assert_null(strstr(line, "wrong")); /* the password never reaches the log */
}

static void test_missing_password(void **state)
{
    char url[256];
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", server.port);
    struct got g = one_command(url, "PING", NULL);
    assert_int_equal(g.err, PW_ERR_AUTH);
    assert_non_null(strstr(g.errstr, "requires a password"));
}

static void test_wrong_password_fails_fast_afterwards(void **state)
{
    char url[256];
    snprintf(url, sizeof url, "redis://:wrong@127.0.0.1:%d", server.port);
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    struct pw_redis_opts opts = {.backoff_initial_ms = 2000};
    assert_int_equal(pw_redis_create(base, url, &opts, &r, NULL, 0), PW_OK);
    struct got g1 = {0}, g2 = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &g1, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &g1.done, 5000));
    assert_false(pw_redis_is_connected(r));
    assert_non_null(strstr(pw_redis_errstr(r), "AUTH failed"));
    /* waiting to retry: the next command fails at once, still as an auth error */
    assert_int_equal(pw_redis_command(r, got_cb, &g2, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &g2.done, 100));
    assert_int_equal(g2.err, PW_ERR_AUTH);
    pw_redis_destroy(r);
    event_base_free(base);
}

static void test_select_db(void **state)
{
    char url[300];
    snprintf(url, sizeof url, "%s/3", server.url);
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    assert_int_equal(pw_redis_create(base, url, NULL, &r, NULL, 0), PW_OK);
    struct got g = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &g, "SET", "where", "db3", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &g.done, 5000));
    assert_int_equal(g.err, PW_OK);
    pw_redis_destroy(r);
    event_base_free(base);

    /* db 0 does not have it, db 3 does (blocking helper, same URL rules) */
    redisContext *c = NULL;
    char err[256];
    assert_int_equal(pw_redis_sync_connect(server.url, 2000, &c, err, sizeof err), PW_OK);
    redisReply *rep = redisCommand(c, "GET where");
    assert_int_equal(rep->type, REDIS_REPLY_NIL);
    freeReplyObject(rep);
    redisFree(c);
    assert_int_equal(pw_redis_sync_connect(url, 2000, &c, err, sizeof err), PW_OK);
    rep = redisCommand(c, "GET where");
    assert_string_equal(rep->str, "db3");
    freeReplyObject(rep);
    redisFree(c);

    /* a database the server does not have */
    snprintf(url, sizeof url, "%s/999", server.url);
    struct got bad = one_command(url, "PING", NULL);
    assert_int_equal(bad.err, PW_ERR_REDIS);
    assert_non_null(strstr(bad.errstr, "SELECT 999 failed"));
    assert_int_equal(pw_redis_sync_connect(url, 2000, &c, err, sizeof err), PW_ERR_REDIS);
    assert_non_null(strstr(err, "SELECT"));
}

static void test_sync_auth_errors(void **state)
{
    char url[256], err[256] = "";
    redisContext *c = NULL;
    snprintf(url, sizeof url, "redis://:wrong@127.0.0.1:%d", server.port);
    assert_int_equal(pw_redis_sync_connect(url, 2000, &c, err, sizeof err), PW_ERR_AUTH);
    assert_null(c);
    assert_non_null(strstr(err, "AUTH failed"));
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", server.port);
    assert_int_equal(pw_redis_sync_connect(url, 2000, &c, err, sizeof err), PW_ERR_AUTH);
    assert_non_null(strstr(err, "requires a password"));
    /* ACL user form: the default user with the right password */
    char enc[128];
    snprintf(enc, sizeof enc, "%s", strstr(server.url, "://:") + 4);
    snprintf(url, sizeof url, "redis://default:%s", enc);
    assert_int_equal(pw_redis_sync_connect(url, 2000, &c, err, sizeof err), PW_OK);
    redisFree(c);
}

static void test_unix_socket(void **state)
{
    assert_non_null(strstr(server.unix_url, "unix:///"));
    struct got g = one_command(server.unix_url, "PING", NULL);
    assert_int_equal(g.err, PW_OK);
    assert_string_equal(g.str, "PONG");
    redisContext *c = NULL;
    char err[256];
    assert_int_equal(pw_redis_sync_connect(server.unix_url, 2000, &c, err, sizeof err), PW_OK);
    redisFree(c);
    /* a socket that does not exist: refused at connect, reported clearly */
    struct got missing = one_command("unix:///nonexistent/redis.sock", "PING", NULL);
    assert_int_equal(missing.err, PW_ERR_REDIS);
    assert_non_null(strstr(missing.errstr, "connect failed"));
}

static int group_setup(void **state)
{
    pw_test_redis_require();
    pw_test_log_capture();
    return pw_test_redis_start(&server) == PW_OK ? 0 : -1;
}

static int group_teardown(void **state)
{
    pw_test_redis_stop(&server);
    pw_test_log_release();
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_password_ok),
        cmocka_unit_test(test_wrong_password),
        cmocka_unit_test(test_missing_password),
        cmocka_unit_test(test_wrong_password_fails_fast_afterwards),
        cmocka_unit_test(test_select_db),
        cmocka_unit_test(test_sync_auth_errors),
        cmocka_unit_test(test_unix_socket),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

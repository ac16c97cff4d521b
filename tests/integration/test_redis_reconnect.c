/*
 * Integration: the server goes away and comes back. The client must log the disconnect,
 * fail commands fast while it is gone (and fail the one in flight), reconnect with backoff,
 * log the reconnect, serve commands again and re-subscribe its channels. Data survives a
 * restart only with AOF, which the fixture can turn on.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_redis.h"
#include "pw_test_redis.h"

static struct pw_test_redis server = {.appendonly = true};

struct got {
    bool done;
    int calls;
    enum pw_err err;
    char str[128];
    char errstr[256];
};

static void got_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err, const char *errstr,
                   void *ud)
{
    struct got *g = ud;
    g->calls++;
    g->done = true;
    g->err = err;
    if (reply && reply->str)
        snprintf(g->str, sizeof g->str, "%.*s", (int)reply->len, reply->str);
    snprintf(g->errstr, sizeof g->errstr, "%s", errstr ? errstr : "");
}

static enum pw_err ping(struct event_base *base, struct pw_redis *r)
{
    struct got g = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &g, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &g.done, 5000));
    return g.err;
}

/* Runs the loop until the client's state equals want (or 10 s pass). */
static bool wait_connected(struct event_base *base, struct pw_redis *r, bool want)
{
    for (int i = 0; i < 1000; i++) {
        if (pw_redis_is_connected(r) == want)
            return true;
        pw_test_run_for(base, 10);
    }
    return false;
}

struct msg_got {
    bool done;
    int n;
};

static void msg_cb(struct pw_redis *r, const char *channel, size_t channel_len, const char *payload,
                   size_t payload_len, void *ud)
{
    struct msg_got *m = ud;
    m->n++;
    m->done = true;
}

static void test_restart_mid_test(void **state)
{
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    struct pw_redis_opts opts = {.backoff_initial_ms = 50, .backoff_max_ms = 400};
    assert_int_equal(pw_redis_create(base, server.url, &opts, &r, NULL, 0), PW_OK);
    assert_int_equal(ping(base, r), PW_OK);
    struct got set = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &set, "SET", "survives", "aof", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &set.done, 5000));
    struct msg_got m = {0};
    assert_int_equal(pw_redis_subscribe(r, "pw:wake", msg_cb, &m), PW_OK);
    for (int i = 0; i < 500 && !pw_redis_subscriber_is_connected(r); i++)
        pw_test_run_for(base, 10);
    assert_true(pw_redis_subscriber_is_connected(r));

    /* a blocking command is in flight when the server goes */
    struct got inflight = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &inflight, "BLPOP", "never{x}", "30", NULL),
                     PW_OK);
    pw_test_run_for(base, 50);
    pw_test_log_clear();

    pw_test_redis_kill(&server);
    assert_true(pw_test_run_until(base, &inflight.done, 5000));
    assert_int_equal(inflight.calls, 1);
    assert_int_equal(inflight.err, PW_ERR_REDIS);
    assert_non_null(strstr(inflight.errstr, "connection lost"));
    assert_true(wait_connected(base, r, false));
    const char *down = pw_test_log_find("event=redis_disconnected");
    assert_non_null(down);
    assert_non_null(strstr(down, "level=warn"));
    assert_non_null(strstr(down, "addr=127.0.0.1:"));

    /* while it is gone: fail fast, from the loop, with the reason */
    pw_test_run_for(base, 300); /* a few refused attempts */
    uint64_t t0 = pw_clock_mono_ms();
    struct got fast = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &fast, "PING", NULL), PW_OK);
    assert_false(fast.done);
    assert_true(pw_test_run_until(base, &fast.done, 5000));
    assert_true(fast.err == PW_ERR_REDIS);
    assert_non_null(strstr(fast.errstr, "not connected"));
    assert_true(pw_clock_mono_ms() - t0 < 1000);
    assert_true(pw_test_log_count("event=redis_connect_failed") >= 2);

    /* back on the same port */
    assert_int_equal(pw_test_redis_resume(&server), PW_OK);
    assert_true(wait_connected(base, r, true));
    const char *up = pw_test_log_find("event=redis_connected conn=cmd");
    assert_non_null(up);
    assert_non_null(strstr(up, "level=info"));
    const char *attempt = strstr(up, "attempt=");
    assert_non_null(attempt);
    assert_true(atoi(attempt + 8) >= 2); /* it had to retry */
    assert_int_equal(ping(base, r), PW_OK);

    /* AOF kept the data */
    struct got get = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &get, "GET", "survives", NULL), PW_OK);
    assert_true(pw_test_run_until(base, &get.done, 5000));
    assert_string_equal(get.str, "aof");

    /* the subscriber came back and subscribed again */
    for (int i = 0; i < 100 && !m.done; i++) {
        struct got pub = {0};
        struct pw_slice p = {"fn", 2};
        assert_int_equal(pw_publish(r, "pw:wake", p, got_cb, &pub), PW_OK);
        assert_true(pw_test_run_until(base, &pub.done, 5000));
        pw_test_run_for(base, 20);
    }
    assert_true(m.done);

    /* a graceful restart (SIGTERM) too */
    pw_test_log_clear();
    assert_int_equal(pw_test_redis_restart(&server), PW_OK);
    assert_true(wait_connected(base, r, false) || pw_test_log_count("redis_disconnected") > 0);
    assert_true(wait_connected(base, r, true));
    assert_int_equal(ping(base, r), PW_OK);
    assert_true(pw_test_log_count("event=redis_disconnected conn=cmd") == 1);
    assert_true(pw_test_log_count("event=redis_connected conn=cmd") == 1);

    pw_redis_destroy(r);
    event_base_free(base);
}

struct lost_ctx {
    bool done;
    int calls;
    enum pw_err err;
};

static void destroy_on_lost_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                               const char *errstr, void *ud)
{
    struct lost_ctx *l = ud;
    l->calls++;
    l->err = err;
    l->done = true;
    pw_redis_destroy(r); /* inside hiredis's teardown of the dropped connection */
}

static void test_destroy_while_connection_drops(void **state)
{
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    assert_int_equal(pw_redis_create(base, server.url, NULL, &r, NULL, 0), PW_OK);
    assert_int_equal(ping(base, r), PW_OK);
    struct lost_ctx a = {0};
    struct got b = {0};
    assert_int_equal(pw_redis_command(r, destroy_on_lost_cb, &a, "BLPOP", "n{1}", "30", NULL),
                     PW_OK);
    assert_int_equal(pw_redis_command(r, got_cb, &b, "BLPOP", "n{2}", "30", NULL), PW_OK);
    pw_test_run_for(base, 50);
    pw_test_redis_kill(&server);
    assert_true(pw_test_run_until(base, &a.done, 5000));
    pw_test_run_for(base, 20);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.err, PW_ERR_REDIS);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.err, PW_ERR_CANCELLED);
    event_base_free(base);
    assert_int_equal(pw_test_redis_resume(&server), PW_OK);
}

static void test_backoff_is_capped(void **state)
{
    struct event_base *base = event_base_new();
    struct pw_redis *r = NULL;
    struct pw_redis_opts opts = {.backoff_initial_ms = 10, .backoff_max_ms = 40};
    pw_test_log_clear();
    /* port 1 refuses at once: attempts are paced only by the backoff */
    assert_int_equal(pw_redis_create(base, "redis://127.0.0.1:1", &opts, &r, NULL, 0), PW_OK);
    pw_test_run_for(base, 600);
    unsigned n = pw_redis_attempts(r);
    /* with a 40 ms cap (delays 20..40 ms) 600 ms allow about 15..30 attempts, not 6 */
    assert_true(n >= 10);
    assert_true(n <= 40);
    pw_redis_destroy(r);
    event_base_free(base);
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
        cmocka_unit_test(test_restart_mid_test),
        cmocka_unit_test(test_destroy_while_connection_drops),
        cmocka_unit_test(test_backoff_is_capped),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

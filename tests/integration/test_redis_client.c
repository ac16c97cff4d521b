/*
 * Integration: the async pw_redis client against a real redis-server: connect and PING,
 * commands queued during the handshake, binary-safe arguments, error replies, hash helpers,
 * pub/sub, destroy from inside a callback and with commands in flight, an unreachable server,
 * and the blocking helper.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "pw_keyspace.h"
#include "pw_redis.h"
#include "pw_test_redis.h"

static struct pw_test_redis server;

/* What one callback saw. */
struct got {
    bool done;
    int calls;
    enum pw_err err;
    int type;
    long long integer;
    char str[256];
    size_t len;
    char errstr[256];
};

static void got_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err, const char *errstr,
                   void *ud)
{
    struct got *g = ud;
    g->calls++;
    g->done = true;
    g->err = err;
    g->type = reply ? reply->type : 0;
    if (reply && reply->type == REDIS_REPLY_INTEGER)
        g->integer = reply->integer;
    if (reply && reply->str) {
        g->len = reply->len < sizeof g->str ? reply->len : sizeof g->str - 1;
        memcpy(g->str, reply->str, g->len);
        g->str[g->len] = '\0';
    }
    snprintf(g->errstr, sizeof g->errstr, "%s", errstr ? errstr : "");
}

struct fixture {
    struct event_base *base;
    struct pw_redis *r;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    f->base = event_base_new();
    char err[256];
    assert_int_equal(pw_redis_create(f->base, server.url, NULL, &f->r, err, sizeof err), PW_OK);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    pw_redis_destroy(f->r);
    /* let hiredis finish anything it deferred, then free the loop */
    event_base_loop(f->base, EVLOOP_NONBLOCK);
    event_base_free(f->base);
    free(f);
    pw_test_log_clear();
    return 0;
}

static void test_connect_and_ping(void **state)
{
    struct fixture *f = *state;
    struct got g = {0};
    /* sent before the loop ever ran: waits in the queue for the handshake */
    assert_false(pw_redis_is_connected(f->r));
    assert_int_equal(pw_redis_command(f->r, got_cb, &g, "PING", NULL), PW_OK);
    assert_false(g.done); /* never called from inside the call */
    assert_true(pw_test_run_until(f->base, &g.done, 5000));
    assert_int_equal(g.err, PW_OK);
    assert_int_equal(g.type, REDIS_REPLY_STATUS);
    assert_string_equal(g.str, "PONG");
    assert_true(pw_redis_is_connected(f->r));
    assert_int_equal(pw_redis_attempts(f->r), 0);
    const char *line = pw_test_log_find("event=redis_connected");
    assert_non_null(line);
    assert_non_null(strstr(line, "conn=cmd"));
    assert_non_null(strstr(line, "attempt=1"));
}

static void test_binary_safe_arguments(void **state)
{
    struct fixture *f = *state;
    struct got set = {0}, get = {0};
    const char val[] = {'a', '\0', 'b', '\r', '\n', '%', 's'};
    const char *argv[] = {"SET", "bin{key}", val};
    size_t lens[] = {3, 8, sizeof val};
    assert_int_equal(pw_redis_command_argv(f->r, 3, argv, lens, got_cb, &set), PW_OK);
    const char *gargv[] = {"GET", "bin{key}"};
    assert_int_equal(pw_redis_command_argv(f->r, 2, gargv, NULL, got_cb, &get), PW_OK);
    assert_true(pw_test_run_until(f->base, &get.done, 5000));
    assert_int_equal(set.err, PW_OK);
    assert_int_equal(get.err, PW_OK);
    assert_int_equal(get.len, sizeof val);
    assert_memory_equal(get.str, val, sizeof val);
}

static void test_error_reply(void **state)
{
    struct fixture *f = *state;
    struct got g = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &g, "NOSUCHCOMMAND", "x", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &g.done, 5000));
    assert_int_equal(g.err, PW_ERR_REDIS);
    assert_int_equal(g.type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(g.errstr, "unknown command"));
    /* bad arguments are refused without a callback */
    assert_int_equal(pw_redis_command_argv(f->r, 0, NULL, NULL, got_cb, &g), PW_ERR_INVAL);
}

struct hash_got {
    bool done;
    enum pw_err err;
    struct pw_stream_entries *e;
};

static void entries_cb(struct pw_redis *r, struct pw_stream_entries *e, enum pw_err err,
                       const char *errstr, void *ud)
{
    struct hash_got *h = ud;
    h->done = true;
    h->err = err;
    h->e = e;
}

static void test_hash_helpers(void **state)
{
    struct fixture *f = *state;
    char key[PW_KEY_MAX];
    assert_int_equal(pw_key_workers(key, sizeof key, "fn1"), PW_OK);
    struct got s1 = {0}, s2 = {0}, get = {0}, del = {0}, miss = {0};
    struct pw_slice v1 = {"st\0atus", 7}, v2 = {"two", 3};
    assert_int_equal(pw_hash_set(f->r, key, "w1", v1, got_cb, &s1), PW_OK);
    assert_int_equal(pw_hash_set(f->r, key, "w2", v2, got_cb, &s2), PW_OK);
    assert_int_equal(pw_hash_get(f->r, key, "w1", got_cb, &get), PW_OK);
    struct hash_got all = {0};
    assert_int_equal(pw_hash_get_all(f->r, key, entries_cb, &all), PW_OK);
    assert_int_equal(pw_hash_del(f->r, key, "w2", got_cb, &del), PW_OK);
    assert_int_equal(pw_hash_get(f->r, key, "w2", got_cb, &miss), PW_OK);
    assert_true(pw_test_run_until(f->base, &miss.done, 5000));
    assert_int_equal(s1.integer, 1);
    assert_int_equal(get.len, 7);
    assert_memory_equal(get.str, "st\0atus", 7);
    assert_int_equal(all.err, PW_OK);
    assert_int_equal(all.e->n, 1);
    assert_int_equal(all.e->v[0].n_fields, 2);
    assert_int_equal(pw_stream_entry_get(&all.e->v[0], "w1")->len, 7);
    pw_stream_entries_free(all.e);
    assert_int_equal(del.integer, 1);
    assert_int_equal(miss.err, PW_OK);
    assert_int_equal(miss.type, REDIS_REPLY_NIL);
}

struct msg_got {
    bool done;
    int n;
    char channel[64];
    char payload[64];
    size_t payload_len;
};

static void msg_cb(struct pw_redis *r, const char *channel, size_t channel_len, const char *payload,
                   size_t payload_len, void *ud)
{
    struct msg_got *m = ud;
    m->n++;
    m->done = true;
    snprintf(m->channel, sizeof m->channel, "%.*s", (int)channel_len, channel);
    m->payload_len = payload_len < sizeof m->payload ? payload_len : sizeof m->payload;
    memcpy(m->payload, payload, m->payload_len);
}

/* Publishes until one receiver is counted: SUBSCRIBE may still be on its way. */
static void publish_until_received(struct fixture *f, const char *channel, struct pw_slice p,
                                   struct msg_got *m)
{
    for (int i = 0; i < 100 && !m->done; i++) {
        struct got pub = {0};
        assert_int_equal(pw_publish(f->r, channel, p, got_cb, &pub), PW_OK);
        assert_true(pw_test_run_until(f->base, &pub.done, 5000));
        assert_int_equal(pub.err, PW_OK);
        if (pub.integer >= 1)
            assert_true(pw_test_run_until(f->base, &m->done, 5000));
        else
            pw_test_run_for(f->base, 20);
    }
}

static void test_pubsub(void **state)
{
    struct fixture *f = *state;
    struct msg_got m = {0}, other = {0};
    assert_int_equal(pw_redis_subscribe(f->r, PW_KEY_WAKE, msg_cb, &m), PW_OK);
    assert_int_equal(pw_redis_subscribe(f->r, PW_KEY_WAKE, msg_cb, &m), PW_ERR_EXISTS);
    assert_int_equal(pw_redis_subscribe(f->r, "pw:other", msg_cb, &other), PW_OK);
    struct pw_slice p = {"fn\0x", 4};
    publish_until_received(f, PW_KEY_WAKE, p, &m);
    assert_true(m.done);
    assert_true(pw_redis_subscriber_is_connected(f->r));
    assert_string_equal(m.channel, "pw:wake");
    assert_int_equal(m.payload_len, 4);
    assert_memory_equal(m.payload, "fn\0x", 4);
    assert_int_equal(other.n, 0);
    /* the command connection still works beside the subscriber */
    struct got g = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &g, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &g.done, 5000));
    assert_int_equal(g.err, PW_OK);
    assert_non_null(pw_test_log_find("conn=sub"));
}

/* Destroys the client from inside the first reply; the rest must be cancelled, once each. */
struct destroy_ctx {
    int calls;
    bool done;
};

static void destroy_in_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                          const char *errstr, void *ud)
{
    struct destroy_ctx *d = ud;
    d->calls++;
    pw_redis_destroy(r);
    /* closing: new commands are refused, and the client is still readable */
    assert_int_equal(pw_redis_command(r, NULL, NULL, "PING", NULL), PW_ERR_CLOSED);
    d->done = true;
}

static void test_destroy_inside_callback(void **state)
{
    struct fixture *f = *state;
    struct got warm = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &warm, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &warm.done, 5000));

    struct destroy_ctx d = {0};
    struct got later[2] = {{0}};
    assert_int_equal(pw_redis_command(f->r, destroy_in_cb, &d, "PING", NULL), PW_OK);
    assert_int_equal(pw_redis_command(f->r, got_cb, &later[0], "PING", NULL), PW_OK);
    assert_int_equal(pw_redis_command(f->r, got_cb, &later[1], "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &d.done, 5000));
    f->r = NULL; /* gone */
    pw_test_run_for(f->base, 50);
    assert_int_equal(d.calls, 1);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(later[i].calls, 1);
        /* answered in the same read as the first, or cancelled by the destroy */
        assert_true(later[i].err == PW_OK || later[i].err == PW_ERR_CANCELLED);
    }
}

static void test_destroy_with_commands_in_flight(void **state)
{
    struct fixture *f = *state;
    struct got warm = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &warm, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &warm.done, 5000));
    struct got blocked = {0}, queued = {0};
    /* a blocking read that will not be answered for 10 s */
    assert_int_equal(pw_redis_command(f->r, got_cb, &blocked, "BLPOP", "nothing{here}", "10", NULL),
                     PW_OK);
    pw_test_run_for(f->base, 50); /* written to the socket */
    assert_int_equal(pw_redis_command(f->r, got_cb, &queued, "PING", NULL), PW_OK);
    pw_redis_destroy(f->r);
    f->r = NULL;
    assert_int_equal(blocked.calls, 1);
    assert_int_equal(blocked.err, PW_ERR_CANCELLED);
    assert_int_equal(queued.calls, 1);
    assert_int_equal(queued.err, PW_ERR_CANCELLED);
}

static void test_unreachable_server(void **state)
{
    struct fixture *f = *state;
    /* port 1: nothing listens there, connect is refused at once */
    const char *url = "redis://127.0.0.1:1";
    struct pw_redis *r = NULL;
    struct pw_redis_opts opts = {.backoff_initial_ms = 20, .backoff_max_ms = 40, .name = "probe"};
    char err[256];
    assert_int_equal(pw_redis_create(f->base, url, &opts, &r, err, sizeof err), PW_OK);
    struct got first = {0};
    assert_int_equal(pw_redis_command(r, got_cb, &first, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &first.done, 5000));
    assert_int_equal(first.err, PW_ERR_REDIS);
    assert_non_null(strstr(first.errstr, "not connected"));
    assert_non_null(strstr(first.errstr, "refused"));
    assert_false(pw_redis_is_connected(r));
    assert_non_null(strstr(pw_redis_errstr(r), "refused"));
    /* fails fast while waiting to retry */
    pw_test_run_for(f->base, 100);
    assert_true(pw_redis_attempts(r) >= 2);
    const char *line = pw_test_log_find("event=redis_connect_failed");
    assert_non_null(line);
    assert_non_null(strstr(line, "name=probe"));
    pw_redis_destroy(r);
}

static void destroy_on_failure_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err,
                                  const char *errstr, void *ud)
{
    struct got *g = ud;
    g->calls++;
    g->err = err;
    g->done = true;
    pw_redis_destroy(r); /* from a deferred failure callback */
}

static void test_destroy_inside_failure_callback(void **state)
{
    struct fixture *f = *state;
    struct pw_redis *r = NULL;
    assert_int_equal(pw_redis_create(f->base, "redis://127.0.0.1:1", NULL, &r, NULL, 0), PW_OK);
    struct got a = {0}, b = {0};
    assert_int_equal(pw_redis_command(r, destroy_on_failure_cb, &a, "PING", NULL), PW_OK);
    assert_int_equal(pw_redis_command(r, got_cb, &b, "PING", NULL), PW_OK);
    assert_true(pw_test_run_until(f->base, &a.done, 5000));
    pw_test_run_for(f->base, 20);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.err, PW_ERR_REDIS);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.err, PW_ERR_CANCELLED);
}

static void destroy_on_message_cb(struct pw_redis *r, const char *channel, size_t channel_len,
                                  const char *payload, size_t payload_len, void *ud)
{
    struct msg_got *m = ud;
    m->n++;
    m->done = true;
    pw_redis_destroy(r); /* from inside a pub/sub message */
}

static void test_destroy_inside_message_callback(void **state)
{
    struct fixture *f = *state;
    struct pw_redis *sub = NULL;
    assert_int_equal(pw_redis_create(f->base, server.url, NULL, &sub, NULL, 0), PW_OK);
    struct msg_got m = {0};
    assert_int_equal(pw_redis_subscribe(sub, "pw:bye", destroy_on_message_cb, &m), PW_OK);
    publish_until_received(f, "pw:bye", (struct pw_slice){"x", 1}, &m);
    assert_true(m.done);
    pw_test_run_for(f->base, 20);
    assert_int_equal(m.n, 1);
}

static void test_create_bad_url(void **state)
{
    struct fixture *f = *state;
    struct pw_redis *r = (void *)1;
    char err[256] = "";
    assert_int_equal(pw_redis_create(f->base, "redis://host:notaport", NULL, &r, err, sizeof err),
                     PW_ERR_CONFIG);
    assert_null(r);
    assert_non_null(strstr(err, "port"));
    pw_redis_destroy(NULL);
}

static void test_sync_connect(void **state)
{
    redisContext *c = NULL;
    char err[256] = "";
    assert_int_equal(pw_redis_sync_connect(server.url, 2000, &c, err, sizeof err), PW_OK);
    redisReply *rep = redisCommand(c, "PING");
    assert_non_null(rep);
    assert_string_equal(rep->str, "PONG");
    freeReplyObject(rep);
    redisFree(c);
    assert_int_equal(pw_redis_sync_connect("redis://127.0.0.1:1", 500, &c, err, sizeof err),
                     PW_ERR_IO);
    assert_null(c);
    assert_non_null(strstr(err, "127.0.0.1:1"));
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
        cmocka_unit_test_setup_teardown(test_connect_and_ping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_binary_safe_arguments, setup, teardown),
        cmocka_unit_test_setup_teardown(test_error_reply, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hash_helpers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pubsub, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_inside_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_with_commands_in_flight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unreachable_server, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_inside_failure_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_destroy_inside_message_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_create_bad_url, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_connect, setup, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

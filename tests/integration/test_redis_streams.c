/*
 * Integration: the stream helpers against a real redis-server: consumer group creation (and
 * BUSYGROUP as success), XADD of a binary payload with NUL bytes, XREADGROUP, XACK, XPENDING,
 * XAUTOCLAIM from a dead consumer, and XREAD of a reply stream with and without BLOCK.
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

struct got {
    bool done;
    enum pw_err err;
    int type;
    long long integer;
    char str[128];
    size_t elements;
    long long first_integer; /* element[0] when an array of integer-first (XPENDING) */
};

static void got_cb(struct pw_redis *r, const redisReply *reply, enum pw_err err, const char *errstr,
                   void *ud)
{
    struct got *g = ud;
    g->done = true;
    g->err = err;
    g->type = reply ? reply->type : 0;
    if (reply && reply->type == REDIS_REPLY_INTEGER)
        g->integer = reply->integer;
    if (reply && reply->str)
        snprintf(g->str, sizeof g->str, "%.*s", (int)reply->len, reply->str);
    if (reply && reply->type == REDIS_REPLY_ARRAY) {
        g->elements = reply->elements;
        if (reply->elements > 0 && reply->element[0]->type == REDIS_REPLY_INTEGER)
            g->first_integer = reply->element[0]->integer;
    }
}

struct egot {
    bool done;
    enum pw_err err;
    struct pw_stream_entries *e; /* owned by the test once delivered */
};

static void entries_cb(struct pw_redis *r, struct pw_stream_entries *e, enum pw_err err,
                       const char *errstr, void *ud)
{
    struct egot *g = ud;
    g->done = true;
    g->err = err;
    g->e = e;
}

struct fixture {
    struct event_base *base;
    struct pw_redis *r;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    f->base = event_base_new();
    assert_int_equal(pw_redis_create(f->base, server.url, NULL, &f->r, NULL, 0), PW_OK);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    pw_redis_destroy(f->r);
    event_base_free(f->base);
    free(f);
    return 0;
}

#define RUN(f, flag) assert_true(pw_test_run_until((f)->base, &(flag), 5000))

static void test_stream_round_trip(void **state)
{
    struct fixture *f = *state;
    char q[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(q, sizeof q, "roundtrip"), PW_OK);

    struct got g1 = {0}, g2 = {0};
    assert_int_equal(pw_stream_group_create(f->r, q, PW_GROUP_ENGINES, "$", got_cb, &g1), PW_OK);
    assert_int_equal(pw_stream_group_create(f->r, q, PW_GROUP_ENGINES, "$", got_cb, &g2), PW_OK);
    RUN(f, g2.done);
    assert_int_equal(g1.err, PW_OK);
    assert_string_equal(g1.str, "OK");
    assert_int_equal(g2.err, PW_OK); /* BUSYGROUP is success */

    /* a protobuf-like payload: NUL bytes, CR LF, high bytes */
    unsigned char payload[300];
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (unsigned char)(i * 7);
    payload[0] = 0;
    payload[1] = '\r';
    payload[2] = '\n';
    struct pw_stream_field fields[] = {
        {{"req", 3}, {(const char *)payload, sizeof payload}},
        {{"attempt", 7}, {"1", 1}},
    };
    struct got add = {0};
    assert_int_equal(pw_stream_add(f->r, q, 10000, fields, 2, got_cb, &add), PW_OK);
    RUN(f, add.done);
    assert_int_equal(add.err, PW_OK);
    assert_int_equal(add.type, REDIS_REPLY_STRING);
    assert_non_null(strchr(add.str, '-'));

    struct egot rd = {0};
    assert_int_equal(
        pw_stream_read_group(f->r, q, PW_GROUP_ENGINES, "engine-a", ">", 10, 1000, entries_cb, &rd),
        PW_OK);
    RUN(f, rd.done);
    assert_int_equal(rd.err, PW_OK);
    assert_int_equal(rd.e->n, 1);
    assert_string_equal(rd.e->v[0].id, add.str);
    const struct pw_slice *req = pw_stream_entry_get(&rd.e->v[0], "req");
    assert_non_null(req);
    assert_int_equal(req->len, sizeof payload);
    assert_memory_equal(req->ptr, payload, sizeof payload);
    assert_string_equal(pw_stream_entry_get(&rd.e->v[0], "attempt")->ptr, "1");

    /* pending until acknowledged */
    struct got pend = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &pend, "XPENDING", q, PW_GROUP_ENGINES, NULL),
                     PW_OK);
    RUN(f, pend.done);
    assert_int_equal(pend.first_integer, 1);

    const char *ids[] = {rd.e->v[0].id};
    struct got ack = {0};
    assert_int_equal(pw_stream_ack(f->r, q, PW_GROUP_ENGINES, ids, 1, got_cb, &ack), PW_OK);
    pw_stream_entries_free(rd.e);
    RUN(f, ack.done);
    assert_int_equal(ack.err, PW_OK);
    assert_int_equal(ack.integer, 1);

    struct got pend2 = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &pend2, "XPENDING", q, PW_GROUP_ENGINES, NULL),
                     PW_OK);
    RUN(f, pend2.done);
    assert_int_equal(pend2.err, PW_OK);
    assert_int_equal(pend2.first_integer, 0);

    /* nothing new: a short BLOCK times out with zero entries */
    struct egot empty = {0};
    assert_int_equal(pw_stream_read_group(f->r, q, PW_GROUP_ENGINES, "engine-a", ">", 10, 50,
                                          entries_cb, &empty),
                     PW_OK);
    RUN(f, empty.done);
    assert_int_equal(empty.err, PW_OK);
    assert_int_equal(empty.e->n, 0);
    pw_stream_entries_free(empty.e);
}

static void test_autoclaim_from_dead_consumer(void **state)
{
    struct fixture *f = *state;
    char q[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(q, sizeof q, "claim"), PW_OK);
    struct got g = {0}, add = {0};
    assert_int_equal(pw_stream_group_create(f->r, q, PW_GROUP_ENGINES, "0", got_cb, &g), PW_OK);
    struct pw_stream_field fld = {{"req", 3}, {"x\0y", 3}};
    assert_int_equal(pw_stream_add(f->r, q, 0, &fld, 1, got_cb, &add), PW_OK);
    RUN(f, add.done);

    /* the dead engine reads and never acknowledges */
    struct egot dead = {0};
    assert_int_equal(pw_stream_read_group(f->r, q, PW_GROUP_ENGINES, "engine-dead", ">", 1, -1,
                                          entries_cb, &dead),
                     PW_OK);
    RUN(f, dead.done);
    assert_int_equal(dead.e->n, 1);
    pw_stream_entries_free(dead.e);

    /* too early: not idle long enough */
    struct egot early = {0};
    assert_int_equal(pw_stream_autoclaim(f->r, q, PW_GROUP_ENGINES, "engine-live", 60000, "0-0", 10,
                                         entries_cb, &early),
                     PW_OK);
    RUN(f, early.done);
    assert_int_equal(early.err, PW_OK);
    assert_int_equal(early.e->n, 0);
    pw_stream_entries_free(early.e);

    pw_test_run_for(f->base, 150);
    struct egot claim = {0};
    assert_int_equal(pw_stream_autoclaim(f->r, q, PW_GROUP_ENGINES, "engine-live", 100, "0-0", 10,
                                         entries_cb, &claim),
                     PW_OK);
    RUN(f, claim.done);
    assert_int_equal(claim.err, PW_OK);
    assert_int_equal(claim.e->n, 1);
    assert_string_equal(claim.e->v[0].id, add.str);
    assert_string_equal(claim.e->next_id, "0-0");
    const struct pw_slice *v = pw_stream_entry_get(&claim.e->v[0], "req");
    assert_int_equal(v->len, 3);
    assert_memory_equal(v->ptr, "x\0y", 3);
    pw_stream_entries_free(claim.e);

    /* the entry now belongs to engine-live */
    struct got pend = {0};
    assert_int_equal(pw_redis_command(f->r, got_cb, &pend, "XPENDING", q, PW_GROUP_ENGINES, "-",
                                      "+", "10", "engine-live", NULL),
                     PW_OK);
    RUN(f, pend.done);
    assert_int_equal(pend.err, PW_OK);
    assert_int_equal(pend.elements, 1);
}

static void test_xread_reply_stream(void **state)
{
    struct fixture *f = *state;
    char key[PW_KEY_MAX];
    assert_int_equal(pw_key_reply(key, sizeof key, "router-1"), PW_OK);
    struct got add = {0};
    struct pw_stream_field fld = {{"chunk", 5}, {"\0\1\2", 3}};
    assert_int_equal(pw_stream_add(f->r, key, 1000, &fld, 1, got_cb, &add), PW_OK);
    RUN(f, add.done);

    struct egot rd = {0};
    assert_int_equal(pw_stream_read(f->r, key, "0", 100, -1, entries_cb, &rd), PW_OK);
    RUN(f, rd.done);
    assert_int_equal(rd.err, PW_OK);
    assert_int_equal(rd.e->n, 1);
    assert_memory_equal(rd.e->v[0].fields[0].value.ptr, "\0\1\2", 3);
    char last[PW_STREAM_ID_MAX];
    snprintf(last, sizeof last, "%s", rd.e->v[0].id);
    pw_stream_entries_free(rd.e);

    /* blocking read after the last id: answered when a new chunk lands */
    struct egot wait = {0};
    assert_int_equal(pw_stream_read(f->r, key, last, 100, 2000, entries_cb, &wait), PW_OK);
    pw_test_run_for(f->base, 50);
    assert_false(wait.done);
    /* a second client: the first one's connection is blocked in XREAD */
    struct pw_redis *w = NULL;
    assert_int_equal(pw_redis_create(f->base, server.url, NULL, &w, NULL, 0), PW_OK);
    struct got add2 = {0};
    assert_int_equal(pw_stream_add(w, key, 1000, &fld, 1, got_cb, &add2), PW_OK);
    RUN(f, wait.done);
    RUN(f, add2.done); /* two connections: either reply may come first */
    assert_int_equal(wait.err, PW_OK);
    assert_int_equal(wait.e->n, 1);
    assert_string_equal(wait.e->v[0].id, add2.str);
    pw_stream_entries_free(wait.e);
    pw_redis_destroy(w);

    /* timeout: zero entries, not an error */
    struct egot none = {0};
    assert_int_equal(pw_stream_read(f->r, key, "$", 10, 30, entries_cb, &none), PW_OK);
    RUN(f, none.done);
    assert_int_equal(none.err, PW_OK);
    assert_int_equal(none.e->n, 0);
    pw_stream_entries_free(none.e);
}

static void test_typed_helper_errors(void **state)
{
    struct fixture *f = *state;
    struct got g = {0};
    /* a string key is not a stream: the error reply reaches the typed callback */
    assert_int_equal(pw_redis_command(f->r, got_cb, &g, "SET", "plain{k}", "v", NULL), PW_OK);
    RUN(f, g.done);
    struct egot rd = {0};
    assert_int_equal(pw_stream_read(f->r, "plain{k}", "0", 1, -1, entries_cb, &rd), PW_OK);
    RUN(f, rd.done);
    assert_int_equal(rd.err, PW_ERR_REDIS);
    assert_null(rd.e);
    assert_int_equal(pw_stream_add(f->r, "k", 0, NULL, 0, NULL, NULL), PW_ERR_INVAL);
    assert_int_equal(pw_stream_read(f->r, "k", "0", 0, -1, entries_cb, &rd), PW_ERR_INVAL);
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
        cmocka_unit_test_setup_teardown(test_stream_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_autoclaim_from_dead_consumer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_xread_reply_stream, setup, teardown),
        cmocka_unit_test_setup_teardown(test_typed_helper_errors, setup, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

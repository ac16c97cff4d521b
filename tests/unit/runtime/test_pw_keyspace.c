/*
 * Unit tests for pw_keyspace: key builders and name validation, and the stream/hash reply
 * parsers fed with raw RESP through a hiredis reader (the same path a server reply takes),
 * including hostile array lengths.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "pw_keyspace.h"
#include "pw_log.h"

static void test_key_builders(void **state)
{
    char buf[PW_KEY_MAX];
    assert_int_equal(pw_key_queue(buf, sizeof buf, "smollm2-135m"), PW_OK);
    assert_string_equal(buf, "pw:{smollm2-135m}:q");
    assert_int_equal(pw_key_batch_lane(buf, sizeof buf, "fn"), PW_OK);
    assert_string_equal(buf, "pw:{fn}:b");
    assert_int_equal(pw_key_workers(buf, sizeof buf, "fn"), PW_OK);
    assert_string_equal(buf, "pw:{fn}:workers");
    assert_int_equal(pw_key_scale(buf, sizeof buf, "fn"), PW_OK);
    assert_string_equal(buf, "pw:{fn}:scale");
    assert_int_equal(pw_key_reply(buf, sizeof buf, "router-1"), PW_OK);
    assert_string_equal(buf, "pw:reply:{router-1}");
    assert_int_equal(pw_key_reply_worker(buf, sizeof buf, "router-1", 3), PW_OK);
    assert_string_equal(buf, "pw:reply:{router-1}:3");
    assert_int_not_equal(pw_key_reply_worker(buf, sizeof buf, "bad id", 0), PW_OK);
    assert_int_equal(pw_key_cancel(buf, sizeof buf, "req_0123"), PW_OK);
    assert_string_equal(buf, "pw:cancel:{req_0123}");
    assert_int_equal(pw_key_batch(buf, sizeof buf, "batch_1"), PW_OK);
    assert_string_equal(buf, "pw:batch:{batch_1}");
    assert_int_equal(pw_key_file(buf, sizeof buf, "file-1.jsonl"), PW_OK);
    assert_string_equal(buf, "pw:file:{file-1.jsonl}");
    assert_string_equal(PW_KEY_KEYS, "pw:keys");
    assert_string_equal(PW_KEY_WAKE, "pw:wake");
    assert_string_equal(PW_KEY_EVENTS, "pw:events");
}

static void test_key_names_refused(void **state)
{
    char buf[PW_KEY_MAX];
    const char *bad[] = {"", "a b", "a:b", "a{b", "a}b", "a\nb", "a*", "é", "a/b"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_false(pw_key_name_ok(bad[i]));
        assert_int_equal(pw_key_queue(buf, sizeof buf, bad[i]), PW_ERR_INVAL);
    }
    assert_int_equal(pw_key_queue(buf, sizeof buf, NULL), PW_ERR_INVAL);
    assert_int_equal(pw_key_queue(NULL, 10, "fn"), PW_ERR_INVAL);
    char longname[PW_KEY_NAME_MAX + 2];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    assert_false(pw_key_name_ok(longname));
    longname[PW_KEY_NAME_MAX] = '\0'; /* exactly the maximum */
    assert_true(pw_key_name_ok(longname));
    assert_int_equal(pw_key_workers(buf, sizeof buf, longname), PW_OK);
    assert_int_equal(pw_key_queue(buf, 8, "fn-long"), PW_ERR_TOOBIG);
}

/* Parses raw RESP into a reply with caps installed; NULL when the reader refuses it. */
static redisReply *resp(const char *bytes, size_t len)
{
    redisReader *rd = redisReaderCreate();
    assert_non_null(rd);
    pw_redis_reader_install_caps(rd);
    void *reply = NULL;
    assert_int_equal(redisReaderFeed(rd, bytes, len), REDIS_OK);
    int rc = redisReaderGetReply(rd, &reply);
    redisReaderFree(rd);
    if (rc != REDIS_OK)
        return NULL;
    return reply;
}

#define RESP(lit) resp(lit, sizeof(lit) - 1)

static void test_parse_read(void **state)
{
    /* XREADGROUP reply with a binary payload (embedded NUL) and a deleted entry */
    redisReply *rep =
        RESP("*1\r\n*2\r\n$8\r\npw:{f}:q\r\n*2\r\n"
             "*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\nr\r\n$3\r\na\0b\r\n$2\r\nat\r\n$1\r\n1\r\n"
             "*2\r\n$3\r\n2-0\r\n$-1\r\n");
    assert_non_null(rep);
    struct pw_stream_entries *e = NULL;
    assert_int_equal(pw_stream_parse_read(rep, &e), PW_OK);
    freeReplyObject(rep); /* parsed entries are copies */
    assert_int_equal(e->n, 2);
    assert_string_equal(e->v[0].id, "1-0");
    assert_int_equal(e->v[0].n_fields, 2);
    const struct pw_slice *r = pw_stream_entry_get(&e->v[0], "r");
    assert_non_null(r);
    assert_int_equal(r->len, 3);
    assert_memory_equal(r->ptr, "a\0b", 3);
    assert_int_equal(r->ptr[3], '\0');
    assert_string_equal(pw_stream_entry_get(&e->v[0], "at")->ptr, "1");
    assert_null(pw_stream_entry_get(&e->v[0], "missing"));
    assert_string_equal(e->v[1].id, "2-0");
    assert_int_equal(e->v[1].n_fields, 0);
    pw_stream_entries_free(e);

    /* BLOCK timeout: nil -> zero entries */
    rep = RESP("*-1\r\n");
    assert_non_null(rep);
    assert_int_equal(pw_stream_parse_read(rep, &e), PW_OK);
    assert_int_equal(e->n, 0);
    pw_stream_entries_free(e);
    freeReplyObject(rep);
}

static void test_parse_autoclaim(void **state)
{
    redisReply *rep =
        RESP("*3\r\n$3\r\n0-0\r\n*1\r\n*2\r\n$3\r\n5-1\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n"
             "*1\r\n$3\r\n4-0\r\n");
    assert_non_null(rep);
    struct pw_stream_entries *e = NULL;
    assert_int_equal(pw_stream_parse_autoclaim(rep, &e), PW_OK);
    assert_string_equal(e->next_id, "0-0");
    assert_int_equal(e->n, 1);
    assert_int_equal(e->n_deleted, 1);
    assert_string_equal(e->v[0].id, "5-1");
    assert_string_equal(e->v[0].fields[0].name.ptr, "k");
    assert_string_equal(e->v[0].fields[0].value.ptr, "v");
    pw_stream_entries_free(e);
    freeReplyObject(rep);
}

static void test_parse_hash(void **state)
{
    redisReply *rep = RESP("*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$0\r\n\r\n");
    assert_non_null(rep);
    struct pw_stream_entries *e = NULL;
    assert_int_equal(pw_hash_parse_all(rep, &e), PW_OK);
    assert_int_equal(e->n, 1);
    assert_int_equal(e->v[0].n_fields, 2);
    assert_string_equal(pw_stream_entry_get(&e->v[0], "a")->ptr, "1");
    assert_int_equal(pw_stream_entry_get(&e->v[0], "b")->len, 0);
    pw_stream_entries_free(e);
    freeReplyObject(rep);
}

static void test_parse_malformed(void **state)
{
    struct pw_stream_entries *e = (void *)1;
    redisReply *rep = RESP(":5\r\n");
    assert_int_equal(pw_stream_parse_read(rep, &e), PW_ERR_PROTO);
    assert_null(e);
    assert_int_equal(pw_stream_parse_range(rep, &e), PW_ERR_PROTO);
    assert_int_equal(pw_stream_parse_autoclaim(rep, &e), PW_ERR_PROTO);
    assert_int_equal(pw_hash_parse_all(rep, &e), PW_ERR_PROTO);
    freeReplyObject(rep);
    /* odd field count */
    rep = RESP("*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\nk\r\n");
    assert_int_equal(pw_stream_parse_range(rep, &e), PW_ERR_PROTO);
    freeReplyObject(rep);
    /* entry id not a string */
    rep = RESP("*1\r\n*2\r\n:1\r\n*0\r\n");
    assert_int_equal(pw_stream_parse_range(rep, &e), PW_ERR_PROTO);
    freeReplyObject(rep);
    /* entry id too long */
    rep = RESP("*1\r\n*2\r\n$60\r\n123456789012345678901234567890123456789012345678901234567890"
               "\r\n*0\r\n");
    assert_int_equal(pw_stream_parse_range(rep, &e), PW_ERR_PROTO);
    freeReplyObject(rep);
}

static void quiet_sink(void *ud, enum pw_log_level level, const char *line, size_t len)
{
    (*(int *)ud)++;
}

static void test_hostile_array_length_refused_before_allocation(void **state)
{
    int warned = 0;
    pw_log_set_sink(quiet_sink, &warned);
    /* a header announcing 2^31-1 elements must not reach calloc */
    assert_null(RESP("*2147483647\r\n"));
    char hdr[32];
    int n = snprintf(hdr, sizeof hdr, "*%u\r\n", PW_REDIS_MAX_ARRAY + 1);
    assert_null(resp(hdr, (size_t)n));
    pw_log_set_sink(NULL, NULL);
    assert_true(warned >= 2);
}

static void test_field_cap(void **state)
{
    /* an entry with more pairs than PW_STREAM_MAX_FIELDS: TOOBIG, nothing allocated */
    size_t pairs = PW_STREAM_MAX_FIELDS + 1;
    size_t cap = 64 + pairs * 16;
    char *buf = malloc(cap);
    size_t o = (size_t)snprintf(buf, cap, "*1\r\n*2\r\n$3\r\n1-0\r\n*%zu\r\n", pairs * 2);
    for (size_t i = 0; i < pairs * 2; i++)
        o += (size_t)snprintf(buf + o, cap - o, "$1\r\nx\r\n");
    redisReply *rep = resp(buf, o);
    free(buf);
    assert_non_null(rep);
    struct pw_stream_entries *e;
    assert_int_equal(pw_stream_parse_range(rep, &e), PW_ERR_TOOBIG);
    freeReplyObject(rep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_builders),
        cmocka_unit_test(test_key_names_refused),
        cmocka_unit_test(test_parse_read),
        cmocka_unit_test(test_parse_autoclaim),
        cmocka_unit_test(test_parse_hash),
        cmocka_unit_test(test_parse_malformed),
        cmocka_unit_test(test_hostile_array_length_refused_before_allocation),
        cmocka_unit_test(test_field_cap),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

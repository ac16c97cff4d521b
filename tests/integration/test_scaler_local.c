/*
 * parkway-scaler with the local provider, end to end with real processes: a real
 * redis-server, the scaler binary, engines it starts on a tiny generated model.
 *
 *   zero replicas -> a request is queued -> the scaler provisions an engine -> answered;
 *   idle past idle_seconds -> drained and parked (the same engine process, heartbeating
 *   PARKED, reading nothing); a new request -> unparked -> answered by that same process;
 *   every step is in pw:events with its reason; pw:{fn}:scale is written; SIGTERM stops
 *   the scaler and its engines.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "pw_test_proc.h"
#include "pw_test_redis.h"
#include "pw_test_stack.h"

#define REPLY "pw:reply:{test}"

static struct pw_test_redis g_redis;
static char g_dir[128];
static pid_t g_scaler;
static redisContext *g_rc;

static pid_t start_scaler(void)
{
    if (g_scaler > 0) { /* left by a failed test: never orphan it */
        pw_test_stop(g_scaler, 45000);
        g_scaler = 0;
    }
    const char *extra[] = {"--engine", pw_test_engine_path(), NULL};
    return pw_test_scaler_start(PW_TEST_SCALER_BIN, g_redis.url, g_dir, extra);
}

static void enqueue(const char *id)
{
    struct pw_test_request q = {.fn = "tiny", .id = id, .reply_to = REPLY, .max_tokens = 4};
    pw_test_enqueue(g_rc, &q);
}

static size_t count_events(const char *action, const char *sub)
{
    return pw_test_count_events(g_rc, action, sub);
}

static bool wait_event(const char *action, const char *sub, size_t at_least, int timeout_ms)
{
    return pw_test_wait_event(g_rc, action, sub, at_least, timeout_ms);
}

/* The single engine heartbeat of function tiny: its state and pid; false if none. */
static bool engine_status(int *state, pid_t *pid)
{
    redisReply *r = redisCommand(g_rc, "HVALS pw:{tiny}:workers");
    bool ok = false;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
        r->element[0]->type == REDIS_REPLY_STRING) {
        Parkway__WorkerStatus *ws = NULL;
        if (pw_proto_unpack_worker(r->element[0]->str, r->element[0]->len, 0, &ws) == PW_OK) {
            *state = ws->state;
            *pid = (pid_t)ws->pid;
            ok = true;
            pw_proto_free_worker(ws);
        }
    }
    freeReplyObject(r);
    return ok;
}

static bool wait_engine_state(int want, pid_t *pid, int timeout_ms)
{
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        int st = 0;
        if (engine_status(&st, pid) && st == want)
            return true;
        pw_test_sleep_ms(50);
    }
    return false;
}

static int setup(void **state)
{
    (void)state;
    pw_test_redis_require();
    if (pw_test_redis_start(&g_redis) != PW_OK)
        return -1;
    snprintf(g_dir, sizeof g_dir, "/tmp/pw-scaler-local-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    pw_test_tiny_function(PW_TEST_GGUF_GEN_BIN, g_dir, "0");
    if (pw_redis_sync_connect(g_redis.url, 5000, &g_rc, NULL, 0) != PW_OK)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_scaler > 0)
        pw_test_stop(g_scaler, 45000);
    if (g_rc)
        redisFree(g_rc);
    pw_test_redis_stop(&g_redis);
    pw_test_rmtree_unless_keep(g_dir);
    return 0;
}

static void test_zero_to_one_park_unpark(void **state)
{
    (void)state;
    struct pw_test_cursor cursor = {{0}};
    g_scaler = start_scaler();
    /* Registered for routers. */
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_test_hlen(g_rc, PW_KEY_FUNCTIONS) < 1 && pw_clock_mono_ms() - t0 < 5000)
        pw_test_sleep_ms(50);
    assert_int_equal(pw_test_hlen(g_rc, PW_KEY_FUNCTIONS), 1);
    /* Scale from zero: nothing runs until a request arrives. */
    pw_test_sleep_ms(500);
    assert_int_equal(count_events("provision", NULL), 0);
    enqueue("req-1");
    int64_t ms = pw_test_wait_done(g_rc, REPLY, &cursor, "req-1", 30000);
    assert_true(ms >= 0);
    fprintf(stderr, "cold start answered in %lld ms\n", (long long)ms);
    assert_true(wait_event("provision", NULL, 1, 5000));
    assert_int_equal(count_events("provision", NULL), 1);
    assert_true(wait_event("ready", "startup_ms=", 1, 5000));

    pid_t served_pid = 0;
    assert_true(wait_engine_state(PARKWAY__WORKER_STATE__WORKER_STATE_READY, &served_pid, 5000));

    /* Idle past idle_seconds: drained, then parked: the same process, alive, heartbeating
     * PARKED, holding nothing. */
    assert_true(wait_event("parked", NULL, 1, 20000));
    assert_true(count_events("drain", NULL) >= 1);
    pid_t parked_pid = 0;
    assert_true(wait_engine_state(PARKWAY__WORKER_STATE__WORKER_STATE_PARKED, &parked_pid, 3000));
    assert_int_equal(parked_pid, served_pid);
    assert_int_equal(kill(parked_pid, 0), 0);
    redisReply *pr = redisCommand(g_rc, "XPENDING pw:{tiny}:q %s", PW_GROUP_ENGINES);
    assert_non_null(pr);
    assert_int_equal(pr->element[0]->integer, 0);
    freeReplyObject(pr);
    /* Still parked a heartbeat later: not taken for dead, not unparked by itself. */
    pw_test_sleep_ms(1500);
    int st = 0;
    pid_t again = 0;
    assert_true(engine_status(&st, &again));
    assert_int_equal(st, PARKWAY__WORKER_STATE__WORKER_STATE_PARKED);
    assert_int_equal(again, served_pid);
    assert_int_equal(count_events("replica_failed", NULL), 0);
    assert_int_equal(count_events("unpark", NULL), 0);

    /* A new request unparks it: answered by the same process. */
    enqueue("req-2");
    ms = pw_test_wait_done(g_rc, REPLY, &cursor, "req-2", 30000);
    assert_true(ms >= 0);
    fprintf(stderr, "unpark answered in %lld ms\n", (long long)ms);
    /* The event is written asynchronously: the answer can overtake it. */
    assert_true(wait_event("unpark", NULL, 1, 5000));
    assert_int_equal(count_events("unpark", NULL), 1);
    assert_int_equal(count_events("provision", NULL), 1);
    pid_t unparked_pid = 0;
    assert_true(wait_engine_state(PARKWAY__WORKER_STATE__WORKER_STATE_READY, &unparked_pid, 5000) ||
                wait_engine_state(PARKWAY__WORKER_STATE__WORKER_STATE_PARKED, &unparked_pid, 5000));
    assert_int_equal(unparked_pid, served_pid);
    assert_int_equal(count_events("replica_failed", NULL), 0);

    /* Scale state for `parkway fn ls`. */
    redisReply *r = redisCommand(g_rc, "HGET pw:{tiny}:scale ready");
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    r = redisCommand(g_rc, "HGET pw:{tiny}:scale cost");
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_non_null(strstr(r->str, "total_microusd"));
    freeReplyObject(r);

    /* SIGTERM: the scaler terminates its engine and exits 0; nothing is left behind. */
    assert_int_equal(pw_test_stop(g_scaler, 45000), 0);
    g_scaler = 0;
    assert_true(count_events("terminated", NULL) >= 1);
    assert_int_equal(pw_test_hlen(g_rc, "pw:{tiny}:workers"), 0);
}

/* XADDs one batch-lane line (packed InferenceRequest with a batch id and a deadline) to
 * pw:{tiny}:b and wakes the scaler. */
static void enqueue_batch(const char *id, int64_t deadline_ms)
{
    Parkway__InferenceRequest req = PARKWAY__INFERENCE_REQUEST__INIT;
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    uint32_t toks[] = {1, 2, 3, 4};
    req.id = (char *)id;
    req.function = "tiny";
    req.tenant = "t";
    req.key_id = "key_test";
    req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    req.prompt_token_ids = toks;
    req.n_prompt_token_ids = 4;
    sp.max_tokens = 4;
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS);
    req.sampling = &sp;
    req.reply_to = REPLY;
    req.deadline_unix_ms = deadline_ms;
    req.enqueued_unix_ms = pw_clock_wall_ms();
    req.batch_id = "batch_test";
    req.custom_id = (char *)id;
    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    assert_int_equal(pw_proto_pack_request_alloc(&req, &buf, &len, &why), PW_OK);
    char key[PW_KEY_MAX];
    pw_key_batch_lane(key, sizeof key, "tiny");
    const char *argv[] = {"XADD", key, "*", PW_STREAM_FIELD, (const char *)buf};
    size_t lens[] = {4, strlen(key), 1, 1, len};
    redisReply *r = redisCommandArgv(g_rc, 5, argv, lens);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    free(buf);
    freeReplyObject(redisCommand(g_rc, "PUBLISH %s %s", PW_KEY_WAKE, "tiny"));
}

/* Batch-only demand starts a machine (here the free local one, which a deferring batch may
 * take at once) through the batch path, never the interactive scale-from-zero path, and
 * the line is answered. */
static void test_batch_only_demand(void **state)
{
    (void)state;
    struct pw_test_cursor cursor = {{0}};
    size_t from_zero = count_events("provision", "scale_from_zero");
    size_t batch_ups = count_events("provision", "batch_scale_up");
    g_scaler = start_scaler();
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_test_hlen(g_rc, PW_KEY_FUNCTIONS) < 1 && pw_clock_mono_ms() - t0 < 5000)
        pw_test_sleep_ms(50);
    enqueue_batch("line-1", pw_clock_wall_ms() + 24LL * 3600 * 1000);
    int64_t ms = pw_test_wait_done(g_rc, REPLY, &cursor, "line-1", 30000);
    assert_true(ms >= 0);
    assert_true(wait_event("provision", "batch_scale_up", batch_ups + 1, 5000) ||
                wait_event("unpark", "batch_scale_up", 1, 1000));
    assert_int_equal(count_events("provision", "scale_from_zero"), from_zero);
    assert_int_equal(pw_test_stop(g_scaler, 45000), 0);
    g_scaler = 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zero_to_one_park_unpark),
        cmocka_unit_test(test_batch_only_demand),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

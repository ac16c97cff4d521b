/*
 * parkway-scaler with the exec provider: real redis-server, the scaler binary, hook
 * programs.
 *
 *   deploy/hooks/example-cloud.sh (a simulated cloud that starts local engines): a queued
 *   request provisions an instance on the cheapest fitting offer of the example catalog,
 *   is answered, the idle instance is parked by the hook, SIGTERM terminates it through
 *   the hook and no engine is left;
 *   a hook that times out and then answers garbage: each failure is an event with a clear
 *   reason, and after three the crash-loop breaker opens (an "error" event).
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
#include <sys/wait.h>
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

static pid_t start_scaler(const char *extra1, const char *extra2)
{
    if (g_scaler > 0) { /* left by a failed test: never orphan it */
        pw_test_stop(g_scaler, 45000);
        g_scaler = 0;
    }
    const char *extra[] = {"--provider", "exec", "--engine", pw_test_engine_path(),
                           extra1,       extra2, NULL};
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

static int setup(void **state)
{
    (void)state;
    pw_test_redis_require();
    if (pw_test_redis_start(&g_redis) != PW_OK)
        return -1;
    snprintf(g_dir, sizeof g_dir, "/tmp/pw-scaler-exec-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    pw_test_tiny_function(PW_TEST_GGUF_GEN_BIN, g_dir, "0.5");
    char path[256];
    snprintf(path, sizeof path, "%s/hookstate", g_dir);
    setenv("PARKWAY_HOOK_STATE_DIR", path, 1);
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

static void reset_redis(void)
{
    freeReplyObject(redisCommand(g_rc, "FLUSHALL"));
}

static void test_example_hooks(void **state)
{
    (void)state;
    reset_redis();
    struct pw_test_cursor cursor = {{0}};
    g_scaler = start_scaler("--provider-config", PW_SOURCE_DIR "/deploy/hooks/example-cloud.yaml");
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_test_hlen(g_rc, PW_KEY_FUNCTIONS) < 1 && pw_clock_mono_ms() - t0 < 5000)
        pw_test_sleep_ms(50);
    enqueue("req-1");
    assert_true(pw_test_wait_done(g_rc, REPLY, &cursor, "req-1", 30000) >= 0);
    /* The cheapest offer under 0.5/h that fits, from deploy/offers/example-cloud.yaml. */
    assert_true(wait_event("provision", "cpu-4x16", 1, 5000));
    assert_true(wait_event("ready", NULL, 1, 5000));
    assert_true(wait_event("parked", NULL, 1, 30000));
    /* The hook stopped the engine: no pid file, no heartbeat. */
    assert_int_equal(pw_test_hlen(g_rc, "pw:{tiny}:workers"), 0);
    enqueue("req-2");
    assert_true(pw_test_wait_done(g_rc, REPLY, &cursor, "req-2", 30000) >= 0);
    assert_true(wait_event("unpark", NULL, 1, 5000));
    /* Cost accounted at the offer's price: something was charged. */
    redisReply *r = redisCommand(g_rc, "HGET pw:{tiny}:scale cost_microusd");
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    assert_int_equal(pw_test_stop(g_scaler, 45000), 0);
    g_scaler = 0;
    assert_true(count_events("terminated", NULL) >= 1);
    /* terminate removed every engine the hook started */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "ls %s/hookstate/*.pid > /dev/null 2>&1", g_dir);
    assert_int_not_equal(system(cmd), 0);
    assert_int_equal(pw_test_hlen(g_rc, "pw:{tiny}:workers"), 0);
}

static void test_bad_hooks_open_breaker(void **state)
{
    (void)state;
    reset_redis();
    char path[256], conf[256], text[1024];
    snprintf(path, sizeof path, "%s/bad-hook.sh", g_dir);
    /* provision: first call hangs (timeout), later calls print garbage; the rest work. */
    snprintf(text, sizeof text,
             "#!/usr/bin/env bash\n"
             "cat > /dev/null\n"
             "case \"$1\" in\n"
             "provision)\n"
             "  if [ ! -e %s/hung ]; then touch %s/hung; echo 'waiting for the cloud' >&2;"
             " sleep 30; fi\n"
             "  echo 'this is not json'; echo 'quota exceeded' >&2 ;;\n"
             "terminate) echo '{\"state\":\"terminated\"}' ;;\n"
             "*) echo '{\"state\":\"failed\"}' ;;\n"
             "esac\n",
             g_dir, g_dir);
    pw_test_write_file(path, text);
    chmod(path, 0755);
    snprintf(conf, sizeof conf, "%s/bad.yaml", g_dir);
    snprintf(text, sizeof text,
             "hooks:\n  provision: bad-hook.sh\n  park: bad-hook.sh\n  unpark: bad-hook.sh\n"
             "  terminate: bad-hook.sh\n"
             "timeouts:\n  provision: 500ms\n"
             "offers: %s/deploy/offers/example-cloud.yaml\n",
             PW_SOURCE_DIR);
    pw_test_write_file(conf, text);
    g_scaler = start_scaler("--provider-config", conf);
    enqueue("req-x");
    assert_true(wait_event("replica_failed", "timed out after 500 ms", 1, 10000));
    assert_true(wait_event("replica_failed", "invalid JSON", 1, 10000));
    assert_true(wait_event("error", "breaker", 1, 15000));
    /* The breaker holds: no more than the threshold of attempts. */
    pw_test_sleep_ms(1000);
    assert_true(count_events("provision", NULL) <= 3);
    assert_int_equal(pw_test_stop(g_scaler, 45000), 0);
    g_scaler = 0;
}

static void test_bad_config(void **state)
{
    (void)state;
    char conf[256];
    snprintf(conf, sizeof conf, "%s/broken.yaml", g_dir);
    pw_test_write_file(conf, "hooks:\n  provision: /nonexistent/hook\n");
    pid_t pid = start_scaler("--provider-config", conf);
    int status;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example_hooks),
        cmocka_unit_test(test_bad_hooks_open_breaker),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

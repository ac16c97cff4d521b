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

#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "pw_test_redis.h"

static struct pw_test_redis g_redis;
static char g_dir[128];
static pid_t g_scaler;
static redisContext *g_rc;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void run_or_die(const char *cmd)
{
    int rc = system(cmd);
    if (rc != 0) {
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
        exit(1);
    }
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* The engine the scaler runs: PW_TEST_ENGINE overrides the one of this build tree. */
static const char *engine_path(void)
{
    const char *e = getenv("PW_TEST_ENGINE");
    return e && *e ? e : PW_BINARY_DIR "/engine/parkway-engine";
}

static int stop_scaler(pid_t pid, int timeout_ms);

static void stop_scaler_pid(pid_t pid)
{
    stop_scaler(pid, 45000);
}

static pid_t start_scaler(const char *extra1, const char *extra2)
{
    char fdir[256], log[256];
    snprintf(fdir, sizeof fdir, "%s/functions", g_dir);
    snprintf(log, sizeof log, "%s/scaler.log", g_dir);
    if (g_scaler > 0) { /* left by a failed test: never orphan it */
        stop_scaler_pid(g_scaler);
        g_scaler = 0;
    }
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* a crashed test leaves no scaler behind */
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0 && !getenv("PW_TEST_VERBOSE")) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execl(PW_BINARY_DIR "/scaler/parkway-scaler", "parkway-scaler", "--redis", g_redis.url,
              "--functions", fdir, "--tick-ms", "100", extra1, extra2, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static int stop_scaler(pid_t pid, int timeout_ms)
{
    kill(pid, SIGTERM);
    uint64_t until = pw_clock_mono_ms() + (uint64_t)timeout_ms;
    int status;
    while (pw_clock_mono_ms() < until) {
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        sleep_ms(50);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

static void enqueue(const char *fn, const char *id)
{
    Parkway__InferenceRequest req = PARKWAY__INFERENCE_REQUEST__INIT;
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    uint32_t toks[] = {1, 2, 3, 4};
    req.id = (char *)id;
    req.function = (char *)fn;
    req.tenant = "t";
    req.key_id = "key_test";
    req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    req.prompt_token_ids = toks;
    req.n_prompt_token_ids = 4;
    sp.max_tokens = 4;
    sp.temperature = 0;
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS);
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE);
    req.sampling = &sp;
    req.reply_to = "pw:reply:{test}";
    req.enqueued_unix_ms = pw_clock_wall_ms();
    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    assert_int_equal(pw_proto_pack_request_alloc(&req, &buf, &len, &why), PW_OK);
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, fn);
    const char *argv[] = {"XADD", key, "*", PW_STREAM_FIELD, (const char *)buf};
    size_t lens[] = {4, strlen(key), 1, 1, len};
    redisReply *r = redisCommandArgv(g_rc, 5, argv, lens);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    free(buf);
    freeReplyObject(redisCommand(g_rc, "PUBLISH %s %s", PW_KEY_WAKE, fn));
}

/* Waits for the done chunk of request id on the test reply stream; returns ms waited. */
static int64_t wait_reply(const char *id, const char **last_id, int timeout_ms)
{
    static char cursor[64] = "0-0";
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        redisReply *r =
            redisCommand(g_rc, "XREAD COUNT 100 BLOCK 500 STREAMS pw:reply:{test} %s", cursor);
        struct pw_stream_entries *es = NULL;
        if (r && pw_stream_parse_read(r, &es) == PW_OK) {
            for (size_t i = 0; i < es->n; i++) {
                snprintf(cursor, sizeof cursor, "%s", es->v[i].id);
                const struct pw_slice *m = pw_stream_entry_get(&es->v[i], PW_STREAM_FIELD);
                Parkway__ReplyChunk *ch = NULL;
                if (!m || pw_proto_unpack_reply(m->ptr, m->len, 0, &ch) != PW_OK)
                    continue;
                bool mine = strcmp(ch->request_id, id) == 0;
                bool done = ch->done;
                bool errored = ch->error != NULL;
                pw_proto_free_reply(ch);
                if (mine && errored)
                    fail_msg("request %s answered with an error", id);
                if (mine && done) {
                    pw_stream_entries_free(es);
                    freeReplyObject(r);
                    *last_id = cursor;
                    return (int64_t)(pw_clock_mono_ms() - t0);
                }
            }
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
    }
    return -1;
}

/* Number of pw:events entries whose action is `action` (and replica/reason contain `sub`). */
static size_t count_events(const char *action, const char *sub)
{
    redisReply *r = redisCommand(g_rc, "XRANGE %s - +", PW_KEY_EVENTS);
    struct pw_stream_entries *es = NULL;
    size_t n = 0;
    if (r && pw_stream_parse_range(r, &es) == PW_OK) {
        for (size_t i = 0; i < es->n; i++) {
            const struct pw_slice *a = pw_stream_entry_get(&es->v[i], "action");
            const struct pw_slice *why = pw_stream_entry_get(&es->v[i], "reason");
            if (a && strcmp(a->ptr, action) == 0 && (!sub || (why && strstr(why->ptr, sub))))
                n++;
        }
    }
    pw_stream_entries_free(es);
    freeReplyObject(r);
    return n;
}

static bool wait_event(const char *action, const char *sub, size_t at_least, int timeout_ms)
{
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        if (count_events(action, sub) >= at_least)
            return true;
        sleep_ms(50);
    }
    return false;
}

static long long hlen(const char *key)
{
    redisReply *r = redisCommand(g_rc, "HLEN %s", key);
    long long n = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    return n;
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
        sleep_ms(50);
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
    char cmd[1024], path[256];
    snprintf(path, sizeof path, "%s/functions", g_dir);
    mkdir(path, 0755);
    snprintf(cmd, sizeof cmd,
             PW_BINARY_DIR "/tools/gguf-gen/parkway-gguf-gen --out %s/tiny.gguf --shape tiny "
                           "--type q8_0 > /dev/null",
             g_dir);
    run_or_die(cmd);
    char spec[1024];
    snprintf(spec, sizeof spec,
             "name: tiny\n"
             "model:\n  path: %s/tiny.gguf\n  format: gguf\n"
             "resources:\n  gpu: none\n  cpu: 1\n  memory: 256MiB\n"
             "scaling:\n  min_replicas: 0\n  max_replicas: 1\n  target_concurrency: 4\n"
             "  idle_seconds: 1\n  idle_action: park\n  startup_timeout_seconds: 60\n"
             "engine:\n  max_batch: 4\n  context_length: 128\n"
             "pricing:\n  max_price_per_hour: 0\n  spot: on-demand\n"
             "max_queue_wait: 60s\n",
             g_dir);
    snprintf(path, sizeof path, "%s/functions/tiny.yaml", g_dir);
    write_file(path, spec);
    if (pw_redis_sync_connect(g_redis.url, 5000, &g_rc, NULL, 0) != PW_OK)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_scaler > 0)
        stop_scaler(g_scaler, 45000);
    if (g_rc)
        redisFree(g_rc);
    pw_test_redis_stop(&g_redis);
    if (!getenv("PW_TEST_KEEP")) {
        char cmd[256];
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
        run_or_die(cmd);
    } else {
        fprintf(stderr, "kept %s\n", g_dir);
    }
    return 0;
}

static void test_zero_to_one_park_unpark(void **state)
{
    (void)state;
    const char *cursor = NULL;
    g_scaler = start_scaler("--engine", engine_path());
    /* Registered for routers. */
    uint64_t t0 = pw_clock_mono_ms();
    while (hlen(PW_KEY_FUNCTIONS) < 1 && pw_clock_mono_ms() - t0 < 5000)
        sleep_ms(50);
    assert_int_equal(hlen(PW_KEY_FUNCTIONS), 1);
    /* Scale from zero: nothing runs until a request arrives. */
    sleep_ms(500);
    assert_int_equal(count_events("provision", NULL), 0);
    enqueue("tiny", "req-1");
    int64_t ms = wait_reply("req-1", &cursor, 30000);
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
    sleep_ms(1500);
    int st = 0;
    pid_t again = 0;
    assert_true(engine_status(&st, &again));
    assert_int_equal(st, PARKWAY__WORKER_STATE__WORKER_STATE_PARKED);
    assert_int_equal(again, served_pid);
    assert_int_equal(count_events("replica_failed", NULL), 0);
    assert_int_equal(count_events("unpark", NULL), 0);

    /* A new request unparks it: answered by the same process. */
    enqueue("tiny", "req-2");
    ms = wait_reply("req-2", &cursor, 30000);
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
    assert_int_equal(stop_scaler(g_scaler, 45000), 0);
    g_scaler = 0;
    assert_true(count_events("terminated", NULL) >= 1);
    assert_int_equal(hlen("pw:{tiny}:workers"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_zero_to_one_park_unpark),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

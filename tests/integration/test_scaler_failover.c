/*
 * parkway-scaler with the local provider under failure and scale-down, with real processes:
 * a real redis-server, the scaler binary, engines it starts on a small generated model.
 * The test plays the router: it XADDs InferenceRequests to pw:{fn}:q, publishes pw:wake and
 * reads every ReplyChunk from its reply stream.
 *
 *   kill:      an engine is killed with SIGKILL mid-generation -> the scaler sees the exit,
 *              replaces the replica, the new engine claims the dead worker's pending
 *              entries (the scaler passes --claim-idle-ms through --engine-arg) and answers
 *              them: every request ends with exactly one done chunk, on a later attempt,
 *              with every token, seqs 0..n-1 of that attempt, and nothing stays pending;
 *   in-flight: a generation longer than idle_seconds is never drained or parked while it
 *              runs (in flight > 0 keeps the replica); after it ends, the replica parks;
 *   cli:       `parkway fn ls` and `parkway fn events` show the function and its events.
 *
 * Generation lengths are sized from a measured warm-up, so the tests hold on a loaded
 * machine and under sanitizers (which only make generations longer).
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

#define FN "slow"
#define REPLY "pw:reply:{failover}"
#define CTX 4096
#define CLAIM_IDLE_MS "2500"
/* A "long" generation lasts about this long at the measured rate, ms. */
#define LONG_MS 3000
/* ... but never more tokens than this (decode slows as the context fills). */
#define LONG_TOKENS_MAX 1200

static struct pw_test_redis g_redis;
static char g_dir[128];
static pid_t g_scaler;
static redisContext *g_rc;
static double g_tok_per_ms; /* measured by the warm-up */

static pid_t start_scaler(void)
{
    const char *extra[] = {"--engine", pw_test_engine_path(),
                           "--engine-arg=--claim-idle-ms=" CLAIM_IDLE_MS, NULL};
    return pw_test_scaler_start(PW_TEST_SCALER_BIN, g_redis.url, g_dir, extra);
}

static void enqueue(const char *id, uint32_t max_tokens)
{
    struct pw_test_request q = {
        .fn = FN, .id = id, .reply_to = REPLY, .max_tokens = max_tokens, .ignore_eos = true};
    pw_test_enqueue(g_rc, &q);
}

/* What the reply stream holds for one request, as a router would dedup it. */
struct answer {
    unsigned chunks;            /* all chunks, every attempt */
    unsigned done;              /* done chunks, every attempt */
    unsigned errors;            /* chunks with an error */
    unsigned max_attempt;       /* highest attempt seen */
    unsigned done_attempt;      /* attempt of the (last) done chunk */
    unsigned done_seq;          /* seq of the done chunk */
    unsigned seq_seen_ok;       /* 1 if the done attempt's seqs are exactly 0..done_seq */
    uint32_t completion_tokens; /* usage on the done chunk */
};

/* Scans the whole reply stream for request id. */
static void read_answer(const char *id, struct answer *a)
{
    memset(a, 0, sizeof *a);
    redisReply *r = redisCommand(g_rc, "XRANGE %s - +", REPLY);
    struct pw_stream_entries *es = NULL;
    assert_non_null(r);
    if (pw_stream_parse_range(r, &es) != PW_OK) {
        freeReplyObject(r);
        return;
    }
    /* seqs per attempt: a bitmap for attempts 0..7, seqs 0..CTX */
    static uint8_t seen[8][CTX + 8];
    memset(seen, 0, sizeof seen);
    for (size_t i = 0; i < es->n; i++) {
        const struct pw_slice *m = pw_stream_entry_get(&es->v[i], PW_STREAM_FIELD);
        Parkway__ReplyChunk *ch = NULL;
        if (!m || pw_proto_unpack_reply(m->ptr, m->len, 0, &ch) != PW_OK)
            continue;
        if (strcmp(ch->request_id, id) == 0) {
            a->chunks++;
            if (ch->attempt > a->max_attempt)
                a->max_attempt = ch->attempt;
            if (ch->error)
                a->errors++;
            if (ch->attempt < 8 && ch->seq < CTX + 8)
                seen[ch->attempt][ch->seq]++;
            if (ch->done) {
                a->done++;
                a->done_attempt = ch->attempt;
                a->done_seq = ch->seq;
                a->completion_tokens = ch->usage ? ch->usage->completion_tokens : 0;
            }
        }
        pw_proto_free_reply(ch);
    }
    if (a->done && a->done_attempt < 8 && a->done_seq < CTX + 8) {
        a->seq_seen_ok = 1;
        for (unsigned s = 0; s <= a->done_seq; s++)
            if (seen[a->done_attempt][s] != 1)
                a->seq_seen_ok = 0;
    }
    pw_stream_entries_free(es);
    freeReplyObject(r);
}

/* Waits until request id has a done chunk; returns ms waited or -1. */
static int64_t wait_done(const char *id, int timeout_ms)
{
    uint64_t t0 = pw_clock_mono_ms();
    struct answer a;
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        read_answer(id, &a);
        if (a.errors)
            fail_msg("request %s answered with an error", id);
        if (a.done)
            return (int64_t)(pw_clock_mono_ms() - t0);
        pw_test_sleep_ms(20);
    }
    return -1;
}

static size_t count_events(const char *action)
{
    return pw_test_count_events(g_rc, action, NULL);
}

static bool wait_event(const char *action, size_t at_least, int timeout_ms)
{
    return pw_test_wait_event(g_rc, action, NULL, at_least, timeout_ms);
}

/* Pending entries of the engines group on pw:{fn}:q. */
static long long group_pending(void)
{
    redisReply *r = redisCommand(g_rc, "XPENDING pw:{" FN "}:q engines");
    long long n = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements >= 1 &&
        r->element[0]->type == REDIS_REPLY_INTEGER)
        n = r->element[0]->integer;
    freeReplyObject(r);
    return n;
}

/* pid of the one engine heartbeating for FN, or 0. */
static pid_t engine_pid(void)
{
    redisReply *r = redisCommand(g_rc, "HGETALL pw:{" FN "}:workers");
    pid_t pid = 0;
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        Parkway__WorkerStatus *ws = NULL;
        if (pw_proto_unpack_worker(r->element[i + 1]->str, r->element[i + 1]->len, 0, &ws) ==
            PW_OK) {
            if (ws->state == PARKWAY__WORKER_STATE__WORKER_STATE_READY)
                pid = (pid_t)ws->pid;
            pw_proto_free_worker(ws);
        }
    }
    freeReplyObject(r);
    return pid;
}

/* max_tokens for a generation of about ms at the measured rate, within the context. */
static uint32_t tokens_for_ms(int ms)
{
    double t = g_tok_per_ms * ms;
    if (t < 64)
        t = 64;
    if (t > LONG_TOKENS_MAX)
        t = LONG_TOKENS_MAX;
    return (uint32_t)t;
}

static int setup(void **state)
{
    (void)state;
    pw_test_redis_require();
    if (pw_test_redis_start(&g_redis) != PW_OK)
        return -1;
    snprintf(g_dir, sizeof g_dir, "/tmp/pw-scaler-failover-XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    char args[256], path[256];
    snprintf(path, sizeof path, "%s/functions", g_dir);
    mkdir(path, 0755);
    /* Small but not trivial: a few hundred tokens/s on 2 cores, so a long answer lasts
     * seconds without a huge context. */
    snprintf(path, sizeof path, "%s/slow.gguf", g_dir);
    snprintf(args, sizeof args,
             "--shape custom --n-layer 4 --n-embd 384 --n-ff 1024 --n-head 6 --n-head-kv 2 "
             "--n-ctx %d --type q8_0",
             CTX);
    pw_test_gguf_gen(path, args);
    char spec[1024];
    snprintf(spec, sizeof spec,
             "name: " FN "\n"
             "model:\n  path: %s/slow.gguf\n  format: gguf\n"
             "resources:\n  gpu: none\n  cpu: 1\n  memory: 256MiB\n"
             "scaling:\n  min_replicas: 0\n  max_replicas: 1\n  target_concurrency: 4\n"
             "  idle_seconds: 1\n  idle_action: park\n  startup_timeout_seconds: 60\n"
             "engine:\n  max_batch: 4\n  context_length: %d\n"
             "pricing:\n  max_price_per_hour: 0\n  spot: on-demand\n"
             "max_queue_wait: 120s\n",
             g_dir, CTX);
    snprintf(path, sizeof path, "%s/functions/" FN ".yaml", g_dir);
    pw_test_write_file(path, spec);
    if (pw_redis_sync_connect(g_redis.url, 10000, &g_rc, NULL, 0) != PW_OK)
        return -1;
    g_scaler = start_scaler();
    /* Warm-up: cold start, and the decode rate the long generations are sized from. */
    enqueue("warm-0", 1);
    if (wait_done("warm-0", 60000) < 0)
        return -1;
    uint64_t t0 = pw_clock_mono_ms();
    enqueue("warm-1", 200);
    int64_t ms = wait_done("warm-1", 120000);
    if (ms < 0)
        return -1;
    g_tok_per_ms = 200.0 / (double)(pw_clock_mono_ms() - t0 > 0 ? pw_clock_mono_ms() - t0 : 1);
    fprintf(stderr, "warm-up: %.1f tokens/s\n", g_tok_per_ms * 1000.0);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_scaler > 0) {
        int rc = pw_test_stop(g_scaler, 60000);
        if (rc != 0)
            fprintf(stderr, "scaler exit %d\n", rc);
    }
    if (g_rc)
        redisFree(g_rc);
    pw_test_redis_stop(&g_redis);
    pw_test_rmtree_unless_keep(g_dir);
    return 0;
}

static long long scale_field(const char *field)
{
    redisReply *r = redisCommand(g_rc, "HGET pw:{" FN "}:scale %s", field);
    long long n = r && r->type == REDIS_REPLY_STRING ? strtoll(r->str, NULL, 10) : -1;
    freeReplyObject(r);
    return n;
}

/* Waits for the function to be idle and parked (one parked replica, nothing else, no
 * engine heartbeating), so a test starts from a known place. */
static void wait_parked(void)
{
    uint64_t t0 = pw_clock_mono_ms();
    for (;;) {
        if (scale_field("parked") == 1 && scale_field("ready") == 0 &&
            scale_field("starting") == 0 && scale_field("provisioning") == 0 &&
            scale_field("draining") == 0 && scale_field("failed") == 0 && engine_pid() == 0)
            return;
        if (pw_clock_mono_ms() - t0 > 40000)
            fail_msg("the function did not park");
        pw_test_sleep_ms(50);
    }
}

static void test_sigkill_mid_request_is_reclaimed(void **state)
{
    (void)state;
    wait_parked();
    size_t failed0 = count_events("replica_failed");
    size_t prov0 = count_events("provision") + count_events("unpark");
    uint32_t n1 = tokens_for_ms(LONG_MS), n2 = tokens_for_ms(LONG_MS / 2);
    enqueue("kill-1", n1);
    enqueue("kill-2", n2);
    /* Both are taken (max_batch 4) and generating: kill the engine once kill-1 streams. */
    uint64_t t0 = pw_clock_mono_ms();
    struct answer a;
    pid_t pid = 0;
    for (;;) {
        read_answer("kill-1", &a);
        pid = engine_pid();
        if (a.chunks > 0 && pid > 0)
            break;
        assert_true(pw_clock_mono_ms() - t0 < 60000);
        pw_test_sleep_ms(10);
    }
    assert_int_equal(a.done, 0); /* mid-generation */
    assert_int_equal(kill(pid, SIGKILL), 0);
    fprintf(stderr, "killed engine pid %d after %u chunks of kill-1\n", (int)pid, a.chunks);

    /* The scaler sees the death and starts a replacement. */
    assert_true(wait_event("replica_failed", failed0 + 1, 10000));
    uint64_t t_kill = pw_clock_mono_ms();
    int64_t ms1 = wait_done("kill-1", 120000);
    int64_t ms2 = wait_done("kill-2", 120000);
    assert_true(ms1 >= 0);
    assert_true(ms2 >= 0);
    fprintf(stderr, "after the kill: kill-1 done in %llu ms\n",
            (unsigned long long)(pw_clock_mono_ms() - t_kill));
    assert_true(count_events("provision") + count_events("unpark") > prov0);

    /* Exactly one complete answer each, from a later attempt; nothing left pending. */
    const char *ids[] = {"kill-1", "kill-2"};
    uint32_t want[] = {n1, n2};
    for (int i = 0; i < 2; i++) {
        read_answer(ids[i], &a);
        fprintf(stderr, "%s: chunks=%u done=%u done_attempt=%u max_attempt=%u tokens=%u/%u\n",
                ids[i], a.chunks, a.done, a.done_attempt, a.max_attempt, a.completion_tokens,
                want[i]);
        assert_int_equal(a.done, 1);
        assert_int_equal(a.errors, 0);
        assert_true(a.done_attempt >= 1);
        assert_int_equal(a.done_attempt, a.max_attempt);
        assert_int_equal(a.seq_seen_ok, 1);
        assert_int_equal(a.completion_tokens, want[i]);
    }
    uint64_t tp = pw_clock_mono_ms();
    while (group_pending() != 0 && pw_clock_mono_ms() - tp < 5000)
        pw_test_sleep_ms(50);
    assert_int_equal(group_pending(), 0);
}

static void test_scale_down_waits_for_in_flight(void **state)
{
    (void)state;
    /* Several idle windows (1 s) must pass while it generates; the machine's speed varies
     * (load, sanitizers), so a run that ended too soon to prove anything is repeated with
     * twice the tokens. */
    uint32_t n = tokens_for_ms(LONG_MS);
    for (int round = 0;; round++) {
        wait_parked();
        size_t parked0 = count_events("parked");
        size_t drain0 = count_events("drain");
        char id[32];
        snprintf(id, sizeof id, "long-%d", round);
        uint64_t t0 = pw_clock_mono_ms();
        enqueue(id, n);
        struct answer a;
        for (;;) {
            read_answer(id, &a);
            if (a.done)
                break;
            assert_int_equal(count_events("drain"), drain0);
            assert_int_equal(count_events("parked"), parked0);
            assert_true(pw_clock_mono_ms() - t0 < 180000);
            pw_test_sleep_ms(20);
        }
        uint64_t ran = pw_clock_mono_ms() - t0;
        fprintf(stderr, "%s: %u tokens in %llu ms\n", id, n, (unsigned long long)ran);
        read_answer(id, &a);
        assert_int_equal(a.done, 1);
        assert_int_equal(a.done_attempt, 0);
        assert_int_equal(a.max_attempt, 0);
        assert_int_equal(a.seq_seen_ok, 1);
        assert_int_equal(a.completion_tokens, n);
        /* Then, idle with nothing in flight: scaled down as usual. */
        assert_true(wait_event("drain", drain0 + 1, 20000));
        assert_true(wait_event("parked", parked0 + 1, 20000));
        if (ran > 2500)
            return;                /* outlasted the idle window by more than a second */
        assert_true(n < CTX - 64); /* could not make it last: the test proves nothing */
        n = n * 2 < CTX - 64 ? n * 2 : CTX - 64;
    }
}

/* Output of a shell command (stdout), at most cap-1 bytes; returns the exit code. */
static int run_capture(const char *cmd, char *out, size_t cap)
{
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = '\0';
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli_ls_and_events(void **state)
{
    (void)state;
    static char out[65536];
    char cmd[512];
    wait_parked();
    snprintf(cmd, sizeof cmd, PW_BINARY_DIR "/tools/parkway fn ls --redis %s", g_redis.url);
    assert_int_equal(run_capture(cmd, out, sizeof out), 0);
    fprintf(stderr, "%s", out);
    assert_non_null(strstr(out, "FUNCTION"));
    assert_non_null(strstr(out, FN " "));
    assert_non_null(strstr(out, "parked"));
    assert_non_null(strstr(out, " ago"));
    /* The URL from the environment, as the other commands take it. */
    snprintf(cmd, sizeof cmd,
             "PARKWAY_REDIS_URL=%s " PW_BINARY_DIR "/tools/parkway fn events " FN " --count 5",
             g_redis.url);
    assert_int_equal(run_capture(cmd, out, sizeof out), 0);
    fprintf(stderr, "%s", out);
    size_t lines = 0;
    for (const char *p = out; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 5);
    assert_non_null(strstr(out, "parked"));
    /* All of them, oldest first: the first decision was the scale from zero. */
    snprintf(cmd, sizeof cmd,
             PW_BINARY_DIR "/tools/parkway fn events " FN " --count 100000 --redis %s",
             g_redis.url);
    assert_int_equal(run_capture(cmd, out, sizeof out), 0);
    assert_non_null(strstr(out, "scale_from_zero"));
    assert_non_null(strstr(out, "replica_failed"));
    assert_true(strstr(out, "scale_from_zero") < strstr(out, "replica_failed"));
    /* --follow prints what comes next, and stops on SIGTERM with 0. */
    char fout[256];
    snprintf(fout, sizeof fout, "%s/follow.out", g_dir);
    pid_t fp = fork();
    if (fp == 0) {
        int fd = open(fout, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0)
            dup2(fd, 1);
        execl(PW_BINARY_DIR "/tools/parkway", "parkway", "fn", "events", FN, "--count", "0",
              "--follow", "--redis", g_redis.url, (char *)NULL);
        _exit(127);
    }
    pw_test_sleep_ms(1000);
    freeReplyObject(redisCommand(g_rc,
                                 "XADD %s * function " FN " action test_marker replica - "
                                 "reason hello",
                                 PW_KEY_EVENTS));
    freeReplyObject(redisCommand(g_rc,
                                 "XADD %s * function other action other_marker replica - "
                                 "reason x",
                                 PW_KEY_EVENTS));
    pw_test_sleep_ms(1500);
    kill(fp, SIGTERM);
    int st = 0;
    waitpid(fp, &st, 0);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    FILE *ff = fopen(fout, "r");
    assert_non_null(ff);
    size_t got = fread(out, 1, sizeof out - 1, ff);
    out[got] = '\0';
    fclose(ff);
    fprintf(stderr, "follow: %s", out);
    assert_non_null(strstr(out, "test_marker"));
    assert_null(strstr(out, "other_marker")); /* another function's */
    assert_null(strstr(out, "parked"));       /* --count 0: nothing old */
    /* Bad input: exit 2. */
    snprintf(cmd, sizeof cmd,
             PW_BINARY_DIR "/tools/parkway fn events no-such-fn --redis %s 2>/dev/null",
             g_redis.url);
    assert_int_equal(run_capture(cmd, out, sizeof out), 2);
    assert_int_equal(
        run_capture(PW_BINARY_DIR "/tools/parkway fn ls --bogus 2>/dev/null", out, sizeof out), 2);
    /* Redis unreachable: exit 1. */
    assert_int_equal(run_capture(PW_BINARY_DIR
                                 "/tools/parkway fn ls --redis redis://127.0.0.1:1 2>/dev/null",
                                 out, sizeof out),
                     1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkill_mid_request_is_reclaimed),
        cmocka_unit_test(test_scale_down_waits_for_in_flight),
        cmocka_unit_test(test_cli_ls_and_events),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

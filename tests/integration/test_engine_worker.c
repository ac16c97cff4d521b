/*
 * Integration tests of parkway-engine in worker mode: a real redis-server, the engine as a
 * child process, requests pushed as the router pushes them (XADD pw:{fn}:q * m <packed
 * InferenceRequest>) and ReplyChunks read back from each request's reply stream.
 *
 * The model is generated here (4 layers, 256 wide, Q8_0, ChatML tokenizer): random
 * weights, so the text is noise, but deterministic noise, which is all these tests need.
 * One worker ("w-main" on function "tiny", 4 slots, context 512) serves most cases; the
 * SIGTERM drain, the park/unpark signals and the stale-entry claim each run their own
 * worker on their own function.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
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

#include "gguf_gen.h"
#include "kernel.h"
#include "parkway.pb-c.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_test_proc.h"
#include "pw_test_redis.h"

#define ENGINE PW_BINARY_DIR "/engine/parkway-engine"
#define CTX 512
#define SLOTS 4
#define MAX_CHOICES 8
#define TEXT_CAP 16384

static struct pw_test_redis srv;
static redisContext *rc;
static char dir[64];
static char model_path[128];
static pid_t main_pid;

/* ---- helpers: time, processes ---------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void write_spec(const char *fn)
{
    char path[160], text[512];
    snprintf(path, sizeof path, "%s/%s.yaml", dir, fn);
    snprintf(text, sizeof text,
             "name: %s\nmodel:\n  path: %s\nengine:\n  max_batch: %d\n  context_length: %d\n", fn,
             model_path, SLOTS, CTX);
    pw_test_write_file(path, text);
}

static void dump_log(const char *worker)
{
    char path[160], line[1024];
    snprintf(path, sizeof path, "%s/%s.log", dir, worker);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    fprintf(stderr, "---- %s ----\n", path);
    while (fgets(line, sizeof line, f))
        fputs(line, stderr);
    fclose(f);
}

/* Starts a worker for fn; its output goes to <dir>/<worker>.log. extra: one more flag or
 * NULL. */
static pid_t start_worker_with(const char *fn, const char *worker, const char *extra)
{
    char spec[160], log[160];
    snprintf(spec, sizeof spec, "%s/%s.yaml", dir, fn);
    snprintf(log, sizeof log, "%s/%s.log", dir, worker);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execl(ENGINE, ENGINE, "--spec", spec, "--redis", srv.url, "--worker-id", worker,
              "--claim-idle-ms", "500", "--threads", "2", extra, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static pid_t start_worker(const char *fn, const char *worker)
{
    return start_worker_with(fn, worker, NULL);
}

static bool heartbeat_exists(const char *fn, const char *worker)
{
    char key[PW_KEY_MAX];
    pw_key_workers(key, sizeof key, fn);
    redisReply *r = redisCommand(rc, "HEXISTS %s %s", key, worker);
    assert_non_null(r);
    bool yes = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    freeReplyObject(r);
    return yes;
}

/* Waits for the worker's first heartbeat (it is serving then). */
static void wait_ready(pid_t pid, const char *fn, const char *worker)
{
    for (int i = 0; i < 1200; i++) {
        if (heartbeat_exists(fn, worker))
            return;
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            dump_log(worker);
            fail_msg("worker %s exited before it was ready (status %d)", worker, st);
        }
        pw_test_sleep_ms(50);
    }
    dump_log(worker);
    fail_msg("worker %s not ready after 60 s", worker);
}

/* Waits up to ms for pid to exit; returns its exit code, or -1 on timeout. */
static int wait_exit(pid_t pid, int ms)
{
    for (int i = 0; i < ms / 20; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pw_test_sleep_ms(20);
    }
    return -1;
}

static Parkway__WorkerStatus *get_status(const char *fn, const char *worker)
{
    char key[PW_KEY_MAX];
    pw_key_workers(key, sizeof key, fn);
    redisReply *r = redisCommand(rc, "HGET %s %s", key, worker);
    assert_non_null(r);
    Parkway__WorkerStatus *ws = NULL;
    if (r->type == REDIS_REPLY_STRING)
        assert_int_equal(pw_proto_unpack_worker(r->str, r->len, 0, &ws), PW_OK);
    freeReplyObject(r);
    return ws;
}

static long long pending_count(const char *fn)
{
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, fn);
    redisReply *r = redisCommand(rc, "XPENDING %s %s", key, PW_GROUP_ENGINES);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    long long n = r->element[0]->integer;
    freeReplyObject(r);
    return n;
}

/* The XACK is pipelined right after the last chunk: give it a moment. */
static void wait_no_pending(const char *fn)
{
    long long n = -1;
    for (int i = 0; i < 200 && (n = pending_count(fn)) != 0; i++)
        pw_test_sleep_ms(20);
    assert_int_equal(n, 0);
}

/* ---- requests -------------------------------------------------------------------------- */

struct rq {
    const char *id;
    const char *fn;   /* NULL = "tiny" */
    const char *user; /* chat: one user message; NULL = completion */
    const uint32_t *ids;
    size_t n_ids;
    uint32_t max_tokens; /* 0 = absent */
    float temperature;   /* used when has_temp */
    bool has_temp;
    uint64_t seed;
    uint32_t n; /* 0 = absent */
    const char *stop;
    int64_t deadline;
    bool honour_eos;
};

static void reply_key(char *buf, size_t cap, const char *id)
{
    snprintf(buf, cap, "pw:reply:{t-%s}", id);
}

static void push_raw(const char *fn, const void *buf, size_t len, const char *field)
{
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, fn);
    redisReply *r = redisCommand(rc, "XADD %s * %s %b", key, field, buf, len);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
}

static void push(const struct rq *q)
{
    const char *fn = q->fn ? q->fn : "tiny";
    char rk[PW_KEY_MAX];
    reply_key(rk, sizeof rk, q->id);
    Parkway__InferenceRequest m = PARKWAY__INFERENCE_REQUEST__INIT;
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    Parkway__ChatMessage msg = PARKWAY__CHAT_MESSAGE__INIT;
    Parkway__ChatMessage *msgs[1] = {&msg};
    char *stops[1] = {(char *)q->stop};
    m.id = (char *)q->id;
    m.function = (char *)fn;
    m.tenant = "test";
    m.reply_to = rk;
    m.enqueued_unix_ms = now_ms();
    m.deadline_unix_ms = q->deadline;
    if (q->user) {
        m.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT;
        msg.role = "user";
        msg.content = (char *)q->user;
        m.n_messages = 1;
        m.messages = msgs;
    } else {
        m.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
        m.n_prompt_token_ids = q->n_ids;
        m.prompt_token_ids = (uint32_t *)q->ids;
    }
    sp.seed = q->seed;
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_SEED);
    if (q->max_tokens) {
        sp.max_tokens = q->max_tokens;
        pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS);
    }
    if (q->has_temp) {
        sp.temperature = q->temperature;
        pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE);
    }
    if (q->n) {
        sp.n = q->n;
        pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N);
    }
    if (q->stop) {
        sp.n_stop = 1;
        sp.stop = stops;
    }
    sp.ignore_eos = !q->honour_eos;
    m.sampling = &sp;
    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    if (pw_proto_pack_request_alloc(&m, &buf, &len, &why) != PW_OK)
        fail_msg("pack: %s", why ? why : "?");
    push_raw(fn, buf, len, PW_STREAM_FIELD);
    free(buf);
}

/* What came back for one request. */
struct result {
    char rkey[PW_KEY_MAX];
    char last_id[PW_STREAM_ID_MAX];
    uint32_t n_chunks;
    char text[MAX_CHOICES][TEXT_CAP];
    size_t n_text[MAX_CHOICES];
    int finish[MAX_CHOICES]; /* Parkway__FinishReason, 0 = not finished */
    uint32_t n_finished, n_done;
    bool done;
    uint32_t prompt_tokens, completion_tokens, cached_tokens;
    char err_code[64];
    uint32_t http_status;
    uint32_t attempt;
    char worker[64];
    int64_t done_ms;
    pid_t watch;          /* the worker expected to answer; 0 = the main worker */
    const char *watch_id; /* its worker id, for the log dump */
    bool reaped;          /* it exited while we read; exit_code is its status */
    int exit_code;
};

static void result_init(struct result *res, const char *id)
{
    memset(res, 0, sizeof *res);
    reply_key(res->rkey, sizeof res->rkey, id);
    snprintf(res->last_id, sizeof res->last_id, "0-0");
}

static void take_chunk(struct result *res, const Parkway__ReplyChunk *c)
{
    if (getenv("PW_TEST_CHUNKS")) /* debugging aid: every chunk on stdout */
        printf("%s seq=%u attempt=%u index=%u finish=%d done=%d error=%s n_text=%zu\n", res->rkey,
               c->seq, c->attempt, c->index, c->finish_reason, c->done,
               c->error && c->error->code ? c->error->code : "-", c->text ? strlen(c->text) : 0);
    if (c->seq != res->n_chunks)
        fail_msg("chunk seq %u where %u was expected", c->seq, res->n_chunks);
    if (res->n_chunks == 0) {
        res->attempt = c->attempt;
        snprintf(res->worker, sizeof res->worker, "%s", c->worker_id ? c->worker_id : "");
    }
    assert_int_equal(c->attempt, res->attempt);
    assert_false(res->done); /* nothing after the done chunk */
    res->n_chunks++;
    assert_true(c->index < MAX_CHOICES);
    size_t tl = c->text ? strlen(c->text) : 0;
    assert_true(res->n_text[c->index] + tl < TEXT_CAP);
    memcpy(res->text[c->index] + res->n_text[c->index], c->text ? c->text : "", tl);
    res->n_text[c->index] += tl;
    res->text[c->index][res->n_text[c->index]] = '\0';
    if (c->finish_reason != PARKWAY__FINISH_REASON__FINISH_REASON_NONE) {
        assert_int_equal(res->finish[c->index], 0); /* one finish per choice */
        res->finish[c->index] = c->finish_reason;
        res->n_finished++;
    }
    if (c->error) {
        snprintf(res->err_code, sizeof res->err_code, "%s", c->error->code ? c->error->code : "");
        res->http_status = c->error->http_status;
    }
    if (c->done) {
        res->done = true;
        res->n_done++;
        res->done_ms = now_ms();
        if (c->usage) {
            res->prompt_tokens = c->usage->prompt_tokens;
            res->completion_tokens = c->usage->completion_tokens;
            res->cached_tokens = c->usage->cached_tokens;
        }
    }
}

/* True when the worker that should answer has exited (reaped here; its status is kept).
 * collect() then reads once more and fails, rather than waiting out its timeout. */
static bool watched_gone(struct result *res)
{
    pid_t pid = res->watch ? res->watch : main_pid;
    if (res->reaped || pid <= 0)
        return true;
    int st;
    if (waitpid(pid, &st, WNOHANG) != pid)
        return false;
    res->reaped = true;
    res->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    if (!res->watch)
        main_pid = 0;
    return true;
}

/* Exit code of the watched worker: reaped by collect() already, or waited for here. */
static int watched_exit(struct result *res, int ms)
{
    return res->reaped ? res->exit_code : wait_exit(res->watch, ms);
}

/* Reads chunks until the done chunk (or, with first_only, until any chunk) or timeout. */
static void collect(struct result *res, bool first_only, int timeout_ms)
{
    int64_t end = now_ms() + timeout_ms;
    uint32_t start = res->n_chunks;
    while (!res->done && !(first_only && res->n_chunks > start)) {
        if (now_ms() > end)
            fail_msg("%s: no %s chunk within %d ms (%u chunks so far)", res->rkey,
                     first_only ? "first" : "done", timeout_ms, res->n_chunks);
        bool gone = watched_gone(res);
        redisReply *r =
            redisCommand(rc, "XREAD COUNT 100 BLOCK 500 STREAMS %s %s", res->rkey, res->last_id);
        assert_non_null(r);
        struct pw_stream_entries *es = NULL;
        assert_int_equal(pw_stream_parse_read(r, &es), PW_OK);
        for (size_t i = 0; i < es->n; i++) {
            const struct pw_slice *v = pw_stream_entry_get(&es->v[i], PW_STREAM_FIELD);
            assert_non_null(v);
            Parkway__ReplyChunk *c = NULL;
            assert_int_equal(pw_proto_unpack_reply(v->ptr, v->len, 0, &c), PW_OK);
            take_chunk(res, c);
            pw_proto_free_reply(c);
            snprintf(res->last_id, sizeof res->last_id, "%s", es->v[i].id);
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
        if (gone && !res->done && !(first_only && res->n_chunks > start)) {
            const char *id = res->watch ? res->watch_id : "w-main";
            dump_log(id);
            fail_msg("worker %s is gone (exit %d) while %s waited for replies", id, res->exit_code,
                     res->rkey);
        }
    }
}

static void run(const struct rq *q, struct result *res)
{
    result_init(res, q->id);
    push(q);
    collect(res, false, 60000);
}

/* ---- fixture --------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    pw_test_redis_require();
    if (pw_test_redis_start(&srv) != PW_OK)
        return -1;
    rc = redisConnect("127.0.0.1", srv.port);
    if (!rc || rc->err)
        return -1;
    snprintf(dir, sizeof dir, "/tmp/pw_test_worker_XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(model_path, sizeof model_path, "%s/model.gguf", dir);
    struct gguf_gen_opts o;
    gguf_gen_preset("custom", &o);
    o.n_layer = 4;
    o.n_embd = 256;
    o.n_ff = 768;
    o.n_head = 4;
    o.n_head_kv = 2;
    o.n_ctx = 2048;
    o.type = KERNEL_DTYPE_Q8_0;
    o.seed = 3;
    FILE *f = fopen(model_path, "wb");
    char err[256];
    if (!f || gguf_gen_write(&o, f, err, sizeof err) != PW_OK || fclose(f) != 0)
        return -1;
    write_spec("tiny");
    write_spec("drain");
    write_spec("stale");
    write_spec("park");
    write_spec("prepark");
    main_pid = start_worker("tiny", "w-main");
    wait_ready(main_pid, "tiny", "w-main");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (main_pid > 0) {
        kill(main_pid, SIGTERM);
        if (wait_exit(main_pid, 20000) != 0)
            dump_log("w-main");
    }
    if (rc)
        redisFree(rc);
    pw_test_redis_stop(&srv);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
    return 0;
}

static void assert_main_alive(void)
{
    int st;
    if (waitpid(main_pid, &st, WNOHANG) == main_pid) {
        main_pid = 0;
        dump_log("w-main");
        fail_msg("the main worker died (status %d)", st);
    }
}

/* ---- cases ----------------------------------------------------------------------------- */

static void test_chat_streams_chunks_and_usage(void **state)
{
    (void)state;
    struct rq q = {.id = "chat-1",
                   .user = "Hello, how are you?",
                   .max_tokens = 8,
                   .has_temp = true,
                   .temperature = 0};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_int_equal(res.n_done, 1);
    assert_true(res.n_chunks >= 2); /* token chunks then the done chunk */
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.completion_tokens, 8);
    assert_true(res.prompt_tokens > 5);
    assert_int_equal(res.attempt, 0);
    assert_string_equal(res.worker, "w-main");
    assert_string_equal(res.err_code, "");
    wait_no_pending("tiny");
}

static void test_completion_with_token_ids(void **state)
{
    (void)state;
    uint32_t ids[21];
    for (uint32_t i = 0; i < 21; i++)
        ids[i] = 10 + i * 13;
    struct rq q = {.id = "cmpl-1", .ids = ids, .n_ids = 21, .max_tokens = 5, .has_temp = true};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_int_equal(res.prompt_tokens, 21);
    assert_int_equal(res.completion_tokens, 5);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    wait_no_pending("tiny");
}

static void test_n_choices_each_finish(void **state)
{
    (void)state;
    struct rq q = {.id = "n3",
                   .user = "Tell me a story",
                   .max_tokens = 6,
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 7,
                   .n = 3};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_int_equal(res.n_done, 1);
    assert_int_equal(res.n_finished, 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(res.finish[i], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.finish[3], 0);
    assert_int_equal(res.completion_tokens, 18);
    wait_no_pending("tiny");
}

static bool pick_stop(const char *text, size_t n, char *stop)
{
    for (size_t s = n / 3; s + 3 <= n; s++) {
        bool ok = true;
        for (size_t k = 0; k < 3; k++)
            ok &= text[s + k] > ' ' && text[s + k] < 127;
        if (ok) {
            memcpy(stop, text + s, 3);
            stop[3] = '\0';
            return true;
        }
    }
    return false;
}

static void test_stop_string(void **state)
{
    (void)state;
    bool checked = false;
    for (uint64_t seed = 1; seed < 10 && !checked; seed++) {
        char id[32], id2[32];
        snprintf(id, sizeof id, "stop-a%llu", (unsigned long long)seed);
        snprintf(id2, sizeof id2, "stop-b%llu", (unsigned long long)seed);
        struct rq q = {.id = id,
                       .user = "Write something",
                       .max_tokens = 40,
                       .has_temp = true,
                       .temperature = 0.8f,
                       .seed = seed};
        static struct result full, stopped;
        run(&q, &full);
        char stop[4];
        if (!pick_stop(full.text[0], full.n_text[0], stop))
            continue;
        size_t want = (size_t)(strstr(full.text[0], stop) - full.text[0]);
        q.id = id2;
        q.stop = stop;
        run(&q, &stopped);
        assert_true(stopped.done);
        assert_int_equal(stopped.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_STOP);
        if (stopped.n_text[0] != want || memcmp(stopped.text[0], full.text[0], want) != 0)
            fail_msg("stop '%s': got '%s', want the first %zu bytes of '%s'", stop, stopped.text[0],
                     want, full.text[0]);
        assert_null(strstr(stopped.text[0], stop));
        checked = true;
    }
    assert_true(checked);
    wait_no_pending("tiny");
}

static void test_cancel_mid_generation(void **state)
{
    (void)state;
    /* no max_tokens: 8 choices on 4 slots would each run to the end of the context (about
     * 500 tokens), two waves of 500 steps: seconds, however fast the machine */
    struct rq q = {.id = "cancel-1",
                   .user = "Go on forever",
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 1,
                   .n = 8};
    struct result res;
    result_init(&res, q.id);
    push(&q);
    for (int i = 0; i < 5; i++) /* let it run a few tokens */
        collect(&res, true, 60000);
    assert_false(res.done);
    char key[PW_KEY_MAX];
    pw_key_cancel(key, sizeof key, q.id);
    redisReply *r = redisCommand(rc, "SET %s 1 PX 60000", key);
    freeReplyObject(r);
    int64_t t0 = now_ms();
    collect(&res, false, 60000);
    printf("cancel: done %lld ms after the flag, %u completion tokens\n",
           (long long)(res.done_ms - t0), res.completion_tokens);
    for (int i = 0; i < 8; i++)
        assert_int_equal(res.finish[i], PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED);
    assert_string_equal(res.err_code, ""); /* a client's cancel is not an error */
    assert_true(res.done_ms - t0 < 5000);
    assert_true(res.completion_tokens < 8 * (CTX - 50));
    wait_no_pending("tiny");
    /* the slot is free again: the heartbeat says no slot is busy */
    bool idle = false;
    for (int i = 0; i < 100 && !idle; i++) {
        Parkway__WorkerStatus *ws = get_status("tiny", "w-main");
        idle = ws && ws->slots_busy == 0;
        pw_proto_free_worker(ws);
        if (!idle)
            pw_test_sleep_ms(50);
    }
    assert_true(idle);
}

static void test_deadline_already_past(void **state)
{
    (void)state;
    struct rq q = {
        .id = "late-1", .user = "Too late", .max_tokens = 4, .deadline = now_ms() - 5000};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_int_equal(res.n_chunks, 1);
    assert_string_equal(res.err_code, "deadline_exceeded");
    assert_int_equal(res.http_status, 504);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_ERROR);
    assert_int_equal(res.completion_tokens, 0);
    wait_no_pending("tiny");
}

static void test_deadline_passes_mid_generation(void **state)
{
    (void)state;
    /* 8 choices of about 500 tokens on 4 slots: far from done when the deadline comes */
    int64_t deadline = now_ms() + 300;
    struct rq q = {.id = "late-2",
                   .user = "Keep talking",
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 8,
                   .n = 8,
                   .deadline = deadline};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    printf("deadline: finish %d, %u completion tokens, done %lld ms after the deadline\n",
           res.finish[0], res.completion_tokens, (long long)(res.done_ms - deadline));
    assert_string_equal(res.err_code, "deadline_exceeded");
    assert_int_equal(res.http_status, 504);
    /* Refused (error) had the queue been slower than the deadline; otherwise every choice
     * ends: the ones that finished before the deadline by length, the rest cancelled. On a
     * fast machine the first four may finish in time, so only the rest must be cancelled. */
    if (res.finish[0] == PARKWAY__FINISH_REASON__FINISH_REASON_ERROR) {
        assert_int_equal(res.n_finished, 1);
    } else {
        assert_int_equal(res.n_finished, 8);
        int cancelled = 0;
        for (int i = 0; i < 8; i++) {
            if (res.finish[i] == PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED)
                cancelled++;
            else
                assert_int_equal(res.finish[i], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
        }
        assert_true(cancelled >= 1);
    }
    assert_true(res.done_ms - deadline < 5000);
    assert_true(res.completion_tokens < 8 * (CTX - 50));
    wait_no_pending("tiny");
}

static void test_prompt_longer_than_context(void **state)
{
    (void)state;
    static uint32_t ids[CTX + 88];
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++)
        ids[i] = 3 + (uint32_t)(i * 7 % 380);
    struct rq q = {
        .id = "long-1", .ids = ids, .n_ids = sizeof ids / sizeof ids[0], .max_tokens = 4};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_string_equal(res.err_code, "context_length_exceeded");
    assert_int_equal(res.http_status, 400);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_ERROR);
    wait_no_pending("tiny");
    /* just under the context still works */
    struct rq ok = {.id = "long-2", .ids = ids, .n_ids = CTX - 3, .max_tokens = 10};
    run(&ok, &res);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.completion_tokens, 3); /* the context ran out first */
}

static void test_garbage_entries_are_acked(void **state)
{
    (void)state;
    uint8_t junk[64];
    uint64_t s = 0x1234567;
    for (size_t i = 0; i < sizeof junk; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        junk[i] = (uint8_t)(s >> 56);
    }
    junk[0] = 0xff; /* an invalid tag varint: never a valid message */
    push_raw("tiny", junk, sizeof junk, PW_STREAM_FIELD);
    push_raw("tiny", "hello", 5, "x");        /* no "m" field at all */
    push_raw("tiny", "", 0, PW_STREAM_FIELD); /* decodes to an empty, invalid request */
    struct rq q = {.id = "after-junk", .user = "Still there?", .max_tokens = 3};
    struct result res;
    run(&q, &res);
    assert_true(res.done);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    wait_no_pending("tiny");
    assert_main_alive();
}

static void test_wrong_function_gets_error(void **state)
{
    (void)state;
    /* a request naming another function on our stream: error chunk, acked */
    struct rq q = {.id = "wrongfn", .user = "hi", .max_tokens = 3};
    char rk[PW_KEY_MAX];
    reply_key(rk, sizeof rk, q.id);
    Parkway__InferenceRequest m = PARKWAY__INFERENCE_REQUEST__INIT;
    Parkway__ChatMessage msg = PARKWAY__CHAT_MESSAGE__INIT;
    Parkway__ChatMessage *msgs[1] = {&msg};
    msg.role = "user";
    msg.content = "hi";
    m.id = "wrongfn";
    m.function = "other";
    m.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT;
    m.n_messages = 1;
    m.messages = msgs;
    m.reply_to = rk;
    uint8_t *buf;
    size_t len;
    assert_int_equal(pw_proto_pack_request_alloc(&m, &buf, &len, NULL), PW_OK);
    push_raw("tiny", buf, len, PW_STREAM_FIELD);
    free(buf);
    struct result res;
    result_init(&res, q.id);
    collect(&res, false, 30000);
    assert_string_equal(res.err_code, "invalid_request_error");
    wait_no_pending("tiny");
}

static void test_heartbeat(void **state)
{
    (void)state;
    Parkway__WorkerStatus *ws = get_status("tiny", "w-main");
    assert_non_null(ws);
    assert_string_equal(ws->worker_id, "w-main");
    assert_string_equal(ws->function, "tiny");
    assert_int_equal(ws->state, PARKWAY__WORKER_STATE__WORKER_STATE_READY);
    assert_int_equal(ws->slots_total, SLOTS);
    assert_true(ws->slots_busy <= SLOTS);
    assert_int_equal(ws->pid, (uint32_t)main_pid);
    assert_int_equal(ws->context_len, CTX);
    assert_true(ws->kv_blocks_total > 0);
    assert_true(ws->kv_blocks_free <= ws->kv_blocks_total);
    assert_string_equal(ws->backend, "cpu");
    int64_t age = now_ms() - ws->last_heartbeat_unix_ms;
    assert_true(age >= -1000 && age < 5000);
    int64_t first = ws->last_heartbeat_unix_ms;
    pw_proto_free_worker(ws);
    /* it beats every second */
    bool newer = false;
    for (int i = 0; i < 100 && !newer; i++) {
        pw_test_sleep_ms(50);
        ws = get_status("tiny", "w-main");
        newer = ws && ws->last_heartbeat_unix_ms > first;
        pw_proto_free_worker(ws);
    }
    assert_true(newer);
}

static void test_same_seed_same_text(void **state)
{
    (void)state;
    struct rq q = {.id = "det-a",
                   .user = "Say something random",
                   .max_tokens = 24,
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 1234};
    static struct result a, b, c;
    run(&q, &a);
    q.id = "det-b";
    run(&q, &b);
    q.id = "det-c";
    q.seed = 4321;
    run(&q, &c);
    assert_true(a.n_text[0] > 0);
    assert_string_equal(a.text[0], b.text[0]);
    assert_int_equal(a.completion_tokens, b.completion_tokens);
    assert_string_not_equal(a.text[0], c.text[0]); /* the seed matters */
}

static void test_sigterm_drains_then_exits_0(void **state)
{
    (void)state;
    pid_t pid = start_worker("drain", "w-drain");
    wait_ready(pid, "drain", "w-drain");
    struct rq q = {.id = "drain-1",
                   .fn = "drain",
                   .user = "A long answer please",
                   .max_tokens = 100,
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 2};
    struct result res;
    result_init(&res, q.id);
    res.watch = pid;
    res.watch_id = "w-drain";
    push(&q);
    collect(&res, true, 60000);
    assert_false(res.done);
    assert_int_equal(kill(pid, SIGTERM), 0);
    collect(&res, false, 60000);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.completion_tokens, 100);
    int code = watched_exit(&res, 30000);
    if (code != 0) {
        dump_log("w-drain");
        if (code < 0)
            kill(pid, SIGKILL);
        fail_msg("worker exit code %d after SIGTERM", code);
    }
    assert_false(heartbeat_exists("drain", "w-drain"));
    assert_int_equal(pending_count("drain"), 0);
}

/* Waits up to ms for the worker's heartbeat to say state; false on timeout. */
static bool wait_state(const char *fn, const char *worker, int state, int ms)
{
    for (int i = 0; i < ms / 20; i++) {
        Parkway__WorkerStatus *ws = get_status(fn, worker);
        bool yes = ws && (int)ws->state == state;
        pw_proto_free_worker(ws);
        if (yes)
            return true;
        pw_test_sleep_ms(20);
    }
    return false;
}

/* Undelivered entries of fn's interactive stream (the group's lag). */
static long long stream_lag(const char *fn)
{
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, fn);
    redisReply *r = redisCommand(rc, "XINFO GROUPS %s", key);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    long long lag = -1;
    for (size_t g = 0; g < r->elements; g++) {
        const redisReply *e = r->element[g];
        for (size_t i = 0; i + 1 < e->elements; i += 2)
            if (strcmp(e->element[i]->str, "lag") == 0 &&
                e->element[i + 1]->type == REDIS_REPLY_INTEGER)
                lag = e->element[i + 1]->integer;
    }
    freeReplyObject(r);
    return lag;
}

/*
 * SIGUSR1 while a request runs: it completes; the heartbeat says PARKED (and keeps beating);
 * a new request is neither delivered nor answered until SIGUSR2, then it is, by the same
 * process; SIGTERM while parked exits 0 and removes the heartbeat.
 */
static void test_park_finishes_work_then_waits_for_unpark(void **state)
{
    (void)state;
    pid_t pid = start_worker("park", "w-park");
    wait_ready(pid, "park", "w-park");
    struct rq q = {.id = "park-1",
                   .fn = "park",
                   .user = "A long answer please",
                   .max_tokens = 60,
                   .has_temp = true,
                   .temperature = 0.8f,
                   .seed = 5};
    struct result res;
    result_init(&res, q.id);
    res.watch = pid;
    res.watch_id = "w-park";
    push(&q);
    collect(&res, true, 60000);
    assert_false(res.done);
    assert_int_equal(kill(pid, SIGUSR1), 0);
    collect(&res, false, 60000);
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.completion_tokens, 60);
    assert_true(wait_state("park", "w-park", PARKWAY__WORKER_STATE__WORKER_STATE_PARKED, 10000));
    assert_int_equal(pending_count("park"), 0);

    /* Parked: still heartbeating, same process. */
    Parkway__WorkerStatus *ws = get_status("park", "w-park");
    assert_non_null(ws);
    int64_t first = ws->last_heartbeat_unix_ms;
    assert_int_equal(ws->pid, (uint32_t)pid);
    assert_int_equal(ws->slots_busy, 0);
    pw_proto_free_worker(ws);

    /* A request while parked: nobody reads it (no delivery, no pending, no answer). */
    struct rq q2 = {.id = "park-2", .fn = "park", .user = "Are you there?", .max_tokens = 5};
    struct result res2;
    result_init(&res2, q2.id);
    res2.watch = pid;
    res2.watch_id = "w-park";
    push(&q2);
    pw_test_sleep_ms(1500);
    assert_int_equal(stream_lag("park"), 1);
    assert_int_equal(pending_count("park"), 0);
    redisReply *r = redisCommand(rc, "XLEN %s", res2.rkey);
    assert_non_null(r);
    assert_int_equal(r->integer, 0);
    freeReplyObject(r);
    ws = get_status("park", "w-park");
    assert_non_null(ws);
    assert_int_equal(ws->state, PARKWAY__WORKER_STATE__WORKER_STATE_PARKED);
    assert_true(ws->last_heartbeat_unix_ms > first); /* it beats while parked */
    pw_proto_free_worker(ws);
    int st;
    assert_int_equal(waitpid(pid, &st, WNOHANG), 0);

    /* SIGUSR2: answered at once, by the same process. */
    int64_t t0 = now_ms();
    assert_int_equal(kill(pid, SIGUSR2), 0);
    collect(&res2, false, 60000);
    fprintf(stderr, "unparked request answered in %lld ms\n", (long long)(now_ms() - t0));
    assert_int_equal(res2.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res2.completion_tokens, 5);
    assert_string_equal(res2.worker, "w-park");
    assert_int_equal(res2.attempt, 0);
    assert_true(wait_state("park", "w-park", PARKWAY__WORKER_STATE__WORKER_STATE_READY, 5000));
    wait_no_pending("park");

    /* Parked again, then SIGTERM: exits 0 and removes its heartbeat. */
    assert_int_equal(kill(pid, SIGUSR1), 0);
    assert_true(wait_state("park", "w-park", PARKWAY__WORKER_STATE__WORKER_STATE_PARKED, 10000));
    assert_int_equal(kill(pid, SIGTERM), 0);
    int code = watched_exit(&res2, 30000);
    if (code != 0) {
        dump_log("w-park");
        if (code < 0)
            kill(pid, SIGKILL);
        fail_msg("parked worker exit code %d after SIGTERM", code);
    }
    assert_false(heartbeat_exists("park", "w-park"));
}

/* --start-parked: loads, heartbeats PARKED, takes nothing until SIGUSR2. */
static void test_start_parked(void **state)
{
    (void)state;
    pid_t pid = start_worker_with("prepark", "w-prepark", "--start-parked");
    wait_ready(pid, "prepark", "w-prepark");
    assert_true(
        wait_state("prepark", "w-prepark", PARKWAY__WORKER_STATE__WORKER_STATE_PARKED, 1000));
    struct rq q = {.id = "prepark-1", .fn = "prepark", .user = "Hi", .max_tokens = 3};
    struct result res;
    result_init(&res, q.id);
    res.watch = pid;
    res.watch_id = "w-prepark";
    push(&q);
    pw_test_sleep_ms(700);
    assert_int_equal(stream_lag("prepark"), 1);
    assert_int_equal(kill(pid, SIGUSR2), 0);
    collect(&res, false, 60000);
    assert_int_equal(res.completion_tokens, 3);
    wait_no_pending("prepark");
    assert_int_equal(kill(pid, SIGTERM), 0);
    int code = watched_exit(&res, 30000);
    if (code != 0) {
        dump_log("w-prepark");
        if (code < 0)
            kill(pid, SIGKILL);
        fail_msg("worker exit code %d after SIGTERM", code);
    }
}

static void test_claims_a_dead_workers_entry(void **state)
{
    (void)state;
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, "stale");
    redisReply *r = redisCommand(rc, "XGROUP CREATE %s %s 0 MKSTREAM", key, PW_GROUP_ENGINES);
    assert_non_null(r);
    freeReplyObject(r);
    struct rq q = {.id = "stale-1", .fn = "stale", .user = "Anyone?", .max_tokens = 5};
    push(&q);
    /* a consumer that takes it and dies without acknowledging */
    r = redisCommand(rc, "XREADGROUP GROUP %s dead COUNT 1 STREAMS %s >", PW_GROUP_ENGINES, key);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    assert_int_equal(pending_count("stale"), 1);

    pid_t pid = start_worker("stale", "w-stale");
    struct result res;
    result_init(&res, q.id);
    res.watch = pid;
    res.watch_id = "w-stale";
    collect(&res, false, 60000);
    assert_true(res.attempt >= 1);
    assert_string_equal(res.worker, "w-stale");
    assert_int_equal(res.finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
    assert_int_equal(res.completion_tokens, 5);
    wait_no_pending("stale");
    kill(pid, SIGTERM);
    int code = watched_exit(&res, 30000);
    if (code != 0) {
        dump_log("w-stale");
        if (code < 0)
            kill(pid, SIGKILL);
        fail_msg("worker exit code %d after SIGTERM", code);
    }
}

/* Several requests at once, more than the slots: every one completes. */
static void test_more_requests_than_slots(void **state)
{
    (void)state;
    enum { N = SLOTS * 2 + 1 };
    static struct result res[N];
    char ids[N][16];
    for (int i = 0; i < N; i++) {
        snprintf(ids[i], sizeof ids[i], "many-%d", i);
        struct rq q = {.id = ids[i],
                       .user = "One of many",
                       .max_tokens = 6 + (uint32_t)i,
                       .has_temp = true,
                       .temperature = 0.5f,
                       .seed = (uint64_t)i};
        result_init(&res[i], ids[i]);
        push(&q);
    }
    for (int i = 0; i < N; i++) {
        collect(&res[i], false, 60000);
        assert_int_equal(res[i].finish[0], PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH);
        assert_int_equal(res[i].completion_tokens, 6 + (uint32_t)i);
    }
    wait_no_pending("tiny");
}

int main(void)
{
    pw_test_redis_require();
    if (access(ENGINE, X_OK) != 0) {
        printf("skipped: %s is not built\n", ENGINE);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_heartbeat),
        cmocka_unit_test(test_chat_streams_chunks_and_usage),
        cmocka_unit_test(test_completion_with_token_ids),
        cmocka_unit_test(test_n_choices_each_finish),
        cmocka_unit_test(test_stop_string),
        cmocka_unit_test(test_cancel_mid_generation),
        cmocka_unit_test(test_deadline_already_past),
        cmocka_unit_test(test_deadline_passes_mid_generation),
        cmocka_unit_test(test_prompt_longer_than_context),
        cmocka_unit_test(test_garbage_entries_are_acked),
        cmocka_unit_test(test_wrong_function_gets_error),
        cmocka_unit_test(test_same_seed_same_text),
        cmocka_unit_test(test_more_requests_than_slots),
        cmocka_unit_test(test_sigterm_drains_then_exits_0),
        cmocka_unit_test(test_park_finishes_work_then_waits_for_unpark),
        cmocka_unit_test(test_start_parked),
        cmocka_unit_test(test_claims_a_dead_workers_entry),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/*
 * pw_test_stack: requests, replies and events as the router and the scaler write them, for
 * the process-level tests. See pw_test_stack.h. Single-threaded.
 */
#include "pw_test_stack.h"

#include <setjmp.h>
#include <stdarg.h>

#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "parkway.pb-c.h"
#include "pw_clock.h"
#include "pw_err.h"
#include "pw_keyspace.h"
#include "pw_proto.h"
#include "pw_redis.h"
#include "pw_test_proc.h"

void pw_test_enqueue(struct redisContext *rc, const struct pw_test_request *q)
{
    Parkway__InferenceRequest req = PARKWAY__INFERENCE_REQUEST__INIT;
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    uint32_t toks[] = {1, 2, 3, 4};
    req.id = (char *)q->id;
    req.function = (char *)q->fn;
    req.tenant = "t";
    req.key_id = "key_test";
    req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    req.prompt_token_ids = toks;
    req.n_prompt_token_ids = 4;
    sp.max_tokens = q->max_tokens;
    sp.temperature = 0;
    sp.ignore_eos = q->ignore_eos;
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS);
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE);
    req.sampling = &sp;
    req.reply_to = (char *)q->reply_to;
    req.enqueued_unix_ms = pw_clock_wall_ms();
    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    assert_int_equal(pw_proto_pack_request_alloc(&req, &buf, &len, &why), PW_OK);
    char key[PW_KEY_MAX];
    pw_key_queue(key, sizeof key, q->fn);
    const char *argv[] = {"XADD", key, "*", PW_STREAM_FIELD, (const char *)buf};
    size_t lens[] = {4, strlen(key), 1, 1, len};
    redisReply *r = redisCommandArgv(rc, 5, argv, lens);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    freeReplyObject(r);
    free(buf);
    freeReplyObject(redisCommand(rc, "PUBLISH %s %s", PW_KEY_WAKE, q->fn));
}

int64_t pw_test_wait_done(struct redisContext *rc, const char *stream, struct pw_test_cursor *cur,
                          const char *id, int timeout_ms)
{
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        redisReply *r = redisCommand(rc, "XREAD COUNT 100 BLOCK 500 STREAMS %s %s", stream,
                                     cur->id[0] ? cur->id : "0-0");
        struct pw_stream_entries *es = NULL;
        if (r && pw_stream_parse_read(r, &es) == PW_OK) {
            for (size_t i = 0; i < es->n; i++) {
                snprintf(cur->id, sizeof cur->id, "%s", es->v[i].id);
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
                    return (int64_t)(pw_clock_mono_ms() - t0);
                }
            }
        }
        pw_stream_entries_free(es);
        freeReplyObject(r);
    }
    return -1;
}

size_t pw_test_count_events(struct redisContext *rc, const char *action, const char *sub)
{
    redisReply *r = redisCommand(rc, "XRANGE %s - +", PW_KEY_EVENTS);
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

bool pw_test_wait_event(struct redisContext *rc, const char *action, const char *sub,
                        size_t at_least, int timeout_ms)
{
    uint64_t t0 = pw_clock_mono_ms();
    while (pw_clock_mono_ms() - t0 < (uint64_t)timeout_ms) {
        if (pw_test_count_events(rc, action, sub) >= at_least)
            return true;
        pw_test_sleep_ms(50);
    }
    return false;
}

long long pw_test_hlen(struct redisContext *rc, const char *key)
{
    redisReply *r = redisCommand(rc, "HLEN %s", key);
    long long n = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    return n;
}

pid_t pw_test_scaler_start(const char *exe, const char *redis_url, const char *dir,
                           const char *const extra[])
{
    char fdir[256], log[256];
    snprintf(fdir, sizeof fdir, "%s/functions", dir);
    snprintf(log, sizeof log, "%s/scaler.log", dir);
    const char *argv[32] = {exe, "--redis", redis_url, "--functions", fdir, "--tick-ms", "100"};
    size_t n = 7;
    for (size_t i = 0; extra && extra[i]; i++) {
        PW_ASSERT(n < 7 + 16);
        argv[n++] = extra[i];
    }
    argv[n] = NULL;
    return pw_test_spawn((char *const *)argv, log, SIGTERM);
}

void pw_test_tiny_function(const char *gen, const char *dir, const char *max_price)
{
    char path[512];
    snprintf(path, sizeof path, "%s/functions", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/tiny.gguf", dir);
    pw_test_gguf_gen_at(gen, path, "--shape tiny --type q8_0");
    char spec[1024];
    int n = snprintf(spec, sizeof spec,
                     "name: tiny\n"
                     "model:\n  path: %s/tiny.gguf\n  format: gguf\n"
                     "resources:\n  gpu: none\n  cpu: 1\n  memory: 256MiB\n"
                     "scaling:\n  min_replicas: 0\n  max_replicas: 1\n  target_concurrency: 4\n"
                     "  idle_seconds: 1\n  idle_action: park\n  startup_timeout_seconds: 60\n"
                     "engine:\n  max_batch: 4\n  context_length: 128\n"
                     "pricing:\n  max_price_per_hour: %s\n  spot: on-demand\n"
                     "max_queue_wait: 60s\n",
                     dir, max_price);
    assert_true(n > 0 && (size_t)n < sizeof spec);
    snprintf(path, sizeof path, "%s/functions/tiny.yaml", dir);
    pw_test_write_file(path, spec);
}

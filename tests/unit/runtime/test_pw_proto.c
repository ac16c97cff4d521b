/*
 * Unit tests for pw_proto: round trips of every message, presence semantics, the caps on
 * encode and decode, and hostile buffers (truncated, mutated, random, amplifying), which
 * must be refused without crashing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "pw_proto.h"

/* ---- fixtures ----------------------------------------------------------------------- */

struct req_fixture {
    Parkway__InferenceRequest req;
    Parkway__SamplingParams sp;
    Parkway__ChatMessage m0, m1;
    Parkway__ChatMessage *msgs[2];
    char *stops[2];
};

static void req_fixture_init(struct req_fixture *f)
{
    parkway__inference_request__init(&f->req);
    parkway__sampling_params__init(&f->sp);
    parkway__chat_message__init(&f->m0);
    parkway__chat_message__init(&f->m1);
    f->m0.role = "system";
    f->m0.content = "You are terse.";
    f->m1.role = "user";
    f->m1.content = "Say hi.";
    f->m1.name = "alice";
    f->msgs[0] = &f->m0;
    f->msgs[1] = &f->m1;
    f->stops[0] = "\n\n";
    f->stops[1] = "END";

    f->req.id = "chatcmpl-123";
    f->req.function = "smollm2";
    f->req.tenant = "acme";
    f->req.key_id = "key_1a2b3c4d";
    f->req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT;
    f->req.n_messages = 2;
    f->req.messages = f->msgs;
    f->req.stream = 1;
    f->req.include_usage = 1;
    f->req.reply_to = "pw:reply:r1";
    f->req.deadline_unix_ms = 1800000000000;
    f->req.enqueued_unix_ms = 1799999999000;
    f->req.attempt = 2;

    f->sp.temperature = 0.0f; /* greedy: zero is meaningful, so it needs its bit */
    pw_proto_sampling_mark(&f->sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE);
    f->sp.max_tokens = 64;
    pw_proto_sampling_mark(&f->sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS);
    f->sp.seed = 0xfeedfacecafebeefull;
    f->sp.n_stop = 2;
    f->sp.stop = f->stops;
    f->sp.logprobs = 1;
    f->sp.top_logprobs = 3;
    pw_proto_sampling_mark(&f->sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_LOGPROBS);
    f->req.sampling = &f->sp;
}

/* Encodes without pw_proto's checks, to build buffers the checks must refuse on decode. */
static uint8_t *raw_pack(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(*len + 1);
    assert_non_null(buf);
    protobuf_c_message_pack(m, buf);
    return buf;
}

/* ---- round trips -------------------------------------------------------------------- */

static void test_request_round_trip(void **state)
{
    (void)state;
    struct req_fixture f;
    req_fixture_init(&f);

    uint8_t *buf = NULL;
    size_t len = 0;
    const char *why = NULL;
    assert_int_equal(pw_proto_pack_request_alloc(&f.req, &buf, &len, &why), PW_OK);
    assert_null(why);
    assert_true(len > 0);

    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(buf, len, 0, &got), PW_OK);
    assert_non_null(got);
    assert_string_equal(got->id, "chatcmpl-123");
    assert_string_equal(got->function, "smollm2");
    assert_string_equal(got->tenant, "acme");
    assert_string_equal(got->key_id, "key_1a2b3c4d");
    assert_int_equal(got->kind, PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT);
    assert_int_equal(got->n_messages, 2);
    assert_string_equal(got->messages[0]->role, "system");
    assert_string_equal(got->messages[1]->content, "Say hi.");
    assert_string_equal(got->messages[1]->name, "alice");
    assert_string_equal(got->messages[0]->name, "");
    assert_true(got->stream);
    assert_true(got->include_usage);
    assert_false(got->echo);
    assert_string_equal(got->reply_to, "pw:reply:r1");
    assert_true(got->deadline_unix_ms == 1800000000000);
    assert_true(got->enqueued_unix_ms == 1799999999000);
    assert_int_equal(got->attempt, 2);
    assert_non_null(got->sampling);
    assert_int_equal(got->sampling->n_stop, 2);
    assert_string_equal(got->sampling->stop[0], "\n\n");
    assert_string_equal(got->sampling->stop[1], "END");
    assert_true(got->sampling->seed == 0xfeedfacecafebeefull);

    struct pw_sampling s;
    pw_proto_sampling_resolve(got->sampling, &s);
    assert_true(s.temperature == 0.0f);
    assert_int_equal(s.max_tokens, 64);
    assert_true(s.top_p == 1.0f);
    assert_true(s.repetition_penalty == 1.0f);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.top_logprobs, 3);
    assert_true(s.logprobs);
    assert_false(s.seed_from_client);
    assert_true(s.seed == 0xfeedfacecafebeefull);

    /* Into a caller buffer: exact size works, one byte less does not. */
    uint8_t *buf2 = malloc(len);
    size_t len2 = 0;
    assert_int_equal(pw_proto_pack_request(&f.req, buf2, len, &len2, NULL), PW_OK);
    assert_int_equal(len2, len);
    assert_memory_equal(buf, buf2, len);
    assert_int_equal(pw_proto_pack_request(&f.req, buf2, len - 1, &len2, &why), PW_ERR_TOOBIG);
    assert_non_null(why);

    free(buf2);
    pw_proto_free_request(got);
    free(buf);
}

static void test_completion_round_trip(void **state)
{
    (void)state;
    struct req_fixture f;
    req_fixture_init(&f);
    uint32_t toks[] = {1, 300, 70000, 4000000000u};
    f.req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    f.req.n_messages = 0;
    f.req.messages = NULL;
    f.req.n_prompt_token_ids = 4;
    f.req.prompt_token_ids = toks;
    f.req.echo = 1;
    f.req.batch_id = "batch_9";
    f.req.custom_id = "line-17";
    f.sp.seed = 42;
    pw_proto_sampling_mark(&f.sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_SEED);

    uint8_t buf[1024];
    size_t len;
    assert_int_equal(pw_proto_pack_request(&f.req, buf, sizeof(buf), &len, NULL), PW_OK);
    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(buf, len, 0, &got), PW_OK);
    assert_int_equal(got->n_prompt_token_ids, 4);
    assert_memory_equal(got->prompt_token_ids, toks, sizeof(toks));
    assert_true(got->echo);
    assert_string_equal(got->batch_id, "batch_9");
    assert_string_equal(got->custom_id, "line-17");
    struct pw_sampling s;
    pw_proto_sampling_resolve(got->sampling, &s);
    assert_true(s.seed_from_client);
    assert_true(s.seed == 42);
    pw_proto_free_request(got);

    /* Text and token ids together are refused. */
    f.req.prompt = "hello";
    const char *why = NULL;
    assert_int_equal(pw_proto_pack_request(&f.req, buf, sizeof(buf), &len, &why), PW_ERR_PARSE);
    assert_non_null(strstr(why, "prompt"));
}

static void test_sampling_defaults_when_absent(void **state)
{
    (void)state;
    struct pw_sampling s;
    pw_proto_sampling_resolve(NULL, &s);
    assert_true(s.temperature == 1.0f);
    assert_true(s.top_p == 1.0f);
    assert_int_equal(s.top_k, 0);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.max_tokens, 0);
    assert_true(s.repetition_penalty == 1.0f);

    /* A field set on the wire but without its bit is ignored. */
    Parkway__SamplingParams sp = PARKWAY__SAMPLING_PARAMS__INIT;
    sp.temperature = 0.3f;
    sp.n = 5;
    pw_proto_sampling_resolve(&sp, &s);
    assert_true(s.temperature == 1.0f);
    assert_int_equal(s.n, 1);
    pw_proto_sampling_mark(&sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N);
    pw_proto_sampling_resolve(&sp, &s);
    assert_int_equal(s.n, 5);
}

static void test_reply_round_trip(void **state)
{
    (void)state;
    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    Parkway__TokenLogprob t = PARKWAY__TOKEN_LOGPROB__INIT;
    Parkway__TopLogprob alt[2] = {PARKWAY__TOP_LOGPROB__INIT, PARKWAY__TOP_LOGPROB__INIT};
    Parkway__TopLogprob *alts[2] = {&alt[0], &alt[1]};
    Parkway__TokenLogprob *ts[1] = {&t};
    Parkway__Usage u = PARKWAY__USAGE__INIT;
    Parkway__Error e = PARKWAY__ERROR__INIT;
    uint8_t raw[] = {0xe2, 0x82};

    t.token = "Hi";
    t.logprob = -0.25f;
    t.bytes.data = (uint8_t *)"Hi";
    t.bytes.len = 2;
    alt[0].token = "Hi";
    alt[0].logprob = -0.25f;
    alt[1].token = "\xe2\x82";
    alt[1].logprob = -INFINITY;
    alt[1].bytes.data = raw;
    alt[1].bytes.len = 2;
    t.n_top_logprobs = 2;
    t.top_logprobs = alts;
    u.prompt_tokens = 12;
    u.completion_tokens = 1;
    u.cached_tokens = 8;
    e.code = "context_length_exceeded";
    e.message = "too long";
    e.http_status = 400;

    c.request_id = "chatcmpl-123";
    c.attempt = 1;
    c.seq = 7;
    c.index = 1;
    c.text = "Hi";
    c.n_logprobs = 1;
    c.logprobs = ts;
    c.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_ERROR;
    c.done = 1;
    c.usage = &u;
    c.error = &e;
    c.worker_id = "w-1";
    c.queue_ms = 5;
    c.first_token_ms = 90;
    c.n_tokens = 1;

    uint8_t *buf;
    size_t len;
    assert_int_equal(pw_proto_pack_reply_alloc(&c, &buf, &len, NULL), PW_OK);
    Parkway__ReplyChunk *got = NULL;
    assert_int_equal(pw_proto_unpack_reply(buf, len, 0, &got), PW_OK);
    assert_string_equal(got->request_id, "chatcmpl-123");
    assert_int_equal(got->attempt, 1);
    assert_int_equal(got->seq, 7);
    assert_int_equal(got->index, 1);
    assert_string_equal(got->text, "Hi");
    assert_int_equal(got->n_logprobs, 1);
    assert_int_equal(got->logprobs[0]->n_top_logprobs, 2);
    assert_true(isinf(got->logprobs[0]->top_logprobs[1]->logprob));
    assert_int_equal(got->logprobs[0]->top_logprobs[1]->bytes.len, 2);
    assert_memory_equal(got->logprobs[0]->top_logprobs[1]->bytes.data, raw, 2);
    assert_int_equal(got->finish_reason, PARKWAY__FINISH_REASON__FINISH_REASON_ERROR);
    assert_true(got->done);
    assert_int_equal(got->usage->cached_tokens, 8);
    assert_string_equal(got->error->code, "context_length_exceeded");
    assert_int_equal(got->error->http_status, 400);
    assert_int_equal(got->first_token_ms, 90);
    pw_proto_free_reply(got);
    free(buf);

    /* A NaN logprob and an unknown finish reason are refused. */
    t.logprob = NAN;
    assert_int_equal(pw_proto_pack_reply_alloc(&c, &buf, &len, NULL), PW_ERR_RANGE);
    t.logprob = -1.0f;
    c.finish_reason = (Parkway__FinishReason)9;
    assert_int_equal(pw_proto_pack_reply_alloc(&c, &buf, &len, NULL), PW_ERR_PARSE);
}

static void test_worker_and_key_round_trip(void **state)
{
    (void)state;
    Parkway__WorkerStatus w = PARKWAY__WORKER_STATUS__INIT;
    w.worker_id = "w-1";
    w.function = "smollm2";
    w.state = PARKWAY__WORKER_STATE__WORKER_STATE_READY;
    w.slots_total = 8;
    w.slots_busy = 3;
    w.tokens_per_s = 123.5f;
    w.kv_blocks_total = 1024;
    w.kv_blocks_free = 900;
    w.last_heartbeat_unix_ms = 1800000000123;
    w.pid = 4242;
    w.backend = "cpu";
    w.requests_done = 1ull << 40;
    uint8_t buf[512];
    size_t len;
    assert_int_equal(pw_proto_pack_worker(&w, buf, sizeof(buf), &len, NULL), PW_OK);
    Parkway__WorkerStatus *gw = NULL;
    assert_int_equal(pw_proto_unpack_worker(buf, len, 0, &gw), PW_OK);
    assert_int_equal(gw->state, PARKWAY__WORKER_STATE__WORKER_STATE_READY);
    assert_true(gw->tokens_per_s == 123.5f);
    assert_int_equal(gw->slots_busy, 3);
    assert_true(gw->requests_done == 1ull << 40);
    assert_string_equal(gw->backend, "cpu");
    pw_proto_free_worker(gw);
    w.state = PARKWAY__WORKER_STATE__WORKER_STATE_UNSPECIFIED;
    assert_int_equal(pw_proto_pack_worker(&w, buf, sizeof(buf), &len, NULL), PW_ERR_PARSE);

    Parkway__KeyRecord k = PARKWAY__KEY_RECORD__INIT;
    char *fns[] = {"smollm2", "llama"};
    k.key_id = "key_00ff00ff";
    k.tenant = "acme";
    k.name = "ci";
    k.n_allowed_functions = 2;
    k.allowed_functions = fns;
    k.rpm_limit = 60;
    k.disabled = 1;
    k.created_unix_ms = 1;
    assert_int_equal(pw_proto_pack_key(&k, buf, sizeof(buf), &len, NULL), PW_OK);
    Parkway__KeyRecord *gk = NULL;
    assert_int_equal(pw_proto_unpack_key(buf, len, 0, &gk), PW_OK);
    assert_int_equal(gk->n_allowed_functions, 2);
    assert_string_equal(gk->allowed_functions[1], "llama");
    assert_int_equal(gk->rpm_limit, 60);
    assert_true(gk->disabled);
    pw_proto_free_key(gk);
    k.tenant = "";
    assert_int_equal(pw_proto_pack_key(&k, buf, sizeof(buf), &len, NULL), PW_ERR_PARSE);
}

/* ---- caps --------------------------------------------------------------------------- */

/* Packs f raw (no checks) and expects decode to fail with want. */
static void expect_decode_err(struct req_fixture *f, enum pw_err want)
{
    size_t len;
    uint8_t *buf = raw_pack(&f->req.base, &len);
    Parkway__InferenceRequest *got = (Parkway__InferenceRequest *)1;
    assert_int_equal(pw_proto_unpack_request(buf, len, 0, &got), want);
    assert_null(got);
    free(buf);
    /* The encoder refuses the same message. */
    uint8_t *out = NULL;
    size_t olen;
    assert_int_equal(pw_proto_pack_request_alloc(&f->req, &out, &olen, NULL), want);
    assert_null(out);
}

static void test_request_caps(void **state)
{
    (void)state;
    struct req_fixture f;
    char *five[5] = {"a", "b", "c", "d", "e"};
    char longstop[PW_PROTO_STOP_LEN_MAX + 2];
    memset(longstop, 'x', sizeof(longstop) - 1);
    longstop[sizeof(longstop) - 1] = '\0';

    req_fixture_init(&f);
    f.sp.n_stop = 5;
    f.sp.stop = five;
    expect_decode_err(&f, PW_ERR_TOOBIG);

    req_fixture_init(&f);
    f.stops[1] = longstop;
    expect_decode_err(&f, PW_ERR_TOOBIG);
    longstop[PW_PROTO_STOP_LEN_MAX] = '\0'; /* exactly 256 is fine */
    uint8_t *buf;
    size_t len;
    assert_int_equal(pw_proto_pack_request_alloc(&f.req, &buf, &len, NULL), PW_OK);
    free(buf);

    req_fixture_init(&f);
    f.stops[0] = "";
    expect_decode_err(&f, PW_ERR_RANGE);

    req_fixture_init(&f);
    f.sp.n = PW_PROTO_N_MAX + 1;
    pw_proto_sampling_mark(&f.sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N);
    expect_decode_err(&f, PW_ERR_RANGE);
    f.sp.n = 0;
    expect_decode_err(&f, PW_ERR_RANGE);

    req_fixture_init(&f);
    f.sp.top_logprobs = PW_PROTO_TOP_LOGPROBS_MAX + 1;
    expect_decode_err(&f, PW_ERR_RANGE);
    f.sp.top_logprobs = 2;
    f.sp.logprobs = 0;
    expect_decode_err(&f, PW_ERR_RANGE);

    req_fixture_init(&f);
    f.sp.temperature = NAN;
    expect_decode_err(&f, PW_ERR_RANGE);
    f.sp.temperature = 2.5f;
    expect_decode_err(&f, PW_ERR_RANGE);

    req_fixture_init(&f);
    f.sp.top_p = 0.0f;
    pw_proto_sampling_mark(&f.sp, PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_P);
    expect_decode_err(&f, PW_ERR_RANGE);

    req_fixture_init(&f);
    f.req.id = "";
    expect_decode_err(&f, PW_ERR_PARSE);

    req_fixture_init(&f);
    f.req.reply_to = "";
    expect_decode_err(&f, PW_ERR_PARSE);

    req_fixture_init(&f);
    f.req.kind = (Parkway__RequestKind)7;
    expect_decode_err(&f, PW_ERR_PARSE);

    req_fixture_init(&f);
    f.req.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_UNSPECIFIED;
    expect_decode_err(&f, PW_ERR_PARSE);

    req_fixture_init(&f);
    f.req.n_messages = 0;
    expect_decode_err(&f, PW_ERR_PARSE);

    req_fixture_init(&f);
    f.m1.role = "";
    expect_decode_err(&f, PW_ERR_PARSE);

    char longid[PW_PROTO_ID_MAX + 2];
    memset(longid, 'i', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    req_fixture_init(&f);
    f.req.function = longid;
    expect_decode_err(&f, PW_ERR_TOOBIG);

    /* Too many messages. */
    req_fixture_init(&f);
    size_t n = PW_PROTO_MESSAGES_MAX + 1;
    Parkway__ChatMessage **many = calloc(n, sizeof(*many));
    for (size_t i = 0; i < n; i++)
        many[i] = &f.m1;
    f.req.n_messages = n;
    f.req.messages = many;
    expect_decode_err(&f, PW_ERR_TOOBIG);
    /* The most messages, each as small as possible, pass the allocation budget. */
    f.m1.content = "";
    f.m1.name = "";
    f.req.n_messages = PW_PROTO_MESSAGES_MAX;
    assert_int_equal(pw_proto_pack_request_alloc(&f.req, &buf, &len, NULL), PW_OK);
    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(buf, len, 0, &got), PW_OK);
    assert_int_equal(got->n_messages, PW_PROTO_MESSAGES_MAX);
    pw_proto_free_request(got);
    free(buf);
    free(many);
}

static void test_buffer_cap(void **state)
{
    (void)state;
    struct req_fixture f;
    req_fixture_init(&f);
    uint8_t *buf;
    size_t len;
    assert_int_equal(pw_proto_pack_request_alloc(&f.req, &buf, &len, NULL), PW_OK);
    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(buf, len, len - 1, &got), PW_ERR_TOOBIG);
    assert_null(got);
    assert_int_equal(pw_proto_unpack_request(buf, len, len, &got), PW_OK);
    pw_proto_free_request(got);
    /* The default cap applies when max_len is 0 (never read past len: buf is small). */
    assert_int_equal(pw_proto_unpack_request(buf, (size_t)PW_PROTO_REQUEST_MAX_BYTES + 1, 0, &got),
                     PW_ERR_TOOBIG);
    assert_int_equal(pw_proto_unpack_worker(buf, (size_t)PW_PROTO_WORKER_MAX_BYTES + 1, 0,
                                            (Parkway__WorkerStatus **)&got),
                     PW_ERR_TOOBIG);
    free(buf);

    assert_int_equal(pw_proto_unpack_request(NULL, 5, 0, &got), PW_ERR_INVAL);
    assert_int_equal(pw_proto_unpack_request(NULL, 0, 0, NULL), PW_ERR_INVAL);
    /* Empty buffer: an all-default request, which lacks its required fields. */
    assert_int_equal(pw_proto_unpack_request(NULL, 0, 0, &got), PW_ERR_PARSE);
    assert_null(got);
}

/* Many empty sub-messages: 2 bytes on the wire, ~56 bytes each in memory. */
static void test_amplification_refused(void **state)
{
    (void)state;
    size_t n = 200000;
    uint8_t *buf = malloc(2 * n);
    for (size_t i = 0; i < n; i++) {
        buf[2 * i] = (6 << 3) | 2; /* field 6 (messages), length-delimited */
        buf[2 * i + 1] = 0;
    }
    size_t est = 0;
    assert_int_equal(pw_proto_prescan(&parkway__inference_request__descriptor, buf, 2 * n, &est),
                     PW_OK);
    assert_true(est > 2 * n * 8);
    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(buf, 2 * n, 0, &got), PW_ERR_TOOBIG);
    assert_null(got);

    /* A repeated singular scalar: 3 bytes per occurrence of field 16 (attempt). */
    n = 300000;
    uint8_t *b2 = malloc(3 * n);
    for (size_t i = 0; i < n; i++) {
        b2[3 * i] = (16 << 3 | 0) | 0x80;
        b2[3 * i + 1] = 1;
        b2[3 * i + 2] = 1;
    }
    assert_int_equal(pw_proto_unpack_request(b2, 3 * n, 0, &got), PW_ERR_TOOBIG);
    free(b2);
    free(buf);
}

static void test_prescan_malformed(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *d = &parkway__inference_request__descriptor;
    size_t est;
    static const uint8_t bad_varint[] = {0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
                                         0x80, 0x80, 0x80, 0x80, 0x80, 0x01};
    static const uint8_t group[] = {(1 << 3) | 3};
    static const uint8_t field0[] = {0x00, 0x01};
    static const uint8_t len_past_end[] = {(1 << 3) | 2, 10, 'a'};
    static const uint8_t short_fixed[] = {(99 << 3 & 0x7f) | 0x80 | 1, 0, 1, 2};
    assert_int_equal(pw_proto_prescan(d, bad_varint, sizeof(bad_varint), &est), PW_ERR_PARSE);
    assert_int_equal(pw_proto_prescan(d, group, sizeof(group), &est), PW_ERR_PARSE);
    assert_int_equal(pw_proto_prescan(d, field0, sizeof(field0), &est), PW_ERR_PARSE);
    assert_int_equal(pw_proto_prescan(d, len_past_end, sizeof(len_past_end), &est), PW_ERR_PARSE);
    assert_int_equal(pw_proto_prescan(d, short_fixed, sizeof(short_fixed), &est), PW_ERR_PARSE);

    Parkway__InferenceRequest *got = NULL;
    assert_int_equal(pw_proto_unpack_request(group, sizeof(group), 0, &got), PW_ERR_PARSE);
    /* Wire type 0 on a string field: well formed, but protobuf-c refuses it. */
    static const uint8_t wrong_type[] = {(1 << 3) | 0, 5};
    assert_int_equal(pw_proto_unpack_request(wrong_type, sizeof(wrong_type), 0, &got),
                     PW_ERR_PARSE);
    assert_null(got);
}

/* ---- hostile input loops ------------------------------------------------------------ */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* Decodes buf with every decoder; anything may fail, nothing may crash or leak. */
static void decode_all(const uint8_t *buf, size_t len)
{
    Parkway__InferenceRequest *r = NULL;
    Parkway__ReplyChunk *c = NULL;
    Parkway__WorkerStatus *w = NULL;
    Parkway__KeyRecord *k = NULL;
    if (pw_proto_unpack_request(buf, len, 0, &r) == PW_OK)
        assert_int_equal(pw_proto_check_request(r, NULL), PW_OK);
    if (pw_proto_unpack_reply(buf, len, 0, &c) == PW_OK)
        assert_int_equal(pw_proto_check_reply(c, NULL), PW_OK);
    if (pw_proto_unpack_worker(buf, len, 0, &w) == PW_OK)
        assert_int_equal(pw_proto_check_worker(w, NULL), PW_OK);
    if (pw_proto_unpack_key(buf, len, 0, &k) == PW_OK)
        assert_int_equal(pw_proto_check_key(k, NULL), PW_OK);
    pw_proto_free_request(r);
    pw_proto_free_reply(c);
    pw_proto_free_worker(w);
    pw_proto_free_key(k);
}

static void test_truncated_and_mutated(void **state)
{
    (void)state;
    struct req_fixture f;
    req_fixture_init(&f);
    uint8_t *buf;
    size_t len;
    assert_int_equal(pw_proto_pack_request_alloc(&f.req, &buf, &len, NULL), PW_OK);

    /* Every prefix: exact-size copies so ASan sees any read past the end. */
    for (size_t cut = 0; cut < len; cut++) {
        uint8_t *p = malloc(cut ? cut : 1);
        memcpy(p, buf, cut);
        decode_all(p, cut);
        free(p);
    }
    /* Random byte flips and splices of the valid encoding. */
    for (int iter = 0; iter < 20000; iter++) {
        uint8_t *p = malloc(len);
        memcpy(p, buf, len);
        int flips = 1 + (int)(rng() % 4);
        for (int i = 0; i < flips; i++)
            p[rng() % len] = (uint8_t)rng();
        size_t l = (rng() % 4 == 0) ? rng() % (len + 1) : len;
        decode_all(p, l);
        free(p);
    }
    free(buf);
}

static void test_random_buffers(void **state)
{
    (void)state;
    for (int iter = 0; iter < 20000; iter++) {
        size_t len = rng() % 300;
        uint8_t *p = malloc(len ? len : 1);
        for (size_t i = 0; i < len; i++)
            p[i] = (uint8_t)rng();
        /* Bias toward plausible tags so decoding gets past the first byte sometimes. */
        if (len > 0 && rng() % 2)
            p[0] = (uint8_t)(((1 + rng() % 18) << 3) | (rng() % 3));
        decode_all(p, len);
        free(p);
    }
}

static void test_check_null_and_why(void **state)
{
    (void)state;
    const char *why = NULL;
    assert_int_equal(pw_proto_check_request(NULL, &why), PW_ERR_INVAL);
    assert_non_null(why);
    assert_int_equal(pw_proto_check_reply(NULL, NULL), PW_ERR_INVAL);

    /* Hand-built messages may hold NULL strings; they count as "". */
    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    c.request_id = NULL;
    assert_int_equal(pw_proto_check_reply(&c, &why), PW_ERR_PARSE);
    assert_string_equal(why, "request_id: missing");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_round_trip),
        cmocka_unit_test(test_completion_round_trip),
        cmocka_unit_test(test_sampling_defaults_when_absent),
        cmocka_unit_test(test_reply_round_trip),
        cmocka_unit_test(test_worker_and_key_round_trip),
        cmocka_unit_test(test_request_caps),
        cmocka_unit_test(test_buffer_cap),
        cmocka_unit_test(test_amplification_refused),
        cmocka_unit_test(test_prescan_malformed),
        cmocka_unit_test(test_truncated_and_mutated),
        cmocka_unit_test(test_random_buffers),
        cmocka_unit_test(test_check_null_and_why),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

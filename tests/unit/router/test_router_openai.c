/*
 * Unit tests for router_openai and router_sse: OpenAI request bodies to InferenceRequest
 * (fields and presence bits), every refusal with its exact status/param/code, hostile
 * bodies (invalid UTF-8, duplicate keys, deep nesting, huge numbers), error objects, and
 * the rendering of ReplyChunks as chat.completion / text_completion objects and SSE
 * streams, including deduplication across a retried attempt. JSON output is compared
 * structurally (json_equal); only the SSE framing is compared byte for byte.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "router_openai.h"
#include "router_sse.h"

/* ---- fixtures ----------------------------------------------------------------------- */

#define NOW_MS 1700000000000LL
#define SEED 0x1234abcdULL

static enum router_openai_access check_model(void *arg, const char *model)
{
    (void)arg;
    if (strcmp(model, "secret") == 0)
        return ROUTER_OPENAI_MODEL_DENIED;
    if (strcmp(model, "nope") == 0)
        return ROUTER_OPENAI_MODEL_NOT_FOUND;
    return ROUTER_OPENAI_MODEL_OK;
}

static struct router_openai_ctx mkctx(void)
{
    struct router_openai_ctx c = {
        .request_id = "req1",
        .tenant = "acme",
        .key_id = "key_1a2b3c4d",
        .reply_to = "pw:reply:r1",
        .now_unix_ms = NOW_MS,
        .deadline_ms = 0,
        .default_deadline_ms = 60000,
        .max_deadline_ms = 600000,
        .seed = SEED,
        .model_check = check_model,
        .model_check_arg = NULL,
    };
    return c;
}

static Parkway__InferenceRequest *chat_ok(const char *body)
{
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *req = NULL;
    enum pw_err rc = router_openai_parse_chat(body, strlen(body), &ctx, &req, &err);
    if (rc != PW_OK)
        fail_msg("parse failed: %d %s (param %s)", err.status, err.message, err.param);
    assert_non_null(req);
    return req;
}

static uint32_t present(const Parkway__InferenceRequest *r)
{
    return r->sampling != NULL ? r->sampling->present : 0;
}

#define BIT(f) ((uint32_t)PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_##f)

/* ---- valid chat requests ------------------------------------------------------------ */

static void test_chat_minimal(void **state)
{
    (void)state;
    Parkway__InferenceRequest *r =
        chat_ok("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}");
    assert_string_equal(r->id, "req1");
    assert_string_equal(r->function, "smol");
    assert_string_equal(r->tenant, "acme");
    assert_string_equal(r->key_id, "key_1a2b3c4d");
    assert_string_equal(r->reply_to, "pw:reply:r1");
    assert_int_equal(r->kind, PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT);
    assert_int_equal(r->n_messages, 1);
    assert_string_equal(r->messages[0]->role, "user");
    assert_string_equal(r->messages[0]->content, "hi");
    assert_string_equal(r->messages[0]->name, "");
    assert_int_equal(present(r), 0); /* nothing from the client; seed is ours */
    assert_true(r->sampling->seed == SEED);
    assert_false(r->stream);
    assert_false(r->include_usage);
    assert_int_equal(r->deadline_unix_ms, NOW_MS + 60000);
    assert_int_equal(r->enqueued_unix_ms, NOW_MS);
    assert_int_equal(r->n_prompt_token_ids, 0);
    pw_proto_free_request(r);
}

static void test_chat_full(void **state)
{
    (void)state;
    const char *body =
        "{\"model\":\"smol\",\"messages\":["
        "{\"role\":\"developer\",\"content\":\"be terse\"},"
        "{\"role\":\"system\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
        "{\"type\":\"text\",\"text\":\"b\"}]},"
        "{\"role\":\"user\",\"content\":\"hi\",\"name\":\"alice\"},"
        "{\"role\":\"assistant\",\"content\":null},"
        "{\"role\":\"user\",\"content\":\"caf\\u00e9 \xe2\x9c\x93\"}],"
        "\"temperature\":0.5,\"top_p\":0.9,\"n\":3,\"stop\":[\"\\n\\n\",\"END\",\"\"],"
        "\"seed\":-1,\"presence_penalty\":-2,\"frequency_penalty\":2,"
        "\"logprobs\":true,\"top_logprobs\":5,\"max_completion_tokens\":77,"
        "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"user\":\"u1\","
        "\"top_k\":40,\"min_p\":0.05,\"repetition_penalty\":1.1,\"ignore_eos\":true,"
        "\"store\":false,\"metadata\":{\"k\":\"v\"},\"service_tier\":\"auto\","
        "\"response_format\":{\"type\":\"text\"},\"logit_bias\":{},\"modalities\":[\"text\"],"
        "\"tools\":null,\"tool_choice\":null,\"some_future_field\":{\"x\":[1,2]}}";
    Parkway__InferenceRequest *r = chat_ok(body);
    assert_int_equal(r->n_messages, 5);
    assert_string_equal(r->messages[0]->role, "system");
    assert_string_equal(r->messages[0]->content, "be terse");
    assert_string_equal(r->messages[1]->content, "a\nb");
    assert_string_equal(r->messages[2]->name, "alice");
    assert_string_equal(r->messages[3]->role, "assistant");
    assert_string_equal(r->messages[3]->content, "");
    assert_string_equal(r->messages[4]->content, "caf\xc3\xa9 \xe2\x9c\x93");
    const Parkway__SamplingParams *sp = r->sampling;
    assert_int_equal(sp->present, BIT(TEMPERATURE) | BIT(TOP_P) | BIT(N) | BIT(SEED) |
                                      BIT(PRESENCE_PENALTY) | BIT(FREQUENCY_PENALTY) |
                                      BIT(TOP_LOGPROBS) | BIT(MAX_TOKENS) | BIT(TOP_K) |
                                      BIT(MIN_P) | BIT(REPETITION_PENALTY));
    assert_float_equal(sp->temperature, 0.5f, 1e-6);
    assert_float_equal(sp->top_p, 0.9f, 1e-6);
    assert_int_equal(sp->n, 3);
    assert_int_equal(sp->n_stop, 2); /* the empty one is dropped */
    assert_string_equal(sp->stop[0], "\n\n");
    assert_string_equal(sp->stop[1], "END");
    assert_true(sp->seed == UINT64_MAX); /* -1 as two's complement */
    assert_float_equal(sp->presence_penalty, -2.0f, 1e-6);
    assert_float_equal(sp->frequency_penalty, 2.0f, 1e-6);
    assert_true(sp->logprobs);
    assert_int_equal(sp->top_logprobs, 5);
    assert_int_equal(sp->max_tokens, 77);
    assert_int_equal(sp->top_k, 40);
    assert_float_equal(sp->min_p, 0.05f, 1e-6);
    assert_float_equal(sp->repetition_penalty, 1.1f, 1e-6);
    assert_true(sp->ignore_eos);
    assert_true(r->stream);
    assert_true(r->include_usage);
    pw_proto_free_request(r);
}

static void test_chat_zero_values_are_present(void **state)
{
    (void)state;
    Parkway__InferenceRequest *r =
        chat_ok("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                "\"temperature\":0,\"top_k\":0,\"seed\":0,\"top_p\":0,\"min_p\":0,"
                "\"logprobs\":true,\"top_logprobs\":0,\"stream\":false,\"stop\":\"\"}");
    assert_int_equal(present(r), BIT(TEMPERATURE) | BIT(TOP_K) | BIT(SEED) | BIT(TOP_P) |
                                     BIT(MIN_P) | BIT(TOP_LOGPROBS));
    assert_float_equal(r->sampling->temperature, 0.0f, 0);
    assert_true(r->sampling->seed == 0);
    assert_true(r->sampling->top_p > 0.0f && r->sampling->top_p < 1e-5f);
    assert_int_equal(r->sampling->n_stop, 0);
    pw_proto_free_request(r);
}

static void test_chat_max_tokens_alias(void **state)
{
    (void)state;
    Parkway__InferenceRequest *r =
        chat_ok("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                "\"max_tokens\":9}");
    assert_int_equal(present(r), BIT(MAX_TOKENS));
    assert_int_equal(r->sampling->max_tokens, 9);
    pw_proto_free_request(r);
    r = chat_ok("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                "\"max_tokens\":9,\"max_completion_tokens\":9,\"stop\":\"###\"}");
    assert_int_equal(r->sampling->max_tokens, 9);
    assert_int_equal(r->sampling->n_stop, 1);
    assert_string_equal(r->sampling->stop[0], "###");
    pw_proto_free_request(r);
}

static void test_chat_deadlines(void **state)
{
    (void)state;
    const char *body = "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r;
    ctx.deadline_ms = 5000;
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_OK);
    assert_int_equal(r->deadline_unix_ms, NOW_MS + 5000);
    pw_proto_free_request(r);
    ctx.deadline_ms = 10000000; /* over the cap */
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_OK);
    assert_int_equal(r->deadline_unix_ms, NOW_MS + 600000);
    pw_proto_free_request(r);
    ctx.deadline_ms = 0;
    ctx.default_deadline_ms = 0;
    ctx.max_deadline_ms = 0;
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_OK);
    assert_int_equal(r->deadline_unix_ms, 0);
    pw_proto_free_request(r);
}

static void test_bad_ctx(void **state)
{
    (void)state;
    const char *body = "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r = (Parkway__InferenceRequest *)1;
    ctx.request_id = "a.b";
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_INVAL);
    assert_null(r);
    assert_int_equal(err.status, 500);
    ctx = mkctx();
    ctx.reply_to = NULL;
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_INVAL);
}

/* ---- valid completions requests ----------------------------------------------------- */

static Parkway__InferenceRequest **cmpl_ok(const char *body, size_t *n)
{
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest **reqs = NULL;
    enum pw_err rc = router_openai_parse_completion(body, strlen(body), &ctx, &reqs, n, &err);
    if (rc != PW_OK)
        fail_msg("parse failed: %d %s (param %s)", err.status, err.message, err.param);
    return reqs;
}

static void test_completion_single(void **state)
{
    (void)state;
    size_t n;
    Parkway__InferenceRequest **r = cmpl_ok("{\"model\":\"smol\",\"prompt\":\"Once\"}", &n);
    assert_int_equal(n, 1);
    assert_string_equal(r[0]->id, "req1");
    assert_int_equal(r[0]->kind, PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION);
    assert_string_equal(r[0]->prompt, "Once");
    assert_int_equal(r[0]->n_messages, 0);
    assert_int_equal(present(r[0]), BIT(MAX_TOKENS)); /* OpenAI's default of 16 */
    assert_int_equal(r[0]->sampling->max_tokens, 16);
    assert_false(r[0]->echo);
    router_openai_requests_free(r, n);

    r = cmpl_ok("{\"model\":\"smol\",\"prompt\":\"\",\"echo\":true,\"logprobs\":3,"
                "\"max_tokens\":5,\"n\":2,\"best_of\":2,\"suffix\":null,\"suffix2\":1}",
                &n);
    assert_int_equal(n, 1);
    assert_string_equal(r[0]->prompt, "");
    assert_true(r[0]->echo);
    assert_true(r[0]->sampling->logprobs);
    assert_int_equal(r[0]->sampling->top_logprobs, 3);
    assert_int_equal(present(r[0]), BIT(MAX_TOKENS) | BIT(TOP_LOGPROBS) | BIT(N));
    assert_int_equal(r[0]->sampling->max_tokens, 5);
    router_openai_requests_free(r, n);
}

static void test_completion_fanout(void **state)
{
    (void)state;
    size_t n;
    Parkway__InferenceRequest **r =
        cmpl_ok("{\"model\":\"smol\",\"prompt\":[\"a\",\"b\",\"c\"],\"stop\":\"x\"}", &n);
    assert_int_equal(n, 3);
    assert_string_equal(r[0]->id, "req1.0");
    assert_string_equal(r[2]->id, "req1.2");
    assert_string_equal(r[1]->prompt, "b");
    assert_int_equal(r[2]->sampling->n_stop, 1);
    assert_string_equal(r[2]->sampling->stop[0], "x");
    assert_true(r[2]->sampling->seed == SEED);
    router_openai_requests_free(r, n);

    r = cmpl_ok("{\"model\":\"smol\",\"prompt\":[1,2,3]}", &n);
    assert_int_equal(n, 1);
    assert_int_equal(r[0]->n_prompt_token_ids, 3);
    assert_int_equal(r[0]->prompt_token_ids[2], 3);
    assert_string_equal(r[0]->prompt, "");
    router_openai_requests_free(r, n);

    r = cmpl_ok("{\"model\":\"smol\",\"prompt\":[[5,6],[7]]}", &n);
    assert_int_equal(n, 2);
    assert_int_equal(r[0]->n_prompt_token_ids, 2);
    assert_int_equal(r[1]->prompt_token_ids[0], 7);
    assert_string_equal(r[1]->id, "req1.1");
    router_openai_requests_free(r, n);
}

/* ---- refusals ----------------------------------------------------------------------- */

struct bad_case {
    bool completion; /* else chat */
    const char *body;
    int status;
    const char *param; /* NULL = null */
    const char *code;  /* NULL = null */
};

#define MSGS "\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]"
#define CHAT(extra) "{\"model\":\"smol\"," MSGS extra "}"

static const struct bad_case bad_cases[] = {
    /* body shape */
    {false, "", 400, NULL, NULL},
    {false, "{", 400, NULL, NULL},
    {false, "[]", 400, NULL, "invalid_type"},
    {false, "null", 400, NULL, NULL},
    {false, "{\"model\":\"smol\"} x", 400, NULL, NULL},
    {false, "{\"model\":\"smol\",\"model\":\"smol\"," MSGS "}", 400, NULL, NULL},
    /* model */
    {false, "{" MSGS "}", 400, "model", "missing_required_parameter"},
    {false, "{\"model\":null," MSGS "}", 400, "model", "missing_required_parameter"},
    {false, "{\"model\":7," MSGS "}", 400, "model", "invalid_type"},
    {false, "{\"model\":\"\"," MSGS "}", 400, "model", "invalid_value"},
    {false, "{\"model\":\"nope\"," MSGS "}", 404, "model", "model_not_found"},
    {false, "{\"model\":\"secret\"," MSGS "}", 403, "model", "model_not_allowed"},
    /* messages */
    {false, "{\"model\":\"smol\"}", 400, "messages", "missing_required_parameter"},
    {false, "{\"model\":\"smol\",\"messages\":{}}", 400, "messages", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[]}", 400, "messages", "empty_array"},
    {false, "{\"model\":\"smol\",\"messages\":[\"hi\"]}", 400, "messages[0]", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"content\":\"x\"}]}", 400, "messages[0].role",
     "missing_required_parameter"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", 400,
     "messages[0].role", "invalid_value"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"tool\",\"content\":\"x\"}]}", 400,
     "messages[0].role", "unsupported_value"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":1,\"content\":\"x\"}]}", 400,
     "messages[0].role", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\"}]}", 400, "messages[0].content",
     "missing_required_parameter"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":5}]}", 400,
     "messages[0].content", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[]}]}", 400,
     "messages[0].content", "empty_array"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"},"
     "{\"role\":\"user\",\"content\":\"b\"},{\"role\":\"user\",\"content\":[{\"type\":"
     "\"image_url\",\"image_url\":{\"url\":\"http://x/y.png\"}}]}]}",
     400, "messages[2].content[0].type", "unsupported_value"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
     "\"text\":\"a\"},{\"type\":\"input_audio\"}]}]}",
     400, "messages[0].content[1].type", "unsupported_value"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}]}", 400,
     "messages[0].content[0].type", "missing_required_parameter"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
     400, "messages[0].content[0].text", "missing_required_parameter"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\","
     "\"text\":3}]}]}",
     400, "messages[0].content[0].text", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":[\"x\"]}]}", 400,
     "messages[0].content[0]", "invalid_type"},
    {false, "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"name\":1}]}",
     400, "messages[0].name", "invalid_type"},
    {false,
     "{\"model\":\"smol\",\"messages\":[{\"role\":\"assistant\",\"content\":null,"
     "\"tool_calls\":[{\"id\":\"c1\"}]}]}",
     400, "messages[0].tool_calls", "unsupported_parameter"},
    /* sampling types and ranges */
    {false, CHAT(",\"temperature\":\"hot\""), 400, "temperature", "invalid_type"},
    {false, CHAT(",\"temperature\":2.5"), 400, "temperature", "decimal_above_max_value"},
    {false, CHAT(",\"temperature\":-0.1"), 400, "temperature", "decimal_below_min_value"},
    {false, CHAT(",\"temperature\":1e308"), 400, "temperature", "decimal_above_max_value"},
    {false, CHAT(",\"top_p\":1.5"), 400, "top_p", "decimal_above_max_value"},
    {false, CHAT(",\"top_p\":true"), 400, "top_p", "invalid_type"},
    {false, CHAT(",\"n\":0"), 400, "n", "integer_below_min_value"},
    {false, CHAT(",\"n\":9"), 400, "n", "integer_above_max_value"},
    {false, CHAT(",\"n\":2.0"), 400, "n", "invalid_type"},
    {false, CHAT(",\"max_tokens\":0"), 400, "max_tokens", "integer_below_min_value"},
    {false, CHAT(",\"max_tokens\":1e30"), 400, "max_tokens", "invalid_type"},
    {false, CHAT(",\"max_tokens\":9223372036854775807"), 400, "max_tokens",
     "integer_above_max_value"},
    {false, CHAT(",\"max_tokens\":99999999999999999999999"), 400, NULL, NULL},
    {false, CHAT(",\"max_completion_tokens\":-3"), 400, "max_completion_tokens",
     "integer_below_min_value"},
    {false, CHAT(",\"max_tokens\":5,\"max_completion_tokens\":6"), 400, "max_tokens",
     "invalid_value"},
    {false, CHAT(",\"stop\":5"), 400, "stop", "invalid_type"},
    {false, CHAT(",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]"), 400, "stop",
     "array_above_max_length"},
    {false, CHAT(",\"stop\":[\"a\",3]"), 400, "stop[1]", "invalid_type"},
    {false, CHAT(",\"seed\":\"42\""), 400, "seed", "invalid_type"},
    {false, CHAT(",\"seed\":1.5"), 400, "seed", "invalid_type"},
    {false, CHAT(",\"presence_penalty\":3"), 400, "presence_penalty", "decimal_above_max_value"},
    {false, CHAT(",\"frequency_penalty\":-2.01"), 400, "frequency_penalty",
     "decimal_below_min_value"},
    {false, CHAT(",\"logprobs\":1"), 400, "logprobs", "invalid_type"},
    {false, CHAT(",\"top_logprobs\":2"), 400, "top_logprobs", "invalid_value"},
    {false, CHAT(",\"logprobs\":true,\"top_logprobs\":21"), 400, "top_logprobs",
     "integer_above_max_value"},
    {false, CHAT(",\"stream\":\"yes\""), 400, "stream", "invalid_type"},
    {false, CHAT(",\"stream_options\":{\"include_usage\":true}"), 400, "stream_options",
     "invalid_value"},
    {false, CHAT(",\"stream\":true,\"stream_options\":true"), 400, "stream_options",
     "invalid_type"},
    {false, CHAT(",\"stream\":true,\"stream_options\":{\"include_usage\":1}"), 400,
     "stream_options.include_usage", "invalid_type"},
    {false, CHAT(",\"user\":5"), 400, "user", "invalid_type"},
    {false, CHAT(",\"top_k\":-1"), 400, "top_k", "integer_below_min_value"},
    {false, CHAT(",\"min_p\":1.5"), 400, "min_p", "decimal_above_max_value"},
    {false, CHAT(",\"repetition_penalty\":0"), 400, "repetition_penalty",
     "decimal_below_min_value"},
    {false, CHAT(",\"ignore_eos\":\"no\""), 400, "ignore_eos", "invalid_type"},
    {false, CHAT(",\"store\":\"no\""), 400, "store", "invalid_type"},
    {false, CHAT(",\"metadata\":[1]"), 400, "metadata", "invalid_type"},
    /* unsupported features */
    {false, CHAT(",\"tools\":[{\"type\":\"function\"}]"), 400, "tools", "unsupported_parameter"},
    {false, CHAT(",\"tools\":[]"), 400, "tools", "unsupported_parameter"},
    {false, CHAT(",\"tool_choice\":\"none\""), 400, "tool_choice", "unsupported_parameter"},
    {false, CHAT(",\"functions\":[]"), 400, "functions", "unsupported_parameter"},
    {false, CHAT(",\"function_call\":\"auto\""), 400, "function_call", "unsupported_parameter"},
    {false, CHAT(",\"parallel_tool_calls\":false"), 400, "parallel_tool_calls",
     "unsupported_parameter"},
    {false, CHAT(",\"audio\":{\"voice\":\"alloy\"}"), 400, "audio", "unsupported_parameter"},
    {false, CHAT(",\"prediction\":{\"type\":\"content\"}"), 400, "prediction",
     "unsupported_parameter"},
    {false, CHAT(",\"reasoning_effort\":\"low\""), 400, "reasoning_effort",
     "unsupported_parameter"},
    {false, CHAT(",\"response_format\":{\"type\":\"json_object\"}"), 400, "response_format.type",
     "unsupported_value"},
    {false, CHAT(",\"response_format\":\"json\""), 400, "response_format", "invalid_type"},
    {false, CHAT(",\"logit_bias\":{\"50256\":-100}"), 400, "logit_bias", "unsupported_parameter"},
    {false, CHAT(",\"logit_bias\":[1]"), 400, "logit_bias", "invalid_type"},
    {false, CHAT(",\"modalities\":[\"text\",\"audio\"]"), 400, "modalities[1]",
     "unsupported_value"},
    /* completions */
    {true, "{\"model\":\"smol\"}", 400, "prompt", "missing_required_parameter"},
    {true, "{\"model\":\"smol\",\"prompt\":5}", 400, "prompt", "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":[]}", 400, "prompt", "empty_array"},
    {true, "{\"model\":\"smol\",\"prompt\":[\"a\",1]}", 400, "prompt[1]", "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":[1,\"a\"]}", 400, "prompt[1]", "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":[1,-2]}", 400, "prompt[1]", "integer_below_min_value"},
    {true, "{\"model\":\"smol\",\"prompt\":[[1],[]]}", 400, "prompt[1]", "empty_array"},
    {true, "{\"model\":\"smol\",\"prompt\":[[1],[2,\"x\"]]}", 400, "prompt[1][1]", "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"suffix\":\"b\"}", 400, "suffix",
     "unsupported_parameter"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"best_of\":3}", 400, "best_of",
     "unsupported_value"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"logprobs\":6}", 400, "logprobs",
     "integer_above_max_value"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"logprobs\":true}", 400, "logprobs",
     "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"echo\":1}", 400, "echo", "invalid_type"},
    {true, "{\"model\":\"smol\",\"prompt\":\"a\",\"max_tokens\":0}", 400, "max_tokens",
     "integer_below_min_value"},
    {true, "{\"model\":\"nope\",\"prompt\":\"a\"}", 404, "model", "model_not_found"},
    {true, "{\"prompt\":\"a\"}", 400, "model", "missing_required_parameter"},
};

static void check_bad(const struct bad_case *c, size_t len)
{
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    enum pw_err rc;
    if (c->completion) {
        Parkway__InferenceRequest **reqs = (Parkway__InferenceRequest **)1;
        size_t n = 99;
        rc = router_openai_parse_completion(c->body, len, &ctx, &reqs, &n, &err);
        assert_null(reqs);
        assert_int_equal(n, 0);
    } else {
        Parkway__InferenceRequest *req = (Parkway__InferenceRequest *)1;
        rc = router_openai_parse_chat(c->body, len, &ctx, &req, &err);
        assert_null(req);
    }
    if (rc != PW_ERR_PARSE || err.status != c->status ||
        strcmp(err.param, c->param != NULL ? c->param : "") != 0 ||
        strcmp(err.code, c->code != NULL ? c->code : "") != 0)
        fail_msg("body %s: got rc=%d status=%d param='%s' code='%s' msg='%s'", c->body, rc,
                 err.status, err.param, err.code, err.message);
    assert_non_null(err.type);
    assert_true(err.message[0] != '\0');
    /* the error renders to a valid object with the same fields */
    char *js;
    size_t jl;
    assert_int_equal(router_openai_error_json(&err, &js, &jl), PW_OK);
    json_error_t je;
    json_t *v = json_loadb(js, jl, 0, &je);
    assert_non_null(v);
    json_t *e = json_object_get(v, "error");
    assert_true(json_is_string(json_object_get(e, "message")));
    if (c->param == NULL)
        assert_true(json_is_null(json_object_get(e, "param")));
    else
        assert_string_equal(json_string_value(json_object_get(e, "param")), c->param);
    json_decref(v);
    free(js);
}

static void test_bad_requests(void **state)
{
    (void)state;
    assert_true(sizeof(bad_cases) / sizeof(bad_cases[0]) >= 40);
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++)
        check_bad(&bad_cases[i], strlen(bad_cases[i].body));
}

static void test_type_error_wording(void **state)
{
    (void)state;
    const char *body = CHAT(",\"temperature\":\"hot\"");
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r;
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_PARSE);
    assert_string_equal(err.message,
                        "Invalid type for 'temperature': expected a number, but got a string "
                        "instead.");
    assert_string_equal(err.type, "invalid_request_error");
    body = CHAT(",\"n\":9");
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_PARSE);
    assert_string_equal(err.message, "Invalid 'n': integer above maximum value. Expected a "
                                     "value <= 8, but got 9 instead.");
    body = "{\"model\":\"smol\"}";
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_PARSE);
    assert_string_equal(err.message, "Missing required parameter: 'messages'.");
}

static void test_invalid_utf8(void **state)
{
    (void)state;
    static const char *bodies[] = {
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"a\xff\"}]}",
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\"}]}",
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"\xed\xa0\x80\"}]}",
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}",
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}",
        "{\"model\":\"smol\",\"\xfe\":1," MSGS "}",
    };
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        struct bad_case c = {false, bodies[i], 400, NULL, NULL};
        check_bad(&c, strlen(bodies[i]));
    }
    /* a NUL byte in the raw body is not JSON either */
    static const char nul[] = "{\"model\":\"sm\0ol\"," MSGS "}";
    struct bad_case c = {false, nul, 400, NULL, NULL};
    check_bad(&c, sizeof(nul) - 1);
}

static char *nested_body(int depth, bool in_string)
{
    size_t cap = (size_t)depth * 2 + 256;
    char *b = malloc(cap);
    assert_non_null(b);
    size_t o =
        (size_t)snprintf(b, cap, "{\"model\":\"smol\"," MSGS ",\"x\":%s", in_string ? "\"" : "");
    for (int i = 0; i < depth; i++)
        b[o++] = '[';
    for (int i = 0; i < depth; i++)
        b[o++] = in_string ? '[' : ']';
    o += (size_t)snprintf(b + o, cap - o, "%s}", in_string ? "\"" : "");
    return b;
}

static void test_nesting(void **state)
{
    (void)state;
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r;
    /* an ignored field nested within the cap is fine */
    char *b = nested_body(ROUTER_OPENAI_JSON_DEPTH_MAX - 2, false);
    assert_int_equal(router_openai_parse_chat(b, strlen(b), &ctx, &r, &err), PW_OK);
    pw_proto_free_request(r);
    free(b);
    /* over the cap: refused before jansson recurses */
    b = nested_body(100000, false);
    assert_int_equal(router_openai_parse_chat(b, strlen(b), &ctx, &r, &err), PW_ERR_PARSE);
    assert_int_equal(err.status, 400);
    assert_non_null(strstr(err.message, "nesting"));
    free(b);
    /* brackets inside a string do not count */
    b = nested_body(1000, true);
    assert_int_equal(router_openai_parse_chat(b, strlen(b), &ctx, &r, &err), PW_OK);
    pw_proto_free_request(r);
    free(b);
}

static void test_many_messages(void **state)
{
    (void)state;
    size_t n = PW_PROTO_MESSAGES_MAX + 1;
    size_t cap = n * 40 + 64;
    char *b = malloc(cap);
    assert_non_null(b);
    size_t o = (size_t)snprintf(b, cap, "{\"model\":\"smol\",\"messages\":[");
    for (size_t i = 0; i < n; i++)
        o += (size_t)snprintf(b + o, cap - o, "%s{\"role\":\"user\",\"content\":\"x\"}",
                              i ? "," : "");
    snprintf(b + o, cap - o, "]}");
    struct bad_case c = {false, b, 400, "messages", "array_above_max_length"};
    check_bad(&c, strlen(b));
    free(b);
}

static void test_long_strings(void **state)
{
    (void)state;
    char big[300];
    memset(big, 'a', 257);
    big[257] = '\0';
    char body[1024];
    snprintf(body, sizeof(body), "{\"model\":\"%s\"," MSGS "}", big);
    struct bad_case c1 = {false, body, 400, "model", "string_above_max_length"};
    check_bad(&c1, strlen(body));
    snprintf(body, sizeof(body), CHAT(",\"stop\":[\"ok\",\"%s\"]"), big);
    struct bad_case c2 = {false, body, 400, "stop[1]", "string_above_max_length"};
    check_bad(&c2, strlen(body));
    snprintf(body, sizeof(body),
             "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\","
             "\"name\":\"%s\"}]}",
             big);
    struct bad_case c3 = {false, body, 400, "messages[0].name", "string_above_max_length"};
    check_bad(&c3, strlen(body));
    /* at the limit is fine */
    big[256] = '\0';
    snprintf(body, sizeof(body), CHAT(",\"stop\":\"%s\""), big);
    Parkway__InferenceRequest *r = chat_ok(body);
    assert_int_equal(strlen(r->sampling->stop[0]), 256);
    pw_proto_free_request(r);
}

/* Every truncation and many one-byte mutations of valid bodies: no crash, no leak, and
 * either a request or a client error, never anything else. */
static void test_mutated_bodies(void **state)
{
    (void)state;
    static const char *const bodies[] = {
        CHAT(",\"temperature\":0.5,\"stop\":[\"a\",\"b\"],\"n\":2,\"logprobs\":true,"
             "\"top_logprobs\":2,\"stream\":true,\"stream_options\":{\"include_usage\":true}"),
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"system\",\"content\":[{\"type\":"
        "\"text\",\"text\":\"caf\\u00e9\"}]},{\"role\":\"user\",\"content\":\"hi\","
        "\"name\":\"bo\"}]}",
        "{\"model\":\"smol\",\"prompt\":[\"a\",\"b\"],\"logprobs\":2,\"echo\":true}",
        "{\"model\":\"smol\",\"prompt\":[[1,2],[3]],\"max_tokens\":4,\"best_of\":1}",
    };
    static const char subst[] = {'{', '}', '[', ']', '"', '\\', ',', ':', '1', '-', '\xff', 'x'};
    struct router_openai_ctx ctx = mkctx();
    for (size_t b = 0; b < sizeof(bodies) / sizeof(bodies[0]); b++) {
        size_t len = strlen(bodies[b]);
        char *buf = malloc(len);
        assert_non_null(buf);
        for (size_t i = 0; i <= len; i++) {
            for (size_t k = 0; k <= sizeof(subst); k++) {
                size_t n = len;
                memcpy(buf, bodies[b], len);
                if (k == sizeof(subst))
                    n = i; /* truncation */
                else if (i < len)
                    buf[i] = subst[k];
                else
                    continue;
                struct router_openai_error err;
                enum pw_err rc;
                if (b < 2) {
                    Parkway__InferenceRequest *r = NULL;
                    rc = router_openai_parse_chat(buf, n, &ctx, &r, &err);
                    pw_proto_free_request(r);
                } else {
                    Parkway__InferenceRequest **r = NULL;
                    size_t nr = 0;
                    rc = router_openai_parse_completion(buf, n, &ctx, &r, &nr, &err);
                    router_openai_requests_free(r, nr);
                }
                assert_true(rc == PW_OK || rc == PW_ERR_PARSE);
                if (rc != PW_OK)
                    assert_true(err.status >= 400 && err.status < 500);
            }
        }
        free(buf);
    }
}

/* The invalid-JSON message still says what and where (router_json's wording). */
static void test_invalid_json_detail(void **state)
{
    (void)state;
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r = (Parkway__InferenceRequest *)1;
    const char *body = "{\"model\":\"smol\",\n \"messages\":tru}";
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_PARSE);
    assert_null(r);
    assert_int_equal(err.status, 400);
    assert_string_equal(err.param, "");
    assert_non_null(strstr(err.message, "not valid JSON: invalid token at line 2 column 13."));
    body = "{\"model\":\"smol\",\"model\":\"x\"}";
    assert_int_equal(router_openai_parse_chat(body, strlen(body), &ctx, &r, &err), PW_ERR_PARSE);
    assert_non_null(strstr(err.message, "duplicate object key at line 1 column 17"));
}

/* Nesting past the cap is reported as nesting even when a syntax error comes first, as the
 * old whole-body pre-scan did. */
static void test_nesting_after_syntax_error(void **state)
{
    (void)state;
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r;
    size_t depth = ROUTER_OPENAI_JSON_DEPTH_MAX + 1;
    char *b = malloc(depth + 64);
    assert_non_null(b);
    size_t o = (size_t)snprintf(b, 64, "{\"model\":smol,\"x\":");
    memset(b + o, '[', depth);
    o += depth;
    assert_int_equal(router_openai_parse_chat(b, o, &ctx, &r, &err), PW_ERR_PARSE);
    assert_int_equal(err.status, 400);
    assert_non_null(strstr(err.message, "nesting"));
    free(b);
}

/* jansson dropped a raw NUL byte right after a number or a literal; router_json refuses it
 * like any other NUL byte outside a string. */
static void test_raw_nul_after_number_refused(void **state)
{
    (void)state;
    static const char body[] = "{\"model\":\"smol\",\"n\":1\0," MSGS "}";
    struct bad_case c = {false, body, 400, NULL, NULL};
    check_bad(&c, sizeof(body) - 1);
    static const char body2[] = "{\"model\":\"smol\",\"stream\":true\0," MSGS "}";
    struct bad_case c2 = {false, body2, 400, NULL, NULL};
    check_bad(&c2, sizeof(body2) - 1);
}

/* Escapes are decoded into the strings the request carries, and every string outlives the
 * parse (the tree's arena is gone by then). */
static void test_escapes_reach_the_request(void **state)
{
    (void)state;
    Parkway__InferenceRequest *r = chat_ok(
        "{\"model\":\"sm\\u006fl\",\"stop\":[\"\\n\\n\",\"\\ud83d\\ude00\"],\"messages\":["
        "{\"role\":\"us\\u0065r\",\"content\":\"caf\\u00e9 \\\"q\\\" \\\\ \\/\\t\",\"name\":"
        "\"b\\u00f6\"},{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"a\\n\"},"
        "{\"type\":\"text\",\"text\":\"\xe2\x82\xac\"}]}]}");
    assert_string_equal(r->function, "smol");
    assert_int_equal(r->sampling->n_stop, 2);
    assert_string_equal(r->sampling->stop[0], "\n\n");
    assert_string_equal(r->sampling->stop[1], "\xf0\x9f\x98\x80");
    assert_int_equal(r->n_messages, 2);
    assert_string_equal(r->messages[0]->role, "user");
    assert_string_equal(r->messages[0]->content, "caf\xc3\xa9 \"q\" \\ /\t");
    assert_string_equal(r->messages[0]->name, "b\xc3\xb6");
    assert_string_equal(r->messages[1]->content, "a\n\n\xe2\x82\xac");
    pw_proto_free_request(r);
}

/* A body far bigger than the parser's stack buffer (its arena takes heap blocks). */
static void test_big_body(void **state)
{
    (void)state;
    size_t n = 300000;
    size_t cap = n * 2 + 4096;
    char *b = malloc(cap);
    assert_non_null(b);
    size_t o = (size_t)snprintf(b, cap, "{\"model\":\"smol\",\"messages\":[");
    for (int m = 0; m < 3; m++) {
        o += (size_t)snprintf(b + o, cap - o, "%s{\"role\":\"user\",\"content\":\"", m ? "," : "");
        for (size_t i = 0; i < n / 3; i++)
            b[o++] = (char)('a' + (i + (size_t)m) % 26);
        o += (size_t)snprintf(b + o, cap - o, "\\n\"}");
    }
    o += (size_t)snprintf(b + o, cap - o, "]}");
    struct router_openai_ctx ctx = mkctx();
    struct router_openai_error err;
    Parkway__InferenceRequest *r = NULL;
    assert_int_equal(router_openai_parse_chat(b, o, &ctx, &r, &err), PW_OK);
    free(b);
    assert_int_equal(r->n_messages, 3);
    for (int m = 0; m < 3; m++) {
        assert_int_equal(strlen(r->messages[m]->content), n / 3 + 1);
        assert_int_equal(r->messages[m]->content[0], 'a' + m);
        assert_int_equal(r->messages[m]->content[n / 3], '\n');
    }
    pw_proto_free_request(r);

    /* a completion prompt list of many token ids, one of them too big for int32 */
    size_t ids = 50000;
    cap = ids * 8 + 128;
    b = malloc(cap);
    assert_non_null(b);
    o = (size_t)snprintf(b, cap, "{\"model\":\"smol\",\"prompt\":[");
    for (size_t i = 0; i < ids; i++)
        o += (size_t)snprintf(b + o, cap - o, "%s%zu", i ? "," : "", i % 1000);
    snprintf(b + o, cap - o, "]}");
    Parkway__InferenceRequest **reqs = NULL;
    size_t nr = 0;
    enum pw_err rc = router_openai_parse_completion(b, strlen(b), &ctx, &reqs, &nr, &err);
    if (ids <= PW_PROTO_PROMPT_TOKENS_MAX) {
        assert_int_equal(rc, PW_OK);
        assert_int_equal(reqs[0]->n_prompt_token_ids, ids);
        assert_int_equal(reqs[0]->prompt_token_ids[ids - 1], (ids - 1) % 1000);
        router_openai_requests_free(reqs, nr);
    } else {
        assert_int_equal(rc, PW_ERR_PARSE);
        assert_string_equal(err.code, "array_above_max_length");
    }
    free(b);
}

/* ---- errors ------------------------------------------------------------------------- */

static void assert_json_eq(const char *got, size_t len, const char *want)
{
    json_error_t je;
    json_t *g = json_loadb(got, len, JSON_REJECT_DUPLICATES, &je);
    if (g == NULL)
        fail_msg("output is not JSON (%s): %.*s", je.text, (int)len, got);
    json_t *w = json_loads(want, 0, &je);
    if (w == NULL)
        fail_msg("expected is not JSON (%s): %s", je.text, want);
    if (!json_equal(g, w))
        fail_msg("JSON differs.\n got: %.*s\nwant: %s", (int)len, got, want);
    json_decref(g);
    json_decref(w);
}

static void test_error_constructors(void **state)
{
    (void)state;
    struct router_openai_error e;
    char *js;
    size_t jl;

    router_openai_err_missing_key(&e);
    assert_int_equal(e.status, 401);
    router_openai_err_bad_key(&e);
    assert_int_equal(e.status, 401);
    assert_string_equal(e.code, "invalid_api_key");
    router_openai_err_model_denied(&e, "secret");
    assert_int_equal(e.status, 403);
    router_openai_err_model_not_found(&e, "nope");
    assert_int_equal(e.status, 404);
    assert_int_equal(router_openai_error_json(&e, &js, &jl), PW_OK);
    assert_json_eq(js, jl,
                   "{\"error\":{\"message\":\"The model `nope` does not exist or you do not "
                   "have access to it.\",\"type\":\"invalid_request_error\",\"param\":\"model\","
                   "\"code\":\"model_not_found\"}}");
    free(js);
    router_openai_err_unknown_route(&e, "POST", "/v1/nothing");
    assert_int_equal(e.status, 404);
    assert_string_equal(e.message, "Invalid URL (POST /v1/nothing)");
    router_openai_err_method(&e, "GET", "/v1/chat/completions");
    assert_int_equal(e.status, 405);
    router_openai_err_header_timeout(&e);
    assert_int_equal(e.status, 408);
    router_openai_err_too_large(&e, 8u << 20);
    assert_int_equal(e.status, 413);
    router_openai_err_rate_limited(&e, "tokens", "smol", 1000, 7);
    assert_int_equal(e.status, 429);
    assert_string_equal(e.type, "tokens");
    assert_string_equal(e.code, "rate_limit_exceeded");
    assert_int_equal(e.retry_after_s, 7);
    router_openai_err_rate_limited(&e, "requests", NULL, 60, 0);
    assert_string_equal(e.type, "requests");
    assert_int_equal(e.retry_after_s, 1);
    router_openai_err_internal(&e);
    assert_int_equal(e.status, 500);
    assert_string_equal(e.type, "server_error");
    assert_int_equal(router_openai_error_json(&e, &js, &jl), PW_OK);
    assert_json_eq(js, jl,
                   "{\"error\":{\"message\":\"The server had an error while processing your "
                   "request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,"
                   "\"code\":null}}");
    free(js);
    router_openai_err_unavailable(&e, "the queue is full", 2);
    assert_int_equal(e.status, 503);
    assert_int_equal(e.retry_after_s, 2);
    router_openai_err_deadline(&e);
    assert_int_equal(e.status, 504);
    assert_string_equal(e.code, "deadline_exceeded");

    Parkway__Error pe = PARKWAY__ERROR__INIT;
    pe.code = "context_length_exceeded";
    pe.message = "This model's maximum context length is 2048 tokens.";
    pe.http_status = 400;
    router_openai_err_from_reply(&e, &pe, PARKWAY__FINISH_REASON__FINISH_REASON_ERROR);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.type, "invalid_request_error");
    assert_string_equal(e.code, "context_length_exceeded");
    router_openai_err_from_reply(&e, NULL, PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED);
    assert_int_equal(e.status, 504);
    assert_string_equal(e.code, "deadline_exceeded");
    pe.http_status = 999;
    router_openai_err_from_reply(&e, &pe, PARKWAY__FINISH_REASON__FINISH_REASON_ERROR);
    assert_int_equal(e.status, 500);

    /* long and non-ASCII values are cut on a character boundary and stay valid UTF-8 */
    char model[300];
    for (size_t i = 0; i + 2 < sizeof(model); i += 2)
        memcpy(model + i, "\xc3\xa9", 2);
    model[sizeof(model) - 2] = '\0';
    router_openai_err_model_not_found(&e, model);
    assert_int_equal(router_openai_error_json(&e, &js, &jl), PW_OK);
    json_error_t je;
    json_t *v = json_loadb(js, jl, 0, &je);
    assert_non_null(v);
    json_decref(v);
    free(js);
}

/* ---- reply chunks ------------------------------------------------------------------- */

struct chunk_store {
    Parkway__ReplyChunk c;
    Parkway__Usage u;
    Parkway__Error e;
    Parkway__TokenLogprob lp[4];
    Parkway__TokenLogprob *lpp[4];
    Parkway__TopLogprob top[4][2];
    Parkway__TopLogprob *topp[4][2];
};

static Parkway__ReplyChunk *mk(struct chunk_store *s, const char *id, uint32_t attempt,
                               uint32_t seq, uint32_t index, const char *text,
                               Parkway__FinishReason fr, bool done)
{
    memset(s, 0, sizeof(*s));
    parkway__reply_chunk__init(&s->c);
    parkway__usage__init(&s->u);
    parkway__error__init(&s->e);
    s->c.request_id = (char *)id;
    s->c.attempt = attempt;
    s->c.seq = seq;
    s->c.index = index;
    s->c.text = (char *)text;
    s->c.finish_reason = fr;
    s->c.done = done;
    return &s->c;
}

static void with_usage(struct chunk_store *s, uint32_t p, uint32_t c, uint32_t cached)
{
    s->u.prompt_tokens = p;
    s->u.completion_tokens = c;
    s->u.cached_tokens = cached;
    s->c.usage = &s->u;
}

/* Adds token logprobs: tokens[i] with logprob lps[i], each with one alternative "alt". */
static void with_lp(struct chunk_store *s, size_t n, const char *const *tokens, const float *lps)
{
    for (size_t i = 0; i < n; i++) {
        parkway__token_logprob__init(&s->lp[i]);
        s->lp[i].token = (char *)tokens[i];
        s->lp[i].logprob = lps[i];
        s->lp[i].bytes.data = (uint8_t *)tokens[i];
        s->lp[i].bytes.len = strlen(tokens[i]);
        parkway__top_logprob__init(&s->top[i][0]);
        s->top[i][0].token = "alt";
        s->top[i][0].logprob = -2.5f;
        s->top[i][0].bytes.data = (uint8_t *)"alt";
        s->top[i][0].bytes.len = 3;
        s->topp[i][0] = &s->top[i][0];
        s->lp[i].top_logprobs = s->topp[i];
        s->lp[i].n_top_logprobs = 1;
        s->lpp[i] = &s->lp[i];
    }
    s->c.logprobs = s->lpp;
    s->c.n_logprobs = n;
}

#define F_NONE PARKWAY__FINISH_REASON__FINISH_REASON_NONE
#define F_STOP PARKWAY__FINISH_REASON__FINISH_REASON_STOP
#define F_LEN PARKWAY__FINISH_REASON__FINISH_REASON_LENGTH
#define F_ERR PARKWAY__FINISH_REASON__FINISH_REASON_ERROR
#define F_CANCEL PARKWAY__FINISH_REASON__FINISH_REASON_CANCELLED

static struct router_openai_resp mkresp(enum router_openai_kind kind, uint32_t n, uint32_t n_parts,
                                        bool logprobs, bool include_usage)
{
    struct router_openai_resp r = {
        .kind = kind,
        .request_id = "req1",
        .model = "smol",
        .created = 1700000000,
        .n = n,
        .n_parts = n_parts,
        .logprobs = logprobs,
        .include_usage = include_usage,
        .system_fingerprint = "fp_test",
    };
    return r;
}

static void acc_feed(struct router_openai_acc *acc, Parkway__ReplyChunk *c, bool want_finished)
{
    bool fin = !want_finished;
    assert_int_equal(router_openai_acc_add(acc, c, &fin), PW_OK);
    assert_int_equal(fin, want_finished);
}

static void acc_expect(struct router_openai_acc *acc, int want_status, const char *want)
{
    char *body;
    size_t len;
    int status = 0;
    assert_int_equal(router_openai_acc_render(acc, &body, &len, &status), PW_OK);
    assert_int_equal(status, want_status);
    assert_json_eq(body, len, want);
    free(body);
}

static void test_acc_chat(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 2, 1, true, false);
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    assert_non_null(acc);
    struct chunk_store s;
    char *body;
    size_t len;
    int status;
    assert_int_equal(router_openai_acc_render(acc, &body, &len, &status), PW_ERR_INVAL);

    static const char *const t1[] = {"Hel", "lo"};
    static const float l1[] = {-0.5f, -0.25f};
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false);
    with_lp(&s, 2, t1, l1);
    acc_feed(acc, &s.c, false);
    static const char *const t2[] = {"Hi"};
    static const float l2[] = {-INFINITY};
    mk(&s, "req1", 0, 1, 1, "Hi", F_LEN, false);
    with_lp(&s, 1, t2, l2);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 0, 1, 1, "Hi", F_LEN, false); /* duplicate seq */
    acc_feed(acc, &s.c, false);
    static const char *const t3[] = {"!"};
    static const float l3[] = {-1.0f};
    mk(&s, "req1", 0, 2, 0, "!", F_STOP, false);
    with_lp(&s, 1, t3, l3);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 0, 3, 0, "", F_NONE, true);
    with_usage(&s, 10, 4, 8);
    acc_feed(acc, &s.c, true);
    assert_int_equal(router_openai_acc_dropped(acc), 1);

    acc_expect(acc, 200,
               "{\"id\":\"chatcmpl-req1\",\"object\":\"chat.completion\",\"created\":1700000000,"
               "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\",\"choices\":["
               "{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello!\","
               "\"refusal\":null},\"logprobs\":{\"content\":["
               "{\"token\":\"Hel\",\"logprob\":-0.5,\"bytes\":[72,101,108],\"top_logprobs\":"
               "[{\"token\":\"alt\",\"logprob\":-2.5,\"bytes\":[97,108,116]}]},"
               "{\"token\":\"lo\",\"logprob\":-0.25,\"bytes\":[108,111],\"top_logprobs\":"
               "[{\"token\":\"alt\",\"logprob\":-2.5,\"bytes\":[97,108,116]}]},"
               "{\"token\":\"!\",\"logprob\":-1.0,\"bytes\":[33],\"top_logprobs\":"
               "[{\"token\":\"alt\",\"logprob\":-2.5,\"bytes\":[97,108,116]}]}],\"refusal\":null},"
               "\"finish_reason\":\"stop\"},"
               "{\"index\":1,\"message\":{\"role\":\"assistant\",\"content\":\"Hi\","
               "\"refusal\":null},\"logprobs\":{\"content\":["
               "{\"token\":\"Hi\",\"logprob\":-9999.0,\"bytes\":[72,105],\"top_logprobs\":"
               "[{\"token\":\"alt\",\"logprob\":-2.5,\"bytes\":[97,108,116]}]}],\"refusal\":null},"
               "\"finish_reason\":\"length\"}],"
               "\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":4,\"total_tokens\":14,"
               "\"prompt_tokens_details\":{\"cached_tokens\":8}}}");

    /* chunks after the end are dropped */
    mk(&s, "req1", 0, 4, 0, "late", F_NONE, false);
    acc_feed(acc, &s.c, true);
    assert_int_equal(router_openai_acc_dropped(acc), 2);
    router_openai_acc_destroy(acc);
}

static void test_acc_retry_restarts(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, false);
    rs.system_fingerprint = NULL;
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 0, 1, 0, " wor", F_NONE, false);
    acc_feed(acc, &s.c, false);
    /* the engine died; another one claimed the request and starts over */
    mk(&s, "req1", 1, 0, 0, "Hel", F_NONE, false);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 0, 2, 0, "ld (stale)", F_NONE, false); /* the old engine, late */
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 1, 1, 0, "lo world", F_STOP, false);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 1, 1, 0, "lo world", F_STOP, false); /* redelivered */
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 1, 2, 0, NULL, F_NONE, true);
    with_usage(&s, 3, 2, 0);
    acc_feed(acc, &s.c, true);
    assert_int_equal(router_openai_acc_dropped(acc), 2);
    acc_expect(acc, 200,
               "{\"id\":\"chatcmpl-req1\",\"object\":\"chat.completion\",\"created\":1700000000,"
               "\"model\":\"smol\",\"system_fingerprint\":null,\"choices\":[{\"index\":0,"
               "\"message\":{\"role\":\"assistant\",\"content\":\"Hello world\","
               "\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"stop\"}],"
               "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5,"
               "\"prompt_tokens_details\":{\"cached_tokens\":0}}}");
    router_openai_acc_destroy(acc);
}

static void test_acc_engine_error(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, false);
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "", F_ERR, true);
    s.e.code = "context_length_exceeded";
    s.e.message = "This model's maximum context length is 2048 tokens.";
    s.e.http_status = 400;
    s.c.error = &s.e;
    acc_feed(acc, &s.c, true);
    acc_expect(acc, 400,
               "{\"error\":{\"message\":\"This model's maximum context length is 2048 tokens.\","
               "\"type\":\"invalid_request_error\",\"param\":null,"
               "\"code\":\"context_length_exceeded\"}}");
    router_openai_acc_destroy(acc);

    acc = router_openai_acc_create(&rs);
    mk(&s, "req1", 0, 0, 0, "par", F_NONE, false);
    acc_feed(acc, &s.c, false);
    mk(&s, "req1", 0, 1, 0, "", F_CANCEL, true);
    acc_feed(acc, &s.c, true);
    char *body;
    size_t len;
    int status;
    assert_int_equal(router_openai_acc_render(acc, &body, &len, &status), PW_OK);
    assert_int_equal(status, 504);
    free(body);
    router_openai_acc_destroy(acc);
}

static void test_acc_bad_chunks(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 2, 1, false, false);
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    struct chunk_store s;
    mk(&s, "other", 0, 0, 0, "x", F_NONE, false);
    assert_int_equal(router_openai_acc_add(acc, &s.c, NULL), PW_ERR_INVAL);
    mk(&s, "req1.0", 0, 0, 0, "x", F_NONE, false);
    assert_int_equal(router_openai_acc_add(acc, &s.c, NULL), PW_ERR_INVAL);
    mk(&s, "req1", 0, 0, 2, "x", F_NONE, false); /* index >= n */
    assert_int_equal(router_openai_acc_add(acc, &s.c, NULL), PW_ERR_INVAL);
    mk(&s, NULL, 0, 0, 0, "x", F_NONE, false);
    assert_int_equal(router_openai_acc_add(acc, &s.c, NULL), PW_ERR_INVAL);
    router_openai_acc_destroy(acc);
    rs.n = 0;
    assert_null(router_openai_acc_create(&rs));
    rs.n = 1;
    rs.n_parts = ROUTER_OPENAI_PROMPTS_MAX + 1;
    assert_null(router_openai_stream_create(&rs));
}

static void test_acc_completion_fanout(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_COMPLETION, 1, 2, true, false);
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    struct chunk_store s;
    static const char *const ta[] = {"A", "\xc3\xa9"};
    static const float la[] = {-0.5f, -1.5f};
    mk(&s, "req1", 0, 0, 0, "x", F_NONE, false); /* the base id alone is not a part */
    assert_int_equal(router_openai_acc_add(acc, &s.c, NULL), PW_ERR_INVAL);
    mk(&s, "req1.1", 0, 0, 0, "A\xc3\xa9", F_LEN, true);
    with_lp(&s, 2, ta, la);
    with_usage(&s, 2, 2, 0);
    acc_feed(acc, &s.c, false);
    static const char *const tb[] = {"B"};
    static const float lb[] = {-0.125f};
    mk(&s, "req1.0", 0, 0, 0, "B", F_STOP, true);
    with_lp(&s, 1, tb, lb);
    with_usage(&s, 3, 1, 1);
    acc_feed(acc, &s.c, true);
    acc_expect(acc, 200,
               "{\"id\":\"cmpl-req1\",\"object\":\"text_completion\",\"created\":1700000000,"
               "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\",\"choices\":["
               "{\"text\":\"B\",\"index\":0,\"logprobs\":{\"tokens\":[\"B\"],\"token_logprobs\":"
               "[-0.125],\"top_logprobs\":[{\"alt\":-2.5}],\"text_offset\":[0]},"
               "\"finish_reason\":\"stop\"},"
               "{\"text\":\"A\xc3\xa9\",\"index\":1,\"logprobs\":{\"tokens\":[\"A\",\"\xc3\xa9\"],"
               "\"token_logprobs\":[-0.5,-1.5],\"top_logprobs\":[{\"alt\":-2.5},{\"alt\":-2.5}],"
               "\"text_offset\":[0,1]},\"finish_reason\":\"length\"}],"
               "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8,"
               "\"prompt_tokens_details\":{\"cached_tokens\":1}}}");
    router_openai_acc_destroy(acc);
}

static void test_acc_invalid_utf8_text(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_COMPLETION, 1, 1, false, false);
    struct router_openai_acc *acc = router_openai_acc_create(&rs);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0,
       "a\xff"
       "b",
       F_STOP, true);
    acc_feed(acc, &s.c, true);
    acc_expect(acc, 200,
               "{\"id\":\"cmpl-req1\",\"object\":\"text_completion\",\"created\":1700000000,"
               "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\",\"choices\":["
               "{\"text\":\"a\xef\xbf\xbd"
               "b\",\"index\":0,\"logprobs\":null,"
               "\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":0,"
               "\"completion_tokens\":0,\"total_tokens\":0,\"prompt_tokens_details\":"
               "{\"cached_tokens\":0}}}");
    router_openai_acc_destroy(acc);
}

/* The direct writer (non-stream, no logprobs) prints exactly what the jansson tree does,
 * escapes and UTF-8 repair included. */
static void test_acc_direct_matches_reference(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "plain",
        "",
        "quote\" back\\slash\n\t\r\b\f ctrl\x01\x1f del\x7f slash/",
        "emoji \xf0\x9f\x98\x80 \xc3\xa9t\xc3\xa9",
        "a\xff"
        "b",
        "overlong \xe0\x80\x80 surrogate \xed\xa0\x80 big \xf4\x90\x80\x80 cut \xc3",
        "\xc0\xaf \xf8\x88\x80\x80\x80",
    };
    for (int kind = 0; kind < 2; kind++) {
        for (int fp = 0; fp < 2; fp++) {
            for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
                bool chat = kind == 0;
                struct router_openai_resp rs = mkresp(
                    chat ? ROUTER_OPENAI_CHAT : ROUTER_OPENAI_COMPLETION, 2, 1, false, false);
                if (fp)
                    rs.system_fingerprint = NULL;
                struct router_openai_acc *acc = router_openai_acc_create(&rs);
                assert_non_null(acc);
                struct chunk_store s;
                acc_feed(acc, mk(&s, "req1", 0, 0, 1, texts[t], F_LEN, false), false);
                mk(&s, "req1", 0, 1, 0, texts[(t + 1) % 7], F_STOP, true);
                with_usage(&s, 12, 345, 6);
                acc_feed(acc, &s.c, true);
                char *direct = NULL, *ref = NULL;
                size_t dl = 0, rl = 0;
                int status = 0;
                assert_int_equal(router_openai_acc_render(acc, &direct, &dl, &status), PW_OK);
                assert_int_equal(status, 200);
                assert_int_equal(router_openai_acc_render_reference(acc, &ref, &rl), PW_OK);
                assert_string_equal(direct, ref);
                assert_int_equal(dl, rl);
                assert_int_equal(strlen(direct), dl);
                free(direct);
                free(ref);
                router_openai_acc_destroy(acc);
            }
        }
    }
}

/* One whole stream (two choices, role/content/finish events, usage) as SSE bytes. */
static char *stream_bytes(bool chat, bool usage, bool fp, const char *t0, const char *t1)
{
    struct router_openai_resp rs =
        mkresp(chat ? ROUTER_OPENAI_CHAT : ROUTER_OPENAI_COMPLETION, 2, 1, false, usage);
    if (!fp)
        rs.system_fingerprint = NULL;
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    assert_non_null(st);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    bool fin = false;
    assert_int_equal(
        router_openai_stream_feed(st, mk(&s, "req1", 0, 0, 1, t0, F_NONE, false), &out, &fin),
        PW_OK);
    assert_int_equal(
        router_openai_stream_feed(st, mk(&s, "req1", 0, 1, 0, t1, F_LEN, false), &out, &fin),
        PW_OK);
    mk(&s, "req1", 0, 2, 1, t1, F_STOP, true);
    with_usage(&s, 7, 8, 1);
    assert_int_equal(router_openai_stream_feed(st, &s.c, &out, &fin), PW_OK);
    assert_true(fin);
    char *bytes = strdup(out.data ? out.data : "");
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
    return bytes;
}

static void test_stream_direct_matches_reference(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "Hel", "", "q\"b\\n\n\x02\x7f", "\xf0\x9f\x98\x80\xc3\xa9", "x\xff\xe0\x80\x80y\xc3",
    };
    for (int mask = 0; mask < 8; mask++) {
        for (size_t t = 0; t < sizeof texts / sizeof texts[0]; t++) {
            bool chat = mask & 1, usage = mask & 2, fp = mask & 4;
            const char *t1 = texts[(t + 2) % 5];
            router_openai_set_direct(true);
            char *direct = stream_bytes(chat, usage, fp, texts[t], t1);
            router_openai_set_direct(false);
            char *tree = stream_bytes(chat, usage, fp, texts[t], t1);
            router_openai_set_direct(true);
            assert_string_equal(direct, tree);
            assert_non_null(strstr(direct, "data: [DONE]"));
            free(direct);
            free(tree);
        }
    }
}

/* ---- streams ------------------------------------------------------------------------ */

/*
 * Checks the SSE framing byte for byte and each event structurally: want[] holds the JSON
 * of each event in order, "[DONE]" for the terminator.
 */
static void sse_expect(const struct router_sse_buf *b, const char *const *want, size_t n)
{
    const char *p = b->data != NULL ? b->data : "";
    size_t left = b->len;
    for (size_t i = 0; i < n; i++) {
        if (left < 6 || memcmp(p, "data: ", 6) != 0)
            fail_msg("event %zu: no 'data: ' prefix in: %.*s", i, (int)left, p);
        const char *end = strstr(p, "\n\n");
        assert_non_null(end);
        const char *payload = p + 6;
        size_t plen = (size_t)(end - payload);
        assert_null(memchr(payload, '\n', plen));
        if (strcmp(want[i], "[DONE]") == 0) {
            assert_int_equal(plen, 6);
            assert_memory_equal(payload, "[DONE]", 6);
        } else {
            assert_json_eq(payload, plen, want[i]);
        }
        left -= (size_t)(end + 2 - p);
        p = end + 2;
    }
    if (left != 0)
        fail_msg("%zu unexpected bytes after the events: %.*s", left, (int)left, p);
}

static void feed(struct router_openai_stream *st, Parkway__ReplyChunk *c,
                 struct router_sse_buf *out, bool want_finished)
{
    bool fin = !want_finished;
    assert_int_equal(router_openai_stream_feed(st, c, out, &fin), PW_OK);
    assert_int_equal(fin, want_finished);
}

#define CHUNK_HEAD                                                                                 \
    "\"id\":\"chatcmpl-req1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"        \
    "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\""

static void test_stream_chat(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, true);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    assert_non_null(st);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false);
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 0, 1, 0, "\" \\ \n\xe2\x9c\x93", F_STOP, false);
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 0, 2, 0, "", F_NONE, true);
    with_usage(&s, 5, 2, 0);
    feed(st, &s.c, &out, true);
    assert_true(router_openai_stream_finished(st));
    static const char *const want[] = {
        "{" CHUNK_HEAD ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\","
        "\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],"
        "\"usage\":null}",
        "{" CHUNK_HEAD ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},"
        "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}",
        "{" CHUNK_HEAD ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\" \\\\ \\n"
        "\xe2\x9c\x93\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}",
        "{" CHUNK_HEAD ",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}],\"usage\":null}",
        "{" CHUNK_HEAD ",\"choices\":[],\"usage\":{\"prompt_tokens\":5,"
        "\"completion_tokens\":2,\"total_tokens\":7,\"prompt_tokens_details\":"
        "{\"cached_tokens\":0}}}",
        "[DONE]",
    };
    sse_expect(&out, want, sizeof(want) / sizeof(want[0]));
    /* nothing more once finished */
    router_sse_buf_reset(&out);
    mk(&s, "req1", 0, 3, 0, "late", F_NONE, false);
    feed(st, &s.c, &out, true);
    assert_int_equal(out.len, 0);
    struct router_openai_error e;
    router_openai_err_deadline(&e);
    assert_int_equal(router_openai_stream_fail(st, &e, &out), PW_OK);
    assert_int_equal(out.len, 0);
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

static void test_stream_logprobs_n2_no_usage(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 2, 1, true, false);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    static const char *const t[] = {"Yo"};
    static const float l[] = {-0.5f};
    mk(&s, "req1", 0, 0, 1, "Yo", F_LEN, false);
    with_lp(&s, 1, t, l);
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 0, 1, 0, "", F_NONE, true); /* choice 0 never said anything */
    feed(st, &s.c, &out, true);
#define H2                                                                                         \
    "\"id\":\"chatcmpl-req1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,"        \
    "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\""
    static const char *const want[] = {
        "{" H2 ",\"choices\":[{\"index\":1,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
        "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"Yo\"},\"logprobs\":"
        "{\"content\":[{\"token\":\"Yo\",\"logprob\":-0.5,\"bytes\":[89,111],\"top_logprobs\":"
        "[{\"token\":\"alt\",\"logprob\":-2.5,\"bytes\":[97,108,116]}]}],\"refusal\":null},"
        "\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":1,\"delta\":{},\"logprobs\":null,"
        "\"finish_reason\":\"length\"}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
        "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}]}",
        "[DONE]",
    };
    sse_expect(&out, want, sizeof(want) / sizeof(want[0]));
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

/* The concatenated delta contents of a chat stream (role chunks contribute ""). */
static void stream_text(const struct router_sse_buf *b, char *dst, size_t cap, int *events)
{
    size_t o = 0;
    *events = 0;
    const char *p = b->data != NULL ? b->data : "";
    while (*p != '\0') {
        const char *end = strstr(p, "\n\n");
        assert_non_null(end);
        assert_memory_equal(p, "data: ", 6);
        json_error_t je;
        json_t *v = json_loadb(p + 6, (size_t)(end - p - 6), 0, &je);
        if (v != NULL) {
            json_t *ch = json_array_get(json_object_get(v, "choices"), 0);
            json_t *c = json_object_get(json_object_get(ch, "delta"), "content");
            if (json_is_string(c)) {
                size_t n = json_string_length(c);
                assert_true(o + n < cap);
                memcpy(dst + o, json_string_value(c), n);
                o += n;
            }
            json_decref(v);
        }
        (*events)++;
        p = end + 2;
    }
    dst[o] = '\0';
}

static void test_stream_retry_dedup(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, false);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false);
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false); /* redelivered */
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 0, 1, 0, " wor", F_NONE, false);
    feed(st, &s.c, &out, false);
    size_t before = out.len;
    /* attempt 1 regenerates the same text, chunked differently */
    mk(&s, "req1", 1, 0, 0, "Hel", F_NONE, false);
    feed(st, &s.c, &out, false);
    assert_int_equal(out.len, before);             /* all already sent */
    mk(&s, "req1", 0, 2, 0, "ld?", F_NONE, false); /* stale attempt */
    feed(st, &s.c, &out, false);
    assert_int_equal(out.len, before);
    mk(&s, "req1", 1, 1, 0, "lo wo", F_NONE, false);
    feed(st, &s.c, &out, false);
    assert_int_equal(out.len, before);
    mk(&s, "req1", 1, 2, 0, "rld", F_NONE, false);
    feed(st, &s.c, &out, false);
    mk(&s, "req1", 1, 3, 0, "!", F_STOP, true);
    feed(st, &s.c, &out, true);
    assert_int_equal(router_openai_stream_dropped(st), 2);

    char text[64];
    int events;
    stream_text(&out, text, sizeof(text), &events);
    assert_string_equal(text, "Hello world!");
    /* role, Hello, " wor", "ld", "!", finish, [DONE] */
    assert_int_equal(events, 7);
    static const char *const want[] = {
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\","
        "\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,"
        "\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wor\"},\"logprobs\":null,"
        "\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ld\"},\"logprobs\":null,"
        "\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"logprobs\":null,"
        "\"finish_reason\":null}]}",
        "{" H2 ",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}]}",
        "[DONE]",
    };
    sse_expect(&out, want, sizeof(want) / sizeof(want[0]));
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

static void test_stream_retry_logprobs(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_COMPLETION, 1, 1, true, false);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    static const char *const t[] = {"a", "b", "c"};
    static const float l[] = {-1, -2, -3};
    mk(&s, "req1", 0, 0, 0, "ab", F_NONE, false);
    with_lp(&s, 2, t, l);
    feed(st, &s.c, &out, false);
    router_sse_buf_reset(&out);
    mk(&s, "req1", 1, 0, 0, "abc", F_STOP, true);
    with_lp(&s, 3, t, l);
    feed(st, &s.c, &out, true);
    static const char *const want[] = {
        "{\"id\":\"cmpl-req1\",\"object\":\"text_completion\",\"created\":1700000000,"
        "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\",\"choices\":[{\"text\":\"c\","
        "\"index\":0,\"logprobs\":{\"tokens\":[\"c\"],\"token_logprobs\":[-3.0],"
        "\"top_logprobs\":[{\"alt\":-2.5}],\"text_offset\":[2]},\"finish_reason\":null}]}",
        "{\"id\":\"cmpl-req1\",\"object\":\"text_completion\",\"created\":1700000000,"
        "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\",\"choices\":[{\"text\":\"\","
        "\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}]}",
        "[DONE]",
    };
    sse_expect(&out, want, sizeof(want) / sizeof(want[0]));
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

static void test_stream_retry_diverged(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, false);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "Hello", F_NONE, false);
    feed(st, &s.c, &out, false);
    router_sse_buf_reset(&out);
    mk(&s, "req1", 1, 0, 0, "Help!", F_NONE, false);
    feed(st, &s.c, &out, true);
    static const char *const want[] = {
        "{\"error\":{\"message\":\"The engine generating this answer failed and its retry "
        "produced different text, so the answer cannot be continued. Please retry the "
        "request.\",\"type\":\"server_error\",\"param\":null,\"code\":\"retry_diverged\"}}",
    };
    sse_expect(&out, want, 1); /* and no [DONE] */
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

static void test_stream_errors(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_CHAT, 1, 1, false, true);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    mk(&s, "req1", 0, 0, 0, "Hi", F_NONE, false);
    feed(st, &s.c, &out, false);
    router_sse_buf_reset(&out);
    mk(&s, "req1", 0, 1, 0, "", F_ERR, true);
    s.e.code = "internal_error";
    s.e.message = "engine out of memory";
    s.c.error = &s.e;
    feed(st, &s.c, &out, true);
    static const char *const want[] = {
        "{\"error\":{\"message\":\"engine out of memory\",\"type\":\"server_error\","
        "\"param\":null,\"code\":\"internal_error\"}}",
    };
    sse_expect(&out, want, 1);
    router_openai_stream_destroy(st);

    /* the router's own failure (deadline) mid-stream */
    st = router_openai_stream_create(&rs);
    router_sse_buf_reset(&out);
    struct router_openai_error e;
    router_openai_err_deadline(&e);
    assert_int_equal(router_openai_stream_fail(st, &e, &out), PW_OK);
    assert_true(router_openai_stream_finished(st));
    static const char *const want2[] = {
        "{\"error\":{\"message\":\"Request timed out: the deadline passed before the answer "
        "was complete.\",\"type\":\"server_error\",\"param\":null,"
        "\"code\":\"deadline_exceeded\"}}",
    };
    sse_expect(&out, want2, 1);
    mk(&s, "req1", 0, 0, 0, "late", F_NONE, false);
    feed(st, &s.c, &out, true);
    sse_expect(&out, want2, 1);
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

static void test_stream_completion_fanout(void **state)
{
    (void)state;
    struct router_openai_resp rs = mkresp(ROUTER_OPENAI_COMPLETION, 2, 2, false, true);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    struct router_sse_buf out;
    router_sse_buf_init(&out);
    struct chunk_store s;
    mk(&s, "req1.1", 0, 0, 1, "x", F_STOP, false);
    feed(st, &s.c, &out, false);
    mk(&s, "req1.1", 0, 1, 0, "", F_NONE, true);
    with_usage(&s, 1, 1, 0);
    feed(st, &s.c, &out, false);
    mk(&s, "req1.0", 0, 0, 0, "y", F_LEN, true);
    with_usage(&s, 2, 2, 0);
    feed(st, &s.c, &out, true);
#define CH                                                                                         \
    "\"id\":\"cmpl-req1\",\"object\":\"text_completion\",\"created\":1700000000,"                  \
    "\"model\":\"smol\",\"system_fingerprint\":\"fp_test\""
    static const char *const want[] = {
        "{" CH ",\"choices\":[{\"text\":\"x\",\"index\":3,\"logprobs\":null,"
        "\"finish_reason\":null}],\"usage\":null}",
        "{" CH ",\"choices\":[{\"text\":\"\",\"index\":3,\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}],\"usage\":null}",
        "{" CH ",\"choices\":[{\"text\":\"\",\"index\":2,\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}],\"usage\":null}",
        "{" CH ",\"choices\":[{\"text\":\"y\",\"index\":0,\"logprobs\":null,"
        "\"finish_reason\":null}],\"usage\":null}",
        "{" CH ",\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,"
        "\"finish_reason\":\"length\"}],\"usage\":null}",
        "{" CH ",\"choices\":[{\"text\":\"\",\"index\":1,\"logprobs\":null,"
        "\"finish_reason\":\"stop\"}],\"usage\":null}",
        "{" CH ",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3,"
        "\"total_tokens\":6,\"prompt_tokens_details\":{\"cached_tokens\":0}}}",
        "[DONE]",
    };
    sse_expect(&out, want, sizeof(want) / sizeof(want[0]));
    router_sse_buf_deinit(&out);
    router_openai_stream_destroy(st);
}

/* A request parsed from JSON drives the response parameters end to end. */
static void test_resp_from_request(void **state)
{
    (void)state;
    Parkway__InferenceRequest *r =
        chat_ok("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
                "\"n\":3,\"logprobs\":true,\"stream\":true,"
                "\"stream_options\":{\"include_usage\":true}}");
    struct router_openai_resp rs;
    router_openai_resp_from_request(&rs, r, "req1", 1, 42);
    assert_int_equal(rs.kind, ROUTER_OPENAI_CHAT);
    assert_int_equal(rs.n, 3);
    assert_int_equal(rs.n_parts, 1);
    assert_true(rs.logprobs);
    assert_true(rs.include_usage);
    assert_string_equal(rs.model, "smol");
    assert_int_equal(rs.created, 42);
    struct router_openai_stream *st = router_openai_stream_create(&rs);
    assert_non_null(st);
    router_openai_stream_destroy(st);
    pw_proto_free_request(r);
}

/* ---- models and SSE ----------------------------------------------------------------- */

static void test_models(void **state)
{
    (void)state;
    struct router_openai_model m[2] = {
        {.id = "smol", .created = 1700000000, .owned_by = "acme"},
        {.id = "tiny", .created = 1700000001, .owned_by = NULL},
    };
    char *js;
    size_t jl;
    assert_int_equal(router_openai_models_json(m, 2, &js, &jl), PW_OK);
    assert_json_eq(js, jl,
                   "{\"object\":\"list\",\"data\":[{\"id\":\"smol\",\"object\":\"model\","
                   "\"created\":1700000000,\"owned_by\":\"acme\"},{\"id\":\"tiny\",\"object\":"
                   "\"model\",\"created\":1700000001,\"owned_by\":\"parkway\"}]}");
    free(js);
    assert_int_equal(router_openai_models_json(NULL, 0, &js, &jl), PW_OK);
    assert_json_eq(js, jl, "{\"object\":\"list\",\"data\":[]}");
    free(js);
    assert_int_equal(router_openai_model_json(&m[0], &js, NULL), PW_OK);
    assert_json_eq(js, strlen(js),
                   "{\"id\":\"smol\",\"object\":\"model\",\"created\":1700000000,"
                   "\"owned_by\":\"acme\"}");
    free(js);
}

static void test_sse_framing(void **state)
{
    (void)state;
    struct router_sse_buf b;
    router_sse_buf_init(&b);
    assert_int_equal(router_sse_comment(&b, "keep-alive"), PW_OK);
    assert_int_equal(router_sse_data(&b, "{}", 2), PW_OK);
    assert_int_equal(router_sse_done(&b), PW_OK);
    assert_string_equal(b.data, ": keep-alive\n\ndata: {}\n\ndata: [DONE]\n\n");
    router_sse_buf_reset(&b);
    assert_int_equal(b.len, 0);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(router_sse_data(&b, "0123456789", 10), PW_OK);
    assert_int_equal(b.len, 1000 * 18);
    router_sse_buf_deinit(&b);
    router_sse_buf_deinit(&b); /* twice is fine */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_minimal),
        cmocka_unit_test(test_chat_full),
        cmocka_unit_test(test_chat_zero_values_are_present),
        cmocka_unit_test(test_chat_max_tokens_alias),
        cmocka_unit_test(test_chat_deadlines),
        cmocka_unit_test(test_bad_ctx),
        cmocka_unit_test(test_completion_single),
        cmocka_unit_test(test_completion_fanout),
        cmocka_unit_test(test_bad_requests),
        cmocka_unit_test(test_type_error_wording),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_nesting),
        cmocka_unit_test(test_many_messages),
        cmocka_unit_test(test_long_strings),
        cmocka_unit_test(test_mutated_bodies),
        cmocka_unit_test(test_invalid_json_detail),
        cmocka_unit_test(test_nesting_after_syntax_error),
        cmocka_unit_test(test_raw_nul_after_number_refused),
        cmocka_unit_test(test_escapes_reach_the_request),
        cmocka_unit_test(test_big_body),
        cmocka_unit_test(test_error_constructors),
        cmocka_unit_test(test_acc_chat),
        cmocka_unit_test(test_acc_direct_matches_reference),
        cmocka_unit_test(test_stream_direct_matches_reference),
        cmocka_unit_test(test_acc_retry_restarts),
        cmocka_unit_test(test_acc_engine_error),
        cmocka_unit_test(test_acc_bad_chunks),
        cmocka_unit_test(test_acc_completion_fanout),
        cmocka_unit_test(test_acc_invalid_utf8_text),
        cmocka_unit_test(test_stream_chat),
        cmocka_unit_test(test_stream_logprobs_n2_no_usage),
        cmocka_unit_test(test_stream_retry_dedup),
        cmocka_unit_test(test_stream_retry_logprobs),
        cmocka_unit_test(test_stream_retry_diverged),
        cmocka_unit_test(test_stream_errors),
        cmocka_unit_test(test_stream_completion_fanout),
        cmocka_unit_test(test_resp_from_request),
        cmocka_unit_test(test_models),
        cmocka_unit_test(test_sse_framing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

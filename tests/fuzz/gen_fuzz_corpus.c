/*
 * gen_fuzz_corpus: writes the generated seed files of the fuzz corpora, so the binary
 * seeds can be rebuilt after a wire change rather than edited by hand:
 *     gen_fuzz_corpus tests/fuzz/corpus
 * writes proto/seed-*, openai/seed-* and tokenizer/seed-* under that directory (the
 * directories must exist). Each file starts with the selector byte its target reads
 * (see the top of fuzz_proto.c, fuzz_openai.c, fuzz_tokenizer.c). Seeds that libFuzzer
 * found (named by their SHA-1) are kept beside these and never rewritten.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pw_proto.h"

static const char *out_dir;

static void put(const char *sub, const char *name, uint8_t sel, const void *data, size_t len)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s/seed-%s", out_dir, sub, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(&sel, 1, 1, f) != 1 || (len && fwrite(data, 1, len, f) != len) ||
        fclose(f) != 0) {
        fprintf(stderr, "gen_fuzz_corpus: cannot write %s\n", path);
        exit(1);
    }
}

static void fail(const char *why)
{
    fprintf(stderr, "gen_fuzz_corpus: an example does not encode: %s\n", why ? why : "?");
    exit(1);
}

static void put_str(const char *sub, const char *name, uint8_t sel, const char *s)
{
    put(sub, name, sel, s, strlen(s));
}

/* ---- proto -------------------------------------------------------------------------- */

static Parkway__InferenceRequest *example_request(Parkway__InferenceRequest *r,
                                                  Parkway__SamplingParams *sp,
                                                  Parkway__ChatMessage *m,
                                                  Parkway__ChatMessage **mp, char **stop)
{
    parkway__inference_request__init(r);
    parkway__sampling_params__init(sp);
    parkway__chat_message__init(&m[0]);
    parkway__chat_message__init(&m[1]);
    m[0].role = "system";
    m[0].content = "You are terse.";
    m[1].role = "user";
    m[1].content = "Hello \xC3\xA9\xE4\xB8\xAD";
    m[1].name = "ann";
    mp[0] = &m[0];
    mp[1] = &m[1];
    stop[0] = "\n\n";
    stop[1] = "END";
    r->id = "req1";
    r->function = "smol";
    r->tenant = "acme";
    r->key_id = "key_1a2b3c4d";
    r->kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_CHAT;
    r->n_messages = 2;
    r->messages = mp;
    r->reply_to = "pw:reply:r1";
    r->deadline_unix_ms = 1700000060000LL;
    r->enqueued_unix_ms = 1700000000000LL;
    r->stream = true;
    r->include_usage = true;
    sp->present = PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_MAX_TOKENS |
                  PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TEMPERATURE |
                  PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_N |
                  PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_TOP_LOGPROBS |
                  PARKWAY__SAMPLING_FIELD__SAMPLING_FIELD_SEED;
    sp->max_tokens = 64;
    sp->temperature = 0.7f;
    sp->n = 2;
    sp->seed = 42;
    sp->logprobs = true;
    sp->top_logprobs = 2;
    sp->n_stop = 2;
    sp->stop = stop;
    r->sampling = sp;
    return r;
}

static void gen_proto(void)
{
    uint8_t *buf;
    size_t len;
    const char *why;

    Parkway__InferenceRequest r;
    Parkway__SamplingParams sp;
    Parkway__ChatMessage m[2], *mp[2];
    char *stop[2];
    example_request(&r, &sp, m, mp, stop);
    if (pw_proto_pack_request_alloc(&r, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "request-chat", 0, buf, len);
    free(buf);

    uint32_t toks[5] = {1, 2, 3, 50000, 7};
    r.kind = PARKWAY__REQUEST_KIND__REQUEST_KIND_COMPLETION;
    r.n_messages = 0;
    r.messages = NULL;
    r.prompt = "Once upon a time";
    r.sampling = NULL;
    if (pw_proto_pack_request_alloc(&r, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "request-completion-text", 0, buf, len);
    free(buf);
    r.sampling = &sp;
    r.prompt = "";
    r.n_prompt_token_ids = 5;
    r.prompt_token_ids = toks;
    r.echo = true;
    r.batch_id = "batch_1";
    r.custom_id = "line-7";
    r.attempt = 2;
    if (pw_proto_pack_request_alloc(&r, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "request-completion", 0, buf, len);
    free(buf);

    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    Parkway__Usage u = PARKWAY__USAGE__INIT;
    Parkway__Error e = PARKWAY__ERROR__INIT;
    Parkway__TokenLogprob lp = PARKWAY__TOKEN_LOGPROB__INIT, *lpp = &lp;
    Parkway__TopLogprob top = PARKWAY__TOP_LOGPROB__INIT, *topp = &top;
    top.token = "alt";
    top.logprob = -2.5f;
    top.bytes.data = (uint8_t *)"alt";
    top.bytes.len = 3;
    lp.token = "Hi";
    lp.logprob = -0.25f;
    lp.bytes.data = (uint8_t *)"Hi";
    lp.bytes.len = 2;
    lp.n_top_logprobs = 1;
    lp.top_logprobs = &topp;
    u.prompt_tokens = 12;
    u.completion_tokens = 3;
    u.cached_tokens = 4;
    c.request_id = "req1";
    c.text = "Hi";
    c.n_logprobs = 1;
    c.logprobs = &lpp;
    c.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_STOP;
    c.done = true;
    c.usage = &u;
    c.worker_id = "w1";
    c.queue_ms = 5;
    c.first_token_ms = 20;
    c.n_tokens = 1;
    if (pw_proto_pack_reply_alloc(&c, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "reply", 1, buf, len);
    free(buf);
    e.code = "context_length_exceeded";
    e.message = "too long";
    e.http_status = 400;
    c.error = &e;
    c.finish_reason = PARKWAY__FINISH_REASON__FINISH_REASON_ERROR;
    c.n_logprobs = 0;
    c.text = "";
    if (pw_proto_pack_reply_alloc(&c, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "reply-error", 1, buf, len);
    free(buf);

    Parkway__WorkerStatus w = PARKWAY__WORKER_STATUS__INIT;
    w.worker_id = "w1";
    w.function = "smol";
    w.state = PARKWAY__WORKER_STATE__WORKER_STATE_READY;
    w.slots_total = 8;
    w.slots_busy = 3;
    w.tokens_per_s = 120.5f;
    w.kv_blocks_total = 1024;
    w.kv_blocks_free = 512;
    w.last_heartbeat_unix_ms = 1700000000000LL;
    w.started_unix_ms = 1699999000000LL;
    w.pid = 4242;
    w.host = "gpu-1";
    w.backend = "cuda";
    w.model_sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    w.requests_done = 99;
    w.tokens_generated = 123456;
    w.context_len = 8192;
    if (pw_proto_pack_worker_alloc(&w, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "worker", 2, buf, len);
    free(buf);

    Parkway__KeyRecord k = PARKWAY__KEY_RECORD__INIT;
    char *fns[2] = {"smol", "big-7b"};
    k.key_id = "key_1a2b3c4d";
    k.tenant = "acme";
    k.name = "ci key";
    k.n_allowed_functions = 2;
    k.allowed_functions = fns;
    k.rpm_limit = 60;
    k.tpm_limit = 100000;
    k.created_unix_ms = 1700000000000LL;
    k.expires_unix_ms = 1800000000000LL;
    if (pw_proto_pack_key_alloc(&k, &buf, &len, &why) != PW_OK)
        fail(why);
    put("proto", "key", 3, buf, len);
    free(buf);
    for (uint8_t s = 0; s < 4; s++) {
        char name[16];
        snprintf(name, sizeof(name), "empty-%u", s);
        put("proto", name, s, NULL, 0);
    }
}

/* ---- openai ------------------------------------------------------------------------- */

struct stream {
    uint8_t data[8192];
    size_t len;
};

static void add_chunk(struct stream *s, const char *id, uint32_t attempt, uint32_t seq,
                      uint32_t index, const char *text, Parkway__FinishReason fr, bool done,
                      bool with_lp, bool with_err)
{
    Parkway__ReplyChunk c = PARKWAY__REPLY_CHUNK__INIT;
    Parkway__Usage u = PARKWAY__USAGE__INIT;
    Parkway__Error e = PARKWAY__ERROR__INIT;
    Parkway__TokenLogprob lp = PARKWAY__TOKEN_LOGPROB__INIT, *lpp = &lp;
    Parkway__TopLogprob top = PARKWAY__TOP_LOGPROB__INIT, *topp = &top;
    c.request_id = (char *)id;
    c.attempt = attempt;
    c.seq = seq;
    c.index = index;
    c.text = (char *)text;
    c.finish_reason = fr;
    c.done = done;
    if (done) {
        u.prompt_tokens = 5;
        u.completion_tokens = 7;
        c.usage = &u;
    }
    if (with_lp) {
        top.token = "x";
        top.logprob = -3.0f;
        top.bytes.data = (uint8_t *)"x";
        top.bytes.len = 1;
        lp.token = (char *)text;
        lp.logprob = -0.5f;
        lp.bytes.data = (uint8_t *)text;
        lp.bytes.len = strlen(text);
        lp.n_top_logprobs = 1;
        lp.top_logprobs = &topp;
        c.n_logprobs = 1;
        c.logprobs = &lpp;
    }
    if (with_err) {
        e.code = "server_error";
        e.message = "engine crashed";
        e.http_status = 500;
        c.error = &e;
    }
    size_t len;
    const char *why;
    if (pw_proto_pack_reply(&c, s->data + s->len + 2, sizeof(s->data) - s->len - 2, &len, &why) !=
        PW_OK) {
        fprintf(stderr, "gen_fuzz_corpus: chunk: %s\n", why ? why : "?");
        exit(1);
    }
    s->data[s->len] = (uint8_t)(len & 0xff);
    s->data[s->len + 1] = (uint8_t)(len >> 8);
    s->len += len + 2;
}

#define FR(x) PARKWAY__FINISH_REASON__FINISH_REASON_##x

static void gen_openai(void)
{
    static const char *const chats[] = {
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}",
        ("{\"model\":\"smol\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
         "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":\"text\","
         "\"text\":\"b\"}],\"name\":\"ann\"},{\"role\":\"assistant\",\"content\":null}],"
         "\"temperature\":0.2,\"top_p\":0.9,\"max_tokens\":32,\"n\":2,\"stop\":[\"\\n\",\"END\"],"
         "\"seed\":7,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
         "\"logprobs\":true,\"top_logprobs\":3,\"presence_penalty\":0.5,"
         "\"frequency_penalty\":-0.5,\"user\":\"u1\"}"),
        ("{\"model\":\"smol\",\"messages\":[{\"role\":\"developer\",\"content\":\"x\"},{\"role\":"
         "\"user\",\"content\":\"\\u00e9\\ud83d\\ude00\"}],\"max_completion_tokens\":5,"
         "\"stop\":\"x\",\"response_format\":{\"type\":\"text\"},\"top_k\":40,\"min_p\":0.05,"
         "\"repetition_penalty\":1.1,\"ignore_eos\":false}"),
        "{\"model\":\"secret\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}",
        "{\"model\":\"nope\",\"messages\":[]}",
        "{\"model\":\"smol\",\"messages\":[{\"role\":\"tool\",\"content\":\"1\"}],\"tools\":[]}",
        "{\"model\":\"smol\",\"model\":\"x\"}",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]",
        ("{\"model\":\"smol\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],"
         "\"temperature\":1e400,\"n\":99999999999999999999,\"logit_bias\":{\"1\":2}}"),
    };
    static const char *const cmpls[] = {
        "{\"model\":\"smol\",\"prompt\":\"Once upon\"}",
        ("{\"model\":\"smol\",\"prompt\":[\"a\",\"b\",\"c\"],\"n\":2,\"echo\":true,"
         "\"logprobs\":2,\"max_tokens\":8,\"stream\":true,\"suffix\":null}"),
        "{\"model\":\"smol\",\"prompt\":[1,2,3,50000],\"best_of\":1}",
        "{\"model\":\"smol\",\"prompt\":[[1,2],[3]],\"stop\":[\"a\",\"b\",\"c\",\"d\"]}",
        "{\"model\":\"smol\",\"prompt\":\"\",\"max_tokens\":0,\"temperature\":0}",
    };
    char name[32];
    for (size_t i = 0; i < sizeof(chats) / sizeof(chats[0]); i++) {
        snprintf(name, sizeof(name), "chat-%zu", i);
        put_str("openai", name, 0, chats[i]);
    }
    for (size_t i = 0; i < sizeof(cmpls) / sizeof(cmpls[0]); i++) {
        snprintf(name, sizeof(name), "completion-%zu", i);
        put_str("openai", name, 1, cmpls[i]);
    }

    /* Reply streams; the second byte is the response shape (see reply_stream()). */
    struct stream s;
    /* chat, n 1, one part, no logprobs: two chunks then done. */
    s.data[0] = 0x00;
    s.len = 1;
    add_chunk(&s, "req1", 0, 0, 0, "Hel", FR(NONE), false, false, false);
    add_chunk(&s, "req1", 0, 1, 0, "lo \xC3\xA9", FR(STOP), true, false, false);
    put("openai", "stream-chat", 2, s.data, s.len);
    /* completion, n 2, logprobs, usage; attempt 0 dies, attempt 1 repeats and finishes. */
    s.data[0] = 0x01 | (1u << 1) | (1u << 5) | (1u << 6);
    s.len = 1;
    add_chunk(&s, "req1", 0, 0, 0, "A", FR(NONE), false, true, false);
    add_chunk(&s, "req1", 0, 1, 1, "B", FR(NONE), false, true, false);
    add_chunk(&s, "req1", 1, 0, 0, "A", FR(NONE), false, true, false);
    add_chunk(&s, "req1", 1, 0, 0, "A", FR(NONE), false, true, false);
    add_chunk(&s, "req1", 1, 1, 0, "C", FR(LENGTH), false, true, false);
    add_chunk(&s, "req1", 1, 2, 1, "BD", FR(STOP), true, true, false);
    put("openai", "stream-retry", 3, s.data, s.len);
    /* chat, three parts, one fails with an error. */
    s.data[0] = (2u << 3) | 0x80;
    s.len = 1;
    add_chunk(&s, "req1.0", 0, 0, 0, "x", FR(STOP), true, false, false);
    add_chunk(&s, "req1.1", 0, 0, 0, "", FR(ERROR), true, false, true);
    add_chunk(&s, "req1.2", 0, 0, 0, "z", FR(CANCELLED), true, false, false);
    add_chunk(&s, "other", 0, 0, 0, "z", FR(STOP), true, false, false);
    add_chunk(&s, "req1.2", 0, 0, 5, "z", FR(STOP), true, false, false);
    put("openai", "stream-parts", 2, s.data, s.len);
}

/* ---- tokenizer ---------------------------------------------------------------------- */

static void gen_tokenizer(void)
{
    static const char *const texts[] = {
        "hello world",
        " the thing's 2024 caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\x80!\n\n  x",
        "<|im_start|>user\nHi<|end|>\n<u> <s></s><unk>",
        "\xFF\xFE\xC3\x28\xE2\x82\xF0\x9F\x98\xED\xA0\x80 \xC0\xAF",
        "12345678901234567890 I'M you'LL",
        "a\x01\x62\x01\x01 c",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "",
    };
    /* Selector bytes: tokenizer (0..5), then flags in bits 3..6. */
    static const uint8_t sels[] = {
        0, 1, 2, 3, 4, 5, 0x08 | 0x20, 0x0C | 0x20, 0x10 | 0x02, 0x40, 0x44 | 0x20, 0x18 | 0x21};
    char name[32];
    for (size_t t = 0; t < sizeof(texts) / sizeof(texts[0]); t++) {
        for (size_t k = 0; k < sizeof(sels) / sizeof(sels[0]); k++) {
            if ((t + k) % 3 != 0 && t != 1)
                continue;
            snprintf(name, sizeof(name), "text-%zu-%02x", t, sels[k]);
            put_str("tokenizer", name, sels[k], texts[t]);
        }
    }
    /* Vocabularies from the input (tokenizers 6: BPE, 7: SPM). */
    static const char bpe_vocab[] = "\x01he\n\x01ll\n\x01hell\n\x03<|end|>\n\x04<u>\n"
                                    "\xFEh e\n\xFEl l\n\xFEhe ll\n\xFE\xC4\xA0 h\n\x01\xC4\xA0h\n"
                                    "\xFEx y\n\x06<0x41>";
    static const char spm_vocab[] = "\x02<unk>\n\x03<s>\n\x03</s>\n\x06<0x41>\n\x06<0xE4>\n"
                                    "\x06<0xB8>\n\x06<0xAD>\n\x01\xE2\x96\x81\n\x01h\n\x01e\n"
                                    "\x01l\n\x01o\n\x01\xE2\x96\x81h\n\x01ll\n"
                                    "\x01\xE2\x96\x81hello\n\x04<u>\n\x05x";
    put("tokenizer", "vocab-bpe", 6, bpe_vocab, sizeof(bpe_vocab) - 1);
    put("tokenizer", "vocab-bpe-special", 6 | 0x08 | 0x20, bpe_vocab, sizeof(bpe_vocab) - 1);
    put("tokenizer", "vocab-spm", 7, spm_vocab, sizeof(spm_vocab) - 1);
    put("tokenizer", "vocab-spm-special", 7 | 0x18, spm_vocab, sizeof(spm_vocab) - 1);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: gen_fuzz_corpus CORPUS_DIR\n");
        return 2;
    }
    out_dir = argv[1];
    gen_proto();
    gen_openai();
    gen_tokenizer();
    return 0;
}

/*
 * pw_test_stack: the test playing the router against real scalers and engines. It queues
 * InferenceRequests as a router would (XADD to pw:{fn}:q, PUBLISH pw:wake), waits for their
 * done ReplyChunk, reads pw:events and starts parkway-scaler.
 *
 * Every function takes the test's own synchronous hiredis connection; none keeps it.
 * Protocol failures fail the cmocka test. Single-threaded test helpers.
 */
#ifndef PW_TEST_STACK_H
#define PW_TEST_STACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct redisContext;

/* A completion request as the scaler tests send it: prompt tokens 1 2 3 4, temperature 0. */
struct pw_test_request {
    const char *fn;       /* function; borrowed */
    const char *id;       /* request id; borrowed */
    const char *reply_to; /* reply stream; borrowed */
    uint32_t max_tokens;
    bool ignore_eos; /* generate all max_tokens */
};

/* Packs q, XADDs it to pw:{fn}:q and publishes fn on pw:wake. */
void pw_test_enqueue(struct redisContext *rc, const struct pw_test_request *q);

/* Where pw_test_wait_done goes on reading a reply stream. A zeroed one starts at the
 * beginning of the stream. */
struct pw_test_cursor {
    char id[64]; /* last stream entry id read; "" = none yet */
};

/*
 * Reads stream from cur on until the done chunk of request id arrives; fails the test on an
 * error chunk for id. Returns the ms waited, or -1 after timeout_ms.
 */
int64_t pw_test_wait_done(struct redisContext *rc, const char *stream, struct pw_test_cursor *cur,
                          const char *id, int timeout_ms);

/* pw:events entries whose action is action and, unless sub is NULL, whose reason contains
 * sub. */
size_t pw_test_count_events(struct redisContext *rc, const char *action, const char *sub);

/* Polls pw_test_count_events until it reaches at_least; false after timeout_ms. */
bool pw_test_wait_event(struct redisContext *rc, const char *action, const char *sub,
                        size_t at_least, int timeout_ms);

/* HLEN key, or -1. */
long long pw_test_hlen(struct redisContext *rc, const char *key);

/*
 * Starts the scaler at exe (PW_TEST_SCALER_BIN) on redis_url with the specs in
 * <dir>/functions, a 100 ms tick and the extra flags (NULL-terminated, at most 16), its
 * output appended to <dir>/scaler.log. SIGTERM reaches it if the test dies, so it stops
 * its engines. Returns the pid.
 */
pid_t pw_test_scaler_start(const char *exe, const char *redis_url, const char *dir,
                           const char *const extra[]);

/*
 * The scaler tests' function: <dir>/tiny.gguf generated with gen (PW_TEST_GGUF_GEN_BIN,
 * tiny shape, Q8_0) and its spec <dir>/functions/tiny.yaml (scale from zero, one replica,
 * 1 s idle then park, 4 slots, 128-token context) with pricing.max_price_per_hour set to
 * max_price (a decimal, e.g. "0" for free machines only). Fails the test on an error.
 */
void pw_test_tiny_function(const char *gen, const char *dir, const char *max_price);

#endif

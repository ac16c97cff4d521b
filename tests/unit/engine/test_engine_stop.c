/*
 * Unit tests for engine_stop: hand-picked tricky cases, every split of short strings into
 * pieces, UTF-8 stops, and a randomized comparison against a non-streaming reference that
 * finds the earliest-ending stop in the whole text.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine_stop.h"

#define MAX_TEXT 4096

/* What a streaming run produced. */
struct run {
    char text[MAX_TEXT];
    size_t len;
    int stop_index; /* -1: no stop (then text includes the flush) */
};

static void append(struct run *r, const char *p, size_t n)
{
    assert_true(r->len + n <= MAX_TEXT);
    if (n > 0)
        memcpy(r->text + r->len, p, n);
    r->len += n;
}

static void append_emit(struct run *r, const struct engine_stop_emit *e)
{
    append(r, e->held, e->held_len);
    append(r, e->text, e->text_len);
}

/* Longest suffix of s[0..n) that is a proper prefix of some stop. */
static size_t ref_held(const char *s, size_t n, const char *const *stops, int n_stops)
{
    size_t best = 0;
    for (int i = 0; i < n_stops; i++) {
        size_t sl = strlen(stops[i]);
        for (size_t k = sl - 1; k > best; k--)
            if (k <= n && memcmp(s + n - k, stops[i], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

/*
 * Reference: the stop that ends first in the text (longest on a tie); out gets the text
 * before it, or the whole text.
 */
static void reference(const char *s, size_t n, const char *const *stops, int n_stops,
                      struct run *out)
{
    memset(out, 0, sizeof(*out));
    out->stop_index = -1;
    for (size_t e = 1; e <= n; e++) {
        int best = -1;
        size_t best_len = 0;
        for (int i = 0; i < n_stops; i++) {
            size_t sl = strlen(stops[i]);
            if (sl <= e && memcmp(s + e - sl, stops[i], sl) == 0 && sl > best_len) {
                best = i;
                best_len = sl;
            }
        }
        if (best >= 0) {
            append(out, s, e - best_len);
            out->stop_index = best;
            return;
        }
    }
    append(out, s, n);
}

/*
 * Streams s cut at the given cut points (ascending, in (0, n)) and checks after every feed
 * that emitted + held == stream and that exactly the maximal stop-prefix suffix is held.
 */
static void stream(const char *s, size_t n, const size_t *cuts, size_t n_cuts,
                   const char *const *stops, int n_stops, struct run *out)
{
    struct engine_stop m;
    struct engine_stop_str ss[ENGINE_STOP_MAX_STOPS];
    for (int i = 0; i < n_stops; i++)
        ss[i] = (struct engine_stop_str){stops[i], strlen(stops[i])};
    assert_int_equal(engine_stop_init(&m, ss, (size_t)n_stops, NULL, 0), PW_OK);

    memset(out, 0, sizeof(*out));
    out->stop_index = -1;
    size_t pos = 0;
    struct engine_stop_emit e;
    for (size_t c = 0; c <= n_cuts; c++) {
        size_t end = c < n_cuts ? cuts[c] : n;
        engine_stop_feed(&m, s + pos, end - pos, &e);
        append_emit(out, &e);
        pos = end;
        if (e.stopped) {
            out->stop_index = e.stop_index;
            break;
        }
        assert_int_equal(e.stop_index, -1);
        /* Nothing is held that could not start a stop, and what is held is the stream's
         * tail. */
        size_t held = engine_stop_held(&m);
        assert_int_equal(out->len + held, pos);
        assert_memory_equal(out->text, s, out->len);
        assert_int_equal(held, ref_held(s, pos, stops, n_stops));
    }
    if (out->stop_index < 0) {
        engine_stop_flush(&m, &e);
        assert_false(e.stopped);
        append_emit(out, &e);
        assert_int_equal(engine_stop_held(&m), 0);
    } else {
        /* Sticky: nothing more comes out. */
        engine_stop_feed(&m, "more", 4, &e);
        assert_true(e.stopped);
        assert_int_equal(e.held_len + e.text_len, 0);
        engine_stop_flush(&m, &e);
        assert_int_equal(e.held_len + e.text_len, 0);
    }
}

static void check_cuts(const char *s, const size_t *cuts, size_t n_cuts, const char *const *stops,
                       int n_stops)
{
    struct run got, want;
    size_t n = strlen(s);
    reference(s, n, stops, n_stops, &want);
    stream(s, n, cuts, n_cuts, stops, n_stops, &got);
    if (got.stop_index != want.stop_index || got.len != want.len ||
        memcmp(got.text, want.text, got.len) != 0) {
        fprintf(stderr, "mismatch for \"%s\" cuts:", s);
        for (size_t i = 0; i < n_cuts; i++)
            fprintf(stderr, " %zu", cuts[i]);
        fprintf(stderr, " got \"%.*s\" (%d) want \"%.*s\" (%d)\n", (int)got.len, got.text,
                got.stop_index, (int)want.len, want.text, want.stop_index);
        fail();
    }
}

/* Every way to cut s into pieces (2^(n-1) of them), skipping cuts inside a UTF-8 char. */
static void check_all_splits(const char *s, const char *const *stops, int n_stops)
{
    size_t n = strlen(s);
    assert_true(n >= 1 && n <= 16);
    size_t cuts[16];
    for (uint32_t mask = 0; mask < (1u << (n - 1)); mask++) {
        size_t nc = 0;
        bool ok = true;
        for (size_t b = 0; b + 1 < n; b++) {
            if (mask & (1u << b)) {
                if (((unsigned char)s[b + 1] & 0xC0) == 0x80) {
                    ok = false;
                    break;
                }
                cuts[nc++] = b + 1;
            }
        }
        if (ok)
            check_cuts(s, cuts, nc, stops, n_stops);
    }
}

static void test_overlapping_partial(void **state)
{
    (void)state;
    const char *stops[] = {"abc"};
    size_t cuts[] = {3};
    check_cuts("aabc", cuts, 1, stops, 1); /* "aab" + "c" */

    struct engine_stop m;
    struct engine_stop_str ss = {"abc", 3};
    struct engine_stop_emit e;
    assert_int_equal(engine_stop_init(&m, &ss, 1, NULL, 0), PW_OK);
    engine_stop_feed(&m, "aab", 3, &e);
    assert_int_equal(e.held_len, 0);
    assert_int_equal(e.text_len, 1);
    assert_memory_equal(e.text, "a", 1);
    assert_int_equal(engine_stop_held(&m), 2);
    engine_stop_feed(&m, "c", 1, &e);
    assert_true(e.stopped);
    assert_int_equal(e.stop_index, 0);
    assert_int_equal(e.held_len + e.text_len, 0);

    check_all_splits("xxaabababcab", stops, 1);
    const char *s2[] = {"abab"};
    check_all_splits("abababx", s2, 1);
    check_all_splits("aabaababab", s2, 1);
}

static void test_every_split(void **state)
{
    (void)state;
    const char *stops[] = {"STOP", "\n\n"};
    check_all_splits("hi ST STOP x", stops, 2);
    check_all_splits("a\nb\n\nc", stops, 2);
    check_all_splits("SSTSTOSTOP", stops, 2);
    check_all_splits("no stop here", stops, 2);
}

static void test_stop_at_start(void **state)
{
    (void)state;
    const char *stops[] = {"User:"};
    check_all_splits("User: hello", stops, 1);
    struct engine_stop m;
    struct engine_stop_str ss = {"User:", 5};
    struct engine_stop_emit e;
    assert_int_equal(engine_stop_init(&m, &ss, 1, NULL, 0), PW_OK);
    engine_stop_feed(&m, "User:", 5, &e);
    assert_true(e.stopped);
    assert_int_equal(e.held_len + e.text_len, 0);
}

static void test_prefix_stops(void **state)
{
    (void)state;
    /* "ab" completes before "abc": it wins. */
    const char *a[] = {"abc", "ab"};
    check_all_splits("xabcd", a, 2);
    struct run r;
    size_t none = 0;
    stream("xabcd", 5, &none, 0, a, 2, &r);
    assert_int_equal(r.stop_index, 1);
    assert_int_equal(r.len, 1);

    /* "abc" and "bc" end on the same byte: the longer one wins. */
    const char *b[] = {"bc", "abc"};
    stream("zabc", 4, &none, 0, b, 2, &r);
    assert_int_equal(r.stop_index, 1);
    assert_int_equal(r.len, 1);
    check_all_splits("zabcq", b, 2);

    /* "bc" inside the longer "abcd" completes first. */
    const char *c[] = {"abcd", "bc"};
    stream("abcd", 4, &none, 0, c, 2, &r);
    assert_int_equal(r.stop_index, 1);
    assert_int_equal(r.len, 1);
    check_all_splits("aabcdabc", c, 2);

    /* Same stop twice, and a stop that is a prefix of itself repeated. */
    const char *d[] = {"aa", "aa", "aaa", "a b"};
    check_all_splits("b a a baab", d, 4);
}

static void test_utf8(void **state)
{
    (void)state;
    /* "終わり" and "é!" as stops; pieces are cut only between characters. */
    const char *stops[] = {"\xe7\xb5\x82\xe3\x82\x8f\xe3\x82\x8a", "\xc3\xa9!"};
    check_all_splits("a\xe7\xb5\x82\xc3\xa9\xe7\xb5\x82\xe3\x82\x8f", stops, 2);
    check_all_splits("\xc3\xa9\xc3\xa9!x", stops, 2);
    check_all_splits("x\xe7\xb5\x82\xe3\x82\x8f\xe3\x82\x8a", stops, 2);
    /* A 4-byte emoji stop. */
    const char *emoji[] = {"\xf0\x9f\x98\x80"};
    check_all_splits("ab\xf0\x9f\x98\x80"
                     "cd",
                     emoji, 1);

    /* Emitted text is always whole characters: a held prefix starts on a lead byte. */
    struct engine_stop m;
    struct engine_stop_str ss = {stops[0], strlen(stops[0])};
    struct engine_stop_emit e;
    assert_int_equal(engine_stop_init(&m, &ss, 1, NULL, 0), PW_OK);
    engine_stop_feed(&m, "x\xe7\xb5\x82", 4, &e);
    assert_int_equal(e.text_len, 1);
    assert_int_equal(engine_stop_held(&m), 3);
    engine_stop_feed(&m, "\xc3\xa9", 2, &e);
    assert_int_equal(e.held_len, 3);
    assert_memory_equal(e.held, "\xe7\xb5\x82", 3);
    assert_int_equal(e.text_len, 2);
}

static void test_no_stops(void **state)
{
    (void)state;
    struct engine_stop m;
    struct engine_stop_emit e;
    assert_int_equal(engine_stop_init(&m, NULL, 0, NULL, 0), PW_OK);
    engine_stop_feed(&m, "hello", 5, &e);
    assert_int_equal(e.text_len, 5);
    assert_false(e.stopped);
    assert_int_equal(e.stop_index, -1);
    engine_stop_feed(&m, NULL, 0, &e);
    assert_int_equal(e.text_len + e.held_len, 0);
    engine_stop_flush(&m, &e);
    assert_int_equal(e.text_len + e.held_len, 0);
    const char *none[] = {"zz"};
    check_all_splits("plain text", none, 0);
}

static void test_flush_and_reset(void **state)
{
    (void)state;
    struct engine_stop m;
    struct engine_stop_str ss = {"###", 3};
    struct engine_stop_emit e;
    assert_int_equal(engine_stop_init(&m, &ss, 1, NULL, 0), PW_OK);
    engine_stop_feed(&m, "x#", 2, &e);
    assert_int_equal(e.text_len, 1);
    engine_stop_feed(&m, "#", 1, &e);
    assert_int_equal(e.text_len + e.held_len, 0);
    assert_int_equal(engine_stop_held(&m), 2);
    engine_stop_feed(&m, "", 0, &e);
    assert_int_equal(engine_stop_held(&m), 2);
    engine_stop_flush(&m, &e);
    assert_int_equal(e.held_len, 2);
    assert_memory_equal(e.held, "##", 2);
    assert_false(e.stopped);

    engine_stop_feed(&m, "##", 2, &e);
    engine_stop_feed(&m, "#", 1, &e);
    assert_true(e.stopped);
    engine_stop_reset(&m);
    engine_stop_feed(&m, "ok", 2, &e);
    assert_false(e.stopped);
    assert_int_equal(e.text_len, 2);
}

static void test_validation(void **state)
{
    (void)state;
    struct engine_stop m;
    char err[128];
    struct engine_stop_str five[5] = {{"a", 1}, {"b", 1}, {"c", 1}, {"d", 1}, {"e", 1}};
    assert_int_equal(engine_stop_init(&m, five, 5, err, sizeof(err)), PW_ERR_INVAL);
    assert_non_null(strstr(err, "at most 4"));

    struct engine_stop_str empty[2] = {{"a", 1}, {"", 0}};
    assert_int_equal(engine_stop_init(&m, empty, 2, err, sizeof(err)), PW_ERR_INVAL);
    assert_non_null(strstr(err, "stop[1] is empty"));

    static char big[ENGINE_STOP_MAX_BYTES + 1];
    memset(big, 'x', sizeof(big));
    struct engine_stop_str longs = {big, sizeof(big)};
    assert_int_equal(engine_stop_init(&m, &longs, 1, err, sizeof(err)), PW_ERR_INVAL);
    assert_non_null(strstr(err, "too long"));
    longs.len = ENGINE_STOP_MAX_BYTES;
    assert_int_equal(engine_stop_init(&m, &longs, 1, err, sizeof(err)), PW_OK);

    const char *bad[] = {"\xff", "\xc3", "\xc0\x80", "\xed\xa0\x80", "\xf4\x90\x80\x80"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct engine_stop_str b = {bad[i], strlen(bad[i])};
        assert_int_equal(engine_stop_init(&m, &b, 1, err, sizeof(err)), PW_ERR_INVAL);
        assert_non_null(strstr(err, "UTF-8"));
    }
}

/* A long stop and a long held-back tail crossing many one-byte pieces. */
static void test_long_stop(void **state)
{
    (void)state;
    static char stop[ENGINE_STOP_MAX_BYTES + 1];
    static char text[3 * ENGINE_STOP_MAX_BYTES];
    memset(stop, 'a', ENGINE_STOP_MAX_BYTES);
    stop[ENGINE_STOP_MAX_BYTES - 1] = 'b';
    size_t n = 0;
    memset(text, 'a', 2 * ENGINE_STOP_MAX_BYTES);
    n = 2 * ENGINE_STOP_MAX_BYTES;
    text[n++] = 'b';
    text[n] = 0;
    const char *stops[] = {stop};
    size_t cuts[3 * ENGINE_STOP_MAX_BYTES];
    size_t nc = 0;
    for (size_t i = 1; i < n; i++)
        cuts[nc++] = i;
    check_cuts(text, cuts, nc, stops, 1);
    check_cuts(text, cuts, 0, stops, 1);
}

static uint64_t rng_state = 0x1234567u;

static uint32_t rnd(uint32_t n)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33) % n;
}

static void test_random_vs_reference(void **state)
{
    (void)state;
    static const char alpha[] = "abc";
    char text[64];
    char stopbuf[ENGINE_STOP_MAX_STOPS][8];
    const char *stops[ENGINE_STOP_MAX_STOPS];
    size_t cuts[64];
    for (int iter = 0; iter < 30000; iter++) {
        int n_stops = (int)rnd(ENGINE_STOP_MAX_STOPS + 1);
        int alen = 2 + (int)rnd(2);
        for (int i = 0; i < n_stops; i++) {
            int l = 1 + (int)rnd(5);
            for (int j = 0; j < l; j++)
                stopbuf[i][j] = alpha[rnd((uint32_t)alen)];
            stopbuf[i][l] = 0;
            stops[i] = stopbuf[i];
        }
        size_t n = rnd(40);
        for (size_t j = 0; j < n; j++)
            text[j] = alpha[rnd((uint32_t)alen)];
        text[n] = 0;
        size_t nc = 0;
        for (size_t j = 1; j < n; j++)
            if (rnd(3) == 0)
                cuts[nc++] = j;
        check_cuts(text, cuts, nc, stops, n_stops);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_overlapping_partial),
        cmocka_unit_test(test_every_split),
        cmocka_unit_test(test_stop_at_start),
        cmocka_unit_test(test_prefix_stops),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_no_stops),
        cmocka_unit_test(test_flush_and_reset),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_long_stop),
        cmocka_unit_test(test_random_vs_reference),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/* Unit tests for engine_kv: block accounting, exhaustion, prefix reuse and eviction. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>

#include "engine_kv.h"

static void fill(int32_t *t, uint32_t n, int32_t base)
{
    for (uint32_t i = 0; i < n; i++)
        t[i] = base + (int32_t)i;
}

static void test_reserve_and_release(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(8, 4, 64, &p), PW_OK);
    struct engine_kv_seq s;
    assert_int_equal(engine_kv_seq_init(p, &s), PW_OK);
    assert_int_equal(engine_kv_seq_blocks_needed(p, &s, 9), 3);
    assert_int_equal(engine_kv_seq_reserve(p, &s, 9), PW_OK);
    assert_int_equal(s.n_blocks, 3);
    assert_int_equal(engine_kv_pool_n_free(p), 5);
    int32_t toks[9];
    fill(toks, 9, 100);
    engine_kv_seq_commit(p, &s, toks, 9);
    assert_int_equal(s.n_tokens, 9);
    assert_int_equal(s.n_hashed, 2);
    /* one more token fits in the third block: no new block */
    assert_int_equal(engine_kv_seq_blocks_needed(p, &s, 3), 0);
    assert_int_equal(engine_kv_seq_reserve(p, &s, 3), PW_OK);
    assert_int_equal(s.n_blocks, 3);
    /* slots map through the table */
    assert_int_equal(engine_kv_seq_slot(&s, 4, 5), s.blocks[1] * 4 + 1);
    engine_kv_seq_deinit(p, &s);
    assert_int_equal(engine_kv_pool_n_free(p), 8);
    engine_kv_pool_destroy(p);
}

static void test_exhaustion_is_again_and_changes_nothing(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(4, 4, 64, &p), PW_OK);
    struct engine_kv_seq a, b;
    engine_kv_seq_init(p, &a);
    engine_kv_seq_init(p, &b);
    assert_int_equal(engine_kv_seq_reserve(p, &a, 12), PW_OK);
    assert_int_equal(engine_kv_seq_reserve(p, &b, 8), PW_ERR_AGAIN);
    assert_int_equal(b.n_blocks, 0);
    assert_int_equal(engine_kv_pool_n_free(p), 1);
    engine_kv_seq_reset(p, &a); /* preemption frees everything */
    assert_int_equal(engine_kv_seq_reserve(p, &b, 8), PW_OK);
    engine_kv_seq_deinit(p, &a);
    engine_kv_seq_deinit(p, &b);
    engine_kv_pool_destroy(p);
}

static void test_sequence_limit(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(64, 4, 10, &p), PW_OK);
    struct engine_kv_seq s;
    engine_kv_seq_init(p, &s);
    assert_int_equal(engine_kv_seq_reserve(p, &s, 12), PW_OK); /* 3 blocks = 12 slots */
    assert_int_equal(engine_kv_seq_reserve(p, &s, 13), PW_ERR_RANGE);
    engine_kv_seq_deinit(p, &s);
    engine_kv_pool_destroy(p);
}

static void test_prefix_reuse_shares_full_blocks(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(16, 4, 64, &p), PW_OK);
    int32_t prompt[14];
    fill(prompt, 14, 7);
    struct engine_kv_seq a, b;
    engine_kv_seq_init(p, &a);
    engine_kv_seq_init(p, &b);
    uint32_t cached;
    engine_kv_seq_match_prefix(p, &a, prompt, 14, &cached);
    assert_int_equal(cached, 0);
    assert_int_equal(engine_kv_seq_reserve(p, &a, 14), PW_OK);
    engine_kv_seq_commit(p, &a, prompt, 14);

    /* same prompt: 3 full blocks (12 tokens) are reused, the rest is computed */
    engine_kv_seq_match_prefix(p, &b, prompt, 14, &cached);
    assert_int_equal(cached, 12);
    assert_int_equal(b.n_tokens, 12);
    for (int i = 0; i < 3; i++)
        assert_int_equal(b.blocks[i], a.blocks[i]);
    assert_int_equal(engine_kv_seq_reserve(p, &b, 2), PW_OK);
    assert_int_not_equal(b.blocks[3], a.blocks[3]);
    engine_kv_seq_deinit(p, &b);

    /* a prompt of exactly 12 tokens reuses only 2 blocks: the last token needs logits */
    engine_kv_seq_init(p, &b);
    engine_kv_seq_match_prefix(p, &b, prompt, 12, &cached);
    assert_int_equal(cached, 8);
    engine_kv_seq_deinit(p, &b);

    /* a prompt diverging in block 2 reuses blocks 0 and 1 only */
    int32_t other[14];
    fill(other, 14, 7);
    other[9] = 999;
    engine_kv_seq_init(p, &b);
    engine_kv_seq_match_prefix(p, &b, other, 14, &cached);
    assert_int_equal(cached, 8);
    engine_kv_seq_deinit(p, &b);

    /* same block contents after a different first block: the chain hash keeps them apart */
    int32_t shifted[14];
    fill(shifted, 14, 7);
    shifted[0] = 1;
    engine_kv_seq_init(p, &b);
    engine_kv_seq_match_prefix(p, &b, shifted, 14, &cached);
    assert_int_equal(cached, 0);
    engine_kv_seq_deinit(p, &b);

    engine_kv_seq_deinit(p, &a);
    engine_kv_pool_destroy(p);
}

static void test_cached_blocks_survive_until_evicted(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(4, 2, 64, &p), PW_OK);
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    struct engine_kv_seq a;
    engine_kv_seq_init(p, &a);
    uint32_t cached;
    engine_kv_seq_match_prefix(p, &a, prompt, 5, &cached);
    engine_kv_seq_reserve(p, &a, 5);
    engine_kv_seq_commit(p, &a, prompt, 5);
    engine_kv_seq_deinit(p, &a); /* request done; its 2 full blocks stay cached */
    assert_int_equal(engine_kv_pool_n_free(p), 4);

    engine_kv_seq_init(p, &a);
    engine_kv_seq_match_prefix(p, &a, prompt, 5, &cached);
    assert_int_equal(cached, 4);
    assert_int_equal(engine_kv_pool_n_free(p), 2);
    engine_kv_seq_deinit(p, &a);

    /* a different request needing every block evicts the cached ones */
    int32_t big[8] = {9, 9, 9, 9, 9, 9, 9, 9};
    engine_kv_seq_init(p, &a);
    assert_int_equal(engine_kv_seq_reserve(p, &a, 8), PW_OK);
    engine_kv_seq_commit(p, &a, big, 8);
    engine_kv_seq_deinit(p, &a);
    engine_kv_seq_init(p, &a);
    engine_kv_seq_match_prefix(p, &a, prompt, 5, &cached);
    assert_int_equal(cached, 0);
    engine_kv_seq_deinit(p, &a);
    assert_true(engine_kv_pool_hit_tokens(p) == 4);
    engine_kv_pool_destroy(p);
}

static void test_empty_blocks_are_taken_before_cached_ones(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(4, 2, 64, &p), PW_OK);
    int32_t prompt[3] = {1, 2, 3};
    struct engine_kv_seq a, b;
    engine_kv_seq_init(p, &a);
    engine_kv_seq_reserve(p, &a, 3);
    engine_kv_seq_commit(p, &a, prompt, 3);
    engine_kv_seq_deinit(p, &a); /* block 0 cached, block 1 partial (not cached) */
    engine_kv_seq_init(p, &b);
    engine_kv_seq_reserve(p, &b, 6); /* takes 3 of 4 blocks: the cached one survives */
    engine_kv_seq_deinit(p, &b);
    uint32_t cached;
    engine_kv_seq_init(p, &a);
    engine_kv_seq_match_prefix(p, &a, prompt, 3, &cached);
    assert_int_equal(cached, 2);
    engine_kv_seq_deinit(p, &a);
    engine_kv_pool_destroy(p);
}

/* Distinct prompts one after another must not walk the whole pool into memory: retained
 * prefixes are capped (a sixteenth of the pool), then the oldest is evicted. */
static void test_retained_prefixes_are_bounded(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(64, 4, 64, &p), PW_OK);
    uint8_t touched[64] = {0};
    for (int r = 0; r < 100; r++) {
        int32_t prompt[12];
        fill(prompt, 12, 1000 * r);
        struct engine_kv_seq s;
        uint32_t cached;
        engine_kv_seq_init(p, &s);
        engine_kv_seq_match_prefix(p, &s, prompt, 12, &cached);
        assert_int_equal(engine_kv_seq_reserve(p, &s, 12 - cached), PW_OK);
        engine_kv_seq_commit(p, &s, prompt, 12);
        for (uint32_t i = 0; i < s.n_blocks; i++)
            touched[s.blocks[i]] = 1;
        engine_kv_seq_deinit(p, &s);
    }
    int n = 0;
    for (int i = 0; i < 64; i++)
        n += touched[i];
    assert_true(n <= 3 + 64 / 8 + 3);
    /* the most recent prompt is still cached */
    int32_t last[12];
    fill(last, 12, 1000 * 99);
    struct engine_kv_seq s;
    uint32_t cached;
    engine_kv_seq_init(p, &s);
    engine_kv_seq_match_prefix(p, &s, last, 12, &cached);
    assert_int_equal(cached, 8);
    engine_kv_seq_deinit(p, &s);
    engine_kv_pool_destroy(p);
}

static void test_randomized_accounting(void **state)
{
    (void)state;
    struct engine_kv_pool *p;
    assert_int_equal(engine_kv_pool_create(32, 4, 64, &p), PW_OK);
    struct engine_kv_seq seqs[6];
    int32_t toks[6][64];
    for (int i = 0; i < 6; i++)
        engine_kv_seq_init(p, &seqs[i]);
    srand(7);
    for (int step = 0; step < 5000; step++) {
        int i = rand() % 6;
        struct engine_kv_seq *s = &seqs[i];
        int op = rand() % 10;
        if (op == 0) {
            engine_kv_seq_reset(p, s);
        } else if (s->n_tokens == 0 && op < 4) {
            uint32_t n = 1 + (uint32_t)(rand() % 40), cached;
            for (uint32_t t = 0; t < n; t++)
                toks[i][t] = rand() % 3; /* few symbols: many shared prefixes */
            engine_kv_seq_match_prefix(p, s, toks[i], n, &cached);
            if (engine_kv_seq_reserve(p, s, n - cached) == PW_OK)
                engine_kv_seq_commit(p, s, toks[i], n);
            else
                engine_kv_seq_reset(p, s);
        } else if (s->n_tokens > 0 && s->n_tokens < 64) {
            if (engine_kv_seq_reserve(p, s, 1) == PW_OK) {
                toks[i][s->n_tokens] = rand() % 3;
                engine_kv_seq_commit(p, s, toks[i], s->n_tokens + 1);
            }
        }
        uint32_t used = 0;
        for (int k = 0; k < 6; k++)
            used += seqs[k].n_blocks;
        /* shared blocks are counted once per sequence, so used >= blocks in use */
        assert_true(engine_kv_pool_n_free(p) + used >= 32);
        assert_true(engine_kv_pool_n_free(p) <= 32);
    }
    for (int i = 0; i < 6; i++)
        engine_kv_seq_deinit(p, &seqs[i]);
    assert_int_equal(engine_kv_pool_n_free(p), 32);
    engine_kv_pool_destroy(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve_and_release),
        cmocka_unit_test(test_exhaustion_is_again_and_changes_nothing),
        cmocka_unit_test(test_sequence_limit),
        cmocka_unit_test(test_prefix_reuse_shares_full_blocks),
        cmocka_unit_test(test_cached_blocks_survive_until_evicted),
        cmocka_unit_test(test_empty_blocks_are_taken_before_cached_ones),
        cmocka_unit_test(test_retained_prefixes_are_bounded),
        cmocka_unit_test(test_randomized_accounting),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

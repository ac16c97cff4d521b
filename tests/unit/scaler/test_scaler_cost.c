/* Unit tests of scaler_cost: exact per-state accounting. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "scaler_cost.h"

#define H (3600LL * 1000)

static void test_hour_at_price(void **unused)
{
    (void)unused;
    struct scaler_cost_acc acc;
    scaler_cost_init(&acc);
    assert_int_equal(scaler_cost_account(&acc, "r1", SCALER_REPLICA_READY, 1006000, 0, H), PW_OK);
    assert_int_equal(scaler_cost_account(&acc, "r1", SCALER_REPLICA_PARKED, 12000, H, 3 * H),
                     PW_OK);
    assert_int_equal(scaler_cost_running_microusd(&acc), 1006000);
    assert_int_equal(scaler_cost_parked_microusd(&acc), 24000);
    assert_int_equal(scaler_cost_total_microusd(&acc), 1030000);
    assert_int_equal(scaler_cost_running_ms(&acc), H);
    assert_int_equal(scaler_cost_parked_ms(&acc), 2 * H);
    char buf[256];
    int n = scaler_cost_to_json(&acc, buf, sizeof buf);
    assert_true(n > 0 && (size_t)n < sizeof buf);
    assert_string_equal(buf, "{\"total_microusd\":1030000,\"running_microusd\":1006000,"
                             "\"parked_microusd\":24000,\"running_ms\":3600000,"
                             "\"parked_ms\":7200000}");
}

/* Many short slices add up to the same as one long one: the remainder is carried. */
static void test_slices_exact(void **unused)
{
    (void)unused;
    struct scaler_cost_acc a, b;
    scaler_cost_init(&a);
    scaler_cost_init(&b);
    const uint64_t price = 123457; /* not a divisor of anything */
    for (int64_t t = 0; t < H; t += 250)
        assert_int_equal(scaler_cost_account(&a, NULL, SCALER_REPLICA_READY, price, t, t + 250),
                         PW_OK);
    assert_int_equal(scaler_cost_account(&b, NULL, SCALER_REPLICA_READY, price, 0, H), PW_OK);
    assert_int_equal(scaler_cost_running_microusd(&a), price);
    assert_int_equal(scaler_cost_running_microusd(&b), price);
    /* Running covers provisioning, starting, ready, draining. */
    scaler_cost_init(&a);
    scaler_cost_account(&a, NULL, SCALER_REPLICA_PROVISIONING, 3600000, 0, 1000);
    scaler_cost_account(&a, NULL, SCALER_REPLICA_STARTING, 3600000, 0, 1000);
    scaler_cost_account(&a, NULL, SCALER_REPLICA_DRAINING, 3600000, 0, 1000);
    scaler_cost_account(&a, NULL, SCALER_REPLICA_TERMINATED, 0, 0, 1000);
    assert_int_equal(scaler_cost_running_microusd(&a), 3000);
    assert_int_equal(scaler_cost_total_microusd(&a), 3000);
}

static void test_bad_input(void **unused)
{
    (void)unused;
    struct scaler_cost_acc acc;
    scaler_cost_init(&acc);
    assert_int_equal(scaler_cost_account(&acc, NULL, SCALER_REPLICA_READY, 1, 10, 5), PW_ERR_INVAL);
    assert_int_equal(scaler_cost_account(&acc, NULL, SCALER_REPLICA_STATE_COUNT, 1, 0, 5),
                     PW_ERR_INVAL);
    assert_int_equal(scaler_cost_account(&acc, NULL, SCALER_REPLICA_READY, 1, 0,
                                         SCALER_COST_MAX_INTERVAL_MS + 1),
                     PW_ERR_RANGE);
    assert_int_equal(scaler_cost_account(NULL, NULL, SCALER_REPLICA_READY, 1, 0, 5), PW_ERR_INVAL);
    /* The largest price for the longest interval does not overflow. */
    assert_int_equal(scaler_cost_account(&acc, NULL, SCALER_REPLICA_READY, 1000000ULL * 1000000, 0,
                                         SCALER_COST_MAX_INTERVAL_MS),
                     PW_OK);
    assert_int_equal(scaler_cost_account(&acc, NULL, SCALER_REPLICA_READY, 7, 5, 5), PW_OK);
}

static void test_rate_now(void **unused)
{
    (void)unused;
    static const struct scaler_offer o[] = {
        {.price_microusd_per_hour = 1000000,
         .spot_price_microusd_per_hour = 400000,
         .spot_available = true,
         .parked_microusd_per_hour = 10000},
    };
    struct scaler_replica_obs r[4];
    memset(r, 0, sizeof r);
    r[0].state = SCALER_REPLICA_READY;
    r[1].state = SCALER_REPLICA_READY;
    r[1].spot = true;
    r[2].state = SCALER_REPLICA_PARKED;
    r[3].state = SCALER_REPLICA_TERMINATED;
    assert_int_equal(scaler_cost_rate_now(r, 4, o, 1), 1410000);
    r[0].offer_index = -1;
    assert_int_equal(scaler_cost_rate_now(r, 4, o, 1), 410000);
    assert_int_equal(scaler_cost_state_price(NULL, false, SCALER_REPLICA_READY), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hour_at_price),
        cmocka_unit_test(test_slices_exact),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_rate_now),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

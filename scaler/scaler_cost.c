/*
 * scaler_cost: exact per-state cost accounting (see scaler_cost.h).
 *
 * price (micro-USD per hour) x duration (ms) / 3600000 is split into a whole part and a
 * remainder kept per state, so totals never drift however the time is sliced.
 */
#include "scaler_cost.h"

#include <stdio.h>
#include <string.h>

#define MS_PER_HOUR 3600000ULL

void scaler_cost_init(struct scaler_cost_acc *acc)
{
    memset(acc, 0, sizeof *acc);
}

enum pw_err scaler_cost_account(struct scaler_cost_acc *acc, const char *replica_id,
                                enum scaler_replica_state state, uint64_t price_microusd_per_hour,
                                int64_t from_ms, int64_t to_ms)
{
    (void)replica_id;
    if (!acc || (unsigned)state >= SCALER_REPLICA_STATE_COUNT || to_ms < from_ms)
        return PW_ERR_INVAL;
    uint64_t ms = (uint64_t)(to_ms - from_ms);
    if (ms > (uint64_t)SCALER_COST_MAX_INTERVAL_MS)
        return PW_ERR_RANGE;
    if (price_microusd_per_hour > 1000000ULL * 1000000ULL)
        return PW_ERR_RANGE;
    /* price = q * 3600000 + r: q * ms is whole micro-USD; r * ms < 3.6e6 * 3.2e10 fits. */
    uint64_t q = price_microusd_per_hour / MS_PER_HOUR, r = price_microusd_per_hour % MS_PER_HOUR;
    uint64_t whole = q * ms; /* q <= 277777, ms <= 3.2e10: fits */
    uint64_t part = r * ms;
    uint64_t rem = acc->rem[state] + part % MS_PER_HOUR;
    whole += part / MS_PER_HOUR + rem / MS_PER_HOUR;
    rem %= MS_PER_HOUR;
    if (acc->microusd[state] > UINT64_MAX - whole || acc->ms[state] > UINT64_MAX - ms)
        return PW_ERR_RANGE;
    acc->microusd[state] += whole;
    acc->rem[state] = rem;
    acc->ms[state] += ms;
    return PW_OK;
}

static bool is_running(int s)
{
    return s == SCALER_REPLICA_PROVISIONING || s == SCALER_REPLICA_STARTING ||
           s == SCALER_REPLICA_READY || s == SCALER_REPLICA_DRAINING;
}

uint64_t scaler_cost_running_microusd(const struct scaler_cost_acc *acc)
{
    uint64_t t = 0;
    for (int s = 0; s < SCALER_REPLICA_STATE_COUNT; s++) {
        if (is_running(s))
            t += acc->microusd[s];
    }
    return t;
}

uint64_t scaler_cost_running_ms(const struct scaler_cost_acc *acc)
{
    uint64_t t = 0;
    for (int s = 0; s < SCALER_REPLICA_STATE_COUNT; s++) {
        if (is_running(s))
            t += acc->ms[s];
    }
    return t;
}

uint64_t scaler_cost_parked_microusd(const struct scaler_cost_acc *acc)
{
    return acc->microusd[SCALER_REPLICA_PARKED];
}

uint64_t scaler_cost_parked_ms(const struct scaler_cost_acc *acc)
{
    return acc->ms[SCALER_REPLICA_PARKED];
}

uint64_t scaler_cost_total_microusd(const struct scaler_cost_acc *acc)
{
    uint64_t t = 0;
    for (int s = 0; s < SCALER_REPLICA_STATE_COUNT; s++)
        t += acc->microusd[s];
    return t;
}

uint64_t scaler_cost_state_price(const struct scaler_offer *offer, bool spot,
                                 enum scaler_replica_state state)
{
    if (!offer)
        return 0;
    if (is_running((int)state))
        return spot && offer->spot_available ? offer->spot_price_microusd_per_hour
                                             : offer->price_microusd_per_hour;
    if (state == SCALER_REPLICA_PARKED)
        return offer->parked_microusd_per_hour;
    return 0;
}

uint64_t scaler_cost_rate_now(const struct scaler_replica_obs *replicas, size_t n,
                              const struct scaler_offer *offers, size_t n_offers)
{
    uint64_t t = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t oi = replicas[i].offer_index;
        if (oi < 0 || (size_t)oi >= n_offers || !offers)
            continue;
        t += scaler_cost_state_price(&offers[oi], replicas[i].spot, replicas[i].state);
    }
    return t;
}

int scaler_cost_to_json(const struct scaler_cost_acc *acc, char *buf, size_t cap)
{
    return snprintf(buf, cap,
                    "{\"total_microusd\":%llu,\"running_microusd\":%llu,\"parked_microusd\":%llu,"
                    "\"running_ms\":%llu,\"parked_ms\":%llu}",
                    (unsigned long long)scaler_cost_total_microusd(acc),
                    (unsigned long long)scaler_cost_running_microusd(acc),
                    (unsigned long long)scaler_cost_parked_microusd(acc),
                    (unsigned long long)scaler_cost_running_ms(acc),
                    (unsigned long long)scaler_cost_parked_ms(acc));
}

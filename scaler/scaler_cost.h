/*
 * scaler_cost: cost accounting of one function from actual replica state durations.
 *
 * The reconciler calls scaler_cost_account() whenever a replica leaves a state (and on
 * every flush, for the time so far), with the price that applies in that state: the
 * running price (spot or on-demand) for PROVISIONING, STARTING, READY and DRAINING, the
 * parked price for PARKED, and 0 for TERMINATED and FAILED. Totals are exact integers:
 * micro-USD with the sub-micro-USD remainder carried, so adding many short intervals
 * gives the same total as one long one. Pure and reentrant.
 */
#ifndef SCALER_COST_H
#define SCALER_COST_H

#include <stddef.h>
#include <stdint.h>

#include "pw_err.h"
#include "scaler_offers.h"
#include "scaler_policy.h"

/* Longest interval one call accepts (a year), ms; longer is PW_ERR_RANGE. */
#define SCALER_COST_MAX_INTERVAL_MS (366LL * 24 * 3600 * 1000)

/* Per-function totals. Zero it (or _init) to start. Plain data, may be copied. */
struct scaler_cost_acc {
    uint64_t ms[SCALER_REPLICA_STATE_COUNT];       /* replica-milliseconds spent per state */
    uint64_t microusd[SCALER_REPLICA_STATE_COUNT]; /* whole micro-USD charged per state */
    uint64_t rem[SCALER_REPLICA_STATE_COUNT];      /* remainder, micro-USD * ms/h units */
};

void scaler_cost_init(struct scaler_cost_acc *acc);

/*
 * Adds replica `replica_id` (for the caller's logs only; may be NULL) spending [from_ms,
 * to_ms) in state at price_microusd_per_hour. to_ms == from_ms adds nothing. Returns
 * PW_OK, PW_ERR_INVAL (to < from, bad state, NULL acc), PW_ERR_RANGE (interval over
 * SCALER_COST_MAX_INTERVAL_MS or a total would overflow; acc unchanged).
 */
enum pw_err scaler_cost_account(struct scaler_cost_acc *acc, const char *replica_id,
                                enum scaler_replica_state state, uint64_t price_microusd_per_hour,
                                int64_t from_ms, int64_t to_ms);

/* Running = PROVISIONING + STARTING + READY + DRAINING. */
uint64_t scaler_cost_running_microusd(const struct scaler_cost_acc *acc);
uint64_t scaler_cost_running_ms(const struct scaler_cost_acc *acc);
uint64_t scaler_cost_parked_microusd(const struct scaler_cost_acc *acc);
uint64_t scaler_cost_parked_ms(const struct scaler_cost_acc *acc);
uint64_t scaler_cost_total_microusd(const struct scaler_cost_acc *acc);

/*
 * The price per hour a replica costs in its state right now: the running price of its
 * offer (spot or on-demand) while provisioning/starting/ready/draining, the parked price
 * while parked, 0 when terminated/failed or its offer is unknown.
 */
uint64_t scaler_cost_state_price(const struct scaler_offer *offer, bool spot,
                                 enum scaler_replica_state state);

/* Sum of scaler_cost_state_price over replicas (offer_index into offers): "$/hour now". */
uint64_t scaler_cost_rate_now(const struct scaler_replica_obs *replicas, size_t n,
                              const struct scaler_offer *offers, size_t n_offers);

/*
 * Writes the totals as one compact JSON object (no newline):
 * {"total_microusd":N,"running_microusd":N,"parked_microusd":N,"running_ms":N,"parked_ms":N}
 * Returns the length (like snprintf; >= cap means truncated).
 */
int scaler_cost_to_json(const struct scaler_cost_acc *acc, char *buf, size_t cap);

#endif

/*
 * scaler_sim: the trace simulator behind `parkway simulate`.
 *
 * Replays a request trace against simulated replicas (provision and unpark delays and
 * prices from offers; a simple engine model: max_batch slots per replica, prefill and
 * decode at fixed tokens/s) while calling the SAME scaler_policy_decide() every
 * SCALER_TICK_MS of simulated time, for several policies side by side, and reports cost,
 * cold starts and queue-wait percentiles. Deterministic: same trace and config, same
 * report, byte for byte.
 *
 * Trace format (CSV, UTF-8, '\n' or "\r\n" line ends):
 *     arrival_s,prompt_tokens,output_tokens[,function]
 *     0.000,120,64
 *     12.5,800,200,smollm2-135m
 * A request occupies one of its replica's max_batch slots for
 *     prompt_tokens / prefill_tokens_per_s + output_tokens / decode_tokens_per_s
 * seconds. A cold start is a request that arrives while no replica is READY (it waits for
 * a provision or an unpark). Cost is billed per replica state with scaler_cost over the same
 * horizon for every policy: until last arrival + tail_ms (or the last completion).
 * The header line is required. arrival_s is seconds since the trace start (decimal, at
 * most 3 places, non-decreasing); tokens are whole numbers 0..1000000; the optional
 * function column is kept but the simulator treats the trace as one function. '#' lines
 * and blank lines are skipped. Errors are one line: "trace.csv:7: arrival_s: ...".
 */
#ifndef SCALER_SIM_H
#define SCALER_SIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "pw_err.h"
#include "scaler_offers.h"
#include "scaler_policy.h"

/* Most requests one trace may hold. */
#define SCALER_TRACE_MAX_REQUESTS 2000000
/* Largest trace file, bytes. */
#define SCALER_TRACE_MAX_BYTES (256 * 1024 * 1024)
/* Most policies one run compares. */
#define SCALER_SIM_MAX_POLICIES 16

struct scaler_trace_req {
    int64_t arrival_ms;
    uint32_t prompt_tokens;
    uint32_t output_tokens;
};

/* Caller-owned; zero it, release with scaler_trace_deinit. */
struct scaler_trace {
    struct scaler_trace_req *reqs; /* owned, sorted by arrival_ms */
    size_t count;
};

enum pw_err scaler_trace_parse(const char *text, size_t len, const char *origin,
                               struct scaler_trace *trace, char *errbuf, size_t errcap);
enum pw_err scaler_trace_load_file(const char *path, struct scaler_trace *trace, char *errbuf,
                                   size_t errcap);
void scaler_trace_deinit(struct scaler_trace *trace);
/* Writes the trace in the CSV format above (header included). */
enum pw_err scaler_trace_write_csv(const struct scaler_trace *trace, FILE *f);

enum scaler_trace_shape {
    SCALER_TRACE_DIURNAL = 0, /* steady, rate following a 24 h sine (busy day, quiet night) */
    SCALER_TRACE_BURSTY,      /* bursts of requests separated by long, irregular gaps */
    SCALER_TRACE_PERIODIC,    /* timer-like: one small burst every period, slight jitter */
    SCALER_TRACE_SPARSE,      /* rare independent requests (Poisson, mean gap 20 min) */
};
/* "diurnal", "bursty", "periodic", "sparse"; parse returns false if unknown. */
const char *scaler_trace_shape_name(enum scaler_trace_shape s);
bool scaler_trace_shape_parse(const char *name, enum scaler_trace_shape *out);

/*
 * Generates a synthetic trace of duration_ms with a deterministic PRNG seeded by seed
 * (same seed, same trace on every machine). trace must be zeroed. PW_ERR_INVAL for a bad
 * shape or duration <= 0; PW_ERR_TOOBIG over SCALER_TRACE_MAX_REQUESTS.
 */
enum pw_err scaler_trace_generate(enum scaler_trace_shape shape, uint64_t seed, int64_t duration_ms,
                                  struct scaler_trace *trace);

/* One policy to simulate: a name and the policy spec it runs with. */
struct scaler_sim_policy {
    char name[32];
    struct scaler_policy_spec spec;
};

struct scaler_sim_config {
    const struct scaler_offer *offers; /* borrowed; the policy chooses among them */
    size_t n_offers;
    double prefill_tokens_per_s; /* per sequence; 0 = 400 */
    double decode_tokens_per_s;  /* per sequence; 0 = 40 */
    int64_t tick_ms;             /* policy period; 0 = SCALER_TICK_MS */
    int64_t slo_wait_ms;         /* a wait over this is an SLO miss; 0 = 1000 ms */
    int64_t tail_ms;             /* simulate this long after the last arrival;
                                    0 = 15 minutes */
    struct scaler_sim_policy policies[SCALER_SIM_MAX_POLICIES];
    size_t n_policies;
};

/*
 * Fills cfg with the default comparison for spec (borrowed): always-on (min 1), fixed
 * idle timeouts of 60 s and 300 s that terminate, and "parkway" (the spec as written:
 * its idle_seconds as the upper bound, park, adaptive keep-alive and pre-warm). Offers
 * and engine speeds are left for the caller.
 */
void scaler_sim_default_policies(struct scaler_sim_config *cfg, const struct pw_spec *spec);

struct scaler_sim_result {
    char policy[32];
    uint64_t cost_microusd; /* everything: running + parked */
    uint64_t running_microusd;
    uint64_t parked_microusd;
    uint32_t requests;    /* completed (all, at the end of the tail) */
    uint32_t cold_starts; /* requests that waited for a provision or unpark */
    uint32_t provisions;  /* fresh machines started */
    uint32_t unparks;
    uint32_t slo_misses; /* waits over slo_wait_ms (unserved ones included) */
    uint32_t unserved;   /* never dispatched (no capacity until the hard stop) */
    double wait_p50_s, wait_p95_s, wait_p99_s, wait_max_s; /* queue wait, seconds */
    char error[SCALER_REASON_MAX + 1];                     /* last policy error seen, or "" */
};

struct scaler_sim_report {
    size_t count;
    struct scaler_sim_result results[SCALER_SIM_MAX_POLICIES];
};

/*
 * Runs every policy of cfg over trace. report is overwritten. Returns PW_OK, PW_ERR_INVAL
 * (no policies, no offers) or PW_ERR_NOMEM.
 */
enum pw_err scaler_sim_run(const struct scaler_trace *trace, const struct scaler_sim_config *cfg,
                           struct scaler_sim_report *report);

/* Human table, one row per policy. */
void scaler_sim_report_print_table(const struct scaler_sim_report *report, FILE *f);
/* One line: {"policies":[{"policy":"always-on","cost":1.23,"cold_starts":0,...},...]} */
void scaler_sim_report_print_json(const struct scaler_sim_report *report, FILE *f);

/*
 * `parkway simulate` (tools/parkway_simulate.c): argv[0] = "simulate".
 *   --spec FILE --trace FILE [--offers FILE|DIR] [--tokens-per-s N] [--json]
 *   --generate diurnal|bursty|periodic|sparse [--seed N] [--hours H]  (CSV to stdout)
 * Returns the exit code.
 */
int parkway_cmd_simulate(int argc, char **argv);

#endif

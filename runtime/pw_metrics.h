/*
 * pw_metrics: a registry of counters, gauges and histograms with labels, rendered in the
 * Prometheus text exposition format 0.0.4.
 *
 * A family (struct pw_metric) has a name, a help line, fixed label names and, for a
 * histogram, fixed bucket bounds. A series is one combination of label values, created on
 * first observation. Each family holds at most a capped number of series (default
 * PW_METRICS_SERIES_CAP); observations for new combinations beyond it go to one overflow
 * series whose every label value is PW_METRICS_OVERFLOW_VALUE, so totals stay right and
 * hostile label values cannot exhaust memory. Label values longer than
 * PW_METRICS_LABEL_VALUE_MAX bytes are cut (at a UTF-8 character boundary).
 *
 * Threads: every function is thread-safe. Observing an existing series takes the family's
 * read lock for the lookup and updates the value with atomics; only a new series takes
 * the write lock. Rendering reads values atomically while observers run, so a histogram's
 * _sum may lag its buckets by an observation in flight; its buckets and _count always
 * agree. Families live until the registry is destroyed; pointers to them stay valid.
 * docs/internals/metrics.md has the design.
 */
#ifndef PW_METRICS_H
#define PW_METRICS_H

#include <stddef.h>

#include "pw_err.h"

#define PW_METRICS_MAX_LABELS 8
#define PW_METRICS_SERIES_CAP 10000
#define PW_METRICS_LABEL_VALUE_MAX 128
#define PW_METRICS_OVERFLOW_VALUE "__overflow__"
#define PW_METRICS_MAX_BUCKETS 64

/* Default latency buckets, in seconds: 5 ms to 5 min (LLM requests run long). */
#define PW_METRICS_LATENCY_BUCKETS_N 15
extern const double pw_metrics_latency_buckets[PW_METRICS_LATENCY_BUCKETS_N];

struct pw_metrics;
struct pw_metric;

/* A new empty registry, or NULL when out of memory. */
struct pw_metrics *pw_metrics_create(void);

/* Frees the registry and every family in it (their pointers die with it). NULL: no-op. */
void pw_metrics_destroy(struct pw_metrics *reg);

/* Series cap for families registered from now on (>= 1). */
void pw_metrics_set_series_cap(struct pw_metrics *reg, size_t cap);

/*
 * Register a family. name matches [a-zA-Z_:][a-zA-Z0-9_:]*; each of the n_labels label
 * names (at most PW_METRICS_MAX_LABELS, distinct) matches [a-zA-Z_][a-zA-Z0-9_]* and does
 * not start with "__"; a histogram's may not be "le". help is any text (copied). On PW_OK
 * *out is the family, owned by the registry. Errors: PW_ERR_INVAL (bad name, labels or
 * bounds), PW_ERR_EXISTS (name taken), PW_ERR_NOMEM.
 */
enum pw_err pw_metrics_counter(struct pw_metrics *reg, const char *name, const char *help,
                               size_t n_labels, const char *const *label_names,
                               struct pw_metric **out);
enum pw_err pw_metrics_gauge(struct pw_metrics *reg, const char *name, const char *help,
                             size_t n_labels, const char *const *label_names,
                             struct pw_metric **out);
/*
 * bounds: n_bounds finite upper bounds, strictly increasing (a trailing +Inf is dropped;
 * +Inf is always implicit), at most PW_METRICS_MAX_BUCKETS; NULL means
 * pw_metrics_latency_buckets. Copied.
 */
enum pw_err pw_metrics_histogram(struct pw_metrics *reg, const char *name, const char *help,
                                 size_t n_labels, const char *const *label_names,
                                 const double *bounds, size_t n_bounds, struct pw_metric **out);

/*
 * Observations. values holds one label value per label name, in order (NULL allowed when
 * the family has no labels; a NULL value is ""). The strings are copied when a series is
 * created. Calling one on a family of another type is a programmer error (PW_ASSERT). A
 * series that cannot be allocated loses the observation (counted, see
 * pw_metrics_lost()).
 */
/* v >= 0; a negative or NaN v is ignored (counters only go up). */
void pw_metric_counter_add(struct pw_metric *fam, const char *const *values, double v);
void pw_metric_gauge_set(struct pw_metric *fam, const char *const *values, double v);
void pw_metric_gauge_add(struct pw_metric *fam, const char *const *values, double v);
/* NaN is ignored. */
void pw_metric_histogram_observe(struct pw_metric *fam, const char *const *values, double v);

/* Observations lost because a new series could not be allocated. */
unsigned long long pw_metrics_lost(const struct pw_metrics *reg);

/*
 * Render every family as Prometheus text 0.0.4 into a new malloc'd, NUL-terminated
 * buffer (*out; the caller frees it; *len excludes the NUL). Families are sorted by name,
 * series by label values (byte order, label by label), the overflow series last.
 * Families with no series print only their HELP and TYPE lines. PW_ERR_NOMEM on failure.
 */
enum pw_err pw_metrics_render(struct pw_metrics *reg, char **out, size_t *len);

#endif

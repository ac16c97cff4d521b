/*
 * pw_metrics: the registry behind /metrics.
 *
 * Layout: the registry keeps its families in an array sorted by name (guarded by a
 * mutex, touched only at registration and render). Each family has an open-addressing
 * hash table (linear probing, load <= 1/2) of series pointers guarded by a rwlock; a
 * series, once created, is never moved or freed before the registry, so an observer may
 * drop the read lock and update the series' atomics afterwards. A series is one malloc:
 *
 *   +-----------------+--------------------------+--------------------------------+
 *   | struct series   | char *values[n_labels]   | "v0\0" "v1\0" ...              |
 *   | (+ buckets[] for|  (point into the strings)|                                |
 *   |  a histogram)   |                          |                                |
 *   +-----------------+--------------------------+--------------------------------+
 *
 * Values are doubles stored as their bit patterns in _Atomic uint64_t and updated with a
 * compare-and-swap loop (C11 has no atomic add on floating types). Histogram buckets hold
 * per-bucket (not cumulative) counts; render sums them, so cumulative counts are monotonic
 * and the +Inf bucket equals _count even while observers run.
 */
#include "pw_metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double pw_metrics_latency_buckets[PW_METRICS_LATENCY_BUCKETS_N] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
};

enum metric_type {
    METRIC_COUNTER,
    METRIC_GAUGE,
    METRIC_HISTOGRAM,
};

struct series {
    uint64_t hash;              /* of the (cut) label values */
    bool overflow;              /* the family's overflow series: rendered last */
    size_t n_labels;            /* copy of the family's, for sorting */
    char **values;              /* n_labels NUL-terminated values, inside this block */
    _Atomic uint64_t value;     /* counter or gauge value; histogram sum (double bits) */
    _Atomic uint64_t buckets[]; /* histogram only: n_bounds + 1 counts, the last is +Inf */
};

struct pw_metric {
    struct pw_metrics *reg; /* owner, for the lost counter */
    enum metric_type type;
    char *name;
    char *help;
    size_t n_labels;
    char *label_names[PW_METRICS_MAX_LABELS];
    double *bounds; /* histogram: n_bounds finite upper bounds, increasing */
    size_t n_bounds;
    size_t cap; /* series cap, not counting the overflow series */

    pthread_rwlock_t lock; /* guards table, table_cap, n_series */
    struct series **table; /* table_cap slots, NULL = empty */
    size_t table_cap;      /* power of two */
    size_t n_series;       /* regular series (overflow series not counted) */
};

struct pw_metrics {
    pthread_mutex_t lock;    /* guards fams, n_fams, cap_fams, series_cap */
    struct pw_metric **fams; /* sorted by name */
    size_t n_fams;
    size_t cap_fams;
    size_t series_cap;
    _Atomic unsigned long long lost;
};

/* ---- small helpers ------------------------------------------------------------------ */

static double bits_to_double(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof(d));
    return d;
}

static uint64_t double_to_bits(double d)
{
    uint64_t b;
    memcpy(&b, &d, sizeof(b));
    return b;
}

static void atomic_add_double(_Atomic uint64_t *p, double v)
{
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    for (;;) {
        uint64_t nw = double_to_bits(bits_to_double(old) + v);
        if (atomic_compare_exchange_weak_explicit(p, &old, nw, memory_order_relaxed,
                                                  memory_order_relaxed))
            return;
    }
}

/* Length of v cut to PW_METRICS_LABEL_VALUE_MAX bytes without splitting a character. */
static size_t value_len(const char *v)
{
    size_t n = strnlen(v, PW_METRICS_LABEL_VALUE_MAX + 1);
    if (n <= PW_METRICS_LABEL_VALUE_MAX)
        return n;
    n = PW_METRICS_LABEL_VALUE_MAX;
    /* Back up over continuation bytes (10xxxxxx) so v[n] starts a character. */
    while (n > 0 && ((unsigned char)v[n] & 0xc0) == 0x80)
        n--;
    return n;
}

static uint64_t hash_values(size_t n, const char *const *vals, const size_t *lens)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 */
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < lens[i]; j++) {
            h ^= (unsigned char)vals[i][j];
            h *= 0x100000001b3ull;
        }
        h ^= 0xff; /* separator: "a","bc" and "ab","c" differ */
        h *= 0x100000001b3ull;
    }
    return h;
}

static bool valid_name(const char *s, bool colon)
{
    if (s == NULL || *s == '\0')
        return false;
    for (size_t i = 0; s[i]; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

/* ---- series table ------------------------------------------------------------------- */

static bool series_matches(const struct series *s, uint64_t h, size_t n, const char *const *vals,
                           const size_t *lens)
{
    if (s->hash != h)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s->values[i][lens[i]] != '\0' || memcmp(s->values[i], vals[i], lens[i]) != 0)
            return false;
    }
    return true;
}

/* Caller holds the family lock (read or write). */
static struct series *table_find(const struct pw_metric *f, uint64_t h, const char *const *vals,
                                 const size_t *lens)
{
    if (f->table_cap == 0)
        return NULL;
    size_t mask = f->table_cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        struct series *s = f->table[i];
        if (s == NULL)
            return NULL;
        if (series_matches(s, h, f->n_labels, vals, lens))
            return s;
    }
}

static void table_put(struct series **table, size_t cap, struct series *s)
{
    size_t mask = cap - 1;
    size_t i = s->hash & mask;
    while (table[i] != NULL)
        i = (i + 1) & mask;
    table[i] = s;
}

/* Caller holds the write lock. Returns NULL when out of memory. */
static struct series *table_insert(struct pw_metric *f, uint64_t h, const char *const *vals,
                                   const size_t *lens, bool overflow)
{
    size_t used = f->n_series + 1; /* the overflow series may occupy one more slot */
    if ((used + 1) * 2 > f->table_cap) {
        size_t ncap = f->table_cap ? f->table_cap * 2 : 16;
        struct series **nt = calloc(ncap, sizeof(*nt));
        if (nt == NULL)
            return NULL;
        for (size_t i = 0; i < f->table_cap; i++) {
            if (f->table[i] != NULL)
                table_put(nt, ncap, f->table[i]);
        }
        free(f->table);
        f->table = nt;
        f->table_cap = ncap;
    }

    size_t nb = f->type == METRIC_HISTOGRAM ? f->n_bounds + 1 : 0;
    size_t size =
        sizeof(struct series) + nb * sizeof(_Atomic uint64_t) + f->n_labels * sizeof(char *);
    for (size_t i = 0; i < f->n_labels; i++)
        size += lens[i] + 1;
    struct series *s = calloc(1, size);
    if (s == NULL)
        return NULL;
    s->hash = h;
    s->overflow = overflow;
    s->n_labels = f->n_labels;
    atomic_init(&s->value, double_to_bits(0.0));
    for (size_t i = 0; i < nb; i++)
        atomic_init(&s->buckets[i], 0);
    s->values = (char **)((char *)s + sizeof(struct series) + nb * sizeof(_Atomic uint64_t));
    char *p = (char *)(s->values + f->n_labels);
    for (size_t i = 0; i < f->n_labels; i++) {
        memcpy(p, vals[i], lens[i]);
        p[lens[i]] = '\0';
        s->values[i] = p;
        p += lens[i] + 1;
    }
    table_put(f->table, f->table_cap, s);
    if (!overflow)
        f->n_series++;
    return s;
}

/* The series for these label values, created if needed; NULL (observation lost) on OOM. */
static struct series *series_get(struct pw_metric *f, const char *const *values)
{
    const char *vals[PW_METRICS_MAX_LABELS];
    size_t lens[PW_METRICS_MAX_LABELS];
    struct series *s;

    for (size_t i = 0; i < f->n_labels; i++) {
        vals[i] = (values != NULL && values[i] != NULL) ? values[i] : "";
        lens[i] = value_len(vals[i]);
    }
    uint64_t h = hash_values(f->n_labels, vals, lens);

    pthread_rwlock_rdlock(&f->lock);
    s = table_find(f, h, vals, lens);
    pthread_rwlock_unlock(&f->lock);
    if (s != NULL)
        return s;

    pthread_rwlock_wrlock(&f->lock);
    s = table_find(f, h, vals, lens); /* another thread may have made it meanwhile */
    if (s == NULL && f->n_series < f->cap) {
        s = table_insert(f, h, vals, lens, false);
    } else if (s == NULL) {
        for (size_t i = 0; i < f->n_labels; i++) {
            vals[i] = PW_METRICS_OVERFLOW_VALUE;
            lens[i] = sizeof(PW_METRICS_OVERFLOW_VALUE) - 1;
        }
        h = hash_values(f->n_labels, vals, lens);
        s = table_find(f, h, vals, lens);
        if (s == NULL)
            s = table_insert(f, h, vals, lens, true);
    }
    pthread_rwlock_unlock(&f->lock);
    if (s == NULL)
        atomic_fetch_add_explicit(&f->reg->lost, 1, memory_order_relaxed);
    return s;
}

/* ---- registry ----------------------------------------------------------------------- */

struct pw_metrics *pw_metrics_create(void)
{
    struct pw_metrics *reg = calloc(1, sizeof(*reg));
    if (reg == NULL)
        return NULL;
    if (pthread_mutex_init(&reg->lock, NULL) != 0) {
        free(reg);
        return NULL;
    }
    reg->series_cap = PW_METRICS_SERIES_CAP;
    atomic_init(&reg->lost, 0);
    return reg;
}

static void family_free(struct pw_metric *f)
{
    if (f == NULL)
        return;
    for (size_t i = 0; i < f->table_cap; i++)
        free(f->table[i]);
    free(f->table);
    for (size_t i = 0; i < f->n_labels; i++)
        free(f->label_names[i]);
    free(f->bounds);
    free(f->name);
    free(f->help);
    pthread_rwlock_destroy(&f->lock);
    free(f);
}

void pw_metrics_destroy(struct pw_metrics *reg)
{
    if (reg == NULL)
        return;
    for (size_t i = 0; i < reg->n_fams; i++)
        family_free(reg->fams[i]);
    free(reg->fams);
    pthread_mutex_destroy(&reg->lock);
    free(reg);
}

void pw_metrics_set_series_cap(struct pw_metrics *reg, size_t cap)
{
    PW_ASSERT(reg != NULL && cap >= 1);
    pthread_mutex_lock(&reg->lock);
    reg->series_cap = cap;
    pthread_mutex_unlock(&reg->lock);
}

unsigned long long pw_metrics_lost(const struct pw_metrics *reg)
{
    return atomic_load_explicit(&((struct pw_metrics *)reg)->lost, memory_order_relaxed);
}

static enum pw_err family_register(struct pw_metrics *reg, enum metric_type type, const char *name,
                                   const char *help, size_t n_labels,
                                   const char *const *label_names, const double *bounds,
                                   size_t n_bounds, struct pw_metric **out)
{
    enum pw_err err = PW_OK;
    struct pw_metric *f = NULL;
    bool locked = false;

    if (out == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    if (reg == NULL || !valid_name(name, true) || n_labels > PW_METRICS_MAX_LABELS ||
        (n_labels > 0 && label_names == NULL))
        return PW_ERR_INVAL;
    for (size_t i = 0; i < n_labels; i++) {
        const char *ln = label_names[i];
        if (!valid_name(ln, false) || strncmp(ln, "__", 2) == 0 ||
            (type == METRIC_HISTOGRAM && strcmp(ln, "le") == 0))
            return PW_ERR_INVAL;
        for (size_t j = 0; j < i; j++) {
            if (strcmp(ln, label_names[j]) == 0)
                return PW_ERR_INVAL;
        }
    }
    if (type == METRIC_HISTOGRAM) {
        if (bounds == NULL) {
            bounds = pw_metrics_latency_buckets;
            n_bounds = PW_METRICS_LATENCY_BUCKETS_N;
        }
        if (n_bounds > 0 && isinf(bounds[n_bounds - 1]) && bounds[n_bounds - 1] > 0)
            n_bounds--;
        if (n_bounds > PW_METRICS_MAX_BUCKETS)
            return PW_ERR_INVAL;
        for (size_t i = 0; i < n_bounds; i++) {
            if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1])))
                return PW_ERR_INVAL;
        }
    }

    f = calloc(1, sizeof(*f));
    if (f == NULL)
        return PW_ERR_NOMEM;
    if (pthread_rwlock_init(&f->lock, NULL) != 0) {
        free(f);
        return PW_ERR_NOMEM;
    }
    f->reg = reg;
    f->type = type;
    f->name = strdup(name);
    f->help = strdup(help != NULL ? help : "");
    if (f->name == NULL || f->help == NULL) {
        err = PW_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n_labels; i++) {
        f->label_names[i] = strdup(label_names[i]);
        if (f->label_names[i] == NULL) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        f->n_labels = i + 1;
    }
    if (type == METRIC_HISTOGRAM) {
        f->bounds = malloc((n_bounds > 0 ? n_bounds : 1) * sizeof(double));
        if (f->bounds == NULL) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        if (n_bounds > 0)
            memcpy(f->bounds, bounds, n_bounds * sizeof(double));
        f->n_bounds = n_bounds;
    }

    pthread_mutex_lock(&reg->lock);
    locked = true;
    f->cap = reg->series_cap;
    size_t pos = 0;
    while (pos < reg->n_fams && strcmp(reg->fams[pos]->name, name) < 0)
        pos++;
    if (pos < reg->n_fams && strcmp(reg->fams[pos]->name, name) == 0) {
        err = PW_ERR_EXISTS;
        goto out;
    }
    if (reg->n_fams == reg->cap_fams) {
        size_t ncap = reg->cap_fams ? reg->cap_fams * 2 : 16;
        struct pw_metric **nf = realloc(reg->fams, ncap * sizeof(*nf));
        if (nf == NULL) {
            err = PW_ERR_NOMEM;
            goto out;
        }
        reg->fams = nf;
        reg->cap_fams = ncap;
    }
    memmove(reg->fams + pos + 1, reg->fams + pos, (reg->n_fams - pos) * sizeof(*reg->fams));
    reg->fams[pos] = f;
    reg->n_fams++;
    *out = f;
    f = NULL;
out:
    if (locked)
        pthread_mutex_unlock(&reg->lock);
    family_free(f);
    return err;
}

enum pw_err pw_metrics_counter(struct pw_metrics *reg, const char *name, const char *help,
                               size_t n_labels, const char *const *label_names,
                               struct pw_metric **out)
{
    return family_register(reg, METRIC_COUNTER, name, help, n_labels, label_names, NULL, 0, out);
}

enum pw_err pw_metrics_gauge(struct pw_metrics *reg, const char *name, const char *help,
                             size_t n_labels, const char *const *label_names,
                             struct pw_metric **out)
{
    return family_register(reg, METRIC_GAUGE, name, help, n_labels, label_names, NULL, 0, out);
}

enum pw_err pw_metrics_histogram(struct pw_metrics *reg, const char *name, const char *help,
                                 size_t n_labels, const char *const *label_names,
                                 const double *bounds, size_t n_bounds, struct pw_metric **out)
{
    return family_register(reg, METRIC_HISTOGRAM, name, help, n_labels, label_names, bounds,
                           n_bounds, out);
}

/* ---- observations ------------------------------------------------------------------- */

void pw_metric_counter_add(struct pw_metric *fam, const char *const *values, double v)
{
    PW_ASSERT(fam != NULL && fam->type == METRIC_COUNTER);
    if (!(v >= 0.0)) /* also NaN */
        return;
    struct series *s = series_get(fam, values);
    if (s != NULL)
        atomic_add_double(&s->value, v);
}

void pw_metric_gauge_set(struct pw_metric *fam, const char *const *values, double v)
{
    PW_ASSERT(fam != NULL && fam->type == METRIC_GAUGE);
    struct series *s = series_get(fam, values);
    if (s != NULL)
        atomic_store_explicit(&s->value, double_to_bits(v), memory_order_relaxed);
}

void pw_metric_gauge_add(struct pw_metric *fam, const char *const *values, double v)
{
    PW_ASSERT(fam != NULL && fam->type == METRIC_GAUGE);
    struct series *s = series_get(fam, values);
    if (s != NULL)
        atomic_add_double(&s->value, v);
}

void pw_metric_histogram_observe(struct pw_metric *fam, const char *const *values, double v)
{
    PW_ASSERT(fam != NULL && fam->type == METRIC_HISTOGRAM);
    if (isnan(v))
        return;
    struct series *s = series_get(fam, values);
    if (s == NULL)
        return;
    /* First bucket whose bound is >= v (binary search); n_bounds = the +Inf bucket. */
    size_t lo = 0, hi = fam->n_bounds;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v <= fam->bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    atomic_fetch_add_explicit(&s->buckets[lo], 1, memory_order_relaxed);
    atomic_add_double(&s->value, v);
}

/* ---- rendering ---------------------------------------------------------------------- */

struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void sb_reserve(struct sbuf *b, size_t extra)
{
    if (b->oom || b->len + extra + 1 <= b->cap)
        return;
    size_t ncap = b->cap ? b->cap : 4096;
    while (ncap < b->len + extra + 1)
        ncap *= 2;
    char *np = realloc(b->p, ncap);
    if (np == NULL) {
        b->oom = true;
        return;
    }
    b->p = np;
    b->cap = ncap;
}

static void sb_add(struct sbuf *b, const char *s, size_t n)
{
    sb_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(struct sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

/* Escapes backslash and newline, plus the double quote when quote is set. */
static void sb_escaped(struct sbuf *b, const char *s, bool quote)
{
    const char *run = s;
    for (; *s; s++) {
        const char *rep = NULL;
        if (*s == '\\')
            rep = "\\\\";
        else if (*s == '\n')
            rep = "\\n";
        else if (quote && *s == '"')
            rep = "\\\"";
        if (rep != NULL) {
            sb_add(b, run, (size_t)(s - run));
            sb_str(b, rep);
            run = s + 1;
        }
    }
    sb_add(b, run, (size_t)(s - run));
}

/* Shortest of %.15g / %.17g that reads back exactly; Inf and NaN as Prometheus spells them. */
static void fmt_double(char buf[32], double v)
{
    if (isnan(v)) {
        strcpy(buf, "NaN");
    } else if (isinf(v)) {
        strcpy(buf, v > 0 ? "+Inf" : "-Inf");
    } else {
        snprintf(buf, 32, "%.15g", v);
        if (strtod(buf, NULL) != v)
            snprintf(buf, 32, "%.17g", v);
    }
}

static void sb_double(struct sbuf *b, double v)
{
    char buf[32];
    fmt_double(buf, v);
    sb_str(b, buf);
}

static void sb_u64(struct sbuf *b, uint64_t v)
{
    char buf[24];
    int n = snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
    sb_add(b, buf, (size_t)n);
}

/* {a="x",b="y"[,le="..."]} or nothing when there are no labels at all. */
static void sb_labels(struct sbuf *b, const struct pw_metric *f, const struct series *s,
                      const char *le)
{
    if (f->n_labels == 0 && le == NULL)
        return;
    sb_str(b, "{");
    for (size_t i = 0; i < f->n_labels; i++) {
        if (i > 0)
            sb_str(b, ",");
        sb_str(b, f->label_names[i]);
        sb_str(b, "=\"");
        sb_escaped(b, s->values[i], true);
        sb_str(b, "\"");
    }
    if (le != NULL) {
        if (f->n_labels > 0)
            sb_str(b, ",");
        sb_str(b, "le=\"");
        sb_str(b, le);
        sb_str(b, "\"");
    }
    sb_str(b, "}");
}

static int series_cmp(const void *pa, const void *pb)
{
    const struct series *a = *(const struct series *const *)pa;
    const struct series *b = *(const struct series *const *)pb;
    if (a->overflow != b->overflow)
        return a->overflow ? 1 : -1;
    for (size_t i = 0; i < a->n_labels; i++) {
        int c = strcmp(a->values[i], b->values[i]);
        if (c != 0)
            return c;
    }
    return 0;
}

static void render_family(struct sbuf *b, struct pw_metric *f)
{
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    struct series **list = NULL;
    size_t n = 0;

    sb_str(b, "# HELP ");
    sb_str(b, f->name);
    sb_str(b, " ");
    sb_escaped(b, f->help, false);
    sb_str(b, "\n# TYPE ");
    sb_str(b, f->name);
    sb_str(b, " ");
    sb_str(b, type_names[f->type]);
    sb_str(b, "\n");

    /* Copy the pointers under the read lock; series outlive it, values are atomics. */
    pthread_rwlock_rdlock(&f->lock);
    list = malloc((f->n_series + 1) * sizeof(*list)); /* + the overflow series */
    if (list == NULL) {
        pthread_rwlock_unlock(&f->lock);
        b->oom = true;
        return;
    }
    for (size_t i = 0; i < f->table_cap; i++) {
        if (f->table[i] != NULL)
            list[n++] = f->table[i];
    }
    pthread_rwlock_unlock(&f->lock);
    qsort(list, n, sizeof(*list), series_cmp);

    for (size_t k = 0; k < n; k++) {
        struct series *s = list[k];
        double value = bits_to_double(atomic_load_explicit(&s->value, memory_order_relaxed));
        if (f->type != METRIC_HISTOGRAM) {
            sb_str(b, f->name);
            sb_labels(b, f, s, NULL);
            sb_str(b, " ");
            sb_double(b, value);
            sb_str(b, "\n");
            continue;
        }
        uint64_t cum = 0;
        char le[32];
        for (size_t i = 0; i <= f->n_bounds; i++) {
            cum += atomic_load_explicit(&s->buckets[i], memory_order_relaxed);
            if (i < f->n_bounds)
                fmt_double(le, f->bounds[i]);
            else
                strcpy(le, "+Inf");
            sb_str(b, f->name);
            sb_str(b, "_bucket");
            sb_labels(b, f, s, le);
            sb_str(b, " ");
            sb_u64(b, cum);
            sb_str(b, "\n");
        }
        sb_str(b, f->name);
        sb_str(b, "_sum");
        sb_labels(b, f, s, NULL);
        sb_str(b, " ");
        sb_double(b, value);
        sb_str(b, "\n");
        sb_str(b, f->name);
        sb_str(b, "_count");
        sb_labels(b, f, s, NULL);
        sb_str(b, " ");
        sb_u64(b, cum);
        sb_str(b, "\n");
    }
    free(list);
}

enum pw_err pw_metrics_render(struct pw_metrics *reg, char **out, size_t *len)
{
    struct sbuf b = {0};

    if (reg == NULL || out == NULL || len == NULL)
        return PW_ERR_INVAL;
    *out = NULL;
    *len = 0;
    sb_reserve(&b, 0);
    pthread_mutex_lock(&reg->lock);
    for (size_t i = 0; i < reg->n_fams && !b.oom; i++)
        render_family(&b, reg->fams[i]);
    pthread_mutex_unlock(&reg->lock);
    if (b.oom) {
        free(b.p);
        return PW_ERR_NOMEM;
    }
    b.p[b.len] = '\0';
    *out = b.p;
    *len = b.len;
    return PW_OK;
}

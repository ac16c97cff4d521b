/*
 * Unit tests for pw_metrics: the exact exposition text of a small registry, escaping,
 * number formatting, name validation, the series cap and its overflow series, label value
 * cutting, and exact totals under concurrent observers with a concurrent renderer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pw_metrics.h"

/*
 * Renders and checks the length; the caller frees the result. noinline: gcc 12 at -O3
 * inlines it and then mistakes the result for a pointer to its local (-Wdangling-pointer).
 */
__attribute__((noinline)) static char *render(struct pw_metrics *reg)
{
    char *text = NULL;
    size_t len = 0;
    enum pw_err err = pw_metrics_render(reg, &text, &len);
    assert_int_equal(err, PW_OK);
    assert_non_null(text);
    assert_int_equal(strlen(text), len);
    return text;
}

static void test_exact_text(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *req, *depth, *lat, *empty;
    const char *req_labels[] = {"route", "code"};
    const char *lat_labels[] = {"fn"};
    const double bounds[] = {0.1, 1, INFINITY};

    assert_int_equal(
        pw_metrics_counter(reg, "pw_requests_total", "Requests served.", 2, req_labels, &req),
        PW_OK);
    assert_int_equal(pw_metrics_gauge(reg, "pw_queue_depth", "Queue depth.", 0, NULL, &depth),
                     PW_OK);
    assert_int_equal(pw_metrics_histogram(reg, "pw_latency_seconds", "Request latency.", 1,
                                          lat_labels, bounds, 3, &lat),
                     PW_OK);
    assert_int_equal(pw_metrics_gauge(reg, "pw_a_empty", "Never set.", 0, NULL, &empty), PW_OK);

    pw_metric_counter_add(req, (const char *[]){"POST /v1/chat/completions", "200"}, 1);
    pw_metric_counter_add(req, (const char *[]){"POST /v1/chat/completions", "200"}, 1);
    pw_metric_counter_add(req, (const char *[]){"GET /metrics", "200"}, 1);
    pw_metric_counter_add(req, (const char *[]){"GET /metrics", "200"}, -5); /* ignored */
    pw_metric_gauge_set(depth, NULL, 3);
    pw_metric_gauge_add(depth, NULL, 0.5);
    pw_metric_histogram_observe(lat, (const char *[]){"b"}, 0.1); /* le is inclusive */
    pw_metric_histogram_observe(lat, (const char *[]){"a"}, 0.25);
    pw_metric_histogram_observe(lat, (const char *[]){"a"}, 0.5);
    pw_metric_histogram_observe(lat, (const char *[]){"a"}, 2);

    char *out = render(reg);
    const char *want = "# HELP pw_a_empty Never set.\n"
                       "# TYPE pw_a_empty gauge\n"
                       "# HELP pw_latency_seconds Request latency.\n"
                       "# TYPE pw_latency_seconds histogram\n"
                       "pw_latency_seconds_bucket{fn=\"a\",le=\"0.1\"} 0\n"
                       "pw_latency_seconds_bucket{fn=\"a\",le=\"1\"} 2\n"
                       "pw_latency_seconds_bucket{fn=\"a\",le=\"+Inf\"} 3\n"
                       "pw_latency_seconds_sum{fn=\"a\"} 2.75\n"
                       "pw_latency_seconds_count{fn=\"a\"} 3\n"
                       "pw_latency_seconds_bucket{fn=\"b\",le=\"0.1\"} 1\n"
                       "pw_latency_seconds_bucket{fn=\"b\",le=\"1\"} 1\n"
                       "pw_latency_seconds_bucket{fn=\"b\",le=\"+Inf\"} 1\n"
                       "pw_latency_seconds_sum{fn=\"b\"} 0.1\n"
                       "pw_latency_seconds_count{fn=\"b\"} 1\n"
                       "# HELP pw_queue_depth Queue depth.\n"
                       "# TYPE pw_queue_depth gauge\n"
                       "pw_queue_depth 3.5\n"
                       "# HELP pw_requests_total Requests served.\n"
                       "# TYPE pw_requests_total counter\n"
                       "pw_requests_total{route=\"GET /metrics\",code=\"200\"} 1\n"
                       "pw_requests_total{route=\"POST /v1/chat/completions\",code=\"200\"} 2\n";
    assert_string_equal(out, want);
    free(out);
    pw_metrics_destroy(reg);
}

static void test_escaping_and_numbers(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *c, *g, *h;
    const char *l[] = {"v"};
    assert_int_equal(pw_metrics_counter(reg, "c", "Back\\slash and\nnewline \"quoted\".", 1, l, &c),
                     PW_OK);
    assert_int_equal(pw_metrics_gauge(reg, "g", "", 1, l, &g), PW_OK);
    assert_int_equal(pw_metrics_histogram(reg, "h", "Defaults.", 0, NULL, NULL, 0, &h), PW_OK);

    pw_metric_counter_add(c, (const char *[]){"a\\b\"c\nd"}, 1);
    pw_metric_counter_add(c, (const char *[]){NULL}, 0.1);
    pw_metric_counter_add(c, (const char *[]){NULL}, 0.1);
    pw_metric_counter_add(c, (const char *[]){NULL}, 0.1);
    pw_metric_gauge_set(g, (const char *[]){"inf"}, -INFINITY);
    pw_metric_gauge_set(g, (const char *[]){"nan"}, NAN);
    pw_metric_gauge_set(g, (const char *[]){"big"}, 1e300);
    pw_metric_gauge_set(g, (const char *[]){"int"}, 12345678);
    pw_metric_histogram_observe(h, NULL, 0.007);

    char *out = render(reg);
    assert_non_null(strstr(out, "# HELP c Back\\\\slash and\\nnewline \"quoted\".\n"));
    assert_non_null(strstr(out, "c{v=\"a\\\\b\\\"c\\nd\"} 1\n"));
    assert_non_null(strstr(out, "c{v=\"\"} 0.30000000000000004\n"));
    assert_non_null(strstr(out, "# HELP g \n"));
    assert_non_null(strstr(out, "g{v=\"inf\"} -Inf\n"));
    assert_non_null(strstr(out, "g{v=\"nan\"} NaN\n"));
    assert_non_null(strstr(out, "g{v=\"big\"} 1e+300\n"));
    assert_non_null(strstr(out, "g{v=\"int\"} 12345678\n"));
    assert_non_null(strstr(out, "h_bucket{le=\"0.005\"} 0\n"));
    assert_non_null(strstr(out, "h_bucket{le=\"0.01\"} 1\n"));
    assert_non_null(strstr(out, "h_bucket{le=\"300\"} 1\n"));
    assert_non_null(strstr(out, "h_bucket{le=\"+Inf\"} 1\n"));
    assert_non_null(strstr(out, "h_sum 0.007\n"));
    assert_non_null(strstr(out, "h_count 1\n"));
    free(out);
    pw_metrics_destroy(reg);
}

static void test_invalid_registrations(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *f = NULL;
    const char *dup[] = {"a", "a"};
    const char *reserved[] = {"__name"};
    const char *le[] = {"le"};
    const char *bad[] = {"a-b"};
    const double unsorted[] = {1, 0.5};
    const double nan_bound[] = {NAN};

    assert_int_equal(pw_metrics_counter(reg, "1abc", "", 0, NULL, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "a-b", "", 0, NULL, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "", "", 0, NULL, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "ok", "", 2, dup, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "ok", "", 1, reserved, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "ok", "", 1, bad, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_histogram(reg, "ok", "", 1, le, NULL, 0, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_histogram(reg, "ok", "", 0, NULL, unsorted, 2, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_histogram(reg, "ok", "", 0, NULL, nan_bound, 1, &f), PW_ERR_INVAL);
    assert_int_equal(pw_metrics_counter(reg, "ok", "", PW_METRICS_MAX_LABELS + 1, dup, &f),
                     PW_ERR_INVAL);
    assert_null(f);
    assert_int_equal(pw_metrics_counter(reg, "ns:ok_total", "", 1, le, &f), PW_OK);
    struct pw_metric *g = NULL;
    assert_int_equal(pw_metrics_gauge(reg, "ns:ok_total", "", 0, NULL, &g), PW_ERR_EXISTS);
    assert_null(g);
    pw_metrics_destroy(reg);
    pw_metrics_destroy(NULL);
}

static void test_series_cap_overflow(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *c;
    const char *l[] = {"user", "kind"};
    pw_metrics_set_series_cap(reg, 3);
    assert_int_equal(pw_metrics_counter(reg, "hits", "Hits.", 2, l, &c), PW_OK);
    char name[32];
    for (int i = 0; i < 10; i++) {
        snprintf(name, sizeof(name), "u%d", i);
        pw_metric_counter_add(c, (const char *[]){name, "x"}, 1);
    }
    pw_metric_counter_add(c, (const char *[]){"u1", "x"}, 1); /* existing: not overflow */

    char *out = render(reg);
    const char *want = "# HELP hits Hits.\n"
                       "# TYPE hits counter\n"
                       "hits{user=\"u0\",kind=\"x\"} 1\n"
                       "hits{user=\"u1\",kind=\"x\"} 2\n"
                       "hits{user=\"u2\",kind=\"x\"} 1\n"
                       "hits{user=\"__overflow__\",kind=\"__overflow__\"} 7\n";
    assert_string_equal(out, want);
    free(out);
    assert_int_equal(pw_metrics_lost(reg), 0);
    pw_metrics_destroy(reg);

    /* The default cap holds with many hostile values and memory stays bounded. */
    reg = pw_metrics_create();
    const char *one[] = {"v"};
    assert_int_equal(pw_metrics_counter(reg, "many", "", 1, one, &c), PW_OK);
    for (int i = 0; i < PW_METRICS_SERIES_CAP + 500; i++) {
        snprintf(name, sizeof(name), "%d", i);
        pw_metric_counter_add(c, (const char *[]){name}, 1);
    }
    out = render(reg);
    size_t lines = 0;
    for (const char *p = out; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 2 + PW_METRICS_SERIES_CAP + 1);
    assert_non_null(strstr(out, "many{v=\"__overflow__\"} 500\n"));
    free(out);
    pw_metrics_destroy(reg);
}

static void test_long_values_cut_at_char_boundary(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *g;
    const char *l[] = {"v"};
    assert_int_equal(pw_metrics_gauge(reg, "g", "", 1, l, &g), PW_OK);
    char val[256];
    val[0] = 'a';
    size_t n = 1;
    for (int i = 0; i < 100; i++) {
        val[n++] = (char)0xc3; /* U+00E9, two bytes */
        val[n++] = (char)0xa9;
    }
    val[n] = '\0';
    pw_metric_gauge_set(g, (const char *[]){val}, 1);
    /* Another value sharing the first 127 bytes lands in the same series. */
    val[150] = 'Z';
    pw_metric_gauge_add(g, (const char *[]){val}, 1);
    char *out = render(reg);
    char *start = strstr(out, "g{v=\"");
    assert_non_null(start);
    start += 5;
    size_t vlen = strcspn(start, "\"");
    assert_int_equal(vlen, 127);
    assert_int_equal(strcmp(start + vlen, "\"} 2\n"), 0);
    free(out);
    pw_metrics_destroy(reg);
}

/* ---- concurrency -------------------------------------------------------------------- */

enum { THREADS = 4, ITERS = 50000 };

struct ctx {
    struct pw_metric *c, *h, *g;
    int id;
    atomic_int *stop;
    struct pw_metrics *reg;
};

static void *observer(void *arg)
{
    struct ctx *x = arg;
    char mine[16];
    snprintf(mine, sizeof(mine), "t%d", x->id);
    for (int i = 0; i < ITERS; i++) {
        pw_metric_counter_add(x->c, (const char *[]){"shared"}, 1);
        pw_metric_counter_add(x->c, (const char *[]){mine}, 2);
        pw_metric_histogram_observe(x->h, NULL, (i % 4) * 0.5);
        pw_metric_gauge_add(x->g, NULL, 1);
        if (i % 1000 == 0) {
            /* New series while others observe: exercises the write path and growth. */
            char fresh[32];
            snprintf(fresh, sizeof(fresh), "n%d-%d", x->id, i);
            pw_metric_counter_add(x->c, (const char *[]){fresh}, 1);
        }
    }
    return NULL;
}

static void *renderer(void *arg)
{
    struct ctx *x = arg;
    while (!atomic_load(x->stop)) {
        char *out = NULL;
        size_t len;
        assert_int_equal(pw_metrics_render(x->reg, &out, &len), PW_OK);
        free(out);
    }
    return NULL;
}

static void test_concurrent_totals_exact(void **state)
{
    (void)state;
    struct pw_metrics *reg = pw_metrics_create();
    struct pw_metric *c, *h, *g;
    const char *l[] = {"who"};
    const double b[] = {0.5, 1};
    assert_int_equal(pw_metrics_counter(reg, "ops_total", "", 1, l, &c), PW_OK);
    assert_int_equal(pw_metrics_histogram(reg, "lat", "", 0, NULL, b, 2, &h), PW_OK);
    assert_int_equal(pw_metrics_gauge(reg, "inflight", "", 0, NULL, &g), PW_OK);

    atomic_int stop = 0;
    pthread_t th[THREADS], rt;
    struct ctx cx[THREADS], rc = {.reg = reg, .stop = &stop};
    assert_int_equal(pthread_create(&rt, NULL, renderer, &rc), 0);
    for (int i = 0; i < THREADS; i++) {
        cx[i] = (struct ctx){.c = c, .h = h, .g = g, .id = i, .reg = reg, .stop = &stop};
        assert_int_equal(pthread_create(&th[i], NULL, observer, &cx[i]), 0);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    atomic_store(&stop, 1);
    pthread_join(rt, NULL);

    char *out = render(reg);
    char line[128];
    snprintf(line, sizeof(line), "ops_total{who=\"shared\"} %d\n", THREADS * ITERS);
    assert_non_null(strstr(out, line));
    for (int i = 0; i < THREADS; i++) {
        snprintf(line, sizeof(line), "ops_total{who=\"t%d\"} %d\n", i, 2 * ITERS);
        assert_non_null(strstr(out, line));
        snprintf(line, sizeof(line), "ops_total{who=\"n%d-%d\"} 1\n", i, ITERS - 1000);
        assert_non_null(strstr(out, line));
    }
    /* Values 0, 0.5, 1, 1.5 in turn: half are <= 0.5, three quarters <= 1. */
    snprintf(line, sizeof(line), "lat_bucket{le=\"0.5\"} %d\n", THREADS * ITERS / 2);
    assert_non_null(strstr(out, line));
    snprintf(line, sizeof(line), "lat_bucket{le=\"1\"} %d\n", THREADS * ITERS / 4 * 3);
    assert_non_null(strstr(out, line));
    snprintf(line, sizeof(line), "lat_count %d\n", THREADS * ITERS);
    assert_non_null(strstr(out, line));
    snprintf(line, sizeof(line), "lat_sum %d\n", THREADS * ITERS / 4 * 3);
    assert_non_null(strstr(out, line));
    snprintf(line, sizeof(line), "inflight %d\n", THREADS * ITERS);
    assert_non_null(strstr(out, line));
    free(out);
    pw_metrics_destroy(reg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_text),
        cmocka_unit_test(test_escaping_and_numbers),
        cmocka_unit_test(test_invalid_registrations),
        cmocka_unit_test(test_series_cap_overflow),
        cmocka_unit_test(test_long_values_cut_at_char_boundary),
        cmocka_unit_test(test_concurrent_totals_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

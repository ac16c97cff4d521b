/*
 * bench_util: the process and clock helpers the benchmarks share (bench_batch,
 * bench_coldstart, bench_router). Plain C, no cmocka (unlike tests/support).
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <stddef.h>
#include <sys/types.h>

/* A free TCP port on 127.0.0.1 (bound, read back and released), or -1. */
int bench_free_port(void);
void bench_sleep_ms(int ms);
/* CLOCK_MONOTONIC in milliseconds, fractional. */
double bench_now_ms(void);
/* The 1-minute load average, or -1. */
double bench_loadavg1(void);
/* Starts argv[0] (searched in PATH) with stdout and stderr to log (truncated) and
 * SIGTERM when the benchmark dies. The child's pid, or -1. */
pid_t bench_spawn(char *const argv[], const char *log);
/* qsort comparator for doubles, ascending. */
int bench_cmp_double(const void *a, const void *b);
/* The median of v[0..n) (sorts v in place); -1 when n is 0. */
double bench_median(double *v, size_t n);

#endif

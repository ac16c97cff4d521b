/*
 * kernel_cpu_pool: the CPU backend's compute threads. The calling thread is thread 0 and
 * works too; n_threads - 1 workers wait for jobs, spinning briefly (jobs of one forward
 * step follow each other within microseconds) and then sleeping on a futex so an idle
 * engine burns no CPU. Nothing here allocates after init.
 */
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kernel_cpu_int.h"
#include "pw_clock.h"

#define POOL_SPIN_NS 300000ull /* spin this long for the next job before sleeping */

struct worker_arg {
    struct cpu_pool *p;
    int ith;
};

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void futex_wait(atomic_uint *addr, unsigned val)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(atomic_uint *addr)
{
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Waits until *gen != seen; returns the new value. */
static unsigned wait_gen(struct cpu_pool *p, unsigned seen)
{
    uint64_t t0 = 0;
    for (unsigned spins = 0;; spins++) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen)
            return g;
        if ((spins & 255u) == 255u) {
            uint64_t now = pw_clock_mono_ns();
            if (t0 == 0)
                t0 = now;
            else if (now - t0 > POOL_SPIN_NS) {
                atomic_fetch_add(&p->sleepers, 1);
                if (atomic_load(&p->gen) == seen)
                    futex_wait(&p->gen, seen);
                atomic_fetch_sub(&p->sleepers, 1);
                t0 = 0;
            }
        }
        cpu_relax();
    }
}

static void *worker_main(void *arg)
{
    struct worker_arg *wa = arg;
    struct cpu_pool *p = wa->p;
    int ith = wa->ith;
    free(wa);
    unsigned seen = 0; /* gen at init; the first job may be posted before we run */
    for (;;) {
        seen = wait_gen(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            break;
        p->fn(p->ctx, ith, p->n_threads);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
    return NULL;
}

enum pw_err cpu_pool_init(struct cpu_pool *p, int n_threads)
{
    enum pw_err err = PW_OK;
    *p = (struct cpu_pool){0};
    if (n_threads < 1)
        n_threads = 1;
    p->n_threads = 1;
    atomic_init(&p->gen, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->bar_count, 0);
    atomic_init(&p->bar_gen, 0);
    if (n_threads == 1)
        return PW_OK;
    p->threads = calloc((size_t)n_threads - 1, sizeof(pthread_t));
    if (!p->threads)
        return PW_ERR_NOMEM;
    p->n_threads = n_threads;
    for (int i = 1; i < n_threads; i++) {
        struct worker_arg *wa = malloc(sizeof(*wa));
        if (!wa) {
            err = PW_ERR_NOMEM;
            p->n_threads = i;
            goto out;
        }
        wa->p = p;
        wa->ith = i;
        if (pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
            free(wa);
            err = PW_ERR_INTERNAL;
            p->n_threads = i;
            goto out;
        }
    }
out:
    if (err) {
        cpu_pool_deinit(p);
    }
    return err;
}

void cpu_pool_deinit(struct cpu_pool *p)
{
    if (p->threads) {
        atomic_store_explicit(&p->stop, 1, memory_order_release);
        atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
        futex_wake_all(&p->gen);
        for (int i = 1; i < p->n_threads; i++)
            pthread_join(p->threads[i - 1], NULL);
        free(p->threads);
    }
    p->threads = NULL;
    p->n_threads = 1;
}

void cpu_pool_run(struct cpu_pool *p, cpu_pool_fn fn, void *ctx)
{
    if (p->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->pending, p->n_threads - 1, memory_order_relaxed);
    /* seq_cst pairs with the worker's sleepers++ then gen check: no lost wake-up. */
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->sleepers) > 0)
        futex_wake_all(&p->gen);
    fn(ctx, 0, p->n_threads);
    for (unsigned spins = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; spins++) {
        if ((spins & 4095u) == 4095u)
            sched_yield(); /* a worker may have lost its core to another process */
        cpu_relax();
    }
}

void cpu_pool_barrier(struct cpu_pool *p)
{
    int n = p->n_threads;
    if (n == 1)
        return;
    unsigned g = atomic_load_explicit(&p->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == n - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_gen, 1, memory_order_release);
        return;
    }
    for (unsigned spins = 0; atomic_load_explicit(&p->bar_gen, memory_order_acquire) == g;
         spins++) {
        if ((spins & 4095u) == 4095u)
            sched_yield();
        cpu_relax();
    }
}

/* pw_clock: thin wrappers over clock_gettime. */
#include "pw_clock.h"

#include <time.h>

uint64_t pw_clock_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t pw_clock_mono_ms(void)
{
    return pw_clock_mono_ns() / 1000000ull;
}

int64_t pw_clock_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * pw_clock: the two clocks the project uses. Monotonic for durations and deadlines inside
 * one process; wall (Unix epoch) for anything that crosses processes or lands in Redis.
 * Thread-safe.
 */
#ifndef PW_CLOCK_H
#define PW_CLOCK_H

#include <stdint.h>

/* Monotonic time in nanoseconds / milliseconds since an arbitrary start. */
uint64_t pw_clock_mono_ns(void);
uint64_t pw_clock_mono_ms(void);

/* Wall-clock time since the Unix epoch, in milliseconds. */
int64_t pw_clock_wall_ms(void);

#endif

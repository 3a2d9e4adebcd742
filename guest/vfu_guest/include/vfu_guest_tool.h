/*
 * What the project's static guest tools (bench/loadgen.c, tests/guest/soak.c) share: a
 * monotonic clock in seconds and a cheap per-thread PRNG. Header-only, so that each tool
 * stays one gcc call (vfu_guest.static.build_static adds this directory to the include path).
 */
#ifndef VFU_GUEST_TOOL_H
#define VFU_GUEST_TOOL_H

#include <stdint.h>
#include <time.h>

static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* xorshift64: the state must start non-zero. */
static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

#endif

/* native/ratelimit.c under ASan and UBSan (tests/unit/test_virtq_asan.py): random and
 * extreme configurations, as a writer that is not us may publish them (sizes up to and
 * past 2^63, refill times from 1 ns to past an hour, bursts of 2^64 - 1), charged with
 * random and extreme request sizes. Checks the rules that hold whatever the numbers:
 * a wait is never 0 when the request was not charged, a bucket's budget never exceeds
 * its size, and an off bucket never throttles. Signed overflow in the 128-bit
 * arithmetic would be a UBSan error. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ratelimit.h"

static uint64_t state = 0x9E3779B97F4A7C15u;

static uint64_t next(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static uint64_t pick(void)
{
    static const uint64_t edges[] = { 0, 1, 2, 9, 10, 4096, 131072, UINT32_MAX,
                                      (uint64_t)INT64_MAX - 1, (uint64_t)INT64_MAX,
                                      (uint64_t)INT64_MAX + 1, UINT64_MAX - 1, UINT64_MAX,
                                      RL_MAX_REFILL_NS, RL_MAX_REFILL_NS + 1 };

    switch (next() % 4) {
    case 0:
        return edges[next() % (sizeof edges / sizeof edges[0])];
    case 1:
        return next();
    case 2:
        return next() % 100000;
    default:
        return next() % 1000000000u;
    }
}

static void params(struct rl_params *p)
{
    p->size = pick();
    p->one_time_burst = next() % 3 ? 0 : pick();
    p->refill_ns = pick();
}

int main(void)
{
    struct rl_config config = { 0 };
    struct rl_limiter limiter;
    unsigned long waits = 0, charged = 0, changes = 0;

    if (rl_init(&limiter, &config))
        return 1;
    for (int round = 0; round < 200000; round++) {
        if (next() % 50 == 0) {
            struct rl_params ops, bytes;

            params(&ops);
            params(&bytes);
            rl_configure(&config, &ops, &bytes);
            changes++;
        }
        uint64_t bytes = pick(), wait = rl_consume(&limiter, bytes, 0);

        if (wait) {
            waits++;
            if (!limiter.on) {
                printf("an off limiter throttled\n");
                return 1;
            }
        } else {
            charged++;
        }
        if ((limiter.ops.p.size && limiter.ops.budget > (int64_t)limiter.ops.p.size) ||
            (limiter.bytes.p.size && limiter.bytes.budget > (int64_t)limiter.bytes.p.size)) {
            printf("a budget above its size\n");
            return 1;
        }
        if (next() % 1000 == 0) {
            struct timespec nap = { 0, 100000 };
            nanosleep(&nap, NULL);          /* let refills happen */
        }
    }
    printf("200000 iterations: %lu charged %lu waits %lu changes\n", charged, waits, changes);
    return 0;
}

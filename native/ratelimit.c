/* Token buckets: see ratelimit.h. Times are CLOCK_MONOTONIC (the vDSO: no system call
 * per request). Products of a time and a size are taken in 128 bits: sizes go up to
 * 2^63 and refill times to an hour in nanoseconds. */
#define _GNU_SOURCE
#include "ratelimit.h"

#include <errno.h>
#include <string.h>
#include <time.h>

typedef unsigned __int128 u128;

uint64_t rl_now(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int rl_init(struct rl_limiter *l, const volatile struct rl_config *config)
{
    memset(&l->ops, 0, sizeof l->ops);
    memset(&l->bytes, 0, sizeof l->bytes);
    l->config = config;
    l->seen = UINT64_MAX;        /* no sequence has this (they are even): read it first */
    l->on = 0;
    return -pthread_mutex_init(&l->lock, NULL);
}

void rl_configure(volatile struct rl_config *config, const struct rl_params *ops,
                  const struct rl_params *bytes)
{
    uint64_t sequence = config->sequence | 1;

    __atomic_store_n(&config->sequence, sequence, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    config->ops.size = ops->size;
    config->ops.one_time_burst = ops->one_time_burst;
    config->ops.refill_ns = ops->refill_ns;
    config->bytes.size = bytes->size;
    config->bytes.one_time_burst = bytes->one_time_burst;
    config->bytes.refill_ns = bytes->refill_ns;
    __atomic_store_n(&config->sequence, sequence + 1, __ATOMIC_RELEASE);
}

/* A full bucket from params that another process wrote: anything out of range is off. */
static void bucket_set(struct rl_bucket *b, struct rl_params p, uint64_t now)
{
    if (p.size == 0 || p.size > INT64_MAX || p.refill_ns == 0 || p.refill_ns > RL_MAX_REFILL_NS)
        p.size = 0;
    b->p = p;
    b->budget = (int64_t)p.size;
    b->burst = p.size ? p.one_time_burst : 0;
    b->last_ns = now;
}

/* Takes a new configuration if one was published; whether a bucket is on. */
static int reload(struct rl_limiter *l, uint64_t sequence)
{
    struct rl_params ops, bytes;
    uint64_t now;

    if (sequence & 1)
        return l->on;                            /* being written: the old one meanwhile */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    ops.size = l->config->ops.size;
    ops.one_time_burst = l->config->ops.one_time_burst;
    ops.refill_ns = l->config->ops.refill_ns;
    bytes.size = l->config->bytes.size;
    bytes.one_time_burst = l->config->bytes.one_time_burst;
    bytes.refill_ns = l->config->bytes.refill_ns;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&l->config->sequence, __ATOMIC_RELAXED) != sequence)
        return l->on;                            /* changed while we read: next time */
    now = rl_now();
    bucket_set(&l->ops, ops, now);
    bucket_set(&l->bytes, bytes, now);
    __atomic_store_n(&l->on, l->ops.p.size || l->bytes.p.size, __ATOMIC_RELAXED);
    __atomic_store_n(&l->seen, sequence, __ATOMIC_RELAXED);
    return l->on;
}

/* a * b / c, rounded down: in 64 bits when a * b fits (every request's refill under a
 * limit of up to ~10^10 tokens per refill, the time since the last one being short),
 * else in 128 (a division of those costs several times one of 64 bits). */
static u128 muldiv(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t product;

    if (!__builtin_mul_overflow(a, b, &product))
        return product / c;
    return (u128)a * b / c;
}

static void refill(struct rl_bucket *b, uint64_t now)
{
    u128 added = muldiv(now - b->last_ns, b->p.size, b->p.refill_ns);
    __int128 budget = (__int128)b->budget + (__int128)added;

    if (added == 0)
        return;                                  /* keep last_ns: the time adds up */
    if (budget >= (__int128)b->p.size) {         /* full (a debt is paid first) */
        b->budget = (int64_t)b->p.size;
        b->last_ns = now;
        return;
    }
    b->budget = (int64_t)budget;                 /* below size: fits */
    /* Advance by the time those tokens took, not to now: the rest counts next time. */
    b->last_ns += (uint64_t)muldiv((uint64_t)added, b->p.refill_ns, b->p.size);
}

/* What the bucket still needs from its regular budget for `tokens` after the one-time
 * burst (0 when the burst pays it all). */
static uint64_t after_burst(const struct rl_bucket *b, uint64_t tokens)
{
    return tokens > b->burst ? tokens - b->burst : 0;
}

/* Nanoseconds until the bucket can pay `tokens` (0: now). */
static uint64_t wait_for(const struct rl_bucket *b, uint64_t tokens)
{
    uint64_t need = after_burst(b, tokens);
    int64_t want;
    u128 missing;

    if (b->p.size == 0 || need == 0)
        return 0;
    want = (int64_t)(need < b->p.size ? need : b->p.size);   /* above size: a full bucket */
    if (b->budget >= want)
        return 0;
    missing = (u128)((uint64_t)want - (uint64_t)b->budget);  /* want > budget */
    return (uint64_t)((missing * b->p.refill_ns + b->p.size - 1) / b->p.size);
}

static void charge(struct rl_bucket *b, uint64_t tokens)
{
    uint64_t need = after_burst(b, tokens);

    if (b->p.size == 0)
        return;
    b->burst -= tokens - need;
    b->budget -= (int64_t)(need < (uint64_t)INT64_MAX ? need : (uint64_t)INT64_MAX);
}

uint64_t rl_consume(struct rl_limiter *l, uint64_t bytes, uint64_t now)
{
    uint64_t sequence, wait, wait_bytes;

    if (!l)
        return 0;
    /* The common case, no limit and no change, without the lock. */
    sequence = __atomic_load_n(&l->config->sequence, __ATOMIC_ACQUIRE);
    if (sequence == __atomic_load_n(&l->seen, __ATOMIC_RELAXED) &&
        !__atomic_load_n(&l->on, __ATOMIC_RELAXED))
        return 0;
    pthread_mutex_lock(&l->lock);
    if (sequence != l->seen && !reload(l, sequence)) {
        pthread_mutex_unlock(&l->lock);
        return 0;
    }
    if (!now)
        now = rl_now();
    if (l->ops.p.size)
        refill(&l->ops, now);
    if (l->bytes.p.size)
        refill(&l->bytes, now);
    wait = wait_for(&l->ops, 1);
    wait_bytes = wait_for(&l->bytes, bytes);
    if (wait_bytes > wait)
        wait = wait_bytes;
    if (wait == 0) {
        charge(&l->ops, 1);
        charge(&l->bytes, bytes);
    }
    pthread_mutex_unlock(&l->lock);
    return wait;
}

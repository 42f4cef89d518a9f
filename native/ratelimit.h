/* Token-bucket rate limiters for the data paths (Firecracker's semantics, docs/limits.md).
 *
 * A limiter has up to two buckets, one counting operations and one counting bytes; a
 * bucket of size 0 is off. Each starts full, refills lazily and proportionally (size
 * tokens per refill_ns) up to its size, and may hold a one-time burst that is spent
 * before the regular budget and never refills. A request costs 1 op and its data bytes;
 * it goes ahead when both buckets can pay, else it waits (rl_consume says how long):
 * never refused. A request costing more than a bucket's size goes ahead once that bucket
 * is full and leaves it in debt: later requests wait until the debt is refilled, so a
 * large request blocks the limiter in proportion to its size.
 *
 * The parameters live in a struct rl_config that another process may write (the
 * launcher, when a QMP client changes a limit): a sequence count, odd while the writer
 * is in the middle, makes each change atomic. The limiter notices a new generation at
 * its next rl_consume, checks the values (a bucket with a size and no refill time is
 * off) and refills both buckets to full, as Firecracker's update does.
 *
 * One limiter may be shared by the worker threads of several queues: its state is
 * under a mutex, taken only while some bucket is on.
 */
#ifndef VMM_RATELIMIT_H
#define VMM_RATELIMIT_H

#include <pthread.h>
#include <stdint.h>

#define RL_MAX_REFILL_NS (UINT64_C(3600) * 1000000000)   /* an hour */

struct rl_params {
    uint64_t size;               /* tokens; 0: the bucket is off */
    uint64_t one_time_burst;     /* tokens spent first, never refilled */
    uint64_t refill_ns;          /* time to refill `size` tokens: 1..RL_MAX_REFILL_NS */
};

/* Shared with the writer (one 64-byte line). */
struct rl_config {
    uint64_t sequence;           /* even: stable; odd: being written */
    struct rl_params ops, bytes;
    uint64_t reserved;
};

struct rl_bucket {
    struct rl_params p;
    int64_t budget;              /* may be negative: the debt of a request above size */
    uint64_t burst;              /* what is left of the one-time burst */
    uint64_t last_ns;            /* when the budget was last refilled */
};

struct rl_limiter {
    const volatile struct rl_config *config;
    uint64_t seen;               /* the config's sequence the buckets were made from */
    int on;                      /* some bucket has a size */
    pthread_mutex_t lock;
    struct rl_bucket ops, bytes;
};

/* Binds a zeroed limiter to its configuration (which must stay mapped); the first
 * rl_consume reads it. 0, or -errno from pthread_mutex_init. */
int rl_init(struct rl_limiter *l, const volatile struct rl_config *config);

/* Writes params into config as one change (the writer's side, single writer). */
void rl_configure(volatile struct rl_config *config, const struct rl_params *ops,
                  const struct rl_params *bytes);

/* Charges a request of `bytes` data bytes (and one op) if the buckets can pay now:
 * 0. Otherwise nothing is charged and the answer is the nanoseconds until they can
 * (at least 1); the data paths count the waits in their statistics. `now`: CLOCK_MONOTONIC in ns if the caller has it (a batch's start),
 * else 0 and it is read here, only when a bucket is on. NULL limiter: always 0. */
uint64_t rl_consume(struct rl_limiter *l, uint64_t bytes, uint64_t now);

/* CLOCK_MONOTONIC in ns (the vDSO: no system call). */
uint64_t rl_now(void);

#endif

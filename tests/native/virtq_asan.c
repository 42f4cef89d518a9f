/* AddressSanitizer/UBSan driver for native/virtq.c (run by tests/unit/test_virtq_asan.py).
 *
 * Guest RAM is two malloc'ed blocks registered as the regions [0, 1 MiB) and
 * [4 GiB, 4 GiB + 64 KiB): ASan's redzones around each block catch any access by the
 * walker outside guest RAM, including one that strays from one region into the other.
 * The driver runs fixed hostile cases, then random rings (a fixed seed, a bounded
 * number of iterations): well-formed rings with a few corrupted bytes, and rings of
 * random bytes, with the rings themselves placed at random (some flush against a
 * block's end). Every chain handed out is checked against the region table and has
 * every byte touched. Half of the random rings also get a vhost-user inflight region
 * (a malloc'ed block of exactly the size its queue size needs, so ASan sees any access
 * past it) that is fresh, plausible, or random bytes, as a dead backend or a hostile
 * frontend could leave it. Exit status 0 when all is well; ASan/UBSan abort otherwise.
 *
 * `virtq_asan overflow` reads one byte past guest RAM on purpose: the test uses it to
 * show that this build would catch an overflow.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "virtq.h"

#define RAM0_GPA  0ull
#define RAM0_SIZE (1u << 20)
#define RAM1_GPA  (4ull << 30)
#define RAM1_SIZE (1u << 16)
#define ITERATIONS 100000
#define TABLE_GPA 0xC0000ull   /* indirect tables in random rings */
#define BUF_GPA   0xD0000ull   /* plausible buffers */

static uint8_t *ram0, *ram1;
static struct vq_region regions[2];
static struct vq q;
static struct vq_chain chain;
static unsigned long chains, brokens, empties, setups_refused;
static unsigned long regions_taken, regions_refused, resubmitted;

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "virtq_asan: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    exit(1); } } while (0)

/* xorshift64*: deterministic, seeded */
static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static uint8_t *host(uint64_t gpa)
{
    if (gpa - RAM0_GPA < RAM0_SIZE)
        return ram0 + (gpa - RAM0_GPA);
    CHECK(gpa >= RAM1_GPA && gpa < RAM1_GPA + RAM1_SIZE);
    return ram1 + (gpa - RAM1_GPA);
}

static void put16(uint64_t gpa, uint16_t v) { memcpy(host(gpa), &v, 2); }

static void put_desc(uint64_t table, uint32_t i, uint64_t addr, uint32_t len, uint16_t flags,
                     uint16_t next)
{
    uint8_t *p = host(table + 16ull * i);
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

static int inside_ram(const uint8_t *p, uint32_t len)
{
    uintptr_t a = (uintptr_t)p;
    if (a >= (uintptr_t)ram0 && a - (uintptr_t)ram0 < RAM0_SIZE)
        return len <= RAM0_SIZE - (a - (uintptr_t)ram0);
    if (a >= (uintptr_t)ram1 && a - (uintptr_t)ram1 < RAM1_SIZE)
        return len <= RAM1_SIZE - (a - (uintptr_t)ram1);
    return 0;
}

/* Checks a chain vq_pop handed out and touches all of it, as a backend would. */
static void consume(const struct vq_chain *c)
{
    uint64_t readable = 0, writable = 0;
    volatile uint8_t sink = 0;
    uint32_t i;

    CHECK(c->head < q.num);
    CHECK(c->nsegs >= 1 && c->nsegs <= VQ_MAX_SEGS && c->nreadable <= c->nsegs);
    for (i = 0; i < c->nsegs; i++) {
        const struct vq_seg *s = &c->segs[i];
        CHECK(s->len > 0 && inside_ram(s->addr, s->len));
        CHECK(s->is_write == (i >= c->nreadable));
        if (s->is_write) {
            memset(s->addr, 0xA5, s->len);
            writable += s->len;
        } else {
            sink ^= s->addr[0];
            sink ^= s->addr[s->len - 1];
            readable += s->len;
        }
    }
    (void)sink;
    CHECK(readable == c->readable_bytes && writable == c->writable_bytes);
    CHECK(readable + writable <= (1ull << 32));
}

/* Pops until empty or broken; gives every chain back, half the time in the order
 * popped, else as an asynchronous backend would: held, then completed in a random order,
 * some of them only after the queue broke (vq_add_used_late). Half the time with
 * EVENT_IDX, kicks turned off and on as a worker does. Returns the last vq_pop result. */
static int drain(void)
{
    static uint16_t held[32768];
    static uint32_t lens[32768];
    uint32_t nheld = 0, i;
    int rc, rounds = 0, later = below(2);

    if (below(2))
        vq_set_event_idx(&q, 1);
    vq_set_notify(&q, 0);
    while ((rc = vq_pop(&q, &chain)) == 1) {
        chains++;
        consume(&chain);
        if (later) {
            held[nheld] = chain.head;
            lens[nheld++] = (uint32_t)chain.writable_bytes;
        } else {
            vq_push(&q, chain.head, (uint32_t)chain.writable_bytes);
            (void)vq_needs_interrupt(&q);
        }
        CHECK(++rounds <= (int)q.num);   /* at most num chains can be pending */
        if (below(16) == 0) {
            vq_set_notify(&q, 1);
            (void)vq_pending(&q);
            vq_set_notify(&q, 0);
        }
    }
    for (i = nheld; i > 1; i--) {        /* shuffled: completions out of order */
        uint32_t j = (uint32_t)below(i), t = lens[i - 1];
        uint16_t h = held[i - 1];
        held[i - 1] = held[j];
        lens[i - 1] = lens[j];
        held[j] = h;
        lens[j] = t;
    }
    for (i = 0; i < nheld; i++) {
        vq_add_used_late(&q, held[i], lens[i]);
        if (below(4) == 0 || i + 1 == nheld) {
            vq_publish_used(&q);
            (void)vq_needs_interrupt(&q);
        }
    }
    if (rc == 0) {
        empties++;
        vq_set_notify(&q, 1);
        CHECK(vq_pending(&q) == 0);
    } else {
        CHECK(rc == -EINVAL && q.broken);
        brokens++;
        CHECK(vq_pop(&q, &chain) == -EINVAL);     /* and it stays broken */
        vq_push(&q, 0, 0);
        vq_set_notify(&q, 1);
        CHECK(vq_needs_interrupt(&q) == 0 && vq_pending(&q) == 0);
    }
    return rc;
}

static int setup(uint32_t num, uint64_t desc, uint64_t avail, uint64_t used, uint16_t last)
{
    return vq_setup(&q, regions, 2, num, desc, avail, used, last);
}

/* ---- fixed cases ---------------------------------------------------------------- */

static void fixed_cases(void)
{
    const uint64_t D = 0, A = 0x80000, U = 0x90000;
    uint32_t i;

    /* A plain request: header, data, status. */
    memset(ram0, 0, 0xC0000);
    CHECK(setup(256, D, A, U, 0) == 0);
    put_desc(D, 0, BUF_GPA, 16, VQ_DESC_F_NEXT, 1);
    put_desc(D, 1, RAM1_GPA, 4096, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT, 2);
    put_desc(D, 2, RAM1_GPA + RAM1_SIZE - 1, 1, VQ_DESC_F_WRITE, 0);
    put16(A + 4, 0);
    put16(A + 2, 1);
    CHECK(vq_pop(&q, &chain) == 1 && chain.nsegs == 3 && chain.nreadable == 1);
    consume(&chain);
    vq_push(&q, chain.head, 4097);
    CHECK(vq_pop(&q, &chain) == 0);

    /* The largest queue, chained into one long loop: stops after num + 1 steps. */
    CHECK(setup(32768, D, A, U, 0) == 0);
    for (i = 0; i < 32768; i++)
        put_desc(D, i, BUF_GPA, 1, VQ_DESC_F_NEXT, (uint16_t)((i + 1) % 32768));
    put16(A + 4, 0);
    put16(A + 2, 1);
    CHECK(drain() == -EINVAL);

    /* Buffers wrapping around 2^64, in the hole between the regions, past the end. */
    {
        static const uint64_t bad[][2] = {
            { UINT64_MAX - 7, 16 }, { UINT64_MAX, 0xFFFFFFFFu }, { RAM0_SIZE - 8, 16 },
            { RAM0_SIZE, 1 }, { RAM1_GPA - 1, 2 }, { RAM1_GPA + RAM1_SIZE, 1 },
            { RAM1_GPA + RAM1_SIZE - 1, 2 }, { RAM0_SIZE - 1, 0xFFFFFFFFu },
        };
        for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            memset(ram0, 0, 0x1000);
            CHECK(setup(4, D, A, U, 0) == 0);
            put_desc(D, 0, bad[i][0], (uint32_t)bad[i][1], (uint16_t)(i & 1 ? VQ_DESC_F_WRITE : 0), 0);
            put16(A + 4, 0);
            put16(A + 2, 1);
            CHECK(drain() == -EINVAL);
        }
    }

    /* An indirect table exactly at the end of a block, and one byte too long. */
    CHECK(setup(4, D, A, U, 0) == 0);
    put_desc(D, 0, RAM1_GPA + RAM1_SIZE - 32, 32, VQ_DESC_F_INDIRECT, 0);
    put_desc(RAM1_GPA + RAM1_SIZE - 32, 0, BUF_GPA, 8, VQ_DESC_F_NEXT, 1);
    put_desc(RAM1_GPA + RAM1_SIZE - 32, 1, BUF_GPA, 8, VQ_DESC_F_WRITE, 0);
    put16(A + 4, 0);
    put16(A + 2, 1);
    CHECK(drain() == 0 && chains > 0);
    CHECK(setup(4, D, A, U, 0) == 0);
    put_desc(D, 0, RAM1_GPA + RAM1_SIZE - 32, 48, VQ_DESC_F_INDIRECT, 0);
    CHECK(drain() == -EINVAL);

    /* Rings that do not fit or are misaligned are refused. */
    CHECK(setup(4, RAM0_SIZE - 48, A, U, 0) == -EINVAL);
    CHECK(setup(4, D, RAM1_GPA + RAM1_SIZE - 12, U, 0) == -EINVAL);
    CHECK(setup(4, D, A, RAM1_GPA + RAM1_SIZE - 36, 0) == -EINVAL);
    CHECK(setup(4, D + 8, A, U, 0) == -EINVAL);
    CHECK(setup(4, D, A + 1, U, 0) == -EINVAL);
    CHECK(setup(4, D, A, U + 2, 0) == -EINVAL);
    CHECK(setup(6, D, A, U, 0) == -EINVAL);
    CHECK(setup(65536, D, A, U, 0) == -EINVAL);
    CHECK(vq_pop(&q, &chain) == -EINVAL);    /* a refused setup leaves the queue broken */
}

/* A resubmission order and a half-cleared batch, checked exactly. */
static void inflight_cases(void)
{
    const uint64_t D = 0, A = 0x80000, U = 0x90000;
    uint64_t size = vq_inflight_queue_bytes(8);
    struct vq_inflight *r = calloc(1, size);
    static const uint16_t heads[] = { 5, 2, 7, 0 };
    uint32_t i;

    CHECK(r && size == 192);
    memset(ram0, 0, 0xC0000);
    for (i = 0; i < 8; i++)
        put_desc(D, i, BUF_GPA, 16, VQ_DESC_F_WRITE, 0);
    for (i = 0; i < 4; i++)
        put16(A + 4 + 2 * i, heads[i]);
    put16(A + 2, 4);
    put16(U + 2, 1);                          /* head 5 was published */
    r->version = VQ_INFLIGHT_VERSION;
    r->used_idx = 0;                          /* ... but not cleared */
    r->last_batch_head = 5;
    r->desc[5] = (struct vq_inflight_desc){ 1, {0}, 7, 0 };
    r->desc[2] = (struct vq_inflight_desc){ 1, {0}, 0, 9 };
    r->desc[7] = (struct vq_inflight_desc){ 1, {0}, 0, 3 };
    r->desc[6] = (struct vq_inflight_desc){ 2, {0}, 0, 1 };   /* not exactly 1: ignored */
    CHECK(setup(8, D, A, U, 1) == 0);
    CHECK(vq_inflight_start(&q, (uint8_t *)r, 8) == 2);
    CHECK(r->desc[5].inflight == 0 && r->desc[7].inflight == 1 && r->used_idx == 1);
    CHECK(vq_pop(&q, &chain) == 1 && chain.head == 7);      /* counter 3 */
    CHECK(vq_pop(&q, &chain) == 1 && chain.head == 2);      /* counter 9 */
    CHECK(vq_pop(&q, &chain) == 1 && chain.head == 0);      /* avail 3: used + 2 */
    CHECK(r->desc[0].inflight == 1 && r->desc[0].counter == 10);
    CHECK(vq_pop(&q, &chain) == 0);
    vq_add_used(&q, 7, 1);
    vq_add_used(&q, 0, 1);
    CHECK(r->desc[7].inflight == 1 && r->last_batch_head == 0 && r->desc[0].next == 7);
    vq_publish_used(&q);
    CHECK(r->desc[7].inflight == 0 && r->desc[0].inflight == 0 && r->desc[2].inflight == 1);
    CHECK(r->used_idx == 3);
    /* A ring bigger than the region, and unknown versions, are refused. */
    CHECK(setup(16, D, A, U, 0) == 0 && vq_inflight_start(&q, (uint8_t *)r, 8) == -EINVAL);
    r->version = 2;
    CHECK(setup(8, D, A, U, 0) == 0 && vq_inflight_start(&q, (uint8_t *)r, 8) == -EINVAL);
    CHECK(q.inflight == NULL);
    free(r);
}

/* ---- random rings ----------------------------------------------------------------- */

static uint64_t random_addr(void)
{
    switch (below(10)) {
    case 0: return rnd();
    case 1: return UINT64_MAX - below(64);
    case 2: return RAM0_SIZE - below(64);
    case 3: return RAM1_GPA + RAM1_SIZE - below(64);
    case 4: return RAM1_GPA - below(64);
    case 5: return TABLE_GPA + 16 * below(8);
    default: return BUF_GPA + below(0x1000);
    }
}

static uint32_t random_len(void)
{
    switch (below(8)) {
    case 0: return (uint32_t)rnd();
    case 1: return 0;
    case 2: return 16 * (uint32_t)below(10);
    case 3: return 0xFFFFFFFFu - (uint32_t)below(4);
    default: return 1 + (uint32_t)below(0x200);
    }
}

static uint16_t random_flags(void)
{
    return below(8) == 0 ? (uint16_t)rnd() : (uint16_t)below(8);
}

/* A ring layout somewhere in RAM: rings aligned as required, sometimes flush with the
 * end of a block; sometimes deliberately bad, to exercise setup's refusals. */
static int random_setup(uint32_t num, uint64_t *desc, uint64_t *avail, uint16_t last)
{
    uint64_t used;
    int rc;

    *desc = 0;
    *avail = 0x80000;
    used = 0x90000;
    switch (below(6)) {
    case 0:
        *desc = (RAM1_GPA + RAM1_SIZE - 16ull * num) & ~15ull;
        break;
    case 1:
        *avail = (RAM0_SIZE - (6 + 2ull * num)) & ~1ull;
        used = (RAM1_GPA + RAM1_SIZE - (6 + 8ull * num)) & ~3ull;
        break;
    case 2:
        *desc = random_addr() & ~15ull;
        used = random_addr();
        break;
    }
    rc = setup(num, *desc, *avail, used, last);
    if (rc) {
        setups_refused++;
        CHECK(vq_pop(&q, &chain) == -EINVAL);
    } else {
        CHECK(inside_ram(q.desc, 16 * num) && inside_ram(q.avail, 6 + 2 * num) &&
              inside_ram(q.used, 6 + 8 * num));
    }
    return rc;
}

/* Gives the queue just set up a region (fresh, plausible or random), drains it. */
static void random_region(uint32_t num)
{
    uint32_t queue_size = below(8) ? num + (uint32_t)below(VQ_INFLIGHT_MAX_QUEUE - num + 1)
                                   : (uint32_t)below(VQ_INFLIGHT_MAX_QUEUE + 1);
    uint64_t size = vq_inflight_queue_bytes(queue_size), i;
    uint8_t *region = malloc(size ? size : 1);
    struct vq_inflight *r = (struct vq_inflight *)region;
    int rc, kind = (int)below(3);

    CHECK(region && size >= 16 + 16ull * queue_size);
    for (i = 0; i < size; i++)
        region[i] = kind == 0 ? 0 : (uint8_t)rnd();
    if (kind == 1) {                  /* plausible: version 1, flags 0 or 1, some links */
        r->version = VQ_INFLIGHT_VERSION;
        r->used_idx = (uint16_t)(q.used_idx - below(4));
        r->last_batch_head = (uint16_t)(below(4) ? below(queue_size + 1) : rnd());
        for (i = 0; i < queue_size; i++) {
            r->desc[i].inflight = (uint8_t)(below(4) == 0);
            r->desc[i].next = (uint16_t)(below(4) ? below(queue_size + 1) : rnd());
        }
    } else if (kind == 2 && below(2)) {
        r->version = VQ_INFLIGHT_VERSION;
    }
    rc = vq_inflight_start(&q, region, queue_size);
    if (rc < 0) {
        regions_refused++;
        CHECK(rc == -EINVAL && q.inflight == NULL);
    } else {
        regions_taken++;
        resubmitted += (unsigned long)rc;
        CHECK((uint32_t)rc <= num && q.inflight == r);
    }
    drain();
    free(region);
}

static void random_ring(void)
{
    uint32_t num = 1u << below(11), i, nheads = 0;
    uint16_t last = (uint16_t)rnd(), heads[1024];
    uint64_t desc, avail;
    int hostile = below(3) == 0;

    if (random_setup(num, &desc, &avail, last))
        return;
    if (hostile) {
        for (i = 0; i < num; i++)
            put_desc(desc, i, random_addr(), random_len(), random_flags(),
                     (uint16_t)(below(4) ? below(num + 2) : rnd()));
        for (i = 0; i < 8; i++)
            put_desc(TABLE_GPA, i, random_addr(), random_len(), random_flags(),
                     (uint16_t)below(10));
        for (i = 0; i < num; i++)
            heads[nheads++] = (uint16_t)(below(8) ? below(num) : rnd());
    } else {
        /* Chains over a shuffled set of descriptors: readable first, then writable,
         * some ending in the indirect table. */
        uint16_t order[1024];
        for (i = 0; i < num; i++)
            order[i] = (uint16_t)i;
        for (i = num; i > 1; i--) {
            uint32_t j = (uint32_t)below(i);
            uint16_t t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
        for (i = 0; i < num;) {
            uint32_t len = 1 + (uint32_t)below(num - i < 8 ? num - i : 8), k;
            uint32_t readable = (uint32_t)below(len + 1);
            heads[nheads++] = order[i];
            for (k = 0; k < len; k++) {
                int lastdesc = k == len - 1;
                uint16_t flags = (uint16_t)((lastdesc ? 0 : VQ_DESC_F_NEXT) |
                                            (k >= readable ? VQ_DESC_F_WRITE : 0));
                if (lastdesc && below(4) == 0)
                    put_desc(desc, order[i + k], TABLE_GPA, 16 * 8, VQ_DESC_F_INDIRECT, 0);
                else
                    put_desc(desc, order[i + k], BUF_GPA + below(0x1000),
                             1 + (uint32_t)below(0x200), flags,
                             lastdesc ? 0 : order[i + k + 1]);
            }
            i += len;
        }
        for (i = 0; i < 8; i++)
            put_desc(TABLE_GPA, i, BUF_GPA + below(0x1000), 1 + (uint32_t)below(0x200),
                     (uint16_t)(VQ_DESC_F_WRITE | (i < 7 ? VQ_DESC_F_NEXT : 0)),
                     (uint16_t)(i + 1));
        for (i = (uint32_t)below(4); i > 0; i--) {   /* corrupt a few bytes */
            uint64_t where = below(2) ? desc + below(16ull * num)
                                      : TABLE_GPA + below(16 * 8);
            *host(where) = (uint8_t)rnd();
        }
    }
    for (i = 0; i < nheads; i++)
        put16(avail + 4 + 2ull * ((uint16_t)(last + i) & (num - 1)), heads[i]);
    put16(avail + 2, (uint16_t)(below(8) ? last + nheads : rnd()));
    if (below(2)) {
        random_region(num);
        return;
    }
    drain();
}

int main(int argc, char **argv)
{
    unsigned long i;

    ram0 = malloc(RAM0_SIZE);
    ram1 = malloc(RAM1_SIZE);
    CHECK(ram0 && ram1);
    memset(ram0, 0, RAM0_SIZE);
    memset(ram1, 0, RAM1_SIZE);
    regions[0] = (struct vq_region){ RAM0_GPA, RAM0_SIZE, ram0 };
    regions[1] = (struct vq_region){ RAM1_GPA, RAM1_SIZE, ram1 };

    if (argc > 1 && strcmp(argv[1], "overflow") == 0) {
        volatile uint8_t *p = ram1;
        printf("reading past guest RAM: %d\n", p[RAM1_SIZE]);
        return 0;
    }

    fixed_cases();
    inflight_cases();
    for (i = 0; i < ITERATIONS; i++)
        random_ring();
    printf("virtq_asan: %d iterations, %lu chains, %lu broken, %lu empty, %lu setups refused, "
           "%lu regions_taken, %lu regions_refused, %lu resubmitted\n",
           ITERATIONS, chains, brokens, empties, setups_refused, regions_taken,
           regions_refused, resubmitted);
    free(ram0);
    free(ram1);
    return 0;
}

/* AddressSanitizer/UBSan driver for native/blkio.c (with virtq.c; run by
 * tests/unit/test_virtq_asan.py).
 *
 * Guest RAM is two malloc'ed blocks, as in virtq_asan.c: [0, 1 MiB) and
 * [4 GiB, 4 GiB + 64 KiB); ASan's redzones catch any access outside them. The disk is
 * a temporary file of DISK_SECTORS sectors, opened twice: buffered and O_DIRECT.
 *
 * 1. Fixed cases: buffers flush against the end of a block, a header split across
 *    the two blocks, a status byte that is the last byte of RAM, overflowing sectors,
 *    discard segments crossing blocks, unaligned O_DIRECT buffers.
 * 2. Well-formed random requests (all types, sectors in and past the disk, buffers of
 *    random sizes at random offsets, never overlapping), through either fd, checked
 *    against a model of the disk: statuses, used lengths, what IN returns.
 * 3. Hostile random chains (random addresses, lengths, flags, headers, discard
 *    segments) on a scratch disk: only memory safety and sane return values.
 * 4. The asynchronous engines (io_uring, then Linux AIO) on the O_DIRECT fd: batches of
 *    up to 8 well-formed requests in flight at once (disjoint sectors, so the model
 *    holds whatever order they finish in), served by blk_pump with small budgets and
 *    blk_drain, every head completed exactly once and checked against the model; then
 *    hostile batches, a ring that breaks with requests in flight drained before the
 *    ring is set up again.
 *
 * Exit status 0 when all is well; ASan/UBSan abort otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "blkio.h"

#define RAM0_SIZE (1u << 20)
#define RAM1_GPA  (4ull << 30)
#define RAM1_SIZE (1u << 16)
#define NUM       64
#define DESC_GPA  0x0ull
#define AVAIL_GPA 0x8000ull
#define USED_GPA  0x9000ull
#define BUF_GPA   0x10000ull       /* buffers of well-formed requests: [BUF_GPA, RAM0_SIZE) */
#define DISK_SECTORS 256
#define DISK_BYTES (DISK_SECTORS * BLK_SECTOR)
#define ITERATIONS 50000
#define ASYNC_BATCHES 4000

static uint8_t *ram0, *ram1;
static struct vq_region regions[2];
static struct vq q;
static struct blk_worker worker;
static struct blk_disk disk_buffered, disk_direct, disk_scratch, disk_scratch_direct;
static uint8_t *bounce;
static uint8_t model[DISK_BYTES], known[DISK_BYTES];
static uint16_t avail_idx, used_seen;
static unsigned long ok, ioerr, unsupp, broken_rings;
static unsigned long async_started, async_batches, async_broken;
static struct blk_engine engine;            /* 1 MiB: static, zeroed */
static struct blk_worker async_worker;
static struct blk_stats stats, async_stats;   /* the workers' counters (blk_stats) */

/* Every completed chain is counted once in its worker's statistics. */
static uint64_t counted(const struct blk_stats *st)
{
    return st->ops[BLK_OP_READ] + st->ops[BLK_OP_WRITE] + st->ops[BLK_OP_FLUSH] +
           st->ops[BLK_OP_OTHER];
}

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "blkio_asan: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    exit(1); } } while (0)

static uint64_t state = 0x2545F4914F6CDD1Dull;
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
    if (gpa < RAM0_SIZE)
        return ram0 + gpa;
    CHECK(gpa >= RAM1_GPA && gpa < RAM1_GPA + RAM1_SIZE);
    return ram1 + (gpa - RAM1_GPA);
}

static void put_desc(uint32_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *p = host(DESC_GPA + 16ull * i);
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

static void setup(void)
{
    CHECK(vq_setup(&q, regions, 2, NUM, DESC_GPA, AVAIL_GPA, USED_GPA, avail_idx) == 0);
    used_seen = q.used_idx;
}

/* One chain of n descriptors: bufs[i] = {gpa, len, writable}. */
struct buf { uint64_t gpa; uint32_t len; int writable; };

static void publish(const struct buf *b, uint32_t n)
{
    uint32_t i;
    uint16_t v;

    for (i = 0; i < n; i++)
        put_desc(i, b[i].gpa, b[i].len,
                 (uint16_t)((b[i].writable ? VQ_DESC_F_WRITE : 0) | (i + 1 < n ? VQ_DESC_F_NEXT : 0)),
                 (uint16_t)(i + 1));
    v = 0;
    memcpy(host(AVAIL_GPA + 4 + 2 * (avail_idx % NUM)), &v, 2);
    avail_idx++;
    memcpy(host(AVAIL_GPA + 2), &avail_idx, 2);
}

/* Runs the published chain; -1 if the ring broke, else the used length. */
static int64_t run(const struct blk_disk *d)
{
    int rc = blk_process(&q, d, &worker, 1 + (uint32_t)below(4));
    uint16_t used_idx;
    uint32_t elem[2];

    if (rc < 0) {
        CHECK(rc == -EINVAL && q.broken);
        broken_rings++;
        setup();
        return -1;
    }
    CHECK((rc & ~(BLK_NOTIFY | BLK_MORE)) == 0);
    memcpy(&used_idx, host(USED_GPA + 2), 2);
    CHECK(used_idx == (uint16_t)(used_seen + 1));
    memcpy(elem, host(USED_GPA + 4 + 8 * (used_seen % NUM)), 8);
    used_seen++;
    CHECK(elem[0] == 0);
    return elem[1];
}

static uint8_t status_at(uint64_t gpa) { return *host(gpa); }

static void header(uint64_t gpa, uint32_t type, uint64_t sector)
{
    uint32_t zero = 0;
    uint8_t h[16];
    memcpy(h, &type, 4);
    memcpy(h + 4, &zero, 4);
    memcpy(h + 8, &sector, 8);
    memcpy(host(gpa), h, 16);
}

static void dwz_segment(uint64_t gpa, uint64_t sector, uint32_t num, uint32_t flags)
{
    uint8_t s[16];
    memcpy(s, &sector, 8);
    memcpy(s + 8, &num, 4);
    memcpy(s + 12, &flags, 4);
    memcpy(host(gpa), s, 16);
}

/* ---- fixed cases ---------------------------------------------------------------- */

static void fixed_cases(void)
{
    struct buf b[4];
    uint8_t h[16];

    /* Header split across the two blocks, data flush against the end of RAM1, status
     * the last byte of RAM1: a read of one sector. */
    header(0x20000, BLK_T_IN, 3);
    memcpy(h, host(0x20000), 16);
    memcpy(host(RAM0_SIZE - 5), h, 5);
    memcpy(host(RAM1_GPA), h + 5, 11);
    b[0] = (struct buf){ RAM0_SIZE - 5, 5, 0 };
    b[1] = (struct buf){ RAM1_GPA, 11, 0 };
    b[2] = (struct buf){ RAM1_GPA + RAM1_SIZE - 1 - BLK_SECTOR, BLK_SECTOR, 1 };
    b[3] = (struct buf){ RAM1_GPA + RAM1_SIZE - 1, 1, 1 };
    publish(b, 4);
    CHECK(run(&disk_buffered) == BLK_SECTOR + 1);
    CHECK(status_at(RAM1_GPA + RAM1_SIZE - 1) == BLK_S_OK);
    CHECK(memcmp(host(RAM1_GPA + RAM1_SIZE - 1 - BLK_SECTOR), model + 3 * BLK_SECTOR, BLK_SECTOR) == 0);

    /* The same through O_DIRECT: the buffer is misaligned, so it bounces. */
    publish(b, 4);
    CHECK(run(&disk_direct) == BLK_SECTOR + 1 && worker.bounced == 1);

    /* One byte past RAM: the walker refuses the chain; nothing is read or written. */
    b[2] = (struct buf){ RAM1_GPA + RAM1_SIZE - BLK_SECTOR, BLK_SECTOR + 1, 1 };
    publish(b, 4);
    CHECK(run(&disk_buffered) == -1);

    /* Sector arithmetic that would wrap. */
    header(0x20000, BLK_T_OUT, UINT64_MAX - 1);
    b[0] = (struct buf){ 0x20000, 16, 0 };
    b[1] = (struct buf){ 0x30000, 4 * BLK_SECTOR, 0 };
    b[2] = (struct buf){ 0x20010, 1, 1 };
    publish(b, 3);
    CHECK(run(&disk_buffered) == 1 && status_at(0x20010) == BLK_S_IOERR);

    /* Discard segments: two, the second crossing from RAM0 into RAM1 (split across two
     * descriptors); one past the end. */
    header(0x20000, BLK_T_WRITE_ZEROES, 0);
    dwz_segment(0x21000, 0, 1, 0);
    dwz_segment(0x21010, 5, 2, BLK_DWZ_F_UNMAP);
    memcpy(host(RAM0_SIZE - 7), host(0x21010), 7);
    memcpy(host(RAM1_GPA), host(0x21010) + 7, 9);
    b[1] = (struct buf){ 0x21000, 16, 0 };
    b[2] = (struct buf){ RAM0_SIZE - 7, 7, 0 };
    b[3] = (struct buf){ RAM1_GPA, 9, 0 };
    {
        struct buf c[5] = { b[0], b[1], b[2], b[3], { 0x20010, 1, 1 } };
        publish(c, 5);
        CHECK(run(&disk_buffered) == 1 && status_at(0x20010) == BLK_S_OK);
        memset(model, 0, BLK_SECTOR);
        memset(model + 5 * BLK_SECTOR, 0, 2 * BLK_SECTOR);
        dwz_segment(0x21000, DISK_SECTORS - 1, 2, 0);
        publish(c, 5);
        CHECK(run(&disk_buffered) == 1 && status_at(0x20010) == BLK_S_IOERR);
    }
}

/* ---- well-formed random requests against the model ------------------------------- */

static uint64_t next_free;

/* A buffer of len bytes in [BUF_GPA, RAM0_SIZE), after the previous one, at a random
 * skew; 0 if it does not fit. */
static uint64_t place(uint32_t len)
{
    uint64_t at = next_free + (below(3) ? below(8) : 512 - below(2) * 512);
    if (at + len > RAM0_SIZE)
        return 0;
    next_free = at + len;
    return at;
}

static uint32_t split(uint32_t total, uint32_t *sizes, uint32_t max)
{
    uint32_t n = 0;
    while (total > 0 && n < max) {
        uint32_t s = n + 1 == max ? total : 1 + (uint32_t)below(total);
        if (below(2))
            s = total;
        sizes[n++] = s;
        total -= s;
    }
    return n;
}

static void well_formed(void)
{
    static const uint32_t types[] = { BLK_T_IN, BLK_T_IN, BLK_T_OUT, BLK_T_OUT, BLK_T_FLUSH,
                                      BLK_T_GET_ID, BLK_T_DISCARD, BLK_T_WRITE_ZEROES, 3 };
    uint32_t type = types[below(sizeof types / sizeof types[0])], sizes[8], nsizes, i;
    uint64_t sector = below(8) ? below(DISK_SECTORS) : DISK_SECTORS - below(3) + below(2);
    uint32_t count = (uint32_t)below(17), nseg = 1 + (uint32_t)below(3);
    uint32_t bytes = type == BLK_T_IN || type == BLK_T_OUT ? count * BLK_SECTOR
                   : type == BLK_T_GET_ID ? 20
                   : type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES ? 16 * nseg : 0;
    const struct blk_disk *d = below(2) ? &disk_direct : &disk_buffered;
    struct buf b[12];
    uint64_t hdr, status, segs[4][2];
    uint32_t n = 0;
    int fits = 1, expect;
    int64_t written;

    next_free = BUF_GPA;
    hdr = place(16);
    header(hdr, type, sector);
    b[n++] = (struct buf){ hdr, 16, 0 };
    if (type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES) {
        uint64_t at = place(bytes);
        for (i = 0; i < nseg; i++) {
            segs[i][0] = below(6) ? below(DISK_SECTORS) : DISK_SECTORS - below(4);
            segs[i][1] = 1 + below(8);
            fits &= segs[i][0] + segs[i][1] <= DISK_SECTORS;
            dwz_segment(at + 16 * i, segs[i][0], (uint32_t)segs[i][1],
                        type == BLK_T_WRITE_ZEROES && below(2) ? BLK_DWZ_F_UNMAP : 0);
        }
        b[n++] = (struct buf){ at, bytes, 0 };
    } else if (bytes) {
        nsizes = type == BLK_T_GET_ID ? (sizes[0] = bytes, 1) : split(bytes, sizes, 8);
        for (i = 0; i < nsizes; i++) {
            uint64_t at = place(sizes[i]);
            if (type == BLK_T_OUT) {
                uint32_t k;
                for (k = 0; k < sizes[i]; k++)
                    *host(at + k) = (uint8_t)rnd();
            } else {
                memset(host(at), 0xEE, sizes[i]);
            }
            b[n++] = (struct buf){ at, sizes[i], type != BLK_T_OUT };
        }
    }
    status = place(1);
    *host(status) = 0xFF;
    b[n++] = (struct buf){ status, 1, 1 };
    publish(b, n);
    written = run(d);
    CHECK(written >= 1);

    if (type == BLK_T_IN || type == BLK_T_OUT)
        fits = sector + count <= DISK_SECTORS;
    expect = type == 3 ? BLK_S_UNSUPP : fits ? BLK_S_OK : BLK_S_IOERR;
    CHECK(status_at(status) == expect);
    if (expect == BLK_S_OK)
        ok++;
    else if (expect == BLK_S_IOERR)
        ioerr++;
    else
        unsupp++;
    if (expect != BLK_S_OK)
        return;

    if (type == BLK_T_IN || type == BLK_T_OUT) {
        uint64_t pos = sector * BLK_SECTOR;
        for (i = 1; i + 1 < n; i++) {
            uint8_t *p = host(b[i].gpa);
            if (type == BLK_T_OUT) {
                memcpy(model + pos, p, b[i].len);
                memset(known + pos, 1, b[i].len);
            } else {
                uint32_t k;
                for (k = 0; k < b[i].len; k++)
                    CHECK(!known[pos + k] || p[k] == model[pos + k]);
            }
            pos += b[i].len;
        }
        CHECK(written == (type == BLK_T_IN ? bytes + 1 : 1));
    } else if (type == BLK_T_DISCARD || type == BLK_T_WRITE_ZEROES) {
        for (i = 0; i < nseg; i++) {
            uint64_t lo = segs[i][0] * BLK_SECTOR, len = segs[i][1] * BLK_SECTOR;
            if (type == BLK_T_DISCARD) {
                memset(known + lo, 0, len);
            } else {
                memset(model + lo, 0, len);
                memset(known + lo, 1, len);
            }
        }
    } else if (type == BLK_T_GET_ID) {
        CHECK(written == 21 && memcmp(host(b[1].gpa), "asan-serial", 11) == 0);
    }
}

/* ---- hostile random chains ------------------------------------------------------ */

static uint64_t random_addr(void)
{
    switch (below(8)) {
    case 0: return rnd();
    case 1: return RAM0_SIZE - below(600);
    case 2: return RAM1_GPA + RAM1_SIZE - below(600);
    case 3: return RAM1_GPA + below(RAM1_SIZE);
    default: return BUF_GPA + below(RAM0_SIZE - BUF_GPA);
    }
}

static uint32_t random_len(void)
{
    switch (below(6)) {
    case 0: return (uint32_t)rnd();
    case 1: return 16;
    case 2: return BLK_SECTOR * (uint32_t)below(4);
    default: return 1 + (uint32_t)below(1200);
    }
}

static void hostile(void)
{
    struct buf b[8];
    uint32_t n = 1 + (uint32_t)below(8), i;

    for (i = 0; i < n; i++) {
        b[i] = (struct buf){ random_addr(), random_len(), (int)below(2) };
        if (i > 0 && below(3) == 0)
            b[i].writable = b[i - 1].writable || below(4) == 0;
        /* Plausible request bytes where the buffer is in RAM. */
        if (vq_translate(&q.mem, b[i].gpa, 16)) {
            uint64_t v = below(4) ? below(DISK_SECTORS + 8) : rnd();
            uint32_t t = (uint32_t)(below(4) ? below(15) : rnd());
            memcpy(host(b[i].gpa), &t, 4);
            memcpy(host(b[i].gpa + 8), &v, 8);
        }
    }
    publish(b, n);
    (void)run(below(2) ? &disk_scratch : &disk_scratch_direct);
}

/* ---- the asynchronous engines --------------------------------------------------- */

/* place(), but mostly 4 KiB-aligned: buffers O_DIRECT takes as they are. */
static uint64_t place_aligned(uint32_t len)
{
    if (below(5)) {
        next_free = (next_free + 4095) & ~4095ull;
        if (next_free + len > RAM0_SIZE)
            return 0;
        next_free += len;
        return next_free - len;
    }
    return place(len);
}

/* Chain j of a batch: descriptors 8j .. 8j + n - 1, head 8j. */
static void publish_chain(uint16_t first, const struct buf *b, uint32_t n, int make_available)
{
    uint32_t i;

    for (i = 0; i < n; i++)
        put_desc(first + i, b[i].gpa, b[i].len,
                 (uint16_t)((b[i].writable ? VQ_DESC_F_WRITE : 0) | (i + 1 < n ? VQ_DESC_F_NEXT : 0)),
                 (uint16_t)(first + i + 1));
    if (make_available) {
        memcpy(host(AVAIL_GPA + 4 + 2 * (avail_idx % NUM)), &first, 2);
        avail_idx++;
    }
}

struct pending { uint32_t type; uint64_t sector, status; uint32_t count, nbuf; struct buf b[10]; };

/* Serves the queue until `count` more completions are there (small budgets, drains at
 * random); the heads completed, in used-ring order, into heads. -1 if the ring broke. */
static int serve_async(const struct blk_disk *d, uint32_t count, uint16_t *heads)
{
    uint32_t got = 0, spins = 0;
    uint16_t used_idx;

    for (;;) {
        int rc = below(4) ? blk_pump(&q, d, &async_worker, 1 + (uint32_t)below(3))
                          : blk_drain(&q, d, &async_worker);
        CHECK(rc >= 0 || rc == -EINVAL);
        if (rc == -EINVAL) {
            CHECK(q.broken);
            CHECK(blk_drain(&q, d, &async_worker) >= 0);
            CHECK(engine.inflight == 0 && engine.queued == 0);
            return -1;
        }
        memcpy(&used_idx, host(USED_GPA + 2), 2);
        while (used_seen != used_idx) {
            uint32_t elem[2];
            memcpy(elem, host(USED_GPA + 4 + 8 * (used_seen % NUM)), 8);
            CHECK(got < count);
            heads[got++] = (uint16_t)elem[0];
            used_seen++;
        }
        if (got == count)
            return 0;
        CHECK(++spins < 1000000);
    }
}

static void async_batch(const struct blk_disk *d)
{
    static const uint32_t types[] = { BLK_T_IN, BLK_T_IN, BLK_T_OUT, BLK_T_OUT, BLK_T_OUT,
                                      BLK_T_FLUSH, BLK_T_GET_ID };
    struct pending p[8];
    uint16_t heads[8];
    uint32_t n = 1 + (uint32_t)below(8), j, i, seen = 0;

    next_free = BUF_GPA;
    for (j = 0; j < n; j++) {
        struct pending *r = &p[j];
        uint32_t sizes[8], nsizes;
        uint64_t hdr = place(16);

        r->type = types[below(sizeof types / sizeof types[0])];
        /* Chain j owns sectors [32j, 32j + 32): nothing else in flight touches them. A
         * read now and then reaches past the end of the disk. */
        r->count = 1 + (uint32_t)below(16);
        r->sector = 32ull * j + below(16);
        if (r->type == BLK_T_IN && j == 7 && below(4) == 0)
            r->sector = DISK_SECTORS - below(4);
        header(hdr, r->type, r->sector);
        r->nbuf = 0;
        r->b[r->nbuf++] = (struct buf){ hdr, 16, 0 };
        if (r->type == BLK_T_IN || r->type == BLK_T_OUT || r->type == BLK_T_GET_ID) {
            uint32_t bytes = r->type == BLK_T_GET_ID ? 20 : r->count * BLK_SECTOR;
            nsizes = r->type == BLK_T_GET_ID ? (sizes[0] = bytes, 1) : split(bytes, sizes, 6);
            if (r->type != BLK_T_GET_ID && below(4))      /* whole 512-byte pieces */
                for (i = 0, nsizes = 1 + (uint32_t)below(r->count < 6 ? r->count : 6),
                     bytes = 0; i < nsizes; i++)
                    bytes += sizes[i] = (i + 1 < nsizes ? 1 : r->count - (nsizes - 1)) * BLK_SECTOR;
            for (i = 0; i < nsizes; i++) {
                uint64_t at = place_aligned(sizes[i]);
                uint32_t k;
                CHECK(at != 0);
                if (r->type == BLK_T_OUT)
                    for (k = 0; k < sizes[i]; k++)
                        *host(at + k) = (uint8_t)rnd();
                else
                    memset(host(at), 0xEE, sizes[i]);
                r->b[r->nbuf++] = (struct buf){ at, sizes[i], r->type != BLK_T_OUT };
            }
        }
        r->status = place(1);
        CHECK(r->status != 0);
        *host(r->status) = 0xFF;
        r->b[r->nbuf++] = (struct buf){ r->status, 1, 1 };
        publish_chain((uint16_t)(8 * j), r->b, r->nbuf, 1);
    }
    memcpy(host(AVAIL_GPA + 2), &avail_idx, 2);
    CHECK(serve_async(d, n, heads) == 0);
    async_batches++;
    for (i = 0; i < n; i++) {
        struct pending *r;
        int fits;
        uint8_t expect;

        CHECK(heads[i] % 8 == 0 && heads[i] / 8 < n && !(seen & (1u << (heads[i] / 8))));
        seen |= 1u << (heads[i] / 8);             /* each head exactly once */
        r = &p[heads[i] / 8];
        fits = r->sector + r->count <= DISK_SECTORS;
        expect = (r->type == BLK_T_IN || r->type == BLK_T_OUT) && !fits ? BLK_S_IOERR : BLK_S_OK;
        CHECK(status_at(r->status) == expect);
        if (expect != BLK_S_OK || r->type == BLK_T_FLUSH)
            continue;
        if (r->type == BLK_T_GET_ID) {
            CHECK(memcmp(host(r->b[1].gpa), "asan-serial", 11) == 0);
            continue;
        }
        {
            uint64_t pos = r->sector * BLK_SECTOR;
            uint32_t k, m;
            for (k = 1; k + 1 < r->nbuf; k++) {
                uint8_t *buf = host(r->b[k].gpa);
                if (r->type == BLK_T_OUT) {
                    memcpy(model + pos, buf, r->b[k].len);
                    memset(known + pos, 1, r->b[k].len);
                } else {
                    for (m = 0; m < r->b[k].len; m++)
                        CHECK(!known[pos + m] || buf[m] == model[pos + m]);
                }
                pos += r->b[k].len;
            }
        }
    }
}

static void async_hostile(const struct blk_disk *d)
{
    uint32_t n = 1 + (uint32_t)below(8), j, i;
    uint16_t heads[8];

    for (j = 0; j < n; j++) {
        struct buf b[8];
        uint32_t m = 1 + (uint32_t)below(8);
        for (i = 0; i < m; i++) {
            b[i] = (struct buf){ random_addr(), random_len(), (int)below(2) };
            if (vq_translate(&q.mem, b[i].gpa, 16)) {
                uint64_t v = below(4) ? below(DISK_SECTORS + 8) : rnd();
                uint32_t t = (uint32_t)(below(3) ? below(2) : below(15));
                memcpy(host(b[i].gpa), &t, 4);
                memcpy(host(b[i].gpa + 8), &v, 8);
            }
        }
        publish_chain((uint16_t)(8 * j), b, m, 1);
    }
    memcpy(host(AVAIL_GPA + 2), &avail_idx, 2);
    /* The guest rewrites descriptors while its chains are in flight: what the engine
     * has was copied at pop. */
    if (below(2))
        for (i = 0; i < NUM; i++)
            put_desc(i, random_addr(), random_len(), (uint16_t)below(8), (uint16_t)below(NUM));
    if (serve_async(d, n, heads) < 0) {
        async_broken++;
        setup();
    }
}

static void async_phase(int kind, const char *name)
{
    unsigned long i;

    if (blk_engine_init(&engine, &disk_direct, kind, 16) != 0) {
        printf("blkio_asan: %s refused (%s): not tested\n", name, strerror(engine.error));
        return;
    }
    CHECK(blk_worker_init(&async_worker, &disk_direct, bounce, 64 * 1024) == 0);
    async_worker.engine = &engine;
    memset(&async_stats, 0, sizeof async_stats);
    async_worker.stats = &async_stats;
    setup();
    for (i = 0; i < ASYNC_BATCHES; i++) {
        if (below(5) == 0)
            async_hostile(below(2) ? &disk_scratch_direct : &disk_scratch);
        else
            async_batch(&disk_direct);
    }
    CHECK(engine.inflight == 0 && engine.queued == 0 && engine.nfree == engine.depth);
    CHECK(counted(&async_stats) == async_worker.requests);
    async_started += engine.started;
    printf("blkio_asan: %s: %lu requests through the engine\n", name,
           (unsigned long)engine.started);
    blk_engine_close(&engine);
    memset(&engine, 0, sizeof engine);
    setup();
}

int main(int argc, char **argv)
{
    char path[] = "/tmp/blkio_asan.XXXXXX", scratch[] = "/tmp/blkio_asan.XXXXXX";
    int fd, fd_direct, fd_scratch, fd_scratch_direct;
    unsigned long i;
    (void)argc;
    (void)argv;

    ram0 = malloc(RAM0_SIZE);
    ram1 = malloc(RAM1_SIZE);
    bounce = aligned_alloc(4096, 64 * 1024);
    CHECK(ram0 && ram1 && bounce);
    memset(ram0, 0, RAM0_SIZE);
    memset(ram1, 0, RAM1_SIZE);
    regions[0] = (struct vq_region){ 0, RAM0_SIZE, ram0 };
    regions[1] = (struct vq_region){ RAM1_GPA, RAM1_SIZE, ram1 };

    fd = mkstemp(path);
    fd_scratch = mkstemp(scratch);
    CHECK(fd >= 0 && fd_scratch >= 0);
    for (i = 0; i < DISK_BYTES; i++)
        model[i] = (uint8_t)rnd();
    memset(known, 1, sizeof known);
    CHECK(pwrite(fd, model, DISK_BYTES, 0) == DISK_BYTES);
    CHECK(pwrite(fd_scratch, model, DISK_BYTES, 0) == DISK_BYTES);
    fd_direct = open(path, O_RDWR | O_DIRECT);
    fd_scratch_direct = open(scratch, O_RDWR | O_DIRECT);
    if (fd_direct < 0 || fd_scratch_direct < 0) {
        fprintf(stderr, "blkio_asan: no O_DIRECT in /tmp (%s): buffered only\n", strerror(errno));
        fd_direct = open(path, O_RDWR);
        fd_scratch_direct = open(scratch, O_RDWR);
    }
    CHECK(fd_direct >= 0 && fd_scratch_direct >= 0);
    unlink(path);
    unlink(scratch);

    disk_buffered = (struct blk_disk){
        .fd = fd, .capacity = DISK_SECTORS, .mem_align = 512, .block_size = 512,
        .discard = 1, .write_zeroes = 1, .write_zeroes_may_unmap = 1,
        .max_discard_sectors = 64, .max_discard_seg = 4,
        .max_write_zeroes_sectors = 64, .max_write_zeroes_seg = 4,
    };
    memcpy(disk_buffered.id, "asan-serial", 11);
    disk_direct = disk_buffered;
    disk_direct.fd = fd_direct;
    disk_direct.direct = 1;
    CHECK(blk_dio_alignment(fd_direct, &disk_direct.mem_align, &disk_direct.block_size) == 0);
    CHECK(DISK_BYTES % disk_direct.block_size == 0 && disk_direct.mem_align <= 4096);
    disk_scratch = disk_buffered;
    disk_scratch.fd = fd_scratch;
    disk_scratch_direct = disk_direct;
    disk_scratch_direct.fd = fd_scratch_direct;
    CHECK(blk_worker_init(&worker, &disk_direct, bounce, 64 * 1024) == 0);
    worker.stats = &stats;
    /* Bad descriptions are refused. */
    {
        struct blk_worker w;
        struct blk_disk bad = disk_direct;
        bad.block_size = 768;
        CHECK(blk_worker_init(&w, &bad, bounce, 64 * 1024) == -EINVAL);
        bad = disk_direct;
        bad.max_discard_seg = BLK_MAX_DWZ_SEG + 1;
        CHECK(blk_worker_init(&w, &bad, bounce, 64 * 1024) == -EINVAL);
        CHECK(blk_worker_init(&w, &disk_direct, bounce + 1, 4096) == -EINVAL);
    }

    setup();
    fixed_cases();
    for (i = 0; i < ITERATIONS; i++) {
        if (below(4) == 0)
            hostile();
        else
            well_formed();
    }
    if (blk_have_io_uring())
        async_phase(BLK_ENGINE_IO_URING, "io_uring");
    async_phase(BLK_ENGINE_AIO, "aio");
    /* The file ends up as the model says, where the model knows. */
    {
        static uint8_t file[DISK_BYTES];
        CHECK(pread(fd, file, DISK_BYTES, 0) == DISK_BYTES);
        for (i = 0; i < DISK_BYTES; i++)
            CHECK(!known[i] || file[i] == model[i]);
    }
    CHECK(counted(&stats) == worker.requests);
    printf("blkio_asan: %d iterations, %lu ok, %lu ioerr, %lu unsupp, %lu broken,"
           " %lu bounced, %lu async_batches, %lu async_started, %lu async_broken\n",
           ITERATIONS, ok, ioerr, unsupp, broken_rings, (unsigned long)worker.bounced,
           async_batches, async_started, async_broken);
    close(fd);
    close(fd_scratch_direct);
    close(fd_direct);
    close(fd_scratch);
    free(ram0);
    free(ram1);
    free(bounce);
    return 0;
}

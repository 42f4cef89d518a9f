/* What the disk data path's counters and rate limiter cost per request, measured on the
 * real code (native/blkio.c's blk_pump, with virtq.c and ratelimit.c) with nothing
 * else around it: no guest, no vhost-user, no kick, no interrupt. Run by
 * bench/blk_path_cost.py, which compiles it with -O2.
 *
 * A ring of 256 in plain memory holds BATCH 4 KiB read requests (header, data, status);
 * each round publishes them and blk_pump runs them inline, BLK_INLINE_BATCH a pass as
 * blk_serve does for a buffered disk, against a file in the page
 * cache (the cheapest request there is, so the added cost is at its largest relative to
 * it). Four setups, taking turns in slices of SLICE requests within each round:
 *   none      no counters, no limiter (d->limiter NULL, w->stats NULL)
 *   counters  the worker's struct blk_stats (as every backend has)
 *   page      counters, and a limiter whose page sets no limit (the launcher's default)
 *   limited   counters, and a limit far above the load (10^9 IOPS, 10^12 bytes/s)
 * Prints, per round, one line per setup: "<round> <setup> <ns/request> <cpu ns/request>".
 *
 *   blk_path_cost FILE ROUNDS REQUESTS_PER_ROUND
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blkio.h"

#define NUM       256
#define BATCH     32
#define RAM_SIZE  (4u << 20)
#define DESC_GPA  0x0ull
#define AVAIL_GPA 0x1000ull
#define USED_GPA  0x2000ull
#define HDR_GPA   0x10000ull       /* BATCH headers of 16 bytes, then BATCH status bytes */
#define STATUS_GPA 0x11000ull
#define DATA_GPA  0x100000ull      /* BATCH pages */
#define DISK_SECTORS (64u << 11)   /* 64 MiB */
#define SLICE     4096             /* requests a setup runs before the next takes its turn */

static uint8_t *ram;
static struct vq q;
static uint16_t avail_idx;

static void put_desc(uint32_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *p = ram + DESC_GPA + 16ull * i;
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

static uint64_t now_ns(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* BATCH chains: heads 0, 3, 6, ...; each reads a random 4 KiB block. */
static void publish_batch(uint64_t *seed)
{
    uint32_t i;

    for (i = 0; i < BATCH; i++) {
        uint32_t type = BLK_T_IN, reserved = 0;
        uint64_t sector;
        uint16_t head = (uint16_t)(3 * i);
        uint8_t *hdr = ram + HDR_GPA + 16ull * i;

        *seed = *seed * 6364136223846793005ull + 1442695040888963407ull;
        sector = ((*seed >> 33) % (DISK_SECTORS / 8)) * 8;
        memcpy(hdr, &type, 4);
        memcpy(hdr + 4, &reserved, 4);
        memcpy(hdr + 8, &sector, 8);
        memcpy(ram + AVAIL_GPA + 4 + 2 * (avail_idx % NUM), &head, 2);
        avail_idx++;
    }
    memcpy(ram + AVAIL_GPA + 2, &avail_idx, 2);
}

/* ns per request (wall and thread CPU) for `requests` requests. */
static void measure(const struct blk_disk *d, struct blk_worker *w, uint64_t requests,
                    double *wall, double *cpu)
{
    uint64_t seed = 42, done = 0, t0 = now_ns(CLOCK_MONOTONIC);
    uint64_t c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);

    while (done < requests) {
        int pass;

        publish_batch(&seed);
        /* As blk_serve does it: blk_pump, which without an engine runs at most
         * BLK_INLINE_BATCH requests a pass and publishes them. */
        for (pass = 0; pass < BATCH / BLK_INLINE_BATCH; pass++) {
            if (blk_pump(&q, d, w, NUM) < 0) {
                fprintf(stderr, "blk_path_cost: the ring broke\n");
                exit(1);
            }
        }
        done += BATCH;
    }
    *wall = (double)(now_ns(CLOCK_MONOTONIC) - t0) / (double)done;
    *cpu = (double)(now_ns(CLOCK_THREAD_CPUTIME_ID) - c0) / (double)done;
}

int main(int argc, char **argv)
{
    static struct blk_stats stats;
    static struct rl_config off, far;
    static struct rl_limiter page_limiter, far_limiter;
    struct rl_params ops = { 1000000000ull / 10, 0, 100000000ull };
    struct rl_params bytes = { 1000000000000ull / 10, 0, 100000000ull };
    struct blk_disk none, page, limited;
    static struct blk_worker w;
    struct vq_region region;
    uint8_t *bounce;
    const char *names[4] = { "none", "counters", "page", "limited" };
    int fd, rounds, r, s;
    uint64_t requests;
    uint32_t i;

    if (argc != 4) {
        fprintf(stderr, "usage: blk_path_cost FILE ROUNDS REQUESTS_PER_ROUND\n");
        return 2;
    }
    rounds = atoi(argv[2]);
    requests = strtoull(argv[3], NULL, 10);
    fd = open(argv[1], O_RDONLY);
    ram = aligned_alloc(4096, RAM_SIZE);
    bounce = aligned_alloc(4096, 64 * 1024);
    if (fd < 0 || !ram || !bounce) {
        perror("blk_path_cost");
        return 1;
    }
    memset(ram, 0, RAM_SIZE);
    region = (struct vq_region){ 0, RAM_SIZE, ram };
    for (i = 0; i < BATCH; i++) {
        put_desc(3 * i, HDR_GPA + 16ull * i, 16, VQ_DESC_F_NEXT, (uint16_t)(3 * i + 1));
        put_desc(3 * i + 1, DATA_GPA + 4096ull * i, 4096, VQ_DESC_F_WRITE | VQ_DESC_F_NEXT,
                 (uint16_t)(3 * i + 2));
        put_desc(3 * i + 2, STATUS_GPA + i, 1, VQ_DESC_F_WRITE, 0);
    }
    if (vq_setup(&q, &region, 1, NUM, DESC_GPA, AVAIL_GPA, USED_GPA, 0) != 0)
        return 1;
    none = (struct blk_disk){ .fd = fd, .capacity = DISK_SECTORS, .read_only = 1,
                              .mem_align = 512, .block_size = 512 };
    page = limited = none;
    rl_configure(&far, &ops, &bytes);
    if (rl_init(&page_limiter, &off) || rl_init(&far_limiter, &far))
        return 1;
    page.limiter = &page_limiter;
    limited.limiter = &far_limiter;
    if (blk_worker_init(&w, &none, bounce, 64 * 1024) != 0)
        return 1;

    for (r = 0; r < rounds; r++) {
        double wall[4] = { 0 }, cpu[4] = { 0 };
        int slice;

        /* The setups take turns in slices of SLICE requests, so a slow drift of the
         * machine (another tenant, the clock) weighs on all four alike. */
        for (slice = 0; (uint64_t)slice * SLICE < requests; slice++) {
            for (s = 0; s < 4; s++) {
                int setup = (s + slice) % 4;
                const struct blk_disk *d = setup == 2 ? &page : setup == 3 ? &limited : &none;
                double one_wall, one_cpu;

                w.stats = setup == 0 ? NULL : &stats;
                measure(d, &w, SLICE, &one_wall, &one_cpu);
                wall[setup] += one_wall;
                cpu[setup] += one_cpu;
            }
        }
        for (s = 0; s < 4; s++)
            printf("%d %s %.1f %.1f\n", r, names[s], wall[s] / slice, cpu[s] / slice);
        fflush(stdout);
    }
    return 0;
}

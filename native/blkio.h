/* The virtio-blk data path (virtio 1.2, section 5.2): requests popped from a virtqueue
 * (virtq.h), parsed, checked and executed against the disk fd straight into and out of
 * guest RAM, completed with a status byte. See blkio.c for the rules a request must
 * follow and what happens when it does not.
 *
 * One struct blk_worker per queue worker thread (scratch space, the bounce buffer,
 * counters); struct blk_disk is shared and read-only once set up. A worker may have an
 * I/O engine (struct blk_engine, one per queue, made before the process is confined):
 * its reads, writes and flushes then run asynchronously, many in flight, completing
 * in whatever order the disk finishes them (io_uring, else Linux AIO); without one,
 * each request runs to its end in the worker's thread (preadv/pwritev/fdatasync).
 */
#ifndef VMM_BLKIO_H
#define VMM_BLKIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>
#include <linux/aio_abi.h>
#ifndef BLK_NO_IO_URING
#include <liburing.h>
#endif

#include "ratelimit.h"
#include "virtq.h"

#define BLK_SECTOR      512
#define BLK_ID_BYTES    20     /* GET_ID answer: NUL-padded, no terminator at 20 */
#define BLK_MAX_DWZ_SEG 256    /* discard / write-zeroes segments in one request (Linux's cap) */

/* Request types, status values, segment flags (struct virtio_blk_req and friends). */
#define BLK_T_IN           0
#define BLK_T_OUT          1
#define BLK_T_FLUSH        4
#define BLK_T_GET_ID       8
#define BLK_T_DISCARD      11
#define BLK_T_WRITE_ZEROES 13
#define BLK_S_OK     0
#define BLK_S_IOERR  1
#define BLK_S_UNSUPP 2
#define BLK_DWZ_F_UNMAP 1u

/* blk_process's and blk_pump's answer, when the queue is not broken. */
#define BLK_NOTIFY 1   /* chains were completed and the driver wants an interrupt */
#define BLK_MORE   2   /* the budget ran out: call again before waiting for a kick */
#define BLK_FULL   4   /* every engine slot is busy: wait for a completion, not a kick */
#define BLK_RETRY  8   /* the engine refused a submission for now (EAGAIN): try again soon */
#define BLK_THROTTLED 16  /* a chain waits for the rate limiter: w->wait_ns, not a kick */

/* I/O engines. */
#define BLK_ENGINE_INLINE   0  /* each request runs to its end in the worker's thread */
#define BLK_ENGINE_IO_URING 1  /* io_uring: a restricted ring, the disk its only (fixed) file */
#define BLK_ENGINE_AIO      2  /* Linux AIO (io_submit), completions signalled on an eventfd */
#define BLK_DEPTH      256     /* requests one queue keeps in flight on its engine */
#define BLK_INLINE_BATCH 8     /* requests blk_pump runs inline (no engine) before it
                                  publishes them: the driver reaps and refills the ring
                                  while the rest run (bench/blk.py, buffered 4k QD32:
                                  207k IOPS with the whole ring per batch, 624k with 8) */
#define BLK_RECHECK_NS (100 * 1000000)  /* a throttled ring looks again at least this often:
                                          a changed limit counts (Firecracker's timer) */
#define BLK_SLOT_IOVS  256     /* data buffers of one request the engine takes (SEG_MAX
                                  254); a request with more runs inline */

struct blk_disk {
    int fd;
    uint64_t capacity;            /* in 512-byte sectors: every request is checked against it */
    uint32_t read_only;           /* writes, discards and write-zeroes are refused */
    uint32_t direct;              /* fd is O_DIRECT: alignment rules apply */
    uint32_t block_device;        /* discard by BLKDISCARD instead of a punched hole */
    uint32_t mem_align;           /* O_DIRECT: buffer address alignment, a power of 2 */
    uint32_t block_size;          /* O_DIRECT: offset and length alignment, a power of 2 >= 512 */
    uint32_t discard;             /* VIRTIO_BLK_F_DISCARD offered */
    uint32_t write_zeroes;        /* VIRTIO_BLK_F_WRITE_ZEROES offered */
    uint32_t write_zeroes_may_unmap;  /* write-zeroes with UNMAP may punch a hole */
    uint32_t max_discard_sectors, max_discard_seg;
    uint32_t max_write_zeroes_sectors, max_write_zeroes_seg;
    uint8_t id[BLK_ID_BYTES];
    struct rl_limiter *limiter;   /* the disk's rate limits, shared by its queues; NULL: none */
};

/* What one queue has done, for the operator (docs/metrics.md): written only by the
 * queue's worker, read by anyone (aligned 64-bit counters; a reader may see one a
 * request behind another). Reads, writes and flushes by the index BLK_OP_*; latency is
 * from the pop (a wait for the rate limiter included) to the completion. */
#define BLK_OP_READ  0
#define BLK_OP_WRITE 1
#define BLK_OP_FLUSH 2
#define BLK_OP_OTHER 3            /* GET_ID, DISCARD, WRITE_ZEROES, unknown, malformed */
#define BLK_LAT_BUCKETS 16        /* [i]: under 2^i * 16 us (i < 15); [15]: the rest
                                     (native/virtq_build.py repeats 16) */
#define BLK_STATS_BYTES 384       /* room one queue's counters take in a device page */
struct blk_stats {
    uint64_t ops[4];              /* completed, by BLK_OP_* */
    uint64_t failed[4];           /* of those, with a status other than OK */
    uint64_t bytes[2];            /* read, written (successful requests) */
    uint64_t total_ns[3];         /* summed latency of reads, writes, flushes */
    uint64_t throttled;           /* requests that waited for the rate limiter */
    uint64_t latency[2][BLK_LAT_BUCKETS];   /* reads, writes by latency */
};

/* One discard / write-zeroes segment as copied out of guest memory. */
struct blk_dwz {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* One request in flight on an engine. */
struct blk_slot {
    uint16_t head;                /* the chain, for its used element */
    uint16_t type;                /* BLK_T_IN, BLK_T_OUT or BLK_T_FLUSH */
    uint32_t niov;
    uint32_t written;             /* bytes written into the chain if it succeeds */
    uint8_t *status;              /* the status byte, in guest RAM (checked at pop) */
    uint64_t off, len;            /* the data's place on the disk, its length */
    uint64_t start_ns;            /* when it was popped (CLOCK_MONOTONIC) */
};

/* One queue's engine. Large (the iovec arrays: 1 MiB): map it lazily (zero pages) and
 * hand it to blk_engine_init; it must not move while it is set up. */
struct blk_engine {
    int kind;                     /* BLK_ENGINE_*; INLINE when none could be set up */
    int fd;                       /* readable when completions wait: poll it; -1 inline */
    int disk_fd;
    uint32_t depth;               /* slots in use at most */
    uint32_t queued;              /* prepared, not yet accepted by the kernel */
    uint32_t inflight;            /* accepted, not yet reaped */
    uint32_t nfree;
    uint16_t free[BLK_DEPTH];     /* free slot numbers, a stack */
    int error;                    /* why the last blk_engine_init failed (an errno) */
    /* Counters, for tests and statistics. */
    uint64_t started, completed, short_transfers, refused;
    struct blk_slot slot[BLK_DEPTH];
    struct iovec iov[BLK_DEPTH][BLK_SLOT_IOVS];
#ifndef BLK_NO_IO_URING
    struct io_uring ring;
#endif
    aio_context_t aio;
    struct iocb *submit[BLK_DEPTH];
    struct iocb iocb[BLK_DEPTH];
    struct io_event events[BLK_DEPTH];
};

struct blk_worker {
    struct blk_engine *engine;    /* NULL: every request inline (blk_serve) */
    uint8_t *bounce;              /* aligned to mem_align and block_size */
    size_t bounce_size;           /* a multiple of block_size */
    /* What the file system refused once (EOPNOTSUPP) is not tried again. */
    uint32_t no_punch_hole, no_zero_range;
    /* Counters, for tests and statistics. */
    uint64_t requests, errors, bounced, zeroes_written;
    /* A chain popped and held back until the disk's limiter lets it run (ratelimit.h):
     * it is in w->chain, and wait_ns says how long at the last look. */
    uint32_t held;
    uint64_t wait_ns;
    /* The statistics this worker adds to (NULL: none), and what request() last did. */
    struct blk_stats *stats;
    uint64_t batch_ns;            /* when this pass over the ring began (one clock read
                                     for its pops, its start times, the limiter) */
    uint64_t done_ns;             /* when the engine's current completions were reaped */
    uint64_t start_ns;            /* when w->chain was popped (its pass's start) */
    uint32_t unsettled[3];        /* reads, writes, flushes this pass completed inline whose
                                     latency is taken when the pass publishes them */
    uint32_t op, op_ok;
    uint64_t op_bytes;
    struct vq_chain chain;
    struct iovec iov[VQ_MAX_SEGS];
    struct blk_dwz dwz[BLK_MAX_DWZ_SEG];
};

/* The O_DIRECT alignment of fd: statx(STATX_DIOALIGN) when the kernel and file system
 * report it, else the logical block size (BLKSSZGET) of a block device, else 512.
 * block_size is at least 512. 0 or -errno (fstat failed). */
int blk_dio_alignment(int fd, uint32_t *mem_align, uint32_t *block_size);

/* Checks a disk description and attaches a bounce buffer to a zeroed worker. 0, or
 * -EINVAL when the alignments are not powers of 2, block_size < 512, the capacity is
 * not a whole number of blocks (O_DIRECT), the limits exceed what blk_process handles,
 * or the buffer is misaligned or smaller than a block. */
int blk_worker_init(struct blk_worker *w, const struct blk_disk *d, uint8_t *bounce,
                    size_t bounce_size);

/* Serves up to `budget` chains of q: pops, executes and completes them, publishing
 * the used index once at the end. A chain the disk's limiter holds back stays popped in
 * the worker (BLK_THROTTLED) and runs first at a later call; it costs one op and its
 * data bytes (the chain's buffers less the header and the status byte). -EINVAL when the ring is malformed (the queue is
 * then broken, see virtq.h; the completions before it are published); otherwise the
 * BLK_NOTIFY and BLK_MORE bits. The worker must have been through blk_worker_init with
 * the same disk. */
int blk_process(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                uint32_t budget);

/* The asynchronous step: reaps the engine's completions (without waiting), pops up to
 * `budget` chains while the engine has free slots, starts each on the engine or, when
 * it cannot take it (GET_ID, DISCARD, WRITE_ZEROES, an O_DIRECT request that must
 * bounce, more than BLK_SLOT_IOVS buffers, a malformed request), runs it inline; hands
 * the new ones to the kernel in one call; publishes every completion so far with one
 * used->idx update and takes one interrupt decision. Without an engine it is
 * blk_process with at most BLK_INLINE_BATCH of the budget (BLK_MORE: more wait).
 * -EINVAL when the ring is malformed (requests may still be in flight: blk_drain
 * them); otherwise the BLK_NOTIFY, BLK_MORE, BLK_FULL and BLK_RETRY bits. */
int blk_pump(struct vq *q, const struct blk_disk *d, struct blk_worker *w, uint32_t budget);

/* Waits until nothing is in flight on the worker's engine, completing each request as
 * it ends, then publishes. A chain held for the limiter runs first, unlimited: a ring
 * that stops owes the driver every chain it popped. BLK_NOTIFY when the driver should be interrupted (always,
 * when something completed on a broken queue: the driver may be waiting for it), 0, or
 * -errno if the engine fails. */
int blk_drain(struct vq *q, const struct blk_disk *d, struct blk_worker *w);

/* A queue worker's whole loop: blk_pump, interrupt through call_fd (an eventfd; -1:
 * none) when it says so; while a chain waits for the limiter, sleep until it may run
 * (at most BLK_RECHECK_NS); kicks are suppressed while there is work (VRING_USED_F_NO_NOTIFY,
 * or avail_event left behind with EVENT_IDX) and asked for again, with a last look at
 * the ring, before it sleeps; then wait on kick_fd (an eventfd), stop_fd and the
 * engine's fd; again. Returns 0 once stop_fd is readable (it is not read) and every
 * request in flight has completed, -EINVAL when the ring is malformed (after the same
 * drain), -errno if poll, an eventfd or the engine fails. The fds must stay open until
 * it returns. */
int blk_serve(struct vq *q, const struct blk_disk *d, struct blk_worker *w, int kick_fd,
              int call_fd, int stop_fd);

/* Sets up an engine of `kind` (BLK_ENGINE_IO_URING or BLK_ENGINE_AIO) for the disk,
 * with up to `depth` (1..BLK_DEPTH) requests in flight; e: zeroed, sizeof(struct
 * blk_engine) bytes. io_uring: a ring created disabled, the disk's fd registered as its
 * only file, restricted to READV, WRITEV and FSYNC on that fixed file (no other opcode,
 * no other flag, no io_uring_register call at all once enabled), then enabled. AIO: a
 * context of `depth` events and an eventfd its completions signal. 0, or -errno (the
 * kernel refused: e->kind is then BLK_ENGINE_INLINE, e->error says why). */
int blk_engine_init(struct blk_engine *e, const struct blk_disk *d, int kind, uint32_t depth);

/* Releases what blk_engine_init set up (nothing may be in flight). */
void blk_engine_close(struct blk_engine *e);

/* Whether this build has io_uring (liburing was there at build time). */
int blk_have_io_uring(void);

#endif

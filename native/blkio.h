/* The virtio-blk data path (virtio 1.2, section 5.2): requests popped from a virtqueue
 * (virtq.h), parsed, checked and executed against the disk fd with preadv/pwritev
 * straight into and out of guest RAM, completed with a status byte. See blkio.c for
 * the rules a request must follow and what happens when it does not.
 *
 * One struct blk_worker per queue worker thread (scratch space, the bounce buffer,
 * counters); struct blk_disk is shared and read-only once set up.
 */
#ifndef VMM_BLKIO_H
#define VMM_BLKIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

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

/* blk_process's answer, when the queue is not broken. */
#define BLK_NOTIFY 1   /* chains were completed and the driver wants an interrupt */
#define BLK_MORE   2   /* the budget ran out: call again before waiting for a kick */

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
};

/* One discard / write-zeroes segment as copied out of guest memory. */
struct blk_dwz {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

struct blk_worker {
    uint8_t *bounce;              /* aligned to mem_align and block_size */
    size_t bounce_size;           /* a multiple of block_size */
    /* What the file system refused once (EOPNOTSUPP) is not tried again. */
    uint32_t no_punch_hole, no_zero_range;
    /* Counters, for tests and statistics. */
    uint64_t requests, errors, bounced, zeroes_written;
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
 * the used index once at the end. -EINVAL when the ring is malformed (the queue is
 * then broken, see virtq.h; the completions before it are published); otherwise the
 * BLK_NOTIFY and BLK_MORE bits. The worker must have been through blk_worker_init with
 * the same disk. */
int blk_process(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                uint32_t budget);

/* A queue worker's whole loop: blk_process, interrupt through call_fd (an eventfd; -1:
 * none) when it says so, then wait on kick_fd (an eventfd) and stop_fd; again. Returns
 * 0 once stop_fd is readable (it is not read), -EINVAL when the ring is malformed,
 * -errno if poll or an eventfd fails. The fds must stay open until it returns. */
int blk_serve(struct vq *q, const struct blk_disk *d, struct blk_worker *w, int kick_fd,
              int call_fd, int stop_fd);

#endif

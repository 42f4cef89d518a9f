/* The virtio-blk data path (virtio 1.2, section 5.2), device side.
 *
 * blk_process pops chains with the ring walker (virtq.c), which has already checked
 * every descriptor: each segment is a non-empty host range inside one guest RAM
 * region, device-readable segments come first. What is left to check here is the
 * request itself, whose bytes are guest memory the guest may change while we look:
 *
 * - The status byte is the last byte of the last device-writable segment. A chain with
 *   no writable segment has nowhere to put a status: it is completed with 0 bytes
 *   written and nothing else happens.
 * - The 16-byte header (type, reserved, sector) is the start of the readable segments;
 *   it is copied out once and only the copy is used. Fewer than 16 readable bytes:
 *   IOERR. So are the discard / write-zeroes segments: all are copied out, then
 *   checked, then executed, so a guest cannot change one between check and use.
 * - Data direction: an IN's data is the writable bytes before the status; readable
 *   bytes after the header are refused (IOERR) rather than ignored. An OUT's,
 *   DISCARD's and WRITE_ZEROES' data is the readable bytes after the header, and the
 *   writable part must be the status byte alone (IOERR otherwise): a guest that marks
 *   its buffers the wrong way round gets an error, never a silent no-op. FLUSH and
 *   GET_ID ignore readable bytes after the header, as QEMU does.
 * - Ranges: IN/OUT data must be a whole number of sectors; sector and sector + count
 *   are checked against the capacity without overflow (count <= capacity - sector).
 *   Past the end: IOERR. A write of any kind to a read-only disk: IOERR (DISCARD and
 *   WRITE_ZEROES are not offered then, so they get UNSUPP, like unknown types).
 * - DISCARD / WRITE_ZEROES: data a non-zero multiple of 16 bytes, at most max_*_seg
 *   segments, each with num_sectors <= max_*_sectors, inside the disk: else IOERR.
 *   Reserved flag bits, or UNMAP on a discard: UNSUPP (the spec's MUST). A segment of
 *   0 sectors does nothing.
 *
 * I/O: straight between the disk fd and the guest's buffers. With
 * O_DIRECT that needs every buffer address aligned to mem_align and every length and
 * the offset to block_size (the file system's DIO alignment, blk_dio_alignment);
 * when a request is not, it goes through the worker's aligned bounce buffer in chunks,
 * and a request whose offset or length is not a multiple of block_size (possible only
 * with blocks above 512 bytes) is read-modify-written a block at a time at its ends.
 * Short transfers are continued; end of file or an error is IOERR.
 *
 * DISCARD punches a hole (fallocate PUNCH_HOLE|KEEP_SIZE) in a regular file, or issues
 * BLKDISCARD (whole logical blocks inside the range) on a block device; a file system
 * or device that cannot discard makes it a successful no-op, which the spec allows.
 * WRITE_ZEROES punches a hole when the driver set UNMAP and the device allows it
 * (reads of a hole return zeroes), else FALLOC_FL_ZERO_RANGE, and when the file system
 * refuses both, writes zeroes through the bounce buffer. Refusals (EOPNOTSUPP) are
 * remembered per worker so they cost one system call, not one per request.
 *
 * Engines (blk_pump, blk_serve): with one, a queue keeps up to BLK_DEPTH reads, writes
 * and flushes in flight (io_uring READV/WRITEV/FSYNC on the registered disk fd, or Linux
 * AIO PREADV/PWRITEV/FDSYNC), each in a slot that holds its head, its status byte's
 * address and its own iovecs until it completes; they complete in whatever order the
 * disk finishes them. Everything else (GET_ID, DISCARD, WRITE_ZEROES, errors, O_DIRECT
 * requests that must bounce, requests of more than BLK_SLOT_IOVS buffers) runs inline
 * as before. A short transfer is finished inline (preadv/pwritev); a failed one is
 * IOERR. Nothing that was popped is dropped: a ring that breaks, or a stop, first waits
 * for every request in flight (blk_drain) and completes it; the guest's memory stays
 * mapped until then (the backend stops its rings before it unmaps RAM).
 *
 * Partial blocks (read-modify-write through the bounce buffer) are written under one
 * process-wide lock: two queues writing different sectors of one block cannot lose
 * each other's. Linux guests never send such requests (blk_size tells them the block).
 *
 * Completions: each chain's used element is written as it completes; used->idx is
 * published once per blk_process or blk_pump call, whatever number completed, and the
 * interrupt decision is taken once.
 */
#define _GNU_SOURCE
#include "blkio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HEADER_BYTES 16
#define DWZ_BYTES    16
#define MAX_CAPACITY (UINT64_C(1) << 54)     /* sectors: byte offsets fit in off_t */
#define PENDING      (-1)                    /* request(): the engine has it */
#define FOREVER      UINT64_MAX              /* blk_serve: no timeout */

static pthread_mutex_t rmw_lock = PTHREAD_MUTEX_INITIALIZER;

/* A read position in a range of a chain's segments. */
struct cursor {
    const struct vq_seg *seg, *end;
    uint32_t off;                            /* bytes of *seg already consumed */
};

static void cursor_init(struct cursor *c, const struct vq_seg *first, const struct vq_seg *end)
{
    c->seg = first;
    c->end = end;
    c->off = 0;
}

/* Copies up to len bytes between the guest buffers at the cursor and buf (into the
 * guest when to_guest), advancing the cursor; the number of bytes copied. */
static uint64_t cursor_copy(struct cursor *c, uint8_t *buf, uint64_t len, int to_guest)
{
    uint64_t done = 0;

    while (done < len && c->seg < c->end) {
        uint32_t left = c->seg->len - c->off;
        uint32_t n = len - done < left ? (uint32_t)(len - done) : left;

        if (to_guest)
            memcpy(c->seg->addr + c->off, buf + done, n);
        else
            memcpy(buf + done, c->seg->addr + c->off, n);
        done += n;
        c->off += n;
        if (c->off == c->seg->len) {
            c->seg++;
            c->off = 0;
        }
    }
    return done;
}

/* iovecs for the next len bytes at the cursor (at most one per segment, so at most
 * VQ_MAX_SEGS); their number. The caller knows the segments hold len bytes. */
static int cursor_iov(struct cursor *c, uint64_t len, struct iovec *iov)
{
    int count = 0;

    while (len > 0 && c->seg < c->end) {
        uint32_t left = c->seg->len - c->off;
        uint32_t n = len < left ? (uint32_t)len : left;

        iov[count].iov_base = c->seg->addr + c->off;
        iov[count].iov_len = n;
        count++;
        len -= n;
        c->off += n;
        if (c->off == c->seg->len) {
            c->seg++;
            c->off = 0;
        }
    }
    return count;
}

static int in_range(const struct blk_disk *d, uint64_t sector, uint64_t count)
{
    return sector <= d->capacity && count <= d->capacity - sector;
}

/* preadv/pwritev of the whole iovec array (which is consumed) at off. 0, or -errno;
 * -EIO at end of file. */
static int rw_iov(int fd, int write, struct iovec *iov, int count, uint64_t off)
{
    while (count > 0) {
        ssize_t n = write ? pwritev(fd, iov, count, (off_t)off)
                          : preadv(fd, iov, count, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO;
        off += (uint64_t)n;
        while (count > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static int rw_buf(int fd, int write, uint8_t *buf, size_t len, uint64_t off)
{
    struct iovec iov = { buf, len };
    return rw_iov(fd, write, &iov, 1, off);
}

/* Whether O_DIRECT can take these buffers at off as they are. */
static int dio_aligned(const struct blk_disk *d, const struct iovec *iov, int count,
                       uint64_t off)
{
    uintptr_t addresses = 0;
    uint64_t lengths = off;
    int i;

    for (i = 0; i < count; i++) {
        addresses |= (uintptr_t)iov[i].iov_base;
        lengths |= iov[i].iov_len;
    }
    return !(addresses & (d->mem_align - 1)) && !(lengths & (d->block_size - 1));
}

static uint32_t io_align(const struct blk_disk *d)
{
    return d->direct ? d->block_size : BLK_SECTOR;
}

/* [off, off + len) of the disk into the guest buffers at `data`, through the bounce
 * buffer: whole aligned blocks are read, the wanted part is copied out. */
static int bounce_read(const struct blk_disk *d, struct blk_worker *w, struct cursor *data,
                       uint64_t off, uint64_t len)
{
    uint64_t align = io_align(d), end = off + len, pos;
    uint64_t last = (end + align - 1) & ~(align - 1);
    int rc;

    for (pos = off & ~(align - 1); pos < last;) {
        uint64_t n = last - pos < w->bounce_size ? last - pos : w->bounce_size;
        uint64_t lo = pos > off ? pos : off, hi = pos + n < end ? pos + n : end;

        rc = rw_buf(d->fd, 0, w->bounce, n, pos);
        if (rc)
            return rc;
        cursor_copy(data, w->bounce + (lo - pos), hi - lo, 1);
        pos += n;
    }
    return 0;
}

static int bounce_write_blocks(const struct blk_disk *d, struct blk_worker *w,
                               struct cursor *data, uint64_t off, uint64_t len);

/* The guest buffers at `data` (zeroes when data is NULL) to [off, off + len) of the
 * disk, through the bounce buffer; partial blocks at the ends are read first, under
 * rmw_lock (another queue may be writing another part of the same block). */
static int bounce_write(const struct blk_disk *d, struct blk_worker *w, struct cursor *data,
                        uint64_t off, uint64_t len)
{
    uint64_t align = io_align(d);
    int rc;

    if (!((off | len) & (align - 1)))
        return bounce_write_blocks(d, w, data, off, len);
    pthread_mutex_lock(&rmw_lock);
    rc = bounce_write_blocks(d, w, data, off, len);
    pthread_mutex_unlock(&rmw_lock);
    return rc;
}

static int bounce_write_blocks(const struct blk_disk *d, struct blk_worker *w,
                               struct cursor *data, uint64_t off, uint64_t len)
{
    uint64_t align = io_align(d), end = off + len, pos;
    uint64_t last = (end + align - 1) & ~(align - 1);
    int rc;

    for (pos = off & ~(align - 1); pos < last;) {
        uint64_t n = last - pos < w->bounce_size ? last - pos : w->bounce_size;
        uint64_t lo = pos > off ? pos : off, hi = pos + n < end ? pos + n : end;

        if (lo > pos && (rc = rw_buf(d->fd, 0, w->bounce, align, pos)))
            return rc;
        if (hi < pos + n && (rc = rw_buf(d->fd, 0, w->bounce + n - align, align, pos + n - align)))
            return rc;
        if (data)
            cursor_copy(data, w->bounce + (lo - pos), hi - lo, 0);
        else
            memset(w->bounce + (lo - pos), 0, hi - lo);
        rc = rw_buf(d->fd, 1, w->bounce, n, pos);
        if (rc)
            return rc;
        pos += n;
    }
    return 0;
}

/* A read (write = 0) or write of len bytes at off, the guest side at `data`. */
static int transfer(const struct blk_disk *d, struct blk_worker *w, int write,
                    struct cursor data, uint64_t off, uint64_t len)
{
    struct cursor copy = data;
    int count = cursor_iov(&copy, len, w->iov);

    if (!d->direct || dio_aligned(d, w->iov, count, off))
        return rw_iov(d->fd, write, w->iov, count, off);
    w->bounced++;
    return write ? bounce_write(d, w, &data, off, len) : bounce_read(d, w, &data, off, len);
}

static int refused(int error)
{
    return error == EOPNOTSUPP || error == ENOSYS || error == ENOTTY;
}

static int discard(const struct blk_disk *d, struct blk_worker *w, uint64_t off, uint64_t len)
{
    if (d->block_device) {
        /* BLKDISCARD takes whole logical blocks: those inside the range. */
        uint64_t bs = d->block_size, start = (off + bs - 1) & ~(bs - 1);
        uint64_t end = (off + len) & ~(bs - 1), range[2];

        if (end <= start)
            return 0;
        range[0] = start;
        range[1] = end - start;
        if (ioctl(d->fd, BLKDISCARD, range) && !refused(errno) && errno != EINVAL)
            return -errno;
        return 0;
    }
    if (w->no_punch_hole)
        return 0;
    if (fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len)) {
        if (!refused(errno))
            return -errno;
        w->no_punch_hole = 1;
    }
    return 0;
}

static int write_zeroes(const struct blk_disk *d, struct blk_worker *w, uint64_t off,
                        uint64_t len, int unmap)
{
    if (unmap && d->write_zeroes_may_unmap && !w->no_punch_hole) {
        if (!fallocate(d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
            return 0;
        if (refused(errno))
            w->no_punch_hole = 1;
        else if (errno != EINVAL)
            return -errno;
    }
    if (!w->no_zero_range) {
        if (!fallocate(d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
            return 0;
        if (refused(errno))
            w->no_zero_range = 1;
        else if (errno != EINVAL)
            return -errno;
    }
    w->zeroes_written++;
    return bounce_write(d, w, NULL, off, len);
}

static uint8_t discard_write_zeroes(const struct blk_disk *d, struct blk_worker *w,
                                    uint32_t type, struct cursor *in, uint64_t rdata,
                                    uint64_t wdata)
{
    int is_discard = type == BLK_T_DISCARD;
    uint32_t max_seg = is_discard ? d->max_discard_seg : d->max_write_zeroes_seg;
    uint32_t max_sectors = is_discard ? d->max_discard_sectors : d->max_write_zeroes_sectors;
    uint32_t count, i;

    if (d->read_only || !(is_discard ? d->discard : d->write_zeroes))
        return BLK_S_UNSUPP;
    if (wdata || rdata == 0 || rdata % DWZ_BYTES || rdata / DWZ_BYTES > max_seg)
        return BLK_S_IOERR;
    count = (uint32_t)(rdata / DWZ_BYTES);
    for (i = 0; i < count; i++) {
        uint8_t raw[DWZ_BYTES];

        cursor_copy(in, raw, DWZ_BYTES, 0);
        memcpy(&w->dwz[i].sector, raw, 8);
        memcpy(&w->dwz[i].num_sectors, raw + 8, 4);
        memcpy(&w->dwz[i].flags, raw + 12, 4);
    }
    for (i = 0; i < count; i++) {
        uint32_t flags = w->dwz[i].flags;
        if ((flags & ~BLK_DWZ_F_UNMAP) || (is_discard && (flags & BLK_DWZ_F_UNMAP)))
            return BLK_S_UNSUPP;
    }
    for (i = 0; i < count; i++)
        if (w->dwz[i].num_sectors > max_sectors ||
            !in_range(d, w->dwz[i].sector, w->dwz[i].num_sectors))
            return BLK_S_IOERR;
    for (i = 0; i < count; i++) {
        uint64_t off = w->dwz[i].sector * BLK_SECTOR;
        uint64_t len = (uint64_t)w->dwz[i].num_sectors * BLK_SECTOR;
        int rc;

        if (len == 0)
            continue;
        rc = is_discard ? discard(d, w, off, len)
                        : write_zeroes(d, w, off, len, w->dwz[i].flags & BLK_DWZ_F_UNMAP);
        if (rc)
            return BLK_S_IOERR;
    }
    return BLK_S_OK;
}

static int start(const struct blk_disk *d, struct blk_worker *w, struct blk_engine *e,
                 uint16_t type, struct cursor data, uint64_t off, uint64_t len,
                 uint8_t *status, uint32_t written);

/* Executes the chain in w->chain, or starts it on the engine e (NULL: none); the number
 * of bytes written into it, or PENDING when the engine has it. */
static int64_t request(const struct blk_disk *d, struct blk_worker *w, struct blk_engine *e)
{
    const struct vq_chain *c = &w->chain;
    const struct vq_seg *last;
    struct cursor in, out;
    uint8_t header[HEADER_BYTES], *status, s;
    uint64_t rdata, wdata, sector;
    uint32_t type, written = 1;

    w->op = BLK_OP_OTHER;
    w->op_ok = 0;
    w->op_bytes = 0;
    if (c->nsegs == c->nreadable)
        return 0;                                  /* nowhere to put a status */
    last = &c->segs[c->nsegs - 1];
    status = last->addr + last->len - 1;
    wdata = c->writable_bytes - 1;
    cursor_init(&in, c->segs, c->segs + c->nreadable);
    cursor_init(&out, c->segs + c->nreadable, c->segs + c->nsegs);
    if (cursor_copy(&in, header, HEADER_BYTES, 0) < HEADER_BYTES) {
        *status = BLK_S_IOERR;
        w->errors++;
        return 1;
    }
    memcpy(&type, header, 4);
    if (type == BLK_T_IN || type == BLK_T_OUT || type == BLK_T_FLUSH)
        w->op = type == BLK_T_IN ? BLK_OP_READ : type == BLK_T_OUT ? BLK_OP_WRITE : BLK_OP_FLUSH;
    memcpy(&sector, header + 8, 8);
    rdata = c->readable_bytes - HEADER_BYTES;

    switch (type) {
    case BLK_T_IN:
        if (rdata || wdata % BLK_SECTOR || !in_range(d, sector, wdata / BLK_SECTOR)) {
            s = BLK_S_IOERR;
            break;
        }
        if (e && start(d, w, e, BLK_T_IN, out, sector * BLK_SECTOR, wdata, status,
                       (uint32_t)(wdata + 1)))
            return PENDING;
        s = transfer(d, w, 0, out, sector * BLK_SECTOR, wdata) ? BLK_S_IOERR : BLK_S_OK;
        if (s == BLK_S_OK)
            written = (uint32_t)(wdata + 1);       /* a whole number of sectors + 1 < 2^32 */
        w->op_bytes = wdata;
        break;
    case BLK_T_OUT:
        if (d->read_only || wdata || rdata % BLK_SECTOR ||
            !in_range(d, sector, rdata / BLK_SECTOR)) {
            s = BLK_S_IOERR;
            break;
        }
        if (e && start(d, w, e, BLK_T_OUT, in, sector * BLK_SECTOR, rdata, status, 1))
            return PENDING;
        s = transfer(d, w, 1, in, sector * BLK_SECTOR, rdata) ? BLK_S_IOERR : BLK_S_OK;
        w->op_bytes = rdata;
        break;
    case BLK_T_FLUSH:
        if (e && start(d, w, e, BLK_T_FLUSH, in, 0, 0, status, 1))
            return PENDING;
        s = fdatasync(d->fd) ? BLK_S_IOERR : BLK_S_OK;
        break;
    case BLK_T_GET_ID: {
        uint8_t id[BLK_ID_BYTES];
        uint64_t n = wdata < BLK_ID_BYTES ? wdata : BLK_ID_BYTES;

        memcpy(id, d->id, sizeof id);
        cursor_copy(&out, id, n, 1);
        written = (uint32_t)n + 1;
        s = BLK_S_OK;
        break;
    }
    case BLK_T_DISCARD:
    case BLK_T_WRITE_ZEROES:
        s = discard_write_zeroes(d, w, type, &in, rdata, wdata);
        break;
    default:
        s = BLK_S_UNSUPP;
        break;
    }
    if (s != BLK_S_OK)
        w->errors++;
    w->op_ok = s == BLK_S_OK;
    *status = s;
    return written;
}

/* Counts one completed request, popped at start_ns and completed at now, in the
 * worker's statistics. */
static void account(struct blk_worker *w, uint32_t op, int ok, uint64_t bytes,
                    uint64_t start_ns, uint64_t now)
{
    struct blk_stats *st = w->stats;
    uint64_t took, bound;
    int bucket = 0;

    if (!st)
        return;
    st->ops[op]++;
    if (!ok) {
        st->failed[op]++;
        return;
    }
    if (op == BLK_OP_OTHER)
        return;
    took = now - start_ns;
    st->total_ns[op] += took;
    if (op == BLK_OP_FLUSH)
        return;
    st->bytes[op] += bytes;
    for (bound = 16000; bucket < BLK_LAT_BUCKETS - 1 && took >= bound; bound *= 2)
        bucket++;
    st->latency[op][bucket]++;
}

/* Counts one request completed inline in this pass, popped at the pass's start: all but
 * its latency now; that when the pass publishes it (settle), which is when the guest can
 * see it, with one clock read for the whole pass instead of one per request. */
static void account_inline(struct blk_worker *w)
{
    struct blk_stats *st = w->stats;
    uint32_t op = w->op;

    if (!w->op_ok || op == BLK_OP_OTHER || w->start_ns != w->batch_ns) {
        /* failed (no latency), or a held chain from an earlier pass: as it is */
        account(w, op, (int)w->op_ok, w->op_bytes, w->start_ns, rl_now());
        return;
    }
    st->ops[op]++;
    if (op != BLK_OP_FLUSH)
        st->bytes[op] += w->op_bytes;
    w->unsettled[op]++;
}

/* The latency of the pass's inline completions, as they are published: now less the
 * pass's start, the same for each of them. */
static void settle(struct blk_worker *w)
{
    struct blk_stats *st = w->stats;
    uint64_t took, bound;
    uint32_t op;
    int bucket = 0;

    if (!st || !(w->unsettled[0] | w->unsettled[1] | w->unsettled[2]))
        return;
    took = rl_now() - w->batch_ns;
    for (bound = 16000; bucket < BLK_LAT_BUCKETS - 1 && took >= bound; bound *= 2)
        bucket++;
    for (op = 0; op < 3; op++) {
        st->total_ns[op] += (uint64_t)w->unsettled[op] * took;
        if (op != BLK_OP_FLUSH)
            st->latency[op][bucket] += w->unsettled[op];
        w->unsettled[op] = 0;
    }
}

/* request() and, when it completed the chain (not PENDING), its accounting. */
static int64_t run_request(const struct blk_disk *d, struct blk_worker *w, struct blk_engine *e)
{
    int64_t written = request(d, w, e);

    if (written != PENDING && w->stats)
        account_inline(w);
    return written;
}

/* Pops the next chain into w->chain, or takes the one held back; asks the limiter.
 * 1: run it now; 0: none there; BLK_THROTTLED: it waits (held, w->wait_ns); -EINVAL:
 * the ring is malformed. */
static int next_chain(struct vq *q, const struct blk_disk *d, struct blk_worker *w)
{
    int first = !w->held;
    uint64_t data;

    if (first) {
        int rc = vq_pop(q, &w->chain);

        if (rc <= 0)
            return rc;
        w->start_ns = w->batch_ns;
    }
    /* One op and the data bytes: the buffers less a header and a status byte. */
    data = (w->chain.readable_bytes > HEADER_BYTES ? w->chain.readable_bytes - HEADER_BYTES : 0) +
           (w->chain.writable_bytes > 1 ? w->chain.writable_bytes - 1 : 0);
    w->wait_ns = rl_consume(d->limiter, data, w->batch_ns);
    w->held = w->wait_ns != 0;
    if (w->held && first && w->stats)
        w->stats->throttled++;
    return w->held ? BLK_THROTTLED : 1;
}

/* The clock, read once for a pass over the ring, when something will use it. */
static void begin_pass(const struct blk_disk *d, struct blk_worker *w)
{
    w->batch_ns = w->stats || d->limiter ? rl_now() : 0;
}

int blk_process(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                uint32_t budget)
{
    uint32_t done = 0;
    int rc = 0, more = 0, throttled = 0;

    begin_pass(d, w);
    for (;;) {
        if (done == budget) {
            more = 1;
            break;
        }
        rc = next_chain(q, d, w);
        if (rc == BLK_THROTTLED) {
            throttled = 1;
            rc = 0;
        }
        if (rc <= 0)
            break;
        vq_add_used(q, w->chain.head, (uint32_t)run_request(d, w, NULL));
        w->requests++;
        done++;
    }
    if (done) {
        vq_publish_used(q);
        settle(w);
    }
    if (rc < 0)
        return -EINVAL;
    return (done && vq_needs_interrupt(q) ? BLK_NOTIFY : 0) | (more ? BLK_MORE : 0) |
           (throttled ? BLK_THROTTLED : 0);
}

/* ---- engines ---------------------------------------------------------------------- */

int blk_have_io_uring(void)
{
#ifdef BLK_NO_IO_URING
    return 0;
#else
    return 1;
#endif
}

static long sys_io_setup(unsigned nr, aio_context_t *ctx)
{
    return syscall(SYS_io_setup, nr, ctx);
}

static long sys_io_destroy(aio_context_t ctx)
{
    return syscall(SYS_io_destroy, ctx);
}

static long sys_io_submit(aio_context_t ctx, long n, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, ctx, n, iocbs);
}

static long sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *events,
                             struct timespec *timeout)
{
    return syscall(SYS_io_getevents, ctx, min, max, events, timeout);
}

static void engine_reset(struct blk_engine *e, uint32_t depth)
{
    uint32_t i;

    e->depth = depth;
    e->queued = e->inflight = 0;
    e->nfree = depth;
    for (i = 0; i < depth; i++)
        e->free[i] = (uint16_t)(depth - 1 - i);        /* slot 0 is used first */
}

#ifndef BLK_NO_IO_URING
/* io_uring_register(2) itself: liburing 2.3 as Debian ships it does not export its
 * restriction and enable wrappers, and its file registration may raise RLIMIT_NOFILE. */
static int uring_register(struct io_uring *ring, unsigned op, const void *arg, unsigned n)
{
    long rc = syscall(__NR_io_uring_register, ring->ring_fd, op, arg, n);

    return rc < 0 ? -errno : (int)rc;
}

static int uring_init(struct blk_engine *e, uint32_t depth)
{
    struct io_uring_params p;
    struct io_uring_restriction r[5];
    int rc;

    memset(&p, 0, sizeof p);
    /* Disabled until restricted: no submission can happen before the rules hold. */
    p.flags = IORING_SETUP_R_DISABLED;
    rc = io_uring_queue_init_params(depth, &e->ring, &p);
    if (rc < 0)
        return rc;
    rc = uring_register(&e->ring, IORING_REGISTER_FILES, &e->disk_fd, 1);
    if (rc >= 0) {
        memset(r, 0, sizeof r);
        r[0].opcode = IORING_RESTRICTION_SQE_OP;
        r[0].sqe_op = IORING_OP_READV;
        r[1].opcode = IORING_RESTRICTION_SQE_OP;
        r[1].sqe_op = IORING_OP_WRITEV;
        r[2].opcode = IORING_RESTRICTION_SQE_OP;
        r[2].sqe_op = IORING_OP_FSYNC;
        /* Every SQE names the registered file (index 0: the disk), and nothing else
         * may be asked (no links, no async punts by request, no buffer selection). */
        r[3].opcode = IORING_RESTRICTION_SQE_FLAGS_ALLOWED;
        r[3].sqe_flags = IOSQE_FIXED_FILE;
        r[4].opcode = IORING_RESTRICTION_SQE_FLAGS_REQUIRED;
        r[4].sqe_flags = IOSQE_FIXED_FILE;
        /* No IORING_RESTRICTION_REGISTER_OP: once enabled, every io_uring_register
         * opcode is refused (EACCES), so the file table and the rules are fixed. */
        rc = uring_register(&e->ring, IORING_REGISTER_RESTRICTIONS, r, 5);
    }
    if (rc >= 0)
        rc = uring_register(&e->ring, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    if (rc < 0) {
        io_uring_queue_exit(&e->ring);
        return rc;
    }
    /* CQ overflow cannot happen: the CQ has twice the SQ's entries and at most depth
     * requests are in flight. */
    e->fd = e->ring.ring_fd;
    return 0;
}
#endif

static int aio_init(struct blk_engine *e, uint32_t depth)
{
    int rc;

    e->aio = 0;
    if (sys_io_setup(depth, &e->aio) < 0)
        return -errno;
    e->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->fd < 0) {
        rc = -errno;
        sys_io_destroy(e->aio);
        return rc;
    }
    return 0;
}

int blk_engine_init(struct blk_engine *e, const struct blk_disk *d, int kind, uint32_t depth)
{
    int rc;

    e->kind = BLK_ENGINE_INLINE;
    e->fd = -1;
    e->error = 0;
    e->disk_fd = d->fd;
    if (depth < 1 || depth > BLK_DEPTH)
        return -EINVAL;
    engine_reset(e, depth);
    if (kind == BLK_ENGINE_IO_URING) {
#ifdef BLK_NO_IO_URING
        rc = -ENOSYS;
#else
        rc = uring_init(e, depth);
#endif
    } else if (kind == BLK_ENGINE_AIO) {
        rc = aio_init(e, depth);
    } else {
        rc = -EINVAL;
    }
    if (rc < 0) {
        e->fd = -1;
        e->error = -rc;
        return rc;
    }
    e->kind = kind;
    return 0;
}

void blk_engine_close(struct blk_engine *e)
{
#ifndef BLK_NO_IO_URING
    if (e->kind == BLK_ENGINE_IO_URING)
        io_uring_queue_exit(&e->ring);
#endif
    if (e->kind == BLK_ENGINE_AIO) {
        sys_io_destroy(e->aio);
        close(e->fd);
    }
    e->kind = BLK_ENGINE_INLINE;
    e->fd = -1;
}

/* Takes a free slot for the request, or says the engine cannot take it (0: run it
 * inline). The data's iovecs are the slot's own, kept until the request completes. */
static int start(const struct blk_disk *d, struct blk_worker *w, struct blk_engine *e,
                 uint16_t type, struct cursor data, uint64_t off, uint64_t len,
                 uint8_t *status, uint32_t written)
{
    struct blk_slot *s;
    uint16_t i;
    uint32_t count = 0;

    if (e->kind == BLK_ENGINE_INLINE || e->nfree == 0)
        return 0;
    i = e->free[e->nfree - 1];
    if (type != BLK_T_FLUSH) {
        if (len == 0 || data.end - data.seg > BLK_SLOT_IOVS)
            return 0;
        count = (uint32_t)cursor_iov(&data, len, e->iov[i]);
        if (d->direct && !dio_aligned(d, e->iov[i], (int)count, off))
            return 0;                    /* through the bounce buffer, inline */
    }
    s = &e->slot[i];
    s->head = w->chain.head;
    s->type = type;
    s->niov = count;
    s->written = written;
    s->status = status;
    s->off = off;
    s->len = len;
    s->start_ns = w->start_ns;
#ifndef BLK_NO_IO_URING
    if (e->kind == BLK_ENGINE_IO_URING) {
        /* At most depth slots are busy, so the SQ (depth entries) has room. */
        struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);

        if (!sqe)
            return 0;
        if (type == BLK_T_FLUSH)
            io_uring_prep_fsync(sqe, 0, IORING_FSYNC_DATASYNC);
        else if (type == BLK_T_IN)
            io_uring_prep_readv(sqe, 0, e->iov[i], count, off);
        else
            io_uring_prep_writev(sqe, 0, e->iov[i], count, off);
        sqe->flags |= IOSQE_FIXED_FILE;          /* index 0 of the registered files */
        sqe->user_data = i;
    }
#endif
    if (e->kind == BLK_ENGINE_AIO) {
        struct iocb *cb = &e->iocb[i];

        memset(cb, 0, sizeof *cb);
        cb->aio_data = i;
        cb->aio_fildes = (uint32_t)e->disk_fd;
        cb->aio_lio_opcode = type == BLK_T_FLUSH ? IOCB_CMD_FDSYNC
                           : type == BLK_T_IN ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
        cb->aio_buf = (uint64_t)(uintptr_t)e->iov[i];
        cb->aio_nbytes = count;
        cb->aio_offset = (int64_t)off;
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)e->fd;
        e->submit[e->queued] = cb;
    }
    e->nfree--;
    e->queued++;
    e->started++;
    return 1;
}

/* The end of slot i's request with result res (bytes, or -errno): the status byte, its
 * used element. A short transfer is finished inline. */
static void finish(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                   struct blk_engine *e, uint32_t i, int64_t res)
{
    struct blk_slot *s = &e->slot[i];
    int ok;

    if (s->type == BLK_T_FLUSH) {
        ok = res == 0;
    } else if (res < 0) {
        ok = 0;
    } else if ((uint64_t)res < s->len) {
        /* Consume what was done and do the rest here (rw_iov loops on short ones). */
        struct iovec *iov = e->iov[i];
        uint32_t n = s->niov;
        uint64_t skip = (uint64_t)res;

        e->short_transfers++;
        while (n > 0 && skip >= iov->iov_len) {
            skip -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + skip;
            iov->iov_len -= skip;
        }
        ok = rw_iov(d->fd, s->type == BLK_T_OUT, iov, (int)n, s->off + (uint64_t)res) == 0;
    } else {
        ok = 1;
    }
    *s->status = ok ? BLK_S_OK : BLK_S_IOERR;
    if (!ok)
        w->errors++;
    account(w, s->type == BLK_T_IN ? BLK_OP_READ : s->type == BLK_T_OUT ? BLK_OP_WRITE
            : BLK_OP_FLUSH, ok, s->len, s->start_ns, w->done_ns);
    vq_add_used_late(q, s->head, ok ? s->written : 1);
    w->requests++;
    e->completed++;
    e->inflight--;
    e->free[e->nfree++] = (uint16_t)i;
}

/* Runs a queued request inline (the kernel refused it); completes it. */
static void run_inline(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                       struct blk_engine *e, uint32_t i)
{
    struct blk_slot *s = &e->slot[i];
    int64_t res;

    e->refused++;
    w->done_ns = w->stats ? rl_now() : 0;
    if (s->type == BLK_T_FLUSH)
        res = fdatasync(d->fd) ? -errno : 0;
    else
        res = rw_iov(d->fd, s->type == BLK_T_OUT, e->iov[i], (int)s->niov, s->off) ? -EIO
                                                                                    : (int64_t)s->len;
    e->inflight++;               /* finish() counts it out */
    finish(q, d, w, e, i, res);
}

/* Hands the queued requests to the kernel. 0 (all taken, or refused ones run inline),
 * -EAGAIN (some wait: try again), or -errno. */
static int submit(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                  struct blk_engine *e)
{
#ifndef BLK_NO_IO_URING
    if (e->kind == BLK_ENGINE_IO_URING) {
        while (e->queued > 0) {
            int n = io_uring_submit(&e->ring);

            if (n >= 0) {
                e->inflight += (uint32_t)n;
                e->queued -= (uint32_t)n < e->queued ? (uint32_t)n : e->queued;
                if (n == 0)
                    return -EAGAIN;
                continue;
            }
            if (n == -EINTR)
                continue;
            return n == -EBUSY ? -EAGAIN : n;    /* the SQEs stay in the ring */
        }
        return 0;
    }
#endif
    if (e->kind == BLK_ENGINE_AIO) {
        uint32_t at = 0;

        while (at < e->queued) {
            long n = sys_io_submit(e->aio, e->queued - at, e->submit + at);

            if (n > 0) {
                e->inflight += (uint32_t)n;
                at += (uint32_t)n;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && errno == EAGAIN) {
                break;
            } else {
                /* The first one was refused (EINVAL: a file system without AIO
                 * fdsync, say): it runs here, the rest go on. */
                run_inline(q, d, w, e, (uint32_t)e->submit[at]->aio_data);
                at++;
            }
        }
        memmove(e->submit, e->submit + at, (e->queued - at) * sizeof e->submit[0]);
        e->queued -= at;
        return e->queued ? -EAGAIN : 0;
    }
    (void)q;
    (void)d;
    (void)w;
    return 0;
}

/* Completes every request the engine has finished; waits for one first if `wait`. The
 * number completed, or -errno. */
static int reap(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                struct blk_engine *e, int wait)
{
    int done = 0;

#ifndef BLK_NO_IO_URING
    if (e->kind == BLK_ENGINE_IO_URING) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;

        if (wait) {
            int rc;

            while ((rc = io_uring_wait_cqe(&e->ring, &cqe)) == -EINTR)
                ;
            if (rc < 0)
                return rc;
        }
        w->done_ns = w->stats ? rl_now() : 0;
        io_uring_for_each_cqe(&e->ring, head, cqe) {
            uint64_t i = cqe->user_data;

            n++;
            if (i < e->depth)             /* ours: we wrote it */
                finish(q, d, w, e, (uint32_t)i, cqe->res);
        }
        io_uring_cq_advance(&e->ring, n);
        return (int)n;
    }
#endif
    if (e->kind == BLK_ENGINE_AIO) {
        struct timespec zero = { 0, 0 };
        uint64_t count;
        long n, k;

        /* Clear the eventfd first: a completion after the reap below sets it again. */
        if (read(e->fd, &count, sizeof count) < 0 && errno != EAGAIN && errno != EINTR)
            return -errno;
        for (;;) {
            n = sys_io_getevents(e->aio, wait && !done ? 1 : 0, e->depth, e->events,
                                 wait && !done ? NULL : &zero);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -errno;
            }
            w->done_ns = w->stats && n ? rl_now() : 0;
            for (k = 0; k < n; k++) {
                uint64_t i = e->events[k].data;

                if (i < e->depth)
                    finish(q, d, w, e, (uint32_t)i, e->events[k].res);
            }
            done += (int)n;
            if (n < (long)e->depth)
                break;
        }
        return done;
    }
    (void)q;
    (void)d;
    (void)w;
    (void)wait;
    return 0;
}

int blk_pump(struct vq *q, const struct blk_disk *d, struct blk_worker *w, uint32_t budget)
{
    struct blk_engine *e = w->engine;
    uint64_t completed = w->requests;
    uint32_t popped = 0;
    int rc = 0, more = 0, full = 0, retry = 0, throttled = 0, added, n;

    if (!e || e->kind == BLK_ENGINE_INLINE)
        return blk_process(q, d, w, budget < BLK_INLINE_BATCH ? budget : BLK_INLINE_BATCH);
    n = reap(q, d, w, e, 0);
    begin_pass(d, w);
    if (n < 0)
        return n;
    for (;;) {
        int64_t written;

        if (popped == budget) {
            more = 1;
            break;
        }
        if (e->nfree == 0) {
            full = 1;
            break;
        }
        rc = next_chain(q, d, w);
        if (rc == BLK_THROTTLED) {
            throttled = 1;
            rc = 0;
        }
        if (rc <= 0)
            break;
        popped++;
        written = run_request(d, w, e);
        if (written != PENDING) {
            vq_add_used(q, w->chain.head, (uint32_t)written);
            w->requests++;
        }
    }
    if (e->queued) {
        int s = submit(q, d, w, e);      /* refused ones run inline and complete */

        if (s == -EAGAIN)
            retry = 1;
        else if (s < 0)
            return s;
    }
    added = w->requests != completed;
    if (added)
        vq_publish_used(q);
    settle(w);
    if (rc < 0)
        return -EINVAL;
    return (added && vq_needs_interrupt(q) ? BLK_NOTIFY : 0) | (more ? BLK_MORE : 0) |
           (full ? BLK_FULL : 0) | (retry ? BLK_RETRY : 0) | (throttled ? BLK_THROTTLED : 0);
}

int blk_drain(struct vq *q, const struct blk_disk *d, struct blk_worker *w)
{
    struct blk_engine *e = w->engine;
    uint64_t completed = w->requests;

    if (w->held) {
        w->held = 0;
        vq_add_used_late(q, w->chain.head, (uint32_t)run_request(d, w, NULL));
        w->requests++;
        settle(w);
    }
    if (!e || e->kind == BLK_ENGINE_INLINE) {
        if (w->requests == completed)
            return 0;
        vq_publish_used(q);
        return vq_needs_interrupt(q) || q->broken ? BLK_NOTIFY : 0;
    }
    while (e->queued || e->inflight) {
        int n;

        if (e->queued) {
            n = submit(q, d, w, e);
            if (n < 0 && n != -EAGAIN)
                return n;
        }
        if (!e->inflight) {
            /* EAGAIN with nothing running: the kernel is short. A millisecond's nap
             * (ppoll, the one wait this data path makes). */
            struct timespec nap = { .tv_sec = 0, .tv_nsec = 1000000 };

            ppoll(NULL, 0, &nap, NULL);
            continue;
        }
        n = reap(q, d, w, e, 1);
        if (n < 0)
            return n;
    }
    if (w->requests == completed)
        return 0;
    vq_publish_used(q);
    return vq_needs_interrupt(q) || q->broken ? BLK_NOTIFY : 0;
}

static int interrupt(int call_fd)
{
    uint64_t count = 1;

    if (call_fd >= 0 && write(call_fd, &count, sizeof count) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}

/* Drain, interrupt if the driver should hear of it, and return rc (or the error the
 * drain met). */
static int finish_serving(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                          int call_fd, int rc)
{
    int drained = blk_drain(q, d, w);

    if (drained < 0)
        return drained;
    if (drained & BLK_NOTIFY) {
        int sent = interrupt(call_fd);
        if (sent < 0 && rc == 0)
            return sent;
    }
    return rc;
}

int blk_serve(struct vq *q, const struct blk_disk *d, struct blk_worker *w, int kick_fd,
              int call_fd, int stop_fd)
{
    struct blk_engine *e = w->engine;
    struct pollfd fds[3] = { { .fd = kick_fd, .events = POLLIN },
                             { .fd = stop_fd, .events = POLLIN },
                             { .fd = e && e->kind != BLK_ENGINE_INLINE ? e->fd : -1,
                               .events = POLLIN } };
    int quiet = 1;           /* kicks are off (VRING_USED_F_NO_NOTIFY) */
    uint64_t count, wait;    /* ns to sleep at most */
    struct timespec until;

    for (;;) {
        /* Serve what is there first: the driver may have made chains available before
         * we started, with a kick we will never see. */
        int rc = blk_pump(q, d, w, q->num);

        if (rc < 0)
            return finish_serving(q, d, w, call_fd, rc);
        if (rc & BLK_NOTIFY) {
            int sent = interrupt(call_fd);
            if (sent < 0)
                return finish_serving(q, d, w, call_fd, sent);
        }
        if (rc & BLK_MORE) {
            wait = 0;
        } else if (rc & BLK_THROTTLED) {
            /* The next chain waits for the limiter: no kick can help (kicks stay off),
             * sleep until it may run; completions still wake us. */
            wait = w->wait_ns < BLK_RECHECK_NS ? w->wait_ns : BLK_RECHECK_NS;
            if ((rc & BLK_RETRY) && wait > 1000000)
                wait = 1000000;
        } else {
            wait = rc & BLK_RETRY ? 1000000 : FOREVER;
            /* Kicks on, then one more look: chains made available before the driver
             * could see that would get no kick. Every time: with EVENT_IDX, "on" is
             * avail_event at the index we stopped at, which moves with us. With every
             * slot busy a completion comes first anyway, and the ring is looked at
             * after it. */
            if (!(rc & BLK_FULL)) {
                vq_set_notify(q, 1);
                quiet = 0;
                if (vq_pending(q))
                    continue;
            }
        }
        until.tv_sec = (time_t)(wait / 1000000000u);
        until.tv_nsec = (long)(wait % 1000000000u);
        if (ppoll(fds, 3, wait == FOREVER ? NULL : &until, NULL) < 0) {
            if (errno == EINTR)
                continue;
            return finish_serving(q, d, w, call_fd, -errno);
        }
        if (fds[1].revents)
            return finish_serving(q, d, w, call_fd, 0);
        if (fds[0].revents & (POLLERR | POLLNVAL))
            return finish_serving(q, d, w, call_fd, -EBADF);
        if ((fds[0].revents & POLLIN) && read(kick_fd, &count, sizeof count) < 0 &&
            errno != EAGAIN && errno != EINTR)
            return finish_serving(q, d, w, call_fd, -errno);
        if (!quiet) {
            vq_set_notify(q, 0);       /* no kicks while we work */
            quiet = 1;
        }
    }
}

static int power_of_2(uint64_t v)
{
    return v && !(v & (v - 1));
}

int blk_worker_init(struct blk_worker *w, const struct blk_disk *d, uint8_t *bounce,
                    size_t bounce_size)
{
    if (!power_of_2(d->mem_align) || !power_of_2(d->block_size) || d->block_size < BLK_SECTOR)
        return -EINVAL;
    if (d->capacity > MAX_CAPACITY || (d->direct && (d->capacity * BLK_SECTOR) % d->block_size))
        return -EINVAL;
    if (d->max_discard_seg > BLK_MAX_DWZ_SEG || d->max_write_zeroes_seg > BLK_MAX_DWZ_SEG)
        return -EINVAL;
    if (!bounce || (uintptr_t)bounce & (d->mem_align - 1) || bounce_size < d->block_size ||
        bounce_size % d->block_size)
        return -EINVAL;
    w->bounce = bounce;
    w->bounce_size = bounce_size;
    w->no_punch_hole = w->no_zero_range = 0;
    w->requests = w->errors = w->bounced = w->zeroes_written = 0;
    return 0;
}

int blk_dio_alignment(int fd, uint32_t *mem_align, uint32_t *block_size)
{
    struct stat st;
    int flags;

    *mem_align = *block_size = BLK_SECTOR;
    if (fstat(fd, &st))
        return -errno;
#ifdef STATX_DIOALIGN
    {
        struct statx stx;

        if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
            (stx.stx_mask & STATX_DIOALIGN) && power_of_2(stx.stx_dio_offset_align) &&
            power_of_2(stx.stx_dio_mem_align)) {
            *mem_align = stx.stx_dio_mem_align;
            *block_size = stx.stx_dio_offset_align > BLK_SECTOR ? stx.stx_dio_offset_align
                                                                : BLK_SECTOR;
            return 0;
        }
    }
#endif
    if (S_ISBLK(st.st_mode)) {
        int size;

        if (ioctl(fd, BLKSSZGET, &size) == 0 && size > BLK_SECTOR && power_of_2((uint64_t)size))
            *mem_align = *block_size = (uint32_t)size;
        return 0;
    }
    /* No statx answer for an O_DIRECT file: find the smallest read O_DIRECT takes. */
    flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && (flags & O_DIRECT) && S_ISREG(st.st_mode) && st.st_size >= 4096) {
        uint8_t probe[4096] __attribute__((aligned(4096)));
        uint32_t size;

        for (size = BLK_SECTOR; size <= sizeof probe; size *= 2) {
            if (pread(fd, probe, size, 0) >= 0) {
                *mem_align = *block_size = size;
                break;
            }
            if (errno != EINVAL)
                break;
        }
    }
    return 0;
}

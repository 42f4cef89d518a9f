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
 * I/O: preadv/pwritev straight between the disk fd and the guest's buffers. With
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
 * Completions: each chain's used element is written as it completes; used->idx is
 * published once per blk_process call, and the interrupt decision is taken once.
 */
#define _GNU_SOURCE
#include "blkio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_BYTES 16
#define DWZ_BYTES    16
#define MAX_CAPACITY (UINT64_C(1) << 54)     /* sectors: byte offsets fit in off_t */

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

/* The guest buffers at `data` (zeroes when data is NULL) to [off, off + len) of the
 * disk, through the bounce buffer; partial blocks at the ends are read first. */
static int bounce_write(const struct blk_disk *d, struct blk_worker *w, struct cursor *data,
                        uint64_t off, uint64_t len)
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

/* Executes the chain in w->chain; the number of bytes written into it. */
static uint32_t request(const struct blk_disk *d, struct blk_worker *w)
{
    const struct vq_chain *c = &w->chain;
    const struct vq_seg *last;
    struct cursor in, out;
    uint8_t header[HEADER_BYTES], *status, s;
    uint64_t rdata, wdata, sector;
    uint32_t type, written = 1;

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
    memcpy(&sector, header + 8, 8);
    rdata = c->readable_bytes - HEADER_BYTES;

    switch (type) {
    case BLK_T_IN:
        if (rdata || wdata % BLK_SECTOR || !in_range(d, sector, wdata / BLK_SECTOR)) {
            s = BLK_S_IOERR;
            break;
        }
        s = transfer(d, w, 0, out, sector * BLK_SECTOR, wdata) ? BLK_S_IOERR : BLK_S_OK;
        if (s == BLK_S_OK)
            written = (uint32_t)(wdata + 1);       /* a whole number of sectors + 1 < 2^32 */
        break;
    case BLK_T_OUT:
        if (d->read_only || wdata || rdata % BLK_SECTOR ||
            !in_range(d, sector, rdata / BLK_SECTOR)) {
            s = BLK_S_IOERR;
            break;
        }
        s = transfer(d, w, 1, in, sector * BLK_SECTOR, rdata) ? BLK_S_IOERR : BLK_S_OK;
        break;
    case BLK_T_FLUSH:
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
    *status = s;
    return written;
}

int blk_process(struct vq *q, const struct blk_disk *d, struct blk_worker *w,
                uint32_t budget)
{
    uint32_t done = 0;
    int rc = 0, more = 0;

    for (;;) {
        if (done == budget) {
            more = 1;
            break;
        }
        rc = vq_pop(q, &w->chain);
        if (rc <= 0)
            break;
        vq_add_used(q, w->chain.head, request(d, w));
        w->requests++;
        done++;
    }
    if (done)
        vq_publish_used(q);
    if (rc < 0)
        return -EINVAL;
    return (done && vq_needs_interrupt(q) ? BLK_NOTIFY : 0) | (more ? BLK_MORE : 0);
}

int blk_serve(struct vq *q, const struct blk_disk *d, struct blk_worker *w, int kick_fd,
              int call_fd, int stop_fd)
{
    struct pollfd fds[2] = { { .fd = kick_fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };
    uint64_t count;

    for (;;) {
        /* Serve what is there first: the driver may have made chains available before
         * we started, with a kick we will never see. */
        int rc = blk_process(q, d, w, q->num);

        if (rc < 0)
            return rc;
        if ((rc & BLK_NOTIFY) && call_fd >= 0) {
            count = 1;
            if (write(call_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                return -errno;
        }
        if (poll(fds, 2, rc & BLK_MORE ? 0 : -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[1].revents)
            return 0;
        if (fds[0].revents & (POLLERR | POLLNVAL))
            return -EBADF;
        if ((fds[0].revents & POLLIN) && read(kick_fd, &count, sizeof count) < 0 &&
            errno != EAGAIN && errno != EINTR)
            return -errno;
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

/* The virtio-net data path (virtio 1.2, section 5.1), device side, on a tap.
 *
 * Chains come from the ring walker (virtq.c), which has already checked every
 * descriptor: each segment is a non-empty host range inside guest RAM, readable
 * segments first. What is left to check here is the packet layout; the header and
 * frame bytes themselves are the guest's business and the tap's (the kernel validates
 * a vnet header it is given: a bad gso_type or csum_start makes the write fail).
 *
 * Transmit (driver -> tap): a chain is the driver's header (hdr_len bytes) followed by
 * the frame, in readable buffers only; it is written to the tap with one writev
 * straight from guest memory, header included, since the tap's vnet header size is the
 * driver's. A chain with writable buffers, fewer than hdr_len bytes, or more than
 * NET_FRAME_MAX is malformed: it is completed without being sent (bad_chains). A frame
 * the tap refuses (EINVAL for a bad header, EIO while the link is down, ...) is
 * dropped the same way. Either way the driver gets its buffers back and nothing else
 * happens.
 *
 * Receive (tap -> driver): a frame is read from the tap into rx->buf (one copy: a
 * tap read cannot be sized in advance, and a frame that does not fit the driver's
 * buffers must not be lost half-way), then copied into as many chains as it needs:
 * one without MRG_RXBUF (a frame larger than the chain is dropped and the chain stays
 * available), several with it, the count written to the first header's num_buffers.
 * The chains of one frame are completed together, after the frame is complete, so a
 * driver never sees a frame's first buffer without the rest. When the driver runs out
 * of buffers half-way through a frame, the chains popped for it are given back
 * (last_avail_idx rewound: none was completed), the frame stays in rx->buf and the
 * call returns NET_STARVED. A chain with readable buffers, or with fewer writable bytes
 * than a header, is malformed: it and the chains already holding part of the frame are
 * completed with 0 bytes (the driver drops them) and the frame is dropped. A frame
 * that needs more chains than the ring has is dropped.
 *
 * Completions are published once per call; the interrupt decision is taken once.
 *
 * Kicks (VM exits) are asked for only when needed (VRING_USED_F_NO_NOTIFY): the
 * transmit worker turns them off while it drains the ring, the receive worker leaves
 * them off unless a frame waits for buffers. Each turns them on again before it sleeps
 * and then looks at the ring once more, so no chain waits for a kick that never comes.
 */
#define _GNU_SOURCE
#include "netio.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Copies len bytes of src into the writable segments of c, in order;
 * the number of bytes copied (less when the segments end first). */
static uint32_t copy_to_chain(const struct vq_chain *c, const uint8_t *src, uint32_t len)
{
    uint32_t done = 0, i;

    for (i = c->nreadable; i < c->nsegs && done < len; i++) {
        uint32_t n = c->segs[i].len;

        if (n > len - done)
            n = len - done;
        memcpy(c->segs[i].addr, src + done, n);
        done += n;
    }
    return done;
}

/* Where byte `offset` of a chain's writable area is in host memory (offset must lie
 * inside it). */
static uint8_t *writable_byte(const struct vq_chain *c, uint32_t offset)
{
    uint32_t i;

    for (i = c->nreadable; i < c->nsegs; i++) {
        if (offset < c->segs[i].len)
            return c->segs[i].addr + offset;
        offset -= c->segs[i].len;
    }
    return NULL;
}

static int malformed_rx(const struct vq_chain *c, uint32_t hdr_len)
{
    return c->nreadable != 0 || c->writable_bytes < hdr_len;
}

/* Completes the chains popped for the current frame with 0 bytes: the driver drops
 * them. Used when the driver itself broke the frame. */
static void give_back_empty(struct vq *q, struct net_rx *rx, uint32_t count)
{
    uint32_t i;

    for (i = 0; i < count; i++)
        vq_add_used(q, rx->heads[i], 0);
}

/* Delivers rx->buf[0 .. rx->pending). 1: delivered or dropped (pending is 0 again),
 * 0: no buffers (pending kept, nothing consumed), -1: broken ring. */
static int deliver(struct vq *q, struct net_rx *rx)
{
    uint32_t len = rx->pending, done = 0, count = 0, i;
    uint16_t start = vq_get_last_avail_idx(q);
    struct vq_chain *c = &rx->chain;
    uint8_t *num_buffers[2] = {NULL, NULL};

    if (rx->hdr_len == NET_HDR_LEN) {
        /* num_buffers is 1 unless patched below (the spec's value without MRG_RXBUF). */
        rx->buf[10] = 1;
        rx->buf[11] = 0;
    }
    if (!rx->guest_csum) {
        /* The tap computes checksums and segments for a driver that did not ask for
         * offloads; it may still mark a frame DATA_VALID, which such a driver must not
         * see (flags and gso_type are 0 then). */
        rx->buf[0] = 0;
        rx->buf[1] = 0;
    }
    while (done < len) {
        int rc;

        if (count == q->num) {
            /* The whole ring cannot hold it: give the chains back, drop the frame. */
            vq_set_last_avail_idx(q, start);
            rx->stats->dropped++;
            rx->pending = 0;
            return 1;
        }
        rc = vq_pop(q, c);
        if (rc < 0)
            return -1;
        if (rc == 0) {
            vq_set_last_avail_idx(q, start);
            return 0;
        }
        rx->heads[count] = c->head;
        if (malformed_rx(c, rx->hdr_len)) {
            give_back_empty(q, rx, count + 1);
            rx->stats->bad_chains++;
            rx->stats->dropped++;
            rx->pending = 0;
            return 1;
        }
        if (!rx->mergeable && c->writable_bytes < len) {
            /* Without MRG_RXBUF a frame takes one chain; this one is too small for it. */
            vq_set_last_avail_idx(q, start);
            rx->stats->dropped++;
            rx->pending = 0;
            return 1;
        }
        if (count == 0 && rx->hdr_len == NET_HDR_LEN) {
            num_buffers[0] = writable_byte(c, 10);
            num_buffers[1] = writable_byte(c, 11);
        }
        rx->lens[count] = copy_to_chain(c, rx->buf + done, len - done);
        done += rx->lens[count];
        count++;
    }
    if (count > 1 && num_buffers[0] && num_buffers[1]) {
        /* Only a mergeable frame spans chains; the header went out with 1. */
        *num_buffers[0] = (uint8_t)(count & 0xff);
        *num_buffers[1] = (uint8_t)(count >> 8);
    }
    for (i = 0; i < count; i++)
        vq_add_used(q, rx->heads[i], rx->lens[i]);
    rx->pending = 0;
    rx->stats->frames++;
    rx->stats->bytes += len;
    return 1;
}

int net_rx_process(struct vq *q, int tap, struct net_rx *rx, uint32_t budget)
{
    uint32_t delivered = 0;
    int result = 0, rc;

    if (q->broken)
        return -EINVAL;
    for (;;) {
        if (!rx->pending) {
            ssize_t n;

            if (delivered == budget) {
                result |= NET_MORE;
                break;
            }
            n = read(tap, rx->buf, NET_RX_BUF);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN)
                    rx->last_errno = errno;
                break;
            }
            if (n == 0)
                break;
            if ((size_t)n < rx->hdr_len || n >= NET_RX_BUF) {
                rx->stats->dropped++;      /* no header, or possibly cut short */
                continue;
            }
            rx->pending = (uint32_t)n;
        }
        if (!rx->charged) {
            int first = !rx->wait_ns;

            rx->wait_ns = rl_consume(rx->limiter, rx->pending - rx->hdr_len, 0);
            if (rx->wait_ns) {
                rx->stats->throttled += first;
                result |= NET_THROTTLED;
                break;
            }
            rx->charged = 1;
        }
        rc = deliver(q, rx);
        if (rc < 0) {
            vq_publish_used(q);
            return -EINVAL;
        }
        if (rc == 0) {
            result |= NET_STARVED;
            break;
        }
        rx->charged = 0;
        delivered++;
    }
    rx->starved = (result & NET_STARVED) != 0;
    vq_publish_used(q);
    if (delivered && vq_needs_interrupt(q))
        result |= NET_NOTIFY;
    return result;
}

/* Writes tx->chain's frame to the tap and completes the chain. */
static void send_frame(struct vq *q, int tap, struct net_tx *tx)
{
    struct vq_chain *c = &tx->chain;
    uint32_t i;
    ssize_t n;

    for (i = 0; i < c->nreadable; i++) {
        tx->iov[i].iov_base = c->segs[i].addr;
        tx->iov[i].iov_len = c->segs[i].len;
    }
    do
        n = writev(tap, tx->iov, (int)c->nreadable);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        tx->stats->dropped++;
        tx->last_errno = errno;
    } else {
        tx->stats->frames++;
        tx->stats->bytes += c->readable_bytes - tx->hdr_len;
    }
    vq_add_used(q, c->head, 0);
}

int net_tx_process(struct vq *q, int tap, struct net_tx *tx, uint32_t budget)
{
    struct vq_chain *c = &tx->chain;
    uint32_t completed = 0;
    int result = 0, rc;

    if (q->broken)
        return -EINVAL;
    for (;;) {
        int first = !tx->held;

        if (completed == budget) {
            result |= NET_MORE;
            break;
        }
        if (first) {
            rc = vq_pop(q, c);
            if (rc < 0) {
                vq_publish_used(q);
                return -EINVAL;
            }
            if (rc == 0)
                break;
            if (c->nsegs != c->nreadable || c->readable_bytes < tx->hdr_len
                    || c->readable_bytes > NET_FRAME_MAX) {
                completed++;
                tx->stats->bad_chains++;
                vq_add_used(q, c->head, 0);
                continue;
            }
        }
        tx->wait_ns = rl_consume(tx->limiter, c->readable_bytes - tx->hdr_len, 0);
        tx->held = tx->wait_ns != 0;
        if (tx->held) {
            tx->stats->throttled += first;
            result |= NET_THROTTLED;
            break;
        }
        completed++;
        send_frame(q, tap, tx);
    }
    vq_publish_used(q);
    if (completed && vq_needs_interrupt(q))
        result |= NET_NOTIFY;
    return result;
}

/* Signals the call eventfd; 0 or -errno. */
static int interrupt(int call_fd)
{
    uint64_t one = 1;

    if (call_fd >= 0 && write(call_fd, &one, sizeof one) < 0 && errno != EAGAIN)
        return -errno;
    return 0;
}

/* How long a worker may sleep after a call that answered rc: 0 with more to do, until
 * the limiter lets the held frame go (at most NET_RECHECK_NS), or forever (-1). */
static int64_t sleep_ns(int rc, uint64_t wait_ns)
{
    if (rc & NET_MORE)
        return 0;
    if (rc & NET_THROTTLED)
        return (int64_t)(wait_ns < NET_RECHECK_NS ? wait_ns : NET_RECHECK_NS);
    return -1;
}

/* Waits on fds[0] (kick), fds[1] (stop) and, when nfds is 3, fds[2] (the tap), at most
 * `ns` (-1: no limit); the kick is consumed. 1: stop, 0: go on, -errno. */
static int wait_round(struct pollfd *fds, int nfds, int64_t ns)
{
    struct timespec until = { .tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000 };
    uint64_t count;

    if (ppoll(fds, (nfds_t)nfds, ns < 0 ? NULL : &until, NULL) < 0)
        return errno == EINTR ? 0 : -errno;
    if (fds[1].revents)
        return 1;
    if (fds[0].revents & (POLLERR | POLLNVAL))
        return -EBADF;
    if ((fds[0].revents & POLLIN) && read(fds[0].fd, &count, sizeof count) < 0 &&
        errno != EAGAIN && errno != EINTR)
        return -errno;
    return 0;
}

int net_rx_serve(struct vq *q, int tap, struct net_rx *rx, int kick_fd, int call_fd,
                 int stop_fd)
{
    struct pollfd fds[3] = {
        { .fd = kick_fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN },
        { .fd = tap, .events = POLLIN } };
    int kicks = 1;           /* the ring starts with VRING_USED_F_NO_NOTIFY clear */

    for (;;) {
        /* Frames (and buffers) may be waiting from before we started. */
        int rc = net_rx_process(q, tap, rx, NET_BUDGET), watch;
        int64_t ns;

        if (rc < 0)
            return rc;
        ns = sleep_ns(rc, rx->wait_ns);
        if ((rc & NET_NOTIFY) && (rc = interrupt(call_fd)) < 0)
            return rc;
        /* Buffers matter only when a frame waits for them: the driver's kicks (a VM
         * exit each) are asked for then, and the ring looked at once more, since
         * buffers made available before the driver saw the flag bring no kick. */
        if (rx->starved && !kicks) {
            vq_set_notify(q, 1);
            kicks = 1;
            continue;
        }
        if (!rx->starved && kicks) {
            vq_set_notify(q, 0);
            kicks = 0;
        }
        /* The tap only while a frame read from it could go somewhere, and while reads
         * work: a deleted tap polls readable forever. Not while a frame waits for the
         * limiter either. */
        watch = !rx->starved && !rx->last_errno && !rx->wait_ns;
        rc = wait_round(fds, watch ? 3 : 2, ns);
        if (rc)
            return rc > 0 ? 0 : rc;
    }
}

int net_tx_serve(struct vq *q, int tap, struct net_tx *tx, int kick_fd, int call_fd,
                 int stop_fd)
{
    struct pollfd fds[2] = {
        { .fd = kick_fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };

    for (;;) {
        int rc;
        int64_t ns;

        /* No kicks while we drain the ring (each is a VM exit); then kicks again, and
         * one more look for what came before the driver saw that. Not while a chain
         * waits for the limiter: the ring's next chains wait behind it anyway. */
        vq_set_notify(q, 0);
        rc = net_tx_process(q, tap, tx, NET_BUDGET);
        if (rc < 0)
            return rc;
        ns = sleep_ns(rc, tx->wait_ns);
        if ((rc & NET_NOTIFY) && (rc = interrupt(call_fd)) < 0)
            return rc;
        if (ns < 0) {
            vq_set_notify(q, 1);
            rc = net_tx_process(q, tap, tx, NET_BUDGET);
            if (rc < 0)
                return rc;
            ns = sleep_ns(rc, tx->wait_ns);
            if ((rc & NET_NOTIFY) && (rc = interrupt(call_fd)) < 0)
                return rc;
        }
        rc = wait_round(fds, 2, ns);
        if (rc > 0 && tx->held) {
            /* Stopping: a chain we popped is the driver's again only once completed. */
            tx->held = 0;
            send_frame(q, tap, tx);
            vq_publish_used(q);
            if (vq_needs_interrupt(q) && (rc = interrupt(call_fd)) < 0)
                return rc;
            return 0;
        }
        if (rc)
            return rc > 0 ? 0 : rc;
    }
}

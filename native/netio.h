/* The virtio-net data path (virtio 1.2, section 5.1) between a virtqueue (virtq.h) and
 * a tap opened with IFF_VNET_HDR, whose vnet header size is set to the driver's header
 * size: the header passes through unchanged in both directions. See netio.c for what
 * is checked and what happens to a malformed chain.
 *
 * One struct net_rx for the receive queue's worker, one struct net_tx for the transmit
 * queue's; each is used by one thread at a time.
 */
#ifndef VMM_NETIO_H
#define VMM_NETIO_H

#include <sys/ioctl.h>
#include <linux/if_tun.h>      /* the tap ioctls and flags, for the Python side */
#include <net/if.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "ratelimit.h"
#include "virtq.h"

#define NET_HDR_LEN        12      /* struct virtio_net_hdr_v1 (with num_buffers) */
#define NET_LEGACY_HDR_LEN 10      /* without num_buffers: legacy driver, no MRG_RXBUF */
/* A frame from the tap: the vnet header and up to 64 KiB of GSO payload plus its
 * Ethernet, IP and TCP headers. A read that fills the whole buffer may have been cut
 * short and is dropped. */
#define NET_FRAME_MAX      (NET_HDR_LEN + 65536 + 4096)
#define NET_RX_BUF         (NET_FRAME_MAX + 1)

/* net_rx_process / net_tx_process answers, when the queue is not broken. */
#define NET_NOTIFY  1   /* chains were completed and the driver wants an interrupt */
#define NET_MORE    2   /* the budget ran out: call again before waiting */
#define NET_STARVED 4   /* rx: a frame waits and the driver gave no buffer for it: stop
                         * watching the tap until the driver kicks (adds buffers) */
#define NET_THROTTLED 8 /* a frame waits for the queue's rate limiter: wait_ns */
#define NET_RECHECK_NS (100 * 1000000)  /* a throttled queue looks again at least this
                                           often: a changed limit counts */

/* What one direction has done, for the operator (docs/metrics.md): written only by its
 * queue's worker, read by anyone (aligned 64-bit counters). Never NULL in a worker. */
struct net_stats {
    uint64_t frames, bytes;       /* delivered (rx) or written to the tap (tx); bytes after
                                   * the driver's header */
    uint64_t dropped;             /* rx: too large, cut short, no room; tx: the tap refused */
    uint64_t bad_chains;          /* malformed chains, completed without effect */
    uint64_t throttled;           /* frames that waited for the rate limiter */
};

struct net_rx {
    uint8_t *buf;                 /* NET_RX_BUF bytes: the frame being delivered */
    uint32_t pending;             /* bytes of buf holding a frame not yet delivered */
    uint32_t hdr_len;             /* NET_HDR_LEN or NET_LEGACY_HDR_LEN */
    uint32_t mergeable;           /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    uint32_t guest_csum;          /* VIRTIO_NET_F_GUEST_CSUM negotiated: else the header's
                                   * flags and gso_type are cleared */
    struct net_stats *stats;      /* bad_chains: chains completed empty (readable or too
                                   * small) */
    int last_errno;               /* of the last failed read (not EAGAIN): the tap is
                                   * not watched any more (detached, deleted) */
    uint32_t starved;             /* a frame waits for buffers (the last call's
                                   * NET_STARVED) */
    struct rl_limiter *limiter;   /* frames delivered are charged here; NULL: none */
    uint32_t charged;             /* the pending frame has been charged */
    uint64_t wait_ns;             /* the pending frame waits this long for the limiter */
    uint16_t heads[VQ_MAX_QUEUE_SIZE];   /* the chains holding the current frame */
    uint32_t lens[VQ_MAX_QUEUE_SIZE];
    struct vq_chain chain;
};

struct net_tx {
    uint32_t hdr_len;
    struct net_stats *stats;      /* dropped: the tap refused them (bad header, link down,
                                   * ...); bad_chains: no header, writable buffers, too large */
    int last_errno;               /* of the last refused write */
    struct rl_limiter *limiter;   /* frames sent are charged here; NULL: none */
    uint32_t held;                /* chain is popped and waits for the limiter ... */
    uint64_t wait_ns;             /* ... this long at the last look */
    struct vq_chain chain;
    struct iovec iov[VQ_MAX_SEGS];
};

/* Moves frames from the tap (non-blocking) into the receive queue until the tap is
 * empty, the driver has no buffer left (NET_STARVED; the frame is kept for the next
 * call), the limiter holds the next frame (NET_THROTTLED: it is kept; the tap's queue
 * fills and the kernel drops what overflows it, as on a slow link) or `budget` frames
 * were delivered (NET_MORE). A frame costs one op and its bytes after the header. used->idx is published once at
 * the end. -EINVAL when the ring is malformed (the queue is broken, see virtq.h). */
int net_rx_process(struct vq *q, int tap, struct net_rx *rx, uint32_t budget);

/* Writes up to `budget` frames from the transmit queue to the tap and completes them
 * (0 bytes written, as the spec says for the transmit queue). A chain the limiter holds
 * stays popped in tx (NET_THROTTLED) and goes first at a later call. -EINVAL when the ring is
 * malformed; otherwise NET_NOTIFY and NET_MORE bits. */
int net_tx_process(struct vq *q, int tap, struct net_tx *tx, uint32_t budget);

/* A queue worker's whole loop, run with the GIL released: process, interrupt through
 * call_fd, wait for the kick (and, for receive, for the tap while a frame could be
 * delivered; while throttled, for the limiter, at most NET_RECHECK_NS), until stop_fd
 * is readable (0; a transmit chain held for the limiter is sent first). -EINVAL when the ring is malformed, -errno
 * when waiting fails. NET_BUDGET frames per round between looks at stop_fd. */
#define NET_BUDGET 256
int net_rx_serve(struct vq *q, int tap, struct net_rx *rx, int kick_fd, int call_fd,
                 int stop_fd);
int net_tx_serve(struct vq *q, int tap, struct net_tx *tx, int kick_fd, int call_fd,
                 int stop_fd);

#endif

/* Split-virtqueue ring walker for the device side (virtio 1.2, section 2.7).
 *
 * The guest is hostile: everything read from guest memory is validated before use and
 * read exactly once. See virtq.c for the list of checks. One struct vq must be used by
 * one thread at a time; the guest driver is the only other party.
 */
#ifndef VMM_VIRTQ_H
#define VMM_VIRTQ_H

#include <stdint.h>

#define VQ_MAX_REGIONS    8       /* guest RAM regions in a memory table */
#define VQ_MAX_QUEUE_SIZE 32768   /* the spec's largest split queue */
#define VQ_MAX_SEGS       1024    /* buffers in one chain (Linux's UIO_MAXIOV, QEMU's cap) */
#define VQ_MAX_INDIRECT   1024    /* descriptors in one indirect table */

#define VQ_DESC_F_NEXT     1
#define VQ_DESC_F_WRITE    2
#define VQ_DESC_F_INDIRECT 4
#define VQ_AVAIL_F_NO_INTERRUPT 1
#define VQ_USED_F_NO_NOTIFY 1

/* One guest RAM range and where it is mapped in this process. */
struct vq_region {
    uint64_t gpa, size;
    uint8_t *hva;
};

struct vq_mem {
    struct vq_region regions[VQ_MAX_REGIONS];
    int nregions;
};

/* One guest buffer of a chain. Device-readable segments always come first. */
struct vq_seg {
    uint8_t *addr;      /* host address */
    uint32_t len;       /* never 0 */
    uint32_t is_write;  /* 1: the device writes it (VIRTQ_DESC_F_WRITE) */
};

struct vq_chain {
    uint16_t head;           /* descriptor index to give back to vq_push */
    uint32_t nsegs;          /* segs[0 .. nsegs) */
    uint32_t nreadable;      /* segs[0 .. nreadable) are readable, the rest writable */
    uint64_t readable_bytes;
    uint64_t writable_bytes;
    struct vq_seg segs[VQ_MAX_SEGS];
};

/* vhost-user inflight I/O tracking (QEMU's docs/interop/vhost-user.rst, "Inflight I/O
 * tracking", split rings): a shared region the frontend keeps across backend restarts,
 * one part per queue, in which the backend records which chains it popped and has not
 * completed yet, so a backend started after a crash resubmits them. */
#define VQ_INFLIGHT_VERSION   1
#define VQ_INFLIGHT_MAX_QUEUE 1024    /* tracked queues are at most this big (QEMU's
                                         VIRTQUEUE_MAX_SIZE) */

/* One descriptor head's entry. */
struct vq_inflight_desc {
    uint8_t inflight;         /* 1: popped, its completion not yet published */
    uint8_t padding[5];
    uint16_t next;            /* the previous head of the same batch of completions */
    uint64_t counter;         /* pop order */
};

/* One queue's part of the region (QueueRegionSplit). */
struct vq_inflight {
    uint64_t features;        /* 0 */
    uint16_t version;         /* 0: fresh, VQ_INFLIGHT_VERSION: in use */
    uint16_t desc_num;        /* the queue size the region was made for */
    uint16_t last_batch_head; /* the last head of the latest batch of completions */
    uint16_t used_idx;        /* used->idx once that batch's entries were cleared */
    struct vq_inflight_desc desc[];
};

struct vq_resubmit {
    uint64_t counter;
    uint16_t head;
};

struct vq {
    struct vq_mem mem;
    uint32_t num;
    uint8_t *desc;            /* host pointers, translated once by vq_setup */
    uint8_t *avail;
    uint8_t *used;
    uint16_t last_avail_idx;  /* next avail ring entry to consume */
    uint16_t used_idx;        /* our copy of used->idx: never read back from the guest */
    int broken;
    int event_idx;            /* VIRTIO_RING_F_EVENT_IDX negotiated (vq_set_event_idx) */
    uint16_t signalled_used;  /* used_idx at the last interrupt decision (EVENT_IDX) */
    int signalled_used_valid; /* 0 until the first decision after setup */
    /* Inflight tracking (vq_inflight_start); none while inflight is NULL. */
    struct vq_inflight *inflight;
    uint64_t counter;                        /* the next pop's counter */
    uint16_t last_batch_head;                /* what we last wrote there */
    uint32_t nbatch;                         /* heads added since the last publish */
    uint32_t nresubmit, resubmitted;         /* resubmit[resubmitted .. nresubmit) to go */
    uint16_t batch[VQ_INFLIGHT_MAX_QUEUE];
    struct vq_resubmit resubmit[VQ_INFLIGHT_MAX_QUEUE];   /* oldest first */
};

/* Validates and copies a region table: 1..VQ_MAX_REGIONS regions, each non-empty, not
 * wrapping around 2^64 (guest or host side), not overlapping another. 0 or -EINVAL. */
int vq_mem_init(struct vq_mem *mem, const struct vq_region *regions, int nregions);

/* The host address of guest range [gpa, gpa + len), or NULL unless that range lies
 * entirely inside one region. len 0 is never valid. */
uint8_t *vq_translate(const struct vq_mem *mem, uint64_t gpa, uint64_t len);

/* num: a power of 2 in 1..VQ_MAX_QUEUE_SIZE. Rings must lie inside guest RAM, aligned
 * as the spec says (desc 16, avail 2, used 4). used_idx is read once from the used ring
 * (0 on a fresh queue, the previous value when a backend takes over a running queue).
 * 0 or -EINVAL; on -EINVAL the queue is left broken. */
int vq_setup(struct vq *q, const struct vq_region *regions, int nregions, uint32_t num,
             uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
             uint16_t last_avail_idx);

/* 1 and *chain filled when the guest made a chain available, 0 when not, -EINVAL when
 * the guest broke the protocol: the queue is then broken for good (until vq_setup), and
 * every later call returns -EINVAL without touching guest memory. With inflight
 * tracking, chains a previous backend left in flight come first, and each new chain is
 * recorded in the region before it is returned. */
int vq_pop(struct vq *q, struct vq_chain *chain);

/* Hands chain `head` back with `written` bytes written, and publishes used->idx.
 * Does nothing on a broken queue. */
void vq_push(struct vq *q, uint16_t head, uint32_t written);

/* vq_push in two halves, so a batch of completions costs one used->idx update:
 * vq_add_used writes the used element (the guest cannot see it yet; nothing on a
 * broken queue), vq_publish_used makes every element added so far visible. Publishing
 * still works after the queue broke, so completions made before a later vq_pop found
 * the ring malformed are not lost; it writes only used->idx, in the ring vq_setup
 * validated (and, with inflight tracking, clears the batch's entries in the region),
 * and does nothing on a queue that was never set up. */
void vq_add_used(struct vq *q, uint16_t head, uint32_t written);
void vq_publish_used(struct vq *q);

/* vq_add_used for a chain popped before the queue broke and completed after, because
 * its I/O was running (an asynchronous engine cannot recall it): the element is written
 * even though the queue is broken, into the used ring vq_setup checked; vq_publish_used
 * then publishes it. Nothing on a queue that was never set up, or for head >= num. */
void vq_add_used_late(struct vq *q, uint16_t head, uint32_t written);

/* Whether the driver should notify (kick) the device when it makes chains available:
 * clears or sets VRING_USED_F_NO_NOTIFY in the used ring (with EVENT_IDX: enabling sets
 * avail_event to the next index we will take; disabling does nothing), then a full
 * barrier. After
 * enabling, look at the ring again before waiting for a kick: the driver may have made
 * chains available before it could see the flag, and will not kick for those. Only a
 * hint to the driver (it may kick anyway). Nothing on a broken queue. */
void vq_set_notify(struct vq *q, int enable);

/* Whether the guest wants an interrupt now (call after vq_push, once per publish: with
 * EVENT_IDX the decision covers what was published since the previous one). 0 on a
 * broken queue. */
int vq_needs_interrupt(struct vq *q);

/* VIRTIO_RING_F_EVENT_IDX was negotiated (1) or not (0, the default after vq_setup):
 * vq_needs_interrupt reads used_event, vq_set_notify writes avail_event. The next
 * interrupt decision is then always yes. */
void vq_set_event_idx(struct vq *q, int enable);

/* Whether chains are available that vq_pop has not handed out (resubmissions
 * included): one read of avail->idx. 0 on a broken queue. */
int vq_pending(struct vq *q);

/* Bytes of one queue's part of the inflight region for queue_size descriptors:
 * ALIGN_UP(16 * queue_size + 2, 64), as libvhost-user sizes it (which always leaves room
 * for the 16-byte header); part i starts at i times this. */
uint64_t vq_inflight_queue_bytes(uint32_t queue_size);

/* Tracks q's chains in `region` from now on, and takes over what a previous backend left
 * there. region: vq_inflight_queue_bytes(queue_size) bytes, 8-aligned, mapped for as
 * long as q is used; q: set up, its num at most queue_size and VQ_INFLIGHT_MAX_QUEUE.
 * Every value read from the region is checked before it is used: whoever else maps it
 * (the frontend, a previous backend a guest may have taken over) may write anything.
 *
 * - version 0: a fresh region; it is initialised (version 1, used_idx = used->idx).
 * - version 1: if its used_idx differs from used->idx, the previous backend published
 *   a batch but died before clearing its entries: they are cleared (the batch list from
 *   last_batch_head, as many entries as used->idx moved, heads < num only). Then every
 *   head < num still in flight is queued for resubmission, oldest counter first: vq_pop
 *   hands them out (re-read from the descriptor table and checked like any chain)
 *   before new ones, and last_avail_idx becomes used->idx plus their number, whatever
 *   SET_VRING_BASE said (as libvhost-user does). The caller should then serve the queue
 *   as if kicked (the driver will not kick again for these).
 * The number of chains to resubmit, or -EINVAL (q not set up or broken, num too big for
 * the region, a misaligned region, any other version): q then tracks nothing. */
int vq_inflight_start(struct vq *q, uint8_t *region, uint32_t queue_size);

/* vhost-user GET_VRING_BASE / SET_VRING_BASE. */
uint16_t vq_get_last_avail_idx(const struct vq *q);
void vq_set_last_avail_idx(struct vq *q, uint16_t idx);

#endif

/* Split-virtqueue ring walker, device side (virtio 1.2, section 2.7).
 *
 * The rings and the buffers they point to are guest memory, and the guest may be
 * hostile: it may write any bytes, at any time, including while we read them. So:
 *
 * - Every guest range we touch (the three rings, an indirect table, every buffer) must
 *   lie entirely inside ONE RAM region; the arithmetic cannot wrap (vq_translate). The
 *   rings are translated once, at setup, and must be aligned as the spec says (desc 16,
 *   avail 2, used 4), so the 16- and 32-bit ring fields are naturally aligned.
 * - Every guest value is read once into a local and only the local is used (avail->idx
 *   and each ring entry by an atomic load; each descriptor by one 16-byte copy followed
 *   by a compiler barrier), so a guest changing a value under us cannot pass a check
 *   with one value and be used with another. Buffer *contents* are not copied: a
 *   backend that parses a request header must copy it before validating it.
 * - Ordering: an acquire fence after reading avail->idx (ring entries and descriptors
 *   written by the driver before it bumped idx are seen); a release store publishes
 *   used->idx after the used element; a full fence before reading avail->flags for the
 *   interrupt decision (store-load ordering against the driver's side).
 * - Work is bounded whatever the guest writes: an available index more than num ahead
 *   of ours, a head or next index >= num, a chain of more than num descriptors (which
 *   is how loops are caught), an indirect table that is empty, not a multiple of 16
 *   bytes, outside RAM or longer than VQ_MAX_INDIRECT entries, a loop inside it (more
 *   steps than entries), INDIRECT with NEXT (so at most one table per chain, and it
 *   ends the chain), INDIRECT inside an indirect table, more than VQ_MAX_SEGS buffers,
 *   more than 2^32 bytes in total (the spec's limit): all make the queue broken. A
 *   chain therefore costs at most num + VQ_MAX_INDIRECT descriptor reads.
 * - A device-readable buffer after a device-writable one is malformed (spec 2.7.4.2),
 *   so readable segments always come first and a backend can split them at nreadable.
 * - Zero-length buffers are malformed, as in QEMU ("zero sized buffers are not
 *   allowed"): Linux drivers never make them, and refusing them means every segment
 *   handed out has a real, translated host range behind it. The WRITE flag of a
 *   descriptor that points to an indirect table is ignored, as the spec requires.
 * - Once broken, a queue stays broken until vq_setup: vq_pop returns -EINVAL, vq_push,
 *   vq_add_used, vq_set_notify and vq_needs_interrupt do nothing, and none of them
 *   touches guest memory. The exceptions are vq_publish_used, which still publishes
 *   used elements added before the queue broke (a store to used->idx, inside the ring
 *   vq_setup checked), and vq_add_used_late, the completion of a chain popped before
 *   the queue broke whose I/O was still running (an asynchronous engine cannot recall
 *   it): it writes one used element, inside the same checked ring. The backend is
 *   expected to report DEVICE_NEEDS_RESET.
 *
 * Inflight tracking (vq_inflight_start, vhost-user's inflight region): a pop records
 * the head (counter, then inflight = 1) before the backend acts on it; a completion adds
 * the head to the batch list (next, last_batch_head) with its used element, and once
 * used->idx is published the batch's entries are cleared, then the region's used_idx is
 * set: a backend that dies anywhere in between leaves a region from which the next one
 * knows exactly what was not completed. The region is not guest memory but is shared
 * with the frontend, so it gets the same treatment: each value read once, every index
 * checked against num before it is used, work bounded by num.
 *
 * Completions may come in any order (an asynchronous backend completes chains as its
 * I/O finishes): the used ring, the batch list and the region work per head, so nothing
 * here assumes the pop order.
 *
 * VIRTIO_RING_F_EVENT_IDX (vq_set_event_idx, once negotiated): the driver's used_event
 * (avail->ring[num]) decides interrupts: vq_needs_interrupt is true when the used index
 * moved past used_event since the previous decision (vring_need_event, as Linux's vhost
 * computes it; the first decision after setup is always true, since the driver's view of
 * the old one is unknown). Kicks: vq_set_notify(q, 1) writes avail_event
 * (used->ring[num]) = the next available index we will take, so the driver kicks once
 * when it makes that entry available; vq_set_notify(q, 0) leaves avail_event where it is
 * (the driver then kicks at most once more). Without EVENT_IDX, the flags do the same
 * (VRING_USED_F_NO_NOTIFY, VRING_AVAIL_F_NO_INTERRUPT). Both fields are inside the
 * ranges vq_setup checked (avail 6 + 2 num bytes, used 6 + 8 num).
 *
 * Not supported yet: VIRTIO_F_IN_ORDER, packed rings. No allocation anywhere; the caller
 * owns struct vq and struct vq_chain.
 */
#include "virtq.h"

#include <errno.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian and this walker reads them natively"
#endif

/* The guest's struct virtq_desc, as we copy it out. */
struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

#define DESC_SIZE 16
#define compiler_barrier() __asm__ __volatile__("" ::: "memory")

static uint16_t load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

#define LOAD(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define STORE(field, value) __atomic_store_n(&(field), (value), __ATOMIC_RELAXED)
#define RELEASE() __atomic_thread_fence(__ATOMIC_RELEASE)

/* One read of a descriptor. After the barrier the compiler must assume guest memory
 * changed, so it cannot re-read p in place of the local copy. */
static struct desc read_desc(const uint8_t *p)
{
    struct desc d;
    memcpy(&d, p, sizeof d);
    compiler_barrier();
    return d;
}

int vq_mem_init(struct vq_mem *mem, const struct vq_region *regions, int nregions)
{
    int i, j;

    mem->nregions = 0;
    if (!regions || nregions < 1 || nregions > VQ_MAX_REGIONS)
        return -EINVAL;
    for (i = 0; i < nregions; i++) {
        const struct vq_region *r = &regions[i];
        uint64_t last;

        if (r->size == 0 || !r->hva)
            return -EINVAL;
        if (r->size - 1 > UINT64_MAX - r->gpa)
            return -EINVAL;
        if (r->size - 1 > UINTPTR_MAX - (uintptr_t)r->hva)
            return -EINVAL;
        last = r->gpa + (r->size - 1);
        for (j = 0; j < i; j++) {
            const struct vq_region *o = &regions[j];
            if (o->gpa <= last && r->gpa <= o->gpa + (o->size - 1))
                return -EINVAL;
        }
    }
    memcpy(mem->regions, regions, (size_t)nregions * sizeof *regions);
    mem->nregions = nregions;
    return 0;
}

uint8_t *vq_translate(const struct vq_mem *mem, uint64_t gpa, uint64_t len)
{
    int i;

    if (len == 0)
        return NULL;
    for (i = 0; i < mem->nregions; i++) {
        const struct vq_region *r = &mem->regions[i];
        uint64_t offset;

        if (gpa < r->gpa)
            continue;
        offset = gpa - r->gpa;
        if (offset >= r->size)
            continue;
        /* Regions do not overlap: gpa is in this one only, so the range fits here or
         * nowhere. */
        if (len > r->size - offset)
            return NULL;
        return r->hva + offset;
    }
    return NULL;
}

static int aligned(const uint8_t *p, uintptr_t alignment)
{
    return ((uintptr_t)p & (alignment - 1)) == 0;
}

int vq_setup(struct vq *q, const struct vq_region *regions, int nregions, uint32_t num,
             uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
             uint16_t last_avail_idx)
{
    q->broken = 1;
    q->num = 0;
    q->desc = q->avail = q->used = NULL;
    q->inflight = NULL;
    q->nbatch = q->nresubmit = q->resubmitted = 0;
    q->event_idx = 0;
    q->signalled_used_valid = 0;
    if (vq_mem_init(&q->mem, regions, nregions))
        return -EINVAL;
    if (num == 0 || num > VQ_MAX_QUEUE_SIZE || (num & (num - 1)))
        return -EINVAL;
    if (desc_gpa % 16 || avail_gpa % 2 || used_gpa % 4)
        return -EINVAL;
    q->desc = vq_translate(&q->mem, desc_gpa, (uint64_t)DESC_SIZE * num);
    q->avail = vq_translate(&q->mem, avail_gpa, 6 + 2 * (uint64_t)num);
    q->used = vq_translate(&q->mem, used_gpa, 6 + 8 * (uint64_t)num);
    if (!q->desc || !q->avail || !q->used)
        return -EINVAL;
    /* Host alignment follows from guest alignment for page-aligned mappings; checked
     * because the atomic ring accesses depend on it. */
    if (!aligned(q->desc, 16) || !aligned(q->avail, 2) || !aligned(q->used, 4))
        return -EINVAL;
    q->num = num;
    q->last_avail_idx = last_avail_idx;
    q->used_idx = load16(q->used + 2);
    q->broken = 0;
    return 0;
}

static int broken(struct vq *q)
{
    q->broken = 1;
    return -EINVAL;
}

/* Appends one descriptor's buffer to the chain; -1 if it is malformed. */
static int add_segment(const struct vq *q, struct vq_chain *c, const struct desc *d)
{
    uint32_t is_write = (d->flags & VQ_DESC_F_WRITE) != 0;
    uint8_t *p;

    if (d->len == 0)
        return -1;
    if (!is_write && c->nsegs > c->nreadable)
        return -1;
    if (c->nsegs == VQ_MAX_SEGS)
        return -1;
    p = vq_translate(&q->mem, d->addr, d->len);
    if (!p)
        return -1;
    if (is_write) {
        c->writable_bytes += d->len;
    } else {
        c->readable_bytes += d->len;
        c->nreadable++;
    }
    if (c->readable_bytes + c->writable_bytes > (UINT64_C(1) << 32))
        return -1;
    c->segs[c->nsegs].addr = p;
    c->segs[c->nsegs].len = d->len;
    c->segs[c->nsegs].is_write = is_write;
    c->nsegs++;
    return 0;
}

/* The descriptors of the indirect table `ind` points to; -1 if malformed. */
static int add_indirect(const struct vq *q, struct vq_chain *c, const struct desc *ind)
{
    const uint8_t *table;
    uint32_t n, i = 0, steps = 0;

    if (ind->flags & VQ_DESC_F_NEXT)
        return -1;
    if (ind->len == 0 || ind->len % DESC_SIZE || ind->len / DESC_SIZE > VQ_MAX_INDIRECT)
        return -1;
    table = vq_translate(&q->mem, ind->addr, ind->len);
    if (!table)
        return -1;
    n = ind->len / DESC_SIZE;
    for (;;) {
        struct desc d;

        if (++steps > n)
            return -1;
        d = read_desc(table + (size_t)DESC_SIZE * i);
        if (d.flags & VQ_DESC_F_INDIRECT)
            return -1;
        if (add_segment(q, c, &d))
            return -1;
        if (!(d.flags & VQ_DESC_F_NEXT))
            return 0;
        i = d.next;
        if (i >= n)
            return -1;
    }
}

/* The chain starting at descriptor `head` (< num) into *c; -1 if it is malformed. */
static int walk_chain(const struct vq *q, struct vq_chain *c, uint16_t head)
{
    uint32_t i = head, steps = 0;

    c->head = head;
    c->nsegs = c->nreadable = 0;
    c->readable_bytes = c->writable_bytes = 0;
    for (;;) {
        struct desc d;

        if (++steps > q->num)
            return -1;
        d = read_desc(q->desc + (size_t)DESC_SIZE * i);
        if (d.flags & VQ_DESC_F_INDIRECT)
            return add_indirect(q, c, &d);
        if (add_segment(q, c, &d))
            return -1;
        if (!(d.flags & VQ_DESC_F_NEXT))
            return 0;
        i = d.next;
        if (i >= q->num)
            return -1;
    }
}

int vq_pop(struct vq *q, struct vq_chain *c)
{
    uint16_t avail_idx, pending, head;

    if (q->broken)
        return -EINVAL;
    if (q->resubmitted < q->nresubmit) {
        /* Still in flight (inflight = 1, its counter) from the previous backend. */
        if (walk_chain(q, c, q->resubmit[q->resubmitted].head))
            return broken(q);
        q->resubmitted++;
        return 1;
    }
    avail_idx = load16(q->avail + 2);
    pending = (uint16_t)(avail_idx - q->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > q->num)
        return broken(q);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    head = load16(q->avail + 4 + 2 * (size_t)(q->last_avail_idx & (q->num - 1)));
    if (head >= q->num || walk_chain(q, c, head))
        return broken(q);
    if (q->inflight) {
        struct vq_inflight_desc *e = &q->inflight->desc[head];

        STORE(e->counter, q->counter++);
        RELEASE();
        STORE(e->inflight, 1);
    }
    q->last_avail_idx++;
    return 1;
}

/* The used element for head (< num once the queue was set up; see the callers). */
static void add_used(struct vq *q, uint16_t head, uint32_t written)
{
    uint8_t *elem;

    if (q->inflight && head < q->num) {
        /* The batch list can hold every head once; a batch that large has every
         * pending chain in it, so publishing it first changes nothing for the driver. */
        if (q->nbatch == q->num)
            vq_publish_used(q);
        STORE(q->inflight->desc[head].next, q->last_batch_head);
        STORE(q->inflight->last_batch_head, head);
        q->last_batch_head = head;
        q->batch[q->nbatch++] = head;
    }
    elem = q->used + 4 + 8 * (size_t)(q->used_idx & (q->num - 1));
    __atomic_store_n((uint32_t *)elem, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n((uint32_t *)(elem + 4), written, __ATOMIC_RELAXED);
    q->used_idx++;
}

void vq_add_used(struct vq *q, uint16_t head, uint32_t written)
{
    if (q->broken)
        return;
    add_used(q, head, written);
}

void vq_add_used_late(struct vq *q, uint16_t head, uint32_t written)
{
    /* num is 0 until vq_setup succeeded; a broken queue keeps the rings it checked. */
    if (q->num == 0 || head >= q->num)
        return;
    add_used(q, head, written);
}

void vq_publish_used(struct vq *q)
{
    uint32_t i;

    /* num is 0 until vq_setup succeeded, and then q->used is a checked ring. */
    if (q->num == 0)
        return;
    /* Release: the elements (and the batch list) are visible before the index that
     * covers them. */
    __atomic_store_n((uint16_t *)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
    if (!q->inflight)
        return;
    /* Then the batch is no longer in flight, then the region says so. */
    RELEASE();
    for (i = 0; i < q->nbatch; i++)
        STORE(q->inflight->desc[q->batch[i]].inflight, 0);
    RELEASE();
    STORE(q->inflight->used_idx, q->used_idx);
    q->nbatch = 0;
}

void vq_push(struct vq *q, uint16_t head, uint32_t written)
{
    if (q->broken)
        return;
    vq_add_used(q, head, written);
    vq_publish_used(q);
}

void vq_set_event_idx(struct vq *q, int enable)
{
    q->event_idx = enable != 0;
    q->signalled_used_valid = 0;
}

void vq_set_notify(struct vq *q, int enable)
{
    if (q->broken)
        return;
    /* used->flags and avail_event are the device's to write; the driver reads them after
     * publishing avail->idx (with a barrier), we read avail->idx after this store (with
     * this one). */
    if (q->event_idx) {
        if (!enable)
            return;         /* avail_event stays behind: at most one more kick */
        __atomic_store_n((uint16_t *)(q->used + 4 + 8 * (size_t)q->num), q->last_avail_idx,
                         __ATOMIC_RELAXED);
    } else {
        __atomic_store_n((uint16_t *)q->used, enable ? 0 : VQ_USED_F_NO_NOTIFY,
                         __ATOMIC_RELAXED);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

int vq_pending(struct vq *q)
{
    if (q->broken)
        return 0;
    return q->resubmitted < q->nresubmit || load16(q->avail + 2) != q->last_avail_idx;
}

int vq_needs_interrupt(struct vq *q)
{
    uint16_t event, old, new;
    int valid;

    if (q->broken)
        return 0;
    /* Our used->idx store must be visible before we read the flag or used_event, or we
     * could miss a driver that asked for an interrupt after seeing the old idx. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!q->event_idx)
        return !(load16(q->avail) & VQ_AVAIL_F_NO_INTERRUPT);
    event = load16(q->avail + 4 + 2 * (size_t)q->num);
    old = q->signalled_used;
    new = q->used_idx;
    valid = q->signalled_used_valid;
    q->signalled_used = new;
    q->signalled_used_valid = 1;
    /* vring_need_event: used_event is in [old, new), the entries published since the
     * last decision. */
    return !valid || (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

uint64_t vq_inflight_queue_bytes(uint32_t queue_size)
{
    return ((uint64_t)sizeof(struct vq_inflight_desc) * queue_size + 2 + 63) & ~UINT64_C(63);
}

/* a before b in resubmission order: the older counter first (ties: the lower head, so
 * the order does not depend on the sort). */
static int before(const struct vq_resubmit *a, const struct vq_resubmit *b)
{
    return a->counter < b->counter || (a->counter == b->counter && a->head < b->head);
}

static void sift_down(struct vq_resubmit *v, uint32_t i, uint32_t n)
{
    for (;;) {
        uint32_t last = i, left = 2 * i + 1, right = left + 1;
        struct vq_resubmit t;

        if (left < n && before(&v[last], &v[left]))
            last = left;
        if (right < n && before(&v[last], &v[right]))
            last = right;
        if (last == i)
            return;
        t = v[i];
        v[i] = v[last];
        v[last] = t;
        i = last;
    }
}

/* Heapsort: no allocation, n log n whatever the counters (they are copies, so the
 * comparison is consistent even if the region changes meanwhile). */
static void sort_oldest_first(struct vq_resubmit *v, uint32_t n)
{
    uint32_t i;

    for (i = n / 2; i-- > 0;)
        sift_down(v, i, n);
    for (i = n; i-- > 1;) {
        struct vq_resubmit t = v[0];

        v[0] = v[i];
        v[i] = t;
        sift_down(v, 0, i);
    }
}

int vq_inflight_start(struct vq *q, uint8_t *region, uint32_t queue_size)
{
    struct vq_inflight *r = (struct vq_inflight *)region;
    uint16_t version, recorded, used = q->used_idx;
    uint32_t i, n = 0;

    q->inflight = NULL;
    q->nbatch = q->nresubmit = q->resubmitted = 0;
    if (q->broken || q->num == 0 || !region || (uintptr_t)region % 8 ||
        queue_size > VQ_INFLIGHT_MAX_QUEUE || q->num > queue_size)
        return -EINVAL;
    version = LOAD(r->version);
    if (version != 0 && version != VQ_INFLIGHT_VERSION)
        return -EINVAL;
    STORE(r->desc_num, (uint16_t)queue_size);
    q->last_batch_head = 0;
    q->counter = 0;
    if (version == 0) {
        STORE(r->used_idx, used);
        RELEASE();
        STORE(r->version, (uint16_t)VQ_INFLIGHT_VERSION);
        q->inflight = r;
        return 0;
    }
    recorded = LOAD(r->used_idx);
    if (recorded != used) {
        /* Published, not yet cleared: the batch list, one entry per element published. */
        uint16_t head = LOAD(r->last_batch_head), count = (uint16_t)(used - recorded);

        for (i = 0; i < count && i < q->num && head < q->num; i++) {
            STORE(r->desc[head].inflight, 0);
            head = LOAD(r->desc[head].next);
        }
        RELEASE();
        STORE(r->used_idx, used);
    }
    for (i = 0; i < q->num; i++) {
        if (LOAD(r->desc[i].inflight) != 1)
            continue;
        q->resubmit[n].counter = LOAD(r->desc[i].counter);
        q->resubmit[n].head = (uint16_t)i;
        n++;
    }
    sort_oldest_first(q->resubmit, n);
    q->nresubmit = n;
    q->counter = n ? q->resubmit[n - 1].counter + 1 : 0;
    q->last_avail_idx = (uint16_t)(used + n);
    q->inflight = r;
    return (int)n;
}

uint16_t vq_get_last_avail_idx(const struct vq *q)
{
    return q->last_avail_idx;
}

void vq_set_last_avail_idx(struct vq *q, uint16_t idx)
{
    q->last_avail_idx = idx;
}

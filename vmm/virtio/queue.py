"""A split virtqueue seen from the device: a thin wrapper over native/virtq.c.

The ring walk is in C because it runs for every request and because it is where a
hostile guest attacks: every index, length and address in the rings is the guest's to
choose, and may change while we read it. virtq.c checks all of it (its header comment
lists what and why); this module only turns its results into Python objects.

The buffers of a chain are handed out as memoryviews onto guest memory, not copies, so
a backend can read a request or write a reply with no copy, and as raw iovecs for C
fast paths (preadv/pwritev); a C fast path can also take the whole queue (`native`) and
walk it itself (native/blkio.c does). Two consequences for the caller:

- The guest can change a readable buffer while the backend looks at it. Copy a request
  header (bytes(view)) before validating it, then use only the copy.
- The views point into the mapping the regions describe; that mapping must stay mapped
  while a Virtqueue or any view from it is alive (a view outliving it would fault).

One Virtqueue is used by one thread at a time (the queue's worker); the GIL is released
during the C calls.
"""

from dataclasses import dataclass
from typing import NamedTuple

from .._virtq import ffi, lib

MAX_QUEUE_SIZE = lib.VQ_MAX_QUEUE_SIZE
MAX_SEGMENTS = lib.VQ_MAX_SEGS
INFLIGHT_MAX_QUEUE = lib.VQ_INFLIGHT_MAX_QUEUE


def inflight_queue_bytes(queue_size: int) -> int:
    """One queue's part of a vhost-user inflight region (native/virtq.h)."""
    return lib.vq_inflight_queue_bytes(queue_size)


class QueueBroken(Exception):
    """The guest broke the ring protocol. The queue stays unusable until it is set up
    again; the device should report DEVICE_NEEDS_RESET."""


class Served(NamedTuple):
    """What one call of a device's process(queue) did: `notify`: chains were completed
    and the driver wants an interrupt; `more`: it stopped with chains possibly still
    available (a budget ran out), so the caller should call again before it waits for
    a kick; `retry_in`: seconds after which to call again even without a kick (a rate
    limit or a source with nothing now made it give a chain back: Virtqueue.unpop)."""
    notify: bool
    more: bool
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Chain:
    """One available descriptor chain: give `head` back to Virtqueue.push when done."""
    head: int
    readable: list[memoryview]        # the request, in order
    writable: list[memoryview]        # where the reply goes, in order
    iovecs: list[tuple[int, int]]     # (host address, length): the readable ones, then the writable

    @property
    def readable_bytes(self) -> int:
        return sum(len(view) for view in self.readable)

    @property
    def writable_bytes(self) -> int:
        return sum(len(view) for view in self.writable)


class Virtqueue:
    def __init__(self, regions, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int,
                 last_avail_idx: int = 0):
        """regions: (guest physical address, size, host address) of each RAM range, as
        mapped in this process. ValueError if the regions or the rings are unusable (a
        ring outside RAM or misaligned, num not a power of 2 up to 32768)."""
        regions = list(regions)
        if not 1 <= len(regions) <= lib.VQ_MAX_REGIONS:
            raise ValueError(f"{len(regions)} memory regions; allowed 1..{lib.VQ_MAX_REGIONS}")
        self._q = ffi.new("struct vq *")
        self._chain = ffi.new("struct vq_chain *")   # reused: the views point at guest memory
        table = ffi.new("struct vq_region[]", len(regions))
        try:
            for entry, (gpa, size, host_address) in zip(table, regions):
                entry.gpa, entry.size = gpa, size
                entry.hva = ffi.cast("uint8_t *", host_address)
            rc = lib.vq_setup(self._q, table, len(regions), num, desc_gpa, avail_gpa,
                              used_gpa, last_avail_idx)
        except OverflowError as error:
            raise ValueError(f"virtqueue setup: {error}") from None
        if rc != 0:
            raise ValueError(
                f"virtqueue setup refused: num {num}, desc {desc_gpa:#x}, avail {avail_gpa:#x},"
                f" used {used_gpa:#x} (outside RAM, misaligned, or a bad region table)")

    def pop(self) -> Chain | None:
        """The next available chain, or None. QueueBroken if the guest's rings are
        malformed, and on every call after that."""
        rc = lib.vq_pop(self._q, self._chain)
        if rc == 0:
            return None
        if rc < 0:
            raise QueueBroken("malformed virtqueue: the guest broke the ring protocol")
        chain = self._chain
        readable, writable, iovecs = [], [], []
        for index in range(chain.nsegs):
            segment = chain.segs[index]
            iovecs.append((int(ffi.cast("uintptr_t", segment.addr)), segment.len))
            view = memoryview(ffi.buffer(segment.addr, segment.len))
            (writable if index >= chain.nreadable else readable).append(view)
        return Chain(chain.head, readable, writable, iovecs)

    def unpop(self) -> None:
        """Give back the chain pop() just handed out, untouched and not pushed: the next
        pop() hands it out again (a device that may not serve it yet). Not for a queue
        that tracks in-flight chains."""
        lib.vq_set_last_avail_idx(self._q, (self.last_avail_idx - 1) & 0xFFFF)

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the guest, `written` bytes of its writable buffers
        filled. The caller still decides whether to interrupt (needs_interrupt)."""
        lib.vq_push(self._q, head, written)

    def want_notifications(self) -> None:
        """Clear VRING_USED_F_NO_NOTIFY (with EVENT_IDX: avail_event = the next index we
        take): a queue taken over from another device (a slot whose backend was swapped)
        may have been left with kicks suppressed. Look at the ring again after it (the
        driver may have made chains available before it could see this)."""
        lib.vq_set_notify(self._q, 1)

    def needs_interrupt(self) -> bool:
        """Whether the guest asked to be interrupted: VRING_AVAIL_F_NO_INTERRUPT clear,
        or with EVENT_IDX the used index moved past used_event since the last call (so
        call it once per batch pushed)."""
        return bool(lib.vq_needs_interrupt(self._q))

    @property
    def event_idx(self) -> bool:
        """VIRTIO_RING_F_EVENT_IDX negotiated: interrupts follow the driver's used_event
        and want_notifications() writes avail_event."""
        return bool(self._q.event_idx)

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        lib.vq_set_event_idx(self._q, int(bool(value)))

    def pending(self) -> bool:
        """Chains are available that pop() has not handed out yet."""
        return bool(lib.vq_pending(self._q))

    def track_inflight(self, address: int, queue_size: int) -> int:
        """Record this queue's chains in the inflight region part at `address`
        (inflight_queue_bytes(queue_size) bytes, mapped while the queue lives) and take
        over what a previous backend left there (vq_inflight_start): the number of
        chains pop() hands out again first. ValueError if the region is unusable (a
        version we do not know, a ring bigger than the region)."""
        count = lib.vq_inflight_start(self._q, ffi.cast("uint8_t *", address), queue_size)
        if count < 0:
            raise ValueError(f"inflight region refused: made for rings of {queue_size}, "
                             f"this one has {self.num}, or its version is not one we know")
        return count

    @property
    def num(self) -> int:
        """The ring size."""
        return self._q.num

    @property
    def native(self):
        """The `struct vq *` for C code built into vmm._virtq (native/blkio.c): it then
        walks and completes chains itself. Same one-thread-at-a-time rule."""
        return self._q

    @property
    def broken(self) -> bool:
        return bool(self._q.broken)

    @property
    def last_avail_idx(self) -> int:
        """The next avail ring entry to consume: vhost-user GET_VRING_BASE."""
        return lib.vq_get_last_avail_idx(self._q)

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        """vhost-user SET_VRING_BASE (normally passed to the constructor instead)."""
        lib.vq_set_last_avail_idx(self._q, value)

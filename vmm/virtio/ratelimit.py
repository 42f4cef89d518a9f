"""A device's rate limits at run time: the page the launcher writes and the backend's C
data path reads (native/ratelimit.h; what the limits mean: docs/limits.md).

One page per device, shared anonymous memory made by the launcher when it attaches the
device, before it forks the backend: the backend inherits it (no fd to pass), and so
does every backend forked again after a death, which therefore runs under the limits
as they are now, changed or not. The launcher is the only writer -- at attach, and when
the vm process asks the broker on a QMP client's behalf (block_set_io_throttle) --
and a forked backend unmaps every other device's page (keep_only), so it can
reach its own limits and no one else's. Slot 0 holds a disk's limits or a NIC's rx,
slot 1 a NIC's tx. The data path looks at its slot's sequence count at every request;
a change is taken at the next one, the buckets refilled to full.

A stand-alone backend program has a page of its own, written once from its options.
"""

import mmap
import weakref

from .._virtq import ffi, lib
from ..config.model import Bucket, RateLimit

SLOTS = 2
_SLOT_BYTES = 64
_pages: "weakref.WeakSet[LimitsPage]" = weakref.WeakSet()


def params(bucket: Bucket | None):
    """A bucket as struct rl_params (size 0: off)."""
    p = ffi.new("struct rl_params *")
    if bucket is not None:
        p.size, p.one_time_burst = bucket.size, bucket.one_time_burst
        p.refill_ns = bucket.refill_time * 1_000_000
    return p


class LimitsPage:
    def __init__(self, limits: tuple[RateLimit | None, ...] = ()):
        """A fresh page with `limits` in its first slots."""
        assert ffi.sizeof("struct rl_config") <= _SLOT_BYTES
        self._map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
        self._buffer = ffi.from_buffer(self._map)
        self._base = ffi.cast("uint8_t *", self._buffer)
        self.limits: list[RateLimit | None] = [None] * SLOTS
        for slot, limit in enumerate(limits):
            self.write(slot, limit)
        _pages.add(self)

    def config(self, slot: int):
        """struct rl_config * of a slot, for rl_init (valid while the page is)."""
        return ffi.cast("struct rl_config *", self._base + slot * _SLOT_BYTES)

    def write(self, slot: int, limit: RateLimit | None) -> None:
        """Publishes new limits for a slot (None: none); the data path takes them at
        its next request."""
        limit = limit or RateLimit()
        lib.rl_configure(self.config(slot), params(limit.ops), params(limit.bandwidth))
        self.limits[slot] = limit if limit.ops or limit.bandwidth else None

    def limiter(self, slot: int):
        """A new struct rl_limiter reading the slot (one per device, shared by its
        queues' threads); keep the page alive while it is used."""
        limiter = ffi.new("struct rl_limiter *")
        rc = lib.rl_init(limiter, self.config(slot))
        if rc < 0:
            raise OSError(-rc, "rl_init")
        return limiter

    def close(self) -> None:
        _pages.discard(self)
        self._base = None
        ffi.release(self._buffer)
        self._map.close()


def keep_only(page: LimitsPage | None) -> None:
    """In a forked backend: unmap every device's page but its own."""
    for other in list(_pages):
        if other is not page:
            other.close()

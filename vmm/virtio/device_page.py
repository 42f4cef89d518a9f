"""A device's page, shared by the launcher and the device's backend process: the rate
limits the launcher writes and the backend's C data path obeys (native/ratelimit.h,
docs/limits.md), and the counters the data path keeps and the launcher reads for the
operator (docs/metrics.md).

One page per disk or NIC, shared anonymous memory made by the launcher when it
attaches the device, before it forks the backend: the backend inherits it (no fd to
pass), and so does every backend forked again after a death, which therefore runs
under the limits as they are now and counts on from where the dead one stopped. The
launcher alone writes limits -- at attach, and when the vm process asks the broker on
a QMP client's behalf -- and reads counters when the vm process asks (query-blockstats,
query-stats). A forked backend unmaps every other device's page (keep_only), so it can
reach its own limits and counters and no one else's. What the launcher reads there are
numbers a backend wrote: a compromised backend can lie about its own device, nothing
more.

Layout (offsets in bytes):
    0    limits slot 0: a disk's, or a NIC's receive (struct rl_config, 64 bytes)
    64   limits slot 1: a NIC's transmit
    128  what the backend's guest got wrong (a uint64: the occurrences vmm/log_limit.py
         counts in the backend process, logged or not)
    256  counters: a disk's struct blk_stats per queue (384 bytes each), or a NIC's
         struct net_stats for receive, then at 320 for transmit
Each counter is written by one worker thread only (its queue's or its direction's).

A stand-alone backend program has a page of its own, written once from its options.
"""

import mmap
import weakref

from .._virtq import ffi, lib
from ..config.model import Bucket, RateLimit

SLOTS = 2
_SLOT_BYTES = 64
_GUEST_ERRORS = 128
_STATS = 256
_BLK_STATS_BYTES = lib.BLK_STATS_BYTES
_NET_STATS_BYTES = 64
MAX_QUEUES = (mmap.PAGESIZE - _STATS) // _BLK_STATS_BYTES
LATENCY_BOUNDS_US = tuple(16 << i for i in range(lib.BLK_LAT_BUCKETS - 1))   # then +Inf
_pages: "weakref.WeakSet[DevicePage]" = weakref.WeakSet()


def params(bucket: Bucket | None):
    """A bucket as struct rl_params (size 0: off)."""
    p = ffi.new("struct rl_params *")
    if bucket is not None:
        p.size, p.one_time_burst = bucket.size, bucket.one_time_burst
        p.refill_ns = bucket.refill_time * 1_000_000
    return p


class DevicePage:
    def __init__(self, limits: tuple[RateLimit | None, ...] = ()):
        """A fresh page (zero counters) with `limits` in its first slots."""
        assert ffi.sizeof("struct rl_config") <= _SLOT_BYTES
        assert ffi.sizeof("struct blk_stats") <= _BLK_STATS_BYTES
        assert ffi.sizeof("struct net_stats") <= _NET_STATS_BYTES
        self._map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
        self._buffer = ffi.from_buffer(self._map)
        self._base = ffi.cast("uint8_t *", self._buffer)
        self.limits: list[RateLimit | None] = [None] * SLOTS
        for slot, limit in enumerate(limits):
            self.write(slot, limit)
        _pages.add(self)

    # Limits

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

    # Counters

    def blk_stats(self, queue: int):
        """struct blk_stats * of a disk's queue (0 .. MAX_QUEUES - 1)."""
        if not 0 <= queue < MAX_QUEUES:
            raise ValueError(f"queue {queue}: at most {MAX_QUEUES} queues have counters")
        return ffi.cast("struct blk_stats *", self._base + _STATS + queue * _BLK_STATS_BYTES)

    def net_stats(self, direction: int):
        """struct net_stats * of a NIC's receive (0) or transmit (1) direction."""
        return ffi.cast("struct net_stats *", self._base + _STATS + direction * _NET_STATS_BYTES)

    def guest_errors(self):
        """uint64_t * of the backend's guest-error count (log_limit.Limiter.count_into)."""
        return ffi.cast("uint64_t *", self._base + _GUEST_ERRORS)

    def read_blk(self) -> dict:
        """A disk's counters, summed over its queues."""
        total = {"ops": [0] * 4, "failed": [0] * 4, "bytes": [0] * 2, "total_ns": [0] * 3,
                 "throttled": 0, "latency": [[0] * lib.BLK_LAT_BUCKETS for _ in range(2)],
                 "guest_errors": self.guest_errors()[0]}
        for queue in range(MAX_QUEUES):
            stats = self.blk_stats(queue)
            for name in ("ops", "failed", "bytes", "total_ns"):
                values = getattr(stats, name)
                total[name] = [a + values[i] for i, a in enumerate(total[name])]
            for op in range(2):
                total["latency"][op] = [a + stats.latency[op][i]
                                        for i, a in enumerate(total["latency"][op])]
            total["throttled"] += stats.throttled
        return total

    def read_net(self) -> dict:
        """A NIC's counters: {"rx": {...}, "tx": {...}}."""
        names = ("frames", "bytes", "dropped", "bad_chains", "throttled")
        return {**{direction: {name: getattr(self.net_stats(index), name) for name in names}
                   for index, direction in enumerate(("rx", "tx"))},
                "guest_errors": self.guest_errors()[0]}

    def close(self) -> None:
        _pages.discard(self)
        self._base = None
        ffi.release(self._buffer)
        self._map.close()


def keep_only(page: DevicePage | None) -> None:
    """In a forked backend: unmap every device's page but its own."""
    for other in list(_pages):
        if other is not page:
            other.close()

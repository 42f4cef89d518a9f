"""virtio-blk requests: the Python face of native/blkio.c, which parses, checks and
executes them.

A chain is a 16-byte header (type, reserved, sector) in device-readable buffers, then
data (writable for IN and GET_ID, readable for OUT, DISCARD and WRITE_ZEROES), then one
writable status byte. The whole request path is C (blk_process, GIL released): pop,
check, preadv/pwritev straight between the disk and guest RAM, status, used element;
one used-index update and one interrupt decision per batch. blkio.c's header comment
is the list of rules; in short, anything malformed -- a short header, no status byte,
data in the wrong direction, not whole sectors, a range past the end of the disk, a
write to a read-only disk, bad discard segments -- completes with IOERR (UNSUPP for
unknown types, reserved flag bits and features not offered); a malformed *ring* breaks
the queue (QueueBroken). The guest gets an error, never a crash of the backend.

Python's part: describe the disk (probe), build the C structures, keep one worker
(bounce buffer, scratch, counters) per queue, and choose each queue's I/O engine.

Engines (native/blkio.h): an O_DIRECT disk gets one per queue, made here, before the
backend confines itself (the kernel calls that make one are not in its seccomp profile):
io_uring when the kernel allows it (a ring restricted to READV, WRITEV and FSYNC on the
disk's fd, registered as its only file), else Linux AIO, else none. With one, a queue
keeps up to DEPTH requests in flight and completes them as they finish. A buffered disk
runs its requests inline: they are copies to and from the page cache, faster done at
once than handed to the kernel and waited for. Which engine a disk got is logged once.
"""

import errno
import logging
import mmap
import os
import stat
import threading
import weakref
from dataclasses import dataclass

from ...._virtq import ffi, lib
from ....virtio.queue import QueueBroken, Served, Virtqueue

T_IN, T_OUT, T_FLUSH, T_GET_ID = lib.BLK_T_IN, lib.BLK_T_OUT, lib.BLK_T_FLUSH, lib.BLK_T_GET_ID
T_DISCARD, T_WRITE_ZEROES = lib.BLK_T_DISCARD, lib.BLK_T_WRITE_ZEROES
S_OK, S_IOERR, S_UNSUPP = lib.BLK_S_OK, lib.BLK_S_IOERR, lib.BLK_S_UNSUPP
F_UNMAP = lib.BLK_DWZ_F_UNMAP
SECTOR = lib.BLK_SECTOR
ID_BYTES = lib.BLK_ID_BYTES
MAX_DWZ_SEGMENTS = lib.BLK_MAX_DWZ_SEG
BOUNCE_BYTES = 1 << 20           # per queue; unaligned O_DIRECT requests go through it in chunks
DEPTH = lib.BLK_DEPTH            # requests a queue keeps in flight on its engine
ENGINES = {"io_uring": lib.BLK_ENGINE_IO_URING, "aio": lib.BLK_ENGINE_AIO,
           "inline": lib.BLK_ENGINE_INLINE}
ENGINE_NAMES = {"io_uring": "io_uring", "aio": "Linux AIO", "inline": "inline"}
AUTO = "auto"                    # O_DIRECT: io_uring, else Linux AIO, else inline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """What the disk fd is."""
    size: int                    # bytes
    block_device: bool
    mem_align: int               # O_DIRECT buffer alignment
    block_size: int              # O_DIRECT offset/length alignment (the logical block size)
    io_block: int                # st_blksize: the file system's allocation unit


def probe(fd: int) -> Probe:
    st = os.fstat(fd)
    mem_align, block_size = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    rc = lib.blk_dio_alignment(fd, mem_align, block_size)
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return Probe(os.lseek(fd, 0, os.SEEK_END), stat.S_ISBLK(st.st_mode), mem_align[0],
                 block_size[0], st.st_blksize)


@dataclass(frozen=True)
class Limits:
    """The discard / write-zeroes limits offered in the configuration space (sectors,
    segments per request); 0 segments: the request type is not offered."""
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: bool = False


class _Worker:
    """One queue's C state: scratch space, the bounce buffer, counters (its part of the
    device page's, vmm/virtio/device_page.py, else its own)."""

    def __init__(self, disk, engine: "_Engine | None" = None, stats=None):
        self.native = ffi.new("struct blk_worker *")
        self.stats = stats if stats is not None else ffi.new("struct blk_stats *")
        self.native.stats = self.stats
        align = max(disk.mem_align, mmap.PAGESIZE)
        # Anonymous mmap: page-aligned; over-allocated when O_DIRECT wants more.
        self._bounce = mmap.mmap(-1, BOUNCE_BYTES + align - mmap.PAGESIZE)
        base = ffi.cast("uint8_t *", ffi.from_buffer(self._bounce))
        skip = -int(ffi.cast("uintptr_t", base)) % align
        if lib.blk_worker_init(self.native, disk, base + skip, BOUNCE_BYTES) < 0:
            raise ValueError("virtio-blk: the disk's alignment does not fit the bounce buffer")
        self.engine = engine
        if engine is not None and engine.kind != "inline":
            self.native.engine = engine.native


class _Engine:
    """One queue's engine (struct blk_engine), in an anonymous mapping: its iovec
    arrays take 1 MiB, touched only as far as requests use them."""

    def __init__(self, disk, kind: str, depth: int = DEPTH):
        self._memory = mmap.mmap(-1, ffi.sizeof("struct blk_engine"))
        self.native = ffi.cast("struct blk_engine *", ffi.from_buffer(self._memory))
        rc = lib.blk_engine_init(self.native, disk, ENGINES[kind], depth)
        self.kind = kind if rc == 0 else "inline"
        self.error = -rc if rc < 0 else 0

    def close(self) -> None:
        """Only once nothing is in flight (its queue's worker has returned)."""
        if self.kind != "inline":
            lib.blk_engine_close(self.native)
            self.kind = "inline"

    def counters(self) -> dict[str, int]:
        e = self.native
        return {"started": e.started, "completed": e.completed,
                "short_transfers": e.short_transfers, "refused": e.refused}


def _make_engines(disk, direct: bool, wanted: str, queues: int) -> tuple[list[_Engine], str, bool]:
    """Each queue's engine, what to log about them, and whether that is a warning (the
    disk did not get what was asked for)."""
    if wanted == "inline" or (wanted == AUTO and not direct):
        why = "buffered: page-cache copies in each queue's thread" if not direct else "asked"
        return [], f"inline ({why})", False
    order = ["io_uring", "aio"] if wanted == AUTO else [wanted]
    refusals = []
    for kind in order:
        if kind == "io_uring" and not lib.blk_have_io_uring():
            refusals.append("io_uring: not built in (no liburing at build time)")
            continue
        engines = []
        for _ in range(queues):
            engine = _Engine(disk, kind)
            if engine.kind != kind:
                for made in engines:
                    made.close()
                refusals.append(f"{ENGINE_NAMES[kind]} refused: {os.strerror(engine.error)}")
                break
            engines.append(engine)
        else:
            what = "a ring per queue restricted to READV, WRITEV and FSYNC on the disk, " \
                   "its only file" if kind == "io_uring" else "a context per queue"
            line = f"{ENGINE_NAMES[kind]} ({what}), up to {DEPTH} requests in flight per " \
                   f"queue, {queues} queue{'s' if queues > 1 else ''}"
            if refusals:
                line += f"; {'; '.join(refusals)}"
            return engines, line, bool(refusals)
    return [], f"inline, one request at a time per queue ({'; '.join(refusals)})", True


class Requests:
    """Executes the requests of any number of queues against one disk."""

    def __init__(self, fd: int, capacity: int, read_only: bool, direct: bool, probe: Probe,
                 serial: bytes, limits: Limits, num_queues: int = 1, engine: str = AUTO,
                 page=None):
        """engine: "auto" (O_DIRECT: io_uring, else Linux AIO, else inline; buffered:
        inline), or one of ENGINES to ask for that one alone (inline if it is refused).
        The choice is logged once, as a warning when the disk did not get what it asked
        for. page: the disk's DevicePage (vmm/virtio/device_page.py): its limits slot 0
        charged by every queue's requests (native/ratelimit.h), each queue counting in
        its part of the page; or None."""
        d = self._disk = ffi.new("struct blk_disk *")
        d.fd, d.capacity = fd, capacity
        d.read_only, d.direct, d.block_device = read_only, direct, probe.block_device
        d.mem_align, d.block_size = probe.mem_align, probe.block_size
        d.discard = limits.max_discard_seg > 0
        d.write_zeroes = limits.max_write_zeroes_seg > 0
        d.write_zeroes_may_unmap = limits.write_zeroes_may_unmap
        d.max_discard_sectors, d.max_discard_seg = limits.max_discard_sectors, limits.max_discard_seg
        d.max_write_zeroes_sectors = limits.max_write_zeroes_sectors
        d.max_write_zeroes_seg = limits.max_write_zeroes_seg
        d.id = list(serial[:ID_BYTES].ljust(ID_BYTES, b"\0"))
        self._page = page                     # it must outlive the limiter and workers
        self._limiter = page.limiter(0) if page is not None else ffi.NULL
        d.limiter = self._limiter
        _Worker(d)                                    # refuse a bad description now
        if engine != AUTO and engine not in ENGINES:
            raise ValueError(f"virtio-blk: no I/O engine {engine!r}")
        self._engines, line, warn = _make_engines(d, direct, engine, num_queues)
        self.engine = self._engines[0].kind if self._engines else "inline"
        (log.warning if warn else log.info)("I/O engine: %s", line)
        self._workers: weakref.WeakKeyDictionary[Virtqueue, _Worker] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        engines = list(self._engines)
        self._finalizer = weakref.finalize(self, _close_engines, engines)
        self._finalizer.atexit = False     # at exit a daemon worker may still use them

    def close(self) -> None:
        """Releases the engines (every queue's worker must have returned)."""
        self._finalizer()

    def leave_to_exit(self) -> None:
        """The process ends next: the kernel releases the rings and AIO contexts, and
        nothing here does (io_destroy is not in a confined backend's profile)."""
        self._finalizer.detach()

    def process(self, queue: Virtqueue) -> Served:
        """Serves up to one ring's worth of chains. QueueBroken if the ring is malformed."""
        rc = lib.blk_process(queue.native, self._disk, self._worker(queue).native, queue.num)
        if rc < 0:
            raise QueueBroken("malformed virtqueue: the guest broke the ring protocol")
        return Served(bool(rc & lib.BLK_NOTIFY), bool(rc & lib.BLK_MORE))

    def serve(self, queue: Virtqueue, kick: int, call: int, stop: int) -> None:
        """The queue worker's whole loop, in C (blk_serve): serve, interrupt, wait for a
        kick or a completion, until `stop` is readable; every request in flight has
        completed when it returns. QueueBroken if the ring is malformed."""
        worker = self._worker(queue, engine=True)
        rc = lib.blk_serve(queue.native, self._disk, worker.native, kick, call, stop)
        if rc == -errno.EINVAL:
            raise QueueBroken("malformed virtqueue: the guest broke the ring protocol")
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))

    def _worker(self, queue: Virtqueue, engine: bool = False) -> _Worker:
        """The queue's worker; with its queue index's engine when `engine` (serve()) and
        there is one. process() runs everything inline."""
        worker = self._workers.get(queue)
        if worker is None:
            index = getattr(queue, "index", 0)
            mine = self._engines[index] if engine and index < len(self._engines) else None
            stats = self._page.blk_stats(index) if self._page is not None else None
            with self._lock:
                worker = self._workers[queue] = _Worker(self._disk, mine, stats)
        return worker

    def engine_counters(self) -> dict[str, int]:
        """Summed over the queues' engines: started (requests handed to the engine),
        completed, short_transfers (finished inline), refused (run inline after the
        kernel refused them)."""
        totals = dict.fromkeys(("started", "completed", "short_transfers", "refused"), 0)
        for engine in self._engines:
            for name, value in engine.counters().items():
                totals[name] += value
        return totals

    def counters(self) -> dict[str, int]:
        """Requests, errors, bounced (O_DIRECT through the bounce buffer) and
        zeroes_written (write-zeroes done by writing), summed over the live queues;
        throttled: requests that waited for the rate limiter."""
        names = ("requests", "errors", "bounced", "zeroes_written")
        totals = dict.fromkeys(names, 0) | {"throttled": 0}
        for worker in list(self._workers.values()):
            for name in names:
                totals[name] += getattr(worker.native, name)
            totals["throttled"] += worker.stats.throttled
        return totals


def _close_engines(engines: list[_Engine]) -> None:
    for engine in engines:
        engine.close()

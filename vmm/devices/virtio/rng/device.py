"""The virtio-rng device (virtio 1.2, 5.4): one queue, requestq, of buffers the guest
wants filled with random bytes, and an entropy source the launcher opened (a character
device such as /dev/urandom, read non-blocking). Features: VERSION_1 and
INDIRECT_DESC; no configuration space.

The rate limit is a byte token bucket in the device's page (limits slot 0, written by
the launcher: docs/limits.md). A request is charged its size, at most CHUNK bytes,
before it is read; one the bucket cannot pay yet goes back to the ring (unpop) and the
ring's worker waits until the bucket can, or for the next kick. So a guest that keeps
asking gets the rate and no more, and nothing is held in the backend when the ring
stops (GET_VRING_BASE gives the request back with the ring).

The guest never gets an empty buffer (5.4.6.1: one or more bytes): a source with
nothing to give now (EAGAIN: /dev/random before the kernel's pool is ready, a slow
hardware RNG) is asked again after SOURCE_RETRY, and so is one that fails or ends
(EOF, EIO), which is logged once, until it gives bytes again.
"""

import logging
import os

from ...._virtq import ffi, lib
from ....log_limit import guest
from ....virtio import iov
from ....virtio.queue import Served, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
CONFIG_SIZE = 0
QUEUE_SIZE = 256
MAX_QUEUE_SIZE = 1024
# The most one request reads: a guest's buffer of any size costs us at most this much
# copying per chain (Linux asks for 64 bytes or its hwrng buffer, at most a page).
CHUNK = 64 * 1024
SOURCE_RETRY = 0.05          # seconds


class RngDevice:
    num_queues = 1
    max_queue_size = MAX_QUEUE_SIZE
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC

    def __init__(self, source: int, page, name: str):
        """`source`: the entropy source's fd (non-blocking); `page`: the device's
        DevicePage, None for no limit."""
        self.source = source
        self.name = name
        self.limiter = ffi.NULL
        if page is not None:
            self.limiter = ffi.new("struct rl_limiter *")
            if lib.rl_init(self.limiter, page.config(0)) != 0:
                raise OSError("rl_init failed")
            self._page = page           # the limiter points into it
        self._source_failed = False

    def config(self) -> bytes:
        return b""

    def process(self, queue: Virtqueue) -> Served:
        served = False
        while (chain := queue.pop()) is not None:
            views = iov.take(chain.writable, CHUNK)
            wanted = iov.size(views)
            if not wanted:
                guest.warning(log, self.name, "bad request", "a request with no writable "
                              "buffer (%d bytes to read) is completed empty",
                              chain.readable_bytes)
                queue.push(chain.head, 0)
                served = True
                continue
            wait_ns = lib.rl_consume(self.limiter, wanted, 0)
            if wait_ns:
                queue.unpop()
                return Served(served and queue.needs_interrupt(), False, wait_ns / 1e9)
            count = self._read(views)
            if not count:
                queue.unpop()
                return Served(served and queue.needs_interrupt(), False, SOURCE_RETRY)
            queue.push(chain.head, count)
            served = True
        return Served(served and queue.needs_interrupt(), False)

    def _read(self, views: list[memoryview]) -> int:
        """Bytes from the source straight into the guest's buffers; 0 for none now."""
        try:
            count = os.readv(self.source, views)
        except BlockingIOError:
            return 0
        except OSError as error:
            self._source_broke(error.strerror)
            return 0
        if count == 0:
            self._source_broke("end of file")
        elif self._source_failed:
            log.info("%s: the entropy source gives bytes again", self.name)
            self._source_failed = False
        return count

    def _source_broke(self, why: str) -> None:
        if not self._source_failed:
            log.error("%s: the entropy source gives nothing (%s); the guest waits, it is "
                      "asked again every %.0f ms", self.name, why, SOURCE_RETRY * 1000)
            self._source_failed = True

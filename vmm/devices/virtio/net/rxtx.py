"""The virtio-net queues: the Python face of native/netio.c, which moves the frames.

Receive (queue 0): frames read from the tap (non-blocking) go into the driver's
buffers, several per frame with MRG_RXBUF (num_buffers in the first header). The
queue's worker waits on its kick and on the tap; when the driver has no buffer left
for a waiting frame, the frame is kept and the tap is not watched again until the
driver kicks (adds buffers), so a full ring never spins. Transmit (queue 1): each
chain (header + frame, readable buffers only) is written to the tap with one writev
straight from guest memory. netio.c's header comment lists what is checked; a
malformed chain is completed without effect and counted, never followed.
"""

import logging

from ...._virtq import ffi, lib
from ....virtio.queue import QueueBroken, Served, Virtqueue

log = logging.getLogger(__name__)

HDR_LEN, LEGACY_HDR_LEN = lib.NET_HDR_LEN, lib.NET_LEGACY_HDR_LEN
BUDGET = 256          # frames per call before the worker looks at its stop pipe


class Receive:
    def __init__(self, tap: int):
        self.tap = tap
        self._buf = ffi.new("uint8_t[]", lib.NET_RX_BUF)
        self.state = ffi.new("struct net_rx *")
        self.state.buf = self._buf
        self.state.hdr_len = HDR_LEN
        self.starved = False
        self._reported_errno = 0

    def configure(self, hdr_len: int, mergeable: bool, guest_csum: bool) -> None:
        self.state.hdr_len = hdr_len
        self.state.mergeable = mergeable
        self.state.guest_csum = guest_csum

    def process(self, queue: Virtqueue) -> Served:
        rc = lib.net_rx_process(queue.native, self.tap, self.state, BUDGET)
        if rc < 0:
            raise QueueBroken("malformed receive queue: the guest broke the ring protocol")
        self.starved = bool(rc & lib.NET_STARVED)
        errno = self.state.last_errno
        if errno and errno != self._reported_errno:
            # A tap that fails reads (deleted under us: EBADFD) would poll readable
            # forever: stop watching it.
            log.error("tap read failed (errno %d); receiving stops", errno)
            self._reported_errno = errno
        return Served(bool(rc & lib.NET_NOTIFY), bool(rc & lib.NET_MORE))

    def wake_fd(self) -> int:
        """The tap, unless a frame waits for buffers or the tap failed."""
        return -1 if self.starved or self._reported_errno else self.tap

    @property
    def counters(self) -> dict:
        s = self.state
        return {"frames": s.frames, "bytes": s.bytes, "dropped": s.dropped,
                "bad_chains": s.bad_chains}


class Transmit:
    def __init__(self, tap: int):
        self.tap = tap
        self.state = ffi.new("struct net_tx *")
        self.state.hdr_len = HDR_LEN

    def configure(self, hdr_len: int) -> None:
        self.state.hdr_len = hdr_len

    def process(self, queue: Virtqueue) -> Served:
        rc = lib.net_tx_process(queue.native, self.tap, self.state, BUDGET)
        if rc < 0:
            raise QueueBroken("malformed transmit queue: the guest broke the ring protocol")
        return Served(bool(rc & lib.NET_NOTIFY), bool(rc & lib.NET_MORE))

    @property
    def counters(self) -> dict:
        s = self.state
        return {"frames": s.frames, "bytes": s.bytes, "dropped": s.dropped,
                "bad_chains": s.bad_chains}

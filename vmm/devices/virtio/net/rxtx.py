"""The virtio-net queues: the Python face of native/netio.c, which moves the frames.

Each queue's worker loop is C too (net_rx_serve, net_tx_serve: the backend library's
`serve` hook, vmm/vhost_user/backend.py), so a frame costs no Python at all.

Receive (queue 0): frames read from the tap (non-blocking) go into the driver's
buffers, several per frame with MRG_RXBUF (num_buffers in the first header). The
worker waits on its kick and on the tap; when the driver has no buffer left for a
waiting frame, the frame is kept and the tap is not watched again until the driver
kicks (adds buffers), so a full ring never spins. Transmit (queue 1): each chain
(header + frame, readable buffers only) is written to the tap with one writev straight
from guest memory. netio.c's header comment lists what is checked; a malformed chain
is completed without effect and counted, never followed. Each direction may have a
rate limiter (native/ratelimit.h): a frame it holds waits in the worker -- on receive
the tap's queue fills behind it, on transmit the ring does.
"""

from ...._virtq import ffi, lib
from ....virtio.queue import QueueBroken, Virtqueue

HDR_LEN, LEGACY_HDR_LEN = lib.NET_HDR_LEN, lib.NET_LEGACY_HDR_LEN


def _check(rc: int, what: str) -> None:
    if rc == -22:       # EINVAL
        raise QueueBroken(f"malformed {what} queue: the guest broke the ring protocol")
    if rc < 0:
        raise OSError(-rc, f"{what} queue worker")


def _counters(stats) -> dict:
    return {"frames": stats.frames, "bytes": stats.bytes, "dropped": stats.dropped,
            "bad_chains": stats.bad_chains, "throttled": stats.throttled}


class Receive:
    def __init__(self, tap: int, limiter=ffi.NULL, stats=None):
        """limiter: a struct rl_limiter * frames are charged to; stats: the struct
        net_stats * they are counted in (both from the device page,
        vmm/virtio/device_page.py, kept alive by the caller); else none and our own."""
        self.tap = tap
        self.stats = stats if stats is not None else ffi.new("struct net_stats *")
        self._buf = ffi.new("uint8_t[]", lib.NET_RX_BUF)
        self.state = ffi.new("struct net_rx *")
        self.state.buf = self._buf
        self.state.hdr_len = HDR_LEN
        self._limiter = limiter           # the struct must live as long as the state
        self.state.limiter = limiter
        self.state.stats = self.stats

    def configure(self, hdr_len: int, mergeable: bool, guest_csum: bool) -> None:
        self.state.hdr_len = hdr_len
        self.state.mergeable = mergeable
        self.state.guest_csum = guest_csum

    def serve(self, queue: Virtqueue, kick: int, call: int, stop: int) -> None:
        """The receive queue's worker loop (net_rx_serve), until `stop` is readable."""
        _check(lib.net_rx_serve(queue.native, self.tap, self.state, kick, call, stop),
               "receive")

    @property
    def starved(self) -> bool:
        """A frame waits for the driver's buffers; the tap is not watched meanwhile."""
        return bool(self.state.starved)

    @property
    def counters(self) -> dict:
        return _counters(self.stats) | {"errno": self.state.last_errno}


class Transmit:
    def __init__(self, tap: int, limiter=ffi.NULL, stats=None):
        """limiter, stats: as Receive's."""
        self.tap = tap
        self.stats = stats if stats is not None else ffi.new("struct net_stats *")
        self.state = ffi.new("struct net_tx *")
        self.state.hdr_len = HDR_LEN
        self._limiter = limiter           # the struct must live as long as the state
        self.state.limiter = limiter
        self.state.stats = self.stats

    def configure(self, hdr_len: int) -> None:
        self.state.hdr_len = hdr_len

    def serve(self, queue: Virtqueue, kick: int, call: int, stop: int) -> None:
        """The transmit queue's worker loop (net_tx_serve), until `stop` is readable."""
        _check(lib.net_tx_serve(queue.native, self.tap, self.state, kick, call, stop),
               "transmit")

    @property
    def counters(self) -> dict:
        return _counters(self.stats) | {"errno": self.state.last_errno}

"""The virtio-vsock device (virtio 1.2, 5.10), device ID 19: queues rx (0, packets for
the guest), tx (1, packets from it) and event (2, never used: we send no events, and
the guest's buffers stay with us); configuration space: guest_cid (le64). Features:
VERSION_1 and INDIRECT_DESC; stream sockets only (no SEQPACKET). The streams
themselves are muxer.py's.
"""

import struct

from ....virtio.queue import Served, Virtqueue
from .muxer import RX, TX, Muxer

VIRTIO_ID_VSOCK = 19
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
CONFIG_SIZE = 8
QUEUE_SIZE = 256
MAX_QUEUE_SIZE = 1024


class VsockDevice:
    num_queues = 3
    max_queue_size = MAX_QUEUE_SIZE
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC

    def __init__(self, muxer: Muxer):
        self.muxer = muxer
        self.wake_fds = muxer.wake_fds

    def config(self) -> bytes:
        return struct.pack("<Q", self.muxer.guest_cid)

    def process(self, queue: Virtqueue) -> Served:
        if queue.index == RX:
            return self.muxer.fill_rx(queue)
        if queue.index == TX:
            return self.muxer.handle_tx(queue)
        return Served(False, False)

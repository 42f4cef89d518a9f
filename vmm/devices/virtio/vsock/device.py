"""The virtio-vsock device (virtio 1.2, 5.10), device ID 19: queues rx (0, packets for
the guest), tx (1, packets from it) and event (2); configuration space: guest_cid
(le64). Features: VERSION_1 and INDIRECT_DESC; stream sockets only (no SEQPACKET). The
streams themselves are muxer.py's.

The one event sent is TRANSPORT_RESET, by a backend that replaces one that died
(vmm/restart.py): the streams the guest had open lived in the dead process, so the
guest must drop them (its sockets see a reset) and may connect again at once. The
guest's other event buffers stay with us.
"""

import struct

from ....virtio import iov
from ....virtio.queue import Served, Virtqueue
from .muxer import EVENT, RX, TX, Muxer

VIRTIO_ID_VSOCK = 19
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
CONFIG_SIZE = 8
QUEUE_SIZE = 256
MAX_QUEUE_SIZE = 1024
TRANSPORT_RESET = struct.pack("<I", 0)        # struct virtio_vsock_event, id 0


class VsockDevice:
    num_queues = 3
    max_queue_size = MAX_QUEUE_SIZE
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC

    def __init__(self, muxer: Muxer, restarted: bool = False):
        self.muxer = muxer
        self.wake_fds = muxer.wake_fds
        self.reset_pending = restarted

    def config(self) -> bytes:
        return struct.pack("<Q", self.muxer.guest_cid)

    def process(self, queue: Virtqueue) -> Served:
        if queue.index == RX:
            return self.muxer.fill_rx(queue)
        if queue.index == TX:
            return self.muxer.handle_tx(queue)
        if queue.index == EVENT and self.reset_pending:
            chain = queue.pop()
            if chain is not None:
                self.reset_pending = False
                queue.push(chain.head, iov.write(chain.writable, TRANSPORT_RESET))
                return Served(True, False)
        return Served(False, False)

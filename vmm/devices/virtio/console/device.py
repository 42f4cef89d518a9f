"""The virtio-console device (virtio 1.2, 5.3): one port, no MULTIPORT, so the guest's
driver makes it /dev/hvc0. receiveq0 (queue 0) carries client input to the guest,
transmitq0 (queue 1) the guest's output; the host side is port.py.

Features: VERSION_1 and INDIRECT_DESC. Not F_SIZE: a client on a unix socket has no
window size to report, and a fixed one would be a lie. Not EMERG_WRITE. The
configuration space (cols, rows, max_nr_ports, emerg_wr) reads as zeros.
"""

from ....virtio import iov
from ....virtio.queue import Served, Virtqueue
from .port import RX, TX, Port

VIRTIO_ID_CONSOLE = 3
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
CONFIG_SIZE = 12
QUEUE_SIZE = 256
MAX_QUEUE_SIZE = 1024


class ConsoleDevice:
    num_queues = 2
    max_queue_size = MAX_QUEUE_SIZE
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC

    def __init__(self, port: Port):
        self.port = port
        self.wake_fds = port.wake_fds

    def config(self) -> bytes:
        return bytes(CONFIG_SIZE)

    def process(self, queue: Virtqueue) -> Served:
        if queue.index == RX:
            return self._receive(queue)
        if queue.index == TX:
            return self._transmit(queue)
        return Served(False, False)

    def _transmit(self, queue: Virtqueue) -> Served:
        """Guest output to the port, while it has room (port.py: backpressure only
        while a client is connected)."""
        port, done = self.port, False
        while True:
            with port.lock:
                if not port.room():
                    break
                chain = queue.pop()
                if chain is None:
                    break
                # A chain larger than the bound (no Linux driver sends one) keeps its
                # first `bound` bytes: a guest cannot make us copy more than that.
                port.write(iov.read(chain.readable, port.bound))
            queue.push(chain.head, 0)
            done = True
        return Served(done and queue.needs_interrupt(), False)

    def _receive(self, queue: Virtqueue) -> Served:
        """Client input into the guest's receive buffers, while it has both."""
        port, done = self.port, False
        while True:
            with port.lock:
                if not port.has_input():
                    break
                chain = queue.pop()
                if chain is None:
                    break           # the next kick (buffers added) brings us back
                count = port.read_into(chain.writable) if chain.writable else 0
            queue.push(chain.head, count)
            done = True
        return Served(done and queue.needs_interrupt(), False)

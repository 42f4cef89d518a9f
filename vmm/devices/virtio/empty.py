"""What fills a virtio-mmio slot that has no device behind it.

- An empty disk slot is a virtio-blk device of capacity 0 (read-only), as StratoVirt
  shows free disk slots, so a disk can later be hot-plugged into the slot the guest
  already knows. It runs in the vm process: its queue sees only what a guest asks of
  an empty disk (udev reading the serial, a flush), answered on the vCPU thread that
  kicked, with no backend process to spend on it. Reads and writes fail with IOERR.
- An empty NIC slot is a virtio-net device whose link is down (STATUS), as the spec's
  "an empty NIC slot drops what the guest sends" asks: what the guest transmits is
  completed and dropped on the vCPU thread that kicked, its receive queue is never
  filled. The guest keeps its ethN names when a tap is plugged later.
- Any other empty slot is device ID 0, which the virtio spec (4.2.2) calls a
  placeholder: Linux's driver skips it without a message.
"""

import logging
import os
import struct

from ...machine.memory import GuestMemory
from ...virtio.queue import QueueBroken, Virtqueue
from .block.attach import QUEUE_SIZE, VIRTIO_ID_BLOCK
from .block.device import CONFIG_SIZE as BLK_CONFIG_SIZE, VIRTIO_BLK_F_RO
from .block.request import S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT
from .net.device import QUEUE_SIZE as NET_QUEUE_SIZE
from .mmio import VIRTIO_F_VERSION_1, DeviceError, Interrupt, QueueSetup, config_bytes

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
VIRTIO_NET_F_STATUS = 1 << 16
NET_CONFIG_SIZE = 12            # mac, status (0: link down), max_virtqueue_pairs, mtu
NET_RX, NET_TX = 0, 1
HEADER = struct.Struct("<IIQ")            # struct virtio_blk_outhdr: type, ioprio, sector


class Placeholder:
    device_id = 0
    features = 0
    queue_sizes: tuple[int, ...] = ()
    uses_ioeventfd = False

    def read_config(self, offset: int, size: int) -> bytes:
        return b""

    def activate(self, features, queues, kicks, interrupt) -> None:
        pass

    def reset(self) -> None:
        pass

    def notify(self, index: int) -> None:
        pass


class EmptyDisk:
    device_id = VIRTIO_ID_BLOCK
    features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO
    queue_sizes = (QUEUE_SIZE,)
    uses_ioeventfd = False

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.config = bytes(BLK_CONFIG_SIZE)          # capacity 0, nothing else offered
        self.queue: Virtqueue | None = None
        self.interrupt: Interrupt | None = None

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt) -> None:
        queue = queues[0]
        if not queue.ready:
            return
        try:
            self.queue = Virtqueue(self.memory.host_regions(), queue.num, queue.desc,
                                   queue.avail, queue.used)
        except ValueError as error:
            raise DeviceError(str(error)) from None
        self.interrupt = interrupt

    def reset(self) -> None:
        self.queue = None

    def notify(self, index: int) -> None:
        if self.queue is None:
            return
        try:
            while (chain := self.queue.pop()) is not None:
                self.queue.push(chain.head, self._answer(chain))
        except QueueBroken as error:
            log.error("empty disk slot: %s", error)
            self.queue = None
            return
        if self.queue.needs_interrupt():
            self.interrupt.trigger()

    @staticmethod
    def _answer(chain) -> int:
        """Bytes written: GET_ID gets an empty serial; I/O fails; flush succeeds."""
        if not chain.writable or not chain.readable:
            return 0
        status = chain.writable[-1][-1:]
        header = b""
        for view in chain.readable:
            header += bytes(view[:HEADER.size - len(header)])
        kind = HEADER.unpack(header)[0] if len(header) == HEADER.size else None
        if kind == T_GET_ID:
            written = chain.writable_bytes
            for view in chain.writable:
                view[:] = bytes(len(view))
        else:
            written = 1
        status[0] = {T_FLUSH: S_OK, T_GET_ID: S_OK, T_IN: S_IOERR, T_OUT: S_IOERR}.get(kind, S_UNSUPP) \
            if kind is not None else S_IOERR
        return written


class EmptyNic:
    device_id = VIRTIO_ID_NET
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_STATUS      # no MAC: the guest picks one
    queue_sizes = (NET_QUEUE_SIZE, NET_QUEUE_SIZE)           # receive, transmit
    uses_ioeventfd = False

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.config = struct.pack("<6sHHH", bytes(6), 0, 1, 0)   # link down
        self.tx: Virtqueue | None = None
        self.interrupt: Interrupt | None = None
        self.dropped = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt) -> None:
        queue = queues[NET_TX]
        if not queue.ready:
            return
        try:
            self.tx = Virtqueue(self.memory.host_regions(), queue.num, queue.desc,
                                queue.avail, queue.used)
        except ValueError as error:
            raise DeviceError(str(error)) from None
        self.interrupt = interrupt

    def reset(self) -> None:
        self.tx = None

    def notify(self, index: int) -> None:
        """Transmitted frames are completed unread; the receive queue keeps its buffers."""
        if index != NET_TX or self.tx is None:
            return
        try:
            while (chain := self.tx.pop()) is not None:
                self.tx.push(chain.head, 0)
                self.dropped += 1
        except QueueBroken as error:
            log.error("empty NIC slot: %s", error)
            self.tx = None
            return
        if self.tx.needs_interrupt():
            self.interrupt.trigger()

"""What fills a virtio-mmio slot that has no device behind it.

- An empty disk slot is a virtio-blk device of capacity 0, as StratoVirt shows free
  disk slots, so a disk can later be hot-plugged into the slot the guest already
  knows. It offers what a writable disk of ours offers (a guest reads the features and
  most of the configuration only when it probes: a slot probed read-only would stay
  read-only after a hot-plug). It runs in the vm process: its queue sees only what a
  guest asks of an empty disk (udev reading the serial, a flush), answered on the vCPU
  thread that kicked, with no backend process to spend on it. Reads and writes fail
  with IOERR. It has as many queues as a disk in that slot would (MQ: one per vCPU,
  layout.disk_queues) and offers EVENT_IDX as a disk does, so the features and queues
  the guest takes at its probe fit every disk plugged in later.
- An empty NIC slot is a virtio-net device whose link is down (STATUS), as the spec's
  "an empty NIC slot drops what the guest sends" asks: what the guest transmits is
  completed and dropped on the vCPU thread that kicked, its receive queue is never
  filled. It offers what every NIC backend of ours offers whatever its tap (mergeable
  receive buffers, the checksum and TSO offloads towards the host), so a hot-plugged
  NIC runs with them; no MAC (the guest picks one when it probes). The guest keeps its
  ethN names when a tap is plugged later.

Both take over the rings a backend leaves when it is unplugged from a live slot, and
hand them to the next one (activate's bases, suspend): mmio.py, replace_device. A ring
the guest broke is served no more: notify() says so with DeviceError, and the transport
logs it (bounded: vmm/log_limit.py).
- Any other empty slot is device ID 0, which the virtio spec (4.2.2) calls a
  placeholder: Linux's driver skips it without a message.
"""

import struct

from ...machine.memory import GuestMemory
from ...virtio.queue import QueueBroken, Virtqueue
from .block.device import QUEUE_SIZE, SECTOR, VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX, \
    WRITABLE_LIMITS, config_space
from .block.device import features as disk_features
from .block.request import S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT
from .net import device as net
from .mmio import VIRTIO_F_VERSION_1, DeviceError, Interrupt, QueueSetup, config_bytes

VIRTIO_ID_NET = 1
NET_RX, NET_TX = 0, 1
NIC_FEATURES = (VIRTIO_F_VERSION_1 | net.VIRTIO_RING_F_INDIRECT_DESC | net.STATUS
                | net.MRG_RXBUF | net.CSUM | net.HOST_TSO4 | net.HOST_TSO6)
HEADER = struct.Struct("<IIQ")            # struct virtio_blk_outhdr: type, ioprio, sector
DISCARD_ALIGNMENT = 8                     # sectors: a 4 KiB file system block


def _queue(memory: GuestMemory, queue: QueueSetup, base: int,
           event_idx: bool = False) -> Virtqueue:
    try:
        ring = Virtqueue(memory.host_regions(), queue.num, queue.desc, queue.avail,
                         queue.used, base)
    except ValueError as error:
        raise DeviceError(str(error)) from None
    ring.event_idx = event_idx
    ring.want_notifications()
    return ring


class Placeholder:
    device_id = 0
    features = 0
    queue_sizes: tuple[int, ...] = ()
    uses_ioeventfd = False

    def read_config(self, offset: int, size: int) -> bytes:
        return b""

    def activate(self, features, queues, kicks, interrupt, bases) -> None:
        pass

    def suspend(self) -> list[int]:
        return []

    def reset(self) -> None:
        pass

    def notify(self, index: int) -> None:
        pass


class EmptyDisk:
    device_id = VIRTIO_ID_BLOCK
    uses_ioeventfd = False
    # One queue's; an instance with more queues has its own.
    features = disk_features(False, 1)
    queue_sizes = (QUEUE_SIZE,)
    config = config_space(0, SECTOR, WRITABLE_LIMITS, DISCARD_ALIGNMENT)

    def __init__(self, memory: GuestMemory, num_queues: int = 1):
        self.memory = memory
        self.features = disk_features(False, num_queues)
        self.queue_sizes = (QUEUE_SIZE,) * num_queues
        self.config = config_space(0, SECTOR, WRITABLE_LIMITS, DISCARD_ALIGNMENT, num_queues)
        self.queues: list[Virtqueue | None] = [None] * num_queues
        self.bases = [0] * num_queues
        self.interrupt: Interrupt | None = None

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt, bases: list[int]) -> None:
        self.bases = list(bases)
        event_idx = bool(features & VIRTIO_RING_F_EVENT_IDX)
        self.queues = [_queue(self.memory, queue, base, event_idx) if queue.ready else None
                       for queue, base in zip(queues, bases)]
        self.interrupt = interrupt

    def suspend(self) -> list[int]:
        for index, queue in enumerate(self.queues):
            if queue is not None and not queue.broken:
                self.bases[index] = queue.last_avail_idx
        self.queues = [None] * len(self.queue_sizes)
        return list(self.bases)

    def reset(self) -> None:
        self.queues = [None] * len(self.queue_sizes)
        self.bases = [0] * len(self.queue_sizes)

    def notify(self, index: int) -> None:
        queue = self.queues[index] if index < len(self.queues) else None
        if queue is None:
            return
        served = False
        try:
            while True:
                while (chain := queue.pop()) is not None:
                    queue.push(chain.head, self._answer(chain))
                    served = True
                # Kicks on again (avail_event with EVENT_IDX), then a last look.
                queue.want_notifications()
                if not queue.pending():
                    break
        except QueueBroken as error:
            self.queues[index] = None
            raise DeviceError(str(error)) from None
        if served and queue.needs_interrupt():
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
    features = NIC_FEATURES
    queue_sizes = (net.QUEUE_SIZE, net.QUEUE_SIZE)             # receive, transmit
    uses_ioeventfd = False
    config = net.CONFIG.pack(bytes(6), 0, 1, 0)                # link down

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.tx: Virtqueue | None = None
        self.bases = [0, 0]           # receive: never consumed here, kept for the next
        self.interrupt: Interrupt | None = None
        self.dropped = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt, bases: list[int]) -> None:
        self.bases = list(bases)
        if queues[NET_TX].ready:
            self.tx = _queue(self.memory, queues[NET_TX], bases[NET_TX])
        self.interrupt = interrupt

    def suspend(self) -> list[int]:
        if self.tx is not None and not self.tx.broken:
            self.bases[NET_TX] = self.tx.last_avail_idx
        self.tx = None
        return list(self.bases)

    def reset(self) -> None:
        self.tx = None
        self.bases = [0, 0]

    def notify(self, index: int) -> None:
        """Transmitted frames are completed unread; the receive queue keeps its buffers."""
        if index != NET_TX or self.tx is None:
            return
        try:
            while (chain := self.tx.pop()) is not None:
                self.tx.push(chain.head, 0)
                self.dropped += 1
        except QueueBroken as error:
            self.tx = None
            raise DeviceError(str(error)) from None
        if self.tx.needs_interrupt():
            self.interrupt.trigger()

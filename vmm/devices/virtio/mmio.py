"""The virtio-mmio transport, version 2 (modern only), for one slot.

The register file of the virtio 1.2 spec (section 4.2.2) in front of a device model
(see `VirtioDevice`). The data path does not come through here: each queue's QueueNotify
write is matched by a KVM ioeventfd that wakes the device's backend directly, and the
backend's used-buffer notifications go to an eventfd that KVM turns into the slot's
interrupt (irqfd). Only register reads and writes, which are rare, exit to this code.

Because interrupts bypass this process, we cannot know when one was for used buffers:
InterruptStatus reads with the used-buffer bit set while the device is live, as
Firecracker does for its vhost-user devices. Linux's handler then checks every queue of
the device, which is what it would do anyway for a shared line. The configuration-change
bit is ours and is exact.

A device that breaks (a ring the guest placed outside RAM, a backend that died) gets
DEVICE_NEEDS_RESET and a configuration-change interrupt; the guest's driver decides.
What the guest gets wrong is logged through vmm/log_limit.py, keyed by the slot's name:
a guest that does it in a loop gets a few lines and then summaries.

Hot-plug replaces the device behind a slot (replace_device): the guest's driver keeps
the slot and the features it negotiated; a live slot's rings move to the new device
where the old one stopped (each queue's next available index), kicks are routed to
wherever the new device takes them (an ioeventfd for a backend, an exit for an empty
slot), and a configuration-change interrupt makes the driver read the configuration
again (a disk's capacity, a NIC's link).
"""

import logging
import os
import threading
from dataclasses import dataclass
from typing import Protocol

from ...log_limit import guest
from ...machine.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

MAGIC = 0x74726976                 # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551             # "QEMU", as QEMU, Firecracker and StratoVirt answer

# Register offsets.
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID_REG = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits.
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80

INT_VRING, INT_CONFIG = 1, 2

VIRTIO_F_VERSION_1 = 1 << 32
# What this transport can carry: the device-specific bits 0..23, indirect descriptors,
# EVENT_IDX and VERSION_1. Packed rings, notification data, ring reset and the rest are
# masked off whatever the backend offers.
TRANSPORT_FEATURES = (1 << 24) - 1 | 1 << 28 | 1 << 29 | VIRTIO_F_VERSION_1


class DeviceError(Exception):
    """The device cannot go live (or stay live); the message says why."""


@dataclass
class QueueSetup:
    """One queue as the driver configured it (guest physical addresses)."""
    size: int
    num: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0


class VirtioDevice(Protocol):
    """What the transport needs from a device model."""
    device_id: int          # 0: an empty slot the guest driver skips
    features: int
    queue_sizes: tuple[int, ...]
    uses_ioeventfd: bool    # notifications go straight to a backend (else notify())

    def read_config(self, offset: int, size: int) -> bytes: ...
    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: "Interrupt", bases: list[int]) -> None:
        """Start the ready queues, each at its next available index in `bases`."""
    def suspend(self) -> list[int]:
        """Stop serving a live device's queues; each queue's next available index.
        Every chain taken from a ring has been completed when it returns."""
    def reset(self) -> None: ...
    def notify(self, index: int) -> None:
        """A kick for a device served here; DeviceError when the ring is broken (the
        device stops serving it, the transport logs it)."""


class Interrupt:
    """The slot's interrupt line: an eventfd that KVM routes to the slot's GSI."""

    def __init__(self, vm, gsi: int):
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)


class MmioTransport:
    def __init__(self, name: str, base: int, gsi: int, device: VirtioDevice, vm,
                 memory: GuestMemory):
        self.name = name
        self.base = base
        self.device = device
        self.memory = memory
        self.interrupt = Interrupt(vm, gsi)
        self.vm = vm
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in device.queue_sizes]
        if device.uses_ioeventfd:
            self._route_kicks(True)
        self._lock = threading.Lock()
        self._reset_state()

    @property
    def who(self) -> str:
        """The slot and what is in it, for log lines: "disk slot 1 (disk hp1)"."""
        device = getattr(self.device, "name", None)
        return f"{self.name} ({device})" if device else self.name

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.queues = [QueueSetup(size) for size in self.device.queue_sizes]
        self.interrupt_status = 0
        self.config_generation = 0
        self.live = False

    # The bus calls these from vCPU threads.

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                return 0
            return self._read_register(offset) & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset >= CONFIG:
                return          # no device here has a writable configuration space
            if size != 4 or offset % 4:
                return
            self._write_register(offset, value)

    def _read_config(self, offset: int, size: int) -> int:
        config = self.device.read_config(offset, size)
        return int.from_bytes(config.ljust(size, b"\0"), "little")

    def _queue(self) -> QueueSetup | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _read_register(self, offset: int) -> int:
        queue = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device.features >> (32 * self.device_features_sel) \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return queue.size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status | (INT_VRING if self.live else 0)
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF            # no shared memory regions: length ~0
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        queue = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & FEATURES_OK or self.driver_features_sel > 1:
                return
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | value << shift
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            if self.live and not self.device.uses_ioeventfd and value < len(self.queues):
                self._notify(self.device, value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._set_status(value)
        elif queue is not None and not queue.ready and not self.status & DRIVER_OK:
            self._write_queue(queue, offset, value)

    def _write_queue(self, queue: QueueSetup, offset: int, value: int) -> None:
        low = lambda old: (old & ~0xFFFFFFFF) | value
        high = lambda old: (old & 0xFFFFFFFF) | value << 32
        if offset == QUEUE_NUM:
            queue.num = value
        elif offset == QUEUE_READY:
            queue.ready = bool(value & 1)
        elif offset == QUEUE_DESC_LOW:
            queue.desc = low(queue.desc)
        elif offset == QUEUE_DESC_HIGH:
            queue.desc = high(queue.desc)
        elif offset == QUEUE_DRIVER_LOW:
            queue.avail = low(queue.avail)
        elif offset == QUEUE_DRIVER_HIGH:
            queue.avail = high(queue.avail)
        elif offset == QUEUE_DEVICE_LOW:
            queue.used = low(queue.used)
        elif offset == QUEUE_DEVICE_HIGH:
            queue.used = high(queue.used)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        value &= 0xFF
        if value & ~self.status & FEATURES_OK:
            wanted = self.driver_features
            if wanted & ~self.device.features or not wanted & VIRTIO_F_VERSION_1:
                guest.warning(log, self.name, "refused features", "%s: the driver asked for "
                              "features %#x of %#x; FEATURES_OK refused", self.who, wanted,
                              self.device.features)
                value &= ~FEATURES_OK
        if value & ~self.status & DRIVER_OK:
            if not value & FEATURES_OK:
                value &= ~DRIVER_OK
            else:
                self.status = value
                self._activate()
                return
        self.status = value | (self.status & DEVICE_NEEDS_RESET)

    def _activate(self) -> None:
        try:
            for index, queue in enumerate(self.queues):
                if queue.ready:
                    self._check_queue(index, queue)
        except DeviceError as error:
            self.break_device(str(error), "misprogrammed queue")
            return
        try:
            self._start(self.device, [0] * len(self.queues))
        except DeviceError as error:
            self.break_device(str(error), "failed start")
            return
        self.live = True

    def _start(self, device: VirtioDevice, bases: list[int]) -> None:
        """The driver's features as far as `device` has them (a hot-plugged device may
        lack some the slot's first device offered: docs/hotplug.md)."""
        device.activate(self.driver_features & device.features, self.queues, self.kicks,
                        self.interrupt, bases)

    def replace_device(self, device: VirtioDevice) -> VirtioDevice:
        """Put `device` in this slot and return the one it replaces (the caller closes
        it). DeviceError if the new device cannot take over a live slot's rings; the
        old one then stays, serving again."""
        with self._lock:
            old = self.device
            if old.queue_sizes != device.queue_sizes:
                raise DeviceError(f"{self.name}: a device with other queues cannot replace "
                                  "this one")
            if not self.live:
                self._switch(old, device)
                return old
            try:
                bases = old.suspend()
            except DeviceError as error:
                bases = self._used_indexes()
                log.error("%s: %s; the next device starts each ring where the guest has "
                          "seen it completed", self.who, error)
            self._switch(old, device)
            try:
                self._start(device, bases)
            except DeviceError:
                self._switch(device, old)
                self._start(old, bases)
                self._kick_ready(old)
                raise
            self._kick_ready(device)
            self._config_changed()
            return old

    def backend_restarted(self, connection) -> None:
        """The device's backend process died and the launcher forked another
        (vmm/restart.py): the device takes the new connection, and a live slot's rings
        start again where the guest has seen them completed (a backend that keeps the
        in-flight region resubmits what was in flight itself). Each ready queue is
        kicked once and the interrupt raised once, for a kick or an interrupt the dead
        backend swallowed: both are harmless when spurious. The guest is not told."""
        with self._lock:
            self.device.reconnect(connection)
            if self.live:
                self._start(self.device, self._used_indexes())
                self._kick_ready(self.device)
                self.interrupt.trigger()

    def _used_indexes(self) -> list[int]:
        """Where each ring's used index stands: the next available index of a device
        that completed in order, which is all a dead backend leaves to go by (QEMU does
        the same when GET_VRING_BASE fails). Requests it took and never completed are
        then taken again by the next device."""
        indexes = []
        for queue in self.queues:
            try:
                used = int.from_bytes(self.memory.read(queue.used + 2, 2), "little") \
                    if queue.ready else 0
            except GuestMemoryError:
                used = 0
            indexes.append(used)
        return indexes

    def _switch(self, old: VirtioDevice, new: VirtioDevice) -> None:
        self.device = new
        if old.uses_ioeventfd != new.uses_ioeventfd:
            self._route_kicks(new.uses_ioeventfd)
            self._drain_kicks()

    def _route_kicks(self, ioeventfd: bool) -> None:
        """QueueNotify as an ioeventfd per queue (a backend waits on it) or as an exit
        to this process (a device served here)."""
        for index, kick in enumerate(self.kicks):
            self.vm.ioeventfd(kick, self.base + QUEUE_NOTIFY, 4, index, assign=ioeventfd)

    def _kick_ready(self, device: VirtioDevice) -> None:
        """A kick the driver sent while the slot changed hands went to the old device's
        route: every ready queue is kicked once (a spurious kick costs one look)."""
        for index, queue in enumerate(self.queues):
            if queue.ready:
                if device.uses_ioeventfd:
                    os.eventfd_write(self.kicks[index], 1)
                else:
                    self._notify(device, index)

    def _notify(self, device: VirtioDevice, index: int) -> None:
        """A kick for a device served in this process."""
        try:
            device.notify(index)
        except DeviceError as error:
            guest.error(log, self.name, "broken ring", "%s: queue %d: %s", self.who, index,
                        error)

    def _config_changed(self) -> None:
        self.interrupt_status |= INT_CONFIG
        self.config_generation += 1
        self.interrupt.trigger()

    def _check_queue(self, index: int, queue: QueueSetup) -> None:
        num = queue.num
        if not (0 < num <= queue.size and num & (num - 1) == 0):
            raise DeviceError(f"queue {index}: size {num}; allowed a power of 2 up to {queue.size}")
        for what, address, length, align in (("descriptor table", queue.desc, 16 * num, 16),
                                             ("available ring", queue.avail, 6 + 2 * num, 2),
                                             ("used ring", queue.used, 6 + 8 * num, 4)):
            if address % align:
                raise DeviceError(f"queue {index}: {what} at {address:#x} is not {align}-byte aligned")
            try:
                self.memory.translate(address, length)
            except GuestMemoryError:
                raise DeviceError(f"queue {index}: {what} at {address:#x} is outside guest RAM") from None

    def break_device(self, why: str, kind: str) -> None:
        """DEVICE_NEEDS_RESET and a configuration-change interrupt, for what the guest
        did (`kind`, as log_limit counts it). Caller holds the lock (or is the transport
        itself)."""
        guest.error(log, self.name, kind, "%s: %s; the device needs a reset", self.who, why)
        self.status |= DEVICE_NEEDS_RESET
        self._config_changed()

    def _reset(self) -> None:
        if self.live or self.status:
            try:
                self.device.reset()
            except DeviceError as error:
                guest.error(log, self.name, "failed reset", "%s: reset: %s", self.who, error)
        self._drain_kicks()           # kicks from before the reset mean nothing now
        self._reset_state()

    def _drain_kicks(self) -> None:
        for kick in self.kicks:
            try:
                os.eventfd_read(kick)
            except BlockingIOError:
                pass


def config_bytes(config: bytes, offset: int, size: int) -> bytes:
    """A configuration-space read of `size` bytes at `offset`; past the end reads zero."""
    return config[offset:offset + size]


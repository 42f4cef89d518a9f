"""Hot-plug at the transport: a live disk slot changing hands between its empty device
and a real backend process (forked and confined as the launcher forks it), with the
guest's driver played from here (tests/unit/test_virtio_mmio.py's way: registers written
as a vCPU would, kicks written to the queue's eventfd as KVM would).

What must hold (docs/hotplug.md): the driver keeps its ring; a new device starts where
the old one stopped; every request the driver made available is completed exactly once,
by one device or the other, whatever was in flight when the slot changed hands; the
guest is told by a configuration-change interrupt; a backend that died leaves a slot
that can still be emptied.
"""

import os
import signal
import socket
import struct
import time

import pytest

from vmm import children
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.block import main as block_main
from vmm.devices.virtio.block.device import BASE_FEATURES, VIRTIO_BLK_F_RO
from vmm.devices.virtio.empty import EmptyDisk
from vmm.devices.virtio.mmio import DeviceError
from vmm.devices.virtio.vhost_user_device import VhostUserDevice
from tests.unit.test_virtio_mmio import MiB, driver_init, memory, reg, vm  # noqa: F401

pytestmark = pytest.mark.needs_kvm

NUM = 128                         # room for 42 requests of 3 descriptors
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
SLOTS_AT = 0x100000               # request i: header, status, then 4 KiB of data
T_IN, T_OUT = 0, 1
S_OK, S_IOERR = 0, 1


class Ring:
    """The driver's side of one split ring with room for NUM requests at once; its
    rings and buffers are `at` bytes above the usual addresses (a second slot's)."""

    def __init__(self, memory, at: int = 0):
        self.memory = memory
        self.at = at
        self.desc, self.avail, self.used = DESC + at, AVAIL + at, USED + at
        self.avail_idx = 0
        self.used_seen = 0
        for address, length in ((self.desc, 16 * NUM), (self.avail, 6 + 2 * NUM),
                                (self.used, 6 + 8 * NUM)):
            memory.fill(address, length)

    @property
    def queue(self):
        return NUM, self.desc, self.avail, self.used

    def _at(self, slot):
        base = SLOTS_AT + self.at + slot * 0x2000
        return base, base + 0x100, base + 0x1000          # header, status, data

    def post(self, kind, sector, slot, data=None):
        """Request `slot` (its descriptors 3*slot..3*slot+2) made available, no kick."""
        header, status, buffer = self._at(slot)
        self.memory.write(header, struct.pack("<IIQ", kind, 0, sector))
        self.memory.write(status, b"\xff")
        if data is not None:
            self.memory.write(buffer, data)
        chain = [(header, 16, 0), (buffer, 4096, 0 if kind == T_OUT else 2), (status, 1, 2)]
        for i, (address, length, flags) in enumerate(chain):
            index = 3 * slot + i
            more = 1 if i < 2 else 0
            self.memory.write(self.desc + 16 * index,
                              struct.pack("<QIHH", address, length, flags | more, index + 1))
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % NUM),
                          struct.pack("<H", 3 * slot))
        self.avail_idx += 1
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    def reap(self, count, timeout=10.0) -> dict[int, int]:
        """The next `count` completions: request slot -> status byte."""
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            assert time.monotonic() < deadline, f"{self.used_idx() - self.used_seen} of {count}"
            time.sleep(0.002)
        done = {}
        for _ in range(count):
            head, _ = struct.unpack("<II", self.memory.read(
                self.used + 4 + 8 * (self.used_seen % NUM), 8))
            self.used_seen += 1
            assert head % 3 == 0 and head // 3 not in done, f"head {head} completed twice"
            done[head // 3] = self.memory.read(self._at(head // 3)[1], 1)[0]
        return done

    def data(self, slot) -> bytes:
        return self.memory.read(self._at(slot)[2], 4096)


def backend_device(memory, image, read_only=False):
    disk = os.open(image, os.O_RDONLY if read_only else os.O_RDWR)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = children.spawn("vmm-blk-swap", "blk-swap", [disk, theirs.fileno()],
                             lambda: block_main.serve_disk(disk, theirs, read_only, False, None,
                                                           seccomp=True))
    os.close(disk)
    theirs.close()
    return VhostUserDevice("disk swap", 2, ours, memory, (256,), 60), backend


@pytest.fixture
def slot(vm, memory):
    """A disk slot, empty, brought up by the driver with every feature it offers."""
    transport = M.MmioTransport("disk slot 1", 0xD000_1000, 6, EmptyDisk(memory), vm, memory)
    ring = Ring(memory)
    assert driver_init(transport, queue=ring.queue) & M.DRIVER_OK
    return transport, ring


def kick(transport):
    """What the guest's QueueNotify write does, whichever way it is routed."""
    if transport.device.uses_ioeventfd:
        os.eventfd_write(transport.kicks[0], 1)
    else:
        reg(transport, M.QUEUE_NOTIFY, 0)


def capacity(transport) -> int:
    return int.from_bytes(bytes(transport.read(M.CONFIG + i, 1) for i in range(8)), "little")


def image_file(tmp_path, name, size=4 * MiB, byte=0):
    path = tmp_path / name
    path.write_bytes(bytes([byte]) * size)
    return path


def test_an_empty_slot_offers_what_a_writable_disk_does(slot):
    transport, _ = slot
    assert transport.driver_features & VIRTIO_BLK_F_RO == 0
    assert transport.driver_features & BASE_FEATURES == BASE_FEATURES
    assert capacity(transport) == 0


def test_plug_into_a_live_slot_then_unplug_with_requests_in_flight(slot, memory, tmp_path):
    transport, ring = slot
    ring.post(T_IN, 0, 0)
    kick(transport)
    assert ring.reap(1) == {0: S_IOERR}                      # the empty disk's answer
    generation = reg(transport, M.CONFIG_GENERATION)
    image = image_file(tmp_path, "a.img")
    device, backend = backend_device(memory, image)
    try:
        old = transport.replace_device(device)
        assert isinstance(old, EmptyDisk)
        assert reg(transport, M.INTERRUPT_STATUS) & M.INT_CONFIG
        assert reg(transport, M.CONFIG_GENERATION) == generation + 1
        assert capacity(transport) == 4 * MiB // 512
        reg(transport, M.INTERRUPT_ACK, M.INT_CONFIG)
        # The ring goes on where the empty disk left it: index 1.
        ring.post(T_OUT, 16, 1, bytes([7]) * 4096)
        kick(transport)
        assert ring.reap(1) == {1: S_OK}
        assert image.read_bytes()[16 * 512:16 * 512 + 4096] == bytes([7]) * 4096
        # Many writes in flight, and the slot empties under them: each completes once,
        # by the backend (on the image) or by the empty disk (IOERR), none is lost.
        for request in range(2, 2 + 40):
            ring.post(T_OUT, 8 * request, request, bytes([request]) * 4096)
        kick(transport)
        transport.replace_device(EmptyDisk(memory)).close()
        done = ring.reap(40)
        assert set(done) == set(range(2, 42)) and set(done.values()) <= {S_OK, S_IOERR}
        written = image.read_bytes()
        for request, status in done.items():
            on_disk = written[8 * request * 512:8 * request * 512 + 4096]
            if status == S_OK:
                assert on_disk == bytes([request]) * 4096, request
        assert reg(transport, M.INTERRUPT_STATUS) & M.INT_CONFIG and capacity(transport) == 0
        ring.post(T_IN, 0, 0)                      # request 0's descriptors are free again
        kick(transport)
        assert ring.reap(1) == {0: S_IOERR}
        backend.reap(block=True)                   # its connection closed: it ended
        assert os.WIFEXITED(backend.status)
    finally:
        backend.kill()


def test_a_second_image_in_the_same_slot_is_read(slot, memory, tmp_path):
    transport, ring = slot
    for round_, byte in enumerate((0x11, 0x22)):
        device, backend = backend_device(memory, image_file(tmp_path, f"{byte}.img", byte=byte))
        try:
            transport.replace_device(device)
            ring.post(T_IN, 0, round_)
            kick(transport)
            assert ring.reap(1) == {round_: S_OK} and ring.data(round_) == bytes([byte]) * 4096
            transport.replace_device(EmptyDisk(memory)).close()
            backend.reap(block=True)
        finally:
            backend.kill()


def test_a_dead_backend_leaves_a_slot_that_can_be_emptied(slot, memory, tmp_path):
    transport, ring = slot
    device, backend = backend_device(memory, image_file(tmp_path, "d.img"))
    try:
        transport.replace_device(device)
        ring.post(T_IN, 0, 0)
        kick(transport)
        assert ring.reap(1) == {0: S_OK}
        os.kill(backend.pid, signal.SIGKILL)
        backend.reap(block=True)
        ring.post(T_IN, 0, 1)                       # made available, never served
        transport.replace_device(EmptyDisk(memory)).close()
        # The empty disk starts where the guest saw completions: request 1 is answered.
        assert ring.reap(1) == {1: S_IOERR}
    finally:
        backend.kill()


class Refusing:
    """A device that cannot take over the rings (a backend that refuses them)."""
    device_id = 2
    features = EmptyDisk.features
    queue_sizes = EmptyDisk.queue_sizes
    uses_ioeventfd = True

    def activate(self, *args):
        raise DeviceError("the backend refused the rings")


def test_a_device_that_cannot_take_the_rings_leaves_the_old_one_serving(slot, memory):
    transport, ring = slot
    old = transport.device
    with pytest.raises(DeviceError, match="refused"):
        transport.replace_device(Refusing())
    assert transport.device is old and transport.live
    ring.post(T_IN, 0, 0)
    kick(transport)
    assert ring.reap(1) == {0: S_IOERR}


def test_plugging_one_slot_does_not_disturb_io_on_another(slot, vm, memory, tmp_path):
    """Slot 1 changes hands ten times while slot 2's disk, on rings of its own in the same
    guest memory, serves writes without a break."""
    import threading

    transport, _ = slot
    other = M.MmioTransport("disk slot 2", 0xD000_2000, 7, EmptyDisk(memory), vm, memory)
    ring2 = Ring(memory, at=0x400000)
    assert driver_init(other, queue=ring2.queue) & M.DRIVER_OK
    busy, busy_backend = backend_device(memory, image_file(tmp_path, "busy.img"))
    other.replace_device(busy)
    statuses, stop = [], threading.Event()

    def io():
        sector = 0
        while not stop.is_set():
            for request in range(8):
                ring2.post(T_OUT, sector + 8 * request, request, bytes([request + 1]) * 4096)
            kick(other)
            statuses.extend(ring2.reap(8).values())
            sector = (sector + 64) % 4096
    worker = threading.Thread(target=io)
    try:
        worker.start()
        for round_ in range(10):
            device, backend = backend_device(memory, image_file(tmp_path, f"{round_}.img"))
            try:
                transport.replace_device(device)
                transport.replace_device(EmptyDisk(memory)).close()
                backend.reap(block=True)
            finally:
                backend.kill()
        stop.set()
        worker.join(30)
        assert not worker.is_alive() and len(statuses) >= 8
        assert set(statuses) == {S_OK}
    finally:
        stop.set()
        busy_backend.kill()

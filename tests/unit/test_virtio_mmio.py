"""The virtio-mmio transport driven register by register, as a guest driver would, on a
real KVM VM (its ioeventfds and irqfd really registered) with a real virtio-blk backend
process forked the way the launcher forks it. Only the guest is played from here: what
a vCPU would write to the registers, and a kick on the queue's eventfd, which is what
KVM does when the guest writes QueueNotify."""

import os
import socket
import struct
import time

import pytest

from vmm import children
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.block import main as block_main
from vmm.devices.virtio.empty import EmptyDisk, Placeholder
from vmm.devices.virtio.vhost_user_device import VhostUserDevice
from vmm.machine.kvm import Kvm, open_kvm
from vmm.machine.memory import GuestMemory, create_memfd

pytestmark = pytest.mark.needs_kvm

MiB = 1 << 20
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
HEADER, DATA, STATUS = 0x20000, 0x21000, 0x30000
NUM = 16
VIRTIO_BLK_F_RO, VIRTIO_BLK_F_FLUSH = 1 << 5, 1 << 9


@pytest.fixture
def vm():
    kvm = Kvm(open_kvm())
    vm = kvm.create_vm()
    vm.create_irqchip()
    yield vm
    os.close(vm.fd)
    os.close(kvm.fd)


@pytest.fixture
def memory(vm):
    memory = GuestMemory(create_memfd(32 * MiB), 32 * MiB)
    vm.set_memory_region(0, 0, 32 * MiB, memory.host_address())
    yield memory


def disk_transport(vm, memory, tmp_path, read_only=False, size=1 * MiB):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(size))
    disk = os.open(image, os.O_RDONLY if read_only else os.O_RDWR)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = children.spawn("vmm-blk-test", "blk-test", [disk, theirs.fileno()],
                             lambda: block_main.serve_disk(disk, theirs, read_only, False, "sn-1",
                                                                  seccomp=True))
    os.close(disk)
    theirs.close()
    device = VhostUserDevice("disk test", 2, ours, memory, (256,), 60)
    transport = M.MmioTransport("disk test", 0xD000_0000, 5, device, vm, memory)
    return transport, backend, image


def reg(transport, offset, value=None):
    if value is None:
        return transport.read(offset, 4)
    transport.write(offset, 4, value)


def driver_init(transport, features=None, queue=(NUM, DESC, AVAIL, USED)) -> int:
    """The driver's side of virtio 1.2 3.1.1, up to DRIVER_OK; the status read back."""
    reg(transport, M.STATUS, M.ACKNOWLEDGE)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER)
    offered = 0
    for half in (0, 1):
        reg(transport, M.DEVICE_FEATURES_SEL, half)
        offered |= reg(transport, M.DEVICE_FEATURES) << (32 * half)
    wanted = offered if features is None else features
    for half in (0, 1):
        reg(transport, M.DRIVER_FEATURES_SEL, half)
        reg(transport, M.DRIVER_FEATURES, (wanted >> (32 * half)) & 0xFFFFFFFF)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK)
    if not reg(transport, M.STATUS) & M.FEATURES_OK:
        return reg(transport, M.STATUS)
    num, desc, avail, used = queue
    reg(transport, M.QUEUE_SEL, 0)
    assert reg(transport, M.QUEUE_NUM_MAX) >= num
    reg(transport, M.QUEUE_NUM, num)
    for low, address in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail),
                         (M.QUEUE_DEVICE_LOW, used)):
        reg(transport, low, address & 0xFFFFFFFF)
        reg(transport, low + 4, address >> 32)
    reg(transport, M.QUEUE_READY, 1)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK | M.DRIVER_OK)
    return reg(transport, M.STATUS)


class Ring:
    """The guest's side of one split ring in `memory`."""

    def __init__(self, memory):
        self.memory = memory
        self.avail_idx = 0
        self.used_seen = 0
        for address, length in ((DESC, 16 * NUM), (AVAIL, 6 + 2 * NUM), (USED, 6 + 8 * NUM)):
            memory.fill(address, length)

    def request(self, kind, sector, data_len, data_writable):
        """One virtio-blk request: header, data, status byte; descriptors 0..2."""
        self.memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        self.memory.write(STATUS, b"\xff")
        chain = [(HEADER, 16, 0), (DATA, data_len, 2 if data_writable else 0), (STATUS, 1, 2)]
        if not data_len:
            chain.pop(1)
        for i, (address, length, flags) in enumerate(chain):
            more = 1 if i < len(chain) - 1 else 0
            self.memory.write(DESC + 16 * i, struct.pack("<QIHH", address, length, flags | more, i + 1))
        self.memory.write(AVAIL + 4 + 2 * (self.avail_idx % NUM), struct.pack("<H", 0))
        self.avail_idx += 1
        self.memory.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def wait_used(self, timeout=10.0) -> int:
        """The status byte, once the device has returned the chain."""
        deadline = time.monotonic() + timeout
        while struct.unpack("<H", self.memory.read(USED + 2, 2))[0] == self.used_seen:
            assert time.monotonic() < deadline, "the device returned nothing"
            time.sleep(0.005)
        self.used_seen += 1
        return self.memory.read(STATUS, 1)[0]


def test_identity_and_features(vm, memory, tmp_path):
    transport, backend, _ = disk_transport(vm, memory, tmp_path, read_only=True)
    try:
        assert reg(transport, M.MAGIC_VALUE) == 0x74726976
        assert reg(transport, M.VERSION_REG) == 2
        assert reg(transport, M.DEVICE_ID) == 2
        features = transport.device.features
        assert features & M.VIRTIO_F_VERSION_1 and features & VIRTIO_BLK_F_RO
        assert not features & (1 << 30)           # vhost-user's own bit stays ours
        assert not features & ~M.TRANSPORT_FEATURES
        # A legacy driver (no VERSION_1) is refused at FEATURES_OK.
        status = driver_init(transport, features=features & ~M.VIRTIO_F_VERSION_1)
        assert not status & M.FEATURES_OK
    finally:
        backend.kill()


def test_requests_reach_the_disk_and_a_reset_starts_over(vm, memory, tmp_path):
    transport, backend, image = disk_transport(vm, memory, tmp_path)
    try:
        capacity = int.from_bytes(bytes(transport.read(M.CONFIG + i, 1) for i in range(8)),
                                  "little")
        assert capacity == 1 * MiB // 512
        for round_ in range(2):                  # the second time after a device reset
            ring = Ring(memory)
            assert driver_init(transport) & M.DRIVER_OK
            assert reg(transport, M.INTERRUPT_STATUS) & M.INT_VRING
            pattern = bytes([round_ + 1]) * 4096
            memory.write(DATA, pattern)
            ring.request(1, 8, 4096, data_writable=False)           # OUT, sector 8
            os.eventfd_write(transport.kicks[0], 1)                  # KVM's part
            assert ring.wait_used() == 0
            assert image.read_bytes()[8 * 512:8 * 512 + 4096] == pattern
            memory.fill(DATA, 4096)
            ring.request(0, 8, 4096, data_writable=True)            # IN
            os.eventfd_write(transport.kicks[0], 1)
            assert ring.wait_used() == 0
            assert memory.read(DATA, 4096) == pattern
            reg(transport, M.STATUS, 0)
            assert reg(transport, M.STATUS) == 0 and not transport.live
    finally:
        backend.kill()


def test_rings_outside_ram_need_a_reset(vm, memory, tmp_path):
    transport, backend, _ = disk_transport(vm, memory, tmp_path)
    try:
        status = driver_init(transport, queue=(NUM, 64 * MiB, AVAIL, USED))
        assert status & M.DEVICE_NEEDS_RESET and not transport.live
        assert reg(transport, M.INTERRUPT_STATUS) & M.INT_CONFIG
        reg(transport, M.INTERRUPT_ACK, M.INT_CONFIG)
        assert not reg(transport, M.INTERRUPT_STATUS) & M.INT_CONFIG
        reg(transport, M.STATUS, 0)                # the driver resets; all is well again
        Ring(memory)
        assert driver_init(transport) & M.DRIVER_OK and transport.live
    finally:
        backend.kill()


def test_misaligned_queue_size_and_odd_accesses(vm, memory, tmp_path):
    transport, backend, _ = disk_transport(vm, memory, tmp_path)
    try:
        assert driver_init(transport, queue=(12, DESC, AVAIL, USED)) & M.DEVICE_NEEDS_RESET
        assert transport.read(M.MAGIC_VALUE, 2) == 0          # registers are 32-bit only
        transport.write(M.STATUS + 1, 1, 0)                    # ignored, no reset
        assert reg(transport, M.STATUS) & M.DEVICE_NEEDS_RESET
        assert transport.read(0x1000 - 4, 4) == 0              # config past its end
    finally:
        backend.kill()


def test_empty_disk_slot_answers_in_process(vm, memory):
    transport = M.MmioTransport("empty", 0xD000_1000, 6, EmptyDisk(memory), vm, memory)
    assert reg(transport, M.DEVICE_ID) == 2
    assert all(transport.read(M.CONFIG + i, 1) == 0 for i in range(8))     # capacity 0
    ring = Ring(memory)
    assert driver_init(transport) & M.DRIVER_OK
    for kind, data_len, expected in ((8, 20, 0), (0, 512, 1), (4, 0, 0), (99, 0, 2)):
        ring.request(kind, 0, data_len, data_writable=True)
        reg(transport, M.QUEUE_NOTIFY, 0)           # no ioeventfd: the vCPU exit lands here
        assert ring.wait_used() == expected         # GET_ID ok, IN IOERR, FLUSH ok, UNSUPP


def test_placeholder_slot_is_device_id_zero(vm, memory):
    transport = M.MmioTransport("nic slot", 0xD000_6000, 11, Placeholder(), vm, memory)
    assert reg(transport, M.MAGIC_VALUE) == 0x74726976 and reg(transport, M.DEVICE_ID) == 0
    assert reg(transport, M.QUEUE_NUM_MAX) == 0

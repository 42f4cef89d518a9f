"""An empty NIC slot (spec.md: "drops what the guest sends"): a virtio-net device in
the vm process with its link down, driven register by register on a real KVM VM."""

import os
import struct

import pytest

from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.empty import EmptyNic
from vmm.machine.kvm import Kvm, open_kvm
from vmm.machine.memory import GuestMemory, create_memfd

pytestmark = pytest.mark.needs_kvm

MiB = 1 << 20
NUM = 16
RINGS = {0: (0x10000, 0x11000, 0x12000), 1: (0x20000, 0x21000, 0x22000)}
BUFFER = 0x30000


@pytest.fixture
def transport():
    kvm = Kvm(open_kvm())
    vm = kvm.create_vm()
    vm.create_irqchip()
    memory = GuestMemory(create_memfd(16 * MiB), 16 * MiB)
    vm.set_memory_region(0, 0, 16 * MiB, memory.host_address())
    yield M.MmioTransport("empty NIC slot 6", 0xD000_6000, 11, EmptyNic(memory), vm, memory)
    os.close(vm.fd)
    os.close(kvm.fd)


def reg(transport, offset, value=None):
    if value is None:
        return transport.read(offset, 4)
    transport.write(offset, 4, value)


def bring_up(transport) -> int:
    """A driver's initialisation with both queues; the status read back."""
    for status in (M.ACKNOWLEDGE, M.ACKNOWLEDGE | M.DRIVER):
        reg(transport, M.STATUS, status)
    reg(transport, M.DRIVER_FEATURES_SEL, 1)
    reg(transport, M.DRIVER_FEATURES, 1)                          # VERSION_1
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK)
    for index, (desc, avail, used) in RINGS.items():
        reg(transport, M.QUEUE_SEL, index)
        reg(transport, M.QUEUE_NUM, NUM)
        for low, address in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail),
                             (M.QUEUE_DEVICE_LOW, used)):
            reg(transport, low, address)
        reg(transport, M.QUEUE_READY, 1)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK | M.DRIVER_OK)
    return reg(transport, M.STATUS)


def offer(memory, index: int, chains: int, flags: int) -> None:
    """`chains` one-buffer chains on queue `index`, made available."""
    desc, avail, _ = RINGS[index]
    for i in range(chains):
        memory.write(desc + 16 * i, struct.pack("<QIHH", BUFFER + 2048 * i, 2048, flags, 0))
        memory.write(avail + 4 + 2 * i, struct.pack("<H", i))
    memory.write(avail + 2, struct.pack("<H", chains))


def used_idx(memory, index: int) -> int:
    return struct.unpack("<H", memory.read(RINGS[index][2] + 2, 2))[0]


def test_identity_link_down(transport):
    assert reg(transport, M.DEVICE_ID) == 1
    assert reg(transport, M.QUEUE_NUM_MAX) == 256
    status = transport.read(M.CONFIG + 6, 2)
    assert status == 0                                  # VIRTIO_NET_S_LINK_UP clear
    reg(transport, M.DEVICE_FEATURES_SEL, 0)
    assert reg(transport, M.DEVICE_FEATURES) & (1 << 16)           # STATUS offered


def test_transmit_is_dropped_receive_never_filled(transport):
    memory = transport.memory
    assert bring_up(transport) & M.DRIVER_OK
    offer(memory, 0, 4, 2)                              # receive buffers (writable)
    reg(transport, M.QUEUE_NOTIFY, 0)
    offer(memory, 1, 5, 0)                              # five frames to send
    reg(transport, M.QUEUE_NOTIFY, 1)                   # no ioeventfd: the exit lands here
    assert used_idx(memory, 1) == 5 and used_idx(memory, 0) == 0
    assert transport.device.dropped == 5
    # A malformed transmit ring (a head past its end) breaks the slot's queue, nothing else.
    memory.write(RINGS[1][1] + 4 + 2 * 5, struct.pack("<H", NUM + 3))
    memory.write(RINGS[1][1] + 2, struct.pack("<H", 6))
    reg(transport, M.QUEUE_NOTIFY, 1)
    assert used_idx(memory, 1) == 5
    reg(transport, M.STATUS, 0)                         # a reset brings it back
    assert bring_up(transport) & M.DRIVER_OK

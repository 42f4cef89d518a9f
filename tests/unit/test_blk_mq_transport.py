"""A disk slot with several queues (VIRTIO_BLK_F_MQ) at the virtio-mmio transport, the
guest's driver played from here as in tests/unit/test_slot_swap.py: every queue of an
empty slot answers on its own ring (its QueueNotify exits carry the queue's index), a
disk with as many queues plugged into the live slot takes each ring over where it
stood, each queue's kick is its own ioeventfd (datamatch = index) and the slot's one
interrupt serves them all; a driver that does not take MQ runs on queue 0 alone.
"""

import os
import socket
import struct

import pytest

from vmm import children
from vmm.devices.virtio import mmio as M
from vmm.devices.virtio.block import main as block_main
from vmm.devices.virtio.block.device import VIRTIO_BLK_F_MQ, VIRTIO_RING_F_EVENT_IDX
from vmm.devices.virtio.empty import EmptyDisk
from vmm.devices.virtio.vhost_user_device import VhostUserDevice
from tests.unit.test_slot_swap import S_IOERR, S_OK, T_IN, T_OUT, Ring
from tests.unit.test_virtio_mmio import MiB, memory, reg, vm  # noqa: F401

pytestmark = pytest.mark.needs_kvm
QUEUES = 2


def driver_init(transport, rings, features) -> int:
    """Negotiate `features`, set up one queue per ring (queue i at ring i), DRIVER_OK."""
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER)
    for half in (0, 1):
        reg(transport, M.DRIVER_FEATURES_SEL, half)
        reg(transport, M.DRIVER_FEATURES, (features >> (32 * half)) & 0xFFFFFFFF)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK)
    for index, ring in enumerate(rings):
        num, desc, avail, used = ring.queue
        reg(transport, M.QUEUE_SEL, index)
        reg(transport, M.QUEUE_NUM, num)
        for low, address in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, avail),
                             (M.QUEUE_DEVICE_LOW, used)):
            reg(transport, low, address & 0xFFFFFFFF)
            reg(transport, low + 4, address >> 32)
        reg(transport, M.QUEUE_READY, 1)
    reg(transport, M.STATUS, M.ACKNOWLEDGE | M.DRIVER | M.FEATURES_OK | M.DRIVER_OK)
    return reg(transport, M.STATUS)


def offered(transport) -> int:
    features = 0
    for half in (0, 1):
        reg(transport, M.DEVICE_FEATURES_SEL, half)
        features |= reg(transport, M.DEVICE_FEATURES) << (32 * half)
    return features


def kick(transport, index):
    if transport.device.uses_ioeventfd:
        os.eventfd_write(transport.kicks[index], 1)
    else:
        reg(transport, M.QUEUE_NOTIFY, index)


def disk_backend(memory, image, queues):
    disk = os.open(image, os.O_RDWR | os.O_DIRECT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = children.spawn("vmm-blk-mq", "blk-mq", [disk, theirs.fileno()],
                             lambda: block_main.serve_disk(disk, theirs, False, True, None,
                                                           True, queues))
    os.close(disk)
    theirs.close()
    return VhostUserDevice("disk mq", 2, ours, memory, (256,) * queues, 60), backend


def test_an_empty_slot_and_then_a_disk_serve_every_queue(vm, memory, tmp_path):
    empty = EmptyDisk(memory, QUEUES)
    transport = M.MmioTransport("disk slot 0", 0xD000_0000, 5, empty, vm, memory)
    assert len(transport.kicks) == QUEUES
    features = offered(transport)
    assert features & VIRTIO_BLK_F_MQ and features & VIRTIO_RING_F_EVENT_IDX
    num_queues = struct.unpack("<H", bytes(transport.read(M.CONFIG + 34 + i, 1)
                                           for i in range(2)))[0]
    assert num_queues == QUEUES
    rings = [Ring(memory, at=i * 0x40000) for i in range(QUEUES)]
    assert driver_init(transport, rings, features) & M.DRIVER_OK
    for index, ring in enumerate(rings):
        ring.post(T_IN, 0, 0)
        kick(transport, index)
        assert ring.reap(1) == {0: S_IOERR}
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    device, backend = disk_backend(memory, image, QUEUES)
    try:
        transport.replace_device(device)
        reg(transport, M.INTERRUPT_ACK, M.INT_CONFIG)
        for round_ in range(3):
            for index, ring in enumerate(rings):
                for slot in range(1, 11):
                    sector = 8 * (index * 100 + round_ * 10 + slot)
                    ring.post(T_OUT, sector, slot, bytes([index * 40 + slot]) * 4096)
                kick(transport, index)
            for index, ring in enumerate(rings):
                assert ring.reap(10) == {slot: S_OK for slot in range(1, 11)}
        written = image.read_bytes()
        for index in range(QUEUES):
            for slot in range(1, 11):
                sector = 8 * (index * 100 + 20 + slot)
                assert written[sector * 512:sector * 512 + 4096] == bytes([index * 40 + slot]) * 4096
        # Queue 1's requests never show up on queue 0's ring, and the other way round.
        assert all(ring.used_idx() == 31 for ring in rings)
    finally:
        transport.replace_device(EmptyDisk(memory, QUEUES)).close()
        backend.reap(block=True)
        backend.kill()


def test_a_driver_without_mq_uses_queue_0_alone(vm, memory, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes([9]) * (4 * MiB))
    device, backend = disk_backend(memory, image, QUEUES)
    transport = M.MmioTransport("disk slot 0", 0xD000_0000, 5, device, vm, memory)
    try:
        ring = Ring(memory)
        assert driver_init(transport, [ring], offered(transport) & ~VIRTIO_BLK_F_MQ) & M.DRIVER_OK
        for slot in range(12):
            ring.post(T_IN, 8 * slot, slot)
        kick(transport, 0)
        assert ring.reap(12) == {slot: S_OK for slot in range(12)}
        assert all(ring.data(slot) == bytes([9]) * 4096 for slot in range(12))
    finally:
        device.close()
        backend.reap(block=True)
        backend.kill()

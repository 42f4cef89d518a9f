"""The virtio-blk backend driven through our vhost-user frontend by a host-side driver:
the protocol, the ring, the requests, and hostile requests that must fail cleanly."""

import os
import struct
import threading

import pytest

from vmm.devices.virtio.block import request as R
from vmm.devices.virtio.block.device import BlockDevice, VIRTIO_BLK_F_RO, VIRTIO_F_VERSION_1
from vmm.vhost_user.backend import Backend
from vmm.vhost_user import protocol as P
from tests.framework.virtio_driver import DATA_GPA, Driver, backend_pair

SECTOR = 512
HEADER, STATUS = DATA_GPA, DATA_GPA + 0x1000
DATA = DATA_GPA + 0x10000


@pytest.fixture
def blk(tmp_path, request):
    """(driver, backend thread, disk path) for a 1 MiB disk; param: read_only."""
    read_only = getattr(request, "param", False)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096)
    fd = os.open(disk, os.O_RDONLY if read_only else os.O_RDWR)
    connection, theirs = backend_pair()
    backend = Backend(BlockDevice(fd, read_only, False, "serial-1"), P.Connection(theirs))
    thread = threading.Thread(target=backend.serve, daemon=True)
    thread.start()
    driver = Driver(connection)
    yield driver, thread, disk
    connection.close()
    thread.join(10)
    driver.close()
    os.close(fd)


def blk_request(driver: Driver, kind: int, sector: int, data_length: int, data_writable: bool):
    driver.memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    driver.memory.write(STATUS, b"\xff")
    chain = [(HEADER, 16, False)]
    if data_length:
        chain.append((DATA, data_length, data_writable))
    chain.append((STATUS, 1, True))
    head = driver.submit(chain)
    done, written = driver.completion()
    assert done == head
    return driver.memory.read(STATUS, 1)[0], written


def test_negotiation_and_config(blk):
    driver, _, _ = blk
    features = driver.start(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO)
    assert features & VIRTIO_F_VERSION_1 and not features & VIRTIO_BLK_F_RO
    config = driver.frontend.get_config(60)
    capacity, size_max, seg_max = struct.unpack_from("<QII", config)
    assert capacity == 2048 and seg_max == 254 and struct.unpack_from("<I", config, 20)[0] == 512


def test_write_read_flush_get_id(blk):
    driver, _, disk = blk
    driver.start(VIRTIO_F_VERSION_1)
    pattern = os.urandom(8 * SECTOR)
    driver.memory.write(DATA, pattern)
    assert blk_request(driver, R.T_OUT, 100, len(pattern), False) == (R.S_OK, 1)
    driver.memory.write(DATA, bytes(len(pattern)))
    assert blk_request(driver, R.T_IN, 100, len(pattern), True) == (R.S_OK, len(pattern) + 1)
    assert driver.memory.read(DATA, len(pattern)) == pattern
    assert disk.read_bytes()[100 * SECTOR:108 * SECTOR] == pattern
    assert blk_request(driver, R.T_FLUSH, 0, 0, False) == (R.S_OK, 1)
    assert blk_request(driver, R.T_GET_ID, 0, 20, True) == (R.S_OK, 21)
    assert driver.memory.read(DATA, 20) == b"serial-1".ljust(20, b"\0")


@pytest.mark.parametrize("kind,sector,length,writable,status", [
    (R.T_IN, 2047, 2 * SECTOR, True, R.S_IOERR),        # past the end of the disk
    (R.T_IN, 2**63, SECTOR, True, R.S_IOERR),           # absurd sector
    (R.T_IN, 0, 100, True, R.S_IOERR),                  # not whole sectors
    (R.T_OUT, 2048, SECTOR, False, R.S_IOERR),
    (99, 0, 0, False, R.S_UNSUPP),
])
def test_bad_requests_get_an_error_status(blk, kind, sector, length, writable, status):
    driver, thread, _ = blk
    driver.start(VIRTIO_F_VERSION_1)
    assert blk_request(driver, kind, sector, length, writable)[0] == status
    assert thread.is_alive()


@pytest.mark.parametrize("blk", [True], indirect=True)
def test_read_only_disk_refuses_writes(blk):
    driver, _, disk = blk
    assert driver.start(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO) & VIRTIO_BLK_F_RO
    before = disk.read_bytes()
    assert blk_request(driver, R.T_OUT, 0, SECTOR, False) == (R.S_IOERR, 1)
    assert disk.read_bytes() == before


def test_short_header_and_no_status(blk):
    driver, thread, _ = blk
    driver.start(VIRTIO_F_VERSION_1)
    driver.memory.write(STATUS, b"\xff")
    head = driver.submit([(HEADER, 8, False), (STATUS, 1, True)])
    assert driver.completion() == (head, 1)
    assert driver.memory.read(STATUS, 1)[0] == R.S_IOERR
    head = driver.submit([(HEADER, 16, False)])           # nowhere to write a status
    assert driver.completion() == (head, 0)
    assert thread.is_alive()


def test_hostile_ring_breaks_the_queue_not_the_backend(blk):
    driver, thread, _ = blk
    driver.start(VIRTIO_F_VERSION_1)
    driver.write_descriptor(0, 1 << 40, 16, 0, 0)          # a buffer far outside RAM
    driver.publish(0)
    # The backend answers the frontend still, and says where the ring stopped.
    assert driver.frontend.stop_ring(0) == 0
    assert thread.is_alive()

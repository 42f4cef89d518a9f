"""The virtio-blk backend driven through our vhost-user frontend by a host-side driver:
the protocol, the ring, the requests (native/blkio.c), and hostile requests that must
fail cleanly."""

import os
import random
import select
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmm.devices.virtio.block import request as R
from vmm.devices.virtio.block.device import (
    BlockDevice, MAX_DWZ_SECTORS, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_F_VERSION_1)
from vmm.vhost_user.backend import Backend
from vmm.vhost_user import protocol as P
from tests.framework.virtio_driver import DATA_GPA, F_NEXT, F_WRITE, Driver, backend_pair

SECTOR = 512
HEADER, STATUS = DATA_GPA, DATA_GPA + 0x1000
DATA = DATA_GPA + 0x10000
MiB = 1 << 20
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES


@dataclass
class Blk:
    driver: Driver
    thread: threading.Thread
    device: BlockDevice
    disk: Path

    def request(self, kind: int, sector: int, data=(), writable: bool = False,
                header: bytes | None = None) -> tuple[int, int]:
        """One request: header, data buffers [(gpa, length)], status. (status, written)."""
        header = struct.pack("<IIQ", kind, 0, sector) if header is None else header
        self.driver.memory.write(HEADER, header)
        self.driver.memory.write(STATUS, b"\xff")
        chain = [(HEADER, len(header), False)] + [(a, n, writable) for a, n in data]
        head = self.driver.submit(chain + [(STATUS, 1, True)])
        done, written = self.driver.completion()
        assert done == head
        return self.driver.memory.read(STATUS, 1)[0], written

    def write(self, sector: int, payload: bytes, segments=None) -> int:
        segments = [(DATA, len(payload))] if segments is None else segments
        put(self.driver, segments, payload)
        return self.request(R.T_OUT, sector, segments)[0]

    def read(self, sector: int, length: int, segments=None) -> tuple[int, bytes]:
        segments = [(DATA, length)] if segments is None else segments
        for address, size in segments:
            self.driver.memory.write(address, b"\xee" * size)
        status, written = self.request(R.T_IN, sector, segments, writable=True)
        if status == R.S_OK:
            assert written == length + 1
        return status, get(self.driver, segments)

    def ranges(self, kind: int, *segments: tuple[int, int, int]) -> int:
        """DISCARD / WRITE_ZEROES with (sector, num_sectors, flags) segments."""
        payload = b"".join(struct.pack("<QII", *s) for s in segments)
        if payload:
            self.driver.memory.write(DATA, payload)
        return self.request(kind, 0, [(DATA, len(payload))] if payload else [])[0]

    def counters(self) -> dict[str, int]:
        return self.device.requests.counters()


def put(driver, segments, payload: bytes) -> None:
    at = 0
    for address, size in segments:
        driver.memory.write(address, payload[at:at + size])
        at += size


def get(driver, segments) -> bytes:
    return b"".join(driver.memory.read(address, size) for address, size in segments)


def scattered(sizes, base=DATA, skew=0):
    """Segments of these sizes, apart, each starting `skew` bytes past a 4 KiB boundary."""
    segments, at = [], base
    for size in sizes:
        segments.append((at + skew, size))
        at = (at + skew + size + 8191) & ~4095
    return segments


def open_blk(path: Path, read_only=False, direct=False, serial="serial-1",
             mem_size=128 * MiB, num=256):
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    connection, theirs = backend_pair()
    device = BlockDevice(fd, read_only, direct, serial)
    backend = Backend(device, P.Connection(theirs))
    thread = threading.Thread(target=backend.serve, daemon=True)
    thread.start()
    driver = Driver(connection, mem_size=mem_size, num=num)

    def close():
        connection.close()
        thread.join(10)
        driver.close()
        os.close(fd)
    return Blk(driver, thread, device, path), close


@pytest.fixture
def make_blk(tmp_path):
    """make_blk(size=, content=, read_only=, direct=, sparse=, path=, num=): a started
    Blk on a fresh disk image (bytes 0..255 repeated unless content or sparse)."""
    closers = []

    def make(size=MiB, content=None, read_only=False, direct=False, sparse=False, path=None,
             num=256, features=FEATURES):
        disk = Path(path or tmp_path / f"disk{len(closers)}.img")
        if sparse:
            with open(disk, "wb") as f:
                f.truncate(size)
        else:
            disk.write_bytes(content if content is not None else bytes(range(256)) * (size // 256))
        blk, close = open_blk(disk, read_only, direct, num=num)
        closers.append(close)
        blk.driver.start(features | (VIRTIO_BLK_F_RO if read_only else 0))
        return blk

    yield make
    for close in closers:
        close()


@pytest.fixture
def blk(make_blk):
    return make_blk()


def test_negotiation_and_config(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    blk, close = open_blk(disk)
    try:
        features = blk.driver.start(FEATURES | VIRTIO_BLK_F_RO)
        assert features & FEATURES == FEATURES and not features & VIRTIO_BLK_F_RO
        config = blk.driver.frontend.get_config(60)
        capacity, size_max, seg_max = struct.unpack_from("<QII", config)
        assert capacity == 2048 and seg_max == 254 and struct.unpack_from("<I", config, 20)[0] == 512
        # max_discard_sectors, max_discard_seg, discard_sector_alignment,
        # max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
        dwz = struct.unpack_from("<IIIIIB", config, 36)
        assert dwz == (MAX_DWZ_SECTORS, 256, os.stat(disk).st_blksize // 512,
                       MAX_DWZ_SECTORS, 256, 1)
    finally:
        close()


def test_read_only_disk_offers_no_discard(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    blk, close = open_blk(disk, read_only=True)
    try:
        features = blk.driver.start(FEATURES | VIRTIO_BLK_F_RO)
        assert features & VIRTIO_BLK_F_RO and not features & FEATURES & ~VIRTIO_F_VERSION_1
        assert blk.driver.frontend.get_config(60)[36:60] == bytes(24)
    finally:
        close()


def test_write_read_flush_get_id(blk):
    pattern = os.urandom(8 * SECTOR)
    assert blk.write(100, pattern) == R.S_OK
    assert blk.read(100, len(pattern)) == (R.S_OK, pattern)
    assert blk.disk.read_bytes()[100 * SECTOR:108 * SECTOR] == pattern
    assert blk.request(R.T_FLUSH, 0) == (R.S_OK, 1)
    assert blk.request(R.T_GET_ID, 0, [(DATA, 20)], writable=True) == (R.S_OK, 21)
    assert blk.driver.memory.read(DATA, 20) == b"serial-1".ljust(20, b"\0")
    # A short GET_ID buffer gets the start of the serial.
    assert blk.request(R.T_GET_ID, 0, [(DATA, 5)], writable=True) == (R.S_OK, 6)
    assert blk.driver.memory.read(DATA, 5) == b"seria"
    assert blk.counters()["requests"] == 5


def test_header_split_over_descriptors(blk):
    # A header may be scattered like any buffer: 3 + 13 bytes.
    header = struct.pack("<IIQ", R.T_IN, 0, 1)
    blk.driver.memory.write(HEADER, header[:3])
    blk.driver.memory.write(HEADER + 0x100, header[3:])
    blk.driver.memory.write(STATUS, b"\xff")
    head = blk.driver.submit([(HEADER, 3, False), (HEADER + 0x100, 13, False),
                              (DATA, SECTOR, True), (STATUS, 1, True)])
    assert blk.driver.completion() == (head, SECTOR + 1)
    assert blk.driver.memory.read(STATUS, 1)[0] == R.S_OK
    assert blk.driver.memory.read(DATA, SECTOR) == blk.disk.read_bytes()[SECTOR:2 * SECTOR]


@pytest.mark.parametrize("direct", [False, True])
def test_unaligned_buffers(make_blk, direct):
    """Guest buffers at odd addresses and of odd lengths: straight preadv/pwritev when
    buffered, through the bounce buffer with O_DIRECT; the data is the same."""
    blk = make_blk(size=4 * MiB, direct=direct)
    pattern = os.urandom(16 * SECTOR)
    writes = scattered([1, 511, 100, 7000, 580], skew=3)
    assert sum(n for _, n in writes) == len(pattern)
    assert blk.write(40, pattern, writes) == R.S_OK
    with open(blk.disk, "rb") as f:                # not O_DIRECT: what is on the disk
        assert os.pread(f.fileno(), len(pattern), 40 * SECTOR) == pattern
    reads = scattered([4095, 4097], skew=1)
    assert blk.read(40, len(pattern), reads) == (R.S_OK, pattern)
    bounced = blk.counters()["bounced"]
    assert bounced == (2 if direct else 0)
    # Sector-aligned buffers go straight to the disk even with O_DIRECT.
    assert blk.read(40, len(pattern), scattered([4096, 4096])) == (R.S_OK, pattern)
    assert blk.counters()["bounced"] == bounced


def test_direct_large_unaligned_request_spans_bounce_chunks(make_blk):
    blk = make_blk(size=8 * MiB, direct=True)
    pattern = os.urandom(3 * MiB)                    # three bounce buffers' worth
    segments = scattered([MiB - 1, MiB + 1, MiB], skew=5)
    assert blk.write(7, pattern, segments) == R.S_OK
    assert blk.read(7, len(pattern), scattered([MiB + 512, 2 * MiB - 512], skew=9)) == \
        (R.S_OK, pattern)
    assert blk.disk.read_bytes()[7 * SECTOR:7 * SECTOR + len(pattern)] == pattern


def test_many_segments(make_blk):
    blk = make_blk(size=4 * MiB, num=1024)
    # 1000 one-sector buffers, in descending addresses: the order of the chain counts.
    segments = [(DATA + (999 - i) * 1024, SECTOR) for i in range(1000)]
    pattern = os.urandom(1000 * SECTOR)
    assert blk.write(3, pattern, segments) == R.S_OK
    assert blk.disk.read_bytes()[3 * SECTOR:1003 * SECTOR] == pattern
    reads = [(DATA + 2 * MiB + i * 4096 + i % 7, 500 * SECTOR // 250) for i in range(250)]
    assert blk.read(3, 500 * SECTOR, reads) == (R.S_OK, pattern[:500 * SECTOR])


@pytest.mark.parametrize("kind,sector,length,writable,status", [
    (R.T_IN, 2047, 2 * SECTOR, True, R.S_IOERR),        # past the end of the disk
    (R.T_IN, 2048, SECTOR, True, R.S_IOERR),
    (R.T_IN, 2**63, SECTOR, True, R.S_IOERR),           # absurd sector
    (R.T_IN, 2**64 - 1, SECTOR, True, R.S_IOERR),       # sector + count overflows
    (R.T_IN, 0, 100, True, R.S_IOERR),                  # not whole sectors
    (R.T_OUT, 2048, SECTOR, False, R.S_IOERR),
    (R.T_OUT, 2**64 - 1, SECTOR, False, R.S_IOERR),
    (R.T_OUT, 0, 100, False, R.S_IOERR),
    (99, 0, 0, False, R.S_UNSUPP),
    (R.T_DISCARD + 1, 0, 0, False, R.S_UNSUPP),
])
def test_bad_requests_get_an_error_status(blk, kind, sector, length, writable, status):
    before = blk.disk.read_bytes()
    data = [(DATA, length)] if length else []
    assert blk.request(kind, sector, data, writable) == (status, 1)
    assert blk.thread.is_alive()
    assert blk.disk.read_bytes() == before


def test_huge_request_is_refused_without_io(make_blk):
    # Header, 1022 descriptors of 4 MiB that all alias one buffer (4 GiB - 8 MiB of
    # data, legal for the ring walker), status: far past the end of a 1 MiB disk.
    blk = make_blk(num=1024)
    segments = [(DATA, 4 * MiB)] * 1022
    assert blk.request(R.T_IN, 0, segments, writable=True) == (R.S_IOERR, 1)
    assert blk.request(R.T_OUT, 0, segments) == (R.S_IOERR, 1)
    assert blk.driver.memory.read(DATA, 16) == bytes(16)     # nothing read into it
    assert blk.thread.is_alive()
    assert blk.counters() == {"requests": 2, "errors": 2, "bounced": 0, "zeroes_written": 0,
                             "throttled": 0}


def test_data_in_the_wrong_direction_is_refused(blk):
    before = blk.disk.read_bytes()
    blk.driver.memory.write(DATA, b"\x55" * SECTOR)
    # A read whose buffer the device may not write: refused, the buffer untouched.
    assert blk.request(R.T_IN, 0, [(DATA, SECTOR)], writable=False) == (R.S_IOERR, 1)
    assert blk.driver.memory.read(DATA, SECTOR) == b"\x55" * SECTOR
    # A write whose data is device-writable: refused, not silently dropped.
    assert blk.request(R.T_OUT, 0, [(DATA, SECTOR)], writable=True) == (R.S_IOERR, 1)
    assert blk.ranges(R.T_WRITE_ZEROES) == R.S_IOERR             # no segment at all
    assert blk.disk.read_bytes() == before


def test_read_only_disk_refuses_writes(make_blk):
    blk = make_blk(read_only=True)
    before = blk.disk.read_bytes()
    assert blk.request(R.T_OUT, 0, [(DATA, SECTOR)]) == (R.S_IOERR, 1)
    assert blk.ranges(R.T_DISCARD, (0, 8, 0)) == R.S_UNSUPP
    assert blk.ranges(R.T_WRITE_ZEROES, (0, 8, 0)) == R.S_UNSUPP
    assert blk.read(0, SECTOR) == (R.S_OK, before[:SECTOR])
    assert blk.disk.read_bytes() == before


def test_short_header_and_no_status(blk):
    driver = blk.driver
    driver.memory.write(STATUS, b"\xff")
    head = driver.submit([(HEADER, 8, False), (STATUS, 1, True)])
    assert driver.completion() == (head, 1)
    assert driver.memory.read(STATUS, 1)[0] == R.S_IOERR
    # A status byte in a device-readable buffer: no writable byte at all, nowhere to
    # report; the chain comes back with nothing written, the buffer untouched.
    driver.memory.write(HEADER, struct.pack("<IIQ", R.T_FLUSH, 0, 0))
    driver.memory.write(STATUS, b"\xff")
    head = driver.submit([(HEADER, 16, False), (STATUS, 1, False)])
    assert driver.completion() == (head, 0)
    assert driver.memory.read(STATUS, 1) == b"\xff"
    assert blk.thread.is_alive()
    assert blk.read(0, SECTOR)[0] == R.S_OK                     # the queue still works


def test_readable_status_after_writable_data_breaks_the_ring(blk):
    # Readable after writable is a malformed chain (virtio 2.7.4.2): the queue stops.
    blk.driver.memory.write(HEADER, struct.pack("<IIQ", R.T_IN, 0, 0))
    blk.driver.submit([(HEADER, 16, False), (DATA, SECTOR, True), (STATUS, 1, False)])
    assert blk.driver.frontend.stop_ring(0) == 0
    assert blk.thread.is_alive()


@pytest.mark.parametrize("address,length", [
    (1 << 40, 16),                              # far outside RAM
    (128 * MiB - 8, 16),                        # straddles the end of RAM
    (2**64 - 8, 16),                            # wraps around
])
def test_descriptor_outside_ram_breaks_the_queue_not_the_backend(blk, address, length):
    before = blk.disk.read_bytes()
    blk.driver.write_descriptor(0, HEADER, 16, F_NEXT, 1)
    blk.driver.write_descriptor(1, address, length, 0, 0)
    blk.driver.memory.write(HEADER, struct.pack("<IIQ", R.T_OUT, 0, 0))
    blk.driver.publish(0)
    # The backend answers the frontend still, and says where the ring stopped.
    assert blk.driver.frontend.stop_ring(0) == 0
    assert blk.thread.is_alive()
    assert blk.disk.read_bytes() == before


def test_completions_before_a_broken_chain_are_published(blk):
    d = blk.driver
    assert d.frontend.stop_ring(0) == 0
    # Three chains available at once: two flushes, then one outside RAM.
    d.memory.write(HEADER, struct.pack("<IIQ", R.T_FLUSH, 0, 0))
    d.write_descriptor(0, HEADER, 16, F_NEXT, 1)
    d.write_descriptor(1, STATUS, 1, F_WRITE, 0)
    d.write_descriptor(2, 1 << 40, 16, 0, 0)
    for head in (0, 0, 2):
        d.publish(head)
    d.restart_ring(0)
    # The batch's used index still covers the two completed chains.
    assert d.frontend.stop_ring(0) == 2
    assert struct.unpack("<H", d.memory.read(d.used + 2, 2))[0] == 2
    assert blk.thread.is_alive()


# ---- DISCARD and WRITE_ZEROES ------------------------------------------------------------

def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_write_zeroes_reads_back_zero(make_blk):
    blk = make_blk(size=4 * MiB)
    assert blk.write(0, os.urandom(MiB)) == R.S_OK
    assert blk.ranges(R.T_WRITE_ZEROES, (8, 16, 0), (100, 1, 0)) == R.S_OK
    data = blk.disk.read_bytes()
    assert data[8 * SECTOR:24 * SECTOR] == bytes(16 * SECTOR)
    assert data[100 * SECTOR:101 * SECTOR] == bytes(SECTOR)
    assert data[24 * SECTOR:100 * SECTOR] != bytes(76 * SECTOR)
    assert blk.read(8, 16 * SECTOR) == (R.S_OK, bytes(16 * SECTOR))
    assert blk.counters()["zeroes_written"] == 0              # ext4 did ZERO_RANGE


@pytest.mark.parametrize("kind,flags", [(R.T_DISCARD, 0), (R.T_WRITE_ZEROES, R.F_UNMAP)])
def test_discard_and_unmapping_write_zeroes_free_blocks(make_blk, kind, flags):
    blk = make_blk(size=8 * MiB, sparse=True)
    assert blk.write(0, os.urandom(2 * MiB), scattered([MiB, MiB])) == R.S_OK
    before = allocated(blk.disk)
    assert before >= 2 * MiB
    # 1.5 MiB in three segments, 4 KiB-aligned as the config's alignment asks.
    assert blk.ranges(kind, (0, 1024, flags), (2048, 1024, flags), (1024, 1024, flags)) == R.S_OK
    assert allocated(blk.disk) <= before - 3 * MiB // 2
    data = blk.disk.read_bytes()
    assert data[:MiB + MiB // 2] == bytes(MiB + MiB // 2)      # holes read as zeroes
    assert data[MiB + MiB // 2:2 * MiB] != bytes(MiB // 2)


def test_discard_and_write_zeroes_segment_checks(make_blk):
    blk = make_blk()
    before = blk.disk.read_bytes()
    T_D, T_WZ = R.T_DISCARD, R.T_WRITE_ZEROES
    # Reserved flag bits, and UNMAP on a discard: UNSUPP (virtio 1.2, 5.2.6.2) -- even
    # when another segment is fine, and before range errors.
    assert blk.ranges(T_WZ, (0, 8, 0), (8, 8, 2)) == R.S_UNSUPP
    assert blk.ranges(T_D, (0, 8, 1 << 31)) == R.S_UNSUPP
    assert blk.ranges(T_D, (0, 8, R.F_UNMAP)) == R.S_UNSUPP
    assert blk.ranges(T_WZ, (2**64 - 1, 8, 2)) == R.S_UNSUPP
    # Ranges past the end, overflowing, over the per-segment limit: IOERR, nothing done.
    for kind in (T_D, T_WZ):
        assert blk.ranges(kind, (0, 8, 0), (2047, 2, 0)) == R.S_IOERR
        assert blk.ranges(kind, (2**64 - 1, 1, 0)) == R.S_IOERR
        assert blk.ranges(kind, (0, 0xFFFFFFFF, 0)) == R.S_IOERR
        assert blk.ranges(kind, (2048, 0, 0)) == R.S_OK              # empty: nothing to do
        # More segments than max_*_seg (256).
        assert blk.ranges(kind, *[(i, 1, 0) for i in range(257)]) == R.S_IOERR
        # Data not a multiple of 16 bytes.
        blk.driver.memory.write(DATA, struct.pack("<QII", 0, 8, 0))
        assert blk.request(kind, 0, [(DATA, 15)]) == (R.S_IOERR, 1)
        assert blk.request(kind, 0, [(DATA, 17)]) == (R.S_IOERR, 1)
    assert blk.disk.read_bytes() == before
    # 256 segments are fine; segments may be scattered over descriptors.
    assert blk.ranges(T_WZ, *[(i * 8, 1, 0) for i in range(256)]) == R.S_OK
    payload = struct.pack("<QII", 2040, 8, 0)
    blk.driver.memory.write(DATA, payload[:5])
    blk.driver.memory.write(DATA + 0x100, payload[5:])
    assert blk.request(T_WZ, 0, [(DATA, 5), (DATA + 0x100, 11)]) == (R.S_OK, 1)
    assert blk.disk.read_bytes()[2040 * SECTOR:] == bytes(8 * SECTOR)


@pytest.mark.parametrize("direct", [False, True])
def test_write_zeroes_falls_back_to_writing_zeroes(make_blk, direct):
    """tmpfs has no FALLOC_FL_ZERO_RANGE: the backend writes zeroes instead (once
    refused, it does not ask again)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    path = Path(f"/dev/shm/blk-test-{os.getpid()}-{direct}.img")
    try:
        try:
            blk = make_blk(size=2 * MiB, direct=direct, path=path)
        except OSError as error:                         # O_DIRECT on an old tmpfs
            pytest.skip(f"tmpfs: {error}")
        assert blk.write(0, os.urandom(MiB)) == R.S_OK
        assert blk.ranges(R.T_WRITE_ZEROES, (1, 9, 0), (30, 3, 0)) == R.S_OK
        assert blk.ranges(R.T_WRITE_ZEROES, (100, 1, 0)) == R.S_OK
        data = path.read_bytes()
        assert data[SECTOR:10 * SECTOR] == bytes(9 * SECTOR)
        assert data[30 * SECTOR:33 * SECTOR] == bytes(3 * SECTOR)
        assert data[100 * SECTOR:101 * SECTOR] == bytes(SECTOR)
        assert data[:SECTOR] != bytes(SECTOR) and data[10 * SECTOR:30 * SECTOR] != bytes(20 * SECTOR)
        assert blk.counters()["zeroes_written"] == 3
    finally:
        path.unlink(missing_ok=True)


# ---- the disk against a model -------------------------------------------------------------

DISK_SECTORS = 64


def split(draw, total: int) -> list[int]:
    """Random segment lengths summing to total (some odd, none empty)."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(total - 1, 1)), max_size=6))))
    cuts = [c for c in cuts if 0 < c < total]
    edges = [0] + cuts + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


@st.composite
def operations(draw):
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["read", "write", "write", "zeroes", "discard"]))
        sector = draw(st.integers(0, DISK_SECTORS + 2))
        count = draw(st.integers(0 if kind in ("read", "write") else 1, 20))
        skew = draw(st.sampled_from([0, 0, 1, 3, 511]))
        if kind in ("read", "write"):
            ops.append((kind, sector, count, skew,
                        split(draw, count * SECTOR) if count else [],
                        draw(st.integers(0, 2**32))))
        else:
            ops.append((kind, sector, count, draw(st.booleans())))
    return ops


@pytest.mark.parametrize("direct", [False, True])
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations())
def test_random_requests_match_a_model_disk(tmp_path, direct, ops):
    """Random reads, writes (scattered, skewed buffers), write-zeroes and discards,
    against a bytearray: what the guest reads and what ends up in the file agree with
    it; a discarded range is unknown until written again."""
    model = bytearray(random.Random(1).randbytes(DISK_SECTORS * SECTOR))
    known = bytearray(b"\1" * len(model))                    # 0: discarded, any value
    disk = tmp_path / "model.img"
    disk.write_bytes(model)
    blk, close = open_blk(disk, direct=direct, mem_size=32 * MiB)
    try:
        blk.driver.start(FEATURES)
        for op in ops:
            kind, sector, count = op[:3]
            fits = sector + count <= DISK_SECTORS
            lo, hi = sector * SECTOR, (sector + count) * SECTOR
            if kind in ("read", "write"):
                skew, sizes, seed = op[3:]
                segments = scattered(sizes, skew=skew)
                if kind == "write":
                    payload = random.Random(seed).randbytes(count * SECTOR)
                    assert blk.write(sector, payload, segments) == (R.S_OK if fits else R.S_IOERR)
                    if fits:
                        model[lo:hi] = payload
                        known[lo:hi] = b"\1" * (hi - lo)
                else:
                    status, got = blk.read(sector, count * SECTOR, segments)
                    assert status == (R.S_OK if fits else R.S_IOERR)
                    if fits:
                        assert all(g == m for g, m, k in zip(got, model[lo:hi], known[lo:hi]) if k)
            else:
                unmap = op[3]
                if kind == "zeroes":
                    flags = R.F_UNMAP if unmap else 0
                    assert blk.ranges(R.T_WRITE_ZEROES, (sector, count, flags)) == \
                        (R.S_OK if fits else R.S_IOERR)
                    if fits:
                        model[lo:hi] = bytes(hi - lo)
                        known[lo:hi] = b"\1" * (hi - lo)
                else:
                    assert blk.ranges(R.T_DISCARD, (sector, count, 0)) == \
                        (R.S_OK if fits else R.S_IOERR)
                    if fits:
                        known[lo:hi] = bytes(hi - lo)
        on_disk = disk.read_bytes()
        assert len(on_disk) == len(model)
        assert all(d == m for d, m, k in zip(on_disk, model, known) if k)
    finally:
        close()


def test_call_fd_replaced_while_the_ring_runs(blk):
    """SET_VRING_CALL on a running ring: the C worker loop stops before the old eventfd
    is closed, and interrupts through the new one afterwards."""
    d = blk.driver
    new_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    d.frontend._request(P.SET_VRING_CALL, P.U64.pack(0), (new_call,))
    try:
        d.memory.write(HEADER, struct.pack("<IIQ", R.T_IN, 0, 0))
        head = d.submit([(HEADER, 16, False), (DATA, SECTOR, True), (STATUS, 1, True)])
        assert select.select([new_call], [], [], 10)[0]
        assert d.completion() == (head, SECTOR + 1)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(d.call)
    finally:
        os.close(new_call)


class ProcessOnly:
    """The device without serve(): the backend's generic worker loop calls process()."""

    def __init__(self, device: BlockDevice):
        self.device = device
        self.features, self.num_queues = device.features, device.num_queues
        self.max_queue_size = device.max_queue_size
        self.config, self.process = device.config, device.process


def test_the_generic_worker_loop_drives_process(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    fd = os.open(disk, os.O_RDWR)
    connection, theirs = backend_pair()
    device = BlockDevice(fd, False, False, None)
    thread = threading.Thread(target=Backend(ProcessOnly(device), P.Connection(theirs)).serve,
                              daemon=True)
    thread.start()
    blk = Blk(Driver(connection), thread, device, disk)
    try:
        blk.driver.start(FEATURES)
        pattern = os.urandom(4 * SECTOR)
        assert blk.write(8, pattern, scattered([SECTOR, 3 * SECTOR], skew=1)) == R.S_OK
        assert blk.read(8, len(pattern)) == (R.S_OK, pattern)
        assert blk.ranges(R.T_WRITE_ZEROES, (8, 1, 0)) == R.S_OK
        assert blk.read(8, SECTOR) == (R.S_OK, bytes(SECTOR))
        assert blk.counters()["requests"] == 4
    finally:
        connection.close()
        thread.join(10)
        blk.driver.close()
        os.close(fd)

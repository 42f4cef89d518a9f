"""The virtio-blk backend's I/O engines (native/blkio.c): an O_DIRECT disk keeps many
requests in flight per queue on io_uring (else Linux AIO), completes them in whatever
order the disk finishes them, and loses none when it dies with many in flight; the ring
is restricted to what the backend uses; a kernel or a seccomp policy that refuses
io_uring gets AIO, one that refuses both gets the inline path, and the disk says which
in one log line. Also several queues (VIRTIO_BLK_F_MQ) and EVENT_IDX end to end.

Backends are forked and confined as the launcher does (tests/framework/disk_backend.py)
where the point is a death or the profile; in-process otherwise. Requests are held in
flight for sure by holding the writes of the file system the image is on (FIFREEZE): an
O_DIRECT write then waits in the kernel while reads go on.
"""

import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from vmm.devices.virtio.block import request as R
from vmm.devices.virtio.block.device import (
    BlockDevice, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX)
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import Backend
from tests.framework import disk_backend
from tests.framework.virtio_driver import DATA_GPA, Driver, backend_pair
from tests.framework.virtio_queues import QueueDriver
from tests.unit.test_vhost_user_blk_inflight import (
    MiB, SLOT, alive, ended, header, reap, request, status, used_ring, wait_for)

ROOT = Path(__file__).resolve().parents[2]
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
NUM = 256


@pytest.fixture
def backends():
    started = []

    def spawn(image, **options):
        child, connection = disk_backend.spawn(image, **options)
        started.append((child, connection))
        return child, connection

    yield spawn
    for child, connection in started:
        child.kill()
        connection.close()


@pytest.fixture
def driver():
    made = []

    def make(connection, features=FEATURES):
        made.append(Driver(connection, mem_size=64 * MiB, num=NUM))
        return made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture
def holdable(tmp_path):
    fs = disk_backend.HoldableFs(tmp_path)
    yield fs
    fs.close()


def image_on(fs, size=4 * MiB) -> Path:
    image = fs.root / "disk.img"
    image.write_bytes(os.urandom(size))
    return image


# -- which engine, and the line that says so --------------------------------------------

def device(path, direct, engine=R.AUTO, num_queues=1):
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    try:
        made = BlockDevice(fd, False, direct, None, num_queues, engine)
    finally:
        os.close(fd)        # the device only uses it while serving
    made.requests.close()
    return made


def test_an_o_direct_disk_gets_io_uring_and_says_so(tmp_path, caplog):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    with caplog.at_level(logging.INFO, logger="vmm.devices.virtio.block.request"):
        assert device(image, True).requests.engine == "io_uring"
        assert device(image, True, "aio", num_queues=3).requests.engine == "aio"
        assert device(image, False).requests.engine == "inline"
        assert device(image, True, "inline").requests.engine == "inline"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert lines[0].startswith("I/O engine: io_uring (a ring per queue restricted to READV, "
                               "WRITEV and FSYNC on the disk, its only file), up to 256 "
                               "requests in flight per queue, 1 queue"), lines
    assert lines[1].startswith("I/O engine: Linux AIO") and "3 queues" in lines[1], lines
    assert lines[2] == "I/O engine: inline (buffered: page-cache copies in each queue's thread)"
    assert all(r.levelno == logging.INFO for r in caplog.records)


REFUSING = """
import logging, os, sys
import pyseccomp
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
for name in sys.argv[2:]:
    f.add_rule(pyseccomp.ERRNO(1), name)          # EPERM, as kernel.io_uring_disabled says
f.load()
from vmm.devices.virtio.block.device import BlockDevice
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
print(BlockDevice(fd, False, True, None, 2).requests.engine)
"""


@pytest.mark.parametrize("refused,engine,line", [
    (["io_uring_setup"], "aio",
     "WARNING I/O engine: Linux AIO (a context per queue), up to 256 requests in flight per "
     "queue, 2 queues; io_uring refused: Operation not permitted"),
    (["io_uring_setup", "io_setup"], "inline",
     "WARNING I/O engine: inline, one request at a time per queue (io_uring refused: "
     "Operation not permitted; Linux AIO refused: Operation not permitted)"),
])
def test_a_refused_engine_falls_back_with_one_line(tmp_path, refused, engine, line):
    """A seccomp policy (a container's) or kernel.io_uring_disabled refuses io_uring_setup
    with EPERM; an old kernel says ENOSYS, and one without IORING_SETUP_R_DISABLED (before
    5.10) EINVAL: each makes the disk take the next engine, and say so once."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    result = subprocess.run([sys.executable, "-c", REFUSING, str(image), *refused],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [engine]
    assert result.stderr.strip().splitlines() == [line]


def test_the_ring_allows_its_three_opcodes_on_the_disk_and_nothing_else(tmp_path):
    """tests/native/uring_restricted.c: READV, WRITEV, FSYNC on fixed file 0 work; the
    disk by its plain fd, any other opcode or SQE flag, another fixed index, and every
    io_uring_register call are refused."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing (scripts/setup.sh installs it)")
    binary = tmp_path / "uring_restricted"
    build = subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror",
                            f"-I{ROOT / 'native'}", str(ROOT / "tests/native/uring_restricted.c"),
                            str(ROOT / "native/blkio.c"), str(ROOT / "native/virtq.c"),
                            str(ROOT / "native/ratelimit.c"),
                            "-o", str(binary), "-luring"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "every rule holds" in run.stdout, run.stdout + run.stderr


# -- many in flight, out of order, a death in the middle --------------------------------

@pytest.mark.needs_root
def test_reads_overtake_a_held_write(holdable, backends, driver):
    """One O_DIRECT write waits in the kernel (its file system holds writes); the reads
    and the GET_ID made available after it complete first, each once; the region says
    the write alone is in flight; then the write completes too."""
    image = image_on(holdable)
    before = image.read_bytes()
    child, connection = backends(image, direct=True, serial="ooo")
    d = driver(connection)
    d.start(FEATURES, inflight=True)
    data = os.urandom(4096)
    holdable.hold()
    try:
        request(d, 0, R.T_OUT, 8, data)
        d.post([0])
        wait_for(lambda: set(d.in_flight()) == {0}, "the write to be taken")
        request(d, 30, R.T_IN, 64, read=4096)
        request(d, 60, R.T_GET_ID, read=R.ID_BYTES)
        request(d, 90, R.T_IN, 128, read=8192)
        d.post([30, 60, 90])
        assert sorted(reap(d, 3)) == [30, 60, 90]
        assert set(d.in_flight()) == {0} and header(d)[4] == 3
        assert d.memory.read(DATA_GPA + 30 * SLOT + 0x1000, 4096) == before[64 * 512:][:4096]
        assert d.memory.read(DATA_GPA + 90 * SLOT + 0x1000, 8192) == before[128 * 512:][:8192]
    finally:
        holdable.release()
    assert reap(d, 1) == [0] and status(d, 0) == R.S_OK
    assert sorted(used_ring(d)[:3]) == [30, 60, 90] and used_ring(d)[3] == 0
    assert image.read_bytes()[8 * 512:8 * 512 + 4096] == data
    assert d.in_flight() == {} and alive(child, d)


@pytest.mark.needs_root
@pytest.mark.parametrize("engine", ["io_uring", "aio"])
def test_a_backend_killed_with_many_requests_in_flight(holdable, backends, driver, engine):
    """48 O_DIRECT writes held in the kernel at once, 16 reads done around them; SIGKILL;
    the next backend resubmits exactly what was in flight (from the region), each
    request completes once, and the image holds every write. With io_uring the reads
    complete while the writes wait (they overtake them); Linux AIO's io_submit itself
    waits for the frozen file system, so there all 64 are in flight at the kill."""
    image = image_on(holdable)
    before = image.read_bytes()
    first, connection = backends(image, direct=True, engine=engine)
    d = driver(connection)
    d.start(FEATURES, inflight=True)
    writes = {3 * i: os.urandom(4096) for i in range(48)}            # heads 0, 3, .., 141
    reads = [150 + 3 * i for i in range(16)]
    holdable.hold()
    try:
        for n, (head, data) in enumerate(writes.items()):
            request(d, head, R.T_OUT, 8 * n, data)
        for n, head in enumerate(reads):
            request(d, head, R.T_IN, 8 * (100 + n), read=4096)
        order = list(writes) + reads
        random.Random(3).shuffle(order)
        d.post(order)
        held = set(writes) if engine == "io_uring" else set(order)
        if engine == "io_uring":
            assert sorted(reap(d, 16)) == reads
        wait_for(lambda: set(d.in_flight()) == held, f"all {len(held)} to be taken")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        holdable.release()                 # a held write keeps the process until then
    assert os.WTERMSIG(ended(first)) == signal.SIGKILL
    assert set(d.in_flight()) == held
    connection.close()
    second, connection = backends(image, direct=True, engine=engine)
    d.reconnect(connection, FEATURES)
    assert sorted(reap(d, len(held))) == sorted(held)
    ring = used_ring(d)
    assert len(ring) == 64 and sorted(ring) == sorted(order)            # each exactly once
    assert all(status(d, head) == R.S_OK for head in order)
    disk = image.read_bytes()
    for n, data in enumerate(writes.values()):
        assert disk[n * 4096:(n + 1) * 4096] == data
    for n, head in enumerate(reads):
        offset = (100 + n) * 4096
        assert d.memory.read(DATA_GPA + head * SLOT + 0x1000, 4096) == before[offset:offset + 4096]
    assert d.in_flight() == {} and header(d)[4] == 64
    assert alive(second, d)


def test_a_ring_stopped_with_requests_in_flight_completes_them_first(tmp_path, backends,
                                                                     driver):
    """GET_VRING_BASE on a busy O_DIRECT ring: everything taken has completed when the
    answer comes, and the answer is where the next start takes over."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MiB))
    child, connection = backends(image, direct=True)
    d = driver(connection)
    d.start(FEATURES, inflight=True)
    heads = [3 * i for i in range(60)]
    for n, head in enumerate(heads):
        request(d, head, R.T_OUT if n % 2 else R.T_IN, 8 * n, os.urandom(4096) if n % 2 else b"",
                read=0 if n % 2 else 4096)
    d.post(heads)
    base = d.frontend.stop_ring(0)
    assert d.used_idx() == base and d.in_flight() == {}
    d.restart_ring(base)
    assert len(used_ring(d)) + len(reap(d, 60 - base) if base < 60 else []) == 60
    assert sorted(used_ring(d)) == heads
    assert alive(child, d)


# -- several queues -----------------------------------------------------------------------

def blk_request(ring, kind, sector, data=b"", read=0):
    buffers = [struct.pack("<IIQ", kind, 0, sector)]
    if data:
        buffers.append(data)
    if read:
        buffers.append((read, True))
    return ring.add(buffers + [(1, True)])


@pytest.mark.parametrize("direct", [True, False])
def test_four_queues_each_served_on_its_own(tmp_path, direct):
    """MQ offered with num_queues in the configuration space; each ring has its worker
    (and, with O_DIRECT, its engine); requests on every ring at once complete on their
    own ring, and the data is right."""
    image = tmp_path / "disk.img"
    content = os.urandom(4 * MiB)
    image.write_bytes(content)
    fd = os.open(image, os.O_RDWR | (os.O_DIRECT if direct else 0))
    connection, theirs = backend_pair()
    blk = BlockDevice(fd, False, direct, None, 4)
    thread = threading.Thread(target=Backend(blk, P.Connection(theirs)).serve, daemon=True)
    thread.start()
    d = QueueDriver(connection, [64] * 4, mem_size=64 * MiB)
    try:
        features = d.start(FEATURES | VIRTIO_BLK_F_MQ)
        assert features & VIRTIO_BLK_F_MQ
        assert struct.unpack_from("<H", d.config(60), 34)[0] == 4
        reply = d.frontend._request(P.GET_QUEUE_NUM, expect_reply=True)
        assert P.U64.unpack(reply)[0] == 4
        writes = {}
        for round_ in range(3):
            pending = {}
            for ring in d.rings:
                for k in range(6):
                    sector = 8 * (ring.index * 64 + round_ * 8 + k)
                    if k % 2:
                        writes[sector] = os.urandom(4096)
                        pending[ring.index, blk_request(ring, R.T_OUT, sector, writes[sector])] = None
                    else:
                        pending[ring.index, blk_request(ring, R.T_IN, sector + 4096, read=4096)] = sector + 4096
            for ring in d.rings:
                got = 0
                while got < 6:
                    for head, written, data in ring.wait_used():
                        sector = pending.pop((ring.index, head))
                        got += 1
                        assert data[-1] == R.S_OK
                        if sector is not None:
                            assert data[:4096] == content[sector * 512:sector * 512 + 4096]
            assert not pending
        on_disk = image.read_bytes()
        for sector, data in writes.items():
            assert on_disk[sector * 512:sector * 512 + 4096] == data
        if direct:
            assert blk.requests.engine_counters()["started"] >= 72
    finally:
        connection.close()
        thread.join(10)
        d.close()
        os.close(fd)


# -- EVENT_IDX end to end -------------------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False])
def test_event_idx_loses_no_kick_and_no_interrupt(tmp_path, direct):
    """With EVENT_IDX the driver kicks only when avail_event says and waits for an
    interrupt only after setting used_event: a kick or an interrupt the backend failed
    to ask for or to send would stall a batch (reap times out). 3000 requests at depth
    32 in random batches, every one checked. (How many kicks are saved depends on who
    sleeps when: tests/unit/test_virtq.py checks avail_event and used_event exactly.)"""
    image = tmp_path / "disk.img"
    content = bytearray(os.urandom(4 * MiB))
    image.write_bytes(content)
    fd = os.open(image, os.O_RDWR | (os.O_DIRECT if direct else 0))
    connection, theirs = backend_pair()
    blk = BlockDevice(fd, False, direct, None)
    thread = threading.Thread(target=Backend(blk, P.Connection(theirs)).serve, daemon=True)
    thread.start()
    d = Driver(connection, mem_size=64 * MiB, num=128)
    rng = random.Random(5)
    try:
        assert d.start(FEATURES | VIRTIO_RING_F_EVENT_IDX) & VIRTIO_RING_F_EVENT_IDX
        assert d.event_idx
        free, outstanding, done, batches = list(range(0, 96, 3)), {}, 0, 0
        while done < 3000:
            batch = []
            for _ in range(rng.randint(1, len(free))):
                head = free.pop()
                sector = 8 * rng.randrange(1024)
                if rng.random() < 0.5 and not any(s == sector for s, _ in outstanding.values()):
                    data = os.urandom(4096)
                    request(d, head, R.T_OUT, sector, data)
                    outstanding[head] = (sector, data)
                else:
                    request(d, head, R.T_IN, sector, read=4096)
                    outstanding[head] = (sector, None)
                batch.append(head)
            d.post(batch)
            batches += 1
            for head, _ in d.reap(10):
                sector, data = outstanding.pop(head)
                assert status(d, head) == R.S_OK
                if data is None:
                    got = d.memory.read(DATA_GPA + head * SLOT + 0x1000, 4096)
                    if not any(s == sector for s, _ in outstanding.values()):
                        assert got == bytes(content[sector * 512:sector * 512 + 4096])
                else:
                    content[sector * 512:sector * 512 + 4096] = data
                free.append(head)
                done += 1
        while outstanding:
            for head, _ in d.reap(10):
                sector, data = outstanding.pop(head)
                if data is not None:
                    content[sector * 512:sector * 512 + 4096] = data
        assert 0 < d.kicks <= batches
        assert image.read_bytes() == bytes(content)
    finally:
        connection.close()
        thread.join(10)
        d.close()
        os.close(fd)

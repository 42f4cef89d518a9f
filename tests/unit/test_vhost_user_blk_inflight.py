"""The vhost-user inflight region (INFLIGHT_SHMFD) with the virtio-blk backend: what a
backend had taken and not completed when it died is resubmitted by the next one, oldest
first; nothing completes twice; a region a frontend (or a dead backend a guest had taken
over) filled with garbage is refused or ignored, never followed out of bounds.

Backends are forked and confined as the launcher does (tests/framework/disk_backend.py)
and driven from the host (tests/framework/virtio_driver.py). A request is made to be in
flight at the kill for sure by holding the writes of the file system its image is on
(FIFREEZE), or, for a seccomp kill, by a FLUSH the backend is not allowed to make.
"""

import fcntl
import logging
import os
import random
import select
import signal
import struct
import time

import pyseccomp
import pytest

from vmm.devices.virtio.block import request as R
from vmm.devices.virtio.block.device import VIRTIO_BLK_F_FLUSH, VIRTIO_F_VERSION_1
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import INFLIGHT_SEALS
from vmm.vhost_user.frontend import BackendError
from vmm.virtio.queue import inflight_queue_bytes
from tests.framework import disk_backend
from tests.framework.virtio_driver import (DATA_GPA, DESC, F_NEXT, REGION_ENTRY,
                                           REGION_HEADER, USED, Driver)

FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
NUM = 256
SLOT = 0x10000                     # guest RAM per request, by head
PART = inflight_queue_bytes(1024)  # a queue's part: for the device's largest ring
MiB = 1 << 20


@pytest.fixture
def backends():
    """spawn(image, **options) -> (child, connection); every child is killed at the end."""
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
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4 * MiB))
    return path


@pytest.fixture
def driver(backends):
    made = []

    def make(connection):
        made.append(Driver(connection, mem_size=64 * MiB, num=NUM))
        return made[-1]

    yield make
    for d in made:
        d.close()


def request(driver, head, kind, sector=0, data=b"", read=0):
    """Descriptors head, head + 1, ... for one request whose buffers are in its own
    slot of guest RAM; not made available (driver.post does that)."""
    base = DATA_GPA + head * SLOT
    driver.memory.write(base, struct.pack("<IIQ", kind, 0, sector))
    driver.memory.write(base + 0x20, b"\xff")
    chain = [(base, 16, False)]
    if data:
        driver.memory.write(base + 0x1000, data)
        chain.append((base + 0x1000, len(data), False))
    if read:
        chain.append((base + 0x1000, read, True))
    driver.write_chain(head, chain + [(base + 0x20, 1, True)])


def status(driver, head) -> int:
    return driver.memory.read(DATA_GPA + head * SLOT + 0x20, 1)[0]


def reap(driver, count, timeout=10) -> list[int]:
    """The heads of the next `count` completions, in used-ring order."""
    heads, deadline = [], time.monotonic() + timeout
    while len(heads) < count:
        heads += [head for head, _ in driver.reap(max(0.1, deadline - time.monotonic()))]
    assert len(heads) == count, heads
    return heads


def used_ring(driver) -> list[int]:
    """Every head the used ring holds so far (the ring has not wrapped in these tests)."""
    return [USED.unpack(driver.memory.read(driver.used + 4 + 8 * i, 8))[0]
            for i in range(driver.used_idx())]


def wait_for(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def ended(child, timeout=10) -> int:
    """Wait for the child to end; its os.waitpid status."""
    assert select.select([child.pidfd], [], [], timeout)[0], f"{child.name} still runs"
    child.reap(block=True)
    return child.status


def header(driver) -> tuple:
    return REGION_HEADER.unpack_from(driver.region())


def alive(child, driver) -> bool:
    """The process runs and its connection still answers."""
    driver.frontend.get_config(8)
    return child.reap() is False


def sealed_region(num_queues=1, size=None, seals=INFLIGHT_SEALS) -> P.Inflight:
    """A region made the way a backend makes one (parts for the largest ring), to fill
    by hand."""
    needed = num_queues * PART
    fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, needed if size is None else size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return P.Inflight(fd, needed, 0, num_queues, NUM)


def write_region(driver, version=1, used_idx=0, last_batch_head=0, entries=()):
    """Ring 0's part as a dead backend left it: entries (head, inflight, next, counter)."""
    region = driver.region()
    REGION_HEADER.pack_into(region, 0, 0, version, NUM, last_batch_head, used_idx)
    for head, flag, next_, counter in entries:
        REGION_ENTRY.pack_into(region, REGION_HEADER.size + REGION_ENTRY.size * head,
                               flag, next_, counter)


def publish_avail(driver, heads):
    """Make chains available without a kick (there is no backend yet)."""
    for head in heads:
        driver.memory.write(driver.avail + 4 + 2 * (driver.avail_idx % NUM),
                            struct.pack("<H", head))
        driver.avail_idx += 1
    driver.memory.write(driver.avail + 2, struct.pack("<H", driver.avail_idx))


def publish_used(driver, heads):
    """Used elements as a dead backend published them."""
    idx = driver.used_idx()
    for head in heads:
        driver.memory.write(driver.used + 4 + 8 * (idx % NUM), USED.pack(head, 1))
        idx += 1
    driver.memory.write(driver.used + 2, struct.pack("<H", idx))
    driver.used_seen = idx


# -- a real death with requests in flight ---------------------------------------------

@pytest.fixture
def holdable(tmp_path):
    """Requested before `backends`, so that it goes after them (they hold files on it)."""
    fs = disk_backend.HoldableFs(tmp_path)
    yield fs
    fs.close()


@pytest.mark.needs_root
def test_requests_in_flight_at_a_kill_are_resubmitted_oldest_first(holdable, backends, driver):
    fs = holdable
    try:
        image = fs.root / "disk.img"
        image.write_bytes(bytes(4 * MiB))
        first, connection = backends(image, serial="inflight-1")
        d = driver(connection)
        d.start(FEATURES, inflight=True)
        assert d.frontend.supports_inflight and header(d)[1] == 1     # version 1: in use
        before = os.urandom(4096)
        request(d, 200, R.T_OUT, 0, before)
        d.post([200])
        assert reap(d, 1) == [200] and status(d, 200) == R.S_OK

        # Heads out of order, so that the order of resubmission is the pop order, not
        # the heads': GET_ID and a read past the end complete at once (unpublished: a
        # batch is published at its end), then the first write blocks.
        writes = {25: os.urandom(4096), 0: os.urandom(4096), 33: os.urandom(4096)}
        fs.hold()
        request(d, 40, R.T_GET_ID, read=R.ID_BYTES)
        request(d, 10, R.T_IN, 1 << 30, read=512)
        for n, (head, data) in enumerate(writes.items()):
            request(d, head, R.T_OUT, 8 * (n + 1), data)
        d.post([40, 10, 25, 0, 33])
        wait_for(lambda: set(d.in_flight()) == {40, 10, 25}, "the backend to take three")
        counters = d.in_flight()
        assert counters[40] < counters[10] < counters[25]
        assert d.used_idx() == 1

        os.kill(first.pid, signal.SIGKILL)
        fs.release()
        assert os.WTERMSIG(ended(first)) == signal.SIGKILL
        assert d.in_flight() == counters                # the dead backend's record
        connection.close()

        # A frontend cannot ask a dead backend where it stopped; whatever base it sends
        # (here: past everything, which without the region would lose all five), the
        # region is what counts.
        second, connection = backends(image, serial="inflight-1")
        d.reconnect(connection, FEATURES, base=d.avail_idx)
        assert reap(d, 5) == [40, 10, 25, 0, 33]
        assert used_ring(d) == [200, 40, 10, 25, 0, 33]                # each once
        assert d.memory.read(DATA_GPA + 40 * SLOT + 0x1000, 10) == b"inflight-1"
        assert [status(d, h) for h in (40, 10, 25, 0, 33)] == \
            [R.S_OK, R.S_IOERR, R.S_OK, R.S_OK, R.S_OK]
        disk = image.read_bytes()
        assert disk[:4096] == before
        for n, data in enumerate(writes.values()):
            assert disk[(n + 1) * 4096:(n + 2) * 4096] == data
        assert d.in_flight() == {} and header(d)[4] == d.used_idx() == 6
        assert alive(second, d)
    finally:
        fs.release()


def trap_fdatasync(stderr_fd):
    """In the child, before it confines itself: its log (where the SIGSYS reporter
    writes) to the test, and a filter under the virtio-blk one that makes fdatasync a
    seccomp violation, so that a FLUSH kills the backend as an illegal syscall would."""
    def before():
        os.dup2(stderr_fd, 2)
        logging.getLogger().handlers = [logging.StreamHandler(open(2, "w", closefd=False))]
        f = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        f.add_rule(pyseccomp.TRAP, "fdatasync")
        f.load()
    return before


def test_requests_in_flight_at_a_seccomp_kill_are_resubmitted(image, backends, driver):
    read_end, write_end = os.pipe()
    try:
        first, connection = backends(image, before=trap_fdatasync(write_end), keep=(write_end,))
    finally:
        os.close(write_end)
    d = driver(connection)
    d.start(FEATURES, inflight=True)
    data = {5: os.urandom(4096), 30: os.urandom(4096)}
    request(d, 20, R.T_GET_ID, read=R.ID_BYTES)
    request(d, 5, R.T_OUT, 0, data[5])
    request(d, 12, R.T_FLUSH)
    request(d, 30, R.T_OUT, 8, data[30])
    d.post([20, 5, 12, 30])
    assert os.WTERMSIG(ended(first)) == signal.SIGSYS
    report = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert "seccomp violation: role=virtio-blk" in report and "(fdatasync)" in report, report
    assert set(d.in_flight()) == {20, 5, 12} and d.used_idx() == 0
    connection.close()

    second, connection = backends(image)
    d.reconnect(connection, FEATURES)
    assert reap(d, 4) == [20, 5, 12, 30] and used_ring(d) == [20, 5, 12, 30]
    assert all(status(d, h) == R.S_OK for h in (20, 5, 12, 30))
    disk = image.read_bytes()
    assert disk[:4096] == data[5] and disk[4096:8192] == data[30]
    assert alive(second, d)


# -- regions as a dead backend left them ------------------------------------------------

@pytest.mark.parametrize("cleared", [True, False], ids=["batch-cleared", "batch-published-only"])
def test_out_of_order_completions_are_neither_repeated_nor_lost(image, backends, driver, cleared):
    """Heads 7, 3, 15, 9 were taken in that order; 7 and 15 completed (out of order) and
    were published; 3 and 9 were not. Replaying the avail ring from used->idx would run
    15 twice and 3 never; the region says exactly what is left. In the second case the
    backend died between publishing used->idx for the batch (15) and clearing its entry:
    the region's used_idx lags, and its batch list says what to clear."""
    child, connection = backends(image)
    d = driver(connection)
    d.inflight = sealed_region()
    for head, sector in ((7, 0), (3, 8), (15, 16), (9, 24)):
        request(d, head, R.T_OUT, sector, bytes([head]) * 4096)
    publish_avail(d, [7, 3, 15, 9])
    publish_used(d, [7, 15])
    write_region(d, used_idx=2 if cleared else 1, last_batch_head=15,
                 entries=[(7, 0, 0, 0), (3, 1, 0, 1), (15, 0 if cleared else 1, 7, 2),
                          (9, 1, 0, 3)])
    d.reconnect(connection, FEATURES, base=2)
    assert reap(d, 2) == [3, 9]
    assert used_ring(d) == [7, 15, 3, 9]
    disk = image.read_bytes()
    assert disk[4096:8192] == bytes([3]) * 4096 and disk[12288:16384] == bytes([9]) * 4096
    assert d.in_flight() == {} and header(d)[4] == 4
    assert alive(child, d)


def test_a_fresh_region_is_initialised_where_the_ring_stands(image, backends, driver):
    """A region given to a ring that already ran (used->idx 3): version 1, used_idx 3,
    so a later death does not take the old completions for an unfinished batch."""
    child, connection = backends(image)
    d = driver(connection)
    d.inflight = sealed_region()
    for head in (0, 3, 6):
        request(d, head, R.T_FLUSH)
    publish_avail(d, [0, 3, 6])
    publish_used(d, [0, 3, 6])
    d.reconnect(connection, FEATURES, base=3)
    wait_for(lambda: header(d)[1] == 1, "the region to be taken")
    assert header(d) == (0, 1, 1024, 0, 3) and d.in_flight() == {}
    request(d, 9, R.T_FLUSH)
    d.post([9])
    assert reap(d, 1) == [9] and header(d)[4] == 4
    assert alive(child, d)


def test_resubmission_follows_the_counters_whatever_their_values(image, backends, driver):
    child, connection = backends(image)
    d = driver(connection)
    d.inflight = sealed_region()
    for head in (1, 4, 8, 12):
        request(d, head, R.T_FLUSH)
    publish_avail(d, [1, 4, 8, 12])
    write_region(d, entries=[(1, 1, 0, 2**64 - 1), (4, 1, 0, 0), (8, 1, 0, 5), (12, 1, 0, 5)])
    d.reconnect(connection, FEATURES, base=0)
    assert reap(d, 4) == [4, 8, 12, 1]
    assert alive(child, d)


# -- hostile regions --------------------------------------------------------------------

def refused(d, region):
    with pytest.raises(BackendError, match="refused"):
        d.frontend.set_inflight_fd(region)


def test_set_inflight_fd_refuses_what_it_cannot_map_safely(image, backends, driver):
    child, connection = backends(image)
    d = driver(connection)
    d._negotiate(FEATURES)
    good = sealed_region()
    try:
        for bad in (P.Inflight(good.fd, good.mmap_size - 1, 0, 1, NUM),     # too small
                    P.Inflight(good.fd, good.mmap_size, 0, 0, NUM),         # no queue
                    P.Inflight(good.fd, good.mmap_size, 0, 2, NUM),         # queues it lacks
                    P.Inflight(good.fd, good.mmap_size, 0, 1, 0),
                    P.Inflight(good.fd, 2**64 - 1, 0, 1, 1025),             # > 1024 entries
                    P.Inflight(good.fd, good.mmap_size, 4096, 1, NUM),      # past the file
                    P.Inflight(good.fd, good.mmap_size, 2**63, 1, NUM)):
            refused(d, bad)
        big = sealed_region(size=3 * 4096)
        refused(d, P.Inflight(big.fd, big.mmap_size, 100, 1, NUM))        # unaligned offset
        big.close()
        for bad_fd in (sealed_region(seals=0), sealed_region(size=4096),
                       sealed_region(seals=fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)):
            refused(d, bad_fd)                  # unsealed, too small, free to shrink
            bad_fd.close()
        # Not a memfd at all, and no fd.
        with open(image, "rb") as f:
            refused(d, P.Inflight(f.fileno(), good.mmap_size, 0, 1, NUM))
        with pytest.raises(BackendError, match="refused"):
            d.frontend._request(P.SET_INFLIGHT_FD, good.pack())
        with pytest.raises(BackendError, match="refused"):
            d.frontend._request(P.SET_INFLIGHT_FD, good.pack()[:16], (good.fd,))
        assert alive(child, d)
        d.frontend.set_inflight_fd(good)                 # and the good one is taken
    finally:
        good.close()


def test_get_inflight_fd_refuses_sizes_it_does_not_serve(image, backends, driver):
    child, connection = backends(image)
    d = driver(connection)
    d._negotiate(FEATURES)
    for queues, size in ((0, NUM), (2, NUM), (1, 0), (1, 1025)):
        with pytest.raises(BackendError, match="no region"):
            d.frontend.get_inflight_fd(queues, size)
    for size in (128, 1024):
        region = d.frontend.get_inflight_fd(1, size)
        assert fcntl.fcntl(region.fd, fcntl.F_GET_SEALS) == INFLIGHT_SEALS
        # For the largest ring whatever the queue size asked: ALIGN_UP(16 * 1024 + 2, 64).
        assert region.mmap_size == os.fstat(region.fd).st_size == 16448
        assert (region.num_queues, region.queue_size) == (1, size)
        region.close()
    assert alive(child, d)


def test_rings_larger_than_the_queue_size_named_are_tracked(image, backends, driver):
    """QEMU's virtio-mmio offers the driver rings of 1024 whatever its queue-size (128):
    the ring the guest picks is still covered."""
    child, connection = backends(image)
    d = driver(connection)
    d._negotiate(FEATURES)
    d.inflight = d.frontend.get_inflight_fd(1, 128)
    d._start(0)
    for head in (200, 250):
        request(d, head, R.T_FLUSH)
    d.post([200, 250])
    assert reap(d, 2) == [200, 250]
    assert header(d)[1:] == (1, 1024, 250, 2)
    assert alive(child, d)


@pytest.mark.parametrize("version", [2, 0xFFFF])
def test_a_region_it_does_not_know_keeps_the_ring_from_starting(image, backends, driver,
                                                                version):
    """An unknown version: the ring is refused (it never serves) rather than tracked in
    a layout we may not have; the backend lives on."""
    child, connection = backends(image)
    d = driver(connection)
    d.inflight = sealed_region()
    REGION_HEADER.pack_into(d.region(), 0, 0, version, NUM, 0, 0)
    request(d, 0, R.T_FLUSH)
    publish_avail(d, [0])
    d.reconnect(connection, FEATURES, base=0)
    with pytest.raises(TimeoutError):
        d.reap(0.5)
    assert alive(child, d)


def test_garbage_regions_do_not_take_the_backend_out_of_bounds(image, backends, driver):
    """Random bytes in every field, heads and next links out of range, flags other than
    0 and 1, a used_idx far from used->idx: each ring start is refused or resubmits only
    heads < num whose entry says exactly 1, whose chains are then checked like any (here
    they are garbage descriptors, so the ring is broken). The backend never crashes."""
    rng = random.Random(11)
    for round_ in range(12):
        child, connection = backends(image, name=f"vmm-blk-g{round_}")
        d = driver(connection)
        d.inflight = sealed_region()
        region = d.region()
        region[:] = bytes(rng.getrandbits(8) for _ in range(len(region)))
        if round_ % 2:
            REGION_HEADER.pack_into(region, 0, rng.getrandbits(64), 1, rng.getrandbits(16),
                                    rng.choice([NUM, 300, 65535, rng.getrandbits(16)]),
                                    rng.getrandbits(16))
        for i in range(NUM):
            flags = rng.getrandbits(16) & ~F_NEXT | F_NEXT * (i % 3 == 0)
            DESC.pack_into(d.view, d.offset(d.desc + 16 * i, 16), rng.getrandbits(64),
                           rng.getrandbits(32), flags, rng.getrandbits(16))
        publish_avail(d, [rng.randrange(NUM) for _ in range(rng.randrange(8))])
        d.reconnect(connection, FEATURES, base=rng.getrandbits(16))
        time.sleep(0.05)
        assert alive(child, d), f"round {round_}"
        connection.close()
        assert os.WIFEXITED(ended(child)), f"round {round_}: {child.describe_end()}"

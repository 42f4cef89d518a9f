"""The split-virtqueue walker (native/virtq.c through vmm.virtio.queue) against rings
built by hand, honest and hostile.

Guest RAM here is laid out as the VMM lays it out (vmm.layout.ram_regions: [0, 3.25 GiB)
and [4 GiB, 4 GiB + 1 MiB)), backed by a real memfd, and each region is mapped with
PROT_NONE guard pages on both sides: an access by the walker outside guest RAM kills the
test run with SIGSEGV instead of passing unnoticed. Only the pages the tests touch are
ever allocated.
"""

import ctypes
import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm import layout
from vmm._virtq import ffi, lib
from vmm.machine.memory import create_memfd
from vmm.virtio.queue import Chain, QueueBroken, Virtqueue

MiB, GiB = 1 << 20, 1 << 30
NEXT, WRITE, INDIRECT = 1, 2, 4
NO_INTERRUPT = 1
MAX_SEGS, MAX_INDIRECT = lib.VQ_MAX_SEGS, lib.VQ_MAX_INDIRECT

MEM_SIZE = layout.MMIO_HOLE_START + 1 * MiB
LOW_END = layout.MMIO_HOLE_START
HIGH = layout.HIGH_RAM_START
HIGH_END = HIGH + 1 * MiB

# Where the tests put things in guest RAM (all in the low region unless a test moves them).
DESC, AVAIL, USED = 0x100000, 0x200000, 0x220000   # room for num = 32768
TABLE = 0x300000                                   # indirect tables, up to 1 MiB + 16
BUF = 0x500000
SCRATCH_END = 0x600000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE, MAP_FIXED, MAP_NORESERVE = 0, 0x10, 0x4000
PAGE = mmap.PAGESIZE


def _check(result):
    if result in (None, ctypes.c_void_p(-1).value) or result == -1:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


class GuardedRam:
    """Guest RAM in a memfd, each region mapped between two PROT_NONE guard pages."""

    def __init__(self, mem_size: int):
        self.fd = create_memfd(mem_size, "virtq-test-ram")
        spans = layout.ram_regions(mem_size)
        self.total = PAGE + sum(size + PAGE for _, size in spans)
        self.base = _check(_libc.mmap(None, self.total, PROT_NONE,
                                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                                      -1, 0))
        self.regions = []      # (gpa, size, host address): what Virtqueue takes
        host, offset = self.base + PAGE, 0
        for gpa, size in spans:
            _check(_libc.mmap(host, size, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_SHARED | MAP_FIXED, self.fd, offset))
            self.regions.append((gpa, size, host))
            host += size + PAGE
            offset += size

    def host(self, gpa: int, length: int = 1) -> int:
        for start, size, host in self.regions:
            if start <= gpa and gpa + length <= start + size:
                return host + gpa - start
        raise AssertionError(f"test bug: [{gpa:#x}, +{length:#x}) not in RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        return memoryview(ffi.buffer(ffi.cast("uint8_t *", self.host(gpa, length)), length))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def protect(self, gpa: int, length: int, prot: int) -> None:
        start = self.host(gpa, length) & ~(PAGE - 1)
        assert _libc.mprotect(start, self.host(gpa, length) + length - start, prot) == 0

    def contains_host(self, address: int, length: int) -> bool:
        return any(host <= address and address + length <= host + size
                   for _, size, host in self.regions)

    def close(self) -> None:
        _libc.munmap(self.base, self.total)
        os.close(self.fd)


@pytest.fixture(scope="module")
def ram():
    memory = GuardedRam(MEM_SIZE)
    assert [(gpa, size) for gpa, size, _ in memory.regions] == [(0, LOW_END), (HIGH, 1 * MiB)]
    yield memory
    memory.close()


class Rings:
    """A driver's view: writes descriptors and makes chains available."""

    def __init__(self, ram, num, desc=DESC, avail=AVAIL, used=USED, avail_idx=0, used_idx=0):
        self.ram, self.num = ram, num
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        if desc < SCRATCH_END:
            ram.write(DESC, bytes(SCRATCH_END - DESC))
        self.avail_idx = avail_idx
        ram.write(avail + 2, struct.pack("<H", avail_idx))
        ram.write(used + 2, struct.pack("<H", used_idx))

    def desc(self, index, addr, length, flags=0, next=0, table=None):
        base = self.desc_gpa if table is None else table
        self.ram.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def make_available(self, *heads):
        for head in heads:
            self.ram.write(self.avail_gpa + 4 + 2 * (self.avail_idx % self.num),
                           struct.pack("<H", head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx):
        self.ram.write(self.avail_gpa + 2, struct.pack("<H", idx))

    def set_avail_flags(self, flags):
        self.ram.write(self.avail_gpa, struct.pack("<H", flags))

    def used_idx(self):
        return struct.unpack("<H", self.ram.read(self.used_gpa + 2, 2))[0]

    def used_elem(self, slot):
        return struct.unpack("<II", self.ram.read(self.used_gpa + 4 + 8 * (slot % self.num), 8))

    def queue(self, last_avail_idx=0):
        return Virtqueue(self.ram.regions, self.num, self.desc_gpa, self.avail_gpa,
                         self.used_gpa, last_avail_idx)


def in_ram(ram, chain: Chain) -> bool:
    return all(length > 0 and ram.contains_host(address, length)
               for address, length in chain.iovecs)


def assert_broken(queue):
    with pytest.raises(QueueBroken):
        queue.pop()
    assert queue.broken


# --- honest rings ---------------------------------------------------------------------

def test_request_round_trip_through_pop_and_push(ram):
    rings = Rings(ram, 256)
    header, data, status = BUF, HIGH + 0x1000, BUF + 0x2000     # data in the high region
    ram.write(header, b"HEADER-16-BYTES!")
    rings.desc(7, header, 16, NEXT, 3)
    rings.desc(3, data, 4096, WRITE | NEXT, 200)
    rings.desc(200, status, 1, WRITE)
    rings.make_available(7)
    queue = rings.queue()

    chain = queue.pop()
    assert chain.head == 7
    assert [bytes(view) for view in chain.readable] == [b"HEADER-16-BYTES!"]
    assert [len(view) for view in chain.writable] == [4096, 1]
    assert chain.readable_bytes == 16 and chain.writable_bytes == 4097
    assert chain.iovecs == [(ram.host(header), 16), (ram.host(data), 4096), (ram.host(status), 1)]
    chain.writable[0][:] = b"\xab" * 4096                      # zero-copy: straight into RAM
    chain.writable[1][0] = 0
    assert queue.pop() is None

    queue.push(chain.head, 4097)
    assert rings.used_idx() == 1
    assert rings.used_elem(0) == (7, 4097)
    assert ram.read(data, 4096) == b"\xab" * 4096 and ram.read(status, 1) == b"\0"
    assert queue.last_avail_idx == 1
    assert queue.needs_interrupt()
    rings.set_avail_flags(NO_INTERRUPT)
    assert not queue.needs_interrupt()


def test_several_chains_in_order_with_indices_wrapping_at_65536(ram):
    rings = Rings(ram, 4, avail_idx=65534, used_idx=65535)
    for index in range(4):
        rings.desc(index, BUF + 0x100 * index, 0x10 + index, WRITE)
    rings.make_available(2, 0, 3)                     # avail idx 65534 -> 1
    queue = rings.queue(last_avail_idx=65534)
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
        queue.push(chain.head, len(chain.writable[0]))
    assert heads == [2, 0, 3] and queue.last_avail_idx == 1
    assert rings.used_idx() == 2                      # 65535 + 3, mod 2^16
    assert [rings.used_elem(slot) for slot in (65535, 0, 1)] == [(2, 0x12), (0, 0x10), (3, 0x13)]


def test_indirect_tables_at_the_head_and_after_direct_descriptors(ram):
    rings = Rings(ram, 8)
    rings.desc(0, TABLE, 3 * 16, INDIRECT | WRITE)    # WRITE on the table itself: ignored
    rings.desc(0, BUF, 10, NEXT, 2, table=TABLE)
    rings.desc(2, BUF + 0x100, 20, WRITE | NEXT, 1, table=TABLE)
    rings.desc(1, BUF + 0x200, 30, WRITE, table=TABLE)
    rings.desc(5, BUF + 0x300, 40, NEXT, 6)
    rings.desc(6, TABLE + 0x100, 16, INDIRECT)
    rings.desc(0, BUF + 0x400, 50, WRITE, table=TABLE + 0x100)
    rings.make_available(0, 5)
    queue = rings.queue()
    first, second = queue.pop(), queue.pop()
    assert [len(v) for v in first.readable] == [10] and [len(v) for v in first.writable] == [20, 30]
    assert [len(v) for v in second.readable] == [40] and [len(v) for v in second.writable] == [50]


@pytest.mark.parametrize("desc, avail, used", [
    (LOW_END - 16 * 8, HIGH_END - (6 + 2 * 8), USED),
    (HIGH_END - 16 * 8, LOW_END - (6 + 2 * 8), HIGH_END - 0x100 - (6 + 8 * 8 + 2)),
    (DESC, AVAIL, HIGH_END - (6 + 8 * 8 + 2)),        # the last 4-aligned place for it
])
def test_rings_flush_against_the_guard_pages(ram, desc, avail, used):
    # Each ring ends at (or within alignment of) a region's last byte: one byte too far
    # would fault.
    rings = Rings(ram, 8, desc=desc, avail=avail, used=used)
    rings.desc(7, BUF, 16, WRITE)
    rings.make_available(7)
    queue = rings.queue()
    chain = queue.pop()
    assert chain.head == 7
    queue.push(chain.head, 16)
    assert rings.used_elem(0) == (7, 16) and rings.used_idx() == 1


def test_buffers_flush_against_the_guard_pages(ram):
    rings = Rings(ram, 8)
    ram.write(LOW_END - 100, bytes(range(100)))
    rings.desc(7, LOW_END - 100, 100, NEXT, 0)
    rings.desc(0, HIGH_END - 1, 1, WRITE)
    rings.make_available(7)
    chain = rings.queue().pop()
    assert bytes(chain.readable[0]) == bytes(range(100))
    chain.writable[0][0] = 0x55
    assert ram.read(HIGH_END - 1, 1) == b"\x55"


def test_a_chain_of_exactly_num_descriptors_and_of_max_segments(ram):
    rings = Rings(ram, MAX_SEGS)
    for index in range(MAX_SEGS):
        rings.desc(index, BUF, 1, NEXT if index < MAX_SEGS - 1 else 0, index + 1)
    rings.make_available(0)
    chain = rings.queue().pop()
    assert len(chain.readable) == MAX_SEGS and chain.readable_bytes == MAX_SEGS


def test_a_full_ring_is_fine(ram):
    rings = Rings(ram, 4)
    for index in range(4):
        rings.desc(index, BUF, 1)
    rings.make_available(0, 1, 2, 3)                  # avail idx exactly num ahead
    queue = rings.queue()
    assert [queue.pop().head for _ in range(4)] == [0, 1, 2, 3] and queue.pop() is None


def test_total_of_exactly_4_gib_is_accepted(ram):
    rings = Rings(ram, 2)
    rings.desc(0, 0, 2 * GiB, NEXT, 1)
    rings.desc(1, GiB, 2 * GiB, WRITE)                 # buffers may overlap; only the total counts
    rings.make_available(0)
    chain = rings.queue().pop()
    assert chain.readable_bytes + chain.writable_bytes == 4 * GiB


# --- hostile rings: each one breaks the queue, and touches nothing outside RAM --------

def one_descriptor(ram, addr, length, flags=0):
    rings = Rings(ram, 4)
    rings.desc(0, addr, length, flags)
    rings.make_available(0)
    return rings.queue()


@pytest.mark.parametrize("addr, length", [
    (HIGH_END, 1),                        # just past RAM
    (HIGH_END - 8, 16),                   # straddling the end of RAM
    (MEM_SIZE, 0x1000),                   # where a flat mapping of MEM_SIZE would end
    (LOW_END, 1),                         # the 32-bit hole
    (LOW_END - 8, 16),                    # straddling into the hole
    (0xFEE0_0000, 4),                     # the LAPIC, inside the hole
    (HIGH - 4, 8),                        # straddling out of the hole into high RAM
    (LOW_END - 8, HIGH - LOW_END + 16),   # spanning the whole hole: both ends in RAM
    (2**64 - 8, 16),                      # wraps around 2^64 to 8
    (2**64 - 1, 0xFFFF_FFFF),             # wraps to just below 4 GiB
    (2**64 - 0x1000, 0x2000),             # wraps into low RAM
])
@pytest.mark.parametrize("flags", [0, WRITE])
def test_buffers_outside_ram(ram, addr, length, flags):
    assert_broken(one_descriptor(ram, addr, length, flags))


@pytest.mark.parametrize("addr, length", [(HIGH_END - 8, 16), (LOW_END, 16), (2**64 - 16, 32)])
def test_indirect_buffers_outside_ram(ram, addr, length):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 16, INDIRECT)
    rings.desc(0, addr, length, WRITE, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_descriptor_loop(ram):
    rings = Rings(ram, 4)
    rings.desc(0, BUF, 1, NEXT, 1)
    rings.desc(1, BUF, 1, NEXT, 0)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_65536_step_chain_around_the_largest_ring(ram):
    num = 32768
    rings = Rings(ram, num)
    ram.write(DESC, b"".join(struct.pack("<QIHH", BUF, 1, NEXT, (index + 1) % num)
                             for index in range(num)))
    rings.make_available(0)
    assert_broken(rings.queue())        # stops after num + 1 steps, well before 65536


def test_indirect_table_of_65536_entries(ram):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 65536 * 16, INDIRECT)
    rings.make_available(0)
    assert_broken(rings.queue())        # over VQ_MAX_INDIRECT: refused before it is read


@pytest.mark.parametrize("entries, ok", [(MAX_INDIRECT, True), (MAX_INDIRECT + 1, False)])
def test_indirect_table_size_cap(ram, entries, ok):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 16 * entries, INDIRECT)
    rings.desc(0, BUF, 16, WRITE, table=TABLE)        # the walk itself uses one entry
    rings.make_available(0)
    queue = rings.queue()
    if ok:
        assert len(queue.pop().writable) == 1
    else:
        assert_broken(queue)


def test_loop_inside_an_indirect_table(ram):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 2 * 16, INDIRECT)
    rings.desc(0, BUF, 1, NEXT, 1, table=TABLE)
    rings.desc(1, BUF, 1, NEXT, 0, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_more_than_max_segments(ram):
    rings = Rings(ram, 2 * MAX_SEGS)
    for index in range(MAX_SEGS + 1):
        rings.desc(index, BUF, 1, NEXT if index < MAX_SEGS else 0, index + 1)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_more_than_4_gib_in_total(ram):
    rings = Rings(ram, 2)
    rings.desc(0, 0, 2 * GiB, NEXT, 1)
    rings.desc(1, 0, 2 * GiB + 1, WRITE)
    rings.make_available(0)
    assert_broken(rings.queue())


@pytest.mark.parametrize("where", ["direct", "indirect"])
def test_zero_length_buffers(ram, where):
    rings = Rings(ram, 4)
    if where == "direct":
        rings.desc(0, BUF, 16, NEXT, 1)
        rings.desc(1, BUF, 0, WRITE)
    else:
        rings.desc(0, TABLE, 32, INDIRECT)
        rings.desc(0, BUF, 16, NEXT, 1, table=TABLE)
        rings.desc(1, BUF, 0, WRITE, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_zero_length_buffer_with_a_hostile_address(ram):
    assert_broken(one_descriptor(ram, 2**64 - 1, 0))


@pytest.mark.parametrize("where", ["direct", "indirect", "direct then indirect"])
def test_readable_after_writable(ram, where):
    rings = Rings(ram, 4)
    if where == "direct":
        rings.desc(0, BUF, 16, WRITE | NEXT, 1)
        rings.desc(1, BUF, 16, 0)
    elif where == "indirect":
        rings.desc(0, TABLE, 32, INDIRECT)
        rings.desc(0, BUF, 16, WRITE | NEXT, 1, table=TABLE)
        rings.desc(1, BUF, 16, 0, table=TABLE)
    else:
        rings.desc(0, BUF, 16, WRITE | NEXT, 1)
        rings.desc(1, TABLE, 16, INDIRECT)
        rings.desc(0, BUF, 16, 0, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_nested_indirect_table(ram):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 16, INDIRECT)
    rings.desc(0, TABLE + 0x100, 16, INDIRECT, table=TABLE)
    rings.desc(0, BUF, 16, 0, table=TABLE + 0x100)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_indirect_with_next(ram):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    rings.desc(1, BUF, 16, WRITE)
    rings.desc(0, BUF, 16, 0, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


@pytest.mark.parametrize("length", [0, 8, 24, 16 * 3 + 1])
def test_indirect_table_length_not_a_multiple_of_16(ram, length):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, length, INDIRECT)
    for index in range(4):
        rings.desc(index, BUF, 16, 0, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


@pytest.mark.parametrize("addr", [HIGH_END - 16 * 3, LOW_END - 16, 2**64 - 32])
def test_indirect_table_outside_ram(ram, addr):
    rings = Rings(ram, 4)
    rings.desc(0, addr, 16 * 4, INDIRECT)
    rings.make_available(0)
    assert_broken(rings.queue())


def test_indirect_next_past_the_table(ram):
    rings = Rings(ram, 4)
    rings.desc(0, TABLE, 32, INDIRECT)
    rings.desc(0, BUF, 16, NEXT, 2, table=TABLE)     # entry 2 would be the table's 33rd byte
    rings.desc(2, BUF, 16, 0, table=TABLE)
    rings.make_available(0)
    assert_broken(rings.queue())


# In the index tests, valid-looking descriptors lie just past the table, so an index
# that is not checked would be walked rather than happen to break on zeroed memory.

@pytest.mark.parametrize("head", [4, 5, 0xFFFF])
def test_head_index_out_of_range(ram, head):
    rings = Rings(ram, 4)
    for index in range(4, 8):
        rings.desc(index, BUF, 16)
    rings.make_available(head)
    assert_broken(rings.queue())


def test_next_index_out_of_range(ram):
    rings = Rings(ram, 4)
    rings.desc(0, BUF, 16, NEXT, 4)
    rings.desc(4, BUF, 16)
    rings.make_available(0)
    assert_broken(rings.queue())


@pytest.mark.parametrize("ahead", [5, 0x8000, 0xFFFF])
def test_avail_idx_more_than_num_ahead(ram, ahead):
    rings = Rings(ram, 4)
    for index in range(4):
        rings.desc(index, BUF, 1)
    rings.set_avail_idx(ahead)
    assert_broken(rings.queue())


def test_avail_idx_moving_backwards(ram):
    rings = Rings(ram, 4)
    for index in range(4):
        rings.desc(index, BUF, 1)
    rings.make_available(0, 1)
    queue = rings.queue()
    assert queue.pop().head == 0 and queue.pop().head == 1
    rings.set_avail_idx(1)                               # 0xFFFF ahead of us
    assert_broken(queue)


def test_once_broken_stays_broken_and_never_touches_guest_memory(ram):
    rings = Rings(ram, 4)
    rings.desc(0, BUF, 16, NEXT, 9)
    rings.desc(1, BUF, 16, WRITE)
    rings.make_available(0, 1)
    queue = rings.queue()
    assert_broken(queue)
    rings.desc(0, BUF, 16, WRITE)                         # the guest "fixes" its ring
    used_before = ram.read(USED, 64)
    # Every page of the rings becomes inaccessible: any access now would fault.
    ram.protect(DESC, SCRATCH_END - DESC, PROT_NONE)
    try:
        for _ in range(3):
            with pytest.raises(QueueBroken):
                queue.pop()
        queue.push(0, 16)
        assert not queue.needs_interrupt()
        assert queue.last_avail_idx == 0
    finally:
        ram.protect(DESC, SCRATCH_END - DESC, mmap.PROT_READ | mmap.PROT_WRITE)
    assert ram.read(USED, 64) == used_before
    assert_broken(queue)


def test_a_new_setup_clears_broken(ram):
    rings = Rings(ram, 4)
    rings.make_available(7)
    assert_broken(rings.queue())
    rings = Rings(ram, 4)
    rings.desc(0, BUF, 1)
    rings.make_available(0)
    assert rings.queue().pop().head == 0


# --- setup ---------------------------------------------------------------------------

def test_last_avail_idx_get_and_set(ram):
    rings = Rings(ram, 4, avail_idx=100)
    rings.desc(2, BUF, 1)
    rings.desc(1, BUF, 2)
    rings.make_available(2, 1)
    queue = rings.queue(last_avail_idx=100)
    assert queue.last_avail_idx == 100                          # GET_VRING_BASE
    queue.last_avail_idx = 101                                  # SET_VRING_BASE
    assert queue.pop().head == 1 and queue.last_avail_idx == 102


@pytest.mark.parametrize("num, desc, avail, used", [
    (0, DESC, AVAIL, USED),
    (3, DESC, AVAIL, USED),
    (65536, DESC, AVAIL, USED),
    (2**32 + 4, DESC, AVAIL, USED),
    (4, DESC + 8, AVAIL, USED),                 # desc misaligned
    (4, DESC, AVAIL + 1, USED),                 # avail misaligned
    (4, DESC, AVAIL, USED + 2),                 # used misaligned
    (256, HIGH_END - 16 * 255, AVAIL, USED),    # desc table runs past RAM
    (256, LOW_END - 16 * 255, AVAIL, USED),     # ... into the hole
    (4, DESC, LOW_END - 12, USED),              # avail ring (14 bytes) into the hole
    (4, DESC, AVAIL, HIGH_END - 36),            # used ring (38 bytes) past RAM
    (4, 2**64 - 64, AVAIL, USED),               # wraps around 2^64
    (4, DESC, AVAIL, 2**64),                    # not even a u64
    (4, -16, AVAIL, USED),
])
def test_setup_refuses_bad_rings(ram, num, desc, avail, used):
    with pytest.raises(ValueError):
        Virtqueue(ram.regions, num, desc, avail, used)


def test_setup_largest_queue(ram):
    queue = Rings(ram, 32768).queue()
    assert queue.pop() is None and not queue.broken


@pytest.mark.parametrize("regions", [
    [],
    [(0, 4096, "RAM")] * 9,                                     # too many
    [(0, 0, "RAM")],                                            # empty
    [(0, 4096, 0)],                                             # no host address
    [(2**64 - 4096, 8192, "RAM")],                              # wraps around 2^64
    [(0, 8192, "RAM"), (4096, 4096, "RAM")],                    # overlapping
    [(0, 8192, "RAM"), (0, 4096, "RAM")],
    [(0, 4096, 2**64 - 2048)],                                  # host side wraps
    [(0, 4096, -1)],
])
def test_setup_refuses_bad_region_tables(ram, regions):
    # Real host memory wherever it can be, so a table wrongly accepted fails the
    # assertion rather than crashing the run.
    regions = [(gpa, size, ram.host(BUF) if host == "RAM" else host)
               for gpa, size, host in regions]
    with pytest.raises(ValueError):
        Virtqueue(regions, 4, 0, 64, 128)


def test_translate_is_one_region_only(ram):
    mem = ffi.new("struct vq_mem *")
    table = ffi.new("struct vq_region[]", [(gpa, size, ffi.cast("uint8_t *", host))
                                           for gpa, size, host in ram.regions])
    assert lib.vq_mem_init(mem, table, len(ram.regions)) == 0
    address = lambda gpa, length: int(ffi.cast("uintptr_t", lib.vq_translate(mem, gpa, length)))
    assert address(0, 1) == ram.host(0)
    assert address(LOW_END - 1, 1) == ram.host(LOW_END - 1)
    assert address(HIGH, 1 * MiB) == ram.host(HIGH)
    for gpa, length in [(0, 0), (LOW_END - 1, 2), (LOW_END, 1), (HIGH - 1, 2), (HIGH_END, 1),
                        (2**64 - 1, 1), (2**64 - 1, 2**64 - 1), (1, 2**64 - 1)]:
        assert lib.vq_translate(mem, gpa, length) == ffi.NULL, (hex(gpa), hex(length))


# --- property: random rings ----------------------------------------------------------

def _reference_pop(read_desc, inside, num, head):
    """The walk as the module documents it, in Python: (gpa, len, is_write) segments, or
    None for a malformed chain."""
    segments = []

    def add(addr, length, flags):
        write = bool(flags & WRITE)
        if length == 0 or len(segments) == MAX_SEGS or not inside(addr, length):
            return False
        if not write and any(w for _, _, w in segments):
            return False
        segments.append((addr, length, write))
        return sum(length for _, length, _ in segments) <= 1 << 32

    index, steps = head, 0
    while True:
        steps += 1
        if steps > num:
            return None
        addr, length, flags, nxt = read_desc(DESC + 16 * index)
        if flags & INDIRECT:
            if flags & NEXT or length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                return None
            if not inside(addr, length):
                return None
            entries, entry, steps = length // 16, 0, 0
            while True:
                steps += 1
                if steps > entries:
                    return None
                e_addr, e_len, e_flags, e_next = read_desc(addr + 16 * entry)
                if e_flags & INDIRECT or not add(e_addr, e_len, e_flags):
                    return None
                if not e_flags & NEXT:
                    return segments
                entry = e_next
                if entry >= entries:
                    return None
        if not add(addr, length, flags):
            return None
        if not flags & NEXT:
            return segments
        index = nxt
        if index >= num:
            return None


# Two kinds of random rings: anything at all (mostly broken at once), and well-formed
# rings (chains of plausible buffers, some ending in an indirect table) with a few
# random bytes overwritten, which reach deep into the walk and often stay valid, so the
# comparison with the reference covers the success path too.
ADDRESSES = st.one_of(
    st.sampled_from([0, BUF, TABLE, TABLE + 0x40, LOW_END - 16, LOW_END, HIGH - 8, HIGH,
                     HIGH_END - 32, HIGH_END, MEM_SIZE, 2**64 - 16, 2**64 - 1]),
    st.integers(BUF, BUF + 0x1000),
    st.integers(HIGH_END - 0x100, HIGH_END + 0x100),
    st.integers(0, 2**64 - 1))
LENGTHS = st.one_of(st.sampled_from([0, 1, 16, 32, 48, 64, 0x1000, 2**31, 2**32 - 1]),
                    st.integers(0, 0x200), st.integers(0, 2**32 - 1))
FLAGS = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
TABLE_ENTRIES = 6


def packed(entries):
    return b"".join(struct.pack("<QIHH", *entry) for entry in entries)


@st.composite
def anything(draw, num):
    """(gpa, bytes) writes and ("ring", heads): any descriptors, any indirect table, any avail ring."""
    def hostile(count):
        return st.lists(st.tuples(ADDRESSES, LENGTHS, FLAGS, st.integers(0, count + 2)),
                        min_size=count, max_size=count)
    ring = draw(st.lists(st.integers(0, 0xFFFF), min_size=num, max_size=num))
    return [(DESC, packed(draw(hostile(num)))),
            (TABLE, packed(draw(hostile(TABLE_ENTRIES)))),
            ("ring", ring)], draw(st.integers(0, 0xFFFF))


@st.composite
def well_formed(draw, num):
    """(gpa, bytes) writes and ("ring", heads) making chains available, and how many."""
    order = draw(st.permutations(range(num)))
    cuts = sorted(draw(st.sets(st.integers(1, num - 1), max_size=num - 1))) if num > 1 else []
    chains = [order[a:b] for a, b in zip([0] + cuts, cuts + [num])]
    buffer = st.tuples(st.integers(BUF, BUF + 0x1000), st.integers(1, 0x200))
    table = [0] * num
    used_table = False
    for chain in chains:
        readable = draw(st.integers(0, len(chain)))
        for position, index in enumerate(chain):
            addr, length = draw(buffer)
            last = position == len(chain) - 1
            flags = (0 if last else NEXT) | (WRITE if position >= readable else 0)
            if last and not used_table and draw(st.booleans()):
                used_table = True
                addr, length, flags = TABLE, 16 * TABLE_ENTRIES, INDIRECT
            table[index] = (addr, length, flags, 0 if last else chain[position + 1])
    entries = [(*draw(buffer), WRITE | NEXT, index + 1) for index in range(TABLE_ENTRIES)]
    entries[-1] = (entries[-1][0], entries[-1][1], WRITE, 0)
    heads = [chain[0] for chain in chains]
    return [(DESC, packed(table)), (TABLE, packed(entries)),
            ("ring", heads)], len(heads)


@st.composite
def random_rings(draw):
    num = draw(st.sampled_from([1, 2, 4, 8, 16]))
    writes, ahead = draw(st.one_of(anything(num), well_formed(num)))
    ring_bytes = [(DESC, 16 * num), (TABLE, 16 * TABLE_ENTRIES), (AVAIL, 4 + 2 * num)]
    for _ in range(draw(st.integers(0, 3))):              # corrupt a few bytes
        base, size = draw(st.sampled_from(ring_bytes))
        writes.append((base + draw(st.integers(0, size - 1)), bytes([draw(st.integers(0, 255))])))
    last = draw(st.integers(0, 0xFFFF))
    return num, writes, last, (last + ahead) & 0xFFFF


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_rings())
def test_random_rings_never_escape_ram_and_match_the_reference(ram, spec):
    num, writes, last, avail_idx = spec
    rings = Rings(ram, num)
    for gpa, data in writes:
        if gpa == "ring":         # heads go from the slot last_avail_idx points at
            for offset, head in enumerate(data):
                ram.write(AVAIL + 4 + 2 * ((last + offset) % num), struct.pack("<H", head))
        else:
            ram.write(gpa, data)
    rings.set_avail_idx(avail_idx)
    queue = rings.queue(last_avail_idx=last)

    def read_desc(gpa):
        return struct.unpack("<QIHH", ram.read(gpa, 16))

    def inside(gpa, length):
        return any(start <= gpa and gpa + length <= start + size
                   for start, size, _ in ram.regions)

    pending = (avail_idx - last) & 0xFFFF
    for popped in range(num + 1):
        if pending > num:
            assert_broken(queue)
            return
        if popped == pending:
            assert queue.pop() is None
            return
        slot = (last + popped) % num
        head = struct.unpack("<H", ram.read(AVAIL + 4 + 2 * slot, 2))[0]
        expected = None if head >= num else _reference_pop(read_desc, inside, num, head)
        if expected is None:
            assert_broken(queue)
            return
        chain = queue.pop()
        assert in_ram(ram, chain)
        assert chain.head == head
        assert chain.iovecs == [(ram.host(gpa, length), length) for gpa, length, _ in expected]
        assert len(chain.writable) == sum(write for _, _, write in expected)
        queue.push(chain.head, popped)
        assert rings.used_elem(popped) == (head, popped)


# --- VIRTIO_RING_F_EVENT_IDX --------------------------------------------------------------

def used_event(rings, value):
    """The driver's used_event: avail->ring[num]."""
    rings.ram.write(rings.avail_gpa + 4 + 2 * rings.num, struct.pack("<H", value))


def avail_event(rings) -> int:
    """The device's avail_event: used->ring[num]."""
    return struct.unpack("<H", rings.ram.read(rings.used_gpa + 4 + 8 * rings.num, 2))[0]


def completed(rings, queue, count):
    """count one-buffer chains made available, popped and pushed; the queue."""
    for _ in range(count):
        rings.desc(0, BUF, 16, WRITE)
        rings.make_available(0)
        queue.push(queue.pop().head, 16)
    return queue


def test_event_idx_interrupts_follow_used_event(ram):
    rings = Rings(ram, 8)
    queue = rings.queue()
    queue.event_idx = True
    rings.set_avail_flags(NO_INTERRUPT)        # ignored with EVENT_IDX
    used_event(rings, 0)
    completed(rings, queue, 1)
    assert queue.needs_interrupt()             # the first decision: always
    completed(rings, queue, 1)                 # used 1 -> 2, the driver asked for 0: past
    assert not queue.needs_interrupt()
    used_event(rings, 2)                       # "interrupt me when entry 2 is used"
    completed(rings, queue, 2)                 # 2 -> 4 covers entry 2
    assert queue.needs_interrupt()
    assert not queue.needs_interrupt()         # nothing new since
    used_event(rings, 10)
    completed(rings, queue, 3)                 # 4 -> 7: not yet
    assert not queue.needs_interrupt()
    completed(rings, queue, 4)                 # 7 -> 11 covers 10
    assert queue.needs_interrupt()


def test_event_idx_across_the_16_bit_wrap(ram):
    rings = Rings(ram, 8, avail_idx=0xFFFE, used_idx=0xFFFE)
    queue = rings.queue(last_avail_idx=0xFFFE)
    queue.event_idx = True
    completed(rings, queue, 1)
    assert queue.needs_interrupt() and rings.used_idx() == 0xFFFF
    used_event(rings, 0xFFFF)
    completed(rings, queue, 2)                 # 0xFFFF -> 1 covers 0xFFFF
    assert queue.needs_interrupt() and rings.used_idx() == 1
    used_event(rings, 3)
    completed(rings, queue, 1)
    assert not queue.needs_interrupt()


def test_event_idx_kicks_follow_avail_event(ram):
    rings = Rings(ram, 8)
    used_flags_before = rings.ram.read(USED, 2)
    queue = rings.queue()
    queue.event_idx = True
    completed(rings, queue, 3)
    lib.vq_set_notify(queue.native, 0)         # off: avail_event is left where it was
    assert avail_event(rings) == 0
    queue.want_notifications()                 # on: the next index we take
    assert avail_event(rings) == 3 == queue.last_avail_idx
    assert rings.ram.read(USED, 2) == used_flags_before     # used->flags untouched
    assert not queue.pending()
    rings.make_available(0)
    assert queue.pending()


def test_without_event_idx_the_flags_do_it(ram):
    rings = Rings(ram, 8)
    queue = rings.queue()
    lib.vq_set_notify(queue.native, 0)
    assert struct.unpack("<H", ram.read(USED, 2))[0] == 1         # VRING_USED_F_NO_NOTIFY
    queue.want_notifications()
    assert struct.unpack("<H", ram.read(USED, 2))[0] == 0
    assert avail_event(rings) == 0                                # not written
    completed(rings, queue, 1)
    assert queue.needs_interrupt()
    rings.set_avail_flags(NO_INTERRUPT)
    completed(rings, queue, 1)
    assert not queue.needs_interrupt()


def test_completions_out_of_order_and_after_a_break(ram):
    """Chains complete in any order; one popped before the ring broke and finished after
    (an asynchronous engine's I/O) still gets its used element, and nothing else does."""
    rings = Rings(ram, 8)
    for head in (1, 2, 3):
        rings.desc(head, BUF + 16 * head, 16, WRITE)
    rings.make_available(1, 2, 3, 7)
    rings.desc(7, BUF, 16, NEXT, 9)                # next out of range: malformed
    queue = rings.queue()
    heads = [queue.pop().head for _ in range(3)]
    assert heads == [1, 2, 3]
    queue.push(3, 16)
    queue.push(1, 16)
    assert_broken(queue)
    queue.push(2, 16)                              # a broken queue takes nothing new...
    assert rings.used_idx() == 2
    lib.vq_add_used_late(queue.native, 2, 16)      # ...except what was in flight
    lib.vq_add_used_late(queue.native, 9, 16)      # (a head >= num never)
    lib.vq_publish_used(queue.native)
    assert [rings.used_elem(i)[0] for i in range(rings.used_idx())] == [3, 1, 2]
    assert not queue.pending()

"""A virtio driver played from the host: guest RAM in a memfd, a split ring laid out in
it, kick and call eventfds, and our vhost-user Frontend to hand it all to a backend.

Tests use it to drive a backend with well-formed and hostile requests; it is also what
a frontend benchmark needs (no guest involved): chains written once (write_chain), many
made available with one index update and one kick (post), completions reaped in
batches (reap), all through a mapping of its own with no per-access lookups.

With start(..., inflight=True) it keeps the backend's inflight region, as our vm
process and QEMU do, and reconnect() hands it, guest RAM and the ring as they stand to
a new backend after the first one died: the restart a frontend does.

When VIRTIO_RING_F_EVENT_IDX is negotiated it behaves as Linux's virtio_ring does: it
kicks only when the backend's avail_event says so, and before it waits for an interrupt
it sets used_event to the next used entry it wants and looks at the ring once more.
Between its own store and the backend's field it puts a full barrier (a lock's atomic
instruction: Python has no fence of its own), or a kick or an interrupt could be lost.
`kicks` counts the kicks it sent.
"""

import mmap
import os
import select
import socket
import struct
import threading

from vmm.machine.memory import GuestMemory, create_memfd
from vmm.vhost_user import protocol as P
from vmm.vhost_user.frontend import Frontend, RingAddresses

DESC = struct.Struct("<QIHH")
USED = struct.Struct("<II")
# vhost-user's inflight region, one queue's part (QueueRegionSplit, DescStateSplit):
# written out here rather than taken from native/virtq.h, so tests check the layout.
REGION_HEADER = struct.Struct("<QHHHH")      # features, version, desc_num, last_batch_head,
                                             # used_idx
REGION_ENTRY = struct.Struct("<B5xHQ")       # inflight, padding, next, counter
F_NEXT, F_WRITE = 1, 2
F_EVENT_IDX = 1 << 29
RING_GPA = 0x10_0000          # desc table, then avail, then used, page-aligned
DATA_GPA = 0x20_0000          # where tests put buffers


class Driver:
    def __init__(self, connection: P.Connection, mem_size: int = 128 << 20, num: int = 256):
        self.memory = GuestMemory(create_memfd(mem_size), mem_size)
        self.num = num
        self.desc = RING_GPA
        self.avail = RING_GPA + 16 * num
        self.used = (self.avail + 6 + 2 * num + 4095) & ~4095
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.frontend = Frontend(connection)
        self.inflight: P.Inflight | None = None
        self._region: mmap.mmap | None = None
        self._map = mmap.mmap(self.memory.fd, mem_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)         # the memfd, by file offset
        # Ring indexes are stored and loaded through a 16-bit view: one aligned 2-byte
        # access, never torn (struct's "<H" goes byte by byte, and a backend reading
        # half an update sees a broken ring).
        self._u16 = self.view.cast("H")
        self._avail = self.offset(self.avail, 6 + 2 * num)
        self._used = self.offset(self.used, 6 + 8 * num)
        self.event_idx = False
        self.kicks = 0
        self._fence = threading.Lock()

    def _barrier(self) -> None:
        """A full memory barrier: acquiring a lock is a locked (atomic) instruction."""
        with self._fence:
            pass

    def _kick(self, old_idx: int, new_idx: int) -> None:
        """Notify the backend of entries old_idx..new_idx made available, unless it said
        it needs no kick for them (avail_event with EVENT_IDX)."""
        if self.event_idx:
            self._barrier()
            event = self._u16[(self._used + 4 + 8 * self.num) // 2]
            if (new_idx - event - 1) & 0xFFFF >= (new_idx - old_idx) & 0xFFFF:
                return
        self.kicks += 1
        os.eventfd_write(self.kick, 1)

    def _arm(self) -> None:
        """Before waiting for an interrupt: used_event = the next entry we want."""
        if self.event_idx:
            self._u16[(self._avail + 4 + 2 * self.num) // 2] = self.used_seen
            self._barrier()

    def offset(self, gpa: int, length: int) -> int:
        """Where guest range [gpa, gpa + length) is in `view`."""
        region = next(r for r in self.memory.regions if r.contains(gpa, length))
        return region.file_offset + gpa - region.guest_address

    def user_address(self, gpa: int) -> int:
        """Our own mapping stands in for the frontend's address space."""
        region = next(r for r in self.memory.regions if r.contains(gpa, 1))
        return self.memory.host_address() + region.file_offset + gpa - region.guest_address

    def start(self, features: int, inflight: bool = False) -> int:
        """Set the backend up and start the ring; inflight: get the backend's inflight
        region (it must offer INFLIGHT_SHMFD) and give it back, as a frontend that
        restarts backends does."""
        negotiated = self._negotiate(features)
        if inflight:
            self.inflight = self.frontend.get_inflight_fd(1, self.num)
        self._start(0)
        return negotiated

    def reconnect(self, connection: P.Connection, features: int, base: int | None = None) -> int:
        """The same set-up with a new backend, guest RAM, ring and inflight region as
        they stand. base: SET_VRING_BASE (default used->idx, all a frontend knows once
        GET_VRING_BASE cannot be asked; a backend given the region ignores it)."""
        self.frontend = Frontend(connection)
        negotiated = self._negotiate(features)
        self._start(self.used_idx() if base is None else base)
        return negotiated

    def _negotiate(self, features: int) -> int:
        negotiated = self.frontend.negotiate(features)
        self.frontend.set_features(negotiated)
        self.event_idx = bool(negotiated & F_EVENT_IDX)
        regions = [P.MemoryRegion(r.guest_address, r.size, self.user_address(r.guest_address),
                                  r.file_offset) for r in self.memory.regions]
        self.frontend.set_mem_table(regions, [self.memory.fd] * len(regions))
        return negotiated

    def _start(self, base: int) -> None:
        if self.inflight is not None:
            self.frontend.set_inflight_fd(self.inflight)
        addresses = RingAddresses(*(self.user_address(a) for a in (self.desc, self.avail,
                                                                   self.used)))
        self.frontend.start_ring(0, self.num, addresses, base, self.kick, self.call)

    def used_idx(self) -> int:
        return self._u16[self._used // 2 + 1]

    def region(self) -> mmap.mmap:
        """The inflight region as the backend writes it (a mapping of our own, as QEMU
        has): ring 0's part is at its start (REGION_HEADER, then REGION_ENTRY each head)."""
        if self._region is None:
            self._region = mmap.mmap(self.inflight.fd, self.inflight.mmap_size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE,
                                     offset=self.inflight.mmap_offset)
        return self._region

    def in_flight(self) -> dict[int, int]:
        """Heads the region says are in flight, and their counters."""
        region = self.region()
        entries = (REGION_ENTRY.unpack_from(region, REGION_HEADER.size + REGION_ENTRY.size * head)
                   for head in range(self.num))
        return {head: counter for head, (flag, _, counter) in enumerate(entries) if flag == 1}

    def restart_ring(self, base: int) -> None:
        """Start ring 0 again (after frontend.stop_ring), the backend resuming at `base`."""
        addresses = RingAddresses(*(self.user_address(a) for a in (self.desc, self.avail,
                                                                   self.used)))
        self.frontend.start_ring(0, self.num, addresses, base, self.kick, self.call)

    def submit(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Queue one chain of (guest address, length, device-writable); its head."""
        head = self.next_desc
        for i, (address, length, writable) in enumerate(buffers):
            index = (head + i) % self.num
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.memory.write(self.desc + 16 * index,
                              DESC.pack(address, length, flags, (index + 1) % self.num))
        self.next_desc = (head + len(buffers)) % self.num
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        old = self.avail_idx
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        self._kick(old, self.avail_idx)
        return head

    def write_chain(self, head: int, buffers: list[tuple[int, int, bool]]) -> None:
        """Descriptors head, head + 1, ... for one chain of (guest address, length,
        device-writable), not made available: post() does that, as often as wanted."""
        for i, (address, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            DESC.pack_into(self.view, self.offset(self.desc + 16 * (head + i), 16),
                           address, length, flags, head + i + 1)

    def post(self, heads) -> None:
        """Make these chains available: their ring entries, then one index update and
        one kick (as Linux does for a batch)."""
        u16, ring, idx = self._u16, self._avail // 2 + 2, self.avail_idx
        for head in heads:
            u16[ring + idx % self.num] = head
            idx = (idx + 1) & 0xFFFF
        u16[self._avail // 2 + 1] = idx
        old, self.avail_idx = self.avail_idx, idx
        self._kick(old, idx)

    def reap(self, timeout: float = 10) -> list[tuple[int, int]]:
        """Every used element (head, written) there is, waiting for at least one."""
        view, base = self.view, self._used
        armed = False
        while True:
            used_idx = self._u16[base // 2 + 1]
            if used_idx != self.used_seen:
                done = []
                while self.used_seen != used_idx:
                    done.append(USED.unpack_from(view, base + 4 + 8 * (self.used_seen % self.num)))
                    self.used_seen = (self.used_seen + 1) & 0xFFFF
                return done
            if self.event_idx and not armed:
                self._arm()             # then look again before sleeping
                armed = True
                continue
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError("no completion")
            os.eventfd_read(self.call)
            armed = False

    def write_descriptor(self, index: int, address: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(self.desc + 16 * index, DESC.pack(address, length, flags, next_))

    def publish(self, head: int) -> None:
        """Make an already written chain available (for hand-made, hostile chains)."""
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        self._kick((self.avail_idx - 1) & 0xFFFF, self.avail_idx)

    def completion(self, timeout: float = 10) -> tuple[int, int]:
        """The next used element (head, written), waiting for the call eventfd."""
        armed = False
        while True:
            used_idx = struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]
            if used_idx != self.used_seen:
                slot = self.used + 4 + 8 * (self.used_seen % self.num)
                self.used_seen = (self.used_seen + 1) & 0xFFFF
                return struct.unpack("<II", self.memory.read(slot, 8))
            if self.event_idx and not armed:
                self._arm()
                armed = True
                continue
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError("no completion")
            os.eventfd_read(self.call)
            armed = False

    def close(self) -> None:
        self._u16.release()
        self.view.release()
        self._map.close()
        if self._region is not None:
            self._region.close()
        if self.inflight is not None:
            self.inflight.close()
        for fd in (self.kick, self.call):
            os.close(fd)
        self.memory.close()
        os.close(self.memory.fd)


def backend_pair() -> tuple[P.Connection, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return P.Connection(ours), theirs

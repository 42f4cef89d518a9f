"""A virtio driver played from the host: guest RAM in a memfd, a split ring laid out in
it, kick and call eventfds, and our vhost-user Frontend to hand it all to a backend.

Tests use it to drive a backend with well-formed and hostile requests; it is also what
a frontend benchmark needs (no guest involved).
"""

import os
import select
import socket
import struct

from vmm.machine.memory import GuestMemory, create_memfd
from vmm.vhost_user import protocol as P
from vmm.vhost_user.frontend import Frontend, RingAddresses

DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE = 1, 2
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

    def user_address(self, gpa: int) -> int:
        """Our own mapping stands in for the frontend's address space."""
        region = next(r for r in self.memory.regions if r.contains(gpa, 1))
        return self.memory.host_address() + region.file_offset + gpa - region.guest_address

    def start(self, features: int) -> int:
        negotiated = self.frontend.negotiate(features)
        self.frontend.set_features(negotiated)
        regions = [P.MemoryRegion(r.guest_address, r.size, self.user_address(r.guest_address),
                                  r.file_offset) for r in self.memory.regions]
        self.frontend.set_mem_table(regions, [self.memory.fd] * len(regions))
        addresses = RingAddresses(*(self.user_address(a) for a in (self.desc, self.avail,
                                                                   self.used)))
        self.frontend.start_ring(0, self.num, addresses, 0, self.kick, self.call)
        return negotiated

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
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)
        return head

    def write_descriptor(self, index: int, address: int, length: int, flags: int, next_: int) -> None:
        self.memory.write(self.desc + 16 * index, DESC.pack(address, length, flags, next_))

    def publish(self, head: int) -> None:
        """Make an already written chain available (for hand-made, hostile chains)."""
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)

    def completion(self, timeout: float = 10) -> tuple[int, int]:
        """The next used element (head, written), waiting for the call eventfd."""
        while True:
            used_idx = struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]
            if used_idx != self.used_seen:
                slot = self.used + 4 + 8 * (self.used_seen % self.num)
                self.used_seen = (self.used_seen + 1) & 0xFFFF
                return struct.unpack("<II", self.memory.read(slot, 8))
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError("no completion")
            os.eventfd_read(self.call)

    def close(self) -> None:
        for fd in (self.kick, self.call):
            os.close(fd)
        self.memory.close()
        os.close(self.memory.fd)


def backend_pair() -> tuple[P.Connection, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return P.Connection(ours), theirs

"""A virtio-net driver played from the host: guest RAM in a memfd, a receive and a
transmit ring laid out in it, and our vhost-user Frontend to hand them to a backend
(the two-ring sibling of virtio_driver.py, which drives one ring).

Frames go out with send() (header + frame in one readable buffer, or any buffers a
test hands to ring.submit), come in through rx buffers posted with post_rx() and
collected with receive(), which puts a mergeable frame's buffers back together.
"""

import os
import select
import struct

from tests.framework.virtio_driver import DESC, F_NEXT, F_WRITE, backend_pair  # noqa: F401
from vmm.machine.memory import GuestMemory, create_memfd
from vmm.vhost_user import protocol as P
from vmm.vhost_user.frontend import Frontend, RingAddresses

HDR = struct.Struct("<BBHHHHH")    # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_LEN = HDR.size                 # 12: virtio_net_hdr_v1
RX, TX = 0, 1
RINGS_GPA = 0x10_0000
BUFFERS_GPA = 0x40_0000


class Ring:
    def __init__(self, memory: GuestMemory, index: int, base: int, num: int):
        self.memory = memory
        self.index = index
        self.num = num
        self.desc = base
        self.avail = base + 16 * num
        self.used = (self.avail + 6 + 2 * num + 4095) & ~4095
        self.end = (self.used + 6 + 8 * num + 4095) & ~4095
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def write_descriptor(self, index: int, address: int, length: int, flags: int,
                         next_: int) -> None:
        self.memory.write(self.desc + 16 * index, DESC.pack(address, length, flags, next_))

    def submit(self, buffers: list[tuple[int, int, bool]], kick: bool = True) -> int:
        """One chain of (guest address, length, device-writable) made available; its head."""
        head = self.next_desc
        for i, (address, length, writable) in enumerate(buffers):
            index = (head + i) % self.num
            last = i == len(buffers) - 1
            self.write_descriptor(index, address, length,
                                  (F_WRITE if writable else 0) | (0 if last else F_NEXT),
                                  (index + 1) % self.num)
        self.next_desc = (head + len(buffers)) % self.num
        self.publish(head, kick)
        return head

    def publish(self, head: int, kick: bool = True) -> None:
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        if kick:
            self.notify()

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    def completion(self, timeout: float = 10) -> tuple[int, int]:
        """The next used element (head, written), waiting for the call eventfd."""
        while True:
            if self.used_idx() != self.used_seen:
                slot = self.used + 4 + 8 * (self.used_seen % self.num)
                self.used_seen = (self.used_seen + 1) & 0xFFFF
                return struct.unpack("<II", self.memory.read(slot, 8))
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError(f"no completion on ring {self.index}")
            os.eventfd_read(self.call)

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


class NetDriver:
    def __init__(self, connection: P.Connection, mem_size: int = 64 << 20, num: int = 256):
        self.memory = GuestMemory(create_memfd(mem_size), mem_size)
        self.frontend = Frontend(connection)
        self.rx = Ring(self.memory, RX, RINGS_GPA, num)
        self.tx = Ring(self.memory, TX, self.rx.end, num)
        self.rings = (self.rx, self.tx)
        self._next_buffer = BUFFERS_GPA
        self.rx_buffers: dict[int, tuple[int, int]] = {}   # head -> (address, length)

    def user_address(self, gpa: int) -> int:
        region = next(r for r in self.memory.regions if r.contains(gpa, 1))
        return self.memory.host_address() + region.file_offset + gpa - region.guest_address

    def allocate(self, length: int) -> int:
        address = self._next_buffer
        self._next_buffer = (address + length + 63) & ~63
        return address

    def start(self, features: int, rings=(RX, TX)) -> int:
        negotiated = self.frontend.negotiate(features)
        self.frontend.set_features(negotiated)
        regions = [P.MemoryRegion(r.guest_address, r.size, self.user_address(r.guest_address),
                                  r.file_offset) for r in self.memory.regions]
        self.frontend.set_mem_table(regions, [self.memory.fd] * len(regions))
        for index in rings:
            ring = self.rings[index]
            addresses = RingAddresses(*(self.user_address(a) for a in
                                        (ring.desc, ring.avail, ring.used)))
            self.frontend.start_ring(index, ring.num, addresses, 0, ring.kick, ring.call)
        return negotiated & ~P.F_PROTOCOL_FEATURES

    def send(self, frame: bytes, header: bytes = bytes(HDR_LEN)) -> int:
        """Transmit header + frame from one readable buffer; its head."""
        address = self.allocate(len(header) + len(frame))
        self.memory.write(address, header + frame)
        return self.tx.submit([(address, len(header) + len(frame), False)])

    def post_rx(self, count: int, length: int, kick: bool = True) -> None:
        """`count` receive buffers of `length` bytes, one descriptor each."""
        for _ in range(count):
            address = self.allocate(length)
            head = self.rx.submit([(address, length, True)], kick=False)
            self.rx_buffers[head] = (address, length)
        if kick:
            self.rx.notify()

    def receive(self, timeout: float = 10) -> tuple[tuple, bytes, int]:
        """The next received frame: (header fields, frame, number of buffers it used)."""
        head, written = self.rx.completion(timeout)
        address, _ = self.rx_buffers[head]
        data = self.memory.read(address, written)
        header = HDR.unpack(data[:HDR_LEN])
        frame, buffers = data[HDR_LEN:], 1
        while buffers < header[6]:
            head, written = self.rx.completion(timeout)
            address, _ = self.rx_buffers[head]
            frame += self.memory.read(address, written)
            buffers += 1
        return header, frame, buffers

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.memory.close()
        os.close(self.memory.fd)

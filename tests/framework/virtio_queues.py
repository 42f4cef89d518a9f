"""A virtio driver with several queues, played from the host over vhost-user: for the
stream devices (console, vsock) whose queues carry data both ways and complete at
their own pace. (tests/framework/virtio_driver.py is the one-queue driver for disks.)

Guest RAM is a memfd; each ring has its descriptor table, avail and used rings, and a
fixed data slot per descriptor (so a chain's buffers are where its descriptors say,
with no allocator), its own kick eventfd and call eventfd.

    driver = QueueDriver(connection, [256, 256])
    driver.start(features)
    head = driver.rings[1].add([(b"hello", False)])       # readable buffer
    head = driver.rings[0].add([(4096, True)])            # writable buffer of 4096
    for head, written, buffers in driver.rings[0].wait_used(): ...
"""

import mmap
import os
import select
import struct

from vmm.machine.memory import GuestMemory, create_memfd
from vmm.vhost_user import protocol as P
from vmm.vhost_user.frontend import Frontend, RingAddresses

DESC = struct.Struct("<QIHH")
USED = struct.Struct("<II")
F_NEXT, F_WRITE = 1, 2
SLOT = 72 << 10                 # data bytes per descriptor: a 64 KiB packet and its header
RINGS_GPA = 0x10_0000


class Ring:
    def __init__(self, driver: "QueueDriver", index: int, num: int, base: int, data: int):
        self.driver = driver
        self.index = index
        self.num = num
        self.desc = base
        self.avail = base + 16 * num
        self.used = (self.avail + 6 + 2 * num + 4095) & ~4095
        self.data = data
        self.free = list(range(num))
        self.chains: dict[int, list[tuple[int, int, int, bool]]] = {}   # head -> (desc, gpa, len, w)
        self.avail_idx = 0
        self.used_seen = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    @property
    def end(self) -> int:
        return self.used + 6 + 8 * self.num

    def slot(self, desc: int) -> int:
        return self.data + desc * SLOT

    def add(self, buffers, kick: bool = True) -> int:
        """Make one chain available. Each buffer is bytes (device-readable, copied in)
        or (length, True) for a device-writable buffer of that length."""
        if len(self.free) < len(buffers):
            raise RuntimeError(f"ring {self.index}: no free descriptors")
        memory = self.driver.memory
        descs = [self.free.pop(0) for _ in buffers]
        record = []
        for i, (desc, buffer) in enumerate(zip(descs, buffers)):
            writable = isinstance(buffer, tuple)
            length = buffer[0] if writable else len(buffer)
            assert length <= SLOT
            gpa = self.slot(desc)
            if not writable:
                memory.write(gpa, bytes(buffer))
            last = i == len(descs) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            memory.write(self.desc + 16 * desc, DESC.pack(gpa, length, flags,
                                                          0 if last else descs[i + 1]))
            record.append((desc, gpa, length, writable))
        head = descs[0]
        self.chains[head] = record
        self.publish(head, kick)
        return head

    def publish(self, head: int, kick: bool = True) -> None:
        """Put `head` in the avail ring (for hand-made, hostile descriptors too)."""
        u16 = self.driver.u16
        u16[(self.avail + 4) // 2 + self.avail_idx % self.num] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        u16[(self.avail + 2) // 2] = self.avail_idx        # one aligned store, never torn
        if kick:
            self.notify()

    def notify(self) -> None:
        os.eventfd_write(self.kick, 1)

    def suppress_interrupts(self, suppress: bool) -> None:
        self.driver.u16[self.avail // 2] = 1 if suppress else 0

    def used_now(self) -> list[tuple[int, int, bytes]]:
        """Completed chains: (head, written, the bytes the device wrote), descriptors
        freed."""
        memory = self.driver.memory
        done = []
        used_idx = self.driver.u16[(self.used + 2) // 2]
        while self.used_seen != used_idx:
            head, written = USED.unpack(memory.read(
                self.used + 4 + 8 * (self.used_seen % self.num), 8))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
            record = self.chains.pop(head, [])
            data, left = b"", written
            for desc, gpa, length, writable in record:
                if writable and left > 0:
                    data += memory.read(gpa, min(length, left))
                    left -= min(length, left)
                self.free.append(desc)
            done.append((head, written, data))
        return done

    def wait_used(self, timeout: float = 10) -> list[tuple[int, int, bytes]]:
        """At least one completed chain, waiting for the call eventfd."""
        while True:
            done = self.used_now()
            if done:
                return done
            if not select.select([self.call], [], [], timeout)[0]:
                raise TimeoutError(f"ring {self.index}: nothing completed in {timeout} s")
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass


class QueueDriver:
    def __init__(self, connection: P.Connection, queue_sizes: list[int],
                 mem_size: int = 128 << 20):
        assert mem_size < 0xD000_0000          # one region: guest address = file offset
        self.memory = GuestMemory(create_memfd(mem_size), mem_size)
        self._map = mmap.mmap(self.memory.fd, mem_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.u16 = memoryview(self._map).cast("H")   # ring indexes: whole 2-byte accesses
        self.frontend = Frontend(connection)
        self.rings = []
        base = RINGS_GPA
        data = 0x40_0000
        for index, num in enumerate(queue_sizes):
            ring = Ring(self, index, num, base, data)
            self.rings.append(ring)
            base = (ring.end + 4095) & ~4095
            data += num * SLOT
        assert base <= 0x40_0000 and data <= mem_size

    def user_address(self, gpa: int) -> int:
        region = next(r for r in self.memory.regions if r.contains(gpa, 1))
        return self.memory.host_address() + region.file_offset + gpa - region.guest_address

    def start(self, features: int, rings=None) -> int:
        """Negotiate, hand over RAM, start the rings (all, or those listed)."""
        negotiated = self.frontend.negotiate(features)
        self.frontend.set_features(negotiated)
        regions = [P.MemoryRegion(r.guest_address, r.size, self.user_address(r.guest_address),
                                  r.file_offset) for r in self.memory.regions]
        self.frontend.set_mem_table(regions, [self.memory.fd] * len(regions))
        for ring in self.rings if rings is None else [self.rings[i] for i in rings]:
            self.restart_ring(ring.index, 0)
        return negotiated

    def restart_ring(self, index: int, base: int) -> None:
        """Start ring `index` (again, after GET_VRING_BASE gave `base`)."""
        ring = self.rings[index]
        addresses = RingAddresses(*(self.user_address(a) for a in
                                    (ring.desc, ring.avail, ring.used)))
        self.frontend.start_ring(ring.index, ring.num, addresses, base, ring.kick, ring.call)

    def config(self, size: int) -> bytes:
        return self.frontend.get_config(size)

    def close(self) -> None:
        self.u16.release()
        self._map.close()
        for ring in self.rings:
            os.close(ring.kick)
            os.close(ring.call)
        self.memory.close()
        os.close(self.memory.fd)

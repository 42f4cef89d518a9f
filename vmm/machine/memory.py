"""Guest RAM: one sealed memfd, mapped once, laid out around the 32-bit MMIO hole.

Every access from the VMM to guest memory goes through GuestMemory, which translates a
guest physical address to an offset in the mapping and refuses any range that is not
entirely inside one RAM region. The memfd is what later gets shared with device
backends (vhost-user), so the file offsets of the regions are part of the contract.
"""

import fcntl
import mmap
import os
from dataclasses import dataclass

from .. import layout
from .._kvm import ffi


class GuestMemoryError(Exception):
    """An access outside guest RAM."""


@dataclass(frozen=True)
class Region:
    guest_address: int
    size: int
    file_offset: int

    def contains(self, address: int, length: int) -> bool:
        return self.guest_address <= address and address + length <= self.guest_address + self.size


def create_memfd(size: int, name: str = "guest-ram") -> int:
    """A memfd of exactly `size` bytes that nobody can grow or shrink afterwards."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class GuestMemory:
    def __init__(self, fd: int, size: int, dont_dump: bool = False):
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if dont_dump:
            self._map.madvise(mmap.MADV_DONTDUMP)
        self.regions: tuple[Region, ...] = ()
        offset = 0
        for address, length in layout.ram_regions(size):
            self.regions += (Region(address, length, offset),)
            offset += length

    def host_address(self) -> int:
        """Where the whole mapping starts in this process (for KVM memory slots)."""
        return int(ffi.cast("uintptr_t", ffi.from_buffer(self._map)))

    def _offset(self, address: int, length: int) -> int:
        for region in self.regions:
            if length >= 0 and region.contains(address, length):
                return region.file_offset + address - region.guest_address
        raise GuestMemoryError(f"[{address:#x}, +{length:#x}) is not inside guest RAM")

    def translate(self, address: int, length: int) -> int:
        """The host address of guest range [address, +length) in this process's mapping;
        GuestMemoryError unless the whole range is RAM."""
        return self.host_address() + self._offset(address, length)

    def host_regions(self) -> list[tuple[int, int, int]]:
        """(guest address, size, host address) of each region, as the ring walker and
        the vhost-user memory table want them."""
        base = self.host_address()
        return [(r.guest_address, r.size, base + r.file_offset) for r in self.regions]

    def write(self, address: int, data: bytes) -> None:
        offset = self._offset(address, len(data))
        self._map[offset:offset + len(data)] = data

    def read(self, address: int, length: int) -> bytes:
        offset = self._offset(address, length)
        return self._map[offset:offset + length]

    def fill(self, address: int, length: int, byte: int = 0) -> None:
        offset = self._offset(address, length)
        self._map[offset:offset + length] = bytes([byte]) * length

    def close(self) -> None:
        self._map.close()

"""The backend's view of guest RAM: the regions the frontend sent with SET_MEM_TABLE,
each mapped once from its fd, with translations from the frontend's addresses."""

import mmap
import os
from dataclasses import dataclass

from .._kvm import ffi
from .protocol import MemoryRegion, ProtocolError


@dataclass
class MappedRegion:
    region: MemoryRegion
    mapping: mmap.mmap
    host_address: int          # where region.guest_address is mapped in this process


class GuestRam:
    def __init__(self, regions: list[MemoryRegion], fds: list[int]):
        if len(fds) != len(regions):
            raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions, {len(fds)} fds")
        self.mapped: list[MappedRegion] = []
        try:
            for region, fd in zip(regions, fds):
                mapping = mmap.mmap(fd, region.mmap_offset + region.size, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)
                base = int(ffi.cast("uintptr_t", ffi.from_buffer(mapping)))
                self.mapped.append(MappedRegion(region, mapping, base + region.mmap_offset))
        except (OSError, ValueError) as error:
            self.close()
            raise ProtocolError(f"SET_MEM_TABLE: cannot map guest RAM: {error}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def table(self) -> list[tuple[int, int, int]]:
        """(guest address, size, host address) of each region, for the ring walker."""
        return [(m.region.guest_address, m.region.size, m.host_address) for m in self.mapped]

    def guest_address(self, user_address: int) -> int:
        """The frontend's virtual address (SET_VRING_ADDR) -> guest physical address."""
        for m in self.mapped:
            r = m.region
            if r.user_address <= user_address < r.user_address + r.size:
                return r.guest_address + user_address - r.user_address
        raise ProtocolError(f"address {user_address:#x} is not in any memory region")

    def close(self) -> None:
        for m in self.mapped:
            m.mapping.close()
        self.mapped = []

"""Dispatch of guest port I/O and MMIO accesses to the device that owns the address.

A device implements read(offset, size) -> int and write(offset, size, value), offsets
relative to its base. Accesses nobody owns read as all ones and are otherwise ignored,
as on a PC bus.
"""

import bisect
import logging
import threading

log = logging.getLogger(__name__)


class Bus:
    def __init__(self, name: str):
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, object]] = []
        self._lock = threading.Lock()
        self._reported: set[int] = set()

    def register(self, base: int, size: int, device) -> None:
        with self._lock:
            index = bisect.bisect(self._bases, base)
            if (index and self._ranges[index - 1][0] + self._ranges[index - 1][1] > base) or (
                    index < len(self._ranges) and base + size > self._ranges[index][0]):
                raise ValueError(f"{self.name} range {base:#x}+{size:#x} overlaps another")
            self._bases.insert(index, base)
            self._ranges.insert(index, (base, size, device))

    def _find(self, address: int, size: int):
        index = bisect.bisect(self._bases, address) - 1
        if index >= 0:
            base, length, device = self._ranges[index]
            if address + size <= base + length:
                return device, address - base
        if address not in self._reported and len(self._reported) < 64:
            self._reported.add(address)
            log.debug("%s access to %#x (%d bytes) hits no device", self.name, address, size)
        return None, 0

    def read(self, address: int, size: int) -> int:
        device, offset = self._find(address, size)
        if device is None:
            return (1 << (8 * size)) - 1
        return device.read(offset, size)

    def write(self, address: int, size: int, value: int) -> None:
        device, offset = self._find(address, size)
        if device is not None:
            device.write(offset, size, value)

"""What a vCPU needs in memory to start directly in 64-bit mode: GDT, IDT, page tables.

The first 1 GiB is identity-mapped with 2 MiB pages (1 GiB pages make a guest on a PVM
host shut down before its first instruction; shared/docs/host.md).
"""

import struct

from .. import layout

PAGE_PRESENT_RW = 0x3
PAGE_HUGE = 0x80

# Flat descriptors: 64-bit code, data, and a 32-bit TSS (KVM wants a usable TR).
GDT = (0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x008F_8B00_0000_FFFF)
CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 0x08, 0x10, 0x18


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(GDT)}Q", *GDT)


def page_tables() -> list[tuple[int, bytes]]:
    """(guest address, bytes) for the PML4, the PDPT and one PD."""
    pml4 = struct.pack("<Q", layout.PDPT_ADDR | PAGE_PRESENT_RW)
    pdpt = struct.pack("<Q", layout.PD_ADDR | PAGE_PRESENT_RW)
    pd = struct.pack("<512Q", *((i << 21) | PAGE_HUGE | PAGE_PRESENT_RW for i in range(512)))
    return [(layout.PML4_ADDR, pml4), (layout.PDPT_ADDR, pdpt), (layout.PD_ADDR, pd)]

"""struct boot_params (the "zero page") and the E820 memory map, per the x86 boot protocol.

Offsets are those of Documentation/arch/x86/zero-page.rst and boot.rst; the setup header
of a bzImage is copied verbatim and then the loader's fields are filled in.
"""

import struct

from .. import layout
from .kernel import KernelImage

E820_RAM = 1
E820_RESERVED = 2

ZERO_PAGE_SIZE = 4096
ACPI_RSDP_ADDR = 0x070
E820_ENTRIES = 0x1E8
SETUP_HEADER = 0x1F1
BOOT_FLAG = 0x1FE
HEADER = 0x202
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
KERNEL_ALIGNMENT = 0x230
CMDLINE_SIZE = 0x238
E820_TABLE = 0x2D0
E820_MAX = 128
CAN_USE_HEAP = 0x80
LOADER_UNDEFINED = 0xFF


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(address, size, type): StratoVirt's map, the 32-bit MMIO hole left out."""
    low_end = layout.low_ram_end(mem_size)
    table = [(0, layout.EBDA_ADDR, E820_RAM),
             (layout.EBDA_ADDR, layout.EBDA_END - layout.EBDA_ADDR, E820_RESERVED),
             (layout.HIMEM_START, low_end - layout.HIMEM_START, E820_RAM)]
    if mem_size > low_end:
        table.append((layout.HIGH_RAM_START, mem_size - low_end, E820_RAM))
    return table


def boot_params(image: KernelImage, mem_size: int, cmdline_size: int,
                initrd: tuple[int, int] | None) -> bytes:
    page = bytearray(ZERO_PAGE_SIZE)
    if image.setup_header:
        page[SETUP_HEADER:SETUP_HEADER + len(image.setup_header)] = image.setup_header
    else:  # an ELF vmlinux has no setup header: write the fields the kernel reads
        struct.pack_into("<H", page, BOOT_FLAG, 0xAA55)
        page[HEADER:HEADER + 4] = b"HdrS"
        struct.pack_into("<I", page, KERNEL_ALIGNMENT, 0x0100_0000)
        struct.pack_into("<I", page, CMDLINE_SIZE, cmdline_size)
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, CMD_LINE_PTR, layout.CMDLINE_ADDR)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, layout.ACPI_ADDR)
    if initrd:
        struct.pack_into("<II", page, RAMDISK_IMAGE, *initrd)
    table = e820_map(mem_size)
    page[E820_ENTRIES] = len(table)
    for index, entry in enumerate(table):
        struct.pack_into("<QQI", page, E820_TABLE + 20 * index, *entry)
    return bytes(page)

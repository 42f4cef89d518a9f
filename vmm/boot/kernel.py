"""Recognising a kernel image: ELF vmlinux or bzImage, with what the loader needs.

Only headers are read here; every field that will steer a write into guest memory is
checked against the file's size and the guest's RAM before anyone trusts it.
"""

import os
import struct
from dataclasses import dataclass

from .. import layout

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")

BZ_SETUP_SECTS = 0x1F1
BZ_BOOT_FLAG = 0x1FE
BZ_HEADER = 0x202
BZ_VERSION = 0x206
BZ_LOADFLAGS = 0x211
BZ_INITRD_ADDR_MAX = 0x22C
BZ_KERNEL_ALIGNMENT = 0x230
BZ_XLOADFLAGS = 0x236
BZ_CMDLINE_SIZE = 0x238
BZ_PREF_ADDRESS = 0x258
BZ_INIT_SIZE = 0x260
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
MIN_BOOT_PROTOCOL = 0x206
ELF_CMDLINE_SIZE = 2048          # COMMAND_LINE_SIZE on x86


class BadKernel(Exception):
    """The file is not a kernel this VMM can boot; the message says why."""


@dataclass(frozen=True)
class Segment:
    file_offset: int
    file_size: int
    address: int
    mem_size: int


@dataclass(frozen=True)
class KernelImage:
    format: str                  # "elf" or "bzImage"
    entry: int                   # 64-bit entry point (guest physical)
    segments: tuple[Segment, ...]
    end: int                     # first byte above the kernel's footprint in RAM
    cmdline_size: int            # bytes, including the terminating NUL
    initrd_addr_max: int
    setup_header: bytes          # bzImage: bytes 0x1f1.. to copy into boot_params


HEAD_SIZE = 64 * 1024            # enough for the ELF headers or the bzImage setup header


def inspect(head: bytes, file_size: int) -> KernelImage:
    """`head` is the first HEAD_SIZE bytes of the file (or all of it)."""
    if head[:4] == ELF_MAGIC:
        return _inspect_elf(head, file_size)
    if len(head) > BZ_VERSION + 2 and head[BZ_HEADER:BZ_HEADER + 4] == b"HdrS":
        return _inspect_bzimage(head, file_size)
    raise BadKernel("is neither an ELF vmlinux nor a bzImage")


def read_head(path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        return f.read(HEAD_SIZE), os.fstat(f.fileno()).st_size


def _inspect_elf(data: bytes, file_size: int) -> KernelImage:
    if len(data) < _EHDR.size:
        raise BadKernel("is a truncated ELF file")
    (ident, _, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_) = _EHDR.unpack_from(data)
    if ident[4] != 2 or ident[5] != 1 or machine != EM_X86_64:
        raise BadKernel("is an ELF file but not a 64-bit little-endian x86_64 kernel")
    # The program headers must lie in the head: linkers put them right after the header.
    if phentsize != _PHDR.size or not 1 <= phnum <= 64 or phoff + phnum * phentsize > len(data):
        raise BadKernel("has a malformed ELF program header table")
    segments = []
    for index in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(
            data, phoff + index * phentsize)
        if p_type != PT_LOAD:
            continue
        if offset + filesz > file_size or filesz > memsz:
            raise BadKernel(f"ELF segment {index} lies outside the file")
        if paddr < layout.HIMEM_START or paddr + memsz > layout.MMIO_HOLE_START:
            raise BadKernel(f"ELF segment {index} at {paddr:#x} is not loadable between "
                            "1 MiB and the 32-bit MMIO hole")
        segments.append(Segment(offset, filesz, paddr, memsz))
    if not segments:
        raise BadKernel("has no loadable ELF segment")
    if not any(s.address <= entry < s.address + s.mem_size for s in segments):
        raise BadKernel(f"ELF entry point {entry:#x} is outside its loadable segments")
    return KernelImage("elf", entry, tuple(segments),
                       max(s.address + s.mem_size for s in segments),
                       ELF_CMDLINE_SIZE, layout.INITRD_ADDR_MAX, b"")


def _inspect_bzimage(data: bytes, file_size: int) -> KernelImage:
    def u(fmt, offset):
        return struct.unpack_from(fmt, data, offset)[0]

    version = u("<H", BZ_VERSION)
    if u("<H", BZ_BOOT_FLAG) != 0xAA55 or version < MIN_BOOT_PROTOCOL:
        raise BadKernel(f"is a bzImage with boot protocol {version >> 8}.{version & 0xff:02d}; "
                        "2.06 or newer is needed")
    if not u("<H", BZ_XLOADFLAGS) & XLF_KERNEL_64 or not data[BZ_LOADFLAGS] & LOADED_HIGH:
        raise BadKernel("is a bzImage without a 64-bit entry point")
    setup_sects = data[BZ_SETUP_SECTS] or 4
    setup_size = (setup_sects + 1) * 512
    header_end = BZ_HEADER + data[BZ_HEADER - 1]  # byte 0x201: length of the header after 0x202
    if setup_size >= file_size or header_end > min(setup_size, len(data)):
        raise BadKernel("is a truncated bzImage")
    load = layout.HIMEM_START
    protected = Segment(setup_size, file_size - setup_size, load, file_size - setup_size)
    # The decompressor runs at max(load, pref_address) and needs init_size bytes there.
    runs_at = max(load, u("<Q", BZ_PREF_ADDRESS))
    end = max(load + protected.mem_size, runs_at + u("<I", BZ_INIT_SIZE))
    if end > layout.MMIO_HOLE_START:
        raise BadKernel("is a bzImage whose init_size does not fit below the MMIO hole")
    return KernelImage("bzImage", load + 0x200, (protected,), end,
                       u("<I", BZ_CMDLINE_SIZE) + 1, u("<I", BZ_INITRD_ADDR_MAX),
                       bytes(data[BZ_SETUP_SECTS:header_end]))


def initrd_address(image: KernelImage, mem_size: int, initrd_size: int) -> int:
    """StratoVirt's placement: as high as allowed, page-aligned, above the kernel."""
    top = min(layout.INITRD_ADDR_MAX, image.initrd_addr_max, layout.low_ram_end(mem_size) - 1)
    address = (top + 1 - initrd_size) & ~0xFFF
    if initrd_size > top + 1 or address < image.end:
        raise BadKernel(f"leaves {max(0, top + 1 - image.end) >> 20} MiB for the initrd "
                        f"between its end ({image.end:#x}) and {top + 1:#x}")
    return address

"""The boot path without booting: what the loader writes, read back and checked against
the x86 boot protocol and the MP specification (host.md, way 4)."""

import struct

import pytest

from vmm import layout
from vmm.boot import kernel, longmode, mptable, params
from vmm.boot.loader import load
from vmm.config import parse
from vmm.devices.virtio.discovery import kernel_cmdline
from vmm.machine.memory import GuestMemory, GuestMemoryError, create_memfd
from tests.framework.assets import guest_assets
from tests.framework.guest import tiny_guest

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def debian():
    return guest_assets()


def config_for(tmp_path, kernel_path, *extra):
    return parse(["-kernel", str(kernel_path), "-api-channel", f"unix:{tmp_path}/api.sock",
                  *extra]).config


def loaded(config):
    memory = GuestMemory(create_memfd(config.machine.mem_size), config.machine.mem_size)
    entry = load(config, memory)
    return memory, entry


def u(memory, address, fmt):
    return struct.unpack(fmt, memory.read(address, struct.calcsize(fmt)))[0]


def test_debian_bzimage_boot_params(tmp_path, debian):
    config = config_for(tmp_path, debian / "vmlinuz", "-initrd", str(debian / "initrd.img"),
                        "-m", "256M", "-append", "console=ttyS0 root=/dev/vda")
    image_bytes = (debian / "vmlinuz").read_bytes()
    memory, entry = loaded(config)
    zp = layout.ZERO_PAGE_ADDR
    setup_sects = image_bytes[0x1F1]
    assert memory.read(zp + 0x1F1, 1)[0] == setup_sects and setup_sects > 0
    assert u(memory, zp + 0x1FE, "<H") == 0xAA55
    assert memory.read(zp + 0x202, 4) == b"HdrS"
    assert u(memory, zp + 0x206, "<H") >= 0x206                         # protocol version
    assert u(memory, zp + 0x214, "<I") == 0x100000                      # code32_start
    loadflags = memory.read(zp + 0x211, 1)[0]
    assert loadflags & 0x01 and loadflags & 0x80                        # LOADED_HIGH, CAN_USE_HEAP
    assert memory.read(zp + 0x210, 1)[0] == 0xFF                        # type_of_loader
    assert u(memory, zp + 0x228, "<I") == layout.CMDLINE_ADDR           # cmd_line_ptr
    words = " ".join(f"virtio_mmio.device=4K@{0xd0000000 + i * 0x1000:#x}:{5 + i}"
                     for i in range(8))
    cmdline = f"console=ttyS0 root=/dev/vda {words}\0".encode()
    assert memory.read(layout.CMDLINE_ADDR, len(cmdline)) == cmdline
    assert u(memory, zp + 0x238, "<I") >= len(cmdline)                  # cmdline_size
    initrd = (debian / "initrd.img").read_bytes()
    ramdisk_image, ramdisk_size = u(memory, zp + 0x218, "<I"), u(memory, zp + 0x21C, "<I")
    assert ramdisk_size == len(initrd)
    assert ramdisk_image == (256 * MiB - len(initrd)) & ~0xFFF
    assert memory.read(ramdisk_image, len(initrd)) == initrd
    # The protected-mode kernel at 1 MiB, entered at its 64-bit entry (+0x200).
    setup_size = (setup_sects + 1) * 512
    assert memory.read(0x100000, 4096) == image_bytes[setup_size:setup_size + 4096]
    assert entry.rip == 0x100200 and entry.rsi == zp and entry.rsp == 0x8FF0


def test_debian_elf_vmlinux_segments_and_entry(tmp_path, debian):
    config = config_for(tmp_path, debian / "vmlinux", "-m", "256M")
    data = (debian / "vmlinux").read_bytes()
    image = kernel.inspect(data[:kernel.HEAD_SIZE], len(data))
    assert image.format == "elf" and image.entry == 0x1000000
    memory, entry = loaded(config)
    assert entry.rip == 0x1000000
    for segment in image.segments:
        chunk = min(segment.file_size, 4096)
        assert memory.read(segment.address, chunk) == \
            data[segment.file_offset:segment.file_offset + chunk]
        if segment.mem_size > segment.file_size:   # .bss is zeroed
            assert memory.read(segment.address + segment.file_size, 16) == bytes(16)


def test_elf_vmlinux_boot_params(tmp_path):
    config = config_for(tmp_path, tiny_guest(), "-append", "hello")
    memory, entry = loaded(config)
    zp = layout.ZERO_PAGE_ADDR
    assert u(memory, zp + 0x1FE, "<H") == 0xAA55 and memory.read(zp + 0x202, 4) == b"HdrS"
    assert u(memory, zp + 0x230, "<I") == 0x1000000                     # kernel_alignment
    assert u(memory, zp + 0x238, "<I") == len(kernel_cmdline("hello"))  # cmdline_size
    assert entry.rip == 0x100000


@pytest.mark.parametrize("size,expected", [
    (128 * MiB, [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 128 * MiB - 0x100000, 1)]),
    (3 * GiB, [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 3 * GiB - 0x100000, 1)]),
    (5 * GiB, [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 0xD000_0000 - 0x100000, 1),
               (4 * GiB, 5 * GiB - 0xD000_0000, 1)]),
])
def test_e820(tmp_path, size, expected):
    assert params.e820_map(size) == expected
    config = config_for(tmp_path, tiny_guest(), "-m", str(size))
    memory, _ = loaded(config)
    zp = layout.ZERO_PAGE_ADDR
    count = memory.read(zp + 0x1E8, 1)[0]
    table = [struct.unpack("<QQI", memory.read(zp + 0x2D0 + 20 * i, 20)) for i in range(count)]
    assert table == expected


def test_memory_regions_follow_the_hole():
    memory = GuestMemory(create_memfd(5 * GiB), 5 * GiB)
    assert [(r.guest_address, r.size, r.file_offset) for r in memory.regions] == [
        (0, 0xD000_0000, 0), (4 * GiB, 5 * GiB - 0xD000_0000, 0xD000_0000)]
    memory.write(4 * GiB, b"high")
    assert memory.read(4 * GiB, 4) == b"high"
    for address, length in ((0xD000_0000, 1), (0xCFFF_FFFF, 2), (6 * GiB, 1), (-1, 1)):
        with pytest.raises(GuestMemoryError):
            memory.read(address, length)


@pytest.mark.parametrize("vcpus", [1, 4, 254])
def test_mp_table(vcpus):
    table = mptable.mp_table(vcpus)
    floating = table[:16]
    assert floating[:4] == b"_MP_" and sum(floating) % 256 == 0
    assert struct.unpack_from("<I", floating, 4)[0] == layout.EBDA_ADDR + 16
    assert floating[8] == 1 and floating[9] == 4          # 16 bytes, spec 1.4
    length = struct.unpack_from("<H", table, 16 + 4)[0]
    config = table[16:16 + length]
    assert config[:4] == b"PCMP" and sum(config) % 256 == 0 and len(table) == 16 + length
    count = struct.unpack_from("<H", config, 34)[0]
    assert struct.unpack_from("<I", config, 36)[0] == layout.LAPIC_ADDR
    offset, cpus, ioapics, routes, lints = 44, [], [], [], []
    for _ in range(count):
        kind = config[offset]
        if kind == 0:
            cpus.append((config[offset + 1], config[offset + 3]))
            offset += 20
        else:
            if kind == 2:
                ioapics.append((config[offset + 1], struct.unpack_from("<I", config, offset + 4)[0]))
            elif kind == 3:
                routes.append((config[offset + 5], config[offset + 6], config[offset + 7]))
            elif kind == 4:
                lints.append((config[offset + 1], config[offset + 7]))
            offset += 8
    assert offset == length
    assert cpus == [(i, 1 | (2 if i == 0 else 0)) for i in range(vcpus)]
    assert ioapics == [(vcpus, layout.IOAPIC_ADDR)]
    assert routes == [(irq, vcpus, irq) for irq in range(16)]
    assert lints == [(mptable.MP_EXTINT, 0), (mptable.MP_NMI, 1)]
    assert layout.EBDA_ADDR + len(table) < layout.HIMEM_START


def test_page_tables_identity_map_the_first_gib():
    tables = dict(longmode.page_tables())
    assert struct.unpack("<Q", tables[layout.PML4_ADDR])[0] == layout.PDPT_ADDR | 3
    assert struct.unpack("<Q", tables[layout.PDPT_ADDR])[0] == layout.PD_ADDR | 3
    pd = struct.unpack("<512Q", tables[layout.PD_ADDR])
    assert all(entry == (i << 21) | 0x83 for i, entry in enumerate(pd))   # 2 MiB pages only


def test_gdt_matches_the_selectors():
    gdt = struct.unpack("<4Q", longmode.gdt_bytes())
    code = gdt[longmode.CODE_SELECTOR >> 3]
    assert (code >> 53) & 1 == 1 and (code >> 47) & 1 == 1               # L, present
    assert (gdt[longmode.DATA_SELECTOR >> 3] >> 41) & 1 == 1              # writable data


@pytest.mark.parametrize("data,message", [
    (b"\x7fELF\x01" + bytes(100), "not a 64-bit little-endian x86_64 kernel"),
    (b"\x7fELF", "truncated ELF"),
    (bytes(0x202) + b"HdrS" + struct.pack("<H", 0x0205) + bytes(100), "2.06 or newer"),
])
def test_bad_kernels(data, message):
    with pytest.raises(kernel.BadKernel, match=message):
        kernel.inspect(data, len(data))


def test_elf_segment_outside_the_file_is_refused():
    image = bytearray(tiny_guest().read_bytes())
    phoff = struct.unpack_from("<Q", image, 32)[0]
    struct.pack_into("<Q", image, phoff + 32, 1 << 40)                   # p_filesz
    with pytest.raises(kernel.BadKernel, match="outside the file"):
        kernel.inspect(bytes(image), len(image))


def test_bzimage_without_64_bit_entry_is_refused(debian):
    image = bytearray((debian / "vmlinuz").read_bytes()[:kernel.HEAD_SIZE])
    struct.pack_into("<H", image, 0x236, 0)                              # xloadflags
    with pytest.raises(kernel.BadKernel, match="without a 64-bit entry"):
        kernel.inspect(bytes(image), 14 << 20)

"""Writing the boot image into guest RAM: kernel, initrd, command line, boot_params,
MP table and ACPI tables (a kernel may know either), page tables and GDT. Returns where
the bootstrap vCPU starts."""

from dataclasses import dataclass

from .. import layout
from ..acpi import tables as acpi_tables
from ..config.model import MachineConfig
from ..devices.virtio import discovery
from ..machine.memory import GuestMemory
from . import longmode, mptable, params
from .kernel import HEAD_SIZE, initrd_address, inspect


@dataclass(frozen=True)
class BootEntry:
    rip: int
    rsi: int            # boot_params, as the 64-bit boot protocol wants
    rsp: int


def load(config: MachineConfig, memory: GuestMemory) -> BootEntry:
    """The kernel gets the user's command line plus the virtio-mmio slots' words."""
    slots = discovery.slot_count(config.console is not None, config.vsock is not None,
                                 config.rng is not None)
    cmdline = discovery.kernel_cmdline(config.boot.boot_args, slots)
    data = config.boot.kernel.read_bytes()
    image = inspect(data[:HEAD_SIZE], len(data))
    for segment in image.segments:
        memory.write(segment.address,
                     data[segment.file_offset:segment.file_offset + segment.file_size])
        if segment.mem_size > segment.file_size:
            memory.fill(segment.address + segment.file_size, segment.mem_size - segment.file_size)

    initrd = None
    if config.boot.initrd:
        ramdisk = config.boot.initrd.read_bytes()
        address = initrd_address(image, memory.size, len(ramdisk))
        memory.write(address, ramdisk)
        initrd = (address, len(ramdisk))

    encoded = cmdline.encode() + b"\0"
    memory.write(layout.CMDLINE_ADDR, encoded)
    memory.write(layout.ZERO_PAGE_ADDR,
                 params.boot_params(image, memory.size, len(encoded) - 1, initrd))
    vcpus = config.machine.vcpus
    memory.write(layout.EBDA_ADDR, mptable.mp_table(vcpus))
    devices = acpi_tables.legacy_devices(serial=config.serial_stdio) + \
        acpi_tables.power_button_devices() + acpi_tables.virtio_mmio_devices(slots)
    for address, data in acpi_tables.build(vcpus, layout.ioapic_id(vcpus), devices):
        memory.write(address, data)
    for address, table in longmode.page_tables():
        memory.write(address, table)
    memory.write(layout.GDT_ADDR, longmode.gdt_bytes())
    memory.write(layout.IDT_ADDR, bytes(8))
    return BootEntry(image.entry, layout.ZERO_PAGE_ADDR, layout.BOOT_STACK_ADDR)

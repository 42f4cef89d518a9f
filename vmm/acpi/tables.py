"""The ACPI tables of the microVM: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.

Layout: everything lives in the legacy BIOS area from ACPI_ADDR (0xE0000), where a
BIOS-booted kernel scans for the RSDP; boot_params.acpi_rsdp_addr points there too.
Hardware-reduced ACPI: no PM timer, no SCI, no GPEs. Reset goes through the FADT reset
register (the i8042's 0xFE), power-off through the sleep control register (port 0x3C0),
both of which end the VM. The power button is a control-method one (PNP0C0C), notified
by a Generic Event Device (ACPI0013) on its own interrupt, the hardware-reduced way.
"""

import struct

from .. import layout
from . import aml

OEM_ID = b"STRATO"
OEM_TABLE_ID = b"MICROVM "
CREATOR_ID = b"SVPY"
HEADER = struct.Struct("<4sIBB6s8sI4sI")

# FADT flags and boot architecture flags. PWR_BUTTON and SLP_BUTTON set mean "no
# fixed-feature button" (there is no PM1 event block to hold one): the power button is
# the control-method device \_SB.PWRB in the DSDT instead, and there is no sleep button.
FADT_PWR_BUTTON, FADT_SLP_BUTTON = 1 << 4, 1 << 5
FADT_RESET_REG_SUP, FADT_HEADLESS, FADT_HW_REDUCED_ACPI = 1 << 10, 1 << 12, 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
GAS_SYSTEM_IO = 1
RESET_VALUE = 0xFE               # i8042 "pulse reset line"
SLEEP_CONTROL_PORT = layout.ACPI_SLEEP_PORT
SLEEP_STATUS_PORT = layout.ACPI_SLEEP_PORT + 1
S5_SLEEP_TYPE = 5

MADT_LOCAL_APIC, MADT_IO_APIC, MADT_LOCAL_APIC_NMI = 0, 1, 4
MADT_PCAT_COMPAT = 1


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = bytearray(HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID,
                                   OEM_TABLE_ID, 1, CREATOR_ID, 1))
    header[9] = _checksum(bytes(header) + body)
    return bytes(header) + body


def _gas(port: int, width_bits: int = 8) -> bytes:
    """Generic Address Structure for a byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, 1, port)


def fadt(dsdt_address: int) -> bytes:
    body = bytearray(276 - HEADER.size)

    def put(offset, fmt, *values):
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(40, "<I", dsdt_address)
    put(108, "<B", 0x32)                                   # CMOS index of the century
    put(109, "<H", IAPC_VGA_NOT_PRESENT)
    put(112, "<I", FADT_HW_REDUCED_ACPI | FADT_RESET_REG_SUP | FADT_PWR_BUTTON
        | FADT_SLP_BUTTON | FADT_HEADLESS)
    body[116 - HEADER.size:128 - HEADER.size] = _gas(layout.I8042_COMMAND_PORT)
    put(128, "<B", RESET_VALUE)
    put(131, "<B", 5)                                      # FADT minor version: 6.5
    put(140, "<Q", dsdt_address)                           # X_DSDT
    body[244 - HEADER.size:256 - HEADER.size] = _gas(SLEEP_CONTROL_PORT)
    body[256 - HEADER.size:268 - HEADER.size] = _gas(SLEEP_STATUS_PORT)
    put(268, "<8s", b"STRATOPY")                           # hypervisor vendor identity
    return table(b"FACP", 6, bytes(body))


def madt(vcpus: int, ioapic_id: int) -> bytes:
    body = struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT)
    for cpu in range(vcpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, 1)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)   # LINT1 on all CPUs
    return table(b"APIC", 5, body)


def legacy_devices(serial: bool) -> bytes:
    """The PC devices the guest should know by ACPI: with hardware-reduced ACPI, Linux
    assumes no legacy PIC and allocates no ISA interrupts, so the UART's IRQ 4 and the
    CMOS clock must be described here (as Firecracker's DSDT does) to be usable."""
    devices = aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")),
                         aml.name("_CRS", aml.resource_template(
                             aml.io_port(layout.RTC_PORT, 2))))
    if serial:
        devices += aml.device("COM1", aml.name("_HID", aml.eisa_id("PNP0501")),
                              aml.name("_UID", aml.integer(0)),
                              aml.name("_CRS", aml.resource_template(
                                  aml.io_port(layout.SERIAL_PORT, 8),
                                  aml.irq(layout.SERIAL_IRQ))))
    return devices


def virtio_mmio_devices(slots: int) -> bytes:
    """One LNRO0005 device per virtio-mmio slot, as Linux's virtio_mmio ACPI match and
    QEMU's microvm describe them: the 4 KiB window and the slot's IRQ (edge, as the
    irqfd behind it pulses)."""
    devices = b""
    for index in range(slots):
        base, irq = layout.virtio_mmio_slot(index)
        devices += aml.device(f"V{index:03X}", aml.name("_HID", aml.string("LNRO0005")),
                              aml.name("_UID", aml.integer(index)),
                              aml.name("_CCA", aml.integer(1)),
                              aml.name("_CRS", aml.resource_template(
                                  aml.memory32_fixed(base, layout.VIRTIO_MMIO_SIZE),
                                  aml.interrupt(irq))))
    return devices


POWER_BUTTON_NOTIFY = 0x80       # a power button's "pressed" (ACPI, device object notifications)


def power_button_devices(gsi: int = layout.POWER_BUTTON_GSI) -> bytes:
    """A control-method power button (PNP0C0C, \\_SB.PWRB) and the Generic Event Device
    (ACPI0013, \\_SB.GED) that reports its presses, as QEMU's microvm has them (ACPI
    6.5, "Generic Event Device", "Control Method Power Button").

    The GED's _CRS holds one interrupt, `gsi`, edge-triggered and active high: the VMM
    pulses the line, and Linux programs the IOAPIC pin from this descriptor (above the
    ISA range it would otherwise assume level, active low). On that interrupt Linux's
    GED driver (drivers/acpi/evged.c, built in) runs _EVT with the GSI as Arg0, which
    notifies PWRB with 0x80; the button driver (button.ko) then reports KEY_POWER on its
    input device "Power Button"."""
    button = aml.device("PWRB", aml.name("_HID", aml.eisa_id("PNP0C0C")),
                        aml.name("_UID", aml.integer(0)))
    ged = aml.device("GED", aml.name("_HID", aml.string("ACPI0013")),
                     aml.name("_UID", aml.integer(0)),
                     aml.name("_CRS", aml.resource_template(aml.interrupt(gsi))),
                     aml.method("_EVT", 1,
                                aml.if_(aml.lequal(aml.arg(0), aml.integer(gsi)),
                                        aml.notify("\\_SB.PWRB", POWER_BUTTON_NOTIFY))))
    return button + ged


def dsdt(devices: bytes) -> bytes:
    """\\_S5 for power-off, and the devices under \\_SB."""
    s5 = aml.name("\\_S5", aml.package(aml.integer(S5_SLEEP_TYPE), aml.integer(0),
                                       aml.integer(0), aml.integer(0)))
    return table(b"DSDT", 2, s5 + aml.scope("\\_SB", devices))


def xsdt(addresses: list[int]) -> bytes:
    return table(b"XSDT", 1, struct.pack(f"<{len(addresses)}Q", *addresses))


def rsdp(xsdt_address: int) -> bytes:
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36,
                                 xsdt_address, 0))
    data[8] = _checksum(bytes(data[:20]))
    data[32] = _checksum(bytes(data))
    return bytes(data)


def build(vcpus: int, ioapic_id: int, devices: bytes) -> list[tuple[int, bytes]]:
    """(guest address, bytes) of every table; the RSDP is at layout.ACPI_ADDR."""
    placed: list[tuple[int, bytes]] = []
    cursor = layout.ACPI_ADDR + 64                         # after the RSDP, aligned

    def place(data: bytes) -> int:
        nonlocal cursor
        address = cursor
        placed.append((address, data))
        cursor = (cursor + len(data) + 15) & ~15
        return address

    dsdt_address = place(dsdt(devices))
    fadt_address = place(fadt(dsdt_address))
    madt_address = place(madt(vcpus, ioapic_id))
    xsdt_address = place(xsdt([fadt_address, madt_address]))
    if cursor > layout.ACPI_END:
        raise ValueError("the ACPI tables do not fit in the BIOS area")
    return [(layout.ACPI_ADDR, rsdp(xsdt_address))] + placed

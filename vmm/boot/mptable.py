"""The Intel MultiProcessor Specification 1.4 table: how the guest finds its vCPUs and
the IOAPIC without ACPI.

Layout: the floating pointer at the start of the EBDA, the configuration table right
after it. One processor entry per vCPU (APIC id = vCPU index), one ISA bus, the IOAPIC,
ISA IRQ i wired to IOAPIC pin i, LINT0 as ExtINT and LINT1 as NMI on every LAPIC.
"""

import struct

from .. import layout

APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 16
CPU_ENABLED, CPU_BSP = 1, 2
CPU_SIGNATURE = 0x600            # family 6
CPU_FEATURES = 0x201             # FPU, APIC
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3

_FLOATING = struct.Struct("<4sIBBBBBBBB")
_HEADER = struct.Struct("<4sHBB8s12sIHHII")
_CPU = struct.Struct("<BBBBII8x")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTERRUPT = struct.Struct("<BBHBBBB")


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def mp_table(vcpus: int) -> bytes:
    """The floating pointer and the configuration table, to be written at EBDA_ADDR."""
    io_apic = layout.ioapic_id(vcpus)
    entries = [_CPU.pack(0, cpu, APIC_VERSION, CPU_ENABLED | (CPU_BSP if cpu == 0 else 0),
                         CPU_SIGNATURE, CPU_FEATURES) for cpu in range(vcpus)]
    entries.append(_BUS.pack(1, 0, b"ISA   "))
    entries.append(_IOAPIC.pack(2, io_apic, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    entries += [_INTERRUPT.pack(3, MP_INT, 0, 0, irq, io_apic, irq) for irq in range(IOAPIC_PINS)]
    entries.append(_INTERRUPT.pack(4, MP_EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(_INTERRUPT.pack(4, MP_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)

    config_addr = layout.EBDA_ADDR + _FLOATING.size
    header = bytearray(_HEADER.pack(b"PCMP", _HEADER.size + len(body), 4, 0, b"STRATOVI",
                                    b"MICROVM     ", 0, 0, len(entries), layout.LAPIC_ADDR, 0))
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(_FLOATING.pack(b"_MP_", config_addr, 1, 4, 0, 0, 0, 0, 0, 0))
    floating[10] = _checksum(floating)
    return bytes(floating) + bytes(header) + body

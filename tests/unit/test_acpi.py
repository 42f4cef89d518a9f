"""ACPI tables checked by a third-party parser: ACPICA's disassembler (`iasl -d`)."""

import re
import shutil
import struct
import subprocess

import pytest

from vmm import layout
from vmm.acpi import aml, tables


def disassemble(tmp_path, name: str, data: bytes) -> str:
    assert shutil.which("iasl"), "iasl (acpica-tools) is needed: scripts/setup.sh installs it"
    path = tmp_path / f"{name}.dat"
    path.write_bytes(data)
    result = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"\b(Error|Warning)\b", result.stdout + result.stderr), result.stdout
    return (tmp_path / f"{name}.dsl").read_text()


def by_signature(vcpus=2, serial=True) -> dict[bytes, tuple[int, bytes]]:
    placed = tables.build(vcpus, layout.ioapic_id(vcpus), tables.legacy_devices(serial))
    return {data[:4] if data[:4] != b"RSD " else b"RSDP": (address, data)
            for address, data in placed}


def test_every_table_checksums_and_lies_in_the_bios_area():
    found = by_signature()
    assert set(found) == {b"RSDP", b"XSDT", b"FACP", b"APIC", b"DSDT"}
    address, rsdp = found[b"RSDP"]
    assert address == layout.ACPI_ADDR and address % 16 == 0
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert struct.unpack_from("<Q", rsdp, 24)[0] == found[b"XSDT"][0]
    for signature, (address, data) in found.items():
        assert layout.ACPI_ADDR <= address and address + len(data) <= layout.ACPI_END
        if signature != b"RSDP":
            assert sum(data) % 256 == 0 and struct.unpack_from("<I", data, 4)[0] == len(data)
    xsdt = found[b"XSDT"][1]
    assert struct.unpack_from("<2Q", xsdt, 36) == (found[b"FACP"][0], found[b"APIC"][0])


def test_fadt_is_hardware_reduced_with_reset_and_sleep_registers(tmp_path):
    found = by_signature()
    text = disassemble(tmp_path, "facp", found[b"FACP"][1])
    assert re.search(r"Hardware Reduced \(V5\) : 1", text)
    assert re.search(r"Reset Register Supported \(V2\) : 1", text)
    assert re.search(r"DSDT Address : 0*%X" % found[b"DSDT"][0], text)
    assert re.search(r"Value to cause reset : FE", text)
    sleep = text[text.index("Sleep Control Register"):]
    assert re.search(r"Address : 0*3C0", sleep)


@pytest.mark.parametrize("vcpus", [1, 4, 254])
def test_madt_lists_every_vcpu_and_the_ioapic(tmp_path, vcpus):
    text = disassemble(tmp_path, "apic", by_signature(vcpus)[b"APIC"][1])
    apic_ids = [int(x, 16) for x in re.findall(r"Local Apic ID : ([0-9A-F]+)", text)]
    assert apic_ids == list(range(vcpus))
    assert re.search(r"I/O Apic ID : %02X" % vcpus, text)
    assert re.search(r"Address : FEC00000", text)


@pytest.mark.parametrize("serial", [True, False])
def test_dsdt_describes_the_legacy_devices(tmp_path, serial):
    text = disassemble(tmp_path, "dsdt", by_signature(serial=serial)[b"DSDT"][1])
    assert 'EisaId ("PNP0B00")' in text
    assert ('EisaId ("PNP0501")' in text) == serial
    if serial:
        assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8", text)
        assert re.search(r"IRQNoFlags \(\)\s+\{4\}", text)
    assert re.search(r"Name \(\\_S5, Package \(0x04\).*?\{\s+0x05,", text, re.S)


@pytest.mark.parametrize("length,encoded", [
    (0x3E, b"\x3F"), (0x3F, b"\x41\x04"), (0xFFD, b"\x4F\xFF"), (0xFFE, b"\x81\x00\x01"),
])
def test_pkg_length_encoding(length, encoded):
    assert aml.pkg_length(length) == encoded


def test_eisa_id():
    assert aml.eisa_id("PNP0501") == b"\x0c" + bytes.fromhex("41d00501")


def test_virtio_mmio_slots_in_the_dsdt(tmp_path):
    slots = layout.BLK_SLOTS + layout.NET_SLOTS
    text = disassemble(tmp_path, "dsdt", tables.dsdt(tables.virtio_mmio_devices(slots)))
    devices = re.findall(r"Device \((V0[0-9A-F]{2})\)(.*?)\n        \}", text, re.S)
    assert [name for name, _ in devices] == [f"V{i:03X}" for i in range(slots)]
    for index, (_, body) in enumerate(devices):
        base, irq = layout.virtio_mmio_slot(index)
        assert 'Name (_HID, "LNRO0005")' in body
        assert re.search(r"Memory32Fixed \(ReadWrite,\s+0x%08X,\s+// Address Base\s+0x00001000"
                         % base, body), body
        assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)"
                         r"\s+\{\s+0x%08X," % irq, body), body


def test_virtio_mmio_cmdline_words():
    from vmm.devices.virtio.discovery import cmdline_devices
    assert cmdline_devices(2) == ("virtio_mmio.device=4K@0xd0000000:5 "
                                  "virtio_mmio.device=4K@0xd0001000:6")
    assert cmdline_devices(11).split()[-1] == "virtio_mmio.device=4K@0xd000a000:15"
    with pytest.raises(ValueError):
        cmdline_devices(12)

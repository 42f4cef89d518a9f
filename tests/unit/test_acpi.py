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


def test_fadt_says_the_power_button_is_a_control_method_one(tmp_path):
    # FADT PWR_BUTTON set means "no fixed-feature power button": the button is \_SB.PWRB.
    text = disassemble(tmp_path, "facp", by_signature()[b"FACP"][1])
    assert re.search(r"Control Method Power Button \(V1\) : 1", text)


def dsdt_of_the_machine(slots: int = layout.BLK_SLOTS + layout.NET_SLOTS) -> bytes:
    """The DSDT as the loader builds it."""
    return tables.dsdt(tables.legacy_devices(serial=True) + tables.power_button_devices()
                       + tables.virtio_mmio_devices(slots))


def test_power_button_and_its_generic_event_device_in_the_dsdt(tmp_path):
    gsi = layout.POWER_BUTTON_GSI
    text = disassemble(tmp_path, "dsdt", dsdt_of_the_machine())
    devices = dict(re.findall(r"\n        Device \((\w+)\)\n        \{(.*?)\n        \}", text,
                              re.S))
    button, ged = devices["PWRB"], devices["GED"]
    assert 'Name (_HID, EisaId ("PNP0C0C")' in button
    assert 'Name (_HID, "ACPI0013"' in ged
    assert re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)"
                     r"\s+\{\s+0x%08X,\s+\}" % gsi, ged), ged
    evt = re.search(r"Method \(_EVT, 1, NotSerialized\).*", ged, re.S)
    assert evt, ged
    assert re.search(r"If \(\(Arg0 == 0x%02X\)\)\s+\{\s+Notify \(\\_SB\.PWRB, 0x80\)" % gsi,
                     evt[0]), evt[0]
    # No other device in the DSDT has the GED's interrupt.
    interrupts = [int(x, 16) for x in re.findall(r"Interrupt \([^)]*\)\s+\{\s+0x([0-9A-F]+),",
                                                 text)]
    interrupts += [int(x) for x in re.findall(r"IRQNoFlags \(\)\s+\{(\d+)\}", text)]
    assert interrupts.count(gsi) == 1 and len(interrupts) == 1 + 8 + 1


def test_dsdt_recompiles_to_the_same_bytes(tmp_path):
    """ACPICA's compiler, fed its own disassembly with optimizations off (-oa), writes
    exactly our AML: every term (Method, If, LEqual, Notify, Arg0, names, resources)
    was encoded as the spec reads."""
    data = dsdt_of_the_machine()
    disassemble(tmp_path, "dsdt", data)
    result = subprocess.run(["iasl", "-oa", "-p", "again", "dsdt.dsl"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    again = (tmp_path / "again.aml").read_bytes()
    header = tables.HEADER.size           # the compiler writes its own ids and checksum
    assert again[header:] == data[header:]


def test_aml_terms():
    assert aml.method("_EVT", 1, serialized=True) == b"\x14\x06_EVT\x09"
    assert aml.if_(aml.lequal(aml.arg(0), aml.integer(16))) == b"\xa0\x05\x93\x68\x0a\x10"
    assert aml.notify("\\_SB.PWRB", 0x80) == b"\x86\\\x2e_SB_PWRB\x0a\x80"
    with pytest.raises(ValueError):
        aml.arg(7)


def test_the_loader_writes_that_dsdt(tmp_path):
    """RSDP -> XSDT -> FADT -> X_DSDT in guest RAM: the loader's DSDT is the one above,
    power button included."""
    from tests.framework.guest import tiny_guest
    from vmm.boot.loader import load
    from vmm.config import parse
    from vmm.machine.memory import GuestMemory, create_memfd
    config = parse(["-kernel", str(tiny_guest()), "-api-channel", f"unix:{tmp_path}/api.sock",
                    "-serial", "stdio"]).config
    memory = GuestMemory(create_memfd(config.machine.mem_size), config.machine.mem_size)
    load(config, memory)

    def u(address, fmt):
        return struct.unpack(fmt, memory.read(address, struct.calcsize(fmt)))[0]

    fadt = u(u(layout.ACPI_ADDR + 24, "<Q") + 36, "<Q")
    dsdt = u(fadt + 140, "<Q")
    assert memory.read(dsdt, u(dsdt + 4, "<I")) == dsdt_of_the_machine()

"""The ACPI power button's device side: a press is one pulse on the GED's GSI."""

import pytest

from vmm import layout
from vmm.devices.legacy.power_button import PowerButton

IOAPIC_PINS = 24            # KVM's in-kernel IOAPIC


def test_press_raises_then_lowers_the_ged_interrupt():
    calls = []
    button = PowerButton(lambda gsi, level: calls.append((gsi, level)))
    button.press()
    assert calls == [(layout.POWER_BUTTON_GSI, True), (layout.POWER_BUTTON_GSI, False)]
    button.press()
    assert len(calls) == 4 and calls[2:] == calls[:2]


def test_the_gsi_is_an_ioapic_pin_no_other_device_uses():
    taken = {layout.SERIAL_IRQ} | {layout.virtio_mmio_slot(i)[1]
                                   for i in range(layout.MAX_VIRTIO_SLOTS)}
    assert layout.POWER_BUTTON_GSI not in taken
    assert 16 <= layout.POWER_BUTTON_GSI < IOAPIC_PINS      # not an ISA IRQ (no PIC pin)


@pytest.mark.needs_kvm
def test_kvm_takes_the_pulse_on_its_in_kernel_ioapic():
    import os
    from vmm.machine.kvm import Kvm, open_kvm
    fd = open_kvm()
    try:
        vm = Kvm(fd).create_vm()
        try:
            vm.create_irqchip()
            PowerButton(vm.irq_line).press()        # KvmError if KVM refused the GSI
        finally:
            os.close(vm.fd)
    finally:
        os.close(fd)

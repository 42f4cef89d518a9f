"""The ACPI power button: a press is one edge on the Generic Event Device's interrupt.

The guest learns of the button from the DSDT (vmm/acpi/tables.py, power_button_devices):
a PNP0C0C device \\_SB.PWRB and a GED (ACPI0013) whose _CRS lists layout.POWER_BUTTON_GSI
as an edge-triggered, active-high interrupt and whose _EVT notifies PWRB. So the device
has no registers: pressing it raises the IOAPIC pin and lowers it again. A press while
the guest has the pin masked (no GED driver yet) is lost, as with a real edge interrupt;
what the guest makes of a press (a clean shutdown, or nothing) is up to its software.
"""

import threading
from typing import Callable

from ... import layout


class PowerButton:
    def __init__(self, irq_line: Callable[[int, bool], None],
                 gsi: int = layout.POWER_BUTTON_GSI):
        """irq_line(gsi, level): the VM's KVM_IRQ_LINE."""
        self._irq_line = irq_line
        self.gsi = gsi
        self._lock = threading.Lock()       # two presses at once are two whole pulses

    def press(self) -> None:
        with self._lock:
            self._irq_line(self.gsi, True)
            self._irq_line(self.gsi, False)

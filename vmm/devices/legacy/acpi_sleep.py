"""The hardware-reduced ACPI sleep registers (FADT SLEEP_CONTROL_REG/SLEEP_STATUS_REG).

A guest entering S5 (power off) writes SLP_TYP=5 with SLP_EN to the control register;
that ends the VM, as a power button would. Other sleep states are not supported: the
write is ignored and the guest keeps running.
"""

from typing import Callable

CONTROL, STATUS = 0, 1
SLP_EN = 0x20
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7
S5 = 5


class AcpiSleep:
    def __init__(self, power_off: Callable[[], None]):
        self._power_off = power_off

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == CONTROL and value & SLP_EN and (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5:
            self._power_off()

"""The i8042 keyboard controller, reduced to what a microVM needs: the reset line.

Linux's `reboot=k` waits for the input buffer to drain (status bit 1 clear) and writes
0xFE (pulse reset) to the command port; that ends the VM. A few other commands answer
as a real controller would, so a driver that probes it is not confused.
"""

from typing import Callable

DATA, COMMAND = 0x0, 0x4          # offsets from port 0x60
CMD_READ_CTR, CMD_WRITE_CTR, CMD_SELF_TEST, CMD_PULSE_RESET = 0x20, 0x60, 0xAA, 0xFE
STATUS_OUTPUT_FULL = 0x01
SELF_TEST_OK = 0x55


class I8042:
    def __init__(self, reset: Callable[[], None]):
        self._reset = reset
        self._control = 0
        self._output: int | None = None
        self._expect_control = False

    def read(self, offset: int, size: int) -> int:
        if offset == COMMAND:
            return STATUS_OUTPUT_FULL if self._output is not None else 0
        if offset == DATA and self._output is not None:
            value, self._output = self._output, None
            return value
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == DATA and self._expect_control:
            self._control, self._expect_control = value, False
        elif offset == COMMAND:
            if value == CMD_PULSE_RESET:
                self._reset()
            elif value == CMD_READ_CTR:
                self._output = self._control
            elif value == CMD_WRITE_CTR:
                self._expect_control = True
            elif value == CMD_SELF_TEST:
                self._output = SELF_TEST_OK

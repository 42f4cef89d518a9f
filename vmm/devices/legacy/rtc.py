"""A CMOS real-time clock (MC146818) at ports 0x70/0x71 that reads the host's UTC time.

Without it, the stock kernel's rtc_cmos driver probes an absent device through slow
I/O exits (about 3.5 s nested, shared/docs/host.md). The clock never raises IRQ 8 and
ignores attempts to set the time; other CMOS bytes are plain storage.
"""

import time

INDEX, DATA = 0, 1
SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
REG_A_DIVIDER = 0x26             # 32.768 kHz, 1024 Hz; UIP always clear
REG_B_24H = 0x02                 # BCD, 24-hour
REG_D_VALID = 0x80               # battery good


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class Rtc:
    def __init__(self):
        self._index = 0
        self._cmos = bytearray(128)
        self._cmos[REG_A] = REG_A_DIVIDER
        self._cmos[REG_B] = REG_B_24H
        self._cmos[REG_D] = REG_D_VALID

    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return 0xFF
        now = time.gmtime()
        clock = {SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour,
                 WEEKDAY: (now.tm_wday + 1) % 7 + 1, DAY: now.tm_mday, MONTH: now.tm_mon,
                 YEAR: now.tm_year % 100, CENTURY: now.tm_year // 100}
        if self._index in clock:
            return _bcd(clock[self._index])
        return self._cmos[self._index]

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == INDEX:
            self._index = value & 0x7F            # bit 7 is the NMI mask
        elif self._index not in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR,
                                 CENTURY, REG_C, REG_D):
            self._cmos[self._index] = value

"""The few legacy PC devices a microVM keeps: 8250 UART, i8042 (for reset), CMOS RTC."""

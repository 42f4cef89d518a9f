"""A 16550A UART, enough for Linux's 8250 driver: probing (scratch, loopback, FIFO),
polled and interrupt-driven transmit, interrupt-driven receive.

Transmission is instantaneous: a byte written to THR goes straight to the output, and
the transmitter is empty again at once. Received bytes wait in a bounded FIFO; the
feeder (the stdin thread) blocks while it is full, so typing ahead is never lost.
The interrupt line is level-triggered: it is high while an enabled interrupt is pending.
"""

import collections
import os
import threading
from typing import Callable

from ... import timeline

# Register offsets.
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO_ENABLED = 0x01, 0x02, 0x04, 0xC0
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

RX_FIFO_BYTES = 64


class Serial:
    def __init__(self, output_fd: int | None, set_irq: Callable[[bool], None]):
        self._output_fd = output_fd
        self._written = False
        self._set_irq = set_irq
        self._lock = threading.Condition()
        self._rx: collections.deque[int] = collections.deque()
        self._ier = 0
        self._lcr = 0x03                    # 8N1
        self._mcr = MCR_OUT2
        self._scr = 0
        self._divisor = 12                  # 9600 baud
        self._fifo = False
        self._thr_interrupt = False         # "THR empty" pending until IIR is read
        self._irq_level = False

    # Guest side.
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self._divisor & 0xFF
            byte = self._rx.popleft() if self._rx else 0
            self._lock.notify_all()
            return byte
        if offset == IER_DLM:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR_FCR:
            iir = self._pending()
            if iir == IIR_THRI:
                self._thr_interrupt = False
            return iir | (IIR_FIFO_ENABLED if self._fifo else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                return ((self._mcr & MCR_RTS) << 3 | (self._mcr & MCR_DTR) << 5
                        | (self._mcr & MCR_OUT1) << 4 | (self._mcr & MCR_OUT2) << 4)
            return MSR_DCD | MSR_DSR | MSR_CTS
        return self._scr

    def _write(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            elif self._mcr & MCR_LOOP:
                if len(self._rx) < RX_FIFO_BYTES:
                    self._rx.append(value)
                self._thr_interrupt = True
            else:
                self._emit(value)
                self._thr_interrupt = True
        elif offset == IER_DLM:
            if dlab:
                self._divisor = (self._divisor & 0xFF) | value << 8
            else:
                # Enabling THRI with the transmitter empty raises it at once (the
                # 8250 driver's way of starting a transmission).
                if value & IER_THRI and not self._ier & IER_THRI:
                    self._thr_interrupt = True
                self._ier = value & 0x0F
        elif offset == IIR_FCR:
            self._fifo = bool(value & FCR_ENABLE_FIFO)
            if value & FCR_CLEAR_RCVR:
                self._rx.clear()
                self._lock.notify_all()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & 0x1F
        elif offset == SCR:
            self._scr = value

    def _pending(self) -> int:
        if self._ier & IER_RDI and self._rx:
            return IIR_RDI
        if self._ier & IER_THRI and self._thr_interrupt:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    def _emit(self, byte: int) -> None:
        if self._output_fd is None:
            return
        if not self._written:
            self._written = True
            timeline.mark("first serial byte")
        try:
            os.write(self._output_fd, bytes((byte,)))
        except OSError:
            self._output_fd = None   # the reader went away: drop output, keep the guest running

    # Host side.
    def receive(self, data: bytes, stop: threading.Event) -> None:
        """Queue input for the guest; blocks while the FIFO is full (until `stop`)."""
        for byte in data:
            with self._lock:
                while len(self._rx) >= RX_FIFO_BYTES and not stop.is_set():
                    self._lock.wait(0.1)
                if stop.is_set():
                    return
                self._rx.append(byte)
                self._update_irq()

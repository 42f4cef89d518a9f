"""A VM's serial output read as it arrives, each chunk with the time it was read.

For the tiny guest's `watch` mode (guest/tiny.S): tests wait for its `+`/`-` marks and
bench/hotplug.py times them and counts its `.` ticks over a stretch of wall time. A
thread reads the pipe all the time, so the guest never waits on a full pipe (its UART
would then hold THRE low and its loop would stall).
"""

import os
import threading
import time


class SerialLog:
    def __init__(self, stream):
        """stream: the VM's stdout (a pipe), read until EOF by a daemon thread."""
        self._fd = stream.fileno()
        self._chunks: list[tuple[float, bytes]] = []
        self._data = bytearray()
        self._changed = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._read, name="serial-log", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic()
            with self._changed:
                if not chunk:
                    self.closed = True
                    self._changed.notify_all()
                    return
                self._chunks.append((now, chunk))
                self._data += chunk
                self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    def mark(self) -> int:
        """The offset of the next byte to arrive: wait_for(..., start=mark()) sees only
        what comes after this call."""
        with self._changed:
            return len(self._data)

    def wait_for(self, byte: bytes, start: int = 0, timeout: float = 10) -> tuple[float, int]:
        """(time read, offset) of the first `byte` at or after offset `start`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                offset = self._data.find(byte, start)
                if offset >= 0:
                    return self._time_of(offset), offset
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    tail = bytes(self._data[-200:]).decode(errors="replace")
                    raise AssertionError(f"no {byte!r} on the serial output after offset "
                                         f"{start} ({'EOF' if self.closed else 'timeout'}); "
                                         f"its end: {tail!r}")
                self._changed.wait(remaining)

    def _time_of(self, offset: int) -> float:
        seen = 0
        for when, chunk in self._chunks:
            seen += len(chunk)
            if offset < seen:
                return when
        raise IndexError(offset)

    def count(self, byte: bytes, start: int, end: int) -> int:
        """How many `byte`s are at offsets [start, end)."""
        with self._changed:
            return self._data.count(byte, start, end)

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)

"""-daemonize and -pidfile: detach from the terminal, yet report start-up errors.

The foreground process waits on a pipe until the daemon says it is running (exit 0)
or sends its error line (printed, exit 1), like QEMU's -daemonize.
"""

import os
import sys

READY = b"\0"


class Readiness:
    def __init__(self, fd: int):
        self._fd = fd

    def _send(self, data: bytes) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1

    def ready(self) -> None:
        self._send(READY)

    def failed(self, line: str) -> None:
        self._send(line.encode("utf-8", "backslashreplace"))

    def close_in_child(self) -> None:
        """A forked helper must not hold the pipe open."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def detach() -> Readiness:
    """Fork twice and start a new session; only the daemon returns."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
        message = b"".join(chunks)
        if message == READY:
            os._exit(0)
        sys.stderr.write((message.decode("utf-8", "replace")
                          or "stratovirt: error: the daemon ended during start-up") + "\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return Readiness(write_end)


def write_pidfile(path) -> None:
    """O_EXCL: a pidfile that appeared since validation is not overwritten."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")

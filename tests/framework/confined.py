"""Forked children that confine themselves (vmm.sandbox), for the seccomp tests: run a
body in a child, collect how it ended and what the SIGSYS reporter wrote."""

import os
import resource
import signal
from dataclasses import dataclass
from typing import Callable


@dataclass
class Ending:
    status: int          # os.waitpid status
    log: str             # what the child wrote to its log fd (violation lines)

    @property
    def signal(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None

    @property
    def exit_code(self) -> int | None:
        return os.WEXITSTATUS(self.status) if os.WIFEXITED(self.status) else None


def run_child(body: Callable[[int], None], timeout: float = 20) -> Ending:
    """Fork; the child calls body(log_fd) and exits 0, or 3 if body raised. No core
    files: a child killed by SIGSYS would otherwise dump one."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 3
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.alarm(int(timeout))
            body(write_end)
            status = 0
        except BaseException as error:    # noqa: BLE001 - reported through the pipe
            os.write(write_end, f"child raised {error!r}\n".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return Ending(status, b"".join(chunks).decode(errors="replace"))


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    with open(path) as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}

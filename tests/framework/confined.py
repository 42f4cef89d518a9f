"""Forked children that confine themselves (vmm.sandbox), for the seccomp tests: run a
body in a child, collect how it ended and what the SIGSYS reporter wrote; and backends
forked under the launcher's filter, as hot-plug and restarts fork them."""

import os
import resource
import signal
import struct
from dataclasses import dataclass
from typing import Callable

from vmm import children, sandbox


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


@dataclass
class UnderLauncher(children.Child):
    """A backend forked the way the confined launcher forks one for hot-plug or a
    restart: an intermediate process confines itself as the launcher (its filter on),
    forks the backend with children.spawn and waits for it, so the backend runs under
    the launcher's filter until it stacks its own. `pid` is the backend's (for /proc);
    reap() and status are the backend's too, passed on by the intermediate's exit status
    (the backend's exit code, or 128 + the signal that killed it)."""

    intermediate: int = 0

    def reap(self, block: bool = False) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.intermediate, 0 if block else os.WNOHANG)
            if pid == 0:
                return False
            code = os.waitstatus_to_exitcode(status)
            self.status = (code - 128) if code > 128 else code << 8
            os.close(self.pidfd)
        return True

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(block=True)


def spawn_under_launcher(name: str, role: str, keep_fds: list[int],
                         body: Callable[[], int], seccomp: bool = True) -> UnderLauncher:
    """children.spawn(name, role, keep_fds, body) from a process confined as the launcher
    (vmm.sandbox.confine("launcher")): see UnderLauncher."""
    read_end, write_end = os.pipe()
    intermediate = os.fork()
    if intermediate == 0:
        code = 1
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            # Only what the launcher would hold: not the test's end of the backend's
            # connection, or the backend would never see it close.
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd > 2 and fd not in (*keep_fds, write_end):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            sandbox.confine("launcher", seccomp=seccomp, name="stratovirt")
            child = children.spawn(name, role, keep_fds, body)
            os.write(write_end, struct.pack("i", child.pid))
            child.reap(block=True)
            code = os.waitstatus_to_exitcode(child.status)
            code = 128 - code if code < 0 else code
        finally:
            os._exit(code)
    os.close(write_end)
    data = os.read(read_end, 4)
    os.close(read_end)
    if len(data) != 4:
        os.waitpid(intermediate, 0)
        raise AssertionError("the intermediate launcher failed before forking the backend")
    (pid,) = struct.unpack("i", data)
    return UnderLauncher(pid, name, os.pidfd_open(intermediate), intermediate=intermediate)

"""A VM run by our `stratovirt` as a user would run it: spawn, talk QMP, wait, inspect.

Microvm owns one VM's whole life in a private directory (api socket, log, pidfile) and
checks on exit that nothing was left behind, like Firecracker's framework does.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .qmp import running


class Microvm:
    def __init__(self, workdir: Path, kernel: Path, *extra: str, serial: bool = True,
                 append: str = "", stdin=subprocess.DEVNULL):
        self.workdir = workdir
        self.api = workdir / "api.sock"
        self.argv = [sys.executable, "-m", "vmm", "-kernel", str(kernel),
                     "-api-channel", f"unix:{self.api}", *extra]
        if append:
            self.argv += ["-append", append]
        if serial:
            self.argv += ["-serial", "stdio"]
        self.stdin = stdin
        self.process: subprocess.Popen | None = None

    def spawn(self, pass_fds=(), env: dict | None = None) -> "Microvm":
        """pass_fds: extra files the VMM starts with (Kata's fds= and vhostfd=)."""
        self.process = subprocess.Popen(self.argv, stdin=self.stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, cwd=self.workdir,
                                        pass_fds=pass_fds, env=env)
        return self

    def wait_for_api(self, timeout: float = 30) -> None:
        """Until the api-channel answers query-status: the VM is then up and its vCPUs
        started."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no QMP greeting; {self.communicate()}")
            if running(str(self.api), deadline - time.monotonic()):
                return
            time.sleep(0.02)

    def communicate(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def run(self, timeout: float = 60) -> tuple[int, str, str]:
        return self.spawn().communicate(timeout)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def leftovers(self) -> list[str]:
        return sorted(os.listdir(self.workdir))


def thread_names(pid: int) -> dict[int, str]:
    tasks = Path(f"/proc/{pid}/task")
    return {int(t.name): (t / "comm").read_text().strip() for t in tasks.iterdir()}


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()

"""Drives a VM through its serial console, expect-style: our stratovirt inside L1 (the
nested tests copy this file there) or QEMU on the host (the interop tests).

Standard library only, since it also runs in L1 outside the project. Every console line
is echoed as `L2| line`, so a failing test shows the guest's whole boot.
"""

import os
import re
import select
import subprocess
import time


class Timeout(Exception):
    pass


class Vm:
    def __init__(self, argv: list[str], timeout: float | None = None, pass_fds=(), env=None):
        # $CONSOLE_TIMEOUT: for slower runs, e.g. under strace (scripts/seccomp_usage.py).
        timeout = timeout or float(os.environ.get("CONSOLE_TIMEOUT", 300))
        self.deadline = time.monotonic() + timeout
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, pass_fds=pass_fds, env=env)
        self._unseen = ""
        self._partial = ""

    def _pump(self, wait: float) -> bool:
        """Read what the VM printed; False at end of output."""
        ready, _, _ = select.select([self.process.stdout], [], [], wait)
        if not ready:
            return True
        data = os.read(self.process.stdout.fileno(), 65536)
        if not data:
            return False
        text = data.decode(errors="replace").replace("\r", "")
        lines = (self._partial + text).split("\n")
        for line in lines[:-1]:
            print("L2|", line, flush=True)
        self._partial = lines[-1]
        self._unseen += text
        return True

    def expect(self, pattern: str) -> re.Match:
        """The first match in complete lines (so `(.*)$` never sees half a line)."""
        regex = re.compile(pattern, re.M)
        while not (match := regex.search(self._unseen, 0, self._unseen.rfind("\n") + 1)):
            if time.monotonic() > self.deadline or not self._pump(1.0):
                raise Timeout(f"no {pattern!r} on the console")
        self._unseen = self._unseen[match.end():]
        return match

    def send(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def wait(self) -> int:
        """Until the VM exits; its exit status."""
        while self._pump(1.0):
            if time.monotonic() > self.deadline:
                self.process.kill()
                raise Timeout("the VM did not end")
        if self._partial:
            print("L2|", self._partial, flush=True)
        return self.process.wait(max(1.0, self.deadline - time.monotonic()))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

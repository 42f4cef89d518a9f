"""A VM run under `stratovirt-jailer`, as an operator would: files placed with --source,
the api-channel reached at the jail's path on the host, every process inspected in /proc.
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from jailer.cgroups import Cgroup, remove, v2_mount

from .qmp import running

JAILER = Path(sys.executable).parent / "stratovirt-jailer"


class JailedVm:
    def __init__(self, base: Path, id: str, sources: list[Path], vmm_args: list[str],
                 jailer_args: tuple[str, ...] = (), uid: int = 4321, gid: int = 4321,
                 stdin=subprocess.DEVNULL):
        self.base, self.id, self.uid, self.gid = base, id, uid, gid
        self.argv = [str(JAILER), "--id", id, "--uid", str(uid), "--gid", str(gid),
                     "--chroot-base-dir", str(base), *jailer_args,
                     *(arg for source in sources for arg in ("--source", str(source))),
                     "--", *vmm_args]
        self.stdin = stdin
        self.process: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        """The jail's root as the host sees it."""
        return self.base / "stratovirt" / self.id / "root"

    def host_path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def spawn(self) -> "JailedVm":
        self.process = subprocess.Popen(self.argv, stdin=self.stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        return self

    def run(self, timeout: float = 60) -> tuple[int, str, str]:
        return self.spawn().communicate(timeout)

    def communicate(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def wait_for(self, inside: str, timeout: float = 30) -> Path:
        """Until the VMM has created `inside` (its api socket, say) in the jail."""
        path = self.host_path(inside)
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {inside} in the jail; {self.communicate()}")
            time.sleep(0.02)
        return path

    def wait_for_api(self, inside: str = "/run/api.sock", timeout: float = 30) -> Path:
        """Until the api-channel answers query-status through the jail's socket: the VM
        is then up, every backend started and its vCPUs running."""
        path = self.wait_for(inside, timeout)
        deadline = time.monotonic() + timeout
        while not running(str(path), deadline - time.monotonic()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no QMP greeting; {self.communicate()}") from None
            time.sleep(0.02)
        return path

    def descendants(self) -> list[int]:
        """Every process below the jailer's supervisor, parents first."""
        found, pending = [], [self.process.pid]
        while pending:
            pid = pending.pop(0)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    children = [int(c) for c in (task / "children").read_text().split()]
                except FileNotFoundError:
                    continue
                found += children
                pending += children
        return found

    def signal(self, number: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(number)

    def cgroup(self) -> Path:
        return v2_mount() / "stratovirt" / self.id

    def cleanup(self) -> None:
        """What a test's jail may leave after a failure: the jail and the VM's cgroup."""
        self.kill()
        shutil.rmtree(self.base / "stratovirt" / self.id, ignore_errors=True)
        remove(Cgroup(v2_mount(), "stratovirt", self.id, ()))

    def kill(self) -> None:
        """SIGKILL to the supervisor: the jailed processes die with it (PDEATHSIG)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

"""cgroup v2 for a jailed VM: a cgroup of its own, `<mount>/<parent>/<id>`, its limits
written before the VMM starts, removed by --clean.

Only cgroup v2: the hierarchy is found in /proc/self/mountinfo (/sys/fs/cgroup when it is
cgroup2, else the first cgroup2 mount, e.g. /sys/fs/cgroup/unified on a hybrid host). A
limit needs its controller in that hierarchy's cgroup.controllers: on a hybrid host a
controller bound to a v1 hierarchy is not there, and saying so is better than a limit
silently not enforced. Controllers are enabled in cgroup.subtree_control from the root
down to the parent, so the VM's cgroup has the files; the parent holds no process (v2's
"no internal processes" rule), only VM cgroups.
"""

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

# The interface files a jail may set: the limits of the five controllers a VM needs.
FILES = {
    "memory.max": "memory", "memory.high": "memory", "memory.swap.max": "memory",
    "cpu.max": "cpu", "cpu.weight": "cpu",
    "pids.max": "pids",
    "io.max": "io", "io.weight": "io",
    "cpuset.cpus": "cpuset", "cpuset.mems": "cpuset",
}
CGROUP2 = "cgroup2"


class CgroupError(Exception):
    """A cgroup setting or the host's cgroups cannot give the jail what it asks for."""


@dataclass(frozen=True)
class Cgroup:
    mount: Path                          # the cgroup v2 hierarchy
    parent: str                          # relative to mount
    name: str                            # the VM's own, under parent
    limits: tuple[tuple[str, str], ...]  # (file, value), in the order given

    @property
    def path(self) -> Path:
        return self.mount / self.parent / self.name

    def controllers(self) -> list[str]:
        return sorted({FILES[file] for file, _ in self.limits})


def v2_mount(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """Where cgroup v2 is mounted; CgroupError if it is not."""
    found = []
    with open(mountinfo) as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split()[:1] == [CGROUP2]:
                found.append(Path(before.split()[4]))
    if not found:
        raise CgroupError("cgroup v2 is not mounted (no cgroup2 file system in "
                          "/proc/self/mountinfo); mount it, e.g. on /sys/fs/cgroup")
    return Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup") in found else found[0]


def plan(name: str, parent: str, settings: list[str]) -> Cgroup:
    """The jail's cgroup from --parent-cgroup and the --cgroup FILE=VALUE settings,
    checked against the host without creating anything."""
    parts = Path(parent).parts
    if not parent or Path(parent).is_absolute() or ".." in parts or "." in parts:
        raise CgroupError(f"--parent-cgroup {parent!r}: a relative path under the cgroup "
                          "v2 hierarchy, without '.' or '..'")
    limits = []
    for setting in settings:
        file, sep, value = setting.partition("=")
        if not sep or not value:
            raise CgroupError(f"--cgroup {setting!r}: expected FILE=VALUE, e.g. memory.max=512M")
        if file not in FILES:
            raise CgroupError(f"--cgroup {file}: unknown cgroup file; allowed: "
                              f"{', '.join(sorted(FILES))}")
        limits.append((file, value))
    mount = v2_mount()
    cgroup = Cgroup(mount, parent, name, tuple(limits))
    available = (mount / "cgroup.controllers").read_text().split()
    for file, _ in limits:
        if FILES[file] not in available:
            raise CgroupError(
                f"--cgroup {file}: the {FILES[file]} controller is not available in the "
                f"cgroup v2 hierarchy at {mount} (available: {' '.join(available) or 'none'}; "
                "a controller bound to a cgroup v1 hierarchy is not)")
    if cgroup.path.exists():
        raise CgroupError(f"the jail's cgroup {cgroup.path} already exists")
    return cgroup


def create(cgroup: Cgroup) -> None:
    """Make the VM's cgroup and write its limits; CgroupError (and nothing left) if the
    kernel refuses a value."""
    wanted = " ".join(f"+{c}" for c in cgroup.controllers())
    level = cgroup.mount
    for part in Path(cgroup.parent).parts:
        if wanted:
            _write(level / "cgroup.subtree_control", wanted)
        level = level / part
        level.mkdir(exist_ok=True)
    if wanted:
        _write(level / "cgroup.subtree_control", wanted)
    cgroup.path.mkdir()
    try:
        for file, value in cgroup.limits:
            try:
                _write(cgroup.path / file, value)
            except OSError as error:
                raise CgroupError(f"--cgroup {file}={value}: the kernel refused it "
                                  f"({error.strerror})") from None
    except BaseException:
        remove(cgroup)
        raise


def join(cgroup: Cgroup) -> None:
    """Move the calling process into the VM's cgroup (its children follow)."""
    _write(cgroup.path / "cgroup.procs", str(os.getpid()))


def oom_kills(cgroup: Cgroup) -> int:
    """How many of the VM's processes the kernel's OOM killer ended for memory.max
    (memory.events); 0 without the memory controller."""
    try:
        events = (cgroup.path / "memory.events").read_text().split("\n")
    except OSError:
        return 0
    counts = dict(line.split() for line in events if line.strip())
    return int(counts.get("oom_kill", 0))


def remove(cgroup: Cgroup, wait: float = 5.0) -> None:
    """Remove the VM's cgroup once its last process has gone (rmdir fails with EBUSY
    while the kernel still counts one)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            cgroup.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)

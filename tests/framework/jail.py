"""A device backend's empty root (vmm/sandbox/empty_root.py) as the host sees it through
/proc: nothing under /proc/PID/root (for vsock only its socket directory's path), its
root a read-only tmpfs, user, mount and IPC namespaces of its own, its ids mapped to
themselves, no capabilities, its filter on.

    check_jailed(backend_pid, launcher_pid)                 # disks, NICs, the console
    check_jailed(backend_pid, launcher_pid, reach=socket_dir)   # vsock
"""

import os
import time
from pathlib import Path

NAMESPACES = ("mnt", "ipc", "user")
CAPABILITIES = ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb")


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def confined(pid: int, filters: int, timeout: float = 10) -> dict[str, str]:
    """Its status once it has confined itself: its own filter on (`filters` in all: 2
    for a backend forked under the launcher's filter, whose Seccomp reads 2 from the
    fork on), or with filters=0 (-disable-seccomp) its capabilities gone."""
    deadline = time.monotonic() + timeout
    while True:
        found = status(pid)
        done = found["Seccomp_filters"] == str(filters) if filters else \
            int(found["CapBnd"], 16) == 0
        if done or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def namespaces(pid: int) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in NAMESPACES}


def root_mount(pid: int) -> tuple[str, list[str]]:
    """(file system type, mount options) of what the process sees as /."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            fstype = fields[fields.index("-") + 1]
            return fstype, fields[5].split(",")
    raise AssertionError(f"process {pid} has no mount on /")


def id_map(pid: int, which: str) -> list[int]:
    return [int(n) for n in Path(f"/proc/{pid}/{which}").read_text().split()]


def check_jailed(pid: int, launcher: int, reach: str | None = None, filters: int = 1,
                 ids: tuple[int, int] | None = None) -> None:
    """Fails with what differs. `launcher`: a process in the host's namespaces (the
    launcher, or the test that forked the backend); `filters`: 1, 2 for a backend
    forked under the launcher's filter (hot-plugged, restarted), 0 for -disable-seccomp;
    `ids`: the backend's (uid, gid) when they are not the launcher's."""
    found = confined(pid, filters)
    assert found["Seccomp"] == ("2" if filters else "0"), (pid, found)
    assert found["Seccomp_filters"] == str(filters), (pid, found)
    for cap in CAPABILITIES:
        assert int(found[cap], 16) == 0, (pid, cap, found[cap])
    assert found["NoNewPrivs"] == "1"
    root = f"/proc/{pid}/root"
    if reach is None:
        assert os.listdir(root) == [], os.listdir(root)
    else:
        # Each directory on the way holds only the next one; the last is the very
        # socket directory (bind-mounted), not a copy.
        parts = Path(reach).parts[1:]
        for depth, part in enumerate(parts):
            here = os.path.join(root, *parts[:depth])
            assert os.listdir(here) == [part], (here, os.listdir(here))
        inside, outside = os.stat(root + reach), os.stat(reach)
        assert (inside.st_dev, inside.st_ino) == (outside.st_dev, outside.st_ino)
    fstype, options = root_mount(pid)
    assert fstype == "tmpfs" and "ro" in options, (fstype, options)
    mine, host = namespaces(pid), namespaces(launcher)
    for ns in NAMESPACES:
        assert mine[ns] != host[ns], (pid, ns, mine[ns])
    if ids is None:
        launcher_ids = status(launcher)
        ids = int(launcher_ids["Uid"].split()[1]), int(launcher_ids["Gid"].split()[1])
    uid, gid = ids
    assert id_map(pid, "uid_map") == [uid, uid, 1]
    assert id_map(pid, "gid_map") == [gid, gid, 1]

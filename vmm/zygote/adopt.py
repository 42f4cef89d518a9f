"""What the zygote's child must become to be the caller's launcher, and the check that
it can: the policy in vmm/zygote/__init__.py, "Trust".

examine() runs in the zygote before it forks and reads the caller's /proc entry once;
become() runs in the child, which is forked with what examine() found.
"""

import functools
import io
import os
import resource
import signal
import sys
from dataclasses import dataclass

import prctl

from .. import timeline

_STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                "NoNewPrivs", "Seccomp")
_NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")
_CGROUP_V2_ROOT = "/sys/fs/cgroup"


@dataclass(frozen=True)
class Caller:
    """What examine() read of a caller that the child needs (it is forked with it)."""
    pid: int
    umask: int
    cgroup: str         # '' (the zygote's own) or the cgroup v2 path to join


@dataclass(frozen=True)
class _Identity:
    """What must be the same in the caller and the zygote, as /proc shows it."""
    status: tuple
    namespaces: tuple
    root: tuple
    label: str

    @classmethod
    def of(cls, pid, status: dict[str, str]) -> "_Identity":
        return cls(tuple(status.get(key) for key in _STATUS_KEYS),
                   tuple(_inode(f"/proc/{pid}/ns/{name}") for name in _NAMESPACES),
                   _inode(f"/proc/{pid}/root"), _label(pid))


@functools.cache
def _ours() -> _Identity:
    """The zygote's own, read once: nothing it does changes these (its cgroup, which an
    administrator may move, is read at each request)."""
    return _Identity.of("self", _status("self"))


def examine(pid: int) -> Caller | str:
    """The caller, or why a child of the zygote could not be what process `pid` would
    be (the caller is blocked in its request meanwhile)."""
    try:
        status = _status(pid)
        theirs, ours = _Identity.of(pid, status), _ours()
        umask = int(status["Umask"], 8)
        cgroup = _cgroup_move(_read(f"/proc/{pid}/cgroup"), _read("/proc/self/cgroup"))
    except OSError as error:
        return f"the caller's /proc entry: {error.strerror}"
    for key, mine, other in zip(_STATUS_KEYS, ours.status, theirs.status):
        if mine != other:
            return f"the caller's {key} ({other}) is not the zygote's ({mine})"
    for name, mine, other in zip(_NAMESPACES, ours.namespaces, theirs.namespaces):
        if mine != other:
            return f"the caller is in another {name} namespace"
    if theirs.root != ours.root:
        return "the caller has another root directory"
    if theirs.label != ours.label:
        return "the caller has another LSM label"
    if cgroup is None:
        return "the caller is in other cgroup v1 hierarchies"
    return Caller(pid, umask, cgroup)


def become(caller: Caller, message: dict, cwd: int) -> None:
    """Take on the caller's attributes (its fds are already in place)."""
    pid = caller.pid
    os.setsid()         # not the zygote's process group: a signal to it is not to the VMs
    os.fchdir(cwd)
    os.umask(caller.umask)
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            number = getattr(resource, name)
            resource.setrlimit(number, resource.prlimit(pid, number))
    os.sched_setaffinity(0, os.sched_getaffinity(pid))
    os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, pid))
    with open("/proc/self/oom_score_adj", "w") as ours:
        ours.write(_read(f"/proc/{pid}/oom_score_adj"))
    if caller.cgroup:
        with open(os.path.join(_CGROUP_V2_ROOT, caller.cgroup.lstrip("/"), "cgroup.procs"),
                  "w") as procs:
            procs.write(str(os.getpid()))
    os.environb.clear()
    os.environb.update(message["env"])
    sys.argv = list(message["argv"])
    prctl.set_name(message["name"][:15])       # as an exec of the caller's command
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _fresh_stdio()
    timeline.restart(message["started"])


def _fresh_stdio() -> None:
    """sys.stdin/stdout/stderr as a new interpreter would open them on these fds."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            setattr(sys, name, None)
            continue
        tty = os.isatty(fd)
        line = mode == "w" and (tty or fd == 2)
        stream = io.open(fd, mode, buffering=1 if line else -1, encoding="utf-8",
                         errors="backslashreplace" if fd == 2 else "strict", closefd=False)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _cgroup_move(theirs: str, ours: str) -> str | None:
    """'' when the caller is in the zygote's cgroups, a cgroup v2 path to join, or None
    when it is elsewhere under cgroup v1 (not followed)."""
    if theirs == ours:
        return ""
    lines = theirs.splitlines()
    if len(lines) == 1 and lines[0].startswith("0::") and len(ours.splitlines()) == 1:
        return lines[0][3:]
    return None


def _status(pid) -> dict[str, str]:
    fields = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _label(pid) -> str:
    try:
        return _read(f"/proc/{pid}/attr/current")
    except OSError:             # no LSM: the same for everyone
        return ""


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()

"""What a child process gives up before its seccomp filter goes on.

no_new_privs first (required for an unprivileged filter, and no exec can regain
anything); then every capability from every set. The bounding set and the ambient set
are per thread and inherited, so this must run in the process's first thread before it
starts any other. The parent-death signal makes a child die with the launcher.
"""

import ctypes
import functools
import signal

import prctl

from .._sigsys import lib

_libc = ctypes.CDLL(None, use_errno=True)


def no_new_privs() -> None:
    prctl.set_no_new_privs(1)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    prctl.set_pdeathsig(sig)


def name() -> str:
    return prctl.get_name()


def set_name(name: str) -> None:
    """The thread's name (comm, 15 bytes): how the auditor tells roles apart."""
    prctl.set_name(name[:15])


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets."""
    every = list(range(_last_cap() + 1))
    for cap in every:
        if prctl.capbset_read(cap):          # dropping needs CAP_SETPCAP, still held here
            prctl.capbset_drop(cap)
    if _libc.prctl(lib.PR_CAP_AMBIENT, lib.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAP_AMBIENT_CLEAR_ALL failed")
    prctl.set_caps((every, prctl.CAP_EFFECTIVE, False), (every, prctl.CAP_PERMITTED, False),
                   (every, prctl.CAP_INHERITABLE, False))


@functools.cache
def _last_cap() -> int:
    """The running kernel's highest capability (it may know more than python-prctl).
    Read once, by the launcher while it may open files (sandbox.prepare): a backend
    forked after the launcher's filter is on could not read it."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return prctl.CAP_LAST_CAP


def prepare() -> None:
    _last_cap()


def capabilities() -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of the calling thread, from /proc."""
    caps = {}
    with open("/proc/thread-self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                caps[key] = int(value, 16)
    return caps

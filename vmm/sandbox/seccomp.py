"""A role's profile as a libseccomp filter (pyseccomp): installed into the calling
thread only, or exported as BPF or as libseccomp's PFC text for auditors.

No TSYNC: libseccomp then loads the filter for the calling thread alone, which is what
lets each vCPU thread carry its own. Threads created afterwards by that thread inherit
it. A 32-bit (int 0x80) syscall kills the process outright (bad-arch action).
"""

import os
import tempfile
import threading

import pyseccomp

from .profile import ACTIONS, OPS, Profile

_ATTR_ACT_BADARCH = 2          # SCMP_FLTATR_ACT_BADARCH
_load_lock = threading.Lock()  # one libseccomp context may be loaded by several threads


def _action(name: str, errno: int | None) -> int:
    return pyseccomp.ERRNO(errno) if name == "SCMP_ACT_ERRNO" else ACTIONS[name]


def build(profile: Profile) -> pyseccomp.SyscallFilter:
    """The libseccomp filter of a profile (nothing installed yet)."""
    f = pyseccomp.SyscallFilter(_action(profile.default_action, profile.default_errno))
    f.set_attr(_ATTR_ACT_BADARCH, pyseccomp.KILL_PROCESS)
    for rule in profile.rules:
        args = [pyseccomp.Arg(a.index, OPS[a.op], a.value, a.value_two) for a in rule.args]
        for number in rule.numbers:
            f.add_rule_exactly(_action(rule.action, rule.errno), number, *args)
    return f


def install(f: pyseccomp.SyscallFilter) -> None:
    """Load the filter into the calling thread (it stacks on any it already has)."""
    if f.get_attr(pyseccomp.Attr.CTL_TSYNC):
        raise ValueError("refusing a TSYNC filter: filters are per thread")
    with _load_lock:
        f.load()


def export(f: pyseccomp.SyscallFilter, fmt: str) -> bytes:
    """The filter as raw BPF (`bpf`) or libseccomp's pseudo-filter code (`pfc`)."""
    with tempfile.TemporaryFile() as out:
        {"bpf": f.export_bpf, "pfc": f.export_pfc}[fmt](out)
        out.seek(0)
        return out.read()

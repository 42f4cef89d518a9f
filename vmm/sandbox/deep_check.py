"""`stratovirt seccomp check --deep`: which filters a thread should carry, and whether the
ones the kernel holds (live_filters) are, instruction for instruction, what
`stratovirt seccomp export ROLE --format bpf` makes of those roles' profiles.

A count in /proc says a filter is there, not which; only the programs themselves prove
that the VM runs under the audited profiles.

What is compared, and why that is exact: libseccomp's seccomp_load and export_bpf both
generate the program from the filter object with the same function (gen_bpf_generate),
and the kernel keeps the program exactly as loaded, so for the same profile and the same
libseccomp the bytes are equal (tests/unit/test_seccomp_deep.py installs every role and
reads it back). The filter attributes that are not in the program are flags of the
seccomp(2) call: of those the kernel keeps only SECCOMP_FILTER_FLAG_LOG (libseccomp's
CTL_LOG), which is compared too; TSYNC (never used: filters are per thread) and SPEC_ALLOW leave no
trace in a filter, and no_new_privs is the thread's (/proc's NoNewPrivs), not a filter's.
The expected side is built now from today's profiles with this libseccomp: a profile
edited, or libseccomp upgraded, since the VM started is reported as a difference, which
it is.
"""

import functools
from pathlib import Path

import pyseccomp

from . import BACKENDS
from . import seccomp as _seccomp
from .live_filters import SECCOMP_FILTER_FLAG_LOG, Filter, Gone, Instruction, parse_bpf, \
    read_filters
from .profile import load, roles

# Oldest first, as docs/seccomp.md installs them: the vm process's threads inherit its
# filter and stack their own; a backend forked at start-up carries its role's alone, one
# hot-plugged or restarted (forked once the launcher's filter was on) the launcher's
# under its own.
STACKS = {"launcher": ("launcher",), "vm": ("vm",), "vcpu": ("vm", "vcpu"),
          "api": ("vm", "api")}
# Task flags (include/linux/sched.h) of threads the kernel makes and runs, which never
# return to user code: KVM's nx-lpage worker is a user worker (vhost_task) since 6.4.
PF_IO_WORKER, PF_USER_WORKER, PF_KTHREAD = 0x10, 0x4000, 0x00200000


def judge(tid: int, role: str, kernel_worker: bool = False) -> tuple[bool, list[str]]:
    """Thread `tid`'s verdict: whether it differs, and what to say ("ok: ...", one
    "DIFFERS: ..." per difference, "gone: ...", or "not read: ..." for KVM's own thread).
    Stops the thread for the read (live_filters); LiveFilterError if it cannot."""
    gone = (False, ["gone: the thread ended while being read"])
    if kernel_worker:
        made = kernel_made(tid)
        if made is None:
            return gone
        if made:
            return False, ["not read: a KVM kernel thread runs no syscalls"]
        return True, ["DIFFERS: named like KVM's kernel thread, but a user thread of no "
                      "known role"]
    try:
        live = read_filters(tid)
    except Gone:
        return gone
    stack = expected_stack(role, len(live))
    if stack is None:
        return True, [f"DIFFERS: no known role, so no filter it should carry (it carries "
                      f"{len(live)})"]
    problems = differences(stack, live)
    if problems:
        return True, [f"DIFFERS: {problem}" for problem in problems]
    plural = "filter matches" if len(live) == 1 else "filters match"
    return False, [f"ok: its {len(live)} {plural} the exported BPF of {', '.join(stack)}"
                   f"{' (oldest first)' if len(stack) > 1 else ''}"]


def expected_stack(role: str, live_count: int) -> tuple[str, ...] | None:
    """The roles whose filters a thread of `role` should carry, oldest first (None for a
    thread of no known role). A backend's stack depends on how it was forked, which only
    its filter count tells: two or more means it should be the hot-plugged stack."""
    if role in STACKS:
        return STACKS[role]
    if role in BACKENDS:
        return ("launcher", role) if live_count >= 2 else (role,)
    return None


def kernel_made(tid: int) -> bool | None:
    """Whether the kernel made thread `tid` (None if it is gone). A name is not enough:
    any thread may call itself kvm-something, and must not escape the check so."""
    try:
        stat = Path(f"/proc/{tid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    flags = int(stat.rsplit(")", 1)[1].split()[6])      # field 9; comm may hold spaces
    return bool(flags & (PF_IO_WORKER | PF_USER_WORKER | PF_KTHREAD))


@functools.cache
def exported(role: str) -> Filter:
    """ROLE's filter as `export ROLE --format bpf` writes it, with the flags its load
    would pass."""
    built = _seccomp.build(load(role))
    flags = SECCOMP_FILTER_FLAG_LOG if built.get_attr(pyseccomp.Attr.CTL_LOG) else 0
    return Filter(parse_bpf(_seccomp.export(built, "bpf")), flags)


def identify(live: Filter) -> str | None:
    """The role whose exported filter this is exactly, if any."""
    return next((role for role in roles() if exported(role) == live), None)


def differences(stack: tuple[str, ...], live: list[Filter]) -> list[str]:
    """Nothing if the live filters (oldest first) are exactly the stack's exported ones;
    else one description per position that differs."""
    found = []
    total = max(len(stack), len(live))
    for position in range(total):
        where = f"filter {position + 1} of {len(live)}"
        if position >= len(live):
            found.append(f"filter {position + 1} of {len(stack)} should be {stack[position]}'s: "
                         f"missing (the thread carries {len(live)})")
            continue
        if position >= len(stack):
            found.append(f"{where}: not expected ({_what(live[position])})")
            continue
        want = exported(stack[position])
        if live[position] == want:
            continue
        if live[position].program == want.program:
            found.append(f"{where} should be {stack[position]}'s: its program matches but it "
                         f"was installed with flags {live[position].flags:#x}, expected "
                         f"{want.flags:#x} (SECCOMP_FILTER_FLAG_LOG is "
                         f"{SECCOMP_FILTER_FLAG_LOG:#x})")
            continue
        index, mine, theirs = first_difference(live[position].program, want.program)
        found.append(f"{where} should be {stack[position]}'s: first difference at instruction "
                     f"{index}: live {_show(mine)}, exported {_show(theirs)} "
                     f"({len(live[position].program)} vs {len(want.program)} instructions; "
                     f"{_what(live[position])})")
    return found


def first_difference(live: tuple[Instruction, ...], want: tuple[Instruction, ...]
                     ) -> tuple[int, Instruction | None, Instruction | None]:
    """The first index where the programs differ, with each side's instruction there
    (None past a program's end). The programs must differ."""
    for index in range(max(len(live), len(want))):
        mine = live[index] if index < len(live) else None
        theirs = want[index] if index < len(want) else None
        if mine != theirs:
            return index, mine, theirs
    raise ValueError("the programs are equal")


def _show(instruction: Instruction | None) -> str:
    return str(instruction) if instruction else "(end of program)"


def _what(live: Filter) -> str:
    role = identify(live)
    return f"the live filter is {role}'s" if role else "the live filter is no role's"

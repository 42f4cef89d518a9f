"""A thread's installed seccomp filters, read back from the kernel.

`stratovirt seccomp check --deep` must prove that what runs is what the profiles say, so
it cannot trust the /proc filter count alone: it asks the kernel for each filter's
classic-BPF program with ptrace(PTRACE_SECCOMP_GET_FILTER). The kernel hands that request
only to a tracer whose tracee is in a ptrace-stop, so the thread is stopped for the
length of the read: PTRACE_SEIZE, PTRACE_INTERRUPT, waitpid(__WALL), the reads, then
PTRACE_DETACH, always (a signal that arrived meanwhile is handed back at the detach).

The kernel keeps the program exactly as it was passed to seccomp(2) (its own rewrites
of loads are made on a copy), so the bytes read back are the bytes libseccomp loaded;
PTRACE_SECCOMP_GET_METADATA adds the one flag it keeps per filter (LOG). Needs
CAP_SYS_ADMIN, a caller with no seccomp filter of its own, and a kernel built with
CONFIG_CHECKPOINT_RESTORE.

ctypes on libc's ptrace: a handful of calls, no build step.
"""

import contextlib
import ctypes
import errno
import os
import struct
import time
from pathlib import Path
from typing import NamedTuple

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420c
PTRACE_SECCOMP_GET_METADATA = 0x420d
SECCOMP_FILTER_FLAG_LOG = 2    # the one seccomp(2) flag the kernel keeps per filter
PTRACE_EVENT_STOP = 128
WALL = 0x40000000              # __WALL: threads are "clone children" to waitpid
STOP_TIMEOUT = 10.0            # seconds a thread may take to reach its ptrace-stop

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class Instruction(NamedTuple):
    """One classic-BPF instruction (struct sock_filter)."""
    code: int
    jt: int
    jf: int
    k: int

    def __str__(self) -> str:
        return f"code=0x{self.code:04x} jt=0x{self.jt:02x} jf=0x{self.jf:02x} k=0x{self.k:08x}"


class Filter(NamedTuple):
    """One installed filter: its program, and its flags as the kernel reports them
    (SECCOMP_FILTER_FLAG_LOG or 0). Flags that leave no trace in the filter (TSYNC,
    SPEC_ALLOW) cannot be read back."""
    program: tuple[Instruction, ...]
    flags: int


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _Metadata(ctypes.Structure):       # struct seccomp_metadata
    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class Gone(Exception):
    """The thread ended (or was ending) while we looked: nothing left to check."""


class LiveFilterError(OSError):
    """The filters cannot be read (privileges, another tracer, the kernel); the message
    says which."""


def parse_bpf(data: bytes) -> tuple[Instruction, ...]:
    """A raw BPF program as libseccomp's export_bpf writes it (native-endian
    struct sock_filter array)."""
    if len(data) % 8:
        raise ValueError(f"a BPF program is a multiple of 8 bytes, not {len(data)}")
    return tuple(Instruction(*fields) for fields in struct.iter_unpack("=HBBI", data))


def read_filters(tid: int) -> list[Filter]:
    """Every filter of thread `tid`, oldest first ([] if it has none). Stops the thread
    for the read and resumes it whatever happens. Raises Gone if it ended."""
    with stopped(tid):
        filters = []
        while (program := _get_filter(tid, len(filters))) is not None:
            filters.append(Filter(program, _get_flags(tid, len(filters))))
    return filters


@contextlib.contextmanager
def stopped(tid: int):
    """Thread `tid` held in a ptrace-stop for the body, then detached (and so resumed).
    The one case where it cannot be detached is a thread that never stopped (the
    STOP_TIMEOUT error): the kernel detaches it, and it runs on, when this process ends,
    which the command does at once on that error."""
    _seize(tid)
    pass_on = 0
    try:
        if _ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0:
            _fail(ctypes.get_errno(), tid, "PTRACE_INTERRUPT")
        pass_on = _wait_stop(tid)
        yield
    finally:
        _detach(tid, pass_on)


def _seize(tid: int) -> None:
    if _ptrace(PTRACE_SEIZE, tid, 0, 0) >= 0:
        return
    code = ctypes.get_errno()
    if code == errno.ESRCH:
        raise Gone(tid)
    if code == errno.EPERM:
        for _ in range(20):            # an exiting thread cannot be attached: let it end
            state = _status(tid)
            if state is None or state.get("State", "")[:1] in ("Z", "X"):
                raise Gone(tid)
            if int(state.get("TracerPid", "0")):
                raise LiveFilterError(code, f"thread {tid} is already traced by process "
                                      f"{state['TracerPid']} (strace, gdb?): its filters "
                                      "cannot be read")
            time.sleep(0.005)
    _fail(code, tid, "PTRACE_SEIZE")


def _wait_stop(tid: int) -> int:
    """Wait for the stop PTRACE_INTERRUPT asked for; the signal to hand back at the detach
    if the stop was a signal's delivery instead (0 otherwise)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    pause = 0.0002
    while True:
        try:
            waited, status = os.waitpid(tid, WALL | os.WNOHANG)
        except ChildProcessError:
            raise Gone(tid) from None
        if waited == tid:
            break
        if time.monotonic() > deadline:
            raise LiveFilterError(errno.ETIMEDOUT, f"thread {tid} did not stop within "
                                  f"{STOP_TIMEOUT:g} s (uninterruptible sleep?)")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        raise Gone(tid)
    if not os.WIFSTOPPED(status):
        raise LiveFilterError(errno.EPROTO, f"thread {tid}: unexpected wait status {status:#x}")
    if status >> 16 == PTRACE_EVENT_STOP:
        return 0                    # our interrupt, or a group-stop the detach keeps
    return os.WSTOPSIG(status)      # a signal on its way in: hand it back


def _detach(tid: int, pass_on: int) -> None:
    """Detach, resuming the thread. ESRCH means it is gone or was never stopped; in the
    latter case (only after an error) the kernel detaches it when this process ends."""
    if _ptrace(PTRACE_DETACH, tid, 0, pass_on) < 0:
        code = ctypes.get_errno()
        if code != errno.ESRCH:
            raise LiveFilterError(code, f"thread {tid}: PTRACE_DETACH: {os.strerror(code)}")


def _get_filter(tid: int, index: int) -> tuple[Instruction, ...] | None:
    """Filter `index` of the stopped thread, None past the last. Index 0 is the OLDEST
    (the first installed), whatever ptrace(2) says ("the most recently installed filter
    has the index 0"): kernel/seccomp.c's get_nth_filter walks back count - index - 1
    filters from the newest. tests/unit/test_seccomp_deep.py pins the order."""
    count = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, None)
    if count < 0:
        code = ctypes.get_errno()
        if code == errno.ENOENT:                # past the newest filter
            return None
        if code == errno.EINVAL and index == 0:  # not in filter mode: no filters at all
            return None
        _fail(code, tid, "PTRACE_SECCOMP_GET_FILTER")
    buffer = (_SockFilter * count)()
    got = _ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buffer))
    if got < 0:
        _fail(ctypes.get_errno(), tid, "PTRACE_SECCOMP_GET_FILTER")
    if got != count:                # the thread is stopped: its filters cannot change
        raise LiveFilterError(errno.EPROTO, f"thread {tid}: filter {index} had {count} "
                              f"instructions, then {got}")
    return tuple(Instruction(i.code, i.jt, i.jf, i.k) for i in buffer)


def _get_flags(tid: int, index: int) -> int:
    """Filter `index`'s flags: libseccomp's CTL_LOG attribute changes these, not the
    program, so a program compared alone would miss it."""
    metadata = _Metadata(index, 0)
    if _ptrace(PTRACE_SECCOMP_GET_METADATA, tid, ctypes.sizeof(metadata),
               ctypes.addressof(metadata)) < 0:
        _fail(ctypes.get_errno(), tid, "PTRACE_SECCOMP_GET_METADATA")
    return metadata.flags


def _ptrace(request: int, tid: int, addr, data) -> int:
    ctypes.set_errno(0)
    return _libc.ptrace(request, tid, addr, data)


_WHY = {
    errno.EACCES: "needs CAP_SYS_ADMIN and no seccomp filter on the caller",
    errno.EPERM: "ptrace is not permitted (needs CAP_SYS_PTRACE; Yama's ptrace_scope?)",
    errno.EIO: "this kernel cannot read filters back (needs CONFIG_CHECKPOINT_RESTORE)",
    errno.EMEDIUMTYPE: "the filter is not classic BPF",
}


def _fail(code: int, tid: int, what: str):
    """Raise for a failed request. Once seized, a tracee is lost (ESRCH) only by dying:
    SIGKILL is the one thing that ends a ptrace-stop without us."""
    if code == errno.ESRCH:
        raise Gone(tid)
    why = _WHY.get(code, os.strerror(code))
    raise LiveFilterError(code, f"thread {tid}: {what}: {why}")


def _status(tid: int) -> dict[str, str] | None:
    """Thread tid's /proc status fields, None if it is gone."""
    try:
        text = Path(f"/proc/{tid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {key: value.strip() for key, value in
            (line.split(":", 1) for line in text.splitlines() if ":" in line)}

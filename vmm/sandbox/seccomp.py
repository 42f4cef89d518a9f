"""A role's profile as a seccomp filter: compiled by libseccomp (pyseccomp) into BPF, kept
in a cache, and installed into the calling thread with one seccomp(2) call; or built as
a libseccomp filter object and exported as BPF or as libseccomp's PFC text for auditors.

No TSYNC: a filter goes into the calling thread alone, which is what lets each vCPU
thread carry its own. Threads created afterwards by that thread inherit it. A 32-bit
(int 0x80) syscall kills the process outright (bad-arch action).

Why a cache: building the eight roles' filters with libseccomp took ~5 ms per process,
and importing pyseccomp ~10 ms more (it runs ldconfig twice to find its libraries), at
every VM's start. The program a role compiles to depends only on its profile, on the
code that turns a profile into libseccomp rules (this module and profile.py) and on
libseccomp's version; the cache is keyed by a SHA-256 of exactly these, so an edited
profile or an upgraded libseccomp compiles afresh. What is loaded is what
`stratovirt seccomp export ROLE --format bpf` prints (libseccomp's export and its
seccomp_load generate the program with the same function), loaded with the flags
libseccomp's load would pass for our filters (none), so `stratovirt seccomp check
--deep` still finds every live filter equal to the export, instruction for instruction.

Where: $STRATOVIRT_SECCOMP_CACHE if set (empty: no cache), else
/var/cache/stratovirt-py/seccomp for root, else $XDG_CACHE_HOME (or ~/.cache)
/stratovirt-py/seccomp. A cache is used only if the directory belongs to the caller's
uid and no one else may write to it, and a file only if it is a regular file of that uid
no one else may write whose program checks against the digest stored with it; anything
else, or no cache to be had (the jailer's VMM has neither a home nor a writable root),
means compiling in memory, as before. A failure to write the cache is not an error.
"""

import _sha256
import os
import stat

from .._sigsys import ffi, lib
from . import profile_dir

_ATTR_ACT_BADARCH = 2          # SCMP_FLTATR_ACT_BADARCH
CACHE_VARIABLE = "STRATOVIRT_SECCOMP_CACHE"
# The sources whose code decides what a profile compiles to.
_COMPILER_SOURCES = ("seccomp.py", "profile.py")
_DIGEST = 32
INSTRUCTION = 8                # bytes of a struct sock_filter


class FilterError(OSError):
    pass


# libseccomp filter objects (the auditor, the tests, and compiling for the cache).

def _pyseccomp():
    import pyseccomp
    return pyseccomp


def _action(name: str, errno: int | None) -> int:
    p = _pyseccomp()
    if name == "SCMP_ACT_ERRNO":
        return p.ERRNO(errno)
    return {"SCMP_ACT_KILL_PROCESS": p.KILL_PROCESS, "SCMP_ACT_KILL": p.KILL,
            "SCMP_ACT_KILL_THREAD": p.KILL_THREAD, "SCMP_ACT_TRAP": p.TRAP,
            "SCMP_ACT_LOG": p.LOG, "SCMP_ACT_ALLOW": p.ALLOW}[name]


def build(profile):
    """The libseccomp filter (pyseccomp.SyscallFilter) of a Profile; nothing installed."""
    p = _pyseccomp()
    ops = {"SCMP_CMP_NE": p.NE, "SCMP_CMP_LT": p.LT, "SCMP_CMP_LE": p.LE, "SCMP_CMP_EQ": p.EQ,
           "SCMP_CMP_GE": p.GE, "SCMP_CMP_GT": p.GT, "SCMP_CMP_MASKED_EQ": p.MASKED_EQ}
    f = p.SyscallFilter(_action(profile.default_action, profile.default_errno))
    f.set_attr(_ATTR_ACT_BADARCH, p.KILL_PROCESS)
    for rule in profile.rules:
        args = [p.Arg(a.index, ops[a.op], a.value, a.value_two) for a in rule.args]
        for number in rule.numbers:
            f.add_rule_exactly(_action(rule.action, rule.errno), number, *args)
    return f


def export(f, fmt: str) -> bytes:
    """The filter as raw BPF (`bpf`) or libseccomp's pseudo-filter code (`pfc`)."""
    import tempfile
    with tempfile.TemporaryFile() as out:
        {"bpf": f.export_bpf, "pfc": f.export_pfc}[fmt](out)
        out.seek(0)
        return out.read()


# Compiled programs: what the VMM's processes install.

def install_program(program: bytes) -> None:
    """Load a compiled filter (program()) into the calling thread: one seccomp() call.
    The thread needs no_new_privs (confine() sets it for the process first)."""
    result = lib.sigsys_load_filter(ffi.from_buffer(program), len(program))
    if result != 0:
        raise FilterError(-result, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(-result)}")


def program(role: str) -> bytes:
    """The role's filter as BPF: from the cache when it holds what today's profile,
    compiler and libseccomp make, else compiled now (and cached if there is a cache)."""
    source = (profile_dir.PROFILE_DIR / f"{role}.json").read_bytes()
    key = cache_key(role, source)
    directory = cache_directory()
    if directory is not None:
        cached = _read(directory, key)
        if cached is not None:
            return cached
    from .profile import parse
    import json
    compiled = export(build(parse(role, json.loads(source),
                                  str(profile_dir.PROFILE_DIR / f"{role}.json"))), "bpf")
    if directory is not None:
        _write(directory, key, compiled)
    return compiled


def cache_key(role: str, source: bytes) -> str:
    """What a role's program is cached under: its name and a SHA-256 of its profile,
    the compiler's sources and libseccomp's version."""
    digest = _compiler_digest().copy()
    digest.update(f"role {role}\n".encode())
    digest.update(source)
    return f"{role}-{digest.hexdigest()}"


_compiler = None


def _compiler_digest():
    global _compiler
    if _compiler is None:
        digest = _sha256.sha256(f"libseccomp {lib.sigsys_libseccomp_version()}\n".encode())
        here = os.path.dirname(os.path.abspath(__file__))
        for name in _COMPILER_SOURCES:
            with open(os.path.join(here, name), "rb") as f:
                digest.update(f.read())
        _compiler = digest
    return _compiler


def cache_directory() -> str | None:
    """The cache directory, made if need be; None when there is none to trust."""
    configured = os.environ.get(CACHE_VARIABLE)
    if configured is not None:
        directory = configured
    elif os.geteuid() == 0:
        directory = "/var/cache/stratovirt-py/seccomp"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or (
            os.path.join(os.environ["HOME"], ".cache") if os.environ.get("HOME") else "")
        directory = os.path.join(base, "stratovirt-py", "seccomp") if base else ""
    if not directory or not os.path.isabs(directory):
        return None
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        status = os.stat(directory, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISDIR(status.st_mode) or not _ours(status):
        return None
    return directory


def _ours(status: os.stat_result) -> bool:
    return status.st_uid == os.geteuid() and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read(directory: str, key: str) -> bytes | None:
    try:
        fd = os.open(os.path.join(directory, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or not _ours(status) or status.st_size > 1 << 20:
            return None
        data = os.read(fd, status.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    compiled, digest = data[:-_DIGEST], data[-_DIGEST:]
    if not compiled or len(compiled) % INSTRUCTION or _sha256.sha256(compiled).digest() != digest:
        return None
    return compiled


def _write(directory: str, key: str, compiled: bytes) -> None:
    temporary = os.path.join(directory, f".{key}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            os.write(fd, compiled + _sha256.sha256(compiled).digest())
        finally:
            os.close(fd)
        os.replace(temporary, os.path.join(directory, key))
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        return
    # What the role compiled to before (an older profile or libseccomp) goes.
    role = key[:-65]
    try:
        for name in os.listdir(directory):
            if name != key and name.startswith(f"{role}-") and len(name) == len(key):
                os.unlink(os.path.join(directory, name))
    except OSError:
        pass

"""Arms the SIGSYS reporter of native/sigsys.c: a trapped syscall is logged as
`seccomp violation: role=<role> syscall=<nr> (<name>)`, then the process dies by SIGSYS."""

import logging

from .._sigsys import ffi, lib

_armed = False


def arm(role: str, log_fd: int | None = None) -> None:
    """Install the process-wide handler; `role` names violations of threads without
    a role of their own. The line goes to `log_fd`, by default the log's own fd."""
    global _armed
    if lib.sigsys_arm(default_log_fd() if log_fd is None else log_fd, role.encode()) != 0:
        raise OSError(ffi.errno, "sigaction(SIGSYS) failed")
    _armed = True


def armed() -> bool:
    return _armed


def set_thread_role(role: str) -> None:
    lib.sigsys_set_thread_role(role.encode())


def violation_line(role: str, number: int) -> str:
    """The line the handler writes (for tests and documentation)."""
    buf = ffi.new("char[160]")
    return ffi.unpack(buf, lib.sigsys_format(buf, 160, role.encode(), number)).decode()


def default_log_fd() -> int:
    """The fd of the root logger's first stream handler (the -D file), else stderr."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        try:
            return stream.fileno()
        except (AttributeError, OSError, ValueError):
            continue
    return 2

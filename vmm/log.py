"""Logging for every process of the VMM: one format, which says when, which process
(role and pid), which thread, and the level between colons (`:INFO:`, `:WARN:`,
`:ERROR:`, `:DEBUG:`), the markers Kata's log reader looks for:

    2026-12-07T18:00:00.123 launcher[812] MainThread :INFO: vmm.launcher: ...

With -D PATH the log file gets everything from INFO up, appended by every process
(O_APPEND keeps their lines whole). With StratoVirt 2.x's -D alone (Kata's debug flag)
the same goes to stdout, which the backends inherit; with -serial stdio the guest's
console shares it. Without -D, warnings and errors go to stderr. As in StratoVirt, the
environment variable STRATOVIRT_LOG_LEVEL (trace, debug, info, warn, error) sets the
level instead; at debug (or trace) the log carries the start-up timeline (timeline.py).
"""

import logging
import os
import sys
from pathlib import Path

from . import timeline

_role = "launcher"
FORMAT = ("%(asctime)s.%(msecs)03d %(role)s[%(process)d] %(threadName)s "
          ":%(level)s: %(name)s: %(message)s")
MARKERS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN",
           logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}


LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "error": logging.ERROR}
LEVEL_VARIABLE = "STRATOVIRT_LOG_LEVEL"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        record.level = MARKERS.get(record.levelno, record.levelname)
        return True


def set_role(role: str) -> None:
    """Called by each process once it knows what it is (after fork)."""
    global _role
    _role = role


def level() -> int | None:
    """The level STRATOVIRT_LOG_LEVEL asks for; None when unset or not one of LEVELS."""
    return LEVELS.get(os.environ.get(LEVEL_VARIABLE, "").strip().lower())


def setup(log_file: Path | None, stdout: bool = False) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if log_file is not None:
        handler: logging.Handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        default = logging.INFO
    elif stdout:
        handler = logging.StreamHandler(sys.stdout)
        default = logging.INFO
    else:
        handler = logging.StreamHandler(sys.stderr)
        default = logging.WARNING
    root.setLevel(level() or default)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(_RoleFilter())
    root.addHandler(handler)
    timeline.started(root.isEnabledFor(logging.DEBUG))


def open_fds() -> list[int]:
    """The fds the log handlers write to: a forked child keeps them open."""
    fds = []
    for handler in logging.getLogger().handlers:
        try:
            fds.append(handler.stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass        # not a file (a StringIO under pytest)
    return fds

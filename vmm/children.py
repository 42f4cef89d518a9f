"""Forking the VMM's child processes from the launcher, and reaping them.

Children are forked, not exec'd: they start with every module the launcher imported
(a fresh interpreter would cost ~100 ms and its own copy of the imports) and with only
the file descriptors they are given -- everything else the launcher holds (the KVM fd,
guest RAM, other devices' disks and sockets) is closed first thing in the child, so a
device process holds its disk, its socket and nothing else. stdin becomes /dev/null
unless the child owns the terminal (the vm process, for the serial port).

Each child gets PR_SET_PDEATHSIG, so it dies with the launcher even if the launcher is
killed, and a pidfd, so the launcher can wait for any of them in one poll. A device
backend that cannot enter its empty root (vmm/sandbox/empty_root.py) ends with one log
line saying why, not a traceback.
"""

import gc
import logging
import os
import signal
from dataclasses import dataclass
from typing import Callable

import prctl

from . import log as vmm_log, timeline
from .log_limit import guest as guest_lines
from .sandbox.empty_root import EmptyRootError

log = logging.getLogger(__name__)


@dataclass
class Child:
    pid: int
    name: str
    pidfd: int
    what: str = ""                     # how messages name it: "disk rootfs"
    status: int | None = None          # os.waitstatus, once reaped

    def reap(self, block: bool = False) -> bool:
        """True once the child has been waited for."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid == 0:
                return False
            self.status = status
            os.close(self.pidfd)
        return True

    def by_seccomp(self) -> bool:
        """It ended by SIGSYS: a seccomp violation (the reporter re-raises it)."""
        return self.status is not None and os.WIFSIGNALED(self.status) and \
            os.WTERMSIG(self.status) == signal.SIGSYS

    def describe_end(self) -> str:
        if os.WIFSIGNALED(self.status):
            number = os.WTERMSIG(self.status)
            if number == signal.SIGSYS:     # the SIGSYS reporter re-raises it after logging
                return "was killed by a seccomp violation (SIGSYS; the log names the syscall)"
            return f"was killed by signal {number} ({signal.Signals(number).name})"
        return f"exited with status {os.waitstatus_to_exitcode(self.status)}"

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.reap(block=True)


def spawn(name: str, role: str, keep_fds: list[int], body: Callable[[], int],
          stdin: bool = False) -> Child:
    """Fork; the child keeps `keep_fds` (and stdout, stderr, the log), runs body() and
    exits with its status. `name` is the process name (15 bytes at most)."""
    launcher = os.getpid()
    # Everything the launcher holds now goes to the permanent generation: no collection
    # in either process ever visits it, so no page of it is copied for the GC's sake.
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        status = 1
        gc.enable()
        try:
            _only(keep_fds, stdin)
            # Not the launcher's handlers (a backend forked for hot-plug would forward a
            # signal to the vm process): the terminal's Ctrl-C and hangup are for the
            # launcher, which ends the VM; a child ends with its sockets, or by SIGTERM.
            for number in (signal.SIGINT, signal.SIGHUP):
                signal.signal(number, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())   # the launcher defers some
            vmm_log.set_role(role)
            prctl.set_name(name)
            prctl.set_pdeathsig(signal.SIGKILL)
            if os.getppid() != launcher:    # it died before PDEATHSIG was set
                os._exit(1)
            timeline.mark(f"{name} running")
            status = body()
        except EmptyRootError as error:
            log.error("%s", error)
        except BaseException:
            log.exception("%s failed", role)
        finally:
            guest_lines.flush()     # what a guest's mistakes left unsaid (log_limit.py)
            logging.shutdown()
            os._exit(status)
    timeline.mark(f"{name} forked")
    return Child(pid, name, os.pidfd_open(pid))


def close_all_but(keep) -> None:
    """Close every fd of this process but those in `keep` (a forked child's start)."""
    low = 0
    for fd in sorted(set(keep)):
        if fd > low:        # never an empty range: closerange(0, 0) closes every fd
            os.closerange(low, fd)
        low = max(low, fd + 1)
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _only(keep_fds: list[int], stdin: bool) -> None:
    close_all_but({*keep_fds, 0, 1, 2, *vmm_log.open_fds()})
    if not stdin:
        null = os.open(os.devnull, os.O_RDONLY | os.O_NOFOLLOW)   # the launcher's filter wants it
        os.dup2(null, 0)
        os.close(null)

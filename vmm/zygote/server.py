"""`stratovirt-zygote`: import every module a VM's processes run, then fork one launcher
per `stratovirt` that asks (vmm/zygote/__init__.py says why and whom it serves).

    stratovirt-zygote [--socket PATH]

One thread, one poll loop: the listening socket, each caller's connection (readable =
a request, or the caller gone: its VM is sent SIGTERM) and each child's pidfd (its exit
status goes to its caller). SIGTERM or SIGINT: stop listening, remove the socket, and
exit once every VM forked so far has ended.
"""

import argparse
import fcntl
import gc
import importlib
import logging
import os
import select
import signal
import socket
import struct
import sys
import traceback

from .. import children
from . import DEFAULT_SOCKET, adopt, wire

log = logging.getLogger("stratovirt.zygote")
# What a launcher, its vm process and its backends run: the launcher's and the vm
# process's imports, including those they make only for some VMs (each device kind's
# attach module, the vhost-vsock device, the metrics file), and nothing else: not the
# auditor or usage recorder (`stratovirt seccomp`, never a VM), not the backend
# programs' command lines (click), not libseccomp's binding (filters come from the
# cache). A module not here still works in a child, imported there (and not shared).
PRELOAD = ("vmm.cli", "vmm.config", "vmm.launcher", "vmm.vm_process", "vmm.broker",
           "vmm.restart", "vmm.metrics", "vmm.hotplug", "vmm.boot.loader", "vmm.boot.kernel",
           "vmm.machine.memory", "vmm.machine.vcpu", "vmm.machine.vm", "vmm.qmp.server",
           "vmm.devices.virtio.mmio", "vmm.devices.virtio.attach",
           "vmm.devices.virtio.block.attach", "vmm.devices.virtio.net.attach",
           "vmm.devices.virtio.console.attach", "vmm.devices.virtio.vsock.attach",
           "vmm.devices.virtio.vsock.vhost", "vmm.devices.virtio.rng.attach")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stratovirt-zygote",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    path = parser.parse_args(argv).socket
    handler = logging.StreamHandler()       # its own, not the root logger's: the
    handler.setFormatter(logging.Formatter("stratovirt-zygote: %(message)s"))  # VMs' is theirs
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if os.geteuid() != 0:
        log.error("must run as root, as the launchers it forks do")
        return 2
    files = preload()
    try:
        listener = _listen(path)
    except OSError as error:
        log.error("%s: %s", path, error.strerror)
        return 1
    zygote = Zygote(listener, path, files)
    try:
        zygote.serve()
    finally:
        zygote.stop()
    return 0


def preload() -> list[str]:
    """PRELOAD imported and frozen, so the children share them; returns the files to
    watch for staleness (every module of ours that came with them)."""
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()         # what the children share is never visited by a collection
    return sorted({m.__file__ for m in list(sys.modules.values())
                   if getattr(m, "__file__", None) and m.__name__.split(".")[0] == "vmm"})


def _listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fingerprint(files: list[str]) -> list[tuple[int, int] | None]:
    marks = []
    for path in files:
        try:
            st = os.stat(path)
            marks.append((st.st_mtime_ns, st.st_size))
        except OSError:
            marks.append(None)
    return marks


class Zygote:
    def __init__(self, listener: socket.socket, path: str, files: list[str]):
        self.listener, self.path = listener, path
        self.files, self.marks = files, _fingerprint(files)
        self.poll = select.poll()
        self.poll.register(listener, select.POLLIN)
        self.wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)    # a signal ends poll()
        signal.set_wakeup_fd(self.wakeup[1])
        self.poll.register(self.wakeup[0], select.POLLIN)
        self.callers: dict[int, socket.socket] = {}    # connection fd -> connection
        self.vms: dict[int, tuple[int, socket.socket]] = {}   # pidfd -> (pid, its caller)
        self.stopping = False
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self.stop)

    def stop(self, *_) -> None:
        """Stop listening (SIGTERM, SIGINT, stale code); serve() returns once the VMs
        forked so far have ended."""
        if not self.stopping:
            self.stopping = True
            self.poll.unregister(self.listener)
            self.listener.close()
            _unlink(self.path)
            log.info("stopping: %d VM(s) still running", len(self.vms))

    def serve(self) -> None:
        log.info("ready on %s (%d modules preloaded)", self.path, len(self.files))
        while not (self.stopping and not self.vms and not self.callers):
            for fd, _ in self.poll.poll():
                if fd == self.wakeup[0]:
                    os.read(fd, 64)
                elif not self.stopping and fd == self.listener.fileno():
                    self._accept()
                elif fd in self.vms:
                    self._ended(fd)
                elif fd in self.callers:
                    self._request(self.callers[fd])
                elif fd in (caller.fileno() for _, caller in self.vms.values()):
                    self._caller_gone(fd)

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        uid = _peer(connection)[1]
        if uid != os.geteuid():
            log.warning("dropped a caller with uid %d", uid)
            connection.close()
            return
        self.callers[connection.fileno()] = connection
        self.poll.register(connection, select.POLLIN)

    def _request(self, connection: socket.socket) -> None:
        del self.callers[connection.fileno()]
        self.poll.unregister(connection)
        try:
            received = wire.receive(connection)
        except (OSError, wire.WireError) as error:
            log.warning("a bad request: %s", error)
            received = None
        if received is None:
            connection.close()
            return
        message, fds = received
        caller = self._refusal(message, fds) or adopt.examine(_peer(connection)[0])
        if isinstance(caller, str):         # why not
            log.info("refused: %s", caller)
            for fd in fds:
                os.close(fd)
            try:
                wire.send(connection, {"refused": caller})
            except OSError:
                pass
            connection.close()
            return
        pid = os.fork()
        if pid == 0:
            self._child(connection, caller, message, fds)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.vms[pidfd] = (pid, connection)
        self.poll.register(pidfd, select.POLLIN)
        self.poll.register(connection, select.POLLIN | select.POLLHUP)

    def _refusal(self, message: dict, fds: list[int]) -> str | None:
        """Why no request is served now, or this one is not a request."""
        if self.stopping:
            return "the zygote is stopping"
        if _fingerprint(self.files) != self.marks:
            self.stop()
            return "the installed code changed since the zygote started; restart it"
        if not _well_formed(message, fds):
            return "a malformed request"
        return None

    def _child(self, connection: socket.socket, caller: adopt.Caller, message: dict,
               fds: list[int]) -> None:
        """Become the caller's launcher; never returns."""
        status, zygote_log = 1, 2
        log.handlers.clear()
        try:
            # The zygote's sockets let go of their numbers (arranged below), unclosed.
            for held in (self.listener, *self.callers.values(),
                         *(caller for _, caller in self.vms.values())):
                if held is not connection:
                    held.detach()
            cwd, *theirs = fds
            connection, cwd, zygote_log = _arrange(connection.detach(), cwd, theirs,
                                                   message["fds"])
            adopt.become(caller, message, cwd)
            os.close(cwd)
            os.close(zygote_log)
            wire.send(connection, {"ready": os.getpid()})
            connection.close()
        except BaseException as error:          # refused after all: the caller runs it
            why = f"refused after the fork: {type(error).__name__}: {error}"
            try:
                os.write(zygote_log, f"stratovirt-zygote: {why}\n".encode())
                wire.send(connection, {"refused": why})
            finally:
                os._exit(1)
        try:
            gc.disable()        # as `stratovirt` runs: none until the launcher supervises
            from .. import cli
            status = cli.main(sys.argv[1:])
        except SystemExit as exit:      # as the interpreter would end with it
            status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream and stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(status)

    def _ended(self, pidfd: int) -> None:
        pid, connection = self.vms.pop(pidfd)
        self.poll.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:
            self.poll.unregister(connection)
        except KeyError:        # its caller went away first
            pass
        try:
            wire.send(connection, os.waitstatus_to_exitcode(status))     # the stand-in's
        except OSError:
            pass
        connection.close()

    def _caller_gone(self, fd: int) -> None:
        for pidfd, (pid, connection) in self.vms.items():
            if connection.fileno() == fd:
                log.info("the caller of VM launcher %d went away: ending that VM", pid)
                self.poll.unregister(connection)
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                return


def _well_formed(message, fds: list[int]) -> bool:
    """The request's fields (vmm/zygote/wire.py), each of its type, checked before any
    is used; the fds that came are the caller's cwd and one per number in "fds"."""
    if not isinstance(message, dict) or set(message) != {"argv", "env", "fds", "name", "started"}:
        return False
    argv, env, numbers = message["argv"], message["env"], message["fds"]
    return (isinstance(argv, list) and all(isinstance(word, str) for word in argv)
            and isinstance(env, dict)
            and all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in env.items())
            and isinstance(numbers, list)
            and all(isinstance(fd, int) and 0 <= fd < 1 << 20 for fd in numbers)
            and len(fds) == len(numbers) + 1
            and isinstance(message["name"], str) and isinstance(message["started"], float))


def _peer(connection: socket.socket) -> tuple[int, int, int]:
    """pid, uid, gid of the caller when it connected (SO_PEERCRED)."""
    return struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))


def _arrange(connection: int, cwd: int, received: list[int], targets: list[int]):
    """Close every fd of the zygote's, put each received fd at the number it had in the
    caller; returns the connection, the cwd fd and the zygote's stderr (to say why, if
    the child cannot become the launcher after all), moved above them all."""
    above = max([*targets, 2]) + 1
    moved = [_move(fd, above) for fd in [connection, cwd, 2, *received]]
    children.close_all_but(moved)
    for fd, target in zip(moved[3:], targets):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    return socket.socket(fileno=moved[0]), moved[1], moved[2]


def _move(fd: int, above: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above)

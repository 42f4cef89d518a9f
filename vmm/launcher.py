"""The launcher: the privileged supervisor that prepares host resources, forks the vm
process, and cleans up on every exit path.

It opens /dev/kvm, creates guest RAM as a sealed memfd and loads the boot image into it,
binds the api-channel socket, writes the pidfile, puts the terminal in raw mode; then
forks the vm process and waits for it, turning SIGTERM/SIGINT/SIGHUP into an orderly
shutdown of the VM. Whatever happens, the sockets and pidfile it created are removed
and the terminal restored before it exits with the VM's status.
"""

import logging
import os
import signal
import socket
import sys
import termios
import tty
from pathlib import Path

from . import control, daemon, vm_process
from .boot import loader
from .boot.kernel import BadKernel
from .config.errors import one_line
from .config.model import MachineConfig
from .log import setup as setup_logging
from .machine.kvm import KVM_PATH, open_kvm
from .machine.memory import GuestMemory, create_memfd

log = logging.getLogger(__name__)
EXIT_FAILURE = 1


class LaunchError(Exception):
    """The host cannot run this VM; the message is the one line the user sees."""


class _Cleanup:
    """Everything the launcher created, undone in reverse order."""

    def __init__(self):
        self.paths: list[Path] = []
        self.terminal: tuple[int, list] | None = None

    def run(self) -> None:
        if self.terminal:
            fd, attributes = self.terminal
            termios.tcsetattr(fd, termios.TCSADRAIN, attributes)
        for path in reversed(self.paths):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def run(config: MachineConfig, notes: tuple[str, ...]) -> int:
    readiness = daemon.detach() if config.daemonize else None
    setup_logging(config.log_file)
    for note in notes:
        log.info("config: %s", note)
    cleanup = _Cleanup()
    try:
        return _launch(config, cleanup, readiness)
    except LaunchError as error:
        line = f"stratovirt: error: {one_line(str(error))}"
        if config.log_file:
            log.error("%s", line)
        if readiness:
            readiness.failed(line)
        else:
            print(line, file=sys.stderr)
        return EXIT_FAILURE
    finally:
        cleanup.run()


def _launch(config: MachineConfig, cleanup: _Cleanup, readiness) -> int:
    unattached = [f"{kind} {device.id}" for kind, devices in (
        ("disk", config.drives), ("NIC", config.nics),
        ("console", [config.console] if config.console else []),
        ("vsock", [config.vsock] if config.vsock else [])) for device in devices]
    if unattached:
        log.warning("not attached, virtio devices are not built yet: %s", ", ".join(unattached))
    try:
        kvm_fd = open_kvm()
    except OSError as error:
        raise LaunchError(f"{KVM_PATH}: {error.strerror}; load the kvm module and run "
                          "as a user who may open it") from None
    memory = GuestMemory(create_memfd(config.machine.mem_size), config.machine.mem_size,
                         dont_dump=config.machine.omit_vm_memory)
    try:
        entry = loader.load(config, memory, config.boot.boot_args)
    except (OSError, BadKernel) as error:
        raise LaunchError(f"loading the kernel: {error}") from None

    listener = _bind(config.api_channel, cleanup)
    if config.pidfile:
        try:
            daemon.write_pidfile(config.pidfile)
        except OSError as error:
            raise LaunchError(f"-pidfile: {config.pidfile}: {error.strerror}") from None
        cleanup.paths.append(config.pidfile)
    if config.serial_stdio and os.isatty(0):
        cleanup.terminal = (0, termios.tcgetattr(0))
        _raw_terminal(0)

    ours, theirs = control.channel_pair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        if readiness:
            readiness.close_in_child()
        status = EXIT_FAILURE
        try:
            status = vm_process.main(config, kvm_fd, memory, entry, listener, theirs)
        except BaseException:
            log.exception("the vm process failed")
        finally:
            logging.shutdown()
            os._exit(status)
    theirs.close()
    listener.close()
    os.close(kvm_fd)
    log.info("vm process %d started", pid)
    return _supervise(pid, ours, readiness)


def _bind(path: Path, cleanup: _Cleanup) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
    except OSError as error:
        listener.close()
        raise LaunchError(f"-api-channel: {path}: {error.strerror}") from None
    cleanup.paths.append(path)
    os.chmod(path, 0o600)
    listener.listen(4)
    return listener


def _raw_terminal(fd: int) -> None:
    """Raw, but Ctrl-C still signals: it ends the VM in an orderly way, as QEMU's
    -serial stdio does."""
    tty.setraw(fd, termios.TCSADRAIN)
    attributes = termios.tcgetattr(fd)
    attributes[3] |= termios.ISIG
    termios.tcsetattr(fd, termios.TCSADRAIN, attributes)


def _supervise(pid: int, channel: socket.socket, readiness) -> int:
    def forward(number, frame):
        log.info("signal %d: shutting the VM down", number)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, forward)

    error, ended = None, False
    while (message := control.receive(channel)) is not None:
        event = message[0].get("event")
        if event == "running" and readiness:
            readiness.ready()
        elif event == "error":
            error = message[0].get("message", "unknown error")
        elif event == "shutdown":
            ended = True
            log.info("VM ended: %s", message[0].get("reason"))
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    if os.WIFSIGNALED(wait_status):
        error = error or f"the vm process was killed by signal {os.WTERMSIG(wait_status)}"
    elif status and not ended:
        error = error or f"the vm process failed with status {status} (see the log)"
    if error:
        raise LaunchError(error)
    return status

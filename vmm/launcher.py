"""The launcher: the privileged supervisor that prepares host resources, forks the vm
process, and cleans up on every exit path.

It opens /dev/kvm, creates guest RAM as a sealed memfd and loads the boot image into it,
binds the api-channel socket, writes the pidfile, puts the terminal in raw mode; then
forks the vm process and waits for it, turning SIGTERM/SIGINT/SIGHUP into an orderly
shutdown of the VM, and brokers what the vm process may ask for while the VM runs
(vmm/broker.py: images and taps for hot-plug, and their backend processes). A backend
that dies is forked again as the restart policy says (vmm/restart.py), and the vm
process gets its new socket with a "restarted" event.
Whatever happens, the sockets and pidfile it created are removed
and the terminal restored before it exits with the VM's status.

Start-up order (docs/performance.md): the vm process is forked first, right after
/dev/kvm is opened and the filters are ready, and imports what only it needs (the
machine, QMP, hot-plug) while the launcher imports what only it needs (the boot loader,
the devices' backends, the broker), creates guest RAM, loads the kernel and forks the
backends; then one "start" message gives the vm process guest RAM, the api-channel's
socket, the boot entry and each device's slot and connection. So the two halves of the
imports run on two CPUs at once, and neither process holds the other's modules.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import select
import signal
import socket
import sys
import termios
import time
import tty
from pathlib import Path
from typing import TYPE_CHECKING

from . import children, control, daemon, layout, sandbox, timeline, vm_process
from .config.errors import one_line
from .config.model import MachineConfig
from .log import setup as setup_logging
from .machine.kvm import KVM_PATH, open_kvm

if TYPE_CHECKING:       # imported where they are first used (the start-up order above)
    from .broker import Broker
    from .devices.virtio.attach import Attached, Slot
    from .machine.memory import GuestMemory
    from .restart import RestartPolicy

log = logging.getLogger(__name__)
EXIT_FAILURE = 1
_DEFERRED = {signal.SIGTERM, signal.SIGHUP}
BACKEND_GRACE = 5.0


class LaunchError(Exception):
    """The host cannot run this VM; the message is the one line the user sees."""


class _Cleanup:
    """Everything the launcher created, undone in reverse order."""

    def __init__(self):
        self.paths: list[Path] = []
        self.terminal: tuple[int, list] | None = None
        self.children: list[children.Child] = []

    def run(self) -> None:
        for child in self.children:
            child.kill()
        if self.terminal:
            fd, attributes = self.terminal
            termios.tcsetattr(fd, termios.TCSADRAIN, attributes)
        for path in reversed(self.paths):
            try:
                path.unlink()
            except FileNotFoundError:
                pass


def run(config: MachineConfig, notes: tuple[str, ...]) -> int:
    inherited = _inherited_fds()
    readiness = daemon.detach() if config.daemonize else None
    # A SIGTERM or SIGHUP before _supervise() handles them must not kill the launcher
    # halfway, leaving its sockets behind: they wait, blocked, until then (children
    # unblock them, vmm/children.py).
    signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    setup_logging(config.log_file, config.log_stdout)
    for note in notes:
        log.info("config: %s", note)
    cleanup = _Cleanup()
    try:
        return _launch(config, cleanup, readiness, inherited)
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


def _inherited_fds() -> set[int]:
    """The fds the launcher was started with beyond stdio (netdev_add may name a tap
    among them by number: vmm/broker.py)."""
    listed = {int(name) for name in os.listdir("/proc/self/fd")} - {0, 1, 2}
    alive = set()
    for fd in listed:                  # one of them was listdir's own, closed by now
        try:
            os.fstat(fd)
            alive.add(fd)
        except OSError:
            pass
    return alive


def _launch(config: MachineConfig, cleanup: _Cleanup, readiness, inherited: set[int]) -> int:
    try:
        kvm_fd = open_kvm()
    except OSError as error:
        raise LaunchError(f"{KVM_PATH}: {error.strerror}; load the kvm module and run "
                          "as a user who may open it") from None
    if config.seccomp:
        sandbox.prepare()       # once, before any fork: every child finds its filter ready
    ours, theirs = control.channel_pair()
    vm = children.spawn("vmm-vm", "vm", [kvm_fd, theirs.fileno()], functools.partial(
        vm_process.main, config, kvm_fd, theirs), stdin=True)
    cleanup.children.append(vm)
    theirs.close()
    os.close(kvm_fd)

    # Only now what the launcher alone needs (the vm process imports its own meanwhile).
    from .boot import loader
    from .boot.kernel import BadKernel
    from .machine.memory import GuestMemory, create_memfd
    memory = GuestMemory(create_memfd(config.machine.mem_size), config.machine.mem_size,
                         dont_dump=config.machine.omit_vm_memory)
    try:
        entry = loader.load(config, memory)
    except (OSError, BadKernel) as error:
        raise LaunchError(f"loading the kernel: {error}") from None
    timeline.mark("memfd and kernel loaded")

    listener = _bind(config.api_channel, cleanup)
    if config.pidfile:
        try:
            daemon.write_pidfile(config.pidfile)
        except OSError as error:
            raise LaunchError(f"-pidfile: {config.pidfile}: {error.strerror}") from None
        cleanup.paths.append(config.pidfile)
    attached, kernel = _attach_devices(config, memory, cleanup)
    # What the caller passed is its device's alone now: a tap its backend's, a
    # vhost-vsock the vm process's.
    for fd in [nic.fd for nic in config.nics] + [config.vsock and config.vsock.fd]:
        if fd is not None:
            os.close(fd)
            inherited.discard(fd)
    if config.serial_stdio and os.isatty(0):
        cleanup.terminal = (0, termios.tcgetattr(0))
        _raw_terminal(0)

    try:
        control.send(ours, vm_process.start_message(
                         entry, [a.slot for a in attached] + [slot for slot, _ in kernel]),
                     (memory.fd, listener.fileno(), *(a.connection.fileno() for a in attached),
                      *(fd for _, fd in kernel)))
    except OSError as error:        # it died before: _supervise reaps it and says how
        log.warning("vm process: its start was not delivered: %s", error)
    listener.close()
    for a in attached:
        a.connection.close()
    for _, fd in kernel:
        os.close(fd)
    log.info("vm process %d started", vm.pid)
    # What only hot-plug and restarts use, imported while the guest starts, and before
    # the launcher's filter closes the files its modules are in.
    from .broker import Broker
    from .restart import RestartPolicy
    broker = Broker(config, memory, attached, inherited)
    policy = RestartPolicy(config.backend_restart)
    faults: dict[str, int] = {}         # seccomp role -> its processes a violation ended
    metrics_file = None
    if config.metrics_file:
        from .metrics import MetricsFile
        metrics_file = MetricsFile(config.metrics_file, broker, policy, faults)
        cleanup.paths += [config.metrics_file, metrics_file.scratch]
    return _supervise(vm, ours, readiness, broker, cleanup, config.seccomp, policy,
                      metrics_file, faults)


def _attach_devices(config: MachineConfig, memory: GuestMemory,
                    cleanup: _Cleanup) -> tuple[list[Attached], list[tuple[Slot, int]]]:
    """One backend process per device, in slot order (disks fill slots 0..5, NICs 6
    and 7, then the console, vsock and rng); and the devices the host kernel serves (the
    vhost-vsock), each slot with the fd the vm process drives it through."""
    from .devices.virtio.attach import AttachError
    attached = []           # each kind's module imported only when the VM has one
    kernel = []
    try:
        for index, drive in enumerate(config.drives):
            from .devices.virtio.block import attach as block_attach
            attached.append(block_attach.attach(drive, index, memory, config.seccomp))
            cleanup.children.append(attached[-1].backend)
        for index, nic in enumerate(config.nics, layout.BLK_SLOTS):
            from .devices.virtio.net import attach as net_attach
            if nic.fd is not None:
                # Read until EAGAIN by its backend: one passed blocking would stall it.
                os.set_blocking(nic.fd, False)
            attached.append(net_attach.attach(nic, index, config.machine.name, memory,
                                              config.seccomp, tap=nic.fd))
            cleanup.children.append(attached[-1].backend)
        # Then the console (slot 8), vsock and rng (the next slots), each when configured
        # (discovery.slot_count). Their sockets are removed on every exit path.
        index = layout.BLK_SLOTS + layout.NET_SLOTS
        if config.console:
            from .devices.virtio.console import attach as console_attach
            attached.append(console_attach.attach(config.console, index, memory,
                                                  cleanup.paths, config.seccomp))
            cleanup.children.append(attached[-1].backend)
            index += 1
        if config.vsock and config.vsock.vhost:
            from .devices.virtio.vsock import vhost
            kernel.append(vhost.open_device(config.vsock, index))
            index += 1
        elif config.vsock:
            from .devices.virtio.vsock import attach as vsock_attach
            attached.append(vsock_attach.attach(config.vsock, index, memory, cleanup.paths,
                                                config.seccomp))
            cleanup.children.append(attached[-1].backend)
            index += 1
        if config.rng:
            from .devices.virtio.rng import attach as rng_attach
            attached.append(rng_attach.attach(config.rng, index, memory, config.seccomp))
            cleanup.children.append(attached[-1].backend)
    except AttachError as error:
        for a in attached:
            a.connection.close()
        raise LaunchError(str(error)) from None
    return attached, kernel


def _bind(path: Path, cleanup: _Cleanup) -> socket.socket:
    # Non-blocking: the QMP thread accepts from its poll loop, never waiting in accept().
    listener = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        listener.bind(str(path))
    except OSError as error:
        listener.close()
        raise LaunchError(f"-api-channel: {path}: {error.strerror}") from None
    cleanup.paths.append(path)
    os.chmod(path, 0o600)
    listener.listen(128)      # a burst of clients waits here, not in connect()'s EAGAIN
    return listener


def _raw_terminal(fd: int) -> None:
    """Raw, but Ctrl-C still signals: it ends the VM in an orderly way, as QEMU's
    -serial stdio does."""
    tty.setraw(fd, termios.TCSADRAIN)
    attributes = termios.tcgetattr(fd)
    attributes[3] |= termios.ISIG
    termios.tcsetattr(fd, termios.TCSADRAIN, attributes)


def _supervise(vm: children.Child, channel: socket.socket, readiness, broker: Broker,
               cleanup: _Cleanup, seccomp: bool, policy: RestartPolicy, metrics_file,
               faults: dict[str, int]) -> int:
    from .devices.virtio.attach import AttachError
    # From here the launcher waits, signals, cleans up, and brokers (vmm/broker.py):
    # its filter allows no more than that and what the backends it forks need before
    # they install their own.
    sandbox.confine("launcher", seccomp=seccomp)
    gc.freeze()             # the start-up's objects stay shared with the children
    gc.enable()

    def forward(number, frame):
        log.info("signal %d: shutting the VM down", number)
        try:
            os.kill(vm.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)     # one that came runs now

    poller = select.poll()
    poller.register(channel, select.POLLIN)
    watched: dict[int, children.Child] = {}
    grace: dict[int, float] = {}            # pid -> when a released backend is killed
    restarts: dict[int, tuple[float, str]] = {}     # slot -> when to restart it, and why

    def watch_new() -> None:
        for child in broker.processes():
            if child.status is None and child.pidfd not in watched:
                watched[child.pidfd] = child
                poller.register(child.pidfd, select.POLLIN)
                if child not in cleanup.children:
                    cleanup.children.append(child)

    def reaped(child: children.Child, killed: bool = False) -> None:
        if child.by_seccomp():
            role = sandbox.backend_role(child.name) or child.name
            faults[role] = faults.get(role, 0) + 1
        expected = broker.ended(child)
        grace.pop(child.pid, None)
        backend = None if expected or ended else broker.slot_of(child)
        if backend is not None and not backend.up:
            log.error("%s: its backend process %s before its device was set up",
                      child.what, child.describe_end())     # device_add fails and says so
        elif backend is not None:
            why = child.describe_end()
            delay = policy.died(backend.slot, time.monotonic())
            if delay is not None:
                log.warning("%s: its backend process %s; restarting it%s", child.what, why,
                            f" in {delay:.1f} s" if delay else "")
                restarts[backend.slot] = (time.monotonic() + delay, why)
                return
            # A device is not worth the VM: the guest sees a device that stops answering.
            log.error("%s: its backend process %s%s; the device no longer works, the "
                      "VM goes on", child.what, why, policy.describe())
            tell({"event": "backend-failed", "slot": backend.slot, "device": backend.device,
                  "reason": why, "seccomp_faults": faults})
        elif not expected and not ended:
            log.error("%s: its backend process %s; the device no longer works, the VM "
                      "goes on", child.what, child.describe_end())
        elif killed:
            log.warning("%s: its backend did not stop after its device was unplugged; "
                        "killed", child.what)

    def tell(event: dict, fds: tuple[int, ...] = ()) -> None:
        try:
            control.send(channel, event, fds)
        except OSError as failed:         # the vm process is ending; its end is news enough
            log.warning("vm process: %s not delivered: %s", event["event"], failed)

    def restart(slot: int, why: str) -> None:
        try:
            attached = broker.respawn(slot, policy.restarts(slot))
        except (AttachError, OSError) as failed:
            log.error("slot %d: its backend could not be restarted: %s; the device no "
                      "longer works, the VM goes on", slot, failed)
            return
        if attached is None:
            return                              # unplugged meanwhile
        watch_new()
        fd = attached.connection.detach()
        try:
            tell({"event": "restarted", "slot": slot, "device": attached.slot.id,
                  "count": policy.restarts(slot), "reason": why, "seccomp_faults": faults},
                 (fd,))
        finally:
            os.close(fd)
        log.info("%s: backend %d started (restart %d)", attached.slot.name,
                 attached.backend.pid, policy.restarts(slot))

    watch_new()
    error, ended = None, False
    # A backend that dies before the vm process runs is restarted only once it runs: a
    # "restarted" event the vm process never reads (it fails its start) would reset the
    # channel before its error is read, losing the one line that says why.
    running = False
    while True:
        deadlines = [*grace.values(), *(when for when, _ in restarts.values() if running)]
        if metrics_file and running:
            deadlines.append(metrics_file.due)
        timeout = None
        if deadlines:
            timeout = max(0.0, min(deadlines) - time.monotonic()) * 1000
        ready = {fd for fd, _ in poller.poll(timeout)}
        # The channel first: a VM that ended says so before its backends see their
        # sockets close and exit, and their ends are then no news.
        if channel.fileno() in ready:
            try:
                received = control.receive(channel)
            except control.ControlError as bad:
                # The vm process is the less trusted side: its garbage is refused, and
                # a vm process that only sends garbage gets nothing for it.
                log.error("vm process: %s; ignored", bad)
                continue
            if received is None:
                break
            message, fds = received
            if "op" in message:
                reply, reply_fds = broker.handle(message, fds)
                try:
                    control.send(channel, reply, tuple(reply_fds))
                finally:
                    for fd in reply_fds:
                        os.close(fd)
                if message["op"] == "unplug" and "ok" in reply:
                    policy.forget(message["slot"])     # the slot's next device starts afresh
                    restarts.pop(message["slot"], None)
                watch_new()
            else:
                for fd in fds:
                    os.close(fd)
                event = message.get("event")
                if event == "running":
                    running = True
                if event == "running" and readiness:
                    readiness.ready()
                elif event == "error":
                    error = message.get("message", "unknown error")
                elif event == "shutdown":
                    ended = True
                    log.info("VM ended: %s", message.get("reason"))
                elif event == "vcpu-exits" and metrics_file:
                    metrics_file.take_vcpu_exits(message.get("exits"))
        for pidfd in ready & watched.keys():
            child = watched.pop(pidfd)
            poller.unregister(pidfd)
            child.reap(block=True)
            reaped(child)
        for slot, (when, why) in list(restarts.items()):
            if ended:
                restarts.clear()
            elif running and time.monotonic() >= when:
                del restarts[slot]
                restart(slot, why)
        if metrics_file and running and time.monotonic() >= metrics_file.due:
            metrics_file.write()
        for child in broker.released():
            grace.setdefault(child.pid, time.monotonic() + BACKEND_GRACE)
            if child.status is None and time.monotonic() >= grace[child.pid]:
                watched.pop(child.pidfd)
                poller.unregister(child.pidfd)
                child.kill()
                reaped(child, killed=True)
    vm.reap(block=True)
    _reap_backends(broker.processes())
    broker.close()
    status = os.waitstatus_to_exitcode(vm.status)
    if os.WIFSIGNALED(vm.status):
        error = error or f"the vm process {vm.describe_end()}"
    elif status and not ended:
        error = error or f"the vm process failed with status {status} (see the log)"
    if error:
        raise LaunchError(error)
    return status


def _reap_backends(backends: list[children.Child]) -> None:
    """Backends end when the vm process's end closes their sockets; a stuck one is
    killed after BACKEND_GRACE seconds."""
    deadline = time.monotonic() + BACKEND_GRACE
    for backend in backends:
        if backend.status is None:
            ready, _, _ = select.select([backend.pidfd], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready:
                log.warning("%s: its backend did not stop; killing it", backend.what)
                backend.kill()
            backend.reap(block=True)

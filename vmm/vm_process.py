"""The vm process: the KVM VM, its vCPU threads, the legacy devices and the QMP server.

Forked by the launcher first thing, with the KVM fd and its end of the control channel
(vmm/launcher.py, "Start-up order"). It imports what it needs while the launcher
prepares the rest, then waits for the launcher's one "start" message: guest RAM loaded
with the boot image, the bound api-channel socket, the boot entry, and each device's
slot and vhost-user connection. It tells the launcher over the control channel when the
VM runs and how it ended, asks it for what hot-plug needs (it opens no host file
itself: vmm/broker.py), and exits with the VM's status.

This module is imported by the launcher, so it imports nothing at the top that only
the vm process uses: main() does, in the vm process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading

from . import control, metrics, sandbox, timeline
from .config.model import MachineConfig

log = logging.getLogger(__name__)


def start_message(entry, slots) -> dict:
    """What the launcher sends once guest RAM, the api-channel and the backends are
    ready; their fds ride along, in this order: guest RAM, the api-channel's listening
    socket, then one connection per slot."""
    return {"event": "start", "entry": dataclasses.astuple(entry),
            "slots": [dataclasses.asdict(slot) for slot in slots]}


def main(config: MachineConfig, kvm_fd: int, channel: socket.socket) -> int:
    """Runs in the child the launcher forked (vmm/children.py: name, role, PDEATHSIG
    and the fds it may hold are already set)."""
    from .boot.loader import BootEntry
    from .devices.virtio.attach import Slot
    from .devices.virtio.mmio import DeviceError
    from .hotplug import Hotplug
    from .machine.memory import GuestMemory
    from .machine.vcpu import KICK_SIGNAL
    from .machine.vm import Machine
    from .qmp.server import QmpServer
    timeline.mark("vm process imported its modules")

    signal.signal(KICK_SIGNAL, lambda *_: None)
    received = control.receive(channel)
    if received is None:
        return 1                    # the launcher failed before the start; it says why
    message, fds = received
    slots = message["slots"]
    if message.get("event") != "start" or len(fds) != 2 + len(slots):
        for fd in fds:
            os.close(fd)
        raise control.ControlError(f"expected the start message, got {message!r}")
    timeline.mark("start message received")
    memory = GuestMemory(fds[0], config.machine.mem_size,
                         dont_dump=config.machine.omit_vm_memory)
    # The api-channel first: it greets and negotiates while the machine is built, and
    # runs commands once the vCPUs run (attach(), below).
    qmp = QmpServer(socket.socket(fileno=fds[1]), config.seccomp)
    qmp.start()
    devices = []        # each slot with its vhost-user connection, or its vhost-vsock fd
    for fields, fd in zip(slots, fds[2:]):
        slot = Slot(**{key: tuple(value) if isinstance(value, list) else value
                       for key, value in fields.items()})
        devices.append((slot, fd if slot.kernel_vhost else socket.socket(fileno=fd)))
    try:
        machine = Machine(config, kvm_fd, memory, BootEntry(*message["entry"]),
                          serial_output=1 if config.serial_stdio else None, devices=devices)
    except OSError as error:
        control.send(channel, {"event": "error", "message": f"KVM: {error.strerror}"})
        return 1
    except DeviceError as error:
        control.send(channel, {"event": "error", "message": str(error)})
        return 1
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda *_: machine.shutdown("host-signal", guest=False))
    hotplug = Hotplug(config, machine.slots, memory, machine.emit, control.Requester(channel))
    timeline.mark("machine built")
    # Everything is open and registered with KVM: confine the process before any other
    # thread starts, so each inherits this filter and stacks its own (vcpu) on it. The
    # QMP thread, already running, took this filter itself (sandbox.confine, ahead_of).
    sandbox.confine("vm", seccomp=config.seccomp)

    stop_input = threading.Event()
    if machine.serial is not None:
        threading.Thread(target=_pump_stdin, args=(machine.serial, stop_input),
                         name="vmm-serial-in", daemon=True).start()
    machine.start()
    timeline.mark("vCPU threads started")
    if config.metrics_file:
        threading.Thread(target=_push_vcpu_exits, args=(machine, channel, stop_input),
                         name="vmm-metrics", daemon=True).start()
    qmp.attach(machine, hotplug)
    control.send(channel, {"event": "running"})
    outcome = machine.wait()
    stop_input.set()
    qmp.close()
    control.send(channel, {"event": "shutdown", "reason": outcome.reason,
                           "status": outcome.status})
    return outcome.status


def _push_vcpu_exits(machine, channel: socket.socket, stop: threading.Event) -> None:
    """-metrics: the vCPUs' exits are counted here, the file is the launcher's; every
    FILE_INTERVAL s they go to it as an event, [[vCPU index, {kind: count}], ...] (about
    60 bytes a vCPU: 254 fit one message), which it writes with the next file. Under the
    vm filter: it only waits (futex) and sends (sendmsg)."""
    while not stop.wait(metrics.FILE_INTERVAL):
        exits = [[thread.vcpu.index, thread.exit_counts()] for thread in machine.vcpus]
        try:
            control.send(channel, {"event": "vcpu-exits", "exits": exits})
        except OSError:
            return              # the launcher is gone: the VM is ending


def _pump_stdin(serial, stop) -> None:
    """stdin -> the UART's receive FIFO, until EOF."""
    while not stop.is_set():
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        serial.receive(data, stop)

"""The vm process: the KVM VM, its vCPU threads, the legacy devices and the QMP server.

Forked by the launcher with everything already open (the KVM fd, guest RAM loaded with
the boot image, the bound api-channel socket); it tells the launcher over the control
channel when the VM runs and how it ended, asks it for what hot-plug needs (it opens no
host file itself: vmm/broker.py), and exits with the VM's status.
"""

import logging
import os
import signal
import socket
import threading

from . import control, sandbox, timeline
from .boot.loader import BootEntry
from .hotplug import Hotplug
from .config.model import MachineConfig
from .devices.virtio.attach import Slot
from .devices.virtio.mmio import DeviceError
from .machine.memory import GuestMemory
from .machine.vcpu import KICK_SIGNAL
from .machine.vm import Machine
from .qmp.server import QmpServer

log = logging.getLogger(__name__)


def main(config: MachineConfig, kvm_fd: int, memory: GuestMemory, entry: BootEntry,
         api_listener: socket.socket, channel: socket.socket,
         devices: list[tuple[Slot, socket.socket]]) -> int:
    """Runs in the child the launcher forked (vmm/children.py: name, role, PDEATHSIG
    and the fds it may hold are already set)."""
    signal.signal(KICK_SIGNAL, lambda *_: None)
    try:
        machine = Machine(config, kvm_fd, memory, entry,
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
    qmp = QmpServer(api_listener, machine, hotplug)
    timeline.mark("machine built")
    # Everything is open and registered with KVM: confine the process before any thread
    # starts, so each thread inherits this filter and stacks its own (vcpu, api) on it.
    sandbox.confine("vm", seccomp=config.seccomp)

    stop_input = threading.Event()
    if machine.serial is not None:
        threading.Thread(target=_pump_stdin, args=(machine.serial, stop_input),
                         name="vmm-serial-in", daemon=True).start()
    machine.start()
    timeline.mark("vCPU threads started")
    # Last: a client that gets the QMP greeting finds the vCPUs running.
    qmp.start()
    control.send(channel, {"event": "running"})
    outcome = machine.wait()
    stop_input.set()
    qmp.close()
    control.send(channel, {"event": "shutdown", "reason": outcome.reason,
                           "status": outcome.status})
    return outcome.status


def _pump_stdin(serial, stop: threading.Event) -> None:
    """stdin -> the UART's receive FIFO, until EOF."""
    while not stop.is_set():
        try:
            data = os.read(0, 4096)
        except OSError:
            return
        if not data:
            return
        serial.receive(data, stop)

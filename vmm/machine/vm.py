"""The machine: KVM VM with in-kernel irqchip and PIT, guest RAM slots, legacy devices,
vCPU threads, and the run state that QMP observes (running, paused, shut down).
"""

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from .. import layout
from ..boot.loader import BootEntry
from ..config.model import MachineConfig
from ..devices.legacy.acpi_sleep import AcpiSleep
from ..devices.legacy.i8042 import I8042
from ..devices.legacy.power_button import PowerButton
from ..devices.legacy.rtc import Rtc
from ..devices.legacy.serial import Serial
from ..devices.virtio import discovery
from ..devices.virtio.attach import Slot
from ..devices.virtio.empty import EmptyDisk, EmptyNic, Placeholder
from ..devices.virtio.mmio import MmioTransport
from ..devices.virtio.slots import Occupant, SlotTable
from ..devices.virtio.vhost_user_device import VhostUserDevice
from ..devices.virtio.vsock.vhost import VhostVsockDevice
from . import cpu
from .bus import Bus
from .kvm import Kvm
from .memory import GuestMemory
from .vcpu import VcpuThread

log = logging.getLogger(__name__)
PAUSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Shutdown:
    reason: str          # QMP's SHUTDOWN reasons: guest-reset, host-qmp-quit, ...
    guest: bool
    status: int          # the VMM's exit status


class Machine:
    def __init__(self, config: MachineConfig, kvm_fd: int, memory: GuestMemory,
                 entry: BootEntry, serial_output: int | None,
                 devices: list[tuple[Slot, socket.socket]]):
        """devices: each backend's slot and the vhost-user connection to it (or, for the
        kernel's vhost-vsock, its fd). DeviceError if a device cannot be set up."""
        self.config = config
        self.memory = memory
        kvm = Kvm(kvm_fd)
        self.vm = vm = kvm.create_vm()
        vm.set_tss_address(layout.TSS_ADDR)
        vm.set_identity_map_address(layout.IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit()
        base = memory.host_address()
        for slot, region in enumerate(memory.regions):
            vm.set_memory_region(slot, region.guest_address, region.size,
                                 base + region.file_offset)

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.serial = None
        if config.serial_stdio:
            self.serial = Serial(serial_output, lambda level: vm.irq_line(layout.SERIAL_IRQ, level))
            self.pio.register(layout.SERIAL_PORT, 8, self.serial)
        self.pio.register(layout.I8042_DATA_PORT, 5,
                          I8042(lambda: self.reset("guest-reset", guest=True)))
        self.pio.register(layout.RTC_PORT, 2, Rtc())
        self.pio.register(layout.ACPI_SLEEP_PORT, 2,
                          AcpiSleep(lambda: self.shutdown("guest-shutdown", guest=True)))
        self.power_button = PowerButton(vm.irq_line)
        self.slots = self._virtio_slots(dict(devices))

        supported = kvm.supported_cpuid()
        hypervisor = cpu.host_hypervisor()
        xsave = cpu.xsave_works(hypervisor)
        if not xsave:
            log.info("running under %s: XSAVE hidden from the guest", hypervisor)
        self.vcpus = []
        for index in range(config.machine.vcpus):
            vcpu = vm.create_vcpu(index)
            cpu.configure(vcpu, config.machine.vcpus, supported, xsave)
            if index == 0:
                cpu.enter_long_mode(vcpu, entry)
            self.vcpus.append(VcpuThread(vcpu, self))

        self._lock = threading.Lock()
        self._done = threading.Event()
        self._outcome: Shutdown | None = None
        self.paused = False
        self.listeners: list[Callable[[str, dict], None]] = []

    def _virtio_slots(self, devices: dict[Slot, socket.socket]) -> SlotTable:
        """Every slot the guest is told about; those with no backend get their empty
        device (vmm/devices/virtio/empty.py)."""
        by_index = {slot.index: (slot, sock) for slot, sock in devices.items()}
        transports = []
        occupants, fixed = {}, {}
        for index in range(discovery.slot_count(self.config.console is not None,
                                                self.config.vsock is not None,
                                                self.config.rng is not None)):
            name = SlotTable.label(index)
            if index in by_index and by_index[index][0].kernel_vhost:
                slot, fd = by_index[index]
                device = VhostVsockDevice(slot.name, fd, self.config.vsock.guest_cid,
                                          self.memory)
                fixed[slot.id] = slot.name
            elif index in by_index:
                slot, sock = by_index[index]
                device = VhostUserDevice(slot.name, slot.device_id, sock, self.memory,
                                         slot.queue_sizes, slot.config_size)
                if index < layout.BLK_SLOTS + layout.NET_SLOTS:
                    occupants[index] = Occupant(slot.id, SlotTable.kind_of(index), None)
                else:
                    fixed[slot.id] = slot.name
            elif index < layout.BLK_SLOTS:
                device = EmptyDisk(self.memory, layout.disk_queues(self.config.machine.vcpus))
            elif index < layout.BLK_SLOTS + layout.NET_SLOTS:
                device = EmptyNic(self.memory)
            else:
                device = Placeholder()
            base, irq = layout.virtio_mmio_slot(index)
            transport = MmioTransport(name, base, irq, device, self.vm, self.memory)
            self.mmio.register(base, layout.VIRTIO_MMIO_SIZE, transport)
            transports.append(transport)
        return SlotTable(transports, self.memory, occupants, fixed)

    def start(self) -> None:
        for thread in self.vcpus:
            thread.start()
        for thread in self.vcpus:
            thread.named.wait()

    def emit(self, event: str, data: dict) -> None:
        """A QMP event (the server queues it for its clients)."""
        for listener in self.listeners:
            listener(event, data)

    def pause(self) -> None:
        with self._lock:
            if self.paused or self._done.is_set():
                return
            self.paused = True
            for thread in self.vcpus:
                thread.request(pause=True)
        # Outside the lock: a vCPU on its way to park may still ask for a shutdown.
        for thread in self.vcpus:
            if not thread.wait_parked(PAUSE_TIMEOUT):
                log.warning("%s did not stop within %.0f s", thread.name, PAUSE_TIMEOUT)
        self.emit("STOP", {})

    def resume(self) -> None:
        with self._lock:
            if not self.paused or self._done.is_set():
                return
            self.paused = False
            for thread in self.vcpus:
                thread.request(pause=False)
        self.emit("RESUME", {})

    def shutdown(self, reason: str, guest: bool, status: int = 0) -> None:
        """Ask the machine to end; the first request decides the outcome."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = Shutdown(reason, guest, status)
        log.info("shutdown: %s", reason)
        self._done.set()

    def press_power_button(self) -> None:
        """Press the guest's ACPI power button (for QMP system_powerdown). It asks, it
        does not force: a guest that handles the button (Linux's button driver and a
        daemon such as acpid running poweroff) shuts down its own way, and its S5 write
        then ends the VM with guest-shutdown and status 0; a guest that ignores the
        button, or has not bound its drivers yet, keeps running."""
        self.power_button.press()

    def reset(self, reason: str, guest: bool) -> None:
        """A reset, the guest's (i8042, ACPI reset register) or QMP's system_reset: this
        microVM has no reboot, so it ends, as QEMU's -no-reboot does (RESET, then
        SHUTDOWN with the same reason)."""
        with self._lock:
            first = self._outcome is None
        if first:
            self.emit("RESET", {"guest": guest, "reason": reason})
        self.shutdown(reason, guest=guest)

    def fail(self, message: str, reason: str = "guest-panic") -> None:
        log.error("%s", message)
        self.shutdown(reason, guest=True, status=1)

    def wait(self) -> Shutdown:
        while not self._done.wait(1.0):
            pass
        self.emit("SHUTDOWN", {"guest": self._outcome.guest, "reason": self._outcome.reason})
        for thread in self.vcpus:
            thread.request(stop=True)
        for thread in self.vcpus:
            thread.join(PAUSE_TIMEOUT)
        return self._outcome

    @property
    def running(self) -> bool:
        return not self.paused and not self._done.is_set()

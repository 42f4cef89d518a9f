"""One thread per vCPU: KVM_RUN in C (GIL released), exits dispatched to the buses.

Stopping or pausing a vCPU that sits in KVM_RUN: set the flag, set the run area's
immediate_exit, then signal the thread (SIGUSR1, whose handler does nothing). The order
matters: the thread clears immediate_exit before it looks at the flags, so whichever
way the race goes, KVM_RUN either never starts or returns EINTR at once.
"""

import errno
import logging
import signal
import threading

import prctl

from .. import sandbox, timeline
from .._kvm import ffi, lib
from .kvm import Vcpu

log = logging.getLogger(__name__)
KICK_SIGNAL = signal.SIGUSR1

_EXIT_NAMES = {getattr(lib, name): name for name in dir(lib) if name.startswith("KVM_EXIT_")
               and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


class VcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, machine):
        super().__init__(name=f"vmm-vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self._machine = machine
        self._state = threading.Condition()
        self._paused = False
        self._parked = False
        self._stopping = False
        self.named = threading.Event()
        # KVM_RUN's exits by reason (KVM_EXIT_*; "signal" when a signal interrupted it),
        # counted by this thread alone and read by anyone (query-stats).
        self.exits: dict[int | str, int] = {}

    # Called from other threads.
    def request(self, pause: bool | None = None, stop: bool = False) -> None:
        with self._state:
            if pause is not None:
                self._paused = pause
            self._stopping |= stop
            self._state.notify_all()
        if pause or stop:
            self.vcpu.run_area.immediate_exit = 1
            if self.is_alive():
                signal.pthread_kill(self.ident, KICK_SIGNAL)

    def exit_counts(self) -> dict[str, int]:
        """The exits so far by kind: "io", "mmio", "hlt", ... (KVM_EXIT_* in lower case)."""
        return {reason if isinstance(reason, str) else
                _EXIT_NAMES.get(reason, str(reason)).removeprefix("KVM_EXIT_").lower(): count
                for reason, count in list(self.exits.items())}

    def wait_parked(self, timeout: float) -> bool:
        with self._state:
            return self._state.wait_for(lambda: self._parked or not self.is_alive(), timeout)

    # The thread itself.
    def run(self) -> None:
        """Named and confined (the `vcpu` profile, this thread only) before the first
        KVM_RUN; the machine's start() waits for both."""
        try:
            prctl.set_name(self.name)
            sandbox.confine("vcpu", thread=True, seccomp=self._machine.config.seccomp)
        except Exception:
            log.exception("%s could not be confined", self.name)
            self._machine.fail(f"{self.name} could not be confined")
            return
        finally:
            self.named.set()
        timeline.mark(f"{self.name} confined, first KVM_RUN")
        try:
            while self._next():
                pass
        except Exception:
            log.exception("%s failed", self.name)
            self._machine.fail(f"{self.name} failed")

    def _next(self) -> bool:
        self.vcpu.run_area.immediate_exit = 0
        with self._state:
            while self._paused and not self._stopping:
                self._parked = True
                self._state.notify_all()
                self._state.wait()
            self._parked = False
            if self._stopping:
                return False
        ret = self.vcpu.run()
        if ret in (-errno.EINTR, -errno.EAGAIN):
            self.exits["signal"] = self.exits.get("signal", 0) + 1
            return True
        if ret < 0:
            self._machine.fail(f"{self.name}: KVM_RUN: {errno.errorcode.get(-ret, ret)}")
            return False
        return self._handle(self.vcpu.exit)

    def _handle(self, e) -> bool:
        reason = e.reason
        self.exits[reason] = self.exits.get(reason, 0) + 1
        if reason == lib.KVM_EXIT_IO:
            self._port_io(e)
            return True
        if reason == lib.KVM_EXIT_MMIO:
            self._mmio(e)
            return True
        if reason in (lib.KVM_EXIT_HLT, lib.KVM_EXIT_INTR):
            return True
        if reason == lib.KVM_EXIT_SHUTDOWN:
            # A guest that triple-faults has crashed; said where a user (and a test's
            # console) sees it, since the VM then ends as after a reset, with status 0.
            log.warning("%s: the guest triple-faulted; treated as a reset, the VM ends",
                        self.name)
            self._machine.shutdown("guest-reset", guest=True)
            return False
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            if e.detail == lib.KVM_SYSTEM_EVENT_CRASH:
                self._machine.fail("the guest reported a crash", reason="guest-panic")
            elif e.detail == lib.KVM_SYSTEM_EVENT_RESET:
                self._machine.shutdown("guest-reset", guest=True)
            else:
                self._machine.shutdown("guest-shutdown", guest=True)
            return False
        regs = self.vcpu.get_regs()
        self._machine.fail(f"{self.name}: unhandled {_EXIT_NAMES.get(reason, reason)} "
                           f"(detail {e.detail:#x}) at rip {regs.rip:#x}")
        return False

    def _port_io(self, e) -> None:
        size, port, bus = e.size, e.port, self._machine.pio
        data = ffi.buffer(e.data, size * e.count)
        for start in range(0, size * e.count, size):
            if e.io_in:
                data[start:start + size] = bus.read(port, size).to_bytes(size, "little")
            else:
                bus.write(port, size, int.from_bytes(data[start:start + size], "little"))

    def _mmio(self, e) -> None:
        size = min(e.size, 8)
        data = ffi.buffer(e.data, 8)
        if e.mmio_write:
            self._machine.mmio.write(e.addr, size, int.from_bytes(data[:size], "little"))
        else:
            data[:size] = self._machine.mmio.read(e.addr, size).to_bytes(size, "little")

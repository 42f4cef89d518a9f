"""A virtio device whose model lives in a vhost-user backend process.

The vm process keeps only the frontend: at start-up it negotiates features, reads the
configuration space and hands over guest RAM (the memfd, once); when the guest's driver
sets DRIVER_OK it passes each ready ring with the queue's ioeventfd as kick and the
slot's irqfd as call, so the data path runs between the guest and the backend alone;
on a reset it takes the rings back (GET_VRING_BASE). A device hot-plugged into a live
slot starts each ring where the slot's previous device stopped (activate's bases), and
one unplugged gives each ring's stopping point back (suspend).

A backend that dies is replaced by the launcher (vmm/restart.py) and the device
reconnects to the new one: the same handshake, then the transport starts the rings again.
What must survive the backend is the in-flight region (vhost-user's INFLIGHT_SHMFD):
the backend creates it at the first start (GET_INFLIGHT_FD), this process keeps the fd
and hands it to every later backend (SET_INFLIGHT_FD), which resubmits what its
predecessor had taken and not completed. A guest's reset drops it: the next start gets
a fresh one.

The frontend talks on the vCPU thread that wrote the status register, as QEMU does
under its big lock: these are a handful of messages per device life cycle.
"""

import logging
import os
import socket

from ...machine.memory import GuestMemory
from ...vhost_user import protocol as P
from ...vhost_user.frontend import BackendError, Frontend, RingAddresses
from .mmio import TRANSPORT_FEATURES, VIRTIO_F_VERSION_1, DeviceError, Interrupt, QueueSetup, \
    config_bytes

log = logging.getLogger(__name__)


class VhostUserDevice:
    uses_ioeventfd = True

    def __init__(self, name: str, device_id: int, sock: socket.socket, memory: GuestMemory,
                 queue_sizes: tuple[int, ...], config_size: int):
        self.name = name
        self.device_id = device_id
        self.queue_sizes = queue_sizes
        self.memory = memory
        self.config_size = config_size
        self.started: list[int] = []
        self.bases = [0] * len(queue_sizes)
        self.inflight = None                 # the in-flight region, once a backend made it
        self.frontend = Frontend(P.Connection(sock))
        self.features, self.config = self._handshake()
        if not self.features & VIRTIO_F_VERSION_1:
            raise DeviceError(f"{name}: the backend does not offer VIRTIO_F_VERSION_1")

    def _handshake(self) -> tuple[int, bytes]:
        """Features, configuration space and guest RAM, with the current connection."""
        try:
            offered = self.frontend.negotiate(TRANSPORT_FEATURES)
            if not self.frontend.protocol_features & (1 << P.PROTOCOL_F_CONFIG):
                raise DeviceError("the backend does not offer its configuration space (CONFIG)")
            config = self.frontend.get_config(self.config_size)
            memory = self.memory
            regions = [P.MemoryRegion(gpa, size, host, offset) for (gpa, size, host), offset in
                       zip(memory.host_regions(), (r.file_offset for r in memory.regions))]
            self.frontend.set_mem_table(regions, [memory.fd] * len(regions))
        except (BackendError, P.ProtocolError, OSError) as error:
            raise DeviceError(f"{self.name}: vhost-user backend: {error}") from None
        return offered & ~P.F_PROTOCOL_FEATURES, config

    def reconnect(self, sock: socket.socket) -> None:
        """Take a restarted backend's connection; the transport starts the rings after.
        DeviceError if the new backend is not the same device (other features)."""
        self.frontend.connection.close()
        self.frontend = Frontend(P.Connection(sock))
        self.started = []
        features, self.config = self._handshake()
        if features != self.features:
            raise DeviceError(f"{self.name}: the restarted backend offers features "
                              f"{features:#x}, not {self.features:#x}")

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt, bases: list[int]) -> None:
        self.bases = list(bases)
        try:
            self.frontend.set_features(features)
            if self.frontend.supports_inflight:
                if self.inflight is None:
                    self.inflight = self.frontend.get_inflight_fd(len(self.queue_sizes),
                                                                  max(self.queue_sizes))
                self.frontend.set_inflight_fd(self.inflight)
            for index, queue in enumerate(queues):
                if not queue.ready:
                    continue
                addresses = RingAddresses(*(self.memory.translate(address, 1) for address in
                                            (queue.desc, queue.avail, queue.used)))
                self.frontend.start_ring(index, queue.num, addresses, bases[index],
                                         kicks[index], interrupt.fd)
                self.started.append(index)
        except (BackendError, P.ProtocolError, OSError) as error:
            raise DeviceError(f"vhost-user backend: {error}") from None

    def suspend(self) -> list[int]:
        """GET_VRING_BASE on every started ring: the backend finishes the requests it
        took (our backends complete a batch before they look at their stop pipe) and
        says where the next one is."""
        started, self.started = self.started, []
        try:
            for index in started:
                self.bases[index] = self.frontend.stop_ring(index)
        except (BackendError, P.ProtocolError, OSError) as error:
            raise DeviceError(f"vhost-user backend: {error}") from None
        return list(self.bases)

    def reset(self) -> None:
        self._drop_inflight()
        self.suspend()
        self.bases = [0] * len(self.queue_sizes)

    def close(self) -> None:
        """The backend process ends when its connection closes."""
        self._drop_inflight()
        self.frontend.connection.close()

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            os.close(self.inflight.fd)
            self.inflight = None

    def notify(self, index: int) -> None:
        """Never called: QueueNotify is an ioeventfd the backend polls."""

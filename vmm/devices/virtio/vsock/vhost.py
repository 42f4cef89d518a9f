"""vsock on the kernel's vhost-vsock (StratoVirt 2.x's `vhost-vsock-device`, as Kata uses
it): the guest's rx and tx rings are served by the host kernel, so host programs reach
the guest with plain AF_VSOCK sockets to its CID (Kata's agent client does). The seed's
`-device vsock` is the userspace device (device.py), with other semantics.

The launcher opens /dev/vhost-vsock, or takes the fd the caller passed (`vhostfd=`,
checked at configuration time: vmm/config/inherited.py), and hands it to the vm process
with the start message; no backend process. The vm process becomes the device's owner
(VHOST_SET_OWNER: the kernel's worker then reads guest RAM through this process's
mapping), claims the guest's CID, and gives the kernel the memory table at start-up,
before its filter is on. When the guest's driver sets DRIVER_OK, the vCPU thread that
wrote it passes the rings with the queues' ioeventfds as kicks and the slot's irqfd as
call, and starts the device; a reset stops it and takes the rings' positions back. The
event queue (2) stays with us and is never filled: its events (TRANSPORT_RESET) follow a
migration, which this VMM does not do.
"""

import errno
import os

from ...._kvm import ffi, lib
from ....machine.memory import GuestMemory
from ..attach import AttachError, Slot
from ..mmio import VIRTIO_F_VERSION_1, DeviceError, Interrupt, QueueSetup, config_bytes
from .device import CONFIG_SIZE, QUEUE_SIZE, VIRTIO_ID_VSOCK

DEVICE_PATH = "/dev/vhost-vsock"
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
# What we offer of the kernel's features: the ring layouts (not VHOST_F_LOG_ALL, which is
# vhost's own, nor ACCESS_PLATFORM: no IOMMU here).
OFFERED = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
KERNEL_RINGS = 2            # rx and tx; the event queue is ours


def open_device(vsock, index: int) -> tuple[Slot, int]:
    """The launcher's side: the slot, and the vhost-vsock fd the vm process gets (the
    caller's `vhostfd`, or /dev/vhost-vsock opened here)."""
    if vsock.fd is not None:
        fd = os.dup(vsock.fd)
    else:
        try:
            fd = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as error:
            raise AttachError(f"vhost-vsock {vsock.id}: {DEVICE_PATH}: {error.strerror} "
                              "(modprobe vhost_vsock)") from None
    slot = Slot(index, vsock.id, f"vsock {vsock.id}", VIRTIO_ID_VSOCK, (QUEUE_SIZE,) * 3,
                CONFIG_SIZE, kernel_vhost=True)
    return slot, fd


class VhostVsockDevice:
    uses_ioeventfd = True
    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (QUEUE_SIZE,) * 3

    def __init__(self, name: str, fd: int, guest_cid: int, memory: GuestMemory):
        """DeviceError if the kernel refuses (the CID in use by another VM, say)."""
        self.name = name
        self.fd = fd
        self.memory = memory
        self.started: list[int] = []
        self.bases = [0] * len(self.queue_sizes)
        self.config = guest_cid.to_bytes(8, "little")
        self._ioctl(lib.VHOST_SET_OWNER, ffi.NULL, "VHOST_SET_OWNER")
        kernel = ffi.new("uint64_t *")
        self._ioctl(lib.VHOST_GET_FEATURES, kernel, "VHOST_GET_FEATURES")
        self.kernel_features = kernel[0]
        self.features = self.kernel_features & OFFERED
        if not self.features & VIRTIO_F_VERSION_1:
            raise DeviceError(f"{name}: the kernel's vhost-vsock lacks VIRTIO_F_VERSION_1")
        cid = ffi.new("uint64_t *", guest_cid)
        self._ioctl(lib.VHOST_VSOCK_SET_GUEST_CID, cid, "VHOST_VSOCK_SET_GUEST_CID",
                    {errno.EADDRINUSE: f"guest CID {guest_cid} is in use by another VM"})
        regions = memory.host_regions()
        buffer = ffi.new("char[]", ffi.sizeof("struct vhost_memory") +
                         len(regions) * ffi.sizeof("struct vhost_memory_region"))
        table = ffi.cast("struct vhost_memory *", buffer)
        table.nregions = len(regions)
        for number, (gpa, size, host) in enumerate(regions):
            entry = table.regions[number]
            entry.guest_phys_addr, entry.memory_size, entry.userspace_addr = gpa, size, host
        self._ioctl(lib.VHOST_SET_MEM_TABLE, table, "VHOST_SET_MEM_TABLE")

    def _ioctl(self, request: int, arg, what: str, known: dict[int, str] | None = None):
        rc = lib.vmm_ioctl_ptr(self.fd, request, arg)
        if rc < 0:
            why = (known or {}).get(-rc) or os.strerror(-rc)
            raise DeviceError(f"{self.name}: vhost-vsock {what}: {why}")

    def read_config(self, offset: int, size: int) -> bytes:
        return config_bytes(self.config, offset, size)

    def activate(self, features: int, queues: list[QueueSetup], kicks: list[int],
                 interrupt: Interrupt, bases: list[int]) -> None:
        self.bases = list(bases)
        wanted = ffi.new("uint64_t *", features & self.kernel_features)
        self._ioctl(lib.VHOST_SET_FEATURES, wanted, "VHOST_SET_FEATURES")
        for index, queue in enumerate(queues[:KERNEL_RINGS]):
            if not queue.ready:
                continue
            state = ffi.new("struct vhost_vring_state *", {"index": index, "num": queue.num})
            self._ioctl(lib.VHOST_SET_VRING_NUM, state, "VHOST_SET_VRING_NUM")
            state.num = bases[index]
            self._ioctl(lib.VHOST_SET_VRING_BASE, state, "VHOST_SET_VRING_BASE")
            addr = ffi.new("struct vhost_vring_addr *")
            addr.index = index
            addr.desc_user_addr = self.memory.translate(queue.desc, 1)
            addr.avail_user_addr = self.memory.translate(queue.avail, 1)
            addr.used_user_addr = self.memory.translate(queue.used, 1)
            self._ioctl(lib.VHOST_SET_VRING_ADDR, addr, "VHOST_SET_VRING_ADDR")
            for request, fd, what in ((lib.VHOST_SET_VRING_KICK, kicks[index], "KICK"),
                                      (lib.VHOST_SET_VRING_CALL, interrupt.fd, "CALL")):
                file = ffi.new("struct vhost_vring_file *", {"index": index, "fd": fd})
                self._ioctl(request, file, f"VHOST_SET_VRING_{what}")
            self.started.append(index)
        self._running(1)

    def _running(self, on: int) -> None:
        self._ioctl(lib.VHOST_VSOCK_SET_RUNNING, ffi.new("int *", on), "VHOST_VSOCK_SET_RUNNING")

    def suspend(self) -> list[int]:
        """Stop the kernel's worker and take each started ring's next index back."""
        started, self.started = self.started, []
        if started:
            self._running(0)
        for index in started:
            state = ffi.new("struct vhost_vring_state *", {"index": index})
            self._ioctl(lib.VHOST_GET_VRING_BASE, state, "VHOST_GET_VRING_BASE")
            self.bases[index] = state.num
        return list(self.bases)

    def reset(self) -> None:
        self.suspend()
        self.bases = [0] * len(self.queue_sizes)

    def close(self) -> None:
        """The kernel releases the CID and its worker when the fd closes."""
        os.close(self.fd)

    def notify(self, index: int) -> None:
        """Never called: every QueueNotify is an ioeventfd (the event queue's is read by
        no one, as it is never filled)."""

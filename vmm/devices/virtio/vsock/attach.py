"""The vsock device in the launcher: its host socket (config: <api-channel's
directory>/<id>.vsock) bound here, mode 0600, removed by the launcher on every exit
path; then its backend process (vmm-vsock-<id>) forked with that listening socket and
nothing else of the launcher's. The backend connects to <socket>_<port> itself for the
guest's connections."""

from pathlib import Path

from ....config.model import Vsock
from ....machine.memory import GuestMemory
from ..attach import Attached, AttachError, Slot, spawn_backend
from ..listener import adopt, bind_private
from . import device, main


def attach(vsock: Vsock, index: int, memory: GuestMemory, created: list[Path],
           seccomp: bool) -> Attached:
    """`created` gets the socket path as soon as it exists."""
    try:
        listener = bind_private(str(vsock.socket))
    except OSError as error:
        raise AttachError(f"-device vsock,id={vsock.id}: {vsock.socket}: "
                          f"{error.strerror}") from None
    created.append(vsock.socket)
    slot = Slot(index, vsock.id, f"vsock {vsock.id}", device.VIRTIO_ID_VSOCK, (device.QUEUE_SIZE,) * 3,
                device.CONFIG_SIZE)
    try:
        return spawn_backend(slot, f"vmm-vsock-{vsock.id}", f"vsock-{vsock.id}",
                             [listener.fileno()],
                             lambda sock, fds, restarts: main.serve_vsock(
                                 vsock.guest_cid, adopt(fds[0]), str(vsock.socket), sock,
                                 seccomp, restarted=restarts > 0),
                             memory)
    finally:
        listener.close()

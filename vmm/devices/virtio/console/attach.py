"""The console in the launcher: its socket bound here (mode 0600; the launcher removes
it on every exit path), then its backend process (vmm-con-<id>) forked with that
listening socket and nothing else of the launcher's."""

from pathlib import Path

from ....config.model import Console
from ....machine.memory import GuestMemory
from ..attach import Attached, AttachError, Slot, spawn_backend
from ..listener import adopt, bind_private
from . import device, main


def attach(console: Console, index: int, memory: GuestMemory, created: list[Path],
           seccomp: bool) -> Attached:
    """`created` gets the socket path as soon as it exists."""
    try:
        listener = bind_private(str(console.socket))
    except OSError as error:
        raise AttachError(f"-chardev id={console.id}: {console.socket}: "
                          f"{error.strerror}") from None
    created.append(console.socket)
    name = f"console {console.id}"
    slot = Slot(index, console.id, name, device.VIRTIO_ID_CONSOLE, (device.QUEUE_SIZE,) * 2,
                device.CONFIG_SIZE)
    try:
        return spawn_backend(slot, f"vmm-con-{console.id}", f"con-{console.id}",
                             [listener.fileno()],
                             lambda sock, fds, _: main.serve_console(
                                 adopt(fds[0]), sock, name, seccomp),
                             memory)
    finally:
        listener.close()

"""The launcher's side of a virtio device: open what the host gives the device (a disk,
a tap, a socket), fork its backend process with that and one end of a socket pair, and
describe the slot for the vm process, which holds the other end as its vhost-user
connection. Each device kind has an `attach` in its package (e.g. block/attach.py)
built on spawn_backend().

The launcher keeps its own copy of what it gave the backend (Attached.respawn), so a
backend that dies can be forked again with the same image, tap or listening socket
(vmm/restart.py): the recipe is the same, only the socket pair is new.
"""

import os
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable

from ... import children
from ...machine.memory import GuestMemory


REPLY_TIMEOUT = 10         # seconds


class AttachError(Exception):
    """The host cannot give the device what it needs; the message is the user's line."""


@dataclass(frozen=True)
class Slot:
    """What the vm process needs to put a vhost-user device in a virtio-mmio slot."""
    index: int
    id: str                     # the device's id (the configuration's, QMP's)
    name: str                   # "disk rootfs": how messages name the device
    device_id: int
    queue_sizes: tuple[int, ...]
    config_size: int            # bytes of configuration space to read (GET_CONFIG)
    kernel_vhost: bool = False  # its fd is the kernel's vhost-vsock, not a vhost-user
                                # connection (vsock/vhost.py)


# serve(sock, fds, restarts) runs in the backend process: its end of the socket pair, the
# fds it was given (the kept copies' numbers) and how many backends of this device died.
Serve = Callable[[socket.socket, list[int], int], int]


@dataclass
class Attached:
    slot: Slot
    connection: socket.socket   # the vm process's end
    backend: children.Child
    _recipe: tuple = field(default=(), repr=False)
    _kept: list[int] = field(default_factory=list, repr=False)
    page: object = None         # the device's DevicePage (vmm/virtio/device_page.py), if any

    def respawn(self, restarts: int) -> "Attached":
        """A fresh backend for the same device, from the same kept fds; the new socket
        pair's vm end is in the result."""
        return _fork(self.slot, *self._recipe, self._kept, restarts, self.page)

    def forget(self) -> None:
        """The device is gone for good: the kept fds are closed, its page unmapped."""
        for fd in self._kept:
            os.close(fd)
        self._kept.clear()
        if self.page is not None:
            self.page.close()
            self.page = None


def spawn_backend(slot: Slot, process_name: str, role: str, fds: list[int],
                  serve: Serve, memory: GuestMemory, page=None) -> Attached:
    """Fork the backend holding copies of `fds` and its end of a new socket pair; serve
    runs in it. The caller closes its own `fds` afterwards; the copies are kept for a
    restart until forget(). `page`: the device's DevicePage, the only one the backend
    keeps mapped."""
    kept = [os.dup(fd) for fd in fds]
    try:
        return _fork(slot, process_name, role, serve, memory, kept, 0, page)
    except BaseException:
        for fd in kept:
            os.close(fd)
        raise


def _fork(slot: Slot, process_name: str, role: str, serve: Serve, memory: GuestMemory,
          kept: list[int], restarts: int, page) -> Attached:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # The vm process waits for the backend's replies on a vCPU or the QMP thread: a
    # backend that stops answering fails the request after REPLY_TIMEOUT instead of
    # hanging that thread.
    timeout = struct.pack("ll", REPLY_TIMEOUT, 0)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)

    def backend() -> int:
        memory.close()      # guest RAM comes again from the vm process, over vhost-user
        if "vmm.virtio.device_page" in sys.modules:      # else no device has a page
            sys.modules["vmm.virtio.device_page"].keep_only(page)
        return serve(theirs, kept, restarts)

    try:
        child = children.spawn(process_name[:15], role, [*kept, theirs.fileno()], backend)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    child.what = slot.name
    return Attached(slot, ours, child, (process_name, role, serve, memory), kept, page)

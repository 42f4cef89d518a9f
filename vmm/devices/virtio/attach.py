"""The launcher's side of a virtio device: open what the host gives the device (a disk,
a tap, a socket), fork its backend process with that and one end of a socket pair, and
describe the slot for the vm process, which holds the other end as its vhost-user
connection. Each device kind has an `attach` in its package (e.g. block/attach.py)
built on spawn_backend()."""

import socket
import struct
from dataclasses import dataclass
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


@dataclass
class Attached:
    slot: Slot
    connection: socket.socket   # the vm process's end
    backend: children.Child


def spawn_backend(slot: Slot, process_name: str, role: str, fds: list[int],
                  serve: Callable[[socket.socket], int], memory: GuestMemory) -> Attached:
    """Fork the backend holding `fds` and its end of a new socket pair; serve(sock)
    runs in it. The caller closes its copies of `fds` afterwards."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # The vm process waits for the backend's replies on a vCPU or the QMP thread: a
    # backend that stops answering fails the request after REPLY_TIMEOUT instead of
    # hanging that thread.
    timeout = struct.pack("ll", REPLY_TIMEOUT, 0)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)

    def backend() -> int:
        memory.close()      # guest RAM comes again from the vm process, over vhost-user
        return serve(theirs)

    try:
        child = children.spawn(process_name[:15], role, [*fds, theirs.fileno()], backend)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    child.what = slot.name
    return Attached(slot, ours, child)

"""A -drive in the launcher: the image opened with the drive's flags, then its backend
process (vmm-blk-<id>) forked with the image and nothing else of the launcher's."""

import os

from ....config.model import Drive
from ....machine.memory import GuestMemory
from ..attach import Attached, AttachError, Slot, spawn_backend
from . import main
from .device import CONFIG_SIZE

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 256            # QEMU's default for virtio-blk


def attach(drive: Drive, index: int, memory: GuestMemory, seccomp: bool) -> Attached:
    flags = (os.O_RDONLY if drive.read_only else os.O_RDWR) | os.O_CLOEXEC | \
        (os.O_DIRECT if drive.direct else 0)
    try:
        disk = os.open(drive.path, flags)
    except OSError as error:
        raise AttachError(f"-drive id={drive.id}: {drive.path}: {error.strerror}") from None
    slot = Slot(index, f"disk {drive.id}", VIRTIO_ID_BLOCK, (QUEUE_SIZE,), CONFIG_SIZE)
    try:
        return spawn_backend(slot, f"vmm-blk-{drive.id}", f"blk-{drive.id}", [disk],
                             lambda sock: main.serve_disk(disk, sock, drive.read_only,
                                                          drive.direct, drive.serial,
                                                          seccomp),
                             memory)
    finally:
        os.close(disk)

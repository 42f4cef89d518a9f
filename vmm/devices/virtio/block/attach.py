"""A -drive (or a hot-plugged disk) in the launcher: the image opened with the drive's
flags, its device page made (its limits written), then its backend process
(vmm-blk-<id>) forked with the image, the page and nothing else of the launcher's."""

import os

from ....config.model import Drive
from ....machine.memory import GuestMemory
from ....virtio.device_page import DevicePage
from ..attach import Attached, AttachError, Slot, spawn_backend
from . import main
from .device import CONFIG_SIZE, QUEUE_SIZE, VIRTIO_ID_BLOCK


def open_flags(read_only: bool, direct: bool) -> int:
    return (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | \
        (os.O_DIRECT if direct else 0)


def attach(drive: Drive, index: int, memory: GuestMemory, seccomp: bool,
           disk: int | None = None) -> Attached:
    """`disk`: the image, already open with open_flags() (the broker's, for a hot-plug;
    the caller keeps it); else it is opened here and closed once the backend has it."""
    own = disk is None
    if own:
        try:
            disk = os.open(drive.path, open_flags(drive.read_only, drive.direct))
        except OSError as error:
            raise AttachError(f"-drive id={drive.id}: {drive.path}: {error.strerror}") from None
    slot = Slot(index, drive.id, f"disk {drive.id}", VIRTIO_ID_BLOCK,
                (QUEUE_SIZE,) * drive.num_queues, CONFIG_SIZE)
    page = DevicePage((drive.rate_limit,))
    try:
        return spawn_backend(slot, f"vmm-blk-{drive.id}", f"blk-{drive.id}", [disk],
                             lambda sock, fds, _: main.serve_disk(fds[0], sock, drive.read_only,
                                                                  drive.direct, drive.serial,
                                                                  seccomp, drive.num_queues,
                                                                  page=page),
                             memory, page)
    finally:
        if own:
            os.close(disk)

"""The rng in the launcher: its entropy source opened here (it must still be a
character device, as validation found it), its device page made with the rate limit,
then its backend process (vmm-rng-<id>) forked with the source, the page and nothing
else of the launcher's. It takes the slot after the console's and vsock's."""

import os
import stat

from ....config.model import Bucket, RateLimit, Rng
from ....machine.memory import GuestMemory
from ....virtio.device_page import DevicePage
from ..attach import Attached, AttachError, Slot, spawn_backend
from . import device, main


def attach(rng: Rng, index: int, memory: GuestMemory, seccomp: bool) -> Attached:
    where = f"virtio-rng {rng.id}: entropy source {rng.source}"
    try:
        source = os.open(rng.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise AttachError(f"{where}: {error.strerror}") from None
    try:
        if not stat.S_ISCHR(os.fstat(source).st_mode):
            raise AttachError(f"{where}: not a character device")
        name = f"rng {rng.id}"
        slot = Slot(index, rng.id, name, device.VIRTIO_ID_RNG, (device.QUEUE_SIZE,),
                    device.CONFIG_SIZE)
        page = DevicePage((RateLimit(bandwidth=Bucket(rng.max_bytes, rng.period)),))
        return spawn_backend(slot, f"vmm-rng-{rng.id}", f"rng-{rng.id}", [source],
                             lambda sock, fds, _: main.serve_rng(fds[0], sock, name, page,
                                                                 seccomp),
                             memory, page)
    finally:
        os.close(source)

"""The virtio-blk device: features, configuration space, and the request loop.

Features offered: VERSION_1, INDIRECT_DESC, SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, and RO
for read-only disks. GET_ID answers with the configured serial. DISCARD and
WRITE_ZEROES are not offered yet.
"""

import os
import struct

from ....virtio.queue import Virtqueue
from . import request as R

SECTOR = 512
VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO = 1 << 1, 1 << 2, 1 << 5
VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH = 1 << 6, 1 << 9
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_VERSION_1 = 1 << 32

MAX_QUEUE_SIZE = 1024            # QEMU's vhost-user-blk asks for 1024
SEG_MAX = 254                     # fits any ring of 256 or more (a request's header and
                                  # status take two descriptors)
SIZE_MAX = 1 << 20                # bytes in one segment
CONFIG_SIZE = 60                  # struct virtio_blk_config up to write_zeroes_may_unmap


class BlockDevice:
    num_queues = 1
    max_queue_size = MAX_QUEUE_SIZE

    def __init__(self, fd: int, read_only: bool, direct: bool, serial: str | None):
        self.fd = fd
        self.read_only = read_only
        self.direct = direct
        self.serial = (serial or "").encode("ascii")
        self.capacity = os.lseek(fd, 0, os.SEEK_END) // SECTOR
        self.features = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_BLK_F_SIZE_MAX
                         | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
                         | (VIRTIO_BLK_F_RO if read_only else 0))

    def config(self) -> bytes:
        config = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", config, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", config, 20, SECTOR)                  # blk_size
        struct.pack_into("<H", config, 34, self.num_queues)
        return bytes(config)

    def process(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, R.execute(self, chain))

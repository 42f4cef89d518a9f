"""The virtio-blk device: features, configuration space, and the request loop.

Features offered: VERSION_1, INDIRECT_DESC, EVENT_IDX, SIZE_MAX, SEG_MAX, BLK_SIZE,
FLUSH; MQ with num_queues in the configuration space when the device has more than one
queue (as QEMU offers it); RO for read-only disks; DISCARD and WRITE_ZEROES for writable
ones. GET_ID answers with the configured serial. The requests themselves run in C
(request.py, native/blkio.c), each queue in its own worker thread with its own I/O
engine; a driver that does not take MQ uses queue 0 alone.

Sizes: the capacity is the disk's size in whole sectors. With O_DIRECT, blk_size is
the disk's direct-I/O block size (statx STATX_DIOALIGN, else BLKSSZGET, else 512) so
a guest sizes its requests to fit, and the capacity is rounded down to whole blocks
(O_DIRECT cannot reach a partial block at the end).
"""

import struct

from .... import layout
from ....virtio.queue import Served, Virtqueue
from . import request as R

SECTOR = R.SECTOR
VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO = 1 << 1, 1 << 2, 1 << 5
VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH = 1 << 6, 1 << 9
VIRTIO_BLK_F_MQ = 1 << 12
VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES = 1 << 13, 1 << 14
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 256                 # QEMU's default for virtio-blk
MAX_QUEUE_SIZE = 1024            # QEMU's vhost-user-blk asks for 1024
SEG_MAX = 254                     # fits any ring of 256 or more (a request's header and
                                  # status take two descriptors)
SIZE_MAX = 1 << 20                # bytes in one segment
CONFIG_SIZE = 60                  # struct virtio_blk_config up to write_zeroes_may_unmap
MAX_DWZ_SECTORS = 1 << 22         # 2 GiB per discard / write-zeroes segment
MAX_DISCARD_ALIGNMENT = 1 << 20   # bytes: a larger st_blksize is not an allocation unit
MAX_QUEUES = layout.MAX_DISK_QUEUES


BASE_FEATURES = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
                 | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
                 | VIRTIO_BLK_F_FLUSH)
WRITABLE_FEATURES = BASE_FEATURES | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES


def features(read_only: bool, num_queues: int) -> int:
    """What a disk of ours offers."""
    return (BASE_FEATURES | VIRTIO_BLK_F_RO if read_only else WRITABLE_FEATURES) | \
        (VIRTIO_BLK_F_MQ if num_queues > 1 else 0)
WRITABLE_LIMITS = R.Limits(MAX_DWZ_SECTORS, R.MAX_DWZ_SEGMENTS, MAX_DWZ_SECTORS,
                           R.MAX_DWZ_SEGMENTS, True)


def config_space(capacity: int, block_size: int, limits: R.Limits,
                 discard_alignment: int, num_queues: int = 1) -> bytes:
    """struct virtio_blk_config up to write_zeroes_may_unmap (CONFIG_SIZE bytes)."""
    config = bytearray(CONFIG_SIZE)
    struct.pack_into("<QII", config, 0, capacity, SIZE_MAX, SEG_MAX)
    struct.pack_into("<I", config, 20, block_size)          # blk_size
    struct.pack_into("<H", config, 34, num_queues)
    if limits.max_discard_seg or limits.max_write_zeroes_seg:
        struct.pack_into("<IIIIIB", config, 36, limits.max_discard_sectors,
                         limits.max_discard_seg, discard_alignment,
                         limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg,
                         limits.write_zeroes_may_unmap)
    return bytes(config)


class BlockDevice:
    max_queue_size = MAX_QUEUE_SIZE
    tracks_inflight = True       # a write the guest waits for outlives a backend's death

    def __init__(self, fd: int, read_only: bool, direct: bool, serial: str | None,
                 num_queues: int = 1, engine: str = R.AUTO, page=None):
        """engine: see request.Requests (made here, before the backend is confined);
        page: the disk's DevicePage (vmm/virtio/device_page.py), or None."""
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"virtio-blk: {num_queues} queues; allowed 1..{MAX_QUEUES}")
        self.num_queues = num_queues
        self.fd = fd
        self.read_only = read_only
        self.direct = direct
        self.serial = (serial or "").encode("ascii")
        disk = R.probe(fd)
        self.block_size = disk.block_size if direct else SECTOR
        self.capacity = disk.size // self.block_size * self.block_size // SECTOR
        # Discards of less than the file system's block free nothing: tell the guest.
        granule = disk.io_block if SECTOR <= disk.io_block <= MAX_DISCARD_ALIGNMENT else SECTOR
        self.discard_alignment = max(granule, disk.block_size) // SECTOR
        self.limits = R.Limits() if read_only else WRITABLE_LIMITS
        self.features = features(read_only, num_queues)
        self.requests = R.Requests(fd, self.capacity, read_only, direct, disk, self.serial,
                                   self.limits, num_queues, engine, page)

    def config(self) -> bytes:
        return config_space(self.capacity, self.block_size, self.limits,
                            self.discard_alignment, self.num_queues)

    def process(self, queue: Virtqueue) -> Served:
        return self.requests.process(queue)

    def serve(self, queue: Virtqueue, kick: int, call: int, stop: int) -> None:
        self.requests.serve(queue, kick, call, stop)

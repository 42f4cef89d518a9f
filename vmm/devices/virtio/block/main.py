"""`stratovirt-vhost-user-blk`: the virtio-blk backend as a program of its own.

Follows the vhost-user backend conventions (QEMU's vhost-user.rst), so QEMU or
qemu-storage-daemon users can run it the way they run theirs: --socket-path to listen
(one frontend at a time; it may reconnect), or --fd for a connected socket inherited
from the launcher; --print-capabilities; SIGTERM ends it and removes the socket.
"""

import json
import logging
import os
import socket

from .... import sandbox
from ....log_limit import guest
from .. import program
from . import request
from .device import MAX_QUEUES, BlockDevice


def main() -> None:
    """The program (its console script). Its options are click's, imported here only:
    the launcher imports this module for serve_disk() and needs none of click
    (docs/performance.md)."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--socket-path", type=click.Path(dir_okay=False),
                  help="Listen on this unix socket (created; a stale one left by a killed "
                       "backend is replaced).")
    @click.option("--fd", type=int, help="Serve this inherited, connected unix socket.")
    @click.option("--print-capabilities", is_flag=True, help="Print the backend's capabilities.")
    @click.option("--blk-file", type=click.Path(dir_okay=False), help="The disk image.")
    @click.option("--read-only", is_flag=True, help="Offer a read-only disk (VIRTIO_BLK_F_RO).")
    @click.option("--direct/--no-direct", default=False, help="Open the image with O_DIRECT.")
    @click.option("--serial", default=None, help="Disk serial (GET_ID), at most 20 ASCII bytes.")
    @click.option("--num-queues", type=click.IntRange(1, MAX_QUEUES), default=1, show_default=True,
                  help="Queues offered (VIRTIO_BLK_F_MQ when more than one; QEMU's "
                       "vhost-user-blk num-queues= may use up to this many).")
    @click.option("--aio", "engine", type=click.Choice([request.AUTO, *request.ENGINES]),
                  default=request.AUTO, show_default=True,
                  help="I/O engine: auto is io_uring, else Linux AIO (aio), with --direct; "
                       "inline without it.")
    @click.option("--iops-total", help="Requests per second, at most (QEMU's "
                  "throttling.iops-total; a bucket of a tenth of a second: docs/limits.md).")
    @click.option("--bps-total", help="Bytes per second, at most (throttling.bps-total).")
    @click.option("--iops-total-max", help="Burst rate of requests (throttling.iops-total-max).")
    @click.option("--bps-total-max", help="Burst rate of bytes (throttling.bps-total-max).")
    @click.option("--iops-total-max-length", help="Seconds the request burst may last (default 1).")
    @click.option("--bps-total-max-length", help="Seconds the byte burst may last (default 1).")
    def command(socket_path, fd, print_capabilities, blk_file, read_only, direct, serial,
                num_queues, engine, **throttling):
        """vhost-user virtio-blk backend."""
        if print_capabilities:
            print(json.dumps({"type": "block", "features": ["blk-file", "read-only"]}))
            return
        if (socket_path is None) == (fd is None) or not blk_file:
            raise click.UsageError("give --blk-file and one of --socket-path or --fd")
        from ....config import ratelimit
        limits = program.limits_page(
            throttling, lambda given: (ratelimit.from_throttling(given, prefix="--"),))
        logging.basicConfig(level=logging.INFO, format="vhost-user-blk: %(message)s")
        flags = ((os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC |
                 (os.O_DIRECT if direct else 0))
        try:
            disk = os.open(blk_file, flags)
        except OSError as error:
            raise click.ClickException(f"--blk-file: {blk_file}: {error.strerror}") from None
        program.exit_on_sigterm()
        program.serve(lambda: BlockDevice(disk, read_only, direct, serial, num_queues, engine,
                                          limits), socket_path, fd)

    command()


def serve_disk(disk_fd: int, sock: socket.socket, read_only: bool, direct: bool,
               serial: str | None, seccomp: bool, num_queues: int = 1,
               engine: str = request.AUTO, page=None) -> int:
    """The launcher's entry into a disk's backend process (forked, see vmm/children.py):
    the disk is already open with the right flags, the socket already connected. The
    process is confined before it reads a byte from the vm process or the guest; its
    I/O engines (io_uring rings, AIO contexts) are made before that, so the calls that
    make them are not in its profile. `page`: the disk's DevicePage (limits the
    launcher writes, counters it reads)."""
    program.exit_on_sigterm()
    if page is not None:
        guest.count_into(page.guest_errors())       # what the guest got wrong, counted
    device = BlockDevice(disk_fd, read_only, direct, serial, num_queues, engine, page)
    sandbox.confine("virtio-blk", seccomp=seccomp)
    try:
        program.serve_connection(device, sock)
    finally:
        device.requests.leave_to_exit()
    return 0


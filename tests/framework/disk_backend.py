"""Disk backends as the launcher makes them (vmm.children.spawn + serve_disk, confined,
seccomp on), for tests and benchmarks that kill one and start the next; and a file
system whose writes can be held, so that a request is deterministically in flight in
a backend when it dies.

HoldableFs is a small ext4 image on a loop device, mounted (root only). While it is
frozen (FIFREEZE) a write into a file on it blocks in the kernel: a backend serving an
image there has popped the request, recorded it in its inflight region, and sits in
pwritev. SIGKILL does not end it until the file system is thawed (FITHAW); the write is
then abandoned or completes, and the process dies before it publishes a completion.
"""

import fcntl
import os
import socket
import subprocess
from pathlib import Path
from typing import Callable

from tests.framework.confined import spawn_under_launcher
from vmm import children
from vmm.devices.virtio.block.main import serve_disk
from vmm.vhost_user.protocol import Connection

FIFREEZE = 0xC0045877              # _IOWR('X', 119, int)
FITHAW = 0xC0045878                # _IOWR('X', 120, int)


def spawn(image: Path, name: str = "vmm-blk-test", read_only: bool = False,
          direct: bool = False, serial: str | None = None,
          before: Callable[[], None] | None = None,
          keep: tuple[int, ...] = (),
          under_launcher: bool = False, num_queues: int = 1,
          engine: str = "auto", limits=None) -> tuple[children.Child, Connection]:
    """A confined virtio-blk backend on `image`, connected to the returned Connection.
    before(): runs in the child first (e.g. redirect its stderr to a kept fd).
    under_launcher: forked by a process under the launcher's filter, as hot-plug and
    restarts fork it (tests/framework/confined.py). engine: its I/O engine
    (vmm/devices/virtio/block/request.py; "auto": io_uring with direct). limits: a
    DevicePage (vmm/virtio/device_page.py) the child inherits, as from the launcher."""
    fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC |
                 (os.O_DIRECT if direct else 0))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)

    def body() -> int:
        if before is not None:
            before()
        return serve_disk(fd, theirs, read_only, direct, serial, True, num_queues, engine,
                          limits)

    try:
        fork = spawn_under_launcher if under_launcher else children.spawn
        child = fork(name, "virtio-blk", [fd, theirs.fileno(), *keep], body)
    finally:
        theirs.close()
        os.close(fd)
    return child, Connection(ours)


class HoldableFs:
    def __init__(self, where: Path, size: int = 64 << 20):
        self.image = where / "fs.ext4"
        self.root = where / "mnt"
        self.root.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop,noatime", str(self.image), str(self.root)],
                       check=True)
        self._dir = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.frozen = False

    def hold(self) -> None:
        """Writes into files here block from now on (FIFREEZE syncs first)."""
        fcntl.ioctl(self._dir, FIFREEZE, 0)
        self.frozen = True

    def release(self) -> None:
        if self.frozen:
            fcntl.ioctl(self._dir, FITHAW, 0)
            self.frozen = False

    def close(self) -> None:
        self.release()
        os.close(self._dir)
        if subprocess.run(["umount", str(self.root)]).returncode != 0:
            subprocess.run(["umount", "-l", str(self.root)], check=True)

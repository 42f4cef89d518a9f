"""The virtio-rng backend process (vmm-rng-<id>), forked by the launcher with the
entropy source open and the device's page (its rate limit) mapped."""

from .... import sandbox
from .. import program
from .device import RngDevice


def serve_rng(source: int, sock, name: str, page, seccomp: bool) -> int:
    """Confined (the virtio-rng profile) before it reads a byte from the vm process or
    the source."""
    program.exit_on_sigterm()
    device = RngDevice(source, page, name)
    sandbox.confine("virtio-rng", seccomp=seccomp)
    program.serve_connection(device, sock)
    return 0

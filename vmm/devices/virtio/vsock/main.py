"""`stratovirt-vhost-user-vsock`: the vsock backend as a program of its own, usable
behind QEMU's `-device vhost-user-vsock-device,chardev=...` (or vhost-user-vsock-pci).

--uds-path is the host side (Firecracker's hybrid convention, muxer.py): it is created
here (mode 0600, must not exist) and removed when the program ends; guest-initiated
streams to port P reach `<uds-path>_P`. The vhost-user side follows the backend
conventions (vmm/devices/virtio/program.py); when a frontend goes, the streams of its
guest are closed.
"""

import json
import logging
import os
import socket


from ....config.limits import GUEST_CID, SOCKET_PATH_BYTES, VSOCK_PORT_SUFFIX_BYTES
from .... import sandbox
from .. import program
from ..listener import bind_private
from .device import VsockDevice
from .muxer import Muxer


def main() -> None:
    """The program (its console script). Its options are click's, imported here only:
    the launcher imports this module for serve_vsock() and needs none of click
    (docs/performance.md)."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--socket-path", type=click.Path(dir_okay=False),
                  help="vhost-user: listen on this unix socket (created; a stale one "
                       "left by a killed backend is replaced).")
    @click.option("--fd", type=int, help="vhost-user: serve this inherited, connected socket.")
    @click.option("--print-capabilities", is_flag=True, help="Print the backend's capabilities.")
    @click.option("--guest-cid", type=click.IntRange(*GUEST_CID),
                  help="The guest's CID (its configuration space).")
    @click.option("--uds-path", type=click.Path(dir_okay=False),
                  help="Host side: host clients connect here and write CONNECT <port>; guest "
                       "connections to port P reach <uds-path>_P (created, mode 0600; must not "
                       "exist).")
    def command(socket_path, fd, print_capabilities, guest_cid, uds_path):
        """vhost-user virtio-vsock backend: guest AF_VSOCK streams bridged to host unix
        sockets."""
        if print_capabilities:
            print(json.dumps({"type": "vsock", "features": []}))
            return
        if (socket_path is None) == (fd is None) or guest_cid is None or not uds_path:
            raise click.UsageError("give --guest-cid, --uds-path and one of --socket-path or --fd")
        longest = len(os.fsencode(os.path.abspath(uds_path))) + VSOCK_PORT_SUFFIX_BYTES
        if longest > SOCKET_PATH_BYTES:
            raise click.UsageError(f"--uds-path: {uds_path}_<port> does not fit a unix socket "
                                   f"path ({SOCKET_PATH_BYTES} bytes)")
        logging.basicConfig(level=logging.INFO, format="vhost-user-vsock: %(message)s")
        try:
            listener = bind_private(uds_path)
        except OSError as error:
            raise click.ClickException(f"--uds-path: {uds_path}: {error.strerror}") from None
        program.exit_on_sigterm()
        try:
            muxer = Muxer(guest_cid, listener, os.path.abspath(uds_path)).start()
            program.serve(lambda: VsockDevice(muxer), socket_path, fd, after_each=muxer.reset)
        finally:
            os.unlink(uds_path)

    command()


def serve_vsock(guest_cid: int, listener: socket.socket, uds_path: str,
                sock: socket.socket, seccomp: bool, restarted: bool = False) -> int:
    """The launcher's entry into the vsock backend process (forked, see vmm/children.py):
    the host socket is bound by the launcher, which removes it. The process is confined
    (the virtio-vsock profile, which alone may create and connect AF_UNIX sockets: the
    guest's streams reach <uds_path>_<port>) before its host thread starts and before it
    reads a byte from the vm process, the guest or a host client. Its empty root holds
    the socket's directory, at the same path, for those streams
    (vmm/sandbox/empty_root.py)."""
    program.exit_on_sigterm()
    muxer = Muxer(guest_cid, listener, uds_path)
    device = VsockDevice(muxer, restarted)
    sandbox.confine("virtio-vsock", seccomp=seccomp, reach=os.path.dirname(uds_path))
    muxer.start()
    program.serve_connection(device, sock)
    return 0

"""`stratovirt-vhost-user-console`: the virtio-console backend as a program of its own.

The console's own socket (--console-socket) is created here (mode 0600, must not
exist) and removed when the program ends; the vhost-user side follows the backend
conventions (vmm/devices/virtio/program.py). QEMU 7.2 has no vhost-user frontend for
a console (its virtio-serial is built in), so the frontends are ours: the vm process,
or tests/framework/virtio_driver.py.
"""

import json
import logging
import os
import socket


from .... import sandbox
from .. import program
from ..listener import bind_private
from .device import ConsoleDevice
from .port import Port


def main() -> None:
    """The program (its console script). Its options are click's, imported here only:
    the launcher imports this module for serve_console() and needs none of click
    (docs/performance.md)."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--socket-path", type=click.Path(dir_okay=False),
                  help="vhost-user: listen on this unix socket (created; a stale one "
                       "left by a killed backend is replaced).")
    @click.option("--fd", type=int, help="vhost-user: serve this inherited, connected socket.")
    @click.option("--print-capabilities", is_flag=True, help="Print the backend's capabilities.")
    @click.option("--console-socket", type=click.Path(dir_okay=False),
                  help="The console's unix socket for its client (created, mode 0600; must "
                       "not exist).")
    @click.option("--name", default="console", show_default=True,
                  help="How messages (and the busy line a second client gets) name it.")
    def command(socket_path, fd, print_capabilities, console_socket, name):
        """vhost-user virtio-console backend: hvc0 in the guest, one client at a time on
        --console-socket; guest output is kept (the newest 64 KiB) while none is connected."""
        if print_capabilities:
            print(json.dumps({"type": "console", "features": []}))
            return
        if (socket_path is None) == (fd is None) or not console_socket:
            raise click.UsageError("give --console-socket and one of --socket-path or --fd")
        logging.basicConfig(level=logging.INFO, format="vhost-user-console: %(message)s")
        try:
            listener = bind_private(console_socket)
        except OSError as error:
            raise click.ClickException(f"--console-socket: {console_socket}: "
                                       f"{error.strerror}") from None
        program.exit_on_sigterm()
        try:
            program.serve(lambda: ConsoleDevice(Port(listener, name).start()), socket_path,
                          fd)
        finally:
            os.unlink(console_socket)

    command()


def serve_console(listener: socket.socket, sock: socket.socket, name: str,
                  seccomp: bool) -> int:
    """The launcher's entry into the console's backend process (forked, see
    vmm/children.py): the console socket is bound by the launcher, which removes it.
    The process is confined (the virtio-console profile) before its port's thread
    starts and before it reads a byte from the vm process, the guest or a client."""
    program.exit_on_sigterm()
    port = Port(listener, name)
    device = ConsoleDevice(port)
    sandbox.confine("virtio-console", seccomp=seccomp)
    port.start()
    program.serve_connection(device, sock)
    return 0

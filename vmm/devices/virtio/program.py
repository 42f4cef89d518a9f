"""What every stand-alone backend program (stratovirt-vhost-user-*) does once its device
exists, by the vhost-user backend conventions (QEMU's vhost-user.rst): serve an
inherited connected socket (--fd) until it closes, or listen on --socket-path for one
frontend at a time (it may reconnect), removing the socket when SIGTERM ends us. The
socket file appears once it listens (listener.py), so a frontend may connect as soon as
it sees the file. A program killed outright leaves its socket file behind: started
again on the same path, it replaces that stale file (QEMU's `reconnect=` then finds it),
but never a socket someone listens on or a file that is not a socket."""

import logging
import os
import signal
import socket
import sys
from typing import Callable

from ...log_limit import guest
from ...vhost_user.backend import Backend, Device
from ...vhost_user.protocol import Connection, ProtocolError
from .listener import listen_unix, remove_stale

log = logging.getLogger(__name__)


def limits_page(options: dict, parse: Callable):
    """A program's rate-limit options (click's values, None when not given) as its
    DevicePage (vmm/virtio/device_page.py), or None when none was given. parse(given),
    given {name: (text, "--name")}, returns the page's limits in slot order, with the
    rules and messages of the command line's throttling.* (vmm/config/ratelimit.py);
    its ConfigError is the program's usage error."""
    import click

    from ...config.errors import ConfigError
    from ...virtio.device_page import DevicePage
    given = {name.replace("_", "-"): (text, "--" + name.replace("_", "-"))
             for name, text in options.items() if text is not None}
    if not given:
        return None
    try:
        return DevicePage(parse(given))
    except ConfigError as error:
        raise click.UsageError(str(error)) from None


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit in the main thread, so `finally` clauses remove what
    the program created."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def serve_connection(device: Device, client: socket.socket) -> None:
    """One frontend, until it disconnects or breaks the protocol."""
    try:
        Backend(device, Connection(client)).serve()
    except (ProtocolError, OSError) as error:
        log.error("frontend connection ended: %s", error)
    finally:
        client.close()
        guest.flush()           # that guest's suppressed lines, summed up (log_limit.py)


def serve(make_device: Callable[[], Device], socket_path: str | None, fd: int | None,
          after_each: Callable[[], None] = lambda: None) -> None:
    """make_device() runs once the socket is ours, so a program refused its socket says
    so in one line, before the device has set anything up (or logged its I/O engine).
    after_each() runs when a frontend goes (a device forgets that guest's state)."""
    if fd is not None:
        serve_connection(make_device(), socket.socket(fileno=fd))
        return
    try:
        remove_stale(socket_path)
        listener = listen_unix(socket_path, 1)
    except OSError as error:
        import click            # the stand-alone programs' (a VM's backends never listen)
        raise click.ClickException(f"--socket-path: {socket_path}: {error.strerror}") from None
    try:
        device = make_device()
        while True:
            client, _ = listener.accept()
            serve_connection(device, client)
            after_each()
    finally:
        os.unlink(socket_path)

"""`stratovirt-vhost-user-net`: the virtio-net backend as a program of its own.

Follows the vhost-user backend conventions (QEMU's vhost-user.rst), so it can stand
behind QEMU's `-netdev vhost-user`: --socket-path to listen (one frontend at a time;
it may reconnect), or --fd for a connected socket inherited from the launcher;
--print-capabilities; SIGTERM ends it and removes the socket. The tap is opened by
name (--tap, which must exist: it is not created) or inherited (--tap-fd).
"""

import json
import logging
import os
import socket


from .... import sandbox
from ....log_limit import guest
from .. import program
from . import tap as T
from .device import NetDevice, format_mac, generated_mac, parse_mac

log = logging.getLogger(__name__)


def main() -> None:
    """The program (its console script). Its options are click's, imported here only:
    the launcher imports this module for serve_nic() and needs none of click
    (docs/performance.md)."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--socket-path", type=click.Path(dir_okay=False),
                  help="Listen on this unix socket (created; a stale one left by a killed "
                       "backend is replaced).")
    @click.option("--fd", type=int, help="Serve this inherited, connected unix socket.")
    @click.option("--print-capabilities", is_flag=True, help="Print the backend's capabilities.")
    @click.option("--tap", "tap_name", help="The existing tap interface to use.")
    @click.option("--tap-fd", type=int,
                  help="An inherited fd of /dev/net/tun attached to a tap with "
                       "IFF_TAP|IFF_NO_PI|IFF_VNET_HDR.")
    @click.option("--mac", help="The MAC address the device offers (default: one derived "
                                "from the tap's name, locally administered).")
    @click.option("--rx-bps", help="Bytes per second delivered to the guest, at most "
                  "(docs/limits.md).")
    @click.option("--rx-pps", help="Frames per second delivered to the guest, at most.")
    @click.option("--tx-bps", help="Bytes per second sent by the guest, at most.")
    @click.option("--tx-pps", help="Frames per second sent by the guest, at most.")
    def command(socket_path, fd, print_capabilities, tap_name, tap_fd, mac, **throttling):
        """vhost-user virtio-net backend on a host tap."""
        if print_capabilities:
            print(json.dumps({"type": "net"}))
            return
        if (socket_path is None) == (fd is None) or (tap_name is None) == (tap_fd is None):
            raise click.UsageError("give one of --tap or --tap-fd, and one of --socket-path "
                                   "or --fd")
        logging.basicConfig(level=logging.INFO, format="vhost-user-net: %(message)s")
        try:
            mac_bytes = parse_mac(mac) if mac else None
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--mac") from None
        from ....config import ratelimit

        def parse(given):
            limits = ratelimit.nic_throttling(given, prefix="--")
            return limits.get("rx"), limits.get("tx")
        limits = program.limits_page(throttling, parse)
        try:
            tap = _inherited_tap(tap_fd) if tap_fd is not None else T.open_tap(tap_name)
            name = T.name_of(tap)
            device = NetDevice(tap, mac_bytes or generated_mac(name), _mtu(name), limits)
        except (T.TapError, OSError) as error:
            raise click.ClickException(str(error)) from None
        log.info("tap %s, MAC %s", name, format_mac(device.mac))
        program.exit_on_sigterm()
        program.serve(lambda: device, socket_path, fd)

    command()


def _mtu(name: str) -> int | None:
    """The tap's MTU, offered to the driver (VIRTIO_NET_F_MTU); None (not offered) for
    an inherited tap in another network namespace, where its name means nothing."""
    try:
        return T.mtu(name)
    except OSError:
        return None


def _inherited_tap(fd: int) -> int:
    T.check_tap_fd(fd)
    os.set_blocking(fd, False)
    return fd


def serve_nic(tap_fd: int, sock: socket.socket, mac: bytes, mtu: int | None,
              seccomp: bool, page=None) -> int:
    """The launcher's entry into a NIC's backend process (forked, see vmm/children.py):
    the tap is already open, the socket already connected. The process is confined
    (the virtio-net profile) before it reads a byte from the vm process or the guest."""
    program.exit_on_sigterm()
    if page is not None:
        guest.count_into(page.guest_errors())       # what the guest got wrong, counted
    device = NetDevice(tap_fd, mac, mtu, page)
    sandbox.confine("virtio-net", seccomp=seccomp)
    program.serve_connection(device, sock)
    return 0


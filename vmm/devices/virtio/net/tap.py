"""A host tap as the virtio-net device sees it: opened with IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR, its vnet header size set to the driver's header, its offloads set to
what the driver can receive.

A tap that does not exist is refused, not created (docs/machine.md, "virtio-net"):
creating one needs CAP_NET_ADMIN and leaves an interface that someone must configure
and delete, which is the host administrator's job. TUNSETIFF on a name that does not
exist would create it, so the name is looked up first, and a tap that still turns out
to be new (it vanished in between) is closed again, which deletes it.
"""

import errno
import fcntl
import os
import socket
import struct

from ...._virtq import lib

TUN_PATH = "/dev/net/tun"
IFREQ = struct.Struct("16sH22x")          # struct ifreq: name, then ifr_flags
IFREQ_MTU = struct.Struct("16si20x")      # name, then ifr_mtu
SIOCGIFMTU = 0x8921                       # <linux/sockios.h>
TAP_FLAGS = lib.IFF_TAP | lib.IFF_NO_PI | lib.IFF_VNET_HDR

# The offloads a driver can take, by what it negotiated (QEMU's mapping): each one
# lets the tap hand over frames with a partial checksum or still to be segmented.
CSUM, TSO4, TSO6, UFO = lib.TUN_F_CSUM, lib.TUN_F_TSO4, lib.TUN_F_TSO6, lib.TUN_F_UFO


class TapError(Exception):
    """The tap cannot be used; the message is the user's line."""


def open_tap(name: str) -> int:
    """A non-blocking, close-on-exec fd attached to the existing tap `name`."""
    if not 0 < len(name.encode()) < lib.IFNAMSIZ:
        raise TapError(f"tap {name!r}: not a valid interface name")
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise TapError(f"tap {name}: no such interface; create it first "
                       f"(ip tuntap add dev {name} mode tap)") from None
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as error:
        raise TapError(f"tap {name}: {TUN_PATH}: {error.strerror}") from None
    try:
        try:
            fcntl.ioctl(fd, lib.TUNSETIFF, IFREQ.pack(name.encode(), TAP_FLAGS))
        except OSError as error:
            raise TapError(f"tap {name}: {_why(error)}") from None
        if not flags(fd) & lib.IFF_PERSIST:
            raise TapError(f"tap {name}: no such interface; create it first "
                           f"(ip tuntap add dev {name} mode tap)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(error: OSError) -> str:
    if error.errno == errno.EINVAL:      # a tun device, or another kind of interface
        return "not a tap device (or one created with other flags, e.g. multi_queue)"
    if error.errno == errno.EBUSY:       # a tap without multi_queue takes one file only
        return "busy: another process holds it"
    if error.errno == errno.EPERM:
        return "permission denied: the tap belongs to another user or group"
    return error.strerror


def flags(fd: int) -> int:
    return IFREQ.unpack(fcntl.ioctl(fd, lib.TUNGETIFF, bytes(IFREQ.size)))[1]


def name_of(fd: int) -> str:
    raw = IFREQ.unpack(fcntl.ioctl(fd, lib.TUNGETIFF, bytes(IFREQ.size)))[0]
    return raw.split(b"\0", 1)[0].decode()


def check_tap_fd(fd: int) -> None:
    """For an fd handed to us (--tap-fd): a tap opened with a vnet header."""
    try:
        got = flags(fd)
    except OSError as error:
        raise TapError(f"tap fd {fd}: not a tap ({error.strerror})") from None
    if got & TAP_FLAGS != TAP_FLAGS:
        raise TapError(f"tap fd {fd}: opened without IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")


def mtu(name: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        return IFREQ_MTU.unpack(fcntl.ioctl(s, SIOCGIFMTU, IFREQ_MTU.pack(name.encode(), 0)))[1]


def set_offloads(fd: int, offloads: int) -> None:
    fcntl.ioctl(fd, lib.TUNSETOFFLOAD, offloads)


def supported_offloads(fd: int) -> int:
    """Which of CSUM, TSO4, TSO6, UFO the tap's kernel accepts (UFO went away in 4.14 and
    came back in 4.18, for example). Leaves the tap with no offloads set."""
    supported = 0
    for offload in (CSUM, CSUM | TSO4, CSUM | TSO6, CSUM | UFO):
        try:
            set_offloads(fd, offload)
            supported |= offload
        except OSError:
            pass
    set_offloads(fd, 0)
    return supported


def set_header_size(fd: int, size: int) -> None:
    fcntl.ioctl(fd, lib.TUNSETVNETHDRSZ, struct.pack("i", size))

"""File descriptors the caller passed (StratoVirt 2.x's `fds=` and `vhostfd=`; Kata hands
its child extra files, numbered from 3): checked at configuration time, so a number
that is not open, or names the wrong kind of file, is one error line before anything
starts. The launcher then gives each to the one process that needs it and closes its
own copy (docs/configuration.md, "Inherited file descriptors")."""

import fcntl
import os
import stat

from .draft import Setting
from .errors import ConfigError
from .values import show

FIRST = 3          # 0, 1 and 2 are stdio, never a device's


def parse_fds(fds: Setting) -> int:
    """`fds=FD[:FD...]` of a tap: one fd, since a NIC here has one queue pair."""
    parts = fds.value.split(":")
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ConfigError(fds.where, f"{show(fds.value)} is not a list of file descriptors",
                          "write fds=FD[:FD...], each a decimal number")
    if len(parts) > 1:
        raise ConfigError(fds.where, f"{len(parts)} file descriptors given",
                          "give one: a NIC has one queue pair here (one tap queue)")
    return int(parts[0])


def open_fd(setting: Setting, what: str) -> int:
    """The number must be an open descriptor beyond stdio."""
    number = setting.value
    if number < FIRST:
        raise ConfigError(setting.where, f"{number} is stdio, not a {what}",
                          f"pass the {what} as an extra file, numbered from {FIRST}")
    try:
        os.fstat(number)
    except OSError:
        raise ConfigError(setting.where, f"{number} is not an open file descriptor",
                          f"start stratovirt with the {what} open as fd {number}") from None
    return number


def tap(setting: Setting) -> str:
    """A tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR: its interface's name."""
    from ..devices.virtio.net import tap as T
    fd = open_fd(setting, "tap")
    try:
        T.check_tap_fd(fd)
        return T.name_of(fd)
    except (T.TapError, OSError) as error:
        raise ConfigError(setting.where, f"fd {fd} cannot be the NIC's tap: {error}",
                          "pass a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR") from None


# The kernel's VHOST_VSOCK_MINOR, on the misc major (include/linux/miscdevice.h).
VHOST_VSOCK_DEVICE = (10, 241)


def vhost_vsock(setting: Setting) -> int:
    """An open /dev/vhost-vsock (Kata's vhostfd=): the descriptor, checked."""
    fd = open_fd(setting, "vhost-vsock device")
    info = os.fstat(fd)
    if not (stat.S_ISCHR(info.st_mode) and
            (os.major(info.st_rdev), os.minor(info.st_rdev)) == VHOST_VSOCK_DEVICE):
        raise ConfigError(setting.where, f"fd {fd} is not /dev/vhost-vsock",
                          "pass /dev/vhost-vsock open for reading and writing")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
        raise ConfigError(setting.where, f"fd {fd} is /dev/vhost-vsock, not open for reading "
                          "and writing", "open it with O_RDWR")
    return fd

"""Checks of host paths that have no side effects: nothing is created or changed.

Files the VM will use must exist and open the way the VM will open them; paths the
VMM will create (sockets, the pidfile) must not exist yet and must be creatable.
"""

import os
import stat
from pathlib import Path

from .draft import Setting
from .errors import ConfigError
from .limits import SOCKET_PATH_BYTES, VSOCK_PORT_SUFFIX_BYTES, VSOCK_SUFFIX
from .values import show


def absolute(setting: Setting) -> Path:
    if not setting.value:
        raise ConfigError(setting.where, "is empty", "give a path")
    return Path(os.path.abspath(setting.value))


def existing_file(setting: Setting, what: str, writable: bool = False,
                  block_ok: bool = False) -> os.stat_result:
    """The file must exist, be a regular file (or a block device where block_ok),
    and open for reading, and for writing too when `writable`."""
    path = absolute(setting)
    kinds = "regular file or block device" if block_ok else "regular file"
    try:
        info = os.stat(path)
    except OSError as error:
        raise ConfigError(setting.where, f"{what} {show(str(path))}: {error.strerror}",
                          f"give an existing {kinds}") from None
    if not (stat.S_ISREG(info.st_mode) or (block_ok and stat.S_ISBLK(info.st_mode))):
        raise ConfigError(setting.where, f"{what} {show(str(path))} is not a {kinds}",
                          f"give a {kinds}")
    mode, access = (os.O_RDWR, "read and write") if writable else (os.O_RDONLY, "read")
    try:
        os.close(os.open(path, mode | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as error:
        hint = "make it writable or set it read-only" if writable else "make it readable"
        raise ConfigError(setting.where,
                          f"cannot {access} {what} {show(str(path))}: {error.strerror}",
                          hint) from None
    return info


def entropy_source(setting: Setting) -> Path:
    """virtio-rng's source: a readable character device (/dev/urandom, /dev/random,
    /dev/hwrng). A regular file would run dry, and a guest would then wait forever."""
    path = absolute(setting)
    try:
        info = os.stat(path)
    except OSError as error:
        raise ConfigError(setting.where, f"entropy source {show(str(path))}: {error.strerror}",
                          "give a character device such as /dev/urandom") from None
    if not stat.S_ISCHR(info.st_mode):
        raise ConfigError(setting.where, f"entropy source {show(str(path))} is not a "
                          "character device", "give a character device such as /dev/urandom")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as error:
        raise ConfigError(setting.where, f"cannot read entropy source {show(str(path))}: "
                          f"{error.strerror}", "make it readable") from None
    return path


def supports_direct_io(setting: Setting) -> None:
    """O_DIRECT is refused by some filesystems (tmpfs): find out now, not at boot."""
    path = absolute(setting)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as error:
        raise ConfigError(setting.where,
                          f"{show(str(path))} cannot be opened with O_DIRECT: {error.strerror}",
                          "put it on a filesystem that supports O_DIRECT, or set direct=false"
                          ) from None


def new_path(setting: Setting, what: str, socket: bool = False) -> Path:
    """A path the VMM will create: it must not exist and its directory must."""
    path = absolute(setting)
    if os.path.lexists(path):
        raise ConfigError(setting.where, f"{what} {show(str(path))} already exists",
                          f"remove it first (rm -f {show(str(path))}) or choose another path")
    _directory_of(path, setting, what)
    if socket and len(os.fsencode(path)) > SOCKET_PATH_BYTES:
        raise ConfigError(setting.where,
                          f"socket path {show(str(path))} is {len(os.fsencode(path))} bytes",
                          f"a unix socket path is at most {SOCKET_PATH_BYTES} bytes")
    return path


def vsock_socket(vsock_id: Setting, api_channel: Setting) -> Path:
    """The vsock device's host socket, which the StratoVirt configuration has no key for:
    `<directory of the api-channel>/<vsock id>.vsock`. It must not exist, and it and
    `<it>_<port>` (the sockets guest-initiated streams reach) must fit sun_path."""
    path = absolute(api_channel).parent / f"{vsock_id.value}{VSOCK_SUFFIX}"
    if os.path.lexists(path):
        raise ConfigError(vsock_id.where, f"the vsock socket {show(str(path))} (the "
                          "api-channel's directory, the vsock id) already exists",
                          f"remove it first (rm -f {show(str(path))}) or choose another id")
    size = len(os.fsencode(path)) + VSOCK_PORT_SUFFIX_BYTES
    if size > SOCKET_PATH_BYTES:
        raise ConfigError(vsock_id.where, f"the vsock sockets {show(str(path))}_<port> "
                          f"take up to {size} bytes",
                          f"a unix socket path is at most {SOCKET_PATH_BYTES} bytes: put the "
                          "api-channel in a shorter directory or use a shorter vsock id")
    return path


def log_path(setting: Setting) -> Path:
    """The log file is appended to if it exists, else created."""
    path = absolute(setting)
    if not os.path.lexists(path):
        _directory_of(path, setting, "log file")
        return path
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as error:
        raise ConfigError(setting.where, f"log file {show(str(path))}: {error.strerror}",
                          "give a regular file or a new path") from None
    if not regular:
        raise ConfigError(setting.where, f"log file {show(str(path))} is not a regular file",
                          "give a regular file or a new path")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
    except OSError as error:
        raise ConfigError(setting.where, f"cannot write log file {show(str(path))}: "
                          f"{error.strerror}", "give a writable file") from None
    return path


def metrics_path(setting: Setting) -> Path:
    """The metrics file is replaced (a new file renamed over it) every few seconds: its
    directory must exist and be writable; what is there may only be a regular file."""
    path = absolute(setting)
    _directory_of(path, setting, "metrics file")
    if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
        raise ConfigError(setting.where, f"metrics file {show(str(path))} is not a regular file",
                          "give a regular file or a new path")
    return path


def _directory_of(path: Path, setting: Setting, what: str) -> None:
    if not os.path.isdir(path.parent):
        raise ConfigError(setting.where,
                          f"the directory of {what} {show(str(path))} does not exist",
                          "create the directory first or choose another path")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(setting.where,
                          f"cannot create {what} in {show(str(path.parent))}",
                          "choose a writable directory")

"""Listening unix sockets for the device backends: the console's and the vsock device's
host sockets, and a stand-alone backend's vhost-user socket.

The path appears only once the socket listens: it is bound under a temporary name in
the same directory, set listening, then hard-linked to its path (which fails, rather
than replacing anything, if the path exists) and the temporary name removed. A client
that waits for the file to appear (QEMU, a test, a script) is never refused by a socket
that is bound but not yet listening.
"""

import errno
import os
import socket
import stat

SUN_PATH_MAX = 107


def listen_unix(path: str, backlog: int = 16, private: bool = False) -> socket.socket:
    """private: mode 0600 from the start (bound under umask 0177: no other user can
    connect in between). OSError as bind raises it (EADDRINUSE when the path exists)."""
    # os.urandom, as secrets.token_hex is, without secrets' import of OpenSSL (hashlib).
    temporary = os.path.join(os.path.dirname(os.path.abspath(path)),
                             f".bind-{os.getpid()}-{os.urandom(4).hex()}")
    if len(os.fsencode(temporary)) > SUN_PATH_MAX:
        temporary = None                     # no room: bind the path itself
    if os.path.lexists(path):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177) if private else None
    try:
        listener.bind(temporary or path)
        listener.listen(backlog)
        if temporary:
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path) from None
            finally:
                os.unlink(temporary)
    except OSError:
        listener.close()
        raise
    finally:
        if old is not None:
            os.umask(old)
    return listener


def remove_stale(path: str) -> None:
    """A socket file that no one listens on any more (its program was killed: connect()
    is refused) is removed, so that a restarted program can listen on the same path.
    OSError for a path that is there and must stay: a socket someone listens on
    (EADDRINUSE), or anything that is not a socket (EEXIST)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket", path)
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                          socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass                                  # listening, its backlog full
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a program is listening on it", path)


def bind_private(path: str, backlog: int = 16) -> socket.socket:
    """The console's and the vsock device's host sockets: only their owner may connect."""
    return listen_unix(path, backlog, private=True)


def adopt(fd: int) -> socket.socket:
    """A listening socket handed to a backend process by number (the launcher's kept
    copy, the same in a first and in a restarted backend). Family and type are given:
    left out, Python asks the kernel (getsockopt), which a restarted backend, still
    under the launcher's filter, may not."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)

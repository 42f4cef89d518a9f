"""Framing between `stratovirt` and the zygote: one marshal-encoded value per
SOCK_SEQPACKET datagram, file descriptors as SCM_RIGHTS.

The messages: the request (a dict: argv, env, fds, started; the fds are the caller's
cwd and then its inherited fds), the answer ({"ready": launcher pid} or {"refused":
why}), and, when the launcher has ended, its exit status (negative: the signal that
killed it) as a bare int: that last one is read by the stand-in, a C program
(native/standin.c), which decodes marshal's TYPE_INT and nothing else.

marshal, not msgpack (vmm/control.py) or json: the client side is on every VM's start
path and imports nothing it can avoid (msgpack's import alone is ~2 ms, json's ~4 ms).
The zygote decodes only what a peer with its own uid sent (checked before the read).
"""

import _socket
import array
import marshal
import os

MAX_BYTES = 1 << 20             # argv and environment; Linux's own ARG_MAX is 2 MiB
MAX_FDS = 250                   # SCM_MAX_FD is 253
_FD_BYTES = array.array("i").itemsize


class WireError(Exception):
    pass


def socket():
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)


def send(sock, message: dict | int, fds: list[int] = ()) -> None:
    data = marshal.dumps(message)
    if len(data) > MAX_BYTES:
        raise WireError(f"message of {len(data)} bytes is over {MAX_BYTES}")
    if len(fds) > MAX_FDS:
        raise WireError(f"{len(fds)} file descriptors are over {MAX_FDS}")
    ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def receive(sock) -> tuple[dict | int, list[int]] | None:
    """One message and its fds (open, not close-on-exec), or None at the peer's end."""
    data, ancillary, flags, _ = sock.recvmsg(MAX_BYTES, _socket.CMSG_SPACE(MAX_FDS * _FD_BYTES))
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % _FD_BYTES])
    if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise WireError("message or its fds truncated")
    if not data:
        return None
    try:
        message = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        message = None
    if not isinstance(message, (dict, int)):
        for fd in fds:
            os.close(fd)
        raise WireError("not a message")
    return message, list(fds)

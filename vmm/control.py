"""Framing of the internal control messages between the VMM's own processes.

One message is one msgpack-encoded map in one SOCK_SEQPACKET datagram, with file
descriptors riding along as SCM_RIGHTS. Nothing else in the project packs these bytes.

The vm process sends the launcher events ({"event": ...}) and requests for the broker
({"op": ..., "seq": n}, vmm/broker.py), each answered by {"seq": n, "ok": {...}} or
{"seq": n, "error": "..."}. The launcher sends events of its own about backends
({"event": "restarted", "slot", "device", "count", "reason"} with the new backend's
socket; {"event": "backend-failed", "slot", "device", "reason"}), at any time, so also
between a request and its reply.
"""

import array
import os
import socket
import threading
from collections import deque

import msgpack

MAX_MESSAGE_BYTES = 64 * 1024
MAX_FDS = 16
_FD_BYTES = array.array("i").itemsize


class ControlError(Exception):
    pass


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ControlError(f"control message of {len(data)} bytes is too large")
    socket.send_fds(sock, [data], list(fds))


def receive(sock: socket.socket, flags: int = 0) -> tuple[dict, list[int]] | None:
    """The next message and its fds, or None when the peer has closed the channel
    (BlockingIOError with MSG_DONTWAIT in `flags` and nothing there). recvmsg, not
    socket.recv_fds: Python 3.11's drops its `flags` argument, so it always blocks.
    A peer that died with our messages unread resets a SEQPACKET channel: that is its
    end too, not an error."""
    try:
        data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES,
                                                 socket.CMSG_LEN(MAX_FDS * _FD_BYTES), flags)
    except ConnectionResetError:
        return None
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[:len(payload) - len(payload) % _FD_BYTES])
    fds = list(fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ControlError("truncated control message")
    if not data:
        return None
    try:
        message = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError) as error:      # msgpack's errors are ValueErrors
        for fd in fds:
            os.close(fd)
        raise ControlError(f"malformed control message: {error}") from None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise ControlError("control message is not a map")
    return message, fds


class Refused(Exception):
    """The launcher refused a request; the message is its reason."""


class Requester:
    """The vm process's side of the channel: requests to the broker, one at a time, each
    answered before the next is sent (the launcher serves them in order); and the
    launcher's own events, which ask() sets aside when they come before its reply."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._lock = threading.Lock()
        self._seq = 0
        self._events: deque[tuple[dict, list[int]]] = deque()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def events(self) -> list[tuple[dict, list[int]]]:
        """The launcher's events so far (those set aside, then those waiting); the
        caller owns their fds. ControlError for garbage, which is dropped."""
        with self._lock:
            while True:
                try:
                    received = receive(self._sock, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if received is None:
                    break
                self._events.append(received)
            taken, self._events = list(self._events), deque()
        return taken

    def ask(self, op: str, fds: tuple[int, ...] = (), **fields) -> tuple[dict, list[int]]:
        with self._lock:
            self._seq += 1
            send(self._sock, {"op": op, "seq": self._seq, **fields}, fds)
            while True:
                received = receive(self._sock)
                if received is None:
                    raise ControlError("the launcher closed the control channel")
                if "event" not in received[0]:
                    break
                self._events.append(received)
            reply, reply_fds = received
            if reply.get("seq") != self._seq:
                for fd in reply_fds:
                    os.close(fd)
                raise ControlError(f"reply {reply.get('seq')!r} to request {self._seq}")
            if "error" in reply:
                for fd in reply_fds:
                    os.close(fd)
                raise Refused(str(reply["error"]))
            return reply.get("ok") or {}, reply_fds

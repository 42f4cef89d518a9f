"""vhost-user message framing (QEMU's docs/interop/vhost-user.rst), for both sides.

A message is a 12-byte header (request, flags, payload size) and a payload; file
descriptors travel as SCM_RIGHTS on the same sendmsg. Payload layouts are the
`struct`s below. Nothing else in the project packs vhost-user bytes.
"""

import os
import socket
import struct
from dataclasses import dataclass

VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096
MAX_FDS = 8

# Front-end requests.
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_LOG_BASE, SET_LOG_FD = 6, 7
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
GET_MAX_MEM_SLOTS = 36

NAMES = {number: name for name, number in (
    ("GET_FEATURES", 1), ("SET_FEATURES", 2), ("SET_OWNER", 3), ("RESET_OWNER", 4),
    ("SET_MEM_TABLE", 5), ("SET_LOG_BASE", 6), ("SET_LOG_FD", 7), ("SET_VRING_NUM", 8),
    ("SET_VRING_ADDR", 9), ("SET_VRING_BASE", 10), ("GET_VRING_BASE", 11),
    ("SET_VRING_KICK", 12), ("SET_VRING_CALL", 13), ("SET_VRING_ERR", 14),
    ("GET_PROTOCOL_FEATURES", 15), ("SET_PROTOCOL_FEATURES", 16), ("GET_QUEUE_NUM", 17),
    ("SET_VRING_ENABLE", 18), ("GET_CONFIG", 24), ("SET_CONFIG", 25),
    ("GET_INFLIGHT_FD", 31), ("SET_INFLIGHT_FD", 32), ("GET_MAX_MEM_SLOTS", 36))}

# Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_INFLIGHT_SHMFD = 12

# Virtio feature bit 30 in GET_FEATURES: the backend speaks protocol features.
F_PROTOCOL_FEATURES = 1 << 30
F_EVENT_IDX = 1 << 29                # VIRTIO_RING_F_EVENT_IDX, a ring feature the backend acts on

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")                 # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")              # index, flags, desc, used, avail, log
MEM_TABLE_HEADER = struct.Struct("<II")            # num_regions, padding
MEM_REGION = struct.Struct("<QQQQ")                # gpa, size, userspace address, mmap offset
CONFIG_HEADER = struct.Struct("<III")              # offset, size, flags
INFLIGHT = struct.Struct("<QQHH")                  # mmap size, mmap offset, queues, queue size
INFLIGHT_PAYLOAD = 24                              # QEMU's sizeof(VhostUserInflight): padded
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is no longer usable."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def name(self) -> str:
        return NAMES.get(self.request, str(self.request))

    def u64(self) -> int:
        return self._unpack(U64)[0]

    def vring_state(self) -> tuple[int, int]:
        return self._unpack(VRING_STATE)

    def inflight(self) -> "Inflight":
        """GET/SET_INFLIGHT_FD's payload; the fd (SET's, or a reply's) is not in it.
        QEMU sends and expects 24 bytes (the struct's padding); 20 are enough."""
        if not INFLIGHT.size <= len(self.payload) <= INFLIGHT_PAYLOAD:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"{INFLIGHT.size}..{INFLIGHT_PAYLOAD} expected")
        return Inflight(-1, *INFLIGHT.unpack_from(self.payload))

    def _unpack(self, layout: struct.Struct) -> tuple:
        if len(self.payload) < layout.size:
            raise ProtocolError(f"{self.name}: payload of {len(self.payload)} bytes, "
                                f"{layout.size} expected")
        return layout.unpack_from(self.payload)


@dataclass(frozen=True)
class MemoryRegion:
    guest_address: int
    size: int
    user_address: int
    mmap_offset: int


@dataclass
class Inflight:
    """An inflight region (vhost-user's "Inflight I/O tracking"): the memfd the backend
    made at GET_INFLIGHT_FD and where the queues' parts are in it. Whoever holds one owns
    the fd (close() it when dropping the region); the frontend hands it back with
    SET_INFLIGHT_FD to every backend it starts for the same device."""
    fd: int
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues,
                             self.queue_size).ljust(INFLIGHT_PAYLOAD, b"\0")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_mem_table(payload: bytes) -> list[MemoryRegion]:
    if len(payload) < MEM_TABLE_HEADER.size:
        raise ProtocolError("SET_MEM_TABLE: short payload")
    count, _ = MEM_TABLE_HEADER.unpack_from(payload)
    if not 1 <= count <= MAX_FDS or len(payload) < MEM_TABLE_HEADER.size + count * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: {count} regions")
    return [MemoryRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size))
            for i in range(count)]


def pack_mem_table(regions: list[MemoryRegion]) -> bytes:
    return MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(
        MEM_REGION.pack(r.guest_address, r.size, r.user_address, r.mmap_offset) for r in regions)


class Connection:
    """One end of a vhost-user socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def receive(self) -> Message | None:
        """The next message, or None at end of stream."""
        header, fds, flags, _ = socket.recv_fds(self.sock, HEADER.size, MAX_FDS)
        if not header:
            return None
        if len(header) < HEADER.size or flags & socket.MSG_CTRUNC:
            _close(fds)
            raise ProtocolError("truncated vhost-user header")
        request, msg_flags, size = HEADER.unpack(header)
        if msg_flags & 0x3 != VERSION or size > MAX_PAYLOAD:
            _close(fds)
            raise ProtocolError(f"bad header: request {request} flags {msg_flags:#x} size {size}")
        payload = b""
        while len(payload) < size:
            chunk = self.sock.recv(size - len(payload))
            if not chunk:
                _close(fds)
                raise ProtocolError("connection closed inside a message")
            payload += chunk
        return Message(request, msg_flags, payload, list(fds))

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             flags: int = 0) -> None:
        data = HEADER.pack(request, VERSION | flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def reply(self, message: Message, payload: bytes, fds: tuple[int, ...] = ()) -> None:
        self.send(message.request, payload, fds, flags=FLAG_REPLY)

    def close(self) -> None:
        self.sock.close()


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)

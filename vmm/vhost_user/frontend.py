"""The frontend side of vhost-user: what our vm process (and the benchmark's host-side
driver) says to a backend to hand it guest RAM and the rings of a device.

Every request that has no reply of its own is sent with NEED_REPLY when the backend
offers REPLY_ACK, so a refused request is an error here, not a silent hang later.

A disk's backend that may die and be replaced keeps nothing the frontend cannot give
the next one, except which requests it had taken and not completed: that is the
inflight region (get_inflight_fd once, from the first backend; set_inflight_fd to every
backend, before its rings start), which the caller keeps for the device's lifetime.
"""

from dataclasses import dataclass

from . import protocol as P
from .protocol import Inflight

__all__ = ["BackendError", "Frontend", "Inflight", "RingAddresses", "WANTED_PROTOCOL_FEATURES"]

WANTED_PROTOCOL_FEATURES = (1 << P.PROTOCOL_F_MQ) | (1 << P.PROTOCOL_F_REPLY_ACK) | \
    (1 << P.PROTOCOL_F_CONFIG) | (1 << P.PROTOCOL_F_INFLIGHT_SHMFD)


class BackendError(Exception):
    pass


@dataclass(frozen=True)
class RingAddresses:
    desc: int             # addresses in the frontend's own address space, as the
    avail: int            # protocol wants them (the backend translates them through
    used: int             # the memory table's userspace addresses)


class Frontend:
    def __init__(self, connection: P.Connection):
        self.connection = connection
        self.features = 0
        self.protocol_features = 0

    def _request(self, request: int, payload: bytes = b"", fds=(), expect_reply=False) -> bytes | None:
        reply = self._exchange(request, payload, fds, expect_reply)
        if reply is None:
            return None
        P._close(reply.fds)
        return reply.payload

    def _exchange(self, request: int, payload: bytes, fds, expect_reply: bool) -> P.Message | None:
        """Send a request; its reply (with any fds, which the caller then owns) or its
        acknowledgement (None)."""
        ack = not expect_reply and self.protocol_features & (1 << P.PROTOCOL_F_REPLY_ACK)
        self.connection.send(request, payload, fds, P.FLAG_NEED_REPLY if ack else 0)
        if not (expect_reply or ack):
            return None
        reply = self.connection.receive()
        if reply is None:
            raise BackendError(f"{P.NAMES[request]}: the backend closed the connection")
        if reply.request != request or not reply.flags & P.FLAG_REPLY:
            P._close(reply.fds)
            raise BackendError(f"{P.NAMES[request]}: unexpected reply {reply.name}")
        if ack:
            P._close(reply.fds)
            if reply.u64() != 0:
                raise BackendError(f"{P.NAMES[request]}: the backend refused it")
            return None
        return reply

    def negotiate(self, wanted_features: int) -> int:
        """Feature negotiation; returns the features both sides have."""
        offered = P.U64.unpack(self._request(P.GET_FEATURES, expect_reply=True))[0]
        if offered & P.F_PROTOCOL_FEATURES:
            theirs = P.U64.unpack(self._request(P.GET_PROTOCOL_FEATURES, expect_reply=True))[0]
            self._request(P.SET_PROTOCOL_FEATURES, P.U64.pack(theirs & WANTED_PROTOCOL_FEATURES))
            self.protocol_features = theirs & WANTED_PROTOCOL_FEATURES
        self._request(P.SET_OWNER)
        self.features = offered & (wanted_features | P.F_PROTOCOL_FEATURES)
        return self.features

    def set_features(self, features: int) -> None:
        self._request(P.SET_FEATURES, P.U64.pack(features | (self.features & P.F_PROTOCOL_FEATURES)))

    @property
    def supports_inflight(self) -> bool:
        """Both sides have INFLIGHT_SHMFD: the backend can record what it has in flight."""
        return bool(self.protocol_features & (1 << P.PROTOCOL_F_INFLIGHT_SHMFD))

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> Inflight:
        """A new, empty inflight region from the backend, for num_queues queues of up to
        queue_size descriptors. The caller owns it (and its fd) from now on."""
        request = Inflight(-1, 0, 0, num_queues, queue_size)
        reply = self._exchange(P.GET_INFLIGHT_FD, request.pack(), (), expect_reply=True)
        try:
            region = reply.inflight()
        except P.ProtocolError as error:
            P._close(reply.fds)
            raise BackendError(str(error)) from None
        if region.mmap_size == 0 or len(reply.fds) != 1:
            P._close(reply.fds)
            raise BackendError("GET_INFLIGHT_FD: the backend gave no region")
        # As QEMU does: the sizes are ours, where the parts are is the backend's.
        return Inflight(reply.fds[0], region.mmap_size, region.mmap_offset, num_queues,
                        queue_size)

    def set_inflight_fd(self, inflight: Inflight) -> None:
        """Hand the region to this backend (before its rings start): what it finds in
        flight there, it resubmits. The fd stays the caller's."""
        self._request(P.SET_INFLIGHT_FD, inflight.pack(), (inflight.fd,))

    def get_config(self, size: int) -> bytes:
        reply = self._request(P.GET_CONFIG, P.CONFIG_HEADER.pack(0, size, 0) + bytes(size),
                              expect_reply=True)
        return reply[P.CONFIG_HEADER.size:]

    def set_mem_table(self, regions: list[P.MemoryRegion], fds: list[int]) -> None:
        self._request(P.SET_MEM_TABLE, P.pack_mem_table(regions), tuple(fds))

    def start_ring(self, index: int, num: int, addresses: RingAddresses, base: int,
                   kick_fd: int, call_fd: int) -> None:
        self._request(P.SET_VRING_NUM, P.VRING_STATE.pack(index, num))
        self._request(P.SET_VRING_BASE, P.VRING_STATE.pack(index, base))
        self._request(P.SET_VRING_ADDR, P.VRING_ADDR.pack(index, 0, addresses.desc,
                                                          addresses.used, addresses.avail, 0))
        self._request(P.SET_VRING_KICK, P.U64.pack(index), (kick_fd,))
        self._request(P.SET_VRING_CALL, P.U64.pack(index), (call_fd,))
        if self.features & P.F_PROTOCOL_FEATURES:
            self._request(P.SET_VRING_ENABLE, P.VRING_STATE.pack(index, 1))

    def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and says where it stopped."""
        reply = self._request(P.GET_VRING_BASE, P.VRING_STATE.pack(index, 0), expect_reply=True)
        return P.VRING_STATE.unpack_from(reply)[1]

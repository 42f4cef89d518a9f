"""One vsock stream: a guest port bridged to a host unix socket, with the credit
accounting of virtio 1.2, 5.10.6.3.

Each side tells the other how much it may send: `buf_alloc` (its receive buffer) and
`fwd_cnt` (bytes it has consumed so far, mod 2^32), carried in every packet. The
sender keeps `tx_cnt` (bytes sent) and may have at most buf_alloc - (tx_cnt - fwd_cnt)
bytes in flight.

Guest -> host: our receive buffer is `pending`, the guest's bytes the host socket has
not taken yet; fwd_cnt counts bytes written to the host socket. A guest that sends
more than its credit breaks the protocol, and the stream is reset.

Host -> guest: we read the host socket only while the guest has credit for it, so a
guest that reads slowly stops the reads here and the host writer's socket fills.
"""

import socket
import time

from .packet import SHUTDOWN_RCV, SHUTDOWN_SEND, U32

CONNECTING = "connecting"      # host-initiated: REQUEST sent, the guest has not answered
ESTABLISHED = "established"


class Connection:
    def __init__(self, host_port: int, guest_port: int, sock: socket.socket, state: str,
                 buf_alloc: int, deadline: float | None = None):
        self.host_port = host_port
        self.guest_port = guest_port
        self.sock = sock
        self.state = state
        self.deadline = deadline            # when a CONNECTING or draining stream gives up
        self.closed = False
        # guest -> host
        self.buf_alloc = buf_alloc
        self.pending = bytearray()
        self.fwd_cnt = 0
        self.advertised = 0                 # the fwd_cnt the guest last heard of
        self.credit_owed = False            # a CREDIT_UPDATE is queued
        self.guest_shutdown = 0             # SHUTDOWN flags the guest sent
        self.write_shut = False             # the host socket's write side is shut
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.readable = False               # the host socket has data or EOF not taken yet
        self.queued = False                 # in the muxer's round-robin of readable streams
        self.host_eof = False

    @property
    def key(self) -> tuple[int, int]:
        return self.host_port, self.guest_port

    def peer_credit(self) -> int:
        """How many bytes the guest can take now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def free(self) -> int:
        """How many more bytes of the guest's we have room for."""
        return self.buf_alloc - len(self.pending)

    def unadvertised(self) -> int:
        return (self.fwd_cnt - self.advertised) & U32

    def wants_read(self) -> bool:
        """Whether the host socket should be polled for data for the guest."""
        return (self.state == ESTABLISHED and not self.readable and not self.host_eof
                and not self.guest_shutdown & SHUTDOWN_RCV and self.peer_credit() > 0)

    def can_send_to_guest(self) -> bool:
        return (self.state == ESTABLISHED and not self.guest_shutdown & SHUTDOWN_RCV
                and self.peer_credit() > 0)

    def wants_write(self) -> bool:
        return bool(self.pending) and not self.write_shut

    def shut_write_if_done(self) -> None:
        """After the guest's SHUTDOWN(SEND), the host reader sees its end of stream once
        everything the guest sent has been written."""
        if self.guest_shutdown & SHUTDOWN_SEND and not self.pending and not self.write_shut:
            self.write_shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    @staticmethod
    def deadline_in(seconds: float) -> float:
        return time.monotonic() + seconds

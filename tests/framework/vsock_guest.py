"""A guest's vsock stack in miniature, over tests/framework/virtio_queues.py: enough of
what Linux's virtio_transport does (connect, listen, credit-based send and receive,
shutdown, RST) for host tests of our vsock backend, plus raw packets for hostile ones.

Single-threaded: nothing happens until a call pumps the rx ring. Receive buffers are
laid out as Linux 6.1 posts them (header and payload in two descriptors) or as one
buffer (Linux 6.2+), to exercise both.
"""

import time
from collections import deque

from tests.framework.virtio_queues import QueueDriver
from vmm.devices.virtio.vsock.packet import (HEADER_SIZE, HOST_CID, OP_CREDIT_REQUEST,
                                             OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
                                             OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
                                             SHUTDOWN_SEND, TYPE_STREAM, U32, Header)

RX, TX, EVENT = 0, 1, 2
RX_BUF = 4096           # Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE
GUEST_BUF_ALLOC = 256 << 10


class Reset(Exception):
    """The peer reset the stream (or refused it)."""


class GuestStream:
    def __init__(self, vsock: "GuestVsock", guest_port: int, host_port: int):
        self.vsock = vsock
        self.guest_port = guest_port
        self.host_port = host_port
        self.state = "connecting"
        self.buf_alloc = GUEST_BUF_ALLOC
        self.fwd_cnt = 0                 # bytes the "application" consumed
        self.advertised = 0
        self.data = bytearray()          # received, not consumed
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_shutdown = 0
        self.reset = False

    def credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & U32)

    def packet(self, op: int, payload: bytes = b"", flags: int = 0, **overrides) -> None:
        fields = dict(src_cid=self.vsock.cid, dst_cid=HOST_CID, src_port=self.guest_port,
                      dst_port=self.host_port, len=len(payload), type=TYPE_STREAM, op=op,
                      flags=flags, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt)
        fields.update(overrides)
        self.advertised = self.fwd_cnt
        self.vsock.send(Header(**fields), payload)

    def send(self, data: bytes, chunk: int = RX_BUF, timeout: float = 30) -> None:
        """Within the host's credit, waiting for credit updates as Linux does."""
        offset = 0
        deadline = time.monotonic() + timeout
        while offset < len(data):
            self._check()
            room = min(self.credit(), chunk, len(data) - offset)
            if room <= 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no credit to send after {offset} bytes")
                self.vsock.pump(deadline - time.monotonic())
                continue
            self.packet(OP_RW, data[offset:offset + room])
            self.tx_cnt = (self.tx_cnt + room) & U32
            offset += room
            self.vsock.pump(0)

    def consume(self, count: int | None = None) -> bytes:
        """The application reads: credit goes back to the host when it adds up."""
        count = len(self.data) if count is None else min(count, len(self.data))
        taken = bytes(self.data[:count])
        del self.data[:count]
        self.fwd_cnt = (self.fwd_cnt + count) & U32
        if (self.fwd_cnt - self.advertised) & U32 >= self.buf_alloc // 4 and not self.reset:
            self.packet(OP_CREDIT_UPDATE)
        return taken

    def recv_until_eof(self, timeout: float = 30) -> bytes:
        got = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            got += self.consume()
            if self.peer_shutdown & SHUTDOWN_SEND:
                got += self.consume()
                return bytes(got)
            self._check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no end of stream after {len(got)} bytes")
            self.vsock.pump(deadline - time.monotonic())

    def shutdown(self, flags: int) -> None:
        self.packet(OP_SHUTDOWN, flags=flags)

    def close(self, timeout: float = 10) -> None:
        """SHUTDOWN both ways; the host answers RST (as Linux expects)."""
        self.shutdown(SHUTDOWN_BOTH)
        deadline = time.monotonic() + timeout
        while not self.reset:
            if time.monotonic() > deadline:
                raise TimeoutError("no RST after SHUTDOWN")
            self.vsock.pump(deadline - time.monotonic())

    def _check(self) -> None:
        if self.reset:
            raise Reset(f"stream {self.guest_port}<->{self.host_port} was reset")


class GuestVsock:
    def __init__(self, driver: QueueDriver, cid: int, rx_buffers: int = 128,
                 split_header: bool = True):
        self.driver = driver
        self.cid = cid
        self.rx, self.tx = driver.rings[RX], driver.rings[TX]
        self.split_header = split_header
        self.streams: dict[tuple[int, int], GuestStream] = {}
        self.listening: set[int] = set()
        self.accepted: deque[GuestStream] = deque()
        self.received: list[Header] = []         # every packet from the host
        self.next_port = 50_000
        for _ in range(rx_buffers):
            self.post_rx()

    def post_rx(self) -> None:
        layout = [(HEADER_SIZE, True), (RX_BUF, True)] if self.split_header else \
            [(HEADER_SIZE + RX_BUF, True)]
        self.rx.add(layout, kick=True)

    def send(self, hdr: Header, payload: bytes = b"") -> None:
        self.raw([hdr.pack(), payload] if payload else [hdr.pack()])

    def raw(self, buffers) -> None:
        """Any chain at all on the tx ring (bytes: readable, (n, True): writable)."""
        self.tx.used_now()
        while len(self.tx.free) < len(buffers):
            self.tx.wait_used()
        self.tx.add(buffers)

    def pump(self, timeout: float = 0.0) -> list[Header]:
        """Take what the host sent (waiting up to `timeout` for something)."""
        self.tx.used_now()
        try:
            done = self.rx.wait_used(max(timeout, 0.001)) if timeout > 0 else self.rx.used_now()
        except TimeoutError:
            return []
        headers = []
        for _, written, data in done:
            self.post_rx()
            if written < HEADER_SIZE:
                continue
            hdr = Header.parse(data)
            assert hdr.len == written - HEADER_SIZE, (hdr, written)
            self.received.append(hdr)
            headers.append(hdr)
            self._dispatch(hdr, data[HEADER_SIZE:written])
        return headers

    def _dispatch(self, hdr: Header, payload: bytes) -> None:
        assert hdr.src_cid in (HOST_CID,) or hdr.op == OP_RST, hdr
        assert hdr.dst_cid == self.cid, hdr
        key = (hdr.dst_port, hdr.src_port)
        stream = self.streams.get(key)
        if stream is None:
            if hdr.op == OP_REQUEST and hdr.dst_port in self.listening:
                stream = GuestStream(self, hdr.dst_port, hdr.src_port)
                stream.state = "established"
                self.streams[key] = stream
                stream.peer_buf_alloc, stream.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                stream.packet(OP_RESPONSE)
                self.accepted.append(stream)
            elif hdr.op != OP_RST:
                GuestStream(self, hdr.dst_port, hdr.src_port).packet(OP_RST)
            return
        stream.peer_buf_alloc, stream.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == OP_RESPONSE and stream.state == "connecting":
            stream.state = "established"
        elif hdr.op == OP_RW:
            assert len(stream.data) + len(payload) <= stream.buf_alloc, "host broke our credit"
            stream.data += payload
        elif hdr.op == OP_SHUTDOWN:
            stream.peer_shutdown |= hdr.flags
        elif hdr.op == OP_RST:
            stream.reset = True
            stream.state = "closed"
            del self.streams[key]
        elif hdr.op == OP_CREDIT_REQUEST:
            stream.packet(OP_CREDIT_UPDATE)

    def connect(self, port: int, timeout: float = 10) -> GuestStream:
        guest_port = self.next_port
        self.next_port += 1
        stream = GuestStream(self, guest_port, port)
        self.streams[(guest_port, port)] = stream
        stream.packet(OP_REQUEST)
        deadline = time.monotonic() + timeout
        while stream.state == "connecting":
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to a connection to port {port}")
            self.pump(deadline - time.monotonic())
        stream._check()
        return stream

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def accept(self, timeout: float = 10) -> GuestStream:
        deadline = time.monotonic() + timeout
        while not self.accepted:
            if time.monotonic() > deadline:
                raise TimeoutError("no connection came")
            self.pump(deadline - time.monotonic())
        return self.accepted.popleft()

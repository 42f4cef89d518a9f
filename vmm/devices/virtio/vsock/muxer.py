"""The vsock device's connection table: guest packets in, host unix sockets out, and
back (Firecracker's hybrid convention, docs/machine.md "vsock"):

- guest -> host: a guest connecting to CID 2, port P is connected to the host unix
  socket `<uds_path>_P` (nonblocking; a missing socket, a refusal or a full backlog
  answers RST, so the guest's connect() fails at once with ECONNRESET);
- host -> guest: a host client connects to `<uds_path>` and writes `CONNECT P\\n`; the
  guest is asked (REQUEST from a host port of ours, counting up from 2^30); on its
  RESPONSE the client reads `OK <host port>\\n` and the stream is bridged; on RST, or no
  answer within CONNECT_TIMEOUT, the client is closed.

Threads: the tx ring's worker calls handle_tx() (guest packets), the rx ring's worker
fill_rx() (packets for the guest), and a thread of ours polls the host sockets. One lock
covers the table; socket calls under it never block. The host thread wakes the rx
worker through its wake eventfd when a host socket becomes readable; the rx worker
reads the socket itself, straight into the guest's buffer.

What the guest can get wrong, and what it gets: a packet too short for its header, or
with a source CID that is not its own, is dropped; any other malformed packet (a
length beyond its buffers or over 64 KiB, a type other than STREAM, an unknown op, a
packet for a stream that does not exist or is not in a state for it, more data than
its credit) is answered with RST and resets the stream it names. Never a host crash:
the guest only ever chooses which of these happen. Each kind is logged a few times,
then summed up now and then (vmm/log_limit.py), as is a host client's bad CONNECT line.

Bounds: MAX_CONNECTIONS streams (host clients still sending their CONNECT line
included), each with at most BUF_ALLOC bytes of the guest's waiting for a slow host
reader; at most CONTROL_LIMIT control packets waiting for the guest's receive
buffers: beyond that the tx queue is not read until the guest takes some.
"""

import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from ....log_limit import guest
from ....virtio import iov
from ....virtio.queue import Served, Virtqueue
from .connection import CONNECTING, ESTABLISHED, Connection
from .packet import (HEADER_SIZE, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST,
                     OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
                     SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM, U32, Header)

log = logging.getLogger(__name__)

RX, TX, EVENT = 0, 1, 2
BUF_ALLOC = 256 << 10           # our receive buffer per stream (Linux's default too)
CREDIT_THRESHOLD = 64 << 10     # tell the guest once this much more has been forwarded
MAX_CONNECTIONS = 256
CONTROL_LIMIT = 1024
LOCAL_PORT_BASE = 1 << 30
CONNECT_TIMEOUT = 10.0          # host-initiated: the guest's answer to REQUEST
HANDSHAKE_TIMEOUT = 10.0        # a host client's CONNECT line
DRAIN_TIMEOUT = 30.0            # a closed stream's last bytes to a slow host reader
LINE_MAX = 32                   # "CONNECT 4294967295\n" is 19 bytes
_NONBLOCK = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


@dataclass
class _Handshake:
    sock: socket.socket
    deadline: float
    line: bytes = b""


class Muxer:
    def __init__(self, guest_cid: int, listener: socket.socket, uds_path: str,
                 buf_alloc: int = BUF_ALLOC):
        self.guest_cid = guest_cid
        self.listener = listener
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.lock = threading.Lock()
        self.conns: dict[tuple[int, int], Connection] = {}
        self.control: deque[tuple[int, int, int, int, int]] = deque()   # op, flags, host
        self.readable: deque[Connection] = deque()                       # port, guest port, cid
        self.handshakes: dict[int, _Handshake] = {}
        self.draining: list[Connection] = []
        self.tx_stalled = False
        self._next_port = LOCAL_PORT_BASE
        self.wake_fds = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                         os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), -1)
        self._wake_self = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        listener.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="vsock-host", daemon=True)

    def start(self) -> "Muxer":
        """Start polling the host side (after the process's seccomp filter is on: the
        thread inherits it)."""
        self._thread.start()
        return self

    # ---- the tx ring: packets from the guest

    def handle_tx(self, queue: Virtqueue) -> Served:
        done = False
        while True:
            with self.lock:
                if len(self.control) >= CONTROL_LIMIT:
                    self.tx_stalled = True      # fill_rx wakes us when the guest caught up
                    break
                chain = queue.pop()
                if chain is None:
                    break
                self._guest_packet(chain.readable)
            queue.push(chain.head, 0)
            done = True
        if self.control:
            _wake(self.wake_fds[RX])
        return Served(done and queue.needs_interrupt(), False)

    def _guest_packet(self, views: list[memoryview]) -> None:
        raw = iov.read(views, HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            self._complain("short packet", "a packet of %d bytes, shorter than its header",
                           len(raw))
            return
        hdr = Header.parse(raw)
        if hdr.src_cid != self.guest_cid:
            self._complain("packet from another CID", "a packet from CID %d, not the guest's "
                           "%d: dropped", hdr.src_cid, self.guest_cid)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self.conns.get(key)
        payload = iov.size(views) - HEADER_SIZE
        problem = None
        if hdr.dst_cid != HOST_CID:
            problem = f"to CID {hdr.dst_cid}, not the host"
        elif hdr.type != TYPE_STREAM:
            problem = f"type {hdr.type}, not STREAM"
        elif hdr.len > min(payload, MAX_PAYLOAD):
            problem = f"len {hdr.len} with {payload} bytes of payload"
        if problem:
            self._complain("malformed packet", "%s %s: %s", hdr.op_name, key, problem)
            if conn:
                self._reset(conn)
            elif hdr.op != OP_RST:
                self._queue(OP_RST, 0, hdr.dst_port, hdr.src_port, hdr.dst_cid)
            return
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._connect_host(hdr)
            elif hdr.op != OP_RST:
                self._complain("packet for no stream", "%s for no stream %s: RST", hdr.op_name,
                               key)
                self._queue(OP_RST, 0, hdr.dst_port, hdr.src_port)
            return
        had_credit = conn.can_send_to_guest()
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        op = hdr.op
        if op == OP_RW and conn.state == ESTABLISHED and not conn.guest_shutdown & SHUTDOWN_SEND:
            self._guest_data(conn, iov.take(iov.skip(views, HEADER_SIZE), hdr.len), hdr.len)
        elif op == OP_RESPONSE and conn.state == CONNECTING:
            self._established(conn)
        elif op == OP_SHUTDOWN and conn.state == ESTABLISHED:
            self._guest_shutdown(conn, hdr.flags)
        elif op == OP_RST:
            self._remove(conn, rst=False, drain=False)
        elif op in (OP_CREDIT_UPDATE, OP_CREDIT_REQUEST) and conn.state == ESTABLISHED:
            if op == OP_CREDIT_REQUEST:
                self._owe_credit(conn)
        else:
            self._complain("packet out of state", "%s for stream %s while %s: RST",
                           hdr.op_name, key, conn.state)
            self._reset(conn)
            return
        if not conn.closed and not had_credit and conn.can_send_to_guest():
            self._credit_opened(conn)

    def _connect_host(self, hdr: Header) -> None:
        key = (hdr.dst_port, hdr.src_port)
        path = f"{self.uds_path}_{hdr.dst_port}"
        if len(self.conns) + len(self.handshakes) >= MAX_CONNECTIONS:
            guest.warning(log, "", "stream limit", "vsock: %d streams open; refusing the "
                          "guest's connection to port %d", MAX_CONNECTIONS, hdr.dst_port)
            self._queue(OP_RST, 0, *key)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC |
                             socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as error:
            sock.close()
            refusal = errno.errorcode.get(error.errno, error.errno)
            self._complain(f"refused connection ({refusal})", "guest connection to port %d: "
                           "%s: %s", hdr.dst_port, path, error.strerror or error)
            self._queue(OP_RST, 0, *key)
            return
        conn = Connection(*key, sock, ESTABLISHED, self.buf_alloc)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.conns[key] = conn
        self._queue(OP_RESPONSE, 0, *key)
        self._poll_changed()

    def _established(self, conn: Connection) -> None:
        conn.state, conn.deadline = ESTABLISHED, None
        try:
            conn.sock.send(f"OK {conn.host_port}\n".encode(), _NONBLOCK)
        except OSError:
            self._reset(conn)
            return
        self._poll_changed()

    def _guest_data(self, conn: Connection, views: list[memoryview], length: int) -> None:
        if length > conn.free():
            self._complain("credit overrun", "stream %s: %d bytes beyond the credit it was "
                           "given: RST", conn.key, length - conn.free())
            self._reset(conn)
            return
        if not length:
            return
        if conn.pending or conn.write_shut:
            conn.pending += iov.read(views, length)
        else:
            try:
                sent = conn.sock.sendmsg(views, [], _NONBLOCK)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset(conn)
                return
            conn.fwd_cnt = (conn.fwd_cnt + sent) & U32
            if sent < length:
                conn.pending += iov.read(iov.skip(views, sent), length - sent)
                self._poll_changed()
        self._check_credit(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.guest_shutdown |= flags & SHUTDOWN_BOTH
        if conn.guest_shutdown == SHUTDOWN_BOTH:
            # The guest closed: it waits for our RST. What it sent still reaches the
            # host reader (draining).
            self._remove(conn, rst=True, drain=True)
            return
        conn.shut_write_if_done()
        self._poll_changed()

    # ---- the rx ring: packets for the guest

    def fill_rx(self, queue: Virtqueue) -> Served:
        done = False
        with self.lock:
            while True:
                if (entry := self._next_control()) is not None:
                    chain = queue.pop()
                    if chain is None:
                        self.control.appendleft(entry)
                        break
                    written = self._write_control(chain.writable, entry)
                elif (conn := self._next_readable()) is not None:
                    if not self._has_data(conn):
                        continue
                    chain = queue.pop()
                    if chain is None:
                        self.readable.appendleft(conn)
                        conn.queued = True
                        break
                    written = self._write_data(chain.writable, conn)
                else:
                    break
                queue.push(chain.head, written)
                done = True
            if self.tx_stalled and len(self.control) < CONTROL_LIMIT // 2:
                self.tx_stalled = False
                _wake(self.wake_fds[TX])
        return Served(done and queue.needs_interrupt(), False)

    def _next_control(self):
        """The next control packet still worth sending: one for a stream that has
        gone since is dropped, except the RST that says so."""
        while self.control:
            entry = self.control.popleft()
            op, _, host_port, guest_port, _ = entry
            if op == OP_RST or (host_port, guest_port) in self.conns:
                return entry
        return None

    def _write_control(self, views: list[memoryview], entry) -> int:
        op, flags, host_port, guest_port, host_cid = entry
        conn = self.conns.get((host_port, guest_port))
        credit = (0, 0)
        if conn is not None:
            if op == OP_CREDIT_UPDATE:
                conn.credit_owed = False
            conn.advertised = conn.fwd_cnt
            credit = (conn.buf_alloc, conn.fwd_cnt)
        return self._write_header(views, Header(host_cid, self.guest_cid, host_port,
                                                guest_port, 0, TYPE_STREAM, op, flags, *credit))

    def _write_header(self, views: list[memoryview], hdr: Header) -> int:
        if iov.size(views) < HEADER_SIZE:
            self._complain("short receive buffer", "a receive buffer shorter than a header")
            return 0
        return iov.write(views, hdr.pack())

    def _next_readable(self) -> Connection | None:
        while self.readable:
            conn = self.readable.popleft()
            conn.queued = False
            if not conn.closed and conn.readable and conn.can_send_to_guest():
                return conn
        return None

    def _has_data(self, conn: Connection) -> bool:
        """Whether conn's host socket has bytes now (a peek); on its end of stream the
        guest is told (SHUTDOWN SEND), on an error the stream is reset."""
        try:
            peeked = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            conn.readable = False
            self._poll_changed()
            return False
        except OSError:
            self._reset(conn)
            return False
        if not peeked:
            conn.readable, conn.host_eof = False, True
            self._queue(OP_SHUTDOWN, SHUTDOWN_SEND, *conn.key)
            return False
        return True

    def _write_data(self, views: list[memoryview], conn: Connection) -> int:
        room = iov.size(views) - HEADER_SIZE
        if room <= 0:
            self._complain("short receive buffer", "a receive buffer shorter than a header")
            self._mark_readable(conn)
            return 0
        limit = min(room, conn.peer_credit(), MAX_PAYLOAD)
        try:
            count = conn.sock.recvmsg_into(iov.take(iov.skip(views, HEADER_SIZE), limit), 0,
                                           socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            count = 0
        except OSError:
            self._reset(conn)
            count = 0
        conn.tx_cnt = (conn.tx_cnt + count) & U32
        conn.advertised = conn.fwd_cnt
        # count 0 (only if the socket failed) still makes a valid packet: a credit update.
        hdr = Header(HOST_CID, self.guest_cid, conn.host_port, conn.guest_port, count,
                     TYPE_STREAM, OP_RW if count else OP_CREDIT_UPDATE, 0, conn.buf_alloc,
                     conn.fwd_cnt)
        iov.write(views, hdr.pack())
        if not conn.closed:
            self._mark_readable(conn)       # round robin: behind the other streams
        return HEADER_SIZE + count

    # ---- bookkeeping (under the lock)

    def _queue(self, op: int, flags: int, host_port: int, guest_port: int,
               host_cid: int = HOST_CID) -> None:
        self.control.append((op, flags, host_port, guest_port, host_cid))

    def _mark_readable(self, conn: Connection) -> None:
        conn.readable = True
        if not conn.queued:
            conn.queued = True
            self.readable.append(conn)

    def _credit_opened(self, conn: Connection) -> None:
        if conn.readable:
            self._mark_readable(conn)
            _wake(self.wake_fds[RX])
        else:
            self._poll_changed()

    def _owe_credit(self, conn: Connection) -> None:
        if not conn.credit_owed:
            conn.credit_owed = True
            self._queue(OP_CREDIT_UPDATE, 0, *conn.key)

    def _check_credit(self, conn: Connection) -> None:
        if conn.unadvertised() >= min(CREDIT_THRESHOLD, conn.buf_alloc // 2):
            self._owe_credit(conn)

    def _reset(self, conn: Connection) -> None:
        self._remove(conn, rst=True, drain=False)

    def _remove(self, conn: Connection, rst: bool, drain: bool) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if rst:
            self._queue(OP_RST, 0, *conn.key)
        if drain and conn.pending and not conn.write_shut:
            conn.state, conn.deadline = "draining", Connection.deadline_in(DRAIN_TIMEOUT)
            conn.guest_shutdown = SHUTDOWN_BOTH
            self.draining.append(conn)
        else:
            conn.close()
        self._poll_changed()

    @staticmethod
    def _complain(kind: str, message: str, *args) -> None:
        """A guest's (or host client's) mistake, logged bounded: vmm/log_limit.py."""
        guest.info(log, "", kind, "vsock: " + message, *args)

    def _poll_changed(self) -> None:
        _wake(self._wake_self)

    def reset(self) -> None:
        """The frontend went: every stream and host client of that guest goes."""
        with self.lock:
            for conn in [*self.conns.values(), *self.draining]:
                conn.close()
            for handshake in self.handshakes.values():
                handshake.sock.close()
            self.conns.clear()
            self.draining.clear()
            self.handshakes.clear()
            self.control.clear()
            self.readable.clear()
            self.tx_stalled = False
        self._poll_changed()

    # ---- the host side: our own thread

    def _loop(self) -> None:
        while True:
            try:
                self._loop_once()
            except Exception:                   # a bug here must not end host I/O
                log.exception("vsock: host-side loop")
                select.poll().poll(100)         # no busy loop if it repeats

    def _loop_once(self) -> None:
        poller = select.poll()
        watched: dict[int, object] = {}
        with self.lock:
            deadline = self._poll_set(poller, watched)
        timeout = None if deadline is None else max(0, (deadline - time.monotonic()) * 1000)
        ready = poller.poll(timeout)
        with self.lock:
            for fd, event in ready:
                self._host_event(watched[fd], event)
            self._expire(time.monotonic())
        if self.control:
            _wake(self.wake_fds[RX])

    def _poll_set(self, poller, watched) -> float | None:
        poller.register(self._wake_self, select.POLLIN)
        watched[self._wake_self] = "wake"
        if len(self.conns) + len(self.handshakes) < MAX_CONNECTIONS:
            poller.register(self.listener, select.POLLIN)
            watched[self.listener.fileno()] = "listener"
        deadlines = []
        for fd, handshake in self.handshakes.items():
            poller.register(fd, select.POLLIN)
            watched[fd] = handshake
            deadlines.append(handshake.deadline)
        for conn in [*self.conns.values(), *self.draining]:
            events = (select.POLLIN if conn.wants_read() else 0) | \
                (select.POLLOUT if conn.wants_write() else 0)
            if events:
                poller.register(conn.sock, events)
                watched[conn.sock.fileno()] = conn
            if conn.deadline is not None:
                deadlines.append(conn.deadline)
        return min(deadlines, default=None)

    def _host_event(self, what, event: int) -> None:
        if what == "wake":
            os.eventfd_read(self._wake_self)
        elif what == "listener":
            self._accept()
        elif isinstance(what, _Handshake):
            if self.handshakes.get(what.sock.fileno()) is what:
                self._handshake(what)
        elif isinstance(what, Connection) and not what.closed:
            trouble = event & (select.POLLHUP | select.POLLERR)
            if event & select.POLLIN or (trouble and what.wants_read()):
                self._mark_readable(what)
                _wake(self.wake_fds[RX])
            if what.wants_write() and (event & select.POLLOUT or trouble):
                self._flush(what)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        # Left in blocking mode (no ioctl after the filter is on): every call on it
        # passes MSG_DONTWAIT, and connect() makes its sockets SOCK_NONBLOCK.
        self.handshakes[sock.fileno()] = _Handshake(
            sock, Connection.deadline_in(HANDSHAKE_TIMEOUT))

    def _handshake(self, handshake: _Handshake) -> None:
        """Read the client's `CONNECT <port>\\n`, no byte further (what follows is the
        stream's, for the guest)."""
        sock = handshake.sock
        try:
            peeked = sock.recv(LINE_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            end = peeked.find(b"\n")
            taken = sock.recv(end + 1 if end >= 0 else len(peeked), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            taken = b""
        handshake.line += taken
        if not taken or (end < 0 and len(handshake.line) >= LINE_MAX):
            self._end_handshake(handshake, "a client closed or sent no CONNECT line")
            return
        if end < 0:
            return
        words = handshake.line.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit() or \
                int(words[1]) > U32:
            self._end_handshake(handshake, f"a client sent {handshake.line!r}, not "
                                "CONNECT <port>")
            return
        del self.handshakes[sock.fileno()]
        guest_port = int(words[1])
        conn = Connection(self._local_port(guest_port), guest_port, sock, CONNECTING,
                          self.buf_alloc, Connection.deadline_in(CONNECT_TIMEOUT))
        self.conns[conn.key] = conn
        self._queue(OP_REQUEST, 0, *conn.key)

    def _end_handshake(self, handshake: _Handshake, why: str) -> None:
        self._complain("bad host handshake", "%s; closed", why)
        del self.handshakes[handshake.sock.fileno()]
        handshake.sock.close()

    def _local_port(self, guest_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < U32 else LOCAL_PORT_BASE
            if (port, guest_port) not in self.conns:
                return port

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.pending, _NONBLOCK)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EAGAIN:
                if conn.state == "draining":
                    self._end_drain(conn)
                else:
                    self._reset(conn)
            return
        del conn.pending[:sent]
        conn.fwd_cnt = (conn.fwd_cnt + sent) & U32
        if conn.state == "draining":
            if not conn.pending:
                self._end_drain(conn)
            return
        conn.shut_write_if_done()
        self._check_credit(conn)

    def _end_drain(self, conn: Connection) -> None:
        self.draining.remove(conn)
        conn.close()

    def _expire(self, now: float) -> None:
        for handshake in [h for h in self.handshakes.values() if now >= h.deadline]:
            self._end_handshake(handshake, "a client sent no CONNECT line in time")
        for conn in [c for c in self.conns.values() if c.state == CONNECTING and c.expired(now)]:
            guest.info(log, "", "unanswered connection", "vsock: the guest did not answer a "
                       "connection to its port %d; closed", conn.guest_port)
            self._reset(conn)
        for conn in [c for c in self.draining if c.expired(now)]:
            log.info("vsock: a host reader did not take the last %d bytes of a closed "
                     "stream in time; dropped", len(conn.pending))
            self._end_drain(conn)


def _wake(fd: int) -> None:
    os.eventfd_write(fd, 1)

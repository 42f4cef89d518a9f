"""The host side of the console: the listening unix socket, one client at a time, and
guest output kept for a client.

- **One client at a time; a second one is refused**: it is accepted, sent one line
  (busy_message()) and closed at once. Not queued: a client left waiting would look
  like a console whose guest prints nothing. A client that has closed its socket does
  not hold the console: the next one replaces it (input it sent that the guest has
  not taken yet is dropped with it). A client that only shut down its sending side
  keeps receiving guest output.
- **Guest output with no client** is kept, the newest OUTPUT_BOUND bytes (64 KiB); older
  bytes are dropped first, and the drop is logged when a client connects and gets
  what was kept. The guest never blocks on a console nobody listens to.
- **Guest output with a client** is written to it as it comes; while the client does
  not read, at most OUTPUT_BOUND bytes wait here and then the device stops taking the
  guest's buffers (backpressure: the guest's writes to hvc0 wait, as on a serial line).
- **Client input** goes to the guest only while it has receive buffers; otherwise we
  stop reading the client (the socket's buffer fills, the client's writes wait). No
  input is buffered here.

A thread of its own polls the sockets; the rings' workers (vmm/vhost_user/backend.py)
call in from theirs; one lock covers the state. The thread wakes a ring's worker
through the ring's wake eventfd (`wake_fds`).
"""

import errno
import logging
import os
import select
import socket
import threading

log = logging.getLogger(__name__)

OUTPUT_BOUND = 64 << 10
RX, TX = 0, 1            # receiveq0 (to the guest), transmitq0 (from the guest)
IDLE, READY, EOF = "idle", "ready", "eof"
_NONBLOCK = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def busy_message(name: str) -> bytes:
    return (f"stratovirt: {name} already has a client (one at a time); "
            "try again when it disconnects\n").encode()


class Port:
    def __init__(self, listener: socket.socket, name: str = "console",
                 bound: int = OUTPUT_BOUND):
        self.listener = listener
        self.name = name
        self.bound = bound
        self.lock = threading.Lock()
        self.client: socket.socket | None = None
        self.output = bytearray()        # guest output not yet written to a client
        self.dropped = 0                 # bytes of it dropped since a client last had it
        self.input = IDLE                # IDLE: poll the client for input; READY: it
                                         # has input (or EOF) the guest has not taken;
                                         # EOF: it sends no more, output only
        self.tx_waiting = False          # transmitq stopped on a slow client
        self.wake_fds = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                         os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self._wake_self = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        listener.setblocking(False)
        self._thread = threading.Thread(target=self._loop, name="console-port", daemon=True)

    def start(self) -> "Port":
        """Start polling (after the process's seccomp filter is on: the thread inherits
        it)."""
        self._thread.start()
        return self

    # -- called by the transmitq worker, under the lock

    def room(self) -> bool:
        """Whether the device may take another guest buffer now."""
        if self.client is not None and len(self.output) >= self.bound:
            self.tx_waiting = True
            return False
        return True

    def write(self, data: bytes) -> None:
        """Guest output."""
        if self.client is not None and not self.output:
            try:
                sent = self.client.send(data, _NONBLOCK)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop_client("write failed")
                sent = 0
            data = data[sent:]
            if not data:
                return
        self.output += data
        if self.client is None and len(self.output) > self.bound:
            excess = len(self.output) - self.bound
            del self.output[:excess]
            self.dropped += excess
        if self.client is not None:
            self._wake(self._wake_self)         # poll for POLLOUT

    # -- called by the receiveq worker, under the lock

    def has_input(self) -> bool:
        """Whether the client has bytes for the guest (then read_into takes them);
        if not, the port polls the client again, or notes that it sends no more."""
        if self.client is None or self.input != READY:
            return False
        try:
            peeked = self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.input = IDLE
            self._wake(self._wake_self)
            return False
        except OSError:
            self._drop_client("read failed")
            return False
        if peeked:
            return True
        if self._hung_up(self.client):
            self._drop_client("disconnected")
        else:
            self.input = EOF
            self._wake(self._wake_self)
        return False

    def read_into(self, views: list[memoryview]) -> int:
        """Client input into guest buffers; only after input_state() said 'data'."""
        try:
            count = self.client.recvmsg_into(views, 0, socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            count = 0
        except OSError:
            self._drop_client("read failed")
            return 0
        return count

    # -- the port's own thread

    def _wake(self, fd: int) -> None:
        os.eventfd_write(fd, 1)

    def _drop_client(self, why: str) -> None:
        log.info("%s: client %s", self.name, why)
        self.client.close()
        self.client = None
        self.input = IDLE
        if self.tx_waiting:                 # no client: output is dropped, not waited on
            self.tx_waiting = False
            self._wake(self.wake_fds[TX])
        self._wake(self._wake_self)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        # Left in blocking mode (no ioctl after the filter is on): every call on it
        # passes MSG_DONTWAIT.
        if self.client is not None and self._hung_up(self.client):
            self._drop_client("hung up")
        if self.client is not None:
            log.info("%s: refused a second client", self.name)
            try:
                client.send(busy_message(self.name), _NONBLOCK)
            except OSError:
                pass
            client.close()
            return
        self.client = client
        if self.dropped:
            log.info("%s: %d bytes of guest output were dropped while no client was "
                     "connected (the newest %d are kept)", self.name, self.dropped, self.bound)
            self.dropped = 0
        log.info("%s: client connected (%d bytes of guest output waiting)", self.name,
                 len(self.output))
        self._flush()

    @staticmethod
    def _hung_up(client: socket.socket) -> bool:
        poller = select.poll()
        poller.register(client, 0)          # POLLHUP: closed, not merely half-closed
        return any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll(0))

    def _flush(self) -> None:
        if self.client is None or not self.output:
            return
        try:
            sent = self.client.send(self.output, _NONBLOCK)
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno != errno.EAGAIN:
                self._drop_client("write failed")
            return
        del self.output[:sent]
        if self.tx_waiting and len(self.output) < self.bound:
            self.tx_waiting = False
            self._wake(self.wake_fds[TX])

    def _loop(self) -> None:
        while True:
            try:
                self._loop_once()
            except Exception:                   # a bug here must not end the console
                log.exception("%s: port thread", self.name)
                select.poll().poll(100)         # no busy loop if it repeats

    def _loop_once(self) -> None:
        poller = select.poll()
        poller.register(self._wake_self, select.POLLIN)
        poller.register(self.listener, select.POLLIN)
        with self.lock:
            client = self.client
            output = select.POLLOUT if self.output else 0
            # While the guest has not taken the client's input, the client is not
            # polled at all: poll reports a hang-up whatever it is asked, and it
            # would spin; the receive queue sees the end when it gets there.
            if client is not None and (self.input != READY or output):
                poller.register(client, output | (select.POLLIN if self.input == IDLE
                                                  else 0))
        ready = dict(poller.poll())
        with self.lock:
            if self._wake_self in ready:
                os.eventfd_read(self._wake_self)
            if client is not None and client is self.client and client.fileno() in ready:
                self._client_event(ready[client.fileno()])
            if self.listener.fileno() in ready:
                self._accept()

    def _client_event(self, event: int) -> None:
        hangup = event & (select.POLLHUP | select.POLLERR)
        if self.input == IDLE and event & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self.input = READY
            self._wake(self.wake_fds[RX])
        if event & select.POLLOUT or (hangup and self.output):
            self._flush()                       # a closed client fails, and is dropped
        elif hangup and self.input == EOF:
            self._drop_client("disconnected")

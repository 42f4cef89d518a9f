"""The api-channel server: QMP for up to MAX_CLIENTS clients at once, in one thread of
the vm process (`vmm-qmp`, confined by the `api` profile).

The listening socket is bound by the launcher (so the path exists before the VM runs and
is removed by the launcher on every exit path); this thread accepts on it and serves
every client from one poll loop, with no blocking call on any client:

- It starts as soon as the vm process has its start message, while the machine is
  being built (docs/performance.md, "Start-up"): clients are greeted and negotiate
  capabilities at once; any other command waits, unread, until the machine is
  attached, which is once its vCPUs run, so a client's first query-status finds the
  VM running (as QEMU's does).
- Each client is greeted at once. One more than MAX_CLIENTS gets an error line and is
  closed: never silence.
- Input goes through json_stream (nesting and size limits, strict parsing); every bad
  input gets an error reply and the connection goes on. A command's arguments are
  checked against the command table (commands.py) before its handler runs; a handler's
  unexpected exception is a GenericError reply and one log line.
- Output (replies, events) is queued per client and written when the socket takes it.
  A client whose queue passes SOFT_QUEUE_BYTES is not read until it drains (a flood of
  commands waits for the flooder to read its replies); one whose queue passes
  HARD_QUEUE_BYTES (only events can push it there) is dropped, and the others go on.
- Events go to every client that has negotiated capabilities, from whichever thread
  emits them (emit() only queues and wakes the loop).
- Input is rate-limited, all clients together, to COMMANDS_PER_SECOND messages (good or
  bad) with a burst of COMMAND_BURST: past it the server stops reading until the bucket
  refills, so a flood waits instead of failing (StratoVirt 2.x answers
  OperationThrottled past 100 a second). Why: this thread and the vCPU threads share the
  vm process's interpreter lock, and every guest exit that Python handles (MMIO, port
  I/O) needs it; unthrottled, a client flooding cheap commands slowed the guest to a
  seventh of its speed (bench/hotplug.py).
"""

import errno
import json
import logging
import os
import select
import socket
import threading
import time
from collections import deque

import prctl

from .. import sandbox, timeline
from . import json_stream
from .commands import COMMANDS, PACKAGE, QEMU_VERSION, Context
from .errors import QmpError
from .schema import SchemaError

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
ACCEPTS_PER_ROUND = 32
SOFT_QUEUE_BYTES = 64 << 10
HARD_QUEUE_BYTES = 1 << 20
RECV_BYTES = 16 << 10
COMMANDS_PER_SECOND = 5000
COMMAND_BURST = 500
MAX_FDS_PER_MESSAGE = 8
MAX_KEPT_FDS = 4             # passed fds a client may have pending (getfd takes them)
CLOSE_FLUSH_SECONDS = 1.0
_IN, _OUT = select.POLLIN, select.POLLOUT
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
_ENVELOPE = ("execute", "arguments", "id")


def _timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}


def _line(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


GREETING = _line({"QMP": {"version": {"qemu": QEMU_VERSION, "package": PACKAGE},
                          "capabilities": []}})


class _Client:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.stream = json_stream.JsonStream()
        self.out = bytearray(GREETING)
        self.negotiated = False
        self.held: list = []            # read before the machine was attached
        self.fds: deque[int] = deque()
        self.closed = False

    def take_fd(self) -> int | None:
        return self.fds.popleft() if self.fds else None

    def close(self) -> None:
        self.closed = True
        while self.fds:
            os.close(self.fds.popleft())
        self.sock.close()


class QmpServer(threading.Thread):
    def __init__(self, listener: socket.socket, seccomp: bool):
        super().__init__(name="vmm-qmp", daemon=True)
        self._listener = listener
        self._seccomp = seccomp
        self._machine = self._hotplug = None     # attach()
        self._attached = False                   # seen by the loop: held commands run
        self._confined = threading.Event()
        self._confine_error: str | None = None
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()          # the clients' output queues
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closing = False
        self._tokens = float(COMMAND_BURST)
        self._throttled = False
        self._refilled = time.monotonic()
        self._poller = select.poll()

    # Any thread.

    def attach(self, machine, hotplug) -> None:
        """The machine is running: commands may reach it (the vm process's main thread)."""
        self._confined.wait()
        if self._confine_error:
            machine.fail(self._confine_error)
            return
        self._machine, self._hotplug = machine, hotplug
        machine.listeners.append(self.emit)
        self._kick()

    def emit(self, event: str, data: dict) -> None:
        line = _line({"event": event, "data": data, "timestamp": _timestamp()})
        with self._lock:
            for client in self._clients.values():
                if client.negotiated:
                    client.out += line
        self._kick()

    def close(self) -> None:
        """Stop serving: what is queued is written for up to CLOSE_FLUSH_SECONDS (the
        SHUTDOWN event reaches the clients), then every client is closed."""
        self._closing = True
        self._kick()
        if self.is_alive():
            self.join(CLOSE_FLUSH_SECONDS + 1)

    def _kick(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    # The server's thread.

    def run(self) -> None:
        """Confined (the `api` profile, this thread only) before the first client."""
        prctl.set_name(self.name)
        try:
            sandbox.confine("api", thread=True, seccomp=self._seccomp, ahead_of="vm")
        except Exception:
            log.exception("the QMP thread could not be confined")
            self._confine_error = "the QMP thread could not be confined"
            return
        finally:
            self._confined.set()
        self._poller.register(self._listener, _IN)
        self._poller.register(self._wake, _IN)
        timeline.mark("api-channel served (QMP thread confined)")
        try:
            self._loop()
        finally:
            for client in list(self._clients.values()):
                client.close()
            self._listener.close()

    def _refill(self) -> float | None:
        """Tokens for the time gone by; the milliseconds until reading may go on, if the
        bucket is empty (None: it is not)."""
        now = time.monotonic()
        self._tokens = min(COMMAND_BURST, self._tokens
                           + (now - self._refilled) * COMMANDS_PER_SECOND)
        self._refilled = now
        if self._tokens > 0:
            return None
        return (1 - self._tokens) / COMMANDS_PER_SECOND * 1000

    def _loop(self) -> None:
        deadline = None
        while True:
            if self._closing and deadline is None:
                deadline = time.monotonic() + CLOSE_FLUSH_SECONDS
                self._poller.unregister(self._listener)
            wait = self._refill()
            self._throttled = wait is not None
            self._flush_all()                   # reading on or off, by the bucket
            timeout = None if deadline is None else max(0, deadline - time.monotonic()) * 1000
            if wait is not None:
                timeout = wait if timeout is None else min(timeout, wait)
            # Clients before the listener: one that went away frees its place for a
            # client connecting in the same round.
            ready = sorted(self._poller.poll(timeout),
                           key=lambda event: event[0] == self._listener.fileno())
            for fd, events in ready:
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                elif fd == self._listener.fileno():
                    for _ in range(ACCEPTS_PER_ROUND):
                        if self._closing or not self._accept():
                            break
                elif self._attached and fd == self._hotplug.broker.fileno():
                    if events & _GONE:         # the launcher is gone; the VM ends with it
                        self._poller.unregister(fd)
                elif (client := self._clients.get(fd)) is not None:
                    if events & _IN and not self._closing:
                        self._read(client)
                    elif events & _GONE:
                        self._drop(client, None)
            if self._hotplug is not None and not self._attached:
                self._run_held()
            # The launcher's news about backends, read here or set aside by a request's
            # wait for its reply; handled between commands, as every slot change is.
            if self._attached and (self._hotplug.broker.has_events or any(
                    fd == self._hotplug.broker.fileno() and events & _IN for fd, events in ready)):
                self._hotplug.backend_events()
            self._flush_all()
            if deadline is not None and (time.monotonic() >= deadline or not self._pending()):
                return

    def _run_held(self) -> None:
        """The machine was attached: from now on commands run; those held run first."""
        self._attached = True
        self._poller.register(self._hotplug.broker.fileno(), _IN)
        for client in list(self._clients.values()):
            held, client.held = client.held, []
            for item in held:
                if client.closed:
                    break
                self._handle(client, item)

    def _pending(self) -> bool:
        with self._lock:
            return any(client.out for client in self._clients.values())

    def _accept(self) -> bool:
        """Take one waiting client; False when none was waiting."""
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionAbortedError:
            return True
        except OSError as error:
            log.error("QMP: accept: %s", error.strerror)
            return False
        if len(self._clients) >= MAX_CLIENTS:
            refusal = _line({"error": {"class": "GenericError", "desc":
                                       f"too many QMP clients: {MAX_CLIENTS} are connected, "
                                       "the most this server takes; try again later"}})
            try:
                sock.send(refusal, socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            log.info("QMP: a client was refused: %d are connected", MAX_CLIENTS)
            return True
        client = _Client(sock)
        with self._lock:
            self._clients[sock.fileno()] = client
        self._poller.register(sock, _IN)
        return True

    def _read(self, client: _Client) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(
                client.sock, RECV_BYTES, MAX_FDS_PER_MESSAGE,
                socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            quiet = error.errno in (errno.ECONNRESET, errno.EPIPE)
            self._drop(client, None if quiet else error.strerror)
            return
        # Passed fds wait for a getfd (qemu.qmp sends one with a lone space, the command
        # after it); the oldest go when a client keeps more than MAX_KEPT_FDS.
        client.fds.extend(fds)
        while len(client.fds) > MAX_KEPT_FDS:
            os.close(client.fds.popleft())
        if flags & socket.MSG_CTRUNC:
            self._reply(client, QmpError("GenericError", "too many file descriptors in one "
                                         f"message; allowed {MAX_FDS_PER_MESSAGE}").reply())
        if not data:
            self._drop(client, None)
            return
        for item in client.stream.feed(data):
            self._tokens -= 1
            if client.held or (client.negotiated and not self._attached):
                client.held.append(item)            # in order, once the machine runs
            else:
                self._handle(client, item)
            if client.closed:
                return

    def _handle(self, client: _Client, item) -> None:
        if isinstance(item, json_stream.BadInput):
            self._reply(client, QmpError("GenericError", item.desc).reply())
        else:
            self._execute(client, item.value)

    def _execute(self, client: _Client, request) -> None:
        reply: dict
        command = None
        try:
            command, args = self._check(client, request)
            if command.name == "qmp_capabilities":
                client.negotiated = True
                result = {}
            else:
                result = command.handler(Context(self._machine, self._hotplug,
                                                 client.take_fd), args)
            reply = {"return": result}
        except QmpError as error:
            reply = error.reply()
        except Exception as error:  # noqa: BLE001 -- a handler's bug must not end QMP
            where = error.__traceback__
            while where.tb_next is not None:
                where = where.tb_next
            name = command.name if command else "?"
            log.error("QMP %s: unexpected %s: %s (%s:%d)", name, type(error).__name__, error,
                      where.tb_frame.f_code.co_filename, where.tb_lineno)
            reply = QmpError("GenericError", f"internal error in '{name}': "
                             f"{type(error).__name__}").reply()
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        self._reply(client, reply)
        if "return" in reply and command.then is not None:
            command.then(Context(self._machine, self._hotplug, client.take_fd))

    def _check(self, client: _Client, request):
        if not isinstance(request, dict):
            raise QmpError("GenericError", "QMP input must be a JSON object")
        for key in request:
            if key not in _ENVELOPE:
                raise QmpError("GenericError", f"QMP input member '{key}' is unexpected")
        name = request.get("execute")
        if not isinstance(name, str):
            raise QmpError("GenericError", "QMP input member 'execute' must be a string"
                           if "execute" in request else "QMP input lacks member 'execute'")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
        command = COMMANDS.get(name)
        if not client.negotiated and name != "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Expecting capabilities negotiation with 'qmp_capabilities'")
        if client.negotiated and name == "qmp_capabilities":
            raise QmpError("CommandNotFound",
                           "Capabilities negotiation is already complete, command ignored")
        if command is None:
            raise QmpError("CommandNotFound", f"The command {name[:64]} has not been found")
        try:
            return command, command.args.check(arguments)
        except SchemaError as error:
            raise QmpError("GenericError", str(error)) from None

    def _reply(self, client: _Client, message: dict) -> None:
        with self._lock:
            client.out += _line(message)

    def _flush_all(self) -> None:
        for client in list(self._clients.values()):
            broken = False
            with self._lock:
                if client.out:
                    try:
                        sent = client.sock.send(client.out, socket.MSG_DONTWAIT)
                        del client.out[:sent]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:            # it went away
                        broken = True
                queued = len(client.out)
            if broken:
                self._drop(client, None)
            elif queued > HARD_QUEUE_BYTES:
                self._drop(client, f"it stopped reading ({queued} bytes queued)")
            else:
                reading = queued < SOFT_QUEUE_BYTES and not self._closing \
                    and not self._throttled and not client.held
                wanted = (_IN if reading else 0) | (_OUT if queued else 0)
                self._poller.modify(client.sock, wanted)

    def _drop(self, client: _Client, why: str | None) -> None:
        fd = client.sock.fileno()
        if fd < 0 or self._clients.get(fd) is not client:
            return
        if why:
            log.warning("QMP client dropped: %s", why)
        self._poller.unregister(fd)
        with self._lock:
            del self._clients[fd]
        client.close()

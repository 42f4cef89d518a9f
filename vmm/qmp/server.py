"""The api-channel server: one QMP client at a time, in a thread of the vm process.

The listening socket is bound by the launcher (so the path exists before the VM runs
and is removed by the launcher on every exit path); this thread accepts on it, greets,
requires `qmp_capabilities` first, answers commands and forwards machine events.
"""

import json
import logging
import socket
import threading
import time

import prctl

from .. import __version__, sandbox
from .commands import COMMANDS, QmpError

log = logging.getLogger(__name__)
MAX_PENDING_BYTES = 1 << 20


class JsonStream:
    """Cuts a byte stream into top-level JSON texts by counting brackets outside
    strings, as QEMU's JSON streamer does: clients need not end messages with newlines."""

    def __init__(self):
        self._buffer = bytearray()
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data: bytes) -> list[str]:
        texts = []
        for byte in data:
            self._buffer.append(byte)
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:          # backslash
                    self._escaped = True
                elif byte == 0x22:          # quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
            if self._depth <= 0 and not self._in_string and byte in b"}]":
                texts.append(self._buffer.decode("utf-8", "replace"))
                self._buffer.clear()
                self._depth = 0
            if len(self._buffer) > MAX_PENDING_BYTES:
                self._buffer.clear()
                self._depth, self._in_string, self._escaped = 0, False, False
                raise ValueError("JSON message too large")
        return texts


def _timestamp() -> dict:
    now = time.time()
    return {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)}


class QmpServer(threading.Thread):
    def __init__(self, listener: socket.socket, machine):
        super().__init__(name="vmm-qmp", daemon=True)
        self._listener = listener
        self._machine = machine
        self._client: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closing = False
        machine.listeners.append(self.emit)

    def run(self) -> None:
        """Confined (the `api` profile, this thread only) before the first client."""
        prctl.set_name(self.name)
        try:
            sandbox.confine("api", thread=True, seccomp=self._machine.config.seccomp)
        except Exception:
            log.exception("the QMP thread could not be confined")
            self._machine.fail("the QMP thread could not be confined")
            return
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._send_lock:
                self._client = client
            try:
                self._serve(client)
            except OSError as error:
                log.info("QMP client gone: %s", error)
            finally:
                with self._send_lock:
                    self._client = None
                client.close()

    def close(self) -> None:
        self._closing = True
        for sock in (self._listener, self._client):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def emit(self, event: str, data: dict) -> None:
        self._send({"event": event, "data": data, "timestamp": _timestamp()})

    def _send(self, message: dict, client: socket.socket | None = None) -> None:
        with self._send_lock:
            target = client or self._client
            if target is None:
                return
            try:
                target.sendall(json.dumps(message).encode() + b"\r\n")
            except OSError:
                pass

    def _serve(self, client: socket.socket) -> None:
        major, minor, micro = (int(p) for p in __version__.split("."))
        self._send({"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                        "package": "stratovirt-py"},
                            "capabilities": []}}, client)
        negotiated = False
        stream = JsonStream()
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return
            try:
                texts = stream.feed(chunk)
            except ValueError as error:
                self._send({"error": {"class": "GenericError", "desc": str(error)}}, client)
                continue
            for text in texts:
                try:
                    request = json.loads(text)
                except ValueError as error:
                    self._send({"error": {"class": "GenericError",
                                          "desc": f"JSON parse error, {error}"}}, client)
                    continue
                negotiated = self._dispatch(client, request, negotiated)

    def _dispatch(self, client, request, negotiated: bool) -> bool:
        reply: dict = {}
        command = request.get("execute") if isinstance(request, dict) else None
        args = request.get("arguments", {}) if isinstance(request, dict) else {}
        try:
            if not isinstance(command, str) or not isinstance(args, dict):
                raise QmpError("GenericError", "QMP input must be an object with a string "
                                               "'execute' and an object 'arguments'")
            if command == "qmp_capabilities":
                if negotiated:
                    raise QmpError("CommandNotFound", "Capabilities negotiation is already "
                                                      "complete, command ignored")
                negotiated = True
                result = {}
            elif not negotiated:
                raise QmpError("CommandNotFound", "Expecting capabilities negotiation with "
                                                  "'qmp_capabilities'")
            elif command in COMMANDS:
                result = COMMANDS[command](self._machine, args)
            else:
                raise QmpError("CommandNotFound", f"The command {command} has not been found")
            reply["return"] = result
        except QmpError as error:
            reply["error"] = {"class": error.error_class, "desc": error.desc}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        self._send(reply, client)
        if command == "quit" and "return" in reply:
            self._machine.shutdown("host-qmp-quit", guest=False)
        return negotiated

"""QMP on a live VM (this host's /dev/kvm, the tiny guest): every command and event
through the real client from PyPI (qemu.qmp), and the server against hostile and broken
clients over a raw socket -- each of those followed by a normal qemu.qmp session on the
same VM, which must find it running and its devices as they were."""

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm, thread_names
from tests.framework.qmp import session
from vmm.qmp import commands

pytestmark = pytest.mark.needs_kvm
MiB = 1 << 20


class Raw:
    """A QMP client written by hand: bytes in, parsed lines out."""

    def __init__(self, path: Path, negotiate: bool = True, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        for _ in range(100):          # a full backlog: retry, as Kata's client does
            try:
                self.sock.connect(str(path))
                break
            except BlockingIOError:
                time.sleep(0.05)
        self.pending = b""
        self.greeting = self.read()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}')
            assert self.read() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> dict:
        while b"\n" not in self.pending:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def reply(self) -> dict:
        """The next message that is not an event."""
        while "event" in (message := self.read()):
            pass
        return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def vm(tmp_path_factory, tiny_guest):
    workdir = tmp_path_factory.mktemp("qmp-vm")
    image = workdir / "d0.img"
    image.write_bytes(bytes(4 * MiB))
    vm = Microvm(workdir, tiny_guest, "-smp", "2", "-drive", f"file={image},id=d0",
                 "-D", str(workdir / "vm.log"), append="wait").spawn()
    vm.wait_for_api()
    vm.image = image
    yield vm
    vm.kill()


def backends(vm) -> dict[str, int]:
    found = {}
    for pid in vm.children():
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if name.startswith("vmm-blk-"):
            found[name] = pid
    return found


def still_normal(vm, before: dict | None = None) -> None:
    """A normal qemu.qmp session: the VM runs, its disk backend is the same process."""
    async def steps(qmp, events):
        return await qmp.execute("query-status"), await qmp.execute("query-block")
    status, block = session(vm.api, steps)
    assert status["status"] == "running"
    assert block[0]["device"] == "d0" and block[0]["inserted"]["file"] == str(vm.image)
    if before is not None:
        assert backends(vm) == before
    assert vm.process.poll() is None


def test_greeting_is_one_that_qemu_clients_accept(vm):
    async def steps(qmp, events):
        return qmp.greeting._raw, await qmp.execute("query-version")   # as received
    greeting, version = session(vm.api, steps)
    qemu = greeting["QMP"]["version"]["qemu"]
    assert qemu["major"] >= 5                   # Kata's client refuses < 5
    assert greeting["QMP"]["version"]["package"].startswith("stratovirt-py ")
    assert greeting["QMP"]["capabilities"] == []
    assert version == greeting["QMP"]["version"]


def test_queries(vm):
    async def steps(qmp, events):
        return {name: await qmp.execute(name) for name in (
            "query-commands", "query-events", "query-status", "query-cpus",
            "query-hotpluggable-cpus", "query-block")}
    answers = session(vm.api, steps)
    assert {c["name"] for c in answers["query-commands"]} == set(commands.COMMANDS)
    assert [e["name"] for e in answers["query-events"]] == list(commands.EVENTS)
    assert answers["query-status"] == {"running": True, "singlestep": False,
                                       "status": "running"}
    # Kata pins vCPU threads by these ids: they are the real threads.
    vm_pid = next(pid for pid in vm.children()
                  if Path(f"/proc/{pid}/comm").read_text().strip() == "vmm-vm")
    names = thread_names(vm_pid)
    for cpu in answers["query-cpus"]:
        assert names[cpu["thread_id"]] == f"vmm-vcpu{cpu['CPU']}"
    assert len(answers["query-hotpluggable-cpus"]) == 2
    block = answers["query-block"]
    assert [entry["slot"] for entry in block] == list(range(6))
    assert block[0]["inserted"] == {
        "file": str(vm.image), "node-name": "d0", "ro": False, "drv": "raw",
        "encrypted": False, "backing_file_depth": 0, "detect_zeroes": "off",
        "cache": {"direct": True, "writeback": True, "no-flush": False},
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}
    assert all(entry["empty"] and "inserted" not in entry for entry in block[1:])


def test_stop_cont_and_powerdown_events(vm):
    async def steps(qmp, events):
        await qmp.execute("stop")
        await events.wait("STOP")
        paused = await qmp.execute("query-status")
        await qmp.execute("cont")
        await events.wait("RESUME")
        await qmp.execute("system_powerdown")      # the tiny guest ignores the button
        await events.wait("POWERDOWN")
        return paused, events.seen
    paused, seen = session(vm.api, steps)
    assert paused["status"] == "paused"
    for event in seen:
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    still_normal(vm)


def test_every_command_before_capabilities_is_refused(vm):
    client = Raw(vm.api, negotiate=False)
    try:
        for command in commands.TABLE:
            if command.name == "qmp_capabilities":
                continue
            client.send(json.dumps({"execute": command.name, "id": command.name}).encode())
            reply = client.reply()
            assert reply == {"error": {"class": "CommandNotFound", "desc": "Expecting "
                             "capabilities negotiation with 'qmp_capabilities'"},
                             "id": command.name}
        client.send(b'{"execute": "qmp_capabilities"}{"execute": "qmp_capabilities"}')
        assert client.reply() == {"return": {}}
        assert client.reply()["error"]["class"] == "CommandNotFound"
    finally:
        client.close()
    still_normal(vm)


@pytest.mark.parametrize("data, desc", [
    (b'{"execute": "stop", "arguments": {"bogus": 1}}', "Parameter 'bogus' is unexpected"),
    (b'{"execute": "no-such"}', "The command no-such has not been found"),
    (b'{"execute": 7}', "'execute' must be a string"),
    (b'{"execute": "stop", "arguments": []}', "'arguments' must be an object"),
    (b'{"exec": "stop"}', "QMP input member 'exec' is unexpected"),
    (b'[1, 2]', "QMP input must be a JSON object"),
    (b'{"execute": "\xff"}', "invalid UTF-8"),
    (b'{"execute": "stop", "arguments": {"x": NaN}}', "'NaN' is not a JSON number"),
    (b'{"execute": "stop", "arguments": {"x": 1e999}}', "out of range"),
    (b'{"execute": "stop", "arguments": {"x": ' + b"1" * 5000 + b"}}", "out of range"),
    (b"[" * 200_000 + b"]" * 200_000, "deeper than 1024"),
])
def test_bad_input_is_an_error_reply_and_the_connection_goes_on(vm, data, desc):
    before = backends(vm)
    client = Raw(vm.api)
    try:
        client.send(data + b'{"execute": "query-status", "id": "after"}')
        error = client.reply()
        assert error["error"]["class"] in ("GenericError", "CommandNotFound")
        assert desc in error["error"]["desc"]
        assert client.reply() == {"return": {"running": True, "singlestep": False,
                                             "status": "running"}, "id": "after"}
    finally:
        client.close()
    still_normal(vm, before)


def test_eight_mib_without_a_closing_brace(vm):
    before = backends(vm)
    client = Raw(vm.api)
    try:
        client.send(b'{"execute": "query-status", "arguments": {"a": "')
        chunk = b"a" * (1 << 20)
        for _ in range(8):
            client.send(chunk)
        error = client.reply()
        assert "longer than" in error["error"]["desc"]
        client.send(b'"}}{"execute": "query-status", "id": 2}')      # the end, finally
        assert client.reply()["id"] == 2
    finally:
        client.close()
    still_normal(vm, before)


def test_a_flood_of_twenty_thousand_commands(vm):
    """Sent as one stream while the replies are read: each gets its reply, in order, at
    the server's command rate. (A client that never reads its replies is not read
    either, once 64 KiB of them wait: the flood then waits for the flooder, not the VM.)"""
    from vmm.qmp.server import COMMAND_BURST, COMMANDS_PER_SECOND
    client = Raw(vm.api, timeout=60)
    flood = b"".join(b'{"execute": "query-status", "id": %d}' % i for i in range(20_000))
    sender = threading.Thread(target=client.send, args=(flood,))
    started = time.monotonic()
    sender.start()
    try:
        replies = [client.reply() for _ in range(20_000)]
        assert [r["id"] for r in replies] == list(range(20_000))
        assert all(r["return"]["status"] == "running" for r in replies)
        # The server reads no faster than its rate (a lower bound: a slow machine only
        # makes this longer).
        least = (20_000 - COMMAND_BURST) / COMMANDS_PER_SECOND
        assert time.monotonic() - started >= 0.95 * least
    finally:
        sender.join()
        client.close()
    still_normal(vm)


def test_two_thousand_connect_close_cycles(vm):
    for _ in range(2000):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(vm.api))
    for _ in range(200):                     # some read the greeting, some send half a line
        client = Raw(vm.api, negotiate=False)
        # Never silence: a greeting, or (when the server has not yet seen the previous
        # clients go, on a loaded machine) the too-many-clients line.
        if "QMP" in client.greeting:
            client.send(b'{"execute": "qmp_capa')
        else:
            assert "too many QMP clients" in client.greeting["error"]["desc"]
        client.close()
    still_normal(vm)


def test_more_clients_than_it_serves_get_a_line_never_silence(vm):
    from vmm.qmp.server import MAX_CLIENTS
    clients = []
    try:
        while len(clients) < MAX_CLIENTS:
            client = Raw(vm.api, negotiate=False)
            clients.append(client)
            if "QMP" not in client.greeting:    # a client of an earlier test is going
                clients.pop().close()
                time.sleep(0.05)
                continue
            client.send(b'{"execute": "qmp_capabilities"}')
            assert client.reply() == {"return": {}}
        for client in clients:                   # every one served at once
            client.send(b'{"execute": "query-status", "id": 1}')
            assert client.reply()["id"] == 1
        started = time.monotonic()
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(1.0)
            extra.connect(str(vm.api))
            line = extra.recv(4096)
        assert time.monotonic() - started < 1.0
        refusal = json.loads(line)
        assert "too many QMP clients" in refusal["error"]["desc"]
    finally:
        for client in clients:
            client.close()
    time.sleep(0.2)             # not a measurement: the server sees them go
    still_normal(vm)


def test_a_client_that_stops_reading_is_dropped_and_the_server_goes_on(vm):
    sleeper = Raw(vm.api)
    sleeper.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    worker = Raw(vm.api, timeout=60)
    try:
        # Events go to every client; the sleeper reads none. POWERDOWN costs the tiny
        # guest nothing (it ignores the button).
        for _ in range(60):
            worker.send(b'{"execute": "system_powerdown"}' * 300)
            for _ in range(300):
                worker.reply()
        log = (vm.workdir / "vm.log").read_text()
        assert "QMP client dropped: it stopped reading" in log
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                sleeper.read()
    finally:
        sleeper.close()
        worker.close()
    still_normal(vm)


def test_system_reset_ends_the_vm_like_a_guest_reset(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait").spawn()
    try:
        vm.wait_for_api()

        async def steps(qmp, events):
            await qmp.execute("system_reset")
            await events.wait("SHUTDOWN")
            return [(e["event"], e["data"]) for e in events.seen]
        seen = session(vm.api, steps)
        assert seen == [("RESET", {"guest": False, "reason": "host-qmp-system-reset"}),
                        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-system-reset"})]
        code, out, err = vm.communicate()
        assert code == 0, err
        assert vm.leftovers() == []
    finally:
        vm.kill()


def test_a_guest_reset_sends_reset_then_shutdown(tmp_path, tiny_guest):
    """The tiny guest in `echo` mode resets through the i8042 when a '.' arrives on its
    serial input: a client connected before that sees RESET, then SHUTDOWN."""
    vm = Microvm(tmp_path, tiny_guest, append="echo", stdin=subprocess.PIPE).spawn()
    try:
        vm.wait_for_api()

        async def steps(qmp, events):
            vm.process.stdin.write(b".")
            vm.process.stdin.flush()
            await events.wait("SHUTDOWN")
            return [(e["event"], e["data"]) for e in events.seen]
        assert session(vm.api, steps) == [
            ("RESET", {"guest": True, "reason": "guest-reset"}),
            ("SHUTDOWN", {"guest": True, "reason": "guest-reset"})]
        code, _, err = vm.communicate()
        assert code == 0, err
    finally:
        vm.kill()

"""The console and vsock backends forked and confined as the launcher does it
(vmm.children.spawn + serve_console / serve_vsock, seccomp on; and from under the
launcher's filter, as restarts fork them), each in its empty root, then driven with real
traffic from the host: every path a guest or a host client can take must stay inside
the virtio-console and virtio-vsock profiles (a syscall outside kills the backend by
SIGSYS, which these tests would see as a dead peer)."""

import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.framework.confined import spawn_under_launcher
from tests.framework.jail import check_jailed
from tests.framework.virtio_queues import QueueDriver
from tests.framework.vsock_guest import GuestVsock
from vmm import children
from vmm.devices.virtio.console.main import serve_console
from vmm.devices.virtio.console.port import busy_message
from vmm.devices.virtio.listener import bind_private
from vmm.devices.virtio.vsock.main import serve_vsock
from vmm.devices.virtio.vsock.packet import SHUTDOWN_SEND
from vmm.vhost_user import protocol as P

pytestmark = pytest.mark.needs_root      # confine() drops capabilities
VERSION_1 = 1 << 32
CID = 9


# Forked by the test as the launcher forks cold-plugged backends, or by a process under
# the launcher's filter, as it forks restarted ones (tests/framework/confined.py).
FORKS = {"cold": children.spawn, "under-launcher": spawn_under_launcher}
FILTERS = {"cold": 1, "under-launcher": 2}              # its own, on the launcher's


def spawn(role: str, body, fds, fork: str = "cold") -> tuple[children.Child, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    child = FORKS[fork](role[:15], role, [*fds, theirs.fileno()], lambda: body(theirs))
    theirs.close()
    return child, ours


def filtered(pid: int) -> bool:
    return "\nSeccomp:\t2\n" in Path(f"/proc/{pid}/status").read_text()


def alive_and_filtered(child: children.Child) -> None:
    assert not child.reap(), f"backend ended: {child.describe_end()}"
    assert filtered(child.pid)


def stop(child: children.Child, ours: socket.socket, driver: QueueDriver) -> None:
    driver.close()
    ours.close()
    deadline = time.monotonic() + 10
    while not child.reap():
        assert time.monotonic() < deadline, "backend did not end with its connection"
        time.sleep(0.05)
    assert os.WIFEXITED(child.status) and os.WEXITSTATUS(child.status) == 0, \
        child.describe_end()


@pytest.fixture
def short_dir(tmp_path_factory):
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="cf", dir="/tmp"))
    yield path
    shutil.rmtree(path)


def recv_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"EOF after {len(data)} bytes"
        data += chunk
    return data


@pytest.mark.parametrize("fork", list(FORKS))
def test_confined_console_serves_both_ways(short_dir, fork):
    path = str(short_dir / "con.sock")
    listener = bind_private(path)
    child, ours = spawn("virtio-console", lambda sock: serve_console(
        listener, sock, "console c", True), [listener.fileno()], fork)
    listener.close()
    driver = QueueDriver(P.Connection(ours), [256, 256])
    driver.start(VERSION_1)
    check_jailed(child.pid, os.getpid(), filters=FILTERS[fork])     # its root is empty
    rx, tx = driver.rings
    try:
        tx.add([b"before anyone\n"])                            # kept for the client
        tx.wait_used()
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.settimeout(10)
        assert recv_exactly(client, 14) == b"before anyone\n"
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        second.settimeout(10)
        assert second.recv(200) == busy_message("console c")
        data = os.urandom(200_000)
        threading.Thread(target=client.sendall, args=(data,), daemon=True).start()
        got = b""
        for _ in range(16):
            rx.add([(4096, True)])
        while len(got) < len(data):
            for _, written, chunk in rx.wait_used():
                got += chunk[:written]
                rx.add([(4096, True)])
        assert got == data
        big = os.urandom(300_000)
        reader = threading.Thread(target=lambda: setattr(reader, "got", recv_exactly(
            client, len(big))), daemon=True)
        reader.start()
        for offset in range(0, len(big), 4096):
            while not tx.free:
                tx.wait_used()
            tx.add([big[offset:offset + 4096]])
        reader.join(30)
        assert reader.got == big
        client.close()                                          # and a reconnect
        time.sleep(0.2)
        tx.add([b"again\n"])
        tx.wait_used()
        third = socket.socket(socket.AF_UNIX)
        third.connect(path)
        third.settimeout(10)
        assert recv_exactly(third, 6) == b"again\n"
        alive_and_filtered(child)
    finally:
        stop(child, ours, driver)


@pytest.mark.parametrize("fork", list(FORKS))
def test_confined_vsock_serves_streams_both_ways(short_dir, fork):
    path = str(short_dir / "v.vsock")
    listener = bind_private(path)
    child, ours = spawn("virtio-vsock", lambda sock: serve_vsock(
        CID, listener, path, sock, True), [listener.fileno()], fork)
    listener.close()
    driver = QueueDriver(P.Connection(ours), [256, 256, 256])
    driver.start(VERSION_1)
    # Its root holds only the socket directory, where the guest's streams go.
    check_jailed(child.pid, os.getpid(), reach=str(short_dir), filters=FILTERS[fork])
    guest = GuestVsock(driver, CID)
    host_listener = socket.socket(socket.AF_UNIX)
    host_listener.bind(f"{path}_5000")
    host_listener.listen(4)
    host_listener.settimeout(10)
    try:
        # Guest -> host, with a refusal first (no one on port 5001).
        try:
            guest.connect(5001)
            raise AssertionError("connected to nothing")
        except Exception as error:                              # Reset
            assert "reset" in str(error)
        data = os.urandom(500_000)
        result = {}

        def serve():
            conn, _ = host_listener.accept()
            conn.settimeout(20)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            result["data"] = b"".join(chunks)
            conn.sendall(hashlib.md5(result["data"]).hexdigest().encode())
            conn.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        stream = guest.connect(5000)
        stream.send(data)
        stream.shutdown(SHUTDOWN_SEND)
        assert stream.recv_until_eof().decode() == hashlib.md5(data).hexdigest()
        stream.close()
        server.join(20)
        assert result["data"] == data
        # Host -> guest: CONNECT, OK, data, and a bad CONNECT line.
        bad = socket.socket(socket.AF_UNIX)
        bad.connect(path)
        bad.sendall(b"NONSENSE\n")
        bad.settimeout(10)
        assert bad.recv(10) == b""
        guest.listen(6000)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.settimeout(10)
        client.sendall(b"CONNECT 6000\n")
        incoming = guest.accept()
        line = client.recv(100)
        assert line == f"OK {incoming.host_port}\n".encode()
        payload = os.urandom(300_000)
        threading.Thread(target=lambda: (client.sendall(payload),
                                         client.shutdown(socket.SHUT_WR)), daemon=True).start()
        assert incoming.recv_until_eof() == payload
        incoming.send(b"thanks")
        incoming.close()
        assert recv_exactly(client, 6) == b"thanks"
        alive_and_filtered(child)
    finally:
        host_listener.close()
        stop(child, ours, driver)

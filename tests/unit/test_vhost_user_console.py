"""The virtio-console backend driven from the host (tests/framework/virtio_queues.py plays
the guest's driver over vhost-user; a unix socket client plays the user): both ways,
output kept while no client is connected (the newest 64 KiB), one client at a time,
backpressure both ways, hostile chains."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.framework.virtio_queues import QueueDriver
from vmm.devices.virtio.console.device import CONFIG_SIZE, ConsoleDevice
from vmm.devices.virtio.console.port import OUTPUT_BOUND, Port, busy_message
from vmm.devices.virtio.listener import bind_private
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import Backend

VERSION_1 = 1 << 32
RX, TX = 0, 1
PROGRAM = os.path.join(os.path.dirname(sys.executable), "stratovirt-vhost-user-console")


class Console:
    """A console backend on a thread, its driver, and its socket path."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "console.sock")
        self.listener = bind_private(self.path)
        self.port = Port(self.listener, "console c0").start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(
            target=lambda: Backend(ConsoleDevice(self.port), P.Connection(theirs)).serve(),
            daemon=True)
        self.thread.start()
        self.driver = QueueDriver(P.Connection(ours), [256, 256])
        self.features = self.driver.start(VERSION_1)
        self.rx, self.tx = self.driver.rings

    def client(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        sock.settimeout(10)
        return sock

    def guest_write(self, data: bytes, chunk: int = 4096) -> None:
        """hvc0 output: one chain per chunk, completions reaped."""
        for offset in range(0, len(data), chunk):
            while not self.tx.free:
                self.tx.wait_used()
            self.tx.add([data[offset:offset + chunk]])
        while self.tx.chains:
            self.tx.wait_used()

    def guest_read(self, count: int, buffers: int = 8, size: int = 4096) -> bytes:
        """hvc0 input: keep `buffers` receive buffers posted until `count` bytes came."""
        got = b""
        while len(self.rx.chains) < buffers:
            self.rx.add([(size, True)])
        while len(got) < count:
            for _, written, data in self.rx.wait_used():
                got += data[:written]
                self.rx.add([(size, True)])
        return got

    def close(self):
        self.driver.frontend.connection.sock.close()
        self.thread.join(10)
        self.driver.close()


@pytest.fixture
def console(tmp_path):
    c = Console(tmp_path)
    yield c
    c.close()


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return data


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_features_and_config(console):
    assert console.features & VERSION_1
    assert not console.features & 0b111            # no SIZE, MULTIPORT, EMERG_WRITE
    assert console.driver.config(CONFIG_SIZE) == bytes(CONFIG_SIZE)


def test_socket_is_private(console):
    assert os.stat(console.path).st_mode & 0o777 == 0o600


def test_guest_output_reaches_the_client(console):
    client = console.client()
    wait_for(lambda: console.port.client is not None)
    console.guest_write(b"hello from hvc0\n")
    assert recv_exactly(client, 16) == b"hello from hvc0\n"


def test_client_input_reaches_the_guest(console):
    client = console.client()
    data = os.urandom(100_000)
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    assert console.guest_read(len(data)) == data
    sender.join()


def test_output_without_a_client_is_kept_and_delivered(console):
    console.guest_write(b"early boot line\n")
    client = console.client()
    assert recv_exactly(client, 16) == b"early boot line\n"
    console.guest_write(b"live\n")
    assert recv_exactly(client, 5) == b"live\n"


def test_output_beyond_the_bound_drops_the_oldest(console):
    data = bytes(range(256)) * (3 * OUTPUT_BOUND // 256 // 2)       # 96 KiB, no client
    console.guest_write(data)
    client = console.client()
    assert recv_exactly(client, OUTPUT_BOUND) == data[-OUTPUT_BOUND:]
    client.settimeout(0.3)
    with pytest.raises(socket.timeout):
        client.recv(1)                              # nothing more than the bound


def test_second_client_is_refused_with_a_message(console):
    first = console.client()
    wait_for(lambda: console.port.client is not None)
    second = console.client()
    assert second.recv(200) == busy_message("console c0")
    assert second.recv(200) == b""                  # and closed
    console.guest_write(b"still first\n")
    assert recv_exactly(first, 12) == b"still first\n"
    first.close()
    # Once the first one has gone, the next client is served (at once: a client that
    # closed its socket does not hold the console).
    third = console.client()
    console.guest_write(b"third\n")
    assert recv_exactly(third, 6) == b"third\n"


def test_reconnecting_client_gets_what_was_written_meanwhile(console):
    first = console.client()
    wait_for(lambda: console.port.client is not None)
    first.close()
    console.guest_write(b"while away\n")
    wait_for(lambda: console.port.client is None)
    second = console.client()
    assert recv_exactly(second, 11) == b"while away\n"


def test_half_closed_client_still_gets_output(console):
    client = console.client()
    client.sendall(b"cmd\n")
    client.shutdown(socket.SHUT_WR)
    assert console.guest_read(4) == b"cmd\n"
    console.guest_write(b"reply\n")
    assert recv_exactly(client, 6) == b"reply\n"


def test_slow_client_holds_back_the_guest_without_loss(console):
    """A client that does not read: the device stops taking the guest's output once
    64 KiB wait (plus what the socket holds); nothing is dropped; reading resumes it."""
    client = console.client()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    wait_for(lambda: console.port.client is not None)
    data = os.urandom(2 << 20)
    writer = threading.Thread(target=console.guest_write, args=(data,))
    writer.start()
    time.sleep(1.0)
    assert writer.is_alive()                        # held back
    assert len(console.port.output) <= OUTPUT_BOUND + 4096
    assert recv_exactly(client, len(data)) == data
    writer.join(30)
    assert not writer.is_alive()


def test_input_waits_for_guest_buffers(console):
    """No receive buffers: the client's bytes stay in its socket (its writes block once
    the socket is full) rather than piling up in the backend."""
    client = console.client()
    client.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += client.send(bytes(65536))
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += client.send(bytes(65536))
            except BlockingIOError:
                break
    assert time.monotonic() < deadline, "the client never blocked: input is buffered"
    assert sent < 8 << 20
    client.settimeout(10)
    assert console.guest_read(sent, buffers=64) == bytes(sent)


def test_hostile_chains_do_not_break_the_device(console):
    client = console.client()
    wait_for(lambda: console.port.client is not None)
    console.tx.add([(100, True)])                    # writable buffer on transmitq
    console.tx.wait_used()
    client.sendall(b"x")
    console.rx.add([b"readable only"])               # no room for input on receiveq
    console.rx.wait_used()
    assert console.guest_read(1) == b"x"
    console.guest_write(b"ok\n")
    assert recv_exactly(client, 3) == b"ok\n"


def test_program_conventions(tmp_path):
    caps = subprocess.run([PROGRAM, "--print-capabilities"], capture_output=True, text=True,
                          check=True)
    assert json.loads(caps.stdout)["type"] == "console"
    vhost, path = tmp_path / "vhost.sock", tmp_path / "con.sock"
    proc = subprocess.Popen([PROGRAM, "--socket-path", str(vhost), "--console-socket",
                             str(path)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: vhost.exists() and path.exists())
        assert os.stat(path).st_mode & 0o777 == 0o600
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vhost))
        driver = QueueDriver(P.Connection(sock), [256, 256])
        driver.start(VERSION_1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(10)
        driver.rings[TX].add([b"from the program\n"])
        driver.rings[TX].wait_used()
        assert recv_exactly(client, 17) == b"from the program\n"
        driver.close()
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    assert not vhost.exists() and not path.exists()
    path.write_text("")
    taken = subprocess.run([PROGRAM, "--socket-path", str(vhost), "--console-socket",
                            str(path)], capture_output=True, text=True, timeout=30)
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines()[-1] == \
        f"Error: --console-socket: {path}: Address already in use"
    assert not vhost.exists()

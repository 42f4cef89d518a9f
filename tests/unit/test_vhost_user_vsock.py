"""The vsock backend driven from the host: tests/framework/vsock_guest.py plays the
guest's vsock stack over vhost-user, unix sockets play the host's programs (Firecracker's
hybrid convention). Streams both ways with checksums, several at once, credit with slow
readers on either side, refusals, and hostile packets."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.framework.virtio_queues import QueueDriver
from tests.framework.vsock_guest import GuestStream, GuestVsock, Reset
from vmm.devices.virtio.listener import bind_private
from vmm.devices.virtio.vsock import muxer as M
from vmm.devices.virtio.vsock.device import CONFIG_SIZE, VsockDevice
from vmm.devices.virtio.vsock.packet import (HEADER_SIZE, HOST_CID, OP_CREDIT_REQUEST,
                                             OP_CREDIT_UPDATE, OP_RST, OP_RW, OP_SHUTDOWN,
                                             SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
                                             Header)
from vmm.log_limit import guest as guest_lines
from vmm.vhost_user import protocol as P
from vmm.vhost_user.backend import Backend

VERSION_1 = 1 << 32
CID = 7
PROGRAM = os.path.join(os.path.dirname(sys.executable), "stratovirt-vhost-user-vsock")


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    yield path
    shutil.rmtree(path)


class Vsock:
    def __init__(self, directory: Path, split_header: bool = True):
        self.path = str(directory / "v.vsock")
        self.muxer = M.Muxer(CID, bind_private(self.path), self.path).start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(
            target=lambda: Backend(VsockDevice(self.muxer), P.Connection(theirs)).serve(),
            daemon=True)
        self.thread.start()
        self.driver = QueueDriver(P.Connection(ours), [256, 256, 256])
        self.features = self.driver.start(VERSION_1)
        self.guest = GuestVsock(self.driver, CID, split_header=split_header)
        self.listeners: list[socket.socket] = []

    def host_listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{self.path}_{port}")
        listener.listen(16)
        listener.settimeout(10)
        self.listeners.append(listener)
        return listener

    def host_connect(self, port: int) -> tuple[socket.socket, str]:
        """Host-initiated: CONNECT, and the answer line (the guest must be pumped
        meanwhile, so the line is read on a thread)."""
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(self.path)
        client.settimeout(10)
        client.sendall(f"CONNECT {port}\n".encode())
        return client

    def close(self):
        for listener in self.listeners:
            listener.close()
        self.driver.frontend.connection.sock.close()
        self.thread.join(10)
        self.driver.close()


@pytest.fixture
def vsock(short_dir):
    v = Vsock(short_dir)
    yield v
    v.close()


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            return line
        line += byte
    return line


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def in_thread(function, *args):
    result = {}

    def run():
        try:
            result["value"] = function(*args)
        except BaseException as error:          # reported by join()
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "host side still running"
        if "error" in result:
            raise result["error"]
        return result.get("value")
    return join


def pump_until(vsock, predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        vsock.guest.pump(0.05)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_features_and_config(vsock):
    assert vsock.features & VERSION_1
    assert vsock.driver.config(CONFIG_SIZE) == CID.to_bytes(8, "little")
    assert os.stat(vsock.path).st_mode & 0o777 == 0o600


def echo_md5_server(listener: socket.socket) -> tuple[bytes, str]:
    """Accept one stream, read it to its end, answer the md5 of what came."""
    conn, _ = listener.accept()
    conn.settimeout(20)
    data = recv_all(conn)
    conn.sendall(md5(data).encode())
    conn.close()
    return data


def test_guest_connects_to_host_both_ways(vsock):
    listener = vsock.host_listen(5000)
    host = in_thread(echo_md5_server, listener)
    stream = vsock.guest.connect(5000)
    data = os.urandom(1 << 20)
    stream.send(data)
    stream.shutdown(SHUTDOWN_SEND)
    reply = stream.recv_until_eof()
    assert host() == data
    assert reply.decode() == md5(data)
    stream.close()                                      # SHUTDOWN both -> RST
    assert not vsock.muxer.conns


def test_guest_connection_to_a_port_nobody_listens_on_is_reset(vsock):
    with pytest.raises(Reset):
        vsock.guest.connect(5001)
    assert vsock.guest.received[-1].op == OP_RST


def host_to_guest(vsock, port: int, data: bytes):
    """Host side of a host-initiated stream: CONNECT, OK, data, half-close, reply."""
    client = vsock.host_connect(port)
    ok = read_line(client)
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    reply = recv_all(client)
    client.close()
    return ok, reply


def test_host_connects_to_guest_both_ways(vsock):
    vsock.guest.listen(6000)
    data = os.urandom(1 << 20)
    host = in_thread(host_to_guest, vsock, 6000, data)
    stream = vsock.guest.accept()
    received = stream.recv_until_eof()
    stream.send(md5(received).encode())
    stream.close()
    ok, reply = host()
    assert ok == f"OK {stream.host_port}\n".encode()
    assert stream.host_port >= M.LOCAL_PORT_BASE
    assert received == data and reply.decode() == md5(data)


def test_host_connection_to_a_port_nobody_listens_on_is_closed(vsock):
    client = vsock.host_connect(6001)
    # The guest stack answers the REQUEST with RST, as Linux does with no listener.
    pump_until(vsock, lambda: any(h.op == 1 and h.dst_port == 6001
                                  for h in vsock.guest.received))
    assert read_line(client) == b""                     # closed, no OK
    assert not vsock.muxer.conns


@pytest.mark.parametrize("line", [b"CONNECT\n", b"CONNECT x\n", b"HELLO 5\n",
                                  b"CONNECT 99999999999\n", b"C" * 40])
def test_bad_connect_lines_are_closed(vsock, line):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(vsock.path)
    client.settimeout(10)
    client.sendall(line)
    try:
        assert client.recv(100) == b""
    except ConnectionResetError:        # closed with bytes unread (the 41st C)
        pass
    assert not vsock.muxer.conns and not vsock.muxer.handshakes


def test_connect_line_and_data_in_one_write(vsock):
    vsock.guest.listen(6002)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(vsock.path)
    client.settimeout(10)
    client.sendall(b"CONNECT 6002\nrest of it")
    client.shutdown(socket.SHUT_WR)
    stream = vsock.guest.accept()
    assert stream.recv_until_eof() == b"rest of it"


def test_several_streams_at_once_both_directions(vsock):
    count, size = 6, 300_000
    payloads = [os.urandom(size + i) for i in range(2 * count)]
    listeners = [vsock.host_listen(7000 + i) for i in range(count)]
    servers = [in_thread(echo_md5_server, listener) for listener in listeners]
    for i in range(count):
        vsock.guest.listen(8000 + i)
    clients = [in_thread(host_to_guest, vsock, 8000 + i, payloads[count + i])
               for i in range(count)]
    outgoing = [vsock.guest.connect(7000 + i) for i in range(count)]
    incoming = {}
    while len(incoming) < count:
        stream = vsock.guest.accept()
        incoming[stream.guest_port] = stream
    # Interleave: a chunk of each outgoing stream in turn, while incoming data arrives.
    offsets = [0] * count
    while any(offsets[i] < len(payloads[i]) for i in range(count)):
        for i, stream in enumerate(outgoing):
            if offsets[i] < len(payloads[i]):
                chunk = payloads[i][offsets[i]:offsets[i] + 16384]
                stream.send(chunk)
                offsets[i] += len(chunk)
                if offsets[i] == len(payloads[i]):
                    stream.shutdown(SHUTDOWN_SEND)
    received = {port: stream.recv_until_eof() for port, stream in incoming.items()}
    for port, stream in incoming.items():
        stream.send(md5(received[port]).encode())
        stream.close()
    replies = [stream.recv_until_eof() for stream in outgoing]
    for stream in outgoing:
        stream.close()
    for i in range(count):
        assert servers[i]() == payloads[i]
        assert replies[i].decode() == md5(payloads[i])
        ok, reply = clients[i]()
        assert ok.startswith(b"OK ")
        assert received[8000 + i] == payloads[count + i]
        assert reply.decode() == md5(payloads[count + i])
    assert not vsock.muxer.conns


def test_slow_guest_reader_stops_host_reads(vsock):
    """The guest consumes nothing: the host may send at most the guest's buf_alloc,
    then its writes wait in its own socket; consuming lets the rest through."""
    vsock.guest.listen(6003)
    data = os.urandom(4 << 20)
    client = vsock.host_connect(6003)
    writer = in_thread(lambda: (read_line(client), client.sendall(data),
                                client.shutdown(socket.SHUT_WR)))
    stream = vsock.guest.accept()
    pump_until(vsock, lambda: len(stream.data) >= stream.buf_alloc // 2)
    for _ in range(20):
        vsock.guest.pump(0.05)
    assert len(stream.data) <= stream.buf_alloc              # never beyond our credit
    assert len(stream.data) == stream.buf_alloc               # and the credit was used
    received = stream.recv_until_eof()
    writer()
    assert stream.data == b"" and md5(received) == md5(data)
    stream.close()


def test_slow_host_reader_holds_the_guest_to_its_credit(vsock):
    """The host reads nothing: the guest can send at most buf_alloc beyond what the
    host socket holds; a sender past its credit waits; reading lets it finish."""
    listener = vsock.host_listen(5002)
    stream = vsock.guest.connect(5002)
    conn, _ = listener.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(4 << 20)
    with pytest.raises(TimeoutError):
        stream.send(data, timeout=2)
    sent = stream.tx_cnt
    [muxed] = vsock.muxer.conns.values()
    assert len(muxed.pending) <= M.BUF_ALLOC
    assert sent < 2 << 20
    reader = in_thread(lambda: recv_all(conn))
    stream.send(data[sent:])
    stream.shutdown(SHUTDOWN_SEND)
    assert md5(reader()) == md5(data)
    stream.close()


def test_credit_request_is_answered(vsock):
    listener = vsock.host_listen(5003)
    stream = vsock.guest.connect(5003)
    conn, _ = listener.accept()             # kept open: closing it would end the stream
    before = len(vsock.guest.received)
    stream.packet(OP_CREDIT_REQUEST)
    pump_until(vsock, lambda: len(vsock.guest.received) > before)
    update = vsock.guest.received[-1]
    assert update.op == OP_CREDIT_UPDATE and update.buf_alloc == M.BUF_ALLOC
    conn.close()


def test_host_closing_ends_the_guests_stream(vsock):
    listener = vsock.host_listen(5004)
    stream = vsock.guest.connect(5004)
    conn, _ = listener.accept()
    conn.sendall(b"bye")
    conn.close()
    assert stream.recv_until_eof() == b"bye"
    stream.close()


def test_single_buffer_receive_layout(short_dir):
    v = Vsock(short_dir, split_header=False)
    try:
        listener = v.host_listen(5005)
        host = in_thread(echo_md5_server, listener)
        stream = v.guest.connect(5005)
        data = os.urandom(200_000)
        stream.send(data)
        stream.shutdown(SHUTDOWN_SEND)
        assert stream.recv_until_eof().decode() == md5(data)
        assert host() == data
    finally:
        v.close()


# ---- hostile guests

def header(**fields) -> Header:
    base = dict(src_cid=CID, dst_cid=HOST_CID, src_port=40000, dst_port=5000, len=0,
                type=TYPE_STREAM, op=OP_RW, flags=0, buf_alloc=65536, fwd_cnt=0)
    base.update(fields)
    return Header(**base)


def replies_to(vsock, send, wait=0.5) -> list[Header]:
    before = len(vsock.guest.received)
    send()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        vsock.guest.pump(0.05)
    return vsock.guest.received[before:]


def test_malformed_packets_get_rst_or_are_dropped(vsock):
    g = vsock.guest
    # Too short for a header: dropped.
    assert replies_to(vsock, lambda: g.raw([b"\x01" * 20])) == []
    # Not from the guest's CID: dropped (no one to answer).
    assert replies_to(vsock, lambda: g.send(header(src_cid=99, op=OP_RW))) == []
    # To a CID other than the host: RST from that address.
    [rst] = replies_to(vsock, lambda: g.send(header(dst_cid=42, op=1)))
    assert rst.op == OP_RST and rst.src_cid == 42 and rst.dst_port == 40000
    # Not a stream, an unknown op, len beyond the payload, len over 64 KiB: RST.
    for bad, payload in ((header(type=2, op=1), b""), (header(op=99), b""),
                         (header(len=100, op=OP_RW), b"x" * 10),
                         (header(len=1 << 20, op=OP_RW), b"")):
        [rst] = replies_to(vsock, lambda: g.send(bad, payload))
        assert rst.op == OP_RST, bad
    # An RST for nothing gets nothing back.
    assert replies_to(vsock, lambda: g.send(header(op=OP_RST))) == []
    # Chains that are not packets at all: a writable-only chain, an empty one.
    assert replies_to(vsock, lambda: g.raw([(64, True)])) == []
    # The device still works.
    listener = vsock.host_listen(5000)
    host = in_thread(echo_md5_server, listener)
    stream = g.connect(5000)
    stream.send(b"still alive")
    stream.shutdown(SHUTDOWN_SEND)
    assert stream.recv_until_eof().decode() == md5(b"still alive")
    assert host() == b"still alive"


def test_stream_errors_reset_the_stream(vsock):
    listener = vsock.host_listen(5006)
    g = vsock.guest
    overruns = guest_lines.counts().get(("", "credit overrun"), 0)
    # Data beyond the credit the host gave: RST, and the host's socket is closed.
    stream = g.connect(5006)
    conn, _ = listener.accept()
    conn.settimeout(10)
    over = M.BUF_ALLOC + 1
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream.credit = lambda: 1 << 30                          # ignore the credit given
    try:
        stream.send(os.urandom(8 * over), chunk=65536)
    except Reset:
        pass
    pump_until(vsock, lambda: stream.reset)
    assert guest_lines.counts()[("", "credit overrun")] == overruns + 1
    assert recv_all(conn) is not None                        # the host side ends
    # A response nobody asked for, data after SHUTDOWN(SEND), an unknown op: RST.
    for misstep in ((lambda s: s.packet(2)), (lambda s: (s.shutdown(SHUTDOWN_SEND),
                                                         s.packet(OP_RW, b"late"))),
                    (lambda s: s.packet(77))):
        stream = g.connect(5006)
        kept = listener.accept()            # noqa: F841 (closing it would end the stream)
        misstep(stream)
        pump_until(vsock, lambda: stream.reset)
    # A second REQUEST for a live stream resets it.
    stream = g.connect(5006)
    kept = listener.accept()                # noqa: F841
    stream.packet(1)
    pump_until(vsock, lambda: stream.reset)
    assert not vsock.muxer.conns


def test_random_garbage_never_breaks_the_device(vsock):
    import random
    rng = random.Random(1234)
    g = vsock.guest
    listener = vsock.host_listen(5007)
    for _ in range(400):
        kind = rng.randrange(3)
        if kind == 0:
            g.raw([os.urandom(rng.randrange(1, 120))])
        else:
            hdr = header(op=rng.randrange(0, 9), len=rng.choice([0, 1, 5, 44, 70000]),
                         flags=rng.randrange(4), src_port=rng.randrange(40000, 40004),
                         dst_port=rng.choice([5007, 5008]), type=rng.choice([1, 1, 1, 2]))
            g.send(hdr, os.urandom(rng.choice([0, 1, 5, 44])))
        g.pump(0)
    for _ in range(20):
        g.pump(0.05)
    while True:                                  # whatever the garbage connected
        try:
            listener.settimeout(0.2)
            listener.accept()[0].close()
        except socket.timeout:
            break
    listener.settimeout(10)
    host = in_thread(echo_md5_server, listener)
    stream = g.connect(5007)
    stream.send(b"after the garbage")
    stream.shutdown(SHUTDOWN_SEND)
    assert stream.recv_until_eof().decode() == md5(b"after the garbage")
    assert host() == b"after the garbage"


def test_program_conventions(short_dir):
    caps = subprocess.run([PROGRAM, "--print-capabilities"], capture_output=True, text=True,
                          check=True)
    assert json.loads(caps.stdout)["type"] == "vsock"
    vhost, uds = short_dir / "vhost.sock", short_dir / "v.vsock"
    proc = subprocess.Popen([PROGRAM, "--socket-path", str(vhost), "--guest-cid", str(CID),
                             "--uds-path", str(uds)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not (vhost.exists() and uds.exists()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        assert os.stat(uds).st_mode & 0o777 == 0o600
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vhost))
        driver = QueueDriver(P.Connection(sock), [256, 256, 256])
        driver.start(VERSION_1)
        assert driver.config(CONFIG_SIZE) == CID.to_bytes(8, "little")
        guest = GuestVsock(driver, CID)
        guest.listen(9000)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(uds))
        client.settimeout(10)
        client.sendall(b"CONNECT 9000\n")
        stream = guest.accept()
        assert read_line(client).startswith(b"OK ")
        stream.send(b"hello host")
        assert client.recv(100) == b"hello host"
        # The frontend goes: that guest's streams are closed.
        driver.close()
        sock.close()
        assert client.recv(100) == b""
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    assert not vhost.exists() and not uds.exists()
    for bad in (["--guest-cid", "2"], ["--guest-cid", "3", "--uds-path", "/" + "x" * 100]):
        result = subprocess.run([PROGRAM, "--socket-path", str(vhost), "--uds-path",
                                 str(uds), *bad], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and not uds.exists(), result.stderr

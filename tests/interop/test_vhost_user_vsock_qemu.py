"""Our vsock backend under a frontend no one here wrote: QEMU (TCG) with
`-device vhost-user-vsock-device` and Debian's stock kernel with its own vsock drivers
(shared/docs/host.md, way 2). The guest's tool is guest/vsock-io (static, in the
initramfs). Streams both ways with checksums, several at once, and a refusal.

(QEMU 7.2 has no vhost-user frontend for a console: the console backend is tested from
the host's driver in tests/unit and end to end in tests/nested.)"""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.framework.assets import guest_assets
from tests.framework.console import Vm
from tests.interop.test_vhost_user_blk_qemu import host_tsc_khz

BACKEND = Path(sys.executable).parent / "stratovirt-vhost-user-vsock"
CID = 3


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="iv", dir="/tmp"))
    yield path
    shutil.rmtree(path)


class Session:
    def __init__(self, directory: Path):
        self.vhost = directory / "vhost.sock"
        self.uds = directory / "v.vsock"
        self.backend = subprocess.Popen(
            [str(BACKEND), "--socket-path", str(self.vhost), "--guest-cid", str(CID),
             "--uds-path", str(self.uds)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.vhost.exists():
            assert self.backend.poll() is None and time.monotonic() < deadline, \
                self.backend.stdout.read()
            time.sleep(0.02)
        assets = guest_assets()
        self.vm = Vm(["qemu-system-x86_64", "-M", "microvm,accel=tcg,memory-backend=mem",
                      "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                      "-global", "virtio-mmio.force-legacy=false", "-m", "256M",
                      "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                      "-kernel", str(assets / "vmlinuz"), "-initrd", str(assets / "initrd.img"),
                      "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()}",
                      "-chardev", f"socket,id=c0,path={self.vhost}",
                      "-device", "vhost-user-vsock-device,chardev=c0", "-no-reboot"],
                     timeout=600)
        self.vm.expect("initramfs: ready")

    def shell(self, command: str, marker: str) -> re.Match:
        self.vm.send(f"{command}; echo {marker}-$?\n")
        return self.vm.expect(rf"(?s)(.*?)^{marker}-(\d+)$")

    def host_server(self, port: int) -> dict:
        """<uds>_<port>: read one stream to its end, answer its md5."""
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(f"{self.uds}_{port}")
        listener.listen(8)
        listener.settimeout(120)
        found = {}

        def serve():
            conn, _ = listener.accept()
            conn.settimeout(120)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            found["md5"] = hashlib.md5(b"".join(chunks)).hexdigest()
            conn.sendall(found["md5"].encode() + b"\n")
            conn.close()
            listener.close()

        found["thread"] = threading.Thread(target=serve, daemon=True)
        found["thread"].start()
        return found

    def close(self):
        self.vm.send("poweroff -f\n")
        try:
            self.vm.wait()
        finally:
            self.vm.kill()
            self.backend.terminate()
            self.backend.wait(30)


def md5s(text: str) -> list[str]:
    return re.findall(r"\b[0-9a-f]{32}\b", text)


def test_streams_both_ways_several_at_once(short_dir):
    s = Session(short_dir)
    try:
        # Guest -> host: three streams at once, each answered with the md5 the host saw.
        servers = [s.host_server(5000 + i) for i in range(3)]
        s.shell("for i in 0 1 2; do dd if=/dev/urandom of=/p$i bs=65536 count=$((4 + i)) "
                "2>/dev/null; done", "MADE")
        sent = s.shell("md5sum /p0 /p1 /p2", "SUMS")
        out = s.shell("for i in 0 1 2; do vsock-io connect 2 $((5000 + i)) < /p$i > /r$i & "
                      "done; wait; cat /r0 /r1 /r2", "SENT")
        assert out[2] == "0", out[1]
        for server in servers:
            server["thread"].join(60)
        assert md5s(sent[1]) == [server["md5"] for server in servers] == md5s(out[1])

        # Host -> guest: two streams at once, the guest prints what it received.
        s.shell("for i in 0 1; do vsock-io listen $((6000 + i)) < /dev/null > /q$i & done",
                "LISTENING")
        time.sleep(1)
        payloads = [os.urandom(300_000 + i) for i in range(2)]
        oks = []

        def client(i):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(s.uds))
            sock.settimeout(120)
            sock.sendall(f"CONNECT {6000 + i}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                line += sock.recv(1)
            oks.append(line)
            sock.sendall(payloads[i])
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            sock.close()

        clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(120)
        got = s.shell("wait; md5sum /q0 /q1", "RECEIVED")
        assert md5s(got[1]) == [hashlib.md5(p).hexdigest() for p in payloads]
        assert all(re.fullmatch(rb"OK \d+\n", line) for line in oks), oks

        # Refusals: nobody on the host's port 5999; nobody on the guest's port 7000.
        refused = s.shell("vsock-io connect 2 5999 < /dev/null", "REFUSED")
        assert refused[2] == "1" and "Connection reset by peer" in refused[1]
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(s.uds))
        sock.settimeout(60)
        sock.sendall(b"CONNECT 7000\n")
        assert sock.recv(100) == b""
    finally:
        s.close()
    assert s.backend.returncode == 0
    assert not s.vhost.exists() and not s.uds.exists()

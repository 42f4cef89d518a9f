"""Our virtio-net backend under a frontend no one here wrote: QEMU (TCG) with
`-netdev vhost-user` and Debian's stock kernel and its virtio_net driver as the guest
(shared/docs/host.md, way 2). The backend runs inside a network namespace the test
creates, on a tap there; the guest is 10.78.0.2, the namespace 10.78.0.1, and no frame
leaves the namespace."""

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.framework.netns import Netns
from tests.interop.test_vhost_user_blk_qemu import host_tsc_khz, shell
from tests.framework.assets import guest_assets
from tests.framework.console import Vm

pytestmark = pytest.mark.needs_root

BACKEND = os.path.join(os.path.dirname(sys.executable), "stratovirt-vhost-user-net")
GUEST, HOST = "10.78.0.2", "10.78.0.1"
GUEST_MAC = "52:54:00:12:34:56"
TRANSFER = 2 << 20


@pytest.fixture
def ns():
    with Netns() as ns:
        ns.add_tap("qtap0", f"{HOST}/24")
        yield ns


def start_backend(ns: Netns, tmp_path):
    socket_path = tmp_path / "net.sock"
    backend = subprocess.Popen(ns.command(BACKEND, "--socket-path", str(socket_path),
                                          "--tap", "qtap0"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert backend.poll() is None and time.monotonic() < deadline, backend.stdout.read()
        time.sleep(0.02)
    return backend, socket_path


def qemu_guest(socket_path) -> Vm:
    assets = guest_assets()
    return Vm(["qemu-system-x86_64", "-M", "microvm,accel=tcg,memory-backend=mem",
               "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
               "-global", "virtio-mmio.force-legacy=false", "-m", "256M",
               "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
               "-kernel", str(assets / "vmlinuz"), "-initrd", str(assets / "initrd.img"),
               "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()}",
               "-chardev", f"socket,id=c0,path={socket_path}",
               "-netdev", "vhost-user,id=n0,chardev=c0",
               "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
               "-no-reboot"], timeout=300)


class Server(threading.Thread):
    """One TCP connection in the namespace: send `data` (then close), or receive
    everything until the peer closes; `received` and its md5 afterwards."""

    def __init__(self, ns: Netns, port: int, data: bytes | None = None):
        super().__init__(daemon=True)
        self.listener = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((HOST, port))
        self.listener.listen(1)
        self.listener.settimeout(120)
        self.data = data
        self.received = b""
        self.start()

    def run(self):
        connection, _ = self.listener.accept()
        with connection:
            if self.data is not None:
                connection.sendall(self.data)
            else:
                while chunk := connection.recv(1 << 16):
                    self.received += chunk
        self.listener.close()


def md5_in(text: str) -> str:
    return re.search(r"\b[0-9a-f]{32}\b", text).group(0)


def test_guest_pings_and_transfers_through_our_backend(ns, tmp_path):
    backend, socket_path = start_backend(ns, tmp_path)
    vm = qemu_guest(socket_path)
    try:
        vm.expect("initramfs: ready")
        shell(vm, f"busybox ip link set eth0 up && busybox ip addr add {GUEST}/24 dev eth0",
              "UP")
        mac = shell(vm, "cat /sys/class/net/eth0/address", "MAC")[1].split()[-1]
        assert mac == GUEST_MAC
        ping = shell(vm, f"busybox ping -c 3 -W 5 {HOST}", "PING")
        assert ping[2] == "0", ping[1]
        # The other way round: the namespace pings the guest.
        back = ns.run("busybox", "ping", "-c", "3", "-W", "5", GUEST, check=False)
        assert back.returncode == 0, back.stdout + back.stderr

        # guest -> namespace
        server = Server(ns, 7001)
        shell(vm, f"busybox dd if=/dev/urandom of=/out bs=65536 count={TRANSFER >> 16} "
                  "2>/dev/null", "MADE")
        sent = md5_in(shell(vm, "busybox md5sum /out", "SUM")[1])
        assert shell(vm, f"busybox nc {HOST} 7001 < /out", "SENT")[2] == "0"
        server.join(120)
        assert hashlib.md5(server.received).hexdigest() == sent

        # namespace -> guest
        data = os.urandom(TRANSFER)
        server = Server(ns, 7002, data)
        assert shell(vm, f"busybox nc {HOST} 7002 < /dev/null > /in", "GOT")[2] == "0"
        server.join(120)
        got = md5_in(shell(vm, "busybox md5sum /in", "SUM")[1])
        assert got == hashlib.md5(data).hexdigest()
        # With QEMU as the frontend, the guest still negotiated our offloads.
        features = shell(vm, "cat /sys/class/net/eth0/device/features", "FEAT")[1]
        bits = features.strip().split()[-1]
        assert bits[0] == "1" and bits[15] == "1", bits      # CSUM, MRG_RXBUF
    finally:
        vm.send("busybox poweroff -f\n")
        try:
            vm.wait()
        finally:
            vm.kill()
            backend.terminate()
            backend.wait(30)
    assert not socket_path.exists()


def test_backend_conventions(ns, tmp_path):
    caps = subprocess.run([BACKEND, "--print-capabilities"], capture_output=True, text=True,
                          check=True)
    assert '"type": "net"' in caps.stdout
    missing = subprocess.run(ns.command(BACKEND, "--socket-path", str(tmp_path / "x.sock"),
                                        "--tap", "absent0"), capture_output=True, text=True)
    assert missing.returncode != 0 and "absent0: no such interface" in missing.stderr
    assert "absent0" not in ns.run("ip", "link").stdout
    assert not (tmp_path / "x.sock").exists()

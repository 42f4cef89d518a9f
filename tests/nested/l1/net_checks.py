"""Runs inside L1: virtio-net through our vhost-user backends, with Debian's stock kernel
as L2 and two taps that L1 (a VM the test owns) creates. Prints `CHECK <name> <json>`
lines for tests/nested/test_virtio_net.py to judge.

L2 is 10.0.0.2 on eth0 (tap0, 10.0.0.1 in L1) and 10.0.1.2 on eth1 (tap1, 10.0.1.1).
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

from console import Timeout, Vm

MiB = 1 << 20
TRANSFER = 4 * MiB
MAC0 = "0e:00:00:00:00:02"
# Bytes per second L2 may send on eth1 (throttling.tx-bps): well below what L2 manages
# unlimited under TCG (about 140 KB/s of TCP on this machine), so the limit binds.
TX_LIMIT = 24 * 1024
APPEND = "console=ttyS0 reboot=k panic=1 quiet"
NETS = {"tap0": ("10.0.0.1", "10.0.0.2", "eth0"), "tap1": ("10.0.1.1", "10.0.1.2", "eth1")}


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def shell(vm: Vm, command: str, marker: str) -> tuple[str, int]:
    """Run `command` in L2: what it printed, and its exit status."""
    vm.send(f"{command}; echo {marker}-$?\n")
    found = vm.expect(rf"(?s)(.*?)^{marker}-(\d+)$")
    return found[1], int(found[2])


def make_taps() -> None:
    run("modprobe", "tun")
    for tap, (host, _, _) in NETS.items():
        run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        run("ip", "addr", "add", f"{host}/24", "dev", tap)
        run("ip", "link", "set", tap, "up")


class Server(threading.Thread):
    """One TCP connection on L1's side: send `data`, or receive until the peer closes."""

    def __init__(self, address: str, port: int, data: bytes | None = None):
        super().__init__(daemon=True)
        self.listener = socket.create_server((address, port))
        self.listener.settimeout(300)
        self.data = data
        self.received = b""
        self.first = self.last = 0.0       # monotonic times of the first and last bytes in
        self.start()

    def run(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            if self.data is not None:
                connection.sendall(self.data)
            else:
                while chunk := connection.recv(1 << 16):
                    self.last = time.monotonic()
                    self.first = self.first or self.last
                    self.received += chunk
        self.listener.close()


def transfer(vm: Vm, tap: str, port: int, length: int) -> dict:
    """length random bytes L2 -> L1 and then L1 -> L2 over TCP (busybox nc in L2); the
    md5 each side computed."""
    host, _, _ = NETS[tap]
    server = Server(host, port)
    shell(vm, f"dd if=/dev/urandom of=/out bs=65536 count={length >> 16} 2>/dev/null", "MADE")
    sent = shell(vm, "md5sum /out", "SUM")[0].split()[-2]
    nc_out = shell(vm, f"nc {host} {port} < /out", "SENT")[1]
    server.join(300)
    data = os.urandom(length)
    server_in = Server(host, port + 1, data)
    nc_in = shell(vm, f"nc {host} {port + 1} < /dev/null > /in", "GOT")[1]
    server_in.join(300)
    got = shell(vm, "md5sum /in", "SUM")[0].split()[-2]
    return {"out": {"guest": sent, "host": hashlib.md5(server.received).hexdigest(),
                    "status": nc_out,
                    "rate": len(server.received) / max(server.last - server.first, 1e-3)},
            "in": {"guest": got, "host": hashlib.md5(data).hexdigest(), "status": nc_in}}


def backends() -> dict[str, int]:
    """Our NIC backend processes by name."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                name = open(f"/proc/{pid}/comm").read().strip()
            except OSError:
                continue
            if name.startswith("vmm-net-"):
                found[name] = int(pid)
    return found


def two_nics() -> None:
    """Both NICs configured in L2, pings both ways on each, TCP both ways with checksums
    (eth1's transmit limited to TX_LIMIT bytes/s: its stream out is timed, beside eth0's
    unlimited one), then malformed frames from L2 (rawsend, from a disk) and the NICs
    still work."""
    api = "/tmp/net.sock"
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-smp", "2", "-m", "512M", "-serial", "stdio",
             "-api-channel", f"unix:{api}",
             "-drive", "file=/payload/files/tools.ext4,id=tools,readonly=true",
             "-netdev", f"id=net0,netdev=tap0,mac={MAC0}",
             "-netdev", f"id=net1,netdev=tap1,throttling.tx-bps={TX_LIMIT}"],
            timeout=1200)       # every L2 instruction is emulated twice over: minutes
    try:
        vm.expect("initramfs: ready")
        result = {"macs": {}, "ping_out": {}, "ping_in": {}}
        for tap, (host, guest, eth) in NETS.items():
            shell(vm, f"ip link set {eth} up && ip addr add {guest}/24 dev {eth}", "UP")
            result["macs"][eth] = shell(vm, f"cat /sys/class/net/{eth}/address", "MAC")[0] \
                .split()[-1]
            result["ping_out"][eth] = shell(vm, f"ping -c 3 -W 10 {host}", "PING")[1]
            result["ping_in"][eth] = run("busybox", "ping", "-c", "3", "-W", "10",
                                         guest).returncode
        result["features"] = shell(vm, "cat /sys/class/net/eth0/device/features",
                                   "FEAT")[0].split()[-1]
        result["transfer0"] = transfer(vm, "tap0", 7000, TRANSFER)
        result["transfer1"] = transfer(vm, "tap1", 7100, MiB // 2)  # tx limited: ~20 s
        result["tx_limit"] = TX_LIMIT
        before = backends()

        # Malformed frames from the guest, both NICs, then everything must still work.
        shell(vm, "mount -o ro /dev/vda /mnt", "MOUNT")
        sends = [shell(vm, f"/mnt/rawsend {eth} 3000 {seed}", "RAW")
                 for seed, eth in enumerate(("eth0", "eth1", "eth0"))]
        result["rawsend"] = [(text.strip().splitlines() or [""])[-1] for text, _ in sends]
        result["after_ping"] = [shell(vm, f"ping -c 2 -W 10 {host}", "PING2")[1]
                                for host, _, _ in NETS.values()]
        result["after_transfer"] = transfer(vm, "tap0", 7200, MiB)
        result["backends_before"] = before
        result["backends_after"] = backends()
        result["tap_errors"] = {tap: open(f"/sys/class/net/{tap}/statistics/rx_errors").read()
                                .strip() for tap in NETS}
        vm.send("poweroff -f\n")
        result["status"] = vm.wait()
        result["api_left"] = os.path.exists(api)
        result["backends_left"] = backends()
        report("two_nics", **result)
    finally:
        vm.kill()


def generated_mac() -> None:
    """The MAC L2 saw on eth1 (no mac= given), as the project computes it."""
    from vmm.devices.virtio.net.attach import nic_mac
    from vmm.config.limits import DEFAULT_NAME
    from vmm.config.model import Nic
    from vmm.devices.virtio.net.device import format_mac
    report("generated_mac", mac=format_mac(nic_mac(Nic("net1", "tap1", None), DEFAULT_NAME)))


def empty_slot() -> None:
    """One -netdev: slot 7 is an empty NIC slot, which L2 sees as eth1 with no carrier;
    bringing it up and sending on it changes nothing for eth0."""
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-m", "256M", "-serial", "stdio",
             "-api-channel", "unix:/tmp/empty.sock", "-netdev", "id=net0,netdev=tap0"],
            timeout=900)
    try:
        vm.expect("initramfs: ready")
        driver = shell(vm, "busybox basename "
                           "$(busybox readlink /sys/class/net/eth1/device/driver)", "DRV")[0]
        shell(vm, "ip link set eth1 up && ip addr add 10.9.9.2/24 dev eth1", "UP1")
        carrier = shell(vm, "cat /sys/class/net/eth1/carrier", "CARRIER")[0]
        ping_empty = shell(vm, "ping -c 2 -W 3 10.9.9.1", "PINGE")[1]
        shell(vm, "ip link set eth0 up && ip addr add 10.0.0.2/24 dev eth0", "UP0")
        ping0 = shell(vm, "ping -c 2 -W 10 10.0.0.1", "PING0")[1]
        vm.send("poweroff -f\n")
        report("empty_slot", driver=driver.split()[-1], carrier=carrier.split()[-1],
               ping_empty=ping_empty, ping0=ping0, status=vm.wait())
    finally:
        vm.kill()


def missing_tap() -> None:
    """A tap that does not exist: one line, exit 1, nothing left (socket, processes,
    no tap created)."""
    api = "/tmp/missing.sock"
    proc = subprocess.run(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
                           "-append", APPEND, "-api-channel", f"unix:{api}",
                           "-netdev", "id=net0,netdev=tap0", "-netdev", "id=bad,netdev=nosuch0"],
                          capture_output=True, text=True, timeout=120)
    report("missing_tap", status=proc.returncode, stderr=proc.stderr,
           api_left=os.path.exists(api), backends_left=backends(),
           created="nosuch0" in run("ip", "link").stdout)


if __name__ == "__main__":
    make_taps()
    failed = 0
    for check in (generated_mac, missing_tap, empty_slot, two_nics):
        try:
            check()
        except (Timeout, OSError, subprocess.SubprocessError) as error:
            print("CHECK-FAILED", check.__name__, repr(error), flush=True)
            failed += 1
    sys.exit(failed)

"""Runs inside L1: QMP hot-plug of disks and NICs into a running L2 (Debian's stock
kernel booted from the rootfs, seccomp on), all in one L2 boot. Prints
`CHECK <name> <json>` lines for tests/nested/test_hotplug.py to judge.

The VM is cold-plugged with the rootfs only (vda, disk slot 0) and no -netdev, so disk
slots 1..5 (vdb..vdf) and both NIC slots (eth0, eth1) are empty from boot. In order:

- disk_plug: an image of 3 MiB + 1536 bytes (6147 sectors, not a multiple of 4 KiB)
  into disk slot 1 (vdb, O_DIRECT): the size L2 sees before and after, its md5 of the
  whole device against L1's, a write of the guest's (O_DIRECT, fsync, the last three
  sectors included), device_del and its DEVICE_DELETED, size 0 again, the guest's
  write in L1's file.
- disk_second: another image (2 MiB + 512 bytes, page cache in L1) into the same slot,
  while a loop in L2 writes and reads back a file on vda with O_DIRECT (io_during_plug).
- nic_ifname / nic_getfd: a NIC on a tap L1 names (netdev_add ifname) in NIC slot 0
  (eth0), and one on a tap fd passed with SCM_RIGHTS (getfd, then netdev_add fds) in
  NIC slot 1 (eth1): carrier 0 -> 1, pings both ways, 1 MiB over TCP both ways. The fd
  is passed blocking, as a management tool holds it; if the first ping fails, L1 makes
  the open file (shared with the VMM's copy) non-blocking and the rest runs on that,
  so the test can tell that failure from others. Then eth0's NIC is unplugged
  (carrier 1 -> 0) and eth1 still works.
- powerdown: system_powerdown, busybox acpid in L2 powers off, status 0, SHUTDOWN.

L1-side timings of each step go into the checks' data (under TCG they mean little).
"""

import asyncio
import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.qmp_client import ExecuteError

from console import Timeout, Vm
from l2_shell import Guest

API = "/tmp/hotplug.sock"
APPEND = "console=ttyS0 root=/dev/vda rw reboot=k panic=1 quiet"
FILES = "/payload/files"           # ext4: O_DIRECT works there (not on L1's /tmp)
KiB, MiB = 1024, 1 << 20
DISK1 = f"{FILES}/hp1.img"
DISK1_SIZE = 3 * MiB + 1536        # 6147 sectors
DISK2 = f"{FILES}/hp2.img"
DISK2_SIZE = 2 * MiB + 512         # 4097 sectors
WRITE_BLOCK = 100                  # the guest's write: 64 blocks of 4 KiB from block 100,
WRITE_LENGTH = 64 * 4 * KiB
TAIL_SECTOR = DISK1_SIZE // 512 - 3    # and the first 1536 bytes of it on the last 3 sectors
TRANSFER = MiB
TAPS = {"hp0": ("10.0.10.1", "10.0.10.2", "eth0"), "hp1": ("10.0.11.1", "10.0.11.2", "eth1")}

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def md5_file(path: str, offset: int = 0, length: int | None = None) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read() if length is None else f.read(length)).hexdigest()


def make_image(path: str, size: int) -> str:
    """Random bytes (never a run of zeros an empty read could fake); their md5."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.md5(data).hexdigest()


class Qmp:
    """qemu.qmp with every event kept, and each command's reply or error, its L1 time
    and the events that had arrived by the time its reply did."""

    def __init__(self, client: QMPClient):
        self.client = client
        self.listener = EventListener()
        client.register_listener(self.listener)
        self.events: list[list] = []

    def _drain(self) -> list[list]:
        fresh = [[event["event"], event.get("data", {})] for event in self.listener.clear()]
        self.events += fresh
        return fresh

    async def __call__(self, command: str, args: dict | None = None) -> dict:
        self._drain()
        start = time.monotonic()
        try:
            reply = await self.client.execute(command, args)
            result = {"ok": True, "return": reply}
        except ExecuteError as error:
            result = {"ok": False, "error": error.received.get("error")}
        result["seconds"] = round(time.monotonic() - start, 3)
        result["events"] = self._drain()
        return result

    async def wait_event(self, name: str, timeout: float) -> list | None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event[0] == name:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                event = await asyncio.wait_for(self.listener.get(), left)
            except asyncio.TimeoutError:
                return None
            self.events.append([event["event"], event.get("data", {})])


class Server(threading.Thread):
    """One TCP connection on L1's side: send `data`, or receive until the peer closes."""

    def __init__(self, address: str, port: int, data: bytes | None = None):
        super().__init__(daemon=True)
        self.listener = socket.create_server((address, port))
        self.listener.settimeout(120)
        self.data = data
        self.received = b""
        self.start()

    def stop(self):
        """The peer never came: end the wait for it now."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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
                    self.received += chunk
        self.listener.close()


async def transfer(guest: Guest, host: str, port: int) -> dict:
    """TRANSFER random bytes L2 -> L1, then L1 -> L2 (busybox nc in L2); each side's md5."""
    start = time.monotonic()
    server = Server(host, port)
    await guest.run(f"dd if=/dev/urandom of=/tmp/out bs=65536 count={TRANSFER >> 16} "
                    "2>/dev/null")
    sent = await guest.md5("/tmp/out")
    _, nc_out = await guest.run(f"busybox nc -w 30 {host} {port} < /tmp/out")
    if nc_out:
        server.stop()
    await asyncio.to_thread(server.join, 300)
    data = os.urandom(TRANSFER)
    server_in = Server(host, port + 1, data)
    _, nc_in = await guest.run(f"busybox nc -w 30 {host} {port + 1} < /dev/null > /tmp/in")
    if nc_in:
        server_in.stop()
    await asyncio.to_thread(server_in.join, 300)
    got = await guest.md5("/tmp/in")
    return {"out": {"guest": sent, "host": hashlib.md5(server.received).hexdigest(),
                    "status": nc_out},
            "in": {"guest": got, "host": hashlib.md5(data).hexdigest(), "status": nc_in},
            "seconds": round(time.monotonic() - start, 2)}


def processes(prefix: str) -> dict[str, int]:
    """Our processes whose name starts with `prefix`, by name."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                name = open(f"/proc/{pid}/comm").read().strip()
            except OSError:
                continue
            if name.startswith(prefix):
                found[name] = int(pid)
    return found


def tap_fd_flags(pid: int) -> list[str]:
    """The file status flags (octal, /proc fdinfo) of every /dev/net/tun fd of `pid`."""
    flags = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun":
                    for line in open(f"/proc/{pid}/fdinfo/{fd}"):
                        if line.startswith("flags:"):
                            flags.append(line.split()[1])
            except OSError:
                pass
    except OSError:
        pass
    return flags


def make_taps() -> int:
    """hp0: a persistent tap (ip tuntap) for netdev_add ifname. hp1: a tap this process
    opens itself (a blocking fd, as a management tool holds it) and will pass with
    SCM_RIGHTS; it lives as long as someone holds it. Both get L1's address."""
    run("modprobe", "tun")
    run("ip", "tuntap", "add", "dev", "hp0", "mode", "tap", "vnet_hdr")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"hp1",
                                           IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    for tap, (host, _, _) in TAPS.items():
        run("ip", "addr", "add", f"{host}/24", "dev", tap)
        run("ip", "link", "set", tap, "up")
    return fd


async def disk_plug(guest: Guest, qmp: Qmp) -> None:
    host_md5 = make_image(DISK1, DISK1_SIZE)
    before = {"size": await guest.value("cat /sys/block/vdb/size"),
              "ro": await guest.value("cat /sys/block/vdb/ro")}
    add = await qmp("blockdev-add", {"node-name": "hp1",
                                     "file": {"driver": "file", "filename": DISK1},
                                     "cache": {"direct": True}, "read-only": False})
    plug = await qmp("device_add", {"id": "hp1", "driver": "virtio-blk-mmio", "addr": "0x1"})
    seen = await guest.wait_change("/sys/block/vdb/size", "0")
    blocks = await qmp("query-block")
    dmesg, _ = await guest.run("busybox dmesg | grep vdb")
    ro = await guest.value("cat /sys/block/vdb/ro")
    start = time.monotonic()
    read = await guest.md5("/dev/vdb")
    read_seconds = round(time.monotonic() - start, 2)
    lines, write_status = await guest.run(
        "dd if=/dev/urandom of=/tmp/w.bin bs=4096 count=64 2>/dev/null && "
        f"dd if=/tmp/w.bin of=/dev/vdb bs=4096 seek={WRITE_BLOCK} oflag=direct "
        "conv=notrunc,fsync 2>&1 && "
        f"dd if=/tmp/w.bin of=/dev/vdb bs=512 seek={TAIL_SECTOR} count=3 oflag=direct "
        "conv=notrunc,fsync 2>&1")
    written = await guest.md5("/tmp/w.bin")
    tail = (await guest.value("head -c 1536 /tmp/w.bin | md5sum")).split()[0]
    await guest.run("echo 3 > /proc/sys/vm/drop_caches")
    reread = await guest.md5("/dev/vdb")
    unplug = await qmp("device_del", {"id": "hp1"})
    gone = await guest.wait_change("/sys/block/vdb/size", seen["value"])
    delete = await qmp("blockdev-del", {"node-name": "hp1"})
    report("disk_plug", before=before, blockdev_add=add, device_add=plug, seen=seen,
           query_block=blocks, dmesg=dmesg, ro_after=ro,
           read={"guest": read, "host": host_md5, "seconds": read_seconds},
           write={"status": write_status, "lines": lines, "guest": written,
                  "host": md5_file(DISK1, WRITE_BLOCK * 4096, WRITE_LENGTH),
                  "tail_guest": tail,
                  "tail_host": md5_file(DISK1, TAIL_SECTOR * 512, 1536)},
           after_write={"guest": reread, "host": md5_file(DISK1)},
           device_del=unplug, gone=gone, blockdev_del=delete,
           sectors=DISK1_SIZE // 512)


IO_LOOP = (
    "touch /io.run; rm -f /io.count /io.result; "
    "(n=0; bad=0; while [ -e /io.run ]; do "
    "dd if=/io.src of=/io.bin bs=65536 oflag=direct conv=fsync 2>/dev/null "
    "|| bad=$((bad+1)); "
    "s=$(dd if=/io.bin bs=65536 iflag=direct 2>/dev/null | md5sum); "
    '[ "${s%% *}" = "$P" ] || bad=$((bad+1)); '
    'n=$((n+1)); echo "$n $bad" > /io.count; done; echo "$n $bad" > /io.result) '
    "</dev/null >/dev/null 2>&1 & true")


async def io_count(guest: Guest, above: int) -> int:
    """Wait until the I/O loop has done more than `above` rounds; how many it has."""
    value = await guest.value(
        "i=0; while :; do c=$(cat /io.count 2>/dev/null); c=${c%% *}; [ -n \"$c\" ] || c=0; "
        f"[ $c -gt {above} ] && break; [ $i -ge 1200 ] && break; sleep 0.1; i=$((i+1)); "
        "done; echo $c")
    return int(value)


async def disk_second(guest: Guest, qmp: Qmp) -> None:
    """Another image in the same slot, while vda is busy with O_DIRECT writes and reads."""
    host_md5 = make_image(DISK2, DISK2_SIZE)
    source = await guest.value("dd if=/dev/urandom of=/io.src bs=65536 count=16 "
                               "2>/dev/null; md5sum < /io.src")
    await guest.run(f"P={source.split()[0]}; {IO_LOOP}")
    rounds = {"started": await io_count(guest, 0)}
    add = await qmp("blockdev-add", {"node-name": "hp2",
                                     "file": {"driver": "file", "filename": DISK2},
                                     "cache": {"direct": False}, "read-only": False})
    plug = await qmp("device_add", {"id": "disk-b", "driver": "virtio-blk-mmio",
                                    "addr": "0x1", "drive": "hp2"})
    seen = await guest.wait_change("/sys/block/vdb/size", "0")
    await guest.run("echo 3 > /proc/sys/vm/drop_caches")
    read = await guest.md5("/dev/vdb")
    rounds["plugged"] = await io_count(guest, 0)
    unplug = await qmp("device_del", {"id": "disk-b"})
    gone = await guest.wait_change("/sys/block/vdb/size", seen["value"])
    delete = await qmp("blockdev-del", {"node-name": "hp2"})
    rounds["unplugged"] = await io_count(guest, 0)
    rounds["after"] = await io_count(guest, rounds["unplugged"])   # one more round at least
    result = await guest.value("rm /io.run; i=0; while [ ! -e /io.result ] && [ $i -lt 1200 ]; "
                               "do sleep 0.1; i=$((i+1)); done; cat /io.result")
    kernel, _ = await guest.run("busybox dmesg | grep -iE 'i/o error|ext4-fs error|"
                                "ext4-fs warning|blk_update|buffer i/o|aborting journal'")
    report("disk_second", blockdev_add=add, device_add=plug, seen=seen,
           read={"guest": read, "host": host_md5}, device_del=unplug, gone=gone,
           blockdev_del=delete, sectors=DISK2_SIZE // 512)
    done, bad = (int(word) for word in result.split())
    report("io_during_plug", rounds=rounds, done=done, bad=bad, kernel=kernel)


async def nic(guest: Guest, qmp: Qmp, tap: str, device_args: dict, port: int,
              fd: int | None = None) -> dict:
    """device_add a NIC whose netdev is recorded, and use it. `fd`: our copy of the tap
    fd passed with getfd (the same open file); if the first ping fails, it is made
    non-blocking and the rest is tried again, to tell that failure from any other."""
    host, address, eth = TAPS[tap]
    result = {"device_add": await qmp("device_add", device_args)}
    result["carrier"] = await guest.wait_change(f"/sys/class/net/{eth}/carrier", "0")
    _, result["ping_out"] = await guest.run(f"busybox ping -c 3 -W 10 {host}")
    name = f"vmm-net-{device_args['id']}"[:15]
    backend = processes(name).get(name)
    result["backend"] = name if backend else None
    result["backend_tap_flags"] = tap_fd_flags(backend) if backend else []
    if fd is not None:
        result["ping_out_as_passed"] = result["ping_out"]
        if result["ping_out"]:
            os.set_blocking(fd, False)
            result["backend_tap_flags_set_by_l1"] = tap_fd_flags(backend) if backend else []
            _, result["ping_out"] = await guest.run(f"busybox ping -c 3 -W 10 {host}")
        os.close(fd)
    result["ping_in"] = (await asyncio.to_thread(
        run, "busybox", "ping", "-c", "3", "-W", "10", address)).returncode
    result["transfer"] = await transfer(guest, host, port)
    return result


async def nics(guest: Guest, qmp: Qmp, tap_fd: int) -> None:
    before = {}
    for tap, (_, address, eth) in TAPS.items():
        await guest.run(f"busybox ip link set {eth} up && "
                        f"busybox ip addr add {address}/24 dev {eth}")
        before[eth] = {
            "carrier": await guest.value(f"cat /sys/class/net/{eth}/carrier"),
            "mac": await guest.value(f"cat /sys/class/net/{eth}/address"),
            "driver": await guest.value(
                f"busybox basename $(busybox readlink /sys/class/net/{eth}/device/driver)")}
    netdev = await qmp("netdev_add", {"id": "hn0", "ifname": "hp0"})
    by_name = await nic(guest, qmp, "hp0", {"id": "hn0", "driver": "virtio-net-mmio",
                                            "addr": "0x0", "netdev": "hn0"}, 7000)
    by_name["netdev_add"] = netdev
    by_name["before"] = before["eth0"]
    by_name["mac_after"] = await guest.value("cat /sys/class/net/eth0/address")
    report("nic_ifname", **by_name)

    # The tap's fd goes over the socket, blocking as we opened it (as a management tool
    # would pass it: QEMU makes such an fd non-blocking itself). Ours is closed after the
    # first ping; from then on the VMM's copy is all that keeps this tap in existence.
    qmp.client.send_fd_scm(tap_fd)
    getfd = await qmp("getfd", {"fdname": "tapfd1"})
    netdev = await qmp("netdev_add", {"id": "hn1", "fds": "tapfd1"})
    by_fd = await nic(guest, qmp, "hp1", {"id": "hn1", "driver": "virtio-net-mmio",
                                          "addr": "0x1"}, 7100, fd=tap_fd)
    by_fd["getfd"], by_fd["netdev_add"] = getfd, netdev
    by_fd["before"] = before["eth1"]
    report("nic_getfd", **by_fd)

    # eth0's NIC out again: its carrier goes, eth1 works on.
    unplug = await qmp("device_del", {"id": "hn0"})
    carrier = await guest.wait_change("/sys/class/net/eth0/carrier", "1")
    delete = await qmp("netdev_del", {"id": "hn0"})
    _, ping1 = await guest.run(f"busybox ping -c 2 -W 10 {TAPS['hp1'][0]}")
    report("nic_unplug", device_del=unplug, carrier=carrier, netdev_del=delete,
           ping_eth1=ping1, backends=sorted(processes("vmm-net-")))


async def powerdown(vm: Vm, guest: Guest, qmp: Qmp) -> None:
    start = time.monotonic()
    press = await qmp("system_powerdown")
    acpid = (await guest.expect(r"^.*PWRF/00000080.*$"))[0]
    init = (await guest.expect(r"^.*Requesting system poweroff.*$"))[0]
    status = await asyncio.to_thread(vm.wait)
    seconds = round(time.monotonic() - start, 2)
    shutdown = await qmp.wait_event("SHUTDOWN", 30)
    report("powerdown", system_powerdown=press, acpid=acpid, init=init, status=status,
           seconds=seconds, shutdown=shutdown, events=qmp.events,
           api_left=os.path.exists(API), backends_left=sorted(processes("vmm-")))


async def scenario(tap_fd: int) -> None:
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
             "-append", APPEND, "-smp", "2", "-m", "512M", "-serial", "stdio",
             "-drive", "file=/l2/rootfs.ext4,id=rootfs,readonly=false",
             "-api-channel", f"unix:{API}"],
            timeout=1500)       # every L2 instruction is emulated twice over: minutes
    timings = {}
    try:
        start = time.monotonic()
        await asyncio.to_thread(vm.expect, "rootfs: ready")
        timings["boot"] = round(time.monotonic() - start, 2)
        guest = Guest(vm)
        await guest.run("mount -t tmpfs tmpfs /tmp")
        client = QMPClient("hotplug")
        await client.connect(API)
        qmp = Qmp(client)
        for name, step in (("disk_plug", disk_plug), ("disk_second", disk_second),
                           ("nics", lambda g, q: nics(g, q, tap_fd))):
            start = time.monotonic()
            await step(guest, qmp)
            timings[name] = round(time.monotonic() - start, 2)
        start = time.monotonic()
        await powerdown(vm, guest, qmp)
        timings["powerdown"] = round(time.monotonic() - start, 2)
        try:
            await client.disconnect()
        except Exception:        # the VM is gone: the connection ended with it
            pass
        report("timings", **timings)
    finally:
        vm.kill()


if __name__ == "__main__":
    try:
        asyncio.run(scenario(make_taps()))
    except (Timeout, OSError, subprocess.SubprocessError, ValueError) as error:
        print("CHECK-FAILED", "hotplug", repr(error), flush=True)
        sys.exit(1)

"""Runs inside L1: boots Debian's stock kernel as L2 under our stratovirt, several ways,
and prints one `CHECK <name> <json>` line per check for the host-side tests to judge.

L1 has /l2/vmlinuz (Debian's cloud kernel), /l2/vmlinux (the same, as an ELF vmlinux),
/l2/initrd.img (busybox initramfs whose
init loads the virtio modules, prints "initramfs: ready" and runs a shell on ttyS0)
and /l2/rootfs.ext4; `stratovirt` and qemu.qmp are installed in /opt/vmm.
"""

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

from qemu.qmp import QMPClient

from console import Timeout, Vm
from vmm.devices.virtio.net.tap import open_tap

APPEND = "console=ttyS0 reboot=k panic=1 quiet"
HOTPLUG_IMAGE = os.path.abspath("kata-hp.img")


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def initrd_vm(api: str, *extra: str, kernel: str = "/l2/vmlinuz") -> list[str]:
    return ["stratovirt", "-kernel", kernel, "-initrd", "/l2/initrd.img",
            "-append", APPEND, "-api-channel", f"unix:{api}", *extra]


def boot_shell(smp: str, mem: str, kernel: str) -> None:
    api = f"/tmp/boot-{smp}.sock"
    vm = Vm(initrd_vm(api, "-smp", smp, "-m", mem, "-serial", "stdio", kernel=kernel))
    try:
        vm.expect("initramfs: ready")
        vm.send("echo cpus=$(grep -c ^processor /proc/cpuinfo) "
                "memory=$(dmesg | sed -n 's/.*Memory: [0-9]*K\\/\\([0-9]*\\)K.*/\\1/p')\n")
        found = vm.expect(r"^cpus=(\d+) memory=(\d+)$")
        vm.send("echo typed-$((6*7))\n")
        vm.expect(r"^typed-42$")
        vm.send("reboot -f\n")
        status = vm.wait()
        report("boot", kernel=kernel, smp=int(smp), mem=mem, cpus=int(found[1]),
               memory_kib=int(found[2]),
               status=status, api_left=os.path.exists(api))
    finally:
        vm.kill()


def seed_example() -> None:
    """spec.md's command, verbatim but for real paths (unquoted -append; an ELF vmlinux,
    as its /path/to/vmlinux.bin)."""
    api = "/tmp/stratovirt.socket"
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinux",
             "-append", "console=ttyS0", "root=/dev/vda", "rw", "reboot=k", "panic=1",
             "-drive", "file=/l2/rootfs.ext4,id=rootfs,readonly=false",
             "-api-channel", f"unix:{api}", "-serial", "stdio"])
    try:
        cmdline = vm.expect(r"Kernel command line: (.*)$")[1]
        root = vm.expect(r"VFS: Unable to mount root fs.*|EXT4-fs \(vda\): mounted.*")[0]
        status = vm.wait()
        report("seed", cmdline=cmdline, root=root, status=status, api_left=os.path.exists(api))
    finally:
        vm.kill()


def kata() -> None:
    """StratoVirt 2.x's form, as Kata writes it, seccomp on (Kata turns it off), with
    what Kata opens itself passed as inherited fds: /dev/vhost-vsock (vhostfd=) and a tap
    (fds=). In the guest: the rootfs drive read-only; the virtconsole to a socket client;
    virtio-rng at 8 KiB/s feeding /dev/hwrng (the timed read of 40 KiB starts with at most
    the 8 KiB bucket left, so it takes 4 to 5 s); AF_VSOCK streams both ways between L1
    and the guest's CID through the kernel's vhost-vsock; ping over the tap; then Kata's
    disk hot-plug sequence over QMP, the guest reading the disk."""
    qmp, log, console = "/tmp/kata.sock", "/tmp/kata.log", "/tmp/kata-console.sock"
    subprocess.run(["modprobe", "-a", "vhost_vsock", "tun"], check=True)
    subprocess.run(["ip", "tuntap", "add", "tapk", "mode", "tap", "vnet_hdr"], check=True)
    subprocess.run(["ip", "addr", "add", "10.0.9.1/24", "dev", "tapk"], check=True)
    subprocess.run(["ip", "link", "set", "tapk", "up"], check=True)
    # On the payload disk, the working directory: aio=native wants O_DIRECT, which /tmp
    # (a tmpfs) refuses.
    with open(HOTPLUG_IMAGE, "wb") as image:
        image.write(os.urandom(1 << 20))
    vhost = os.open("/dev/vhost-vsock", os.O_RDWR)
    tap = open_tap("tapk")           # as Kata opens one: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    vm = Vm(["stratovirt", "-name", "kata", "-smp", "1", "-m", "256",
             "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img", "-append", APPEND,
             "-qmp", f"unix:{qmp},server,nowait", "-D", log,
             "-machine", "type=microvm,dump-guest-core=off",
             "-object", "rng-random,id=objrng0,filename=/dev/urandom",
             "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0,max-bytes=8192,period=1000",
             "-device", "virtio-serial-device,id=virtio-serial0",
             "-chardev", f"socket,id=charconsole0,path={console},server,nowait",
             "-device", "virtconsole,chardev=charconsole0,id=virtio-console0,nr=0",
             "-drive", "id=rootfs,file=/l2/rootfs.ext4,readonly=on,direct=off",
             "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
             "-device", f"vhost-vsock-device,id=vsock-id,guest-cid=7,vhostfd={vhost}",
             "-netdev", f"tap,id=eth0,fds={tap}",
             "-device", "virtio-net-device,netdev=eth0,id=eth0,mac=02:42:ac:11:00:02",
             "-serial", "stdio"], pass_fds=(vhost, tap))
    os.close(vhost)
    os.close(tap)
    try:
        vm.expect("initramfs: ready")
        report("kata_seccomp", unfiltered=unfiltered([vm.process.pid]))
        vm.send("echo ro=$(cat /sys/block/vda/ro)\n")
        read_only = vm.expect(r"^ro=(\d)$")[1] == "1"
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(60)
            client.connect(console)
            vm.send("echo hello-hvc > /dev/hvc0\n")
            heard = b""
            while b"hello-hvc" not in heard and (chunk := client.recv(4096)):
                heard += chunk
        report("kata_devices", read_only=read_only, console=b"hello-hvc" in heard)
        vm.send("echo rng=$(cat /sys/class/misc/hw_random/rng_current)\n")
        current = vm.expect(r"^rng=(.*)$")[1]
        vm.send("for i in 1 2; do head -c 4096 /dev/hwrng | md5sum; done\n")
        sums = [vm.expect(r"^([0-9a-f]{32})  -$")[1] for _ in range(2)]
        vm.send("a=$(cut -d' ' -f1 /proc/uptime); n=$(head -c 40960 /dev/hwrng | wc -c); "
                "b=$(cut -d' ' -f1 /proc/uptime); echo read=$n in=$a,$b\n")
        found = vm.expect(r"^read=(\d+) in=([\d.]+),([\d.]+)$")
        report("kata_rng", current=current, sums=sums, bytes=int(found[1]),
               seconds=round(float(found[3]) - float(found[2]), 2))
        report("kata_vsock", **vhost_vsock_both_ways(vm))
        vm.send("ip link set eth0 up && ip addr add 10.0.9.2/24 dev eth0 && "
                "ping -c 3 -W 5 10.0.9.1 > /dev/null; echo ping=$?\n")
        ping = int(vm.expect(r"^ping=(\d+)$")[1])
        report("kata_hotplug", **asyncio.run(kata_hotplug(vm, qmp)))
        vm.send("reboot -f\n")
        status = vm.wait()
        text = open(log).read()
        report("kata", ping=ping, status=status, api_left=os.path.exists(qmp),
               trouble=[line for line in text.splitlines()
                        if "violation" in line or "restart" in line or ":ERROR:" in line])
    finally:
        vm.kill()
        subprocess.run(["ip", "link", "del", "tapk"])


async def kata_hotplug(vm: Vm, api: str) -> dict:
    """Kata's calls (references.md): blockdev-add, device_add with the slot as a decimal
    string, the guest reads the disk, device_del and the wait for DEVICE_DELETED."""
    qmp = QMPClient("kata")
    await qmp.connect(api)
    deleted = asyncio.get_running_loop().create_future()

    async def watch():
        async for event in qmp.events:
            if event["event"] == "DEVICE_DELETED" and not deleted.done():
                deleted.set_result(event["data"])

    watcher = asyncio.create_task(watch())
    await qmp.execute("blockdev-add", {"node-name": "drive-1", "driver": "raw",
                                       "read-only": False,
                                       "file": {"driver": "file", "filename": HOTPLUG_IMAGE,
                                                "aio": "native"}})
    await qmp.execute("device_add", {"id": "drive-1", "driver": "virtio-blk-mmio",
                                     "drive": "drive-1", "addr": "1"})
    vm.send("sleep 1; md5sum /dev/vdb\n")
    guest = await asyncio.to_thread(lambda: vm.expect(r"^([0-9a-f]{32})  /dev/vdb$")[1])
    await qmp.execute("device_del", {"id": "drive-1"})
    event = await asyncio.wait_for(deleted, 60)
    watcher.cancel()
    await qmp.disconnect()
    with open(HOTPLUG_IMAGE, "rb") as image:
        host = hashlib.md5(image.read()).hexdigest()
    return {"guest": guest, "host": host, "deleted": event}


def unfiltered(roots: list[int]) -> list[str]:
    """Every thread of the VMM's processes (roots and their descendants) that is not
    under a seccomp filter, but the kernel's own workers."""
    found, pids = [], list(roots)
    while pids:
        pid = pids.pop()
        for tid in os.listdir(f"/proc/{pid}/task"):
            status = open(f"/proc/{pid}/task/{tid}/status").read()
            name = status.split("\n", 1)[0].split("\t")[1]
            if "\nSeccomp:\t2\n" not in status and not name.startswith(("kvm-", "vhost-")):
                found.append(f"{pid}/{tid} {name}")
            children = f"/proc/{pid}/task/{tid}/children"
            pids += [int(child) for child in open(children).read().split()]
    return found


def vhost_vsock_both_ways(vm: Vm) -> dict:
    """Guest -> L1 (L1 listens on port 5000, the guest connects to CID 2) and L1 -> guest
    (the guest listens on 6000, L1 connects to CID 7): each stream's md5 on both ends."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, 5000))
    listener.listen(1)
    listener.settimeout(120)
    vm.send("head -c 300000 /dev/urandom > /p; md5sum /p; "
            "vsock-io connect 2 5000 < /p > /dev/null; echo sent=$?\n")
    sent = vm.expect(r"^([0-9a-f]{32})  /p$")[1]
    conn, _ = listener.accept()
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    conn.close()
    listener.close()
    to_host = int(vm.expect(r"^sent=(\d+)$")[1])
    vm.send("vsock-io listen 6000 < /dev/null > /q & sleep 1; echo listening\n")
    vm.expect(r"^listening$")
    payload = os.urandom(400_000)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect((7, 6000))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    vm.send("wait; md5sum /q\n")
    received = vm.expect(r"^([0-9a-f]{32})  /q$")[1]
    return {"guest_sent": sent, "host_got": hashlib.md5(got).hexdigest(), "to_host": to_host,
            "host_sent": hashlib.md5(payload).hexdigest(), "guest_got": received}


def qmp_session() -> None:
    api = "/tmp/qmp.sock"
    vm = Vm(initrd_vm(api, "-smp", "2", "-serial", "stdio"))
    try:
        vm.expect("initramfs: ready")

        async def steps():
            qmp = QMPClient("l1")
            await qmp.connect(api)
            events = []

            async def collect():
                async for event in qmp.events:
                    events.append([event["event"], event.get("data", {})])

            collector = asyncio.create_task(collect())
            statuses = [(await qmp.execute("query-status"))["status"]]
            await qmp.execute("stop")
            statuses.append((await qmp.execute("query-status"))["status"])
            await qmp.execute("cont")
            statuses.append((await qmp.execute("query-status"))["status"])
            cpus = len(await qmp.execute("query-cpus"))
            await qmp.execute("quit")
            for _ in range(100):
                if any(name == "SHUTDOWN" for name, _ in events):
                    break
                await asyncio.sleep(0.1)
            collector.cancel()
            try:
                await qmp.disconnect()
            except EOFError:
                pass
            return statuses, cpus, events

        statuses, cpus, events = asyncio.run(steps())
        status = vm.wait()
        report("qmp", statuses=statuses, cpus=cpus, events=events, status=status,
               api_left=os.path.exists(api))
    finally:
        vm.kill()


def _raw_quit(api: str) -> None:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(api)
        client.recv(4096)
        client.sendall(b'{"execute":"qmp_capabilities"}{"execute":"quit"}')
        while client.recv(4096):
            pass


def daemon() -> None:
    api, pidfile, log = "/tmp/daemon.sock", "/tmp/daemon.pid", "/tmp/daemon.log"
    foreground = subprocess.run(initrd_vm(api, "-daemonize", "-pidfile", pidfile, "-D", log),
                                capture_output=True, text=True, timeout=300)
    pid = int(open(pidfile).read())
    alive = os.path.exists(f"/proc/{pid}")
    _raw_quit(api)
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    text = open(log).read()
    report("daemon", foreground=[foreground.returncode, foreground.stdout, foreground.stderr],
           alive=alive, gone=not os.path.exists(f"/proc/{pid}"),
           pidfile_left=os.path.exists(pidfile), api_left=os.path.exists(api),
           log_roles=sorted({line.split("[")[0].split()[-1] for line in text.splitlines()
                             if "[" in line}),
           log_shutdown="shutdown: host-qmp-quit" in text)


def zygote() -> None:
    """A VM through stratovirt-zygote (vmm/zygote/): the caller becomes the C stand-in,
    the launcher is the zygote's child with its own children confined; the guest boots,
    takes input, reboots, and its status comes back through the stand-in."""
    sock, api = "/tmp/zygote/z.sock", "/tmp/zygote-vm.sock"
    server = subprocess.Popen(["stratovirt-zygote", "--socket", sock], stderr=subprocess.PIPE,
                              text=True)
    try:
        ready = server.stderr.readline()
        vm = Vm(initrd_vm(api, "-smp", "2", "-serial", "stdio", "-drive",
                          "file=/l2/rootfs.ext4,id=rootfs,readonly=true"),
                env=dict(os.environ, STRATOVIRT_ZYGOTE=sock))
        try:
            vm.expect("initramfs: ready")
            launchers = _children(server.pid)
            below = [pid for launcher in launchers for pid in _children(launcher)]
            names = sorted(_comm(pid) for pid in below)
            seccomp = sorted({_status(pid)["Seccomp"] for pid in below})
            standin = os.readlink(f"/proc/{vm.process.pid}/exe")
            vm.send("echo typed-$((6*7))\n")
            vm.expect(r"^typed-42$")
            vm.send("reboot -f\n")
            status = vm.wait()
        finally:
            vm.kill()
    finally:
        server.terminate()
        stopped = server.wait(60)
    log = ready + server.stderr.read()
    report("zygote", ready="ready on" in ready, launchers=len(launchers), children=names,
           seccomp=seccomp, standin=os.path.basename(standin), status=status,
           api_left=os.path.exists(api), zygote_status=stopped, refused="refused" in log)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


if __name__ == "__main__":
    failed = 0
    for check in (lambda: boot_shell("2", "256M", "/l2/vmlinuz"),
                  lambda: boot_shell("4", "512M", "/l2/vmlinux"),
                  seed_example, kata, qmp_session, daemon, zygote):
        try:
            check()
        except Exception as error:      # a check that breaks is reported; the others run
            print("CHECK-FAILED", repr(error), flush=True)
            failed += 1
    sys.exit(failed)

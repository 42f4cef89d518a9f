"""Runs inside L1: boots Debian's stock kernel as L2 under our stratovirt, several ways,
and prints one `CHECK <name> <json>` line per check for the host-side tests to judge.

L1 has /l2/vmlinuz (Debian's cloud kernel), /l2/vmlinux (the same, as an ELF vmlinux),
/l2/initrd.img (busybox initramfs whose
init loads the virtio modules, prints "initramfs: ready" and runs a shell on ttyS0)
and /l2/rootfs.ext4; `stratovirt` and qemu.qmp are installed in /opt/vmm.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from qemu.qmp import QMPClient

from console import Timeout, Vm

APPEND = "console=ttyS0 reboot=k panic=1 quiet"


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


def kata_rng() -> None:
    """StratoVirt 2.x's form, as Kata writes it, with its virtio-rng at 8 KiB/s: Debian's
    virtio_rng driver feeds /dev/hwrng through our confined backend. The timed read of
    40 KiB starts with at most the 8 KiB bucket left, so it takes 4 to 5 s."""
    qmp, log = "/tmp/kata.sock", "/tmp/kata.log"
    vm = Vm(["stratovirt", "-name", "kata", "-smp", "1", "-m", "256",
             "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img", "-append", APPEND,
             "-qmp", f"unix:{qmp},server,nowait", "-D", log,
             "-machine", "type=microvm,dump-guest-core=off",
             "-object", "rng-random,id=objrng0,filename=/dev/urandom",
             "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0,max-bytes=8192,period=1000",
             "-serial", "stdio"])
    try:
        vm.expect("initramfs: ready")
        vm.send("echo rng=$(cat /sys/class/misc/hw_random/rng_current)\n")
        current = vm.expect(r"^rng=(.*)$")[1]
        vm.send("for i in 1 2; do head -c 4096 /dev/hwrng | md5sum; done\n")
        sums = [vm.expect(r"^([0-9a-f]{32})  -$")[1] for _ in range(2)]
        vm.send("a=$(cut -d' ' -f1 /proc/uptime); n=$(head -c 40960 /dev/hwrng | wc -c); "
                "b=$(cut -d' ' -f1 /proc/uptime); echo read=$n in=$a,$b\n")
        found = vm.expect(r"^read=(\d+) in=([\d.]+),([\d.]+)$")
        vm.send("reboot -f\n")
        status = vm.wait()
        text = open(log).read()
        report("kata_rng", current=current, sums=sums, bytes=int(found[1]),
               seconds=round(float(found[3]) - float(found[2]), 2), status=status,
               trouble=[line for line in text.splitlines()
                        if "violation" in line or "restart" in line or "ERROR" in line],
               api_left=os.path.exists(qmp))
    finally:
        vm.kill()


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


if __name__ == "__main__":
    failed = 0
    for check in (lambda: boot_shell("2", "256M", "/l2/vmlinuz"),
                  lambda: boot_shell("4", "512M", "/l2/vmlinux"),
                  seed_example, kata_rng, qmp_session, daemon):
        try:
            check()
        except (Timeout, OSError, subprocess.SubprocessError) as error:
            print("CHECK-FAILED", repr(error), flush=True)
            failed += 1
    sys.exit(failed)

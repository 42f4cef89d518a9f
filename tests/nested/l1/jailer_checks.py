"""Runs inside L1: stratovirt-jailer with Debian's stock kernel as L2, the seed's devices
whole (the rootfs image as /dev/vda, a NIC on a tap owned by the VM's uid in a network
namespace made here, the console, vsock), under cgroup v2 limits, in a new PID namespace;
a disk hot-plugged from a file placed in the jail; and a memory.max too small for the VM.
Prints `CHECK <name> <json>` lines for tests/nested/test_linux_boot.py.

L1 mounts no cgroup hierarchy of its own: this script mounts cgroup v2 with every
controller, which the host of the project's CI cannot offer (its memory, cpu, pids and
io controllers are bound to cgroup v1), so this is where the limits are seen in force.
L2 stays in the initramfs shell (it has vsock-io) and mounts /dev/vda itself.
"""

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from qemu.qmp import QMPClient

from console import Timeout, Vm
from l2_shell import Guest

UID = GID = 4321
BASE = Path("/srv/jailer")
FILES = Path("/payload/files/jail")          # ext4: O_DIRECT works there
NETNS, TAP, HOST_IP, GUEST_IP = "jl", "tapj", "10.0.40.1", "10.0.40.2"
EXTRA_SIZE = 2 << 20
APPEND = "console=ttyS0 reboot=k panic=1 quiet"


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def setup() -> str:
    """cgroup v2, the VM's files owned by its uid, its netns and tap; the extra disk's md5."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        sh("mount", "-t", "cgroup2", "none", "/sys/fs/cgroup")
    FILES.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        shutil.copy(f"/l2/{name}", FILES / name)
    data = os.urandom(EXTRA_SIZE)
    (FILES / "extra.img").write_bytes(data)
    for path in FILES.iterdir():
        os.chown(path, UID, GID)
    sh("modprobe", "tun")
    sh("ip", "netns", "add", NETNS)
    inside = ["ip", "netns", "exec", NETNS]
    sh(*inside, "ip", "link", "set", "lo", "up")
    sh(*inside, "ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr", "user", str(UID))
    sh(*inside, "ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    sh(*inside, "ip", "link", "set", TAP, "up")
    return hashlib.md5(data).hexdigest()


def jailer(id: str, limits: list[str], *vmm_args: str) -> list[str]:
    sources = [a for name in ("vmlinuz", "initrd.img", "rootfs.ext4", "extra.img")
               for a in ("--source", str(FILES / name))]
    return ["stratovirt-jailer", "--id", id, "--uid", str(UID), "--gid", str(GID),
            "--chroot-base-dir", str(BASE), *sources,
            *(a for limit in limits for a in ("--cgroup", limit)), "--new-pid-ns", "--clean",
            "--netns", f"/run/netns/{NETNS}",
            "--", "-kernel", "/vmlinuz", "-initrd", "/initrd.img", "-append", APPEND,
            "-api-channel", "unix:/run/api.sock", "-serial", "stdio", "-D", "/vm.log", *vmm_args]


def descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        for task in Path(f"/proc/{pending.pop(0)}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            found += children
            pending += children
    return found


def process_facts(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    root = Path(f"/proc/{pid}/root")
    return {"name": status["Name"].strip(), "uid": status["Uid"].split(),
            "gid": status["Gid"].split(), "cap_eff": status["CapEff"].strip(),
            "cap_bnd": status["CapBnd"].strip(), "seccomp": status["Seccomp"].strip(),
            "mnt_ns_differs": os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/1/ns/mnt"),
            "pid_ns_differs": os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/1/ns/pid"),
            "cgroup": Path(f"/proc/{pid}/cgroup").read_text().strip(),
            "environ": Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"),
            "host_passwd_visible": (root / "etc/passwd").exists(),
            "root": sorted(os.listdir(root))}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "(gone)"


def seed_jailed(extra_md5: str) -> None:
    cgroup = Path("/sys/fs/cgroup/stratovirt/seed")
    jail = BASE / "stratovirt" / "seed" / "root" / "run"
    vm = Vm(jailer("seed", ["memory.max=1G", "pids.max=64", "cpu.max=max 100000"],
                   "-m", "256M", "-drive", "file=/rootfs.ext4,id=rootfs,readonly=false",
                   "-netdev", f"id=n0,netdev={TAP}", "-chardev", "id=con0,path=/run/console.sock",
                   "-device", "vsock,id=vs0,guest-cid=3"), timeout=900)
    try:
        vm.expect("initramfs: ready")
        guest = Guest(vm)
        guest.run_now("true")                       # the shell answers: every thread is up
        processes = [process_facts(pid) for pid in descendants(vm.process.pid)]
        report("jailed_processes", processes=processes,
               cgroup={f: (cgroup / f).read_text().strip()
                       for f in ("memory.max", "pids.max", "cpu.max")},
               in_cgroup={p: _comm(int(p)) for p in (cgroup / "cgroup.procs").read_text().split()},
               expected=sorted(descendants(vm.process.pid)))

        lines, mounted = guest.run_now("mount /dev/vda /mnt && echo jailed-write > "
                                       "/mnt/jailed.txt && sync && umount /mnt")
        lines, _ = guest.run_now(f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 "
                                 f"&& ping -c 2 -W 10 {HOST_IP} | grep transmitted")
        ping = lines[-1] if lines else ""

        with socket.socket(socket.AF_UNIX) as console:
            console.connect(str(jail / "console.sock"))
            console.settimeout(60)
            guest.run_now("echo hello-from-hvc0 > /dev/hvc0")
            got = b""
            while b"hello-from-hvc0" not in got:
                chunk = console.recv(4096)
                if not chunk:
                    break
                got += chunk
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(jail / "vs0.vsock_5100"))
        os.chown(jail / "vs0.vsock_5100", UID, GID)
        listener.listen(1)
        listener.settimeout(120)
        guest.vm.send("echo from-the-guest | vsock-io connect 2 5100\n")
        connection, _ = listener.accept()
        connection.settimeout(60)
        vsock = connection.recv(4096).decode(errors="replace").strip()
        connection.close()
        listener.close()

        seen = asyncio.run(hot_plug(jail / "api.sock", guest))
        status = vm.wait()
        report("jailed_seed", mounted=mounted, ping=ping,
               console="hello-from-hvc0" in got.decode(errors="replace"), vsock=vsock,
               hotplug=seen, extra_md5=extra_md5, status=status,
               written=subprocess.run(["debugfs", "-R", "cat /jailed.txt",
                                       str(FILES / "rootfs.ext4")], capture_output=True,
                                      text=True).stdout.strip(),
               jail_left=(BASE / "stratovirt").exists(), cgroup_left=cgroup.exists())
    finally:
        vm.kill()


async def hot_plug(api: Path, guest: Guest) -> dict:
    qmp = QMPClient("l1")
    await qmp.connect(str(api))
    await qmp.execute("blockdev-add", {"node-name": "extra", "file": {
        "driver": "file", "filename": "/extra.img"}})
    await qmp.execute("device_add", {"id": "extra", "driver": "virtio-blk-mmio", "addr": "1"})
    size = await guest.value("i=0; while [ \"$(cat /sys/block/vdb/size)\" = 0 ] && "
                             "[ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; "
                             "cat /sys/block/vdb/size")
    md5 = (await guest.value(f"head -c {EXTRA_SIZE} /dev/vdb | md5sum")).split()[0]
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    return {"size_sectors": int(size or 0), "md5": md5}


def too_little_memory() -> None:
    """memory.max far below what the VM touches: a clear line, an exit, no hang."""
    start = time.monotonic()
    proc = subprocess.run(jailer("oom", ["memory.max=48M"], "-m", "256M"),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    report("oom", status=proc.returncode, stderr=proc.stderr.strip().splitlines()[-3:],
           seconds=round(time.monotonic() - start, 1),
           jail_left=(BASE / "stratovirt" / "oom").exists(),
           cgroup_left=Path("/sys/fs/cgroup/stratovirt/oom").exists())


if __name__ == "__main__":
    failed = 0
    try:
        md5 = setup()
    except (OSError, subprocess.SubprocessError) as error:
        print("CHECK-FAILED setup", repr(error), flush=True)
        sys.exit(1)
    for check in (lambda: seed_jailed(md5), too_little_memory):
        try:
            check()
        except (Timeout, OSError, subprocess.SubprocessError) as error:
            print("CHECK-FAILED", repr(error), flush=True)
            failed += 1
    sys.exit(failed)

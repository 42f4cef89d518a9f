"""Runs inside L1: virtio-blk through our vhost-user backends, with Debian's stock kernel
as L2 finding the disks through ACPI. Prints `CHECK <name> <json>` lines for
tests/nested/test_virtio_blk.py to judge.

The disk images live on the payload disk (ext4), which supports O_DIRECT; /tmp in L1
is tmpfs and would not.
"""

import json
import os
import subprocess
import sys

from console import Timeout, Vm

ROOTFS = "/l2/rootfs.ext4"
KiB = 1024


def report(name: str, **data) -> None:
    print("CHECK", name, json.dumps(data), flush=True)


def shell(vm: Vm, command: str, pattern: str) -> str:
    """Run `command` in the guest; the first match of `pattern` after it."""
    vm.send(command + "\n")
    return vm.expect(pattern)


def host_md5(path: str, length: int) -> str:
    with open(path, "rb") as f:
        data = f.read(length)
    return subprocess.run(["md5sum"], input=data, capture_output=True).stdout.split()[0].decode()


def seed_example() -> None:
    """spec.md's example as written (unquoted -append, the rootfs writable), plus the
    initramfs that Debian's kernel needs for its virtio modules. The guest writes a file,
    powers off through ACPI, and the file is in the image afterwards."""
    api = "/tmp/stratovirt.socket"
    vm = Vm(["stratovirt", "-kernel", "/l2/vmlinux", "-initrd", "/l2/initrd.img",
             "-append", "console=ttyS0", "root=/dev/vda", "rw", "reboot=k", "panic=1",
             "-drive", f"file={ROOTFS},id=rootfs,readonly=false",
             "-api-channel", f"unix:{api}", "-serial", "stdio"])
    try:
        vm.expect("initramfs: switching to /dev/vda")
        vm.expect("rootfs: ready")
        mount = shell(vm, "grep ' / ' /proc/mounts", r"^/dev/vda / ext4 (\S+) ")[1]
        sizes = shell(vm, "echo sizes $(cat /sys/block/vd?/size)", r"^sizes ([\d ]+)$")[1]
        # The kernel's view of every process and thread of this VM, through the auditor.
        check = subprocess.run(["stratovirt", "seccomp", "check", str(vm.process.pid)],
                               capture_output=True, text=True)
        vm.send("echo written-by-l2 > /hello.txt; sync\n")
        vm.send("poweroff\n")
        status = vm.wait()
        found = subprocess.run(["debugfs", "-R", "cat /hello.txt", ROOTFS],
                               capture_output=True, text=True).stdout
        report("seed", mount=mount.split(","), sizes=sizes.split(), status=status,
               found=found, api_left=os.path.exists(api),
               seccomp=[check.returncode, check.stdout, check.stderr])
    finally:
        vm.kill()


def initrd_vm(api: str, drives: list[str]) -> Vm:
    argv = ["stratovirt", "-kernel", "/l2/vmlinuz", "-initrd", "/l2/initrd.img",
            "-append", "console=ttyS0 reboot=k panic=1 quiet", "-smp", "2",
            "-api-channel", f"unix:{api}", "-serial", "stdio"]
    for drive in drives:
        argv += ["-drive", drive]
    vm = Vm(argv)
    vm.expect("initramfs: ready")
    return vm


LIMIT = 256 * KiB                     # bytes per second on the limited disk
READ = 2048 * KiB                     # read from each disk per measurement


def qmp(api: str, command: str, arguments: dict) -> dict:
    """One QMP command over a fresh connection (negotiation first); its answer."""
    import socket
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(api)
        stream = sock.makefile("rw")
        stream.readline()                                   # the greeting
        for name, args in (("qmp_capabilities", {}), (command, arguments)):
            stream.write(json.dumps({"execute": name, "arguments": args}) + "\n")
            stream.flush()
            while "event" in (answer := json.loads(stream.readline())):
                pass
        return answer


def read_rate(vm: Vm, disk: str) -> float:
    """Bytes per second of READ bytes read from /dev/<disk> with O_DIRECT in 64 KiB
    requests, timed by L2's clock (kvm-clock: L1's time)."""
    found = shell(vm, f"a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/{disk} of=/dev/null "
                      f"bs=65536 count={READ // 65536} iflag=direct 2>/dev/null; "
                      f"b=$(cut -d' ' -f1 /proc/uptime); echo took-{disk} $a $b",
                  rf"^took-{disk} ([\d.]+) ([\d.]+)$")
    return READ / (float(found[2]) - float(found[1]))


def read_only_and_serial() -> None:
    """Also the rate limits: a second disk limited to LIMIT bytes/s on the command line
    (throttling.bps-total), read beside the unlimited rootfs; then its limit doubled over
    QMP (block_set_io_throttle) and read again."""
    api = "/tmp/ro.sock"
    limited = "/payload/files/limited.img"
    with open(limited, "wb") as f:
        f.write(os.urandom(READ))
    vm = initrd_vm(api, [f"file={ROOTFS},id=rootfs,readonly=true,serial=abc",
                         f"file={limited},id=lim,direct=true,throttling.bps-total={LIMIT}"])
    try:
        free = read_rate(vm, "vda")
        first = read_rate(vm, "vdb")
        zeros = {k: 0 for k in ("bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}
        changed = qmp(api, "block_set_io_throttle", {"device": "lim", "bps": 2 * LIMIT, **zeros})
        second = read_rate(vm, "vdb")
        blockstats = qmp(api, "query-blockstats", {})
        report("rate_limit", limit=LIMIT, unlimited=free, limited=first, changed=changed,
               after_change=second, blockstats=blockstats, read=READ)
        ro = shell(vm, "echo ro=$(cat /sys/block/vda/ro)", r"^ro=(\d)$")[1]
        serial = shell(vm, "echo serial=$(cat /sys/block/vda/serial)", r"^serial=(.*)$")[1]
        write = shell(vm, "dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct; "
                          "echo dd-status=$?", r"^dd-status=(\d+)$")[1]
        # Asked for rw, mount falls back to ro on a write-protected disk, as for a CD.
        mount = shell(vm, "mount -o rw /dev/vda /mnt; grep /mnt /proc/mounts",
                      r"^/dev/vda /mnt ext4 (\S+) ")[1]
        touch = shell(vm, "touch /mnt/x; echo touch-status=$?", r"^touch-status=(\d+)$")[1]
        vm.send("reboot -f\n")
        status = vm.wait()
        report("readonly", ro=int(ro), serial=serial, write_status=int(write),
               mount=mount.split(","), touch_status=int(touch), status=status)
    finally:
        vm.kill()


def six_disks() -> None:
    """vda..vdf, direct=true and direct=false alternating: a random pattern written by
    the guest with O_DIRECT, read back, and compared with the host file's bytes."""
    api = "/tmp/six.sock"
    paths = [f"/payload/files/disk{i}.img" for i in range(6)]
    for path in paths:
        with open(path, "wb") as f:
            f.truncate(8 * 1024 * KiB)
    drives = [f"file={path},id=d{i},direct={'true' if i % 2 == 0 else 'false'}"
              for i, path in enumerate(paths)]
    vm = initrd_vm(api, drives)
    try:
        results = []
        for i, name in enumerate("abcdef"):
            length = (i + 1) * 64 * KiB + 512 * i       # not always a multiple of 4 KiB
            guest = shell(vm, f"dd if=/dev/urandom of=/p bs={length} count=1 2>/dev/null; "
                              f"dd if=/p of=/dev/vd{name} bs={length} count=1 oflag=direct "
                              f"2>/dev/null; echo 3 > /proc/sys/vm/drop_caches; "
                              f"echo vd{name} $(md5sum < /p) "
                              f"$(head -c {length} /dev/vd{name} | md5sum)",
                          rf"^vd{name} (\w+) - (\w+) -$")
            results.append({"disk": f"vd{name}", "written": guest[1], "read": guest[2],
                            "host": host_md5(paths[i], length)})
        size = shell(vm, "echo size=$(cat /sys/block/vdf/size)", r"^size=(\d+)$")[1]
        vm.send("reboot -f\n")
        status = vm.wait()
        report("six", disks=results, vdf_sectors=int(size), status=status)
    finally:
        vm.kill()


if __name__ == "__main__":
    failed = 0
    for check in (seed_example, read_only_and_serial, six_disks):
        try:
            check()
        except (Timeout, OSError, subprocess.SubprocessError) as error:
            print("CHECK-FAILED", check.__name__, repr(error), flush=True)
            failed += 1
    sys.exit(failed)

"""Our virtio-blk backend under a frontend no one here wrote: QEMU (TCG, no KVM needed)
with Debian's stock kernel and its virtio_blk driver (shared/docs/host.md, way 2)."""

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework.assets import guest_assets
from tests.framework.console import Vm

BACKEND = Path(sys.executable).parent / "stratovirt-vhost-user-blk"
DISK_BYTES = 64 << 20
BUSYBOX = "busybox"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    return path


def start_backend(tmp_path, disk, *options):
    socket_path = tmp_path / "blk.sock"
    backend = subprocess.Popen([str(BACKEND), "--socket-path", str(socket_path),
                                "--blk-file", str(disk), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert backend.poll() is None and time.monotonic() < deadline, backend.stdout.read()
        time.sleep(0.02)
    return backend, socket_path


def host_tsc_khz() -> int:
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no cpu MHz in /proc/cpuinfo")


def qemu_guest(socket_path) -> Vm:
    """Debian's kernel under QEMU TCG. Under TCG the kernel's early TSC calibration
    fails now and then and the boot hangs ("could not calculate TSC khz"); telling it
    the frequency (tsc_early_khz) skips the calibration."""
    assets = guest_assets()
    return Vm(["qemu-system-x86_64", "-M", "microvm,accel=tcg,memory-backend=mem",
               "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
               "-global", "virtio-mmio.force-legacy=false", "-m", "256M",
               "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
               "-kernel", str(assets / "vmlinuz"), "-initrd", str(assets / "initrd.img"),
               "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()}",
               "-chardev", f"socket,id=c0,path={socket_path}",
               "-device", "vhost-user-blk,chardev=c0", "-no-reboot"], timeout=300)


def shell(vm: Vm, command: str, marker: str) -> str:
    vm.send(f"{command}; echo {marker}-$?\n")
    return vm.expect(rf"(?s)(.*?)^{marker}-(\d+)$")


def md5_in(text: str) -> str:
    return re.search(r"\b[0-9a-f]{32}\b", text).group(0)


def stop(vm: Vm, backend) -> None:
    vm.send("poweroff -f\n")
    try:
        vm.wait()
    finally:
        vm.kill()
        backend.terminate()
        backend.wait(30)


def test_guest_writes_a_pattern_and_reads_it_back(tmp_path, disk):
    backend, socket_path = start_backend(tmp_path, disk, "--serial", "abc")
    vm = qemu_guest(socket_path)
    try:
        vm.expect("initramfs: ready")
        size = shell(vm, "echo $(cat /sys/block/vda/size) $(cat /sys/block/vda/serial)", "SIZE")
        assert size[1].split()[-2:] == [str(DISK_BYTES // 512), "abc"], size[0]
        shell(vm, f"{BUSYBOX} dd if=/dev/urandom of=/pattern bs=4096 count=256 2>/dev/null",
              "MADE")
        written = md5_in(shell(vm, f"{BUSYBOX} md5sum /pattern", "SUM")[1])
        shell(vm, f"{BUSYBOX} dd if=/pattern of=/dev/vda bs=4096 seek=1024 conv=fsync "
                  "2>/dev/null", "WROTE")
        shell(vm, "echo 3 > /proc/sys/vm/drop_caches", "DROP")
        read = md5_in(shell(vm, f"{BUSYBOX} dd if=/dev/vda bs=4096 skip=1024 count=256 "
                                f"2>/dev/null | {BUSYBOX} md5sum", "READ")[1])
    finally:
        stop(vm, backend)
    with open(disk, "rb") as f:
        f.seek(1024 * 4096)
        on_host = hashlib.md5(f.read(256 * 4096)).hexdigest()
    assert written == read == on_host


def test_read_only_disk_refuses_writes(tmp_path, disk):
    backend, socket_path = start_backend(tmp_path, disk, "--read-only")
    vm = qemu_guest(socket_path)
    try:
        vm.expect("initramfs: ready")
        assert shell(vm, "cat /sys/block/vda/ro", "RO")[1].split()[-1] == "1"
        failed = shell(vm, f"{BUSYBOX} dd if=/dev/zero of=/dev/vda bs=4096 count=1 2>&1", "DD")
        assert failed[2] != "0"
    finally:
        stop(vm, backend)
    assert open(disk, "rb").read(4096) == bytes(4096)


def test_backend_conventions(tmp_path, disk):
    caps = subprocess.run([str(BACKEND), "--print-capabilities"], capture_output=True,
                          text=True, check=True)
    assert '"type": "block"' in caps.stdout
    backend, socket_path = start_backend(tmp_path, disk)
    backend.terminate()
    assert backend.wait(30) == 0
    assert not socket_path.exists()

"""Our virtio-blk backend under a frontend no one here wrote: QEMU (TCG, no KVM needed)
with Debian's stock kernel and its virtio_blk driver (shared/docs/host.md, way 2);
and the same backend killed again and again under a guest's I/O, QEMU reconnecting to
each new one (`reconnect=1`) and handing it the inflight region."""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework.assets import guest_assets
from tests.framework.console import Vm
from tests.framework.disk_backend import HoldableFs

BACKEND = Path(sys.executable).parent / "stratovirt-vhost-user-blk"
DISK_BYTES = 64 << 20
BUSYBOX = "busybox"


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(DISK_BYTES)
    return path


def start_backend(tmp_path, disk, *options, output=subprocess.PIPE):
    """The program, once it listens: once the socket file is there, and is not the one a
    killed program left (which the new one replaces)."""
    socket_path = tmp_path / "blk.sock"

    def identity():
        try:
            st = socket_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_ctime_ns

    stale = identity()
    backend = subprocess.Popen([str(BACKEND), "--socket-path", str(socket_path),
                                "--blk-file", str(disk), *options],
                               stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while identity() in (None, stale):
        if backend.poll() is not None:
            raise AssertionError(backend.stdout.read() if backend.stdout else
                                 f"the backend exited with {backend.returncode}")
        assert time.monotonic() < deadline, "the backend does not listen"
        time.sleep(0.02)
    return backend, socket_path


def host_tsc_khz() -> int:
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no cpu MHz in /proc/cpuinfo")


def qemu_guest(socket_path, reconnect: bool = False, smp: int = 1,
               num_queues: int | None = None) -> Vm:
    """Debian's kernel under QEMU TCG. Under TCG the kernel's early TSC calibration
    fails now and then and the boot hangs ("could not calculate TSC khz"); telling it
    the frequency (tsc_early_khz) skips the calibration. reconnect: QEMU connects again
    (every second) to a backend that went away. num_queues: QEMU's vhost-user-blk
    num-queues= (its default: 1 on virtio-mmio)."""
    assets = guest_assets()
    return Vm(["qemu-system-x86_64", "-M", "microvm,accel=tcg,memory-backend=mem",
               "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
               "-global", "virtio-mmio.force-legacy=false", "-m", "256M", "-smp", str(smp),
               "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
               "-kernel", str(assets / "vmlinuz"), "-initrd", str(assets / "initrd.img"),
               "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={host_tsc_khz()}",
               "-chardev", f"socket,id=c0,path={socket_path}"
                           + (",reconnect=1" if reconnect else ""),
               "-device", "vhost-user-blk,chardev=c0"
                          + (f",num-queues={num_queues}" if num_queues else ""),
               "-no-reboot"], timeout=300)


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


def test_two_queues_and_o_direct_behind_qemu(tmp_path, disk):
    """--num-queues 2 --direct behind QEMU's num-queues=2 with two vCPUs: Linux's
    virtio_blk takes MQ and makes two hardware queues; a writer pinned to each vCPU
    (so each submits on its own queue) writes and reads back its half of the disk with
    O_DIRECT while the other runs; both queues' rings served (a worker thread each), the
    backend's one engine line says io_uring, the data is on the image."""
    backend, socket_path = start_backend(tmp_path, disk, "--num-queues", "2", "--direct")
    vm = qemu_guest(socket_path, smp=2, num_queues=2)
    try:
        vm.expect("initramfs: ready")
        queues = shell(vm, "ls /sys/block/vda/mq", "MQ")[1].split()
        assert queues[-2:] == ["0", "1"], queues
        for cpu in (0, 1):
            shell(vm, f"{BUSYBOX} dd if=/dev/urandom of=/p{cpu} bs=4096 count=256 2>/dev/null",
                  f"MADE{cpu}")
        script = ("cpu=$1; i=0; while [ $i -lt 4 ]; do "
                  "dd if=/p$cpu of=/dev/vda bs=64k seek=$((cpu * 64 + i * 16)) oflag=direct "
                  "2>/dev/null || echo ERROR; i=$((i + 1)); done; echo DONE$cpu")
        vm.send(f"cat > /w.sh << 'EOF'\n{script}\nEOF\n")
        shell(vm, "true", "WRITTEN")
        vm.send(f"{BUSYBOX} taskset -c 0 sh /w.sh 0 & {BUSYBOX} taskset -c 1 sh /w.sh 1 &\n")
        for _ in range(2):
            vm.expect(r"DONE(\d)")
        sums = {cpu: md5_in(shell(vm, f"{BUSYBOX} md5sum /p{cpu}", f"SUM{cpu}")[1])
                for cpu in (0, 1)}
        threads = len(os.listdir(f"/proc/{backend.pid}/task"))
        errors = shell(vm, "dmesg | grep -i -c -e 'I/O error' -e blk_update", "DMESG")[1]
    finally:
        stop(vm, backend)
    output = backend.stdout.read().decode()
    assert "I/O engine: io_uring" in output and "2 queues" in output, output
    assert "ERROR" not in errors and errors.split()[-1] == "0", errors
    assert threads >= 3, threads              # main, and one worker per ring
    with open(disk, "rb") as f:
        for cpu in (0, 1):
            for i in range(4):
                f.seek((cpu * 64 + i * 16) * 65536)
                assert hashlib.md5(f.read(256 * 4096)).hexdigest() == sums[cpu], (cpu, i)


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


def refusal(path, disk) -> str:
    result = subprocess.run([str(BACKEND), "--socket-path", str(path), "--blk-file", str(disk)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_a_restarted_backend_replaces_the_socket_a_killed_one_left(tmp_path, disk):
    backend, socket_path = start_backend(tmp_path, disk)
    assert "is listening on it" in refusal(socket_path, disk)     # a live one stays
    backend.kill()
    backend.wait(30)
    assert socket_path.exists()                                    # stale, left behind
    backend, socket_path = start_backend(tmp_path, disk)
    backend.terminate()
    assert backend.wait(30) == 0 and not socket_path.exists()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    assert "not a socket" in refusal(regular, disk)
    assert regular.read_text() == "keep me"


# -- the backend killed under the guest's I/O -------------------------------------------

KILLS = 12
WORKERS = 4                     # even ones write with O_DIRECT, odd ones buffered + fsync
SLOTS = 8                       # 1 MiB slots per worker, written in turn
# One worker: a fresh 1 MiB of random data into its next slot, read back from the disk
# (O_DIRECT), both checksums logged once the write has completed.
WORKER = r"""
id=$1; mode=$2; i=0
while [ ! -e /stop ]; do
    slot=$((i % 8)); seek=$(( (id * 8 + slot) * 16 ))
    dd if=/dev/urandom of=/t$id bs=64k count=16 2>/dev/null
    w=$(md5sum < /t$id)
    if [ $mode = direct ]; then
        dd if=/t$id of=/dev/vda bs=64k seek=$seek oflag=direct 2>/dev/null
    else
        dd if=/t$id of=/dev/vda bs=64k seek=$seek conv=fsync 2>/dev/null
    fi || echo "ERROR worker $id round $i: write" >> /log$id
    r=$(dd if=/dev/vda bs=64k skip=$seek count=16 iflag=direct 2>/dev/null | md5sum)
    echo "$i $slot ${w%% *} ${r%% *}" >> /log$id
    i=$((i + 1))
done
echo "DONE $id"
"""


def threads_in(pid) -> list[str]:
    """The state letter of each of the process's threads (R, S, D, ...)."""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            states.append(stat.rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            pass
    return states


def wait_until(condition, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def holdable(tmp_path):
    fs = HoldableFs(tmp_path)
    yield fs
    fs.close()


@pytest.mark.needs_root
@pytest.mark.parametrize("options", [(), ("--direct", "--num-queues", "2")],
                         ids=["buffered", "direct-io_uring-2-queues"])
def test_guest_io_survives_a_backend_killed_again_and_again(tmp_path, holdable, options):
    """Four guest processes write and read back checksummed data (O_DIRECT and buffered,
    several requests in flight) while the backend is SIGKILLed and started again on the
    same socket, KILLS times. Every other kill waits until a write is surely in flight
    in the backend (its image's file system holds writes: a thread blocks in the write),
    so the new backend has something to resubmit from the region QEMU hands back. No
    I/O error in the guest, every read matches its write, the image holds the last
    write of every slot. Once with the backend buffered (requests run inline, one at a
    time per queue), once with O_DIRECT and two queues (many requests in flight on each
    queue's io_uring, completed out of order, when it dies)."""
    queues = 2 if "--num-queues" in options else None
    fs = holdable
    rng = random.Random(7)
    log = open(tmp_path / "backends.log", "w+")
    backend = vm = None
    try:
        disk = fs.root / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        backend, socket_path = start_backend(tmp_path, disk, *options, output=log)
        vm = qemu_guest(socket_path, reconnect=True, smp=2, num_queues=queues)
        vm.expect("initramfs: ready")
        vm.send("cat > /w.sh << 'EOF'\n" + WORKER.lstrip() + "EOF\n")
        shell(vm, "true", "WRITTEN")
        shell(vm, "for n in 0 1 2 3; do m=buffered; [ $((n % 2)) = 0 ] && m=direct; "
                  "sh /w.sh $n $m & done", "STARTED")
        held = 0
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.5, 2.0))
            if kill % 2:
                fs.hold()
                held += wait_until(lambda: "D" in threads_in(backend.pid), 10)
            backend.send_signal(signal.SIGKILL)
            fs.release()                    # a held write keeps the process until then
            backend.wait(30)
            backend, _ = start_backend(tmp_path, disk, *options, output=log)
            # Serving again: QEMU reconnected and started the ring (its worker thread).
            assert wait_until(lambda: len(threads_in(backend.pid)) >= 2, 60), f"kill {kill}"
        vm.send("touch /stop\n")
        done = set()
        while len(done) < WORKERS:                       # in whatever order they end
            done.add(vm.expect(r"DONE (\d)$").group(1))      # maybe after a prompt
        records = {n: shell(vm, f"cat /log{n}", f"LOG{n}")[1] for n in range(WORKERS)}
        vm.send("echo BAD-$(dmesg | grep -i -c -e error -e blk_update -e hung -e timeout)\n")
        bad = int(vm.expect(r"BAD-(\d+)$")[1])
        errors = shell(vm, "dmesg | grep -i -e error -e blk_update -e hung -e timeout",
                       "DMESG")[1] if bad else ""
        vm.send("poweroff -f\n")
        vm.wait()
    finally:
        fs.release()
        if vm:
            vm.kill()
        if backend:
            backend.kill()
            backend.wait(30)
        log.seek(0)
        output = log.read()
        log.close()
        print(output)

    assert "ERROR" not in "".join(records.values())
    assert bad == 0, errors
    last, counts = {}, {}
    for n, text in records.items():
        rounds = [line.split() for line in text.splitlines() if re.fullmatch(
            r"\d+ \d+ [0-9a-f]{32} [0-9a-f]{32}", line.strip())]
        assert rounds, f"worker {n} did nothing: {text!r}"
        counts[n] = len(rounds)
        for i, slot, written, read in rounds:
            assert written == read, f"worker {n} round {i}: read back {read}, wrote {written}"
            last[n, int(slot)] = written
    with open(disk, "rb") as f:
        for (n, slot), written in last.items():
            f.seek((n * SLOTS + slot) << 20)
            assert hashlib.md5(f.read(1 << 20)).hexdigest() == written, (n, slot)
    resubmitted = [int(m) for m in re.findall(r"(\d+) requests a previous backend left", output)]
    assert held >= KILLS // 2 - 1 and resubmitted, (held, output)
    print(f"{KILLS} kills, {held} with a write held in the backend; requests resubmitted "
          f"by the next backend: {resubmitted}; rounds per worker: {counts}")

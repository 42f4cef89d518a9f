"""The recorded sessions behind the seccomp minimality results (docs/seccomp.md,
"Minimality"): real runs of the VMM under strace, each analysed by
vmm.sandbox.usage (`stratovirt seccomp usage`), merged per role.

Host sessions (this machine's /dev/kvm, the tiny guest), each its own strace run:
- boot:    2 vCPUs, a writable and a read-only disk; the guest prints its command line
           and resets through the i8042.
- many-vcpus: 64 vCPUs, 5 GiB of RAM (split around the 32-bit hole); more threads
           than glibc makes malloc arenas for.
- serial:  stdin is a terminal (a pty): the launcher makes it raw and restores it; the
           guest echoes what the stdin pump feeds the UART.
- qmp:     QMP through qemu.qmp: every query, an unknown command, stop/cont, a backend
           killed under the running VM, quit; -D log file.
- sigterm: SIGTERM to the launcher, forwarded to the vm process.
- stopcont: SIGSTOP and SIGCONT to every process of the VM (Ctrl-Z, fg).
- daemon:  -daemonize -pidfile -D, ended by QMP quit.
- hotplug: in a network namespace of its own: disks and NICs plugged and unplugged
           through QMP (by tap name and by a getfd fd), cold-plugged ones removed,
           refusals, queries, system_powerdown, system_reset.
- restart: every kind of backend (disk, NIC, console, vsock, rng) killed under the running
           VM and restarted by the launcher (vmm/restart.py), the disk's also by SIGSYS;
           a console client on the restarted console.
- blk-io:  disk backends forked and confined exactly as the launcher does it
           (vmm.children.spawn + serve_disk), driven with real I/O by the host-side
           virtio driver (tests/framework/virtio_driver.py): buffered, O_DIRECT (on
           io_uring, and on Linux AIO as where io_uring is refused) and read-only image
           files, and (as root) a loop device; reads, writes, flush, GET_ID, discard,
           write-zeroes, bad requests, a batch in flight, a ring stopped and restarted, a
           malformed ring; each with the inflight region (GET/SET_INFLIGHT_FD).

Nested session (record_nested): inside L1, the nested suite's own L1 scripts
(tests/nested/l1/boot_checks.py and disk_checks.py: Debian's kernel as L2 with disks
doing real I/O, QMP, daemon mode) run under `stratovirt seccomp usage`, whose JSON comes
back on L1's console.
"""

import asyncio
import functools
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmm.sandbox import usage as recorder

from .guest import tiny_guest
from .qmp import running

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
HOST_SESSIONS = ("boot", "many-vcpus", "serial", "qmp", "sigterm", "stopcont", "daemon",
                 "hotplug", "restart", "blk-io")
# The roles the host sessions put to work; the other roles' profiles need their own
# sessions (a backend driven from the host, like blk-io) before they can be judged.
HOST_ROLES = ("launcher", "vm", "vcpu", "api", "virtio-blk")


class Traced:
    """One command under strace in `workdir`; usage() once it has ended."""
    started: list[subprocess.Popen] = []       # record_host kills what a failed one left

    def __init__(self, workdir: Path, name: str, command: list[str], prefix=(), **popen):
        """`prefix` goes before strace (e.g. `ip netns exec NAME`)."""
        self.name = name
        self.trace = workdir / f"{name}.trace"
        self.process = subprocess.Popen([*prefix, *recorder.STRACE, "-o", str(self.trace),
                                         "--", *command], cwd=workdir,
                                        start_new_session=True, **popen)
        Traced.started.append(self.process)

    def child(self, timeout: float = 30) -> int:
        """The traced command's pid (strace's only child)."""
        deadline = time.monotonic() + timeout
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while time.monotonic() < deadline:
            found = path.read_text().split() if path.exists() else []
            if found:
                return int(found[0])
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: strace started nothing")

    def finish(self, timeout: float = 120) -> recorder.Usage:
        out, err = self.process.communicate(timeout=timeout)
        with open(self.trace, errors="replace") as trace:
            usage = recorder.analyze(trace, label=self.name)
        usage.runs[-1] = {"session": self.name, "status": self.process.returncode,
                          "stderr": (err or b"")[-2000:].decode(errors="replace")}
        return usage


def _vm(workdir: Path, *extra: str, append: str = "", serial: bool = True) -> list[str]:
    kernel = workdir / "tiny.elf"
    if not kernel.exists():
        kernel.write_bytes(tiny_guest().read_bytes())
    argv = [sys.executable, "-m", "vmm", "-kernel", str(kernel),
            "-api-channel", f"unix:{workdir / 'api.sock'}", *extra]
    if append:
        argv += ["-append", append]
    return argv + (["-serial", "stdio"] if serial else [])


def _disks(workdir: Path) -> list[str]:
    drives = []
    for name, flags in (("d0", "readonly=false"), ("d1", "readonly=true,serial=ro-disk")):
        path = workdir / f"{name}.img"
        path.write_bytes(bytes(4 * MiB))
        drives += ["-drive", f"file={path},id={name},{flags}"]
    return drives


def _wait_for_api(workdir: Path, traced: Traced, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if traced.process.poll() is not None:
            raise AssertionError(f"{traced.name}: ended before its QMP greeting")
        if running(str(workdir / "api.sock"), 5):
            return
        time.sleep(0.05)
    raise AssertionError(f"{traced.name}: no QMP greeting")


def _qmp(workdir: Path, steps):
    from .qmp import session
    return session(workdir / "api.sock", steps, timeout=60)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def session_boot(workdir: Path) -> recorder.Usage:
    traced = Traced(workdir, "boot", _vm(workdir, "-smp", "2", *_disks(workdir)),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return traced.finish()


def session_many_vcpus(workdir: Path) -> recorder.Usage:
    """64 vCPUs and RAM above the 32-bit hole: more threads than glibc has malloc arenas
    for (8 per CPU), so vCPU threads share arenas, the main one included."""
    traced = Traced(workdir, "many-vcpus", _vm(workdir, "-smp", "64", "-m", "5G"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return traced.finish()


def session_serial(workdir: Path) -> recorder.Usage:
    master, slave = pty.openpty()
    try:
        traced = Traced(workdir, "serial", _vm(workdir, append="echo"), stdin=slave,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for_api(workdir, traced)
        time.sleep(0.2)          # not a measurement: lets the launcher finish tcsetattr
        os.write(master, b"typed on a terminal.")
        return traced.finish()
    finally:
        os.close(slave)
        os.close(master)


def session_qmp(workdir: Path) -> recorder.Usage:
    traced = Traced(workdir, "qmp", _vm(workdir, "-smp", "2", "-D", str(workdir / "qmp.log"),
                                        *_disks(workdir), append="wait"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_api(workdir, traced)
    launcher = traced.child()

    async def steps(qmp, events):
        for command in ("query-status", "query-cpus", "query-hotpluggable-cpus",
                        "query-version", "query-commands"):
            await qmp.execute(command)
        try:
            await qmp.execute("no-such-command")
        except Exception:                          # the error reply is the point
            pass
        await qmp.execute("stop")
        await events.wait("STOP")
        await qmp.execute("cont")
        await events.wait("RESUME")
        # A backend dies under the running VM: the launcher reaps it and carries on.
        backend = next(pid for pid in _children(launcher)
                       if Path(f"/proc/{pid}/comm").read_text().strip() == "vmm-blk-d1")
        os.kill(backend, signal.SIGKILL)
        while backend in _children(launcher):
            await asyncio.sleep(0.05)
        await qmp.execute("query-status")
        await qmp.execute("quit")
        await events.wait("SHUTDOWN")

    _qmp(workdir, steps)
    return traced.finish()


def session_sigterm(workdir: Path) -> recorder.Usage:
    traced = Traced(workdir, "sigterm", _vm(workdir, *_disks(workdir), append="wait"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_api(workdir, traced)
    os.kill(traced.child(), signal.SIGTERM)
    return traced.finish()


def session_stopcont(workdir: Path) -> recorder.Usage:
    """SIGSTOP, then SIGCONT, to every process of a running VM (a shell's Ctrl-Z and fg):
    timed waits come back through restart_syscall."""
    traced = Traced(workdir, "stopcont", _vm(workdir, "-smp", "2", *_disks(workdir),
                                             append="wait"),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_api(workdir, traced)
    launcher = traced.child()
    processes = [launcher] + _children(launcher)
    for number in (signal.SIGSTOP, signal.SIGCONT):
        for pid in processes:
            os.kill(pid, number)
        time.sleep(0.5)          # not a measurement: lets the timed waits see the stop

    async def steps(qmp, events):
        await qmp.execute("query-status")
        await qmp.execute("quit")
        await events.wait("SHUTDOWN")

    _qmp(workdir, steps)
    return traced.finish()


def session_daemon(workdir: Path) -> recorder.Usage:
    pidfile = workdir / "vm.pid"
    traced = Traced(workdir, "daemon", _vm(workdir, "-daemonize", "-pidfile", str(pidfile),
                                           "-D", str(workdir / "daemon.log"), *_disks(workdir),
                                           append="wait", serial=False),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_api(workdir, traced)

    async def steps(qmp, events):
        await qmp.execute("query-status")
        await qmp.execute("quit")
        await events.wait("SHUTDOWN")

    _qmp(workdir, steps)
    return traced.finish()


def session_hotplug(workdir: Path) -> recorder.Usage:
    """Hot-plug through QMP, in a network namespace with taps (tests/framework/netns.py):
    disks in and out of slots (buffered, O_DIRECT, read-only; a cold-plugged one removed
    and its slot reused), NICs by tap name and by a tap fd passed with getfd (the
    launcher opens, checks and forks; the QMP thread swaps slots), refusals, queries,
    system_powerdown, system_reset."""
    from .netns import Netns
    from vmm.devices.virtio.net.tap import open_tap

    with Netns("vmmsu") as ns:
        for tap in ("tap0", "tap1", "tap2"):
            ns.add_tap(tap)
        images = {}
        for name in ("h1", "h2", "h3"):
            images[name] = workdir / f"{name}.img"
            images[name].write_bytes(bytes(4 * MiB))
        traced = Traced(workdir, "hotplug",
                        _vm(workdir, "-D", str(workdir / "hotplug.log"), *_disks(workdir),
                            "-netdev", "id=n0,netdev=tap0", append="wait"),
                        prefix=ns.command(), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for_api(workdir, traced)
        tap_fd = ns.call(open_tap, "tap2")

        async def steps(qmp, events):
            def file(name, **more):
                return {"node-name": name, "file": {"driver": "file",
                                                    "filename": str(images[name])}, **more}
            await qmp.execute("query-block")
            await qmp.execute("blockdev-add", file("h1", cache={"direct": False}))
            await qmp.execute("device_add", {"id": "h1", "driver": "virtio-blk-mmio",
                                             "addr": "0x2"})
            await qmp.execute("blockdev-add", file("h2", **{"read-only": True}))
            await qmp.execute("device_add", {"id": "h2", "driver": "virtio-blk-mmio"})
            for refused in ({"id": "h3", "driver": "virtio-blk-mmio"},
                            {"id": "h1", "driver": "virtio-blk-mmio", "addr": "9"}):
                try:
                    await qmp.execute("device_add", refused)
                except Exception:              # the error reply is the point
                    pass
            await qmp.execute("query-block")
            for device in ("h1", "h2", "d1"):
                await qmp.execute("device_del", {"id": device})
            await qmp.execute("device_add", {"id": "h1", "driver": "virtio-blk-mmio",
                                             "addr": "1"})
            await qmp.execute("device_del", {"id": "h1"})
            await qmp.execute("blockdev-del", {"node-name": "h1"})
            await qmp.execute("blockdev-del", {"node-name": "h2"})
            await qmp.execute("device_del", {"id": "n0"})
            await qmp.execute("netdev_add", {"id": "tap1", "ifname": "tap1"})
            await qmp.execute("device_add", {"id": "tap1", "driver": "virtio-net-mmio",
                                             "addr": "0x1"})
            qmp.send_fd_scm(tap_fd)
            await qmp.execute("getfd", {"fdname": "tapfd"})
            await qmp.execute("netdev_add", {"id": "n2", "fds": "tapfd"})
            await qmp.execute("device_add", {"id": "n2", "driver": "virtio-net-mmio",
                                             "netdev": "n2"})
            for device in ("tap1", "n2"):
                await qmp.execute("device_del", {"id": device})
            await qmp.execute("netdev_del", {"id": "tap1"})
            await qmp.execute("netdev_del", {"id": "n2"})
            await qmp.execute("query-events")
            await qmp.execute("system_powerdown")
            await qmp.execute("system_reset")
            await events.wait("SHUTDOWN")

        try:
            _qmp(workdir, steps)
        finally:
            os.close(tap_fd)
        return traced.finish()


def session_restart(workdir: Path) -> recorder.Usage:
    """Backends killed and restarted: each kind forked again by the confined launcher
    (under its filter until its own is on) and reconnected by the QMP thread."""
    from .netns import Netns

    with Netns("vmmsr") as ns:
        ns.add_tap("tap0")
        console = workdir / "con.sock"
        rng = workdir / "rng.json"      # the seed's command line has no rng; its JSON has
        rng.write_text(json.dumps({"rng": {"rng_id": "r0", "random_file": "/dev/urandom"}}))
        traced = Traced(workdir, "restart",
                        _vm(workdir, "-D", str(workdir / "restart.log"), *_disks(workdir),
                            "-netdev", "id=n0,netdev=tap0", "-chardev",
                            f"id=c0,path={console}", "-device", "vsock,id=v0,guest-cid=3",
                            "-config", str(rng), append="wait"),
                        prefix=ns.command(), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_for_api(workdir, traced)

        async def steps(qmp, events):
            for name, number in (("vmm-blk-d0", signal.SIGKILL), ("vmm-blk-d0", signal.SIGSYS),
                                 ("vmm-net-n0", signal.SIGKILL), ("vmm-con-c0", signal.SIGKILL),
                                 ("vmm-vsock-v0", signal.SIGKILL),
                                 ("vmm-rng-r0", signal.SIGKILL)):
                events.seen.clear()
                os.kill(_backend(traced, name), number)
                await events.wait("BACKEND_RESTARTED", timeout=60)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(console))
            await qmp.execute("query-block")
            await qmp.execute("quit")

        _qmp(workdir, steps)
        return traced.finish()


def _backend(traced: Traced, name: str) -> int:
    """The pid of the launcher's child `name`, waiting for a restarted one to be named."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in _children(traced.child()):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                    return pid
            except OSError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"no process {name}")


def session_blk_io(workdir: Path) -> recorder.Usage:
    traced = Traced(workdir, "blk-io", [sys.executable, "-m", "tests.framework.seccomp_usage",
                                        "blk-io", str(workdir)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env={**os.environ, "PYTHONPATH": str(REPO)})
    return traced.finish(timeout=300)


SESSIONS = {"boot": session_boot, "many-vcpus": session_many_vcpus, "serial": session_serial, "qmp": session_qmp,
            "sigterm": session_sigterm, "stopcont": session_stopcont, "daemon": session_daemon,
            "hotplug": session_hotplug, "restart": session_restart, "blk-io": session_blk_io}


def record_host(keep: Path | None = None, sessions=HOST_SESSIONS) -> recorder.Usage:
    """Every host session, each in a directory of its own (under `keep`, which is then
    left with the traces, else a temporary one), merged."""
    total = recorder.Usage()
    with tempfile.TemporaryDirectory(prefix="seccomp-usage-") as tmp:
        try:
            for name in sessions:
                where = Path(keep or tmp) / name
                where.mkdir(parents=True)
                total.merge(SESSIONS[name](where))
        finally:
            # A session that failed leaves its VM running; a killed strace would only
            # detach from it, so its whole process group goes.
            for process in Traced.started:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            Traced.started.clear()
    return total


# -- the blk-io session's driver, run as its own process under strace --------------------

def _blk_io(workdir: Path) -> None:
    """Backends forked and confined as the launcher does (children.spawn, serve_disk with
    seccomp on), driven by the host-side virtio driver with real I/O."""
    from vmm import children
    from vmm.devices.virtio.block import request as R
    from vmm.devices.virtio.block.device import (
        VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_F_VERSION_1)
    from vmm.devices.virtio.block.main import serve_disk
    from vmm.vhost_user.protocol import Connection
    from .virtio_driver import DATA_GPA, Driver

    header, status_at, data = DATA_GPA, DATA_GPA + 0x1000, DATA_GPA + 0x10000
    features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | \
        VIRTIO_BLK_F_WRITE_ZEROES

    class Died(Exception):
        pass

    def request(driver, kind, sector, segments=(), writable=False, raw_header=None):
        head_bytes = raw_header or struct.pack("<IIQ", kind, 0, sector)
        driver.memory.write(header, head_bytes)
        driver.memory.write(status_at, b"\xff")
        chain = [(header, len(head_bytes), False)] + [(a, n, writable) for a, n in segments]
        driver.submit(chain + [(status_at, 1, True)])
        wait(driver)
        driver.completion()
        return driver.memory.read(status_at, 1)[0]

    def wait(driver):
        """Until a used element is there, or the backend has died (a seccomp violation,
        say: the trace tells)."""
        while struct.unpack("<H", driver.memory.read(driver.used + 2, 2))[0] == driver.used_seen:
            ready, _, _ = select.select([driver.call, driver.backend.pidfd], [], [])
            if driver.call in ready:
                os.eventfd_read(driver.call)
            elif driver.backend.pidfd in ready:
                raise Died(driver.backend.name)

    def image(name):
        path = workdir / f"{name}.img"
        path.write_bytes(bytes(range(256)) * (8 * MiB // 256))
        return path

    def backend(name, read_only, direct, serial, path=None, engine="auto"):
        path = path or image(name)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
                     | (os.O_DIRECT if direct else 0))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        child = children.spawn(f"vmm-blk-{name}", "virtio-blk", [fd, theirs.fileno()],
                               functools.partial(serve_disk, fd, theirs, read_only, direct,
                                                 serial, True, 1, engine))
        theirs.close()
        os.close(fd)
        driver = Driver(Connection(ours), mem_size=64 * MiB, num=256)
        driver.backend = child
        # With the inflight region, as the vm process and QEMU use a disk backend.
        driver.start(features | (VIRTIO_BLK_F_RO if read_only else 0), inflight=True)
        return child, driver, ours

    def workload(driver, read_only):
        payload = os.urandom(64 * 1024)
        driver.memory.write(data, payload)
        segments = [(data, 4096), (data + 0x3000, 8192), (data + 0x8000, 512)]
        expect = R.S_IOERR if read_only else R.S_OK
        assert request(driver, R.T_OUT, 8, [(data, len(payload))]) == expect
        assert request(driver, R.T_OUT, 200, segments) == expect
        assert request(driver, R.T_IN, 8, [(data, len(payload))], writable=True) == R.S_OK
        assert request(driver, R.T_IN, 200, segments, writable=True) == R.S_OK
        request(driver, R.T_IN, 1 << 40, [(data, 4096)], writable=True)      # past the end
        request(driver, R.T_FLUSH, 0)
        request(driver, R.T_GET_ID, 0, [(data, R.ID_BYTES)], writable=True)
        request(driver, 0x7777, 0)                                           # unknown type
        for kind in (R.T_DISCARD, R.T_WRITE_ZEROES):
            for flags in (0, R.F_UNMAP):
                driver.memory.write(data, struct.pack("<QII", 64, 64, flags))
                request(driver, kind, 0, [(data, 16)])
        # A batch: several requests in flight, one kick (the guest's block layer).
        for slot in range(16):
            base = data + slot * 0x10000
            driver.memory.write(base, struct.pack("<IIQ", R.T_IN, 0, slot * 8))
            driver.write_chain(3 * slot, [(base, 16, False), (base + 0x1000, 4096, True),
                                          (base + 0x20, 1, True)])
        driver.next_desc = 48
        driver.post(range(0, 48, 3))
        done = 0
        while done < 16:
            wait(driver)
            done += len(driver.reap())
        # The frontend stops the ring and starts it again where it stopped (a reset).
        base = driver.frontend.stop_ring(0)
        driver.restart_ring(base)
        assert request(driver, R.T_IN, 0, [(data, 4096)], writable=True) == R.S_OK

    ended = []
    # O_DIRECT: io_uring (auto), and Linux AIO as where io_uring is refused.
    for name, read_only, direct, serial, engine in (
            ("buffered", False, False, "buf-serial", "auto"),
            ("direct", False, True, None, "auto"),
            ("direct-aio", False, True, None, "aio"),
            ("ro", True, False, "ro-serial", "auto")):
        child, driver, connection = backend(name, read_only, direct, serial, engine=engine)
        try:
            workload(driver, read_only)
        except Died:
            pass                         # the trace says why; the recorder reports it
        connection.close()               # the frontend goes away: the backend ends
        child.reap(block=True)
        ended.append(child.describe_end())
        driver.close()
    # A disk that is a block device (a loop device, as root): DISCARD is BLKDISCARD.
    if os.geteuid() == 0 and shutil.which("losetup"):
        loop = subprocess.run(["losetup", "--find", "--show", str(image("loop"))],
                              capture_output=True, text=True)
        if loop.returncode == 0:
            device = loop.stdout.strip()
            try:
                child, driver, connection = backend("loop", False, False, None, device)
                try:
                    workload(driver, False)
                except Died:
                    pass
                connection.close()
                child.reap(block=True)
                ended.append(child.describe_end())
                driver.close()
            finally:
                subprocess.run(["losetup", "--detach", device])
    # A malformed ring: a descriptor outside guest RAM breaks the queue, not the backend.
    child, driver, connection = backend("hostile", False, False, None)
    driver.write_descriptor(0, 1 << 40, 4096, 0, 0)
    driver.publish(0)
    time.sleep(0.5)                      # not a measurement: the backend logs and stops the ring
    connection.close()
    child.reap(block=True)
    ended.append(child.describe_end())
    driver.close()
    print(json.dumps(ended))


# -- nested -----------------------------------------------------------------------------

NESTED_SCRIPTS = ("boot_checks.py", "disk_checks.py")
NESTED_COMMAND = (
    "pip install -q --no-index --no-deps {qmp_wheel} && "
    "CONSOLE_TIMEOUT=3000 stratovirt seccomp usage --json usage.json -- sh -c "
    "'{scripts}'; "
    "echo USAGE-STATUS $?; printf 'USAGE-JSON %s\\n' \"$(tr -d '\\n' < usage.json)\"")


def record_nested(rig, qmp_wheel: Path, scripts=NESTED_SCRIPTS,
                  timeout: float = 3 * 3600) -> tuple[recorder.Usage, object]:
    """The nested suite's L1 scripts (tests/nested/l1/) under `stratovirt seccomp usage`
    in one L1 boot; (the usage, the rig's result for its CHECK lines). Under strace a
    Linux boot that prints its whole log takes many minutes: give a subset of `scripts`
    to record in parts, and merge the results."""
    l1 = REPO / "tests/nested/l1"
    files = {"boot_checks.py": l1 / "boot_checks.py", "disk_checks.py": l1 / "disk_checks.py",
             "console.py": REPO / "tests/framework/console.py", qmp_wheel.name: qmp_wheel}
    command = NESTED_COMMAND.format(qmp_wheel=qmp_wheel.name,
                                    scripts="; ".join(f"python3 {name}" for name in scripts))
    result = rig.run(command, files=files, timeout=timeout)
    found = [line.split(" ", 1)[1] for line in result.output if line.startswith("USAGE-JSON ")]
    if not found or not found[0].strip():
        raise AssertionError("no usage JSON from L1:\n" + result.console[-4000:])
    usage = recorder.Usage.from_json(json.loads(found[0]))
    usage.runs = [{"session": "nested", "checks": [line for line in result.output
                                                   if line.startswith("CHECK")],
                   "status": result.status}]
    return usage, result


if __name__ == "__main__":
    if sys.argv[1:2] == ["blk-io"]:
        _blk_io(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m tests.framework.seccomp_usage blk-io DIR")

"""The process model for disks, on this host's /dev/kvm with the tiny guest: one backend
process per -drive, forked by the launcher, holding only what it needs (in an empty
root: tests/unit/test_empty_root.py has the mechanism); a backend that
dies takes its disk with it, not the VM; nothing outlives the VM.

(The guest side of the disks is tested with a real Linux driver in the nested suite,
tests/nested/test_virtio_blk.py; the tiny guest does not touch virtio.)"""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.framework.jail import check_jailed
from tests.framework.microvm import Microvm, process_name
from tests.framework.qmp import session

pytestmark = pytest.mark.needs_kvm
MiB = 1 << 20


@pytest.fixture
def disks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("disks")
    paths = []
    for name in ("d0", "d1"):
        path = directory / f"{name}.img"
        path.write_bytes(bytes(4 * MiB))
        paths.append(path)
    return paths


def spawn(tmp_path, tiny_guest, disks, *extra) -> Microvm:
    drives = []
    for i, path in enumerate(disks):
        drives += ["-drive", f"file={path},id=d{i},readonly={'true' if i else 'false'}"]
    vm = Microvm(tmp_path, tiny_guest, *drives, *extra, append="wait").spawn()
    vm.wait_for_api()
    return vm


def fd_targets(pid: int) -> list[str]:
    """What the process holds, once two readings agree: a backend may be closing a
    short-lived fd (a ring worker's stop pipe) while we read."""
    def read() -> list[str]:
        targets = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                targets.append(os.readlink(fd))
            except FileNotFoundError:
                pass
        return sorted(targets)
    previous = read()
    for _ in range(50):
        time.sleep(0.05)
        current = read()
        if current == previous:
            return current
        previous = current
    return previous


def quit_vm(vm: Microvm) -> tuple[int, str, str]:
    async def steps(qmp, events):
        status = await qmp.execute("query-status")
        await qmp.execute("quit")
        return status
    status = session(vm.api, steps)
    assert status["status"] == "running"
    return vm.communicate()


def test_one_backend_process_per_disk_holding_only_its_own(tmp_path, tiny_guest, disks):
    vm = spawn(tmp_path, tiny_guest, disks)
    try:
        names = {pid: process_name(pid) for pid in vm.children()}
        assert sorted(names.values()) == ["vmm-blk-d0", "vmm-blk-d1", "vmm-vm"]
        for pid, name in names.items():
            targets = fd_targets(pid)
            assert not any(t == "/dev/kvm" for t in targets) or name == "vmm-vm"
            own = [str(p) for i, p in enumerate(disks) if name == f"vmm-blk-d{i}"]
            assert [t for t in targets if t.endswith(".img")] == own, (name, targets)
            if name != "vmm-vm":
                # Its disk, its socket, guest RAM (the memfd that came over vhost-user:
                # Python's mmap keeps a dup of it), its one queue's io_uring (an O_DIRECT
                # disk, one vCPU), /dev/null as stdin, the VM's stdout and stderr.
                assert len(targets) == 7, targets
                assert targets.count("anon_inode:[io_uring]") == 1
                assert sum(1 for t in targets if t.startswith("socket:")) == 1
                assert sum(1 for t in targets if t.startswith("/memfd:guest-ram")) == 1
                maps = Path(f"/proc/{pid}/maps").read_text()
                assert maps.count("memfd:guest-ram") == 1
                # And no path to anything else: an empty root of its own.
                check_jailed(pid, vm.process.pid)
        code, out, err = quit_vm(vm)
        assert code == 0, err
        assert err == ""
        assert vm.leftovers() == []
        for pid in names:
            assert not Path(f"/proc/{pid}").exists()
    finally:
        vm.kill()


@pytest.mark.parametrize("number,how", [
    (signal.SIGKILL, "was killed by signal 9 (SIGKILL)"),
    # What the SIGSYS reporter's re-raise looks like to the launcher.
    (signal.SIGSYS, "was killed by a seccomp violation (SIGSYS; the log names the syscall)")])
def test_a_dead_backend_breaks_its_disk_not_the_vm(tmp_path, tiny_guest, disks, number, how):
    """With restarts off (tests/vm/test_backend_restart.py has them on)."""
    vm = spawn(tmp_path, tiny_guest, disks, "-backend-restart", "restarts=0")
    try:
        [backend] = [pid for pid in vm.children() if process_name(pid) == "vmm-blk-d1"]
        os.kill(backend, number)
        deadline = time.monotonic() + 10
        while backend in vm.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend not in vm.children()            # reaped by the launcher
        code, out, err = quit_vm(vm)                   # the VM still answers
        assert code == 0
        assert err.strip().splitlines()[-1].endswith(
            f"disk d1: its backend process {how}, and restarts are off (-backend-restart "
            "restarts=0); the device no longer works, the VM goes on")
        assert vm.leftovers() == []
    finally:
        vm.kill()


"""Seccomp on a running VM (tiny guest, one disk), read from the kernel's own view
(/proc/<pid>/task/<tid>/status) and through `stratovirt seccomp check`: every process and
thread is filtered, each with its role's filter stacked where it should be; with
-disable-seccomp nothing is."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm
from tests.framework.qmp import session

pytestmark = pytest.mark.needs_kvm

# Filters per thread: the vm process's main filter is inherited by its threads, which
# stack their own on it (vcpu, api); a backend's ring workers inherit its one filter.
EXPECTED_FILTERS = {"stratovirt": 1, "python3": 1, "vmm-vm": 1, "vmm-serial-in": 1,
                    "vmm-qmp": 2, "vmm-blk-d0": 1, "vring0": 1}


def tasks(pid: int) -> list[tuple[int, str, int, int]]:
    """(tid, name, seccomp mode, filter count) for pid and all its descendants."""
    found = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                      if ":\t" in line)
        found.append((int(task.name), status["Name"].strip(), int(status["Seccomp"]),
                      int(status.get("Seccomp_filters", "0"))))
        children = (task / "children").read_text().split()
        for child in children:
            found += tasks(int(child))
    return found


def quit_vm(vm):
    async def steps(qmp, events):
        await qmp.execute("quit")
    session(vm.api, steps)
    return vm.communicate()


def spawn(tmp_path, tiny_guest, *extra):
    disk = tmp_path.parent / f"{tmp_path.name}-d0.img"
    disk.write_bytes(bytes(1 << 20))
    vm = Microvm(tmp_path, tiny_guest, "-smp", "2", "-drive", f"file={disk},id=d0",
                 *extra, append="wait").spawn()
    vm.wait_for_api()
    return vm


def test_every_process_and_thread_is_filtered_and_children_have_no_privileges(
        tmp_path, tiny_guest):
    vm = spawn(tmp_path, tiny_guest)
    try:
        found = tasks(vm.process.pid)
        names = [name for _, name, _, _ in found]
        assert {"vmm-vm", "vmm-vcpu0", "vmm-vcpu1", "vmm-qmp", "vmm-blk-d0"} <= set(names)
        for tid, name, mode, filters in found:
            if name.startswith("kvm-"):          # KVM's own worker thread in our process
                continue
            assert mode == 2, (tid, name)
            expected = 2 if name.startswith("vmm-vcpu") else EXPECTED_FILTERS.get(name, 1)
            assert filters == expected, (tid, name, filters)

        for child in vm.children():         # the vm process and the disk's backend
            status = (Path(f"/proc/{child}/status")).read_text()
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(fields[caps], 16) == 0, (child, caps, fields[caps])
            assert fields["NoNewPrivs"].strip() == "1"

        check = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                                str(vm.process.pid)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        rows = [line.split() for line in check.stdout.splitlines()[1:]]
        roles = {row[2]: row[3] for row in rows}
        assert roles["vmm-vm"] == "vm" and roles["vmm-vcpu0"] == "vcpu"
        assert roles["vmm-qmp"] == "api" and roles["vmm-blk-d0"] == "virtio-blk"
        assert roles[names[0]] == "launcher"
        assert all(row[4] == "filter" for row in rows if row[3] != "kvm-worker"), check.stdout
        code, _, err = quit_vm(vm)
        assert code == 0, err
    finally:
        vm.kill()


def test_disable_seccomp_installs_no_filter(tmp_path, tiny_guest):
    vm = spawn(tmp_path, tiny_guest, "-disable-seccomp")
    try:
        found = tasks(vm.process.pid)
        assert {mode for _, _, mode, _ in found} == {0}
        check = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                                str(vm.process.pid)], capture_output=True, text=True)
        assert check.returncode != 0
        assert "run without a seccomp filter" in check.stderr
        code, _, err = quit_vm(vm)
        assert code == 0, err
    finally:
        vm.kill()

"""`stratovirt seccomp check --deep` on a live VM (tiny guest, this host's /dev/kvm): every
thread of every role -- the launcher, the vm process's main, stdin and QMP threads, both
vCPUs, cold-plugged disks, NIC, console and vsock backends, a hot-plugged disk backend
and a restarted console backend (each of the last two its own filter on the
launcher's) -- carries exactly the filters `stratovirt seccomp export` makes of its
roles' profiles; and the VM runs on untouched by the look: no thread left stopped or
traced, QMP answers, quit ends it with status 0.

The failures (a wrong filter, a missing one) are tests/unit/test_seccomp_deep.py's, on
process trees made to carry them.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm
from tests.framework.netns import Netns
from tests.framework.qmp import session
from tests.vm.test_hotplug import processes

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
MiB = 1 << 20


@pytest.fixture
def vm(tmp_path, tiny_guest):
    with Netns("vmmdp") as ns:
        ns.add_tap("tap0")
        for name in ("d0", "d1", "h1"):
            (tmp_path / f"{name}.img").write_bytes(bytes(4 * MiB))
        vm = Microvm(tmp_path, tiny_guest, "-smp", "2",
                     "-drive", f"file={tmp_path / 'd0.img'},id=d0",
                     "-drive", f"file={tmp_path / 'd1.img'},id=d1,readonly=true",
                     "-netdev", "id=n0,netdev=tap0",
                     "-chardev", f"id=c0,path={tmp_path / 'con.sock'}",
                     "-device", "vsock,id=v0,guest-cid=3", "-D", str(tmp_path / "vm.log"),
                     append="wait", stdin=subprocess.PIPE)    # the stdin pump runs
        vm.argv = ns.command(*vm.argv)
        vm.spawn().wait_for_api()
        try:
            yield vm
        finally:
            vm.kill()


def hot_plug_and_restart(vm) -> dict:
    """Plug disk h1 (through the launcher, so its filter is on by then) and kill the
    console's backend until it is back; the QMP replies."""
    async def steps(client, events):
        await client.execute("blockdev-add", {
            "node-name": "h1", "cache": {"direct": False},
            "file": {"driver": "file", "filename": str(vm.workdir / "h1.img")}})
        plugged = await client.execute("device_add", {"id": "h1", "driver": "virtio-blk-mmio",
                                                      "addr": "0x2"})
        os.kill(processes(vm)["vmm-con-c0"], signal.SIGKILL)
        restarted = await events.wait("BACKEND_RESTARTED", timeout=20)
        return plugged, restarted["data"]
    return session(vm.api, steps)


def threads(pid: int) -> list[dict[str, str]]:
    """The /proc status of every thread of pid and its descendants."""
    found = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        text = (task / "status").read_text()
        found.append(dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line))
        for child in (task / "children").read_text().split():
            found += threads(int(child))
    return found


def test_every_thread_carries_exactly_its_roles_exported_filters(vm):
    plugged, restarted = hot_plug_and_restart(vm)
    assert plugged == {} and restarted["device"] == "c0"

    done = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check", "--deep",
                           str(vm.process.pid)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    table, deep = done.stdout.split("\nFilters read back from the kernel", 1)
    rows = [line.split() for line in table.splitlines()[1:]]
    results = {}
    for line in deep.splitlines()[2:]:
        pid, tid, name, role, verdict = line.split(maxsplit=4)
        results[int(tid)] = (int(pid), name, role, verdict)
    # Every thread of the table has its line, and each says its filters match.
    assert sorted(results) == sorted(int(row[1]) for row in rows), done.stdout
    stacks: dict[str, set[str]] = {}
    for tid, (pid, name, role, verdict) in results.items():
        if role == "kvm-worker":
            assert verdict == "not read: a KVM kernel thread runs no syscalls"
            continue
        assert verdict.startswith("ok: its "), (tid, name, verdict)
        stack = verdict.split("the exported BPF of ", 1)[1].removesuffix(" (oldest first)")
        stacks.setdefault(name, set()).add(stack)

    launcher = Path(f"/proc/{vm.process.pid}/comm").read_text().strip()
    assert stacks[launcher] == {"launcher"}
    # The vm process's main thread and its stdin pump (which keeps the process's name).
    assert stacks["vmm-vm"] == {"vm"}
    assert sum(1 for _, name, _, _ in results.values() if name == "vmm-vm") == 2, done.stdout
    assert stacks["vmm-vcpu0"] == stacks["vmm-vcpu1"] == {"vm, vcpu"}
    assert stacks["vmm-qmp"] == {"vm, api"}
    assert stacks["vmm-blk-d0"] == stacks["vmm-blk-d1"] == {"virtio-blk"}
    assert stacks["vmm-net-n0"] == {"virtio-net"}
    assert stacks["vmm-vsock-v0"] == {"virtio-vsock"}
    assert stacks["vmm-blk-h1"] == {"launcher, virtio-blk"}           # hot-plugged
    assert stacks["vmm-con-c0"] == {"launcher, virtio-console"}       # restarted
    roles = {role for _, _, role, _ in results.values()} - {"kvm-worker"}   # if the kernel has one
    assert roles == {"launcher", "vm", "vcpu", "api", "virtio-blk", "virtio-net",
                     "virtio-console", "virtio-vsock"}

    # Nothing is left stopped or traced, and the VM goes on.
    for status in threads(vm.process.pid):
        assert status["TracerPid"] == "0", status["Name"]
        assert not status["State"].startswith(("t", "T")), (status["Name"], status["State"])

    async def steps(client, events):
        running = await client.execute("query-status")
        await client.execute("quit")
        return running
    assert session(vm.api, steps)["status"] == "running"
    code, _, err = vm.communicate()
    assert code == 0, err

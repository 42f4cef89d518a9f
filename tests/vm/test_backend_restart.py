"""Backends that come back (vmm/restart.py), on this host's /dev/kvm with the tiny guest,
driven by qemu.qmp: every kind of backend killed (SIGKILL, and SIGSYS as a seccomp
violation ends it) is forked again by the launcher with the same image, tap or socket,
confined (its filter on the launcher's), and the vm process reconnects to it:
BACKEND_RESTARTED, query-block's count, the console socket still there for a client;
past the policy's limit the device is failed with one line and BACKEND_FAILED, and the
VM goes on; nothing is left behind.

The tiny guest drives no virtio device, so this is the process side: the guest's view
(I/O across kills, nothing lost) is tests/nested/test_backend_restart.py's, the
in-flight region's is tests/unit/test_vhost_user_blk_inflight.py's.
"""

import os
import signal
import socket
import time

import pytest

from tests.framework.jail import check_jailed
from tests.framework.microvm import Microvm
from tests.framework.netns import Netns
from tests.framework.qmp import session
from tests.vm.test_hotplug import fds, processes, status_of

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
MiB = 1 << 20


@pytest.fixture(scope="module")
def ns():
    with Netns("vmmrs") as ns:
        ns.add_tap("tap0")
        yield ns


@pytest.fixture(scope="module")
def vm(ns, tmp_path_factory, tiny_guest):
    """A disk, a NIC, the console and vsock; at most 3 restarts a minute."""
    workdir = tmp_path_factory.mktemp("restart")
    (workdir / "d0.img").write_bytes(bytes(4 * MiB))
    vm = Microvm(workdir, tiny_guest, "-drive", f"file={workdir / 'd0.img'},id=d0",
                 "-netdev", "id=n0,netdev=tap0", "-chardev", f"id=c0,path={workdir / 'con.sock'}",
                 "-device", "vsock,id=v0,guest-cid=3", "-D", str(workdir / "vm.log"),
                 "-backend-restart", "restarts=3,window=60", append="wait")
    vm.argv = ns.command(*vm.argv)
    vm.spawn().wait_for_api()
    yield vm
    vm.kill()


def kill_and_wait(vm, name: str, number: int = signal.SIGKILL) -> dict:
    """Kill backend `name`; the BACKEND_RESTARTED event that follows, and the new pid."""
    async def steps(client, events):
        old = processes(vm)[name]
        os.kill(old, number)
        event = await events.wait("BACKEND_RESTARTED", timeout=20)
        new = processes(vm).get(name)
        return event["data"], old, new, await client.execute("query-block")
    return session(vm.api, steps)


def confined(pid: int) -> dict[str, str]:
    deadline = time.monotonic() + 10
    while True:
        status = status_of(pid)
        if status["Seccomp"] == "2" or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_a_killed_disk_backend_comes_back_with_its_image_confined(vm):
    data, old, new, block = kill_and_wait(vm, "vmm-blk-d0")
    assert data == {"device": "d0", "count": 1, "reason": "was killed by signal 9 (SIGKILL)"}
    assert new and new != old
    status = confined(new)
    # Forked by the confined launcher: its own filter on the launcher's.
    assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "2"
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    assert str(vm.workdir / "d0.img") in fds(new)
    check_jailed(new, vm.process.pid, filters=2)     # an empty root, as the first had
    assert block[0]["device"] == "d0" and block[0]["restarts"] == 1


def test_a_seccomp_kill_is_a_death_like_any_other(vm):
    data, _, new, block = kill_and_wait(vm, "vmm-blk-d0", signal.SIGSYS)
    assert data["device"] == "d0" and data["count"] == 2
    assert "seccomp violation (SIGSYS" in data["reason"]
    assert new and block[0]["restarts"] == 2
    # Counted for the operator, per role (docs/metrics.md).

    async def steps(client, events):
        return await client.execute("query-stats", {"target": "vm",
                                                    "providers": [{"provider": "vmm"}]})
    [vmm] = session(vm.api, steps)
    values = {s["name"]: s["value"] for s in vmm["stats"]}
    assert values["seccomp-faults-virtio-blk"] == 1 and values["backend-restarts-d0"] == 2


def test_nic_console_and_vsock_backends_come_back(vm):
    for name, device in (("vmm-net-n0", "n0"), ("vmm-con-c0", "c0"), ("vmm-vsock-v0", "v0")):
        data, old, new, _ = kill_and_wait(vm, name)
        assert (data["device"], data["count"]) == (device, 1), name
        assert new and new != old and confined(new)["Seccomp_filters"] == "2", name
        check_jailed(new, vm.process.pid, filters=2,
                     reach=str(vm.workdir) if name == "vmm-vsock-v0" else None)
    # The console's socket stayed bound: a client connects to the new backend.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(vm.workdir / "con.sock"))
    assert any("/dev/net/tun" in target for target in fds(processes(vm)["vmm-net-n0"]))


def test_past_the_limit_the_device_fails_and_the_vm_goes_on(vm):
    kill_and_wait(vm, "vmm-blk-d0")              # the third restart within the minute

    async def steps(client, events):
        os.kill(processes(vm)["vmm-blk-d0"], signal.SIGKILL)
        failed = await events.wait("BACKEND_FAILED", timeout=20)
        return failed["data"], await client.execute("query-status")
    failed, status = session(vm.api, steps)
    assert failed == {"device": "d0", "reason": "was killed by signal 9 (SIGKILL)"}
    assert status["status"] == "running"
    time.sleep(0.5)                               # a restart would have come by now
    assert "vmm-blk-d0" not in processes(vm)
    log = (vm.workdir / "vm.log").read_text()
    [line] = [line for line in log.splitlines() if "no longer works" in line]
    assert "disk d0" in line and "after 3 restarts in 60 s, the most -backend-restart allows" in line


def test_nothing_is_left_behind(vm):
    async def steps(client, events):
        await client.execute("quit")
    session(vm.api, steps)
    status, _, _ = vm.communicate(timeout=30)
    assert status == 0
    assert vm.leftovers() == ["d0.img", "vm.log"]

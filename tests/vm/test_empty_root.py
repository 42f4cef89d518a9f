"""The backends' empty root (vmm/sandbox/empty_root.py) around whole VMs, on this host's
/dev/kvm with the tiny guest, beyond what each device's own tests check (an empty root
for every kind, cold-plugged, hot-plugged and restarted: test_disk_backends,
test_nic_backends, test_console_vsock_backends, test_hotplug, test_backend_restart):

- -disable-seccomp skips the filters, not the empty root;
- a launcher with no capability in the host's namespaces (run in a user namespace of
  its own, as root there) still jails every backend, at start and on a restart; and
  under stratovirt-jailer (an unprivileged uid, no capabilities at all), where the vsock
  sockets are at the top of the jail, so vsock's root stays the jail's, with a log line;
- where no user namespace can be made (user.max_user_namespaces=0), the backend says so
  in one log line and the VM does not start: stderr has one line, nothing is left behind.
"""

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.framework.jail import check_jailed
from tests.framework.jailer import JailedVm
from tests.framework.microvm import Microvm
from tests.framework.qmp import session
from tests.vm.test_hotplug import processes

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
MiB = 1 << 20
# The launcher in a user namespace of its own, root there (uid and gid 0 mapped to
# themselves): every capability inside it, none in the host's namespaces.
NO_HOST_CAPABILITIES = ["unshare", "--user", "--map-root-user"]


def devices(workdir) -> list[str]:
    (workdir / "d0.img").write_bytes(bytes(4 * MiB))
    return ["-drive", f"file={workdir / 'd0.img'},id=d0",
            "-chardev", f"id=c0,path={workdir / 'con.sock'}",
            "-device", "vsock,id=v0,guest-cid=3"]


def check_backends(vm: Microvm, filtered: bool = True) -> None:
    found = processes(vm)
    assert sorted(found) == ["vmm-blk-d0", "vmm-con-c0", "vmm-vm", "vmm-vsock-v0"]
    for name, pid in found.items():
        if name != "vmm-vm":
            check_jailed(pid, vm.process.pid, filters=1 if filtered else 0,
                         reach=str(vm.workdir) if name == "vmm-vsock-v0" else None)


def quit_vm(vm: Microvm) -> str:
    """Its stderr, once it ended with status 0."""
    async def steps(client, events):
        await client.execute("quit")
    session(vm.api, steps)
    code, _, err = vm.communicate()
    assert code == 0, err
    return err


def test_disable_seccomp_keeps_the_empty_root(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, *devices(tmp_path), "-disable-seccomp",
                 append="wait").spawn()
    try:
        vm.wait_for_api()
        check_backends(vm, filtered=False)
        assert quit_vm(vm) == ""
        assert vm.leftovers() == ["d0.img"]
    finally:
        vm.kill()


def test_a_launcher_without_host_capabilities_jails_its_backends(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, *devices(tmp_path), append="wait")
    vm.argv = NO_HOST_CAPABILITIES + vm.argv           # unshare execs: the launcher's pid
    vm.spawn()
    try:
        vm.wait_for_api()
        assert int(open(f"/proc/{vm.process.pid}/status").read().split("CapEff:\t")[1][:16],
                   16) != 0                           # all of them, in its own namespace
        assert os.readlink(f"/proc/{vm.process.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        check_backends(vm)
        # A restart: forked under the launcher's filter, in its user namespace.
        old = processes(vm)["vmm-vsock-v0"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while processes(vm).get("vmm-vsock-v0", old) == old:
            assert time.monotonic() < deadline, "no restarted vsock backend"
            time.sleep(0.02)
        check_jailed(processes(vm)["vmm-vsock-v0"], vm.process.pid, reach=str(tmp_path),
                     filters=2)
        [warning] = quit_vm(vm).splitlines()
        assert warning.endswith("vsock v0: its backend process was killed by signal 9 "
                                "(SIGKILL); restarting it")
        assert vm.leftovers() == ["d0.img"]
    finally:
        vm.kill()


def test_no_user_namespace_for_a_backend_is_one_line_and_no_vm(tmp_path, tiny_guest):
    """The launcher runs in a user namespace whose user.max_user_namespaces is 0 (the
    limit is per namespace: the host's stays as it is)."""
    log = tmp_path / "vm.log"
    vm = Microvm(tmp_path, tiny_guest, *devices(tmp_path), "-D", str(log), append="wait")
    vm.argv = NO_HOST_CAPABILITIES + [
        "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh",
        *vm.argv]
    code, out, err = vm.run()
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("stratovirt: error: disk d0: vhost-user backend: "), err
    why = (":ERROR: vmm.children: cannot enter an empty root: unshare(CLONE_NEWUSER|"
           "CLONE_NEWNS|CLONE_NEWIPC): No space left on device (user.max_user_namespaces, "
           "max_mnt_namespaces or max_ipc_namespaces is 0 or used up)")
    lines = log.read_text().splitlines()
    assert any(" blk-d0[" in entry and entry.endswith(why) for entry in lines), lines
    assert not any("Traceback" in entry for entry in lines)
    assert vm.leftovers() == ["d0.img", "vm.log"]


def test_under_the_jailer_as_an_unprivileged_uid(tmp_path, tiny_guest):
    uid = gid = 4321
    kernel, disk = tmp_path / "tiny.elf", tmp_path / "root.img"
    shutil.copy(tiny_guest, kernel)
    disk.write_bytes(bytes(4 * MiB))
    for path in (kernel, disk):
        os.chown(path, uid, gid)
    vm = JailedVm(tmp_path / "jails", "er-1", [kernel, disk], [
        "-kernel", "/tiny.elf", "-append", "wait", "-drive", "id=d0,file=/root.img",
        "-api-channel", "unix:/run/api.sock", "-chardev", "id=con0,path=/run/console.sock",
        "-device", "vsock,id=vs0,guest-cid=3", "-D", "/vm.log"], uid=uid, gid=gid)
    vm.spawn()
    try:
        api = vm.wait_for_api()
        found = {Path(f"/proc/{pid}/comm").read_text().strip(): pid for pid in vm.descendants()}
        launcher = found["stratovirt"]
        for name in ("vmm-blk-d0", "vmm-con-con0"):
            check_jailed(found[name], launcher, ids=(uid, gid))
        # Its sockets' directory is the jail's /run (the jailer makes it for the VMM's
        # sockets): its root holds that and nothing else.
        vsock = found["vmm-vsock-vs0"]
        assert os.listdir(f"/proc/{vsock}/root") == ["run"]
        assert "vs0.vsock" in os.listdir(f"/proc/{vsock}/root/run")
        assert os.readlink(f"/proc/{vsock}/ns/user") != os.readlink(f"/proc/{launcher}/ns/user")
        assert "its root stays /" not in vm.host_path("/vm.log").read_text()

        async def steps(client, events):
            await client.execute("quit")
        session(api, steps)
        code, _, err = vm.communicate()
        assert code == 0, err
    finally:
        vm.cleanup()

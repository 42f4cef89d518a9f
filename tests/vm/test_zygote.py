"""VMs forked by `stratovirt-zygote` (vmm/zygote/), on this host's /dev/kvm with the tiny
guest: the caller's `stratovirt` becomes the C stand-in and the zygote's child becomes
what the caller would have been (fds by number, cwd, cgroup, limits), confined as
always; signals reach the VM through the stand-in, its status comes back; a caller the
zygote may not stand for (another namespace) runs its VM itself; a zygote whose code
changed refuses and goes; a peer of another uid is dropped unread.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm, process_name
from tests.framework.netns import Netns
from vmm.zygote import client, wire

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
ZYGOTE = Path(sys.executable).parent / "stratovirt-zygote"


class Zygote:
    def __init__(self, workdir: Path):
        self.socket = workdir / "zygote" / "z.sock"
        self.log = workdir / "zygote.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(ZYGOTE), "--socket", str(self.socket)],
                                            stderr=log)
        deadline = time.monotonic() + 60
        while "ready on" not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, \
                self.log.read_text()
            time.sleep(0.05)
        self.env = dict(os.environ, STRATOVIRT_ZYGOTE=str(self.socket))

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    zygote = Zygote(tmp_path_factory.mktemp("zygote"))
    yield zygote
    assert zygote.stop() == 0
    assert not zygote.socket.exists()


@pytest.fixture
def vms():
    """Microvms this test spawns, killed if it failed before it ended them (a killed
    stand-in ends its VM: the zygote sees it go)."""
    spawned: list[Microvm] = []
    yield spawned
    for vm in spawned:
        vm.kill()


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def launcher_of(zygote: Zygote, before: set[int]) -> int:
    deadline = time.monotonic() + 30
    while not (new := set(zygote.children()) - before):
        assert time.monotonic() < deadline, "the zygote forked no launcher"
        time.sleep(0.02)
    (pid,) = new
    return pid


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not Path(f"/proc/{pid}").exists()


def test_a_vm_through_the_zygote_is_the_callers_confined_and_ends_with_its_status(
        vms, zygote, tmp_path, tiny_guest):
    (tmp_path / "d0.img").write_bytes(bytes(1 << 20))
    marker = open(tmp_path / "marker", "w")          # an fd the caller passes, number kept
    vm = Microvm(tmp_path, tiny_guest, "-drive", "file=d0.img,id=d0", append="wait")
    vms.append(vm)
    before = set(zygote.children())
    vm.spawn(pass_fds=(marker.fileno(),), env=zygote.env).wait_for_api()
    launcher = launcher_of(zygote, before)
    # The caller is now the stand-in, with its command line; the launcher is the
    # zygote's child and what the caller would have been.
    assert os.readlink(f"/proc/{vm.process.pid}/exe").endswith("stratovirt-standin")
    assert Path(f"/proc/{vm.process.pid}/cmdline").read_bytes().split(b"\0")[:-1] == \
        [arg.encode() for arg in vm.argv]
    assert process_name(vm.process.pid) == process_name(launcher) == Path(sys.executable).name
    assert os.readlink(f"/proc/{launcher}/cwd") == str(tmp_path)
    assert os.readlink(f"/proc/{launcher}/fd/{marker.fileno()}") == str(tmp_path / "marker")
    assert Path(f"/proc/{launcher}/cgroup").read_text() == Path("/proc/self/cgroup").read_text()
    children = [int(pid) for pid in
                Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]
    names = {process_name(pid): pid for pid in children}
    assert {"vmm-vm", "vmm-blk-d0"} <= set(names)
    for pid in names.values():
        assert status(pid)["Seccomp"] == "2", pid
    # The auditor, given the stand-in (as `pgrep -o stratovirt` finds it), checks the VM.
    audit = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                            str(vm.process.pid)], capture_output=True, text=True, timeout=60)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert f"checking its launcher, {launcher}" in audit.stdout
    assert {"vmm-vm", "vmm-blk-d0"} <= {line.split()[2] for line in audit.stdout.splitlines()[2:]}
    # SIGTERM to the stand-in: forwarded, the VM ends in order, its status comes back.
    vm.process.send_signal(signal.SIGTERM)
    code, out, err = vm.communicate()
    assert code == 0, err
    assert out.startswith("tiny ")       # (the guest was still printing: its serial is ours)
    assert gone(launcher)
    assert vm.leftovers() == ["d0.img", "marker"]
    marker.close()


def test_the_same_status_and_line_as_without_the_zygote(vms, zygote, tmp_path, tiny_guest):
    runs = []
    for env in (zygote.env, dict(os.environ, STRATOVIRT_ZYGOTE="")):
        vm = Microvm(tmp_path, tiny_guest, "-m", "64K")
        vms.append(vm)
        vm.spawn(env=env)
        runs.append(vm.communicate())
    assert runs[0] == runs[1]
    assert runs[0][0] == 2 and runs[0][2].startswith("stratovirt: error: -m: 64 KiB"), runs[0]
    ended = []                          # the guest prints and ends the VM itself
    for env in (zygote.env, dict(os.environ, STRATOVIRT_ZYGOTE="")):
        vm = Microvm(tmp_path, tiny_guest)
        vms.append(vm)
        code, out, _ = vm.spawn(env=env).communicate()
        ended.append((code, out.split(" virtio_mmio")[0]))
    assert ended[0] == ended[1] and ended[0][1].startswith("tiny guest"), ended


def test_a_killed_caller_ends_its_vm(vms, zygote, tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait")
    vms.append(vm)
    before = set(zygote.children())
    vm.spawn(env=zygote.env).wait_for_api()
    launcher = launcher_of(zygote, before)
    vm.kill()
    assert gone(launcher)
    assert vm.leftovers() == []
    assert "went away: ending that VM" in zygote.log.read_text()


def test_a_caller_in_another_network_namespace_runs_its_vm_itself(vms, zygote, tmp_path,
                                                                   tiny_guest):
    with Netns("vmmzy") as ns:
        vm = Microvm(tmp_path, tiny_guest, append="wait")
        vms.append(vm)
        vm.argv = ns.command(*vm.argv)
        before = set(zygote.children())
        vm.spawn(env=zygote.env).wait_for_api()
        assert set(zygote.children()) == before
        # (ip netns exec gives it a mount namespace of its own too, checked first)
        assert re.search(r"refused: the caller is in another (mnt|net) namespace",
                         zygote.log.read_text())
        vm.process.send_signal(signal.SIGTERM)
        assert vm.communicate()[0] == 0


def test_the_socket_is_root_only_and_another_uid_is_dropped_unread(zygote, tmp_path):
    assert zygote.socket.stat().st_mode & 0o777 == 0o600
    assert zygote.socket.parent.stat().st_mode & 0o777 == 0o700
    # Let uid 65534 reach it (through a directory fd: pytest's tree is root's), to see
    # the zygote's own check.
    os.chmod(zygote.socket.parent, 0o711)
    os.chmod(zygote.socket, 0o666)
    directory = os.open(zygote.socket.parent, os.O_PATH)
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import os, socket, sys\n"
             "os.setgid(65534); os.setuid(65534)\n"
             "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
             "s.connect(sys.argv[1])\n"
             "print(repr(s.recv(100)))", f"/proc/self/fd/{directory}/{zygote.socket.name}"],
            capture_output=True, text=True, timeout=30, pass_fds=(directory,))
    finally:
        os.close(directory)
        os.chmod(zygote.socket, 0o600)
        os.chmod(zygote.socket.parent, 0o700)
    assert probe.stdout.strip() == "b''", probe
    assert "dropped a caller with uid 65534" in zygote.log.read_text()


def test_a_malformed_request_is_refused_and_the_zygote_goes_on(zygote):
    for message in (7, {"argv": "stratovirt"}, {"argv": [], "env": {}, "fds": [1],
                                                 "started": 0.0}):
        sock = wire.socket()
        try:
            sock.connect(str(zygote.socket))
            wire.send(sock, message)
            reply, fds = wire.receive(sock)
        finally:
            sock.close()
        assert reply == {"refused": "a malformed request"} and fds == []
    assert zygote.process.poll() is None


def test_no_zygote_or_an_empty_variable_means_the_caller_runs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOVIRT_ZYGOTE", "")
    assert client.run(["stratovirt"]) is None
    monkeypatch.setenv("STRATOVIRT_ZYGOTE", str(tmp_path / "none.sock"))
    assert client.run(["stratovirt"]) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as stale:
        stale.bind(str(tmp_path / "stale.sock"))         # bound, nobody listening
        monkeypatch.setenv("STRATOVIRT_ZYGOTE", str(tmp_path / "stale.sock"))
        assert client.run(["stratovirt"]) is None


def test_a_zygote_whose_code_changed_refuses_and_exits(vms, tmp_path, tiny_guest):
    zygote = Zygote(tmp_path)
    module = Path(client.__file__)
    before = module.stat()
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        vm = Microvm(tmp_path, tiny_guest, "-m", "64K")
        vms.append(vm)
        assert vm.spawn(env=zygote.env).communicate()[0] == 2      # run by the caller
        assert zygote.process.wait(30) == 0
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "the installed code changed since the zygote started" in zygote.log.read_text()
    assert not zygote.socket.exists()


def test_a_launcher_killed_by_a_signal_kills_its_stand_in_with_it(vms, zygote, tmp_path,
                                                                  tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait")
    vms.append(vm)
    before = set(zygote.children())
    vm.spawn(env=zygote.env).wait_for_api()
    os.kill(launcher_of(zygote, before), signal.SIGKILL)
    assert vm.communicate()[0] == -signal.SIGKILL       # as a caller of the launcher sees


def test_a_daemon_through_the_zygote(vms, zygote, tmp_path, tiny_guest):
    pidfile = tmp_path / "vm.pid"
    vm = Microvm(tmp_path, tiny_guest, "-daemonize", "-pidfile", str(pidfile), serial=False,
                 append="wait")
    vms.append(vm)
    assert vm.spawn(env=zygote.env).communicate() == (0, "", "")
    daemon = int(pidfile.read_text())
    assert os.getsid(daemon) not in (os.getsid(0), os.getsid(zygote.process.pid))
    assert os.readlink(f"/proc/{daemon}/cwd") == "/"
    os.kill(daemon, signal.SIGTERM)
    assert gone(daemon)
    assert vm.leftovers() == []


def test_vms_started_at_once_each_get_their_own_launcher(vms, zygote, tmp_path, tiny_guest):
    before = set(zygote.children())
    for index in range(5):
        workdir = tmp_path / f"vm{index}"
        workdir.mkdir()
        vm = Microvm(workdir, tiny_guest, append="wait")
        vms.append(vm)
        vm.spawn(env=zygote.env)
    for vm in vms:
        vm.wait_for_api()
    launchers = set(zygote.children()) - before
    assert len(launchers) == 5
    assert {os.readlink(f"/proc/{pid}/cwd") for pid in launchers} == \
        {str(vm.workdir) for vm in vms}
    for vm in vms:
        vm.process.send_signal(signal.SIGTERM)
    assert [vm.communicate()[0] for vm in vms] == [0] * 5
    assert all(gone(pid) for pid in launchers)

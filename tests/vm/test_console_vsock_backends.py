"""The process model for the console and vsock devices, on this host's /dev/kvm with the
tiny guest: each a backend process forked by the launcher (vmm-con-<id>,
vmm-vsock-<id>) holding its listening socket, its vhost-user socket and guest RAM,
confined by its own profile; their sockets are private (0600) and removed when the VM
ends; a second console client is refused with a message even before the guest looks.

(Data through them is tested with a real Linux driver in tests/nested and under QEMU in
tests/interop, and from the host's own driver in tests/unit; the tiny guest does not
touch virtio.)"""

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework.jail import check_jailed
from tests.framework.microvm import Microvm, process_name
from tests.framework.qmp import session
from vmm.devices.virtio.console.port import busy_message

pytestmark = pytest.mark.needs_kvm


def fds(pid: int) -> list[str]:
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(entry))
        except FileNotFoundError:
            pass
    return sorted(found)


def settled(pid: int) -> bool:
    return "\nSeccomp:\t2\n" in Path(f"/proc/{pid}/status").read_text()


def test_console_and_vsock_backends(tmp_path, tiny_guest):
    console, vsock = tmp_path / "con.sock", tmp_path / "v0.vsock"
    vm = Microvm(tmp_path, tiny_guest, "-chardev", f"id=c0,path={console}",
                 "-device", "vsock,id=v0,guest-cid=3", append="wait").spawn()
    try:
        vm.wait_for_api()
        names = {pid: process_name(pid) for pid in vm.children()}
        assert sorted(names.values()) == ["vmm-con-c0", "vmm-vm", "vmm-vsock-v0"]
        for path in (console, vsock):
            info = os.stat(path)
            assert stat.S_ISSOCK(info.st_mode) and info.st_mode & 0o777 == 0o600, path
        for pid, name in names.items():
            if name == "vmm-vm":
                continue
            deadline = time.monotonic() + 10
            while not settled(pid):
                assert time.monotonic() < deadline, f"{name} not confined"
                time.sleep(0.02)
            targets = fds(pid)
            # Its listening socket and its vhost-user socket, guest RAM (the memfd that
            # came over vhost-user), its own eventfds (a wake for each receive and
            # transmit ring, one for its host thread), stdin, stdout and stderr.
            assert sum(1 for t in targets if t.startswith("socket:")) == 2, targets
            assert sum(1 for t in targets if t.startswith("/memfd:guest-ram")) == 1, targets
            assert sum(1 for t in targets if t == "anon_inode:[eventfd]") == 3, targets
            assert len(targets) == 9, targets
            assert not any(t.endswith((".img", "/dev/kvm")) for t in targets)
            status = Path(f"/proc/{pid}/status").read_text()
            assert "\nCapEff:\t0000000000000000\n" in status and "\nNoNewPrivs:\t1\n" in status
            # An empty root; vsock's holds the directory of its sockets, where the guest's
            # streams to <socket>_<port> go.
            check_jailed(pid, vm.process.pid,
                         reach=str(tmp_path) if name == "vmm-vsock-v0" else None)

        # The auditor names both roles and finds every thread filtered.
        check = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                                str(vm.process.pid)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        rows = [line.split() for line in check.stdout.splitlines()[1:]]
        roles = {row[2]: row[3] for row in rows}
        assert roles["vmm-con-c0"] == "virtio-console"
        assert roles["vmm-vsock-v0"] == "virtio-vsock"
        assert all(row[4] == "filter" for row in rows if row[3] != "kvm-worker"), check.stdout

        first = socket.socket(socket.AF_UNIX)
        first.connect(str(console))
        time.sleep(0.3)
        second = socket.socket(socket.AF_UNIX)
        second.connect(str(console))
        second.settimeout(10)
        assert second.recv(200) == busy_message("console c0")
        first.close()

        async def steps(qmp, events):
            await qmp.execute("quit")
        session(vm.api, steps)
        code, _, err = vm.communicate()
        assert code == 0 and err == ""
        assert vm.leftovers() == []                  # both sockets gone
        assert all(not Path(f"/proc/{pid}").exists() for pid in names)
    finally:
        vm.kill()


def test_sigterm_removes_the_sockets(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, "-chardev", f"id=c0,path={tmp_path / 'con.sock'}",
                 "-device", "vsock,id=v0,guest-cid=3", append="wait").spawn()
    try:
        vm.wait_for_api()
        assert sorted(os.listdir(tmp_path)) == ["api.sock", "con.sock", "v0.vsock"]
        vm.process.terminate()
        code, _, err = vm.communicate()
        assert code == 0 and err == ""
        assert vm.leftovers() == []
    finally:
        vm.kill()


@pytest.mark.parametrize("existing, args, message", [
    ("con.sock", ["-chardev", "id=c0,path={dir}/con.sock"],
     '-chardev[0].path: console socket "{dir}/con.sock" already exists; remove it first '
     '(rm -f "{dir}/con.sock") or choose another path'),
    ("v0.vsock", ["-device", "vsock,id=v0,guest-cid=3"],
     '-device[0].id: the vsock socket "{dir}/v0.vsock" (the api-channel\'s directory, the '
     'vsock id) already exists; remove it first (rm -f "{dir}/v0.vsock") or choose another id'),
    (None, ["-device", "vsock,id=v0,guest-cid=2"],
     "-device[0].guest-cid: 2 as guest CID is out of range; allowed 3..4294967294"),
])
def test_bad_console_or_vsock_is_one_line_and_leaves_nothing(tmp_path, tiny_guest, existing,
                                                             args, message):
    if existing:
        (tmp_path / existing).write_text("")
    vm = Microvm(tmp_path, tiny_guest, *(a.format(dir=tmp_path) for a in args))
    code, out, err = vm.run()
    assert code == 2
    assert err == f"stratovirt: error: {message.format(dir=tmp_path)}\n"
    assert vm.leftovers() == ([existing] if existing else [])

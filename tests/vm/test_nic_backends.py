"""The process model for NICs, on this host's /dev/kvm with the tiny guest: one backend
process per -netdev (vmm-net-<id>), forked by the launcher with only its tap, its socket
and guest RAM, confined by the virtio-net profile; a tap that cannot be opened is one
line on stderr and leaves nothing behind. The launcher runs inside a network namespace
the test creates, where the taps are.

(Frames are tested with a real Linux driver in tests/nested/test_virtio_net.py and under
QEMU in tests/interop; the tiny guest does not touch virtio.)"""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.framework.jail import check_jailed
from tests.framework.microvm import Microvm, process_name
from tests.framework.netns import Netns
from tests.framework.qmp import session

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
MiB = 1 << 20


@pytest.fixture
def ns():
    with Netns() as ns:
        ns.add_tap("tap0")
        ns.add_tap("tap1")
        ns.run("ip", "tuntap", "add", "dev", "tun0", "mode", "tun")
        yield ns


def microvm(ns: Netns, tmp_path, tiny_guest, *extra: str) -> Microvm:
    vm = Microvm(tmp_path, tiny_guest, *extra, append="wait")
    vm.argv = ns.command(*vm.argv)          # ip netns exec execs: the pid is the launcher's
    return vm


def fds(pid: int) -> dict[int, str]:
    """fd -> what it is, skipping fds that close while we look."""
    found = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:
            pass
    return found


def settled(pid: int) -> bool:
    """The backend is confined: its start-up (which opens the profiles) is over."""
    return "\nSeccomp:\t2\n" in Path(f"/proc/{pid}/status").read_text()


def processes_named(prefix: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith(prefix):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_one_backend_process_per_nic_holding_only_its_tap(ns, tmp_path, tiny_guest):
    vm = microvm(ns, tmp_path, tiny_guest, "-netdev", "id=n0,netdev=tap0,mac=0e:00:00:00:00:01",
                 "-netdev", "id=n1,netdev=tap1").spawn()
    try:
        vm.wait_for_api()
        names = {pid: process_name(pid) for pid in vm.children()}
        assert sorted(names.values()) == ["vmm-net-n0", "vmm-net-n1", "vmm-vm"]
        for pid, name in names.items():
            if name == "vmm-vm":
                assert "/dev/net/tun" not in fds(pid).values()
                continue
            deadline = time.monotonic() + 10
            while not settled(pid):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            held = fds(pid)
            targets = sorted(held.values())
            # Its tap, its socket, guest RAM (the memfd that came over vhost-user),
            # /dev/null as stdin, stdout and stderr.
            assert len(targets) == 6, targets
            assert targets.count("/dev/net/tun") == 1
            assert sum(1 for t in targets if t.startswith("socket:")) == 1
            assert sum(1 for t in targets if t.startswith("/memfd:guest-ram")) == 1
            assert "\nCapEff:\t0000000000000000\n" in Path(f"/proc/{pid}/status").read_text()
            [tun] = [fd for fd, target in held.items() if target == "/dev/net/tun"]
            tap = "tap0" if name.endswith("n0") else "tap1"
            assert f"iff:\t{tap}\n" in Path(f"/proc/{pid}/fdinfo/{tun}").read_text()
            check_jailed(pid, vm.process.pid)           # and an empty root

        # The auditor sees every thread of the NIC backends filtered, as virtio-net.
        check = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                                str(vm.process.pid)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        rows = [line.split() for line in check.stdout.splitlines()[1:]]
        backends = [str(pid) for pid, name in names.items() if name.startswith("vmm-net-")]
        net_rows = [row for row in rows if row[0] in backends]        # all their threads
        assert {"vmm-net-n0", "vmm-net-n1"} <= {row[2] for row in net_rows}
        assert all(row[3] == "virtio-net" and row[4] == "filter" for row in net_rows), rows

        async def steps(qmp, events):
            await qmp.execute("quit")
        session(vm.api, steps)
        code, _, err = vm.communicate()
        assert code == 0 and err == ""
        assert vm.leftovers() == []
        assert all(not Path(f"/proc/{pid}").exists() for pid in names)
    finally:
        vm.kill()


@pytest.mark.parametrize("tap, why", [
    ("absent0", "tap absent0: no such interface; create it first "
                "(ip tuntap add dev absent0 mode tap)"),
    ("tun0", "tap tun0: not a tap device (or one created with other flags, e.g. multi_queue)"),
    ("lo", "tap lo: not a tap device (or one created with other flags, e.g. multi_queue)"),
])
def test_a_tap_that_cannot_be_opened_is_one_line_and_leaves_nothing(ns, tmp_path, tiny_guest,
                                                                     tap, why):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    drive_id, nic_id = "x" + secrets.token_hex(3), "y" + secrets.token_hex(3)
    workdir = tmp_path / "vm"
    workdir.mkdir()
    vm = microvm(ns, workdir, tiny_guest, "-drive", f"file={disk},id={drive_id}",
                 "-netdev", f"id={nic_id},netdev=tap0", "-netdev", f"id=n1,netdev={tap}")
    code, out, err = vm.run()
    assert code == 1
    assert err == f"stratovirt: error: -netdev id=n1: {why}\n"
    assert vm.leftovers() == []                      # the api-channel socket is gone
    # The disk's and the first NIC's backends were forked before the second NIC failed.
    assert processes_named(f"vmm-blk-{drive_id}") == processes_named(f"vmm-net-{nic_id}") == []
    links = ns.run("ip", "-o", "link").stdout
    assert "absent0" not in links

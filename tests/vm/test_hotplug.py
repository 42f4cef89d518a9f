"""Hot-plug on a live VM (this host's /dev/kvm, the tiny guest), driven by qemu.qmp: a
hot-plugged device gets what a cold-plugged one gets -- its own backend process, forked
by the launcher, confined (its filter stacked on the launcher's, which it was forked
under), holding its image or tap and nothing else -- and goes when it is unplugged;
refusals are one clear error each, with the VM and its other devices untouched and
nothing left behind; 30 plug/unplug cycles leak nothing.

The VMs run in a network namespace the test creates, where their taps are
(tests/framework/netns.py). What a Linux guest sees of hot-plug is the nested suite's
(tests/nested/test_hotplug.py); the slot swap itself, with requests in flight, is
tests/unit/test_slot_swap.py's.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu.qmp import ExecuteError
from tests.framework.jail import check_jailed
from tests.framework.microvm import Microvm
from tests.framework.netns import Netns
from tests.framework.qmp import session
from vmm.devices.virtio.net.tap import open_tap

pytestmark = [pytest.mark.needs_kvm, pytest.mark.needs_root]
MiB = 1 << 20


@pytest.fixture(scope="module")
def ns():
    with Netns("vmmhp") as ns:
        for tap in ("tap0", "tap1", "tap2", "tap3"):
            ns.add_tap(tap)
        yield ns


@pytest.fixture(scope="module")
def vm(ns, tmp_path_factory, tiny_guest):
    """One disk and one NIC cold-plugged; images for hot-plug beside them."""
    workdir = tmp_path_factory.mktemp("hotplug")
    for name in ("cold", "h1", "h2", "ro"):
        (workdir / f"{name}.img").write_bytes(bytes(4 * MiB))
    vm = Microvm(workdir, tiny_guest, "-drive", f"file={workdir / 'cold.img'},id=cold",
                 "-netdev", "id=n0,netdev=tap0", "-D", str(workdir / "vm.log"),
                 append="wait")
    vm.argv = ns.command(*vm.argv)
    vm.spawn().wait_for_api()
    yield vm
    vm.kill()


def image(vm, name) -> str:
    return str(vm.workdir / f"{name}.img")


def qmp(vm, *commands):
    """Run the commands in one session; each result, or the ExecuteError's error."""
    async def steps(client, events):
        results = []
        for command in commands:
            if callable(command):
                results.append(await command(client, events))
                continue
            name, arguments = command
            try:
                results.append(await client.execute(name, arguments))
            except ExecuteError as error:
                results.append(dict(error.received["error"]))
        return results
    return session(vm.api, steps)


def disk_args(vm, node, name=None, **more):
    return ("blockdev-add", {"node-name": node, "file": {"driver": "file",
                                                        "filename": image(vm, name or node)},
                             "cache": {"direct": False}, **more})


def processes(vm) -> dict[str, int]:
    return {Path(f"/proc/{pid}/comm").read_text().strip(): pid for pid in vm.children()}


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def fds(pid: int) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.append(os.readlink(fd))
        except FileNotFoundError:
            pass
    return sorted(found)


def steady_fds(pids: dict[str, int]) -> dict[str, list[str]]:
    """Every process's fds once two readings 0.1 s apart agree: the QMP server may not
    have seen the last session's client go yet, a backend may be closing a stop pipe."""
    previous = None
    for _ in range(50):
        current = {name: fds(pid) for name, pid in pids.items()}
        if current == previous:
            return current
        previous = current
        time.sleep(0.1)
    return previous


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"process {pid} did not end"
        time.sleep(0.02)


def error(result) -> str:
    assert isinstance(result, dict) and "desc" in result, result
    return result["desc"]


def test_a_hot_plugged_disk_gets_its_own_confined_backend_and_loses_it(vm):
    before = processes(vm)
    [plugged, block] = qmp(vm, disk_args(vm, "h1"),
                              ("device_add", {"id": "h1", "driver": "virtio-blk-mmio",
                                              "addr": "0x1"}),
                              ("query-block", {}))[1:]
    assert plugged == {}
    assert block[1]["device"] == "h1" and block[1]["inserted"]["file"] == image(vm, "h1")
    backend = processes(vm)["vmm-blk-h1"]
    status = status_of(backend)
    # Its own filter on top of the launcher's, which it was forked under.
    assert status["Seccomp"] == "2" and status["Seccomp_filters"] == "2"
    assert status["NoNewPrivs"] == "1"
    assert all(int(status[cap], 16) == 0 for cap in ("CapInh", "CapPrm", "CapEff",
                                                     "CapBnd", "CapAmb"))
    held = fds(backend)
    assert image(vm, "h1") in held and image(vm, "cold") not in held
    # Its empty root, made under the launcher's filter before its own went on.
    check_jailed(backend, vm.process.pid, filters=2)
    assert not any(target in ("/dev/kvm", "/dev/net/tun") for target in held)
    # The auditor sees it filtered, with its role, and why it carries two filters.
    audit = subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check",
                            str(vm.process.pid)], capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    [line] = [line for line in audit.stdout.splitlines() if f" {backend} " in line]
    assert "virtio-blk" in line and "filter" in line and "hot-plugged" in line

    async def unplug(client, events):
        await client.execute("device_del", {"id": "h1"})
        deleted = await events.wait("DEVICE_DELETED")
        return deleted["data"], await client.execute("query-block")
    [(deleted, block), gone] = qmp(vm, unplug, ("blockdev-del", {"node-name": "h1"}))
    assert deleted == {"device": "h1", "path": "/machine/peripheral/h1"}
    assert block[1]["empty"] and gone == {}
    wait_gone(backend)
    assert processes(vm).keys() == before.keys()


def test_kata_containers_sequence(vm):
    """What Kata's StratoVirt driver sends (references.md): its blockdev-add shape,
    device_add with the slot as a decimal string, device_del then DEVICE_DELETED."""
    async def steps(client, events):
        await client.execute("blockdev-add", {
            "node-name": "drive-kata", "driver": "raw", "read-only": False,
            "file": {"driver": "file", "filename": image(vm, "h2"), "aio": "native"},
            "cache": {"direct": False, "no-flush": False}})
        await client.execute("device_add", {"id": "drive-kata", "driver": "virtio-blk-mmio",
                                            "drive": "drive-kata", "addr": "2",
                                            "share-rw": "on"})
        block = await client.execute("query-block")
        await client.execute("device_del", {"id": "drive-kata"})
        deleted = await events.wait("DEVICE_DELETED")
        await client.execute("blockdev-del", {"node-name": "drive-kata"})
        return block, deleted
    block, deleted = qmp(vm, steps)[0]
    assert block[2]["device"] == "drive-kata"
    assert deleted["data"]["device"] == "drive-kata"


def test_nics_by_tap_name_and_by_getfd(vm, ns):
    tap = ns.call(open_tap, "tap2")
    os.set_blocking(tap, True)          # as a client may pass it; the backend needs it not

    async def steps(client, events):
        await client.execute("netdev_add", {"id": "net1", "ifname": "tap1"})
        await client.execute("device_add", {"id": "net1", "driver": "virtio-net-mmio",
                                            "addr": "0x1"})
        await client.execute("device_del", {"id": "n0"})          # the cold-plugged one
        client.send_fd_scm(tap)
        await client.execute("getfd", {"fdname": "tapfd"})
        await client.execute("netdev_add", {"id": "net2", "fds": "tapfd"})
        assert not os.get_blocking(tap)     # the open file's flag: the broker set it
        await client.execute("device_add", {"id": "eth-b", "driver": "virtio-net-mmio",
                                            "netdev": "net2", "addr": "0"})
        held = {name: fdinfo_taps(pid) for name, pid in processes(vm).items()
                if name.startswith("vmm-net-")}
        for name in ("vmm-net-net1", "vmm-net-eth-b"):
            check_jailed(processes(vm)[name], vm.process.pid, filters=2)
        for device in ("net1", "eth-b"):
            await client.execute("device_del", {"id": device})
        for netdev in ("net1", "net2"):
            await client.execute("netdev_del", {"id": netdev})
        return held
    try:
        held = qmp(vm, steps)[0]
    finally:
        os.close(tap)
    assert held == {"vmm-net-net1": ["tap1"], "vmm-net-eth-b": ["tap2"]}
    # netdev_del closed the launcher's copies: the taps are free again.
    for name in ("tap1", "tap2"):
        os.close(ns.call(open_tap, name))


def fdinfo_taps(pid: int) -> list[str]:
    taps = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if os.readlink(fd) == "/dev/net/tun":
            for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                if line.startswith("iff:"):
                    taps.append(line.split()[1])
    return taps


def test_a_cold_plugged_disk_can_be_removed_and_its_slot_reused(vm):
    cold = processes(vm)["vmm-blk-cold"]

    async def steps(client, events):
        await client.execute("device_del", {"id": "cold"})
        await events.wait("DEVICE_DELETED")
        # Its image is free now: it may be opened read-write again, into its old slot.
        await client.execute("blockdev-add", disk_args(vm, "cold2", "cold")[1])
        await client.execute("device_add", {"id": "cold", "driver": "virtio-blk-mmio",
                                            "drive": "cold2", "addr": "0"})
        return await client.execute("query-block")
    block = qmp(vm, steps)[0]
    wait_gone(cold)
    assert block[0]["device"] == "cold" and block[0]["inserted"]["node-name"] == "cold2"
    assert processes(vm)["vmm-blk-cold"] != cold


def refusals(vm, ns, workdir):
    link = workdir / "link.img"
    if not link.exists():
        link.symlink_to(image(vm, "h1"))
    blk = {"driver": "virtio-blk-mmio", "drive": "busy"}
    return [
        # (what is tried, words of the error)
        (disk_args(vm, "busy", "h1"), None),                  # set-up: ok
        (("device_add", {"id": "x1", **blk, "addr": "0x0"}),
         "The slot 0 is used by device 'cold'"),
        (("device_add", {"id": "x1", **blk, "addr": "6"}),
         "the disk slot 0x6 does not exist: this machine has 6 disk slots"),
        (("device_add", {"id": "x1", "driver": "virtio-net-mmio", "netdev": "none",
                         "addr": "2"}), "no netdev with id 'none'"),
        (("device_add", {"id": "x1", "driver": "e1000"}), "does not accept value 'e1000'"),
        (("device_add", {"id": "nothing", "driver": "virtio-blk-mmio"}),
         "no blockdev with node-name 'nothing'"),
        (("device_add", {"id": "cold", **blk}), "Duplicate device ID 'cold'"),
        (("device_add", {"id": "x1", **blk, "addr": "zz"}),
         "addr: 'zz' is not a slot number"),
        (disk_args(vm, "busy", "h2"), "Duplicate nodes with node-name='busy'"),
        (("blockdev-add", {"node-name": "m", "file": {"driver": "file",
                                                      "filename": str(workdir / "no.img")}}),
         "No such file or directory"),
        (("blockdev-add", {"node-name": "r", "file": {"driver": "file",
                                                      "filename": "h1.img"}}),
         "'h1.img' is not an absolute path"),
        (("blockdev-add", {"node-name": "d", "file": {"driver": "file",
                                                      "filename": str(workdir)}}),
         "is a directory, not a regular file"),
        (("blockdev-add", {"node-name": "c", "file": {"driver": "file",
                                                      "filename": "/dev/null"}}),
         "/dev/null is a character device, not a regular file"),
        (("blockdev-add", {"node-name": "b", "file": {"driver": "host_device",
                                                      "filename": image(vm, "h2")}}),
         "is a regular file, not a block device; use file.driver \"file\""),
        (("blockdev-add", {"node-name": "s", "file": {"driver": "file",
                                                      "filename": str(link)}}),
         "is a symbolic link"),
        (("blockdev-add", {"node-name": "rw", "file": {"driver": "file",
                                                       "filename": image(vm, "cold")},
                           "cache": {"direct": False}}),
         "; a read-write image must be the only user"),
        (("netdev_add", {"id": "t", "ifname": "absent9"}),
         "tap absent9: no such interface; create it first"),
        (("netdev_add", {"id": "holder", "ifname": "tap1"}), None),   # set-up: ok
        (("netdev_add", {"id": "t", "ifname": "tap1"}), "busy: another process holds it"),
        (("netdev_add", {"id": "holder", "ifname": "tap2"}), "Duplicate netdev id 'holder'"),
        (("netdev_add", {"id": "t"}), "give 'ifname' (an existing tap) or 'fds'"),
        (("netdev_add", {"id": "t", "fds": "unknown"}), "no file descriptor named 'unknown'"),
        (("netdev_add", {"id": "t", "fds": "7"}), "7 is not a file descriptor this VMM was "
                                                  "started with"),
        (("getfd", {"fdname": "nofd"}), "No file descriptor supplied via SCM_RIGHTS"),
        (("device_del", {"id": "nobody"}), "Device 'nobody' not found"),
        (("blockdev-del", {"node-name": "nobody"}), "Failed to find node with node-name"),
        (("netdev_del", {"id": "nobody"}), "netdev 'nobody' not found"),
        (("blockdev-del", {"node-name": "busy"}), None),      # clean-up: ok
        (("netdev_del", {"id": "holder"}), None),
    ]


def test_every_refusal_is_one_clear_error_and_changes_nothing(vm, ns):
    before = processes(vm)
    fds_before = steady_fds(before)
    tried = refusals(vm, ns, vm.workdir)
    results = qmp(vm, *(command for command, _ in tried), ("query-block", {}))
    for (command, words), result in zip(tried, results):
        if words is None:
            assert result == {}, (command, result)
        else:
            assert "desc" in result, (command, result)
            assert words in error(result), (command, result)
            assert "\n" not in error(result)
    block = results[-1]
    assert [entry["device"] for entry in block] == ["cold", "", "", "", "", ""]
    assert processes(vm) == before
    assert steady_fds(before) == fds_before
    assert "Traceback" not in (vm.workdir / "vm.log").read_text()


def test_a_backend_that_fails_to_start_leaves_the_slot_empty(vm, ns):
    """The tap goes away between netdev_add and device_add (an administrator deletes
    it): the launcher still holds it open, but the backend cannot set it up and dies."""
    ns.add_tap("doomed")
    try:
        [added] = qmp(vm, ("netdev_add", {"id": "doomed", "ifname": "doomed"}))
        assert added == {}
        ns.run("ip", "link", "del", "doomed")
        [failed, block] = qmp(vm, ("device_add", {"id": "doomed",
                                                  "driver": "virtio-net-mmio",
                                                  "addr": "1"}),
                              ("netdev_del", {"id": "doomed"}))
        assert "the backend did not come up" in error(failed)
        # Dead, and reaped by the launcher (asynchronously: it may answer first).
        deadline = time.monotonic() + 10
        while any(name == "vmm-net-doomed" for name in processes(vm)):
            assert time.monotonic() < deadline, "the failed backend is still there"
            time.sleep(0.02)
        [plugged] = qmp(vm, ("netdev_add", {"id": "again", "ifname": "tap3"}),
                        ("device_add", {"id": "again", "driver": "virtio-net-mmio",
                                        "addr": "1"}))[1:]
        assert plugged == {}                    # the slot is empty, and usable
        qmp(vm, ("device_del", {"id": "again"}), ("netdev_del", {"id": "again"}))
    finally:
        ns.run("ip", "link", "del", "doomed", check=False)


def memory_kib(pid: int) -> int:
    return int(status_of(pid)["VmRSS"].split()[0])


def test_thirty_plug_unplug_cycles_leak_nothing(vm):
    def cycle():
        return qmp(vm, disk_args(vm, "cyc", "h2"),
                   ("device_add", {"id": "cyc", "driver": "virtio-blk-mmio", "addr": "5"}),
                   ("device_del", {"id": "cyc"}), ("blockdev-del", {"node-name": "cyc"}))

    def census():
        time.sleep(0.3)                      # not a measurement: the last backend ends
        found = {"launcher": vm.process.pid, **processes(vm)}
        return (steady_fds(found),
                {name: memory_kib(pid) for name, pid in found.items()},
                sorted(found))
    for _ in range(3):                       # warm: allocator pools, import caches
        assert cycle() == [{}] * 4
    fds_before, memory_before, names = census()
    for _ in range(30):
        assert cycle() == [{}] * 4
    fds_after, memory_after, names_after = census()
    assert names_after == names and "vmm-blk-cyc" not in names
    assert fds_after == fds_before
    for name in names:
        assert memory_after[name] - memory_before[name] < 2048, (name, memory_before,
                                                                 memory_after)


def test_the_vm_ends_cleanly_with_hot_plugged_devices_in_place(ns, tmp_path, tiny_guest):
    (tmp_path / "a.img").write_bytes(bytes(MiB))
    vm = Microvm(tmp_path, tiny_guest, append="wait")
    vm.argv = ns.command(*vm.argv)
    vm.spawn().wait_for_api()
    try:
        results = qmp(vm, disk_args(vm, "a"),
                      ("device_add", {"id": "a", "driver": "virtio-blk-mmio"}),
                      ("netdev_add", {"id": "n", "ifname": "tap3"}),
                      ("device_add", {"id": "n", "driver": "virtio-net-mmio"}),
                      ("quit", {}))
        assert results == [{}] * 5
        code, _, err = vm.communicate()
        assert code == 0, err
        assert vm.children() == []
        assert sorted(os.listdir(tmp_path)) == ["a.img"]
    finally:
        vm.kill()
    os.close(ns.call(open_tap, "tap3"))      # nothing holds it any more


@pytest.fixture
def limited(ns, tmp_path, tiny_guest):
    """A VM whose disk and NIC have limits on its command line."""
    (tmp_path / "lim.img").write_bytes(bytes(4 * MiB))
    (tmp_path / "h2.img").write_bytes(bytes(4 * MiB))
    vm = Microvm(tmp_path, tiny_guest, "-drive", f"file={tmp_path / 'lim.img'},id=cold,"
                 "throttling.iops-total=4000,throttling.bps-total=1048576",
                 "-netdev", "id=lnic,netdev=tap3,throttling.tx-bps=1000000", append="wait")
    vm.argv = ns.command(*vm.argv)
    vm.spawn().wait_for_api()
    yield vm
    vm.kill()


def test_block_set_io_throttle_and_its_refusals(limited):
    """QEMU's block_set_io_throttle on a cold disk (by drive name) and on a hot-plugged
    one (by device id): query-block shows the limits, the command line's first; 0 clears
    them; refusals are one error each and change nothing. That the backend holds a
    changed limit is tests/unit/test_blk_rate_limit.py's (and the nested suite's, with a
    Linux guest)."""
    vm = limited
    zeros = {name: 0 for name in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}

    def limits(block, index):
        inserted = block[index]["inserted"]
        return {name: inserted[name] for name in zeros}

    [start] = qmp(vm, ("query-block", {}))
    assert limits(start, 0) == {**zeros, "iops": 4000, "bps": 1048576}
    results = qmp(vm, ("block_set_io_throttle", {"device": "cold", **zeros, "iops": 5000,
                                                 "bps": 50 * MiB}),
                  ("query-block", {}),
                  ("block_set_io_throttle", {"device": "nope", **zeros}),
                  ("block_set_io_throttle", {"device": "cold", "id": "cold", **zeros}),
                  ("block_set_io_throttle", {"device": "cold", **zeros, "iops": -1}),
                  ("block_set_io_throttle", {"device": "cold", **zeros, "bps_rd": 5}),
                  ("block_set_io_throttle", {"device": "cold", **zeros, "iops": 100,
                                             "iops_max": 50}),
                  ("block_set_io_throttle", {"device": "cold", **zeros, "iops_max": 50}),
                  ("block_set_io_throttle", {"device": "cold", **zeros, "group": "g"}),
                  ("query-block", {}),
                  ("block_set_io_throttle", {"device": "cold", **zeros}),
                  ("query-block", {}))
    (ok, block, unknown, both, negative, split, below, alone, group, unchanged, cleared,
     after) = results
    assert ok == {} and limits(block, 0) == {**zeros, "iops": 5000, "bps": 50 * MiB}
    assert unknown == {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}
    assert both["desc"] == "Need exactly one of 'device' and 'id'"
    assert negative["desc"] == f"Parameter 'iops' is -1; allowed 0..{(1 << 63) - 1}"
    assert split["desc"].startswith("bps_rd: separate read and write limits are not supported")
    assert below["desc"] == ("iops_max: 50 is below the average rate 100; a burst rate is "
                             "at least iops")
    assert alone["desc"].startswith("iops_max: without iops; a burst needs the average rate")
    assert group["desc"] == "group: throttle groups are not supported"
    assert limits(unchanged, 0) == limits(block, 0)
    assert cleared == {} and limits(after, 0) == zeros

    # A hot-plugged disk, by its device id.
    plugged = qmp(vm, disk_args(vm, "h2"),
                  ("device_add", {"id": "h2dev", "driver": "virtio-blk-mmio", "drive": "h2"}),
                  ("block_set_io_throttle", {"id": "h2dev", **zeros, "iops": 7}),
                  ("block_set_io_throttle", {"id": "h2", **zeros, "iops": 7}),
                  ("query-block", {}))
    by_id, by_node_as_id, block = plugged[2:]
    assert by_id == {} and by_node_as_id["class"] == "DeviceNotFound"
    [entry] = [e for e in block if e["device"] == "h2dev"]
    assert entry["inserted"]["iops"] == 7

    async def unplug(client, events):
        await client.execute("device_del", {"id": "h2dev"})
        await events.wait("DEVICE_DELETED")
        return await client.execute("blockdev-del", {"node-name": "h2"})
    assert qmp(vm, unplug) == [{}]


def test_set_nic_io_throttle_and_its_refusals(limited):
    """Our NIC command, in block_set_io_throttle's manner; that the backend holds what
    it is given is tests/unit/test_nic_rate_limit.py's."""
    zeros = {f"{d}_{k}": 0 for d in ("rx", "tx") for k in ("bps", "pps")}
    results = qmp(limited,
                  ("set_nic_io_throttle", {"id": "lnic", **zeros, "rx_pps": 500,
                                           "tx_bps": 10 * MiB, "tx_bps_max": 20 * MiB}),
                  ("set_nic_io_throttle", {"id": "lnic", **zeros}),
                  ("set_nic_io_throttle", {"id": "cold", **zeros}),
                  ("set_nic_io_throttle", {"id": "nope", **zeros}),
                  ("set_nic_io_throttle", {"id": "lnic", **zeros, "tx_pps": -1}),
                  ("set_nic_io_throttle", {"id": "lnic", **zeros, "rx_pps_max": 5}),
                  ("set_nic_io_throttle", {"id": "lnic", **{**zeros, "rx_bps": None}}),
                  ("set_nic_io_throttle", {"id": "lnic"}))
    ok, cleared, disk, unknown, negative, burst_alone, null, missing = results
    assert ok == {} and cleared == {}
    assert disk == {"class": "DeviceNotFound", "desc": "NIC 'cold' not found"}
    assert unknown == {"class": "DeviceNotFound", "desc": "NIC 'nope' not found"}
    assert negative["desc"] == f"Parameter 'tx_pps' is -1; allowed 0..{(1 << 63) - 1}"
    assert burst_alone["desc"].startswith("rx_pps_max: without rx_pps; a burst needs")
    assert null["desc"] == "Invalid parameter type for 'rx_bps', expected: integer"
    assert missing["desc"] == "Parameter 'rx_bps' is missing"

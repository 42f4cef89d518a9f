"""QMP hot-plug end to end: Debian's stock kernel as L2 (nested rig), booted from the
rootfs with seccomp on, gets disks and NICs plugged into and unplugged from its empty
virtio-mmio slots, then is powered down with the ACPI button. One L1 boot and one L2
boot run every check (tests/nested/l1/hotplug_checks.py, which says what each does).

The VM starts with the rootfs only (vda) and no -netdev: vdb..vdf and eth0/eth1 are the
empty slots, which the guest probed at boot."""


import pytest

from tests.nested.conftest import run_checks

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]


@pytest.fixture(scope="module")
def checks(rig, qmp_wheel):
    # qemu.qmp drives QMP in L1 (getfd needs its send_fd_scm).
    return run_checks(rig, "hotplug_checks.py", qmp_wheel=qmp_wheel, timeout=1800)


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def _ok(reply):
    assert reply["ok"], reply
    return reply


def test_a_disk_plugged_into_an_empty_slot_is_seen_and_read(checks):
    disk = _one(checks, "disk_plug")
    assert disk["before"] == {"size": "0", "ro": "0"}
    _ok(disk["blockdev_add"])
    _ok(disk["device_add"])
    assert disk["seen"]["value"] == str(disk["sectors"]), disk["seen"]
    assert any(f"vdb: detected capacity change from 0 to {disk['sectors']}" in line
               for line in disk["dmesg"]), disk["dmesg"]
    assert disk["ro_after"] == "0"
    assert disk["read"]["guest"] == disk["read"]["host"]
    [slot] = [entry for entry in _ok(disk["query_block"])["return"] if entry["slot"] == 1]
    assert slot["device"] == "hp1" and not slot["empty"]
    assert slot["inserted"]["cache"]["direct"] is True and slot["inserted"]["ro"] is False


def test_the_guests_writes_reach_the_image(checks):
    disk = _one(checks, "disk_plug")
    write = disk["write"]
    assert write["status"] == 0, write["lines"]
    assert write["guest"] == write["host"]
    assert write["tail_guest"] == write["tail_host"]       # the last three sectors
    assert disk["after_write"]["guest"] == disk["after_write"]["host"]


def test_device_del_sends_device_deleted_and_the_guest_sees_capacity_zero(checks):
    disk = _one(checks, "disk_plug")
    unplug = _ok(disk["device_del"])
    # The event came before the reply.
    assert ["DEVICE_DELETED", {"device": "hp1", "path": "/machine/peripheral/hp1"}] \
        in unplug["events"]
    assert disk["gone"]["value"] == "0"
    _ok(disk["blockdev_del"])


def test_another_image_in_the_same_slot_is_read_correctly(checks):
    second = _one(checks, "disk_second")
    _ok(second["blockdev_add"])
    _ok(second["device_add"])            # found by "drive", its id differs
    assert second["seen"]["value"] == str(second["sectors"])
    assert second["read"]["guest"] == second["read"]["host"]
    assert ["DEVICE_DELETED", {"device": "disk-b", "path": "/machine/peripheral/disk-b"}] \
        in _ok(second["device_del"])["events"]
    assert second["gone"]["value"] == "0"
    _ok(second["blockdev_del"])


def test_io_on_a_cold_plugged_disk_goes_on_through_plug_and_unplug(checks):
    io = _one(checks, "io_during_plug")
    rounds = io["rounds"]
    # The loop ran before the plug, across it and after the unplug.
    assert 0 < rounds["started"] <= rounds["plugged"] <= rounds["unplugged"] < rounds["after"]
    assert io["done"] >= rounds["after"] and io["bad"] == 0, io
    assert io["kernel"] == []           # no I/O error, no ext4 complaint in L2's log


def _nic(checks, name):
    found = _one(checks, name)
    assert found["before"]["driver"] == "virtio_net" and found["before"]["carrier"] == "0"
    _ok(found["netdev_add"])
    _ok(found["device_add"])
    assert found["carrier"]["value"] == "1", found["carrier"]
    assert found["ping_out"] == 0 and found["ping_in"] == 0, found
    moved = found["transfer"]
    for direction in ("out", "in"):
        assert moved[direction]["status"] == 0, moved
        assert moved[direction]["guest"] == moved[direction]["host"], (direction, moved)
    assert found["backend"], found
    return found


def test_a_nic_on_a_named_tap(checks):
    found = _nic(checks, "nic_ifname")
    # The guest keeps the MAC it chose for the empty slot.
    assert found["mac_after"] == found["before"]["mac"]


def test_a_nic_on_a_tap_fd_passed_with_getfd(checks):
    """The NIC works once its tap fd is non-blocking (L1 makes it so through its own copy
    of the open file when the first ping fails; see the next test)."""
    found = _nic(checks, "nic_getfd")
    _ok(found["getfd"])


def test_a_blocking_tap_fd_passed_with_getfd_works_as_passed(checks):
    """A management tool's tap fd is usually blocking (QEMU sets O_NONBLOCK on what it
    is given). Found 2026-12: the hot-plugged NIC's backend used it as passed, its
    receive loop (read until EAGAIN) then blocked in read() and the guest got nothing:
    no ping, no TCP; at the VM's end the guest's reset of the slot timed out (EAGAIN)
    and the launcher had to kill the backend."""
    found = _one(checks, "nic_getfd")
    assert found["ping_out_as_passed"] == 0, found["backend_tap_flags"]


def test_a_nic_unplugged_loses_its_carrier_and_the_other_works_on(checks):
    unplug = _one(checks, "nic_unplug")
    assert ["DEVICE_DELETED", {"device": "hn0", "path": "/machine/peripheral/hn0"}] \
        in _ok(unplug["device_del"])["events"]
    assert unplug["carrier"]["value"] == "0"
    _ok(unplug["netdev_del"])
    assert unplug["ping_eth1"] == 0
    assert unplug["backends"] == ["vmm-net-hn1"]


def test_system_powerdown_powers_the_guest_off(checks):
    down = _one(checks, "powerdown")
    _ok(down["system_powerdown"])
    assert "POWERDOWN" in [name for name, _ in down["system_powerdown"]["events"]] \
        or ["POWERDOWN", {}] in down["events"]
    assert "acpid: PWRF/00000080" in down["acpid"]
    assert "Requesting system poweroff" in down["init"]
    assert down["status"] == 0
    assert down["shutdown"] == ["SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}]
    assert not down["api_left"] and down["backends_left"] == []

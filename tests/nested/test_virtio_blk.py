"""virtio-blk end to end: Debian's stock kernel as L2 (nested rig) finds our disks through
ACPI and uses them through the vm process's virtio-mmio transport and one vhost-user
backend process per disk. One L1 boot runs every check (tests/nested/l1/disk_checks.py)."""

import pytest

from tests.nested.conftest import run_checks

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]


@pytest.fixture(scope="module")
def checks(rig):
    return run_checks(rig, "disk_checks.py")


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def test_seed_example_mounts_the_rootfs_rw_and_the_host_finds_the_file(checks):
    seed = _one(checks, "seed")
    assert "rw" in seed["mount"]
    # vda is the rootfs (64 MiB); vdb..vdf are the empty disk slots, capacity 0.
    assert seed["sizes"] == [str(64 * 2048)] + ["0"] * 5
    assert seed["status"] == 0 and not seed["api_left"]     # ACPI S5 power-off
    assert seed["found"] == "written-by-l2\n"


def test_every_thread_of_the_running_vm_is_confined(checks):
    """The VM of the seed example, Linux running on its disk, seen by the auditor."""
    code, out, err = _one(checks, "seed")["seccomp"]
    assert code == 0, out + err
    rows = [line.split() for line in out.splitlines()[1:]]
    roles = {row[3] for row in rows if row[3] != "kvm-worker"}
    assert roles == {"api", "launcher", "virtio-blk", "vm", "vcpu"}, out
    assert all(row[4] == "filter" for row in rows), out


def test_readonly_disk_refuses_writes_and_serial_reads_back(checks):
    readonly = _one(checks, "readonly")
    assert readonly["ro"] == 1
    assert readonly["serial"] == "abc"
    assert readonly["write_status"] != 0
    assert "ro" in readonly["mount"] and readonly["touch_status"] != 0
    assert readonly["status"] == 0


def test_six_disks_direct_and_buffered(checks):
    six = _one(checks, "six")
    assert [d["disk"] for d in six["disks"]] == [f"vd{c}" for c in "abcdef"]
    for disk in six["disks"]:
        assert disk["written"] == disk["read"] == disk["host"], disk
    assert six["vdf_sectors"] == 8 * 2048
    assert six["status"] == 0


def test_a_limited_disk_reads_at_its_limit_and_a_live_change_counts(checks):
    """dd with O_DIRECT in Debian's guest: the disk limited with throttling.bps-total reads
    at its limit (±15%), the unlimited one beside it in the same boot much faster, and
    after block_set_io_throttle doubled the limit, at the new one."""
    rate = _one(checks, "rate_limit")
    limit = rate["limit"]
    assert rate["unlimited"] > 3 * limit, rate      # else the limit would not bind
    assert abs(rate["limited"] - limit) <= 0.15 * limit, rate
    assert rate["changed"] == {"return": {}}, rate
    assert abs(rate["after_change"] - 2 * limit) <= 0.15 * 2 * limit, rate


def test_blockstats_count_what_the_guest_read(checks):
    """query-blockstats after the guest's two dd runs of READ bytes in 64 KiB requests
    on the limited disk: at least those (the kernel's partition scan reads a little
    more), none failed, each in the latency histogram, some of them throttled."""
    rate = _one(checks, "rate_limit")
    [lim] = [d for d in rate["blockstats"]["return"] if d["device"] == "lim"]
    stats, read = lim["stats"], rate["read"]
    assert 2 * read <= stats["rd_bytes"] <= 2 * read + (1 << 20), stats
    assert stats["rd_operations"] >= 2 * read // 65536 and stats["failed_rd_operations"] == 0
    assert sum(stats["rd_latency_histogram"]["bins"]) == stats["rd_operations"]
    assert stats["x-throttled-operations"] > 0 and stats["wr_operations"] == 0

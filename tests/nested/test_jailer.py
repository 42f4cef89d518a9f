"""stratovirt-jailer with Debian's stock kernel as L2 (nested rig): the seed's devices
whole run jailed as uid 4321 under cgroup v2 limits that are in force there, a disk is
hot-plugged from a file placed in the jail, and a memory.max below the VM's needs is a
clear line, not a hang (tests/nested/l1/jailer_checks.py; it shares the L1 boot of
test_linux_boot.py). The host side, without limits (this host's controllers are cgroup
v1's), is tests/vm/test_jailer.py."""

import pytest

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]
UID = "4321"


@pytest.fixture(scope="module")
def checks(boot_and_jailer_checks):
    return boot_and_jailer_checks


def _one(checks, name):
    [found] = checks.get(name, [None])
    assert found, checks["why"]
    return found


def test_every_jailed_process_is_unprivileged_confined_and_limited(checks):
    found = _one(checks, "jailed_processes")
    names = sorted(p["name"] for p in found["processes"])
    assert names == sorted(["stratovirt", "vmm-vm", "vmm-blk-rootfs",
                            "vmm-net-n0", "vmm-con-con0", "vmm-vsock-vs0"]), names
    for process in found["processes"]:
        assert process["uid"] == [UID] * 4 and process["gid"] == [UID] * 4, process
        assert int(process["cap_eff"], 16) == 0 and int(process["cap_bnd"], 16) == 0, process
        assert process["mnt_ns_differs"] and process["pid_ns_differs"], process
        assert process["cgroup"] == "0::/stratovirt/seed", process
        assert process["environ"] == "", process
        assert not process["host_passwd_visible"], process
        assert process["seccomp"] == "2", process
    assert found["cgroup"] == {"memory.max": str(1 << 30), "pids.max": "64",
                               "cpu.max": "max 100000"}
    assert set(found["expected"]) <= {int(pid) for pid in found["in_cgroup"]}, found
    # Nothing else but KVM's own worker for the VM (kvm-nx-lpage-recovery-<pid>), a
    # kernel thread the kernel puts in the cgroup of the process that made the VM.
    others = {name for name in found["in_cgroup"].values()
              if name not in names and not name.startswith("kvm-") and name != "(gone)"}
    assert not others, found


def test_the_seed_devices_work_jailed_and_a_disk_is_hot_plugged_from_the_jail(checks):
    found = _one(checks, "jailed_seed")
    assert found["mounted"] == 0 and found["written"] == "jailed-write", found
    assert "2 packets transmitted, 2 packets received" in found["ping"], found
    assert found["console"] and found["vsock"] == "from-the-guest", found
    assert found["hotplug"] == {"size_sectors": (2 << 20) // 512, "md5": found["extra_md5"]}
    assert found["status"] == 0
    assert not found["jail_left"] and not found["cgroup_left"]      # --clean


def test_too_little_memory_is_a_clear_line_not_a_hang(checks):
    found = _one(checks, "oom")
    assert found["status"] != 0, found
    assert any("ran out of memory in its cgroup (memory.max=48M)" in line
               for line in found["stderr"]), found
    assert not found["jail_left"] and not found["cgroup_left"]

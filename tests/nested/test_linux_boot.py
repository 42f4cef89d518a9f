"""Debian's stock kernel booted by our VMM as L2 inside the nested rig, as a bzImage and
as an ELF vmlinux: ACPI discovery of the vCPUs, interrupts, the serial console both
ways, reboot, Kata's 2.x line (virtio-rng, vhost-vsock and a tap passed as fds), QMP
through qemu.qmp, daemon mode, a VM through the zygote. One L1 boot runs every check (tests/nested/l1/boot_checks.py), and the
jailer's (tests/nested/test_jailer.py) after them."""

import pytest

pytestmark = [pytest.mark.nested, pytest.mark.needs_root]

MiB = 1024


@pytest.fixture(scope="module")
def checks(boot_and_jailer_checks):
    return boot_and_jailer_checks


def test_boots_to_init_with_smp_memory_and_serial_both_ways(checks):
    boots = checks.get("boot", [])
    assert [(b["kernel"], b["smp"]) for b in boots] == [("/l2/vmlinuz", 2), ("/l2/vmlinux", 4)], \
        checks["why"]
    for boot in boots:
        assert boot["cpus"] == boot["smp"]
        size_kib = {"256M": 256 * MiB, "512M": 512 * MiB}[boot["mem"]]
        assert size_kib - 2 * MiB <= boot["memory_kib"] <= size_kib
        assert boot["status"] == 0 and not boot["api_left"]


def test_seed_example_runs_as_written(checks):
    [seed] = checks.get("seed", [None])
    assert seed, checks["why"]
    slots = " ".join(f"virtio_mmio.device=4K@0x{0xd0000000 + i * 0x1000:x}:{5 + i}"
                     for i in range(8))
    assert seed["cmdline"] == f"console=ttyS0 root=/dev/vda rw reboot=k panic=1 {slots}"
    # Without an initramfs, Debian's kernel cannot load virtio_blk (a module): it panics
    # without a root disk, and panic=1 + reboot=k end the VM cleanly through the i8042.
    # The example with the initramfs, root disk and all: tests/nested/test_virtio_blk.py.
    assert seed["root"].startswith("VFS: Unable to mount root fs")
    assert seed["status"] == 0 and not seed["api_left"]


def test_kata_line_runs_with_every_thread_filtered(checks):
    [census] = checks.get("kata_seccomp", [None])
    assert census, checks["why"]
    assert census["unfiltered"] == []


def test_kata_rootfs_read_only_and_virtconsole(checks):
    [devices] = checks.get("kata_devices", [None])
    assert devices, checks["why"]
    assert devices == {"read_only": True, "console": True}


def test_kata_hot_plug_sequence_with_the_guest_reading_the_disk(checks):
    [hotplug] = checks.get("kata_hotplug", [None])
    assert hotplug, checks["why"]
    assert hotplug["guest"] == hotplug["host"]
    assert hotplug["deleted"]["device"] == "drive-1"


def test_kata_line_with_virtio_rng_feeds_dev_hwrng_at_its_rate(checks):
    [rng] = checks.get("kata_rng", [None])
    assert rng, checks["why"]
    assert rng["current"] == "virtio_rng.0"
    assert len(set(rng["sums"])) == 2               # two reads, two different blocks
    assert rng["bytes"] == 40960
    # 8 KiB/s, at most one 8 KiB bucket left before the read: 4..5 s, within 15%
    assert 4 * 0.85 <= rng["seconds"] <= 5 * 1.15, rng


def test_kata_vhost_vsock_from_vhostfd_carries_streams_both_ways(checks):
    [vsock] = checks.get("kata_vsock", [None])
    assert vsock, checks["why"]
    assert vsock["guest_sent"] == vsock["host_got"] and vsock["to_host"] == 0
    assert vsock["host_sent"] == vsock["guest_got"]


def test_kata_nic_from_an_inherited_tap_fd_and_a_clean_end(checks):
    [kata] = checks.get("kata", [None])
    assert kata, checks["why"]
    assert kata["ping"] == 0
    assert kata["trouble"] == [] and kata["status"] == 0 and not kata["api_left"]


def test_qmp_stop_cont_quit_with_qemu_qmp(checks):
    [qmp] = checks.get("qmp", [None])
    assert qmp, checks["why"]
    assert qmp["statuses"] == ["running", "paused", "running"] and qmp["cpus"] == 2
    names = [name for name, _ in qmp["events"]]
    assert names == ["STOP", "RESUME", "SHUTDOWN"]
    assert qmp["events"][-1][1] == {"guest": False, "reason": "host-qmp-quit"}
    assert qmp["status"] == 0 and not qmp["api_left"]


def test_daemonize_pidfile_and_log(checks):
    [daemon] = checks.get("daemon", [None])
    assert daemon, checks["why"]
    assert daemon["foreground"] == [0, "", ""]
    assert daemon["alive"] and daemon["gone"]
    assert not daemon["pidfile_left"] and not daemon["api_left"]
    assert daemon["log_roles"] == ["launcher", "vm"] and daemon["log_shutdown"]


def test_a_debian_guest_through_the_zygote(checks):
    [zygote] = checks.get("zygote", [None])
    assert zygote, checks["why"]
    assert zygote["ready"] and zygote["launchers"] == 1
    assert zygote["standin"] == "stratovirt-standin"
    assert zygote["children"] == ["vmm-blk-rootfs", "vmm-vm"] and zygote["seccomp"] == ["2"]
    assert zygote["status"] == 0 and not zygote["api_left"]
    assert zygote["zygote_status"] == 0 and not zygote["refused"]

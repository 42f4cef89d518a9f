"""A StratoVirt 2.x command line, in Kata's syntax, runs the tiny guest on this host's
/dev/kvm: QMP on -qmp through qemu.qmp, the disk of -drive + -device virtio-blk-device
under its -device id, the rng's confined backend, and the VM's exit through QMP leaves
nothing behind."""

import os
import re
import sys
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm
from tests.framework.netns import Netns
from tests.framework.qmp import session
from vmm.devices.virtio.net import tap

pytestmark = pytest.mark.needs_kvm
MiB = 1 << 20
# One log record: time, role[pid], thread, :LEVEL:, logger: message, its newline.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ([\w.-]+)\[\d+\] \S+ "
                      r":(DEBUG|INFO|WARN|ERROR): ([^\n]*)\n")


def test_2x_line_boots_and_answers_qmp(tmp_path, tiny_guest):
    image = tmp_path / "rootfs.img"
    image.write_bytes(bytes(4 * MiB))
    vm = Microvm(tmp_path, tiny_guest)
    vm.argv = [sys.executable, "-m", "vmm", "-name", "sandbox-2x",
               "-uuid", "0e90df9f-a888-4f3b-9a2c-1234567890ab", "-smp", "2", "-m", "256",
               "-kernel", str(tiny_guest), "-append", "wait",
               "-qmp", f"unix:{vm.api},server,nowait", "-D",
               "-machine", "type=microvm,dump-guest-core=off",
               "-object", "rng-random,id=objrng0,filename=/dev/urandom",
               "-device", "virtio-rng-device,rng=objrng0,id=virtio-rng0",
               "-drive", f"id=rootfs,file={image},readonly=on,direct=off",
               "-device", "virtio-blk-device,drive=rootfs,id=virtio-blk0",
               "-serial", "stdio"]
    vm.spawn()
    try:
        vm.wait_for_api()
        names = {Path(f"/proc/{pid}/comm").read_text().strip(): pid for pid in vm.children()}
        assert "dd" in ram_flags(names["vmm-vm"])        # dump-guest-core=off: MADV_DONTDUMP
        # The rng's backend (comm: 15 bytes of vmm-rng-virtio-rng0) under its filter.
        status = Path(f"/proc/{names['vmm-rng-virtio-']}/status").read_text()
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status

        async def steps(qmp, events):
            answers = {command: await qmp.execute(command)
                       for command in ("query-status", "query-cpus", "query-block")}
            await qmp.execute("quit")
            answers["SHUTDOWN"] = await events.wait("SHUTDOWN")
            return answers

        answers = session(vm.api, steps)
        assert answers["query-status"]["status"] == "running"
        assert [cpu["CPU"] for cpu in answers["query-cpus"]] == [0, 1]
        disk = answers["query-block"][0]
        assert disk["device"] == "virtio-blk0"
        assert disk["inserted"]["file"] == str(image) and disk["inserted"]["ro"] is True
        assert disk["inserted"]["cache"]["direct"] is False
        code, out, err = vm.communicate()
        assert code == 0, err
        # -D alone: the log on stdout, beside the serial console, each line's level
        # between colons (Kata's markers); nothing on stderr. The guest writes its console
        # a byte at a time, so a log line (one write) may land in the middle of its lines.
        logged = LOG_LINE.findall(out)
        assert {role for role, _, _ in logged} >= {"launcher", "blk-virtio-blk0"}
        assert ("launcher", "INFO", "vmm.launcher: VM ended: host-qmp-quit") in logged
        assert "tiny guest: 64-bit entry, cmdline: wait " in LOG_LINE.sub("", out)
        assert err == ""
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rootfs.img"]
    finally:
        vm.kill()


@pytest.mark.needs_root
def test_a_tap_passed_as_an_fd_ends_up_in_its_backend_alone(tmp_path, tiny_guest):
    """Kata's -netdev tap,fds=N: checked, given to the NIC's backend, the launcher's
    number closed (it keeps one copy for a restart, as for a tap it opened by name); the
    vm process never had it."""
    with Netns("vmm2xfd") as ns:
        ns.add_tap("tap7")
        fd = ns.call(tap.open_tap, "tap7")
        vm = Microvm(tmp_path, tiny_guest)
        vm.argv = [sys.executable, "-m", "vmm", "-kernel", str(tiny_guest), "-append", "wait",
                   "-qmp", f"unix:{vm.api},server,nowait", "-machine", "type=microvm",
                   "-netdev", f"tap,id=eth0,fds={fd}",
                   "-device", "virtio-net-device,netdev=eth0,id=eth0", "-serial", "stdio"]
        try:
            vm.spawn(pass_fds=(fd,))
            os.close(fd)
            vm.wait_for_api()
            holders = {Path(f"/proc/{pid}/comm").read_text().strip(): taps(pid)
                       for pid in vm.children()}
            assert holders == {"vmm-vm": [], "vmm-net-eth0": ["tap7"]}
            # The launcher: one copy, kept to fork the backend again after a death
            # (vmm/restart.py); the number it was passed is closed.
            assert taps(vm.process.pid) == ["tap7"]
            assert not Path(f"/proc/{vm.process.pid}/fd/{fd}").exists() or \
                os.readlink(f"/proc/{vm.process.pid}/fd/{fd}") != "/dev/net/tun"
            quit_cleanly(vm)
        finally:
            vm.kill()


def quit_cleanly(vm: Microvm) -> None:
    """QMP's quit, its SHUTDOWN event, exit status 0."""
    async def steps(qmp, events):
        await qmp.execute("quit")
        return await events.wait("SHUTDOWN")

    session(vm.api, steps)
    code, _, err = vm.communicate()
    assert code == 0, err


def taps(pid: int) -> list[str]:
    """The taps a process holds (/dev/net/tun fds, by the interface fdinfo names)."""
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(entry) == "/dev/net/tun":
                info = Path(f"/proc/{pid}/fdinfo/{entry.name}").read_text()
                found += [line.split()[1] for line in info.splitlines()
                          if line.startswith("iff:")]
        except OSError:
            pass
    return found


def ram_flags(pid: int) -> list[str]:
    """The VmFlags of the guest RAM mapping in /proc/PID/smaps."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "memfd:guest-ram" in line)
    return next(line for line in lines[start:] if line.startswith("VmFlags:")).split()[1:]


def test_vhost_vsock_on_this_host(tmp_path, tiny_guest):
    """Where the host has no /dev/vhost-vsock (this one): one line, exit 1, nothing left
    behind. Where it has one: the vm process becomes its owner with the guest's CID and
    the VM runs until QMP's quit. (A guest using it: tests/nested/test_linux_boot.py.)"""
    vm = Microvm(tmp_path, tiny_guest)
    vm.argv = [sys.executable, "-m", "vmm", "-kernel", str(tiny_guest), "-append", "wait",
               "-qmp", f"unix:{vm.api},server,nowait", "-machine", "type=microvm",
               "-device", "vhost-vsock-device,id=vsock-id,guest-cid=1234"]
    if not os.path.exists("/dev/vhost-vsock"):
        code, out, err = vm.run()
        assert (code, out) == (1, "")
        assert err == ("stratovirt: error: vhost-vsock vsock-id: /dev/vhost-vsock: No such "
                       "file or directory (modprobe vhost_vsock)\n")
        assert os.listdir(tmp_path) == []
        return
    vm.spawn()
    try:
        vm.wait_for_api()
        quit_cleanly(vm)
    finally:
        vm.kill()

"""Our whole VMM on this host's /dev/kvm with the tiny guest: boot, serial both ways,
exit through the i8042, QMP through qemu.qmp, daemon mode, and nothing left behind."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.framework.microvm import Microvm, process_name, thread_names
from tests.framework.qmp import session

pytestmark = pytest.mark.needs_kvm

# What the VMM appends for its 8 virtio-mmio slots (6 disks, 2 NICs): written out here,
# not computed, so the guest-visible words are checked against the spec's form.
SLOT_WORDS = " ".join(f"virtio_mmio.device=4K@0x{0xd0000000 + i * 0x1000:x}:{5 + i}"
                      for i in range(8))


@pytest.mark.parametrize("smp,mem", [("1", "128M"), ("4", "128M"), ("1", "1G"), ("4", "1G")])
def test_boots_prints_and_exits_through_the_i8042(tmp_path, tiny_guest, smp, mem):
    vm = Microvm(tmp_path, tiny_guest, "-smp", smp, "-m", mem, append=f"console=ttyS0 smp={smp}")
    code, out, err = vm.run()
    assert code == 0, err
    assert out == f"tiny guest: 64-bit entry, cmdline: console=ttyS0 smp={smp} {SLOT_WORDS}\n"
    assert err == ""
    assert vm.leftovers() == []


def test_memory_above_the_hole_and_many_vcpus(tmp_path, tiny_guest):
    code, out, err = Microvm(tmp_path, tiny_guest, "-smp", "254", "-m", "5G").run()
    assert code == 0, err
    assert out.startswith("tiny guest: 64-bit entry")


def test_serial_input_reaches_the_guest_and_comes_back(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="echo", stdin=subprocess.PIPE).spawn()
    out, err = vm.process.communicate(b"hello, guest.", timeout=60)
    assert vm.process.returncode == 0, err
    assert out.decode() == f"tiny guest: 64-bit entry, cmdline: echo {SLOT_WORDS}\nhello, guest."


def test_qmp_with_qemu_qmp_client(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, "-smp", "2", append="wait").spawn()
    try:
        vm.wait_for_api()

        async def steps(qmp, events):
            status = [await qmp.execute("query-status")]
            cpus = await qmp.execute("query-cpus")
            await qmp.execute("stop")
            status.append(await qmp.execute("query-status"))
            await events.wait("STOP")
            await qmp.execute("cont")
            status.append(await qmp.execute("query-status"))
            await events.wait("RESUME")
            await qmp.execute("quit")
            shutdown = await events.wait("SHUTDOWN")
            return status, cpus, shutdown

        (status, cpus, shutdown) = session(vm.api, steps)
        assert [s["status"] for s in status] == ["running", "paused", "running"]
        assert status[0] == {"running": True, "singlestep": False, "status": "running"}
        assert [c["CPU"] for c in cpus] == [0, 1]
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        code, out, err = vm.communicate()
        assert code == 0, err
        assert vm.leftovers() == []
    finally:
        vm.kill()


def test_process_and_thread_names_and_omit_vm_memory(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, "-smp", "3", "-omit_vm_memory", append="wait").spawn()
    try:
        vm.wait_for_api()
        [child] = vm.children()
        assert process_name(child) == "vmm-vm"
        names = sorted(thread_names(child).values())
        assert [n for n in names if n.startswith("vmm-vcpu")] == ["vmm-vcpu0", "vmm-vcpu1",
                                                                 "vmm-vcpu2"]
        assert "vmm-qmp" in names
        smaps = Path(f"/proc/{child}/smaps").read_text()
        ram = [block for block in smaps.split("\n") if "memfd:guest-ram" in block]
        assert ram, "guest RAM mapping not found"
        flags = _vmflags_of(smaps, "memfd:guest-ram")
        assert "dd" in flags
    finally:
        vm.kill()


def _vmflags_of(smaps: str, name: str) -> list[str]:
    lines = smaps.splitlines()
    for index, line in enumerate(lines):
        if name in line:
            for following in lines[index + 1:]:
                if following.startswith("VmFlags:"):
                    return following.split()[1:]
    return []


def test_without_omit_vm_memory_ram_is_dumped(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait").spawn()
    try:
        vm.wait_for_api()
        [child] = vm.children()
        assert "dd" not in _vmflags_of(Path(f"/proc/{child}/smaps").read_text(), "memfd:guest-ram")
    finally:
        vm.kill()


def test_sigterm_ends_the_vm_cleanly(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait").spawn()
    vm.wait_for_api()
    [child] = vm.children()
    vm.process.terminate()
    code, out, err = vm.communicate()
    assert code == 0, err
    assert vm.leftovers() == []
    assert not Path(f"/proc/{child}").exists()


def test_killed_vm_process_is_reported_and_cleaned_up(tmp_path, tiny_guest):
    vm = Microvm(tmp_path, tiny_guest, append="wait").spawn()
    vm.wait_for_api()
    [child] = vm.children()
    os.kill(child, 9)
    code, out, err = vm.communicate()
    assert code == 1
    assert err.strip().splitlines()[-1] == \
        "stratovirt: error: the vm process was killed by signal 9 (SIGKILL)"
    assert vm.leftovers() == []


def test_daemonize_with_pidfile_and_log(tmp_path, tiny_guest):
    pidfile, logfile = tmp_path / "vm.pid", tmp_path / "vm.log"
    vm = Microvm(tmp_path, tiny_guest, "-daemonize", "-pidfile", str(pidfile), "-D",
                 str(logfile), serial=False, append="wait")
    code, out, err = vm.run()
    assert (code, out, err) == (0, "", "")
    pid = int(pidfile.read_text())
    assert Path(f"/proc/{pid}").exists()
    assert os.getsid(pid) != os.getsid(0)  # a session of its own: detached
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[4] == "0"  # no tty

    async def steps(qmp, events):
        await qmp.execute("quit")
        return await events.wait("SHUTDOWN")

    session(vm.api, steps)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists() and not vm.api.exists()
    log = logfile.read_text()
    assert "launcher[" in log and "vm[" in log and "shutdown: host-qmp-quit" in log


def test_daemon_start_up_errors_reach_the_foreground(tmp_path):
    bogus = tmp_path / "kernel"
    bogus.write_bytes(b"\x7fELF" + bytes(60))
    code, out, err = Microvm(tmp_path, bogus, "-daemonize", serial=False).run()
    assert code == 2 and "is an ELF file but not a 64-bit" in err


@pytest.mark.parametrize("content,message", [
    (b"MZ" + bytes(4094), "is neither an ELF vmlinux nor a bzImage"),
    (b"", "is neither an ELF vmlinux nor a bzImage"),
])
def test_kernel_that_is_not_a_kernel(tmp_path, content, message):
    kernel = tmp_path / "kernel"
    kernel.write_bytes(content)
    code, out, err = Microvm(tmp_path, kernel).run()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["kernel"]


def test_initrd_larger_than_ram(tmp_path, tiny_guest):
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(200 << 20)
    code, out, err = Microvm(tmp_path, tiny_guest, "-m", "128M", "-initrd", str(initrd)).run()
    assert code == 2, err
    assert err.startswith("stratovirt: error: -initrd: an initrd of 200 MiB does not fit in "
                          "128 MiB of memory")
    assert sorted(os.listdir(tmp_path)) == ["initrd"]


@pytest.mark.needs_root
def test_dev_kvm_missing(tmp_path, tiny_guest):
    """A private mount namespace with a /dev that has no kvm node."""
    api = tmp_path / "api.sock"
    script = ("mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
              f"exec {os.sys.executable} -m vmm -kernel {tiny_guest} -api-channel unix:{api}")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == ("stratovirt: error: /dev/kvm: No such file or directory; load the "
                           "kvm module and run as a user who may open it\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.needs_root
def test_dev_kvm_not_permitted(tiny_guest):
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o777)
        proc = subprocess.run([os.sys.executable, "-m", "vmm", "-kernel", str(tiny_guest),
                               "-api-channel", f"unix:{top}/api.sock"], capture_output=True,
                              text=True, timeout=60, user=65534, cwd="/")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("stratovirt: error: /dev/kvm: Permission denied")
        assert os.listdir(top) == []

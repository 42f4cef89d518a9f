"""`stratovirt seccomp ...`: list, show, export, diff on the profiles, and check on a live
process tree set up like the VMM's (a vm process with vCPU and QMP threads, a disk
backend), confined and not."""

import os
import select
import threading

import pytest

from vmm import cli, sandbox
from vmm.sandbox import audit


def run(capsys, *argv) -> tuple[int, str, str]:
    status = cli.main(["seccomp", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_list(capsys):
    status, out, _ = run(capsys, "list")
    assert status == 0
    assert [line.split()[0] for line in out.splitlines()] == sorted(sandbox.ROLES)


def test_show_names_conditions_and_why(capsys):
    status, out, _ = run(capsys, "show", "vcpu")
    assert status == 0
    assert "default action: SCMP_ACT_TRAP" in out
    ioctl = [line for line in out.splitlines() if line.startswith("ioctl ")]
    assert any("arg1 == KVM_RUN" in line and "enter the guest" in line for line in ioctl)
    assert len(ioctl) == 11              # KVM_RUN, KVM_GET_REGS, KVM_IRQ_LINE, 8 vhost-vsock
    status, out, _ = run(capsys, "show", "vm")
    assert "arg0 & (CLONE_THREAD|" in out and "== CLONE_THREAD" in out
    assert "arg2 & PROT_EXEC == 0" in out and "errno(EACCES)" in out


def test_export(capsys, tmp_path):
    status, out, _ = run(capsys, "export", "virtio-blk", "--format", "pfc")
    assert status == 0 and '"preadv"' in out and '"fdatasync"' in out
    target = tmp_path / "blk.bpf"
    status, _, _ = run(capsys, "export", "virtio-blk", "--format", "bpf", "-o", str(target))
    assert status == 0 and target.stat().st_size > 0 and target.stat().st_size % 8 == 0


def test_diff(capsys):
    status, out, _ = run(capsys, "diff", "vm", "vcpu")
    assert status == 1
    assert any(line.startswith("- clone ") for line in out.splitlines())
    assert not any(line.startswith("+") for line in out.splitlines())   # vm covers vcpu
    assert run(capsys, "diff", "api", "api")[:2] == (0, "")


@pytest.mark.parametrize("argv, message", [
    (["show", "gpu"], "no profile for role 'gpu'"),
    (["export", "vm"], "Missing option '--format'"),
    (["check", "999999999"], "no process 999999999"),
    (["frobnicate"], "No such command"),
])
def test_errors_are_one_line(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("stratovirt seccomp: error: ") and message in err


def test_the_vmm_command_line_still_works(capsys):
    status = cli.main(["-kernel", "/no/such/kernel"])
    assert status == 2 and "seccomp" not in capsys.readouterr().err


def _tree(seccomp: bool):
    """A process tree shaped like the VMM's: vmm-vm (main thread, vmm-vcpu0, vmm-qmp) and
    its child vmm-blk-disk0. Returns (pid, release)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            backend = os.fork()
            if backend == 0:
                try:
                    sandbox.confine("virtio-blk", seccomp=seccomp, name="vmm-blk-disk0")
                    os.write(ready_w, b"b")
                    os.read(go_r, 1)
                finally:
                    os._exit(0)
            sandbox.confine("vm", seccomp=seccomp, name="vmm-vm")
            go = threading.Event()
            for role, name in (("vcpu", "vmm-vcpu0"), ("api", "vmm-qmp")):
                def body(role=role, name=name):
                    sandbox.confine(role, seccomp=seccomp, thread=True, name=name)
                    os.write(ready_w, b"t")
                    go.wait()          # a futex: the api profile has no read
                threading.Thread(target=body, daemon=True).start()
            os.write(ready_w, b"v")
            os.read(go_r, 1)
            go.set()
        finally:
            os._exit(0)
    os.close(ready_w)
    got = b""
    while len(got) < 4:
        if not select.select([ready_r], [], [], 10)[0]:
            break
        if not (chunk := os.read(ready_r, 4)):
            break                  # every writer gone: a child died
        got += chunk
    os.close(ready_r)
    assert sorted(got) == sorted(b"btvt"), f"the process tree did not start: {got!r}"

    def release():
        os.write(go_w, b"xxxxxx")
        os.waitpid(pid, 0)
        os.close(go_w)
        os.close(go_r)
    return pid, release


@pytest.mark.needs_root
def test_check_lists_every_thread_with_its_role(capsys):
    pid, release = _tree(seccomp=True)
    try:
        status, out, err = run(capsys, "check", str(pid))
    finally:
        release()
    assert status == 0, out + err
    rows = [line.split() for line in out.splitlines()[1:]]
    seen = {(row[2], row[3], row[4], row[5]) for row in rows}
    assert seen == {("vmm-vm", "vm", "filter", "1"), ("vmm-vcpu0", "vcpu", "filter", "2"),
                    ("vmm-qmp", "api", "filter", "2"),
                    ("vmm-blk-disk0", "virtio-blk", "filter", "1")}, out
    assert len(rows) == 4


@pytest.mark.needs_root
def test_check_fails_for_unfiltered_threads(capsys):
    pid, release = _tree(seccomp=False)
    try:
        status, out, err = run(capsys, "check", str(pid))
    finally:
        release()
    assert status == 1
    assert out.count("UNFILTERED") == 4 and "4 of 4 threads run without a seccomp filter" in err


@pytest.mark.parametrize("name, process, root, role", [
    ("vmm-vcpu12", "vmm-vm", False, "vcpu"), ("vmm-qmp", "vmm-vm", False, "api"),
    ("vmm-vm", "vmm-vm", False, "vm"), ("vmm-blk-rootfs", "vmm-blk-rootfs", False, "virtio-blk"),
    ("vring0", "vmm-blk-rootfs", False, "virtio-blk"), ("python", "python", True, "launcher"),
    ("kvm-nx-lpage-re", "vmm-vm", False, "kvm-worker"), ("bash", "bash", False, "?"),
    ("vmm-con-con0", "vmm-con-con0", False, "virtio-console"),
    ("vmm-vsock-vs0", "vmm-vsock-vs0", False, "virtio-vsock"),
])
def test_roles_from_names(name, process, root, role):
    assert audit.role_of(name, process, root) == role

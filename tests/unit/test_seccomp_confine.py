"""Each role, installed in a forked child, kills the child by SIGSYS on a syscall outside
its profile, after the reporter names the role and the syscall; a stray open fails with
EACCES instead; /proc shows the filters; privileges are gone before the filter is on."""

import ctypes
import fcntl
import functools
import os
import signal
import socket
import threading

import pytest

from vmm import sandbox
from vmm._sigsys import lib
from tests.framework.confined import proc_status, run_child

pytestmark = pytest.mark.needs_root      # confine() of a process drops capabilities
_libc = ctypes.CDLL(None, use_errno=True)
PTRACE_TRACEME = 0


def _execve():
    os.execv("/bin/true", ["true"])


def _ptrace():
    _libc.ptrace(PTRACE_TRACEME, 0, 0, 0)


def _inet_socket():
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)


VIOLATIONS = {"execve": (_execve, 59), "ptrace": (_ptrace, 101), "socket": (_inet_socket, 41)}


@pytest.mark.parametrize("role", ["launcher", "vm", "virtio-blk", "virtio-net",
                                  "virtio-console", "virtio-vsock"])
@pytest.mark.parametrize("call", list(VIOLATIONS))
def test_a_process_role_dies_by_sigsys_and_names_role_and_syscall(role, call):
    action, number = VIOLATIONS[call]

    def body(log_fd):
        sandbox.confine(role, log_fd=log_fd)
        action()

    ending = run_child(body)
    assert ending.signal == signal.SIGSYS, ending
    assert ending.log == f"seccomp violation: role={role} syscall={number} ({call})\n"


def _in_thread(role: str, log_fd: int, action) -> None:
    """confine(vm) for the process, then a thread that confines itself as `role`."""
    sandbox.confine("vm", log_fd=log_fd, name="vmm-vm")
    failure = []

    def run():
        try:
            sandbox.confine(role, thread=True, name="vmm-x")
            action()
        except BaseException as error:      # noqa: BLE001
            failure.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def test_a_vcpu_thread_may_run_kvm_run_but_no_other_ioctl():
    null = os.open("/dev/null", os.O_RDWR)

    def kvm_run():
        with pytest.raises(OSError) as error:    # allowed by the filter; /dev/null says ENOTTY
            fcntl.ioctl(null, lib.KVM_RUN, 0)
        assert error.value.errno == 25

    assert run_child(lambda fd: _in_thread("vcpu", fd, kvm_run)).exit_code == 0

    def another_ioctl():
        fcntl.ioctl(null, lib.KVM_CREATE_VCPU, 0)

    ending = run_child(lambda fd: _in_thread("vcpu", fd, another_ioctl))
    assert ending.signal == signal.SIGSYS, ending
    assert ending.log == "seccomp violation: role=vcpu syscall=16 (ioctl)\n"


@pytest.mark.parametrize("role, call", [("vcpu", "execve"), ("vcpu", "socket"),
                                        ("api", "execve"), ("api", "ptrace")])
def test_thread_roles_die_by_sigsys(role, call):
    action, number = VIOLATIONS[call]
    ending = run_child(lambda fd: _in_thread(role, fd, action))
    assert ending.signal == signal.SIGSYS, ending
    assert ending.log == f"seccomp violation: role={role} syscall={number} ({call})\n"


def test_a_qmp_thread_cannot_clone():
    ending = run_child(lambda fd: _in_thread("api", fd, lambda: os.fork()))
    assert ending.signal == signal.SIGSYS
    assert ending.log == "seccomp violation: role=api syscall=56 (clone)\n"


def test_the_vm_may_start_threads_but_not_processes():
    def body(log_fd):
        sandbox.confine("vm", log_fd=log_fd)
        done = []
        thread = threading.Thread(target=lambda: done.append(1))
        thread.start()
        thread.join()
        assert done == [1]
        os.fork()

    ending = run_child(body)
    assert ending.signal == signal.SIGSYS
    assert ending.log == "seccomp violation: role=vm syscall=56 (clone)\n"


@pytest.mark.parametrize("role", list(sandbox.ROLES))
def test_open_fails_with_eacces_and_the_process_lives(role):
    # fstat of an fd: only the backends, whose Python mmap of guest RAM checks the memfd.
    check = functools.partial(_open_fails, fstat=role.startswith("virtio-"))

    def body(log_fd):
        if role in ("vcpu", "api"):
            _in_thread(role, log_fd, check)
        else:
            sandbox.confine(role, log_fd=log_fd)
            check()

    ending = run_child(body)
    assert ending.exit_code == 0, ending
    assert ending.log == ""


def _open_fails(fstat: bool):
    with pytest.raises(PermissionError):
        open("/etc/hostname")
    with pytest.raises(PermissionError):
        os.stat("/etc/hostname")
    if fstat:
        os.fstat(1)


def _confined_child(role: str, seccomp: bool = True):
    """A child that confines itself (with a vCPU thread for `vm`) and waits; (pid,
    vCPU thread id or None, release)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            sandbox.confine(role, seccomp=seccomp, name=f"vmm-{role}")
            tid = [0]
            if role == "vm":
                started = threading.Event()

                def vcpu():
                    sandbox.confine("vcpu", seccomp=seccomp, thread=True, name="vmm-vcpu0")
                    tid[0] = threading.get_native_id()
                    started.set()
                    os.read(go_r, 1)
                threading.Thread(target=vcpu, daemon=True).start()
                started.wait()
            os.write(ready_w, str(tid[0]).encode())
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    tid = int(os.read(ready_r, 64) or 0)
    os.close(ready_r)

    def release():
        os.write(go_w, b"xx")
        os.waitpid(pid, 0)
        os.close(go_w)
        os.close(go_r)
    return pid, tid or None, release


def test_proc_shows_the_filters_and_the_dropped_privileges():
    pid, vcpu, release = _confined_child("vm")
    try:
        main, thread = proc_status(pid), proc_status(pid, vcpu)
    finally:
        release()
    assert (main["Seccomp"], main["Seccomp_filters"]) == ("2", "1")
    assert (thread["Seccomp"], thread["Seccomp_filters"]) == ("2", "2")
    for status in (main, thread):
        assert status["NoNewPrivs"] == "1"
        assert {status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == \
            {"0000000000000000"}


def test_without_seccomp_privileges_still_go():
    pid, vcpu, release = _confined_child("vm", seccomp=False)
    try:
        main, thread = proc_status(pid), proc_status(pid, vcpu)
    finally:
        release()
    for status in (main, thread):
        assert status["Seccomp"] == "0" and status["NoNewPrivs"] == "1"
        assert status["CapEff"] == status["CapBnd"] == "0000000000000000"


def test_the_launcher_keeps_its_capabilities():
    pid, _, release = _confined_child("launcher")
    try:
        status = proc_status(pid)
    finally:
        release()
    assert status["Seccomp"] == "2" and status["CapEff"] != "0000000000000000"

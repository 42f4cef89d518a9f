"""`stratovirt seccomp check --deep` away from a VM: the ptrace reader
(vmm/sandbox/live_filters.py) against this test's own children -- the filters it returns,
their order, that the child always runs on after, that a signal meant for it is not
lost, that a thread gone is Gone -- libseccomp's export against what it loads, for
every role; and the whole command against process trees made to carry the wrong filter
(tests/framework/filter_tree.py)."""

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pyseccomp
import pytest

from tests.framework import filter_tree
from vmm import cli
from vmm.sandbox import audit, deep_check, live_filters, privileges, seccomp
from vmm.sandbox.live_filters import Filter, Gone, LiveFilterError
from vmm.sandbox.profile import load, roles

pytestmark = pytest.mark.needs_root
TREE = Path(__file__).resolve().parents[1] / "framework" / "filter_tree.py"
GUARD = 60      # seconds before a child that never answers fails the test (not a timing)


def answer(fd: int) -> bytes:
    ready, _, _ = select.select([fd], [], [], GUARD)
    assert ready, "the child never answered"
    return os.read(fd, 64)


class Child:
    """A forked child under `filters` (built filter objects, installed in order) that
    answers each byte on its command pipe: b"s" -> b"1"/b"0" (got SIGUSR1 or not). Every
    role allows the read and write that takes."""

    def __init__(self, *filters):
        self.commands_r, self.commands_w = os.pipe()
        self.answers_r, self.answers_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                got = []
                signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
                privileges.no_new_privs()
                for f in filters:
                    filter_tree.install(f)
                os.write(self.answers_w, b"r")
                while os.read(self.commands_r, 1) == b"s":
                    os.write(self.answers_w, b"1" if got else b"0")
            finally:
                os._exit(0)
        assert answer(self.answers_r) == b"r"

    def ask(self) -> bytes:
        os.write(self.commands_w, b"s")
        return answer(self.answers_r)

    def status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}

    def end(self) -> None:
        """SIGKILL: not every role's filter allows the child's own exit_group (vcpu, api)."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        for fd in (self.commands_r, self.commands_w, self.answers_r, self.answers_w):
            os.close(fd)


def built(role: str):
    return seccomp.build(load(role))


def running_untraced(child: Child) -> None:
    status = child.status()
    assert status["TracerPid"] == "0" and not status["State"].startswith("t"), status
    assert child.ask() == b"0"        # it runs: it answers


def test_a_child_without_filters_has_none_and_runs_on():
    child = Child()
    try:
        assert live_filters.read_filters(child.pid) == []
        running_untraced(child)
    finally:
        child.end()


def test_filters_come_back_oldest_first_exactly_as_exported():
    """Index 0 of PTRACE_SECCOMP_GET_FILTER is the first installed filter (not the most
    recent one, as ptrace(2) says): vm then vcpu must read back as vm then vcpu."""
    child = Child(built("vm"), built("vcpu"))
    try:
        live = live_filters.read_filters(child.pid)
        assert [len(f.program) for f in live] == [len(deep_check.exported("vm").program),
                                                 len(deep_check.exported("vcpu").program)]
        assert live == [deep_check.exported("vm"), deep_check.exported("vcpu")]
        assert deep_check.differences(("vm", "vcpu"), live) == []
        running_untraced(child)
    finally:
        child.end()


@pytest.mark.parametrize("role", roles())
def test_export_bpf_is_what_seccomp_load_installs(role):
    """For the same filter object, libseccomp's export_bpf and seccomp_load give the
    kernel the same program, and the kernel gives it back unchanged."""
    f = built(role)
    exported = live_filters.parse_bpf(seccomp.export(f, "bpf"))
    child = Child(f)
    try:
        [live] = live_filters.read_filters(child.pid)
    finally:
        child.end()
    assert live == Filter(exported, 0)
    assert live == deep_check.exported(role)     # and a filter built afresh is the same


def test_an_attribute_outside_the_program_is_still_seen():
    """CTL_LOG leaves the program as it was: only the filter's flags (read with
    PTRACE_SECCOMP_GET_METADATA) tell; the comparison says so rather than passing."""
    f = built("vm")
    f.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    child = Child(f)
    try:
        [live] = live_filters.read_filters(child.pid)
    finally:
        child.end()
    assert live.program == deep_check.exported("vm").program
    assert live.flags == live_filters.SECCOMP_FILTER_FLAG_LOG
    [problem] = deep_check.differences(("vm",), [live])
    assert problem.startswith("filter 1 of 1 should be vm's: its program matches but it was "
                              "installed with flags 0x2, expected 0x0")


def test_a_signal_that_arrives_while_stopped_is_delivered_after():
    """A signal the child was about to take when we stopped it is handed back at the
    detach, not swallowed by the tracer."""
    child = Child()
    try:
        live_filters._seize(child.pid)
        os.kill(child.pid, signal.SIGUSR1)      # it wakes in read() to take it, and stops
        pass_on = live_filters._wait_stop(child.pid)
        live_filters._detach(child.pid, pass_on)
        assert pass_on == signal.SIGUSR1
        assert child.ask() == b"1"
    finally:
        child.end()


def test_a_signal_sent_during_the_read_is_delivered_after():
    child = Child()
    try:
        with live_filters.stopped(child.pid):
            os.kill(child.pid, signal.SIGUSR1)
        assert child.ask() == b"1"
    finally:
        child.end()


def test_a_thread_that_is_gone_is_gone():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    # A zombie (ended, not reaped) and then nothing at all.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    with pytest.raises(Gone):
        live_filters.read_filters(pid)
    os.waitpid(pid, 0)
    with pytest.raises(Gone):
        live_filters.read_filters(pid)


def test_a_thread_killed_while_stopped_is_gone_and_the_detach_is_quiet():
    child = Child(built("vm"))
    try:
        with live_filters.stopped(child.pid):
            os.kill(child.pid, signal.SIGKILL)
            with pytest.raises(Gone):
                live_filters._get_filter(child.pid, 0)
    finally:
        child.end()


def test_a_thread_traced_by_someone_else_is_an_error():
    child = Child()
    try:
        with live_filters.stopped(child.pid):
            with pytest.raises(LiveFilterError, match=f"already traced by process {os.getpid()}"):
                live_filters.read_filters(child.pid)
        running_untraced(child)
    finally:
        child.end()


def test_the_expected_stacks_agree_with_the_filter_counts():
    for role, counts in audit.EXPECTED_FILTERS.items():
        lengths = {len(deep_check.expected_stack(role, count)) for count in counts}
        assert lengths == set(counts), role
        assert deep_check.expected_stack(role, counts[-1])[-1] == role
    assert deep_check.expected_stack("virtio-net", 2) == ("launcher", "virtio-net")
    assert deep_check.expected_stack("?", 1) is None


# The whole command, on process trees that carry what a test says.

class Tree:
    def __init__(self, *argv: str):
        self.process = subprocess.Popen([sys.executable, str(TREE), *argv],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        line = self.process.stdout.readline()
        if line != b"ready\n":
            self.process.kill()
            raise AssertionError(f"the tree did not start: {line!r} "
                                 f"{self.process.communicate()[1].decode()}")

    def check(self, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vmm", "seccomp", "check", "--deep",
                               *more, str(self.process.pid)], capture_output=True, text=True)

    def tids(self) -> dict[str, int]:
        tasks = Path(f"/proc/{self.process.pid}/task")
        return {(t / "comm").read_text().strip(): int(t.name) for t in tasks.iterdir()}

    def end(self) -> None:
        self.process.stdin.close()
        assert self.process.wait() == 0, self.process.stderr.read().decode()


def deep_lines(out: str) -> dict[str, list[str]]:
    """Thread name -> its lines after the table's."""
    lines = out.split("\nFilters read back from the kernel", 1)[1].splitlines()[2:]
    found: dict[str, list[str]] = {}
    for line in lines:
        found.setdefault(line.split()[2], []).append(line)
    return found


def test_a_vm_shaped_tree_under_the_right_filters_passes():
    tree = Tree("vmm-vm", "vm", "vmm-vcpu0=vcpu", "vmm-vcpu1=vcpu", "vmm-qmp=api")
    try:
        done = tree.check()
        tids = tree.tids()
    finally:
        tree.end()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = deep_lines(done.stdout)
    assert lines.keys() == {"vmm-vm", "vmm-vcpu0", "vmm-vcpu1", "vmm-qmp"}
    pid = tree.process.pid
    assert lines["vmm-vm"] == [f"{pid:>8} {pid:>8} vmm-vm           vm          ok: its 1 "
                               "filter matches the exported BPF of vm"]
    assert lines["vmm-vcpu1"] == [f"{pid:>8} {tids['vmm-vcpu1']:>8} vmm-vcpu1        vcpu      "
                                  "  ok: its 2 filters match the exported BPF of vm, vcpu "
                                  "(oldest first)"]
    assert lines["vmm-qmp"][0].endswith("ok: its 2 filters match the exported BPF of vm, api "
                                        "(oldest first)")


def test_another_roles_filter_and_a_missing_one_fail_naming_the_thread():
    tree = Tree("vmm-vm", "vm", "vmm-vcpu0=vcpu", "vmm-vcpu1=api", "vmm-qmp=")
    try:
        done = tree.check()
        tids = tree.tids()
    finally:
        tree.end()
    assert done.returncode == 1, done.stdout + done.stderr
    lines = deep_lines(done.stdout)
    assert lines["vmm-vm"][0].endswith("ok: its 1 filter matches the exported BPF of vm")
    assert lines["vmm-vcpu0"][0].endswith("ok: its 2 filters match the exported BPF of vm, "
                                          "vcpu (oldest first)")
    # vmm-vcpu1 carries api's filter where vcpu's should be: position 2, and the first
    # instruction where the two exports differ.
    vcpu, api = deep_check.exported("vcpu").program, deep_check.exported("api").program
    index, live, want = deep_check.first_difference(api, vcpu)
    pid = tree.process.pid
    assert lines["vmm-vcpu1"] == [
        f"{pid:>8} {tids['vmm-vcpu1']:>8} vmm-vcpu1        vcpu        DIFFERS: filter 2 of 2 "
        f"should be vcpu's: first difference at instruction {index}: live {live}, exported "
        f"{want} ({len(api)} vs {len(vcpu)} instructions; the live filter is api's)"]
    assert str(live).startswith("code=0x") and " jt=0x" in str(live) and " k=0x" in str(live)
    # vmm-qmp never stacked api's filter on the vm one.
    assert lines["vmm-qmp"] == [
        f"{pid:>8} {tids['vmm-qmp']:>8} vmm-qmp          api         DIFFERS: filter 2 of 2 "
        "should be api's: missing (the thread carries 1)"]
    assert done.stderr == ("2 of 4 threads carry filters other than their roles' exported "
                           "BPF\n")
    # Without --deep the counts alone show the missing filter, not the wrong one.
    assert "vmm-vcpu1        vcpu        filter   2\n" in done.stdout


def test_a_backend_under_the_wrong_parent_filter_fails_at_position_one():
    """A hot-plugged disk backend should carry the launcher's filter under its own."""
    good = Tree("vmm-blk-h1", "launcher,virtio-blk")
    bad = Tree("vmm-blk-h2", "vm,virtio-blk")
    try:
        passed, failed = good.check(), bad.check()
    finally:
        good.end()
        bad.end()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert passed.stdout.rstrip().endswith("ok: its 2 filters match the exported BPF of "
                                           "launcher, virtio-blk (oldest first)")
    assert failed.returncode == 1
    [line] = deep_lines(failed.stdout)["vmm-blk-h2"]
    assert "DIFFERS: filter 1 of 2 should be launcher's: first difference at instruction" in line
    assert line.endswith("the live filter is vm's)")


def test_without_privileges_the_error_is_one_line():
    """CAP_SYS_ADMIN is what PTRACE_SECCOMP_GET_FILTER needs."""
    tree = Tree("vmm-vm", "vm")
    try:
        done = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                               sys.executable, "-m", "vmm", "seccomp", "check", "--deep",
                               str(tree.process.pid)], capture_output=True, text=True)
        status = Path(f"/proc/{tree.process.pid}/status").read_text()
    finally:
        tree.end()
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("stratovirt seccomp: error: --deep: thread ")
    assert "needs CAP_SYS_ADMIN" in done.stderr
    assert "\nTracerPid:\t0\n" in status and "\nState:\tS" in status


def test_a_thread_gone_meanwhile_is_reported_not_failed(capsys, monkeypatch):
    tree = Tree("vmm-vm", "vm", "vmm-vcpu0=vcpu", "vmm-qmp=api")
    tids = tree.tids()
    real = live_filters.read_filters

    def read(tid):
        if tid == tids["vmm-vcpu0"]:
            raise Gone(tid)
        return real(tid)
    monkeypatch.setattr(deep_check, "read_filters", read)
    try:
        status = cli.main(["seccomp", "check", "--deep", str(tree.process.pid)])
    finally:
        tree.end()
    out, err = capsys.readouterr()
    assert status == 0, out + err
    [line] = deep_lines(out)["vmm-vcpu0"]
    assert line.endswith("vmm-vcpu0        vcpu        gone: the thread ended while being read")


def test_a_user_thread_named_like_kvms_worker_is_not_skipped():
    """KVM's nx-lpage thread is skipped because the kernel made it, not because of its
    name, which any thread may take."""
    tree = Tree("vmm-vm", "vm", "kvm-nx-lpage-re=")
    try:
        done = tree.check()
    finally:
        tree.end()
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = deep_lines(done.stdout)["kvm-nx-lpage-re"]
    assert line.endswith("kvm-worker  DIFFERS: named like KVM's kernel thread, but a user "
                         "thread of no known role")


def test_a_thread_of_no_known_role_fails(capsys, monkeypatch):
    """No role, no filters it should carry: nothing can be proven, so it fails."""
    tree = Tree("vmm-vm", "vm", "vmm-vcpu0=vcpu", "stranger=")
    real = audit.role_of
    monkeypatch.setattr(audit, "role_of",
                        lambda name, *more: "?" if name == "stranger" else real(name, *more))
    try:
        status = cli.main(["seccomp", "check", "--deep", str(tree.process.pid)])
    finally:
        tree.end()
    out, err = capsys.readouterr()
    assert status == 1, out + err
    [line] = deep_lines(out)["stranger"]
    assert line.endswith("?           DIFFERS: no known role, so no filter it should carry "
                         "(it carries 1)")
    assert err == "1 of 3 threads carry filters other than their roles' exported BPF\n"

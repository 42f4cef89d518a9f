"""The seccomp usage recorder's analysis (vmm/sandbox/usage.py) on strace output written
by hand in the format strace 6.1 prints with -f -Y -X verbose: who runs under which
filters, which entries match, what is a violation, and the JSON round trip. The real
recordings are tests/vm/test_seccomp_usage.py."""

import json

import pytest

from vmm.sandbox import constants, usage
from vmm.sandbox.profile import parse

KVM_RUN, KVM_GET_REGS = constants.value("KVM_RUN"), constants.value("KVM_GET_REGS")


def profile(role, *entries):
    return parse(role, {"defaultAction": "SCMP_ACT_TRAP", "syscalls": list(entries)})


def allow(names, *args, comment="why"):
    return {"names": names.split(), "action": "SCMP_ACT_ALLOW", "comment": comment,
            "args": [{"index": i, "value": v, "op": "SCMP_CMP_EQ"} for i, v in args]}


def errno(names, comment="why"):
    return {"names": names.split(), "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
            "comment": comment}


PROFILES = {
    "vm": profile("vm", allow("futex write exit"), allow("ioctl", (1, KVM_RUN)),
                  allow("clone"), allow("prctl"), allow("seccomp"), errno("openat"),
                  allow("getrandom", comment="never called")),
    "vcpu": profile("vcpu", allow("futex exit"), allow("ioctl", (1, KVM_RUN)),
                    allow("ioctl", (1, KVM_GET_REGS), comment="error path"), errno("openat")),
}

FILTER = '0x1 /* SECCOMP_SET_MODE_FILTER */, 0, {len=90, filter=0x23618d0}'
CLONE = ('clone(child_stack=0x7f, flags=0x3d0f00 /* CLONE_VM|CLONE_FS|CLONE_FILES|'
         'CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|CLONE_PARENT_SETTID|'
         'CLONE_CHILD_CLEARTID */, parent_tid=[{tid}<vmm-vm>], tls=0x7f, child_tidptr=0x7f)'
         ' = {tid}<vmm-vm>')

TRACE = [
    "100<python> openat(-100 /* AT_FDCWD */, \"/etc/x\", 0x80000 /* O_RDONLY|O_CLOEXEC */) = 3",
    "100<python> prctl(0xf /* PR_SET_NAME */, \"vmm-vm\") = 0",
    f"100<vmm-vm> seccomp({FILTER}) = 0",
    "100<vmm-vm> write(1, \"x\", 1) = 1",
    "100<vmm-vm> clone(child_stack=0x7f, flags=0x3d0f00 /* CLONE_VM|CLONE_THREAD */ <unfinished ...>",
    # The child's first calls come before its creator's clone returns.
    "101<vmm-vm> prctl(0xf /* PR_SET_NAME */, \"vmm-vcpu0\" <unfinished ...>",
    "100<vmm-vm> <... clone resumed>, parent_tid=[101<vmm-vm>], tls=0x7f, child_tidptr=0x7f) = 101<vmm-vm>",
    "101<vmm-vcpu0> <... prctl resumed>) = 0",
    f"101<vmm-vcpu0> seccomp({FILTER.replace('90', '61')} <unfinished ...>",
    "100<vmm-vm> futex(0xa5b8f0, 0x81 /* FUTEX_WAKE_PRIVATE */, 1) = 0",
    "101<vmm-vcpu0> <... seccomp resumed>) = 0",
    "101<vmm-vcpu0> ioctl(27, 0xae80 /* KVM_RUN */ <unfinished ...>",
    "101<vmm-vcpu0> <... ioctl resumed>, 0) = 0",
    "101<vmm-vcpu0> openat(-100 /* AT_FDCWD */, \"/usr/lib/x.py\", 0x80000 /* O_RDONLY|O_CLOEXEC */) = -1 EACCES (Permission denied)",
    "101<vmm-vcpu0> ioctl(27, 0xae80 /* KVM_RUN */ <unfinished ...>) = ?",
    "101<vmm-vcpu0> +++ exited with 0 +++",
    "100<vmm-vm> exit_group(0) = ?",
]


def analyze(lines):
    return usage.analyze(lines, dict(PROFILES))


def test_filters_follow_the_thread_that_loaded_them_and_its_children():
    threads, first = usage.parse(TRACE)
    assert first == 100
    assert threads[101].parent == (100, 4) and threads[101].thread_of == 100
    stacks = usage.filters_over(threads)
    assert stacks[100][0] == () and stacks[100][3] == ("vm",)
    # vcpu0 starts under its creator's filter and stacks its own on it.
    assert stacks[101][0] == ("vm",)
    assert stacks[101][-1] == ("vm", "vcpu")


def test_calls_before_any_filter_are_not_counted_and_stacked_filters_each_count():
    found = analyze(TRACE)
    vm, vcpu = found.roles["vm"], found.roles["vcpu"]
    # The openat of /etc/x came before any filter: not counted.
    assert all("/etc/x" not in sample for sample in vm.denied["openat"])
    assert vm.calls["ioctl(KVM_RUN)"] == 2 and vcpu.calls["ioctl(KVM_RUN)"] == 2
    assert vm.entries["ioctl allow arg1 == KVM_RUN"] == 2
    assert vcpu.threads == {"vmm-vcpu0"} and "vmm-vm" in vm.threads
    # exit_group is not in the vm profile.
    assert [v["call"].split("(")[0] for v in found.violations] == ["exit_group"]


def test_errno_entries_are_used_and_their_calls_listed():
    found = analyze(TRACE)
    [sample] = found.roles["vcpu"].denied["openat"]
    assert "/usr/lib/x.py" in sample
    assert found.roles["vcpu"].entries["openat errno(EACCES) -"] == 1


def test_unused_entries_with_their_comments():
    unused = analyze(TRACE).unused(PROFILES)
    assert unused["vcpu"] == {"ioctl allow arg1 == KVM_GET_REGS": "error path",
                              "futex allow -": "why", "exit allow -": "why"}
    assert unused["vm"]["getrandom allow -"] == "never called"
    assert "ioctl allow arg1 == KVM_RUN" not in unused["vm"]


def test_an_argument_outside_the_entries_is_a_violation():
    trace = TRACE[:3] + ["100<vmm-vm> ioctl(5, 0x4020ae76 /* KVM_IRQFD */, 0x23b0420) = 0"]
    [violation] = analyze(trace).violations
    assert violation["role"] == "vm" and "KVM_IRQFD" in violation["call"]


def test_the_kernels_sigsys_is_a_violation_but_the_reporters_re_raise_is_not():
    trace = TRACE[:3] + [
        "100<vmm-vm> restart_syscall(<... resuming interrupted futex ...> <unfinished ...>",
        "100<vmm-vm> <... restart_syscall resumed>) = 219",
        "100<vmm-vm> --- SIGSYS {si_signo=31 /* SIGSYS */, si_code=0x1 /* SYS_SECCOMP */, "
        "si_call_addr=0x7f, si_syscall=219 /* __NR_restart_syscall */} ---",
        "100<vmm-vm> --- SIGSYS {si_signo=31 /* SIGSYS */, si_code=0xfffffffa /* SI_TKILL */, "
        "si_pid=100<vmm-vm>, si_uid=0} ---",
        "100<vmm-vm> +++ killed by SIGSYS (core dumped) +++"]
    violations = analyze(trace).violations
    assert len(violations) == 2
    assert violations[0]["call"].startswith("restart_syscall(")
    assert "SYS_SECCOMP" in violations[1]["call"]


def test_a_filter_loaded_with_tsync_is_refused():
    trace = ['100<python> seccomp(0x1 /* SECCOMP_SET_MODE_FILTER */, 0x1 /* SECCOMP_FILTER_FLAG_TSYNC */, '
             '{len=9, filter=0x1}) = 0']
    with pytest.raises(usage.UsageError, match="TSYNC"):
        analyze(trace)


@pytest.mark.parametrize("token,value", [
    ("0xae80 /* KVM_RUN */", 0xae80), ("-1", (1 << 64) - 1), ("NULL", 0), ("17", 17),
    ("flags=0x1200000 /* CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID */|17 /* SIGCHLD */",
     0x1200011), ('"vmm-vm"', None), ("{len=9, filter=0x1}", None), ("[0 1]", None),
    ("0755", 0o755), ("0", 0)])
def test_numbers_as_strace_prints_them(token, value):
    assert usage.number(token) == value


def test_arguments_split_at_the_top_level_only():
    args, rest = usage.split_args('3, "a, b)", {x=[1, 2], y=0x1 /* A, B */}, 0) = 5 <vmm-vm>')
    assert args == ['3', '"a, b)"', '{x=[1, 2], y=0x1 /* A, B */}', '0']
    assert rest.strip().startswith("= 5")


@pytest.mark.parametrize("line,shown", [
    ("ioctl(27, 0xae80 /* KVM_RUN */, 0) = 0", "ioctl(KVM_RUN)"),
    ("fcntl(5, 0x406 /* F_DUPFD_CLOEXEC */, 0) = 6", "fcntl(F_DUPFD_CLOEXEC)"),
    ("tgkill(1, 2, 0xa /* SIGUSR1 */) = 0", "tgkill(SIGUSR1)"),
    ("newfstatat(3, \"\", {st_mode=0}, 0x1000 /* AT_EMPTY_PATH */) = 0", "newfstatat(fd)"),
    ("mmap(NULL, 4096, 0x3 /* PROT_READ|PROT_WRITE */, 0x22, -1, 0) = 0x7f", "mmap")])
def test_calls_are_listed_with_the_argument_their_entries_check(line, shown):
    call = usage._call(1, "t", line)
    assert usage.describe(call) == shown


def test_json_round_trip_and_merge():
    first = analyze(TRACE)
    again = usage.Usage.from_json(json.loads(json.dumps(first.to_json())))
    assert again.to_json() == first.to_json()
    merged = again.merge(analyze(TRACE))
    assert merged.roles["vcpu"].calls["ioctl(KVM_RUN)"] == 4
    assert len(merged.violations) == 2

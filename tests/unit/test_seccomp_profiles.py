"""The seccomp profiles as files: every role loads, validates and compiles; the checked-in
JSON is what seccomp_profiles/generate.py writes; the rules every role must share are
there; malformed profiles are rejected with a clear message."""

import copy
import json

import pytest

from vmm import sandbox
from vmm._kvm import lib as kvm
from vmm.sandbox import constants, empty_root, profile, reporter, seccomp
from vmm.sandbox.profile import ProfileError

import importlib.util

_spec = importlib.util.spec_from_file_location("generate", profile.PROFILE_DIR / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

ROLES = list(sandbox.ROLES)


def _eq(index: int, value: int) -> tuple:
    return (profile.Arg(index, "SCMP_CMP_EQ", value, 0),)


# What vmm/sandbox/empty_root.py calls, with the very flags it passes.
EMPTY_ROOT = ("unshare", "mount", "umount2", "pivot_root", "chdir", "mkdir")
EMPTY_ROOT_RULES = {
    "unshare": {_eq(0, empty_root.UNSHARE)},
    "mount": {_eq(3, flags) for flags in (empty_root.PRIVATE, empty_root.TMPFS,
                                          empty_root.BIND, empty_root.READ_ONLY)},
    "umount2": {_eq(1, constants.value("MNT_DETACH"))},
    "pivot_root": {()},
    "chdir": {()},
    "mkdir": {_eq(1, empty_root.DIRECTORY_MODE)},
}


def keyed(p: profile.Profile) -> set:
    """(syscall, action, errno, args) of every rule, one per name."""
    return {(name, r.action, r.errno, r.args) for r in p.rules for name in r.names}


def test_there_is_one_profile_per_role():
    assert sorted(profile.roles()) == sorted(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_profile_loads_validates_and_compiles(role):
    p = profile.load(role)
    assert p.default_action == "SCMP_ACT_TRAP"
    assert all(rule.comment.strip() for rule in p.rules)
    assert len(seccomp.export(seccomp.build(p), "bpf")) > 0


@pytest.mark.parametrize("role", ROLES)
def test_checked_in_profile_is_what_the_generator_writes(role):
    on_disk = json.loads((profile.PROFILE_DIR / f"{role}.json").read_text())
    assert on_disk == generate.profile(role), "run seccomp_profiles/generate.py"


@pytest.mark.parametrize("role", ROLES)
def test_rules_every_role_shares(role):
    p = profile.load(role)
    names = p.syscalls()
    assert not names & {"execve", "execveat", "ptrace", "process_vm_writev", "fork",
                        "vfork", "kexec_load", "init_module", "bpf", "setns"}
    rules = {name: [r for r in p.rules if name in r.names] for name in names}
    # A backend's empty root (vmm/sandbox/empty_root.py) is made under the launcher's
    # filter when the launcher forks it (hot-plug, restart): only the launcher has these,
    # and only with the flags the empty root uses.
    if role == "launcher":
        assert {name: {r.args for r in rules[name]} for name in EMPTY_ROOT} == \
            EMPTY_ROOT_RULES
    else:
        assert not names & set(EMPTY_ROOT), role
    # Sockets: only the vsock backend (a guest's stream to <socket>_<port>) and the
    # launcher (a hot-plugged backend's connection; a datagram socket for a tap's ioctls)
    # make them, and only AF_UNIX ones.
    unix = (profile.Arg(0, "SCMP_CMP_EQ", constants.value("AF_UNIX"), 0),)
    if role in ("virtio-vsock", "launcher"):
        assert all(r.args == unix for r in rules["socket"])
    else:
        assert "socket" not in names
    if role == "launcher":
        assert all(r.args == unix for r in rules["socketpair"])
    else:
        assert "socketpair" not in names
    # The SIGSYS reporter's own syscalls, so its re-raise cannot trap again.
    for name in ("write", "rt_sigaction", "getpid", "gettid", "rt_sigreturn"):
        assert any(not r.args and r.action == "SCMP_ACT_ALLOW" for r in rules[name]), name
    assert any(r.args == (profile.Arg(2, "SCMP_CMP_EQ", constants.value("SIGSYS"), 0),)
               for r in rules["tgkill"])
    # Dangerous syscalls only with conditions.
    for name in ("ioctl", "mmap", "mprotect", "clone", "prctl", "kill", "tgkill", "fcntl",
                 "seccomp"):
        for r in rules.get(name, []):
            assert r.args, f"{role}: {name} without conditions"
    for name in ("mmap", "mprotect"):
        assert all(a.op == "SCMP_CMP_MASKED_EQ" and a.value == constants.value("PROT_EXEC")
                   and a.value_two == 0 for r in rules[name] for a in r.args)
    # clone: threads only; and the launcher's fork of a hot-plugged backend: no thread,
    # no shared memory, no namespace.
    thread, vm = constants.value("CLONE_THREAD"), constants.value("CLONE_VM")
    new_namespace = sum(constants.value(n) for n in ("CLONE_NEWNS", "CLONE_NEWUSER",
                                                      "CLONE_NEWPID", "CLONE_NEWNET"))
    for r in rules.get("clone", []):
        (arg,) = r.args
        assert arg.op == "SCMP_CMP_MASKED_EQ" and arg.value & thread
        assert arg.value & new_namespace == new_namespace
        if arg.value_two == 0:
            assert role == "launcher" and arg.value & vm, role
        else:
            assert arg.value_two == thread
    # openat: EACCES; only the launcher (the broker) opens, and never following a symlink.
    eacces = ("SCMP_ACT_ERRNO", constants.value("EACCES"))
    nofollow = constants.value("O_NOFOLLOW")
    if role == "launcher":
        assert sorted(((r.action, r.errno), r.args) for r in rules["openat"]) == sorted([
            (("SCMP_ACT_ALLOW", None), (profile.Arg(2, "SCMP_CMP_MASKED_EQ", nofollow, nofollow),)),
            (eacces, (profile.Arg(2, "SCMP_CMP_MASKED_EQ", nofollow, 0),))])
    else:
        assert [(r.action, r.errno) for r in rules["openat"]] == [eacces]


def test_vcpu_ioctls_are_the_few_a_vcpu_thread_makes():
    ioctls = {a.value for r in profile.load("vcpu").rules if "ioctl" in r.names for a in r.args}
    assert ioctls == {kvm.KVM_RUN, kvm.KVM_GET_REGS, kvm.KVM_IRQ_LINE,
                      # the kernel's vhost-vsock, started and stopped at DRIVER_OK and reset;
                      # not its owner, CID or memory table (set before any filter)
                      kvm.VHOST_SET_FEATURES, kvm.VHOST_SET_VRING_NUM, kvm.VHOST_SET_VRING_BASE,
                      kvm.VHOST_SET_VRING_ADDR, kvm.VHOST_SET_VRING_KICK,
                      kvm.VHOST_SET_VRING_CALL, kvm.VHOST_VSOCK_SET_RUNNING,
                      kvm.VHOST_GET_VRING_BASE}


def test_the_vm_filter_lets_its_threads_do_what_their_own_filters_allow():
    """vCPU and QMP threads inherit the vm filter: a syscall must pass both."""
    vm = keyed(profile.load("vm"))
    for role in ("vcpu", "api"):
        assert keyed(profile.load(role)) <= vm, role


def test_the_launcher_filter_lets_the_backends_it_forks_do_what_theirs_allow():
    """A hot-plugged or restarted backend is forked under the launcher's filter and
    stacks its own: every entry of its role is in the launcher's (opens aside: the
    backend's own filter denies them all)."""
    launcher = {key for key in keyed(profile.load("launcher")) if key[0] != "openat"}
    for role in ("virtio-blk", "virtio-net", "virtio-console", "virtio-vsock"):
        mine = {key for key in keyed(profile.load(role)) if key[0] != "openat"}
        assert mine <= launcher, (role, mine - launcher)


def test_constants_come_from_the_same_headers_as_the_kvm_module():
    for name in ("KVM_RUN", "KVM_GET_REGS", "KVM_IRQ_LINE", "KVM_SET_USER_MEMORY_REGION",
                 "KVM_CREATE_VCPU"):
        assert constants.value(name) == getattr(kvm, name)


@pytest.mark.parametrize("role", ROLES)
def test_exports_bpf_and_pfc(role):
    f = seccomp.build(profile.load(role))
    bpf = seccomp.export(f, "bpf")
    assert bpf and len(bpf) % 8 == 0            # struct sock_filter is 8 bytes
    pfc = seccomp.export(f, "pfc").decode()
    for name in profile.load(role).syscalls():
        assert f'"{name}"' in pfc


def test_violation_line():
    assert reporter.violation_line("vcpu", 16) == "seccomp violation: role=vcpu syscall=16 (ioctl)\n"
    assert reporter.violation_line("vm", 59) == "seccomp violation: role=vm syscall=59 (execve)\n"
    assert reporter.violation_line("vm", 9999) == "seccomp violation: role=vm syscall=9999 (?)\n"


def _broken(change) -> dict:
    document = copy.deepcopy(generate.profile("vcpu"))
    change(document)
    return document


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(listenerPath="/x"), "unknown field 'listenerPath'"),
    (lambda d: d["syscalls"][0].update(note="x"), "unknown field 'note'"),
    (lambda d: d["syscalls"][0].update(names=["no_such_call"]), "not an x86_64 syscall"),
    (lambda d: d["syscalls"][0].update(action="SCMP_ACT_MAYBE"), "unknown action"),
    (lambda d: d["syscalls"][0].pop("comment"), "needs a comment"),
    (lambda d: d.update(architectures=["SCMP_ARCH_X86"]), "architectures"),
    (lambda d: d["syscalls"][0].update(args=[{"index": 1, "value": 1, "op": "SCMP_CMP_ABOUT"}]),
     "unknown op"),
    (lambda d: d["syscalls"][0].update(args=[{"index": 7, "value": 1, "op": "SCMP_CMP_EQ"}]),
     "index must be 0..5"),
    (lambda d: d["syscalls"][0].update(action="SCMP_ACT_ERRNO"), "needs errnoRet"),
    (lambda d: d["syscalls"][0].update(errnoRet=1), "only goes with SCMP_ACT_ERRNO"),
])
def test_malformed_profiles_are_rejected(change, message):
    with pytest.raises(ProfileError, match=message):
        profile.parse("vcpu", _broken(change))


def test_unknown_role():
    with pytest.raises(ProfileError, match="no profile for role 'gpu'"):
        profile.load("gpu")
    with pytest.raises(ProfileError, match="unknown role"):
        sandbox.confine("gpu")

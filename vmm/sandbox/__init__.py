"""Confining the VMM's processes and threads: privileges (and for a device backend an
empty root of its own: empty_root.py), then a per-thread seccomp filter from the role's
profile in seccomp_profiles/ (docs/seccomp.md).

The processes call `confine(role, ...)` at the point where their setup is done and
before they touch anything the guest or a peer controls.
"""

import signal

from .. import timeline
from . import empty_root, privileges, reporter
from . import seccomp as _seccomp
from .empty_root import EmptyRootError
from .profile_dir import roles

__all__ = ["confine", "prepare", "EmptyRootError", "ProfileError", "ROLES", "BACKENDS"]


def __getattr__(name):
    if name == "ProfileError":          # profile.py is read only to compile a filter
        from .profile import ProfileError
        return ProfileError
    raise AttributeError(name)


# The device backends' roles, each with its processes' name prefix (vmm-blk-<id>): each
# such process gets an empty root (empty_root.py); `seccomp audit` and the fault counts
# (metrics) tell a backend's role by its name (backend_role).
BACKENDS = {"virtio-blk": "vmm-blk-", "virtio-net": "vmm-net-", "virtio-console": "vmm-con-",
            "virtio-vsock": "vmm-vsock-", "virtio-rng": "vmm-rng-"}
ROLES = ("launcher", "vm", "vcpu", "api", *BACKENDS)
_filters: dict = {}


def backend_role(process_name: str) -> str | None:
    """The role of a backend process by its name (comm), None if it is not one."""
    return next((role for role, prefix in BACKENDS.items()
                 if process_name.startswith(prefix)), None)


def prepare() -> None:
    """Every role's compiled filter (seccomp.program: cached, or compiled), now, while
    files can still be opened: a thread confined later (a vCPU under the vm filter,
    where openat fails) finds its filter ready, and so does every process forked
    afterwards (the launcher calls this before it forks any). confine() of a process
    calls it; calling it again costs nothing."""
    privileges.prepare()
    empty_root.prepare()
    for role in roles():
        if role not in _filters:
            _filters[role] = _seccomp.program(role)


def confine(role: str, *, seccomp: bool = True, thread: bool = False,
            name: str | None = None, log_fd: int | None = None,
            reach: str | None = None, ahead_of: str | None = None) -> None:
    """Confine the calling thread (thread=True) or process (thread=False) as `role`.

    Rules for the caller:
    - Import everything the process will ever need first: once the filter is on, a
      lazy import cannot open its file (openat fails with EACCES).
    - Only the calling thread gets the filter (no TSYNC). A thread created after its
      creator's filter inherits that filter; a thread's own filter then stacks on it,
      and a syscall must pass every filter of the thread. So the vm process confines
      its main thread before it starts any thread, and each vCPU and the QMP thread
      calls confine("vcpu" / "api", thread=True) first thing in its run().
    - A process (thread=False) must still be single-threaded: it sets no_new_privs and,
      except for the launcher, PR_SET_PDEATHSIG(SIGKILL) and an empty capability set in
      every set, all of which threads inherit from their creator.
    - A device backend's process (a role in BACKENDS) then moves into an empty root in
      new user, mount and IPC namespaces (empty_root.py), before its capabilities go;
      `reach` is the one directory its root may hold (vsock's socket directory). Failing
      that, EmptyRootError: the backend never runs unjailed.
    - A thread started before its process is confined (the vm process's QMP thread, so
      that the api-channel answers while the machine is being built) names the role
      its process will have, `ahead_of`: it first takes what it would otherwise have
      inherited (no_new_privs, an empty capability set, that role's filter), and then
      its own filter stacks on it as usual.
    - seccomp=False (-disable-seccomp) skips the filter and nothing else.
    - `name` sets the thread's name (comm), which `stratovirt seccomp check` reads;
      `log_fd` is where a violation is reported (default: the log's fd, else stderr).
    """
    if role not in ROLES:
        from .profile import ProfileError
        raise ProfileError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if seccomp and role not in _filters:
        prepare()
    if name:
        privileges.set_name(name)
    if not thread:
        privileges.no_new_privs()
        if role != "launcher":
            privileges.die_with_parent(signal.SIGKILL)
            if role in BACKENDS:
                privileges.prepare()        # /proc/sys is gone once the root is empty
                empty_root.enter(reach)
            privileges.drop_capabilities()
    if thread and ahead_of:
        privileges.no_new_privs()
        privileges.drop_capabilities()
        if seccomp:
            # Loaded under that role's process name (vmm-vm) and named back after: the
            # usage recorder tells whose filter a thread loads by the thread's name.
            own = privileges.name()
            privileges.set_name(f"vmm-{ahead_of}")
            _seccomp.install_program(_filters[ahead_of])
            privileges.set_name(own)
    if not seccomp:
        return
    if thread:
        reporter.set_thread_role(role)
    if not thread or not reporter.armed():
        reporter.arm(role, log_fd)
    _seccomp.install_program(_filters[role])
    if not thread:
        timeline.mark(f"{role} confined")

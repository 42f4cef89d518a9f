"""A device backend's empty root: once confined, a backend sees no file system at all.

Why: a backend is the process that parses what the guest writes into its rings, so it is
the likeliest to be compromised. Its seccomp filter already makes openat fail, but a
filter is one layer (and -disable-seccomp takes it away); with an empty root there is no
path left to reach even through a hole in it: not the host's files, not the other
devices' images, not /proc, not the api-channel socket. crosvm's minijail gives each
device process such a root; Firecracker and StratoVirt jail the VMM as a whole. A backend
needs no path: everything it uses is an fd it was given (its image or tap, its sockets,
the log) or gets over vhost-user (guest RAM, eventfds), and file descriptions do not
depend on the root. The one exception is vsock: a guest's stream to port P connects to
the host socket `<uds path>_P` by name, so its root holds that socket directory, bind-
mounted at the same path, and nothing else (enter(reach=...)). When that directory is /
itself (an api-channel at the top of a jail; the jailer offers /run for it) nothing can be hidden:
that backend keeps its namespaces and its root, and says so in the log.

How (enter(), called by vmm.sandbox.confine for the backend roles, after
vmm/children.py has closed every other fd and before the capabilities go and the filter
goes on):
1. unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC). The new user namespace is what
   allows the rest without privilege: its creator holds every capability inside it, so a
   launcher running as an unprivileged uid with no capabilities (as the jailer runs
   it) can still make the backend's mount and IPC namespaces and mount in them. For a
   launcher running as root it also takes the backend's capabilities in the host's
   namespace away at once, and a backend running as the launcher's uid can no longer
   ptrace the launcher or its other children (that needs CAP_SYS_PTRACE over their
   namespace). The IPC namespace hides the host's System V IPC and POSIX message queues.
2. Its own uid and gid are mapped to themselves (setgroups "deny" first: the only mapping
   a process may write for itself). Why map at all: the kernel refuses to create anything
   (EOVERFLOW) for an unmapped uid or gid, and vsock's root needs its socket directory's
   path made in the tmpfs. Nothing else depends on it: permission checks on host objects
   use the kernel's ids, which no mapping changes, so the launcher's kill() (same uid, or
   CAP_KILL over a descendant namespace), fds passed with SCM_RIGHTS, the vsock
   backend's connect() to `<uds path>_P`, and /proc/PID reads by the launcher, the tests
   and `stratovirt seccomp check` work the same either way. Mapped, the backend reads
   its real ids instead of the overflow uid 65534, and one code path serves every kind.
   Writing them needs a dumpable process (one that changed uid without an exec is not,
   and its /proc/self is root's); the jailer execs the VMM as its uid.
3. Every mount of the new namespace is made private (MS_REC|MS_PRIVATE on /): nothing the
   backend mounts propagates anywhere, nothing mounted later reaches it.
4. A small tmpfs is mounted on /proc (a directory that exists wherever the VMM runs: the
   launcher reads /proc/self/fd at start and the maps above were written there), for
   vsock its socket directory's path is made in it and the directory bind-mounted there
   (MS_BIND|MS_REC: a plain bind of a directory with mounts under it is refused in a
   user namespace), then it is remounted read-only.
5. chdir into it, pivot_root(".", "."), umount2(".", MNT_DETACH) (the old root, stacked
   on "." by pivot_root, is detached), chdir("/").

Then confine() empties every capability set (those of the new namespace; the bounding
set a new user namespace starts with is full again, so this must come after) and
installs the role's filter. A backend forked by the launcher after the launcher's own
filter is on (hot-plug, restart) runs these calls under the launcher's filter, whose
profile allows exactly them (seccomp_profiles/generate.py, FORKED_BACKEND).

A step that fails raises EmptyRootError with one line naming it and the reason; the
backend ends with that line in the log (vmm/children.py) and never runs unjailed.
"""

import errno
import functools
import logging
import os

from .._sigsys import lib
from . import namespaces

UNSHARE = lib.CLONE_NEWUSER | lib.CLONE_NEWNS | lib.CLONE_NEWIPC
PRIVATE = lib.MS_REC | lib.MS_PRIVATE
TMPFS = lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC
BIND = lib.MS_BIND | lib.MS_REC
READ_ONLY = lib.MS_REMOUNT | lib.MS_RDONLY | TMPFS
MOUNT_ON = "/proc"
# Nothing is written there; the inodes are the root and, for vsock, its socket
# directory's path (a unix socket path, 108 bytes, has at most 54 components).
TMPFS_OPTIONS = "size=4k,nr_inodes=64,mode=0755"
DIRECTORY_MODE = 0o755
log = logging.getLogger(__name__)

# Why unshare may fail, by errno.
_UNSHARE_HINTS = {
    errno.ENOSPC: "user.max_user_namespaces, max_mnt_namespaces or max_ipc_namespaces is "
                  "0 or used up",
    errno.EPERM: "user namespaces are not allowed here (a chroot, "
                 "kernel.unprivileged_userns_clone=0, or a seccomp or security policy "
                 "over the VMM)",
    errno.EINVAL: "the kernel has no user namespaces (CONFIG_USER_NS)",
    errno.EUSERS: "user namespaces are nested 32 deep already",
}


class EmptyRootError(Exception):
    """A backend could not enter its empty root; the message is one line."""


@functools.cache
def _ids() -> tuple[int, int]:
    return os.geteuid(), os.getegid()


def prepare() -> None:
    """Read the ids now: a backend forked after the launcher's filter is on could not
    (geteuid is not in the launcher's profile); a fork keeps them."""
    _ids()


def enter(reach: str | None = None) -> None:
    """Move the calling process (single-threaded, still privileged enough to drop its
    capabilities afterwards) into an empty read-only root in new user, mount and IPC
    namespaces. `reach`: an absolute directory the root holds at the same path (the vsock
    backend's socket directory). Raises EmptyRootError."""
    if reach is not None and (not os.path.isabs(reach) or os.path.normpath(reach) != reach):
        raise EmptyRootError(f"cannot enter an empty root holding {reach!r}: not an "
                             "absolute, normalized directory")
    uid, gid = _ids()
    try:
        namespaces.unshare(UNSHARE)
    except OSError as error:
        hint = _UNSHARE_HINTS.get(error.errno)
        raise EmptyRootError("cannot enter an empty root: unshare(CLONE_NEWUSER|CLONE_NEWNS|"
                             f"CLONE_NEWIPC): {os.strerror(error.errno)}" +
                             (f" ({hint})" if hint else "")) from None
    _step("setgroups deny", lambda: _write("/proc/self/setgroups", "deny"))
    _step("uid_map", lambda: _write("/proc/self/uid_map", f"{uid} {uid} 1"))
    _step("gid_map", lambda: _write("/proc/self/gid_map", f"{gid} {gid} 1"))
    _step("making its mounts private", lambda: namespaces.mount(None, "/", None, PRIVATE))
    if reach == "/":
        # The directory it must reach is its root already: nothing can be hidden
        # (an api-channel at the top of a jail, not in the /run the jailer makes).
        log.warning("its sockets' directory is /, so its root stays / (an api-channel in "
                    "a directory of its own would give it an empty root)")
        return
    _step(f"a tmpfs on {MOUNT_ON}",
          lambda: namespaces.mount("tmpfs", MOUNT_ON, "tmpfs", TMPFS, TMPFS_OPTIONS))
    if reach is not None:
        _step(f"bind-mounting {reach}", lambda: _bind(reach))
    _step("remounting the tmpfs read-only",
          lambda: namespaces.mount(None, MOUNT_ON, None, READ_ONLY))
    _step(f"chdir {MOUNT_ON}", lambda: os.chdir(MOUNT_ON))
    _step("pivot_root", lambda: namespaces.pivot_root(".", "."))
    _step("detaching the old root", lambda: namespaces.umount2(".", lib.MNT_DETACH))
    _step("chdir /", lambda: os.chdir("/"))


def _step(what: str, action) -> None:
    try:
        action()
    except OSError as error:
        raise EmptyRootError(f"cannot enter an empty root: {what}: "
                             f"{os.strerror(error.errno)}") from None


def _write(path: str, text: str) -> None:
    # O_NOFOLLOW: the only kind of open the launcher's filter allows (a backend forked
    # for hot-plug or a restart runs under it until its own goes on).
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _bind(reach: str) -> None:
    """`reach`'s path made in the tmpfs, and the directory bind-mounted on its end."""
    target = MOUNT_ON
    for part in reach.strip("/").split("/"):
        target = f"{target}/{part}"
        os.mkdir(target, DIRECTORY_MODE)
    namespaces.mount(reach, target, None, BIND)

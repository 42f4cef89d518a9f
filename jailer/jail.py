"""Entering the jail: what the jailed child does, in Firecracker's order, from joining the
VM's cgroup to exec'ing the VMM as uid:gid with no capabilities.

    cgroup -> rlimits -> netns -> mount, IPC and UTS namespaces -> the jail as root
    (read-only binds of the manifest and the sources, pivot_root, old root detached)
    -> device nodes -> /proc -> uid/gid, no capabilities -> execve the VMM with an empty
    environment

With --new-pid-ns the supervisor made the PID namespace before forking this child
(unshare(CLONE_NEWPID) takes effect for the caller's next child), so the child is its
PID 1 from its first instruction and becomes the VMM's launcher by execve: no process
stays between the supervisor and the VMM to pass on signals and the exit status.

The jail directory itself is a plain directory on the host (DIR/stratovirt/ID/root, owned
by uid:gid): the VMM creates its sockets, pidfile and log there, so the api-channel is
reachable from the host at DIR/stratovirt/ID/root/<path>. The bind mounts exist only in
the jail's mount namespace; on the host their mount points are empty files and
directories, removed with the jail by --clean.
"""

import os
import resource
import signal
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import prctl

from vmm import config as vmm_config

from vmm._sigsys import lib
from vmm.sandbox import namespaces as ns

from . import cgroups
from .spec import JailSpec

# Device nodes, copied from the host's (same major:minor) and owned by uid:gid.
ALWAYS_DEVICES = {"/dev/kvm": 0o600, "/dev/null": 0o666, "/dev/urandom": 0o666}
TUN = "/dev/net/tun"
PROC_OPTIONS = "hidepid=invisible,subset=pid"   # only its own processes, no /proc/sys
OLD_ROOT = "old-root"


class JailError(Exception):
    pass


def prepare_directory(spec: JailSpec) -> None:
    """DIR/stratovirt/ID/root, the VMM's writable root, and its /run, owned by uid:gid."""
    spec.jail_dir.parent.mkdir(parents=True, exist_ok=True)
    spec.jail_dir.mkdir(mode=0o755)
    spec.root.mkdir(mode=0o700)
    os.chown(spec.root, spec.uid, spec.gid)
    # A directory for the VMM's sockets: an api-channel there puts vsock's host sockets
    # there too, and the vsock backend's root then holds /run alone (docs/jailer.md).
    run = spec.root / "run"
    run.mkdir(mode=0o700)
    os.chown(run, spec.uid, spec.gid)


@dataclass(frozen=True)
class HostFacts:
    """What the jailed child needs from the host after the host is out of its view."""
    last_cap: int                       # the kernel's highest capability number
    devices: dict[str, int]             # device node path -> st_rdev


def host_facts() -> HostFacts:
    devices = {}
    for path in (*ALWAYS_DEVICES, TUN):
        try:
            devices[path] = os.stat(path).st_rdev
        except FileNotFoundError:
            if path != TUN:
                raise JailError(f"{path}: no such device on this host") from None
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return HostFacts(int(f.read()), devices)


def enter(spec: JailSpec, host: HostFacts) -> None:
    """Runs in the forked child, as root; returns only by exec (or raises)."""
    if spec.cgroup:
        cgroups.join(spec.cgroup)
    for kind, value in spec.rlimits:
        resource.setrlimit(kind, (value, value))
    if spec.netns:
        fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        ns.setns(fd, lib.CLONE_NEWNET)
        os.close(fd)
    ns.unshare(lib.CLONE_NEWNS | lib.CLONE_NEWIPC | lib.CLONE_NEWUTS)
    socket.sethostname(spec.id)
    _pivot(spec)
    config = _vmm_config(spec)
    _devices(spec, host, nic=bool(config.nics))
    Path("/proc").mkdir(exist_ok=True)
    ns.mount("proc", "/proc", "proc", lib.MS_NOSUID | lib.MS_NODEV | lib.MS_NOEXEC, PROC_OPTIONS)
    _drop_to(spec.uid, spec.gid, host.last_cap)
    os.execve(str(spec.exec_file), [spec.exec_file.name, *spec.vmm_args], {})


def _pivot(spec: JailSpec) -> None:
    """The jail as the root of a mount namespace of its own: nothing the host mounts
    later propagates in and nothing of ours propagates out (private: Firecracker's slave
    would still let the host's later mounts under a bound directory reach the jail), and
    the host's tree is detached once we stand in it."""
    ns.mount(None, "/", None, lib.MS_REC | lib.MS_PRIVATE)
    root = str(spec.root)
    ns.mount(root, root, None, lib.MS_BIND | lib.MS_REC)
    manifest = spec.manifest
    for path in manifest.directories:
        _bind(path, spec.root, directory=True)
    for path in manifest.files:
        _bind(path, spec.root, directory=False)
    for link, target in manifest.links.items():
        inside = _inside(spec.root, link)
        inside.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(inside):
            os.symlink(target, inside)
    for source in spec.sources:
        _bind(str(source), spec.root, directory=False, at=f"/{source.name}", writable=True)
    os.chdir(root)
    os.mkdir(OLD_ROOT, 0o700)
    ns.pivot_root(".", OLD_ROOT)
    os.chroot(".")
    os.chdir("/")
    ns.umount2(f"/{OLD_ROOT}", lib.MNT_DETACH)
    os.rmdir(f"/{OLD_ROOT}")


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _bind(source: str, root: Path, directory: bool, at: str | None = None,
          writable: bool = False) -> None:
    """Bind `source` at `at` (default: the same path) inside the jail; read-only,
    nosuid and nodev unless `writable` (a source file the VM may write: its disk)."""
    target = _inside(root, at or source)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        target.mkdir(exist_ok=True)
    elif not target.exists():
        target.touch()
    ns.mount(source, str(target), None, lib.MS_BIND | lib.MS_REC)
    flags = lib.MS_BIND | lib.MS_REMOUNT | lib.MS_NOSUID | lib.MS_NODEV
    if not writable:
        flags |= lib.MS_RDONLY
    ns.mount(None, str(target), None, flags)


def _vmm_config(spec: JailSpec):
    """The VMM's configuration as the VMM will read it, paths inside the jail: which
    device nodes it needs (/dev/net/tun only with a NIC). A mistake in it is the VMM's
    own one-line error, reported before the VMM starts."""
    try:
        invocation = vmm_config.parse(list(spec.vmm_args))
    except vmm_config.ConfigError as error:
        raise JailError(f"stratovirt: error: {error}") from None
    if isinstance(invocation, int):
        raise JailError("the stratovirt arguments ask for --help or --version, not a VM")
    return invocation.config


def _devices(spec: JailSpec, host: HostFacts, nic: bool) -> None:
    """Only the nodes the VM needs, with the host's numbers (read before the host went
    out of view)."""
    wanted = dict(ALWAYS_DEVICES)
    if nic:
        if TUN not in host.devices:
            raise JailError(f"a NIC is configured but this host has no {TUN}")
        wanted[TUN] = 0o600
    Path("/dev").mkdir(mode=0o755, exist_ok=True)
    for path, mode in wanted.items():
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | mode, host.devices[path])
        os.chmod(path, mode)                    # mknod's mode is cut by the umask
        os.chown(path, spec.uid, spec.gid)


def exit_status(pid: int) -> int:
    """Wait for the child; its exit status as a shell gives it (128 + N if killed by N)."""
    _, status = os.waitpid(pid, 0)          # PEP 475: retried after a signal handler
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _drop_to(uid: int, gid: int, last_cap: int) -> None:
    """uid:gid with no capability in any set, and no way to gain one by exec."""
    for cap in range(last_cap + 1):
        if prctl.capbset_read(cap):
            prctl.capbset_drop(cap)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)          # from root: permitted and effective sets emptied
    prctl.set_no_new_privs(1)
    prctl.set_caps((list(range(last_cap + 1)), prctl.CAP_INHERITABLE, False))
    # After the uid change, which clears it: the jailed VMM dies with its supervisor
    # rather than run on unsupervised.
    prctl.set_pdeathsig(signal.SIGKILL)
